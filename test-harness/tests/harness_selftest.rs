//! Proves the harness pieces work on their own, before the gateway is involved.

use std::sync::Arc;
use std::time::Duration;

use spiffe::{TrustDomain, X509Source, X509Svid};
use test_harness::agent::{AgentClient, AgentError};
use test_harness::ca::{SvidOptions, TestCa};
use test_harness::upstream::{CannedResponse, HttpEcho, TcpCounter, TlsEcho};
use test_harness::workload_api::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use test_harness::workload_api::pb::X509svidRequest;
use test_harness::workload_api::{FakeWorkloadApi, IdentityFixture, WorkloadIdentity};

const GATEWAY_ID: &str = "spiffe://example.org/ns/egress-gateway/sa/egress-gateway";
const AGENT_ID: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";

fn parse(svid: &test_harness::ca::Svid) -> Result<X509Svid, spiffe::X509SvidError> {
    let chain: Vec<u8> = svid
        .cert_chain
        .iter()
        .flat_map(|c| c.as_ref().to_vec())
        .collect();
    X509Svid::parse_from_der(&chain, svid.key.secret_pkcs8_der())
}

async fn source(endpoint: &str) -> X509Source {
    X509Source::builder()
        .endpoint(endpoint)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200))
        .initial_sync_timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("X509Source syncs with the fake Workload API")
}

// === CA ===

#[test]
fn minted_svids_are_valid_x509_svids() {
    let ca = TestCa::new("example.org");
    assert_eq!(ca.trust_domain(), "example.org");
    let svid = ca.mint_svid(AGENT_ID);
    assert_eq!(svid.spiffe_id.as_deref(), Some(AGENT_ID));
    assert_eq!(svid.cert_chain.len(), 1);
    let parsed = parse(&svid).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), AGENT_ID);

    // The root is a valid bundle authority for the trust domain.
    let bundle = spiffe::X509Bundle::parse_from_der(
        TrustDomain::new("example.org").unwrap(),
        ca.root_cert().as_ref(),
    )
    .unwrap();
    assert_eq!(bundle.authorities().len(), 1);

    // PEM round trip.
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = svid.write_pem_files(dir.path(), "agent").unwrap();
    let pem = std::fs::read_to_string(crt).unwrap();
    assert_eq!(test_harness::ca::certs_from_pem(&pem), svid.cert_chain);
    assert!(std::fs::read_to_string(key)
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    assert!(ca.root_pem().contains("BEGIN CERTIFICATE"));
}

#[test]
fn non_svid_certificates_are_rejected_by_the_spiffe_crate() {
    let ca = TestCa::new("example.org");
    // No URI SAN at all.
    assert!(parse(&ca.mint_server_cert(&["localhost", "127.0.0.1"])).is_err());
    // Two URI SANs.
    let two = ca.mint(SvidOptions {
        spiffe_id: Some(AGENT_ID.into()),
        extra_uris: vec!["spiffe://example.org/other".into()],
        ..Default::default()
    });
    assert!(parse(&two).is_err());
}

#[test]
fn server_certs_and_validity_options() {
    let ca = TestCa::new("example.org");
    let cert = ca.mint_server_cert(&["localhost", "127.0.0.1"]);
    let (_, x) = x509_parser::parse_x509_certificate(cert.cert_chain[0].as_ref()).unwrap();
    let san = x.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(names.iter().any(|n| n.contains("localhost")), "{names:?}");
    assert!(names.iter().any(|n| n.contains("7f:00:00:01")), "{names:?}");

    let expired = ca.mint(SvidOptions {
        spiffe_id: Some(AGENT_ID.into()),
        not_before: Some(time::OffsetDateTime::now_utc() - time::Duration::hours(2)),
        not_after: Some(time::OffsetDateTime::now_utc() - time::Duration::hours(1)),
        ..Default::default()
    });
    let (_, x) = x509_parser::parse_x509_certificate(expired.cert_chain[0].as_ref()).unwrap();
    assert!(!x.validity().is_valid());

    let short = ca.mint(SvidOptions {
        spiffe_id: Some(AGENT_ID.into()),
        ttl: Some(Duration::from_secs(60)),
        ..Default::default()
    });
    let (_, x) = x509_parser::parse_x509_certificate(short.cert_chain[0].as_ref()).unwrap();
    let left = x.validity().time_to_expiration().unwrap();
    assert!(left <= time::Duration::seconds(60) && left > time::Duration::seconds(30));
}

