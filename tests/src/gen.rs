//! Deterministic synthetic TCP captures, written as classic pcap files.
//!
//! A [`Generator`] keeps a pool of concurrently open connections and advances a randomly chosen
//! one by one packet at a time, so packets of many connections interleave the way they do on a
//! busy link. Each connection walks through a handshake, request/response rounds (MSS-sized
//! segments, delayed ACKs every second segment, occasional retransmissions) and one ending: an
//! orderly FIN close, an application abort (RST from the client, sometimes followed by a segment
//! still in flight and a second bare RST), a RST from the server, or a refused connection
//! (SYN answered by RST+ACK). A connection that ends is replaced by a new one.
//!
//! Everything is derived from one seed through an inline SplitMix64, so the same
//! [`GenConfig`] gives byte-identical files. Frames are Ethernet II (optionally 802.1Q tagged)
//! carrying IPv4 or IPv6 with correct IPv4 header and TCP checksums. Addresses come only from the
//! documentation ranges: clients from 198.51.100.0/24 and 2001:db8:1::/64, servers from
//! 203.0.113.0/24 and 2001:db8:2::/64. Client endpoints are numbered (address cycles through the
//! /24, port through 1024..=65535), so up to 254 × 64512 ≈ 16.4 M connections have distinct
//! 4-tuples. Timestamps are microsecond pcap, strictly increasing.
//!
//! [`OpenFlowsConfig`] produces the memory-measurement capture: N connections that complete
//! their handshake and are never closed.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// SplitMix64: tiny, fast, and good enough for traffic shapes.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }

    /// Log-uniform in `lo..=hi` (many small values, a long tail of large ones).
    pub fn log_range(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        let (a, b) = ((f64::from(lo) + 1.0).ln(), (f64::from(hi) + 1.0).ln());
        let v = (a + self.unit() * (b - a)).exp() - 1.0;
        (v.round() as u32).clamp(lo, hi)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Relative weights of the ways connections end.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EndingMix {
    /// Orderly FIN / FIN / ACK close (either side first).
    pub fin: u32,
    /// Application abort: the client sends RST+ACK, possibly in the middle of a response.
    pub client_rst: u32,
    /// The server resets after a request (RST+ACK, sometimes a bare RST).
    pub server_rst: u32,
    /// Connection refused: the SYN is answered with RST+ACK.
    pub refused: u32,
}

impl Default for EndingMix {
    fn default() -> Self {
        EndingMix { fin: 70, client_rst: 12, server_rst: 10, refused: 8 }
    }
}

/// What traffic to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenConfig {
    /// Seed of everything random.
    pub seed: u64,
    /// Number of packets to write; connections still open at the end stay open.
    pub packets: u64,
    /// Connections open at the same time (the pool size).
    pub concurrent: usize,
    /// Share of connections over IPv6, 0.0..=1.0.
    pub ipv6_share: f64,
    /// Share of connections whose frames carry an 802.1Q tag.
    pub vlan_share: f64,
    /// Capture length per record; 0 keeps whole frames (file snaplen 262144).
    pub snaplen: u32,
    /// How connections end.
    pub endings: EndingMix,
    /// Probability that a data segment is seen a second time (a retransmission) later on.
    pub retransmit_share: f64,
    /// Request/response rounds per connection (inclusive range).
    pub rounds: (u32, u32),
    /// Request size in bytes (inclusive range, log-uniform).
    pub request_bytes: (u32, u32),
    /// Response size in bytes (inclusive range, log-uniform).
    pub response_bytes: (u32, u32),
    /// Time of the first packet, nanoseconds since the Unix epoch (rounded down to µs).
    pub start_ns: i64,
    /// Mean gap between consecutive packets, in microseconds (at least 1).
    pub mean_gap_us: u32,
}

/// 2024-01-01T00:00:00Z.
pub const DEFAULT_START_NS: i64 = 1_704_067_200_000_000_000;

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 0x5eed_2024,
            packets: 1_000_000,
            concurrent: 10_000,
            ipv6_share: 0.2,
            vlan_share: 0.1,
            snaplen: 0,
            endings: EndingMix::default(),
            retransmit_share: 0.01,
            rounds: (1, 4),
            request_bytes: (40, 2_000),
            response_bytes: (1, 64 * 1024),
            start_ns: DEFAULT_START_NS,
            mean_gap_us: 5,
        }
    }
}

