//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Every label value comes from the policy (agent, pathway and rule names) or from a
//! small fixed set (kind, decision, direction, reason): never a raw SPIFFE ID or host,
//! so cardinality stays bounded by what the operator wrote.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::audit::AuditRecord;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: &'static str,
    pub decision: &'static str,
    pub enforced: &'static str,
    pub agent: String,
    pub pathway: String,
    pub rule: String,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathwayLabels {
    pub agent: String,
    pub pathway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `sent` (to the destination) or `received` (from it).
    pub direction: &'static str,
    pub agent: String,
    pub pathway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub agent: String,
    pub pathway: String,
    /// `input` (prompt) or `output` (completion) tokens.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Why the gateway closed an open agent connection or tunnel on its own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    /// `connection` (a keep-alive mTLS connection) or `tunnel`.
    pub kind: &'static str,
    /// `peer_certificate_expired` or `peer_no_longer_trusted`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `denied` (`on_backend_error: deny`) or `counted_locally`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub agent: String,
    pub pathway: String,
    /// `bytes_per_hour`, `llm_tokens_per_hour` or `max_concurrent`.
    pub limit: &'static str,
}

/// One limit's consumption, read when `/metrics` is scraped.
pub struct LimitReading {
    pub agent: String,
    pub pathway: String,
    pub limit: &'static str,
    pub used: u64,
    pub max: u64,
}

type LimitsReader = Box<dyn Fn() -> Vec<LimitReading> + Send + Sync>;

/// The (agent, pathway) pairs with a token budget in the policy in force.
type TokenPathwaysReader = Box<dyn Fn() -> Vec<(String, String)> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DlpLabels {
    pub agent: String,
    pub pathway: String,
    /// A built-in detector name or an operator pattern's name (bounded by the policy).
    pub detector: String,
    pub direction: &'static str,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardLabels {
    pub agent: String,
    pub pathway: String,
    /// `allow`, `deny`, `timeout` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct McpLabels {
    pub agent: String,
    pub pathway: String,
    /// The JSON-RPC method when it is one MCP defines, else `other`.
    pub method: &'static str,
    /// The `mcp.tools` entry that allowed the tool, `other` for an unlisted tool, empty
    /// for methods without one.
    pub tool: String,
    pub decision: &'static str,
}

/// Method label values: the methods MCP defines; anything else is `other`.
const MCP_METHODS: [&str; 19] = [
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
    "sampling/createMessage",
    "elicitation/create",
];

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<KindLabels, Histogram>,
    pub bytes: Family<BytesLabels, Counter>,
    pub active_tunnels: Gauge,
    pub active_connections: Gauge,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub svid_expiry: Gauge<f64, AtomicU64>,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub dry_run_matches: Family<RuleLabels, Counter>,
    pub spans_exported: Counter,
    pub spans_dropped: Counter,
    pub limit_used: Family<LimitLabels, Gauge>,
    pub limit_max: Family<LimitLabels, Gauge>,
    pub limits_backend_errors: Family<OutcomeLabels, Counter>,
    pub mcp_calls: Family<McpLabels, Counter>,
    pub dlp_findings: Family<DlpLabels, Counter>,
    pub guard_verdicts: Family<GuardLabels, Counter>,
    pub connections_closed: Family<ClosedLabels, Counter>,
    pub interception_leaf_mints: Counter,
    pub pathway_unavailable: Family<PathwayLabels, Gauge>,
    pub llm_tokens: Family<TokenLabels, Counter>,
    pub upstream_connections: Counter,
    pub global_connection_limit_refusals: Counter,
    limits_reader: std::sync::OnceLock<LimitsReader>,
    token_pathways_reader: std::sync::OnceLock<TokenPathwaysReader>,
}

/// Every `reason` of `egress_handshake_failures_total` the listener reports; each is
/// exported at 0 from start-up, so alerts never see a missing series.
pub const HANDSHAKE_FAILURE_REASONS: [&str; 14] = [
    "io",
    "timeout",
    "no_client_certificate",
    "expired",
    "not_yet_valid",
    "unknown_issuer",
    "bad_signature",
    "no_spiffe_id",
    "trust_domain_not_accepted",
    "no_trust_bundle",
    "spiffe_rejected",
    "bad_certificate",
    "peer_rejected_certificate",
    "protocol_error",
];

