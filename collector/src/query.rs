//! The `Query` gRPC service behind the `rstscope` CLI.
//!
//! Requests are checked and turned into a [`Selection`] (the store's [`ResetQuery`] plus what
//! only this layer knows: verdicts). The same selection filters the store's answer and the live
//! resets of `FollowResets`, so a followed stream shows exactly what a later `ListResets` would.
//!
//! `ListReports` / `FollowReports` give the correlator's merged reports (decided ones from the
//! store, pending ones from the live engine); `ListResets` / `FollowResets` each agent's own
//! records, whose verdict is always `pending`. `ListReports` is answered from the stored
//! encodings, see [`crate::raw_reports`].
//!
//! `FollowResets` subscribes to the live resets *before* it lists the store, so nothing stored
//! in between is missed; duplicates of that overlap are skipped by identity. A follower too slow
//! for the broadcast buffer is told so (`RESOURCE_EXHAUSTED`, with the time to resume from)
//! rather than silently missing resets.

use std::collections::HashSet;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use ipnet::IpNet;
use prost::Message;
use rstscope_proto::v1::{self, ResetFilter, ResetRecord};
use rstscope_proto::FlowKey;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::ingest::{blocking, check_agent_name, CheckError, LiveBatch};
use crate::pb;
use crate::service::Hub;
use crate::store::{EncodedReport, ReportListing, ResetQuery, StoredReset};

/// Most hosts, ports, agents, ... one filter may name.
const MAX_FILTER_ITEMS: usize = 256;

/// A checked reset filter.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// What the store can select by.
    pub query: ResetQuery,
    /// Host networks as parsed (kept for the live matcher).
    pub hosts: Vec<IpNet>,
    /// Whether the verdict filter admits `pending`.
    pub admits_pending: bool,
    /// Verdict names asked for (empty: any).
    pub verdicts: Vec<String>,
}

fn parse_host(text: &str) -> Result<IpNet, CheckError> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| CheckError(format!("host {text:?} is neither an address nor a CIDR network")))
}

fn check_count(field: &str, n: usize) -> Result<(), CheckError> {
    if n > MAX_FILTER_ITEMS {
        return Err(CheckError(format!("{n} {field}; the limit is {MAX_FILTER_ITEMS}")));
    }
    Ok(())
}

