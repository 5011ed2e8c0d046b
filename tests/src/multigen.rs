//! Deterministic multi-vantage captures: one network, several capture points, one pcap each.
//!
//! A [`Scenario`] is a small world: a client and a server host joined by a path of `hops` hops
//! (position 0 is the client, position `hops` the server), a few TCP connections written as
//! ladders, and vantage points that capture at a position of the path (the client host, the
//! server host, a router in the middle). Every packet is described once, at its origin, in the
//! client's numbering; each vantage then sees its own copy:
//!
//! * **when**: send time + one-way delay per hop travelled + that vantage's clock skew (rounded
//!   down to the microsecond, the pcap's resolution);
//! * **TTL**: the origin's initial TTL minus the hops travelled (an endpoint sees its own packets
//!   with the initial TTL);
//! * **whether at all**: a packet dropped at position `d` is seen only between its origin and `d`;
//!   a forged packet starts at the forger's position and is seen only downstream of it; a vantage
//!   captures only inside its time range and outside its gaps;
//! * **addresses**: beyond a NAT the client endpoint is the NAT's outside one;
//! * **numbers**: beyond an ISN-randomising firewall the client's sequence space (and the
//!   server's acknowledgments of it) is shifted by a constant.
//!
//! IPv4 IDs count up per host in send order; TCP timestamps run on a per-host millisecond clock
//! and echo the newest value that had reached the sender. SYNs carry Linux's option layout (MSS,
//! SACK-permitted, timestamps, NOP, window scale). Random choices (ISNs, IP ID and timestamp
//! bases) come from a SplitMix64 seeded by the scenario's name, so a scenario always gives
//! byte-identical files.
//!
//! Each scenario carries what a correct correlator must conclude about each RST ([`Expect`]):
//! the verdict, the cause, `both_directions`, where on the path, which vantages saw it (checked
//! against the physical model), and the cause each agent on its own should give. [`scenarios`]
//! is the table; the `multigen` binary writes it out and prints it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use etherparse::{PacketBuilder, TcpOptionElement};
use rstscope_agent::wire::{Checksum, Segment, TcpFlags, TcpOptions};
use rstscope_proto::Endpoint;

use crate::gen::{PcapWriter, SplitMix64};

/// Scenario time zero: 2026-01-01T00:00:00Z, in ns since the Unix epoch.
pub const T0_NS: i64 = 1_767_225_600_000_000_000;
/// One millisecond in ns.
pub const MS: i64 = 1_000_000;
/// One second in ns.
pub const SEC: i64 = 1_000_000_000;

/// One end of every connection of a scenario.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// The originator, at position 0.
    Client,
    /// The responder, at position `hops`.
    Server,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Server => 1,
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// Who put a packet on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Origin {
    /// The host itself.
    Host(Side),
    /// A middlebox at `pos` forging a packet that claims to come from `claimed`.
    Forger {
        /// Position of the forger on the path (strictly between the hosts).
        pos: u8,
        /// The endpoint the packet pretends to come from.
        claimed: Side,
    },
}

impl Origin {
    /// The endpoint the packet claims to come from.
    pub fn claimed(self) -> Side {
        match self {
            Origin::Host(s) => s,
            Origin::Forger { claimed, .. } => claimed,
        }
    }
}

/// A host: its address and how its stack numbers things.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// Its address (documentation ranges only).
    pub addr: IpAddr,
    /// Initial TTL / hop limit of its packets.
    pub ttl: u8,
}

/// Source NAT of the client on the path.
#[derive(Clone, Copy, Debug)]
pub struct Nat {
    /// Position of the NAT; vantages beyond it see the outside endpoint.
    pub pos: u8,
    /// The outside address.
    pub outside: IpAddr,
    /// Outside port = inside port + this (40000 -> 61000).
    pub port_offset: u16,
}

/// A firewall that randomises initial sequence numbers by shifting them by a constant.
#[derive(Clone, Copy, Debug)]
pub struct IsnShift {
    /// Position of the firewall; vantages beyond it see shifted numbers.
    pub pos: u8,
    /// Added to the client's sequence numbers (and the server's acks of them).
    pub client: u32,
    /// Added to the server's sequence numbers (and the client's acks of them).
    pub server: u32,
}

/// The path between the hosts.
#[derive(Clone, Copy, Debug)]
pub struct PathModel {
    /// Hops from client to server; the server sees the client's packets with TTL - hops.
    pub hops: u8,
    /// One-way delay per hop.
    pub hop_delay_ns: i64,
    /// Client source NAT, if any.
    pub nat: Option<Nat>,
    /// ISN-randomising firewall, if any.
    pub isn_shift: Option<IsnShift>,
}

/// How a vantage's capture file is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// Classic microsecond pcap.
    Pcap,
    /// pcapng; after each gap an Interface Statistics Block reports the packets it lost
    /// (`isb_ifdrop`), as a capture that knows about its own drops would.
    PcapngWithDropStats,
}

/// A capture point.
#[derive(Clone, Debug)]
pub struct Vantage {
    /// Agent name (`client`, `server`, `mid`), the `NAME=` of `rstscope analyze`.
    pub name: &'static str,
    /// Position on the path.
    pub pos: u8,
    /// Its clock minus the true time.
    pub skew_ns: i64,
    /// Captures packets arriving from this true time on.
    pub from_ns: i64,
    /// ... up to this true time.
    pub until_ns: i64,
    /// True-time intervals in which it lost every packet.
    pub gaps: Vec<(i64, i64)>,
    /// File format.
    pub format: Format,
}

/// One connection: the client and server endpoints as the client host sees them.
#[derive(Clone, Copy, Debug)]
pub struct ConnSpec {
    /// Client endpoint (inside any NAT).
    pub client: SocketAddr,
    /// Server endpoint.
    pub server: SocketAddr,
}

/// One packet, as its origin sent it, in the client host's numbering.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Index in [`Scenario::packets`].
    pub index: usize,
    /// Connection index.
    pub conn: usize,
    /// True send time.
    pub t_ns: i64,
    /// Who sent it.
    pub origin: Origin,
    /// TCP flags.
    pub flags: TcpFlags,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (0 without ACK).
    pub ack: u32,
    /// Raw window.
    pub window: u16,
    /// Payload length.
    pub len: u32,
    /// Initial TTL at the origin.
    pub ttl: u8,
    /// IPv4 ID; `None` means "the host's counter" (hosts) or IPv6.
    pub ip_id: Option<u16>,
    /// TCP options (timestamps are filled in when the scenario is built).
    pub options: TcpOptions,
    /// Carry the timestamps option (filled from the host's clock).
    pub timestamps: bool,
    /// Wrong TCP checksum.
    pub bad_checksum: bool,
    /// Dropped at this position of the path.
    pub drop_at: Option<u8>,
}

impl Packet {
    /// Drops the packet at `pos`: vantages between its origin and `pos` see it, the rest not.
    pub fn drop_at(&mut self, pos: u8) -> &mut Self {
        self.drop_at = Some(pos);
        self
    }
    /// Gives it a wrong TCP checksum.
    pub fn bad_checksum(&mut self) -> &mut Self {
        self.bad_checksum = true;
        self
    }
    /// Sets the sequence number.
    pub fn seq(&mut self, seq: u32) -> &mut Self {
        self.seq = seq;
        self
    }
    /// Sets the acknowledgment number.
    pub fn ack(&mut self, ack: u32) -> &mut Self {
        self.ack = ack;
        self
    }
    /// Sets the initial TTL.
    pub fn ttl(&mut self, ttl: u8) -> &mut Self {
        self.ttl = ttl;
        self
    }
    /// Sets the IPv4 ID.
    pub fn ip_id(&mut self, id: u16) -> &mut Self {
        self.ip_id = Some(id);
        self
    }
    /// Sets the window.
    pub fn window(&mut self, window: u16) -> &mut Self {
        self.window = window;
        self
    }
    /// Leaves the timestamps option out.
    pub fn no_timestamps(&mut self) -> &mut Self {
        self.timestamps = false;
        self
    }
}

