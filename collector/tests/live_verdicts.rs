//! Live correlation through the real gRPC services: two agents stream what they saw of the
//! same connections, the collector decides, `ListReports` answers with one merged report per
//! distinct RST and its verdict.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rstscope_collector::service::{Limits, Security};
use rstscope_proto::v1::{self, agent_message, event, AgentMessage};

/// The server agent at 192.0.2.1 and the client agent at 198.51.100.7, told their addresses.
fn hello_at(name: &str, ip: [u8; 4]) -> AgentMessage {
    let mut message = hello(name, "boot-1");
    if let Some(agent_message::Kind::Hello(h)) = &mut message.kind {
        h.local_addresses = vec![ip.to_vec()];
    }
    message
}

/// `reset` as the client saw it: routed three hops, so TTL 61 (or forged: TTL 50).
fn reset_seen_at_client(offset_ms: i64, port: u32, ttl: u32) -> v1::Event {
    let mut e = reset(offset_ms, port);
    if let Some(event::Kind::Reset(r)) = &mut e.kind {
        r.ttl = ttl;
        r.ts_ns += 7_000_000;
    }
    e
}

/// Both captures ran from a minute before T0 to 20 s after it.
fn covered() -> v1::Event {
    v1::Event {
        kind: Some(event::Kind::Watermark(v1::Watermark {
            ts_ns: T0 + 20_000_000_000,
            since_ns: T0 - 60_000_000_000,
            ended: false,
            ..Default::default()
        })),
    }
}

async fn reports(collector: &TestCollector) -> Vec<v1::ResetReport> {
    let mut client = collector.query(None).await;
    let mut stream = client.list_reports(v1::ResetFilter::default()).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        out.push(r);
    }
    out
}

#[tokio::test]
async fn two_agents_get_end_to_end_and_injected_verdicts() {
    two_agents_verdicts(Limits::default(), 0, false).await;
}

/// The same with no room in memory for the correlation's queue: every batch goes through its
/// file (`backlog.rs`) and the verdicts are the same.
#[tokio::test]
async fn verdicts_are_the_same_when_every_batch_waits_in_the_correlations_file() {
    two_agents_verdicts(Limits { correlation_memory_events: 0, ..Limits::default() }, 2, false).await;
}

/// Agents are welcomed while a decision holds the correlation (during a burst a decision runs
/// at low priority and may hold it for seconds; an agent gives up on a welcome after 10 s). The
/// hellos still reach the engine before the batches: the forged RST is placed between the two
/// agents' addresses, which only their hellos told.
#[tokio::test]
async fn agents_are_welcomed_while_a_decision_holds_the_correlation() {
    two_agents_verdicts(Limits::default(), 0, true).await;
}

/// Two agents, two resets: end-to-end and injected; `filed` batches went through the file.
/// With `hold`, a thread holds the correlation while both agents say hello.
async fn two_agents_verdicts(limits: Limits, filed: u64, hold: bool) {
    let dir = tempfile::tempdir().unwrap();
    let collector = start_with(dir.path(), Security::default(), limits).await;
    let (release, holder) = if hold {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held_tx, held) = std::sync::mpsc::channel::<()>();
        let hub = collector.hub.clone();
        let holder = std::thread::spawn(move || {
            let _engine = hub.correlation();
            held_tx.send(()).unwrap();
            // Bounded: a failing test must not leave the engine held for ever.
            let _ = released.recv_timeout(Duration::from_secs(60));
        });
        held.recv().unwrap();
        (Some(release), Some(holder))
    } else {
        (None, None)
    };
    let (mut server, _) = AgentStream::connect_with(&collector, hello_at("server", [192, 0, 2, 1])).await;
    let (mut client, _) = AgentStream::connect_with(&collector, hello_at("client", [198, 51, 100, 7])).await;
    if let (Some(release), Some(holder)) = (release, holder) {
        assert!(!holder.is_finished(), "the correlation was held until both agents were welcomed");
        release.send(()).unwrap();
        holder.join().unwrap();
    }
    // Port 50001: refused, seen at both ends. Port 50002: the client got a RST the server
    // never sent, while the server's capture ran and recorded the connection.
    server.send(batch(1, vec![reset(100, 50001), flow(50001), flow(50002), covered()])).await.unwrap();
    client
        .send(batch(
            1,
            vec![reset_seen_at_client(100, 50001, 61), reset_seen_at_client(300, 50002, 50), flow(50002), covered()],
        ))
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let decided = loop {
        let found = reports(&collector).await;
        if found.len() == 2 && found.iter().all(|r| r.verdict != "pending") {
            break found;
        }
        assert!(Instant::now() < deadline, "still undecided: {found:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let summary: Vec<(&str, &str, usize)> =
        decided.iter().map(|r| (r.verdict.as_str(), r.cause.as_str(), r.observations.len())).collect();
    assert_eq!(summary, [("end-to-end", "refused", 2), ("injected", "middlebox", 1)], "{decided:#?}");
    assert_eq!(decided[1].location, "between server and client");

    // Filters apply to the merged reports.
    let mut q = collector.query(None).await;
    let filter = v1::ResetFilter { verdicts: vec!["injected".into()], ..Default::default() };
    let mut stream = q.list_reports(filter).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.verdict, "injected");
    assert!(stream.message().await.unwrap().is_none());
    // Status counts the two resets decided, and the three agent records they came from.
    let status = q.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.decided_resets, status.resets), (2, 3), "{status:?}");
    assert_eq!(collector.hub.inbox.filed_batches(), filed, "batches that went through the file");
    collector.stop().await;
}

