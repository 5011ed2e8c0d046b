//! The write path of ingest: checking and encoding a batch, skipping events already stored,
//! writing the trees in crash-safe order, and group commit.
//!
//! # Why no transaction
//! A sled transaction per batch cost 35-60 µs per event (every write is buffered, locked,
//! read back for conflicts). Plain `apply_batch` per tree is atomic per tree, which is enough
//! when the trees are written in an order where every prefix is a consistent state (see the
//! store's module notes) and each record tree carries its own counts.
//!
//! # Group commit
//! Writing a batch and making it durable are two steps ([`Store::write_batch`],
//! [`Store::make_durable`]). Each write takes a generation number; a flush covers every
//! generation written before it began. Writers queue on the flush lock: whoever gets it after a
//! flush finds its generation already durable and returns at once, so with several agents one
//! fsync acknowledges several batches, and one agent's next batch is written while the previous
//! one is being flushed.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rstscope_proto::{v1, FlowKey};

use super::keys::{
    self, conn_key, encode_plain_into, session_key, tally_key, SessionValue, StoreSeq, Tally, ValueHeader,
    FIRST_RECORD_KEY, KIND_FLOW, KIND_LOSS, KIND_OPEN, KIND_RESET, RECORD_KEY_LEN, TALLY_TOTAL_KEY,
};
use super::{
    decode_record, encode_record, endpoint, AgentRecord, Appended, Store, StoreError, StoredReset, Writer, KINDS,
};

/// Generations written and made durable (see the module notes).
#[derive(Default)]
pub(super) struct Durability {
    written: AtomicU64,
    /// The highest generation known durable; held while flushing.
    durable: Mutex<u64>,
}

impl Durability {
    /// The generation of everything written so far.
    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Marks a write done (call after it); returns its generation.
    pub(super) fn bump(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once generation `generation` is durable, flushing if no flush that began after
    /// it has finished.
    pub(super) fn wait(&self, db: &sled::Db, generation: u64) -> Result<(), StoreError> {
        let mut durable = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
        if *durable >= generation {
            return Ok(());
        }
        let target = self.written();
        db.flush().map_err(StoreError::from_sled)?;
        *durable = target;
        Ok(())
    }

    /// Flushes now, whatever was flushed before.
    pub(super) fn flush_now(&self, db: &sled::Db) -> Result<(), StoreError> {
        let mut durable = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
        let target = self.written();
        db.flush().map_err(StoreError::from_sled)?;
        *durable = target;
        Ok(())
    }
}

/// A batch written but perhaps not yet durable: hand it to [`Store::make_durable`] before
/// acknowledging it.
#[must_use = "a written batch must be made durable before it is acknowledged"]
pub struct Pending {
    outcome: Appended,
    /// 0: nothing to wait for (a gap).
    generation: u64,
    /// Resets for followers, published once durable.
    publish: Option<Arc<[StoredReset]>>,
    /// Positions in the batch of record events that were not written because the store
    /// already held them (sent again by an agent restarted mid-file, or twice in one batch).
    already_stored: Vec<usize>,
}

impl Pending {
    /// What [`Store::make_durable`] will return.
    pub fn outcome(&self) -> Appended {
        self.outcome
    }

