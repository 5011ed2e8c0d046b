//! Turns parsed [`Segment`]s (for example from a `trace` ladder) back into real Ethernet frames,
//! so hand-written scenarios become genuine pcap files that go through the whole agent.

use std::fs::File;
use std::io::{self, BufWriter};
use std::net::IpAddr;
use std::path::Path;

use etherparse::{PacketBuilder, TcpOptionElement};
use rstscope_agent::wire::{Checksum, Segment, TcpFlags};

use crate::gen::PcapWriter;

/// One Ethernet/IP/TCP frame carrying `seg` (payload bytes are zeros).
pub fn frame(seg: &Segment) -> io::Result<Vec<u8>> {
    let mac_src = [0x02, 0, 0, 0, 0, 1];
    let mac_dst = [0x02, 0, 0, 0, 0, 2];
    let eth = PacketBuilder::ethernet2(mac_src, mac_dst);
    let ip = match (seg.src.ip(), seg.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = etherparse::Ipv4Header::new(0, seg.ttl, etherparse::IpNumber::TCP, s.octets(), d.octets())
                .map_err(io::Error::other)?;
            h.identification = seg.ip_id.unwrap_or(0);
            h.dont_fragment = true;
            eth.ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), seg.ttl),
        _ => return Err(io::Error::other("mixed address families")),
    };
    let mut tcp = ip.tcp(seg.src.port(), seg.dst.port(), seg.seq, seg.window);
    let f = seg.flags;
    if f.syn() {
        tcp = tcp.syn();
    }
    if f.fin() {
        tcp = tcp.fin();
    }
    if f.rst() {
        tcp = tcp.rst();
    }
    if f.has(TcpFlags::PSH) {
        tcp = tcp.psh();
    }
    if f.ack() {
        tcp = tcp.ack(seg.ack);
    }
    let mut options = Vec::new();
    if let Some(mss) = seg.options.mss {
        options.push(TcpOptionElement::MaximumSegmentSize(mss));
    }
    if let Some(ws) = seg.options.window_scale {
        options.push(TcpOptionElement::WindowScale(ws));
    }
    if let Some((val, ecr)) = seg.options.timestamps {
        options.push(TcpOptionElement::Timestamp(val, ecr));
    }
    if !options.is_empty() {
        tcp = tcp.options(&options).map_err(io::Error::other)?;
    }
    let payload = vec![0u8; seg.payload_len as usize];
    let mut out = Vec::with_capacity(tcp.size(payload.len()));
    tcp.write(&mut out, &payload).map_err(io::Error::other)?;
    if seg.checksum == Checksum::Bad {
        // TCP checksum sits 16 bytes into the TCP header.
        let ihl = if seg.src.is_ipv4() { usize::from(out[14] & 0x0f) * 4 } else { 40 };
        out[14 + ihl + 16] ^= 0x5a;
    }
    Ok(out)
}

/// Writes `segments` as a microsecond pcap of Ethernet frames.
pub fn write_pcap(path: &Path, segments: &[Segment]) -> io::Result<()> {
    let mut writer = PcapWriter::new(BufWriter::new(File::create(path)?), 0)?;
    for seg in segments {
        writer.write_frame(seg.ts_ns, &frame(seg)?)?;
    }
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstscope_agent::wire::{parse, LinkType};

    #[test]
    fn frames_parse_back_to_the_same_segment() {
        let segs =
            rstscope_agent::trace::parse("0ms > S ws=7\n1ms < SA\n2ms > PA len=100\n3ms < RA ttl=40 id=0 bad").unwrap();
        for seg in &segs {
            let bytes = frame(seg).unwrap();
            let back = parse(LinkType::ETHERNET, seg.ts_ns, &bytes).unwrap();
            assert_eq!(back, *seg);
        }
    }
}
