//! Forgetting: by age (a key range below `now - retention`) and by size (the oldest records,
//! an estimated number at a time). Removal happens in chunks, each one transaction that deletes
//! the records, their connection index entries and adjusts the counters, so the index never
//! points at more than it should and ingest is not blocked for long.

use std::collections::HashMap;
use std::ops::Bound;

use sled::Transactional;

use super::keys::{conn_key, ts_bytes, StoreSeq, ValueHeader, KIND_FLOW, KIND_RESET};
use super::{add_counter, decode_record, encode_record, Store, StoreError, META_FLOWS, META_RESETS};

/// Records removed per transaction (about 70 ms of holding the writer lock on a 10M store).
const CHUNK: usize = 1_000;
/// Meta key: the record count the size pass settled on while the disk is over its limit.
const META_SIZE_CAP: &[u8] = b"size_cap_records";

/// What the size pass should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SizePass {
    /// Records to remove now.
    remove: u64,
    /// Record cap to remember (None: under the limit, forget it).
    cap: Option<u64>,
}

/// Decides the size pass. sled frees disk space lazily (it reuses segments rather than shrink
/// the files), so `bytes` does not fall right after a removal; deciding from it alone would
/// remove another slice every run until nothing is left. So the first pass over the limit
/// estimates how many records fit (records x max / bytes, minus 10 %) and remembers that as a
/// cap; while the disk stays over the limit later passes only trim back to the cap, and once it
/// is under the limit again the cap is forgotten.
fn size_pass(bytes: u64, max: u64, records: u64, cap: Option<u64>) -> SizePass {
    if bytes <= max {
        return SizePass { remove: 0, cap: None };
    }
    let cap = cap.unwrap_or_else(|| {
        let fits = u128::from(records) * u128::from(max) / u128::from(bytes.max(1));
        u64::try_from(fits * 9 / 10).unwrap_or(u64::MAX)
    });
    SizePass { remove: records.saturating_sub(cap), cap: Some(cap) }
}

/// What one [`Store::enforce_retention`] run removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Resets removed.
    pub resets_removed: u64,
    /// Flow summaries removed.
    pub flows_removed: u64,
    /// Of those, removed for being older than the retention.
    pub removed_by_age: u64,
    /// Of those, removed because the store was over its size.
    pub removed_by_size: u64,
    /// Bytes on disk before the run.
    pub bytes_before: u64,
    /// Bytes on disk after the run (sled reclaims space lazily; this may lag).
    pub bytes_after: u64,
}

/// One record chosen for removal.
struct Victim {
    kind: u8,
    key: sled::IVec,
    seq: StoreSeq,
    flow_key: Option<rstscope_proto::FlowKey>,
}

