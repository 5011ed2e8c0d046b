//! Shipping events to the collector without ever blocking capture.
//!
//! The capture/tracker thread calls [`Exporter::push`]; everything else happens on the
//! exporter's own thread (a single-threaded tokio runtime). Between the two:
//!
//! ```text
//!  tracker thread                      exporter thread
//!  push ─► Batcher ─► bounded queue ─► spooler ─► Spool (disk) ─► sender ─► collector
//!                          │ full                     ▲     ▲                 │
//!                          └── producer spools itself ┘     └──── Ack{seq} ◄──┘
//! ```
//!
//! Why write every batch to disk before sending it: the collector acknowledges a batch only
//! once it is durable, and until then the batch must survive collector restarts and agent
//! restarts alike; the spool is the one place unacknowledged batches live, so resending after a
//! reconnect or a restart is the same code path as sending.
//!
//! When-full policy, explicit and in-band (nothing is dropped silently):
//! - the in-memory queue holds `queue_batches` cut batches; beyond that the producer writes the
//!   queue to the spool itself (in order) instead of waiting for the exporter thread;
//! - when the spool is at its size cap, a batch is dropped, its events are counted, and the count
//!   is sent to the collector as `CaptureLoss { events_dropped, reason: "spool full" }` (the loss
//!   report itself may exceed the cap slightly, so it always gets through).
//!
//! Durability: a batch counts as spooled (is visible to the sender and in [`ExportStats`])
//! only after the spool file was synced, whether the exporter thread or, with the queue full,
//! the producer wrote it; one sync covers everything written in one go. The producer path thus
//! pays one `fdatasync` per overflow (64 batches), on the capture thread: the price of not
//! losing what the queue could not hold.
//!
//! Pure parts live in [`batch`] (cutting batches), [`backoff`] (reconnect delays) and [`spool`]
//! (file format); `client` is the network shell.

pub mod backoff;
pub mod batch;
mod client;
pub mod spool;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rstscope_proto::v1;
use tokio::sync::{watch, Notify};

use crate::capture::CaptureDrops;
use crate::event::Event;
use crate::flow::ListedWatermark;
use batch::Batcher;
use spool::{Spool, SpoolError};

/// `CaptureLoss.reason` for events dropped because the spool was at its size cap.
pub const SPOOL_FULL: &str = "spool full";
/// `CaptureLoss.reason` for events dropped because the spool could not be written.
pub const SPOOL_WRITE_FAILED: &str = "spool write failed";
/// `CaptureLoss.reason` for packets libpcap or the interface dropped.
pub const CAPTURE_DROPS: &str = "capture drops";

/// How the exporter reaches the collector and where it keeps its spool.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// `http://host:port` or `https://host:port`.
    pub collector: String,
    /// Unique name of this agent (one per vantage point).
    pub agent_name: String,
    /// Host name, for the collector's agent list.
    pub host_name: String,
    /// Addresses of the host (4 or 16 bytes each); may be empty.
    pub local_addresses: Vec<Vec<u8>>,
    /// What the agent captures on.
    pub interfaces: Vec<v1::Interface>,
    /// Agent software version.
    pub software_version: String,
    /// The agent's state directory (spool and numbering).
    pub state_dir: PathBuf,
    /// Size cap of the spool's segment files, in bytes.
    pub spool_max_bytes: u64,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// TLS settings for `https://` collectors.
    pub tls: TlsFiles,
    /// Most events per batch (the collector's `Welcome.max_batch_events` may lower it).
    pub max_batch_events: usize,
    /// Longest an event waits for its batch to fill.
    pub max_batch_age: Duration,
    /// Cut batches held in memory before the producer writes them to the spool itself.
    pub queue_batches: usize,
    /// Batches sent and not yet acknowledged, at most.
    pub max_in_flight: u64,
    /// Cut a batch holding a RST at the exporter thread's next look instead of after
    /// `max_batch_age`: live capture, where a verdict waits for it. Replayed files batch by
    /// size and age only.
    pub urgent_resets: bool,
}

