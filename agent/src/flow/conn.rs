//! One tracked connection: per-direction halves plus the Zeek state machine.
//!
//! Halves are indexed by wire direction (`0`: sent by the key's `lo` endpoint, `1`: by `hi`), not
//! by role, so a role flip decided later by the Zeek rules costs nothing: only `orig_is_lo` changes.

use rstscope_proto::FlowKey;

use super::zeek::ZeekConn;
use crate::event::{Counts, DirectionSummary, Phase, Role, RstEvent, TtlRange};
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
}

/// What one direction of a connection has sent, as seen at this vantage point.
#[derive(Clone, Debug, Default)]
pub struct Half {
    /// Initial sequence number (valid with `seen::SYN`).
    pub isn: u32,
    /// One past the highest sequence number sent (valid with `seen::ANY`).
    pub next_seq: SeqNumber,
    /// Sequence number of the last packet.
    pub last_seq: u32,
    /// Last acknowledgment number sent (valid with `seen::ACK`).
    pub last_ack: u32,
    /// Payload length of the last packet.
    pub last_len: u32,
    /// Time of the last packet (ns).
    pub last_ts: i64,
    /// Payload bytes, retransmissions included.
    pub bytes: u64,
    /// Packets.
    pub pkts: u32,
    /// Retransmitted segments in total.
    pub rexmits: u32,
    /// Retransmissions since this side's data was last acknowledged or new data was sent.
    pub rexmit_run: u16,
    /// Zero-window advertisements.
    pub zero_windows: u16,
    /// RST packets.
    pub rsts: u16,
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
    /// Window scale from this side's SYN (0xff: unknown).
    pub wscale: u8,
    /// Flags of the last packet (low byte).
    pub last_flags: u8,
    /// `seen::*` bits.
    pub seen: u8,
}

impl Half {
    pub(crate) fn has(&self, bit: u8) -> bool {
        self.seen & bit != 0
    }

    /// Accounts one packet sent by this side. Returns whether it was a retransmission.
    pub(crate) fn on_send(&mut self, seg: &Segment) -> bool {
        let first = !self.has(seen::ANY);
        let seq = SeqNumber(seg.seq);
        let end = seq.plus(seg.seq_len());
        let mut rexmit = false;
        if seg.flags.syn() {
            if !self.has(seen::SYN) || seg.seq != self.isn {
                self.isn = seg.seq;
            }
            self.seen |= seen::SYN;
            if let Some(ws) = seg.options.window_scale {
                self.wscale = ws.min(14);
            }
        }
        if first {
            self.next_seq = end;
            self.ttl_first = seg.ttl;
            self.ttl_min = seg.ttl;
            self.ttl_max = seg.ttl;
            if !seg.flags.syn() {
                self.wscale = 0xff;
            }
        } else {
            // Payload entirely at or below what this side already sent is a retransmission.
            if seg.payload_len > 0 && !seg.flags.rst() && !end.after(self.next_seq) {
                rexmit = true;
            } else if seg.flags.syn()
                && !seg.flags.rst()
                && self.pkts > 0
                && self.has(seen::SYN)
                && seg.seq == self.isn
                && !end.after(self.next_seq)
            {
                // A repeated SYN (or SYN-ACK) with the same ISN: the handshake is being retried.
                rexmit = true;
            }
            if end.after(self.next_seq) && !seg.flags.rst() {
                self.next_seq = end;
            }
            self.ttl_min = self.ttl_min.min(seg.ttl);
            self.ttl_max = self.ttl_max.max(seg.ttl);
        }
        if rexmit {
            self.rexmits = self.rexmits.saturating_add(1);
            self.rexmit_run = self.rexmit_run.saturating_add(1);
        } else if seg.payload_len > 0 || seg.flags.syn() || seg.flags.fin() {
            self.rexmit_run = 0;
        }
        if seg.flags.fin() {
            self.seen |= seen::FIN;
        }
        if seg.flags.rst() {
            self.seen |= seen::RST;
            self.rsts = self.rsts.saturating_add(1);
        } else {
            // A sender that keeps talking after its RST was not reset (the RST was forged or
            // ignored): the connection is alive again from its side.
            self.seen &= !seen::RST;
        }
        if seg.flags.ack() {
            self.seen |= seen::ACK;
            self.last_ack = seg.ack;
        }
        if seg.payload_len > 0 {
            self.seen |= seen::DATA;
        }
        if seg.window == 0 && !seg.flags.rst() && !seg.flags.syn() && seg.flags.ack() {
            self.zero_windows = self.zero_windows.saturating_add(1);
        }
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
        self.last_ts = seg.ts_ns;
        self.pkts = self.pkts.saturating_add(1);
        self.bytes = self.bytes.saturating_add(u64::from(seg.payload_len));
        rexmit
    }

