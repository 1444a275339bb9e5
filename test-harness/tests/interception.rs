//! TLS interception end to end: an agent that sends `CONNECT api.openai.com:443` and
//! speaks TLS to what it believes is the API gets every request inside decided,
//! limited, injected and audited on its own, as absolute-form L7 requests are.
//!
//! The API hosts resolve (through the gateway's test resolver) to a loopback address of
//! their own where a fake listens on port 443, so clients use their real `https://` URLs.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use test_harness::agent::AgentClient;
use test_harness::ca::TestCa;
use test_harness::gateway::{admin_get, GatewayOptions, World};
use test_harness::llm_upstream::TlsLlm;
use test_harness::resolver::StaticResolver;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const SECRET: &str = "sk-live-0123456789abcdef";
const AGENT_KEY: &str = "Bearer agent-own-key";

/// The interception CA, the fake API behind `api.openai.com:443`, the key file and the
/// gateway, with `research-agent` allowed `POST /v1/chat/...` for `gpt-4o-mini`.
struct Setup {
    world: World,
    llm: TlsLlm,
    interception: TestCa,
    _files: tempfile::TempDir,
    ca_cert: PathBuf,
    ca_key: PathBuf,
}

fn interception_config(cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "interception:\n  ca_cert: {}\n  ca_key: {}\n  leaf_ttl: 1h\ntimeouts: {{ handshake: 2s, request_header: 5s, connect: 5s, idle: 60s }}\n",
        cert.display(),
        key.display()
    )
}

impl Setup {
    async fn start() -> Setup {
        Self::start_with(true).await
    }

    async fn start_with(interception_on: bool) -> Setup {
        Self::start_full(interception_on, None).await
    }

    async fn start_full(interception_on: bool, otlp_endpoint: Option<String>) -> Setup {
        let listener = test_harness::loopback::bind_unique(443).await.unwrap();
        let ip = listener.local_addr().unwrap().ip().to_string();
        let llm = TlsLlm::start_for_on(listener, &["api.openai.com"], 7)
            .await
            .unwrap();
        let files = tempfile::tempdir().unwrap();
        let secret = files.path().join("openai.key");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let interception = TestCa::new("interception.test");
        let (ca_cert, ca_key) = interception
            .write_signing_files(files.path(), "interception-ca")
            .unwrap();
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
        when: 'request.path.startsWith("/v1/chat/")'
        allow_cidrs: [127.0.0.0/8]
        upstream:
          ca_file: {}
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
        limits: {{ llm_tokens_per_hour: 1000 }}
      - name: wikipedia
        destinations: ["en.wikipedia.org:443"]
"#,
            llm.ca_path().display(),
            secret.display(),
        );
        let resolver = StaticResolver::new().with("api.openai.com", &[ip.as_str()]);
        let world = World::start_with(
            &policy,
            GatewayOptions {
                extra_config: if interception_on {
                    interception_config(&ca_cert, &ca_key)
                } else {
                    String::new()
                },
                resolver: Some(std::sync::Arc::new(resolver)),
                otlp_endpoint,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        Setup {
            world,
            llm,
            interception,
            _files: files,
            ca_cert,
            ca_key,
        }
    }

    fn agent(&self) -> AgentClient {
        self.world.agent(RESEARCH).unwrap()
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.interception.root_cert()]
    }
}