impl ExportConfig {
    /// A configuration with the standard limits: batches of 1000 events or 200 ms, a 1 GiB
    /// spool, 64 queued batches, 256 batches in flight; RSTs not urgent.
    pub fn new(collector: impl Into<String>, agent_name: impl Into<String>, state_dir: PathBuf) -> Self {
        ExportConfig {
            collector: collector.into(),
            agent_name: agent_name.into(),
            host_name: String::new(),
            local_addresses: Vec::new(),
            interfaces: Vec::new(),
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            state_dir,
            spool_max_bytes: 1 << 30,
            token: None,
            tls: TlsFiles::default(),
            max_batch_events: 1000,
            max_batch_age: Duration::from_millis(200),
            queue_batches: 64,
            max_in_flight: 256,
            urgent_resets: false,
        }
    }
}

/// PEM files for TLS to the collector.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA certificate(s) the collector's certificate must chain to.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Client private key, for mutual TLS.
    pub client_key: Option<PathBuf>,
}

/// The exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The collector address or TLS settings are unusable.
    #[error("{0}")]
    Config(String),
    /// A TLS file could not be read.
    #[error("{}: {source}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The exporter thread or its runtime could not be started.
    #[error("starting the exporter thread: {0}")]
    Thread(std::io::Error),
}

/// Counters of the exporter, for statistics and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Events pushed by the tracker.
    pub events: u64,
    /// Events dropped because the spool was full or could not be written.
    pub events_dropped: u64,
    /// Bytes of spool segments on disk.
    pub spool_bytes: u64,
    /// Highest batch number written to the spool.
    pub last_seq: u64,
    /// Highest batch number the collector acknowledged.
    pub acked: u64,
    /// Batches the collector acknowledged since the exporter started.
    pub batches_acked: u64,
}

/// How [`Exporter::finish`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishReport {
    /// Batches written and not acknowledged when the wait ended; they stay in the spool and are
    /// sent by the next run with the same state directory.
    pub unacked_batches: u64,
    /// Final counters.
    pub stats: ExportStats,
    /// Why the last attempt to reach the collector failed, if the last attempt failed (a
    /// refused token, say): what a run that ends with batches unacknowledged tells the user.
    pub last_error: Option<String>,
}

/// What the network side should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Send as batches come.
    Running,
    /// No more input: exit once everything is acknowledged.
    Finishing,
    /// Stop now.
    Abort,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    events_dropped: AtomicU64,
    spool_bytes: AtomicU64,
    batches_acked: AtomicU64,
}

/// Cut batches waiting for the spooler, and the batcher filling the next one.
struct Buffer {
    batcher: Batcher,
    queued: std::collections::VecDeque<Vec<v1::Event>>,
    /// Latest watermark given, and the latest one put in a batch.
    watermark: Option<Mark>,
    watermark_sent: Option<Mark>,
    /// Since when the capture has run without a gap (packet time; 0: unknown).
    since_ns: i64,
    /// The capture has ended (said with the last watermark).
    ended: bool,
}

impl Buffer {
    /// Ends a batch with the current watermark, so the collector always knows how far along the
    /// agent's capture time is.
    fn seal(&mut self, mut events: Vec<v1::Event>) -> Vec<v1::Event> {
        if let Some(mark) = &self.watermark {
            let watermark = v1::Watermark {
                ts_ns: mark.ts_ns,
                since_ns: self.since_ns,
                ended: self.ended,
                listed_until_ns: mark.listed_until_ns,
                settling: mark.settling.clone(),
            };
            events.push(v1::Event { kind: Some(v1::event::Kind::Watermark(watermark)) });
            self.watermark_sent = self.watermark.clone();
        }
        events
    }

    /// Cuts whatever is waiting, or a watermark-only batch if the watermark moved.
    fn cut_all(&mut self) {
        let events = match self.batcher.take() {
            Some(events) => events,
            None if self.watermark != self.watermark_sent => Vec::new(),
            None => return,
        };
        let batch = self.seal(events);
        self.queued.push_back(batch);
    }
}

/// A watermark as it goes out (`v1::Watermark` without the run's `since_ns` and `ended`).
#[derive(Clone, Debug, PartialEq)]
struct Mark {
    ts_ns: i64,
    /// 0: no listing (as for agents before it); else at least `ts_ns`.
    listed_until_ns: i64,
    settling: Vec<v1::SettlingRst>,
}

