//! The egress-gateway policy: model, strict loading, CEL compiled once,
//! evaluation to a typed [`Decision`], explanations and policy tests.
//!
//! Pure and synchronous: no I/O besides [`Policy::load_file`] and the test-file
//! helpers, no TLS types, no async.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod cel_check;
mod cel_env;
mod decision;
pub mod dlp;
mod error;
mod evaluate;
mod explain;
mod headers;
mod host;
mod id_pattern;
mod index;
pub mod inspect;
mod lint;
mod llm_model;
mod load;
pub mod mcp;
pub mod model;
mod pathway;
mod percent;
mod policy;
mod request;
pub mod schema;
mod spiffe_id;
pub mod suggest;
pub mod testing;

pub use cel_env::CelCompileError;
pub use decision::{Decision, Mode, Reason};
pub use error::PolicyError;
pub use evaluate::PathwayOutcome;
pub use explain::{Explanation, PathwayStep, RuleStep};
pub use headers::HeaderView;
pub use host::{normalize_host, Destination, DestinationError, HostPattern};
pub use id_pattern::{IdPattern, IdPatternError};
pub use llm_model::{model_from_path, DEFAULT_MODEL_BODY_LIMIT};
pub use mcp::{McpCall, McpDenial, McpRules};
pub use pathway::{Limits, Pathway, SecretRef, Timeouts, Upstream};
pub use percent::percent_decode;
pub use policy::{AgentInfo, Policy, RuleInfo};
pub use request::{Request, RequestKind, RequestLine, RequestLineError};
pub use spiffe_id::{SpiffeId, SpiffeIdError};

#[cfg(test)]
mod tests;
