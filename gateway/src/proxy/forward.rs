//! Absolute-form `http://` requests: decide, then forward over a pooled upstream connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

use super::dial::{DialError, Dialer};
use super::exchange::{ByteCounts, Exchange};
use super::metered::{CountingBody, Direction};
use super::refusal::Refusal;
use super::target::parse_authority;
use super::{denial, dial_refusal, refuse, PeerIdentity, Proxy, ProxyBody};

/// Upstream HTTP clients, one pool per set of `allow_cidrs` (the guard a connection was
/// checked against is part of what makes it reusable).
pub(super) struct Forwarder {
    dialer: Dialer,
    clients: DashMap<Vec<IpNet>, Client<GuardedConnector, ProxyBody>>,
}

impl Forwarder {
    pub(super) fn new(dialer: Dialer) -> Self {
        Forwarder {
            dialer,
            clients: DashMap::new(),
        }
    }

    fn client(&self, allow: &[IpNet]) -> Client<GuardedConnector, ProxyBody> {
        if let Some(c) = self.clients.get(allow) {
            return c.clone();
        }
        let connector = GuardedConnector {
            dialer: self.dialer.clone(),
            allow: allow.to_vec().into(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        self.clients.entry(allow.to_vec()).or_insert(client).clone()
    }
}

impl Proxy {
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
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or_default().to_string();
        ex.set_target(&target.host.as_policy_str(), target.port, &path);

        let decision = self.decide(
            peer,
            RequestKind::Http,
            &method,
            &target,
            &path,
            &query,
            req.headers(),
            None,
        );
        ex.set_decision(&decision);
        if !decision.permits() {
            return refuse(ex, denial(&decision));
        }
        // A pathway with `upstream` promises TLS or SPIFFE mTLS to the destination and
        // injected credentials; until the gateway originates those, fail closed rather
        // than send the request in clear text without its credential.
        if let Some(p) = decision.pathway.as_ref().filter(|p| p.is_l7()) {
            return refuse(
                ex,
                Refusal::UpstreamUnreachable(format!(
                    "pathway `{}` needs upstream origination (TLS, SPIFFE mTLS, injected \
                     credentials), which this gateway does not perform yet",
                    p.name
                )),
            );
        }
        let allow = super::allowed_ranges(&decision, &self.global_allow);

        let counts = ByteCounts::new();
        let (mut parts, body) = req.into_parts();
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
        // The pool is keyed by scheme and authority; a canonical one avoids duplicates.
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(target.to_string())
            .path_and_query(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .build()
        {
            Ok(u) => u,
            Err(e) => return refuse(ex, Refusal::BadRequest(format!("bad request target: {e}"))),
        };
        let body = CountingBody::new(body, counts.clone(), Direction::Sent).boxed();
        let upstream_req = Request::from_parts(parts, body);

        let client = self.forwarder.client(&allow);
        let response = match client.request(upstream_req).await {
            Ok(r) => r,
            Err(e) => {
                let refusal = match find_dial_error(&e) {
                    Some(dial) => dial_refusal(dial),
                    None => Refusal::UpstreamUnreachable(format!(
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
        let body = CountingBody::new(body, counts, Direction::Received)
            .finishing(ex, status)
            .boxed();
        Response::from_parts(parts, body)
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

/// Dials through the address guard for the hyper client pool.
#[derive(Clone)]
pub(super) struct GuardedConnector {
    dialer: Dialer,
    allow: Arc<[IpNet]>,
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = DialedStream;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<DialedStream, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        let allow = self.allow.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let target = parse_authority(authority).map_err(|e| DialError::Connect {
                target: authority.to_string(),
                reason: e.to_string(),
            })?;
            let (stream, addr) = dialer.dial(&target, &allow).await?;
            Ok(DialedStream {
                io: TokioIo::new(stream),
                addr,
            })
        })
    }
}

pub(super) struct DialedStream {
    io: TokioIo<TcpStream>,
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
