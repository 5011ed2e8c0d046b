//! Live-capture benchmark (issue 6): the highest packet rate the agent sustains on a veth with
//! zero kernel drops.
//!
//! `cargo run --release -p rstscope-tests --bin live-bench -- [--packets N] [--rates
//! 50k,100k,...,top] [--bisect N] [--collector] [--agent-arg=ARG ...] [--smoke] [--out FILE]`
//!
//! Needs root, `ip netns` and `tcpreplay` (Debian: `apt-get install -y tcpreplay`; nothing is
//! installed here). One run:
//!
//! 1. generates a deterministic capture with `rstscope_tests::gen` (many concurrent
//!    connections, handshakes, data, FIN/RST endings, retransmissions, IPv4/IPv6, VLAN;
//!    documentation addresses only) with a 128-byte snaplen: tcpreplay sends the captured bytes,
//!    so every frame is at most 128 bytes and the benchmark measures packets per second, not
//!    bytes;
//! 2. creates two namespaces joined by one veth pair and nothing else (`lab::VethPair`: no
//!    addresses, no routes, removed on drop, panic and SIGINT/SIGTERM), so the replay cannot
//!    leave them;
//! 3. per rate step, starts a fresh `rstscope-agent --interface veth-b` in namespace b (JSON
//!    output to a file, Prometheus metrics on the namespace's loopback, optionally a real
//!    collector on that loopback), replays the capture from namespace a with `tcpreplay
//!    --pps=N` or `--topspeed`, waits (bounded) until the agent's metrics stop moving, stops it
//!    with SIGINT and reads its closing stats record: libpcap's `ps_recv`/`ps_drop`/`ps_ifdrop`
//!    and the packets the agent itself read; besides, the veth's own counters and the kernel's
//!    backlog drops (`/proc/net/softnet_stat`), and the agent's CPU time (user + system);
//! 4. bisects (a bounded number of replays) between the highest lossless step and the lowest
//!    lossy one;
//! 5. writes a markdown report (`target/live-bench.md` by default) and prints it.
//!
//! A step is lossless when libpcap dropped nothing, the interface dropped nothing, and the agent
//! read every packet tcpreplay sent. Nothing asserts the numbers: they are for people to read.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rstscope_tests::gen::{self, GenConfig, GenStats};
use rstscope_tests::lab::{self, VethPair};
use rstscope_tests::machine::{command_output, cpu_model, cpu_time, load_average, mem_total};
use serde_json::Value;

/// Where the agent serves its metrics, inside namespace b.
const METRICS_ADDR: &str = "127.0.0.1:9465";
/// Where the optional collector listens, inside namespace b.
const COLLECTOR_ADDR: &str = "127.0.0.1:50051";

#[derive(Parser, Debug)]
#[command(name = "live-bench", about = "Highest packet rate the live agent sustains without kernel drops")]
struct Args {
    /// Packets in the replayed capture.
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,

    /// Concurrent connections in the generated capture.
    #[arg(long, default_value_t = 10_000)]
    concurrent: usize,

    /// Bytes kept per generated frame (what tcpreplay sends); 0 sends whole frames.
    #[arg(long, default_value_t = 128)]
    snaplen: u32,

    /// Rate steps in packets per second (`k`/`M` suffixes), `top` for tcpreplay --topspeed.
    #[arg(long, value_delimiter = ',', default_value = "50k,100k,200k,400k,800k,top")]
    rates: Vec<String>,

    /// Extra replays bisecting between the highest lossless and the lowest lossy step.
    #[arg(long, default_value_t = 3)]
    bisect: u32,

    /// Run a real rstscope-collector on namespace b's loopback and export to it.
    #[arg(long)]
    collector: bool,

    /// Extra argument for the agent (repeatable), e.g. `--agent-arg=--buffer-mib=128`.
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,

    /// The agent binary (default: built in this benchmark's profile).
    #[arg(long)]
    agent_bin: Option<PathBuf>,

    /// Markdown report [default: <target>/live-bench.md; none with --smoke].
    #[arg(long)]
    out: Option<PathBuf>,

    /// Tiny run in seconds that checks the benchmark still works: 20000 packets, two steps.
    #[arg(long)]
    smoke: bool,

    /// Keep the scratch directory (capture, agent output and logs).
    #[arg(long)]
    keep: bool,

    /// Internal: print the agent's metrics from ADDR (run inside namespace b) and exit.
    #[arg(long, hide = true, value_name = "ADDR")]
    scrape: Option<SocketAddr>,
}

/// A rate step: packets per second, or tcpreplay's top speed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rate {
    Pps(u64),
    Top,
}

