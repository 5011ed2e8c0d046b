//! Protobuf values <-> the names people read and type.
//!
//! The wire carries numbers (flag bits, enum values, raw address bytes); filters, JSON output
//! and tables use the vocabulary of `shared/docs/reset-causes.md`. Keeping every such mapping here
//! means the collector's filters, its follow matcher and the CLI's output cannot drift apart.
//! Pure functions only: no I/O, no tonic, no sled.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rstscope_proto::{v1, Endpoint, FlowKey};

/// The verdict of every RST until correlation exists (the next issue).
pub const PENDING: &str = "pending";

/// Every verdict name, in the vocabulary's order.
pub const VERDICTS: [&str; 5] = ["end-to-end", "injected", "lost", "unverified", PENDING];

/// Every cause name, in the vocabulary's order: the store's table without its slot for
/// `CAUSE_UNSPECIFIED`.
pub const CAUSES: &[&str] = match crate::store::CAUSE_NAMES.split_first() {
    Some((_, causes)) => causes,
    None => &[],
};

/// The vocabulary name of a cause value; `unknown` for values this version does not know.
pub fn cause_name(cause: i32) -> &'static str {
    crate::store::cause_name(cause)
}

/// The agent's JSON name of a phase value.
pub fn phase_name(phase: i32) -> &'static str {
    use v1::Phase;
    match Phase::try_from(phase).unwrap_or(Phase::Unspecified) {
        Phase::None => "none",
        Phase::SynSent => "syn-sent",
        Phase::SynReceived => "syn-received",
        Phase::Established => "established",
        Phase::HalfClosed => "half-closed",
        Phase::Closing => "closing",
        Phase::Reset => "reset",
        Phase::Midstream => "midstream",
        Phase::Unspecified => "unknown",
    }
}

/// `orig`, `resp` or `unknown`, as the agent prints the claimed sender.
pub fn role_name(role: i32) -> &'static str {
    match v1::Role::try_from(role).unwrap_or(v1::Role::Unspecified) {
        v1::Role::Originator => "orig",
        v1::Role::Responder => "resp",
        v1::Role::Unspecified => "unknown",
    }
}

/// `good`, `bad` or `unverified`, as the agent prints the checksum result.
pub fn checksum_name(checksum: i32) -> &'static str {
    match v1::Checksum::try_from(checksum).unwrap_or(v1::Checksum::Unspecified) {
        v1::Checksum::Good => "good",
        v1::Checksum::Bad => "bad",
        v1::Checksum::Unverified | v1::Checksum::Unspecified => "unverified",
    }
}

/// `exact`, `in-window`, `out-of-window` or `unknown`.
pub fn seq_relation_name(relation: i32) -> &'static str {
    use v1::SeqRelation;
    match SeqRelation::try_from(relation).unwrap_or(SeqRelation::Unspecified) {
        SeqRelation::Exact => "exact",
        SeqRelation::InWindow => "in-window",
        SeqRelation::OutOfWindow => "out-of-window",
        SeqRelation::Unknown | SeqRelation::Unspecified => "unknown",
    }
}

/// Flag bits as letters (`R`, `RA`, `FPA`), `.` for none: exactly the agent's text.
pub fn flags_text(flags: u32) -> String {
    if flags & 0x1ff == 0 {
        return ".".to_string();
    }
    crate::store::flag_letters(flags)
}

/// Parses flag letters in any order and case (`ar` = `RA`); `None` on any other character.
pub fn parse_flags(text: &str) -> Option<u32> {
    if text == "." {
        return Some(0);
    }
    if text.is_empty() {
        return None;
    }
    crate::store::parse_flag_letters(text).ok().map(u32::from)
}

/// An address from its 4- or 16-byte network-order form.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// The 4- or 16-byte network-order form of an address.
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The domain endpoint of a wire endpoint; `None` when the address or port is malformed.
pub fn endpoint(wire: Option<&v1::Endpoint>) -> Option<Endpoint> {
    let wire = wire?;
    let port = u16::try_from(wire.port).ok()?;
    Some(Endpoint::new(ip_from_bytes(&wire.ip)?, port))
}

/// The wire form of an endpoint.
pub fn endpoint_to_pb(endpoint: Endpoint) -> v1::Endpoint {
    v1::Endpoint { ip: ip_to_bytes(endpoint.ip()), port: u32::from(endpoint.port()) }
}

/// The connection a RST belongs to; `None` when an endpoint is malformed.
pub fn flow_key_of(event: &v1::RstEvent) -> Option<FlowKey> {
    Some(FlowKey::new(endpoint(event.src.as_ref())?, endpoint(event.dst.as_ref())?))
}

/// Epoch seconds with nine decimals (`1232039471.582211000`), exactly as the agent prints times.
pub fn ts_text(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let abs = ns.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_and_parse_like_the_agent() {
        assert_eq!(flags_text(0x014), "RA");
        assert_eq!(flags_text(0x004), "R");
        assert_eq!(flags_text(0x019), "FPA");
        assert_eq!(flags_text(0), ".");
        assert_eq!(parse_flags("ar"), Some(0x014));
        assert_eq!(parse_flags("RA").map(flags_text).as_deref(), Some("RA"));
        assert_eq!(parse_flags("RX"), None);
        assert_eq!(parse_flags(""), None);
    }

    #[test]
    fn cause_names_cover_the_vocabulary() {
        let named: Vec<&str> = (1..=10).map(cause_name).collect();
        assert_eq!(named, CAUSES);
        // The vocabulary of shared/docs/reset-causes.md, section 2.
        let vocabulary = [
            "refused",
            "duplicate-syn-cancel",
            "retransmission-timeout",
            "app-abort",
            "no-connection",
            "port-reuse",
            "after-close",
            "middlebox",
            "lone",
            "unknown",
        ];
        assert_eq!(CAUSES, vocabulary);
        assert_eq!(cause_name(99), "unknown");
    }

    #[test]
    fn times_print_with_nine_decimals() {
        assert_eq!(ts_text(1_232_039_471_582_211_000), "1232039471.582211000");
        assert_eq!(ts_text(-1), "-0.000000001");
    }

    #[test]
    fn endpoints_need_proper_addresses() {
        let good = v1::Endpoint { ip: vec![192, 0, 2, 1], port: 443 };
        assert_eq!(endpoint(Some(&good)).unwrap().to_string(), "192.0.2.1:443");
        assert!(endpoint(Some(&v1::Endpoint { ip: vec![1, 2, 3], port: 1 })).is_none());
        assert!(endpoint(Some(&v1::Endpoint { ip: vec![1, 2, 3, 4], port: 70_000 })).is_none());
        assert!(endpoint(None).is_none());
    }
}
