//! The correlator's output: merged reset reports (one per distinct RST, across agents), their
//! filtered listing, and small named values ([`Store::set_meta`] lives in the store's root).
//!
//! # Why buckets and pages
//! A listing like `--since 1h --cause refused` over millions of reports must neither visit every
//! report of the hour nor fetch each match on its own: sled costs about a microsecond per key
//! visited and several per point look-up, so 400k keys alone take 400 ms, and 40k single
//! fetches another 300 ms. Reports are therefore kept per 10 s of report time, in two trees:
//!
//! - `report_buckets`: bucket start (ts 8) → the bucket's *base*: one value listing reports in
//!   key order, with what the filters look at: verdict, cause, flags, the agents, addresses and
//!   ports of every observation (a few dozen bytes each); and bucket start · run (u16) → the
//!   *runs* appended since (see below).
//! - `report_pages`: bucket start (ts 8) · page (u16) → the bucket's encoded reports, cut into
//!   pages of about 32 kB (sled keeps bigger values in files of their own).
//!
//! A listing reads a bucket's base and runs per 10 s (360 buckets for an hour), filters the
//! entries in memory, and then reads the pages of only the buckets that hold a match, decoding
//! only the matches. The report key (ts 8 · id) orders reports within a bucket.
//!
//! # Why no id map
//! A report decided again may have another time (a late sighting, a better clock estimate),
//! and then its old key must go, or it would be listed twice. Earlier versions kept a
//! `report_ids` tree (id → time) and looked every stored report up in it: a random-key get and
//! insert per report, the biggest single cost of storing reports (some 16k of 88k instructions
//! per ingested event). The correlation knows where it filed what it decides again, so
//! [`Store::put_decided`] takes, with each report, the times earlier versions may be stored
//! under, and looks nothing up. How the collector always knows them (`live.rs`): the engine
//! keeps the time of the last report under each id while a RST carries the id, so as long as
//! it can decide it again (not bounded by the listing's `MAX_KEPT`); after a restart, the
//! replay reads the stored (id, time) of the reports it may decide again
//! ([`Store::stored_report_times`], once); a call the store refused is retried with the next
//! one, naming also the refused reports' own times. A store of an earlier version has its
//! `report_ids` tree dropped on open (nothing reads it); an earlier version opening a store of
//! this one would find no id map and could list a report decided again twice.
//!
//! # Why appending
//! The correlator stores its decisions a few times a second, and the newest bucket then holds
//! up to some 100k reports: rewriting the whole bucket (entries and pages) on every call cost
//! more than everything else the collector does per event. So [`Store::put_reports`] appends:
//! - the new reports' records go at the end of the bucket's last page (rewritten while it is
//!   under 32 kB) or into new pages; a page record that a later one with the same key follows
//!   is superseded (the last record of a key wins);
//! - their entries (and, for a report that moved to another time, the removal of its old key
//!   in the old bucket) go into a new *run*: a value of entries and removals in key order.
//!   Runs are merged like a binary counter: while the run before the newest one is at most
//!   twice its size, the two become one (the newer entry of a key wins); merging into the base
//!   drops removals. So a bucket has a few runs (logarithmic in its size) and each entry is
//!   rewritten a logarithmic number of times.
//! - Superseded records stay in the pages until the bucket is compacted: rewritten whole as
//!   before (pages in key order, a base without runs). That happens when a merge reaches the
//!   base while a run superseded records, when the superseded bytes (each run counts its own)
//!   reach half the pages, and by retention. The first two need the bucket to have grown by a
//!   third, or as many bytes superseded as half its pages, since the last rewrite: their cost
//!   per report stays constant.
//!
//! Layouts of earlier versions read as they are: a store whose buckets are a base only, with
//! pages in key order, is the compacted form of this one. The way back does not work: an
//! earlier version would skip runs as corrupt keys and take the first record of a key.
//!
//! # Crash safety
//! `put_decided` writes, per bucket (ascending), the pages first (atomically with the report
//! count), then the bucket's base and runs (atomically). A crash in between leaves page records
//! without an entry (not listed), or entries older than their records (the new report listed
//! under the old entry's filter values); a crash between two buckets of a moved report leaves
//! it listed under both times. All until the same reports are put again, which the
//! correlator does when it replays from its last durable resume point: the replay reads the
//! stored times from the bucket entries, so a report found under two times has both removed
//! but for its new one. Every compaction keeps only reports that have both an entry and a
//! record, so such leftovers do not outlive the next compaction.
//!
//! # The report count
//! Kept with the pages and changed by each call as the caller's times say: +1 for a report not
//! stored under its own time, −1 for each other time it is named under. It is exact while the
//! caller's times are (the collector's are, but for the cases below), and each bucket rewrite
//! recounts what it rewrites. It may be off by the reports of a call a crash or a failed write
//! interrupted (they are counted again when put again, the refused times named for a retry
//! need not hold a report), and by a report decided again after retention removed it (by size
//! retention can reach the minutes the correlation still decides).
//!
//! # Retention
//! `Store::remove_reports_before` (called by `retention.rs`) rewrites the buckets it cuts; nothing else holds a
//! report's key. A report removed there and decided again later is stored anew; a removal
//! for a key retention already took changes nothing but the count (above).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::ops::{Bound, Range};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use prost::Message;
use rstscope_proto::v1;

use super::keys::{ts_bytes, ts_from_bytes, FIRST_RECORD_KEY, TALLY_TOTAL_KEY};
use super::query::{parse_flag_letters, Compiled, FLAG_MASK};
use super::{ip_from_bytes, ResetQuery, Store, StoreError};

/// A stored report as its protobuf encoding, with what orders it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedReport {
    /// The report's time.
    pub ts_ns: i64,
    /// The report's id.
    pub id: String,
    /// `ResetReport`, encoded.
    pub bytes: Bytes,
}

/// One bucket of a [`ReportListing`]: its start and the report keys chosen in it (ascending).
pub type ListedBucket = (i64, Vec<Vec<u8>>);

/// Reports chosen by [`Store::report_listing`], per bucket of report time, oldest first.
#[derive(Debug, Default)]
pub struct ReportListing {
    buckets: Vec<ListedBucket>,
}

