//! Property tests for the parts of the agent that see untrusted input: the frame decoder, the
//! capture file reader and the connection tracker. Case counts are kept moderate so the whole
//! file runs in a few seconds in debug builds; `PROPTEST_CASES=5000` digs deeper. The cargo-fuzz
//! targets in `fuzz/` (run with `scripts/fuzz`) cover the same ground with coverage guidance.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;
use proptest::prelude::*;
use proptest::sample::Index;
use rstscope_agent::capture::{FileSource, PacketSource, Poll};
use rstscope_agent::event::Event;
use rstscope_agent::flow::{Tracker, TrackerConfig, TrackerStats};
use rstscope_agent::wire::{self, Checksum, LinkType, Segment, TcpFlags, TcpOptions};
use rstscope_proto::{Endpoint, FlowKey};

const T0_NS: i64 = 1_767_225_600_000_000_000;

/// `n` cases, unless `PROPTEST_CASES` asks for another number.
fn cases(n: u32) -> ProptestConfig {
    let config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        config
    } else {
        ProptestConfig { cases: n, ..config }
    }
}

/// Every link type `wire::parse` decodes.
const LINK_TYPES: [LinkType; 15] = [
    LinkType::NULL,
    LinkType::ETHERNET,
    LinkType::PPP,
    LinkType::FDDI,
    LinkType::RAW_12,
    LinkType::RAW_14,
    LinkType::PPP_HDLC,
    LinkType::RAW,
    LinkType::C_HDLC,
    LinkType::LOOP,
    LinkType::LINUX_SLL,
    LinkType::IPV4,
    LinkType::IPV6,
    LinkType::NFLOG,
    LinkType::LINUX_SLL2,
];

// ---------------------------------------------------------------------------------------------
// (a) wire::parse

/// A TCP segment as IP bytes (no link layer), IPv4 or IPv6.
fn ip_packet(v6: bool, flags: u8, payload: &[u8]) -> Vec<u8> {
    let builder = if v6 {
        PacketBuilder::ipv6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
    } else {
        PacketBuilder::ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
    };
    let mut tcp = builder.tcp(40000, 443, 1000, 64240);
    if flags & 0x02 != 0 {
        tcp = tcp.syn();
    }
    if flags & 0x04 != 0 {
        tcp = tcp.rst();
    }
    if flags & 0x10 != 0 {
        tcp = tcp.ack(7);
    }
    if flags & 0x01 != 0 {
        tcp = tcp.fin();
    }
    let mut out = Vec::new();
    tcp.write(&mut out, payload).expect("valid packet");
    out
}

/// `ip` wrapped in the link-layer header of `link_type`, as a capture would hold it.
fn frame(link_type: LinkType, v6: bool, ip: &[u8]) -> Vec<u8> {
    let ethertype: [u8; 2] = if v6 { [0x86, 0xdd] } else { [0x08, 0x00] };
    let mut out = match link_type {
        LinkType::ETHERNET => {
            let mut h = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
            h.extend_from_slice(&ethertype);
            h
        }
        LinkType::NULL => (if v6 { 30u32 } else { 2 }).to_le_bytes().to_vec(),
        LinkType::LOOP => (if v6 { 24u32 } else { 2 }).to_be_bytes().to_vec(),
        LinkType::PPP | LinkType::PPP_HDLC => vec![0xff, 0x03, 0x00, if v6 { 0x57 } else { 0x21 }],
        LinkType::C_HDLC => vec![0x0f, 0x00, ethertype[0], ethertype[1]],
        LinkType::FDDI => {
            let mut h = vec![0x50; 13];
            h.extend_from_slice(&[0xaa, 0xaa, 0x03, 0, 0, 0]);
            h.extend_from_slice(&ethertype);
            h
        }
        LinkType::LINUX_SLL => {
            let mut h = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
            h.extend_from_slice(&ethertype);
            h
        }
        LinkType::LINUX_SLL2 => {
            let mut h = ethertype.to_vec();
            h.extend_from_slice(&[0; 18]);
            h
        }
        LinkType::NFLOG => {
            let mut h = vec![if v6 { 10 } else { 2 }, 0, 0, 0];
            // A prefix TLV (type 10) to walk past, then the payload TLV (type 9).
            h.extend_from_slice(&[8, 0, 10, 0, b'f', b'w', 0, 0]);
            h.extend_from_slice(&(4 + ip.len() as u16).to_le_bytes());
            h.extend_from_slice(&9u16.to_le_bytes());
            h
        }
        _ => Vec::new(), // raw IP
    };
    out.extend_from_slice(ip);
    out
}

