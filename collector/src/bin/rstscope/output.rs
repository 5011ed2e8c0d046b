//! How answers are printed: `table` for people, `json` (one object per line, a contract) and
//! `compact` (one line per reset, tcpdump-like) for pipes. Pure functions from protobuf values
//! to strings, so the formats are tested without a collector.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rstscope_collector::pb;
use rstscope_proto::v1;
use serde::Serialize;
use serde_json::value::RawValue;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line.
    Json,
    /// One short line per record.
    Compact,
}

/// Epoch seconds with nine decimals as a JSON number, like the agent's output.
fn ts_json(ns: i64) -> Box<RawValue> {
    RawValue::from_string(pb::ts_text(ns)).expect("a decimal number is valid JSON")
}

/// `2024-05-01T12:00:00.123Z`, for tables.
pub fn ts_human(ns: i64) -> String {
    if ns <= 0 {
        return "-".to_string();
    }
    let time = UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs());
    humantime::format_rfc3339_millis(time).to_string()
}

fn endpoint_text(endpoint: Option<&v1::Endpoint>) -> String {
    pb::endpoint(endpoint).map(|e| e.to_string()).unwrap_or_else(|| "?".to_string())
}

#[derive(Serialize)]
struct EvidenceJson<'a> {
    name: &'a str,
    detail: &'a str,
}

#[derive(Serialize)]
struct ResetJson<'a> {
    r#type: &'static str,
    ts: Box<RawValue>,
    agent: &'a str,
    connection: &'a str,
    src: String,
    dst: String,
    sender: &'static str,
    flags: String,
    seq: u32,
    ack: u32,
    window: u32,
    ttl: u32,
    ip_id: Option<u32>,
    payload_len: u32,
    checksum: &'static str,
    phase: &'static str,
    history: &'a str,
    seq_relation: &'static str,
    cause: &'static str,
    verdict: &'a str,
    evidence: Vec<EvidenceJson<'a>>,
}

/// One reset as a JSON line (no newline).
pub fn reset_json(record: &v1::ResetRecord) -> String {
    let default = v1::RstEvent::default();
    let e = record.event.as_ref().unwrap_or(&default);
    let json = ResetJson {
        r#type: "reset",
        ts: ts_json(e.ts_ns),
        agent: &record.agent,
        connection: &record.connection,
        src: endpoint_text(e.src.as_ref()),
        dst: endpoint_text(e.dst.as_ref()),
        sender: pb::role_name(e.sender),
        flags: pb::flags_text(e.flags),
        seq: e.seq,
        ack: e.ack,
        window: e.window,
        ttl: e.ttl,
        ip_id: e.ip_id,
        payload_len: e.payload_len,
        checksum: pb::checksum_name(e.checksum),
        phase: pb::phase_name(e.phase),
        history: &e.history,
        seq_relation: pb::seq_relation_name(e.seq_relation),
        cause: pb::cause_name(e.cause),
        verdict: &record.verdict,
        evidence: e.evidence.iter().map(|v| EvidenceJson { name: &v.name, detail: &v.detail }).collect(),
    };
    serde_json::to_string(&json).expect("plain data serializes")
}

/// The column header of [`reset_row`].
pub fn reset_header() -> String {
    format!(
        "{:<24} {:<16} {:<47} {:<5} {}",
        "TIME", "AGENT", "SOURCE -> DESTINATION", "FLAGS", "CAUSE (THIS AGENT'S VIEW)"
    )
}

/// One agent's record as a table row. No verdict column: a verdict belongs to the merged report
/// of a RST (`resets` without `--raw`), not to one agent's record of it.
pub fn reset_row(record: &v1::ResetRecord) -> String {
    let default = v1::RstEvent::default();
    let e = record.event.as_ref().unwrap_or(&default);
    let path = format!("{} -> {}", endpoint_text(e.src.as_ref()), endpoint_text(e.dst.as_ref()));
    format!(
        "{:<24} {:<16} {:<47} {:<5} {}",
        ts_human(e.ts_ns),
        record.agent,
        path,
        pb::flags_text(e.flags),
        pb::cause_name(e.cause)
    )
}

/// One agent's record as a compact line: `ts agent src > dst: flags seq ack ttl cause`.
pub fn reset_compact(record: &v1::ResetRecord) -> String {
    let default = v1::RstEvent::default();
    let e = record.event.as_ref().unwrap_or(&default);
    format!(
        "{} {} {} > {}: {} seq {} ack {} ttl {} {}",
        pb::ts_text(e.ts_ns),
        record.agent,
        endpoint_text(e.src.as_ref()),
        endpoint_text(e.dst.as_ref()),
        pb::flags_text(e.flags),
        e.seq,
        e.ack,
        e.ttl,
        pb::cause_name(e.cause)
    )
}

