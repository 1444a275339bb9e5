//! The sidecar end to end, in-process: an agent speaking plain HTTP proxy to the
//! sidecar, the sidecar speaking mTLS (with the agent's SVID from its own Workload API)
//! to the real gateway on port 0, real upstreams behind it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use test_harness::ca::{SvidOptions, TestCa};
use test_harness::gateway::{GatewayOptions, World, GATEWAY_ID};
use test_harness::sidecar::{admin_get, TestSidecar};
use test_harness::test_resolver::LoopbackTestResolver;
use test_harness::upstream::{HttpEcho, TlsEcho};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const RENAMED: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent-v2";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn policy(http_port: u16, tls_port: u16, closed_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
agents:
  - name: research-agent
    id: spiffe://example.org/ns/ai-workloads/sa/*
    pathways:
      - name: allowed-http
        destinations: ["api.allowed.test:{http_port}", "api.allowed.test:{closed_port}"]
        allow_cidrs: [127.0.0.0/8]
      - name: allowed-tls
        destinations: ["api.allowed.test:{tls_port}"]
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

struct Setup {
    w: World,
    sidecar: TestSidecar,
    http: HttpEcho,
    tls: TlsEcho,
    tls_ca: TestCa,
    closed_port: u16,
}

async fn setup() -> Setup {
    let tls_ca = TestCa::new("upstream.test");
    let tls = TlsEcho::start(tls_ca.mint_server_cert(&["api.allowed.test"]))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let opts = GatewayOptions {
        resolver: Some(LoopbackTestResolver::shared()),
        ..Default::default()
    };
    let w = World::start_with(
        &policy(http.addr.port(), tls.addr.port(), closed_port),
        opts,
    )
    .await
    .unwrap();
    let sidecar = TestSidecar::start(&w, RESEARCH).await.unwrap();
    Setup {
        w,
        sidecar,
        http,
        tls,
        tls_ca,
        closed_port,
    }
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A keep-alive HTTP/1.1 connection to the sidecar, as any proxy client opens.
async fn proxy_conn(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>, url: &str, extra: &[(&str, &str)]) -> Reply {
    let uri: http::Uri = url.parse().unwrap();
    let host = uri.authority().map(|a| a.as_str()).unwrap_or("sidecar");
    let mut req = http::Request::get(url).header("host", host);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    sender.ready().await.unwrap();
    let resp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

/// Sends `CONNECT target` on a raw connection; returns the status line's code, the
/// response head and body (for non-2xx) and the stream.
async fn connect(addr: SocketAddr, target: &str) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\ntraceparent: {TRACEPARENT}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0, "sidecar closed: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_carry_the_agent_identity_and_reuse_one_mtls_connection() {
    let s = setup().await;
    let url = format!("http://api.allowed.test:{}/hello?x=1", s.http.addr.port());
    let mut conn = proxy_conn(s.sidecar.listen_addr()).await;
    for i in 0..3 {
        let r = get(&mut conn, &url, &[("traceparent", TRACEPARENT)]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        assert_eq!(r.json()["path"], "/hello");
    }
    // A second agent connection, opened after the first closed, takes the pooled one.
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut conn = proxy_conn(s.sidecar.listen_addr()).await;
    let r = get(&mut conn, &url, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The upstream got the agent's trace context (as the gateway propagates it).
    let seen = s.http.requests();
    assert_eq!(seen.len(), 4);
    let tp = seen[0].header("traceparent").unwrap_or_default();
    assert!(tp.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{tp}");

    let lines = s.w.gateway.wait_for_audit(4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["source_spiffe_id"], RESEARCH, "{l}");
        assert_eq!(l["decision"], "allow");
        assert_eq!(l["kind"], "http");
    }
    assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    // One mTLS connection carried all four requests: the same source address.
    let sources: std::collections::HashSet<_> = lines
        .iter()
        .map(|l| l["source_address"].to_string())
        .collect();
    assert_eq!(sources.len(), 1, "{sources:?}");
    s.sidecar.shutdown().await;
    s.w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_carry_tls_to_the_upstream_one_connection_each() {
    let s = setup().await;
    let target = format!("api.allowed.test:{}", s.tls.addr.port());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.tls_ca.root_cert()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls_config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    for i in 0..2 {
        let (code, head, tcp) = connect(s.sidecar.listen_addr(), &target).await;
        assert_eq!(code, 200, "{head}");
        let name = rustls::pki_types::ServerName::try_from("api.allowed.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls_config.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!("/in-tunnel-{i}"))
            .header("host", "api.allowed.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(&format!("/in-tunnel-{i}")));
    }
    assert_eq!(
        s.tls.snis_seen(),
        vec![Some("api.allowed.test".to_string()); 2]
    );
    let lines = s.w.gateway.wait_for_audit(2).await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["kind"], "connect");
        assert_eq!(l["source_spiffe_id"], RESEARCH);
        assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }
    // One TLS connection per tunnel.
    assert_ne!(lines[0]["source_address"], lines[1]["source_address"]);
    s.sidecar.shutdown().await;
    s.w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_refusals_reach_the_agent_unchanged() {
    let s = setup().await;
    let mut conn = proxy_conn(s.sidecar.listen_addr()).await;

    // Denied by a rule.
    let r = get(&mut conn, "http://pastebin.com/raw/abc", &[]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"]["type"], "egress_denied");
    assert_eq!(j["error"]["rule"], "no-paste-sites");
    assert!(
        j["error"].get("source").is_none(),
        "the gateway's body, not the sidecar's: {j}"
    );

    // Denied because no pathway matches; the connection stays usable.
    let r = get(
        &mut conn,
        &format!("http://api.denied.test:{}/", s.http.addr.port()),
        &[],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "egress_denied");

    // Allowed, but the upstream is down: the gateway's 502.
    let r = get(
        &mut conn,
        &format!("http://api.allowed.test:{}/", s.closed_port),
        &[],
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "upstream_unreachable");

    // A denied CONNECT: the gateway's 403 with its JSON body.
    let (code, head, mut tcp) = connect(s.sidecar.listen_addr(), "pastebin.com:443").await;
    assert_eq!(code, 403, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("application/json"),
        "{head}"
    );
    let mut body = vec![0u8; 4096];
    let n = tcp.read(&mut body).await.unwrap();
    let body = String::from_utf8_lossy(&body[..n]);
    assert!(body.contains("egress_denied"), "{body}");

    // An origin-form request is not a proxy request: the sidecar's own 400.
    let r = get(&mut conn, "/not-a-proxy-request", &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["source"], "sidecar");
    assert_eq!(r.json()["error"]["type"], "bad_request");

    let lines = s.w.gateway.wait_for_audit(4).await;
    assert!(
        lines.iter().all(|l| l["source_spiffe_id"] == RESEARCH),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "connect" && l["decision"] == "deny"),
        "{lines:#?}"
    );
    s.sidecar.shutdown().await;
    s.w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_svid_is_used_without_a_restart() {
    let s = setup().await;
    let url = format!("http://api.allowed.test:{}/", s.http.addr.port());
    let mut conn = proxy_conn(s.sidecar.listen_addr()).await;
    assert_eq!(get(&mut conn, &url, &[]).await.status, 200);

    // The Workload API now serves a different SVID (a re-registered workload makes the
    // change visible in the audit log; an ordinary rotation keeps the ID).
    let mut generation = s.sidecar.running_sidecar().identity().subscribe();
    s.sidecar
        .api
        .update(test_harness::workload_api::WorkloadIdentity {
            svids: vec![s.w.ca.mint(SvidOptions {
                spiffe_id: Some(RENAMED.into()),
                ..Default::default()
            })],
            bundle: vec![s.w.ca.root_cert()],
            federated_bundles: vec![],
        });
    tokio::time::timeout(Duration::from_secs(10), generation.changed())
        .await
        .expect("rotation reached the sidecar")
        .unwrap();

    // Same agent connection: the sidecar drops the gateway connection opened with the
    // old SVID and opens one with the new one.
    assert_eq!(get(&mut conn, &url, &[]).await.status, 200);
    let lines = s.w.gateway.wait_for_audit(2).await;
    assert_eq!(lines[0]["source_spiffe_id"], RESEARCH);
    assert_eq!(lines[1]["source_spiffe_id"], RENAMED);
    s.sidecar.shutdown().await;
    s.w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_another_spiffe_id_is_refused() {
    let s = setup().await;
    let impostor_expected = "spiffe://example.org/ns/egress-gateway/sa/someone-else";
    let wrong = TestSidecar::start_with(&s.w, RESEARCH, impostor_expected, |_| {})
        .await
        .unwrap();
    let mut conn = proxy_conn(wrong.listen_addr()).await;
    let url = format!("http://api.allowed.test:{}/", s.http.addr.port());
    let r = get(&mut conn, &url, &[]).await;
    assert_eq!(r.status, 502, "{}", r.body);
    let j = r.json();
    assert_eq!(j["error"]["type"], "gateway_unreachable");
    assert_eq!(j["error"]["source"], "sidecar");
    let reason = j["error"]["message"].as_str().unwrap();
    assert!(reason.contains("handshake"), "{j}");
    // A sentence naming both IDs, not Rust debug text such as `Other(OtherError(..))`.
    assert!(
        reason.contains(&format!(
            "`{GATEWAY_ID}`, not the expected `{impostor_expected}`"
        )),
        "{j}"
    );
    for debug_text in ["Other(", "OtherError", "UnexpectedPeer", "{", "}"] {
        assert!(!reason.contains(debug_text), "{debug_text} in {j}");
    }
    // The gateway counts the refusal as its certificate rejected, not as garbage.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.w.gateway.metrics().await.unwrap();
        // Every reason is exported from start-up at 0; this one must have moved.
        let counted = m
            .lines()
            .find(|l| {
                l.starts_with(
                    "egress_handshake_failures_total{reason=\"peer_rejected_certificate\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if counted >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.http.requests().is_empty());
    let (code, _, _) = connect(wrong.listen_addr(), "pastebin.com:443").await;
    assert_eq!(code, 502);
    wrong.shutdown().await;
    s.sidecar.shutdown().await;
    s.w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_is_live_at_once_and_ready_with_an_svid() {
    let ca = TestCa::new("example.org");
    // No registration entry yet: the Workload API refuses, as the SPIRE agent does.
    let api = test_harness::workload_api::FakeWorkloadApi::start_in_tempdir(
        test_harness::workload_api::WorkloadIdentity::default(),
    )
    .await
    .unwrap();
    let admin: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut config = egress_gateway::sidecar::SidecarConfig::new(
        "127.0.0.1:1",
        GATEWAY_ID.parse().unwrap(),
        api.endpoint(),
    );
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin = admin;
    config.startup_timeout = Duration::from_secs(30);
    let starting = tokio::spawn(egress_gateway::sidecar::start(config));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        if let Ok(r) = admin_get(admin, "/readyz").await {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "admin port never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for the first X.509-SVID"), "{body}");
    assert_eq!(
        admin_get(admin, "/healthz").await.unwrap(),
        (200, "ok\n".into())
    );

    api.update(test_harness::workload_api::WorkloadIdentity::single(
        &ca, RESEARCH,
    ));
    let running = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("started once the SVID arrived")
        .unwrap()
        .unwrap();
    assert_eq!(running.admin_addr(), admin);
    assert_eq!(
        admin_get(admin, "/readyz").await.unwrap(),
        (200, "ready\n".into())
    );
    running.shutdown().await;
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listener_needs_explicit_consent() {
    let ca = TestCa::new("example.org");
    let api = test_harness::workload_api::FakeWorkloadApi::start_in_tempdir(
        test_harness::workload_api::WorkloadIdentity::single(&ca, RESEARCH),
    )
    .await
    .unwrap();
    let mut config = egress_gateway::sidecar::SidecarConfig::new(
        "127.0.0.1:1",
        GATEWAY_ID.parse().unwrap(),
        api.endpoint(),
    );
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    let err = egress_gateway::sidecar::start(config.clone())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("--allow-non-loopback"), "{err}");
    config.allow_non_loopback = true;
    let running = egress_gateway::sidecar::start(config).await.unwrap();
    assert!(running.listen_addr().ip().is_unspecified());
    running.shutdown().await;
    api.shutdown().await;
}

/// A stand-in gateway that answers every request 429 (the real gateway's limits answer
/// the same way): the sidecar must relay status, `Retry-After` and body unchanged. It
/// also records the client certificate's SPIFFE ID the sidecar presented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_relayed_unchanged() {
    let s = setup().await;
    let gw_svid = s.w.ca.mint_svid(GATEWAY_ID);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.w.ca.root_cert()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(gw_svid.cert_chain.clone(), gw_svid.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_gateway = listener.local_addr().unwrap();
    let peers = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let peers_seen = peers.clone();
    let server_task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let peers = peers_seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let cert_len = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.len())
                    .unwrap_or(0);
                peers.lock().unwrap().push(cert_len);
                let svc = hyper::service::service_fn(|_req| async {
                    let resp = http::Response::builder()
                        .status(429)
                        .header("retry-after", "17")
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(Bytes::from_static(
                            br#"{"error":{"type":"rate_limited","code":"requests_per_minute","message":"over requests_per_minute","rule":null,"limit":"requests_per_minute","trace_id":"t"}}"#,
                        )))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let sidecar = TestSidecar::start_with(&s.w, RESEARCH, GATEWAY_ID, |c| {
        c.gateway = fake_gateway.to_string();
    })
    .await
    .unwrap();
    let mut conn = proxy_conn(sidecar.listen_addr()).await;
    let r = get(
        &mut conn,
        "http://api.openai.test:443/v1/chat/completions",
        &[],
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "17");
    assert_eq!(r.json()["error"]["type"], "rate_limited");
    let (code, head, _) = connect(sidecar.listen_addr(), "api.allowed.test:443").await;
    assert_eq!(code, 429);
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 17"),
        "{head}"
    );
    assert!(peers.lock().unwrap().iter().all(|&len| len > 0));
    sidecar.shutdown().await;
    server_task.abort();
    s.sidecar.shutdown().await;
    s.w.shutdown().await;
}
