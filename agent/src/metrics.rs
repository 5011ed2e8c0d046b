//! Prometheus metrics of the agent, served as text on `/metrics` (`--metrics ADDR`).
//!
//! Like the collector's: a handful of numbers worth alerting on (is the capture running and
//! losing packets, are events produced, does the collector acknowledge them, is the spool
//! filling or dropping), written by hand in the text format. The server runs on its own thread
//! with its own small runtime, so a slow scraper never touches capture or export.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::export::StatsHandle;

/// The agent's counters, updated by the capture side; the exporter's are read at scrape time.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Packets read (published by the pipeline every few thousand packets).
    pub packets: Arc<AtomicU64>,
    /// RST events and flow summaries produced.
    pub events: AtomicU64,
    /// Packets libpcap or the interface dropped.
    pub capture_drops: AtomicU64,
    /// The exporter's counters, once there is one.
    pub export: OnceLock<StatsHandle>,
}

impl AgentMetrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let export = self.export.get().map(StatsHandle::stats).unwrap_or_default();
        let rows: [(&str, &str, &str, u64); 6] = [
            ("rstscope_agent_packets_total", "counter", "Packets read.", self.packets.load(Ordering::Relaxed)),
            (
                "rstscope_agent_events_total",
                "counter",
                "RST events and flow summaries produced.",
                self.events.load(Ordering::Relaxed),
            ),
            (
                "rstscope_agent_batches_acked_total",
                "counter",
                "Batches the collector acknowledged as durable.",
                export.batches_acked,
            ),
            ("rstscope_agent_spool_bytes", "gauge", "Bytes of spool segments on disk.", export.spool_bytes),
            (
                "rstscope_agent_events_dropped_total",
                "counter",
                "Events dropped because the spool was full or could not be written.",
                export.events_dropped,
            ),
            (
                "rstscope_agent_capture_drops_total",
                "counter",
                "Packets libpcap or the interface dropped.",
                self.capture_drops.load(Ordering::Relaxed),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}

/// Binds `addr` now (so a bad address fails the start) and serves `GET /metrics` from a
/// background thread for the rest of the process's life.
pub fn serve(addr: SocketAddr, metrics: Arc<AgentMetrics>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("rstscope-metrics".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(error) => return tracing::error!(%error, "The metrics listener failed."),
            };
            let handler = move || {
                let metrics = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], metrics.render()) }
            };
            let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "The metrics server stopped.");
            }
        });
    })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = AgentMetrics::default();
        metrics.packets.store(10, Ordering::Relaxed);
        metrics.events.store(3, Ordering::Relaxed);
        metrics.capture_drops.store(2, Ordering::Relaxed);
        let text = metrics.render();
        assert!(text.contains("# TYPE rstscope_agent_packets_total counter\nrstscope_agent_packets_total 10\n"));
        assert!(text.contains("rstscope_agent_events_total 3\n"));
        assert!(text.contains("rstscope_agent_batches_acked_total 0\n"));
        assert!(text.contains("# TYPE rstscope_agent_spool_bytes gauge\nrstscope_agent_spool_bytes 0\n"));
        assert!(text.contains("rstscope_agent_events_dropped_total 0\n"));
        assert!(text.contains("rstscope_agent_capture_drops_total 2\n"));
    }
}