/// N connections that complete their handshake and are never closed (memory per flow).
#[derive(Clone, Debug, PartialEq)]
pub struct OpenFlowsConfig {
    /// Seed of everything random.
    pub seed: u64,
    /// Number of connections; the capture holds `3 * flows` packets.
    pub flows: u64,
    /// Share of connections over IPv6.
    pub ipv6_share: f64,
    /// Share of connections with an 802.1Q tag.
    pub vlan_share: f64,
    /// Handshakes in progress at the same time (they interleave).
    pub concurrent: usize,
    /// Time of the first packet, nanoseconds since the Unix epoch.
    pub start_ns: i64,
    /// Mean gap between packets in microseconds (keep it small so no handshake times out).
    pub mean_gap_us: u32,
    /// Capture length per record; 0 keeps whole frames.
    pub snaplen: u32,
}

impl Default for OpenFlowsConfig {
    fn default() -> Self {
        OpenFlowsConfig {
            seed: 0x0be7_f10e,
            flows: 1_000_000,
            ipv6_share: 0.2,
            vlan_share: 0.1,
            concurrent: 256,
            start_ns: DEFAULT_START_NS,
            mean_gap_us: 1,
            snaplen: 0,
        }
    }
}

/// What was generated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenStats {
    /// Packets written.
    pub packets: u64,
    /// Bytes of the capture file (headers included), when written through a [`PcapWriter`].
    pub file_bytes: u64,
    /// Connections that sent their SYN (the capture holds at least one packet of each).
    pub connections: u64,
    /// Connections over IPv6.
    pub ipv6_connections: u64,
    /// Connections with a VLAN tag.
    pub vlan_connections: u64,
    /// Connections that closed with FIN.
    pub fin_closed: u64,
    /// Connections the client aborted with RST.
    pub client_reset: u64,
    /// Connections the server reset.
    pub server_reset: u64,
    /// Connections refused (SYN → RST+ACK).
    pub refused: u64,
    /// Connections left open after the handshake on purpose ([`OpenFlowsConfig`]).
    pub left_open: u64,
    /// Connections still in progress when the packet budget ran out.
    pub unfinished: u64,
    /// Packets with RST set.
    pub rst_packets: u64,
    /// Retransmitted data segments.
    pub retransmissions: u64,
    /// Time of the last packet, ns since the epoch.
    pub last_ts_ns: i64,
}

/// One generated frame, borrowed until the next call.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// Timestamp, ns since the Unix epoch (a whole number of microseconds).
    pub ts_ns: i64,
    /// The whole Ethernet frame.
    pub data: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Fin,
    ClientRst,
    ServerRst,
    Refused,
    Open,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Syn,
    RefuseRst,
    SynAck,
    HsAck,
    Request,
    Response,
    AckMid,
    AckEnd,
    ClientAbort,
    InFlight,
    FinalRst,
    ServerRst,
    Fin1,
    Fin2,
    Fin3,
    Done,
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// One packet a connection wants to send.
#[derive(Clone, Copy, Debug)]
struct Pkt {
    from_client: bool,
    flags: u8,
    seq: u32,
    ack: u32,
    len: u32,
}

#[derive(Clone, Debug)]
struct Conn {
    id: u64,
    v6: bool,
    vlan: u16,
    server: u8,
    dport: u16,
    ts_opt: bool,
    mss: u16,
    c_seq: u32,
    s_seq: u32,
    c_ip_id: u16,
    s_ip_id: u16,
    c_ts_off: u32,
    s_ts_off: u32,
    phase: Phase,
    ending: Ending,
    round: u32,
    rounds: u32,
    abort_round: u32,
    left: u32,
    unacked: u32,
    client_closes: bool,
    retx: Option<Pkt>,
}

const SERVER_PORTS: [u16; 8] = [80, 443, 443, 443, 8080, 5432, 6379, 22];
const CLIENT_PORTS: u64 = 65536 - 1024;

/// Generates frames; see the module documentation.
pub struct Generator {
    cfg: GenConfig,
    rng: SplitMix64,
    pool: Vec<Conn>,
    /// Stop starting connections after this many (open-flows mode).
    max_connections: Option<u64>,
    open_only: bool,
    next_id: u64,
    clock_us: i64,
    buf: Vec<u8>,
    payload: Vec<u8>,
    /// `payload_prefix[i]` = one's-complement partial sum of the first `2 * i` payload bytes.
    payload_prefix: Vec<u32>,
    stats: GenStats,
    finished: bool,
}

impl Generator {
    /// A generator of mixed traffic.
    pub fn new(cfg: GenConfig) -> Generator {
        Self::build(cfg, None, false)
    }

