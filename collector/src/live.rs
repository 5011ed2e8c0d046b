//! Live correlation: the engine of [`crate::correlate`] fed from ingest, decided on a timer.
//!
//! Ingest hands every durably stored batch to the engine (after the store, so nothing is
//! correlated that a crash could lose) through an [`Inbox`] (see `backlog.rs`): the batch is
//! queued and acknowledged at once, and whoever takes the engine next feeds it the queue first,
//! so an acknowledgement never waits for a decision in progress. A ticker calls [`LiveCorrelation::tick`]
//! when a batch brought a RST or a watermark (see [`LiveCorrelation::wake`]), and at least
//! every few hundred milliseconds: what became decidable (every relevant agent's watermark
//! passed the RST plus the settle window) is decided once, kept, and published to followers.
//! Undecided RSTs are listed with the verdict `pending`.
//!
//! # Where a report decided again is stored
//! The store keeps a report under its time and id and has no id map (see `store/reports.rs`),
//! so [`LiveCorrelation::tick`] hands each report out with the times earlier versions of it
//! may be filed under ([`ToStore::stored_at`]); a stored version whose time is not named would
//! stay listed beside the new one. The times come from:
//! - the engine, for every report it handed out before under that id
//!   ([`Correlator::decide_with_previous`]). It keeps the time while any RST carries the id,
//!   which is as long as it can decide the id again: an id is decided again only from its
//!   cluster's RSTs, and compaction forgets the id with the last of them. This is not the
//!   listing's `decided_at`, which drops ids beyond [`MAX_KEPT`] reports while the engine may
//!   still decide them again (at 100k reports a second, after 10 s).
//! - the store, after a restart: the engine is new and decides again, from the replayed
//!   events, reports stored before the restart, perhaps under another time (its clock
//!   estimates start again from the replayed handshakes). [`LiveCorrelation::replay`] reads
//!   the stored times of the reports it may decide again, once (see there for the window),
//!   and each is used by the first decision of its id; they are dropped once every replayed
//!   RST was decided (ingest feeds the engine no event the store already held, so only
//!   replayed sightings can name an id stored before the restart). Their ids are told to the
//!   engine too ([`Correlator::remember_stored_ids`]): a report keeps the id of the cluster it
//!   was first decided from when late sightings join it, so the replay, which brings every
//!   sighting at once, would otherwise give it the id of another one.
//! - a call the store refused (a full disk, say): its reports go out again with the next
//!   tick, naming their own times as well (a failed call may have written some of them), and
//!   the resume point is not written until they are stored.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use rstscope_proto::v1;
use tokio::sync::broadcast;

use crate::backlog::{is_decisive, Inbox};
use crate::correlate::{ClockEstimate, Config, Correlator};
use crate::pb;
use crate::query::Selection;

/// Decided reports kept in memory for listing (the oldest are dropped beyond this), and
/// reports kept for a retry while the store refuses them.
const MAX_KEPT: usize = 1_000_000;

/// A decided report for the store, with the times earlier versions of it may be filed under
/// (see [`crate::store::Store::put_decided`]).
#[derive(Clone, Debug)]
pub struct ToStore {
    /// The report.
    pub report: Arc<v1::ResetReport>,
    /// Where earlier versions may be stored (empty: none is).
    pub stored_at: Vec<i64>,
}

/// The collector's correlation state.
pub struct LiveCorrelation {
    engine: Correlator,
    /// Decided reports by (time, id).
    decided: BTreeMap<(i64, String), Arc<v1::ResetReport>>,
    /// The time each decided report is filed under, by id.
    decided_at: std::collections::HashMap<String, i64>,
    /// Per agent, the newest filing time (`backlog::filed_at`, its clock) of the events fed.
    newest_fed_ns: std::collections::HashMap<String, i64>,
    /// Newly decided reports, for followers.
    pub published: broadcast::Sender<Arc<v1::ResetReport>>,
    /// Records held beyond which the engine forgets old decided connections.
    compact_at: usize,
    /// Notified when an ingested batch held a RST or a watermark: something may have become
    /// decidable, so the ticker need not wait for its next period.
    pub wake: Arc<tokio::sync::Notify>,
    /// After a restart, the reports stored before it that the replay may decide again.
    restored: Restored,
    /// Reports the store refused, handed out again with the next tick's.
    unstored: Vec<ToStore>,
}