impl ReportListing {
    /// How many reports were chosen.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|(_, keys)| keys.len()).sum()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|(_, keys)| keys.is_empty())
    }

    /// The ids of the chosen reports, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.buckets.iter().flat_map(|(_, keys)| keys.iter().map(|k| &k[8..]))
    }

    /// The buckets, oldest first, for [`Store::read_listed`].
    pub fn buckets(&self) -> impl Iterator<Item = &ListedBucket> + '_ {
        self.buckets.iter()
    }
}

/// Width of a bucket of report time.
const BUCKET_NS: i64 = 10_000_000_000;
/// Version byte in front of bucket bases and pages.
const REPORT_VERSION: u8 = 1;
/// Version byte in front of a bucket's runs (then the run's superseded bytes, then ops).
const RUN_VERSION: u8 = 2;
/// Bytes of a run's header: version, and (u32) about how many bytes of page records the
/// run's ops superseded (reports replaced or removed; the new record's size stands for the old).
const RUN_HEADER: usize = 5;
/// Op of a run: an entry (encoded as in the base) follows.
const OP_ENTRY: u8 = 0;
/// Op of a run: a removed report's key (one length byte, the key) follows.
const OP_REMOVE: u8 = 1;
/// Longest report id (its key is ts 8 + id, length-prefixed in bucket entries by one byte).
pub const MAX_REPORT_ID: usize = 200;
/// A page is closed once it holds this many bytes.
const PAGE_BYTES: usize = 32 * 1024;
/// The id map of earlier versions (id → time), dropped on open.
const OLD_IDS_TREE: &[u8] = b"report_ids";

/// The trees of reports.
pub(super) struct ReportTrees {
    pub(super) pages: sled::Tree,
    pub(super) buckets: sled::Tree,
    count: AtomicU64,
}

impl ReportTrees {
    pub(super) fn open(db: &sled::Db) -> Result<ReportTrees, StoreError> {
        let tree = |name: &str| db.open_tree(name).map_err(StoreError::from_sled);
        let pages = tree("report_pages")?;
        let count = pages.get(TALLY_TOTAL_KEY)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
        let trees = ReportTrees {
            pages,
            buckets: tree("report_buckets")?,
            count: AtomicU64::new(count.map_or(0, u64::from_be_bytes)),
        };
        trees.migrate_one_value_per_report(db)?;
        // Earlier versions kept `report_ids` (id → time) and looked every report up in it;
        // nothing reads it now (the caller names a report's earlier times), so it goes.
        if db.tree_names().iter().any(|n| n.as_ref() == OLD_IDS_TREE) {
            db.drop_tree(OLD_IDS_TREE)?;
            tracing::info!("Dropped the report id map of an earlier store layout (no longer used).");
        }
        Ok(trees)
    }

    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stores written before pages kept one value per report in a `reports` tree; moves them
    /// into pages (bucket entries are the same) and drops that tree.
    fn migrate_one_value_per_report(&self, db: &sled::Db) -> Result<(), StoreError> {
        if !db.tree_names().iter().any(|n| n.as_ref() == b"reports") {
            return Ok(());
        }
        let old = db.open_tree("reports")?;
        let mut count = self.count();
        for item in self.buckets.iter() {
            let (bucket, value) = item?;
            let Ok(start) = <[u8; 8]>::try_from(bucket.as_ref()) else { continue };
            let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for (entry, _) in Entries::new(&value) {
                if let Some(v) = old.get(entry.key)? {
                    if let Some((&REPORT_VERSION, body)) = v.split_first() {
                        records.push((entry.key.to_vec(), body.to_vec()));
                    }
                }
            }
            count += records.len() as u64;
            let mut batch =
                page_batch(ts_from_bytes(start), records.iter().map(|(k, b)| (k.as_slice(), b.as_slice())), 0);
            batch.insert(&TALLY_TOTAL_KEY[..], &count.to_be_bytes()[..]);
            self.pages.apply_batch(batch)?;
        }
        self.count.store(count, Ordering::Relaxed);
        db.flush()?;
        db.drop_tree("reports")?;
        tracing::info!(reports = count, "Moved stored reports into pages (store layout of this version).");
        Ok(())
    }

    /// The records of one bucket's pages in stored order (report key, page, where the encoded
    /// report lies in the page; a later record of a key supersedes an earlier one), and the
    /// number after the bucket's highest page.
    #[allow(clippy::type_complexity)]
    fn page_records(&self, start: i64) -> Result<(Vec<(Vec<u8>, sled::IVec, Range<usize>)>, usize), StoreError> {
        let (mut out, mut pages) = (Vec::new(), 0);
        for item in self.pages.scan_prefix(ts_bytes(start)) {
            let (key, page) = item?;
            if let Some(n) = page_number(&key) {
                pages = pages.max(usize::from(n) + 1);
            }
            for (key, body) in PageRecords::new(&page) {
                out.push((key.to_vec(), page.clone(), offset_in(&page, body)));
            }
        }
        Ok((out, pages))
    }

    /// Bucket `start`'s base and runs as stored.
    fn bucket_values(&self, start: i64) -> Result<BucketValues, StoreError> {
        let (first, last) = (ts_bytes(start).to_vec(), run_key(start, u16::MAX).to_vec());
        let mut values = BucketValues::default();
        for item in self.buckets.range(first..=last) {
            let (key, value) = item?;
            values.add(key, value);
        }
        Ok(values)
    }
}

/// A bucket's base (its key is the bucket start) and runs (bucket start · run number), as
/// stored: the runs ascending, the newest last.
#[derive(Default)]
struct BucketValues {
    base: Option<sled::IVec>,
    runs: Vec<(sled::IVec, sled::IVec)>,
}

