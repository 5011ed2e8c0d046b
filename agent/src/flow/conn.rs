//! One tracked connection: per-direction halves plus the Zeek state machine.
//!
//! Halves are indexed by wire direction (`0`: sent by the key's `lo` endpoint, `1`: by `hi`), not
//! by role, so a role flip decided later by the Zeek rules costs nothing: only `orig_is_lo` changes.

use rstscope_proto::{Endpoint, FlowKey};

use super::zeek::{DirCounters, ZeekConn};
use crate::event::{Counts, DirectionSummary, Phase, Role, TtlRange};
use crate::wire::{Segment, TcpFlags};

/// Sequence-number arithmetic modulo 2^32 (RFC 1982 style): never compare raw `u32`s.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SeqNumber(pub u32);

impl SeqNumber {
    /// Signed distance from `other` to `self`.
    pub fn delta(self, other: SeqNumber) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }
    /// `self` is after `other`.
    pub fn after(self, other: SeqNumber) -> bool {
        self.delta(other) > 0
    }
    /// `self + n`.
    pub fn plus(self, n: u32) -> SeqNumber {
        SeqNumber(self.0.wrapping_add(n))
    }
}

/// Bits of [`Half::seen`].
pub(crate) mod seen {
    pub const ANY: u8 = 1 << 0;
    pub const SYN: u8 = 1 << 1;
    pub const FIN: u8 = 1 << 2;
    pub const RST: u8 = 1 << 3;
    pub const ACK: u8 = 1 << 4;
    pub const IP_ID: u8 = 1 << 5;
    pub const DATA: u8 = 1 << 6;
    /// A RST from the peer that this side could accept arrived, and this side has sent nothing
    /// but RSTs since: its stack most likely holds no socket for the connection any more, even
    /// if the peer kept talking (a forged RST kills only the receiver's socket).
    pub const RESET_IN: u8 = 1 << 7;
}

/// What one direction of a connection has sent, as seen at this vantage point.
///
/// Only what the Zeek state machine does not already keep: the ISN and the highest sequence
/// number sent come from [`ZeekConn`] (see [`Record::side`]), payload byte totals live in the
/// record, the last packet's time is kept as microseconds modulo 2^32 next to the record's
/// exact last-packet time, and the counters that stay zero in most connections (retransmissions,
/// zero windows, RSTs) share the Zeek state's lazily allocated box ([`DirCounters`], see
/// [`Record::counters`]). That keeps a half at 32 bytes.
#[derive(Clone, Debug, Default)]
pub struct Half {
    /// Sequence number of the last packet.
    pub last_seq: u32,
    /// Last acknowledgment number sent (valid with `seen::ACK`).
    pub last_ack: u32,
    /// Payload length of the last packet.
    pub last_len: u32,
    /// Time of the last packet: microseconds since the epoch, modulo 2^32 (see [`Record::last_ts`]).
    pub last_us: u32,
    /// Packets.
    pub pkts: u32,
    /// Last IPv4 identification.
    pub ip_id_last: u16,
    /// Last raw window.
    pub window: u16,
    /// TTL statistics.
    pub ttl_first: u8,
    /// Last TTL.
    pub ttl_last: u8,
    /// Lowest TTL.
    pub ttl_min: u8,
    /// Highest TTL.
    pub ttl_max: u8,
    /// Low nibble: window scale from this side's SYN (15: unknown). High nibble: retransmissions
    /// since this side's data was last acknowledged or new data was sent (saturating at 15).
    ws_run: u8,
    /// Flags of the last packet (low byte).
    pub last_flags: u8,
    /// `seen::*` bits.
    pub seen: u8,
}

impl Half {
    pub(crate) fn has(&self, bit: u8) -> bool {
        self.seen & bit != 0
    }

    /// Window scale shift from this side's SYN, or `None` if not known.
    pub fn wscale(&self) -> Option<u8> {
        let ws = self.ws_run & 0x0f;
        (ws <= 14).then_some(ws)
    }

