//! Token usage and model as responses report them, read as the body streams past:
//!
//! - OpenAI Chat Completions, Completions and Embeddings: `usage.prompt_tokens`,
//!   `completion_tokens`, `total_tokens` (streams: the last chunk, with
//!   `stream_options.include_usage`);
//! - OpenAI Responses: `usage.input_tokens`, `output_tokens`, `total_tokens` (streams:
//!   the `response.completed` event's `response.usage`);
//! - Anthropic Messages: `usage.input_tokens`, `output_tokens` and the cache tokens
//!   (streams: `message_start`'s `message.usage`, then `message_delta`'s cumulative
//!   `usage`);
//! - Gemini: `usageMetadata` (`promptTokenCount`, `candidatesTokenCount`,
//!   `thoughtsTokenCount`, `totalTokenCount`), per object of a JSON array or SSE event.
//!
//! A JSON body is scanned, not buffered: only the top-level members that matter are
//! kept (bounded), so a response of any size is read in constant memory.

use std::io;

use serde_json::Value;

use super::Provider;

/// Token counts of one response.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub total: u64,
}

/// What the response said so far: each count is the largest reported (streams report
/// running totals), the model the last one named.
#[derive(Debug, Default, Clone)]
pub struct Found {
    input: Option<u64>,
    output: Option<u64>,
    total: Option<u64>,
    pub model: Option<String>,
    pub provider: Option<Provider>,
}

fn max_into(slot: &mut Option<u64>, v: Option<u64>) {
    if let Some(v) = v {
        *slot = Some(slot.map_or(v, |s| s.max(v)));
    }
}

fn num(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn sum(parts: [Option<u64>; 2]) -> Option<u64> {
    match parts {
        [None, None] => None,
        [a, b] => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

impl Found {
    /// Reads one JSON object: a whole response, an array element or an SSE event.
    pub fn merge(&mut self, v: &Value) {
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.merge_usage(u);
        }
        // Anthropic `message_start`.
        if let Some(m) = v.get("message").filter(|m| m.is_object()) {
            if let Some(u) = m.get("usage").filter(|u| u.is_object()) {
                self.provider = Some(Provider::Anthropic);
                self.merge_usage(u);
            }
            self.merge_model(m.get("model"));
        }
        // OpenAI Responses events (`response.completed`, `response.incomplete`, ...).
        if let Some(r) = v.get("response").filter(|r| r.is_object()) {
            if let Some(u) = r.get("usage").filter(|u| u.is_object()) {
                self.provider.get_or_insert(Provider::OpenAi);
                self.merge_usage(u);
            }
            self.merge_model(r.get("model"));
        }
        if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
            self.provider = Some(Provider::Gemini);
            let input = sum([
                num(u, "promptTokenCount"),
                num(u, "toolUsePromptTokenCount"),
            ]);
            let output = sum([num(u, "candidatesTokenCount"), num(u, "thoughtsTokenCount")]);
            max_into(&mut self.input, input);
            max_into(&mut self.output, output);
            max_into(&mut self.total, num(u, "totalTokenCount"));
        }
        if v.get("type").and_then(Value::as_str) == Some("message") {
            self.provider = Some(Provider::Anthropic);
        }
        self.merge_model(v.get("model"));
        self.merge_model(v.get("modelVersion"));
    }

    fn merge_usage(&mut self, u: &Value) {
        // OpenAI Chat Completions, Completions, Embeddings.
        max_into(&mut self.input, num(u, "prompt_tokens"));
        max_into(&mut self.output, num(u, "completion_tokens"));
        // OpenAI Responses and Anthropic. Anthropic counts cache reads and writes apart
        // from `input_tokens`; OpenAI's cached tokens are part of `input_tokens`.
        let cache = sum([
            num(u, "cache_creation_input_tokens"),
            num(u, "cache_read_input_tokens"),
        ]);
        if cache.is_some() {
            self.provider = Some(Provider::Anthropic);
        }
        let input = match (num(u, "input_tokens"), cache) {
            (None, None) => None,
            (i, c) => Some(i.unwrap_or(0).saturating_add(c.unwrap_or(0))),
        };
        max_into(&mut self.input, input);
        max_into(&mut self.output, num(u, "output_tokens"));
        max_into(&mut self.total, num(u, "total_tokens"));
    }

    fn merge_model(&mut self, m: Option<&Value>) {
        if let Some(m) = m.and_then(Value::as_str).filter(|m| !m.is_empty()) {
            if self.model.as_deref() != Some(m) {
                self.model = Some(m.to_string());
            }
        }
    }

    /// The counts, when any were reported; the total is at least input + output.
    pub fn usage(&self) -> Option<Usage> {
        if self.input.is_none() && self.output.is_none() && self.total.is_none() {
            return None;
        }
        let input = self.input.unwrap_or(0);
        let sum = input.saturating_add(self.output.unwrap_or(0));
        let total = self.total.unwrap_or(0).max(sum);
        Some(Usage {
            input,
            output: total - input.min(total),
            total,
        })
    }
}

/// The top-level members of a JSON response that carry usage and model.
const KEYS: [&[u8]; 5] = [
    b"usage",
    b"usageMetadata",
    b"model",
    b"modelVersion",
    b"type",
];
/// A kept member's value larger than this is dropped (a usage object is tiny).
const MAX_MEMBER: usize = 64 * 1024;
/// An SSE line longer than this is skipped.
const MAX_SSE_LINE: usize = 1024 * 1024;

/// Reads usage from a response body as it streams past (decoded bytes in). Also a
/// `Write`, so a content decoder can feed it.
#[derive(Debug)]
pub enum UsageParser {
    Json(Box<JsonScan>),
    Sse(SseScan),
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
            UsageParser::Sse(SseScan::default())
        } else {
            UsageParser::Json(Box::default())
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        match self {
            UsageParser::Json(j) => j.feed(data),
            UsageParser::Sse(s) => s.feed(data),
        }
    }

    /// Bytes fed so far (decoded text).
    pub fn bytes(&self) -> u64 {
        match self {
            UsageParser::Json(j) => j.bytes,
            UsageParser::Sse(s) => s.bytes,
        }
    }

    /// What the body reported, once it has ended (or been cut).
    pub fn finish(&mut self) -> Found {
        match self {
            UsageParser::Json(j) => j.finish(),
            UsageParser::Sse(s) => s.finish(),
        }
    }
}

