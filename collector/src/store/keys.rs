//! Byte layouts of keys and values. Everything is big-endian so that sled's byte order is the
//! order we want to scan in; nothing here touches sled itself.

use std::fmt;
use std::str::FromStr;

use rstscope_proto::{v1, FlowKey};

/// Length of a record key ([`StoreSeq::to_bytes`]).
pub(crate) const RECORD_KEY_LEN: usize = 28;
/// Length of a connection index key: hour, flow key, kind, record key.
pub(crate) const CONN_KEY_LEN: usize = 4 + 36 + 1 + RECORD_KEY_LEN;
/// Offset of the kind byte in a connection index key.
pub(crate) const CONN_KIND_AT: usize = 4 + 36;
/// Width of the connection index's time buckets: one hour of event time.
const CONN_BUCKET_NS: u64 = 3_600_000_000_000;
/// Length of the header in front of every stored reset or flow value.
pub(crate) const HEADER_LEN: usize = 40;
/// Version byte of the value header; bump when the layout changes.
const VALUE_VERSION: u8 = 1;

/// Kind byte in the connection index: flows sort before resets of the same connection.
pub(crate) const KIND_FLOW: u8 = 0;
/// Kind byte in the connection index for resets.
pub(crate) const KIND_RESET: u8 = 1;
/// Kind byte in the connection index for connection openings.
pub(crate) const KIND_OPEN: u8 = 2;
/// Kind byte of capture-loss records (never in the connection index: they have no flow).
pub(crate) const KIND_LOSS: u8 = 3;

/// The smallest record key: event times before 1970 are refused, so every record key starts
/// with a byte >= 0x80 and everything below is free for the trees' reserved keys (tallies).
pub(crate) const FIRST_RECORD_KEY: [u8; 8] = ts_bytes(0);

/// Reserved key of a record tree holding its record count (kept in the same atomic batch as
/// the records, so the count can never disagree with the tree after a crash).
pub(crate) const TALLY_TOTAL_KEY: [u8; 2] = [0x00, b'n'];

/// Reserved key of a record tree holding one agent's [`Tally`].
pub(crate) fn tally_key(agent_id: u32) -> [u8; 6] {
    let id = agent_id.to_be_bytes();
    [0x00, b'a', id[0], id[1], id[2], id[3]]
}

/// Prefix of every per-agent tally key.
pub(crate) const TALLY_AGENT_PREFIX: [u8; 2] = [0x00, b'a'];

/// What one record tree holds of one agent: the count, the newest record time (so that events
/// newer than it skip the duplicate check), and for capture losses the summed drop counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) records: u64,
    /// Newest key time stored for the agent (never lowered by retention); `i64::MIN`: none.
    pub(crate) newest_ns: i64,
    pub(crate) capture_dropped: u64,
    pub(crate) events_dropped: u64,
}

impl Tally {
    pub(crate) const EMPTY: Tally = Tally { records: 0, newest_ns: i64::MIN, capture_dropped: 0, events_dropped: 0 };

    pub(crate) fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[0..8].copy_from_slice(&self.records.to_be_bytes());
        out[8..16].copy_from_slice(&self.newest_ns.to_be_bytes());
        out[16..24].copy_from_slice(&self.capture_dropped.to_be_bytes());
        out[24..32].copy_from_slice(&self.events_dropped.to_be_bytes());
        out
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Tally> {
        let b: &[u8; 32] = bytes.try_into().ok()?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            w
        };
        Some(Tally {
            records: u64::from_be_bytes(word(0)),
            newest_ns: i64::from_be_bytes(word(8)),
            capture_dropped: u64::from_be_bytes(word(16)),
            events_dropped: u64::from_be_bytes(word(24)),
        })
    }
}

/// A nanosecond timestamp as 8 bytes that sort like the signed value (sign bit flipped).
pub(crate) const fn ts_bytes(ts_ns: i64) -> [u8; 8] {
    ((ts_ns as u64) ^ (1 << 63)).to_be_bytes()
}

pub(crate) fn ts_from_bytes(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

/// Where a stored record sits: its position in time order, and the cursor for paging and
/// following.
///
/// Ordering (derived, field by field) equals the order of the stored keys: event time, then the
/// collector's id of the agent, then the event's identity digest ([`reset_id`], [`flow_id`]).
/// The key is a function of the event itself, not of how it arrived: the same event sent twice
/// (a retried batch, or an agent that re-read a capture after a restart and produced it again in
/// a new batch) gets the same `StoreSeq` and overwrites itself, which is what makes ingest
/// idempotent per event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StoreSeq {
    /// Event time, ns since the epoch (agent clock).
    pub ts_ns: i64,
    /// The collector's number for the agent (interned name).
    pub agent_id: u32,
    /// Digest of what identifies the event besides its time and agent.
    pub id: u128,
}

