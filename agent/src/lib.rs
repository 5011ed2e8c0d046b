//! The rstscope agent: packets in, connection state and RST evidence out.
//!
//! Data flow: a [`capture::PacketSource`] yields raw frames; [`wire::parse`] turns each into a
//! small owned [`wire::Segment`]; the [`flow::Tracker`] keeps per-connection state and, for every
//! RST, builds an [`event::RstEvent`] with its local evidence; [`event::FlowSummary`] records come
//! out when connections end. Everything after `capture` is pure: no I/O and no clock, time is
//! the packet's timestamp. [`pipeline`] and [`output`] are the I/O shell; [`export`] ships events to
//! the collector (protobuf conversions in [`pb`]).

pub mod capture;
pub mod event;
pub mod export;
pub mod flow;
pub mod metrics;
pub mod output;
pub mod pb;
pub mod pipeline;
pub mod trace;
pub mod wire;
