//! The pure correlator, specified by ladders: what each agent reported, and the verdicts.
//!
//! Topology of every case: the client 198.51.100.2 — three routers — the server 203.0.113.10,
//! 5 ms each way. The client's agent is the clock reference; the server's clock is 4.2 s behind.
//! Neither agent is told its addresses: they are inferred from unrouted TTLs.

use rstscope_proto::v1;

use super::*;

const MS: i64 = 1_000_000;
const S: i64 = 1_000_000_000;
/// Reference time of the first SYN.
const T0: i64 = 1_700_000_000 * S;
/// Server clock minus reference clock.
const SKEW: i64 = -4_200 * MS;
const DELAY: i64 = 5 * MS;
const CLIENT: &str = "198.51.100.2:40000";
const SERVER: &str = "203.0.113.10:80";
const CLIENT_NAT: &str = "203.0.113.1:61000";
const ISN_C: u32 = 1_000;
const ISN_S: u32 = 90_000;

fn ep(s: &str) -> v1::Endpoint {
    let a: std::net::SocketAddr = s.parse().unwrap();
    pb::endpoint_to_pb(Endpoint::new(a.ip(), a.port()))
}

/// One connection's handshake as seen at the client (`at_client`) or at the server.
fn open(conn_id: u64, at_client: bool, client: &str, start: i64, isn_c: u32) -> v1::Event {
    // Client sends SYN at `start` (reference), server answers 1 ms after it arrives.
    let (syn, synack, orig_ttl, resp_ttl) = if at_client {
        (start, start + 2 * DELAY + MS, 64, 61)
    } else {
        (start + DELAY + SKEW, start + DELAY + MS + SKEW, 61, 64)
    };
    v1::Event {
        kind: Some(v1::event::Kind::Open(v1::ConnectionOpen {
            conn_id,
            orig: Some(ep(client)),
            resp: Some(ep(SERVER)),
            start_ns: syn,
            orig_isn: Some(isn_c),
            resp_isn: Some(ISN_S),
            syn_ns: Some(syn),
            synack_ns: Some(synack),
            orig_ttl,
            resp_ttl,
            ..Default::default()
        })),
    }
}

/// A RST sent by the server (`from_server`) or the client, as one agent saw it at `ts` (that
/// agent's clock), with `ttl` there.
#[allow(clippy::too_many_arguments)]
fn rst(conn_id: u64, client: &str, from_server: bool, ts: i64, seq: u32, ttl: u32, cause: v1::Cause) -> v1::Event {
    let (src, dst, sender) =
        if from_server { (SERVER, client, v1::Role::Responder) } else { (client, SERVER, v1::Role::Originator) };
    v1::Event {
        kind: Some(v1::event::Kind::Reset(v1::RstEvent {
            ts_ns: ts,
            src: Some(ep(src)),
            dst: Some(ep(dst)),
            conn_id,
            sender: sender as i32,
            flags: 0x014,
            seq,
            ack: 0,
            ttl,
            checksum: v1::Checksum::Good as i32,
            ip_header_ok: true,
            cause: cause as i32,
            seq_relation: v1::SeqRelation::Exact as i32,
            ..Default::default()
        })),
    }
}

fn mark(since: i64, ts: i64) -> v1::Event {
    v1::Event { kind: Some(v1::event::Kind::Watermark(v1::Watermark { ts_ns: ts, since_ns: since })) }
}

fn flow_end(conn_id: u64, client: &str, start: i64, end: i64) -> v1::Event {
    v1::Event {
        kind: Some(v1::event::Kind::Flow(v1::FlowSummary {
            conn_id,
            orig: Some(ep(client)),
            resp: Some(ep(SERVER)),
            start_ns: start,
            end_ns: end,
            ..Default::default()
        })),
    }
}

struct Ladder {
    c: Correlator,
    client: usize,
    server: usize,
}

impl Ladder {
    fn new() -> Self {
        let mut c = Correlator::new(Config::default());
        let client = c.agent("client", &[]);
        let server = c.agent("server", &[]);
        Ladder { c, client, server }
    }
    fn client(&mut self, events: &[v1::Event]) -> &mut Self {
        for e in events {
            self.c.ingest(self.client, e);
        }
        self
    }
    fn server(&mut self, events: &[v1::Event]) -> &mut Self {
        for e in events {
            self.c.ingest(self.server, e);
        }
        self
    }
    /// Both captures ran from before T0 to `until` (reference time).
    fn covered_until(&mut self, until: i64) -> &mut Self {
        self.client(&[mark(T0 - S, until)]);
        self.server(&[mark(T0 - S + SKEW, until + SKEW)]);
        self
    }
}

