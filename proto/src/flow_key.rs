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
    fn key_is_small() {
        assert_eq!(std::mem::size_of::<FlowKey>(), 36);
    }
}
