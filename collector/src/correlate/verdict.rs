//! Verdicts: one report per distinct RST packet, from who saw it against who could have.
//!
//! For one RST, every agent of its connection group gets a place on the path of the RST's
//! direction: at the claimed sender, at the receiver, or through (between, ordered by the TTL
//! the sender's packets had there). Then (vocabulary §1):
//! - sender and receiver both saw it: `end-to-end`;
//! - the receiver (or an agent downstream) saw it, an agent upstream that recorded the
//!   connection and covered that time did not: `injected` between the two;
//! - the sender (or an agent upstream) saw it, a covering agent downstream that recorded the
//!   connection did not, and the RST could have arrived (good checksums, TTL above the hop
//!   count): `lost` between the two;
//! - otherwise `unverified`, with the reason each silent agent's silence does not count;
//! - `pending` while a relevant agent's watermark has not passed the RST plus the settle window
//!   (its listed watermark, which runs on past the RSTs it still holds, for every connection
//!   none of those RSTs could be part of: [`Correlator::vouched_ns`]).

use std::collections::HashSet;
use std::net::IpAddr;

use rstscope_proto::{v1, FlowKey};

use super::{text, unrouted_ttl, ClockEstimate, Correlator};
use crate::pb;

/// Where an agent sits for one RST's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    AtSender,
    Through,
    AtReceiver,
    Unknown,
}

impl Place {
    fn direction(self) -> &'static str {
        match self {
            Place::AtSender => "out",
            Place::Through => "through",
            Place::AtReceiver => "in",
            Place::Unknown => "unknown",
        }
    }
}

/// One agent's part in one RST's verdict.
#[derive(Clone, Debug)]
struct Role {
    agent: usize,
    place: Place,
    /// TTL of the sender's packets here (path order), 0 when unknown.
    sender_ttl: u32,
    /// Its record of the connection, if any.
    conn: Option<usize>,
    /// Its sighting of the RST, if any.
    rst: Option<usize>,
    /// The RST's time on this agent's clock.
    local_ts: i64,
    /// It can vouch for that time (captured it without loss). Why not is put in words only
    /// where a report says it ([`Correlator::gap_of`]): most roles never need the words.
    covered: bool,
    /// The window it must vouch for (its clock) and the listed watermark that may extend its
    /// coverage, as [`Coverage::gap_until`] takes them.
    window: (i64, i64, Option<i64>),
    /// Its given addresses include the sender's or the receiver's.
    owns_end: bool,
}

impl Role {
    fn saw(&self) -> bool {
        self.rst.is_some()
    }
    /// Silence here counts: the agent covered the time without loss, and either recorded the
    /// connection or runs on the very host the packet is from or for (its addresses given, not
    /// inferred): a host whose agent captured nothing of a connection never took part in it.
    fn vouches(&self) -> bool {
        self.rst.is_none() && (self.conn.is_some() || self.owns_end) && self.covered
    }
}

/// Per-decide snapshot of what does not change between RSTs.
pub(crate) struct Context {
    clocks: Vec<Option<ClockEstimate>>,
    locals: Vec<Vec<IpAddr>>,
    /// Newest watermark of any agent, reference clock.
    newest_ns: i64,
    /// Per agent, its listed watermark when that reaches past its plain one.
    listed: Vec<Option<ListedIndex>>,
}

/// An agent's [`super::Listed`] watermark, indexed by everything through which one of its
/// settling RSTs could, on arrival, join a group (see [`Correlator::vouched_ns`]).
pub(crate) struct ListedIndex {
    until_ns: i64,
    keys: HashSet<FlowKey>,
    /// (seq, ack, flags): the RST-identity join.
    identities: HashSet<(u32, u32, u32)>,
    /// ISN and TSval join keys of the records the settling RSTs belong to, where the engine
    /// knows those records already.
    isn_keys: HashSet<(u32, u32, u16)>,
    tsval_keys: HashSet<(u32, u32, u16)>,
}

/// Allowance for path delay on top of the clock uncertainty.
const PATH_SLACK_NS: i64 = 500_000_000;

impl Correlator {
    pub(crate) fn context(&self) -> Context {
        let clocks = self.clock_estimates();
        let locals = (0..self.agents.len()).map(|a| self.local_addresses(a).0).collect();
        let newest_ns = self.newest_watermark_with(&clocks).unwrap_or(i64::MIN);
        let listed = (0..self.agents.len()).map(|a| self.listed_index(a)).collect();
        Context { clocks, locals, newest_ns, listed }
    }

