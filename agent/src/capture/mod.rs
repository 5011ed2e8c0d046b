//! Where packets come from: capture files and live interfaces, behind one interface.
//!
//! The rest of the agent sees only [`PacketSource`]: raw frames with their link type and the
//! capture's own timestamp. This module is the only place that knows libpcap (live capture) and
//! the file formats. Files are read by our own pcap/pcapng reader rather than libpcap because
//! libpcap refuses pcapng files whose interfaces have different link types, cannot skip past a
//! corrupt record, and gives no byte offsets for error messages; reading files ourselves keeps
//! every packet before and after a damaged record.

mod file;
mod live;

pub use file::{FileLoss, FileSource};
pub use live::{LiveConfig, LiveSource, BLOCK_TIMEOUT_MS};

use crate::wire::LinkType;

/// One captured frame, borrowed from the source until the next call.
#[derive(Clone, Copy, Debug)]
pub struct RawPacket<'a> {
    /// Capture timestamp, nanoseconds since the Unix epoch.
    pub ts_ns: i64,
    /// Link-layer type of this frame (pcapng files may mix several).
    pub link_type: LinkType,
    /// The captured bytes (possibly fewer than were on the wire).
    pub data: &'a [u8],
    /// Length of the frame on the wire.
    pub orig_len: u32,
}

/// What a source has next.
#[derive(Debug)]
pub enum Poll<'a> {
    /// A frame.
    Packet(RawPacket<'a>),
    /// Nothing right now (live capture timed out); call again.
    Idle,
    /// The source is exhausted.
    End,
}

/// Kernel/libpcap packet counters of a live capture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureDrops {
    /// Packets the filter accepted.
    pub received: u64,
    /// Packets dropped because the capture buffer was full.
    pub dropped: u64,
    /// Packets dropped by the interface or driver.
    pub if_dropped: u64,
}

/// A problem with a capture. Reading may go on after it; see [`PacketSource::next_packet`].
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be opened or read.
    #[error("{source_name}: {error}")]
    Io {
        /// File name.
        source_name: String,
        /// The I/O error.
        #[source]
        error: std::io::Error,
    },
    /// The file does not start like a pcap or pcapng file.
    #[error("{source_name}: not a pcap or pcapng file (first bytes {magic:02x?})")]
    NotACapture {
        /// File name.
        source_name: String,
        /// The first bytes found.
        magic: Vec<u8>,
    },
    /// The file ends in the middle of a record.
    #[error("{source_name}: truncated at byte {offset}: {what}")]
    Truncated {
        /// File name.
        source_name: String,
        /// Byte offset of the incomplete record.
        offset: u64,
        /// What was being read.
        what: String,
    },
    /// A record header is impossible; the reader skipped ahead to the next plausible record.
    #[error("{source_name}: corrupt record at byte {offset}: {what}")]
    Corrupt {
        /// File name.
        source_name: String,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong and what the reader did about it.
        what: String,
    },
    /// libpcap refused to open or read a live interface.
    #[error("{source_name}: {message}")]
    Live {
        /// Interface name.
        source_name: String,
        /// libpcap's message.
        message: String,
    },
}

/// A stream of captured frames.
pub trait PacketSource {
    /// The next frame. An `Err` reports a problem; calling again continues after it when the
    /// format allows (a corrupt record is skipped) or returns [`Poll::End`].
    fn next_packet(&mut self) -> Result<Poll<'_>, CaptureError>;

    /// A name for messages: the file name or the interface.
    fn name(&self) -> &str;

    /// Bytes consumed so far and the total, when known (for a progress bar).
    fn progress(&self) -> (u64, Option<u64>) {
        (0, None)
    }

    /// Packets arrive as they happen (live capture): process each at once rather than batching.
    fn is_live(&self) -> bool {
        false
    }

    /// libpcap's drop counters, for live captures.
    fn drops(&mut self) -> Option<CaptureDrops> {
        None
    }
}
