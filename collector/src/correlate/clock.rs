//! Clock offsets between agents, from handshakes seen at two vantage points.
//!
//! Agents' clocks are not synchronised: seconds apart is normal for a laptop capture next to a
//! server's. The one packet exchange both ends see with known order is the handshake: the agent
//! nearer the client sees the SYN at `t1` and the SYN-ACK at `t4`, the agent nearer the server
//! sees them at `t2` and `t3`. As in NTP, `offset = ((t2 - t1) + (t3 - t4)) / 2` (how far the
//! second clock is ahead) and `round trip = (t4 - t1) - (t3 - t2)`. The estimate is exact when
//! the path is symmetric; its error is at most half the round trip, so samples with the lowest
//! round trip are kept (queueing only ever adds delay). Over long captures clocks drift, so
//! when the kept samples span enough time a line is fitted through them.
//!
//! Pairwise estimates are chained into one offset per agent against a reference agent (the
//! first one given, or the first by name) through a breadth-first walk of the pairs that have
//! samples; uncertainties add along the chain.

use std::collections::{BTreeMap, VecDeque};

/// One handshake seen by two agents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Midpoint of the handshake on the first agent's clock, ns.
    pub at_ns: i64,
    /// Second agent's clock minus the first's, ns.
    pub offset_ns: i64,
    /// Round trip between the two vantage points (never negative), ns.
    pub round_trip_ns: i64,
}

impl Sample {
    /// The sample of one handshake: `near` saw SYN at `t1` and SYN-ACK at `t4` (agent `a`'s
    /// clock), `far` saw them at `t2` and `t3` (agent `b`'s clock).
    pub fn from_handshake(t1: i64, t4: i64, t2: i64, t3: i64) -> Sample {
        let offset_ns = ((t2 - t1) + (t3 - t4)) / 2;
        let round_trip_ns = ((t4 - t1) - (t3 - t2)).abs();
        Sample { at_ns: t1 + (t4 - t1) / 2, offset_ns, round_trip_ns }
    }
}

/// The estimated offset of one agent's clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockEstimate {
    /// Agent clock minus reference clock at `at_ns` (reference clock), ns.
    pub offset_ns: i64,
    /// How far off the estimate may be, ns.
    pub uncertainty_ns: i64,
    /// Change of the offset, parts per million.
    pub drift_ppm: f64,
    /// Reference time the offset holds at, ns.
    pub at_ns: i64,
    /// Handshake samples behind the estimate (summed along a chain).
    pub samples: u32,
}

impl ClockEstimate {
    /// The reference agent's own estimate.
    pub const REFERENCE: ClockEstimate =
        ClockEstimate { offset_ns: 0, uncertainty_ns: 0, drift_ppm: 0.0, at_ns: 0, samples: 0 };

    /// The offset at reference time `t_ns`, drift included.
    pub fn offset_at(&self, t_ns: i64) -> i64 {
        let dt = (t_ns - self.at_ns) as f64;
        self.offset_ns + (dt * self.drift_ppm / 1e6) as i64
    }
}

/// Samples kept per agent pair: the lowest round trips of each time bucket.
const BUCKET_NS: i64 = 10_000_000_000;
/// At most this many buckets per pair (older ones are dropped first).
const MAX_BUCKETS: usize = 720;
/// Samples kept per bucket.
const PER_BUCKET: usize = 4;
/// A line is fitted only when the samples span at least this long.
const MIN_FIT_SPAN_NS: i64 = 120_000_000_000;

/// Handshake samples of every agent pair, and the offsets they give.
#[derive(Clone, Debug, Default)]
pub struct ClockBook {
    /// Keyed by (lower agent index, higher agent index); offsets are higher minus lower.
    pairs: BTreeMap<(usize, usize), Pair>,
}

#[derive(Clone, Debug, Default)]
struct Pair {
    /// bucket index → lowest-round-trip samples.
    buckets: BTreeMap<i64, Vec<Sample>>,
    count: u32,
}

