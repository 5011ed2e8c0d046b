//! Zeek-compatible TCP connection semantics: `conn_state`, `history` and the sequence-space byte counts.
//!
//! Why this exists: people who read our flow summaries already read Zeek's `conn.log` every day. If our
//! `conn_state` and `history` columns mean exactly what Zeek's mean (`ShADadFf`/`SF`, `Sr`/`REJ`, `^h`,
//! scaled `t`/`g`/`w`/`c` letters, ...), they can read our output at once and diff it against Zeek.
//!
//! This module re-implements, header-only and allocation-free, the per-packet logic of Zeek's TCP analyzer as
//! of Zeek 8.x/9.1-dev (`src/packet_analysis/protocol/tcp/TCPSessionAdapter.cc`: `Process`, `init_endpoint`,
//! `get_relative_seq`, `update_history`, `update_window`, `init_peer`, `update_ack_seq`, `update_last_seq`,
//! `UpdateStateMachine` and its `Update*State` helpers, `FlipRoles`, `IsReuse`;
//! `src/analyzer/protocol/tcp/TCP_Endpoint.cc`: `SetState`, `Size`, `CheckHistory`, `ChecksumError`,
//! `DidRxmit`, `ZeroWindow`, `Gap`; `TCP_Reassembler.cc`: `Gap`, `Undelivered`, `DataPending`, `AckReceived`;
//! `Conn.cc`: `FlipRoles`, `ScaledHistoryEntry`; `TCPAnalyzer::WantConnection`; and the script function
//! `conn_state` in `scripts/base/protocols/conn/main.zeek`). Names in comments refer to those functions.
//! Expectations in the tests come from Zeek's own btest baselines (commit a13de64f, Zeek 9.1-dev).
//!
//! Deliberate approximations (everything else follows Zeek's code path for path):
//! * Content gaps (`G`/`g`) and "data pending" need Zeek's reassembler, which keeps payload. We keep one
//!   contiguous-delivery pointer per direction plus a "data seen above a hole" bit (single-hole model): data
//!   that fills the hole start is assumed to fill the whole hole, and an ACK above the pointer is one gap
//!   (Zeek reports one gap per hole). Truncated payload (not fully captured) is never delivered, as in Zeek.
//! * Zeek's hole-independent rules (`T`/`t` retransmissions from `update_last_seq`, `W`/`w`, `C`/`c`, all
//!   state transitions, `Size()`) are exact, modulo the compact storage below.
//! * Compact storage: sequence wraps are 4-bit counters (64 GiB per direction), the last-SYN relative
//!   sequence is kept as its low 16 bits, Zeek's `FIN_seq` doubles as `hist_last_FIN` (they differ only after
//!   SYN+FIN / FIN+RST packets), scaled counters saturate (letters exact up to the 10,000th `t`/`w`/`g` and the
//!   100th `c`), and the history holds [`HISTORY_CAP`] letters (then [`ZeekConn::history_truncated`]).
//!   Fields that most connections never change (FIN/RST sequence numbers, scaled counters, wraps) are
//!   boxed on first change ([`Rare`]); reading them before reads their initial values.
//! * The "flip on the second packet" rule (Zeek PR #2191: a connection that began with an unflipped SYN-ACK is
//!   flipped when an ACK or data follows, giving `^h...`) is reproduced from its observable behaviour in Zeek's
//!   baselines (`core.conn-size-flip`, `core.tcp.flip-without-syn`, `core.checksums_ignore_nets`); its C++
//!   source was not available, so the trigger (history still exactly `H`, then any segment without SYN and RST
//!   that has ACK or payload, from either side) is inferred.
//! * Timers (attempt 5 s, close/reset delay 5 s, inactivity 5 min) and the `duration > 0` rule for logging
//!   byte counts are the tracker's business; `missed_bytes` is not kept.
//!
//! Caller duties, where Zeek acts before its TCP analyzer: drop IPv4 packets with a bad header checksum
//! entirely (unless `-C`); take `payload_len` from the IP lengths; create the connection but feed nothing
//! when the TCP header itself is truncated (Zeek then logs an empty history); split connections where
//! [`ZeekConn::is_reuse`] says so.

/// TCP flag bits as in the raw header byte (`th_flags`).
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
    /// ECE.
    pub const ECE: u8 = 0x40;
    /// CWR.
    pub const CWR: u8 = 0x80;
}
use flags::{ACK, FIN, RST, SYN};

/// TCP ports that default Zeek (`zeek -r`, no `-b`) treats as `likely_server_ports`, sorted.
///
/// Since Zeek 8, `Analyzer::register_for_ports` adds its server ports to `likely_server_ports`; older scripts
/// did `redef likely_server_ports += { ports }`. Collected from `scripts/base/protocols/*/main.zeek`: FTP 21 2811,
/// SSH 22, SMTP 25 587, DNS 53, Finger 79, HTTP 80 81 631 1080 3128 8000 8080 8888, KRB 88, DCE-RPC 135,
/// SMB 139 445, IMAP 143, LDAP 389 3268, SSL 443 465 563 585 614 636 989 990 992 993 995 5223, Modbus 502,
/// Syslog 514, SOCKS 1080, MySQL 1434 3306, MQTT 1883, RDP 3389, XMPP 5222 5269, PostgreSQL 5432, Redis 6379,
/// IRC 6666-6669, DNP3 20000. (POP3, RFB and WebSocket rely on signatures only.) With `zeek -b` the set only
/// holds what the loaded scripts register, often nothing.
pub const LIKELY_SERVER_PORTS: &[u16] = &[
    21, 22, 25, 53, 79, 80, 81, 88, 135, 139, 143, 389, 443, 445, 465, 502, 514, 563, 585, 587, 614, 631, 636, 989,
    990, 992, 993, 995, 1080, 1434, 1883, 2811, 3128, 3268, 3306, 3389, 5222, 5223, 5269, 5432, 6379, 6666, 6667, 6668,
    6669, 8000, 8080, 8888, 20000,
];

/// True if `port` is in [`LIKELY_SERVER_PORTS`] (Zeek's `IsLikelyServerPort` for TCP).
pub fn is_likely_server_port(port: u16) -> bool {
    LIKELY_SERVER_PORTS.binary_search(&port).is_ok()
}

/// Letters the history buffer holds; longer histories are cut there (Zeek's own are unbounded).
pub const HISTORY_CAP: usize = 20;

/// Every letter a history can hold; a letter is stored as its position here plus one, in 5 bits
/// (0 ends the history), so [`HISTORY_CAP`] letters take [`HIST_BYTES`] bytes.
const HIST_ALPHABET: &[u8; 25] = b"^SHADFRCTWGIQshadfrctwgiq";
const HIST_BITS: usize = 5;
const HIST_BYTES: usize = (HISTORY_CAP * HIST_BITS).div_ceil(8);

/// 5-bit codes by ASCII letter (0 for a letter outside [`HIST_ALPHABET`], which the state machine
/// never writes).
const HIST_CODES: [u8; 128] = {
    let mut codes = [0u8; 128];
    let mut i = 0;
    while i < HIST_ALPHABET.len() {
        codes[HIST_ALPHABET[i] as usize] = i as u8 + 1;
        i += 1;
    }
    codes
};

fn hist_code(letter: u8) -> u128 {
    u128::from(HIST_CODES[usize::from(letter & 0x7f)])
}

/// A connection's history, decoded from its packed form: Zeek's `history` string.
#[derive(Clone, Copy)]
pub struct History {
    letters: [u8; HISTORY_CAP],
    len: u8,
}

impl History {
    /// The letters as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    fn as_bytes(&self) -> &[u8] {
        &self.letters[..usize::from(self.len)]
    }
}

impl std::ops::Deref for History {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<&str> for History {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Zeek's `TOO_LARGE_SEQ_DELTA`: SYN/RST sequence jumps beyond this are not trusted.
const TOO_LARGE_SEQ_DELTA: i32 = 1_048_576;

/// One TCP segment as the Zeek state machine needs it. Built by the tracker from a parsed packet.
#[derive(Clone, Copy, Debug)]
pub struct ZeekSegment {
    /// Sent by the connection's originator, as the roles stand *before* this segment is fed (see
    /// [`ZeekConn::take_flip`]).
    pub is_orig: bool,
    /// Raw TCP flag byte: FIN=0x01 SYN=0x02 RST=0x04 PSH=0x08 ACK=0x10 URG=0x20 ECE=0x40 CWR=0x80.
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (only used when ACK is set, as in Zeek).
    pub ack: u32,
    /// TCP payload length from the IP header lengths (may exceed captured bytes).
    pub payload_len: u32,
    /// Raw, unscaled window (only zero vs. non-zero matters for the history).
    pub window: u16,
    /// True only when the checksum was verified and is wrong. Zeek verifies only when the whole segment was
    /// captured (`caplen >= len`) and the NIC did not checksum it; a bad segment only adds `C`/`c`.
    pub checksum_bad: bool,
}

/// Per-endpoint TCP state, Zeek's `EndpointState` (same order and meaning).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EndpointState {
    /// Nothing (or only an eccentric pre-handshake ACK) seen from this side.
    Inactive = 0,
    /// SYN seen, no SYN-ACK yet.
    SynSent = 1,
    /// A SYN-ACK was the originator's first packet.
    SynAckSent = 2,
    /// Data seen without a SYN.
    Partial = 3,
    /// Handshake completed (implicit for a responder's SYN-ACK).
    Established = 4,
    /// FIN seen.
    Closed = 5,
    /// RST seen.
    Reset = 6,
}

impl EndpointState {
    fn from_bits(b: u8) -> Self {
        // A table rather than a match: this runs several times per packet.
        const BY_BITS: [EndpointState; 16] = {
            use EndpointState::*;
            [
                Inactive,
                SynSent,
                SynAckSent,
                Partial,
                Established,
                Closed,
                Reset,
                Inactive,
                Inactive,
                Inactive,
                Inactive,
                Inactive,
                Inactive,
                Inactive,
                Inactive,
                Inactive,
            ]
        };
        BY_BITS[usize::from(b & 0x0f)]
    }
}

/// Zeek's `conn_state` values (see `scripts/base/protocols/conn/main.zeek`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(clippy::upper_case_acronyms)]
pub enum ConnState {
    /// Connection attempt seen, no reply.
    S0,
    /// Connection established, not terminated.
    S1,
    /// Normal establishment and termination.
    SF,
    /// Connection attempt rejected.
    REJ,
    /// Established, close attempt by originator seen (no reply from responder).
    S2,
    /// Established, close attempt by responder seen (no reply from originator).
    S3,
    /// Established, originator aborted (sent a RST).
    RSTO,
    /// Responder sent a RST.
    RSTR,
    /// Originator sent a SYN followed by a RST, no SYN-ACK seen.
    RSTOS0,
    /// Responder sent a SYN-ACK followed by a RST, no SYN seen.
    RSTRH,
    /// Originator sent a SYN followed by a FIN, no SYN-ACK seen.
    SH,
    /// Responder sent a SYN-ACK followed by a FIN, no SYN seen.
    SHR,
    /// No SYN seen, just midstream traffic.
    OTH,
}

impl ConnState {
    /// The `conn.log` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::S0 => "S0",
            Self::S1 => "S1",
            Self::SF => "SF",
            Self::REJ => "REJ",
            Self::S2 => "S2",
            Self::S3 => "S3",
            Self::RSTO => "RSTO",
            Self::RSTR => "RSTR",
            Self::RSTOS0 => "RSTOS0",
            Self::RSTRH => "RSTRH",
            Self::SH => "SH",
            Self::SHR => "SHR",
            Self::OTH => "OTH",
        }
    }
}

