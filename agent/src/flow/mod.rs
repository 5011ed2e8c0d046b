//! Connection tracking: segments in, RST events and flow summaries out.
//!
//! The [`Tracker`] is pure: it never reads a clock or does I/O. Time is the timestamp of the
//! packet being processed, so replaying a capture gives exactly what live capture gave.
//!
//! Memory and cache misses shape this module. A busy link carries millions of connections, so a
//! record is a fixed-size struct in a slab (chunks of `Option<Record>`, see [`chunked`]), its key compact (IPv4 inline,
//! other addresses in a side table by slot), and the hash table holds only 4-byte slab indices. Expiry must not touch other records on every packet (an intrusive LRU
//! list costs three random cache misses per packet once the table outgrows the cache), so it
//! is lazy: each record has at most one entry in a FIFO queue per timeout class (open, and
//! finished-and-lingering), holding the deadline computed when it was queued. When an entry
//! comes due, the record's real deadline (last packet + timeout) is checked: expired records
//! are summarised, active ones re-queued. A packet therefore only updates its own record. An
//! expiry can be late by at most one timeout when re-queued entries interleave; entries left by
//! records that ended otherwise are recognised by their age. When the table is full the
//! oldest idle record found at the queue front is summarised, evicted and counted.
//!
//! A connection's identity (`ConnOpen`: both ISNs, handshake times, TCP timestamps, SYN option
//! layout, TTLs) goes out when the responder's SYN-ACK arrives, long before the summary, so the
//! collector can match connections across vantage points while they run. What the SYN leaves
//! for it waits in a side table by slab slot, only while the SYN is unanswered, instead of
//! growing every record for the whole life of the connection.

mod chunked;
pub mod classify;
pub mod conn;
pub mod zeek;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use rstscope_proto::{Endpoint, FlowKey};

use crate::event::{ConnId, ConnOpen, Event, FlowEnd, FlowSummary, Role, RstEvent};
use crate::wire::{Checksum, OptionLayout, Segment, TcpFlags};
use chunked::Chunked;
use conn::{conn_flags, seen, Addr, Compact, Conn, Record, SlotKey};
use zeek::{ZeekConn, ZeekSegment};

/// Tracker settings. Defaults follow Zeek's (`tcp_inactivity_timeout`, `tcp_close_delay`,
/// `tcp_reset_delay`) so flow records split where Zeek's do.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// A connection with no packets for this long is summarised (ns).
    pub inactivity_timeout_ns: i64,
    /// A closed or reset connection is kept this long for late packets (ns).
    pub linger_ns: i64,
    /// A SYN still unanswered this long after the connection started ends its record (ns), like
    /// Zeek's `tcp_attempt_delay`.
    pub attempt_timeout_ns: i64,
    /// RST events wait this long for later packets that add evidence (ns); never more than the linger time.
    pub settle_ns: i64,
    /// Most connections tracked at once; beyond it the oldest idle one is evicted.
    pub max_flows: usize,
    /// Count bad-checksum packets in conn_state/history, like Zeek's `-C`.
    pub ignore_checksums: bool,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            inactivity_timeout_ns: 300_000_000_000,
            linger_ns: 5_000_000_000,
            attempt_timeout_ns: 5_000_000_000,
            settle_ns: 2_000_000_000,
            max_flows: 1_000_000,
            ignore_checksums: false,
        }
    }
}

/// How far RST events are complete, naming the exceptions (see [`Tracker::listed_watermark`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedWatermark {
    /// Every RST captured up to here has been passed on ([`Tracker::watermark_ns`]).
    pub ts_ns: i64,
    /// Every RST captured up to here has been passed on or is in `settling`; at least `ts_ns`.
    pub listed_until_ns: i64,
    /// RSTs captured up to `listed_until_ns` and still in their settle window, oldest first.
    pub settling: Vec<SettlingRst>,
}

impl ListedWatermark {
    /// The same promise naming at most `max` RSTs: with more settling, it stops just before
    /// the oldest one left out (RSTs tied with that one are past the promise and need no
    /// listing). `settling` must be oldest first.
    pub fn capped(mut self, max: usize) -> Self {
        if let Some(first_left_out) = self.settling.get(max) {
            let until = self.listed_until_ns.min(first_left_out.ts_ns.saturating_sub(1)).max(self.ts_ns);
            self.settling.truncate(max);
            self.settling.retain(|r| r.ts_ns <= until);
            self.listed_until_ns = until;
        }
        self
    }
}

/// A RST still in its settle window, as much of it as tells which connection and packet it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettlingRst {
    /// Capture time (ns since the epoch).
    pub ts_ns: i64,
    /// Sender as seen on the wire.
    pub src: Endpoint,
    /// Receiver as seen on the wire.
    pub dst: Endpoint,
    /// Its connection record.
    pub conn_id: ConnId,
    /// Raw sequence number.
    pub seq: u32,
    /// Raw acknowledgment number.
    pub ack: u32,
    /// Header flags.
    pub flags: TcpFlags,
}

impl SettlingRst {
    fn of(event: &RstEvent) -> Self {
        SettlingRst {
            ts_ns: event.ts_ns,
            src: event.src,
            dst: event.dst,
            conn_id: event.conn_id,
            seq: event.seq,
            ack: event.ack,
            flags: event.flags,
        }
    }
}

/// Counters about the table itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerStats {
    /// Connection records created.
    pub flows: u64,
    /// Records currently tracked.
    pub active: u64,
    /// Most records tracked at once.
    pub peak_active: u64,
    /// Records evicted because the table was full.
    pub evicted: u64,
    /// Records started by a SYN reusing a finished tuple.
    pub port_reuse: u64,
    /// RST events emitted.
    pub resets: u64,
    /// Connection Open events emitted.
    pub opens: u64,
    /// TCP segments processed.
    pub segments: u64,
    /// Segments whose IPv4 header checksum is wrong. No receiver sees them, so (like Zeek) they
    /// do not move conn_state/history unless `ignore_checksums`; they still count as sent and a
    /// RST among them is still reported, with `bad-ip-checksum` evidence.
    pub bad_ip_checksum: u64,
}

const OPEN: usize = 0;
const DONE: usize = 1;
/// Connections opened by a SYN are checked once, `attempt_timeout_ns` after it.
const ATTEMPT: usize = 2;
/// `Tracker::parked` of a queue with no parked front.
const NOT_PARKED: u32 = u32::MAX;

/// A queued expiry check, 8 bytes: in second `deadline_s` (counted from the tracker's epoch,
/// rounded down) look at slab slot `idx`. An entry belongs to the record now in the slot only if
/// it is not older than that record (see `Tracker::owns`); the record's own times give the exact
/// deadline.
#[derive(Clone, Copy, Debug)]
struct Due {
    deadline_s: u32,
    idx: u32,
}

/// A FIFO of [`Due`] entries stored as 4 bytes each: the slab slots, and their deadlines
/// run-length encoded. Entries are queued in packet-time order with one timeout per queue, so
/// consecutive entries share their deadline second and a run covers thousands of them; with a
/// million records queued this halves the queue's memory.
#[derive(Default)]
struct DueQueue {
    idx: std::collections::VecDeque<u32>,
    /// `(deadline_s, entries)` runs covering `idx`, front to back; no run is empty.
    runs: std::collections::VecDeque<(u32, u32)>,
}

impl DueQueue {
    fn front(&self) -> Option<Due> {
        Some(Due { deadline_s: self.runs.front()?.0, idx: *self.idx.front()? })
    }

    fn pop_front(&mut self) -> Option<Due> {
        let idx = self.idx.pop_front()?;
        let run = self.runs.front_mut().expect("runs cover the entries");
        let deadline_s = run.0;
        run.1 -= 1;
        if run.1 == 0 {
            self.runs.pop_front();
        }
        Some(Due { deadline_s, idx })
    }

    fn push_back(&mut self, due: Due) {
        self.idx.push_back(due.idx);
        match self.runs.back_mut() {
            Some(run) if run.0 == due.deadline_s && run.1 < u32::MAX => run.1 += 1,
            _ => self.runs.push_back((due.deadline_s, 1)),
        }
    }

