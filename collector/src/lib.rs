//! The rstscope collector: gRPC ingest from agents, durable sled storage, correlation across
//! vantage points (verdicts), and the query service behind the `rstscope` CLI.
//!
//! Layout: `store` is the only module that knows sled; `ingest` and `query` are the gRPC
//! services (check the request, convert, call the store, convert back), `raw_reports` serves
//! `ListReports` from the stored encodings; `correlate` is the pure engine and `live` runs it
//! on ingested events, queued for it in `backlog` and run at a lower
//! priority by `low_priority`; `pb` names protobuf values in the shared vocabulary; `auth` holds the
//! token and TLS settings shared by both services; `metrics` the Prometheus counters;
//! `service` wires them into one server.

pub mod auth;
pub mod backlog;
pub mod correlate;
pub mod ingest;
pub mod live;
pub mod low_priority;
pub mod metrics;
pub mod pb;
pub mod query;
pub mod raw_reports;
pub mod service;
pub mod store;