impl Rate {
    fn parse(text: &str) -> Result<Rate> {
        let t = text.trim().to_ascii_lowercase();
        if t == "top" || t == "topspeed" {
            return Ok(Rate::Top);
        }
        let (number, scale) = match t.strip_suffix('k') {
            Some(n) => (n, 1e3),
            None => match t.strip_suffix('m') {
                Some(n) => (n, 1e6),
                None => (t.as_str(), 1.0),
            },
        };
        let value: f64 = number.parse().with_context(|| format!("rate {text:?}: a number with k/M, or top"))?;
        if !(value.is_finite() && value >= 1.0) {
            bail!("rate {text:?} must be at least 1 packet per second");
        }
        Ok(Rate::Pps((value * scale).round() as u64))
    }

    fn label(self) -> String {
        match self {
            Rate::Pps(n) => fmt_rate(n as f64),
            Rate::Top => "top speed".into(),
        }
    }

    fn tcpreplay_arg(self) -> String {
        match self {
            Rate::Pps(n) => format!("--pps={n}"),
            Rate::Top => "--topspeed".into(),
        }
    }
}

/// What tcpreplay said it did.
#[derive(Clone, Debug, Default)]
struct Replay {
    /// "Actual: N packets".
    actual: u64,
    /// "Successful packets".
    successful: u64,
    /// "Failed packets".
    failed: u64,
    /// "Retried packets (ENOBUFS)" + "(EAGAIN)".
    retried: u64,
    /// "Rated: ... pps".
    pps: f64,
    /// "sent in S seconds".
    seconds: f64,
}

impl Replay {
    fn parse(text: &str) -> Result<Replay> {
        let mut r = Replay::default();
        let number = |s: &str| s.trim().trim_end_matches(',').parse::<f64>().ok();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("Actual:") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                r.actual = words.first().and_then(|w| number(w)).unwrap_or(0.0) as u64;
                if let Some(i) = words.iter().position(|w| *w == "in") {
                    r.seconds = words.get(i + 1).and_then(|w| number(w)).unwrap_or(0.0);
                }
            } else if let Some(rest) = line.strip_prefix("Rated:") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let Some(i) = words.iter().position(|w| w.starts_with("pps")) {
                    r.pps = words.get(i.wrapping_sub(1)).and_then(|w| number(w)).unwrap_or(0.0);
                }
            } else if let Some((key, value)) = line.split_once(':') {
                let value = number(value).unwrap_or(0.0) as u64;
                match key.trim() {
                    "Successful packets" => r.successful = value,
                    "Failed packets" => r.failed = value,
                    "Retried packets (ENOBUFS)" | "Retried packets (EAGAIN)" => r.retried += value,
                    _ => {}
                }
            }
        }
        if r.actual == 0 && r.successful == 0 {
            bail!("no packet counts in tcpreplay's output:\n{text}");
        }
        Ok(r)
    }
}

/// One interface's counters (`ip -s -j link`).
#[derive(Clone, Copy, Debug, Default)]
struct LinkCounters {
    rx_packets: u64,
    rx_dropped: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

impl LinkCounters {
    fn read(ns: &str, ifname: &str) -> Result<LinkCounters> {
        let out = lab::netns_exec(ns, &["ip", "-s", "-j", "link", "show", "dev", ifname])?;
        let json: Value = serde_json::from_slice(&out.stdout).context("ip -s -j link output")?;
        let stats = &json[0]["stats64"];
        let get = |dir: &str, key: &str| stats[dir][key].as_u64().unwrap_or(0);
        Ok(LinkCounters {
            rx_packets: get("rx", "packets"),
            rx_dropped: get("rx", "dropped"),
            tx_packets: get("tx", "packets"),
            tx_dropped: get("tx", "dropped"),
        })
    }

    fn since(self, before: LinkCounters) -> LinkCounters {
        LinkCounters {
            rx_packets: self.rx_packets.saturating_sub(before.rx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(before.rx_dropped),
            tx_packets: self.tx_packets.saturating_sub(before.tx_packets),
            tx_dropped: self.tx_dropped.saturating_sub(before.tx_dropped),
        }
    }
}

/// Packets the kernel dropped from its per-CPU input backlogs, whole host
/// (`/proc/net/softnet_stat`, second column, hexadecimal).
fn softnet_dropped() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|h| u64::from_str_radix(h, 16).ok()))
        .sum()
}

/// The agent's closing stats record.
#[derive(Clone, Copy, Debug, Default)]
struct AgentStats {
    packets: u64,
    tcp_packets: u64,
    received: u64,
    dropped: u64,
    if_dropped: u64,
}

