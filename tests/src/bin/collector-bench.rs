//! Collector benchmark: durable ingest over gRPC, and query latency over a large store.
//!
//! `cargo run --release -p rstscope-tests --bin collector-bench -- [--agents 4] [--events 2000000]
//! [--batch 1000] [--window 16] [--query-events 10000000] [--runs 5] [--out FILE.md] [--smoke]`
//!
//! Every measurement that goes through gRPC talks to the real `rstscope-collector` binary of
//! this workspace (built in the same profile as this benchmark, next to it), started as its own
//! process on `127.0.0.1:<free port>` with a fresh `--data-dir` on disk, so the collector's CPU
//! and the benchmark's are told apart (both share the machine's cores).
//!
//! 1. **Ingest.** 1 and `--agents` concurrent agents, each a gRPC client speaking the ingest
//!    protocol itself (hello, welcome, numbered batches with up to `--window` unacknowledged,
//!    acks), send `--events` generated events in all (9 in 10 RST events with 1-3 evidence items,
//!    1 in 10 flow summaries; addresses in 203.0.113.0/24 and 2001:db8:1::/64 on the local side,
//!    198.51.100.0/24, 100.64.0.0/10 and 2001:db8::/32 remote). Every batch ends with a
//!    watermark (the agent vouches for its capture up to its last event), and with several
//!    agents neighbours share a handshake every few ms of event time, so the collector measures
//!    their clocks and decides RSTs as it goes: the figure includes correlation and the writing
//!    of reports, not only the storing of events. Reported: events/s and batches/s
//!    from the first send to the last ack, ack latency percentiles, and CPU per event of the
//!    collector process. Then (outside the clock) each agent ends its capture with a last
//!    watermark, and the benchmark waits until the newest RST sent is decided: reported are how
//!    long after the last ack that was, how many RSTs were decided, and the collector's CPU per
//!    event until then (the correlation may lag behind the acks: it decides on a timer). The events are generated before the clock starts.
//! 2. **Where the ingest time goes.** The same kind of batches, in-process: protobuf encode and
//!    decode, the ingest validation, and `Store::append_batch` on disk and on tmpfs (where fsync
//!    costs nothing, so the difference is the fsync).
//! 3. **Queries.** `--query-events` resets (plus one flow summary per ten) spread over 24 hours
//!    of event time ending now are written through `Store::append_batch` in big batches (the
//!    fill rate is reported), then the collector is started on that directory and timed through
//!    gRPC `ListResets` / `GetConnection` (median of `--runs`, first run reported separately:
//!    it is the cold one) and the `rstscope` CLI (one run each). The store alone, in-process and
//!    freshly reopened, is timed too, and a host filter that matches nothing times the range scan
//!    by itself: together they tell scan, decode and transport apart.
//!
//! Prints a markdown report and writes it to `--out`. Never fails on a missed target: the numbers
//! are for people to read. `--smoke` runs tiny sizes in seconds.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use prost::Message;
use rstscope_collector::ingest::check_batch;
use rstscope_collector::live::RESUME_META;
use rstscope_collector::query::check_filter;
use rstscope_collector::store::{ResetQuery, Store, StoreConfig};
use rstscope_proto::v1::{
    self, agent_message, collector_message, event::Kind, ingest_client::IngestClient, query_client::QueryClient,
    AgentMessage, Cause, Phase,
};
use rstscope_proto::{Endpoint, FlowKey};
use rstscope_tests::gen::SplitMix64;
use rstscope_tests::machine::{self, command_output, cpu_time, proc_field};
use tokio::sync::{mpsc, Barrier};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// rstscope collector benchmark.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Concurrent agents of the second ingest run (the first has one).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Events per ingest run, over all agents.
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Events per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Batches an agent may have sent but not yet seen acknowledged.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Resets in the store the queries run over (0 skips the query part).
    #[arg(long, default_value_t = 10_000_000)]
    query_events: u64,
    /// Hours of event time the stored resets are spread over (ending now).
    #[arg(long, default_value_t = 24)]
    span_hours: u64,
    /// Events per `append_batch` while filling the query store.
    #[arg(long, default_value_t = 5000)]
    fill_batch: usize,
    /// Repetitions of each query; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Batches of the in-process time breakdown (0 skips it).
    #[arg(long, default_value_t = 300)]
    breakdown_batches: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 0x5eed_c011)]
    seed: u64,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory for the databases (default: a new one under the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the databases.
    #[arg(long)]
    keep: bool,
    /// Keep the filled query store here, and reuse it when it already holds --query-events
    /// resets (skips the fill; `--since 1h` is then the newest hour of what it holds).
    #[arg(long)]
    query_store: Option<PathBuf>,
    /// Use this `rstscope-collector` (and the `rstscope` beside it) instead of building them.
    #[arg(long)]
    collector_bin: Option<PathBuf>,
    /// Only these parts, comma-separated, of ingest, breakdown, query.
    #[arg(long, default_value = "ingest,breakdown,query")]
    only: String,
    /// Write the decided reports of each ingest run here (extension `<agents>-agents`), sorted
    /// by id, to compare two versions' decisions byte for byte (the traffic then starts at a
    /// fixed time instead of an hour ago).
    #[arg(long)]
    dump_reports: Option<PathBuf>,
    /// Tiny sizes (20k events, 50k stored resets, 3 runs) that finish in seconds.
    #[arg(long)]
    smoke: bool,
}

// ---------------------------------------------------------------------------------------------
// Traffic: realistic RST events and flow summaries.
// ---------------------------------------------------------------------------------------------

/// The monitored network (where the agents sit) and the remote side.
const LOCAL_V4: [u8; 3] = [203, 0, 113];
const PARTNER_V4: [u8; 3] = [198, 51, 100];
/// Well-known server ports, most common first.
const SERVER_PORTS: [u16; 10] = [443, 443, 443, 80, 80, 22, 25, 5432, 3306, 8080];

fn pb_endpoint(ip: IpAddr, port: u16) -> v1::Endpoint {
    let ip = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    v1::Endpoint { ip, port: u32::from(port) }
}

/// Causes with their weights (of 100): what a busy edge sees.
const CAUSE_MIX: [(Cause, u64); 9] = [
    (Cause::AppAbort, 34),
    (Cause::Refused, 10),
    (Cause::NoConnection, 16),
    (Cause::RetransmissionTimeout, 9),
    (Cause::AfterClose, 12),
    (Cause::Lone, 8),
    (Cause::DuplicateSynCancel, 4),
    (Cause::PortReuse, 2),
    (Cause::Unknown, 5),
];

/// A random connection: a local end in the monitored network, a remote one elsewhere.
fn random_conn(rng: &mut SplitMix64) -> Conn {
    let v6 = rng.chance(0.12);
    let local_ip = if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, rng.range(1, 400) as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(LOCAL_V4[0], LOCAL_V4[1], LOCAL_V4[2], rng.range(1, 254) as u8))
    };
    let remote_ip = if v6 {
        let r = rng.next_u64();
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            (r >> 48) as u16 | 2,
            (r >> 32) as u16,
            0,
            0,
            (r >> 16) as u16,
            r as u16,
        ))
    } else if rng.chance(0.08) {
        // The partner network: the host filter of the query part selects it.
        IpAddr::V4(Ipv4Addr::new(PARTNER_V4[0], PARTNER_V4[1], PARTNER_V4[2], rng.range(1, 254) as u8))
    } else {
        // 100.64.0.0/10, standing in for the rest of the world.
        let r = rng.below(1 << 22) as u32;
        IpAddr::V4(Ipv4Addr::from(0x6440_0000 | r))
    };
    let local_is_server = rng.chance(0.7);
    let server_port = SERVER_PORTS[rng.below(SERVER_PORTS.len() as u64) as usize];
    let client_port = rng.range(32_768, 60_999) as u16;
    let (local_port, remote_port) =
        if local_is_server { (server_port, client_port) } else { (client_port, server_port) };
    Conn { local: (local_ip, local_port), remote: (remote_ip, remote_port), local_is_server }
}

/// Deterministic generator of one agent's events in time order.
struct Traffic {
    rng: SplitMix64,
    /// Time of the next event.
    ts_ns: i64,
    /// Mean gap between events.
    step_ns: i64,
    /// When the traffic began: every batch's watermark vouches from here.
    start_ns: i64,
    /// Handshakes this agent shares with its neighbours (several agents only).
    shared: Option<SharedHandshakes>,
}

/// Handshakes seen by two agents: without them the collector knows nothing of the agents'
/// clocks and waits out its largest assumed skew (10 s) before deciding any RST one agent saw
/// and another did not; with them it measures the offsets, as it does with real agents that
/// watch common traffic. Handshake `j` starts at `start_ns + (j + 1) * every_ns` and is seen by
/// agents `j % agents` (near the client) and `(j + 1) % agents`, so the agents form a ring of
/// measured pairs. Both derive its tuple and sequence numbers from `seed` and `j`.
struct SharedHandshakes {
    agent: usize,
    agents: usize,
    seed: u64,
    every_ns: i64,
    /// The next handshake not yet considered.
    next: u64,
}

