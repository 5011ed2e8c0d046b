//! Where the agent's instructions go: a callgrind profile, summed by part of the agent.
//!
//! The throughput benchmark says how fast the agent is; this says why, in a form that does not
//! move with the machine's load. Callgrind counts instructions exactly (wall time on a shared
//! machine scatters by a third from run to run), and the benchmark turns its output file into
//! one table: instructions per packet for reading, parsing, keying, the flow table, the Zeek
//! replica, the per-direction evidence, allocation, and so on.
//!
//! Code inlined into another function keeps the file it was written in (callgrind's `fi=` and
//! `fe=` lines), so a part's count includes its inlined helpers wherever they landed. Standard
//! library code has no part of its own: it counts for the function it was inlined into.
//!
//! The parser reads callgrind's own file format (documented in the valgrind manual, "Callgrind
//! Format Specification") rather than `callgrind_annotate`'s text, which changes between
//! valgrind releases.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};

/// Self cost (the first event, `Ir` by default) of one callgrind profile.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    /// All instructions, calls not counted twice.
    pub total: u64,
    /// Instructions by (source file, function the cost lies in).
    pub by_place: BTreeMap<(String, String), u64>,
}

/// Parses a callgrind output file (`callgrind.out.PID`).
pub fn parse_callgrind(text: &str) -> Result<Profile> {
    let mut profile = Profile::default();
    let mut positions = 1usize;
    let mut names: [HashMap<String, String>; 3] = Default::default();
    // What a cost line is charged to: the function's file, or the inlined file if any.
    let (mut fn_file, mut inline_file, mut function) = (String::new(), None::<String>, String::new());
    let mut next_is_call_cost = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        let lineno = i + 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(v) = line.strip_prefix("positions:") {
            positions = v.split_whitespace().count().max(1);
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let kind = match key {
                "fl" | "fi" | "fe" | "cfi" | "cfl" => Some(0),
                "fn" | "cfn" => Some(1),
                "ob" | "cob" => Some(2),
                _ => None,
            };
            if let Some(kind) = kind {
                let name = expand(&mut names[kind], value).with_context(|| format!("line {lineno}: {line}"))?;
                match key {
                    "fl" => {
                        fn_file = name;
                        inline_file = None;
                    }
                    "fi" | "fe" => inline_file = Some(name),
                    "fn" => {
                        function = name;
                        inline_file = None;
                    }
                    _ => {}
                }
            } else if key == "calls" {
                next_is_call_cost = true;
            }
            continue;
        }
        if line.contains(':') && !line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
            // Header (`events:`, `totals:`, `summary:`, `cmd:` ...).
            continue;
        }
        // A cost line: positions, then the events' counts (missing ones are zero).
        let mut fields = line.split_whitespace();
        for _ in 0..positions {
            let Some(pos) = fields.next() else { bail!("line {lineno}: cost line without position: {line}") };
            let number = pos.strip_prefix(['+', '-']).unwrap_or(pos);
            let number_ok = match number.strip_prefix("0x") {
                Some(hex) => !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()),
                None => !number.is_empty() && number.chars().all(|c| c.is_ascii_digit()),
            };
            if !(pos == "*" || number_ok) {
                bail!("line {lineno}: not a cost line: {line}");
            }
        }
        let cost = match fields.next() {
            Some(c) => c.parse::<u64>().with_context(|| format!("line {lineno}: bad count in {line}"))?,
            None => 0,
        };
        if std::mem::take(&mut next_is_call_cost) {
            // The callee's inclusive cost: counted where it was spent.
            continue;
        }
        profile.total += cost;
        let file = inline_file.clone().unwrap_or_else(|| fn_file.clone());
        *profile.by_place.entry((file, function.clone())).or_default() += cost;
    }
    Ok(profile)
}

/// Resolves callgrind's name compression: `(12) name` defines id 12, `(12)` refers to it.
fn expand(names: &mut HashMap<String, String>, value: &str) -> Result<String> {
    let Some(rest) = value.strip_prefix('(') else { return Ok(value.to_string()) };
    let (id, name) = rest.split_once(')').context("unclosed name id")?;
    let name = name.trim_start();
    if name.is_empty() {
        return names.get(id).cloned().with_context(|| format!("name id ({id}) used before it was defined"));
    }
    names.insert(id.to_string(), name.to_string());
    Ok(name.to_string())
}

/// The parts of the agent's work, in the order the report lists them.
pub const PARTS: [&str; 11] = [
    "reading the capture file (`capture/`)",
    "parsing headers (`wire.rs`, etherparse)",
    "connection keys and their hash (`flow_key.rs`, foldhash)",
    "flow table look-up (hashbrown)",
    "tracker core: records, timers, events (`flow/mod.rs`)",
    "per-direction evidence: sequence, retransmissions, TTL, IP ID (`flow/conn.rs`)",
    "Zeek conn_state and history replica (`flow/zeek.rs`)",
    "RST evidence and cause (`flow/classify.rs`, `event.rs`)",
    "memory allocation (malloc, free)",
    "reader thread's loop and hand-off: batching, channels (`pipeline.rs`)",
    "other (memcpy, std library, start-up, the benchmark itself)",
];

