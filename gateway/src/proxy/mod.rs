//! The proxy: one authenticated agent's HTTP requests, decided and then tunnelled
//! (`CONNECT`) or forwarded (absolute-form `http://`).

pub mod address_guard;
pub mod client_hello;
pub(crate) mod copy;
pub mod dial;
mod dlp;
mod encoding;
mod exchange;
mod forward;
mod guard;
mod guarded;
mod intercept;
mod llm;
mod mcp;
mod metered;
pub mod peer_lifetime;
mod refusal;
pub mod registry;
mod request_body;
pub mod target;
mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use egress_policy::{Decision, RequestKind, SpiffeId};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::policy_store::PolicyStore;
use crate::telemetry::Telemetry;

pub use dial::{DialError, Dialer, Resolve, SystemResolver};
pub use exchange::ByteCounts;
use exchange::Exchange;
pub use refusal::Refusal;
use target::Target;

/// Per-direction buffer of a tunnel's relay while bytes move (an idle direction holds
/// none, see copy.rs). 64 KiB reads become four TLS records written in one `writev`:
/// on a bulk download that is about 1.4x the throughput of 16 KiB buffers at 0.7x the
/// CPU per byte (bench/compare.sh, ONLY=bulk).
pub(crate) const RELAY_BUFFER_BYTES: usize = 64 * 1024;

/// The body type of every response the proxy produces.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Who is on the other end of an mTLS connection, taken from its verified SVID.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub spiffe_id: SpiffeId,
    pub address: SocketAddr,
}

pub struct Proxy {
    policy: PolicyStore,
    audit: AuditLog,
    telemetry: Arc<Telemetry>,
    dialer: Dialer,
    forwarder: forward::Forwarder,
    tunnel_idle: Duration,
    tunnels: TaskTracker,
    stop_tunnels: CancellationToken,
    registry: Arc<registry::Registry>,
    client_hello_timeout: Duration,
    /// Time to an upstream's response headers, unless the pathway sets its own.
    response_timeout: Duration,
    global_allow: Vec<ipnet::IpNet>,
    /// L7 pathways: limits, injected credentials, upstream TLS.
    limits: Arc<crate::limits::Limits>,
    secrets: crate::upstream::Secrets,
    upstream_tls: crate::upstream::UpstreamTls,
    /// Signs the leaves for intercepted tunnels; `None`: tunnels to L7 destinations
    /// are refused.
    interception: Option<Arc<crate::interception::InterceptionCa>>,
    /// Asks `inspect.guard` classifiers.
    guard: guard::GuardClient,
}

impl Proxy {
    pub fn new(
        policy: PolicyStore,
        audit: AuditLog,
        telemetry: Arc<Telemetry>,
        dialer: Dialer,
        tunnel_idle: Duration,
    ) -> Self {
        Proxy {
            forwarder: forward::Forwarder::new(
                dialer.clone(),
                telemetry.metrics.upstream_connections.clone(),
            ),
            policy,
            audit,
            telemetry,
            dialer,
            tunnel_idle,
            tunnels: TaskTracker::new(),
            stop_tunnels: CancellationToken::new(),
            registry: Arc::default(),
            client_hello_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            global_allow: Vec::new(),
            limits: Arc::default(),
            secrets: crate::upstream::Secrets::default(),
            upstream_tls: crate::upstream::UpstreamTls::new(None),
            interception: None,
            guard: guard::GuardClient::default(),
        }
    }

    /// Keep-alive pool sizing for forwarded requests (`upstream_pool`).
    pub fn with_upstream_pool(mut self, pool: crate::config::UpstreamPool) -> Self {
        self.forwarder.set_pool(pool);
        self
    }

    /// TLS interception for CONNECTs to destinations an L7 pathway names.
    pub fn with_interception(
        mut self,
        ca: Option<Arc<crate::interception::InterceptionCa>>,
    ) -> Self {
        self.interception = ca;
        self
    }

    /// Limits, the secrets checked at policy load, and the gateway's identity for
    /// SPIFFE mTLS upstreams.
    pub fn with_l7(
        mut self,
        limits: Arc<crate::limits::Limits>,
        secrets: crate::upstream::Secrets,
        identity: crate::identity::IdentitySource,
    ) -> Self {
        self.limits = limits;
        self.secrets = secrets;
        self.upstream_tls = crate::upstream::UpstreamTls::new(Some(identity));
        self
    }

    pub fn limits(&self) -> &Arc<crate::limits::Limits> {
        &self.limits
    }

    /// Takes the decided pathway's limits (rate, concurrency slot, budgets) for one
    /// request or tunnel; `None` when the pathway has no limits.
    async fn admit(
        &self,
        decision: &Decision,
    ) -> Result<Option<crate::limits::Admission>, Refusal> {
        match (&decision.pathway, &decision.agent) {
            (Some(p), Some(agent)) if !p.limits.is_empty() => self
                .limits
                .admit(agent, p)
                .await
                .map(Some)
                .map_err(limit_refusal),
            _ => Ok(None),
        }
    }

