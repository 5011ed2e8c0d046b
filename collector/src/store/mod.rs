//! Durable storage of what agents report, and of the correlator's merged reports: the only
//! module that knows sled.
//!
//! # Why sled
//! An embedded, ordered key-value store with atomic single-tree batches and an explicit `flush`
//! (fsync) is all the collector needs: no server to run, range scans in key order, and a clear
//! point after which an acknowledgement survives `kill -9`.
//!
//! # Trees and key layout (all integers big-endian, so byte order is numeric order)
//! | tree | key | value |
//! |---|---|---|
//! | `resets` | ts (i64, sign bit flipped) 8 · agent id 4 · event identity digest 16 | header · prost `RstEvent` |
//! | `flows` | the same, with the flow's `end_ns` as ts | header · prost `FlowSummary` |
//! | `opens` | the same, with the connection's `start_ns` as ts | header · prost `ConnectionOpen` |
//! | `losses` | the same, with the loss period's `until_ns` as ts | version · prost `CaptureLoss` |
//! | `conn_log`, `conn_runs` | the connection index, see `conn_index.rs`; an entry is hour 4 · `FlowKey::to_bytes()` 36 · kind 1 (0 flow, 1 reset, 2 open) · record key 28 | |
//! | `sessions` | len(agent) 4 · agent · boot id | session id 4 · durable batch seq 8 · watermark 8 · since 8 |
//! | `agent_ids` | agent name | agent id 4 |
//! | `agents` | agent name | JSON [`AgentRecord`] |
//! | `meta` | `size_cap_records`, `m:` + name ([`Store::set_meta`]) | bytes |
//! | `report_buckets`, `report_pages` | see `reports.rs` | |
//!
//! The four record trees also hold reserved keys below every record key (`0x00 n`: the count,
//! `0x00 a` agent id: that agent's [`keys::Tally`]), written in the *same* atomic batch as the
//! records they count, so counts are exact after any crash without a transaction.
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
//! the start and sends events the collector already has, in new batches; they are found on
//! their existing keys and are neither stored nor counted twice. The look-up is skipped for
//! events newer than anything stored of that agent (the tally's newest time), which is almost
//! every event of a live agent.
//!
//! The connection index exists because the question "what did every vantage point see of this
//! connection" must not scan time: its entries, sorted by hour and then by the direction-free
//! flow key, find every open, flow and reset of a 4-tuple from every agent with a few seeks per
//! stored hour. It is written a batch at a time, not a key per event (see `conn_index.rs`).
//!
//! # Durability without transactions
//! A batch is written as one atomic sled batch per tree, in an order that keeps every crash
//! state consistent: first the connection index entries (an entry whose record is missing is
//! skipped by readers), then each record tree together with its tallies, then the agent record
//! and last the session's durable batch number. A crash anywhere before the last step leaves the
//! batch unacknowledged; the agent resends it, the records already written are recognised by
//! their keys (and were already counted), the rest is written. `Db::flush` (fsync) runs once
//! for all batches written meanwhile by any agent (group commit), and every acknowledgement
//! waits for a flush that began after its batch was written. Writers are serialised by a mutex.

mod append;
mod conn_index;
mod keys;
mod query;
mod records;
mod replay;
mod reports;
mod retention;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use rstscope_proto::{v1, Endpoint};

pub use append::Pending;
pub use keys::{ParseStoreSeqError, StoreSeq};
pub use query::{cause_name, flag_letters, parse_flag_letters, ConnectionView, ResetQuery, StoredReset, CAUSE_NAMES};
pub use replay::EventsSince;
pub use reports::{EncodedReport, ListedBucket, ReportListing};
pub use retention::RetentionReport;

use keys::{
    session_key, SessionValue, Tally, FIRST_RECORD_KEY, KIND_FLOW, KIND_LOSS, KIND_OPEN, KIND_RESET,
    TALLY_AGENT_PREFIX, TALLY_TOTAL_KEY,
};