    /// Agent `a`'s listed watermark, indexed, if it reaches past its plain watermark.
    fn listed_index(&self, a: usize) -> Option<ListedIndex> {
        let coverage = &self.agents[a].coverage;
        let listed = coverage.listed.as_ref()?;
        if coverage.watermark_ns().is_some_and(|w| listed.until_ns <= w) {
            return None;
        }
        let mut index = ListedIndex {
            until_ns: listed.until_ns,
            keys: HashSet::new(),
            identities: HashSet::new(),
            isn_keys: HashSet::new(),
            tsval_keys: HashSet::new(),
        };
        for r in &listed.settling {
            index.keys.insert(r.key);
            index.identities.insert((r.seq, r.ack, r.flags));
            if let Some(&i) = self.conn_index.get(&(a, r.conn_id)) {
                let c = &self.conns[i];
                index.isn_keys.extend(c.isn_key());
                index.tsval_keys.extend(c.tsval_key());
            }
        }
        Some(index)
    }

    /// How far agent `a` vouches for the group with records `members` and RSTs `rsts`: its
    /// listed watermark unless one of the RSTs it lists as still settling could join the group,
    /// else its plain watermark (agent clock).
    ///
    /// Why this is safe (precision first: a settling RST wrongly let through could turn an
    /// `end-to-end` into `injected` or `lost`; one wrongly held back only waits for it): a RST
    /// reaches a group only with its record, and a record joins a group only through one of
    /// [`super::matching`]'s keys, all of which this checks against the group as it is, with
    /// nothing about the path assumed (NAT may change every address and port):
    /// - its tuple is the tuple of any record of the group (`tuple+isn`, `tuple+time`; this
    ///   also covers its own record being there already, and a record the agent split in time,
    ///   which keeps its tuple);
    /// - its (seq, ack, flags) are those of any RST of the group (`rst-identity`);
    /// - its record, if the engine knows it, has the ISNs or TSvals of any record of the group
    ///   (`isn`, `tsval`; a RST itself carries neither, so a record the engine does not know
    ///   cannot join by them on its arrival).
    ///
    /// Any of these keeps the group waiting for the plain watermark, i.e. until the RST has
    /// arrived. Otherwise the decision is the one the engine would make with the listed RSTs
    /// already in, which is all the plain watermark promised: later events of other agents
    /// may still join groups, with either watermark alike.
    pub(crate) fn vouched_ns(&self, cx: &Context, a: usize, members: &[usize], rsts: &[usize]) -> Option<i64> {
        let plain = self.agents[a].coverage.watermark_ns();
        let Some(listed) = &cx.listed[a] else { return plain };
        let record_joins = members.iter().any(|&m| {
            let c = &self.conns[m];
            listed.keys.contains(&c.key())
                || c.isn_key().is_some_and(|k| listed.isn_keys.contains(&k))
                || c.tsval_key().is_some_and(|k| listed.tsval_keys.contains(&k))
        });
        let rst_joins = rsts.iter().any(|&r| {
            let e = &self.rsts[r].event;
            listed.identities.contains(&(e.seq, e.ack, e.flags))
        });
        if record_joins || rst_joins {
            plain
        } else {
            Some(listed.until_ns)
        }
    }

    /// [`Correlator::vouched_ns`] of every agent for one group.
    fn vouched(&self, cx: &Context, members: &[usize], rsts: &[usize]) -> Vec<Option<i64>> {
        (0..self.agents.len()).map(|a| self.vouched_ns(cx, a, members, rsts)).collect()
    }

    /// The agent's clock minus the reference, and the allowance around it.
    fn offset(&self, cx: &Context, agent: usize, t_ref: i64) -> (i64, i64) {
        match cx.clocks.get(agent).copied().flatten() {
            Some(c) => (c.offset_at(t_ref), c.uncertainty_ns + PATH_SLACK_NS),
            None => (0, self.cfg.max_skew_ns),
        }
    }

    fn corrected(&self, cx: &Context, agent: usize, ts: i64) -> i64 {
        ts - self.offset(cx, agent, ts).0
    }

    /// Decides every RST that can be decided now and returns their reports. With `all`
    /// (offline, every input ended), nothing stays pending.
    pub fn decide(&mut self) -> Vec<v1::ResetReport> {
        self.run(false).into_iter().map(|(report, _)| report).collect()
    }

    /// [`Correlator::decide`], each report with the time of the report this engine last handed
    /// out under the same id (`None`: the first under that id since the engine started).
    pub fn decide_with_previous(&mut self) -> Vec<(v1::ResetReport, Option<i64>)> {
        self.run(false)
    }

    /// Reports for the RSTs not decided yet, with verdict `pending`.
    pub fn pending(&mut self) -> Vec<v1::ResetReport> {
        self.run(true).into_iter().map(|(report, _)| report).collect()
    }

    /// Marks every agent's input as ended and decides everything.
    pub fn finish(&mut self) -> Vec<v1::ResetReport> {
        for a in &mut self.agents {
            a.finished = true;
        }
        self.decide()
    }

