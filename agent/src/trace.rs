//! A tiny text language for packet traces, so tests read like the ladder diagrams people draw.
//!
//! ```text
//! # one line per packet: time, direction, flags, then optional fields
//! 0ms    > S
//! 1ms    < SA
//! 2ms    > A
//! 3ms    > PA  len=100
//! 3.5ms  < RA
//! ```
//!
//! `>` is client to server, `<` server to client. Flags are letters `S F R P A U E C N`
//! (`.` for none). Sequence and acknowledgment numbers follow the conversation unless given:
//! `seq=` defaults to the sender's next sequence number and `ack=` (with `A`) to the peer's.
//! Other fields: `len=` payload bytes, `win=` window, `ttl=`, `id=` IPv4 ID, `ws=` window
//! scale on SYNs, `cport=`/`sport=` to switch to another client or server port (a new
//! conversation with its own numbers), `bad` for a wrong checksum, `tsval=` for a TCP timestamp
//! option, `opts=M1460,S,T,N,W7` for a SYN's option layout (it also sets the MSS and window
//! scale it names; without it a SYN's layout is what `ws=` and `tsval=` name, padded like a
//! frame on the wire: `W7,T,E`), `v6` for IPv6 documentation addresses (no IP ID). Times take `s`, `ms`,
//! `us`. Lines starting with `#` and blank lines are ignored.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rstscope_proto::Endpoint;

use crate::wire::{Checksum, OptionLayout, Segment, TcpFlags, TcpOptions};

/// Addresses used by traces: documentation ranges only.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The server's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
/// The client's address with `v6`.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// The server's address with `v6`.
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
/// Default client port.
pub const CLIENT_PORT: u16 = 40000;
/// Default server port.
pub const SERVER_PORT: u16 = 80;
/// Trace time zero, in epoch ns (2026-01-01T00:00:00Z).
pub const T0_NS: i64 = 1_767_225_600_000_000_000;

/// A trace line that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("trace line {line}: {message}")]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Default, Clone, Copy)]
struct SideState {
    next_seq: u32,
    started: bool,
    ip_id: u16,
}