/// Where and how much to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Directory of the sled database (created if missing).
    pub dir: PathBuf,
    /// Records and reports older than this (event time against `now`) are removed. Default 7 days.
    pub retention: Duration,
    /// When the database grows past this many bytes on disk, the oldest records are removed.
    /// Default 20 GiB.
    pub max_bytes: u64,
    /// Bytes of sled's page cache. Default 256 MiB. sled counts the cache in on-disk bytes;
    /// what it holds in memory is several times larger (measured: a 1 GiB setting reached
    /// 2 GiB of resident memory after 3M events and kept growing, 64 MiB stayed near 400 MiB).
    pub cache_bytes: u64,
    /// Connection index entries held in memory (about 70 bytes each) before they are sorted
    /// and written as a run. Default 524,288 (about 36 MB). More means fewer runs per hour to
    /// seek through on a connection look-up.
    pub conn_index_memory_entries: usize,
}

impl StoreConfig {
    /// Defaults (7 days, 20 GiB, 256 MiB of cache) for a database in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 20 << 30,
            cache_bytes: 256 << 20,
            conn_index_memory_entries: 1 << 19,
        }
    }
}

/// What went wrong in the store. Nothing is acknowledged when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption detected by sled, unsupported use).
    #[error("storage error: {0}")]
    Sled(sled::Error),
    /// The file system failed outside sled.
    #[error("storage I/O error: {0}")]
    Io(std::io::Error),
    /// The disk (or quota) is full; the write was not made durable.
    #[error("storage is full; nothing was stored (free space or lower the retention): {0}")]
    DiskFull(std::io::Error),
    /// A stored value is not what this version wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The caller passed something the store refuses to keep (a bad endpoint, an unknown cause).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// Another process holds the database's lock: most likely another collector on the same
    /// directory.
    #[error(
        "{} is in use by another rstscope-collector (or another process); a data directory serves one collector at a time",
        .0.display()
    )]
    Locked(std::path::PathBuf),
    /// The store is closed for reopening after a storage failure; retry shortly.
    #[error("the store is being reopened after a storage failure; retry shortly")]
    Reopening,
}

impl StoreError {
    /// Whether the database may be unusable until it is reopened: sled stops every later write
    /// with the same error after an I/O failure (a full disk, say), even once there is room.
    pub fn needs_reopen(&self) -> bool {
        matches!(self, StoreError::Sled(_) | StoreError::Io(_) | StoreError::DiskFull(_))
    }
}

impl StoreError {
    /// `sled::Error` with the disk-full case picked out, so the message says what to do.
    fn from_sled(error: sled::Error) -> StoreError {
        match error {
            sled::Error::Io(io) if is_disk_full(&io) => StoreError::DiskFull(io),
            other => StoreError::Sled(other),
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> StoreError {
        StoreError::from_sled(error)
    }
}

impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> StoreError {
        if is_disk_full(&error) {
            StoreError::DiskFull(error)
        } else {
            StoreError::Io(error)
        }
    }
}

/// ENOSPC or EDQUOT. By kind as well as by number: sled hands out copies of an I/O error it
/// met earlier (in its background flush), and its copies keep only the kind.
fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(28 | 122))
        || matches!(error.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
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
    /// The `since_ns` of that watermark: its capture ran without a gap from then (0: unknown).
    #[serde(default)]
    pub watermark_since_ns: i64,
    /// Resets, flows and connection openings of it currently stored.
    pub events: u64,
    /// Packets its capture or interface dropped (sum of its stored loss reports).
    pub capture_drops: u64,
    /// Events it dropped because its spool was full (sum of its stored loss reports).
    pub events_dropped: u64,
    /// Durable batch number of its latest session.
    pub durable_seq: u64,
    /// The host's addresses from its hello (to tell local from remote endpoints).
    #[serde(default)]
    pub local_addresses: Vec<IpAddr>,
}

