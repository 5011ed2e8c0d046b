//! Wires the collector together: the shared state both services use, and the gRPC server with
//! its limits, authentication and TLS.
//!
//! Everything a test needs to run a real collector in-process lives here, so the binary and the
//! integration tests start exactly the same server.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rstscope_proto::v1;
use rstscope_proto::v1::ingest_server::IngestServer;
use rstscope_proto::v1::query_server::QueryServer;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tonic::service::interceptor::InterceptedService;

use crate::raw_reports::QueryRouter;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::Status;

use crate::auth::TokenCheck;
use crate::backlog::Inbox;
use crate::correlate::Config;
use crate::ingest::{IngestService, LiveAgents, LiveBatch};
use crate::live::{LiveCorrelation, RESUME_META};
use crate::metrics::{Gauges, Metrics};
use crate::query::QueryService;
use crate::store::{Store, StoreConfig, StoreError};

/// Bounds on what clients may ask of the collector.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest batch accepted, in events (told to agents in the welcome).
    pub max_batch_events: usize,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most agents connected at once.
    pub max_agents: usize,
    /// Most concurrent gRPC streams per connection.
    pub max_streams_per_connection: u32,
    /// Largest `ListResets` answer; larger ones are refused, not truncated.
    pub max_list: usize,
    /// Batches of live resets buffered for slow followers before they are told they lag.
    pub live_buffer: usize,
    /// Records buffered per follower.
    pub follow_buffer: usize,
    /// Stored events queued in memory for the correlation; beyond them the queue goes on in a
    /// file in the store's directory (see `backlog.rs`).
    pub correlation_memory_events: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_events: 5000,
            max_message_bytes: 16 << 20,
            max_agents: 1024,
            max_streams_per_connection: 128,
            max_list: 1_000_000,
            live_buffer: 4096,
            follow_buffer: 256,
            correlation_memory_events: crate::backlog::MEMORY_EVENTS,
        }
    }
}

/// The directory, in the store's, of the correlation's queue files (unnamed; see `backlog.rs`).
pub const BACKLOG_DIR: &str = "correlation-backlog";

/// State shared by the ingest and query services.
pub struct Hub {
    /// The durable store (`None` while it is reopened); see [`Hub::store`].
    store: std::sync::RwLock<Option<Store>>,
    /// Where to reopen it from.
    store_config: StoreConfig,
    /// One reopening at a time, and when the last one was tried.
    reopening: std::sync::Mutex<Option<Instant>>,
    /// Who is connected now.
    pub agents: Arc<LiveAgents>,
    /// Newly stored resets, for followers.
    pub live: broadcast::Sender<Arc<LiveBatch>>,
    /// Orders stored batches for followers (see [`LiveBatch::order`]).
    pub next_order: AtomicU64,
    /// Prometheus counters.
    pub metrics: Arc<Metrics>,
    /// When the collector started.
    pub started: Instant,
    /// Client limits.
    pub limits: Limits,
    /// Correlation of everything ingested (verdicts); take it with [`Hub::correlation`].
    correlation: std::sync::Mutex<LiveCorrelation>,
    /// Stored batches on their way to the correlation.
    pub inbox: Inbox,
    /// The ticker's wake-up (the engine's [`LiveCorrelation::wake`], reachable without its lock).
    correlation_wake: Arc<tokio::sync::Notify>,
    /// Whether a feeder started by [`Hub::feed_correlation_soon`] waits for the engine.
    feeder_waiting: std::sync::atomic::AtomicBool,
    /// Agents' hellos not yet told to the engine; see [`Hub::hello_to_correlation`].
    hellos: std::sync::Mutex<Vec<v1::AgentHello>>,
    /// Becomes true when the collector stops: long-lived streams end then, so that the
    /// server's graceful shutdown does not wait for agents to hang up.
    closing: watch::Sender<bool>,
}

