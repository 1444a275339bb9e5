//! MCP-aware pathways end to end: a real MCP server (the official Python SDK's MCPServer
//! over Streamable HTTP, `interop/mcp_server.py`) behind the gateway, and the SDK's own
//! client as the agent (`interop/mcp_client.py`), reaching it through the sidecar with
//! nothing but `HTTP_PROXY`. The server logs every tool it runs, so "never reached the
//! server" is checked on the server's side. Also: the east-west
//! `x-forwarded-client-cert` header on an mTLS upstream.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use std::sync::Arc;

use test_harness::ca::TestCa;
use test_harness::gateway::{GatewayOptions, World, GATEWAY_ID};
use test_harness::interop::{self, Steps};
use test_harness::llm_upstream::{LlmTls, LlmUpstream};
use test_harness::resolver::StaticResolver;
use test_harness::sidecar::TestSidecar;

const RESEARCH: &str = "spiffe://example.org/ns/ai/sa/research";
const SUMMARIZER: &str = "spiffe://example.org/ns/ai/sa/summarizer";

fn policy(port: u16) -> String {
    policy_with(port, "{ tls: false }")
}

fn policy_with(port: u16, upstream: &str) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research
    id: {RESEARCH}
    pathways:
      - name: docs-mcp
        destinations: ["127.0.0.1:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {upstream}
        mcp:
          tools: [search_docs, "read_*"]
          resources: ["docs://*"]
        when: 'request.mcp.tool != "read_secrets" && !(request.mcp.tool == "read_file" && request.mcp.arguments.path.startsWith("/etc/"))'
"#
    )
}

