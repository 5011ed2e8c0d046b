//! pcap and pcapng file reader.
//!
//! Handles both byte orders, micro- and nanosecond pcap, the modified (Kuznetzov) pcap record
//! header, pcapng sections with several interfaces of different link types, `if_tsresol` and
//! `if_tsoffset`, and reading from standard input. Damage is handled record by record: a record
//! header that cannot be right is reported once, then the reader scans forward for the next
//! plausible record so the rest of the file is still analysed. A file cut short ends with one
//! `Truncated` report.

use std::fs::File;
use std::io::{self, Read};

use super::{CaptureError, PacketSource, Poll, RawPacket};
use crate::wire::LinkType;

/// Largest record we accept; libpcap uses 256 KiB for most link types.
const MAX_RECORD: usize = 256 * 1024;
/// pcapng blocks may carry options and comments; anything larger than this is corrupt.
const MAX_BLOCK: usize = 16 * 1024 * 1024;
/// How far to scan for the next plausible record after a corrupt one.
const MAX_RESYNC_SCAN: usize = 16 * 1024 * 1024;
const READ_CHUNK: usize = 1 << 20;

/// A refillable window over a byte stream, so records can be borrowed without copying.
struct ByteWindow {
    reader: Box<dyn Read + Send>,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Absolute offset of `buf[0]` in the stream.
    base: u64,
    eof: bool,
}

