//! MCP pathways (Model Context Protocol over Streamable HTTP): the request phase reads
//! the JSON-RPC message or batch a `POST` carries and decides every message on its own
//! ([`egress_policy::Policy::evaluate_mcp`]); what the policy refuses never reaches the
//! server, and a refused request is answered by the gateway with a JSON-RPC error that
//! carries its `id`. The response phase filters the answers to `tools/list`,
//! `resources/list`, `resources/templates/list` and `prompts/list` (JSON or SSE) down to
//! what the pathway lists, and merges the gateway's answers into the server's.
//!
//! Requests that carry no message (the `GET` of the server's event stream, the `DELETE`
//! that ends a session) are decided as a whole and pass through, their streams filtered
//! the same way. Anything on an MCP pathway that is not valid JSON-RPC is refused.

use std::borrow::Cow;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use egress_policy::mcp::McpCall;
use egress_policy::{Decision, Mode, Pathway, RequestKind};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::encoding::{self, Coding};
use super::exchange::{ByteCounts, Exchange, McpFields};
use super::refusal::{full, Refusal};
use super::request_body::ReqBody;
use super::target::Target;
use super::{policy_headers, refuse, PeerIdentity, Proxy, ProxyBody};
use crate::telemetry::TraceContext;

/// JSON-RPC error code of a message the policy refused (implementation-defined range).
pub const POLICY_DENIED: i64 = -32001;
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const INTERNAL_ERROR: i64 = -32603;

/// A JSON response larger than this is not filtered: it is refused (fail closed).
const MAX_JSON_RESPONSE: usize = 16 * 1024 * 1024;
/// An SSE event larger than this ends the stream with an error (fail closed).
const MAX_SSE_EVENT: usize = 16 * 1024 * 1024;

/// What the request phase decided about an L7 request.
pub(super) struct Decided {
    pub ex: Exchange,
    /// The decision whose pathway's settings apply to what is forwarded.
    pub decision: Decision,
    pub body: ReqBody,
    /// How to rewrite the server's response, when it needs rewriting.
    pub plan: Option<ResponsePlan>,
}

/// What a list method's answer lists, and the field that names each item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListKind {
    Tools,
    Resources,
    ResourceTemplates,
    Prompts,
}

impl ListKind {
    fn of_method(method: &str) -> Option<ListKind> {
        match method {
            "tools/list" => Some(ListKind::Tools),
            "resources/list" => Some(ListKind::Resources),
            "resources/templates/list" => Some(ListKind::ResourceTemplates),
            "prompts/list" => Some(ListKind::Prompts),
            _ => None,
        }
    }

    fn key(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Resources => "resources",
            ListKind::ResourceTemplates => "resourceTemplates",
            ListKind::Prompts => "prompts",
        }
    }

    const ALL: [ListKind; 4] = [
        ListKind::Tools,
        ListKind::Resources,
        ListKind::ResourceTemplates,
        ListKind::Prompts,
    ];
}

/// One JSON-RPC message of a request body, borrowed from it.
struct Message<'a> {
    /// The message as the agent wrote it (what is forwarded when a batch is rebuilt).
    raw: &'a str,
    /// The message as the policy sees it; `None`: not a valid JSON-RPC 2.0 message.
    call: Option<McpCall>,
    /// The `id` as JSON text; `None` for notifications.
    id: Option<String>,
    /// A request (has `method` and `id`): it expects an answer.
    is_request: bool,
}

/// The members of a JSON-RPC message the gateway reads, as written; any other member
/// is skipped. One of these given twice makes the message invalid: a server reading
/// the other copy must never see something other than what was checked.
#[derive(Default)]
struct Envelope<'a> {
    jsonrpc: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    method: Option<&'a RawValue>,
    params: Option<Params<'a>>,
    result: Option<&'a RawValue>,
    error: Option<&'a RawValue>,
}

impl<'de> serde::Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON-RPC message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut e = Envelope::default();
                read_members(&mut m, |k, m| {
                    Ok(match k {
                        "params" => first_of(&mut e.params, m.next_value()?),
                        "jsonrpc" => first_of(&mut e.jsonrpc, m.next_value()?),
                        "id" => first_of(&mut e.id, m.next_value()?),
                        "method" => first_of(&mut e.method, m.next_value()?),
                        "result" => first_of(&mut e.result, m.next_value()?),
                        "error" => first_of(&mut e.error, m.next_value()?),
                        _ => skip(m)?,
                    })
                })?;
                Ok(e)
            }
        }
        d.deserialize_map(V)
    }
}

/// A member name, borrowed from the body unless it is written with escapes (serde's
/// own `Cow<str>` always allocates).
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads an object's members with `read`, which stores one and says whether it was
/// the first of its name; a member given twice is an error.
fn read_members<'de, A, F>(m: &mut A, mut read: F) -> Result<(), A::Error>
where
    A: serde::de::MapAccess<'de>,
    F: FnMut(&str, &mut A) -> Result<bool, A::Error>,
{
    while let Some(Key(k)) = m.next_key::<Key<'de>>()? {
        if !read(&k, m)? {
            return Err(serde::de::Error::custom("duplicate key"));
        }
    }
    Ok(())
}

/// Stores a member's value; false when the member was already given.
fn first_of<T>(slot: &mut Option<T>, value: T) -> bool {
    slot.replace(value).is_none()
}

/// Skips a member the gateway does not read.
fn skip<'de, A: serde::de::MapAccess<'de>>(m: &mut A) -> Result<bool, A::Error> {
    m.next_value::<serde::de::IgnoredAny>()?;
    Ok(true)
}

/// `params` members a call is decided on, as written; duplicates are refused.
/// `params` that is not an object (JSON-RPC allows an array) names nothing.
#[derive(Default)]
struct Params<'a> {
    name: Option<&'a RawValue>,
    uri: Option<&'a RawValue>,
    arguments: Option<&'a RawValue>,
}

impl<'de> serde::Deserialize<'de> for Params<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Params<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON-RPC params")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut p = Params::default();
                read_members(&mut m, |k, m| {
                    Ok(match k {
                        "name" => first_of(&mut p.name, m.next_value()?),
                        "uri" => first_of(&mut p.uri, m.next_value()?),
                        "arguments" => first_of(&mut p.arguments, m.next_value()?),
                        _ => skip(m)?,
                    })
                })?;
                Ok(p)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Params::default())
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Params::default())
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Params::default())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Params::default())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Params::default())
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Params::default())
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Params::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// What a raw JSON value is, by its first byte.
fn is_string(raw: &RawValue) -> bool {
    raw.get().starts_with('"')
}

