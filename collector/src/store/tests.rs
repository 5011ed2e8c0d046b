//! Store tests against a real sled directory. Events are written with a tiny helper language:
//! `rst(ms, "10.0.0.1:1234 > 10.0.0.2:80", "RA", Cause::Refused)`; results are compared as the
//! list of their times in ms, so each table row reads like the data it describes.

use std::net::IpAddr;
use std::time::Duration;

use rstscope_proto::v1::{self, event::Kind, Cause};
use rstscope_proto::{Endpoint, FlowKey};

use super::*;

/// An arbitrary epoch so that times in the tables stay small.
const T0_NS: i64 = 1_700_000_000_000_000_000;

fn ns(ms: i64) -> i64 {
    T0_NS + ms * 1_000_000
}

fn open(dir: &tempfile::TempDir) -> Store {
    let mut config = StoreConfig::new(dir.path());
    // A small memtable: the tests go through flushes of the connection index into runs.
    config.conn_index_memory_entries = 7;
    Store::open(config).expect("open store")
}

fn pb_endpoint(text: &str) -> v1::Endpoint {
    let addr: std::net::SocketAddr = text.parse().expect("socket address");
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    v1::Endpoint { ip, port: u32::from(addr.port()) }
}

/// `"a:1 > b:2"` as (src, dst).
fn pair(path: &str) -> (v1::Endpoint, v1::Endpoint) {
    let (a, b) = path.split_once(" > ").expect("src > dst");
    (pb_endpoint(a), pb_endpoint(b))
}

fn flow_key(path: &str) -> FlowKey {
    let (a, b) = path.split_once(" > ").expect("src > dst");
    let (a, b): (std::net::SocketAddr, std::net::SocketAddr) = (a.parse().expect("a"), b.parse().expect("b"));
    FlowKey::new(Endpoint::new(a.ip(), a.port()), Endpoint::new(b.ip(), b.port()))
}

fn rst(ms: i64, path: &str, flags: &str, cause: Cause) -> v1::Event {
    let (src, dst) = pair(path);
    let flags = u32::from(parse_flag_letters(flags).expect("flags"));
    let event = v1::RstEvent {
        ts_ns: ns(ms),
        src: Some(src),
        dst: Some(dst),
        flags,
        cause: cause as i32,
        history: "ShADr".to_string(),
        evidence: vec![v1::Evidence { name: "ttl-mismatch".into(), detail: "64 vs 50".into() }],
        ..Default::default()
    };
    v1::Event { kind: Some(Kind::Reset(event)) }
}

fn flow(end_ms: i64, path: &str) -> v1::Event {
    let (orig, resp) = pair(path);
    let summary = v1::FlowSummary {
        orig: Some(orig),
        resp: Some(resp),
        start_ns: ns(end_ms - 10),
        end_ns: ns(end_ms),
        conn_state: "RSTO".into(),
        ..Default::default()
    };
    v1::Event { kind: Some(Kind::Flow(summary)) }
}

fn watermark(ms: i64) -> v1::Event {
    v1::Event {
        kind: Some(Kind::Watermark(v1::Watermark { ts_ns: ns(ms), since_ns: 0, ended: false, ..Default::default() })),
    }
}

fn loss(capture: u64, interface: u64, events: u64) -> v1::Event {
    v1::Event {
        kind: Some(Kind::Loss(v1::CaptureLoss {
            capture_dropped: capture,
            interface_dropped: interface,
            events_dropped: events,
            ..Default::default()
        })),
    }
}

fn batch(seq: u64, events: Vec<v1::Event>) -> v1::Batch {
    v1::Batch { seq, events, spooled_seq: 0 }
}

fn hello(agent: &str, boot: &str) -> v1::AgentHello {
    v1::AgentHello {
        agent_name: agent.into(),
        host_name: format!("{agent}.example"),
        software_version: "0.1.0".into(),
        boot_id: boot.into(),
        local_addresses: vec![vec![10, 0, 0, 1]],
        ..Default::default()
    }
}

/// Times (ms) of the resets a query returns, in returned order.
fn times(store: &Store, q: &ResetQuery) -> Vec<i64> {
    store.resets(q).expect("query").iter().map(|r| (r.event.ts_ns - T0_NS) / 1_000_000).collect()
}

/// Records in a record tree (its reserved tally keys left out).
fn records_in(store: &Store, kind: u8) -> u64 {
    store.tree(kind).range(keys::FIRST_RECORD_KEY.to_vec()..).count() as u64
}

/// Every record has exactly one index entry and the counters agree with the trees, also after
/// reopening (the tallies on disk, not only in memory).
fn assert_consistent(store: &Store) {
    use keys::{KIND_FLOW, KIND_LOSS, KIND_OPEN, KIND_RESET};
    let status = store.status().expect("status");
    assert_eq!(status.resets, records_in(store, KIND_RESET), "reset counter");
    assert_eq!(status.flows, records_in(store, KIND_FLOW), "flow counter");
    assert_eq!(status.opens, records_in(store, KIND_OPEN), "open counter");
    assert_eq!(status.losses, records_in(store, KIND_LOSS), "loss counter");
    // Every record has its index entry; the index may also hold entries of records retention
    // removed, until their hour is dropped.
    let entries: std::collections::HashSet<_> = store.inner.conn.all_entries().expect("index").into_iter().collect();
    for kind in [keys::KIND_FLOW, keys::KIND_RESET, keys::KIND_OPEN] {
        for item in store.tree(kind).range(keys::FIRST_RECORD_KEY.to_vec()..) {
            let (k, v) = item.expect("record");
            let seq = keys::StoreSeq::from_bytes(&k).expect("record key");
            let (header, _) = keys::ValueHeader::decode(&v).expect("header");
            assert!(entries.contains(&keys::conn_key(&header.key, kind, &seq)), "record {seq} has no index entry");
        }
    }
    let per_agent: u64 = store.agents().expect("agents").iter().map(|a| a.events).sum();
    assert_eq!(per_agent, status.resets + status.flows + status.opens, "agent event counts");
    let mut on_disk = std::collections::HashMap::new();
    for kind in KINDS {
        for item in store.tree(kind).raw().scan_prefix(keys::TALLY_AGENT_PREFIX) {
            let (k, v) = item.expect("tally");
            let id = u32::from_be_bytes([k[2], k[3], k[4], k[5]]);
            on_disk.insert((kind, id), keys::Tally::from_bytes(&v).expect("tally value"));
        }
    }
    let in_memory = store.writer().tallies.clone();
    assert_eq!(on_disk, in_memory, "tallies on disk");
}

#[test]
fn append_is_idempotent_per_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    // A different event per step: this is about batch numbers, not about event identity.
    let one = |n: usize| vec![rst(1, &format!("10.0.0.1:{} > 10.0.0.2:80", 1000 + n), "R", Cause::Refused)];
    // (boot, batch seq, expected outcome, resets stored afterwards)
    let steps: &[(&str, u64, Appended, u64)] = &[
        ("b1", 1, Appended::Stored { durable_seq: 1 }, 1),
        ("b1", 1, Appended::Duplicate { durable_seq: 1 }, 1),
        ("b1", 3, Appended::Gap { durable_seq: 1 }, 1),
        ("b1", 2, Appended::Stored { durable_seq: 2 }, 2),
        ("b1", 0, Appended::Duplicate { durable_seq: 2 }, 2),
        ("b2", 2, Appended::Gap { durable_seq: 0 }, 2),
        ("b2", 1, Appended::Stored { durable_seq: 1 }, 3),
        ("b1", 3, Appended::Stored { durable_seq: 3 }, 4),
    ];
    for (n, &(boot, seq, expected, stored)) in steps.iter().enumerate() {
        let got = store.append_batch("a", boot, &batch(seq, one(n)), 0).expect("append");
        assert_eq!(got, expected, "step {n}: {boot} seq {seq}");
        assert_eq!(store.status().expect("status").resets, stored, "step {n}");
    }
    assert_eq!(store.hello(&hello("a", "b1"), 0).expect("hello"), 3);
    assert_eq!(store.hello(&hello("a", "b2"), 0).expect("hello"), 1);
    assert_eq!(store.hello(&hello("a", "b3"), 0).expect("hello"), 0);
    assert_consistent(&store);
}

#[test]
fn acknowledged_batches_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(&dir);
        assert_eq!(store.hello(&hello("a", "boot"), ns(0)).expect("hello"), 0);
        for seq in 1..=3 {
            let events = vec![rst(seq as i64, "10.0.0.1:1000 > 10.0.0.2:80", "R", Cause::Refused)];
            store.append_batch("a", "boot", &batch(seq, events), ns(0)).expect("append");
        }
    }
    let store = open(&dir);
    assert_eq!(store.hello(&hello("a", "boot"), ns(9)).expect("hello"), 3);
    assert_eq!(times(&store, &ResetQuery::default()), [1, 2, 3]);
    // A new boot after reopening gets a fresh session: its batch 1 is stored, not taken for
    // boot's batch 1.
    let events = vec![rst(2, "10.0.0.1:1001 > 10.0.0.2:80", "R", Cause::Refused)];
    assert_eq!(
        store.append_batch("a", "boot2", &batch(1, events), 0).expect("append"),
        Appended::Stored { durable_seq: 1 }
    );
    assert_eq!(times(&store, &ResetQuery::default()), [1, 2, 2, 3]);
    assert_eq!(
        store.append_batch("a", "boot", &batch(3, vec![]), 0).expect("append"),
        Appended::Duplicate { durable_seq: 3 }
    );
    assert_consistent(&store);
}

