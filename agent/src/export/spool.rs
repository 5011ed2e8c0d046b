//! The on-disk spool: every batch is written here before it is sent, and stays until the
//! collector says it is durable.
//!
//! Why a spool and not just memory: the collector may be down for hours, and the agent may be
//! restarted in between; neither must lose events. Batches are numbered 1, 2, 3, ... per
//! `boot_id`, and the boot id lives in the spool's state file, so a restarted agent resumes the
//! same numbering and resends exactly the batches the collector has not acknowledged (the
//! collector drops a batch number it already has, so resending is harmless).
//!
//! Layout of the state directory:
//!
//! ```text
//! LOCK                      held (flock) while an agent uses the directory
//! state                     "<boot_id> <acked_seq>\n", replaced atomically (tmp, fsync, rename)
//! spool/<first_seq>.seg     append-only segments, named by their first batch number (20 digits)
//! ```
//!
//! A segment starts with the 8-byte magic `RSTSPL01`, then records:
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC-32 (IEEE) of the 8 seq bytes followed by the payload
//! u64 LE  batch number
//! [u8]    payload: a protobuf-encoded rstscope.v1.Batch
//! ```
//!
//! A record whose CRC does not match is reported and skipped; its batch number is presumed lost
//! and sent as a batch holding only a `CaptureLoss`, so the collector sees neither a gap nor a
//! silent hole. An impossible length ends the scan of that segment (the rest cannot be framed).
//! Nothing here panics on what it reads. A segment is deleted once every batch in it is
//! acknowledged; new batches always go to a fresh segment after a restart, so a torn tail is
//! never appended to.
//!
//! Durability: the exporter syncs the current segment (`fdatasync`) after every group of
//! batches it writes and before the sender may read them (one sync per drain of the queue,
//! so the cost is per call, not per batch); a new segment's directory entry is synced when it
//! is created, and a finished segment when the next one starts. So a batch that counts as
//! spooled survives a power loss, not only a crash of the agent. If the spool's tail is lost
//! anyway (a disk that lies about syncs), the collector's `durable_seq` being ahead of the
//! spool's numbering starts a new boot id rather than reusing numbers (see `client`).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use prost::Message as _;
use rstscope_proto::v1;

/// First bytes of every segment file.
const MAGIC: &[u8; 8] = b"RSTSPL01";
/// Bytes before each record's payload.
const RECORD_HEADER: u64 = 16;
/// Larger payload lengths are taken as corruption.
const MAX_RECORD: u64 = 64 << 20;
/// Largest segment file; a smaller spool cap makes segments smaller so deletion keeps up.
const MAX_SEGMENT: u64 = 8 << 20;
/// What a loss report may add beyond the cap, so that a full spool can still say it dropped.
const LOSS_SLACK: u64 = 1 << 20;
/// `reason` of the `CaptureLoss` standing in for a batch whose record was corrupt.
pub const CORRUPT_REASON: &str = "spool record corrupt";

/// Something went wrong with the spool's files.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file could not be read, written, created or removed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The state file exists but does not say `<boot_id> <seq>`.
    #[error("{}: not a spool state file ({reason}); move it away to start a new spool", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process holds the directory's lock.
    #[error("{}: another rstscope-agent is using this state directory (give each agent its own --name or --state-dir)", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_path_buf(), source }
}

/// Where an unacknowledged batch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// In segment `segment` (its first seq) at byte `offset`, payload `len` bytes.
    Disk { segment: u64, offset: u64, len: u64 },
    /// Its record was corrupt: send a loss report in its place.
    Lost,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    bytes: u64,
    /// Highest batch number written to it (0: none).
    last_seq: u64,
}

/// What [`Spool::open`] found wrong on disk (already logged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records skipped because of a bad CRC, bad length or out-of-order number.
    pub corrupt_records: u64,
    /// Unacknowledged batches found and to be resent.
    pub unacked_batches: u64,
}

