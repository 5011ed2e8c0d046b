//! Every cause and injection sign of `shared/docs/reset-causes.md`, as small hand-written traces.
//!
//! Each test is a ladder diagram (see `rstscope_agent::trace`) and the expected RST events, one
//! line each: time, sender role, flags, cause, phase, sequence relation and evidence names, then
//! the connection summaries (conn_state and history). Update with `UPDATE_EXPECT=1 cargo test`
//! and review the diff like any other code change.

use expect_test::{expect, Expect};
use rstscope_agent::event::Event;
use rstscope_agent::flow::{track_all, TrackerConfig};
use rstscope_agent::trace::{self, T0_NS};

fn render(events: &[Event]) -> String {
    let mut out = String::new();
    for event in events {
        match event {
            Event::Reset(r) => {
                let evidence: Vec<&str> = r.evidence.iter().map(|e| e.name).collect();
                out += &format!(
                    "RST  {:>8.3}ms {} {:<3} cause={} phase={} rel={} [{}]\n",
                    (r.ts_ns - T0_NS) as f64 / 1e6,
                    r.sender.as_str(),
                    r.flags.to_string(),
                    r.cause.as_str(),
                    r.phase.as_str(),
                    r.seq_relation.as_str(),
                    evidence.join(" ")
                );
            }
            // Opens have their own test (opens.rs).
            Event::Open(_) => {}
            Event::Flow(f) => {
                out += &format!(
                    "FLOW {} > {} {} {}{}\n",
                    f.orig,
                    f.resp,
                    f.conn_state,
                    f.history,
                    if f.port_reuse { " port-reuse" } else { "" }
                );
            }
        }
    }
    out
}

fn check(trace: &str, expect: Expect) {
    let segments = trace::parse(trace).expect("valid trace");
    let events = track_all(TrackerConfig::default(), &segments);
    expect.assert_eq(&render(&events));
}

