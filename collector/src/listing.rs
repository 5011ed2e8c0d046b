//! Sending a `ListReports` answer: the chosen reports read from the store bucket by bucket,
//! merged with the pending ones, in chunks.
//!
//! # Why two readers
//! A listing that matches a tenth of an hour's reports still reads every page of that hour
//! (each page holds some match): about 100 ms for 400k reports, most of it sled fetching and
//! decoding its nodes. That part was the longest of the answer once streaming let the client
//! decode while the server reads. Buckets are independent, so two threads read them, a group
//! of buckets at a time, and the sender puts the groups back in order. Read-ahead is bounded
//! (a few groups beyond what was sent), so a slow client never makes the server hold more than
//! that in memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tonic::Status;

use crate::store::{EncodedReport, ReportListing, Store, StoreError};

/// Chunks of an answer ready ahead of what the client has taken.
pub const CHUNKS_AHEAD: usize = 4;
/// Reports a chunk gathers (from as many buckets as it takes) before it is sent: a hand-over
/// per bucket costs more than it saves when buckets hold few matches.
pub const CHUNK_REPORTS: usize = 256;
/// Threads reading one listing's buckets.
const READERS: usize = 2;
/// Buckets (10 s of report time each) a reader reads at a time.
const GROUP_BUCKETS: usize = 4;
/// Groups read ahead of the one the sender waits for.
const GROUPS_AHEAD: usize = 4;

/// One group's reports, oldest first, or why it could not be read.
type GroupResult = Result<Vec<EncodedReport>, StoreError>;