impl StoreSeq {
    /// The 28-byte key: ts (sign-flipped) 8, agent 4, identity digest 16.
    pub fn to_bytes(&self) -> [u8; RECORD_KEY_LEN] {
        let mut out = [0u8; RECORD_KEY_LEN];
        out[0..8].copy_from_slice(&ts_bytes(self.ts_ns));
        out[8..12].copy_from_slice(&self.agent_id.to_be_bytes());
        out[12..28].copy_from_slice(&self.id.to_be_bytes());
        out
    }

    /// Inverse of [`StoreSeq::to_bytes`]; `None` unless exactly 28 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; RECORD_KEY_LEN] = bytes.try_into().ok()?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[12..28]);
        Some(StoreSeq {
            ts_ns: ts_from_bytes(ts),
            agent_id: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            id: u128::from_be_bytes(id),
        })
    }
}

impl fmt::Display for StoreSeq {
    /// `ts.agent.id` (id in hex), a printable cursor.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{:032x}", self.ts_ns, self.agent_id, self.id)
    }
}

/// FNV-1a, 128 bits: stable across builds and platforms (stored keys depend on it), which std's
/// hashers do not promise. Not collision resistant, and it need not be: a digest only ever
/// meets digests of the same agent at the same nanosecond.
struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    fn new(kind: u8) -> Self {
        let mut h = Fnv128(Self::OFFSET);
        h.bytes(&[kind]);
        h
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u128::from(b)).wrapping_mul(Self::PRIME);
        }
    }

    /// Length-prefixed, so that adjacent fields cannot trade bytes.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u32).to_be_bytes());
        self.bytes(bytes);
    }

    fn endpoint(&mut self, endpoint: Option<&v1::Endpoint>) {
        let (ip, port) = endpoint.map_or((&[][..], 0), |e| (e.ip.as_slice(), e.port));
        self.field(ip);
        self.bytes(&port.to_be_bytes());
    }
}

/// Identity of a RST event within its agent and nanosecond: the packet's raw header fields
/// (addresses, ports, seq, ack, flags, window, TTL, IP ID, payload length) and the connection's
/// packet counts at that point, which tell apart even byte-identical RSTs of one connection
/// captured within the same tick. The agent's evidence and cause are left out: they are its
/// opinion of the packet, not the packet.
pub(crate) fn reset_id(rst: &v1::RstEvent) -> u128 {
    let mut h = Fnv128::new(KIND_RESET);
    h.endpoint(rst.src.as_ref());
    h.endpoint(rst.dst.as_ref());
    for value in [rst.seq, rst.ack, rst.flags, rst.window, rst.ttl, rst.payload_len] {
        h.bytes(&value.to_be_bytes());
    }
    match rst.ip_id {
        Some(ip_id) => h.field(&ip_id.to_be_bytes()),
        None => h.field(&[]),
    }
    h.bytes(&rst.orig_pkts.to_be_bytes());
    h.bytes(&rst.resp_pkts.to_be_bytes());
    h.0
}

/// Identity of a flow summary within its agent and end time: the endpoints and the start. One
/// vantage point never has two connection records of one 4-tuple starting at the same time.
pub(crate) fn flow_id(flow: &v1::FlowSummary) -> u128 {
    let mut h = Fnv128::new(KIND_FLOW);
    h.endpoint(flow.orig.as_ref());
    h.endpoint(flow.resp.as_ref());
    h.bytes(&flow.start_ns.to_be_bytes());
    h.0
}

/// Identity of a connection opening within its agent and start time: the endpoints and the
/// agent's record id (one record per 4-tuple and start).
pub(crate) fn open_id(open: &v1::ConnectionOpen) -> u128 {
    let mut h = Fnv128::new(KIND_OPEN);
    h.endpoint(open.orig.as_ref());
    h.endpoint(open.resp.as_ref());
    h.bytes(&open.start_ns.to_be_bytes());
    h.bytes(&open.conn_id.to_be_bytes());
    h.0
}