/// A read-only view of one endpoint's sequence tracking, so the tracker need not duplicate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointView {
    /// Current state.
    pub state: EndpointState,
    /// State before the last change (Zeek's `prev_state`).
    pub prev_state: EndpointState,
    /// Initial sequence number: the ISN if a SYN was seen, else one below the first sequence number seen
    /// (or the peer's first ACK minus one), as Zeek fakes it for partial connections.
    pub start_seq: u32,
    /// One past the highest sequence number sent (Zeek's `last_seq`).
    pub last_seq: u32,
    /// Highest acknowledgement of this endpoint's data sent by the peer (Zeek's `ack_seq` of this endpoint).
    pub ack_seq: u32,
    /// A FIN was sent.
    pub fin_seen: bool,
    /// Zeek reported this side as closed (`did_close`).
    pub did_close: bool,
}

// Endpoint flag bits (`ep_flags`), kept with the endpoint across role flips like Zeek's TCP_Endpoint fields.
const EP_FIN: u8 = 0x01; // FIN_cnt > 0
const EP_DID_CLOSE: u8 = 0x02; // did_close
const EP_HOLE: u8 = 0x04; // data seen above the contiguous delivery point
const EP_CLOSE_DEFERRED: u8 = 0x08; // close waits for pending data (close_deferred)
const EP_DID_EOF: u8 = 0x10; // reassembler did_EOF
const EP_WRAPPED: u8 = 0x20; // a wraps counter of this endpoint in `Rare` is not zero (saves a look there per packet)

// Connection flag bits (`flags`).
const F_SWAPPED: u8 = 0x01; // the first packet's sender is now the responder
const F_FLIP_PENDING: u8 = 0x02; // roles flipped since the last take_flip()
const F_HIST_OVERFLOW: u8 = 0x04; // history letters were dropped
const F_PARTIAL: u8 = 0x08; // TCPSessionAdapter::is_partial
const F_SEEN_ORIG: u8 = 0x10; // first_packet_seen & ORIG
const F_SEEN_RESP: u8 = 0x20; // first_packet_seen & RESP

// History masks (TCP_Endpoint::HistoryMasks), one byte per role instead of Zeek's <<16 for the responder.
const H_SYN: u8 = 0x01;
const H_FIN: u8 = 0x02;
const H_RST: u8 = 0x04;
const H_FIN_RST: u8 = 0x08;
const H_DATA: u8 = 0x10;
const H_ACK: u8 = 0x20;
const H_MULTI: u8 = 0x40;

/// The letters Zeek records on a logarithmic scale (`ScaledHistoryEntry`).
#[derive(Clone, Copy)]
enum Scaled {
    Checksum,
    Rxmit,
    Win0,
    Gap,
}

/// Zeek's state for one TCP connection, compact (see `size_of` test): index 0 is the originator role,
/// index 1 the responder role; a role flip swaps the per-endpoint arrays, exactly as Zeek swaps its
/// `TCP_Endpoint` objects.
///
/// What stays at its initial value in most connections (FIN and RST sequence numbers, the scaled
/// counters, sequence wraps) lives in a [`Rare`] box allocated the first time one of them changes:
/// a connection that never closes, retransmits or stalls pays 8 bytes for all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZeekConn {
    start: [u32; 2],
    last: [u32; 2],
    ack: [u32; 2],
    /// Reassembler's `last_reassem_seq` (relative, low 32 bits), approximated.
    reassem: [u32; 2],
    /// Zeek's `hist_last_SYN` (relative, low 16 bits).
    hist_syn: [u16; 2],
    /// Low nibble state, high nibble prev_state.
    state: [u8; 2],
    ep_flags: [u8; 2],
    /// Connection's `hist_seen`, per *role* (Zeek does not flip it).
    hist_seen: [u8; 2],
    flags: u8,
    /// History letters, 5 bits each (see [`HIST_ALPHABET`]), up to the first 0.
    hist: [u8; HIST_BYTES],
    /// `None` while every field of [`Rare`] has its initial value.
    rare: Option<Box<Rare>>,
}

/// The per-connection state that most connections never change, boxed on first change (see
/// [`ZeekConn`]). Reading a missing box reads these defaults, so allocating it changes nothing
/// but memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rare {
    /// Zeek's `FIN_seq` (relative, low 32 bits); `hist_last_FIN` is taken as `fin_end - 1`.
    fin_end: [u32; 2],
    /// Zeek's `hist_last_RST` (relative, low 32 bits).
    hist_rst: [u32; 2],
    cnt_rxmt: [u16; 2],
    cnt_win0: [u16; 2],
    cnt_gap: [u16; 2],
    cnt_chk: [u8; 2],
    /// Low nibble seq_wraps, high nibble ack_wraps.
    wraps: [u8; 2],
    /// Not Zeek's: counters the owner of the connection keeps per wire direction, in the same box
    /// so that a connection pays for one pointer. Role flips never move them.
    pub dirs: [DirCounters; 2],
}

/// Rare per-direction counters of the connection's owner (the tracker), stored in [`Rare`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Retransmitted segments (saturating).
    pub rexmits: u16,
    /// Zero-window advertisements (saturating).
    pub zero_windows: u16,
    /// RST packets (saturating).
    pub rsts: u8,
}

#[inline]
fn seq_delta(a: u32, b: u32) -> i32 {
    a.wrapping_sub(b) as i32
}

#[inline]
fn idx(is_orig: bool) -> usize {
    if is_orig {
        0
    } else {
        1
    }
}

impl ZeekConn {
    /// Decide roles for a new connection from its first packet, like Zeek's `TCPAnalyzer::WantConnection`:
    /// a SYN without ACK makes its sender the originator; otherwise the likely-server-port rule may flip
    /// (then the history starts with `^`). Returns the connection and whether the first packet's sender is
    /// the originator. (Zeek also never flips when the destination is the IPv4 broadcast address.)
    pub fn start(tcp_flags: u8, src_port: u16, dst_port: u16) -> (ZeekConn, bool) {
        Self::start_with(tcp_flags, src_port, dst_port, is_likely_server_port)
    }

    /// [`ZeekConn::start`] with another `likely_server_ports` set, e.g. `|_| false` to mimic `zeek -b` runs
    /// that load no protocol scripts.
    pub fn start_with(
        tcp_flags: u8,
        src_port: u16,
        dst_port: u16,
        is_likely: impl Fn(u16) -> bool,
    ) -> (ZeekConn, bool) {
        let mut conn = ZeekConn {
            start: [0; 2],
            last: [0; 2],
            ack: [0; 2],
            reassem: [1; 2], // Reassembler(1, ...): relative numbering starts after the SYN octet
            hist_syn: [0; 2],
            state: [0; 2],
            ep_flags: [0; 2],
            hist_seen: [0; 2],
            flags: 0,
            hist: [0; HIST_BYTES],
            rare: None,
        };
        let mut flip = false;
        if tcp_flags & SYN == 0 || tcp_flags & ACK != 0 {
            // A partial connection or one starting with a SYN-ACK: guess the responder by port. SYN-ACKs are not
            // flipped blindly because stealth scans send them.
            if is_likely(src_port) {
                flip = if is_likely(dst_port) { tcp_flags & SYN == 0 && src_port < dst_port } else { true };
            }
        }
        if flip {
            // Connection::FlipRoles before any packet: only the caret, no adapter state yet.
            conn.flags |= F_SWAPPED;
            conn.add_history(b'^');
        }
        (conn, !flip)
    }

    /// Feed one segment (in capture order) whose payload was fully captured. `ignore_checksums` = Zeek's `-C`.
    pub fn on_segment(&mut self, seg: &ZeekSegment, ignore_checksums: bool) {
        self.on_segment_captured(seg, ignore_checksums, true);
    }