/// The append-only, size-capped, crash-safe batch log. Not thread-safe by itself; the exporter
/// keeps it behind a mutex.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    spool_dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    boot_id: String,
    acked: u64,
    next_seq: u64,
    /// By first seq.
    segments: BTreeMap<u64, Segment>,
    /// The segment new records go to (its first seq), if one is open for appending.
    current: Option<u64>,
    /// Unacknowledged batches.
    index: BTreeMap<u64, Entry>,
    bytes: u64,
    recovery: Recovery,
    _lock: File,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, holding at most `max_bytes` of segments.
    ///
    /// Scans every segment, reporting and skipping corrupt records, and indexes the batches not
    /// yet acknowledged.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("LOCK");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked { path: lock_path }),
            Err(fs::TryLockError::Error(e)) => return Err(SpoolError::Io { path: lock_path, source: e }),
        }
        let spool_dir = dir.join("spool");
        fs::create_dir_all(&spool_dir).map_err(io_err(&spool_dir))?;
        let state_path = dir.join("state");
        let (boot_id, acked) = match fs::read_to_string(&state_path) {
            Ok(text) => parse_state(&text).map_err(|reason| SpoolError::State { path: state_path.clone(), reason })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (new_boot_id(), 0),
            Err(e) => return Err(SpoolError::Io { path: state_path, source: e }),
        };
        let segment_bytes = (max_bytes / 8).clamp(64 << 10, MAX_SEGMENT);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            spool_dir,
            max_bytes,
            segment_bytes,
            boot_id,
            acked,
            next_seq: acked + 1,
            segments: BTreeMap::new(),
            current: None,
            index: BTreeMap::new(),
            bytes: 0,
            recovery: Recovery::default(),
            _lock: lock,
        };
        spool.write_state()?;
        spool.scan()?;
        Ok(spool)
    }

    fn scan(&mut self) -> Result<(), SpoolError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.spool_dir).map_err(io_err(&self.spool_dir))? {
            let entry = entry.map_err(io_err(&self.spool_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(first) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
                names.push((first, entry.path()));
            } else if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        names.sort();
        let mut last_seen = self.acked;
        // Corrupt records after the last good one: their numbers may have been sent already.
        let mut corrupt_tail = 0u64;
        for (first, path) in names {
            let mut file = OpenOptions::new().read(true).append(true).open(&path).map_err(io_err(&path))?;
            let mut data = Vec::new();
            file.read_to_end(&mut data).map_err(io_err(&path))?;
            let mut last_seq = 0;
            let mut offset = MAGIC.len() as u64;
            if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
                if !data.is_empty() {
                    tracing::warn!(path = %path.display(), "Spool segment has no valid header; skipping it.");
                    self.recovery.corrupt_records += 1;
                    corrupt_tail += 1;
                }
                offset = data.len() as u64;
            }
            while offset < data.len() as u64 {
                let rest = &data[offset as usize..];
                if (rest.len() as u64) < RECORD_HEADER {
                    tracing::warn!(path = %path.display(), offset, "Spool segment ends in a torn record header; ignoring the tail.");
                    self.recovery.corrupt_records += 1;
                    break;
                }
                let len = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
                let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
                let seq_bytes: [u8; 8] = [rest[8], rest[9], rest[10], rest[11], rest[12], rest[13], rest[14], rest[15]];
                if len > MAX_RECORD || len > rest.len() as u64 - RECORD_HEADER {
                    tracing::warn!(path = %path.display(), offset, len, "Spool record has an impossible length; ignoring the rest of the segment.");
                    self.recovery.corrupt_records += 1;
                    break;
                }
                let payload = &rest[RECORD_HEADER as usize..(RECORD_HEADER + len) as usize];
                let record_offset = offset;
                offset += RECORD_HEADER + len;
                if record_crc(&seq_bytes, payload) != crc {
                    tracing::warn!(path = %path.display(), offset = record_offset, "Spool record fails its CRC; skipping it.");
                    self.recovery.corrupt_records += 1;
                    corrupt_tail += 1;
                    continue;
                }
                let seq = u64::from_le_bytes(seq_bytes);
                if seq <= last_seen {
                    if seq > self.acked {
                        tracing::warn!(path = %path.display(), offset = record_offset, seq, "Spool record out of order; skipping it.");
                        self.recovery.corrupt_records += 1;
                    }
                    continue;
                }
                corrupt_tail = 0;
                last_seen = seq;
                last_seq = seq;
                self.index.insert(seq, Entry::Disk { segment: first, offset: record_offset + RECORD_HEADER, len });
            }
            let bytes = data.len() as u64;
            if last_seq <= self.acked {
                // Nothing unacknowledged (or nothing readable) in it.
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            self.bytes += bytes;
            self.segments.insert(first, Segment { path, file, bytes, last_seq });
        }
        self.next_seq = last_seen + corrupt_tail + 1;
        for seq in self.acked + 1..self.next_seq {
            self.index.entry(seq).or_insert(Entry::Lost);
        }
        self.recovery.unacked_batches = self.index.len() as u64;
        Ok(())
    }

    /// Identifies this spool's numbering; sent in `AgentHello.boot_id`.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Highest batch number the collector has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest batch number written (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Batches written and not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.last_seq() - self.acked
    }

    /// Bytes of segment files on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What opening the spool found.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `events` as the next batch. `Ok(None)` if the spool is at its size cap (the
    /// caller drops and counts them).
    pub fn append(&mut self, events: &[v1::Event]) -> Result<Option<u64>, SpoolError> {
        self.append_with_cap(events, self.max_bytes)
    }

    /// Like [`Spool::append`], for a batch that only reports losses: it may exceed the cap by a
    /// little, so that a full spool can still tell the collector what it dropped.
    pub fn append_loss_report(&mut self, events: &[v1::Event]) -> Result<Option<u64>, SpoolError> {
        self.append_with_cap(events, self.max_bytes.saturating_add(LOSS_SLACK))
    }

    fn append_with_cap(&mut self, events: &[v1::Event], cap: u64) -> Result<Option<u64>, SpoolError> {
        let seq = self.next_seq;
        let payload = encode_batch(seq, events);
        let len = payload.len() as u64;
        let record_len = RECORD_HEADER + len;
        if len > MAX_RECORD || self.bytes + record_len + MAGIC.len() as u64 > cap {
            return Ok(None);
        }
        let current = match self.current.and_then(|c| self.segments.get(&c).map(|s| (c, s.bytes))) {
            Some((c, bytes)) if bytes + record_len <= self.segment_bytes || bytes == MAGIC.len() as u64 => c,
            _ => self.new_segment(seq)?,
        };
        let seq_bytes = seq.to_le_bytes();
        let mut record = Vec::with_capacity(record_len as usize);
        record.extend_from_slice(&(len as u32).to_le_bytes());
        record.extend_from_slice(&record_crc(&seq_bytes, &payload).to_le_bytes());
        record.extend_from_slice(&seq_bytes);
        record.extend_from_slice(&payload);
        let Some(segment) = self.segments.get_mut(&current) else {
            return Err(SpoolError::Io { path: self.spool_dir.clone(), source: io::Error::other("segment vanished") });
        };
        if let Err(e) = segment.file.write_all(&record) {
            // Cut off whatever part got written, so the segment stays well-formed; if even that
            // fails, stop appending to it (the scan on the next start ignores a torn tail).
            if segment.file.set_len(segment.bytes).is_err() {
                self.current = None;
            }
            return Err(SpoolError::Io { path: segment.path.clone(), source: e });
        }
        let offset = segment.bytes + RECORD_HEADER;
        segment.bytes += record_len;
        segment.last_seq = seq;
        self.bytes += record_len;
        self.index.insert(seq, Entry::Disk { segment: current, offset, len });
        self.next_seq += 1;
        Ok(Some(seq))
    }

    fn new_segment(&mut self, first_seq: u64) -> Result<u64, SpoolError> {
        if let Some(old) = self.current.take().and_then(|c| self.segments.get(&c)) {
            // Data of a finished segment reaches the disk now rather than at some later point.
            old.file.sync_data().map_err(io_err(&old.path))?;
        }
        let path = self.spool_dir.join(format!("{first_seq:020}.seg"));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        file.set_len(0).map_err(io_err(&path))?;
        file.write_all(MAGIC).map_err(io_err(&path))?;
        // The new name must survive a power loss too, not only the data synced into it later.
        File::open(&self.spool_dir).and_then(|dir| dir.sync_all()).map_err(io_err(&self.spool_dir))?;
        self.bytes += MAGIC.len() as u64;
        self.segments.insert(first_seq, Segment { path, file, bytes: MAGIC.len() as u64, last_seq: 0 });
        self.current = Some(first_seq);
        Ok(first_seq)
    }

    /// Batch `seq`, if it is unacknowledged. A record that went bad since it was written is
    /// reported and comes back as a loss report, like a corrupt one found at start-up.
    pub fn read(&self, seq: u64) -> Result<Option<v1::Batch>, SpoolError> {
        let Some(entry) = self.index.get(&seq) else { return Ok(None) };
        let Entry::Disk { segment, offset, len } = *entry else { return Ok(Some(lost_batch(seq))) };
        let Some(segment) = self.segments.get(&segment) else { return Ok(Some(lost_batch(seq))) };
        let mut buf = vec![0u8; (RECORD_HEADER + len) as usize];
        segment.file.read_exact_at(&mut buf, offset - RECORD_HEADER).map_err(io_err(&segment.path))?;
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let seq_bytes: [u8; 8] = [buf[8], buf[9], buf[10], buf[11], buf[12], buf[13], buf[14], buf[15]];
        let payload = &buf[RECORD_HEADER as usize..];
        let decoded = (record_crc(&seq_bytes, payload) == crc && u64::from_le_bytes(seq_bytes) == seq)
            .then(|| v1::Batch::decode(payload).ok())
            .flatten();
        match decoded {
            Some(batch) if batch.seq == seq => Ok(Some(batch)),
            _ => {
                tracing::warn!(path = %segment.path.display(), offset, seq, "Spool record went bad after it was written; reporting it lost.");
                Ok(Some(lost_batch(seq)))
            }
        }
    }

    /// Records that the collector holds every batch up to `seq`: persists the pointer and
    /// deletes fully acknowledged segments.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        let seq = seq.min(self.last_seq());
        if seq <= self.acked {
            return Ok(());
        }
        self.acked = seq;
        self.write_state()?;
        self.index = self.index.split_off(&(seq + 1));
        let done: Vec<u64> = self.segments.iter().filter(|(_, s)| s.last_seq <= seq).map(|(first, _)| *first).collect();
        for first in done {
            if let Some(segment) = self.segments.remove(&first) {
                if self.current == Some(first) {
                    self.current = None;
                }
                self.bytes -= segment.bytes;
                fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
            }
        }
        Ok(())
    }

    /// Starts a new numbering under a new boot id. Only when nothing is unacknowledged: used
    /// when the collector already holds more batches of this boot id than the spool ever wrote
    /// (a restored or copied state directory), where reusing numbers would lose events.
    pub fn restart_numbering(&mut self) -> Result<(), SpoolError> {
        if self.unacked() > 0 {
            return Ok(());
        }
        self.boot_id = new_boot_id();
        self.acked = 0;
        self.next_seq = 1;
        self.write_state()
    }

    /// Flushes the current segment to disk.
    pub fn sync(&self) -> Result<(), SpoolError> {
        if let Some(segment) = self.current.and_then(|c| self.segments.get(&c)) {
            segment.file.sync_data().map_err(io_err(&segment.path))?;
        }
        Ok(())
    }

    fn write_state(&self) -> Result<(), SpoolError> {
        let path = self.dir.join("state");
        let tmp = self.dir.join("state.tmp");
        let write = || -> io::Result<()> {
            let mut file = File::create(&tmp)?;
            writeln!(file, "{} {}", self.boot_id, self.acked)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename itself is durable only once the directory is.
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(io_err(&path))
    }
}

