//! Compiled pathways and the settings the gateway applies when one allows.

use std::path::PathBuf;
use std::time::Duration;

use crate::cel_env::CelExpr;
use crate::host::Destination;
use crate::inspect::Inspect;
use crate::mcp::McpRules;
use crate::spiffe_id::SpiffeId;

#[derive(Debug)]
pub struct Pathway {
    pub name: String,
    /// Name of the agent entry this pathway belongs to.
    pub agent: String,
    pub destinations: Vec<Destination>,
    /// Upper-case; `None` = any method (and, for L4 pathways, tunnels).
    pub methods: Option<Vec<String>>,
    pub models: Option<Vec<String>>,
    pub upstream: Option<Upstream>,
    pub limits: Limits,
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Tunnels check the ClientHello's SNI on any port (always on port 443).
    pub require_sni: bool,
    pub timeouts: Timeouts,
    /// `mcp:`: the JSON-RPC messages of requests on this pathway are checked one by one.
    pub mcp: Option<McpRules>,
    /// `inspect:`: DLP scanners and the guard classifier for this pathway's bodies.
    pub inspect: Option<Inspect>,
    pub(crate) when: Option<CelExpr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Originate TLS (true whenever `ca_file` or `spiffe_id` is set).
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    /// mTLS with the gateway's SVID; verify this peer ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Lower-case header name and where its value comes from.
    pub inject_headers: Vec<(String, SecretRef)>,
}

/// A pathway's own timeouts; `None` = the gateway's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Time to the upstream's response headers.
    pub response: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub secret_file: PathBuf,
    pub prefix: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_request_body_bytes: Option<u64>,
    pub bytes_per_hour: Option<u64>,
    pub llm_tokens_per_hour: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

impl Pathway {
    /// L7: the gateway terminates the request and speaks to the destination itself.
    pub fn is_l7(&self) -> bool {
        self.upstream.is_some()
    }

    /// The `when` condition as written.
    pub fn when_source(&self) -> Option<&str> {
        self.when.as_ref().map(|w| w.source())
    }

    /// Method check. A tunnel is CONNECT; an L7 pathway never carries an opaque
    /// tunnel, since the gateway could not apply its upstream settings to one (a
    /// CONNECT to its destination is intercepted instead, see `evaluate`).
    pub fn allows_method(&self, method: &str) -> bool {
        let connect = method.eq_ignore_ascii_case("CONNECT");
        if connect && self.is_l7() {
            return false;
        }
        match &self.methods {
            None => true,
            Some(ms) => ms.iter().any(|m| m.eq_ignore_ascii_case(method)),
        }
    }

    /// Model check: exact, or a trailing `*` as a prefix.
    pub fn allows_model(&self, model: Option<&str>) -> bool {
        match (&self.models, model) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ms), Some(m)) => ms.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => m.starts_with(prefix),
                None => p == m,
            }),
        }
    }
}
