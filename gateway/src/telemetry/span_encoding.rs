//! OTLP trace messages in protobuf (`opentelemetry/proto/trace/v1/trace.proto` and the
//! `common`, `resource` and `collector` messages it uses), written straight from the
//! request's values.
//!
//! A span's attributes are encoded as they are set, into one buffer, and the span is
//! encoded into the batch it is exported with: no SDK span, no per-attribute key or
//! value copies, no conversion into generated message types before encoding. Export
//! is the gateway's largest per-request cost after TLS; this keeps it to one buffer
//! per span. Unit tests decode every message with the generated `opentelemetry-proto`
//! types.

use prost::encoding::{encode_varint, encoded_len_varint};

/// Protobuf wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// `Span.SpanKind.SPAN_KIND_SERVER`: the gateway serves the agent's request.
const SPAN_KIND_SERVER: u64 = 2;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u64 = 2;
/// `SpanFlags`: the low byte is the W3C trace flags; these say whether the parent is
/// remote (an agent's `traceparent`) or absent.
const SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const SPAN_FLAGS_CONTEXT_IS_REMOTE: u32 = 0x200;

fn tag(buf: &mut Vec<u8>, field: u64, wire: u64) {
    encode_varint((field << 3) | wire, buf);
}

fn tag_len(field: u64) -> usize {
    encoded_len_varint(field << 3)
}

/// The size of a length-delimited field holding `len` bytes.
fn len_field(field: u64, len: usize) -> usize {
    tag_len(field) + encoded_len_varint(len as u64) + len
}

fn bytes_field(buf: &mut Vec<u8>, field: u64, value: &[u8]) {
    tag(buf, field, LEN);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

/// Opens a length-delimited field whose `len` bytes the caller writes next.
fn open(buf: &mut Vec<u8>, field: u64, len: usize) {
    tag(buf, field, LEN);
    encode_varint(len as u64, buf);
}

/// `KeyValue` fields (`repeated KeyValue attributes`, field 9 of `Span` and field 1 of
/// `Resource`), written as they are set.
#[derive(Debug, Default)]
pub struct Attributes {
    buf: Vec<u8>,
    field: u64,
}

impl Attributes {
    /// A span's attributes.
    pub fn for_span() -> Self {
        Attributes {
            // Room for a typical request's attributes without regrowth.
            buf: Vec::with_capacity(768),
            field: 9,
        }
    }

    fn for_resource() -> Self {
        Attributes {
            buf: Vec::new(),
            field: 1,
        }
    }

    pub fn str(&mut self, key: &str, value: &str) {
        self.parts(key, &[value]);
    }

    /// A string value given in pieces, so that it need not be assembled first.
    pub fn parts(&mut self, key: &str, parts: &[&str]) {
        let value_len: usize = parts.iter().map(|p| p.len()).sum();
        // AnyValue { string string_value = 1; }
        self.key_value(key, len_field(1, value_len));
        open(&mut self.buf, 1, value_len);
        for p in parts {
            self.buf.extend_from_slice(p.as_bytes());
        }
    }

    pub fn int(&mut self, key: &str, value: i64) {
        // AnyValue { int64 int_value = 3; }: negative numbers take ten bytes, as in
        // protobuf's int64.
        let v = value as u64;
        self.key_value(key, tag_len(3) + encoded_len_varint(v));
        tag(&mut self.buf, 3, VARINT);
        encode_varint(v, &mut self.buf);
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        // AnyValue { bool bool_value = 2; }
        self.key_value(key, tag_len(2) + 1);
        tag(&mut self.buf, 2, VARINT);
        self.buf.push(u8::from(value));
    }

    /// The `KeyValue` up to its value's `AnyValue` body, which is `any_len` bytes.
    fn key_value(&mut self, key: &str, any_len: usize) {
        // KeyValue { string key = 1; AnyValue value = 2; }
        let kv_len = len_field(1, key.len()) + len_field(2, any_len);
        open(&mut self.buf, self.field, kv_len);
        bytes_field(&mut self.buf, 1, key.as_bytes());
        open(&mut self.buf, 2, any_len);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// A finished span, as `ScopeSpans.spans` (field 2) encodes it.
pub struct SpanFields<'a> {
    pub trace_id: &'a [u8; 16],
    pub span_id: &'a [u8; 8],
    /// The agent's span, from its `traceparent`.
    pub remote_parent: Option<&'a [u8; 8]>,
    pub sampled: bool,
    pub name: &'a str,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: &'a Attributes,
    /// Set when the request failed on the gateway's side (a 5xx).
    pub error: Option<&'a str>,
}

impl SpanFields<'_> {
    /// Appends the span to `out`, a batch of `ScopeSpans.spans` fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let status_len = self.error.map(|m| len_field(2, m.len()) + tag_len(3) + 1);
        let span_len = len_field(1, 16)
            + len_field(2, 8)
            + self.remote_parent.map_or(0, |_| len_field(4, 8))
            + len_field(5, self.name.len())
            + tag_len(6)
            + encoded_len_varint(SPAN_KIND_SERVER)
            + (tag_len(7) + 8)
            + (tag_len(8) + 8)
            + self.attributes.len()
            + status_len.map_or(0, |l| len_field(15, l))
            + (tag_len(16) + 4);
        out.reserve(len_field(2, span_len));
        open(out, 2, span_len);
        bytes_field(out, 1, self.trace_id);
        bytes_field(out, 2, self.span_id);
        if let Some(parent) = self.remote_parent {
            bytes_field(out, 4, parent);
        }
        bytes_field(out, 5, self.name.as_bytes());
        tag(out, 6, VARINT);
        encode_varint(SPAN_KIND_SERVER, out);
        tag(out, 7, FIXED64);
        out.extend_from_slice(&self.start_unix_nanos.to_le_bytes());
        tag(out, 8, FIXED64);
        out.extend_from_slice(&self.end_unix_nanos.to_le_bytes());
        out.extend_from_slice(&self.attributes.buf);
        if let (Some(message), Some(len)) = (self.error, status_len) {
            // Status { string message = 2; StatusCode code = 3; }
            open(out, 15, len);
            bytes_field(out, 2, message.as_bytes());
            tag(out, 3, VARINT);
            encode_varint(STATUS_CODE_ERROR, out);
        }
        let mut flags = u32::from(self.sampled) | SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE;
        if self.remote_parent.is_some() {
            flags |= SPAN_FLAGS_CONTEXT_IS_REMOTE;
        }
        tag(out, 16, FIXED32);
        out.extend_from_slice(&flags.to_le_bytes());
    }
}