/// What the verdict must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictRule {
    /// Exactly this verdict.
    Is(&'static str),
    /// Anything but these (where the vocabulary says what it is not, but not what it is).
    NoneOf(&'static [&'static str]),
}

impl VerdictRule {
    /// Whether `verdict` satisfies the rule.
    pub fn allows(&self, verdict: &str) -> bool {
        match self {
            VerdictRule::Is(v) => *v == verdict,
            VerdictRule::NoneOf(vs) => !vs.contains(&verdict),
        }
    }
}

impl std::fmt::Display for VerdictRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerdictRule::Is(v) => write!(f, "{v}"),
            VerdictRule::NoneOf(vs) => write!(f, "not {}", vs.join("/")),
        }
    }
}

/// What a correct correlator says about one RST packet.
#[derive(Clone, Debug)]
pub struct Expect {
    /// The RST (index in [`Scenario::packets`]).
    pub packet: usize,
    /// Verdict.
    pub verdict: VerdictRule,
    /// Cause.
    pub cause: &'static str,
    /// `both_directions`.
    pub both_directions: bool,
    /// The agents whose observations it must carry (also checked against the model).
    pub seen_by: Vec<&'static str>,
    /// The cause each of those agents gives on its own (`rstscope-agent`).
    pub local_causes: Vec<(&'static str, &'static str)>,
    /// Agent names the `location` must mention (`None`: not checked).
    pub location: Option<Vec<&'static str>>,
    /// Acceptable `match_key` values (`None`: not checked).
    pub match_key: Option<Vec<&'static str>>,
    /// Why, in one line.
    pub why: &'static str,
}

impl Expect {
    /// Which agents see it and the cause each gives on its own.
    pub fn local(mut self, causes: &[(&'static str, &'static str)]) -> Self {
        self.seen_by = causes.iter().map(|(a, _)| *a).collect();
        self.local_causes = causes.to_vec();
        self
    }
    /// Sets `both_directions`.
    pub fn both_directions(mut self) -> Self {
        self.both_directions = true;
        self
    }
    /// The agents the location must name.
    pub fn location(mut self, agents: &[&'static str]) -> Self {
        self.location = Some(agents.to_vec());
        self
    }
    /// The acceptable match keys.
    pub fn match_key(mut self, keys: &[&'static str]) -> Self {
        self.match_key = Some(keys.to_vec());
        self
    }
}

/// A world to capture: path, vantages, connections, packets, and the expected verdicts.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Short name (also the seed).
    pub name: &'static str,
    /// One sentence: what happens.
    pub summary: &'static str,
    /// Client and server hosts.
    pub hosts: [Host; 2],
    /// The path.
    pub path: PathModel,
    /// Capture points.
    pub vantages: Vec<Vantage>,
    /// Connections.
    pub conns: Vec<ConnSpec>,
    /// Every packet, in creation order.
    pub packets: Vec<Packet>,
    /// One per RST that any vantage sees.
    pub expect: Vec<Expect>,
    /// Connections the correlator should report when that differs from the model's count of
    /// connections (port reuse splits one socket's attempts into records), and why.
    pub connections_override: Option<(usize, &'static str)>,
}

/// A packet as one vantage captured it.
#[derive(Clone, Copy, Debug)]
pub struct Sighting {
    /// Index of the packet in [`Scenario::packets`].
    pub packet: usize,
    /// The segment in that vantage's file (its clock, its addresses and numbers).
    pub seg: Segment,
}

impl Scenario {
    /// The vantage called `name`.
    pub fn vantage(&self, name: &str) -> Option<&Vantage> {
        self.vantages.iter().find(|v| v.name == name)
    }

    fn one_way(&self, from: u8, to: u8) -> i64 {
        i64::from(from.abs_diff(to)) * self.path.hop_delay_ns
    }

    /// Where the packet starts and whether it travels toward the server.
    fn start(&self, p: &Packet) -> (u8, bool) {
        match p.origin {
            Origin::Host(Side::Client) => (0, true),
            Origin::Host(Side::Server) => (self.path.hops, false),
            Origin::Forger { pos, claimed } => (pos, claimed == Side::Client),
        }
    }

    /// Whether the packet passes position `at` (before any capture window).
    fn reaches(&self, p: &Packet, at: u8) -> bool {
        let (from, up) = self.start(p);
        let ahead = if up { at >= from } else { at <= from };
        let before_drop = match p.drop_at {
            None => true,
            Some(d) => {
                if up {
                    at < d
                } else {
                    at > d
                }
            }
        };
        ahead && before_drop
    }

    /// True arrival time of the packet at position `at`.
    fn arrival(&self, p: &Packet, at: u8) -> i64 {
        p.t_ns + self.one_way(self.start(p).0, at)
    }

    /// The packet as vantage `v` sees it, if it does.
    pub fn sighting(&self, v: &Vantage, p: &Packet) -> Option<Sighting> {
        if !self.reaches(p, v.pos) {
            return None;
        }
        let arrival = self.arrival(p, v.pos);
        if arrival < v.from_ns || arrival > v.until_ns || v.gaps.iter().any(|&(a, b)| (a..=b).contains(&arrival)) {
            return None;
        }
        let ts_ns = (arrival + v.skew_ns).div_euclid(1000) * 1000;
        let conn = &self.conns[p.conn];
        let mut client = conn.client;
        if let Some(nat) = self.path.nat.filter(|n| v.pos > n.pos) {
            client = SocketAddr::new(nat.outside, client.port() + nat.port_offset);
        }
        let (mut seq, mut ack) = (p.seq, p.ack);
        if let Some(shift) = self.path.isn_shift.filter(|s| v.pos > s.pos) {
            let (own, peer) = match p.origin.claimed() {
                Side::Client => (shift.client, shift.server),
                Side::Server => (shift.server, shift.client),
            };
            seq = seq.wrapping_add(own);
            if p.flags.ack() {
                ack = ack.wrapping_add(peer);
            }
        }
        let (src, dst) = match p.origin.claimed() {
            Side::Client => (client, conn.server),
            Side::Server => (conn.server, client),
        };
        let travelled = v.pos.abs_diff(self.start(p).0);
        Some(Sighting {
            packet: p.index,
            seg: Segment {
                ts_ns,
                src: Endpoint::new(src.ip(), src.port()),
                dst: Endpoint::new(dst.ip(), dst.port()),
                seq,
                ack,
                flags: p.flags,
                window: p.window,
                payload_len: p.len,
                ttl: p.ttl.saturating_sub(travelled),
                ip_id: if src.is_ipv4() { p.ip_id } else { None },
                checksum: if p.bad_checksum { Checksum::Bad } else { Checksum::Good },
                options: p.options,
                vlan: None,
                ip_header_ok: true,
            },
        })
    }

    /// Everything vantage `v` captured, in its file's order.
    pub fn sightings(&self, v: &Vantage) -> Vec<Sighting> {
        let mut out: Vec<Sighting> = self.packets.iter().filter_map(|p| self.sighting(v, p)).collect();
        out.sort_by_key(|s| (s.seg.ts_ns, s.packet));
        out
    }

    /// Packets vantage `v` would have captured but lost in its gaps, by true arrival time.
    fn lost_in_gaps(&self, v: &Vantage) -> Vec<i64> {
        let mut out: Vec<i64> = self
            .packets
            .iter()
            .filter(|p| self.reaches(p, v.pos))
            .map(|p| self.arrival(p, v.pos))
            .filter(|t| v.gaps.iter().any(|&(a, b)| (a..=b).contains(t)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Names of the vantages that capture packet `index`.
    pub fn seen_by(&self, index: usize) -> Vec<&'static str> {
        let p = &self.packets[index];
        self.vantages.iter().filter(|v| self.sighting(v, p).is_some()).map(|v| v.name).collect()
    }

    /// Indices of the RST packets some vantage captures.
    pub fn visible_rsts(&self) -> Vec<usize> {
        self.packets.iter().filter(|p| p.flags.rst() && !self.seen_by(p.index).is_empty()).map(|p| p.index).collect()
    }

    /// Connections of which some vantage captures at least one packet.
    pub fn visible_connections(&self) -> usize {
        (0..self.conns.len())
            .filter(|&c| self.packets.iter().any(|p| p.conn == c && !self.seen_by(p.index).is_empty()))
            .count()
    }

    /// Connections the correlator should report (`summary.connections`).
    pub fn expected_connections(&self) -> usize {
        self.connections_override.map_or_else(|| self.visible_connections(), |(n, _)| n)
    }

    /// Checks the scenario against itself: every visible RST has exactly one expectation, and its
    /// `seen_by` matches the model. Returns the problems.
    pub fn self_check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let visible = self.visible_rsts();
        for &i in &visible {
            let n = self.expect.iter().filter(|e| e.packet == i).count();
            if n != 1 {
                problems.push(format!("{}: RST #{i} has {n} expectations", self.name));
            }
        }
        for e in &self.expect {
            if !visible.contains(&e.packet) {
                problems.push(format!("{}: expectation for #{} but no vantage sees it", self.name, e.packet));
            }
            let mut model = self.seen_by(e.packet);
            let mut table = e.seen_by.clone();
            model.sort_unstable();
            table.sort_unstable();
            if model != table {
                problems.push(format!(
                    "{}: RST #{} seen by {model:?} in the model, {table:?} in the table",
                    self.name, e.packet
                ));
            }
        }
        problems
    }

    /// Writes one capture per vantage into `dir` (`<vantage>.pcap` or `.pcapng`); returns
    /// `(name, path)` pairs in vantage order.
    pub fn write(&self, dir: &Path) -> io::Result<Vec<(&'static str, PathBuf)>> {
        let mut out = Vec::new();
        for v in &self.vantages {
            let sightings = self.sightings(v);
            let path = match v.format {
                Format::Pcap => {
                    let path = dir.join(format!("{}.pcap", v.name));
                    let mut w = PcapWriter::new(BufWriter::new(File::create(&path)?), 0)?;
                    for s in &sightings {
                        w.write_frame(s.seg.ts_ns, &frame(&s.seg)?)?;
                    }
                    w.finish()?;
                    path
                }
                Format::PcapngWithDropStats => {
                    let path = dir.join(format!("{}.pcapng", v.name));
                    let mut w = PcapngWriter::new(BufWriter::new(File::create(&path)?))?;
                    let lost = self.lost_in_gaps(v);
                    let mut gaps: Vec<(i64, i64)> = v.gaps.clone();
                    gaps.sort_unstable();
                    let mut gi = 0;
                    let mut received = 0u64;
                    for s in &sightings {
                        // An ISB right after each gap, stamped at the gap's end (vantage clock).
                        while gi < gaps.len() && s.seg.ts_ns > gaps[gi].1 + v.skew_ns {
                            let dropped = lost.iter().filter(|&&t| t <= gaps[gi].1).count() as u64;
                            w.write_stats(gaps[gi].1 + v.skew_ns, received, dropped)?;
                            gi += 1;
                        }
                        w.write_frame(s.seg.ts_ns, &frame(&s.seg)?)?;
                        received += 1;
                    }
                    let end = sightings.last().map_or(T0_NS, |s| s.seg.ts_ns);
                    w.write_stats(end, received, lost.len() as u64)?;
                    w.finish()?;
                    path
                }
            };
            out.push((v.name, path));
        }
        Ok(out)
    }
}

/// One Ethernet/IP/TCP frame for `seg`, options in Linux's order (payload bytes are zeros).
pub fn frame(seg: &Segment) -> io::Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]);
    let ip = match (seg.src.ip(), seg.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = etherparse::Ipv4Header::new(0, seg.ttl, etherparse::IpNumber::TCP, s.octets(), d.octets())
                .map_err(io::Error::other)?;
            h.identification = seg.ip_id.unwrap_or(0);
            h.dont_fragment = true;
            eth.ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), seg.ttl),
        _ => return Err(io::Error::other("mixed address families")),
    };
    let mut tcp = ip.tcp(seg.src.port(), seg.dst.port(), seg.seq, seg.window);
    let f = seg.flags;
    if f.syn() {
        tcp = tcp.syn();
    }
    if f.fin() {
        tcp = tcp.fin();
    }
    if f.rst() {
        tcp = tcp.rst();
    }
    if f.has(TcpFlags::PSH) {
        tcp = tcp.psh();
    }
    if f.ack() {
        tcp = tcp.ack(seg.ack);
    }
    let o = &seg.options;
    let mut options = Vec::new();
    if let Some(mss) = o.mss {
        options.push(TcpOptionElement::MaximumSegmentSize(mss));
    }
    if o.sack_permitted {
        options.push(TcpOptionElement::SelectiveAcknowledgementPermitted);
    }
    if let Some((val, ecr)) = o.timestamps {
        if !o.sack_permitted {
            options.extend([TcpOptionElement::Noop, TcpOptionElement::Noop]);
        }
        options.push(TcpOptionElement::Timestamp(val, ecr));
    }
    if let Some(ws) = o.window_scale {
        options.extend([TcpOptionElement::Noop, TcpOptionElement::WindowScale(ws)]);
    }
    if !options.is_empty() {
        tcp = tcp.options(&options).map_err(io::Error::other)?;
    }
    let payload = vec![0u8; seg.payload_len as usize];
    let mut out = Vec::with_capacity(tcp.size(payload.len()));
    tcp.write(&mut out, &payload).map_err(io::Error::other)?;
    if seg.checksum == Checksum::Bad {
        // The TCP checksum sits 16 bytes into the TCP header.
        let ip_len = if seg.src.is_ipv4() { usize::from(out[14] & 0x0f) * 4 } else { 40 };
        out[14 + ip_len + 16] ^= 0x5a;
    }
    Ok(out)
}

