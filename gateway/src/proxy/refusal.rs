//! Every way the gateway refuses or fails a request, mapped to its HTTP status in one place.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;

#[derive(Debug, Clone)]
pub enum Refusal {
    /// The request itself is malformed or not a proxy request (downstream's fault).
    BadRequest(String),
    /// The policy said no.
    Denied {
        reason: String,
        rule: Option<String>,
    },
    /// Over a limit; `retry_after` in seconds.
    Limited {
        reason: String,
        limit: String,
        retry_after: u64,
    },
    /// The request body is larger than the pathway allows.
    TooLarge { reason: String, limit: String },
    /// The destination could not be reached (upstream's fault).
    UpstreamUnreachable(String),
    /// The destination did not answer in time.
    UpstreamTimeout(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied { .. } => StatusCode::FORBIDDEN,
            Refusal::Limited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn error_code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Denied { .. } => "egress_denied",
            Refusal::Limited { .. } => "rate_limited",
            Refusal::TooLarge { .. } => "payload_too_large",
            Refusal::UpstreamUnreachable(_) => "upstream_unreachable",
            Refusal::UpstreamTimeout(_) => "upstream_timeout",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Refusal::BadRequest(r)
            | Refusal::UpstreamUnreachable(r)
            | Refusal::UpstreamTimeout(r) => r,
            Refusal::Denied { reason, .. }
            | Refusal::Limited { reason, .. }
            | Refusal::TooLarge { reason, .. } => reason,
        }
    }

    pub fn rule(&self) -> Option<&str> {
        match self {
            Refusal::Denied { rule, .. } => rule.as_deref(),
            _ => None,
        }
    }

    pub fn limit(&self) -> Option<&str> {
        match self {
            Refusal::Limited { limit, .. } | Refusal::TooLarge { limit, .. } => Some(limit),
            _ => None,
        }
    }

    /// True when the policy (not an upstream failure) refused the request.
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            Refusal::Denied { .. }
                | Refusal::Limited { .. }
                | Refusal::TooLarge { .. }
                | Refusal::BadRequest(_)
        )
    }

    /// The JSON body the agent sees: `{"error","reason","rule","trace_id"}`.
    pub fn to_response(&self, trace_id: &str) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": self.error_code(),
            "reason": self.reason(),
            "rule": self.rule(),
            "trace_id": trace_id,
        });
        let mut builder = Response::builder()
            .status(self.status())
            .header(header::CONTENT_TYPE, "application/json");
        if let Refusal::Limited { retry_after, .. } = self {
            builder = builder.header(header::RETRY_AFTER, retry_after.to_string());
        }
        let bytes = Bytes::from(body.to_string());
        builder
            .body(full(bytes.clone()))
            .unwrap_or_else(|_| Response::new(full(bytes)))
    }
}

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}
