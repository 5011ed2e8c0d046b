//! The collector over real gRPC and a real sled directory: ingest, acknowledgements, refusals,
//! authentication, TLS, hostile input, restarts, and following.

mod common;

use std::time::Duration;

use common::*;
use rstscope_collector::auth::{self, TlsFiles};
use rstscope_collector::service::{Limits, Security};
use rstscope_proto::v1::{self, collector_message, query_client::QueryClient};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

#[tokio::test]
async fn ingested_resets_come_back_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut agent, durable) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    assert_eq!(durable, 0);
    let first = vec![reset(0, 50_000), reset(1, 50_001), flow(50_000), reset(2, 50_002), watermark(5)];
    assert_eq!(agent.send(batch(1, first)).await.unwrap(), 1);
    assert_eq!(agent.send(batch(2, vec![reset(3, 50_003), reset(4, 50_000)])).await.unwrap(), 2);

    let all = collector.resets(v1::ResetFilter::default()).await;
    let seqs: Vec<u32> = all.iter().map(|r| r.event.as_ref().unwrap().seq).collect();
    assert_eq!(seqs, [1000, 1001, 1002, 1003, 1004], "each reset once, oldest first");
    assert!(all.iter().all(|r| r.agent == "edge-1" && r.verdict == "pending"));
    assert_eq!(all[0].connection, "192.0.2.1:443-198.51.100.7:50000");

    let by_port = collector.resets(v1::ResetFilter { ports: vec![50_000], ..Default::default() }).await;
    assert_eq!(by_port.len(), 2);
    let newest = collector.resets(v1::ResetFilter { last: 2, ..Default::default() }).await;
    assert_eq!(newest.iter().map(|r| r.event.as_ref().unwrap().seq).collect::<Vec<_>>(), [1003, 1004]);
    let none = collector.resets(v1::ResetFilter { verdicts: vec!["injected".into()], ..Default::default() }).await;
    assert!(none.is_empty(), "every verdict is pending until correlation exists");

    let mut query = collector.query(None).await;
    let connection = query
        .get_connection(v1::ConnectionRequest { connection: "198.51.100.7:50000-192.0.2.1:443".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(connection.flows.len(), 1);
    assert_eq!(connection.flows[0].agent, "edge-1");
    assert_eq!(connection.resets.len(), 2);
    let missing =
        query.get_connection(v1::ConnectionRequest { connection: "192.0.2.9:1-192.0.2.8:2".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = query.get_connection(v1::ConnectionRequest { connection: "nonsense".into() }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let agents = query.list_agents(v1::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].name, "edge-1");
    assert!(agents[0].connected);
    let status = query.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.resets, status.flows, status.agents), (5, 1, 1));

    drop(agent);
    let mut disconnected = false;
    for _ in 0..100 {
        let agents = query.list_agents(v1::ListAgentsRequest {}).await.unwrap().into_inner().agents;
        if !agents[0].connected {
            disconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(disconnected, "a closed stream shows the agent disconnected");
    collector.stop().await;
}

#[tokio::test]
async fn agents_show_the_spool_backlog_they_last_reported() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    let spooled = |seq: u64, spooled_seq: u64, port: u32| v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Batch(v1::Batch { seq, events: vec![reset(0, port)], spooled_seq })),
    };
    let query = collector.query(None).await;
    let backlog = || {
        let mut query = query.clone();
        async move { query.list_agents(v1::ListAgentsRequest {}).await.unwrap().into_inner().agents[0].spool_backlog }
    };
    // Batch 1 of 4 spooled, acknowledged: 3 still wait.
    assert_eq!(agent.send(spooled(1, 4, 50_000)).await.unwrap(), 1);
    assert_eq!(backlog().await, 3);
    assert_eq!(agent.send(spooled(2, 4, 50_001)).await.unwrap(), 2);
    assert_eq!(backlog().await, 2);
    // More spooled meanwhile.
    assert_eq!(agent.send(spooled(3, 9, 50_002)).await.unwrap(), 3);
    assert_eq!(backlog().await, 6);
    // A number below the batch's own is refused.
    let refused = agent.send(spooled(4, 2, 50_003)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("spooled_seq 2"), "{}", refused.message());
    drop(query);
    collector.stop().await;
}

#[tokio::test]
async fn a_resent_batch_is_acknowledged_not_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);
    drop(agent);
    // After a reconnect the welcome says where to resume, and the old batch is still a duplicate.
    let mut again = None;
    for _ in 0..100 {
        match AgentStream::open(&collector, None, hello("edge-1", "boot-a")).await.unwrap().next().await {
            Ok(collector_message::Kind::Welcome(welcome)) => {
                again = Some(welcome.durable_seq);
                break;
            }
            Err(status) if status.code() == Code::AlreadyExists => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(again, Some(1));
    assert_eq!(collector.resets(v1::ResetFilter::default()).await.len(), 1);
    collector.stop().await;
}

#[tokio::test]
async fn a_gap_is_refused_with_the_expected_batch() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);
    let refused = agent.send(batch(3, vec![reset(1, 50_001)])).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("expected batch 2"), "{}", refused.message());
    assert_eq!(collector.resets(v1::ResetFilter::default()).await.len(), 1);
    collector.stop().await;
}

