//! End-to-end tests of the gateway core: the real server code on port 0, real mTLS,
//! a fake Workload API speaking the real gRPC protocol, real upstream servers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use test_harness::agent::AgentClient;
use test_harness::ca::{SvidOptions, TestCa};
use test_harness::gateway::World;
use test_harness::upstream::{HttpEcho, TlsEcho};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

fn policy(tls_port: u16, http_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
mode: enforce
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: local-tls
        destinations: ["localhost:{tls_port}"]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
      - name: local-http
        destinations: ["localhost:{http_port}"]
        methods: [GET, POST]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
  - name: coding-agent
    id: {CODING}
    pathways:
      - name: docs
        destinations: ["docs.rs:443"]
"#
    )
}

struct Upstreams {
    tls_ca: TestCa,
    tls: TlsEcho,
    http: HttpEcho,
}

async fn upstreams() -> Upstreams {
    let tls_ca = TestCa::new("upstream.test");
    let tls = TlsEcho::start(tls_ca.mint_server_cert(&["localhost"]))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    Upstreams { tls_ca, tls, http }
}

async fn world(up: &Upstreams) -> World {
    World::start(&policy(up.tls.addr.port(), up.http.addr.port()))
        .await
        .unwrap()
}

fn find(
    lines: &[serde_json::Value],
    pred: impl Fn(&serde_json::Value) -> bool,
) -> &serde_json::Value {
    lines
        .iter()
        .find(|l| pred(l))
        .unwrap_or_else(|| panic!("no matching audit line in {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_tunnel_carries_tls_to_the_upstream_and_is_audited() {
    let up = upstreams().await;
    let w = world(&up).await;
    let agent = w.agent(RESEARCH).unwrap();
    let authority = format!("localhost:{}", up.tls.addr.port());

    let tunnel = agent.connect_tunnel(&authority, &[]).await.unwrap();
    assert_eq!(tunnel.status, 200);
    let stream = tunnel.stream.expect("a 200 tunnel has a stream");
    let mut tls = agent
        .tls_through_tunnel(stream, "localhost", &[up.tls_ca.root_cert()])
        .await
        .unwrap();
    tls.write_all(
        b"GET /through-the-tunnel HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("through-the-tunnel"), "{text}");
    assert_eq!(up.tls.snis_seen(), vec![Some("localhost".to_string())]);
    drop(tls);

    let lines = w.gateway.wait_for_audit(1).await;
    let line = find(&lines, |l| l["kind"] == "connect");
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["enforced"], true);
    assert_eq!(line["source_spiffe_id"], RESEARCH);
    assert_eq!(line["agent"], "research-agent");
    assert_eq!(line["pathway"], "local-tls");
    assert_eq!(line["method"], "CONNECT");
    assert_eq!(line["host"], "localhost");
    assert_eq!(line["port"], up.tls.addr.port());
    assert_eq!(line["status"], 200);
    assert_eq!(line["resolved_ip"], "127.0.0.1");
    assert!(line["bytes_sent"].as_u64().unwrap() > 100, "{line}");
    assert!(line["bytes_received"].as_u64().unwrap() > 100, "{line}");
    assert_eq!(line["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(line["span_id"].as_str().unwrap().len(), 16);
    for field in [
        "ts",
        "trace_id",
        "span_id",
        "source_spiffe_id",
        "agent",
        "kind",
        "method",
        "host",
        "port",
        "path",
        "decision",
        "enforced",
        "rule",
        "pathway",
        "reason",
        "status",
        "resolved_ip",
        "bytes_sent",
        "bytes_received",
        "duration_ms",
    ] {
        assert!(
            line.get(field).is_some(),
            "audit line lacks {field}: {line}"
        );
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_tunnel_gets_403_json_and_an_audit_line() {
    let up = upstreams().await;
    let w = world(&up).await;
    let agent = w.agent(RESEARCH).unwrap();

    let tunnel = agent.connect_tunnel("pastebin.com:443", &[]).await.unwrap();
    assert_eq!(tunnel.status, 403);
    let body: serde_json::Value = serde_json::from_slice(&tunnel.body).unwrap();
    // Shaped like the LLM providers' errors, so their SDKs show the message.
    let error = &body["error"];
    assert_eq!(error["type"], "egress_denied");
    assert_eq!(error["code"], "denied_by_rule");
    assert_eq!(error["rule"], "no-paste-sites");
    assert!(!error["message"].as_str().unwrap().is_empty());
    let trace_id = error["trace_id"].as_str().unwrap().to_string();

    // Not on any pathway of the coding agent: denied without a rule.
    let coding = w.agent(CODING).unwrap();
    let other = coding
        .connect_tunnel(&format!("localhost:{}", up.tls.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(other.status, 403);
    let other_body: serde_json::Value = serde_json::from_slice(&other.body).unwrap();
    assert_eq!(other_body["error"]["type"], "egress_denied");
    assert_eq!(other_body["error"]["rule"], serde_json::Value::Null);

    let lines = w.gateway.wait_for_audit(2).await;
    let line = find(&lines, |l| l["trace_id"] == trace_id.as_str());
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["enforced"], true);
    assert_eq!(line["rule"], "no-paste-sites");
    assert_eq!(line["status"], 403);
    assert_eq!(line["host"], "pastebin.com");
    assert_eq!(line["bytes_sent"], 0);
    let line = find(&lines, |l| l["source_spiffe_id"] == CODING);
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["status"], 403);
    assert!(
        up.tls.snis_seen().is_empty(),
        "a denied tunnel reached the upstream"
    );
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_http_allowed_and_denied() {
    let up = upstreams().await;
    let w = world(&up).await;
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{}/v1/things?x=1", up.http.addr.port());

    let mut session = agent.session().await.unwrap();
    for i in 0..3 {
        let resp = session
            .request(
                "POST",
                &url,
                &[("content-type", "text/plain"), ("connection", "keep-alive")],
                format!("hello {i}").into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let echo = resp.json().unwrap();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/v1/things");
        assert_eq!(echo["body"], format!("hello {i}"));
        // The gateway adds its span as the upstream's parent.
        assert!(echo["headers"]["traceparent"].as_str().is_some(), "{echo}");
        assert!(echo["headers"].get("proxy-connection").is_none());
    }
    // Keep-alive both ways: one upstream connection served all three.
    assert_eq!(up.http.connection_count(), 1);

    // A Host header naming another site does not reach the upstream: the gateway
    // sends the authority it decided on.
    let fronted = session
        .request("GET", &url, &[("host", "evil.example")], Vec::new())
        .await
        .unwrap();
    assert_eq!(fronted.status, 200);
    assert_eq!(
        fronted.json().unwrap()["headers"]["host"],
        format!("localhost:{}", up.http.addr.port())
    );

    // Method not on the pathway.
    let denied = session
        .request("DELETE", &url, &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json().unwrap()["error"]["type"], "egress_denied");
    assert_eq!(up.http.requests().len(), 4);

    let lines = w.gateway.wait_for_audit(5).await;
    let allowed: Vec<_> = lines
        .iter()
        .filter(|l| l["decision"] == "allow" && l["method"] == "POST")
        .collect();
    assert_eq!(allowed.len(), 3);
    for l in &allowed {
        assert_eq!(l["kind"], "http");
        assert_eq!(l["pathway"], "local-http");
        assert_eq!(l["path"], "/v1/things");
        assert_eq!(l["status"], 200);
        assert_eq!(l["bytes_sent"], 7);
        assert!(l["bytes_received"].as_u64().unwrap() > 50);
    }
    let denied = find(&lines, |l| l["method"] == "DELETE");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["status"], 403);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_json() {
    let up = upstreams().await;
    let w = world(&up).await;
    let agent = w.agent(RESEARCH).unwrap();
    for (url, why) in [
        ("http://2852039166:80/", "numeric"),
        ("http://0xA9FEA9FE/", "numeric"),
    ] {
        let resp = agent.request("GET", url, &[], Vec::new()).await.unwrap();
        assert_eq!(resp.status, 400, "{url}");
        let body = resp.json().unwrap();
        assert_eq!(body["error"]["type"], "bad_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{body}"
        );
    }
    let tunnel = agent.connect_tunnel("127.1:443", &[]).await.unwrap();
    assert_eq!(tunnel.status, 400);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502() {
    let up = upstreams().await;
    // A port nothing listens on, but allowed by the policy.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let w = World::start(&policy(closed, up.http.addr.port()))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let tunnel = agent
        .connect_tunnel(&format!("localhost:{closed}"), &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 502);
    let body: serde_json::Value = serde_json::from_slice(&tunnel.body).unwrap();
    assert_eq!(body["error"]["type"], "upstream_unreachable");
    let lines = w.gateway.wait_for_audit(1).await;
    assert_eq!(lines[0]["status"], 502);
    assert_eq!(lines[0]["decision"], "allow");
    w.shutdown().await;
}

async fn refused(client: AgentClient) -> String {
    match client.handshake().await {
        Ok(mut s) => {
            // TLS 1.3 clients learn of a rejected certificate on their first read.
            let _ = s
                .write_all(b"CONNECT localhost:1 HTTP/1.1\r\nHost: localhost:1\r\n\r\n")
                .await;
            let mut buf = [0u8; 64];
            match s.read(&mut buf).await {
                Ok(0) => "closed".into(),
                Ok(n) => panic!(
                    "handshake should have been refused, got {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_without_a_valid_svid_are_refused() {
    let up = upstreams().await;
    let w = world(&up).await;
    let addr = w.gateway.proxy_addr();
    let roots = w.roots();

    // A certificate without a SPIFFE ID.
    let no_id = w.ca.mint(SvidOptions {
        spiffe_id: None,
        dns_names: vec!["agent.example.org".into()],
        ..Default::default()
    });
    refused(AgentClient::new(&no_id, &roots, addr).unwrap()).await;

    // A foreign trust domain (its own CA; not in the policy's trust_domains).
    let foreign = TestCa::new("evil.org");
    refused(
        AgentClient::new(
            &foreign.mint_svid("spiffe://evil.org/ns/x/sa/y"),
            &roots,
            addr,
        )
        .unwrap(),
    )
    .await;

    // Right trust domain name, wrong CA.
    let impostor = TestCa::new("example.org");
    refused(AgentClient::new(&impostor.mint_svid(RESEARCH), &roots, addr).unwrap()).await;

    // Expired.
    let now = time::OffsetDateTime::now_utc();
    let expired = w.ca.mint(SvidOptions {
        spiffe_id: Some(RESEARCH.into()),
        not_before: Some(now - time::Duration::hours(2)),
        not_after: Some(now - time::Duration::hours(1)),
        ..Default::default()
    });
    refused(AgentClient::new(&expired, &roots, addr).unwrap()).await;

    // No client certificate at all: a raw rustls client with no client auth.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut root_store = rustls::RootCertStore::empty();
    root_store.add(w.ca.root_cert()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(root_store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    if let Ok(mut s) = connector.connect(name, tcp).await {
        let _ = s.write_all(b"CONNECT localhost:1 HTTP/1.1\r\n\r\n").await;
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf).await;
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "no-cert client was served: {r:?}"
        );
    }

    // None of them reached the proxy: no audit line, and a good agent still works.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(w.gateway.audit_lines().is_empty());
    let ok = w.agent(RESEARCH).unwrap();
    let resp = ok
        .request(
            "GET",
            &format!("http://localhost:{}/", up.http.addr.port()),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_under_continuous_traffic_loses_no_request() {
    let up = upstreams().await;
    let w = Arc::new(world(&up).await);
    let url = format!("http://localhost:{}/ping", up.http.addr.port());
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut workers = Vec::new();
    for worker in 0..4 {
        let (w, url, ok, failed, stop) = (
            w.clone(),
            url.clone(),
            ok.clone(),
            failed.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let agent = w.agent(RESEARCH).unwrap();
            while !stop.load(Ordering::Relaxed) {
                // Half the workers reconnect every time (new handshakes during rotation),
                // half keep one connection alive across it.
                let result = if worker % 2 == 0 {
                    agent.request("GET", &url, &[], Vec::new()).await
                } else {
                    match agent.session().await {
                        Ok(mut s) => {
                            let mut last = None;
                            for _ in 0..5 {
                                last = Some(s.request("GET", &url, &[], Vec::new()).await);
                            }
                            last.expect("five requests")
                        }
                        Err(e) => Err(e),
                    }
                };
                match result {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed.lock().unwrap().push(format!("status {}", r.status)),
                    Err(e) => failed.lock().unwrap().push(format!("{e:#}")),
                }
            }
        }));
    }
    let before = w
        .gateway
        .gateway()
        .identity()
        .current()
        .unwrap()
        .certified_key
        .cert[0]
        .clone();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        w.rotate_gateway_svid();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for h in workers {
        h.await.unwrap();
    }
    let after = w
        .gateway
        .gateway()
        .identity()
        .current()
        .unwrap()
        .certified_key
        .cert[0]
        .clone();
    assert_ne!(
        before, after,
        "the gateway never picked up the rotated SVID"
    );
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "failed requests during rotation: {failed:?}"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "too little traffic to prove anything"
    );

    // A new handshake now sees the newest certificate.
    let agent = w.agent(RESEARCH).unwrap();
    let s = agent.handshake().await.unwrap();
    let presented = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(presented, after);
    Arc::try_unwrap(w)
        .ok()
        .expect("workers are done")
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_report_ready() {
    let up = upstreams().await;
    let w = world(&up).await;
    let admin = w.gateway.admin_addr();
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_tunnels_and_flushes_the_audit_log() {
    let up = upstreams().await;
    let w = world(&up).await;
    let agent = w.agent(RESEARCH).unwrap();

    let tunnel = agent
        .connect_tunnel(&format!("localhost:{}", up.tls.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    let mut tls = agent
        .tls_through_tunnel(
            tunnel.stream.unwrap(),
            "localhost",
            &[up.tls_ca.root_cert()],
        )
        .await
        .unwrap();

    let World { gateway, api, .. } = w;
    let shutdown = tokio::spawn(gateway.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown did not wait for the open tunnel"
    );
    // New connections are no longer accepted...
    assert!(
        agent
            .request("GET", "http://localhost:1/", &[], Vec::new())
            .await
            .is_err(),
        "a new connection was served during shutdown"
    );
    // ...but the open tunnel still carries traffic.
    tls.write_all(b"GET /during-shutdown HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).contains("during-shutdown"));
    drop(tls);

    let lines = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes once the tunnel closes")
        .unwrap();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["kind"], "connect");
    assert!(lines[0]["bytes_received"].as_u64().unwrap() > 0);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_timeout_is_504() {
    // A listener whose accept queue is full: further SYNs are dropped, so a connect
    // hangs until the gateway's connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let up = upstreams().await;
    // Only the IPv4 loopback answer, so the hanging address is the only one tried.
    let resolver = test_harness::resolver::StaticResolver::new().with("localhost", &["127.0.0.1"]);
    let w = World::start_with(
        &policy(port, up.http.addr.port()),
        test_harness::gateway::GatewayOptions {
            extra_config:
                "timeouts: { handshake: 5s, request_header: 5s, connect: 1s, idle: 60s }\n".into(),
            resolver: Some(std::sync::Arc::new(resolver)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let tunnel = agent
        .connect_tunnel(&format!("localhost:{port}"), &[])
        .await
        .unwrap();
    assert_eq!(
        tunnel.status,
        504,
        "{}",
        String::from_utf8_lossy(&tunnel.body)
    );
    let body: serde_json::Value = serde_json::from_slice(&tunnel.body).unwrap();
    assert_eq!(body["error"]["type"], "upstream_timeout");
    let lines = w.gateway.wait_for_audit(1).await;
    assert_eq!(lines[0]["status"], 504);
    assert!(lines[0]["error"].as_str().unwrap().contains("timed out"));
    drop(fillers);
    drop(listener);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_to_a_server_without_tls_fails_closed() {
    let up = upstreams().await;
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "sk-test").unwrap();
    let policy = format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: llm
        destinations: ["localhost:{}"]
        methods: [POST]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
        upstream:
          tls: true
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
"#,
        up.http.addr.port(),
        secret.path().display()
    );
    let w = World::start(&policy).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let r = agent
        .request(
            "POST",
            &format!(
                "http://localhost:{}/v1/chat/completions",
                up.http.addr.port()
            ),
            &[],
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    // The pathway promises TLS upstream; a destination that does not speak it gets no
    // request, and no credential, in clear text.
    assert_eq!(r.status, 502);
    assert!(up.http.requests().is_empty());
    let lines = w.gateway.wait_for_audit(1).await;
    assert_eq!(lines[0]["pathway"], "llm");
    assert!(
        !lines[0].to_string().contains("sk-test"),
        "secret in the audit line"
    );
    w.shutdown().await;
}

/// A server that speaks first (SMTP, SSH): its banner reaches the agent through the
/// tunnel before the agent sends anything, and the rest flows both ways after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_server_that_speaks_first_carries_its_banner_and_then_both_ways() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"220 banner ready\r\n").await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
            }
        }
    });
    let up = upstreams().await;
    let w = World::start(&policy(port, up.http.addr.port()))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let tunnel = agent
        .connect_tunnel(&format!("localhost:{port}"), &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    let mut s = tunnel.stream.unwrap();
    let mut banner = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .expect("the banner arrives without the agent speaking")
        .unwrap();
    assert_eq!(&banner, b"220 banner ready\r\n");
    // More than the first small read, so the relay's own buffers carry the rest.
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&sent).await.unwrap();
    let mut back = vec![0u8; sent.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("the echo comes back")
        .unwrap();
    assert_eq!(back, sent);
    w.shutdown().await;
}
