//! Shared helpers for rstscope's integration tests, capture generators and benchmarks.