fn chat(model: &str) -> Vec<u8> {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

/// An HTTP/1.1 connection inside an intercepted tunnel to `api.openai.com:443`.
async fn intercepted_session(s: &Setup) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let agent = s.agent();
    let tunnel = agent
        .connect_tunnel("api.openai.com:443", &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200, "CONNECT answered {}", tunnel.status);
    let tls = agent
        .tls_through_tunnel(tunnel.stream.unwrap(), "api.openai.com", &s.roots())
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn send(
    session: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    send_traced(session, method, path, body, None).await
}

async fn send_traced(
    session: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Vec<u8>,
    traceparent: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = http::Request::builder();
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let req = req
        .method(method)
        .uri(path)
        .header("host", "api.openai.com")
        .header("authorization", AGENT_KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    session.ready().await.unwrap();
    let resp = session.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn requests_inside_an_intercepted_tunnel_are_each_decided_injected_and_audited() {
    let s = Setup::start().await;
    let mut session = intercepted_session(&s).await;

    // Three requests on one keep-alive connection inside one tunnel.
    let (ok, body) = send(
        &mut session,
        "POST",
        "/v1/chat/completions",
        chat("gpt-4o-mini"),
    )
    .await;
    assert_eq!(ok, 200, "{body}");
    assert_eq!(body["model"], "gpt-4o-mini");
    let (model, body) = send(&mut session, "POST", "/v1/chat/completions", chat("gpt-4o")).await;
    assert_eq!(model, 403, "{body}");
    assert!(body.to_string().contains("gpt-4o"), "{body}");
    let (files, body) = send(&mut session, "GET", "/v1/files", Vec::new()).await;
    assert_eq!(files, 403, "{body}");

    // Only the allowed request reached the API, with the gateway's key, never the agent's.
    let seen = s.llm.upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );
    assert_eq!(
        s.llm.upstream.snis_seen(),
        vec![Some("api.openai.com".to_string())]
    );

    // One audit line per request, none for the tunnel that carried them.
    drop(session);
    let lines = s.world.gateway.wait_for_audit(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = if lines.len() > 3 {
        lines
    } else {
        s.world.gateway.audit_lines()
    };
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["kind"], "http", "{l}");
        assert_eq!(l["tls_intercepted"], true, "{l}");
        assert_eq!(l["host"], "api.openai.com", "{l}");
        assert_eq!(l["port"], 443, "{l}");
        assert_eq!(l["source_spiffe_id"], RESEARCH, "{l}");
        assert!(
            !l.to_string().contains(SECRET),
            "secret in the audit line: {l}"
        );
    }
    let decisions: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap_or_default(),
                l["decision"].as_str().unwrap_or_default(),
                l["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        vec![
            ("POST", "allow", 200),
            ("POST", "deny", 403),
            ("GET", "deny", 403)
        ]
    );
    assert_eq!(lines[1]["reason"], "model \"gpt-4o\" not allowed");
    assert_eq!(lines[2]["reason"], "method not allowed on this pathway");
    s.world.shutdown().await;
}

#[tokio::test]
async fn one_leaf_per_host_and_the_ca_is_served_on_the_admin_listener() {
    let s = Setup::start().await;
    for _ in 0..3 {
        let mut session = intercepted_session(&s).await;
        let (status, _) = send(
            &mut session,
            "POST",
            "/v1/chat/completions",
            chat("gpt-4o-mini"),
        )
        .await;
        assert_eq!(status, 200);
    }
    let metrics = s.world.gateway.metrics().await.unwrap();
    assert_eq!(
        metric(&metrics, "egress_interception_leaf_mints_total"),
        1.0,
        "{metrics}"
    );

    let (status, pem) = admin_get(s.world.gateway.admin_addr(), "/interception-ca.pem")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let served = test_harness::ca::certs_from_pem(&pem);
    assert_eq!(served, vec![s.interception.root_cert()]);
    assert!(!pem.contains("PRIVATE KEY"));
    s.world.shutdown().await;
}