#[derive(Clone, Debug)]
enum Damage {
    Flip(Index, u8),
    Truncate(Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<Index>(), 1..=255u8).prop_map(|(i, x)| Damage::Flip(i, x)),
        any::<Index>().prop_map(Damage::Truncate),
    ]
}

/// Applies `damage` to `bytes`; returns the damaged offset.
fn apply(bytes: &mut Vec<u8>, damage: &Damage) -> usize {
    match damage {
        Damage::Flip(i, x) if !bytes.is_empty() => {
            let at = i.index(bytes.len());
            bytes[at] ^= x;
            at
        }
        Damage::Flip(..) => 0,
        Damage::Truncate(i) => {
            let at = i.index(bytes.len() + 1);
            bytes.truncate(at);
            at
        }
    }
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(lt in 0..LINK_TYPES.len(), bytes in prop::collection::vec(any::<u8>(), 0..160)) {
        let _ = wire::parse(LINK_TYPES[lt], 0, &bytes);
    }

    /// Valid frames of every link type decode; damaged ones (a few flipped bytes, a cut)
    /// never panic.
    #[test]
    fn parse_valid_then_damaged_frames(
        lt in 0..LINK_TYPES.len(),
        v6 in any::<bool>(),
        flags in prop_oneof![Just(0x02u8), Just(0x12), Just(0x10), Just(0x04), Just(0x14), Just(0x11)],
        payload in prop::collection::vec(any::<u8>(), 0..64),
        damages in prop::collection::vec(damage(), 0..4),
    ) {
        let link_type = LINK_TYPES[lt];
        let ip = ip_packet(v6, flags, &payload);
        let mut bytes = frame(link_type, v6, &ip);
        // Raw IPv4/IPv6 link types carry what they say; skip the mismatched family.
        let family_ok = !(link_type == LinkType::IPV4 && v6 || link_type == LinkType::IPV6 && !v6);
        if family_ok {
            let seg = wire::parse(link_type, 7, &bytes).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!((seg.src.port(), seg.dst.port(), seg.ts_ns), (40000, 443, 7));
            prop_assert_eq!(seg.flags.byte(), flags);
            prop_assert_eq!(seg.payload_len as usize, payload.len());
            prop_assert_eq!(seg.checksum, Checksum::Good);
        }
        for d in &damages {
            apply(&mut bytes, d);
        }
        if let Ok(seg) = wire::parse(link_type, 7, &bytes) {
            let _ = seg.seq_len();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) FileSource

/// Packets as (timestamp, bytes).
type Packets = Vec<(i64, Vec<u8>)>;

/// Reads `bytes` as a capture to the end: the packets and the number of errors.
/// Fails if the reader does not reach `Poll::End` within `len + 10` calls.
fn read_capture(bytes: &[u8]) -> Result<(Packets, usize), TestCaseError> {
    let Ok(mut src) = FileSource::from_reader("prop", Box::new(Cursor::new(bytes.to_vec())), None) else {
        return Ok((Vec::new(), 0));
    };
    let (mut packets, mut errors) = (Vec::new(), 0);
    for _ in 0..bytes.len() + 10 {
        match src.next_packet() {
            Ok(Poll::Packet(p)) => packets.push((p.ts_ns, p.data.to_vec())),
            Ok(Poll::Idle) => {}
            Ok(Poll::End) => return Ok((packets, errors)),
            Err(_) => errors += 1,
        }
    }
    Err(TestCaseError::fail(format!("reader still going after {} calls on {} bytes", bytes.len() + 10, bytes.len())))
}

#[derive(Clone, Debug)]
struct Record {
    sec: u32,
    frac: u32,
    data: Vec<u8>,
}

fn records() -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec(
        (1_700_000_000..1_700_000_100u32, 0..1_000_000u32, prop::collection::vec(any::<u8>(), 0..80))
            .prop_map(|(sec, frac, data)| Record { sec, frac, data }),
        0..8,
    )
}

/// A classic pcap file (micro- or nanosecond, either byte order) and where each record ends.
fn pcap(records: &[Record], big: bool, nanos: bool) -> (Vec<u8>, Vec<usize>) {
    let w32 = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&if big { v.to_be_bytes() } else { v.to_le_bytes() });
    let w16 = |out: &mut Vec<u8>, v: u16| out.extend_from_slice(&if big { v.to_be_bytes() } else { v.to_le_bytes() });
    let mut out = Vec::new();
    w32(&mut out, if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 });
    w16(&mut out, 2);
    w16(&mut out, 4);
    w32(&mut out, 0);
    w32(&mut out, 0);
    w32(&mut out, 65535);
    w32(&mut out, 1);
    let mut ends = Vec::new();
    for r in records {
        w32(&mut out, r.sec);
        w32(&mut out, r.frac);
        w32(&mut out, r.data.len() as u32);
        w32(&mut out, r.data.len() as u32 + 4);
        out.extend_from_slice(&r.data);
        ends.push(out.len());
    }
    (out, ends)
}

