//! Packet bytes in, one small owned [`Segment`] out.
//!
//! This is the only module that looks at raw packet bytes. It peels the link layer (any stack of
//! 802.1Q/802.1ad tags, MPLS, PPPoE, PBB, Linux cooked v1/v2, raw IP, BSD loopback, PPP, Cisco
//! HDLC, NFLOG, FDDI), lets `etherparse` walk IPv4/IPv6 and the IPv6 extension headers, and copies
//! the handful of TCP header fields the tracker needs into a `Copy` value. Borrowed views never
//! leave this module, so everything downstream is plain data.
//!
//! Contract: [`parse`] never panics and never loops on any input; every packet that is not a
//! usable TCP segment comes back as a [`Skip`] reason that the caller counts. Lengths come from
//! the IP header, not from the captured bytes, so a capture cut at a small snaplen still yields
//! the true payload length; the TCP checksum is only verified when the whole segment was captured.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{IpNumber, LaxIpSlice, LenSource, TcpSlice};
use rstscope_proto::Endpoint;

/// A libpcap link-layer header type (`LINKTYPE_*` value as stored in capture files).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct LinkType(pub u32);

impl LinkType {
    /// BSD loopback: a 4-byte address family in the capturing host's byte order.
    pub const NULL: LinkType = LinkType(0);
    /// Ethernet II.
    pub const ETHERNET: LinkType = LinkType(1);
    /// PPP, with or without HDLC address/control bytes.
    pub const PPP: LinkType = LinkType(9);
    /// FDDI with an LLC/SNAP header.
    pub const FDDI: LinkType = LinkType(10);
    /// Raw IP as some systems number `DLT_RAW`.
    pub const RAW_12: LinkType = LinkType(12);
    /// Raw IP as OpenBSD numbers `DLT_RAW`.
    pub const RAW_14: LinkType = LinkType(14);
    /// PPP in HDLC-like framing.
    pub const PPP_HDLC: LinkType = LinkType(50);
    /// Raw IP (`LINKTYPE_RAW`).
    pub const RAW: LinkType = LinkType(101);
    /// Cisco HDLC.
    pub const C_HDLC: LinkType = LinkType(104);
    /// OpenBSD loopback: address family in network byte order.
    pub const LOOP: LinkType = LinkType(108);
    /// Linux cooked capture v1 (`tcpdump -i any`).
    pub const LINUX_SLL: LinkType = LinkType(113);
    /// Raw IPv4.
    pub const IPV4: LinkType = LinkType(228);
    /// Raw IPv6.
    pub const IPV6: LinkType = LinkType(229);
    /// Linux netfilter NFLOG.
    pub const NFLOG: LinkType = LinkType(239);
    /// Linux cooked capture v2.
    pub const LINUX_SLL2: LinkType = LinkType(276);

    /// The name tcpdump and Wireshark use for this link type, for messages.
    pub fn name(self) -> String {
        let known = match self.0 {
            0 => "NULL",
            1 => "EN10MB",
            6 => "IEEE802",
            9 => "PPP",
            10 => "FDDI",
            12 | 14 | 101 => "RAW",
            50 => "PPP_HDLC",
            104 => "C_HDLC",
            105 => "IEEE802_11",
            108 => "LOOP",
            113 => "LINUX_SLL",
            119 => "PRISM_HEADER",
            127 => "IEEE802_11_RADIOTAP",
            147..=162 => "USER",
            192 => "PPI",
            195 => "IEEE802_15_4",
            197 => "ERF",
            220 => "USB_LINUX_MMAPPED",
            228 => "IPV4",
            229 => "IPV6",
            239 => "NFLOG",
            249 => "NETANALYZER",
            274 => "ETHERNET_MPACKET",
            276 => "LINUX_SLL2",
            _ => return format!("LINKTYPE {}", self.0),
        };
        format!("{known} ({})", self.0)
    }
}

/// TCP header flags as the on-wire flag bits (the low byte) plus NS in bit 8.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u16);

impl TcpFlags {
    /// No more data from sender.
    pub const FIN: u16 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u16 = 0x02;
    /// Reset the connection.
    pub const RST: u16 = 0x04;
    /// Push function.
    pub const PSH: u16 = 0x08;
    /// Acknowledgment field significant.
    pub const ACK: u16 = 0x10;
    /// Urgent pointer field significant.
    pub const URG: u16 = 0x20;
    /// ECN echo.
    pub const ECE: u16 = 0x40;
    /// Congestion window reduced.
    pub const CWR: u16 = 0x80;
    /// ECN nonce (RFC 3540, historic).
    pub const NS: u16 = 0x100;
    /// The three reserved bits; no stack sets them.
    pub const RESERVED: u16 = 0xe00;