#[test]
fn two_cas_for_the_same_trust_domain_have_different_keys() {
    let a = TestCa::new("example.org");
    let b = TestCa::new("example.org");
    let other = TestCa::new("other.org");
    assert_ne!(a.root_cert(), b.root_cert());
    assert_eq!(other.trust_domain(), "other.org");
    assert!(parse(&other.mint_svid("spiffe://other.org/agent")).is_ok());
}

// === fake Workload API ===

#[tokio::test]
async fn x509_source_receives_the_svid_and_bundles_and_follows_rotation() {
    let ca = TestCa::new("example.org");
    let partner = TestCa::new("partner.org");
    let api = FakeWorkloadApi::start_in_tempdir(WorkloadIdentity {
        svids: vec![ca.mint_svid(GATEWAY_ID)],
        bundle: vec![ca.root_cert()],
        federated_bundles: vec![("partner.org".into(), vec![partner.root_cert()])],
    })
    .await
    .unwrap();
    assert!(api.endpoint().starts_with("unix:///"));
    assert!(api.socket_path().exists());

    let source = source(&api.endpoint()).await;
    let svid = source.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), GATEWAY_ID);
    let first = svid.leaf().as_bytes().to_vec();
    let bundles = source.bundle_set().unwrap();
    for (td, root) in [
        ("example.org", ca.root_cert()),
        ("partner.org", partner.root_cert()),
    ] {
        let b = bundles
            .get(&TrustDomain::new(td).unwrap())
            .unwrap_or_else(|| panic!("bundle for {td}"));
        assert_eq!(b.authorities()[0].as_bytes(), root.as_ref());
    }

    // Rotation: the open stream carries the new SVID.
    let mut updates = source.updated();
    let rotated = ca.mint_svid(GATEWAY_ID);
    api.update(WorkloadIdentity {
        svids: vec![rotated.clone()],
        bundle: vec![ca.root_cert()],
        federated_bundles: vec![],
    });
    tokio::time::timeout(Duration::from_secs(10), updates.changed())
        .await
        .expect("rotation notifies")
        .unwrap();
    let now = source.svid().unwrap().leaf().as_bytes().to_vec();
    assert_ne!(now, first);
    assert_eq!(now, rotated.cert_chain[0].as_ref());

    source.shutdown().await;
    api.shutdown().await;
}

#[tokio::test]
async fn the_plain_client_sees_bundles_from_the_bundle_stream() {
    let fx = IdentityFixture::start(TestCa::new("example.org"), GATEWAY_ID, &["gateway"])
        .await
        .unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(fx.api.endpoint())
        .await
        .unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let b = bundles
        .get(&TrustDomain::new("example.org").unwrap())
        .unwrap();
    assert_eq!(b.authorities()[0].as_bytes(), fx.ca.root_cert().as_ref());
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), GATEWAY_ID);
}

#[tokio::test]
async fn identity_fixture_rotates_on_demand() {
    let fx = IdentityFixture::start(TestCa::new("example.org"), GATEWAY_ID, &["gateway"])
        .await
        .unwrap();
    let source = source(&fx.api.endpoint()).await;
    let before = source.svid().unwrap().leaf().as_bytes().to_vec();
    let mut updates = source.updated();
    let new = fx.rotate();
    assert_eq!(new.spiffe_id.as_deref(), Some(GATEWAY_ID));
    tokio::time::timeout(Duration::from_secs(10), updates.changed())
        .await
        .unwrap()
        .unwrap();
    let after = source.svid().unwrap().leaf().as_bytes().to_vec();
    assert_ne!(before, after);
    assert_eq!(after, new.cert_chain[0].as_ref());
    source.shutdown().await;
}