/// Identity of a capture-loss report within its agent and end time: everything in it.
pub(crate) fn loss_id(loss: &v1::CaptureLoss) -> u128 {
    let mut h = Fnv128::new(KIND_LOSS);
    for value in [loss.from_ns as u64, loss.capture_dropped, loss.interface_dropped, loss.events_dropped] {
        h.bytes(&value.to_be_bytes());
    }
    h.field(loss.reason.as_bytes());
    h.0
}

/// A text that is not a [`StoreSeq`] cursor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a store cursor (expected ts.agent.id): {0:?}")]
pub struct ParseStoreSeqError(pub String);

impl FromStr for StoreSeq {
    type Err = ParseStoreSeqError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseStoreSeqError(s.to_string());
        let mut parts = s.split('.');
        let mut next = || parts.next().ok_or_else(err);
        let seq = StoreSeq {
            ts_ns: next()?.parse().map_err(|_| err())?,
            agent_id: next()?.parse().map_err(|_| err())?,
            id: u128::from_str_radix(next()?, 16).map_err(|_| err())?,
        };
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(seq)
    }
}

/// The hour bucket of an event time (hours since -2^63 ns, so that it sorts like the time).
pub(crate) fn conn_bucket(ts_ns: i64) -> u32 {
    u32::try_from(u64::from_be_bytes(ts_bytes(ts_ns)) / CONN_BUCKET_NS).unwrap_or(u32::MAX)
}

/// Connection index key: `hour ++ flow key ++ kind ++ record key`; the value is empty.
///
/// The hour in front keeps ingest's inserts inside the current hour's part of the index (the
/// flow keys themselves are random, and random inserts all over a large index page it in
/// from disk); a connection look-up pays one prefix scan per stored hour instead.
pub(crate) fn conn_key(key: &FlowKey, kind: u8, seq: &StoreSeq) -> [u8; CONN_KEY_LEN] {
    let mut out = [0u8; CONN_KEY_LEN];
    out[..4].copy_from_slice(&conn_bucket(seq.ts_ns).to_be_bytes());
    out[4..40].copy_from_slice(&key.to_bytes());
    out[CONN_KIND_AT] = kind;
    out[CONN_KIND_AT + 1..].copy_from_slice(&seq.to_bytes());
    out
}

/// Session key: `len(agent) u32 ++ agent ++ boot_id` (length-prefixed so no name can collide).
pub(crate) fn session_key(agent: &str, boot_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + agent.len() + boot_id.len());
    out.extend_from_slice(&(agent.len() as u32).to_be_bytes());
    out.extend_from_slice(agent.as_bytes());
    out.extend_from_slice(boot_id.as_bytes());
    out
}

/// A session value: the session's number, its durable batch number, and its latest watermark
/// with the watermark's `since_ns` (0 when none came yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SessionValue {
    pub(crate) session_id: u32,
    pub(crate) durable_seq: u64,
    pub(crate) watermark_ns: i64,
    pub(crate) since_ns: i64,
}

impl SessionValue {
    pub(crate) fn to_bytes(self) -> [u8; 28] {
        let mut out = [0u8; 28];
        out[..4].copy_from_slice(&self.session_id.to_be_bytes());
        out[4..12].copy_from_slice(&self.durable_seq.to_be_bytes());
        out[12..20].copy_from_slice(&self.watermark_ns.to_be_bytes());
        out[20..28].copy_from_slice(&self.since_ns.to_be_bytes());
        out
    }

    /// Reads the 28-byte form, and the 12-byte form of earlier versions (no watermark).
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 12 && bytes.len() != 28 {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            w
        };
        let mut value = SessionValue {
            session_id: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            durable_seq: u64::from_be_bytes(word(4)),
            ..SessionValue::default()
        };
        if bytes.len() == 28 {
            value.watermark_ns = i64::from_be_bytes(word(12));
            value.since_ns = i64::from_be_bytes(word(20));
        }
        Some(value)
    }
}

/// The value of a record without a flow (capture losses), appended to `out`: version byte,
/// then the message (ingest encodes a batch's values into one buffer).
pub(crate) fn encode_plain_into(message: &impl prost::Message, out: &mut Vec<u8>) {
    out.push(VALUE_VERSION);
    message.encode_raw(out);
}

/// The message bytes of a value written by [`encode_plain_into`].
pub(crate) fn decode_plain(value: &[u8]) -> Option<&[u8]> {
    match value.split_first() {
        Some((&VALUE_VERSION, body)) => Some(body),
        _ => None,
    }
}

