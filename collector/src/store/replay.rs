//! Reading records back in time order across kinds: the correlator's replay after a restart
//! ([`Store::events_since`]) and the time-range listings of connection openings and capture
//! losses.
//!
//! Every record tree is keyed by time first, so the replay is a merge of four range scans
//! (resets by `ts_ns`, flows by `end_ns`, openings by `start_ns`, losses by `until_ns`): no
//! sort, no memory beyond one pending record per tree.

use std::iter::Peekable;

use prost::Message;
use rstscope_proto::v1;

use super::keys::{decode_plain, ts_bytes, StoreSeq, ValueHeader, FIRST_RECORD_KEY, KIND_FLOW, KIND_LOSS, KIND_OPEN};
use super::{Store, StoreError, KINDS, TREE_NAMES};

/// The capture loss in a `losses` value, if it decodes.
pub(super) fn decode_loss(value: &[u8]) -> Option<v1::CaptureLoss> {
    v1::CaptureLoss::decode(decode_plain(value)?).ok()
}

/// Iterator of [`Store::events_since`]: `(agent name, event)` in key order (time, then agent,
/// then identity; ties between kinds go flows, resets, openings, losses).
pub struct EventsSince {
    store: Store,
    iters: Vec<(u8, Peekable<super::records::RecordIter>)>,
}

impl Iterator for EventsSince {
    type Item = Result<(String, v1::Event), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let i = next_in_merge(&mut self.iters, false)?;
            let kind = self.iters[i].0;
            let (key, value) = match self.iters[i].1.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(StoreError::from_sled(e))),
            };
            if let Some(decoded) = self.store.decode_record(kind, &key, &value) {
                return Some(Ok(decoded));
            }
        }
    }
}

/// Which of the record trees' iterators (of one direction) holds the next record of their
/// merge: the smallest next key, or the largest when `newest_first`; one whose next item is an
/// error at once, so errors are reported without delay. `None` when every one is done.
fn next_in_merge(iters: &mut [(u8, Peekable<super::records::RecordIter>)], newest_first: bool) -> Option<usize> {
    let mut best: Option<(usize, sled::IVec)> = None;
    for (i, (_, it)) in iters.iter_mut().enumerate() {
        match it.peek() {
            Some(Ok((k, _))) if best.as_ref().is_none_or(|(_, b)| if newest_first { k > b } else { k < b }) => {
                best = Some((i, k.clone()));
            }
            Some(Ok(_)) | None => {}
            Some(Err(_)) => return Some(i),
        }
    }
    best.map(|(i, _)| i)
}

impl Store {
    /// Every stored reset, flow summary, connection opening and capture loss whose key time
    /// (reset `ts_ns`, flow `end_ns`, opening `start_ns`, loss `until_ns`) is at or after
    /// `since_ns`, with its agent's name, in time order. For the correlator to rebuild its
    /// memory after a restart: start early enough to cover the openings of connections still
    /// being decided. Reads lazily; undecodable records are counted and skipped.
    pub fn events_since(&self, since_ns: i64) -> EventsSince {
        let start = ts_bytes(since_ns).max(FIRST_RECORD_KEY);
        let iters = KINDS.iter().map(|&kind| (kind, self.tree(kind).range(start.to_vec()..).peekable())).collect();
        EventsSince { store: self.clone(), iters }
    }

    /// The key time (as [`Store::events_since`] reads it) of the `n`th newest stored event,
    /// resets, flows, openings and losses together, and whether older ones are stored too; the
    /// oldest's time when fewer are stored; `None` when none is. Reads `n` keys at most.
    pub fn newest_events_from(&self, n: usize) -> Result<Option<(i64, bool)>, StoreError> {
        let mut iters: Vec<_> = KINDS.iter().map(|&kind| (kind, self.tree(kind).range_rev(..).peekable())).collect();
        let mut oldest_taken = None;
        for _ in 0..n {
            let Some(i) = next_in_merge(&mut iters, true) else { return Ok(oldest_taken.map(|ts| (ts, false))) };
            if let Some(item) = iters[i].1.next() {
                let (key, _) = item.map_err(StoreError::from_sled)?;
                oldest_taken = Some(super::records::ts_of(&key));
            }
        }
        let older = next_in_merge(&mut iters, true).is_some();
        Ok(oldest_taken.map(|ts| (ts, older)))
    }

    /// Stored connection openings with `since_ns <= start_ns < until_ns`, in time order.
    pub fn opens(&self, since_ns: i64, until_ns: i64) -> Result<Vec<(String, v1::ConnectionOpen)>, StoreError> {
        self.between(KIND_OPEN, since_ns, until_ns, |event| match event.kind {
            Some(v1::event::Kind::Open(open)) => Some(open),
            _ => None,
        })
    }

    /// Stored capture losses with `since_ns <= until_ns (of the loss) < until_ns`, in time order.
    pub fn losses(&self, since_ns: i64, until_ns: i64) -> Result<Vec<(String, v1::CaptureLoss)>, StoreError> {
        self.between(KIND_LOSS, since_ns, until_ns, |event| match event.kind {
            Some(v1::event::Kind::Loss(loss)) => Some(loss),
            _ => None,
        })
    }

    fn between<T>(
        &self,
        kind: u8,
        since_ns: i64,
        until_ns: i64,
        pick: impl Fn(v1::Event) -> Option<T>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let start = ts_bytes(since_ns).max(FIRST_RECORD_KEY);
        let end = ts_bytes(until_ns);
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        for item in self.tree(kind).range(start.to_vec()..end.to_vec()) {
            let (key, value) = item?;
            if let Some((agent, event)) = self.decode_record(kind, &key, &value) {
                out.extend(pick(event).map(|x| (agent, x)));
            }
        }
        Ok(out)
    }

    /// One stored record as the event the agent sent, with the agent's name; `None` (counted as
    /// corrupt) if it does not decode.
    fn decode_record(&self, kind: u8, key: &[u8], value: &[u8]) -> Option<(String, v1::Event)> {
        use v1::event::Kind;
        let tree = TREE_NAMES[usize::from(kind)];
        let Some(seq) = StoreSeq::from_bytes(key) else {
            self.corrupt(tree, key, "malformed key");
            return None;
        };
        let event = if kind == KIND_LOSS {
            decode_loss(value).map(Kind::Loss)
        } else {
            ValueHeader::decode(value).and_then(|(_, body)| match kind {
                KIND_FLOW => v1::FlowSummary::decode(body).ok().map(Kind::Flow),
                KIND_OPEN => v1::ConnectionOpen::decode(body).ok().map(Kind::Open),
                _ => v1::RstEvent::decode(body).ok().map(Kind::Reset),
            })
        };
        let Some(kind) = event else {
            self.corrupt(tree, key, "undecodable record");
            return None;
        };
        Some((self.names().name(seq.agent_id), v1::Event { kind: Some(kind) }))
    }
}
