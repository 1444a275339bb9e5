//! OpenAI-compatible traffic: the request body's `model`, and the `usage` a response
//! reports (a JSON body, or the last SSE event that carries it) for token budgets.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::exchange::ByteCounts;
use crate::limits::Admission;

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

/// `usage.total_tokens`, or prompt + completion tokens, of one JSON object.
fn usage_tokens(v: &serde_json::Value) -> Option<u64> {
    let usage = v.get("usage")?;
    if let Some(t) = usage.get("total_tokens").and_then(|t| t.as_u64()) {
        return Some(t);
    }
    let part = |k: &str| usage.get(k).and_then(|t| t.as_u64()).unwrap_or(0);
    let sum = part("prompt_tokens") + part("completion_tokens");
    (sum > 0).then_some(sum)
}

/// A JSON response larger than this is not parsed for `usage` (nothing is charged).
const MAX_JSON_USAGE_BODY: usize = 8 * 1024 * 1024;
/// An SSE line longer than this is skipped.
const MAX_SSE_LINE: usize = 1024 * 1024;

/// Reads `usage` from a response body as it streams past.
#[derive(Debug)]
pub enum UsageParser {
    Json {
        buf: Vec<u8>,
        overflow: bool,
    },
    Sse {
        line: Vec<u8>,
        skipping: bool,
        last: Option<u64>,
    },
}

impl UsageParser {
    /// By the response's content type: `text/event-stream` is SSE, anything else JSON.
    pub fn for_content_type(content_type: Option<&str>) -> Self {
        let sse = content_type.is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        });
        if sse {
            UsageParser::Sse {
                line: Vec::new(),
                skipping: false,
                last: None,
            }
        } else {
            UsageParser::Json {
                buf: Vec::new(),
                overflow: false,
            }
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        match self {
            UsageParser::Json { buf, overflow } => {
                if !*overflow {
                    if buf.len() + data.len() > MAX_JSON_USAGE_BODY {
                        *overflow = true;
                        buf.clear();
                    } else {
                        buf.extend_from_slice(data);
                    }
                }
            }
            UsageParser::Sse {
                line,
                skipping,
                last,
            } => {
                while !data.is_empty() {
                    match data.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            if !*skipping {
                                line.extend_from_slice(&data[..i]);
                                if let Some(t) = sse_line_usage(line) {
                                    *last = Some(t);
                                }
                            }
                            line.clear();
                            *skipping = false;
                            data = &data[i + 1..];
                        }
                        None => {
                            if !*skipping {
                                line.extend_from_slice(data);
                                if line.len() > MAX_SSE_LINE {
                                    line.clear();
                                    *skipping = true;
                                }
                            }
                            data = &[];
                        }
                    }
                }
            }
        }
    }

    /// The tokens the response reported, if it reported any.
    pub fn finish(&mut self) -> Option<u64> {
        match self {
            UsageParser::Json { buf, overflow } => {
                if *overflow {
                    return None;
                }
                let v: serde_json::Value = serde_json::from_slice(buf).ok()?;
                usage_tokens(&v)
            }
            UsageParser::Sse { line, last, .. } => {
                if let Some(t) = sse_line_usage(line) {
                    *last = Some(t);
                }
                *last
            }
        }
    }
}

/// `data: {...}` with a `usage` object; `data: [DONE]` and other fields are not.
fn sse_line_usage(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    usage_tokens(&v)
}

pin_project_lite::pin_project! {
    /// The response body of a limited pathway: feeds `usage` parsing and, when the
    /// body ends or is dropped, charges the bytes and tokens it moved and gives the
    /// concurrency slot back.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        guard: Charge,
    }
}

struct Charge {
    admission: Option<Admission>,
    counts: std::sync::Arc<ByteCounts>,
    usage: Option<UsageParser>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            let tokens = self.usage.as_mut().and_then(UsageParser::finish);
            a.finish(self.counts.sent() + self.counts.received(), tokens);
        }
    }
}

impl<B> LimitedBody<B> {
    pub fn new(
        inner: B,
        admission: Admission,
        counts: std::sync::Arc<ByteCounts>,
        usage: Option<UsageParser>,
    ) -> Self {
        LimitedBody {
            inner,
            guard: Charge {
                admission: Some(admission),
                counts,
                usage,
            },
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let (Some(data), Some(u)) = (frame.data_ref(), this.guard.usage.as_mut()) {
                u.feed(data);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
    fn json_usage() {
        let mut p = UsageParser::for_content_type(Some("application/json"));
        let body =
            br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        p.feed(&body[..10]);
        p.feed(&body[10..]);
        assert_eq!(p.finish(), Some(42));
        let mut p = UsageParser::for_content_type(None);
        p.feed(br#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#);
        assert_eq!(p.finish(), Some(5));
        let mut p = UsageParser::for_content_type(None);
        p.feed(b"not json");
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn sse_usage_from_the_event_that_carries_it() {
        let mut p = UsageParser::for_content_type(Some("text/event-stream; charset=utf-8"));
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\r\n\r\n\
                      data: [DONE]\n\n";
        // Split across chunk boundaries in awkward places.
        for chunk in stream.as_bytes().chunks(7) {
            p.feed(chunk);
        }
        assert_eq!(p.finish(), Some(12));
    }
}