/// `v1::Batch { seq, events }` encoded, without cloning the events into a `Batch` first; the
/// same bytes prost's derived encoder writes (field 1 varint, then field 2 per event).
fn encode_batch(seq: u64, events: &[v1::Event]) -> Vec<u8> {
    let len = prost::encoding::uint64::encoded_len(1, &seq) + prost::encoding::message::encoded_len_repeated(2, events);
    let mut buf = Vec::with_capacity(len);
    prost::encoding::uint64::encode(1, &seq, &mut buf);
    for event in events {
        prost::encoding::message::encode(2, event, &mut buf);
    }
    buf
}

fn record_crc(seq_bytes: &[u8; 8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(seq_bytes);
    hasher.update(payload);
    hasher.finalize()
}

fn parse_state(text: &str) -> Result<(String, u64), String> {
    let mut parts = text.split_whitespace();
    let boot_id = parts.next().ok_or("empty")?;
    let acked = parts.next().ok_or("no acknowledged batch number")?.parse::<u64>().map_err(|e| e.to_string())?;
    if parts.next().is_some() || !boot_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err("unexpected content".into());
    }
    Ok((boot_id.to_string(), acked))
}

/// The batch sent in place of one whose record was corrupt.
fn lost_batch(seq: u64) -> v1::Batch {
    let loss = v1::CaptureLoss { reason: CORRUPT_REASON.to_string(), ..Default::default() };
    v1::Batch { seq, events: vec![v1::Event { kind: Some(v1::event::Kind::Loss(loss)) }], spooled_seq: 0 }
}

