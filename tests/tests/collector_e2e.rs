//! The whole pipeline with real processes: a `rstscope-collector` on loopback with a real sled
//! directory, two `rstscope-agent`s replaying captures into it, and the `rstscope` CLI reading
//! back. Every RST the agents report offline must come back exactly once; a collector killed
//! with SIGKILL in the middle and restarted must lose and duplicate nothing.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rstscope_tests::corpus::Agent;
use rstscope_tests::frames::write_pcap;
use rstscope_tests::machine::wait_bounded;
use serde_json::Value;

/// Binaries of the workspace, next to the agent's. The collector's are built (or found up to
/// date) once per test run: `cargo test -p rstscope-tests` does not build another package's
/// binaries, and a stale collector would test old code.
fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let agent = Agent::locate_or_build().exe;
    let path = agent.with_file_name(name);
    BUILT.get_or_init(|| {
        let profile_dir = agent.parent().expect("agent in <target>/<profile>");
        let status = rstscope_tests::build::cargo_build(profile_dir, &["-p", "rstscope-collector", "--bins"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "building rstscope-collector failed");
    });
    path
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rstscope-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A collector process, killed when dropped.
struct Collector {
    child: Child,
    url: String,
}

impl Collector {
    fn start(data_dir: &Path, port: u16) -> Collector {
        let child = Command::new(bin("rstscope-collector"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start collector");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "collector did not listen on {port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Collector { child, url }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_with_timeout(child: Child, secs: u64) -> Output {
    wait_bounded(child, Duration::from_secs(secs)).unwrap_or_else(|| panic!("process did not finish within {secs} s"))
}

fn agent_send(capture: &Path, url: &str, name: &str, state: &Path) -> Output {
    let child = Command::new(Agent::locate_or_build().exe)
        .arg("--read")
        .arg(capture)
        .args(["--collector", url, "--name", name])
        .arg("--state-dir")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent");
    wait_with_timeout(child, 120)
}

fn offline_resets(capture: &Path) -> Vec<Value> {
    let out =
        Command::new(Agent::locate_or_build().exe).arg("--read").arg(capture).args(["-o", "json"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "reset")
        .collect()
}

fn cli_resets(url: &str) -> Vec<Value> {
    let out =
        Command::new(bin("rstscope")).args(["--collector", url, "resets", "--raw", "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "rstscope resets failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect()
}

/// (agent, ts, src, dst, seq, ack) of each reset, counted.
fn multiset<'a>(agent: &str, resets: impl IntoIterator<Item = &'a Value>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in resets {
        let agent = r.get("agent").and_then(Value::as_str).unwrap_or(agent);
        let key = format!("{agent} {} {} {} {} {}", r["ts"], r["src"], r["dst"], r["seq"], r["ack"]);
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

fn ladder(resets: usize, seed: u16) -> String {
    let mut text = String::new();
    for i in 0..resets {
        let port = 20000 + seed * 1000 + i as u16;
        let t = i * 10;
        text += &format!("{t}ms > S cport={port}\n{t}.3ms < RA\n");
    }
    text
}

#[test]
fn two_agents_into_one_collector_every_reset_exactly_once() {
    let scratch = Scratch::new("two");
    let a = scratch.path("a.pcap");
    let b = scratch.path("b.pcap");
    write_pcap(&a, &rstscope_agent::trace::parse(&ladder(300, 1)).unwrap()).unwrap();
    write_pcap(&b, &rstscope_agent::trace::parse(&ladder(200, 2)).unwrap()).unwrap();
    let collector = Collector::start(&scratch.path("data"), free_port());
    for (capture, name) in [(&a, "agent-a"), (&b, "agent-b")] {
        let out = agent_send(capture, &collector.url, name, &scratch.path(&format!("state-{name}")));
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut expected = multiset("agent-a", offline_resets(&a).iter());
    expected.extend(multiset("agent-b", offline_resets(&b).iter()));
    let got = multiset("?", cli_resets(&collector.url).iter());
    assert_eq!(got.len(), 500);
    assert_eq!(got, expected);
}

#[test]
fn a_collector_killed_mid_ingest_loses_and_duplicates_nothing() {
    let scratch = Scratch::new("kill");
    let capture = scratch.path("big.pcap");
    write_pcap(&capture, &rstscope_agent::trace::parse(&ladder(3000, 3)).unwrap()).unwrap();
    let port = free_port();
    let data = scratch.path("data");
    let collector = Collector::start(&data, port);
    let url = collector.url.clone();
    let agent = Command::new(Agent::locate_or_build().exe)
        .arg("--read")
        .arg(&capture)
        .args(["--collector", &url, "--name", "victim"])
        .arg("--state-dir")
        .arg(scratch.path("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent");
    // Kill the collector while the agent is sending, then bring it back on the same port.
    std::thread::sleep(Duration::from_millis(300));
    collector.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let collector = Collector::start(&data, port);
    let out = wait_with_timeout(agent, 180);
    assert!(out.status.success(), "agent: {}", String::from_utf8_lossy(&out.stderr));
    let expected = multiset("victim", offline_resets(&capture).iter());
    let got = multiset("?", cli_resets(&collector.url).iter());
    assert_eq!(got.values().filter(|&&n| n > 1).count(), 0, "duplicates stored");
    assert_eq!(got, expected);
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing running.
struct Running(Option<Child>);

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        Running(Some(cmd.spawn().expect("start process")))
    }

    fn is_running(&mut self) -> bool {
        self.0.as_mut().is_some_and(|c| c.try_wait().expect("poll child").is_none())
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn finish(mut self, secs: u64) -> Output {
        wait_with_timeout(self.0.take().expect("child"), secs)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `rstscope-agent --read capture --collector url --name name --state-dir state`, diagnostics
/// to `log` (a file: a pipe nobody reads could fill up and stall the agent).
fn agent_cmd(capture: &Path, url: &str, name: &str, state: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(Agent::locate_or_build().exe);
    cmd.arg("--read")
        .arg(capture)
        .args(["--collector", url, "--name", name])
        .arg("--state-dir")
        .arg(state)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("agent log"));
    cmd
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The offline agent's records of a capture: (resets, flows).
fn offline_records(capture: &Path) -> (Vec<Value>, usize) {
    let out =
        Command::new(Agent::locate_or_build().exe).arg("--read").arg(capture).args(["-o", "json"]).output().unwrap();
    let records: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect();
    let flows = records.iter().filter(|v| v["type"] == "flow").count();
    (records.into_iter().filter(|v| v["type"] == "reset").collect(), flows)
}

/// The collector's record of agent `name` (`rstscope agents -o json`), if it knows it.
fn cli_agent(url: &str, name: &str) -> Option<Value> {
    let out = Command::new(bin("rstscope")).args(["--collector", url, "agents", "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "rstscope agents failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["name"] == name)
}

fn stored_events(url: &str, name: &str) -> u64 {
    cli_agent(url, name).and_then(|a| a["events"].as_u64()).unwrap_or(0)
}

/// `GET /metrics` from an agent's `--metrics` address, as name -> value (bounded: 5 s).
fn scrape(port: u16) -> Option<BTreeMap<String, f64>> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, value)| (name.to_string(), value.trim().parse().expect("metric value")))
            .collect(),
    )
}

/// Scrapes until `ready` holds (bounded: 30 s).
fn scrape_until(port: u16, ready: impl Fn(&BTreeMap<String, f64>) -> bool) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = scrape(port);
        if let Some(m) = metrics.as_ref().filter(|m| ready(m)) {
            return m.clone();
        }
        assert!(Instant::now() < deadline, "metrics not as expected within 30 s: {metrics:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes of the agent's spool segments.
fn spool_bytes(state: &Path) -> u64 {
    std::fs::read_dir(state.join("spool"))
        .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Waits until the spool has data and has not grown for a second (the agent has read its input
/// and everything went to disk, as the collector is down); bounded to 60 s.
fn wait_for_spool_to_settle(state: &Path, agent: &mut Running, log: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        assert!(agent.is_running(), "the agent ended while the collector was down: {}", log_text(log));
        assert!(Instant::now() < deadline, "the spool did not settle within 60 s ({last} bytes)");
        let bytes = spool_bytes(state);
        if bytes != last {
            (last, since) = (bytes, Instant::now());
        } else if bytes > 0 && since.elapsed() >= Duration::from_secs(1) {
            return bytes;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_agent_killed_mid_file_and_run_again_stores_every_event_once() {
    let scratch = Scratch::new("agent-restart");
    let capture = scratch.path("big.pcap");
    write_pcap(&capture, &rstscope_agent::trace::parse(&ladder(20_000, 4)).unwrap()).unwrap();
    let (resets, flows) = offline_records(&capture);
    let produced = (resets.len() + flows) as u64;
    let collector = Collector::start(&scratch.path("data"), free_port());
    let (state, log) = (scratch.path("state"), scratch.path("agent.log"));
    let mut agent = Running::spawn(&mut agent_cmd(&capture, &collector.url, "restarted", &state, &log));
    // kill -9 once the collector holds part of the file.
    let deadline = Instant::now() + Duration::from_secs(120);
    let stored_at_kill = loop {
        let stored = stored_events(&collector.url, "restarted");
        if stored > 0 {
            break stored;
        }
        assert!(agent.is_running(), "the agent ended before anything was stored: {}", log_text(&log));
        assert!(Instant::now() < deadline, "nothing stored within 120 s: {}", log_text(&log));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(agent.is_running(), "the agent finished before it could be killed mid-file");
    agent.kill9();
    assert!(stored_at_kill < produced, "{stored_at_kill} of {produced} events were stored before the kill");
    // The same file and state directory again: the spool resends what it held, the file is
    // read from the start, and the collector keeps each event once.
    let out = Running::spawn(&mut agent_cmd(&capture, &collector.url, "restarted", &state, &log)).finish(180);
    assert!(out.status.success(), "second run: {}", log_text(&log));
    let got = multiset("?", cli_resets(&collector.url).iter());
    assert_eq!(got.values().filter(|&&n| n > 1).count(), 0, "duplicates stored");
    assert_eq!(got, multiset("restarted", resets.iter()));
    assert_eq!(stored_events(&collector.url, "restarted"), produced, "resets and flows stored once each");
}

#[test]
fn a_collector_down_for_the_whole_run_gets_everything_once_when_it_comes_up() {
    let scratch = Scratch::new("collector-late");
    let capture = scratch.path("big.pcap");
    // 70,000 events: more than the agent's in-memory queue holds (64 batches of 1000).
    write_pcap(&capture, &rstscope_agent::trace::parse(&ladder(35_000, 0)).unwrap()).unwrap();
    let (resets, flows) = offline_records(&capture);
    let (port, data) = (free_port(), scratch.path("data"));
    let (state, log) = (scratch.path("state"), scratch.path("agent.log"));
    let url = format!("http://127.0.0.1:{port}");
    let metrics_port = free_port();
    let mut cmd = agent_cmd(&capture, &url, "patient", &state, &log);
    let mut agent =
        Running::spawn(cmd.args(["--ack-timeout", "150", "--metrics", &format!("127.0.0.1:{metrics_port}")]));
    let spooled = wait_for_spool_to_settle(&state, &mut agent, &log);
    assert!(spooled > 1 << 20, "only {spooled} bytes spooled");
    // The agent's metrics while it waits for the collector.
    let produced = (resets.len() + flows) as f64;
    let m = scrape_until(metrics_port, |m| m.get("rstscope_agent_events_total") == Some(&produced));
    assert_eq!(m["rstscope_agent_packets_total"], 70_000.0, "{m:?}");
    assert_eq!(m["rstscope_agent_batches_acked_total"], 0.0, "{m:?}");
    assert!(m["rstscope_agent_spool_bytes"] >= spooled as f64 * 0.9, "{m:?} vs {spooled} bytes on disk");
    assert_eq!(m["rstscope_agent_events_dropped_total"], 0.0, "{m:?}");
    assert_eq!(m["rstscope_agent_capture_drops_total"], 0.0, "{m:?}");
    let collector = Collector::start(&data, port);
    let out = agent.finish(180);
    assert!(out.status.success(), "agent: {}", log_text(&log));
    let got = multiset("?", cli_resets(&collector.url).iter());
    assert_eq!(got.values().filter(|&&n| n > 1).count(), 0, "duplicates stored");
    assert_eq!(got, multiset("patient", resets.iter()));
    assert_eq!(stored_events(&collector.url, "patient"), (resets.len() + flows) as u64);
    assert_eq!(spool_bytes(&state), 0, "acknowledged segments are deleted");
}

#[test]
fn a_full_spool_drops_counted_events_and_says_so() {
    let scratch = Scratch::new("spool-cap");
    let capture = scratch.path("big.pcap");
    write_pcap(&capture, &rstscope_agent::trace::parse(&ladder(20_000, 5)).unwrap()).unwrap();
    let (resets, flows) = offline_records(&capture);
    let produced = (resets.len() + flows) as u64;
    let (port, data) = (free_port(), scratch.path("data"));
    let (state, log) = (scratch.path("state"), scratch.path("agent.log"));
    let url = format!("http://127.0.0.1:{port}");
    let metrics_port = free_port();
    let mut cmd = agent_cmd(&capture, &url, "cramped", &state, &log);
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut agent =
        Running::spawn(cmd.args(["--spool-max-mib", "1", "--ack-timeout", "150", "--metrics", &metrics_addr]));
    let spooled = wait_for_spool_to_settle(&state, &mut agent, &log);
    assert!(spooled <= 2 << 20, "{spooled} bytes in a 1 MiB spool (plus 1 MiB for loss reports)");
    let m = scrape_until(metrics_port, |m| m.get("rstscope_agent_events_total") == Some(&(produced as f64)));
    let dropped_by_agent = m["rstscope_agent_events_dropped_total"];
    assert!(dropped_by_agent > 0.0, "{m:?}");
    let collector = Collector::start(&data, port);
    let out = agent.finish(180);
    assert!(out.status.success(), "agent: {}", log_text(&log));
    assert!(log_text(&log).contains("events dropped because the spool was full"), "{}", log_text(&log));
    let record = cli_agent(&collector.url, "cramped").expect("the collector knows the agent");
    let (stored, dropped) = (record["events"].as_u64().unwrap(), record["events_dropped"].as_u64().unwrap());
    assert!(dropped > 0 && stored > 0, "stored {stored}, dropped {dropped}");
    assert_eq!(stored + dropped, produced, "every produced event is either stored or counted as dropped");
    assert_eq!(dropped as f64, dropped_by_agent, "the collector was told exactly what the agent dropped");
    let got = multiset("?", cli_resets(&collector.url).iter());
    assert_eq!(got.values().filter(|&&n| n > 1).count(), 0, "duplicates stored");
    let expected = multiset("cramped", resets.iter());
    assert!(got.keys().all(|k| expected.contains_key(k)), "only produced resets are stored");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

#[test]
fn a_live_agent_sends_watermarks_and_resets_while_it_runs() {
    if !is_root() {
        eprintln!("SKIPPED a_live_agent_sends_watermarks_and_resets_while_it_runs: live capture needs root");
        return;
    }
    let scratch = Scratch::new("live");
    let collector = Collector::start(&scratch.path("data"), free_port());
    // A port nobody listens on: bind an ephemeral one, then close it.
    let port = free_port();
    let metrics_port = free_port();
    let (state, log) = (scratch.path("state"), scratch.path("agent.log"));
    let mut agent = Running::spawn(
        Command::new(Agent::locate_or_build().exe)
            .args(["--interface", "lo", "--filter", &format!("tcp port {port}"), "--duration", "40"])
            .args(["--collector", &collector.url, "--name", "live"])
            .arg("--state-dir")
            .arg(&state)
            .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log")),
    );
    // Capture is open once the metrics answer (they are served after the interface opened).
    scrape_until(metrics_port, |_| true);
    if !agent.is_running() && log_text(&log).contains("ermission") {
        eprintln!("SKIPPED a_live_agent_sends_watermarks_and_resets_while_it_runs: {}", log_text(&log));
        return;
    }
    std::thread::sleep(Duration::from_millis(500));
    let knocked = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let refused = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500));
    assert!(refused.is_err(), "nothing should listen on port {port}");
    // No more packets: only the idle clock settles the RST, and only the periodic watermark
    // tells the collector how far the agent got. Both must arrive while the agent still runs.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        assert!(agent.is_running(), "the agent stopped early: {}", log_text(&log));
        // Resets first, then the agent: the agent holds its watermark below an RST it has not
        // sent yet, so a watermark read before the RST landed may stop just short of it.
        let resets = cli_resets(&collector.url);
        let record = cli_agent(&collector.url, "live");
        let watermark = record.as_ref().and_then(|r| r["watermark"].as_f64()).unwrap_or(0.0);
        if let [reset] = resets.as_slice() {
            assert_eq!(reset["cause"], "refused");
            assert!(reset["ts"].as_f64().unwrap() >= knocked, "{reset:#?}");
            if reset["ts"].as_f64().unwrap() <= watermark {
                break;
            }
        }
        assert!(resets.len() <= 1, "{resets:#?}");
        assert!(Instant::now() < deadline, "no watermark past the RST within 25 s: {record:?}, {resets:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // The RST leaves once settled (2 s), its connection's summary once the record lingered out
    // (5 s): wait for both.
    let m = scrape_until(metrics_port, |m| {
        m.get("rstscope_agent_batches_acked_total").is_some_and(|&n| n >= 1.0)
            && m.get("rstscope_agent_events_total").is_some_and(|&n| n >= 2.0)
    });
    assert!(m["rstscope_agent_packets_total"] >= 2.0, "{m:?}");
    assert!(m["rstscope_agent_events_total"] >= 2.0, "{m:?}");
    assert_eq!(m["rstscope_agent_capture_drops_total"], 0.0, "{m:?}");
}

/// A second collector started on the data directory another one holds names the directory and
/// says what holds it (not sled's lock error), exits with a failure, and leaves the first alone.
#[test]
fn a_second_collector_on_a_data_directory_in_use_says_so() {
    let scratch = Scratch::new("locked");
    let data = scratch.path("data");
    let first = Collector::start(&data, free_port());
    let second = Command::new(bin("rstscope-collector"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start collector");
    let out = wait_with_timeout(second, 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is in use by another rstscope-collector (or another process)", data.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("could not acquire lock"), "{stderr}");
    let status = Command::new(bin("rstscope")).args(["--collector", &first.url, "status"]).output().unwrap();
    assert!(status.status.success(), "the first collector still answers: {}", String::from_utf8_lossy(&status.stderr));
}

/// `rstscope resets --follow` exits 3 (collector unreachable) when the collector it follows is
/// killed: the stream is known to be open once the stored reset came through it.
#[test]
fn following_a_collector_that_is_killed_exits_3() {
    let scratch = Scratch::new("follow-kill");
    let capture = scratch.path("one.pcap");
    write_pcap(&capture, &rstscope_agent::trace::parse(&ladder(1, 6)).unwrap()).unwrap();
    let collector = Collector::start(&scratch.path("data"), free_port());
    let sent = agent_send(&capture, &collector.url, "edge", &scratch.path("state"));
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let mut follow = Command::new(bin("rstscope"))
        .args(["--collector", &collector.url, "resets", "--raw", "--follow", "-o", "compact"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rstscope");
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30));
    assert!(
        matches!(first, Ok(Ok(ref line)) if line.contains(" edge ")),
        "the stored reset was not followed: {first:?}"
    );
    collector.kill9();
    let out =
        wait_bounded(follow, Duration::from_secs(30)).expect("rstscope ended within 30 s of the collector's death");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("lost the connection to the collector at http://127.0.0.1:"), "{stderr}");
}

/// `analyze -o compact` prints one line per reset, like `resets -o compact`: no vantage table,
/// no summary.
#[test]
fn analyze_compact_prints_only_the_reset_lines() {
    let scratch = Scratch::new("analyze-compact");
    let capture = scratch.path("both.pcap");
    write_pcap(&capture, &rstscope_agent::trace::parse(&ladder(3, 8)).unwrap()).unwrap();
    let run = |format: &str| {
        let out = Command::new(bin("rstscope"))
            .arg("analyze")
            .arg(format!("client={}", capture.display()))
            .arg(format!("server={}", capture.display()))
            .args(["-o", format])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let json = run("json");
    let verdicts: Vec<String> = json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "reset")
        .map(|v| v["verdict"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(verdicts.len(), 3, "{json}");
    let compact = run("compact");
    let lines: Vec<&str> = compact.lines().collect();
    assert_eq!(lines.len(), 3, "{compact}");
    for (line, verdict) in lines.iter().zip(&verdicts) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert!(fields[0].parse::<f64>().is_ok() && fields[1] == verdict, "{line}");
        assert!(line.ends_with("[client,server]") || line.ends_with("[server,client]"), "{line}");
    }
}

/// Every named capture is opened before any is analysed: a missing one named last fails the
/// run (exit 1, naming it) without the others being read first.
#[test]
fn analyze_checks_every_capture_before_reading_any() {
    let scratch = Scratch::new("analyze-missing");
    let cut = scratch.path("cut.pcap");
    write_pcap(&cut, &rstscope_agent::trace::parse(&ladder(3, 9)).unwrap()).unwrap();
    let bytes = std::fs::read(&cut).unwrap();
    // Reading it, not opening it, meets the cut: a message says so when it is read.
    std::fs::write(&cut, &bytes[..bytes.len() - 20]).unwrap();
    let out = Command::new(bin("rstscope"))
        .arg("analyze")
        .arg(format!("client={}", cut.display()))
        .arg(format!("server={}", scratch.path("missing.pcap").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rstscope: server: ") && stderr.contains("missing.pcap"), "{stderr}");
    assert!(stderr.contains("cannot read the capture of server; leave it out"), "{stderr}");
    assert!(!stderr.contains("truncated at byte"), "the client capture was read: {stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}