    /// Pending reports (`pending_only`), or the decided ones each with the time of the report
    /// handed out before under its id.
    fn run(&mut self, pending_only: bool) -> Vec<(v1::ResetReport, Option<i64>)> {
        let cx = self.context();
        let mut roots: Vec<usize> = self.undecided.iter().map(|&r| self.root(self.rsts[r].conn)).collect();
        roots.sort_unstable();
        roots.dedup();
        let mut out = Vec::new();
        for root in roots {
            let mut rsts: Vec<usize> = match self.index.members_of(root) {
                Some(members) => self.group_rsts(members),
                None => self.rsts_of[root].clone(),
            };
            let marks = {
                let root_only = [root];
                self.vouched(&cx, self.index.members_of(root).unwrap_or(&root_only), &rsts)
            };
            let waiting = !pending_only && self.certainly_pending(&cx, &rsts, &marks);
            if waiting && !cfg!(debug_assertions) {
                continue;
            }
            let members = self.members(root);
            rsts.sort_by_key(|&r| (self.corrected(&cx, self.rsts[r].agent, self.rsts[r].event.ts_ns), r));
            let clusters = self.clusters(&cx, &rsts);
            if waiting {
                // Debug builds (the tests) check the shortcut against the clusters it skips.
                debug_assert!(
                    clusters.iter().all(|c| self.laggard(&cx, c, &marks).is_some()),
                    "a waiting group was decidable"
                );
                continue;
            }
            // Every cluster is (re)evaluated: one decided before may gain a late sighting or a
            // forged partner in the other direction, and then its report is replaced (same id).
            let mut all: Vec<(Vec<usize>, v1::ResetReport, bool)> = Vec::new();
            for cluster in clusters {
                // Only pending clusters are listed, and only the others are handed out: a report
                // the caller would drop is not built (a pending one is no "injected" partner).
                let laggard = self.laggard(&cx, &cluster, &marks);
                if laggard.is_some() != pending_only || (pending_only && cluster.iter().all(|&r| self.rsts[r].decided))
                {
                    continue;
                }
                let (mut report, is_pending) = self.report(&cx, root, &members, &cluster, laggard, &marks);
                if let Some(id) = cluster.iter().find_map(|&r| self.rsts[r].report_id.clone()) {
                    report.id = id;
                } else if let Some(id) = self.stored_id(&cluster) {
                    report.id = id;
                }
                all.push((cluster, report, is_pending));
            }
            // Injected both ways within 2 s: the signature of a forger resetting both ends.
            let injected: Vec<(i64, bool)> = all
                .iter()
                .filter(|d| d.1.verdict == "injected")
                .map(|d| (d.1.ts_ns, self.rsts[d.0[0]].sent_by_originator(self)))
                .collect();
            for d in &mut all {
                if d.1.verdict != "injected" {
                    continue;
                }
                let dir = self.rsts[d.0[0]].sent_by_originator(self);
                if injected.iter().any(|&(t, o)| o != dir && (t - d.1.ts_ns).abs() <= 2_000_000_000) {
                    d.1.both_directions = true;
                    d.1.evidence.push(v1::Evidence {
                        name: "both-directions".into(),
                        detail: "both endpoints received RSTs neither sent, within 2 s".into(),
                    });
                }
            }
            for (cluster, report, is_pending) in all {
                let settled = cluster.iter().all(|&r| self.rsts[r].decided);
                if pending_only {
                    if is_pending && !settled {
                        out.push((report, None));
                    }
                    continue;
                }
                if is_pending {
                    continue;
                }
                // Unchanged since it was handed out: nothing to say again.
                let same = settled
                    && cluster.iter().all(|&r| {
                        let o = &self.rsts[r];
                        o.verdict.as_deref() == Some(report.verdict.as_str())
                            && o.both_directions == report.both_directions
                            && o.report_id.as_deref() == Some(report.id.as_str())
                            && o.cluster_size == cluster.len()
                    });
                if same {
                    continue;
                }
                for &r in &cluster {
                    let o = &mut self.rsts[r];
                    o.verdict = Some(report.verdict.clone());
                    o.report_id = Some(report.id.clone());
                    o.both_directions = report.both_directions;
                    o.cluster_size = cluster.len();
                    if !o.decided {
                        o.decided = true;
                        self.undecided.remove(&r);
                    }
                }
                let previous = self.handed_out.insert(report.id.clone(), report.ts_ns);
                out.push((report, previous));
            }
        }
        out.sort_by(|a, b| (a.0.ts_ns, &a.0.id).cmp(&(b.0.ts_ns, &b.0.id)));
        out
    }