#[test]
fn an_event_sent_again_in_a_new_batch_is_stored_once() {
    // An agent killed mid-file and started again re-reads the capture and produces the same
    // events in new batches (resumed numbering, or a new boot id); live agents retry too.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let a = || rst(5, "10.0.0.1:1000 > 10.0.0.2:80", "RA", Cause::Refused);
    let b = || rst(6, "10.0.0.1:1001 > 10.0.0.2:80", "R", Cause::Lone);
    let f = || flow(7, "10.0.0.1:1000 > 10.0.0.2:80");
    assert_eq!(
        store.append_batch("x", "boot1", &batch(1, vec![a(), f()]), 0).expect("append"),
        Appended::Stored { durable_seq: 1 }
    );
    // Same events, new batch numbers, and a repeat within one batch.
    assert_eq!(
        store.append_batch("x", "boot1", &batch(2, vec![a(), b(), b(), f()]), 0).expect("append"),
        Appended::Stored { durable_seq: 2 }
    );
    assert_eq!(
        store.append_batch("x", "boot2", &batch(1, vec![a(), b(), f()]), 0).expect("append"),
        Appended::Stored { durable_seq: 1 }
    );
    assert_eq!(times(&store, &ResetQuery::default()), [5, 6]);
    let status = store.status().expect("status");
    assert_eq!((status.resets, status.flows), (2, 1));
    // Another agent's identical observation is its own record: that is what correlation compares.
    store.append_batch("y", "boot", &batch(1, vec![a()]), 0).expect("append");
    assert_eq!(times(&store, &ResetQuery::default()), [5, 5, 6]);
    // So is a packet that differs in any header field, or a later packet of the connection.
    let mut other_ttl = a();
    let mut later = a();
    if let (Some(Kind::Reset(r1)), Some(Kind::Reset(r2))) = (&mut other_ttl.kind, &mut later.kind) {
        r1.ttl = 50;
        r2.resp_pkts = 1;
    }
    store.append_batch("x", "boot2", &batch(2, vec![other_ttl, later]), 0).expect("append");
    assert_eq!(times(&store, &ResetQuery::default()), [5, 5, 5, 5, 6]);
    assert_consistent(&store);
}

/// Two agents' worth of resets for the filter table, in a fresh store.
fn filter_fixture(dir: &tempfile::TempDir) -> Store {
    let store = open(dir);
    filter_fixture_into(&store);
    store
}

#[test]
fn every_filter_selects_what_it_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = filter_fixture(&dir);
    let net = |s: &str| s.parse::<ipnet::IpNet>().expect("net");
    let q = ResetQuery::default;
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases: Vec<(&str, ResetQuery, Vec<i64>)> = vec![
        ("everything", q(), vec![10, 15, 20, 30, 40, 50]),
        ("since inclusive", ResetQuery { since_ns: Some(ns(20)), ..q() }, vec![20, 30, 40, 50]),
        ("until exclusive", ResetQuery { until_ns: Some(ns(30)), ..q() }, vec![10, 15, 20]),
        ("window", ResetQuery { since_ns: Some(ns(11)), until_ns: Some(ns(41)), ..q() }, vec![15, 20, 30, 40]),
        ("empty window", ResetQuery { since_ns: Some(ns(30)), until_ns: Some(ns(30)), ..q() }, vec![]),
        ("host exact", ResetQuery { hosts: vec![net("10.0.0.2/32")], ..q() }, vec![10, 15]),
        ("host cidr either end", ResetQuery { hosts: vec![net("192.168.0.0/16")], ..q() }, vec![20, 50]),
        ("host v6", ResetQuery { hosts: vec![net("2001:db8::/32")], ..q() }, vec![30]),
        ("hosts any of", ResetQuery { hosts: vec![net("172.16.0.0/12"), net("2001:db8::2/128")], ..q() }, vec![30, 40]),
        ("port either end", ResetQuery { ports: vec![443], ..q() }, vec![20, 50]),
        ("ports any of", ResetQuery { ports: vec![22, 3333], ..q() }, vec![30, 40]),
        ("agent", ResetQuery { agents: strings(&["beta"]), ..q() }, vec![15, 40]),
        ("unknown agent", ResetQuery { agents: strings(&["gamma"]), ..q() }, vec![]),
        ("cause", ResetQuery { causes: strings(&["refused"]), ..q() }, vec![10, 15]),
        ("causes any of", ResetQuery { causes: strings(&["middlebox", "lone"]), ..q() }, vec![30, 40]),
        ("unspecified reads as unknown", ResetQuery { causes: strings(&["unknown"]), ..q() }, vec![50]),
        ("flags exact", ResetQuery { flags: strings(&["R"]), ..q() }, vec![10, 50]),
        ("flags any order and case", ResetQuery { flags: strings(&["ar"]), ..q() }, vec![15, 20, 30]),
        (
            "combined",
            ResetQuery {
                since_ns: Some(ns(12)),
                agents: strings(&["alpha"]),
                flags: strings(&["RA"]),
                ports: vec![443],
                ..q()
            },
            vec![20],
        ),
    ];
    for (name, query, expected) in cases {
        assert_eq!(times(&store, &query), expected, "{name}");
    }
    for (name, query) in [
        ("bad cause", ResetQuery { causes: strings(&["forged"]), ..q() }),
        ("bad flag", ResetQuery { flags: strings(&["RX"]), ..q() }),
    ] {
        assert!(matches!(store.resets(&query), Err(StoreError::Invalid(_))), "{name}");
    }
}

#[test]
fn last_limit_and_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = filter_fixture(&dir);
    let q = ResetQuery::default;
    let cases: Vec<(&str, ResetQuery, Vec<i64>)> = vec![
        ("last 2, oldest first", ResetQuery { last: Some(2), ..q() }, vec![40, 50]),
        ("last more than stored", ResetQuery { last: Some(100), ..q() }, vec![10, 15, 20, 30, 40, 50]),
        ("last 0", ResetQuery { last: Some(0), ..q() }, vec![]),
        ("last with filter", ResetQuery { last: Some(1), flags: vec!["RA".into()], ..q() }, vec![30]),
        ("last with until", ResetQuery { last: Some(2), until_ns: Some(ns(30)), ..q() }, vec![15, 20]),
        ("limit", ResetQuery { limit: Some(2), ..q() }, vec![10, 15]),
        ("last capped by limit", ResetQuery { last: Some(3), limit: Some(1), ..q() }, vec![50]),
    ];
    for (name, query, expected) in cases {
        assert_eq!(times(&store, &query), expected, "{name}");
    }
    // Paging with the cursor visits everything once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.resets(&ResetQuery { limit: Some(4), after, ..q() }).expect("page");
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        seen.extend(page.iter().map(|r| (r.event.ts_ns - T0_NS) / 1_000_000));
    }
    assert_eq!(seen, [10, 15, 20, 30, 40, 50]);
}

#[test]
fn connection_gathers_every_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = filter_fixture(&dir);
    store.append_batch("alpha", "1", &batch(2, vec![flow(60, "10.0.0.2:80 > 10.0.0.1:1000")]), 0).expect("append");
    let view = store.connection(&flow_key("10.0.0.1:1000 > 10.0.0.2:80")).expect("connection");
    let flows: Vec<(&str, i64)> =
        view.flows.iter().map(|(a, f)| (a.as_str(), (f.end_ns - T0_NS) / 1_000_000)).collect();
    assert_eq!(flows, [("beta", 45), ("alpha", 60)]);
    let resets: Vec<(&str, i64)> =
        view.resets.iter().map(|r| (r.agent.as_str(), (r.event.ts_ns - T0_NS) / 1_000_000)).collect();
    assert_eq!(resets, [("alpha", 10), ("beta", 15)]);
    assert_eq!(view.resets[0].event.evidence[0].name, "ttl-mismatch", "the event comes back whole");
    // Another port of the same hosts is another connection.
    let other = store.connection(&flow_key("10.0.0.1:1001 > 10.0.0.2:80")).expect("connection");
    assert_eq!(other, ConnectionView::default());
}