    /// True if every bit of `mask` is set.
    pub fn has(self, mask: u16) -> bool {
        self.0 & mask == mask
    }
    /// SYN is set.
    pub fn syn(self) -> bool {
        self.has(Self::SYN)
    }
    /// ACK is set.
    pub fn ack(self) -> bool {
        self.has(Self::ACK)
    }
    /// FIN is set.
    pub fn fin(self) -> bool {
        self.has(Self::FIN)
    }
    /// RST is set.
    pub fn rst(self) -> bool {
        self.has(Self::RST)
    }
    /// The raw low byte, as in the TCP header.
    pub fn byte(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

impl fmt::Display for TcpFlags {
    /// Compact letters in tcpdump's spirit and Zeek's order: `S`, `SA`, `RA`, `FPA`, ...
    /// (S syn, F fin, R rst, P psh, A ack, U urg, E ece, C cwr, N ns).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LETTERS: [(u16, char); 9] = [
            (TcpFlags::SYN, 'S'),
            (TcpFlags::FIN, 'F'),
            (TcpFlags::RST, 'R'),
            (TcpFlags::PSH, 'P'),
            (TcpFlags::ACK, 'A'),
            (TcpFlags::URG, 'U'),
            (TcpFlags::ECE, 'E'),
            (TcpFlags::CWR, 'C'),
            (TcpFlags::NS, 'N'),
        ];
        if self.0 == 0 {
            return f.write_str(".");
        }
        for (bit, letter) in LETTERS {
            if self.0 & bit != 0 {
                write!(f, "{letter}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the TCP checksum said.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Checksum {
    /// Verified and correct.
    Good,
    /// Verified and wrong: the segment never reached a socket (or the capture is of an outgoing
    /// packet whose checksum the NIC fills in later).
    Bad,
    /// Not verified: the capture does not hold the whole segment.
    #[default]
    Unverified,
}

impl Checksum {
    /// `good`, `bad` or `unverified`.
    pub fn as_str(self) -> &'static str {
        match self {
            Checksum::Good => "good",
            Checksum::Bad => "bad",
            Checksum::Unverified => "unverified",
        }
    }
}

/// TCP options the tracker and the correlator use.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct TcpOptions {
    /// Maximum segment size (SYN only).
    pub mss: Option<u16>,
    /// Window scale shift (SYN only).
    pub window_scale: Option<u8>,
    /// SACK permitted (SYN only).
    pub sack_permitted: bool,
    /// Timestamps option: (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
    /// The options' kinds in wire order (SYN only), a fingerprint of the sender's stack.
    pub layout: OptionLayout,
}

impl TcpOptions {
    /// Reads raw TCP option bytes in one walk: the values the tracker uses and the layout.
    ///
    /// The values follow etherparse's reading, which the agent used before (and a property test
    /// holds it to): they stop at the first option it does not know or finds malformed. The
    /// layout goes on past unknown kinds with a sane length, so it can name them.
    pub fn parse(mut bytes: &[u8]) -> Self {
        let mut out = TcpOptions::default();
        let mut values = true;
        // Every option takes at least one byte, so this ends; at most 40 bytes of options.
        while let Some(&kind) = bytes.first() {
            let size = match kind {
                0 | 1 => 1,
                _ => match bytes.get(1) {
                    Some(&n) if n >= 2 && usize::from(n) <= bytes.len() => usize::from(n),
                    _ => break,
                },
            };
            match (kind, size) {
                (0 | 1, _) => {}
                (2, 4) => {
                    let mss = u16::from_be_bytes([bytes[2], bytes[3]]);
                    if !out.layout.contains(2) {
                        out.layout.mss = mss;
                    }
                    if values {
                        out.mss = Some(mss);
                    }
                }
                (3, 3) => {
                    if !out.layout.contains(3) {
                        out.layout.ws = bytes[2];
                    }
                    if values {
                        out.window_scale = Some(bytes[2]);
                    }
                }
                (4, 2) => out.sack_permitted |= values,
                (8, 10) => {
                    if values {
                        let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
                        out.timestamps = Some((word(2), word(6)));
                    }
                }
                // The options the layout names have a fixed size; anything else is malformed.
                (2 | 3 | 4 | 8, _) => break,
                // SACK blocks: etherparse knows them (and reads on) only with 1 to 4 blocks.
                (5, 10 | 18 | 26 | 34) => {}
                _ => values = false,
            }
            out.layout.push(kind);
            if kind == 0 {
                break;
            }
            bytes = &bytes[size..];
        }
        out
    }
}

/// The layout of a SYN's TCP options: kinds in wire order with the MSS and window scale values,
/// written like `M1460,S,T,N,W7` (M mss, S sack-permitted, T timestamps, N nop, W window scale,
/// E end, K<n> any other kind n).
///
/// Why: the layout survives NAT and differs between client stacks, so the collector can match a
/// connection across vantage points with it when a middlebox rewrote the ISNs. It is `Copy` and
/// fixed-size so a [`Segment`] stays a plain value: at most [`OptionLayout::MAX_KINDS`] kinds are
/// kept (real stacks send at most about ten), a longer list is written with a final `...`. The
/// walk stops after an end-of-list option (what follows is padding) or at a malformed option.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionLayout {
    kinds: [u8; OptionLayout::MAX_KINDS],
    /// Kinds seen, including those beyond `MAX_KINDS`.
    len: u8,
    /// Window scale value of the first W.
    ws: u8,
    /// MSS value of the first M.
    mss: u16,
}

impl OptionLayout {
    /// Most kinds kept.
    pub const MAX_KINDS: usize = 16;

    /// The layout of raw TCP option bytes.
    pub fn of(bytes: &[u8]) -> Self {
        TcpOptions::parse(bytes).layout
    }

    fn push(&mut self, kind: u8) {
        if let Some(slot) = self.kinds.get_mut(usize::from(self.len)) {
            *slot = kind;
        }
        self.len = self.len.saturating_add(1);
    }

    fn contains(&self, kind: u8) -> bool {
        self.kinds().contains(&kind)
    }

    /// The kinds kept, in order.
    pub fn kinds(&self) -> &[u8] {
        &self.kinds[..usize::from(self.len).min(Self::MAX_KINDS)]
    }

    /// No option at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for OptionLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, kind) in self.kinds().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match kind {
                0 => f.write_str("E")?,
                1 => f.write_str("N")?,
                2 => write!(f, "M{}", self.mss)?,
                3 => write!(f, "W{}", self.ws)?,
                4 => f.write_str("S")?,
                8 => f.write_str("T")?,
                other => write!(f, "K{other}")?,
            }
        }
        if usize::from(self.len) > Self::MAX_KINDS {
            f.write_str(",...")?;
        }
        Ok(())
    }
}

impl fmt::Debug for OptionLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl std::str::FromStr for OptionLayout {
    type Err = String;

    /// Parses the written form back (for test traces): `M1460,S,T,N,W7`.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut layout = OptionLayout::default();
        for item in text.split(',').filter(|s| !s.is_empty()) {
            let (letter, number) = item.split_at(1);
            let value = || number.parse::<u16>().map_err(|_| format!("bad option {item:?}"));
            let kind = match letter {
                "E" => 0,
                "N" => 1,
                "M" => {
                    layout.mss = value()?;
                    2
                }
                "W" => {
                    layout.ws = u8::try_from(value()?).map_err(|_| format!("bad option {item:?}"))?;
                    3
                }
                "S" => 4,
                "T" => 8,
                "K" => u8::try_from(value()?).map_err(|_| format!("bad option {item:?}"))?,
                _ => return Err(format!("unknown option {item:?}")),
            };
            layout.push(kind);
        }
        Ok(layout)
    }
}

