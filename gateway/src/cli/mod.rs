//! Subcommands of the `egress-gateway` binary.

pub mod policy;
pub mod run;
pub mod sidecar;
pub mod suggest;