/// A fresh, practically unique id: wall-clock time, process id and the randomly keyed std hasher.
pub fn new_boot_id() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(now.as_nanos());
    hasher.write_u32(std::process::id());
    format!("{:x}-{:x}-{:016x}", now.as_secs(), std::process::id(), hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset_event(ts_ns: i64) -> v1::Event {
        v1::Event { kind: Some(v1::event::Kind::Reset(v1::RstEvent { ts_ns, ..Default::default() })) }
    }

    fn ts_of(batch: &v1::Batch) -> Vec<i64> {
        batch
            .events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(v1::event::Kind::Reset(r)) => Some(r.ts_ns),
                _ => None,
            })
            .collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir.join("spool"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    #[test]
    fn appends_reads_and_numbers_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((spool.acked(), spool.last_seq()), (0, 0));
        assert_eq!(spool.append(&[reset_event(1)]).unwrap(), Some(1));
        assert_eq!(spool.append(&[reset_event(2), reset_event(3)]).unwrap(), Some(2));
        assert_eq!(ts_of(&spool.read(2).unwrap().unwrap()), vec![2, 3]);
        assert_eq!(spool.read(2).unwrap().map(|b| b.seq), Some(2));
        assert_eq!(spool.read(3).unwrap(), None);
        assert_eq!(spool.unacked(), 2);
    }

    #[test]
    fn reopen_resumes_boot_id_numbering_and_unacked_batches() {
        let dir = tempfile::tempdir().unwrap();
        let boot_id;
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            boot_id = spool.boot_id().to_string();
            for ts in 1..=5 {
                spool.append(&[reset_event(ts)]).unwrap();
            }
            spool.ack(2).unwrap();
        }
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.boot_id(), boot_id);
        assert_eq!((spool.acked(), spool.last_seq()), (2, 5));
        assert_eq!(spool.recovery(), Recovery { corrupt_records: 0, unacked_batches: 3 });
        assert_eq!(spool.read(2).unwrap(), None);
        assert_eq!(ts_of(&spool.read(3).unwrap().unwrap()), vec![3]);
        assert_eq!(spool.append(&[reset_event(6)]).unwrap(), Some(6));
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(Spool::open(dir.path(), 1 << 20), Err(SpoolError::Locked { .. })));
    }

    #[test]
    fn ack_deletes_fully_acknowledged_segments_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB segments (the smallest); ~10 KiB batches: several segments.
        let mut spool = Spool::open(dir.path(), 512 << 10).unwrap();
        let big = |ts| {
            vec![v1::Event {
                kind: Some(v1::event::Kind::Reset(v1::RstEvent {
                    ts_ns: ts,
                    history: "x".repeat(10_000),
                    ..Default::default()
                })),
            }]
        };
        for ts in 0..20 {
            assert!(spool.append(&big(ts)).unwrap().is_some());
        }
        let before = segment_files(dir.path()).len();
        assert!(before >= 3, "{before} segments");
        spool.ack(10).unwrap();
        let middle = segment_files(dir.path()).len();
        assert!(middle < before && middle > 0);
        spool.ack(20).unwrap();
        assert!(segment_files(dir.path()).is_empty());
        assert_eq!(spool.bytes(), 0);
        drop(spool);
        assert!(fs::read_to_string(dir.path().join("state")).unwrap().ends_with(" 20\n"));
        let mut spool = Spool::open(dir.path(), 512 << 10).unwrap();
        assert_eq!((spool.acked(), spool.last_seq(), spool.unacked()), (20, 20, 0));
        assert_eq!(spool.append(&big(21)).unwrap(), Some(21));
    }

    #[test]
    fn ack_beyond_what_was_written_is_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[reset_event(1)]).unwrap();
        spool.ack(99).unwrap();
        assert_eq!(spool.acked(), 1);
        assert_eq!(spool.append(&[reset_event(2)]).unwrap(), Some(2));
    }

    #[test]
    fn corrupt_record_is_reported_skipped_and_sent_as_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            for ts in 1..=3 {
                spool.append(&[reset_event(ts)]).unwrap();
            }
        }
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 1);
        let mut data = fs::read(&files[0]).unwrap();
        // Flip a payload byte of the second record.
        let first_len = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
        let second = 8 + 16 + first_len;
        data[second + 16] ^= 0xff;
        fs::write(&files[0], &data).unwrap();

        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.recovery(), Recovery { corrupt_records: 1, unacked_batches: 3 });
        assert_eq!(ts_of(&spool.read(1).unwrap().unwrap()), vec![1]);
        let lost = spool.read(2).unwrap().unwrap();
        assert!(matches!(&lost.events[0].kind, Some(v1::event::Kind::Loss(l)) if l.reason == CORRUPT_REASON));
        assert_eq!(ts_of(&spool.read(3).unwrap().unwrap()), vec![3]);
    }

    #[test]
    fn torn_tail_and_garbage_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.append(&[reset_event(1)]).unwrap();
            spool.append(&[reset_event(2)]).unwrap();
        }
        let files = segment_files(dir.path());
        let data = fs::read(&files[0]).unwrap();
        // Truncate in the middle of the last record, and add a garbage segment.
        fs::write(&files[0], &data[..data.len() - 3]).unwrap();
        fs::write(dir.path().join("spool").join(format!("{:020}.seg", 7)), b"not a segment at all").unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.recovery().corrupt_records, 2);
        assert_eq!(ts_of(&spool.read(1).unwrap().unwrap()), vec![1]);
        // The torn batch 2 was never complete, so never sent: its number is reused.
        let next = spool.append(&[reset_event(3)]).unwrap().unwrap();
        assert!(next >= 2);
        assert_eq!(ts_of(&spool.read(next).unwrap().unwrap()), vec![3]);
        // Every kind of arbitrary bytes in a segment opens without a panic.
        drop(spool);
        for garbage in [
            &b"RSTSPL01"[..],
            b"RSTSPL01\xff\xff\xff\xff",
            b"RSTSPL01\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00",
        ] {
            fs::write(dir.path().join("spool").join(format!("{:020}.seg", 9)), garbage).unwrap();
            assert!(Spool::open(dir.path(), 1 << 20).is_ok());
        }
    }

    #[test]
    fn cap_refuses_batches_but_lets_a_loss_report_through() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 64 << 10).unwrap();
        let big = vec![v1::Event {
            kind: Some(v1::event::Kind::Reset(v1::RstEvent { history: "x".repeat(20_000), ..Default::default() })),
        }];
        let mut written = 0;
        for _ in 0..10 {
            if spool.append(&big).unwrap().is_some() {
                written += 1;
            }
        }
        assert_eq!(written, 3);
        assert!(spool.bytes() <= 64 << 10);
        let loss = v1::Event {
            kind: Some(v1::event::Kind::Loss(v1::CaptureLoss { events_dropped: 7, ..Default::default() })),
        };
        // Fill the rest with small batches until even those are refused.
        let mut small = 0;
        while spool.append(&[reset_event(1)]).unwrap().is_some() {
            small += 1;
            assert!(small < 10_000);
        }
        assert_eq!(spool.append(std::slice::from_ref(&loss)).unwrap(), None);
        let seq = spool.append_loss_report(&[loss]).unwrap().expect("a loss report gets through");
        assert_eq!(seq, 4 + small);
        spool.ack(seq).unwrap();
        assert!(spool.append(&big).unwrap().is_some());
    }

    #[test]
    fn hand_encoded_batch_matches_prost() {
        let events = vec![reset_event(1), reset_event(-2)];
        assert_eq!(encode_batch(9, &events), v1::Batch { seq: 9, events, spooled_seq: 0 }.encode_to_vec());
    }

    #[test]
    fn state_file_garbage_is_an_error_not_a_new_spool() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("state"), "hello\n").unwrap();
        assert!(matches!(Spool::open(dir.path(), 1 << 20), Err(SpoolError::State { .. })));
    }

    #[test]
    fn restart_numbering_gives_a_new_boot_id_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[reset_event(1)]).unwrap();
        let old = spool.boot_id().to_string();
        spool.restart_numbering().unwrap();
        assert_eq!(spool.boot_id(), old, "refused while unacknowledged");
        spool.ack(1).unwrap();
        spool.restart_numbering().unwrap();
        assert_ne!(spool.boot_id(), old);
        assert_eq!(spool.append(&[reset_event(2)]).unwrap(), Some(1));
    }
}
