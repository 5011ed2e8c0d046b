//! Forgetting old connections, so a long-running collector's memory stays bounded.
//!
//! Records are kept in vectors indexed by position (groups, RSTs, match tables all refer to
//! them by index), so forgetting some means renumbering the rest and rebuilding the tables from
//! the kept records. Two things make that safe and cheap:
//! - What the engine learned from the forgotten records stays: agents, clocks, address votes.
//!   The clock book in particular is not rebuilt, so the record pairs already sampled are
//!   renumbered with the records instead of forgotten: re-joining the kept groups must not count
//!   their handshakes a second time (that would weigh them double in the skew estimates).
//! - A compaction that would drop nothing returns before renumbering: the caller asks again
//!   only after the engine has grown, and a rebuild costs a re-join of every record.

use std::collections::{HashMap, HashSet};

use super::{matching, Correlator};

impl Correlator {
    /// Forgets connections whose RSTs are all decided and whose last activity is more than
    /// `horizon_ns` older than the newest watermark (reference clock), so a long-running
    /// collector's memory stays bounded. Agents, clocks and address votes are kept. Returns
    /// how many connection records were forgotten.
    pub fn compact(&mut self, horizon_ns: i64) -> usize {
        let clocks = self.clock_estimates();
        let corrected =
            |agent: usize, ts: i64| ts - clocks.get(agent).copied().flatten().map_or(0, |c| c.offset_at(ts));
        let newest = self.newest_watermark_with(&clocks).unwrap_or(i64::MIN);
        let cutoff = newest.saturating_sub(horizon_ns);
        // A group is kept when one of its records is recent or has an undecided RST.
        let mut keep_root: HashMap<usize, bool> = HashMap::new();
        for i in 0..self.conns.len() {
            let root = self.root(i);
            let c = &self.conns[i];
            let recent = corrected(c.agent, c.end_ns) >= cutoff;
            let open = self.rsts_of[i].iter().any(|&r| !self.rsts[r].decided);
            let entry = keep_root.entry(root).or_insert(false);
            *entry |= recent || open;
        }
        let kept = (0..self.conns.len()).filter(|&i| keep_root.get(&self.root(i)).copied().unwrap_or(false)).count();
        let dropped = self.conns.len() - kept;
        if dropped == 0 {
            return 0;
        }
        let old_conns = std::mem::take(&mut self.conns);
        let old_rsts = std::mem::take(&mut self.rsts);
        let old_parent = std::mem::take(&mut self.parent);
        let old_sampled = std::mem::take(&mut self.sampled);
        let mut remap: HashMap<usize, usize> = HashMap::with_capacity(kept);
        self.conn_index.clear();
        self.rsts_of.clear();
        self.undecided.clear();
        self.index = matching::Index::default();
        for (i, c) in old_conns.into_iter().enumerate() {
            let mut root = i;
            while old_parent[root] != root {
                root = old_parent[root];
            }
            if !keep_root.get(&root).copied().unwrap_or(false) {
                continue;
            }
            let n = self.conns.len();
            remap.insert(i, n);
            self.conn_index.insert((c.agent, c.conn_id), n);
            self.conns.push(c);
            self.parent.push(n);
            self.rsts_of.push(Vec::new());
        }
        // Renumbering keeps the order, so a pair stays (lower, higher).
        self.sampled = old_sampled
            .into_iter()
            .filter_map(|(a, b)| Some((*remap.get(&a)?, *remap.get(&b)?)))
            .collect::<HashSet<_>>();
        for mut o in old_rsts {
            let Some(&conn) = remap.get(&o.conn) else { continue };
            o.conn = conn;
            let r = self.rsts.len();
            if !o.decided {
                self.undecided.insert(r);
            }
            self.rsts_of[conn].push(r);
            self.rsts.push(o);
        }
        for i in 0..self.conns.len() {
            self.join(i);
        }
        for r in 0..self.rsts.len() {
            self.join_by_rst(r);
        }
        // An id no kept RST carries cannot be handed out again.
        let carried: HashSet<&str> = self.rsts.iter().filter_map(|o| o.report_id.as_deref()).collect();
        self.handed_out.retain(|id, _| carried.contains(id.as_str()));
        dropped
    }
}

#[cfg(test)]
mod tests {
    use rstscope_proto::v1;

    use crate::correlate::{Config, Correlator};

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_700_000_000 * S;

    fn ep(ip: [u8; 4], port: u32) -> Option<v1::Endpoint> {
        Some(v1::Endpoint { ip: ip.to_vec(), port })
    }

    /// A handshake of `client_port` to 203.0.113.10:80 seen at `syn` (SYN) and `synack`.
    fn open(conn_id: u64, client_port: u32, syn: i64, synack: i64) -> v1::Event {
        v1::Event {
            kind: Some(v1::event::Kind::Open(v1::ConnectionOpen {
                conn_id,
                orig: ep([198, 51, 100, 2], client_port),
                resp: ep([203, 0, 113, 10], 80),
                start_ns: syn,
                orig_isn: Some(1000 + client_port),
                resp_isn: Some(9000 + client_port),
                syn_ns: Some(syn),
                synack_ns: Some(synack),
                orig_ttl: 64,
                resp_ttl: 61,
                ..Default::default()
            })),
        }
    }

    fn mark(ts_ns: i64) -> v1::Event {
        v1::Event {
            kind: Some(v1::event::Kind::Watermark(v1::Watermark { ts_ns, since_ns: T0, ..Default::default() })),
        }
    }

    /// Two agents; an old connection only `a` saw, and a recent handshake both saw (`b`'s
    /// clock 2 s ahead).
    fn engine() -> (Correlator, usize) {
        let mut c = Correlator::new(Config::default());
        let (a, b) = (c.agent("a", &[]), c.agent("b", &[]));
        c.ingest(a, &open(1, 40_000, T0, T0 + 10_000_000));
        let t = T0 + 1_000 * S;
        c.ingest(a, &open(2, 40_001, t, t + 10_000_000));
        c.ingest(b, &open(3, 40_001, t + 2 * S + 4_000_000, t + 2 * S + 6_000_000));
        c.ingest(a, &mark(t + S));
        c.ingest(b, &mark(t + 3 * S));
        (c, b)
    }

    #[test]
    fn compaction_counts_no_handshake_twice() {
        let (mut c, b) = engine();
        let before = c.clock_estimates()[b].expect("an estimate of b's clock");
        assert_eq!(before.samples, 1);
        assert_eq!(c.compact(600 * S), 1, "the old connection goes");
        assert_eq!(c.records().0, 2);
        assert_eq!(c.connection_count(), 1, "the shared handshake is still one group");
        let after = c.clock_estimates()[b].expect("an estimate of b's clock");
        assert_eq!(after, before, "the handshake's sample is not added again");
        // A later handshake is still sampled.
        let t = T0 + 1_100 * S;
        c.ingest(0, &open(4, 40_002, t, t + 10_000_000));
        c.ingest(b, &open(5, 40_002, t + 2 * S + 4_000_000, t + 2 * S + 6_000_000));
        assert_eq!(c.clock_estimates()[b].map(|e| e.samples), Some(2));
    }

    #[test]
    fn compaction_with_nothing_old_enough_changes_nothing() {
        let (mut c, b) = engine();
        let before = (c.records(), c.connection_count(), c.clock_estimates()[b]);
        assert_eq!(c.compact(10_000 * S), 0);
        assert_eq!((c.records(), c.connection_count(), c.clock_estimates()[b]), before);
    }
}