#[test]
fn agent_records_track_watermarks_losses_and_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store.hello(&hello("a", "boot"), ns(1)).expect("hello");
    let b1 = vec![watermark(100), loss(5, 2, 1), rst(50, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone), watermark(90)];
    let b2 = vec![loss(1, 0, 3), flow(120, "10.0.0.1:1 > 10.0.0.2:2"), watermark(150)];
    store.append_batch("a", "boot", &batch(1, b1), ns(2)).expect("append");
    store.append_batch("a", "boot", &batch(2, b2), ns(3)).expect("append");
    // An agent that never said hello still gets a record.
    store.append_batch("b", "x", &batch(1, vec![watermark(7)]), ns(4)).expect("append");
    let agents = store.agents().expect("agents");
    let expected = vec![
        AgentRecord {
            name: "a".into(),
            host_name: "a.example".into(),
            software_version: "0.1.0".into(),
            boot_id: "boot".into(),
            first_seen_ns: ns(1),
            last_seen_ns: ns(3),
            watermark_ns: ns(150),
            watermark_since_ns: 0,
            events: 2,
            capture_drops: 8,
            events_dropped: 4,
            durable_seq: 2,
            local_addresses: vec!["10.0.0.1".parse().expect("ip")],
        },
        AgentRecord {
            name: "b".into(),
            boot_id: "x".into(),
            first_seen_ns: ns(4),
            last_seen_ns: ns(4),
            watermark_ns: ns(7),
            durable_seq: 1,
            ..Default::default()
        },
    ];
    assert_eq!(agents, expected);
    let status = store.status().expect("status");
    assert_eq!((status.resets, status.flows, status.agents), (1, 1, 2));
    assert!(status.bytes > 0);
}

#[test]
fn invalid_events_reject_the_whole_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let good = rst(1, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone);
    let mut bad_ip = rst(2, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone);
    if let Some(Kind::Reset(r)) = &mut bad_ip.kind {
        r.src = Some(v1::Endpoint { ip: vec![1, 2, 3], port: 1 });
    }
    let mut bad_port = flow(3, "10.0.0.1:1 > 10.0.0.2:2");
    if let Some(Kind::Flow(f)) = &mut bad_port.kind {
        f.resp = Some(v1::Endpoint { ip: vec![10, 0, 0, 2], port: 70_000 });
    }
    let mut missing = rst(4, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone);
    if let Some(Kind::Reset(r)) = &mut missing.kind {
        r.dst = None;
    }
    for bad in [bad_ip, bad_port, missing, v1::Event { kind: None }] {
        let result = store.append_batch("a", "b", &batch(1, vec![good.clone(), bad]), 0);
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    }
    assert_eq!(store.status().expect("status").resets, 0);
    assert_eq!(
        store.append_batch("a", "b", &batch(1, vec![good]), 0).expect("append"),
        Appended::Stored { durable_seq: 1 }
    );
    let mut bad_hello = hello("a", "b");
    bad_hello.local_addresses = vec![vec![1]];
    assert!(matches!(store.hello(&bad_hello, 0), Err(StoreError::Invalid(_))));
}

#[test]
fn corrupt_values_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = filter_fixture(&dir);
    let mut garbage_header = StoreSeq { ts_ns: ns(12), agent_id: 1, id: 9 };
    let resets = store.tree(keys::KIND_RESET);
    let not_a_value = garbage_header.to_bytes();
    garbage_header.id = 10;
    let mut bad_body = vec![0u8; 40];
    bad_body[0] = 1; // valid version, all-zero flow key, then an undecodable body
    bad_body.extend_from_slice(&[0xff, 0xff, 0xff]);
    let records = vec![(not_a_value, &b"not a value"[..]), (garbage_header.to_bytes(), &bad_body[..])];
    resets.write(77, 1, records, &[]).expect("write");
    // Not a chunk at all.
    resets.raw().insert(&b"\xffshort key"[..], &b""[..]).expect("insert");
    assert_eq!(times(&store, &ResetQuery::default()), [10, 15, 20, 30, 40, 50]);
    assert_eq!(store.status().expect("status").corrupt_skipped, 3);
}

#[test]
fn retention_by_age_keeps_the_index_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path());
    config.retention = Duration::from_millis(25);
    let store = Store::open(config).expect("open");
    filter_fixture_into(&store);
    // now = 50 ms: everything before 25 ms goes (resets 10, 15, 20), the flow at 45 stays.
    let report = store.enforce_retention(ns(50)).expect("retention");
    assert_eq!((report.resets_removed, report.flows_removed, report.removed_by_age), (3, 0, 3));
    assert_eq!(times(&store, &ResetQuery::default()), [30, 40, 50]);
    let view = store.connection(&flow_key("10.0.0.1:1000 > 10.0.0.2:80")).expect("connection");
    assert_eq!((view.flows.len(), view.resets.len()), (1, 0));
    assert_consistent(&store);
    // Running again removes nothing. Age counts back from the newest stored event, not the wall
    // clock, so a late `now` alone does not empty a store of replayed captures...
    assert_eq!(store.enforce_retention(ns(50)).expect("retention").removed_by_age, 0);
    assert_eq!(store.enforce_retention(ns(1000)).expect("retention").removed_by_age, 0);
    // ...but newer data does push the old out.
    store
        .append_batch("alpha", "1", &batch(2, vec![rst(1000, "10.0.0.9:1 > 10.0.0.8:2", "R", Cause::Lone)]), 0)
        .expect("append");
    let report = store.enforce_retention(ns(1000)).expect("retention");
    assert_eq!((report.resets_removed, report.flows_removed), (3, 1));
    assert_consistent(&store);
    assert_eq!(times(&store, &ResetQuery::default()), [1000]);
}

/// The filter fixture's batches, into an already open store.
fn filter_fixture_into(store: &Store) {
    let a = vec![
        rst(10, "10.0.0.1:1000 > 10.0.0.2:80", "R", Cause::Refused),
        rst(20, "10.0.0.1:1001 > 192.168.1.5:443", "RA", Cause::AppAbort),
        rst(30, "[2001:db8::1]:5000 > [2001:db8::2]:22", "RA", Cause::Middlebox),
        rst(50, "192.168.1.5:443 > 10.0.0.1:1002", "R", Cause::Unspecified),
    ];
    let b = vec![
        rst(15, "10.0.0.2:80 > 10.0.0.1:1000", "RA", Cause::Refused),
        rst(40, "172.16.0.9:8080 > 10.0.0.3:3333", "RPA", Cause::Lone),
        flow(45, "10.0.0.1:1000 > 10.0.0.2:80"),
    ];
    store.append_batch("alpha", "1", &batch(1, a), 0).expect("append alpha");
    store.append_batch("beta", "1", &batch(1, b), 0).expect("append beta");
}

#[test]
fn retention_by_size_removes_the_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path());
    config.max_bytes = 1;
    let store = Store::open(config).expect("open");
    filter_fixture_into(&store);
    let report = store.enforce_retention(ns(0)).expect("retention");
    assert_eq!(report.removed_by_age, 0);
    assert_eq!(report.removed_by_size, 7, "over by everything: all of it goes, oldest first");
    assert_consistent(&store);
}

#[test]
fn many_batches_with_retries_store_each_event_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    // Three agents interleave 40 batches of 25 events each; every batch is sent, then resent,
    // and every fifth batch is first sent too early (a gap). Times interleave across agents.
    let agents = ["a", "b", "c"];
    let mut expected = Vec::new();
    for seq in 1..=40u64 {
        for (n, agent) in agents.iter().enumerate() {
            let events: Vec<v1::Event> = (0..25)
                .map(|i| {
                    let ms = (seq as i64 * 25 + i) * 3 + n as i64;
                    expected.push(ms);
                    let path = format!("10.{n}.0.1:{} > 10.9.9.9:443", 1000 + i);
                    if i % 5 == 0 {
                        flow(ms, &path)
                    } else {
                        rst(ms, &path, "RA", Cause::AppAbort)
                    }
                })
                .collect();
            if seq % 5 == 0 {
                let early = store.append_batch(agent, "boot", &batch(seq + 1, events.clone()), 0).expect("gap");
                assert_eq!(early, Appended::Gap { durable_seq: seq - 1 });
            }
            let b = batch(seq, events);
            assert_eq!(
                store.append_batch(agent, "boot", &b, 0).expect("append"),
                Appended::Stored { durable_seq: seq }
            );
            assert_eq!(
                store.append_batch(agent, "boot", &b, 0).expect("resend"),
                Appended::Duplicate { durable_seq: seq }
            );
        }
    }
    let (flows, resets): (Vec<i64>, Vec<i64>) = expected.iter().partition(|ms| (**ms / 3 % 25) % 5 == 0);
    let mut resets = resets;
    resets.sort_unstable();
    assert_eq!(times(&store, &ResetQuery::default()), resets, "every reset once, in time order");
    assert_eq!(store.status().expect("status").flows, flows.len() as u64);
    assert_consistent(&store);
}