#[test]
fn refused() {
    check(
        "
        0ms   > S
        0.2ms < RA
        ",
        expect![[r#"
            RST     0.200ms resp RA  cause=refused phase=syn-sent rel=exact [answers-syn]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 REJ Sr
        "#]],
    );
}

#[test]
fn refused_by_a_listener_that_just_accepted_is_overloaded() {
    check(
        "
        0ms   > S   cport=40001
        1ms   < SA
        2ms   > A
        3ms   > S   cport=40002
        3.2ms < RA
        ",
        expect![[r#"
            FLOW 198.51.100.7:40001 > 203.0.113.9:80 S1 ShA
            RST     3.200ms resp RA  cause=refused phase=syn-sent rel=exact [answers-syn listener-overloaded]
            FLOW 198.51.100.7:40002 > 203.0.113.9:80 REJ Sr
        "#]],
    );
}

#[test]
fn duplicate_syn_cancel() {
    check(
        "
        0ms   > S   sport=445
        1ms   > S   sport=139
        5ms   < SA  sport=445
        5.5ms < SA  sport=139
        6ms   > A   sport=445
        6.2ms > R   sport=139
        ",
        expect![[r#"
            FLOW 198.51.100.7:40000 > 203.0.113.9:445 S1 ShA
            RST     6.200ms orig R   cause=duplicate-syn-cancel phase=syn-received rel=exact [racing-syn cancelled-after-syn-ack]
            FLOW 198.51.100.7:40000 > 203.0.113.9:139 RSTO ShR
        "#]],
    );
}

#[test]
fn retransmission_timeout() {
    check(
        "
        0ms    > S
        1ms    < SA
        2ms    > A
        3ms    > PA  len=100
        203ms  > PA  len=100 seq=1001
        603ms  > PA  len=100 seq=1001
        1403ms > PA  len=100 seq=1001
        3003ms > RA  seq=1101
        ",
        expect![[r#"
            RST  3003.000ms orig RA  cause=retransmission-timeout phase=established rel=exact [retransmissions-before]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTO ShADTR
        "#]],
    );
}

#[test]
fn app_abort_after_request() {
    check(
        "
        0ms   > S
        1ms   < SA
        2ms   > A
        3ms   > PA  len=100
        4ms   < A
        5ms   < RA
        ",
        expect![[r#"
            RST     5.000ms resp RA  cause=app-abort phase=established rel=exact [in-sequence after-peer-data stage-after-first-data]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADar
        "#]],
    );
}

#[test]
fn no_connection_midstream() {
    check(
        "
        0ms   > PA  len=100 seq=777 ack=999
        1ms   < R   seq=999
        ",
        expect![[r#"
            RST     1.000ms resp R   cause=no-connection phase=midstream rel=exact [answers-segment]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTRH Dr
        "#]],
    );
}

#[test]
fn no_connection_after_long_silence() {
    check(
        "
        0ms     > S
        1ms     < SA
        2ms     > A
        120s    > PA len=10
        120.001s < R
        ",
        expect![[r#"
            RST  120001.000ms resp R   cause=no-connection phase=established rel=exact [answers-segment stage-after-first-data]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADr
        "#]],
    );
}

#[test]
fn port_reuse_stale_ack() {
    check(
        "
        0ms      > S
        1ms      < SA
        2ms      > A
        3ms      > FA
        4ms      < FA
        5ms      > A
        1s       > S   seq=500
        1.001s   < A   seq=5002 ack=1003
        1.002s   > R   seq=1003
        ",
        expect![[r#"
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 SF ShAFf
            RST  1002.000ms orig R   cause=port-reuse phase=syn-sent rel=exact [stale-ack tuple-reused]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTOS0 SaR port-reuse
        "#]],
    );
}

#[test]
fn after_close() {
    check(
        "
        0ms   > S
        1ms   < SA
        2ms   > A
        3ms   > FA
        4ms   < FA
        5ms   > R
        ",
        expect![[r#"
            RST     5.000ms orig R   cause=after-close phase=closing rel=exact [fin-both-directions]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 SF ShAFfR
        "#]],
    );
}

#[test]
fn lone() {
    check(
        "
        0ms   > R   seq=12345
        ",
        expect![[r#"
            RST     0.000ms orig R   cause=lone phase=none rel=unknown [no-other-packet]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 OTH R
        "#]],
    );
}

#[test]
fn unknown_when_nothing_fits() {
    check(
        "
        0ms   > S
        1ms   < SA
        2ms   < R   seq=5001
        ",
        expect![[r#"
            RST     2.000ms resp R   cause=unknown phase=syn-received rel=exact []
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR Shr
        "#]],
    );
}

#[test]
fn injected_after_first_data_shows_ttl_ip_id_and_race() {
    check(
        "
        0ms   > S
        10ms  < SA  ttl=50
        11ms  > A
        12ms  > PA  len=200
        13ms  < RA  ttl=61 id=0
        20ms  < A   ttl=50
        21ms  < PA  len=1000 ttl=50
        ",
        expect![[r#"
            RST    13.000ms resp RA  cause=app-abort phase=established rel=exact [in-sequence after-peer-data ttl-mismatch ip-id-zero stage-after-first-data race-after-rst]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADrad
        "#]],
    );
}

#[test]
fn burst_of_identical_resets() {
    check(
        "
        0ms   > S
        1ms   < SA
        2ms   > A
        3ms   > PA  len=50
        4ms   < RA
        4.1ms < RA  seq=5001
        4.2ms < RA  seq=5001
        ",
        expect![[r#"
            RST     4.000ms resp RA  cause=app-abort phase=established rel=exact [in-sequence after-peer-data stage-after-first-data rst-burst]
            RST     4.100ms resp RA  cause=app-abort phase=reset rel=exact [in-sequence after-peer-data repeated-rst rst-burst]
            RST     4.200ms resp RA  cause=app-abort phase=reset rel=exact [in-sequence after-peer-data repeated-rst rst-burst]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADr
        "#]],
    );
}

#[test]
fn in_window_reset_draws_a_challenge_ack() {
    check(
        "
        0ms   > S
        1ms   < SA
        2ms   > A
        3ms   < R   seq=5500
        4ms   > A
        5ms   > PA  len=10
        ",
        expect![[r#"
            RST     3.000ms resp R   cause=unknown phase=established rel=in-window [stage-after-handshake ineffective challenge-ack]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShArD
        "#]],
    );
}

#[test]
fn resets_in_both_directions() {
    check(
        "
        0ms   > S
        1ms   < SA
        2ms   > A
        3ms   > PA  len=80
        4ms   < RA
        4.1ms > RA
        ",
        expect![[r#"
            RST     4.000ms resp RA  cause=app-abort phase=established rel=exact [in-sequence after-peer-data stage-after-first-data both-directions]
            RST     4.100ms orig RA  cause=no-connection phase=reset rel=exact [answers-segment both-directions]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADrR
        "#]],
    );
}

#[test]
fn bad_checksum_is_reported() {
    check(
        "
        0ms   > S
        1ms   < SA
        2ms   > A
        3ms   < RA  bad
        ",
        expect![[r#"
            RST     3.000ms resp RA  cause=app-abort phase=established rel=exact [in-sequence stage-after-handshake bad-checksum]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 S1 ShAc
        "#]],
    );
}

#[test]
fn no_connection_answering_fin_after_injected_reset() {
    // A router drops the request and forges a RST to the client (TTL of a router's own stack,
    // IP ID 0); the server never heard of it and closes 1.5 s later; the client, whose socket
    // the forged RST killed, answers the FIN with seq = the FIN's ack. Its next seq counts the
    // dropped request, so the RST is not in sequence with what it sent.
    check(
        "
        0ms     > S
        1ms     < SA  ttl=62
        2ms     > A
        3ms     > PA  len=24
        3.1ms   < R   seq=5001 ttl=64 id=0
        1503ms  < FA  ack=1001 ttl=62
        1503.1ms > R  seq=1001 id=0
        ",
        expect![[r#"
            RST     3.100ms resp R   cause=app-abort phase=established rel=exact [in-sequence after-peer-data ip-id-zero stage-after-first-data race-after-rst]
            RST  1503.100ms orig R   cause=no-connection phase=half-closed rel=exact [answers-segment]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADrfR
        "#]],
    );
}

#[test]
fn no_connection_answering_fin_in_a_new_record_after_injected_reset() {
    // As above, but the server closes only after the reset record was summarised (linger 5 s):
    // the FIN starts a new, midstream record.
    check(
        "
        0ms     > S
        1ms     < SA  ttl=62
        2ms     > A
        3ms     > PA  len=24
        3.1ms   < R   seq=5001 ttl=64 id=0
        8s      < FA  ack=1001 ttl=62
        8.0001s > R   seq=1001 id=0
        ",
        expect![[r#"
            RST     3.100ms resp R   cause=app-abort phase=established rel=exact [in-sequence after-peer-data ip-id-zero stage-after-first-data]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADr
            RST  8000.100ms orig R   cause=no-connection phase=half-closed rel=exact [answers-segment]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTO ^fR
        "#]],
    );
}

#[test]
fn kernel_reset_with_ip_id_zero_is_not_an_injection_sign() {
    // After a NAT or firewall timeout the server's stack no longer knows the connection and
    // answers statelessly; Linux sends such RSTs with IP ID 0 (and DF). That is the genuine
    // packet, so no `ip-id-zero`, although the server's earlier IDs were non-zero.
    check(
        "
        0ms      > S
        1ms      < SA  id=4711
        2ms      > A
        120s     > PA  len=10
        120.001s < R   id=0
        ",
        expect![[r#"
            RST  120001.000ms resp R   cause=no-connection phase=established rel=exact [answers-segment stage-after-first-data]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTR ShADr
        "#]],
    );
}

#[test]
fn no_connection_after_own_reset_keeps_quiet_about_ip_id_zero() {
    // The client aborts, the server's data still in flight arrives, and the client's stack,
    // without a socket now, answers it (IP ID 0) while its live socket's RST had a real ID.
    check(
        "
        0ms    > S
        1ms    < SA
        2ms    > A
        3ms    > PA  len=10
        4ms    > RA
        5ms    < PA  len=100
        5.1ms  > R   id=0
        ",
        expect![[r#"
            RST     4.000ms orig RA  cause=app-abort phase=established rel=exact [in-sequence]
            RST     5.100ms orig R   cause=no-connection phase=reset rel=exact [answers-segment]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTO ShADRd
        "#]],
    );
}

#[test]
fn answers_segment_names_why() {
    let segments = trace::parse(
        "
        0ms     > S
        1ms     < SA  ttl=62
        2ms     > A
        3ms     > PA  len=24
        3.1ms   < R   seq=5001 ttl=64 id=0
        1503ms  < FA  ack=1001 ttl=62
        1503.1ms > R  seq=1001 id=0
        ",
    )
    .expect("valid trace");
    let events = track_all(TrackerConfig::default(), &segments);
    let details: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Reset(r) => Some(r.evidence.iter().map(|e| format!("{}: {}", e.name, e.detail)).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    expect![[r#"
        [
            "in-sequence: seq 5001 is the sender's next sequence number",
            "after-peer-data: 100.0us after 24 bytes from the peer",
            "ip-id-zero: IP ID 0 where the sender's last was 200",
            "stage-after-first-data: RST right after the originator's first data segment",
            "race-after-rst: the resetting sender kept sending 1.500s after its RST",
            "answers-segment: seq = the answered segment's ack (1001); the sender received a RST from the peer and has sent nothing since (its last packet 1.500s before), so its socket is gone; the peer kept sending after that RST (its next seq was 1025: 24 bytes of sequence space it sent were never acknowledged)",
        ]
    "#]].assert_debug_eq(&details);
}

#[test]
fn a_bare_reset_answering_the_fin_is_not_an_ip_id_zero_sign() {
    // The server's view of the router-forged reset above: the router dropped the request, so
    // the server saw only the handshake; it closes 1.5 s later and the client's stack, whose
    // socket the forged RST killed (unseen here), answers the FIN statelessly: bare R, seq =
    // the FIN's ack, IP ID 0. Genuine, so no injection sign, though the client's IDs were not 0.
    check(
        "
        0ms      > S
        1ms      < SA
        2ms      > A
        1502ms   < FA
        1503ms   > R   seq=1001 id=0
        ",
        expect![[r#"
            RST  1503.000ms orig R   cause=app-abort phase=half-closed rel=exact [in-sequence]
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 RSTO ShAfR
        "#]],
    );
}