    fn set_wscale(&mut self, ws: Option<u8>) {
        self.ws_run = (self.ws_run & 0xf0) | ws.map_or(0x0f, |w| w.min(14));
    }

    /// Retransmissions in the current run (0 to 15, saturating).
    pub fn rexmit_run(&self) -> u8 {
        self.ws_run >> 4
    }

    fn set_rexmit_run(&mut self, run: u8) {
        self.ws_run = (self.ws_run & 0x0f) | (run.min(15) << 4);
    }

    /// Accounts one packet sent by this side, given this side's next sequence number and ISN
    /// before the packet. Returns what it adds to the side's rare counters (kept outside the half,
    /// see [`Record::count`]).
    ///
    /// Inlined into the tracker's packet path: as a call, saving and restoring registers for its
    /// many stores was a sixth of its instructions.
    #[inline(always)]
    pub(crate) fn on_send(&mut self, seg: &Segment, next_seq: SeqNumber, isn: Option<u32>) -> Counted {
        let first = !self.has(seen::ANY);
        let seq = SeqNumber(seg.seq);
        let end = seq.plus(seg.seq_len());
        let mut rexmit = false;
        if seg.flags.syn() {
            self.seen |= seen::SYN;
            // A SYN without the option means no scaling on this connection (RFC 7323).
            self.set_wscale(seg.options.window_scale);
        }
        if first {
            self.ttl_first = seg.ttl;
            self.ttl_min = seg.ttl;
            self.ttl_max = seg.ttl;
            if !seg.flags.syn() {
                self.set_wscale(None);
            }
        } else {
            // Payload entirely at or below what this side already sent is a retransmission.
            if seg.payload_len > 0 && !seg.flags.rst() && !end.after(next_seq) {
                rexmit = true;
            } else if seg.flags.syn()
                && !seg.flags.rst()
                && self.pkts > 0
                && isn == Some(seg.seq)
                && !end.after(next_seq)
            {
                // A repeated SYN (or SYN-ACK) with the same ISN: the handshake is being retried.
                rexmit = true;
            }
            self.ttl_min = self.ttl_min.min(seg.ttl);
            self.ttl_max = self.ttl_max.max(seg.ttl);
        }
        if rexmit {
            self.set_rexmit_run(self.rexmit_run().saturating_add(1));
        } else if seg.payload_len > 0 || seg.flags.syn() || seg.flags.fin() {
            self.set_rexmit_run(0);
        }
        if seg.flags.fin() {
            self.seen |= seen::FIN;
        }
        if seg.flags.rst() {
            self.seen |= seen::RST;
        } else {
            // A sender that keeps talking after its RST was not reset (the RST was forged or
            // ignored): the connection is alive again from its side. Likewise after a RST it
            // received: it still has its socket.
            self.seen &= !(seen::RST | seen::RESET_IN);
        }
        if seg.flags.ack() {
            self.seen |= seen::ACK;
            self.last_ack = seg.ack;
        }
        if seg.payload_len > 0 {
            self.seen |= seen::DATA;
        }
        let zero_window = seg.window == 0 && !seg.flags.rst() && !seg.flags.syn() && seg.flags.ack();
        if let Some(id) = seg.ip_id {
            self.ip_id_last = id;
            self.seen |= seen::IP_ID;
        }
        self.seen |= seen::ANY;
        self.ttl_last = seg.ttl;
        self.window = seg.window;
        self.last_seq = seg.seq;
        self.last_len = seg.payload_len;
        self.last_flags = seg.flags.byte();
        self.last_us = seg.ts_ns.div_euclid(1000) as u32;
        self.pkts = self.pkts.saturating_add(1);
        Counted { rexmit, zero_window, rst: seg.flags.rst() }
    }