/// A minimal pcapng writer: one Ethernet interface (microseconds), Enhanced Packet Blocks and
/// Interface Statistics Blocks.
struct PcapngWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapngWriter<W> {
    fn new(mut out: W) -> io::Result<Self> {
        // Section Header Block: byte-order magic, version 1.0, section length unknown.
        let mut shb = Vec::new();
        shb.extend(0x1a2b_3c4du32.to_le_bytes());
        shb.extend(1u16.to_le_bytes());
        shb.extend(0u16.to_le_bytes());
        shb.extend((-1i64).to_le_bytes());
        write_block(&mut out, 0x0a0d_0d0a, &shb)?;
        // Interface Description Block: Ethernet, no snaplen limit, default (µs) resolution.
        let mut idb = Vec::new();
        idb.extend(1u16.to_le_bytes());
        idb.extend(0u16.to_le_bytes());
        idb.extend(0u32.to_le_bytes());
        write_block(&mut out, 1, &idb)?;
        Ok(PcapngWriter { out })
    }

    fn ts_words(ts_ns: i64) -> [u8; 8] {
        let us = ts_ns.div_euclid(1000) as u64;
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&((us >> 32) as u32).to_le_bytes());
        b[4..8].copy_from_slice(&(us as u32).to_le_bytes());
        b
    }

    fn write_frame(&mut self, ts_ns: i64, frame: &[u8]) -> io::Result<()> {
        let mut epb = Vec::new();
        epb.extend(0u32.to_le_bytes());
        epb.extend(Self::ts_words(ts_ns));
        epb.extend((frame.len() as u32).to_le_bytes());
        epb.extend((frame.len() as u32).to_le_bytes());
        epb.extend(frame);
        while epb.len() % 4 != 0 {
            epb.push(0);
        }
        write_block(&mut self.out, 6, &epb)
    }

    /// Interface Statistics Block with `isb_ifrecv` and `isb_ifdrop`.
    fn write_stats(&mut self, ts_ns: i64, received: u64, dropped: u64) -> io::Result<()> {
        let mut isb = Vec::new();
        isb.extend(0u32.to_le_bytes());
        isb.extend(Self::ts_words(ts_ns));
        for (code, value) in [(4u16, received), (5u16, dropped)] {
            isb.extend(code.to_le_bytes());
            isb.extend(8u16.to_le_bytes());
            isb.extend(value.to_le_bytes());
        }
        isb.extend([0u8; 4]); // opt_endofopt
        write_block(&mut self.out, 5, &isb)
    }

    fn finish(mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn write_block<W: Write>(out: &mut W, kind: u32, body: &[u8]) -> io::Result<()> {
    let total = (12 + body.len()) as u32;
    out.write_all(&kind.to_le_bytes())?;
    out.write_all(&total.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&total.to_le_bytes())
}

// ---------------------------------------------------------------------------------------------
// Building scenarios

#[derive(Clone, Copy, Debug, Default)]
struct ConnState {
    next: [u32; 2],
    isn: [u32; 2],
}

/// Writes a scenario: connections as ladders, packets numbered like real stacks number them.
pub struct Builder {
    scenario: Scenario,
    states: Vec<ConnState>,
    rng: SplitMix64,
    next_client_port: u16,
}

/// Client and server of the IPv4 scenarios.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The IPv4 server.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The client's address after NAT.
pub const NAT_OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Client of the IPv6 scenarios.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The IPv6 server.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);

