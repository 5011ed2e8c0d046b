//! The network shell: one `Ingest.Stream` session at a time, reconnecting with backoff.
//!
//! A session: `hello` -> `Welcome{durable_seq}` (the spool forgets what is durable) -> every
//! spooled batch after it, in order, then new ones as the spooler writes them, at most
//! `max_in_flight` unacknowledged -> `Ack{seq}` moves the spool's acknowledged pointer. Any
//! failure ends the session; the next one starts again from the collector's `durable_seq`,
//! which is why resending needs no bookkeeping here.

use std::sync::Arc;
use std::time::Duration;

use rstscope_proto::v1;
use rstscope_proto::v1::ingest_client::IngestClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::backoff::Backoff;
use super::spool::SpoolError;
use super::{lock, ExportConfig, ExportError, Mode, Shared};

/// Longest wait for the TCP/TLS connection and for the collector's `Welcome`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for the collector to end the stream after the agent ended its side.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything needed to open a session, checked once at start-up.
pub(super) struct Connection {
    endpoint: Endpoint,
    authorization: Option<MetadataValue<Ascii>>,
    hello: v1::AgentHello,
    max_in_flight: u64,
}

impl Connection {
    pub(super) fn new(config: &ExportConfig) -> Result<Connection, ExportError> {
        let url = config.collector.as_str();
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| ExportError::Config(format!("--collector {url}: {e}")))?
            .connect_timeout(HANDSHAKE_TIMEOUT)
            .tcp_nodelay(true)
            // A collector that vanished without closing the connection is noticed in ~40 s.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let tls = &config.tls;
        if url.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://")) {
            let Some(ca_path) = &tls.ca_cert else {
                return Err(ExportError::Config(format!("--collector {url}: https needs --ca-cert")));
            };
            let read = |path: &std::path::PathBuf| {
                std::fs::read(path).map_err(|source| ExportError::TlsFile { path: path.clone(), source })
            };
            let mut tls_config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_path)?));
            match (&tls.client_cert, &tls.client_key) {
                (Some(cert), Some(key)) => {
                    tls_config = tls_config.identity(Identity::from_pem(read(cert)?, read(key)?))
                }
                (None, None) => {}
                _ => return Err(ExportError::Config("--client-cert and --client-key go together".into())),
            }
            endpoint = endpoint.tls_config(tls_config).map_err(|e| ExportError::Config(format!("TLS: {e}")))?;
        } else if tls.ca_cert.is_some() || tls.client_cert.is_some() || tls.client_key.is_some() {
            return Err(ExportError::Config(format!("--collector {url}: TLS options need an https:// address")));
        }
        let authorization = match &config.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ExportError::Config("--token must be printable ASCII".into()))?,
            ),
            None => None,
        };
        let hello = v1::AgentHello {
            agent_name: config.agent_name.clone(),
            host_name: config.host_name.clone(),
            local_addresses: config.local_addresses.clone(),
            interfaces: config.interfaces.clone(),
            software_version: config.software_version.clone(),
            boot_id: String::new(),
        };
        Ok(Connection { endpoint, authorization, hello, max_in_flight: config.max_in_flight.max(1) })
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {}", chain(.0))]
    Connect(#[source] tonic::transport::Error),
    #[error("{}", status_text(.0))]
    Status(#[source] tonic::Status),
    #[error("{0}")]
    Protocol(&'static str),
    #[error("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// What the collector's refusal means for the user, naming the setting to check.
fn status_text(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unauthenticated => {
            format!("the collector refused the token (--token / RSTSCOPE_TOKEN): {}", status.message())
        }
        tonic::Code::PermissionDenied => {
            format!("the collector refused access (TLS client certificate?): {}", status.message())
        }
        code => format!("the collector said {code}: {}", status.message()),
    }
}

/// An error and its sources on one line: transport errors say little at the top level. A
/// source whose text the line already holds (some errors print their source themselves) is
/// not repeated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

fn all_acked(shared: &Shared) -> bool {
    let writer = lock(&shared.writer);
    writer.spool.acked() >= writer.spool.last_seq()
}

/// Runs sessions until finished (everything acknowledged after `Mode::Finishing`) or aborted.
pub(super) async fn run(shared: Arc<Shared>, connection: Connection, mut mode: watch::Receiver<Mode>) {
    let mut backoff = Backoff::standard();
    loop {
        let current = *mode.borrow();
        if current == Mode::Abort || (current == Mode::Finishing && all_acked(&shared)) {
            return;
        }
        let session = tokio::select! {
            result = session(&shared, &connection, mode.clone(), &mut backoff) => result,
            _ = wait_for(&mut mode, Mode::Abort) => return,
        };
        match session {
            Ok(()) => return,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, delay_ms = delay.as_millis() as u64, "Push failed; retrying.");
                *lock(&shared.last_error) = Some(error.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_for(&mut mode, Mode::Abort) => return,
                }
            }
        }
    }
}

/// Resolves once the mode is `wanted` (or nobody can change it any more).
async fn wait_for(mode: &mut watch::Receiver<Mode>, wanted: Mode) {
    let _ = mode.wait_for(|m| *m == wanted).await;
}