impl io::Write for UsageParser {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A streaming scan of a JSON object, or of a JSON array of objects (Gemini's
/// `streamGenerateContent` without `alt=sse`), keeping the [`KEYS`] members of each.
#[derive(Debug, Default)]
pub struct JsonScan {
    bytes: u64,
    depth: u32,
    /// Depth of the members read: 1 under a top-level object, 2 under an array.
    member_depth: u32,
    in_str: bool,
    escape: bool,
    /// At member depth: the next string is a key.
    expect_key: bool,
    reading_key: bool,
    key: Vec<u8>,
    /// At member depth after `:`: the next token starts a value.
    expect_value: bool,
    capture: Option<(usize, Vec<u8>)>,
    members: Vec<(usize, Vec<u8>)>,
    found: Found,
    /// Not JSON we can read (a top-level scalar).
    bad: bool,
}

impl JsonScan {
    fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        if self.bad {
            return;
        }
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            if self.in_str {
                // Fast path through string contents.
                if !self.escape && !self.reading_key {
                    let run = data[i..]
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\')
                        .unwrap_or(data.len() - i);
                    if run > 0 {
                        self.keep(&data[i..i + run]);
                        i += run;
                        continue;
                    }
                }
                self.keep(&[b]);
                if self.escape {
                    self.escape = false;
                    if self.reading_key {
                        self.push_key(b);
                    }
                } else if b == b'\\' {
                    self.escape = true;
                    if self.reading_key {
                        self.push_key(b);
                    }
                } else if b == b'"' {
                    self.in_str = false;
                    self.reading_key = false;
                } else if self.reading_key {
                    self.push_key(b);
                }
                i += 1;
                continue;
            }
            self.token(b);
            i += 1;
        }
    }