    fn push_front(&mut self, due: Due) {
        self.idx.push_front(due.idx);
        match self.runs.front_mut() {
            Some(run) if run.0 == due.deadline_s && run.1 < u32::MAX => run.1 += 1,
            _ => self.runs.push_front((due.deadline_s, 1)),
        }
    }

    fn clear(&mut self) {
        self.idx.clear();
        self.runs.clear();
    }
}

/// Largest timestamp magnitude the tracker works with (ns); see `Tracker::process`.
pub const TS_LIMIT: i64 = (1 << 62) - 1;

/// Segments looked up together by `on_keyed`.
const LOOKAHEAD: usize = 16;

/// What a batched look-up (see `Tracker::on_keyed`) found for a key when `Tracker::mutations`
/// was `mutations`. Only this is kept per segment: key and hash stay where the keyed segment
/// is (copying them into an array of look-ups cost more than the look-ups).
#[derive(Clone, Copy)]
struct Found {
    idx: Option<u32>,
    mutations: u64,
}

/// A segment with the part of its record's look-up that needs no tracker state: its connection
/// key and that key's index hash. [`KeyHasher::keyed`] makes it; the file pipeline does so on its
/// reader thread, so that the tracker thread, the slower half of that pipeline, only probes its
/// table (canonical key, compact form and hash were a tenth of the tracker thread's work).
///
/// It crosses cores once per packet, so it carries the key in its compact form (12 bytes, plus
/// the segment's direction) rather than the 36-byte [`FlowKey`], which the tracker rebuilds from
/// the segment on the rare paths that need it (RSTs, a connection's first packets): 136 bytes
/// instead of 160, and no compact form to derive again on the tracker thread.
#[derive(Clone, Copy, Debug)]
pub struct Keyed {
    /// The segment.
    pub segment: Segment,
    key: PacketKey,
}

/// What the tracker's look-up of a segment's record needs, made without tracker state.
#[derive(Clone, Copy, Debug)]
struct PacketKey {
    /// [`index_hash`] of the key.
    hash: u64,
    /// The compact key of an IPv4 connection; meaningless when `v6`.
    slot: SlotKey,
    /// Not IPv4: the compact form holds the addresses and is built from the segment when needed
    /// (see [`PacketKey::compact`]).
    v6: bool,
    /// Wire direction of the segment ([`Record::dir_of`]): 0 when its sender is the key's `lo`.
    dir: u8,
}

impl PacketKey {
    #[inline]
    fn of(hasher: &DefaultHashBuilder, seg: &Segment) -> Self {
        let key = FlowKey::new(seg.src, seg.dst);
        let compact = SlotKey::of(&key);
        let hash = index_hash(hasher, &compact);
        let dir = Record::dir_of(&key, seg) as u8;
        match compact {
            Ok(slot) => PacketKey { hash, slot, v6: false, dir },
            Err(_) => PacketKey { hash, slot: SlotKey::v6([0; 2], 0), v6: true, dir },
        }
    }

    /// The key as look-ups compare it; `seg` is the segment it was made from.
    #[inline]
    fn compact(&self, seg: &Segment) -> Compact {
        if self.v6 {
            SlotKey::of(&FlowKey::new(seg.src, seg.dst))
        } else {
            Ok(self.slot)
        }
    }

    fn dir(&self) -> usize {
        usize::from(self.dir)
    }
}

/// Makes [`Keyed`] segments for one tracker: a copy of its index hasher, from
/// [`Tracker::key_hasher`]. What it makes is only meaningful to that tracker (another one hashes
/// differently).
#[derive(Clone, Debug)]
pub struct KeyHasher {
    hasher: DefaultHashBuilder,
}

impl KeyHasher {
    /// `segment` with its key and index hash.
    #[inline]
    pub fn keyed(&self, segment: Segment) -> Keyed {
        let key = PacketKey::of(&self.hasher, &segment);
        Keyed { segment, key }
    }
}

/// The index's hash of a key, from its compact form, so that rehashing can hash a record's own
/// fields instead of rebuilding its full key (see [`record_hash`]).
fn index_hash(hasher: &DefaultHashBuilder, compact: &Compact) -> u64 {
    match compact {
        Ok(k) => hasher.hash_one(k.packed()),
        Err((ports, addrs)) => hasher.hash_one((ports, addrs)),
    }
}

/// [`index_hash`] of a record's key.
fn record_hash(hasher: &DefaultHashBuilder, rec: &Record, v6: &Chunked<[Addr; 2]>) -> u64 {
    match rec.key.v6_slot() {
        None => hasher.hash_one(rec.key.packed()),
        Some(slot) => hasher.hash_one((&rec.key.ports(), &v6[slot as usize])),
    }
}

/// Bound on the side tables used for cause evidence (SYN races, listener activity).
const SIDE_TABLE_MAX: usize = 1 << 16;

/// What an originator's SYN leaves behind for the connection's Open until the SYN-ACK answers
/// it. Kept in a side table by slab slot rather than in every record: most of a record's life
/// comes after the handshake, and a record is the unit of per-flow memory.
#[derive(Clone, Copy, Default)]
struct SynSeen {
    isn: u32,
    tsval: Option<u32>,
    layout: OptionLayout,
    ip_id: Option<u16>,
    ttl: u8,
    /// Wire direction of the SYN (the originator's half).
    dir: u8,
}

#[derive(Clone, Copy, Default)]
struct RecentSyns {
    last: (i64, u16),
    prev: (i64, u16),
}

/// Tracks every TCP connection of one vantage point.
pub struct Tracker {
    config: TrackerConfig,
    slab: Chunked<Option<Record>>,
    /// Addresses of the records whose key is not IPv4, by the slot their [`SlotKey`] names;
    /// free slots are listed in `v6_free`.
    v6_addrs: Chunked<[Addr; 2]>,
    v6_free: Vec<u32>,
    free: Vec<u32>,
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
    queues: [DueQueue; 3],
    /// Whole seconds of the first packet minus one: queue deadlines count from here.
    epoch_s: Option<i64>,
    /// RST events waiting out the settle window, by slab slot (records flagged `PENDING`).
    pending: HashMap<u32, Vec<RstEvent>>,
    /// When each pending RST's settle window ends (its time plus the settle time) and its slot,
    /// earliest first: the clock emits them then, whether or not their connection has more
    /// packets (else a RST that ends its connection would wait for the record's linger time).
    /// Entries of records gone meanwhile are skipped.
    settle_due: BinaryHeap<Reverse<(i64, u32)>>,
    /// SYNs not answered yet, by slab slot (records that started with a SYN and are not
    /// `OPEN_SETTLED`).
    syns: HashMap<u32, SynSeen>,
    /// No queue entry can be due before this time (ns); `advance` does nothing until then.
    next_due_ns: i64,
    /// Per queue, the slab slot of an entry parked at the front (due later within its own
    /// second, see `advance`), or `NOT_PARKED`. `next_due_ns` waits for such an entry's exact
    /// deadline rather than the start of its second, so touching its record (a packet, its end)
    /// must reset `next_due_ns`: only that can make looking at the front again find more.
    parked: [u32; 3],
    /// Bumped whenever a record is created or removed, so batched look-ups know they are stale.
    mutations: u64,
    now_ns: i64,
    stats: TrackerStats,
    /// Last SYNs per (client address, server address), for duplicate-SYN races.
    recent_syns: HashMap<(HostKey, HostKey), RecentSyns>,
    /// Last SYN-ACK time per server endpoint, for "listener overloaded".
    listener_accepts: HashMap<(HostKey, u16), i64>,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(config: TrackerConfig) -> Self {
        Tracker {
            config,
            slab: Chunked::default(),
            v6_addrs: Chunked::default(),
            v6_free: Vec::new(),
            free: Vec::new(),
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            queues: Default::default(),
            epoch_s: None,
            pending: HashMap::new(),
            settle_due: BinaryHeap::new(),
            syns: HashMap::new(),
            next_due_ns: i64::MIN,
            parked: [NOT_PARKED; 3],
            mutations: 0,
            now_ns: i64::MIN,
            stats: TrackerStats::default(),
            recent_syns: HashMap::new(),
            listener_accepts: HashMap::new(),
        }
    }