/// One parsed TCP segment: everything downstream needs, copied out of the packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Segment {
    /// Packet time, nanoseconds since the Unix epoch, from the capture.
    pub ts_ns: i64,
    /// Sender address and port.
    pub src: Endpoint,
    /// Receiver address and port.
    pub dst: Endpoint,
    /// Raw sequence number.
    pub seq: u32,
    /// Raw acknowledgment number (meaningful only with ACK).
    pub ack: u32,
    /// Header flags.
    pub flags: TcpFlags,
    /// Raw (unscaled) window.
    pub window: u16,
    /// TCP payload length according to the IP header (may exceed what was captured).
    pub payload_len: u32,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 identification; `None` for IPv6.
    pub ip_id: Option<u16>,
    /// Checksum verification result.
    pub checksum: Checksum,
    /// Parsed options.
    pub options: TcpOptions,
    /// Outermost 802.1Q VLAN id, if tagged (informational; not part of the connection key).
    pub vlan: Option<u16>,
    /// The IPv4 header checksum is right (always true for IPv6, which has none). A receiver
    /// drops a packet whose IP header checksum is wrong before TCP sees it.
    pub ip_header_ok: bool,
}

impl Segment {
    /// Sequence space this segment occupies: payload plus one for SYN and one for FIN.
    pub fn seq_len(&self) -> u32 {
        self.payload_len.wrapping_add(u32::from(self.flags.syn())).wrapping_add(u32::from(self.flags.fin()))
    }
}

/// Why a packet did not become a [`Segment`]. Counted, never an error.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Skip {
    /// A link type this agent does not decode.
    UnsupportedLinkType(LinkType),
    /// The link layer carries something other than IP (ARP, LLDP, ...).
    NotIp,
    /// The frame ended inside a link, IP or TCP header.
    Truncated,
    /// A header that contradicts itself (bad IHL, bad TCP data offset, ...).
    Malformed,
    /// An IP fragment (not reassembled).
    Fragment,
    /// IP, but not TCP (UDP, ICMP, tunnels ...).
    NotTcp,
}

impl Skip {
    /// A short stable name, used as the key in the stats output.
    pub fn reason(&self) -> String {
        match self {
            Skip::UnsupportedLinkType(lt) => format!("unsupported-link-type {}", lt.name()),
            Skip::NotIp => "not-ip".into(),
            Skip::Truncated => "truncated".into(),
            Skip::Malformed => "malformed".into(),
            Skip::Fragment => "ip-fragment".into(),
            Skip::NotTcp => "not-tcp".into(),
        }
    }
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const ETHERTYPE_QINQ_OLD: u16 = 0x9100;
const ETHERTYPE_MPLS: u16 = 0x8847;
const ETHERTYPE_MPLS_MC: u16 = 0x8848;
const ETHERTYPE_PPPOE_SESSION: u16 = 0x8864;
const ETHERTYPE_PBB: u16 = 0x88e7;
const ETHERTYPE_VNTAG: u16 = 0x8926;
/// Upper bound on nested encapsulations (tags, labels) so crafted input cannot loop long.
const MAX_LAYERS: usize = 16;

fn be16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*data.get(at)?, *data.get(at + 1)?]))
}

/// What the link layer found: where IP starts, and the outer VLAN tag.
struct LinkPayload<'a> {
    ip: &'a [u8],
    vlan: Option<u16>,
}

/// Decodes one captured frame of `link_type` captured at `ts_ns` into a TCP segment.
pub fn parse(link_type: LinkType, ts_ns: i64, frame: &[u8]) -> Result<Segment, Skip> {
    let link = strip_link(link_type, frame)?;
    parse_ip(link.ip, ts_ns, link.vlan)
}

fn strip_link(link_type: LinkType, frame: &[u8]) -> Result<LinkPayload<'_>, Skip> {
    let plain = |ip| Ok(LinkPayload { ip, vlan: None });
    match link_type {
        LinkType::ETHERNET => {
            let ethertype = be16(frame, 12).ok_or(Skip::Truncated)?;
            by_ethertype(ethertype, &frame[14..], None)
        }
        LinkType::RAW | LinkType::RAW_12 | LinkType::RAW_14 | LinkType::IPV4 | LinkType::IPV6 => plain(frame),
        LinkType::NULL | LinkType::LOOP => {
            let family: [u8; 4] = frame.get(..4).ok_or(Skip::Truncated)?.try_into().unwrap_or_default();
            // The family is in the capturing host's byte order (NULL) or network order (LOOP);
            // reading it both ways is unambiguous because the valid values are small.
            let fam = if link_type == LinkType::LOOP {
                u32::from_be_bytes(family)
            } else {
                let le = u32::from_le_bytes(family);
                if le <= 0xffff {
                    le
                } else {
                    u32::from_be_bytes(family)
                }
            };
            match fam {
                // AF_INET on every BSD and Linux; AF_INET6 differs by system.
                2 | 10 | 24 | 28 | 30 => plain(&frame[4..]),
                _ => Err(Skip::NotIp),
            }
        }
        LinkType::LINUX_SLL => {
            let proto = be16(frame, 14).ok_or(Skip::Truncated)?;
            by_ethertype(proto, &frame[16..], None)
        }
        LinkType::LINUX_SLL2 => {
            let proto = be16(frame, 0).ok_or(Skip::Truncated)?;
            if frame.len() < 20 {
                return Err(Skip::Truncated);
            }
            by_ethertype(proto, &frame[20..], None)
        }
        LinkType::PPP | LinkType::PPP_HDLC => {
            let rest = if frame.starts_with(&[0xff, 0x03]) { &frame[2..] } else { frame };
            by_ppp_protocol(rest)
        }
        LinkType::C_HDLC => {
            let proto = be16(frame, 2).ok_or(Skip::Truncated)?;
            by_ethertype(proto, &frame[4..], None)
        }
        LinkType::FDDI => {
            // Frame control (1), destination (6), source (6), then LLC/SNAP: AA AA 03 OUI(3) type.
            let llc = frame.get(13..21).ok_or(Skip::Truncated)?;
            if llc[..3] != [0xaa, 0xaa, 0x03] {
                return Err(Skip::NotIp);
            }
            by_ethertype(u16::from_be_bytes([llc[6], llc[7]]), &frame[21..], None)
        }
        LinkType::NFLOG => nflog_payload(frame),
        other => Err(Skip::UnsupportedLinkType(other)),
    }
}