    /// The peer sent a RST this side's stack would accept (see [`seen::RESET_IN`]).
    pub(crate) fn on_peer_rst(&mut self) {
        self.seen |= seen::RESET_IN;
    }

    /// The peer acknowledged new data of this side: a retransmission run is over.
    pub(crate) fn on_peer_ack(&mut self, ack: u32) {
        if self.has(seen::ANY) && SeqNumber(ack).after(SeqNumber(self.last_seq)) {
            self.set_rexmit_run(0);
        }
    }

    pub(crate) fn summary(&self, counters: DirCounters, payload_bytes: u64, zeek_bytes: u64) -> DirectionSummary {
        DirectionSummary {
            pkts: u64::from(self.pkts),
            payload_bytes,
            zeek_bytes,
            retransmissions: u32::from(counters.rexmits),
            rsts: u32::from(counters.rsts),
            zero_windows: u32::from(counters.zero_windows),
            ttl: self.has(seen::ANY).then_some(TtlRange {
                first: self.ttl_first,
                last: self.ttl_last,
                min: self.ttl_min,
                max: self.ttl_max,
            }),
        }
    }
}

/// What one packet adds to its side's rare counters ([`DirCounters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counted {
    /// A retransmission.
    pub rexmit: bool,
    /// A zero-window advertisement.
    pub zero_window: bool,
    /// A RST.
    pub rst: bool,
}

/// A [`FlowKey`] as a record stores it, in 12 bytes: for IPv4 (both endpoints IPv4 or
/// IPv4-mapped) the two addresses and ports; otherwise the ports and the slot of the two addresses
/// in the tracker's IPv6 table (see [`SlotKey::v6_slot`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct SlotKey {
    /// IPv4: the `lo` and `hi` addresses as big-endian numbers, so `addrs[0] <= addrs[1]` (the
    /// key's canonical order). IPv6: `[u32::MAX, slot]` with `slot < u32::MAX`, an order no IPv4
    /// key has.
    addrs: [u32; 2],
    ports: [u16; 2],
}

/// A key as look-ups compare it with records and the index hashes it: the compact form of an
/// IPv4 key, or the ports and addresses of any other (see [`SlotKey::of`]).
pub(crate) type Compact = Result<SlotKey, ([u16; 2], [Addr; 2])>;

/// An endpoint's address as [`FlowKey::to_bytes`] writes it, IPv4 as IPv4-mapped IPv6.
pub(crate) type Addr = [u8; 16];

const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl SlotKey {
    /// Splits `key` into its compact form, or, when it is not IPv4, its ports and addresses
    /// (`Err`), to be stored in the IPv6 table.
    pub(crate) fn of(key: &FlowKey) -> Compact {
        let b = key.to_bytes();
        let ports = [u16::from_be_bytes([b[16], b[17]]), u16::from_be_bytes([b[34], b[35]])];
        if b[..12] == V4_MAPPED && b[18..30] == V4_MAPPED {
            let lo = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
            let hi = u32::from_be_bytes([b[30], b[31], b[32], b[33]]);
            Ok(SlotKey { addrs: [lo, hi], ports })
        } else {
            let mut addrs = [[0u8; 16]; 2];
            addrs[0].copy_from_slice(&b[..16]);
            addrs[1].copy_from_slice(&b[18..34]);
            Err((ports, addrs))
        }
    }

    /// The compact form of a non-IPv4 key whose addresses are in slot `slot` (< `u32::MAX`) of
    /// the IPv6 table.
    pub(crate) fn v6(ports: [u16; 2], slot: u32) -> SlotKey {
        debug_assert!(slot < u32::MAX);
        SlotKey { addrs: [u32::MAX, slot], ports }
    }

    /// Slot of the addresses in the IPv6 table, for a non-IPv4 key.
    pub(crate) fn v6_slot(&self) -> Option<u32> {
        (self.addrs[0] > self.addrs[1]).then_some(self.addrs[1])
    }

    /// All of an IPv4 key in one number, for hashing.
    pub(crate) fn packed(&self) -> u128 {
        u128::from(self.addrs[0]) << 64
            | u128::from(self.addrs[1]) << 32
            | u128::from(self.ports[0]) << 16
            | u128::from(self.ports[1])
    }

    /// The ports, `[lo, hi]`.
    pub(crate) fn ports(&self) -> [u16; 2] {
        self.ports
    }

    /// The full key; `v6` is the IPv6 table.
    pub(crate) fn key(&self, v6: &(impl std::ops::Index<usize, Output = [Addr; 2]> + ?Sized)) -> FlowKey {
        let addrs = match self.v6_slot() {
            Some(slot) => v6[slot as usize],
            None => self.addrs.map(|a| {
                let mut addr = [0u8; 16];
                addr[..12].copy_from_slice(&V4_MAPPED);
                addr[12..].copy_from_slice(&a.to_be_bytes());
                addr
            }),
        };
        let endpoint = |addr: Addr, port: u16| {
            let mut bytes = [0u8; 18];
            bytes[..16].copy_from_slice(&addr);
            bytes[16..].copy_from_slice(&port.to_be_bytes());
            Endpoint::from_bytes(bytes)
        };
        FlowKey::new(endpoint(addrs[0], self.ports[0]), endpoint(addrs[1], self.ports[1]))
    }
}

