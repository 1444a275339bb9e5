//! Subcommands of the `egress-gateway` binary.

pub mod policy;