const CLIENT_WINDOW: u16 = 502;
const SERVER_WINDOW: u16 = 509;

impl Builder {
    /// A scenario over IPv4 (or IPv6) with a 6-hop, 5 ms-per-hop path, a client vantage without
    /// skew and a server vantage 4.2 s behind, both capturing the whole time.
    pub fn new(name: &'static str, summary: &'static str, ipv6: bool) -> Builder {
        let (c, s): (IpAddr, IpAddr) =
            if ipv6 { (CLIENT_V6.into(), SERVER_V6.into()) } else { (CLIENT_V4.into(), SERVER_V4.into()) };
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let path = PathModel { hops: 6, hop_delay_ns: 5 * MS, nat: None, isn_shift: None };
        let whole = |name, pos, skew_ns| Vantage {
            name,
            pos,
            skew_ns,
            from_ns: i64::MIN,
            until_ns: i64::MAX,
            gaps: Vec::new(),
            format: Format::Pcap,
        };
        Builder {
            scenario: Scenario {
                name,
                summary,
                hosts: [Host { addr: c, ttl: 64 }, Host { addr: s, ttl: 64 }],
                path,
                vantages: vec![whole("client", 0, 0), whole("server", path.hops, -4_200 * MS)],
                conns: Vec::new(),
                packets: Vec::new(),
                expect: Vec::new(),
                connections_override: None,
            },
            states: Vec::new(),
            rng: SplitMix64::new(seed),
            next_client_port: 40000,
        }
    }

    /// The path, to change hops, delay, NAT or ISN shifting (before adding connections).
    pub fn path(&mut self) -> &mut PathModel {
        &mut self.scenario.path
    }

    /// The host on `side`.
    pub fn host(&mut self, side: Side) -> &mut Host {
        &mut self.scenario.hosts[side.index()]
    }

    /// The vantage called `name`.
    pub fn vantage(&mut self, name: &str) -> &mut Vantage {
        self.scenario.vantages.iter_mut().find(|v| v.name == name).expect("no such vantage")
    }

    /// Sets the clock skews of the named vantages.
    pub fn skews(&mut self, skews: &[(&str, f64)]) -> &mut Self {
        for &(name, s) in skews {
            self.vantage(name).skew_ns = (s * 1e9).round() as i64;
        }
        self
    }

    /// Adds a mid-path vantage `mid` at `pos`.
    pub fn add_mid(&mut self, pos: u8, skew_s: f64) -> &mut Self {
        self.scenario.vantages.push(Vantage {
            name: "mid",
            pos,
            skew_ns: (skew_s * 1e9).round() as i64,
            from_ns: i64::MIN,
            until_ns: i64::MAX,
            gaps: Vec::new(),
            format: Format::Pcap,
        });
        self
    }

    /// Removes the named vantage (a side without an agent).
    pub fn without(&mut self, name: &str) -> &mut Self {
        self.scenario.vantages.retain(|v| v.name != name);
        self
    }

    /// One-way delay between the hosts.
    pub fn one_way(&self) -> i64 {
        i64::from(self.scenario.path.hops) * self.scenario.path.hop_delay_ns
    }

    /// Round trip between the hosts.
    pub fn rtt(&self) -> i64 {
        2 * self.one_way()
    }

    /// A new connection from the next client port to `server_port`; returns its index.
    pub fn conn(&mut self, server_port: u16) -> usize {
        let port = self.next_client_port;
        self.next_client_port += 1;
        self.conn_on(port, server_port)
    }

    /// A new connection on an explicit 4-tuple (port reuse when it repeats one).
    pub fn conn_on(&mut self, client_port: u16, server_port: u16) -> usize {
        let [c, s] = self.scenario.hosts;
        self.scenario.conns.push(ConnSpec {
            client: SocketAddr::new(c.addr, client_port),
            server: SocketAddr::new(s.addr, server_port),
        });
        let isn = [self.rng.next_u64() as u32, self.rng.next_u64() as u32];
        self.states.push(ConnState { next: isn, isn });
        self.scenario.conns.len() - 1
    }

    /// Overrides the next ISN of `side` (before its SYN).
    pub fn isn(&mut self, conn: usize, side: Side, isn: u32) {
        let st = &mut self.states[conn];
        st.isn[side.index()] = isn;
        st.next[side.index()] = isn;
    }

    /// The ISN of `side` on `conn`.
    pub fn isn_of(&self, conn: usize, side: Side) -> u32 {
        self.states[conn].isn[side.index()]
    }

    /// The next sequence number of `side` on `conn`.
    pub fn next_seq(&self, conn: usize, side: Side) -> u32 {
        self.states[conn].next[side.index()]
    }

    fn push(&mut self, mut p: Packet) -> &mut Packet {
        p.index = self.scenario.packets.len();
        self.scenario.packets.push(p);
        self.scenario.packets.last_mut().expect("just pushed")
    }

    /// `side` sends a segment at `t` (true time) with `flags` (letters `SFRPA`) and `len` payload
    /// bytes; seq is its next one, ack the peer's next one.
    pub fn send(&mut self, conn: usize, side: Side, t: i64, flags: &str, len: u32) -> &mut Packet {
        let flags = parse_flags(flags);
        let st = &mut self.states[conn];
        let (me, peer) = (side.index(), side.other().index());
        let seq = st.next[me];
        let ack = if flags.ack() { st.next[peer] } else { 0 };
        if !flags.rst() {
            st.next[me] = seq.wrapping_add(len + u32::from(flags.syn()) + u32::from(flags.fin()));
        }
        let options = if flags.syn() {
            TcpOptions {
                mss: Some(1460),
                window_scale: Some(if side == Side::Client { 7 } else { 9 }),
                sack_permitted: true,
                timestamps: None,
                ..TcpOptions::default()
            }
        } else {
            TcpOptions::default()
        };
        let window = match (flags.syn(), flags.rst(), side) {
            (_, true, _) => 0,
            (true, _, Side::Client) => 64240,
            (true, _, Side::Server) => 65160,
            (false, _, Side::Client) => CLIENT_WINDOW,
            (false, _, Side::Server) => SERVER_WINDOW,
        };
        // Linux puts timestamps on everything but RSTs without ACK.
        let timestamps = !flags.rst() || flags.ack();
        let ttl = self.scenario.hosts[side.index()].ttl;
        self.push(Packet {
            index: 0,
            conn,
            t_ns: T0_NS + t,
            origin: Origin::Host(side),
            flags,
            seq,
            ack,
            window,
            len,
            ttl,
            ip_id: None,
            options,
            timestamps,
            bad_checksum: false,
            drop_at: None,
        })
    }

    /// Client sends.
    pub fn c(&mut self, conn: usize, t: i64, flags: &str, len: u32) -> &mut Packet {
        self.send(conn, Side::Client, t, flags, len)
    }