impl Mark {
    /// The newest promises of `old` and `new`: each of the two times only moves forward, and the
    /// list goes with its time. (A listing that ends before the plain watermark adds nothing.)
    /// `new.settling` is oldest first, as [`crate::flow::Tracker::listed_watermark`] gives it.
    fn merge(old: Option<Mark>, new: &ListedWatermark) -> Mark {
        let ts_ns = old.as_ref().map_or(new.ts_ns, |o| o.ts_ns.max(new.ts_ns));
        let newer_listing = old.as_ref().is_none_or(|o| new.listed_until_ns >= o.listed_until_ns);
        let (listed_until_ns, settling) = match old {
            Some(o) if !newer_listing => (o.listed_until_ns, o.settling),
            _ => {
                // No more than a collector accepts.
                let new = new.clone().capped(rstscope_proto::MAX_SETTLING_LISTED);
                (new.listed_until_ns, new.settling.iter().map(v1::SettlingRst::from).collect())
            }
        };
        if listed_until_ns <= ts_ns {
            return Mark { ts_ns, listed_until_ns: 0, settling: Vec::new() };
        }
        Mark { ts_ns, listed_until_ns, settling }
    }
}

/// The spool and what could not be written to it yet. Batches are only ever written while this
/// is locked and drained from the queue under the same lock, which keeps them in order.
struct SpoolWriter {
    spool: Spool,
    /// Unreported losses by reason.
    losses: BTreeMap<String, v1::CaptureLoss>,
}

impl SpoolWriter {
    /// Writes one batch, reporting earlier losses first; counts the events if it cannot.
    fn write(&mut self, mut events: Vec<v1::Event>, counters: &Counters) {
        if !self.losses.is_empty() {
            let losses = std::mem::take(&mut self.losses).into_values().map(loss_event);
            events.splice(0..0, losses);
        }
        match self.spool.append(&events) {
            Ok(Some(_)) => {}
            Ok(None) => self.absorb(events, SPOOL_FULL, counters),
            Err(error) => {
                tracing::warn!(%error, "Writing to the spool failed; dropping the batch.");
                self.absorb(events, SPOOL_WRITE_FAILED, counters);
            }
        }
        counters.spool_bytes.store(self.spool.bytes(), Ordering::Relaxed);
    }

    /// Writes a batch of only the unreported losses, allowed slightly past the cap.
    fn write_loss_report(&mut self, counters: &Counters) {
        if self.losses.is_empty() {
            return;
        }
        let events: Vec<v1::Event> = std::mem::take(&mut self.losses).into_values().map(loss_event).collect();
        match self.spool.append_loss_report(&events) {
            Ok(Some(_)) => {}
            Ok(None) => self.absorb(events, SPOOL_FULL, counters),
            Err(error) => {
                tracing::warn!(%error, "Writing a loss report to the spool failed; keeping it for later.");
                self.absorb(events, SPOOL_WRITE_FAILED, counters);
            }
        }
        counters.spool_bytes.store(self.spool.bytes(), Ordering::Relaxed);
    }

    /// Counts the events of a batch that could not be written under `reason`; loss reports in
    /// it go back to the unreported ones, watermarks are superseded by later ones anyway.
    fn absorb(&mut self, events: Vec<v1::Event>, reason: &str, counters: &Counters) {
        for event in events {
            let (ts_ns, loss) = match event.kind {
                Some(v1::event::Kind::Reset(r)) => (r.ts_ns, None),
                Some(v1::event::Kind::Flow(f)) => (f.end_ns, None),
                Some(v1::event::Kind::Open(o)) => (o.start_ns, None),
                Some(v1::event::Kind::Loss(l)) => (0, Some(l)),
                Some(v1::event::Kind::Watermark(_)) | None => continue,
            };
            match loss {
                Some(l) => merge_loss(self.losses.entry(l.reason.clone()).or_default(), &l),
                None => {
                    counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                    let dropped = v1::CaptureLoss {
                        from_ns: ts_ns,
                        until_ns: ts_ns,
                        events_dropped: 1,
                        reason: reason.to_string(),
                        ..Default::default()
                    };
                    merge_loss(self.losses.entry(reason.to_string()).or_default(), &dropped);
                }
            }
        }
    }
}