fn is_number(raw: &RawValue) -> bool {
    raw.get()
        .starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

fn as_string(raw: Option<&RawValue>) -> Option<String> {
    as_str(raw).map(Cow::into_owned)
}

/// A string value, borrowed when it is written without escapes.
fn as_str(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let text = raw.filter(|r| is_string(r))?.get();
    match text.get(1..text.len() - 1) {
        Some(inner) if !inner.contains('\\') => Some(Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
    }
}

/// A string or number `id` as JSON text in one spelling (what serde_json writes), so
/// the server's answer is matched however either side escaped it; `None` for any
/// other type.
fn normalized_id(id: &RawValue) -> Option<String> {
    let text = id.get();
    // Already in that spelling: a string without escapes, or a plain integer.
    let plain_string = is_string(id) && !text.contains('\\');
    let digits = text.strip_prefix('-').unwrap_or(text);
    let plain_integer = !digits.is_empty()
        && digits.len() <= 18
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    if plain_string || plain_integer {
        return Some(text.to_owned());
    }
    if !(is_string(id) || is_number(id)) {
        return None;
    }
    serde_json::from_str::<Value>(text)
        .ok()
        .map(|v| v.to_string())
}

impl<'a> Message<'a> {
    fn read(raw: &'a str, with_arguments: bool) -> Message<'a> {
        let envelope = serde_json::from_str::<Envelope<'a>>(raw).ok();
        Message::from_envelope(raw, envelope, with_arguments)
    }

    /// `envelope`: `raw` read, or `None` when it is not a JSON-RPC message object.
    /// `with_arguments`: read `params.arguments` (only a `when` ever sees them).
    fn from_envelope(
        raw: &'a str,
        envelope: Option<Envelope<'a>>,
        with_arguments: bool,
    ) -> Message<'a> {
        let invalid = |id: Option<String>| Message {
            raw,
            call: None,
            id,
            is_request: false,
        };
        let Some(e) = envelope else {
            return invalid(None);
        };
        let version_ok = e
            .jsonrpc
            .is_some_and(|v| v.get() == "\"2.0\"" || as_string(Some(v)).as_deref() == Some("2.0"));
        // MCP ids are strings or numbers, never null; the text is normalized so an
        // answer's `id` compares equal however it was escaped.
        let id = e.id.map(|id| normalized_id(id).ok_or(()));
        let answers = e.result.is_some() || e.error.is_some();
        let method = e.method.map(|m| as_string(Some(m)).ok_or(()));
        let valid = version_ok
            && !matches!(id, Some(Err(())))
            && match &method {
                Some(m) => m.is_ok() && !answers,
                None => matches!(id, Some(Ok(_))) && answers,
            };
        let id = id.and_then(Result::ok);
        if !valid {
            // An invalid message still carries its id into the gateway's error answer.
            return invalid(id);
        }
        let is_request = method.is_some() && id.is_some();
        let method = method.and_then(Result::ok).unwrap_or_default();
        // Members of the wrong type count as none.
        let params = e.params.unwrap_or_default();
        let name = match method.as_str() {
            egress_policy::mcp::TOOLS_CALL | egress_policy::mcp::PROMPTS_GET => {
                as_string(params.name)
            }
            egress_policy::mcp::RESOURCES_READ | egress_policy::mcp::RESOURCES_SUBSCRIBE => {
                as_string(params.uri)
            }
            _ => None,
        };
        let arguments = match method.as_str() {
            egress_policy::mcp::TOOLS_CALL | egress_policy::mcp::PROMPTS_GET if with_arguments => {
                params
                    .arguments
                    .and_then(|a| {
                        serde_json::from_str::<serde_json::Map<String, Value>>(a.get()).ok()
                    })
                    .unwrap_or_default()
            }
            _ => serde_json::Map::new(),
        };
        Message {
            raw,
            is_request,
            id,
            call: Some(McpCall {
                method,
                name,
                arguments,
            }),
        }
    }

    /// Audit fields; `aimed` is the MCP pathway the request is aimed at, whose lists
    /// label a denied tool (a denial carries no pathway).
    fn fields(&self, decision: &Decision, aimed: Option<&Pathway>) -> McpFields {
        let call = self.call.as_ref();
        let tool = call.and_then(McpCall::tool);
        McpFields {
            method: call.map(|c| c.method.clone()).filter(|m| !m.is_empty()),
            tool: tool.map(str::to_owned),
            request_id: self.id.clone(),
            tool_label: tool.map(|t| tool_label(t, decision, aimed)),
        }
    }

    /// [`Message::fields`] of a message no longer needed: its strings move.
    fn into_fields(self, decision: &Decision, aimed: Option<&Pathway>) -> McpFields {
        let tool_label = self
            .call
            .as_ref()
            .and_then(McpCall::tool)
            .map(|t| tool_label(t, decision, aimed));
        let (method, tool) = match self.call {
            Some(c) => {
                let tool = c.tool().is_some().then_some(c.name).flatten();
                (Some(c.method).filter(|m| !m.is_empty()), tool)
            }
            None => (None, None),
        };
        McpFields {
            method,
            tool,
            request_id: self.id,
            tool_label,
        }
    }
}

/// The metric label of a called tool: the policy's entry that allows it (only names the
/// policy wrote become label values), else `other`.
fn tool_label(tool: &str, decision: &Decision, aimed: Option<&Pathway>) -> String {
    decision
        .pathway
        .as_deref()
        .or(aimed)
        .and_then(|p| p.mcp.as_ref())
        .and_then(|r| r.tool_entry(tool))
        .unwrap_or("other")
        .to_owned()
}

/// The JSON-RPC messages of a body: one, or a batch. `None`: not JSON-RPC at all.
fn read_messages(body: &[u8], with_arguments: bool) -> Option<(Vec<Message<'_>>, bool)> {
    match body.iter().find(|b| !b.is_ascii_whitespace())? {
        b'[' => {
            let items: Vec<&RawValue> = serde_json::from_slice(body).ok()?;
            (!items.is_empty()).then(|| {
                (
                    items
                        .into_iter()
                        .map(|m| Message::read(m.get(), with_arguments))
                        .collect(),
                    true,
                )
            })
        }
        b'{' => {
            // One message, read in place: a body that does not read as a message is
            // still one (invalid) if it is JSON at all.
            let text = std::str::from_utf8(body).ok()?.trim();
            let envelope = match serde_json::from_str::<Envelope<'_>>(text) {
                Ok(e) => Some(e),
                Err(_) => {
                    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
                    None
                }
            };
            Some((
                vec![Message::from_envelope(text, envelope, with_arguments)],
                false,
            ))
        }
        _ => None,
    }
}

/// A JSON-RPC error answer.
fn rpc_error(id: Option<&str>, code: i64, message: String, data: Value) -> Value {
    let id = id
        .and_then(|i| serde_json::from_str::<Value>(i).ok())
        .unwrap_or(Value::Null);
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
}

/// The answer to a message the policy refused: the reason, the rule, the trace.
fn denial_error(id: Option<&str>, d: &Decision, trace_id: &str) -> Value {
    rpc_error(
        id,
        POLICY_DENIED,
        format!("egress denied: {}", d.reason),
        json!({
            "type": "egress_denied",
            "code": d.reason.code(),
            "rule": d.rule,
            "trace_id": trace_id,
        }),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let bytes = Bytes::from(body.to_string());
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Answers the request without the server and writes its audit line(s).
fn answer(ex: Exchange, status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let response = json_response(status, body);
    ex.finish(status.as_u16(), &ByteCounts::new(), None);
    response
}

fn is_empty_body(body: &ReqBody) -> bool {
    match body {
        ReqBody::Buffered(b) => b.is_empty(),
        _ => false,
    }
}

impl Proxy {
    /// The body bound for MCP messages and the MCP pathway the request is aimed at,
    /// when some pathway's `mcp` may decide.
    fn mcp_target(
        &self,
        peer: &PeerIdentity,
        method: &str,
        target: &Target,
    ) -> Option<(u64, Arc<Pathway>)> {
        let host = target.host.as_policy_str();
        self.policy.current().mcp_target(&egress_policy::Request {
            source: &peer.spiffe_id,
            source_address: Some(peer.address),
            kind: RequestKind::Http,
            method,
            host: &host,
            port: target.port,
            path: "",
            query: "",
            headers: egress_policy::HeaderView::empty(),
            llm_model: None,
            now: std::time::SystemTime::now(),
        })
    }

    /// Decides an L7 request: as a whole, or, where a pathway has `mcp`, message by
    /// message. `Err` is the gateway's own answer (everything refused), already audited.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn decide_l7(
        &self,
        mut ex: Exchange,
        peer: &PeerIdentity,
        method: &str,
        target: &Target,
        path: &str,
        query: &str,
        headers: &mut HeaderMap,
        mut body: ReqBody,
        llm_model: Option<&str>,
    ) -> Result<Decided, Response<ProxyBody>> {
        let whole = |ex: Exchange, body: ReqBody, headers: &HeaderMap| Decided {
            decision: self.decide(
                peer,
                RequestKind::Http,
                method,
                target,
                path,
                query,
                headers,
                llm_model,
            ),
            ex,
            body,
            plan: None,
        };
        let Some((limit, aimed)) = self.mcp_target(peer, method, target) else {
            return Ok(whole(ex, body, headers));
        };
        body = match body.buffer(headers, limit).await {
            Ok(b) => b,
            Err(refusal) => return Err(refuse(ex, refusal)),
        };
        if !method.eq_ignore_ascii_case("POST") {
            let mut d = whole(ex, body, headers);
            let Some(rules) = d.decision.pathway.clone().filter(|p| p.mcp.is_some()) else {
                return Ok(d);
            };
            // Only a POST carries messages; anything else with a body would be one
            // the gateway does not check.
            if !is_empty_body(&d.body) {
                d.ex.set_decision(&d.decision);
                return Err(refuse(
                    d.ex,
                    Refusal::BadRequest(format!(
                        "a {method} on an MCP pathway carries no body (JSON-RPC messages are POSTed)"
                    )),
                ));
            }
            // The server's event stream: its list answers are filtered like any other.
            if d.decision.allowed && self.policy.current().mode() == Mode::Enforce {
                headers.insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
                let mut plan = ResponsePlan::new(Some(rules), false, d.ex.trace);
                plan.any_list = true;
                d.plan = Some(plan);
            }
            return Ok(d);
        }

        // The messages borrow the body's bytes (a cheap clone), not `body`, which may be
        // replaced by the re-encoded batch.
        let raw = match &body {
            ReqBody::Buffered(raw) => raw.clone(),
            _ => {
                return Err(refuse(
                    ex,
                    Refusal::BadRequest("cannot read the request body".into()),
                ))
            }
        };
        let text = match super::llm::decoded_request_body(headers, &raw, limit) {
            Ok(t) => t,
            Err(refusal) => return Err(refuse(ex, refusal)),
        };
        let policy = self.policy.current();
        let parsed = read_messages(&text, policy.reads_mcp_arguments());
        let decoded = !matches!(text, std::borrow::Cow::Borrowed(_));

        let view = policy_headers(&policy, headers);
        let host = target.host.as_policy_str();
        let request = egress_policy::Request {
            source: &peer.spiffe_id,
            source_address: Some(peer.address),
            kind: RequestKind::Http,
            method,
            host: &host,
            port: target.port,
            path,
            query,
            headers: view.as_ref().unwrap_or(egress_policy::HeaderView::empty()),
            llm_model,
            now: std::time::SystemTime::now(),
        };
        // Formatted only for the answers that carry it.
        let trace = ex.trace;
        let trace_id = || trace.trace_id_hex();
        let aimed = Some(aimed);

        let Some((mut messages, batch)) = parsed else {
            // Not JSON-RPC: only a pathway without `mcp` may take it.
            let decision = policy.evaluate_mcp(&request, None);
            if decision.permits() {
                return Ok(Decided {
                    ex,
                    decision,
                    body,
                    plan: None,
                });
            }
            ex.set_decision(&decision);
            let code = if serde_json::from_slice::<Value>(&text).is_ok() {
                INVALID_REQUEST
            } else {
                PARSE_ERROR
            };
            let err = denial_error(None, &decision, &trace_id());
            let body = rpc_error(
                None,
                code,
                format!("egress denied: {}", decision.reason),
                err["error"]["data"].clone(),
            );
            return Err(answer(ex, StatusCode::BAD_REQUEST, &body));
        };

        let mut decisions: Vec<Decision> = messages
            .iter()
            .map(|m| {
                let mut d = policy.evaluate_mcp(&request, m.call.as_ref());
                // Audit mode lets a refused message through: it goes the way it was
                // aimed, with that pathway's upstream settings (and its line names it).
                if d.permits() && d.pathway.is_none() {
                    d.pathway = aimed.clone();
                }
                d
            })
            .collect();
        // Everything forwarded goes through one pathway: the first that takes a message.
        let lead = decisions.iter().position(Decision::permits);
        let same_pathway = |d: &Decision| match (lead, &d.pathway) {
            (Some(i), Some(p)) => decisions[i]
                .pathway
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(l, p)),
            (Some(i), None) => decisions[i].pathway.is_none(),
            (None, _) => false,
        };
        let forwarded: Vec<bool> = decisions
            .iter()
            .map(|d| d.permits() && same_pathway(d))
            .collect();

        // The audit: the lead message on the request's line, one more line per message.
        // (The decision of a forwarded lead goes on the line where it is forwarded.)
        let lead_ix = lead.unwrap_or(0);
        if lead.is_none() {
            ex.set_decision(&decisions[lead_ix]);
            ex.set_mcp(messages[lead_ix].fields(&decisions[lead_ix], aimed.as_deref()));
        }
        for (i, (m, d)) in messages.iter().zip(&decisions).enumerate() {
            if i != lead_ix {
                ex.add_mcp_line(d, m.fields(d, aimed.as_deref()));
            }
        }

        // The gateway's answers to what it refused.
        let mut errors = Vec::new();
        for ((m, d), fwd) in messages.iter().zip(&decisions).zip(&forwarded) {
            if *fwd {
                continue;
            }
            if m.call.is_none() {
                errors.push(rpc_error(
                    m.id.as_deref(),
                    INVALID_REQUEST,
                    "egress denied: not a JSON-RPC 2.0 message".into(),
                    json!({"type": "egress_denied", "code": d.reason.code(), "trace_id": trace_id()}),
                ));
            } else if m.is_request {
                let mut e = denial_error(m.id.as_deref(), d, &trace_id());
                if d.permits() {
                    // Allowed, but by another pathway than the rest of the batch.
                    e["error"]["message"] =
                        "egress denied: a batch is forwarded through one pathway; send this message on its own".into();
                }
                errors.push(e);
            }
        }

        let Some(lead) = lead else {
            let d = &decisions[0];
            return Err(match (batch, errors.len()) {
                (_, 0) => answer(
                    ex,
                    StatusCode::FORBIDDEN,
                    &denial_error(None, d, &trace_id()),
                ),
                // One message that is not JSON-RPC: a bad request, as servers answer it.
                (false, _) if messages[0].call.is_none() => {
                    answer(ex, StatusCode::BAD_REQUEST, &errors[0])
                }
                (false, _) => answer(ex, StatusCode::OK, &errors[0]),
                (true, _) => answer(ex, StatusCode::OK, &Value::Array(errors)),
            });
        };
        let decision = decisions.swap_remove(lead);

        // Forward only what was allowed; a batch that shrinks to one message is sent
        // as that message (servers on MCP 2025-06-18 no longer take batches).
        let kept: Vec<&Message<'_>> = messages
            .iter()
            .zip(&forwarded)
            .filter_map(|(m, f)| f.then_some(m))
            .collect();
        if kept.len() < messages.len() || decoded {
            // The kept messages as the agent wrote them.
            let out = if batch && kept.len() > 1 {
                let texts: Vec<&str> = kept.iter().map(|m| m.raw).collect();
                Bytes::from(format!("[{}]", texts.join(",")))
            } else {
                Bytes::copy_from_slice(kept[0].raw.as_bytes())
            };
            headers.remove(header::CONTENT_ENCODING);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            body = ReqBody::Buffered(out);
        }

        // The answers to filter (forwarded list requests, on an MCP pathway that
        // enforces) and the gateway's answers to merge.
        let mut lists = HashMap::new();
        let filtering = decision.pathway.as_ref().is_some_and(|p| p.mcp.is_some());
        if filtering && decision.allowed && policy.mode() == Mode::Enforce {
            for m in &kept {
                let kind = m.call.as_ref().and_then(|c| ListKind::of_method(&c.method));
                if let (Some(kind), Some(id), true) = (kind, &m.id, m.is_request) {
                    lists.insert(id.clone(), kind);
                }
            }
        }
        let plan = (!lists.is_empty() || !errors.is_empty()).then(|| {
            let mut plan = ResponsePlan::new(decision.pathway.clone(), batch, trace);
            plan.lists = lists;
            plan.errors = errors;
            plan
        });
        if plan.is_some() {
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        ex.set_mcp(
            messages
                .swap_remove(lead)
                .into_fields(&decision, aimed.as_deref()),
        );
        Ok(Decided {
            ex,
            decision,
            body,
            plan,
        })
    }
}

/// How to rewrite the server's answer to a forwarded MCP request.
pub(super) struct ResponsePlan {
    /// Whose `mcp` lists filter the answers (none: nothing is filtered).
    pathway: Option<Arc<Pathway>>,
    /// The gateway's answers to the messages it refused, merged into the server's.
    errors: Vec<Value>,
    /// Forwarded list requests: `id` (as JSON text) and what the answer lists.
    lists: HashMap<String, ListKind>,
    /// Filter every list-shaped answer whatever its `id` (the server's own stream).
    any_list: bool,
    /// The agent sent a batch: a JSON answer is an array.
    batch: bool,
    trace: TraceContext,
}

impl ResponsePlan {
    fn new(pathway: Option<Arc<Pathway>>, batch: bool, trace: TraceContext) -> ResponsePlan {
        ResponsePlan {
            pathway,
            errors: Vec::new(),
            lists: HashMap::new(),
            any_list: false,
            batch,
            trace,
        }
    }

    fn filters(&self) -> bool {
        self.any_list || !self.lists.is_empty()
    }

    /// The server's response as the agent sees it.
    pub(super) fn respond(self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        let accepted = parts.status == StatusCode::ACCEPTED;
        if accepted && !self.errors.is_empty() {
            // The server took the forwarded notifications; the refused requests still
            // get their answers.
            parts.status = StatusCode::OK;
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        } else if !parts.status.is_success() || accepted {
            return Response::from_parts(parts, body);
        }
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"));
        let coding = Coding::of(&parts.headers).ok();
        if sse && coding != Some(Coding::Identity) {
            // The gateway asked for identity; a compressed stream cannot be rewritten.
            let e = self.cannot_filter("a compressed event stream");
            return json_response(StatusCode::BAD_GATEWAY, &e);
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::CONTENT_ENCODING);
        let body = if sse {
            SseRewrite::new(body, self).boxed()
        } else {
            JsonRewrite {
                inner: body,
                buf: BytesMut::new(),
                overflow: false,
                coding,
                plan: Some(self),
            }
            .boxed()
        };
        Response::from_parts(parts, body)
    }

    fn cannot_filter(&self, what: &str) -> Value {
        rpc_error(
            None,
            INTERNAL_ERROR,
            format!("egress gateway cannot filter {what} from the MCP server"),
            json!({"type": "upstream_error", "trace_id": self.trace.trace_id_hex()}),
        )
    }

    /// What an answer lists, if it is one to filter: by the `id` of a forwarded list
    /// request, or (on the server's own stream) by its shape.
    fn kind_of(&mut self, id: Option<&RawValue>, result: &ResultFields<'_>) -> Option<ListKind> {
        if let Some(kind) = id
            .and_then(normalized_id)
            .and_then(|i| self.lists.remove(&i))
        {
            return Some(kind);
        }
        if self.any_list {
            return ListKind::ALL.into_iter().find(|k| {
                result
                    .0
                    .iter()
                    .any(|(key, v)| key == k.key() && matches!(v, ResultField::List(_)))
            });
        }
        None
    }

    /// Whether the pathway's lists allow a listed item (an item without its naming
    /// field, or with it twice, is hidden: fail closed).
    fn allows(&self, kind: ListKind, item: &str) -> bool {
        let Some(rules) = self.pathway.as_ref().and_then(|p| p.mcp.as_ref()) else {
            return true;
        };
        let field = match kind {
            ListKind::Tools | ListKind::Prompts => "name",
            ListKind::Resources => "uri",
            ListKind::ResourceTemplates => "uriTemplate",
        };
        member_str(item, field).is_some_and(|v| match kind {
            ListKind::Tools => rules.allows_tool(&v),
            ListKind::Prompts => rules.allows_prompt(&v),
            ListKind::Resources | ListKind::ResourceTemplates => rules.allows_resource(&v),
        })
    }

    /// Filters one JSON-RPC message of the server's, if it answers a list request.
    /// `Ok(None)`: unchanged. `Err`: not JSON-RPC (or a list answer that cannot be
    /// filtered), which callers refuse rather than pass.
    fn rewrite_message(&mut self, text: &str) -> Result<Option<String>, serde_json::Error> {
        if !self.filters() {
            return Ok(None);
        }
        // One pass over the message: every member kept as written, list items apart.
        let msg: Answer<'_> = serde_json::from_str(text)?;
        let mut id = None;
        let mut result = None;
        for (k, v) in &msg.0 {
            match (k.as_ref(), v) {
                ("id", AnswerField::Raw(raw)) => id = Some(*raw),
                (_, AnswerField::Result(r)) => result = Some(r),
                _ => {}
            }
        }
        let Some(result) = result else {
            return Ok(None);
        };
        let Some(kind) = self.kind_of(id, result) else {
            return Ok(None);
        };
        let mut out = String::with_capacity(text.len());
        out.push('{');
        for (i, (k, v)) in msg.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_key(&mut out, k);
            match v {
                AnswerField::Raw(raw) => out.push_str(raw.get()),
                AnswerField::Result(r) => self.filter_result(&mut out, kind, r)?,
            }
        }
        out.push('}');
        Ok(Some(out))
    }

    fn filter_result(
        &self,
        out: &mut String,
        kind: ListKind,
        result: &ResultFields<'_>,
    ) -> Result<(), serde_json::Error> {
        use serde::de::Error as _;
        out.push('{');
        for (i, (k, v)) in result.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_key(out, k);
            match v {
                ResultField::Raw(raw) => out.push_str(raw.get()),
                ResultField::List(items) if k == kind.key() => {
                    out.push('[');
                    let mut first = true;
                    for raw in items.iter().filter(|r| self.allows(kind, r.get())) {
                        if !first {
                            out.push(',');
                        }
                        first = false;
                        out.push_str(raw.get());
                    }
                    out.push(']');
                }
                ResultField::List(items) => {
                    let all: Vec<&str> = items.iter().map(|r| r.get()).collect();
                    out.push('[');
                    out.push_str(&all.join(","));
                    out.push(']');
                }
                // The answer's list is not an array: nothing the client could use.
                ResultField::Other if k == kind.key() => {
                    return Err(serde_json::Error::custom("the list is not an array"))
                }
                ResultField::Other => {
                    return Err(serde_json::Error::custom("an unexpected list member"))
                }
            }
        }
        out.push('}');
        Ok(())
    }

    /// The whole JSON answer, filtered, with the gateway's answers merged in.
    fn rewrite_json(&mut self, body: &[u8]) -> Bytes {
        let trimmed = body.iter().position(|b| !b.is_ascii_whitespace());
        let mut server: Vec<String> = Vec::new();
        let mut single = false;
        let parsed: Result<(), serde_json::Error> = (|| {
            match trimmed.map(|i| body[i]) {
                None => {}
                Some(b'[') => {
                    let items: Vec<&RawValue> = serde_json::from_slice(body)?;
                    for raw in items {
                        let text = self.rewrite_message(raw.get())?;
                        server.push(text.unwrap_or_else(|| raw.get().to_owned()));
                    }
                }
                Some(_) => {
                    let raw: &RawValue = serde_json::from_slice(body)?;
                    let text = self.rewrite_message(raw.get())?;
                    server.push(text.unwrap_or_else(|| raw.get().to_owned()));
                    single = true;
                }
            }
            Ok(())
        })();
        if parsed.is_err() {
            if !self.filters() && self.errors.is_empty() {
                return Bytes::copy_from_slice(body);
            }
            // Fail closed: the agent gets the gateway's answers and an error, never an
            // unfiltered list.
            server.clear();
            single = false;
            let e = self.cannot_filter("a response that is not JSON-RPC");
            server.push(e.to_string());
        }
        let errors = std::mem::take(&mut self.errors);
        if single && !self.batch && errors.is_empty() {
            return Bytes::from(server.swap_remove(0));
        }
        server.extend(errors.iter().map(Value::to_string));
        Bytes::from(format!("[{}]", server.join(",")))
    }
}