    /// The peer acknowledged new data of this side: a retransmission run is over.
    pub(crate) fn on_peer_ack(&mut self, ack: u32) {
        if self.has(seen::ANY) && SeqNumber(ack).after(SeqNumber(self.last_seq)) {
            self.rexmit_run = 0;
        }
    }

    pub(crate) fn summary(&self, zeek_bytes: u64) -> DirectionSummary {
        DirectionSummary {
            pkts: u64::from(self.pkts),
            payload_bytes: self.bytes,
            zeek_bytes,
            retransmissions: self.rexmits,
            rsts: u32::from(self.rsts),
            zero_windows: u32::from(self.zero_windows),
            ttl: self.has(seen::ANY).then_some(TtlRange {
                first: self.ttl_first,
                last: self.ttl_last,
                min: self.ttl_min,
                max: self.ttl_max,
            }),
        }
    }
}

/// One connection record.
pub struct Conn {
    /// Direction-free identity.
    pub key: FlowKey,
    /// Halves by wire direction: `[lo sends, hi sends]`.
    pub halves: [Half; 2],
    /// Zeek's view: conn_state and history.
    pub zeek: ZeekConn,
    /// First packet time.
    pub start_ns: i64,
    /// Last packet time, either direction.
    pub last_ns: i64,
    /// The originator is the key's `lo` endpoint.
    pub orig_is_lo: bool,
    /// Started by a SYN reusing the tuple of an earlier record.
    pub port_reuse: bool,
    /// RST events waiting for the settle window (evidence that only later packets show).
    pub pending: Option<Box<Vec<RstEvent>>>,
    /// Creation serial, so stale expiry-queue entries can be told from a reused slab slot.
    pub(crate) serial: u32,
    /// Bit per expiry queue this record currently has an entry in.
    pub(crate) queued: u8,
}

impl Conn {
    pub(crate) fn new(key: FlowKey, zeek: ZeekConn, orig_is_lo: bool, start_ns: i64) -> Self {
        Conn {
            key,
            halves: [Half::default(), Half::default()],
            zeek,
            start_ns,
            last_ns: start_ns,
            orig_is_lo,
            port_reuse: false,
            pending: None,
            serial: 0,
            queued: 0,
        }
    }

    /// Index of the half that `seg`'s sender fills.
    pub(crate) fn dir_of(&self, seg: &Segment) -> usize {
        usize::from(!self.key.is_lo_to_hi(&seg.src))
    }

    /// Role of the sender of direction `dir`.
    pub(crate) fn role_of(&self, dir: usize) -> Role {
        if (dir == 0) == self.orig_is_lo {
            Role::Originator
        } else {
            Role::Responder
        }
    }

    /// Index of the originator's half.
    pub(crate) fn orig_dir(&self) -> usize {
        usize::from(!self.orig_is_lo)
    }

    pub(crate) fn counts(&self) -> Counts {
        let (o, r) = (&self.halves[self.orig_dir()], &self.halves[1 - self.orig_dir()]);
        Counts { orig_pkts: u64::from(o.pkts), orig_bytes: o.bytes, resp_pkts: u64::from(r.pkts), resp_bytes: r.bytes }
    }

    /// Both directions have sent FIN or RST: the connection is over from this vantage point.
    pub(crate) fn is_finished(&self) -> bool {
        let done = |h: &Half| h.has(seen::FIN) || h.has(seen::RST);
        (done(&self.halves[0]) && done(&self.halves[1])) || self.halves.iter().any(|h| h.has(seen::RST))
    }

    /// The phase before a packet is applied.
    pub(crate) fn phase(&self) -> Phase {
        let (o, r) = (&self.halves[self.orig_dir()], &self.halves[1 - self.orig_dir()]);
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
        let handshake_acked =
            o.has(seen::ACK) && (o.pkts > 1 || !orig_syn) && SeqNumber(o.last_ack).after(SeqNumber(r.isn));
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
