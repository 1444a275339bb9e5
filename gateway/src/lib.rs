//! egress-gateway: a SPIFFE-aware egress gateway for AI agents.
//!
//! Where things live: [`listener`] accepts mTLS connections, [`identity`] holds the SVID
//! from the Workload API, [`proxy`] decides and forwards (with the policy engine from
//! `egress-policy`), [`audit`] writes the audit log, [`server`] wires it all together.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod files;
pub mod health;
pub mod identity;
pub mod interception;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod policy_store;
pub mod policy_watch;
pub mod proxy;
pub mod request_head;
pub mod server;
pub mod sidecar;
pub mod telemetry;
pub mod upstream;
