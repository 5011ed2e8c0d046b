//! Throughput and memory benchmark of the agent against the tools people would use instead.
//!
//! `cargo run --release -p rstscope-tests --bin bench -- [--packets 1000000,10000000]
//! [--snaplens 0,128] [--runs N] [--quick] [--smoke] [--out BENCHMARKS.md]`
//!
//! One run generates deterministic captures (see `rstscope_tests::gen`: many concurrent
//! connections, handshakes, data, FIN and RST endings, retransmissions, IPv4/IPv6, VLAN) for
//! every packet count and snaplen asked for, and measures on each, interleaved run by run so
//! that drift hits every stage alike, the median of `--runs` of: (a) a bare libpcap read loop,
//! the floor; (b) the agent's own file reader plus `wire::parse`; (c) (b) plus the flow tracker,
//! i.e. full tracking and RST extraction; (d) `tcpdump` with a RST filter and `argus` as external
//! processes on the same file; (t) the tracker alone, on one thread, on packets parsed
//! beforehand (c can be no faster than the slower of b and t). Then (e) peak memory per tracked
//! flow with 1M concurrent connections (peak RSS growth, cross-checked with a counting global
//! allocator). Last, on captures of up to 1M packets and when valgrind is installed, (c) runs
//! once more under callgrind, and its instructions are summed by part of the agent
//! (`rstscope_tests::profile`): wall time on a shared machine scatters by a third from run to
//! run, instruction counts do not move, so the profile is what says where the time goes.
//!
//! Every stage gets wall time (what the targets are about) and CPU time (user + system of the
//! process or the child): the machine may be shared, and CPU time shows what a stage costs
//! when wall time mostly shows the neighbours. Writes a markdown report (`BENCHMARKS.md` by
//! default). Never fails on a missed target: the numbers are for people to read.

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
use rstscope_tests::machine::{command_output, cpu_model, load_average, mem_total};
use rstscope_tests::profile::{self, PARTS};

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

/// rstscope agent benchmark: throughput against libpcap, tcpdump and argus; memory per flow.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Packets per generated capture; one capture per count (and per snaplen).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64, 10_000_000])]
    packets: Vec<u64>,
    /// Capture lengths per record, one capture each (0 = whole frames).
    #[arg(long, value_delimiter = ',', default_values_t = [0u32, 128])]
    snaplens: Vec<u32>,
    /// Concurrently open connections in the throughput captures.
    #[arg(long, default_value_t = 10_000)]
    concurrent: usize,
    /// Never-closed connections fed to the tracker for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    flows_for_memory: u64,
    /// Repetitions of each throughput measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Generator seed.
    #[arg(long, default_value_t = GenConfig::default().seed)]
    seed: u64,
    /// Write the markdown report here (default: BENCHMARKS.md, none with --smoke).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Benchmark this capture instead of generating them (external tools see it too).
    #[arg(long)]
    capture: Option<PathBuf>,
    /// Only these stages, comma-separated, of a (libpcap), b (parse), c (track), t (the tracker
    /// alone on segments parsed beforehand: what c's tracker thread costs without the other
    /// thread), d (external tools) and e (memory).
    #[arg(long, default_value = "a,b,c,t,d,e")]
    only: String,
    /// Skip the instruction profile (callgrind, when valgrind is installed) of stage c on the
    /// captures of at most 1M packets.
    #[arg(long)]
    no_profile: bool,
    /// Directory for the generated captures (default: a new one under the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the generated captures.
    #[arg(long)]
    keep: bool,
    /// Only the 1M-packet captures, three runs each.
    #[arg(long)]
    quick: bool,
    /// Tiny sizes (10k packets, 10k flows, one run, no report file), to check that it works.
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
    /// Most connection records tracked at once.
    peak_tracked: u64,
}

