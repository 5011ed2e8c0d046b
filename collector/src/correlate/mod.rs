//! Correlation: the same connection across vantage points, and a verdict for every RST.
//!
//! This is the pure core of rstscope's main question, "who really sent this reset?". It has no
//! I/O and no clock: agents' events go in ([`Correlator::ingest`]), merged [`v1::ResetReport`]s
//! come out ([`Correlator::decide`]). The collector feeds it live from ingest and stores what it
//! decides; `rstscope analyze` feeds it from capture files in-process. One engine, so offline
//! and live analysis agree. Time is always the packets' time.
//!
//! How it decides (vocabulary: `shared/docs/reset-causes.md`):
//! 1. **Connections** seen by several agents are joined into one group ([`matching`]): same
//!    tuple and ISNs; through NAT by both ISNs and the server port; through ISN-rewriting
//!    firewalls by TCP timestamp values and the SYN's option layout; without handshakes by tuple
//!    and overlapping time. Each join remembers the key that matched.
//! 2. **Clocks**: each handshake seen at two agents is an NTP-style sample ([`clock`]).
//! 3. **Places**: for a RST's direction, each agent of the group sits at the claimed sender,
//!    at the receiver, or on the path between (ordered by the TTL the sender's packets had
//!    there). Agents know their own addresses (the agent's hello, `--local`), or they are
//!    inferred from which addresses send with an unreduced TTL.
//! 4. **Packet identity**: sightings of one RST at several agents share flags, sequence and
//!    acknowledgment numbers (relative to the ISNs where a firewall rewrote them), window and
//!    payload length, within the clock uncertainty.
//! 5. **Verdict**: who saw it against who could have: an agent *covers* a time when its
//!    capture ran without loss from before to after it ([`Coverage`]). Precision first: silence
//!    only counts against an agent that recorded the connection itself.

mod clock;
mod compact;
mod matching;
mod text;
mod verdict;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use rstscope_proto::{v1, Endpoint, FlowKey};

pub use clock::{ClockBook, ClockEstimate, Sample};

use crate::pb;

/// Tunables of the engine.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Margin beyond the RST (plus the agent's clock offset and the allowance: clock
    /// uncertainty and path slack) that an agent's watermark must have passed before the RST is
    /// decided without a sighting from that agent.
    ///
    /// Why a small margin suffices (it was 2 s, the agents' settle window, counted twice): an
    /// agent's watermark is held back to just before its oldest RST still settling
    /// (`Tracker::watermark_ns`) and travels behind the events pushed before it on one ordered,
    /// durable stream; so once it has passed a time, every sighting of that agent up to that
    /// time is already in the engine. What the margin still covers is a packet the agent's
    /// kernel handed over later than the agent's idle-clock margin (50 ms) allows; together
    /// with the path slack (500 ms) such a packet may be 750 ms late before a silence is
    /// counted that was not one. RSTs every agent saw never wait for it.
    ///
    /// The same margin goes on top of a listed watermark ([`Listed`]): it runs on to the agent's
    /// clock past the RSTs still settling that it names, so a RST another agent saw waits for
    /// that settle window only when one of the named RSTs could be a sighting of it, not
    /// whenever the agent holds any RST at all (at a few RSTs a second, nearly always).
    pub settle_ns: i64,
    /// Largest clock offset between agents assumed before handshakes measured it.
    pub max_skew_ns: i64,
    /// A RST still waiting for a silent agent this long (reference time, from the newest
    /// watermark) is decided without it: that agent's silence then makes it `unverified`.
    pub max_wait_ns: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config { settle_ns: 250_000_000, max_skew_ns: 10_000_000_000, max_wait_ns: 30_000_000_000 }
    }
}

/// What the engine knows of one agent.
#[derive(Clone, Debug, Default)]
pub struct AgentInfo {
    /// The agent's name (its column in the ladder).
    pub name: String,
    /// Addresses of the host it runs on, as given (hello, `--local`).
    pub local: Vec<IpAddr>,
    /// Capture runs without gaps: (since, watermark), agent clock.
    pub coverage: Coverage,
    /// The input has ended (offline): the watermark will not advance any more.
    pub finished: bool,
    /// Earliest event time the agent reported (agent clock): a watermark without `since`
    /// vouches back to it.
    pub first_event_ns: Option<i64>,
}

