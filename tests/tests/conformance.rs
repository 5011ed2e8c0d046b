//! Corpus conformance: `rstscope-agent` against the ground truth shipped with the shared corpus.
//!
//! 1. `zeek_conn_log_conformance`: TCP connections of every `zeek-conn` baseline (conn.log that
//!    Zeek's own test suite expects) against the agent's flow summaries: conn_state and history.
//! 2. `tshark_rst_truth`: every RST packet tshark sees (outside ICMP errors and tunnels) must be a
//!    reset event of the agent with the same time (exact to the nanosecond), addresses, ports,
//!    raw seq and raw ack.
//!
//! Run: `cargo test -p rstscope-tests --test conformance -- --nocapture` (the tables are printed
//! either way when a test fails). The agent binary is taken from the same target directory and
//! profile as this test, and built first with `cargo build -p rstscope-agent` when it is missing
//! or older than the agent's sources (cargo does not build another package's binaries for an
//! integration test). Environment: `RSTSCOPE_CORPUS` (corpus folder, default
//! `<workspace>/../shared/corpus`), `RSTSCOPE_SKIP_CORPUS=1` (pass when the corpus is absent;
//! otherwise its absence fails), `RSTSCOPE_AGENT` (use this agent binary, no build).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::OnceLock;

use rstscope_tests::corpus::{
    capture_of_truth_name, is_undecoded_tunnel_stack, parallel_map, zeek_cut_columns, zeek_ignored_checksums, Agent,
    AgentFlow, AgentRun, Capture, Corpus, Nanos, TsharkRst, ZeekLog, ZeekRow,
};

/// Minimum share of comparable Zeek TCP connections whose conn_state the agent reproduces.
const MIN_CONN_STATE_AGREEMENT: f64 = 0.95;
/// Minimum share for history.
const MIN_HISTORY_AGREEMENT: f64 = 0.90;
/// Examples printed per disagreement class in the summary (the full table comes first).
const EXAMPLES_PER_CLASS: usize = 5;

fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(Agent::locate_or_build)
}

// =============================================================================================
// 1. Zeek conn.log conformance

/// Why a Zeek connection and the agent's flows disagree (or why the connection is not counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Class {
    /// Zeek has the connection, the agent has no flow for it.
    MissingInAgent,
    /// The agent has a flow Zeek does not.
    ExtraInAgent,
    /// Found only with originator and responder swapped.
    RoleMismatch,
    /// Same connection, other conn_state.
    ConnStateDiffers,
    /// Same connection, other history.
    HistoryDiffers,
    /// The agent exited with failure on the capture.
    AgentFailed,
    /// Inside a tunnel, or on a link type the agent reports as unsupported: listed, not counted.
    TunnelOrUnsupported,
    /// The baseline has neither key nor proto columns and no agent flow fits: possibly not TCP.
    /// Listed, not counted.
    Unidentified,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::MissingInAgent => "missing-in-agent",
            Class::ExtraInAgent => "extra-in-agent",
            Class::RoleMismatch => "role-mismatch",
            Class::ConnStateDiffers => "conn_state-differs",
            Class::HistoryDiffers => "history-differs",
            Class::AgentFailed => "agent-failed",
            Class::TunnelOrUnsupported => "tunnel-or-unsupported (not counted)",
            Class::Unidentified => "unidentified-no-key (not counted)",
        }
    }
}

/// One row of the disagreement table.
struct Finding {
    class: Class,
    file: String,
    key: String,
    /// Zeek's conn_state/history (`-` where the baseline lacks the column).
    zeek: String,
    /// The agent's conn_state/history.
    agent: String,
    note: String,
}

/// A tally `agree / total`.
#[derive(Default, Clone, Copy)]
struct Rate {
    agree: usize,
    total: usize,
}

impl Rate {
    fn add(&mut self, agree: bool) {
        self.total += 1;
        self.agree += usize::from(agree);
    }

    fn merge(&mut self, other: Rate) {
        self.agree += other.agree;
        self.total += other.total;
    }

    fn ratio(self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.agree as f64 / self.total as f64
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} = {:.1}%", self.agree, self.total, 100.0 * self.ratio())
    }
}