/// One agent's flow summary as a JSON line.
pub fn flow_json(flow: &v1::AgentFlow) -> String {
    let default = v1::FlowSummary::default();
    let f = flow.flow.as_ref().unwrap_or(&default);
    let direction = |d: Option<&v1::DirectionSummary>| {
        let d = d.cloned().unwrap_or_default();
        serde_json::json!({"pkts": d.pkts, "payload_bytes": d.payload_bytes, "retransmissions": d.retransmissions, "rsts": d.rsts})
    };
    let json = serde_json::json!({
        "type": "flow",
        "agent": flow.agent,
        "ts": ts_json(f.start_ns),
        "duration": ts_json(f.end_ns.saturating_sub(f.start_ns)),
        "orig": endpoint_text(f.orig.as_ref()),
        "resp": endpoint_text(f.resp.as_ref()),
        "conn_state": f.conn_state,
        "history": f.history,
        "orig_dir": direction(f.orig_dir.as_ref()),
        "resp_dir": direction(f.resp_dir.as_ref()),
        "port_reuse": f.port_reuse,
    });
    json.to_string()
}

/// One agent's flow summary as a table row.
pub fn flow_row(flow: &v1::AgentFlow) -> String {
    let default = v1::FlowSummary::default();
    let f = flow.flow.as_ref().unwrap_or(&default);
    format!(
        "{:<16} {} -> {}  {}  {}  start {}  {}s",
        flow.agent,
        endpoint_text(f.orig.as_ref()),
        endpoint_text(f.resp.as_ref()),
        f.conn_state,
        f.history,
        ts_human(f.start_ns),
        pb::ts_text(f.end_ns.saturating_sub(f.start_ns))
    )
}

/// One agent as a JSON line.
pub fn agent_json(agent: &v1::AgentState) -> String {
    serde_json::json!({
        "type": "agent",
        "name": agent.name,
        "host_name": agent.host_name,
        "software_version": agent.software_version,
        "connected": agent.connected,
        "last_seen": ts_json(agent.last_seen_ns),
        "watermark": ts_json(agent.watermark_ns),
        "events": agent.events,
        "capture_drops": agent.capture_drops,
        "events_dropped": agent.events_dropped,
        "spool_backlog": agent.spool_backlog,
        "clock_reference": agent.clock_reference,
        "clock_offset_ns": agent.clock_offset_ns,
        "clock_uncertainty_ns": agent.clock_uncertainty_ns,
        "clock_drift_ppm": agent.clock_drift_ppm,
        "clock_samples": agent.clock_samples,
    })
    .to_string()
}

/// The column header of [`agent_row`].
pub fn agent_header() -> String {
    format!(
        "{:<16} {:<20} {:<10} {:<9} {:<24} {:<24} {:>10} {:>10} {:>8}  {}",
        "NAME", "HOST", "VERSION", "CONNECTED", "LAST SEEN", "WATERMARK", "EVENTS", "DROPS", "BACKLOG", "CLOCK"
    )
}

/// One agent as a table row.
pub fn agent_row(agent: &v1::AgentState) -> String {
    format!(
        "{:<16} {:<20} {:<10} {:<9} {:<24} {:<24} {:>10} {:>10} {:>8}  {}",
        agent.name,
        agent.host_name,
        agent.software_version,
        if agent.connected { "yes" } else { "no" },
        ts_human(agent.last_seen_ns),
        ts_human(agent.watermark_ns),
        agent.events,
        agent.capture_drops + agent.events_dropped,
        agent.spool_backlog,
        clock_text(agent)
    )
}

/// The agent's clock against the reference: `reference`, `+4.200 s ±0.3 ms (12)` or `unknown`.
fn clock_text(agent: &v1::AgentState) -> String {
    match (agent.clock_offset_ns, agent.clock_uncertainty_ns) {
        _ if agent.name == agent.clock_reference => "reference".to_string(),
        (Some(offset), Some(unc)) => {
            format!("{:+.3} s ±{:.1} ms ({} handshakes)", offset as f64 / 1e9, unc as f64 / 1e6, agent.clock_samples)
        }
        _ => "unknown".to_string(),
    }
}

/// The collector's status as a JSON line.
pub fn status_json(status: &v1::StatusReply) -> String {
    serde_json::json!({
        "type": "status",
        "version": status.version,
        "uptime_seconds": status.uptime_seconds,
        // `resets` counts the same as `reset_sightings`; kept for scripts that read it.
        "resets": status.resets,
        "reset_sightings": status.resets,
        "decided_resets": status.decided_resets,
        "flows": status.flows,
        "store_bytes": status.store_bytes,
        "agents": status.agents,
        "correlation_backlog_events": status.correlation_backlog_events,
    })
    .to_string()
}