/// What every export request says about its spans' origin: the `Resource` (the
/// service) and the `InstrumentationScope`, encoded once.
#[derive(Debug, Clone)]
pub struct Origin {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Origin {
    pub fn new(service_name: &str) -> Self {
        let mut attributes = Attributes::for_resource();
        attributes.str("service.name", service_name);
        attributes.str("service.version", env!("CARGO_PKG_VERSION"));
        // InstrumentationScope { string name = 1; string version = 2; }
        let mut scope = Vec::new();
        bytes_field(&mut scope, 1, b"egress-gateway");
        bytes_field(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
        Origin {
            resource: attributes.buf,
            scope,
        }
    }

    /// An `ExportTraceServiceRequest` holding `spans`, a batch of `ScopeSpans.spans`
    /// fields written by [`SpanFields::encode`].
    pub fn export_request(&self, spans: &[u8]) -> Vec<u8> {
        // ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1; }
        // ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2; }
        // ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2; }
        let scope_spans_len = len_field(1, self.scope.len()) + spans.len();
        let resource_spans_len = len_field(1, self.resource.len()) + len_field(2, scope_spans_len);
        let mut out = Vec::with_capacity(len_field(1, resource_spans_len));
        open(&mut out, 1, resource_spans_len);
        bytes_field(&mut out, 1, &self.resource);
        open(&mut out, 2, scope_spans_len);
        bytes_field(&mut out, 1, &self.scope);
        out.extend_from_slice(spans);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
    use prost::Message as _;

    fn attribute<'a>(
        attrs: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
        key: &str,
    ) -> &'a Value {
        let kv = attrs.iter().find(|kv| kv.key == key).unwrap();
        kv.value.as_ref().unwrap().value.as_ref().unwrap()
    }

