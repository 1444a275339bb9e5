//! The interop clients under `test-harness/interop/` (the official openai and anthropic
//! SDKs for Python, openai for Node, and a Go net/http client) against the fake LLM
//! upstream alone, no gateway: proof that the scripts and the fake's wire formats work
//! before the gateway's interception tests drive them.
//!
//! Each client runs twice:
//! - directly, with the SDK's base-URL variable pointing at the fake
//!   (`OPENAI_BASE_URL=https://localhost:<port>/v1`, `ANTHROPIC_BASE_URL=...`) and the
//!   denied-model step skipped;
//! - with the SDK's DEFAULT base URL (`https://api.openai.com/v1`,
//!   `https://api.anthropic.com`) and only proxy and CA variables, through a minimal
//!   CONNECT proxy in this file that sends every tunnel to the fake (whose certificate
//!   names those hosts), with the fake refusing the denied model with 403: the very
//!   environment the gateway's interception tests give the clients.
//!
//! Where the clients live and how they run: [`test_harness::interop`].

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use test_harness::ca::TestCa;
use test_harness::interop::{
    build_go_client, client_command, interop_dir, interop_python, node_interop, run, with_proxy,
    Steps, AGENT_KEY,
};
use test_harness::llm_upstream::{TlsLlm, FAKE_TEXT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const HOSTS: [&str; 2] = ["api.openai.com", "api.anthropic.com"];
const DENIED: &str = "denied-model-x";

// === a minimal CONNECT proxy ===

/// Answers `CONNECT host:port` with 200 and splices the tunnel to 127.0.0.1:`to_port`,
/// whatever the host; records each CONNECT target. With `tls`, clients must first do
/// TLS (mutual, if the config asks for client certificates) to reach it.
struct ConnectProxy {
    addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConnectProxy {
    async fn start(to_port: u16, tls: Option<rustls::ServerConfig>) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let log = targets.clone();
        let acceptor = tls.map(|c| TlsAcceptor::from(Arc::new(c)));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (log, acceptor) = (log.clone(), acceptor.clone());
                conns.spawn(async move {
                    match acceptor {
                        None => tunnel(tcp, to_port, log).await,
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                tunnel(tls, to_port, log).await
                            }
                        }
                    }
                });
            }
        });
        ConnectProxy {
            addr,
            targets,
            task,
        }
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