impl BucketValues {
    /// Adds a stored value of this bucket (in ascending key order); ignores other keys.
    fn add(&mut self, key: sled::IVec, value: sled::IVec) {
        match key.len() {
            8 => self.base = Some(value),
            10 => self.runs.push((key, value)),
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.base.is_none() && self.runs.is_empty()
    }

    /// The bucket's reports in key order, each by its newest entry (removed ones left out),
    /// and whether a value was malformed (read up to the fault).
    fn live(&self) -> (Vec<(Entry<'_>, &[u8])>, bool) {
        let mut broken = false;
        let mut base = Entries::new(self.base.as_deref().unwrap_or(&[]));
        if self.runs.is_empty() {
            let out = base.by_ref().collect();
            return (out, base.broken);
        }
        // Every op with its position (later wins), sorted by key; the last op of a key counts.
        let mut ops: Vec<(Op<'_>, usize)> = base.by_ref().map(|(e, whole)| Op::Put(e, whole)).zip(0..).collect();
        broken |= base.broken;
        for (_, value) in &self.runs {
            let mut run = RunOps::new(value);
            let from = ops.len();
            ops.extend(run.by_ref().zip(from..));
            broken |= run.entries.broken;
        }
        ops.sort_unstable_by(|a, b| a.0.key().cmp(b.0.key()).then(a.1.cmp(&b.1)));
        let mut out = Vec::with_capacity(ops.len());
        for (i, (op, _)) in ops.iter().enumerate() {
            if ops.get(i + 1).is_some_and(|next| next.0.key() == op.key()) {
                continue;
            }
            if let Op::Put(entry, whole) = op {
                out.push((entry.clone(), *whole));
            }
        }
        (out, broken)
    }
}

/// Groups items of `report_buckets` (in either direction) by bucket.
fn by_bucket<'a>(
    items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a,
    store: &'a Store,
) -> impl Iterator<Item = Result<(i64, BucketValues), StoreError>> + 'a {
    let mut items = items.peekable();
    std::iter::from_fn(move || loop {
        let (key, value) = match items.next()? {
            Ok(item) => item,
            Err(e) => return Some(Err(e.into())),
        };
        let Some(start) =
            key.get(..8).and_then(|s| <[u8; 8]>::try_from(s).ok()).filter(|_| matches!(key.len(), 8 | 10))
        else {
            store.corrupt("report_buckets", &key, "key is not a bucket time");
            continue;
        };
        let mut group = vec![(key, value)];
        while let Some(Ok(item)) =
            items.next_if(|next| matches!(next, Ok((k, _)) if matches!(k.len(), 8 | 10) && k.starts_with(&start)))
        {
            group.push(item);
        }
        // A base sorts before its runs; ascending order for `add`.
        group.sort_by(|a, b| a.0.cmp(&b.0));
        let mut values = BucketValues::default();
        for (key, value) in group {
            values.add(key, value);
        }
        return Some(Ok((ts_from_bytes(start), values)));
    })
}

fn run_key(start: i64, run: u16) -> [u8; 10] {
    page_key(start, run)
}

/// The run or page number of a 10-byte key.
fn page_number(key: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(key.get(8..10)?.try_into().ok()?)).filter(|_| key.len() == 10)
}

/// One op of a run: a report's entry (new or replacing), or the removal of a report's key.
#[derive(Clone)]
enum Op<'a> {
    /// The entry, and its encoding.
    Put(Entry<'a>, &'a [u8]),
    Remove(&'a [u8]),
}

impl<'a> Op<'a> {
    fn key(&self) -> &'a [u8] {
        match self {
            Op::Put(e, _) => e.key,
            Op::Remove(key) => key,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Put(_, whole) => {
                out.push(OP_ENTRY);
                out.extend_from_slice(whole);
            }
            Op::Remove(key) => {
                out.push(OP_REMOVE);
                push_short(out, key);
            }
        }
    }
}

/// About how many bytes of page records a run superseded (see [`RUN_HEADER`]).
fn run_superseded(run: &[u8]) -> u64 {
    match run {
        [RUN_VERSION, a, b, c, d, ..] => u64::from(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => 0,
    }
}

/// A run's header.
fn run_header(superseded: u64) -> [u8; RUN_HEADER] {
    let [a, b, c, d] = (superseded.min(u64::from(u32::MAX)) as u32).to_be_bytes();
    [RUN_VERSION, a, b, c, d]
}

/// Reads a run's ops one after another; stops at the first malformed one.
struct RunOps<'a> {
    entries: Entries<'a>,
}

impl<'a> RunOps<'a> {
    fn new(run: &'a [u8]) -> RunOps<'a> {
        match run {
            [RUN_VERSION, _, _, _, _, rest @ ..] => RunOps { entries: Entries { rest, broken: false } },
            [] => RunOps { entries: Entries { rest: &[], broken: false } },
            _ => RunOps { entries: Entries { rest: &[], broken: true } },
        }
    }

    fn op(&mut self) -> Option<Op<'a>> {
        match *Entries::take(&mut self.entries, 1)?.first()? {
            OP_ENTRY => self.entries.entry().map(|(e, whole)| Op::Put(e, whole)),
            OP_REMOVE => self.entries.short().map(Op::Remove),
            _ => None,
        }
    }
}

impl<'a> Iterator for RunOps<'a> {
    type Item = Op<'a>;

    fn next(&mut self) -> Option<Op<'a>> {
        let found = self.op();
        if found.is_none() {
            self.entries.broken |= !self.entries.rest.is_empty();
            self.entries.rest = &[];
        }
        found
    }
}

/// The ops of a bucket value: a base's entries, or a run's ops.
fn ops_of(value: &[u8], is_base: bool) -> Box<dyn Iterator<Item = Op<'_>> + '_> {
    if is_base {
        Box::new(Entries::new(value).map(|(e, whole)| Op::Put(e, whole)))
    } else {
        Box::new(RunOps::new(value))
    }
}

/// Merges two runs (or a base, `older`, and a run), each in key order, into one in key order;
/// the newer op of a key wins, and the superseded bytes add up. Into a base (`older_is_base`)
/// removals are dropped and the result is a base. Also says whether a key was in both (the
/// newer op superseded a page record, whether or not its run counted it).
fn merge_runs(older: &[u8], older_is_base: bool, newer: &[u8]) -> (Vec<u8>, bool) {
    let mut both = false;
    let mut out = Vec::with_capacity(older.len() + newer.len());
    if older_is_base {
        out.push(REPORT_VERSION);
    } else {
        out.extend_from_slice(&run_header(run_superseded(older) + run_superseded(newer)));
    }
    let emit = |op: &Op<'_>, out: &mut Vec<u8>| match op {
        Op::Put(_, whole) if older_is_base => out.extend_from_slice(whole),
        Op::Remove(_) if older_is_base => {}
        _ => op.encode(out),
    };
    let (mut a, mut b) = (ops_of(older, older_is_base).peekable(), RunOps::new(newer).peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => x.key().cmp(y.key()),
        };
        match order {
            std::cmp::Ordering::Less => emit(&a.next().expect("peeked"), &mut out),
            std::cmp::Ordering::Greater => emit(&b.next().expect("peeked"), &mut out),
            std::cmp::Ordering::Equal => {
                a.next();
                both = true;
                emit(&b.next().expect("peeked"), &mut out);
            }
        }
    }
    (out, both)
}