impl Hub {
    /// Shared state over an open store.
    pub fn new(store: Store, limits: Limits) -> Arc<Self> {
        let (live, _) = broadcast::channel(limits.live_buffer.max(1));
        let correlation = LiveCorrelation::new(Config::default());
        let correlation_wake = correlation.wake.clone();
        let backlog_dir = store.config().dir.join(BACKLOG_DIR);
        if let Err(error) = std::fs::create_dir_all(&backlog_dir) {
            tracing::warn!(%error, dir = %backlog_dir.display(), "Cannot make the correlation queue's directory; acknowledgements will wait for the correlation when it is behind.");
        }
        let inbox = Inbox::new(correlation_wake.clone(), Some(backlog_dir), limits.correlation_memory_events)
            .with_file_bytes(crate::backlog::file_bytes_for_store(store.config().max_bytes));
        Arc::new(Hub {
            store_config: store.config().clone(),
            store: std::sync::RwLock::new(Some(store)),
            reopening: std::sync::Mutex::new(None),
            agents: Arc::default(),
            live,
            next_order: AtomicU64::new(0),
            metrics: Arc::default(),
            started: Instant::now(),
            limits,
            correlation: std::sync::Mutex::new(correlation),
            inbox,
            correlation_wake,
            feeder_waiting: std::sync::atomic::AtomicBool::new(false),
            hellos: std::sync::Mutex::default(),
            closing: watch::channel(false).0,
        })
    }

    /// The durable store. Take a clone per use rather than keeping one: after a storage
    /// failure the store is closed and reopened (see [`Hub::reopen_store_if_broken`]), which
    /// waits until every clone of the old one is gone.
    pub fn store(&self) -> Result<Store, StoreError> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::Reopening)
    }

    /// After a failed store call: if the store cannot write (sled refuses every write after an
    /// I/O error such as a full disk, also once there is room again), closes and reopens it,
    /// at most once per 5 s. Reopening recovers like a restart after `kill -9`: everything
    /// acknowledged is there. Blocking (fsync, waiting for the old store's last users): call
    /// off the async threads. Returns whether the store can write now.
    pub fn reopen_store_if_broken(&self) -> bool {
        let mut last_try = self.reopening.lock().unwrap_or_else(|p| p.into_inner());
        let writable = |store: &Option<Store>| store.as_ref().is_some_and(|s| s.flush().is_ok());
        if writable(&self.store.read().unwrap_or_else(|p| p.into_inner())) {
            return true;
        }
        if last_try.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return false;
        }
        *last_try = Some(Instant::now());
        // Reopen only once sled has room to write again, so the store keeps answering queries
        // while the disk is still full.
        let probe = self.store_config.dir.join(".space-probe");
        let room = std::fs::write(&probe, vec![0u8; 4 << 20]);
        let _ = std::fs::remove_file(&probe);
        if let Err(error) = room {
            tracing::warn!(%error, "The store cannot write and there is no room yet; not reopening it.");
            return false;
        }
        tracing::warn!("The store cannot write; closing and reopening it.");
        let old = self.store.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
        // Calls that took a clone before finish (or fail) within moments; `Store::open` waits
        // for sled's lock to be released, and is retried here for up to 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Store::open(self.store_config.clone()) {
                Ok(store) => {
                    let ok = store.flush().is_ok();
                    *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
                    tracing::info!(writable = ok, "Store reopened.");
                    return ok;
                }
                Err(error) if Instant::now() < deadline => {
                    tracing::debug!(%error, "Store not reopened yet; retrying.");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => {
                    tracing::error!(%error, "Cannot reopen the store; retrying on the next failure.");
                    return false;
                }
            }
        }
    }

    /// The correlation state, told first of the hellos since the last time and fed with every
    /// batch queued in [`Hub::inbox`] (a poisoned lock is taken over: the engine has no
    /// invariant a panicking reader could break half-way that matters more than serving on).
    pub fn correlation(&self) -> std::sync::MutexGuard<'_, LiveCorrelation> {
        let mut correlation = self.correlation.lock().unwrap_or_else(|p| p.into_inner());
        correlation
            .feed_from(&self.inbox, || std::mem::take(&mut *self.hellos.lock().unwrap_or_else(|p| p.into_inner())));
        correlation
    }

    /// Tells the correlation an agent's hello (its local addresses) without waiting for it: a
    /// decision may hold the engine for seconds during a burst, at low priority, and an agent
    /// must be welcomed meanwhile (it gives up after 10 s and reconnects). The hello is told
    /// the next time anyone takes the engine, before any batch is fed, so it still comes
    /// before the batches that agent sends after it.
    pub fn hello_to_correlation(&self, hello: &v1::AgentHello) {
        self.hellos.lock().unwrap_or_else(|p| p.into_inner()).push(hello.clone());
    }

    /// The ticker's wake-up.
    pub fn correlation_wake(&self) -> &tokio::sync::Notify {
        &self.correlation_wake
    }

    /// Feeds the queued batches to the engine on a blocking thread, as soon as a decision in
    /// progress lets go of it, instead of at the ticker's next turn (which may be a second
    /// away). Not awaited: the queue is taken when the feeder gets the engine. One feeder waits
    /// at a time; later calls meanwhile do nothing.
    pub fn feed_correlation_soon(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.feeder_waiting.swap(true, Ordering::AcqRel) {
            return;
        }
        let hub = self.clone();
        tokio::task::spawn_blocking(move || {
            /// Clears the flag also if feeding panics, so that later calls start a feeder.
            struct Done(Arc<Hub>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.feeder_waiting.store(false, Ordering::Release);
                }
            }
            let done = Done(hub);
            drop(done.0.correlation());
        });
    }

    /// Ends every ingest and follow stream (with `UNAVAILABLE`, so agents reconnect later).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Hub::close_streams`] was called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }

    /// The current gauges (reads the store's size: call off the async threads).
    pub fn gauges(&self) -> Gauges {
        Gauges {
            agents_connected: self.agents.connected() as u64,
            store_bytes: self.store().and_then(|s| s.status()).map(|s| s.bytes).unwrap_or(0),
            correlation_backlog_events: self.inbox.queued_events() as u64,
        }
    }
}