    /// Positions (in the batch) of its record events that the store already held and did not
    /// write again: whoever passes the batch on (followers, the correlation) skips them, so
    /// they see each event once, as the store does.
    pub fn already_stored(&self) -> &[usize] {
        &self.already_stored
    }
}

/// One event of a batch, checked and encoded, waiting for its key.
struct Prepared {
    kind: u8,
    /// Position in the batch.
    event: usize,
    /// Identity digest (part of the key, so an event sent again writes the same key).
    id: u128,
    ts_ns: i64,
    flow_key: Option<FlowKey>,
    /// Where its encoded value lies in the batch's buffer of values.
    value: Range<usize>,
    /// For losses: (capture + interface drops, events dropped).
    drops: (u64, u64),
}

/// The latest watermark of a batch.
#[derive(Clone, Copy, Default)]
struct Mark {
    ts_ns: i64,
    since_ns: i64,
}

/// A batch's events checked and encoded: their values lie one after the other in `values`.
struct PreparedBatch {
    events: Vec<Prepared>,
    values: Vec<u8>,
    mark: Option<Mark>,
}

/// Room for the values of one event, on average: a little more than a reset's, so that the
/// buffer of a batch of typical events is allocated once.
const VALUE_BYTES_GUESS: usize = 256;

/// Checks and encodes a batch's events; nothing is written if any is invalid.
fn prepare(batch: &v1::Batch) -> Result<PreparedBatch, StoreError> {
    use v1::event::Kind;
    let mut prepared = Vec::with_capacity(batch.events.len());
    let mut values = Vec::with_capacity(batch.events.len() * VALUE_BYTES_GUESS);
    // Appends one value to `values` and returns where it lies.
    let mut encode = |write: &mut dyn FnMut(&mut Vec<u8>)| {
        let start = values.len();
        write(&mut values);
        start..values.len()
    };
    let mut mark: Option<Mark> = None;
    let time = |i: usize, field: &str, ts: i64| {
        if ts < 0 {
            return Err(StoreError::Invalid(format!("event {i}: {field} {ts} is before 1970")));
        }
        Ok(ts)
    };
    for (i, event) in batch.events.iter().enumerate() {
        match &event.kind {
            Some(Kind::Reset(rst)) => {
                let key = FlowKey::new(endpoint(rst.src.as_ref(), i, "src")?, endpoint(rst.dst.as_ref(), i, "dst")?);
                let header = ValueHeader {
                    key,
                    cause: u8::try_from(rst.cause).unwrap_or(u8::MAX),
                    flags: (rst.flags & 0xfff) as u16,
                };
                prepared.push(Prepared {
                    event: i,
                    kind: KIND_RESET,
                    id: keys::reset_id(rst),
                    ts_ns: time(i, "ts_ns", rst.ts_ns)?,
                    flow_key: Some(key),
                    value: encode(&mut |out| header.encode_into(rst, out)),
                    drops: (0, 0),
                });
            }
            Some(Kind::Flow(flow)) => {
                let key =
                    FlowKey::new(endpoint(flow.orig.as_ref(), i, "orig")?, endpoint(flow.resp.as_ref(), i, "resp")?);
                prepared.push(Prepared {
                    event: i,
                    kind: KIND_FLOW,
                    id: keys::flow_id(flow),
                    ts_ns: time(i, "end_ns", flow.end_ns)?,
                    flow_key: Some(key),
                    value: encode(&mut |out| ValueHeader { key, cause: 0, flags: 0 }.encode_into(flow, out)),
                    drops: (0, 0),
                });
            }
            Some(Kind::Open(open)) => {
                let key =
                    FlowKey::new(endpoint(open.orig.as_ref(), i, "orig")?, endpoint(open.resp.as_ref(), i, "resp")?);
                prepared.push(Prepared {
                    event: i,
                    kind: KIND_OPEN,
                    id: keys::open_id(open),
                    ts_ns: time(i, "start_ns", open.start_ns)?,
                    flow_key: Some(key),
                    value: encode(&mut |out| ValueHeader { key, cause: 0, flags: 0 }.encode_into(open, out)),
                    drops: (0, 0),
                });
            }
            Some(Kind::Loss(loss)) => {
                prepared.push(Prepared {
                    event: i,
                    kind: KIND_LOSS,
                    id: keys::loss_id(loss),
                    ts_ns: time(i, "until_ns", loss.until_ns)?,
                    flow_key: None,
                    value: encode(&mut |out| encode_plain_into(loss, out)),
                    drops: (loss.capture_dropped.saturating_add(loss.interface_dropped), loss.events_dropped),
                });
            }
            Some(Kind::Watermark(w)) => {
                if mark.is_none_or(|m| w.ts_ns >= m.ts_ns) {
                    mark = Some(Mark { ts_ns: w.ts_ns, since_ns: w.since_ns });
                }
            }
            None => return Err(StoreError::Invalid(format!("event {i} of the batch is empty"))),
        }
    }
    Ok(PreparedBatch { events: prepared, values, mark })
}

impl Store {
    /// Stores the batch `batch.seq` of the session `(agent, boot_id)` if it is the next one,
    /// durably (fsync) before returning [`Appended::Stored`]: [`Store::write_batch`] followed by
    /// [`Store::make_durable`].
    ///
    /// A batch at or below the durable number is a [`Appended::Duplicate`], one beyond the next
    /// a [`Appended::Gap`]; neither writes anything. An event with an endpoint that is not 4 or 16
    /// bytes, or a time before 1970, rejects the whole batch with [`StoreError::Invalid`]. Events
    /// already stored for the agent (same time and identity, see the module notes) are skipped,
    /// not counted again.
    pub fn append_batch(
        &self,
        agent: &str,
        boot_id: &str,
        batch: &v1::Batch,
        now_ns: i64,
    ) -> Result<Appended, StoreError> {
        let pending = self.write_batch(agent, boot_id, batch, now_ns)?;
        self.make_durable(pending)
    }

