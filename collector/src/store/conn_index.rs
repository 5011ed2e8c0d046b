//! The connection index: which records (flows, resets, openings, from every agent) belong to
//! one connection, so that "everything every vantage point saw of it" is a few seeks.
//!
//! # Why not one sled key per entry
//! One index key per event, with the flow key (random) near the front, was the most expensive
//! write of ingest: sled splits a leaf every 16 entries and each random insert touches a
//! different leaf, so every event paid a page allocation and a node rewrite, and the pages
//! stayed in memory. Here an entry is written once in a batch-sized log value, and later as part
//! of a sorted block of hundreds of entries: a few sled writes per batch instead of one per
//! event, in key order.
//!
//! # Layout (a small log-structured merge of two levels)
//! | tree | key | value |
//! |---|---|---|
//! | `conn_log` | log number (u64) | the entries of one ingested batch, concatenated |
//! | `conn_runs` | hour 4 · run id 8 · the block's first entry without its hour | version · sorted entries without their hour |
//!
//! An entry is [`conn_key`](super::keys::conn_key): hour · flow key · kind · record key. The
//! entries of the log are also held in memory (the *memtable*); when it holds
//! [`StoreConfig::conn_index_memory_entries`](super::StoreConfig) entries it is sorted and
//! written as one *run* per hour (blocks of [`BLOCK_ENTRIES`]), and the log values it came from
//! are removed. A look-up scans the memtable, then seeks once per run of each stored hour.
//!
//! # Crash safety
//! A batch's log value is written before its records, so an entry may name a record that does
//! not exist (readers skip it) but no record lacks its entry. A flush writes the next run id,
//! then the run's blocks, then removes the log values; sled recovers a prefix of its writes, so
//! after a crash either the log values are still there (the memtable is rebuilt from them at
//! open and flushed again into a run with a new id) or the run is complete. An entry can thus be
//! found twice (in a run and in the memtable, or in two runs); look-ups remove duplicates.
//!
//! # Retention
//! Entries are not removed one by one: retention drops whole hours of runs once every record of
//! those hours is gone. Until then an entry may outlive its record; readers skip it.

use std::sync::{Mutex, MutexGuard, PoisonError};

use rstscope_proto::FlowKey;

use super::keys::{CONN_KEY_LEN, RECORD_KEY_LEN};
use super::StoreError;

/// Entries per block of a run (a block is one sled value, about 17 kB).
pub(crate) const BLOCK_ENTRIES: usize = 256;
/// Entries per log value (about 60 kB).
const LOG_ENTRIES: usize = 900;
/// An entry without its hour (as stored in blocks).
const ENTRY_LEN: usize = CONN_KEY_LEN - 4;
/// Flow key bytes.
const FLOW_LEN: usize = 36;
/// Version byte in front of every block.
const BLOCK_VERSION: u8 = 1;
/// Meta key: the next free log number (run ids are log numbers).
const META_NEXT: &[u8] = b"conn_next_log";

/// One entry as found by a look-up: the record's kind and key.
pub(crate) type Found = (u8, [u8; RECORD_KEY_LEN]);

/// The index's trees and memtable. Writers call [`ConnIndex::append`] under the store's writer
/// lock; readers may look up concurrently.
pub(crate) struct ConnIndex {
    log: sled::Tree,
    runs: sled::Tree,
    meta: sled::Tree,
    memory: Mutex<Memtable>,
    /// Entries the memtable holds before it is flushed into runs.
    memory_entries: usize,
    /// Entries per block (a parameter only so that tests can make blocks small).
    block_entries: usize,
}

/// Index entries not yet in a run, and which log values hold them.
struct Memtable {
    entries: Vec<[u8; CONN_KEY_LEN]>,
    /// Log numbers of the values the entries came from (in order).
    logs: Vec<u64>,
    /// The next free log number.
    next_log: u64,
}