    fn push_key(&mut self, b: u8) {
        // Longer than any key kept: mark it so it matches none.
        if self.key.len() <= 16 {
            self.key.push(b);
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        if let Some((_, buf)) = &mut self.capture {
            if buf.len() + bytes.len() > MAX_MEMBER {
                self.capture = None;
            } else {
                buf.extend_from_slice(bytes);
            }
        }
    }

    /// A value starts at member depth: capture it if its key is kept.
    fn start_value(&mut self, b: u8) {
        self.expect_value = false;
        if let Some(k) = KEYS.iter().position(|k| *k == self.key.as_slice()) {
            self.capture = Some((k, vec![b]));
        }
    }

    fn end_value(&mut self) {
        if let Some(c) = self.capture.take() {
            self.members.push(c);
        }
    }

    /// One object's members are complete: read them.
    fn end_object(&mut self) {
        self.end_value();
        if self.members.is_empty() {
            return;
        }
        let mut obj = serde_json::Map::new();
        for (k, raw) in self.members.drain(..) {
            if let Ok(v) = serde_json::from_slice::<Value>(&raw) {
                let key = String::from_utf8_lossy(KEYS[k]).into_owned();
                obj.insert(key, v);
            }
        }
        self.found.merge(&Value::Object(obj));
    }

    fn token(&mut self, b: u8) {
        let at_members = self.member_depth != 0 && self.depth == self.member_depth;
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => self.keep(&[b]),
            b'"' => {
                self.in_str = true;
                if at_members && self.expect_key {
                    self.expect_key = false;
                    self.reading_key = true;
                    self.key.clear();
                } else if at_members && self.expect_value {
                    self.start_value(b);
                } else {
                    self.keep(&[b]);
                }
            }
            b'{' | b'[' => {
                if self.depth == 0 {
                    if self.member_depth != 0 {
                        // A second top-level value: not a body we read.
                        self.bad = true;
                        return;
                    }
                    self.member_depth = if b == b'{' { 1 } else { 2 };
                }
                if at_members && self.expect_value {
                    self.start_value(b);
                } else {
                    self.keep(&[b]);
                }
                self.depth += 1;
                if self.depth == self.member_depth && b == b'{' {
                    // A new object whose members are read.
                    self.expect_key = true;
                    self.members.clear();
                }
            }
            b'}' | b']' => {
                if at_members {
                    self.expect_key = false;
                    self.expect_value = false;
                    if b == b'}' {
                        self.end_object();
                    } else {
                        self.end_value();
                    }
                } else {
                    self.keep(&[b]);
                }
                self.depth = self.depth.saturating_sub(1);
            }
            b':' if at_members => self.expect_value = true,
            b',' if at_members => {
                self.end_value();
                self.expect_key = true;
            }
            _ => {
                if self.depth == 0 {
                    self.bad = true;
                } else if at_members && self.expect_value {
                    self.start_value(b);
                } else {
                    self.keep(&[b]);
                }
            }
        }
    }

    fn finish(&mut self) -> Found {
        // A body cut inside an object: what was complete still counts (the caller
        // knows the body was cut and charges at least an estimate).
        if self.depth >= self.member_depth && self.member_depth != 0 {
            self.capture = None;
            self.end_object();
        }
        self.found.clone()
    }
}

/// Server-sent events: each `data:` line that carries usage is parsed.
#[derive(Debug, Default)]
pub struct SseScan {
    bytes: u64,
    line: Vec<u8>,
    skipping: bool,
    found: Found,
}

impl SseScan {
    fn feed(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    if !self.skipping {
                        self.line.extend_from_slice(&data[..i]);
                        sse_line(&self.line, &mut self.found);
                    }
                    self.line.clear();
                    self.skipping = false;
                    data = &data[i + 1..];
                }
                None => {
                    if !self.skipping {
                        self.line.extend_from_slice(data);
                        if self.line.len() > MAX_SSE_LINE {
                            self.line.clear();
                            self.skipping = true;
                        }
                    }
                    data = &[];
                }
            }
        }
    }

    fn finish(&mut self) -> Found {
        if !self.skipping {
            sse_line(&self.line, &mut self.found);
        }
        self.line.clear();
        self.found.clone()
    }
}

/// A `data:` line's JSON, when it may carry usage (`"usage"` not null, or
/// `usageMetadata`); chunks without usage are not parsed.
fn sse_line(line: &[u8], found: &mut Found) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    if !carries_usage(data) {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        found.merge(&v);
    }
}

