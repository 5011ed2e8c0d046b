//! The correlator's output: merged reset reports (one per distinct RST, across agents), their
//! filtered listing, and small named values ([`Store::set_meta`] lives in the store's root).
//!
//! # Why buckets and pages
//! A listing like `--since 1h --cause refused` over millions of reports must neither visit every
//! report of the hour nor fetch each match on its own: sled costs about a microsecond per key
//! visited and several per point look-up, so 400k keys alone take 400 ms, and 40k single
//! fetches another 300 ms. Reports are therefore kept per 10 s of report time, in two trees:
//!
//! - `report_buckets`: bucket start (ts 8) → one value listing the bucket's reports, in key
//!   order, with what the filters look at: verdict, cause, flags, the agents, addresses and
//!   ports of every observation (a few dozen bytes each).
//! - `report_pages`: bucket start (ts 8) · page (u16) → the bucket's encoded reports, in the same
//!   key order, cut into pages of about 32 kB (sled keeps bigger values in files of their own).
//!
//! A listing reads one bucket value per 10 s (360 for an hour), filters the entries in memory,
//! and then reads the pages of only the buckets that hold a match, decoding only the matches.
//! `report_ids` (id → ts 8) finds a report's bucket when it is rewritten with another time or
//! fetched by id. The report key (ts 8 · id) orders reports within a bucket.
//!
//! The price is paid by [`Store::put_reports`]: each call rewrites the buckets and pages it
//! touches (a few kB to some 100 kB), so the correlator stores its decisions in batches rather
//! than one report per call.
//!
//! # Crash safety
//! `put_reports` writes, per bucket, the pages first (atomically with the report count), then
//! the bucket's entries, and last the id map. A crash in between leaves an entry whose report
//! is missing or stale in the pages (skipped when listed), or a report in the pages without an
//! entry (not listed), until the same reports are put again, which the correlator does when it
//! replays from its last durable "decided until" time. Every rewrite of a bucket keeps only
//! reports that have both, so such leftovers do not outlive the next write to their bucket.

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

/// A bucket's start and the report keys chosen in it (ascending).
type BucketKeys = (i64, Vec<Vec<u8>>);

/// Width of a bucket of report time.
const BUCKET_NS: i64 = 10_000_000_000;
/// Version byte in front of bucket values and pages.
const REPORT_VERSION: u8 = 1;
/// Longest report id (its key is ts 8 + id, length-prefixed in bucket entries by one byte).
pub const MAX_REPORT_ID: usize = 200;
/// A page is closed once it holds this many bytes.
const PAGE_BYTES: usize = 32 * 1024;

/// The trees of reports.
pub(super) struct ReportTrees {
    pub(super) pages: sled::Tree,
    pub(super) ids: sled::Tree,
    buckets: sled::Tree,
    count: AtomicU64,
}

impl ReportTrees {
    pub(super) fn open(db: &sled::Db) -> Result<ReportTrees, StoreError> {
        let tree = |name: &str| db.open_tree(name).map_err(StoreError::from_sled);
        let pages = tree("report_pages")?;
        let count = pages.get(TALLY_TOTAL_KEY)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
        let trees = ReportTrees {
            pages,
            ids: tree("report_ids")?,
            buckets: tree("report_buckets")?,
            count: AtomicU64::new(count.map_or(0, u64::from_be_bytes)),
        };
        trees.migrate_one_value_per_report(db)?;
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

    /// The records of one bucket's pages, in key order (report key, page, where the encoded
    /// report lies in the page), and how many pages it has.
    #[allow(clippy::type_complexity)]
    fn page_records(&self, start: i64) -> Result<(Vec<(Vec<u8>, sled::IVec, Range<usize>)>, usize), StoreError> {
        let (mut out, mut pages) = (Vec::new(), 0);
        for item in self.pages.scan_prefix(ts_bytes(start)) {
            let (_, page) = item?;
            pages += 1;
            for (key, body) in PageRecords::new(&page) {
                out.push((key.to_vec(), page.clone(), offset_in(&page, body)));
            }
        }
        Ok((out, pages))
    }
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
}

impl<'a> PageRecords<'a> {
    fn new(page: &'a [u8]) -> PageRecords<'a> {
        match page.split_first() {
            Some((&REPORT_VERSION, rest)) => PageRecords { rest },
            _ => PageRecords { rest: &[] },
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
            self.rest = &[];
        }
        found
    }
}

fn bucket_start(ts_ns: i64) -> i64 {
    ts_ns.div_euclid(BUCKET_NS).saturating_mul(BUCKET_NS)
}

fn report_key(ts_ns: i64, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + id.len());
    key.extend_from_slice(&ts_bytes(ts_ns));
    key.extend_from_slice(id.as_bytes());
    key
}

/// One report's entry in its bucket: what the filters need, and its key.
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
}