/// Checks a filter and turns it into a [`Selection`]: hosts as addresses or CIDRs, ports up to
/// 65535, agent names, verdict and cause names from the vocabulary, flag letters.
pub fn check_filter(filter: &ResetFilter) -> Result<Selection, CheckError> {
    for (field, n) in [
        ("hosts", filter.hosts.len()),
        ("ports", filter.ports.len()),
        ("agents", filter.agents.len()),
        ("verdicts", filter.verdicts.len()),
        ("causes", filter.causes.len()),
        ("flags", filter.flags.len()),
    ] {
        check_count(field, n)?;
    }
    if let (Some(since), Some(until)) = (filter.since_ns, filter.until_ns) {
        if until < since {
            return Err(CheckError(format!("until ({until} ns) is before since ({since} ns)")));
        }
    }
    let hosts = filter.hosts.iter().map(|h| parse_host(h)).collect::<Result<Vec<_>, _>>()?;
    let ports = filter
        .ports
        .iter()
        .map(|&p| u16::try_from(p).map_err(|_| CheckError(format!("port {p} is above 65535"))))
        .collect::<Result<Vec<_>, _>>()?;
    for agent in &filter.agents {
        check_agent_name(agent)?;
    }
    for verdict in &filter.verdicts {
        if !pb::VERDICTS.contains(&verdict.as_str()) {
            return Err(CheckError(format!("unknown verdict {verdict:?}; known: {}", pb::VERDICTS.join(", "))));
        }
    }
    for cause in &filter.causes {
        if !pb::CAUSES.contains(&cause.as_str()) {
            return Err(CheckError(format!("unknown cause {cause:?}; known: {}", pb::CAUSES.join(", "))));
        }
    }
    let flags = filter
        .flags
        .iter()
        .map(|f| {
            pb::parse_flags(f)
                .map(pb::flags_text)
                .ok_or_else(|| CheckError(format!("flags {f:?}: use the letters S F R P A U E C N, like RA")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let admits_pending = filter.verdicts.is_empty() || filter.verdicts.iter().any(|v| v == pb::PENDING);
    let last = (filter.last > 0).then_some(filter.last as usize);
    let query = ResetQuery {
        since_ns: filter.since_ns,
        until_ns: filter.until_ns,
        hosts: hosts.clone(),
        ports,
        agents: filter.agents.clone(),
        causes: filter.causes.clone(),
        flags,
        last,
        ..ResetQuery::default()
    };
    Ok(Selection { query, hosts, admits_pending, verdicts: filter.verdicts.clone() })
}

impl Selection {
    /// Whether one reset passes the filter (the verdict is `pending` for all of them yet).
    pub fn matches(&self, agent: &str, event: &v1::RstEvent) -> bool {
        let q = &self.query;
        let src = pb::endpoint(event.src.as_ref());
        let dst = pb::endpoint(event.dst.as_ref());
        let ends = [src, dst];
        self.admits_pending
            && q.since_ns.is_none_or(|since| event.ts_ns >= since)
            && q.until_ns.is_none_or(|until| event.ts_ns < until)
            && (self.hosts.is_empty()
                || self.hosts.iter().any(|net| ends.iter().flatten().any(|e| net.contains(&e.ip()))))
            && (q.ports.is_empty() || q.ports.iter().any(|&p| ends.iter().flatten().any(|e| e.port() == p)))
            && (q.agents.is_empty() || q.agents.iter().any(|a| a == agent))
            && (q.causes.is_empty() || q.causes.iter().any(|c| c == pb::cause_name(event.cause)))
            && (q.flags.is_empty() || q.flags.iter().any(|f| *f == pb::flags_text(event.flags)))
    }
}

/// The wire record of one reset.
pub fn reset_record(agent: &str, key: &FlowKey, event: v1::RstEvent) -> ResetRecord {
    ResetRecord {
        agent: agent.to_string(),
        connection: key.to_string(),
        event: Some(event),
        verdict: pb::PENDING.to_string(),
    }
}

fn stored_record(stored: StoredReset) -> ResetRecord {
    reset_record(&stored.agent, &stored.key, stored.event)
}

/// What makes two reports of a reset the same report: used to drop the overlap between the
/// listed and the live part of a follow.
type Identity = (String, u64, i64, u32, u32, u32);

fn identity(agent: &str, event: &v1::RstEvent) -> Identity {
    (agent.to_string(), event.conn_id, event.ts_ns, event.seq, event.ack, event.flags)
}

/// The `Query` service.
#[derive(Clone)]
pub struct QueryService {
    hub: Arc<Hub>,
}

impl QueryService {
    /// A service over the shared collector state.
    pub fn new(hub: Arc<Hub>) -> Self {
        QueryService { hub }
    }

    /// Runs `call` on the correlation off the async threads: taking it waits for a decision in
    /// progress and feeds the queued batches first, which can take a while under load.
    async fn correlation<T: Send + 'static>(
        &self,
        call: impl FnOnce(&mut crate::live::LiveCorrelation) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let hub = self.hub.clone();
        tokio::task::spawn_blocking(move || call(&mut hub.correlation()))
            .await
            .map_err(|e| Status::internal(format!("correlation: {e}")))
    }

    /// What `ListReports` answers, each report encoded (see [`QueryService::report_stream`]).
    pub(crate) async fn encoded_listing(&self, filter: &ResetFilter) -> Result<EncodedStream, Status> {
        self.report_stream(&check_filter(filter)?).await
    }

    /// The same reports, decoded, all of them.
    async fn reports(&self, selection: &Selection) -> Result<Vec<v1::ResetReport>, Status> {
        let mut stream = self.report_stream(selection).await?;
        let mut out = Vec::new();
        while let Some(bytes) = stream.next().await {
            out.push(decode_report(&bytes?)?);
        }
        Ok(out)
    }

    /// Decided reports as the store keeps them (encoded) and pending ones from the correlation,
    /// oldest first; with `last`, the newest that many. Refuses an answer larger than the
    /// configured limit, before anything is sent.
    ///
    /// # Why a stream
    /// The store first chooses the reports from its bucket entries alone, which is cheap, so the
    /// answer is counted (and refused when too big) before any report is read. A blocking task
    /// then reads the chosen reports one bucket (10 s of report time) after another and hands
    /// them on in chunks of a few hundred, so the client decodes the first rows while the
    /// server reads the rest: reading and decoding overlap instead of adding up (a listing of
    /// 40k reports used to wait for all its pages, about 100 ms, before its first row).
    async fn report_stream(&self, selection: &Selection) -> Result<EncodedStream, Status> {
        let max = self.hub.limits.max_list;
        let mut query = selection.query.clone();
        query.verdicts = selection.verdicts.clone();
        query.limit = Some(max + 1);
        let last = query.last;
        let store = self.hub.store()?;
        let listing = {
            let store = store.clone();
            blocking(move || store.report_listing(&query)).await?
        };
        let selection = selection.clone();
        let mut pending = self.correlation(move |c| c.pending(&selection)).await?;
        if !pending.is_empty() {
            // A report decided while it was listed as pending: the store's version wins.
            let decided: HashSet<&[u8]> = listing.ids().collect();
            pending.retain(|r| !decided.contains(r.id.as_bytes()));
        }
        let mut pending: Vec<EncodedReport> = pending
            .into_iter()
            .map(|r| EncodedReport { ts_ns: r.ts_ns, bytes: Bytes::from(r.encode_to_vec()), id: r.id })
            .collect();
        pending.sort_by(|a, b| (a.ts_ns, &a.id).cmp(&(b.ts_ns, &b.id)));
        let total = listing.len() + pending.len();
        if last.map_or(total, |last| total.min(last)) > max {
            return Err(Status::resource_exhausted(format!(
                "more than {max} resets match; narrow the filter (--since, --host, ...) or use --last"
            )));
        }
        let skip = last.map_or(0, |last| total.saturating_sub(last));
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || send_listing(&store, &listing, pending, skip, &tx));
        Ok(Box::pin(ReceiverStream::new(rx).flat_map(tokio_stream::iter)))
    }

    /// The stored resets a selection picks, oldest first. Refuses (rather than truncates) an
    /// answer larger than the configured limit.
    async fn list(&self, selection: &Selection) -> Result<Vec<StoredReset>, Status> {
        if !selection.admits_pending {
            return Ok(Vec::new());
        }
        let max = self.hub.limits.max_list;
        let mut query = selection.query.clone();
        query.limit = Some(max + 1);
        let store = self.hub.store()?;
        let found = blocking(move || store.resets(&query)).await?;
        if found.len() > max {
            return Err(Status::resource_exhausted(format!(
                "more than {max} resets match; narrow the filter (--since, --host, ...) or use --last"
            )));
        }
        Ok(found.into_iter().filter(|r| selection.matches(&r.agent, &r.event)).collect())
    }
}

/// Chunks of a listing read ahead of what the client has taken.
const CHUNKS_AHEAD: usize = 4;
/// Reports a chunk of a listing gathers (from as many buckets as it takes) before it is sent:
/// a hand-over per bucket costs more than it saves when buckets hold few matches.
const CHUNK_REPORTS: usize = 256;

/// A `ListReports` answer: reports, each encoded.
pub(crate) type EncodedStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

/// Reads a listing's buckets in order and sends their reports in chunks (at least
/// [`CHUNK_REPORTS`] but the last), merged in (time, id) order with the pending ones and
/// without the first `skip` of the merged sequence (a `last` listing), to `tx`. Stops when the
/// receiver is gone (the client left); a store error ends the answer with that error.
///
/// One thread reads: with the client decoding what it sent, a listing already keeps two cores
/// busy. (Two reader threads were tried: no faster on this 2-core machine.)
fn send_listing(
    store: &crate::store::Store,
    listing: &ReportListing,
    pending: Vec<EncodedReport>,
    mut skip: usize,
    tx: &mpsc::Sender<Vec<Result<Bytes, Status>>>,
) {
    let mut pending = pending.into_iter().peekable();
    let mut chunk = Vec::with_capacity(CHUNK_REPORTS);
    let mut emit = |chunk: &mut Vec<Result<Bytes, Status>>, r: EncodedReport| {
        if skip > 0 {
            skip -= 1;
        } else {
            chunk.push(Ok(r.bytes));
        }
    };
    for bucket in listing.buckets() {
        let decided = match store.read_listed(bucket) {
            Ok(decided) => decided,
            Err(error) => {
                let _ = tx.blocking_send(vec![Err(Status::from(error))]);
                return;
            }
        };
        for r in decided {
            while let Some(p) = pending.next_if(|p| (p.ts_ns, &p.id) < (r.ts_ns, &r.id)) {
                emit(&mut chunk, p);
            }
            emit(&mut chunk, r);
        }
        if chunk.len() >= CHUNK_REPORTS && tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
            return;
        }
    }
    for p in pending {
        emit(&mut chunk, p);
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
}

/// A stored (or just encoded) report, decoded.
fn decode_report(bytes: &[u8]) -> Result<v1::ResetReport, Status> {
    v1::ResetReport::decode(bytes).map_err(|e| Status::internal(format!("stored report: {e}")))
}

/// The response stream of `ListReports` and `FollowReports`.
pub type ReportStream = Pin<Box<dyn Stream<Item = Result<v1::ResetReport, Status>> + Send + 'static>>;

/// The response stream of `ListResets` and `FollowResets`.
pub type ResetStream = Pin<Box<dyn Stream<Item = Result<ResetRecord, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::query_server::Query for QueryService {
    type ListResetsStream = ResetStream;
    type FollowResetsStream = ResetStream;
    type ListReportsStream = ReportStream;
    type FollowReportsStream = ReportStream;

    /// Served by [`crate::raw_reports::QueryRouter`] without decoding; this path (the generated
    /// service alone) gives the same answer, decoded.
    async fn list_reports(&self, request: Request<ResetFilter>) -> Result<Response<ReportStream>, Status> {
        let found = self.encoded_listing(request.get_ref()).await?;
        Ok(Response::new(Box::pin(found.map(|bytes| decode_report(&bytes?)))))
    }

    async fn follow_reports(&self, request: Request<ResetFilter>) -> Result<Response<ReportStream>, Status> {
        let selection = check_filter(request.get_ref())?;
        let mut live = self.correlation(|c| c.published.subscribe()).await?;
        let mut listed = self.reports(&selection).await?;
        // Pending ones are shown again once decided.
        listed.retain(|r| r.verdict != pb::PENDING);
        let (tx, rx) = mpsc::channel(self.hub.limits.follow_buffer.max(1));
        let closed = self.hub.closed();
        tokio::spawn(async move {
            let seen: HashSet<String> = listed.iter().map(|r| r.id.clone()).collect();
            let run = async {
                for r in listed {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                loop {
                    match live.recv().await {
                        Ok(r) => {
                            if seen.contains(&r.id) || !crate::live::report_matches(&selection, &r) {
                                continue;
                            }
                            if tx.send(Ok((*r).clone())).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx
                                .send(Err(Status::resource_exhausted(format!(
                                    "this follower fell {n} resets behind; list again with --since to resume"
                                ))))
                                .await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            };
            tokio::select! {
                () = run => {}
                () = closed => {
                    let _ = tx.try_send(Err(Status::unavailable("the collector is shutting down")));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_resets(&self, request: Request<ResetFilter>) -> Result<Response<ResetStream>, Status> {
        let selection = check_filter(request.get_ref())?;
        let found = self.list(&selection).await?;
        let records = found.into_iter().map(|r| Ok(stored_record(r)));
        Ok(Response::new(Box::pin(tokio_stream::iter(records))))
    }

    async fn follow_resets(&self, request: Request<ResetFilter>) -> Result<Response<ResetStream>, Status> {
        let selection = check_filter(request.get_ref())?;
        let live = self.hub.live.subscribe();
        let found = self.list(&selection).await?;
        let listed_up_to = self.hub.next_order.load(Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(self.hub.limits.follow_buffer.max(1));
        let closed = self.hub.closed();
        tokio::spawn(async move {
            tokio::select! {
                () = follow(selection, found, listed_up_to, live, tx.clone()) => {}
                () = closed => {
                    let _ = tx.try_send(Err(Status::unavailable("the collector is shutting down")));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_connection(
        &self,
        request: Request<v1::ConnectionRequest>,
    ) -> Result<Response<v1::ConnectionReply>, Status> {
        let text = request.into_inner().connection;
        let view = {
            let text = text.clone();
            self.correlation(move |c| c.connection(&text)).await?
        };
        let store = self.hub.store()?;
        let Some(view) = view else {
            // Not (or no longer) in the correlation's memory: what the store has for the tuple.
            if looks_like_record_label(&text) {
                return Err(Status::not_found(format!(
                    "no connection {} in the correlation's memory (it forgets connections some time after \
                     they end); the store can still show it by its tuple, e.g. rstscope connection \
                     198.51.100.2:40000-203.0.113.10:80, as a reset's src and dst give it",
                    text.trim()
                )));
            }
            let key = text.trim().parse::<FlowKey>().map_err(|e| {
                Status::invalid_argument(format!("{e}; or give an id as printed in a reset's connection field"))
            })?;
            let stored = blocking(move || store.connection(&key)).await?;
            if stored.flows.is_empty() && stored.resets.is_empty() {
                return Err(Status::not_found(format!("no agent reported connection {key}")));
            }
            let flows =
                stored.flows.into_iter().map(|(agent, flow)| v1::AgentFlow { agent, flow: Some(flow) }).collect();
            let resets = stored.resets.into_iter().map(stored_record).collect();
            return Ok(Response::new(v1::ConnectionReply { flows, resets, ..Default::default() }));
        };
        let records = view.records.clone();
        let (flows, resets) = blocking(move || {
            let mut flows = Vec::new();
            let mut resets = Vec::new();
            let mut keys: Vec<FlowKey> = records.iter().map(|r| r.1).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let stored = store.connection(&key)?;
                let mine = |agent: &str| records.iter().any(|(a, k)| a == agent && *k == key);
                flows.extend(stored.flows.into_iter().filter(|(a, _)| mine(a)));
                resets.extend(stored.resets.into_iter().filter(|r| mine(&r.agent)));
            }
            Ok::<_, crate::store::StoreError>((flows, resets))
        })
        .await?;
        let flows = flows.into_iter().map(|(agent, flow)| v1::AgentFlow { agent, flow: Some(flow) }).collect();
        let resets = resets.into_iter().map(stored_record).collect();
        Ok(Response::new(v1::ConnectionReply { flows, resets, reports: view.reports, ladder: view.ladder }))
    }

    async fn list_agents(
        &self,
        _request: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsReply>, Status> {
        let store = self.hub.store()?;
        let records = blocking(move || store.agents()).await?;
        let live = self.hub.agents.snapshot();
        let (clocks, reference) = self.correlation(|c| c.clocks()).await?;
        let mut agents: Vec<v1::AgentState> = records
            .into_iter()
            .map(|r| {
                let now = live.get(&r.name).copied().unwrap_or_default();
                let clock = clocks.get(&r.name);
                v1::AgentState {
                    clock_offset_ns: clock.map(|c| c.offset_ns),
                    clock_uncertainty_ns: clock.map(|c| c.uncertainty_ns),
                    clock_drift_ppm: clock.map(|c| c.drift_ppm),
                    clock_samples: clock.map_or(0, |c| c.samples),
                    clock_reference: reference.clone(),
                    connected: now.connected,
                    last_seen_ns: r.last_seen_ns.max(now.last_seen_ns),
                    name: r.name,
                    host_name: r.host_name,
                    software_version: r.software_version,
                    watermark_ns: r.watermark_ns,
                    events: r.events,
                    capture_drops: r.capture_drops,
                    events_dropped: r.events_dropped,
                    spool_backlog: now.spool_backlog(),
                }
            })
            .collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(v1::ListAgentsReply { agents }))
    }

    async fn status(&self, _request: Request<v1::StatusRequest>) -> Result<Response<v1::StatusReply>, Status> {
        let store = self.hub.store()?;
        let status = blocking(move || store.status()).await?;
        Ok(Response::new(v1::StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.hub.started.elapsed().as_secs(),
            resets: status.resets,
            flows: status.flows,
            store_bytes: status.bytes,
            agents: status.agents,
            correlation_backlog_events: self.hub.inbox.queued_events() as u64,
            decided_resets: status.reports,
        }))
    }
}

/// Sends the listed resets, then the live ones, until the client hangs up.
async fn follow(
    selection: Selection,
    found: Vec<StoredReset>,
    listed_up_to: u64,
    mut live: broadcast::Receiver<Arc<LiveBatch>>,
    tx: mpsc::Sender<Result<ResetRecord, Status>>,
) {
    let mut last_ts = None;
    // Only batches handed out before the listing ended can be in it.
    let mut listed: HashSet<Identity> = HashSet::new();
    for stored in found {
        last_ts = Some(stored.event.ts_ns);
        listed.insert(identity(&stored.agent, &stored.event));
        if tx.send(Ok(stored_record(stored))).await.is_err() {
            return;
        }
    }
    loop {
        let batch = tokio::select! {
            received = live.recv() => received,
            () = tx.closed() => return,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(broadcast::error::RecvError::Closed) => return,
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                let resume = last_ts.map(|ts| format!("; resume with --since {}", pb::ts_text(ts))).unwrap_or_default();
                let message =
                    format!("this follower fell behind and {skipped} batches of resets were not sent{resume}");
                let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(Err(Status::resource_exhausted(message))))
                    .await;
                return;
            }
        };
        if batch.order > listed_up_to && !listed.is_empty() {
            listed = HashSet::new();
        }
        for (key, event) in &batch.resets {
            if !selection.matches(&batch.agent, event) {
                continue;
            }
            if batch.order <= listed_up_to && listed.contains(&identity(&batch.agent, event)) {
                debug!("A followed reset was already listed; skipped.");
                continue;
            }
            last_ts = Some(event.ts_ns);
            if tx.send(Ok(reset_record(&batch.agent, key, event.clone()))).await.is_err() {
                return;
            }
        }
    }
}

/// A connection record label as resets print it: `AGENT/` and 16 hex digits.
fn looks_like_record_label(text: &str) -> bool {
    text.trim()
        .rsplit_once('/')
        .is_some_and(|(agent, hex)| !agent.is_empty() && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report at `ms` milliseconds past a fixed time.
    fn report_at(id: &str, ms: i64) -> v1::ResetReport {
        v1::ResetReport {
            id: id.to_string(),
            ts_ns: 1_700_000_000_000_000_000 + ms * 1_000_000,
            verdict: "end-to-end".to_string(),
            ..Default::default()
        }
    }

    /// What `send_listing` sends, as ids, chunk by chunk.
    fn sent(store: &crate::store::Store, pending: &[v1::ResetReport], skip: usize) -> Vec<Vec<String>> {
        let listing = store.report_listing(&ResetQuery::default()).expect("listing");
        let pending = pending
            .iter()
            .map(|r| EncodedReport { ts_ns: r.ts_ns, id: r.id.clone(), bytes: Bytes::from(r.encode_to_vec()) })
            .collect();
        let (tx, mut rx) = mpsc::channel(1);
        let store = store.clone();
        let sender = std::thread::spawn(move || send_listing(&store, &listing, pending, skip, &tx));
        let mut chunks = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            chunks.push(chunk.into_iter().map(|r| decode_report(&r.expect("report")).expect("decodes").id).collect());
        }
        sender.join().expect("sender");
        chunks
    }

    #[test]
    fn a_listing_streams_decided_and_pending_reports_in_time_order_in_chunks_and_skips_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(crate::store::StoreConfig::new(dir.path())).expect("store");
        // One decided report every 100 ms for 60 s: six buckets of 10 s.
        let decided: Vec<v1::ResetReport> = (0..600).map(|i| report_at(&format!("d{i:03}"), i * 100)).collect();
        store.put_reports(&decided).expect("put");
        // Pending ones before, between (one at a decided one's time, ordered by id), and after.
        let pending = [
            report_at("a-first", -1000),
            report_at("c-tie", 10_000),
            report_at("p-mid", 25_050),
            report_at("z-last", 99_000),
        ];
        let mut expected: Vec<&v1::ResetReport> = decided.iter().chain(&pending).collect();
        expected.sort_by(|a, b| (a.ts_ns, &a.id).cmp(&(b.ts_ns, &b.id)));
        let expected: Vec<String> = expected.iter().map(|r| r.id.clone()).collect();
        assert_eq!(&expected[..2], ["a-first", "d000"]);
        assert_eq!(expected[101], "c-tie", "before d100, which has its time");
        for skip in [0, 1, 300, 603, 604, 700] {
            let chunks = sent(&store, &pending, skip);
            let ids: Vec<String> = chunks.concat();
            assert_eq!(ids, expected[skip.min(expected.len())..], "skip {skip}");
            if let Some((_, full)) = chunks.split_last() {
                assert!(
                    full.iter().all(|c| c.len() >= CHUNK_REPORTS),
                    "skip {skip}: chunks {:?}",
                    chunks.iter().map(Vec::len).collect::<Vec<_>>()
                );
            }
        }
        // Nothing decided: the pending ones alone.
        let empty_dir = tempfile::tempdir().expect("tempdir");
        let empty = crate::store::Store::open(crate::store::StoreConfig::new(empty_dir.path())).expect("store");
        assert_eq!(sent(&empty, &pending, 0).concat(), ["a-first", "c-tie", "p-mid", "z-last"]);
    }

    fn filter() -> ResetFilter {
        ResetFilter::default()
    }

    fn event() -> v1::RstEvent {
        v1::RstEvent {
            ts_ns: 1_700_000_000_000_000_000,
            src: Some(v1::Endpoint { ip: vec![192, 0, 2, 1], port: 443 }),
            dst: Some(v1::Endpoint { ip: vec![198, 51, 100, 7], port: 50_000 }),
            flags: 0x014,
            cause: v1::Cause::AppAbort as i32,
            ..Default::default()
        }
    }

    fn matches(f: ResetFilter) -> bool {
        check_filter(&f).unwrap().matches("edge-1", &event())
    }

    #[test]
    fn filters_select_like_the_store() {
        assert!(matches(filter()));
        assert!(matches(ResetFilter { hosts: vec!["192.0.2.0/24".into()], ..filter() }));
        assert!(matches(ResetFilter { hosts: vec!["198.51.100.7".into()], ..filter() }));
        assert!(!matches(ResetFilter { hosts: vec!["203.0.113.0/24".into()], ..filter() }));
        assert!(matches(ResetFilter { ports: vec![50_000], ..filter() }));
        assert!(!matches(ResetFilter { ports: vec![80], ..filter() }));
        assert!(matches(ResetFilter { agents: vec!["edge-1".into()], ..filter() }));
        assert!(!matches(ResetFilter { agents: vec!["edge-2".into()], ..filter() }));
        assert!(matches(ResetFilter { causes: vec!["app-abort".into()], ..filter() }));
        assert!(!matches(ResetFilter { causes: vec!["refused".into()], ..filter() }));
        assert!(matches(ResetFilter { flags: vec!["ar".into()], ..filter() }));
        assert!(!matches(ResetFilter { flags: vec!["R".into()], ..filter() }));
        assert!(matches(ResetFilter { verdicts: vec!["pending".into()], ..filter() }));
        assert!(!matches(ResetFilter { verdicts: vec!["injected".into()], ..filter() }));
        assert!(matches(ResetFilter { since_ns: Some(1_700_000_000_000_000_000), ..filter() }));
        assert!(!matches(ResetFilter { until_ns: Some(1_700_000_000_000_000_000), ..filter() }));
    }

    #[test]
    fn bad_filters_are_explained() {
        let error = |f: ResetFilter| check_filter(&f).unwrap_err().0;
        assert_eq!(
            error(ResetFilter { hosts: vec!["example.com".into()], ..filter() }),
            "host \"example.com\" is neither an address nor a CIDR network"
        );
        assert_eq!(error(ResetFilter { ports: vec![70_000], ..filter() }), "port 70000 is above 65535");
        assert!(error(ResetFilter { verdicts: vec!["forged".into()], ..filter() }).starts_with("unknown verdict"));
        assert!(error(ResetFilter { causes: vec!["oops".into()], ..filter() }).starts_with("unknown cause"));
        assert!(error(ResetFilter { flags: vec!["RX".into()], ..filter() }).starts_with("flags \"RX\""));
        assert!(error(ResetFilter { since_ns: Some(2), until_ns: Some(1), ..filter() }).starts_with("until"));
    }
}
