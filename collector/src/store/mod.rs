//! Durable storage of what agents report: the only module that knows sled.
//!
//! # Why sled
//! An embedded, ordered key-value store with multi-tree transactions and an explicit `flush`
//! (fsync) is all the collector needs: no server to run, range scans in key order, and a clear
//! point after which an acknowledgement survives `kill -9`.
//!
//! # Trees and key layout (all integers big-endian, so byte order is numeric order)
//! | tree | key | value |
//! |---|---|---|
//! | `resets` | ts (i64, sign bit flipped) 8 · agent id 4 · event identity digest 16 | header · prost `RstEvent` |
//! | `flows` | the same, with the flow's `end_ns` as ts | header · prost `FlowSummary` |
//! | `conn` | `FlowKey::to_bytes()` 36 · kind 1 (0 flow, 1 reset) · record key 28 | empty |
//! | `sessions` | len(agent) 4 · agent · boot id | session id 4 · durable batch seq 8 |
//! | `agent_ids` | agent name | agent id 4 |
//! | `agents` | agent name | JSON [`AgentRecord`] |
//! | `meta` | `resets`, `flows` | counters 8 |
//!
//! The record key ([`StoreSeq`]) starts with time, so a `since`/`until` query is one short range
//! scan, `last N` is the same scan backwards, and retention by age deletes a key prefix range.
//! Agent ids (interned names) keep the key short and let a query drop other agents' records
//! without reading their values. The 40-byte value header (version, flow key, cause, flags)
//! carries everything the other filters need, so only returned events are decoded.
//!
//! # Idempotence per event
//! The rest of the key is a digest of the event's identity (for a reset: its header fields and
//! the connection's packet counts; for a flow: endpoints and start, see `keys::reset_id`), not of
//! the batch it came in. An agent restarted in the middle of a capture file reads it again from
//! the start and sends events the collector already has, in new batches; they land on their
//! existing keys and are neither stored nor counted twice. Records written by versions that keyed
//! by (session, batch, index) stay readable; only a re-send across that upgrade could duplicate.
//!
//! The `conn` index exists because the question "what did every vantage point see of this
//! connection" must not scan time: its keys start with the direction-free flow key, so one
//! prefix scan finds every flow and reset of a 4-tuple from every agent.
//!
//! # Durability
//! A batch's records, the index entries, the counters, the agent record and the session's new
//! durable batch number are written in one sled transaction, then `Db::flush` fsyncs before
//! [`Appended::Stored`] is returned. Keys are deterministic (derived from the events), so even a
//! retry of a batch whose transaction never committed writes the same keys.
//! Writers are serialised by a mutex: ingest is bounded by fsync, not by the transaction.

mod keys;
mod query;
mod retention;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use rstscope_proto::{v1, Endpoint, FlowKey};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

pub use keys::{ParseStoreSeqError, StoreSeq};
pub use query::{cause_name, flag_letters, parse_flag_letters, ConnectionView, ResetQuery, StoredReset, CAUSE_NAMES};
pub use retention::RetentionReport;

use keys::{conn_key, session_key, SessionValue, ValueHeader, KIND_FLOW, KIND_RESET};

/// Where and how much to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Directory of the sled database (created if missing).
    pub dir: PathBuf,
    /// Resets and flows older than this (event time against `now`) are removed. Default 7 days.
    pub retention: Duration,
    /// When the database grows past this many bytes on disk, the oldest records are removed.
    /// Default 20 GiB.
    pub max_bytes: u64,
}

impl StoreConfig {
    /// Defaults (7 days, 20 GiB) for a database in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig { dir: dir.into(), retention: Duration::from_secs(7 * 24 * 3600), max_bytes: 20 << 30 }
    }
}

