//! `rstscope analyze NAME=FILE ...`: the collector's correlation, offline and in-process.
//!
//! For the admin who has a tcpdump from each side: every capture is read by the agent's own
//! tracker (the same code `rstscope-agent --read` runs), its events are fed to the same
//! correlation engine the collector runs live, and the verdicts are printed. No collector, no
//! network. Each file is one vantage point; its name is the agent name in the output.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;

use rstscope_agent::capture::FileSource;
use rstscope_agent::flow::{Tracker, TrackerConfig};
use rstscope_agent::pipeline::{run_source, Counters};
use rstscope_collector::correlate::{Config, Correlator};
use rstscope_proto::v1;
use serde::Serialize;

use crate::output::Format;
use crate::report;
use crate::Failure;

/// What `analyze` was asked.
#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// Vantage points: NAME=FILE (pcap or pcapng), one per capture, at least one.
    #[arg(value_name = "NAME=FILE", required = true)]
    pub captures: Vec<String>,

    /// An address of the host a capture was taken on: NAME=ADDR (repeatable). Without it the
    /// addresses are inferred from which ones send with an unrouted TTL (32, 64, 128, 255).
    #[arg(long = "local", value_name = "NAME=ADDR")]
    pub local: Vec<String>,

    /// Largest clock difference between the captures before handshakes measure it (seconds).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub max_skew: f64,

    /// Show this connection as a ladder (an id from a reset's `connection`, or ip:port-ip:port).
    #[arg(long, value_name = "ID")]
    pub connection: Option<String>,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Format,
}

#[derive(Serialize)]
struct AgentJson<'a> {
    r#type: &'static str,
    name: &'a str,
    file: &'a str,
    local_addresses: Vec<String>,
    local_addresses_from: String,
    clock_reference: &'a str,
    clock_offset_ns: Option<i64>,
    clock_uncertainty_ns: Option<i64>,
    clock_drift_ppm: Option<f64>,
    clock_samples: u32,
    packets: u64,
    errors: &'a [String],
}

#[derive(Serialize)]
struct SummaryJson {
    r#type: &'static str,
    resets: usize,
    verdicts: std::collections::BTreeMap<String, usize>,
    connections: usize,
}

struct Vantage {
    name: String,
    file: String,
    packets: u64,
    errors: Vec<String>,
}

fn split_pair<'a>(flag: &str, text: &'a str) -> Result<(&'a str, &'a str), Failure> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() && !value.is_empty() => Ok((name, value)),
        _ => {
            let example = if flag == "--local" { "client=198.51.100.2" } else { "client=client.pcap" };
            Err(Failure::Usage(format!("{flag} {text:?}: expected NAME=VALUE, e.g. {example}")))
        }
    }
}

/// Reads one opened capture through the agent's tracker into wire events.
fn read_capture(mut source: FileSource) -> (Vec<v1::Event>, Counters) {
    let mut tracker = Tracker::new(TrackerConfig::default());
    let mut counters = Counters::default();
    let stop = AtomicBool::new(false);
    let mut events: Vec<v1::Event> = Vec::new();
    let mut emit = |e: rstscope_agent::event::Event| events.push(v1::Event::from(&e));
    let mut problems: Vec<String> = Vec::new();
    run_source(
        &mut source,
        &mut tracker,
        &mut counters,
        &stop,
        &mut emit,
        &mut |line: &str| problems.push(line.to_string()),
        &mut |_, _| {},
    );
    tracker.finish_all(&mut emit);
    counters.errors.extend(problems);
    for loss in source.losses() {
        events.push(v1::Event {
            kind: Some(v1::event::Kind::Loss(v1::CaptureLoss {
                from_ns: loss.from_ns,
                until_ns: loss.until_ns,
                capture_dropped: loss.dropped,
                reason: "pcapng interface statistics report drops".to_string(),
                ..Default::default()
            })),
        });
    }
    // The capture vouches for the time from its first connection to its last packet.
    let first = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(v1::event::Kind::Flow(f)) => Some(f.start_ns),
            Some(v1::event::Kind::Open(o)) => Some(o.start_ns),
            Some(v1::event::Kind::Reset(r)) => Some(r.ts_ns),
            _ => None,
        })
        .min();
    if let (Some(since), Some(last)) = (first, tracker.clock_ns()) {
        events.push(v1::Event {
            kind: Some(v1::event::Kind::Watermark(v1::Watermark {
                ts_ns: last,
                since_ns: since,
                ended: true,
                ..Default::default()
            })),
        });
    }
    (events, counters)
}

