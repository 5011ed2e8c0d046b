//! The built `rstscope` binary against an in-process collector: output formats, exit statuses
//! and the messages people see when something is wrong.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use rstscope_collector::service::{Limits, Security};

/// Runs `rstscope` with `args` (off the async threads, killed after a bounded time).
async fn rstscope(args: Vec<String>) -> Output {
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_rstscope"))
            .args(&args)
            .env_remove("RSTSCOPE_COLLECTOR")
            .env_remove("RSTSCOPE_TOKEN")
            .output()
            .expect("rstscope runs")
    });
    tokio::time::timeout(Duration::from_secs(60), run).await.expect("rstscope finishes in time").unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_status_print_what_was_ingested() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "b").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000), reset(1, 50_001), flow(50_000)])).await.unwrap(), 1);
    let url = collector.url.as_str();

    let json = rstscope(args(&["--collector", url, "resets", "--raw", "-o", "json"])).await;
    assert!(json.status.success(), "{}", stderr(&json));
    let lines: Vec<serde_json::Value> =
        stdout(&json).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), 2);
    let first = &lines[0];
    assert_eq!(first["type"], "reset");
    assert_eq!(first["agent"], "edge-1");
    assert_eq!(first["connection"], "192.0.2.1:443-198.51.100.7:50000");
    assert_eq!(first["src"], "192.0.2.1:443");
    assert_eq!(first["dst"], "198.51.100.7:50000");
    assert_eq!(first["flags"], "RA");
    assert_eq!(
        (first["seq"].as_u64(), first["ack"].as_u64(), first["ttl"].as_u64()),
        (Some(1000), Some(2000), Some(64))
    );
    assert_eq!(first["ip_id"], 7);
    assert_eq!(first["cause"], "refused");
    assert_eq!(first["verdict"], "pending");
    assert_eq!(first["evidence"][0]["name"], "answers-syn");
    assert!(stdout(&json).starts_with(r#"{"type":"reset","ts":1700000000.000000000,"#), "{}", stdout(&json));

    let filtered = rstscope(args(&["resets", "--raw", "--collector", url, "--port", "50001", "-o", "compact"])).await;
    assert!(filtered.status.success(), "{}", stderr(&filtered));
    assert_eq!(
        stdout(&filtered),
        "1700000000.001000000 edge-1 192.0.2.1:443 > 198.51.100.7:50001: RA seq 1001 ack 2000 ttl 64 refused\n"
    );
    let raw_verdict = rstscope(args(&["resets", "--raw", "--collector", url, "--verdict", "injected"])).await;
    assert_eq!(raw_verdict.status.code(), Some(2), "a raw record has no verdict to select by");

    let table = rstscope(args(&["--collector", url, "resets", "--raw", "--since", "2023-11-14T00:00:00Z"])).await;
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(stdout(&table).starts_with("TIME "), "{}", stdout(&table));
    assert!(stdout(&table).contains("192.0.2.1:443 -> 198.51.100.7:50001"), "{}", stdout(&table));

    let status = rstscope(args(&["--collector", url, "status", "-o", "json"])).await;
    assert!(status.status.success(), "{}", stderr(&status));
    let status: serde_json::Value = serde_json::from_str(stdout(&status).trim()).unwrap();
    assert_eq!((status["type"].as_str(), status["resets"].as_u64()), (Some("status"), Some(2)));
    assert_eq!((status["flows"].as_u64(), status["agents"].as_u64()), (Some(1), Some(1)));

    // One agent's records of RSTs, not distinct RSTs: the figure says so.
    assert_eq!(status["reset_sightings"].as_u64(), Some(2));
    let human = rstscope(args(&["--collector", url, "status"])).await;
    assert!(stdout(&human).contains(" decided, from 2 sightings (one per agent"), "{}", stdout(&human));
    // Decided on the collector's timer: none, one or both by now (live_verdicts checks the count).
    assert!(status["decided_resets"].as_u64().is_some_and(|n| n <= 2), "{status}");

    let agents = rstscope(args(&["--collector", url, "agents", "-o", "json"])).await;
    assert!(stdout(&agents).contains(r#""name":"edge-1""#), "{}", stdout(&agents));

    let connection =
        rstscope(args(&["--collector", url, "connection", "198.51.100.7:50000-192.0.2.1:443", "-o", "json"])).await;
    assert!(connection.status.success(), "{}", stderr(&connection));
    assert!(stdout(&connection).starts_with(r#"{"#) && stdout(&connection).contains(r#""conn_state":"REJ""#));

    let bad_filter = rstscope(args(&["--collector", url, "resets", "--cause", "gremlins"])).await;
    assert_eq!(bad_filter.status.code(), Some(2));
    assert!(stderr(&bad_filter).contains("unknown cause \"gremlins\""), "{}", stderr(&bad_filter));
    collector.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let security = Security { token: Some("s3cret".into()), tls: None };
    let collector = start_with(dir.path(), security, Limits::default()).await;
    let url = collector.url.clone();

    let refused = rstscope(args(&["--collector", &url, "--token", "wrong", "status"])).await;
    assert_eq!(refused.status.code(), Some(4));
    assert!(stderr(&refused).contains("the collector refused the token"), "{}", stderr(&refused));

    let admitted = rstscope(args(&["--collector", &url, "--token", "s3cret", "status"])).await;
    assert!(admitted.status.success(), "{}", stderr(&admitted));

    // A well-formed record label the correlation does not hold: not found (1), not a usage error.
    let unknown =
        rstscope(args(&["--collector", &url, "--token", "s3cret", "connection", "client/0123456789abcdef"])).await;
    assert_eq!(unknown.status.code(), Some(1), "{}", stderr(&unknown));
    assert!(stderr(&unknown).contains("no connection client/0123456789abcdef"), "{}", stderr(&unknown));
    collector.stop().await;

    // Nothing listens on the stopped collector's port any more.
    let unreachable = rstscope(args(&["--collector", &url, "status"])).await;
    assert_eq!(unreachable.status.code(), Some(3));
    let message = stderr(&unreachable);
    assert!(message.contains(&format!("cannot reach the collector at {url}")), "{message}");
    assert!(message.contains("is rstscope-collector running? (--collector / RSTSCOPE_COLLECTOR)"), "{message}");

    // An address without a scheme is a usage error, not an unreachable collector.
    let bare = url.trim_start_matches("http://").to_string();
    let mistyped = rstscope(args(&["--collector", &bare, "status"])).await;
    assert_eq!(mistyped.status.code(), Some(2), "{}", stderr(&mistyped));
    assert!(stderr(&mistyped).contains(&format!("e.g. http://{bare}")), "{}", stderr(&mistyped));
}

/// Two resets of one agent, stored in a collector of its own.
async fn collector_with_two_resets(dir: &std::path::Path) -> TestCollector {
    let collector = start(dir).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "b").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000), reset(1, 50_001)])).await.unwrap(), 1);
    collector
}

