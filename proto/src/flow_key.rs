//! The direction-free identity of a TCP connection.
//!
//! A packet from A to B and its answer from B to A must land on the same connection, so the key
//! stores the two endpoints in a canonical order (the smaller one first) and callers keep a
//! separate direction bit. The key is compact (40 bytes) because the agent holds one per tracked
//! flow and must stay within a small per-flow memory budget.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One end of a connection: an IP address and a TCP port.
///
/// IPv4 addresses are stored as IPv4-mapped IPv6 addresses so that both families share one
/// fixed-size representation; [`Endpoint::ip`] gives the original family back.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    addr: [u8; 16],
    port: u16,
}

impl Endpoint {
    /// An endpoint from an address and a port.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        let addr = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Endpoint { addr, port }
    }

    /// The IP address, in the family it was created with.
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the address is IPv4.
    pub fn is_ipv4(&self) -> bool {
        Ipv6Addr::from(self.addr).to_ipv4_mapped().is_some()
    }

    /// The address and port as a socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port)
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

impl fmt::Display for Endpoint {
    /// `ip:port`, IPv6 as `[ip]:port`, as the JSON output contract requires.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.socket_addr(), f)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Direction-free identity of a TCP connection: both endpoints in canonical order.
///
/// `FlowKey::new(a, b) == FlowKey::new(b, a)`. Which endpoint is the originator is a property of
/// the connection record, not of the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct FlowKey {
    lo: Endpoint,
    hi: Endpoint,
}

impl FlowKey {
    /// The key of the connection between `a` and `b`, in either order.
    pub fn new(a: Endpoint, b: Endpoint) -> Self {
        if a <= b {
            FlowKey { lo: a, hi: b }
        } else {
            FlowKey { lo: b, hi: a }
        }
    }

    /// The smaller endpoint.
    pub fn lo(&self) -> Endpoint {
        self.lo
    }

    /// The larger endpoint.
    pub fn hi(&self) -> Endpoint {
        self.hi
    }

    /// True when a packet sent by `src` travels from `lo` to `hi`.
    pub fn is_lo_to_hi(&self, src: &Endpoint) -> bool {
        *src == self.lo
    }
}

/// A text that is not `ip:port-ip:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFlowKeyError(pub String);

impl fmt::Display for ParseFlowKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a connection id (expected ip:port-ip:port, IPv6 as [ip]:port): {:?}", self.0)
    }
}

impl std::error::Error for ParseFlowKeyError {}

impl std::str::FromStr for FlowKey {
    type Err = ParseFlowKeyError;

    /// Parses the `Display` form, `lo-hi`; either order is accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseFlowKeyError(s.to_string());
        // Split at the '-' that follows a port: IPv6 brackets may contain no '-', ports none.
        let split = s
            .char_indices()
            .filter(|&(_, c)| c == '-')
            .map(|(i, _)| i)
            .find(|&i| s[..i].parse::<SocketAddr>().is_ok() && s[i + 1..].parse::<SocketAddr>().is_ok());
        let i = split.ok_or_else(err)?;
        let a: SocketAddr = s[..i].parse().map_err(|_| err())?;
        let b: SocketAddr = s[i + 1..].parse().map_err(|_| err())?;
        Ok(FlowKey::new(Endpoint::new(a.ip(), a.port()), Endpoint::new(b.ip(), b.port())))
    }
}

impl Endpoint {
    /// Fixed 18-byte encoding (address as IPv6 or IPv4-mapped, then big-endian port), which
    /// sorts like the endpoint itself: usable in storage keys.
    pub fn to_bytes(&self) -> [u8; 18] {
        let mut out = [0u8; 18];
        out[..16].copy_from_slice(&self.addr);
        out[16..].copy_from_slice(&self.port.to_be_bytes());
        out
    }

    /// Inverse of [`Endpoint::to_bytes`].
    pub fn from_bytes(bytes: [u8; 18]) -> Self {
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&bytes[..16]);
        Endpoint { addr, port: u16::from_be_bytes([bytes[16], bytes[17]]) }
    }
}

impl FlowKey {
    /// Fixed 36-byte encoding (`lo` then `hi`), sorting like the key: storage keys start with it
    /// so that everything about one connection is one prefix scan.
    pub fn to_bytes(&self) -> [u8; 36] {
        let mut out = [0u8; 36];
        out[..18].copy_from_slice(&self.lo.to_bytes());
        out[18..].copy_from_slice(&self.hi.to_bytes());
        out
    }

    /// Inverse of [`FlowKey::to_bytes`]; `None` if the endpoints are not in canonical order.
    pub fn from_bytes(bytes: [u8; 36]) -> Option<Self> {
        let mut lo = [0u8; 18];
        let mut hi = [0u8; 18];
        lo.copy_from_slice(&bytes[..18]);
        hi.copy_from_slice(&bytes[18..]);
        let (lo, hi) = (Endpoint::from_bytes(lo), Endpoint::from_bytes(hi));
        (lo <= hi).then_some(FlowKey { lo, hi })
    }
}

impl fmt::Display for FlowKey {
    /// `lo-hi`, a stable text form usable as a connection id on the command line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl serde::Serialize for FlowKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        let sa: SocketAddr = s.parse().unwrap();
        Endpoint::new(sa.ip(), sa.port())
    }

    #[test]
    fn key_is_direction_free() {
        let a = ep("198.51.100.1:40000");
        let b = ep("203.0.113.5:443");
        assert_eq!(FlowKey::new(a, b), FlowKey::new(b, a));
        assert_eq!(FlowKey::new(a, b).lo(), a);
    }

    #[test]
    fn endpoints_print_like_socket_addresses() {
        assert_eq!(ep("198.51.100.1:80").to_string(), "198.51.100.1:80");
        assert_eq!(ep("[2001:db8::1]:443").to_string(), "[2001:db8::1]:443");
        assert!(ep("198.51.100.1:80").is_ipv4());
        assert!(!ep("[2001:db8::1]:443").is_ipv4());
    }

    #[test]
    fn key_round_trips_through_text_and_bytes() {
        for text in ["198.51.100.1:40000-203.0.113.5:443", "[2001:db8::1]:443-[2001:db8::2]:5000"] {
            let key: FlowKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
            assert_eq!(FlowKey::from_bytes(key.to_bytes()), Some(key));
        }
        let swapped: FlowKey = "203.0.113.5:443-198.51.100.1:40000".parse().unwrap();
        assert_eq!(swapped.to_string(), "198.51.100.1:40000-203.0.113.5:443");
        assert!("198.51.100.1-203.0.113.5:443".parse::<FlowKey>().is_err());
    }

    #[test]
    fn key_is_small() {
        assert_eq!(std::mem::size_of::<FlowKey>(), 36);
    }
}