/// One agent session (agent name and boot id) as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionRecord {
    /// The agent.
    pub agent: String,
    /// The boot id of the session.
    pub boot_id: String,
    /// Its durable batch number.
    pub durable_seq: u64,
    /// Its latest watermark (agent clock); 0 if none.
    pub watermark_ns: i64,
    /// That watermark's `since_ns`; 0 if none or unknown.
    pub since_ns: i64,
}

/// Size of the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStatus {
    /// Stored RST events.
    pub resets: u64,
    /// Stored flow summaries.
    pub flows: u64,
    /// Stored connection openings.
    pub opens: u64,
    /// Stored capture-loss reports.
    pub losses: u64,
    /// Stored merged reset reports.
    pub reports: u64,
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

/// The record trees, indexed by kind (`KIND_FLOW`, `KIND_RESET`, `KIND_OPEN`, `KIND_LOSS`).
const KINDS: [u8; 4] = [KIND_FLOW, KIND_RESET, KIND_OPEN, KIND_LOSS];
const TREE_NAMES: [&str; 4] = ["flows", "resets", "opens", "losses"];

struct Inner {
    config: StoreConfig,
    db: sled::Db,
    /// By kind, see [`KINDS`].
    records: [records::RecordTree; 4],
    conn: conn_index::ConnIndex,
    sessions: sled::Tree,
    agent_ids: sled::Tree,
    agents: sled::Tree,
    meta: sled::Tree,
    reports: reports::ReportTrees,
    /// Serialises writers; holds the tallies.
    writer: Mutex<Writer>,
    /// Serialises writers of the report trees (the correlation's decisions, retention), apart
    /// from `writer`: storing a large decision (a second for 100k reports) must not hold ingest,
    /// and so acknowledgements, back.
    reports_writer: Mutex<()>,
    /// Record counts by kind (copies of the tallies' totals, for lock-free status).
    totals: [AtomicU64; 4],
    names: RwLock<AgentNames>,
    corrupt_skipped: AtomicU64,
    /// Whether a write failed so that the store must be reopened (`FAILED_*`).
    failed: AtomicU8,
    durability: append::Durability,
    /// New durable resets, one message per batch, for followers.
    new_resets: tokio::sync::broadcast::Sender<Arc<[StoredReset]>>,
}

/// Values of `Inner::failed`.
const FAILED_NOT: u8 = 0;
const FAILED_OTHER: u8 = 1;
const FAILED_DISK_FULL: u8 = 2;

/// Batches a follower may fall behind by before it is told it lagged.
const FOLLOW_CAPACITY: usize = 1024;

/// State only writers touch (under the writer lock).
struct Writer {
    next_session_id: u32,
    /// Per (kind, agent id): what the record tree holds of the agent; mirrors its reserved keys.
    tallies: HashMap<(u8, u32), Tally>,
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

impl Store {
    /// Opens (or creates) the database in `config.dir`.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&config.dir)?;
        let db = open_sled(&sled_config(&config.dir).cache_capacity(config.cache_bytes)).map_err(|e| match e {
            StoreError::Sled(sled::Error::Io(io)) if is_lock_taken(&io) => StoreError::Locked(config.dir.clone()),
            other => other,
        })?;
        let tree = |name: &str| db.open_tree(name).map_err(StoreError::from_sled);
        let record_tree = |name: &str| -> Result<records::RecordTree, StoreError> {
            let tree = records::RecordTree::new(tree(name)?);
            let moved = tree.migrate_one_key_per_record()?;
            if moved > 0 {
                tracing::info!(tree = name, records = moved, "Moved records stored one key each into chunks.");
            }
            Ok(tree)
        };
        let records = [
            record_tree(TREE_NAMES[0])?,
            record_tree(TREE_NAMES[1])?,
            record_tree(TREE_NAMES[2])?,
            record_tree(TREE_NAMES[3])?,
        ];
        let (sessions, agent_ids, agents, meta) =
            (tree("sessions")?, tree("agent_ids")?, tree("agents")?, tree("meta")?);
        let conn = conn_index::ConnIndex::open(&db, meta.clone(), config.conn_index_memory_entries)?;
        let reports = reports::ReportTrees::open(&db)?;

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
        let store = Store {
            inner: Arc::new(Inner {
                config,
                db,
                records,
                conn,
                sessions,
                agent_ids,
                agents,
                meta,
                reports,
                writer: Mutex::new(Writer { next_session_id, tallies: HashMap::new() }),
                reports_writer: Mutex::new(()),
                totals: Default::default(),
                names: RwLock::new(names),
                corrupt_skipped: AtomicU64::new(0),
                failed: AtomicU8::new(FAILED_NOT),
                durability: append::Durability::default(),
                new_resets: tokio::sync::broadcast::channel(FOLLOW_CAPACITY).0,
            }),
        };
        store.load_tallies()?;
        store.migrate_conn_index()?;
        Ok(store)
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    fn tree(&self, kind: u8) -> &records::RecordTree {
        &self.inner.records[usize::from(kind)]
    }

