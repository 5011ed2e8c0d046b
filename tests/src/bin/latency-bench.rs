//! `latency-bench`: end-to-end verdict latency in live mode (issue 6): from a RST on the wire
//! to its merged report, with its verdict, reaching a follower of the collector.
//!
//! Runs the real netns lab (`rstscope_tests::lab`): live agents on the client (`c-m`), the mbox
//! (`m-c`) and the server (`s-r`), a real `rstscope-collector` in the obs namespace, and two
//! followers there: `rstscope resets --follow -o json` (merged reports, `FollowReports`) and
//! `rstscope resets --raw --follow -o json` (each agent's sighting as soon as the collector has
//! stored it, `FollowResets`). While clean connections run in the background, it makes N resets
//! a few per second: refused connections (v4 and v6), SO_LINGER-0 aborts, and SYNs the mbox
//! rejects with a forged RST (nftables), each on its own server port so every reset is matched
//! to its report.
//!
//! Latency of a report = wall time its first version reached the follower − the earliest
//! sighting's packet time (kernel capture timestamps are the same machine's wall clock). The
//! raw follower splits it: wire → the last agent's sighting stored at the collector (agent
//! settle window, idle clock, batching, spool, transport, store), and stored → verdict (the
//! collector's wait and decision). Nothing here asserts a number.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rstscope_tests::lab::{self, addr, Binaries, Host, Lab, Proc};
use rstscope_tests::machine::{command_output, cpu_model, cpu_time, load_average, mem_total};
use serde_json::Value;

#[derive(Parser)]
#[command(about = "End-to-end verdict latency of rstscope in a live netns lab")]
struct Args {
    /// Resets to make.
    #[arg(long, default_value_t = 200)]
    resets: usize,
    /// Resets per second.
    #[arg(long, default_value_t = 4.0)]
    rate: f64,
    /// Every Nth reset is a SYN the mbox rejects with a forged RST (`injected`); 0: none.
    #[arg(long, default_value_t = 10)]
    injected_every: usize,
    /// Clean connections per second in the background.
    #[arg(long, default_value_t = 6.0)]
    clean_rate: f64,
    /// Markdown report written here (also printed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A label for this run in the report (e.g. "before", "after").
    #[arg(long, default_value = "")]
    label: String,
}

/// What kind of reset was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Refused,
    Abort,
    Rejected,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Refused => "refused (closed port)",
            Kind::Abort => "SO_LINGER-0 abort",
            Kind::Rejected => "nftables reject (forged)",
        }
    }
}

const CLEAN_PORT: u16 = 9000;
const ABORT_PORT: u16 = 9001;
/// Refused resets use 20000 + i (nothing listens there; at most 5000).
const REFUSED_BASE: u16 = 20000;
/// Rejected resets use 25000 + i (the mbox rejects SYNs from the client to 25000-29999; below
/// the ephemeral port range, so no SYN-ACK to a client port is ever rejected).
const REJECT_BASE: u16 = 25000;

fn ruleset() -> String {
    format!(
        "table inet lab {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname \"m-c\" tcp dport {lo}-{hi} tcp flags syn reject with tcp reset
  }}
}}
",
        lo = REJECT_BASE,
        hi = REJECT_BASE + 4999
    )
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn port_of(endpoint: &str) -> Option<u16> {
    endpoint.rsplit(':').next()?.parse().ok()
}