    /// Table counters.
    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// The tracker's packet clock: the latest packet time (or idle time given to
    /// [`Tracker::advance`]) processed; `None` before the first packet.
    pub fn clock_ns(&self) -> Option<i64> {
        (self.now_ns != i64::MIN).then_some(self.now_ns)
    }

    /// How far RST events are complete: every RST up to this packet time has been passed to
    /// `out`. The clock, held back to just before the oldest RST still in its settle window
    /// ([`Tracker::listed_watermark`] names those instead). `None` before the first packet.
    pub fn watermark_ns(&self) -> Option<i64> {
        let clock = self.clock_ns()?;
        let oldest_pending = self.pending.values().flatten().map(|ev| ev.ts_ns).min();
        Some(oldest_pending.map_or(clock, |ts| clock.min(ts.saturating_sub(1))))
    }

    /// [`Tracker::watermark_ns`] and a later promise that names its exceptions: every RST
    /// captured up to `listed_until_ns` has been passed to `out` or is one of `settling` (at
    /// most `max_listed`, oldest first). With no more than `max_listed` RSTs settling that is the
    /// clock; with more, just before the oldest one not listed. So a collector can vouch for
    /// the time after a settling RST for every connection that RST cannot be part of, instead
    /// of waiting out the settle window of another connection's RST. `None` before the first
    /// packet.
    pub fn listed_watermark(&self, max_listed: usize) -> Option<ListedWatermark> {
        let clock = self.clock_ns()?;
        let ts_ns = self.watermark_ns()?;
        let mut settling: Vec<SettlingRst> = self.pending.values().flatten().map(SettlingRst::of).collect();
        settling.sort_unstable_by_key(|r| (r.ts_ns, r.conn_id.0, r.seq));
        Some(ListedWatermark { ts_ns, listed_until_ns: clock.max(ts_ns), settling }.capped(max_listed))
    }

    /// Processes one segment; events that became final are passed to `out`.
    pub fn on_segment(&mut self, seg: &Segment, out: &mut impl FnMut(Event)) {
        let key = PacketKey::of(&self.hasher, seg);
        self.process(seg, &key, None, out);
    }

    /// `on_segment` with the segment's key, and optionally what a look-up found earlier (valid as
    /// it stands while `self.mutations` has not moved since).
    fn process(&mut self, seg: &Segment, key: &PacketKey, found: Option<Found>, out: &mut impl FnMut(Event)) {
        // Times are clamped to +-2^62 ns (1824..2116) so that any difference of two fits in an
        // i64: a crafted capture can claim any timestamp, and time arithmetic must not overflow.
        // (Copying the segment only when it needs clamping keeps a 112-byte copy off every packet.)
        let clamped;
        let seg = if (-TS_LIMIT..=TS_LIMIT).contains(&seg.ts_ns) {
            seg
        } else {
            clamped = Segment { ts_ns: seg.ts_ns.clamp(-TS_LIMIT, TS_LIMIT), ..*seg };
            &clamped
        };
        self.stats.segments += 1;
        if self.epoch_s.is_none() {
            self.epoch_s = Some(seg.ts_ns.div_euclid(1_000_000_000) - 1);
        }
        if !seg.ip_header_ok {
            self.stats.bad_ip_checksum += 1;
        }
        self.advance(seg.ts_ns, out);
        let found = match found {
            Some(Found { idx, mutations }) if mutations == self.mutations => idx,
            // Records never move, and a key has one live record at most: a record found before is
            // still the key's if its slot still holds that key. A key found missing may have been
            // created since.
            Some(Found { idx: Some(idx), .. }) if self.holds_key(idx, key, seg) => Some(idx),
            _ => self.find_key(key, seg),
        };
        let (idx, created) = match found {
            Some(idx) if seg.flags.syn() && self.splits(idx, seg) => {
                let port_reuse = self.is_port_reuse(idx, key.dir(), seg);
                self.finish(idx, FlowEnd::Reused, out);
                let idx = self.create(key, seg, out);
                if port_reuse {
                    self.stats.port_reuse += 1;
                    self.conn_mut(idx).set_flag(conn_flags::PORT_REUSE, true);
                }
                (idx, true)
            }
            Some(idx) => (idx, false),
            None => (self.create(key, seg, out), true),
        };
        self.apply(idx, key.dir(), seg, out);
        if !self.conn(idx).has_flag(conn_flags::OPEN_SETTLED) {
            self.note_open(idx, seg, created, out);
        }
    }

    /// The connection-identity part of a packet, for records whose Open is not settled: a new
    /// record's SYN is remembered, the responder's SYN-ACK emits the Open, a RST instead of it
    /// means there never will be one; a record that started otherwise emits it at once.
    fn note_open(&mut self, idx: u32, seg: &Segment, created: bool, out: &mut impl FnMut(Event)) {
        let key = &FlowKey::new(seg.src, seg.dst);
        let conn = Conn::new(*key, self.conn(idx));
        let dir = Record::dir_of(key, seg);
        let syn_only = seg.flags.syn() && !seg.flags.ack() && !seg.flags.rst();
        if created && syn_only {
            let seen = SynSeen {
                isn: seg.seq,
                tsval: seg.options.timestamps.map(|(val, _)| val),
                layout: seg.options.layout,
                ip_id: seg.ip_id,
                ttl: seg.ttl,
                dir: dir as u8,
            };
            self.syns.insert(idx, seen);
            return;
        }
        let open = if created {
            // No SYN first: the capture began mid-connection, or at the SYN-ACK.
            let (orig, resp) = conn.orig_resp();
            let is_orig = conn.role_of(dir) == Role::Originator;
            let synack = !is_orig && seg.flags.syn() && seg.flags.ack() && !seg.flags.rst();
            ConnOpen {
                conn_id: ConnId::new(&conn.key, conn.start_ns),
                orig,
                resp,
                start_ns: conn.start_ns,
                orig_isn: None,
                resp_isn: synack.then_some(seg.seq),
                syn_ns: None,
                synack_ns: synack.then_some(seg.ts_ns),
                syn_tsval: None,
                synack_tsval: seg.options.timestamps.filter(|_| synack).map(|(val, _)| val),
                syn_options: OptionLayout::default(),
                orig_ttl: is_orig.then_some(seg.ttl),
                resp_ttl: (!is_orig).then_some(seg.ttl),
                syn_ip_id: None,
                midstream: !seg.flags.syn(),
            }
        } else {
            let Some(syn) = self.syns.get(&idx).copied() else {
                // Cannot happen (unsettled records that did not start otherwise have an entry);
                // settle rather than look again at every packet.
                self.conn_mut(idx).set_flag(conn_flags::OPEN_SETTLED, true);
                return;
            };
            if dir == usize::from(syn.dir) {
                return;
            }
            if seg.flags.rst() {
                // Refused (or reset before any SYN-ACK): such a SYN has no Open.
                self.syns.remove(&idx);
                self.conn_mut(idx).set_flag(conn_flags::OPEN_SETTLED, true);
                return;
            }
            if !(seg.flags.syn() && seg.flags.ack()) {
                return;
            }
            let (lo, hi) = (key.lo(), key.hi());
            let (orig, resp) = if syn.dir == 0 { (lo, hi) } else { (hi, lo) };
            let open = ConnOpen {
                conn_id: ConnId::new(&conn.key, conn.start_ns),
                orig,
                resp,
                start_ns: conn.start_ns,
                orig_isn: Some(syn.isn),
                resp_isn: Some(seg.seq),
                // The record started with this SYN.
                syn_ns: Some(conn.start_ns),
                synack_ns: Some(seg.ts_ns),
                syn_tsval: syn.tsval,
                synack_tsval: seg.options.timestamps.map(|(val, _)| val),
                syn_options: syn.layout,
                orig_ttl: Some(syn.ttl),
                resp_ttl: Some(seg.ttl),
                syn_ip_id: syn.ip_id,
                midstream: false,
            };
            self.syns.remove(&idx);
            open
        };
        self.conn_mut(idx).set_flag(conn_flags::OPEN_SETTLED, true);
        self.stats.opens += 1;
        out(Event::Open(Box::new(open)));
    }