fn merge_loss(into: &mut v1::CaptureLoss, loss: &v1::CaptureLoss) {
    let empty = into.reason.is_empty();
    into.from_ns = if empty || into.from_ns == 0 { loss.from_ns } else { into.from_ns.min(loss.from_ns) };
    into.until_ns = into.until_ns.max(loss.until_ns);
    into.capture_dropped += loss.capture_dropped;
    into.interface_dropped += loss.interface_dropped;
    into.events_dropped += loss.events_dropped;
    into.reason.clone_from(&loss.reason);
}

fn loss_event(loss: v1::CaptureLoss) -> v1::Event {
    v1::Event { kind: Some(v1::event::Kind::Loss(loss)) }
}

/// State shared by the tracker thread and the exporter thread.
struct Shared {
    buffer: Mutex<Buffer>,
    writer: Mutex<SpoolWriter>,
    /// Wakes the spooler: a batch was queued.
    queued: Notify,
    /// Wakes the sender: a batch was spooled.
    spooled: Notify,
    counters: Counters,
    /// The last session's error, cleared when a session is welcomed.
    last_error: Mutex<Option<String>>,
    queue_batches: usize,
    max_batch_events: usize,
    urgent_resets: bool,
}

/// A poisoned lock only means another thread panicked while holding it; the data (a spool
/// whose files are consistent after every call, a queue) is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Moves every queued batch to the spool, in order (cutting the waiting events first if
    /// `cut_all`, else only if they are old enough).
    fn spool_queued(&self, cut_all: bool) {
        let mut writer = lock(&self.writer);
        let batches: Vec<Vec<v1::Event>> = {
            let mut buffer = lock(&self.buffer);
            if cut_all {
                buffer.cut_all();
            } else if let Some(events) = buffer.batcher.poll(Instant::now()) {
                let batch = buffer.seal(events);
                buffer.queued.push_back(batch);
            }
            buffer.queued.drain(..).collect()
        };
        let wrote = !batches.is_empty() || !writer.losses.is_empty();
        for batch in batches {
            writer.write(batch, &self.counters);
        }
        writer.write_loss_report(&self.counters);
        if wrote {
            // Durable before the sender sees them (it reads `last_seq` under this lock): one
            // fsync for everything drained here, so the cost is per call, not per batch.
            if let Err(error) = writer.spool.sync() {
                tracing::warn!(%error, "Syncing the spool failed.");
            }
        }
        drop(writer);
        if wrote {
            self.spooled.notify_one();
        }
    }

    fn push(&self, event: v1::Event) {
        // A RST is what a verdict waits for: its batch goes at the exporter thread's next look
        // instead of after `max_batch_age`. RSTs arriving while that thread is busy (spool
        // sync, sending) join the same batch, so the batch rate stays bounded by the thread.
        let urgent = self.urgent_resets && matches!(event.kind, Some(v1::event::Kind::Reset(_)));
        let overflowing = {
            let mut buffer = lock(&self.buffer);
            let Some(events) = buffer.batcher.push(event, Instant::now()) else {
                if urgent {
                    buffer.batcher.mark_urgent();
                    drop(buffer);
                    self.queued.notify_one();
                }
                return;
            };
            let batch = buffer.seal(events);
            buffer.queued.push_back(batch);
            buffer.queued.len() > self.queue_batches
        };
        if overflowing {
            // The exporter thread is behind: write the queue to the spool here rather than let
            // memory grow or make capture wait for a thread that may be stuck.
            self.spool_queued(false);
        } else {
            self.queued.notify_one();
        }
    }

    /// Moves the spool's acknowledged pointer to `seq`, counting the newly acknowledged batches.
    fn ack(&self, writer: &mut SpoolWriter, seq: u64) -> Result<(), SpoolError> {
        let before = writer.spool.acked();
        writer.spool.ack(seq)?;
        let newly = writer.spool.acked().saturating_sub(before);
        self.counters.batches_acked.fetch_add(newly, Ordering::Relaxed);
        self.counters.spool_bytes.store(writer.spool.bytes(), Ordering::Relaxed);
        Ok(())
    }

    fn stats(&self) -> ExportStats {
        let (last_seq, acked, spool_bytes) = {
            let writer = lock(&self.writer);
            (writer.spool.last_seq(), writer.spool.acked(), writer.spool.bytes())
        };
        ExportStats {
            events: self.counters.events.load(Ordering::Relaxed),
            events_dropped: self.counters.events_dropped.load(Ordering::Relaxed),
            spool_bytes,
            last_seq,
            acked,
            batches_acked: self.counters.batches_acked.load(Ordering::Relaxed),
        }
    }
}