    /// Feed one segment; `payload_captured` is false when fewer than `payload_len` payload bytes were
    /// captured. Zeek's reassembler ignores such payload (`truncated_tcp_payload`), so the peer's later ACKs
    /// of it count as content gaps (`G`/`g`), which is what Zeek shows on header-only captures.
    pub fn on_segment_captured(&mut self, seg: &ZeekSegment, ignore_checksums: bool, payload_captured: bool) {
        if !self.on_established_segment(seg, payload_captured) {
            self.on_any_segment(seg, ignore_checksums, payload_captured);
        }
    }

    /// The common case, most packets of a busy link: an ACK, perhaps with data, and no SYN, FIN
    /// or RST, between two established endpoints that have each sent a packet, neither of which
    /// has sent a FIN. Does exactly what [`ZeekConn::on_any_segment`] does for such a segment,
    /// without the steps that cannot apply to it: no checksum error, no flip (neither pending
    /// nor in the state machine), partial status and endpoints already set up, no state change,
    /// no zero window (it would add a letter), no FIN, no end of input. Returns false, having
    /// changed nothing, for any other segment.
    fn on_established_segment(&mut self, seg: &ZeekSegment, payload_captured: bool) -> bool {
        const ESTABLISHED: u8 = EndpointState::Established as u8;
        let e = idx(seg.is_orig);
        let p = e ^ 1;
        if seg.flags & (SYN | FIN | RST | ACK) != ACK
            || seg.checksum_bad
            || seg.window == 0
            || self.state[e] & 0x0f != ESTABLISHED
            || self.state[p] & 0x0f != ESTABLISHED
            || (self.ep_flags[e] | self.ep_flags[p]) & EP_FIN != 0
            || self.flags & (F_SEEN_ORIG | F_SEEN_RESP) != F_SEEN_ORIG | F_SEEN_RESP
        {
            return false;
        }
        let len = seg.payload_len;
        let (rel_seq, seq_underflow) = self.relative_seq(e, seg.seq, self.last[e], self.seq_wraps(e));
        // update_history without control flags.
        if len > 0 {
            self.check_history(e, H_DATA, b'D');
        } else {
            self.check_history(e, H_ACK, b'A');
        }
        let (r, underflow) = self.relative_seq(p, seg.ack, self.ack[p], self.ack_wraps(p));
        let rel_ack = if underflow {
            0
        } else {
            self.update_ack_seq(p, seg.ack);
            r
        };
        // update_last_seq without SYN, FIN or RST, from an endpoint that is not reset.
        let last_seq = seg.seq.wrapping_add(len);
        if seq_delta(last_seq, self.last[e]) > 0 {
            self.update_last(e, last_seq);
        } else if len > 0 {
            self.scaled(e, Scaled::Rxmit);
        }
        // ack_received; its end-of-input check finds neither FIN nor a closed or reset state.
        self.trim_established(p, rel_ack);
        if len > 0 && !seq_underflow && payload_captured {
            self.data_sent(e, rel_seq, len);
        }
        true
    }

    /// [`ZeekConn::on_segment_captured`] for any segment: Zeek's path step by step.
    fn on_any_segment(&mut self, seg: &ZeekSegment, ignore_checksums: bool, payload_captured: bool) {
        let mut e = idx(seg.is_orig);
        let f = seg.flags;
        let (syn, fin, rst, ack) = (f & SYN != 0, f & FIN != 0, f & RST != 0, f & ACK != 0);
        let len = seg.payload_len;

        // TCPAnalyzer::ValidateChecksum: a bad segment only leaves its scaled letter.
        if seg.checksum_bad && !ignore_checksums {
            self.scaled(e, Scaled::Checksum);
            return;
        }

        // Zeek PR #2191: a connection that began with an unflipped SYN-ACK is turned around once an ACK or
        // data follows (stealth scans only ever elicit RSTs or silence), as if it had been flipped at start.
        if self.history_is_just(b'H')
            && self.state_of(0) == EndpointState::SynAckSent
            && self.state_of(1) == EndpointState::Inactive
            && !syn
            && !rst
            && (ack || len > 0)
        {
            self.flip_as_if_at_start();
            e ^= 1;
        }
        let mut p = e ^ 1;
        // TCPSessionAdapter::Process's `is_orig` argument: not updated by a flip inside the state machine.
        let is_orig = e == 0;

        self.set_partial_status(syn, ack, e == 0);

        let seg_len = get_segment_len(len, syn, fin, rst);
        let seq_one_past = seg.seq.wrapping_add(seg_len);
        self.init_endpoint(e, syn, seg.seq, seq_one_past);

        let (rel_seq, seq_underflow) = self.relative_seq(e, seg.seq, self.last[e], self.seq_wraps(e));
        self.update_history(e, f, rel_seq, len);

        // update_window: only the zero-window part matters here; window << scale is zero iff window is zero.
        if seg.window == 0
            && !rst
            && self.state_of(p) != EndpointState::Closed
            && self.state_of(e) != EndpointState::Reset
        {
            self.scaled(e, Scaled::Win0);
        }

        if fin {
            self.ep_flags[e] |= EP_FIN;
            self.rare_mut().fin_end[e] = rel_seq.wrapping_add(seg_len as u64) as u32;
        }

        let mut rel_ack = 0u64;
        if ack {
            if self.state_of(p) == EndpointState::Inactive {
                rel_ack = 1;
                self.init_peer(p, seg.ack);
            } else {
                let (r, underflow) = self.relative_seq(p, seg.ack, self.ack[p], self.ack_wraps(p));
                if underflow {
                    rel_ack = 0;
                } else {
                    rel_ack = r;
                    if !rst {
                        // Don't trust ACKs in RST packets.
                        self.update_ack_seq(p, seg.ack);
                    }
                }
            }
        }

        self.update_last_seq(e, seq_one_past, syn, fin, rst, len);

        let do_close = self.update_state_machine(&mut e, &mut p, seg.seq, len, is_orig, f);

        if ack {
            // After the state machine, so gaps revealed by a FIN/RST's ACK see the final states.
            self.ack_received(p, rel_ack);
        }

        self.check_pia_first_packet(is_orig);

        if len > 0 && !rst && !seq_underflow && payload_captured {
            let rel_data = if syn { rel_seq.wrapping_add(1) } else { rel_seq };
            self.data_sent(e, rel_data, len);
        }
        self.check_eof(e);

        if do_close {
            // After DataSent, as in Zeek, so data carried by the FIN counts.
            self.connection_closed(e);
        }
    }

    /// True once if the originator/responder roles were swapped since the last call (by the start-time port
    /// rule this is already reflected in [`ZeekConn::start`]'s return; flips happen inside `on_segment`).
    /// The caller computes `ZeekSegment::is_orig` from the roles as they stand before each call; when this
    /// returns true afterwards, it must swap its own orig/resp mapping (addresses, ports, counters) — the
    /// segment just fed already counted under the new roles.
    pub fn take_flip(&mut self) -> bool {
        let pending = self.flags & F_FLIP_PENDING != 0;
        self.flags &= !F_FLIP_PENDING;
        pending
    }

    /// True when the first packet's sender is currently the responder (`^` flips are applied).
    pub fn roles_swapped(&self) -> bool {
        self.flags & F_SWAPPED != 0
    }

    /// Role of a packet given its direction relative to the connection's first packet: `from_first_sender`
    /// true means sent by the host that sent the first packet. An alternative to tracking [`take_flip`].
    ///
    /// [`take_flip`]: ZeekConn::take_flip
    pub fn dir_is_orig(&self, from_first_sender: bool) -> bool {
        from_first_sender != self.roles_swapped()
    }

    /// Zeek's `TCPSessionAdapter::IsReuse`: must a packet with these flags and sequence number start a new
    /// connection on the same 4-tuple (the old one is then logged)? Only SYNs qualify: any SYN once either side
    /// closed (FIN/RST), otherwise a SYN whose ISN differs from the originator's (a SYN-ACK only while the
    /// originator side is still inactive), except a SYN that completes a reversed SYN-ACK/SYN pair.
    pub fn is_reuse(&self, tcp_flags: u8, seq: u32) -> bool {
        if tcp_flags & SYN == 0 {
            return false;
        }
        let mut conn_orig = 0;
        if tcp_flags & ACK != 0 {
            if self.state_of(0) != EndpointState::Inactive {
                return false; // not a half connection
            }
            conn_orig = 1;
        }
        if !self.is_closed() {
            if seq == self.start[conn_orig] {
                return false;
            }
            if tcp_flags & ACK == 0
                && self.state_of(conn_orig) == EndpointState::SynAckSent
                && self.state_of(1) == EndpointState::Inactive
                && seq == self.start[1]
            {
                // SYN and SYN-ACK swapped on the wire: not a reuse, the state machine flips instead.
                return false;
            }
        }
        true
    }

    /// Zeek's `AttemptTimer` condition, checked `tcp_attempt_delay` after a connection began with a
    /// SYN: the originator is still waiting in SYN-SENT (or SYN-ACK-SENT) and the responder has sent
    /// nothing. Zeek then logs the connection and forgets it.
    pub fn is_unanswered_attempt(&self) -> bool {
        matches!(self.state_of(0), EndpointState::SynSent | EndpointState::SynAckSent)
            && self.state_of(1) == EndpointState::Inactive
    }

    /// Reads one word from each cache line of this state, so a batch can load it ahead of use.
    pub fn touch(&self) -> u32 {
        self.start[0] ^ u32::from(self.hist[HIST_BYTES - 1])
    }

    /// Either side was reported closed (Zeek's `IsClosed`).
    pub fn is_closed(&self) -> bool {
        (self.ep_flags[0] | self.ep_flags[1]) & EP_DID_CLOSE != 0
    }

    /// Both sides were reported closed (Zeek's `BothClosed`).
    pub fn both_closed(&self) -> bool {
        self.ep_flags[0] & self.ep_flags[1] & EP_DID_CLOSE != 0
    }

