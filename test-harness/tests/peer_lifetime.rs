//! Open connections and tunnels end with the identity that opened them: at the peer
//! certificate's `notAfter` (a keep-alive connection after its in-flight request), and
//! when a trust bundle change means the peer's chain no longer verifies. Each closure
//! is counted and audited with the peer's SPIFFE ID.

use std::time::{Duration, SystemTime};

use test_harness::agent::{AgentClient, AgentSession};
use test_harness::ca::{SvidOptions, TestCa};
use test_harness::gateway::{GatewayOptions, TestGateway, World, GATEWAY_ID};
use test_harness::upstream::{HttpEcho, TcpEcho};
use test_harness::workload_api::{FakeWorkloadApi, WorkloadIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

/// Idle keep-alive connections stay open through the test (the header-read timer
/// would otherwise close them after `request_header`).
fn options() -> GatewayOptions {
    GatewayOptions {
        extra_config: "timeouts: { handshake: 5s, request_header: 60s, connect: 5s, idle: 60s }\n"
            .into(),
        ..Default::default()
    }
}

fn policy(http_ports: &[u16], echo_port: u16) -> String {
    let http: Vec<String> = http_ports
        .iter()
        .map(|p| format!("\"localhost:{p}\""))
        .collect();
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: agents
    id: spiffe://example.org/ns/ai-workloads/sa/*
    pathways:
      - name: docs
        destinations: [{}]
        allow_cidrs: [127.0.0.0/8]
      - name: raw
        destinations: ["127.0.0.1:{echo_port}"]
        allow_cidrs: [127.0.0.0/8]
"#,
        http.join(", ")
    )
}

