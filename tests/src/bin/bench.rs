//! Throughput and memory benchmark of the agent's capture → parse → track pipeline.
//!
//! `cargo run --release -p rstscope-tests --bin bench -- [--packets N] [--flows-for-memory N]
//! [--runs N] [--out FILE.md] [--smoke]`
//!
//! Generates deterministic captures (see `rstscope_tests::gen`) into a temporary directory and
//! measures, as the median of `--runs`: (a) a bare libpcap read loop, the floor; (b) the agent's
//! own file reader plus `wire::parse`; (c) (b) plus the flow tracker; (d) argus and a tcpdump RST
//! filter as external processes; and (e) heap bytes per tracked flow with a counting global
//! allocator, cross-checked with the process's peak RSS. Prints a markdown report and writes it
//! to `--out`. Never fails on a missed target: the numbers are for people to read.

// A global allocator has to implement an unsafe trait; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rstscope_agent::capture::{FileSource, PacketSource, Poll};
use rstscope_agent::event::Event;
use rstscope_agent::flow::{Tracker, TrackerConfig};
use rstscope_agent::wire;
use rstscope_tests::gen::{self, GenConfig, GenStats, OpenFlowsConfig};

/// Counts live and peak heap bytes.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

fn shrank(n: usize) {
    CURRENT.fetch_sub(n, Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        shrank(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// rstscope pipeline benchmark.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Packets in the throughput capture.
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,
    /// Concurrently open connections in the throughput capture.
    #[arg(long, default_value_t = 10_000)]
    concurrent: usize,
    /// Never-closed connections fed to the tracker for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    flows_for_memory: u64,
    /// Repetitions of each throughput measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Capture length per record (0 = whole frames).
    #[arg(long, default_value_t = 0)]
    snaplen: u32,
    /// Generator seed.
    #[arg(long, default_value_t = GenConfig::default().seed)]
    seed: u64,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Benchmark this capture instead of generating one (external tools see it too).
    #[arg(long)]
    capture: Option<PathBuf>,
    /// Only these stages, comma-separated, of a (libpcap), b (parse), c (track), d (external
    /// tools), e (memory).
    #[arg(long, default_value = "a,b,c,d,e")]
    only: String,
    /// Directory for the generated captures (default: a new one under the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the generated captures.
    #[arg(long)]
    keep: bool,
    /// Tiny sizes (10k packets, 10k flows, one run) for CI.
    #[arg(long)]
    smoke: bool,
}

/// Median of some durations.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (a) The floor: libpcap reads every record and we count it.
fn bare_libpcap(path: &Path) -> Result<u64> {
    let mut cap = pcap::Capture::from_file(path).context("libpcap open")?;
    let mut n = 0u64;
    let mut bytes = 0usize;
    loop {
        match cap.next_packet() {
            Ok(p) => {
                n += 1;
                bytes += p.data.len();
            }
            Err(pcap::Error::NoMorePackets) => break,
            Err(e) => bail!("libpcap: {e}"),
        }
    }
    black_box(bytes);
    Ok(n)
}

#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    packets: u64,
    segments: u64,
    skipped: u64,
    errors: u64,
    resets: u64,
    flows: u64,
    records: u64,
}

/// (b) and (c): the agent's reader and parser, and the tracker when `track` is set.
fn agent_pipeline(path: &Path, track: bool) -> Result<Counts> {
    let name = path.to_str().context("capture path is not UTF-8")?;
    let mut src = FileSource::open(name)?;
    let mut c = Counts::default();
    if track {
        // Exactly the agent's own loop (batching included), minus output formatting.
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut counters = rstscope_agent::pipeline::Counters::default();
        let (mut resets, mut flows) = (0u64, 0u64);
        let mut sink = |ev: Event| match ev {
            Event::Reset(_) => resets += 1,
            Event::Flow(_) => flows += 1,
            Event::Open(_) => {}
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        rstscope_agent::pipeline::run_source(
            &mut src,
            &mut tracker,
            &mut counters,
            &stop,
            &mut sink,
            &mut |_| {},
            &mut |_, _| {},
        );
        tracker.finish_all(&mut sink);
        c.packets = counters.packets;
        c.segments = counters.tcp_packets;
        c.skipped = counters.skipped.values().sum();
        c.errors = counters.errors.len() as u64;
        c.records = tracker.stats().flows;
        c.resets = resets;
        c.flows = flows;
        return Ok(c);
    }
    let mut acc = 0u32;
    loop {
        match src.next_packet() {
            Ok(Poll::Packet(p)) => {
                c.packets += 1;
                match wire::parse(p.link_type, p.ts_ns, p.data) {
                    Ok(seg) => {
                        c.segments += 1;
                        acc = acc.wrapping_add(seg.seq ^ seg.payload_len);
                    }
                    Err(_) => c.skipped += 1,
                }
            }
            Ok(Poll::Idle) => {}
            Ok(Poll::End) => break,
            Err(_) => c.errors += 1,
        }
    }
    black_box(acc);
    Ok(c)
}

/// Runs an external command; `None` when it is not installed.
fn external(program: &str, args: &[&str]) -> Result<Option<Duration>> {
    let start = Instant::now();
    let out = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("running {program}")),
    };
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{program} {}: {}: {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(Some(took))
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Memory {
    flows: u64,
    tracked: u64,
    peak_heap: usize,
    steady_heap: usize,
    hwm_delta_kib: Option<u64>,
    took: Duration,
}

/// (e) Heap per tracked flow: `flows` handshakes that never close.
fn memory_per_flow(path: &Path, flows: u64) -> Result<Memory> {
    let name = path.to_str().context("capture path is not UTF-8")?;
    let mut src = FileSource::open(name)?;
    // Reset the peak RSS (VmHWM) so the cross-check sees only this measurement.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_before = proc_status_kib("VmRSS:");
    let baseline = CURRENT.load(Relaxed);
    PEAK.store(baseline, Relaxed);
    let start = Instant::now();
    let mut tracker = Tracker::new(TrackerConfig {
        max_flows: flows as usize,
        inactivity_timeout_ns: 24 * 3600 * 1_000_000_000,
        linger_ns: 3600 * 1_000_000_000,
        ..TrackerConfig::default()
    });
    let mut events = 0u64;
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    let mut sink = |ev: Event| {
        events += 1;
        let kind = match ev {
            Event::Reset(_) => "rst".to_string(),
            Event::Flow(f) => format!("flow {} {}", f.end.as_str(), f.conn_state),
            Event::Open(o) => format!("open{}", if o.midstream { " midstream" } else { "" }),
        };
        *kinds.entry(kind).or_default() += 1;
    };
    loop {
        match src.next_packet() {
            Ok(Poll::Packet(p)) => {
                if let Ok(seg) = wire::parse(p.link_type, p.ts_ns, p.data) {
                    tracker.on_segment(&seg, &mut sink);
                }
            }
            Ok(Poll::Idle) | Err(_) => {}
            Ok(Poll::End) => break,
        }
    }
    let took = start.elapsed();
    let peak_heap = PEAK.load(Relaxed) - baseline;
    let steady_heap = CURRENT.load(Relaxed).saturating_sub(baseline);
    let tracked = tracker.stats().active;
    let hwm_after = proc_status_kib("VmHWM:");
    drop(tracker);
    if events != 0 {
        eprintln!("note: {events} events while only opening connections: {kinds:?}");
    }
    let hwm_delta_kib = match (hwm_reset, rss_before, hwm_after) {
        (true, Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    Ok(Memory { flows, tracked, peak_heap, steady_heap, hwm_delta_kib, took })
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(program).args(args).output().ok()?;
    let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
    Some(String::from_utf8_lossy(&text).trim().to_string())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn rate(packets: u64, d: Duration) -> f64 {
    packets as f64 / d.as_secs_f64().max(1e-9)
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else {
        format!("{:.0} k", r / 1e3)
    }
}

fn describe(stats: &GenStats) -> String {
    format!(
        "{} packets, {:.1} MB, {} connections ({} FIN, {} client RST, {} server RST, {} refused, \
         {} still open), {} RST packets, {} retransmissions, {:.0}% IPv6, {:.0}% VLAN",
        stats.packets,
        stats.file_bytes as f64 / 1e6,
        stats.connections,
        stats.fin_closed,
        stats.client_reset,
        stats.server_reset,
        stats.refused,
        stats.unfinished,
        stats.rst_packets,
        stats.retransmissions,
        100.0 * stats.ipv6_connections as f64 / stats.connections.max(1) as f64,
        100.0 * stats.vlan_connections as f64 / stats.connections.max(1) as f64,
    )
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.packets = args.packets.min(10_000);
        args.flows_for_memory = args.flows_for_memory.min(10_000);
        args.concurrent = args.concurrent.min(1_000);
        args.runs = args.runs.min(1);
    }
    let runs = args.runs.max(1);
    let stage = |s: &str| args.only.split(',').any(|x| x.trim() == s);

    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("rstscope-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };

    let rustc = command_output("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    line("## rstscope pipeline benchmark".into());
    line(String::new());
    line(format!("- machine: {nproc} CPUs ({}), {rustc}, release profile", cpu_model()));
    line(format!("- command: `cargo run --release -p rstscope-tests --bin bench -- {}`", cmdline.join(" ")));

    // Captures.
    let (capture, gen_stats) = match &args.capture {
        Some(p) => (p.clone(), None),
        None => {
            let p = dir.join("mixed.pcap");
            let cfg = GenConfig {
                seed: args.seed,
                packets: args.packets,
                concurrent: args.concurrent,
                snaplen: args.snaplen,
                ..GenConfig::default()
            };
            let t = Instant::now();
            let s = gen::write_capture_file(&cfg, &p)?;
            eprintln!("generated {} in {:.2?}", p.display(), t.elapsed());
            (p, Some(s))
        }
    };
    match &gen_stats {
        Some(s) => line(format!(
            "- capture: generated, {} concurrent, snaplen {}: {}",
            args.concurrent,
            if args.snaplen == 0 { "full".to_string() } else { args.snaplen.to_string() },
            describe(s)
        )),
        None => line(format!("- capture: {}", capture.display())),
    }

    // (e) first, while the heap and RSS are still small.
    let memory = if stage("e") && args.flows_for_memory > 0 {
        let p = dir.join("open-flows.pcap");
        let cfg =
            OpenFlowsConfig { seed: args.seed ^ 0x0be7, flows: args.flows_for_memory, ..OpenFlowsConfig::default() };
        let t = Instant::now();
        gen::write_open_flows_file(&cfg, &p)?;
        eprintln!("generated {} in {:.2?}", p.display(), t.elapsed());
        let m = memory_per_flow(&p, args.flows_for_memory)?;
        if !args.keep {
            let _ = std::fs::remove_file(&p);
        }
        Some(m)
    } else {
        None
    };

    // (a)–(d), interleaved run by run so drift hits every stage alike.
    let cap = capture.to_str().context("capture path is not UTF-8")?.to_string();
    let mut t_pcap = Vec::new();
    let mut t_parse = Vec::new();
    let mut t_track = Vec::new();
    let mut t_argus = Vec::new();
    let mut t_tcpdump = Vec::new();
    let mut argus_note = None;
    let mut tcpdump_note = None;
    let (mut n_pcap, mut parse_counts, mut track_counts) = (0, Counts::default(), Counts::default());
    for run in 0..runs {
        eprintln!("run {}/{runs}", run + 1);
        if stage("a") {
            let t = Instant::now();
            n_pcap = bare_libpcap(&capture)?;
            t_pcap.push(t.elapsed());
        }
        if stage("b") {
            let t = Instant::now();
            parse_counts = agent_pipeline(&capture, false)?;
            t_parse.push(t.elapsed());
        }
        if stage("c") {
            let t = Instant::now();
            track_counts = agent_pipeline(&capture, true)?;
            t_track.push(t.elapsed());
        }
        if stage("d") {
            if argus_note.is_none() {
                match external("argus", &["-r", &cap, "-w", "/dev/null"]) {
                    Ok(Some(d)) => t_argus.push(d),
                    Ok(None) => argus_note = Some("not installed (`apt-get install -y argus-server`)".to_string()),
                    Err(e) => argus_note = Some(format!("failed: {e:#}")),
                }
            }
            if tcpdump_note.is_none() {
                let filter = "tcp[tcpflags] & tcp-rst != 0";
                match external("tcpdump", &["-r", &cap, "-w", "/dev/null", filter]) {
                    Ok(Some(d)) => t_tcpdump.push(d),
                    Ok(None) => tcpdump_note = Some("not installed (`apt-get install -y tcpdump`)".to_string()),
                    Err(e) => tcpdump_note = Some(format!("failed: {e:#}")),
                }
            }
        }
    }
    let packets = gen_stats.as_ref().map_or(n_pcap.max(parse_counts.packets).max(track_counts.packets), |s| s.packets);
    let med = |v: &Vec<Duration>| (!v.is_empty()).then(|| median(v.clone()));
    let (m_pcap, m_parse, m_track) = (med(&t_pcap), med(&t_parse), med(&t_track));
    let (m_argus, m_tcpdump) = (med(&t_argus), med(&t_tcpdump));

    line(format!("- runs: {runs} per stage, median reported; input file in the page cache"));
    line(String::new());
    line("| stage | median time | packets/s | vs bare libpcap | notes |".into());
    line("|---|---:|---:|---:|---|".into());
    let mut row = |name: &str, m: Option<Duration>, note: String| {
        let (time, pps, vs) = match m {
            Some(d) => (
                format!("{:.3} s", d.as_secs_f64()),
                fmt_rate(rate(packets, d)),
                m_pcap.map_or("–".into(), |p| format!("{:.0}%", 100.0 * p.as_secs_f64() / d.as_secs_f64())),
            ),
            None => ("n/a".into(), "n/a".into(), "–".into()),
        };
        line(format!("| {name} | {time} | {pps} | {vs} | {note} |"));
    };
    row("a. bare libpcap loop (`pcap` crate, `next_packet`)", m_pcap, format!("{n_pcap} records"));
    row(
        "b. parse only (`FileSource` + `wire::parse`)",
        m_parse,
        format!(
            "{} segments, {} skipped, {} read errors",
            parse_counts.segments, parse_counts.skipped, parse_counts.errors
        ),
    );
    row(
        "c. full tracking (b + `flow::Tracker`)",
        m_track,
        format!(
            "{} RST events{}, {} flow summaries, {} records created",
            track_counts.resets,
            gen_stats.as_ref().map_or(String::new(), |s| format!(" (capture has {} RST packets)", s.rst_packets)),
            track_counts.flows,
            track_counts.records
        ),
    );
    row("d. `argus -r FILE -w /dev/null`", m_argus, argus_note.clone().unwrap_or_default());
    row(
        "d. `tcpdump -r FILE -w /dev/null 'tcp[tcpflags] & tcp-rst != 0'`",
        m_tcpdump,
        tcpdump_note.clone().unwrap_or_default(),
    );
    line(String::new());

    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let (Some(t), Some(p)) = (m_track, m_pcap) {
        let share = p.as_secs_f64() / t.as_secs_f64();
        line(format!(
            "- full tracking vs bare libpcap: {:.0}% of its packets/s (target ≥ 60%: {})",
            100.0 * share,
            verdict(share >= 0.6)
        ));
    }
    match (m_track, m_argus) {
        (Some(t), Some(a)) => {
            let x = a.as_secs_f64() / t.as_secs_f64();
            line(format!("- full tracking vs argus: {x:.1}× its packets/s (target ≥ 5×: {})", verdict(x >= 5.0)));
        }
        (Some(_), None) => {
            line(format!("- full tracking vs argus: n/a, argus {}", argus_note.unwrap_or_else(|| "not run".into())))
        }
        _ => {}
    }
    if let Some(m) = &memory {
        let per = |b: f64| b / m.flows.max(1) as f64;
        line(format!(
            "- memory: {} never-closed connections ({} tracked) in {:.2} s; heap peak {:.1} MB = \
             {:.0} B/flow (target < 300: {}); heap after {:.0} B/flow; peak RSS growth {}",
            m.flows,
            m.tracked,
            m.took.as_secs_f64(),
            m.peak_heap as f64 / 1e6,
            per(m.peak_heap as f64),
            verdict(per(m.peak_heap as f64) < 300.0),
            per(m.steady_heap as f64),
            m.hwm_delta_kib.map_or("n/a".into(), |k| format!(
                "{:.1} MB = {:.0} B/flow",
                k as f64 * 1024.0 / 1e6,
                per(k as f64 * 1024.0)
            )),
        ));
    }

    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    if args.keep {
        eprintln!("kept captures in {}", dir.display());
    } else {
        if args.capture.is_none() {
            let _ = std::fs::remove_file(&capture);
        }
        if args.dir.is_none() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
    Ok(())
}
