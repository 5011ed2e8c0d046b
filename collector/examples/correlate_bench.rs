//! Correlation throughput: how many connections and RSTs per second the engine matches and
//! decides, and the memory it holds per connection.
//!
//! `cargo run --release -p rstscope-collector --example correlate_bench -- [CONNECTIONS]`
//!
//! Two agents (client side, server side, the server's clock 3.7 s behind) each report every
//! connection (open and flow summary); 10% end in a server abort both agents see, 1% in a RST
//! only the client sees (injected). Events are generated up front, so the timing covers only
//! the engine: ingest (matching, clock samples) and decide (clusters, places, verdicts).

use std::time::Instant;

use rstscope_collector::correlate::{Config, Correlator};
use rstscope_collector::pb;
use rstscope_proto::{v1, Endpoint};

const S: i64 = 1_000_000_000;
const MS: i64 = 1_000_000;
const T0: i64 = 1_700_000_000 * S;
const SKEW: i64 = -3_700 * MS;

fn ep(ip: [u8; 4], port: u16) -> Option<v1::Endpoint> {
    Some(pb::endpoint_to_pb(Endpoint::new(ip.into(), port)))
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let mut client_events = Vec::new();
    let mut server_events = Vec::new();
    let mut resets = 0u64;
    for i in 0..n {
        let start = T0 + (i as i64) * 200_000; // 5000 new connections per second
        let client = ep([198, 51, 100, (i % 250) as u8 + 1], 10_000 + (i % 50_000) as u16);
        let server = ep([203, 0, 113, 10], 443);
        let (isn_c, isn_s) = ((i as u32).wrapping_mul(2_654_435_761), (i as u32).wrapping_mul(40_503));
        for (at_client, out) in [(true, &mut client_events), (false, &mut server_events)] {
            let shift = if at_client { 0 } else { SKEW };
            let (syn, synack) =
                if at_client { (start, start + 10 * MS + MS) } else { (start + 5 * MS, start + 6 * MS) };
            out.push(v1::Event {
                kind: Some(v1::event::Kind::Open(v1::ConnectionOpen {
                    conn_id: i,
                    orig: client.clone(),
                    resp: server.clone(),
                    start_ns: syn + shift,
                    orig_isn: Some(isn_c),
                    resp_isn: Some(isn_s),
                    syn_ns: Some(syn + shift),
                    synack_ns: Some(synack + shift),
                    orig_ttl: if at_client { 64 } else { 61 },
                    resp_ttl: if at_client { 61 } else { 64 },
                    ..Default::default()
                })),
            });
            let kind = i % 100;
            if kind < 10 || (kind == 10 && at_client) {
                let ts = start + S + if at_client { 5 * MS } else { 0 } + shift;
                out.push(v1::Event {
                    kind: Some(v1::event::Kind::Reset(v1::RstEvent {
                        ts_ns: ts,
                        src: server.clone(),
                        dst: client.clone(),
                        conn_id: i,
                        sender: v1::Role::Responder as i32,
                        flags: 0x014,
                        seq: isn_s.wrapping_add(1000),
                        ack: isn_c.wrapping_add(1),
                        ttl: if at_client {
                            if kind == 10 {
                                50
                            } else {
                                61
                            }
                        } else {
                            64
                        },
                        cause: v1::Cause::AppAbort as i32,
                        ip_header_ok: true,
                        checksum: v1::Checksum::Good as i32,
                        ..Default::default()
                    })),
                });
                resets += 1;
            }
            out.push(v1::Event {
                kind: Some(v1::event::Kind::Flow(v1::FlowSummary {
                    conn_id: i,
                    orig: client.clone(),
                    resp: server.clone(),
                    start_ns: syn + shift,
                    end_ns: start + 2 * S + shift,
                    ..Default::default()
                })),
            });
            if i % 1000 == 999 {
                out.push(v1::Event {
                    kind: Some(v1::event::Kind::Watermark(v1::Watermark {
                        ts_ns: start + shift,
                        since_ns: T0 - S + shift,
                        ended: false,
                        ..Default::default()
                    })),
                });
            }
        }
    }
    let end = T0 + (n as i64) * 200_000 + 10 * S;
    for (out, shift) in [(&mut client_events, 0), (&mut server_events, SKEW)] {
        out.push(v1::Event {
            kind: Some(v1::event::Kind::Watermark(v1::Watermark {
                ts_ns: end + shift,
                since_ns: 0,
                ended: true,
                ..Default::default()
            })),
        });
    }
    let rss_before = peak_rss_kib();

    let began = Instant::now();
    let mut engine = Correlator::new(Config::default());
    let (c, s) = (engine.agent("client", &[]), engine.agent("server", &[]));
    let mut decided = Vec::new();
    // Interleave the two agents in chunks, deciding as a live collector would.
    for (a, b) in client_events.chunks(5000).zip(server_events.chunks(5000)) {
        for e in a {
            engine.ingest(c, e);
        }
        for e in b {
            engine.ingest(s, e);
        }
        decided.extend(engine.decide());
    }
    decided.extend(engine.finish());
    let took = began.elapsed().as_secs_f64();
    let rss_after = peak_rss_kib();

    let mut verdicts = std::collections::BTreeMap::new();
    for r in &decided {
        *verdicts.entry(r.verdict.clone()).or_insert(0u64) += 1;
    }
    println!("| measure | value |\n|---|---:|");
    println!("| connections (2 agents each) | {n} |");
    println!("| RST sightings | {resets} |");
    println!("| distinct RSTs decided | {} |", decided.len());
    let verdicts: Vec<String> = verdicts.iter().map(|(verdict, count)| format!("{count} {verdict}")).collect();
    println!("| verdicts | {} |", verdicts.join(", "));
    println!("| engine time | {took:.3} s |");
    println!("| connections/s | {:.0} |", n as f64 / took);
    println!("| RST sightings/s | {:.0} |", resets as f64 / took);
    println!(
        "| engine memory (peak RSS growth) | {:.1} MiB, {:.0} B per connection |",
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0,
        (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n as f64
    );
    let set = format!("server clock estimate (set to {:+.3} s)", SKEW as f64 / 1e9);
    match engine.clock_estimates()[s] {
        Some(clock) => println!(
            "| {set} | {:+.3} s ± {:.1} ms, drift {:.1} ppm, {} samples |",
            clock.offset_ns as f64 / 1e9,
            clock.uncertainty_ns as f64 / 1e6,
            clock.drift_ppm,
            clock.samples
        ),
        None => println!("| {set} | none |"),
    }
}