/// Which times an agent can vouch for: its capture ran, and lost nothing.
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    /// Continuous capture periods (since, until), agent clock, in order.
    pub runs: Vec<(i64, i64)>,
    /// Periods with known capture or event loss (from, until), agent clock.
    pub losses: Vec<(i64, i64, String)>,
    /// The newest watermark's later promise with its exceptions, if it made one past the last
    /// run's end: it extends that run for every connection none of the exceptions could be
    /// part of (see [`Listed`]).
    pub listed: Option<Listed>,
}

/// "Everything I captured up to `until_ns` has been sent, except these RSTs still settling"
/// (`Watermark.listed_until_ns` and `settling`), agent clock.
///
/// Why it may stand in for the plain watermark (which an agent holds just before its oldest
/// RST still settling, 2 s behind its clock whenever RSTs come more often than that): the only
/// sightings of this agent up to `until_ns` the engine lacks are the listed ones. If none of
/// them could become part of the group being decided (the verdict's `vouched_ns` checks each
/// join key), the decision is the one the engine would make with all of them in, which is all
/// the plain watermark promised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listed {
    /// Agent clock, past the last run's end.
    pub until_ns: i64,
    /// The RSTs captured up to then and not sent yet.
    pub settling: Vec<SettlingSighting>,
}

/// One RST an agent listed as still settling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettlingSighting {
    /// Capture time, agent clock.
    pub ts_ns: i64,
    /// Its tuple as the agent saw it.
    pub key: FlowKey,
    /// The agent's connection record it belongs to.
    pub conn_id: u64,
    /// Raw sequence number; with `ack` and `flags` what joins records by RST identity.
    pub seq: u32,
    /// Raw acknowledgment number.
    pub ack: u32,
    /// TCP flag bits.
    pub flags: u32,
}

