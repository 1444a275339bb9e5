//! The policy file as written: serde + JSON Schema types. Validation and
//! compilation into the evaluated form live in `load.rs`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer};

/// A value and the line it was written on, so validation errors found after
/// parsing can still point at the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    /// 1-based; 0 when unknown.
    pub line: u64,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<T>::deserialize(d)?;
        Ok(Located {
            value: s.value,
            line: s.referenced.line(),
        })
    }
}

// The schema of a located value is the schema of the value.
impl<T: JsonSchema> JsonSchema for Located<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
}

/// An egress-gateway policy: deny rules, then per-agent pathways.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "egress-gateway policy")]
pub struct PolicyFile {
    /// Schema version; must be 1.
    pub version: Located<u32>,
    /// Accepted client trust domains, e.g. `example.org`.
    #[schemars(length(min = 1))]
    pub trust_domains: Vec<Located<String>>,
    /// `enforce` (default) or `audit`: in audit mode denials are logged, not enforced.
    #[serde(default)]
    pub mode: ModeSpec,
    /// Deny rules, checked before any pathway; any match denies.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Agents and their pathways.
    #[serde(default)]
    pub agents: Vec<AgentSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModeSpec {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionSpec {
    Deny,
}

/// A deny rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique rule name; appears in 403 bodies, audit lines and metrics.
    pub name: Located<String>,
    /// Only `deny`.
    pub action: ActionSpec,
    /// CEL condition. A CEL error denies.
    pub when: Located<String>,
    /// `true`: record "would deny", do not enforce.
    #[serde(default)]
    pub dry_run: bool,
}

/// An agent entry: a SPIFFE ID (or pattern) and its pathways.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Unique agent name; used as a metric label.
    pub name: Located<String>,
    /// `spiffe://td/path`, or a pattern: `*` one path segment, `**` (last only) one or more.
    pub id: Located<String>,
    #[serde(default)]
    pub pathways: Vec<PathwaySpec>,
}

/// A gated data pathway: destinations, optional method/model/CEL checks,
/// optional upstream (L7) handling and limits.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathwaySpec {
    /// Unique within the agent.
    pub name: Located<String>,
    /// `host:port`; `*.` = any subdomain (not the apex), `*` = any host, port `*` = any port.
    #[schemars(length(min = 1))]
    pub destinations: Vec<Located<String>>,
    /// Allowed methods (case-insensitive). A tunnel is `CONNECT`.
    #[serde(default)]
    pub methods: Option<Vec<Located<String>>>,
    /// Allowed LLM models (L7 only): exact, or a trailing `*` as a prefix match.
    #[serde(default)]
    pub models: Option<Vec<Located<String>>>,
    /// CEL condition. A CEL error is a non-match.
    #[serde(default)]
    pub when: Option<Located<String>>,
    /// Present: the gateway terminates the request (L7) and speaks to the destination itself.
    #[serde(default)]
    pub upstream: Option<UpstreamSpec>,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Private/loopback/link-local/metadata ranges this pathway may reach.
    #[serde(default)]
    pub allow_cidrs: Vec<Located<String>>,
    /// Check the TLS ClientHello's SNI against the CONNECT host on every port, not only 443.
    #[serde(default)]
    pub require_sni: bool,
    /// Overrides of gateway.yaml `timeouts` for requests this pathway forwards.
    #[serde(default)]
    pub timeouts: PathwayTimeoutsSpec,
    /// Model Context Protocol server (L7 only): what the agent may call on it.
    #[serde(default)]
    pub mcp: Option<McpSpec>,
    /// Egress DLP and guardrails (L7 only): bodies scanned for secrets and PII, and
    /// an optional external classifier.
    #[serde(default)]
    pub inspect: Option<InspectSpec>,
}

