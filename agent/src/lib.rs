//! The rstscope agent: packets in, connection state and RST evidence out.
//!
//! Data flow: a [`capture::PacketSource`] yields raw frames; [`wire::parse`] turns each into a
//! small owned [`wire::Segment`]; the flow tracker keeps per-connection state and, for every RST,
//! builds an event with its local evidence; flow summaries come out when connections end.
//! Everything after `capture` is pure: no I/O and no clock, time is the packet's timestamp.

pub mod capture;
pub mod wire;