    /// Zeek's `conn_state` script function.
    pub fn conn_state(&self) -> ConnState {
        use EndpointState as S;
        let os = self.state_of(0);
        let rs = self.state_of(1);
        let o_inactive = os == S::Inactive || os == S::Partial;
        let r_inactive = rs == S::Inactive || rs == S::Partial;
        if rs == S::Reset {
            if os == S::SynSent || os == S::SynAckSent || (os == S::Reset && self.size(0) == 0 && self.size(1) == 0) {
                ConnState::REJ
            } else if o_inactive {
                ConnState::RSTRH
            } else {
                ConnState::RSTR
            }
        } else if os == S::Reset {
            if r_inactive {
                if history_is_syn_then_rst(self.history().as_bytes()) {
                    ConnState::RSTOS0
                } else {
                    ConnState::OTH
                }
            } else {
                ConnState::RSTO
            }
        } else if rs == S::Closed && os == S::Closed {
            ConnState::SF
        } else if os == S::Closed {
            if r_inactive {
                ConnState::SH
            } else {
                ConnState::S2
            }
        } else if rs == S::Closed {
            if o_inactive {
                ConnState::SHR
            } else {
                ConnState::S3
            }
        } else if os == S::SynSent && rs == S::Inactive {
            ConnState::S0
        } else if os == S::Established && rs == S::Established {
            ConnState::S1
        } else {
            ConnState::OTH
        }
    }

    /// Exactly Zeek's history string (up to [`HISTORY_CAP`] letters).
    pub fn history(&self) -> History {
        let mut h = History { letters: [0; HISTORY_CAP], len: 0 };
        let mut bits = self.hist_bits();
        for letter in h.letters.iter_mut() {
            let code = (bits & 0x1f) as usize;
            if code == 0 {
                break;
            }
            *letter = HIST_ALPHABET[code - 1];
            h.len += 1;
            bits >>= HIST_BITS;
        }
        h
    }

    /// True if letters were dropped because the history outgrew [`HISTORY_CAP`].
    pub fn history_truncated(&self) -> bool {
        self.flags & F_HIST_OVERFLOW != 0
    }

    /// Zeek's `orig_bytes`: the originator's `TCP_Endpoint::Size()` (sequence-space based, so it counts
    /// payload never captured and may be huge for broken sequence numbers, exactly like Zeek). Zeek logs it
    /// only when the connection's duration is positive.
    pub fn orig_bytes(&self) -> u64 {
        self.size(0)
    }

    /// Zeek's `resp_bytes`, see [`ZeekConn::orig_bytes`].
    pub fn resp_bytes(&self) -> u64 {
        self.size(1)
    }

    /// The originator's (`true`) or responder's (`false`) sequence tracking.
    pub fn endpoint(&self, orig: bool) -> EndpointView {
        let e = idx(orig);
        EndpointView {
            state: self.state_of(e),
            prev_state: self.prev_of(e),
            start_seq: self.start[e],
            last_seq: self.last[e],
            ack_seq: self.ack[e],
            fin_seen: self.ep_flags[e] & EP_FIN != 0,
            did_close: self.ep_flags[e] & EP_DID_CLOSE != 0,
        }
    }

    // ---- state and storage helpers -------------------------------------------------------------------------

    fn state_of(&self, e: usize) -> EndpointState {
        EndpointState::from_bits(self.state[e])
    }

    fn prev_of(&self, e: usize) -> EndpointState {
        EndpointState::from_bits(self.state[e] >> 4)
    }

    /// TCP_Endpoint::SetState: remember the previous state only on a real change.
    fn set_state(&mut self, e: usize, new: EndpointState) {
        let cur = self.state[e] & 0x0f;
        if new as u8 != cur {
            self.state[e] = (cur << 4) | new as u8;
        }
    }

    /// The rarely changed state, defaults when it was never changed.
    fn rare(&self) -> &Rare {
        static DEFAULT: Rare = Rare {
            fin_end: [0; 2],
            hist_rst: [0; 2],
            cnt_rxmt: [0; 2],
            cnt_win0: [0; 2],
            cnt_gap: [0; 2],
            cnt_chk: [0; 2],
            wraps: [0; 2],
            dirs: [DirCounters { rexmits: 0, zero_windows: 0, rsts: 0 }; 2],
        };
        self.rare.as_deref().unwrap_or(&DEFAULT)
    }

    /// The rarely changed state, for a change (allocated on first use).
    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// The owner's rare counters of wire direction `dir` (zero until first changed).
    pub fn dir_counters(&self, dir: usize) -> DirCounters {
        self.rare.as_ref().map_or_else(DirCounters::default, |r| r.dirs[dir])
    }

    /// The owner's rare counters of wire direction `dir`, for a change.
    pub fn dir_counters_mut(&mut self, dir: usize) -> &mut DirCounters {
        &mut self.rare_mut().dirs[dir]
    }

    /// Both wraps counters of endpoint `e` (low nibble seq, high nibble ack).
    fn wraps(&self, e: usize) -> u8 {
        if self.ep_flags[e] & EP_WRAPPED == 0 {
            0
        } else {
            self.rare().wraps[e]
        }
    }

    fn seq_wraps(&self, e: usize) -> u32 {
        (self.wraps(e) & 0x0f) as u32
    }

    fn ack_wraps(&self, e: usize) -> u32 {
        (self.wraps(e) >> 4) as u32
    }

    /// TCP_Endpoint::UpdateLastSeq.
    fn update_last(&mut self, e: usize, seq: u32) {
        if seq < self.last[e] && self.wraps(e) & 0x0f != 0x0f {
            self.rare_mut().wraps[e] += 1;
            self.ep_flags[e] |= EP_WRAPPED;
        }
        self.last[e] = seq;
    }

    /// TCP_Endpoint::UpdateAckSeq.
    fn update_ack(&mut self, e: usize, seq: u32) {
        if seq < self.ack[e] && self.wraps(e) >> 4 != 0x0f {
            self.rare_mut().wraps[e] += 0x10;
            self.ep_flags[e] |= EP_WRAPPED;
        }
        self.ack[e] = seq;
    }

    fn last_rel(&self, e: usize) -> u32 {
        self.last[e].wrapping_sub(self.start[e])
    }

    /// The packed history: letter `i` in bits `5 * i ..= 5 * i + 4`.
    fn hist_bits(&self) -> u128 {
        let mut bytes = [0u8; 16];
        bytes[..HIST_BYTES].copy_from_slice(&self.hist);
        u128::from_le_bytes(bytes)
    }

    fn set_hist_at(&mut self, i: usize, code: u128) {
        let shift = i * HIST_BITS;
        let bits = (self.hist_bits() & !(0x1f << shift)) | (code << shift);
        self.hist.copy_from_slice(&bits.to_le_bytes()[..HIST_BYTES]);
    }

    /// Number of history letters: every letter's code is non-zero, so the highest set bit is in
    /// the last letter.
    fn hist_len(&self) -> usize {
        (128 - self.hist_bits().leading_zeros() as usize).div_ceil(HIST_BITS)
    }

    /// The history is exactly the one letter `c` (checked on every packet, so without decoding).
    fn history_is_just(&self, c: u8) -> bool {
        let first_two = u16::from(self.hist[0]) | (u16::from(self.hist[1]) << 8);
        u128::from(first_two & 0x3ff) == hist_code(c)
    }

    /// Connection::AddHistory.
    fn add_history(&mut self, c: u8) {
        let n = self.hist_len();
        if n < HISTORY_CAP {
            self.set_hist_at(n, hist_code(c));
        } else {
            self.flags |= F_HIST_OVERFLOW;
        }
    }

    /// TCP_Endpoint::AddHistory: the responder's letters are lower case.
    fn add_role_history(&mut self, e: usize, code: u8) {
        self.add_history(if e == 0 { code } else { code.to_ascii_lowercase() });
    }

    /// TCP_Endpoint::CheckHistory / Connection::CheckHistory: records `code` the first time `mask` is seen for
    /// this role and returns false; returns true if it was already seen.
    fn check_history(&mut self, e: usize, mask: u8, code: u8) -> bool {
        if self.hist_seen[e] & mask == 0 {
            self.hist_seen[e] |= mask;
            self.add_role_history(e, code);
            false
        } else {
            true
        }
    }

    /// Connection::ScaledHistoryEntry: the letter at the 1st, 10th, 100th, ... event.
    fn scaled(&mut self, e: usize, which: Scaled) {
        let rare = self.rare_mut();
        let (count, code) = match which {
            Scaled::Checksum => {
                rare.cnt_chk[e] = rare.cnt_chk[e].saturating_add(1);
                (rare.cnt_chk[e] as u32, b'C')
            }
            Scaled::Rxmit => {
                rare.cnt_rxmt[e] = rare.cnt_rxmt[e].saturating_add(1);
                (rare.cnt_rxmt[e] as u32, b'T')
            }
            Scaled::Win0 => {
                rare.cnt_win0[e] = rare.cnt_win0[e].saturating_add(1);
                (rare.cnt_win0[e] as u32, b'W')
            }
            Scaled::Gap => {
                rare.cnt_gap[e] = rare.cnt_gap[e].saturating_add(1);
                (rare.cnt_gap[e] as u32, b'G')
            }
        };
        // Saturated counters stay at u8::MAX / u16::MAX, which are not powers of ten.
        if matches!(count, 1 | 10 | 100 | 1_000 | 10_000) {
            self.add_role_history(e, code);
        }
    }

    /// Connection::FlipRoles + TCPSessionAdapter::FlipRoles during packet processing: swap the endpoint
    /// objects, keep `hist_seen` as it is (Zeek does), append the caret.
    fn flip_roles(&mut self) {
        self.swap_endpoints();
        self.flags &= !F_PARTIAL;
        self.add_history(b'^');
    }

