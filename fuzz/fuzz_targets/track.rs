//! The connection tracker on arbitrary segment sequences: few endpoints (IPv4 and IPv6, so
//! tuples collide and records split/reuse), sequence numbers clustered around a base that may
//! sit next to 2^32, timestamps that mostly advance but sometimes go backwards or jump anywhere
//! in i64, and a tiny table so eviction runs constantly. Checks the tracker's accounting:
//! every RST gives exactly one Reset event, every record exactly one Flow event.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use rstscope_agent::event::Event;
use rstscope_agent::flow::{Tracker, TrackerConfig};
use rstscope_agent::wire::{Checksum, Segment, TcpFlags, TcpOptions};
use rstscope_proto::Endpoint;

const T0_NS: i64 = 1_767_225_600_000_000_000;
/// Extreme timestamps reach the tracker's clamp (`flow::TS_LIMIT`, +-2^62 ns) and beyond.
const TS_LIMIT: i64 = i64::MAX;

fn endpoint(i: u8) -> Endpoint {
    let v4 = |d| IpAddr::V4(Ipv4Addr::new(192, 0, 2, d));
    let v6 = |d| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, d));
    match i % 8 {
        0 => Endpoint::new(v4(1), 40000),
        1 => Endpoint::new(v4(1), 40001),
        2 => Endpoint::new(v4(2), 80),
        3 => Endpoint::new(v4(3), 80),
        4 => Endpoint::new(v6(1), 40000),
        5 => Endpoint::new(v6(2), 80),
        // Same port on both hosts: exercises the port-based originator guess.
        6 => Endpoint::new(v4(2), 40000),
        _ => Endpoint::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    Forward(u16),
    ForwardSeconds(u8),
    Backward(u16),
    Same,
    Jump(i64),
}

#[derive(Arbitrary, Debug)]
struct RawSeg {
    src: u8,
    dst: u8,
    flags: u16,
    seq_delta: i16,
    ack_delta: i16,
    /// Low bit picks the sequence base (the sender's or the peer's), so ACKs line up sometimes.
    seq_mode: u8,
    payload: u16,
    big_payload: bool,
    window: u16,
    ttl: u8,
    ip_id: Option<u16>,
    checksum: u8,
    ip_header_ok: bool,
    mss: Option<u16>,
    ws: Option<u8>,
    step: Step,
}

fn segments(u: &mut Unstructured<'_>) -> arbitrary::Result<(TrackerConfig, Vec<Segment>)> {
    let secs = |v: u8| i64::from(v % 16) * 1_000_000_000;
    let config = TrackerConfig {
        inactivity_timeout_ns: secs(u.arbitrary()?).max(1),
        linger_ns: secs(u.arbitrary()?),
        attempt_timeout_ns: secs(u.arbitrary()?),
        settle_ns: secs(u.arbitrary()?),
        max_flows: usize::from(u.arbitrary::<u8>()? % 5),
        ignore_checksums: u.arbitrary()?,
    };
    let bases: [u32; 2] = match u.arbitrary::<u8>()? % 3 {
        0 => [u32::MAX - 200, 100],
        1 => [u.arbitrary()?, u.arbitrary()?],
        _ => [1000, 5000],
    };
    let mut ts: i64 = match u.arbitrary::<u8>()? % 4 {
        0 => 0,
        1 => TS_LIMIT - 20_000_000_000,
        2 => -TS_LIMIT,
        _ => T0_NS,
    };
    let mut out = Vec::new();
    while !u.is_empty() && out.len() < 512 {
        let r: RawSeg = u.arbitrary()?;
        ts = match r.step {
            Step::Forward(ms) => ts.saturating_add(i64::from(ms) * 1_000_000),
            Step::ForwardSeconds(s) => ts.saturating_add(i64::from(s) * 1_000_000_000),
            Step::Backward(ms) => ts.saturating_sub(i64::from(ms) * 1_000_000),
            Step::Same => ts,
            Step::Jump(t) => t,
        }
        .clamp(-TS_LIMIT, TS_LIMIT);
        let base = bases[usize::from(r.seq_mode & 1)];
        let peer = bases[usize::from((r.seq_mode & 1) ^ 1)];
        let flags = TcpFlags(r.flags & 0xfff);
        out.push(Segment {
            ts_ns: ts,
            src: endpoint(r.src),
            dst: endpoint(r.dst),
            seq: base.wrapping_add(r.seq_delta as i32 as u32),
            ack: peer.wrapping_add(r.ack_delta as i32 as u32),
            flags,
            window: r.window,
            // wire::parse reports at most a pcapng block's worth (16 MiB); the tracker's
            // classify::seq_len overflows near u32::MAX, which no parsed packet reaches.
            payload_len: if r.big_payload { u32::from(r.payload) << 8 } else { u32::from(r.payload % 3000) },
            ttl: r.ttl,
            ip_id: r.ip_id,
            checksum: match r.checksum % 3 {
                0 => Checksum::Good,
                1 => Checksum::Bad,
                _ => Checksum::Unverified,
            },
            options: TcpOptions {
                mss: r.mss,
                window_scale: r.ws,
                sack_permitted: r.ws.is_some(),
                timestamps: None,
                ..TcpOptions::default()
            },
            vlan: None,
            ip_header_ok: r.ip_header_ok,
        });
    }
    Ok((config, out))
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((config, segs)) = segments(&mut u) else { return };
    let mut tracker = Tracker::new(config);
    let (mut resets, mut flows) = (0u64, 0u64);
    let mut count = |e: Event| match e {
        Event::Reset(_) => resets += 1,
        Event::Flow(_) => flows += 1,
        Event::Open(_) => {}
    };
    for seg in &segs {
        tracker.on_segment(seg, &mut count);
    }
    tracker.finish_all(&mut count);
    let stats = tracker.stats();
    let rst_segments = segs.iter().filter(|s| s.flags.rst()).count() as u64;
    assert_eq!(resets, rst_segments, "Reset events vs RST segments");
    assert_eq!(stats.resets, resets, "stats.resets vs Reset events");
    assert_eq!(stats.flows, flows, "stats.flows vs Flow events");
    assert_eq!(stats.active, 0, "records left after finish_all");
    assert_eq!(stats.segments, segs.len() as u64);
});
