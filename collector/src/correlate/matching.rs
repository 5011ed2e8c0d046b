//! Joining one agent's record of a connection to the other agents' records of the same one.
//!
//! Keys, strongest first, each named in the reports' `match_key`:
//! - `tuple+isn`: same addresses and ports, same ISNs (port reuse gives new ISNs, so a reused
//!   tuple never joins the old connection);
//! - `isn`: both ISNs and the server port, the tuple differing: NAT on the path (Linux and most
//!   NATs keep sequence numbers);
//! - `tsval`: TSvals of the SYN and the SYN-ACK, the server port and the SYN's option layout,
//!   for firewalls that rewrite ISNs;
//! - `tuple+time`: same tuple and overlapping time, for records without handshakes
//!   (midstream, refused, lone RSTs);
//! - `rst-identity`: no handshake anywhere, but the same RST (flags, seq, ack, one endpoint) at
//!   two agents within the skew allowance: a refused connection through NAT, say.
//!
//! One group holds at most one record per agent: an agent's two records are two connections.

use std::collections::HashMap;

use rstscope_proto::FlowKey;

use super::Correlator;

/// Lookup tables from keys to connection records.
#[derive(Debug, Default)]
pub(crate) struct Index {
    by_tuple: HashMap<FlowKey, Vec<usize>>,
    by_isns: HashMap<(u32, u32, u16), Vec<usize>>,
    by_tsval: HashMap<(u32, u32, u16), Vec<usize>>,
    /// (seq, ack, flags) → RST indexes.
    by_rst: HashMap<(u32, u32, u32), Vec<usize>>,
    /// Which tables hold a record already, by record: bit 0 tuple, 1 isn, 2 tsval.
    placed: Vec<u8>,
    /// Members of each group, by root.
    members: HashMap<usize, Vec<usize>>,
}

impl Index {
    /// Members of the group whose root is `root`, unless it is a group of one.
    pub(crate) fn members_of(&self, root: usize) -> Option<&[usize]> {
        self.members.get(&root).map(Vec::as_slice)
    }
}

/// The records of a table's list other than `i` may join it: a copy of the list (the joins
/// change the engine), or nothing, without allocating, when `i` is alone in it (the usual case).
fn others(list: Option<&Vec<usize>>, i: usize) -> Vec<usize> {
    match list {
        Some(list) if list.iter().any(|&j| j != i) => list.clone(),
        _ => Vec::new(),
    }
}

/// ISN pairs and tsvals only join records this close in time (agent clocks), to bound the
/// damage of a collision.
const STRONG_WINDOW_NS: i64 = 3_600_000_000_000;

impl Correlator {
    /// Members of the group whose root is `root`.
    pub(crate) fn members(&self, root: usize) -> Vec<usize> {
        self.index.members.get(&root).cloned().unwrap_or_else(|| vec![root])
    }

    /// Whether two groups may become one: records of one agent in both must be one connection
    /// the agent split in time (same tuple, no conflicting ISNs, one after the other), as a
    /// sensor that sees only one direction does (Zeek splits those too).
    fn agents_disjoint(&self, a: usize, b: usize) -> bool {
        let ma = self.members(self.root(a));
        let mb = self.members(self.root(b));
        ma.iter().all(|&x| mb.iter().all(|&y| self.continuation(x, y)))
    }

    fn continuation(&self, x: usize, y: usize) -> bool {
        let (cx, cy) = (&self.conns[x], &self.conns[y]);
        if cx.agent != cy.agent {
            return true;
        }
        let conflict = |a: Option<u32>, b: Option<u32>| matches!((a, b), (Some(a), Some(b)) if a != b);
        // The later record must have begun mid-connection: a new SYN is a new connection.
        let later = if cx.start_ns <= cy.start_ns { cy } else { cx };
        let began_midstream = later.midstream
            || later
                .summary
                .as_ref()
                .is_some_and(|f| !f.history.starts_with(['S', 's', '^']) && later.orig_isn.is_none());
        cx.key() == cy.key()
            && !conflict(cx.orig_isn, cy.orig_isn)
            && !conflict(cx.resp_isn, cy.resp_isn)
            && began_midstream
            && (cx.end_ns <= cy.start_ns || cy.end_ns <= cx.start_ns)
    }

