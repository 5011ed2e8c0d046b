//! Connection Open events (a connection's identity, sent early): when each record gets one and
//! what it carries, as small hand-written traces.
//!
//! Each test is a ladder diagram (see `rstscope_agent::trace`) and the events in order: one
//! `OPEN` line per Open with every field (times relative to the trace start, `-` for absent),
//! and `FLOW` lines for the records, so it shows which record each Open belongs to and that it
//! comes before the summary. Update with `UPDATE_EXPECT=1 cargo test` and review the diff.

use expect_test::{expect, Expect};
use rstscope_agent::event::{ConnOpen, Event};
use rstscope_agent::flow::{track_all, TrackerConfig};
use rstscope_agent::trace::{self, T0_NS};

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

fn ms(ns: Option<i64>) -> String {
    opt(ns.map(|ns| format!("{}ms", (ns - T0_NS) as f64 / 1e6)))
}

fn render_open(o: &ConnOpen) -> String {
    format!(
        "OPEN {} > {} start={} isn={}/{} syn={} synack={} tsval={}/{} opts={} ttl={}/{} syn_ip_id={}{}\n",
        o.orig,
        o.resp,
        ms(Some(o.start_ns)),
        opt(o.orig_isn),
        opt(o.resp_isn),
        ms(o.syn_ns),
        ms(o.synack_ns),
        opt(o.syn_tsval),
        opt(o.synack_tsval),
        if o.syn_options.is_empty() { "-".to_string() } else { o.syn_options.to_string() },
        opt(o.orig_ttl),
        opt(o.resp_ttl),
        opt(o.syn_ip_id),
        if o.midstream { " midstream" } else { "" }
    )
}

fn render(events: &[Event]) -> String {
    let mut out = String::new();
    for event in events {
        match event {
            Event::Open(o) => out += &render_open(o),
            Event::Flow(f) => {
                let reuse = if f.port_reuse { " port-reuse" } else { "" };
                out += &format!("FLOW {} > {} {} {}{reuse}\n", f.orig, f.resp, f.conn_state, f.history);
            }
            Event::Reset(_) => {}
        }
    }
    out
}

fn check(trace: &str, expect: Expect) {
    let segments = trace::parse(trace).expect("valid trace");
    let events = track_all(TrackerConfig::default(), &segments);
    // Exactly once per record: the Open's id names a record with a summary, and no id twice.
    let mut open_ids: Vec<_> =
        events.iter().filter_map(|e| if let Event::Open(o) = e { Some(o.conn_id) } else { None }).collect();
    let flow_ids: Vec<_> =
        events.iter().filter_map(|e| if let Event::Flow(f) = e { Some(f.conn_id) } else { None }).collect();
    assert!(open_ids.iter().all(|id| flow_ids.contains(id)), "an Open without its record");
    let n = open_ids.len();
    open_ids.sort_by_key(|id| id.0);
    open_ids.dedup();
    assert_eq!(open_ids.len(), n, "a record with two Opens");
    expect.assert_eq(&render(&events));
}

#[test]
fn normal_handshake_carries_both_isns_times_timestamps_options_and_ttls() {
    check(
        "
        0ms   > S   opts=M1460,S,T,N,W7 tsval=111 ttl=64 id=4242
        0.3ms > S   opts=M1460,S,T,N,W7 tsval=112 ttl=63 seq=1000
        1.5ms < SA  opts=M1400,S,T,N,W9 tsval=9000 ttl=52
        1.6ms < SA  seq=5000 tsval=9001
        2ms   > A
        3ms   > PA  len=100
        4ms   < A
        ",
        expect![[r#"
            OPEN 198.51.100.7:40000 > 203.0.113.9:80 start=0ms isn=1000/5000 syn=0ms synack=1.5ms tsval=111/9000 opts=M1460,S,T,N,W7 ttl=64/52 syn_ip_id=4242
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 S1 ShADa
        "#]],
    );
}

#[test]
fn midstream_connection_opens_with_its_first_packet() {
    check(
        "
        0ms > PA  len=100 ttl=61
        1ms < A   ttl=50
        2ms > PA  len=100
        ",
        expect![[r#"
            OPEN 198.51.100.7:40000 > 203.0.113.9:80 start=0ms isn=-/- syn=- synack=- tsval=-/- opts=- ttl=61/- syn_ip_id=- midstream
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 OTH Da
        "#]],
    );
}

#[test]
fn capture_starting_at_the_syn_ack_knows_the_responder_only() {
    check(
        "
        0ms < SA  tsval=77 ttl=50 seq=5000 ack=1001
        1ms > A
        ",
        expect![[r#"
            OPEN 198.51.100.7:40000 > 203.0.113.9:80 start=0ms isn=-/5000 syn=- synack=0ms tsval=-/77 opts=- ttl=-/50 syn_ip_id=-
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 S1 ^hA
        "#]],
    );
}

#[test]
fn refused_syn_has_no_open() {
    check(
        "
        0ms   > S
        0.2ms < RA
        ",
        expect![[r#"
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 REJ Sr
        "#]],
    );
}

#[test]
fn unanswered_syn_has_no_open() {
    check(
        "
        0s > S
        1s > S  seq=1000
        3s > S  seq=1000
        ",
        expect![[r#"
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 S0 S
        "#]],
    );
}

#[test]
fn port_reuse_gives_each_record_its_own_open() {
    check(
        "
        0ms   > S   tsval=10 opts=M1460,N,W8,N,N,S
        1ms   < SA
        2ms   > A
        3ms   > FA
        4ms   < FA
        5ms   > A
        100ms > S   seq=90000 tsval=20 opts=M1460,N,W8,N,N,S
        101ms < SA  seq=70000
        102ms > A   seq=90001 ack=70001
        ",
        expect![[r#"
            OPEN 198.51.100.7:40000 > 203.0.113.9:80 start=0ms isn=1000/5000 syn=0ms synack=1ms tsval=10/- opts=M1460,N,W8,N,N,S ttl=64/58 syn_ip_id=100
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 SF ShAFf
            OPEN 198.51.100.7:40000 > 203.0.113.9:80 start=100ms isn=90000/70000 syn=100ms synack=101ms tsval=20/- opts=M1460,N,W8,N,N,S ttl=64/58 syn_ip_id=104
            FLOW 198.51.100.7:40000 > 203.0.113.9:80 S1 ShA port-reuse
        "#]],
    );
}

#[test]
fn ipv6_handshake_has_hop_limits_and_no_ip_id() {
    check(
        "
        0ms > S   v6 opts=M1440,S,T,N,W7 tsval=5 ttl=64
        2ms < SA  v6 tsval=6 ttl=57
        3ms > A   v6
        ",
        expect![[r#"
            OPEN [2001:db8::7]:40000 > [2001:db8::9]:80 start=0ms isn=1000/5000 syn=0ms synack=2ms tsval=5/6 opts=M1440,S,T,N,W7 ttl=64/57 syn_ip_id=-
            FLOW [2001:db8::7]:40000 > [2001:db8::9]:80 S1 ShA
        "#]],
    );
}