    /// Reads every record tree's tallies into memory; rebuilds them (one scan) for a tree
    /// written by a version without tallies.
    fn load_tallies(&self) -> Result<(), StoreError> {
        let mut writer = self.writer();
        for kind in KINDS {
            let tree = self.tree(kind);
            let total = tree.raw().get(TALLY_TOTAL_KEY)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
            let has_records = tree.has_records()?;
            if total.is_none() && has_records {
                tracing::info!(tree = TREE_NAMES[usize::from(kind)], "Counting the records of an older store once.");
                self.rebuild_tally(kind)?;
            }
            let total = tree.raw().get(TALLY_TOTAL_KEY)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
            self.inner.totals[usize::from(kind)].store(total.map_or(0, u64::from_be_bytes), Ordering::Relaxed);
            for item in tree.raw().scan_prefix(TALLY_AGENT_PREFIX) {
                let (k, v) = item?;
                let (Some(id), Some(tally)) = (k.get(2..6), Tally::from_bytes(&v)) else {
                    return Err(StoreError::Corrupt(format!("tally {k:?} of {}", TREE_NAMES[usize::from(kind)])));
                };
                let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
                writer.tallies.insert((kind, id), tally);
            }
        }
        Ok(())
    }

    /// Counts a record tree and writes its tallies (upgrade from a version without them).
    fn rebuild_tally(&self, kind: u8) -> Result<(), StoreError> {
        let tree = self.tree(kind);
        let mut per_agent: HashMap<u32, Tally> = HashMap::new();
        let mut total = 0u64;
        for item in tree.range(FIRST_RECORD_KEY.to_vec()..) {
            let (k, v) = item?;
            let Some(seq) = StoreSeq::from_bytes(&k) else { continue };
            let tally = per_agent.entry(seq.agent_id).or_insert(Tally::EMPTY);
            tally.records += 1;
            tally.newest_ns = tally.newest_ns.max(seq.ts_ns);
            if kind == KIND_LOSS {
                if let Some(loss) = replay::decode_loss(&v) {
                    tally.capture_dropped += loss.capture_dropped.saturating_add(loss.interface_dropped);
                    tally.events_dropped += loss.events_dropped;
                }
            }
            total += 1;
        }
        let mut batch = sled::Batch::default();
        batch.insert(&TALLY_TOTAL_KEY[..], &total.to_be_bytes()[..]);
        for (id, tally) in per_agent {
            batch.insert(&keys::tally_key(id)[..], &tally.to_bytes()[..]);
        }
        tree.raw().apply_batch(batch)?;
        Ok(())
    }

    /// Records an agent's hello (creates or updates its record) and returns the durable batch
    /// number of its `(agent_name, boot_id)` session: 0 for a new session.
    pub fn hello(&self, hello: &v1::AgentHello, now_ns: i64) -> Result<u64, StoreError> {
        self.guarded(|| self.hello_unguarded(hello, now_ns))
    }

