//! Absolute-form `http://` requests: decide, then forward over a pooled upstream connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::net::TcpStream;

use egress_policy::RequestKind;

use crate::upstream::tls::server_name;
use crate::upstream::ProfileKey;

use super::dial::{DialError, Dialer};
use super::exchange::{ByteCounts, Exchange};
use super::metered::{CountingBody, Direction};
use super::refusal::Refusal;
use super::request_body::ReqBody;
use super::target::{parse_authority, Target};
use super::{denial, dial_refusal, dlp, llm, mcp, refuse, PeerIdentity, Proxy, ProxyBody};

/// Upstream HTTP clients, one pool per set of `allow_cidrs` and upstream TLS profile
/// (the guard a connection was checked against and the verification it passed are both
/// part of what makes it reusable).
pub(super) struct Forwarder {
    dialer: Dialer,
    clients: DashMap<PoolKey, Client<GuardedConnector, ProxyBody>>,
    pool: crate::config::UpstreamPool,
    /// Upstream connections dialed; hyper-util does not report its pool's size, so
    /// churn shows as this counter rising under steady keep-alive traffic.
    dialed: prometheus_client::metrics::counter::Counter,
}

type PoolKey = (Vec<IpNet>, Option<ProfileKey>);

impl Forwarder {
    pub(super) fn new(
        dialer: Dialer,
        dialed: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Forwarder {
            dialer,
            clients: DashMap::new(),
            pool: crate::config::UpstreamPool::default(),
            dialed,
        }
    }

    /// Applies to pools built from now on (set at start-up, before any is built).
    pub(super) fn set_pool(&mut self, pool: crate::config::UpstreamPool) {
        self.pool = pool;
    }

    fn client(
        &self,
        allow: &[IpNet],
        profile: Option<(ProfileKey, Arc<rustls::ClientConfig>)>,
    ) -> Client<GuardedConnector, ProxyBody> {
        let (profile_key, tls) = match profile {
            Some((k, c)) => (Some(k), Some(c)),
            None => (None, None),
        };
        let key = (allow.to_vec(), profile_key);
        if let Some(c) = self.clients.get(&key) {
            return c.clone();
        }
        let connector = GuardedConnector {
            dialer: self.dialer.clone(),
            allow: allow.to_vec().into(),
            tls: tls.map(tokio_rustls::TlsConnector::from),
            dialed: self.dialed.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool.idle_timeout)
            .pool_max_idle_per_host(self.pool.max_idle_per_destination)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        self.clients.entry(key).or_insert(client).clone()
    }
}

/// How an L7 request reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// `METHOD http://host:port/...` on the mTLS connection.
    AbsoluteForm,
    /// Inside an agent's TLS the gateway terminated for a CONNECT tunnel.
    Intercepted,
}

impl Proxy {
    /// How much body to read for the model, when some pathway's `models` may decide.
    fn model_body_limit(
        &self,
        peer: &PeerIdentity,
        method: &str,
        target: &super::target::Target,
        path: &str,
    ) -> Option<u64> {
        let host = target.host.as_policy_str();
        self.policy
            .current()
            .llm_model_body_limit(&egress_policy::Request {
                source: &peer.spiffe_id,
                source_address: Some(peer.address),
                kind: RequestKind::Http,
                method,
                host: &host,
                port: target.port,
                path,
                query: "",
                headers: egress_policy::HeaderView::empty(),
                llm_model: None,
                now: std::time::SystemTime::now(),
            })
    }

