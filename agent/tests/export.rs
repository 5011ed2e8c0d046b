//! The exporter against a real tonic server on loopback.
//!
//! The one mock here is `IngestDouble`, an in-memory `Ingest` service: the real collector is
//! being written at the same time, so these tests pin the agent's side of the protocol (hello,
//! welcome, in-order numbered batches, acks, dedupe by seq) on their own. The double stores a
//! batch only if its number is the next one and acknowledges the highest stored number, which
//! is the contract `ingest.proto` gives the real collector. Every wait is bounded in time.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rstscope_agent::event::{Cause, ConnId, Counts, Event, Phase, Role, RstEvent, SeqRelation};
use rstscope_agent::export::{ExportConfig, Exporter, FinishReport, SPOOL_FULL};
use rstscope_agent::flow::{ListedWatermark, SettlingRst};
use rstscope_agent::wire::{Checksum, TcpFlags};
use rstscope_proto::v1::{self, ingest_server::IngestServer};
use rstscope_proto::Endpoint;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// What the double has seen; shared by every server instance of a test, like a collector's
/// disk survives its restarts.
#[derive(Default)]
struct Store {
    durable: HashMap<(String, String), u64>,
    /// Stored batches, in arrival order.
    batches: Vec<v1::Batch>,
    hellos: Vec<v1::AgentHello>,
    /// Resent batches at or below the durable number (harmless; acknowledged again).
    duplicates: u64,
    /// Batches after a gap (must never happen).
    gaps: u64,
    /// While set, batches are read but neither stored nor acknowledged (a collector about to die).
    blackhole: bool,
    /// Batches swallowed by the black hole.
    blackholed: u64,
    required_token: Option<String>,
}

impl Store {
    fn resets(&self) -> Vec<i64> {
        self.events()
            .filter_map(|e| match e {
                v1::event::Kind::Reset(r) => Some(r.ts_ns),
                _ => None,
            })
            .collect()
    }

    fn events(&self) -> impl Iterator<Item = &v1::event::Kind> {
        self.batches.iter().flat_map(|b| b.events.iter().filter_map(|e| e.kind.as_ref()))
    }
}

#[derive(Clone)]
struct IngestDouble {
    store: Arc<Mutex<Store>>,
}