    /// The first half of [`Store::append_batch`]: checks and writes the batch (not yet
    /// durable). Another batch may be written before this one is made durable.
    pub fn write_batch(
        &self,
        agent: &str,
        boot_id: &str,
        batch: &v1::Batch,
        now_ns: i64,
    ) -> Result<Pending, StoreError> {
        self.guarded(|| self.write_batch_unguarded(agent, boot_id, batch, now_ns))
    }

    fn write_batch_unguarded(
        &self,
        agent: &str,
        boot_id: &str,
        batch: &v1::Batch,
        now_ns: i64,
    ) -> Result<Pending, StoreError> {
        let PreparedBatch { events: prepared, values, mark } = prepare(batch)?;
        let mut writer = self.writer();
        let session = self.session(agent, boot_id)?;
        let durable_seq = session.map_or(0, |s| s.durable_seq);
        if batch.seq <= durable_seq {
            // The earlier Stored may still be waiting for its flush: this ack must wait too.
            let generation = self.inner.durability.written();
            return Ok(Pending {
                outcome: Appended::Duplicate { durable_seq },
                generation,
                publish: None,
                already_stored: Vec::new(),
            });
        }
        if batch.seq != durable_seq + 1 {
            return Ok(Pending {
                outcome: Appended::Gap { durable_seq },
                generation: 0,
                publish: None,
                already_stored: Vec::new(),
            });
        }
        let agent_id = self.intern_agent(agent)?;
        let mut session = match session {
            Some(s) => s,
            None => SessionValue { session_id: new_session_id(&mut writer)?, ..SessionValue::default() },
        };

        // Which events are new. `seen` catches an event repeated within the batch itself; the
        // tree is only asked about events not newer than the agent's newest stored record.
        let mut seen = HashSet::with_capacity(prepared.len());
        let mut tree_records: [Vec<([u8; RECORD_KEY_LEN], &[u8])>; 4] = Default::default();
        // Keys already stored near the events that may be duplicates, per kind and second.
        let mut near = HashMap::new();
        let mut conn_entries = Vec::with_capacity(prepared.len());
        let mut tallies: [Tally; 4] = KINDS.map(|kind| tally_of(&writer, kind, agent_id));
        let mut added = [0u64; 4];
        let mut new_resets = Vec::new();
        let mut already_stored = Vec::new();
        let publish = self.inner.new_resets.receiver_count() > 0;
        for p in &prepared {
            let k = usize::from(p.kind);
            let seq = StoreSeq { ts_ns: p.ts_ns, agent_id, id: p.id };
            let record_key = seq.to_bytes();
            if !seen.insert((p.kind, record_key)) {
                already_stored.push(p.event);
                continue;
            }
            if p.ts_ns <= tallies[k].newest_ns && self.stored_near(&mut near, p.kind, &record_key)? {
                already_stored.push(p.event);
                continue;
            }
            tree_records[k].push((record_key, &values[p.value.clone()]));
            if let Some(flow_key) = &p.flow_key {
                conn_entries.push(conn_key(flow_key, p.kind, &seq));
            }
            added[k] += 1;
            // Updated as we go: later events of this batch are new relative to the tree, and
            // duplicates among them are caught by `seen`.
            let t = &mut tallies[k];
            t.records += 1;
            t.capture_dropped = t.capture_dropped.saturating_add(p.drops.0);
            t.events_dropped = t.events_dropped.saturating_add(p.drops.1);
            if publish && p.kind == KIND_RESET {
                new_resets.push(seq);
            }
        }
        // Newest times after the loop: an event is checked against what the tree held before.
        for p in &prepared {
            let t = &mut tallies[usize::from(p.kind)];
            t.newest_ns = t.newest_ns.max(p.ts_ns);
        }

        // 1. The index: an entry without its record is skipped by readers.
        self.inner.conn.append(&conn_entries)?;
        // 2. Each record tree with its tallies, atomically.
        for (kind, records) in KINDS.into_iter().zip(tree_records) {
            let k = usize::from(kind);
            if added[k] == 0 && tally_of(&writer, kind, agent_id) == tallies[k] {
                continue;
            }
            let total = self.inner.totals[k].load(Ordering::Relaxed) + added[k];
            let (total_bytes, tally_bytes) = (total.to_be_bytes(), tallies[k].to_bytes());
            let reserved = [(&TALLY_TOTAL_KEY[..], &total_bytes[..]), (&tally_key(agent_id)[..], &tally_bytes[..])];
            self.tree(kind).write(session.session_id, batch.seq, records, &reserved)?;
            self.inner.totals[k].store(total, Ordering::Relaxed);
            writer.tallies.insert((kind, agent_id), tallies[k]);
        }
        // The index's memtable, if full, becomes a run (before the session: a failure here leaves
        // the batch unacknowledged, and its records are recognised when it is sent again).
        self.inner.conn.flush_if_full()?;
        // 3. The agent record (informational), 4. the session: from here on the batch counts
        // as stored.
        if let Some(m) = mark {
            if m.ts_ns >= session.watermark_ns {
                session.watermark_ns = m.ts_ns;
                session.since_ns = m.since_ns;
            }
        }
        self.commit_agent(agent, boot_id, batch.seq, mark, now_ns)?;
        session.durable_seq = batch.seq;
        self.inner
            .sessions
            .insert(session_key(agent, boot_id), &session.to_bytes()[..])
            .map_err(StoreError::from_sled)?;
        let generation = self.inner.durability.bump();
        drop(writer);

        let publish = (!new_resets.is_empty()).then(|| self.published(agent, agent_id, batch, &new_resets));
        Ok(Pending { outcome: Appended::Stored { durable_seq: batch.seq }, generation, publish, already_stored })
    }