    /// A generator of `cfg.flows` connections that open and never close.
    pub fn open_flows(cfg: &OpenFlowsConfig) -> Generator {
        let g = GenConfig {
            seed: cfg.seed,
            packets: cfg.flows.saturating_mul(3),
            concurrent: cfg.concurrent.max(1),
            ipv6_share: cfg.ipv6_share,
            vlan_share: cfg.vlan_share,
            snaplen: cfg.snaplen,
            start_ns: cfg.start_ns,
            mean_gap_us: cfg.mean_gap_us,
            ..GenConfig::default()
        };
        Self::build(g, Some(cfg.flows), true)
    }

    fn build(cfg: GenConfig, max_connections: Option<u64>, open_only: bool) -> Generator {
        let mut rng = SplitMix64::new(cfg.seed);
        // A fixed, printable payload pattern; its checksum is precomputed per length.
        let payload: Vec<u8> =
            (0..2048u32).map(|i| b"rstscope synthetic payload 0123456789 "[(i % 38) as usize]).collect();
        let mut payload_prefix = Vec::with_capacity(payload.len() / 2 + 1);
        let mut acc = 0u32;
        payload_prefix.push(0);
        for w in payload.chunks_exact(2) {
            acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
            acc = (acc & 0xffff) + (acc >> 16);
            payload_prefix.push(acc);
        }
        let start_us = cfg.start_ns.div_euclid(1000);
        let _ = rng.next_u64();
        let mut g = Generator {
            rng,
            pool: Vec::with_capacity(cfg.concurrent.min(1 << 22)),
            max_connections,
            open_only,
            next_id: 0,
            clock_us: start_us,
            buf: Vec::with_capacity(2048),
            payload,
            payload_prefix,
            stats: GenStats::default(),
            finished: false,
            cfg,
        };
        let initial = g.cfg.concurrent.max(1) as u64;
        let initial = g.max_connections.map_or(initial, |m| initial.min(m));
        for _ in 0..initial {
            let c = g.new_conn();
            g.pool.push(c);
        }
        g
    }

    /// What has been generated so far.
    pub fn stats(&self) -> &GenStats {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &GenConfig {
        &self.cfg
    }

    fn new_conn(&mut self) -> Conn {
        let id = self.next_id;
        self.next_id += 1;
        let rng = &mut self.rng;
        let v6 = rng.chance(self.cfg.ipv6_share);
        let vlan = if rng.chance(self.cfg.vlan_share) { rng.range(10, 4000) as u16 } else { 0 };
        let ending = if self.open_only {
            Ending::Open
        } else {
            let m = self.cfg.endings;
            let total = u64::from(m.fin) + u64::from(m.client_rst) + u64::from(m.server_rst) + u64::from(m.refused);
            let mut r = rng.below(total.max(1));
            let mut pick = Ending::Fin;
            for (w, e) in [
                (m.fin, Ending::Fin),
                (m.client_rst, Ending::ClientRst),
                (m.server_rst, Ending::ServerRst),
                (m.refused, Ending::Refused),
            ] {
                if r < u64::from(w) {
                    pick = e;
                    break;
                }
                r -= u64::from(w);
            }
            pick
        };
        let rounds = rng.range(self.cfg.rounds.0.max(1), self.cfg.rounds.1.max(1));
        let c_isn = rng.next_u64() as u32;
        let s_isn = rng.next_u64() as u32;
        Conn {
            id,
            v6,
            vlan,
            server: rng.below(16) as u8,
            dport: SERVER_PORTS[rng.below(SERVER_PORTS.len() as u64) as usize],
            ts_opt: rng.chance(0.8),
            mss: if v6 { 1440 } else { 1460 },
            c_seq: c_isn,
            s_seq: s_isn,
            c_ip_id: rng.next_u64() as u16,
            s_ip_id: rng.next_u64() as u16,
            c_ts_off: rng.next_u64() as u32,
            s_ts_off: rng.next_u64() as u32,
            phase: Phase::Syn,
            ending,
            round: 0,
            rounds,
            abort_round: rng.below(u64::from(rounds)) as u32,
            left: 0,
            unacked: 0,
            client_closes: rng.chance(0.6),
            retx: None,
        }
    }

    /// The next frame, or `None` when the packet budget is spent (or, for open flows, every
    /// connection has finished its handshake).
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        if self.finished || self.stats.packets >= self.cfg.packets || self.pool.is_empty() {
            if !self.finished {
                self.finished = true;
                // Connections that sent at least their SYN and did not end.
                let started = self.pool.iter().filter(|c| c.phase != Phase::Syn);
                self.stats.unfinished = started.count() as u64;
            }
            return None;
        }
        let slot = self.rng.below(self.pool.len() as u64) as usize;
        let mut conn = std::mem::replace(&mut self.pool[slot], PLACEHOLDER);
        let pkt = self.step(&mut conn);
        let gap = 1 + self.rng.below(u64::from(self.cfg.mean_gap_us.max(1)) * 2 - 1);
        self.clock_us += gap as i64;
        self.build_frame(&mut conn, pkt);
        if conn.phase == Phase::Done {
            match conn.ending {
                Ending::Fin => self.stats.fin_closed += 1,
                Ending::ClientRst => self.stats.client_reset += 1,
                Ending::ServerRst => self.stats.server_reset += 1,
                Ending::Refused => self.stats.refused += 1,
                Ending::Open => self.stats.left_open += 1,
            }
            let replace = match self.max_connections {
                Some(m) => self.next_id < m,
                None => true,
            };
            if replace {
                self.pool[slot] = self.new_conn();
            } else {
                self.pool.swap_remove(slot);
            }
        } else {
            self.pool[slot] = conn;
        }
        self.stats.packets += 1;
        self.stats.last_ts_ns = self.clock_us * 1000;
        if pkt.flags & RST != 0 {
            self.stats.rst_packets += 1;
        }
        Some(Frame { ts_ns: self.clock_us * 1000, data: &self.buf })
    }