#[tonic::async_trait]
impl v1::ingest_server::Ingest for IngestDouble {
    type StreamStream = ReceiverStream<Result<v1::CollectorMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let required = self.store.lock().unwrap().required_token.clone();
        if let Some(token) = required {
            let given = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
            if given != Some(format!("Bearer {token}").as_str()) {
                return Err(Status::unauthenticated("bad token"));
            }
        }
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.kind) {
            Some(v1::agent_message::Kind::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("hello first")),
        };
        let key = (hello.agent_name.clone(), hello.boot_id.clone());
        let durable_seq = {
            let mut store = self.store.lock().unwrap();
            store.hellos.push(hello);
            store.durable.get(&key).copied().unwrap_or(0)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let welcome = v1::collector_message::Kind::Welcome(v1::Welcome { durable_seq, max_batch_events: 0 });
        let _ = tx.send(Ok(v1::CollectorMessage { kind: Some(welcome) })).await;
        let store = self.store.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let Some(v1::agent_message::Kind::Batch(batch)) = message.kind else { continue };
                let ack = {
                    let mut store = store.lock().unwrap();
                    if store.blackhole {
                        store.blackholed += 1;
                        continue;
                    }
                    let durable = store.durable.get(&key).copied().unwrap_or(0);
                    if batch.seq <= durable {
                        store.duplicates += 1;
                    } else if batch.seq == durable + 1 {
                        store.durable.insert(key.clone(), batch.seq);
                        store.batches.push(batch);
                    } else {
                        store.gaps += 1;
                    }
                    store.durable.get(&key).copied().unwrap_or(0)
                };
                let ack = v1::collector_message::Kind::Ack(v1::Ack { seq: ack });
                if tx.send(Ok(v1::CollectorMessage { kind: Some(ack) })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A server on its own runtime; dropping it kills the runtime and with it every connection,
/// like a collector process that dies.
struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl Server {
    fn start(store: &Arc<Mutex<Store>>, addr: SocketAddr) -> Server {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("test runtime");
        let listener = runtime.block_on(async {
            // The port was just in use by the previous instance: retry briefly.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.set_reuseaddr(true).expect("reuseaddr");
                match socket.bind(addr).and_then(|()| socket.listen(128)) {
                    Ok(listener) => break listener,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("bind {addr}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            }
        });
        let addr = listener.local_addr().expect("local addr");
        let service = IngestServer::new(IngestDouble { store: store.clone() });
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Server { runtime: Some(runtime), addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A port nothing listens on right now.
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind(any_port()).expect("bind");
    listener.local_addr().expect("addr")
}

fn reset(ts_ns: i64, history: &str) -> Event {
    let ep = |last, port| Endpoint::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)), port);
    Event::Reset(Box::new(RstEvent {
        ts_ns,
        src: ep(1, 80),
        dst: ep(2, 40_000),
        conn_id: ConnId(ts_ns as u64),
        sender: Role::Responder,
        flags: TcpFlags(TcpFlags::RST | TcpFlags::ACK),
        payload_len: 0,
        seq: 0,
        ack: 1,
        window: 0,
        ttl: 64,
        ip_id: Some(0),
        checksum: Checksum::Good,
        phase: Phase::SynSent,
        history: history.to_string(),
        counts: Counts::default(),
        peer_retransmissions: 0,
        sender_retransmissions: 0,
        since_peer_last_ns: None,
        seq_relation: SeqRelation::Exact,
        ttl_delta: None,
        ip_id_delta: None,
        answers: None,
        cause: Cause::Refused,
        evidence: Vec::new(),
    }))
}

fn config(addr: SocketAddr, state_dir: &Path) -> ExportConfig {
    let mut config = ExportConfig::new(format!("http://{addr}"), "test-agent", state_dir.to_path_buf());
    config.max_batch_events = 10;
    config.max_batch_age = Duration::from_millis(20);
    config
}

/// Waits (at most 20 s) until `done` holds for the store.
fn wait_until(store: &Arc<Mutex<Store>>, what: &str, done: impl Fn(&Store) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&store.lock().unwrap()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_event_arrives_once_in_order_with_a_watermark() {
    let store = Arc::new(Mutex::new(Store::default()));
    let server = Server::start(&store, any_port());
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(config(server.addr, dir.path())).unwrap();
    for ts in 0..1000 {
        exporter.push(&reset(ts, "S"));
    }
    exporter.watermark(999, Some(5));
    let report = exporter.finish(Duration::from_secs(20));
    assert_eq!(report.unacked_batches, 0, "{report:?}");
    assert_eq!(report.stats.events, 1000);
    let store = store.lock().unwrap();
    assert_eq!(store.resets(), (0..1000).collect::<Vec<_>>());
    let seqs: Vec<u64> = store.batches.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(store.batches.iter().all(|b| b.events.len() <= 11), "10 events and a watermark at most");
    let last_watermark = store.events().filter_map(|e| match e {
        v1::event::Kind::Watermark(w) => Some((w.ts_ns, w.since_ns)),
        _ => None,
    });
    assert_eq!(last_watermark.last(), Some((999, 5)));
    assert_eq!((store.gaps, store.hellos[0].agent_name.as_str()), (0, "test-agent"));
    assert!(!store.hellos[0].boot_id.is_empty());
    // Everything acknowledged: no segment is left.
    assert_eq!(std::fs::read_dir(dir.path().join("spool")).unwrap().count(), 0);
}

#[test]
fn a_listed_watermark_goes_out_with_its_settling_rsts_until_the_plain_one_passes_it() {
    let store = Arc::new(Mutex::new(Store::default()));
    let server = Server::start(&store, any_port());
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(config(server.addr, dir.path())).unwrap();
    let ep = |port| Endpoint::new(Ipv4Addr::new(198, 51, 100, 2).into(), port);
    let rst = SettlingRst {
        ts_ns: 500,
        src: ep(80),
        dst: ep(40_000),
        conn_id: ConnId(7),
        seq: 1,
        ack: 2,
        flags: TcpFlags(0x14),
    };
    let last_mark = |store: &Store| {
        store
            .events()
            .filter_map(|e| match e {
                v1::event::Kind::Watermark(w) => Some((w.ts_ns, w.listed_until_ns, w.settling.len())),
                _ => None,
            })
            .last()
    };
    exporter.listed_watermark(&ListedWatermark { ts_ns: 499, listed_until_ns: 900, settling: vec![rst] }, Some(5));
    wait_until(&store, "the listed watermark", |s| last_mark(s) == Some((499, 900, 1)));
    let sent = store.lock().unwrap().events().find_map(|e| match e {
        v1::event::Kind::Watermark(w) => w.settling.first().cloned(),
        _ => None,
    });
    assert_eq!(sent, Some(v1::SettlingRst::from(&rst)));
    // A plain watermark short of the listing keeps it; one past it drops it.
    exporter.watermark(600, None);
    wait_until(&store, "the plain watermark", |s| last_mark(s) == Some((600, 900, 1)));
    exporter.watermark(1000, None);
    let report = exporter.finish(Duration::from_secs(20));
    assert_eq!(report.unacked_batches, 0, "{report:?}");
    assert_eq!(last_mark(&store.lock().unwrap()), Some((1000, 0, 0)));
}

#[test]
fn collector_restart_mid_stream_loses_and_duplicates_nothing() {
    let store = Arc::new(Mutex::new(Store::default()));
    let server = Server::start(&store, any_port());
    let addr = server.addr;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(config(addr, dir.path())).unwrap();
    for ts in 0..100 {
        exporter.push(&reset(ts, "S"));
    }
    wait_until(&store, "the first 100 events", |s| s.resets().len() == 100);

    // The collector stops making batches durable, then dies with them unacknowledged.
    store.lock().unwrap().blackhole = true;
    for ts in 100..200 {
        exporter.push(&reset(ts, "S"));
    }
    wait_until(&store, "batches sent into the black hole", |s| s.blackholed >= 5);
    drop(server);
    store.lock().unwrap().blackhole = false;
    // The agent keeps capturing while the collector is down.
    for ts in 200..300 {
        exporter.push(&reset(ts, "S"));
    }
    std::thread::sleep(Duration::from_millis(300));
    let _server = Server::start(&store, addr);
    let report = exporter.finish(Duration::from_secs(30));
    assert_eq!(report.unacked_batches, 0, "{report:?}");
    let store = store.lock().unwrap();
    assert_eq!(store.resets(), (0..300).collect::<Vec<_>>());
    assert_eq!(store.gaps, 0);
    assert!(store.blackholed >= 5, "unacknowledged batches were resent");
    assert!(store.hellos.len() >= 2, "the agent reconnected");
    assert_eq!(store.hellos[0].boot_id, store.hellos[store.hellos.len() - 1].boot_id);
}

#[test]
fn a_restarted_agent_resends_its_spool_under_the_same_boot_id() {
    let store = Arc::new(Mutex::new(Store::default()));
    let addr = free_port();
    let dir = tempfile::tempdir().unwrap();
    {
        // No collector: everything stays in the spool, and the run says so.
        let exporter = Exporter::start(config(addr, dir.path())).unwrap();
        for ts in 0..55 {
            exporter.push(&reset(ts, "S"));
        }
        let report = exporter.finish(Duration::from_millis(300));
        assert_eq!(report.unacked_batches, 6, "{report:?}");
    }
    let server = Server::start(&store, addr);
    let exporter = Exporter::start(config(server.addr, dir.path())).unwrap();
    for ts in 55..60 {
        exporter.push(&reset(ts, "S"));
    }
    let report = exporter.finish(Duration::from_secs(20));
    assert_eq!(report.unacked_batches, 0, "{report:?}");
    let store = store.lock().unwrap();
    assert_eq!(store.resets(), (0..60).collect::<Vec<_>>());
    assert_eq!(store.batches.iter().map(|b| b.seq).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    assert_eq!(store.hellos.len(), 1);
    // Each batch tells how far the spool reached when it was sent (the collector shows the
    // difference as the agent's backlog): the first one already knew the six spooled before.
    let spooled: Vec<u64> = store.batches.iter().map(|b| b.spooled_seq).collect();
    assert!(spooled[0] >= 6, "{spooled:?}");
    assert!(store.batches.iter().all(|b| (b.seq..=7).contains(&b.spooled_seq)), "{spooled:?}");
}

#[test]
fn spool_full_drops_are_counted_and_reported_as_capture_loss() {
    let store = Arc::new(Mutex::new(Store::default()));
    let addr = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(addr, dir.path());
    config.spool_max_bytes = 256 << 10;
    let exporter = Exporter::start(config).unwrap();
    // ~10 KiB per event, ~100 KiB per batch: the 256 KiB spool holds two batches.
    let history = "x".repeat(10_000);
    for ts in 0..100 {
        exporter.push(&reset(ts, &history));
    }
    exporter.flush();
    let dropped = exporter.stats().events_dropped;
    assert!(dropped >= 70, "dropped {dropped}");
    let server = Server::start(&store, addr);
    let report = exporter.finish(Duration::from_secs(20));
    assert_eq!(report.unacked_batches, 0, "{report:?}");
    assert_eq!(report.stats.events_dropped, dropped);
    let store = store.lock().unwrap();
    let losses: Vec<&v1::CaptureLoss> = store
        .events()
        .filter_map(|e| match e {
            v1::event::Kind::Loss(l) => Some(l),
            _ => None,
        })
        .collect();
    let reported: u64 = losses.iter().filter(|l| l.reason == SPOOL_FULL).map(|l| l.events_dropped).sum();
    assert_eq!(reported, dropped);
    assert_eq!(store.resets().len() as u64 + dropped, 100);
    drop(server);
}

/// One reset sent with `token` to a collector that requires `s3cret`, waiting up to `wait` for
/// its acknowledgement: how the export ended, and what the collector stored.
fn send_with_token(token: &str, wait: Duration) -> (FinishReport, Arc<Mutex<Store>>) {
    let store = Arc::new(Mutex::new(Store { required_token: Some("s3cret".into()), ..Store::default() }));
    let server = Server::start(&store, any_port());
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(server.addr, dir.path());
    config.token = Some(token.into());
    let exporter = Exporter::start(config).unwrap();
    exporter.push(&reset(1, "S"));
    (exporter.finish(wait), store)
}

#[test]
fn token_is_sent_as_bearer_authorization() {
    let (report, store) = send_with_token("s3cret", Duration::from_secs(20));
    assert_eq!(report.unacked_batches, 0);
    assert_eq!(store.lock().unwrap().resets(), vec![1]);
}

/// A wrong token leaves the batches in the spool, and the report says why, naming the setting.
#[test]
fn a_refused_token_is_named_when_batches_stay_unacknowledged() {
    let (report, _) = send_with_token("wrong", Duration::from_secs(3));
    assert_eq!(report.unacked_batches, 1);
    let why = report.last_error.unwrap_or_default();
    assert!(why.contains("the collector refused the token (--token / RSTSCOPE_TOKEN)"), "{why}");
}

/// A pcap (LINKTYPE_RAW) of a refused connection: SYN, then RST+ACK 1 ms later.
fn refused_pcap(path: &Path, t0_s: u32) {
    fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
    let packet = |from_client: bool, flags: u8, seq: u32, ack: u32| {
        let (src, dst, sport, dport) = if from_client {
            ([10, 0, 0, 1], [10, 0, 0, 2], 40_000u16, 81u16)
        } else {
            ([10, 0, 0, 2], [10, 0, 0, 1], 81, 40_000)
        };
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 6, 0, tcp.len() as u8]);
        pseudo.extend_from_slice(&tcp);
        let sum = checksum(&pseudo).to_be_bytes();
        tcp[16..18].copy_from_slice(&sum);
        let mut ip = vec![0x45, 0, 0, (20 + tcp.len()) as u8, 0, 1, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = checksum(&ip).to_be_bytes();
        ip[10..12].copy_from_slice(&sum);
        ip.extend_from_slice(&tcp);
        ip
    };
    let mut file = Vec::new();
    for word in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65_535, 101] {
        // Magic, version 2.4 (as two u16), thiszone, sigfigs, snaplen, link type.
        if word == 0x0004_0002 {
            file.extend_from_slice(&2u16.to_le_bytes());
            file.extend_from_slice(&4u16.to_le_bytes());
        } else {
            file.extend_from_slice(&word.to_le_bytes());
        }
    }
    for (usec, data) in [(0u32, packet(true, 0x02, 1000, 0)), (1000, packet(false, 0x14, 0, 1001))] {
        for word in [t0_s, usec, data.len() as u32, data.len() as u32] {
            file.extend_from_slice(&word.to_le_bytes());
        }
        file.extend_from_slice(&data);
    }
    std::fs::write(path, file).unwrap();
}

#[test]
fn cli_reads_a_file_ships_it_and_exits_once_acknowledged() {
    let store = Arc::new(Mutex::new(Store::default()));
    let server = Server::start(&store, any_port());
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("refused.pcap");
    refused_pcap(&pcap, 1_700_000_000);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rstscope-agent"))
        .arg("--read")
        .arg(&pcap)
        .args(["--collector", &format!("http://{}", server.addr), "--name", "cli", "--ack-timeout", "20"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty(), "stdout is off with --collector unless -o is given");
    let store = store.lock().unwrap();
    let kinds: Vec<&str> = store
        .events()
        .map(|e| match e {
            v1::event::Kind::Reset(_) => "reset",
            v1::event::Kind::Flow(_) => "flow",
            v1::event::Kind::Loss(_) => "loss",
            v1::event::Kind::Watermark(_) => "watermark",
            v1::event::Kind::Open(_) => "open",
        })
        .collect();
    assert_eq!(kinds, vec!["reset", "flow", "watermark"]);
    let last = store.events().last();
    assert!(matches!(last, Some(v1::event::Kind::Watermark(w)) if w.ts_ns == 1_700_000_000_001_000_000));
    assert_eq!(store.hellos[0].interfaces, vec![v1::Interface { name: pcap.display().to_string(), link_type: 101 }]);
}

#[test]
fn cli_without_a_collector_exits_3_and_keeps_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("refused.pcap");
    refused_pcap(&pcap, 1_700_000_000);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rstscope-agent"))
        .arg("--read")
        .arg(&pcap)
        .args([
            "--collector",
            &format!("http://{}", free_port()),
            "--name",
            "cli",
            "--ack-timeout",
            "0.5",
            "-o",
            "json",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The reset and the flow summary, then the end-of-capture watermark: one batch, or two
    // when the batcher's 200 ms age cut (wall clock) falls between them on a loaded machine.
    assert!(stderr.contains("1 batches not acknowledged") || stderr.contains("2 batches not acknowledged"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 3, "reset, flow and stats with -o json: {stdout}");
    assert_eq!(std::fs::read_dir(dir.path().join("state/spool")).unwrap().count(), 1);
}