impl ByteWindow {
    fn new(reader: Box<dyn Read + Send>) -> Self {
        ByteWindow { reader, buf: vec![0; READ_CHUNK], pos: 0, end: 0, base: 0, eof: false }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn available(&self) -> usize {
        self.end - self.pos
    }

    /// Makes at least `n` bytes available at `pos`; false when the stream ends first. The check
    /// is inlined (it runs twice per record); refilling is not.
    #[inline]
    fn ensure(&mut self, n: usize) -> io::Result<bool> {
        if self.available() >= n {
            return Ok(true);
        }
        self.refill(n)
    }

    #[inline(never)]
    fn refill(&mut self, n: usize) -> io::Result<bool> {
        while self.available() < n {
            if self.eof {
                return Ok(false);
            }
            if self.pos > 0 && (self.buf.len() - self.end < READ_CHUNK / 4 || self.pos + n > self.buf.len()) {
                self.buf.copy_within(self.pos..self.end, 0);
                self.base += self.pos as u64;
                self.end -= self.pos;
                self.pos = 0;
            }
            if self.end == self.buf.len() {
                // Grow geometrically while data keeps coming, so a record header that claims a
                // huge length costs memory only if the bytes really follow.
                let grown = (self.buf.len() * 2).min(n.max(READ_CHUNK) + READ_CHUNK);
                self.buf.resize(grown.max(self.end + 1), 0);
            }
            let end = self.end;
            match self.reader.read(&mut self.buf[end..]) {
                Ok(0) => self.eof = true,
                Ok(got) => self.end += got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn peek(&self, n: usize) -> &[u8] {
        &self.buf[self.pos..self.pos + n]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Endian {
    Little,
    Big,
}

impl Endian {
    fn u16(self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        match self {
            Endian::Little => u16::from_le_bytes(a),
            Endian::Big => u16::from_be_bytes(a),
        }
    }
    fn u32(self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        match self {
            Endian::Little => u32::from_le_bytes(a),
            Endian::Big => u32::from_be_bytes(a),
        }
    }
    fn u64(self, b: &[u8]) -> u64 {
        let a: [u8; 8] = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
        match self {
            Endian::Little => u64::from_le_bytes(a),
            Endian::Big => u64::from_be_bytes(a),
        }
    }
}

/// A pcapng interface: its link type and how to turn its timestamps into nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Interface {
    link_type: LinkType,
    snaplen: u32,
    /// Timestamp units per second is 10^exp or 2^exp.
    resolution: Resolution,
    offset_ns: i64,
    /// First packet's time, for the start of the first loss period.
    first_ts_ns: Option<i64>,
    /// Time and drop total of the last statistics block.
    stats: Option<(i64, u64)>,
}

/// Packets a pcapng file's interface statistics say the capture dropped in a period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLoss {
    /// From the previous statistics block (or the interface's first packet), ns.
    pub from_ns: i64,
    /// Until this statistics block, ns.
    pub until_ns: i64,
    /// Packets dropped by the interface or the OS in between (`isb_ifdrop` + `isb_osdrop`).
    pub dropped: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolution {
    Decimal(u8),
    Binary(u8),
}

impl Resolution {
    fn to_ns(self, units: u64) -> i64 {
        let ns: u128 = match self {
            Resolution::Decimal(9) => u128::from(units),
            Resolution::Decimal(6) => u128::from(units) * 1000,
            Resolution::Decimal(e) if e <= 9 => u128::from(units) * 10u128.pow(u32::from(9 - e)),
            Resolution::Decimal(e) => u128::from(units) / 10u128.pow(u32::from(e.min(38) - 9)),
            Resolution::Binary(e) => (u128::from(units) * 1_000_000_000) >> e.min(127),
        };
        i64::try_from(ns).unwrap_or(i64::MAX)
    }
}

#[derive(Debug)]
enum Format {
    Pcap {
        endian: Endian,
        link_type: LinkType,
        nanos: bool,
        snaplen: u32,
        extra_header: usize,
        last_ts_sec: Option<u32>,
    },
    PcapNg {
        endian: Endian,
        interfaces: Vec<Interface>,
        last_ts_ns: i64,
    },
}

/// Reads one pcap or pcapng file (or standard input, named `-`).
pub struct FileSource {
    name: String,
    window: ByteWindow,
    format: Format,
    total_len: Option<u64>,
    done: bool,
    /// Where the current record's bytes are in the window, set by `next_record`.
    record: (usize, usize),
    /// Drops reported by pcapng interface statistics blocks so far.
    losses: Vec<FileLoss>,
}

impl FileSource {
    /// Opens `path` (`-` for standard input) and reads the file header.
    pub fn open(path: &str) -> Result<FileSource, CaptureError> {
        let io_err = |error| CaptureError::Io { source_name: path.to_string(), error };
        let (reader, total_len): (Box<dyn Read + Send>, Option<u64>) = if path == "-" {
            (Box::new(io::stdin()), None)
        } else {
            let file = File::open(path).map_err(io_err)?;
            let meta = file.metadata().map_err(io_err)?;
            if meta.is_dir() {
                return Err(io_err(io::Error::new(io::ErrorKind::InvalidInput, "is a directory")));
            }
            (Box::new(file), Some(meta.len()))
        };
        Self::from_reader(path, reader, total_len)
    }

    /// Reads a capture from any byte stream; `name` is used in messages.
    pub fn from_reader(
        name: &str,
        reader: Box<dyn Read + Send>,
        total_len: Option<u64>,
    ) -> Result<FileSource, CaptureError> {
        let mut window = ByteWindow::new(reader);
        let io_err = |error| CaptureError::Io { source_name: name.to_string(), error };
        let have = window.ensure(24).map_err(io_err)?;
        let head = window.peek(window.available().min(24)).to_vec();
        let not_capture = || CaptureError::NotACapture {
            source_name: name.to_string(),
            magic: head.iter().take(4).copied().collect(),
        };
        if head.len() < 4 {
            return Err(if head.is_empty() {
                CaptureError::Truncated { source_name: name.to_string(), offset: 0, what: "empty file".into() }
            } else {
                not_capture()
            });
        }
        let magic_le = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let pcap_kind = |m: u32| match m {
            0xa1b2_c3d4 => Some((false, 0)),
            0xa1b2_3c4d => Some((true, 0)),
            0xa1b2_cd34 => Some((false, 8)),
            _ => None,
        };
        let format = if let Some((nanos, extra)) = pcap_kind(magic_le) {
            Self::pcap_header(name, &head, have, Endian::Little, nanos, extra)?
        } else if let Some((nanos, extra)) = pcap_kind(magic_le.swap_bytes()) {
            Self::pcap_header(name, &head, have, Endian::Big, nanos, extra)?
        } else if magic_le == 0x0a0d_0d0a {
            // The section header is parsed as the first block by `next_pcapng`.
            Format::PcapNg { endian: Endian::Little, interfaces: Vec::new(), last_ts_ns: 0 }
        } else {
            return Err(not_capture());
        };
        if let Format::Pcap { .. } = format {
            window.consume(24);
        }
        Ok(FileSource {
            name: name.to_string(),
            window,
            format,
            total_len,
            done: false,
            record: (0, 0),
            losses: Vec::new(),
        })
    }

    fn pcap_header(
        name: &str,
        head: &[u8],
        complete: bool,
        endian: Endian,
        nanos: bool,
        extra_header: usize,
    ) -> Result<Format, CaptureError> {
        if !complete {
            return Err(CaptureError::Truncated {
                source_name: name.into(),
                offset: 0,
                what: "pcap file header".into(),
            });
        }
        let snaplen = endian.u32(&head[16..20]);
        // The upper bits of the link type field carry FCS information.
        let link_type = LinkType(endian.u32(&head[20..24]) & 0x03ff_ffff & 0xffff);
        Ok(Format::Pcap { endian, link_type, nanos, snaplen, extra_header, last_ts_sec: None })
    }

    fn io_error(&self, error: io::Error) -> CaptureError {
        CaptureError::Io { source_name: self.name.clone(), error }
    }

    fn truncated(&mut self, what: &str) -> CaptureError {
        self.done = true;
        CaptureError::Truncated { source_name: self.name.clone(), offset: self.window.offset(), what: what.into() }
    }

    fn next_pcap(&mut self) -> Result<Option<(i64, LinkType, u32)>, CaptureError> {
        let Format::Pcap { endian, link_type, nanos, snaplen, extra_header, last_ts_sec } = &mut self.format else {
            unreachable!()
        };
        let (endian, link_type, nanos, extra_header) = (*endian, *link_type, *nanos, *extra_header);
        let hdr_len = 16 + extra_header;
        match self.window.ensure(hdr_len) {
            Ok(true) => {}
            Ok(false) if self.window.available() == 0 => return Ok(None),
            Ok(false) => return Err(self.truncated("record header")),
            Err(e) => return Err(self.io_error(e)),
        }
        let h = self.window.peek(hdr_len);
        let ts_sec = endian.u32(&h[0..4]);
        let ts_frac = endian.u32(&h[4..8]);
        let caplen = endian.u32(&h[8..12]) as usize;
        let orig_len = endian.u32(&h[12..16]);
        let limit = (*snaplen as usize).clamp(MAX_RECORD, 16 * MAX_RECORD);
        let frac_ok = ts_frac < if nanos { 1_000_000_000 } else { 1_000_000 };
        if caplen > limit || !frac_ok {
            let offset = self.window.offset();
            let what = format!("record length {caplen} (snaplen {snaplen}), fraction {ts_frac}");
            let prev = *last_ts_sec;
            let skipped = self.resync_pcap(endian, hdr_len, limit, nanos, prev);
            let what = match skipped {
                Some(n) => format!("{what}; skipped {n} bytes to the next plausible record"),
                None => {
                    self.done = true;
                    format!("{what}; no plausible record follows, stopped reading")
                }
            };
            return Err(CaptureError::Corrupt { source_name: self.name.clone(), offset, what });
        }
        match self.window.ensure(hdr_len + caplen) {
            Ok(true) => {}
            Ok(false) => return Err(self.truncated(&format!("packet data ({caplen} bytes announced)"))),
            Err(e) => return Err(self.io_error(e)),
        }
        if let Format::Pcap { last_ts_sec, .. } = &mut self.format {
            *last_ts_sec = Some(ts_sec);
        }
        let ts_ns = i64::from(ts_sec) * 1_000_000_000 + i64::from(ts_frac) * if nanos { 1 } else { 1000 };
        self.window.consume(hdr_len);
        self.record = (self.window.pos, caplen);
        self.window.consume(caplen);
        Ok(Some((ts_ns, link_type, orig_len)))
    }

    /// Scans forward for a record header that looks right and is followed by another one (or the
    /// end of the file). Returns how many bytes were skipped.
    fn resync_pcap(
        &mut self,
        endian: Endian,
        hdr_len: usize,
        limit: usize,
        nanos: bool,
        prev_sec: Option<u32>,
    ) -> Option<usize> {
        let plausible = |h: &[u8]| {
            let sec = endian.u32(&h[0..4]);
            let frac = endian.u32(&h[4..8]);
            let cap = endian.u32(&h[8..12]) as usize;
            let len = endian.u32(&h[12..16]) as usize;
            let near = prev_sec.is_none_or(|p| sec.abs_diff(p) < 7 * 86_400);
            near && frac < if nanos { 1_000_000_000 } else { 1_000_000 }
                && cap <= limit
                && cap <= len
                && len <= 16 * MAX_RECORD
                && cap > 0
        };
        for skip in 1..MAX_RESYNC_SCAN {
            match self.window.ensure(skip + hdr_len) {
                Ok(true) => {}
                _ => return None,
            }
            let h = &self.window.peek(skip + hdr_len)[skip..];
            if !plausible(h) {
                continue;
            }
            let cap = endian.u32(&h[8..12]) as usize;
            let next = skip + hdr_len + cap;
            let confirmed = match self.window.ensure(next + hdr_len) {
                Ok(true) => plausible(&self.window.peek(next + hdr_len)[next..]),
                Ok(false) => self.window.available() == next,
                Err(_) => false,
            };
            if confirmed {
                self.window.consume(skip);
                return Some(skip);
            }
        }
        None
    }

    fn next_pcapng(&mut self) -> Result<Option<(i64, LinkType, u32)>, CaptureError> {
        loop {
            match self.window.ensure(12) {
                Ok(true) => {}
                Ok(false) if self.window.available() == 0 => return Ok(None),
                Ok(false) => return Err(self.truncated("block header")),
                Err(e) => return Err(self.io_error(e)),
            }
            let head = self.window.peek(12);
            let raw_type = [head[0], head[1], head[2], head[3]];
            if raw_type == [0x0a, 0x0d, 0x0d, 0x0a] {
                // A section header fixes the byte order for everything that follows.
                let endian = match [head[8], head[9], head[10], head[11]] {
                    [0x4d, 0x3c, 0x2b, 0x1a] => Endian::Little,
                    [0x1a, 0x2b, 0x3c, 0x4d] => Endian::Big,
                    other => {
                        let offset = self.window.offset();
                        self.done = true;
                        return Err(CaptureError::Corrupt {
                            source_name: self.name.clone(),
                            offset,
                            what: format!("section header with byte-order magic {other:02x?}; stopped reading"),
                        });
                    }
                };
                if let Format::PcapNg { endian: e, interfaces, .. } = &mut self.format {
                    *e = endian;
                    interfaces.clear();
                }
            }
            let Format::PcapNg { endian, .. } = &self.format else { unreachable!() };
            let endian = *endian;
            let head = self.window.peek(12);
            let block_type = endian.u32(&head[0..4]);
            let block_len = endian.u32(&head[4..8]) as usize;
            if block_len < 12 || !block_len.is_multiple_of(4) || block_len > MAX_BLOCK {
                let offset = self.window.offset();
                let what = format!("block type {block_type:#x} with length {block_len}");
                let what = match self.resync_pcapng(endian) {
                    Some(n) => format!("{what}; skipped {n} bytes to the next block"),
                    None => {
                        self.done = true;
                        format!("{what}; no valid block follows, stopped reading")
                    }
                };
                return Err(CaptureError::Corrupt { source_name: self.name.clone(), offset, what });
            }
            match self.window.ensure(block_len) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(self.truncated(&format!("block type {block_type:#x} ({block_len} bytes announced)")))
                }
                Err(e) => return Err(self.io_error(e)),
            }
            let block_start = self.window.pos;
            let trailer = endian.u32(&self.window.peek(block_len)[block_len - 4..]) as usize;
            if trailer != block_len {
                let offset = self.window.offset();
                let what = format!("block type {block_type:#x}: length {block_len} at start but {trailer} at end");
                let what = match self.resync_pcapng(endian) {
                    Some(n) => format!("{what}; skipped {n} bytes to the next block"),
                    None => {
                        self.done = true;
                        format!("{what}; no valid block follows, stopped reading")
                    }
                };
                return Err(CaptureError::Corrupt { source_name: self.name.clone(), offset, what });
            }
            let body = &self.window.buf[block_start + 8..block_start + block_len - 4];
            let parsed = pcapng_block(
                &mut self.format,
                &mut self.record,
                &mut self.losses,
                endian,
                block_type,
                body,
                block_start + 8,
            );
            self.window.consume(block_len);
            match parsed {
                Ok(Some(packet)) => return Ok(Some(packet)),
                Ok(None) => continue,
                Err(what) => {
                    let offset = self.window.offset() - block_len as u64;
                    return Err(CaptureError::Corrupt { source_name: self.name.clone(), offset, what });
                }
            }
        }
    }
}

/// Interprets one pcapng block body. Packets set `record`; other blocks update the state.
fn pcapng_block(
    format: &mut Format,
    record: &mut (usize, usize),
    losses: &mut Vec<FileLoss>,
    endian: Endian,
    block_type: u32,
    body: &[u8],
    body_start: usize,
) -> Result<Option<(i64, LinkType, u32)>, String> {
    {
        let Format::PcapNg { interfaces, last_ts_ns, .. } = format else { unreachable!() };
        match block_type {
            // Interface description.
            0x0000_0001 => {
                if body.len() < 8 {
                    return Err("interface description block too short; interface ignored".into());
                }
                let mut iface = Interface {
                    link_type: LinkType(u32::from(endian.u16(&body[0..2]))),
                    snaplen: endian.u32(&body[4..8]),
                    resolution: Resolution::Decimal(6),
                    offset_ns: 0,
                    first_ts_ns: None,
                    stats: None,
                };
                for (code, value) in options(endian, &body[8..]) {
                    match (code, value.len()) {
                        (9, 1..) => {
                            let v = value[0];
                            iface.resolution =
                                if v & 0x80 == 0 { Resolution::Decimal(v) } else { Resolution::Binary(v & 0x7f) };
                        }
                        (14, 8..) => iface.offset_ns = (endian.u64(value) as i64).saturating_mul(1_000_000_000),
                        _ => {}
                    }
                }
                interfaces.push(iface);
                Ok(None)
            }
            // Enhanced packet block, and the obsolete packet block.
            0x0000_0006 | 0x0000_0002 => {
                if body.len() < 20 {
                    return Err("packet block too short; skipped".into());
                }
                let iface_id =
                    if block_type == 6 { endian.u32(&body[0..4]) } else { u32::from(endian.u16(&body[0..2])) } as usize;
                let units = (u64::from(endian.u32(&body[4..8])) << 32) | u64::from(endian.u32(&body[8..12]));
                let caplen = endian.u32(&body[12..16]) as usize;
                let orig_len = endian.u32(&body[16..20]);
                let Some(iface) = interfaces.get(iface_id).copied() else {
                    return Err(format!("packet for undeclared interface {iface_id}; skipped"));
                };
                if caplen > body.len() - 20 {
                    return Err(format!(
                        "packet claims {caplen} captured bytes but its block holds {}; skipped",
                        body.len() - 20
                    ));
                }
                let ts_ns = iface.resolution.to_ns(units).saturating_add(iface.offset_ns);
                interfaces[iface_id].first_ts_ns.get_or_insert(ts_ns);
                *last_ts_ns = ts_ns;
                *record = (body_start + 20, caplen);
                Ok(Some((ts_ns, iface.link_type, orig_len)))
            }
            // Simple packet block: no timestamp (use the last one seen), interface 0.
            0x0000_0003 => {
                if body.len() < 4 {
                    return Err("simple packet block too short; skipped".into());
                }
                let Some(iface) = interfaces.first().copied() else {
                    return Err("simple packet block before any interface; skipped".into());
                };
                let orig_len = endian.u32(&body[0..4]);
                let mut caplen = (orig_len as usize).min(body.len() - 4);
                if iface.snaplen > 0 {
                    caplen = caplen.min(iface.snaplen as usize);
                }
                *record = (body_start + 4, caplen);
                Ok(Some((*last_ts_ns, iface.link_type, orig_len)))
            }
            // Interface statistics: drop counters growing since the last block are a loss period.
            0x0000_0005 => {
                if body.len() < 12 {
                    return Err("interface statistics block too short; ignored".into());
                }
                let iface_id = endian.u32(&body[0..4]) as usize;
                let units = (u64::from(endian.u32(&body[4..8])) << 32) | u64::from(endian.u32(&body[8..12]));
                let Some(iface) = interfaces.get_mut(iface_id) else {
                    return Err(format!("statistics for undeclared interface {iface_id}; ignored"));
                };
                let ts_ns = iface.resolution.to_ns(units).saturating_add(iface.offset_ns);
                let mut dropped: Option<u64> = None;
                for (code, value) in options(endian, &body[12..]) {
                    // isb_ifdrop (5) and isb_osdrop (7).
                    if matches!(code, 5 | 7) && value.len() >= 8 {
                        dropped = Some(dropped.unwrap_or(0).saturating_add(endian.u64(value)));
                    }
                }
                if let Some(total) = dropped {
                    let (from_ns, before) = iface.stats.unwrap_or((iface.first_ts_ns.unwrap_or(i64::MIN), 0));
                    if total > before {
                        losses.push(FileLoss { from_ns, until_ns: ts_ns, dropped: total - before });
                    }
                    iface.stats = Some((ts_ns, total));
                }
                Ok(None)
            }
            // Section header (handled before), name resolution, custom, ...: nothing to do.
            _ => Ok(None),
        }
    }
}

impl FileSource {
    /// The loss periods the file's interface statistics reported so far (pcapng only).
    pub fn losses(&self) -> &[FileLoss] {
        &self.losses
    }

    /// Scans forward for a block whose length at start and end agree. Returns bytes skipped.
    fn resync_pcapng(&mut self, endian: Endian) -> Option<usize> {
        for skip in (4..MAX_RESYNC_SCAN).step_by(4) {
            match self.window.ensure(skip + 12) {
                Ok(true) => {}
                _ => return None,
            }
            let h = &self.window.peek(skip + 12)[skip..];
            let block_type = endian.u32(&h[0..4]);
            let len = endian.u32(&h[4..8]) as usize;
            if !matches!(block_type, 1..=6 | 0x0a0d_0d0a) || len < 12 || !len.is_multiple_of(4) || len > MAX_BLOCK {
                continue;
            }
            if let Ok(true) = self.window.ensure(skip + len) {
                let block = &self.window.peek(skip + len)[skip..];
                if endian.u32(&block[len - 4..]) as usize == len {
                    self.window.consume(skip);
                    return Some(skip);
                }
            }
        }
        None
    }
}

/// Iterates over pcapng options (code, value) until `opt_endofopt` or the end of the data.
fn options(endian: Endian, mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let code = endian.u16(&data[0..2]);
        let len = usize::from(endian.u16(&data[2..4]));
        if code == 0 || data.len() < 4 + len {
            return None;
        }
        let value = &data[4..4 + len];
        data = &data[(4 + ((len + 3) & !3)).min(data.len())..];
        Some((code, value))
    })
}

impl PacketSource for FileSource {
    fn next_packet(&mut self) -> Result<Poll<'_>, CaptureError> {
        if self.done {
            return Ok(Poll::End);
        }
        let next = match self.format {
            Format::Pcap { .. } => self.next_pcap()?,
            Format::PcapNg { .. } => self.next_pcapng()?,
        };
        match next {
            None => {
                self.done = true;
                Ok(Poll::End)
            }
            Some((ts_ns, link_type, orig_len)) => {
                let (start, len) = self.record;
                Ok(Poll::Packet(RawPacket { ts_ns, link_type, data: &self.window.buf[start..start + len], orig_len }))
            }
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn progress(&self) -> (u64, Option<u64>) {
        (self.window.offset(), self.total_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_le(records: &[(u32, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        for (sec, usec, data) in records {
            out.extend_from_slice(&sec.to_le_bytes());
            out.extend_from_slice(&usec.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    fn read_all(bytes: Vec<u8>) -> (Vec<(i64, Vec<u8>)>, Vec<String>) {
        let mut src = FileSource::from_reader("t", Box::new(io::Cursor::new(bytes)), None).unwrap();
        let (mut packets, mut errors) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            match src.next_packet() {
                Ok(Poll::Packet(p)) => packets.push((p.ts_ns, p.data.to_vec())),
                Ok(Poll::End) => break,
                Ok(Poll::Idle) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        (packets, errors)
    }

    #[test]
    fn reads_classic_pcap() {
        let (packets, errors) = read_all(pcap_le(&[(10, 5, b"abc"), (11, 0, b"defg")]));
        assert!(errors.is_empty());
        assert_eq!(packets, vec![(10_000_005_000, b"abc".to_vec()), (11_000_000_000, b"defg".to_vec())]);
    }

    #[test]
    fn truncated_pcap_keeps_earlier_records() {
        let mut bytes = pcap_le(&[(10, 5, b"abc"), (11, 0, b"defg")]);
        bytes.truncate(bytes.len() - 2);
        let (packets, errors) = read_all(bytes);
        assert_eq!(packets.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("truncated at byte 43"), "{errors:?}");
    }

    #[test]
    fn corrupt_record_length_is_skipped_and_reading_resumes() {
        let good: &[u8] = &[7u8; 40];
        let mut bytes = pcap_le(&[(10, 1, good), (10, 2, good), (10, 3, good), (10, 4, good)]);
        // Break the second record's captured length.
        let second = 24 + 16 + 40;
        bytes[second + 8..second + 12].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        let (packets, errors) = read_all(bytes);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("corrupt record at byte 80"), "{errors:?}");
        let times: Vec<i64> = packets.iter().map(|p| p.0).collect();
        assert_eq!(times, vec![10_000_001_000, 10_000_003_000, 10_000_004_000]);
    }

    #[test]
    fn not_a_capture_is_named() {
        let err =
            FileSource::from_reader("x.txt", Box::new(io::Cursor::new(b"hello world, this is text".to_vec())), None)
                .err()
                .unwrap();
        assert!(err.to_string().starts_with("x.txt: not a pcap or pcapng file"), "{err}");
    }

    fn pcapng_be_two_interfaces() -> Vec<u8> {
        fn block(t: u32, body: &[u8]) -> Vec<u8> {
            let len = 12 + body.len().div_ceil(4) * 4;
            let mut b = t.to_be_bytes().to_vec();
            b.extend_from_slice(&(len as u32).to_be_bytes());
            b.extend_from_slice(body);
            b.resize(len - 4, 0);
            b.extend_from_slice(&(len as u32).to_be_bytes());
            b
        }
        let mut shb = 0x1a2b_3c4du32.to_be_bytes().to_vec();
        shb.extend_from_slice(&[0, 1, 0, 0]);
        shb.extend_from_slice(&(-1i64).to_be_bytes());
        let mut out = block(0x0a0d_0d0a, &shb);
        // Interface 0: Ethernet, microseconds. Interface 1: raw IPv4, nanoseconds (if_tsresol=9).
        let mut idb0 = 1u16.to_be_bytes().to_vec();
        idb0.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff]);
        out.extend(block(1, &idb0));
        let mut idb1 = 228u16.to_be_bytes().to_vec();
        idb1.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff]);
        idb1.extend_from_slice(&[0, 9, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0]);
        out.extend(block(1, &idb1));
        for (iface, units, data) in [(0u32, 1_000_000u64, b"eth".as_slice()), (1, 2_000_000_007, b"ip4!".as_slice())] {
            let mut epb = iface.to_be_bytes().to_vec();
            epb.extend_from_slice(&((units >> 32) as u32).to_be_bytes());
            epb.extend_from_slice(&(units as u32).to_be_bytes());
            epb.extend_from_slice(&(data.len() as u32).to_be_bytes());
            epb.extend_from_slice(&(data.len() as u32).to_be_bytes());
            epb.extend_from_slice(data);
            out.extend(block(6, &epb));
        }
        out
    }

    #[test]
    fn pcapng_big_endian_with_mixed_link_types_and_resolutions() {
        let mut src =
            FileSource::from_reader("t", Box::new(io::Cursor::new(pcapng_be_two_interfaces())), None).unwrap();
        let mut seen = Vec::new();
        while let Ok(Poll::Packet(p)) = src.next_packet() {
            seen.push((p.ts_ns, p.link_type, p.data.to_vec()));
        }
        assert_eq!(
            seen,
            vec![
                (1_000_000_000, LinkType::ETHERNET, b"eth".to_vec()),
                (2_000_000_007, LinkType::IPV4, b"ip4!".to_vec())
            ]
        );
    }
}