impl ConnIndex {
    /// Opens the index's trees in `db` and reloads the memtable from the log.
    pub(crate) fn open(db: &sled::Db, meta: sled::Tree, memory_entries: usize) -> Result<ConnIndex, StoreError> {
        Self::open_with_blocks(db, meta, memory_entries, BLOCK_ENTRIES)
    }

    pub(crate) fn open_with_blocks(
        db: &sled::Db,
        meta: sled::Tree,
        memory_entries: usize,
        block_entries: usize,
    ) -> Result<ConnIndex, StoreError> {
        let log = db.open_tree("conn_log")?;
        let runs = db.open_tree("conn_runs")?;
        let mut next_log = match meta.get(META_NEXT)? {
            Some(v) => u64::from_be_bytes(
                <[u8; 8]>::try_from(v.as_ref())
                    .map_err(|_| StoreError::Corrupt(format!("meta {META_NEXT:?} is {} bytes", v.len())))?,
            ),
            None => 0,
        };
        let mut memtable = Memtable { entries: Vec::new(), logs: Vec::new(), next_log };
        for item in log.iter() {
            let (k, v) = item?;
            let Ok(number) = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes) else {
                tracing::warn!(key = ?k, "Skipped a malformed connection index log key.");
                continue;
            };
            if v.len() % CONN_KEY_LEN != 0 {
                tracing::warn!(number, "Skipped a malformed connection index log value.");
                continue;
            }
            for entry in v.chunks_exact(CONN_KEY_LEN) {
                memtable.entries.push(entry.try_into().expect("chunk length"));
            }
            memtable.logs.push(number);
            next_log = next_log.max(number + 1);
        }
        memtable.next_log = next_log;
        Ok(ConnIndex {
            log,
            runs,
            meta,
            memory: Mutex::new(memtable),
            memory_entries: memory_entries.max(1),
            block_entries: block_entries.max(1),
        })
    }

    fn memory(&self) -> MutexGuard<'_, Memtable> {
        // Every step leaves the memtable whole (entries and their log numbers change together).
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds the entries of one batch: one log value, then the memtable. Does not flush; call
    /// [`ConnIndex::flush_if_full`] once the batch's records are written.
    pub(crate) fn append(&self, entries: &[[u8; CONN_KEY_LEN]]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut memory = self.memory();
        // Values under 64 KiB (see `SEGMENT_BYTES` in the store): a batch of more entries takes
        // several log values.
        let mut batch = sled::Batch::default();
        let first = memory.next_log;
        for part in entries.chunks(LOG_ENTRIES) {
            batch.insert(&memory.next_log.to_be_bytes(), part.concat());
            memory.next_log += 1;
        }
        self.log.apply_batch(batch)?;
        let next = memory.next_log;
        memory.logs.extend(first..next);
        memory.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Flushes the memtable into runs when it is full.
    pub(crate) fn flush_if_full(&self) -> Result<(), StoreError> {
        let mut memory = self.memory();
        if memory.entries.len() >= self.memory_entries {
            self.flush_locked(&mut memory)?;
        }
        Ok(())
    }

    /// Writes the memtable as runs (one per hour it covers) and removes its log values.
    #[cfg(test)]
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        self.flush_locked(&mut self.memory())
    }

    /// Writes entries that are in no log (a rebuild from the records) straight into runs.
    pub(crate) fn write_runs(&self, entries: Vec<[u8; CONN_KEY_LEN]>) -> Result<(), StoreError> {
        let mut memory = self.memory();
        let run = memory.next_log;
        memory.next_log += 1;
        self.meta.insert(META_NEXT, &memory.next_log.to_be_bytes())?;
        self.write_run(run, entries)
    }

    fn flush_locked(&self, memory: &mut Memtable) -> Result<(), StoreError> {
        if memory.entries.is_empty() {
            return Ok(());
        }
        // The run id is a log number no run and no log value has: the next free one.
        let run = memory.next_log;
        memory.next_log += 1;
        self.meta.insert(META_NEXT, &memory.next_log.to_be_bytes())?;
        let entries = std::mem::take(&mut memory.entries);
        self.write_run(run, entries)?;
        let mut removal = sled::Batch::default();
        for number in memory.logs.drain(..) {
            removal.remove(&number.to_be_bytes());
        }
        self.log.apply_batch(removal)?;
        Ok(())
    }

    /// Sorts `entries` and writes them as run `run`, cut into blocks within each hour.
    fn write_run(&self, run: u64, mut entries: Vec<[u8; CONN_KEY_LEN]>) -> Result<(), StoreError> {
        entries.sort_unstable();
        entries.dedup();
        let mut batch = sled::Batch::default();
        let mut start = 0;
        while start < entries.len() {
            let hour = &entries[start][..4];
            let mut end = start + 1;
            while end < entries.len() && end - start < self.block_entries && &entries[end][..4] == hour {
                end += 1;
            }
            let mut key = Vec::with_capacity(12 + ENTRY_LEN);
            key.extend_from_slice(hour);
            key.extend_from_slice(&run.to_be_bytes());
            key.extend_from_slice(&entries[start][4..]);
            let mut value = Vec::with_capacity(1 + (end - start) * ENTRY_LEN);
            value.push(BLOCK_VERSION);
            for entry in &entries[start..end] {
                value.extend_from_slice(&entry[4..]);
            }
            batch.insert(key, value);
            start = end;
        }
        self.runs.apply_batch(batch)?;
        Ok(())
    }

    /// Every entry of the connection `flow` (both directions are one flow key), deduplicated,
    /// in key order: kind, then record key.
    pub(crate) fn lookup(&self, flow: &FlowKey) -> Result<Vec<Found>, StoreError> {
        let flow = flow.to_bytes();
        let mut found: Vec<Found> = Vec::new();
        {
            let memory = self.memory();
            for entry in memory.entries.iter().filter(|e| e[4..4 + FLOW_LEN] == flow) {
                found.push(split_entry(&entry[4..]));
            }
        }
        // Each run of each stored hour: the block that may hold the flow's first entry (the last
        // one starting before it), then the blocks after it while they start at or before it.
        let mut cursor = [0u8; 12];
        while let Some(first) = self.runs.range(cursor..).next().transpose()? {
            let (first, _) = first;
            let Some(hour_run) = first.get(..12).and_then(|b| <[u8; 12]>::try_from(b).ok()) else {
                tracing::warn!(key = ?first, "Skipped a malformed connection index block key.");
                break;
            };
            let mut target = hour_run.to_vec();
            target.extend_from_slice(&flow);
            let start = match self.runs.range(hour_run.to_vec()..target.clone()).next_back().transpose()? {
                Some((k, _)) => k.to_vec(),
                None => target,
            };
            for item in self.runs.range(start..) {
                let (k, v) = item?;
                if k.get(..12) != Some(&hour_run[..]) || k.get(12..12 + FLOW_LEN).is_none_or(|f| f > &flow[..]) {
                    break;
                }
                if v.first() != Some(&BLOCK_VERSION) || (v.len() - 1) % ENTRY_LEN != 0 {
                    tracing::warn!(key = ?k, "Skipped a malformed connection index block.");
                    continue;
                }
                for entry in v[1..].chunks_exact(ENTRY_LEN) {
                    match entry[..FLOW_LEN].cmp(&flow[..]) {
                        std::cmp::Ordering::Less => continue,
                        std::cmp::Ordering::Equal => found.push(split_entry(entry)),
                        std::cmp::Ordering::Greater => break,
                    }
                }
            }
            match next_prefix(&hour_run) {
                Some(next) => cursor = next,
                None => break,
            }
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// Removes every run of the hours before `hour` (the caller has removed their records).
    /// Returns the number of blocks removed.
    pub(crate) fn drop_hours_before(&self, hour: u32) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in self.runs.range(..hour.to_be_bytes().to_vec()).take(1024) {
                let (k, _) = item?;
                batch.remove(k);
                n += 1;
            }
            if n == 0 {
                return Ok(removed);
            }
            self.runs.apply_batch(batch)?;
            removed += n;
        }
    }

    /// Every entry (memtable and runs), deduplicated and sorted: for consistency checks.
    #[cfg(test)]
    pub(crate) fn all_entries(&self) -> Result<Vec<[u8; CONN_KEY_LEN]>, StoreError> {
        let mut out: Vec<[u8; CONN_KEY_LEN]> = self.memory().entries.clone();
        for item in self.runs.iter() {
            let (k, v) = item?;
            for entry in v[1..].chunks_exact(ENTRY_LEN) {
                let mut full = [0u8; CONN_KEY_LEN];
                full[..4].copy_from_slice(&k[..4]);
                full[4..].copy_from_slice(entry);
                out.push(full);
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Number of runs per hour, for tests.
    #[cfg(test)]
    pub(crate) fn runs(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.runs.iter() {
            let (k, _) = item?;
            let hour = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
            let run = u64::from_be_bytes(k[4..12].try_into().expect("8 bytes"));
            if out.last() != Some(&(hour, run)) {
                out.push((hour, run));
            }
        }
        Ok(out)
    }
}

/// Kind and record key of an entry without its hour.
fn split_entry(entry: &[u8]) -> Found {
    let kind = entry[FLOW_LEN];
    let record: [u8; RECORD_KEY_LEN] = entry[FLOW_LEN + 1..].try_into().expect("entry length");
    (kind, record)
}

/// The smallest 12-byte key above every key starting with `prefix`; `None` past the end.
fn next_prefix(prefix: &[u8; 12]) -> Option<[u8; 12]> {
    let mut next = *prefix;
    for byte in next.iter_mut().rev() {
        if *byte == u8::MAX {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(next);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::{conn_bucket, conn_key, StoreSeq, KIND_FLOW, KIND_RESET};

    const HOUR_NS: i64 = 3_600_000_000_000;
    const T0: i64 = 1_700_000_000_000_000_000;

    fn flow(n: u16) -> FlowKey {
        let ip = std::net::IpAddr::from([10, 0, (n / 256) as u8, (n % 256) as u8]);
        let server = std::net::IpAddr::from([192, 0, 2, 1]);
        FlowKey::new(rstscope_proto::Endpoint::new(ip, 1000 + n), rstscope_proto::Endpoint::new(server, 80))
    }

    fn entry(n: u16, kind: u8, ts_ns: i64, id: u128) -> [u8; CONN_KEY_LEN] {
        conn_key(&flow(n), kind, &StoreSeq { ts_ns, agent_id: 1, id })
    }

    fn open(db: &sled::Db, memory: usize, block: usize) -> ConnIndex {
        ConnIndex::open_with_blocks(db, db.open_tree("meta").expect("meta"), memory, block).expect("open")
    }

    fn temp_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        (dir, db)
    }

    /// Record keys found for connection `n`.
    fn ids(index: &ConnIndex, n: u16) -> Vec<(u8, u128)> {
        index
            .lookup(&flow(n))
            .expect("lookup")
            .into_iter()
            .map(|(kind, record)| (kind, StoreSeq::from_bytes(&record).expect("record key").id))
            .collect()
    }

    #[test]
    fn a_lookup_finds_every_entry_of_a_connection_in_memory_in_runs_and_across_hours() {
        let (_dir, db) = temp_db();
        // Tiny blocks: one connection's entries span several blocks of a run.
        let index = open(&db, 50, 3);
        let mut expected: Vec<(u8, u128)> = Vec::new();
        for batch in 0..12u16 {
            let mut entries = Vec::new();
            for i in 0..10u16 {
                let n = (batch * 10 + i) % 17;
                let ts = T0 + i64::from(batch) * HOUR_NS / 3 + i64::from(i);
                let id = u128::from(batch) * 100 + u128::from(i);
                let kind = if i % 2 == 0 { KIND_FLOW } else { KIND_RESET };
                entries.push(entry(n, kind, ts, id));
                if n == 5 {
                    expected.push((kind, id));
                }
            }
            index.append(&entries).expect("append");
            index.flush_if_full().expect("flush");
        }
        assert!(index.runs().expect("runs").len() >= 4, "several runs over several hours");
        assert!(!index.memory().entries.is_empty(), "and some entries still in memory");
        expected.sort_unstable();
        let mut got = ids(&index, 5);
        got.sort_unstable();
        assert_eq!(got, expected);
        assert!(ids(&index, 999).is_empty(), "a connection never seen");
    }

    #[test]
    fn the_memtable_is_rebuilt_from_the_log_after_a_restart() {
        let (_dir, db) = temp_db();
        {
            let index = open(&db, 1000, 4);
            index.append(&[entry(1, KIND_RESET, T0, 1), entry(2, KIND_RESET, T0, 2)]).expect("append");
        }
        let index = open(&db, 1000, 4);
        assert_eq!(ids(&index, 1), vec![(KIND_RESET, 1)]);
        index.flush().expect("flush");
        assert!(index.log.is_empty(), "the flush removed the log values");
        let index = open(&db, 1000, 4);
        assert_eq!(ids(&index, 2), vec![(KIND_RESET, 2)]);
        assert!(index.memory().entries.is_empty());
    }

    #[test]
    fn a_flush_interrupted_before_removing_the_log_finds_each_entry_once() {
        let (_dir, db) = temp_db();
        let index = open(&db, 1000, 4);
        index.append(&[entry(1, KIND_RESET, T0, 1), entry(1, KIND_FLOW, T0, 2)]).expect("append");
        // The run is written, the log values are not removed yet: the crash state.
        let entries = index.memory().entries.clone();
        index.write_runs(entries).expect("run");
        drop(index);
        let index = open(&db, 1000, 4);
        assert_eq!(ids(&index, 1), vec![(KIND_FLOW, 2), (KIND_RESET, 1)]);
        index.flush().expect("flush");
        let index = open(&db, 1000, 4);
        assert_eq!(ids(&index, 1), vec![(KIND_FLOW, 2), (KIND_RESET, 1)]);
        let runs = index.runs().expect("runs");
        assert_eq!(runs.len(), 2, "two runs with their own ids: {runs:?}");
    }

    #[test]
    fn run_ids_stay_unique_after_the_log_was_emptied_and_the_store_reopened() {
        let (_dir, db) = temp_db();
        for round in 0..3u16 {
            let index = open(&db, 1000, 2);
            index.append(&[entry(round, KIND_RESET, T0, u128::from(round))]).expect("append");
            index.flush().expect("flush");
        }
        let index = open(&db, 1000, 2);
        let runs = index.runs().expect("runs");
        assert_eq!(runs.len(), 3, "{runs:?}");
        for round in 0..3u16 {
            assert_eq!(ids(&index, round), vec![(KIND_RESET, u128::from(round))]);
        }
    }

    #[test]
    fn dropping_old_hours_keeps_the_newer_ones() {
        let (_dir, db) = temp_db();
        let index = open(&db, 1000, 2);
        let entries: Vec<_> = (0..6).map(|h| entry(7, KIND_RESET, T0 + h * HOUR_NS, h as u128)).collect();
        index.append(&entries).expect("append");
        index.flush().expect("flush");
        let removed = index.drop_hours_before(conn_bucket(T0 + 3 * HOUR_NS)).expect("drop");
        assert_eq!(removed, 3, "one block per old hour");
        assert_eq!(ids(&index, 7), vec![(KIND_RESET, 3), (KIND_RESET, 4), (KIND_RESET, 5)]);
    }

    #[test]
    fn next_prefix_carries() {
        assert_eq!(next_prefix(&[0; 12]), Some([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
        let mut x = [0u8; 12];
        x[11] = 0xff;
        let mut y = [0u8; 12];
        y[10] = 1;
        assert_eq!(next_prefix(&x), Some(y));
        assert_eq!(next_prefix(&[0xff; 12]), None);
    }
}