/// The stored reports a replay may decide again, by id with their times, until every RST the
/// replay fed was decided (or compacted away).
///
/// Why: the engine names the time it last filed a report under ([`Correlator::decide_with_previous`]),
/// so the store looks nothing up; but after a restart the engine is new and re-decides, from
/// the replayed events, reports stored before it, perhaps under another time (its clock
/// estimates start again from the replayed handshakes). Their times come from the store,
/// read once at the replay.
#[derive(Default)]
struct Restored {
    times: std::collections::HashMap<String, Vec<i64>>,
    /// The newest replayed RST (its agent's clock): once no RST this old or older is undecided,
    /// every report the replay could decide again was handed out, and the engine knows its time.
    newest_rst_ns: i64,
}

/// A replay starts this long before the oldest undecided RST (connection openings before it).
const REPLAY_CONTEXT_NS: i64 = 600_000_000_000;

/// The store's meta key for where a correlation replay starts after a restart (reference
/// clock, ns, 8 bytes big-endian): written by the decision ticker after the reports it stored,
/// read by [`LiveCorrelation::replay_start`].
pub const RESUME_META: &str = "correlation.resume_ns";

/// Stored events a restart without a resume point replays at most, newest first (see
/// [`LiveCorrelation::replay_start`]): what a collector killed before its first decision can
/// have acknowledged (about four seconds of full-speed ingest), and about a gigabyte of engine
/// memory.
pub const REPLAY_WITHOUT_RESUME_POINT: usize = 1_000_000;

/// The engine is compacted once it holds this many records...
const COMPACT_AT: usize = 200_000;
/// ...keeping connections active within this long of the newest watermark.
const HORIZON_NS: i64 = 600_000_000_000;

impl LiveCorrelation {
    /// An empty engine with these settings.
    pub fn new(cfg: Config) -> Self {
        let (published, _) = broadcast::channel(4096);
        LiveCorrelation {
            engine: Correlator::new(cfg),
            decided: BTreeMap::new(),
            decided_at: Default::default(),
            newest_fed_ns: Default::default(),
            published,
            compact_at: COMPACT_AT,
            wake: Arc::new(tokio::sync::Notify::new()),
            restored: Restored::default(),
            unstored: Vec::new(),
        }
    }

    /// An agent said hello: its addresses tell which endpoints are local to it.
    pub fn hello(&mut self, hello: &v1::AgentHello) {
        let local: Vec<IpAddr> = hello.local_addresses.iter().filter_map(|b| pb::ip_from_bytes(b)).collect();
        self.engine.agent(&hello.agent_name, &local);
    }

    /// Feeds a stored batch of one agent and wakes the ticker if it may decide something.
    pub fn ingest(&mut self, agent: &str, events: &[v1::Event]) {
        self.feed(agent, events);
        if events.iter().any(is_decisive) {
            self.wake.notify_one();
        }
    }

    /// Feeds a stored batch of one agent (the ticker was woken when it was queued).
    fn feed(&mut self, agent: &str, events: &[v1::Event]) {
        self.note_fed(agent, events);
        let a = self.engine.agent(agent, &[]);
        for e in events {
            self.engine.ingest(a, e);
        }
    }

    /// Feeds the oldest queued batches of `inbox` (all of memory, or one step of its files; see
    /// `Inbox::take`), in the order they were queued (the events move into the engine), after
    /// the agents' `hellos` queued meanwhile. The batches are taken first and the hellos after:
    /// an agent is welcomed, and can send, only once its hello is queued, so every batch taken
    /// has its agent's hello among those told by then.
    pub fn feed_from(&mut self, inbox: &Inbox, hellos: impl FnOnce() -> Vec<v1::AgentHello>) {
        let taken = inbox.take();
        for hello in hellos() {
            self.hello(&hello);
        }
        let (batches, lost, error) = taken.into_batches();
        for (agent, events) in batches {
            self.note_fed(&agent, &events);
            let a = self.engine.agent(&agent, &[]);
            for e in events {
                self.engine.ingest_owned(a, e);
            }
        }
        if let Some(error) = error {
            // The events are in the store; the resume point stays where it is from now on
            // (see `Inbox::lost_any`), so a restart's replay feeds them.
            inbox.lost(lost);
            tracing::error!(%error, batches = lost, "Batches queued for the correlation could not be read back; their resets are decided after a restart.");
        }
    }