    /// Processes a batch of segments in order. Their records are looked up first, so that the
    /// cache misses of the whole batch overlap instead of stalling one packet at a time; once a
    /// table outgrows the CPU cache this is most of the tracker's cost.
    pub fn on_segments(&mut self, segments: &[Segment], out: &mut impl FnMut(Event)) {
        let hasher = self.key_hasher();
        let mut chunks = segments.chunks_exact(LOOKAHEAD);
        for chunk in &mut chunks {
            let keyed: [Keyed; LOOKAHEAD] = std::array::from_fn(|i| hasher.keyed(chunk[i]));
            self.on_keyed(&keyed, out);
        }
        for seg in chunks.remainder() {
            self.on_segment(seg, out);
        }
    }

    /// [`Tracker::on_segments`] for segments keyed beforehand by this tracker's
    /// [`Tracker::key_hasher`] (on another thread, say): the same events, less work here.
    pub fn on_keyed(&mut self, batch: &[Keyed], out: &mut impl FnMut(Event)) {
        let mut chunks = batch.chunks_exact(LOOKAHEAD);
        for chunk in &mut chunks {
            let found: [Option<u32>; LOOKAHEAD] = std::array::from_fn(|i| self.find_keyed(&chunk[i]));
            let mutations = self.mutations;
            self.warm(&found);
            for (keyed, idx) in chunk.iter().zip(found) {
                self.process(&keyed.segment, &keyed.key, Some(Found { idx, mutations }), out);
            }
        }
        for keyed in chunks.remainder() {
            self.process(&keyed.segment, &keyed.key, None, out);
        }
    }

    /// What [`Tracker::on_keyed`] needs to key segments: a copy of the index hasher.
    pub fn key_hasher(&self) -> KeyHasher {
        KeyHasher { hasher: self.hasher.clone() }
    }

    /// Touches each cache line the updates of the `found` records will need; the loads of
    /// different segments are independent, so the CPU runs them in parallel.
    fn warm(&self, found: &[Option<u32>]) {
        let mut warm = 0u32;
        for idx in found {
            if let Some(c) = idx.and_then(|i| self.slab[i as usize].as_ref()) {
                warm ^= c.halves[0].pkts ^ c.halves[1].pkts ^ c.zeek.touch() ^ c.start_ns as u32;
            }
        }
        std::hint::black_box(warm);
    }

    /// The slot of `keyed`'s record, as the index stands now.
    fn find_keyed(&self, keyed: &Keyed) -> Option<u32> {
        debug_assert_eq!(
            keyed.key.hash,
            index_hash(&self.hasher, &keyed.key.compact(&keyed.segment)),
            "keyed by another tracker's hasher"
        );
        self.find_key(&keyed.key, &keyed.segment)
    }

    /// [`Tracker::find`] for the key of `seg`. IPv4 keys, nearly all, compare their compact form
    /// directly: going through [`Compact`] (an enum the size of two IPv6 addresses) cost a quarter
    /// of the look-up's instructions.
    #[inline]
    fn find_key(&self, key: &PacketKey, seg: &Segment) -> Option<u32> {
        if key.v6 {
            return self.find(&key.compact(seg), key.hash);
        }
        self.find_v4(key.slot, key.hash)
    }

    /// [`Tracker::find`] for an IPv4 key.
    #[inline]
    fn find_v4(&self, slot: SlotKey, hash: u64) -> Option<u32> {
        let slab = &self.slab;
        self.table.find(hash, |&i| slab[i as usize].as_ref().is_some_and(|c| c.key == slot)).copied()
    }

    /// [`Tracker::holds`] for an IPv4 key.
    #[inline]
    fn holds_v4(&self, idx: u32, slot: SlotKey) -> bool {
        matches!(self.slab.get(idx as usize), Some(Some(c)) if c.key == slot)
    }

    /// [`Tracker::holds`] for the key of `seg`.
    fn holds_key(&self, idx: u32, key: &PacketKey, seg: &Segment) -> bool {
        if key.v6 {
            return self.holds(idx, &key.compact(seg));
        }
        self.holds_v4(idx, key.slot)
    }

    fn find(&self, compact: &Compact, hash: u64) -> Option<u32> {
        let (slab, v6) = (&self.slab, &self.v6_addrs);
        match compact {
            Ok(k) => self.find_v4(*k, hash),
            Err((ports, addrs)) => self
                .table
                .find(hash, |&i| {
                    slab[i as usize].as_ref().is_some_and(|c| {
                        c.key.ports() == *ports && c.key.v6_slot().is_some_and(|s| v6[s as usize] == *addrs)
                    })
                })
                .copied(),
        }
    }

    /// Slab slot `idx` holds a live record with key `compact`.
    fn holds(&self, idx: u32, compact: &Compact) -> bool {
        let (ports, addrs) = match compact {
            Ok(k) => return self.holds_v4(idx, *k),
            Err(v6) => v6,
        };
        let Some(Some(c)) = self.slab.get(idx as usize) else { return false };
        c.key.ports() == *ports && c.key.v6_slot().is_some_and(|s| self.v6_addrs[s as usize] == *addrs)
    }

    /// Moves time forward to `now_ns` (a packet timestamp) and expires what timed out. Live
    /// capture calls this when idle, with the last packet time plus the idle time.
    ///
    /// Every packet comes through here and almost always finds nothing due, so the checks are
    /// inlined into the packet path and the work behind them is not (a call that saves and
    /// restores the registers of the whole expiry loop cost more than the checks).
    #[inline]
    pub fn advance(&mut self, now_ns: i64, out: &mut impl FnMut(Event)) {
        if now_ns <= self.now_ns {
            return;
        }
        self.now_ns = now_ns;
        if self.settle_due.peek().is_some_and(|&Reverse((due_ns, _))| now_ns > due_ns) {
            self.emit_settled(now_ns, out);
        }
        if now_ns >= self.next_due_ns {
            self.expire(now_ns, out);
        }
    }

    /// The expiry part of [`Tracker::advance`], once a queue entry can be due at `now_ns`.
    #[inline(never)]
    fn expire(&mut self, now_ns: i64, out: &mut impl FnMut(Event)) {
        self.next_due_ns = i64::MAX;
        self.parked = [NOT_PARKED; 3];
        let now_s = self.rel_s(now_ns);
        for queue in [ATTEMPT, DONE, OPEN] {
            let mut parked_until = None;
            while let Some(due) = self.queues[queue].front() {
                if due.deadline_s > now_s {
                    break;
                }
                self.queues[queue].pop_front();
                if !self.owns(queue, due) {
                    continue;
                }
                let conn = self.conn_mut(due.idx);
                conn.set_flag(conn_flags::QUEUED << queue, false);
                let exact = match queue {
                    // Zeek's AttemptTimer: a SYN still unanswered is logged and forgotten, so later
                    // packets of the tuple start a new record.
                    ATTEMPT => conn.start_ns.saturating_add(self.config.attempt_timeout_ns),
                    // Packets after the RST/FINs revived it: the open queue still holds it.
                    DONE if !conn.is_finished() => continue,
                    _ => conn.last_ns.saturating_add(self.timeout(queue)),
                };
                if exact <= now_ns {
                    match queue {
                        ATTEMPT if !self.conn(due.idx).zeek.is_unanswered_attempt() => {}
                        ATTEMPT => self.finish(due.idx, FlowEnd::Unanswered, out),
                        DONE => self.finish(due.idx, FlowEnd::Closed, out),
                        _ => self.finish(due.idx, FlowEnd::Inactive, out),
                    }
                } else if self.rel_s(exact) == due.deadline_s {
                    // Due later within this very second: keep it at the front until then.
                    self.conn_mut(due.idx).set_flag(conn_flags::QUEUED << queue, true);
                    self.queues[queue].push_front(due);
                    self.parked[queue] = due.idx;
                    parked_until = Some(exact);
                    break;
                } else {
                    self.schedule(queue, due.idx, exact);
                }
            }
            // A parked front is due at its exact deadline (unless its record is touched first,
            // see `touched`); any other front at the start of its second.
            let at = match (parked_until, self.queues[queue].front()) {
                (Some(exact), _) => exact,
                (None, Some(front)) => self.abs_ns(front.deadline_s),
                (None, None) => continue,
            };
            self.next_due_ns = self.next_due_ns.min(at);
        }
    }