#[tokio::test]
async fn invalid_messages_are_refused_and_others_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;

    let mut no_hello = AgentStream::open(&collector, None, batch(1, vec![reset(0, 1)])).await.unwrap();
    let status = no_hello.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("first message"), "{}", status.message());

    let mut bad_name = AgentStream::open(&collector, None, hello("edge 1", "b")).await.unwrap();
    assert_eq!(bad_name.next().await.unwrap_err().code(), Code::InvalidArgument);

    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    let mut broken = reset(0, 50_000);
    if let Some(v1::event::Kind::Reset(r)) = &mut broken.kind {
        r.src = Some(v1::Endpoint { ip: vec![1, 2, 3], port: 443 });
    }
    let refused = agent.send(batch(1, vec![reset(1, 50_001), broken])).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("batch 1, event 1: reset: src.ip has 3 bytes"), "{}", refused.message());

    let (mut twin, _) = AgentStream::connect(&collector, "edge-2", "boot-a").await;
    let duplicate = AgentStream::open(&collector, None, hello("edge-2", "boot-b")).await.unwrap().next().await;
    assert_eq!(duplicate.unwrap_err().code(), Code::AlreadyExists, "one stream per agent name");
    assert_eq!(twin.send(batch(1, vec![reset(2, 50_002)])).await.unwrap(), 1);

    let stored = collector.resets(v1::ResetFilter::default()).await;
    assert_eq!(stored.len(), 1, "nothing of the refused batch is stored");
    assert_eq!(stored[0].agent, "edge-2");
    collector.stop().await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let security = Security { token: Some("s3cret".into()), tls: None };
    let collector = start_with(dir.path(), security, Limits::default()).await;

    for token in [None, Some("wrong")] {
        let refused = match AgentStream::open(&collector, token, hello("edge-1", "b")).await {
            Err(status) => status,
            Ok(mut stream) => stream.next().await.unwrap_err(),
        };
        assert_eq!(refused.code(), Code::Unauthenticated, "token {token:?}");
        let query = collector.query(token).await.status(v1::StatusRequest {}).await.unwrap_err();
        assert_eq!(query.code(), Code::Unauthenticated);
        // ListReports is served beside the generated service (from stored encodings): the
        // same check applies.
        let listing = collector.query(token).await.list_reports(v1::ResetFilter::default()).await.unwrap_err();
        assert_eq!(listing.code(), Code::Unauthenticated, "token {token:?}");
    }
    let mut query = collector.query(Some("s3cret")).await;
    let mut listing = query.list_reports(v1::ResetFilter::default()).await.unwrap().into_inner();
    assert!(listing.message().await.unwrap().is_none(), "no reports yet");
    let status = query.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.resets, status.agents), (0, 0), "nothing stored from refused clients");

    let mut agent = AgentStream::open(&collector, Some("s3cret"), hello("edge-1", "b")).await.unwrap();
    assert!(matches!(agent.next().await, Ok(collector_message::Kind::Welcome(_))));
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);
    collector.stop().await;
}

#[tokio::test]
async fn garbage_on_the_port_does_not_hurt() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let junk: [&[u8]; 4] = [
        b"\x00\x01\x02\x03garbage\xff\xfe",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x08\x00\x00\x00\x00\x00\xff\xff\xff",
        &[0xffu8; 70_000],
    ];
    for bytes in junk {
        let mut socket = tokio::net::TcpStream::connect(collector.addr).await.unwrap();
        let _ = tokio::time::timeout(WAIT, socket.write_all(bytes)).await;
        drop(socket);
    }
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "b").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);
    collector.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_message_bytes: 64 << 10, ..Limits::default() };
    let collector = start_with(dir.path(), Security::default(), limits).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "b").await;
    let big: Vec<v1::Event> = (0..3000).map(|i| reset(i, 40_000 + i as u32)).collect();
    let refused = agent.send(batch(1, big)).await.unwrap_err();
    assert!(matches!(refused.code(), Code::OutOfRange | Code::ResourceExhausted), "{refused:?}");
    let (mut other, _) = AgentStream::connect(&collector, "edge-2", "b").await;
    assert_eq!(other.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);
    assert_eq!(collector.resets(v1::ResetFilter::default()).await.len(), 1);
    collector.stop().await;
}