    fn hello_unguarded(&self, hello: &v1::AgentHello, now_ns: i64) -> Result<u64, StoreError> {
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
        let generation = self.inner.durability.written();
        drop(writer);
        // The number may come from a batch another stream wrote but has not flushed yet;
        // the agent discards its spool up to it, so it must be durable first.
        self.inner.durability.wait(&self.inner.db, generation)?;
        Ok(durable_seq)
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
        // Counts come from the tallies, which are exact (kept with the records). The writer
        // lock is released before the names are read: writers take it first, then the names.
        let tallies = self.writer().tallies.clone();
        let names = self.names();
        for record in &mut out {
            let Some(id) = names.id(&record.name) else { continue };
            let tally = |kind: u8| tallies.get(&(kind, id)).copied().unwrap_or(Tally::EMPTY);
            record.events = tally(KIND_RESET).records + tally(KIND_FLOW).records + tally(KIND_OPEN).records;
            record.capture_drops = tally(KIND_LOSS).capture_dropped;
            record.events_dropped = tally(KIND_LOSS).events_dropped;
        }
        Ok(out)
    }

    /// Every session of every agent (agent, then boot id, in byte order), with its durable
    /// batch number and latest watermark: what the correlator needs to know which times each
    /// capture can vouch for.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.sessions.iter() {
            let (k, v) = item?;
            let value = SessionValue::from_bytes(&v);
            let parsed = k.get(..4).and_then(|len| {
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                let agent = std::str::from_utf8(k.get(4..4 + len)?).ok()?;
                let boot = std::str::from_utf8(k.get(4 + len..)?).ok()?;
                Some((agent.to_string(), boot.to_string()))
            });
            match (parsed, value) {
                (Some((agent, boot_id)), Some(v)) => out.push(SessionRecord {
                    agent,
                    boot_id,
                    durable_seq: v.durable_seq,
                    watermark_ns: v.watermark_ns,
                    since_ns: v.since_ns,
                }),
                _ => self.corrupt("sessions", &k, "malformed session"),
            }
        }
        Ok(out)
    }

    /// Counts and size. Cheap: counts are kept, not counted.
    pub fn status(&self) -> Result<StoreStatus, StoreError> {
        let total = |kind: u8| self.inner.totals[usize::from(kind)].load(Ordering::Relaxed);
        Ok(StoreStatus {
            resets: total(KIND_RESET),
            flows: total(KIND_FLOW),
            opens: total(KIND_OPEN),
            losses: total(KIND_LOSS),
            reports: self.inner.reports.count(),
            bytes: self.inner.db.size_on_disk().map_err(StoreError::from_sled)?,
            agents: u32::try_from(self.inner.agents.len()).unwrap_or(u32::MAX),
            corrupt_skipped: self.inner.corrupt_skipped.load(Ordering::Relaxed),
        })
    }

    /// Makes everything written so far durable (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.guarded(|| self.inner.durability.flush_now(&self.inner.db))
    }

    /// Runs a write, unless an earlier write of this open store failed in a way that needs a
    /// reopen (then refuses at once, without touching sled); remembers such a failure. sled
    /// refuses every write after its own I/O error anyway, and a flush that races with that
    /// error can wait forever: the store must not call it again until it is reopened.
    fn guarded<T>(&self, write: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        match self.inner.failed.load(Ordering::Acquire) {
            FAILED_NOT => {}
            FAILED_DISK_FULL => return Err(StoreError::DiskFull(std::io::ErrorKind::StorageFull.into())),
            _ => return Err(StoreError::Reopening),
        }
        let result = write();
        if let Err(error) = &result {
            if error.needs_reopen() {
                let failed = if matches!(error, StoreError::DiskFull(_)) { FAILED_DISK_FULL } else { FAILED_OTHER };
                self.inner.failed.store(failed, Ordering::Release);
            }
        }
        result
    }

    /// Stores a small named value (e.g. the correlator's "decided until" time), replacing any
    /// earlier one. Not flushed: it becomes durable with the next flush, and never before
    /// anything written earlier (sled recovers a prefix of its log).
    pub fn set_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.guarded(|| {
            self.inner.meta.insert(meta_key(name), value).map_err(StoreError::from_sled)?;
            self.inner.durability.bump();
            Ok(())
        })
    }

    /// The value [`Store::set_meta`] stored under `name`, if any.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.meta.get(meta_key(name))?.map(|v| v.to_vec()))
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // Every write is ordered to be consistent at any point, so a panic while holding the
        // lock leaves nothing half-done that the next writer could trip over.
        self.inner.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The report trees' writer lock (see [`Inner::reports_writer`]); never taken together
    /// with [`Store::writer`].
    fn reports_writer(&self) -> MutexGuard<'_, ()> {
        self.inner.reports_writer.lock().unwrap_or_else(PoisonError::into_inner)
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