/// One connection record, as the tracker's slab holds it. Its key is compact (see [`SlotKey`]):
/// [`Conn`] shows it with the full key.
pub struct Record {
    /// Direction-free identity, compact.
    pub(crate) key: SlotKey,
    /// Halves by wire direction: `[lo sends, hi sends]`.
    pub halves: [Half; 2],
    /// Zeek's view: conn_state and history.
    pub zeek: ZeekConn,
    /// First packet time.
    pub start_ns: i64,
    /// Last packet time, either direction.
    pub last_ns: i64,
    /// Payload bytes per wire direction, retransmissions included: low 32 bits (see
    /// [`Record::bytes`]).
    bytes_lo: [u32; 2],
    /// Bits 32..40 of the payload byte totals: a direction counts up to 1 TiB, then saturates.
    bytes_hi: [u8; 2],
    /// `conn_flags::*` bits. Never zero (`LIVE` is always set), so `Option<Conn>` in the slab
    /// costs no extra byte.
    pub(crate) flags: std::num::NonZeroU8,
}

/// A record with its full key: what classification and summaries read. Dereferences to the
/// [`Record`].
pub struct Conn<'a> {
    /// Direction-free identity.
    pub key: FlowKey,
    rec: &'a Record,
}

impl<'a> Conn<'a> {
    pub(crate) fn new(key: FlowKey, rec: &'a Record) -> Self {
        Conn { key, rec }
    }

    /// The originator and the responder endpoints.
    pub(crate) fn orig_resp(&self) -> (Endpoint, Endpoint) {
        if self.orig_is_lo() {
            (self.key.lo(), self.key.hi())
        } else {
            (self.key.hi(), self.key.lo())
        }
    }
}

impl std::ops::Deref for Conn<'_> {
    type Target = Record;
    fn deref(&self) -> &Record {
        self.rec
    }
}

/// Bits of [`Record::flags`].
pub(crate) mod conn_flags {
    /// The originator is the key's `lo` endpoint.
    pub const ORIG_IS_LO: u8 = 1 << 0;
    /// Started by a SYN reusing the tuple of an earlier record.
    pub const PORT_REUSE: u8 = 1 << 1;
    /// RST events of this record wait in the tracker's settle map.
    pub const PENDING: u8 = 1 << 2;
    /// First of three bits: the record has an entry in expiry queue `n` (`QUEUED << n`).
    pub const QUEUED: u8 = 1 << 3;
    /// The record's `ConnOpen` was emitted, or never will be (its SYN was refused). Until then a
    /// record that started with a SYN has an entry in the tracker's unanswered-SYN side table.
    pub const OPEN_SETTLED: u8 = 1 << 6;
    /// Always set.
    pub const LIVE: u8 = 1 << 7;
}