impl Store {
    /// Time of the newest stored reset or flow (event time), if any.
    fn newest_event_ns(&self) -> Result<Option<i64>, StoreError> {
        let mut newest: Option<i64> = None;
        for tree in [&self.inner.resets, &self.inner.flows] {
            if let Some((key, _)) = tree.last()? {
                if let Some(head) = key.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                    let ts = super::keys::ts_from_bytes(head);
                    newest = Some(newest.map_or(ts, |n| n.max(ts)));
                }
            }
        }
        Ok(newest)
    }

    /// Removes resets and flows older than the retention (counted back from the newest stored
    /// event, or `now_ns` if that is earlier), then, if the database is larger
    /// than `max_bytes`, the oldest records until the estimated size fits. Meant to run every
    /// minute or so; each chunk is its own transaction, so an interrupted run is simply resumed
    /// by the next one.
    ///
    /// sled frees disk space lazily, so the size pass works from an estimated record cap
    /// (see `size_pass`) rather than looping on `size_on_disk`, which would delete everything.
    pub fn enforce_retention(&self, now_ns: i64) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport { bytes_before: self.inner.db.size_on_disk()?, ..Default::default() };
        let retention_ns = i64::try_from(self.inner.config.retention.as_nanos()).unwrap_or(i64::MAX);
        // Age is measured back from the newest stored event, capped by `now`: captures replayed
        // days after they were taken are kept for the full retention (they are what the admin
        // is looking at), while a bogus future timestamp cannot push everything out.
        let newest = self.newest_event_ns()?.map_or(now_ns, |newest| newest.min(now_ns));
        let cutoff = ts_bytes(newest.saturating_sub(retention_ns));
        for kind in [KIND_RESET, KIND_FLOW] {
            loop {
                let removed =
                    self.remove_chunk(CHUNK, Some(&cutoff), kind == KIND_RESET, kind == KIND_FLOW, &mut report)?;
                report.removed_by_age += removed;
                if removed < CHUNK as u64 {
                    break;
                }
            }
        }

        let bytes = self.inner.db.size_on_disk()?;
        let status = self.status()?;
        let cap = self.inner.meta.get(META_SIZE_CAP)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
        let pass =
            size_pass(bytes, self.inner.config.max_bytes, status.resets + status.flows, cap.map(u64::from_be_bytes));
        match pass.cap {
            Some(cap) => self.inner.meta.insert(META_SIZE_CAP, &cap.to_be_bytes())?,
            None => self.inner.meta.remove(META_SIZE_CAP)?,
        };
        let mut to_remove = pass.remove;
        if to_remove > 0 {
            tracing::info!(bytes, to_remove, "Store is over its size limit; removing the oldest records.");
        }
        while to_remove > 0 {
            let chunk = usize::try_from(to_remove).unwrap_or(CHUNK).min(CHUNK);
            let removed = self.remove_chunk(chunk, None, true, true, &mut report)?;
            report.removed_by_size += removed;
            if removed == 0 {
                break;
            }
            to_remove = to_remove.saturating_sub(removed);
        }
        report.bytes_after = self.inner.db.size_on_disk()?;
        if report.resets_removed + report.flows_removed > 0 {
            tracing::info!(
                resets = report.resets_removed,
                flows = report.flows_removed,
                by_age = report.removed_by_age,
                by_size = report.removed_by_size,
                "Retention removed old records."
            );
        }
        Ok(report)
    }

    /// Removes up to `max` of the oldest records (of resets, flows or both merged by key)
    /// below `end`, in one transaction. Returns how many.
    fn remove_chunk(
        &self,
        max: usize,
        end: Option<&[u8]>,
        resets: bool,
        flows: bool,
        report: &mut RetentionReport,
    ) -> Result<u64, StoreError> {
        let _writer = self.writer();
        let i = &self.inner;
        let range = |tree: &sled::Tree, on: bool| {
            let end = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec()));
            on.then(|| tree.range::<Vec<u8>, _>((Bound::Unbounded, end)).peekable())
        };
        let (mut r, mut f) = (range(&i.resets, resets), range(&i.flows, flows));
        let mut victims = Vec::with_capacity(max.min(CHUNK));
        while victims.len() < max {
            // Take from whichever tree has the older next key.
            let peek_key = |it: &mut Option<std::iter::Peekable<sled::Iter>>| match it.as_mut().and_then(|it| it.peek())
            {
                Some(Ok((k, _))) => Some(k.clone()),
                Some(Err(_)) => Some(sled::IVec::default()),
                None => None,
            };
            let (rk, fk) = (peek_key(&mut r), peek_key(&mut f));
            let (kind, it) = match (rk, fk) {
                (None, None) => break,
                (Some(_), None) => (KIND_RESET, &mut r),
                (None, Some(_)) => (KIND_FLOW, &mut f),
                (Some(a), Some(b)) if a <= b => (KIND_RESET, &mut r),
                _ => (KIND_FLOW, &mut f),
            };
            let Some(Some(item)) = it.as_mut().map(Iterator::next) else { break };
            let (key, value) = item?;
            let Some(seq) = StoreSeq::from_bytes(&key) else {
                // Not ours; remove it anyway, it can be in no index.
                self.corrupt(if kind == KIND_RESET { "resets" } else { "flows" }, &key, "malformed key");
                victims.push(Victim { kind, key, seq: StoreSeq::default(), flow_key: None });
                continue;
            };
            let flow_key = ValueHeader::decode(&value).map(|(h, _)| h.key);
            victims.push(Victim { kind, key, seq, flow_key });
        }
        if victims.is_empty() {
            return Ok(0);
        }

        let mut reset_batch = sled::Batch::default();
        let mut flow_batch = sled::Batch::default();
        let mut conn_batch = sled::Batch::default();
        let (mut n_resets, mut n_flows) = (0i64, 0i64);
        let mut per_agent: HashMap<u32, u64> = HashMap::new();
        for v in &victims {
            if v.kind == KIND_RESET {
                reset_batch.remove(v.key.clone());
                n_resets += 1;
            } else {
                flow_batch.remove(v.key.clone());
                n_flows += 1;
            }
            if let Some(flow_key) = &v.flow_key {
                conn_batch.remove(&conn_key(flow_key, v.kind, &v.seq)[..]);
            }
            *per_agent.entry(v.seq.agent_id).or_default() += 1;
        }
        let names: Vec<(String, u64)> = {
            let names = self.names();
            per_agent.iter().filter_map(|(id, n)| names.by_id.get(id).map(|name| (name.clone(), *n))).collect()
        };
        (&i.resets, &i.flows, &i.conn, &i.agents, &i.meta)
            .transaction(|(t_resets, t_flows, t_conn, t_agents, t_meta)| {
                t_resets.apply_batch(&reset_batch)?;
                t_flows.apply_batch(&flow_batch)?;
                t_conn.apply_batch(&conn_batch)?;
                add_counter(t_meta, META_RESETS, -n_resets)?;
                add_counter(t_meta, META_FLOWS, -n_flows)?;
                for (name, n) in &names {
                    let Some(bytes) = t_agents.get(name.as_bytes())? else { continue };
                    // A damaged agent record is not worth failing retention for.
                    let Ok(mut record) = decode_record(name, &bytes) else { continue };
                    record.events = record.events.saturating_sub(*n);
                    let bytes =
                        encode_record(&record).map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                    t_agents.insert(name.as_bytes(), bytes)?;
                }
                Ok(())
            })
            .map_err(StoreError::from_transaction)?;
        report.resets_removed += n_resets as u64;
        report.flows_removed += n_flows as u64;
        Ok(victims.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::{size_pass, SizePass};

    #[test]
    fn size_pass_settles_on_a_cap() {
        // (bytes, max, records, remembered cap) -> expected
        let cases = [
            ((100, 200, 1000, None), SizePass { remove: 0, cap: None }),
            ((100, 200, 1000, Some(5)), SizePass { remove: 0, cap: None }),
            ((200, 100, 1000, None), SizePass { remove: 550, cap: Some(450) }),
            // Disk not shrunk yet, nothing new: remove nothing more.
            ((210, 100, 450, Some(450)), SizePass { remove: 0, cap: Some(450) }),
            // New records while still over: trim back to the cap.
            ((210, 100, 500, Some(450)), SizePass { remove: 50, cap: Some(450) }),
            ((u64::MAX, 1, u64::MAX, None), SizePass { remove: u64::MAX, cap: Some(0) }),
            ((5, 0, 0, None), SizePass { remove: 0, cap: Some(0) }),
        ];
        for ((bytes, max, records, cap), expected) in cases {
            assert_eq!(size_pass(bytes, max, records, cap), expected, "{bytes} {max} {records} {cap:?}");
        }
    }
}