    /// Splits a group's RSTs (in corrected time order) into distinct packets: each cluster holds
    /// at most one sighting per agent, all with the same packet identity.
    fn clusters(&self, cx: &Context, rsts: &[usize]) -> Vec<Vec<usize>> {
        let mut taken = vec![false; rsts.len()];
        let mut out = Vec::new();
        for i in 0..rsts.len() {
            if taken[i] {
                continue;
            }
            taken[i] = true;
            let mut cluster = vec![rsts[i]];
            for j in i + 1..rsts.len() {
                if taken[j] {
                    continue;
                }
                let s = rsts[j];
                if cluster.iter().any(|&c| self.rsts[c].agent == self.rsts[s].agent) {
                    continue;
                }
                if self.same_packet(cx, rsts[i], s) {
                    taken[j] = true;
                    cluster.push(s);
                }
            }
            out.push(cluster);
        }
        out
    }

    /// Whether two sightings at different agents are one packet.
    fn same_packet(&self, cx: &Context, a: usize, b: usize) -> bool {
        let (oa, ob) = (&self.rsts[a], &self.rsts[b]);
        let (ea, eb) = (&oa.event, &ob.event);
        if ea.flags != eb.flags || ea.payload_len != eb.payload_len || ea.window != eb.window {
            return false;
        }
        if oa.sent_by_originator(self) != ob.sent_by_originator(self) {
            return false;
        }
        let (ca, cb) = (&self.conns[oa.conn], &self.conns[ob.conn]);
        let seq_ok = ea.seq == eb.seq
            || matches!((ca.isn_of(oa.from_orig), cb.isn_of(ob.from_orig)),
                (Some(x), Some(y)) if ea.seq.wrapping_sub(x) == eb.seq.wrapping_sub(y));
        let ack_ok = ea.ack == eb.ack
            || matches!((ca.isn_of(!oa.from_orig), cb.isn_of(!ob.from_orig)),
                (Some(x), Some(y)) if ea.ack.wrapping_sub(x) == eb.ack.wrapping_sub(y));
        if !seq_ok || !ack_ok {
            return false;
        }
        let (ta, tb) = (self.corrected(cx, oa.agent, ea.ts_ns), self.corrected(cx, ob.agent, eb.ts_ns));
        let allowance = self.offset(cx, oa.agent, ta).1 + self.offset(cx, ob.agent, tb).1;
        (ta - tb).abs() <= allowance
    }

    /// Each agent's place for a RST sent by the originator (`from_orig`) of the group.
    fn place(
        &self,
        cx: &Context,
        agent: usize,
        conn: Option<usize>,
        rst: Option<usize>,
        from_orig: bool,
    ) -> (Place, u32) {
        let (sender, receiver, sender_ttl, receiver_ttl) = match (conn, rst) {
            (Some(c), _) => {
                let c = &self.conns[c];
                let o = rst.map(|r| &self.rsts[r]);
                let ttl = c.ttl_of(from_orig);
                let ttl = if ttl == 0 { o.map_or(0, |o| o.event.ttl) } else { ttl };
                (c.endpoint(from_orig), c.endpoint(!from_orig), ttl, c.ttl_of(!from_orig))
            }
            (None, Some(r)) => {
                let o = &self.rsts[r];
                (o.src, o.dst, o.event.ttl, 0)
            }
            (None, None) => return (Place::Unknown, 0),
        };
        let locals = &cx.locals[agent];
        let at_sender = locals.contains(&sender.ip());
        let at_receiver = locals.contains(&receiver.ip());
        let place = match (at_sender, at_receiver) {
            (true, false) => Place::AtSender,
            (false, true) => Place::AtReceiver,
            (true, true) => Place::Unknown,
            (false, false) if !self.agents[agent].local.is_empty() || !locals.is_empty() => Place::Through,
            (false, false) => match (unrouted_ttl(sender_ttl), unrouted_ttl(receiver_ttl)) {
                (true, false) => Place::AtSender,
                (false, true) => Place::AtReceiver,
                _ => Place::Through,
            },
        };
        (place, sender_ttl)
    }

    /// The agent a distinct RST (`cluster`, sightings in corrected time order) still waits
    /// for, if any: any agent may still report a sighting or a record of its connection (agents
    /// do not know which paths they see), so every agent still capturing is waited for.
    /// `marks`: how far each agent vouches for the cluster's group ([`Correlator::vouched`]).
    fn laggard(&self, cx: &Context, cluster: &[usize], marks: &[Option<i64>]) -> Option<usize> {
        let t_ref = self.t_ref(cx, cluster[0]);
        (0..self.agents.len())
            .find(|&a| !cluster.iter().any(|&r| self.rsts[r].agent == a) && self.waits_for(cx, a, t_ref, marks[a]))
    }

