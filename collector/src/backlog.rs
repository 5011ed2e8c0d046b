//! The correlation's backlog: stored batches on their way to the engine, in memory up to a
//! limit and beyond it in files, so that an acknowledgement does not wait for the correlation.
//!
//! Why: the engine sits behind one lock, held by the ticker for a whole decision (tens of
//! milliseconds to seconds under load), and it decides fewer events a second than ingest can
//! store (on 2 cores about 50k against over 200k). Ingest therefore queues every stored batch
//! here and acknowledges at once; whoever takes the engine next ([`crate::service::Hub::correlation`])
//! feeds it the queue first, in the order it was queued. A burst the engine cannot follow used
//! to hold acknowledgements once 200k events were queued (some 100 MB of decoded events);
//! now it goes on to files beside the store (about 200 bytes an event, encoded) and the
//! engine catches up later: agents are acknowledged at the speed of the store, and verdicts
//! come late during such a burst instead of agents spooling. The queue is the correlation's,
//! not the store's: every event in it is durable already, so the files are never synced, and
//! they have no name (`tempfile_in`): a crash leaves nothing behind, and the replay after a
//! restart reads the store from a resume point that never passes the oldest queued event
//! ([`Inbox::oldest_ns`]).
//!
//! The file part is a chain of segments of [`SEGMENT_BYTES`]: a segment is freed once every
//! record in it was taken, so the disk holds about what is queued, not everything that went
//! through while the correlation was behind.
//!
//! Order: the queue is first-in first-out across its three parts. Batches go to memory while
//! nothing waits in the files and memory has room (200k events by default); then to the files
//! until they are drained; if the files cannot take a batch (a write error, or their cap
//! queued: a quarter of `--max-store-gib`, at most [`FILE_BYTES`]) the batch and every later one wait in memory behind them, and acknowledgements wait
//! for room in memory as they did before there were files ([`Inbox::must_wait`],
//! [`Inbox::room`]): memory stays bounded in every case.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prost::Message;
use rstscope_proto::v1;

/// Events held in memory before batches go to the files, by default (about a second of ingest
/// at full speed; some 100 MB decoded). See [`crate::service::Limits::correlation_memory_events`].
pub const MEMORY_EVENTS: usize = 200_000;

/// The files hold at most this many queued bytes (some 20M events), and at most a quarter of
/// the store's size limit ([`file_bytes_for_store`]); beyond it batches wait in memory and
/// acknowledgements wait for room.
pub const FILE_BYTES: u64 = 4 << 30;

/// The files' cap for a store limited to `store_max_bytes` (`--max-store-gib`): a quarter of
/// it, at most [`FILE_BYTES`]. The queue lives beside the store only while the correlation is
/// behind, but it is on the same disk, and a limit the user set for the data directory must
/// not be overrun by 4 GiB of queue: a small store gets a short queue, and acknowledgements wait
/// for the correlation sooner.
pub fn file_bytes_for_store(store_max_bytes: u64) -> u64 {
    (store_max_bytes / 4).clamp(1, FILE_BYTES)
}

/// Size of one file segment.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// A taker reads at least this many events from the files at once (else half the memory limit).
const MIN_TAKE_EVENTS: usize = 10_000;

/// Whether an event may make something decidable: a RST, or a watermark.
pub fn is_decisive(e: &v1::Event) -> bool {
    matches!(e.kind, Some(v1::event::Kind::Reset(_)) | Some(v1::event::Kind::Watermark(_)))
}

/// The time the store files an event under, which a replay from the store starts at (reset
/// `ts_ns`, flow `end_ns`, opening `start_ns`, loss `until_ns`; see `Store::events_since`).
/// Watermarks are not replayed as events.
pub(crate) fn filed_at(e: &v1::Event) -> Option<i64> {
    use v1::event::Kind;
    match e.kind.as_ref()? {
        Kind::Reset(r) => Some(r.ts_ns),
        Kind::Flow(f) => Some(f.end_ns),
        Kind::Open(o) => Some(o.start_ns),
        Kind::Loss(l) => Some(l.until_ns),
        Kind::Watermark(_) => None,
    }
}

