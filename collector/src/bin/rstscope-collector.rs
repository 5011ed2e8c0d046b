//! `rstscope-collector`: receives RST events from agents over gRPC, stores them durably, and
//! answers the `rstscope` CLI.
//!
//! The I/O shell around `rstscope_collector::service`: flags into a configuration, the store
//! opened, the gRPC server, the optional metrics endpoint and the retention timer started, and
//! everything stopped in order on Ctrl-C or SIGTERM (the store flushed last).

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use rstscope_collector::auth::{self, TlsFiles};
use rstscope_collector::ingest::now_ns;
use rstscope_collector::service::{self, Hub, Limits, Security};
use rstscope_collector::store::{Store, StoreConfig, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Receives RST events from rstscope agents, stores them, and answers `rstscope` queries.
#[derive(Parser, Debug)]
#[command(name = "rstscope-collector", version, about, max_term_width = 100)]
struct Args {
    /// gRPC address to listen on (agents and the CLI).
    #[arg(long, env = "RSTSCOPE_LISTEN", default_value = "127.0.0.1:50051", value_name = "ADDR")]
    listen: SocketAddr,

    /// Directory of the database (created if missing).
    #[arg(long, env = "RSTSCOPE_DATA_DIR", default_value = "./rstscope-data", value_name = "DIR")]
    data_dir: PathBuf,

    /// Keep events this long, e.g. 7d, 36h: event time counted back from the newest stored event (or now, if earlier), so replayed old captures are kept.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration, help_heading = "Storage")]
    retention: Duration,

    /// Remove the oldest events when the database grows past this many GiB.
    #[arg(long, default_value_t = 20.0, value_name = "GIB", help_heading = "Storage")]
    max_store_gib: f64,

    /// sled's page cache. sled counts it in on-disk bytes; the memory it takes is two to three
    /// times that, so the collector's resident size is roughly 3x this plus a few hundred MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB", help_heading = "Storage")]
    cache_mib: u64,

    /// How often to apply --retention and --max-store-gib.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration, help_heading = "Storage")]
    retention_interval: Duration,

    /// Shared token clients must present as `authorization: Bearer TOKEN`.
    #[arg(long, env = "RSTSCOPE_TOKEN", hide_env_values = true, help_heading = "Security")]
    token: Option<String>,

    /// PEM certificate chain: serve TLS (needs --tls-key).
    #[arg(long, requires = "tls_key", value_name = "FILE", help_heading = "Security")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "FILE", help_heading = "Security")]
    tls_key: Option<PathBuf>,

    /// PEM CA: require client certificates signed by it (mutual TLS; needs --tls-cert).
    #[arg(long, requires = "tls_cert", value_name = "FILE", help_heading = "Security")]
    client_ca: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", help_heading = "Operations")]
    metrics: Option<SocketAddr>,

    /// Largest batch accepted from an agent, in events.
    #[arg(long, default_value_t = 5000, help_heading = "Limits")]
    max_batch_events: usize,

    /// Largest gRPC message accepted, in MiB.
    #[arg(long, default_value_t = 16, value_name = "MIB", help_heading = "Limits")]
    max_message_mib: usize,

    /// Most agents connected at once.
    #[arg(long, default_value_t = 1024, help_heading = "Limits")]
    max_agents: usize,

    /// Stored events queued in memory for the correlation (about 500 bytes each). Beyond them
    /// the queue goes on in unnamed files in the data directory (up to 4 GiB), so ingest does
    /// not wait for the correlation; verdicts come late meanwhile (`rstscope status` shows the
    /// backlog).
    #[arg(long, default_value_t = rstscope_collector::backlog::MEMORY_EVENTS, help_heading = "Limits")]
    correlation_memory_events: usize,
}

fn store_config(args: &Args) -> Result<StoreConfig> {
    if !(args.max_store_gib.is_finite() && args.max_store_gib > 0.0) {
        bail!("--max-store-gib must be a positive number");
    }
    let mut config = StoreConfig::new(&args.data_dir);
    config.retention = args.retention;
    config.max_bytes = (args.max_store_gib * f64::from(1u32 << 30)) as u64;
    config.cache_bytes = args.cache_mib.max(16) << 20;
    Ok(config)
}

fn security(args: &Args) -> Result<Security> {
    if let Some(token) = &args.token {
        auth::check_token(token).context("--token / RSTSCOPE_TOKEN")?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(auth::server_tls(&TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        })?),
        _ => None,
    };
    if args.token.is_none() && tls.is_none() && !args.listen.ip().is_loopback() {
        warn!(listen = %args.listen, "Listening beyond loopback with neither --token nor TLS: anyone who reaches this port can write and read events.");
    }
    Ok(Security { token: args.token.clone(), tls })
}

/// Resolves on the first Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                warn!(%error, "Cannot watch SIGTERM; only Ctrl-C stops the collector.");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn enforce_retention(hub: Arc<Hub>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        // A clone per run: the hub reopens the store after a storage failure once no clone of
        // the old one is left.
        let hub = hub.clone();
        match tokio::task::spawn_blocking(move || hub.store()?.enforce_retention(now_ns())).await {
            Ok(Ok(report)) if report.resets_removed + report.flows_removed > 0 => {
                info!(?report, "Old events removed.");
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => error!(%error, "Retention failed; will retry."),
            Err(error) => error!(%error, "The retention task failed."),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,h2=warn,hyper=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let config = store_config(&args)?;
    let security = security(&args)?;
    let limits = Limits {
        max_batch_events: args.max_batch_events.max(1),
        max_message_bytes: args.max_message_mib.max(1) << 20,
        max_agents: args.max_agents.max(1),
        correlation_memory_events: args.correlation_memory_events,
        ..Limits::default()
    };
    let data_dir = config.dir.clone();
    let store = match tokio::task::spawn_blocking(move || Store::open(config)).await? {
        Ok(store) => store,
        // The message names the directory and what holds it.
        Err(error @ StoreError::Locked(_)) => bail!("{error}; stop it or give another --data-dir"),
        Err(error) => return Err(error).with_context(|| format!("cannot open the store in {}", data_dir.display())),
    };
    let hub = Hub::new(store, limits);
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(enforce_retention(hub.clone(), args.retention_interval.max(Duration::from_secs(1)), stop_rx.clone()));
    if let Some(addr) = args.metrics {
        let metrics_listener =
            TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let gauge_hub = hub.clone();
        let metrics = hub.metrics.clone();
        let shutdown = stopped(stop_rx.clone());
        tasks.spawn(async move {
            if let Err(error) = rstscope_collector::metrics::serve(
                metrics_listener,
                metrics,
                Arc::new(move || gauge_hub.gauges()),
                shutdown,
            )
            .await
            {
                error!(%error, "The metrics endpoint failed.");
            }
        });
        info!(%addr, "Serving metrics on /metrics.");
    }

    info!(listen = %args.listen, data_dir = %args.data_dir.display(), tls = security.tls.is_some(), token = security.token.is_some(), "Collector listening.");
    let served = service::serve(hub.clone(), listener, security, async {
        stop_signal().await;
        info!("Stopping: no new streams; waiting for open ones to end.");
    })
    .await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let flushed = tokio::task::spawn_blocking(move || hub.store()?.flush()).await?;
    served?;
    flushed.context("cannot flush the store")?;
    info!("Collector stopped.");
    Ok(())
}