#[tokio::test]
async fn calls_without_the_security_header_are_rejected() {
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(WorkloadIdentity::single(&ca, GATEWAY_ID))
        .await
        .unwrap();
    let mut client = SpiffeWorkloadApiClient::connect(api.endpoint())
        .await
        .unwrap();

    let err = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect_err("no header, no identity");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");

    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, GATEWAY_ID);
    api.shutdown().await;
}

#[tokio::test]
async fn outages_end_streams_and_the_source_recovers() {
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(WorkloadIdentity::single(&ca, GATEWAY_ID))
        .await
        .unwrap();
    let source = Arc::new(source(&api.endpoint()).await);
    let mut updates = source.updated();

    api.set_unavailable(true);
    let mut client = SpiffeWorkloadApiClient::connect(api.endpoint())
        .await
        .unwrap();
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = client.fetch_x509svid(req).await.expect_err("down");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    // The source keeps serving its last SVID during the outage.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(source.svid().unwrap().spiffe_id().to_string(), GATEWAY_ID);

    // Material pushed while down arrives once the API is back.
    let rotated = ca.mint_svid(GATEWAY_ID);
    api.update(WorkloadIdentity {
        svids: vec![rotated.clone()],
        bundle: vec![ca.root_cert()],
        federated_bundles: vec![],
    });
    api.set_unavailable(false);
    tokio::time::timeout(
        Duration::from_secs(10),
        updates.wait_for(|_| {
            source
                .svid()
                .map(|s| s.leaf().as_bytes() == rotated.cert_chain[0].as_ref())
                .unwrap_or(false)
        }),
    )
    .await
    .expect("source picks up material after the outage")
    .unwrap();
    source.shutdown().await;
    api.shutdown().await;
}

#[tokio::test]
async fn stop_and_restart_on_the_same_socket() {
    let ca = TestCa::new("example.org");
    let mut api = FakeWorkloadApi::start_in_tempdir(WorkloadIdentity::single(&ca, GATEWAY_ID))
        .await
        .unwrap();
    let source = source(&api.endpoint()).await;
    tokio::time::timeout(Duration::from_secs(5), api.stop())
        .await
        .expect("stop does not hang on open streams");
    assert!(!api.socket_path().exists());
    assert!(SpiffeWorkloadApiClient::connect(api.endpoint())
        .await
        .is_err());
    api.restart().await.unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(api.endpoint())
        .await
        .unwrap();
    assert_eq!(
        client
            .fetch_x509_svid()
            .await
            .unwrap()
            .spiffe_id()
            .to_string(),
        GATEWAY_ID
    );
    assert!(source.svid().is_ok());
    source.shutdown().await;
    api.shutdown().await;
}

// === upstreams ===

async fn http_get<S>(io: S, uri: &str, host: &str) -> (u16, serde_json::Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(uri)
        .header("host", host)
        .header("x-test", "1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test]
async fn http_echo_echoes_records_and_keeps_connections_alive() {
    use http_body_util::BodyExt;
    let echo = HttpEcho::start().await.unwrap();
    let tcp = tokio::net::TcpStream::connect(echo.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..2 {
        let req = hyper::Request::post(format!("/v1/things?i={i}"))
            .header("host", "example.com")
            .header("x-agent", "research")
            .body(http_body_util::Full::new(bytes::Bytes::from("hello")))
            .unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["method"], "POST");
        assert_eq!(json["path"], "/v1/things");
        assert_eq!(json["query"], format!("i={i}"));
        assert_eq!(json["headers"]["x-agent"], "research");
        assert_eq!(json["body"], "hello");
    }
    let reqs = echo.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].uri, "/v1/things?i=1");
    assert_eq!(reqs[0].header("X-Agent"), Some("research"));
    assert_eq!(reqs[0].body, b"hello");
    assert_eq!(
        echo.connection_count(),
        1,
        "keep-alive reuses the connection"
    );

    // Dropping the handle closes the keep-alive connection too.
    drop(echo);
    let req = hyper::Request::get("/after-drop")
        .header("host", "example.com")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let after = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await;
    assert!(
        matches!(after, Ok(Err(_))),
        "the keep-alive connection should be closed"
    );
}

