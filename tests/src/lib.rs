//! Shared helpers for rstscope's integration tests, capture generators and benchmarks.

pub mod gen;

pub mod build;
pub mod corpus;
pub mod frames;
pub mod lab;
pub mod machine;
pub mod multigen;
pub mod profile;