/// One direction seen through the record: the half plus what the Zeek state and the record keep
/// for it. Dereferences to the [`Half`].
pub struct Side<'a> {
    half: &'a Half,
    /// ISN, if this side's SYN was seen.
    pub isn: Option<u32>,
    /// One past the highest sequence number sent (meaningful with `seen::ANY`).
    pub next_seq: SeqNumber,
    /// Time of the last packet (ns, microsecond precision).
    pub last_ts: i64,
    /// Payload bytes sent.
    pub bytes: u64,
}

impl std::ops::Deref for Side<'_> {
    type Target = Half;
    fn deref(&self) -> &Half {
        self.half
    }
}

impl Record {
    pub(crate) fn new(key: SlotKey, zeek: ZeekConn, orig_is_lo: bool, start_ns: i64) -> Self {
        Record {
            key,
            halves: [Half::default(), Half::default()],
            zeek,
            start_ns,
            last_ns: start_ns,
            bytes_lo: [0; 2],
            bytes_hi: [0; 2],
            flags: std::num::NonZeroU8::new(conn_flags::LIVE | if orig_is_lo { conn_flags::ORIG_IS_LO } else { 0 })
                .expect("LIVE is set"),
        }
    }

    /// Payload bytes sent in direction `dir`, retransmissions included (saturating at 2^40 - 1).
    pub fn bytes(&self, dir: usize) -> u64 {
        u64::from(self.bytes_hi[dir]) << 32 | u64::from(self.bytes_lo[dir])
    }

    /// Counts `n` more payload bytes in direction `dir`.
    pub(crate) fn add_bytes(&mut self, dir: usize, n: u32) {
        let (lo, carry) = self.bytes_lo[dir].overflowing_add(n);
        if !carry {
            self.bytes_lo[dir] = lo;
        } else if let Some(hi) = self.bytes_hi[dir].checked_add(1) {
            (self.bytes_lo[dir], self.bytes_hi[dir]) = (lo, hi);
        } else {
            self.bytes_lo[dir] = u32::MAX;
        }
    }

    pub(crate) fn has_flag(&self, bit: u8) -> bool {
        self.flags.get() & bit != 0
    }

    pub(crate) fn set_flag(&mut self, bit: u8, on: bool) {
        let flags = if on { self.flags.get() | bit } else { self.flags.get() & !bit };
        self.flags = std::num::NonZeroU8::new(flags | conn_flags::LIVE).unwrap_or(self.flags);
    }

    /// Retransmissions, zero windows and RSTs sent in direction `dir`.
    pub fn counters(&self, dir: usize) -> DirCounters {
        self.zeek.dir_counters(dir)
    }

    /// Adds what a packet sent in direction `dir` counted (the counters saturate). Allocates the
    /// shared box of rare state only when something is counted.
    pub(crate) fn count(&mut self, dir: usize, counted: Counted) {
        if counted == Counted::default() {
            return;
        }
        let c = self.zeek.dir_counters_mut(dir);
        c.rexmits = c.rexmits.saturating_add(u16::from(counted.rexmit));
        c.zero_windows = c.zero_windows.saturating_add(u16::from(counted.zero_window));
        c.rsts = c.rsts.saturating_add(u8::from(counted.rst));
    }

    /// The originator is the key's `lo` endpoint.
    pub fn orig_is_lo(&self) -> bool {
        self.has_flag(conn_flags::ORIG_IS_LO)
    }

    /// Started by a SYN that reused the tuple of an earlier connection.
    pub fn port_reuse(&self) -> bool {
        self.has_flag(conn_flags::PORT_REUSE)
    }