impl Counts {
    /// The notes of the stages that track (c and t).
    fn tracked_note(&self) -> String {
        format!(
            "{} RST events, {} flow summaries, {} records, at most {} tracked at once",
            self.resets, self.flows, self.records, self.peak_tracked
        )
    }
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
        c.peak_tracked = tracker.stats().peak_active;
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

/// (t) The tracker alone, on one thread, on segments parsed and keyed beforehand (not timed),
/// like (c)'s reader thread does: what (c)'s tracker thread costs without the reader, the
/// hand-off and the other core.
fn tracker_alone(path: &Path) -> Result<(Counts, Took)> {
    let name = path.to_str().context("capture path is not UTF-8")?;
    let mut src = FileSource::open(name)?;
    let mut tracker = Tracker::new(TrackerConfig::default());
    let key_hasher = tracker.key_hasher();
    let mut segments = Vec::new();
    loop {
        match src.next_packet() {
            Ok(Poll::Packet(p)) => {
                if let Ok(seg) = wire::parse(p.link_type, p.ts_ns, p.data) {
                    segments.push(key_hasher.keyed(seg));
                }
            }
            Ok(Poll::Idle) | Err(_) => {}
            Ok(Poll::End) => break,
        }
    }
    let mut c = Counts { packets: segments.len() as u64, segments: segments.len() as u64, ..Counts::default() };
    let (_, took) = timed(|| {
        let (mut resets, mut flows) = (0u64, 0u64);
        let mut sink = |ev: Event| match ev {
            Event::Reset(_) => resets += 1,
            Event::Flow(_) => flows += 1,
            Event::Open(_) => {}
        };
        for batch in segments.chunks(rstscope_agent::pipeline::BATCH) {
            tracker.on_keyed(batch, &mut sink);
        }
        tracker.finish_all(&mut sink);
        c.records = tracker.stats().flows;
        c.peak_tracked = tracker.stats().peak_active;
        c.resets = resets;
        c.flows = flows;
        Ok(())
    })?;
    Ok((c, took))
}

/// CPU time (user + system) from `/proc/self/stat`: this process's (all threads) and that of
/// its waited-for children. Clock ticks are 1/100 s on Linux (`_SC_CLK_TCK`).
fn cpu_times() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3, `state`.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    let ticks = |i: usize| fields.get(i - 3).copied().unwrap_or(0);
    let d = |t: u64| Duration::from_millis(t * 10);
    (d(ticks(14) + ticks(15)), d(ticks(16) + ticks(17)))
}

/// Wall and CPU time of one measurement.
#[derive(Clone, Copy, Debug)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

/// Runs `f` in this process, timing it.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Took)> {
    let (cpu0, _) = cpu_times();
    let start = Instant::now();
    let out = f()?;
    let wall = start.elapsed();
    let (cpu1, _) = cpu_times();
    Ok((out, Took { wall, cpu: cpu1.saturating_sub(cpu0) }))
}