/// One replay at one rate.
#[derive(Clone, Debug)]
struct Step {
    rate: Rate,
    bisected: bool,
    replay: Replay,
    /// Wall time of the tcpreplay process.
    replay_wall: Duration,
    /// veth-a's counters (sender side) and veth-b's (receiver side) during the step.
    link_a: LinkCounters,
    link_b: LinkCounters,
    backlog_dropped: u64,
    agent: AgentStats,
    /// Agent CPU (user + system) from capture start until it had read everything.
    agent_cpu: Duration,
    /// The agent's metrics at the end (packets read, capture drops) as a cross-check.
    metrics_packets: u64,
    metrics_drops: u64,
    /// How long after tcpreplay ended the agent took to read what arrived.
    drained_in: Duration,
    /// The agent's exit status (with a collector, 3 means batches left unacknowledged).
    agent_exit: Option<i32>,
}

impl Step {
    fn sent(&self) -> u64 {
        self.replay.successful.max(self.replay.actual.saturating_sub(self.replay.failed))
    }

    fn missing(&self) -> u64 {
        self.sent().saturating_sub(self.agent.packets)
    }

    fn kernel_drops(&self) -> u64 {
        self.agent.dropped + self.agent.if_dropped
    }

    fn lossless(&self) -> bool {
        self.kernel_drops() == 0
            && self.missing() == 0
            && self.link_a.tx_dropped == 0
            && self.link_b.rx_dropped == 0
            && self.replay.failed == 0
    }

    /// The rate tcpreplay achieved (its own figure; else sent / wall).
    fn achieved_pps(&self) -> f64 {
        if self.replay.pps > 0.0 {
            self.replay.pps
        } else {
            self.sent() as f64 / self.replay_wall.as_secs_f64().max(1e-9)
        }
    }

    /// What to compare steps by: the requested rate, or for top speed what it reached.
    fn order_key(&self) -> f64 {
        match self.rate {
            Rate::Pps(n) => n as f64,
            Rate::Top => f64::INFINITY,
        }
    }
}

/// The programs and places one run uses.
struct Setup {
    agent: PathBuf,
    collector: Option<PathBuf>,
    cli: Option<PathBuf>,
    capture: PathBuf,
    dir: PathBuf,
    pair: VethPair,
    me: PathBuf,
    agent_args: Vec<String>,
    packets: u64,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(addr) = args.scrape {
        print!("{}", http_get_metrics(addr)?);
        return Ok(());
    }
    if args.smoke {
        args.packets = args.packets.min(20_000);
        args.concurrent = args.concurrent.min(500);
        args.rates = vec!["20k".into(), "top".into()];
        args.bisect = 0;
    }
    let rates: Vec<Rate> = args.rates.iter().map(|r| Rate::parse(r)).collect::<Result<_>>()?;
    if rates.is_empty() {
        bail!("--rates: give at least one rate");
    }
    preflight()?;
    let me = std::env::current_exe().context("locating this benchmark")?;
    let profile_dir = me.parent().context("benchmark in <target>/<profile>")?.to_path_buf();
    let target = profile_dir.parent().context("benchmark in <target>/<profile>")?.to_path_buf();
    let out = match (&args.out, args.smoke) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(target.join("live-bench.md")),
        (None, true) => None,
    };
    let (agent, collector, cli) = binaries(&args, &profile_dir)?;
    remove_stale_scratch(&target);
    let dir = target.join(format!("live-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run(&args, &rates, agent, collector, cli, &dir, &me, out.as_deref());
    if args.keep {
        eprintln!("live-bench: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run(
    args: &Args,
    rates: &[Rate],
    agent: PathBuf,
    collector: Option<PathBuf>,
    cli: Option<PathBuf>,
    dir: &Path,
    me: &Path,
    out: Option<&Path>,
) -> Result<()> {
    let load_before = load_average();
    let capture = dir.join("replay.pcap");
    let cfg =
        GenConfig { packets: args.packets, concurrent: args.concurrent, snaplen: args.snaplen, ..GenConfig::default() };
    let started = Instant::now();
    let gen_stats = gen::write_capture_file(&cfg, &capture)?;
    eprintln!("live-bench: generated {} packets in {:.1?}", gen_stats.packets, started.elapsed());

    let pair = VethPair::new(&format!("rslb{}-", std::process::id()))?;
    let setup = Setup {
        agent,
        collector,
        cli,
        capture,
        dir: dir.to_path_buf(),
        pair,
        me: me.to_path_buf(),
        agent_args: args.agent_args.clone(),
        packets: gen_stats.packets,
    };
    let veth_features = lab::netns_exec(&setup.pair.ns_b, &["ethtool", "-k", &setup.pair.if_b])
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            text.lines()
                .filter(|l| l.starts_with("generic-receive-offload") || l.starts_with("rx-vlan-offload"))
                .map(|l| l.trim().replace(": ", " "))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|_| "n/a".into());
    let _collector = match &setup.collector {
        Some(_) => Some(start_collector(&setup)?),
        None => None,
    };

    let mut steps = Vec::new();
    for &rate in rates {
        let step = measure_step(&setup, rate, false)?;
        print_step(&step);
        steps.push(step);
    }
    for _ in 0..args.bisect {
        let Some((lo, hi)) = bisection_bounds(&steps) else { break };
        if hi <= lo * 1.05 {
            break;
        }
        let mid = ((lo * hi).sqrt()).round() as u64;
        let step = measure_step(&setup, Rate::Pps(mid), true)?;
        print_step(&step);
        steps.push(step);
    }
    let load_after = load_average();
    let stored = match &setup.cli {
        Some(cli) => collector_status(&setup, cli),
        None => None,
    };
    let mut report = render(args, &setup, &gen_stats, &steps, &load_before, &load_after, &veth_features);
    if let Some(stored) = stored {
        report.push_str(&format!("The collector's `rstscope status` after all steps: {stored}.\n"));
    }
    println!("{report}");
    if let Some(out) = out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("live-bench: wrote {}", out.display());
    }
    Ok(())
}

/// Removes scratch directories of earlier runs that were interrupted (SIGINT/SIGTERM end the
/// process from the lab's signal handler, which removes namespaces and processes, not files):
/// `<target>/live-bench-PID` whose PID no longer runs this benchmark.
fn remove_stale_scratch(target: &Path) {
    let Ok(entries) = std::fs::read_dir(target) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("live-bench-").and_then(|p| p.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.trim().starts_with("live-bench") && entry.path().is_dir() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Root, `ip netns` and tcpreplay, or why not.
fn preflight() -> Result<()> {
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("live-bench needs root (network namespaces and live capture)");
    }
    if tcpreplay_version().is_none() {
        bail!("tcpreplay not found; install it (Debian/Ubuntu: `apt-get install -y tcpreplay`)");
    }
    for tool in ["ip", "ethtool"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            bail!("`{tool}` not found (Debian: `apt-get install -y iproute2 ethtool`)");
        }
    }
    Ok(())
}

fn tcpreplay_version() -> Option<String> {
    let out = Command::new("tcpreplay").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).to_string();
    text.lines().next().map(|l| l.trim().to_string()).filter(|l| l.contains("tcpreplay"))
}

