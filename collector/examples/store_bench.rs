//! Store throughput and query latency.
//!
//! `cargo run --release -p rstscope-collector --example store_bench -- [EVENTS] [DIR]`
//!
//! Appends EVENTS (default 1M) events from 4 agents in batches of 1000, each batch durable
//! (fsync) before the next, as the ingest service does; then times queries whose `since` covers
//! the newest 1 % of the time span. With DIR the database is kept, and a second run appends
//! after what is there (to reach 10M in steps). With `STORE_BENCH_MAX_BYTES=N` it finally runs
//! the size retention against that limit and reports what it removed and how long it took.
//! `STORE_BENCH_CACHE_MIB=N` sets sled's cache capacity (default 1024).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use rstscope_collector::store::{ResetQuery, Store, StoreConfig};
use rstscope_proto::v1::{self, event::Kind};
use rstscope_proto::{Endpoint, FlowKey};

const BATCH: usize = 1000;
const AGENTS: usize = 4;
const STEP_NS: i64 = 100_000;

fn endpoint(ip: Ipv4Addr, port: u16) -> v1::Endpoint {
    v1::Endpoint { ip: ip.octets().to_vec(), port: u32::from(port) }
}

/// The i-th event: 9 resets for every flow, hosts spread over 10.0.0.0/16.
fn event(i: u64, ts_ns: i64) -> v1::Event {
    let client = Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8);
    let server = Ipv4Addr::new(192, 0, 2, (i % 7) as u8);
    let (src, dst) = (endpoint(client, 1024 + (i % 50_000) as u16), endpoint(server, [80, 443, 22][(i % 3) as usize]));
    if i % 10 == 9 {
        let flow = v1::FlowSummary {
            conn_id: i,
            orig: Some(src),
            resp: Some(dst),
            start_ns: ts_ns - 1_000_000,
            end_ns: ts_ns,
            conn_state: "RSTO".into(),
            history: "ShADadR".into(),
            ..Default::default()
        };
        return v1::Event { kind: Some(Kind::Flow(flow)) };
    }
    let rst = v1::RstEvent {
        ts_ns,
        src: Some(src),
        dst: Some(dst),
        conn_id: i,
        sender: 1,
        flags: if i & 1 == 0 { 0x04 } else { 0x14 },
        seq: i as u32,
        ack: (i * 7) as u32,
        ttl: 64,
        ip_id: Some(i as u32 & 0xffff),
        checksum: 1,
        phase: 4,
        history: "ShADad".into(),
        orig_pkts: 10,
        orig_bytes: 1000,
        resp_pkts: 8,
        resp_bytes: 20_000,
        seq_relation: 1,
        cause: (i % 10) as i32 + 1,
        evidence: vec![v1::Evidence { name: "retransmissions-before".into(), detail: "3 retransmissions".into() }],
        ip_header_ok: true,
        ..Default::default()
    };
    v1::Event { kind: Some(Kind::Reset(rst)) }
}

fn time<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    println!("{what:<55} {:>9.2} ms", start.elapsed().as_secs_f64() * 1e3);
    out
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let events: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1_000_000);
    let temp;
    let dir = match args.next() {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            temp = tempfile::tempdir_in(".")?;
            temp.path().to_path_buf()
        }
    };
    let mut config = StoreConfig::new(&dir);
    let max_bytes: Option<u64> = std::env::var("STORE_BENCH_MAX_BYTES").ok().map(|v| v.parse()).transpose()?;
    if let Some(max) = max_bytes {
        config.max_bytes = max;
    }
    if let Some(mib) = std::env::var("STORE_BENCH_CACHE_MIB").ok().map(|v| v.parse::<u64>()).transpose()? {
        config.cache_bytes = mib << 20;
    }
    let store = Store::open(config)?;
    let before = store.status()?;
    let start_ts = store
        .resets(&ResetQuery { last: Some(1), ..Default::default() })?
        .first()
        .map_or(1_700_000_000_000_000_000, |r| r.event.ts_ns + STEP_NS);
    let boot = format!("{}", std::process::id());
    let first = before.resets + before.flows;

    let mut latencies = Vec::new();
    let start = Instant::now();
    let mut seqs = [0u64; AGENTS];
    for b in 0..events.div_ceil(BATCH as u64) {
        let agent = (b as usize) % AGENTS;
        seqs[agent] += 1;
        let base = b * BATCH as u64;
        let n = (events - base).min(BATCH as u64);
        let batch = v1::Batch {
            seq: seqs[agent],
            events: (base..base + n).map(|i| event(first + i, start_ts + i as i64 * STEP_NS)).collect(),
            spooled_seq: 0,
        };
        let t = Instant::now();
        store.append_batch(&format!("agent-{agent}"), &boot, &batch, 0)?;
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let pct = |p: usize| latencies.get(latencies.len() * p / 100).copied().unwrap_or(Duration::ZERO);
    println!(
        "appended {events} events in {:.1} s: {:.0} events/s; per batch p50 {:.1} ms, p99 {:.1} ms",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3
    );
    let status = store.status()?;
    println!(
        "stored: {} resets, {} flows, {:.1} MiB on disk",
        status.resets,
        status.flows,
        status.bytes as f64 / 1048576.0
    );

    let total = first + events;
    let end_ts = start_ts + events as i64 * STEP_NS;
    let begin_ts = end_ts - total as i64 * STEP_NS;
    let since = end_ts - (end_ts - begin_ts) / 100;
    let q = || ResetQuery { since_ns: Some(since), ..Default::default() };
    for round in 0..2 {
        println!("-- queries over {total} events, since = newest 1% (round {round})");
        let n = time("since, no filter (decodes every match)", || store.resets(&q()))?.len();
        println!("    {n} resets");
        let n = time("since, host 10.0.1.0/24", || {
            store.resets(&ResetQuery { hosts: vec!["10.0.1.0/24".parse().expect("net")], ..q() })
        })?
        .len();
        println!("    {n} resets");
        let n = time("since, agent-1 + cause refused", || {
            store.resets(&ResetQuery { agents: vec!["agent-1".into()], causes: vec!["refused".into()], ..q() })
        })?
        .len();
        println!("    {n} resets");
        let n = time("since, port 22 + flags RA, limit 100", || {
            store.resets(&ResetQuery { ports: vec![22], flags: vec!["RA".into()], limit: Some(100), ..q() })
        })?
        .len();
        println!("    {n} resets");
        time("last 100, no since", || store.resets(&ResetQuery { last: Some(100), ..Default::default() }))?;
        let key = FlowKey::new(
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 1024 + 5),
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5)), 22),
        );
        let view = time("connection(10.0.0.5:1029-192.0.2.5:22)", || store.connection(&key))?;
        println!("    {} flows, {} resets", view.flows.len(), view.resets.len());
        time("status", || store.status())?;
    }
    if max_bytes.is_some() {
        let report = time("enforce_retention (size)", || store.enforce_retention(start_ts))?;
        println!("    {report:?}");
        let later = time("enforce_retention again", || store.enforce_retention(start_ts))?;
        println!("    {later:?}");
    }
    Ok(())
}
