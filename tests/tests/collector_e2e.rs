//! The whole pipeline with real processes: a `rstscope-collector` on loopback with a real sled
//! directory, two `rstscope-agent`s replaying captures into it, and the `rstscope` CLI reading
//! back. Every RST the agents report offline must come back exactly once; a collector killed
//! with SIGKILL in the middle and restarted must lose and duplicate nothing.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rstscope_tests::corpus::Agent;
use rstscope_tests::frames::write_pcap;
use serde_json::Value;

/// Binaries of the workspace, next to the agent's.
fn bin(name: &str) -> PathBuf {
    let agent = Agent::locate_or_build().exe;
    let path = agent.with_file_name(name);
    if !path.is_file() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&workspace)
            .args(["build", "-p", "rstscope-collector", "--bins"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "building rstscope-collector failed");
    }
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

fn wait_with_timeout(mut child: Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("poll child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("child output")
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
    let out = Command::new(bin("rstscope")).args(["--collector", url, "resets", "-o", "json"]).output().unwrap();
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