/// The agent (and with --collector the collector and CLI), built in this benchmark's profile
/// so the numbers are those of the working tree; `--agent-bin` skips the build.
fn binaries(args: &Args, profile_dir: &Path) -> Result<(PathBuf, Option<PathBuf>, Option<PathBuf>)> {
    let mut packages = Vec::new();
    if args.agent_bin.is_none() {
        packages.push("rstscope-agent");
    }
    if args.collector {
        packages.push("rstscope-collector");
    }
    if !packages.is_empty() {
        let mut targets = vec!["-q", "--bins"];
        for p in &packages {
            targets.extend(["-p", p]);
        }
        let mut build = rstscope_tests::build::cargo_build(profile_dir, &targets);
        eprintln!("live-bench: building {}", packages.join(", "));
        let status = build.status().context("run cargo build")?;
        if !status.success() {
            bail!("building {} failed ({status})", packages.join(", "));
        }
    }
    let agent = args.agent_bin.clone().unwrap_or_else(|| profile_dir.join("rstscope-agent"));
    if !agent.is_file() {
        bail!("agent binary not found at {}", agent.display());
    }
    let (collector, cli) = if args.collector {
        (Some(profile_dir.join("rstscope-collector")), Some(profile_dir.join("rstscope")))
    } else {
        (None, None)
    };
    Ok((agent, collector, cli))
}