/// What went wrong in the store. Nothing is acknowledged when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption detected by sled, unsupported use).
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// The file system failed outside sled.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The disk (or quota) is full; the write was not made durable.
    #[error("storage is full; nothing was stored (free space or lower the retention): {0}")]
    DiskFull(std::io::Error),
    /// A stored value is not what this version wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The caller passed something the store refuses to keep (a bad endpoint, an unknown cause).
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl StoreError {
    /// `sled::Error` with the disk-full case picked out, so the message says what to do.
    fn from_sled(error: sled::Error) -> StoreError {
        match error {
            sled::Error::Io(io) if is_disk_full(&io) => StoreError::DiskFull(io),
            other => StoreError::Sled(other),
        }
    }

    fn from_transaction(error: TransactionError<StoreError>) -> StoreError {
        match error {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::from_sled(e),
        }
    }
}

/// ENOSPC or EDQUOT; `ErrorKind::StorageFull` needs a newer Rust than our MSRV.
fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(28 | 122))
}

/// The outcome of [`Store::append_batch`]. Each carries the session's durable batch number
/// after the call, which is what the collector acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The batch was the next one; it is now durable.
    Stored {
        /// Equals the batch's seq.
        durable_seq: u64,
    },
    /// The batch was already durable; nothing was written.
    Duplicate {
        /// The durable batch number (>= the batch's seq).
        durable_seq: u64,
    },
    /// Batches are missing before this one; nothing was written. The agent must resend from
    /// `durable_seq + 1`.
    Gap {
        /// The durable batch number (< the batch's seq - 1).
        durable_seq: u64,
    },
}

/// What the collector knows of one agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentRecord {
    /// Unique agent name.
    pub name: String,
    /// Host name of its machine.
    pub host_name: String,
    /// Its software version.
    pub software_version: String,
    /// Boot id of its latest session.
    pub boot_id: String,
    /// First hello or batch, ns since the epoch (collector clock).
    pub first_seen_ns: i64,
    /// Latest hello or batch (collector clock).
    pub last_seen_ns: i64,
    /// Highest watermark it reported (agent clock); 0 if none.
    pub watermark_ns: i64,
    /// Resets and flows of it currently stored.
    pub events: u64,
    /// Packets its capture or interface dropped (sum of its loss reports).
    pub capture_drops: u64,
    /// Events it dropped because its spool was full (sum of its loss reports).
    pub events_dropped: u64,
    /// Durable batch number of its latest session.
    pub durable_seq: u64,
    /// The host's addresses from its hello (to tell local from remote endpoints).
    #[serde(default)]
    pub local_addresses: Vec<IpAddr>,
}

/// Size of the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStatus {
    /// Stored RST events.
    pub resets: u64,
    /// Stored flow summaries.
    pub flows: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Known agents.
    pub agents: u32,
    /// Stored values skipped as undecodable since the store was opened.
    pub corrupt_skipped: u64,
}

/// The collector's durable store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    config: StoreConfig,
    db: sled::Db,
    resets: sled::Tree,
    flows: sled::Tree,
    conn: sled::Tree,
    sessions: sled::Tree,
    agent_ids: sled::Tree,
    agents: sled::Tree,
    meta: sled::Tree,
    /// Serialises writers; holds the next session id.
    writer: Mutex<Writer>,
    names: RwLock<AgentNames>,
    corrupt_skipped: AtomicU64,
    /// New durable resets, one message per batch, for followers.
    new_resets: tokio::sync::broadcast::Sender<Arc<[StoredReset]>>,
}

/// Batches a follower may fall behind by before it is told it lagged.
const FOLLOW_CAPACITY: usize = 1024;

struct Writer {
    next_session_id: u32,
}

/// Interned agent names, loaded at open.
#[derive(Default)]
struct AgentNames {
    by_name: HashMap<String, u32>,
    by_id: HashMap<u32, String>,
}

