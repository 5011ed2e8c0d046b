//! The I/O shell around the tracker: pull frames from sources, parse, track, hand events on.
//!
//! Errors in one input never stop the others: each is reported once (one line naming the input
//! and what is wrong) and counted in the run statistics.
//!
//! Capture files are read on two cores: a reader thread pulls and parses packets, keys them
//! (connection key and index hash, [`crate::flow::Keyed`]: the tracker is the slower half, so
//! what needs no tracker state is done here) and hands batches of them through a small bounded
//! channel to the tracker, on the calling thread.
//! The channel is FIFO with one producer, so the tracker sees packets in file order and results
//! are identical to a single-threaded run. Live captures are processed packet by packet on one
//! thread, so that an event never waits for a batch to fill.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::capture::{CaptureDrops, PacketSource, Poll};
use crate::event::Event;
use crate::flow::{Keyed, Tracker};
use crate::output::RunStats;
use crate::wire::{self, Segment, Skip};

/// Segments per batch handed from the reader thread to the tracker. The reader runs ahead and
/// waits on a full channel, so every batch costs a wake-up on both sides: 1024 segments (160 KB
/// keyed when measured, 136 KB since keyed segments carry the compact key; under 1.5 MB with all
/// batches in flight) halved the system time of 256 and cut the wall time
/// of a 10M-packet file by about a tenth; 4096 (past the L2 cache) was slower again. With keyed
/// segments, 512 or 256 with 4 batches in flight measured no better (1M-packet file, both
/// threads on one core or on two).
pub const BATCH: usize = 1024;
/// Batches in flight between the threads (bounds memory and lets the reader run ahead).
const IN_FLIGHT: usize = 8;
/// Packets between two progress reports.
const PROGRESS_EVERY: u32 = 16_384;
/// Live packets between two looks at the clock for [`run_live`]'s tick.
const LIVE_CHECK_EVERY: u32 = 256;

/// Packet and skip counters of a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Capture records read.
    pub packets: u64,
    /// Records that parsed as TCP.
    pub tcp_packets: u64,
    /// Packet time of the first record of the run (any protocol): the start of what this run
    /// can vouch for (`Watermark.since_ns`).
    pub first_packet_ns: Option<i64>,
    /// Skipped records by reason.
    pub skipped: BTreeMap<Skip, u64>,
    /// One line per input problem.
    pub errors: Vec<String>,
    /// `packets`, copied every few thousand packets (files) or at every tick (live), for other
    /// threads (metrics).
    pub published_packets: Arc<AtomicU64>,
}

impl Counters {
    /// Run statistics for the closing record.
    pub fn to_stats(&self, tracker: &Tracker) -> RunStats {
        let t = tracker.stats();
        RunStats {
            kind: "stats",
            packets: self.packets,
            tcp_packets: self.tcp_packets,
            skipped: self.skipped.iter().map(|(k, v)| (k.reason(), *v)).collect(),
            bad_ip_checksum: t.bad_ip_checksum,
            flows: t.flows,
            resets: t.resets,
            evicted: t.evicted,
            port_reuse: t.port_reuse,
            errors: self.errors.clone(),
            capture_drops: None,
        }
    }
}

/// How long after capture the kernel may still hand over a packet: the idle clock stays this
/// far behind the wall clock. The live source gets packets in blocks the kernel retires on a
/// timer ticking every [`crate::capture::BLOCK_TIMEOUT_MS`] (10 ms, rounded up to jiffies); a
/// block is retired at the first tick after a whole period, so up to about twice that (some
/// 20-24 ms) after it opened, plus the kernel's own delay between stamping a packet and
/// queueing it (a receive backlog under load). A packet later than this is still tracked, only behind a watermark
/// already sent; the collector's allowance (path slack and settle margin,
/// `collector::correlate::Config`) covers that before a silence counts. It delays every RST on
/// a quiet link by as much, so it is kept small (was 250 ms with a 200 ms block timeout).
const IDLE_DELIVERY_MARGIN: Duration = Duration::from_millis(50);

