//! `rstscope-agent`: capture packets (files or a live interface), track every TCP connection and
//! report every RST with its evidence, on stdout or (with `--collector`) to the collector.

use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use rstscope_agent::capture::{CaptureDrops, FileSource, LiveConfig, LiveSource, PacketSource, Poll};
use rstscope_agent::event::Event;
use rstscope_agent::export::{self, ExportConfig, Exporter, TlsFiles};
use rstscope_agent::flow::{Tracker, TrackerConfig};
use rstscope_agent::metrics::{self, AgentMetrics};
use rstscope_agent::output::{Format, Writer};
use rstscope_agent::pipeline::{run_live, run_source, Counters, LiveTick};

/// Capture TCP traffic and report every RST with its evidence.
///
/// Reads capture files (pcap or pcapng, `-` for standard input) or a live interface, tracks
/// every TCP connection like Zeek does (conn_state, history), and prints one record per RST and
/// one per connection.
#[derive(Parser, Debug)]
#[command(name = "rstscope-agent", version, about, long_about = None)]
struct Args {
    /// Capture file to read (pcap or pcapng; `-` for stdin). Repeat for several files.
    #[arg(short = 'r', long = "read", value_name = "FILE", help_heading = "Input")]
    read: Vec<String>,

    /// Capture live from this interface (`any` for all).
    #[arg(short = 'i', long, value_name = "IF", conflicts_with = "read", help_heading = "Input")]
    interface: Option<String>,

    /// BPF filter for live capture.
    #[arg(long, default_value = "tcp", help_heading = "Input")]
    filter: String,

    /// Bytes kept per packet in live capture: enough for all headers with TCP options.
    #[arg(long, default_value_t = 192, help_heading = "Input")]
    snaplen: i32,

    /// Put the interface into promiscuous mode.
    #[arg(long, help_heading = "Input")]
    promisc: bool,

    /// Kernel capture buffer size in MiB.
    #[arg(long, default_value_t = 32, value_name = "MIB", help_heading = "Input")]
    buffer_mib: i32,

    /// Live: how long one wait for packets lasts when the interface is quiet (ms). The idle
    /// clock that lets RSTs settle and watermarks advance without traffic moves at each wait,
    /// so this bounds how late a RST is reported on a quiet link; a wait costs one wake-up.
    #[arg(long, default_value_t = 20, value_name = "MS", help_heading = "Input")]
    poll_ms: u16,

    /// Live: how often the watermark (how far RST events are complete) and libpcap's drop
    /// counters go to the collector (ms). The collector decides a RST that an agent did not
    /// see only once that agent's watermark has passed it, so this adds to such verdicts'
    /// latency; a watermark that moved costs a small batch when no event carries it.
    #[arg(long, default_value_t = 100, value_name = "MS", help_heading = "Input")]
    report_ms: u32,

    /// Stop live capture after this many seconds (default: until Ctrl-C).
    #[arg(long, value_name = "SECS", help_heading = "Input")]
    duration: Option<u64>,

    /// Output format (default: text on a terminal, json otherwise).
    #[arg(short = 'o', long, value_enum, help_heading = "Output")]
    output: Option<Format>,

    /// Also print each connection's identity as soon as it is known (`{"type":"open"}` lines in
    /// JSON: ISNs, handshake times, TCP timestamps, SYN options, TTLs), as sent to a collector.
    #[arg(long, help_heading = "Output")]
    emit_open: bool,

    /// Show a progress bar on stderr: auto (when stderr is a terminal and input is large), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"], help_heading = "Output")]
    progress: String,

    /// Count bad-checksum packets in conn_state/history, like Zeek's `-C` (always on for live
    /// capture, where checksum offload makes the host's own packets look bad).
    #[arg(short = 'C', long, help_heading = "Tracking")]
    ignore_checksums: bool,

    /// Most connections tracked at once; the oldest idle ones are evicted beyond it.
    #[arg(long, default_value_t = 1_000_000, help_heading = "Tracking")]
    max_flows: usize,

    /// Summarise a connection after this many seconds without packets.
    #[arg(long, default_value_t = 300.0, value_name = "SECS", help_heading = "Tracking")]
    inactivity_timeout: f64,

    /// Keep a closed or reset connection this many seconds for late packets.
    #[arg(long, default_value_t = 5.0, value_name = "SECS", help_heading = "Tracking")]
    linger: f64,