    fn maybe_retx(&mut self, conn: &mut Conn, pkt: Pkt) {
        if pkt.len > 0 && self.rng.chance(self.cfg.retransmit_share) {
            conn.retx = Some(pkt);
        }
    }

    fn start_round(&mut self, conn: &mut Conn) {
        let (lo, hi) = self.cfg.request_bytes;
        conn.left = self.rng.log_range(lo.max(1), hi.max(1));
        conn.phase = Phase::Request;
    }

    /// Advances `conn` by one packet.
    fn step(&mut self, conn: &mut Conn) -> Pkt {
        if let Some(p) = conn.retx.take() {
            self.stats.retransmissions += 1;
            return p;
        }
        let client = |flags, c: &Conn, len| Pkt { from_client: true, flags, seq: c.c_seq, ack: c.s_seq, len };
        let server = |flags, c: &Conn, len| Pkt { from_client: false, flags, seq: c.s_seq, ack: c.c_seq, len };
        match conn.phase {
            Phase::Syn => {
                self.stats.connections += 1;
                self.stats.ipv6_connections += u64::from(conn.v6);
                self.stats.vlan_connections += u64::from(conn.vlan != 0);
                let p = Pkt { ack: 0, ..client(SYN, conn, 0) };
                conn.c_seq = conn.c_seq.wrapping_add(1);
                conn.phase = if conn.ending == Ending::Refused { Phase::RefuseRst } else { Phase::SynAck };
                p
            }
            Phase::RefuseRst => {
                conn.phase = Phase::Done;
                Pkt { seq: 0, ..server(RST | ACK, conn, 0) }
            }
            Phase::SynAck => {
                let p = server(SYN | ACK, conn, 0);
                conn.s_seq = conn.s_seq.wrapping_add(1);
                conn.phase = Phase::HsAck;
                p
            }
            Phase::HsAck => {
                let p = client(ACK, conn, 0);
                if conn.ending == Ending::Open {
                    conn.phase = Phase::Done;
                } else {
                    self.start_round(conn);
                }
                p
            }
            Phase::Request => {
                let len = conn.left.min(u32::from(conn.mss));
                conn.left -= len;
                let p = client(if conn.left == 0 { PSH | ACK } else { ACK }, conn, len);
                conn.c_seq = conn.c_seq.wrapping_add(len);
                self.maybe_retx(conn, p);
                if conn.left == 0 {
                    if conn.ending == Ending::ServerRst && conn.round == conn.abort_round {
                        conn.phase = Phase::ServerRst;
                    } else {
                        let (lo, hi) = self.cfg.response_bytes;
                        conn.left = self.rng.log_range(lo.max(1), hi.max(1));
                        conn.unacked = 0;
                        conn.phase = Phase::Response;
                    }
                }
                p
            }
            Phase::Response => {
                let len = conn.left.min(u32::from(conn.mss));
                conn.left -= len;
                let p = server(if conn.left == 0 { PSH | ACK } else { ACK }, conn, len);
                conn.s_seq = conn.s_seq.wrapping_add(len);
                conn.unacked += 1;
                self.maybe_retx(conn, p);
                let aborting = conn.ending == Ending::ClientRst
                    && conn.round == conn.abort_round
                    && conn.left > 0
                    && self.rng.chance(0.25);
                conn.phase = if aborting {
                    Phase::ClientAbort
                } else if conn.left == 0 {
                    Phase::AckEnd
                } else if conn.unacked >= 2 {
                    Phase::AckMid
                } else {
                    Phase::Response
                };
                p
            }
            Phase::AckMid => {
                conn.unacked = 0;
                conn.phase = Phase::Response;
                client(ACK, conn, 0)
            }
            Phase::AckEnd => {
                conn.unacked = 0;
                let p = client(ACK, conn, 0);
                let this_round = conn.round;
                conn.round += 1;
                if conn.ending == Ending::ClientRst && this_round >= conn.abort_round {
                    conn.phase = Phase::ClientAbort;
                } else if conn.round >= conn.rounds {
                    // Only FIN connections get here: resets happen at `abort_round < rounds`.
                    conn.phase = Phase::Fin1;
                } else {
                    self.start_round(conn);
                }
                p
            }
            Phase::ClientAbort => {
                let p = client(RST | ACK, conn, 0);
                conn.phase = if conn.left > 0 && self.rng.chance(0.5) { Phase::InFlight } else { Phase::Done };
                p
            }
            Phase::InFlight => {
                let len = conn.left.min(u32::from(conn.mss));
                conn.left -= len;
                let p = server(ACK, conn, len);
                conn.s_seq = conn.s_seq.wrapping_add(len);
                conn.phase = Phase::FinalRst;
                p
            }
            Phase::FinalRst => {
                conn.phase = Phase::Done;
                Pkt { ack: 0, ..client(RST, conn, 0) }
            }
            Phase::ServerRst => {
                conn.phase = Phase::Done;
                if self.rng.chance(0.3) {
                    Pkt { ack: 0, ..server(RST, conn, 0) }
                } else {
                    server(RST | ACK, conn, 0)
                }
            }
            Phase::Fin1 => {
                conn.phase = Phase::Fin2;
                if conn.client_closes {
                    let p = client(FIN | ACK, conn, 0);
                    conn.c_seq = conn.c_seq.wrapping_add(1);
                    p
                } else {
                    let p = server(FIN | ACK, conn, 0);
                    conn.s_seq = conn.s_seq.wrapping_add(1);
                    p
                }
            }
            Phase::Fin2 => {
                conn.phase = Phase::Fin3;
                if conn.client_closes {
                    let p = server(FIN | ACK, conn, 0);
                    conn.s_seq = conn.s_seq.wrapping_add(1);
                    p
                } else {
                    let p = client(FIN | ACK, conn, 0);
                    conn.c_seq = conn.c_seq.wrapping_add(1);
                    p
                }
            }
            Phase::Fin3 => {
                conn.phase = Phase::Done;
                if conn.client_closes {
                    client(ACK, conn, 0)
                } else {
                    server(ACK, conn, 0)
                }
            }
            Phase::Done => unreachable!("finished connections leave the pool"),
        }
    }