/// A pcapng file with one Ethernet interface (microseconds) and one enhanced packet block per
/// record, and where each packet block ends.
fn pcapng(records: &[Record], big: bool) -> (Vec<u8>, Vec<usize>) {
    let b32 = |v: u32| if big { v.to_be_bytes() } else { v.to_le_bytes() };
    let block = |kind: u32, body: &[u8]| {
        let len = 12 + body.len().div_ceil(4) * 4;
        let mut b = b32(kind).to_vec();
        b.extend_from_slice(&b32(len as u32));
        b.extend_from_slice(body);
        b.resize(len - 4, 0);
        b.extend_from_slice(&b32(len as u32));
        b
    };
    let mut shb = b32(0x1a2b_3c4d).to_vec();
    shb.extend_from_slice(&if big { [0, 1, 0, 0] } else { [1, 0, 0, 0] });
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    let mut out = block(0x0a0d_0d0a, &shb);
    let mut idb = if big { 1u16.to_be_bytes() } else { 1u16.to_le_bytes() }.to_vec();
    idb.extend_from_slice(&[0, 0]);
    idb.extend_from_slice(&b32(65535));
    out.extend(block(1, &idb));
    let mut ends = Vec::new();
    for r in records {
        let units = u64::from(r.sec) * 1_000_000 + u64::from(r.frac);
        let mut epb = b32(0).to_vec();
        epb.extend_from_slice(&b32((units >> 32) as u32));
        epb.extend_from_slice(&b32(units as u32));
        epb.extend_from_slice(&b32(r.data.len() as u32));
        epb.extend_from_slice(&b32(r.data.len() as u32));
        epb.extend_from_slice(&r.data);
        out.extend(block(6, &epb));
        ends.push(out.len());
    }
    (out, ends)
}

