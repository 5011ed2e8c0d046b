//! Offline output: JSON lines (a documented contract) and a human-readable text form.
//!
//! The JSON field names are part of the public interface (README, "JSON output"): resets use
//! tcpdump-like names (`src`, `dst`, `seq`, `ack`, `flags`), flows use Zeek's conn.log names
//! (`orig_h`, `conn_state`, `history`, ...), and times are epoch seconds written with all nine
//! fractional digits the capture has, so nothing is lost to floating point.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;
use serde_json::value::RawValue;

use crate::event::{ConnOpen, DirectionSummary, Event, FlowSummary, RstEvent, TtlRange};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// Aligned text for people.
    Text,
}

/// Epoch nanoseconds as a JSON number with nine decimals (`1232039471.582211000`).
fn json_time(ns: i64) -> Box<RawValue> {
    let sign = if ns < 0 { "-" } else { "" };
    let abs = ns.unsigned_abs();
    RawValue::from_string(format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000))
        .expect("a decimal number is valid JSON")
}

/// A duration in seconds with microsecond precision, as Zeek writes `duration`.
fn json_seconds(ns: i64) -> Box<RawValue> {
    let sign = if ns < 0 { "-" } else { "" };
    let us = ns.unsigned_abs() / 1000;
    RawValue::from_string(format!("{sign}{}.{:06}", us / 1_000_000, us % 1_000_000))
        .expect("a decimal number is valid JSON")
}

#[derive(Serialize)]
struct JsonEvidence<'a> {
    name: &'a str,
    detail: &'a str,
}

#[derive(Serialize)]
struct JsonAnswered {
    ts: Box<RawValue>,
    flags: String,
    seq: u32,
    ack: u32,
    payload_len: u32,
}

#[derive(Serialize)]
struct JsonReset<'a> {
    r#type: &'static str,
    ts: Box<RawValue>,
    uid: String,
    src: String,
    dst: String,
    sender: &'static str,
    flags: String,
    seq: u32,
    ack: u32,
    window: u16,
    ttl: u8,
    ip_id: Option<u16>,
    payload_len: u32,
    checksum: &'static str,
    phase: &'static str,
    history: &'a str,
    orig_pkts: u64,
    orig_bytes: u64,
    resp_pkts: u64,
    resp_bytes: u64,
    peer_retransmissions: u32,
    sender_retransmissions: u32,
    since_peer_last: Option<Box<RawValue>>,
    seq_relation: &'static str,
    ttl_delta: Option<i16>,
    ip_id_delta: Option<i32>,
    answers: Option<JsonAnswered>,
    cause: &'static str,
    evidence: Vec<JsonEvidence<'a>>,
}

#[derive(Serialize)]
struct JsonTtl {
    first: u8,
    last: u8,
    min: u8,
    max: u8,
}

impl From<TtlRange> for JsonTtl {
    fn from(t: TtlRange) -> Self {
        JsonTtl { first: t.first, last: t.last, min: t.min, max: t.max }
    }
}

#[derive(Serialize)]
struct JsonFlow<'a> {
    r#type: &'static str,
    ts: Box<RawValue>,
    uid: String,
    orig_h: String,
    orig_p: u16,
    resp_h: String,
    resp_p: u16,
    proto: &'static str,
    duration: Box<RawValue>,
    orig_bytes: u64,
    resp_bytes: u64,
    conn_state: &'static str,
    history: &'a str,
    orig_pkts: u64,
    resp_pkts: u64,
    orig_payload_bytes: u64,
    resp_payload_bytes: u64,
    orig_retransmissions: u32,
    resp_retransmissions: u32,
    orig_rsts: u32,
    resp_rsts: u32,
    orig_zero_windows: u32,
    resp_zero_windows: u32,
    orig_ttl: Option<JsonTtl>,
    resp_ttl: Option<JsonTtl>,
    port_reuse: bool,
    end: &'static str,
}

/// `{"type":"open"}`: a connection's identity (only with `--emit-open`).
#[derive(Serialize)]
struct JsonOpen {
    r#type: &'static str,
    ts: Box<RawValue>,
    uid: String,
    orig_h: String,
    orig_p: u16,
    resp_h: String,
    resp_p: u16,
    orig_isn: Option<u32>,
    resp_isn: Option<u32>,
    syn_ts: Option<Box<RawValue>>,
    synack_ts: Option<Box<RawValue>>,
    syn_tsval: Option<u32>,
    synack_tsval: Option<u32>,
    syn_options: String,
    orig_ttl: Option<u8>,
    resp_ttl: Option<u8>,
    syn_ip_id: Option<u16>,
    midstream: bool,
}

