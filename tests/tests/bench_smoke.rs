//! Runs `bench --smoke` (the agent benchmark on 10000-packet captures, one run each) so the
//! benchmark keeps working between the times someone runs it for real. Speed is not checked:
//! benchmarks are not tests. What is checked is that every section of the report is written,
//! and that stage c (the agent's own two-thread loop) and stage t (its tracker alone) report
//! exactly the RST packets the generator wrote into each capture.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use rstscope_tests::machine::wait_bounded;

/// The number in `text` right before `what` (as in "137000 RST packets").
fn count_before(text: &str, what: &str) -> Option<u64> {
    let at = text.find(what)?;
    text[..at].split_whitespace().last()?.trim_start_matches('(').parse().ok()
}

#[test]
fn agent_bench_smoke_run_writes_every_section() {
    let dir = std::env::temp_dir().join(format!("rstscope-bench-smoke-{}", std::process::id()));
    let report_path: PathBuf = dir.join("report.md");
    let child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--smoke", "--no-profile", "--dir"])
        .arg(dir.join("captures"))
        .arg("--out")
        .arg(&report_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bench");
    let finished = wait_bounded(child, Duration::from_secs(600));
    let report = std::fs::read_to_string(&report_path);
    let _ = std::fs::remove_dir_all(&dir);
    let out = finished.expect("bench --smoke did not finish within 600 s");
    assert!(out.status.success(), "bench --smoke failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let report = report.expect("bench --smoke wrote no report");

    for section in ["## Machine and command", "## Targets", "## Throughput", "## Where the time goes", "## Memory"] {
        assert!(report.contains(section), "no {section:?} in the report:\n{report}");
    }
    for capture in ["10000 packets, full frames", "10000 packets, snaplen 128"] {
        let target = report.lines().find(|l| l.starts_with(&format!("| {capture} |")));
        assert!(
            target.is_some_and(|row| row.contains("% (")),
            "no ratio for {capture} in the targets table:\n{report}"
        );

        let section = report.split(&format!("### {capture}\n")).nth(1).expect("a throughput section per capture");
        let section = section.split("\n### ").next().unwrap_or(section);
        let written = count_before(section, " RST packets").expect("the capture line counts its RST packets");
        assert!(written > 0, "the smoke capture has RSTs to find");
        for stage in ["| c. ", "| t. "] {
            let row = section.lines().find(|l| l.starts_with(stage)).unwrap_or_else(|| panic!("no {stage} row"));
            assert_eq!(count_before(row, " RST events"), Some(written), "{stage} row of {capture}: {row}");
        }
    }
}