    /// Server sends.
    pub fn s(&mut self, conn: usize, t: i64, flags: &str, len: u32) -> &mut Packet {
        self.send(conn, Side::Server, t, flags, len)
    }

    /// A middlebox at `pos` forges a segment claiming to come from `claimed`, with that side's
    /// current numbers (it saw the connection), TTL 128 at the forger and IP ID 0x3c3c; no options.
    pub fn forge(&mut self, conn: usize, pos: u8, claimed: Side, t: i64, flags: &str) -> &mut Packet {
        let flags = parse_flags(flags);
        let st = &self.states[conn];
        let seq = st.next[claimed.index()];
        let ack = if flags.ack() { st.next[claimed.other().index()] } else { 0 };
        self.push(Packet {
            index: 0,
            conn,
            t_ns: T0_NS + t,
            origin: Origin::Forger { pos, claimed },
            flags,
            seq,
            ack,
            window: 0,
            len: 0,
            ttl: 128,
            ip_id: Some(0x3c3c),
            options: TcpOptions::default(),
            timestamps: false,
            bad_checksum: false,
            drop_at: None,
        })
    }

    /// Sends packet `index` again at `t` (a retransmission: same numbers, new IP ID and TSval).
    pub fn retransmit(&mut self, index: usize, t: i64) -> &mut Packet {
        let mut p = self.scenario.packets[index].clone();
        p.t_ns = T0_NS + t;
        p.drop_at = None;
        self.push(p)
    }

    /// Three-way handshake starting at `t`; returns when the client's ACK leaves.
    pub fn handshake(&mut self, conn: usize, t: i64) -> i64 {
        let ow = self.one_way();
        self.c(conn, t, "S", 0);
        self.s(conn, t + ow + 50_000, "SA", 0);
        let t_ack = t + 2 * ow + 100_000;
        self.c(conn, t_ack, "A", 0);
        t_ack
    }

    /// The client sends a request of `req` bytes at `t`, the server acknowledges it and answers
    /// with `resp` bytes in MSS-sized segments, the client acknowledges. Returns when the client's
    /// last ACK leaves.
    pub fn exchange(&mut self, conn: usize, t: i64, req: u32, resp: u32) -> i64 {
        let ow = self.one_way();
        self.c(conn, t, "PA", req);
        let mut ts = t + ow + 2 * MS;
        if resp == 0 {
            self.s(conn, ts, "A", 0);
            return ts;
        }
        let mut left = resp;
        while left > 0 {
            let n = left.min(1448);
            left -= n;
            self.s(conn, ts, if left == 0 { "PA" } else { "A" }, n);
            ts += 100_000;
        }
        let t_ack = ts + ow;
        self.c(conn, t_ack, "A", 0);
        t_ack
    }

    /// Orderly close: `first` sends FIN at `t`, the peer answers FIN+ACK, `first` sends the last
    /// ACK. Returns when that ACK leaves.
    pub fn fin_close(&mut self, conn: usize, first: Side, t: i64) -> i64 {
        let ow = self.one_way();
        self.send(conn, first, t, "FA", 0);
        self.send(conn, first.other(), t + ow + MS, "FA", 0);
        let t_last = t + 2 * ow + 2 * MS;
        self.send(conn, first, t_last, "A", 0);
        t_last
    }

    /// A whole clean connection (handshake, one exchange, FIN close) starting at `t`; returns its
    /// index. Such connections give the correlator handshakes to estimate clock offsets from, and
    /// show that a capture was running.
    pub fn clean(&mut self, server_port: u16, t: i64) -> usize {
        let c = self.conn(server_port);
        let t = self.handshake(c, t);
        let t = self.exchange(c, t + MS, 120, 2000);
        self.fin_close(c, Side::Client, t + 20 * MS);
        c
    }

    /// An expectation for RST `packet`; `seen_by` and local causes come from [`Expect::local`].
    pub fn expect(
        &mut self,
        packet: usize,
        verdict: &'static str,
        cause: &'static str,
        why: &'static str,
    ) -> &mut Self {
        self.expect_rule(packet, VerdictRule::Is(verdict), cause, why, |e| e)
    }

    /// An expectation with a verdict rule and a refinement (`local`, `location`, ...).
    pub fn expect_rule(
        &mut self,
        packet: usize,
        verdict: VerdictRule,
        cause: &'static str,
        why: &'static str,
        refine: impl FnOnce(Expect) -> Expect,
    ) -> &mut Self {
        let e = Expect {
            packet,
            verdict,
            cause,
            both_directions: false,
            seen_by: Vec::new(),
            local_causes: Vec::new(),
            location: None,
            match_key: None,
            why,
        };
        self.scenario.expect.push(refine(e));
        self
    }

    /// The correlator should count `n` connections, not the model's number, because of `why`.
    pub fn connections(&mut self, n: usize, why: &'static str) -> &mut Self {
        self.scenario.connections_override = Some((n, why));
        self
    }

    /// Refines the last expectation.
    pub fn with(&mut self, refine: impl FnOnce(Expect) -> Expect) -> &mut Self {
        let e = self.scenario.expect.pop().expect("an expectation to refine");
        self.scenario.expect.push(refine(e));
        self
    }

    /// Numbers IP IDs and timestamps in send order and returns the scenario.
    pub fn build(mut self) -> Scenario {
        let sc = &mut self.scenario;
        let mut order: Vec<usize> = (0..sc.packets.len()).collect();
        order.sort_by_key(|&i| (sc.packets[i].t_ns, i));
        let mut ip_id = [self.rng.next_u64() as u16, self.rng.next_u64() as u16];
        let ts_base = [self.rng.next_u64() as u32, self.rng.next_u64() as u32];
        let one_way = i64::from(sc.path.hops) * sc.path.hop_delay_ns;
        for &i in &order {
            let p = &sc.packets[i];
            let Origin::Host(side) = p.origin else {
                continue;
            };
            let (t, conn) = (p.t_ns, p.conn);
            // TSecr: the newest TSval of the peer that had arrived by now.
            let peer = side.other();
            let echo = order
                .iter()
                .rev()
                .map(|&j| &sc.packets[j])
                .find(|q| {
                    q.conn == conn && q.origin == Origin::Host(peer) && q.drop_at.is_none() && q.t_ns + one_way <= t
                })
                .map_or(0, |q| tsval(ts_base[peer.index()], q.t_ns));
            let p = &mut sc.packets[i];
            if p.ip_id.is_none() && sc.hosts[side.index()].addr.is_ipv4() {
                p.ip_id = Some(ip_id[side.index()]);
                ip_id[side.index()] = ip_id[side.index()].wrapping_add(1);
            }
            if p.timestamps {
                let echo = if p.flags.syn() && !p.flags.ack() { 0 } else { echo };
                p.options.timestamps = Some((tsval(ts_base[side.index()], t), echo));
            }
        }
        self.scenario
    }
}

fn tsval(base: u32, t_ns: i64) -> u32 {
    base.wrapping_add(((t_ns - T0_NS) / MS) as u32)
}

fn parse_flags(letters: &str) -> TcpFlags {
    let mut f = 0;
    for c in letters.chars() {
        f |= match c {
            'S' => TcpFlags::SYN,
            'F' => TcpFlags::FIN,
            'R' => TcpFlags::RST,
            'P' => TcpFlags::PSH,
            'A' => TcpFlags::ACK,
            _ => panic!("unknown flag {c:?} in {letters:?}"),
        };
    }
    TcpFlags(f)
}

// ---------------------------------------------------------------------------------------------
// The scenario table

use Side::{Client, Server};

const US: i64 = 1_000;

/// Every scenario, in a fixed order. Each one's doc line is its `summary`; the expectations sit
/// next to the ladder that produces them.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        refused(),
        refused_v6_alone(),
        app_abort_server(),
        app_abort_client_v6(),
        injected_to_client(),
        injected_both_ways(),
        lost_server_rst(),
        lost_bad_checksum(),
        client_only(),
        server_capture_ends_early(),
        server_capture_gap(),
        retransmission_timeout(),
        duplicate_syn_cancel(),
        after_close(),
        port_reuse(),
        port_reuse_stale_ack(),
        nat_app_abort(),
        nat_injected(),
        isn_randomised(),
        midstream(),
        clean_many(),
        mid_injected(),
        mid_lost(),
    ]
}