    /// Decides what can be decided; returns the new reports (also kept and published) for the
    /// store, after any the store refused before ([`LiveCorrelation::not_stored`]), each with
    /// the times its earlier versions are filed under.
    pub fn tick(&mut self) -> Vec<ToStore> {
        let decided = self.engine.decide_with_previous();
        let mut out = std::mem::take(&mut self.unstored);
        out.reserve(decided.len());
        for (report, previous) in decided {
            let r = Arc::new(report);
            let stored_at = match previous {
                Some(ts) => vec![ts],
                None if self.restored.times.is_empty() => Vec::new(),
                None => self.restored.times.remove(&r.id).unwrap_or_default(),
            };
            // A report replaced (late sighting, forged partner): drop the old version.
            if let Some(old_ts) = self.decided_at.insert(r.id.clone(), r.ts_ns) {
                self.decided.remove(&(old_ts, r.id.clone()));
            }
            self.decided.insert((r.ts_ns, r.id.clone()), r.clone());
            let _ = self.published.send(r.clone());
            out.push(ToStore { report: r, stored_at });
        }
        // Every stored id decided again, or every replayed RST decided: nothing left to match.
        if self.restored.times.is_empty()
            || self.engine.oldest_undecided_ns().is_none_or(|t| t > self.restored.newest_rst_ns)
        {
            self.restored = Restored::default();
            self.engine.forget_stored_ids();
        }
        while self.decided.len() > MAX_KEPT {
            if let Some(((_, id), _)) = self.decided.pop_first() {
                self.decided_at.remove(&id);
            }
        }
        let (conns, rsts) = self.engine.records();
        if conns + rsts > self.compact_at {
            self.engine.compact(HORIZON_NS);
            let (conns, rsts) = self.engine.records();
            // Compact again only once as much again has accumulated.
            self.compact_at = (2 * (conns + rsts)).max(COMPACT_AT);
        }
        out
    }

    /// The store refused these (what [`LiveCorrelation::tick`] returned): they go out again
    /// with the next tick, also naming their own times (a failed call may have written some).
    pub fn not_stored(&mut self, mut reports: Vec<ToStore>) {
        for r in &mut reports {
            if !r.stored_at.contains(&r.report.ts_ns) {
                r.stored_at.push(r.report.ts_ns);
            }
        }
        reports.append(&mut self.unstored);
        if reports.len() > MAX_KEPT {
            let dropped = reports.len() - MAX_KEPT;
            tracing::warn!(dropped, "The store refused decided reports for long; the oldest are not retried.");
            reports.drain(..dropped);
        }
        self.unstored = reports;
    }

    /// Pending reports matching a selection (the decided ones are in the store).
    pub fn pending(&mut self, selection: &Selection) -> Vec<v1::ResetReport> {
        if !selection.admits_pending {
            return Vec::new();
        }
        self.engine.pending().into_iter().filter(|r| report_matches(selection, r)).collect()
    }

