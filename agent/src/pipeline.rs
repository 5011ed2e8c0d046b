//! The I/O shell around the tracker: pull frames from sources, parse, track, hand events on.
//!
//! Errors in one input never stop the others: each is reported once (one line naming the input
//! and what is wrong) and counted in the run statistics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::capture::{PacketSource, Poll};
use crate::event::Event;
use crate::flow::Tracker;
use crate::output::RunStats;
use crate::wire::{self, Skip};

/// Segments handed to the tracker at once.
const BATCH: usize = 16;

/// Packet and skip counters of a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Capture records read.
    pub packets: u64,
    /// Records that parsed as TCP.
    pub tcp_packets: u64,
    /// Skipped records by reason.
    pub skipped: BTreeMap<Skip, u64>,
    /// One line per input problem.
    pub errors: Vec<String>,
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

/// Reads `source` to its end (or until `stop` is set) through `tracker`.
///
/// `on_error` sees each input problem as it happens; `on_progress` is called every few thousand
/// packets with (bytes consumed, total bytes). Idle polls of a live source advance the tracker's
/// clock by the idle time measured in packet time elapsed since the last packet is not known, so
/// expiry there happens on the next packet.
pub fn run_source(
    source: &mut dyn PacketSource,
    tracker: &mut Tracker,
    counters: &mut Counters,
    stop: &AtomicBool,
    out: &mut impl FnMut(Event),
    on_error: &mut impl FnMut(&str),
    on_progress: &mut impl FnMut(u64, Option<u64>),
) {
    let mut since_progress = 0u32;
    let mut last_error: Option<String> = None;
    let mut repeated_errors = 0u32;
    // Segments go to the tracker in small batches so their table look-ups overlap (see
    // `Tracker::on_segments`); a batch is flushed before anything that could wait (idle, end).
    let batch_size = if source.is_live() { 1 } else { BATCH };
    let mut batch: Vec<crate::wire::Segment> = Vec::with_capacity(batch_size);
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match source.next_packet() {
            Ok(Poll::Packet(packet)) => {
                counters.packets += 1;
                match wire::parse(packet.link_type, packet.ts_ns, packet.data) {
                    Ok(segment) => {
                        counters.tcp_packets += 1;
                        batch.push(segment);
                        if batch.len() >= batch_size {
                            tracker.on_segments(&batch, out);
                            batch.clear();
                        }
                    }
                    Err(skip) => *counters.skipped.entry(skip).or_default() += 1,
                }
                since_progress += 1;
                if since_progress >= 16_384 {
                    since_progress = 0;
                    let (done, total) = source.progress();
                    on_progress(done, total);
                }
            }
            Ok(Poll::Idle) => {
                tracker.on_segments(&batch, out);
                batch.clear();
            }
            Ok(Poll::End) => break,
            Err(error) => {
                let line = error.to_string();
                // A live source failing the same way over and over must not flood the log or spin.
                if last_error.as_deref() == Some(line.as_str()) {
                    repeated_errors += 1;
                    if repeated_errors >= 100 {
                        let line = format!("{}: giving up after 100 identical errors", source.name());
                        on_error(&line);
                        counters.errors.push(line);
                        break;
                    }
                    continue;
                }
                on_error(&line);
                counters.errors.push(line.clone());
                last_error = Some(line);
                repeated_errors = 0;
            }
        }
    }
    tracker.on_segments(&batch, out);
    let (done, total) = source.progress();
    on_progress(done, total);
}