/// Which of [`PARTS`] a cost belongs to, from its source file, or for standard-library and C
/// library code, from the function it lies in.
pub fn part_of(file: &str, function: &str) -> usize {
    let by_file = [
        ("agent/src/capture/", 0),
        ("agent/src/wire.rs", 1),
        ("/etherparse-", 1),
        ("proto/src/flow_key.rs", 2),
        ("/foldhash-", 2),
        ("/hashbrown-", 3),
        ("agent/src/flow/zeek.rs", 6),
        ("agent/src/flow/conn.rs", 5),
        ("agent/src/flow/classify.rs", 7),
        ("agent/src/event.rs", 7),
        ("agent/src/flow/", 4),
        ("agent/src/pipeline.rs", 9),
        ("/malloc/", 8),
    ];
    if let Some(&(_, part)) = by_file.iter().find(|(needle, _)| file.contains(needle)) {
        return part;
    }
    let by_function = [
        ("rstscope_agent::capture::", 0),
        ("rstscope_agent::wire::", 1),
        ("etherparse::", 1),
        ("rstscope_proto::flow_key", 2),
        ("hashbrown::", 3),
        ("rstscope_agent::flow::zeek", 6),
        ("rstscope_agent::flow::conn", 5),
        ("rstscope_agent::flow::classify", 7),
        ("rstscope_agent::event", 7),
        ("rstscope_agent::flow", 4),
        ("rstscope_agent::pipeline", 9),
        // The body of a spawned thread: in stage c the reader's loop, with what it inlined.
        ("std::sys::backtrace::__rust_begin_short_backtrace", 9),
        ("std::sync::mpmc", 9),
        ("std::sync::mpsc", 9),
        ("futex", 9),
        ("malloc", 8),
        ("free", 8),
        ("realloc", 8),
        ("__rust_alloc", 8),
        ("__rust_dealloc", 8),
    ];
    by_function.iter().find(|(needle, _)| function.contains(needle)).map_or(PARTS.len() - 1, |&(_, part)| part)
}

/// Instructions per part of [`PARTS`].
pub fn by_part(profile: &Profile) -> [u64; PARTS.len()] {
    let mut parts = [0u64; PARTS.len()];
    for ((file, function), cost) in &profile.by_place {
        parts[part_of(file, function)] += cost;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small profile in callgrind's format: name compression, an inlined file, a call whose
    /// inclusive cost must not count twice, relative positions and a header.
    const SAMPLE: &str = "\
# callgrind format
version: 1
creator: callgrind-3.19.0
positions: line
events: Ir
summary: 1000

ob=(1) /bin/agent
fl=(1) /src/agent/src/flow/mod.rs
fn=(1) rstscope_agent::flow::Tracker::process
10 100
+2 50
fi=(2) /src/agent/src/flow/zeek.rs
300 200
fe=(1)
* 5
cfl=(3) /src/agent/src/flow/conn.rs
cfn=(2) rstscope_agent::flow::conn::Half::on_send
calls=7 40
12 400
fl=(3)
fn=(2)
40 380
fi=(4) /rustc/abc/library/core/src/num/mod.rs
41 20
fl=(5) ./malloc/./malloc/malloc.c
fn=(3) _int_free
1 245

totals: 1000
";

    #[test]
    fn self_costs_by_file_and_function() {
        let p = parse_callgrind(SAMPLE).unwrap();
        // 100 + 50 + 200 + 5 + 380 + 20 + 245; the call's 400 is the callee's, counted there.
        assert_eq!(p.total, 1000);
        let cost = |file: &str, function: &str| p.by_place[&(file.to_string(), function.to_string())];
        assert_eq!(cost("/src/agent/src/flow/mod.rs", "rstscope_agent::flow::Tracker::process"), 155);
        assert_eq!(cost("/src/agent/src/flow/zeek.rs", "rstscope_agent::flow::Tracker::process"), 200);
        assert_eq!(cost("/src/agent/src/flow/conn.rs", "rstscope_agent::flow::conn::Half::on_send"), 380);
        assert_eq!(cost("/rustc/abc/library/core/src/num/mod.rs", "rstscope_agent::flow::conn::Half::on_send"), 20);
        assert_eq!(cost("./malloc/./malloc/malloc.c", "_int_free"), 245);
    }

    #[test]
    fn parts_follow_the_file_then_the_function() {
        let parts = by_part(&parse_callgrind(SAMPLE).unwrap());
        assert_eq!(parts[4], 155, "tracker core");
        assert_eq!(parts[6], 200, "zeek, inlined into process");
        assert_eq!(parts[5], 400, "conn, with the std code inlined into it");
        assert_eq!(parts[8], 245, "allocation");
        assert_eq!(parts.iter().sum::<u64>(), 1000);
    }

    #[test]
    fn damaged_files_are_errors() {
        assert!(parse_callgrind("fn=(9)\n1 2\n").is_err(), "undefined name id");
        assert!(parse_callgrind("positions: line\nfn=f\nabc 5\n").is_err(), "not a position");
        assert!(parse_callgrind("positions: line\nfn=f\n1 x\n").is_err(), "not a count");
    }
}
