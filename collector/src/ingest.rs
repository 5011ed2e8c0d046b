//! The `Ingest` gRPC service: one long-lived stream per agent.
//!
//! The protocol (see `proto/rstscope/v1/ingest.proto`) is hello, welcome with the durable batch
//! number, then numbered batches each acknowledged once durable. This module is the shell around
//! the store: it checks every message with the pure `check_*` functions *before* anything is
//! stored (one bad event refuses its whole batch, so a batch is stored entirely or not at all),
//! runs the blocking sled calls off the async threads, and publishes the resets it stored for
//! `FollowResets`. It also keeps the in-memory view of which agents are connected right now,
//! which the store cannot know.
//!
//! One stream per agent name at a time: two streams for one name would interleave batch numbers
//! of one spool and one of them would be refused for gaps forever. A half-open old stream
//! (agent host rebooted) is detected by HTTP/2 keepalive and then frees the name.

use std::collections::HashMap;
use std::fmt::Display;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use rstscope_proto::v1::{
    self, agent_message, collector_message, event, AgentHello, AgentMessage, Batch, CollectorMessage,
};
use rstscope_proto::FlowKey;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use crate::metrics::Metrics;
use crate::pb;
use crate::service::Hub;
use crate::store::{Appended, Pending};

/// Earliest time accepted in any event: 1990-01-01T00:00:00Z, ns since the epoch.
pub const MIN_TIME_NS: i64 = 631_152_000 * 1_000_000_000;
/// Latest time accepted in any event: 2100-01-01T00:00:00Z, ns since the epoch.
pub const MAX_TIME_NS: i64 = 4_102_444_800 * 1_000_000_000;
/// Longest agent name.
pub const MAX_AGENT_NAME: usize = 64;
/// Longest boot id.
pub const MAX_BOOT_ID: usize = 64;
/// How long a new stream may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

const MAX_SHORT_TEXT: usize = 256;
const MAX_DETAIL: usize = 1024;
const MAX_EVIDENCE: usize = 64;
const MAX_ADDRESSES: usize = 1024;
const MAX_INTERFACES: usize = 256;

/// A message that breaks the protocol's rules; the text says which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CheckError(pub String);

fn fail<T>(text: impl Into<String>) -> Result<T, CheckError> {
    Err(CheckError(text.into()))
}

/// Prefixes a check error with where it happened (`batch 7, event 3: ...`).
fn within<T>(place: impl FnOnce() -> String, result: Result<T, CheckError>) -> Result<T, CheckError> {
    result.map_err(|e| CheckError(format!("{}: {}", place(), e.0)))
}