fn arbitrary_capture() -> impl Strategy<Value = Vec<u8>> {
    let tail = || prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        tail(),
        // Past the magic checks, so the record and block parsers see the random bytes.
        (any::<bool>(), tail()).prop_map(|(nanos, t)| [pcap(&[], false, nanos).0, t].concat()),
        tail().prop_map(|t| [pcap(&[], true, false).0, t].concat()),
        (any::<bool>(), tail()).prop_map(|(big, t)| [pcapng(&[], big).0, t].concat()),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn file_source_never_panics_and_ends(bytes in arbitrary_capture()) {
        read_capture(&bytes)?;
    }

    /// A damaged capture still yields, unchanged and in order, every packet whose record lies
    /// wholly before the damage; damage inside packet data loses nothing.
    #[test]
    fn damaged_capture_keeps_packets_before_the_damage(
        recs in records(),
        format in 0..4u8,
        big in any::<bool>(),
        damage in damage(),
    ) {
        let nanos = format == 1;
        let (mut bytes, ends) = if format < 2 { pcap(&recs, big, nanos) } else { pcapng(&recs, big) };
        let expected: Packets = recs
            .iter()
            .map(|r| (i64::from(r.sec) * 1_000_000_000 + i64::from(r.frac) * if nanos { 1 } else { 1000 }, r.data.clone()))
            .collect();
        let (clean, errors) = read_capture(&bytes)?;
        prop_assert_eq!(errors, 0);
        prop_assert_eq!(&clean, &expected);

        let at = apply(&mut bytes, &damage);
        let intact = ends.iter().take_while(|&&end| end <= at).count();
        let (got, _) = read_capture(&bytes)?;
        prop_assert!(got.len() >= intact, "{} packets, {} intact before byte {}", got.len(), intact, at);
        prop_assert_eq!(&got[..intact], &expected[..intact]);
        // A flipped byte inside a packet's data (pcap: after its 16-byte record header) changes
        // that packet only.
        if let (Damage::Flip(..), true) = (&damage, format < 2) {
            if let Some(k) = (0..recs.len()).find(|&k| at < ends[k]) {
                if at >= ends[k] - recs[k].data.len() {
                    prop_assert_eq!(got.len(), recs.len());
                    prop_assert_eq!(&got[k + 1..], &expected[k + 1..]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (c), (d), (e) the tracker

/// A handful of endpoints in both families, so tuples collide and records get reused.
fn endpoint(i: usize) -> Endpoint {
    let v4 = |d| IpAddr::V4(Ipv4Addr::new(192, 0, 2, d));
    let v6 = |d| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, d));
    match i % 6 {
        0 => Endpoint::new(v4(1), 40000),
        1 => Endpoint::new(v4(1), 40001),
        2 => Endpoint::new(v4(2), 80),
        3 => Endpoint::new(v4(3), 443),
        4 => Endpoint::new(v6(1), 50000),
        _ => Endpoint::new(v6(2), 80),
    }
}

fn any_endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        (0..6usize).prop_map(endpoint),
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| Endpoint::new(IpAddr::V4(a.into()), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| Endpoint::new(IpAddr::V6(a.into()), p)),
    ]
}

/// Largest payload length `wire::parse` can report: a pcapng block's worth (IP lengths are
/// 16-bit, but a jumbogram or a bad length field falls back to the captured bytes).
/// (The tracker's own `classify::seq_len` overflows on lengths near u32::MAX, which no parsed
/// packet has.)
const MAX_PAYLOAD: u32 = 1 << 24;

#[derive(Clone, Debug)]
struct SegSpec {
    src: usize,
    dst: usize,
    flags: u16,
    seq_delta: i32,
    ack_delta: i32,
    payload_len: u32,
    dt_ms: i64,
    checksum: u8,
    ip_header_ok: bool,
}

fn flags() -> impl Strategy<Value = u16> {
    use TcpFlags as F;
    prop_oneof![
        3 => Just(F::SYN),
        2 => Just(F::SYN | F::ACK),
        4 => Just(F::ACK),
        3 => Just(F::PSH | F::ACK),
        2 => Just(F::FIN | F::ACK),
        3 => Just(F::RST),
        3 => Just(F::RST | F::ACK),
        2 => 0..0x1000u16,
    ]
}

fn seg_spec() -> impl Strategy<Value = SegSpec> {
    (
        (0..6usize, 0..6usize, flags()),
        (-3000..3000i32, -3000..3000i32, prop_oneof![4 => Just(0u32), 4 => 1..1500u32, 1 => 0..MAX_PAYLOAD]),
        // Mostly forward in small steps, sometimes backwards, sometimes past the timeouts.
        prop_oneof![8 => 0..3000i64, 2 => -5000..0i64, 1 => 4_000..400_000i64],
        (0..3u8, prop::bool::weighted(0.9)),
    )
        .prop_map(|((src, dst, flags), (seq_delta, ack_delta, payload_len), dt_ms, (checksum, ip_header_ok))| {
            SegSpec { src, dst, flags, seq_delta, ack_delta, payload_len, dt_ms, checksum, ip_header_ok }
        })
}

/// A conversation: sequence numbers around two bases (one per side of each endpoint pair; the
/// base may sit just below 2^32 so numbers wrap), timestamps around T0.
fn conversation() -> impl Strategy<Value = Vec<Segment>> {
    (prop_oneof![Just(u32::MAX - 1000), any::<u32>(), Just(1000)], prop::collection::vec(seg_spec(), 0..48)).prop_map(
        |(base, specs)| {
            let mut ts = T0_NS;
            specs
                .into_iter()
                .map(|s| {
                    ts += s.dt_ms * 1_000_000;
                    // Each endpoint numbers its bytes from its own base, so the peer's ACKs can line up.
                    let side_base = |e: usize| base.wrapping_add((e as u32).wrapping_mul(0x1000_0000));
                    Segment {
                        ts_ns: ts,
                        src: endpoint(s.src),
                        dst: endpoint(s.dst),
                        seq: side_base(s.src).wrapping_add(s.seq_delta as u32),
                        ack: side_base(s.dst).wrapping_add(s.ack_delta as u32),
                        flags: TcpFlags(s.flags),
                        window: 65535,
                        payload_len: s.payload_len,
                        ttl: 64,
                        ip_id: (s.src < 4).then_some(s.seq_delta as u16),
                        checksum: [Checksum::Good, Checksum::Bad, Checksum::Unverified][usize::from(s.checksum)],
                        options: TcpOptions { mss: Some(1460), window_scale: Some(7), ..TcpOptions::default() },
                        vlan: None,
                        ip_header_ok: s.ip_header_ok,
                    }
                })
                .collect()
        },
    )
}

fn small_config() -> impl Strategy<Value = TrackerConfig> {
    (1..=4usize, 0..10i64, any::<bool>()).prop_map(|(max_flows, linger_s, ignore_checksums)| TrackerConfig {
        max_flows,
        linger_ns: linger_s * 1_000_000_000,
        ignore_checksums,
        ..TrackerConfig::default()
    })
}

fn run(config: TrackerConfig, segments: &[Segment]) -> (Vec<Event>, TrackerStats) {
    let mut tracker = Tracker::new(config);
    let mut events = Vec::new();
    for seg in segments {
        tracker.on_segment(seg, &mut |e| events.push(e));
    }
    tracker.finish_all(&mut |e| events.push(e));
    (events, tracker.stats())
}

fn counts(events: &[Event]) -> (usize, usize) {
    let resets = events.iter().filter(|e| matches!(e, Event::Reset(_))).count();
    let flows = events.iter().filter(|e| matches!(e, Event::Flow(_))).count();
    (resets, flows)
}

/// Open events' record ids, in order, and the records' (flow summaries') ids.
fn open_and_flow_ids(events: &[Event]) -> (Vec<u64>, Vec<u64>) {
    let mut opens = Vec::new();
    let mut flows = Vec::new();
    for event in events {
        match event {
            Event::Open(o) => opens.push(o.conn_id.0),
            Event::Flow(f) => flows.push(f.conn_id.0),
            Event::Reset(_) => {}
        }
    }
    (opens, flows)
}

proptest! {
    #![proptest_config(cases(256))]

    /// (c) + (e): no panic on any sequence of segments, with a tiny table so eviction runs,
    /// and the books balance: one Reset per RST segment, one Flow per record created.
    #[test]
    fn tracker_accounts_for_every_segment(config in small_config(), segments in conversation()) {
        let max_flows = config.max_flows as u64;
        let (events, stats) = run(config, &segments);
        let (resets, flows) = counts(&events);
        let rst_segments = segments.iter().filter(|s| s.flags.rst()).count();
        prop_assert_eq!(resets, rst_segments, "Reset events vs RST segments");
        prop_assert_eq!(flows as u64, stats.flows, "Flow events vs stats.flows");
        prop_assert_eq!(stats.resets, resets as u64);
        // At most one Open per record, always before that record's summary. A connection id is
        // a digest of the key and the first packet's time, so with a one-record table and time
        // going backwards two records can share one: count per id, and look for the summary
        // after each Open.
        let (opens, flow_ids) = open_and_flow_ids(&events);
        prop_assert_eq!(stats.opens, opens.len() as u64);
        for id in &opens {
            let with_id = |ids: &[u64]| ids.iter().filter(|i| *i == id).count();
            prop_assert!(with_id(&opens) <= with_id(&flow_ids), "a record with two Opens: {}", id);
        }
        for (at, event) in events.iter().enumerate() {
            if let Event::Open(open) = event {
                let id = open.conn_id.0;
                let later = events[at..].iter().any(|e| matches!(e, Event::Flow(f) if f.conn_id.0 == id));
                prop_assert!(later, "Open {} without a later summary", id);
            }
        }
        prop_assert_eq!(stats.segments, segments.len() as u64);
        prop_assert_eq!(stats.active, 0);
        prop_assert!(stats.peak_active <= max_flows, "peak {} > max_flows {}", stats.peak_active, max_flows);
    }

    /// (d) the key is direction-free.
    #[test]
    fn flow_key_is_symmetric(a in any_endpoint(), b in any_endpoint()) {
        let key = FlowKey::new(a, b);
        prop_assert_eq!(key, FlowKey::new(b, a));
        prop_assert!(key.lo() <= key.hi());
        prop_assert!(key.is_lo_to_hi(&a) == (key.lo() == a));
    }

    /// (d) the same conversations with every packet's source and destination swapped (each
    /// connection seen from the other key perspective: its `lo` end now sends what `hi` sent)
    /// give the same records and RSTs. Zeek guesses the originator of a connection that starts
    /// without a SYN from well-known server ports, which would move with the swap, so the ports
    /// are first lifted out of that list (all of it is below 32768).
    #[test]
    fn swapping_src_and_dst_is_a_renaming(config in small_config(), segments in conversation()) {
        let unlikely = |e: Endpoint| Endpoint::new(e.ip(), e.port() | 0x8000);
        let plain: Vec<Segment> =
            segments.iter().map(|s| Segment { src: unlikely(s.src), dst: unlikely(s.dst), ..*s }).collect();
        let swapped: Vec<Segment> = plain.iter().map(|s| Segment { src: s.dst, dst: s.src, ..*s }).collect();
        let (a, _) = run(config.clone(), &plain);
        let (b, _) = run(config, &swapped);
        prop_assert_eq!(counts(&a), counts(&b));
        prop_assert_eq!(summaries(&a), summaries(&b));
    }

    /// (d) stronger: swapping only the addresses (ports stay with the sender) flips which end of
    /// each key sends every packet while leaving the port heuristics nothing to notice, so
    /// the records must match state for state and history for history.
    #[test]
    fn swapping_addresses_is_invisible(config in small_config(), segments in conversation()) {
        let swapped: Vec<Segment> = segments
            .iter()
            .map(|s| Segment {
                src: Endpoint::new(s.dst.ip(), s.src.port()),
                dst: Endpoint::new(s.src.ip(), s.dst.port()),
                ..*s
            })
            .collect();
        let (a, _) = run(config.clone(), &segments);
        let (b, _) = run(config, &swapped);
        prop_assert_eq!(counts(&a), counts(&b));
        prop_assert_eq!(summaries(&a), summaries(&b));
    }
}

/// Per record: Zeek state, history and how it ended, in emission order.
fn summaries(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Flow(f) => Some(format!("{} {} {:?}", f.conn_state, f.history, f.end)),
            Event::Reset(_) | Event::Open(_) => None,
        })
        .collect()
}

