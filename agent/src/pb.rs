//! Domain values -> `rstscope.v1` protobuf messages, in one place.
//!
//! The agent's domain types ([`crate::event`]) do not derive prost messages: the wire format is
//! versioned and must not change when an internal type does. Every enum is matched
//! exhaustively, so a new variant in the domain fails to compile here instead of silently
//! turning into `*_UNSPECIFIED` on the wire.

use std::net::IpAddr;

use rstscope_proto::v1;

use crate::event::{
    Answered, Cause, ConnOpen, DirectionSummary, Evidence, FlowEnd, FlowSummary, Phase, Role, RstEvent, SeqRelation,
    TtlRange,
};
use crate::flow::SettlingRst;
use crate::wire::Checksum;

/// The evidence name the classifier uses for a wrong IPv4 header checksum; the protocol carries
/// the same fact as the `ip_header_ok` field.
const BAD_IP_CHECKSUM: &str = "bad-ip-checksum";

/// An endpoint on the wire: 4 address bytes for IPv4, 16 for IPv6.
///
/// A function, not `From`: both types belong to `rstscope-proto`, so the orphan rule puts a
/// `From` impl there; this crate keeps its conversions here.
pub fn endpoint(ep: rstscope_proto::Endpoint) -> v1::Endpoint {
    let ip = match ep.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    v1::Endpoint { ip, port: u32::from(ep.port()) }
}

impl From<Role> for v1::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Originator => v1::Role::Originator,
            Role::Responder => v1::Role::Responder,
        }
    }
}

impl From<Phase> for v1::Phase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::None => v1::Phase::None,
            Phase::SynSent => v1::Phase::SynSent,
            Phase::SynReceived => v1::Phase::SynReceived,
            Phase::Established => v1::Phase::Established,
            Phase::HalfClosed => v1::Phase::HalfClosed,
            Phase::Closing => v1::Phase::Closing,
            Phase::Reset => v1::Phase::Reset,
            Phase::Midstream => v1::Phase::Midstream,
        }
    }
}

impl From<Cause> for v1::Cause {
    fn from(cause: Cause) -> Self {
        // `CAUSE_MIDDLEBOX` has no domain counterpart: only the collector decides it.
        match cause {
            Cause::Refused => v1::Cause::Refused,
            Cause::DuplicateSynCancel => v1::Cause::DuplicateSynCancel,
            Cause::RetransmissionTimeout => v1::Cause::RetransmissionTimeout,
            Cause::AppAbort => v1::Cause::AppAbort,
            Cause::NoConnection => v1::Cause::NoConnection,
            Cause::PortReuse => v1::Cause::PortReuse,
            Cause::AfterClose => v1::Cause::AfterClose,
            Cause::Lone => v1::Cause::Lone,
            Cause::Unknown => v1::Cause::Unknown,
        }
    }
}

impl From<SeqRelation> for v1::SeqRelation {
    fn from(relation: SeqRelation) -> Self {
        match relation {
            SeqRelation::Exact => v1::SeqRelation::Exact,
            SeqRelation::InWindow => v1::SeqRelation::InWindow,
            SeqRelation::OutOfWindow => v1::SeqRelation::OutOfWindow,
            SeqRelation::Unknown => v1::SeqRelation::Unknown,
        }
    }
}

impl From<Checksum> for v1::Checksum {
    fn from(checksum: Checksum) -> Self {
        match checksum {
            Checksum::Good => v1::Checksum::Good,
            Checksum::Bad => v1::Checksum::Bad,
            Checksum::Unverified => v1::Checksum::Unverified,
        }
    }
}

impl From<FlowEnd> for v1::FlowEnd {
    fn from(end: FlowEnd) -> Self {
        match end {
            FlowEnd::Closed => v1::FlowEnd::Closed,
            FlowEnd::Inactive => v1::FlowEnd::Inactive,
            FlowEnd::Unanswered => v1::FlowEnd::Unanswered,
            FlowEnd::Evicted => v1::FlowEnd::Evicted,
            FlowEnd::Reused => v1::FlowEnd::Reused,
            FlowEnd::EndOfInput => v1::FlowEnd::EndOfInput,
        }
    }
}

impl From<&Evidence> for v1::Evidence {
    fn from(evidence: &Evidence) -> Self {
        v1::Evidence { name: evidence.name.to_string(), detail: evidence.detail.clone() }
    }
}

impl From<&Answered> for v1::AnsweredPacket {
    fn from(a: &Answered) -> Self {
        v1::AnsweredPacket {
            ts_ns: a.ts_ns,
            flags: u32::from(a.flags.0),
            seq: a.seq,
            ack: a.ack,
            payload_len: a.payload_len,
        }
    }
}