    /// Record `idx` is about to change or end: if it is parked at a queue front, the next
    /// `advance` must look at that front again (as it would have at the start of its second).
    fn touched(&mut self, idx: u32) {
        if self.parked.contains(&idx) {
            self.next_due_ns = i64::MIN;
        }
    }

    /// Emits the pending RSTs whose settle window the clock has passed (the packet rule of
    /// `apply`: more than the settle time after the RST), before the packet at `now_ns` is
    /// applied, so capture files and live capture emit the same events.
    #[inline(never)]
    fn emit_settled(&mut self, now_ns: i64, out: &mut impl FnMut(Event)) {
        let settle = self.config.settle_ns.min(self.config.linger_ns);
        while let Some(&Reverse((due_ns, idx))) = self.settle_due.peek() {
            if now_ns <= due_ns {
                break;
            }
            self.settle_due.pop();
            let Some(pending) = self.pending.get_mut(&idx) else { continue };
            let Some(rec) = self.slab[idx as usize].as_mut() else { continue };
            let view = Conn::new(rec.key.key(&self.v6_addrs), rec);
            self.stats.resets += release_settled(pending, &view, now_ns, settle, out);
            if pending.is_empty() {
                self.pending.remove(&idx);
                rec.set_flag(conn_flags::PENDING, false);
            }
        }
    }

    /// Start of second `deadline_s` of the queue clock, in epoch nanoseconds.
    fn abs_ns(&self, deadline_s: u32) -> i64 {
        (self.epoch_s.unwrap_or(0) + i64::from(deadline_s)).saturating_mul(1_000_000_000)
    }