/// The collector's status for people. Resets are counted twice over: the distinct RSTs decided
/// (one line each in `rstscope resets`), and the agents' stored records of RSTs (a RST seen by
/// three agents is three sightings).
pub fn status_text(status: &v1::StatusReply, collector: &str) -> String {
    format!(
        "collector   {collector}\nversion     {}\nuptime      {}\nresets      {} decided, from {} sightings (one per agent that saw a RST)\nflows       {}\nstore       {:.1} MiB\nagents      {}\nbacklog     {} events not correlated yet",
        status.version,
        humantime::format_duration(Duration::from_secs(status.uptime_seconds)),
        status.decided_resets,
        status.resets,
        status.flows,
        status.store_bytes as f64 / f64::from(1u32 << 20),
        status.agents,
        status.correlation_backlog_events
    )
}

/// Parses `--since`/`--until`: a duration back from `now` (`90s`, `1h`, `2d`), an RFC 3339
/// time (`2024-05-01T12:00:00Z`), or epoch seconds (`1714564800.5`).
pub fn parse_time(text: &str, now: SystemTime) -> Result<i64, String> {
    let text = text.trim();
    let to_ns = |t: SystemTime| -> Result<i64, String> {
        let since_epoch = t.duration_since(UNIX_EPOCH).map_err(|_| format!("{text:?} is before 1970"))?;
        i64::try_from(since_epoch.as_nanos()).map_err(|_| format!("{text:?} is too far in the future"))
    };
    if let Ok(ago) = humantime::parse_duration(text) {
        return to_ns(now.checked_sub(ago).ok_or_else(|| format!("{text:?} reaches before 1970"))?);
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return to_ns(at);
    }
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && (0.0..1e10).contains(&seconds) {
            return Ok((seconds * 1e9).round() as i64);
        }
    }
    Err(format!("{text:?} is not a duration (1h, 30m, 2d), an RFC 3339 time (2024-05-01T12:00:00Z) or epoch seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> v1::ResetRecord {
        v1::ResetRecord {
            agent: "edge-1".into(),
            connection: "192.0.2.1:443-198.51.100.7:50000".into(),
            event: Some(v1::RstEvent {
                ts_ns: 1_714_564_800_123_456_789,
                src: Some(v1::Endpoint { ip: vec![192, 0, 2, 1], port: 443 }),
                dst: Some(v1::Endpoint { ip: vec![198, 51, 100, 7], port: 50_000 }),
                sender: v1::Role::Responder as i32,
                flags: 0x014,
                seq: 1000,
                ack: 2000,
                ttl: 64,
                ip_id: Some(7),
                cause: v1::Cause::Refused as i32,
                phase: v1::Phase::SynSent as i32,
                history: "S".into(),
                evidence: vec![v1::Evidence { name: "answers-syn".into(), detail: "ack = isn + 1".into() }],
                ..Default::default()
            }),
            verdict: "pending".into(),
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        assert_eq!(
            reset_json(&record()),
            r#"{"type":"reset","ts":1714564800.123456789,"agent":"edge-1","connection":"192.0.2.1:443-198.51.100.7:50000","src":"192.0.2.1:443","dst":"198.51.100.7:50000","sender":"resp","flags":"RA","seq":1000,"ack":2000,"window":0,"ttl":64,"ip_id":7,"payload_len":0,"checksum":"unverified","phase":"syn-sent","history":"S","seq_relation":"unknown","cause":"refused","verdict":"pending","evidence":[{"name":"answers-syn","detail":"ack = isn + 1"}]}"#
        );
    }

    #[test]
    fn table_and_compact_lines() {
        assert_eq!(
            reset_row(&record()),
            "2024-05-01T12:00:00.123Z edge-1           192.0.2.1:443 -> 198.51.100.7:50000             RA    refused"
        );
        assert_eq!(
            reset_compact(&record()),
            "1714564800.123456789 edge-1 192.0.2.1:443 > 198.51.100.7:50000: RA seq 1000 ack 2000 ttl 64 refused"
        );
    }

    #[test]
    fn times_parse_in_three_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(1_714_564_800);
        assert_eq!(parse_time("1h", now), Ok(1_714_561_200_000_000_000));
        assert_eq!(parse_time("2024-05-01T12:00:00Z", now), Ok(1_714_564_800_000_000_000));
        assert_eq!(parse_time("1714564800.5", now), Ok(1_714_564_800_500_000_000));
        assert!(parse_time("yesterday", now).is_err());
    }
}
