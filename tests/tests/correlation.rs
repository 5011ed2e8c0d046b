//! Cross-vantage correlation on generated captures (`rstscope_tests::multigen`).
//!
//! * Every scenario is internally consistent and byte-for-byte deterministic.
//! * The agent, run on each vantage's file alone, reports exactly the RSTs that vantage captured
//!   (times, addresses, numbers, TTLs) with the local cause the table gives: this validates the
//!   captures themselves and needs no correlator.
//! * `rstscope analyze client=... server=... [mid=...] -o json` gives each RST the expected verdict,
//!   cause, `both_directions`, location and observing agents, and nothing on clean connections.
//!   Skipped (with a message) while the `rstscope` binary has no `analyze` subcommand, unless
//!   `RSTSCOPE_REQUIRE_ANALYZE` is set.
//! * Zeek's half-duplex SSH captures (one sensor per direction) analysed together give the same
//!   connections as the full capture.
//!
//! `RSTSCOPE_CLI` overrides the path of the `rstscope` binary (no build then); `RSTSCOPE_AGENT`
//! that of the agent.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use rstscope_tests::corpus::{parallel_map, raw_number_field, Agent, Corpus, Nanos};
use rstscope_tests::multigen::{scenarios, Scenario, Sighting};
use serde_json::Value;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("rstscope-correlation-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn socket(v: &Value, name: &str) -> Option<SocketAddr> {
    v.get(name)?.as_str()?.parse().ok()
}

fn describe_packet(s: &Scenario, index: usize) -> String {
    let p = &s.packets[index];
    format!("RST #{index} ({} from {:?})", p.flags, p.origin)
}