/// Regression, found by the `track` fuzz target: packet times further apart than an i64 can
/// hold (a pcapng `if_tsoffset` saturating to i64::MIN, then a normal time) once overflowed the
/// tracker's time arithmetic. The tracker now clamps times to +-2^62 ns (`flow::TS_LIMIT`).
#[test]
fn extreme_timestamps_do_not_overflow() {
    let a = endpoint(0);
    let b = endpoint(2);
    let seg = |ts_ns, src, dst, flags| Segment {
        ts_ns,
        src,
        dst,
        seq: 1000,
        ack: 0,
        flags: TcpFlags(flags),
        window: 0,
        payload_len: 0,
        ttl: 64,
        ip_id: None,
        checksum: Checksum::Good,
        options: TcpOptions::default(),
        vlan: None,
        ip_header_ok: true,
    };
    let segments =
        [seg(i64::MIN, a, b, TcpFlags::RST), seg(i64::MAX, a, b, TcpFlags::RST), seg(i64::MAX, b, a, TcpFlags::SYN)];
    let (events, _) = run(TrackerConfig::default(), &segments);
    assert_eq!(counts(&events).0, 2);
}

/// TCP option bytes that look like real ones often: known kinds with right and wrong lengths,
/// unknown kinds, NOP runs, end-of-list, truncation.
fn option_bytes() -> impl Strategy<Value = Vec<u8>> {
    let option = prop_oneof![
        Just(vec![0u8]),
        Just(vec![1u8]),
        any::<u16>().prop_map(|mss| vec![2, 4, (mss >> 8) as u8, mss as u8]),
        any::<u8>().prop_map(|ws| vec![3, 3, ws]),
        Just(vec![4u8, 2]),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| {
            let mut v = vec![8, 10];
            v.extend(a.to_be_bytes());
            v.extend(b.to_be_bytes());
            v
        }),
        (1..=4usize).prop_map(|blocks| {
            let mut v = vec![5, (2 + 8 * blocks) as u8];
            v.resize(2 + 8 * blocks, 7);
            v
        }),
        // Any kind with any length byte and a few bytes after it.
        (any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..6)).prop_map(|(k, n, rest)| {
            let mut v = vec![k, n];
            v.extend(rest);
            v
        }),
    ];
    proptest::collection::vec(option, 0..8).prop_map(|opts| {
        let mut bytes: Vec<u8> = opts.concat();
        bytes.truncate(40);
        bytes
    })
}