/// Runs an external command; `None` when it is not installed.
fn external(program: &str, args: &[&str]) -> Result<Option<Took>> {
    let (_, children0) = cpu_times();
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
    let wall = start.elapsed();
    let (_, children1) = cpu_times();
    if !out.status.success() {
        bail!("{program} {}: {}: {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(Some(Took { wall, cpu: children1.saturating_sub(children0) }))
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

/// The runs of one stage on one capture.
#[derive(Default)]
struct Stage {
    runs: Vec<Took>,
    /// Why it did not run, or what it counted.
    note: String,
}

impl Stage {
    fn wall(&self) -> Option<Duration> {
        (!self.runs.is_empty()).then(|| median(self.runs.iter().map(|t| t.wall).collect()))
    }

    fn cpu(&self) -> Option<Duration> {
        (!self.runs.is_empty()).then(|| median(self.runs.iter().map(|t| t.cpu).collect()))
    }
}

/// One capture and what every stage measured on it.
struct Scenario {
    description: String,
    label: String,
    packets: u64,
    libpcap: Stage,
    parse: Stage,
    track: Stage,
    alone: Stage,
    tcpdump: Stage,
    argus: Stage,
    /// Instructions of stage c by part of the agent, or why there are none.
    profile: Option<std::result::Result<[u64; PARTS.len()], String>>,
}

/// Largest capture profiled: callgrind runs the agent about 50 times slower.
const PROFILE_MAX_PACKETS: u64 = 1_000_000;

/// (p) Stage c once under callgrind (this same binary on `capture`), summed by part of the
/// agent. `None` when valgrind is not installed.
fn profile_stage_c(capture: &Path, out_file: &Path) -> Result<Option<[u64; PARTS.len()]>> {
    let exe = std::env::current_exe().context("finding this benchmark's executable")?;
    let report = out_file.with_extension("md");
    let result = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(&exe)
        .arg("--capture")
        .arg(capture)
        .args(["--only", "c", "--runs", "1", "--no-profile", "--out"])
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let out = match result {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running valgrind"),
    };
    let _ = std::fs::remove_file(&report);
    if !out.status.success() {
        bail!("valgrind: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = std::fs::read_to_string(out_file).with_context(|| format!("reading {}", out_file.display()))?;
    let parsed = profile::parse_callgrind(&text).with_context(|| format!("parsing {}", out_file.display()))?;
    Ok(Some(profile::by_part(&parsed)))
}

/// Measures stages a to d on `capture`, interleaved run by run.
fn measure(capture: &Path, runs: usize, stage: &dyn Fn(&str) -> bool) -> Result<[Stage; 6]> {
    let cap = capture.to_str().context("capture path is not UTF-8")?.to_string();
    let [mut libpcap, mut parse, mut track, mut alone, mut tcpdump, mut argus] = <[Stage; 6]>::default();
    let mut tool_failed = [false; 2];
    for run in 0..runs {
        eprintln!("  run {}/{runs}", run + 1);
        if stage("a") {
            let (n, took) = timed(|| bare_libpcap(capture))?;
            libpcap.runs.push(took);
            libpcap.note = format!("{n} records");
        }
        if stage("b") {
            let (c, took) = timed(|| agent_pipeline(capture, false))?;
            parse.runs.push(took);
            parse.note = format!("{} segments, {} skipped, {} read errors", c.segments, c.skipped, c.errors);
        }
        if stage("c") {
            let (c, took) = timed(|| agent_pipeline(capture, true))?;
            track.runs.push(took);
            track.note = c.tracked_note();
        }
        if stage("t") {
            let (c, took) = tracker_alone(capture)?;
            alone.runs.push(took);
            alone.note = c.tracked_note();
        }
        if stage("d") {
            let filter = "tcp[tcpflags] & tcp-rst != 0";
            let tools: [(&str, Vec<&str>, &mut Stage, &str); 2] = [
                ("tcpdump", vec!["-r", &cap, "-w", "/dev/null", filter], &mut tcpdump, "tcpdump"),
                ("argus", vec!["-r", &cap, "-w", "/dev/null"], &mut argus, "argus-server"),
            ];
            for (i, (program, tool_args, into, package)) in tools.into_iter().enumerate() {
                if tool_failed[i] {
                    continue;
                }
                match external(program, &tool_args) {
                    Ok(Some(took)) => into.runs.push(took),
                    Ok(None) => {
                        into.note = format!("not installed (`apt-get install -y {package}`)");
                        tool_failed[i] = true;
                    }
                    Err(e) => {
                        into.note = format!("failed: {e:#}");
                        tool_failed[i] = true;
                    }
                }
            }
        }
    }
    Ok([libpcap, parse, track, alone, tcpdump, argus])
}

fn percent(floor: Option<Duration>, d: Option<Duration>) -> String {
    match (floor, d) {
        (Some(f), Some(d)) => format!("{:.0}%", 100.0 * f.as_secs_f64() / d.as_secs_f64().max(1e-9)),
        _ => "–".into(),
    }
}

fn times(slow: Option<Duration>, fast: Option<Duration>) -> String {
    match (slow, fast) {
        (Some(s), Some(f)) => format!("{:.1}×", s.as_secs_f64() / f.as_secs_f64().max(1e-9)),
        _ => "–".into(),
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.3} s", d.as_secs_f64()))
}

fn first_line(program: &str, args: &[&str]) -> String {
    command_output(program, args).and_then(|s| s.lines().next().map(str::to_string)).unwrap_or_else(|| "n/a".into())
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.packets = vec![1_000_000];
        args.runs = args.runs.min(3);
    }
    if args.smoke {
        args.packets = vec![10_000];
        args.flows_for_memory = args.flows_for_memory.min(10_000);
        args.concurrent = args.concurrent.min(1_000);
        args.runs = 1;
    }
    let out = match (&args.out, args.smoke) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(PathBuf::from("BENCHMARKS.md")),
        (None, true) => None,
    };
    let runs = args.runs.max(1);
    let only = args.only.clone();
    let stage = move |s: &str| only.split(',').any(|x| x.trim() == s);

    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("rstscope-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let load_before = load_average();

    // (e) first, while the heap and RSS are still small.
    let memory = if stage("e") && args.flows_for_memory > 0 {
        let p = dir.join("open-flows.pcap");
        let cfg =
            OpenFlowsConfig { seed: args.seed ^ 0x0be7, flows: args.flows_for_memory, ..OpenFlowsConfig::default() };
        let t = Instant::now();
        gen::write_open_flows_file(&cfg, &p)?;
        eprintln!("generated {} in {:.2?}", p.display(), t.elapsed());
        let m = memory_per_flow(&p, args.flows_for_memory)?;
        let per = |b: f64| b / m.flows.max(1) as f64;
        eprintln!(
            "memory: {} flows, peak RSS growth {} B/flow, heap peak {:.1} B/flow, after {:.1} B/flow",
            m.flows,
            m.hwm_delta_kib.map_or("n/a".into(), |k| format!("{:.1}", per(k as f64 * 1024.0))),
            per(m.peak_heap as f64),
            per(m.steady_heap as f64),
        );
        if !args.keep {
            let _ = std::fs::remove_file(&p);
        }
        Some(m)
    } else {
        None
    };

    // (a)–(d), one capture at a time (the 10M full-frame file alone is several GB).
    let mut scenarios = Vec::new();
    // `--only e` measures memory alone: no throughput captures (the 10M one is several GB).
    let throughput = ["a", "b", "c", "d", "t"].iter().any(|s| stage(s));
    let plan: Vec<(u64, u32)> = match &args.capture {
        _ if !throughput => Vec::new(),
        Some(_) => vec![(0, 0)],
        None => args.packets.iter().flat_map(|&p| args.snaplens.iter().map(move |&s| (p, s))).collect(),
    };
    for (packets, snaplen) in plan {
        let snap = if snaplen == 0 { "full frames".to_string() } else { format!("snaplen {snaplen}") };
        let (capture, description, label) = match &args.capture {
            Some(p) => (p.clone(), format!("`{}`", p.display()), p.display().to_string()),
            None => {
                let p = dir.join(format!("mixed-{packets}-{snaplen}.pcap"));
                let cfg = GenConfig {
                    seed: args.seed,
                    packets,
                    concurrent: args.concurrent,
                    snaplen,
                    ..GenConfig::default()
                };
                let t = Instant::now();
                let s = gen::write_capture_file(&cfg, &p)?;
                eprintln!("generated {} in {:.2?}", p.display(), t.elapsed());
                let label = format!("{:.0}M packets, {snap}", packets as f64 / 1e6);
                let label = if packets < 1_000_000 { format!("{packets} packets, {snap}") } else { label };
                (p, format!("{} concurrent, {snap}: {}", args.concurrent, describe(&s)), label)
            }
        };
        eprintln!("measuring {label}");
        let [libpcap, parse, track, alone, tcpdump, argus] = measure(&capture, runs, &stage)?;
        let n = if packets > 0 {
            packets
        } else {
            libpcap.note.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
        };
        let profile = (!args.no_profile && !args.smoke && stage("c") && n > 0 && n <= PROFILE_MAX_PACKETS).then(|| {
            eprintln!("profiling stage c on {label} under callgrind (a minute or two)");
            let file = dir.join(format!("callgrind-{packets}-{snaplen}.out"));
            let result = match profile_stage_c(&capture, &file) {
                Ok(Some(parts)) => Ok(parts),
                Ok(None) => Err("valgrind not installed (`apt-get install -y valgrind`)".to_string()),
                Err(e) => Err(format!("failed: {e:#}")),
            };
            if !args.keep {
                let _ = std::fs::remove_file(&file);
            }
            result
        });
        scenarios.push(Scenario {
            description,
            label,
            packets: n,
            libpcap,
            parse,
            track,
            alone,
            tcpdump,
            argus,
            profile,
        });
        if !args.keep && args.capture.is_none() {
            let _ = std::fs::remove_file(&capture);
        }
    }
    let load_after = load_average();

    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_total = mem_total();
    line("# rstscope agent benchmarks".into());
    line(String::new());
    line("Written by `tests/src/bin/bench.rs`; rerun it to refresh this file. Benchmarks are not part of the".into());
    line("test suite and nothing asserts their numbers.".into());
    line(String::new());
    line("## Machine and command".into());
    line(String::new());
    line(format!("- machine: {nproc} CPUs ({}), {mem_total} RAM, Linux {}", cpu_model(), first_line("uname", &["-r"])));
    line(format!("- load average (1, 5, 15 min) before / after: {load_before} / {load_after}"));
    line(format!("- toolchain: {}, release profile (thin LTO)", first_line("rustc", &["--version"])));
    line(format!("- tools: {}; {}", first_line("tcpdump", &["--version"]), first_line("argus", &["-h"])));
    line(format!(
        "- command: `cargo run --release -p rstscope-tests --bin bench{}{}`",
        if cmdline.is_empty() { "" } else { " -- " },
        cmdline.join(" ")
    ));
    line(format!(
        "- {runs} runs per stage and capture, interleaved; medians. Input files are in the page cache \
         (each stage reads the same file right after the others). Wall time is what the targets are \
         about; CPU time (user + system, all threads or the child process) is what a stage costs, \
         and is the steadier number when the machine is shared."
    ));
    line(String::new());
    line("## Targets".into());
    line(String::new());
    line(
        "| capture | full tracking vs bare libpcap (target ≥ 67%) | vs argus (target ≥ 6×) | same in CPU time |".into(),
    );
    line("|---|---:|---:|---:|".into());
    for s in &scenarios {
        let (pw, tw, aw) = (s.libpcap.wall(), s.track.wall(), s.argus.wall());
        let (pc, tc, ac) = (s.libpcap.cpu(), s.track.cpu(), s.argus.cpu());
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => " (met)",
            Some(false) => " (missed)",
            None => "",
        };
        let share = pw.zip(tw).map(|(p, t)| p.as_secs_f64() / t.as_secs_f64().max(1e-9));
        let x = aw.zip(tw).map(|(a, t)| a.as_secs_f64() / t.as_secs_f64().max(1e-9));
        line(format!(
            "| {} | {}{} | {}{} | {} of libpcap, {} argus |",
            s.label,
            percent(pw, tw),
            verdict(share.map(|v| v >= 0.67)),
            times(aw, tw),
            verdict(x.map(|v| v >= 6.0)),
            percent(pc, tc),
            times(ac, tc),
        ));
    }
    if let Some(m) = &memory {
        let per = |b: f64| b / m.flows.max(1) as f64;
        let rss = m.hwm_delta_kib.map(|k| per(k as f64 * 1024.0));
        line(format!(
            "| memory, {} concurrent connections | peak RSS growth {} B/flow (target ≤ 200{}) | | heap peak {:.0} B/flow |",
            m.flows,
            rss.map_or("n/a".into(), |b| format!("{b:.0}")),
            match rss {
                Some(b) if b <= 200.0 => ", met",
                Some(_) => ", missed",
                None => "",
            },
            per(m.peak_heap as f64),
        ));
    }
    line(String::new());
    line("## Throughput".into());
    for s in &scenarios {
        line(String::new());
        line(format!("### {}", s.label));
        line(String::new());
        line(format!("Capture: {}.", s.description));
        line(String::new());
        line("| stage | wall (median) | packets/s | vs bare libpcap | CPU (median) | CPU vs libpcap | notes |".into());
        line("|---|---:|---:|---:|---:|---:|---|".into());
        let (pw, pc) = (s.libpcap.wall(), s.libpcap.cpu());
        // (t) is a diagnostic: its row only when it ran.
        let alone = (!s.alone.runs.is_empty()).then_some((
            "t. the tracker alone, one thread, on segments parsed beforehand (c's tracker thread)",
            &s.alone,
        ));
        let rows = [
            Some(("a. bare libpcap loop (`pcap` crate, `next_packet`)", &s.libpcap)),
            Some(("b. parse only (`FileSource` + `wire::parse`)", &s.parse)),
            Some(("c. full tracking and RST extraction (b + `flow::Tracker`, the agent's two-thread loop)", &s.track)),
            alone,
            Some(("d. `tcpdump -r FILE -w /dev/null 'tcp[tcpflags] & tcp-rst != 0'`", &s.tcpdump)),
            Some(("d. `argus -r FILE -w /dev/null`", &s.argus)),
        ];
        for (name, st) in rows.into_iter().flatten() {
            let pps = st.wall().map_or("n/a".into(), |d| fmt_rate(rate(s.packets, d)));
            line(format!(
                "| {name} | {} | {pps} | {} | {} | {} | {} |",
                secs(st.wall()),
                percent(pw, st.wall()),
                secs(st.cpu()),
                percent(pc, st.cpu()),
                st.note
            ));
        }
    }
    where_time_goes(&scenarios, &mut line);
    if let Some(m) = &memory {
        let per = |b: f64| b / m.flows.max(1) as f64;
        line(String::new());
        line("## Memory per tracked flow".into());
        line(String::new());
        line(format!(
            "{} handshakes that never close, fed to one tracker ({} tracked at the end) in {:.2} s: peak RSS \
             growth {}; heap (counting allocator) peak {:.1} MB = {:.0} B/flow, after {:.0} B/flow.",
            m.flows,
            m.tracked,
            m.took.as_secs_f64(),
            m.hwm_delta_kib.map_or("n/a".into(), |k| format!(
                "{:.1} MB = {:.0} B/flow",
                k as f64 * 1024.0 / 1e6,
                per(k as f64 * 1024.0)
            )),
            m.peak_heap as f64 / 1e6,
            per(m.peak_heap as f64),
            per(m.steady_heap as f64),
        ));
    }

    if let Some(out) = &out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    if args.keep {
        eprintln!("kept captures in {}", dir.display());
    } else if args.dir.is_none() {
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(())
}

/// The "Where the time goes" section: the stages per packet, and the instruction profile.
fn where_time_goes(scenarios: &[Scenario], line: &mut impl FnMut(String)) {
    let measured: Vec<&Scenario> = scenarios.iter().filter(|s| s.track.wall().is_some() && s.packets > 0).collect();
    if measured.is_empty() {
        return;
    }
    let ns = |s: &Scenario, d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e9 / s.packets as f64);
    let cell = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0} ns"));
    line(String::new());
    line("## Where the time goes".into());
    line(String::new());
    line(
        "Wall time per packet, medians. Stage c runs b's work on one thread (plus keying each \
         packet, which t gets done beforehand) and t's on the other, so it can be no faster than \
         the slower of the two; what it takes beyond that is keying, the hand-off and the two cores \
         slowing each other down (they share caches and memory bandwidth, and on this kind of \
         virtual machine whatever else the host runs)."
            .into(),
    );
    line(String::new());
    line(
        "| capture | a. libpcap loop | b. read + parse | t. tracker alone | c. both, two threads | c beyond max(b, t) | \
         best c could do vs libpcap: a / max(b, t) |"
            .into(),
    );
    line("|---|---:|---:|---:|---:|---:|---:|".into());
    for s in &measured {
        let (a, b, t, c) =
            (ns(s, s.libpcap.wall()), ns(s, s.parse.wall()), ns(s, s.alone.wall()), ns(s, s.track.wall()));
        let slower = b.zip(t).map(|(b, t)| b.max(t));
        line(format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.label,
            cell(a),
            cell(b),
            cell(t),
            cell(c),
            c.zip(slower).map_or("–".into(), |(c, m)| format!("{:+.0} ns", c - m)),
            a.zip(slower).map_or("–".into(), |(a, m)| format!("{:.0}%", 100.0 * a / m)),
        ));
    }
    let profiled: Vec<&Scenario> = measured.iter().copied().filter(|s| s.profile.is_some()).collect();
    if profiled.is_empty() {
        return;
    }
    line(String::new());
    line(
        "Instructions per packet of stage c by part of the agent (callgrind: exact counts, unaffected \
         by load; code inlined elsewhere counts for the file it was written in). To see them function \
         by function: `valgrind --tool=callgrind target/release/bench --capture FILE --only c --runs 1 \
         --no-profile`, then `callgrind_annotate --inclusive=yes callgrind.out.*`."
            .into(),
    );
    line(String::new());
    let header: Vec<String> = profiled.iter().map(|s| s.label.clone()).collect();
    line(format!("| part | {} |", header.join(" | ")));
    line(format!("|---|{}", "---:|".repeat(profiled.len())));
    let per_packet = |s: &Scenario, v: u64| v as f64 / s.packets as f64;
    for (i, part) in PARTS.iter().enumerate() {
        let cells: Vec<String> = profiled
            .iter()
            .map(|s| match &s.profile {
                Some(Ok(parts)) => {
                    let total: u64 = parts.iter().sum();
                    format!("{:.0} ({:.0}%)", per_packet(s, parts[i]), 100.0 * parts[i] as f64 / total.max(1) as f64)
                }
                _ => "–".into(),
            })
            .collect();
        line(format!("| {part} | {} |", cells.join(" | ")));
    }
    let totals: Vec<String> = profiled
        .iter()
        .map(|s| match &s.profile {
            Some(Ok(parts)) => format!("**{:.0}**", per_packet(s, parts.iter().sum())),
            Some(Err(why)) => why.clone(),
            None => "–".into(),
        })
        .collect();
    line(format!("| all | {} |", totals.join(" | ")));
}