    /// The second half of [`Store::append_batch`]: returns once the batch is durable (one
    /// fsync shared with every batch written meanwhile), then publishes its resets.
    pub fn make_durable(&self, pending: Pending) -> Result<Appended, StoreError> {
        if pending.generation > 0 {
            self.guarded(|| self.inner.durability.wait(&self.inner.db, pending.generation))?;
        }
        if let Some(resets) = pending.publish {
            // An error only means every follower left meanwhile.
            let _ = self.inner.new_resets.send(resets);
        }
        Ok(pending.outcome)
    }

    fn commit_agent(
        &self,
        agent: &str,
        boot_id: &str,
        seq: u64,
        mark: Option<Mark>,
        now_ns: i64,
    ) -> Result<(), StoreError> {
        let fresh = || AgentRecord { name: agent.to_string(), first_seen_ns: now_ns, ..AgentRecord::default() };
        let mut record = match self.inner.agents.get(agent.as_bytes())? {
            // A damaged record must not block the agent's ingest: start it afresh.
            Some(bytes) => decode_record(agent, &bytes).unwrap_or_else(|_| {
                self.corrupt("agents", agent.as_bytes(), "undecodable agent record");
                fresh()
            }),
            None => fresh(),
        };
        record.boot_id = boot_id.to_string();
        record.durable_seq = seq;
        record.last_seen_ns = now_ns;
        if let Some(m) = mark {
            if m.ts_ns >= record.watermark_ns {
                record.watermark_ns = m.ts_ns;
                record.watermark_since_ns = m.since_ns;
            }
        }
        self.inner.agents.insert(agent.as_bytes(), encode_record(&record)?).map_err(StoreError::from_sled)?;
        Ok(())
    }