/// The oldest of `events` by [`filed_at`], and `oldest` so far.
fn older(oldest: Option<i64>, events: &[v1::Event]) -> Option<i64> {
    events.iter().filter_map(filed_at).chain(oldest).min()
}

/// One agent's stored batch.
pub type Queued = (Arc<str>, Vec<v1::Event>);

/// Stored batches queued for the engine (see the module docs).
pub struct Inbox {
    state: std::sync::Mutex<State>,
    /// Where the files go (`None`: no files; batches beyond the memory limit wait).
    file_dir: Option<PathBuf>,
    /// Events held in memory before batches go to the files.
    memory_events: usize,
    /// Events a taker reads from the files at once (half of `memory_events`, at least
    /// [`MIN_TAKE_EVENTS`]): the engine is fed in steps of about this size, so decisions (and
    /// their reports) keep coming while a long backlog drains.
    take_events: usize,
    /// [`SEGMENT_BYTES`] and [`FILE_BYTES`] (smaller in tests).
    segment_bytes: u64,
    file_bytes: u64,
    /// Batches written to the files since the start.
    filed_batches: AtomicU64,
    /// Batches lost since the start: taken from the files but not readable.
    lost_batches: AtomicU64,
    /// Notified when memory was taken.
    room: tokio::sync::Notify,
    /// The ticker's wake-up ([`crate::live::LiveCorrelation::wake`]).
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct State {
    /// Oldest part, in memory.
    head: VecDeque<Queued>,
    head_events: usize,
    head_oldest: Option<i64>,
    /// Then the files' records, oldest first.
    file: Option<Spill>,
    /// Newest part, in memory: batches the files could not take, fed after them.
    tail: VecDeque<Queued>,
    tail_events: usize,
    tail_oldest: Option<i64>,
    /// The last file error, logged once until the files work again.
    file_failing: bool,
}

/// The file part of the queue: records appended to the newest segment, read from the front.
struct Spill {
    /// The segment being appended to, and its length.
    segment: Arc<File>,
    segment_end: u64,
    /// Each record with its segment: a segment is closed (its space freed) when the last
    /// record in it was read by its taker and a newer segment is being appended to.
    records: VecDeque<(Arc<File>, Record)>,
    events: usize,
    bytes: u64,
    /// The oldest event ever written to these files (not lowered as records are taken: the
    /// resume point is held back a little longer than needed, never too little).
    oldest: Option<i64>,
}

/// Where one batch is in its segment.
#[derive(Clone, Copy)]
struct Record {
    offset: u64,
    len: u32,
    events: u32,
}

/// What [`Inbox::take`] took: memory batches, or file records read and decoded by
/// [`Taken::into_batches`] after the queue's lock is released.
pub struct Taken {
    head: VecDeque<Queued>,
    records: Vec<(Arc<File>, Record)>,
}

/// A file record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("correlation backlog file: {0}")]
pub struct BacklogError(String);

impl Taken {
    /// The batches in queue order, and how many records could not be read back (the files
    /// are the collector's own, so this means a failing disk) with the first such error; the
    /// others are read all the same.
    pub fn into_batches(self) -> (Vec<Queued>, usize, Option<BacklogError>) {
        let mut out: Vec<Queued> = self.head.into_iter().collect();
        let (mut lost, mut first_error) = (0, None);
        for (file, record) in self.records {
            match read_record(&file, record) {
                Ok(batch) => out.push(batch),
                Err(error) => {
                    lost += 1;
                    first_error.get_or_insert(error);
                }
            }
        }
        (out, lost, first_error)
    }

    /// Whether nothing was taken.
    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.records.is_empty()
    }
}

/// A record: agent name length (1 byte), the name, then each event length-delimited.
fn encode_record(agent: &str, events: &[v1::Event]) -> Vec<u8> {
    // Checked at the hello: at most 64 characters.
    debug_assert!(agent.len() <= 255, "agent name of {} bytes", agent.len());
    let name = agent.as_bytes();
    let body: usize = events.iter().map(|e| e.encoded_len() + 10).sum();
    let mut out = Vec::with_capacity(1 + name.len() + body);
    out.push(name.len().min(255) as u8);
    out.extend_from_slice(&name[..name.len().min(255)]);
    for e in events {
        // A Vec grows as needed: encoding into it cannot fail.
        let _ = e.encode_length_delimited(&mut out);
    }
    out
}

