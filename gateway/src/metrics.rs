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
pub struct ReasonLabels {
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

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
    limits_reader: std::sync::OnceLock<LimitsReader>,
}

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
        Metrics {
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

    /// Counts one finished request or tunnel from its audit record.
    pub fn record(&self, r: &AuditRecord, seconds: f64) {
        let agent = r.agent.clone().unwrap_or_else(|| NONE.into());
        let pathway = r.pathway.clone().unwrap_or_else(|| NONE.into());
        self.requests
            .get_or_create(&RequestLabels {
                kind: r.kind,
                decision: r.decision,
                enforced: if r.enforced { "true" } else { "false" },
                agent: agent.clone(),
                pathway: pathway.clone(),
                rule: r.rule.clone().unwrap_or_else(|| NONE.into()),
                status_class: status_class(r.status),
            })
            .inc();
        self.duration
            .get_or_create(&KindLabels { kind: r.kind })
            .observe(seconds);
        if r.bytes_sent > 0 {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction: "sent",
                    agent: agent.clone(),
                    pathway: pathway.clone(),
                })
                .inc_by(r.bytes_sent);
        }
        if r.bytes_received > 0 {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction: "received",
                    agent,
                    pathway,
                })
                .inc_by(r.bytes_received);
        }
        for rule in &r.dry_run_rules {
            self.dry_run_matches
                .get_or_create(&RuleLabels { rule: rule.clone() })
                .inc();
        }
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

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
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