    /// Log level filter for diagnostics on stderr (e.g. `info`, `rstscope_agent=debug`).
    #[arg(long, env = "RSTSCOPE_LOG", default_value = "warn", help_heading = "Output")]
    log: String,

    /// Send events to this collector (`http://host:port`, or `https://` with --ca-cert). Stdout
    /// output is then off unless -o is given.
    #[arg(long, value_name = "URL", env = "RSTSCOPE_COLLECTOR", help_heading = "Export")]
    collector: Option<String>,

    /// An address of this host (repeatable), sent to the collector so it can tell which end
    /// of a connection sits here. Live captures add every address of the host's interfaces.
    #[arg(long = "local", value_name = "ADDR", help_heading = "Export")]
    local: Vec<std::net::IpAddr>,

    /// This agent's unique name (one per vantage point); needed with --collector.
    #[arg(long, value_name = "NAME", env = "RSTSCOPE_AGENT_NAME", help_heading = "Export")]
    name: Option<String>,

    /// Directory for the spool and batch numbering [default: $XDG_STATE_HOME/rstscope/agent-NAME,
    /// else ~/.local/state/rstscope/agent-NAME, else ./rstscope-agent-NAME].
    #[arg(long, value_name = "DIR", env = "RSTSCOPE_STATE_DIR", help_heading = "Export")]
    state_dir: Option<PathBuf>,

    /// Size cap of the on-disk spool; beyond it events are dropped and the count is reported.
    #[arg(long, value_name = "MIB", default_value_t = 1024, help_heading = "Export")]
    spool_max_mib: u64,

    /// Bearer token for the collector.
    #[arg(long, env = "RSTSCOPE_TOKEN", hide_env_values = true, help_heading = "Export")]
    token: Option<String>,

    /// CA certificate (PEM) the collector's certificate must chain to (https).
    #[arg(long, value_name = "FILE", help_heading = "Export")]
    ca_cert: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_key", help_heading = "Export")]
    client_cert: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_cert", help_heading = "Export")]
    client_key: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. `127.0.0.1:9465`).
    #[arg(long, value_name = "ADDR", help_heading = "Output")]
    metrics: Option<SocketAddr>,

    /// At the end of input, wait this long for the collector to acknowledge everything; then
    /// exit with status 3 (what is unacknowledged stays in the spool for the next run).
    #[arg(long, value_name = "SECS", default_value_t = 60.0, help_heading = "Export")]
    ack_timeout: f64,
}

