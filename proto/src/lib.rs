//! Types every rstscope component agrees on.
//!
//! The agent produces them, the collector stores and correlates them, and the CLI prints them.
//! This crate is where the versioned protobuf protocol (`rstscope/v1/*.proto`) will be generated;
//! the identity types live here already so that the agent's output and the collector's storage
//! keys are the same thing from day one.

mod flow_key;

pub use flow_key::{Endpoint, FlowKey};