/// What [`Reader::drain`] hands on.
enum Pulled<'s> {
    /// A TCP segment.
    Segment(Segment),
    /// A live source had nothing for a moment (`true`) or `LIVE_CHECK_EVERY` packets went by
    /// (`false`): time for periodic work. With the run's first packet time so far.
    Pause(&'s mut dyn PacketSource, bool, Option<i64>),
}

/// Reads and parses packets, reporting problems once; what to do with segments is `on_segment`.
struct Reader<'a, E, P> {
    counters: &'a mut Counters,
    stop: &'a AtomicBool,
    on_error: &'a mut E,
    on_progress: &'a mut P,
}

impl<E: FnMut(&str), P: FnMut(u64, Option<u64>)> Reader<'_, E, P> {
    /// Pulls `source` dry, handing every TCP segment (and, for live sources, pauses) to `on`.
    fn drain(&mut self, source: &mut dyn PacketSource, mut on: impl FnMut(Pulled<'_>)) {
        let mut since_progress = 0u32;
        let mut since_check = 0u32;
        let live = source.is_live();
        let mut last_error: Option<String> = None;
        let mut repeated_errors = 0u32;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            match source.next_packet() {
                Ok(Poll::Packet(packet)) => {
                    self.counters.packets += 1;
                    if self.counters.first_packet_ns.is_none() {
                        self.counters.first_packet_ns = Some(packet.ts_ns);
                    }
                    match wire::parse(packet.link_type, packet.ts_ns, packet.data) {
                        Ok(segment) => {
                            self.counters.tcp_packets += 1;
                            on(Pulled::Segment(segment));
                        }
                        Err(skip) => *self.counters.skipped.entry(skip).or_default() += 1,
                    }
                    since_progress += 1;
                    if since_progress >= PROGRESS_EVERY {
                        since_progress = 0;
                        self.counters.published_packets.store(self.counters.packets, Ordering::Relaxed);
                        let (done, total) = source.progress();
                        (self.on_progress)(done, total);
                    }
                    since_check += 1;
                    if live && since_check >= LIVE_CHECK_EVERY {
                        since_check = 0;
                        self.counters.published_packets.store(self.counters.packets, Ordering::Relaxed);
                        on(Pulled::Pause(source, false, self.counters.first_packet_ns));
                    }
                }
                Ok(Poll::Idle) => {
                    self.counters.published_packets.store(self.counters.packets, Ordering::Relaxed);
                    on(Pulled::Pause(source, true, self.counters.first_packet_ns));
                }
                Ok(Poll::End) => break,
                Err(error) => {
                    let line = error.to_string();
                    // A live source failing the same way over and over must not flood the log.
                    if last_error.as_deref() == Some(line.as_str()) {
                        repeated_errors += 1;
                        if repeated_errors >= 100 {
                            let line = format!("{}: giving up after 100 identical errors", source.name());
                            (self.on_error)(&line);
                            self.counters.errors.push(line);
                            break;
                        }
                        continue;
                    }
                    (self.on_error)(&line);
                    self.counters.errors.push(line.clone());
                    last_error = Some(line);
                    repeated_errors = 0;
                }
            }
        }
        self.counters.published_packets.store(self.counters.packets, Ordering::Relaxed);
        let (done, total) = source.progress();
        (self.on_progress)(done, total);
    }
}

/// What [`run_live`] reports at every tick.
pub struct LiveTick<'a> {
    /// The tracker, e.g. for [`Tracker::watermark_ns`].
    pub tracker: &'a Tracker,
    /// libpcap's counters since the capture opened, if it can tell.
    pub drops: Option<CaptureDrops>,
    /// Packets read so far.
    pub packets: u64,
    /// Packet time of the first packet captured, if any yet.
    pub first_packet_ns: Option<i64>,
}