fn open_json(o: &ConnOpen) -> JsonOpen {
    JsonOpen {
        r#type: "open",
        ts: json_time(o.start_ns),
        uid: o.conn_id.to_string(),
        orig_h: o.orig.ip().to_string(),
        orig_p: o.orig.port(),
        resp_h: o.resp.ip().to_string(),
        resp_p: o.resp.port(),
        orig_isn: o.orig_isn,
        resp_isn: o.resp_isn,
        syn_ts: o.syn_ns.map(json_time),
        synack_ts: o.synack_ns.map(json_time),
        syn_tsval: o.syn_tsval,
        synack_tsval: o.synack_tsval,
        syn_options: o.syn_options.to_string(),
        orig_ttl: o.orig_ttl,
        resp_ttl: o.resp_ttl,
        syn_ip_id: o.syn_ip_id,
        midstream: o.midstream,
    }
}

/// Totals for the closing `stats` record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunStats {
    /// Always `"stats"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Capture records read.
    pub packets: u64,
    /// Records that were TCP segments.
    pub tcp_packets: u64,
    /// Records skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Connection records.
    pub flows: u64,
    /// RST events.
    pub resets: u64,
    /// Records evicted from a full table.
    pub evicted: u64,
    /// TCP segments with a wrong IPv4 header checksum (tracked, but not in conn_state/history).
    pub bad_ip_checksum: u64,
    /// Records started by port reuse.
    pub port_reuse: u64,
    /// Problems with the inputs, one line each.
    pub errors: Vec<String>,
    /// libpcap drop counters of live captures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_drops: Option<crate::capture::CaptureDrops>,
}

fn reset_json(r: &RstEvent) -> JsonReset<'_> {
    JsonReset {
        r#type: "reset",
        ts: json_time(r.ts_ns),
        uid: r.conn_id.to_string(),
        src: r.src.to_string(),
        dst: r.dst.to_string(),
        sender: r.sender.as_str(),
        flags: r.flags.to_string(),
        seq: r.seq,
        ack: r.ack,
        window: r.window,
        ttl: r.ttl,
        ip_id: r.ip_id,
        payload_len: r.payload_len,
        checksum: r.checksum.as_str(),
        phase: r.phase.as_str(),
        history: &r.history,
        orig_pkts: r.counts.orig_pkts,
        orig_bytes: r.counts.orig_bytes,
        resp_pkts: r.counts.resp_pkts,
        resp_bytes: r.counts.resp_bytes,
        peer_retransmissions: r.peer_retransmissions,
        sender_retransmissions: r.sender_retransmissions,
        since_peer_last: r.since_peer_last_ns.map(json_seconds),
        seq_relation: r.seq_relation.as_str(),
        ttl_delta: r.ttl_delta,
        ip_id_delta: r.ip_id_delta,
        answers: r.answers.map(|a| JsonAnswered {
            ts: json_time(a.ts_ns),
            flags: a.flags.to_string(),
            seq: a.seq,
            ack: a.ack,
            payload_len: a.payload_len,
        }),
        cause: r.cause.as_str(),
        evidence: r.evidence.iter().map(|e| JsonEvidence { name: e.name, detail: &e.detail }).collect(),
    }
}

fn flow_json(f: &FlowSummary) -> JsonFlow<'_> {
    let (o, r): (&DirectionSummary, &DirectionSummary) = (&f.orig_dir, &f.resp_dir);
    JsonFlow {
        r#type: "flow",
        ts: json_time(f.start_ns),
        uid: f.conn_id.to_string(),
        orig_h: f.orig.ip().to_string(),
        orig_p: f.orig.port(),
        resp_h: f.resp.ip().to_string(),
        resp_p: f.resp.port(),
        proto: "tcp",
        duration: json_seconds(f.end_ns - f.start_ns),
        orig_bytes: o.zeek_bytes,
        resp_bytes: r.zeek_bytes,
        conn_state: f.conn_state,
        history: &f.history,
        orig_pkts: o.pkts,
        resp_pkts: r.pkts,
        orig_payload_bytes: o.payload_bytes,
        resp_payload_bytes: r.payload_bytes,
        orig_retransmissions: o.retransmissions,
        resp_retransmissions: r.retransmissions,
        orig_rsts: o.rsts,
        resp_rsts: r.rsts,
        orig_zero_windows: o.zero_windows,
        resp_zero_windows: r.zero_windows,
        orig_ttl: o.ttl.map(JsonTtl::from),
        resp_ttl: r.ttl.map(JsonTtl::from),
        port_reuse: f.port_reuse,
        end: f.end.as_str(),
    }
}