    pub(super) async fn forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: &PeerIdentity,
    ) -> Response<ProxyBody> {
        let method = req.method().as_str().to_string();
        let mut ex = Exchange::begin(
            self.audit.clone(),
            &self.telemetry,
            peer,
            "http",
            &method,
            req.headers(),
        );
        let uri = req.uri().clone();
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                ex.set_target(
                    uri.host().unwrap_or_default(),
                    uri.port_u16().unwrap_or(443),
                    uri.path(),
                );
                return refuse(
                    ex,
                    Refusal::BadRequest(
                        "https:// request targets are not proxied: use CONNECT to tunnel TLS, \
                         or an http://host:443 URL for a pathway with an upstream"
                            .into(),
                    ),
                );
            }
            _ => {
                ex.set_target("", 0, uri.path());
                return refuse(
                    ex,
                    Refusal::BadRequest(
                        "this is an egress proxy: send CONNECT host:port, or an absolute-form \
                         request such as GET http://host:port/path"
                            .into(),
                    ),
                );
            }
        }
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let with_port = if uri.port_u16().is_some() {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let target = match parse_authority(&with_port) {
            Ok(t) => t,
            Err(e) => {
                ex.set_target(authority, 0, uri.path());
                return refuse(ex, Refusal::BadRequest(e.to_string()));
            }
        };
        ex.set_target(&target.host.as_policy_str(), target.port, uri.path());
        self.forward_to(ex, req, peer, target, Origin::AbsoluteForm)
            .await
    }

    /// A request read inside an agent's TLS the gateway terminated: the destination
    /// is the tunnel's CONNECT target, whatever the request line or `Host` says.
    pub(super) async fn forward_intercepted(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: &PeerIdentity,
        target: &Target,
    ) -> Response<ProxyBody> {
        let mut ex = Exchange::begin(
            self.audit.clone(),
            &self.telemetry,
            peer,
            "http",
            req.method().as_str(),
            req.headers(),
        );
        ex.set_intercepted();
        ex.set_target(&target.host.as_policy_str(), target.port, req.uri().path());
        self.forward_to(ex, req, peer, target.clone(), Origin::Intercepted)
            .await
    }

    /// Decides one L7 request and forwards it: the model read, limits, credential
    /// injection and upstream TLS, one audit line and span.
    async fn forward_to(
        self: Arc<Self>,
        mut ex: Exchange,
        req: Request<Incoming>,
        peer: &PeerIdentity,
        target: Target,
        origin: Origin,
    ) -> Response<ProxyBody> {
        let method = req.method().as_str().to_string();
        let uri = req.uri().clone();
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or_default().to_string();

        let (mut parts, body) = req.into_parts();
        let mut body = ReqBody::Streaming(body);
        // Two-phase evaluation: when a pathway's `models` may decide, read the (bounded,
        // decoded) body first so the policy sees the model. A Gemini-style path names
        // the model the upstream runs, whatever the body says.
        let mut llm_model = egress_policy::model_from_path(&path);
        if let Some(limit) = self.model_body_limit(peer, &method, &target, &path) {
            body = match body.buffer(&parts.headers, limit).await {
                Ok(b) => b,
                Err(refusal) => return refuse(ex, refusal),
            };
            if let (None, ReqBody::Buffered(bytes)) = (&llm_model, &body) {
                llm_model = match llm::decoded_request_body(&parts.headers, bytes, limit) {
                    Ok(text) => llm::model_from_body(&text),
                    Err(refusal) => return refuse(ex, refusal),
                };
            }
        }
        ex.set_llm_model(llm_model.as_deref());

        // On MCP pathways every JSON-RPC message is decided on its own (mcp.rs).
        let decided = self
            .decide_l7(
                ex,
                peer,
                &method,
                &target,
                &path,
                &query,
                &mut parts.headers,
                body,
                llm_model.as_deref(),
            )
            .await;
        let mcp::Decided {
            mut ex,
            decision,
            mut body,
            plan: mcp_plan,
        } = match decided {
            Ok(d) => d,
            Err(answered) => return answered,
        };
        ex.set_decision(&decision);
        if !decision.permits() {
            return refuse(ex, denial(&decision));
        }
        let pathway = decision.pathway.clone();
        if let Some(max) = pathway
            .as_ref()
            .and_then(|p| p.limits.max_request_body_bytes)
        {
            body = match body.buffer(&parts.headers, max).await {
                Ok(b) => b,
                Err(refusal) => return refuse(ex, refusal),
            };
        }
        // `inspect`: the body is read, decoded and scanned (and the guard asked)
        // before anything is forwarded or a limit is taken.
        let inspect = pathway.as_ref().filter(|p| p.inspect.is_some()).cloned();
        if let Some(p) = &inspect {
            match self
                .inspect_request(&mut ex, peer, p, &mut parts.headers, body)
                .await
            {
                Ok(b) => body = b,
                Err(refusal) => return refuse(ex, refusal),
            }
        }
        let admission = match self.admit(&decision).await {
            Ok(a) => a,
            Err(refusal) => return refuse(ex, refusal),
        };
        let allow = super::allowed_ranges(&decision, &self.global_allow);

        let counts = ByteCounts::new();
        if pathway
            .as_ref()
            .is_some_and(|p| p.models.is_some() || p.limits.llm_tokens_per_hour.is_some())
        {
            ex.set_llm_provider(llm::Provider::for_path(&path));
        }
        if let Some(admission) = admission {
            let mut accounting = llm::Accounting::new(admission, counts.clone(), &path);
            if accounting.counts_tokens() {
                // On a token budget the body is read (bounded) so a streaming request
                // can be made to report its usage; a larger one is forwarded as it is
                // and charged from its bytes.
                let cap = pathway
                    .as_ref()
                    .and_then(|p| p.limits.max_request_body_bytes)
                    .unwrap_or(0)
                    .max(egress_policy::DEFAULT_MODEL_BODY_LIMIT);
                body = match body.peek(usize::try_from(cap).unwrap_or(usize::MAX)).await {
                    Ok(b) => b,
                    Err(refusal) => return refuse(ex, refusal),
                };
                if let ReqBody::Buffered(bytes) = &body {
                    match llm::prepare_request(&path, &mut parts.headers, bytes, cap) {
                        Ok(mut prepared) => {
                            if let Some(rewritten) = prepared.body.take() {
                                body = ReqBody::Buffered(rewritten);
                            }
                            accounting.set_prepared(prepared);
                        }
                        Err(refusal) => return refuse(ex, refusal),
                    }
                }
            }
            ex.attach_accounting(accounting);
        }
        strip_hop_by_hop(&mut parts.headers);
        // The destination the policy decided on is the one the upstream sees: a Host
        // header naming another site would let an agent front through an allowed one
        // (RFC 9112 §3.2.2: a proxy replaces Host with the target URI's authority).
        if let Ok(host) = HeaderValue::from_str(&authority_for_host(&target)) {
            parts.headers.insert(header::HOST, host);
        }
        if let Ok(tp) = HeaderValue::from_str(&ex.trace.traceparent()) {
            parts
                .headers
                .insert(HeaderName::from_static("traceparent"), tp);
        }
        let mut profile = None;
        // The agent asked for https: what it intercepted leaves over TLS, with the
        // pathway's verification settings, or public roots when it has none.
        let upstream = match (origin, pathway.as_ref().and_then(|p| p.upstream.as_ref())) {
            (Origin::AbsoluteForm, up) => up.cloned(),
            (Origin::Intercepted, Some(up)) => Some(egress_policy::Upstream {
                tls: true,
                ..up.clone()
            }),
            (Origin::Intercepted, None) => Some(egress_policy::Upstream {
                tls: true,
                ca_file: None,
                spiffe_id: None,
                inject_headers: Vec::new(),
            }),
        };
        let pathway_name = pathway.as_ref().map(|p| p.name.clone()).unwrap_or_default();
        if let Some(up) = &upstream {
            // Injection replaces whatever the agent sent under that name.
            for (name, secret) in &up.inject_headers {
                let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                    return refuse(
                        ex,
                        Refusal::UpstreamUnreachable(format!(
                            "pathway `{pathway_name}`: bad inject_headers name"
                        )),
                    );
                };
                match self
                    .secrets
                    .header_value(&secret.secret_file, &secret.prefix)
                    .await
                {
                    Ok(v) => {
                        parts.headers.remove(&name);
                        parts.headers.insert(name, v);
                    }
                    // Never forward without the credential; the file's name is in the
                    // log and the metric, not in what the agent sees.
                    Err(e) => {
                        tracing::warn!(pathway = %pathway_name, error = %e, "credential unavailable");
                        return refuse(
                            ex,
                            Refusal::CredentialUnavailable(format!(
                                "credential unavailable: {pathway_name}"
                            )),
                        );
                    }
                }
            }
            // East-west: the workload learns which agent calls (Envoy's XFCC format),
            // never what the agent claimed.
            if up.spiffe_id.is_some() {
                let xfcc = HeaderName::from_static("x-forwarded-client-cert");
                parts.headers.remove(&xfcc);
                if let Some(v) = self.upstream_tls.forwarded_client_cert(&peer.spiffe_id) {
                    parts.headers.insert(xfcc, v);
                }
            }
            profile = match self.upstream_tls.profile(up).await {
                Ok(prof) => prof,
                Err(
                    e @ (crate::upstream::OriginationError::CaFile(_)
                    | crate::upstream::OriginationError::CaEmpty { .. }),
                ) => {
                    tracing::warn!(pathway = %pathway_name, error = %e, "trust anchor unavailable");
                    return refuse(
                        ex,
                        Refusal::CredentialUnavailable(format!(
                            "credential unavailable: {pathway_name}"
                        )),
                    );
                }
                Err(e) => {
                    return refuse(
                        ex,
                        Refusal::UpstreamUnreachable(format!("pathway `{pathway_name}`: {e}")),
                    )
                }
            };
        }
        // The pool is keyed by scheme and authority; a canonical one avoids duplicates.
        parts.uri = match Uri::builder()
            .scheme(if profile.is_some() { "https" } else { "http" })
            .authority(target.to_string())
            .path_and_query(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .build()
        {
            Ok(u) => u,
            Err(e) => return refuse(ex, Refusal::BadRequest(format!("bad request target: {e}"))),
        };
        // The upstream pool speaks HTTP/1.1, whatever the agent spoke to the gateway
        // (HTTP/2 inside intercepted TLS).
        parts.version = http::Version::HTTP_11;
        let body =
            CountingBody::new(body.into_proxy_body(), counts.clone(), Direction::Sent).boxed();
        let upstream_req = Request::from_parts(parts, body);

        let client = self.forwarder.client(&allow, profile);
        // Bounds the wait for the response headers only; a streamed body may run longer.
        let response_timeout = pathway
            .as_ref()
            .and_then(|p| p.timeouts.response)
            .unwrap_or(self.response_timeout);
        let response =
            match tokio::time::timeout(response_timeout, client.request(upstream_req)).await {
                Ok(Ok(r)) => r,
                Err(_) => {
                    return refuse(
                        ex,
                        Refusal::UpstreamTimeout(format!(
                            "no response from the upstream within {response_timeout:?}"
                        )),
                    )
                }
                Ok(Err(e)) => {
                    let refusal = match (find_dial_error(&e), find_tls_error(&e)) {
                        (Some(dial), _) => dial_refusal(dial),
                        (None, Some(tls)) => {
                            Refusal::UpstreamUnreachable(format!("pathway `{pathway_name}`: {tls}"))
                        }
                        (None, None) => Refusal::UpstreamUnreachable(format!(
                            "upstream request failed: {}",
                            error_chain(&e)
                        )),
                    };
                    return refuse(ex, refusal);
                }
            };
        if let Some(ResolvedAddr(addr)) = response.extensions().get::<ResolvedAddr>() {
            ex.set_resolved(addr.ip());
        }
        let status = response.status().as_u16();
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The pathway with a response scan, and the scan; `mode: audit` logs what a
        // `deny` would have refused and passes the response on.
        let scanned = inspect.as_deref().and_then(|p| {
            p.inspect
                .as_ref()
                .and_then(|i| i.response.clone())
                .map(|mut scan| {
                    if scan.action == egress_policy::inspect::DlpAction::Deny
                        && self.policy.current().mode() == egress_policy::Mode::Audit
                    {
                        scan.action = egress_policy::inspect::DlpAction::Audit;
                    }
                    (p, scan)
                })
        });
        let body: ProxyBody = match scanned {
            None => body.boxed(),
            Some((p, ref scan)) => {
                let format = dlp::body_format(&parts.headers);
                match dlp::plan_response(scan, &mut parts.headers) {
                    Err(refusal) => return refuse(ex, refusal),
                    Ok(dlp::ResponseInspection::Buffer { coding }) => {
                        let literals = self.secrets.literals();
                        match dlp::buffer_response(
                            &mut ex, scan, &literals, coding, format, p, body,
                        )
                        .await
                        {
                            Ok(bytes) => super::refusal::full(bytes),
                            Err(refusal) => return refuse(ex, refusal),
                        }
                    }
                    Ok(dlp::ResponseInspection::Stream { coding }) => dlp::InspectedBody::new(
                        body,
                        coding,
                        scan,
                        format,
                        self.secrets.literals(),
                        ex.dlp_report(),
                        p.name.clone(),
                        ex.trace_id(),
                    )
                    .boxed(),
                }
            }
        };
        let strip_usage_chunk = ex
            .accounting_mut()
            .is_some_and(|acc| acc.response(status, &parts.headers));
        let body = CountingBody::new(body, counts, Direction::Received)
            .finishing(ex, status)
            .boxed();
        let body = if strip_usage_chunk {
            // The agent did not ask for the usage chunk the gateway added.
            parts.headers.remove(header::CONTENT_LENGTH);
            llm::StripUsageChunk::new(body).boxed()
        } else {
            body
        };
        let response = Response::from_parts(parts, body);
        match mcp_plan {
            Some(plan) => plan.respond(response),
            None => response,
        }
    }
}