impl<'a> Entries<'a> {
    fn new(value: &'a [u8]) -> Entries<'a> {
        match value.split_first() {
            Some((&REPORT_VERSION, rest)) => Entries { rest },
            _ => Entries { rest: &[] },
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

impl Store {
    /// Stores merged reports, replacing any stored earlier under the same id (also when its
    /// time changed). Idempotent. Not flushed: call [`Store::flush`] (or write the correlator's
    /// progress with [`Store::set_meta`] afterwards; sled recovers a prefix of its log, so a
    /// durable progress mark implies durable reports before it).
    ///
    /// Refuses (nothing written) a report with an empty id, an id over 200 bytes, or a time
    /// before 1970. Observations' agents are interned like ingesting agents.
    pub fn put_reports(&self, reports: &[v1::ResetReport]) -> Result<(), StoreError> {
        for r in reports {
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
        // The last of several reports with one id wins.
        let mut latest: HashMap<&str, &v1::ResetReport> = HashMap::new();
        for r in reports {
            latest.insert(r.id.as_str(), r);
        }
        let _writer = self.writer();
        let t = &self.inner.reports;
        let mut id_batch = sled::Batch::default();
        // Per bucket: keys whose reports go (an earlier version, here or elsewhere), and new ones.
        let mut gone: BTreeMap<i64, HashSet<Vec<u8>>> = BTreeMap::new();
        let mut added: BTreeMap<i64, Vec<NewReport>> = BTreeMap::new();
        for (id, r) in latest {
            let key = report_key(r.ts_ns, id);
            if let Some(old) = t.ids.get(id.as_bytes())? {
                if let Ok(old_ts) = <[u8; 8]>::try_from(old.as_ref()) {
                    let old_ts = ts_from_bytes(old_ts);
                    gone.entry(bucket_start(old_ts)).or_default().insert(report_key(old_ts, id));
                }
            }
            let mut agent_ids: Vec<u32> = Vec::new();
            for o in &r.observations {
                let id = self.intern_agent(&o.agent)?;
                if !agent_ids.contains(&id) {
                    agent_ids.push(id);
                }
            }
            let mut body = Vec::with_capacity(r.encoded_len());
            r.encode_raw(&mut body);
            id_batch.insert(id.as_bytes(), &ts_bytes(r.ts_ns)[..]);
            let entry = encode_entry(&key, r, &agent_ids);
            gone.entry(bucket_start(r.ts_ns)).or_default().insert(key.clone());
            added.entry(bucket_start(r.ts_ns)).or_default().push(NewReport { key, entry, body });
        }
        for (start, gone_keys) in &gone {
            let new = added.remove(start).unwrap_or_default();
            self.rewrite_bucket(*start, |key| gone_keys.contains(key), new)?;
        }
        t.ids.apply_batch(id_batch)?;
        self.inner.durability.bump();
        Ok(())
    }

    /// Rewrites bucket `start` (the writer lock held): drops the reports `drop` selects, adds
    /// `new` (replacing same keys), and keeps only reports that have both an entry and a page
    /// record. Pages with the count first, then the entries. Returns the keys of the reports
    /// that were in the pages and are not any more.
    fn rewrite_bucket(
        &self,
        start: i64,
        drop: impl Fn(&[u8]) -> bool,
        new: Vec<NewReport>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let t = &self.inner.reports;
        let bucket_key = ts_bytes(start);
        let old_entries = t.buckets.get(bucket_key)?;
        let (old_records, old_pages) = t.page_records(start)?;
        let bodies: HashMap<&[u8], &[u8]> =
            old_records.iter().map(|(key, page, range)| (key.as_slice(), &page[range.clone()])).collect();
        // Key → (entry, report).
        let mut merged: BTreeMap<Vec<u8>, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        if let Some(value) = old_entries.as_deref() {
            for (entry, whole) in Entries::new(value) {
                if drop(entry.key) {
                    continue;
                }
                if let Some(body) = bodies.get(entry.key) {
                    merged.insert(entry.key.to_vec(), (whole.to_vec(), body.to_vec()));
                }
            }
        }
        for n in new {
            merged.insert(n.key, (n.entry, n.body));
        }
        let dropped: Vec<Vec<u8>> =
            old_records.iter().filter(|(key, _, _)| !merged.contains_key(key)).map(|(key, _, _)| key.clone()).collect();

        let count = (t.count.load(Ordering::Relaxed) + merged.len() as u64).saturating_sub(old_records.len() as u64);
        let mut batch =
            page_batch(start, merged.iter().map(|(k, (_, body))| (k.as_slice(), body.as_slice())), old_pages);
        batch.insert(&TALLY_TOTAL_KEY[..], &count.to_be_bytes()[..]);
        t.pages.apply_batch(batch)?;
        t.count.store(count, Ordering::Relaxed);
        if merged.is_empty() {
            t.buckets.remove(bucket_key)?;
        } else {
            let mut value = Vec::with_capacity(1 + merged.values().map(|(e, _)| e.len()).sum::<usize>());
            value.push(REPORT_VERSION);
            for (entry, _) in merged.values() {
                value.extend_from_slice(entry);
            }
            t.buckets.insert(bucket_key, value)?;
        }
        Ok(dropped)
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

    /// The same as [`Store::reports`], each report as stored: its protobuf encoding, for a
    /// server that passes it on without decoding and encoding it again.
    pub fn encoded_reports(&self, q: &ResetQuery) -> Result<Vec<EncodedReport>, StoreError> {
        let selected = self.select_reports(q)?;
        let mut out = Vec::with_capacity(selected.iter().map(|(_, keys)| keys.len()).sum());
        for (start, keys) in selected {
            self.read_reports(start, &keys, |key, body| {
                let (ts, id) = key.split_at(8);
                let ts_ns = ts_from_bytes(ts.try_into().unwrap_or_default());
                let id = String::from_utf8_lossy(id).into_owned();
                out.push(EncodedReport { ts_ns, id, bytes: Bytes::copy_from_slice(body) });
            })?;
        }
        Ok(out)
    }

    /// The keys of the reports `q` selects, per bucket (ascending), buckets ascending.
    fn select_reports(&self, q: &ResetQuery) -> Result<Vec<BucketKeys>, StoreError> {
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
        let buckets: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if backwards { Box::new(range.rev()) } else { Box::new(range) };
        let mut selected: Vec<BucketKeys> = Vec::new();
        let mut total = 0usize;
        for item in buckets {
            let (bucket, value) = item?;
            let Ok(start) = <[u8; 8]>::try_from(bucket.as_ref()) else {
                self.corrupt("report_buckets", &bucket, "key is not a bucket time");
                continue;
            };
            let mut entries = Entries::new(&value);
            let mut matching: Vec<&[u8]> =
                entries.by_ref().filter(|(e, _)| filter.matches(e)).map(|(e, _)| e.key).collect();
            if value.len() > 1 && !entries.rest.is_empty() {
                self.corrupt("report_buckets", &bucket, "malformed entry");
            }
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
                selected.push((ts_from_bytes(start), matching.into_iter().map(<[u8]>::to_vec).collect()));
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
    /// report), in key order, reading only that bucket's pages. A key without a report (a write
    /// interrupted between its steps) is skipped.
    fn read_reports(
        &self,
        start: i64,
        keys: &[Vec<u8>],
        mut found: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        let mut wanted = keys.iter().peekable();
        for item in self.inner.reports.pages.scan_prefix(ts_bytes(start)) {
            let (page_key, page) = item?;
            let mut records = PageRecords::new(&page);
            for (key, body) in records.by_ref() {
                while wanted.next_if(|w| w.as_slice() < key).is_some() {}
                let Some(w) = wanted.peek() else { return Ok(()) };
                if w.as_slice() == key {
                    found(key, body);
                    wanted.next();
                }
            }
            if !records.rest.is_empty() || page.first() != Some(&REPORT_VERSION) {
                self.corrupt("report_pages", &page_key, "malformed page");
            }
        }
        Ok(())
    }

    /// The stored report with this id, if any.
    pub fn report(&self, id: &str) -> Result<Option<v1::ResetReport>, StoreError> {
        let t = &self.inner.reports;
        let Some(ts) = t.ids.get(id.as_bytes())? else { return Ok(None) };
        let Ok(ts) = <[u8; 8]>::try_from(ts.as_ref()) else { return Ok(None) };
        let ts = ts_from_bytes(ts);
        let mut out = None;
        self.read_reports(bucket_start(ts), &[report_key(ts, id)], |_, body| {
            out = v1::ResetReport::decode(body).ok();
        })?;
        Ok(out)
    }

    /// Removes reports older than `cutoff_ns` with their ids and emptied buckets; returns how
    /// many reports.
    pub(super) fn remove_reports_before(&self, cutoff_ns: i64) -> Result<u64, StoreError> {
        let t = &self.inner.reports;
        let last = bucket_start(cutoff_ns);
        // Buckets with entries or pages (pages alone: a write interrupted between its steps).
        let mut starts: Vec<i64> = Vec::new();
        for key in t.buckets.range(..=ts_bytes(last)).keys() {
            if let Ok(start) = <[u8; 8]>::try_from(key?.as_ref()) {
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
            let _writer = self.writer();
            let dropped = self.rewrite_bucket(
                start,
                |key| {
                    key.get(..8)
                        .and_then(|s| <[u8; 8]>::try_from(s).ok())
                        .is_some_and(|ts| ts_from_bytes(ts) < cutoff_ns)
                },
                Vec::new(),
            )?;
            let mut ids = sled::Batch::default();
            for key in &dropped {
                let id = &key[8.min(key.len())..];
                // Only if the id still points here (not to a newer version elsewhere).
                if t.ids.get(id)?.is_some_and(|ts| ts.as_ref() == &key[..8.min(key.len())]) {
                    ids.remove(id);
                }
            }
            t.ids.apply_batch(ids)?;
            removed += dropped.len() as u64;
        }
        self.inner.durability.bump();
        Ok(removed)
    }
}