impl Listed {
    /// The listing of a watermark, if it promises anything past `ts_ns` and every entry can be
    /// read (an entry without its endpoints could be any RST: then nothing is promised).
    pub fn of(w: &v1::Watermark) -> Option<Listed> {
        if w.listed_until_ns <= w.ts_ns {
            return None;
        }
        let settling = w
            .settling
            .iter()
            .map(|r| {
                let (src, dst) = (pb::endpoint(r.src.as_ref())?, pb::endpoint(r.dst.as_ref())?);
                Some(SettlingSighting {
                    ts_ns: r.ts_ns,
                    key: FlowKey::new(src, dst),
                    conn_id: r.conn_id,
                    seq: r.seq,
                    ack: r.ack,
                    flags: r.flags,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Listed { until_ns: w.listed_until_ns, settling })
    }
}

impl Coverage {
    /// Records a watermark: the capture has run continuously from `since_ns` (0: unknown, then
    /// the current run continues) up to `ts_ns`.
    pub fn watermark(&mut self, since_ns: i64, ts_ns: i64) {
        match self.runs.last_mut() {
            Some(run) if since_ns == 0 || since_ns <= run.1 || since_ns == run.0 => {
                run.1 = run.1.max(ts_ns);
                if since_ns != 0 && since_ns < run.0 {
                    run.0 = since_ns;
                }
            }
            _ => self.runs.push((if since_ns == 0 { ts_ns } else { since_ns.min(ts_ns) }, ts_ns)),
        }
    }

    /// Extends the start of the first run back to an event time the agent reported (an agent
    /// that sends events from before its first watermark's `since` was capturing then).
    pub fn saw_event(&mut self, ts_ns: i64) {
        if let [run] = self.runs.as_mut_slice() {
            run.0 = run.0.min(ts_ns);
        }
    }

    /// The newest watermark.
    pub fn watermark_ns(&self) -> Option<i64> {
        self.runs.last().map(|r| r.1)
    }

    /// Why the agent cannot vouch for `[from, until]` (agent clock), or `None` if it can.
    pub fn gap(&self, from: i64, until: i64) -> Option<String> {
        self.gap_until(from, until, None)
    }

    /// Whether [`Coverage::gap_until`] finds no gap, without putting one in words (most
    /// callers only ask whether the agent vouches).
    pub fn covers_until(&self, from: i64, until: i64, vouched_ns: Option<i64>) -> bool {
        self.run_covers(from, until, vouched_ns) && self.loss_within(from, until).is_none()
    }

    /// Whether one run (the last one extended to `vouched_ns`) covers `[from, until]`.
    fn run_covers(&self, from: i64, until: i64, vouched_ns: Option<i64>) -> bool {
        let last = self.runs.len().wrapping_sub(1);
        let extended = |(i, r): (usize, &(i64, i64))| match vouched_ns {
            Some(v) if i == last => (r.0, r.1.max(v)),
            _ => *r,
        };
        self.runs.iter().enumerate().map(extended).any(|r| r.0 <= from && until <= r.1)
    }

    /// The first reported loss overlapping `[from, until]`, if any.
    fn loss_within(&self, from: i64, until: i64) -> Option<&(i64, i64, String)> {
        self.losses.iter().find(|l| l.0 <= until && from <= l.1)
    }

    /// [`Coverage::gap`] with the last run reaching on to `vouched_ns` where that is later: a
    /// listed watermark that vouches for the connection in question ([`Listed`]).
    pub fn gap_until(&self, from: i64, until: i64, vouched_ns: Option<i64>) -> Option<String> {
        if !self.run_covers(from, until, vouched_ns) {
            let wm = self.watermark_ns().map(|w| vouched_ns.map_or(w, |v| w.max(v)));
            return Some(match wm {
                None => "it has sent no watermark".to_string(),
                Some(wm) if wm < until => format!("its capture ends at {} (watermark)", pb::ts_text(wm)),
                Some(_) => "its capture was not running then".to_string(),
            });
        }
        self.loss_within(from, until)
            .map(|l| format!("it reported capture loss from {} to {} ({})", pb::ts_text(l.0), pb::ts_text(l.1), l.2))
    }
}

/// One agent's view of one connection (its record id), from its open, RST and flow events.
#[derive(Clone, Debug)]
pub(crate) struct ConnObs {
    pub agent: usize,
    pub conn_id: u64,
    pub orig: Endpoint,
    pub resp: Endpoint,
    pub start_ns: i64,
    pub end_ns: i64,
    pub orig_isn: Option<u32>,
    pub resp_isn: Option<u32>,
    pub syn_ns: Option<i64>,
    pub synack_ns: Option<i64>,
    pub syn_tsval: Option<u32>,
    pub synack_tsval: Option<u32>,
    pub syn_options: String,
    /// TTL of the originator's packets here (0: unknown).
    pub orig_ttl: u32,
    /// TTL of the responder's packets here (0: unknown).
    pub resp_ttl: u32,
    pub midstream: bool,
    /// Packets the responder / originator sent here, from the flow summary.
    pub summary: Option<v1::FlowSummary>,
    /// The key that joined it to its group.
    pub matched_by: &'static str,
}

impl ConnObs {
    pub fn key(&self) -> FlowKey {
        FlowKey::new(self.orig, self.resp)
    }
    /// The `isn` join key (both ISNs and the server port), once both ISNs are known.
    pub(crate) fn isn_key(&self) -> Option<(u32, u32, u16)> {
        self.orig_isn.zip(self.resp_isn).map(|(o, r)| (o, r, self.resp.port()))
    }
    /// The `tsval` join key (SYN and SYN-ACK TSvals and the server port), once both are known
    /// and not zero.
    pub(crate) fn tsval_key(&self) -> Option<(u32, u32, u16)> {
        self.syn_tsval.zip(self.synack_tsval).filter(|(s, a)| *s != 0 && *a != 0).map(|(s, a)| (s, a, self.resp.port()))
    }
    /// The endpoint of `role` here.
    pub fn endpoint(&self, originator: bool) -> Endpoint {
        if originator {
            self.orig
        } else {
            self.resp
        }
    }
    /// TTL of the packets `role` sent, here.
    pub fn ttl_of(&self, originator: bool) -> u32 {
        if originator {
            self.orig_ttl
        } else {
            self.resp_ttl
        }
    }
    pub fn isn_of(&self, originator: bool) -> Option<u32> {
        if originator {
            self.orig_isn
        } else {
            self.resp_isn
        }
    }
}

/// One RST as one agent saw it.
#[derive(Clone, Debug)]
pub(crate) struct RstObs {
    pub agent: usize,
    pub conn: usize,
    pub event: v1::RstEvent,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// Sent by the connection's originator (as this agent's record sees it).
    pub from_orig: bool,
    pub decided: bool,
    /// The verdict once decided.
    pub verdict: Option<String>,
    /// The id of the report it was handed out in (kept when the report is replaced).
    pub report_id: Option<String>,
    /// That report's `both_directions`.
    pub both_directions: bool,
    /// Sightings in that report.
    pub cluster_size: usize,
}

/// The correlation engine. See the module docs.
#[derive(Debug, Default)]
pub struct Correlator {
    cfg: Config,
    agents: Vec<AgentInfo>,
    agent_index: HashMap<String, usize>,
    conns: Vec<ConnObs>,
    conn_index: HashMap<(usize, u64), usize>,
    /// Union-find parent of each connection: groups of one connection across agents.
    parent: Vec<usize>,
    rsts: Vec<RstObs>,
    /// RST indexes per connection record.
    rsts_of: Vec<Vec<usize>>,
    undecided: BTreeSet<usize>,
    index: matching::Index,
    clocks: ClockBook,
    /// Clock pairs already sampled per group pair, to count each handshake once.
    sampled: std::collections::HashSet<(usize, usize)>,
    /// Per agent: address → (connections sent with an unreduced TTL, with a reduced one).
    ttl_votes: Vec<HashMap<IpAddr, (u32, u32)>>,
    /// The agent clocks are compared against (first registered unless set).
    reference: Option<usize>,
    /// Each report id this engine handed out, with the time of its latest report: a report
    /// decided again names the time its earlier version was filed under
    /// ([`Correlator::decide_with_previous`]), so the store need not look it up. Kept while a
    /// RST carries the id (compaction prunes it with the RSTs), so as long as the id can be
    /// decided again.
    handed_out: HashMap<String, i64>,
    /// Ids of reports the store held before a restart that this engine may decide again
    /// ([`Correlator::remember_stored_ids`]).
    stored_ids: std::collections::HashSet<String>,
}

/// Initial TTLs and hop limits of common stacks: a packet with one of these has not been
/// routed yet, so it was captured on (or next to) the host that sent it.
pub(crate) fn unrouted_ttl(ttl: u32) -> bool {
    matches!(ttl, 32 | 64 | 128 | 255)
}

impl Correlator {
    /// An empty engine.
    pub fn new(cfg: Config) -> Self {
        Correlator { cfg, ..Default::default() }
    }

    /// Ids of reports stored before a restart, which the replay may decide again: a cluster
    /// decided now that has a sighting with one of these ids keeps it, rather than the id of
    /// its first sighting by agent name (see `report_id`), so the store replaces the report
    /// instead of listing it twice. Ids are added to those remembered already.
    pub fn remember_stored_ids<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        self.stored_ids.extend(ids.into_iter().map(str::to_string));
    }

    /// How many ids of [`Correlator::remember_stored_ids`] are remembered.
    pub fn stored_ids_remembered(&self) -> usize {
        self.stored_ids.len()
    }

    /// Forgets the ids of [`Correlator::remember_stored_ids`] (every replayed RST is decided).
    pub fn forget_stored_ids(&mut self) {
        self.stored_ids = Default::default();
    }

    /// The engine's settings.
    pub fn config(&self) -> Config {
        self.cfg
    }

    /// Registers an agent (or updates its given addresses) and returns its index. The first
    /// registered agent is the clock reference unless [`Correlator::set_reference`] says otherwise.
    pub fn agent(&mut self, name: &str, local: &[IpAddr]) -> usize {
        if let Some(&i) = self.agent_index.get(name) {
            if !local.is_empty() {
                self.agents[i].local = local.to_vec();
            }
            return i;
        }
        let i = self.agents.len();
        self.agents.push(AgentInfo { name: name.to_string(), local: local.to_vec(), ..Default::default() });
        self.ttl_votes.push(HashMap::new());
        self.agent_index.insert(name.to_string(), i);
        i
    }

    /// Compares every clock against this agent's.
    pub fn set_reference(&mut self, agent: usize) {
        self.reference = Some(agent);
    }

    /// Marks an agent's input as ended: its watermark will not advance (offline replays).
    pub fn finish_agent(&mut self, agent: usize) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.finished = true;
        }
    }

