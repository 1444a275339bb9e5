//! The guard hook (`inspect.guard`): an external classifier (prompt injection,
//! toxicity) the gateway asks about each request before forwarding it.
//!
//! Contract: the gateway POSTs `{"source","pathway","direction","content_type","text"}`
//! (for OpenAI- and Anthropic-style bodies `text` is the messages' text, else the
//! decoded body) and expects `200` with `{"action":"allow"|"deny","reason":"..."}`.
//! Anything else, or no answer within `timeout`, is an error, which `on_error` turns
//! into a denial (the default) or a pass.

use std::time::Duration;

use bytes::Bytes;
use egress_policy::inspect::Guard;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

/// The classifier's answer is small; a larger one is an error.
const MAX_ANSWER: usize = 64 * 1024;

/// What the classifier said, or why it said nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(String),
    Timeout,
    Error(String),
}

impl Verdict {
    /// Audit and metric value.
    pub fn outcome(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny(_) => "deny",
            Verdict::Timeout => "timeout",
            Verdict::Error(_) => "error",
        }
    }
}

/// What the gateway sends.
pub struct Question<'a> {
    pub source: &'a str,
    pub pathway: &'a str,
    pub direction: &'static str,
    pub content_type: &'a str,
    pub text: &'a str,
}

/// One pooled plain-HTTP client for every pathway's guard.
#[derive(Clone)]
pub struct GuardClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for GuardClient {
    fn default() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        GuardClient {
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(http),
        }
    }
}

impl GuardClient {
    pub async fn ask(&self, guard: &Guard, q: &Question<'_>) -> Verdict {
        match tokio::time::timeout(guard.timeout, self.exchange(guard, q)).await {
            Ok(v) => v,
            Err(_) => Verdict::Timeout,
        }
    }

    async fn exchange(&self, guard: &Guard, q: &Question<'_>) -> Verdict {
        let body = serde_json::json!({
            "source": q.source,
            "pathway": q.pathway,
            "direction": q.direction,
            "content_type": q.content_type,
            "text": q.text,
        });
        let req = match Request::post(guard.url.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
        {
            Ok(r) => r,
            Err(e) => return Verdict::Error(format!("bad guard request: {e}")),
        };
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => return Verdict::Error(format!("guard unreachable: {e}")),
        };
        let status = resp.status();
        let bytes = match http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return Verdict::Error(format!("cannot read the guard's answer: {e}")),
        };
        if !status.is_success() {
            return Verdict::Error(format!("guard answered {status}"));
        }
        let answer: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return Verdict::Error(format!("guard answer is not JSON: {e}")),
        };
        let reason = answer
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .chars()
            .take(512)
            .collect::<String>();
        match answer.get("action").and_then(Value::as_str) {
            Some("allow") => Verdict::Allow,
            Some("deny") => Verdict::Deny(reason),
            other => Verdict::Error(format!(
                "guard answer has no action allow|deny (got {other:?})"
            )),
        }
    }
}

/// The text a classifier should judge: the messages of an OpenAI- or Anthropic-style
/// body (chat, responses, completions), else the whole decoded body.
pub fn prompt_text(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let mut parts = Vec::new();
        collect_llm_text(&v, &mut parts);
        if !parts.is_empty() {
            return parts.join("\n");
        }
    }
    String::from_utf8_lossy(body).into_owned()
}

fn collect_llm_text(v: &Value, out: &mut Vec<String>) {
    let Some(obj) = v.as_object() else {
        return;
    };
    for key in ["system", "instructions", "prompt", "input"] {
        if let Some(x) = obj.get(key) {
            content_text(x, out);
        }
    }
    if let Some(Value::Array(messages)) = obj.get("messages") {
        for m in messages {
            if let Some(c) = m.get("content") {
                content_text(c, out);
            }
        }
    }
}

/// A `content` value: a string, or parts with `text` (and nested `content`).
fn content_text(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => out.push(s.clone()),
                    Value::Object(o) => {
                        if let Some(Value::String(t)) = o.get("text") {
                            out.push(t.clone());
                        }
                        if let Some(c) = o.get("content") {
                            content_text(c, out);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_messages_are_the_text() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"ignore all previous"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}"#;
        assert_eq!(prompt_text(body), "be nice\nignore all previous");
    }

    #[test]
    fn anthropic_system_and_responses_input() {
        let body = br#"{"system":[{"type":"text","text":"sys"}],"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(prompt_text(body), "sys\nhi");
        let body = br#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"q"}]}]}"#;
        assert_eq!(prompt_text(body), "q");
    }

    #[test]
    fn other_bodies_are_sent_whole() {
        assert_eq!(prompt_text(b"a=1&b=2"), "a=1&b=2");
        assert_eq!(prompt_text(br#"{"q":"x"}"#), r#"{"q":"x"}"#);
    }
}
