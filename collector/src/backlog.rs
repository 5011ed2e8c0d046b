//! The correlation's backlog: stored batches on their way to the engine, in memory up to a
//! limit and beyond it in a file, so that an acknowledgement never waits for the correlation.
//!
//! Why: the engine sits behind one lock, held by the ticker for a whole decision (tens of
//! milliseconds to seconds under load), and it decides fewer events a second than ingest can
//! store (on 2 cores about 50k against over 200k). Ingest therefore queues every stored batch
//! here and acknowledges at once; whoever takes the engine next ([`crate::service::Hub::correlation`])
//! feeds it the queue first, in the order it was queued. A burst the engine cannot follow used
//! to hold acknowledgements once 200k events were queued (some 100 MB of decoded events);
//! now it goes on to a file beside the store (about 200 bytes an event, encoded) and the
//! engine catches up later: agents are acknowledged at the speed of the store, and verdicts
//! come late during such a burst instead of agents spooling. The queue is the correlation's,
//! not the store's: every event in it is durable already, so the file is never synced and is
//! started afresh when the collector starts (the replay after a restart reads the store; see
//! [`crate::service::serve`] for why it starts early enough).
//!
//! Order: the queue is first-in first-out across its three parts. Batches go to memory while
//! nothing waits in the file and memory has room (200k events by default); then to the file
//! until the file is drained; if the file cannot take a batch (a write error, or
//! [`FILE_BYTES`] reached) the batch and every later one wait in memory behind the file, and
//! acknowledgements wait for room in memory as they did before there was a file
//! ([`Inbox::must_wait`], [`Inbox::room_below`]): memory stays bounded in every case.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use prost::Message;
use rstscope_proto::v1;

/// Events held in memory before batches go to the file, by default (about a second of ingest
/// at full speed; some 100 MB decoded). See [`crate::service::Limits::correlation_memory_events`].
pub const MEMORY_EVENTS: usize = 200_000;

/// The file holds at most this many bytes (some 20M events); beyond it batches wait in memory
/// and acknowledgements wait for room.
pub const FILE_BYTES: u64 = 4 << 30;

/// Whether an event may make something decidable: a RST, or a watermark.
pub fn is_decisive(e: &v1::Event) -> bool {
    matches!(e.kind, Some(v1::event::Kind::Reset(_)) | Some(v1::event::Kind::Watermark(_)))
}

/// One agent's stored batch.
pub type Queued = (Arc<str>, Vec<v1::Event>);

/// Stored batches queued for the engine (see the module docs).
pub struct Inbox {
    state: std::sync::Mutex<State>,
    /// Where the file goes (`None`: no file; batches beyond the memory limit wait).
    file_path: Option<PathBuf>,
    /// Events held in memory before batches go to the file.
    memory_events: usize,
    /// Events a taker reads from the file at once (half of `memory_events`): the engine is fed
    /// in steps of about this size, so decisions (and their reports) keep coming while a long
    /// backlog drains.
    take_events: usize,
    /// Batches written to the file since the start.
    filed_batches: std::sync::atomic::AtomicU64,
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
    /// Then the file's records, oldest first.
    file: Option<Spill>,
    /// Newest part, in memory: batches the file could not take, fed after it.
    tail: VecDeque<Queued>,
    tail_events: usize,
    /// The last file error, logged once until the file works again.
    file_failing: bool,
}

/// The file part of the queue: records appended at `end`, read from the front.
struct Spill {
    /// Shared with takers still reading records they took; unlinked once drained, so a new
    /// file never overwrites records being read.
    file: Arc<File>,
    end: u64,
    records: VecDeque<Record>,
    events: usize,
}

/// Where one batch is in the file.
#[derive(Clone, Copy)]
struct Record {
    offset: u64,
    len: u32,
    events: u32,
}

/// Batches taken from the file, read and decoded by [`Taken::into_batches`] after the queue's
/// lock is released.
struct FromFile {
    file: Arc<File>,
    records: Vec<Record>,
}

