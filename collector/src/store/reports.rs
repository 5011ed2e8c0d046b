//! The correlator's output: merged reset reports (one per distinct RST, across agents), their
//! filtered listing, and small named values ([`Store::set_meta`] lives in the store's root).
//!
//! # Why buckets
//! A listing like `--since 1h --cause refused` over millions of reports must not visit every
//! report of the hour: sled costs about a microsecond per key visited, so 400k keys alone take
//! 400 ms. Besides the reports themselves (`reports`: ts 8 · id → version · prost
//! `ResetReport`, one key per report, and `report_ids`: id → ts 8, to find a report's key when
//! it is rewritten with another time), every 10 s of report time has one `report_buckets` value
//! listing its reports' keys with what the filters look at: verdict, cause, flags, the agents,
//! addresses and ports of every observation. A listing reads one value per 10 s (360 for an
//! hour), filters the entries in memory, and reads only the reports that match.
//!
//! The price is paid by [`Store::put_reports`]: each call rewrites the bucket values it touches
//! (a few kB to some 100 kB), so the correlator should store its decisions in batches rather
//! than one report per call.
//!
//! # Crash safety
//! `put_reports` writes the buckets first, then the reports (with their count, atomically),
//! then the id map. A crash in between can leave a bucket entry whose report is missing or
//! stale (skipped when listed) until the same reports are put again, which the correlator does
//! when it replays from its last durable "decided until" time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use rstscope_proto::v1;

use super::keys::{ts_bytes, ts_from_bytes, FIRST_RECORD_KEY, TALLY_TOTAL_KEY};
use super::query::{parse_flag_letters, Compiled, FLAG_MASK};
use super::{ip_from_bytes, ResetQuery, Store, StoreError};

/// Width of a bucket of report time.
const BUCKET_NS: i64 = 10_000_000_000;
/// Version byte in front of report values and bucket values.
const REPORT_VERSION: u8 = 1;
/// Longest report id (its key is ts 8 + id, length-prefixed in bucket entries by one byte).
pub const MAX_REPORT_ID: usize = 200;
/// Reports removed per retention chunk.
const CHUNK: usize = 1_000;

/// The three trees of reports.
pub(super) struct ReportTrees {
    reports: sled::Tree,
    ids: sled::Tree,
    buckets: sled::Tree,
    count: AtomicU64,
}

impl ReportTrees {
    pub(super) fn open(db: &sled::Db) -> Result<ReportTrees, StoreError> {
        let tree = |name: &str| db.open_tree(name).map_err(StoreError::from_sled);
        let reports = tree("reports")?;
        let count = reports.get(TALLY_TOTAL_KEY)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
        Ok(ReportTrees {
            reports,
            ids: tree("report_ids")?,
            buckets: tree("report_buckets")?,
            count: AtomicU64::new(count.map_or(0, u64::from_be_bytes)),
        })
    }

    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
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

/// A report key and its encoded bucket entry.
type KeyedEntry = (Vec<u8>, Vec<u8>);

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
        let mut report_batch = sled::Batch::default();
        let mut id_batch = sled::Batch::default();
        // Per bucket: keys whose entries go, and new entries.
        let mut removed: BTreeMap<i64, HashSet<Vec<u8>>> = BTreeMap::new();
        let mut added: BTreeMap<i64, Vec<KeyedEntry>> = BTreeMap::new();
        let mut new_reports = 0u64;
        for (id, r) in latest {
            let key = report_key(r.ts_ns, id);
            match t.ids.get(id.as_bytes())? {
                Some(old) => {
                    if let Ok(old_ts) = <[u8; 8]>::try_from(old.as_ref()) {
                        let old_ts = ts_from_bytes(old_ts);
                        let old_key = report_key(old_ts, id);
                        if old_key != key {
                            report_batch.remove(old_key.clone());
                        }
                        removed.entry(bucket_start(old_ts)).or_default().insert(old_key);
                    }
                }
                None => new_reports += 1,
            }
            let mut agent_ids: Vec<u32> = Vec::new();
            for o in &r.observations {
                let id = self.intern_agent(&o.agent)?;
                if !agent_ids.contains(&id) {
                    agent_ids.push(id);
                }
            }
            let mut value = vec![REPORT_VERSION];
            r.encode_raw(&mut value);
            report_batch.insert(key.as_slice(), value);
            id_batch.insert(id.as_bytes(), &ts_bytes(r.ts_ns)[..]);
            let entry = encode_entry(&key, r, &agent_ids);
            removed.entry(bucket_start(r.ts_ns)).or_default().insert(key.clone());
            added.entry(bucket_start(r.ts_ns)).or_default().push((key, entry));
        }