/// Exit status when the collector did not acknowledge everything within --ack-timeout.
const EXIT_UNACKNOWLEDGED: u8 = 3;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rstscope-agent: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn secs_to_ns(secs: f64, what: &str) -> Result<i64> {
    if !(secs.is_finite() && secs >= 0.0) {
        bail!("--{what} must be a non-negative number of seconds");
    }
    Ok((secs * 1e9) as i64)
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(io::stderr)
        // Colour codes only for a person at a terminal, not in a file or the journal.
        .with_ansi(io::stderr().is_terminal())
        .init();
    if args.read.is_empty() && args.interface.is_none() {
        bail!("nothing to read: give --read FILE or --interface IF (see --help)");
    }
    if args.max_flows == 0 {
        bail!("--max-flows must be at least 1");
    }
    let config = TrackerConfig {
        inactivity_timeout_ns: secs_to_ns(args.inactivity_timeout, "inactivity-timeout")?,
        linger_ns: secs_to_ns(args.linger, "linger")?,
        max_flows: args.max_flows,
        // Live, the host's own outgoing packets are captured before the NIC fills in their
        // checksums (offload), so they would all look bad: behave like Zeek's -C there.
        ignore_checksums: args.ignore_checksums || args.interface.is_some(),
        ..TrackerConfig::default()
    };
    let ack_timeout = Duration::from_nanos(secs_to_ns(args.ack_timeout, "ack-timeout")? as u64);
    // With a collector, stdout stays quiet unless asked for.
    let format = match (args.output, &args.collector) {
        (Some(format), _) => Some(format),
        (None, Some(_)) => None,
        (None, None) => Some(if io::stdout().is_terminal() { Format::Text } else { Format::Json }),
    };
    let stdout = io::stdout().lock();
    let mut writer = format
        .map(|format| Writer::new(format, io::BufWriter::with_capacity(1 << 16, stdout)).with_opens(args.emit_open));
    let mut tracker = Tracker::new(config);
    let metrics = Arc::new(AgentMetrics::default());
    let mut counters = Counters { published_packets: metrics.packets.clone(), ..Counters::default() };
    let stop = Arc::new(AtomicBool::new(false));
    // Set once a live capture is open, so stopping can also wake a blocked libpcap read.
    let breaker: Arc<Mutex<Option<pcap::BreakLoop>>> = Arc::new(Mutex::new(None));
    let request_stop = {
        let (stop, breaker) = (stop.clone(), breaker.clone());
        move || {
            stop.store(true, Ordering::Relaxed);
            if let Some(b) = breaker.lock().ok().as_ref().and_then(|b| b.as_ref()) {
                b.breakloop();
            }
        }
    };
    {
        let request_stop = request_stop.clone();
        ctrlc::set_handler(request_stop).context("installing the Ctrl-C handler")?;
    }

    let mut live_source = None;
    if let Some(interface) = &args.interface {
        let live = LiveConfig {
            interface: interface.clone(),
            filter: args.filter.clone(),
            snaplen: args.snaplen,
            promiscuous: args.promisc,
            buffer_size: args.buffer_mib.saturating_mul(1 << 20),
            poll_timeout_ms: i32::from(args.poll_ms.max(1)),
            ..LiveConfig::default()
        };
        let source = LiveSource::open(&live).with_context(|| format!("opening interface {interface}"))?;
        live_source = Some(source);
    }
    // After the interface opened: a scraper that gets an answer knows the capture runs.
    if let Some(addr) = args.metrics {
        let local = metrics::serve(addr, metrics.clone()).with_context(|| format!("--metrics {addr}"))?;
        tracing::info!(%local, "Serving metrics on /metrics.");
    }
    let exporter = match &args.collector {
        Some(url) => Some(start_exporter(&args, url, live_source.as_ref())?),
        None => None,
    };
    if let Some(exporter) = &exporter {
        let _ = metrics.export.set(exporter.stats_handle());
    }

    let mut write_failed: Option<io::Error> = None;
    // The tracker's packet clock at the end: every packet belongs to a flow, and after
    // `finish_all` every flow has been summarised, so the latest flow end is the last packet.
    let mut last_packet_ns: Option<i64> = None;
    let mut emit = |event: Event| {
        metrics.events.fetch_add(1, Ordering::Relaxed);
        if let Event::Flow(flow) = &event {
            last_packet_ns = Some(last_packet_ns.map_or(flow.end_ns, |t| t.max(flow.end_ns)));
        }
        if let Some(exporter) = &exporter {
            exporter.push(&event);
        }
        if let (Some(writer), None) = (writer.as_mut(), &write_failed) {
            if let Err(e) = writer.event(&event) {
                write_failed = Some(e);
            }
        }
    };
    let mut report = |line: &str| eprintln!("rstscope-agent: {line}");
    let mut drops = None;
    let mut loss_reports = LossReports::new(SystemTime::now());

    if let (Some(interface), Some(mut source)) = (&args.interface, live_source.take()) {
        tracing::info!(interface = %interface, link_type = %source.link_type().name(), "Capturing live.");
        // libpcap stamps packets with the system clock: before the first packet, the capture's
        // start in packet clock is now.
        let capture_start_ns = wall_ns(SystemTime::now());
        if let Ok(mut slot) = breaker.lock() {
            *slot = Some(source.stopper());
        }
        if let Some(secs) = args.duration {
            let request_stop = request_stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(secs));
                request_stop();
            });
        }
        // Every few seconds: how far the RST events are complete, and what libpcap lost since.
        let mut on_tick = |tick: LiveTick<'_>| {
            if let Some(drops) = tick.drops {
                metrics.capture_drops.store(drops.dropped + drops.if_dropped, Ordering::Relaxed);
            }
            if let Some(exporter) = &exporter {
                if let Some(drops) = tick.drops {
                    loss_reports.report(exporter, drops, SystemTime::now());
                }
                if let Some(mark) = tick.tracker.listed_watermark(rstscope_proto::MAX_SETTLING_LISTED) {
                    exporter.listed_watermark(&mark, Some(tick.first_packet_ns.unwrap_or(capture_start_ns)));
                }
            }
        };
        let every = Duration::from_millis(u64::from(args.report_ms.max(1)));
        run_live(&mut source, &mut tracker, &mut counters, &stop, &mut emit, &mut report, every, &mut on_tick);
        drops = source.drops();
        if let Some(d) = drops {
            metrics.capture_drops.store(d.dropped + d.if_dropped, Ordering::Relaxed);
        }
    } else {
        for path in &args.read {
            let mut source = match FileSource::open(path) {
                Ok(s) => s,
                Err(e) => {
                    let line = e.to_string();
                    report(&line);
                    counters.errors.push(line);
                    continue;
                }
            };
            let bar = progress_bar(&args.progress, &source);
            run_source(&mut source, &mut tracker, &mut counters, &stop, &mut emit, &mut report, &mut |done, total| {
                if let Some(bar) = &bar {
                    if let Some(total) = total {
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                }
            });
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        }
    }
    tracker.finish_all(&mut emit);
    // As without a collector: a closed pipe while writing events ends quietly with success; a
    // closed pipe for the closing stats record is ignored; other write errors fail the run.
    let mut output_error = None;
    let mut events_pipe_closed = false;
    if let Some(mut writer) = writer {
        match write_failed {
            Some(e) if e.kind() == io::ErrorKind::BrokenPipe => events_pipe_closed = true,
            Some(e) => output_error = Some(e),
            None => {
                let mut stats = counters.to_stats(&tracker);
                stats.capture_drops = drops;
                if let Err(e) = writer.stats(&stats).and_then(|_| writer.flush()) {
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        output_error = Some(e);
                    }
                }
            }
        }
    }
    let unacked = match exporter {
        Some(exporter) => {
            let watermark = last_packet_ns.map(|ts_ns| (ts_ns, counters.first_packet_ns));
            finish_export(exporter, watermark, drops, loss_reports, ack_timeout)
        }
        None => 0,
    };
    if let Some(e) = output_error {
        return Err(e).context("writing output");
    }
    if events_pipe_closed && unacked == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let _ = io::stderr().flush();
    Ok(exit_code(&counters, unacked))
}

