//! What the agent reports: one [`RstEvent`] per RST packet, one [`FlowSummary`] per connection,
//! and one [`ConnOpen`] per connection as soon as its identity is known.
//!
//! The Open comes early because the collector needs a connection's identity (both ISNs, TCP
//! timestamps, SYN options, handshake times and TTLs) to match it across vantage points and to
//! estimate clock offsets while the connection still runs, not minutes later with the summary.
//!
//! These are plain domain values. The JSON writer and (from the collector issue on) the protobuf
//! conversion turn them into wire formats; nothing here knows either.

use std::fmt;

use rstscope_proto::{Endpoint, FlowKey};

use crate::wire::{Checksum, OptionLayout, TcpFlags};

/// Something the tracker reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A RST packet with its evidence.
    Reset(Box<RstEvent>),
    /// A connection ended, expired, was evicted, or the input ended.
    Flow(Box<FlowSummary>),
    /// A connection's identity, once known: at the responder's first SYN-ACK, or with the first
    /// packet of a record that did not start with a SYN.
    Open(Box<ConnOpen>),
}

/// Which end of the connection sent a packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// The endpoint that opened the connection (sent the SYN, or guessed by port).
    Originator,
    /// The endpoint that accepted it.
    Responder,
}

impl Role {
    /// `orig` or `resp`, as Zeek abbreviates them.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Originator => "orig",
            Role::Responder => "resp",
        }
    }
}

/// Where the connection was when a RST arrived, from this vantage point.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    /// Nothing else of this connection had been seen.
    None,
    /// The originator's SYN was seen, no answer yet.
    SynSent,
    /// The responder's SYN-ACK was seen, the handshake is not complete.
    SynReceived,
    /// Handshake complete (or data flowing both ways), no FIN yet.
    Established,
    /// One side sent FIN.
    HalfClosed,
    /// Both sides sent FIN.
    Closing,
    /// A RST had already been seen on this connection.
    Reset,
    /// Packets were seen, but not the handshake (the capture started mid-connection).
    Midstream,
}

impl Phase {
    /// Stable lower-case name used in the outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::None => "none",
            Phase::SynSent => "syn-sent",
            Phase::SynReceived => "syn-received",
            Phase::Established => "established",
            Phase::HalfClosed => "half-closed",
            Phase::Closing => "closing",
            Phase::Reset => "reset",
            Phase::Midstream => "midstream",
        }
    }
}

/// The local hypothesis of why a RST was sent (vocabulary: `shared/docs/reset-causes.md`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cause {
    /// SYN to a port with no listener: RST+ACK answering the SYN.
    Refused,
    /// The client raced SYNs and reset the loser after its SYN-ACK.
    DuplicateSynCancel,
    /// The sender retransmitted without an ACK, then gave up.
    RetransmissionTimeout,
    /// In-sequence RST from an established endpoint: abortive close.
    AppAbort,
    /// The receiver of a segment had no connection for it.
    NoConnection,
    /// A SYN reused a tuple in TIME_WAIT with too low an ISN.
    PortReuse,
    /// RST after FINs in both directions.
    AfterClose,
    /// No other packet of the connection was seen.
    Lone,
    /// Nothing fits.
    Unknown,
}

impl Cause {
    /// The vocabulary name.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Refused => "refused",
            Cause::DuplicateSynCancel => "duplicate-syn-cancel",
            Cause::RetransmissionTimeout => "retransmission-timeout",
            Cause::AppAbort => "app-abort",
            Cause::NoConnection => "no-connection",
            Cause::PortReuse => "port-reuse",
            Cause::AfterClose => "after-close",
            Cause::Lone => "lone",
            Cause::Unknown => "unknown",
        }
    }
}

/// How a RST's sequence number relates to what its receiver expects next.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SeqRelation {
    /// Exactly the next expected sequence number: the receiver accepts it (RFC 5961).
    Exact,
    /// Inside the receive window but not exact: the receiver answers with a challenge ACK.
    InWindow,
    /// Outside the window: the receiver ignores it.
    OutOfWindow,
    /// No sequence state for the sender at this vantage point.
    Unknown,
}

impl SeqRelation {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            SeqRelation::Exact => "exact",
            SeqRelation::InWindow => "in-window",
            SeqRelation::OutOfWindow => "out-of-window",
            SeqRelation::Unknown => "unknown",
        }
    }
}

