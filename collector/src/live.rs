//! Live correlation: the engine of [`crate::correlate`] fed from ingest, decided on a timer.
//!
//! Ingest hands every durably stored batch to [`LiveCorrelation::ingest`] (after the store,
//! so nothing is correlated that a crash could lose). A ticker calls [`LiveCorrelation::tick`]
//! when a batch brought a RST or a watermark (see [`LiveCorrelation::wake`]), and at least
//! every few hundred milliseconds: what became decidable (every relevant agent's watermark
//! passed the RST plus the settle window) is decided once, kept, and published to followers.
//! Undecided RSTs are listed with the verdict `pending`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use rstscope_proto::v1;
use tokio::sync::broadcast;

use crate::correlate::{ClockEstimate, Config, Correlator};
use crate::pb;
use crate::query::Selection;

/// Decided reports kept in memory for listing (the oldest are dropped beyond this).
const MAX_KEPT: usize = 1_000_000;

/// The collector's correlation state.
pub struct LiveCorrelation {
    engine: Correlator,
    /// Decided reports by (time, id).
    decided: BTreeMap<(i64, String), Arc<v1::ResetReport>>,
    /// The time each decided report is filed under, by id.
    decided_at: std::collections::HashMap<String, i64>,
    /// Newly decided reports, for followers.
    pub published: broadcast::Sender<Arc<v1::ResetReport>>,
    /// Records held beyond which the engine forgets old decided connections.
    compact_at: usize,
    /// Notified when an ingested batch held a RST or a watermark: something may have become
    /// decidable, so the ticker need not wait for its next period.
    pub wake: Arc<tokio::sync::Notify>,
}

/// A replay starts this long before the oldest undecided RST (connection openings before it).
const REPLAY_CONTEXT_NS: i64 = 600_000_000_000;

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
            published,
            compact_at: COMPACT_AT,
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// An agent said hello: its addresses tell which endpoints are local to it.
    pub fn hello(&mut self, hello: &v1::AgentHello) {
        let local: Vec<IpAddr> = hello.local_addresses.iter().filter_map(|b| pb::ip_from_bytes(b)).collect();
        self.engine.agent(&hello.agent_name, &local);
    }

    /// Feeds a stored batch of one agent.
    pub fn ingest(&mut self, agent: &str, events: &[v1::Event]) {
        let a = self.engine.agent(agent, &[]);
        let mut decisive = false;
        for e in events {
            self.engine.ingest(a, e);
            decisive |= matches!(e.kind, Some(v1::event::Kind::Reset(_)) | Some(v1::event::Kind::Watermark(_)));
        }
        if decisive {
            self.wake.notify_one();
        }
    }

    /// Decides what can be decided; returns the new reports (also kept and published).
    pub fn tick(&mut self) -> Vec<Arc<v1::ResetReport>> {
        let reports: Vec<Arc<v1::ResetReport>> = self.engine.decide().into_iter().map(Arc::new).collect();
        for r in &reports {
            // A report replaced (late sighting, forged partner): drop the old version.
            if let Some(old_ts) = self.decided_at.insert(r.id.clone(), r.ts_ns) {
                self.decided.remove(&(old_ts, r.id.clone()));
            }
            self.decided.insert((r.ts_ns, r.id.clone()), r.clone());
            let _ = self.published.send(r.clone());
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
        reports
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
    /// ones are decided again identically (same ids: the store keeps one copy).
    pub fn replay(&mut self, store: &crate::store::Store, since_ns: i64) -> Result<u64, crate::store::StoreError> {
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
            self.ingest(&agent, std::slice::from_ref(&event));
            n += 1;
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

    /// Where a replay after a restart must start: early enough for every undecided RST and the
    /// openings of their connections (reference clock, ns).
    pub fn resume_point(&mut self) -> Option<i64> {
        // Agent clocks, not corrected: the context margin is far wider than any skew.
        let oldest_pending = self.engine.oldest_undecided_ns();
        let newest = self.engine.newest_watermark();
        oldest_pending.or(newest).map(|t| t.saturating_sub(REPLAY_CONTEXT_NS))
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
