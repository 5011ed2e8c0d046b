//! A record tree (resets, flows, openings, losses) that stores records packed into *chunks*,
//! and reads like a tree of one key per record.
//!
//! # Why chunks
//! sled 0.34 splits a leaf every 16 entries and serialises a node on every few inserts, so one
//! key per event cost about 20k instructions per event at ingest, and the pages stayed in
//! memory. A chunk holds the records of one batch of one agent within one second of event time:
//! ingest writes a couple of keys per batch instead of a thousand.
//!
//! # Layout
//! | key | value |
//! |---|---|
//! | reserved keys below [`FIRST_RECORD_KEY`] (tallies) | as before |
//! | bucket 8 (second of event time, sign-flipped ns) · agent id 4 · session id 4 · batch seq 8 | version 1 · per record: record key 28 · length u32 · value |
//!
//! Records inside a chunk are in record-key order. The record key ([`super::StoreSeq`]) stays
//! what identifies a record everywhere else (the connection index, cursors, duplicates).
//!
//! # Reading
//! [`RecordTree::range`] yields `(record key, value)` in record-key order like a sled range: it
//! reads all chunks of one second at a time (chunks of several agents and batches overlap in
//! time), sorts their records and filters them by the requested bounds. Values are sub-slices
//! of the chunk (no copy). A point read ([`RecordTree::get`]) scans the chunks of one agent in
//! one second.
//!
//! A chunk that does not decode is yielded whole under its own (24-byte) key, which no caller
//! takes for a record key: they count it as corrupt and skip it, as for any malformed record.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::{Bound, RangeBounds};

use sled::IVec;

use super::keys::{ts_bytes, ts_from_bytes, FIRST_RECORD_KEY, RECORD_KEY_LEN};
use super::StoreError;

/// Width of a chunk's time bucket.
const BUCKET_NS: i64 = 1_000_000_000;
/// Length of a chunk key.
pub(crate) const CHUNK_KEY_LEN: usize = 26;
/// A chunk is cut when it reaches this many bytes (see `SEGMENT_BYTES` in the store).
const CHUNK_BYTES: usize = 60 << 10;
/// Version byte in front of every chunk.
const CHUNK_VERSION: u8 = 1;

/// Reserved key (below every record key) present once a tree holds only chunks.
const CHUNKED_KEY: [u8; 2] = [0x00, b'c'];

/// A record key and its value.
pub(crate) type Record = (IVec, IVec);

/// One record tree, see the module notes.
#[derive(Clone)]
pub(crate) struct RecordTree {
    tree: sled::Tree,
}

/// The 8-byte bucket prefix of a record key (or of any key starting with 8 time bytes; shorter
/// keys are padded with zeros).
fn bucket_of(key: &[u8]) -> i64 {
    ts_of(key).div_euclid(BUCKET_NS) * BUCKET_NS
}

/// `bucket · agent` of a record key: the prefix of the chunks that may hold it.
fn chunk_prefix(record_key: &[u8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&ts_bytes(bucket_of(record_key)));
    out[8..12].copy_from_slice(&record_key[8..12]);
    out
}

fn chunk_key(prefix: &[u8; 12], session_id: u32, batch_seq: u64, part: u16) -> [u8; CHUNK_KEY_LEN] {
    let mut out = [0u8; CHUNK_KEY_LEN];
    out[..12].copy_from_slice(prefix);
    out[12..16].copy_from_slice(&session_id.to_be_bytes());
    out[16..24].copy_from_slice(&batch_seq.to_be_bytes());
    out[24..26].copy_from_slice(&part.to_be_bytes());
    out
}

/// Chunk values of records (sorted by key), each at most [`CHUNK_BYTES`] (a single larger
/// record gets a chunk of its own).
fn encode_chunks<'a>(records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current: Vec<(&[u8], &[u8])> = Vec::new();
    let mut bytes = 1;
    for (key, value) in records {
        let size = key.len() + 4 + value.len();
        if !current.is_empty() && bytes + size > CHUNK_BYTES {
            out.push(encode_chunk(current.drain(..)));
            bytes = 1;
        }
        current.push((key, value));
        bytes += size;
    }
    if !current.is_empty() {
        out.push(encode_chunk(current));
    }
    out
}