#[test]
fn scenarios_are_consistent_and_deterministic() {
    let all = scenarios();
    let problems: Vec<String> = all.iter().flat_map(Scenario::self_check).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let names: BTreeSet<&str> = all.iter().map(|s| s.name).collect();
    assert_eq!(names.len(), all.len(), "scenario names are unique");
    for s in &all {
        for v in &s.vantages {
            assert!(v.skew_ns.abs() <= 5_000_000_000, "{}: {} skew beyond 5 s", s.name, v.name);
        }
    }
    let (a, b) = (TempDir::new("det-a"), TempDir::new("det-b"));
    for s in &all {
        let (da, db) = (a.0.join(s.name), b.0.join(s.name));
        std::fs::create_dir_all(&da).unwrap();
        std::fs::create_dir_all(&db).unwrap();
        let fa = s.write(&da).unwrap();
        let again = rstscope_tests::multigen::scenario(s.name).unwrap();
        let fb = again.write(&db).unwrap();
        for ((_, pa), (_, pb)) in fa.iter().zip(&fb) {
            assert_eq!(std::fs::read(pa).unwrap(), std::fs::read(pb).unwrap(), "{}: {} differs", s.name, pa.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Each vantage alone, through the agent

/// An agent reset line, the fields compared with the model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct LocalReset {
    ts: i128,
    src: String,
    dst: String,
    flags: String,
    seq: u64,
    ack: u64,
    ttl: u64,
    cause: String,
}

fn expected_local(s: &Scenario, vantage: &str, sightings: &[Sighting]) -> Vec<LocalReset> {
    let mut out: Vec<LocalReset> = sightings
        .iter()
        .filter(|x| x.seg.flags.rst())
        .map(|x| {
            let cause = s
                .expect
                .iter()
                .find(|e| e.packet == x.packet)
                .and_then(|e| e.local_causes.iter().find(|(a, _)| *a == vantage))
                .map_or("(no expectation)", |(_, c)| *c);
            LocalReset {
                ts: i128::from(x.seg.ts_ns),
                src: x.seg.src.to_string(),
                dst: x.seg.dst.to_string(),
                flags: x.seg.flags.to_string(),
                seq: u64::from(x.seg.seq),
                ack: u64::from(x.seg.ack),
                ttl: u64::from(x.seg.ttl),
                cause: cause.to_string(),
            }
        })
        .collect();
    out.sort();
    out
}

fn run_agent(agent: &Agent, capture: &Path) -> Result<Vec<LocalReset>, String> {
    let out = Command::new(&agent.exe)
        .arg("--read")
        .arg(capture)
        .args(["--output", "json"])
        .output()
        .map_err(|e| format!("cannot run the agent: {e}"))?;
    if !out.status.success() {
        return Err(format!("agent exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let mut resets = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
        match v.get("type").and_then(Value::as_str) {
            Some("reset") => {
                let ts = raw_number_field(line, "ts").and_then(|t| Nanos::parse(&t)).ok_or(format!("ts in {line}"))?;
                let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX);
                resets.push(LocalReset {
                    ts: ts.0,
                    src: text("src"),
                    dst: text("dst"),
                    flags: text("flags"),
                    seq: num("seq"),
                    ack: num("ack"),
                    ttl: num("ttl"),
                    cause: text("cause"),
                });
            }
            Some("stats") => {
                let skipped = v.get("skipped").and_then(Value::as_object).map_or(0, |m| m.len());
                let errors = v.get("errors").and_then(Value::as_array).map_or(0, |a| a.len());
                if skipped + errors > 0 {
                    return Err(format!("the agent skipped packets or hit errors: {line}"));
                }
            }
            _ => {}
        }
    }
    resets.sort();
    Ok(resets)
}

#[test]
fn each_vantage_alone_shows_its_rsts_with_the_local_cause() {
    let agent = Agent::locate_or_build();
    let tmp = TempDir::new("agent");
    let all = scenarios();
    let mut jobs = Vec::new();
    for s in &all {
        let dir = tmp.0.join(s.name);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, path) in s.write(&dir).unwrap() {
            jobs.push((s, name, path));
        }
    }
    let results = parallel_map(&jobs, |(s, name, path)| {
        let v = s.vantage(name).expect("vantage");
        let want = expected_local(s, name, &s.sightings(v));
        match run_agent(&agent, path) {
            Err(e) => vec![format!("{} / {name}: {e}", s.name)],
            Ok(got) if got == want => Vec::new(),
            Ok(got) => vec![format!("{} / {name}:\n  expected {want:#?}\n  got {got:#?}", s.name)],
        }
    });
    let problems: Vec<String> = results.into_iter().flatten().collect();
    assert!(problems.is_empty(), "{} vantages disagree:\n{}", problems.len(), problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// All vantages together, through `rstscope analyze`

/// The `rstscope` CLI next to this test binary, built (same profile) when missing or older than
/// the sources it depends on; `RSTSCOPE_CLI` overrides. `None` when it has no `analyze` yet.
fn rstscope_cli() -> Option<PathBuf> {
    let exe = match std::env::var_os("RSTSCOPE_CLI") {
        Some(exe) => PathBuf::from(exe),
        None => {
            rstscope_tests::corpus::workspace_binary("rstscope-collector", "rstscope", &["collector", "agent", "proto"])
        }
    };
    let help = Command::new(&exe).args(["analyze", "--help"]).output().expect("run rstscope");
    if help.status.success() {
        return Some(exe);
    }
    let msg = format!("`rstscope analyze` is not available yet ({}); skipping", String::from_utf8_lossy(&help.stderr));
    assert!(std::env::var_os("RSTSCOPE_REQUIRE_ANALYZE").is_none(), "{msg}");
    eprintln!("{msg}");
    None
}

/// What `rstscope analyze -o json` printed.
#[derive(Debug, Default)]
struct Analysis {
    resets: Vec<Value>,
    summary: Option<Value>,
    agents: Vec<Value>,
    problems: Vec<String>,
}

fn analyze(cli: &Path, files: &[(&str, PathBuf)]) -> Analysis {
    let mut cmd = Command::new(cli);
    cmd.arg("analyze");
    for (name, path) in files {
        cmd.arg(format!("{name}={}", path.display()));
    }
    cmd.args(["-o", "json"]);
    let mut a = Analysis::default();
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            a.problems.push(format!("cannot run {cmd:?}: {e}"));
            return a;
        }
    };
    if !out.status.success() {
        a.problems.push(format!("exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Err(e) => a.problems.push(format!("not JSON ({e}): {line}")),
            Ok(v) => match v.get("type").and_then(Value::as_str) {
                Some("reset") => a.resets.push(v),
                Some("summary") => a.summary = Some(v),
                Some("agent") => a.agents.push(v),
                _ => {}
            },
        }
    }
    if a.summary.is_none() {
        a.problems.push("no summary line".into());
    }
    a
}

/// Whether `obs` (one observation of a merged reset) is packet `s` as vantage `agent` saw it.
fn observation_is(obs: &Value, agent: &str, s: &Sighting) -> bool {
    let num = |k: &str| obs.get(k).and_then(Value::as_u64);
    obs.get("agent").and_then(Value::as_str) == Some(agent)
        && num("seq") == Some(u64::from(s.seg.seq))
        && num("ack") == Some(u64::from(s.seg.ack))
        && obs.get("flags").and_then(Value::as_str) == Some(s.seg.flags.to_string().as_str())
        && socket(obs, "src").map(|a| a.to_string()) == Some(s.seg.src.to_string())
        && socket(obs, "dst").map(|a| a.to_string()) == Some(s.seg.dst.to_string())
}

fn observation_agents(reset: &Value) -> BTreeSet<String> {
    reset
        .get("observations")
        .and_then(Value::as_array)
        .map(|obs| obs.iter().filter_map(|o| o.get("agent")?.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn brief(reset: &Value) -> String {
    let f = |k: &str| reset.get(k).map_or("?".to_string(), |v| v.to_string());
    format!(
        "verdict {} cause {} both_directions {} location {} match_key {} agents {:?}; evidence {}",
        f("verdict"),
        f("cause"),
        f("both_directions"),
        f("location"),
        f("match_key"),
        observation_agents(reset),
        f("evidence")
    )
}

/// Every disagreement between the scenario's table and what `analyze` printed.
fn check_scenario(s: &Scenario, a: &Analysis) -> Vec<String> {
    let mut out: Vec<String> = a.problems.iter().map(|p| format!("{}: {p}", s.name)).collect();
    let mut used = vec![false; a.resets.len()];
    for e in &s.expect {
        let what = describe_packet(s, e.packet);
        let sightings: Vec<(&str, Sighting)> =
            s.vantages.iter().filter_map(|v| s.sighting(v, &s.packets[e.packet]).map(|x| (v.name, x))).collect();
        let found = a.resets.iter().position(|r| {
            r.get("observations")
                .and_then(Value::as_array)
                .is_some_and(|obs| obs.iter().any(|o| sightings.iter().any(|(agent, x)| observation_is(o, agent, x))))
        });
        let Some(i) = found else {
            out.push(format!("{}: {what}: expected a reset line ({} {}), got none", s.name, e.verdict, e.cause));
            continue;
        };
        if used[i] {
            out.push(format!("{}: {what}: merged into the same reset line as another RST", s.name));
        }
        used[i] = true;
        let r = &a.resets[i];
        let mut diffs = Vec::new();
        let verdict = r.get("verdict").and_then(Value::as_str).unwrap_or("(none)");
        if !e.verdict.allows(verdict) {
            diffs.push(format!("verdict: expected {}, got {verdict}", e.verdict));
        }
        let cause = r.get("cause").and_then(Value::as_str).unwrap_or("(none)");
        if cause != e.cause {
            diffs.push(format!("cause: expected {}, got {cause}", e.cause));
        }
        let both = r.get("both_directions").and_then(Value::as_bool);
        if both != Some(e.both_directions) {
            diffs.push(format!("both_directions: expected {}, got {both:?}", e.both_directions));
        }
        let agents = observation_agents(r);
        let want: BTreeSet<String> = e.seen_by.iter().map(|a| a.to_string()).collect();
        if agents != want {
            diffs.push(format!("observations from {agents:?}, expected {want:?}"));
        }
        if let Some(names) = &e.location {
            let loc = r.get("location").and_then(Value::as_str).unwrap_or("");
            if !names.iter().all(|n| loc.contains(n)) {
                diffs.push(format!("location {loc:?} should name {names:?}"));
            }
        }
        if let Some(keys) = &e.match_key {
            let key = r.get("match_key").and_then(Value::as_str).unwrap_or("(none)");
            if !keys.contains(&key) {
                diffs.push(format!("match_key: expected one of {keys:?}, got {key}"));
            }
        }
        if !diffs.is_empty() {
            out.push(format!("{}: {what} ({}): {}\n    got: {}", s.name, e.why, diffs.join("; "), brief(r)));
        }
    }
    for (r, used) in a.resets.iter().zip(used) {
        if !used {
            out.push(format!("{}: unexpected reset line: {}\n    {r}", s.name, brief(r)));
        }
    }
    if let Some(sum) = &a.summary {
        let connections = sum.get("connections").and_then(Value::as_u64);
        if connections != Some(s.expected_connections() as u64) {
            out.push(format!(
                "{}: summary connections: expected {}, got {connections:?}",
                s.name,
                s.expected_connections()
            ));
        }
        let resets = sum.get("resets").and_then(Value::as_u64);
        if resets != Some(s.expect.len() as u64) {
            out.push(format!("{}: summary resets: expected {}, got {resets:?}", s.name, s.expect.len()));
        }
    }
    out
}

#[test]
fn analyze_gives_every_rst_its_expected_verdict() {
    let Some(cli) = rstscope_cli() else {
        return;
    };
    let tmp = TempDir::new("analyze");
    let all = scenarios();
    let results = parallel_map(&all, |s| {
        let dir = tmp.0.join(s.name);
        std::fs::create_dir_all(&dir).unwrap();
        let files = s.write(&dir).unwrap();
        check_scenario(s, &analyze(&cli, &files))
    });
    let problems: Vec<String> = results.into_iter().flatten().collect();
    assert!(problems.is_empty(), "{} disagreements with the scenario table:\n{}", problems.len(), problems.join("\n"));
}

/// A named capture that cannot be read fails the analysis with its name, rather than turning
/// every RST it should have seen into `unverified`.
#[test]
fn analyze_refuses_when_a_named_capture_cannot_be_read() {
    let Some(cli) = rstscope_cli() else {
        return;
    };
    let tmp = TempDir::new("analyze-missing");
    let s = &scenarios()[0];
    let files = s.write(&tmp.0).unwrap();
    let good = format!("{}={}", files[0].0, files[0].1.display());
    let out = Command::new(&cli)
        .args(["analyze", &good, "typo=/nonexistent/rstscope/server.pcap"])
        .output()
        .expect("run rstscope");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused: {stderr}");
    assert!(stderr.contains("cannot read the capture of typo"), "{stderr}");
    assert!(out.stdout.is_empty(), "no one-sided analysis printed: {}", String::from_utf8_lossy(&out.stdout));
}

/// Distinct (orig, resp) endpoint pairs among the agent's flow records of `capture`.
fn agent_tuples(agent: &Agent, capture: &Path) -> BTreeSet<(String, String)> {
    let run = agent.run(capture, false);
    assert!(run.success, "agent failed on {}: {}", capture.display(), run.problems());
    run.flows.iter().map(|f| (f.key.orig.to_string(), f.key.resp.to_string())).collect()
}

#[test]
fn half_duplex_ssh_sensors_together_equal_the_full_capture() {
    let Some(corpus) = Corpus::require() else {
        return;
    };
    let Some(cli) = rstscope_cli() else {
        return;
    };
    let agent = Agent::locate_or_build();
    let full = corpus.path("zeek/ssh/ssh.pcap");
    let client = corpus.path("zeek/ssh/ssh.client-side-half-duplex.pcap");
    let server = corpus.path("zeek/ssh/ssh.server-side-half-duplex.pcap");
    // The half-duplex files hold the same 20 connections (each sensor one direction); ssh.pcap
    // holds those and 3 more (one of them with the only 2 RSTs), 23 in all.
    let (tc, ts, tf) = (agent_tuples(&agent, &client), agent_tuples(&agent, &server), agent_tuples(&agent, &full));
    let pair: BTreeSet<_> = tc.union(&ts).cloned().collect();
    assert_eq!((tc.len(), ts.len(), pair.len(), tf.len()), (20, 20, 20, 23));
    assert!(pair.is_subset(&tf));

    let together = analyze(&cli, &[("client", client), ("server", server)]);
    let alone = analyze(&cli, &[("ssh", full)]);
    let mut problems: Vec<String> = together.problems.iter().chain(&alone.problems).cloned().collect();
    let connections = |a: &Analysis| a.summary.as_ref().and_then(|s| s.get("connections")?.as_u64());
    if connections(&together) != Some(pair.len() as u64) {
        problems.push(format!(
            "half-duplex pair: {:?} connections, expected {} (each connection seen one way by each sensor is one)",
            connections(&together),
            pair.len()
        ));
    }
    if connections(&alone) != Some(tf.len() as u64) {
        problems.push(format!("ssh.pcap alone: {:?} connections, expected {}", connections(&alone), tf.len()));
    }
    if !together.resets.is_empty() {
        problems.push(format!("half-duplex pair: unexpected resets: {:?}", together.resets));
    }
    // ssh.pcap's two RSTs (192.168.2.158:2200 -> 192.168.2.1:55179) have a single agent: unverified.
    let verdicts: Vec<(String, String)> = alone
        .resets
        .iter()
        .map(|r| {
            let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
            (s("claimed_sender"), s("verdict"))
        })
        .collect();
    let want = vec![("192.168.2.158:2200".to_string(), "unverified".to_string()); 2];
    if verdicts != want {
        problems.push(format!("ssh.pcap alone: resets {verdicts:?}, expected {want:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