impl SharedHandshakes {
    /// The next handshake this agent sees that started by `ts_ns`, and whether it is the
    /// agent near the client.
    fn due(&mut self, start_ns: i64, ts_ns: i64) -> Option<(u64, i64, bool)> {
        loop {
            let j = self.next;
            let t = start_ns + (j as i64 + 1) * self.every_ns;
            if t > ts_ns {
                return None;
            }
            self.next += 1;
            let near = (j % self.agents as u64) as usize;
            if near == self.agent {
                return Some((j, t, true));
            }
            if (near + 1) % self.agents == self.agent {
                return Some((j, t, false));
            }
        }
    }
}

/// One connection: the local and the remote end, and which of them is the server.
struct Conn {
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
    local_is_server: bool,
}

impl Traffic {
    fn new(seed: u64, start_ns: i64, step_ns: i64) -> Self {
        Traffic { rng: SplitMix64::new(seed), ts_ns: start_ns, step_ns: step_ns.max(1), start_ns, shared: None }
    }

    /// Agent `agent` of `agents` (more than one): it also reports the handshakes it shares with
    /// its two neighbours; one starts every `every_ns`, each pair in turn (see
    /// [`SharedHandshakes`]).
    fn sharing(mut self, seed: u64, agent: usize, agents: usize, every_ns: i64) -> Self {
        if agents > 1 {
            self.shared = Some(SharedHandshakes { agent, agents, seed, every_ns: every_ns.max(1), next: 0 });
        }
        self
    }

    fn conn(&mut self) -> Conn {
        random_conn(&mut self.rng)
    }

    fn cause(&mut self) -> Cause {
        let mut roll = self.rng.below(100);
        for (cause, weight) in CAUSE_MIX {
            if roll < weight {
                return cause;
            }
            roll -= weight;
        }
        Cause::Unknown
    }

    /// The next event: a flow summary one time in ten, otherwise a RST.
    fn next_event(&mut self) -> v1::Event {
        let jitter = self.rng.below(self.step_ns as u64 * 2) as i64;
        self.ts_ns += jitter.max(1);
        if let Some((j, t, near)) = self.shared.as_mut().and_then(|s| s.due(self.start_ns, self.ts_ns)) {
            return v1::Event { kind: Some(Kind::Open(self.shared_open(j, t, near))) };
        }
        if self.rng.below(10) == 0 {
            let conn = self.conn();
            v1::Event { kind: Some(Kind::Flow(self.flow(&conn, self.ts_ns))) }
        } else {
            let conn = self.conn();
            v1::Event { kind: Some(Kind::Reset(self.reset(&conn, self.ts_ns))) }
        }
    }