/// The scenario called `name`.
pub fn scenario(name: &str) -> Option<Scenario> {
    scenarios().into_iter().find(|s| s.name == name)
}

const BOTH_APP_ABORT: &[(&str, &str)] = &[("client", "app-abort"), ("server", "app-abort")];

fn refused() -> Scenario {
    let mut b = Builder::new("refused", "SYN to a closed port answered by RST+ACK; clean traffic around it", false);
    b.skews(&[("server", -4.2)]);
    let ow = b.one_way();
    let c = b.conn(81);
    b.c(c, SEC, "S", 0);
    let r = b.s(c, SEC + ow + 40 * US, "RA", 0).seq(0).no_timestamps().index;
    b.clean(443, 0);
    b.clean(443, 3 * SEC);
    b.expect(r, "end-to-end", "refused", "the server's stack refused the SYN; both ends saw the RST")
        .with(|e| e.local(&[("client", "refused"), ("server", "refused")]));
    b.build()
}

fn refused_v6_alone() -> Scenario {
    let mut b = Builder::new(
        "refused-v6-alone",
        "IPv6 refused connection and nothing else: no handshake anywhere to estimate the clock offset from",
        true,
    );
    b.skews(&[("client", -0.3), ("server", 5.0)]);
    let ow = b.one_way();
    let c = b.conn(8080);
    b.c(c, SEC, "S", 0);
    let r = b.s(c, SEC + ow + 40 * US, "RA", 0).seq(0).no_timestamps().index;
    b.expect(r, "end-to-end", "refused", "same packet identity (ack = client ISN+1) at both ends; offset unknown")
        .with(|e| e.local(&[("client", "refused"), ("server", "refused")]));
    b.build()
}

/// Handshake at 1 s, one exchange, a second request that the server answers with an abortive
/// close. Returns (conn, index of the second request, time the server's RST leaves).
fn server_aborts(b: &mut Builder, c: usize) -> (usize, i64) {
    let ow = b.one_way();
    let t = b.handshake(c, SEC);
    let t = b.exchange(c, t + MS, 300, 3000);
    let t_req2 = t + 50 * MS;
    let req2 = b.c(c, t_req2, "PA", 200).index;
    (req2, t_req2 + ow + MS)
}

fn app_abort_server() -> Scenario {
    let mut b = Builder::new("app-abort-server", "the server application closes abortively after a request", false);
    b.skews(&[("client", 1.5), ("server", -5.0)]);
    let c = b.conn(80);
    let (_, t_rst) = server_aborts(&mut b, c);
    let r = b.s(c, t_rst, "RA", 0).index;
    b.clean(443, 0);
    b.clean(443, t_rst + 2 * SEC);
    b.expect(r, "end-to-end", "app-abort", "in-sequence RST from an established server, seen leaving and arriving")
        .with(|e| e.local(BOTH_APP_ABORT).match_key(&["tuple+isn"]));
    b.build()
}

fn app_abort_client_v6() -> Scenario {
    let mut b =
        Builder::new("app-abort-client-v6", "IPv6: the client aborts with unread response data (SO_LINGER 0)", true);
    b.skews(&[("server", 4.9)]);
    let c = b.conn(443);
    let t = b.handshake(c, SEC);
    let t = b.exchange(c, t + MS, 500, 8000);
    let r = b.c(c, t + 30 * MS, "RA", 0).index;
    b.clean(443, 0);
    b.clean(443, t + 2 * SEC);
    b.expect(r, "end-to-end", "app-abort", "in-sequence RST from the client, seen at both ends")
        .with(|e| e.local(BOTH_APP_ABORT).match_key(&["tuple+isn"]));
    b.build()
}

/// Handshake at 1 s, then the request that an in-path device drops at `pos` and answers with a
/// forged RST toward the client. Returns (conn, RST index, request index, time after).
fn injection_after_request(b: &mut Builder, c: usize, pos: u8) -> (usize, usize, i64) {
    let hop = b.scenario.path.hop_delay_ns;
    let t = b.handshake(c, SEC);
    let t_req = t + MS;
    let req = b.c(c, t_req, "PA", 180).drop_at(pos).index;
    let t_forge = t_req + i64::from(pos) * hop + 200 * US;
    let r = b.forge(c, pos, Server, t_forge, "RA").index;
    (r, req, t_forge)
}

fn injected_to_client() -> Scenario {
    let mut b = Builder::new(
        "injected-to-client",
        "a filter 2 hops before the server drops the first request and resets the client; the server sends nothing",
        false,
    );
    b.skews(&[("server", -4.2)]);
    let c = b.conn(80);
    let (r, _, t) = injection_after_request(&mut b, c, 4);
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect(r, "injected", "middlebox", "the server's agent covered the time and never sent it")
        .with(|e| e.local(&[("client", "app-abort")]));
    b.build()
}

fn injected_both_ways() -> Scenario {
    let mut b =
        Builder::new("injected-both-ways", "a censor mid-path drops the request and resets both ends at once", false);
    b.skews(&[("client", -2.0), ("server", 3.3)]);
    let c = b.conn(80);
    let t = b.handshake(c, SEC);
    let req_seq = b.next_seq(c, Client);
    b.c(c, t + MS, "PA", 180).drop_at(3);
    let t = t + MS + 3 * b.scenario.path.hop_delay_ns + 200 * US;
    let r_client = b.forge(c, 3, Server, t, "RA").index;
    // Toward the server the forger uses the request's seq: exactly what the server expects.
    let r_server = b.forge(c, 3, Client, t, "RA").seq(req_seq).index;
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect(r_client, "injected", "middlebox", "neither end sent a RST; both got one")
        .with(|e| e.local(&[("client", "app-abort")]).both_directions());
    b.expect(r_server, "injected", "middlebox", "neither end sent a RST; both got one")
        .with(|e| e.local(&[("server", "app-abort")]).both_directions());
    b.build()
}

/// The server aborts, its RST is dropped at `drop` (optionally with a bad checksum); the client,
/// still alive, retransmits its request and gets a second RST from the server's stack, which
/// arrives. Returns (first RST, second RST, time after).
fn lost_ladder(b: &mut Builder, c: usize, drop: u8, bad: bool) -> (usize, usize, i64) {
    let ow = b.one_way();
    let (req2, t_rst) = server_aborts(b, c);
    let r1 = {
        let p = b.s(c, t_rst, "RA", 0).drop_at(drop);
        if bad {
            p.bad_checksum();
        }
        p.index
    };
    let t_rexmit = t_rst - ow - MS + 260 * MS;
    b.retransmit(req2, t_rexmit);
    // The server has no connection any more: RST with seq = the segment's ack, no ACK flag.
    let ack = b.scenario.packets[req2].ack;
    let r2 = b.s(c, t_rexmit + ow + 30 * US, "R", 0).seq(ack).index;
    (r1, r2, t_rexmit + ow)
}

fn lost_server_rst() -> Scenario {
    let mut b = Builder::new(
        "lost-server-rst",
        "the server's RST is dropped on the path; the client retransmits and the second RST arrives",
        false,
    );
    b.skews(&[("server", -4.6)]);
    let c = b.conn(80);
    let (r1, r2, t) = lost_ladder(&mut b, c, 3, false);
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect(r1, "lost", "app-abort", "seen leaving the server; the client kept retransmitting, so it never arrived")
        .with(|e| e.local(&[("server", "app-abort")]));
    b.expect(r2, "end-to-end", "no-connection", "the server's stack answers the retransmission of a dead connection")
        .with(|e| e.local(&[("client", "app-abort"), ("server", "no-connection")]));
    b.build()
}