fn read_record(file: &File, record: Record) -> Result<Queued, BacklogError> {
    let mut bytes = vec![0u8; record.len as usize];
    file.read_exact_at(&mut bytes, record.offset).map_err(|e| BacklogError(format!("reading: {e}")))?;
    let (&name_len, rest) = bytes.split_first().ok_or_else(|| BacklogError("empty record".into()))?;
    let name = rest.get(..usize::from(name_len)).ok_or_else(|| BacklogError("short record".into()))?;
    let agent: Arc<str> =
        Arc::from(std::str::from_utf8(name).map_err(|_| BacklogError("agent name is not UTF-8".into()))?);
    let mut body = &rest[usize::from(name_len)..];
    let mut events = Vec::with_capacity(record.events as usize);
    while !body.is_empty() {
        events.push(
            v1::Event::decode_length_delimited(&mut body)
                .map_err(|e| BacklogError(format!("decoding an event: {e}")))?,
        );
    }
    if events.len() != record.events as usize {
        return Err(BacklogError(format!("a record held {} events, not {}", events.len(), record.events)));
    }
    Ok((agent, events))
}

impl Inbox {
    /// An empty queue that wakes `wake` when a batch may make something decidable, holds
    /// `memory_events` in memory, and goes on in unnamed files in `file_dir` (`None`: none).
    pub fn new(wake: Arc<tokio::sync::Notify>, file_dir: Option<PathBuf>, memory_events: usize) -> Self {
        Inbox {
            state: std::sync::Mutex::default(),
            file_dir,
            memory_events,
            take_events: memory_events.div_ceil(2).max(MIN_TAKE_EVENTS),
            segment_bytes: SEGMENT_BYTES,
            file_bytes: FILE_BYTES,
            filed_batches: AtomicU64::new(0),
            lost_batches: AtomicU64::new(0),
            room: tokio::sync::Notify::new(),
            wake,
        }
    }

    /// This queue with its files capped at `file_bytes` queued bytes instead of [`FILE_BYTES`],
    /// in segments of at most a quarter of that (a segment is freed only once read to its end,
    /// so the disk holds up to a segment beyond what is queued).
    pub fn with_file_bytes(mut self, file_bytes: u64) -> Self {
        self.file_bytes = file_bytes;
        self.segment_bytes = SEGMENT_BYTES.min(file_bytes.div_ceil(4).max(1));
        self
    }

    /// The most bytes the files hold queued.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Batches that went to the files since the start.
    pub fn filed_batches(&self) -> u64 {
        self.filed_batches.load(Ordering::Relaxed)
    }

    /// Counts batches taken from the files that could not be read (see [`Taken::into_batches`]).
    pub fn lost(&self, batches: usize) {
        self.lost_batches.fetch_add(batches as u64, Ordering::Relaxed);
    }