/// What the gateway looks for in the bodies of an L7 pathway's requests and responses.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InspectSpec {
    /// Request bodies (agent to destination), decoded before matching.
    #[serde(default)]
    pub request: Option<ScanSpec>,
    /// Response bodies (destination to agent), scanned as they stream.
    #[serde(default)]
    pub response: Option<ScanSpec>,
    /// An external classifier (prompt injection, toxicity) asked about each request.
    #[serde(default)]
    pub guard: Option<GuardSpec>,
}

/// Detectors and what to do with a finding in one direction.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScanSpec {
    /// Built-in sets: `secrets`, `pii`.
    #[serde(default)]
    pub detectors: Vec<Located<String>>,
    /// Operator-defined regular expressions, reported under their `name`.
    #[serde(default)]
    pub patterns: Vec<PatternSpec>,
    /// `deny` (403), `redact` (each finding replaced by `[REDACTED:<detector>]`) or
    /// `audit` (forwarded, logged).
    pub action: Located<DlpActionSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DlpActionSpec {
    Deny,
    Redact,
    Audit,
}

/// An operator-defined detector.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatternSpec {
    /// Detector name in audit lines, metrics and 403 reasons.
    pub name: Located<String>,
    /// Rust `regex` syntax, matched against the decoded body.
    pub regex: Located<String>,
}

/// The classifier the gateway asks before forwarding a request.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardSpec {
    /// `http://host:port/path` the gateway POSTs `{source, pathway, direction,
    /// content_type, text}` to; it answers `{"action": "allow"|"deny", "reason"}`.
    pub url: Located<String>,
    /// How long to wait for the answer (default `500ms`).
    #[serde(default)]
    pub timeout: Option<Located<String>>,
    /// `deny` (default) or `allow` when the classifier times out or fails.
    #[serde(default)]
    pub on_error: Option<GuardOnErrorSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuardOnErrorSpec {
    Deny,
    Allow,
}

/// What an agent may use on an MCP server. Every JSON-RPC message is checked: a
/// `tools/call`, `resources/read` or `prompts/get` of something not listed is answered
/// by the gateway with a JSON-RPC error, and `tools/list`, `resources/list` and
/// `prompts/list` answers are filtered to what is listed. A list left out allows
/// nothing of its kind.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpSpec {
    /// Tool names: exact, or a trailing `*` as a prefix (`read_*`).
    #[serde(default)]
    pub tools: Vec<Located<String>>,
    /// Resource URIs: exact, or a trailing `*` as a prefix (`docs://*`).
    #[serde(default)]
    pub resources: Vec<Located<String>>,
    /// Prompt names: exact, or a trailing `*` as a prefix.
    #[serde(default)]
    pub prompts: Vec<Located<String>>,
}

/// Per pathway timeouts; all optional.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathwayTimeoutsSpec {
    /// Time to the upstream's response headers, e.g. `300s` for slow LLM calls
    /// (default: gateway.yaml `timeouts.response`). Past it the agent gets 504.
    #[serde(default)]
    pub response: Option<Located<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// Originate TLS to the destination. Defaults to true when `ca_file` or `spiffe_id` is set.
    #[serde(default)]
    pub tls: Option<bool>,
    /// PEM CA bundle for upstream TLS instead of the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// mTLS with the gateway's own SVID; the peer must present this SPIFFE ID.
    #[serde(default)]
    pub spiffe_id: Option<Located<String>>,
    /// Headers the gateway sets, replacing any the agent sent.
    #[serde(default)]
    pub inject_headers: BTreeMap<String, SecretRefSpec>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRefSpec {
    /// File holding the secret; re-read by the gateway, never logged.
    pub secret_file: PathBuf,
    /// Text put before the secret, e.g. `"Bearer "`.
    #[serde(default)]
    pub prefix: String,
}

/// Per agent and pathway limits; all optional.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u32>,
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,
    #[schemars(range(min = 1))]
    pub max_request_body_bytes: Option<u64>,
    /// Both directions together.
    #[schemars(range(min = 1))]
    pub bytes_per_hour: Option<u64>,
    /// From OpenAI-compatible `usage` in responses.
    #[schemars(range(min = 1))]
    pub llm_tokens_per_hour: Option<u64>,
}