    /// Time of direction `dir`'s last packet, reconstructed from its microseconds modulo 2^32
    /// and the record's exact last-packet time (valid while that side was silent for less than
    /// 71 minutes, far beyond any TCP timeout while the other side keeps talking).
    pub fn last_ts(&self, dir: usize) -> i64 {
        let now_us = self.last_ns.div_euclid(1000);
        let behind = (now_us as u32).wrapping_sub(self.halves[dir].last_us);
        // Stay inside the tracker's time range so that differences of times cannot overflow.
        ((now_us - i64::from(behind)) * 1000).max(-super::TS_LIMIT)
    }

    /// Direction `dir` with what the Zeek state and the record know about it.
    pub fn side(&self, dir: usize) -> Side<'_> {
        let half = &self.halves[dir];
        let endpoint = self.zeek.endpoint(self.role_of(dir) == Role::Originator);
        Side {
            half,
            isn: half.has(seen::SYN).then_some(endpoint.start_seq),
            next_seq: SeqNumber(endpoint.last_seq),
            last_ts: self.last_ts(dir),
            bytes: self.bytes(dir),
        }
    }

    /// Index of the half that `seg`'s sender fills, for a record with key `key`.
    pub(crate) fn dir_of(key: &FlowKey, seg: &Segment) -> usize {
        usize::from(!key.is_lo_to_hi(&seg.src))
    }

    /// Role of the sender of direction `dir`.
    pub(crate) fn role_of(&self, dir: usize) -> Role {
        if (dir == 0) == self.orig_is_lo() {
            Role::Originator
        } else {
            Role::Responder
        }
    }

    /// Index of the originator's half.
    pub(crate) fn orig_dir(&self) -> usize {
        usize::from(!self.orig_is_lo())
    }

    pub(crate) fn counts(&self) -> Counts {
        let (o, r) = (self.orig_dir(), 1 - self.orig_dir());
        Counts {
            orig_pkts: u64::from(self.halves[o].pkts),
            orig_bytes: self.bytes(o),
            resp_pkts: u64::from(self.halves[r].pkts),
            resp_bytes: self.bytes(r),
        }
    }

    /// Both directions have sent FIN or RST: the connection is over from this vantage point.
    pub(crate) fn is_finished(&self) -> bool {
        let done = |h: &Half| h.has(seen::FIN) || h.has(seen::RST);
        (done(&self.halves[0]) && done(&self.halves[1])) || self.halves.iter().any(|h| h.has(seen::RST))
    }

    /// The phase before a packet is applied.
    pub(crate) fn phase(&self) -> Phase {
        let (o, r) = (self.side(self.orig_dir()), self.side(1 - self.orig_dir()));
        if !o.has(seen::ANY) && !r.has(seen::ANY) {
            return Phase::None;
        }
        if o.has(seen::RST) || r.has(seen::RST) {
            return Phase::Reset;
        }
        match (o.has(seen::FIN), r.has(seen::FIN)) {
            (true, true) => return Phase::Closing,
            (true, false) | (false, true) => return Phase::HalfClosed,
            _ => {}
        }
        let orig_syn = o.has(seen::SYN);
        let resp_syn = r.has(seen::SYN);
        if !orig_syn && !resp_syn {
            return Phase::Midstream;
        }
        if orig_syn && !resp_syn {
            // The responder may have answered with something other than a SYN-ACK (a stale ACK).
            return Phase::SynSent;
        }
        // The responder answered with SYN-ACK; established once the originator acknowledged it.
        let handshake_acked = o.has(seen::ACK)
            && (o.pkts > 1 || !orig_syn)
            && r.isn.is_some_and(|isn| SeqNumber(o.last_ack).after(SeqNumber(isn)));
        if handshake_acked || r.has(seen::DATA) {
            Phase::Established
        } else {
            Phase::SynReceived
        }
    }

    pub(crate) fn flags_of_last(&self, dir: usize) -> TcpFlags {
        TcpFlags(u16::from(self.halves[dir].last_flags))
    }
}