/// What etherparse's option iterator reads: the values the agent took from it before it walked
/// the options itself.
/// (The layout is left empty: etherparse has none.)
fn etherparse_values(bytes: &[u8]) -> TcpOptions {
    use etherparse::{TcpOptionElement, TcpOptionsIterator};
    let mut out = TcpOptions::default();
    for option in TcpOptionsIterator::from_slice(bytes).take(40).flatten() {
        match option {
            TcpOptionElement::MaximumSegmentSize(v) => out.mss = Some(v),
            TcpOptionElement::WindowScale(v) => out.window_scale = Some(v),
            TcpOptionElement::SelectiveAcknowledgementPermitted => out.sack_permitted = true,
            TcpOptionElement::Timestamp(a, b) => out.timestamps = Some((a, b)),
            _ => {}
        }
    }
    out
}

proptest! {
    #![proptest_config(cases(2048))]

    /// The agent's own option walk reads exactly the values etherparse's iterator read, so
    /// window scaling (and with it conn_state/history) cannot change with it.
    #[test]
    fn option_walk_reads_what_etherparse_read(bytes in option_bytes()) {
        let values = TcpOptions { layout: Default::default(), ..TcpOptions::parse(&bytes) };
        prop_assert_eq!(values, etherparse_values(&bytes));
    }
}