    /// Joins `a` and `b`'s groups under `key`, unless that would put two records of one agent
    /// into one group. Returns whether they are (now) joined.
    pub(crate) fn try_union(&mut self, a: usize, b: usize, key: &'static str) -> bool {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra == rb {
            return true;
        }
        if !self.agents_disjoint(a, b) {
            return false;
        }
        let mut ma = self.index.members.remove(&ra).unwrap_or_else(|| vec![ra]);
        let mb = self.index.members.remove(&rb).unwrap_or_else(|| vec![rb]);
        for &x in &ma {
            for &y in &mb {
                self.sample_clocks(x, y);
            }
        }
        ma.extend(mb);
        self.union(a, b, key);
        let root = self.root(a);
        // Compress every member onto the new root.
        for &m in &ma {
            self.parent[m] = root;
        }
        self.index.members.insert(root, ma);
        true
    }

    /// Indexes record `i` by whatever it now knows, and joins it to matching records.
    pub(crate) fn join(&mut self, i: usize) {
        let placed = self.index.placed.get(i).copied().unwrap_or(0);
        let c = &self.conns[i];
        let key = c.key();
        let isns = c.isn_key();
        let tsvals = c.tsval_key();
        let mut now = placed;
        if placed & 1 == 0 {
            self.index.by_tuple.entry(key).or_default().push(i);
            now |= 1;
        }
        if placed & 2 == 0 {
            if let Some(k) = isns {
                self.index.by_isns.entry(k).or_default().push(i);
                now |= 2;
            }
        }
        if placed & 4 == 0 {
            if let Some(k) = tsvals {
                self.index.by_tsval.entry(k).or_default().push(i);
                now |= 4;
            }
        }
        if self.index.placed.len() <= i {
            self.index.placed.resize(i + 1, 0);
        }
        self.index.placed[i] = now;

        // Strongest key first; a record joins at most one record per other agent.
        if let Some(k) = isns {
            for j in others(self.index.by_isns.get(&k), i) {
                if self.joinable(i, j, STRONG_WINDOW_NS) {
                    let same_tuple = self.conns[j].key() == key;
                    self.try_union(i, j, if same_tuple { "tuple+isn" } else { "isn" });
                }
            }
        }
        if let Some(k) = tsvals {
            for j in others(self.index.by_tsval.get(&k), i) {
                if self.joinable(i, j, STRONG_WINDOW_NS) && self.conns[i].syn_options == self.conns[j].syn_options {
                    self.try_union(i, j, "tsval");
                }
            }
        }
        // Same tuple: ISNs must agree where both are known; otherwise times must overlap.
        let skew = self.cfg.max_skew_ns;
        let mut candidates: Vec<(i64, usize)> = Vec::new();
        for j in others(self.index.by_tuple.get(&key), i) {
            if !self.joinable(i, j, i64::MAX) {
                continue;
            }
            let (ci, cj) = (&self.conns[i], &self.conns[j]);
            let isn_conflict = matches!((ci.orig_isn, cj.orig_isn), (Some(a), Some(b)) if a != b)
                || matches!((ci.resp_isn, cj.resp_isn), (Some(a), Some(b)) if a != b);
            if isn_conflict {
                continue;
            }
            let both_isns = ci.orig_isn.is_some() && ci.orig_isn == cj.orig_isn;
            let overlap = ci.start_ns <= cj.end_ns + skew && cj.start_ns <= ci.end_ns + skew;
            if !both_isns && !overlap {
                continue;
            }
            let distance = if both_isns { -1 } else { (ci.start_ns - cj.start_ns).abs() };
            candidates.push((distance, j));
        }
        // Closest first; a group refuses a second record of one agent unless it continues the
        // first (see `continuation`).
        candidates.sort();
        for (distance, j) in candidates {
            self.try_union(i, j, if distance < 0 { "tuple+isn" } else { "tuple+time" });
        }
        // New handshake times on a record already in a group (a group of one is `i` alone).
        if let Some(members) = self.index.members_of(self.root(i)) {
            // A copy: sampling changes the engine.
            let members: Vec<usize> = members.to_vec();
            for m in members {
                self.sample_clocks(i, m);
            }
        }
    }

    /// Whether `j` is another agent's record within `window` of `i`'s start.
    fn joinable(&self, i: usize, j: usize, window: i64) -> bool {
        let (ci, cj) = (&self.conns[i], &self.conns[j]);
        i != j && ci.agent != cj.agent && (ci.start_ns - cj.start_ns).abs() <= window
    }

    /// Joins a RST's record to records at other agents that saw the very same RST, when no
    /// handshake key could (a refused connection through NAT).
    pub(crate) fn join_by_rst(&mut self, r: usize) {
        let (key, agent, ts, src, dst) = {
            let o = &self.rsts[r];
            ((o.event.seq, o.event.ack, o.event.flags), o.agent, o.event.ts_ns, o.src, o.dst)
        };
        let list = self.index.by_rst.entry(key).or_default();
        list.push(r);
        let candidates = others(Some(list), r);
        let skew = self.cfg.max_skew_ns;
        for s in candidates {
            let o = &self.rsts[s];
            if o.agent == agent || (o.event.ts_ns - ts).abs() > skew {
                continue;
            }
            let one_end_equal = o.src == src || o.dst == dst;
            if !one_end_equal {
                continue;
            }
            let (a, b) = (self.rsts[r].conn, o.conn);
            if self.root(a) != self.root(b) {
                self.try_union(a, b, "rst-identity");
            }
        }
    }
}
