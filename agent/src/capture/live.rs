//! Live capture through libpcap.
//!
//! The kernel hands captured packets over in blocks (TPACKET_V3): the agent wakes once per
//! block, filled or retired by the kernel's timer (every [`LiveConfig::block_timeout_ms`]; a
//! block waits up to about two periods), instead of once per packet as in libpcap's immediate
//! mode (TPACKET_V2). Per packet, a wake-up (poll, context switches) costs
//! more than parsing and tracking it: in immediate mode the agent took 2.0 µs of CPU per packet
//! at 200k packets/s and 6.2 µs at 50k/s (`live-bench`), against 0.6 µs for the same packets
//! read from a file; with blocks, 1.0 and 1.1 µs, and no loss up to tcpreplay's top speed
//! (428k/s, was 185k/s: the agent's wake-ups no longer took the replay's CPU). A packet waits
//! at most the block timeout longer, far inside the RST settle window and the idle clock's
//! margin (`pipeline::IDLE_DELIVERY_MARGIN`); wire-to-verdict p99 stayed 2.12 s.

use super::{CaptureDrops, CaptureError, PacketSource, Poll, RawPacket};
use crate::wire::LinkType;

/// How to open a live interface.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// Interface name (`any` for all, on Linux).
    pub interface: String,
    /// BPF filter expression.
    pub filter: String,
    /// Bytes kept per packet: enough for link, IP and TCP headers with options.
    pub snaplen: i32,
    /// Put the interface into promiscuous mode.
    pub promiscuous: bool,
    /// Kernel capture buffer size in bytes.
    pub buffer_size: i32,
    /// How long one poll may wait for a packet, in milliseconds.
    pub poll_timeout_ms: i32,
    /// TPACKET_V3's block timeout in milliseconds: the period of the kernel's timer that hands
    /// over a block not yet full (a packet may wait up to about two periods).
    pub block_timeout_ms: i32,
}

/// Default [`LiveConfig::block_timeout_ms`]: small against the idle clock's margin and the
/// settle window, large enough that a busy link fills blocks before it expires.
pub const BLOCK_TIMEOUT_MS: i32 = 10;

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            interface: "any".into(),
            filter: "tcp".into(),
            snaplen: 192,
            promiscuous: false,
            buffer_size: 32 << 20,
            poll_timeout_ms: 200,
            block_timeout_ms: BLOCK_TIMEOUT_MS,
        }
    }
}

/// A libpcap live capture with nanosecond timestamps.
pub struct LiveSource {
    name: String,
    capture: pcap::Capture<pcap::Active>,
    link_type: LinkType,
    poll_timeout: rustix::event::Timespec,
    wait_fd: std::os::fd::OwnedFd,
}

impl LiveSource {
    /// Opens the interface and installs the filter.
    pub fn open(config: &LiveConfig) -> Result<LiveSource, CaptureError> {
        let err = |e: pcap::Error| CaptureError::Live { source_name: config.interface.clone(), message: e.to_string() };
        let inactive = pcap::Capture::from_device(config.interface.as_str()).map_err(err)?;
        let mut capture = inactive
            .snaplen(config.snaplen)
            .promisc(config.promiscuous)
            .buffer_size(config.buffer_size)
            .timeout(config.block_timeout_ms.max(1))
            .immediate_mode(false)
            .precision(pcap::Precision::Nano)
            .open()
            .map_err(err)?;
        capture.filter(&config.filter, true).map_err(err)?;
        // Non-blocking, and we wait for the descriptor ourselves: on Linux (TPACKET_V3) a
        // blocking read returns only once a packet arrives, whatever the timeout, so a quiet
        // interface would never give the pipeline its idle polls (clock, watermarks).
        let capture = capture.setnonblock().map_err(err)?;
        let link_type = LinkType(capture.get_datalink().0 as u32);
        let poll_timeout = rustix::event::Timespec {
            tv_sec: i64::from(config.poll_timeout_ms.max(1) / 1000),
            tv_nsec: i64::from(config.poll_timeout_ms.max(1) % 1000) * 1_000_000,
        };
        // A second descriptor of the socket to wait on while a read may still borrow the capture.
        let wait_fd = std::os::fd::AsFd::as_fd(&capture)
            .try_clone_to_owned()
            .map_err(|e| CaptureError::Live { source_name: config.interface.clone(), message: e.to_string() })?;
        Ok(LiveSource { name: config.interface.clone(), capture, link_type, poll_timeout, wait_fd })
    }

    /// The interface's link type.
    pub fn link_type(&self) -> LinkType {
        self.link_type
    }

    /// A handle another thread can use to make `next_packet` return [`Poll::End`] (libpcap's
    /// `pcap_breakloop`): the next read after it ends the capture, at the latest one poll
    /// timeout later (reads are non-blocking; the wait is our own poll).
    pub fn stopper(&mut self) -> pcap::BreakLoop {
        self.capture.breakloop_handle()
    }
}

impl PacketSource for LiveSource {
    fn next_packet(&mut self) -> Result<Poll<'_>, CaptureError> {
        let link_type = self.link_type;
        match self.capture.next_packet() {
            Ok(packet) => {
                // With nanosecond precision libpcap puts nanoseconds in `tv_usec`.
                let ts = packet.header.ts;
                // time_t and suseconds_t are not i64 on every platform.
                #[allow(clippy::useless_conversion)]
                let ts_ns = i64::from(ts.tv_sec) * 1_000_000_000 + i64::from(ts.tv_usec);
                Ok(Poll::Packet(RawPacket { ts_ns, link_type, data: packet.data, orig_len: packet.header.len }))
            }
            // Nothing buffered: wait up to the poll timeout for the descriptor, then say idle
            // either way; the caller's next call reads what arrived meanwhile.
            Err(pcap::Error::TimeoutExpired) => {
                let mut fds = [rustix::event::PollFd::new(&self.wait_fd, rustix::event::PollFlags::IN)];
                match rustix::event::poll(&mut fds, Some(&self.poll_timeout)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => Ok(Poll::Idle),
                    Err(e) => Err(CaptureError::Live { source_name: self.name.clone(), message: e.to_string() }),
                }
            }
            // pcap_breakloop (see `stopper`) ends the capture this way too.
            Err(pcap::Error::NoMorePackets) => Ok(Poll::End),
            Err(e) => Err(CaptureError::Live { source_name: self.name.clone(), message: e.to_string() }),
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn is_live(&self) -> bool {
        true
    }

    fn drops(&mut self) -> Option<CaptureDrops> {
        let stat = self.capture.stats().ok()?;
        Some(CaptureDrops {
            received: u64::from(stat.received),
            dropped: u64::from(stat.dropped),
            if_dropped: u64::from(stat.if_dropped),
        })
    }
}