/// `host` or `host:port` (port omitted when it is 80 or 443, as clients write it).
fn authority_for_host(target: &super::target::Target) -> String {
    if target.port == 80 || target.port == 443 {
        target.host.to_string()
    } else {
        target.to_string()
    }
}

/// Removes headers that describe one hop, not the message (RFC 9110 §7.6.1).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn find_dial_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a DialError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<DialError>() {
            return Some(d);
        }
        cur = err.source();
    }
    None
}

fn find_tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsHandshakeError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<TlsHandshakeError>() {
            return Some(d);
        }
        cur = err.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

/// The address an upstream connection was made to, carried into response extensions.
#[derive(Debug, Clone, Copy)]
pub(super) struct ResolvedAddr(pub SocketAddr);

/// Dials through the address guard for the hyper client pool, then, for TLS and
/// SPIFFE mTLS pathways, runs the TLS handshake with SNI = the destination host.
#[derive(Clone)]
pub(super) struct GuardedConnector {
    dialer: Dialer,
    allow: Arc<[IpNet]>,
    tls: Option<tokio_rustls::TlsConnector>,
    dialed: prometheus_client::metrics::counter::Counter,
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    // Not `transparent`: the refusal mapping finds these by walking `source()`.
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("{0}")]
    Tls(#[from] TlsHandshakeError),
}