/// Writes events in the chosen format.
pub struct Writer<W: Write> {
    format: Format,
    out: W,
    opens: bool,
}

impl<W: Write> Writer<W> {
    /// A writer of `format` into `out`. Connection Open events are left out (the documented
    /// output is resets, flows and the stats record) unless [`Writer::with_opens`] asks for them.
    pub fn new(format: Format, out: W) -> Self {
        Writer { format, out, opens: false }
    }

    /// Also write connection Open events (`{"type":"open"}` lines in JSON).
    pub fn with_opens(mut self, opens: bool) -> Self {
        self.opens = opens;
        self
    }

    /// Writes one event.
    pub fn event(&mut self, event: &Event) -> io::Result<()> {
        match (self.format, event) {
            (_, Event::Open(_)) if !self.opens => Ok(()),
            (Format::Json, Event::Open(o)) => {
                serde_json::to_writer(&mut self.out, &open_json(o))?;
                self.out.write_all(b"\n")
            }
            (Format::Text, Event::Open(o)) => writeln!(
                self.out,
                "{} OPEN {:>22} > {:<22} isn={}/{} options={} ttl={}/{}{}",
                utc(o.start_ns),
                o.orig.to_string(),
                o.resp.to_string(),
                o.orig_isn.map_or("-".to_string(), |n| n.to_string()),
                o.resp_isn.map_or("-".to_string(), |n| n.to_string()),
                o.syn_options,
                o.orig_ttl.map_or("-".to_string(), |n| n.to_string()),
                o.resp_ttl.map_or("-".to_string(), |n| n.to_string()),
                if o.midstream { " midstream" } else { "" }
            ),
            (Format::Json, Event::Reset(r)) => {
                serde_json::to_writer(&mut self.out, &reset_json(r))?;
                self.out.write_all(b"\n")
            }
            (Format::Json, Event::Flow(f)) => {
                serde_json::to_writer(&mut self.out, &flow_json(f))?;
                self.out.write_all(b"\n")
            }
            (Format::Text, Event::Reset(r)) => {
                let evidence: Vec<&str> = r.evidence.iter().map(|e| e.name).collect();
                writeln!(
                    self.out,
                    "{} RST  {:>22} > {:<22} {:<3} seq={} ack={} ttl={} {} phase={} cause={} [{}]",
                    utc(r.ts_ns),
                    r.src.to_string(),
                    r.dst.to_string(),
                    r.flags.to_string(),
                    r.seq,
                    r.ack,
                    r.ttl,
                    r.sender.as_str(),
                    r.phase.as_str(),
                    r.cause.as_str(),
                    evidence.join(",")
                )
            }
            (Format::Text, Event::Flow(f)) => writeln!(
                self.out,
                "{} FLOW {:>22} > {:<22} {:<6} {:<12} {}/{} pkts {}/{} bytes {:.3}s",
                utc(f.start_ns),
                f.orig.to_string(),
                f.resp.to_string(),
                f.conn_state,
                f.history,
                f.orig_dir.pkts,
                f.resp_dir.pkts,
                f.orig_dir.zeek_bytes,
                f.resp_dir.zeek_bytes,
                (f.end_ns - f.start_ns) as f64 / 1e9
            ),
        }
    }

    /// Writes the closing statistics.
    pub fn stats(&mut self, stats: &RunStats) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, stats)?;
                self.out.write_all(b"\n")
            }
            Format::Text => {
                writeln!(
                    self.out,
                    "-- {} packets, {} TCP, {} connections, {} resets",
                    stats.packets, stats.tcp_packets, stats.flows, stats.resets
                )?;
                for (reason, n) in &stats.skipped {
                    writeln!(self.out, "-- skipped {n}: {reason}")?;
                }
                if stats.evicted > 0 {
                    writeln!(self.out, "-- {} connections evicted from a full table", stats.evicted)?;
                }
                if let Some(d) = stats.capture_drops {
                    writeln!(
                        self.out,
                        "-- capture: {} received, {} dropped by buffer, {} dropped by interface",
                        d.received, d.dropped, d.if_dropped
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `2009-01-15T17:11:11.582211Z` from epoch nanoseconds (UTC, proleptic Gregorian).
pub fn utc(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let micros = ns.rem_euclid(1_000_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_keep_nanoseconds() {
        assert_eq!(json_time(1_232_039_471_582_211_000).get(), "1232039471.582211000");
        assert_eq!(json_seconds(60_991_770_123).get(), "60.991770");
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(1_232_039_471_582_211_000), "2009-01-15T17:11:11.582211Z");
        assert_eq!(utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
    }
}