    /// End of input: summarises every tracked connection, oldest activity first.
    pub fn finish_all(&mut self, out: &mut impl FnMut(Event)) {
        let mut live: Vec<(i64, u32)> =
            self.slab.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (c.last_ns, i as u32))).collect();
        live.sort_unstable();
        for (_, idx) in live {
            self.finish(idx, FlowEnd::EndOfInput, out);
        }
        self.queues.iter_mut().for_each(|q| q.clear());
    }

    fn timeout(&self, queue: usize) -> i64 {
        match queue {
            DONE => self.config.linger_ns,
            ATTEMPT => self.config.attempt_timeout_ns,
            _ => self.config.inactivity_timeout_ns,
        }
    }

    /// Seconds since the epoch of queue deadlines, rounded down and clamped to `u32`.
    fn rel_s(&self, ns: i64) -> u32 {
        let epoch = self.epoch_s.unwrap_or(0);
        (ns.div_euclid(1_000_000_000) - epoch).clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Whether `due` belongs to the record now in its slot: entries are only ever queued while
    /// their record lives, with a deadline no earlier than the record's start plus the queue's
    /// timeout, so an older deadline can only come from a previous occupant. (Within the same
    /// second both are possible; treating such an entry as the new record's only causes one
    /// extra, harmless check.)
    fn owns(&self, queue: usize, due: Due) -> bool {
        match self.slab.get(due.idx as usize).and_then(Option::as_ref) {
            Some(conn) => due.deadline_s >= self.rel_s(conn.start_ns.saturating_add(self.timeout(queue))),
            None => false,
        }
    }

    fn schedule(&mut self, queue: usize, idx: u32, deadline_ns: i64) {
        let deadline_s = self.rel_s(deadline_ns);
        self.next_due_ns = self.next_due_ns.min(self.abs_ns(deadline_s));
        self.conn_mut(idx).set_flag(conn_flags::QUEUED << queue, true);
        self.queues[queue].push_back(Due { deadline_s, idx });
    }

    /// Picks the record to evict from a full table: a finished one if any, else the oldest idle
    /// one at the front of the open queue (active ones met on the way are re-queued).
    fn eviction_victim(&mut self) -> Option<u32> {
        // It pops queue fronts, parked ones included.
        self.next_due_ns = i64::MIN;
        for queue in [DONE, OPEN] {
            for _ in 0..1024 {
                let Some(due) = self.queues[queue].pop_front() else { break };
                if !self.owns(queue, due) {
                    continue;
                }
                let timeout = self.timeout(queue);
                let queued_s = due.deadline_s.saturating_sub((timeout / 1_000_000_000) as u32);
                let conn = self.conn_mut(due.idx);
                conn.set_flag(conn_flags::QUEUED << queue, false);
                if queue == DONE && !conn.is_finished() {
                    continue;
                }
                let last_ns = conn.last_ns;
                if queue == OPEN && self.rel_s(last_ns) > queued_s {
                    // Active since it was queued: not the oldest idle one after all.
                    self.schedule(queue, due.idx, last_ns.saturating_add(timeout));
                    continue;
                }
                return Some(due.idx);
            }
        }
        // Every candidate was active: take any live record.
        self.slab.iter().position(|c| c.is_some()).map(|i| i as u32)
    }

    fn conn(&self, idx: u32) -> &Record {
        self.slab[idx as usize].as_ref().expect("listed index refers to a live record")
    }

    fn conn_mut(&mut self, idx: u32) -> &mut Record {
        self.slab[idx as usize].as_mut().expect("listed index refers to a live record")
    }

    /// A SYN (without ACK) on a finished record, with a new ISN, starts a new connection.
    /// Zeek's rule for splitting a 4-tuple into a new connection record (any SYN once a side
    /// closed, or a SYN with a new ISN), so records line up with conn.log.
    ///
    /// Only SYNs can split (`is_reuse` says no to anything else), so the packet path asks
    /// only for them.
    fn splits(&self, idx: u32, seg: &Segment) -> bool {
        self.conn(idx).zeek.is_reuse(seg.flags.byte(), seg.seq)
    }

    /// A split that is port reuse in the vocabulary's sense: a new SYN (new ISN) on a tuple whose
    /// previous connection had closed or been reset, rather than a retry of the same attempt.
    fn is_port_reuse(&self, idx: u32, dir: usize, seg: &Segment) -> bool {
        if !seg.flags.syn() || seg.flags.ack() || seg.flags.rst() {
            return false;
        }
        let conn = self.conn(idx);
        let closed = (0..2).any(|d| conn.counters(d).rsts > 0 || conn.halves[d].has(seen::FIN));
        closed && conn.side(dir).isn != Some(seg.seq)
    }

    fn create(&mut self, key: &PacketKey, seg: &Segment, out: &mut impl FnMut(Event)) -> u32 {
        let (compact, hash) = (key.compact(seg), key.hash);
        if self.stats.active as usize >= self.config.max_flows.max(1) {
            if let Some(victim) = self.eviction_victim() {
                self.stats.evicted += 1;
                self.finish(victim, FlowEnd::Evicted, out);
            }
        }
        let (zeek, sender_is_orig) = ZeekConn::start(seg.flags.byte(), seg.src.port(), seg.dst.port());
        let sender_is_lo = key.dir == 0;
        let slot_key = match compact {
            Ok(k) => k,
            Err((ports, addrs)) => match self.v6_free.pop() {
                Some(slot) => {
                    self.v6_addrs[slot as usize] = addrs;
                    SlotKey::v6(ports, slot)
                }
                None => SlotKey::v6(ports, self.v6_addrs.push(addrs) as u32),
            },
        };
        let conn = Record::new(slot_key, zeek, sender_is_lo == sender_is_orig, seg.ts_ns);
        let idx = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(conn);
                i
            }
            None => self.slab.push(Some(conn)) as u32,
        };
        self.mutations += 1;
        let (slab, v6, hasher) = (&self.slab, &self.v6_addrs, &self.hasher);
        // Rehashing must hash exactly what look-ups hash.
        self.table
            .insert_unique(hash, idx, |&i| record_hash(hasher, slab[i as usize].as_ref().expect("indexed record"), v6));
        let deadline = seg.ts_ns.saturating_add(self.config.inactivity_timeout_ns);
        self.schedule(OPEN, idx, deadline);
        if seg.flags.syn() && !seg.flags.ack() {
            self.schedule(ATTEMPT, idx, seg.ts_ns.saturating_add(self.config.attempt_timeout_ns));
        }
        self.stats.flows += 1;
        self.stats.active += 1;
        self.stats.peak_active = self.stats.peak_active.max(self.stats.active);
        idx
    }

    /// Applies `seg`, sent in wire direction `dir`, to record `idx`.
    fn apply(&mut self, idx: u32, dir: usize, seg: &Segment, out: &mut impl FnMut(Event)) {
        self.touched(idx);
        let settle = self.config.settle_ns.min(self.config.linger_ns);
        let ignore_checksums = self.config.ignore_checksums;
        // The full key, for the views of RSTs only (rebuilt from the segment, see `Keyed`).
        let key = || FlowKey::new(seg.src, seg.dst);
        let ctx = if seg.flags.rst() { self.context(idx, &key(), seg) } else { classify::Context::default() };
        if seg.flags.syn() {
            self.note_syn(idx, seg);
        }
        let conn = self.slab[idx as usize].as_mut().expect("live record");

        let mut event = seg.flags.rst().then(|| classify::build(&Conn::new(key(), conn), dir, seg, &ctx));
        // Later packets add evidence to RSTs still settling; settled ones are emitted.
        if conn.has_flag(conn_flags::PENDING) {
            let view = Conn::new(key(), conn);
            let pending = self.pending.get_mut(&idx).expect("flagged records have pending events");
            classify::observe_after(pending, event.as_mut(), &view, dir, seg);
            self.stats.resets += release_settled(pending, &view, seg.ts_ns, settle, out);
            if pending.is_empty() {
                self.pending.remove(&idx);
                conn.set_flag(conn_flags::PENDING, false);
            }
        }

        let is_orig = conn.role_of(dir) == Role::Originator;
        let before = conn.side(dir);
        let (next_seq, isn) = (before.next_seq, before.isn);
        let counted = conn.halves[dir].on_send(seg, next_seq, isn);
        conn.count(dir, counted);
        conn.add_bytes(dir, seg.payload_len);
        if seg.flags.ack() {
            conn.halves[1 - dir].on_peer_ack(seg.ack);
        }
        if event.as_ref().is_some_and(classify::acceptable) {
            conn.halves[1 - dir].on_peer_rst();
        }
        let zeek_sees_it = seg.ip_header_ok || ignore_checksums;
        if zeek_sees_it {
            conn.zeek.on_segment_captured(
                &ZeekSegment {
                    is_orig,
                    flags: seg.flags.byte(),
                    seq: seg.seq,
                    ack: seg.ack,
                    payload_len: seg.payload_len,
                    window: seg.window,
                    checksum_bad: seg.checksum == Checksum::Bad,
                },
                ignore_checksums,
                seg.checksum != Checksum::Unverified,
            );
        }
        if conn.zeek.take_flip() {
            let flipped = !conn.orig_is_lo();
            conn.set_flag(conn_flags::ORIG_IS_LO, flipped);
        }
        conn.last_ns = conn.last_ns.max(seg.ts_ns);
        if let Some(ev) = event {
            conn.set_flag(conn_flags::PENDING, true);
            self.settle_due.push(Reverse((ev.ts_ns.saturating_add(settle), idx)));
            self.pending.entry(idx).or_default().push(ev);
        }
        if conn.is_finished() && !conn.has_flag(conn_flags::QUEUED << DONE) {
            let deadline = conn.last_ns.saturating_add(self.config.linger_ns);
            self.schedule(DONE, idx, deadline);
        }
    }

    fn context(&self, idx: u32, key: &FlowKey, seg: &Segment) -> classify::Context {
        let conn = self.conn(idx);
        let orig_dir = conn.orig_dir();
        let (client, server) = if orig_dir == 0 { (key.lo(), key.hi()) } else { (key.hi(), key.lo()) };
        let racing_syn_gap_ns = self.recent_syns.get(&(host(client), host(server))).and_then(|r| {
            [r.last, r.prev]
                .into_iter()
                .filter(|&(ts, port)| port != server.port() && ts != 0)
                .map(|(ts, _)| i64::try_from(ts.abs_diff(conn.start_ns)).unwrap_or(i64::MAX))
                .filter(|gap| *gap <= classify::SYN_RACE_NS)
                .min()
        });
        let listener_last_accept_ago_ns =
            self.listener_accepts.get(&(host(server), server.port())).map(|t| seg.ts_ns - t).filter(|ago| *ago >= 0);
        classify::Context { racing_syn_gap_ns, listener_last_accept_ago_ns }
    }

    fn note_syn(&mut self, idx: u32, seg: &Segment) {
        if seg.flags.rst() {
            return;
        }
        if self.recent_syns.len() >= SIDE_TABLE_MAX {
            self.recent_syns.clear();
        }
        if self.listener_accepts.len() >= SIDE_TABLE_MAX {
            self.listener_accepts.clear();
        }
        let _ = idx;
        if seg.flags.ack() {
            self.listener_accepts.insert((host(seg.src), seg.src.port()), seg.ts_ns);
        } else {
            let entry = self.recent_syns.entry((host(seg.src), host(seg.dst))).or_default();
            if entry.last.1 != seg.dst.port() || entry.last.0 == 0 {
                entry.prev = entry.last;
            }
            entry.last = (seg.ts_ns, seg.dst.port());
        }
    }

    /// Emits what a record still holds (settling RSTs, then its summary) and frees it.
    fn finish(&mut self, idx: u32, end: FlowEnd, out: &mut impl FnMut(Event)) {
        self.touched(idx);
        let rec = self.slab[idx as usize].take().expect("live record");
        self.mutations += 1;
        let conn = Conn::new(rec.key.key(&self.v6_addrs), &rec);
        if let Some(slot) = rec.key.v6_slot() {
            self.v6_free.push(slot);
        }
        let hash = record_hash(&self.hasher, &rec, &self.v6_addrs);
        if let Ok(entry) = self.table.find_entry(hash, |&i| i == idx) {
            entry.remove();
        }
        self.free.push(idx);
        self.stats.active -= 1;
        if !conn.has_flag(conn_flags::OPEN_SETTLED) {
            self.syns.remove(&idx);
        }
        if conn.has_flag(conn_flags::PENDING) {
            for mut ev in self.pending.remove(&idx).unwrap_or_default() {
                classify::finalize(&mut ev, &conn);
                self.stats.resets += 1;
                out(Event::Reset(Box::new(ev)));
            }
        }
        out(Event::Flow(Box::new(summarise(&conn, end))));
    }
}

/// An endpoint's address, as the per-host side tables key it: one number hashes faster than
/// an address and a port.
type HostKey = u128;

/// The address part of an endpoint, for per-host side tables.
/// Finalises and emits the RSTs of `pending` more than `settle` older than `now_ns` (the one
/// settle rule, whether a packet of the connection or the clock alone passes them); returns
/// how many.
fn release_settled(
    pending: &mut Vec<RstEvent>,
    view: &Conn<'_>,
    now_ns: i64,
    settle: i64,
    out: &mut impl FnMut(Event),
) -> u64 {
    let mut n_out = 0;
    for mut ev in pending.extract_if(.., |ev| now_ns - ev.ts_ns > settle) {
        classify::finalize(&mut ev, view);
        out(Event::Reset(Box::new(ev)));
        n_out += 1;
    }
    n_out
}

fn host(ep: Endpoint) -> HostKey {
    let b = ep.to_bytes();
    u128::from_be_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15],
    ])
}

