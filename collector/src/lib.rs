//! The rstscope collector: gRPC ingest from agents, durable sled storage, and the query service
//! behind the `rstscope` CLI. Correlation (verdicts) comes with the correlation issue; until then
//! every RST's verdict is `pending`.
//!
//! Layout: `store` is the only module that knows sled; `ingest` and `query` are the gRPC
//! services (check the request, convert, call the store, convert back); `pb` names protobuf
//! values in the shared vocabulary; `auth` holds the token and TLS settings shared by both
//! services; `metrics` the Prometheus counters; `service` wires them into one server.

pub mod auth;
pub mod correlate;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod pb;
pub mod query;
pub mod service;
pub mod store;