    /// A sighting's time on the reference clock (a cluster's time when it is the first).
    fn t_ref(&self, cx: &Context, rst: usize) -> i64 {
        let o = &self.rsts[rst];
        self.corrected(cx, o.agent, o.event.ts_ns)
    }

    /// Whether a RST at `t_ref` (reference clock) that agent `a` did not see waits for `a`:
    /// its capture goes on, how far it vouches for the RST's group (`mark`, its watermark or
    /// listed watermark) has not passed the RST plus the settle window, and the wait has not
    /// run out.
    fn waits_for(&self, cx: &Context, a: usize, t_ref: i64, mark: Option<i64>) -> bool {
        let info = &self.agents[a];
        let (offset, allowance) = self.offset(cx, a, t_ref);
        !info.finished
            && mark.is_none_or(|w| w < t_ref + offset + allowance + self.cfg.settle_ns)
            && cx.newest_ns < t_ref + self.cfg.max_wait_ns
    }

    /// Whether every distinct RST among a group's sightings (`rsts`) is still pending, known
    /// without splitting them into clusters: some agent without a sighting in the group waits
    /// for each sighting's time. (A cluster holds sightings of the group's agents only, and its
    /// time is one of its sightings', so that agent is a [`Correlator::laggard`] of every
    /// cluster.) Groups waiting for an agent are thus passed over cheaply on every decision.
    fn certainly_pending(&self, cx: &Context, rsts: &[usize], marks: &[Option<i64>]) -> bool {
        let times: Vec<i64> = rsts.iter().map(|&r| self.t_ref(cx, r)).collect();
        (0..self.agents.len()).any(|a| {
            !rsts.iter().any(|&r| self.rsts[r].agent == a) && times.iter().all(|&t| self.waits_for(cx, a, t, marks[a]))
        })
    }