    /// Feeds what the store kept of the time before a restart: every agent's events since
    /// `since_ns` and each agent's last watermark, so undecided RSTs get decided and decided
    /// ones are decided again (same ids: the store keeps one copy, under the newest time).
    ///
    /// The stored reports such a decision may replace are read first: those filed at or after
    /// `since_ns` less [`REPLAY_CONTEXT_NS`]. A report is decided again only if the sighting
    /// its id names is replayed (agent time at or after `since_ns`; ingest passes no event
    /// twice), and its time is that sighting's, corrected by the clock estimate of the time,
    /// or an earlier sighting of the same packet; the margin thus holds while clock offsets
    /// stay under 10 minutes, as the replay's own context already assumes.
    pub fn replay(&mut self, store: &crate::store::Store, since_ns: i64) -> Result<u64, crate::store::StoreError> {
        let mut times: std::collections::HashMap<String, Vec<i64>> = Default::default();
        for (id, ts) in store.stored_report_times(since_ns.saturating_sub(REPLAY_CONTEXT_NS))? {
            times.entry(id).or_default().push(ts);
        }
        let mut newest_rst_ns = i64::MIN;
        let mut n = 0u64;
        // Agents' own addresses first, as their last hello gave them.
        for agent in store.agents()? {
            if let Some(bytes) = store.meta(&local_meta_key(&agent.name))? {
                let hello = v1::AgentHello {
                    agent_name: agent.name.clone(),
                    local_addresses: split_addresses(&bytes),
                    ..Default::default()
                };
                self.hello(&hello);
            }
        }
        for item in store.events_since(since_ns) {
            let (agent, event) = item?;
            if let Some(v1::event::Kind::Reset(rst)) = &event.kind {
                newest_rst_ns = newest_rst_ns.max(rst.ts_ns);
            }
            self.ingest(&agent, std::slice::from_ref(&event));
            n += 1;
        }
        if !times.is_empty() {
            self.engine.remember_stored_ids(times.keys().map(String::as_str));
            for (id, ts) in std::mem::take(&mut self.restored.times) {
                times.entry(id).or_default().extend(ts);
            }
            self.restored = Restored { times, newest_rst_ns: newest_rst_ns.max(self.restored.newest_rst_ns) };
        }
        for agent in store.agents()? {
            let mark = v1::Watermark {
                ts_ns: agent.watermark_ns,
                since_ns: agent.watermark_since_ns,
                ended: false,
                ..Default::default()
            };
            self.ingest(&agent.name, &[v1::Event { kind: Some(v1::event::Kind::Watermark(mark)) }]);
        }
        Ok(n)
    }

    /// After a restart: where the replay of what the store kept starts (see
    /// [`LiveCorrelation::replay`]), from the resume point the last run wrote under
    /// [`RESUME_META`]; `None` when there is nothing to replay. Without a resume point (the last
    /// run died before its first decision was stored, or never had an event it could vouch
    /// for), or with one that cannot be read, the newest [`REPLAY_WITHOUT_RESUME_POINT`] stored
    /// events are replayed: each was acknowledged, and one never fed would otherwise never be
    /// decided; the bound keeps a store filled otherwise (or by a run whose resume point never
    /// held) from taking the engine's memory and the start-up's time. Reads only the store, so
    /// a fresh collector never waits for the engine.
    pub fn replay_start(store: &crate::store::Store) -> Result<Option<i64>, crate::store::StoreError> {
        if let Some(bytes) = store.meta(RESUME_META)? {
            match <[u8; 8]>::try_from(bytes.as_slice()) {
                Ok(raw) => return Ok(Some(i64::from_be_bytes(raw))),
                Err(_) => tracing::warn!(bytes = bytes.len(), "The stored correlation resume point is not 8 bytes."),
            }
        }
        let Some((since_ns, older)) = store.newest_events_from(REPLAY_WITHOUT_RESUME_POINT)? else { return Ok(None) };
        if older {
            tracing::warn!(
                events = REPLAY_WITHOUT_RESUME_POINT,
                from = %pb::ts_text(since_ns),
                "No correlation resume point in the store: replaying the newest events only; resets stored before them are listed as they were (or not at all if never decided)."
            );
        }
        Ok(Some(since_ns))
    }

    /// [`LiveCorrelation::resume_point`], but also early enough for an event not fed yet that
    /// the store filed at `oldest_queued` (see `Inbox::oldest_ns`).
    pub fn resume_point_before(&mut self, oldest_queued: Option<i64>) -> Option<i64> {
        let queued = oldest_queued.map(|t| t.saturating_sub(REPLAY_CONTEXT_NS));
        [self.resume_point(), queued].into_iter().flatten().min()
    }

    /// Where a replay after a restart must start: early enough for every undecided RST and the
    /// openings of their connections (reference clock, ns). With every RST fed so far decided,
    /// early enough for the events still to come: the newest watermark, or without one (agents
    /// reading files send theirs at the end) the newest event fed, less the context margin.
    /// (Without that, a collector killed while all it had been fed was decided had no resume
    /// point, and the resets stored but not fed yet were never decided after the restart.)
    pub fn resume_point(&mut self) -> Option<i64> {
        // Agent clocks, not corrected: the context margin is far wider than any skew.
        let oldest_pending = self.engine.oldest_undecided_ns();
        let newest = self.engine.newest_watermark();
        // The oldest of the agents' newest: a batch of one agent stored but not queued yet is
        // newer than what was fed of that agent, whatever the other agents' clocks say.
        let newest_fed = self.newest_fed_ns.values().min().copied();
        oldest_pending.or(newest).or(newest_fed).map(|t| t.saturating_sub(REPLAY_CONTEXT_NS))
    }