/// `--last 0` is a usage error (exit 2), like any flag value that cannot mean what it says:
/// the collector reads `last: 0` as "no limit", so it used to list everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_zero_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let collector = collector_with_two_resets(dir.path()).await;
    let url = collector.url.as_str();
    let newest = rstscope(args(&["--collector", url, "resets", "--raw", "--last", "1", "-o", "compact"])).await;
    assert!(newest.status.success(), "{}", stderr(&newest));
    assert_eq!(stdout(&newest).lines().count(), 1, "{}", stdout(&newest));
    for raw in [&["--raw"][..], &[]] {
        let zero = rstscope(
            [&["--collector", url, "resets", "--last", "0"][..], raw].concat().iter().map(|s| s.to_string()).collect(),
        )
        .await;
        assert_eq!(zero.status.code(), Some(2), "{}", stdout(&zero));
        assert!(stdout(&zero).is_empty(), "{}", stdout(&zero));
        assert!(
            stderr(&zero).contains("--last 0: expected how many of the newest resets to list, at least 1"),
            "{}",
            stderr(&zero)
        );
    }
    collector.stop().await;
}

/// `--until` before `--since` is a usage error that gives both times as the tables print them,
/// not in nanoseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_ending_before_it_starts_names_both_times_readably() {
    let dir = tempfile::tempdir().unwrap();
    let collector = collector_with_two_resets(dir.path()).await;
    let url = collector.url.as_str();
    let backwards =
        rstscope(args(&["--collector", url, "resets", "--since", "2023-11-15T00:00:00Z", "--until", "1699920000"]))
            .await;
    assert_eq!(backwards.status.code(), Some(2), "{}", stderr(&backwards));
    assert_eq!(
        stderr(&backwards),
        "rstscope: --until (2023-11-14T00:00:00.000Z) is before --since (2023-11-15T00:00:00.000Z)\n"
    );
    collector.stop().await;
}

/// `analyze` reads capture files and no collector: its help lists none of the collector's flags,
/// which every other command still takes, before or after the command's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_help_lists_only_what_analyze_uses() {
    let analyze = rstscope(args(&["analyze", "--help"])).await;
    assert!(analyze.status.success(), "{}", stderr(&analyze));
    let help = stdout(&analyze);
    assert!(help.contains("--max-skew"), "{help}");
    for flag in ["--collector", "--token", "--ca-cert", "--client-cert", "--client-key", "--tls-name"] {
        assert!(!help.contains(flag), "analyze --help lists {flag}:\n{help}");
    }
    let resets = rstscope(args(&["resets", "--help"])).await;
    for flag in ["--collector", "--token", "--ca-cert", "--client-cert", "--client-key", "--tls-name"] {
        assert!(stdout(&resets).contains(flag), "resets --help lacks {flag}:\n{}", stdout(&resets));
    }

    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let url = collector.url.as_str();
    for order in [["--collector", url, "status"], ["status", "--collector", url]] {
        let status = rstscope(args(&order)).await;
        assert!(status.status.success(), "{order:?}: {}", stderr(&status));
    }
    collector.stop().await;
}