#[tokio::test]
async fn an_intermediate_ca_signs_leaves_that_chain_to_the_org_root() {
    let listener = test_harness::loopback::bind_unique(443).await.unwrap();
    let ip = listener.local_addr().unwrap().ip().to_string();
    let llm = TlsLlm::start_for_on(listener, &["api.openai.com"], 1)
        .await
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let root = TestCa::new("org-root.test");
    let intermediate = root.intermediate();
    let (cert, key) = intermediate
        .write_signing_files(files.path(), "ca")
        .unwrap();
    let policy = format!(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: research-agent\n    id: {RESEARCH}\n    pathways:\n      - name: openai\n        destinations: [\"api.openai.com:443\"]\n        allow_cidrs: [127.0.0.0/8]\n        upstream: {{ ca_file: {} }}\n",
        llm.ca_path().display()
    );
    let world = World::start_with(
        &policy,
        GatewayOptions {
            extra_config: interception_config(&cert, &key),
            resolver: Some(std::sync::Arc::new(
                StaticResolver::new().with("api.openai.com", &[ip.as_str()]),
            )),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = world.agent(RESEARCH).unwrap();
    let tunnel = agent
        .connect_tunnel("api.openai.com:443", &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    // The agent trusts only the org root: the gateway must send the intermediate.
    let tls = agent
        .tls_through_tunnel(
            tunnel.stream.unwrap(),
            "api.openai.com",
            &[root.root_cert()],
        )
        .await
        .unwrap();
    let (mut send_req, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (status, _) = send(&mut send_req, "POST", "/v1/chat/completions", chat("any")).await;
    assert_eq!(status, 200);
    world.shutdown().await;
}

#[tokio::test]
async fn tunnels_with_a_wrong_or_missing_sni_or_no_client_hello_are_refused_and_audited() {
    let s = Setup::start().await;
    let agent = s.agent();

    // SNI naming another host than the CONNECT.
    let tunnel = agent
        .connect_tunnel("api.openai.com:443", &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    let other = agent
        .tls_through_tunnel(tunnel.stream.unwrap(), "en.wikipedia.org", &s.roots())
        .await;
    assert!(other.is_err(), "the gateway completed TLS for another name");

    // No SNI (an IP address as the server name sends none).
    let tunnel = agent
        .connect_tunnel("api.openai.com:443", &[])
        .await
        .unwrap();
    let none = agent
        .tls_through_tunnel(tunnel.stream.unwrap(), "127.0.0.1", &s.roots())
        .await;
    assert!(none.is_err(), "the gateway completed TLS without SNI");

    // A tunnel that never sends a ClientHello (handshake timeout 2s).
    let tunnel = agent
        .connect_tunnel("api.openai.com:443", &[])
        .await
        .unwrap();
    let idle = tunnel.stream.unwrap();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    drop(idle);

    let lines = s.world.gateway.wait_for_audit(3).await;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines
        .iter()
        .all(|l| l["kind"] == "connect" && l["tls_intercepted"] == true));
    let refused: Vec<_> = lines.iter().filter(|l| l["decision"] == "deny").collect();
    assert_eq!(refused.len(), 2, "{lines:#?}");
    assert!(refused.iter().any(|l| l["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("does not match the CONNECT host")));
    assert!(refused.iter().any(|l| l["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("has no SNI")));
    let timed_out = lines.iter().find(|l| l["decision"] == "allow").unwrap();
    assert!(
        timed_out["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no TLS ClientHello"),
        "{timed_out}"
    );
    assert!(s.llm.upstream.requests().is_empty());
    // The CA never signed a leaf for a name the agent's policy does not name.
    let metrics = s.world.gateway.metrics().await.unwrap();
    assert_eq!(
        metric(&metrics, "egress_interception_leaf_mints_total"),
        0.0
    );
    s.world.shutdown().await;
}

#[tokio::test]
async fn without_interception_a_tunnel_to_an_l7_destination_is_refused_with_what_to_do() {
    let s = Setup::start_with(false).await;
    let agent = s.agent();
    let tunnel = agent
        .connect_tunnel("api.openai.com:443", &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 403);
    let body: serde_json::Value = serde_json::from_slice(&tunnel.body).unwrap();
    let text = body.to_string();
    assert!(
        text.contains(
            "destination needs L7 inspection: configure interception or use http://host:port"
        ),
        "{text}"
    );
    let lines = s.world.gateway.wait_for_audit(1).await;
    assert_eq!(lines[0]["decision"], "deny");
    assert!(lines[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("configure interception"));
    // The absolute-form path keeps working without interception.
    let resp = agent
        .request(
            "POST",
            "http://api.openai.com:443/v1/chat/completions",
            &[
                ("authorization", AGENT_KEY),
                ("content-type", "application/json"),
            ],
            chat("gpt-4o-mini"),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        s.llm.upstream.requests()[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );
    s.world.shutdown().await;
}

#[tokio::test]
async fn a_bad_ca_update_keeps_the_previous_ca_and_a_good_one_takes_over() {
    let s = Setup::start().await;
    let before = admin_get(s.world.gateway.admin_addr(), "/interception-ca.pem")
        .await
        .unwrap()
        .1;

    // A key that does not match: rejected, the previous CA stays.
    let stranger = TestCa::new("stranger.test");
    let dir = tempfile::tempdir().unwrap();
    let (_, wrong_key) = stranger.write_signing_files(dir.path(), "x").unwrap();
    std::fs::copy(&wrong_key, &s.ca_key).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut session = intercepted_session(&s).await;
    let (status, _) = send(
        &mut session,
        "POST",
        "/v1/chat/completions",
        chat("gpt-4o-mini"),
    )
    .await;
    assert_eq!(status, 200, "the previous CA must stay in force");
    let during = admin_get(s.world.gateway.admin_addr(), "/interception-ca.pem")
        .await
        .unwrap()
        .1;
    assert_eq!(during, before);

    // A whole new CA (both files): new leaves chain to it.
    let (new_cert, new_key) = stranger.write_signing_files(dir.path(), "y").unwrap();
    std::fs::copy(&new_cert, &s.ca_cert).unwrap();
    std::fs::copy(&new_key, &s.ca_key).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = admin_get(s.world.gateway.admin_addr(), "/interception-ca.pem")
        .await
        .unwrap()
        .1;
    assert_eq!(
        test_harness::ca::certs_from_pem(&after),
        vec![stranger.root_cert()]
    );
    let agent = s.agent();
    let tunnel = agent
        .connect_tunnel("api.openai.com:443", &[])
        .await
        .unwrap();
    let tls = agent
        .tls_through_tunnel(
            tunnel.stream.unwrap(),
            "api.openai.com",
            &[stranger.root_cert()],
        )
        .await;
    assert!(tls.is_ok(), "{:?}", tls.err());
    s.world.shutdown().await;
}

#[tokio::test]
async fn unusable_ca_files_stop_the_gateway_at_start_with_the_file_named() {
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new("interception.test");
    let (cert, key) = ca.write_signing_files(files.path(), "ca").unwrap();
    let other = TestCa::new("other.test");
    let (_, other_key) = other.write_signing_files(files.path(), "other").unwrap();
    let leaf = ca.mint_server_cert(&["not-a-ca.test"]);
    let (leaf_cert, leaf_key) = leaf.write_pem_files(files.path(), "leaf").unwrap();
    let missing = files.path().join("missing.crt");
    let garbage = files.path().join("garbage.key");
    std::fs::write(&garbage, "not a key").unwrap();

    // (ca_cert, ca_key, what the error must say: the key, the file, the problem)
    let cases = [
        (
            missing.clone(),
            key.clone(),
            vec![
                "interception.ca_cert".to_string(),
                missing.display().to_string(),
                "cannot read".into(),
            ],
        ),
        (
            cert.clone(),
            garbage.clone(),
            vec![
                "interception.ca_key".into(),
                garbage.display().to_string(),
                "no usable PEM private key".into(),
            ],
        ),
        (
            cert.clone(),
            other_key.clone(),
            vec![format!(
                "interception.ca_key {} does not match",
                other_key.display()
            )],
        ),
        (
            leaf_cert.clone(),
            leaf_key.clone(),
            vec!["interception.ca_cert".into(), "not a CA certificate".into()],
        ),
        (
            files.path().to_path_buf(),
            key.clone(),
            vec!["interception.ca_cert".into(), "not a regular file".into()],
        ),
    ];
    for (c, k, expected) in cases {
        let err = World::start_with(
            "version: 1\ntrust_domains: [example.org]\nagents: []\n",
            GatewayOptions {
                extra_config: interception_config(&c, &k),
                ..Default::default()
            },
        )
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        for part in &expected {
            assert!(err.contains(part.as_str()), "expected {part:?} in {err:?}");
        }
        assert!(!err.contains("BEGIN"), "key material in the error: {err}");
    }
}

#[tokio::test]
async fn curl_negotiates_http2_inside_the_intercepted_tls_with_its_client_svid() {
    let s = Setup::start().await;
    let dir = tempfile::tempdir().unwrap();
    let svid = s.world.ca.mint_svid(RESEARCH);
    let (cert, key) = svid.write_pem_files(dir.path(), "agent").unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, s.world.ca.root_pem()).unwrap();
    let interception_ca = dir.path().join("interception.pem");
    std::fs::write(&interception_ca, s.interception.root_pem()).unwrap();
    let body = String::from_utf8(chat("gpt-4o-mini")).unwrap();
    let url = "https://api.openai.com/v1/chat/completions";
    // One transfer's options; `--next` repeats them for a second request that reuses
    // the tunnel and its HTTP/2 connection.
    let proxy = format!("https://localhost:{}", s.world.gateway.proxy_addr().port());
    let transfer: Vec<std::ffi::OsString> = [
        "-sS".as_ref(),
        "--http2".as_ref(),
        "--max-time".as_ref(),
        "20".as_ref(),
        "--proxy".as_ref(),
        proxy.as_ref(),
        "--proxy-cert".as_ref(),
        cert.as_os_str(),
        "--proxy-key".as_ref(),
        key.as_os_str(),
        "--proxy-cacert".as_ref(),
        bundle.as_os_str(),
        "--cacert".as_ref(),
        interception_ca.as_os_str(),
        "-H".as_ref(),
        "content-type: application/json".as_ref(),
        "-H".as_ref(),
        format!("authorization: {AGENT_KEY}").as_ref(),
        "-w".as_ref(),
        "\\n%{http_version} %{http_code}\\n".as_ref(),
        "-d".as_ref(),
        body.as_ref(),
        url.as_ref(),
    ]
    .into_iter()
    .map(std::ffi::OsStr::to_os_string)
    .collect();
    let out = tokio::process::Command::new("curl")
        .args(&transfer)
        .arg("--next")
        .args(&transfer)
        .env_remove("CURL_CA_BUNDLE")
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses: Vec<_> = stdout
        .lines()
        .filter(|l| l.starts_with('2') && l.len() < 10)
        .collect();
    assert_eq!(statuses, vec!["2 200", "2 200"], "{stdout}");
    let seen = s.llm.upstream.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|r| r.header("authorization") == Some(&*format!("Bearer {SECRET}"))));
    let lines = s.world.gateway.wait_for_audit(2).await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines
        .iter()
        .all(|l| l["kind"] == "http" && l["decision"] == "allow"));
    s.world.shutdown().await;
}

#[tokio::test]
async fn each_intercepted_request_has_one_span_under_the_agents_trace_and_the_tunnel_none() {
    let otlp = test_harness::otlp::OtlpReceiver::start().await.unwrap();
    let s = Setup::start_full(true, Some(otlp.endpoint())).await;
    let mut session = intercepted_session(&s).await;
    let parents = [
        ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
    ];
    for (trace, parent) in parents {
        let tp = format!("00-{trace}-{parent}-01");
        let (status, _) = send_traced(
            &mut session,
            "POST",
            "/v1/chat/completions",
            chat("gpt-4o-mini"),
            Some(&tp),
        )
        .await;
        assert_eq!(status, 200);
    }
    drop(session);
    let lines = s.world.gateway.wait_for_audit(2).await;
    s.world.gateway.gateway().telemetry().flush().await;
    otlp.wait_for_spans(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.world.gateway.gateway().telemetry().flush().await;
    let spans = otlp.spans();
    assert_eq!(
        spans.len(),
        2,
        "one span per request, none for the tunnel: {spans:#?}"
    );
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for ((trace, parent), line) in parents.iter().zip(&lines) {
        let span = spans
            .iter()
            .find(|sp| sp.trace_id == *trace)
            .unwrap_or_else(|| panic!("no span in trace {trace}: {spans:#?}"));
        assert_eq!(span.parent_span_id, *parent);
        assert_eq!(line["trace_id"], *trace);
        assert_eq!(line["span_id"], span.span_id.as_str());
        assert_eq!(span.str("http.request.method"), Some("POST"));
        assert_eq!(
            span.str("url.full"),
            Some("https://api.openai.com:443/v1/chat/completions")
        );
        assert_eq!(span.str("spiffe.peer_id"), Some(RESEARCH));
        assert_eq!(
            span.attributes.get("egress.tls_intercepted"),
            Some(&test_harness::otlp::AttrValue::Bool(true))
        );
    }
    // The upstream got the gateway's span as its parent.
    for (req, line) in s.llm.upstream.requests().iter().zip(&lines) {
        let tp = req.header("traceparent").unwrap_or_default();
        assert!(
            tp.contains(line["span_id"].as_str().unwrap_or("?")),
            "{tp} vs {line}"
        );
    }
    s.world.shutdown().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_inside_the_tunnel_outlives_the_handshake_timeout() {
    let s = Setup::start().await;
    let mut session = intercepted_session(&s).await;
    let (first, _) = send(
        &mut session,
        "POST",
        "/v1/chat/completions",
        chat("gpt-4o-mini"),
    )
    .await;
    assert_eq!(first, 200);
    // Longer than `timeouts.handshake` (2s here), far shorter than `timeouts.idle`.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let (second, _) = send(
        &mut session,
        "POST",
        "/v1/chat/completions",
        chat("gpt-4o-mini"),
    )
    .await;
    assert_eq!(second, 200);
    assert_eq!(s.llm.upstream.requests().len(), 2);
    s.world.shutdown().await;
}