/// The fixed header in front of every stored reset or flow: what the filters need, so that a
/// query decodes only the protobuf of records it returns, and retention can find the index entry
/// without decoding at all. Layout: version 1, flow key 36, cause 1, flags 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ValueHeader {
    pub(crate) key: FlowKey,
    /// `v1::Cause` value (0 for flows; 255 if out of range).
    pub(crate) cause: u8,
    /// TCP flag bits (12 bits; 0 for flows).
    pub(crate) flags: u16,
}

impl ValueHeader {
    /// Header followed by the encoded message, appended to `out` (ingest encodes a batch's
    /// values into one buffer: no allocation per event, and no pass over the message for its
    /// length).
    pub(crate) fn encode_into(&self, message: &impl prost::Message, out: &mut Vec<u8>) {
        out.push(VALUE_VERSION);
        out.extend_from_slice(&self.key.to_bytes());
        out.push(self.cause);
        out.extend_from_slice(&self.flags.to_be_bytes());
        message.encode_raw(out);
    }

    /// The header and the message bytes after it; `None` if the value is not ours.
    pub(crate) fn decode(value: &[u8]) -> Option<(ValueHeader, &[u8])> {
        if value.len() < HEADER_LEN || value[0] != VALUE_VERSION {
            return None;
        }
        let key_bytes: [u8; 36] = value[1..37].try_into().ok()?;
        let key = FlowKey::from_bytes(key_bytes)?;
        let header = ValueHeader { key, cause: value[37], flags: u16::from_be_bytes([value[38], value[39]]) };
        Some((header, &value[HEADER_LEN..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn store_seq_bytes_sort_like_the_value(
            a in (any::<i64>(), any::<u32>(), any::<u128>()),
            b in (any::<i64>(), any::<u32>(), any::<u128>()),
        ) {
            let a = StoreSeq { ts_ns: a.0, agent_id: a.1, id: a.2 };
            let b = StoreSeq { ts_ns: b.0, agent_id: b.1, id: b.2 };
            prop_assert_eq!(a.cmp(&b), a.to_bytes().cmp(&b.to_bytes()));
            prop_assert_eq!(StoreSeq::from_bytes(&a.to_bytes()), Some(a));
            prop_assert_eq!(a.to_string().parse::<StoreSeq>(), Ok(a));
        }

        #[test]
        fn timestamps_sort_like_i64(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(a.cmp(&b), ts_bytes(a).cmp(&ts_bytes(b)));
        }
    }

    #[test]
    fn reserved_keys_sort_before_every_record() {
        let first = StoreSeq { ts_ns: 0, agent_id: 0, id: 0 }.to_bytes();
        assert!(first.as_slice() >= FIRST_RECORD_KEY.as_slice());
        assert!(TALLY_TOTAL_KEY.as_slice() < FIRST_RECORD_KEY.as_slice());
        assert!(tally_key(u32::MAX).as_slice() < FIRST_RECORD_KEY.as_slice());
    }

    #[test]
    fn tallies_and_sessions_round_trip() {
        let tally = Tally { records: 7, newest_ns: -3, capture_dropped: 1 << 40, events_dropped: 9 };
        assert_eq!(Tally::from_bytes(&tally.to_bytes()), Some(tally));
        let session = SessionValue { session_id: 3, durable_seq: 99, watermark_ns: 5, since_ns: -1 };
        assert_eq!(SessionValue::from_bytes(&session.to_bytes()), Some(session));
        // The 12-byte form of earlier versions.
        let old = SessionValue::from_bytes(&session.to_bytes()[..12]);
        assert_eq!(old, Some(SessionValue { session_id: 3, durable_seq: 99, ..SessionValue::default() }));
        assert_eq!(SessionValue::from_bytes(&[0; 13]), None);
    }

    #[test]
    fn connection_buckets_follow_time() {
        let hour = 3_600_000_000_000;
        let times = [-hour, -1, 0, 1, hour - 1, hour, 5 * hour, 1_700_000_000_000_000_000];
        for pair in times.windows(2) {
            assert!(conn_bucket(pair[0]) <= conn_bucket(pair[1]), "{pair:?}");
        }
        for t in times {
            assert_eq!(conn_bucket(t + hour) - conn_bucket(t), 1, "{t}");
        }
    }

    #[test]
    fn session_keys_do_not_collide() {
        assert_ne!(session_key("ab", "c"), session_key("a", "bc"));
    }
}