fn one(reports: &[v1::ResetReport]) -> &v1::ResetReport {
    assert_eq!(reports.len(), 1, "{reports:#?}");
    &reports[0]
}

fn evidence_names(r: &v1::ResetReport) -> Vec<&str> {
    r.evidence.iter().map(|e| e.name.as_str()).collect()
}

/// The server aborts 2 s into the connection; it arrives at the client 15 ms later.
fn server_abort(l: &mut Ladder) {
    let t = T0 + 2 * S;
    l.client(&[
        open(1, true, CLIENT, T0, ISN_C),
        rst(1, CLIENT, true, t + 3 * DELAY, ISN_S + 500, 61, v1::Cause::AppAbort),
    ]);
    l.server(&[
        open(7, false, CLIENT, T0, ISN_C),
        rst(7, CLIENT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort),
    ]);
}

#[test]
fn a_reset_both_ends_saw_is_end_to_end_despite_a_skewed_clock() {
    let mut l = Ladder::new();
    server_abort(&mut l);
    l.covered_until(T0 + 10 * S);
    let reports = l.c.decide();
    let r = one(&reports);
    assert_eq!(r.verdict, "end-to-end");
    assert_eq!(r.cause, "app-abort");
    assert_eq!(r.match_key, "tuple+isn");
    assert_eq!(r.accepted, Some(true));
    let dirs: Vec<(&str, &str)> = r.observations.iter().map(|o| (o.agent.as_str(), o.direction.as_str())).collect();
    assert_eq!(dirs, [("server", "out"), ("client", "in")]);
    // Corrected, the server's sighting precedes the client's by the path delay.
    let (s, c) = (r.observations[0].corrected_ns, r.observations[1].corrected_ns);
    assert!((c - s - 3 * DELAY).abs() < MS, "{s} {c}");
    let clock = l.c.clock_estimates()[l.server].unwrap();
    assert!((clock.offset_ns - SKEW).abs() < MS, "{clock:?}");
    assert_eq!(pb::endpoint(r.claimed_sender.as_ref()).unwrap().to_string(), SERVER);
    // Decided once.
    assert!(l.c.decide().is_empty());
}

#[test]
fn a_reset_only_the_receiver_saw_while_the_sender_captured_is_injected() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[open(1, true, CLIENT, T0, ISN_C), rst(1, CLIENT, true, t, ISN_S + 500, 50, v1::Cause::AppAbort)]);
    l.server(&[open(7, false, CLIENT, T0, ISN_C)]);
    l.covered_until(T0 + 10 * S);
    let reports = l.c.decide();
    let r = one(&reports);
    assert_eq!((r.verdict.as_str(), r.cause.as_str(), r.both_directions), ("injected", "middlebox", false));
    assert_eq!(r.location, "between server and client");
    assert!(evidence_names(r).contains(&"sender-silent"), "{:?}", r.evidence);
}

#[test]
fn forged_resets_towards_both_ends_are_injected_both_directions() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[open(1, true, CLIENT, T0, ISN_C), rst(1, CLIENT, true, t, ISN_S + 500, 50, v1::Cause::AppAbort)]);
    l.server(&[
        open(7, false, CLIENT, T0, ISN_C),
        rst(7, CLIENT, false, t + SKEW, ISN_C + 100, 50, v1::Cause::AppAbort),
    ]);
    l.covered_until(T0 + 10 * S);
    let reports = l.c.decide();
    assert_eq!(reports.len(), 2, "{reports:#?}");
    for r in &reports {
        assert_eq!((r.verdict.as_str(), r.both_directions), ("injected", true), "{r:#?}");
    }
}

#[test]
fn a_reset_the_receiver_never_got_while_it_kept_going_is_lost() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[open(1, true, CLIENT, T0, ISN_C), flow_end(1, CLIENT, T0, T0 + 8 * S)]);
    l.server(&[
        open(7, false, CLIENT, T0, ISN_C),
        rst(7, CLIENT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort),
    ]);
    l.covered_until(T0 + 10 * S);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!((r.verdict.as_str(), r.cause.as_str()), ("lost", "app-abort"));
    assert_eq!(r.location, "between server and client");
    let silent = r.evidence.iter().find(|e| e.name == "receiver-silent").unwrap();
    assert!(silent.detail.contains("kept the connection going"), "{silent:?}");
}