fn lost_bad_checksum() -> Scenario {
    let mut b = Builder::new(
        "lost-bad-checksum",
        "as lost-server-rst, but the dropped RST has a wrong TCP checksum: it could never have arrived",
        false,
    );
    b.skews(&[("server", -4.6)]);
    let c = b.conn(80);
    let (r1, r2, t) = lost_ladder(&mut b, c, 3, true);
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect_rule(
        r1,
        VerdictRule::NoneOf(&["lost", "injected", "end-to-end"]),
        "app-abort",
        "a bad-checksum RST is not lost (never meant to arrive) and did not travel end to end",
        |e| e.local(&[("server", "app-abort")]),
    );
    b.expect(r2, "end-to-end", "no-connection", "the server's stack answers the retransmission of a dead connection")
        .with(|e| e.local(&[("client", "app-abort"), ("server", "no-connection")]));
    b.build()
}

fn client_only() -> Scenario {
    let mut b = Builder::new("client-only", "the server aborts; only the client has an agent", false);
    b.without("server").skews(&[("client", -5.0)]);
    let c = b.conn(80);
    let (_, t_rst) = server_aborts(&mut b, c);
    let r = b.s(c, t_rst, "RA", 0).index;
    b.clean(443, 0);
    b.expect(r, "unverified", "app-abort", "no agent at the sender").with(|e| e.local(&[("client", "app-abort")]));
    b.build()
}

fn server_capture_ends_early() -> Scenario {
    let mut b = Builder::new(
        "server-capture-ends-early",
        "the server's capture stops 1 s before the server aborts an idle connection",
        false,
    );
    b.skews(&[("server", 4.2)]);
    let c = b.conn(80);
    let t = b.handshake(c, SEC);
    let t = b.exchange(c, t + MS, 300, 3000);
    let t_rst = t + 2 * SEC;
    let r = b.s(c, t_rst, "RA", 0).index;
    b.vantage("server").until_ns = T0_NS + t_rst - SEC;
    b.clean(443, 0);
    b.clean(443, t_rst + 2 * SEC);
    b.expect(r, "unverified", "app-abort", "the sender's agent was not capturing at that time")
        .with(|e| e.local(&[("client", "app-abort")]));
    b.build()
}

fn server_capture_gap() -> Scenario {
    let mut b = Builder::new(
        "server-capture-gap",
        "the server's capture loses 0.6 s of packets (pcapng drop statistics) while the server sends a response and aborts",
        false,
    );
    b.skews(&[("server", -3.7)]);
    let ow = b.one_way();
    let c = b.conn(80);
    let t = b.handshake(c, SEC);
    let t = b.exchange(c, t + MS, 300, 3000);
    let t_req = t + 500 * MS;
    b.c(c, t_req, "PA", 250);
    let mut ts = t_req + ow + MS;
    for _ in 0..3 {
        b.s(c, ts, "A", 1448);
        ts += 100 * US;
    }
    let r = b.s(c, ts, "RA", 0).index;
    // A chatty connection through the gap: its holes in the server's capture show the loss too.
    let chat = b.conn(8443);
    let mut tc = b.handshake(chat, 200 * MS);
    while tc < ts + 2 * SEC {
        tc += 100 * MS;
        b.c(chat, tc, "PA", 100);
        b.s(chat, tc + ow + MS, "A", 0);
    }
    b.fin_close(chat, Client, tc + 50 * MS);
    let v = b.vantage("server");
    v.gaps = vec![(T0_NS + t_req + ow - 100 * MS, T0_NS + ts + 500 * MS)];
    v.format = Format::PcapngWithDropStats;
    b.clean(443, 0);
    b.clean(443, ts + 3 * SEC);
    b.expect(r, "unverified", "app-abort", "the sender's agent was dropping packets at that time")
        .with(|e| e.local(&[("client", "app-abort")]));
    b.build()
}

fn retransmission_timeout() -> Scenario {
    let mut b = Builder::new(
        "retransmission-timeout",
        "the server's ACKs are dropped on the path; the client retransmits 5 times and resets",
        false,
    );
    b.skews(&[("server", 2.8)]);
    let ow = b.one_way();
    let c = b.conn(80);
    let t = b.handshake(c, SEC);
    let t_req = t + MS;
    let req = b.c(c, t_req, "PA", 400).index;
    b.s(c, t_req + ow + MS, "A", 0).drop_at(3);
    let mut rto = 300 * MS;
    let mut tr = t_req;
    for _ in 0..5 {
        tr += rto;
        rto *= 2;
        b.retransmit(req, tr);
        b.s(c, tr + ow + 100 * US, "A", 0).drop_at(3);
    }
    let r = b.c(c, tr + rto, "RA", 0).index;
    b.clean(443, 0);
    b.clean(443, tr + rto + 2 * SEC);
    b.expect(r, "end-to-end", "retransmission-timeout", "the client gave up after 5 unanswered retransmissions")
        // The server's agent sees every copy acknowledged (by its own ACKs, lost later on the
        // path), so on its own it cannot call this a retransmission timeout: the correlator must
        // take the cause from the sender's side.
        .with(|e| e.local(&[("client", "retransmission-timeout"), ("server", "app-abort")]));
    b.build()
}

fn duplicate_syn_cancel() -> Scenario {
    let mut b = Builder::new(
        "duplicate-syn-cancel",
        "the client races SYNs to 445 and 139, keeps 445 and cancels 139 after its SYN-ACK",
        false,
    );
    b.skews(&[("server", -1.25)]);
    let ow = b.one_way();
    let smb = b.conn(445);
    let nb = b.conn(139);
    let t = SEC;
    b.c(smb, t, "S", 0);
    b.c(nb, t + 3 * MS, "S", 0);
    b.s(smb, t + ow + 50 * US, "SA", 0);
    b.s(nb, t + 3 * MS + ow + 50 * US, "SA", 0);
    b.c(smb, t + 2 * ow + 100 * US, "A", 0);
    let r = b.c(nb, t + 3 * MS + 2 * ow + 100 * US, "R", 0).index;
    let t = b.exchange(smb, t + 2 * ow + MS, 200, 600);
    b.fin_close(smb, Client, t + 20 * MS);
    b.clean(443, 0);
    b.expect(r, "end-to-end", "duplicate-syn-cancel", "the losing SYN of a race, cancelled by the client")
        .with(|e| e.local(&[("client", "duplicate-syn-cancel"), ("server", "duplicate-syn-cancel")]));
    b.build()
}

fn after_close() -> Scenario {
    let mut b = Builder::new("after-close", "FIN both ways, then the client resets instead of the last ACK", false);
    b.skews(&[("server", -4.9)]);
    let ow = b.one_way();
    let c = b.conn(80);
    let t = b.handshake(c, SEC);
    let t = b.exchange(c, t + MS, 300, 2000);
    b.c(c, t + 10 * MS, "FA", 0);
    b.s(c, t + 10 * MS + ow + MS, "FA", 0);
    let r = b.c(c, t + 10 * MS + 2 * ow + 2 * MS, "RA", 0).index;
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect(r, "end-to-end", "after-close", "a teardown shortcut after both FINs")
        .with(|e| e.local(&[("client", "after-close"), ("server", "after-close")]));
    b.build()
}

fn port_reuse() -> Scenario {
    let mut b =
        Builder::new("port-reuse", "two connections on one 4-tuple 2 s apart; the server aborts the second", false);
    b.skews(&[("server", 4.4)]);
    let first = b.conn_on(40100, 80);
    let t = b.handshake(first, SEC);
    let t = b.exchange(first, t + MS, 300, 1000);
    let t = b.fin_close(first, Client, t + 10 * MS);
    let second = b.conn_on(40100, 80);
    let after = b.next_seq(first, Client).wrapping_add(250_000);
    b.isn(second, Client, after);
    let (_, t_rst) = {
        let t = b.handshake(second, t + 2 * SEC);
        let t = b.exchange(second, t + MS, 300, 3000);
        let t_req2 = t + 50 * MS;
        let req2 = b.c(second, t_req2, "PA", 200).index;
        (req2, t_req2 + b.one_way() + MS)
    };
    let r = b.s(second, t_rst, "RA", 0).index;
    b.clean(443, 0);
    b.clean(443, t_rst + 2 * SEC);
    b.expect(r, "end-to-end", "app-abort", "the RST belongs to the second connection on the tuple")
        .with(|e| e.local(BOTH_APP_ABORT).match_key(&["tuple+isn"]));
    b.build()
}

