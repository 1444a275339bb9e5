//! Requests from a connection whose heads the [`crate::request_head`] guard checks: a
//! refused head is answered here, with the JSON refusal and one audit line like any
//! other refusal; every other request goes to [`Proxy::handle`].

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::request_head::{HeadControl, HeadProblem, RejectedHead};

use super::exchange::Exchange;
use super::refusal::Refusal;
use super::{refuse, PeerIdentity, Proxy, ProxyBody};

impl Proxy {
    /// [`Proxy::handle`] for a guarded connection.
    pub async fn handle_guarded(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<PeerIdentity>,
        control: HeadControl,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let mut ticket = control.begin();
        if let Some(rejected) = ticket.take_rejection() {
            return Ok(self.refuse_head(&peer, rejected));
        }
        let connect = req.method() == Method::CONNECT;
        let response = match self.handle(req, peer).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (connect && response.status().is_success());
        let (parts, body) = response.into_parts();
        let body = ticket.finish(upgraded, body).boxed();
        Ok(Response::from_parts(parts, body))
    }

    /// The answer to a head the guard refused, and its audit line.
    pub(super) fn refuse_head(
        &self,
        peer: &PeerIdentity,
        head: RejectedHead,
    ) -> Response<ProxyBody> {
        let method = head.method.unwrap_or_default();
        let connect = method.eq_ignore_ascii_case("CONNECT");
        let mut ex = Exchange::begin(
            self.audit.clone(),
            &self.telemetry,
            peer,
            if connect { "connect" } else { "http" },
            &method,
            &HeaderMap::new(),
        );
        if let Some(target) = &head.target {
            let (host, port, path) = target_parts(target, connect);
            ex.set_target(&host, port, &path);
        }
        let refusal = match head.problem {
            HeadProblem::Malformed => Refusal::BadRequest(head.reason),
            HeadProblem::TooLarge => Refusal::HeaderTooLarge(head.reason),
            HeadProblem::UriTooLong => Refusal::UriTooLong(head.reason),
            HeadProblem::TimedOut => Refusal::HeaderTimeout(head.reason),
        };
        tracing::info!(
            source = %peer.spiffe_id,
            status = refusal.status().as_u16(),
            reason = refusal.reason(),
            "request head refused"
        );
        refuse(ex, refusal)
    }

    /// The answer to a request on a connection over `limits.max_connections_per_agent`:
    /// `429` with the standard body and `Retry-After`, and its audit line, so the agent
    /// learns why instead of seeing a reset.
    pub fn refuse_over_connection_cap<B>(
        &self,
        req: &Request<B>,
        peer: &PeerIdentity,
        max: usize,
    ) -> Response<ProxyBody> {
        let connect = req.method() == Method::CONNECT;
        let mut ex = Exchange::begin(
            self.audit.clone(),
            &self.telemetry,
            peer,
            if connect { "connect" } else { "http" },
            req.method().as_str(),
            req.headers(),
        );
        let (host, port, path) = target_parts(&req.uri().to_string(), connect);
        ex.set_target(&host, port, &path);
        let refusal = Refusal::Limited {
            reason: format!("agent already has {max} open connections to the gateway"),
            limit: "max_connections_per_agent".into(),
            // Connections end on their own terms; a second is a guess at how soon one does.
            retry_after: 1,
        };
        refuse(ex, refusal)
    }
}

/// Host, port and path of a refused request's target, as far as it can be read.
fn target_parts(target: &str, connect: bool) -> (String, u16, String) {
    let Ok(uri) = target.parse::<http::Uri>() else {
        return (String::new(), 0, target.to_string());
    };
    let host = uri.host().unwrap_or_default().to_string();
    let default_port = if connect || uri.scheme_str() == Some("https") {
        443
    } else if uri.host().is_some() {
        80
    } else {
        0
    };
    let path = if connect {
        String::new()
    } else {
        uri.path().to_string()
    };
    (host, uri.port_u16().unwrap_or(default_port), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_refused_heads() {
        assert_eq!(
            target_parts("http://api.example:8080/v1?x", false),
            ("api.example".into(), 8080, "/v1".into())
        );
        assert_eq!(
            target_parts("api.example:443", true),
            ("api.example".into(), 443, String::new())
        );
        assert_eq!(
            target_parts("/local", false),
            (String::new(), 0, "/local".into())
        );
    }
}