/// Follows ethertypes through VLAN tags, MPLS labels, PPPoE and PBB to the IP header.
fn by_ethertype<'a>(mut ethertype: u16, mut rest: &'a [u8], mut vlan: Option<u16>) -> Result<LinkPayload<'a>, Skip> {
    for _ in 0..MAX_LAYERS {
        match ethertype {
            ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => return Ok(LinkPayload { ip: rest, vlan }),
            ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD => {
                let tci = be16(rest, 0).ok_or(Skip::Truncated)?;
                vlan.get_or_insert(tci & 0x0fff);
                ethertype = be16(rest, 2).ok_or(Skip::Truncated)?;
                rest = &rest[4..];
            }
            ETHERTYPE_VNTAG => {
                ethertype = be16(rest, 4).ok_or(Skip::Truncated)?;
                rest = &rest[6..];
            }
            ETHERTYPE_MPLS | ETHERTYPE_MPLS_MC => return mpls_payload(rest, vlan),
            ETHERTYPE_PPPOE_SESSION => {
                // version/type (1), code (1), session id (2), length (2), then PPP protocol.
                let ppp = rest.get(6..).ok_or(Skip::Truncated)?;
                let inner = by_ppp_protocol(ppp)?;
                return Ok(LinkPayload { ip: inner.ip, vlan });
            }
            ETHERTYPE_PBB => {
                // I-TAG (4 bytes), then the customer's destination and source MAC, then an ethertype.
                ethertype = be16(rest, 16).ok_or(Skip::Truncated)?;
                rest = &rest[18..];
            }
            _ => return Err(Skip::NotIp),
        }
    }
    Err(Skip::Malformed)
}

fn mpls_payload(mut rest: &[u8], vlan: Option<u16>) -> Result<LinkPayload<'_>, Skip> {
    for _ in 0..MAX_LAYERS {
        let label = rest.get(..4).ok_or(Skip::Truncated)?;
        let bottom_of_stack = label[2] & 0x01 != 0;
        rest = &rest[4..];
        if bottom_of_stack {
            // MPLS does not say what it carries; the IP version nibble does.
            return match rest.first().map(|b| b >> 4) {
                Some(4) | Some(6) => Ok(LinkPayload { ip: rest, vlan }),
                Some(_) => Err(Skip::NotIp),
                None => Err(Skip::Truncated),
            };
        }
    }
    Err(Skip::Malformed)
}

fn by_ppp_protocol(frame: &[u8]) -> Result<LinkPayload<'_>, Skip> {
    // The protocol field is one byte when its low bit is set (protocol field compression).
    let first = *frame.first().ok_or(Skip::Truncated)?;
    let (proto, rest) = if first & 0x01 == 1 {
        (u16::from(first), &frame[1..])
    } else {
        (be16(frame, 0).ok_or(Skip::Truncated)?, &frame[2..])
    };
    match proto {
        0x0021 | 0x0057 => Ok(LinkPayload { ip: rest, vlan: None }),
        _ => Err(Skip::NotIp),
    }
}

fn nflog_payload(frame: &[u8]) -> Result<LinkPayload<'_>, Skip> {
    // Header: family (1), version (1), resource id (2); then TLVs with host-order (little endian
    // on every Linux we know of) 16-bit length and type, padded to 4 bytes. Type 9 is the payload.
    let mut rest = frame.get(4..).ok_or(Skip::Truncated)?;
    for _ in 0..64 {
        if rest.len() < 4 {
            return Err(Skip::Truncated);
        }
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let kind = u16::from_le_bytes([rest[2], rest[3]]);
        if len < 4 {
            return Err(Skip::Malformed);
        }
        let value = rest.get(4..len).ok_or(Skip::Truncated)?;
        if kind == 9 {
            return Ok(LinkPayload { ip: value, vlan: None });
        }
        let padded = (len + 3) & !3;
        rest = rest.get(padded..).ok_or(Skip::Truncated)?;
    }
    Err(Skip::Malformed)
}

/// The TCP segment in IP packet `data`, through any tunnels (see [`decapsulate`]).
fn parse_ip(data: &[u8], ts_ns: i64, vlan: Option<u16>) -> Result<Segment, Skip> {
    parse_ip_at(data, ts_ns, vlan, 0)
}