#[test]
fn a_reset_that_could_never_arrive_is_not_lost() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    let mut bad = rst(7, CLIENT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort);
    if let Some(v1::event::Kind::Reset(r)) = &mut bad.kind {
        r.checksum = v1::Checksum::Bad as i32;
    }
    l.client(&[open(1, true, CLIENT, T0, ISN_C)]);
    l.server(&[open(7, false, CLIENT, T0, ISN_C), bad]);
    l.covered_until(T0 + 10 * S);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!(r.verdict, "unverified");
    assert!(evidence_names(r).contains(&"not-deliverable"), "{:?}", r.evidence);

    // TTL 2 with three routers on the way: it expires.
    let mut l = Ladder::new();
    l.client(&[open(1, true, CLIENT, T0, ISN_C)]);
    l.server(&[open(7, false, CLIENT, T0, ISN_C), rst(7, CLIENT, true, t + SKEW, ISN_S + 500, 2, v1::Cause::AppAbort)]);
    l.covered_until(T0 + 10 * S);
    assert_eq!(one(&l.c.decide()).verdict, "unverified");
}

#[test]
fn silence_of_an_agent_whose_capture_ended_or_lost_packets_does_not_count() {
    // The server's capture ended 1 s after the handshake.
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[
        open(1, true, CLIENT, T0, ISN_C),
        rst(1, CLIENT, true, t, ISN_S + 500, 50, v1::Cause::AppAbort),
        mark(T0 - S, T0 + 10 * S),
    ]);
    l.server(&[open(7, false, CLIENT, T0, ISN_C), mark(T0 - S + SKEW, T0 + S + SKEW)]);
    l.c.finish_agent(l.server);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!(r.verdict, "unverified");
    assert!(evidence_names(r).contains(&"sender-not-covered"), "{:?}", r.evidence);

    // The server's capture dropped packets around that time.
    let mut l = Ladder::new();
    l.client(&[open(1, true, CLIENT, T0, ISN_C), rst(1, CLIENT, true, t, ISN_S + 500, 50, v1::Cause::AppAbort)]);
    let loss = v1::Event {
        kind: Some(v1::event::Kind::Loss(v1::CaptureLoss {
            from_ns: t + SKEW - S,
            until_ns: t + SKEW + S,
            capture_dropped: 12,
            reason: "libpcap drops".into(),
            ..Default::default()
        })),
    };
    l.server(&[open(7, false, CLIENT, T0, ISN_C), loss]);
    l.covered_until(T0 + 10 * S);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!(r.verdict, "unverified");
    let why = r.evidence.iter().find(|e| e.name == "sender-not-covered").unwrap();
    assert!(why.detail.contains("libpcap drops"), "{why:?}");
}

#[test]
fn a_reset_waits_for_a_late_agent_then_is_decided() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[
        open(1, true, CLIENT, T0, ISN_C),
        rst(1, CLIENT, true, t + 3 * DELAY, ISN_S + 500, 61, v1::Cause::AppAbort),
    ]);
    l.client(&[mark(T0 - S, T0 + 10 * S)]);
    // The server has only reported up to the handshake so far.
    l.server(&[open(7, false, CLIENT, T0, ISN_C), mark(T0 - S + SKEW, T0 + S + SKEW)]);
    assert!(l.c.decide().is_empty());
    let pending = l.c.pending();
    assert_eq!(one(&pending).verdict, "pending");
    assert!(evidence_names(&pending[0]).contains(&"waiting-for-agent"));
    // Its spool drains: the RST and a watermark past it.
    l.server(&[rst(7, CLIENT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort), mark(0, T0 + 10 * S + SKEW)]);
    assert_eq!(one(&l.c.decide()).verdict, "end-to-end");
    assert!(l.c.pending().is_empty());
}

#[test]
fn an_agent_silent_for_longer_than_the_wait_makes_it_unverified() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[open(1, true, CLIENT, T0, ISN_C), rst(1, CLIENT, true, t, ISN_S + 500, 50, v1::Cause::AppAbort)]);
    l.server(&[open(7, false, CLIENT, T0, ISN_C), mark(T0 - S + SKEW, T0 + S + SKEW)]);
    l.client(&[mark(T0 - S, T0 + 30 * S)]);
    assert!(l.c.decide().is_empty());
    l.client(&[mark(0, T0 + 90 * S)]);
    let r = l.c.decide();
    assert_eq!(one(&r).verdict, "unverified");
}