/// Reads a live `source` until it ends or `stop` is set, one packet at a time, like
/// [`run_source`]; in addition, when the source is idle the tracker's clock moves on by the
/// idle time (so RST events settle and quiet connections expire without new packets), and
/// `on_tick` runs about every `every` (checked every few hundred packets and on every idle
/// poll), for watermarks and capture-loss reports.
#[allow(clippy::too_many_arguments)]
pub fn run_live(
    source: &mut (dyn PacketSource + Send),
    tracker: &mut Tracker,
    counters: &mut Counters,
    stop: &AtomicBool,
    out: &mut impl FnMut(Event),
    on_error: &mut (impl FnMut(&str) + Send),
    every: Duration,
    on_tick: &mut impl FnMut(LiveTick<'_>),
) {
    let mut on_progress = |_, _| {};
    let mut reader = Reader { counters, stop, on_error, on_progress: &mut on_progress };
    let packets = reader.counters.published_packets.clone();
    // None: never (`every` too large to add).
    let mut next_tick = Instant::now().checked_add(every);
    // The latest packet time, and when the source first went idle after it.
    let mut last_ts: Option<i64> = None;
    let mut idle_since: Option<Instant> = None;
    // When the last empty poll returned.
    let mut last_idle_poll: Option<Instant> = None;
    reader.drain(source, |pulled| match pulled {
        Pulled::Segment(segment) => {
            last_ts = Some(last_ts.map_or(segment.ts_ns, |t| t.max(segment.ts_ns)));
            idle_since = None;
            last_idle_poll = None;
            tracker.on_segment(&segment, out);
        }
        Pulled::Pause(source, idle, first_packet_ns) => {
            let now = Instant::now();
            if idle {
                let since = *idle_since.get_or_insert(now);
                // Advance only to the *previous* empty poll, less a margin for the kernel's
                // delivery delay: an empty poll is trusted once the next poll was empty too. A
                // process stopped (SIGSTOP, a stall) inside a poll finds the packets captured
                // meanwhile on its next poll, not behind a clock that already jumped past them.
                let confirmed = last_idle_poll.replace(now).filter(|at| *at >= since).unwrap_or(since);
                if let Some(ts) = last_ts {
                    let idle = confirmed.duration_since(since).saturating_sub(IDLE_DELIVERY_MARGIN);
                    let idle_ns = i64::try_from(idle.as_nanos()).unwrap_or(i64::MAX);
                    tracker.advance(ts.saturating_add(idle_ns), out);
                }
            }
            if next_tick.is_some_and(|at| now >= at) {
                next_tick = now.checked_add(every);
                on_tick(LiveTick {
                    tracker,
                    drops: source.drops(),
                    packets: packets.load(Ordering::Relaxed),
                    first_packet_ns,
                });
            }
        }
    });
}

/// Reads `source` to its end (or until `stop` is set) through `tracker`.
///
/// `on_error` sees each input problem as it happens; `on_progress` is called every few thousand
/// packets with (bytes consumed, total bytes). Both run on the reader thread for files.
pub fn run_source(
    source: &mut (dyn PacketSource + Send),
    tracker: &mut Tracker,
    counters: &mut Counters,
    stop: &AtomicBool,
    out: &mut impl FnMut(Event),
    on_error: &mut (impl FnMut(&str) + Send),
    on_progress: &mut (impl FnMut(u64, Option<u64>) + Send),
) {
    if source.is_live() {
        run_live(source, tracker, counters, stop, out, on_error, Duration::MAX, &mut |_| {});
        return;
    }
    let mut reader = Reader { counters, stop, on_error, on_progress };
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<Keyed>>(IN_FLIGHT);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<Keyed>>();
    let key_hasher = tracker.key_hasher();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let send = |batch: &mut Vec<Keyed>| {
                let next = empty_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(BATCH));
                // The tracker side only hangs up if it panicked; then there is nobody to feed.
                let _ = full_tx.send(std::mem::replace(batch, next));
            };
            reader.drain(source, |pulled| {
                if let Pulled::Segment(segment) = pulled {
                    batch.push(key_hasher.keyed(segment));
                    if batch.len() == BATCH {
                        send(&mut batch);
                    }
                }
            });
            if !batch.is_empty() {
                send(&mut batch);
            }
        });
        for mut batch in full_rx {
            tracker.on_keyed(&batch, out);
            batch.clear();
            let _ = empty_tx.send(batch);
        }
    });
}