fn port_reuse_stale_ack() -> Scenario {
    let mut b = Builder::new(
        "port-reuse-stale-ack",
        "a SYN reuses a tuple in the server's TIME_WAIT with a lower ISN; the stale ACK is reset by the client",
        false,
    );
    b.skews(&[("server", -2.2)]);
    let ow = b.one_way();
    let first = b.conn_on(40200, 80);
    let t = b.handshake(first, SEC);
    let t = b.exchange(first, t + MS, 300, 1000);
    let t = b.fin_close(first, Server, t + 10 * MS);
    let (old_client_next, old_server_next) = (b.next_seq(first, Client), b.next_seq(first, Server));
    let second = b.conn_on(40200, 80);
    b.isn(second, Client, old_client_next.wrapping_sub(1_000_000));
    let t_syn = t + SEC;
    let syn = b.c(second, t_syn, "S", 0).index;
    // TIME_WAIT answers the unacceptable SYN with an ACK of the old connection.
    b.s(second, t_syn + ow + 30 * US, "A", 0).seq(old_server_next).ack(old_client_next);
    let r = b.c(second, t_syn + 2 * ow + 60 * US, "R", 0).seq(old_client_next).index;
    // The RST ended TIME_WAIT; the SYN sent again a second later gets through.
    b.retransmit(syn, t_syn + SEC);
    b.s(second, t_syn + SEC + ow + 50 * US, "SA", 0);
    b.c(second, t_syn + SEC + 2 * ow + 100 * US, "A", 0);
    let t = b.exchange(second, t_syn + SEC + 2 * ow + MS, 300, 1000);
    b.fin_close(second, Client, t + 10 * MS);
    b.clean(443, 0);
    b.expect(r, "end-to-end", "port-reuse", "the client answers the stale ACK of the old connection's TIME_WAIT")
        .with(|e| e.local(&[("client", "port-reuse"), ("server", "port-reuse")]));
    b.connections(
        4,
        "the SYN sent again after the client's RST opens a new record (Zeek's rule; the server sees a new connection)",
    );
    b.build()
}

fn with_nat(b: &mut Builder) {
    b.path().nat = Some(Nat { pos: 1, outside: IpAddr::V4(NAT_OUTSIDE_V4), port_offset: 21000 });
}

fn nat_app_abort() -> Scenario {
    let mut b = Builder::new(
        "nat-app-abort",
        "the client sits behind a NAT (198.51.100.2:40000 -> 203.0.113.1:61000); the server aborts",
        false,
    );
    with_nat(&mut b);
    b.skews(&[("server", -4.2)]);
    let c = b.conn(80);
    let (_, t_rst) = server_aborts(&mut b, c);
    let r = b.s(c, t_rst, "RA", 0).index;
    b.clean(443, 0);
    b.clean(443, t_rst + 2 * SEC);
    b.expect(r, "end-to-end", "app-abort", "matched across the NAT by both ISNs")
        .with(|e| e.local(BOTH_APP_ABORT).match_key(&["isn"]));
    b.build()
}

fn nat_injected() -> Scenario {
    let mut b = Builder::new(
        "nat-injected",
        "behind the same NAT, a filter 2 hops before the server drops the request and resets the client",
        false,
    );
    with_nat(&mut b);
    b.skews(&[("server", 4.7)]);
    let c = b.conn(80);
    let (r, _, t) = injection_after_request(&mut b, c, 4);
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect(r, "injected", "middlebox", "the server's agent covered the time and never sent it")
        .with(|e| e.local(&[("client", "app-abort")]).match_key(&["isn"]));
    b.build()
}

fn isn_randomised() -> Scenario {
    let mut b = Builder::new(
        "isn-randomised",
        "a firewall shifts the client's sequence numbers by a constant; the client aborts",
        false,
    );
    b.path().isn_shift = Some(IsnShift { pos: 2, client: 0x2f3a_1c00, server: 0 });
    b.skews(&[("server", -3.9)]);
    let c = b.conn(80);
    let t = b.handshake(c, SEC);
    let t = b.exchange(c, t + MS, 500, 8000);
    let r = b.c(c, t + 30 * MS, "RA", 0).index;
    b.clean(443, 0);
    b.clean(443, t + 2 * SEC);
    b.expect(r, "end-to-end", "app-abort", "same RST once the constant shift is undone; ISNs do not match")
        .with(|e| e.local(BOTH_APP_ABORT).match_key(&["tsval", "syn-options+time", "tuple+time"]));
    b.build()
}

fn midstream() -> Scenario {
    let mut b = Builder::new(
        "midstream",
        "both captures start 5 s into a long connection (no handshake in either); the server aborts at 9.5 s",
        false,
    );
    b.skews(&[("server", 3.6)]);
    let c = b.conn(80);
    let mut t = b.handshake(c, 0);
    while t < 9 * SEC {
        t = b.exchange(c, t + SEC - 200 * MS, 100, 1500);
    }
    let r = b.s(c, t + 300 * MS, "RA", 0).index;
    for v in ["client", "server"] {
        b.vantage(v).from_ns = T0_NS + 5 * SEC;
    }
    b.clean(443, 6 * SEC);
    b.clean(443, t + 2 * SEC);
    b.expect(r, "end-to-end", "app-abort", "matched by tuple and overlapping time")
        .with(|e| e.local(BOTH_APP_ABORT).match_key(&["tuple+time"]));
    b.build()
}

fn clean_many() -> Scenario {
    let mut b = Builder::new("clean-many", "20 overlapping connections, all closed with FINs: no RST at all", false);
    b.skews(&[("client", 0.7), ("server", -4.8)]);
    for i in 0..20 {
        let c = b.conn(if i % 3 == 0 { 443 } else { 80 });
        let t = b.handshake(c, i * 150 * MS);
        let t = b.exchange(c, t + MS, 100 + 37 * i as u32, 500 + 911 * i as u32);
        let t = b.exchange(c, t + 20 * MS, 80, 300);
        b.fin_close(c, if i % 2 == 0 { Client } else { Server }, t + 5 * MS);
    }
    b.build()
}

fn mid_injected() -> Scenario {
    let mut b = Builder::new(
        "mid-injected",
        "a router agent at hop 3; a filter at hop 1, between it and the client, drops the request and resets the client",
        false,
    );
    b.add_mid(3, 3.1).skews(&[("server", -4.2)]);
    let c = b.conn(80);
    let (r, _, t) = injection_after_request(&mut b, c, 1);
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect(r, "injected", "middlebox", "the mid agent saw no RST pass: forged between mid and the client")
        .with(|e| e.local(&[("client", "app-abort")]).location(&["mid", "client"]));
    b.build()
}

fn mid_lost() -> Scenario {
    let mut b = Builder::new(
        "mid-lost",
        "a router agent at hop 3; the server's RST passes it and is dropped at hop 2, before the client",
        false,
    );
    b.add_mid(3, -2.4).skews(&[("server", 5.0)]);
    let c = b.conn(80);
    let (r1, r2, t) = lost_ladder(&mut b, c, 2, false);
    b.clean(443, 0);
    b.clean(443, t + 3 * SEC);
    b.expect(r1, "lost", "app-abort", "seen at the server and mid, never at the client, which kept retransmitting")
        .with(|e| e.local(&[("server", "app-abort"), ("mid", "app-abort")]).location(&["mid", "client"]));
    b.expect(r2, "end-to-end", "no-connection", "the server's stack answers the retransmission of a dead connection")
        .with(|e| e.local(&[("client", "app-abort"), ("server", "no-connection"), ("mid", "no-connection")]));
    b.build()
}
