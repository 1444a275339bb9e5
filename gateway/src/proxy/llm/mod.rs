//! LLM traffic: the request's model (for `models`), and token accounting for
//! `llm_tokens_per_hour` that an agent cannot dodge.
//!
//! Request phase: the model comes from a Gemini-style path (`models/{model}:`) or the
//! (decoded) JSON body's `model`. On a pathway with a token budget, an
//! OpenAI-compatible streaming request gets `stream_options.include_usage` so the
//! stream reports its usage (the usage-only chunk this adds is dropped on the way
//! back unless the agent asked for it).
//!
//! Response phase: the body is decoded (whatever its content coding) and scanned for
//! the usage every supported provider reports ([`usage`]), while the agent gets the
//! original bytes. When the body ends, the budget is charged: the reported total, or
//! when nothing usable was reported (unknown shape, decoding error, a stream cut short,
//! an upstream error) an estimate, `ceil(request bytes / 4) + ceil(response bytes / 4)`,
//! at least 1 token, counting decoded text where the gateway decoded it. The audit
//! line says which (`llm_usage_source`).

mod stream;
mod usage;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use serde_json::value::RawValue;

use super::encoding::{self, Coding, Decoder};
use super::exchange::ByteCounts;
use super::refusal::Refusal;
use crate::audit::AuditRecord;
use crate::limits::Admission;

pub use stream::StripUsageChunk;
pub use usage::{Found, Usage, UsageParser};

/// The API family a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// OpenAI and the many OpenAI-compatible APIs.
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    /// By the request path's endpoint; `None` for a path no provider uses.
    pub fn for_path(path: &str) -> Option<Provider> {
        let last = path.rsplit('/').next().unwrap_or_default();
        if egress_policy::model_from_path(path).is_some() {
            return Some(Provider::Gemini);
        }
        if last == "messages" || path.ends_with("/messages/count_tokens") {
            return Some(Provider::Anthropic);
        }
        match last {
            "completions" | "responses" | "embeddings" => Some(Provider::OpenAi),
            _ => None,
        }
    }

    /// The OpenTelemetry GenAI `gen_ai.system` value.
    pub fn system(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gcp.gemini",
        }
    }
}

/// The JSON body's top-level `model`; `None` for a body that is not a JSON object or
/// has no string `model` (such a request is denied on a pathway with `models`).
pub fn model_from_body(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        model: Option<serde_json::Value>,
    }
    // serde would also accept a JSON array for a struct; only an object counts.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    match head.model {
        Some(serde_json::Value::String(m)) => Some(m),
        _ => None,
    }
}

/// A request body decoded per its `Content-Encoding` (bounded by `limit` decoded
/// bytes), for the stages that read it. An unknown coding is 415, a body that does not
/// decode 400, one that decodes past `limit` 413.
pub fn decoded_request_body<'a>(
    headers: &HeaderMap,
    body: &'a Bytes,
    limit: u64,
) -> Result<std::borrow::Cow<'a, [u8]>, Refusal> {
    let coding = Coding::of(headers).map_err(|e| Refusal::UnsupportedMediaType(e.to_string()))?;
    if coding == Coding::Identity {
        return Ok(std::borrow::Cow::Borrowed(body));
    }
    encoding::decode_all(coding, body, limit)
        .map(std::borrow::Cow::Owned)
        .map_err(|e| match e {
            encoding::DecodeError::TooLarge(_) => Refusal::TooLarge {
                reason: format!("request body larger than {limit} bytes once decoded"),
                limit: "max_request_body_bytes".into(),
            },
            e @ encoding::DecodeError::Invalid(_) => Refusal::BadRequest(e.to_string()),
        })
}

/// What the request phase did to a request on a pathway with a token budget.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The body to forward instead of the agent's (decoded, `include_usage` added).
    pub body: Option<Bytes>,
    /// The agent did not ask for the usage chunk: drop it from the stream.
    pub strip_usage_chunk: bool,
    /// Decoded length of the agent's body, when it was read.
    pub text_bytes: Option<u64>,
    /// The body's `model`, for the audit line.
    pub model: Option<String>,
}

/// Endpoints that stream `chat.completion.chunk`-style events and take `stream_options`.
fn takes_stream_options(path: &str) -> bool {
    path.ends_with("/chat/completions") || path.ends_with("/completions")
}

