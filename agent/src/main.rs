//! `rstscope-agent`: capture packets (files or a live interface), track every TCP connection and
//! report every RST with its evidence.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use rstscope_agent::capture::{FileSource, LiveConfig, LiveSource, PacketSource};
use rstscope_agent::flow::{Tracker, TrackerConfig};
use rstscope_agent::output::{Format, Writer};
use rstscope_agent::pipeline::{run_source, Counters};

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

    /// Stop live capture after this many seconds (default: until Ctrl-C).
    #[arg(long, value_name = "SECS", help_heading = "Input")]
    duration: Option<u64>,

    /// Output format (default: text on a terminal, json otherwise).
    #[arg(short = 'o', long, value_enum, help_heading = "Output")]
    output: Option<Format>,

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
}

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
        .init();
    if args.read.is_empty() && args.interface.is_none() {
        bail!("nothing to read: give --read FILE or --interface IF (see --help)");
    }
    let config = TrackerConfig {
        inactivity_timeout_ns: secs_to_ns(args.inactivity_timeout, "inactivity-timeout")?,
        linger_ns: secs_to_ns(args.linger, "linger")?,
        max_flows: args.max_flows.max(1),
        // Live, the host's own outgoing packets are captured before the NIC fills in their
        // checksums (offload), so they would all look bad: behave like Zeek's -C there.
        ignore_checksums: args.ignore_checksums || args.interface.is_some(),
        ..TrackerConfig::default()
    };
    let format = args.output.unwrap_or(if io::stdout().is_terminal() { Format::Text } else { Format::Json });
    let stdout = io::stdout().lock();
    let mut writer = Writer::new(format, io::BufWriter::with_capacity(1 << 16, stdout));
    let mut tracker = Tracker::new(config);
    let mut counters = Counters::default();
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

    let mut write_failed: Option<io::Error> = None;
    let mut emit = |event: rstscope_agent::event::Event| {
        if write_failed.is_none() {
            if let Err(e) = writer.event(&event) {
                write_failed = Some(e);
            }
        }
    };
    let mut report = |line: &str| eprintln!("rstscope-agent: {line}");
    let mut drops = None;

    if let Some(interface) = &args.interface {
        let live = LiveConfig {
            interface: interface.clone(),
            filter: args.filter.clone(),
            snaplen: args.snaplen,
            promiscuous: args.promisc,
            buffer_size: args.buffer_mib.saturating_mul(1 << 20),
            ..LiveConfig::default()
        };
        let mut source = LiveSource::open(&live).with_context(|| format!("opening interface {interface}"))?;
        tracing::info!(interface = %interface, link_type = %source.link_type().name(), "Capturing live.");
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
        run_source(&mut source, &mut tracker, &mut counters, &stop, &mut emit, &mut report, &mut |_, _| {});
        drops = source.drops();
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
    if let Some(e) = write_failed {
        if e.kind() == io::ErrorKind::BrokenPipe {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e).context("writing output");
    }
    let mut stats = counters.to_stats(&tracker);
    stats.capture_drops = drops;
    writer
        .stats(&stats)
        .and_then(|_| writer.flush())
        .or_else(|e| if e.kind() == io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e) })
        .context("writing output")?;
    let _ = io::stderr().flush();
    // Non-zero only when nothing at all could be read.
    Ok(if counters.packets == 0 && !counters.errors.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
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