#[test]
fn vocabularies() {
    assert_eq!(flag_letters(0x14), "RA");
    assert_eq!(flag_letters(0x1ff), "SFRPAUECN");
    assert_eq!(parse_flag_letters("NCEUAPRFS").expect("all"), 0x1ff);
    assert_eq!(cause_name(Cause::DuplicateSynCancel as i32), "duplicate-syn-cancel");
    assert_eq!(cause_name(Cause::Unspecified as i32), "unknown");
    assert_eq!(cause_name(99), "unknown");
}

#[test]
fn followers_see_durable_resets_with_their_stored_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let mut follower = store.subscribe_resets();
    let events = vec![
        watermark(1),
        rst(30, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone),
        flow(5, "10.0.0.1:1 > 10.0.0.2:2"),
        rst(20, "10.0.0.3:1 > 10.0.0.2:2", "RA", Cause::AppAbort),
    ];
    store.append_batch("a", "b", &batch(1, events.clone()), 0).expect("append");
    // Duplicates and gaps publish nothing.
    store.append_batch("a", "b", &batch(1, events.clone()), 0).expect("append");
    store.append_batch("a", "b", &batch(5, events), 0).expect("append");
    let published = follower.try_recv().expect("one message");
    assert!(follower.try_recv().is_err(), "only the stored batch is published");
    let stored = store.resets(&ResetQuery::default()).expect("resets");
    assert_eq!(&published[..], &stored[..], "same records, same positions, time order");
    let q = ResetQuery { flags: vec!["RA".into()], ..ResetQuery::default() };
    let followed: Vec<i64> = published.iter().filter(|r| q.matches(r)).map(|r| r.event.ts_ns).collect();
    assert_eq!(followed, times(&store, &q).iter().map(|ms| ns(*ms)).collect::<Vec<_>>());
}

#[test]
fn matches_agrees_with_the_scan_for_every_filter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = filter_fixture(&dir);
    let all = store.resets(&ResetQuery::default()).expect("all");
    let net = |s: &str| s.parse::<ipnet::IpNet>().expect("net");
    let queries = [
        ResetQuery { since_ns: Some(ns(15)), until_ns: Some(ns(40)), ..ResetQuery::default() },
        ResetQuery { hosts: vec![net("192.168.0.0/16"), net("2001:db8::/32")], ..ResetQuery::default() },
        ResetQuery { ports: vec![80], agents: vec!["beta".into()], ..ResetQuery::default() },
        ResetQuery {
            causes: vec!["unknown".into(), "lone".into()],
            flags: vec!["R".into(), "APR".into()],
            ..ResetQuery::default()
        },
        ResetQuery { after: Some(all[2].seq), ..ResetQuery::default() },
    ];
    for q in queries {
        let filtered: Vec<_> = all.iter().filter(|r| q.matches(r)).cloned().collect();
        assert_eq!(filtered, store.resets(&q).expect("scan"), "{q:?}");
    }
}

/// Set in the child process of [`acknowledged_batches_survive_kill_9`]: the store directory.
const CHILD_DIR_ENV: &str = "RSTSCOPE_STORE_TEST_CHILD_DIR";
const KILL_TEST: &str = "store::tests::acknowledged_batches_survive_kill_9";

/// The parent runs this very test again as a child process that appends batches and prints
/// each acknowledgement, kills it with SIGKILL mid-stream, and checks that every acknowledged
/// batch (and nothing half-written) is there after reopening.
#[test]
fn acknowledged_batches_survive_kill_9() {
    use std::io::{BufRead, Write};
    let events = |seq: u64| -> Vec<v1::Event> {
        (0..50).map(|i| rst(seq as i64 * 100 + i, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone)).collect()
    };
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        let store = Store::open(StoreConfig::new(dir)).expect("child open");
        let mut stdout = std::io::stdout();
        for seq in 1.. {
            let outcome = store.append_batch("a", "boot", &batch(seq, events(seq)), 0).expect("child append");
            assert_eq!(outcome, Appended::Stored { durable_seq: seq });
            writeln!(stdout, "acked {seq}").and_then(|()| stdout.flush()).expect("child stdout");
        }
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", KILL_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked = 0u64;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("read child");
        if let Some(n) = line.strip_prefix("acked ") {
            acked = n.parse().expect("seq");
            if acked >= 30 {
                break;
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap child");
    assert!(acked >= 30, "child stopped early after {acked} batches");

    let store = open(&dir);
    let durable = store.hello(&hello("a", "boot"), 0).expect("hello");
    assert!(durable >= acked, "acknowledged {acked}, durable {durable}");
    // The batch after the durable one may be partly written (trees are written one after
    // the other, the session last): never less than the durable batches, and counted exactly.
    let status = store.status().expect("status");
    assert!(
        (durable * 50..=(durable + 1) * 50).contains(&status.resets),
        "{} resets, durable {durable}",
        status.resets
    );
    assert_eq!(store.resets(&ResetQuery::default()).expect("resets").len() as u64, status.resets);
    assert_consistent(&store);
    // The agent resends it: stored once.
    let next = durable + 1;
    assert_eq!(
        store.append_batch("a", "boot", &batch(next, events(next)), 0).expect("resend"),
        Appended::Stored { durable_seq: next }
    );
    assert_eq!(store.status().expect("status").resets, next * 50);
    assert_consistent(&store);
}

#[test]
fn a_damaged_agent_record_does_not_block_ingest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store.inner.agents.insert("a", &b"{not json"[..]).expect("insert");
    let events = vec![rst(1, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone)];
    assert_eq!(
        store.append_batch("a", "b", &batch(1, events), 0).expect("append"),
        Appended::Stored { durable_seq: 1 }
    );
    assert_eq!(store.agents().expect("agents")[0].events, 1);
    assert_eq!(store.hello(&hello("a", "b"), 0).expect("hello"), 1);
    assert!(store.status().expect("status").corrupt_skipped >= 1);
}

fn open_event(start_ms: i64, path: &str, conn_id: u64) -> v1::Event {
    let (orig, resp) = pair(path);
    let open = v1::ConnectionOpen {
        conn_id,
        orig: Some(orig),
        resp: Some(resp),
        start_ns: ns(start_ms),
        syn_ns: Some(ns(start_ms)),
        synack_ns: Some(ns(start_ms) + 300_000),
        orig_isn: Some(1000),
        resp_isn: Some(9000),
        syn_options: "M1460,S,T,N,W7".into(),
        orig_ttl: 64,
        resp_ttl: 57,
        ..Default::default()
    };
    v1::Event { kind: Some(Kind::Open(open)) }
}

fn loss_between(from_ms: i64, until_ms: i64, capture: u64) -> v1::Event {
    v1::Event {
        kind: Some(Kind::Loss(v1::CaptureLoss {
            from_ns: ns(from_ms),
            until_ns: ns(until_ms),
            capture_dropped: capture,
            reason: "libpcap drops".into(),
            ..Default::default()
        })),
    }
}

fn mark(ms: i64, since_ms: i64) -> v1::Event {
    v1::Event {
        kind: Some(Kind::Watermark(v1::Watermark {
            ts_ns: ns(ms),
            since_ns: ns(since_ms),
            ended: false,
            ..Default::default()
        })),
    }
}

/// A one-letter description of a replayed event and its time in ms, e.g. `("a", 'R', 10)`.
fn describe(agent: &str, event: &v1::Event) -> (String, char, i64) {
    let (letter, ts) = match &event.kind {
        Some(Kind::Reset(r)) => ('R', r.ts_ns),
        Some(Kind::Flow(f)) => ('F', f.end_ns),
        Some(Kind::Open(o)) => ('O', o.start_ns),
        Some(Kind::Loss(l)) => ('L', l.until_ns),
        _ => ('?', 0),
    };
    (agent.to_string(), letter, (ts - T0_NS) / 1_000_000)
}

#[test]
fn opens_losses_and_watermarks_are_stored_and_replayed_in_time_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let a = vec![
        open_event(5, "10.0.0.1:1000 > 10.0.0.2:80", 1),
        rst(10, "10.0.0.2:80 > 10.0.0.1:1000", "RA", Cause::AppAbort),
        loss_between(2, 12, 7),
        flow(20, "10.0.0.1:1000 > 10.0.0.2:80"),
        mark(30, 1),
    ];
    let b = vec![
        open_event(6, "10.0.0.1:1000 > 10.0.0.2:80", 77),
        rst(11, "10.0.0.2:80 > 10.0.0.1:1000", "RA", Cause::AppAbort),
        mark(25, 3),
    ];
    store.append_batch("a", "boot", &batch(1, a.clone()), 0).expect("append a");
    store.append_batch("b", "boot", &batch(1, b), 0).expect("append b");
    // Sent again in a new batch: nothing new, losses not summed twice.
    store.append_batch("a", "boot", &batch(2, a), 0).expect("append a again");

    let replayed: Vec<(String, char, i64)> = store
        .events_since(ns(0))
        .map(|item| item.map(|(agent, event)| describe(&agent, &event)))
        .collect::<Result<_, _>>()
        .expect("replay");
    let expected = [("a", 'O', 5), ("b", 'O', 6), ("a", 'R', 10), ("b", 'R', 11), ("a", 'L', 12), ("a", 'F', 20)];
    let expected: Vec<(String, char, i64)> = expected.iter().map(|(a, k, t)| (a.to_string(), *k, *t)).collect();
    assert_eq!(replayed, expected);
    // Events in time order: O5 O6 R10 R11 L12 F20 (watermarks are not events).
    assert_eq!(open(&tempfile::tempdir().expect("tempdir")).newest_events_from(3).expect("empty"), None);
    for (n, from_ms, older) in [(1, 20, true), (3, 11, true), (5, 6, true), (6, 5, false), (100, 5, false)] {
        let found = store.newest_events_from(n).expect("newest");
        assert_eq!(found, Some((ns(from_ms), older)), "the newest {n}");
        assert_eq!(store.events_since(ns(from_ms)).count(), n.min(6), "events_since reads them back");
    }
    let later: Vec<char> = store
        .events_since(ns(11))
        .map(|item| item.map(|(agent, event)| describe(&agent, &event).1).expect("item"))
        .collect();
    assert_eq!(later, ['R', 'L', 'F']);

    let view = store.connection(&flow_key("10.0.0.2:80 > 10.0.0.1:1000")).expect("connection");
    let opens: Vec<(&str, u64)> = view.opens.iter().map(|(agent, o)| (agent.as_str(), o.conn_id)).collect();
    assert_eq!(opens, [("a", 1), ("b", 77)]);
    assert_eq!((view.flows.len(), view.resets.len()), (1, 2));
    let by_time: Vec<u64> = store.opens(ns(6), ns(100)).expect("opens").iter().map(|(_, o)| o.conn_id).collect();
    assert_eq!(by_time, [77]);
    let losses = store.losses(ns(0), ns(100)).expect("losses");
    assert_eq!(losses.len(), 1);
    assert_eq!((losses[0].0.as_str(), losses[0].1.from_ns, losses[0].1.capture_dropped), ("a", ns(2), 7));

    let agents = store.agents().expect("agents");
    let summary: Vec<(&str, u64, u64, i64, i64)> = agents
        .iter()
        .map(|r| (r.name.as_str(), r.events, r.capture_drops, r.watermark_ns, r.watermark_since_ns))
        .collect();
    assert_eq!(summary, [("a", 3, 7, ns(30), ns(1)), ("b", 2, 0, ns(25), ns(3))]);
    let sessions: Vec<(String, u64, i64, i64)> = store
        .sessions()
        .expect("sessions")
        .into_iter()
        .map(|s| (s.agent, s.durable_seq, s.watermark_ns, s.since_ns))
        .collect();
    assert_eq!(sessions, [("a".to_string(), 2, ns(30), ns(1)), ("b".to_string(), 1, ns(25), ns(3))]);
    let status = store.status().expect("status");
    assert_eq!((status.resets, status.flows, status.opens, status.losses), (2, 1, 2, 1));
    assert_consistent(&store);
    drop(store);
    let store = open(&dir);
    assert_consistent(&store);
    assert_eq!(store.agents().expect("agents")[0].capture_drops, 7, "tallies survive reopening");
}