    /// The stored resets of a batch, in key order, for followers.
    fn published(&self, agent: &str, agent_id: u32, batch: &v1::Batch, new: &[StoreSeq]) -> Arc<[StoredReset]> {
        let new: HashSet<StoreSeq> = new.iter().copied().collect();
        let mut resets: Vec<StoredReset> = batch
            .events
            .iter()
            .filter_map(|event| match &event.kind {
                Some(v1::event::Kind::Reset(rst)) => {
                    let key = FlowKey::new(
                        endpoint(rst.src.as_ref(), 0, "src").ok()?,
                        endpoint(rst.dst.as_ref(), 0, "dst").ok()?,
                    );
                    let seq = StoreSeq { ts_ns: rst.ts_ns, agent_id, id: keys::reset_id(rst) };
                    new.contains(&seq).then(|| StoredReset { agent: agent.to_string(), key, event: rst.clone(), seq })
                }
                _ => None,
            })
            .collect();
        resets.sort_by_key(|r| r.seq);
        resets.dedup_by_key(|r| r.seq);
        resets.into()
    }

    /// Moves a connection index of an earlier version (one sled key per entry, in the tree
    /// `conn`) into runs: rebuilt from the record trees in one scan, made durable, and only then
    /// is the old tree dropped (an interrupted move starts again at the next open).
    pub(super) fn migrate_conn_index(&self) -> Result<(), StoreError> {
        let db = &self.inner.db;
        if !db.tree_names().iter().any(|name| name.as_ref() == b"conn") {
            return Ok(());
        }
        let legacy = db.open_tree("conn")?;
        if !legacy.is_empty() {
            tracing::info!("Rebuilding the connection index in the current layout.");
            let _writer = self.writer();
            let batch_size = self.inner.config.conn_index_memory_entries.max(1);
            let mut entries = Vec::new();
            for kind in [KIND_FLOW, KIND_RESET, KIND_OPEN] {
                for item in self.tree(kind).range(FIRST_RECORD_KEY.to_vec()..) {
                    let (k, v) = item?;
                    let (Some(seq), Some((header, _))) = (StoreSeq::from_bytes(&k), ValueHeader::decode(&v)) else {
                        continue;
                    };
                    entries.push(conn_key(&header.key, kind, &seq));
                    if entries.len() >= batch_size {
                        self.inner.conn.write_runs(std::mem::take(&mut entries))?;
                    }
                }
            }
            self.inner.conn.write_runs(entries)?;
            self.flush()?;
        }
        drop(legacy);
        db.drop_tree("conn")?;
        Ok(())
    }
}

impl Store {
    /// Whether the record `key` of `kind` is stored; reads the agent's keys of that second once
    /// per batch (`near` caches them).
    fn stored_near(
        &self,
        near: &mut HashMap<(u8, i64, u32), HashSet<[u8; RECORD_KEY_LEN]>>,
        kind: u8,
        key: &[u8; RECORD_KEY_LEN],
    ) -> Result<bool, StoreError> {
        let seq = StoreSeq::from_bytes(key).unwrap_or_default();
        let keys = match near.entry((kind, seq.ts_ns.div_euclid(1_000_000_000), seq.agent_id)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.tree(kind).keys_near(key)?),
        };
        Ok(keys.contains(key))
    }
}

fn tally_of(writer: &Writer, kind: u8, agent_id: u32) -> Tally {
    writer.tallies.get(&(kind, agent_id)).copied().unwrap_or(Tally::EMPTY)
}

/// Takes a fresh session id (needs the writer lock).
fn new_session_id(writer: &mut Writer) -> Result<u32, StoreError> {
    let id = writer.next_session_id;
    writer.next_session_id =
        id.checked_add(1).ok_or_else(|| StoreError::Corrupt("session ids exhausted".to_string()))?;
    Ok(id)
}