impl AgentNames {
    fn id(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The name of `id`, or `#id` if unknown (never happens unless the `agent_ids` tree is damaged).
    fn name(&self, id: u32) -> String {
        self.by_id.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
    }
}

const META_RESETS: &[u8] = b"resets";
const META_FLOWS: &[u8] = b"flows";

/// One event of a batch, checked and encoded, waiting for its key.
struct Prepared {
    /// Identity digest (part of the key, so an event sent again writes the same key).
    id: u128,
    kind: u8,
    ts_ns: i64,
    key: FlowKey,
    value: Vec<u8>,
}

/// Everything a batch changes besides its records.
#[derive(Default)]
struct BatchEffects {
    resets: u64,
    flows: u64,
    watermark_ns: Option<i64>,
    capture_drops: u64,
    events_dropped: u64,
}

impl Store {
    /// Opens (or creates) the database in `config.dir`.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&config.dir)?;
        let db = sled::Config::new().path(&config.dir).open().map_err(StoreError::from_sled)?;
        let tree = |name: &str| db.open_tree(name).map_err(StoreError::from_sled);
        let (resets, flows, conn) = (tree("resets")?, tree("flows")?, tree("conn")?);
        let (sessions, agent_ids, agents, meta) =
            (tree("sessions")?, tree("agent_ids")?, tree("agents")?, tree("meta")?);