/// How clients must authenticate.
#[derive(Clone, Default)]
pub struct Security {
    /// Shared bearer token; `None`: none required.
    pub token: Option<String>,
    /// TLS (with client certificates when it names a client CA); `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
}

/// The server could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The correlation's thread could not start.
    #[error("cannot start the correlation thread: {0}")]
    Thread(std::io::Error),
}

/// Serves both services on `listener` until `shutdown` completes, then ends the open streams
/// and waits for them to close.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    security: Security,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let limits = hub.limits.clone();
    // After a restart: what was not decided yet, and the context it needs, from the store.
    {
        let hub = hub.clone();
        let replayed = tokio::task::spawn_blocking(move || {
            let store = hub.store()?;
            let Some(since) = LiveCorrelation::replay_start(&store)? else { return Ok(0) };
            hub.correlation().replay(&store, since)
        })
        .await;
        match replayed {
            Ok(Ok(n)) if n > 0 => tracing::info!(events = n, "Correlation resumed from the store."),
            Ok(Err(error)) => tracing::warn!(%error, "Cannot replay stored events into the correlation."),
            _ => {}
        }
    }
    // Decide what became decidable, a few times a second.
    let ticker = {
        let hub = hub.clone();
        let decider = crate::low_priority::LowPriority::start("correlation").map_err(ServeError::Thread)?;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(CORRELATE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let wake = hub.correlation_wake.clone();
            let closed = hub.closed();
            tokio::pin!(closed);
            // How long the last decision took: the next one waits at least a few times that,
            // so deciding on every ingested batch never takes more than a fraction of a core;
            // except while batches wait in the queue's file, when each decision follows a feed
            // of many events and catching up matters more (the thread's low priority already
            // leaves the cores to ingest first).
            let mut last_took = Duration::ZERO;
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = wake.notified() => {
                        // Batches of several agents often come together: decide once for them.
                        let gap = if hub.inbox.behind() {
                            CORRELATE_MIN_GAP
                        } else {
                            CORRELATE_MIN_GAP.max(last_took * CORRELATE_DUTY).min(CORRELATE_MAX_GAP)
                        };
                        tokio::select! {
                            () = tokio::time::sleep(gap) => {}
                            () = &mut closed => return,
                        }
                    }
                    () = &mut closed => return,
                }
                let worker = hub.clone();
                let done = decider
                    .run(move || {
                        let (reports, resume, took) = {
                            // Feeding the queued batches is ingest's work, not deciding's: only
                            // the decision counts towards the duty cycle.
                            let mut correlation = worker.correlation();
                            let started = Instant::now();
                            let reports = correlation.tick();
                            // Never past an event still queued (a restart replays from the store
                            // what the queue held), nor at all once queued batches were lost.
                            let resume = if worker.inbox.lost_any() {
                                None
                            } else {
                                correlation.resume_point_before(worker.inbox.oldest_ns())
                            };
                            (reports, resume, started.elapsed())
                        };
                        if worker.inbox.queued_events() > 0 {
                            // A backlog is fed in steps: decide again soon rather than at the next period.
                            worker.correlation_wake().notify_one();
                        }
                        if !reports.is_empty() {
                            let put = worker.store().and_then(|s| {
                                s.put_decided(reports.iter().map(|r| (&*r.report, r.stored_at.as_slice())))
                            });
                            if let Err(error) = put {
                                // Retried with the next tick (the resume point stays where it was).
                                worker.correlation().not_stored(reports);
                                return Err(error);
                            }
                        }
                        if let Some(resume) = resume {
                            // Written after the reports: sled keeps a prefix of its log, so a
                            // durable resume point implies the reports before it are durable too.
                            worker.store()?.set_meta(RESUME_META, &resume.to_be_bytes())?;
                        }
                        Ok::<(usize, Duration), StoreError>((reports.len(), took))
                    })
                    .await;
                match done {
                    Some(Ok((n, took))) => {
                        last_took = took;
                        if n > 0 {
                            tracing::debug!(n, "Resets decided.");
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "Cannot store decided resets; will retry.");
                        if error.needs_reopen() {
                            let hub = hub.clone();
                            let _ = tokio::task::spawn_blocking(move || hub.reopen_store_if_broken()).await;
                        }
                    }
                    None => tracing::error!("A correlation decision panicked; deciding again at the next tick."),
                }
            }
        })
    };
    let token = TokenCheck::new(security.token.as_deref());
    let ingest = IngestServer::new(IngestService::new(hub.clone()))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let query = QueryServer::new(QueryService::new(hub.clone()))
        .max_decoding_message_size(1 << 20)
        .max_encoding_message_size(limits.max_message_bytes);
    let mut builder = Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true);
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(InterceptedService::new(ingest, token.clone()))
        .add_service(QueryRouter::new(query, QueryService::new(hub.clone()), token, limits.max_message_bytes))
        // tonic ignores `tcp_nodelay` for a listener of our own: without it, Nagle's algorithm
        // holds a small answer (an ack, a short ListResets) until the client's delayed ACK, 40 ms.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
            shutdown.await;
            hub.close_streams();
        })
        .await?;
    ticker.abort();
    Ok(())
}