/// The comparison of one baseline.
#[derive(Default)]
struct ZeekFileResult {
    findings: Vec<Finding>,
    conn_state: Rate,
    history: Rate,
    /// Connections found by the agent at all (matched with the right roles).
    presence: Rate,
    pkts: Rate,
    bytes: Rate,
    count_mismatches: Vec<String>,
    /// Connections matched without a full key (zeek-cut extract without all id columns).
    weak_matches: usize,
    /// Baseline has no column to compare (neither key, conn_state nor history).
    nothing_to_compare: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum How {
    Direct,
    Flipped,
    /// Matched on a partial key or on history alone.
    Weak,
}

/// Whether a history could belong to a UDP/ICMP connection too (only D, d, ^, C, c, W, w).
fn history_could_be_udp(h: &str) -> bool {
    h.chars().all(|c| matches!(c, 'D' | 'd' | '^' | 'C' | 'c' | 'W' | 'w'))
}

fn compare_zeek(capture: &Capture, log: &ZeekLog, run: &AgentRun) -> ZeekFileResult {
    let mut res = ZeekFileResult::default();
    let file = capture.file.clone();
    let has_proto = log.has("proto");
    let has_cs = log.has("conn_state");
    let has_hist = log.has("history");
    let has_any_key = ["id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p"].iter().any(|c| log.has(c));
    if !has_cs && !has_hist && !has_any_key {
        res.nothing_to_compare = true;
        return res;
    }

    // Zeek's TCP connections, in time order when the baseline has unmasked times, else in log
    // order (Zeek logs a connection when it ends, so a reused 4-tuple's first use comes first).
    let mut rows: Vec<&ZeekRow> = log.rows.iter().filter(|r| !has_proto || r.get("proto") == Some("tcp")).collect();
    if rows.iter().all(|r| r.ts().is_some()) {
        rows.sort_by_key(|r| r.ts());
    }
    let flows: &[AgentFlow] = &run.flows;
    let zeek_hist = |r: &ZeekRow| r.get("history").unwrap_or("").to_string();
    let agent_hist = |f: &AgentFlow| {
        if f.history == "-" {
            String::new()
        } else {
            f.history.clone()
        }
    };

    // Matching, most specific first: full key as is, full key flipped, then partial keys and
    // keyless rows (preferring a flow with the same history).
    let mut used = vec![false; flows.len()];
    let mut matched: Vec<Option<(usize, How)>> = vec![None; rows.len()];
    for flipped in [false, true] {
        for (i, r) in rows.iter().enumerate() {
            let key = r.key();
            if matched[i].is_some() || !key.is_complete() {
                continue;
            }
            let key = if flipped { key.flipped() } else { key };
            if let Some(j) = (0..flows.len()).find(|&j| !used[j] && key.matches(&flows[j].key)) {
                used[j] = true;
                matched[i] = Some((j, if flipped { How::Flipped } else { How::Direct }));
            }
        }
    }
    // Pass 1 wants the same history; pass 2 takes the first fitting flow, except for keyless rows
    // that may not be TCP at all (no proto column, UDP-like history); pass 3 gives those the
    // flows nothing else took.
    for pass in 1..=3 {
        let prefer_same_history = pass == 1;
        for (i, r) in rows.iter().enumerate() {
            let key = r.key();
            if matched[i].is_some() || key.is_complete() {
                continue;
            }
            let maybe_not_tcp = key.is_empty() && !has_proto && history_could_be_udp(&zeek_hist(r));
            if (pass == 2 && maybe_not_tcp) || (pass == 3 && !maybe_not_tcp) {
                continue;
            }
            for flipped in [false, true] {
                if flipped && key.is_empty() {
                    continue;
                }
                let k = if flipped { key.flipped() } else { key };
                let fits = |j: usize| {
                    !used[j]
                        && k.matches(&flows[j].key)
                        && (!prefer_same_history || agent_hist(&flows[j]) == zeek_hist(r))
                };
                if let Some(j) = (0..flows.len()).find(|&j| fits(j)) {
                    used[j] = true;
                    matched[i] = Some((j, if flipped { How::Flipped } else { How::Weak }));
                    break;
                }
            }
        }
    }

    let link_unsupported = run.unsupported_link_skips();
    let tunnels = capture.stats.tunnel_stacks();
    let excuse = if !tunnels.is_empty() || capture.stats.teredo {
        Some(format!("capture has tunnelled TCP: {}", tunnels.join(", ")))
    } else if link_unsupported > 0 {
        Some(format!("agent skipped {link_unsupported} packets: unsupported link type"))
    } else {
        None
    };

    let show = |cs: Option<&str>, h: Option<&str>| {
        format!("{}/{}", cs.unwrap_or("-"), h.map(|h| if h.is_empty() { "(none)" } else { h }).unwrap_or("-"))
    };
    for (i, r) in rows.iter().enumerate() {
        let key = r.key();
        let key_text = match r.get("uid") {
            Some(uid) if !key.is_complete() => format!("{key} uid={uid}"),
            _ => key.to_string(),
        };
        let zeek_text = show(
            if has_cs { Some(r.get("conn_state").unwrap_or("")) } else { None },
            if has_hist { Some(r.get("history").unwrap_or("")) } else { None },
        );
        let flow = matched[i].map(|(j, how)| (&flows[j], how));
        let agent_text = flow.map_or("(none)".to_string(), |(f, _)| show(Some(&f.conn_state), Some(&agent_hist(f))));
        let mut finding = |class: Class, note: String| {
            res.findings.push(Finding {
                class,
                file: file.clone(),
                key: key_text.clone(),
                zeek: zeek_text.clone(),
                agent: agent_text.clone(),
                note,
            })
        };

        if let Some(parents) = r.get("tunnel_parents") {
            finding(Class::TunnelOrUnsupported, format!("tunnel_parents={parents}"));
            continue;
        }
        let Some((f, how)) = flow else {
            if !run.success {
                finding(Class::AgentFailed, run.problems());
            } else if let Some(why) = &excuse {
                finding(Class::TunnelOrUnsupported, why.clone());
                continue;
            } else if key.is_empty() && !has_proto && history_could_be_udp(&zeek_hist(r)) {
                finding(Class::Unidentified, "no proto column; history fits UDP".into());
                continue;
            } else {
                finding(Class::MissingInAgent, run.problems());
            }
            res.presence.add(false);
            if has_cs {
                res.conn_state.add(false);
            }
            if has_hist {
                res.history.add(false);
            }
            continue;
        };
        if how == How::Weak {
            res.weak_matches += 1;
        }
        if how == How::Flipped {
            finding(Class::RoleMismatch, format!("agent: {}", f.key));
            res.presence.add(false);
            if has_cs {
                res.conn_state.add(false);
            }
            if has_hist {
                res.history.add(false);
            }
            continue;
        }
        res.presence.add(true);
        let weak_note = if how == How::Weak { "matched without full key".to_string() } else { String::new() };
        if has_cs {
            let ok = r.get("conn_state").unwrap_or("") == f.conn_state;
            res.conn_state.add(ok);
            if !ok {
                finding(Class::ConnStateDiffers, weak_note.clone());
            }
        }
        if has_hist {
            let ok = zeek_hist(r) == agent_hist(f);
            res.history.add(ok);
            if !ok {
                finding(Class::HistoryDiffers, weak_note.clone());
            }
        }
        // Packet and byte counts: information only.
        for name in ["orig_pkts", "resp_pkts", "orig_bytes", "resp_bytes"] {
            if let (Some(z), Some(a)) = (r.num(name), f.counts.get(name)) {
                let rate = if name.ends_with("pkts") { &mut res.pkts } else { &mut res.bytes };
                rate.add(z == *a);
                if z != *a {
                    res.count_mismatches.push(format!("{file} {key_text}: {name} zeek {z} agent {a}"));
                }
            }
        }
    }
    for (_, f) in flows.iter().enumerate().filter(|(j, _)| !used[*j]) {
        res.findings.push(Finding {
            class: Class::ExtraInAgent,
            file: file.clone(),
            key: f.key.to_string(),
            zeek: "(none)".into(),
            agent: show(Some(&f.conn_state), Some(&agent_hist(f))),
            note: format!("start {}", f.ts),
        });
        res.presence.add(false);
        if has_cs {
            res.conn_state.add(false);
        }
        if has_hist {
            res.history.add(false);
        }
    }
    res
}

#[test]
fn zeek_conn_log_conformance() {
    let Some(corpus) = Corpus::require() else {
        return;
    };
    let agent = agent();
    let manifest = corpus.manifest();
    let cases: Vec<(&Capture, &rstscope_tests::corpus::Truth)> =
        manifest.iter().flat_map(|c| c.truth.iter().filter(|t| t.kind == "zeek-conn").map(move |t| (c, t))).collect();
    assert!(!cases.is_empty(), "manifest lists no zeek-conn truths");

    let results = parallel_map(&cases, |(capture, truth)| {
        let text = std::fs::read_to_string(corpus.path(&truth.file))
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", truth.file));
        let log = ZeekLog::parse(&text, zeek_cut_columns(&truth.exec));
        let ignore_checksums = zeek_ignored_checksums(&truth.exec);
        let run = agent.run(&corpus.path(&capture.file), ignore_checksums);
        (compare_zeek(capture, &log, &run), ignore_checksums)
    });

    let mut out = String::new();
    let (mut cs, mut hist, mut presence, mut pkts, mut bytes) =
        (Rate::default(), Rate::default(), Rate::default(), Rate::default(), Rate::default());
    let mut weak = 0;
    let mut findings: Vec<&Finding> = Vec::new();
    let mut no_columns = Vec::new();
    let mut count_mismatches = Vec::new();
    for ((capture, _), (r, _)) in cases.iter().zip(&results) {
        if r.nothing_to_compare {
            no_columns.push(capture.file.as_str());
        }
        cs.merge(r.conn_state);
        hist.merge(r.history);
        presence.merge(r.presence);
        pkts.merge(r.pkts);
        bytes.merge(r.bytes);
        weak += r.weak_matches;
        findings.extend(&r.findings);
        count_mismatches.extend(r.count_mismatches.iter().cloned());
    }
    findings.sort_by(|a, b| (a.class, &a.file).cmp(&(b.class, &b.file)));

    let _ = writeln!(out, "\n=== Zeek conn.log conformance: {} baselines ===", cases.len());
    let _ = writeln!(
        out,
        "{:<36} {:<58} {:<44} {:<24} {:<24} note",
        "class", "file", "key", "zeek cs/hist", "agent cs/hist"
    );
    for f in &findings {
        let _ = writeln!(
            out,
            "{:<36} {:<58} {:<44} {:<24} {:<24} {}",
            f.class.name(),
            f.file,
            f.key,
            f.zeek,
            f.agent,
            f.note
        );
    }
    let mut by_class: BTreeMap<Class, Vec<&Finding>> = BTreeMap::new();
    for f in &findings {
        by_class.entry(f.class).or_default().push(f);
    }
    let _ = writeln!(out, "\n--- disagreement classes ---");
    for (class, list) in &by_class {
        let _ = writeln!(out, "{}: {}", class.name(), list.len());
        for f in list.iter().take(EXAMPLES_PER_CLASS) {
            let _ = writeln!(out, "    {} [{}] zeek {} agent {} {}", f.file, f.key, f.zeek, f.agent, f.note);
        }
    }
    let _ = writeln!(out, "\n--- agreement ---");
    let _ = writeln!(out, "conn_state: {cs}  (need {:.0}%)", 100.0 * MIN_CONN_STATE_AGREEMENT);
    let _ = writeln!(out, "history:    {hist}  (need {:.0}%)", 100.0 * MIN_HISTORY_AGREEMENT);
    let _ = writeln!(out, "presence (found with right roles): {presence}");
    let _ = writeln!(out, "packet counts (info): {pkts}; payload bytes (info): {bytes}");
    for m in count_mismatches.iter().take(EXAMPLES_PER_CLASS) {
        let _ = writeln!(out, "    {m}");
    }
    let _ = writeln!(out, "matched without a full key (zeek-cut extracts): {weak}");
    let _ = writeln!(out, "baselines with no comparable column: {}", no_columns.join(", "));
    println!("{out}");

    assert!(
        cs.ratio() >= MIN_CONN_STATE_AGREEMENT && hist.ratio() >= MIN_HISTORY_AGREEMENT,
        "agreement with Zeek below threshold: conn_state {cs}, history {hist} (tables above)"
    );
}

// =============================================================================================
// 2. tshark RST truth

/// Identity of a RST packet for matching: time, sender, receiver, raw seq, raw ack.
type RstKey = (Nanos, std::net::SocketAddr, std::net::SocketAddr, u32, u32);

struct RstFileResult {
    capture: String,
    expected: usize,
    matched: usize,
    /// Rows not expected (ICMP-quoted or tunnelled).
    not_expected: usize,
    misses: Vec<String>,
    /// Misses that do not fail: the agent reported unsupported link types for the capture.
    excused: Option<String>,
    extras: Vec<String>,
}

fn check_rst_truth(corpus: &Corpus, tsv_name: &str, agent: &Agent) -> RstFileResult {
    let capture = capture_of_truth_name(tsv_name, ".rst.tsv").expect("name ends in .rst.tsv");
    let text = std::fs::read_to_string(corpus.path(&format!("tshark-truth/{tsv_name}")))
        .unwrap_or_else(|e| panic!("cannot read {tsv_name}: {e}"));
    let rows = TsharkRst::parse_tsv(&text).unwrap_or_else(|e| panic!("{tsv_name}: {e}"));
    let mut res = RstFileResult {
        capture: capture.clone(),
        expected: 0,
        matched: 0,
        not_expected: 0,
        misses: Vec::new(),
        excused: None,
        extras: Vec::new(),
    };
    let path = corpus.path(&capture);
    if !path.is_file() {
        res.misses.push(format!("capture {capture} named by {tsv_name} does not exist"));
        return res;
    }
    let run = agent.run(&path, false);
    let mut emitted: HashMap<RstKey, usize> = HashMap::new();
    for r in &run.resets {
        *emitted.entry((r.ts, r.src, r.dst, r.seq, r.ack)).or_default() += 1;
    }
    let mut all_tshark: HashMap<RstKey, usize> = HashMap::new();
    for row in &rows {
        *all_tshark.entry((row.ts, row.src, row.dst, row.seq, row.ack)).or_default() += 1;
        if row.in_icmp_error || is_undecoded_tunnel_stack(&row.encap) {
            res.not_expected += 1;
            continue;
        }
        res.expected += 1;
        let key = (row.ts, row.src, row.dst, row.seq, row.ack);
        match emitted.get_mut(&key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                res.matched += 1;
            }
            _ => {
                // The closest reset of the same direction, to make the miss easy to diagnose.
                let near = run
                    .resets
                    .iter()
                    .filter(|r| r.src == row.src && r.dst == row.dst)
                    .min_by_key(|r| (r.ts.0 - row.ts.0).abs())
                    .map_or(String::new(), |r| {
                        format!(" (nearest agent reset same direction: ts {} seq {} ack {})", r.ts, r.seq, r.ack)
                    });
                res.misses.push(format!(
                    "frame {} ts {} {} -> {} seq {} ack {} [{}]{near}{}",
                    row.frame,
                    row.ts,
                    row.src,
                    row.dst,
                    row.seq,
                    row.ack,
                    row.encap,
                    if run.success { String::new() } else { format!(" agent: {}", run.problems()) }
                ));
            }
        }
    }
    let unsupported = run.unsupported_link_skips();
    if unsupported > 0 && !res.misses.is_empty() {
        res.excused = Some(format!("agent skipped {unsupported} packets as unsupported link type"));
    }
    for r in &run.resets {
        let key = (r.ts, r.src, r.dst, r.seq, r.ack);
        match all_tshark.get_mut(&key) {
            Some(n) if *n > 0 => *n -= 1,
            _ => res.extras.push(format!(
                "ts {} {} -> {} seq {} ack {} flags {} cause {}",
                r.ts, r.src, r.dst, r.seq, r.ack, r.flags, r.cause
            )),
        }
    }
    res
}