        let mut names = AgentNames::default();
        for item in agent_ids.iter() {
            let (k, v) = item?;
            let (Ok(name), Ok(id)) = (String::from_utf8(k.to_vec()), <[u8; 4]>::try_from(v.as_ref())) else {
                return Err(StoreError::Corrupt(format!("agent_ids entry {k:?}")));
            };
            let id = u32::from_be_bytes(id);
            names.by_id.insert(id, name.clone());
            names.by_name.insert(name, id);
        }
        let mut next_session_id = 1;
        for item in sessions.iter() {
            let (k, v) = item?;
            let session =
                SessionValue::from_bytes(&v).ok_or_else(|| StoreError::Corrupt(format!("session entry {k:?}")))?;
            next_session_id = next_session_id.max(session.session_id.saturating_add(1));
        }
        Ok(Store {
            inner: Arc::new(Inner {
                config,
                db,
                resets,
                flows,
                conn,
                sessions,
                agent_ids,
                agents,
                meta,
                writer: Mutex::new(Writer { next_session_id }),
                names: RwLock::new(names),
                corrupt_skipped: AtomicU64::new(0),
                new_resets: tokio::sync::broadcast::channel(FOLLOW_CAPACITY).0,
            }),
        })
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Records an agent's hello (creates or updates its record) and returns the durable batch
    /// number of its `(agent_name, boot_id)` session: 0 for a new session.
    pub fn hello(&self, hello: &v1::AgentHello, now_ns: i64) -> Result<u64, StoreError> {
        let local_addresses = hello
            .local_addresses
            .iter()
            .map(|bytes| ip_from_bytes(bytes).ok_or_else(|| invalid_ip("local address", bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        let writer = self.writer();
        self.intern_agent(&hello.agent_name)?;
        let durable_seq = self.session(&hello.agent_name, &hello.boot_id)?.map_or(0, |s| s.durable_seq);
        let mut record = self.agent_record(&hello.agent_name)?.unwrap_or_else(|| AgentRecord {
            name: hello.agent_name.clone(),
            first_seen_ns: now_ns,
            ..AgentRecord::default()
        });
        record.host_name.clone_from(&hello.host_name);
        record.software_version.clone_from(&hello.software_version);
        record.boot_id.clone_from(&hello.boot_id);
        record.local_addresses = local_addresses;
        record.last_seen_ns = now_ns;
        record.durable_seq = durable_seq;
        self.inner
            .agents
            .insert(hello.agent_name.as_bytes(), encode_record(&record)?)
            .map_err(StoreError::from_sled)?;
        drop(writer);
        // The number may come from a batch another stream committed but has not flushed yet;
        // the agent discards its spool up to it, so it must be durable first.
        self.flush()?;
        Ok(durable_seq)
    }

    /// Stores the batch `batch.seq` of the session `(agent, boot_id)` if it is the next one,
    /// durably (fsync) before returning [`Appended::Stored`].
    ///
    /// A batch at or below the durable number is a [`Appended::Duplicate`], one beyond the next
    /// a [`Appended::Gap`]; neither writes anything. An event with an endpoint that is not 4 or 16
    /// bytes rejects the whole batch with [`StoreError::Invalid`]. Resets and flows already stored
    /// for the agent (same time and identity, see the module notes) are skipped, not counted again.
    pub fn append_batch(
        &self,
        agent: &str,
        boot_id: &str,
        batch: &v1::Batch,
        now_ns: i64,
    ) -> Result<Appended, StoreError> {
        let (prepared, mut effects) = prepare(batch)?;
        let mut writer = self.writer();
        let session = self.session(agent, boot_id)?;
        let durable_seq = session.map_or(0, |s| s.durable_seq);
        if batch.seq <= durable_seq {
            drop(writer);
            // The earlier Stored may still be flushing in another thread: an ack must be durable.
            self.flush()?;
            return Ok(Appended::Duplicate { durable_seq });
        }
        if batch.seq != durable_seq + 1 {
            return Ok(Appended::Gap { durable_seq });
        }
        let agent_id = self.intern_agent(agent)?;
        let session_id = match session {
            Some(s) => s.session_id,
            None => new_session_id(&mut writer)?,
        };

        let mut record_batch = [sled::Batch::default(), sled::Batch::default()];
        let mut conn_batch = sled::Batch::default();
        // Writers are serialised, so what is stored cannot change between this check and the
        // transaction; `seen` catches an event repeated within the batch itself.
        let mut seen = std::collections::HashSet::with_capacity(prepared.len());
        for p in &prepared {
            let seq = StoreSeq { ts_ns: p.ts_ns, agent_id, id: p.id };
            let record_key = seq.to_bytes();
            let tree = if p.kind == KIND_RESET { &self.inner.resets } else { &self.inner.flows };
            if !seen.insert((p.kind, record_key)) || tree.contains_key(record_key)? {
                if p.kind == KIND_RESET {
                    effects.resets -= 1;
                } else {
                    effects.flows -= 1;
                }
                continue;
            }
            record_batch[usize::from(p.kind)].insert(&record_key[..], p.value.as_slice());
            conn_batch.insert(&conn_key(&p.key, p.kind, &seq)[..], &[][..]);
        }
        let [flow_batch, reset_batch] = record_batch;
        let session_value = SessionValue { session_id, durable_seq: batch.seq }.to_bytes();
        let session_key = session_key(agent, boot_id);
        let i = &self.inner;
        (&i.resets, &i.flows, &i.conn, &i.sessions, &i.agents, &i.meta)
            .transaction(|(t_resets, t_flows, t_conn, t_sessions, t_agents, t_meta)| {
                t_resets.apply_batch(&reset_batch)?;
                t_flows.apply_batch(&flow_batch)?;
                t_conn.apply_batch(&conn_batch)?;
                t_sessions.insert(session_key.as_slice(), &session_value[..])?;
                add_counter(t_meta, META_RESETS, effects.resets as i64)?;
                add_counter(t_meta, META_FLOWS, effects.flows as i64)?;
                let fresh = || AgentRecord { name: agent.to_string(), first_seen_ns: now_ns, ..AgentRecord::default() };
                let mut record = match t_agents.get(agent.as_bytes())? {
                    // A damaged record must not block the agent's ingest: start it afresh.
                    Some(bytes) => decode_record(agent, &bytes).unwrap_or_else(|_| {
                        self.corrupt("agents", agent.as_bytes(), "undecodable agent record");
                        fresh()
                    }),
                    None => fresh(),
                };
                record.boot_id = boot_id.to_string();
                record.durable_seq = batch.seq;
                record.last_seen_ns = now_ns;
                record.events = record.events.saturating_add(effects.resets + effects.flows);
                record.capture_drops = record.capture_drops.saturating_add(effects.capture_drops);
                record.events_dropped = record.events_dropped.saturating_add(effects.events_dropped);
                if let Some(w) = effects.watermark_ns {
                    record.watermark_ns = record.watermark_ns.max(w);
                }
                let bytes = encode_record(&record).map_err(ConflictableTransactionError::Abort)?;
                t_agents.insert(agent.as_bytes(), bytes)?;
                Ok(())
            })
            .map_err(StoreError::from_transaction)?;
        drop(writer);
        self.flush()?;
        if self.inner.new_resets.receiver_count() > 0 && effects.resets > 0 {
            self.publish(agent, agent_id, batch);
        }
        Ok(Appended::Stored { durable_seq: batch.seq })
    }

    /// New resets as they become durable, one message per stored batch (time order within
    /// it). Never blocks ingest: a follower that falls more than 1024 batches behind gets
    /// `RecvError::Lagged` and should say so to its client.
    ///
    /// To list and then follow without a hole, subscribe first, then call [`Store::resets`];
    /// a batch stored in between arrives both ways; skip subscription items whose `seq` was
    /// listed. Filter with [`ResetQuery::matches`].
    pub fn subscribe_resets(&self) -> tokio::sync::broadcast::Receiver<Arc<[StoredReset]>> {
        self.inner.new_resets.subscribe()
    }

    fn publish(&self, agent: &str, agent_id: u32, batch: &v1::Batch) {
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
                    Some(StoredReset { agent: agent.to_string(), key, event: rst.clone(), seq })
                }
                _ => None,
            })
            .collect();
        resets.sort_by_key(|r| r.seq);
        // An error only means every follower left meanwhile.
        let _ = self.inner.new_resets.send(resets.into());
    }