#[test]
fn a_batch_interrupted_before_its_session_step_is_stored_once_when_resent() {
    // The state a crash between the record trees and the session leaves: records and their
    // tallies written, the session still at the batch before.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let events = vec![
        rst(1, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone),
        flow(2, "10.0.0.1:1 > 10.0.0.2:2"),
        open_event(0, "10.0.0.1:1 > 10.0.0.2:2", 5),
        loss_between(0, 3, 2),
    ];
    store.append_batch("a", "boot", &batch(1, events.clone()), 0).expect("append");
    let key = keys::session_key("a", "boot");
    let mut session = keys::SessionValue::from_bytes(&store.inner.sessions.get(&key).expect("get").expect("session"))
        .expect("session value");
    session.durable_seq = 0;
    store.inner.sessions.insert(key, &session.to_bytes()[..]).expect("rewind");
    drop(store);
    let store = open(&dir);
    assert_eq!(store.hello(&hello("a", "boot"), 0).expect("hello"), 0, "the batch is not acknowledged");
    assert_eq!(
        store.append_batch("a", "boot", &batch(1, events), 0).expect("resend"),
        Appended::Stored { durable_seq: 1 }
    );
    let status = store.status().expect("status");
    assert_eq!((status.resets, status.flows, status.opens, status.losses), (1, 1, 1, 1));
    assert_eq!(store.agents().expect("agents")[0].capture_drops, 2);
    assert_consistent(&store);
}

#[test]
fn concurrent_writers_share_flushes_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    std::thread::scope(|scope| {
        for agent in 0..4 {
            let store = store.clone();
            scope.spawn(move || {
                for seq in 1..=20u64 {
                    let events: Vec<v1::Event> = (0..10)
                        .map(|i| {
                            let path = format!("10.{agent}.0.1:{} > 10.9.9.9:443", 1000 + i);
                            rst(seq as i64 * 10 + i, &path, "R", Cause::Lone)
                        })
                        .collect();
                    let name = format!("agent-{agent}");
                    let pending = store.write_batch(&name, "boot", &batch(seq, events), 0).expect("write");
                    assert_eq!(store.make_durable(pending).expect("durable"), Appended::Stored { durable_seq: seq });
                }
            });
        }
    });
    assert_eq!(store.status().expect("status").resets, 4 * 20 * 10);
    assert_consistent(&store);
}

#[test]
fn retention_covers_openings_and_losses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path());
    config.retention = Duration::from_millis(25);
    let store = Store::open(config).expect("open");
    let events = vec![
        open_event(1, "10.0.0.1:1 > 10.0.0.2:2", 1),
        loss_between(0, 2, 4),
        loss_between(20, 40, 6),
        open_event(30, "10.0.0.1:3 > 10.0.0.2:2", 2),
        rst(50, "10.0.0.1:3 > 10.0.0.2:2", "R", Cause::Lone),
    ];
    store.append_batch("a", "boot", &batch(1, events), 0).expect("append");
    let report = store.enforce_retention(ns(50)).expect("retention");
    assert_eq!((report.opens_removed, report.losses_removed, report.removed_by_age), (1, 1, 2));
    assert_eq!(store.agents().expect("agents")[0].capture_drops, 6, "the removed loss no longer counts");
    assert_consistent(&store);
}

#[test]
fn meta_values_survive_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    assert_eq!(store.meta("decided_until").expect("meta"), None);
    store.set_meta("decided_until", &42i64.to_be_bytes()).expect("set");
    store.set_meta("decided_until", &43i64.to_be_bytes()).expect("set again");
    store.flush().expect("flush");
    drop(store);
    let store = open(&dir);
    assert_eq!(store.meta("decided_until").expect("meta"), Some(43i64.to_be_bytes().to_vec()));
    // Names never clash with the store's own meta keys.
    assert_eq!(store.meta("size_cap_records").expect("meta"), None);
}

/// A merged report: `(agent, "src > dst")` per observation.
fn report(id: &str, ms: i64, verdict: &str, cause: &str, flags: &str, seen: &[(&str, &str)]) -> v1::ResetReport {
    let observations = seen
        .iter()
        .map(|(agent, path)| {
            let (src, dst) = pair(path);
            v1::Observation {
                agent: agent.to_string(),
                ts_ns: ns(ms),
                corrected_ns: ns(ms),
                src: Some(src),
                dst: Some(dst),
                flags: u32::from(parse_flag_letters(flags).expect("flags")),
                ..Default::default()
            }
        })
        .collect();
    v1::ResetReport {
        id: id.to_string(),
        ts_ns: ns(ms),
        verdict: verdict.to_string(),
        cause: cause.to_string(),
        flags: u32::from(parse_flag_letters(flags).expect("flags")),
        observations,
        ..Default::default()
    }
}

fn report_fixture(store: &Store) {
    store.put_reports(&fixture_reports()).expect("put");
}

/// Each report with its own time as where it is stored: a report decided again unchanged.
fn at_own_time(reports: &[v1::ResetReport]) -> impl Iterator<Item = (&v1::ResetReport, &[i64])> {
    reports.iter().map(|r| (r, std::slice::from_ref(&r.ts_ns)))
}

fn fixture_reports() -> Vec<v1::ResetReport> {
    vec![
        report(
            "r1",
            10,
            "end-to-end",
            "refused",
            "RA",
            &[("alpha", "10.0.0.2:80 > 10.0.0.1:1000"), ("beta", "10.0.0.2:80 > 10.0.0.1:1000")],
        ),
        // NAT: beta sees the client behind 192.168.1.5.
        report(
            "r2",
            20,
            "injected",
            "middlebox",
            "R",
            &[("alpha", "10.0.0.9:443 > 10.0.0.1:1001"), ("beta", "10.0.0.9:443 > 192.168.1.5:2001")],
        ),
        report("r3", 30, "pending", "", "R", &[("gamma", "[2001:db8::2]:22 > [2001:db8::1]:5000")]),
        // 15 s later: another bucket.
        report("r4", 15_000, "lost", "app-abort", "RA", &[("beta", "172.16.0.9:8080 > 10.0.0.3:3333")]),
        report("r5", 25_000, "end-to-end", "app-abort", "RPA", &[("alpha", "10.0.0.1:1002 > 10.0.0.2:80")]),
    ]
}