/// One named finding that a cause or a suspicion rests on.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Evidence {
    /// Stable kebab-case name (`ttl-mismatch`, `retransmissions-before`, ...).
    pub name: &'static str,
    /// Human-readable detail with the numbers.
    pub detail: String,
}

impl Evidence {
    /// A finding.
    pub fn new(name: &'static str, detail: impl Into<String>) -> Self {
        Evidence { name, detail: detail.into() }
    }
}

/// The peer packet a RST answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Answered {
    /// Its capture time (ns).
    pub ts_ns: i64,
    /// Its flags.
    pub flags: TcpFlags,
    /// Its sequence number.
    pub seq: u32,
    /// Its acknowledgment number.
    pub ack: u32,
    /// Its payload length.
    pub payload_len: u32,
}

/// Packets and payload bytes per direction.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Counts {
    /// Packets from the originator.
    pub orig_pkts: u64,
    /// Payload bytes from the originator.
    pub orig_bytes: u64,
    /// Packets from the responder.
    pub resp_pkts: u64,
    /// Payload bytes from the responder.
    pub resp_bytes: u64,
}

/// Stable identifier of one connection record: a hash of its key and start time in Zeek's
/// `C...` style. Deterministic, so offline and live analysis of the same packets agree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ConnId(pub u64);

impl ConnId {
    /// The id of the connection with `key` whose first packet was at `start_ns`.
    pub fn new(key: &FlowKey, start_ns: i64) -> Self {
        // FNV-1a over a fixed byte layout: stable across runs, platforms and versions.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for ep in [key.lo(), key.hi()] {
            match ep.ip() {
                std::net::IpAddr::V4(a) => eat(&a.octets()),
                std::net::IpAddr::V6(a) => eat(&a.octets()),
            }
            eat(&ep.port().to_be_bytes());
        }
        eat(&start_ns.to_be_bytes());
        ConnId(hash)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut n = self.0;
        let mut digits = [b'0'; 11];
        for d in digits.iter_mut().rev() {
            *d = ALPHABET[(n % 62) as usize];
            n /= 62;
        }
        write!(f, "C{}", std::str::from_utf8(&digits).unwrap_or("?"))
    }
}

/// One RST packet and everything this vantage point knows about it.
#[derive(Clone, Debug, PartialEq)]
pub struct RstEvent {
    /// Capture time (ns since the epoch).
    pub ts_ns: i64,
    /// Sender as seen on the wire.
    pub src: Endpoint,
    /// Receiver as seen on the wire.
    pub dst: Endpoint,
    /// Connection record this RST belongs to.
    pub conn_id: ConnId,
    /// Which end sent it.
    pub sender: Role,
    /// Header flags (RST, RST+ACK, plus anything else set).
    pub flags: TcpFlags,
    /// Payload length (a RST may carry data, e.g. a diagnostic text).
    pub payload_len: u32,
    /// Raw sequence number.
    pub seq: u32,
    /// Raw acknowledgment number.
    pub ack: u32,
    /// Raw window.
    pub window: u16,
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv4 identification.
    pub ip_id: Option<u16>,
    /// TCP checksum verification.
    pub checksum: Checksum,
    /// Connection phase just before this RST.
    pub phase: Phase,
    /// Zeek history so far (before this RST).
    pub history: String,
    /// Packets and bytes per direction so far (before this RST).
    pub counts: Counts,
    /// Retransmissions the sender's peer made in the run just before the RST.
    pub peer_retransmissions: u32,
    /// Retransmissions the sender itself made in the run just before the RST.
    pub sender_retransmissions: u32,
    /// Time since the peer's last packet (ns), if the peer was seen.
    pub since_peer_last_ns: Option<i64>,
    /// Sequence number against the receiver's expectation.
    pub seq_relation: SeqRelation,
    /// RST TTL minus the TTL of the sender's previous packet at this vantage point.
    pub ttl_delta: Option<i16>,
    /// RST IP ID minus the sender's previous IP ID (wrapping, IPv4 only).
    pub ip_id_delta: Option<i32>,
    /// The peer packet this RST answers, if the numbers say it answers one.
    pub answers: Option<Answered>,
    /// Local cause hypothesis.
    pub cause: Cause,
    /// The findings the cause and any injection suspicion rest on.
    pub evidence: Vec<Evidence>,
}