fn meta_key(name: &str) -> Vec<u8> {
    let mut key = b"m:".to_vec();
    key.extend_from_slice(name.as_bytes());
    key
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

/// An event's endpoint; the error names the event and field (formatted only on failure: this
/// runs for every stored event).
fn endpoint(ep: Option<&v1::Endpoint>, index: usize, field: &str) -> Result<Endpoint, StoreError> {
    let what = || format!("event {index}: {field}");
    let ep = ep.ok_or_else(|| StoreError::Invalid(format!("{} is missing", what())))?;
    let ip = ip_from_bytes(&ep.ip).ok_or_else(|| invalid_ip(&what(), &ep.ip))?;
    let port =
        u16::try_from(ep.port).map_err(|_| StoreError::Invalid(format!("{} port {} > 65535", what(), ep.port)))?;
    Ok(Endpoint::new(ip, port))
}

fn encode_record(record: &AgentRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(format!("cannot encode agent record: {e}")))
}

fn decode_record(name: &str, bytes: &[u8]) -> Result<AgentRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("agent record of {name:?}: {e}")))
}

/// sled's log segment size for new stores: 8 MiB. sled writes anything larger than a quarter
/// of a segment (a value, or a leaf node with its 16 or so values) to a file of its own (a
/// "blob"); with the default 512 KiB segments the collector's batch-sized values made most
/// writes blobs, and sled 0.34 can wait forever in a flush after a blob write fails on a full
/// disk. Every value the store writes stays under 64 KiB, so leaves stay under the 2 MiB limit.
const SEGMENT_BYTES: usize = 8 << 20;

/// The sled configuration of the store in `dir`: the segment size it was created with (sled
/// refuses to open a database with another one), or [`SEGMENT_BYTES`] for a new store.
pub(super) fn sled_config(dir: &std::path::Path) -> sled::Config {
    // Text lines followed by a binary checksum: read as bytes.
    let stored = std::fs::read(dir.join("conf")).ok().and_then(|conf| {
        String::from_utf8_lossy(&conf)
            .lines()
            .find_map(|line| line.strip_prefix("segment_size: ").and_then(|n| n.trim().parse::<usize>().ok()))
    });
    sled::Config::new().path(dir).segment_size(stored.unwrap_or(SEGMENT_BYTES))
}

/// Opens a sled database. sled finishes a closed database's last writes on its I/O thread
/// pool, which holds the directory's lock a moment longer: reopening right after a close (a
/// restart in the same process) waits for it, up to 2 s, before reporting the lock as taken.
pub(super) fn open_sled(config: &sled::Config) -> Result<sled::Db, StoreError> {
    let mut attempts = 0;
    loop {
        match config.open() {
            Err(sled::Error::Io(e)) if is_lock_taken(&e) && attempts < 100 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result.map_err(StoreError::from_sled),
        }
    }
}

/// Whether opening failed because another process holds the database's lock. sled 0.34 reports
/// it as an `Other` I/O error whose text carries flock's own error (`WouldBlock`); the kind is
/// checked too, for a sled that passes that error on as it is.
fn is_lock_taken(error: &std::io::Error) -> bool {
    let text = error.to_string();
    error.kind() == std::io::ErrorKind::WouldBlock
        || text.contains("could not acquire lock")
        || (error.kind() == std::io::ErrorKind::Other && text.contains("WouldBlock"))
}
