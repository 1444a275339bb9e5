//! Policy unit tests (`policy test`): the test-file format, running the cases
//! and reporting. Printing is the caller's job.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::decision::Decision;
use crate::error::PolicyError;
use crate::headers::HeaderView;
use crate::load::parse_yaml;
use crate::mcp::{McpCall, PROMPTS_GET, RESOURCES_READ, RESOURCES_SUBSCRIBE, TOOLS_CALL};
use crate::policy::Policy;
use crate::request::{Request, RequestLine};
use crate::spiffe_id::SpiffeId;

/// A policy test file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    pub tests: Vec<TestCase>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    /// The peer's SPIFFE ID.
    pub source: String,
    /// `CONNECT host:port` or `METHOD http://host:port/path?query`.
    pub request: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The LLM model named in the request body (L7).
    #[serde(default)]
    pub model: Option<String>,
    /// The peer's `ip:port` (`source.address` in CEL).
    #[serde(default)]
    pub address: Option<String>,
    /// The JSON-RPC message in the body of a request to an MCP server (`request.mcp`).
    #[serde(default)]
    pub mcp: Option<McpCase>,
    pub expect: Expect,
    /// The pathway that must allow.
    #[serde(default)]
    pub pathway: Option<String>,
    /// The deny rule that must match (or, with `expect: allow`, the dry-run rule).
    #[serde(default)]
    pub rule: Option<String>,
    /// The agent entry the decision must name.
    #[serde(default)]
    pub agent: Option<String>,
}

/// One JSON-RPC message, e.g. `{tool: search_docs, arguments: {query: x}}`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpCase {
    /// The JSON-RPC method; `tools/call` when left out and `tool` is set.
    #[serde(default)]
    pub method: Option<String>,
    /// The tool a `tools/call` calls.
    #[serde(default)]
    pub tool: Option<String>,
    /// The URI of a `resources/read`.
    #[serde(default)]
    pub resource: Option<String>,
    /// The prompt of a `prompts/get`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// `params.arguments` of a `tools/call` or `prompts/get`.
    #[serde(default)]
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

impl McpCase {
    fn to_call(&self) -> Result<McpCall, String> {
        let method = match (&self.method, &self.tool) {
            (Some(m), _) => m.clone(),
            (None, Some(_)) => TOOLS_CALL.to_owned(),
            (None, None) => return Err("mcp: needs `method` (or `tool` for tools/call)".into()),
        };
        let name = match method.as_str() {
            TOOLS_CALL => self.tool.clone(),
            PROMPTS_GET => self.prompt.clone(),
            RESOURCES_READ | RESOURCES_SUBSCRIBE => self.resource.clone(),
            _ => None,
        };
        Ok(McpCall {
            method,
            name,
            arguments: self.arguments.clone(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Allow,
    Deny,
}

#[derive(Debug, thiserror::Error)]
pub enum TestFileError {
    #[error(transparent)]
    Parse(#[from] PolicyError),
    #[error("{file}: test {name:?}: {message}")]
    Case {
        file: String,
        name: String,
        message: String,
    },
}

/// One case, checked up front so a bad file fails before anything runs.
#[derive(Debug, Clone)]
pub struct PreparedCase {
    pub case: TestCase,
    source: SpiffeId,
    line: RequestLine,
    headers: HeaderView,
    address: Option<SocketAddr>,
    /// A Gemini-style path's model, which wins over the case's `model` as it does live.
    path_model: Option<String>,
    mcp: Option<McpCall>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub expected: String,
    pub got: String,
    /// The decision's reason and provenance.
    pub why: String,
}

#[derive(Debug, Clone, Default)]
pub struct TestReport {
    pub cases: Vec<CaseResult>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed).count()
    }
    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }
    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| !c.passed)
    }
}

pub fn parse_tests(yaml: &str, origin: &str) -> Result<Vec<PreparedCase>, TestFileError> {
    let file: TestFile = parse_yaml(yaml, origin)?;
    file.tests
        .into_iter()
        .map(|case| {
            let bad = |message: String| TestFileError::Case {
                file: origin.into(),
                name: case.name.clone(),
                message,
            };
            let source = case
                .source
                .parse::<SpiffeId>()
                .map_err(|e| bad(format!("source {:?}: {e}", case.source)))?;
            let line = RequestLine::parse(&case.request).map_err(|e| bad(e.to_string()))?;
            let address = case
                .address
                .as_deref()
                .map(|a| {
                    a.parse::<SocketAddr>()
                        .map_err(|e| bad(format!("address {a:?}: {e}")))
                })
                .transpose()?;
            let headers = HeaderView::new(&case.headers);
            let path_model = crate::llm_model::model_from_path(&line.path);
            let mcp = case
                .mcp
                .as_ref()
                .map(McpCase::to_call)
                .transpose()
                .map_err(bad)?;
            Ok(PreparedCase {
                source,
                line,
                headers,
                address,
                path_model,
                mcp,
                case,
            })
        })
        .collect()
}

pub fn load_tests(path: &Path) -> Result<Vec<PreparedCase>, TestFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_tests(&text, &path.display().to_string())
}

