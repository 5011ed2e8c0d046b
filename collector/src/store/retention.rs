//! Forgetting: by age (a key range below `now - retention`) and by size (the oldest records,
//! an estimated number at a time), over the four record trees and the correlator's reports.
//!
//! Removal happens in chunks so that ingest is not blocked for long. Each chunk removes, per
//! record tree, the records together with the tallies that count them (one atomic batch). The
//! connection index is not touched per record: once every record of an hour is gone, the
//! index's runs of that hour are dropped whole; until then readers skip entries whose record is
//! gone.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::Ordering;

use super::keys::{
    conn_bucket, tally_key, ts_bytes, StoreSeq, Tally, FIRST_RECORD_KEY, KIND_FLOW, KIND_LOSS, KIND_RESET,
    TALLY_TOTAL_KEY,
};
use super::{replay, Store, StoreError, KINDS, TREE_NAMES};

/// Records removed per chunk.
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
    /// Connection openings removed.
    pub opens_removed: u64,
    /// Capture-loss reports removed.
    pub losses_removed: u64,
    /// Merged reports removed.
    pub reports_removed: u64,
    /// Of the records (not reports), removed for being older than the retention.
    pub removed_by_age: u64,
    /// Of the records (not reports), removed because the store was over its size.
    pub removed_by_size: u64,
    /// Bytes on disk before the run.
    pub bytes_before: u64,
    /// Bytes on disk after the run (sled reclaims space lazily; this may lag).
    pub bytes_after: u64,
}

impl RetentionReport {
    fn count(&mut self, kind: u8, n: u64) {
        match kind {
            KIND_RESET => self.resets_removed += n,
            KIND_FLOW => self.flows_removed += n,
            KIND_LOSS => self.losses_removed += n,
            _ => self.opens_removed += n,
        }
    }
}

/// One record chosen for removal.
struct Victim {
    kind: u8,
    key: sled::IVec,
    seq: Option<StoreSeq>,
    /// For losses: (capture + interface drops, events dropped).
    drops: (u64, u64),
}

impl Store {
    /// Time of the newest stored record (event time), if any.
    fn newest_event_ns(&self) -> Result<Option<i64>, StoreError> {
        let mut newest: Option<i64> = None;
        for kind in KINDS {
            if let Some(ts) = self.tree(kind).newest_ns()? {
                newest = Some(newest.map_or(ts, |n| n.max(ts)));
            }
        }
        Ok(newest)
    }

    /// Removes records and reports older than the retention (counted back from the newest
    /// stored record, or `now_ns` if that is earlier), then, if the database is larger than
    /// `max_bytes`, the oldest records (and the reports older than them) until the estimated
    /// size fits. Meant to run every minute or so; an interrupted run is resumed by the next.
    ///
    /// sled frees disk space lazily, so the size pass works from an estimated record cap
    /// (see `size_pass`) rather than looping on `size_on_disk`, which would delete everything.
    pub fn enforce_retention(&self, now_ns: i64) -> Result<RetentionReport, StoreError> {
        self.guarded(|| self.enforce_retention_unguarded(now_ns))
    }

    fn enforce_retention_unguarded(&self, now_ns: i64) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport { bytes_before: self.inner.db.size_on_disk()?, ..Default::default() };
        let retention_ns = i64::try_from(self.inner.config.retention.as_nanos()).unwrap_or(i64::MAX);
        // Age is measured back from the newest stored event, capped by `now`: captures replayed
        // days after they were taken are kept for the full retention (they are what the admin
        // is looking at), while a bogus future timestamp cannot push everything out.
        let newest = self.newest_event_ns()?.map_or(now_ns, |newest| newest.min(now_ns));
        let cutoff_ns = newest.saturating_sub(retention_ns);
        let cutoff = ts_bytes(cutoff_ns);
        for kind in KINDS {
            loop {
                let (removed, _) = self.remove_chunk(CHUNK, Some(&cutoff), &[kind], &mut report)?;
                report.removed_by_age += removed;
                if removed < CHUNK as u64 {
                    break;
                }
            }
        }
        report.reports_removed += self.remove_reports_before(cutoff_ns)?;
        // Every record before the cutoff is gone, so are the hours of the index before its hour.
        self.inner.conn.drop_hours_before(conn_bucket(cutoff_ns))?;