/// Runs the analysis and prints it.
pub fn analyze(args: &AnalyzeArgs, out: &mut impl Write) -> Result<(), Failure> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for text in &args.captures {
        let (name, file) = split_pair("capture", text)?;
        if pairs.iter().any(|(n, _)| n == name) {
            return Err(Failure::Usage(format!("the name {name:?} is given twice; each capture needs its own")));
        }
        pairs.push((name.to_string(), file.to_string()));
    }
    let mut locals: Vec<(String, IpAddr)> = Vec::new();
    for text in &args.local {
        let (name, addr) = split_pair("--local", text)?;
        if !pairs.iter().any(|(n, _)| n == name) {
            return Err(Failure::Usage(format!("--local {text}: there is no capture named {name:?}")));
        }
        let ip: IpAddr =
            addr.parse().map_err(|e| Failure::Usage(format!("--local {text}: {addr:?} is not an IP address: {e}")))?;
        locals.push((name.to_string(), ip));
    }
    if !(args.max_skew.is_finite() && args.max_skew >= 0.0) {
        return Err(Failure::Usage(format!("--max-skew {}: expected seconds, like 10", args.max_skew)));
    }
    let cfg = Config { max_skew_ns: (args.max_skew * 1e9) as i64, ..Config::default() };
    // Every capture is opened (its header read) before any is analysed, so a typo in the last
    // name fails at once rather than after reading all the others.
    let mut sources: Vec<FileSource> = Vec::new();
    let mut unreadable: Vec<String> = Vec::new();
    for (name, file) in &pairs {
        match FileSource::open(file) {
            Ok(source) => sources.push(source),
            Err(e) => {
                eprintln!("rstscope: {name}: {e}");
                unreadable.push(name.clone());
            }
        }
    }
    if sources.is_empty() {
        return Err(Failure::Refused("no capture could be read".to_string()));
    }
    // A vantage point named but not read would turn the comparison into a one-sided analysis
    // (every RST it should have seen `unverified`) without a word: a typo must not look like that.
    if !unreadable.is_empty() {
        return Err(Failure::Refused(format!(
            "cannot read the capture of {}; leave it out to analyze without it",
            unreadable.join(", ")
        )));
    }
    let mut engine = Correlator::new(cfg);
    let mut vantages: Vec<Vantage> = Vec::new();
    for ((name, file), source) in pairs.iter().zip(sources) {
        let mine: Vec<IpAddr> = locals.iter().filter(|(n, _)| n == name).map(|(_, ip)| *ip).collect();
        let agent = engine.agent(name, &mine);
        let (events, counters) = read_capture(source);
        for e in &events {
            engine.ingest(agent, e);
        }
        for e in &counters.errors {
            eprintln!("rstscope: {name}: {e}");
        }
        vantages.push(Vantage {
            name: name.clone(),
            file: file.clone(),
            packets: counters.packets,
            errors: counters.errors,
        });
        engine.finish_agent(agent);
    }
    let reports = engine.finish();
    if let Some(id) = &args.connection {
        let root =
            engine.find_group(id).ok_or_else(|| Failure::Refused(format!("no connection {id:?} in these captures")))?;
        let (label, _) = engine.group_records(root);
        let ladder = engine.ladder(root);
        let mine: Vec<&v1::ResetReport> = reports.iter().filter(|r| r.connection == label).collect();
        let w = |out: &mut dyn Write, line: &str| writeln!(out, "{line}").map_err(Failure::Output);
        if args.output == Format::Json {
            for r in mine {
                w(out, &report::report_json(r))?;
            }
            for step in &ladder {
                w(out, &report::step_json(step))?;
            }
        } else {
            w(out, &format!("connection {label}\n"))?;
            w(out, &report::ladder_text(&ladder))?;
            w(out, "")?;
            for r in mine {
                w(out, &report::report_row(r, true))?;
            }
        }
        return Ok(());
    }
    let clocks = engine.clock_estimates();
    let reference = engine.reference().unwrap_or("").to_string();
    let w = |out: &mut dyn Write, line: &str| writeln!(out, "{line}").map_err(Failure::Output);
    match args.output {
        Format::Json => {
            for (i, v) in vantages.iter().enumerate() {
                let (addrs, how) = engine.local_addresses(i);
                let clock = clocks.get(i).copied().flatten();
                let line = AgentJson {
                    r#type: "agent",
                    name: &v.name,
                    file: &v.file,
                    local_addresses: addrs.iter().map(|a| a.to_string()).collect(),
                    local_addresses_from: how,
                    clock_reference: &reference,
                    clock_offset_ns: clock.map(|c| c.offset_ns),
                    clock_uncertainty_ns: clock.map(|c| c.uncertainty_ns),
                    clock_drift_ppm: clock.map(|c| c.drift_ppm),
                    clock_samples: clock.map_or(0, |c| c.samples),
                    packets: v.packets,
                    errors: &v.errors,
                };
                w(out, &serde_json::to_string(&line).expect("serializes"))?;
            }
            for r in &reports {
                w(out, &report::report_json(r))?;
            }
        }
        // Like `resets -o compact`: one line per reset and nothing else, for pipes.
        Format::Compact => {
            for r in &reports {
                w(out, &report::report_compact(r))?;
            }
            return Ok(());
        }
        Format::Table => {
            w(out, &format!("{:<12} {:<10} {:<24} {}", "VANTAGE", "PACKETS", "CLOCK", "ADDRESSES"))?;
            for (i, v) in vantages.iter().enumerate() {
                let (addrs, how) = engine.local_addresses(i);
                let clock = match clocks.get(i).copied().flatten() {
                    Some(c) if v.name == reference => format!("reference ({} samples)", c.samples),
                    Some(c) => format!("{:+.3} s ±{:.3} ms", c.offset_ns as f64 / 1e9, c.uncertainty_ns as f64 / 1e6),
                    None => "unknown".to_string(),
                };
                let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                w(out, &format!("{:<12} {:<10} {:<24} {} ({how})", v.name, v.packets, clock, addrs.join(" ")))?;
            }
            w(out, "")?;
            if reports.is_empty() {
                w(out, "No resets.")?;
            } else {
                w(out, &report::report_header())?;
            }
            for r in &reports {
                w(out, &report::report_row(r, true))?;
            }
        }
    }
    let mut verdicts = std::collections::BTreeMap::new();
    for r in &reports {
        *verdicts.entry(r.verdict.clone()).or_insert(0) += 1;
    }
    let connections = engine.connection_count();
    match args.output {
        Format::Json => {
            let summary = SummaryJson { r#type: "summary", resets: reports.len(), verdicts, connections };
            w(out, &serde_json::to_string(&summary).expect("serializes"))?;
        }
        _ => {
            let parts: Vec<String> = verdicts.iter().map(|(k, v)| format!("{v} {k}")).collect();
            let verdicts = if parts.is_empty() { String::new() } else { format!(": {}", parts.join(", ")) };
            w(out, &format!("\n{} connection(s), {} reset(s){verdicts}", connections, reports.len()))?;
        }
    }
    Ok(())
}