/// Ids of the reports a query returns, in returned order.
fn report_ids(store: &Store, q: &ResetQuery) -> Vec<String> {
    store.reports(q).expect("reports").into_iter().map(|r| r.id).collect()
}

#[test]
fn every_report_filter_selects_what_it_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    report_fixture(&store);
    let net = |s: &str| s.parse::<ipnet::IpNet>().expect("net");
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let q = ResetQuery::default;
    let cases: Vec<(&str, ResetQuery, &[&str])> = vec![
        ("everything", q(), &["r1", "r2", "r3", "r4", "r5"]),
        ("since inclusive", ResetQuery { since_ns: Some(ns(20)), ..q() }, &["r2", "r3", "r4", "r5"]),
        ("until exclusive, inside a bucket", ResetQuery { until_ns: Some(ns(30)), ..q() }, &["r1", "r2"]),
        (
            "window across buckets",
            ResetQuery { since_ns: Some(ns(25)), until_ns: Some(ns(20_000)), ..q() },
            &["r3", "r4"],
        ),
        ("host on any observation (NAT)", ResetQuery { hosts: vec![net("192.168.0.0/16")], ..q() }, &["r2"]),
        ("host exact", ResetQuery { hosts: vec![net("10.0.0.2/32")], ..q() }, &["r1", "r5"]),
        ("host v6", ResetQuery { hosts: vec![net("2001:db8::/32")], ..q() }, &["r3"]),
        ("port either end", ResetQuery { ports: vec![80], ..q() }, &["r1", "r5"]),
        ("port seen by one agent only", ResetQuery { ports: vec![2001], ..q() }, &["r2"]),
        ("agent on any observation", ResetQuery { agents: strings(&["beta"]), ..q() }, &["r1", "r2", "r4"]),
        ("unknown agent", ResetQuery { agents: strings(&["delta"]), ..q() }, &[]),
        ("verdict", ResetQuery { verdicts: strings(&["end-to-end"]), ..q() }, &["r1", "r5"]),
        ("verdicts any of", ResetQuery { verdicts: strings(&["injected", "lost"]), ..q() }, &["r2", "r4"]),
        ("cause", ResetQuery { causes: strings(&["app-abort"]), ..q() }, &["r4", "r5"]),
        ("no cause reads as unknown", ResetQuery { causes: strings(&["unknown"]), ..q() }, &["r3"]),
        ("flags exact", ResetQuery { flags: strings(&["ar"]), ..q() }, &["r1", "r4"]),
        ("last 2", ResetQuery { last: Some(2), ..q() }, &["r4", "r5"]),
        ("last with filter", ResetQuery { last: Some(1), flags: strings(&["R"]), ..q() }, &["r3"]),
        ("limit", ResetQuery { limit: Some(2), ..q() }, &["r1", "r2"]),
        (
            "combined",
            ResetQuery { agents: strings(&["alpha"]), verdicts: strings(&["end-to-end"]), ports: vec![1002], ..q() },
            &["r5"],
        ),
    ];
    for (name, query, expected) in cases {
        assert_eq!(report_ids(&store, &query), expected, "{name}");
    }
    for (name, query) in [
        ("bad cause", ResetQuery { causes: strings(&["forged"]), ..q() }),
        ("bad flag", ResetQuery { flags: strings(&["RX"]), ..q() }),
        ("raw cursor", ResetQuery { after: Some(StoreSeq::default()), ..q() }),
    ] {
        assert!(matches!(store.reports(&query), Err(StoreError::Invalid(_))), "{name}");
    }
}

#[test]
fn reports_are_replaced_by_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    report_fixture(&store);
    store.put_decided(at_own_time(&fixture_reports())).expect("put");
    assert_eq!(store.status().expect("status").reports, 5, "putting again changes nothing");
    // A decision: r3 becomes injected; r1 moves to another time (a better clock estimate).
    let decided = report("r3", 30, "injected", "middlebox", "R", &[("gamma", "[2001:db8::2]:22 > [2001:db8::1]:5000")]);
    let moved = report("r1", 40_000, "end-to-end", "refused", "RA", &[("alpha", "10.0.0.2:80 > 10.0.0.1:1000")]);
    store.put_decided([(&decided, &[ns(30)][..]), (&moved, &[ns(10)][..])]).expect("put");
    let q = ResetQuery::default;
    assert_eq!(report_ids(&store, &q()), ["r2", "r3", "r4", "r5", "r1"]);
    assert_eq!(report_ids(&store, &ResetQuery { verdicts: vec!["injected".into()], ..q() }), ["r2", "r3"]);
    assert_eq!(report_ids(&store, &ResetQuery { verdicts: vec!["pending".into()], ..q() }), Vec::<String>::new());
    assert_eq!(report_ids(&store, &ResetQuery { agents: vec!["beta".into()], ..q() }), ["r2", "r4"]);
    assert_eq!(store.report("r1", ns(40_000)).expect("report").map(|r| r.ts_ns), Some(ns(40_000)));
    assert_eq!(store.report("r1", ns(10)).expect("report"), None, "moved away");
    assert_eq!(store.report("nope", ns(10)).expect("report"), None);
    assert_eq!(store.status().expect("status").reports, 5);
    assert!(matches!(store.put_reports(&[report("", 1, "lost", "", "R", &[])]), Err(StoreError::Invalid(_))));
    // Reports age out like records.
    drop(store);
    let mut config = StoreConfig::new(dir.path());
    config.retention = Duration::from_secs(20);
    let store = Store::open(config).expect("open");
    assert_eq!(store.status().expect("status").reports, 5, "the count survives reopening");
    store
        .append_batch("a", "boot", &batch(1, vec![rst(40_000, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone)]), 0)
        .expect("append");
    let report = store.enforce_retention(ns(40_000)).expect("retention");
    assert_eq!(report.reports_removed, 3);
    assert_eq!(report_ids(&store, &q()), ["r5", "r1"]);
    assert_eq!(store.report("r2", ns(20)).expect("report"), None);
}

#[test]
fn a_report_left_under_two_times_by_a_crash_is_listed_once_after_it_is_put_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let seen = [("alpha", "10.0.0.2:80 > 10.0.0.1:1000")];
    // A move interrupted between its two buckets: the new time written, the old key not
    // removed (as `put_decided` with no times does).
    store.put_reports(&[report("r1", 10, "lost", "refused", "RA", &seen)]).expect("put");
    store.put_reports(&[report("r1", 15_000, "end-to-end", "refused", "RA", &seen)]).expect("put");
    drop(store);
    let store = open(&dir);
    assert_eq!(report_ids(&store, &ResetQuery::default()), ["r1", "r1"], "the leftover of the crash");
    // After the restart the replay reads both times and names them when it decides it again.
    let times: Vec<i64> = store.stored_report_times(0).expect("times").into_iter().map(|(_, ts)| ts).collect();
    assert_eq!(times, [ns(10), ns(15_000)]);
    let again = report("r1", 30_000, "end-to-end", "refused", "RA", &seen);
    store.put_decided([(&again, times.as_slice())]).expect("put");
    let listed: Vec<(String, i64)> =
        store.reports(&ResetQuery::default()).expect("reports").into_iter().map(|r| (r.id, r.ts_ns)).collect();
    assert_eq!(listed, [("r1".to_string(), ns(30_000))]);
    assert_eq!(store.status().expect("status").reports, 1);
}

/// `n` reports 1 ms apart from `first_ms`, ids `p00000…`, every third one injected.
fn many_reports(first_ms: i64, n: usize) -> Vec<v1::ResetReport> {
    (0..n)
        .map(|i| {
            let verdict = if i % 3 == 0 { "injected" } else { "end-to-end" };
            let path = format!("10.0.{}.{}:{} > 10.1.0.1:443", i / 250, i % 250, 1000 + i);
            report(&format!("p{i:05}"), first_ms + i as i64, verdict, "refused", "RA", &[("alpha", path.as_str())])
        })
        .collect()
}