    /// The second-packet flip (Zeek PR #2191), reproduced as "as if flipped when the SYN-ACK arrived": the
    /// history becomes `^` plus the earlier letters with their case swapped (`H` -> `^h`), the history marks
    /// swap roles, and the SYN-ACK sender becomes an established responder, as `UpdateInactiveState` makes a
    /// responder's SYN-ACK.
    fn flip_as_if_at_start(&mut self) {
        self.swap_endpoints();
        self.hist_seen.swap(0, 1);
        let old = self.history();
        let n = usize::from(old.len);
        let mut i = n;
        while i > 0 {
            let c = old.letters[i - 1];
            let swapped = if c.is_ascii_uppercase() { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() };
            if i < HISTORY_CAP {
                self.set_hist_at(i, hist_code(swapped));
            } else {
                self.flags |= F_HIST_OVERFLOW;
            }
            i -= 1;
        }
        self.set_hist_at(0, hist_code(b'^'));
        self.state[1] = EndpointState::Established as u8; // prev_state Inactive
                                                          // The SYN-ACK would have been the responder's first packet: not partial (SetPartialStatus).
        self.flags &= !(F_PARTIAL | F_SEEN_ORIG);
        self.flags |= F_SEEN_RESP;
    }

    fn swap_endpoints(&mut self) {
        self.start.swap(0, 1);
        self.last.swap(0, 1);
        self.ack.swap(0, 1);
        self.reassem.swap(0, 1);
        self.hist_syn.swap(0, 1);
        self.state.swap(0, 1);
        self.ep_flags.swap(0, 1);
        if let Some(rare) = self.rare.as_deref_mut() {
            // Per-role state only: the owner's per-direction counters stay.
            rare.fin_end.swap(0, 1);
            rare.hist_rst.swap(0, 1);
            rare.cnt_rxmt.swap(0, 1);
            rare.cnt_win0.swap(0, 1);
            rare.cnt_gap.swap(0, 1);
            rare.cnt_chk.swap(0, 1);
            rare.wraps.swap(0, 1);
        }
        // first_packet_seen follows the endpoints.
        let o = self.flags & F_SEEN_ORIG != 0;
        let r = self.flags & F_SEEN_RESP != 0;
        self.flags &= !(F_SEEN_ORIG | F_SEEN_RESP);
        if o {
            self.flags |= F_SEEN_RESP;
        }
        if r {
            self.flags |= F_SEEN_ORIG;
        }
        self.flags ^= F_SWAPPED | F_FLIP_PENDING;
    }

    // ---- TCPSessionAdapter::Process pieces -----------------------------------------------------------------

    /// SetPartialStatus: only each side's first packet decides whether the connection is partial.
    fn set_partial_status(&mut self, syn: bool, ack: bool, is_orig: bool) {
        if is_orig {
            if self.flags & F_SEEN_ORIG == 0 {
                self.set_partial(!syn || ack);
            }
        } else if self.flags & F_SEEN_RESP == 0 && self.flags & F_PARTIAL == 0 {
            self.set_partial(!syn);
        }
    }

    fn set_partial(&mut self, partial: bool) {
        if partial {
            self.flags |= F_PARTIAL;
        } else {
            self.flags &= !F_PARTIAL;
        }
    }

    /// CheckPIA_FirstPacket's bookkeeping of `first_packet_seen`.
    fn check_pia_first_packet(&mut self, is_orig: bool) {
        self.flags |= if is_orig { F_SEEN_ORIG } else { F_SEEN_RESP };
    }

    /// init_endpoint: set up sequence numbers on a side's first packet, re-initialise on a new SYN.
    fn init_endpoint(&mut self, e: usize, syn: bool, first_seg_seq: u32, mut last_seq: u32) {
        use EndpointState as S;
        match self.state_of(e) {
            S::Inactive => {
                if syn {
                    self.ack[e] = first_seg_seq;
                    self.start[e] = first_seg_seq;
                } else {
                    // A partial connection: number as though a SYN had been seen, and don't let the
                    // first packet count as a retransmission.
                    self.ack[e] = first_seg_seq.wrapping_sub(1);
                    self.start[e] = first_seg_seq.wrapping_sub(1);
                    last_seq = first_seg_seq;
                }
                self.last[e] = last_seq;
            }
            S::SynSent | S::SynAckSent => {
                if syn && first_seg_seq != self.start[e] {
                    self.reinit(e, first_seg_seq, last_seq);
                }
            }
            S::Established | S::Partial => {
                if syn {
                    self.reinit(e, first_seg_seq, last_seq);
                }
            }
            S::Reset => {
                // Numbers came from a (maybe spoofed) RST; a SYN from this side is more trustworthy.
                if syn && self.prev_of(e) == S::Inactive {
                    self.reinit(e, first_seg_seq, last_seq);
                }
            }
            S::Closed => {}
        }
    }

    fn reinit(&mut self, e: usize, seq: u32, last_seq: u32) {
        self.start[e] = seq;
        self.ack[e] = seq;
        self.last[e] = last_seq;
    }

    /// get_relative_seq: sequence number relative to the endpoint's start, 64-bit across wraps; the flag is
    /// Zeek's underflow (a number before the start).
    fn relative_seq(&self, e: usize, cur: u32, last: u32, mut wraps: u32) -> (u64, bool) {
        let delta = seq_delta(cur, last);
        if delta < 0 {
            if wraps > 0 && cur > last {
                wraps -= 1; // part of a previous 32-bit sequence space
            }
        } else if delta > 0 && cur < last {
            wraps += 1; // the sequence space wrapped around
        }
        if wraps == 0 {
            let d = seq_delta(cur, self.start[e]);
            (d as i64 as u64, d < 0)
        } else {
            (((wraps as u64) << 32).wrapping_add(cur as u64).wrapping_sub(self.start[e] as u64), false)
        }
    }

    /// update_history: the flag letters (S H F R I Q D A).
    fn update_history(&mut self, e: usize, f: u8, rel_seq: u64, len: u32) {
        let (syn, fin, rst, ack) = (f & SYN != 0, f & FIN != 0, f & RST != 0, f & ACK != 0);
        let bits_set = syn as u8 + fin as u8 + rst as u8;
        if bits_set > 1 {
            if fin && rst {
                self.check_history(e, H_FIN_RST, b'I');
            } else {
                self.check_history(e, H_MULTI, b'Q');
            }
        } else if bits_set == 1 {
            if syn {
                let code = if ack { b'H' } else { b'S' };
                let rel = rel_seq as u16;
                if self.check_history(e, H_SYN, code) && rel != self.hist_syn[e] {
                    self.add_role_history(e, code);
                }
                self.hist_syn[e] = rel;
            }
            if fin {
                // For FINs the sequence number that counts is at the end of any data.
                let end = rel_seq.wrapping_add(len as u64) as u32;
                let last_fin = self.rare().fin_end[e].wrapping_sub(1); // hist_last_FIN, see struct docs
                if self.check_history(e, H_FIN, b'F') && end != last_fin {
                    self.add_role_history(e, b'F');
                }
                // fin_end is set by the caller to end + 1, i.e. hist_last_FIN = end.
            }
            if rst {
                let rel = rel_seq as u32;
                if self.check_history(e, H_RST, b'R') && rel != self.rare().hist_rst[e] {
                    self.add_role_history(e, b'R');
                }
                self.rare_mut().hist_rst[e] = rel;
            }
        } else if len > 0 {
            self.check_history(e, H_DATA, b'D');
        } else if ack {
            self.check_history(e, H_ACK, b'A');
        }
    }

    /// init_peer: the peer's numbering starts as if its SYN had been seen just before the ACKed byte.
    fn init_peer(&mut self, p: usize, ack_seq: u32) {
        let s = ack_seq.wrapping_sub(1);
        self.start[p] = s;
        self.ack[p] = s;
        self.last[p] = s;
    }

    /// update_ack_seq: only forward movement, and not to a suspicious zero.
    fn update_ack_seq(&mut self, p: usize, ack_seq: u32) {
        let delta_ack = seq_delta(ack_seq, self.ack[p]);
        if ack_seq == 0 && delta_ack > TOO_LARGE_SEQ_DELTA {
            // More likely a broken ACK than a large connection landing on 0.
        } else if delta_ack > 0 {
            self.update_ack(p, ack_seq);
        }
    }

    /// update_last_seq: advance `last_seq`; payload that does not advance it is a retransmission (`T`/`t`).
    fn update_last_seq(&mut self, e: usize, last_seq: u32, syn: bool, fin: bool, rst: bool, len: u32) {
        let delta_last = seq_delta(last_seq, self.last[e]);
        if (syn || rst) && !(-TOO_LARGE_SEQ_DELTA..=TOO_LARGE_SEQ_DELTA).contains(&delta_last) {
            // Don't trust outlandish SYN/RST sequence numbers.
        } else if fin && self.last[e] == self.start[e].wrapping_add(1) {
            // Only SYN and FIN seen (maybe a >2 GB connection): trust the FIN even backwards.
            self.update_last(e, last_seq);
        } else if self.state_of(e) == EndpointState::Reset {
            // Don't trust anything after a RST.
        } else if delta_last > 0 {
            self.update_last(e, last_seq);
        } else if len > 0 {
            self.scaled(e, Scaled::Rxmit);
        }
    }