/// Tunnels a mirrored or overlay network wraps TCP in, decoded so that its connections are
/// tracked like any others (as Zeek and Wireshark do): IP in IP (4, 41), GRE (47) carrying IP,
/// Ethernet (transparent bridging) or ERSPAN types I-III, and VXLAN (UDP 4789) and Geneve (UDP
/// 6081). The inner packet is the connection's: its addresses, TTL and IP ID. The capture's own
/// VLAN tag is kept when it has one, else the inner frame's.
fn decapsulate(
    ip_number: IpNumber,
    payload: &[u8],
    ts_ns: i64,
    vlan: Option<u16>,
    depth: usize,
) -> Result<Segment, Skip> {
    if depth >= MAX_LAYERS {
        return Err(Skip::Malformed);
    }
    let depth = depth + 1;
    // The IP packet behind `ethertype` (and any tags), keeping the capture's own VLAN tag first.
    let ip_behind = |ethertype: u16, rest: &[u8]| {
        let link = by_ethertype(ethertype, rest, vlan)?;
        parse_ip_at(link.ip, ts_ns, link.vlan, depth)
    };
    let ethernet = |frame: &[u8]| ip_behind(be16(frame, 12).ok_or(Skip::Truncated)?, &frame[14..]);
    match ip_number {
        IpNumber::IPV4 | IpNumber::IPV6 => parse_ip_at(payload, ts_ns, vlan, depth),
        IpNumber::GRE => {
            let flags = be16(payload, 0).ok_or(Skip::Truncated)?;
            if flags & 0x0007 != 0 || flags & 0x4000 != 0 {
                // Version 1 is PPTP's enhanced GRE (PPP inside); the routing bit of RFC 1701
                // adds fields RFC 2784 dropped (its packets are to be discarded): not decoded.
                return Err(Skip::NotTcp);
            }
            let protocol = be16(payload, 2).ok_or(Skip::Truncated)?;
            // Checksum (+ reserved), key and sequence number, each 4 bytes when flagged.
            let optional = [0x8000u16, 0x2000, 0x1000].iter().filter(|&&bit| flags & bit != 0).count() * 4;
            let inner = payload.get(4 + optional..).ok_or(Skip::Truncated)?;
            match protocol {
                0x6558 => ethernet(inner),
                // ERSPAN type II (8-byte header; type I, without the sequence bit, has none) and
                // type III (12 bytes, plus an 8-byte platform subheader with the O bit).
                0x88be if flags & 0x1000 == 0 => ethernet(inner),
                0x88be => ethernet(inner.get(8..).ok_or(Skip::Truncated)?),
                0x22eb => {
                    let o_bit = inner.get(11).ok_or(Skip::Truncated)? & 0x01 != 0;
                    let frame = inner.get(if o_bit { 20 } else { 12 }..).ok_or(Skip::Truncated)?;
                    // Frame type: 0 Ethernet, 2 IP without a link header.
                    match (inner[10] >> 2) & 0x1f {
                        0 => ethernet(frame),
                        2 => parse_ip_at(frame, ts_ns, vlan, depth),
                        _ => Err(Skip::NotTcp),
                    }
                }
                other => ip_behind(other, inner),
            }
        }
        IpNumber::UDP => {
            let dst_port = be16(payload, 2).ok_or(Skip::Truncated)?;
            let udp_payload = payload.get(8..).ok_or(Skip::Truncated)?;
            match dst_port {
                4789 => ethernet(udp_payload.get(8..).ok_or(Skip::Truncated)?),
                6081 => {
                    let options = usize::from(udp_payload.first().ok_or(Skip::Truncated)? & 0x3f) * 4;
                    let protocol = be16(udp_payload, 2).ok_or(Skip::Truncated)?;
                    let inner = udp_payload.get(8 + options..).ok_or(Skip::Truncated)?;
                    if protocol == 0x6558 {
                        ethernet(inner)
                    } else {
                        ip_behind(protocol, inner)
                    }
                }
                _ => Err(Skip::NotTcp),
            }
        }
        _ => Err(Skip::NotTcp),
    }
}

/// [`parse_ip`] inside `depth` tunnels.
fn parse_ip_at(data: &[u8], ts_ns: i64, vlan: Option<u16>, depth: usize) -> Result<Segment, Skip> {
    let (ip, ext_error) = LaxIpSlice::from_slice(data).map_err(|e| match e {
        etherparse::err::ip::LaxHeaderSliceError::Len(_) => Skip::Truncated,
        etherparse::err::ip::LaxHeaderSliceError::Content(_) => Skip::Malformed,
    })?;
    if ext_error.is_some() {
        // An IPv6 extension header we could not walk: we cannot find TCP reliably.
        return Err(Skip::Malformed);
    }
    let payload = ip.payload();
    if payload.fragmented {
        return Err(Skip::Fragment);
    }
    if payload.ip_number != IpNumber::TCP {
        return decapsulate(payload.ip_number, payload.payload, ts_ns, vlan, depth);
    }
    let mut ip_header_ok = true;
    let (src_ip, dst_ip, ttl, ip_id, ip_payload_len) = match &ip {
        LaxIpSlice::Ipv4(v4) => {
            let h = v4.header();
            ip_header_ok = fold(ones_sum_native(h.slice())) == 0xffff;
            let header_total = usize::from(h.ihl()) * 4 + v4.extensions().auth.map_or(0, |a| a.slice().len());
            let len = usize::from(h.total_len()).checked_sub(header_total);
            (
                IpAddr::V4(Ipv4Addr::from(h.source())),
                IpAddr::V4(Ipv4Addr::from(h.destination())),
                h.ttl(),
                Some(h.identification()),
                len,
            )
        }
        LaxIpSlice::Ipv6(v6) => {
            let h = v6.header();
            let exts = v6.extensions().slice().len();
            let len = usize::from(h.payload_length()).checked_sub(exts);
            (
                IpAddr::V6(Ipv6Addr::from(h.source())),
                IpAddr::V6(Ipv6Addr::from(h.destination())),
                h.hop_limit(),
                None,
                len,
            )
        }
    };
    let tcp_bytes = payload.payload;
    let whole_segment = !payload.incomplete && payload.len_source != LenSource::Slice;
    // True TCP length: from the IP header when it is consistent, else what we have.
    let tcp_len = match (whole_segment, ip_payload_len) {
        (true, _) => tcp_bytes.len(),
        (false, Some(len)) if len >= tcp_bytes.len() => len,
        _ => tcp_bytes.len(),
    };
    let tcp = TcpSlice::from_slice(tcp_bytes).map_err(|e| match e {
        etherparse::err::tcp::HeaderSliceError::Len(_) => Skip::Truncated,
        etherparse::err::tcp::HeaderSliceError::Content(_) => Skip::Malformed,
    })?;
    let header_len = usize::from(tcp.data_offset()) * 4;
    let payload_len = tcp_len.checked_sub(header_len).ok_or(Skip::Malformed)?;

    let checksum = if whole_segment {
        if tcp_checksum_ok(src_ip, dst_ip, tcp.slice()) {
            Checksum::Good
        } else {
            Checksum::Bad
        }
    } else {
        Checksum::Unverified
    };

    let header = tcp.header_slice();
    // Bits 8..11 of the flags word: NS and the three reserved bits (forgers sometimes set them).
    let flags = TcpFlags((u16::from(header[12] & 0x0f) << 8) | u16::from(header[13]));
    // Options matter on SYNs (window scale, MSS, timestamps for matching); skipping them
    // elsewhere saves a tenth of the parse time.
    let options = if header_len > 20 && flags.syn() { parse_options(&tcp) } else { TcpOptions::default() };

    Ok(Segment {
        ts_ns,
        src: Endpoint::new(src_ip, tcp.source_port()),
        dst: Endpoint::new(dst_ip, tcp.destination_port()),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags,
        window: tcp.window_size(),
        payload_len: u32::try_from(payload_len).unwrap_or(u32::MAX),
        ttl,
        ip_id,
        checksum,
        options,
        vlan,
        ip_header_ok,
    })
}