    /// Every known agent, in name order.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.agents.iter() {
            let (k, v) = item?;
            match decode_record(&String::from_utf8_lossy(&k), &v) {
                Ok(record) => out.push(record),
                Err(_) => self.corrupt("agents", &k, "undecodable agent record"),
            }
        }
        Ok(out)
    }

    /// Counts and size. Cheap: counters are kept, not counted.
    pub fn status(&self) -> Result<StoreStatus, StoreError> {
        Ok(StoreStatus {
            resets: read_counter(&self.inner.meta, META_RESETS)?,
            flows: read_counter(&self.inner.meta, META_FLOWS)?,
            bytes: self.inner.db.size_on_disk().map_err(StoreError::from_sled)?,
            agents: u32::try_from(self.inner.agents.len()).unwrap_or(u32::MAX),
            corrupt_skipped: self.inner.corrupt_skipped.load(Ordering::Relaxed),
        })
    }

    /// Makes everything written so far durable (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush().map_err(StoreError::from_sled)?;
        Ok(())
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave sled half-written (transactions), so the
        // lock stays usable.
        self.inner.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn names(&self) -> RwLockReadGuard<'_, AgentNames> {
        self.inner.names.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The agent's id, allocating one on first sight. Call with the writer lock held.
    fn intern_agent(&self, name: &str) -> Result<u32, StoreError> {
        if let Some(id) = self.names().id(name) {
            return Ok(id);
        }
        let mut names = self.inner.names.write().unwrap_or_else(PoisonError::into_inner);
        let id = names.by_id.keys().max().map_or(1, |max| max + 1);
        // Written (not yet flushed) before any record that uses it; sled recovers writes in
        // order, so a durable record never refers to a lost id.
        self.inner.agent_ids.insert(name.as_bytes(), &id.to_be_bytes()).map_err(StoreError::from_sled)?;
        names.by_id.insert(id, name.to_string());
        names.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    fn session(&self, agent: &str, boot_id: &str) -> Result<Option<SessionValue>, StoreError> {
        match self.inner.sessions.get(session_key(agent, boot_id))? {
            None => Ok(None),
            Some(v) => SessionValue::from_bytes(&v)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt(format!("session of agent {agent:?} boot {boot_id:?}"))),
        }
    }

    fn agent_record(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        match self.inner.agents.get(name.as_bytes())? {
            None => Ok(None),
            Some(bytes) => match decode_record(name, &bytes) {
                Ok(record) => Ok(Some(record)),
                Err(_) => {
                    // Start afresh rather than refusing the agent forever.
                    self.corrupt("agents", name.as_bytes(), "undecodable agent record");
                    Ok(None)
                }
            },
        }
    }

    /// Counts and logs a value that failed to decode; callers skip it.
    fn corrupt(&self, tree: &str, key: &[u8], what: &str) {
        self.inner.corrupt_skipped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(tree, key = ?key, what, "Skipped a corrupt stored value.");
    }
}