/// Agent names: 1 to 64 characters of `[A-Za-z0-9._-]`, so they are safe in logs, keys and
/// command lines.
pub fn check_agent_name(name: &str) -> Result<(), CheckError> {
    if name.is_empty() {
        return fail("agent_name is empty");
    }
    if name.len() > MAX_AGENT_NAME {
        return fail(format!("agent_name is {} characters long; the limit is {MAX_AGENT_NAME}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return fail(format!("agent_name {name:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

// Field names are `impl Display` so that a caller can name an indexed field with
// `format_args!` and pay for the text only when the check fails (it runs for every event).

fn check_text(field: impl Display, text: &str, max: usize) -> Result<(), CheckError> {
    if text.len() > max {
        return fail(format!("{field} is {} bytes long; the limit is {max}", text.len()));
    }
    Ok(())
}

/// Times must lie between 1990 and 2100: anything else is a broken clock or a broken encoder,
/// and would scatter the store's time-ordered keys.
pub fn check_time(field: &str, ns: i64) -> Result<(), CheckError> {
    if !(MIN_TIME_NS..MAX_TIME_NS).contains(&ns) {
        return fail(format!("{field} = {ns} ns is not between 1990 and 2100"));
    }
    Ok(())
}

fn check_ip(field: impl Display, ip: &[u8]) -> Result<(), CheckError> {
    if pb::ip_from_bytes(ip).is_none() {
        return fail(format!("{field} has {} bytes; an address has 4 (IPv4) or 16 (IPv6)", ip.len()));
    }
    Ok(())
}

/// An endpoint must be present, with a 4- or 16-byte address and a port up to 65535.
pub fn check_endpoint(field: &str, endpoint: Option<&v1::Endpoint>) -> Result<(), CheckError> {
    let Some(endpoint) = endpoint else { return fail(format!("{field} is missing")) };
    check_ip(format_args!("{field}.ip"), &endpoint.ip)?;
    if endpoint.port > u32::from(u16::MAX) {
        return fail(format!("{field}.port = {} is above 65535", endpoint.port));
    }
    Ok(())
}

fn check_max(field: impl Display, value: u32, max: u32) -> Result<(), CheckError> {
    if value > max {
        return fail(format!("{field} = {value} is above {max}"));
    }
    Ok(())
}

/// The hello: a valid agent name, bounded strings and lists, proper addresses.
pub fn check_hello(hello: &AgentHello) -> Result<(), CheckError> {
    check_agent_name(&hello.agent_name)?;
    check_text("host_name", &hello.host_name, MAX_SHORT_TEXT)?;
    check_text("software_version", &hello.software_version, MAX_SHORT_TEXT)?;
    check_text("boot_id", &hello.boot_id, MAX_BOOT_ID)?;
    if hello.local_addresses.len() > MAX_ADDRESSES {
        return fail(format!("{} local_addresses; the limit is {MAX_ADDRESSES}", hello.local_addresses.len()));
    }
    for (i, ip) in hello.local_addresses.iter().enumerate() {
        check_ip(format_args!("local_addresses[{i}]"), ip)?;
    }
    if hello.interfaces.len() > MAX_INTERFACES {
        return fail(format!("{} interfaces; the limit is {MAX_INTERFACES}", hello.interfaces.len()));
    }
    for (i, interface) in hello.interfaces.iter().enumerate() {
        check_text(format_args!("interfaces[{i}].name"), &interface.name, MAX_SHORT_TEXT)?;
    }
    Ok(())
}

/// One RST event: endpoints, header fields within their bit widths, sane times, bounded text.
pub fn check_reset(reset: &v1::RstEvent) -> Result<(), CheckError> {
    check_time("ts_ns", reset.ts_ns)?;
    check_endpoint("src", reset.src.as_ref())?;
    check_endpoint("dst", reset.dst.as_ref())?;
    check_max("flags", reset.flags, 0xfff)?;
    check_max("payload_len", reset.payload_len, 65_535)?;
    check_max("window", reset.window, 65_535)?;
    check_max("ttl", reset.ttl, 255)?;
    if let Some(ip_id) = reset.ip_id {
        check_max("ip_id", ip_id, 65_535)?;
    }
    if reset.since_peer_last_ns.is_some_and(|ns| ns < 0) {
        return fail("since_peer_last_ns is negative");
    }
    check_text("history", &reset.history, MAX_SHORT_TEXT)?;
    if let Some(answers) = &reset.answers {
        check_time("answers.ts_ns", answers.ts_ns)?;
        check_max("answers.flags", answers.flags, 0xfff)?;
        check_max("answers.payload_len", answers.payload_len, 65_535)?;
    }
    if reset.evidence.len() > MAX_EVIDENCE {
        return fail(format!("{} evidence items; the limit is {MAX_EVIDENCE}", reset.evidence.len()));
    }
    for (i, evidence) in reset.evidence.iter().enumerate() {
        check_text(format_args!("evidence[{i}].name"), &evidence.name, MAX_SHORT_TEXT)?;
        check_text(format_args!("evidence[{i}].detail"), &evidence.detail, MAX_DETAIL)?;
    }
    Ok(())
}

fn check_direction(field: &str, direction: Option<&v1::DirectionSummary>) -> Result<(), CheckError> {
    let Some(ttl) = direction.and_then(|d| d.ttl.as_ref()) else { return Ok(()) };
    for (name, value) in [("first", ttl.first), ("last", ttl.last), ("min", ttl.min), ("max", ttl.max)] {
        check_max(format_args!("{field}.ttl.{name}"), value, 255)?;
    }
    Ok(())
}

/// One flow summary: endpoints, start before end, sane times, bounded text.
pub fn check_flow(flow: &v1::FlowSummary) -> Result<(), CheckError> {
    check_endpoint("orig", flow.orig.as_ref())?;
    check_endpoint("resp", flow.resp.as_ref())?;
    check_time("start_ns", flow.start_ns)?;
    check_time("end_ns", flow.end_ns)?;
    if flow.end_ns < flow.start_ns {
        return fail(format!("end_ns {} is before start_ns {}", flow.end_ns, flow.start_ns));
    }
    check_text("conn_state", &flow.conn_state, 16)?;
    check_text("history", &flow.history, MAX_SHORT_TEXT)?;
    check_direction("orig_dir", flow.orig_dir.as_ref())?;
    check_direction("resp_dir", flow.resp_dir.as_ref())
}

fn check_optional_time(field: &str, ns: Option<i64>) -> Result<(), CheckError> {
    ns.map_or(Ok(()), |ns| check_time(field, ns))
}

/// One connection opening: endpoints, sane times, header fields within their bit widths,
/// bounded option text.
pub fn check_open(open: &v1::ConnectionOpen) -> Result<(), CheckError> {
    check_endpoint("orig", open.orig.as_ref())?;
    check_endpoint("resp", open.resp.as_ref())?;
    check_time("start_ns", open.start_ns)?;
    check_optional_time("syn_ns", open.syn_ns)?;
    check_optional_time("synack_ns", open.synack_ns)?;
    check_max("orig_ttl", open.orig_ttl, 255)?;
    check_max("resp_ttl", open.resp_ttl, 255)?;
    if let Some(ip_id) = open.syn_ip_id {
        check_max("syn_ip_id", ip_id, 65_535)?;
    }
    check_text("syn_options", &open.syn_options, MAX_SHORT_TEXT)
}

/// A watermark: a sane time, and `since_ns` either 0 (unknown) or a sane time not after it;
/// `listed_until_ns` either 0 (none) or a sane time not before `ts_ns`, with at most
/// [`rstscope_proto::MAX_SETTLING_LISTED`] settling RSTs, each with its endpoints and a sane
/// time not after it.
pub fn check_watermark(mark: &v1::Watermark) -> Result<(), CheckError> {
    check_time("ts_ns", mark.ts_ns)?;
    if mark.since_ns != 0 {
        check_time("since_ns", mark.since_ns)?;
        if mark.since_ns > mark.ts_ns {
            return fail(format!("since_ns {} is after ts_ns {}", mark.since_ns, mark.ts_ns));
        }
    }
    if mark.listed_until_ns == 0 {
        if !mark.settling.is_empty() {
            return fail("settling RSTs listed without listed_until_ns");
        }
        return Ok(());
    }
    check_time("listed_until_ns", mark.listed_until_ns)?;
    if mark.listed_until_ns < mark.ts_ns {
        return fail(format!("listed_until_ns {} is before ts_ns {}", mark.listed_until_ns, mark.ts_ns));
    }
    let limit = rstscope_proto::MAX_SETTLING_LISTED;
    if mark.settling.len() > limit {
        return fail(format!("{} settling RSTs listed; the limit is {limit}", mark.settling.len()));
    }
    for (i, rst) in mark.settling.iter().enumerate() {
        within(|| format!("settling[{i}]"), check_settling(rst, mark.listed_until_ns))?;
    }
    Ok(())
}

fn check_settling(rst: &v1::SettlingRst, listed_until_ns: i64) -> Result<(), CheckError> {
    check_time("ts_ns", rst.ts_ns)?;
    if rst.ts_ns > listed_until_ns {
        return fail(format!("ts_ns {} is after listed_until_ns {listed_until_ns}", rst.ts_ns));
    }
    check_endpoint("src", rst.src.as_ref())?;
    check_endpoint("dst", rst.dst.as_ref())?;
    check_max("flags", rst.flags, 0xfff)
}

/// One capture-loss report: a period in order, sane times, bounded reason.
pub fn check_loss(loss: &v1::CaptureLoss) -> Result<(), CheckError> {
    check_time("from_ns", loss.from_ns)?;
    check_time("until_ns", loss.until_ns)?;
    if loss.until_ns < loss.from_ns {
        return fail(format!("until_ns {} is before from_ns {}", loss.until_ns, loss.from_ns));
    }
    check_text("reason", &loss.reason, MAX_DETAIL)
}

/// One event of any kind.
pub fn check_event(event: &v1::Event) -> Result<(), CheckError> {
    match &event.kind {
        Some(event::Kind::Reset(reset)) => within(|| "reset".into(), check_reset(reset)),
        Some(event::Kind::Flow(flow)) => within(|| "flow".into(), check_flow(flow)),
        Some(event::Kind::Loss(loss)) => within(|| "loss".into(), check_loss(loss)),
        Some(event::Kind::Watermark(mark)) => within(|| "watermark".into(), check_watermark(mark)),
        Some(event::Kind::Open(open)) => within(|| "open".into(), check_open(open)),
        None => fail("the event has no kind (reset, flow, open, loss or watermark)"),
    }
}

/// A batch: numbered from 1, at most `max_events` events, every event valid.
pub fn check_batch(batch: &Batch, max_events: usize) -> Result<(), CheckError> {
    let place = || format!("batch {}", batch.seq);
    if batch.seq == 0 {
        return fail("batch seq 0: batches are numbered from 1");
    }
    if batch.events.len() > max_events {
        return within(place, fail(format!("{} events; the limit is {max_events}", batch.events.len())));
    }
    if batch.spooled_seq != 0 && batch.spooled_seq < batch.seq {
        return within(place, fail(format!("spooled_seq {} is below the batch's own number", batch.spooled_seq)));
    }
    for (i, event) in batch.events.iter().enumerate() {
        within(|| format!("batch {}, event {i}", batch.seq), check_event(event))?;
    }
    Ok(())
}

impl From<CheckError> for Status {
    fn from(error: CheckError) -> Self {
        Status::invalid_argument(error.0)
    }
}

/// Resets stored from one batch, published for `FollowResets`.
#[derive(Debug)]
pub struct LiveBatch {
    /// Taken from [`Hub::next_order`] *before* the batch was stored: a follower that listed the
    /// store after order `n` was handed out has already seen every batch numbered up to `n`
    /// that made it into the store, and can skip their duplicates.
    pub order: u64,
    /// The reporting agent.
    pub agent: Arc<str>,
    /// The resets with their connections, in batch order.
    pub resets: Vec<(FlowKey, v1::RstEvent)>,
}

/// What the collector knows about one agent that the store does not: whether it is connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveAgent {
    /// An ingest stream is open.
    pub connected: bool,
    /// Last message, ns since the epoch (collector clock).
    pub last_seen_ns: i64,
    /// The highest batch number the agent last said its spool holds.
    pub spooled_seq: u64,
    /// The highest batch number acknowledged to it.
    pub acked_seq: u64,
}

impl LiveAgent {
    /// Batches in the agent's spool that are not durable here yet, as far as it told.
    pub fn spool_backlog(&self) -> u64 {
        self.spooled_seq.saturating_sub(self.acked_seq)
    }
}

/// The agents seen since the collector started, by name.
#[derive(Debug, Default)]
pub struct LiveAgents {
    by_name: Mutex<HashMap<String, LiveAgent>>,
}

/// Why a stream could not claim its agent name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    /// Another stream holds the name.
    AlreadyConnected,
    /// Too many agents are connected.
    TooMany(usize),
}

impl From<ClaimError> for Status {
    fn from(error: ClaimError) -> Self {
        match error {
            ClaimError::AlreadyConnected => Status::already_exists(
                "another stream for this agent name is open; one agent name per vantage point, one stream each",
            ),
            ClaimError::TooMany(limit) => {
                Status::resource_exhausted(format!("{limit} agents are connected; the collector accepts no more"))
            }
        }
    }
}

impl LiveAgents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveAgent>> {
        self.by_name.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `name` connected, unless it already is or `max_connected` are.
    pub fn claim(self: &Arc<Self>, name: &str, now_ns: i64, max_connected: usize) -> Result<Session, ClaimError> {
        let mut by_name = self.lock();
        if by_name.get(name).is_some_and(|a| a.connected) {
            return Err(ClaimError::AlreadyConnected);
        }
        if by_name.values().filter(|a| a.connected).count() >= max_connected {
            return Err(ClaimError::TooMany(max_connected));
        }
        by_name.insert(name.to_string(), LiveAgent { connected: true, last_seen_ns: now_ns, ..LiveAgent::default() });
        Ok(Session { agents: self.clone(), name: name.to_string() })
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> HashMap<String, LiveAgent> {
        self.lock().clone()
    }

    /// How many agents are connected now.
    pub fn connected(&self) -> usize {
        self.lock().values().filter(|a| a.connected).count()
    }
}

/// An agent name held by one open stream; dropping it marks the agent disconnected.
#[derive(Debug)]
pub struct Session {
    agents: Arc<LiveAgents>,
    name: String,
}

impl Session {
    /// Records a message from the agent.
    pub fn seen(&self, now_ns: i64) {
        if let Some(agent) = self.agents.lock().get_mut(&self.name) {
            agent.last_seen_ns = now_ns;
        }
    }

    /// Records the agent's spool position told with a batch.
    pub fn spooled(&self, spooled_seq: u64) {
        if let Some(agent) = self.agents.lock().get_mut(&self.name) {
            agent.spooled_seq = agent.spooled_seq.max(spooled_seq);
        }
    }

    /// Records the highest batch acknowledged to the agent (also the durable one at hello).
    pub fn acked(&self, seq: u64) {
        if let Some(agent) = self.agents.lock().get_mut(&self.name) {
            agent.acked_seq = agent.acked_seq.max(seq);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let now = now_ns();
        if let Some(agent) = self.agents.lock().get_mut(&self.name) {
            agent.connected = false;
            agent.last_seen_ns = agent.last_seen_ns.max(now);
        }
    }
}

/// The collector's wall clock in ns since the epoch: used for "last seen" and retention only,
/// never for event times.
pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// The `Ingest` service.
#[derive(Clone)]
pub struct IngestService {
    hub: Arc<Hub>,
}

impl IngestService {
    /// A service over the shared collector state.
    pub fn new(hub: Arc<Hub>) -> Self {
        IngestService { hub }
    }
}

type Outbound = mpsc::Sender<Result<CollectorMessage, Status>>;

/// The response stream of `Stream`.
pub type CollectorStream = Pin<Box<dyn Stream<Item = Result<CollectorMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::ingest_server::Ingest for IngestService {
    type StreamStream = CollectorStream;

    async fn stream(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let hub = self.hub.clone();
        let span = tracing::info_span!("ingest", %peer);
        // The session runs in its own task so that the response headers go out at once: the
        // client may wait for them before it sends its hello.
        tokio::spawn(
            async move {
                if let Err(status) = run_session(&hub, inbound, &tx).await {
                    debug!(code = ?status.code(), message = status.message(), "Ingest stream ended with an error.");
                    let _ = tx.send(Err(status)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn send(tx: &Outbound, kind: collector_message::Kind) -> Result<(), Status> {
    tx.send(Ok(CollectorMessage { kind: Some(kind) }))
        .await
        .map_err(|_| Status::cancelled("the agent closed the stream"))
}

async fn run_session(hub: &Arc<Hub>, mut inbound: Streaming<AgentMessage>, tx: &Outbound) -> Result<(), Status> {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(message) => message?,
        Err(_) => return Err(Status::deadline_exceeded("no hello within 30 s")),
    };
    let Some(first) = first else { return Ok(()) };
    let Some(agent_message::Kind::Hello(hello)) = first.kind else {
        return Err(Status::invalid_argument("the first message of a stream must be hello"));
    };
    check_hello(&hello)?;
    // An agent comes back after its batches were refused: if that was a storage failure that
    // left the store unable to write (a full disk, since freed), reopen it first.
    let reopen = hub.clone();
    let _ = tokio::task::spawn_blocking(move || reopen.reopen_store_if_broken()).await;
    let session = hub.agents.claim(&hello.agent_name, now_ns(), hub.limits.max_agents)?;
    let agent: Arc<str> = Arc::from(hello.agent_name.as_str());
    let boot_id = hello.boot_id.clone();
    let span = tracing::info_span!("agent", agent = %agent, boot_id = %boot_id);
    async move {
        let store = hub.store()?;
        let now = now_ns();
        let durable_seq = blocking({
            let hub = hub.clone();
            move || {
                hub.hello_to_correlation(&hello);
                // The correlation needs the agent's addresses again after a collector restart,
                // before the agent says hello anew.
                store.set_meta(
                    &crate::live::local_meta_key(&hello.agent_name),
                    &crate::live::join_addresses(&hello.local_addresses),
                )?;
                store.hello(&hello, now)
            }
        })
        .await?;
        info!(durable_seq, "Agent connected.");
        session.acked(durable_seq);
        let max_batch_events = u32::try_from(hub.limits.max_batch_events).unwrap_or(u32::MAX);
        send(tx, collector_message::Kind::Welcome(v1::Welcome { durable_seq, max_batch_events })).await?;
        let result = serve_batches(hub, &mut inbound, tx, &session, &agent, &boot_id).await;
        match &result {
            Ok(()) => info!("Agent disconnected."),
            Err(status) => warn!(code = ?status.code(), message = status.message(), "Agent stream refused."),
        }
        result
    }
    .instrument(span)
    .await
}

/// Batches of one stream written but not yet acknowledged: the next batch is read and written
/// while earlier ones wait for their flush (acknowledgements still go out in order).
const MAX_IN_FLIGHT: usize = 8;

/// What one batch ends in: durable (to hand on and acknowledge), or the error ending the stream.
type Outcome = Pin<Box<dyn std::future::Future<Output = Result<Durable, Status>> + Send>>;

async fn serve_batches(
    hub: &Arc<Hub>,
    inbound: &mut Streaming<AgentMessage>,
    tx: &Outbound,
    session: &Session,
    agent: &Arc<str>,
    boot_id: &str,
) -> Result<(), Status> {
    let closed = hub.closed();
    tokio::pin!(closed);
    let mut in_flight: FuturesOrdered<Outcome> = FuturesOrdered::new();
    // No more batches are read once the agent closed its side or a batch failed: the failure
    // ends the stream after the acknowledgements of the batches before it.
    let mut reading = true;
    loop {
        if !reading && in_flight.is_empty() {
            return Ok(());
        }
        tokio::select! {
            biased;
            Some(outcome) = in_flight.next(), if !in_flight.is_empty() => {
                // FuturesOrdered yields in the order the batches came: handed on in that order.
                let durable = outcome.inspect_err(|_| Metrics::bump(&hub.metrics.batches_rejected, 1))?;
                let seq = hand_on(hub, agent, durable).await?;
                send(tx, collector_message::Kind::Ack(v1::Ack { seq })).await?;
                session.acked(seq);
            }
            message = inbound.message(), if reading && in_flight.len() < MAX_IN_FLIGHT => {
                let Some(message) = message? else {
                    reading = false;
                    continue;
                };
                session.seen(now_ns());
                let batch = match message.kind {
                    Some(agent_message::Kind::Batch(batch)) => {
                        if batch.spooled_seq >= batch.seq {
                            session.spooled(batch.spooled_seq);
                        }
                        batch
                    }
                    Some(agent_message::Kind::Hello(_)) => {
                        return Err(Status::invalid_argument("hello was already sent on this stream"))
                    }
                    None => return Err(Status::invalid_argument("a message with neither hello nor batch")),
                };
                let outcome = write_batch(hub, batch, agent, boot_id).await;
                reading = outcome.is_ok();
                in_flight.push_back(match outcome {
                    Ok(written) => {
                        let hub = hub.clone();
                        Box::pin(async move { make_durable(&hub, written).await })
                    }
                    Err(status) => Box::pin(std::future::ready(Err(status))),
                });
            }
            () = &mut closed => return Err(Status::unavailable("the collector is shutting down; reconnect later")),
        }
    }
}

/// A batch written to the store, waiting to be made durable.
struct Written {
    order: u64,
    batch: Batch,
    pending: Pending,
}

/// Checks and writes one batch (not yet durable); a gap is refused here.
async fn write_batch(hub: &Arc<Hub>, batch: Batch, agent: &Arc<str>, boot_id: &str) -> Result<Written, Status> {
    check_batch(&batch, hub.limits.max_batch_events)?;
    let order = hub.next_order.fetch_add(1, Ordering::SeqCst) + 1;
    let store = hub.store()?;
    let (agent_name, boot) = (agent.to_string(), boot_id.to_string());
    let (pending, batch) = blocking(move || {
        let pending = store.write_batch(&agent_name, &boot, &batch, now_ns());
        pending.map(|p| (p, batch))
    })
    .await?;
    if let Appended::Gap { durable_seq } = pending.outcome() {
        return Err(Status::failed_precondition(format!(
            "batch {} does not follow the last durable batch {durable_seq}: expected batch {}",
            batch.seq,
            durable_seq + 1
        )));
    }
    Ok(Written { order, batch, pending })
}

/// A batch made durable: the number to acknowledge and, if it stored anything new, the events
/// to hand on (see [`hand_on`]).
struct Durable {
    seq_to_ack: u64,
    stored: Option<(u64, Vec<v1::Event>)>,
}

/// Waits until a written batch is durable. Several of one stream's batches wait at once (their
/// fsyncs are shared), and finish in any order: what they stored is handed on by [`hand_on`] in
/// the stream's order.
async fn make_durable(hub: &Arc<Hub>, written: Written) -> Result<Durable, Status> {
    let Written { order, mut batch, pending } = written;
    let already_stored = pending.already_stored().to_vec();
    let store = hub.store()?;
    let seq = batch.seq;
    let appended = blocking(move || store.make_durable(pending)).await?;
    match appended {
        Appended::Stored { durable_seq } => {
            // Events the store already held (an agent restarted mid-file sends them again) are
            // not passed on: followers and the correlation see each event once, as stored.
            if !already_stored.is_empty() {
                let mut position = 0;
                batch.events.retain(|_| {
                    position += 1;
                    already_stored.binary_search(&(position - 1)).is_err()
                });
            }
            Metrics::bump(&hub.metrics.batches, 1);
            Metrics::bump(&hub.metrics.events_in, batch.events.len() as u64);
            debug!(seq, events = batch.events.len(), "Batch stored.");
            Ok(Durable { seq_to_ack: durable_seq, stored: Some((order, batch.events)) })
        }
        Appended::Duplicate { durable_seq } => {
            debug!(seq, durable_seq, "Batch already stored; acknowledged again.");
            Ok(Durable { seq_to_ack: durable_seq, stored: None })
        }
        Appended::Gap { durable_seq } => Err(Status::failed_precondition(format!(
            "batch {seq} does not follow the last durable batch {durable_seq}"
        ))),
    }
}

/// Publishes a durable batch's resets to followers and queues its events for the correlation,
/// then returns the number to acknowledge. Called for one stream's batches in the order the
/// agent sent them: the correlation relies on it (a watermark covers the events sent before it,
/// so it must not reach the engine ahead of them).
async fn hand_on(hub: &Arc<Hub>, agent: &Arc<str>, durable: Durable) -> Result<u64, Status> {
    let Some((order, events)) = durable.stored else { return Ok(durable.seq_to_ack) };
    let (worker, agent) = (hub.clone(), agent.clone());
    // On a blocking thread: the correlation's queue may write to its file.
    blocking(move || {
        publish(&worker, order, &agent, &events);
        worker.inbox.push(agent, events);
        Ok(())
    })
    .await?;
    // Back-pressure only when the correlation's queue cannot take more without waiting (its
    // file failed or is full; see `backlog.rs`). The ticker may be storing reports or sleeping
    // until its next turn (up to a second) meanwhile: a feeder takes the engine as soon as a
    // decision in progress lets go of it, so an acknowledgement waits for the correlation's
    // work, never for its timer. Not awaited: the queue is taken when the feeder starts, and
    // the feeding itself must not hold up this stream's acknowledgements.
    if hub.inbox.must_wait() {
        hub.feed_correlation_soon();
        hub.inbox.room().await;
    }
    Ok(durable.seq_to_ack)
}

fn publish(hub: &Hub, order: u64, agent: &Arc<str>, events: &[v1::Event]) {
    if hub.live.receiver_count() == 0 {
        return;
    }
    let resets: Vec<(FlowKey, v1::RstEvent)> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(event::Kind::Reset(reset)) => Some((pb::flow_key_of(reset)?, reset.clone())),
            _ => None,
        })
        .collect();
    if !resets.is_empty() {
        // No receivers left between the check and the send is fine: nobody follows.
        let _ = hub.live.send(Arc::new(LiveBatch { order, agent: agent.clone(), resets }));
    }
}

/// Runs a store call on a blocking thread: sled may fsync.
pub(crate) async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(Status::from),
        Err(join) => Err(Status::internal(format!("a store task failed: {join}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backlog::MEMORY_EVENTS;

    fn endpoint(ip: &[u8], port: u32) -> Option<v1::Endpoint> {
        Some(v1::Endpoint { ip: ip.to_vec(), port })
    }

    fn reset() -> v1::RstEvent {
        v1::RstEvent {
            ts_ns: 1_700_000_000_000_000_000,
            src: endpoint(&[192, 0, 2, 1], 443),
            dst: endpoint(&[198, 51, 100, 7], 50_000),
            flags: 0x014,
            ttl: 64,
            ..Default::default()
        }
    }

    fn batch_of(reset: v1::RstEvent) -> Batch {
        Batch { seq: 1, events: vec![v1::Event { kind: Some(event::Kind::Reset(reset)) }], spooled_seq: 0 }
    }

    fn error_of(result: Result<(), CheckError>) -> String {
        result.expect_err("should be refused").0
    }

    #[test]
    fn agent_names_are_short_and_plain() {
        assert!(check_agent_name("edge-1.example_a").is_ok());
        assert!(check_agent_name("").is_err());
        assert!(check_agent_name(&"a".repeat(65)).is_err());
        assert!(check_agent_name(&"a".repeat(64)).is_ok());
        assert_eq!(error_of(check_agent_name("a b")), "agent_name \"a b\" contains ' '; allowed are A-Z a-z 0-9 . _ -");
    }

    #[test]
    fn good_batches_pass() {
        assert_eq!(check_batch(&batch_of(reset()), 5000), Ok(()));
    }

    #[test]
    fn bad_resets_are_named_precisely() {
        type Spoil = fn(&mut v1::RstEvent);
        let cases: [(Spoil, &str); 7] = [
            (
                |r| r.src = endpoint(&[1, 2, 3], 1),
                "batch 1, event 0: reset: src.ip has 3 bytes; an address has 4 (IPv4) or 16 (IPv6)",
            ),
            (|r| r.dst = None, "batch 1, event 0: reset: dst is missing"),
            (|r| r.dst = endpoint(&[1, 2, 3, 4], 65_536), "batch 1, event 0: reset: dst.port = 65536 is above 65535"),
            (|r| r.flags = 0x1000, "batch 1, event 0: reset: flags = 4096 is above 4095"),
            (|r| r.ttl = 256, "batch 1, event 0: reset: ttl = 256 is above 255"),
            (|r| r.ts_ns = 0, "batch 1, event 0: reset: ts_ns = 0 ns is not between 1990 and 2100"),
            (|r| r.history = "h".repeat(300), "batch 1, event 0: reset: history is 300 bytes long; the limit is 256"),
        ];
        for (spoil, expected) in cases {
            let mut r = reset();
            spoil(&mut r);
            assert_eq!(error_of(check_batch(&batch_of(r), 5000)), expected);
        }
    }

    fn open() -> v1::ConnectionOpen {
        v1::ConnectionOpen {
            orig: endpoint(&[198, 51, 100, 7], 50_000),
            resp: endpoint(&[192, 0, 2, 1], 443),
            start_ns: 1_700_000_000_000_000_000,
            syn_ns: Some(1_700_000_000_000_000_000),
            synack_ns: Some(1_700_000_000_001_000_000),
            syn_options: "M1460,S,T,N,W7".into(),
            orig_ttl: 64,
            resp_ttl: 57,
            syn_ip_id: Some(4711),
            ..Default::default()
        }
    }

    fn check_one(kind: event::Kind) -> Result<(), CheckError> {
        check_batch(&Batch { seq: 1, events: vec![v1::Event { kind: Some(kind) }], spooled_seq: 0 }, 5000)
    }

    #[test]
    fn bad_opens_and_watermarks_are_named_precisely() {
        assert_eq!(check_one(event::Kind::Open(open())), Ok(()));
        type Spoil = fn(&mut v1::ConnectionOpen);
        let cases: [(Spoil, &str); 6] = [
            (|o| o.orig = None, "batch 1, event 0: open: orig is missing"),
            (
                |o| o.resp = endpoint(&[1, 2, 3, 4, 5], 1),
                "batch 1, event 0: open: resp.ip has 5 bytes; an address has 4 (IPv4) or 16 (IPv6)",
            ),
            (|o| o.start_ns = -5, "batch 1, event 0: open: start_ns = -5 ns is not between 1990 and 2100"),
            (|o| o.synack_ns = Some(1), "batch 1, event 0: open: synack_ns = 1 ns is not between 1990 and 2100"),
            (|o| o.resp_ttl = 300, "batch 1, event 0: open: resp_ttl = 300 is above 255"),
            (|o| o.syn_ip_id = Some(70_000), "batch 1, event 0: open: syn_ip_id = 70000 is above 65535"),
        ];
        for (spoil, expected) in cases {
            let mut o = open();
            spoil(&mut o);
            assert_eq!(error_of(check_one(event::Kind::Open(o))), expected);
        }
        let t = 1_700_000_000_000_000_000;
        let mark = |ts_ns, since_ns| {
            event::Kind::Watermark(v1::Watermark { ts_ns, since_ns, ended: false, ..Default::default() })
        };
        assert_eq!(check_one(mark(t, 0)), Ok(()), "since unknown");
        assert_eq!(check_one(mark(t, t - 1)), Ok(()));
        assert_eq!(
            error_of(check_one(mark(t, t + 1))),
            format!("batch 1, event 0: watermark: since_ns {} is after ts_ns {t}", t + 1)
        );
        assert_eq!(
            error_of(check_one(mark(t, 7))),
            "batch 1, event 0: watermark: since_ns = 7 ns is not between 1990 and 2100"
        );
    }

    #[test]
    fn listed_watermarks_are_bounded() {
        let t = 1_700_000_000_000_000_000;
        let settling = |ts_ns| v1::SettlingRst {
            ts_ns,
            src: endpoint(&[198, 51, 100, 2], 40_000),
            dst: endpoint(&[203, 0, 113, 10], 80),
            flags: 0x14,
            ..Default::default()
        };
        let mark = |listed_until_ns, settling: Vec<v1::SettlingRst>| {
            event::Kind::Watermark(v1::Watermark { ts_ns: t, listed_until_ns, settling, ..Default::default() })
        };
        let limit = rstscope_proto::MAX_SETTLING_LISTED;
        assert_eq!(check_one(mark(t + 9, vec![settling(t + 5); limit])), Ok(()));
        assert_eq!(check_one(mark(0, Vec::new())), Ok(()), "an older agent's");
        let mut no_src = settling(t + 5);
        no_src.src = None;
        let cases = [
            (
                mark(t + 9, vec![settling(t + 5); limit + 1]),
                format!("{} settling RSTs listed; the limit is {limit}", limit + 1),
            ),
            (mark(0, vec![settling(t)]), "settling RSTs listed without listed_until_ns".to_string()),
            (mark(t - 1, Vec::new()), format!("listed_until_ns {} is before ts_ns {t}", t - 1)),
            (mark(t + 9, vec![settling(t + 5), no_src]), "settling[1]: src is missing".to_string()),
            (
                mark(t + 9, vec![settling(t + 10)]),
                format!("settling[0]: ts_ns {} is after listed_until_ns {}", t + 10, t + 9),
            ),
        ];
        for (kind, expected) in cases {
            assert_eq!(error_of(check_one(kind)), format!("batch 1, event 0: watermark: {expected}"));
        }
    }

    #[test]
    fn batches_are_bounded_and_numbered() {
        let mut batch = batch_of(reset());
        batch.events = vec![batch.events[0].clone(); 3];
        assert_eq!(error_of(check_batch(&batch, 2)), "batch 1: 3 events; the limit is 2");
        batch.seq = 0;
        assert!(check_batch(&batch, 5000).is_err());
        let empty = Batch { seq: 1, events: vec![v1::Event { kind: None }], spooled_seq: 0 };
        assert!(check_batch(&empty, 5000).is_err());
    }

    #[test]
    fn hellos_need_a_name_and_proper_addresses() {
        let hello = AgentHello { agent_name: "edge-1".into(), boot_id: "b1".into(), ..Default::default() };
        assert!(check_hello(&hello).is_ok());
        let nameless = AgentHello { agent_name: String::new(), ..hello.clone() };
        assert!(check_hello(&nameless).is_err());
        let long_boot = AgentHello { boot_id: "x".repeat(65), ..hello.clone() };
        assert!(check_hello(&long_boot).is_err());
        let bad_address = AgentHello { local_addresses: vec![vec![1, 2]], ..hello };
        assert_eq!(
            error_of(check_hello(&bad_address)),
            "local_addresses[0] has 2 bytes; an address has 4 (IPv4) or 16 (IPv6)"
        );
    }

    /// What a stream does with one written batch: made durable, handed on, acknowledged.
    async fn acknowledge(hub: Arc<Hub>, agent: Arc<str>, written: Written) -> Result<u64, Status> {
        let durable = make_durable(&hub, written).await?;
        hand_on(&hub, &agent, durable).await
    }

    /// A store and a hub over it in a new directory.
    fn hub_in(dir: &tempfile::TempDir) -> Arc<Hub> {
        let store = crate::store::Store::open(crate::store::StoreConfig::new(dir.path())).unwrap();
        Hub::new(store, crate::service::Limits::default())
    }

    /// Fills the memory of the correlation's queue, then writes and acknowledges one batch
    /// more (within 30 s; `None` if that took longer).
    async fn acknowledge_one_beyond_memory(hub: &Arc<Hub>) -> Option<u64> {
        let agent: Arc<str> = Arc::from("edge-1");
        hub.inbox.push(agent.clone(), vec![v1::Event::default(); MEMORY_EVENTS]);
        let written = write_batch(hub, batch_of(reset()), &agent, "b1").await.unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(30), acknowledge(hub.clone(), agent, written)).await;
        acked.ok().map(Result::unwrap)
    }

    /// With no ticker at all (none runs here), an acknowledgement beyond the memory of the
    /// correlation's queue goes to its file and comes back without anything being fed.
    #[tokio::test]
    async fn beyond_the_queues_memory_acknowledgements_do_not_wait_for_the_correlation() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub_in(&dir);
        assert_eq!(acknowledge_one_beyond_memory(&hub).await.expect("the acknowledgement waited"), 1);
        assert!(hub.inbox.behind(), "the batch went to the file");
        assert_eq!(hub.inbox.queued_events(), MEMORY_EVENTS + 1, "nothing was fed");
        // The engine takes memory first, then the file.
        drop(hub.correlation());
        assert_eq!(hub.inbox.queued_events(), 1);
        drop(hub.correlation());
        assert_eq!(hub.inbox.queued_events(), 0);
        assert!(!hub.inbox.behind(), "the file was drained");
    }

    /// When the file cannot be written, an acknowledgement beyond the queue's memory feeds the
    /// engine itself instead of waiting for a ticker to take the queue.
    #[tokio::test]
    async fn without_the_file_a_full_queue_is_fed_from_ingest() {
        let dir = tempfile::tempdir().unwrap();
        // A plain file where the queue's directory would be: no file can be made in it.
        std::fs::write(dir.path().join(crate::service::BACKLOG_DIR), b"").unwrap();
        let hub = hub_in(&dir);
        assert_eq!(acknowledge_one_beyond_memory(&hub).await.expect("the acknowledgement waited for a ticker"), 1);
        assert!(!hub.inbox.behind());
        // Only the engine takes the queue (and feeds what it took): the memory part went, the
        // batch behind it waits for the next taker.
        assert_eq!(hub.inbox.queued_events(), 1, "the engine was fed");
    }

    /// The queue's files count against the data directory's limit: past a quarter of
    /// `--max-store-gib` a batch beyond the queue's memory does not go to the files, and the
    /// acknowledgement feeds the engine itself, as when no file can be written.
    #[tokio::test]
    async fn a_small_store_limit_caps_the_queues_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::store::StoreConfig { max_bytes: 40, ..crate::store::StoreConfig::new(dir.path()) };
        let hub = Hub::new(crate::store::Store::open(config).unwrap(), crate::service::Limits::default());
        assert_eq!(hub.inbox.file_bytes(), 10, "less than any batch");
        assert_eq!(acknowledge_one_beyond_memory(&hub).await.expect("the acknowledgement waited for a ticker"), 1);
        assert!(!hub.inbox.behind(), "nothing went to the files");
        assert_eq!(hub.inbox.queued_events(), 1, "the engine was fed");
    }

    #[test]
    fn one_stream_per_agent_name() {
        let agents = Arc::new(LiveAgents::default());
        let first = agents.claim("a", 1, 10).unwrap();
        assert_eq!(agents.claim("a", 2, 10).unwrap_err(), ClaimError::AlreadyConnected);
        let _other = agents.claim("b", 2, 10).unwrap();
        assert_eq!(agents.claim("c", 2, 2).unwrap_err(), ClaimError::TooMany(2));
        assert_eq!(agents.connected(), 2);
        drop(first);
        assert!(!agents.snapshot()["a"].connected);
        assert!(agents.claim("a", 3, 10).is_ok());
    }
}