async fn tunnel<S>(mut client: S, to_port: u16, log: Arc<Mutex<Vec<String>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || client.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut words = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    log.lock().unwrap().push(target.to_string());
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", to_port)).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// How the SDKs send the agent's key.
const OPENAI_AUTH: &[(&str, &str)] = &[("authorization", "Bearer sk-agent-side-dummy-key")];
/// The anthropic SDK has sent `x-api-key`; anthropic 2.x sends `Authorization: Bearer`.
const ANTHROPIC_AUTH: &[(&str, &str)] = &[
    ("x-api-key", AGENT_KEY),
    ("authorization", "Bearer sk-agent-side-dummy-key"),
];

/// What the fake must have recorded for one client run: requests to `path` with
/// `model` and the agent's own key in one of `auth` (no gateway replaced it), the
/// non-streaming call first, then the streaming one.
fn expect_recorded(llm: &TlsLlm, from: usize, path: &str, model: &str, auth: &[(&str, &str)]) {
    let seen = llm.upstream.requests();
    let mine = &seen[from..];
    assert!(mine.len() >= 2, "{mine:#?}");
    for (i, req) in mine.iter().take(2).enumerate() {
        assert_eq!(req.method, "POST");
        assert_eq!(req.uri, path);
        assert!(
            auth.iter().any(|(h, v)| req.header(h) == Some(*v)),
            "the agent's key in one of {auth:?}: {req:#?}"
        );
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["model"], model, "{body}");
        assert_eq!(body["stream"].as_bool() == Some(true), i == 1, "{body}");
    }
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_openai_sdk_against_the_fake() {
    let Some(python) = interop_python("openai") else {
        return;
    };
    let llm = TlsLlm::start_for(&HOSTS, 10).await.unwrap();
    let script = interop_dir().join("openai_client.py");
    let model = "gpt-4o-mini";

    let mut direct = client_command(&python, llm.ca_path(), model);
    direct.arg(&script).env(
        "OPENAI_BASE_URL",
        format!("https://localhost:{}/v1", llm.upstream.addr.port()),
    );
    let out = run(direct).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_skipped(out.status.success());
    expect_recorded(&llm, 0, "/v1/chat/completions", model, OPENAI_AUTH);

    let from = llm.upstream.requests().len();
    llm.upstream.refuse_model(DENIED);
    let proxy = ConnectProxy::start(llm.upstream.addr.port(), None).await;
    let mut proxied = client_command(&python, llm.ca_path(), model);
    proxied.arg(&script).env("EGRESS_TEST_DENIED_MODEL", DENIED);
    with_proxy(&mut proxied, &format!("http://{}", proxy.addr));
    let out = run(proxied).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_403(out.status.success());
    expect_recorded(&llm, from, "/v1/chat/completions", model, OPENAI_AUTH);
    // One client for all three calls; the openai SDKs stop reading a stream at
    // `[DONE]` and so drop that connection: a second tunnel follows it.
    let targets = proxy.targets();
    assert!(!targets.is_empty() && targets.len() <= 2, "{targets:?}");
    assert!(
        targets.iter().all(|t| t == "api.openai.com:443"),
        "{targets:?}"
    );
    let snis = llm.upstream.snis_seen();
    assert_eq!(snis.last().unwrap().as_deref(), Some("api.openai.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_anthropic_sdk_against_the_fake() {
    let Some(python) = interop_python("anthropic") else {
        return;
    };
    let llm = TlsLlm::start_for(&HOSTS, 10).await.unwrap();
    let script = interop_dir().join("anthropic_client.py");
    let model = "claude-haiku-4-5";

    let mut direct = client_command(&python, llm.ca_path(), model);
    direct.arg(&script).env(
        "ANTHROPIC_BASE_URL",
        format!("https://localhost:{}", llm.upstream.addr.port()),
    );
    let out = run(direct).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_skipped(out.status.success());
    // The fake's usage came through the SDK's parsers: 10 tokens, 5 in and 5 out.
    assert_eq!(steps.step("completion")["usage"]["output_tokens"], 5);
    assert_eq!(steps.step("stream")["usage"]["output_tokens"], 5);
    assert_eq!(steps.step("stream")["stop_reason"], "end_turn");
    expect_recorded(&llm, 0, "/v1/messages", model, ANTHROPIC_AUTH);
    let first = &llm.upstream.requests()[0];
    assert!(first.header("anthropic-version").is_some(), "{first:#?}");

    let from = llm.upstream.requests().len();
    llm.upstream.refuse_model(DENIED);
    let proxy = ConnectProxy::start(llm.upstream.addr.port(), None).await;
    let mut proxied = client_command(&python, llm.ca_path(), model);
    proxied.arg(&script).env("EGRESS_TEST_DENIED_MODEL", DENIED);
    with_proxy(&mut proxied, &format!("http://{}", proxy.addr));
    let out = run(proxied).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_403(out.status.success());
    expect_recorded(&llm, from, "/v1/messages", model, ANTHROPIC_AUTH);
    // One client, one kept-alive tunnel for all three calls.
    let targets = proxy.targets();
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert!(
        targets.iter().all(|t| t == "api.anthropic.com:443"),
        "{targets:?}"
    );
    let snis = llm.upstream.snis_seen();
    assert_eq!(snis.last().unwrap().as_deref(), Some("api.anthropic.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_openai_sdk_against_the_fake() {
    let Some(node_dir) = node_interop() else {
        return;
    };
    let llm = TlsLlm::start_for(&HOSTS, 10).await.unwrap();
    let script = interop_dir().join("openai_client.mjs");
    let preload = interop_dir().join("node-proxy-preload.cjs");
    let model = "gpt-4o-mini";
    let node = |cmd: &mut Command| {
        cmd.arg(&script)
            .env("EGRESS_NODE_INTEROP", &node_dir)
            .env("NODE_OPTIONS", format!("--require {}", preload.display()));
    };

    let mut direct = client_command("node", llm.ca_path(), model);
    node(&mut direct);
    direct.env(
        "OPENAI_BASE_URL",
        format!("https://localhost:{}/v1", llm.upstream.addr.port()),
    );
    let out = run(direct).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_skipped(out.status.success());
    expect_recorded(&llm, 0, "/v1/chat/completions", model, OPENAI_AUTH);

    let from = llm.upstream.requests().len();
    llm.upstream.refuse_model(DENIED);
    let proxy = ConnectProxy::start(llm.upstream.addr.port(), None).await;
    let mut proxied = client_command("node", llm.ca_path(), model);
    node(&mut proxied);
    proxied.env("EGRESS_TEST_DENIED_MODEL", DENIED);
    with_proxy(&mut proxied, &format!("http://{}", proxy.addr));
    let out = run(proxied).await;
    let steps = Steps::parse(&out);
    steps.expect_answers(model);
    steps.expect_denied_403(out.status.success());
    expect_recorded(&llm, from, "/v1/chat/completions", model, OPENAI_AUTH);
    // One client for all three calls; the openai SDKs stop reading a stream at
    // `[DONE]` and so drop that connection: a second tunnel follows it.
    let targets = proxy.targets();
    assert!(!targets.is_empty() && targets.len() <= 2, "{targets:?}");
    assert!(
        targets.iter().all(|t| t == "api.openai.com:443"),
        "{targets:?}"
    );
}

/// The Go client speaks HTTP/2 to the fake (ALPN) and keeps one connection, directly
/// and through an HTTPS proxy that requires its client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_against_the_fake_over_h2() {
    let build_dir = tempfile::tempdir().unwrap();
    let Some(go_client) = build_go_client(build_dir.path()).await else {
        return;
    };
    let llm = TlsLlm::start_for(&HOSTS, 10).await.unwrap();
    let model = "gpt-4o-mini";
    let expect_three_on_one_h2_connection = |out: &std::process::Output| {
        let steps = Steps::parse(out);
        assert!(out.status.success(), "{}", steps.output);
        assert_eq!(steps.lines.len(), 3, "{}", steps.output);
        for (i, l) in steps.lines.iter().enumerate() {
            assert_eq!(l["status"], 200, "{}", steps.output);
            assert_eq!(l["proto"], "HTTP/2.0", "{}", steps.output);
            assert_eq!(l["reused"], i > 0, "{}", steps.output);
            let body: Value = serde_json::from_str(l["body"].as_str().unwrap()).unwrap();
            assert_eq!(body["model"], model);
            assert_eq!(body["choices"][0]["message"]["content"], FAKE_TEXT);
        }
    };

    let mut direct = client_command(&go_client, llm.ca_path(), model);
    direct
        .arg(format!(
            "https://localhost:{}/v1/chat/completions",
            llm.upstream.addr.port()
        ))
        .arg("3");
    let out = run(direct).await;
    expect_three_on_one_h2_connection(&out);
    assert_eq!(llm.upstream.handshakes(), 1);
    assert!(llm
        .upstream
        .http_versions()
        .iter()
        .all(|v| *v == http::Version::HTTP_2));
    let first = &llm.upstream.requests()[0];
    assert_eq!(first.uri, "/v1/chat/completions");
    assert_eq!(
        first.header(":authority"),
        Some(format!("localhost:{}", llm.upstream.addr.port()).as_str())
    );
    assert_eq!(
        first.header("authorization"),
        Some(format!("Bearer {AGENT_KEY}").as_str())
    );

    // An https:// proxy that demands a client certificate from its own CA.
    let proxy_ca = TestCa::new("proxy-ca.test");
    let client_ca = TestCa::new("client-ca.test");
    let server_cert = proxy_ca.mint_server_cert(&["127.0.0.1", "localhost"]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.root_cert()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_cert.cert_chain.clone(), server_cert.clone_key())
        .unwrap();
    let proxy = ConnectProxy::start(llm.upstream.addr.port(), Some(tls)).await;
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = client_ca
        .mint_server_cert(&["agent.test"])
        .write_pem_files(files.path(), "client")
        .unwrap();
    let proxy_ca_file = files.path().join("proxy-ca.pem");
    std::fs::write(&proxy_ca_file, proxy_ca.root_pem()).unwrap();

    let handshakes = llm.upstream.handshakes();
    let mut proxied = client_command(&go_client, llm.ca_path(), model);
    with_proxy(&mut proxied, &format!("https://{}", proxy.addr));
    proxied
        .env("EGRESS_PROXY_CERT", &cert)
        .env("EGRESS_PROXY_KEY", &key)
        .env("EGRESS_PROXY_CA", &proxy_ca_file)
        .arg("https://api.openai.com/v1/chat/completions")
        .arg("3");
    let out = run(proxied).await;
    expect_three_on_one_h2_connection(&out);
    assert_eq!(proxy.targets(), vec!["api.openai.com:443".to_string()]);
    assert_eq!(llm.upstream.handshakes(), handshakes + 1);
    assert_eq!(
        llm.upstream.snis_seen().last().unwrap().as_deref(),
        Some("api.openai.com")
    );

    // Without the client certificate the proxy refuses the TLS handshake.
    let mut no_cert = client_command(&go_client, llm.ca_path(), model);
    with_proxy(&mut no_cert, &format!("https://{}", proxy.addr));
    no_cert
        .env("EGRESS_PROXY_CA", &proxy_ca_file)
        .arg("https://api.openai.com/v1/chat/completions");
    let out = run(no_cert).await;
    let steps = Steps::parse(&out);
    assert!(steps.lines[0]["error"].is_string(), "{}", steps.output);
    assert_eq!(proxy.targets().len(), 1);
}