fn push_key(out: &mut String, k: &str) {
    out.push_str(&Value::from(k).to_string());
    out.push(':');
}

/// A server's JSON-RPC message, read in one pass: its members as written, `result`
/// apart. Keys given twice are an error: a client reading the last of them must never
/// see something other than what was checked.
struct Answer<'a>(Vec<(Cow<'a, str>, AnswerField<'a>)>);

enum AnswerField<'a> {
    Raw(&'a RawValue),
    Result(ResultFields<'a>),
}

/// An answer's `result`: its members as written, the list members' items apart.
struct ResultFields<'a>(Vec<(Cow<'a, str>, ResultField<'a>)>);

enum ResultField<'a> {
    Raw(&'a RawValue),
    /// A `tools`, `resources`, `resourceTemplates` or `prompts` array.
    List(Vec<&'a RawValue>),
    /// One of those keys with something other than an array.
    Other,
}

impl<'de> serde::Deserialize<'de> for Answer<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Answer<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON-RPC message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(Cow<'de, str>, AnswerField<'de>)> = Vec::new();
                while let Some(k) = m.next_key::<Key<'de>>()?.map(|k| k.0) {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom("duplicate key"));
                    }
                    let v = if k == "result" {
                        AnswerField::Result(m.next_value()?)
                    } else {
                        AnswerField::Raw(m.next_value()?)
                    };
                    out.push((k, v));
                }
                Ok(Answer(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> serde::Deserialize<'de> for ResultFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ResultFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a result object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(Cow<'de, str>, ResultField<'de>)> = Vec::new();
                while let Some(k) = m.next_key::<Key<'de>>()?.map(|k| k.0) {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom("duplicate key"));
                    }
                    let v = if ListKind::ALL.iter().any(|l| l.key() == k) {
                        m.next_value_seed(ListSeed)?
                    } else {
                        ResultField::Raw(m.next_value()?)
                    };
                    out.push((k, v));
                }
                Ok(ResultFields(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A list member: the raw items of an array, or [`ResultField::Other`].
struct ListSeed;

impl<'de> serde::de::DeserializeSeed<'de> for ListSeed {
    type Value = ResultField<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ListSeed {
    type Value = ResultField<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(s.size_hint().unwrap_or(16));
        while let Some(item) = s.next_element::<&'de RawValue>()? {
            items.push(item);
        }
        Ok(ResultField::List(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        while m
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(ResultField::Other)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(ResultField::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(ResultField::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(ResultField::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(ResultField::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(ResultField::Other)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(ResultField::Other)
    }
}

/// The string value of a top-level member of a JSON object already known to be valid
/// JSON (an item [`Answer`] read): a scan instead of a second parse. `None` when the
/// member is missing, not a string, or present twice.
fn member_str<'a>(obj: &'a str, key: &str) -> Option<Cow<'a, str>> {
    let b = obj.as_bytes();
    // The end of the string starting after the quote at `start`, and whether it
    // holds escapes.
    let string_end = |start: usize| -> (usize, bool) {
        let (mut j, mut escaped) = (start, false);
        while j < b.len() {
            match b[j] {
                b'\\' => {
                    escaped = true;
                    j += 2;
                }
                b'"' => break,
                _ => j += 1,
            }
        }
        (j.min(b.len()), escaped)
    };
    let unescape = |quoted: &'a str| serde_json::from_str::<Cow<'a, str>>(quoted).ok();
    let (mut i, mut depth, mut found) = (0, 0u32, None);
    while i < b.len() {
        match b[i] {
            b'"' => {
                let (end, escaped) = string_end(i + 1);
                let mut k = end + 1;
                if depth == 1 {
                    while b.get(k).is_some_and(u8::is_ascii_whitespace) {
                        k += 1;
                    }
                    if b.get(k) == Some(&b':') {
                        let name = obj.get(i..=end)?;
                        let is_key = if escaped {
                            unescape(name).is_some_and(|n| n == key)
                        } else {
                            name.len() == key.len() + 2 && &name[1..name.len() - 1] == key
                        };
                        k += 1;
                        if is_key {
                            if found.is_some() {
                                return None;
                            }
                            while b.get(k).is_some_and(u8::is_ascii_whitespace) {
                                k += 1;
                            }
                            if b.get(k) != Some(&b'"') {
                                return None;
                            }
                            let (vend, vesc) = string_end(k + 1);
                            let quoted = obj.get(k..=vend)?;
                            found = Some(if vesc {
                                unescape(quoted)?
                            } else {
                                Cow::Borrowed(&quoted[1..quoted.len() - 1])
                            });
                            k = vend + 1;
                        }
                    }
                }
                i = k;
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    found
}

/// A JSON answer, read to its end, then rewritten as one frame.
struct JsonRewrite {
    inner: ProxyBody,
    buf: BytesMut,
    overflow: bool,
    /// The server's content coding; `None`: one the gateway does not know.
    coding: Option<Coding>,
    plan: Option<ResponsePlan>,
}

impl Body for JsonRewrite {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(plan) = this.plan.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if this.buf.len() + data.len() > MAX_JSON_RESPONSE {
                            this.overflow = true;
                            this.buf.clear();
                        } else if !this.overflow {
                            this.buf.extend_from_slice(&data);
                        }
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    let decoded = match this.coding {
                        Some(Coding::Identity) => Ok(std::borrow::Cow::Borrowed(&this.buf[..])),
                        Some(c) => encoding::decode_all(c, &this.buf, MAX_JSON_RESPONSE as u64)
                            .map(std::borrow::Cow::Owned)
                            .map_err(|_| ()),
                        None => Err(()),
                    };
                    let out = match decoded {
                        Ok(text) if !this.overflow => plan.rewrite_json(&text),
                        _ => {
                            let e = plan.cannot_filter("a response this large or so encoded");
                            let mut all = std::mem::take(&mut plan.errors);
                            all.push(e);
                            Bytes::from(Value::Array(all).to_string())
                        }
                    };
                    this.plan = None;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.plan.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// An SSE answer, rewritten event by event as it streams: the gateway's answers first,
/// then each server event, list answers filtered.
struct SseRewrite {
    inner: ProxyBody,
    plan: ResponsePlan,
    /// The gateway's answers, sent before the first server event.
    prefix: Option<Bytes>,
    /// Bytes of the event being read.
    event: BytesMut,
    /// Where the next line of `event` starts.
    line_start: usize,
    done: bool,
}

impl SseRewrite {
    fn new(inner: ProxyBody, mut plan: ResponsePlan) -> SseRewrite {
        let mut prefix = String::new();
        for e in std::mem::take(&mut plan.errors) {
            prefix.push_str("event: message\ndata: ");
            prefix.push_str(&e.to_string());
            prefix.push_str("\n\n");
        }
        SseRewrite {
            inner,
            plan,
            prefix: (!prefix.is_empty()).then(|| Bytes::from(prefix)),
            event: BytesMut::new(),
            line_start: 0,
            done: false,
        }
    }

    /// Moves every complete event of `data` to `out`, rewritten where it answers a list.
    fn feed(&mut self, data: &[u8], out: &mut BytesMut) {
        if !self.plan.filters() && self.event.is_empty() {
            // Nothing left to filter: pass the stream through.
            out.extend_from_slice(data);
            return;
        }
        self.event.extend_from_slice(data);
        while let Some(nl) = self.event[self.line_start..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let line_end = self.line_start + nl;
            let line = &self.event[self.line_start..line_end];
            let blank = line.is_empty() || line == b"\r";
            self.line_start = line_end + 1;
            if blank {
                let event = self.event.split_to(self.line_start).freeze();
                self.line_start = 0;
                out.extend_from_slice(&self.rewrite_event(&event));
                if !self.plan.filters() {
                    out.extend_from_slice(&self.event.split());
                    return;
                }
            }
        }
    }

    fn rewrite_event(&mut self, event: &Bytes) -> Bytes {
        let text = String::from_utf8_lossy(event);
        let crlf = text.contains("\r\n");
        let mut data = String::new();
        let mut others = Vec::new();
        let mut has_data = false;
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            match line.strip_prefix("data:") {
                Some(d) => {
                    if has_data {
                        data.push('\n');
                    }
                    has_data = true;
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
                None => others.push(line),
            }
        }
        if !has_data {
            return event.clone();
        }
        match self.plan.rewrite_message(&data) {
            Ok(Some(new)) => {
                let nl = if crlf { "\r\n" } else { "\n" };
                let mut s = String::with_capacity(new.len() + 64);
                for o in others {
                    s.push_str(o);
                    s.push_str(nl);
                }
                s.push_str("data: ");
                s.push_str(&new);
                s.push_str(nl);
                s.push_str(nl);
                Bytes::from(s)
            }
            // Not a list answer, or an event without data (a priming event): as it came.
            Ok(None) => event.clone(),
            Err(_) if data.trim().is_empty() => event.clone(),
            // Fail closed: data the gateway cannot read may be a list it cannot filter.
            Err(_) => Bytes::new(),
        }
    }
}

impl Body for SseRewrite {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let mut out = BytesMut::new();
                    this.feed(&data, &mut out);
                    if this.event.len() > MAX_SSE_EVENT {
                        // Fail closed: an event too large to check ends the stream.
                        this.done = true;
                        let e = this.plan.cannot_filter("an event this large");
                        out.extend_from_slice(format!("event: message\ndata: {e}\n\n").as_bytes());
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.done = true;
                    // An unterminated last event goes out as it came.
                    if !this.event.is_empty() {
                        let rest = this.event.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.prefix.is_none() && self.event.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(tools: &[&str]) -> ResponsePlan {
        let yaml = format!(
            "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: m\n        destinations: [\"m:80\"]\n        upstream: {{}}\n        mcp: {{ tools: [{}], resources: [\"docs://*\"] }}\n",
            tools.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ")
        );
        let p = egress_policy::Policy::from_yaml_str(&yaml, "p.yaml").unwrap();
        let pathway = p.pathways().next().unwrap().clone();
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let trace = TraceContext::parent_from_headers(&h).unwrap();
        ResponsePlan::new(Some(pathway), false, trace)
    }

    fn tools_answer(id: u64, names: &[&str]) -> String {
        let tools: Vec<Value> = names
            .iter()
            .map(|n| json!({"name": n, "inputSchema": {"type": "object"}}))
            .collect();
        json!({"jsonrpc": "2.0", "id": id, "result": {"tools": tools, "nextCursor": "c"}})
            .to_string()
    }

    #[test]
    fn filters_a_tools_list_by_id() {
        let mut p = plan(&["search_docs", "read_*"]);
        p.lists.insert("1".into(), ListKind::Tools);
        let out = p
            .rewrite_message(&tools_answer(
                1,
                &["search_docs", "read_file", "delete_repo"],
            ))
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        let names: Vec<&str> = v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["search_docs", "read_file"]);
        assert_eq!(v["result"]["nextCursor"], "c");
        assert_eq!(v["id"], 1);
        // Answered once: the id is done, another answer with it is not ours.
        assert!(p
            .rewrite_message(&tools_answer(1, &["x"]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn other_answers_pass_unchanged() {
        let mut p = plan(&["a"]);
        p.lists.insert("1".into(), ListKind::Tools);
        let call = json!({"jsonrpc":"2.0","id":2,"result":{"content":[]}}).to_string();
        assert!(p.rewrite_message(&call).unwrap().is_none());
        let err = json!({"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}).to_string();
        assert!(p.rewrite_message(&err).unwrap().is_none());
    }

    #[test]
    fn json_batches_merge_the_gateways_answers() {
        let mut p = plan(&["a"]);
        p.batch = true;
        p.lists.insert("\"l\"".into(), ListKind::Tools);
        p.errors
            .push(json!({"jsonrpc":"2.0","id":9,"error":{"code":-32001}}));
        let server =
            json!({"jsonrpc":"2.0","id":"l","result":{"tools":[{"name":"a"},{"name":"b"}]}});
        let out: Value =
            serde_json::from_slice(&p.rewrite_json(server.to_string().as_bytes())).unwrap();
        assert_eq!(out[0]["result"]["tools"], json!([{"name":"a"}]));
        assert_eq!(out[1]["id"], 9);
        // Not JSON: fail closed with the gateway's answers and an error.
        let mut p = plan(&["a"]);
        p.lists.insert("1".into(), ListKind::Tools);
        let out: Value = serde_json::from_slice(&p.rewrite_json(b"<html>")).unwrap();
        assert_eq!(out[0]["error"]["code"], INTERNAL_ERROR);
    }

    #[test]
    fn sse_events_are_filtered_across_frames() {
        let mut p = plan(&["a"]);
        p.lists.insert("3".into(), ListKind::Tools);
        p.errors
            .push(json!({"jsonrpc":"2.0","id":4,"error":{"code":-32001}}));
        let mut s = SseRewrite::new(full(Bytes::new()), p);
        assert!(s
            .prefix
            .as_ref()
            .unwrap()
            .starts_with(b"event: message\ndata: {"));
        let answer = tools_answer(3, &["a", "b"]);
        let stream = format!("id: 0\r\ndata: \r\n\r\nevent: message\r\ndata: {answer}\r\n\r\nevent: message\r\ndata: {{\"x\":1}}\r\n\r\n");
        let mut out = BytesMut::new();
        for chunk in stream.as_bytes().chunks(7) {
            s.feed(chunk, &mut out);
        }
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("id: 0\r\ndata: \r\n\r\n"), "{text}");
        assert!(
            text.contains(r#""tools":[{"inputSchema":{"type":"object"},"name":"a"}]"#)
                || text.contains(r#""tools":[{"name":"a","inputSchema":{"type":"object"}}]"#),
            "{text}"
        );
        assert!(!text.contains("\"b\""), "{text}");
        assert!(text.ends_with("data: {\"x\":1}\r\n\r\n"), "{text}");
    }

    #[test]
    fn listed_names_are_read_strictly() {
        let m = |obj: &str| member_str(obj, "name").map(|c| c.into_owned());
        assert_eq!(m(r#"{"name":"a","x":1}"#).as_deref(), Some("a"));
        assert_eq!(
            m(r#"{"inputSchema":{"properties":{"name":{"type":"string"}}},"name" : "b"}"#)
                .as_deref(),
            Some("b")
        );
        assert_eq!(m(r#"{"n\u0061me":"c\"d"}"#).as_deref(), Some("c\"d"));
        assert_eq!(
            m(r#"{"description":"has \"name\": \"x\"","name":"e"}"#).as_deref(),
            Some("e")
        );
        // Missing, not a string, or twice (however spelt): hidden.
        assert_eq!(m(r#"{"nam":"a"}"#), None);
        assert_eq!(m(r#"{"name":7}"#), None);
        assert_eq!(
            m(r#"{"name":"search_docs","n\u0061me":"delete_repo"}"#),
            None
        );
    }

    #[test]
    fn answers_that_could_hide_a_list_are_refused() {
        let mut p = plan(&["a"]);
        p.any_list = true;
        // A second `id` or `result` could make the client read something unchecked.
        let dup = r#"{"jsonrpc":"2.0","id":1,"id":2,"result":{"tools":[{"name":"b"}]}}"#;
        assert!(p.rewrite_message(dup).is_err());
        let dup = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"b"}]}}"#;
        assert!(p.rewrite_message(dup).is_err());
        // JSON the gateway cannot read is dropped from a filtered stream.
        let mut s = SseRewrite::new(full(Bytes::new()), p);
        let mut out = BytesMut::new();
        s.feed(
            b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\"}],\"x\":NaN}}\n\n",
            &mut out,
        );
        s.feed(b"id: 1\ndata: \n\n", &mut out);
        assert_eq!(&out[..], b"id: 1\ndata: \n\n");
    }

    #[test]
    fn requests_are_read_and_checked() {
        let (m, batch) = read_messages(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}},
            {"jsonrpc":"2.0","method":"notifications/initialized"},
            {"jsonrpc":"2.0","id":null,"method":"ping"},
            {"jsonrpc":"1.0","id":2,"method":"ping"},
            {"jsonrpc":"2.0","id":3,"result":{}}]"#,
            true,
        )
        .unwrap();
        assert!(batch);
        assert!(m[0].is_request && m[0].call.is_some());
        assert!(!m[1].is_request && m[1].call.is_some() && m[1].id.is_none());
        assert!(m[2].call.is_none(), "a null id");
        assert!(m[3].call.is_none(), "not 2.0");
        assert!(m[4].call.is_some() && !m[4].is_request, "a response");
        // A member given twice: which copy the server reads is unknown, so neither is.
        let (m, _) = read_messages(
            br#"[{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"search_docs","name":"delete_repo"}},
            {"jsonrpc":"2.0","id":6,"method":"tools/list","method":"tools/call","params":{"name":"delete_repo"}}]"#,
            true,
        )
        .unwrap();
        assert!(m[0].call.is_none());
        assert!(m[1].call.is_none());
        // Escapes hide neither a repeated member nor a method or tool name.
        let (m, _) = read_messages(
            br#"[{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_docs","name":"delete_repo"}},
            {"jsonrpc":"2.0","id":8,"method":"tools\/call","params":{"name":"delete_repo"}}]"#,
            true,
        )
        .unwrap();
        assert!(m[0].call.is_none(), "an escaped repeat of `name`");
        let c = m[1].call.as_ref().unwrap();
        assert_eq!(c.method, "tools/call");
        assert_eq!(c.tool(), Some("delete_repo"));
        assert!(read_messages(b"[]", true).is_none());
        assert!(read_messages(b"nope", true).is_none());
        assert!(read_messages(b"42", true).is_none());
    }

    #[test]
    fn arguments_are_read_only_when_asked() {
        let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"path":"/etc"}}}"#;
        let (m, _) = read_messages(call, true).unwrap();
        let args = &m[0].call.as_ref().unwrap().arguments;
        assert_eq!(args["path"], "/etc");
        let (m, _) = read_messages(call, false).unwrap();
        let c = m[0].call.as_ref().unwrap();
        assert!(c.arguments.is_empty());
        assert_eq!(c.name.as_deref(), Some("x"), "the tool is read either way");
    }

    #[test]
    fn ids_compare_in_one_spelling() {
        let id = |text: &str| normalized_id(&RawValue::from_string(text.into()).unwrap());
        for (written, normal) in [
            ("7", Some("7")),
            ("-12", Some("-12")),
            ("1.0", Some("1.0")),
            ("1e2", Some("100.0")),
            ("-0", Some("-0.0")),
            (r#""abc""#, Some(r#""abc""#)),
            (r#""\u0061bc""#, Some(r#""abc""#)),
            (r#""a\/b""#, Some(r#""a/b""#)),
            ("12345678901234567890", Some("12345678901234567890")),
            ("null", None),
            ("true", None),
            ("{}", None),
        ] {
            assert_eq!(id(written).as_deref(), normal, "{written}");
            if let Some(n) = normal {
                // The fast path agrees with serde_json's own spelling.
                let v: Value = serde_json::from_str(written).unwrap();
                assert_eq!(v.to_string(), n, "{written}");
            }
        }
    }
}