    /// Connections seen, each counted once however many agents saw it.
    pub fn connection_count(&self) -> usize {
        (0..self.conns.len()).filter(|&i| self.parent[i] == i).count()
    }

    /// The group a printable id names: a record label (`agent/0123456789abcdef`, as in
    /// reports' `connection` and observations' `record`) or a tuple (`ip:port-ip:port`) one
    /// of its records has.
    pub fn find_group(&self, id: &str) -> Option<usize> {
        let id = id.trim();
        let by_label = self.conns.iter().position(|c| {
            let label = format!("{}/{:016x}", self.agents[c.agent].name, c.conn_id);
            label == id
        });
        let found = by_label.or_else(|| {
            let key: FlowKey = id.parse().ok()?;
            self.conns.iter().rposition(|c| c.key() == key)
        })?;
        Some(self.root(found))
    }

    /// A group's printable id and the tuples its records have, per agent name.
    pub fn group_records(&self, root: usize) -> (String, Vec<(String, FlowKey)>) {
        let records = self
            .members(root)
            .iter()
            .map(|&m| (self.agents[self.conns[m].agent].name.clone(), self.conns[m].key()))
            .collect();
        (self.group_label(root), records)
    }

    /// What each agent of a group saw, in corrected time order: handshakes, first and last
    /// packets, RSTs with their verdicts.
    pub fn ladder(&self, root: usize) -> Vec<v1::LadderStep> {
        let clocks = self.clock_estimates();
        let corrected =
            |agent: usize, ts: i64| ts - clocks.get(agent).copied().flatten().map_or(0, |c| c.offset_at(ts));
        let mut steps = Vec::new();
        let members = self.members(root);
        for &m in &members {
            let c = &self.conns[m];
            let name = &self.agents[c.agent].name;
            let mut step = |ts: i64, what: String, verdict: &str| {
                steps.push(v1::LadderStep {
                    corrected_ns: corrected(c.agent, ts),
                    agent: name.clone(),
                    local_ns: ts,
                    what,
                    verdict: verdict.to_string(),
                });
            };
            if let Some(t) = c.syn_ns {
                step(t, format!("SYN {} > {}", c.orig, c.resp), "");
            }
            if let Some(t) = c.synack_ns {
                step(t, format!("SYN-ACK {} > {}", c.resp, c.orig), "");
            }
            if c.midstream {
                step(c.start_ns, format!("first packet (midstream) {} - {}", c.orig, c.resp), "");
            }
            if let Some(f) = &c.summary {
                step(f.end_ns, format!("last packet; {} {}", f.conn_state, f.history), "");
            }
        }
        for o in self.group_rsts(&members).into_iter().map(|r| &self.rsts[r]) {
            let e = &o.event;
            let what =
                format!("{} {} > {} seq {} ack {} ttl {}", pb::flags_text(e.flags), o.src, o.dst, e.seq, e.ack, e.ttl);
            steps.push(v1::LadderStep {
                corrected_ns: corrected(o.agent, e.ts_ns),
                agent: self.agents[o.agent].name.clone(),
                local_ns: e.ts_ns,
                what,
                verdict: o.verdict.clone().unwrap_or_else(|| pb::PENDING.to_string()),
            });
        }
        steps.sort_by(|a, b| (a.corrected_ns, &a.agent).cmp(&(b.corrected_ns, &b.agent)));
        steps
    }

