//! How merged reset reports (one per distinct RST, with its verdict) are printed, for both
//! `rstscope resets` and `rstscope analyze`. The JSON field names are a contract (README,
//! "JSON output: resets"); the table is for people and may change.

use rstscope_collector::pb;
use rstscope_proto::v1;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::output::ts_human;

fn ts_json(ns: i64) -> Box<RawValue> {
    RawValue::from_string(pb::ts_text(ns)).expect("a decimal number is valid JSON")
}

fn ep(endpoint: Option<&v1::Endpoint>) -> String {
    pb::endpoint(endpoint).map(|e| e.to_string()).unwrap_or_else(|| "?".to_string())
}

#[derive(Serialize)]
struct EvidenceJson<'a> {
    name: &'a str,
    detail: &'a str,
}

#[derive(Serialize)]
struct ObservationJson<'a> {
    agent: &'a str,
    ts: Box<RawValue>,
    corrected_ts: Box<RawValue>,
    src: String,
    dst: String,
    ttl: u32,
    ip_id: Option<u32>,
    seq: u32,
    ack: u32,
    flags: String,
    window: u32,
    payload_len: u32,
    direction: &'a str,
    local_cause: &'static str,
    record: &'a str,
}

#[derive(Serialize)]
struct ReportJson<'a> {
    r#type: &'static str,
    id: &'a str,
    ts: Box<RawValue>,
    time: String,
    connection: &'a str,
    client: String,
    server: String,
    claimed_sender: String,
    receiver: String,
    flags: String,
    verdict: &'a str,
    cause: &'a str,
    both_directions: bool,
    accepted: Option<bool>,
    location: &'a str,
    match_key: &'a str,
    observations: Vec<ObservationJson<'a>>,
    evidence: Vec<EvidenceJson<'a>>,
}

/// RFC 3339 with nanoseconds.
fn time_text(ns: i64) -> String {
    if ns <= 0 {
        return String::new();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.unsigned_abs());
    humantime::format_rfc3339_nanos(t).to_string()
}

/// One report as a JSON line (no newline).
pub fn report_json(r: &v1::ResetReport) -> String {
    let line = ReportJson {
        r#type: "reset",
        id: &r.id,
        ts: ts_json(r.ts_ns),
        time: time_text(r.ts_ns),
        connection: &r.connection,
        client: ep(r.client.as_ref()),
        server: ep(r.server.as_ref()),
        claimed_sender: ep(r.claimed_sender.as_ref()),
        receiver: ep(r.receiver.as_ref()),
        flags: pb::flags_text(r.flags),
        verdict: &r.verdict,
        cause: &r.cause,
        both_directions: r.both_directions,
        accepted: r.accepted,
        location: &r.location,
        match_key: &r.match_key,
        observations: r
            .observations
            .iter()
            .map(|o| ObservationJson {
                agent: &o.agent,
                ts: ts_json(o.ts_ns),
                corrected_ts: ts_json(o.corrected_ns),
                src: ep(o.src.as_ref()),
                dst: ep(o.dst.as_ref()),
                ttl: o.ttl,
                ip_id: o.ip_id,
                seq: o.seq,
                ack: o.ack,
                flags: pb::flags_text(o.flags),
                window: o.window,
                payload_len: o.payload_len,
                direction: &o.direction,
                local_cause: pb::cause_name(o.local_cause),
                record: &o.record,
            })
            .collect(),
        evidence: r.evidence.iter().map(|e| EvidenceJson { name: &e.name, detail: &e.detail }).collect(),
    };
    serde_json::to_string(&line).expect("reports serialize")
}

/// Column headings of [`report_row`].
pub fn report_header() -> String {
    format!(
        "{:<24} {:<11} {:<22} {:<5} {:<42} {:<24} {}",
        "TIME", "VERDICT", "CAUSE", "FLAGS", "CLAIMED SENDER -> RECEIVER", "SEEN BY", "WHERE"
    )
}

/// One report as a table row, then its evidence indented below.
pub fn report_row(r: &v1::ResetReport, with_evidence: bool) -> String {
    let seen: Vec<String> = r.observations.iter().map(|o| format!("{}({})", o.agent, o.direction)).collect();
    let mut verdict = r.verdict.clone();
    if r.both_directions {
        verdict.push('*');
    }
    let mut line = format!(
        "{:<24} {:<11} {:<22} {:<5} {:<42} {:<24} {}",
        ts_human(r.ts_ns),
        verdict,
        r.cause,
        pb::flags_text(r.flags),
        format!("{} -> {}", ep(r.claimed_sender.as_ref()), ep(r.receiver.as_ref())),
        seen.join(","),
        r.location
    );
    if with_evidence {
        for e in &r.evidence {
            line.push_str(&format!("\n    {:<22} {}", e.name, e.detail));
        }
    }
    line
}

/// One report, one short line.
pub fn report_compact(r: &v1::ResetReport) -> String {
    format!(
        "{} {} {} > {} {} {} [{}]",
        pb::ts_text(r.ts_ns),
        r.verdict,
        ep(r.claimed_sender.as_ref()),
        ep(r.receiver.as_ref()),
        pb::flags_text(r.flags),
        r.cause,
        r.observations.iter().map(|o| o.agent.as_str()).collect::<Vec<_>>().join(",")
    )
}

/// A connection's ladder: time down the page (corrected, relative to the first step), one
/// column per agent; RSTs carry their verdict.
pub fn ladder_text(steps: &[v1::LadderStep]) -> String {
    const WIDTH: usize = 46;
    let mut agents: Vec<&str> = Vec::new();
    for s in steps {
        if !agents.contains(&s.agent.as_str()) {
            agents.push(&s.agent);
        }
    }
    let Some(first) = steps.first() else { return "No steps.".to_string() };
    let mut out = String::new();
    out.push_str(&format!("time 0 = {} (reference clock)\n", ts_human(first.corrected_ns)));
    out.push_str(&format!("{:>12}  ", "+SECONDS"));
    for a in &agents {
        out.push_str(&format!("{:<WIDTH$}", a.to_uppercase()));
    }
    for s in steps {
        out.push('\n');
        let rel = (s.corrected_ns - first.corrected_ns) as f64 / 1e9;
        out.push_str(&format!("{rel:>12.6}  "));
        let col = agents.iter().position(|a| *a == s.agent).unwrap_or(0);
        let mut cell = s.what.clone();
        if !s.verdict.is_empty() {
            cell = format!("{cell} [{}]", s.verdict);
        }
        out.push_str(&" ".repeat(col * WIDTH));
        out.push_str(&cell);
    }
    out
}

/// One ladder step as a JSON line.
pub fn step_json(s: &v1::LadderStep) -> String {
    serde_json::json!({
        "type": "step",
        "corrected_ts": ts_json(s.corrected_ns),
        "ts": ts_json(s.local_ns),
        "agent": s.agent,
        "what": s.what,
        "verdict": s.verdict,
    })
    .to_string()
}