#[test]
fn a_bucket_of_many_reports_spans_pages_and_stays_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    // 5,000 reports within one 10-s bucket: well over one 32-kB page.
    store.put_reports(&many_reports(1_000, 5_000)).expect("put");
    let pages = store.inner.reports.pages.range(keys::FIRST_RECORD_KEY..).count();
    assert!(pages > 3, "{pages} pages");
    let q = || ResetQuery { since_ns: Some(0), ..Default::default() };
    let all = report_ids(&store, &q());
    assert_eq!(all.len(), 5_000);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "oldest first");
    let injected = report_ids(&store, &ResetQuery { verdicts: vec!["injected".into()], ..q() });
    assert_eq!(injected.len(), 1_667);
    assert_eq!(report_ids(&store, &ResetQuery { last: Some(2), ..q() }), ["p04998", "p04999"]);
    assert_eq!(report_ids(&store, &ResetQuery { last: Some(1), verdicts: vec!["injected".into()], ..q() }), ["p04998"]);
    assert_eq!(report_ids(&store, &ResetQuery { hosts: vec!["10.0.19.0/24".parse().expect("net")], ..q() }).len(), 250);
    assert_eq!(store.report("p02500", ns(3_500)).expect("report").map(|r| r.verdict), Some("end-to-end".to_string()));

    // One decided again (same bucket), one moved to the next bucket: still 5,000, no duplicate.
    let mut redecided = many_reports(1_000, 5_000).swap_remove(2_500);
    redecided.verdict = "lost".into();
    let mut moved = many_reports(1_000, 5_000).swap_remove(10);
    moved.ts_ns = ns(12_000);
    store.put_decided([(&redecided, &[ns(3_500)][..]), (&moved, &[ns(1_010)][..])]).expect("put");
    assert_eq!(store.status().expect("status").reports, 5_000);
    let all = report_ids(&store, &q());
    assert_eq!(all.len(), 5_000);
    assert_eq!(all.last().map(String::as_str), Some("p00010"));
    assert_eq!(report_ids(&store, &ResetQuery { verdicts: vec!["lost".into()], ..q() }), ["p02500"]);
    assert_eq!(store.report("p00010", ns(12_000)).expect("report").map(|r| r.ts_ns), Some(ns(12_000)));

    // Retention inside the bucket: reports before 3.5 s go, pages shrink.
    drop(store);
    let mut config = StoreConfig::new(dir.path());
    config.retention = Duration::from_secs(10);
    let store = Store::open(config).expect("open");
    store
        .append_batch("a", "boot", &batch(1, vec![rst(13_500, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone)]), 0)
        .expect("append");
    let removed = store.enforce_retention(ns(13_500)).expect("retention").reports_removed;
    assert_eq!(removed, 2_499, "1.000 s up to 3.499 s, less p00010 which moved");
    assert_eq!(store.status().expect("status").reports, 5_000 - 2_499);
    assert_eq!(report_ids(&store, &q()).first().map(String::as_str), Some("p02500"));
    assert_eq!(store.report("p00011", ns(1_011)).expect("report"), None);
    let pages_after = store.inner.reports.pages.range(keys::FIRST_RECORD_KEY..).count();
    assert!(pages_after < pages, "{pages_after} pages of {pages}");
}

#[test]
fn a_store_with_one_value_per_report_is_moved_into_pages_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    report_fixture(&store);
    drop(store);
    // Rebuild the layout of earlier versions: reports in a `reports` tree (version byte and
    // the encoded report under the report key, the count under the total key), no pages.
    {
        let db = open_sled(&sled_config(dir.path())).expect("sled");
        let pages = db.open_tree("report_pages").expect("tree");
        let old = db.open_tree("reports").expect("tree");
        for item in pages.range(keys::FIRST_RECORD_KEY..) {
            let (_, page) = item.expect("page");
            for (key, body) in reports::page_records_of(&page) {
                old.insert(key, [&[1u8][..], body].concat()).expect("insert");
            }
        }
        old.insert(keys::TALLY_TOTAL_KEY, &5u64.to_be_bytes()[..]).expect("insert");
        db.drop_tree("report_pages").expect("drop");
        db.flush().expect("flush");
    }
    let store = open(&dir);
    assert_eq!(store.status().expect("status").reports, 5);
    assert_eq!(report_ids(&store, &ResetQuery::default()), ["r1", "r2", "r3", "r4", "r5"]);
    assert!(!store.inner.db.tree_names().iter().any(|n| n.as_ref() == b"reports"));
}

#[test]
fn a_store_with_the_report_id_map_of_earlier_versions_drops_it_on_open_and_lists_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    report_fixture(&store);
    drop(store);
    // Earlier versions kept `report_ids` (id → time); one pointing elsewhere is never read.
    {
        let db = open_sled(&sled_config(dir.path())).expect("sled");
        let ids = db.open_tree("report_ids").expect("tree");
        ids.insert("r1", &ns(10).to_be_bytes()[..]).expect("insert");
        ids.insert("r2", &ns(99_000).to_be_bytes()[..]).expect("insert");
        db.flush().expect("flush");
    }
    let store = open(&dir);
    assert!(!store.inner.db.tree_names().iter().any(|n| n.as_ref() == b"report_ids"), "the old map is gone");
    assert_eq!(report_ids(&store, &ResetQuery::default()), ["r1", "r2", "r3", "r4", "r5"]);
    assert_eq!(store.status().expect("status").reports, 5);
    let mut times = store.stored_report_times(ns(20)).expect("times");
    times.sort();
    let want: Vec<(String, i64)> = [("r2", 20), ("r3", 30), ("r4", 15_000), ("r5", 25_000)]
        .iter()
        .map(|(id, ms)| (id.to_string(), ns(*ms)))
        .collect();
    assert_eq!(times, want, "stored times from 20 ms on");
}

#[test]
fn a_store_with_one_index_key_per_entry_gets_its_connection_index_rebuilt_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = filter_fixture(&dir);
    let before = store.connection(&flow_key("10.0.0.1:1000 > 10.0.0.2:80")).expect("connection");
    assert!(!before.resets.is_empty() && !before.flows.is_empty());
    drop(store);
    // The layout of earlier versions: a `conn` tree with one key per entry, and no runs or log.
    {
        let db = open_sled(&sled_config(dir.path())).expect("sled");
        let legacy = db.open_tree("conn").expect("tree");
        legacy.insert([0u8; keys::CONN_KEY_LEN], &[][..]).expect("insert");
        db.drop_tree("conn_runs").expect("drop");
        db.drop_tree("conn_log").expect("drop");
        db.flush().expect("flush");
    }
    let store = open(&dir);
    assert!(!store.inner.db.tree_names().iter().any(|n| n.as_ref() == b"conn"), "the old tree is gone");
    let after = store.connection(&flow_key("10.0.0.1:1000 > 10.0.0.2:80")).expect("connection");
    assert_eq!(after, before);
    assert_consistent(&store);
}

#[test]
fn connection_look_ups_agree_before_and_after_the_index_moves_to_runs_and_the_store_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    // 40 batches of 5 events over 3 hours: many runs (the test memtable holds 7 entries).
    let conns = ["10.0.0.1:1000 > 10.0.0.2:80", "10.0.0.3:1001 > 10.0.0.2:80", "10.0.0.4:1002 > 10.0.0.2:443"];
    for seq in 1..=40u64 {
        let events = (0..5)
            .map(|i| {
                let t = (seq as i64 * 5 + i) * 270_000; // ms: 3 hours in all
                let conn = conns[((seq as i64 + i) % 3) as usize];
                if i % 2 == 0 {
                    rst(t, conn, "R", Cause::Lone)
                } else {
                    flow(t, conn)
                }
            })
            .collect();
        store
            .append_batch(if seq % 2 == 0 { "a" } else { "b" }, "boot", &batch(seq / 2 + seq % 2, events), 0)
            .expect("append");
    }
    let views = |store: &Store| conns.map(|c| store.connection(&flow_key(c)).expect("connection"));
    let first = views(&store);
    let total: usize = first.iter().map(|v| v.resets.len() + v.flows.len()).sum();
    assert_eq!(total, 200, "every event is found under its connection");
    assert_consistent(&store);
    drop(store);
    let store = open(&dir);
    assert_eq!(views(&store), first, "after reopening (memtable rebuilt from the log)");
}

#[test]
fn a_store_with_one_key_per_record_is_moved_into_chunks_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = filter_fixture(&dir);
    let before = times(&store, &ResetQuery::default());
    let view = store.connection(&flow_key("10.0.0.1:1000 > 10.0.0.2:80")).expect("connection");
    // The layout of earlier versions: every record under its own record key.
    for kind in KINDS {
        let tree = store.tree(kind);
        let records: Vec<_> = tree.range(keys::FIRST_RECORD_KEY.to_vec()..).map(|r| r.expect("record")).collect();
        let chunks: Vec<_> = tree.raw().range(keys::FIRST_RECORD_KEY..).map(|r| r.expect("chunk").0).collect();
        for chunk in chunks {
            tree.raw().remove(chunk).expect("remove");
        }
        for (k, v) in records {
            tree.raw().insert(k, v).expect("insert");
        }
        // Nor did earlier versions mark a tree as chunked.
        tree.raw().remove([0x00, b'c']).expect("remove");
    }
    drop(store);
    let store = open(&dir);
    for kind in KINDS {
        let keys: Vec<_> = store.tree(kind).raw().range(keys::FIRST_RECORD_KEY..).map(|r| r.expect("key").0).collect();
        assert!(
            keys.iter().all(|k| k.len() == records::CHUNK_KEY_LEN),
            "only chunks left in {}",
            TREE_NAMES[usize::from(kind)]
        );
    }
    assert_eq!(times(&store, &ResetQuery::default()), before);
    assert_eq!(store.connection(&flow_key("10.0.0.1:1000 > 10.0.0.2:80")).expect("connection"), view);
    assert_consistent(&store);
}