#[test]
fn connections_match_through_nat_by_their_isns() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[
        open(1, true, CLIENT, T0, ISN_C),
        rst(1, CLIENT, true, t + 3 * DELAY, ISN_S + 500, 61, v1::Cause::AppAbort),
    ]);
    l.server(&[
        open(7, false, CLIENT_NAT, T0, ISN_C),
        rst(7, CLIENT_NAT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort),
    ]);
    l.covered_until(T0 + 10 * S);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!((r.verdict.as_str(), r.match_key.as_str()), ("end-to-end", "isn"));
    // The receiver's view names the endpoints.
    assert_eq!(pb::endpoint(r.receiver.as_ref()).unwrap().to_string(), CLIENT);
    let server_view = r.observations.iter().find(|o| o.agent == "server").unwrap();
    assert_eq!(pb::endpoint(server_view.dst.as_ref()).unwrap().to_string(), CLIENT_NAT);
}

#[test]
fn a_reused_tuple_is_two_connections_and_the_reset_belongs_to_the_second() {
    let mut l = Ladder::new();
    let second = T0 + 20 * S;
    let t = second + 2 * S;
    l.client(&[
        open(1, true, CLIENT, T0, ISN_C),
        flow_end(1, CLIENT, T0, T0 + 3 * S),
        open(2, true, CLIENT, second, ISN_C + 77_777),
    ]);
    l.server(&[
        open(7, false, CLIENT, T0, ISN_C),
        flow_end(7, CLIENT, T0 + SKEW, T0 + 3 * S + SKEW),
        open(8, false, CLIENT, second, ISN_C + 77_777),
    ]);
    l.client(&[rst(2, CLIENT, true, t + 3 * DELAY, ISN_S + 500, 61, v1::Cause::AppAbort)]);
    l.server(&[rst(8, CLIENT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort)]);
    l.covered_until(T0 + 40 * S);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!(r.verdict, "end-to-end");
    let records: Vec<&str> = r.observations.iter().map(|o| o.record.as_str()).collect();
    assert_eq!(records, ["server/0000000000000008", "client/0000000000000002"]);
}

#[test]
fn a_reset_with_no_agent_at_the_other_end_is_unverified_with_its_local_evidence() {
    let mut c = Correlator::new(Config::default());
    let client = c.agent("client", &[]);
    let mut e = rst(1, CLIENT, true, T0 + 2 * S, ISN_S + 500, 50, v1::Cause::AppAbort);
    if let Some(v1::event::Kind::Reset(r)) = &mut e.kind {
        r.evidence.push(v1::Evidence { name: "ttl-mismatch".into(), detail: "TTL 50, earlier 61".into() });
    }
    c.ingest(client, &open(1, true, CLIENT, T0, ISN_C));
    c.ingest(client, &e);
    c.ingest(client, &mark(T0 - S, T0 + 10 * S));
    let r = c.finish();
    let r = one(&r);
    assert_eq!((r.verdict.as_str(), r.cause.as_str()), ("unverified", "app-abort"));
    let names = evidence_names(r);
    assert!(names.contains(&"no-sender-agent") && names.contains(&"ttl-mismatch"), "{names:?}");
}

#[test]
fn coverage_knows_runs_and_losses() {
    let mut cov = Coverage::default();
    cov.watermark(100, 200);
    cov.watermark(0, 300);
    cov.watermark(500, 600);
    assert_eq!(cov.runs, [(100, 300), (500, 600)]);
    assert!(cov.gap(150, 250).is_none());
    assert!(cov.gap(350, 400).unwrap().contains("not running"));
    assert!(cov.gap(550, 700).unwrap().contains("ends at"));
    cov.losses.push((560, 570, "drops".into()));
    assert!(cov.gap(550, 580).unwrap().contains("drops"));
}

#[test]
fn compaction_forgets_old_decided_connections_and_keeps_deciding() {
    let mut l = Ladder::new();
    server_abort(&mut l);
    l.covered_until(T0 + 10 * S);
    assert_eq!(one(&l.c.decide()).verdict, "end-to-end");
    // A second connection an hour later, undecided when compaction runs.
    let later = T0 + 3_600 * S;
    l.client(&[
        open(2, true, "198.51.100.2:40001", later, ISN_C),
        rst(2, "198.51.100.2:40001", true, later + S + 3 * DELAY, ISN_S + 9, 61, v1::Cause::AppAbort),
    ]);
    l.server(&[
        open(9, false, "198.51.100.2:40001", later, ISN_C),
        rst(9, "198.51.100.2:40001", true, later + S + SKEW, ISN_S + 9, 64, v1::Cause::AppAbort),
    ]);
    l.client(&[mark(0, later + 2 * S)]);
    assert_eq!(l.c.records(), (4, 4));
    l.c.compact(600 * S);
    assert_eq!(l.c.records(), (2, 2), "the first connection is forgotten");
    l.covered_until(later + 10 * S);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!((r.verdict.as_str(), r.match_key.as_str()), ("end-to-end", "tuple+isn"));
}