    /// Whether any batch was lost since the start: their events are in the store, and only a
    /// replay (after a restart) can feed them, so the resume point must stay where it is.
    pub fn lost_any(&self) -> bool {
        self.lost_batches.load(Ordering::Relaxed) > 0
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a stored batch of one agent. Writes to a file when memory is full: call off the
    /// async threads.
    pub fn push(&self, agent: Arc<str>, events: Vec<v1::Event>) {
        let decisive = events.iter().any(is_decisive);
        let n = events.len();
        {
            let mut state = self.state();
            let behind_file = state.file.is_some() || !state.tail.is_empty();
            if !behind_file && state.head_events + n <= self.memory_events {
                state.head_events += n;
                state.head_oldest = older(state.head_oldest, &events);
                state.head.push_back((agent, events));
            } else if !state.tail.is_empty() || !self.append_to_file(&mut state, &agent, &events) {
                state.tail_events += n;
                state.tail_oldest = older(state.tail_oldest, &events);
                state.tail.push_back((agent, events));
            }
        }
        if decisive {
            self.wake.notify_one();
        }
    }

    /// Appends one batch to the files (a segment opened if needed); false if they cannot take it.
    fn append_to_file(&self, state: &mut State, agent: &str, events: &[v1::Event]) -> bool {
        let Some(dir) = &self.file_dir else { return false };
        let record = encode_record(agent, events);
        let len = record.len() as u64;
        let result = (|| {
            if state.file.as_ref().map_or(0, |f| f.bytes) + len > self.file_bytes {
                return Err(std::io::Error::other(format!("the files hold their cap of {} bytes", self.file_bytes)));
            }
            let new_segment = |dir: &PathBuf| tempfile::tempfile_in(dir).map(Arc::new);
            match state.file.as_mut() {
                None => {
                    let segment = new_segment(dir)?;
                    tracing::info!(dir = %dir.display(), "The correlation is behind ingest; queueing batches in files.");
                    state.file = Some(Spill {
                        segment,
                        segment_end: 0,
                        records: VecDeque::new(),
                        events: 0,
                        bytes: 0,
                        oldest: None,
                    });
                }
                Some(spill) if spill.segment_end > 0 && spill.segment_end + len > self.segment_bytes => {
                    spill.segment = new_segment(dir)?;
                    spill.segment_end = 0;
                }
                Some(_) => {}
            }
            let spill = state.file.as_mut().expect("opened above");
            spill.segment.write_all_at(&record, spill.segment_end)?;
            let at = Record { offset: spill.segment_end, len: record.len() as u32, events: events.len() as u32 };
            spill.records.push_back((spill.segment.clone(), at));
            spill.segment_end += len;
            spill.bytes += len;
            spill.events += events.len();
            spill.oldest = older(spill.oldest, events);
            Ok(())
        })();
        match result {
            Ok(()) => {
                state.file_failing = false;
                self.filed_batches.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(error) => {
                if !state.file_failing {
                    tracing::warn!(%error, dir = %dir.display(),
                        "Cannot queue batches for the correlation in files; acknowledgements wait for it to catch up.");
                }
                state.file_failing = true;
                // A spill opened for this batch holds nothing: forget it.
                if state.file.as_ref().is_some_and(|f| f.records.is_empty()) {
                    state.file = None;
                }
                false
            }
        }
    }

    /// Events queued now, in memory and in the files.
    pub fn queued_events(&self) -> usize {
        let state = self.state();
        state.head_events + state.tail_events + state.file.as_ref().map_or(0, |f| f.events)
    }

    /// The oldest time (see `Store::events_since`) of an event queued now, or `None`: a replay
    /// from the store must start before it to feed everything queued.
    pub fn oldest_ns(&self) -> Option<i64> {
        let state = self.state();
        [state.head_oldest, state.tail_oldest, state.file.as_ref().and_then(|f| f.oldest)].into_iter().flatten().min()
    }

    fn events_in_memory(&self) -> usize {
        let state = self.state();
        state.head_events + state.tail_events
    }

    /// Whether an acknowledgement should wait for the engine: memory holds more than its
    /// limit because the files cannot take more (or there are none).
    pub fn must_wait(&self) -> bool {
        self.events_in_memory() > self.memory_events
    }

    /// Whether batches wait in the files (the engine is behind by more than memory holds).
    pub fn behind(&self) -> bool {
        self.state().file.is_some()
    }

    /// Resolves once memory holds no more than its limit.
    pub async fn room(&self) {
        loop {
            let taken = self.room.notified();
            tokio::pin!(taken);
            // Registered before the check, so a take in between is not missed.
            taken.as_mut().enable();
            if !self.must_wait() {
                return;
            }
            taken.await;
        }
    }

    /// Takes the oldest queued batches: everything in memory before the files, else up to
    /// about `take_events` from the files, else what waited behind them. Call with the
    /// engine's lock held, and feed the batches (see [`Taken::into_batches`]) before letting
    /// go of it: takers must feed in the order they took.
    pub fn take(&self) -> Taken {
        let mut state = self.state();
        let taken = if !state.head.is_empty() {
            state.head_events = 0;
            state.head_oldest = None;
            Taken { head: std::mem::take(&mut state.head), records: Vec::new() }
        } else if let Some(spill) = state.file.as_mut() {
            let mut records = Vec::new();
            let mut events = 0usize;
            while let Some((_, record)) = spill.records.front() {
                if events > 0 && events + record.events as usize > self.take_events {
                    break;
                }
                events += record.events as usize;
                spill.bytes -= u64::from(record.len);
                records.push(spill.records.pop_front().expect("peeked"));
            }
            spill.events -= events;
            if spill.records.is_empty() {
                // Drained: what waited behind the files is next, and a later burst starts a
                // new file (takers still reading this one keep it open).
                state.file = None;
                tracing::info!("The correlation caught up with the queue's files.");
            }
            Taken { head: VecDeque::new(), records }
        } else {
            state.tail_events = 0;
            state.tail_oldest = None;
            Taken { head: std::mem::take(&mut state.tail), records: Vec::new() }
        };
        if state.file.is_none() && state.head.is_empty() && !state.tail.is_empty() {
            // No files (any more): what waited behind them is now the head.
            state.head = std::mem::take(&mut state.tail);
            state.head_events = std::mem::take(&mut state.tail_events);
            state.head_oldest = state.tail_oldest.take();
        }
        drop(state);
        if !taken.is_empty() {
            self.room.notify_waiters();
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory limit of these tests' queues.
    const LIMIT: usize = 10_000;

    fn reset(ts_ns: i64) -> v1::Event {
        v1::Event { kind: Some(v1::event::Kind::Reset(v1::RstEvent { ts_ns, ..Default::default() })) }
    }

    /// A batch of `n` resets numbered from `first` (their times say which batch they are).
    fn batch(first: i64, n: usize) -> Vec<v1::Event> {
        (0..n as i64).map(|i| reset(first + i)).collect()
    }

    fn times(batches: &[Queued]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|(_, events)| events.iter())
            .map(|e| match &e.kind {
                Some(v1::event::Kind::Reset(r)) => r.ts_ns,
                _ => -1,
            })
            .collect()
    }

    /// Takes until the queue is empty (bounded), checking no read error.
    fn drain(inbox: &Inbox) -> Vec<Queued> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let taken = inbox.take();
            if taken.is_empty() {
                return out;
            }
            let (batches, lost, error) = taken.into_batches();
            assert_eq!(lost, 0, "{error:?}");
            out.extend(batches);
        }
        panic!("the queue never emptied");
    }

    fn inbox_in(dir: &tempfile::TempDir) -> Inbox {
        Inbox::new(Arc::new(tokio::sync::Notify::new()), Some(dir.path().to_path_buf()), LIMIT)
    }

    #[test]
    fn beyond_memory_batches_go_to_the_files_and_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox_in(&dir);
        let a: Arc<str> = Arc::from("edge-1");
        let b: Arc<str> = Arc::from("edge-2");
        let big = LIMIT / 2;
        inbox.push(a.clone(), batch(0, big));
        inbox.push(b.clone(), batch(1_000_000, big));
        assert!(!inbox.behind(), "memory holds exactly its limit");
        inbox.push(a.clone(), batch(2_000_000, 3));
        assert!(inbox.behind(), "the next batch went to a file");
        assert_eq!(inbox.filed_batches(), 1);
        // Later batches follow into the files even though a take made room in memory.
        let first = inbox.take().into_batches().0;
        assert_eq!(first.len(), 2, "memory first");
        inbox.push(b.clone(), batch(3_000_000, 2));
        assert!(!inbox.must_wait(), "the files took them: nobody waits");
        assert_eq!(inbox.queued_events(), 5);
        let rest = drain(&inbox);
        assert_eq!(times(&rest), vec![2_000_000, 2_000_001, 2_000_002, 3_000_000, 3_000_001]);
        assert_eq!(rest.iter().map(|(agent, _)| &**agent).collect::<Vec<_>>(), ["edge-1", "edge-2"]);
        assert_eq!(rest[0].1, batch(2_000_000, 3), "events come back as they went in");
        assert!(!inbox.behind());
        assert_eq!(inbox.queued_events(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the files have no name");
        // The next burst starts a new file.
        inbox.push(a.clone(), batch(0, LIMIT));
        inbox.push(a.clone(), batch(4_000_000, 1));
        assert!(inbox.behind());
        assert_eq!(drain(&inbox).len(), 2);
    }

    #[test]
    fn the_files_are_read_in_steps_and_a_segment_is_freed_once_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = inbox_in(&dir);
        inbox.segment_bytes = 50_000;
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        let per_batch = 1000;
        let batches = 3 * MIN_TAKE_EVENTS / per_batch;
        for i in 0..batches {
            inbox.push(a.clone(), batch(1_000_000 * (i as i64 + 1), per_batch));
        }
        let first_segment = {
            let state = inbox.state();
            let spill = state.file.as_ref().unwrap();
            let segments: std::collections::HashSet<*const File> =
                spill.records.iter().map(|(f, _)| Arc::as_ptr(f)).collect();
            assert!(segments.len() > 3, "records spread over {} segments", segments.len());
            Arc::downgrade(&spill.records.front().unwrap().0)
        };
        assert_eq!(inbox.take().into_batches().0.len(), 1, "memory alone first");
        let mut steps = 0;
        let mut seen = Vec::new();
        loop {
            let taken = inbox.take();
            if taken.is_empty() {
                break;
            }
            let (got, lost, _) = taken.into_batches();
            assert_eq!(lost, 0);
            assert!(times(&got).len() <= MIN_TAKE_EVENTS);
            seen.extend(times(&got));
            steps += 1;
            assert!(first_segment.upgrade().is_none(), "the first segment, read, is closed");
            assert!(steps <= 10);
        }
        assert_eq!(steps, 3);
        let expected: Vec<i64> =
            (0..batches).flat_map(|i| (0..per_batch as i64).map(move |j| 1_000_000 * (i as i64 + 1) + j)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn the_oldest_queued_event_holds_the_replay_back() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox_in(&dir);
        let a: Arc<str> = Arc::from("edge-1");
        assert_eq!(inbox.oldest_ns(), None);
        inbox.push(a.clone(), batch(5_000, LIMIT));
        inbox.push(a.clone(), batch(3_000, 2));
        inbox.push(a.clone(), vec![v1::Event { kind: Some(v1::event::Kind::Watermark(v1::Watermark::default())) }]);
        assert!(inbox.behind());
        assert_eq!(inbox.oldest_ns(), Some(3_000), "in the files");
        inbox.take();
        assert_eq!(inbox.oldest_ns(), Some(3_000), "memory taken, the files still hold it");
        drain(&inbox);
        assert_eq!(inbox.oldest_ns(), None);
        inbox.push(a.clone(), batch(7_000, 1));
        assert_eq!(inbox.oldest_ns(), Some(7_000), "in memory");
    }

    #[test]
    fn the_files_get_a_quarter_of_the_store_limit_up_to_their_own_cap() {
        assert_eq!(file_bytes_for_store(1 << 30), 256 << 20);
        assert_eq!(file_bytes_for_store(20 << 30), FILE_BYTES, "the default 20 GiB store");
        assert_eq!(file_bytes_for_store(3), 1, "never zero");
    }

    #[test]
    fn beyond_the_cap_batches_wait_in_memory_and_acknowledgements_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = inbox_in(&dir);
        inbox.file_bytes = 10_000;
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        for i in 0..100 {
            inbox.push(a.clone(), batch(1_000_000 + i * 100, 100));
        }
        assert!(inbox.filed_batches() < 100, "the cap stopped the files");
        assert!(inbox.must_wait(), "memory is over its limit");
        let all = times(&drain(&inbox));
        assert_eq!(all.len(), LIMIT + 100 * 100);
        assert!(all.windows(2).all(|w| w[0] < w[1]), "in order across memory, files and what waited behind");
    }

    fn flow() -> v1::Event {
        v1::Event { kind: Some(v1::event::Kind::Flow(v1::FlowSummary::default())) }
    }

    fn watermark(ts_ns: i64) -> v1::Event {
        v1::Event { kind: Some(v1::event::Kind::Watermark(v1::Watermark { ts_ns, ..Default::default() })) }
    }

    #[tokio::test]
    async fn decisive_batches_wake_the_ticker() {
        let wake = Arc::new(tokio::sync::Notify::new());
        let inbox = Inbox::new(wake.clone(), None, LIMIT);
        // A batch of flows alone decides nothing: no wake-up.
        inbox.push("a".into(), vec![flow(), flow()]);
        let woken = tokio::time::timeout(std::time::Duration::from_millis(50), wake.notified()).await;
        assert!(woken.is_err(), "flows alone woke the ticker");
        // A watermark or a reset may: wake-up.
        inbox.push("b".into(), vec![watermark(5)]);
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified()).await.expect("a watermark wakes");
        inbox.push("a".into(), vec![reset(7)]);
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified()).await.expect("a reset wakes");
        let taken: Vec<(String, usize)> =
            inbox.take().into_batches().0.into_iter().map(|(a, e)| (a.to_string(), e.len())).collect();
        assert_eq!(taken, [("a".to_string(), 2), ("b".to_string(), 1), ("a".to_string(), 1)], "queue order");
    }

    #[tokio::test]
    async fn without_files_acknowledgements_wait_for_room() {
        let inbox = Arc::new(Inbox::new(Arc::new(tokio::sync::Notify::new()), None, LIMIT));
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        assert!(!inbox.must_wait());
        tokio::time::timeout(std::time::Duration::from_secs(5), inbox.room()).await.expect("at the limit is room");
        inbox.push(a.clone(), batch(1_000_000, 1));
        assert!(inbox.must_wait(), "memory is over its limit and there are no files");
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.room().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "room() resolved over the limit");
        assert_eq!(times(&inbox.take().into_batches().0).len(), LIMIT, "memory first");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("room after the take").unwrap();
        assert_eq!(times(&drain(&inbox)), vec![1_000_000]);
        assert!(!inbox.must_wait());
    }

    #[test]
    fn files_that_cannot_be_written_keep_later_batches_in_memory_behind_them() {
        let dir = tempfile::tempdir().unwrap();
        // A directory that does not exist yet: no file can be made there.
        let files = dir.path().join("later");
        let inbox = Inbox::new(Arc::new(tokio::sync::Notify::new()), Some(files.clone()), LIMIT);
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        inbox.push(a.clone(), batch(1_000_000, 2));
        assert!(inbox.must_wait(), "the files failed: acknowledgements wait");
        assert!(!inbox.behind());
        std::fs::create_dir(&files).unwrap();
        // The files would work now, but the batch behind the failed one stays in order.
        inbox.push(a.clone(), batch(2_000_000, 1));
        assert_eq!(inbox.filed_batches(), 0);
        let all = times(&drain(&inbox));
        assert_eq!(all.len(), LIMIT + 3);
        assert_eq!(&all[LIMIT..], &[1_000_000, 1_000_001, 2_000_000]);
    }

    #[test]
    fn a_damaged_record_is_counted_lost_and_the_others_are_read() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut records = Vec::new();
        let mut end = 0u64;
        for first in [1_000_000, 2_000_000, 3_000_000] {
            let bytes = encode_record("edge-1", &batch(first, 2));
            file.write_all_at(&bytes, end).unwrap();
            records.push((file.clone(), Record { offset: end, len: bytes.len() as u32, events: 2 }));
            end += bytes.len() as u64;
        }
        // Garbage over the second record's events (after its name length and name).
        let second = records[1].1;
        let body = second.offset + 1 + "edge-1".len() as u64;
        file.write_all_at(&vec![0xff; (second.offset + u64::from(second.len) - body) as usize], body).unwrap();
        let (batches, lost, error) = Taken { head: VecDeque::new(), records }.into_batches();
        assert_eq!(times(&batches), vec![1_000_000, 1_000_001, 3_000_000, 3_000_001]);
        assert_eq!(lost, 1);
        assert!(error.unwrap().to_string().contains("decoding an event"));
    }
}