impl From<&TtlRange> for v1::TtlRange {
    fn from(t: &TtlRange) -> Self {
        v1::TtlRange {
            first: u32::from(t.first),
            last: u32::from(t.last),
            min: u32::from(t.min),
            max: u32::from(t.max),
        }
    }
}

impl From<&DirectionSummary> for v1::DirectionSummary {
    fn from(d: &DirectionSummary) -> Self {
        v1::DirectionSummary {
            pkts: d.pkts,
            payload_bytes: d.payload_bytes,
            zeek_bytes: d.zeek_bytes,
            retransmissions: d.retransmissions,
            rsts: d.rsts,
            zero_windows: d.zero_windows,
            ttl: d.ttl.as_ref().map(v1::TtlRange::from),
        }
    }
}

impl From<&SettlingRst> for v1::SettlingRst {
    fn from(r: &SettlingRst) -> Self {
        v1::SettlingRst {
            ts_ns: r.ts_ns,
            src: Some(endpoint(r.src)),
            dst: Some(endpoint(r.dst)),
            conn_id: r.conn_id.0,
            seq: r.seq,
            ack: r.ack,
            flags: u32::from(r.flags.0),
        }
    }
}

impl From<&RstEvent> for v1::RstEvent {
    fn from(e: &RstEvent) -> Self {
        v1::RstEvent {
            ts_ns: e.ts_ns,
            src: Some(endpoint(e.src)),
            dst: Some(endpoint(e.dst)),
            conn_id: e.conn_id.0,
            sender: v1::Role::from(e.sender).into(),
            flags: u32::from(e.flags.0),
            payload_len: e.payload_len,
            seq: e.seq,
            ack: e.ack,
            window: u32::from(e.window),
            ttl: u32::from(e.ttl),
            ip_id: e.ip_id.map(u32::from),
            checksum: v1::Checksum::from(e.checksum).into(),
            phase: v1::Phase::from(e.phase).into(),
            history: e.history.clone(),
            orig_pkts: e.counts.orig_pkts,
            orig_bytes: e.counts.orig_bytes,
            resp_pkts: e.counts.resp_pkts,
            resp_bytes: e.counts.resp_bytes,
            peer_retransmissions: e.peer_retransmissions,
            sender_retransmissions: e.sender_retransmissions,
            since_peer_last_ns: e.since_peer_last_ns,
            seq_relation: v1::SeqRelation::from(e.seq_relation).into(),
            ttl_delta: e.ttl_delta.map(i32::from),
            ip_id_delta: e.ip_id_delta,
            answers: e.answers.as_ref().map(v1::AnsweredPacket::from),
            cause: v1::Cause::from(e.cause).into(),
            evidence: e.evidence.iter().map(v1::Evidence::from).collect(),
            // The domain event records a bad IPv4 header checksum as evidence, not as a field.
            ip_header_ok: !e.evidence.iter().any(|ev| ev.name == BAD_IP_CHECKSUM),
        }
    }
}

impl From<&FlowSummary> for v1::FlowSummary {
    fn from(f: &FlowSummary) -> Self {
        v1::FlowSummary {
            conn_id: f.conn_id.0,
            orig: Some(endpoint(f.orig)),
            resp: Some(endpoint(f.resp)),
            start_ns: f.start_ns,
            end_ns: f.end_ns,
            conn_state: f.conn_state.to_string(),
            history: f.history.clone(),
            orig_dir: Some((&f.orig_dir).into()),
            resp_dir: Some((&f.resp_dir).into()),
            port_reuse: f.port_reuse,
            end: v1::FlowEnd::from(f.end).into(),
        }
    }
}

impl From<&ConnOpen> for v1::ConnectionOpen {
    fn from(o: &ConnOpen) -> Self {
        v1::ConnectionOpen {
            conn_id: o.conn_id.0,
            orig: Some(endpoint(o.orig)),
            resp: Some(endpoint(o.resp)),
            start_ns: o.start_ns,
            orig_isn: o.orig_isn,
            resp_isn: o.resp_isn,
            syn_ns: o.syn_ns,
            synack_ns: o.synack_ns,
            syn_tsval: o.syn_tsval,
            synack_tsval: o.synack_tsval,
            syn_options: o.syn_options.to_string(),
            // 0 stands for "none yet" on the wire.
            orig_ttl: o.orig_ttl.map_or(0, u32::from),
            resp_ttl: o.resp_ttl.map_or(0, u32::from),
            syn_ip_id: o.syn_ip_id.map(u32::from),
            midstream: o.midstream,
        }
    }
}