/// Takes a fresh session id (needs the writer lock).
fn new_session_id(writer: &mut Writer) -> Result<u32, StoreError> {
    let id = writer.next_session_id;
    writer.next_session_id =
        id.checked_add(1).ok_or_else(|| StoreError::Corrupt("session ids exhausted".to_string()))?;
    Ok(id)
}

/// Checks and encodes a batch's events; nothing is written if any is invalid.
fn prepare(batch: &v1::Batch) -> Result<(Vec<Prepared>, BatchEffects), StoreError> {
    use v1::event::Kind;
    let mut prepared = Vec::with_capacity(batch.events.len());
    let mut effects = BatchEffects::default();
    for (i, event) in batch.events.iter().enumerate() {
        match &event.kind {
            Some(Kind::Reset(rst)) => {
                let src = endpoint(rst.src.as_ref(), i, "src")?;
                let dst = endpoint(rst.dst.as_ref(), i, "dst")?;
                let key = FlowKey::new(src, dst);
                let header = ValueHeader {
                    key,
                    cause: u8::try_from(rst.cause).unwrap_or(u8::MAX),
                    flags: (rst.flags & 0xfff) as u16,
                };
                prepared.push(Prepared {
                    id: keys::reset_id(rst),
                    kind: KIND_RESET,
                    ts_ns: rst.ts_ns,
                    key,
                    value: header.encode_with(rst),
                });
                effects.resets += 1;
            }
            Some(Kind::Flow(flow)) => {
                let orig = endpoint(flow.orig.as_ref(), i, "orig")?;
                let resp = endpoint(flow.resp.as_ref(), i, "resp")?;
                let key = FlowKey::new(orig, resp);
                let header = ValueHeader { key, cause: 0, flags: 0 };
                prepared.push(Prepared {
                    id: keys::flow_id(flow),
                    kind: KIND_FLOW,
                    ts_ns: flow.end_ns,
                    key,
                    value: header.encode_with(flow),
                });
                effects.flows += 1;
            }
            Some(Kind::Loss(loss)) => {
                effects.capture_drops =
                    effects.capture_drops.saturating_add(loss.capture_dropped).saturating_add(loss.interface_dropped);
                effects.events_dropped = effects.events_dropped.saturating_add(loss.events_dropped);
            }
            Some(Kind::Watermark(w)) => {
                effects.watermark_ns = Some(effects.watermark_ns.map_or(w.ts_ns, |m| m.max(w.ts_ns)));
            }
            // Connection identities are not stored yet (correlation, issue 4).
            Some(Kind::Open(_)) => {}
            None => return Err(StoreError::Invalid(format!("event {i} of the batch is empty"))),
        }
    }
    Ok((prepared, effects))
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn invalid_ip(what: &str, bytes: &[u8]) -> StoreError {
    StoreError::Invalid(format!("{what} is {} bytes, not an IPv4 (4) or IPv6 (16) address", bytes.len()))
}

fn endpoint(ep: Option<&v1::Endpoint>, index: usize, field: &str) -> Result<Endpoint, StoreError> {
    let what = format!("event {index}: {field}");
    let ep = ep.ok_or_else(|| StoreError::Invalid(format!("{what} is missing")))?;
    let ip = ip_from_bytes(&ep.ip).ok_or_else(|| invalid_ip(&what, &ep.ip))?;
    let port = u16::try_from(ep.port).map_err(|_| StoreError::Invalid(format!("{what} port {} > 65535", ep.port)))?;
    Ok(Endpoint::new(ip, port))
}

fn encode_record(record: &AgentRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(format!("cannot encode agent record: {e}")))
}

fn decode_record(name: &str, bytes: &[u8]) -> Result<AgentRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("agent record of {name:?}: {e}")))
}

fn read_counter(meta: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(meta.get(key)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map_or(0, u64::from_be_bytes))
}

/// Adds `delta` (saturating at 0) to a counter inside a transaction.
fn add_counter(
    meta: &TransactionalTree,
    key: &[u8],
    delta: i64,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    if delta == 0 {
        return Ok(());
    }
    let old = meta.get(key)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map_or(0, u64::from_be_bytes);
    let new = old.saturating_add_signed(delta);
    meta.insert(key, &new.to_be_bytes())?;
    Ok(())
}