/// Label value for "not applicable" (no agent matched, no rule fired).
const NONE: &str = "";

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("egress");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests and tunnels by decision, agent, pathway and rule",
            requests.clone(),
        );
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 20))
        });
        registry.register_with_unit(
            "request_duration",
            "Duration of forwarded requests (kind=http) and tunnels (kind=connect)",
            Unit::Seconds,
            duration.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register_with_unit(
            "transferred",
            "Bytes moved to (sent) and from (received) destinations",
            Unit::Bytes,
            bytes.clone(),
        );
        let active_tunnels = Gauge::default();
        registry.register(
            "active_tunnels",
            "Open CONNECT tunnels",
            active_tunnels.clone(),
        );
        let active_connections = Gauge::default();
        registry.register(
            "active_connections",
            "Open mTLS connections from agents",
            active_connections.clone(),
        );
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "handshake_failures",
            "mTLS handshakes refused, by reason",
            handshake_failures.clone(),
        );
        // Alerts read these from start-up: every series exists at 0 until it moves.
        for reason in HANDSHAKE_FAILURE_REASONS {
            handshake_failures
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        let svid_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "svid_expiry_timestamp",
            "When the gateway's current X.509-SVID expires (Unix time)",
            Unit::Seconds,
            svid_expiry.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by result (success, rejected)",
            policy_reloads.clone(),
        );
        for result in ["success", "rejected"] {
            policy_reloads
                .get_or_create(&ResultLabels { result })
                .inc_by(0);
        }
        let dry_run_matches = Family::<RuleLabels, Counter>::default();
        registry.register(
            "dry_run_matches",
            "Requests a dry-run deny rule would have denied",
            dry_run_matches.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "otlp_spans_exported",
            "Spans the OTLP exporter delivered",
            spans_exported.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "otlp_spans_dropped",
            "Spans lost because the collector was down, slow or refusing",
            spans_dropped.clone(),
        );
        let limit_used = Family::<LimitLabels, Gauge>::default();
        registry.register(
            "limit_used",
            "Consumption of a pathway limit: this hour (budgets) or in flight (max_concurrent)",
            limit_used.clone(),
        );
        let limit_max = Family::<LimitLabels, Gauge>::default();
        registry.register(
            "limit_max",
            "The configured value of a pathway limit",
            limit_max.clone(),
        );
        let limits_backend_errors = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "limits_backend_errors",
            "Limit checks and charges the shared limits backend (Redis) failed, by what the gateway did instead",
            limits_backend_errors.clone(),
        );
        let interception_leaf_mints = Counter::default();
        registry.register(
            "interception_leaf_mints",
            "Leaf certificates the interception CA signed (one per host, renewed at 80 % of its life)",
            interception_leaf_mints.clone(),
        );
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "llm_tokens",
            "LLM tokens charged to llm_tokens_per_hour budgets, by direction (input, output); reported by the provider or estimated",
            llm_tokens.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Agent connections and tunnels the gateway closed because the peer's certificate expired or no longer verifies against the trust bundle",
            connections_closed.clone(),
        );
        // Every series exists from the start, so `rate()` and alerts see a 0.
        for kind in ["connection", "tunnel"] {
            for reason in ["peer_certificate_expired", "peer_no_longer_trusted"] {
                connections_closed
                    .get_or_create(&ClosedLabels { kind, reason })
                    .inc_by(0);
            }
        }
        let mcp_calls = Family::<McpLabels, Counter>::default();
        registry.register(
            "mcp_calls",
            "JSON-RPC messages agents sent on MCP pathways, by method, tool (the mcp.tools entry) and decision",
            mcp_calls.clone(),
        );
        let dlp_findings = Family::<DlpLabels, Counter>::default();
        registry.register(
            "dlp_findings",
            "What inspect found in bodies, by detector, direction (request, response) and action (deny, redact, audit)",
            dlp_findings.clone(),
        );
        let guard_verdicts = Family::<GuardLabels, Counter>::default();
        registry.register(
            "guard_verdicts",
            "Answers of inspect.guard classifiers: allow, deny, timeout or error (on_error decides the last two)",
            guard_verdicts.clone(),
        );
        let pathway_unavailable = Family::<PathwayLabels, Gauge>::default();
        registry.register(
            "pathway_unavailable",
            "1 while an L7 pathway's secret_file or ca_file cannot be read (its requests get 503), else 0",
            pathway_unavailable.clone(),
        );
        let upstream_connections = Counter::default();
        registry.register(
            "upstream_connections",
            "Upstream connections the forwarding pool dialed (tunnels dial their own); rising under steady keep-alive traffic means the pool churns",
            upstream_connections.clone(),
        );
        let global_connection_limit_refusals = Counter::default();
        registry.register(
            "global_connection_limit_refusals",
            "Connections closed before the TLS handshake because limits.max_connections were open",
            global_connection_limit_refusals.clone(),
        );
        Metrics {
            upstream_connections,
            global_connection_limit_refusals,
            mcp_calls,
            dlp_findings,
            guard_verdicts,
            connections_closed,
            interception_leaf_mints,
            pathway_unavailable,
            llm_tokens,
            token_pathways_reader: std::sync::OnceLock::new(),
            limit_used,
            limit_max,
            limits_backend_errors,
            limits_reader: std::sync::OnceLock::new(),
            registry,
            requests,
            duration,
            bytes,
            active_tunnels,
            active_connections,
            handshake_failures,
            svid_expiry,
            policy_reloads,
            dry_run_matches,
            spans_exported,
            spans_dropped,
        }
    }

    /// Counts one finished request or tunnel from its audit record. The agent and
    /// pathway label values are copied once and moved from one label set to the next
    /// (a look-up takes the set by reference).
    pub fn record(&self, r: &AuditRecord, seconds: f64) {
        let labels = RequestLabels {
            kind: r.kind,
            decision: r.decision,
            enforced: if r.enforced { "true" } else { "false" },
            agent: r.agent.clone().unwrap_or_else(|| NONE.into()),
            pathway: r.pathway.clone().unwrap_or_else(|| NONE.into()),
            rule: r.rule.clone().unwrap_or_else(|| NONE.into()),
            status_class: status_class(r.status),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&KindLabels { kind: r.kind })
            .observe(seconds);
        let mut bytes = BytesLabels {
            direction: "sent",
            agent: labels.agent,
            pathway: labels.pathway,
        };
        if r.bytes_sent > 0 {
            self.bytes.get_or_create(&bytes).inc_by(r.bytes_sent);
        }
        if r.bytes_received > 0 {
            bytes.direction = "received";
            self.bytes.get_or_create(&bytes).inc_by(r.bytes_received);
        }
        let mut tokens = TokenLabels {
            agent: bytes.agent,
            pathway: bytes.pathway,
            direction: "input",
        };
        if let (Some(input), Some(output)) = (r.llm_input_tokens, r.llm_output_tokens) {
            for (direction, n) in [("input", input), ("output", output)] {
                tokens.direction = direction;
                self.llm_tokens.get_or_create(&tokens).inc_by(n);
            }
        }
        self.count_mcp(r, tokens.agent, tokens.pathway);
        for f in &r.dlp {
            self.dlp_findings
                .get_or_create(&DlpLabels {
                    agent: r.agent.clone().unwrap_or_else(|| NONE.into()),
                    pathway: r.pathway.clone().unwrap_or_else(|| NONE.into()),
                    detector: f.detector.clone(),
                    direction: f.direction,
                    action: f.action,
                })
                .inc_by(u64::from(f.count));
        }
        if let Some(outcome) = r.guard {
            self.guard_verdicts
                .get_or_create(&GuardLabels {
                    agent: r.agent.clone().unwrap_or_else(|| NONE.into()),
                    pathway: r.pathway.clone().unwrap_or_else(|| NONE.into()),
                    outcome,
                })
                .inc();
        }
        for rule in &r.dry_run_rules {
            self.dry_run_matches
                .get_or_create(&RuleLabels { rule: rule.clone() })
                .inc();
        }
    }

    /// Counts one JSON-RPC message of an MCP pathway (lines without `mcp_method` are
    /// not MCP messages).
    pub fn record_mcp(&self, r: &AuditRecord) {
        self.count_mcp(
            r,
            r.agent.clone().unwrap_or_else(|| NONE.into()),
            r.pathway.clone().unwrap_or_else(|| NONE.into()),
        );
    }

    /// [`Metrics::record_mcp`] with the agent and pathway label values already made.
    fn count_mcp(&self, r: &AuditRecord, agent: String, pathway: String) {
        let Some(method) = &r.mcp_method else {
            return;
        };
        self.mcp_calls
            .get_or_create(&McpLabels {
                agent,
                pathway,
                method: MCP_METHODS
                    .iter()
                    .find(|m| **m == method.as_str())
                    .copied()
                    .unwrap_or("other"),
                tool: r.mcp_tool_label.clone().unwrap_or_else(|| NONE.into()),
                decision: r.decision,
            })
            .inc();
    }

    pub fn record_handshake_failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn record_policy_reload(&self, ok: bool) {
        self.policy_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "rejected" },
            })
            .inc();
    }

    /// Where limit consumption is read from at scrape time (set once, at start-up).
    pub fn set_limits_reader(&self, reader: LimitsReader) {
        let _ = self.limits_reader.set(reader);
    }

    /// Where the pathways with a token budget are read from at scrape time (set once,
    /// at start-up), so their token series exist, at 0, before the first request.
    pub fn set_token_pathways_reader(&self, reader: TokenPathwaysReader) {
        let _ = self.token_pathways_reader.set(reader);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        if let Some(read) = self.token_pathways_reader.get() {
            for (agent, pathway) in read() {
                for direction in ["input", "output"] {
                    self.llm_tokens
                        .get_or_create(&TokenLabels {
                            agent: agent.clone(),
                            pathway: pathway.clone(),
                            direction,
                        })
                        .inc_by(0);
                }
            }
        }
        if let Some(read) = self.limits_reader.get() {
            for r in read() {
                let labels = LimitLabels {
                    agent: r.agent,
                    pathway: r.pathway,
                    limit: r.limit,
                };
                self.limit_used
                    .get_or_create(&labels)
                    .set(i64::try_from(r.used).unwrap_or(i64::MAX));
                self.limit_max
                    .get_or_create(&labels)
                    .set(i64::try_from(r.max).unwrap_or(i64::MAX));
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}
