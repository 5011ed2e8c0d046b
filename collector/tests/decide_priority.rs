//! The correlation's ticker runs on its own thread at a lower CPU priority than ingest (see
//! `rstscope_collector::background`), and still decides: two agents' sightings of one RST
//! become an `end-to-end` report, and every thread that took part in deciding runs at the
//! lowered priority. (One test in this file: it looks at the threads of the whole process.)

#![cfg(target_os = "linux")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use rstscope_collector::background::{nice_of, this_thread_nice, CORRELATION_NICE};
use rstscope_proto::v1::{self, agent_message, event, AgentMessage};

fn hello_at(name: &str, ip: [u8; 4]) -> AgentMessage {
    let mut message = hello(name, "boot-1");
    if let Some(agent_message::Kind::Hello(h)) = &mut message.kind {
        h.local_addresses = vec![ip.to_vec()];
    }
    message
}

fn covered() -> v1::Event {
    v1::Event {
        kind: Some(event::Kind::Watermark(v1::Watermark {
            ts_ns: T0 + 20_000_000_000,
            since_ns: T0 - 60_000_000_000,
            ..Default::default()
        })),
    }
}

/// Nice values of this process's threads whose name starts with `prefix`.
fn nice_of_threads(prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            if let Ok(nice) = nice_of(&task.path().join("stat").to_string_lossy()) {
                out.push(nice);
            }
        }
    }
    out
}

#[tokio::test]
async fn the_lowered_ticker_decides() {
    let base = this_thread_nice().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut server, _) = AgentStream::connect_with(&collector, hello_at("server", [192, 0, 2, 1])).await;
    let (mut client, _) = AgentStream::connect_with(&collector, hello_at("client", [198, 51, 100, 7])).await;
    server.send(batch(1, vec![reset(100, 50001), flow(50001), covered()])).await.unwrap();
    let mut seen_at_client = reset(100, 50001);
    if let Some(event::Kind::Reset(r)) = &mut seen_at_client.kind {
        r.ttl = 61;
        r.ts_ns += 7_000_000;
    }
    client.send(batch(1, vec![seen_at_client, covered()])).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let decided = loop {
        let mut q = collector.query(None).await;
        let mut stream = q.list_reports(v1::ResetFilter::default()).await.unwrap().into_inner();
        let mut found = Vec::new();
        while let Some(r) = stream.message().await.unwrap() {
            found.push(r);
        }
        if found.len() == 1 && found[0].verdict != "pending" {
            break found;
        }
        assert!(Instant::now() < deadline, "still undecided: {found:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((decided[0].verdict.as_str(), decided[0].observations.len()), ("end-to-end", 2));

    // The ticker's thread and the blocking thread that ran the decision (kept a while after it,
    // and named after it: thread names are cut to 15 bytes).
    let nices = nice_of_threads("rstscope-decide");
    assert!(nices.len() >= 2, "the ticker's threads: {nices:?}");
    // Lowered, unless the test runs unprivileged above that already.
    let expected = if base > CORRELATION_NICE { base } else { CORRELATION_NICE };
    assert!(nices.iter().all(|&n| n == expected || n == CORRELATION_NICE), "{nices:?}, expected {expected}");
    assert_eq!(this_thread_nice().unwrap(), base, "ingest's threads keep their priority");
    collector.stop().await;
}