    /// The report of one distinct RST (`cluster`, sightings in corrected time order) whose
    /// [`Correlator::laggard`] is `laggard`, and whether it is still pending.
    fn report(
        &self,
        cx: &Context,
        root: usize,
        members: &[usize],
        cluster: &[usize],
        laggard: Option<usize>,
        marks: &[Option<i64>],
    ) -> (v1::ResetReport, bool) {
        let first = &self.rsts[cluster[0]];
        let from_orig = first.sent_by_originator(self);
        let t_ref = self.corrected(cx, first.agent, first.event.ts_ns);

        // Every agent with a record of the connection or a sighting, plus agents whose own
        // address is the sender or receiver.
        let mut roles: Vec<Role> = Vec::new();
        let mut agents: Vec<usize> = members.iter().map(|&m| self.conns[m].agent).collect();
        agents.extend(cluster.iter().map(|&r| self.rsts[r].agent));
        let (sender_ep, receiver_ep) = (first.src, first.dst);
        for (a, locals) in cx.locals.iter().enumerate() {
            if !self.agents[a].local.is_empty()
                && (locals.contains(&sender_ep.ip()) || locals.contains(&receiver_ep.ip()))
            {
                agents.push(a);
            }
        }
        agents.sort_unstable();
        agents.dedup();
        for a in agents {
            let conn = members.iter().copied().find(|&m| self.conns[m].agent == a);
            let rst = cluster.iter().copied().find(|&r| self.rsts[r].agent == a);
            // The sender's role as this agent's record names it.
            let role_here = rst.map_or(from_orig, |r| self.rsts[r].from_orig);
            let (place, sender_ttl) = if conn.is_none() && rst.is_none() {
                let locals = &cx.locals[a];
                if locals.contains(&sender_ep.ip()) {
                    (Place::AtSender, 0)
                } else {
                    (Place::AtReceiver, 0)
                }
            } else {
                self.place(cx, a, conn, rst, role_here)
            };
            let (offset, allowance) = self.offset(cx, a, t_ref);
            let local_ts = rst.map_or(t_ref + offset, |r| self.rsts[r].event.ts_ns);
            let info = &self.agents[a];
            let window = (local_ts - allowance, local_ts + allowance, marks[a]);
            let covered = info.coverage.covers_until(window.0, window.1, window.2);
            let given = &self.agents[a].local;
            let owns_end = given.contains(&sender_ep.ip()) || given.contains(&receiver_ep.ip());
            roles.push(Role { agent: a, place, sender_ttl, conn, rst, local_ts, covered, window, owns_end });
        }
        // Path order from the sender: at-sender, through (higher sender TTL first), at-receiver.
        roles.sort_by(|x, y| x.place.cmp(&y.place).then(y.sender_ttl.cmp(&x.sender_ttl)).then(x.agent.cmp(&y.agent)));

        let is_pending = laggard.is_some();
        let mut evidence: Vec<v1::Evidence> = Vec::new();
        let name = |a: usize| self.agents[a].name.clone();
        let name_ref = |a: usize| self.agents[a].name.as_str();
        let path: Vec<&Role> = roles.iter().filter(|r| r.place != Place::Unknown).collect();
        let sender = path.iter().find(|r| r.place == Place::AtSender).copied();
        let receiver = path.iter().rev().find(|r| r.place == Place::AtReceiver).copied();

        for r in &path {
            let Some(x) = r.rst else { continue };
            let (what, verb) = match r.place {
                Place::AtSender => ("seen-at-sender", "leave"),
                Place::AtReceiver => ("seen-at-receiver", "arrive"),
                _ => ("seen-on-path", "pass"),
            };
            evidence.push(ev(what, text::sighting(name_ref(r.agent), verb, r.local_ts, self.rsts[x].event.ttl)));
        }

        let verdict: &str;
        let mut location = String::new();
        let first_saw = path.iter().position(|r| r.saw());
        let last_saw = path.iter().rposition(|r| r.saw());
        let sender_saw = sender.is_some_and(|s| s.saw());
        let receiver_saw = receiver.is_some_and(|r| r.saw());
        // Upstream silent witnesses (before the first sighting) and downstream ones.
        let upstream = first_saw.and_then(|f| path[..f].iter().rposition(|r| r.vouches()).map(|u| (u, f)));
        let downstream = last_saw.and_then(|l| path[l + 1..].iter().position(|r| r.vouches()).map(|d| (l, l + 1 + d)));
        // Only a RST some silent agent downstream should have seen needs to be deliverable.
        let deliverable = if downstream.is_some() { self.deliverable(cluster, &path) } else { Ok(()) };

        if is_pending {
            verdict = pb::PENDING;
            if let Some(a) = laggard {
                let (offset, _) = self.offset(cx, a, t_ref);
                evidence.push(ev(
                    "waiting-for-agent",
                    format!(
                        "{}'s watermark has not passed {} plus the settle window",
                        name(a),
                        pb::ts_text(t_ref + offset)
                    ),
                ));
            }
        } else if sender_saw && receiver_saw {
            verdict = "end-to-end";
        } else if let Some((u, f)) = upstream {
            verdict = "injected";
            location = format!("between {} and {}", name(path[u].agent), name(path[f].agent));
            let w = path[u];
            evidence.push(ev(
                if w.place == Place::AtSender { "sender-silent" } else { "path-silent" },
                format!("{} {}, but saw no such RST", name(w.agent), self.witness(w)),
            ));
        } else if let (Some((l, d)), Ok(())) = (downstream, &deliverable) {
            verdict = "lost";
            location = format!("between {} and {}", name(path[l].agent), name(path[d].agent));
            let w = path[d];
            let mut detail = format!("{} {}, but never saw the RST", name(w.agent), self.witness(w));
            if let Some(end) = w.conn.map(|c| self.conns[c].end_ns).filter(|&e| e > w.local_ts) {
                detail.push_str(&format!("; its side kept the connection going until {}", pb::ts_text(end)));
            }
            evidence.push(ev(if w.place == Place::AtReceiver { "receiver-silent" } else { "path-silent" }, detail));
        } else {
            verdict = "unverified";
            if let Err(why) = &deliverable {
                evidence.push(ev("not-deliverable", why.clone()));
            }
            // Say why the silent side's silence does not count.
            let upstream_seen = sender_saw || first_saw.is_some_and(|f| path[f].place == Place::AtSender);
            let (which, missing) = if upstream_seen { ("receiver", receiver) } else { ("sender", sender) };
            match missing {
                None => {
                    evidence.push(ev(
                        &format!("no-{which}-agent"),
                        format!("no agent captures at the {which}'s end of this connection"),
                    ));
                }
                Some(m) if !m.saw() => {
                    let why = if let Some(gap) = self.gap_of(m) {
                        gap
                    } else if m.conn.is_none() {
                        "it has no record of this connection".to_string()
                    } else {
                        "its silence is not evidence here".to_string()
                    };
                    evidence.push(ev(&format!("{which}-not-covered"), format!("{}: {why}", name(m.agent))));
                }
                Some(_) => {}
            }
        }

        // Cause: the sender's own view where it saw the RST, else the nearest sighting's.
        let cause = if verdict == "injected" {
            "middlebox".to_string()
        } else {
            let nearest = path.iter().find(|r| r.saw()).and_then(|r| r.rst).unwrap_or(cluster[0]);
            pb::cause_name(self.rsts[nearest].event.cause).to_string()
        };
        // Whether the receiver accepted it.
        let accepted = receiver.and_then(|r| r.rst).and_then(|r| {
            let e = &self.rsts[r].event;
            if e.evidence.iter().any(|x| x.name == "challenge-ack" || x.name == "ineffective") {
                return Some(false);
            }
            match v1::SeqRelation::try_from(e.seq_relation) {
                Ok(v1::SeqRelation::Exact) => Some(true),
                Ok(v1::SeqRelation::InWindow) | Ok(v1::SeqRelation::OutOfWindow) => Some(false),
                _ => None,
            }
        });
        // Hop count against the TTLs of the RST.
        if let (Some(s), Some(r)) = (sender, receiver) {
            if let (Some(a), Some(b)) = (s.rst, r.rst) {
                let hops = s.sender_ttl as i64 - r.sender_ttl as i64;
                let drop = self.rsts[a].event.ttl as i64 - self.rsts[b].event.ttl as i64;
                if s.sender_ttl != 0 && r.sender_ttl != 0 && hops != drop {
                    evidence.push(ev(
                        "ttl-hops-mismatch",
                        format!("TTL fell by {drop} between the ends, the connection's other packets by {hops}"),
                    ));
                }
            }
        }
        // The agents' own findings, once per name.
        let mut seen_names: Vec<&str> = Vec::new();
        for r in &path {
            if let Some(x) = r.rst {
                for e in &self.rsts[x].event.evidence {
                    if !seen_names.contains(&e.name.as_str()) {
                        seen_names.push(&e.name);
                        evidence.push(ev(&e.name, text::concat(&[name_ref(r.agent), ": ", &e.detail])));
                    }
                }
            }
        }
        for r in roles.iter().filter(|r| r.rst.is_some()) {
            if let Some(c) = cx.clocks.get(r.agent).copied().flatten() {
                if c.offset_ns.abs() >= 1_000_000 {
                    evidence.push(ev(
                        "clock-offset",
                        format!(
                            "{}'s clock is {:+.3} s from {} (±{:.3} s)",
                            name(r.agent),
                            c.offset_ns as f64 / 1e9,
                            self.reference().unwrap_or("?"),
                            c.uncertainty_ns as f64 / 1e9
                        ),
                    ));
                }
            }
        }

        // The receiver's view names the endpoints (the claimed sender "as the receiver saw it").
        let viewer = receiver.and_then(|r| r.rst).or_else(|| path.iter().find_map(|r| r.rst)).unwrap_or(cluster[0]);
        let vo = &self.rsts[viewer];
        let vc = &self.conns[vo.conn];
        let mut observations: Vec<v1::Observation> = Vec::new();
        for r in &roles {
            if let Some(x) = r.rst {
                let o = &self.rsts[x];
                let e = &o.event;
                observations.push(v1::Observation {
                    agent: name(r.agent),
                    ts_ns: e.ts_ns,
                    corrected_ns: self.corrected(cx, r.agent, e.ts_ns),
                    src: Some(pb::endpoint_to_pb(o.src)),
                    dst: Some(pb::endpoint_to_pb(o.dst)),
                    ttl: e.ttl,
                    ip_id: e.ip_id,
                    seq: e.seq,
                    ack: e.ack,
                    flags: e.flags,
                    window: e.window,
                    payload_len: e.payload_len,
                    direction: r.place.direction().to_string(),
                    local_cause: e.cause,
                    record: text::record_label(name_ref(r.agent), e.conn_id),
                });
            }
        }
        let ts_ns = observations.iter().map(|o| o.corrected_ns).min().unwrap_or(t_ref);
        let match_key = members
            .iter()
            .map(|&m| self.conns[m].matched_by)
            .filter(|k| *k != "single")
            .min_by_key(|k| key_rank(k))
            .unwrap_or("single")
            .to_string();
        let report = v1::ResetReport {
            id: self.report_id(cluster),
            ts_ns,
            connection: self.group_label(root),
            claimed_sender: Some(pb::endpoint_to_pb(vo.src)),
            receiver: Some(pb::endpoint_to_pb(vo.dst)),
            client: Some(pb::endpoint_to_pb(vc.orig)),
            server: Some(pb::endpoint_to_pb(vc.resp)),
            flags: vo.event.flags,
            verdict: verdict.to_string(),
            cause,
            both_directions: false,
            accepted,
            location,
            match_key,
            observations,
            evidence,
        };
        (report, is_pending)
    }