/// 1 when nothing at all could be read; 3 when batches are left unacknowledged; else 0.
fn exit_code(counters: &Counters, unacked: u64) -> ExitCode {
    if counters.packets == 0 && !counters.errors.is_empty() {
        ExitCode::from(1)
    } else if unacked > 0 {
        ExitCode::from(EXIT_UNACKNOWLEDGED)
    } else {
        ExitCode::SUCCESS
    }
}

fn start_exporter(args: &Args, url: &str, live: Option<&LiveSource>) -> Result<Exporter> {
    if let Some(problem) = rstscope_proto::collector_url_problem(url) {
        bail!("--collector {problem}");
    }
    let Some(name) = &args.name else {
        bail!("--collector needs --name NAME (this agent's unique name)");
    };
    export::check_agent_name(name).map_err(anyhow::Error::msg)?;
    let state_dir = args.state_dir.clone().unwrap_or_else(|| {
        let xdg = std::env::var_os("XDG_STATE_HOME");
        let home = std::env::var_os("HOME");
        export::default_state_dir(name, xdg.as_deref(), home.as_deref())
    });
    let interfaces = match (live, &args.interface) {
        (Some(source), Some(interface)) => {
            vec![rstscope_proto::v1::Interface { name: interface.clone(), link_type: source.link_type().0 }]
        }
        _ => args.read.iter().map(|path| file_interface(path)).collect(),
    };
    let mut config = ExportConfig::new(url, name.clone(), state_dir.clone());
    config.host_name = host_name();
    config.interfaces = interfaces;
    config.local_addresses = local_addresses(&args.local, live.is_some());
    config.spool_max_bytes = args.spool_max_mib.saturating_mul(1 << 20);
    config.urgent_resets = live.is_some();
    config.token = args.token.clone();
    config.tls = TlsFiles {
        ca_cert: args.ca_cert.clone(),
        client_cert: args.client_cert.clone(),
        client_key: args.client_key.clone(),
    };
    let exporter = Exporter::start(config).context("starting the export to the collector")?;
    tracing::info!(collector = %url, state_dir = %state_dir.display(), "Exporting to the collector.");
    Ok(exporter)
}