/// How often the live correlation decides when no ingested batch wakes it.
const CORRELATE_EVERY: Duration = Duration::from_millis(250);

/// After an ingested batch wakes the correlation, it waits this long (batches of other agents
/// sent at the same moment join the decision)...
const CORRELATE_MIN_GAP: Duration = Duration::from_millis(5);
/// ...or this many times what the last decision took, whichever is longer...
const CORRELATE_DUTY: u32 = 3;
/// ...but never longer than this: under sustained load decisions take long, and waiting a
/// multiple of that would let the correlation fall behind without end.
const CORRELATE_MAX_GAP: Duration = Duration::from_secs(1);

impl From<StoreError> for Status {
    /// Store failures as gRPC codes: the agent retries `UNAVAILABLE` and `RESOURCE_EXHAUSTED`
    /// with backoff; nothing was acknowledged in any case.
    fn from(error: StoreError) -> Self {
        let message = error.to_string();
        match error {
            StoreError::Sled(_) | StoreError::Io(_) | StoreError::Locked(_) | StoreError::Reopening => {
                Status::unavailable(message)
            }
            StoreError::DiskFull(_) => Status::resource_exhausted(message),
            StoreError::Corrupt(_) => Status::data_loss(message),
            StoreError::Invalid(_) => Status::invalid_argument(message),
        }
    }
}