    /// Whether the RST could have reached its receiver: checksums right where the sender-side
    /// sighting verified them, TTL above the hop count to the receiver.
    fn deliverable(&self, cluster: &[usize], path: &[&Role]) -> Result<(), String> {
        let Some(near) = path.iter().find(|r| r.saw()) else { return Ok(()) };
        let o = &self.rsts[near.rst.unwrap_or(cluster[0])];
        let e = &o.event;
        if e.checksum == v1::Checksum::Bad as i32 {
            return Err(format!(
                "{} saw it with a bad TCP checksum: the receiver drops it",
                self.agents[near.agent].name
            ));
        }
        if !e.ip_header_ok && o.src.is_ipv4() {
            return Err(format!("{} saw it with a bad IPv4 header checksum", self.agents[near.agent].name));
        }
        if let Some(recv) = path.iter().rev().find(|r| r.place == Place::AtReceiver) {
            let hops = near.sender_ttl as i64 - recv.sender_ttl as i64;
            if near.sender_ttl != 0 && recv.sender_ttl != 0 && hops > 0 && i64::from(e.ttl) <= hops {
                return Err(format!(
                    "TTL {} at {} but the receiver is {hops} hops further: it expires on the way",
                    e.ttl, self.agents[near.agent].name
                ));
            }
        }
        Ok(())
    }

