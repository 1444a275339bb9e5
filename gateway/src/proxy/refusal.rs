//! Every way the gateway refuses or fails a request, mapped to its HTTP status in one place.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;

#[derive(Debug, Clone)]
pub enum Refusal {
    /// The request itself is malformed or not a proxy request (downstream's fault).
    BadRequest(String),
    /// The policy said no. `code` is the stable reason code (`Reason::code()` for
    /// policy decisions).
    Denied {
        reason: String,
        rule: Option<String>,
        code: &'static str,
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
    /// The request head is larger than `limits.max_header_bytes`, or has too many fields.
    HeaderTooLarge(String),
    /// The request target is longer than the parser accepts.
    UriTooLong(String),
    /// The request head did not arrive within `timeouts.request_header`.
    HeaderTimeout(String),
    /// A body the pathway must read came in a content coding the gateway cannot decode.
    UnsupportedMediaType(String),
    /// The pathway's credential (`secret_file`) or trust anchor (`ca_file`) cannot be
    /// read: this pathway alone is out of service until the file is back.
    CredentialUnavailable(String),
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
            Refusal::HeaderTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Refusal::HeaderTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::CredentialUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            Refusal::HeaderTooLarge(_) => "request_header_fields_too_large",
            Refusal::UriTooLong(_) => "uri_too_long",
            Refusal::HeaderTimeout(_) => "request_timeout",
            Refusal::UnsupportedMediaType(_) => "unsupported_media_type",
            Refusal::CredentialUnavailable(_) => "credential_unavailable",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Refusal::BadRequest(r)
            | Refusal::UpstreamUnreachable(r)
            | Refusal::UpstreamTimeout(r)
            | Refusal::HeaderTooLarge(r)
            | Refusal::UriTooLong(r)
            | Refusal::HeaderTimeout(r)
            | Refusal::UnsupportedMediaType(r)
            | Refusal::CredentialUnavailable(r) => r,
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
            Refusal::HeaderTooLarge(_) => Some("max_header_bytes"),
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
                | Refusal::HeaderTooLarge(_)
                | Refusal::UriTooLong(_)
                | Refusal::HeaderTimeout(_)
                | Refusal::UnsupportedMediaType(_)
        )
    }

    /// A stable snake_case code for why: the policy's reason code for denials, the
    /// limit that fired for 429 and 413, else the same as the type.
    pub fn code(&self) -> &str {
        match self {
            Refusal::Denied { code, .. } => code,
            Refusal::Limited { limit, .. } | Refusal::TooLarge { limit, .. } => limit,
            other => other.error_code(),
        }
    }

    /// The JSON body the agent sees, shaped like the LLM providers' own errors so
    /// their SDKs show `message`:
    /// `{"error":{"type","code","message","rule","limit","trace_id"}}`.
    pub fn to_response(&self, trace_id: &str) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": {
                "type": self.error_code(),
                "code": self.code(),
                "message": self.reason(),
                "rule": self.rule(),
                "limit": self.limit(),
                "trace_id": trace_id,
            }
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
