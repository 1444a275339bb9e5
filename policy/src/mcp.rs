//! Model Context Protocol pathways: what a pathway's `mcp:` lets an agent call, the
//! JSON-RPC message the gateway read from a request body as the policy sees it
//! (`request.mcp` in CEL), and whether a request's body must be read before deciding
//! (two-phase evaluation, as for `models`).

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::host::normalize_host;
use crate::pathway::Pathway;
use crate::policy::Policy;
use crate::request::{Request, RequestKind};

/// The body bound for a pathway with `mcp` that sets no `max_request_body_bytes`.
pub const DEFAULT_MCP_BODY_LIMIT: u64 = 4 * 1024 * 1024;

/// JSON-RPC methods whose target the lists gate.
pub const TOOLS_CALL: &str = "tools/call";
pub const RESOURCES_READ: &str = "resources/read";
pub const RESOURCES_SUBSCRIBE: &str = "resources/subscribe";
pub const PROMPTS_GET: &str = "prompts/get";

/// One list entry: an exact name, or a trailing `*` as a prefix (`read_*`, `docs://*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern(String);

impl NamePattern {
    /// `None` when `*` appears anywhere but at the end, or the entry is empty.
    pub fn parse(s: &str) -> Option<NamePattern> {
        let star = s.find('*');
        (!s.is_empty() && star.is_none_or(|i| i == s.len() - 1)).then(|| NamePattern(s.into()))
    }

    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A pathway's `mcp:` lists. A list left out allows nothing of its kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpRules {
    pub tools: Vec<NamePattern>,
    pub resources: Vec<NamePattern>,
    pub prompts: Vec<NamePattern>,
}

fn first_match<'a>(list: &'a [NamePattern], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|p| p.matches(name))
        .map(NamePattern::as_str)
}

impl McpRules {
    /// The `tools` entry that allows `tool`, as written (`read_*` for `read_file`): a
    /// label bounded by the policy, for metrics.
    pub fn tool_entry(&self, tool: &str) -> Option<&str> {
        first_match(&self.tools, tool)
    }

    pub fn allows_tool(&self, tool: &str) -> bool {
        self.tool_entry(tool).is_some()
    }

    pub fn allows_resource(&self, uri: &str) -> bool {
        first_match(&self.resources, uri).is_some()
    }

    pub fn allows_prompt(&self, prompt: &str) -> bool {
        first_match(&self.prompts, prompt).is_some()
    }

    /// The list and entry that allow `call`'s target (`("tools", "read_*")`), for a
    /// gated method whose target is listed.
    pub fn entry_for(&self, call: &McpCall) -> Option<(&'static str, &str)> {
        let name = call.name.as_deref()?;
        match call.method.as_str() {
            TOOLS_CALL => first_match(&self.tools, name).map(|e| ("tools", e)),
            RESOURCES_READ | RESOURCES_SUBSCRIBE => {
                first_match(&self.resources, name).map(|e| ("resources", e))
            }
            PROMPTS_GET => first_match(&self.prompts, name).map(|e| ("prompts", e)),
            _ => None,
        }
    }

    /// The MCP step of a pathway check. `call` is the JSON-RPC message of the request,
    /// `None` when the gateway found none: fine for requests that carry no message (the
    /// `GET` of a server-to-client stream, the `DELETE` that ends a session), a denial
    /// for a `POST`, whose body must be JSON-RPC on an MCP pathway (fail closed).
    pub fn check(&self, http_method: &str, call: Option<&McpCall>) -> Result<(), McpDenial> {
        let Some(call) = call else {
            return if http_method.eq_ignore_ascii_case("POST") {
                Err(McpDenial::NotJsonRpc)
            } else {
                Ok(())
            };
        };
        let (list, denial): (&[NamePattern], fn(String) -> McpDenial) = match call.method.as_str() {
            TOOLS_CALL => (&self.tools, McpDenial::Tool),
            RESOURCES_READ | RESOURCES_SUBSCRIBE => (&self.resources, McpDenial::Resource),
            PROMPTS_GET => (&self.prompts, McpDenial::Prompt),
            _ => return Ok(()),
        };
        match &call.name {
            None => Err(McpDenial::MissingName {
                method: call.method.clone(),
            }),
            Some(name) if first_match(list, name).is_some() => Ok(()),
            Some(name) => Err(denial(name.clone())),
        }
    }
}