impl PreparedCase {
    pub fn request(&self) -> Request<'_> {
        Request {
            source: &self.source,
            source_address: self.address,
            kind: self.line.kind,
            method: &self.line.method,
            host: &self.line.host,
            port: self.line.port,
            path: &self.line.path,
            query: &self.line.query,
            headers: &self.headers,
            llm_model: self.path_model.as_deref().or(self.case.model.as_deref()),
            now: SystemTime::now(),
        }
    }
}

pub fn run_tests(policy: &Policy, cases: &[PreparedCase]) -> TestReport {
    TestReport {
        cases: cases.iter().map(|c| run_case(policy, c)).collect(),
    }
}

fn run_case(policy: &Policy, c: &PreparedCase) -> CaseResult {
    let d = policy.evaluate_mcp(&c.request(), c.mcp.as_ref());
    let case = &c.case;
    let mut passed = match case.expect {
        Expect::Allow => d.allowed,
        Expect::Deny => !d.allowed,
    };
    if let Some(p) = &case.pathway {
        passed &= d.pathway_name() == Some(p.as_str());
    }
    if let Some(r) = &case.rule {
        passed &= d.rule.as_deref() == Some(r.as_str()) || d.dry_run_rules.contains(r);
    }
    if let Some(a) = &case.agent {
        passed &= d.agent.as_deref() == Some(a.as_str());
    }
    CaseResult {
        name: case.name.clone(),
        passed,
        expected: expected_text(case),
        got: got_text(&d),
        why: why_text(&d),
    }
}

fn expected_text(c: &TestCase) -> String {
    let mut s = match c.expect {
        Expect::Allow => "allow".to_owned(),
        Expect::Deny => "deny".to_owned(),
    };
    if let Some(a) = &c.agent {
        s.push_str(&format!(", agent {a}"));
    }
    if let Some(p) = &c.pathway {
        s.push_str(&format!(", pathway {p}"));
    }
    if let Some(r) = &c.rule {
        s.push_str(&format!(", rule {r}"));
    }
    s
}

fn got_text(d: &Decision) -> String {
    let mut s = if d.allowed { "allow" } else { "deny" }.to_owned();
    if let Some(a) = &d.agent {
        s.push_str(&format!(", agent {a}"));
    }
    if let Some(p) = d.pathway_name() {
        s.push_str(&format!(", pathway {p}"));
    }
    if let Some(r) = &d.rule {
        s.push_str(&format!(", rule {r}"));
    }
    s
}

fn why_text(d: &Decision) -> String {
    let mut s = d.reason.to_string();
    if !d.dry_run_rules.is_empty() {
        s.push_str(&format!(
            " (dry-run rules that would deny: {})",
            d.dry_run_rules.join(", ")
        ));
    }
    if !d.allowed && !d.enforced {
        s.push_str(" (audit mode: not enforced)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
version: 1
trust_domains: [example.org]
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
agents:
  - name: research-agent
    id: spiffe://example.org/ns/ai-workloads/sa/research-agent
    pathways:
      - name: wikipedia
        destinations: ["*.wikipedia.org:443", "wikipedia.org:443"]
"#;

    #[test]
    fn runs_and_reports() {
        let p = Policy::from_yaml_str(POLICY, "p.yaml").unwrap();
        let cases = parse_tests(
            r#"
tests:
  - name: research agent may read wikipedia
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: CONNECT en.wikipedia.org:443
    headers: { content-type: application/json }
    expect: allow
    pathway: wikipedia
  - name: paste sites stay closed
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: CONNECT pastebin.com:443
    expect: deny
    rule: no-paste-sites
  - name: wrong expectation
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: GET http://example.com:80/
    expect: allow
"#,
            "t.yaml",
        )
        .unwrap();
        let r = run_tests(&p, &cases);
        assert_eq!((r.passed(), r.failed()), (2, 1));
        let f = r.failures().next().unwrap();
        assert_eq!(f.name, "wrong expectation");
        assert_eq!(f.expected, "allow");
        assert_eq!(f.got, "deny, agent research-agent");
        assert_eq!(f.why, "no pathway allows this destination");
    }

    #[test]
    fn invalid_files() {
        let e = parse_tests(
            "tests:\n  - name: x\n    source: nope\n    request: CONNECT a:1\n    expect: allow\n",
            "t.yaml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("t.yaml: test \"x\": source"), "{e}");
        let e = parse_tests("tests:\n  - name: x\n    source: spiffe://e.org/a\n    request: CONNECT a\n    expect: allow\n", "t.yaml").unwrap_err();
        assert!(e.to_string().contains("CONNECT needs host:port"), "{e}");
        let e = parse_tests("tests:\n  - name: x\n    source: spiffe://e.org/a\n    request: CONNECT a:1\n    expect: maybe\n", "t.yaml").unwrap_err();
        assert!(e.to_string().contains("t.yaml:5"), "{e}");
        let e = parse_tests("tests:\n  - name: x\n    sauce: x\n", "t.yaml").unwrap_err();
        assert!(e.to_string().contains("sauce"), "{e}");
    }
}