/// Ones-complement sum of `data` in native byte order (RFC 1071: the sum is byte-order
/// independent if the final 16-bit result is swapped back), 64 bits at a time into four
/// independent 128-bit accumulators (an add and an add-with-carry per word; the carries out of
/// 64 and 32 bits are folded back at the end, as 2^64 and 2^32 are 1 modulo 2^16 - 1). The
/// result, below 2^33, is only ever folded to 16 bits, and agrees there with any word size.
fn ones_sum_native(data: &[u8]) -> u64 {
    let word = |c: &[u8]| u128::from(u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
    let mut blocks = data.chunks_exact(32);
    let mut lanes = [0u128; 4];
    for block in &mut blocks {
        lanes[0] += word(&block[0..8]);
        lanes[1] += word(&block[8..16]);
        lanes[2] += word(&block[16..24]);
        lanes[3] += word(&block[24..32]);
    }
    let mut acc: u128 = lanes.iter().sum();
    let mut words = blocks.remainder().chunks_exact(8);
    for c in &mut words {
        acc += word(c);
    }
    let rest = words.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    acc += word(&tail);
    // Below 2^65 after the first fold, so the second cannot carry out; then to 33 bits, so that
    // callers can add a few such sums.
    let folded = (acc & u128::from(u64::MAX)) + (acc >> 64);
    let folded = (folded as u64) + (folded >> 64) as u64;
    (folded & u64::from(u32::MAX)) + (folded >> 32)
}

/// True if the TCP checksum of `segment` (header and all payload) is right. Hand-written because
/// it runs on every packet and etherparse's word-by-word loop was a quarter of the agent's work.
fn tcp_checksum_ok(src: IpAddr, dst: IpAddr, segment: &[u8]) -> bool {
    // Pseudo-header: addresses, zero, protocol 6, TCP length (32 bits covers both families),
    // summed as [`ones_sum_native`] sums bytes: native-order 32-bit words of the wire bytes.
    let word = |b: &[u8]| u64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let addrs = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => word(&s.octets()) + word(&d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let (s, d) = (s.octets(), d.octets());
            s.chunks_exact(4).chain(d.chunks_exact(4)).map(word).sum()
        }
        _ => return false,
    };
    let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
    let pseudo = addrs + word(&len.to_be_bytes()) + word(&[0, 0, 0, 6]);
    fold(pseudo + ones_sum_native(segment)) == 0xffff
}

/// Folds a 64-bit ones-complement sum to 16 bits (0xffff means "checksum correct").
fn fold(mut acc: u64) -> u64 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