#[tokio::test]
async fn data_and_durable_seq_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);
    assert_eq!(agent.send(batch(2, vec![reset(1, 50_001), flow(50_001)])).await.unwrap(), 2);
    drop(agent);
    collector.stop().await;

    let collector = start(dir.path()).await;
    let (mut agent, durable) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    assert_eq!(durable, 2);
    assert_eq!(agent.send(batch(2, vec![reset(1, 50_001)])).await.unwrap(), 2, "still a duplicate");
    assert_eq!(agent.send(batch(3, vec![reset(2, 50_002)])).await.unwrap(), 3);
    assert_eq!(collector.resets(v1::ResetFilter::default()).await.len(), 3);
    collector.stop().await;
}

async fn next(follow: &mut tonic::Streaming<v1::ResetRecord>) -> v1::ResetRecord {
    tokio::time::timeout(WAIT, follow.message()).await.expect("a reset in time").unwrap().unwrap()
}

#[tokio::test]
async fn follow_lists_then_streams_new_resets() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "b").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000)])).await.unwrap(), 1);

    let mut query = collector.query(None).await;
    let filter = v1::ResetFilter { ports: vec![50_000, 50_002], ..Default::default() };
    let mut follow = query.follow_resets(filter).await.unwrap().into_inner();
    assert_eq!(next(&mut follow).await.event.unwrap().seq, 1000);
    assert_eq!(agent.send(batch(2, vec![reset(1, 50_001), reset(2, 50_002)])).await.unwrap(), 2);
    assert_eq!(next(&mut follow).await.event.unwrap().seq, 1002, "filtered like a listing");
    collector.stop().await;
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["edge-1".into()]);
    Pki { ca: ca_cert.pem(), server_cert, server_key, client_cert, client_key }
}

#[tokio::test]
async fn mutual_tls_admits_only_certified_clients() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let files = dir.path().join("pki");
    std::fs::create_dir(&files).unwrap();
    for (name, pem) in [("ca.pem", &pki.ca), ("server.pem", &pki.server_cert), ("server.key", &pki.server_key)] {
        std::fs::write(files.join(name), pem).unwrap();
    }
    let tls = auth::server_tls(&TlsFiles {
        cert: files.join("server.pem"),
        key: files.join("server.key"),
        client_ca: Some(files.join("ca.pem")),
    })
    .unwrap();
    let collector =
        start_with(&dir.path().join("db"), Security { token: None, tls: Some(tls) }, Limits::default()).await;
    let url = format!("https://localhost:{}", collector.addr.port());
    let client_tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)).domain_name("localhost");

    let with_cert = client_tls.clone().identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    let channel = Channel::from_shared(url.clone()).unwrap().tls_config(with_cert).unwrap();
    let channel = tokio::time::timeout(WAIT, channel.connect()).await.unwrap().unwrap();
    let status = QueryClient::new(channel).status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.resets, 0);

    let without_cert = Channel::from_shared(url).unwrap().tls_config(client_tls).unwrap();
    let refused = match tokio::time::timeout(WAIT, without_cert.connect()).await.unwrap() {
        Err(_) => true,
        Ok(channel) => QueryClient::new(channel).status(v1::StatusRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    collector.stop().await;
}

#[tokio::test]
async fn followers_see_resets_sent_again_by_a_restarted_agent_once() {
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path()).await;
    let mut query = collector.query(None).await;
    let mut follow = query.follow_resets(v1::ResetFilter::default()).await.unwrap().into_inner();
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    assert_eq!(agent.send(batch(1, vec![reset(0, 50_000), reset(1, 50_001)])).await.unwrap(), 1);
    assert_eq!(next(&mut follow).await.event.unwrap().dst.unwrap().port, 50_000);
    assert_eq!(next(&mut follow).await.event.unwrap().dst.unwrap().port, 50_001);
    drop(agent);
    // Restarted mid-file: a new boot id, the file read again from the start, one reset more.
    let mut restarted = None;
    for _ in 0..100 {
        match AgentStream::open(&collector, None, hello("edge-1", "boot-b")).await {
            Ok(mut stream) => match stream.next().await {
                Ok(collector_message::Kind::Welcome(_)) => {
                    restarted = Some(stream);
                    break;
                }
                Err(status) if status.code() == Code::AlreadyExists => {}
                other => panic!("unexpected {other:?}"),
            },
            Err(status) if status.code() == Code::AlreadyExists => {}
            Err(status) => panic!("{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut agent = restarted.expect("the agent reconnects");
    let again = vec![reset(0, 50_000), reset(1, 50_001), reset(2, 50_002)];
    assert_eq!(agent.send(batch(1, again)).await.unwrap(), 1);
    assert_eq!(next(&mut follow).await.event.unwrap().dst.unwrap().port, 50_002, "only the new one is followed");
    assert_eq!(collector.resets(v1::ResetFilter::default()).await.len(), 3);
    collector.stop().await;
}
