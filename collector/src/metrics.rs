//! Prometheus counters of the collector, served as text on `/metrics`.
//!
//! A handful of atomics rather than a metrics framework: the collector has five numbers worth
//! alerting on (is data coming in, is it being refused, are the agents there, is the disk
//! filling), and the text format is simple enough to write by hand and test exactly.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;

/// Counters updated by the ingest service.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events stored (duplicates and refused batches not counted).
    pub events_in: AtomicU64,
    /// Batches stored.
    pub batches: AtomicU64,
    /// Batches refused: invalid, out of order, or failed to store.
    pub batches_rejected: AtomicU64,
}

/// The gauges read at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    /// Agents with an open ingest stream.
    pub agents_connected: u64,
    /// Bytes the store occupies on disk.
    pub store_bytes: u64,
    /// Stored events the correlation has not taken yet (see `backlog.rs`).
    pub correlation_backlog_events: u64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of the counters and gauges.
    pub fn render(&self, gauges: Gauges) -> String {
        let rows: [(&str, &str, &str, u64); 6] = [
            (
                "rstscope_collector_events_in_total",
                "counter",
                "Events stored from agents.",
                self.events_in.load(Ordering::Relaxed),
            ),
            ("rstscope_collector_batches_total", "counter", "Batches stored.", self.batches.load(Ordering::Relaxed)),
            (
                "rstscope_collector_batches_rejected_total",
                "counter",
                "Batches refused (invalid, out of order, or not stored).",
                self.batches_rejected.load(Ordering::Relaxed),
            ),
            (
                "rstscope_collector_agents_connected",
                "gauge",
                "Agents with an open ingest stream.",
                gauges.agents_connected,
            ),
            ("rstscope_collector_store_bytes", "gauge", "Bytes the store occupies on disk.", gauges.store_bytes),
            (
                "rstscope_collector_correlation_backlog_events",
                "gauge",
                "Stored events queued for the correlation (verdicts lag behind ingest while it is high).",
                gauges.correlation_backlog_events,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; `gauges` is called per scrape
/// (it may block briefly: it runs on a blocking thread).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handler = move || {
        let (metrics, gauges) = (metrics.clone(), gauges.clone());
        async move {
            let values = tokio::task::spawn_blocking(move || gauges()).await.unwrap_or_default();
            ([("content-type", "text/plain; version=0.0.4")], metrics.render(values))
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        Metrics::bump(&metrics.events_in, 3);
        Metrics::bump(&metrics.batches, 1);
        let text = metrics.render(Gauges { agents_connected: 2, store_bytes: 4096, correlation_backlog_events: 7 });
        assert!(
            text.contains("# TYPE rstscope_collector_events_in_total counter\nrstscope_collector_events_in_total 3\n")
        );
        assert!(text.contains("rstscope_collector_batches_total 1\n"));
        assert!(text.contains("rstscope_collector_batches_rejected_total 0\n"));
        assert!(
            text.contains("# TYPE rstscope_collector_agents_connected gauge\nrstscope_collector_agents_connected 2\n")
        );
        assert!(text.contains("rstscope_collector_store_bytes 4096\n"));
        assert!(text.contains("# TYPE rstscope_collector_correlation_backlog_events gauge\nrstscope_collector_correlation_backlog_events 7\n"));
    }
}