#[tokio::test]
async fn http_echo_custom_responder() {
    let echo = HttpEcho::start_with(|req| {
        (req.method == "POST")
            .then(|| CannedResponse::json(200, &serde_json::json!({"usage": {"total_tokens": 42}})))
    })
    .await
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(echo.addr).await.unwrap();
    let (status, json) = http_get(tcp, "/echo", "x").await;
    assert_eq!(status, 200);
    assert_eq!(json["path"], "/echo");
    let tcp = tokio::net::TcpStream::connect(echo.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            hyper::Request::post("/v1/chat/completions")
                .header("host", "x")
                .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["usage"]["total_tokens"],
        42
    );
    assert_eq!(echo.requests().len(), 2);
}

#[tokio::test]
async fn tls_echo_reports_sni() {
    let ca = TestCa::new("upstream.test");
    let echo = TlsEcho::start(ca.mint_server_cert(&["localhost", "127.0.0.1"]))
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_cert()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));

    for name in ["localhost", "127.0.0.1"] {
        let tcp = tokio::net::TcpStream::connect(echo.addr).await.unwrap();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let tls = connector.connect(server_name, tcp).await.unwrap();
        let (status, json) = http_get(tls, "/tls?x=1", name).await;
        assert_eq!(status, 200);
        assert_eq!(json["path"], "/tls");
        if name == "localhost" {
            assert_eq!(json["sni"], "localhost");
        } else {
            // rustls sends no SNI for an IP address.
            assert!(json["sni"].is_null());
        }
    }
    assert_eq!(echo.snis_seen(), vec![Some("localhost".to_string()), None]);
    assert_eq!(echo.requests().len(), 2);

    // A client trusting another CA fails, and the upstream records no SNI for it.
    let mut other = rustls::RootCertStore::empty();
    other.add(TestCa::new("upstream.test").root_cert()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(other)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(echo.addr).await.unwrap();
    let res = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    assert!(res.is_err());
    assert_eq!(echo.snis_seen().len(), 2);
    assert_eq!(echo.connection_count(), 3);
}

#[tokio::test]
async fn tcp_counter_counts() {
    let counter = TcpCounter::start().await.unwrap();
    assert_eq!(counter.connections(), 0);
    for _ in 0..3 {
        let _ = tokio::net::TcpStream::connect(counter.addr).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        while counter.connections() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let addr = counter.addr;
    drop(counter);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// === agent client ===

/// A tiny mTLS "gateway": requires a client SVID chaining to `client_ca`, answers
/// `CONNECT deny...` with 403 + JSON, opens other CONNECTs to `tunnel_to`, and answers
/// any other request with JSON holding the raw request line and Host header.
struct MiniGateway {
    addr: std::net::SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for MiniGateway {
    fn drop(&mut self) {
        self._task.abort();
    }
}

async fn mini_gateway(
    server: &test_harness::ca::Svid,
    client_ca: &TestCa,
    tunnel_to: Option<std::net::SocketAddr>,
) -> MiniGateway {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.root_cert()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.cert_chain.clone(), server.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                serve_mini(tls, tunnel_to).await;
            });
        }
    });
    MiniGateway {
        addr,
        connections,
        _task: task,
    }
}

