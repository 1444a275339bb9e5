//! The agent-facing side: plain HTTP proxy requests in, the same requests over mTLS to
//! the gateway, the gateway's answers back unchanged.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::upstream::{Affinity, GatewayClient, GatewayError};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) struct SidecarProxy {
    pub client: Arc<GatewayClient>,
    pub tunnels: TaskTracker,
    pub stop_tunnels: CancellationToken,
}

impl SidecarProxy {
    pub async fn handle(
        self: Arc<Self>,
        affinity: Arc<Affinity>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let response = if req.method() == Method::CONNECT {
            self.connect(req).await
        } else {
            self.forward(&affinity, req).await
        };
        Ok(response)
    }

    /// Absolute-form `http://` request: forwarded on the agent connection's gateway
    /// connection; the gateway's response goes back as it is.
    async fn forward(&self, affinity: &Affinity, req: Request<Incoming>) -> Response<Body> {
        if req.uri().scheme().is_none() || req.uri().authority().is_none() {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the sidecar is an HTTP proxy: send absolute-form requests (http://host:port/path) or CONNECT host:port",
            );
        }
        let (mut parts, body) = req.into_parts();
        normalize(&mut parts);
        let method = parts.method.clone();
        let uri = parts.uri.clone();
        match affinity.send(Request::from_parts(parts, body)).await {
            Ok(resp) => relay(resp),
            Err(e) => {
                tracing::warn!(%method, %uri, error = %e, "cannot forward to the gateway");
                gateway_failure(&e)
            }
        }
    }

    /// `CONNECT host:port`: sent on its own gateway connection, which becomes the tunnel
    /// when the gateway answers 2xx. Any other answer goes back to the agent as it is.
    async fn connect(&self, mut req: Request<Incoming>) -> Response<Body> {
        let Some(authority) = req.uri().authority().cloned() else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "CONNECT needs a host:port target",
            );
        };
        let agent_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        normalize(&mut parts);
        let mut conn = match self.client.checkout().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target = %authority, error = %e, "cannot reach the gateway for a tunnel");
                return gateway_failure(&e);
            }
        };
        let mut resp = match conn
            .sender
            .send_request(Request::from_parts(parts, body))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let e = GatewayError::Http(e);
                tracing::warn!(target = %authority, error = %e, "CONNECT to the gateway failed");
                return gateway_failure(&e);
            }
        };
        if !resp.status().is_success() {
            return relay(resp);
        }
        let gateway_upgrade = hyper::upgrade::on(&mut resp);
        let stop = self.stop_tunnels.clone();
        self.tunnels.spawn(async move {
            // Keep the sender alive until the tunnel ends; dropping it early is harmless
            // for an upgraded connection, but this keeps ownership obvious.
            let _conn = conn;
            let (agent, gateway) = match tokio::try_join!(agent_upgrade, gateway_upgrade) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(target = %authority, error = %e, "tunnel upgrade failed");
                    return;
                }
            };
            let (mut agent, mut gateway) = (TokioIo::new(agent), TokioIo::new(gateway));
            tokio::select! {
                r = crate::proxy::copy::copy_both_ways(
                    &mut agent,
                    &mut gateway,
                    crate::proxy::RELAY_BUFFER_BYTES,
                ) => {
                    if let Err(e) = r {
                        tracing::debug!(target = %authority, error = %e, "tunnel ended with an error");
                    }
                }
                _ = stop.cancelled() => tracing::debug!(target = %authority, "tunnel closed at shutdown"),
            }
        });
        let (parts, _) = resp.into_parts();
        let mut out = Response::from_parts(parts, empty());
        strip_hop_by_hop(out.headers_mut());
        out
    }
}

/// The request as the gateway gets it: HTTP/1.1 (so the gateway connection stays
/// open even for HTTP/1.0 agents such as Python's CONNECT), a `Host`, no hop-by-hop
/// headers. Everything end-to-end, `traceparent` included, passes unchanged.
fn normalize(parts: &mut http::request::Parts) {
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, value);
        }
    }
}

/// The gateway's response with only hop-by-hop headers removed.
fn relay(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// Headers that describe one hop (RFC 9110 7.6.1), plus the ones named in `Connection`.
/// `Transfer-Encoding` and `Content-Length` stay: hyper re-frames the body from them.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| n != header::TRANSFER_ENCODING && n != header::CONTENT_LENGTH)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The sidecar's own failures, in the gateway's JSON shape so agents (and their SDKs)
/// parse one format.
fn gateway_failure(e: &GatewayError) -> Response<Body> {
    if e.is_timeout() {
        refusal(
            StatusCode::GATEWAY_TIMEOUT,
            "gateway_timeout",
            &e.to_string(),
        )
    } else {
        refusal(
            StatusCode::BAD_GATEWAY,
            "gateway_unreachable",
            &e.to_string(),
        )
    }
}

fn refusal(status: StatusCode, error: &str, reason: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": {
        "type": error,
        "code": error,
        "message": reason,
        "rule": null,
        "limit": null,
        "trace_id": null,
        "source": "sidecar",
    }});
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{body}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("proxy-authorization", "Basic eA==".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        h.insert("content-length", "3".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "traceparent"]);
    }
}