// ---------------------------------------------------------------------------------------------
// Reports put call by call: appended pages and runs (the append-only `put_reports`).
// ---------------------------------------------------------------------------------------------

use std::collections::{BTreeMap, HashMap};

/// A small deterministic generator for the call-by-call tests.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Values of `report_buckets` per bucket start (a base and its runs).
fn bucket_values_per_bucket(store: &Store) -> BTreeMap<Vec<u8>, usize> {
    let mut out: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for key in store.inner.reports.buckets.iter().keys() {
        *out.entry(key.expect("key")[..8].to_vec()).or_default() += 1;
    }
    out
}

/// Checks the listing, filters, look-ups and count against `model` (time, id) → report.
fn assert_reports_are(store: &Store, model: &BTreeMap<(i64, String), v1::ResetReport>, when: &str) {
    let q = ResetQuery::default;
    let expected: Vec<String> = model.keys().map(|(_, id)| id.clone()).collect();
    assert_eq!(report_ids(store, &q()), expected, "{when}: listing");
    let listed = store.reports(&q()).expect("reports");
    assert!(listed.iter().zip(model.values()).all(|(a, b)| a == b), "{when}: stored reports differ");
    let lost: Vec<String> = model.iter().filter(|(_, r)| r.verdict == "lost").map(|((_, id), _)| id.clone()).collect();
    assert_eq!(report_ids(store, &ResetQuery { verdicts: vec!["lost".into()], ..q() }), lost, "{when}: verdict");
    let last: Vec<String> = expected.iter().rev().take(3).rev().cloned().collect();
    assert_eq!(report_ids(store, &ResetQuery { last: Some(3), ..q() }), last, "{when}: last 3");
    let first: Vec<String> = expected.iter().take(4).cloned().collect();
    assert_eq!(report_ids(store, &ResetQuery { limit: Some(4), ..q() }), first, "{when}: limit 4");
    let listing = store.report_listing(&q()).expect("listing");
    let encoded: Vec<EncodedReport> =
        listing.buckets().flat_map(|bucket| store.read_listed(bucket).expect("read")).collect();
    assert_eq!(encoded.len(), model.len(), "{when}: encoded");
    assert_eq!(store.status().expect("status").reports, model.len() as u64, "{when}: count");
    for ((ts, id), report) in model.iter().step_by(37) {
        assert_eq!(store.report(id, *ts).expect("report").as_ref(), Some(report), "{when}: {id} at {ts}");
    }
}

#[test]
fn reports_put_call_by_call_list_exactly_as_put() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let mut dice = Dice(7);
    let mut model: BTreeMap<(i64, String), v1::ResetReport> = BTreeMap::new();
    let mut at: HashMap<String, i64> = HashMap::new();
    let verdicts = ["end-to-end", "injected", "lost", "unverified"];
    let mut next_id = 0usize;
    for call in 0..300 {
        let mut put: Vec<v1::ResetReport> = Vec::new();
        // Mostly new reports in time order (three buckets), some decided again, some moved.
        for _ in 0..dice.below(40) {
            let ms = (next_id as i64) * 7;
            let path =
                format!("10.0.{}.{}:{} > 10.1.0.1:443", next_id / 250 % 250, next_id % 250, 1000 + next_id % 60_000);
            put.push(report(&format!("q{next_id:06}"), ms, "end-to-end", "refused", "RA", &[("alpha", path.as_str())]));
            next_id += 1;
        }
        for _ in 0..dice.below(4) {
            let Some(((ts, id), old)) = model.iter().nth(dice.below(model.len().max(1) as u64) as usize) else { break };
            let mut again = old.clone();
            again.verdict = verdicts[dice.below(4) as usize].to_string();
            match dice.below(3) {
                0 => again.ts_ns = ts + 1_000_000 * dice.below(25_000) as i64 - 5_000_000_000,
                1 => again.ts_ns = ts + 1,
                _ => {}
            }
            again.ts_ns = again.ts_ns.max(0);
            let _ = id;
            put.push(again);
        }
        // Where each is stored before its item: the first item of an id names the stored time,
        // a later one the earlier item's (as the correlation hands them out).
        let mut current = at.clone();
        let stored_at: Vec<Vec<i64>> =
            put.iter().map(|r| current.insert(r.id.clone(), r.ts_ns).into_iter().collect()).collect();
        store.put_decided(put.iter().zip(&stored_at).map(|(r, at)| (r, at.as_slice()))).expect("put");
        for r in put {
            if let Some(old_ts) = at.insert(r.id.clone(), r.ts_ns) {
                model.remove(&(old_ts, r.id.clone()));
            }
            model.insert((r.ts_ns, r.id.clone()), r);
        }
        if call % 50 == 49 {
            assert_reports_are(&store, &model, &format!("after call {call}"));
            // Runs are merged as they come: a few values per bucket, not one per call.
            let most = bucket_values_per_bucket(&store).into_values().max().unwrap_or(0);
            assert!(most <= 12, "{most} values in one bucket after {call} calls");
        }
    }
    assert!(model.len() > 4_000, "{} reports", model.len());
    // Pages are filled, not one per call.
    let pages = store.inner.reports.pages.range(keys::FIRST_RECORD_KEY..).count();
    let bytes: usize =
        store.inner.reports.pages.range(keys::FIRST_RECORD_KEY..).values().map(|v| v.expect("page").len()).sum();
    assert!(pages <= bytes / (32 * 1024) + 6 * 4, "{pages} pages for {bytes} bytes");

    // Reopened: the same; then retention cuts exactly at its time, inside a bucket.
    drop(store);
    let mut config = StoreConfig::new(dir.path());
    config.retention = Duration::from_secs(10);
    let store = Store::open(config).expect("open");
    assert_reports_are(&store, &model, "reopened");
    let newest = model.keys().next_back().map(|(ts, _)| *ts).expect("reports");
    store
        .append_batch(
            "a",
            "boot",
            &batch(1, vec![rst((newest - T0_NS) / 1_000_000, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone)]),
            0,
        )
        .expect("append");
    let cutoff = newest - 10_000_000_000;
    let expected_gone = model.keys().filter(|(ts, _)| *ts < cutoff).count() as u64;
    let removed = store.enforce_retention(newest).expect("retention").reports_removed;
    model.retain(|(ts, _), _| *ts >= cutoff);
    assert_eq!(removed, expected_gone);
    assert_reports_are(&store, &model, "after retention");
}

#[test]
fn reports_decided_again_and_again_do_not_grow_the_pages_without_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let reports = many_reports(1_000, 2_000);
    store.put_reports(&reports).expect("put");
    let page_bytes = |store: &Store| -> usize {
        store.inner.reports.pages.range(keys::FIRST_RECORD_KEY..).values().map(|v| v.expect("page").len()).sum()
    };
    let once = page_bytes(&store);
    // The same 20 reports decided again in 500 calls: 10,000 records superseded.
    for call in 0..500 {
        let again: Vec<v1::ResetReport> = reports[..20]
            .iter()
            .map(|r| v1::ResetReport { verdict: if call % 2 == 0 { "lost" } else { "injected" }.into(), ..r.clone() })
            .collect();
        store.put_decided(at_own_time(&again)).expect("put");
    }
    assert!(page_bytes(&store) < 2 * once + 64 * 1024, "{} bytes of pages, {once} at first", page_bytes(&store));
    let q = || ResetQuery { since_ns: Some(0), ..Default::default() };
    assert_eq!(report_ids(&store, &q()).len(), 2_000);
    assert_eq!(report_ids(&store, &ResetQuery { verdicts: vec!["injected".into()], ..q() }).len(), 20 + 667 - 7);
    assert_eq!(store.status().expect("status").reports, 2_000);
}

#[test]
fn a_store_created_with_sleds_default_segment_size_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Earlier versions created their databases with sled's default configuration.
    drop(open_sled(&sled::Config::new().path(dir.path())).expect("sled"));
    let store = open(&dir);
    store
        .append_batch("a", "boot", &batch(1, vec![rst(10, "10.0.0.1:1 > 10.0.0.2:2", "R", Cause::Lone)]), 0)
        .expect("append");
    assert_eq!(times(&store, &ResetQuery::default()), [10]);
    drop(store);
    assert_eq!(times(&open(&dir), &ResetQuery::default()), [10], "and again after a restart");
}