        let bytes = self.inner.db.size_on_disk()?;
        let records: u64 = self.inner.totals.iter().map(|t| t.load(Ordering::Relaxed)).sum();
        let cap = self.inner.meta.get(META_SIZE_CAP)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
        let pass = size_pass(bytes, self.inner.config.max_bytes, records, cap.map(u64::from_be_bytes));
        match pass.cap {
            Some(cap) => self.inner.meta.insert(META_SIZE_CAP, &cap.to_be_bytes())?,
            None => self.inner.meta.remove(META_SIZE_CAP)?,
        };
        let mut to_remove = pass.remove;
        if to_remove > 0 {
            tracing::info!(bytes, to_remove, "Store is over its size limit; removing the oldest records.");
        }
        let mut newest_removed: Option<i64> = None;
        while to_remove > 0 {
            let chunk = usize::try_from(to_remove).unwrap_or(CHUNK).min(CHUNK);
            let (removed, newest) = self.remove_chunk(chunk, None, &KINDS, &mut report)?;
            report.removed_by_size += removed;
            newest_removed = newest_removed.max(newest);
            if removed == 0 {
                break;
            }
            to_remove = to_remove.saturating_sub(removed);
        }
        if let Some(newest) = newest_removed {
            // Reports are derived from records: none may outlive the records they merge.
            report.reports_removed += self.remove_reports_before(newest.saturating_add(1))?;
            self.inner.conn.drop_hours_before(conn_bucket(newest))?;
        }
        report.bytes_after = self.inner.db.size_on_disk()?;
        let records_removed =
            report.resets_removed + report.flows_removed + report.opens_removed + report.losses_removed;
        if records_removed + report.reports_removed > 0 {
            tracing::info!(
                resets = report.resets_removed,
                flows = report.flows_removed,
                opens = report.opens_removed,
                losses = report.losses_removed,
                reports = report.reports_removed,
                by_age = report.removed_by_age,
                by_size = report.removed_by_size,
                "Retention removed old records."
            );
        }
        Ok(report)
    }

    /// Removes up to `max` of the oldest records of the trees of `kinds` (merged by key) below
    /// `end`. Returns how many, and the newest event time among them.
    fn remove_chunk(
        &self,
        max: usize,
        end: Option<&[u8]>,
        kinds: &[u8],
        report: &mut RetentionReport,
    ) -> Result<(u64, Option<i64>), StoreError> {
        let mut writer = self.writer();
        let mut iters: Vec<(u8, std::iter::Peekable<super::records::RecordIter>)> = kinds
            .iter()
            .map(|&kind| {
                let end = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec()));
                let start = Bound::Included(FIRST_RECORD_KEY.to_vec());
                (kind, self.tree(kind).range((start, end)).peekable())
            })
            .collect();
        let mut victims = Vec::with_capacity(max.min(CHUNK));
        while victims.len() < max {
            // Take from whichever tree has the oldest next key.
            let mut best: Option<(usize, sled::IVec)> = None;
            for (i, (_, it)) in iters.iter_mut().enumerate() {
                let key = match it.peek() {
                    Some(Ok((k, _))) => k.clone(),
                    Some(Err(_)) => sled::IVec::default(),
                    None => continue,
                };
                if best.as_ref().is_none_or(|(_, b)| key < *b) {
                    best = Some((i, key));
                }
            }
            let Some((i, _)) = best else { break };
            let kind = iters[i].0;
            let Some(item) = iters[i].1.next() else { break };
            let (key, value) = item?;
            let seq = StoreSeq::from_bytes(&key);
            if seq.is_none() {
                // Not ours; remove it anyway, it can be in no index.
                self.corrupt(TREE_NAMES[usize::from(kind)], &key, "malformed key");
            }
            let drops = match (kind, replay::decode_loss(&value)) {
                (KIND_LOSS, Some(loss)) => {
                    (loss.capture_dropped.saturating_add(loss.interface_dropped), loss.events_dropped)
                }
                _ => (0, 0),
            };
            victims.push(Victim { kind, key, seq, drops });
        }
        drop(iters);
        if victims.is_empty() {
            return Ok((0, None));
        }

        // Per tree, the records with their tallies. Their index entries stay until the runs of
        // their hour are dropped (readers skip an entry whose record is gone).
        let mut newest: Option<i64> = None;
        for &kind in kinds {
            let k = usize::from(kind);
            let mut keys = Vec::new();
            let mut per_agent: HashMap<u32, Tally> = HashMap::new();
            let mut n = 0u64;
            for v in victims.iter().filter(|v| v.kind == kind) {
                keys.push(v.key.clone());
                n += 1;
                let Some(seq) = v.seq else { continue };
                newest = newest.max(Some(seq.ts_ns));
                let tally = per_agent
                    .entry(seq.agent_id)
                    .or_insert_with(|| writer.tallies.get(&(kind, seq.agent_id)).copied().unwrap_or(Tally::EMPTY));
                tally.records = tally.records.saturating_sub(1);
                tally.capture_dropped = tally.capture_dropped.saturating_sub(v.drops.0);
                tally.events_dropped = tally.events_dropped.saturating_sub(v.drops.1);
            }
            if n == 0 {
                continue;
            }
            let total = self.inner.totals[k].load(Ordering::Relaxed).saturating_sub(n);
            let total_bytes = total.to_be_bytes();
            let tallies: Vec<([u8; 6], [u8; 32])> =
                per_agent.iter().map(|(id, tally)| (tally_key(*id), tally.to_bytes())).collect();
            let mut reserved: Vec<(&[u8], &[u8])> = vec![(&TALLY_TOTAL_KEY[..], &total_bytes[..])];
            reserved.extend(tallies.iter().map(|(k, v)| (&k[..], &v[..])));
            self.tree(kind).remove(&keys, &reserved)?;
            self.inner.totals[k].store(total, Ordering::Relaxed);
            for (id, tally) in per_agent {
                writer.tallies.insert((kind, id), tally);
            }
            report.count(kind, n);
        }
        self.inner.durability.bump();
        Ok((victims.len() as u64, newest))
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