async fn serve_mini<S>(mut s: S, tunnel_to: Option<std::net::SocketAddr>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let line = text.lines().next().unwrap_or_default().to_string();
        let header = |name: &str| {
            text.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        if line.starts_with("CONNECT deny") {
            let body = r#"{"error":"egress_denied"}"#;
            let resp = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            continue;
        }
        if line.starts_with("CONNECT ") {
            let Some(to) = tunnel_to else { return };
            let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            return;
        }
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if s.read_exact(&mut body).await.is_err() {
            return;
        }
        let json = serde_json::json!({
            "request_line": line,
            "host": header("host"),
            "body": String::from_utf8_lossy(&body),
        })
        .to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-mini: yes\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        );
        if s.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn agent_speaks_mtls_with_absolute_form_requests() {
    let ca = TestCa::new("example.org");
    let gw = mini_gateway(&ca.mint_svid(GATEWAY_ID), &ca, None).await;
    let agent = AgentClient::new(&ca.mint_svid(AGENT_ID), &[ca.root_cert()], gw.addr)
        .unwrap()
        .expect_gateway_id(GATEWAY_ID);

    let resp = agent
        .request(
            "POST",
            "http://api.example.com:443/v1/chat?x=1",
            &[("content-type", "application/json")],
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("X-Mini"), Some("yes"));
    let json = resp.json().unwrap();
    assert_eq!(
        json["request_line"],
        "POST http://api.example.com:443/v1/chat?x=1 HTTP/1.1"
    );
    assert_eq!(json["host"], "api.example.com:443");
    assert_eq!(json["body"], "{}");

    // A session reuses one connection for many requests.
    let before = gw.connections.load(std::sync::atomic::Ordering::SeqCst);
    let mut session = agent.session().await.unwrap();
    for i in 0..3 {
        let url = format!("http://127.0.0.1:8080/n/{i}");
        let resp = session.request("GET", &url, &[], vec![]).await.unwrap();
        assert_eq!(
            resp.json().unwrap()["request_line"],
            format!("GET {url} HTTP/1.1")
        );
    }
    assert!(!session.is_closed());
    assert_eq!(
        gw.connections.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
}

#[tokio::test]
async fn agent_tunnels_and_speaks_tls_through_the_tunnel() {
    let ca = TestCa::new("example.org");
    let site_ca = TestCa::new("site.test");
    let site = TlsEcho::start(site_ca.mint_server_cert(&["localhost"]))
        .await
        .unwrap();
    let gw = mini_gateway(&ca.mint_svid(GATEWAY_ID), &ca, Some(site.addr)).await;
    let agent = AgentClient::new(&ca.mint_svid(AGENT_ID), &[ca.root_cert()], gw.addr).unwrap();

    let denied = agent.connect_tunnel("deny.example:443", &[]).await.unwrap();
    assert_eq!(denied.status, 403);
    assert!(denied.stream.is_none());
    let body: serde_json::Value = serde_json::from_slice(&denied.body).unwrap();
    assert_eq!(body["error"], "egress_denied");

    let tunnel = agent
        .connect_tunnel("localhost:443", &[("proxy-authorization", "none")])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    let tls = agent
        .tls_through_tunnel(tunnel.stream.unwrap(), "localhost", &[site_ca.root_cert()])
        .await
        .unwrap();
    let (status, json) = http_get(tls, "/inside", "localhost").await;
    assert_eq!(status, 200);
    assert_eq!(json["sni"], "localhost");
    assert_eq!(json["path"], "/inside");
    assert_eq!(site.snis_seen(), vec![Some("localhost".to_string())]);

    // Wrong roots for the destination: the TLS inside the tunnel fails.
    let tunnel = agent.connect_tunnel("localhost:443", &[]).await.unwrap();
    assert!(agent
        .tls_through_tunnel(tunnel.stream.unwrap(), "localhost", &[ca.root_cert()])
        .await
        .is_err());
}

#[tokio::test]
async fn agent_rejects_a_gateway_from_a_foreign_ca_or_with_another_id() {
    let ca = TestCa::new("example.org");
    let gw = mini_gateway(&ca.mint_svid(GATEWAY_ID), &ca, None).await;
    let svid = ca.mint_svid(AGENT_ID);

    // Same trust domain name, different key.
    let impostor = TestCa::new("example.org");
    let err = AgentClient::new(&svid, &[impostor.root_cert()], gw.addr)
        .unwrap()
        .handshake()
        .await
        .expect_err("foreign CA must fail");
    assert!(matches!(err, AgentError::GatewayCertRejected(_)), "{err}");
    let other = TestCa::new("other.org");
    let err = AgentClient::new(&svid, &[other.root_cert()], gw.addr)
        .unwrap()
        .handshake()
        .await
        .expect_err("foreign CA must fail");
    assert!(matches!(err, AgentError::GatewayCertRejected(_)), "{err}");

    let err = AgentClient::new(&svid, &[ca.root_cert()], gw.addr)
        .unwrap()
        .expect_gateway_id("spiffe://example.org/ns/other/sa/other")
        .handshake()
        .await
        .expect_err("wrong gateway ID must fail");
    assert!(matches!(err, AgentError::GatewayCertRejected(_)), "{err}");
    assert!(err.to_string().contains(GATEWAY_ID), "{err}");

    // Without an expected ID, any chain to the roots will do (no DNS name check).
    AgentClient::new(&svid, &[ca.root_cert()], gw.addr)
        .unwrap()
        .handshake_confirmed(Duration::from_millis(200))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_gateway_refusing_the_agent_certificate_is_distinguishable() {
    let ca = TestCa::new("example.org");
    let gw = mini_gateway(&ca.mint_svid(GATEWAY_ID), &ca, None).await;
    // The agent's SVID comes from a CA the gateway does not trust.
    let foreign = TestCa::new("example.org");
    let agent = AgentClient::new(&foreign.mint_svid(AGENT_ID), &[ca.root_cert()], gw.addr)
        .unwrap()
        .expect_gateway_id(GATEWAY_ID);
    let err = agent
        .handshake_confirmed(Duration::from_secs(2))
        .await
        .expect_err("the gateway must refuse a foreign SVID");
    assert!(err.is_refused_by_gateway(), "{err:?}");
    // An impostor CA with the same name fails on the signature, hence this alert.
    assert!(
        matches!(
            err,
            AgentError::Refused(rustls::AlertDescription::DecryptError)
        ),
        "{err:?}"
    );
    // Under TLS 1.3 the bare handshake completes before the server checks us.
    assert!(agent.handshake().await.is_ok());
    // And it shows up on the first request, too.
    assert!(agent
        .request("GET", "http://example.com:80/", &[], vec![])
        .await
        .is_err());
    // Nothing listening: a connect error, not a refusal.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = AgentClient::new(&ca.mint_svid(AGENT_ID), &[ca.root_cert()], closed)
        .unwrap()
        .handshake()
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, AgentError::Connect(_)), "{err:?}");
}

#[tokio::test]
async fn intermediate_cas_give_chains_that_verify_both_ways() {
    let ca = TestCa::new("example.org");
    let inter = ca.intermediate();
    let inter2 = inter.intermediate();
    assert_eq!(inter2.intermediates().len(), 2);
    assert_eq!(inter2.root_cert(), ca.root_cert());

    let agent_svid = inter2.mint_svid(AGENT_ID);
    assert_eq!(agent_svid.cert_chain.len(), 3);
    assert_eq!(parse(&agent_svid).unwrap().cert_chain().len(), 3);

    let gw = mini_gateway(&inter.mint_svid(GATEWAY_ID), &ca, None).await;
    let agent = AgentClient::new(&agent_svid, &[ca.root_cert()], gw.addr)
        .unwrap()
        .expect_gateway_id(GATEWAY_ID);
    let resp = agent
        .request("GET", "http://example.com:80/", &[], vec![])
        .await
        .unwrap();
    assert_eq!(resp.status, 200);

    // The fake Workload API passes the whole chain through.
    let api = FakeWorkloadApi::start_in_tempdir(WorkloadIdentity {
        svids: vec![inter.mint_svid(GATEWAY_ID)],
        bundle: vec![ca.root_cert()],
        federated_bundles: vec![],
    })
    .await
    .unwrap();
    let source = source(&api.endpoint()).await;
    assert_eq!(source.svid().unwrap().cert_chain().len(), 2);
    source.shutdown().await;
}