impl Pair {
    fn add(&mut self, sample: Sample) {
        self.count = self.count.saturating_add(1);
        let bucket = self.buckets.entry(sample.at_ns.div_euclid(BUCKET_NS)).or_default();
        bucket.push(sample);
        bucket.sort_by_key(|s| s.round_trip_ns);
        bucket.truncate(PER_BUCKET);
        while self.buckets.len() > MAX_BUCKETS {
            self.buckets.pop_first();
        }
    }

    /// Offset of the higher agent minus the lower one, with its uncertainty.
    fn estimate(&self) -> Option<ClockEstimate> {
        let all: Vec<Sample> = self.buckets.values().flatten().copied().collect();
        let best = all.iter().map(|s| s.round_trip_ns).min()?;
        // Keep the samples whose round trip is close to the best: their error bound is small.
        let slack = (best / 2).max(1_000_000);
        let kept: Vec<Sample> = all.into_iter().filter(|s| s.round_trip_ns <= best + slack).collect();
        let first = kept.iter().map(|s| s.at_ns).min()?;
        let last = kept.iter().map(|s| s.at_ns).max()?;
        let n = kept.len() as f64;
        let mean_t = kept.iter().map(|s| (s.at_ns - first) as f64).sum::<f64>() / n;
        let mean_o = kept.iter().map(|s| s.offset_ns as f64).sum::<f64>() / n;
        let slope = if last - first >= MIN_FIT_SPAN_NS && kept.len() >= 3 {
            let num: f64 =
                kept.iter().map(|s| ((s.at_ns - first) as f64 - mean_t) * (s.offset_ns as f64 - mean_o)).sum();
            let den: f64 = kept.iter().map(|s| ((s.at_ns - first) as f64 - mean_t).powi(2)).sum();
            if den > 0.0 {
                num / den
            } else {
                0.0
            }
        } else {
            0.0
        };
        let at_ns = first + mean_t as i64;
        let residual = (kept
            .iter()
            .map(|s| {
                let fit = mean_o + slope * ((s.at_ns - first) as f64 - mean_t);
                (s.offset_ns as f64 - fit).powi(2)
            })
            .sum::<f64>()
            / n)
            .sqrt();
        Some(ClockEstimate {
            offset_ns: mean_o.round() as i64,
            uncertainty_ns: best / 2 + residual.round() as i64,
            drift_ppm: slope * 1e6,
            at_ns,
            samples: self.count,
        })
    }
}

impl ClockBook {
    /// Records that agent `b`'s clock read `sample.offset_ns` more than agent `a`'s.
    pub fn add(&mut self, a: usize, b: usize, sample: Sample) {
        if a == b {
            return;
        }
        let (key, sample) = if a < b {
            ((a, b), sample)
        } else {
            ((b, a), Sample { at_ns: sample.at_ns + sample.offset_ns, offset_ns: -sample.offset_ns, ..sample })
        };
        self.pairs.entry(key).or_default().add(sample);
    }

    /// Whether any sample links these two agents.
    pub fn linked(&self, a: usize, b: usize) -> bool {
        self.pairs.contains_key(&(a.min(b), a.max(b)))
    }