    /// UpdateStateMachine: dispatch on the sending endpoint's state. Returns `do_close`. A SYN/SYN-ACK reversal
    /// flips the roles here; `e`/`p` then follow the endpoints to their new indices. (Zeek's `delta_last`
    /// argument only feeds a weird, so it is not passed.)
    fn update_state_machine(
        &mut self,
        e: &mut usize,
        p: &mut usize,
        base_seq: u32,
        len: u32,
        is_orig: bool,
        f: u8,
    ) -> bool {
        use EndpointState as S;
        let (syn, fin, rst, ack) = (f & SYN != 0, f & FIN != 0, f & RST != 0, f & ACK != 0);
        let mut do_close = false;
        match self.state_of(*e) {
            S::Inactive => {
                // UpdateInactiveState
                if syn {
                    if is_orig {
                        self.set_state(*e, if ack { S::SynAckSent } else { S::SynSent });
                    } else {
                        if !ack && self.state_of(*p) == S::SynAckSent && base_seq == self.start[*e] {
                            // SYN and SYN-ACK arrived swapped: flip the endpoints and establish.
                            self.flip_roles();
                            std::mem::swap(e, p);
                            self.set_state(*p, S::Established);
                            self.flags |= F_SEEN_ORIG; // SetFirstPacketSeen(true)
                        }
                        if self.state_of(*p) == S::SynSent {
                            self.set_state(*p, S::Established);
                        }
                        self.set_state(*e, S::Established);
                    }
                }
                if fin {
                    self.set_state(*e, S::Closed);
                    do_close = true;
                }
                if rst {
                    self.set_state(*e, S::Reset);
                    do_close = true;
                }
                if self.state_of(*e) == S::Inactive {
                    // No control flags changed the state.
                    if !is_orig && len == 0 && self.state_of(0) == S::SynSent {
                        // Some TCPs ACK an initial SYN before answering it: not a partial connection.
                    } else if ack && self.state_of(*p) == S::Established {
                        // A SYN-ACK without SYN, now an ACK: we just missed the SYN.
                        self.set_state(*e, S::Established);
                        self.flags &= !F_PARTIAL;
                        self.flags |= if is_orig { F_SEEN_ORIG } else { F_SEEN_RESP };
                    } else {
                        self.set_state(*e, S::Partial);
                    }
                }
            }
            S::SynSent | S::SynAckSent => {
                // UpdateSYN_SentState
                if fin {
                    self.set_state(*e, S::Closed);
                    do_close = true;
                }
                if rst {
                    self.set_state(*e, S::Reset);
                    do_close = true;
                }
            }
            S::Established | S::Partial => {
                // UpdateEstablishedState
                if syn && self.state_of(*e) == S::Partial && self.state_of(*p) == S::Inactive && !ack {
                    self.set_state(*e, S::SynSent); // SYN_after_partial
                }
                if fin && !rst {
                    self.set_state(*e, S::Closed);
                    if self.state_of(*p) == S::Reset && self.prev_of(*p) == S::Closed {
                        // The peer's FIN then RST was a normal termination after all.
                        self.set_state(*p, S::Closed);
                    }
                    do_close = true;
                }
                if rst {
                    self.set_state(*e, S::Reset);
                    do_close = true;
                }
            }
            S::Closed => {
                // UpdateClosedState: a RST after our FIN matters only if the peer has not closed too.
                if rst && self.state_of(*p) != S::Closed {
                    self.set_state(*e, S::Reset);
                    if self.ep_flags[*e] & EP_DID_CLOSE == 0 {
                        do_close = true;
                    }
                }
            }
            S::Reset => {} // UpdateResetState only reports weirds
        }
        do_close
    }

    /// ConnectionClosed: report the side closed unless its data is still pending delivery.
    fn connection_closed(&mut self, e: usize) {
        if self.data_pending(e) {
            self.ep_flags[e] |= EP_CLOSE_DEFERRED;
            return;
        }
        self.ep_flags[e] &= !EP_CLOSE_DEFERRED;
        self.ep_flags[e] |= EP_DID_CLOSE;
    }

    /// TCP_Reassembler::CheckEOF + EndpointEOF: a deferred close completes once nothing is pending.
    fn check_eof(&mut self, e: usize) {
        let st = self.state_of(e);
        if self.ep_flags[e] & EP_DID_EOF == 0
            && (self.ep_flags[e] & EP_FIN != 0 || st == EndpointState::Closed || st == EndpointState::Reset)
            && !self.data_pending(e)
        {
            self.ep_flags[e] |= EP_DID_EOF;
            if self.ep_flags[e] & EP_CLOSE_DEFERRED != 0 {
                self.connection_closed(e);
            }
        }
    }

    /// TCP_Reassembler::DataPending (on our approximate delivery point).
    fn data_pending(&self, e: usize) -> bool {
        let delivered = self.reassem[e];
        let last = self.last_rel(e);
        if seq_delta(last, delivered) < 0 {
            return false;
        }
        if delivered != last.wrapping_sub(1) && delivered != last {
            return true;
        }
        self.state_of(e) != EndpointState::Reset && self.ep_flags[e ^ 1] & EP_HOLE != 0
    }

    /// is_clean: established, or closed straight from established.
    fn is_clean(&self, e: usize) -> bool {
        let s = self.state_of(e);
        s == EndpointState::Established || (s == EndpointState::Closed && self.prev_of(e) == EndpointState::Established)
    }

    /// TCP_Reassembler::DataSent on the single-hole model.
    fn data_sent(&mut self, e: usize, rel_seq: u64, len: u32) {
        let ack_rel = (((self.ack_wraps(e) as u64) << 32)
            .wrapping_add(self.ack[e] as u64)
            .wrapping_sub(self.start[e] as u64)) as u32;
        let mut s = rel_seq as u32;
        let upper = s.wrapping_add(len);
        if seq_delta(s, ack_rel) < 0 {
            if seq_delta(upper, ack_rel) <= 0 {
                return; // already delivered and ACKed
            }
            s = ack_rel; // keep only the unacknowledged part
        }
        let r = self.reassem[e];
        if seq_delta(s, r) <= 0 {
            if seq_delta(upper, r) > 0 {
                self.reassem[e] = upper;
                if self.ep_flags[e] & EP_HOLE != 0 {
                    // Single-hole model: the hole is filled, deliver what was buffered above it.
                    let top = self.last_rel(e);
                    if seq_delta(top, upper) > 0 {
                        self.reassem[e] = top;
                    }
                    self.ep_flags[e] &= !EP_HOLE;
                }
            }
        } else {
            self.ep_flags[e] |= EP_HOLE;
        }
    }

    /// [`ZeekConn::trim_to_ack`] for an endpoint `x` that sent no FIN, both endpoints established
    /// (so a gap is clean): the fast path's share of it, without the checks that cannot apply.
    #[inline]
    fn trim_established(&mut self, x: usize, rel_ack: u64) {
        debug_assert!(self.ep_flags[x] & EP_FIN == 0 && self.is_clean(x) && self.is_clean(x ^ 1));
        let seq = rel_ack as u32;
        if seq_delta(seq, self.reassem[x]) > 0 && !(seq <= 2 && self.flags & F_PARTIAL != 0) {
            self.gap_to(x, seq, true);
        }
    }

    /// The gap part of [`ZeekConn::trim_to_ack`]: data up to `seq` was never delivered.
    fn gap_to(&mut self, x: usize, seq: u32, clean: bool) {
        if clean {
            self.scaled(x, Scaled::Gap);
        }
        let mut upto = seq;
        if self.ep_flags[x] & EP_HOLE != 0 {
            // The data seen above the hole is delivered after the gap.
            let top = self.last_rel(x);
            if seq_delta(top, upto) > 0 {
                upto = top;
            }
            self.ep_flags[x] &= !EP_HOLE;
        }
        self.reassem[x] = upto;
    }

    /// TCP_Reassembler::AckReceived -> TrimToSeq -> Undelivered -> Gap, on the single-hole model. `x` is the
    /// endpoint whose data is being acknowledged.
    fn ack_received(&mut self, x: usize, rel_ack: u64) {
        self.trim_to_ack(x, rel_ack);
        self.check_eof(x);
    }

    /// [`ZeekConn::ack_received`] up to, not including, its end-of-input check.
    fn trim_to_ack(&mut self, x: usize, rel_ack: u64) {
        let mut seq = rel_ack as u32;
        if self.ep_flags[x] & EP_FIN != 0 {
            let fin_end = self.rare().fin_end[x];
            if seq_delta(seq, fin_end) >= 0 {
                seq = fin_end.wrapping_sub(1); // don't count the FIN octet as missing data
            }
        }
        let r = self.reassem[x];
        if seq_delta(seq, r) > 0 {
            if seq <= 2 && self.flags & F_PARTIAL != 0 {
                // Faked initial numbers of a partial connection (first ACK or a keep-alive): ignore.
            } else {
                // Only established or cleanly closing connections get G/g; elsewhere gaps are often bogus.
                let clean = self.is_clean(x) && self.is_clean(x ^ 1);
                self.gap_to(x, seq, clean);
            }
        }
    }

    /// TCP_Endpoint::Size: bytes in sequence space, without the SYN and FIN octets.
    fn size(&self, e: usize) -> u64 {
        let p = e ^ 1;
        let start = self.start[e] as u64;
        let ack64 = ((self.ack_wraps(e) as u64) << 32) + self.ack[e] as u64;
        if self.prev_of(e) == EndpointState::SynSent
            && self.state_of(e) == EndpointState::Reset
            && self.state_of(p) == EndpointState::Inactive
            && !(ack64 == start || ack64 == start + 1)
        {
            // A discovered and aborted half-open connection: its numbers mean nothing.
            return 0;
        }
        let last64 = ((self.seq_wraps(e) as u64) << 32) + self.last[e] as u64;
        let mut size = if last64 > ack64 { last64.wrapping_sub(start) } else { ack64.wrapping_sub(start) };
        size = size.saturating_sub(1); // the SYN octet (faked for partial connections)
        if self.ep_flags[e] & EP_FIN != 0 && size != 0 {
            size -= 1; // the FIN octet
        }
        size
    }
}

/// get_segment_len: sequence space a segment occupies (RST payload is not part of the stream).
fn get_segment_len(len: u32, syn: bool, fin: bool, rst: bool) -> u32 {
    let mut seg_len = len;
    if syn {
        seg_len = seg_len.wrapping_add(1);
    }
    if fin {
        seg_len = seg_len.wrapping_add(1);
    }
    if rst {
        seg_len = seg_len.wrapping_sub(len);
    }
    seg_len
}