/// Reads an exporter's counters from another thread; see [`Exporter::stats_handle`].
#[derive(Clone)]
pub struct StatsHandle(Arc<Shared>);

impl StatsHandle {
    /// Counters so far.
    pub fn stats(&self) -> ExportStats {
        self.0.stats()
    }
}

impl std::fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StatsHandle").finish_non_exhaustive()
    }
}

/// Ships events to the collector from its own thread. Create one with [`Exporter::start`],
/// [`Exporter::push`] every event, then [`Exporter::finish`].
pub struct Exporter {
    shared: Arc<Shared>,
    mode: watch::Sender<Mode>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    /// Opens the spool (resuming its numbering and unacknowledged batches) and starts the
    /// exporter thread, which connects and reconnects to the collector on its own.
    pub fn start(config: ExportConfig) -> Result<Exporter, ExportError> {
        let connection = client::Connection::new(&config)?;
        let spool = Spool::open(&config.state_dir, config.spool_max_bytes)?;
        let recovery = spool.recovery();
        if recovery.unacked_batches > 0 || recovery.corrupt_records > 0 {
            tracing::info!(
                unacked = recovery.unacked_batches,
                corrupt = recovery.corrupt_records,
                dir = %config.state_dir.display(),
                "Resuming the spool."
            );
        }
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                batcher: Batcher::new(config.max_batch_events, config.max_batch_age),
                queued: Default::default(),
                watermark: None,
                watermark_sent: None,
                since_ns: 0,
                ended: false,
            }),
            writer: Mutex::new(SpoolWriter { spool, losses: BTreeMap::new() }),
            queued: Notify::new(),
            spooled: Notify::new(),
            counters: Counters::default(),
            last_error: Mutex::new(None),
            queue_batches: config.queue_batches.max(1),
            max_batch_events: config.max_batch_events.max(1),
            urgent_resets: config.urgent_resets,
        });
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ExportError::Thread)?;
        let (mode_tx, mode_rx) = watch::channel(Mode::Running);
        let thread = {
            let shared = shared.clone();
            let tick = (config.max_batch_age / 4).clamp(Duration::from_millis(5), Duration::from_millis(50));
            std::thread::Builder::new()
                .name("rstscope-export".into())
                .spawn(move || {
                    runtime.block_on(async move {
                        let _span = tracing::info_span!("export").entered();
                        let spooler = tokio::spawn(spooler(shared.clone(), tick, mode_rx.clone()));
                        client::run(shared, connection, mode_rx).await;
                        spooler.abort();
                    });
                })
                .map_err(ExportError::Thread)?
        };
        Ok(Exporter { shared, mode: mode_tx, thread: Some(thread) })
    }

    /// Queues one event. Never waits for the network; writes to the spool itself only when the
    /// exporter thread is far behind.
    pub fn push(&self, event: &Event) {
        self.shared.counters.events.fetch_add(1, Ordering::Relaxed);
        self.shared.push(v1::Event::from(event));
    }

    /// The capture has ended (end of input, or the agent is stopping): the last watermark says
    /// so, and the collector stops waiting for this agent beyond it.
    pub fn end_of_capture(&self) {
        let mut buffer = lock(&self.shared.buffer);
        buffer.ended = true;
        if buffer.watermark.is_some() {
            buffer.watermark_sent = None;
            buffer.cut_all();
            drop(buffer);
            self.shared.queued.notify_one();
        }
    }

    /// Everything up to `ts_ns` (packet time) has been pushed, and the capture has run without
    /// a gap since `since_ns` (the run's first packet, or the live capture's start; `None`:
    /// unknown). Sent with the following batches, or at once as a batch of its own when no event
    /// is waiting (a quiet live capture still tells the collector how far it has got).
    pub fn watermark(&self, ts_ns: i64, since_ns: Option<i64>) {
        self.listed_watermark(&ListedWatermark { ts_ns, listed_until_ns: ts_ns, settling: Vec::new() }, since_ns);
    }

    /// [`Exporter::watermark`] with the later promise that names the RSTs still settling (see
    /// [`crate::flow::Tracker::listed_watermark`]): the collector need not wait out another
    /// connection's settle window before it vouches for this agent's silence.
    pub fn listed_watermark(&self, mark: &ListedWatermark, since_ns: Option<i64>) {
        let mut buffer = lock(&self.shared.buffer);
        buffer.watermark = Some(Mark::merge(buffer.watermark.take(), mark));
        if let Some(since_ns) = since_ns {
            buffer.since_ns = since_ns;
        }
        if buffer.watermark != buffer.watermark_sent {
            // Verdicts on RSTs this agent did not see wait for its watermark: it goes now, alone
            // or with the events waiting.
            if buffer.batcher.is_empty() {
                buffer.cut_all();
            } else {
                buffer.batcher.mark_urgent();
            }
            drop(buffer);
            self.shared.queued.notify_one();
        }
    }

    /// Reports packets the capture lost between `from_ns` and `until_ns` (a delta of libpcap's
    /// counters).
    pub fn capture_loss(&self, drops: CaptureDrops, from_ns: i64, until_ns: i64) {
        if drops.dropped == 0 && drops.if_dropped == 0 {
            return;
        }
        self.shared.push(loss_event(v1::CaptureLoss {
            from_ns,
            until_ns,
            capture_dropped: drops.dropped,
            interface_dropped: drops.if_dropped,
            events_dropped: 0,
            reason: CAPTURE_DROPS.to_string(),
        }));
    }

    /// Cuts the waiting events into a batch and writes everything queued to the spool now.
    pub fn flush(&self) {
        self.shared.spool_queued(true);
        if let Err(error) = lock(&self.shared.writer).spool.sync() {
            tracing::warn!(%error, "Syncing the spool failed.");
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ExportStats {
        self.shared.stats()
    }

    /// A handle that reads the counters from any thread (metrics), for as long as it lives.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.shared.clone())
    }

    /// Flushes, then waits up to `timeout` until the collector has acknowledged every batch,
    /// and stops the exporter thread. Unacknowledged batches stay in the spool for the next run.
    pub fn finish(mut self, timeout: Duration) -> FinishReport {
        self.flush();
        let _ = self.mode.send(Mode::Finishing);
        self.shared.spooled.notify_one();
        let deadline = Instant::now() + timeout;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        let stats = self.shared.stats();
        let last_error = lock(&self.shared.last_error).clone();
        FinishReport { unacked_batches: stats.last_seq - stats.acked, stats, last_error }
    }

    fn stop(&mut self) {
        let _ = self.mode.send(Mode::Abort);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("The exporter thread panicked.");
            }
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Moves batches from the queue to the spool as they are cut, and cuts the old-enough ones.
async fn spooler(shared: Arc<Shared>, tick: Duration, mut mode: watch::Receiver<Mode>) {
    loop {
        tokio::select! {
            _ = shared.queued.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            changed = mode.changed() => if changed.is_err() { return },
        }
        shared.spool_queued(false);
    }
}

/// The default state directory of agent `name`: `$XDG_STATE_HOME/rstscope/agent-<name>`, else
/// `$HOME/.local/state/rstscope/agent-<name>`, else `./rstscope-agent-<name>`. Different names
/// never share a directory.
pub fn default_state_dir(name: &str, xdg_state_home: Option<&OsStr>, home: Option<&OsStr>) -> PathBuf {
    let leaf = format!("agent-{name}");
    match (xdg_state_home.filter(|s| !s.is_empty()), home.filter(|s| !s.is_empty())) {
        (Some(state), _) => Path::new(state).join("rstscope").join(leaf),
        (None, Some(home)) => Path::new(home).join(".local/state/rstscope").join(leaf),
        (None, None) => PathBuf::from(format!("rstscope-agent-{name}")),
    }
}

/// Checks that an agent name is usable as a path component and a label: 1 to 64 of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_agent_name(name: &str) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "agent name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing longer than a collector accepts is cut, and its promise held just before the
    /// first RST cut; an older listing that reaches further is kept, a plain watermark past a
    /// listing drops it.
    #[test]
    fn listings_are_capped_and_only_move_forward() {
        use crate::event::ConnId;
        use crate::flow::SettlingRst;
        use crate::wire::TcpFlags;
        let ep = rstscope_proto::Endpoint::new(std::net::Ipv4Addr::new(198, 51, 100, 2).into(), 80);
        let rst =
            |ts_ns| SettlingRst { ts_ns, src: ep, dst: ep, conn_id: ConnId(1), seq: 0, ack: 0, flags: TcpFlags(0x14) };
        let cap = rstscope_proto::MAX_SETTLING_LISTED as i64;
        let long =
            ListedWatermark { ts_ns: 99, listed_until_ns: 10_000, settling: (100..100 + cap + 2).map(rst).collect() };
        let mark = Mark::merge(None, &long);
        assert_eq!((mark.ts_ns, mark.listed_until_ns, mark.settling.len() as i64), (99, 100 + cap - 1, cap));
        assert_eq!(mark.settling.last().map(|r| r.ts_ns), Some(100 + cap - 1));

        let short = ListedWatermark { ts_ns: 150, listed_until_ns: 150, settling: Vec::new() };
        let kept = Mark::merge(Some(mark.clone()), &short);
        assert_eq!((kept.ts_ns, kept.listed_until_ns, &kept.settling), (150, mark.listed_until_ns, &mark.settling));
        let past = ListedWatermark { ts_ns: 20_000, listed_until_ns: 20_000, settling: Vec::new() };
        assert_eq!(Mark::merge(Some(kept), &past), Mark { ts_ns: 20_000, listed_until_ns: 0, settling: Vec::new() });
    }

    #[test]
    fn state_dirs_follow_xdg_and_differ_per_name() {
        let a = default_state_dir("a", Some(OsStr::new("/s")), Some(OsStr::new("/h")));
        assert_eq!(a, PathBuf::from("/s/rstscope/agent-a"));
        let b = default_state_dir("b", None, Some(OsStr::new("/h")));
        assert_eq!(b, PathBuf::from("/h/.local/state/rstscope/agent-b"));
        assert_eq!(default_state_dir("c", Some(OsStr::new("")), None), PathBuf::from("rstscope-agent-c"));
    }

    #[test]
    fn agent_names_are_path_safe() {
        assert!(check_agent_name("edge-1.fra_2").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_agent_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dropped_events_become_one_loss_report_per_reason() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut writer = SpoolWriter { spool, losses: BTreeMap::new() };
        let counters = Counters::default();
        let reset =
            |ts_ns| v1::Event { kind: Some(v1::event::Kind::Reset(v1::RstEvent { ts_ns, ..Default::default() })) };
        let pcap_loss =
            loss_event(v1::CaptureLoss { capture_dropped: 5, reason: CAPTURE_DROPS.into(), ..Default::default() });
        writer.absorb(vec![reset(30), reset(10), pcap_loss], SPOOL_FULL, &counters);
        writer.absorb(vec![reset(20)], SPOOL_FULL, &counters);
        assert_eq!(counters.events_dropped.load(Ordering::Relaxed), 3);
        writer.write(vec![reset(40)], &counters);
        let batch = writer.spool.read(1).unwrap().unwrap();
        let losses: Vec<&v1::CaptureLoss> = batch
            .events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(v1::event::Kind::Loss(l)) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(losses.len(), 2);
        assert_eq!((losses[0].reason.as_str(), losses[0].capture_dropped), (CAPTURE_DROPS, 5));
        assert_eq!(losses[1].reason, SPOOL_FULL);
        assert_eq!((losses[1].events_dropped, losses[1].from_ns, losses[1].until_ns), (3, 10, 30));
        assert_eq!(batch.events.len(), 3, "the losses come first, then the batch's own event");
        assert!(writer.losses.is_empty());
    }
}