    /// One estimate per agent (`None` where no chain of samples reaches the reference),
    /// against `reference`, for `agents` agents.
    pub fn solve(&self, agents: usize, reference: usize) -> Vec<Option<ClockEstimate>> {
        let mut out: Vec<Option<ClockEstimate>> = vec![None; agents];
        if reference >= agents {
            return out;
        }
        let estimates: Vec<((usize, usize), ClockEstimate)> =
            self.pairs.iter().filter_map(|(k, p)| p.estimate().map(|e| (*k, e))).collect();
        out[reference] = Some(ClockEstimate::REFERENCE);
        let mut queue = VecDeque::from([reference]);
        while let Some(from) = queue.pop_front() {
            let Some(base) = out[from] else { continue };
            for &((lo, hi), e) in &estimates {
                // Offset of `to` minus `from`.
                let (to, step) = if lo == from {
                    (hi, e.offset_ns)
                } else if hi == from {
                    (lo, -e.offset_ns)
                } else {
                    continue;
                };
                if to >= agents || out[to].is_some() {
                    continue;
                }
                let drift = if lo == from { e.drift_ppm } else { -e.drift_ppm };
                out[to] = Some(ClockEstimate {
                    offset_ns: base.offset_ns + step,
                    uncertainty_ns: base.uncertainty_ns + e.uncertainty_ns,
                    drift_ppm: base.drift_ppm + drift,
                    at_ns: e.at_ns,
                    samples: base.samples + e.samples,
                });
                queue.push_back(to);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000_000;
    const S: i64 = 1_000_000_000;

    /// A handshake at reference time `t` across a path of one-way delay `d_syn` (SYN) and
    /// `d_synack` (SYN-ACK), the far clock `offset` ahead, the server answering after `think`.
    fn handshake(t: i64, offset: i64, d_syn: i64, d_synack: i64, think: i64) -> Sample {
        let t1 = t;
        let t2 = t + d_syn + offset;
        let t3 = t2 + think;
        let t4 = t3 - offset + d_synack;
        Sample::from_handshake(t1, t4, t2, t3)
    }

    #[test]
    fn a_symmetric_handshake_gives_the_exact_offset() {
        let s = handshake(100 * S, -4_200 * MS, 5 * MS, 5 * MS, MS);
        assert_eq!(s.offset_ns, -4_200 * MS);
        assert_eq!(s.round_trip_ns, 10 * MS);
    }

    #[test]
    fn queueing_on_one_leg_is_outvoted_by_low_delay_samples() {
        let mut book = ClockBook::default();
        for i in 0..20 {
            // Every fourth handshake had 80 ms of queueing on the SYN-ACK leg.
            let extra = if i % 4 == 0 { 80 * MS } else { 0 };
            book.add(0, 1, handshake(i * S, 3_100 * MS, 5 * MS, 5 * MS + extra, MS));
        }
        let est = book.solve(2, 0)[1].unwrap();
        assert!((est.offset_ns - 3_100 * MS).abs() < MS, "{est:?}");
        assert!(est.uncertainty_ns <= 6 * MS, "{est:?}");
        assert_eq!(est.samples, 20);
    }

    #[test]
    fn drift_is_fitted_over_long_spans() {
        let mut book = ClockBook::default();
        // 50 ppm: the far clock gains 50 µs per second.
        for i in 0..60 {
            let t = i * 10 * S;
            book.add(0, 1, handshake(t, 2 * S + t / 20_000, 2 * MS, 2 * MS, 0));
        }
        let est = book.solve(2, 0)[1].unwrap();
        assert!((est.drift_ppm - 50.0).abs() < 1.0, "{est:?}");
        let at_end = est.offset_at(590 * S);
        assert!((at_end - (2 * S + 590 * S / 20_000)).abs() < MS, "{est:?} {at_end}");
    }

    #[test]
    fn offsets_chain_through_a_middle_agent_and_sign_follows_the_order() {
        let mut book = ClockBook::default();
        // Agent 2 is 1 s ahead of agent 1; agent 1 is 5 s behind agent 0. Added in both orders.
        book.add(0, 1, handshake(10 * S, -5 * S, MS, MS, 0));
        book.add(2, 1, handshake(20 * S, -S, MS, MS, 0));
        let all = book.solve(3, 0);
        assert_eq!(all[0].unwrap().offset_ns, 0);
        assert_eq!(all[1].unwrap().offset_ns, -5 * S);
        assert_eq!(all[2].unwrap().offset_ns, -4 * S);
        assert!(book.linked(1, 2) && !book.linked(0, 2));
        // Not reachable: no estimate.
        assert_eq!(ClockBook::default().solve(2, 0)[1], None);
    }
}