/// The host's addresses as the collector wants them: those given, and for live captures every
/// address libpcap lists on the host's interfaces (in this network namespace).
fn local_addresses(given: &[std::net::IpAddr], live: bool) -> Vec<Vec<u8>> {
    let mut addrs: Vec<std::net::IpAddr> = given.to_vec();
    if live {
        match pcap::Device::list() {
            Ok(devices) => {
                for device in devices {
                    addrs.extend(device.addresses.iter().map(|a| a.addr).filter(|ip| !ip.is_loopback()));
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot list the host's addresses; give them with --local."),
        }
    }
    addrs.sort();
    addrs.dedup();
    addrs
        .into_iter()
        .map(|ip| match ip {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        })
        .collect()
}

/// libpcap's counters (since the capture opened) turned into loss reports per period.
struct LossReports {
    reported: CaptureDrops,
    since: SystemTime,
}

impl LossReports {
    fn new(started: SystemTime) -> Self {
        LossReports { reported: CaptureDrops::default(), since: started }
    }

    /// Reports what was lost since the last report (nothing if nothing was).
    fn report(&mut self, exporter: &Exporter, now: CaptureDrops, at: SystemTime) {
        let delta = CaptureDrops {
            received: counter_delta(self.reported.received, now.received),
            dropped: counter_delta(self.reported.dropped, now.dropped),
            if_dropped: counter_delta(self.reported.if_dropped, now.if_dropped),
        };
        exporter.capture_loss(delta, wall_ns(self.since), wall_ns(at));
        (self.reported, self.since) = (now, at);
    }
}

/// Growth of one of libpcap's counters, which are 32 bits wide and wrap.
fn counter_delta(old: u64, new: u64) -> u64 {
    if new >= old {
        new - old
    } else {
        (new + (1 << 32)).saturating_sub(old)
    }
}

fn wall_ns(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Sends the final watermark (last packet time, first packet time) and capture losses, waits for the acknowledgements; returns the
/// number of batches left unacknowledged (reported on stderr).
fn finish_export(
    exporter: Exporter,
    watermark: Option<(i64, Option<i64>)>,
    drops: Option<CaptureDrops>,
    mut loss_reports: LossReports,
    ack_timeout: Duration,
) -> u64 {
    if let Some(drops) = drops {
        loss_reports.report(&exporter, drops, SystemTime::now());
    }
    if let Some((ts_ns, since_ns)) = watermark {
        exporter.watermark(ts_ns, since_ns);
    }
    exporter.end_of_capture();
    let report = exporter.finish(ack_timeout);
    let stats = report.stats;
    if stats.events_dropped > 0 {
        eprintln!(
            "rstscope-agent: {} events dropped because the spool was full (reported to the collector)",
            stats.events_dropped
        );
    }
    if report.unacked_batches > 0 {
        let why = report.last_error.as_deref().map(|e| format!(" (last attempt: {e})")).unwrap_or_default();
        eprintln!(
            "rstscope-agent: {} batches not acknowledged by the collector within {:.0} s{why}; they are safe in the spool and the next run with the same --name/--state-dir sends them",
            report.unacked_batches,
            ack_timeout.as_secs_f64()
        );
    }
    tracing::info!(events = stats.events, batches = stats.last_seq, acked = stats.acked, "Export finished.");
    report.unacked_batches
}

/// A capture file as an interface in the hello: its name and the link type of its first packet
/// (0 when it cannot be told). Only regular files are looked into: stdin, a named pipe or a
/// process substitution (`-r <(ssh host tcpdump -w -)`) cannot be read twice, and peeking
/// would eat the start of the stream.
fn file_interface(path: &str) -> rstscope_proto::v1::Interface {
    let regular_file = path != "-" && std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let link_type = if !regular_file {
        0
    } else {
        FileSource::open(path)
            .ok()
            .and_then(|mut source| match source.next_packet() {
                Ok(Poll::Packet(packet)) => Some(packet.link_type.0),
                _ => None,
            })
            .unwrap_or(0)
    };
    rstscope_proto::v1::Interface { name: path.to_string(), link_type }
}

fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

fn progress_bar(mode: &str, source: &FileSource) -> Option<ProgressBar> {
    let (_, total) = source.progress();
    let show = match mode {
        "always" => true,
        "never" => false,
        _ => io::stderr().is_terminal() && total.is_some_and(|t| t > 64 << 20),
    };
    if !show {
        return None;
    }
    let bar = ProgressBar::new(total.unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(source.name().to_string());
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpcap_counter_deltas_survive_wrapping() {
        assert_eq!(counter_delta(5, 9), 4);
        assert_eq!(counter_delta(u64::from(u32::MAX) - 1, 3), 5);
        assert_eq!(counter_delta(0, 0), 0);
    }
}
