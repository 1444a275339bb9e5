//! Proves the harness pieces work on their own, before the gateway is involved.

use std::sync::Arc;
use std::time::Duration;

use spiffe::{TrustDomain, X509Source, X509Svid};
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