        // 1. Buckets.
        let mut bucket_batch = sled::Batch::default();
        for (start, gone) in &removed {
            let bucket_key = ts_bytes(*start);
            let old = t.buckets.get(bucket_key)?;
            let mut entries: Vec<(&[u8], &[u8])> = old
                .as_deref()
                .map(|v| Entries::new(v).filter(|(e, _)| !gone.contains(e.key)).map(|(e, w)| (e.key, w)).collect())
                .unwrap_or_default();
            if let Some(new) = added.get(start) {
                entries.extend(new.iter().map(|(k, e)| (k.as_slice(), e.as_slice())));
            }
            entries.sort_by(|a, b| a.0.cmp(b.0));
            if entries.is_empty() {
                bucket_batch.remove(&bucket_key[..]);
                continue;
            }
            let mut value = Vec::with_capacity(1 + entries.iter().map(|(_, e)| e.len()).sum::<usize>());
            value.push(REPORT_VERSION);
            for (_, entry) in entries {
                value.extend_from_slice(entry);
            }
            bucket_batch.insert(&bucket_key[..], value);
        }
        t.buckets.apply_batch(bucket_batch)?;
        // 2. The reports with their count, 3. the id map.
        let count = t.count.load(Ordering::Relaxed) + new_reports;
        report_batch.insert(&TALLY_TOTAL_KEY[..], &count.to_be_bytes()[..]);
        t.reports.apply_batch(report_batch)?;
        t.count.store(count, Ordering::Relaxed);
        t.ids.apply_batch(id_batch)?;
        self.inner.durability.bump();
        Ok(())
    }

    /// Stored reports matching `q`, oldest first (with `last`, the newest N, still oldest
    /// first). Filters: time range on the report's time; hosts and ports on any observation's
    /// source or destination; agents on any observation's agent; verdicts and causes by name
    /// (a report without a cause reads as "unknown"); flags exactly. `after` is refused (it is
    /// a raw-record cursor).
    pub fn reports(&self, q: &ResetQuery) -> Result<Vec<v1::ResetReport>, StoreError> {
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
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let backwards = q.last.is_some();
        let buckets: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if backwards { Box::new(range.rev()) } else { Box::new(range) };
        'buckets: for item in buckets {
            let (bucket, value) = item?;
            let mut matching: Vec<&[u8]> = Vec::new();
            let mut entries = Entries::new(&value);
            for (entry, _) in entries.by_ref() {
                if filter.matches(&entry) {
                    matching.push(entry.key);
                }
            }
            if value.len() > 1 && !entries.rest.is_empty() {
                self.corrupt("report_buckets", &bucket, "malformed entry");
            }
            if backwards {
                matching.reverse();
            }
            for key in matching {
                keys.push(key.to_vec());
                if keys.len() >= cap {
                    break 'buckets;
                }
            }
        }
        if backwards {
            keys.reverse();
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            // Missing: a put or a retention run interrupted between its steps; skip it.
            let Some(value) = t.reports.get(&key)? else { continue };
            match value.split_first() {
                Some((&REPORT_VERSION, body)) => match v1::ResetReport::decode(body) {
                    Ok(report) => out.push(report),
                    Err(_) => self.corrupt("reports", &key, "undecodable ResetReport"),
                },
                _ => self.corrupt("reports", &key, "unknown report version"),
            }
        }
        Ok(out)
    }

    /// The stored report with this id, if any.
    pub fn report(&self, id: &str) -> Result<Option<v1::ResetReport>, StoreError> {
        let t = &self.inner.reports;
        let Some(ts) = t.ids.get(id.as_bytes())? else { return Ok(None) };
        let Ok(ts) = <[u8; 8]>::try_from(ts.as_ref()) else { return Ok(None) };
        let Some(value) = t.reports.get(report_key(ts_from_bytes(ts), id))? else { return Ok(None) };
        match value.split_first() {
            Some((&REPORT_VERSION, body)) => Ok(v1::ResetReport::decode(body).ok()),
            _ => Ok(None),
        }
    }

    /// Removes reports older than `cutoff_ns` with their ids and whole buckets; returns how
    /// many reports.
    pub(super) fn remove_reports_before(&self, cutoff_ns: i64) -> Result<u64, StoreError> {
        let t = &self.inner.reports;
        let end = ts_bytes(cutoff_ns);
        let mut removed = 0u64;
        loop {
            let _writer = self.writer();
            let keys: Vec<sled::IVec> =
                t.reports.range(FIRST_RECORD_KEY..end).keys().take(CHUNK).collect::<Result<_, _>>()?;
            if keys.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            let mut ids = sled::Batch::default();
            for key in &keys {
                batch.remove(key.clone());
                ids.remove(&key[8.min(key.len())..]);
            }
            let count = t.count.load(Ordering::Relaxed).saturating_sub(keys.len() as u64);
            batch.insert(&TALLY_TOTAL_KEY[..], &count.to_be_bytes()[..]);
            t.reports.apply_batch(batch)?;
            t.count.store(count, Ordering::Relaxed);
            t.ids.apply_batch(ids)?;
            removed += keys.len() as u64;
        }
        // Buckets that end at or before the cutoff; a bucket across it keeps entries whose
        // reports are gone (skipped when listed) until it ages out too.
        let last_whole = ts_bytes(bucket_start(cutoff_ns));
        let _writer = self.writer();
        let mut batch = sled::Batch::default();
        for key in t.buckets.range(..last_whole).keys() {
            batch.remove(key?);
        }
        t.buckets.apply_batch(batch)?;
        self.inner.durability.bump();
        Ok(removed)
    }
}
