//! Runs `live-bench --smoke` (two namespaces, a veth, tcpreplay into a live agent) so the
//! live-capture benchmark keeps working. Benchmarks are not part of CI: without root, network
//! namespaces or `tcpreplay` (`apt-get install -y tcpreplay`) this prints `SKIPPED ...` and
//! passes, under `CI=true` too; `RSTSCOPE_LAB=skip` skips it on purpose.
//!
//! What it checks is not speed: the smoke capture (20000 packets) fits many times over in the
//! agent's 32 MiB capture ring, so at any rate the agent must read every packet tcpreplay sent
//! and libpcap must report no drop; the benchmark's report says so in its result line.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use rstscope_tests::machine::wait_bounded;

fn shout(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.write_all(b"\n");
}

/// `Some(reason)` when the smoke run cannot happen here.
fn skip_reason() -> Option<String> {
    if std::env::var("RSTSCOPE_LAB").as_deref() == Ok("skip") {
        return Some("RSTSCOPE_LAB=skip".into());
    }
    let tcpreplay = Command::new("tcpreplay").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !tcpreplay.is_ok_and(|s| s.success()) {
        return Some("tcpreplay not installed (apt-get install -y tcpreplay)".into());
    }
    rstscope_tests::lab::preflight().err().map(|e| format!("{e:#}"))
}

#[test]
fn live_bench_smoke_reads_every_replayed_packet() {
    if let Some(why) = skip_reason() {
        shout(&format!("SKIPPED live-bench smoke (tests/tests/live_bench_smoke.rs): {why}"));
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_live-bench"))
        .arg("--smoke")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start live-bench");
    // Bounded: building the agent (if stale) plus a few seconds of replay.
    let out = wait_bounded(child, Duration::from_secs(900)).expect("live-bench --smoke did not finish within 900 s");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    shout(&report);
    assert!(out.status.success(), "live-bench --smoke failed: {}", out.status);
    assert!(
        report.contains("**No loss at any rate tried"),
        "the agent missed packets or libpcap dropped some in a replay that fits its ring:\n{report}"
    );
    let rows = report.lines().filter(|l| l.starts_with("| ") && l.ends_with("| yes |")).count();
    assert_eq!(rows, 2, "expected two lossless steps (20k/s and top speed):\n{report}");
}