/// Records (key, value) grouped by the chunk prefix they belong under, each group in the
/// order given.
type ChunkGroups<'a> = BTreeMap<[u8; 12], Vec<(&'a [u8], &'a [u8])>>;

fn group_by_chunk<'a>(records: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> ChunkGroups<'a> {
    let mut groups = ChunkGroups::new();
    for (key, value) in records {
        groups.entry(chunk_prefix(key)).or_default().push((key, value));
    }
    groups
}

/// Encodes records (sorted by key) as a chunk value.
fn encode_chunk<'a>(records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut out = vec![CHUNK_VERSION];
    for (key, value) in records {
        out.extend_from_slice(key);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// The records of a chunk, or `None` if it is malformed.
fn decode_chunk(chunk: &IVec) -> Option<Vec<Record>> {
    if chunk.first() != Some(&CHUNK_VERSION) {
        return None;
    }
    let mut out = Vec::new();
    let mut at = 1;
    while at < chunk.len() {
        let header_end = at.checked_add(RECORD_KEY_LEN + 4)?;
        let header = chunk.get(at..header_end)?;
        let len = u32::from_be_bytes(header[RECORD_KEY_LEN..].try_into().ok()?) as usize;
        let end = header_end.checked_add(len)?;
        if end > chunk.len() {
            return None;
        }
        out.push((IVec::from(&header[..RECORD_KEY_LEN]), chunk.subslice(header_end, len)));
        at = end;
    }
    Some(out)
}

impl RecordTree {
    pub(crate) fn new(tree: sled::Tree) -> RecordTree {
        RecordTree { tree }
    }

    /// The sled tree itself, for the reserved keys (tallies).
    pub(crate) fn raw(&self) -> &sled::Tree {
        &self.tree
    }

    /// Records with keys in `range`, in key order.
    pub(crate) fn range<R: RangeBounds<Vec<u8>>>(&self, range: R) -> RecordIter {
        self.iter(range, false)
    }

    /// Records with keys in `range`, newest first.
    pub(crate) fn range_rev<R: RangeBounds<Vec<u8>>>(&self, range: R) -> RecordIter {
        self.iter(range, true)
    }

    fn iter<R: RangeBounds<Vec<u8>>>(&self, range: R, reverse: bool) -> RecordIter {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let first = FIRST_RECORD_KEY.to_vec();
        let chunk_start = match &start {
            Bound::Included(k) | Bound::Excluded(k) => ts_bytes(bucket_of(k)).to_vec().max(first),
            Bound::Unbounded => first,
        };
        let chunk_end = match &end {
            Bound::Included(k) | Bound::Excluded(k) => match bucket_of(k).checked_add(BUCKET_NS) {
                Some(next) => Bound::Excluded(ts_bytes(next).to_vec()),
                None => Bound::Unbounded,
            },
            Bound::Unbounded => Bound::Unbounded,
        };
        let chunks = self.tree.range::<Vec<u8>, _>((Bound::Included(chunk_start), chunk_end));
        RecordIter { chunks, reverse, start, end, buffer: VecDeque::new(), peeked: None, done: false }
    }

    /// The value of the record `key`, if stored.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        if key.len() != RECORD_KEY_LEN {
            return Ok(None);
        }
        for item in self.tree.scan_prefix(chunk_prefix(key)) {
            let (_, chunk) = item?;
            if let Some(found) = decode_chunk(&chunk)
                .and_then(|records| records.into_iter().find_map(|(k, v)| (k.as_ref() == key).then_some(v)))
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The keys of every record of the agent in the second of `record_key` (for the duplicate
    /// check of ingest, which asks about many records of the same second).
    pub(crate) fn keys_near(&self, record_key: &[u8]) -> Result<HashSet<[u8; RECORD_KEY_LEN]>, StoreError> {
        let mut out = HashSet::new();
        for item in self.tree.scan_prefix(chunk_prefix(record_key)) {
            let (_, chunk) = item?;
            for (k, _) in decode_chunk(&chunk).unwrap_or_default() {
                if let Ok(k) = <[u8; RECORD_KEY_LEN]>::try_from(k.as_ref()) {
                    out.insert(k);
                }
            }
        }
        Ok(out)
    }

    /// The newest record time, if any record is stored.
    pub(crate) fn newest_ns(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.range_rev(..).next().transpose()?.map(|(k, _)| ts_of(&k)))
    }

    /// Whether any record is stored.
    pub(crate) fn has_records(&self) -> Result<bool, StoreError> {
        Ok(self.tree.range(FIRST_RECORD_KEY..).next().transpose()?.is_some())
    }

    /// Writes the records of one batch (`session_id`, `batch_seq` name its chunks) together
    /// with `reserved` key-value pairs, in one atomic sled batch.
    pub(crate) fn write(
        &self,
        session_id: u32,
        batch_seq: u64,
        mut records: Vec<([u8; RECORD_KEY_LEN], &[u8])>,
        reserved: &[(&[u8], &[u8])],
    ) -> Result<(), StoreError> {
        records.sort_unstable_by_key(|r| r.0);
        let mut batch = sled::Batch::default();
        for (prefix, records) in group_by_chunk(records.iter().map(|(k, v)| (&k[..], *v))) {
            for (part, chunk) in encode_chunks(records).into_iter().enumerate() {
                let part =
                    u16::try_from(part).map_err(|_| StoreError::Invalid("a batch too large for one second".into()))?;
                batch.insert(&chunk_key(&prefix, session_id, batch_seq, part)[..], chunk);
            }
        }
        for (key, value) in reserved {
            batch.insert(*key, *value);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Removes the records `keys` (the chunks holding them are rewritten or removed) and writes
    /// `reserved`, in one atomic sled batch.
    pub(crate) fn remove(&self, keys: &[IVec], reserved: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        let mut by_prefix: BTreeMap<[u8; 12], HashSet<&[u8]>> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        for key in keys {
            if key.len() == RECORD_KEY_LEN {
                by_prefix.entry(chunk_prefix(key)).or_default().insert(key.as_ref());
            } else {
                // A malformed chunk yielded whole (see the module notes): it goes as it is.
                batch.remove(key.clone());
            }
        }
        for (prefix, victims) in by_prefix {
            for item in self.tree.scan_prefix(prefix) {
                let (chunk_key, chunk) = item?;
                let Some(records) = decode_chunk(&chunk) else { continue };
                let kept: Vec<&Record> = records.iter().filter(|(k, _)| !victims.contains(k.as_ref())).collect();
                if kept.len() == records.len() {
                    continue;
                }
                if kept.is_empty() {
                    batch.remove(chunk_key);
                } else {
                    // Smaller than before: still one chunk.
                    batch.insert(chunk_key, encode_chunk(kept.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))));
                }
            }
        }
        for (key, value) in reserved {
            batch.insert(*key, *value);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Moves records stored one key each (the layout of earlier versions) into chunks, a
    /// slice at a time, each slice one atomic batch. Returns how many records moved.
    ///
    /// A tree already in chunks says so in a reserved key ([`CHUNKED_KEY`], written once the
    /// tree holds no record of the old layout), so opening a store does not read it whole.
    pub(crate) fn migrate_one_key_per_record(&self) -> Result<u64, StoreError> {
        if self.tree.contains_key(CHUNKED_KEY)? {
            return Ok(0);
        }
        let mut moved = 0u64;
        // Chunks written by the slices before are skipped (their keys are not record keys),
        // and records only go: each slice resumes after the last key the one before read.
        let mut from = Bound::Included(FIRST_RECORD_KEY.to_vec());
        loop {
            let mut slice: Vec<(IVec, IVec)> = Vec::new();
            for item in self.tree.range::<Vec<u8>, _>((from.clone(), Bound::Unbounded)) {
                let (k, v) = item?;
                if k.len() == RECORD_KEY_LEN {
                    slice.push((k, v));
                    if slice.len() >= 50_000 {
                        break;
                    }
                }
            }
            let Some((last, _)) = slice.last() else {
                self.tree.insert(CHUNKED_KEY, &[][..])?;
                return Ok(moved);
            };
            from = Bound::Excluded(last.to_vec());
            let mut batch = sled::Batch::default();
            for (k, _) in &slice {
                batch.remove(k.clone());
            }
            for (prefix, records) in group_by_chunk(slice.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))) {
                // Session 0 is never a live session's id, so these keys cannot collide with
                // ingest; the batch number is taken from the group's first record (its identity
                // digest), so a migration interrupted and run again never reuses a key.
                let first = records[0].0;
                let nonce = u64::from_be_bytes(first[RECORD_KEY_LEN - 8..].try_into().expect("8 bytes"));
                for (part, chunk) in encode_chunks(records).into_iter().enumerate() {
                    let part = u16::try_from(part).unwrap_or(u16::MAX);
                    batch.insert(&chunk_key(&prefix, 0, nonce, part)[..], chunk);
                }
            }
            self.tree.apply_batch(batch)?;
            moved += slice.len() as u64;
        }
    }
}

/// Event time of a record key (or of any key starting with 8 time bytes; shorter keys are
/// padded with zeros).
pub(super) fn ts_of(key: &[u8]) -> i64 {
    let mut head = [0u8; 8];
    let n = key.len().min(8);
    head[..n].copy_from_slice(&key[..n]);
    ts_from_bytes(head)
}

/// See [`RecordTree::range`].
pub(crate) struct RecordIter {
    chunks: sled::Iter,
    reverse: bool,
    start: Bound<Vec<u8>>,
    end: Bound<Vec<u8>>,
    buffer: VecDeque<Record>,
    /// The first chunk of the next bucket, read while gathering the previous one.
    peeked: Option<(IVec, IVec)>,
    done: bool,
}

impl RecordIter {
    fn in_bounds(&self, key: &[u8]) -> bool {
        let above = match &self.start {
            Bound::Included(s) => key >= s.as_slice(),
            Bound::Excluded(s) => key > s.as_slice(),
            Bound::Unbounded => true,
        };
        let below = match &self.end {
            Bound::Included(e) => key <= e.as_slice(),
            Bound::Excluded(e) => key < e.as_slice(),
            Bound::Unbounded => true,
        };
        above && below
    }

    fn next_chunk(&mut self) -> Option<sled::Result<(IVec, IVec)>> {
        if let Some(chunk) = self.peeked.take() {
            return Some(Ok(chunk));
        }
        if self.reverse {
            self.chunks.next_back()
        } else {
            self.chunks.next()
        }
    }

    /// Reads the chunks of the next bucket into the buffer.
    fn fill(&mut self) -> Result<(), sled::Error> {
        let mut bucket: Option<[u8; 8]> = None;
        let mut records: Vec<Record> = Vec::new();
        while let Some(item) = self.next_chunk() {
            let (key, chunk) = item?;
            let head: [u8; 8] = key.get(..8).and_then(|h| h.try_into().ok()).unwrap_or_default();
            match bucket {
                None => bucket = Some(head),
                Some(b) if b != head => {
                    self.peeked = Some((key, chunk));
                    break;
                }
                Some(_) => {}
            }
            match decode_chunk(&chunk).filter(|_| key.len() == CHUNK_KEY_LEN) {
                Some(decoded) => records.extend(decoded.into_iter().filter(|(k, _)| self.in_bounds(k))),
                None => records.push((key, chunk)),
            }
        }
        if bucket.is_none() {
            self.done = true;
        }
        records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if self.reverse {
            records.reverse();
        }
        self.buffer.extend(records);
        Ok(())
    }
}

impl Iterator for RecordIter {
    type Item = sled::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.buffer.pop_front() {
                return Some(Ok(record));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::StoreSeq;

    fn key(ts_ns: i64, agent_id: u32, id: u128) -> [u8; RECORD_KEY_LEN] {
        StoreSeq { ts_ns, agent_id, id }.to_bytes()
    }

    fn temp_tree() -> (tempfile::TempDir, RecordTree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        (dir, RecordTree::new(db.open_tree("records").expect("tree")))
    }

    fn ids(iter: RecordIter) -> Vec<u128> {
        iter.map(|r| StoreSeq::from_bytes(&r.expect("record").0).expect("record key").id).collect()
    }

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_700_000_000 * S;

    /// Two agents, batches overlapping in time and spanning several seconds.
    fn fixture() -> (tempfile::TempDir, RecordTree) {
        let (dir, tree) = temp_tree();
        let values: Vec<Vec<u8>> = (0..12).map(|i| vec![i as u8; i]).collect();
        // (ts offset ms, agent, id)
        let batch1 = [(0, 1, 0), (400, 1, 1), (1_200, 1, 2), (2_500, 1, 3), (2_500, 1, 4)];
        let batch2 = [(100, 2, 5), (1_100, 2, 6), (1_200, 2, 7), (3_000, 2, 8)];
        let batch3 = [(900, 1, 9), (1_000, 1, 10), (5_000, 1, 11)];
        for (seq, batch) in [&batch1[..], &batch2[..], &batch3[..]].into_iter().enumerate() {
            let records: Vec<_> = batch
                .iter()
                .map(|&(ms, agent, id)| (key(T0 + ms * 1_000_000, agent, id), values[id as usize].as_slice()))
                .collect();
            tree.write(1, seq as u64 + 1, records, &[]).expect("write");
        }
        (dir, tree)
    }

    #[test]
    fn ranges_read_like_one_key_per_record() {
        let (_dir, tree) = fixture();
        let ms = |ms: i64| ts_bytes(T0 + ms * 1_000_000).to_vec();
        // Time order, then agent, then id, across batches and agents.
        assert_eq!(ids(tree.range(..)), [0, 5, 1, 9, 10, 6, 2, 7, 3, 4, 8, 11]);
        assert_eq!(ids(tree.range_rev(..)), [11, 8, 4, 3, 7, 2, 6, 10, 9, 1, 5, 0]);
        assert_eq!(ids(tree.range(ms(1_000)..ms(2_500))), [10, 6, 2, 7]);
        assert_eq!(ids(tree.range_rev(ms(1_000)..ms(2_500))), [7, 2, 6, 10]);
        // Exclusive of a record key (a cursor).
        let after = key(T0 + 1_200 * 1_000_000, 1, 2).to_vec();
        assert_eq!(ids(tree.range((Bound::Excluded(after), Bound::Unbounded))), [7, 3, 4, 8, 11]);
        assert_eq!(ids(tree.range(ms(6_000)..)), Vec::<u128>::new());
        // Values are whole.
        let (k, v) = tree.range(..).nth(2).expect("third").expect("ok");
        assert_eq!(StoreSeq::from_bytes(&k).expect("key").id, 1);
        assert_eq!(v.as_ref(), &[1u8][..]);
    }

    #[test]
    fn point_reads_find_records_in_any_chunk() {
        let (_dir, tree) = fixture();
        let got = tree.get(&key(T0 + 1_000 * 1_000_000, 1, 10)).expect("get");
        assert_eq!(got.as_deref(), Some(&[10u8; 10][..]));
        assert_eq!(tree.get(&key(T0 + 1_000 * 1_000_000, 1, 99)).expect("get"), None);
        let near = tree.keys_near(&key(T0 + 1_500 * 1_000_000, 1, 0)).expect("near");
        assert_eq!(near.len(), 2, "agent 1's records of the second 1..2 s: ids 10 and 2");
        assert_eq!(tree.newest_ns().expect("newest"), Some(T0 + 5 * S));
    }

    #[test]
    fn removing_records_rewrites_their_chunks() {
        let (_dir, tree) = fixture();
        let victims: Vec<IVec> = tree.range(..).take(4).map(|r| r.expect("record").0).collect();
        tree.remove(&victims, &[(&[0u8, 1][..], &[7u8][..])]).expect("remove");
        assert_eq!(ids(tree.range(..)), [10, 6, 2, 7, 3, 4, 8, 11]);
        assert_eq!(tree.raw().get([0u8, 1]).expect("get").as_deref(), Some(&[7u8][..]), "reserved keys written");
        let all: Vec<IVec> = tree.range(..).map(|r| r.expect("record").0).collect();
        tree.remove(&all, &[]).expect("remove");
        assert!(!tree.has_records().expect("has"), "empty chunks are removed");
    }

    #[test]
    fn a_tree_of_one_key_per_record_is_moved_into_chunks() {
        let (_dir, tree) = temp_tree();
        for i in 0..300u128 {
            let k = key(T0 + (i as i64) * 37_000_000, 1 + (i % 3) as u32, i);
            tree.raw().insert(k, vec![i as u8]).expect("insert");
        }
        tree.raw().insert([0u8, b'n'], &[1u8][..]).expect("reserved");
        assert_eq!(tree.migrate_one_key_per_record().expect("migrate"), 300);
        assert_eq!(tree.migrate_one_key_per_record().expect("again"), 0, "nothing left to move");
        let got: Vec<(u128, u8)> = tree
            .range(..)
            .map(|r| {
                let (k, v) = r.expect("record");
                (StoreSeq::from_bytes(&k).expect("key").id, v[0])
            })
            .collect();
        let mut expected: Vec<(u128, u8)> = (0..300u128).map(|i| (i, i as u8)).collect();
        expected.sort_by_key(|&(i, _)| key(T0 + (i as i64) * 37_000_000, 1 + (i % 3) as u32, i));
        assert_eq!(got, expected);
        assert!(tree.raw().get([0u8, b'n']).expect("get").is_some(), "reserved keys stay");
    }

    #[test]
    fn a_migration_run_again_after_an_interruption_keeps_every_record() {
        let (_dir, tree) = temp_tree();
        let old = |i: u128| (key(T0 + (i as i64) * 1_000_000, 1, i), vec![i as u8]);
        for i in (0..200u128).step_by(2) {
            let (k, v) = old(i);
            tree.raw().insert(k, v).expect("insert");
        }
        assert_eq!(tree.migrate_one_key_per_record().expect("migrate"), 100);
        // As if the first run had stopped before the rest: more old records in the same
        // seconds, and no mark yet.
        tree.raw().remove(CHUNKED_KEY).expect("unmark");
        for i in (1..200u128).step_by(2) {
            let (k, v) = old(i);
            tree.raw().insert(k, v).expect("insert");
        }
        assert_eq!(tree.migrate_one_key_per_record().expect("migrate again"), 100);
        assert_eq!(ids(tree.range(..)), (0..200u128).collect::<Vec<_>>());
    }

    #[test]
    fn a_malformed_chunk_is_yielded_whole_and_nothing_else_is_lost() {
        let (_dir, tree) = fixture();
        let bad = chunk_key(&chunk_prefix(&key(T0 + 1_000 * 1_000_000, 1, 0)), 9, 9, 0);
        tree.raw().insert(bad, &[CHUNK_VERSION, 1, 2, 3][..]).expect("insert");
        let keys: Vec<IVec> = tree.range(..).map(|r| r.expect("record").0).collect();
        assert_eq!(keys.len(), 13);
        assert_eq!(keys.iter().filter(|k| k.len() == CHUNK_KEY_LEN).count(), 1);
    }
}
