//! The rstscope collector: gRPC ingest from agents, sled storage, correlation and the query CLI.
//!
//! Not built yet: this crate is the home of the collector issue (ingest, store, query) and of the
//! correlation issue (verdicts). It exists now so that the workspace has its final shape and the
//! shared identity types in `rstscope-proto` are already used from both sides.

pub use rstscope_proto::FlowKey;
