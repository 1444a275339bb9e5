//! egress-gateway: a SPIFFE-aware egress gateway for AI agents.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cli;