/// Parses a trace into segments with client and server ISNs 1000 and 5000 (per port pair).
pub fn parse(text: &str) -> Result<Vec<Segment>, TraceError> {
    let mut out = Vec::new();
    let mut sides: HashMap<(u16, u16, bool), SideState> = HashMap::new();
    let (mut cport, mut sport) = (CLIENT_PORT, SERVER_PORT);
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| TraceError { line: n + 1, message };
        let mut words = line.split_whitespace();
        let time = words.next().ok_or_else(|| err("missing time".into()))?;
        let ts_ns = T0_NS + parse_time(time).ok_or_else(|| err(format!("bad time {time:?}")))?;
        let from_client = match words.next() {
            Some(">") => true,
            Some("<") => false,
            other => return Err(err(format!("expected > or <, got {other:?}"))),
        };
        let flag_word = words.next().ok_or_else(|| err("missing flags".into()))?;
        let mut flags = 0u16;
        for c in flag_word.chars() {
            flags |= match c {
                'S' => TcpFlags::SYN,
                'F' => TcpFlags::FIN,
                'R' => TcpFlags::RST,
                'P' => TcpFlags::PSH,
                'A' => TcpFlags::ACK,
                'U' => TcpFlags::URG,
                'E' => TcpFlags::ECE,
                'C' => TcpFlags::CWR,
                'N' => TcpFlags::NS,
                '.' => 0,
                _ => return Err(err(format!("unknown flag {c:?}"))),
            };
        }
        let flags = TcpFlags(flags);
        let mut fields: HashMap<&str, u64> = HashMap::new();
        let mut bad = false;
        let mut v6 = false;
        let mut layout = None;
        for w in words {
            match w {
                "bad" => {
                    bad = true;
                    continue;
                }
                "v6" => {
                    v6 = true;
                    continue;
                }
                _ => {}
            }
            let (k, v) = w.split_once('=').ok_or_else(|| err(format!("expected key=value, got {w:?}")))?;
            if k == "opts" {
                layout = Some(v.parse::<OptionLayout>().map_err(err)?);
                continue;
            }
            let v: u64 = v.parse().map_err(|_| err(format!("bad number in {w:?}")))?;
            fields.insert(k, v);
        }
        let field_u16 = |k: &str| fields.get(k).map(|v| *v as u16);
        if let Some(p) = field_u16("cport") {
            cport = p;
        }
        if let Some(p) = field_u16("sport") {
            sport = p;
        }
        let conv = (cport, sport);
        for (is_client, isn) in [(true, 1000u32), (false, 5000u32)] {
            sides.entry((conv.0, conv.1, is_client)).or_insert(SideState {
                next_seq: isn,
                started: false,
                ip_id: if is_client { 100 } else { 200 },
            });
        }
        let peer_next = sides[&(conv.0, conv.1, !from_client)].next_seq;
        let me = sides.get_mut(&(conv.0, conv.1, from_client)).expect("inserted above");
        let seq = fields.get("seq").map(|v| *v as u32).unwrap_or(me.next_seq);
        let ack = fields.get("ack").map(|v| *v as u32).unwrap_or(if flags.ack() { peer_next } else { 0 });
        let payload_len = fields.get("len").map(|v| *v as u32).unwrap_or(0);
        let end = seq.wrapping_add(payload_len + u32::from(flags.syn()) + u32::from(flags.fin()));
        if !flags.rst() && (!me.started || end.wrapping_sub(me.next_seq) as i32 > 0) {
            me.next_seq = end;
        }
        me.started = true;
        let ip_id = field_u16("id").unwrap_or(me.ip_id);
        me.ip_id = ip_id.wrapping_add(1);
        let (client_ip, server_ip) = if v6 {
            (IpAddr::V6(CLIENT_IP6), IpAddr::V6(SERVER_IP6))
        } else {
            (IpAddr::V4(CLIENT_IP), IpAddr::V4(SERVER_IP))
        };
        let client = Endpoint::new(client_ip, cport);
        let server = Endpoint::new(server_ip, sport);
        let mut options = TcpOptions {
            window_scale: fields.get("ws").map(|v| *v as u8),
            timestamps: fields.get("tsval").map(|v| (*v as u32, 0)),
            ..TcpOptions::default()
        };
        if let Some(layout) = layout {
            // What the layout names, as the wire parser would have read it.
            let text = layout.to_string();
            for item in text.split(',') {
                match item.split_at(1) {
                    ("M", v) => options.mss = v.parse().ok(),
                    ("W", v) => options.window_scale = options.window_scale.or(v.parse().ok()),
                    ("S", _) => options.sack_permitted = true,
                    ("T", _) => options.timestamps = options.timestamps.or(Some((0, 0))),
                    _ => {}
                }
            }
            options.layout = layout;
        } else if flags.syn() {
            // The options the fields name, laid out as a frame builder writes them: MSS, window
            // scale, timestamps, then end-of-list padding to a multiple of four bytes.
            let mut bytes = Vec::new();
            if let Some(ws) = options.window_scale {
                bytes.extend([3, 3, ws]);
            }
            if let Some((val, ecr)) = options.timestamps {
                bytes.extend([8, 10]);
                bytes.extend(val.to_be_bytes());
                bytes.extend(ecr.to_be_bytes());
            }
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            options.layout = OptionLayout::of(&bytes);
        }
        let (src, dst) = if from_client { (client, server) } else { (server, client) };
        out.push(Segment {
            ts_ns,
            src,
            dst,
            seq,
            ack,
            flags,
            window: field_u16("win").unwrap_or(65535),
            payload_len,
            ttl: fields.get("ttl").map(|v| *v as u8).unwrap_or(if from_client { 64 } else { 58 }),
            ip_id: (!v6).then_some(ip_id),
            checksum: if bad { Checksum::Bad } else { Checksum::Good },
            options,
            vlan: None,
            ip_header_ok: true,
        });
    }
    Ok(out)
}

fn parse_time(t: &str) -> Option<i64> {
    let (num, scale) = if let Some(v) = t.strip_suffix("ms") {
        (v, 1e6)
    } else if let Some(v) = t.strip_suffix("us") {
        (v, 1e3)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1e9)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    v.is_finite().then_some((v * scale).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_the_conversation() {
        let segs = parse("0ms > S\n1ms < SA\n2ms > A\n3ms > PA len=10\n4ms < A").unwrap();
        let summary: Vec<(String, u32, u32)> = segs.iter().map(|s| (s.flags.to_string(), s.seq, s.ack)).collect();
        assert_eq!(
            summary,
            vec![
                ("S".into(), 1000, 0),
                ("SA".into(), 5000, 1001),
                ("A".into(), 1001, 5001),
                ("PA".into(), 1001, 5001),
                ("A".into(), 5001, 1011)
            ]
        );
        assert_eq!(segs[4].ts_ns - segs[0].ts_ns, 4_000_000);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("0ms > S\n1ms ? SA").unwrap_err();
        assert_eq!(e.line, 2);
    }
}
