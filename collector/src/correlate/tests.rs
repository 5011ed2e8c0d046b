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
    v1::Event {
        kind: Some(v1::event::Kind::Watermark(v1::Watermark {
            ts_ns: ts,
            since_ns: since,
            ended: false,
            ..Default::default()
        })),
    }
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
    // Whether it covers, asked without the words, agrees with the words everywhere.
    for from in (0..700).step_by(25) {
        for until in (from..750).step_by(25) {
            for vouched in [None, Some(650), Some(250)] {
                assert_eq!(
                    cov.covers_until(from, until, vouched),
                    cov.gap_until(from, until, vouched).is_none(),
                    "[{from}, {until}] vouched to {vouched:?}"
                );
            }
        }
    }
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
    assert!(l.c.handed_out.is_empty(), "and the time of its report with it");
    l.covered_until(later + 10 * S);
    let r = l.c.decide();
    let r = one(&r);
    assert_eq!((r.verdict.as_str(), r.match_key.as_str()), ("end-to-end", "tuple+isn"));
    assert_eq!(l.c.handed_out.get(&r.id), Some(&r.ts_ns));
}

#[test]
fn forged_resets_decided_at_different_times_still_pair_up_both_directions() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[open(1, true, CLIENT, T0, ISN_C), rst(1, CLIENT, true, t, ISN_S + 500, 50, v1::Cause::AppAbort)]);
    l.server(&[open(7, false, CLIENT, T0, ISN_C)]);
    l.covered_until(T0 + 10 * S);
    let first = l.c.decide();
    assert_eq!((first[0].verdict.as_str(), first[0].both_directions), ("injected", false));
    // The server's forged RST only arrives now (its agent's spool drained late).
    l.server(&[rst(7, CLIENT, false, t + SKEW + MS, ISN_C + 100, 50, v1::Cause::AppAbort)]);
    let second = l.c.decide();
    assert_eq!(second.len(), 2, "the first report is handed out again, now paired: {second:#?}");
    assert!(second.iter().all(|r| r.verdict == "injected" && r.both_directions));
    assert!(second.iter().any(|r| r.id == first[0].id), "replaced under the same id");
}

#[test]
fn a_late_sighting_replaces_the_report_under_the_same_id() {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    // The client's capture is decided without the RST (its agent claimed coverage too early).
    l.client(&[open(1, true, CLIENT, T0, ISN_C), mark(T0 - S, T0 + 10 * S)]);
    l.server(&[
        open(7, false, CLIENT, T0, ISN_C),
        rst(7, CLIENT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort),
    ]);
    l.server(&[mark(T0 - S + SKEW, T0 + 10 * S + SKEW)]);
    let first = l.c.decide();
    assert_eq!(one(&first).verdict, "lost");
    l.client(&[rst(1, CLIENT, true, t + 3 * DELAY, ISN_S + 500, 61, v1::Cause::AppAbort)]);
    let second = l.c.decide_with_previous();
    assert_eq!(second.len(), 1, "{second:#?}");
    let (r, previous) = &second[0];
    assert_eq!((r.verdict.as_str(), r.id.as_str()), ("end-to-end", first[0].id.as_str()));
    assert_eq!(*previous, Some(first[0].ts_ns), "it names the time it was handed out under");
    assert!(l.c.decide().is_empty(), "nothing changed since");
}

#[test]
fn a_host_whose_agent_saw_nothing_of_the_connection_did_not_send_its_reset() {
    // The router refused the SYN in the server's name; the server's agent (told its address)
    // captured the whole time and saw neither the SYN nor a RST.
    let mut c = Correlator::new(Config::default());
    let client = c.agent("client", &["198.51.100.2".parse().unwrap()]);
    let server = c.agent("server", &["203.0.113.10".parse().unwrap()]);
    let mut refused = rst(1, CLIENT, true, T0 + 10 * MS, 0, 62, v1::Cause::Refused);
    if let Some(v1::event::Kind::Reset(r)) = &mut refused.kind {
        r.ack = ISN_C + 1;
    }
    c.ingest(client, &refused);
    // No handshake measured the clocks: the allowance is the 10 s skew limit either side.
    c.ingest(client, &mark(T0 - 30 * S, T0 + 30 * S));
    c.ingest(server, &mark(T0 - 30 * S + SKEW, T0 + 30 * S + SKEW));
    let r = c.decide();
    let r = one(&r);
    assert_eq!((r.verdict.as_str(), r.cause.as_str()), ("injected", "middlebox"));
    let silent = r.evidence.iter().find(|e| e.name == "sender-silent").unwrap();
    assert!(silent.detail.contains("seeing nothing of the connection"), "{silent:?}");
}

