//! Profiling driver: reads a capture into memory, then runs only the flow tracker over it.
//!
//! `cargo run --release -p rstscope-agent --example track_file -- FILE [--single]`
//!
//! Parsing happens before the clock starts, so the time (and, under `valgrind --tool=callgrind
//! --toggle-collect='*Tracker*on_segments*'`, the instruction count) is the tracker's alone. The
//! tracker is fed in batches of 256 through `on_segments`, as the agent's file pipeline does;
//! `--single` feeds one segment at a time through `on_segment`, as live capture does.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use rstscope_agent::capture::{FileSource, PacketSource, Poll};
use rstscope_agent::event::Event;
use rstscope_agent::flow::{Tracker, TrackerConfig};
use rstscope_agent::wire;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else { bail!("usage: track_file FILE [--single]") };
    let single = args.iter().any(|a| a == "--single");
    let mut src = FileSource::open(path).with_context(|| format!("opening {path}"))?;
    let mut segments = Vec::new();
    loop {
        match src.next_packet() {
            Ok(Poll::Packet(p)) => {
                if let Ok(seg) = wire::parse(p.link_type, p.ts_ns, p.data) {
                    segments.push(seg);
                }
            }
            Ok(Poll::Idle) | Err(_) => {}
            Ok(Poll::End) => break,
        }
    }
    let mut tracker = Tracker::new(TrackerConfig::default());
    let (mut resets, mut flows, mut opens) = (0u64, 0u64, 0u64);
    let mut sink = |ev: Event| match ev {
        Event::Reset(_) => resets += 1,
        Event::Flow(_) => flows += 1,
        Event::Open(_) => opens += 1,
    };
    let start = Instant::now();
    if single {
        for seg in &segments {
            tracker.on_segment(seg, &mut sink);
        }
    } else {
        for batch in segments.chunks(256) {
            tracker.on_segments(batch, &mut sink);
        }
    }
    tracker.finish_all(&mut sink);
    let took = start.elapsed();
    println!(
        "{} segments in {:.3} s ({:.2} M/s): {resets} resets, {flows} flows, {opens} opens",
        segments.len(),
        took.as_secs_f64(),
        segments.len() as f64 / took.as_secs_f64() / 1e6
    );
    Ok(())
}