/// `/\^?S[^HAFGIQ]*R.*/ == history` from `conn_state` (a full match): an originator SYN, then an originator RST
/// with no upper-case H, A, F, G, I or Q in between.
fn history_is_syn_then_rst(h: &[u8]) -> bool {
    let h = h.strip_prefix(b"^").unwrap_or(h);
    let Some(rest) = h.strip_prefix(b"S") else { return false };
    for &c in rest {
        match c {
            b'R' => return true,
            b'H' | b'A' | b'F' | b'G' | b'I' | b'Q' => return false,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a compact trace. Each line is `DIR FLAGS SEQ [ACK] [len=N] [win=N] [bad] [trunc]`: DIR `>` is
    /// the first packet's sender, `<` the other host; FLAGS letters S A F R P U, and D = ACK+PSH (data).
    /// Window defaults to 1000. Roles come from `ZeekConn` itself, as the tracker would do it.
    fn run(sport: u16, dport: u16, trace: &[&str]) -> ZeekConn {
        let mut conn: Option<ZeekConn> = None;
        for line in trace {
            let mut it = line.split_whitespace();
            let dir = it.next().expect("direction");
            let from_first = match dir {
                ">" => true,
                "<" => false,
                _ => panic!("bad direction in {line:?}"),
            };
            let mut f = 0u8;
            for c in it.next().expect("flags").chars() {
                f |= match c {
                    'S' => SYN,
                    'A' => ACK,
                    'F' => FIN,
                    'R' => RST,
                    'P' => flags::PSH,
                    'U' => flags::URG,
                    'D' => ACK | flags::PSH,
                    _ => panic!("bad flag {c} in {line:?}"),
                };
            }
            let mut nums = Vec::new();
            let (mut len, mut win, mut bad, mut captured) = (0u32, 1000u16, false, true);
            for tok in it {
                if let Some(v) = tok.strip_prefix("len=") {
                    len = v.parse().expect("len");
                } else if let Some(v) = tok.strip_prefix("win=") {
                    win = v.parse().expect("win");
                } else if tok == "bad" {
                    bad = true;
                } else if tok == "trunc" {
                    captured = false;
                } else {
                    nums.push(tok.parse::<u32>().expect("number"));
                }
            }
            let c = conn.get_or_insert_with(|| {
                let (c, first_is_orig) = ZeekConn::start(f, sport, dport);
                assert_eq!(first_is_orig, !c.roles_swapped());
                c
            });
            let seg = ZeekSegment {
                is_orig: c.dir_is_orig(from_first),
                flags: f,
                seq: nums.first().copied().unwrap_or(0),
                ack: nums.get(1).copied().unwrap_or(0),
                payload_len: len,
                window: win,
                checksum_bad: bad,
            };
            c.on_segment_captured(&seg, false, captured);
        }
        conn.expect("empty trace")
    }

    /// Asserts (history, conn_state) for a trace between unremarkable ports.
    fn check(trace: &[&str], history: &str, state: &str) {
        check_ports(40000, 4000, trace, history, state);
    }

    fn check_ports(sport: u16, dport: u16, trace: &[&str], history: &str, state: &str) {
        let c = run(sport, dport, trace);
        assert_eq!((c.history().as_str(), c.conn_state().as_str()), (history, state), "trace {trace:?}");
    }

    const HANDSHAKE: [&str; 3] = ["> S 100", "< SA 300 101", "> A 101 301"];

    fn with(extra: &[&'static str]) -> Vec<&'static str> {
        HANDSHAKE.iter().copied().chain(extra.iter().copied()).collect()
    }

    #[test]
    fn size_is_compact() {
        assert_eq!(std::mem::size_of::<ZeekConn>(), 64);
    }

    /// The rarely changed state is boxed only once it changes, and then reads exactly as if it had
    /// been inline: per-role fields follow role flips, the owner's per-direction counters do not.
    #[test]
    fn rare_state_is_boxed_on_first_change_only() {
        let clean = run(40000, 4000, &with(&["> D 101 301 len=10", "< A 301 111"]));
        assert!(clean.rare.is_none());
        let closed = run(40000, 4000, &with(&["> D 101 301 len=10", "< A 301 111", "> FA 111 301", "< FA 301 112"]));
        assert!(closed.rare.is_some());
        assert_eq!(closed.history().as_str(), "ShADaFf");

        // A SYN-ACK first, then the SYN: the roles flip after the box was created by a zero window.
        let mut c = run(40000, 4000, &["> SA 300 101 win=0", "< S 100"]);
        assert!(c.roles_swapped());
        c.dir_counters_mut(1).rexmits = 7;
        let before = c.rare().clone();
        c.swap_endpoints();
        let after = c.rare();
        assert_eq!((after.cnt_win0[0], after.cnt_win0[1]), (before.cnt_win0[1], before.cnt_win0[0]));
        assert_eq!(after.dirs, before.dirs);
        assert_eq!(c.dir_counters(1).rexmits, 7);
    }

    /// Sequence wraps live in the box too, behind a per-endpoint flag: a connection whose
    /// numbers wrap past 2^32 still counts its bytes across the wrap.
    #[test]
    fn sequence_wraps_are_counted_through_the_box() {
        let c = run(
            40000,
            4000,
            &["> S 4294967290", "< SA 300 4294967291", "> A 4294967291 301", "> D 4294967291 301 len=20", "< A 301 15"],
        );
        assert!(c.ep_flags[0] & EP_WRAPPED != 0 && c.ep_flags[1] & EP_WRAPPED == 0);
        assert_eq!((c.seq_wraps(0), c.ack_wraps(0)), (1, 1));
        assert_eq!((c.orig_bytes(), c.history().as_str()), (20, "ShADa"));
    }

    #[test]
    fn likely_server_ports_sorted() {
        assert!(LIKELY_SERVER_PORTS.windows(2).all(|w| w[0] < w[1]));
        assert!(is_likely_server_port(80) && is_likely_server_port(6669) && !is_likely_server_port(1433));
    }

    // Zeek baselines: scripts.base.protocols.conn.conn_state-RST-behavior (zeek -b -C), traces in corpus/zeek/tcp.
    #[test]
    fn baseline_single_rst() {
        check_ports(48777, 80, &["> R 0"], "R", "OTH");
    }

    #[test]
    fn baseline_syn_then_rst() {
        check_ports(13131, 31313, &["> S 0", "> R 0"], "SR", "RSTOS0");
    }

    #[test]
    fn baseline_syn_then_ack_then_rst() {
        check_ports(13131, 31313, &["> S 0", "< A 0 0", "> R 0"], "SaR", "RSTOS0");
    }

    #[test]
    fn baseline_syn_then_stuff_then_rst() {
        check_ports(13131, 31313, &["> S 0", "< A 0 0", "> F 0", "> R 0"], "SaFR", "OTH");
    }

    // core.tcp.bad-checksum-syn: a SYN with a bad checksum leaves only `C`.
    #[test]
    fn baseline_bad_checksum_syn() {
        check_ports(59856, 80, &["> S 4263588410 bad"], "C", "OTH");
    }

    // core.conn-size-flip (one-sided-2745.pcap, -b): SYN-ACK, ACK, FIN-ACK from the server only.
    #[test]
    fn baseline_one_sided_synack_flip() {
        let c =
            run(1433, 2745, &["> SA 1898078251 1847199028", "> A 1898078252 1847199080", "> FA 1898078252 1847199081"]);
        assert_eq!(c.history(), "^haf");
        assert!(c.roles_swapped());
        assert_eq!(c.conn_state(), ConnState::SHR);
    }

    // core.tcp.flip-without-syn (http-on-irc-port-missing-syn.pcapng): both ports likely, SYN-ACK first.
    #[test]
    fn baseline_flip_without_syn() {
        let c = run(
            80,
            6669,
            &[
                "> SA 2779762238 4263588411",
                "< A 4263588411 2779762239",
                "< D 4263588411 2779762239 len=136",
                "> A 2779762239 4263588547",
                "> A 2779762239 4263588547 len=1448",
                "> A 2779763687 4263588547 len=1448",
                "> A 2779765135 4263588547 len=1448",
                "> D 2779766583 4263588547 len=663",
                "< A 4263588547 2779765135",
                "< A 4263588547 2779767246",
                "< FA 4263588547 2779767246",
                "> FA 2779767246 4263588548",
                "< A 4263588548 2779767247",
            ],
        );
        assert_eq!((c.history().as_str(), c.conn_state().as_str()), ("^hADadFf", "SF"));
        assert_eq!((c.orig_bytes(), c.resp_bytes()), (136, 5007));
    }

    // core.connection_flipped (handshake-reorder.pcap): SYN-ACK seen before the SYN, no likely port.
    #[test]
    fn baseline_handshake_reorder() {
        let c = run(
            5555,
            59856,
            &[
                "> SA 2779762238 4263588411",
                "< S 4263588410",
                "< A 4263588411 2779762239",
                "< D 4263588411 2779762239 len=136",
                "> A 2779762239 4263588547",
                "> D 2779762239 4263588547 len=100",
                "< FA 4263588547 2779762339",
                "> FA 2779762339 4263588548",
                "< A 4263588548 2779762340",
            ],
        );
        assert_eq!((c.history().as_str(), c.conn_state().as_str()), ("Hs^ADadFf", "SF"));
        assert!(c.roles_swapped());
    }

    #[test]
    fn s0_and_repeated_syn() {
        check(&["> S 100"], "S", "S0");
        // Same ISN: a retransmission, no second S, not a new connection.
        let c = run(40000, 4000, &["> S 100", "> S 100"]);
        assert_eq!(c.history(), "S");
        assert!(!c.is_reuse(SYN, 100));
        // A different ISN starts a new connection in Zeek (IsReuse); the tracker must split there.
        assert!(c.is_reuse(SYN, 5000));
        // Once a side closed, any SYN starts a new connection.
        let c = run(40000, 4000, &["> S 100", "< RA 0 101"]);
        assert!(c.is_reuse(SYN, 100));
    }

    #[test]
    fn rej() {
        check(&["> S 100", "< RA 0 101"], "Sr", "REJ");
    }

    #[test]
    fn s1_sf_s2_s3() {
        check(&HANDSHAKE, "ShA", "S1");
        check(
            &with(&[
                "> D 101 301 len=10",
                "< A 301 111",
                "< D 301 111 len=20",
                "> A 111 321",
                "> FA 111 321",
                "< FA 321 112",
                "> A 112 322",
            ]),
            "ShADadFf",
            "SF",
        );
        check(&with(&["> FA 101 301"]), "ShAF", "S2");
        check(&with(&["< FA 301 101"]), "ShAf", "S3");
        let c = run(40000, 4000, &with(&["> D 101 301 len=10", "< D 301 111 len=20", "> FA 111 321", "< FA 321 112"]));
        assert_eq!((c.orig_bytes(), c.resp_bytes()), (10, 20));
    }

    #[test]
    fn resets() {
        check(&with(&["> RA 101 301"]), "ShAR", "RSTO");
        check(&with(&["< RA 301 101"]), "ShAr", "RSTR");
        check(&["> S 100", "> R 101"], "SR", "RSTOS0");
        // Repeated RSTs: a new letter only for a new sequence number.
        check(&with(&["< R 301", "< R 301", "< R 5000"]), "ShArr", "RSTR");
    }

    #[test]
    fn synack_only_states() {
        // A SYN-ACK from a likely server port is flipped at once: the server is the responder.
        check_ports(80, 40000, &["> SA 300 101", "> R 301"], "^hr", "RSTRH");
        check_ports(80, 40000, &["> SA 300 101", "> FA 301 101"], "^hf", "SHR");
        check_ports(80, 6705, &["> SA 300 101"], "^h", "OTH");
        // Unflipped SYN-ACK answered by a RST (a stealth-scan reply): rejected, no flip.
        check(&["> SA 300 101", "< R 101"], "Hr", "REJ");
    }

    #[test]
    fn sh_and_multi_flags() {
        check(&["> S 100", "> F 101"], "SF", "SH");
        check(&["> SF 100"], "Q", "SH");
        check(&with(&["> FRA 101 301"]), "ShAI", "RSTO");
    }

    #[test]
    fn midstream() {
        check(&["> D 500 600 len=10", "< A 600 510"], "Da", "OTH");
        // Zeek's retransmit-timeout baseline: the same data twice, then a lone ACK: `Da` OTH.
        check(&["> A 500 600"], "A", "OTH");
    }

    #[test]
    fn retransmissions() {
        check(&with(&["< D 301 101 len=10", "< D 301 101 len=10"]), "ShAdt", "S1");
        let mut trace = with(&["> D 101 301 len=10"; 10]);
        // One new segment and nine retransmissions: `T` at the 1st; the 10th retransmission adds the 2nd `T`.
        check(&trace, "ShADT", "S1");
        trace.push("> D 101 301 len=10");
        check(&trace, "ShADTT", "S1");
        // A RST carrying payload at the current sequence number counts as a retransmission in Zeek.
        check(&with(&["> RA 101 301 len=5"]), "ShART", "RSTO");
    }

    #[test]
    fn zero_window() {
        check(&with(&["< A 301 101 win=0"]), "ShAaw", "S1");
        check(&with(&["< A 301 101 win=0"; 10]), "ShAaww", "S1");
        // Not with a RST.
        check(&with(&["< RA 301 101 win=0"]), "ShAr", "RSTR");
    }

    #[test]
    fn content_gaps() {
        // The originator ACKs 20 responder bytes never seen: a responder gap.
        check(&with(&["> A 101 321"]), "ShAg", "S1");
        // Truncated payload is not delivered, so its ACK is a gap too.
        check(&with(&["< D 301 101 len=20 trunc", "> A 101 321"]), "ShAdg", "S1");
        // A lost segment, the next one seen, then both ACKed: one gap.
        check(&with(&["< D 311 101 len=10", "> A 101 321", "< D 321 101 len=5", "> A 101 326"]), "ShAdg", "S1");
        // A segment overtaken by the next one arrives before the ACK: no gap (but Zeek calls it `t`).
        check(&with(&["< D 311 101 len=10", "< D 301 101 len=10", "> A 101 321"]), "ShAdt", "S1");
    }

    #[test]
    fn checksums() {
        let c = run(40000, 4000, &["> S 100 bad"]);
        assert_eq!(c.history(), "C");
        let mut c = run(40000, 4000, &["> S 100"]);
        let seg =
            ZeekSegment { is_orig: true, flags: SYN, seq: 100, ack: 0, payload_len: 0, window: 1, checksum_bad: true };
        c.on_segment(&seg, true); // -C: checksums ignored
        assert_eq!(c.history(), "S");
    }

    #[test]
    fn take_flip_reports_flips() {
        let (mut c, first_is_orig) = ZeekConn::start(SYN | ACK, 1433, 2745);
        assert!(first_is_orig);
        let mut seg = ZeekSegment {
            is_orig: true,
            flags: SYN | ACK,
            seq: 10,
            ack: 20,
            payload_len: 0,
            window: 100,
            checksum_bad: false,
        };
        c.on_segment(&seg, false);
        assert!(!c.take_flip());
        seg.flags = ACK;
        seg.seq = 11;
        c.on_segment(&seg, false);
        assert!(c.take_flip());
        assert!(!c.take_flip());
        assert!(!c.dir_is_orig(true));
    }

    /// The established-segment shortcut changes exactly what Zeek's full path changes: random
    /// connections (handshakes, ISNs near the wrap, data in and out of order, lost and truncated
    /// segments, zero windows, bad checksums, FINs and RSTs) fed both ways stay equal packet by
    /// packet.
    #[test]
    fn the_established_shortcut_matches_the_full_path() {
        let mut x: u32 = 0x2545_f491;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut shortcuts = 0;
        for _ in 0..2_000 {
            let isn = [if next() & 1 == 0 { next() } else { u32::MAX - next() % 5_000 }, next()];
            let mut sent = [isn[0].wrapping_add(1), isn[1].wrapping_add(1)];
            let (mut fast, _) = ZeekConn::start(SYN, 40000, 443);
            let mut full = fast.clone();
            let handshake =
                [(true, SYN, isn[0], 0), (false, SYN | ACK, isn[1], sent[0]), (true, ACK, sent[0], sent[1])];
            let skip_handshake = next() % 8;
            for (i, (is_orig, flags, seq, ack)) in handshake.into_iter().enumerate() {
                if skip_handshake == i as u32 {
                    continue;
                }
                let seg = ZeekSegment { is_orig, flags, seq, ack, payload_len: 0, window: 100, checksum_bad: false };
                fast.on_segment_captured(&seg, false, true);
                full.on_any_segment(&seg, false, true);
            }
            for _ in 0..60 {
                let from = (next() & 1) as usize;
                let r = next() % 100;
                let flags = match r {
                    0..=2 => FIN | ACK,
                    3 => RST,
                    4 => RST | ACK,
                    5 => SYN,
                    6 => 0,
                    _ => ACK | if next() & 1 == 0 { flags::PSH } else { 0 },
                };
                let len = if next() % 3 == 0 { 0 } else { next() % 1460 + 1 };
                let seq = match next() % 10 {
                    0 => sent[from].wrapping_sub(next() % 3000),
                    1 => sent[from].wrapping_add(next() % 3000),
                    _ => sent[from],
                };
                let ack = match next() % 10 {
                    0 => sent[from ^ 1].wrapping_sub(next() % 3000),
                    1 => sent[from ^ 1].wrapping_add(next() % 3000),
                    _ => sent[from ^ 1],
                };
                if seq == sent[from] {
                    sent[from] = sent[from].wrapping_add(len);
                }
                let seg = ZeekSegment {
                    is_orig: from == 0,
                    flags,
                    seq,
                    ack,
                    payload_len: len,
                    window: if next() % 20 == 0 { 0 } else { 100 },
                    checksum_bad: next() % 40 == 0,
                };
                let (ignore, captured) = (next() % 10 == 0, next() % 4 != 0);
                let before = fast.clone();
                shortcuts += usize::from(fast.clone().on_established_segment(&seg, captured));
                fast.on_segment_captured(&seg, ignore, captured);
                full.on_any_segment(&seg, ignore, captured);
                assert_eq!(fast, full, "after {seg:?} on {before:?}");
                let _ = (fast.take_flip(), full.take_flip());
            }
        }
        // The shortcut is taken often enough for the comparison to mean something.
        assert!(shortcuts > 20_000, "{shortcuts}");
    }

    #[test]
    fn no_panic_on_garbage() {
        let mut x: u32 = 12345;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..200 {
            let (mut c, _) = ZeekConn::start(next() as u8, next() as u16, next() as u16);
            for _ in 0..200 {
                let seg = ZeekSegment {
                    is_orig: next() & 1 == 0,
                    flags: next() as u8,
                    seq: if next() & 3 == 0 { next() } else { next() % 64 },
                    ack: next() % 128,
                    payload_len: next() % 3000,
                    window: (next() % 3) as u16,
                    checksum_bad: next() % 50 == 0,
                };
                c.on_segment_captured(&seg, next() & 1 == 0, next() & 7 != 0);
                let _ = c.take_flip();
                let _ = (c.history(), c.conn_state(), c.orig_bytes(), c.resp_bytes());
            }
            assert!(c.history().len() <= HISTORY_CAP);
        }
    }
}