/// A watermark that vouches up to `until` apart from the `settling` RSTs it lists, its plain
/// promise held at `ts`.
fn listed(since: i64, ts: i64, until: i64, settling: Vec<v1::SettlingRst>) -> v1::Event {
    v1::Event {
        kind: Some(v1::event::Kind::Watermark(v1::Watermark {
            ts_ns: ts,
            since_ns: since,
            ended: false,
            listed_until_ns: until,
            settling,
        })),
    }
}

/// A RST an agent still holds in its settle window, as its watermark lists it.
fn settling(conn_id: u64, src: &str, dst: &str, ts: i64, seq: u32) -> v1::SettlingRst {
    v1::SettlingRst { ts_ns: ts, src: Some(ep(src)), dst: Some(ep(dst)), conn_id, seq, ack: 0, flags: 0x014 }
}

/// The client gets a RST in the server's name that the server never sent, 2 s into the
/// connection; the server's agent holds its plain watermark 500 ms before it (some RST of its
/// own settles), and lists what it holds in `server_listing` (`None`: an agent before listings).
/// Returns the verdicts decided by then.
fn forged_while_the_server_settles(
    server_extra: &[v1::Event],
    server_listing: Option<Vec<v1::SettlingRst>>,
) -> Vec<String> {
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[
        open(1, true, CLIENT, T0, ISN_C),
        rst(1, CLIENT, true, t, ISN_S + 500, 50, v1::Cause::AppAbort),
        mark(T0 - S, T0 + 10 * S),
    ]);
    l.server(&[open(7, false, CLIENT, T0, ISN_C)]).server(server_extra);
    let held = t - 500 * MS + SKEW;
    l.server(&[match server_listing {
        Some(list) => listed(T0 - S + SKEW, held, T0 + 10 * S + SKEW, list),
        None => mark(T0 - S + SKEW, held),
    }]);
    let reports = l.c.decide();
    if reports.is_empty() {
        let pending = l.c.pending();
        assert!(evidence_names(one(&pending)).contains(&"waiting-for-agent"), "{pending:#?}");
    }
    reports.iter().map(|r| r.verdict.clone()).collect()
}

#[test]
fn a_listed_watermark_vouches_past_settling_rsts_that_cannot_be_the_one_decided() {
    let other = "198.51.100.2:40001";
    let server_at = |ms: i64| T0 + 2 * S + ms * MS + SKEW;
    // The server's clock 4.2 s behind, the listed RST 400 ms before the forged one: unrelated
    // by record, tuple and identity.
    let unrelated = settling(8, SERVER, other, server_at(-400), 123);
    let injected = vec!["injected".to_string()];
    assert_eq!(forged_while_the_server_settles(&[], Some(vec![unrelated.clone()])), injected);
    assert_eq!(forged_while_the_server_settles(&[], Some(Vec::new())), injected, "nothing settling");
    // An agent that lists nothing is waited for as before.
    assert!(forged_while_the_server_settles(&[], None).is_empty());

    // Each way a settling RST could join the connection's group keeps it waiting, whatever
    // the others say. The connection's tuple, another record (a sensor splits records in time):
    let same_tuple = settling(70, SERVER, CLIENT, server_at(-400), 123);
    // the forged RST's identity, a tuple NAT made unknown:
    let same_identity = settling(71, SERVER, CLIENT_NAT, server_at(0), ISN_S + 500);
    // a record known by the group's ISNs (it could not join: the server has one already).
    let isn_record = [open(9, false, CLIENT_NAT, T0, ISN_C)];
    let by_isns = settling(9, SERVER, CLIENT_NAT, server_at(-400), 123);
    // a record known by the TSvals of the group's (other ISNs: a firewall rewrote them).
    let with_tsvals = |conn_id, client, isn| {
        let mut e = open(conn_id, false, client, T0, isn);
        if let Some(v1::event::Kind::Open(o)) = &mut e.kind {
            (o.syn_tsval, o.synack_tsval) = (Some(11), Some(22));
        }
        e
    };
    let tsval_record = [with_tsvals(7, CLIENT, ISN_C), with_tsvals(10, CLIENT_NAT, ISN_C + 5)];
    let by_tsvals = settling(10, SERVER, CLIENT_NAT, server_at(-400), 123);
    let cases = [(&[][..], same_tuple), (&[], same_identity), (&isn_record, by_isns), (&tsval_record, by_tsvals)];
    for (extra, entry) in cases {
        let verdicts = forged_while_the_server_settles(extra, Some(vec![unrelated.clone(), entry.clone()]));
        assert!(verdicts.is_empty(), "{entry:?} let it be decided: {verdicts:?}");
    }
    // Those records alone do not hold it up.
    assert_eq!(forged_while_the_server_settles(&isn_record, Some(vec![unrelated.clone()])), injected);
    assert_eq!(forged_while_the_server_settles(&tsval_record, Some(vec![unrelated])), injected);
}

