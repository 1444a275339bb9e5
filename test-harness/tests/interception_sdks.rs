//! Unmodified clients through TLS interception: the official OpenAI and Anthropic
//! Python SDKs and the Node `openai` package through the sidecar, curl through the
//! sidecar, and Go `net/http` and curl directly with a client SVID. Every client keeps
//! its default `https://` base URL and gets only proxy and CA variables; the API hosts
//! resolve, through the gateway's test resolver, to a fake on port 443 of a loopback
//! address of its own.
//!
//! Each: a completion works, the upstream receives the gateway's key and never the
//! agent's, a model the pathway does not list gets a 403 the SDK raises, streaming
//! works, and the audit log has one line per request.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use test_harness::ca::TestCa;
use test_harness::gateway::{GatewayOptions, World};
use test_harness::interop::{
    build_go_client, client_command, interop_dir, interop_python, node_interop, run, with_proxy,
    Steps, AGENT_KEY,
};
use test_harness::llm_upstream::{TlsLlm, FAKE_TEXT};
use test_harness::resolver::StaticResolver;
use test_harness::sidecar::TestSidecar;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const OPENAI_SECRET: &str = "sk-live-openai-0123456789";
const ANTHROPIC_SECRET: &str = "sk-ant-live-0123456789";
const DENIED: &str = "gpt-4o";
const DENIED_CLAUDE: &str = "claude-opus-4";