/// Sends a listing's reports to `tx` in chunks (at least [`CHUNK_REPORTS`] but the last),
/// merged in (time, id) order with `pending` (sorted so), without the first `skip` of the
/// merged sequence (a `last` listing). Stops when the receiver is gone (the client left); a
/// store error ends the answer with that error.
pub fn send(
    store: &Store,
    listing: &ReportListing,
    pending: Vec<EncodedReport>,
    mut skip: usize,
    tx: &mpsc::Sender<Vec<Result<Bytes, Status>>>,
) {
    let mut pending = pending.into_iter().peekable();
    let mut chunk = Vec::with_capacity(CHUNK_REPORTS);
    let mut emit = |chunk: &mut Vec<Result<Bytes, Status>>, r: EncodedReport| {
        if skip > 0 {
            skip -= 1;
        } else {
            chunk.push(Ok(r.bytes));
        }
    };
    let sent_all = read_in_order(store, listing, |decided| {
        let decided = match decided {
            Ok(decided) => decided,
            Err(error) => {
                let _ = tx.blocking_send(vec![Err(Status::from(error))]);
                return false;
            }
        };
        for r in decided {
            while let Some(p) = pending.next_if(|p| (p.ts_ns, &p.id) < (r.ts_ns, &r.id)) {
                emit(&mut chunk, p);
            }
            emit(&mut chunk, r);
        }
        chunk.len() < CHUNK_REPORTS || tx.blocking_send(std::mem::take(&mut chunk)).is_ok()
    });
    if !sent_all {
        return;
    }
    for p in pending {
        emit(&mut chunk, p);
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
}

/// Hands the listing's reports to `take` a group of buckets at a time, in order, read by up to
/// [`READERS`] threads. `take` returns whether to go on; returns whether every group was taken.
fn read_in_order(store: &Store, listing: &ReportListing, mut take: impl FnMut(GroupResult) -> bool) -> bool {
    let groups: Vec<_> = listing.buckets().chunks(GROUP_BUCKETS).collect();
    let groups = &groups;
    let read_group = |g: usize| -> GroupResult {
        let mut out = Vec::new();
        for bucket in groups[g] {
            out.extend(store.read_listed(bucket)?);
        }
        Ok(out)
    };
    if groups.len() <= 1 {
        return (0..groups.len()).all(|g| take(read_group(g)));
    }
    // A reader takes a token before it takes the next group; the sender gives one back per
    // group it passed on. Groups are taken in order, so the one the sender waits for is
    // always taken (or about to be) and no token can be stuck ahead of it.
    let (token_tx, token_rx) = std_mpsc::sync_channel::<()>(GROUPS_AHEAD);
    for _ in 0..GROUPS_AHEAD {
        let _ = token_tx.send(());
    }
    let token_rx = Mutex::new(token_rx);
    let next = AtomicUsize::new(0);
    let (done_tx, done_rx) = std_mpsc::channel::<(usize, GroupResult)>();
    std::thread::scope(|scope| {
        for _ in 0..READERS.min(groups.len()) {
            let done_tx = done_tx.clone();
            let (token_rx, next, read_group) = (&token_rx, &next, &read_group);
            scope.spawn(move || loop {
                // A closed token channel: the sender stopped (the client left).
                if token_rx.lock().unwrap_or_else(|p| p.into_inner()).recv().is_err() {
                    return;
                }
                let g = next.fetch_add(1, Ordering::Relaxed);
                if g >= groups.len() || done_tx.send((g, read_group(g))).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        // Owns the sender's ends, so that leaving early lets the readers go before the scope
        // waits for them.
        let (token_tx, done_rx) = (token_tx, done_rx);
        let mut arrived: BTreeMap<usize, GroupResult> = BTreeMap::new();
        for g in 0..groups.len() {
            let group = loop {
                if let Some(group) = arrived.remove(&g) {
                    break group;
                }
                match done_rx.recv() {
                    Ok((i, group)) => {
                        arrived.insert(i, group);
                    }
                    // Every reader gone without group g: cannot happen, as they stop only
                    // past the last group or when this side hung up.
                    Err(_) => return false,
                }
            };
            let _ = token_tx.send(());
            if !take(group) {
                return false;
            }
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ResetQuery, StoreConfig};
    use prost::Message;
    use rstscope_proto::v1;

    fn decode_report(bytes: &[u8]) -> v1::ResetReport {
        v1::ResetReport::decode(bytes).expect("decodes")
    }

    /// A report at `ms` milliseconds past a fixed time.
    fn report_at(id: &str, ms: i64) -> v1::ResetReport {
        v1::ResetReport {
            id: id.to_string(),
            ts_ns: 1_700_000_000_000_000_000 + ms * 1_000_000,
            verdict: "end-to-end".to_string(),
            ..Default::default()
        }
    }

    /// What `send_listing` sends, as ids, chunk by chunk.
    fn sent(store: &Store, pending: &[v1::ResetReport], skip: usize) -> Vec<Vec<String>> {
        let listing = store.report_listing(&ResetQuery::default()).expect("listing");
        let pending = pending
            .iter()
            .map(|r| EncodedReport { ts_ns: r.ts_ns, id: r.id.clone(), bytes: Bytes::from(r.encode_to_vec()) })
            .collect();
        let (tx, mut rx) = mpsc::channel(1);
        let store = store.clone();
        let sender = std::thread::spawn(move || send(&store, &listing, pending, skip, &tx));
        let mut chunks = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            chunks.push(chunk.into_iter().map(|r| decode_report(&r.expect("report")).id).collect());
        }
        sender.join().expect("sender");
        chunks
    }

    #[test]
    fn a_listing_streams_decided_and_pending_reports_in_time_order_in_chunks_and_skips_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(StoreConfig::new(dir.path())).expect("store");
        // One decided report every 100 ms for 300 s: 30 buckets of 10 s, eight groups of
        // buckets, more than the readers may read ahead.
        let decided: Vec<v1::ResetReport> = (0..3000).map(|i| report_at(&format!("d{i:04}"), i * 100)).collect();
        store.put_reports(&decided).expect("put");
        // Pending ones before, between (one at a decided one's time, ordered by id), and after.
        let pending = [
            report_at("a-first", -1000),
            report_at("c-tie", 10_000),
            report_at("p-mid", 25_050),
            report_at("z-last", 400_000),
        ];
        let mut expected: Vec<&v1::ResetReport> = decided.iter().chain(&pending).collect();
        expected.sort_by(|a, b| (a.ts_ns, &a.id).cmp(&(b.ts_ns, &b.id)));
        let expected: Vec<String> = expected.iter().map(|r| r.id.clone()).collect();
        assert_eq!(&expected[..2], ["a-first", "d0000"]);
        assert_eq!(expected[101], "c-tie", "before d0100, which has its time");
        for skip in [0, 1, 300, 3003, 3004, 3100] {
            let chunks = sent(&store, &pending, skip);
            let ids: Vec<String> = chunks.concat();
            assert_eq!(ids, expected[skip.min(expected.len())..], "skip {skip}");
            if let Some((_, full)) = chunks.split_last() {
                assert!(
                    full.iter().all(|c| c.len() >= CHUNK_REPORTS),
                    "skip {skip}: chunks {:?}",
                    chunks.iter().map(Vec::len).collect::<Vec<_>>()
                );
            }
        }
        // A client that leaves after the first chunk: the sender and its readers stop.
        let listing = store.report_listing(&ResetQuery::default()).expect("listing");
        let (tx, mut rx) = mpsc::channel(1);
        let sender = {
            let store = store.clone();
            std::thread::spawn(move || send(&store, &listing, Vec::new(), 0, &tx))
        };
        assert!(rx.blocking_recv().is_some_and(|chunk| chunk.len() >= CHUNK_REPORTS));
        drop(rx);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !sender.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(sender.is_finished(), "the sender stopped once the client left");
        // Nothing decided: the pending ones alone.
        let empty_dir = tempfile::tempdir().expect("tempdir");
        let empty = Store::open(StoreConfig::new(empty_dir.path())).expect("store");
        assert_eq!(sent(&empty, &pending, 0).concat(), ["a-first", "c-tie", "p-mid", "z-last"]);
    }
}