    /// Remembers the newest filing time of `events`, which `agent`'s batch feeds.
    fn note_fed(&mut self, agent: &str, events: &[v1::Event]) {
        if let Some(newest) = events.iter().filter_map(crate::backlog::filed_at).max() {
            match self.newest_fed_ns.get_mut(agent) {
                Some(t) => *t = (*t).max(newest),
                None => {
                    self.newest_fed_ns.insert(agent.to_string(), newest);
                }
            }
        }
    }

    /// One connection by id (record label or tuple): its label, each agent's tuple, its
    /// reports (decided and pending) and its ladder.
    pub fn connection(&mut self, id: &str) -> Option<ConnectionView> {
        let root = self.engine.find_group(id)?;
        let (label, records) = self.engine.group_records(root);
        let mut reports: Vec<v1::ResetReport> =
            self.decided.values().filter(|r| r.connection == label).map(|r| (**r).clone()).collect();
        reports.extend(self.engine.pending().into_iter().filter(|r| r.connection == label));
        reports.sort_by(|a, b| (a.ts_ns, &a.id).cmp(&(b.ts_ns, &b.id)));
        Some(ConnectionView { label, records, reports, ladder: self.engine.ladder(root) })
    }

    /// Clock estimates by agent name, with the reference agent's name.
    pub fn clocks(&self) -> (BTreeMap<String, ClockEstimate>, String) {
        let estimates = self.engine.clock_estimates();
        let names = self.engine.agents().iter().map(|a| a.name.clone());
        let map = names.zip(estimates).filter_map(|(n, e)| e.map(|e| (n, e))).collect();
        (map, self.engine.reference().unwrap_or("").to_string())
    }
}

/// The store's meta key for an agent's addresses from its last hello.
pub fn local_meta_key(agent: &str) -> String {
    format!("agent.local.{agent}")
}