#[test]
fn a_listed_rst_that_is_the_one_decided_keeps_it_pending_until_it_arrives() {
    // The server aborts; the client's sighting arrives first, the server's is still settling
    // and listed, with the same tuple and identity.
    let mut l = Ladder::new();
    let t = T0 + 2 * S;
    l.client(&[
        open(1, true, CLIENT, T0, ISN_C),
        rst(1, CLIENT, true, t + 3 * DELAY, ISN_S + 500, 61, v1::Cause::AppAbort),
        mark(T0 - S, T0 + 10 * S),
    ]);
    let own = settling(7, SERVER, CLIENT, t + SKEW, ISN_S + 500);
    l.server(&[open(7, false, CLIENT, T0, ISN_C), listed(T0 - S + SKEW, t + SKEW - 1, T0 + 10 * S + SKEW, vec![own])]);
    assert!(l.c.decide().is_empty(), "not lost, not injected: the server's sighting is on its way");
    l.server(&[
        rst(7, CLIENT, true, t + SKEW, ISN_S + 500, 64, v1::Cause::AppAbort),
        listed(0, T0 + 10 * S + SKEW, T0 + 11 * S + SKEW, Vec::new()),
    ]);
    assert_eq!(one(&l.c.decide()).verdict, "end-to-end");
}

#[test]
fn through_nat_a_listed_rst_with_the_decided_ones_identity_keeps_it_pending() {
    // A SYN refused at the server, through NAT: no handshake joins the records, and the
    // server's record of it is unknown until its RST arrives. The server's agent is told its
    // address, so its silence would count.
    let mut c = Correlator::new(Config::default());
    let client = c.agent("client", &["198.51.100.2".parse().unwrap()]);
    let server = c.agent("server", &["203.0.113.10".parse().unwrap()]);
    let refused = |conn_id, client_ep: &str, ts, ttl| {
        let mut e = rst(conn_id, client_ep, true, ts, 0, ttl, v1::Cause::Refused);
        if let Some(v1::event::Kind::Reset(r)) = &mut e.kind {
            r.ack = ISN_C + 1;
        }
        e
    };
    c.ingest(client, &refused(1, CLIENT, T0 + 10 * MS, 62));
    c.ingest(client, &mark(T0 - 30 * S, T0 + 30 * S));
    let mut own = settling(5, SERVER, CLIENT_NAT, T0 + SKEW, 0);
    own.ack = ISN_C + 1;
    let unrelated = settling(6, SERVER, "203.0.113.1:61001", T0 + SKEW + MS, 0);
    let until = T0 + 30 * S + SKEW;
    c.ingest(server, &listed(T0 - 30 * S + SKEW, T0 + SKEW - 1, until, vec![unrelated.clone(), own]));
    assert!(c.decide().is_empty(), "its sighting may come under another tuple");
    c.ingest(server, &refused(5, CLIENT_NAT, T0 + SKEW, 64));
    c.ingest(server, &listed(0, until, until + S, vec![unrelated]));
    let r = c.decide();
    let r = one(&r);
    assert_eq!((r.verdict.as_str(), r.match_key.as_str()), ("end-to-end", "rst-identity"));
}

#[test]
fn a_plain_watermark_after_a_listed_one_takes_the_listing_back() {
    // As after a restart: the store keeps the plain promise only.
    let mut cov = Coverage::default();
    let w = |ts_ns, listed_until_ns| v1::Watermark { ts_ns, listed_until_ns, ..Default::default() };
    cov.watermark(100, 200);
    cov.listed = Listed::of(&w(200, 900));
    assert_eq!(cov.listed.as_ref().map(|l| l.until_ns), Some(900));
    assert!(cov.gap_until(150, 800, Some(900)).is_none());
    assert!(cov.gap(150, 800).unwrap().contains("ends at"));
    cov.listed = Listed::of(&w(300, 0));
    assert_eq!(cov.listed, None);
    // A listing with an unreadable entry promises nothing.
    let mut bad = w(200, 900);
    bad.settling.push(v1::SettlingRst { ts_ns: 150, ..Default::default() });
    assert_eq!(Listed::of(&bad), None);
}