    /// The earliest time (its agent's clock) of an RST not decided yet.
    pub fn oldest_undecided_ns(&self) -> Option<i64> {
        self.undecided.iter().map(|&r| self.rsts[r].event.ts_ns).min()
    }

    /// The newest watermark of any agent, on the reference clock.
    pub fn newest_watermark(&self) -> Option<i64> {
        self.newest_watermark_with(&self.clock_estimates())
    }

    /// [`Correlator::newest_watermark`] with the clock estimates already at hand.
    pub(crate) fn newest_watermark_with(&self, clocks: &[Option<ClockEstimate>]) -> Option<i64> {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.coverage.watermark_ns().map(|w| w - clocks[i].map_or(0, |c| c.offset_at(w))))
            .max()
    }

    /// Connection records and RSTs held.
    pub fn records(&self) -> (usize, usize) {
        (self.conns.len(), self.rsts.len())
    }

    /// The agents, in registration order.
    pub fn agents(&self) -> &[AgentInfo] {
        &self.agents
    }

    /// [`Correlator::ingest`] of an event the caller no longer needs: a RST is kept as it is,
    /// not copied (the live collector feeds its queued batches this way).
    pub fn ingest_owned(&mut self, agent: usize, event: v1::Event) {
        match event.kind {
            Some(v1::event::Kind::Reset(rst)) => self.on_reset(agent, rst),
            _ => self.ingest(agent, &event),
        }
    }

    /// Feeds one event an agent reported. Malformed events (no endpoints) are ignored: the
    /// collector's ingest already refused them.
    pub fn ingest(&mut self, agent: usize, event: &v1::Event) {
        use v1::event::Kind;
        match &event.kind {
            Some(Kind::Open(open)) => self.on_open(agent, open),
            Some(Kind::Flow(flow)) => self.on_flow(agent, flow),
            Some(Kind::Reset(rst)) => self.on_reset(agent, rst.clone()),
            Some(Kind::Loss(loss)) => {
                if let Some(a) = self.agents.get_mut(agent) {
                    let reason = if loss.reason.is_empty() { "capture loss".to_string() } else { loss.reason.clone() };
                    if loss.capture_dropped + loss.interface_dropped + loss.events_dropped > 0 {
                        a.coverage.losses.push((loss.from_ns, loss.until_ns, reason));
                    }
                }
            }
            Some(Kind::Watermark(w)) => {
                if let Some(a) = self.agents.get_mut(agent) {
                    let since = match (w.since_ns, a.coverage.runs.is_empty(), a.first_event_ns) {
                        (0, true, Some(first)) => first.min(w.ts_ns),
                        (since, _, _) => since,
                    };
                    a.coverage.watermark(since, w.ts_ns);
                    // Only the newest listing holds (one without any, from an older agent or a
                    // replay after a restart, takes it back).
                    a.coverage.listed = Listed::of(w);
                    // A capture that ended will not report more; a later run starts afresh.
                    a.finished = w.ended;
                }
            }
            None => {}
        }
    }

    fn conn_entry(&mut self, agent: usize, conn_id: u64, orig: Endpoint, resp: Endpoint, start_ns: i64) -> usize {
        if let Some(&i) = self.conn_index.get(&(agent, conn_id)) {
            let c = &mut self.conns[i];
            c.start_ns = c.start_ns.min(start_ns);
            c.end_ns = c.end_ns.max(start_ns);
            return i;
        }
        let i = self.conns.len();
        self.conns.push(ConnObs {
            agent,
            conn_id,
            orig,
            resp,
            start_ns,
            end_ns: start_ns,
            orig_isn: None,
            resp_isn: None,
            syn_ns: None,
            synack_ns: None,
            syn_tsval: None,
            synack_tsval: None,
            syn_options: String::new(),
            orig_ttl: 0,
            resp_ttl: 0,
            midstream: false,
            summary: None,
            matched_by: "single",
        });
        self.parent.push(i);
        self.rsts_of.push(Vec::new());
        self.conn_index.insert((agent, conn_id), i);
        if let Some(a) = self.agents.get_mut(agent) {
            a.coverage.saw_event(start_ns);
            a.first_event_ns = Some(a.first_event_ns.map_or(start_ns, |f| f.min(start_ns)));
        }
        i
    }

    fn vote_ttl(&mut self, agent: usize, ip: IpAddr, ttl: u32) {
        if ttl == 0 {
            return;
        }
        if let Some(votes) = self.ttl_votes.get_mut(agent) {
            let v = votes.entry(ip).or_default();
            if unrouted_ttl(ttl) {
                v.0 += 1;
            } else {
                v.1 += 1;
            }
        }
    }

    fn on_open(&mut self, agent: usize, open: &v1::ConnectionOpen) {
        let (Some(orig), Some(resp)) = (pb::endpoint(open.orig.as_ref()), pb::endpoint(open.resp.as_ref())) else {
            return;
        };
        let i = self.conn_entry(agent, open.conn_id, orig, resp, open.start_ns);
        {
            let c = &mut self.conns[i];
            c.orig_isn = open.orig_isn.or(c.orig_isn);
            c.resp_isn = open.resp_isn.or(c.resp_isn);
            c.syn_ns = open.syn_ns.or(c.syn_ns);
            c.synack_ns = open.synack_ns.or(c.synack_ns);
            c.syn_tsval = open.syn_tsval.or(c.syn_tsval);
            c.synack_tsval = open.synack_tsval.or(c.synack_tsval);
            if !open.syn_options.is_empty() {
                c.syn_options = open.syn_options.clone();
            }
            if open.orig_ttl != 0 {
                c.orig_ttl = open.orig_ttl;
            }
            if open.resp_ttl != 0 {
                c.resp_ttl = open.resp_ttl;
            }
            c.midstream = open.midstream;
        }
        self.vote_ttl(agent, orig.ip(), open.orig_ttl);
        self.vote_ttl(agent, resp.ip(), open.resp_ttl);
        self.join(i);
    }

    fn on_flow(&mut self, agent: usize, flow: &v1::FlowSummary) {
        let (Some(orig), Some(resp)) = (pb::endpoint(flow.orig.as_ref()), pb::endpoint(flow.resp.as_ref())) else {
            return;
        };
        let i = self.conn_entry(agent, flow.conn_id, orig, resp, flow.start_ns);
        let first_ttl =
            |d: &Option<v1::DirectionSummary>| d.as_ref().and_then(|d| d.ttl.as_ref()).map_or(0, |t| t.first);
        let (ot, rt) = (first_ttl(&flow.orig_dir), first_ttl(&flow.resp_dir));
        let had_open = self.conns[i].syn_ns.is_some() || self.conns[i].midstream;
        {
            let c = &mut self.conns[i];
            c.end_ns = c.end_ns.max(flow.end_ns);
            if c.orig_ttl == 0 {
                c.orig_ttl = ot;
            }
            if c.resp_ttl == 0 {
                c.resp_ttl = rt;
            }
            c.summary = Some(flow.clone());
        }
        if !had_open {
            self.vote_ttl(agent, orig.ip(), ot);
            self.vote_ttl(agent, resp.ip(), rt);
        }
        self.join(i);
    }

    fn on_reset(&mut self, agent: usize, rst: v1::RstEvent) {
        let (Some(src), Some(dst)) = (pb::endpoint(rst.src.as_ref()), pb::endpoint(rst.dst.as_ref())) else {
            return;
        };
        let from_orig = rst.sender != v1::Role::Responder as i32;
        let (orig, resp) = if from_orig { (src, dst) } else { (dst, src) };
        let i = self.conn_entry(agent, rst.conn_id, orig, resp, rst.ts_ns);
        if self.conns[i].ttl_of(from_orig) == 0 && rst.ttl_delta.is_some() {
            // The sender's earlier packets had this TTL here.
            let earlier = i64::from(rst.ttl) - i64::from(rst.ttl_delta.unwrap_or(0));
            let c = &mut self.conns[i];
            if from_orig {
                c.orig_ttl = earlier.clamp(0, 255) as u32;
            } else {
                c.resp_ttl = earlier.clamp(0, 255) as u32;
            }
        }
        let r = self.rsts.len();
        self.rsts_of[i].push(r);
        self.rsts.push(RstObs {
            agent,
            conn: i,
            event: rst,
            src,
            dst,
            from_orig,
            decided: false,
            verdict: None,
            report_id: None,
            both_directions: false,
            cluster_size: 0,
        });
        self.undecided.insert(r);
        self.join(i);
        self.join_by_rst(r);
    }

    /// RST indexes of a group's records.
    pub(crate) fn group_rsts(&self, members: &[usize]) -> Vec<usize> {
        members.iter().flat_map(|&m| self.rsts_of[m].iter().copied()).collect()
    }

    /// Root of a connection's group.
    pub(crate) fn root(&self, mut i: usize) -> usize {
        while self.parent[i] != i {
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize, key: &'static str) {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra == rb {
            return;
        }
        let (keep, gone) = if ra < rb { (ra, rb) } else { (rb, ra) };
        self.parent[gone] = keep;
        // Path compression for the two members.
        self.parent[a] = keep;
        self.parent[b] = keep;
        if self.conns[b].matched_by == "single" {
            self.conns[b].matched_by = key;
        }
        if self.conns[a].matched_by == "single" {
            self.conns[a].matched_by = key;
        }
    }

    /// Adds a clock sample when both records hold a full handshake.
    pub(crate) fn sample_clocks(&mut self, a: usize, b: usize) {
        let (ca, cb) = (&self.conns[a], &self.conns[b]);
        if ca.agent == cb.agent || self.sampled.contains(&(a.min(b), a.max(b))) {
            return;
        }
        let (Some(t1), Some(t4), Some(t2), Some(t3)) = (ca.syn_ns, ca.synack_ns, cb.syn_ns, cb.synack_ns) else {
            return;
        };
        self.sampled.insert((a.min(b), a.max(b)));
        let sample = Sample::from_handshake(t1, t4, t2, t3);
        self.clocks.add(ca.agent, cb.agent, sample);
    }

    /// Current clock estimates, one per agent.
    pub fn clock_estimates(&self) -> Vec<Option<ClockEstimate>> {
        let reference = self.reference.unwrap_or(0);
        self.clocks.solve(self.agents.len(), reference)
    }

    /// The agent clocks are compared against.
    pub fn reference(&self) -> Option<&str> {
        self.agents.get(self.reference.unwrap_or(0)).map(|a| a.name.as_str())
    }

    /// Addresses of an agent's host: as given, else inferred; with how they were found.
    pub fn local_addresses(&self, agent: usize) -> (Vec<IpAddr>, String) {
        let Some(info) = self.agents.get(agent) else { return (Vec::new(), String::new()) };
        if !info.local.is_empty() {
            return (info.local.clone(), "given".to_string());
        }
        let mut inferred: Vec<(IpAddr, u32)> =
            self.ttl_votes[agent].iter().filter(|(_, v)| v.0 > 0 && v.0 >= v.1).map(|(ip, v)| (*ip, v.0)).collect();
        inferred.sort();
        let how = if inferred.is_empty() {
            "none: no address sent with an unrouted TTL here".to_string()
        } else {
            let n: u32 = inferred.iter().map(|i| i.1).sum();
            format!("inferred: sent with an unrouted TTL (32/64/128/255) in {n} connection(s)")
        };
        (inferred.into_iter().map(|i| i.0).collect(), how)
    }
}