    fn client_addr(&self, conn: &Conn) -> ([u8; 16], u16) {
        let host = 1 + (conn.id % 254) as u8;
        let port = 1024 + ((conn.id / 254) % CLIENT_PORTS) as u16;
        let mut a = [0u8; 16];
        if conn.v6 {
            a[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0]);
            a[15] = host;
        } else {
            a[..4].copy_from_slice(&[198, 51, 100, host]);
        }
        (a, port)
    }

    fn server_addr(&self, conn: &Conn) -> [u8; 16] {
        let mut a = [0u8; 16];
        if conn.v6 {
            a[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0]);
            a[15] = 1 + conn.server;
        } else {
            a[..4].copy_from_slice(&[203, 0, 113, 1 + conn.server]);
        }
        a
    }

    /// Writes the Ethernet frame for `pkt` into `self.buf`.
    fn build_frame(&mut self, conn: &mut Conn, pkt: Pkt) {
        let (caddr, cport) = self.client_addr(conn);
        let saddr_ = self.server_addr(conn);
        let (src, dst, sport, dport) =
            if pkt.from_client { (caddr, saddr_, cport, conn.dport) } else { (saddr_, caddr, conn.dport, cport) };
        let clock_ms = (self.clock_us / 1000) as u32;
        let (my_ts, peer_ts) =
            if pkt.from_client { (conn.c_ts_off, conn.s_ts_off) } else { (conn.s_ts_off, conn.c_ts_off) };
        let tsval = clock_ms.wrapping_add(my_ts);
        let tsecr = if pkt.flags == SYN { 0 } else { clock_ms.wrapping_sub(1).wrapping_add(peer_ts) };

        // TCP options.
        let mut opts = [0u8; 20];
        let opt_len = if pkt.flags & SYN != 0 {
            let mss = conn.mss.to_be_bytes();
            if conn.ts_opt {
                opts[..4].copy_from_slice(&[2, 4, mss[0], mss[1]]);
                opts[4..6].copy_from_slice(&[4, 2]);
                opts[6..8].copy_from_slice(&[8, 10]);
                opts[8..12].copy_from_slice(&tsval.to_be_bytes());
                opts[12..16].copy_from_slice(&tsecr.to_be_bytes());
                opts[16..20].copy_from_slice(&[1, 3, 3, 7]);
                20
            } else {
                opts[..12].copy_from_slice(&[2, 4, mss[0], mss[1], 1, 3, 3, 7, 1, 1, 4, 2]);
                12
            }
        } else if conn.ts_opt && pkt.flags & RST == 0 {
            opts[..4].copy_from_slice(&[1, 1, 8, 10]);
            opts[4..8].copy_from_slice(&tsval.to_be_bytes());
            opts[8..12].copy_from_slice(&tsecr.to_be_bytes());
            12
        } else {
            0
        };
        let tcp_hdr = 20 + opt_len;
        let tcp_len = tcp_hdr + pkt.len as usize;

        let buf = &mut self.buf;
        buf.clear();
        // Ethernet.
        let cmac = [0x02, 0xc1, 0, 0, (conn.id >> 8) as u8, conn.id as u8];
        let smac = [0x02, 0x5e, 0, 0, 0, 1 + conn.server];
        let (smac_, dmac_) = if pkt.from_client { (cmac, smac) } else { (smac, cmac) };
        buf.extend_from_slice(&dmac_);
        buf.extend_from_slice(&smac_);
        if conn.vlan != 0 {
            buf.extend_from_slice(&0x8100u16.to_be_bytes());
            buf.extend_from_slice(&conn.vlan.to_be_bytes());
        }
        let ttl: u8 = if pkt.from_client { 64 } else { 57 };
        let mut sum: u32;
        if conn.v6 {
            buf.extend_from_slice(&0x86ddu16.to_be_bytes());
            buf.extend_from_slice(&[0x60, 0, 0, 0]);
            buf.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            buf.extend_from_slice(&[6, ttl]);
            buf.extend_from_slice(&src);
            buf.extend_from_slice(&dst);
            sum = words(&src) + words(&dst) + 6 + tcp_len as u32;
        } else {
            let id = if pkt.from_client {
                conn.c_ip_id = conn.c_ip_id.wrapping_add(1);
                conn.c_ip_id
            } else {
                conn.s_ip_id = conn.s_ip_id.wrapping_add(1);
                conn.s_ip_id
            };
            buf.extend_from_slice(&0x0800u16.to_be_bytes());
            let ip_start = buf.len();
            let total = (20 + tcp_len) as u16;
            buf.extend_from_slice(&[0x45, 0]);
            buf.extend_from_slice(&total.to_be_bytes());
            buf.extend_from_slice(&id.to_be_bytes());
            buf.extend_from_slice(&[0x40, 0, ttl, 6, 0, 0]);
            buf.extend_from_slice(&src[..4]);
            buf.extend_from_slice(&dst[..4]);
            let c = fold(words(&buf[ip_start..ip_start + 20]));
            buf[ip_start + 10..ip_start + 12].copy_from_slice(&(!c).to_be_bytes());
            sum = words(&src[..4]) + words(&dst[..4]) + 6 + tcp_len as u32;
        }
        // TCP header.
        let tcp_start = buf.len();
        let window: u16 = if pkt.flags & RST != 0 {
            0
        } else if pkt.flags & SYN != 0 {
            if pkt.from_client {
                64240
            } else {
                65160
            }
        } else if pkt.from_client {
            502
        } else {
            509
        };
        buf.extend_from_slice(&sport.to_be_bytes());
        buf.extend_from_slice(&dport.to_be_bytes());
        buf.extend_from_slice(&pkt.seq.to_be_bytes());
        buf.extend_from_slice(&pkt.ack.to_be_bytes());
        buf.extend_from_slice(&[((tcp_hdr / 4) as u8) << 4, pkt.flags]);
        buf.extend_from_slice(&window.to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, 0]);
        buf.extend_from_slice(&opts[..opt_len]);
        sum += words(&buf[tcp_start..]);
        // Payload: the first `len` bytes of the pattern (segments are at most one MSS).
        let len = pkt.len as usize;
        buf.extend_from_slice(&self.payload[..len]);
        sum += self.payload_prefix[len / 2];
        if len % 2 == 1 {
            sum += u32::from(self.payload[len - 1]) << 8;
        }
        let c = !fold(sum);
        buf[tcp_start + 16..tcp_start + 18].copy_from_slice(&c.to_be_bytes());
        // Frames arriving from the network side are padded to the Ethernet minimum.
        if !pkt.from_client && buf.len() < 60 {
            buf.resize(60, 0);
        }
    }
}