/// On a pathway with a token budget: makes an OpenAI-compatible streaming request
/// report its usage. `body` is the whole body as received; the headers are updated
/// for a rewritten body (length, coding, and identity for the response so the usage
/// chunk can be dropped from it).
pub fn prepare_request(
    path: &str,
    headers: &mut HeaderMap,
    body: &Bytes,
    limit: u64,
) -> Result<Prepared, Refusal> {
    let text = decoded_request_body(headers, body, limit)?;
    let mut prepared = Prepared {
        text_bytes: Some(text.len() as u64),
        model: model_from_body(&text),
        ..Default::default()
    };
    if !takes_stream_options(path) || Provider::for_path(path) != Some(Provider::OpenAi) {
        return Ok(prepared);
    }
    let Some(rewritten) = add_include_usage(&text) else {
        return Ok(prepared);
    };
    headers.remove(header::CONTENT_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
    // The usage chunk is dropped from the plain event stream; a compressed one could
    // not be edited.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    prepared.body = Some(Bytes::from(rewritten));
    prepared.strip_usage_chunk = true;
    Ok(prepared)
}

/// `{"stream": true, ...}` without `stream_options.include_usage: true`: the body
/// with it set (other members kept byte for byte; member order may change).
fn add_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    type Members = std::collections::BTreeMap<String, Box<RawValue>>;
    // Most requests do not stream: no need to parse those.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
        || usage::find(body, b"\"stream\"").is_none()
    {
        return None;
    }
    let mut members: Members = serde_json::from_slice(body).ok()?;
    if members.get("stream").map(|v| v.get()) != Some("true") {
        return None;
    }
    let mut options: Members = match members.get("stream_options") {
        Some(raw) if raw.get() != "null" => serde_json::from_str(raw.get()).ok()?,
        _ => Members::new(),
    };
    if options.get("include_usage").map(|v| v.get()) == Some("true") {
        return None;
    }
    options.insert(
        "include_usage".into(),
        RawValue::from_string("true".into()).ok()?,
    );
    let options = serde_json::to_string(&options).ok()?;
    members.insert(
        "stream_options".into(),
        RawValue::from_string(options).ok()?,
    );
    serde_json::to_vec(&members).ok()
}

/// The estimate charged when usage cannot be read: a token per 4 bytes of text.
pub fn estimate(request_bytes: u64, response_bytes: u64) -> Usage {
    let input = request_bytes.div_ceil(4);
    let output = response_bytes.div_ceil(4);
    let total = (input + output).max(1);
    Usage {
        input,
        output: total - input,
        total,
    }
}

/// Budgets of one admitted L7 request, charged when its exchange ends: bytes always,
/// tokens on a pathway with `llm_tokens_per_hour`.
pub struct Accounting {
    admission: Admission,
    counts: Arc<ByteCounts>,
    tokens: Option<Tokens>,
}

struct Tokens {
    prepared: Prepared,
    provider: Option<Provider>,
    response: Option<Response>,
}

/// The response side: decoder and parser, and whether the body arrived whole.
struct Response {
    status: u16,
    reader: Option<Decoder<UsageParser>>,
    ended: bool,
}

impl Accounting {
    pub fn new(admission: Admission, counts: Arc<ByteCounts>, path: &str) -> Self {
        let tokens = admission.counts_tokens().then(|| Tokens {
            prepared: Prepared::default(),
            provider: Provider::for_path(path),
            response: None,
        });
        Accounting {
            admission,
            counts,
            tokens,
        }
    }

    pub fn counts_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    pub fn set_prepared(&mut self, prepared: Prepared) {
        if let Some(t) = &mut self.tokens {
            t.prepared = prepared;
        }
    }

    /// The response headers arrived: picks the parser and the decoder. True when the
    /// usage-only chunk must be dropped from this (plain SSE) body before the agent
    /// sees it.
    pub fn response(&mut self, status: u16, headers: &HeaderMap) -> bool {
        let Some(t) = &mut self.tokens else {
            return false;
        };
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let parser = UsageParser::for_content_type(content_type);
        let sse = matches!(parser, UsageParser::Sse(_));
        let coding = Coding::of(headers).ok();
        // An unknown coding leaves the usage unread: the estimate is charged.
        let reader = coding.map(|coding| Decoder::new(coding, parser));
        t.response = Some(Response {
            status,
            reader,
            ended: false,
        });
        t.prepared.strip_usage_chunk && sse && coding == Some(Coding::Identity)
    }

    /// Response body bytes as they pass to the agent.
    pub fn feed(&mut self, data: &[u8]) {
        if let Some(Response {
            reader: Some(r), ..
        }) = self.tokens.as_mut().and_then(|t| t.response.as_mut())
        {
            r.write(data);
        }
    }

    /// The response body reached its end (not cut).
    pub fn body_ended(&mut self) {
        if let Some(r) = self.tokens.as_mut().and_then(|t| t.response.as_mut()) {
            r.ended = true;
        }
    }