    /// What the gateway writes is what the generated OTLP types read, field by field.
    #[test]
    fn the_generated_otlp_types_decode_every_field() {
        let long = "x".repeat(300);
        let mut attrs = Attributes::for_span();
        attrs.str("http.request.method", "GET");
        attrs.parts(
            "url.full",
            &["https", "://", "api.example.com", ":443", "/v1/x"],
        );
        attrs.str("egress.rule", "");
        attrs.str("long", &long);
        // Lengths are in bytes: an MCP tool name or a model can be any UTF-8.
        attrs.str("mcp.tool.name", "ツール_résumé");
        attrs.int("server.port", 443);
        attrs.int("negative", -7);
        attrs.int("big", i64::MAX);
        attrs.bool("egress.enforced", true);
        attrs.bool("egress.tls_intercepted", false);

        let mut batch = Vec::new();
        let parent = [9u8; 8];
        SpanFields {
            trace_id: &[1; 16],
            span_id: &[2; 8],
            remote_parent: Some(&parent),
            sampled: true,
            name: "GET",
            start_unix_nanos: 1_700_000_000_000_000_001,
            end_unix_nanos: 1_700_000_000_000_500_000,
            attributes: &attrs,
            error: Some("upstream connect failed"),
        }
        .encode(&mut batch);
        SpanFields {
            trace_id: &[3; 16],
            span_id: &[4; 8],
            remote_parent: None,
            sampled: true,
            name: "CONNECT",
            start_unix_nanos: 5,
            end_unix_nanos: 6,
            attributes: &Attributes::for_span(),
            error: None,
        }
        .encode(&mut batch);

        let body = Origin::new("gw-test").export_request(&batch);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(request.resource_spans.len(), 1);
        let rs = &request.resource_spans[0];
        let resource = rs.resource.as_ref().unwrap();
        assert_eq!(
            attribute(&resource.attributes, "service.name"),
            &Value::StringValue("gw-test".into())
        );
        let scope_spans = &rs.scope_spans[0];
        assert_eq!(scope_spans.scope.as_ref().unwrap().name, "egress-gateway");
        let spans = &scope_spans.spans;
        assert_eq!(spans.len(), 2);

        let s = &spans[0];
        assert_eq!(s.trace_id, vec![1; 16]);
        assert_eq!(s.span_id, vec![2; 8]);
        assert_eq!(s.parent_span_id, vec![9; 8]);
        assert_eq!(s.name, "GET");
        assert_eq!(s.kind, SpanKind::Server as i32);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_000_000_001);
        assert_eq!(s.end_time_unix_nano, 1_700_000_000_000_500_000);
        assert_eq!(s.flags, 0x301);
        let status = s.status.as_ref().unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "upstream connect failed");
        let a = &s.attributes;
        assert_eq!(a.len(), 10);
        assert_eq!(
            attribute(a, "mcp.tool.name"),
            &Value::StringValue("ツール_résumé".into())
        );
        assert_eq!(
            attribute(a, "http.request.method"),
            &Value::StringValue("GET".into())
        );
        assert_eq!(
            attribute(a, "url.full"),
            &Value::StringValue("https://api.example.com:443/v1/x".into())
        );
        assert_eq!(
            attribute(a, "egress.rule"),
            &Value::StringValue(String::new())
        );
        assert_eq!(attribute(a, "long"), &Value::StringValue(long));
        assert_eq!(attribute(a, "server.port"), &Value::IntValue(443));
        assert_eq!(attribute(a, "negative"), &Value::IntValue(-7));
        assert_eq!(attribute(a, "big"), &Value::IntValue(i64::MAX));
        assert_eq!(attribute(a, "egress.enforced"), &Value::BoolValue(true));
        assert_eq!(
            attribute(a, "egress.tls_intercepted"),
            &Value::BoolValue(false)
        );

        let s = &spans[1];
        assert_eq!(s.name, "CONNECT");
        assert!(s.parent_span_id.is_empty());
        assert!(s.status.is_none());
        assert!(s.attributes.is_empty());
        assert_eq!(s.flags, 0x101);
    }

    /// An empty batch is still a well-formed request.
    #[test]
    fn an_empty_batch_decodes() {
        let body = Origin::new("gw").export_request(&[]);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert!(request.resource_spans[0].scope_spans[0].spans.is_empty());
    }
}