/// An HTTP upstream that answers every request after `delay`.
async fn slow_upstream(delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    tokio::time::sleep(delay).await;
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow";
                    if tcp.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Polls `cond` until it holds; patience only bounds a failing test.
async fn eventually(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of one series in a Prometheus exposition.
fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn closed_series(kind: &str, reason: &str) -> String {
    format!("egress_connections_closed_total{{kind=\"{kind}\",reason=\"{reason}\"}}")
}

async fn get(session: &mut AgentSession, url: &str) -> u16 {
    session
        .request("GET", url, &[], Vec::new())
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

/// Writes `ping` into a tunnel to a TCP echo and reads it back.
async fn echoes<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"ping"
}

/// True once the gateway has closed the tunnel (EOF or an error on read).
async fn tunnel_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_tunnels_close_at_the_peer_certificates_not_after() {
    let http = HttpEcho::start().await.unwrap();
    let slow = slow_upstream(Duration::from_secs(4)).await;
    let echo = TcpEcho::start().await.unwrap();
    let w = World::start_with(
        &policy(&[http.addr.port(), slow.port()], echo.addr.port()),
        options(),
    )
    .await
    .unwrap();
    let m = w.gateway.metrics().await.unwrap();
    for kind in ["connection", "tunnel"] {
        for reason in ["peer_certificate_expired", "peer_no_longer_trusted"] {
            assert_eq!(
                metric(&m, &closed_series(kind, reason)),
                Some(0.0),
                "registered at 0 from start-up:\n{m}"
            );
        }
    }

    // A client SVID that expires in 6 s, and one that lives an hour.
    let ttl = Duration::from_secs(6);
    let short = w.ca.mint(SvidOptions {
        spiffe_id: Some(RESEARCH.into()),
        ttl: Some(ttl),
        ..Default::default()
    });
    let not_after = SystemTime::now() + ttl;
    let agent = AgentClient::new(&short, &w.roots(), w.gateway.proxy_addr())
        .unwrap()
        .expect_gateway_id(GATEWAY_ID);
    let other = w.agent(CODING).unwrap();

    let docs = format!("http://localhost:{}/docs", http.addr.port());
    let mut session = agent.session().await.unwrap();
    assert_eq!(get(&mut session, &docs).await, 200);
    let mut tunnel = agent
        .connect_tunnel(&format!("127.0.0.1:{}", echo.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    let stream = tunnel.stream.as_mut().unwrap();
    assert!(echoes(stream).await);
    let mut long_lived = other.session().await.unwrap();

    // A request in flight across notAfter is answered; then the connection closes.
    let until = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        // notAfter is encoded in whole seconds, so it may come up to 1 s early.
        .saturating_sub(Duration::from_millis(2500));
    tokio::time::sleep(until).await;
    let slow_url = format!("http://localhost:{}/slow", slow.port());
    assert_eq!(
        get(&mut session, &slow_url).await,
        200,
        "the in-flight request finishes"
    );
    assert!(
        SystemTime::now() > not_after,
        "the slow answer came after notAfter"
    );
    eventually(
        "the keep-alive connection is closed",
        Duration::from_secs(5),
        async || session.is_closed(),
    )
    .await;
    eventually("the tunnel is closed", Duration::from_secs(5), async || {
        tunnel_closed(tunnel.stream.as_mut().unwrap()).await
    })
    .await;
    // The other agent's connection is untouched.
    assert_eq!(get(&mut long_lived, &docs).await, 200);

    let mut m = String::new();
    eventually(
        "both closures counted",
        Duration::from_secs(5),
        async || {
            m = w.gateway.metrics().await.unwrap();
            metric(&m, &closed_series("tunnel", "peer_certificate_expired")) == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        metric(&m, &closed_series("connection", "peer_certificate_expired")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &closed_series("connection", "peer_no_longer_trusted")),
        Some(0.0)
    );

    let lines = w.gateway.wait_for_audit(5).await;
    let closed = lines
        .iter()
        .find(|l| l["kind"] == "connection")
        .unwrap_or_else(|| panic!("no connection closure line: {lines:#?}"));
    assert_eq!(closed["source_spiffe_id"], RESEARCH);
    assert_eq!(closed["decision"], "deny");
    let reason = closed["reason"].as_str().unwrap();
    assert!(reason.starts_with("peer_certificate_expired:"), "{reason}");
    let tunnel_line = lines
        .iter()
        .find(|l| l["kind"] == "connect")
        .unwrap_or_else(|| panic!("no tunnel line: {lines:#?}"));
    assert_eq!(tunnel_line["source_spiffe_id"], RESEARCH);
    let error = tunnel_line["error"].as_str().unwrap_or_default();
    assert!(error.contains("peer certificate expired"), "{tunnel_line}");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_rotation_that_drops_a_ca_closes_its_connections_and_keeps_the_others() {
    let http = HttpEcho::start().await.unwrap();
    let echo = TcpEcho::start().await.unwrap();
    // Two CAs of one trust domain (a SPIRE CA rotation); the gateway's SVID is from the
    // one that stays.
    let (leaving, staying) = (TestCa::new("example.org"), TestCa::new("example.org"));
    let gateway_svid = staying.mint(SvidOptions {
        spiffe_id: Some(GATEWAY_ID.into()),
        ..Default::default()
    });
    let identity = |bundle: Vec<_>| WorkloadIdentity {
        svids: vec![gateway_svid.clone()],
        bundle,
        federated_bundles: vec![],
    };
    let api =
        FakeWorkloadApi::start_in_tempdir(identity(vec![leaving.root_cert(), staying.root_cert()]))
            .await
            .unwrap();
    let gw = TestGateway::start_with(
        &policy(&[http.addr.port()], echo.addr.port()),
        &api.endpoint(),
        options(),
    )
    .await
    .unwrap();
    let client = |ca: &TestCa, id: &str| {
        AgentClient::new(&ca.mint_svid(id), &[staying.root_cert()], gw.proxy_addr())
            .unwrap()
            .expect_gateway_id(GATEWAY_ID)
    };
    let (dropped, kept) = (client(&leaving, RESEARCH), client(&staying, CODING));

    let docs = format!("http://localhost:{}/docs", http.addr.port());
    let mut dropped_session = dropped.session().await.unwrap();
    let mut kept_session = kept.session().await.unwrap();
    assert_eq!(get(&mut dropped_session, &docs).await, 200);
    assert_eq!(get(&mut kept_session, &docs).await, 200);
    let mut tunnel = dropped
        .connect_tunnel(&format!("127.0.0.1:{}", echo.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    assert!(echoes(tunnel.stream.as_mut().unwrap()).await);

    // The leaving CA is removed from the bundle.
    api.update(identity(vec![staying.root_cert()]));
    eventually(
        "the connection from the dropped CA is closed",
        Duration::from_secs(10),
        async || dropped_session.is_closed(),
    )
    .await;
    eventually(
        "the tunnel from the dropped CA is closed",
        Duration::from_secs(5),
        async || tunnel_closed(tunnel.stream.as_mut().unwrap()).await,
    )
    .await;
    // The other CA's client keeps its connection, and new handshakes from the dropped
    // CA are refused.
    for _ in 0..3 {
        assert_eq!(get(&mut kept_session, &docs).await, 200);
    }
    assert!(!kept_session.is_closed());
    assert!(dropped
        .handshake_confirmed(Duration::from_millis(500))
        .await
        .is_err());

    let m = gw.metrics().await.unwrap();
    assert_eq!(
        metric(&m, &closed_series("connection", "peer_no_longer_trusted")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &closed_series("tunnel", "peer_no_longer_trusted")),
        Some(1.0),
        "{m}"
    );
    let lines = gw.wait_for_audit(4).await;
    let closed: Vec<_> = lines.iter().filter(|l| l["kind"] == "connection").collect();
    assert_eq!(closed.len(), 1, "{lines:#?}");
    assert_eq!(closed[0]["source_spiffe_id"], RESEARCH);
    let reason = closed[0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("peer_no_longer_trusted:"), "{reason}");
    gw.shutdown().await;
    api.shutdown().await;
}