/// Where `part` (a subslice of `whole`) lies in `whole`.
fn offset_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

fn page_key(start: i64, page: u16) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..8].copy_from_slice(&ts_bytes(start));
    key[8..].copy_from_slice(&page.to_be_bytes());
    key
}

/// A batch writing `records` (sorted by key) as the pages of bucket `start`, and removing the
/// pages numbered from there up to `old_pages` that are no longer needed.
fn page_batch<'a>(
    start: i64,
    records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    old_pages: usize,
) -> sled::Batch {
    let mut batch = sled::Batch::default();
    let mut page = vec![REPORT_VERSION];
    let mut n: u16 = 0;
    for (key, body) in records {
        push_short(&mut page, key);
        page.extend_from_slice(&(body.len() as u32).to_be_bytes());
        page.extend_from_slice(body);
        if page.len() >= PAGE_BYTES {
            batch.insert(&page_key(start, n)[..], std::mem::replace(&mut page, vec![REPORT_VERSION]));
            n = n.saturating_add(1);
        }
    }
    if page.len() > 1 {
        batch.insert(&page_key(start, n)[..], page);
        n = n.saturating_add(1);
    }
    for stale in usize::from(n)..old_pages {
        batch.remove(&page_key(start, stale as u16)[..]);
    }
    batch
}

/// The records of one page (for tests that build old layouts).
#[cfg(test)]
pub(super) fn page_records_of(page: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    PageRecords::new(page)
}

/// Reads a page's records one after another; stops at the first malformed one.
struct PageRecords<'a> {
    rest: &'a [u8],
    /// A record was malformed (or the page's version unknown).
    broken: bool,
}

impl<'a> PageRecords<'a> {
    fn new(page: &'a [u8]) -> PageRecords<'a> {
        match page.split_first() {
            Some((&REPORT_VERSION, rest)) => PageRecords { rest, broken: false },
            _ => PageRecords { rest: &[], broken: true },
        }
    }

    fn record(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let (&len, rest) = self.rest.split_first()?;
        let key = rest.get(..usize::from(len))?;
        let rest = &rest[usize::from(len)..];
        let body_len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let body = rest.get(4..4 + body_len)?;
        self.rest = &rest[4 + body_len..];
        Some((key, body))
    }
}

impl<'a> Iterator for PageRecords<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let found = self.record();
        if found.is_none() {
            self.broken |= !self.rest.is_empty();
            self.rest = &[];
        }
        found
    }
}

fn bucket_start(ts_ns: i64) -> i64 {
    ts_ns.div_euclid(BUCKET_NS).saturating_mul(BUCKET_NS)
}

/// A report key's time and id (what [`report_key`] put together).
fn split_report_key(key: &[u8]) -> (i64, String) {
    let (ts, id) = key.split_at(8.min(key.len()));
    (ts_from_bytes(ts.try_into().unwrap_or_default()), String::from_utf8_lossy(id).into_owned())
}

fn report_key(ts_ns: i64, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + id.len());
    key.extend_from_slice(&ts_bytes(ts_ns));
    key.extend_from_slice(id.as_bytes());
    key
}

/// One report's entry in its bucket: what the filters need, and its key.
#[derive(Clone)]
struct Entry<'a> {
    key: &'a [u8],
    verdict: &'a [u8],
    cause: &'a [u8],
    flags: u16,
    agents: &'a [u8],
    ips: &'a [u8],
    ports: &'a [u8],
}

impl Entry<'_> {
    fn ts_ns(&self) -> i64 {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&self.key[..8]);
        ts_from_bytes(ts)
    }

    fn agent_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.agents.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let mut rest = self.ips;
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let bytes = tail.get(..usize::from(len))?;
            rest = &tail[usize::from(len)..];
            ip_from_bytes(bytes)
        })
    }
}

/// Reads entries one after another; stops at the first malformed one.
struct Entries<'a> {
    rest: &'a [u8],
    /// An entry was malformed (or the value's version unknown).
    broken: bool,
}

impl<'a> Entries<'a> {
    fn new(value: &'a [u8]) -> Entries<'a> {
        match value.split_first() {
            Some((&REPORT_VERSION, rest)) => Entries { rest, broken: false },
            None => Entries { rest: &[], broken: false },
            _ => Entries { rest: &[], broken: true },
        }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.rest.get(..n)?, self.rest.get(n..)?);
        self.rest = tail;
        Some(head)
    }

    fn short(&mut self) -> Option<&'a [u8]> {
        let len = *self.take(1)?.first()?;
        self.take(usize::from(len))
    }

    fn entry(&mut self) -> Option<(Entry<'a>, &'a [u8])> {
        let start = self.rest;
        let key = self.short()?;
        if key.len() < 8 {
            return None;
        }
        let verdict = self.short()?;
        let cause = self.short()?;
        let flags = self.take(2)?;
        let n_agents = usize::from(*self.take(1)?.first()?);
        let agents = self.take(4 * n_agents)?;
        let ips_len = usize::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?));
        let ips = self.take(ips_len)?;
        let n_ports = usize::from(*self.take(1)?.first()?);
        let ports = self.take(2 * n_ports)?;
        let whole = &start[..start.len() - self.rest.len()];
        let flags = u16::from_be_bytes([flags[0], flags[1]]);
        Some((Entry { key, verdict, cause, flags, agents, ips, ports }, whole))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = (Entry<'a>, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let found = self.entry();
        if found.is_none() {
            self.broken |= !self.rest.is_empty();
            self.rest = &[];
        }
        found
    }
}