/// True when `"usageMetadata"` appears, or `"usage"` followed by something but `null`.
pub(super) fn carries_usage(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage";
    let mut rest = data;
    while let Some(i) = find(rest, KEY) {
        let after = &rest[i + KEY.len()..];
        if after.starts_with(b"Metadata\"") {
            return true;
        }
        if let Some(after) = after.strip_prefix(b"\"") {
            let value = after
                .iter()
                .position(|b| !matches!(b, b' ' | b'\t' | b':'))
                .map(|p| &after[p..])
                .unwrap_or_default();
            if !value.starts_with(b"null") {
                return true;
            }
        }
        rest = &rest[i + KEY.len()..];
    }
    false
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(content_type: &str, body: &[u8], chunk: usize) -> Found {
        let mut p = UsageParser::for_content_type(Some(content_type));
        for c in body.chunks(chunk) {
            p.feed(c);
        }
        p.finish()
    }

    fn usage(content_type: &str, body: &str) -> Option<Usage> {
        // Every split of the body gives the same answer.
        let whole = parse(content_type, body.as_bytes(), usize::MAX).usage();
        for chunk in [1, 3, 7] {
            assert_eq!(parse(content_type, body.as_bytes(), chunk).usage(), whole);
        }
        whole
    }

    #[test]
    fn openai_json_shapes() {
        let chat = r#"{"id":"x","object":"chat.completion","model":"gpt-4o-mini-2024","choices":[{"message":{"content":"the \"usage\" {is} [here]"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        assert_eq!(
            usage("application/json", chat),
            Some(Usage {
                input: 12,
                output: 30,
                total: 42
            })
        );
        let f = parse("application/json", chat.as_bytes(), 5);
        assert_eq!(f.model.as_deref(), Some("gpt-4o-mini-2024"));
        let embeddings = r#"{"object":"list","data":[{"embedding":[0.1,-2e-3]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            usage("application/json", embeddings),
            Some(Usage {
                input: 8,
                output: 0,
                total: 8
            })
        );
        let responses = r#"{"id":"resp_1","object":"response","model":"gpt-4.1","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4},"output_tokens":11,"total_tokens":20}}"#;
        assert_eq!(
            usage("application/json", responses),
            Some(Usage {
                input: 9,
                output: 11,
                total: 20
            })
        );
        assert_eq!(
            usage(
                "application/json",
                r#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#
            )
            .map(|u| u.total),
            Some(5)
        );
        assert_eq!(usage("application/json", "not json"), None);
        assert_eq!(
            usage("application/json", r#"{"error":{"message":"boom"}}"#),
            None
        );
        // A nested `usage` is not the response's.
        assert_eq!(
            usage(
                "application/json",
                r#"{"data":{"usage":{"total_tokens":9}}}"#
            ),
            None
        );
    }

    #[test]
    fn anthropic_json_counts_cache_tokens() {
        let body = r#"{"id":"msg","type":"message","model":"claude-haiku-4-5","content":[{"type":"text","text":"x"}],"usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":20,"output_tokens":7}}"#;
        assert_eq!(
            usage("application/json", body),
            Some(Usage {
                input: 35,
                output: 7,
                total: 42
            })
        );
        assert_eq!(
            parse("application/json", body.as_bytes(), 4).provider,
            Some(Provider::Anthropic)
        );
    }

    #[test]
    fn gemini_json_object_and_array() {
        let one = r#"{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":6,"thoughtsTokenCount":2,"totalTokenCount":12},"modelVersion":"gemini-2.0-flash"}"#;
        assert_eq!(
            usage("application/json", one),
            Some(Usage {
                input: 4,
                output: 8,
                total: 12
            })
        );
        let array = r#"[{"candidates":[],"usageMetadata":{"promptTokenCount":4}},
                        {"candidates":[],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":6,"totalTokenCount":10},"modelVersion":"gemini-2.0-flash"}]"#;
        assert_eq!(
            usage("application/json", array),
            Some(Usage {
                input: 4,
                output: 6,
                total: 10
            })
        );
        let f = parse("application/json", array.as_bytes(), 2);
        assert_eq!(f.model.as_deref(), Some("gemini-2.0-flash"));
        assert_eq!(f.provider, Some(Provider::Gemini));
    }

    #[test]
    fn sse_shapes() {
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                      data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\r\n\r\n\
                      data: [DONE]\n\n";
        assert_eq!(
            usage("text/event-stream; charset=utf-8", openai).map(|u| u.total),
            Some(12)
        );
        assert_eq!(
            usage(
                "text/event-stream",
                "data: {\"choices\":[],\"usage\":null}\n\n"
            ),
            None
        );
        let anthropic = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                         event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"x\"}}\n\n\
                         event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        assert_eq!(
            usage("text/event-stream", anthropic),
            Some(Usage {
                input: 25,
                output: 15,
                total: 40
            })
        );
        let responses = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":null}}\n\n\
                         event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":3,\"output_tokens\":4,\"total_tokens\":7}}}\n\n";
        assert_eq!(
            usage("text/event-stream", responses).map(|u| u.total),
            Some(7)
        );
        let gemini = "data: {\"usageMetadata\":{\"promptTokenCount\":3},\"modelVersion\":\"gemini-2.0-flash\"}\r\n\r\n\
                      data: {\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":9,\"totalTokenCount\":12}}\r\n\r\n";
        assert_eq!(
            usage("text/event-stream", gemini).map(|u| u.total),
            Some(12)
        );
    }

    #[test]
    fn a_huge_json_body_is_read_in_bounded_memory() {
        let mut p = UsageParser::for_content_type(Some("application/json"));
        p.feed(br#"{"id":"x","choices":[{"message":{"content":""#);
        let filler = vec![b'a'; 64 * 1024];
        for _ in 0..(10 * 16) {
            p.feed(&filler);
        }
        p.feed(br#""}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#);
        assert_eq!(p.finish().usage().map(|u| u.total), Some(3));
        assert!(p.bytes() > 10 * 1024 * 1024);
    }
}