/// Placeholder used while a connection is taken out of the pool for one step.
const PLACEHOLDER: Conn = Conn {
    id: 0,
    v6: false,
    vlan: 0,
    server: 0,
    dport: 0,
    ts_opt: false,
    mss: 0,
    c_seq: 0,
    s_seq: 0,
    c_ip_id: 0,
    s_ip_id: 0,
    c_ts_off: 0,
    s_ts_off: 0,
    phase: Phase::Done,
    ending: Ending::Open,
    round: 0,
    rounds: 0,
    abort_round: 0,
    left: 0,
    unacked: 0,
    client_closes: false,
    retx: None,
};

/// Sum of the big-endian 16-bit words of `b` (odd tail padded), not folded.
fn words(b: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut it = b.chunks_exact(2);
    for w in &mut it {
        s += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = it.remainder() {
        s += u32::from(*last) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Writes classic (microsecond, little-endian) pcap files of Ethernet frames.
pub struct PcapWriter<W: Write> {
    out: W,
    snaplen: u32,
    packets: u64,
    bytes: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the 24-byte global header. `snaplen` 0 means whole frames (header says 262144).
    pub fn new(mut out: W, snaplen: u32) -> io::Result<Self> {
        let header_snaplen = if snaplen == 0 { 262_144 } else { snaplen };
        let mut h = [0u8; 24];
        h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        h[6..8].copy_from_slice(&4u16.to_le_bytes());
        h[16..20].copy_from_slice(&header_snaplen.to_le_bytes());
        h[20..24].copy_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        out.write_all(&h)?;
        Ok(PcapWriter { out, snaplen, packets: 0, bytes: 24 })
    }

    /// Writes one record, cutting the frame at the snaplen.
    pub fn write_frame(&mut self, ts_ns: i64, frame: &[u8]) -> io::Result<()> {
        let incl = if self.snaplen == 0 { frame.len() } else { frame.len().min(self.snaplen as usize) };
        let secs = ts_ns.div_euclid(1_000_000_000) as u32;
        let usecs = (ts_ns.rem_euclid(1_000_000_000) / 1000) as u32;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&secs.to_le_bytes());
        h[4..8].copy_from_slice(&usecs.to_le_bytes());
        h[8..12].copy_from_slice(&(incl as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(&frame[..incl])?;
        self.packets += 1;
        self.bytes += 16 + incl as u64;
        Ok(())
    }

    /// Records written so far.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Bytes written so far, global header included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

fn drain<W: Write>(mut g: Generator, out: W) -> io::Result<GenStats> {
    let mut w = PcapWriter::new(out, g.cfg.snaplen)?;
    while let Some(f) = g.next_frame() {
        w.write_frame(f.ts_ns, f.data)?;
    }
    let mut stats = g.stats().clone();
    stats.file_bytes = w.bytes();
    w.finish()?;
    Ok(stats)
}

/// Writes a mixed-traffic capture to `out` (wrap files in a `BufWriter`).
pub fn write_capture<W: Write>(cfg: &GenConfig, out: W) -> io::Result<GenStats> {
    drain(Generator::new(cfg.clone()), out)
}

/// Writes a mixed-traffic capture to the file `path`.
pub fn write_capture_file(cfg: &GenConfig, path: &Path) -> io::Result<GenStats> {
    let file = BufWriter::with_capacity(1 << 20, File::create(path)?);
    write_capture(cfg, file)
}

/// Writes `cfg.flows` handshakes that never close to `out`.
pub fn write_open_flows<W: Write>(cfg: &OpenFlowsConfig, out: W) -> io::Result<GenStats> {
    drain(Generator::open_flows(cfg), out)
}

/// Writes `cfg.flows` handshakes that never close to the file `path`.
pub fn write_open_flows_file(cfg: &OpenFlowsConfig, path: &Path) -> io::Result<GenStats> {
    let file = BufWriter::with_capacity(1 << 20, File::create(path)?);
    write_open_flows(cfg, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstscope_agent::capture::{FileSource, PacketSource, Poll};
    use rstscope_agent::wire::{self, Checksum, LinkType};
    use std::collections::HashSet;
    use std::net::IpAddr;

    fn small(seed: u64) -> GenConfig {
        GenConfig { seed, packets: 20_000, concurrent: 300, ..GenConfig::default() }
    }

    /// Walks the records of a classic pcap in memory: (count, timestamps in µs, frames).
    fn records(bytes: &[u8]) -> Vec<(i64, u32, &[u8])> {
        assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes());
        let mut at = 24;
        let mut out = Vec::new();
        while at < bytes.len() {
            let h = &bytes[at..at + 16];
            let le = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
            let ts = i64::from(le(0)) * 1_000_000 + i64::from(le(4));
            let incl = le(8) as usize;
            out.push((ts, le(12), &bytes[at + 16..at + 16 + incl]));
            at += 16 + incl;
        }
        assert_eq!(at, bytes.len());
        out
    }

    fn in_doc_ranges(ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                o[..3] == [198, 51, 100] || o[..3] == [203, 0, 113]
            }
            IpAddr::V6(v6) => v6.segments()[..2] == [0x2001, 0x0db8],
        }
    }

    #[test]
    fn reads_back_and_is_deterministic() {
        let mut a = Vec::new();
        let stats = write_capture(&small(7), &mut a).unwrap();
        let mut b = Vec::new();
        write_capture(&small(7), &mut b).unwrap();
        assert!(a == b, "same seed must give identical bytes");
        let mut c = Vec::new();
        write_capture(&small(8), &mut c).unwrap();
        assert!(a != c, "another seed gives another capture");

        let recs = records(&a);
        assert_eq!(recs.len(), 20_000);
        assert_eq!(stats.packets, 20_000);
        assert_eq!(stats.file_bytes, a.len() as u64);
        assert!(recs.windows(2).all(|w| w[0].0 < w[1].0), "timestamps increase");
        assert!(stats.fin_closed > 0 && stats.client_reset > 0);
        assert!(stats.server_reset > 0 && stats.refused > 0);
        assert!(stats.retransmissions > 0 && stats.ipv6_connections > 0);
        assert!(stats.vlan_connections > 0);
        let ended = stats.fin_closed + stats.client_reset + stats.server_reset + stats.refused;
        assert_eq!(ended + stats.unfinished, stats.connections);

        let mut rst = 0;
        let mut v6 = 0;
        let mut vlan = 0;
        for (ts, orig, frame) in &recs {
            assert_eq!(*orig as usize, frame.len());
            let seg = wire::parse(LinkType::ETHERNET, ts * 1000, frame).expect("parses");
            assert_eq!(seg.checksum, Checksum::Good, "checksum of {seg:?}");
            assert!(in_doc_ranges(seg.src.ip()) && in_doc_ranges(seg.dst.ip()));
            rst += u64::from(seg.flags.rst());
            v6 += u64::from(!seg.src.is_ipv4());
            vlan += u64::from(seg.vlan.is_some());
        }
        assert_eq!(rst, stats.rst_packets);
        assert!(v6 > 0 && vlan > 0);
    }

    #[test]
    fn file_source_reads_every_record_at_snaplen_128() {
        let dir = std::env::temp_dir().join(format!("rstscope-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snap128.pcap");
        let cfg = GenConfig { snaplen: 128, ..small(3) };
        let stats = write_capture_file(&cfg, &path).unwrap();
        let mut src = FileSource::open(path.to_str().unwrap()).unwrap();
        let (mut n, mut long) = (0u64, 0u64);
        loop {
            match src.next_packet().unwrap() {
                Poll::Packet(p) => {
                    n += 1;
                    assert!(p.data.len() <= 128);
                    let seg = wire::parse(p.link_type, p.ts_ns, p.data).expect("parses");
                    if p.data.len() < p.orig_len as usize {
                        long += 1;
                        assert_eq!(seg.checksum, Checksum::Unverified);
                    }
                }
                Poll::End => break,
                Poll::Idle => {}
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(n, stats.packets);
        assert!(long > 0);
    }

    #[test]
    fn open_flows_are_distinct_handshakes() {
        let cfg = OpenFlowsConfig { flows: 5_000, ..OpenFlowsConfig::default() };
        let mut bytes = Vec::new();
        let stats = write_open_flows(&cfg, &mut bytes).unwrap();
        let recs = records(&bytes);
        assert_eq!(recs.len(), 15_000);
        assert_eq!(stats.left_open, 5_000);
        let mut flows = HashSet::new();
        for (ts, _, frame) in &recs {
            let seg = wire::parse(LinkType::ETHERNET, ts * 1000, frame).unwrap();
            assert!(!seg.flags.rst() && !seg.flags.fin());
            if seg.flags.syn() && !seg.flags.ack() {
                assert!(flows.insert((seg.src, seg.dst)), "4-tuple reused");
            }
        }
        assert_eq!(flows.len(), 5_000);
        let mut again = Vec::new();
        write_open_flows(&cfg, &mut again).unwrap();
        assert!(bytes == again);
    }
}