fn push_short(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

/// The bucket entry of a report (with `agent_ids` already resolved).
fn encode_entry(key: &[u8], report: &v1::ResetReport, agent_ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + key.len());
    push_short(&mut out, key);
    push_short(&mut out, report.verdict.as_bytes());
    push_short(&mut out, report.cause.as_bytes());
    out.extend_from_slice(&((report.flags & 0xffff) as u16).to_be_bytes());
    let agents = &agent_ids[..agent_ids.len().min(255)];
    out.push(agents.len() as u8);
    for id in agents {
        out.extend_from_slice(&id.to_be_bytes());
    }
    let mut ips: Vec<&[u8]> = Vec::new();
    let mut ports: Vec<u16> = Vec::new();
    for o in &report.observations {
        for ep in [&o.src, &o.dst].into_iter().flatten() {
            if matches!(ep.ip.len(), 4 | 16) && !ips.contains(&ep.ip.as_slice()) {
                ips.push(&ep.ip);
            }
            let port = (ep.port & 0xffff) as u16;
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
    }
    let ips: Vec<u8> =
        ips.iter().take(255).flat_map(|ip| std::iter::once(ip.len() as u8).chain(ip.iter().copied())).collect();
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&ips);
    let ports = &ports[..ports.len().min(255)];
    out.push(ports.len() as u8);
    for port in ports {
        out.extend_from_slice(&port.to_be_bytes());
    }
    out
}

/// A report to add to a bucket: its key, bucket entry and encoded report.
struct NewReport {
    key: Vec<u8>,
    entry: Vec<u8>,
    body: Vec<u8>,
}

/// A report filter compiled for bucket entries.
struct ReportFilter {
    compiled: Compiled,
    causes: Vec<String>,
    verdicts: Vec<String>,
    since_ns: Option<i64>,
    until_ns: Option<i64>,
}

impl ReportFilter {
    fn matches(&self, e: &Entry<'_>) -> bool {
        let ts = e.ts_ns();
        let c = &self.compiled;
        let text_in = |list: &[String], value: &[u8]| list.iter().any(|x| x.as_bytes().eq_ignore_ascii_case(value));
        self.since_ns.is_none_or(|since| ts >= since)
            && self.until_ns.is_none_or(|until| ts < until)
            && (self.verdicts.is_empty() || text_in(&self.verdicts, e.verdict))
            && (self.causes.is_empty()
                || text_in(&self.causes, e.cause)
                || (e.cause.is_empty() && text_in(&self.causes, b"unknown")))
            && c.flags.as_ref().is_none_or(|f| f.contains(&(e.flags & FLAG_MASK)))
            && c.agent_ids.as_ref().is_none_or(|ids| e.agent_ids().any(|id| ids.contains(&id)))
            && (c.ports.is_empty() || e.ports().any(|p| c.ports.contains(&p)))
            && (c.hosts.is_empty() || e.ips().any(|ip| c.hosts.iter().any(|net| net.contains(&ip))))
    }
}

/// What one [`Store::put_reports`] call changes in one bucket.
#[derive(Default)]
struct BucketChange {
    /// Reports to add or replace.
    new: Vec<NewReport>,
    /// Keys of reports that moved to another time (and so to another key).
    removed: Vec<Vec<u8>>,
    /// About how many bytes of the bucket's page records are superseded (reports replaced or
    /// removed; the new record's size stands for the old one's).
    superseded: u64,
    /// Reports the bucket gains (new keys) less those it loses (removed keys).
    count_change: i64,
}