/// What [`Inbox::take`] took: memory batches, then file records, in queue order.
pub struct Taken {
    head: VecDeque<Queued>,
    file: Option<FromFile>,
}

/// A file record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("correlation backlog file: {0}")]
pub struct BacklogError(String);

impl Taken {
    /// The batches in queue order. A record that cannot be read back (the file is the
    /// collector's own, so this means a failing disk) ends the batches with an error; the
    /// ones before it are returned with it.
    pub fn into_batches(self) -> (Vec<Queued>, Option<BacklogError>) {
        let mut out: Vec<Queued> = self.head.into_iter().collect();
        let Some(from_file) = self.file else { return (out, None) };
        for record in from_file.records {
            match read_record(&from_file.file, record) {
                Ok(batch) => out.push(batch),
                Err(error) => return (out, Some(error)),
            }
        }
        (out, None)
    }

    /// Whether nothing was taken.
    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.file.is_none()
    }
}

/// A record: agent name length (1 byte), the name, then each event length-delimited.
fn encode_record(agent: &str, events: &[v1::Event]) -> Vec<u8> {
    let name = &agent.as_bytes()[..agent.len().min(255)];
    let body: usize = events.iter().map(|e| e.encoded_len() + 10).sum();
    let mut out = Vec::with_capacity(1 + name.len() + body);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
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
    /// `memory_events` in memory, and goes on in a file at `file_path` (removed now if a previous
    /// run left it; `None`: no file).
    pub fn new(wake: Arc<tokio::sync::Notify>, file_path: Option<PathBuf>, memory_events: usize) -> Self {
        if let Some(path) = &file_path {
            let _ = std::fs::remove_file(path);
        }
        Inbox {
            state: std::sync::Mutex::default(),
            file_path,
            memory_events,
            take_events: memory_events.div_ceil(2).max(1),
            filed_batches: Default::default(),
            room: tokio::sync::Notify::new(),
            wake,
        }
    }

    /// Batches that went to the file since the start.
    pub fn filed_batches(&self) -> u64 {
        self.filed_batches.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a stored batch of one agent. Writes to the file when memory is full: call off
    /// the async threads.
    pub fn push(&self, agent: Arc<str>, events: Vec<v1::Event>) {
        let decisive = events.iter().any(is_decisive);
        let n = events.len();
        {
            let mut state = self.state();
            let behind_file = state.file.is_some() || !state.tail.is_empty();
            if !behind_file && state.head_events + n <= self.memory_events {
                state.head_events += n;
                state.head.push_back((agent, events));
            } else if !state.tail.is_empty() || !self.append_to_file(&mut state, &agent, &events) {
                state.tail_events += n;
                state.tail.push_back((agent, events));
            }
        }
        if decisive {
            self.wake.notify_one();
        }
    }

    /// Appends one batch to the file (opened if needed); false if it cannot take it.
    fn append_to_file(&self, state: &mut State, agent: &str, events: &[v1::Event]) -> bool {
        let Some(path) = &self.file_path else { return false };
        let record = encode_record(agent, events);
        let result = (|| {
            if state.file.as_ref().is_some_and(|f| f.end + record.len() as u64 > FILE_BYTES) {
                return Err(std::io::Error::other(format!("the file reached its cap of {FILE_BYTES} bytes")));
            }
            if state.file.is_none() {
                let file = File::options().read(true).write(true).create(true).truncate(true).open(path)?;
                tracing::info!(path = %path.display(), "The correlation is behind ingest; queueing batches in a file.");
                state.file = Some(Spill { file: Arc::new(file), end: 0, records: VecDeque::new(), events: 0 });
            }
            let spill = state.file.as_mut().expect("opened above");
            spill.file.write_all_at(&record, spill.end)?;
            spill.records.push_back(Record {
                offset: spill.end,
                len: record.len() as u32,
                events: events.len() as u32,
            });
            spill.end += record.len() as u64;
            spill.events += events.len();
            Ok(())
        })();
        match result {
            Ok(()) => {
                state.file_failing = false;
                self.filed_batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(error) => {
                if !state.file_failing {
                    tracing::warn!(%error, path = %path.display(),
                        "Cannot queue batches for the correlation in a file; acknowledgements wait for it to catch up.");
                }
                state.file_failing = true;
                false
            }
        }
    }

    /// Events queued now, in memory and in the file.
    pub fn queued_events(&self) -> usize {
        let state = self.state();
        state.head_events + state.tail_events + state.file.as_ref().map_or(0, |f| f.events)
    }

    fn events_in_memory(&self) -> usize {
        let state = self.state();
        state.head_events + state.tail_events
    }

    /// Whether an acknowledgement should wait for the engine: memory holds more than its
    /// limit because the file cannot take more (or there is none).
    pub fn must_wait(&self) -> bool {
        self.events_in_memory() > self.memory_events
    }

    /// Whether batches wait in the file (the engine is behind by more than memory holds).
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

    /// Takes the oldest queued batches: everything in memory before the file, else up to
    /// about half the memory limit's events from the file, else what waited behind it. Call with the
    /// engine's lock held, and feed the batches (see [`Taken::into_batches`]) before letting
    /// go of it: takers must feed in the order they took.
    pub fn take(&self) -> Taken {
        let mut state = self.state();
        let taken = if !state.head.is_empty() {
            state.head_events = 0;
            Taken { head: std::mem::take(&mut state.head), file: None }
        } else if let Some(spill) = state.file.as_mut() {
            let mut records = Vec::new();
            let mut events = 0usize;
            while let Some(&record) = spill.records.front() {
                if events > 0 && events + record.events as usize > self.take_events {
                    break;
                }
                events += record.events as usize;
                records.push(record);
                spill.records.pop_front();
            }
            spill.events -= events;
            let file = spill.file.clone();
            if spill.records.is_empty() {
                // Drained: what waited behind the file is next, and a later burst starts a
                // new file (takers still reading this one keep it open).
                state.file = None;
                if let Some(path) = &self.file_path {
                    let _ = std::fs::remove_file(path);
                }
                tracing::info!("The correlation caught up with the queue's file.");
            }
            Taken { head: VecDeque::new(), file: Some(FromFile { file, records }) }
        } else {
            state.tail_events = 0;
            Taken { head: std::mem::take(&mut state.tail), file: None }
        };
        if state.file.is_none() && state.head.is_empty() && !state.tail.is_empty() {
            // No file (any more): what waited behind it is now the head.
            state.head = std::mem::take(&mut state.tail);
            state.head_events = std::mem::take(&mut state.tail_events);
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
            let (batches, error) = taken.into_batches();
            assert!(error.is_none(), "{error:?}");
            out.extend(batches);
        }
        panic!("the queue never emptied");
    }

    fn inbox_in(dir: &tempfile::TempDir) -> (Inbox, PathBuf) {
        let path = dir.path().join("backlog");
        (Inbox::new(Arc::new(tokio::sync::Notify::new()), Some(path.clone()), LIMIT), path)
    }

    #[test]
    fn beyond_memory_batches_go_to_the_file_and_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, path) = inbox_in(&dir);
        let a: Arc<str> = Arc::from("edge-1");
        let b: Arc<str> = Arc::from("edge-2");
        let big = LIMIT / 2;
        inbox.push(a.clone(), batch(0, big));
        inbox.push(b.clone(), batch(1_000_000, big));
        assert!(!inbox.behind(), "memory holds exactly its limit");
        inbox.push(a.clone(), batch(2_000_000, 3));
        assert!(inbox.behind(), "the next batch went to the file");
        assert!(path.exists());
        // Later batches follow into the file even though a take made room in memory.
        let first = inbox.take().into_batches().0;
        assert_eq!(first.len(), 2, "memory first");
        inbox.push(b.clone(), batch(3_000_000, 2));
        assert!(!inbox.must_wait(), "the file took them: nobody waits");
        assert_eq!(inbox.queued_events(), 5);
        let rest = drain(&inbox);
        assert_eq!(times(&rest), vec![2_000_000, 2_000_001, 2_000_002, 3_000_000, 3_000_001]);
        assert_eq!(rest.iter().map(|(agent, _)| &**agent).collect::<Vec<_>>(), ["edge-1", "edge-2"]);
        assert_eq!(rest[0].1, batch(2_000_000, 3), "events come back as they went in");
        assert!(!inbox.behind());
        assert!(!path.exists(), "the drained file is removed");
        assert_eq!(inbox.queued_events(), 0);
        // The next burst starts a new file.
        inbox.push(a.clone(), batch(0, LIMIT));
        inbox.push(a.clone(), batch(4_000_000, 1));
        assert!(path.exists());
        assert_eq!(drain(&inbox).len(), 2);
    }

    #[test]
    fn the_file_is_read_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = inbox_in(&dir);
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        let per_batch = 1000;
        let batches = 3 * (LIMIT / 2) / per_batch;
        for i in 0..batches {
            inbox.push(a.clone(), batch(1_000_000 * (i as i64 + 1), per_batch));
        }
        assert_eq!(inbox.take().into_batches().0.len(), 1, "memory alone first");
        let mut steps = 0;
        let mut seen = Vec::new();
        loop {
            let taken = inbox.take();
            if taken.is_empty() {
                break;
            }
            let (got, error) = taken.into_batches();
            assert!(error.is_none());
            assert!(times(&got).len() <= LIMIT / 2);
            seen.extend(times(&got));
            steps += 1;
            assert!(steps <= 10);
        }
        assert_eq!(steps, 3);
        let expected: Vec<i64> =
            (0..batches).flat_map(|i| (0..per_batch as i64).map(move |j| 1_000_000 * (i as i64 + 1) + j)).collect();
        assert_eq!(seen, expected);
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
    async fn without_a_file_acknowledgements_wait_for_room() {
        let inbox = Arc::new(Inbox::new(Arc::new(tokio::sync::Notify::new()), None, LIMIT));
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        assert!(!inbox.must_wait());
        tokio::time::timeout(std::time::Duration::from_secs(5), inbox.room()).await.expect("at the limit is room");
        inbox.push(a.clone(), batch(1_000_000, 1));
        assert!(inbox.must_wait(), "memory is over its limit and there is no file");
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
    fn a_file_that_cannot_be_written_keeps_later_batches_in_memory_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: opening it for writing fails.
        let path = dir.path().join("backlog");
        let inbox = Inbox::new(Arc::new(tokio::sync::Notify::new()), Some(path.clone()), LIMIT);
        std::fs::create_dir(&path).unwrap();
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        inbox.push(a.clone(), batch(1_000_000, 2));
        assert!(inbox.must_wait(), "the file failed: acknowledgements wait");
        std::fs::remove_dir(&path).unwrap();
        // The file would work now, but the batch behind the failed one stays in order.
        inbox.push(a.clone(), batch(2_000_000, 1));
        assert!(!path.exists());
        let all = times(&drain(&inbox));
        assert_eq!(all.len(), LIMIT + 3);
        assert_eq!(&all[LIMIT..], &[1_000_000, 1_000_001, 2_000_000]);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, path) = inbox_in(&dir);
        let a: Arc<str> = Arc::from("edge-1");
        inbox.push(a.clone(), batch(0, LIMIT));
        inbox.push(a.clone(), batch(1_000_000, 2));
        inbox.push(a.clone(), batch(2_000_000, 2));
        inbox.take();
        // Overwrite the second record's events with garbage.
        let len = std::fs::metadata(&path).unwrap().len();
        let file = File::options().write(true).open(&path).unwrap();
        file.write_all_at(&vec![0xff; (len / 2) as usize], len / 2 + 1 + "edge-1".len() as u64).unwrap();
        let (batches, error) = inbox.take().into_batches();
        assert_eq!(times(&batches), vec![1_000_000, 1_000_001], "the records before the damage");
        assert!(error.unwrap().to_string().contains("decoding an event"));
    }
}