    /// Why a role's agent cannot vouch for its window, if it cannot.
    fn gap_of(&self, role: &Role) -> Option<String> {
        if role.covered {
            return None;
        }
        let (from, until, vouched_ns) = role.window;
        self.agents[role.agent].coverage.gap_until(from, until, vouched_ns)
    }

    /// Why an agent's silence counts, in words.
    fn witness(&self, w: &Role) -> String {
        let at = text::ts(w.local_ts);
        match w.conn {
            Some(_) => format!("recorded this connection ({}) and captured {at} without loss", self.conn_label(w.conn)),
            None => format!(
                "runs on this connection's host and captured {at} without loss, seeing nothing of the connection"
            ),
        }
    }

    fn conn_label(&self, conn: Option<usize>) -> String {
        conn.map_or_else(String::new, |c| {
            text::record_label(&self.agents[self.conns[c].agent].name, self.conns[c].conn_id)
        })
    }

    /// A connection group's printable id: its record at the first agent by name.
    pub(crate) fn group_label(&self, root: usize) -> String {
        let root_only = [root];
        let members = self.index.members_of(root).unwrap_or(&root_only);
        let best =
            members.iter().copied().min_by_key(|&m| (&self.agents[self.conns[m].agent].name, self.conns[m].conn_id));
        self.conn_label(best)
    }

    /// A stable id for a distinct RST: its sighting at the first agent by name.
    fn report_id(&self, cluster: &[usize]) -> String {
        let r =
            cluster.iter().copied().min_by_key(|&r| (&self.agents[self.rsts[r].agent].name, r)).unwrap_or(cluster[0]);
        self.sighting_id(r)
    }

    /// The id a report stored before a restart gave this cluster, if any: the id of one of its
    /// sightings among [`Correlator::remember_stored_ids`]. A report keeps the id of the
    /// cluster it was first decided from, and late sightings join it, so after a restart, which
    /// replays them all at once, the first sighting by agent name may not be the one its id names.
    fn stored_id(&self, cluster: &[usize]) -> Option<String> {
        if self.stored_ids.is_empty() {
            return None;
        }
        let mut ids: Vec<String> = cluster.iter().map(|&r| self.sighting_id(r)).collect();
        ids.sort_unstable();
        ids.into_iter().find(|id| self.stored_ids.contains(id))
    }

    /// The id of a report decided from sighting `r` first (see [`Correlator::report_id`]).
    fn sighting_id(&self, r: usize) -> String {
        let o = &self.rsts[r];
        let e = &o.event;
        let mut h = Fnv::default();
        h.write(self.agents[o.agent].name.as_bytes());
        for v in [e.conn_id, e.ts_ns as u64, u64::from(e.seq), u64::from(e.ack), u64::from(e.flags)] {
            h.write(&v.to_be_bytes());
        }
        text::hex16(h.0)
    }
}

impl super::RstObs {
    /// Sent by the group's originator, as the group's canonical record (the one with the
    /// lowest index) names roles: records that guessed roles differently (midstream) are
    /// mapped through the shared tuple.
    pub(crate) fn sent_by_originator(&self, c: &Correlator) -> bool {
        let root = c.root(self.conn);
        let canon = &c.conns[root];
        let mine = &c.conns[self.conn];
        if mine.key() == canon.key() && self.conn != root {
            // Same tuple: compare the actual sender endpoint.
            return self.src == canon.orig;
        }
        self.from_orig
    }
}

fn key_rank(k: &str) -> u8 {
    match k {
        "tuple+isn" => 0,
        "isn" => 1,
        "tsval" => 2,
        "tuple+time" => 3,
        "rst-identity" => 4,
        _ => 5,
    }
}

fn ev(name: &str, detail: String) -> v1::Evidence {
    v1::Evidence { name: name.to_string(), detail }
}

/// FNV-1a, 64 bit: stable across runs and builds (unlike std's hasher).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