impl Store {
    /// Stores merged reports that are not stored yet (a fill, a test): each is counted as a
    /// new report. Reports decided again go through [`Store::put_decided`], which names where
    /// their earlier versions are.
    pub fn put_reports<'a, R>(&self, reports: impl IntoIterator<Item = &'a R>) -> Result<(), StoreError>
    where
        R: std::borrow::Borrow<v1::ResetReport> + 'a,
    {
        self.put_decided(reports.into_iter().map(|r| (r.borrow(), &[][..])))
    }

    /// Stores merged reports, each with the times its earlier versions may be stored under
    /// (empty: a new report). A time other than the report's own has that version's key
    /// removed, so a report whose time changed is listed once, under its new time; the
    /// report's own time means "replaces the copy there". Nothing is looked up: the caller
    /// (the correlation, which knows what it handed out) says where a report is; a time where
    /// nothing is stored is harmless, but a stored version whose time is not named stays
    /// listed (see the module docs for how the collector makes sure it names them). Several
    /// items of one id are successive versions: the last one is stored, and the first one's
    /// times count (a later item's times name the earlier items of the call, which are never
    /// written). Idempotent. Not flushed: call [`Store::flush`] (or write the correlator's
    /// progress with [`Store::set_meta`] afterwards; sled recovers a prefix of its log, so a
    /// durable progress mark implies durable reports before it).
    ///
    /// Refuses (nothing written) a report with an empty id, an id over 200 bytes, or a time
    /// before 1970. Observations' agents are interned like ingesting agents.
    pub fn put_decided<'a>(
        &self,
        reports: impl IntoIterator<Item = (&'a v1::ResetReport, &'a [i64])>,
    ) -> Result<(), StoreError> {
        let reports: Vec<(&v1::ResetReport, &[i64])> = reports.into_iter().collect();
        self.guarded(|| self.put_reports_unguarded(&reports))
    }

    fn put_reports_unguarded(&self, reports: &[(&v1::ResetReport, &[i64])]) -> Result<(), StoreError> {
        for (r, _) in reports {
            if r.id.is_empty() || r.id.len() > MAX_REPORT_ID {
                return Err(StoreError::Invalid(format!(
                    "report id {:?} must have 1 to {MAX_REPORT_ID} bytes",
                    r.id.chars().take(40).collect::<String>()
                )));
            }
            if r.ts_ns < 0 {
                return Err(StoreError::Invalid(format!("report {:?}: ts_ns {} is before 1970", r.id, r.ts_ns)));
            }
        }
        // The last of several reports with one id wins; the first one's times count.
        let mut latest: HashMap<&str, (&v1::ResetReport, &[i64])> = HashMap::with_capacity(reports.len());
        for &(r, stored_at) in reports {
            latest.entry(r.id.as_str()).and_modify(|e| e.0 = r).or_insert((r, stored_at));
        }
        // The observations' agent ids. Agents new to the store (rare: ingest interned every agent
        // that sent something) are interned under the ingest writer's lock, released before the
        // reports are written.
        let mut ids_by_agent: HashMap<&str, u32> = HashMap::new();
        {
            let mut writer = None;
            for o in latest.values().flat_map(|(r, _)| &r.observations) {
                if ids_by_agent.contains_key(o.agent.as_str()) {
                    continue;
                }
                let known = self.names().id(&o.agent);
                let id = match known {
                    Some(id) => id,
                    None => {
                        writer.get_or_insert_with(|| self.writer());
                        self.intern_agent(&o.agent)?
                    }
                };
                ids_by_agent.insert(&o.agent, id);
            }
        }
        let _reports_writer = self.reports_writer();
        let mut changes: BTreeMap<i64, BucketChange> = BTreeMap::new();
        let mut agent_ids: Vec<u32> = Vec::new();
        for (id, (r, stored_at)) in latest {
            let key = report_key(r.ts_ns, id);
            let start = bucket_start(r.ts_ns);
            let mut body = Vec::with_capacity(r.encoded_len());
            r.encode_raw(&mut body);
            let record_bytes = (5 + key.len() + body.len()) as u64;
            let mut replaces_own = false;
            for (i, &old_ts) in stored_at.iter().enumerate() {
                if old_ts < 0 || stored_at[..i].contains(&old_ts) {
                    continue;
                }
                if old_ts == r.ts_ns {
                    replaces_own = true;
                    changes.entry(start).or_default().superseded += record_bytes;
                    continue;
                }
                let old = changes.entry(bucket_start(old_ts)).or_default();
                old.removed.push(report_key(old_ts, id));
                old.superseded += record_bytes;
                old.count_change -= 1;
            }
            if !replaces_own {
                changes.entry(start).or_default().count_change += 1;
            }
            agent_ids.clear();
            for o in &r.observations {
                let id = ids_by_agent[o.agent.as_str()];
                if !agent_ids.contains(&id) {
                    agent_ids.push(id);
                }
            }
            let entry = encode_entry(&key, r, &agent_ids);
            changes.entry(start).or_default().new.push(NewReport { key, entry, body });
        }
        for (start, change) in changes {
            self.append_to_bucket(start, change)?;
        }
        self.inner.durability.bump();
        Ok(())
    }

    /// Every stored report (id, time) with a time at or after `since_ns` (by its bucket's
    /// entries; an id stored under two times, after a crash in the middle of moving it, comes
    /// twice). For the correlation after a restart: the reports it may decide again.
    pub fn stored_report_times(&self, since_ns: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let listing = self.report_listing(&ResetQuery { since_ns: Some(since_ns), ..Default::default() })?;
        Ok(listing
            .buckets
            .iter()
            .flat_map(|(_, keys)| keys)
            .map(|key| split_report_key(key))
            .map(|(ts, id)| (id, ts))
            .collect())
    }

    /// Adds a call's reports to bucket `start` (the report trees' writer lock held): records at the end of
    /// its pages, entries and removals as a new run, merged with the runs before it as the
    /// module docs say. An empty bucket, one whose merge reaches the base while records are
    /// superseded, and one out of page or run numbers are rewritten whole instead.
    fn append_to_bucket(&self, start: i64, mut change: BucketChange) -> Result<(), StoreError> {
        let t = &self.inner.reports;
        let values = t.bucket_values(start)?;
        let rewrite = |change: BucketChange| -> Result<(), StoreError> {
            let removed: HashSet<Vec<u8>> = change.removed.into_iter().collect();
            self.rewrite_bucket(start, |key| removed.contains(key), change.new).map(|_| ())
        };
        if values.is_empty() {
            return rewrite(change);
        }
        change.new.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        change.removed.sort_unstable();

        // The new run: removals and entries in key order.
        let mut run = Vec::with_capacity(
            RUN_HEADER
                + change.new.iter().map(|n| 1 + n.entry.len()).sum::<usize>()
                + change.removed.iter().map(|k| 2 + k.len()).sum::<usize>(),
        );
        run.extend_from_slice(&run_header(change.superseded));
        let (mut new, mut removed) = (change.new.iter().peekable(), change.removed.iter().peekable());
        loop {
            let take_new = match (new.peek(), removed.peek()) {
                (None, None) => break,
                (Some(n), Some(k)) => n.key <= **k,
                (n, _) => n.is_some(),
            };
            if take_new {
                let n = new.next().expect("peeked");
                run.push(OP_ENTRY);
                run.extend_from_slice(&n.entry);
            } else {
                let key = removed.next().expect("peeked");
                run.push(OP_REMOVE);
                push_short(&mut run, key);
            }
        }
        // Pages: at the end of the last one while it is short, then new ones.
        let last = t.pages.range(page_key(start, 0)..=page_key(start, u16::MAX)).next_back().transpose()?;
        let (mut n, mut page) = match &last {
            None => (0u16, vec![REPORT_VERSION]),
            Some((key, page)) if page.len() < PAGE_BYTES && page.first() == Some(&REPORT_VERSION) => {
                (page_number(key).unwrap_or(0), page.to_vec())
            }
            Some((key, _)) => match page_number(key).and_then(|n| n.checked_add(1)) {
                Some(n) => (n, vec![REPORT_VERSION]),
                None => return rewrite(change),
            },
        };
        // Superseded records up to half the pages: compact then.
        let superseded = values.runs.iter().map(|(_, run)| run_superseded(run)).sum::<u64>() + change.superseded;
        let page_bytes = usize::from(n) * PAGE_BYTES + page.len();
        if superseded > 0 && superseded.saturating_mul(2) >= page_bytes as u64 {
            return rewrite(change);
        }
        let next_run = match values.runs.last() {
            None => Some(0),
            Some((key, _)) => page_number(key).and_then(|n| n.checked_add(1)),
        };
        let Some(next_run) = next_run else { return rewrite(change) };

        // Merge like a binary counter; stored values as (key, value, is the base).
        let base_key = ts_bytes(start);
        let mut stored: Vec<(&[u8], &[u8], bool)> = Vec::new();
        if let Some(base) = &values.base {
            stored.push((&base_key[..], base, true));
        }
        stored.extend(values.runs.iter().map(|(k, v)| (k.as_ref(), v.as_ref(), false)));
        // The value to write, its key, and whether that key is stored (a run merged into).
        let (mut top_key, mut top) = (run_key(start, next_run).to_vec(), run);
        let mut merged_away: Vec<Vec<u8>> = Vec::new();
        let mut top_is_stored = false;
        while let Some(&(below_key, below, below_is_base)) = stored.last() {
            if below.len() > 2 * top.len() {
                break;
            }
            if below_is_base && run_superseded(&top) > 0 {
                return rewrite(change);
            }
            let (value, both) = merge_runs(below, below_is_base, &top);
            if below_is_base && both {
                return rewrite(change);
            }
            stored.pop();
            if top_is_stored {
                merged_away.push(top_key);
            }
            (top_key, top, top_is_stored) = (below_key.to_vec(), value, true);
        }

        let bytes: usize = change.new.iter().map(|r| 5 + r.key.len() + r.body.len()).sum();
        if usize::from(n) + bytes / PAGE_BYTES + 2 > usize::from(u16::MAX) {
            return rewrite(change);
        }
        let mut pages = sled::Batch::default();
        for r in &change.new {
            push_short(&mut page, &r.key);
            page.extend_from_slice(&(r.body.len() as u32).to_be_bytes());
            page.extend_from_slice(&r.body);
            if page.len() >= PAGE_BYTES {
                pages.insert(&page_key(start, n)[..], std::mem::replace(&mut page, vec![REPORT_VERSION]));
                n += 1;
            }
        }
        if page.len() > 1 {
            pages.insert(&page_key(start, n)[..], page);
        }
        let count = (t.count.load(Ordering::Relaxed) as i64).saturating_add(change.count_change).max(0) as u64;
        pages.insert(&TALLY_TOTAL_KEY[..], &count.to_be_bytes()[..]);
        t.pages.apply_batch(pages)?;
        t.count.store(count, Ordering::Relaxed);

        let mut runs = sled::Batch::default();
        for key in merged_away {
            runs.remove(key);
        }
        runs.insert(top_key, top);
        t.buckets.apply_batch(runs)?;
        Ok(())
    }

    /// Rewrites bucket `start` whole (the report trees' writer lock held): drops the reports `drop` selects,
    /// adds `new` (replacing same keys), and keeps only reports that have both an entry and a
    /// page record (the newest of its key); the result is a base and pages in key order, without
    /// runs. Pages with the count first, then the base and runs. Returns how many reports went
    /// by `drop`.
    fn rewrite_bucket(&self, start: i64, drop: impl Fn(&[u8]) -> bool, new: Vec<NewReport>) -> Result<u64, StoreError> {
        let t = &self.inner.reports;
        let values = t.bucket_values(start)?;
        let (live, _) = values.live();
        let (old_records, old_pages) = t.page_records(start)?;
        // The last record of a key wins.
        let bodies: HashMap<&[u8], &[u8]> =
            old_records.iter().map(|(key, page, range)| (key.as_slice(), &page[range.clone()])).collect();
        // Key → (entry, report).
        let mut merged: BTreeMap<Vec<u8>, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        let (mut live_before, mut went) = (0u64, 0u64);
        for (entry, whole) in &live {
            let Some(body) = bodies.get(entry.key) else { continue };
            live_before += 1;
            if drop(entry.key) {
                went += 1;
                continue;
            }
            merged.insert(entry.key.to_vec(), (whole.to_vec(), body.to_vec()));
        }
        for n in new {
            merged.insert(n.key, (n.entry, n.body));
        }

        let count = (t.count.load(Ordering::Relaxed) + merged.len() as u64).saturating_sub(live_before);
        let mut batch =
            page_batch(start, merged.iter().map(|(k, (_, body))| (k.as_slice(), body.as_slice())), old_pages);
        batch.insert(&TALLY_TOTAL_KEY[..], &count.to_be_bytes()[..]);
        t.pages.apply_batch(batch)?;
        t.count.store(count, Ordering::Relaxed);
        let mut buckets = sled::Batch::default();
        for (key, _) in &values.runs {
            buckets.remove(key);
        }
        let bucket_key = ts_bytes(start);
        if merged.is_empty() {
            buckets.remove(&bucket_key[..]);
        } else {
            let mut value = Vec::with_capacity(1 + merged.values().map(|(e, _)| e.len()).sum::<usize>());
            value.push(REPORT_VERSION);
            for (entry, _) in merged.values() {
                value.extend_from_slice(entry);
            }
            buckets.insert(&bucket_key[..], value);
        }
        t.buckets.apply_batch(buckets)?;
        Ok(went)
    }

    /// Stored reports matching `q`, oldest first (with `last`, the newest N, still oldest
    /// first). Filters: time range on the report's time; hosts and ports on any observation's
    /// source or destination; agents on any observation's agent; verdicts and causes by name
    /// (a report without a cause reads as "unknown"); flags exactly. `after` is refused (it is
    /// a raw-record cursor).
    pub fn reports(&self, q: &ResetQuery) -> Result<Vec<v1::ResetReport>, StoreError> {
        let selected = self.select_reports(q)?;
        let mut out = Vec::with_capacity(selected.iter().map(|(_, keys)| keys.len()).sum());
        for (start, keys) in selected {
            self.read_reports(start, &keys, |key, body| match v1::ResetReport::decode(body) {
                Ok(report) => out.push(report),
                Err(_) => self.corrupt("report_pages", key, "undecodable ResetReport"),
            })?;
        }
        Ok(out)
    }

    /// The reports `q` selects (as [`Store::reports`] does), chosen but not read yet:
    /// [`Store::read_listed`] reads them a bucket at a time, each as stored (its protobuf
    /// encoding, for a server that passes it on without decoding and encoding it again). Choosing costs a scan of the buckets' entries only, so a server can
    /// count the answer (and refuse one too big) before reading any report, and then stream
    /// it while the client decodes the first buckets.
    pub fn report_listing(&self, q: &ResetQuery) -> Result<ReportListing, StoreError> {
        Ok(ReportListing { buckets: self.select_reports(q)? })
    }

    /// The reports of one bucket of a [`ReportListing`], oldest first, each as stored. A
    /// report removed since it was chosen (retention, a rewrite under another time) is
    /// skipped; one replaced since then is read in its newest version.
    pub fn read_listed(&self, bucket: &ListedBucket) -> Result<Vec<EncodedReport>, StoreError> {
        let (start, keys) = bucket;
        let mut out = Vec::with_capacity(keys.len());
        self.read_reports(*start, keys, |key, body| {
            let (ts_ns, id) = split_report_key(key);
            // Copied out of the page: a slice would keep the whole page (32 kB) alive while the
            // answer waits to be sent, for perhaps one small report of it.
            out.push(EncodedReport { ts_ns, id, bytes: Bytes::copy_from_slice(body) });
        })?;
        Ok(out)
    }

    /// The keys of the reports `q` selects, per bucket (ascending), buckets ascending.
    fn select_reports(&self, q: &ResetQuery) -> Result<Vec<ListedBucket>, StoreError> {
        if q.after.is_some() {
            return Err(StoreError::Invalid("`after` is a cursor of raw resets, not of reports".into()));
        }
        for f in &q.flags {
            parse_flag_letters(f)?;
        }
        let compiled = Compiled::new(self, q)?;
        if compiled.agent_ids.as_ref().is_some_and(HashSet::is_empty) {
            return Ok(Vec::new());
        }
        let filter = ReportFilter {
            compiled,
            causes: q.causes.clone(),
            verdicts: q.verdicts.clone(),
            since_ns: q.since_ns,
            until_ns: q.until_ns,
        };
        let cap = match (q.last, q.limit) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(usize::MAX),
        };
        if cap == 0 || matches!((q.since_ns, q.until_ns), (Some(s), Some(u)) if s >= u) {
            return Ok(Vec::new());
        }
        let start = ts_bytes(bucket_start(q.since_ns.unwrap_or(0).max(0))).to_vec();
        let end = q.until_ns.map_or(Bound::Unbounded, |u| Bound::Excluded(ts_bytes(u).to_vec()));
        let t = &self.inner.reports;
        let range = t.buckets.range::<Vec<u8>, _>((Bound::Included(start), end));
        let backwards = q.last.is_some();
        let items: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if backwards { Box::new(range.rev()) } else { Box::new(range) };
        let mut selected: Vec<ListedBucket> = Vec::new();
        let mut total = 0usize;
        for bucket in by_bucket(items, self) {
            let (start, values) = bucket?;
            let (live, broken) = values.live();
            if broken {
                self.corrupt("report_buckets", &ts_bytes(start), "malformed entry");
            }
            let mut matching: Vec<&[u8]> = live.iter().filter(|(e, _)| filter.matches(e)).map(|(e, _)| e.key).collect();
            let room = cap - total;
            if matching.len() > room {
                if backwards {
                    matching.drain(..matching.len() - room);
                } else {
                    matching.truncate(room);
                }
            }
            if !matching.is_empty() {
                total += matching.len();
                selected.push((start, matching.into_iter().map(<[u8]>::to_vec).collect()));
            }
            if total >= cap {
                break;
            }
        }
        if backwards {
            selected.reverse();
        }
        Ok(selected)
    }

    /// Hands the reports of bucket `start` with these keys (ascending) to `found` (key, encoded
    /// report), in key order, reading only that bucket's pages (the last record of a key wins).
    /// A key without a report (a write interrupted between its steps) is skipped.
    fn read_reports(
        &self,
        start: i64,
        keys: &[Vec<u8>],
        mut found: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        let mut hits: Vec<Option<(sled::IVec, Range<usize>)>> = vec![None; keys.len()];
        for item in self.inner.reports.pages.scan_prefix(ts_bytes(start)) {
            let (page_key, page) = item?;
            let mut records = PageRecords::new(&page);
            for (key, body) in records.by_ref() {
                if let Ok(i) = keys.binary_search_by(|k| k.as_slice().cmp(key)) {
                    hits[i] = Some((page.clone(), offset_in(&page, body)));
                }
            }
            if records.broken {
                self.corrupt("report_pages", &page_key, "malformed page");
            }
        }
        for (key, hit) in keys.iter().zip(hits) {
            if let Some((page, range)) = hit {
                found(key, &page[range]);
            }
        }
        Ok(())
    }

    /// The stored report with this id and time, if any.
    pub fn report(&self, id: &str, ts_ns: i64) -> Result<Option<v1::ResetReport>, StoreError> {
        let mut out = None;
        self.read_reports(bucket_start(ts_ns), &[report_key(ts_ns, id)], |_, body| {
            out = v1::ResetReport::decode(body).ok();
        })?;
        Ok(out)
    }

    /// Removes reports older than `cutoff_ns` and emptied buckets; returns how many reports.
    pub(super) fn remove_reports_before(&self, cutoff_ns: i64) -> Result<u64, StoreError> {
        let t = &self.inner.reports;
        let last = bucket_start(cutoff_ns);
        // Buckets with entries or pages (pages alone: a write interrupted between its steps).
        let mut starts: Vec<i64> = Vec::new();
        for key in t.buckets.range(..=run_key(last, u16::MAX)).keys() {
            if let Some(start) = key?.get(..8).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                starts.push(ts_from_bytes(start));
            }
        }
        let (first, last_page) = (FIRST_RECORD_KEY.to_vec(), page_key(last, u16::MAX).to_vec());
        for key in t.pages.range(first..=last_page).keys() {
            if let Some(start) = key?.get(..8).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                starts.push(ts_from_bytes(start));
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut removed = 0u64;
        for start in starts {
            let _reports_writer = self.reports_writer();
            let went = self.rewrite_bucket(
                start,
                |key| {
                    key.get(..8)
                        .and_then(|s| <[u8; 8]>::try_from(s).ok())
                        .is_some_and(|ts| ts_from_bytes(ts) < cutoff_ns)
                },
                Vec::new(),
            )?;
            removed += went;
        }
        self.inner.durability.bump();
        Ok(removed)
    }
}