#[test]
fn tshark_rst_truth() {
    let Some(corpus) = Corpus::require() else {
        return;
    };
    let agent = agent();
    let dir = corpus.path("tshark-truth");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".rst.tsv"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no tshark-truth/*.rst.tsv in {}", dir.display());

    let results = parallel_map(&names, |n| check_rst_truth(&corpus, n, agent));

    let mut out = String::new();
    let (mut expected, mut matched, mut not_expected, mut failing_misses, mut extras) = (0, 0, 0, 0, 0);
    let _ = writeln!(out, "\n=== tshark RST truth: {} captures ===", results.len());
    let _ = writeln!(out, "{:<80} matched/expected", "capture (only those with RSTs, misses or extras)");
    for r in &results {
        expected += r.expected;
        matched += r.matched;
        not_expected += r.not_expected;
        extras += r.extras.len();
        if r.expected == 0 && r.misses.is_empty() && r.extras.is_empty() {
            continue;
        }
        let tag = match (&r.excused, r.misses.is_empty()) {
            (_, true) => String::new(),
            (Some(why), false) => format!("  MISSES EXCUSED: {why}"),
            (None, false) => "  MISSES".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<80} {}/{}{}{}",
            r.capture,
            r.matched,
            r.expected,
            if r.not_expected > 0 {
                format!(" (+{} tunnelled/ICMP not expected)", r.not_expected)
            } else {
                String::new()
            },
            tag
        );
        if r.excused.is_none() {
            failing_misses += r.misses.len();
        }
        for m in &r.misses {
            let _ = writeln!(out, "    miss: {m}");
        }
        for e in &r.extras {
            let _ = writeln!(out, "    extra (not in tshark, info): {e}");
        }
    }
    let _ = writeln!(
        out,
        "\nRST truth: matched {matched}/{expected} expected RSTs; {failing_misses} failing misses; \
         {not_expected} tunnelled/ICMP rows not expected; {extras} agent resets not in tshark (info)"
    );
    println!("{out}");
    assert_eq!(failing_misses, 0, "the agent missed RSTs that tshark sees (list above)");
}