fn sock(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Percentile (nearest rank) of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One sighting's identity, to find it in the raw follower's records.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SightingKey {
    agent: String,
    src: String,
    dst: String,
    seq: u64,
    ack: u64,
}

fn sighting_key(v: &Value) -> SightingKey {
    SightingKey {
        agent: v["agent"].as_str().unwrap_or("").to_string(),
        src: v["src"].as_str().unwrap_or("").to_string(),
        dst: v["dst"].as_str().unwrap_or("").to_string(),
        seq: v["seq"].as_u64().unwrap_or(0),
        ack: v["ack"].as_u64().unwrap_or(0),
    }
}

/// One matched report: latency (s), first verdict, the reset made, wire → last sighting stored
/// (s), stored → report (s).
type Row = (f64, String, Kind, Option<f64>, Option<f64>);

/// A report as first (and last) received.
struct Received {
    first_at: SystemTime,
    first_verdict: String,
    last_verdict: String,
    versions: usize,
    report: Value,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.resets == 0 || args.resets > 4999 {
        bail!("--resets must be 1 to 4999 (one server port each)");
    }
    if let Err(why) = lab::preflight() {
        bail!("the lab cannot run here: {why:#}");
    }
    let load_before = load_average();
    let bins = Binaries::next_to_current_exe()?;
    let lab = Lab::new(bins.clone()).context("build the lab")?;
    lab.nft(&ruleset())?;
    let collector = lab.start_collector()?;
    let mut agents: Vec<(&str, Proc)> = Vec::new();
    for (name, host, ifname) in
        [("client", Host::Client, "c-m"), ("mbox", Host::Mbox, "m-c"), ("server", Host::Server, "s-r")]
    {
        agents.push((name, lab.start_agent(host, ifname, name)?));
    }
    lab.wait_agents_connected(&["client", "mbox", "server"], Duration::from_secs(30))?;

    // Servers: clean answers in the background, and one that aborts every connection.
    let long = (args.resets as f64 / args.rate.max(0.1) + 120.0) as u64;
    let long_text = long.to_string();
    let mut servers = Vec::new();
    for (port, mode) in [(CLEAN_PORT, "clean"), (ABORT_PORT, "abort")] {
        for ip in [addr::SERVER4, addr::SERVER6] {
            let listen = sock(ip, port);
            let mut p = lab.labhost(
                Host::Server,
                &["serve", "--listen", &listen, "--mode", mode, "--count", "100000", "--timeout-secs", &long_text],
            )?;
            p.expect_line("listening", Duration::from_secs(5))?;
            servers.push(p);
        }
    }

    let collector_url = format!("http://127.0.0.1:{}", lab::COLLECTOR_PORT);
    let cli = bins.cli.clone();
    let since = format!("{:.3}", epoch(SystemTime::now()));
    let reports_args = ["resets", "--follow", "-o", "json", "--since", since.as_str(), "--collector", &collector_url];
    let raw_args =
        ["resets", "--follow", "--raw", "-o", "json", "--since", since.as_str(), "--collector", &collector_url];
    let reports_follower = lab.spawn_stamped(Host::Obs, &cli, &reports_args, "follow-reports")?;
    let raw_follower = lab.spawn_stamped(Host::Obs, &cli, &raw_args, "follow-raw")?;

    // Background clean traffic, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let clean = {
        let stop = stop.clone();
        let labhost = bins.labhost.clone();
        let ns = lab.ns(Host::Client);
        let every = Duration::from_secs_f64(3.0 / args.clean_rate.max(0.1));
        std::thread::spawn(move || {
            let mut made = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ip = if made.is_multiple_of(2) { addr::SERVER4 } else { addr::SERVER6 };
                let to = sock(ip, CLEAN_PORT);
                let _ = std::process::Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(&labhost)
                    .args(["many-clean", "--to", &to, "--n", "3"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                made += 3;
                std::thread::sleep(every);
            }
            made
        })
    };

    // Warm-up: refused probes until one is decided (every capture live, clocks measured).
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    let mut warm = 0u16;
    'warm: loop {
        let port = 10000 + warm;
        warm += 1;
        let to = sock(addr::SERVER4, port);
        lab.labhost(Host::Client, &["connect", "--to", &to])?.finish(Duration::from_secs(10))?;
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            if let Ok((_, line)) = reports_follower.lines.recv_timeout(Duration::from_millis(200)) {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["verdict"] == "end-to-end" {
                    break 'warm;
                }
            }
        }
        if Instant::now() > warm_deadline {
            bail!("no warm-up reset was decided within 60 s (logs in {})", lab.dir.display());
        }
    }
    eprintln!("latency-bench: warm-up done after {warm} probe(s); making {} resets", args.resets);
    // Whatever the warm-up left in the channels is not measured.
    std::thread::sleep(Duration::from_secs(3));
    while reports_follower.lines.try_recv().is_ok() {}
    while raw_follower.lines.try_recv().is_ok() {}

    let cpu_before: Vec<(String, f64)> = agents
        .iter()
        .map(|(n, p)| (n.to_string(), cpu_time_s(&p.pid().to_string())))
        .chain([("collector".to_string(), cpu_time_s(&collector.pid().to_string()))])
        .collect();
    let started = Instant::now();
    // Expected resets by server port: (kind, count).
    let mut expected: BTreeMap<u16, (Kind, usize)> = BTreeMap::new();
    let mut clients = Vec::new();
    for i in 0..args.resets {
        let due = started + Duration::from_secs_f64(i as f64 / args.rate.max(0.01));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let kind = if args.injected_every > 0 && i % args.injected_every == args.injected_every - 1 {
            Kind::Rejected
        } else if i % 2 == 0 {
            Kind::Refused
        } else {
            Kind::Abort
        };
        let ip = if i % 4 < 2 { addr::SERVER4 } else { addr::SERVER6 };
        let (port, extra): (u16, &[&str]) = match kind {
            Kind::Refused => (REFUSED_BASE + i as u16, &[]),
            Kind::Abort => (ABORT_PORT, &["--send", "GET /abort\n"]),
            Kind::Rejected => (REJECT_BASE + i as u16, &[]),
        };
        expected.entry(port).or_insert((kind, 0)).1 += 1;
        let to = sock(ip, port);
        let mut a = vec!["connect", "--to", to.as_str()];
        a.extend_from_slice(extra);
        let p = lab.labhost(Host::Client, &a)?;
        clients.push(std::thread::spawn(move || p.finish(Duration::from_secs(20)).map(|(_, l)| l.join(" "))));
    }
    let made_in = started.elapsed();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for c in clients {
        let said = c.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?.unwrap_or_else(|e| format!("{e}"));
        *outcomes.entry(said.split_whitespace().next().unwrap_or("").to_string()).or_default() += 1;
    }

    // Collect until every reset has a decided report (bounded).
    let total: usize = expected.values().map(|e| e.1).sum();
    let mut received: HashMap<String, Received> = HashMap::new();
    let mut stored: HashMap<SightingKey, SystemTime> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let count_matched = |received: &HashMap<String, Received>| {
        received
            .values()
            .filter(|r| {
                port_of(r.report["claimed_sender"].as_str().unwrap_or("")).is_some_and(|p| expected.contains_key(&p))
            })
            .count()
    };
    loop {
        while let Ok((at, line)) = raw_follower.lines.try_recv() {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                stored.entry(sighting_key(&v)).or_insert(at);
            }
        }
        match reports_follower.lines.recv_timeout(Duration::from_millis(100)) {
            Ok((at, line)) => {
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                let id = v["id"].as_str().unwrap_or("").to_string();
                let verdict = v["verdict"].as_str().unwrap_or("?").to_string();
                let entry = received.entry(id).or_insert_with(|| Received {
                    first_at: at,
                    first_verdict: verdict.clone(),
                    last_verdict: verdict.clone(),
                    versions: 0,
                    report: v.clone(),
                });
                entry.versions += 1;
                entry.last_verdict = verdict;
                entry.report = v;
            }
            Err(_) => {
                if count_matched(&received) >= total || Instant::now() > deadline {
                    break;
                }
            }
        }
    }
    // Late replacements (e.g. a forged partner) still count as versions, not as latency.
    std::thread::sleep(Duration::from_secs(3));
    while let Ok((_, line)) = reports_follower.lines.try_recv() {
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if let Some(r) = received.get_mut(v["id"].as_str().unwrap_or("")) {
                r.versions += 1;
                r.last_verdict = v["verdict"].as_str().unwrap_or("?").to_string();
            }
        }
    }
    while let Ok((at, line)) = raw_follower.lines.try_recv() {
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            stored.entry(sighting_key(&v)).or_insert(at);
        }
    }
    let cpu: Vec<(String, f64)> = cpu_before
        .iter()
        .map(|(n, before)| {
            let pid = if n == "collector" {
                collector.pid()
            } else {
                agents.iter().find(|(a, _)| a == n).map_or(0, |(_, p)| p.pid())
            };
            (n.clone(), cpu_time_s(&pid.to_string()) - before)
        })
        .collect();
    let wall = started.elapsed();
    let load_after = load_average();
    stop.store(true, Ordering::Relaxed);

    // Match reports to the resets made.
    let mut got: BTreeMap<u16, usize> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut replaced = 0usize;
    let mut changed_verdict = 0usize;
    for r in received.values() {
        let port = port_of(r.report["claimed_sender"].as_str().unwrap_or(""));
        let Some((kind, _)) = port.and_then(|p| expected.get(&p)) else {
            unexpected.push(r.report.to_string());
            continue;
        };
        *got.entry(port.unwrap_or(0)).or_default() += 1;
        let obs = r.report["observations"].as_array().cloned().unwrap_or_default();
        let wire = obs.iter().filter_map(|o| o["ts"].as_f64()).fold(f64::INFINITY, f64::min);
        if !wire.is_finite() {
            continue;
        }
        let latency = epoch(r.first_at) - wire;
        let stored_times: Vec<f64> =
            obs.iter().filter_map(|o| stored.get(&sighting_key(o)).map(|t| epoch(*t))).collect();
        let (to_stored, to_verdict) = if stored_times.len() == obs.len() {
            let last = stored_times.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (Some(last - wire), Some(epoch(r.first_at) - last))
        } else {
            (None, None)
        };
        if r.versions > 1 {
            replaced += 1;
        }
        if r.first_verdict != r.last_verdict {
            changed_verdict += 1;
        }
        rows.push((latency, r.first_verdict.clone(), *kind, to_stored, to_verdict));
    }
    let missing: usize = expected.iter().map(|(p, (_, n))| n.saturating_sub(got.get(p).copied().unwrap_or(0))).sum();

    // The report.
    let mut md = String::new();
    let title = if args.label.is_empty() { String::new() } else { format!(" ({})", args.label) };
    md += &format!("## End-to-end verdict latency{title}\n\n");
    md += "Written by `tests/src/bin/latency-bench.rs`. Not part of the test suite; nothing asserts these numbers.\n\n";
    md += &format!(
        "- machine: {} CPUs ({}), {} RAM, Linux {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        mem_total(),
        command_output("uname", &["-r"]).map_or("n/a".into(), |s| s.trim().to_string()),
    );
    md += &format!(
        "- command: `cargo run --release -p rstscope-tests --bin latency-bench -- --resets {} --rate {} --injected-every {} --clean-rate {}`\n",
        args.resets, args.rate, args.injected_every, args.clean_rate
    );
    md += "- lab: client — mbox (nftables) — r2 — server in network namespaces; live agents on client `c-m`, mbox `m-c`, server `s-r`; collector in its own namespace; followers `rstscope resets --follow -o json` (reports) and `--raw` (sightings as stored)\n";
    md += &format!(
        "- resets made: {total} in {:.1} s ({} clients said: {}); clean connections in the background: {:.1}/s\n",
        made_in.as_secs_f64(),
        outcomes.values().sum::<usize>(),
        outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        args.clean_rate
    );
    md += &format!("- load average (1, 5, 15 min) before / after: {load_before} / {load_after}\n");
    md += &format!(
        "- wall time of the measured part: {:.1} s; CPU (user+sys) meanwhile: {}\n",
        wall.as_secs_f64(),
        cpu.iter().map(|(n, s)| format!("{n} {s:.2} s")).collect::<Vec<_>>().join(", ")
    );
    md += &format!(
        "- reports matched: {} of {total}; **resets without a report: {missing}**; reports replaced later (same id): {replaced}, of which the verdict changed: {changed_verdict}; other reports: {}\n\n",
        rows.len(),
        unexpected.len()
    );
    md += "Latency = first arrival of the report at the follower − earliest sighting's packet time.\n\n";
    md += "| verdict (first version) | count | median | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n";
    let line = |name: &str, mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!(
            "| {name} | {} | {:.3} s | {:.3} s | {:.3} s | {:.3} s |\n",
            v.len(),
            pct(&v, 50.0),
            pct(&v, 90.0),
            pct(&v, 99.0),
            v.last().copied().unwrap_or(f64::NAN)
        )
    };
    let mut verdicts: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    verdicts.sort();
    verdicts.dedup();
    for verdict in &verdicts {
        md += &line(verdict, rows.iter().filter(|r| &r.1 == verdict).map(|r| r.0).collect());
    }
    md += &line("**all**", rows.iter().map(|r| r.0).collect());
    md += "\n| reset made | count | median | p99 | max |\n|---|---:|---:|---:|---:|\n";
    for kind in [Kind::Refused, Kind::Abort, Kind::Rejected] {
        let mut v: Vec<f64> = rows.iter().filter(|r| r.2 == kind).map(|r| r.0).collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(f64::total_cmp);
        md += &format!(
            "| {} | {} | {:.3} s | {:.3} s | {:.3} s |\n",
            kind.name(),
            v.len(),
            pct(&v, 50.0),
            pct(&v, 99.0),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    md += "\nWhere the time goes (reports whose every sighting the raw follower saw stored):\n\n";
    md += "| part | count | median | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n";
    let split: Vec<&Row> = rows.iter().filter(|r| r.3.is_some()).collect();
    md += &line(
        "wire → last sighting stored at the collector (agent settle, idle clock, batching, spool, gRPC, store)",
        split.iter().filter_map(|r| r.3).collect(),
    );
    md += &line(
        "last sighting stored → report at the follower (collector wait, decision)",
        split.iter().filter_map(|r| r.4).collect(),
    );
    if !unexpected.is_empty() {
        let mut verdicts: BTreeMap<String, usize> = BTreeMap::new();
        for u in &unexpected {
            let v: Value = serde_json::from_str(u).unwrap_or(Value::Null);
            let key = format!(
                "{} {} {}",
                v["verdict"].as_str().unwrap_or("?"),
                v["cause"].as_str().unwrap_or("?"),
                v["claimed_sender"].as_str().unwrap_or("?")
            );
            *verdicts.entry(key).or_default() += 1;
        }
        md += &format!("\nOther reports (not one of the resets made): {verdicts:?}\n");
        let path = lab.dir.with_extension("unexpected.jsonl");
        let _ = std::fs::write(&path, unexpected.join("\n"));
        md += &format!("(all in {})\n", path.display());
    }
    println!("{md}");
    if let Some(path) = &args.out {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(md.as_bytes())?;
        f.write_all(b"\n")?;
    }
    let _ = clean.join();
    drop(servers);
    drop((reports_follower, raw_follower));
    drop(agents);
    drop(collector);
    drop(lab);
    if missing > 0 {
        bail!("{missing} reset(s) got no report");
    }
    Ok(())
}

/// User + system CPU seconds of a process so far (0 when gone).
fn cpu_time_s(pid: &str) -> f64 {
    cpu_time(pid).map_or(0.0, |d| d.as_secs_f64())
}