/// One JSON-RPC message as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct McpCall {
    /// JSON-RPC `method` (`tools/call`, `tools/list`, `initialize`, `notifications/...`);
    /// empty for a response the client sends to a request of the server.
    pub method: String,
    /// What the method acts on: `params.name` of `tools/call` and `prompts/get`,
    /// `params.uri` of `resources/read` and `resources/subscribe`.
    pub name: Option<String>,
    /// `params.arguments` of `tools/call` and `prompts/get`; empty otherwise.
    pub arguments: Map<String, Value>,
}

impl McpCall {
    /// Reads the method, name and arguments of one JSON-RPC message (`params` that is
    /// not an object counts as none).
    pub fn from_message(message: &Value) -> McpCall {
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let params = message.get("params").and_then(Value::as_object);
        let field = |k: &str| params.and_then(|p| p.get(k)).and_then(Value::as_str);
        let name = match method.as_str() {
            TOOLS_CALL | PROMPTS_GET => field("name"),
            RESOURCES_READ | RESOURCES_SUBSCRIBE => field("uri"),
            _ => None,
        }
        .map(str::to_owned);
        let arguments = match method.as_str() {
            TOOLS_CALL | PROMPTS_GET => params
                .and_then(|p| p.get("arguments"))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            _ => Map::new(),
        };
        McpCall {
            method,
            name,
            arguments,
        }
    }

    /// The tool of a `tools/call`.
    pub fn tool(&self) -> Option<&str> {
        (self.method == TOOLS_CALL)
            .then_some(self.name.as_deref())
            .flatten()
    }
}

/// What an MCP pathway refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum McpDenial {
    /// `tools/call` of a tool `mcp.tools` does not list.
    Tool(String),
    /// `resources/read` (or `subscribe`) of a URI `mcp.resources` does not list.
    Resource(String),
    /// `prompts/get` of a prompt `mcp.prompts` does not list.
    Prompt(String),
    /// A gated method without its `params.name` / `params.uri`.
    MissingName { method: String },
    /// A `POST` whose body is not a JSON-RPC 2.0 message or batch.
    NotJsonRpc,
}

impl McpDenial {
    /// Stable snake_case code for logs and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            McpDenial::Tool(_) => "mcp_tool_not_allowed",
            McpDenial::Resource(_) => "mcp_resource_not_allowed",
            McpDenial::Prompt(_) => "mcp_prompt_not_allowed",
            McpDenial::MissingName { .. } => "mcp_invalid_params",
            McpDenial::NotJsonRpc => "mcp_invalid_message",
        }
    }
}

impl fmt::Display for McpDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            McpDenial::Tool(t) => write!(f, "tool {t:?} not allowed by mcp.tools"),
            McpDenial::Resource(r) => write!(f, "resource {r:?} not allowed by mcp.resources"),
            McpDenial::Prompt(p) => write!(f, "prompt {p:?} not allowed by mcp.prompts"),
            McpDenial::MissingName { method } => {
                write!(f, "{method} without the name it acts on")
            }
            McpDenial::NotJsonRpc => f.write_str("request body is not a JSON-RPC 2.0 message"),
        }
    }
}

impl Policy {
    /// Whether a message's `arguments` can matter to a decision: only a `when` of a
    /// pathway with `mcp` sees them. When none has one, a gateway need not read them.
    pub fn reads_mcp_arguments(&self) -> bool {
        self.mcp_conditions
    }

    /// For an HTTP request, the body bound to read its JSON-RPC messages under, when
    /// some pathway of a matching agent lists this destination and method and has
    /// `mcp`: the largest `max_request_body_bytes` among them (default 4 MiB). `None`:
    /// no pathway looks at MCP messages, so the body need not be read.
    ///
    /// Pure, and independent of `when` and deny rules: a `Some` only means the messages
    /// might matter; [`Policy::evaluate_mcp`] decides each.
    pub fn mcp_body_limit(&self, req: &Request<'_>) -> Option<u64> {
        self.mcp_pathways(req)
            .iter()
            .map(|p| {
                p.limits
                    .max_request_body_bytes
                    .unwrap_or(DEFAULT_MCP_BODY_LIMIT)
            })
            .max()
    }