    /// The exchange is over: charges the budgets and fills the audit record's LLM
    /// fields.
    pub fn finish(self, record: &mut AuditRecord) {
        let sent = self.counts.sent();
        let received = self.counts.received();
        let Some(t) = self.tokens else {
            self.admission.finish(sent + received, None);
            return;
        };
        // Nothing reached the upstream (it could not be dialled): nothing to charge.
        if sent == 0 && t.response.is_none() {
            self.admission.finish(0, None);
            return;
        }
        let request_bytes = t.prepared.text_bytes.unwrap_or(0).max(sent);
        let mut provider = t.provider;
        let (found, complete, response_bytes) = match t.response {
            Some(mut r) => {
                let decoded = r.reader.as_mut().is_some_and(|d| d.finish());
                let (found, text) = match r.reader.as_mut().and_then(|d| d.sink_mut()) {
                    Some(p) => (p.finish(), p.bytes()),
                    None => (Found::default(), 0),
                };
                let complete = decoded && r.ended && (200..300).contains(&r.status);
                (found, complete, text.max(received))
            }
            None => (Found::default(), false, received),
        };
        provider = provider.or(found.provider);
        let reported = found.usage().filter(|_| complete);
        let (usage, source) = match reported {
            Some(u) => (u, "reported"),
            None => {
                // Whatever a cut stream reported so far is the least it cost.
                let mut e = estimate(request_bytes, response_bytes);
                if let Some(partial) = found.usage().filter(|p| p.total > e.total) {
                    e = partial;
                }
                (e, "estimated")
            }
        };
        record.llm_provider = provider.map(Provider::system);
        if record.llm_model.is_none() {
            record.llm_model = t.prepared.model;
        }
        record.llm_response_model = found.model;
        record.llm_input_tokens = Some(usage.input);
        record.llm_output_tokens = Some(usage.output);
        record.llm_total_tokens = Some(usage.total);
        record.llm_usage_source = Some(source);
        self.admission.finish(sent + received, Some(usage.total));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_read_from_json_objects_only() {
        assert_eq!(
            model_from_body(br#"{"model":"gpt-4o-mini","messages":[]}"#).as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(model_from_body(br#"{"messages":[]}"#), None);
        assert_eq!(model_from_body(br#"{"model":42}"#), None);
        assert_eq!(model_from_body(b"model=gpt-4o"), None);
        assert_eq!(model_from_body(br#"["model"]"#), None);
    }

    #[test]
    fn providers_by_path() {
        assert_eq!(
            Provider::for_path("/v1/chat/completions"),
            Some(Provider::OpenAi)
        );
        assert_eq!(
            Provider::for_path("/v1/completions"),
            Some(Provider::OpenAi)
        );
        assert_eq!(Provider::for_path("/v1/responses"), Some(Provider::OpenAi));
        assert_eq!(Provider::for_path("/v1/embeddings"), Some(Provider::OpenAi));
        assert_eq!(
            Provider::for_path("/v1/messages"),
            Some(Provider::Anthropic)
        );
        assert_eq!(
            Provider::for_path("/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
            Some(Provider::Gemini)
        );
        assert_eq!(Provider::for_path("/v1/models"), None);
    }

    #[test]
    fn include_usage_is_added_only_where_missing() {
        let body = br#"{"model":"m","stream":true,"temperature":0.70000000000000001,"messages":[{"role":"user","content":"hi"}]}"#;
        let out = add_include_usage(body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // Values are kept byte for byte.
        assert!(String::from_utf8_lossy(&out).contains("0.70000000000000001"));
        let with_options = br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let v: serde_json::Value =
            serde_json::from_slice(&add_include_usage(with_options).unwrap()).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert_eq!(
            add_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
        assert_eq!(add_include_usage(br#"{"stream":false}"#), None);
        assert_eq!(add_include_usage(br#"{"model":"m"}"#), None);
        assert_eq!(add_include_usage(b"[1]"), None);
    }

    #[test]
    fn a_streaming_request_is_rewritten_with_its_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(10u32));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate"),
        );
        let body = Bytes::from_static(br#"{"model":"m","stream":true}"#);
        let p = prepare_request("/v1/chat/completions", &mut h, &body, 1 << 20).unwrap();
        let new = p.body.unwrap();
        assert!(p.strip_usage_chunk);
        assert_eq!(h[header::CONTENT_LENGTH], new.len().to_string().as_str());
        assert_eq!(h[header::ACCEPT_ENCODING], "identity");
        // Not a chat endpoint: untouched.
        let p = prepare_request("/v1/messages", &mut HeaderMap::new(), &body, 1 << 20).unwrap();
        assert!(p.body.is_none() && !p.strip_usage_chunk);
        assert_eq!(p.text_bytes, Some(body.len() as u64));
    }

    #[test]
    fn the_estimate_is_a_token_per_four_bytes_and_never_zero() {
        assert_eq!(estimate(0, 0).total, 1);
        assert_eq!(estimate(4, 0).total, 1);
        assert_eq!(
            estimate(5, 8),
            Usage {
                input: 2,
                output: 2,
                total: 4
            }
        );
        assert_eq!(estimate(4000, 400).total, 1100);
    }
}