/// Addresses stored one after the other, each after a byte giving its length (4 or 16).
fn split_addresses(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if tail.len() < len {
            break;
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    out
}

/// The stored form of an agent's addresses (see [`split_addresses`]).
pub fn join_addresses(addresses: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in addresses.iter().filter(|a| a.len() <= 255) {
        out.push(a.len() as u8);
        out.extend_from_slice(a);
    }
    out
}

/// One connection as the correlation knows it.
pub struct ConnectionView {
    /// Its printable id.
    pub label: String,
    /// Each agent's tuple for it.
    pub records: Vec<(String, rstscope_proto::FlowKey)>,
    /// Its distinct RSTs.
    pub reports: Vec<v1::ResetReport>,
    /// What each agent saw, in corrected time order.
    pub ladder: Vec<v1::LadderStep>,
}

fn in_nets(nets: &[IpNet], ep: Option<&v1::Endpoint>) -> bool {
    pb::endpoint(ep).is_some_and(|e| nets.iter().any(|n| n.contains(&e.ip())))
}

fn on_port(ports: &[u16], ep: Option<&v1::Endpoint>) -> bool {
    pb::endpoint(ep).is_some_and(|e| ports.contains(&e.port()))
}

/// Whether a report passes a filter: hosts and ports on any endpoint any agent saw, agents
/// among the observers, verdict, cause and flags of the report.
pub fn report_matches(selection: &Selection, r: &v1::ResetReport) -> bool {
    let q = &selection.query;
    let ends = || {
        [r.claimed_sender.as_ref(), r.receiver.as_ref()]
            .into_iter()
            .chain(r.observations.iter().flat_map(|o| [o.src.as_ref(), o.dst.as_ref()]))
    };
    q.since_ns.is_none_or(|since| r.ts_ns >= since)
        && q.until_ns.is_none_or(|until| r.ts_ns < until)
        && (selection.hosts.is_empty() || ends().any(|e| in_nets(&selection.hosts, e)))
        && (q.ports.is_empty() || ends().any(|e| on_port(&q.ports, e)))
        && (q.agents.is_empty() || r.observations.iter().any(|o| q.agents.contains(&o.agent)))
        && (selection.verdicts.is_empty() || selection.verdicts.contains(&r.verdict))
        && (q.causes.is_empty() || q.causes.contains(&r.cause))
        && (q.flags.is_empty() || q.flags.iter().any(|f| *f == pb::flags_text(r.flags)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_point_stays_before_what_is_still_queued() {
        let mut live = LiveCorrelation::new(Config::default());
        assert_eq!(live.resume_point_before(None), None, "nothing fed, nothing queued");
        assert_eq!(live.resume_point_before(Some(5 * REPLAY_CONTEXT_NS)), Some(4 * REPLAY_CONTEXT_NS));
        let mark = v1::Watermark { ts_ns: 10 * REPLAY_CONTEXT_NS, ..Default::default() };
        live.ingest("a", &[v1::Event { kind: Some(v1::event::Kind::Watermark(mark)) }]);
        assert_eq!(live.resume_point_before(None), Some(9 * REPLAY_CONTEXT_NS), "the engine's own");
        assert_eq!(live.resume_point_before(Some(3 * REPLAY_CONTEXT_NS)), Some(2 * REPLAY_CONTEXT_NS), "the queue's");
        assert_eq!(live.resume_point_before(Some(20 * REPLAY_CONTEXT_NS)), Some(9 * REPLAY_CONTEXT_NS));
    }

    const S: i64 = 1_000_000_000;
    const MS: i64 = 1_000_000;
    const T0: i64 = 1_700_000_000 * S;
    /// The server agent's clock minus the client agent's (the reference).
    const SKEW: i64 = -4_200 * MS;

    fn ep(s: &str) -> v1::Endpoint {
        let a: std::net::SocketAddr = s.parse().expect("address");
        pb::endpoint_to_pb(rstscope_proto::Endpoint::new(a.ip(), a.port()))
    }

    /// The handshake of 198.51.100.2:40000 → 203.0.113.10:80 at T0, as the client's agent
    /// (`skew` 0) or the server's saw it.
    fn open(conn_id: u64, skew: i64) -> v1::Event {
        let at_client = skew == 0;
        let (syn, synack) = if at_client { (T0, T0 + 11 * MS) } else { (T0 + 5 * MS + skew, T0 + 6 * MS + skew) };
        v1::Event {
            kind: Some(v1::event::Kind::Open(v1::ConnectionOpen {
                conn_id,
                orig: Some(ep("198.51.100.2:40000")),
                resp: Some(ep("203.0.113.10:80")),
                start_ns: syn,
                orig_isn: Some(1_000),
                resp_isn: Some(90_000),
                syn_ns: Some(syn),
                synack_ns: Some(synack),
                orig_ttl: if at_client { 64 } else { 61 },
                resp_ttl: if at_client { 61 } else { 64 },
                ..Default::default()
            })),
        }
    }

    /// The server's RST of that connection, seen at `ts` (the agent's clock) with `ttl`.
    fn server_rst(conn_id: u64, ts: i64, ttl: u32) -> v1::Event {
        v1::Event {
            kind: Some(v1::event::Kind::Reset(v1::RstEvent {
                ts_ns: ts,
                src: Some(ep("203.0.113.10:80")),
                dst: Some(ep("198.51.100.2:40000")),
                conn_id,
                sender: v1::Role::Responder as i32,
                flags: 0x014,
                seq: 90_500,
                ttl,
                checksum: v1::Checksum::Good as i32,
                ip_header_ok: true,
                cause: v1::Cause::AppAbort as i32,
                seq_relation: v1::SeqRelation::Exact as i32,
                ..Default::default()
            })),
        }
    }

    fn mark_since(since_ns: i64, ts_ns: i64) -> v1::Event {
        v1::Event { kind: Some(v1::event::Kind::Watermark(v1::Watermark { ts_ns, since_ns, ..Default::default() })) }
    }

    /// The server's abort 20 minutes into a connection both agents saw open, at `t`, as the
    /// (client, server) agents saw it; with the handshake, the server's clock is known (4.2 s
    /// behind).
    fn abort_seen_by_both(t: i64) -> (Vec<v1::Event>, Vec<v1::Event>) {
        let client = vec![open(1, 0), server_rst(1, t + 15 * MS, 61), mark_since(T0 - S, t + 300 * S)];
        let server = vec![open(7, SKEW), server_rst(7, t + SKEW, 64), mark_since(T0 - S + SKEW, t + 300 * S + SKEW)];
        (client, server)
    }

    /// Opens (or reopens, after a simulated restart) the store in `dir`.
    fn open_store(dir: &tempfile::TempDir) -> crate::store::Store {
        crate::store::Store::open(crate::store::StoreConfig::new(dir.path())).expect("open the store")
    }

    /// Stores `events` as `agent`'s batch `seq`, as ingest does before the engine is fed.
    fn store_batch(store: &crate::store::Store, agent: &str, seq: u64, events: &[v1::Event]) {
        store
            .append_batch(agent, "boot", &v1::Batch { seq, events: events.to_vec(), spooled_seq: 0 }, 0)
            .expect("append");
    }

    fn put(store: &crate::store::Store, decided: &[ToStore]) {
        store.put_decided(decided.iter().map(|d| (&*d.report, d.stored_at.as_slice()))).expect("put");
    }

    #[test]
    fn a_report_decided_again_at_another_time_after_a_restart_is_listed_once() {
        use crate::store::ResetQuery;
        let dir = tempfile::tempdir().expect("tempdir");
        let t = T0 + 1_200 * S;
        let (client, server) = abort_seen_by_both(t);
        let (first, resume) = {
            let store = open_store(&dir);
            let mut live = LiveCorrelation::new(Config::default());
            for (agent, events) in [("client", &client), ("server", &server)] {
                store_batch(&store, agent, 1, events);
                live.ingest(agent, events);
            }
            let decided = live.tick();
            assert_eq!(decided.len(), 1, "one RST, decided");
            assert!(decided[0].stored_at.is_empty(), "a new report");
            put(&store, &decided);
            (decided[0].report.clone(), live.resume_point().expect("a resume point"))
        };
        assert!(resume > T0, "the replay starts after the handshake");

        // Restarted: the replay brings the RSTs back but not the handshake, so the server's
        // clock is unknown and the same RST is decided again at another time.
        let store = open_store(&dir);
        let mut live = LiveCorrelation::new(Config::default());
        live.replay(&store, resume).expect("replay");
        let again = live.tick();
        assert_eq!(again.len(), 1, "decided again");
        let second = again[0].report.clone();
        assert_eq!(second.id, first.id, "the same report");
        assert_ne!(second.ts_ns, first.ts_ns, "the test needs a report that moved");
        assert_eq!(again[0].stored_at, [first.ts_ns], "its stored time, from the store");
        put(&store, &again);
        let listed = store.reports(&ResetQuery::default()).expect("reports");
        let times: Vec<(String, i64)> = listed.iter().map(|r| (r.id.clone(), r.ts_ns)).collect();
        assert_eq!(times, [(first.id.clone(), second.ts_ns)], "listed once, under its new time");
        assert_eq!(store.status().expect("status").reports, 1);

        // Restarted once more: the store now names the new time.
        drop(store);
        let store = open_store(&dir);
        let mut live = LiveCorrelation::new(Config::default());
        live.replay(&store, resume).expect("replay");
        let third = live.tick();
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].stored_at, [second.ts_ns], "the stored time, once the first move is durable");
        put(&store, &third);
        assert_eq!(store.reports(&ResetQuery::default()).expect("reports").len(), 1);
    }

    /// A report first decided from one agent's sighting keeps its id when another agent's
    /// sighting of the same RST arrives late (an agent back from an outage), and keeps it after a
    /// restart too, although the replay brings both sightings at once and the id of a report
    /// decided from both would name the other agent's: it is listed once.
    #[test]
    fn a_report_that_gained_a_late_sighting_keeps_its_id_after_a_restart() {
        use crate::store::ResetQuery;
        let dir = tempfile::tempdir().expect("tempdir");
        let t = T0 + 1_200 * S;
        let (client, server) = abort_seen_by_both(t);
        let (first, resume) = {
            let store = open_store(&dir);
            let mut live = LiveCorrelation::new(Config::default());
            let mut reports = Vec::new();
            // The server's agent alone first: its sighting is decided without the client's.
            for (agent, events) in [("server", &server), ("client", &client)] {
                store_batch(&store, agent, 1, events);
                live.ingest(agent, events);
                let decided = live.tick();
                assert_eq!(decided.len(), 1, "decided, then decided again with the late sighting");
                put(&store, &decided);
                reports.push(decided[0].report.clone());
            }
            assert_eq!(reports[0].id, reports[1].id, "the late sighting keeps the id");
            assert_eq!(store.reports(&ResetQuery::default()).expect("reports").len(), 1);
            (reports[1].clone(), live.resume_point().expect("a resume point"))
        };

        let store = open_store(&dir);
        let mut live = LiveCorrelation::new(Config::default());
        live.replay(&store, resume).expect("replay");
        let again = live.tick();
        assert_eq!(again.len(), 1, "decided again");
        assert_eq!(again[0].report.id, first.id, "the id it was stored under");
        assert_eq!(live.engine.stored_ids_remembered(), 0, "forgotten once every stored id was decided again");
        put(&store, &again);
        let listed = store.reports(&ResetQuery::default()).expect("reports");
        assert_eq!(listed.len(), 1, "listed once: {:?}", listed.iter().map(|r| (&r.id, r.ts_ns)).collect::<Vec<_>>());
    }

    /// An agent reading a file sends its watermark only at the end. A collector that decided
    /// all it had been fed of such an agent still has a resume point, and after a crash the
    /// replay from it decides a RST that was stored but not fed yet.
    #[test]
    fn a_crash_after_everything_fed_was_decided_loses_no_stored_reset() {
        use crate::store::ResetQuery;
        let dir = tempfile::tempdir().expect("tempdir");
        let t = T0 + 60 * S;
        let fed = vec![open(1, 0), server_rst(1, t, 61)];
        let not_fed = vec![open(2, 0), server_rst(2, t + 5 * S, 61)];
        let resume = {
            let store = open_store(&dir);
            let mut live = LiveCorrelation::new(Config::default());
            store_batch(&store, "client", 1, &fed);
            live.ingest("client", &fed);
            let decided = live.tick();
            assert_eq!(decided.len(), 1, "decided without a watermark");
            put(&store, &decided);
            assert_eq!(live.engine.oldest_undecided_ns(), None, "nothing left undecided");
            let resume = live.resume_point().expect("a resume point all the same");
            // Stored (and acknowledged), then the collector dies before feeding it.
            store_batch(&store, "client", 2, &not_fed);
            resume
        };
        let store = open_store(&dir);
        let mut live = LiveCorrelation::new(Config::default());
        live.replay(&store, resume).expect("replay");
        put(&store, &live.tick());
        let listed = store.reports(&ResetQuery::default()).expect("reports");
        let times: Vec<i64> = listed.iter().map(|r| r.ts_ns).collect();
        assert_eq!(times, [t, t + 5 * S], "both resets listed once");
    }

    /// A collector killed before it stored its first decision has written no resume point;
    /// the next run replays every stored event (fewer than [`REPLAY_WITHOUT_RESUME_POINT`]), so
    /// the resets acknowledged before the crash are decided all the same (a resume point that
    /// cannot be read means the same).
    #[test]
    fn a_crash_before_the_first_decision_replays_everything_stored() {
        use crate::store::ResetQuery;
        let t = T0 + 20 * 60 * S;
        let empty = tempfile::tempdir().expect("tempdir");
        let store = open_store(&empty);
        assert_eq!(LiveCorrelation::replay_start(&store).expect("meta"), None, "a new store has nothing to replay");
        for resume_meta in [None, Some(&b"garbage"[..])] {
            let dir = tempfile::tempdir().expect("tempdir");
            {
                let store = open_store(&dir);
                let (client, server) = abort_seen_by_both(t);
                store_batch(&store, "client", 1, &client);
                store_batch(&store, "server", 1, &server);
                if let Some(bytes) = resume_meta {
                    store.set_meta(RESUME_META, bytes).expect("meta");
                }
                // Killed here: acknowledged, never fed, nothing decided.
            }
            let store = open_store(&dir);
            let since = LiveCorrelation::replay_start(&store).expect("meta").expect("a replay");
            let mut live = LiveCorrelation::new(Config::default());
            let replayed = live.replay(&store, since).expect("replay");
            assert_eq!(replayed, 4, "every stored event but the watermarks ({resume_meta:?})");
            put(&store, &live.tick());
            let listed = store.reports(&ResetQuery::default()).expect("reports");
            let verdicts: Vec<&str> = listed.iter().map(|r| r.verdict.as_str()).collect();
            assert_eq!(verdicts, ["end-to-end"], "the abort decided once ({resume_meta:?})");
        }
    }
}