/// The collector on namespace b's loopback, waited for (bounded) until the CLI gets an answer.
fn start_collector(setup: &Setup) -> Result<lab::Proc> {
    let (Some(collector), Some(cli)) = (&setup.collector, &setup.cli) else { bail!("no collector binary") };
    let data = setup.dir.join("collector-data");
    let data = data.to_str().context("utf-8 scratch directory")?;
    let proc = lab::spawn_in_namespace(
        &setup.pair.ns_b,
        collector,
        &["--listen", COLLECTOR_ADDR, "--data-dir", data],
        "collector",
        &setup.dir.join("collector.out"),
        &setup.dir.join("collector.log"),
    )?;
    let url = format!("http://{COLLECTOR_ADDR}");
    let cli = cli.to_str().context("utf-8 path")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab::netns_exec(&setup.pair.ns_b, &["timeout", "10", cli, "status", "--collector", &url]).is_err() {
        if Instant::now() > deadline {
            bail!("the collector did not answer within 30 s (log: {})", setup.dir.join("collector.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(proc)
}

/// What the collector stored (`rstscope status -o json`: resets, flows), for the report.
fn collector_status(setup: &Setup, cli: &Path) -> Option<String> {
    let url = format!("http://{COLLECTOR_ADDR}");
    let cli = cli.to_str()?;
    let out =
        lab::netns_exec(&setup.pair.ns_b, &["timeout", "20", cli, "status", "-o", "json", "--collector", &url]).ok()?;
    let status: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(format!("{} resets, {} flows stored", status["resets"], status["flows"]))
}

/// One replay at `rate` with a fresh agent.
fn measure_step(setup: &Setup, rate: Rate, bisected: bool) -> Result<Step> {
    eprintln!("live-bench: replaying {} packets at {}", setup.packets, rate.label());
    let pair = &setup.pair;
    let agent_out = setup.dir.join("agent.json");
    let agent_log = setup.dir.join("agent.log");
    let state = setup.dir.join("agent-state");
    let state = state.to_str().context("utf-8 scratch directory")?.to_string();
    let collector_url = format!("http://{COLLECTOR_ADDR}");
    let mut agent_args: Vec<&str> =
        vec!["--interface", &pair.if_b, "--metrics", METRICS_ADDR, "--output", "json", "--log", "info"];
    if setup.collector.is_some() {
        agent_args.extend(["--collector", &collector_url, "--name", "live-bench", "--state-dir", &state]);
        agent_args.extend(["--ack-timeout", "60"]);
    }
    agent_args.extend(setup.agent_args.iter().map(String::as_str));
    let agent = lab::spawn_in_namespace(&pair.ns_b, &setup.agent, &agent_args, "agent", &agent_out, &agent_log)?;
    // `ip netns exec` execs the program, so this is the agent's own pid (checked).
    let pid = agent.pid();

    // The metrics answer once the interface is open (see the agent's main).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = loop {
        if let Ok(m) = scrape(setup) {
            break m;
        }
        if Instant::now() > deadline {
            bail!("the agent did not serve metrics within 30 s; log:\n{}", tail(&agent_log));
        }
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            bail!("the agent exited at start; log:\n{}", tail(&agent_log));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with("rstscope-agent") {
        bail!("pid {pid} is {comm:?}, not the agent: cannot read its CPU time");
    }
    let (a0, b0, backlog0) =
        (LinkCounters::read(&pair.ns_a, &pair.if_a)?, LinkCounters::read(&pair.ns_b, &pair.if_b)?, softnet_dropped());
    let cpu0 = cpu_time(&pid.to_string()).context("agent CPU time")?;

    let replay_out = setup.dir.join("tcpreplay.out");
    let intf = format!("--intf1={}", pair.if_a);
    let capture = setup.capture.to_str().context("utf-8 scratch directory")?;
    let replay_args = [intf.as_str(), "--preload-pcap", &rate.tcpreplay_arg(), capture];
    let started = Instant::now();
    let replay = lab::spawn_in_namespace(
        &pair.ns_a,
        Path::new("tcpreplay"),
        &replay_args,
        "tcpreplay",
        &replay_out,
        &setup.dir.join("tcpreplay.err"),
    )?;
    let expected = match rate {
        Rate::Pps(n) => setup.packets as f64 / n as f64,
        Rate::Top => setup.packets as f64 / 50_000.0,
    };
    let (status, _) = replay.finish(Duration::from_secs_f64(expected * 2.0 + 60.0))?;
    let replay_wall = started.elapsed();
    let replay_text = std::fs::read_to_string(&replay_out).unwrap_or_default();
    if !status.success() {
        bail!("tcpreplay failed ({status}):\n{replay_text}\n{}", tail(&setup.dir.join("tcpreplay.err")));
    }
    let parsed = Replay::parse(&replay_text)?;
    let sent = parsed.successful.max(parsed.actual.saturating_sub(parsed.failed));

    // Wait (bounded) until the agent has read what arrived: its packet count reaches what was
    // sent, or stops moving for a second (some packets never reached it).
    let drain_start = Instant::now();
    let deadline = drain_start + Duration::from_secs(60);
    let mut last = (metrics.packets, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(m) = scrape(setup) {
            metrics = m;
        }
        if metrics.packets >= sent {
            break;
        }
        if metrics.packets != last.0 {
            last = (metrics.packets, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) || Instant::now() > deadline {
            break;
        }
    }
    let drained_in = drain_start.elapsed();
    let agent_cpu = cpu_time(&pid.to_string()).context("agent CPU time")?.saturating_sub(cpu0);
    let (a1, b1, backlog1) =
        (LinkCounters::read(&pair.ns_a, &pair.if_a)?, LinkCounters::read(&pair.ns_b, &pair.if_b)?, softnet_dropped());
    // The capture-drop gauge is refreshed every 2 s: one more look after that.
    std::thread::sleep(Duration::from_millis(2100));
    if let Ok(m) = scrape(setup) {
        metrics = m;
    }

    agent.signal("INT");
    let finish_timeout = Duration::from_secs(if setup.collector.is_some() { 120 } else { 60 });
    let (status, _) = agent.finish(finish_timeout)?;
    let text = std::fs::read_to_string(&agent_out).unwrap_or_default();
    let stats = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok().filter(|v| v["type"] == "stats"))
        .with_context(|| format!("no stats record from the agent ({status}); log:\n{}", tail(&agent_log)))?;
    let drops = &stats["capture_drops"];
    let agent_stats = AgentStats {
        packets: stats["packets"].as_u64().unwrap_or(0),
        tcp_packets: stats["tcp_packets"].as_u64().unwrap_or(0),
        received: drops["received"].as_u64().unwrap_or(0),
        dropped: drops["dropped"].as_u64().unwrap_or(0),
        if_dropped: drops["if_dropped"].as_u64().unwrap_or(0),
    };
    Ok(Step {
        rate,
        bisected,
        replay: parsed,
        replay_wall,
        link_a: a1.since(a0),
        link_b: b1.since(b0),
        backlog_dropped: backlog1.saturating_sub(backlog0),
        agent: agent_stats,
        agent_cpu,
        metrics_packets: metrics.packets,
        metrics_drops: metrics.capture_drops,
        drained_in,
        agent_exit: status.code(),
    })
}

/// The agent's Prometheus numbers that matter here.
#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    packets: u64,
    capture_drops: u64,
}

/// Scrapes the agent's metrics: this benchmark, run again inside namespace b (`--scrape`).
fn scrape(setup: &Setup) -> Result<Metrics> {
    let me = setup.me.to_str().context("utf-8 path")?;
    let out = lab::netns_exec(&setup.pair.ns_b, &[me, "--scrape", METRICS_ADDR])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Ok(Metrics {
        packets: value("rstscope_agent_packets_total").context("no rstscope_agent_packets_total")?,
        capture_drops: value("rstscope_agent_capture_drops_total").unwrap_or(0),
    })
}

/// `GET /metrics` over HTTP/1.0 with short timeouts (connect 1 s, read 2 s).
fn http_get_metrics(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header")?;
    if !head.starts_with("HTTP/1.") || !head.lines().next().is_some_and(|l| l.contains(" 200")) {
        bail!("metrics answered {:?}", head.lines().next());
    }
    Ok(body.to_string())
}

/// Lower (highest lossless requested rate) and upper (lowest lossy rate above it) bounds for
/// the next bisection, in packets per second; `None` when there is nothing to narrow.
fn bisection_bounds(steps: &[Step]) -> Option<(f64, f64)> {
    let mut sorted: Vec<&Step> = steps.iter().collect();
    sorted.sort_by(|a, b| a.order_key().total_cmp(&b.order_key()));
    let first_lossy = sorted.iter().position(|s| !s.lossless())?;
    let lo = sorted[..first_lossy].last()?;
    let hi = sorted[first_lossy];
    let lo_rate = lo.order_key();
    // Top speed lost packets: the top of the range is the rate it reached.
    let hi_rate = if hi.rate == Rate::Top { hi.achieved_pps() } else { hi.order_key() };
    (hi_rate > lo_rate).then_some((lo_rate, hi_rate))
}

fn print_step(step: &Step) {
    eprintln!(
        "live-bench: {} -> achieved {}/s, sent {}, libpcap received {} dropped {} if_dropped {}, agent read {}, missing {}, veth drops {}/{}, backlog drops {}, agent CPU {:.2} s{}",
        step.rate.label(),
        fmt_rate(step.achieved_pps()),
        step.sent(),
        step.agent.received,
        step.agent.dropped,
        step.agent.if_dropped,
        step.agent.packets,
        step.missing(),
        step.link_a.tx_dropped,
        step.link_b.rx_dropped,
        step.backlog_dropped,
        step.agent_cpu.as_secs_f64(),
        if step.lossless() { " (lossless)" } else { " (LOSS)" },
    );
}

fn render(
    args: &Args,
    setup: &Setup,
    gen_stats: &GenStats,
    steps: &[Step],
    load_before: &str,
    load_after: &str,
    veth_features: &str,
) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let frames = if args.snaplen == 0 {
        "whole frames".to_string()
    } else {
        format!("frames cut to {} bytes (tcpreplay sends the captured bytes)", args.snaplen)
    };
    line("# rstscope live-capture benchmark".into());
    line(String::new());
    line("Written by `tests/src/bin/live-bench.rs`. Not part of the test suite; nothing asserts these numbers.".into());
    line(String::new());
    line("## Machine and command".into());
    line(String::new());
    line(format!(
        "- machine: {nproc} CPUs ({}), {} RAM, Linux {}",
        cpu_model(),
        mem_total(),
        command_output("uname", &["-r"]).unwrap_or_default()
    ));
    line(format!("- load average (1, 5, 15 min) before / after: {load_before} / {load_after}"));
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    let profile = std::env::current_exe()
        .ok()
        .and_then(|me| me.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_default();
    let profile_flag = match profile.as_str() {
        "release" => " --release".to_string(),
        "debug" | "" => String::new(),
        other => format!(" --profile {other}"),
    };
    line(format!("- command: `cargo run{profile_flag} -p rstscope-tests --bin live-bench -- {}`", cmdline.join(" ")));
    line(format!("- {}", tcpreplay_version().unwrap_or_else(|| "tcpreplay: unknown version".into())));
    line(format!(
        "- replay: `tcpreplay --intf1={} --preload-pcap --pps=N|--topspeed` in namespace `{}`, into a veth pair \
         (nothing else on it; {veth_features}) whose other end `{}` is in namespace `{}`",
        setup.pair.if_a, setup.pair.ns_a, setup.pair.if_b, setup.pair.ns_b
    ));
    let mut agent_cmd =
        format!("`rstscope-agent --interface {} --metrics {METRICS_ADDR} --output json", setup.pair.if_b);
    if setup.collector.is_some() {
        agent_cmd.push_str(&format!(" --collector http://{COLLECTOR_ADDR} --name live-bench"));
    }
    for a in &setup.agent_args {
        agent_cmd.push(' ');
        agent_cmd.push_str(a);
    }
    agent_cmd.push('`');
    let output = if setup.collector.is_some() {
        "events exported to a real `rstscope-collector` on namespace b's loopback (same 2 CPUs) and written as JSON lines to a file"
    } else {
        "events written as JSON lines to a file (no collector)"
    };
    line(format!(
        "- agent: {agent_cmd} in namespace b (default capture options unless given above: snaplen 192, 32 MiB buffer, kernel blocks handed over within 10 ms, filter `tcp`), a fresh process per step; {output}"
    ));
    line(format!(
        "- capture: {frames}: {} packets, {:.1} MB, {} concurrent, {} connections ({} FIN, {} client RST, {} server RST, {} refused, {} still open), {} RST packets, {} retransmissions, {:.0}% IPv6, {:.0}% VLAN",
        gen_stats.packets,
        gen_stats.file_bytes as f64 / 1e6,
        args.concurrent,
        gen_stats.connections,
        gen_stats.fin_closed,
        gen_stats.client_reset,
        gen_stats.server_reset,
        gen_stats.refused,
        gen_stats.unfinished,
        gen_stats.rst_packets,
        gen_stats.retransmissions,
        100.0 * gen_stats.ipv6_connections as f64 / gen_stats.connections.max(1) as f64,
        100.0 * gen_stats.vlan_connections as f64 / gen_stats.connections.max(1) as f64,
    ));
    line(String::new());
    line("## Result".into());
    line(String::new());
    let best = steps.iter().filter(|s| s.lossless()).max_by(|a, b| a.achieved_pps().total_cmp(&b.achieved_pps()));
    let worst = steps.iter().filter(|s| !s.lossless()).min_by(|a, b| a.achieved_pps().total_cmp(&b.achieved_pps()));
    match (best, worst) {
        (Some(b), Some(w)) => line(format!(
            "**Highest rate with zero loss: {}/s** (tcpreplay's achieved rate; requested {}). Lowest rate with a loss: {}/s (requested {}).",
            fmt_rate(b.achieved_pps()),
            b.rate.label(),
            fmt_rate(w.achieved_pps()),
            w.rate.label()
        )),
        (Some(b), None) => line(format!(
            "**No loss at any rate tried; highest: {}/s** (requested {}). The replay, not the agent, set the limit.",
            fmt_rate(b.achieved_pps()),
            b.rate.label()
        )),
        (None, Some(w)) => line(format!(
            "**Loss at every rate tried**, the lowest being {}/s (requested {}).",
            fmt_rate(w.achieved_pps()),
            w.rate.label()
        )),
        (None, None) => line("No steps ran.".into()),
    }
    line(String::new());
    line("A step is lossless when libpcap dropped nothing (`ps_drop`, `ps_ifdrop`), the veth dropped nothing, and the agent read every packet tcpreplay sent. Agent CPU is user + system from the capture start until the agent had read everything (`/proc/PID/stat`); as a share of the replay's wall time it says how busy the capture thread was.".into());
    line(String::new());
    line("| requested | achieved (tcpreplay) | sent | veth-b received | libpcap received (ps_recv, drops included) | kernel dropped (ps_drop) | if dropped (ps_ifdrop) | veth + backlog drops | agent read | missing | agent CPU | CPU / replay wall | CPU per packet | replay wall | lossless |".into());
    line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|".into());
    for step in steps {
        let wall = step.replay_wall.as_secs_f64();
        let cpu = step.agent_cpu.as_secs_f64();
        line(format!(
            "| {}{} | {}/s | {} | {} | {} | {} | {} | {} + {} | {} | {} | {:.2} s | {:.0}% | {:.2} µs | {:.2} s | {} |",
            step.rate.label(),
            if step.bisected { " (bisect)" } else { "" },
            fmt_rate(step.achieved_pps()),
            step.sent(),
            step.link_b.rx_packets,
            step.agent.received,
            step.agent.dropped,
            step.agent.if_dropped,
            step.link_a.tx_dropped + step.link_b.rx_dropped,
            step.backlog_dropped,
            step.agent.packets,
            step.missing(),
            cpu,
            100.0 * cpu / wall.max(1e-9),
            1e6 * cpu / step.agent.packets.max(1) as f64,
            wall,
            if step.lossless() { "yes" } else { "**no**" },
        ));
    }
    line(String::new());
    let mismatched: Vec<String> = steps
        .iter()
        .filter(|s| s.metrics_packets != s.agent.packets || s.metrics_drops != s.kernel_drops())
        .map(|s| {
            format!(
                "{}: metrics said {} packets / {} drops, the stats record {} / {}",
                s.rate.label(),
                s.metrics_packets,
                s.metrics_drops,
                s.agent.packets,
                s.kernel_drops()
            )
        })
        .collect();
    if mismatched.is_empty() {
        line("The agent's Prometheus metrics (`rstscope_agent_packets_total`, `rstscope_agent_capture_drops_total`) agreed with its closing stats record at every step.".into());
    } else {
        line(format!(
            "Metrics and the closing stats record disagreed (the drop gauge is refreshed every 2 s): {}.",
            mismatched.join("; ")
        ));
    }
    let exits: Vec<String> = steps
        .iter()
        .filter(|s| s.agent_exit != Some(0))
        .map(|s| format!("{}: {:?}", s.rate.label(), s.agent_exit))
        .collect();
    if exits.is_empty() {
        line(format!(
            "Every agent exited with status 0{}.",
            if setup.collector.is_some() { " (every batch acknowledged by the collector)" } else { "" }
        ));
    } else {
        line(format!("Agents that did not exit with 0 (3: batches unacknowledged): {}.", exits.join("; ")));
    }
    let non_tcp: u64 = steps.iter().map(|s| s.agent.packets.saturating_sub(s.agent.tcp_packets)).sum();
    let slowest_drain = steps.iter().map(|s| s.drained_in).max().unwrap_or_default();
    line(format!(
        "Packets the agent read but did not parse as TCP, all steps: {non_tcp}. Longest wait for the agent to catch up after tcpreplay ended: {:.1} s.",
        slowest_drain.as_secs_f64()
    ));
    s
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.0} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_suffixes() {
        assert_eq!(Rate::parse("100k").unwrap(), Rate::Pps(100_000));
        assert_eq!(Rate::parse("1.5M").unwrap(), Rate::Pps(1_500_000));
        assert_eq!(Rate::parse("250").unwrap(), Rate::Pps(250));
        assert_eq!(Rate::parse("top").unwrap(), Rate::Top);
        assert!(Rate::parse("0").is_err());
        assert!(Rate::parse("fast").is_err());
    }

    #[test]
    fn tcpreplay_output_parses() {
        let text = "Actual: 1000000 packets (114278132 bytes) sent in 2.31 seconds\n\
                    Rated: 49257742.5 Bps, 394.06 Mbps, 431034.48 pps\n\
                    Flows: 52274 flows, 22594.52 fps, 1000000 unique flow packets, 0 unique non-flow packets\n\
                    Statistics for network device: veth-a\n\
                    \tSuccessful packets:        999990\n\
                    \tFailed packets:            10\n\
                    \tTruncated packets:         0\n\
                    \tRetried packets (ENOBUFS): 3\n\
                    \tRetried packets (EAGAIN):  2\n";
        let r = Replay::parse(text).unwrap();
        assert_eq!((r.actual, r.successful, r.failed, r.retried), (1_000_000, 999_990, 10, 5));
        assert!((r.pps - 431_034.48).abs() < 0.01);
        assert!((r.seconds - 2.31).abs() < 1e-9);
        assert!(Replay::parse("nothing useful").is_err());
    }
}