fn summarise(conn: &Conn, end: FlowEnd) -> FlowSummary {
    let o = conn.orig_dir();
    let (orig, resp) = conn.orig_resp();
    FlowSummary {
        conn_id: ConnId::new(&conn.key, conn.start_ns),
        key: conn.key,
        orig,
        resp,
        start_ns: conn.start_ns,
        end_ns: conn.last_ns,
        conn_state: conn.zeek.conn_state().as_str(),
        history: conn.zeek.history().as_str().to_owned(),
        orig_dir: conn.halves[o].summary(conn.counters(o), conn.bytes(o), conn.zeek.orig_bytes()),
        resp_dir: conn.halves[1 - o].summary(conn.counters(1 - o), conn.bytes(1 - o), conn.zeek.resp_bytes()),
        port_reuse: conn.port_reuse(),
        end,
    }
}

/// Convenience for tests and offline tools: runs `segments` through a fresh tracker and returns
/// every event, the table flushed at the end.
pub fn track_all(config: TrackerConfig, segments: &[Segment]) -> Vec<Event> {
    let mut tracker = Tracker::new(config);
    let mut events = Vec::new();
    for seg in segments {
        tracker.on_segment(seg, &mut |e| events.push(e));
    }
    tracker.finish_all(&mut |e| events.push(e));
    events
}

