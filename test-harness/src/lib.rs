//! Fakes, fixtures and end-to-end test helpers for egress-gateway.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod agent;
pub mod ca;
pub mod gateway;
pub mod llm_upstream;
pub mod otlp;
pub mod resolver;
pub mod sidecar;
pub mod spire;
pub mod test_resolver;
pub mod upstream;
pub mod workload_api;