impl From<&crate::event::Event> for v1::Event {
    fn from(event: &crate::event::Event) -> Self {
        let kind = match event {
            crate::event::Event::Reset(e) => v1::event::Kind::Reset(e.as_ref().into()),
            crate::event::Event::Flow(f) => v1::event::Kind::Flow(f.as_ref().into()),
            crate::event::Event::Open(o) => v1::event::Kind::Open(o.as_ref().into()),
        };
        v1::Event { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rstscope_proto::{Endpoint, FlowKey};

    use super::*;
    use crate::event::{ConnId, Counts};
    use crate::wire::TcpFlags;

    fn v4(a: [u8; 4], port: u16) -> Endpoint {
        Endpoint::new(IpAddr::V4(Ipv4Addr::from(a)), port)
    }

    fn rst_event() -> RstEvent {
        RstEvent {
            ts_ns: 1_232_039_471_582_211_000,
            src: v4([192, 0, 2, 1], 80),
            dst: v4([198, 51, 100, 7], 40_000),
            conn_id: ConnId(0xdead_beef),
            sender: Role::Responder,
            flags: TcpFlags(TcpFlags::RST | TcpFlags::ACK),
            payload_len: 0,
            seq: 1,
            ack: 2,
            window: 65_535,
            ttl: 57,
            ip_id: Some(4242),
            checksum: Checksum::Good,
            phase: Phase::SynSent,
            history: "S".into(),
            counts: Counts { orig_pkts: 1, orig_bytes: 0, resp_pkts: 0, resp_bytes: 0 },
            peer_retransmissions: 3,
            sender_retransmissions: 0,
            since_peer_last_ns: Some(1_000),
            seq_relation: SeqRelation::Exact,
            ttl_delta: Some(-7),
            ip_id_delta: None,
            answers: Some(Answered { ts_ns: 5, flags: TcpFlags(TcpFlags::SYN), seq: 1, ack: 0, payload_len: 0 }),
            cause: Cause::Refused,
            evidence: vec![Evidence::new("answers-syn", "RST+ACK acknowledges the SYN")],
        }
    }

    #[test]
    fn endpoint_has_four_bytes_for_ipv4_and_sixteen_for_ipv6() {
        let ep = endpoint(v4([10, 0, 0, 1], 443));
        assert_eq!(ep, v1::Endpoint { ip: vec![10, 0, 0, 1], port: 443 });
        let ip6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let ep = endpoint(Endpoint::new(IpAddr::V6(ip6), 53));
        assert_eq!(ep.ip, ip6.octets().to_vec());
        assert_eq!(ep.port, 53);
    }

    #[test]
    fn rst_event_fields_map_one_to_one() {
        let pb = v1::RstEvent::from(&rst_event());
        assert_eq!(pb.ts_ns, 1_232_039_471_582_211_000);
        assert_eq!(pb.conn_id, 0xdead_beef);
        assert_eq!(pb.sender(), v1::Role::Responder);
        assert_eq!(pb.flags, 0x14);
        assert_eq!(pb.window, 65_535);
        assert_eq!(pb.ttl, 57);
        assert_eq!(pb.ip_id, Some(4242));
        assert_eq!(pb.checksum(), v1::Checksum::Good);
        assert_eq!(pb.phase(), v1::Phase::SynSent);
        assert_eq!(pb.seq_relation(), v1::SeqRelation::Exact);
        assert_eq!(pb.cause(), v1::Cause::Refused);
        assert_eq!(pb.ttl_delta, Some(-7));
        assert_eq!(pb.ip_id_delta, None);
        assert_eq!(pb.since_peer_last_ns, Some(1_000));
        assert_eq!(pb.peer_retransmissions, 3);
        assert_eq!(pb.answers.map(|a| a.flags), Some(u32::from(TcpFlags::SYN)));
        assert_eq!(pb.evidence[0].name, "answers-syn");
        assert!(pb.ip_header_ok);
        assert_eq!(pb.src.map(|e| e.ip), Some(vec![192, 0, 2, 1]));
    }

    #[test]
    fn bad_ip_checksum_evidence_clears_ip_header_ok() {
        let mut e = rst_event();
        e.evidence.push(Evidence::new(BAD_IP_CHECKSUM, "wrong"));
        assert!(!v1::RstEvent::from(&e).ip_header_ok);
    }

    #[test]
    fn every_domain_enum_maps_to_a_specified_value() {
        use Phase::*;
        for p in [None, SynSent, SynReceived, Established, HalfClosed, Closing, Reset, Midstream] {
            assert_ne!(v1::Phase::from(p), v1::Phase::Unspecified);
            assert_eq!(
                v1::Phase::from(p).as_str_name().to_lowercase().replace('_', "-"),
                format!("phase-{}", p.as_str())
            );
        }
        for c in [
            Cause::Refused,
            Cause::DuplicateSynCancel,
            Cause::RetransmissionTimeout,
            Cause::AppAbort,
            Cause::NoConnection,
            Cause::PortReuse,
            Cause::AfterClose,
            Cause::Lone,
            Cause::Unknown,
        ] {
            assert_eq!(
                v1::Cause::from(c).as_str_name().to_lowercase().replace('_', "-"),
                format!("cause-{}", c.as_str())
            );
        }
        for s in [SeqRelation::Exact, SeqRelation::InWindow, SeqRelation::OutOfWindow, SeqRelation::Unknown] {
            let name = v1::SeqRelation::from(s).as_str_name().to_lowercase().replace('_', "-");
            assert_eq!(name, format!("seq-relation-{}", s.as_str()));
        }
        for c in [Checksum::Good, Checksum::Bad, Checksum::Unverified] {
            assert_eq!(v1::Checksum::from(c).as_str_name().to_lowercase(), format!("checksum_{}", c.as_str()));
        }
        use FlowEnd::*;
        for f in [Closed, Inactive, Unanswered, Evicted, Reused, EndOfInput] {
            let name = v1::FlowEnd::from(f).as_str_name().to_lowercase().replace('_', "-");
            assert_eq!(name, format!("flow-end-{}", f.as_str()));
        }
        assert_eq!(v1::Role::from(Role::Originator), v1::Role::Originator);
        assert_eq!(v1::Role::from(Role::Responder), v1::Role::Responder);
    }

    #[test]
    fn flow_summary_maps_directions_and_ttl() {
        let orig = v4([10, 0, 0, 1], 1234);
        let resp = v4([10, 0, 0, 2], 80);
        let f = FlowSummary {
            conn_id: ConnId(7),
            key: FlowKey::new(orig, resp),
            orig,
            resp,
            start_ns: 10,
            end_ns: 20,
            conn_state: "SF",
            history: "ShADadFf".into(),
            orig_dir: DirectionSummary {
                pkts: 5,
                payload_bytes: 100,
                zeek_bytes: 100,
                retransmissions: 1,
                rsts: 0,
                zero_windows: 0,
                ttl: Some(TtlRange { first: 64, last: 63, min: 63, max: 64 }),
            },
            resp_dir: DirectionSummary::default(),
            port_reuse: true,
            end: FlowEnd::Closed,
        };
        let pb = v1::FlowSummary::from(&f);
        assert_eq!(pb.conn_state, "SF");
        assert_eq!(pb.end(), v1::FlowEnd::Closed);
        assert!(pb.port_reuse);
        let od = pb.orig_dir.unwrap_or_default();
        assert_eq!((od.pkts, od.retransmissions), (5, 1));
        assert_eq!(od.ttl, Some(v1::TtlRange { first: 64, last: 63, min: 63, max: 64 }));
        assert_eq!(pb.resp_dir.and_then(|d| d.ttl), None);
        assert_eq!(pb.resp.map(|e| e.port), Some(80));
    }

    #[test]
    fn connection_open_maps_options_ttls_and_absent_fields() {
        let orig = v4([198, 51, 100, 7], 40_000);
        let resp = v4([203, 0, 113, 9], 443);
        let open = ConnOpen {
            conn_id: ConnId(9),
            orig,
            resp,
            start_ns: 100,
            orig_isn: Some(1000),
            resp_isn: Some(5000),
            syn_ns: Some(100),
            synack_ns: Some(250),
            syn_tsval: Some(77),
            synack_tsval: None,
            syn_options: "M1460,S,T,N,W7".parse().unwrap(),
            orig_ttl: Some(64),
            resp_ttl: None,
            syn_ip_id: Some(321),
            midstream: false,
        };
        let pb = v1::ConnectionOpen::from(&open);
        assert_eq!((pb.conn_id, pb.start_ns, pb.syn_ns, pb.synack_ns), (9, 100, Some(100), Some(250)));
        assert_eq!((pb.orig_isn, pb.resp_isn), (Some(1000), Some(5000)));
        assert_eq!((pb.syn_tsval, pb.synack_tsval), (Some(77), None));
        assert_eq!(pb.syn_options, "M1460,S,T,N,W7");
        assert_eq!((pb.orig_ttl, pb.resp_ttl, pb.syn_ip_id), (64, 0, Some(321)));
        assert_eq!(pb.resp.map(|e| e.port), Some(443));
        let event = v1::Event::from(&crate::event::Event::Open(Box::new(open)));
        assert!(matches!(event.kind, Some(v1::event::Kind::Open(_))));
    }
}
