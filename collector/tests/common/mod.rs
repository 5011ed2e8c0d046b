//! A real collector in-process on 127.0.0.1:0 over a real sled directory, and the agent side of
//! the ingest protocol, for the integration tests. Every wait is bounded.

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rstscope_collector::auth::AddToken;
use rstscope_collector::service::{self, Hub, Limits, Security, ServeError};
use rstscope_collector::store::{Store, StoreConfig};
use rstscope_proto::v1::{
    self, agent_message, collector_message, event, ingest_client::IngestClient, query_client::QueryClient,
    AgentMessage, CollectorMessage,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

/// 2023-11-14T22:13:20Z.
pub const T0: i64 = 1_700_000_000_000_000_000;

pub struct TestCollector {
    pub addr: SocketAddr,
    pub url: String,
    pub hub: Arc<Hub>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

/// Opens the store, retrying briefly while a previous instance in this process lets go of it.
pub async fn open_store(dir: &Path) -> Store {
    for _ in 0..50 {
        let config = StoreConfig::new(dir);
        match tokio::task::spawn_blocking(move || Store::open(config)).await.unwrap() {
            Ok(store) => return store,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("the store in {} does not open", dir.display());
}

pub async fn start_with(dir: &Path, security: Security, limits: Limits) -> TestCollector {
    let store = open_store(dir).await;
    let hub = Hub::new(store, limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let scheme = if security.tls.is_some() { "https" } else { "http" };
    let task = tokio::spawn(service::serve(hub.clone(), listener, security, async {
        let _ = stopped.await;
    }));
    TestCollector { addr, url: format!("{scheme}://{addr}"), hub, stop: Some(stop), task }
}

pub async fn start(dir: &Path) -> TestCollector {
    start_with(dir, Security::default(), Limits::default()).await
}

impl TestCollector {
    /// Stops the server and waits until it has let go of the store.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task).await.expect("server stops in time").unwrap().unwrap();
        let store = self.hub.store().unwrap();
        tokio::task::spawn_blocking(move || store.flush()).await.unwrap().unwrap();
    }

    pub async fn channel(&self) -> Channel {
        tokio::time::timeout(WAIT, Channel::from_shared(self.url.clone()).unwrap().connect())
            .await
            .expect("connects in time")
            .expect("connects")
    }

    pub async fn query(&self, token: Option<&str>) -> QueryClient<InterceptedService<Channel, AddToken>> {
        QueryClient::with_interceptor(self.channel().await, AddToken::new(token).unwrap())
    }

    pub async fn ingest(&self, token: Option<&str>) -> IngestClient<InterceptedService<Channel, AddToken>> {
        IngestClient::with_interceptor(self.channel().await, AddToken::new(token).unwrap())
            .max_encoding_message_size(64 << 20)
    }

    /// All stored resets, through the query service.
    pub async fn resets(&self, filter: v1::ResetFilter) -> Vec<v1::ResetRecord> {
        let mut client = self.query(None).await;
        let mut stream = client.list_resets(filter).await.unwrap().into_inner();
        let mut out = Vec::new();
        for _ in 0..100_000 {
            match tokio::time::timeout(WAIT, stream.message()).await.expect("answers in time").unwrap() {
                Some(record) => out.push(record),
                None => return out,
            }
        }
        panic!("too many records");
    }
}

/// One agent's open ingest stream.
pub struct AgentStream {
    pub tx: mpsc::Sender<AgentMessage>,
    pub rx: Streaming<CollectorMessage>,
}

pub fn hello(name: &str, boot_id: &str) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Hello(v1::AgentHello {
            agent_name: name.into(),
            host_name: format!("{name}.example"),
            software_version: "0.1.0".into(),
            boot_id: boot_id.into(),
            local_addresses: vec![vec![192, 0, 2, 1]],
            ..Default::default()
        })),
    }
}

pub fn batch(seq: u64, events: Vec<v1::Event>) -> AgentMessage {
    AgentMessage { kind: Some(agent_message::Kind::Batch(v1::Batch { seq, events, spooled_seq: 0 })) }
}

pub fn endpoint(ip: [u8; 4], port: u32) -> Option<v1::Endpoint> {
    Some(v1::Endpoint { ip: ip.to_vec(), port })
}

/// A RST+ACK from 192.0.2.1:443 to 198.51.100.7:`client_port` at `T0 + offset_ms`.
pub fn reset(offset_ms: i64, client_port: u32) -> v1::Event {
    v1::Event {
        kind: Some(event::Kind::Reset(v1::RstEvent {
            ts_ns: T0 + offset_ms * 1_000_000,
            src: endpoint([192, 0, 2, 1], 443),
            dst: endpoint([198, 51, 100, 7], client_port),
            conn_id: u64::from(client_port),
            sender: v1::Role::Responder as i32,
            flags: 0x014,
            seq: 1000 + offset_ms as u32,
            ack: 2000,
            ttl: 64,
            ip_id: Some(7),
            cause: v1::Cause::Refused as i32,
            phase: v1::Phase::SynSent as i32,
            history: "Sr".into(),
            evidence: vec![v1::Evidence { name: "answers-syn".into(), detail: "ack = client ISN + 1".into() }],
            ..Default::default()
        })),
    }
}

pub fn flow(client_port: u32) -> v1::Event {
    v1::Event {
        kind: Some(event::Kind::Flow(v1::FlowSummary {
            conn_id: u64::from(client_port),
            orig: endpoint([198, 51, 100, 7], client_port),
            resp: endpoint([192, 0, 2, 1], 443),
            start_ns: T0,
            end_ns: T0 + 1_000_000,
            conn_state: "REJ".into(),
            history: "Sr".into(),
            end: v1::FlowEnd::Closed as i32,
            ..Default::default()
        })),
    }
}

pub fn watermark(offset_ms: i64) -> v1::Event {
    v1::Event {
        kind: Some(event::Kind::Watermark(v1::Watermark {
            ts_ns: T0 + offset_ms * 1_000_000,
            since_ns: 0,
            ended: false,
            ..Default::default()
        })),
    }
}

impl AgentStream {
    /// Opens a stream and sends `first` (normally a hello); does not wait for an answer.
    pub async fn open(collector: &TestCollector, token: Option<&str>, first: AgentMessage) -> Result<Self, Status> {
        let mut client = collector.ingest(token).await;
        let (tx, outbound) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let rx = tokio::time::timeout(WAIT, client.stream(ReceiverStream::new(outbound)))
            .await
            .expect("stream opens in time")?
            .into_inner();
        Ok(AgentStream { tx, rx })
    }

    /// Opens a stream with a hello and returns it with the welcome's durable seq.
    pub async fn connect(collector: &TestCollector, name: &str, boot_id: &str) -> (Self, u64) {
        Self::connect_with(collector, hello(name, boot_id)).await
    }

    /// Opens a stream with this hello and returns it with the welcome's durable seq.
    pub async fn connect_with(collector: &TestCollector, hello: AgentMessage) -> (Self, u64) {
        let mut stream = AgentStream::open(collector, None, hello).await.unwrap();
        match stream.next().await {
            Ok(collector_message::Kind::Welcome(welcome)) => {
                assert_eq!(welcome.max_batch_events, 5000);
                (stream, welcome.durable_seq)
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// The collector's next message, or the status that ended the stream.
    pub async fn next(&mut self) -> Result<collector_message::Kind, Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await.expect("the collector answers in time")? {
            Some(CollectorMessage { kind: Some(kind) }) => Ok(kind),
            Some(CollectorMessage { kind: None }) => panic!("an empty collector message"),
            None => Err(Status::cancelled("the collector closed the stream without a status")),
        }
    }

    /// Sends a batch and returns the acknowledged seq, or the refusal.
    pub async fn send(&mut self, message: AgentMessage) -> Result<u64, Status> {
        // A refused stream may be gone already: the refusal comes through `next`.
        let _ = self.tx.send(message).await;
        match self.next().await? {
            collector_message::Kind::Ack(ack) => Ok(ack.seq),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}