/// Why a flow summary was written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FlowEnd {
    /// Closed or reset and the linger time passed.
    Closed,
    /// No packets for the inactivity timeout.
    Inactive,
    /// The SYN stayed unanswered for the attempt timeout (Zeek's `connection_attempt`).
    Unanswered,
    /// Pushed out of a full table (oldest idle first).
    Evicted,
    /// A new connection reused the tuple.
    Reused,
    /// The input ended.
    EndOfInput,
}

impl FlowEnd {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowEnd::Closed => "closed",
            FlowEnd::Inactive => "inactive",
            FlowEnd::Unanswered => "unanswered",
            FlowEnd::Evicted => "evicted",
            FlowEnd::Reused => "reused",
            FlowEnd::EndOfInput => "end-of-input",
        }
    }
}

/// Per-direction totals of a finished connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DirectionSummary {
    /// Packets sent.
    pub pkts: u64,
    /// Payload bytes sent (sum of segment payloads, retransmissions included).
    pub payload_bytes: u64,
    /// Bytes by Zeek's sequence-space rule (`orig_bytes`/`resp_bytes` in conn.log).
    pub zeek_bytes: u64,
    /// Retransmitted segments.
    pub retransmissions: u32,
    /// RST packets sent.
    pub rsts: u32,
    /// Zero-window advertisements.
    pub zero_windows: u32,
    /// First, last, lowest and highest TTL/hop limit seen; `None` if nothing was sent.
    pub ttl: Option<TtlRange>,
}

/// TTL or hop-limit statistics of one direction.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TtlRange {
    /// First packet's TTL.
    pub first: u8,
    /// Last packet's TTL.
    pub last: u8,
    /// Lowest.
    pub min: u8,
    /// Highest.
    pub max: u8,
}

/// One connection, summarised when it ends.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSummary {
    /// Connection record id.
    pub conn_id: ConnId,
    /// Direction-free key.
    pub key: FlowKey,
    /// The originator.
    pub orig: Endpoint,
    /// The responder.
    pub resp: Endpoint,
    /// First packet time (ns).
    pub start_ns: i64,
    /// Last packet time (ns).
    pub end_ns: i64,
    /// Zeek conn_state.
    pub conn_state: &'static str,
    /// Zeek history.
    pub history: String,
    /// Originator's direction.
    pub orig_dir: DirectionSummary,
    /// Responder's direction.
    pub resp_dir: DirectionSummary,
    /// This record was started by a SYN that reused the tuple of an earlier connection.
    pub port_reuse: bool,
    /// Why the summary was written.
    pub end: FlowEnd,
}

/// A connection's identity as this vantage point saw its start (`rstscope.v1.ConnectionOpen`).
///
/// Emitted once per connection record: when the responder's first SYN-ACK answers the
/// originator's SYN, or with the first packet of a record that did not start with a SYN. Never
/// for a SYN left unanswered or refused. Fields the agent did not see are `None`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnOpen {
    /// Connection record id (the same as in its RST events and summary).
    pub conn_id: ConnId,
    /// The originator, as the record's roles stood when the Open was emitted.
    pub orig: Endpoint,
    /// The responder.
    pub resp: Endpoint,
    /// First packet of the record (ns).
    pub start_ns: i64,
    /// The originator's ISN, from its SYN.
    pub orig_isn: Option<u32>,
    /// The responder's ISN, from its SYN-ACK.
    pub resp_isn: Option<u32>,
    /// Time of the originator's first SYN (ns).
    pub syn_ns: Option<i64>,
    /// Time of the responder's first SYN-ACK (ns).
    pub synack_ns: Option<i64>,
    /// TSval of the originator's SYN.
    pub syn_tsval: Option<u32>,
    /// TSval of the responder's SYN-ACK.
    pub synack_tsval: Option<u32>,
    /// Option layout of the originator's SYN (empty without a SYN or options).
    pub syn_options: OptionLayout,
    /// TTL or hop limit of the originator's SYN, or of its first packet midstream.
    pub orig_ttl: Option<u8>,
    /// TTL or hop limit of the responder's SYN-ACK, or of its first packet midstream.
    pub resp_ttl: Option<u8>,
    /// IPv4 identification of the originator's SYN.
    pub syn_ip_id: Option<u16>,
    /// The record started without a handshake (no SYN from either side was seen first).
    pub midstream: bool,
}