    /// The first pathway with `mcp` that lists this request's destination and method,
    /// over the matching agents in file order: the lists a message is aimed at, even
    /// when the decision denies it (metric labels name only what those lists hold).
    pub fn mcp_pathway(&self, req: &Request<'_>) -> Option<Arc<Pathway>> {
        self.mcp_pathways(req).first().map(|p| Arc::clone(p))
    }

    /// [`Policy::mcp_body_limit`] and [`Policy::mcp_pathway`] in one look-up.
    pub fn mcp_target(&self, req: &Request<'_>) -> Option<(u64, Arc<Pathway>)> {
        let pathways = self.mcp_pathways(req);
        let first = Arc::clone(pathways.first()?);
        let limit = pathways
            .iter()
            .map(|p| {
                p.limits
                    .max_request_body_bytes
                    .unwrap_or(DEFAULT_MCP_BODY_LIMIT)
            })
            .max()?;
        Some((limit, first))
    }

    /// Pathways with `mcp` of the matching agents that list the destination and method.
    fn mcp_pathways(&self, req: &Request<'_>) -> Vec<&Arc<Pathway>> {
        let mut out = Vec::new();
        // Most policies have no MCP pathway: every L7 request asks, so answer at once.
        if !self.has_mcp
            || req.kind != RequestKind::Http
            || !self
                .trust_domains
                .iter()
                .any(|t| t == req.source.trust_domain())
        {
            return out;
        }
        let Some(host) = normalize_host(req.host) else {
            return out;
        };
        let mut agents = Vec::new();
        self.agent_index.candidates(req.source, &mut agents);
        let mut cands = Vec::new();
        for agent in agents.into_iter().map(|i| &self.agents[i]) {
            if !agent.id.matches(req.source) {
                continue;
            }
            cands.clear();
            agent.dests.candidates(&host, req.port, &mut cands);
            for &i in &cands {
                let p = &agent.pathways[i];
                if p.mcp.is_some()
                    && p.allows_method(req.method)
                    && p.destinations.iter().any(|d| d.matches(&host, req.port))
                {
                    out.push(p);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> McpRules {
        let p = |s: &str| NamePattern::parse(s).unwrap();
        McpRules {
            tools: vec![p("search_docs"), p("read_*")],
            resources: vec![p("docs://*")],
            prompts: vec![],
        }
    }

    fn call(v: Value) -> McpCall {
        McpCall::from_message(&v)
    }

    #[test]
    fn patterns() {
        assert!(NamePattern::parse("").is_none());
        assert!(NamePattern::parse("a*b").is_none());
        assert!(NamePattern::parse("*").unwrap().matches("anything"));
        let r = rules();
        assert_eq!(r.tool_entry("read_file"), Some("read_*"));
        assert_eq!(r.tool_entry("search_docs"), Some("search_docs"));
        assert_eq!(r.tool_entry("search_docs2"), None);
        assert!(!r.allows_tool("delete_repo"));
    }

    #[test]
    fn reads_the_message() {
        let c = call(json!({"jsonrpc":"2.0","id":1,"method":"tools/call",
            "params":{"name":"read_file","arguments":{"path":"/etc/hosts"}}}));
        assert_eq!(c.tool(), Some("read_file"));
        assert_eq!(c.arguments["path"], "/etc/hosts");
        let c = call(
            json!({"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"docs://a"}}),
        );
        assert_eq!((c.name.as_deref(), c.tool()), (Some("docs://a"), None));
        let c = call(json!({"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"name":"x"}}));
        assert_eq!(c.name, None, "only gated methods have a target");
        let c = call(json!({"jsonrpc":"2.0","id":4,"result":{}}));
        assert_eq!(c.method, "");
    }

    #[test]
    fn checks_each_gated_method() {
        let r = rules();
        let ok = |v: Value| r.check("POST", Some(&call(v)));
        assert_eq!(
            ok(json!({"method":"tools/call","params":{"name":"search_docs"}})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"method":"tools/call","params":{"name":"delete_repo"}})),
            Err(McpDenial::Tool("delete_repo".into()))
        );
        assert_eq!(
            ok(json!({"method":"tools/call","params":{}})),
            Err(McpDenial::MissingName {
                method: "tools/call".into()
            })
        );
        assert_eq!(
            ok(json!({"method":"resources/read","params":{"uri":"file:///etc/passwd"}})),
            Err(McpDenial::Resource("file:///etc/passwd".into()))
        );
        assert_eq!(
            ok(json!({"method":"resources/subscribe","params":{"uri":"docs://x"}})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"method":"prompts/get","params":{"name":"p"}})),
            Err(McpDenial::Prompt("p".into()))
        );
        assert_eq!(ok(json!({"method":"tools/list"})), Ok(()));
        assert_eq!(ok(json!({"method":"notifications/initialized"})), Ok(()));
        // No message: only a POST must carry one.
        assert_eq!(r.check("POST", None), Err(McpDenial::NotJsonRpc));
        assert_eq!(r.check("GET", None), Ok(()));
        assert_eq!(r.check("DELETE", None), Ok(()));
    }

    // === the policy with `mcp` pathways ===

    use crate::testing::{parse_tests, run_tests};
    use crate::{HeaderView, Reason, Request, RequestKind, SpiffeId};

    const RESEARCH: &str = "spiffe://example.org/ns/ai/sa/research";
    const POLICY: &str = r#"
version: 1
trust_domains: [example.org]
agents:
  - name: research
    id: spiffe://example.org/ns/ai/sa/research
    pathways:
      - name: docs-mcp
        destinations: ["mcp.internal:8080"]
        upstream: { tls: false }
        mcp:
          tools: [search_docs, "read_*"]
          resources: ["docs://*"]
        when: 'request.mcp.tool != "read_secrets" && (request.mcp.method != "tools/call" || !("path" in request.mcp.arguments) || request.mcp.arguments.path.startsWith("/docs/"))'
      - name: plain
        destinations: ["api.example.com:443"]
        upstream: { tls: true }
"#;

    fn policy() -> Policy {
        Policy::from_yaml_str(POLICY, "p.yaml").unwrap()
    }

    #[test]
    fn arguments_matter_only_under_a_when_of_an_mcp_pathway() {
        assert!(policy().reads_mcp_arguments());
        let without_when = POLICY.replace(
            r#"        when: 'request.mcp.tool != "read_secrets" && (request.mcp.method != "tools/call" || !("path" in request.mcp.arguments) || request.mcp.arguments.path.startsWith("/docs/"))'
"#,
            "",
        );
        assert_ne!(without_when, POLICY);
        let p = Policy::from_yaml_str(&without_when, "p.yaml").unwrap();
        assert!(!p.reads_mcp_arguments());
        // Nothing reads `request` at all: a caller need not build the header view.
        assert!(policy().reads_request());
        assert!(!p.reads_request());
    }

    fn decide(
        p: &Policy,
        method: &str,
        host: &str,
        port: u16,
        msg: Option<Value>,
    ) -> crate::Decision {
        let source: SpiffeId = RESEARCH.parse().unwrap();
        let req = Request {
            source: &source,
            source_address: None,
            kind: RequestKind::Http,
            method,
            host,
            port,
            path: "/mcp",
            query: "",
            headers: HeaderView::empty(),
            llm_model: None,
            now: std::time::SystemTime::now(),
        };
        let call = msg.map(|m| McpCall::from_message(&m));
        p.evaluate_mcp(&req, call.as_ref())
    }

    fn tool_call(tool: &str, args: Value) -> Option<Value> {
        Some(
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":tool,"arguments":args}}),
        )
    }

    #[test]
    fn tools_are_allowed_per_name_and_pattern() {
        let p = policy();
        let d = decide(
            &p,
            "POST",
            "mcp.internal",
            8080,
            tool_call("search_docs", json!({"q":"x"})),
        );
        assert!(d.allowed, "{:?}", d.reason);
        assert_eq!(d.pathway_name(), Some("docs-mcp"));
        assert!(
            decide(
                &p,
                "POST",
                "mcp.internal",
                8080,
                tool_call("read_file", json!({"path":"/docs/a"}))
            )
            .allowed
        );
        let d = decide(
            &p,
            "POST",
            "mcp.internal",
            8080,
            tool_call("delete_repo", json!({})),
        );
        assert!(!d.allowed);
        assert_eq!(
            d.reason,
            Reason::McpNotAllowed {
                denial: McpDenial::Tool("delete_repo".into())
            }
        );
        assert_eq!(d.reason.code(), "mcp_tool_not_allowed");
        assert_eq!(
            d.reason.to_string(),
            "tool \"delete_repo\" not allowed by mcp.tools"
        );
    }

    #[test]
    fn when_sees_the_message() {
        let p = policy();
        // `read_*` allows the tool; `when` refuses this one and paths outside /docs/.
        let d = decide(
            &p,
            "POST",
            "mcp.internal",
            8080,
            tool_call("read_secrets", json!({})),
        );
        assert_eq!(d.reason, Reason::ConditionNotMet);
        let d = decide(
            &p,
            "POST",
            "mcp.internal",
            8080,
            tool_call("read_file", json!({"path":"/etc/passwd"})),
        );
        assert_eq!(d.reason, Reason::ConditionNotMet);
        // Methods without a tool see `tool == ""` and empty arguments.
        let list = json!({"jsonrpc":"2.0","id":2,"method":"tools/list"});
        assert!(decide(&p, "POST", "mcp.internal", 8080, Some(list)).allowed);
        // The GET of the server's event stream carries no message: `method == ""`.
        assert!(decide(&p, "GET", "mcp.internal", 8080, None).allowed);
    }

    #[test]
    fn a_post_without_a_message_is_refused() {
        let p = policy();
        let d = decide(&p, "POST", "mcp.internal", 8080, None);
        assert_eq!(
            d.reason,
            Reason::McpNotAllowed {
                denial: McpDenial::NotJsonRpc
            }
        );
        // Plain evaluation (the gateway not reading the body) fails closed the same way.
        let source: SpiffeId = RESEARCH.parse().unwrap();
        let req = Request {
            source: &source,
            source_address: None,
            kind: RequestKind::Http,
            method: "POST",
            host: "mcp.internal",
            port: 8080,
            path: "/mcp",
            query: "",
            headers: HeaderView::empty(),
            llm_model: None,
            now: std::time::SystemTime::now(),
        };
        assert!(!p.evaluate(&req).allowed);
        // Pathways without `mcp` ignore messages.
        assert!(
            decide(
                &p,
                "POST",
                "api.example.com",
                443,
                tool_call("delete_repo", json!({}))
            )
            .allowed
        );
    }

    #[test]
    fn only_mcp_pathways_want_the_body() {
        let p = policy();
        let source: SpiffeId = RESEARCH.parse().unwrap();
        let limit = |method: &str, host: &str, port: u16| {
            p.mcp_body_limit(&Request {
                source: &source,
                source_address: None,
                kind: RequestKind::Http,
                method,
                host,
                port,
                path: "/mcp",
                query: "",
                headers: HeaderView::empty(),
                llm_model: None,
                now: std::time::SystemTime::now(),
            })
        };
        assert_eq!(
            limit("POST", "mcp.internal", 8080),
            Some(DEFAULT_MCP_BODY_LIMIT)
        );
        assert_eq!(
            limit("GET", "MCP.internal.", 8080),
            Some(DEFAULT_MCP_BODY_LIMIT)
        );
        assert_eq!(limit("POST", "api.example.com", 443), None);
        assert_eq!(limit("POST", "mcp.internal", 8081), None);
    }

    #[test]
    fn load_rejects_mcp_where_bodies_are_unseen_and_request_mcp_elsewhere() {
        let base = |pathway: &str| {
            format!(
                "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n{pathway}"
            )
        };
        let err = |yaml: &str| match Policy::from_yaml_str(yaml, "p.yaml") {
            Ok(_) => panic!("loaded:\n{yaml}"),
            Err(e) => e.to_string(),
        };
        let e = err(&base(
            "      - name: l4\n        destinations: [\"m:80\"]\n        mcp: { tools: [x] }\n",
        ));
        assert!(
            e.contains("`mcp` needs `upstream`") && e.contains("p.yaml:"),
            "{e}"
        );
        let e = err(&base("      - name: p\n        destinations: [\"m:80\"]\n        upstream: {}\n        when: 'request.mcp.tool == \"x\"'\n"));
        assert!(e.contains("reads request.mcp"), "{e}");
        let e = err(&base("      - name: p\n        destinations: [\"m:80\"]\n        upstream: {}\n        mcp: { tools: [\"a*b\"] }\n"));
        assert!(e.contains("invalid mcp.tools entry \"a*b\""), "{e}");
        let e = err(&base("      - name: p\n        destinations: [\"m:80\"]\n        upstream: {}\n        mcp: { tool: [x] }\n"));
        assert!(e.contains("tool"), "{e}");
        let rule = "version: 1\ntrust_domains: [example.org]\nrules:\n  - name: r\n    action: deny\n    when: 'has(request.mcp) && request[\"mcp\"].tool == \"x\"'\n";
        assert!(err(rule).contains("only `when` of pathways with `mcp`"));
        // A comprehension over the arguments still counts as reading request.mcp.
        let e = err(&base("      - name: p\n        destinations: [\"m:80\"]\n        upstream: {}\n        when: 'request.headers.exists(h, h == request.mcp.tool)'\n"));
        assert!(e.contains("reads request.mcp"), "{e}");
    }

    #[test]
    fn explain_shows_the_mcp_step() {
        let p = policy();
        let source: SpiffeId = RESEARCH.parse().unwrap();
        let req = Request {
            source: &source,
            source_address: None,
            kind: RequestKind::Http,
            method: "POST",
            host: "mcp.internal",
            port: 8080,
            path: "/mcp",
            query: "",
            headers: HeaderView::empty(),
            llm_model: None,
            now: std::time::SystemTime::now(),
        };
        let denied =
            McpCall::from_message(&json!({"method":"tools/call","params":{"name":"delete_repo"}}));
        let text = p.explain_mcp(&req, Some(&denied)).to_string();
        assert!(text.contains("mcp: tools/call \"delete_repo\""), "{text}");
        assert!(
            text.contains("research/docs-mcp: mcp: tool \"delete_repo\" not allowed by mcp.tools"),
            "{text}"
        );
        let allowed = McpCall::from_message(
            &json!({"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/docs/x"}}}),
        );
        let text = p.explain_mcp(&req, Some(&allowed)).to_string();
        assert!(
            text.contains("ALLOWS (mcp.tools entry \"read_*\")"),
            "{text}"
        );
        assert!(text.contains(r#"arguments {"path":"/docs/x"}"#), "{text}");
    }

    #[test]
    fn policy_tests_carry_mcp_messages() {
        let p = policy();
        let cases = parse_tests(
            r#"
tests:
  - name: search is allowed
    source: spiffe://example.org/ns/ai/sa/research
    request: POST http://mcp.internal:8080/mcp
    mcp: { tool: search_docs, arguments: { q: rust } }
    expect: allow
    pathway: docs-mcp
  - name: delete is not
    source: spiffe://example.org/ns/ai/sa/research
    request: POST http://mcp.internal:8080/mcp
    mcp: { method: tools/call, tool: delete_repo }
    expect: deny
  - name: resources by URI
    source: spiffe://example.org/ns/ai/sa/research
    request: POST http://mcp.internal:8080/mcp
    mcp: { method: resources/read, resource: "docs://guide" }
    expect: allow
  - name: this expectation is wrong
    source: spiffe://example.org/ns/ai/sa/research
    request: POST http://mcp.internal:8080/mcp
    mcp: { method: resources/read, resource: "file:///etc/passwd" }
    expect: allow
"#,
            "t.yaml",
        )
        .unwrap();
        let r = run_tests(&p, &cases);
        assert_eq!((r.passed(), r.failed()), (3, 1));
        let f = r.failures().next().unwrap();
        assert_eq!(
            f.why,
            "resource \"file:///etc/passwd\" not allowed by mcp.resources"
        );
        let e = parse_tests(
            "tests:\n  - name: x\n    source: spiffe://example.org/a\n    request: POST http://m:80/\n    mcp: { arguments: {} }\n    expect: allow\n",
            "t.yaml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("mcp: needs `method`"), "{e}");
    }
}