/// Reset events of `events`, in order.
pub fn resets(events: &[Event]) -> Vec<&RstEvent> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Reset(r) => Some(r.as_ref()),
            Event::Flow(_) | Event::Open(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace;

    /// Regression: the table once rehashed with a different hash than lookups used, so records
    /// were duplicated after the table grew.
    #[test]
    fn many_concurrent_connections_keep_one_record_each() {
        let mut text = String::new();
        for port in 1..=5000u32 {
            text += &format!("{}us > S cport={port}\n", port);
        }
        for port in 1..=5000u32 {
            text += &format!("{}us < SA cport={port}\n", 10_000 + port);
        }
        let segs = trace::parse(&text).unwrap();
        let events = track_all(TrackerConfig::default(), &segs);
        let (opens, flows): (Vec<&Event>, Vec<&Event>) = events.iter().partition(|e| matches!(e, Event::Open(_)));
        assert_eq!((opens.len(), flows.len()), (5000, 5000));
        assert!(flows.iter().all(|e| matches!(e, Event::Flow(f) if f.orig_dir.pkts == 1 && f.resp_dir.pkts == 1)));
    }

    /// Batches, keyed beforehand or not, give exactly the events of one segment at a time, with
    /// records created, split, reset and ended inside one look-ahead window.
    #[test]
    fn batches_keyed_or_not_give_the_events_of_single_segments() {
        let mut text = String::new();
        for i in 0..40u32 {
            let (port, t) = (1 + i % 7, i * 3);
            text += &match i % 5 {
                0 => format!("{t}ms > S cport={port}\n"),
                1 => format!("{t}ms < SA cport={port}\n"),
                2 => format!("{t}ms > A cport={port}\n"),
                3 => format!("{t}ms < R cport={port}\n"),
                _ => format!("{t}ms > FA cport={port}\n"),
            };
        }
        let segs = trace::parse(&text).unwrap();
        let single = track_all(TrackerConfig { max_flows: 4, ..TrackerConfig::default() }, &segs);
        let batched = |keyed: bool| {
            let mut tracker = Tracker::new(TrackerConfig { max_flows: 4, ..TrackerConfig::default() });
            let hasher = tracker.key_hasher();
            let mut events = Vec::new();
            for batch in segs.chunks(LOOKAHEAD + 3) {
                if keyed {
                    let batch: Vec<Keyed> = batch.iter().map(|s| hasher.keyed(*s)).collect();
                    tracker.on_keyed(&batch, &mut |e| events.push(e));
                } else {
                    tracker.on_segments(batch, &mut |e| events.push(e));
                }
            }
            tracker.finish_all(&mut |e| events.push(e));
            events
        };
        assert!(resets(&single).len() >= 4);
        assert_eq!(batched(false), single);
        assert_eq!(batched(true), single);
    }

    /// Regression (fuzzing): times at both ends of the clamp once overflowed `abs()` in the
    /// SYN-race check.
    #[test]
    fn times_at_both_ends_of_the_clamp_do_not_overflow() {
        let mut segs = trace::parse("0ms > S cport=1 sport=445\n0ms > S cport=2 sport=139\n1ms < SA cport=2 sport=139\n2ms > R cport=2 sport=139").unwrap();
        segs[0].ts_ns = i64::MIN;
        for seg in &mut segs[1..] {
            seg.ts_ns = i64::MAX;
        }
        let events = track_all(TrackerConfig::default(), &segs);
        assert_eq!(resets(&events).len(), 1);
    }

    /// Regression (fuzzing): a peer last heard from at the bottom of the time range, then a RST
    /// at the top, once overflowed the "time since the peer's last packet".
    #[test]
    fn a_rst_long_after_the_peer_fell_silent_does_not_overflow() {
        let mut segs = trace::parse("0ms > S\n1ms < SA\n2ms > R").unwrap();
        segs[0].ts_ns = i64::MIN;
        segs[1].ts_ns = i64::MIN;
        segs[2].ts_ns = i64::MAX;
        // Timeouts long enough that the record survives the jump.
        let config = TrackerConfig { inactivity_timeout_ns: i64::MAX, linger_ns: i64::MAX, ..TrackerConfig::default() };
        let events = track_all(config, &segs);
        assert!(resets(&events)[0].since_peer_last_ns.is_some_and(|ns| ns > 0));
    }

    #[test]
    fn the_watermark_waits_for_settling_rsts() {
        let segs = trace::parse("0ms > S\n1ms < SA\n2ms > R\n500ms > S cport=2").unwrap();
        let mut tracker = Tracker::new(TrackerConfig::default());
        assert_eq!((tracker.clock_ns(), tracker.watermark_ns()), (None, None));
        let mut emitted = Vec::new();
        for seg in &segs {
            tracker.on_segment(seg, &mut |e| emitted.push(e));
        }
        let (rst_ts, last_ts) = (segs[2].ts_ns, segs[3].ts_ns);
        assert_eq!(tracker.clock_ns(), Some(last_ts));
        // The RST is still settling: the watermark stays just before it.
        assert!(resets(&emitted).is_empty());
        assert_eq!(tracker.watermark_ns(), Some(rst_ts - 1));
        // Idle time (live) lets it settle; then the watermark is the clock again.
        tracker.advance(rst_ts + 10_000_000_000, &mut |e| emitted.push(e));
        assert_eq!(resets(&emitted).len(), 1);
        assert_eq!(tracker.watermark_ns(), Some(rst_ts + 10_000_000_000));
    }

    /// The listed watermark runs on to the clock past the RSTs it names, holds just below the
    /// oldest one it had no room for, and names each RST exactly as its event later says it.
    #[test]
    fn the_listed_watermark_names_settling_rsts_up_to_its_cap() {
        let trace = "
            0ms  > S  cport=1
            1ms  < SA cport=1
            2ms  > R  cport=1
            3ms  > S  cport=2
            4ms  < RA cport=2
            5ms  > S  cport=3
            6ms  < SA cport=3
            7ms  < R  cport=3
            500ms > S cport=4
        ";
        let segs = trace::parse(trace).unwrap();
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut emitted = Vec::new();
        for seg in &segs {
            tracker.on_segment(seg, &mut |e| emitted.push(e));
        }
        let (rsts, clock) = ([segs[2].ts_ns, segs[4].ts_ns, segs[7].ts_ns], segs[8].ts_ns);
        assert!(resets(&emitted).is_empty(), "all three still settle");
        let listed = |tracker: &Tracker, cap| {
            let mark = tracker.listed_watermark(cap).unwrap();
            let named: Vec<(i64, u16)> = mark.settling.iter().map(|r| (r.ts_ns, r.src.port())).collect();
            (mark.ts_ns, mark.listed_until_ns, named)
        };
        // Room for all: the clock, every RST named (oldest first, the sender's port as seen).
        let all = vec![(rsts[0], 1), (rsts[1], 80), (rsts[2], 80)];
        assert_eq!(listed(&tracker, 64), (rsts[0] - 1, clock, all.clone()));
        // Room for two: held just below the third.
        assert_eq!(listed(&tracker, 2), (rsts[0] - 1, rsts[2] - 1, all[..2].to_vec()));
        // No room: the plain watermark.
        assert_eq!(listed(&tracker, 0), (rsts[0] - 1, rsts[0] - 1, Vec::new()));
        let named = tracker.listed_watermark(64).unwrap().settling;

        // The events still come when their windows end, once each, as named.
        let later = rsts[2] + 10_000_000_000;
        tracker.advance(later, &mut |e| emitted.push(e));
        let sent: Vec<SettlingRst> = resets(&emitted).into_iter().map(SettlingRst::of).collect();
        assert_eq!(sent, named);
        assert_eq!(listed(&tracker, 64), (later, later, Vec::new()));
    }

    /// What a SYN leaves behind for the Open lives only while the SYN is unanswered: answered,
    /// refused, evicted and expired records free their entry, and a slot's next record never
    /// sees its previous occupant's.
    #[test]
    fn the_unanswered_syn_table_holds_only_unanswered_syns() {
        let trace = "
            0ms > S  cport=1 tsval=1
            1ms > S  cport=2 tsval=2
            2ms > S  cport=3 tsval=3
            3ms < SA cport=3
            4ms < RA cport=2
            5ms > S  cport=4 tsval=4
        ";
        let segs = trace::parse(trace).unwrap();
        // Two records at most: port 3's SYN evicts port 1's record and takes its slot.
        let mut tracker = Tracker::new(TrackerConfig { max_flows: 2, ..TrackerConfig::default() });
        let mut opens = Vec::new();
        let mut pending = Vec::new();
        for seg in &segs {
            tracker.on_segment(seg, &mut |e| {
                if let Event::Open(o) = e {
                    opens.push(o.syn_tsval);
                }
            });
            pending.push(tracker.syns.len());
        }
        assert_eq!(tracker.stats().evicted, 2);
        assert_eq!(opens, vec![Some(3)]);
        assert_eq!(pending, vec![1, 2, 2, 1, 0, 1]);
        tracker.advance(segs[5].ts_ns + 10_000_000_000, &mut |_| {});
        assert!(tracker.syns.is_empty());
    }

    /// Regression (performance): an expiry entry due later within its own second stays at the
    /// queue front, and the clock then waits for its exact deadline; it once waited only for the
    /// start of that second, so every packet until then looked at the queues again.
    #[test]
    fn a_parked_expiry_waits_for_its_exact_deadline() {
        let segs = trace::parse("0ms > S\n1ms < SA\n300ms > R\n5100ms > S cport=2\n5200ms > S cport=3").unwrap();
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut ends = Vec::new();
        for seg in &segs {
            tracker.on_segment(seg, &mut |e| {
                if let Event::Flow(f) = e {
                    ends.push(f.end);
                }
            });
            if seg.ts_ns >= segs[3].ts_ns {
                // The reset record lingers until 5.3 s, in the second of the two packets.
                assert_eq!(tracker.next_due_ns, segs[2].ts_ns + TrackerConfig::default().linger_ns);
            }
        }
        assert!(ends.is_empty());
        // A packet of the parked record means the front must be looked at again.
        tracker.on_segment(&trace::parse("5250ms > A").unwrap()[0], &mut |_| {});
        assert_eq!(tracker.next_due_ns, i64::MIN);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_idle_connection() {
        let segs = trace::parse("0ms > S cport=1\n1ms > S cport=2\n2ms > S cport=3\n3ms > A cport=2").unwrap();
        let config = TrackerConfig { max_flows: 2, ..TrackerConfig::default() };
        let mut tracker = Tracker::new(config);
        let mut ends = Vec::new();
        for seg in &segs {
            tracker.on_segment(seg, &mut |e| {
                if let Event::Flow(f) = e {
                    ends.push((f.orig.port(), f.end));
                }
            });
        }
        assert_eq!(ends, vec![(1, FlowEnd::Evicted)]);
        assert_eq!(tracker.stats().evicted, 1);
        assert_eq!(tracker.stats().active, 2);
    }

    #[test]
    fn inactivity_linger_and_attempt_expire_by_packet_time() {
        let trace = "
            0s   > A  cport=1
            0s   > R  cport=2 seq=5
            1s   > S  cport=6
            4s   > A  cport=3
            6s   > A  cport=4
            400s > A  cport=5
        ";
        let segs = trace::parse(trace).unwrap();
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut ends = Vec::new();
        for seg in &segs {
            tracker.on_segment(seg, &mut |e| {
                if let Event::Flow(f) = e {
                    ends.push((f.orig.port().min(f.resp.port()), f.end, (seg.ts_ns - trace::T0_NS) / 1_000_000_000));
                }
            });
        }
        // The unanswered SYN is dropped 5 s after it (Zeek's attempt timer), the reset record
        // lingers 5 s, the others last 300 s without packets.
        assert_eq!(
            ends,
            vec![
                (6, FlowEnd::Unanswered, 6),
                (2, FlowEnd::Closed, 6),
                (1, FlowEnd::Inactive, 400),
                (3, FlowEnd::Inactive, 400),
                (4, FlowEnd::Inactive, 400)
            ]
        );
    }
}
#[cfg(test)]
mod record_size {
    /// The per-flow memory budget (at most 200 bytes including table and queue overhead: 168 for
    /// the record, about 10 for the index table, 4 per expiry queue entry, 32 per IPv6 flow) rests
    /// on this size; growing a record is a decision, not an accident. Connections that close,
    /// reset, retransmit or stall also hold a 48-byte box of rare state (see `zeek::Rare`).
    #[test]
    fn connection_record_stays_within_budget() {
        assert_eq!(std::mem::size_of::<super::conn::Half>(), 32);
        assert_eq!(std::mem::size_of::<super::Record>(), 168);
        assert_eq!(std::mem::size_of::<super::zeek::Rare>(), 44);
        assert_eq!(std::mem::size_of::<Option<super::Record>>(), std::mem::size_of::<super::Record>());
    }

    /// A keyed segment crosses from the reader thread to the tracker once per packet (see
    /// `Keyed`): the segment and 24 bytes of key, not a second copy of the addresses.
    #[test]
    fn keyed_segment_stays_small() {
        assert_eq!(std::mem::size_of::<crate::wire::Segment>(), 112);
        assert_eq!(std::mem::size_of::<super::Keyed>(), 136);
    }
}

#[cfg(test)]
mod slot_key {
    use super::conn::{Addr, SlotKey};
    use rstscope_proto::FlowKey;

    /// Every key comes back from its compact form: IPv4 inline (including the all-ones address,
    /// whose order could be mistaken for the IPv6 marker), anything else through the IPv6 table.
    #[test]
    fn keys_round_trip_through_the_compact_form() {
        let mut v6: Vec<[Addr; 2]> = Vec::new();
        for text in [
            "198.51.100.1:40000-203.0.113.5:443",
            "255.255.255.255:1-255.255.255.255:2",
            "0.0.0.0:0-255.255.255.255:65535",
            "10.0.0.1:80-10.0.0.1:80",
            "[2001:db8::1]:443-[2001:db8::2]:5000",
            "[::ffff:198.51.100.1]:1-[2001:db8::2]:2",
            "[::]:0-[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        ] {
            let key: FlowKey = text.parse().unwrap();
            let compact = match SlotKey::of(&key) {
                Ok(k) => {
                    assert!(k.v6_slot().is_none(), "{text}");
                    k
                }
                Err((ports, addrs)) => {
                    v6.push(addrs);
                    SlotKey::v6(ports, (v6.len() - 1) as u32)
                }
            };
            assert_eq!(compact.key(&v6), key, "{text}");
            assert_eq!(SlotKey::of(&key).is_ok(), key.lo().is_ipv4() && key.hi().is_ipv4(), "{text}");
        }
    }
}