/// The TLS handshake with the destination failed (wrong CA, wrong name, wrong SPIFFE ID).
#[derive(Debug, thiserror::Error)]
#[error("upstream TLS handshake with {target} failed: {reason}")]
pub(super) struct TlsHandshakeError {
    target: String,
    reason: String,
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = DialedStream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<DialedStream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        let allow = self.allow.clone();
        let tls = self.tls.clone();
        let dialed = self.dialed.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let target = parse_authority(authority).map_err(|e| DialError::Connect {
                target: authority.to_string(),
                reason: e.to_string(),
            })?;
            let (stream, addr) = dialer.dial(&target, &allow).await?;
            let io = match tls {
                None => UpstreamIo::Plain(stream),
                Some(tls) => {
                    let host = target.host.as_policy_str();
                    let handshake_error = |reason: String| TlsHandshakeError {
                        target: target.to_string(),
                        reason,
                    };
                    let name = server_name(&host).ok_or_else(|| {
                        handshake_error(format!("`{host}` is not a TLS server name"))
                    })?;
                    let s = tls
                        .connect(name, stream)
                        .await
                        .map_err(|e| handshake_error(e.to_string()))?;
                    UpstreamIo::Tls(Box::new(s))
                }
            };
            dialed.inc();
            Ok(DialedStream {
                io: TokioIo::new(io),
                addr,
            })
        })
    }
}

/// The upstream connection: plain TCP, or TLS over it.
pub(super) enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

pub(super) struct DialedStream {
    io: TokioIo<UpstreamIo>,
    addr: SocketAddr,
}

impl Connection for DialedStream {
    fn connected(&self) -> Connected {
        Connected::new().extra(ResolvedAddr(self.addr))
    }
}

impl hyper::rt::Read for DialedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for DialedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