fn parse_options(tcp: &TcpSlice<'_>) -> TcpOptions {
    TcpOptions::parse(tcp.options())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, TcpOptionElement};

    fn tcp_v4_frame(flags: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
            .ipv4([198, 51, 100, 1], [203, 0, 113, 9], 61)
            .tcp(40000, 443, 1000, 64240);
        for f in flags.chars() {
            b = match f {
                'S' => b.syn(),
                'A' => b.ack(7),
                'R' => b.rst(),
                'F' => b.fin(),
                'P' => b.psh(),
                _ => b,
            };
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// An outer Ethernet + IPv4 packet (192.0.2.1 -> 192.0.2.2) carrying `payload` as `protocol`.
    fn outer_ip(protocol: IpNumber, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([9; 6], [8; 6])
            .ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
            .write(&mut out, protocol, payload)
            .unwrap();
        out
    }

    /// An outer Ethernet + IPv4 + UDP packet to `port` carrying `payload`.
    fn outer_udp(port: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([9; 6], [8; 6])
            .ipv4([192, 0, 2, 1], [192, 0, 2, 2], 64)
            .udp(50000, port)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    /// TCP inside the tunnels mirrored and overlay networks use is the connection's own segment:
    /// inner addresses and TTL, the outer ones forgotten.
    #[test]
    fn tunnelled_tcp_is_the_inner_segment() {
        let frame = tcp_v4_frame("RA", b"");
        let ip = &frame[14..];
        let cat = |parts: &[&[u8]]| parts.concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("IPv4 in IPv4", outer_ip(IpNumber::IPV4, ip)),
            ("GRE, IPv4", outer_ip(IpNumber::GRE, &cat(&[&[0, 0, 0x08, 0x00], ip]))),
            ("GRE with checksum and key", outer_ip(IpNumber::GRE, &cat(&[&[0xa0, 0, 0x08, 0x00], &[0; 8], ip]))),
            ("GRE, transparent Ethernet", outer_ip(IpNumber::GRE, &cat(&[&[0, 0, 0x65, 0x58], &frame]))),
            ("ERSPAN type I", outer_ip(IpNumber::GRE, &cat(&[&[0, 0, 0x88, 0xbe], &frame]))),
            ("ERSPAN type II", outer_ip(IpNumber::GRE, &cat(&[&[0x10, 0, 0x88, 0xbe], &[0; 4], &[0; 8], &frame]))),
            ("ERSPAN type III", outer_ip(IpNumber::GRE, &cat(&[&[0x10, 0, 0x22, 0xeb], &[0; 4], &[0; 12], &frame]))),
            (
                "ERSPAN type III, IP frame",
                outer_ip(IpNumber::GRE, &cat(&[&[0x10, 0, 0x22, 0xeb], &[0; 4], &[0; 10], &[0x08, 0], ip])),
            ),
            (
                "ERSPAN type III with platform subheader",
                outer_ip(IpNumber::GRE, &cat(&[&[0x10, 0, 0x22, 0xeb], &[0; 4], &[0; 11], &[1], &[0; 8], &frame])),
            ),
            ("VXLAN", outer_udp(4789, &cat(&[&[0x08, 0, 0, 0, 0, 0, 1, 0], &frame]))),
            ("Geneve, Ethernet", outer_udp(6081, &cat(&[&[0, 0, 0x65, 0x58, 0, 0, 1, 0], &frame]))),
            ("Geneve with options, IPv4", outer_udp(6081, &cat(&[&[1, 0, 0x08, 0x00, 0, 0, 1, 0], &[0; 4], ip]))),
        ];
        let plain = parse(LinkType::ETHERNET, 0, &frame).unwrap();
        for (name, tunnelled) in cases {
            let seg = parse(LinkType::ETHERNET, 0, &tunnelled).unwrap_or_else(|skip| panic!("{name}: {skip:?}"));
            assert_eq!(seg, plain, "{name}");
        }
    }

    /// What is not decoded is counted, and a tunnel of tunnels cannot recurse without bound.
    #[test]
    fn tunnels_not_decoded_are_skipped_and_nesting_is_bounded() {
        let frame = tcp_v4_frame("RA", b"");
        let pptp = outer_ip(IpNumber::GRE, &[&[0x30, 0x01, 0x88, 0x0b][..], &[0; 8], &frame[14..]].concat());
        assert_eq!(parse(LinkType::ETHERNET, 0, &pptp), Err(Skip::NotTcp), "PPTP's enhanced GRE");
        assert_eq!(parse(LinkType::ETHERNET, 0, &outer_udp(53, &frame)), Err(Skip::NotTcp), "plain UDP");
        let routed = outer_ip(IpNumber::GRE, &[&[0x40, 0, 0x08, 0x00][..], &[0; 4], &frame[14..]].concat());
        assert_eq!(parse(LinkType::ETHERNET, 0, &routed), Err(Skip::NotTcp), "RFC 1701 routing");
        let truncated = outer_ip(IpNumber::GRE, &[0, 0]);
        assert_eq!(parse(LinkType::ETHERNET, 0, &truncated), Err(Skip::Truncated));
        let mut nested = frame[14..].to_vec();
        for _ in 0..40 {
            nested = outer_ip(IpNumber::IPV4, &nested)[14..].to_vec();
        }
        let deep = outer_ip(IpNumber::IPV4, &nested);
        assert_eq!(parse(LinkType::ETHERNET, 0, &deep), Err(Skip::Malformed));
    }

    /// Option layouts of real stacks' SYNs (bytes as sent), malformed and padded lists.
    #[test]
    fn option_layouts_read_like_their_written_form() {
        let cases: &[(&[u8], &str)] = &[
            // Linux: MSS, SACK-permitted, timestamps, NOP, window scale.
            (&[2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7], "M1460,S,T,N,W7"),
            // Windows: MSS, NOP, WS, NOP, NOP, SACK-permitted.
            (&[2, 4, 5, 180, 1, 3, 3, 8, 1, 1, 4, 2], "M1460,N,W8,N,N,S"),
            // End of list: what follows is padding.
            (&[2, 4, 5, 180, 1, 3, 3, 6, 0, 0, 0, 0], "M1460,N,W6,E"),
            // An unknown kind with a sane length (TFO cookie request) is named by number.
            (&[34, 2, 2, 4, 5, 180], "K34,M1460"),
            // A wrong size for a known kind ends the walk; so does a length running off the end.
            (&[2, 4, 5, 180, 3, 4, 7, 0], "M1460"),
            (&[1, 30, 9], "N"),
            (&[], ""),
        ];
        for (bytes, written) in cases {
            let layout = OptionLayout::of(bytes);
            assert_eq!(layout.to_string(), *written, "{bytes:?}");
            assert_eq!(written.parse::<OptionLayout>().map(|l| l.to_string()).as_deref(), Ok(*written));
        }
        let nops = OptionLayout::of(&[1; 40]);
        assert_eq!(nops.kinds().len(), OptionLayout::MAX_KINDS);
        assert!(nops.to_string().ends_with("N,..."));
    }

    #[test]
    fn a_syn_carries_its_option_layout_and_other_segments_none() {
        let build = |syn: bool| {
            let b = PacketBuilder::ethernet2([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
                .ipv4([198, 51, 100, 1], [203, 0, 113, 9], 61)
                .tcp(40000, 443, 1000, 64240);
            let b = if syn { b.syn() } else { b.ack(1) };
            let options = [
                TcpOptionElement::MaximumSegmentSize(1400),
                TcpOptionElement::SelectiveAcknowledgementPermitted,
                TcpOptionElement::Timestamp(77, 0),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(9),
            ];
            let b = b.options(&options).unwrap();
            let mut out = Vec::new();
            b.write(&mut out, &[]).unwrap();
            parse(LinkType::ETHERNET, 5, &out).unwrap()
        };
        let syn = build(true);
        assert_eq!(syn.options.layout.to_string(), "M1400,S,T,N,W9");
        assert_eq!(
            (syn.options.mss, syn.options.window_scale, syn.options.timestamps),
            (Some(1400), Some(9), Some((77, 0)))
        );
        assert!(build(false).options.layout.is_empty());
    }

    #[test]
    fn ethernet_ipv4_rst_ack_is_parsed_with_good_checksum() {
        let frame = tcp_v4_frame("RA", &[]);
        let seg = parse(LinkType::ETHERNET, 5, &frame).unwrap();
        assert_eq!(seg.src.to_string(), "198.51.100.1:40000");
        assert_eq!(seg.dst.to_string(), "203.0.113.9:443");
        assert_eq!(seg.flags.to_string(), "RA");
        assert_eq!((seg.seq, seg.ack, seg.ttl, seg.window), (1000, 7, 61, 64240));
        assert_eq!(seg.checksum, Checksum::Good);
        assert_eq!(seg.payload_len, 0);
    }

    #[test]
    fn ones_complement_sum_matches_a_plain_16_bit_loop() {
        let mixed: Vec<u8> = (0..1600u32).map(|i| (i.wrapping_mul(73) ^ (i >> 3) ^ 0x5a) as u8).collect();
        // All ones: the most carries.
        let ones = vec![0xffu8; 1600];
        let slices = [(&mixed, 0), (&mixed, 1), (&mixed, 3), (&ones, 0)]
            .into_iter()
            .flat_map(|(data, from)| (from..=data.len()).map(move |to| &data[from..to]));
        for slice in slices {
            let len = slice.len();
            let mut plain: u64 = 0;
            for pair in slice.chunks(2) {
                plain += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
            let ours = fold(ones_sum_native(slice)) as u16;
            let ours_be = if cfg!(target_endian = "little") { ours.swap_bytes() } else { ours };
            assert_eq!(u64::from(ours_be), fold(plain), "length {len}");
        }
    }

    #[test]
    fn bad_ipv4_header_checksum_is_flagged() {
        let mut frame = tcp_v4_frame("S", &[]);
        assert!(parse(LinkType::ETHERNET, 0, &frame).unwrap().ip_header_ok);
        frame[14 + 10] ^= 0x01;
        assert!(!parse(LinkType::ETHERNET, 0, &frame).unwrap().ip_header_ok);
    }

    #[test]
    fn corrupted_byte_gives_bad_checksum() {
        let mut frame = tcp_v4_frame("PA", b"hello");
        let last = frame.len() - 1;
        frame[last] ^= 0xff;
        assert_eq!(parse(LinkType::ETHERNET, 0, &frame).unwrap().checksum, Checksum::Bad);
    }

    #[test]
    fn snaplen_cut_keeps_true_payload_length_and_skips_checksum() {
        let frame = tcp_v4_frame("PA", &[0u8; 1000]);
        let seg = parse(LinkType::ETHERNET, 0, &frame[..96]).unwrap();
        assert_eq!(seg.payload_len, 1000);
        assert_eq!(seg.checksum, Checksum::Unverified);
    }

    #[test]
    fn vlan_and_qinq_tags_are_peeled() {
        let plain = tcp_v4_frame("S", &[]);
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x88, 0xa8, 0x00, 0x64, 0x81, 0x00, 0x00, 0x0a]);
        tagged.extend_from_slice(&plain[12..]);
        let seg = parse(LinkType::ETHERNET, 0, &tagged).unwrap();
        assert_eq!(seg.vlan, Some(100));
        assert_eq!(seg.flags.to_string(), "S");
    }

    #[test]
    fn mpls_stack_is_peeled() {
        let plain = tcp_v4_frame("S", &[]);
        let mut framed = plain[..12].to_vec();
        framed.extend_from_slice(&[0x88, 0x47, 0, 0x01, 0x00, 0x40, 0, 0x02, 0x01, 0x40]);
        framed.extend_from_slice(&plain[14..]);
        assert!(parse(LinkType::ETHERNET, 0, &framed).is_ok());
    }

    #[test]
    fn linux_cooked_and_null_and_raw_link_types() {
        let plain = tcp_v4_frame("S", &[]);
        let ip = &plain[14..];
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(ip);
        assert!(parse(LinkType::LINUX_SLL, 0, &sll).is_ok());
        let mut sll2 = vec![0x08, 0x00];
        sll2.extend_from_slice(&[0u8; 18]);
        sll2.extend_from_slice(ip);
        assert!(parse(LinkType::LINUX_SLL2, 0, &sll2).is_ok());
        let mut null = 2u32.to_le_bytes().to_vec();
        null.extend_from_slice(ip);
        assert!(parse(LinkType::NULL, 0, &null).is_ok());
        assert!(parse(LinkType::RAW, 0, ip).is_ok());
        let mut ppp = vec![0xff, 0x03, 0x00, 0x21];
        ppp.extend_from_slice(ip);
        assert!(parse(LinkType::PPP, 0, &ppp).is_ok());
    }

    #[test]
    fn skips_are_named() {
        assert_eq!(parse(LinkType(147), 0, &[1, 2, 3]), Err(Skip::UnsupportedLinkType(LinkType(147))));
        assert_eq!(parse(LinkType::ETHERNET, 0, &[0; 10]), Err(Skip::Truncated));
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x08, 0x06, 0, 0]);
        assert_eq!(parse(LinkType::ETHERNET, 0, &arp), Err(Skip::NotIp));
        let udp = {
            let mut out = Vec::new();
            PacketBuilder::ipv6(
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
            .udp(1, 2)
            .write(&mut out, &[])
            .unwrap();
            out
        };
        assert_eq!(parse(LinkType::RAW, 0, &udp), Err(Skip::NotTcp));
    }

    #[test]
    fn ipv6_segment_has_hop_limit_and_no_ip_id() {
        let mut out = Vec::new();
        PacketBuilder::ipv6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            57,
        )
        .tcp(5555, 80, 1, 100)
        .syn()
        .write(&mut out, &[])
        .unwrap();
        let seg = parse(LinkType::IPV6, 0, &out).unwrap();
        assert_eq!(seg.ttl, 57);
        assert_eq!(seg.ip_id, None);
        assert_eq!(seg.src.to_string(), "[2001:db8::1]:5555");
        assert_eq!(seg.checksum, Checksum::Good);
    }
}