    /// Address ranges every pathway may reach (gateway.yaml `allow_cidrs`).
    pub fn with_global_allow(mut self, cidrs: Vec<ipnet::IpNet>) -> Self {
        self.registry = Arc::new(registry::Registry::with_global_allow(cidrs.clone()));
        self.global_allow = cidrs;
        self
    }

    /// How long a tunnel that checks SNI waits for the agent's ClientHello.
    pub fn with_client_hello_timeout(mut self, timeout: Duration) -> Self {
        self.client_hello_timeout = timeout;
        self
    }

    /// How long a forwarded request waits for the upstream's response headers
    /// (gateway.yaml `timeouts.response`); a pathway's `timeouts.response` wins.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Open tunnels and connections, for re-checks on policy reload.
    pub fn registry(&self) -> &Arc<registry::Registry> {
        &self.registry
    }

    /// Tunnels outlive the HTTP connection that opened them; shutdown waits on these.
    pub fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    /// Closes every open tunnel (shutdown deadline passed).
    pub fn close_tunnels(&self) {
        self.stop_tunnels.cancel();
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<PeerIdentity>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if req.method() == Method::CONNECT {
            Ok(self.connect(req, &peer).await)
        } else {
            Ok(self.forward(req, &peer).await)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        peer: &PeerIdentity,
        kind: RequestKind,
        method: &str,
        target: &Target,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        llm_model: Option<&str>,
    ) -> Decision {
        let policy = self.policy.current();
        let view = policy_headers(&policy, headers);
        let host = target.host.as_policy_str();
        let request = egress_policy::Request {
            source: &peer.spiffe_id,
            source_address: Some(peer.address),
            kind,
            method,
            host: &host,
            port: target.port,
            path,
            query,
            headers: view.as_ref().unwrap_or(egress_policy::HeaderView::empty()),
            llm_model,
            now: SystemTime::now(),
        };
        let decision = policy.evaluate(&request);
        if !decision.dry_run_rules.is_empty() {
            tracing::info!(
                source = %peer.spiffe_id,
                destination = %target,
                rules = ?decision.dry_run_rules,
                "dry-run rule would deny"
            );
        }
        decision
    }
}

/// The headers as the policy sees them: every one the gateway would forward, non-UTF-8
/// bytes replaced and repeats joined (see [`egress_policy::HeaderView`]).
fn header_pairs(headers: &HeaderMap) -> egress_policy::HeaderView {
    egress_policy::HeaderView::new(headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
}

/// The header view for one evaluation by `policy`; `None` (an empty view will do)
/// when no expression of it reads `request`. Tunnels kept for re-checks on reload
/// take the full view: the next policy may read them.
fn policy_headers(
    policy: &egress_policy::Policy,
    headers: &HeaderMap,
) -> Option<egress_policy::HeaderView> {
    policy.reads_request().then(|| header_pairs(headers))
}

/// Sends the refusal to the agent and writes its audit line.
fn refuse(exchange: Exchange, refusal: Refusal) -> Response<ProxyBody> {
    let response = refusal.to_response(&exchange.trace_id());
    exchange.refuse(&refusal);
    response
}

fn denial(decision: &Decision) -> Refusal {
    Refusal::Denied {
        reason: decision.reason.to_string(),
        rule: decision.rule.clone(),
        code: decision.reason.code(),
    }
}

/// The ranges the address guard lets through for this decision: the allowing
/// pathway's `allow_cidrs` plus the gateway-wide ones.
fn allowed_ranges(decision: &Decision, global_allow: &[ipnet::IpNet]) -> Vec<ipnet::IpNet> {
    let mut out: Vec<ipnet::IpNet> = decision
        .pathway
        .as_ref()
        .map(|p| p.allow_cidrs.clone())
        .unwrap_or_default();
    out.extend_from_slice(global_allow);
    out
}

/// A limit that fired, as the agent and the audit line see it.
fn limit_refusal(hit: crate::limits::LimitHit) -> Refusal {
    Refusal::Limited {
        reason: hit.reason,
        limit: hit.kind.as_str().to_string(),
        retry_after: hit.retry_after,
    }
}

fn dial_refusal(e: &DialError) -> Refusal {
    match e {
        DialError::Blocked { ip, range } => {
            tracing::warn!(%ip, range, "destination address refused");
            Refusal::Denied {
                reason: "destination address not allowed".into(),
                rule: None,
                code: "destination_address_blocked",
            }
        }
        e if e.is_timeout() => Refusal::UpstreamTimeout(e.to_string()),
        e => Refusal::UpstreamUnreachable(e.to_string()),
    }
}