struct Setup {
    world: World,
    llm: TlsLlm,
    interception: TestCa,
    files: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let listener = test_harness::loopback::bind_unique(443).await.unwrap();
        let ip = listener.local_addr().unwrap().ip().to_string();
        let llm = TlsLlm::start_for_on(listener, &["api.openai.com", "api.anthropic.com"], 10)
            .await
            .unwrap();
        let files = tempfile::tempdir().unwrap();
        let openai_key = files.path().join("openai.key");
        std::fs::write(&openai_key, OPENAI_SECRET).unwrap();
        let anthropic_key = files.path().join("anthropic.key");
        std::fs::write(&anthropic_key, ANTHROPIC_SECRET).unwrap();
        let interception = TestCa::new("interception.test");
        let (ca_cert, ca_key) = interception
            .write_signing_files(files.path(), "interception-ca")
            .unwrap();
        let ca_file = llm.ca_path().display().to_string();
        let policy = format!(
            r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: openai
        destinations: ["api.openai.com:443"]
        methods: [POST]
        models: [gpt-4o-mini]
        allow_cidrs: [127.0.0.0/8]
        upstream:
          ca_file: {ca_file}
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
      - name: anthropic
        destinations: ["api.anthropic.com:443"]
        methods: [POST]
        models: ["claude-haiku-*"]
        allow_cidrs: [127.0.0.0/8]
        upstream:
          ca_file: {ca_file}
          # The SDK sends its key as x-api-key or as a bearer token: replace both.
          inject_headers:
            x-api-key: {{ secret_file: {} }}
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
"#,
            openai_key.display(),
            anthropic_key.display(),
            anthropic_key.display(),
        );
        let resolver = StaticResolver::new()
            .with("api.openai.com", &[ip.as_str()])
            .with("api.anthropic.com", &[ip.as_str()]);
        let world = World::start_with(
            &policy,
            GatewayOptions {
                extra_config: format!(
                    "interception:\n  ca_cert: {}\n  ca_key: {}\n",
                    ca_cert.display(),
                    ca_key.display()
                ),
                resolver: Some(Arc::new(resolver)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        Setup {
            world,
            llm,
            interception,
            files,
        }
    }

    /// The interception CA as the agent's trust file.
    fn trust_file(&self) -> PathBuf {
        let path = self.files.path().join("trust.pem");
        std::fs::write(&path, self.interception.root_pem()).unwrap();
        path
    }

    /// Every request the API got carried the gateway's key, never the agent's.
    fn expect_only_injected_keys(&self, at_least: usize) {
        let seen = self.llm.upstream.requests();
        assert!(seen.len() >= at_least, "{seen:#?}");
        for r in &seen {
            let text = format!("{r:?}");
            assert!(
                !text.contains(AGENT_KEY),
                "the agent's key reached the API: {r:#?}"
            );
            let auth = r.header("authorization").unwrap_or_default();
            assert!(
                auth == format!("Bearer {OPENAI_SECRET}")
                    || auth == format!("Bearer {ANTHROPIC_SECRET}"),
                "{r:#?}"
            );
        }
    }

    /// One audit line per request, each intercepted, `allows` allowed and `denials`
    /// denied; no line for the tunnels that carried them.
    async fn expect_audit(&self, allows: usize, denials: usize) {
        self.world.gateway.wait_for_audit(allows + denials).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let lines = self.world.gateway.audit_lines();
        let http: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "http").collect();
        assert_eq!(http.len(), lines.len(), "a tunnel line: {lines:#?}");
        assert_eq!(
            http.iter().filter(|l| l["decision"] == "allow").count(),
            allows,
            "{lines:#?}"
        );
        assert_eq!(
            http.iter().filter(|l| l["decision"] == "deny").count(),
            denials,
            "{lines:#?}"
        );
        assert!(http
            .iter()
            .all(|l| l["tls_intercepted"] == true && l["source_spiffe_id"] == RESEARCH));
    }
}

fn python_script(name: &str) -> PathBuf {
    interop_dir().join(name)
}

async fn python_sdk_through_the_sidecar(module: &str, script: &str, model: &str, denied: &str) {
    let Some(python) = interop_python(module) else {
        return;
    };
    let s = Setup::start().await;
    let sidecar = TestSidecar::start(&s.world, RESEARCH).await.unwrap();
    let mut cmd = client_command(&python, &s.trust_file(), model);
    cmd.arg(python_script(script))
        .env("EGRESS_TEST_DENIED_MODEL", denied);
    with_proxy(&mut cmd, &sidecar.proxy_url());
    let out = run(cmd).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_403(out.status.success());
    // The SDK's own error text carries the gateway's reason.
    steps.expect_denied_message_names(denied);
    s.expect_only_injected_keys(2);
    s.expect_audit(2, 1).await;
    sidecar.shutdown().await;
    s.world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_openai_sdk_through_the_sidecar() {
    python_sdk_through_the_sidecar("openai", "openai_client.py", "gpt-4o-mini", DENIED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_anthropic_sdk_through_the_sidecar() {
    python_sdk_through_the_sidecar(
        "anthropic",
        "anthropic_client.py",
        "claude-haiku-4-5",
        DENIED_CLAUDE,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_openai_package_through_the_sidecar() {
    let Some(node_dir) = node_interop() else {
        return;
    };
    let s = Setup::start().await;
    let sidecar = TestSidecar::start(&s.world, RESEARCH).await.unwrap();
    let model = "gpt-4o-mini";
    let mut cmd = client_command("node", &s.trust_file(), model);
    cmd.arg(interop_dir().join("openai_client.mjs"))
        .env("EGRESS_NODE_INTEROP", &node_dir)
        .env(
            "NODE_OPTIONS",
            format!(
                "--require {}",
                interop_dir().join("node-proxy-preload.cjs").display()
            ),
        )
        .env("EGRESS_TEST_DENIED_MODEL", DENIED);
    with_proxy(&mut cmd, &sidecar.proxy_url());
    let out = run(cmd).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_403(out.status.success());
    steps.expect_denied_message_names(DENIED);
    s.expect_only_injected_keys(2);
    s.expect_audit(2, 1).await;
    sidecar.shutdown().await;
    s.world.shutdown().await;
}

fn chat_body(model: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_sidecar_with_only_https_proxy_and_a_ca_bundle() {
    let s = Setup::start().await;
    let sidecar = TestSidecar::start(&s.world, RESEARCH).await.unwrap();
    let trust = s.trust_file();
    let mut cmd = client_command("curl", &trust, "");
    cmd.env("CURL_CA_BUNDLE", &trust)
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}\n"])
        .args(["-H", "content-type: application/json", "-H"])
        .arg(format!("authorization: Bearer {AGENT_KEY}"))
        .args(["-d", &chat_body("gpt-4o-mini")])
        .arg("https://api.openai.com/v1/chat/completions");
    with_proxy(&mut cmd, &sidecar.proxy_url());
    let out = run(cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with("200"), "{stdout}");
    assert!(stdout.contains(FAKE_TEXT), "{stdout}");
    s.expect_only_injected_keys(1);
    s.expect_audit(1, 0).await;
    sidecar.shutdown().await;
    s.world.shutdown().await;
}

/// Go negotiates HTTP/2 inside the intercepted TLS and keeps one connection for three
/// requests, presenting its SVID to the gateway itself (no sidecar).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_net_http_directly_with_a_client_svid_over_http2() {
    let build = tempfile::tempdir().unwrap();
    let Some(go_client) = build_go_client(build.path()).await else {
        return;
    };
    let s = Setup::start().await;
    let dir = s.files.path();
    let (cert, key) = s
        .world
        .ca
        .mint_svid(RESEARCH)
        .write_pem_files(dir, "agent")
        .unwrap();
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, s.world.ca.root_pem()).unwrap();
    let model = "gpt-4o-mini";
    let mut cmd = client_command(&go_client, &s.trust_file(), model);
    with_proxy(
        &mut cmd,
        &format!("https://localhost:{}", s.world.gateway.proxy_addr().port()),
    );
    cmd.env("EGRESS_PROXY_CERT", &cert)
        .env("EGRESS_PROXY_KEY", &key)
        .env("EGRESS_PROXY_CA", &bundle)
        .arg("https://api.openai.com/v1/chat/completions")
        .arg("3");
    let out = run(cmd).await;
    let steps = Steps::parse(&out);
    assert!(out.status.success(), "{}", steps.output);
    assert_eq!(steps.lines.len(), 3, "{}", steps.output);
    for (i, l) in steps.lines.iter().enumerate() {
        assert_eq!(l["status"], 200, "{}", steps.output);
        assert_eq!(l["proto"], "HTTP/2.0", "{}", steps.output);
        assert_eq!(l["reused"], i > 0, "{}", steps.output);
    }
    s.expect_only_injected_keys(3);
    s.expect_audit(3, 0).await;
    s.world.shutdown().await;
}