/// `interop/mcp_server.py` on a free loopback port; killed on drop.
struct McpServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl McpServer {
    async fn start(python: &Path, args: &[&str]) -> McpServer {
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls.jsonl");
        let mut child = Command::new(python)
            .arg(interop::interop_dir().join("mcp_server.py"))
            .arg("--calls")
            .arg(&calls)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mcp_server.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let first = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            line
        });
        let line = tokio::time::timeout(Duration::from_secs(30), first)
            .await
            .expect("mcp_server.py printed its port in time")
            .unwrap();
        let port = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["port"].as_u64())
            .unwrap_or_else(|| panic!("mcp_server.py said {line:?}")) as u16;
        McpServer { child, port, dir }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    /// What the server executed (tools, resources, prompts), in order.
    fn calls(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("calls.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn tools_run(&self) -> Vec<String> {
        self.calls()
            .iter()
            .filter_map(|c| c["tool"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mcp_client.py MODE URL` as the agent behind the sidecar.
async fn client(python: &Path, sidecar: &TestSidecar, ca: &Path, mode: &str, url: &str) -> Steps {
    let mut cmd = interop::client_command(python, ca, "unused");
    cmd.arg(interop::interop_dir().join("mcp_client.py"))
        .arg(mode)
        .arg(url);
    interop::with_proxy(&mut cmd, &sidecar.proxy_url());
    let out = interop::run(cmd).await;
    let steps = Steps::parse(&out);
    assert!(out.status.success(), "{}", steps.output);
    steps
}

struct Env {
    python: PathBuf,
    server: McpServer,
    /// The MCP endpoint as the agent writes it.
    url: String,
    w: World,
    sidecar: TestSidecar,
    ca_file: tempfile::NamedTempFile,
}

impl Env {
    async fn start(server_args: &[&str]) -> Option<Env> {
        let python = interop::interop_python("mcp")?;
        let server = McpServer::start(&python, server_args).await;
        let w = World::start(&policy(server.port)).await.unwrap();
        let sidecar = TestSidecar::start(&w, RESEARCH).await.unwrap();
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), w.ca.root_pem()).unwrap();
        Some(Env {
            python,
            url: server.url(),
            server,
            w,
            sidecar,
            ca_file,
        })
    }

    async fn run(&self, mode: &str) -> Steps {
        client(
            &self.python,
            &self.sidecar,
            self.ca_file.path(),
            mode,
            &self.url,
        )
        .await
    }

    async fn shutdown(self) -> Vec<Value> {
        self.sidecar.shutdown().await;
        let lines = self.w.gateway.audit_lines();
        self.w.shutdown().await;
        lines
    }
}

fn denied(step: &Value, output: &str) -> String {
    assert_eq!(step["ok"], false, "{step}\n{output}");
    assert_eq!(step["code"], -32001, "{step}\n{output}");
    assert_eq!(step["data"]["type"], "egress_denied", "{step}");
    step["message"].as_str().unwrap_or_default().to_owned()
}

/// The SDK's client through the sidecar: allowed calls work, refused ones come back as
/// JSON-RPC errors and never run, lists show only what the pathway allows.
async fn sdk_session(env: &Env) {
    let s = env.run("sdk").await;
    let out = &s.output;
    // `read_secrets` is listed (`read_*`); `when` refuses it per call.
    assert_eq!(
        s.step("list_tools")["tools"],
        serde_json::json!(["read_file", "read_secrets", "search_docs"]),
        "{out}"
    );
    let search = s.step("search_docs");
    assert_eq!(search["ok"], true, "{out}");
    assert_eq!(search["text"], "3 results for rust", "{out}");
    assert_eq!(s.step("read_file")["text"], "contents of /docs/guide.md");
    let m = denied(s.step("delete_repo"), out);
    assert!(
        m.contains("tool \"delete_repo\" not allowed by mcp.tools"),
        "{m}"
    );
    let m = denied(s.step("read_etc"), out);
    assert!(m.contains("pathway condition not met"), "{m}");

    assert_eq!(
        s.step("list_resources")["uris"],
        serde_json::json!(["docs://guide"]),
        "{out}"
    );
    assert_eq!(s.step("read_guide")["text"], "the guide", "{out}");
    let m = denied(s.step("read_keys"), out);
    assert!(m.contains("resource \"secret://keys\""), "{m}");
    assert_eq!(s.step("list_prompts")["prompts"], serde_json::json!([]));
    denied(s.step("get_prompt"), out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_client_through_the_sidecar_sees_only_allowed_tools_over_sse() {
    let Some(env) = Env::start(&[]).await else {
        return;
    };
    sdk_session(&env).await;
    // Only what the policy allowed ran on the server.
    assert_eq!(env.server.tools_run(), ["search_docs", "read_file"]);
    let reads: Vec<Value> = env
        .server
        .calls()
        .into_iter()
        .filter(|c| c.get("tool").is_none())
        .collect();
    assert_eq!(reads, [serde_json::json!({"resource": "docs://guide"})]);

    let metrics = env.w.gateway.metrics().await.unwrap();
    let lines = env.shutdown().await;
    // One line per JSON-RPC message, naming the tool.
    let line = |tool: &str| {
        lines
            .iter()
            .find(|l| l["mcp_tool"] == tool)
            .unwrap_or_else(|| panic!("no line for {tool}: {lines:#?}"))
    };
    let del = line("delete_repo");
    assert_eq!(del["mcp_method"], "tools/call");
    assert_eq!(del["decision"], "deny");
    assert_eq!(del["agent"], "research");
    assert!(
        del["reason"]
            .as_str()
            .unwrap()
            .contains("not allowed by mcp.tools"),
        "{del}"
    );
    assert_eq!(del["status"], 200, "answered by the gateway: {del}");
    assert_eq!(del["bytes_sent"], 0, "{del}");
    let search = line("search_docs");
    assert_eq!(search["decision"], "allow");
    assert_eq!(search["pathway"], "docs-mcp");
    assert!(search["mcp_request_id"].is_string(), "{search}");
    // The server-to-client stream (a GET with no message) passes through.
    assert!(
        lines
            .iter()
            .any(|l| l["method"] == "GET" && l["decision"] == "allow" && l["mcp_method"].is_null()),
        "{lines:#?}"
    );
    for method in ["initialize", "tools/list", "resources/read"] {
        assert!(
            lines.iter().any(|l| l["mcp_method"] == method),
            "{method}: {lines:#?}"
        );
    }
    // Bounded labels: listed entries by name, anything else `other`.
    assert!(
        metrics.contains(
            r#"egress_mcp_calls_total{agent="research",pathway="docs-mcp",method="tools/call",tool="search_docs",decision="allow"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"egress_mcp_calls_total{agent="research",pathway="docs-mcp",method="tools/call",tool="read_*",decision="allow"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"method="tools/call",tool="other",decision="deny"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains("delete_repo"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_responses_are_filtered_the_same_way() {
    let Some(env) = Env::start(&["--json-response"]).await else {
        return;
    };
    sdk_session(&env).await;
    assert_eq!(env.server.tools_run(), ["search_docs", "read_file"]);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_notifications_and_malformed_bodies() {
    let Some(env) = Env::start(&[]).await else {
        return;
    };
    let s = env.run("raw").await;
    let out = &s.output;
    assert_eq!(s.step("initialize")["status"], 200, "{out}");
    assert_eq!(s.step("initialize")["session"], true, "{out}");
    assert_eq!(s.step("initialized")["status"], 202, "{out}");

    let by_id = |step: &str, id: Value| -> Value {
        s.step(step)["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{step}: no answer for {id}\n{out}"))
    };
    // Mixed: the allowed call ran, the refused one got the gateway's error.
    let mixed = s.step("batch_mixed");
    assert_eq!(mixed["status"], 200, "{out}");
    assert_eq!(
        by_id("batch_mixed", 10.into())["result"]["content"][0]["text"],
        "3 results for batch"
    );
    assert_eq!(
        by_id("batch_mixed", 11.into())["error"]["code"],
        -32001,
        "{out}"
    );
    // All refused: answered by the gateway alone, every id.
    let all = s.step("batch_denied");
    assert_eq!(all["status"], 200, "{out}");
    assert_eq!(all["messages"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(by_id("batch_denied", 12.into())["error"]["code"], -32001);
    let thirteen = by_id("batch_denied", "thirteen".into());
    assert!(
        thirteen["error"]["message"]
            .as_str()
            .unwrap()
            .contains("condition"),
        "{thirteen}"
    );
    // A refused call sent as a notification: refused, nothing to answer by id.
    assert_eq!(s.step("denied_notification")["status"], 403, "{out}");
    // A list in a batch with a refused call: filtered, merged into the stream.
    let list = by_id("batch_list", 20.into());
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["search_docs", "read_file", "read_secrets"], "{out}");
    assert_eq!(by_id("batch_list", 21.into())["error"]["code"], -32001);
    // The server answered with an SSE stream: the gateway's answers went in first.
    let list_step = s.step("batch_list");
    assert!(
        list_step["content_type"]
            .as_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{out}"
    );
    assert_eq!(list_step["messages"][0]["id"], 21, "{out}");
    // Not JSON-RPC: refused, fail closed.
    let bad = s.step("not_jsonrpc");
    assert_eq!(bad["status"], 400, "{out}");
    assert_eq!(bad["messages"][0]["error"]["code"], -32700, "{out}");
    let v1 = s.step("wrong_version");
    assert_eq!(v1["status"], 400, "{out}");
    assert_eq!(v1["messages"][0]["error"]["code"], -32600, "{out}");
    assert_eq!(v1["messages"][0]["id"], 30, "{out}");
    assert_eq!(s.step("delete_session")["status"], 200, "{out}");

    // Of all these calls, only the allowed one in the mixed batch reached the server.
    assert_eq!(env.server.tools_run(), ["search_docs"]);
    let lines = env.shutdown().await;
    // One line per batch message: the mixed batch's two share a trace.
    let ten = lines
        .iter()
        .find(|l| l["mcp_request_id"] == "10")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    let eleven = lines.iter().find(|l| l["mcp_request_id"] == "11").unwrap();
    assert_eq!(ten["trace_id"], eleven["trace_id"]);
    assert_eq!(
        (ten["decision"].as_str(), eleven["decision"].as_str()),
        (Some("allow"), Some("deny"))
    );
    assert_eq!(eleven["mcp_tool"], "delete_repo");
    let notification = lines
        .iter()
        .find(|l| l["mcp_tool"] == "delete_repo" && l["mcp_request_id"].is_null())
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(notification["status"], 403);
    assert!(lines
        .iter()
        .any(|l| l["method"] == "DELETE" && l["decision"] == "allow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_east_west_mcp_server_over_mtls_learns_the_calling_agent() {
    let Some(python) = interop::interop_python("mcp") else {
        return;
    };
    // The workload's SVID comes from the World's CA: start the World first, then the
    // server, then point the policy at its port.
    let w = World::start(&policy_with(1, "{ tls: false }"))
        .await
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let (cert, key) =
        w.ca.mint_svid(SUMMARIZER)
            .write_pem_files(files.path(), "summarizer")
            .unwrap();
    let ca = files.path().join("bundle.pem");
    std::fs::write(&ca, w.ca.root_pem()).unwrap();
    let arg = |p: &Path| p.to_string_lossy().into_owned();
    let (cert, key, ca_arg) = (arg(&cert), arg(&key), arg(&ca));
    let server = McpServer::start(
        &python,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &ca_arg,
        ],
    )
    .await;
    std::fs::write(
        w.gateway.policy_path(),
        policy_with(server.port, &format!("{{ spiffe_id: {SUMMARIZER} }}")),
    )
    .unwrap();
    w.gateway.gateway().reload_policy().await.unwrap();
    let sidecar = TestSidecar::start(&w, RESEARCH).await.unwrap();
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), w.ca.root_pem()).unwrap();
    let env = Env {
        python,
        url: server.url(),
        server,
        w,
        sidecar,
        ca_file,
    };
    // The agent keeps its plain http:// URL; the gateway speaks mTLS to the workload.
    sdk_session(&env).await;
    assert_eq!(env.server.tools_run(), ["search_docs", "read_file"]);
    let expected = format!("By={GATEWAY_ID};URI={RESEARCH}");
    let requests: Vec<Value> = env
        .server
        .calls()
        .into_iter()
        .filter(|c| c.get("headers").is_some())
        .collect();
    assert!(requests.len() >= 5, "{requests:#?}");
    for r in &requests {
        assert_eq!(
            r["headers"]["x-forwarded-client-cert"],
            expected.as_str(),
            "{r}"
        );
    }
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_mcp_server_through_tls_interception() {
    let Some(python) = interop::interop_python("mcp") else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("mcp-ca.test");
    let (cert, key) = server_ca
        .mint_server_cert(&["mcp.test"])
        .write_pem_files(files.path(), "mcp")
        .unwrap();
    let server_ca_file = files.path().join("mcp-ca.pem");
    std::fs::write(&server_ca_file, server_ca.root_pem()).unwrap();
    let arg = |p: &Path| p.to_string_lossy().into_owned();
    let (cert, key) = (arg(&cert), arg(&key));
    let server = McpServer::start(
        &python,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--host-name",
            "mcp.test",
        ],
    )
    .await;
    let interception = TestCa::new("interception.test");
    let (ca_cert, ca_key) = interception
        .write_signing_files(files.path(), "interception-ca")
        .unwrap();
    let policy = policy_with(
        server.port,
        &format!("{{ ca_file: {} }}", server_ca_file.display()),
    )
    .replace("127.0.0.1:", "mcp.test:");
    let w = World::start_with(
        &policy,
        GatewayOptions {
            extra_config: format!(
                "interception:\n  ca_cert: {}\n  ca_key: {}\n",
                ca_cert.display(),
                ca_key.display()
            ),
            resolver: Some(Arc::new(
                StaticResolver::new().with("mcp.test", &["127.0.0.1"]),
            )),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let sidecar = TestSidecar::start(&w, RESEARCH).await.unwrap();
    // The agent trusts the interception CA and keeps its https:// URL.
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), interception.root_pem()).unwrap();
    let env = Env {
        python,
        url: format!("https://mcp.test:{}/mcp", server.port),
        server,
        w,
        sidecar,
        ca_file,
    };
    sdk_session(&env).await;
    assert_eq!(env.server.tools_run(), ["search_docs", "read_file"]);
    let lines = env.shutdown().await;
    let del = lines
        .iter()
        .find(|l| l["mcp_tool"] == "delete_repo")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(del["tls_intercepted"], true, "{del}");
    assert_eq!(del["decision"], "deny", "{del}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learn_mode_proposes_the_tools_the_agent_called() {
    let Some(python) = interop::interop_python("mcp") else {
        return;
    };
    let server = McpServer::start(&python, &[]).await;
    // Audit mode with an empty tool list: every call is let through and logged.
    let current = format!(
        r#"version: 1
trust_domains: [example.org]
mode: audit
agents:
  - name: research
    id: {RESEARCH}
    pathways:
      - name: docs-mcp
        destinations: ["127.0.0.1:{}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ tls: false }}
        mcp:
          tools: []
          resources: ["*"]
          prompts: ["*"]
"#,
        server.port
    );
    let w = World::start(&current).await.unwrap();
    let sidecar = TestSidecar::start(&w, RESEARCH).await.unwrap();
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), w.ca.root_pem()).unwrap();
    let env = Env {
        python,
        url: server.url(),
        server,
        w,
        sidecar,
        ca_file,
    };
    let s = env.run("sdk").await;
    assert_eq!(s.step("delete_repo")["ok"], true, "{}", s.output);
    assert_eq!(
        env.server.tools_run(),
        ["search_docs", "read_file", "read_file", "delete_repo"]
    );
    let lines = env.shutdown().await;
    let unenforced = lines
        .iter()
        .find(|l| l["mcp_tool"] == "delete_repo")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(
        (
            unenforced["decision"].as_str(),
            unenforced["enforced"].as_bool()
        ),
        (Some("deny"), Some(false)),
        "{unenforced}"
    );

    let mut agg = egress_policy::suggest::Aggregator::new(Default::default());
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    for l in &text {
        let e: egress_policy::suggest::AuditEntry<'_> = serde_json::from_str(l).unwrap();
        agg.add(&e).unwrap();
    }
    let suggestion = egress_policy::suggest::suggest(
        agg,
        Some(egress_policy::suggest::Current {
            text: &current,
            origin: "policy.yaml",
        }),
    )
    .unwrap();
    assert!(
        suggestion
            .policy_yaml
            .contains(r#"tools: ["delete_repo", "read_file", "search_docs"]"#),
        "{}",
        suggestion.policy_yaml
    );
    assert!(
        suggestion
            .summary
            .contains("mcp.tools + delete_repo, read_file, search_docs"),
        "{}",
        suggestion.summary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn east_west_requests_carry_the_callers_identity_in_xfcc() {
    let policy_for = |port: u16| {
        format!(
            r#"version: 1
trust_domains: [example.org]
agents:
  - name: research
    id: {RESEARCH}
    pathways:
      - name: summarizer
        destinations: ["127.0.0.1:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream:
          spiffe_id: {SUMMARIZER}
"#
        )
    };
    let w = World::start(&policy_for(1)).await.unwrap();
    let workload = LlmUpstream::start(
        LlmTls::Mutual(w.ca.mint_svid(SUMMARIZER), vec![w.ca.root_cert()]),
        5,
    )
    .await
    .unwrap();
    let port = workload.addr.port();
    std::fs::write(w.gateway.policy_path(), policy_for(port)).unwrap();
    w.gateway.gateway().reload_policy().await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let body = br#"{"model":"m","messages":[]}"#.to_vec();

    let r = agent
        .request("POST", &url, &[], body.clone())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The agent claims to be someone else: the gateway's header replaces the claim.
    let forged =
        "By=spiffe://example.org/ns/ai/sa/summarizer;URI=spiffe://example.org/ns/ai/sa/admin";
    let r = agent
        .request(
            "POST",
            &url,
            &[
                ("x-forwarded-client-cert", forged),
                ("X-Forwarded-Client-Cert", "URI=spiffe://example.org/root"),
            ],
            body,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let expected = format!("By={GATEWAY_ID};URI={RESEARCH}");
    let seen = workload.requests();
    assert_eq!(seen.len(), 2);
    for req in &seen {
        let xfcc: Vec<&str> = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-client-cert"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(xfcc, [expected.as_str()], "{:?}", req.headers);
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pathways_without_spiffe_id_get_no_xfcc() {
    // Only east-west (`upstream.spiffe_id`) pathways name the caller: other upstreams
    // never learn agent identities from the gateway.
    let echo = test_harness::upstream::HttpEcho::start().await.unwrap();
    let port = echo.addr.port();
    let w = World::start(&format!(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: research\n    id: {RESEARCH}\n    pathways:\n      - name: plain\n        destinations: [\"127.0.0.1:{port}\"]\n        allow_cidrs: [127.0.0.0/8]\n        upstream: {{ tls: false }}\n"
    ))
    .await
    .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let r = agent
        .request(
            "GET",
            &format!("http://127.0.0.1:{port}/x"),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(echo.requests()[0].header("x-forwarded-client-cert"), None);
    w.shutdown().await;
}