async fn session(
    shared: &Shared,
    connection: &Connection,
    mut mode: watch::Receiver<Mode>,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let channel = connection.endpoint.connect().await.map_err(SessionError::Connect)?;
    let authorization = connection.authorization.clone();
    let mut client = IngestClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        if let Some(value) = &authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    });
    let boot_id = lock(&shared.writer).spool.boot_id().to_string();
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(8);
    let hello = v1::AgentHello { boot_id: boot_id.clone(), ..connection.hello.clone() };
    tx.send(v1::AgentMessage { kind: Some(v1::agent_message::Kind::Hello(hello)) })
        .await
        .map_err(|_| SessionError::Protocol("the request stream closed before hello"))?;
    let response = tokio::time::timeout(HANDSHAKE_TIMEOUT, client.stream(ReceiverStream::new(rx)))
        .await
        .map_err(|_| SessionError::Timeout)?
        .map_err(SessionError::Status)?;
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, inbound.message())
        .await
        .map_err(|_| SessionError::Timeout)?
        .map_err(SessionError::Status)?;
    let welcome = match first.and_then(|m| m.kind) {
        Some(v1::collector_message::Kind::Welcome(welcome)) => welcome,
        Some(_) => return Err(SessionError::Protocol("the collector's first message was not a welcome")),
        None => return Err(SessionError::Protocol("the collector closed the stream before its welcome")),
    };
    backoff.reset();
    *lock(&shared.last_error) = None;
    tracing::info!(durable_seq = welcome.durable_seq, %boot_id, "Connected to the collector.");
    {
        let mut writer = lock(&shared.writer);
        let last = writer.spool.last_seq();
        if welcome.durable_seq > last {
            // The collector holds batches of this boot id that this spool never wrote (a copied
            // or restored state directory). Reusing those numbers would have new batches
            // dropped as duplicates, so number afresh under a new boot id.
            shared.ack(&mut writer, last)?;
            writer.spool.restart_numbering()?;
            tracing::warn!(
                durable_seq = welcome.durable_seq,
                last_seq = last,
                "The collector knows more batches than this spool wrote; starting a new boot id."
            );
            return Err(SessionError::Protocol("restarted numbering under a new boot id"));
        }
        if welcome.durable_seq < writer.spool.acked() {
            tracing::warn!(
                durable_seq = welcome.durable_seq,
                acked = writer.spool.acked(),
                "The collector lost acknowledged batches; they are no longer in the spool."
            );
        }
        shared.ack(&mut writer, welcome.durable_seq)?;
    }
    if welcome.max_batch_events > 0 {
        let limit = shared.max_batch_events.min(welcome.max_batch_events as usize);
        lock(&shared.buffer).batcher.set_max_events(limit);
    }

    let mut next = lock(&shared.writer).spool.acked() + 1;
    loop {
        let (last, acked) = {
            let writer = lock(&shared.writer);
            (writer.spool.last_seq(), writer.spool.acked())
        };
        if *mode.borrow() == Mode::Finishing && acked >= last {
            // Close our side and give the collector a moment to close its own, so the session
            // ends cleanly instead of as a reset stream in the collector's log.
            drop(tx);
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, async { while let Ok(Some(_)) = inbound.message().await {} }).await;
            return Ok(());
        }
        next = next.max(acked + 1);
        let can_send = next <= last && next - acked - 1 < connection.max_in_flight;
        tokio::select! {
            permit = tx.reserve(), if can_send => {
                let permit = permit.map_err(|_| SessionError::Protocol("the request stream closed"))?;
                let (batch, spooled_seq) = {
                    let writer = lock(&shared.writer);
                    (writer.spool.read(next)?, writer.spool.last_seq())
                };
                if let Some(mut batch) = batch {
                    batch.spooled_seq = spooled_seq.max(batch.seq);
                    tracing::trace!(seq = batch.seq, events = batch.events.len(), "Sending a batch.");
                    permit.send(v1::AgentMessage { kind: Some(v1::agent_message::Kind::Batch(batch)) });
                }
                next += 1;
            }
            message = inbound.message() => match message.map_err(SessionError::Status)?.map(|m| m.kind) {
                Some(Some(v1::collector_message::Kind::Ack(ack))) => {
                    let mut writer = lock(&shared.writer);
                    shared.ack(&mut writer, ack.seq)?;
                }
                Some(Some(v1::collector_message::Kind::Welcome(_))) => {
                    return Err(SessionError::Protocol("the collector sent a second welcome"));
                }
                // A message kind this version does not know: newer collectors may send more.
                Some(None) => {}
                None => return Err(SessionError::Protocol("the collector closed the stream")),
            },
            _ = shared.spooled.notified() => {}
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Mode::Abort {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error: {0}")]
    struct Says(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Terse(#[source] std::io::Error);

    #[test]
    fn an_error_line_names_each_cause_once() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(chain(&Terse(refused())), "transport error: Connection refused");
        assert_eq!(chain(&Says(refused())), "tcp connect error: Connection refused");
    }
}