#[tokio::test]
async fn a_listed_watermark_lets_a_forged_reset_be_decided_while_the_sender_settles_another() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut server, _) = AgentStream::connect_with(&collector, hello_at("server", [192, 0, 2, 1])).await;
    let (mut client, _) = AgentStream::connect_with(&collector, hello_at("client", [198, 51, 100, 7])).await;
    // The server recorded connection 50002 and holds a RST of connection 50004 (T0 + 200 ms)
    // in its settle window: its plain watermark stays just before that, its listed one runs on.
    let mut settling = v1::SettlingRst { ts_ns: T0 + 200_000_000, conn_id: 50004, flags: 0x014, ..Default::default() };
    if let Some(event::Kind::Reset(r)) = reset(200, 50004).kind {
        (settling.src, settling.dst, settling.seq, settling.ack) = (r.src, r.dst, r.seq, r.ack);
    }
    let listed = v1::Watermark {
        ts_ns: T0 + 200_000_000 - 1,
        since_ns: T0 - 60_000_000_000,
        listed_until_ns: T0 + 20_000_000_000,
        settling: vec![settling],
        ..Default::default()
    };
    let listed = v1::Event { kind: Some(event::Kind::Watermark(listed)) };
    server.send(batch(1, vec![flow(50002), listed])).await.unwrap();
    // The client got a RST in the server's name at T0 + 300 ms.
    client.send(batch(1, vec![reset_seen_at_client(300, 50002, 50), flow(50002), covered()])).await.unwrap();
    let decided = until_decided(&collector, 1).await;
    assert_eq!((decided[0].verdict.as_str(), decided[0].location.as_str()), ("injected", "between server and client"));
    collector.stop().await;
}

/// A watermark at `T0 + ms`, the capture running since a minute before T0.
fn mark_at(ms: i64) -> v1::Event {
    v1::Event {
        kind: Some(event::Kind::Watermark(v1::Watermark {
            ts_ns: T0 + ms * 1_000_000,
            since_ns: T0 - 60_000_000_000,
            ended: false,
            ..Default::default()
        })),
    }
}

async fn until_decided(collector: &TestCollector, n: usize) -> Vec<v1::ResetReport> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = reports(collector).await;
        if found.len() == n && found.iter().all(|r| r.verdict != "pending") {
            return found;
        }
        assert!(Instant::now() < deadline, "not decided: {found:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn verdicts_survive_a_restart_and_undecided_resets_are_decided_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut server, _) = AgentStream::connect_with(&collector, hello_at("server", [192, 0, 2, 1])).await;
    let (mut client, _) = AgentStream::connect_with(&collector, hello_at("client", [198, 51, 100, 7])).await;
    // 50001 at +0.1 s is decidable now; 50003 at +30 s waits for the client's watermark.
    server.send(batch(1, vec![reset(100, 50001), flow(50001), reset(30_000, 50003), mark_at(45_000)])).await.unwrap();
    client.send(batch(1, vec![reset_seen_at_client(100, 50001, 61), mark_at(20_000)])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = reports(&collector).await;
        if found.iter().any(|r| r.verdict == "end-to-end") {
            assert!(found.iter().any(|r| r.verdict == "pending"), "{found:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "not decided: {found:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the ticker a moment to store the decision and its resume point, then restart.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop((server, client));
    collector.stop().await;

    let collector = start(dir.path()).await;
    // Before any agent is back, the replayed correlation decides again from what the store
    // kept (the agents' addresses included): what was decided must stay as it was.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before_hello = reports(&collector).await;
    let first = before_hello.iter().find(|r| r.verdict != "pending").expect("the decided report is kept");
    assert_eq!((first.verdict.as_str(), first.observations.len()), ("end-to-end", 2), "{before_hello:#?}");
    let (mut client, durable) = AgentStream::connect_with(&collector, hello_at("client", [198, 51, 100, 7])).await;
    assert_eq!(durable, 1);
    client.send(batch(2, vec![reset_seen_at_client(30_000, 50003, 61), mark_at(50_000)])).await.unwrap();
    let decided = until_decided(&collector, 2).await;
    let summary: Vec<(&str, usize)> = decided.iter().map(|r| (r.verdict.as_str(), r.observations.len())).collect();
    assert_eq!(summary, [("end-to-end", 2), ("end-to-end", 2)], "{decided:#?}");
    collector.stop().await;
}