    /// This agent's opening of shared handshake `j`, which started at `t`: the agent near the
    /// client sees the SYN at `t`, the other a little later, and the SYN-ACK the other way round
    /// (clocks in step: the collector should measure offsets near 0).
    fn shared_open(&mut self, j: u64, t: i64, near: bool) -> v1::ConnectionOpen {
        let seed = self.shared.as_ref().map_or(0, |s| s.seed);
        let mut rng = SplitMix64::new(seed ^ (j + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let conn = random_conn(&mut rng);
        let (orig, resp) = if conn.local_is_server { (conn.remote, conn.local) } else { (conn.local, conn.remote) };
        let (orig_isn, resp_isn) = (rng.next_u64() as u32, rng.next_u64() as u32);
        let round_trip = i64::from(rng.range(500_000, 5_000_000));
        let hop = i64::from(rng.range(20_000, 200_000));
        let (syn, synack) = if near { (t, t + round_trip) } else { (t + hop, t + round_trip - hop) };
        v1::ConnectionOpen {
            conn_id: self.rng.next_u64(),
            orig: Some(pb_endpoint(orig.0, orig.1)),
            resp: Some(pb_endpoint(resp.0, resp.1)),
            start_ns: syn,
            orig_isn: Some(orig_isn),
            resp_isn: Some(resp_isn),
            syn_ns: Some(syn),
            synack_ns: Some(synack),
            syn_options: "M1460,S,T,N,W7".into(),
            orig_ttl: if near { 64 } else { 61 },
            resp_ttl: if near { 57 } else { 60 },
            ..Default::default()
        }
    }

    fn reset(&mut self, conn: &Conn, ts_ns: i64) -> v1::RstEvent {
        let cause = self.cause();
        let rng = &mut self.rng;
        let (server, client) = if conn.local_is_server { (conn.local, conn.remote) } else { (conn.remote, conn.local) };
        // Refused and duplicate-SYN resets come from the server; the rest from either end.
        let from_server = matches!(cause, Cause::Refused) || rng.chance(0.55);
        let (src, dst) = if from_server { (server, client) } else { (client, server) };
        let sender = if from_server { v1::Role::Responder } else { v1::Role::Originator };
        let v4 = src.0.is_ipv4();
        let ttl_base = [64u32, 128, 255][rng.below(3) as usize];
        let ttl = ttl_base - rng.range(2, 20);
        let (orig_pkts, resp_pkts) = (u64::from(rng.log_range(1, 5000)), u64::from(rng.log_range(0, 8000)));
        let (phase, history, evidence): (Phase, &str, Vec<(&str, String)>) = match cause {
            Cause::Refused => {
                (Phase::SynSent, "S", vec![("answers-syn", format!("SYN {} ms before", rng.range(0, 3)))])
            }
            Cause::DuplicateSynCancel => (
                Phase::SynReceived,
                "Sh",
                vec![
                    ("racing-syn", format!("another SYN {} us earlier", rng.range(10, 900))),
                    ("cancelled-after-syn-ack", "RST right after the SYN-ACK".to_string()),
                ],
            ),
            Cause::RetransmissionTimeout => {
                let n = rng.range(3, 15);
                (
                    Phase::Established,
                    "ShADadTT",
                    vec![("retransmissions-before", format!("{n} retransmissions without an ACK"))],
                )
            }
            Cause::AppAbort => (
                Phase::Established,
                "ShADad",
                vec![
                    ("in-sequence", "seq is the next expected".to_string()),
                    ("after-peer-data", format!("{} bytes from the peer unacknowledged", rng.log_range(1, 65_535))),
                ],
            ),
            Cause::NoConnection => (
                Phase::Midstream,
                "Ad",
                vec![("answers-segment", format!("answers a {}-byte segment", rng.log_range(0, 1448)))],
            ),
            Cause::PortReuse => {
                (Phase::Closing, "ShADadFfS", vec![("tuple-reused", "new SYN in TIME_WAIT".to_string())])
            }
            Cause::AfterClose => {
                (Phase::Closing, "ShADadFf", vec![("fin-both-directions", "FIN seen both ways".to_string())])
            }
            Cause::Lone => (Phase::None, "", vec![("no-other-packet", "nothing else of the connection".to_string())]),
            _ => (Phase::Established, "ShAD", vec![("later-packets", format!("{} packets after it", rng.range(1, 9)))]),
        };
        let mut evidence: Vec<v1::Evidence> =
            evidence.into_iter().map(|(name, detail)| v1::Evidence { name: name.into(), detail }).collect();
        let mut ttl_delta = Some(0);
        if rng.chance(0.06) {
            let delta = rng.range(3, 40) as i32;
            ttl_delta = Some(-delta);
            evidence.push(v1::Evidence {
                name: "ttl-mismatch".into(),
                detail: format!("TTL {} against {} in the sender's earlier packets", ttl, ttl + delta as u32),
            });
        }
        evidence.truncate(3);
        let answers = matches!(cause, Cause::Refused | Cause::NoConnection).then(|| v1::AnsweredPacket {
            ts_ns: ts_ns - i64::from(rng.range(20_000, 3_000_000)),
            flags: if cause == Cause::Refused { 0x002 } else { 0x018 },
            seq: rng.next_u64() as u32,
            ack: rng.next_u64() as u32,
            payload_len: if cause == Cause::Refused { 0 } else { rng.log_range(1, 1448) },
        });
        v1::RstEvent {
            ts_ns,
            src: Some(pb_endpoint(src.0, src.1)),
            dst: Some(pb_endpoint(dst.0, dst.1)),
            conn_id: rng.next_u64(),
            sender: sender as i32,
            flags: if rng.chance(0.6) { 0x014 } else { 0x004 },
            payload_len: 0,
            seq: rng.next_u64() as u32,
            ack: rng.next_u64() as u32,
            window: if rng.chance(0.7) { 0 } else { rng.range(1, 65_535) },
            ttl,
            ip_id: v4.then(|| rng.range(0, 65_535)),
            checksum: v1::Checksum::Good as i32,
            phase: phase as i32,
            history: history.to_string(),
            orig_pkts,
            orig_bytes: orig_pkts * u64::from(rng.range(0, 1400)),
            resp_pkts,
            resp_bytes: resp_pkts * u64::from(rng.range(0, 1400)),
            peer_retransmissions: rng.log_range(0, 5),
            sender_retransmissions: if cause == Cause::RetransmissionTimeout { rng.range(3, 15) } else { 0 },
            since_peer_last_ns: Some(i64::from(rng.log_range(10, 2_000_000_000))),
            seq_relation: [v1::SeqRelation::Exact, v1::SeqRelation::InWindow, v1::SeqRelation::Unknown]
                [rng.below(3) as usize] as i32,
            ttl_delta,
            ip_id_delta: v4.then(|| rng.range(1, 40) as i32),
            answers,
            cause: cause as i32,
            evidence,
            ip_header_ok: true,
        }
    }

    fn flow(&mut self, conn: &Conn, end_ns: i64) -> v1::FlowSummary {
        let rng = &mut self.rng;
        let (orig, resp) = if conn.local_is_server { (conn.remote, conn.local) } else { (conn.local, conn.remote) };
        let (state, history) =
            [("RSTO", "ShADadR"), ("RSTR", "ShADadr"), ("REJ", "Sr"), ("SF", "ShADadFf"), ("S0", "S")]
                [rng.below(5) as usize];
        let direction = |rng: &mut SplitMix64| {
            let pkts = u64::from(rng.log_range(1, 5000));
            let ttl = 64 - rng.range(1, 12);
            v1::DirectionSummary {
                pkts,
                payload_bytes: pkts * u64::from(rng.range(0, 1400)),
                zeek_bytes: pkts * u64::from(rng.range(0, 1400)),
                retransmissions: rng.log_range(0, 20),
                rsts: rng.range(0, 1),
                zero_windows: 0,
                ttl: Some(v1::TtlRange { first: ttl, last: ttl, min: ttl, max: ttl }),
            }
        };
        let (orig_dir, resp_dir) = (direction(rng), direction(rng));
        v1::FlowSummary {
            conn_id: rng.next_u64(),
            orig: Some(pb_endpoint(orig.0, orig.1)),
            resp: Some(pb_endpoint(resp.0, resp.1)),
            start_ns: end_ns - i64::from(rng.log_range(1_000, 2_000_000_000)) * 10,
            end_ns,
            conn_state: state.into(),
            history: history.into(),
            orig_dir: Some(orig_dir),
            resp_dir: Some(resp_dir),
            port_reuse: false,
            end: v1::FlowEnd::Closed as i32,
        }
    }

    /// `n` events as batches of `size`, numbered from 1, each followed by a watermark: the
    /// agent vouches for its capture from the start of its traffic to its last event, as a real
    /// agent does, so the collector can decide RSTs other agents did not see.
    fn batches(&mut self, n: u64, size: usize) -> Vec<v1::Batch> {
        let mut out = Vec::new();
        let mut left = n;
        while left > 0 {
            let k = left.min(size as u64);
            let mut events: Vec<v1::Event> = (0..k).map(|_| self.next_event()).collect();
            let mark = v1::Watermark { ts_ns: self.ts_ns, since_ns: self.start_ns, ..Default::default() };
            events.push(v1::Event { kind: Some(Kind::Watermark(mark)) });
            out.push(v1::Batch { seq: out.len() as u64 + 1, events, spooled_seq: 0 });
            left -= k;
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Processes, clocks, numbers.
// ---------------------------------------------------------------------------------------------

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The `p`-th percentile (0..=100) of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `rstscope-collector` and `rstscope`, built in this benchmark's profile unless given.
fn collector_binaries(args: &Args) -> Result<(PathBuf, PathBuf)> {
    if let Some(bin) = &args.collector_bin {
        return Ok((bin.clone(), bin.with_file_name("rstscope")));
    }
    let me = std::env::current_exe().context("locating this benchmark")?;
    let collector = me.with_file_name("rstscope-collector");
    let profile_dir = me.parent().context("benchmark in <target>/<profile>")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut build = rstscope_tests::build::cargo_build(profile_dir, &["-q", "-p", "rstscope-collector", "--bins"]);
    // Always asked, so that the collector measured is the one in the working tree; a no-op
    // when it is up to date.
    eprintln!("building rstscope-collector ({profile})");
    let status = build.status();
    if !matches!(status, Ok(s) if s.success()) && !collector.is_file() {
        bail!("cannot build rstscope-collector ({status:?}); pass --collector-bin");
    }
    Ok((collector.clone(), collector.with_file_name("rstscope")))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `rstscope-collector` process, killed when dropped (acknowledged batches are durable).
struct Collector {
    child: Child,
    url: String,
    log: PathBuf,
    /// From spawn until it accepted a connection.
    ready_after: Duration,
}

impl Collector {
    fn start(exe: &Path, data_dir: &Path, max_batch: usize) -> Result<Collector> {
        let port = free_port()?;
        let log = data_dir.with_extension("log");
        let stderr = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let start = Instant::now();
        let child = Command::new(exe)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--max-batch-events", &max_batch.max(5000).to_string()])
            // Nothing may be removed while we measure.
            .args(["--max-store-gib", "10000", "--retention", "3650d"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut collector =
            Collector { child, url: format!("http://127.0.0.1:{port}"), log, ready_after: Duration::ZERO };
        let deadline = start + Duration::from_secs(600);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = collector.child.try_wait()? {
                bail!("the collector exited ({status}): {}", collector.log_tail());
            }
            ensure!(Instant::now() < deadline, "the collector did not listen within 600 s: {}", collector.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
        collector.ready_after = start.elapsed();
        Ok(collector)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn cpu(&self) -> Duration {
        cpu_time(&self.pid()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn channel(url: &str) -> Result<Channel> {
    Ok(Channel::from_shared(url.to_string())?.tcp_nodelay(true).connect().await?)
}

// ---------------------------------------------------------------------------------------------
// 1. Ingest.
// ---------------------------------------------------------------------------------------------

struct AgentRun {
    start: Instant,
    end: Instant,
    batches: usize,
    events: u64,
    latencies: Vec<Duration>,
}

/// One agent: hello, welcome, then its batches with at most `window` unacknowledged.
async fn agent(
    url: String,
    name: String,
    local: Ipv6Addr,
    batches: Vec<v1::Batch>,
    window: usize,
    go: Arc<Barrier>,
) -> Result<AgentRun> {
    let n = batches.len();
    let events: u64 = batches.iter().map(|b| data_events(b) as u64).sum();
    let mut client =
        IngestClient::new(channel(&url).await?).max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<AgentMessage>(window + 2);
    let hello = v1::AgentHello {
        agent_name: name.clone(),
        host_name: format!("{name}.bench"),
        local_addresses: vec![local.octets().to_vec()],
        interfaces: vec![v1::Interface { name: "eth0".into(), link_type: 1 }],
        software_version: env!("CARGO_PKG_VERSION").into(),
        boot_id: format!("bench-{}", std::process::id()),
    };
    tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let wait = Duration::from_secs(120);
    let first = tokio::time::timeout(wait, inbound.message()).await.context("no welcome")??;
    match first.and_then(|m| m.kind) {
        Some(collector_message::Kind::Welcome(w)) => {
            ensure!(w.durable_seq == 0, "{name}: welcome with durable_seq {}", w.durable_seq);
            let largest = batches.iter().map(|b| b.events.len()).max().unwrap_or(0);
            ensure!(largest <= w.max_batch_events as usize, "batches of {largest} > {}", w.max_batch_events);
        }
        other => bail!("{name}: expected a welcome, got {other:?}"),
    }
    go.wait().await;
    let start = Instant::now();
    let mut sent_at: Vec<Instant> = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    // The newest watermark sent (the last batch's).
    let mut sent_marks: Option<v1::Watermark> = None;
    let mut pending: VecDeque<v1::Batch> = batches.into();
    let mut acked = 0usize;
    while acked < n {
        while sent_at.len() < n && sent_at.len() - acked < window {
            let batch = pending.pop_front().context("batch")?;
            if let Some(Kind::Watermark(mark)) = batch.events.last().and_then(|e| e.kind.as_ref()) {
                sent_marks = Some(mark.clone());
            }
            sent_at.push(Instant::now());
            tx.send(AgentMessage { kind: Some(agent_message::Kind::Batch(batch)) }).await?;
        }
        let message = tokio::time::timeout(wait, inbound.message()).await.context("no ack within 120 s")??;
        match message.and_then(|m| m.kind) {
            Some(collector_message::Kind::Ack(ack)) => {
                let seq = ack.seq as usize;
                ensure!(seq > acked && seq <= sent_at.len(), "{name}: ack {seq} after {acked}");
                let now = Instant::now();
                latencies.extend(sent_at[acked..seq].iter().map(|t| now - *t));
                acked = seq;
            }
            other => bail!("{name}: expected an ack, got {other:?}"),
        }
    }
    let end = Instant::now();
    // Outside the clock: the capture ends (a last batch, a watermark that says so), so the
    // collector decides this agent's last RSTs instead of waiting for more.
    let mark = sent_marks.context("no watermark")?;
    let ended = v1::Watermark { ended: true, ..mark };
    let last =
        v1::Batch { seq: n as u64 + 1, events: vec![v1::Event { kind: Some(Kind::Watermark(ended)) }], spooled_seq: 0 };
    tx.send(AgentMessage { kind: Some(agent_message::Kind::Batch(last)) }).await?;
    loop {
        let message = tokio::time::timeout(wait, inbound.message()).await.context("no ack within 120 s")??;
        match message.and_then(|m| m.kind) {
            Some(collector_message::Kind::Ack(ack)) if ack.seq as usize > n => break,
            Some(collector_message::Kind::Ack(_)) => {}
            other => bail!("{name}: expected an ack, got {other:?}"),
        }
    }
    drop(tx);
    // The collector ends the stream once it has seen ours end.
    let _ = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await;
    Ok(AgentRun { start, end, batches: n, events, latencies })
}

/// Waits until the correlation has caught up with the ingested events: the agents ended their
/// captures, so every RST becomes decidable, the newest RST sent (`newest_rst_ns`, within
/// 50 ms: its report is on the reference clock) has a decided report, and no report is pending
/// any more (the newest RST is not always decided last), at most 300 s. Returns how long after
/// `last_ack` that was, and the collector's CPU from `cpu_before` until then.
async fn catch_up(
    q: &mut QueryClient<Channel>,
    collector: &Collector,
    cpu_before: Duration,
    last_ack: Instant,
    newest_rst_ns: i64,
) -> Result<(Duration, Duration)> {
    let filter =
        v1::ResetFilter { verdicts: DECIDED.iter().map(|v| v.to_string()).collect(), last: 1, ..Default::default() };
    let pending_filter = v1::ResetFilter { verdicts: vec!["pending".into()], last: 1, ..Default::default() };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut listing = q.list_reports(filter.clone()).await?.into_inner();
        let newest = listing.message().await?.map_or(i64::MIN, |r| r.ts_ns);
        while listing.message().await?.is_some() {}
        if Instant::now() >= deadline {
            break;
        }
        // Asked only once the newest is decided: listing what is pending costs the collector.
        if newest >= newest_rst_ns - 50_000_000 {
            let mut pending = q.list_reports(pending_filter.clone()).await?.into_inner();
            let any = pending.message().await?.is_some();
            while pending.message().await?.is_some() {}
            if !any {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((last_ack.elapsed(), collector.cpu().saturating_sub(cpu_before)))
}

/// Writes reports sorted by id, each as its length (u32, big-endian) and protobuf encoding:
/// two runs' files are equal exactly when they decided the same reports.
fn dump_reports(path: &Path, mut reports: Vec<v1::ResetReport>) -> Result<()> {
    reports.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out = Vec::new();
    for r in &reports {
        let bytes = r.encode_to_vec();
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Start of the ingest runs' traffic when their reports are dumped: 2026-01-01T00:00:00Z.
const FIXED_START_NS: i64 = 1_767_225_600_000_000_000;

/// Every verdict but `pending`.
const DECIDED: [&str; 4] = ["end-to-end", "injected", "lost", "unverified"];

/// Each pair of neighbouring agents shares one handshake this often (event time).
const SHARED_EVERY_NS: i64 = 20_000_000;

/// Events of a batch other than its watermark.
fn data_events(batch: &v1::Batch) -> usize {
    batch.events.iter().filter(|e| !matches!(e.kind, Some(Kind::Watermark(_)))).count()
}

struct IngestResult {
    agents: usize,
    events: u64,
    batches: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    collector_cpu: Duration,
    bench_cpu: Duration,
    /// Resets and flow summaries sent (the status counts these).
    resets_and_flows: u64,
    /// Resets sent.
    resets: u64,
    stored: u64,
    /// Distinct RSTs decided once the correlation caught up.
    decided: u64,
    /// How long after the last ack the correlation caught up, and the collector's CPU from the
    /// first send until then.
    catch_up: (Duration, Duration),
    disk_bytes: u64,
    encoded_bytes: u64,
    /// The 1-minute load average when the agents started and once the correlation caught up.
    load: (String, String),
}

/// The 1-minute load average (the first of [`machine::load_average`]), or `?`.
fn load_average_1min() -> String {
    machine::load_average().split_whitespace().next().unwrap_or("?").to_string()
}

fn ingest_run(
    rt: &tokio::runtime::Runtime,
    exe: &Path,
    dir: &Path,
    args: &Args,
    agents: usize,
) -> Result<IngestResult> {
    let data = dir.join(format!("ingest-{agents}"));
    let _ = std::fs::remove_dir_all(&data);
    let per_agent = args.events / agents as u64;
    let t = Instant::now();
    // Reports name times, so runs compared byte for byte start at one fixed time.
    let start_ns = if args.dump_reports.is_some() { FIXED_START_NS } else { now_ns() - 3_600_000_000_000 };
    let plans: Vec<Vec<v1::Batch>> = (0..agents)
        .map(|a| {
            Traffic::new(args.seed ^ ((a as u64 + 1) * 0x9e37), start_ns, 20_000)
                .sharing(args.seed ^ 0x5a4e, a, agents, SHARED_EVERY_NS)
                .batches(per_agent, args.batch)
        })
        .collect();
    let events: u64 = plans.iter().flatten().map(|b| data_events(b) as u64).sum();
    let (mut resets, mut flows, mut newest_rst_ns) = (0u64, 0u64, i64::MIN);
    for e in plans.iter().flatten().flat_map(|b| &b.events) {
        match &e.kind {
            Some(Kind::Reset(r)) => {
                resets += 1;
                newest_rst_ns = newest_rst_ns.max(r.ts_ns);
            }
            Some(Kind::Flow(_)) => flows += 1,
            _ => {}
        }
    }
    let encoded_bytes: u64 = plans.iter().flatten().map(|b| b.encoded_len() as u64).sum();
    eprintln!("ingest, {agents} agent(s): generated {events} events in {:.1?}", t.elapsed());
    let collector = Collector::start(exe, &data, args.batch)?;
    let go = Arc::new(Barrier::new(agents + 1));
    let tasks: Vec<_> = plans
        .into_iter()
        .enumerate()
        .map(|(a, plan)| {
            // Each agent's own host: an address the traffic never has, so no connection is
            // between two agents' hosts (one for all made the verdicts name any of them).
            let local = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, a as u16 + 1);
            rt.spawn(agent(collector.url.clone(), format!("bench-agent-{a}"), local, plan, args.window, go.clone()))
        })
        .collect();
    let (runs, cpu_before) = rt.block_on(async {
        go.wait().await;
        // Every agent has had its welcome: from here on both processes only ingest.
        let cpu_before = (collector.cpu(), cpu_time("self").unwrap_or_default(), load_average_1min());
        let mut runs = Vec::new();
        for task in tasks {
            runs.push(task.await??);
        }
        anyhow::Ok((runs, cpu_before))
    })?;
    let collector_cpu = collector.cpu().saturating_sub(cpu_before.0);
    let bench_cpu = cpu_time("self").unwrap_or_default().saturating_sub(cpu_before.1);
    let first = runs.iter().map(|r| r.start).min().context("no agents")?;
    let last = runs.iter().map(|r| r.end).max().context("no agents")?;
    let mut latencies: Vec<Duration> = runs.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    latencies.sort();
    let (stored, decided, catch_up) = rt.block_on(async {
        let mut q = QueryClient::new(channel(&collector.url).await?);
        let catch_up = catch_up(&mut q, &collector, cpu_before.0, last, newest_rst_ns).await?;
        // 2 s of event time at a time: the collector refuses listings of over a million.
        let mut decided = Vec::new();
        let window = 2_000_000_000;
        let mut since = start_ns - window;
        while since <= newest_rst_ns + window {
            let filter = v1::ResetFilter {
                verdicts: DECIDED.iter().map(|v| v.to_string()).collect(),
                since_ns: Some(since),
                until_ns: Some(since + window),
                ..Default::default()
            };
            let mut listing = q.list_reports(filter).await?.into_inner();
            while let Some(report) = listing.message().await? {
                decided.push(report);
            }
            since += window;
        }
        let s = q.status(v1::StatusRequest {}).await?.into_inner();
        anyhow::Ok((s.resets + s.flows, decided, catch_up))
    })?;
    let load = (cpu_before.2, load_average_1min());
    if let Some(path) = &args.dump_reports {
        let path = path.with_extension(format!("{agents}-agents"));
        dump_reports(&path, decided.clone()).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ingest, {agents} agent(s): {} reports written to {}", decided.len(), path.display());
    }
    let decided = decided.len() as u64;
    drop(collector);
    let disk_bytes = dir_bytes(&data);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&data);
    }
    Ok(IngestResult {
        agents,
        events: runs.iter().map(|r| r.events).sum(),
        batches: runs.iter().map(|r| r.batches).sum(),
        wall: last - first,
        latencies,
        collector_cpu,
        bench_cpu,
        resets_and_flows: resets + flows,
        resets,
        stored,
        decided,
        catch_up,
        disk_bytes,
        encoded_bytes,
        load,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Where the ingest time goes.
// ---------------------------------------------------------------------------------------------

struct Stage {
    name: String,
    per_batch: Duration,
    note: String,
}

fn breakdown(dir: &Path, args: &Args) -> Result<(Vec<Stage>, usize)> {
    let n = args.breakdown_batches;
    let mut traffic = Traffic::new(args.seed ^ 0xb4ea, now_ns() - 3_600_000_000_000, 20_000);
    let batches = traffic.batches(n as u64 * args.batch as u64, args.batch);
    let messages: Vec<AgentMessage> =
        batches.iter().map(|b| AgentMessage { kind: Some(agent_message::Kind::Batch(b.clone())) }).collect();
    let timed = |f: &mut dyn FnMut(usize) -> Result<()>| -> Result<Duration> {
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            f(i)?;
            times.push(t.elapsed());
        }
        Ok(median(times))
    };
    let mut stages = Vec::new();
    let mut encoded = Vec::with_capacity(n);
    let encode = timed(&mut |i| {
        encoded.push(messages[i].encode_to_vec());
        Ok(())
    })?;
    stages.push(Stage { name: "protobuf encode (agent side)".into(), per_batch: encode, note: String::new() });
    let decode = timed(&mut |i| {
        std::hint::black_box(AgentMessage::decode(encoded[i].as_slice())?);
        Ok(())
    })?;
    let bytes = encoded.iter().map(Vec::len).sum::<usize>() / n.max(1);
    stages.push(Stage {
        name: "protobuf decode".into(),
        per_batch: decode,
        note: format!("{bytes} bytes per batch, {} per event", bytes / args.batch.max(1)),
    });
    let check = timed(&mut |i| {
        check_batch(&batches[i], usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    })?;
    stages.push(Stage { name: "validation (`ingest::check_batch`)".into(), per_batch: check, note: String::new() });
    let append = |store_dir: &Path| -> Result<Duration> {
        let _ = std::fs::remove_dir_all(store_dir);
        let store = Store::open(StoreConfig::new(store_dir))?;
        let d = timed(&mut |i| {
            store.append_batch("breakdown", "b1", &batches[i], now_ns())?;
            Ok(())
        })?;
        drop(store);
        let _ = std::fs::remove_dir_all(store_dir);
        Ok(d)
    };
    let shm = Path::new("/dev/shm");
    let tmpfs =
        if shm.is_dir() { Some(append(&shm.join(format!("rstscope-bench-{}", std::process::id())))?) } else { None };
    let disk = append(&dir.join("breakdown"))?;
    if let Some(t) = tmpfs {
        stages.push(Stage {
            name: "`Store::append_batch` on tmpfs: sled tree batches, fsync free".into(),
            per_batch: t,
            note: "CPU in sled (tree inserts of the records and the connection index)".into(),
        });
    }
    stages.push(Stage {
        name: "`Store::append_batch` on disk: tree batches + fsync".into(),
        per_batch: disk,
        note: tmpfs.map_or(String::new(), |t| format!("fsync ≈ {} (difference to tmpfs)", ms(disk.saturating_sub(t)))),
    });
    Ok((stages, n))
}

// ---------------------------------------------------------------------------------------------
// 3. Queries over a big store.
// ---------------------------------------------------------------------------------------------

/// The connection every fill agent reports (a flow and two resets each), for `GetConnection`.
fn probe_conn() -> Conn {
    Conn {
        local: (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)), 443),
        remote: (IpAddr::V4(Ipv4Addr::new(198, 51, 100, 77)), 51_515),
        local_is_server: true,
    }
}

struct Fill {
    resets: u64,
    flows: u64,
    took: Duration,
    end_ns: i64,
    disk_bytes: u64,
    /// Bytes the reports added on disk.
    reports_bytes: u64,
    /// Taken from an earlier run's `--query-store`.
    reused: bool,
}

const FILL_AGENTS: usize = 4;

/// Writes `resets` resets (and a flow per ten) over `span` ending now, straight into the store.
fn fill(store: &Store, args: &Args) -> Result<Fill> {
    let target = args.query_events;
    let end_ns = now_ns();
    let span_ns = (args.span_hours.max(1) * 3_600_000_000_000) as i64;
    // Events in all: about 10/9 of the resets.
    let step = span_ns / (target as i64 * 10 / 9).max(1);
    let size = args.fill_batch.max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, v1::Batch)>(4);
    let seed = args.seed;
    // Generation on a second thread, storing on this one.
    let generator = std::thread::spawn(move || {
        let mut traffic = Traffic::new(seed ^ 0xf111, end_ns - span_ns, step);
        let (mut resets, mut flows) = (0u64, 0u64);
        let mut seqs = [0u64; FILL_AGENTS];
        // Each agent reports the probe connection once, in the newest half hour (or third).
        let probe_at = end_ns - (span_ns / 3).min(1_800_000_000_000);
        let mut probed = [false; FILL_AGENTS];
        let mut b = 0usize;
        while resets < target {
            let agent = b % FILL_AGENTS;
            seqs[agent] += 1;
            let mut events = Vec::with_capacity(size + 3);
            while events.len() < size && resets < target {
                let e = traffic.next_event();
                match &e.kind {
                    Some(Kind::Reset(_)) => resets += 1,
                    _ => flows += 1,
                }
                events.push(e);
            }
            if traffic.ts_ns >= probe_at && !probed[agent] {
                let conn = probe_conn();
                let ts = traffic.ts_ns;
                events.push(v1::Event { kind: Some(Kind::Flow(traffic.flow(&conn, ts))) });
                for k in 0..2 {
                    events.push(v1::Event { kind: Some(Kind::Reset(traffic.reset(&conn, ts - 1000 + k))) });
                }
                resets += 2;
                flows += 1;
                probed[agent] = true;
            }
            if tx.send((agent, v1::Batch { seq: seqs[agent], events, spooled_seq: 0 })).is_err() {
                break;
            }
            b += 1;
        }
        (resets, flows)
    });
    let start = Instant::now();
    let mut stored = 0u64;
    let mut next_report = 1_000_000u64;
    for (agent, batch) in rx {
        store.append_batch(&format!("fill-{agent}"), "fill", &batch, now_ns())?;
        stored += batch.events.len() as u64;
        if stored >= next_report {
            let r = stored as f64 / start.elapsed().as_secs_f64();
            eprintln!("  filled {stored} records, {} records/s", fmt_rate(r));
            next_report += 1_000_000;
        }
    }
    // The resume point a collector that decided all of it would have left (the newest event
    // less its 10-minute context), so the collector started on this store replays what such a
    // collector would, not the newest million events of a store without one.
    store.set_meta(RESUME_META, &(end_ns - 600_000_000_000).to_be_bytes())?;
    store.flush()?;
    let took = start.elapsed();
    let (resets, flows) = generator.join().map_err(|_| anyhow::anyhow!("the generator panicked"))?;
    Ok(Fill { resets, flows, took, end_ns, disk_bytes: 0, reports_bytes: 0, reused: false })
}

/// Verdicts of the filled reports with their weights (of 100).
const VERDICT_MIX: [(&str, u64); 5] =
    [("end-to-end", 80), ("injected", 2), ("lost", 5), ("unverified", 8), ("pending", 5)];

/// Writes `--query-events` merged reports (one per generated RST, seen by one or two of the
/// fill agents) over the same span, through `Store::put_reports` in batches of `--fill-batch`.
/// Returns how many and how long it took.
fn fill_reports(store: &Store, args: &Args, end_ns: i64) -> Result<(u64, Duration)> {
    let target = args.query_events;
    let span_ns = (args.span_hours.max(1) * 3_600_000_000_000) as i64;
    let step = span_ns / (target as i64).max(1);
    let size = args.fill_batch.max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<v1::ResetReport>>(4);
    let seed = args.seed;
    let generator = std::thread::spawn(move || {
        let mut traffic = Traffic::new(seed ^ 0x4e9, end_ns - span_ns, step);
        let mut n = 0u64;
        while n < target {
            let mut reports = Vec::with_capacity(size);
            while reports.len() < size && n < target {
                let jitter = traffic.rng.below(traffic.step_ns as u64 * 2) as i64;
                traffic.ts_ns += jitter.max(1);
                let conn = traffic.conn();
                let rst = traffic.reset(&conn, traffic.ts_ns);
                let mut roll = traffic.rng.below(100);
                let verdict = VERDICT_MIX
                    .iter()
                    .find(|(_, w)| {
                        let hit = roll < *w;
                        roll = roll.saturating_sub(*w);
                        hit
                    })
                    .map_or("pending", |(v, _)| v);
                let first = traffic.rng.below(FILL_AGENTS as u64) as usize;
                let agents = if traffic.rng.chance(0.4) { vec![first, (first + 1) % FILL_AGENTS] } else { vec![first] };
                let observations = agents
                    .iter()
                    .map(|&a| v1::Observation {
                        agent: format!("fill-{a}"),
                        ts_ns: rst.ts_ns,
                        corrected_ns: rst.ts_ns,
                        src: rst.src.clone(),
                        dst: rst.dst.clone(),
                        ttl: rst.ttl,
                        ip_id: rst.ip_id,
                        seq: rst.seq,
                        ack: rst.ack,
                        flags: rst.flags,
                        window: rst.window,
                        direction: "in".into(),
                        local_cause: rst.cause,
                        record: format!("{:016x}", rst.conn_id),
                        ..Default::default()
                    })
                    .collect();
                reports.push(v1::ResetReport {
                    id: format!("{:016x}{:08x}", rst.conn_id, n),
                    ts_ns: rst.ts_ns,
                    connection: format!("{:016x}", rst.conn_id),
                    claimed_sender: rst.src.clone(),
                    receiver: rst.dst.clone(),
                    flags: rst.flags,
                    verdict: verdict.to_string(),
                    cause: rstscope_collector::store::cause_name(rst.cause).to_string(),
                    match_key: "tuple+isn".into(),
                    observations,
                    evidence: rst.evidence.clone(),
                    ..Default::default()
                });
                n += 1;
            }
            if tx.send(reports).is_err() {
                break;
            }
        }
        n
    });
    let start = Instant::now();
    let mut stored = 0u64;
    let mut next_report = 1_000_000u64;
    for reports in rx {
        store.put_reports(&reports)?;
        stored += reports.len() as u64;
        if stored >= next_report {
            eprintln!(
                "  filled {stored} reports, {} reports/s",
                fmt_rate(stored as f64 / start.elapsed().as_secs_f64())
            );
            next_report += 1_000_000;
        }
    }
    store.flush()?;
    let took = start.elapsed();
    let n = generator.join().map_err(|_| anyhow::anyhow!("the report generator panicked"))?;
    Ok((n, took))
}

struct QuerySpec {
    /// As the user would type it.
    label: String,
    filter: Option<v1::ResetFilter>,
    /// `GetConnection` of this id instead.
    connection: Option<String>,
    cli: Vec<String>,
    /// Whether the "< 200 ms filtered" target applies.
    filtered: bool,
}

fn query_specs(since_ns: i64) -> Vec<QuerySpec> {
    let since_s = (since_ns / 1_000_000_000).to_string();
    let since = |hosts: Vec<String>, causes: Vec<String>| v1::ResetFilter {
        since_ns: Some(since_ns / 1_000_000_000 * 1_000_000_000),
        hosts,
        causes,
        ..Default::default()
    };
    let conn = probe_conn();
    let key = FlowKey::new(Endpoint::new(conn.local.0, conn.local.1), Endpoint::new(conn.remote.0, conn.remote.1));
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["resets".into(), "--raw".into(), "--since".into(), since_s.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    vec![
        QuerySpec {
            label: "`--since 1h`".into(),
            filter: Some(since(vec![], vec![])),
            connection: None,
            cli: base(&[]),
            filtered: false,
        },
        QuerySpec {
            label: "`--since 1h --host 198.51.100.0/24`".into(),
            filter: Some(since(vec!["198.51.100.0/24".into()], vec![])),
            connection: None,
            cli: base(&["--host", "198.51.100.0/24"]),
            filtered: true,
        },
        QuerySpec {
            label: "`--since 1h --host 192.0.2.0/24` (matches nothing: the scan alone)".into(),
            filter: Some(since(vec!["192.0.2.0/24".into()], vec![])),
            connection: None,
            cli: base(&["--host", "192.0.2.0/24"]),
            filtered: true,
        },
        QuerySpec {
            label: "`--since 1h --cause refused`".into(),
            filter: Some(since(vec![], vec!["refused".into()])),
            connection: None,
            cli: base(&["--cause", "refused"]),
            filtered: true,
        },
        QuerySpec {
            label: "`--since 1h --port 5432`".into(),
            filter: Some(v1::ResetFilter { ports: vec![5432], ..since(vec![], vec![]) }),
            connection: None,
            cli: base(&["--port", "5432"]),
            filtered: true,
        },
        QuerySpec {
            label: "`--since 1h --agent fill-1`".into(),
            filter: Some(v1::ResetFilter { agents: vec!["fill-1".into()], ..since(vec![], vec![]) }),
            connection: None,
            cli: base(&["--agent", "fill-1"]),
            filtered: true,
        },
        QuerySpec {
            label: "`--since 1h --verdict injected`".into(),
            filter: Some(v1::ResetFilter { verdicts: vec!["injected".into()], ..since(vec![], vec![]) }),
            connection: None,
            cli: base(&["--verdict", "injected"]),
            filtered: true,
        },
        QuerySpec {
            label: "`--since 1h --host 198.51.100.0/24 --cause refused`".into(),
            filter: Some(since(vec!["198.51.100.0/24".into()], vec!["refused".into()])),
            connection: None,
            cli: base(&["--host", "198.51.100.0/24", "--cause", "refused"]),
            filtered: true,
        },
        QuerySpec {
            label: "`--last 100`".into(),
            filter: Some(v1::ResetFilter { last: 100, ..Default::default() }),
            connection: None,
            cli: vec!["resets".into(), "--raw".into(), "--last".into(), "100".into()],
            filtered: true,
        },
        QuerySpec {
            label: format!("`GetConnection` / `connection {key}`"),
            filter: None,
            connection: Some(key.to_string()),
            cli: vec!["connection".into(), key.to_string()],
            filtered: true,
        },
    ]
}

/// One query through gRPC: records (or flows + resets) received, fully drained.
async fn grpc_query(client: &mut QueryClient<Channel>, spec: &QuerySpec) -> Result<usize> {
    if let Some(id) = &spec.connection {
        let reply = client.get_connection(v1::ConnectionRequest { connection: id.clone() }).await?.into_inner();
        return Ok(reply.flows.len() + reply.resets.len());
    }
    let filter = spec.filter.clone().context("filter")?;
    let mut stream = client.list_resets(filter).await?.into_inner();
    let mut n = 0;
    while stream.message().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// The same query against the store in-process (what the service asks of it).
fn store_query(store: &Store, spec: &QuerySpec) -> Result<usize> {
    if let Some(id) = &spec.connection {
        let key: FlowKey = id.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let view = store.connection(&key)?;
        return Ok(view.flows.len() + view.resets.len());
    }
    let filter = spec.filter.as_ref().context("filter")?;
    let selection = check_filter(filter).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !selection.admits_pending {
        // What the service answers for raw resets, all of which are "pending".
        return Ok(0);
    }
    Ok(store.resets(&selection.query)?.len())
}

/// `ListReports` through gRPC: reports received, fully drained, and how long after `started`
/// the first one arrived (the end, when none did).
async fn grpc_reports(
    client: &mut QueryClient<Channel>,
    spec: &QuerySpec,
    started: Instant,
) -> Result<Option<(usize, Duration)>> {
    let Some(filter) = spec.filter.clone() else { return Ok(None) };
    let mut stream = client.list_reports(filter).await?.into_inner();
    let mut n = 0;
    let mut first_row = None;
    while stream.message().await?.is_some() {
        first_row.get_or_insert_with(|| started.elapsed());
        n += 1;
    }
    Ok(Some((n, first_row.unwrap_or_else(|| started.elapsed()))))
}

/// The same filter over the merged reports, in-process.
fn report_query(store: &Store, spec: &QuerySpec) -> Result<Option<usize>> {
    let Some(filter) = &spec.filter else { return Ok(None) };
    let mut query: ResetQuery = check_filter(filter).map_err(|e| anyhow::anyhow!("{e}"))?.query;
    query.verdicts.clone_from(&filter.verdicts);
    Ok(Some(store.reports(&query)?.len()))
}

struct QueryResult {
    label: String,
    rows: usize,
    store_median: Duration,
    first: Duration,
    median: Duration,
    cli: Option<Duration>,
    filtered: bool,
    /// Over the merged reports.
    reports: Option<ReportTiming>,
}

/// A query over the merged reports: in-process, through gRPC (`ListReports`), and with the CLI
/// (`rstscope resets`, which lists reports).
struct ReportTiming {
    rows: usize,
    store_median: Duration,
    first: Duration,
    median: Duration,
    /// Median time to the first report received (streamed answers start before they end).
    first_row_median: Duration,
    cli: Option<Duration>,
}

struct QueryPart {
    fill: Fill,
    /// Reports stored and how long putting them took (zero when reused).
    reports_fill: (u64, Duration),
    ready_after: Duration,
    results: Vec<QueryResult>,
    runs: usize,
}

fn query_part(rt: &tokio::runtime::Runtime, exe: &Path, cli: &Path, dir: &Path, args: &Args) -> Result<QueryPart> {
    let runs = args.runs.max(1);
    let data = args.query_store.clone().unwrap_or_else(|| dir.join("query"));
    let mut reused = None;
    if args.query_store.is_some() && data.is_dir() {
        let store = Store::open(StoreConfig::new(&data))?;
        let status = store.status()?;
        let newest = store.resets(&ResetQuery { last: Some(1), ..Default::default() })?.first().map(|r| r.event.ts_ns);
        match newest {
            Some(newest) if status.resets >= args.query_events => {
                eprintln!("reusing {} ({} resets)", data.display(), status.resets);
                let fill = Fill {
                    resets: status.resets,
                    flows: status.flows,
                    took: Duration::ZERO,
                    end_ns: newest + 1,
                    disk_bytes: 0,
                    reports_bytes: 0,
                    reused: true,
                };
                reused = Some((store, fill));
            }
            _ => drop(store),
        }
    }
    let (store, mut fill) = match reused {
        Some(found) => found,
        None => {
            let _ = std::fs::remove_dir_all(&data);
            let store = Store::open(StoreConfig::new(&data))?;
            eprintln!("filling {} with {} resets", data.display(), args.query_events);
            let fill = fill(&store, args)?;
            eprintln!(
                "filled {} resets + {} flows in {:.1?}: {} records/s",
                fill.resets,
                fill.flows,
                fill.took,
                fmt_rate((fill.resets + fill.flows) as f64 / fill.took.as_secs_f64())
            );
            // Measured like the collector will see it: freshly opened.
            drop(store);
            (Store::open(StoreConfig::new(&data))?, fill)
        }
    };
    let since_ns = fill.end_ns - 3_600_000_000_000;
    let specs = query_specs(since_ns);
    let mut store_times = Vec::new();
    for spec in &specs {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..runs {
            let t = Instant::now();
            rows = store_query(&store, spec)?;
            times.push(t.elapsed());
        }
        eprintln!("store only: {} → {rows} rows, median {}", spec.label, ms(median(times.clone())));
        store_times.push((rows, median(times)));
    }
    drop(store);
    fill.disk_bytes = dir_bytes(&data);

    let collector = Collector::start(exe, &data, args.batch)?;
    eprintln!("collector ready on the filled store after {:.1?}", collector.ready_after);
    let mut results = Vec::new();
    for (spec, (store_rows, store_median)) in specs.iter().zip(store_times) {
        let mut times = Vec::new();
        let mut rows = 0;
        rt.block_on(async {
            let mut client = QueryClient::new(channel(&collector.url).await?).max_decoding_message_size(64 << 20);
            for _ in 0..runs {
                let t = Instant::now();
                rows = grpc_query(&mut client, spec).await?;
                times.push(t.elapsed());
            }
            anyhow::Ok(())
        })?;
        ensure!(rows == store_rows, "{}: gRPC returned {rows} rows, the store {store_rows}", spec.label);
        // `resets --raw` takes no --verdict (a raw record has none; the reports run times it).
        let cli_time = if cli.is_file() && !spec.cli.iter().any(|a| a == "--verdict") {
            let t = Instant::now();
            let out = Command::new(cli)
                .args(["--collector", &collector.url])
                .args(&spec.cli)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()?;
            let took = t.elapsed();
            ensure!(out.status.success(), "rstscope {}: {}", spec.cli.join(" "), String::from_utf8_lossy(&out.stderr));
            Some(took)
        } else {
            None
        };
        eprintln!("gRPC: {} → {rows} rows, first {}, median {}", spec.label, ms(times[0]), ms(median(times.clone())));
        results.push(QueryResult {
            label: spec.label.clone(),
            rows,
            store_median,
            first: times[0],
            median: median(times),
            cli: cli_time,
            filtered: spec.filtered,
            reports: None,
        });
    }
    let ready_after = collector.ready_after;
    drop(collector);
    if !args.keep && args.query_store.is_none() {
        let _ = std::fs::remove_dir_all(&data);
    }

    // The reports in a store of their own (the disk may not hold both at 10M).
    let reports_dir = data.with_extension("reports");
    let mut store = Store::open(StoreConfig::new(&reports_dir))?;
    let have = store.status()?.reports;
    let reports_fill = if have >= args.query_events {
        eprintln!("reusing {have} reports in {}", reports_dir.display());
        (have, Duration::ZERO)
    } else {
        eprintln!("filling {} with {} reports", reports_dir.display(), args.query_events);
        let filled = fill_reports(&store, args, fill.end_ns)?;
        eprintln!(
            "filled {} reports in {:.1?}: {} reports/s",
            filled.0,
            filled.1,
            fmt_rate(filled.0 as f64 / filled.1.as_secs_f64())
        );
        // Timed like the collector will see it: freshly opened.
        drop(store);
        store = Store::open(StoreConfig::new(&reports_dir))?;
        filled
    };
    for (spec, result) in specs.iter().zip(&mut results) {
        let mut times = Vec::new();
        let mut rows = None;
        for _ in 0..runs {
            let t = Instant::now();
            rows = report_query(&store, spec)?;
            times.push(t.elapsed());
        }
        if let Some(rows) = rows {
            eprintln!("reports, store only: {} → {rows} rows, median {}", spec.label, ms(median(times.clone())));
            result.reports = Some(ReportTiming {
                rows,
                store_median: median(times),
                first: Duration::ZERO,
                median: Duration::ZERO,
                first_row_median: Duration::ZERO,
                cli: None,
            });
        }
    }
    drop(store);
    // The same through the collector, as an admin asks.
    let collector = Collector::start(exe, &reports_dir, args.batch)?;
    for (spec, result) in specs.iter().zip(&mut results) {
        let Some(timing) = result.reports.as_mut() else { continue };
        let mut times = Vec::new();
        let mut first_rows = Vec::new();
        rt.block_on(async {
            let mut client = QueryClient::new(channel(&collector.url).await?).max_decoding_message_size(64 << 20);
            for _ in 0..runs {
                let t = Instant::now();
                let answer = grpc_reports(&mut client, spec, t).await?;
                times.push(t.elapsed());
                let rows = answer.map(|(rows, first_row)| {
                    first_rows.push(first_row);
                    rows
                });
                ensure!(
                    rows == Some(timing.rows),
                    "{}: ListReports gave {rows:?} rows, the store {}",
                    spec.label,
                    timing.rows
                );
            }
            anyhow::Ok(())
        })?;
        let cli_args: Vec<&String> = spec.cli.iter().filter(|a| *a != "--raw").collect();
        if cli.is_file() {
            let t = Instant::now();
            let out = Command::new(cli)
                .args(["--collector", &collector.url])
                .args(&cli_args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()?;
            timing.cli = Some(t.elapsed());
            let args_text = cli_args.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(" ");
            ensure!(out.status.success(), "rstscope {args_text}: {}", String::from_utf8_lossy(&out.stderr));
        }
        timing.first = times[0];
        timing.median = median(times);
        timing.first_row_median = median(first_rows);
        eprintln!(
            "reports, gRPC: {} → {} rows, first {}, median {} (first row after {})",
            spec.label,
            timing.rows,
            ms(timing.first),
            ms(timing.median),
            ms(timing.first_row_median)
        );
    }
    drop(collector);
    fill.reports_bytes = dir_bytes(&reports_dir);
    if !args.keep && args.query_store.is_none() {
        let _ = std::fs::remove_dir_all(&reports_dir);
    }
    Ok(QueryPart { fill, reports_fill, ready_after, results, runs })
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.events = args.events.min(20_000);
        args.query_events = args.query_events.min(50_000);
        args.runs = args.runs.min(3);
        args.breakdown_batches = args.breakdown_batches.min(20);
        args.agents = args.agents.min(4);
    }
    args.batch = args.batch.max(1);
    args.window = args.window.max(1);
    args.agents = args.agents.max(1);
    let part = |s: &str| args.only.split(',').any(|x| x.trim() == s);

    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("rstscope-collector-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (collector_exe, cli_exe) = collector_binaries(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    let rustc = command_output("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into());
    let mem = proc_field("/proc/meminfo", "MemTotal").unwrap_or_default();
    let kernel = command_output("uname", &["-r"]).unwrap_or_default();
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    line("## rstscope collector benchmark".into());
    line(String::new());
    line(format!("- machine: {nproc} CPUs ({cpu}), {mem} RAM, Linux {kernel}, {rustc}"));
    line(format!("- command: `cargo run --release -p rstscope-tests --bin collector-bench -- {}`", cmdline.join(" ")));
    line(format!(
        "- collector: the real `{}` as its own process on 127.0.0.1, fresh `--data-dir` under {} (sled on disk)",
        collector_exe.display(),
        dir.display()
    ));

    if part("ingest") {
        let mut results = Vec::new();
        let mut counts = vec![1];
        if args.agents != 1 {
            counts.push(args.agents);
        }
        for agents in counts {
            let r = ingest_run(&rt, &collector_exe, &dir, &args, agents)?;
            eprintln!(
                "ingest, {agents} agent(s): {} events in {:.2?} = {} events/s",
                r.events,
                r.wall,
                fmt_rate(r.events as f64 / r.wall.as_secs_f64())
            );
            results.push(r);
        }
        line(String::new());
        line("### 1. Ingest with durable acks (gRPC, one stream per agent)".into());
        line(String::new());
        if let Some(r) = results.first() {
            line(format!(
                "Each agent: hello, then batches of {} events with up to {} unacknowledged; an ack means \
                 fsynced. Events: 90% RST (1-3 evidence items), 10% flow summaries, {} bytes each on the \
                 wire on average; clock from the first send to the last ack.",
                args.batch,
                args.window,
                r.encoded_bytes / r.events.max(1)
            ));
        }
        line(String::new());
        line(
            "| agents | events | wall | events/s | batches/s | ack p50 | ack p99 | collector CPU/event | \
             collector CPU use | stored on disk | RSTs decided / sent | decisions caught up | \
             collector CPU/event until then | target ≥ 200k events/s |"
                .into(),
        );
        line("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|".into());
        for r in &results {
            let secs = r.wall.as_secs_f64();
            let rate = r.events as f64 / secs;
            let ok_count =
                if r.stored == r.resets_and_flows { String::new() } else { format!(" (stored {}!)", r.stored) };
            line(format!(
                "| {} | {}{} | {:.2} s | {} | {:.0} | {} | {} | {} | {:.0}% of a core | {:.0} B/event | {} / {} | \
                 {:.2} s after the last ack | {} | {} |",
                r.agents,
                r.events,
                ok_count,
                secs,
                fmt_rate(rate),
                r.batches as f64 / secs,
                ms(percentile(&r.latencies, 50.0)),
                ms(percentile(&r.latencies, 99.0)),
                us(r.collector_cpu / r.events.max(1) as u32),
                100.0 * r.collector_cpu.as_secs_f64() / secs,
                r.disk_bytes as f64 / r.events.max(1) as f64,
                r.decided,
                r.resets,
                r.catch_up.0.as_secs_f64(),
                us(r.catch_up.1 / r.events.max(1) as u32),
                verdict(rate >= 200_000.0),
            ));
        }
        if let Some(r) = results.last() {
            line(String::new());
            line(format!(
                "The benchmark's own process (agents, tonic client) used {:.1} s CPU for the {}-agent run \
                 ({:.0}% of a core); the generation of the events is outside the clock.",
                r.bench_cpu.as_secs_f64(),
                r.agents,
                100.0 * r.bench_cpu.as_secs_f64() / r.wall.as_secs_f64()
            ));
        }
        let loads: Vec<String> =
            results.iter().map(|r| format!("{} agent(s) {} → {}", r.agents, r.load.0, r.load.1)).collect();
        line(String::new());
        line(format!(
            "Load average (1 min) from the start of each run to the end of its catch-up: {} (other work \
             on the machine takes CPU from the collector).",
            loads.join(", ")
        ));
    }

    if part("breakdown") && args.breakdown_batches > 0 {
        eprintln!("time breakdown over {} batches", args.breakdown_batches);
        let (stages, n) = breakdown(&dir, &args)?;
        line(String::new());
        line(format!(
            "### 2. Where the ingest time goes (in-process, one writer, median of {n} batches of {} events, fresh store)",
            args.batch
        ));
        line(String::new());
        line("| stage | per batch | per event | note |".into());
        line("|---|---:|---:|---|".into());
        for s in &stages {
            line(format!(
                "| {} | {} | {} | {} |",
                s.name,
                ms(s.per_batch),
                us(s.per_batch / args.batch as u32),
                s.note
            ));
        }
    }

    if part("query") && args.query_events > 0 {
        let q = query_part(&rt, &collector_exe, &cli_exe, &dir, &args)?;
        let f = &q.fill;
        let records = f.resets + f.flows;
        line(String::new());
        line(format!("### 3. Query latency over {} stored resets", f.resets));
        line(String::new());
        let size = format!(
            "{:.2} GiB on disk ({:.0} B/record)",
            f.disk_bytes as f64 / f64::from(1u32 << 30),
            f.disk_bytes as f64 / records.max(1) as f64
        );
        if f.reused {
            line(format!(
                "- store: {} resets + {} flow summaries reused from an earlier run's `--query-store` (fill not \
                 timed); {size}",
                f.resets, f.flows
            ));
        } else {
            line(format!(
                "- fill: {} resets + {} flow summaries over {} h of event time ending now, through \
                 `Store::append_batch` in batches of {} (tree batches + fsync each), 4 agents: {:.1} s = \
                 {} records/s; {size}",
                f.resets,
                f.flows,
                args.span_hours,
                args.fill_batch,
                f.took.as_secs_f64(),
                fmt_rate(records as f64 / f.took.as_secs_f64()),
            ));
        }
        line(format!(
            "- collector started on it: listening after {:.2} s; `--since 1h` is the newest hour of the \
             data (given as epoch seconds, since the fill ended a while ago)",
            q.ready_after.as_secs_f64()
        ));
        line(format!(
            "- gRPC: one client connection, whole answer drained; median of {} runs (the first, cold \
             run shown apart); CLI: `rstscope --collector URL …` once, output to /dev/null",
            q.runs
        ));
        line(String::new());
        let (n_reports, reports_took) = q.reports_fill;
        if reports_took > Duration::ZERO {
            line(format!(
                "- reports: {n_reports} merged reports (one per RST, 1-2 observations, 80% end-to-end, 2% injected) \
                 over the same span, through `Store::put_reports` in batches of {}: {:.1} s = {} reports/s; \
                 {:.0} B/report on disk (buckets included)",
                args.fill_batch,
                reports_took.as_secs_f64(),
                fmt_rate(n_reports as f64 / reports_took.as_secs_f64()),
                f.reports_bytes as f64 / n_reports.max(1) as f64
            ));
        } else {
            line(format!("- reports: {n_reports} merged reports reused from the `--query-store`"));
        }
        line(
            "- raw: each agent's own RST records (`ListResets`, `rstscope resets --raw`); reports: the merged \
             reports with verdicts (`ListReports`, `rstscope resets`: what an admin asks for), served by a \
             collector started on the reports store; the target is judged on the reports' gRPC median"
                .into(),
        );
        line(String::new());
        line(
            "| query | raw rows | raw: store (median) | raw: gRPC first (cold) | raw: gRPC median | raw: `rstscope` CLI \
             | reports rows | reports: store (median) | reports: gRPC first (cold) | reports: gRPC median \
             | reports: gRPC first row (median) | reports: `rstscope` CLI | target < 200 ms (reports) |"
                .into(),
        );
        line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|".into());
        for r in &q.results {
            let na = || "n/a".to_string();
            let reports = r.reports.as_ref().map_or((na(), na(), na(), na(), na(), na()), |t| {
                (
                    t.rows.to_string(),
                    ms(t.store_median),
                    ms(t.first),
                    ms(t.median),
                    ms(t.first_row_median),
                    t.cli.map_or(na(), ms),
                )
            });
            let timed = r.reports.as_ref().map_or(r.median, |t| t.median);
            let target = if r.filtered {
                verdict(timed < Duration::from_millis(200)).to_string()
            } else {
                format!("n/a (unfiltered; {})", verdict(timed < Duration::from_millis(200)))
            };
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                r.rows,
                ms(r.store_median),
                ms(r.first),
                ms(r.median),
                r.cli.map_or("n/a".into(), ms),
                reports.0,
                reports.1,
                reports.2,
                reports.3,
                reports.4,
                reports.5,
                target
            ));
        }
    }

    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    if args.keep {
        eprintln!("kept the databases in {}", dir.display());
    } else if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
