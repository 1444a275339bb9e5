//! The gateway against real SPIRE (`spire-server` and `spire-agent`, the version in
//! `spire-config/VERSION`): identities from the real agent, decisions per SPIFFE ID,
//! unregistered workloads, SVID rotation under traffic, and agent outages.
//!
//! Without the binaries these tests are skipped with a loud message (run
//! `scripts/install-spire.sh`); with `CI` set they fail instead.
//!
//! This process runs as uid 0 and every entry selects `unix:uid:0`, so the agent serves
//! it all three SVIDs; the gateway picks its own with `identity.spiffe_id` (SPIRE lists
//! SVIDs by entry ID, so "the first one" is arbitrary) and agents pick theirs by ID.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_gateway::config::{GatewayConfig, Overrides};
use egress_gateway::server::{self, Dependencies};
use test_harness::agent::AgentClient;
use test_harness::ca::TestCa;
use test_harness::gateway::{admin_get, GatewayOptions, TestGateway, GATEWAY_ID};
use test_harness::spire::{require_spire, SpireFixture, SpireOptions, SpireWorkload};
use test_harness::upstream::HttpEcho;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

/// Research may GET the echo upstream; coding may only POST to it.
fn policy(http_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
mode: enforce
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: internal-read
        destinations: ["localhost:{http_port}"]
        methods: [GET]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
  - name: coding-agent
    id: {CODING}
    pathways:
      - name: internal-write
        destinations: ["localhost:{http_port}"]
        methods: [POST]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
"#
    )
}

async fn gateway_on(fixture: &SpireFixture, policy: &str) -> TestGateway {
    TestGateway::start_with(
        policy,
        &fixture.endpoint(),
        GatewayOptions {
            identity_spiffe_id: Some(GATEWAY_ID.to_string()),
            ..Default::default()
        },
    )
    .await
    .expect("gateway with its SVID from real SPIRE")
}

/// An agent client from the workload's current SVID and bundle: one per connection, as
/// a workload that re-reads its identity from the Workload API would do.
fn client(workload: &SpireWorkload, gateway: SocketAddr) -> anyhow::Result<AgentClient> {
    Ok(
        AgentClient::new(&workload.svid()?, &workload.roots()?, gateway)?
            .expect_gateway_id(GATEWAY_ID),
    )
}

/// The leaf certificate the gateway presents on the wire.
async fn gateway_leaf(agent: &AgentClient) -> anyhow::Result<Vec<u8>> {
    let stream = agent.handshake().await?;
    let (_, conn) = stream.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("the gateway sent no certificate"))?;
    Ok(leaf.to_vec())
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_agents_take_identities_from_spire_and_get_per_id_decisions() {
    if require_spire().is_none() {
        return;
    }
    let fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();
    let http = HttpEcho::start().await.unwrap();
    let gw = gateway_on(&fixture, &policy(http.addr.port())).await;

    // The gateway serves the gateway entry's SVID, whatever SPIRE's order of the three.
    let material = gw.gateway().identity().current().expect("an SVID");
    assert_eq!(material.spiffe_id.to_string(), GATEWAY_ID);
    let roots = fixture.roots().await.unwrap();
    let research = AgentClient::new(
        &fixture.svid_for(RESEARCH).await.unwrap(),
        &roots,
        gw.proxy_addr(),
    )
    .unwrap()
    .expect_gateway_id(GATEWAY_ID);
    let served = gateway_leaf(&research).await.unwrap();
    let from_agent = fixture
        .wait_for_svid(GATEWAY_ID, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        served,
        from_agent.leaf(),
        "the gateway presents the SVID SPIRE issued"
    );
    assert_eq!(admin_get(gw.admin_addr(), "/readyz").await.unwrap().0, 200);

    // Same destination, two SPIFFE IDs from SPIRE, two decisions.
    let url = format!("http://localhost:{}/report", http.addr.port());
    let allowed = research.request("GET", &url, &[], vec![]).await.unwrap();
    assert_eq!(allowed.status, 200);
    let coding = AgentClient::new(
        &fixture.svid_for(CODING).await.unwrap(),
        &roots,
        gw.proxy_addr(),
    )
    .unwrap()
    .expect_gateway_id(GATEWAY_ID);
    let denied = coding.request("GET", &url, &[], vec![]).await.unwrap();
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json().unwrap()["error"]["type"], "egress_denied");
    assert_eq!(
        http.requests().len(),
        1,
        "only the allowed request went out"
    );

    let lines = gw.wait_for_audit(2).await;
    let by = |id: &str| {
        lines
            .iter()
            .find(|l| l["source_spiffe_id"] == id)
            .unwrap_or_else(|| panic!("no audit line for {id}: {lines:#?}"))
    };
    assert_eq!(by(RESEARCH)["decision"], "allow");
    assert_eq!(by(RESEARCH)["agent"], "research-agent");
    assert_eq!(by(CODING)["decision"], "deny");
    assert_eq!(by(CODING)["status"], 403);

    // A workload no entry matches (uid 65534) reaches the agent and gets no identity...
    let nobody = fixture.fetch_x509_as_uid(65534).await.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&nobody.stdout),
        String::from_utf8_lossy(&nobody.stderr)
    );
    assert!(!nobody.status.success(), "uid 65534 got an SVID: {said}");
    assert!(!said.contains("spiffe://"), "uid 65534 got an ID: {said}");
    assert!(said.contains("no identity issued"), "not a refusal: {said}");
    // ...and without one it gets nothing through: not with a certificate for an
    // agent's SPIFFE ID from a CA outside SPIRE's bundle, not with none at all.
    let forger = TestCa::new("example.org");
    let forged = AgentClient::new(&forger.mint_svid(RESEARCH), &roots, gw.proxy_addr())
        .unwrap()
        .expect_gateway_id(GATEWAY_ID);
    let refused = forged
        .handshake_confirmed(Duration::from_secs(2))
        .await
        .expect_err("a forged SVID is refused");
    assert!(refused.is_refused_by_gateway(), "{refused}");
    assert!(forged.request("GET", &url, &[], vec![]).await.is_err());
    let no_cert = no_client_cert_handshake(gw.proxy_addr(), &roots).await;
    assert!(no_cert.is_err(), "a client without a certificate got in");
    assert_eq!(http.requests().len(), 1);

    gw.shutdown().await;
}

/// TLS to the gateway without a client certificate, then a request; Err if refused.
async fn no_client_cert_handshake(
    gateway: SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // The gateway's SVID has no DNS name to check; trust is the bundle, which the
    // platform verifier would reject for a SAN mismatch, so verify the chain only.
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(store),
        provider.clone(),
    )
    .build()?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(gateway).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("egress-gateway".try_into()?, tcp)
        .await?;
    tls.write_all(b"GET http://localhost:1/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await??;
    if n == 0 {
        anyhow::bail!("closed by the gateway");
    }
    Ok(())
}

/// Accepts a server certificate that chains to the roots, whatever its names.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// What one agent loop saw.
#[derive(Default)]
struct LoopReport {
    ok: usize,
    failures: Vec<String>,
    /// Distinct leaf certificates the agent presented (its own rotations).
    own_leaves: HashSet<Vec<u8>>,
    /// Distinct leaf certificates the gateway presented to it.
    gateway_leaves: HashSet<Vec<u8>>,
}

/// Requests until `stop`, each on a new connection with the agent's current SVID.
async fn agent_loop(
    workload: SpireWorkload,
    gateway: SocketAddr,
    method: &'static str,
    url: String,
    stop: Arc<AtomicBool>,
) -> LoopReport {
    let mut report = LoopReport::default();
    while !stop.load(Ordering::Relaxed) {
        let attempt = async {
            let svid = workload.svid()?;
            let agent =
                AgentClient::new(&svid, &workload.roots()?, gateway)?.expect_gateway_id(GATEWAY_ID);
            let response = agent.request(method, &url, &[], b"x".to_vec()).await?;
            anyhow::ensure!(response.status == 200, "status {}", response.status);
            // The leaf the gateway presented, from a second handshake (cheap, and the
            // request path stays the harness's own).
            let gw_leaf = gateway_leaf(&agent).await?;
            Ok::<_, anyhow::Error>((svid.cert_chain[0].to_vec(), gw_leaf))
        };
        match attempt.await {
            Ok((own, gw)) => {
                report.ok += 1;
                report.own_leaves.insert(own);
                report.gateway_leaves.insert(gw);
            }
            Err(e) => report.failures.push(format!("{e:#}")),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workload.shutdown().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_traffic_across_two_rotations_loses_no_request() {
    if require_spire().is_none() {
        return;
    }
    // 60 s SVIDs: the agent renews each at about half its lifetime.
    let fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();
    let http = HttpEcho::start().await.unwrap();
    let gw = gateway_on(&fixture, &policy(http.addr.port())).await;
    let url = format!("http://localhost:{}/work", http.addr.port());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    // The gateway's rotations, from its own identity source.
    let identity = gw.gateway().identity().clone();
    let mut generations = identity.subscribe();
    let gateway_rotations = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut seen = vec![];
            while !stop.load(Ordering::Relaxed) {
                if tokio::time::timeout(Duration::from_millis(200), generations.changed())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    seen.push(started.elapsed());
                }
            }
            seen
        }
    });

    let research = tokio::spawn(agent_loop(
        fixture.workload(RESEARCH).await.unwrap(),
        gw.proxy_addr(),
        "GET",
        url.clone(),
        stop.clone(),
    ));
    let coding = tokio::spawn(agent_loop(
        fixture.workload(CODING).await.unwrap(),
        gw.proxy_addr(),
        "POST",
        url.clone(),
        stop.clone(),
    ));

    // Two rotations of every SVID: the leaves each agent presented and the gateway
    // presented, counted from the outside (each distinct leaf after the first is one).
    let first_gateway_leaf = identity.current().expect("an SVID").certified_key.cert[0].to_vec();
    let deadline = Duration::from_secs(150);
    let mut gateway_leaves: HashSet<Vec<u8>> = HashSet::from([first_gateway_leaf]);
    let mut agent_leaves: [HashSet<Vec<u8>>; 2] = Default::default();
    let research_ws = fixture.workload(RESEARCH).await.unwrap();
    let coding_ws = fixture.workload(CODING).await.unwrap();
    loop {
        if let Some(m) = identity.current() {
            gateway_leaves.insert(m.certified_key.cert[0].to_vec());
        }
        for (set, ws) in agent_leaves.iter_mut().zip([&research_ws, &coding_ws]) {
            if let Ok(s) = ws.svid() {
                set.insert(s.cert_chain[0].to_vec());
            }
        }
        let enough = gateway_leaves.len() >= 3 && agent_leaves.iter().all(|s| s.len() >= 3);
        if enough || started.elapsed() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little traffic after the last rotation too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    research_ws.shutdown().await;
    coding_ws.shutdown().await;
    let research = research.await.unwrap();
    let coding = coding.await.unwrap();
    let rotations_at = gateway_rotations.await.unwrap();
    eprintln!(
        "rotation test: {:?}; gateway rotations at {rotations_at:?}; research {} ok, {} own leaves, {} gateway leaves; coding {} ok, {} own leaves, {} gateway leaves",
        started.elapsed(),
        research.ok,
        research.own_leaves.len(),
        research.gateway_leaves.len(),
        coding.ok,
        coding.own_leaves.len(),
        coding.gateway_leaves.len(),
    );

    assert!(
        research.failures.is_empty() && coding.failures.is_empty(),
        "requests lost across rotation: research {:?}, coding {:?}",
        research.failures,
        coding.failures
    );
    for (name, r) in [("research", &research), ("coding", &coding)] {
        assert!(
            r.own_leaves.len() >= 3,
            "{name} presented {} SVIDs in {:?}: fewer than two rotations",
            r.own_leaves.len(),
            started.elapsed()
        );
        assert!(
            r.gateway_leaves.len() >= 3,
            "the gateway presented {name} {} SVIDs: fewer than two rotations",
            r.gateway_leaves.len()
        );
    }
    assert!(
        rotations_at.len() >= 2,
        "gateway rotations: {rotations_at:?}"
    );
    assert_eq!(
        gw.gateway()
            .identity()
            .current()
            .unwrap()
            .spiffe_id
            .to_string(),
        GATEWAY_ID
    );
    let lines = gw.shutdown().await;
    assert_eq!(
        lines.iter().filter(|l| l["decision"] == "allow").count(),
        research.ok + coding.ok,
        "one allow line per request"
    );
}

/// gateway.yaml for a gateway this test starts itself, on addresses it chose.
fn standalone_config(
    dir: &std::path::Path,
    fixture: &SpireFixture,
    policy: &str,
    admin: SocketAddr,
) -> GatewayConfig {
    struct NoEnv;
    impl egress_gateway::config::Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let config_path = dir.join("gateway.yaml");
    std::fs::write(
        &config_path,
        format!(
            "listen: 127.0.0.1:0\nadmin: {admin}\nidentity:\n  workload_api: {}\n  startup_timeout: 90s\n  spiffe_id: {GATEWAY_ID}\npolicy: {}\ntelemetry:\n  audit_log: {}\nshutdown_grace: 2s\n",
            fixture.endpoint(),
            policy_path.display(),
            dir.join("audit.log").display(),
        ),
    )
    .unwrap();
    GatewayConfig::load(&config_path, &Overrides::default(), &NoEnv).unwrap()
}

/// `/readyz` until it answers (the admin listener may not be bound yet).
async fn readyz(admin: SocketAddr) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin_get(admin, "/readyz").await {
            Ok(answer) => return answer,
            Err(e) if Instant::now() > deadline => panic!("/readyz on {admin}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_outage_keeps_the_gateway_serving_and_a_new_gateway_waits_truthfully() {
    if require_spire().is_none() {
        return;
    }
    let mut fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();
    let http = HttpEcho::start().await.unwrap();
    let policy = policy(http.addr.port());
    let gw = gateway_on(&fixture, &policy).await;
    let url = format!("http://localhost:{}/during-outage", http.addr.port());
    let research = fixture.workload(RESEARCH).await.unwrap();
    assert_eq!(
        client(&research, gw.proxy_addr())
            .unwrap()
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );

    // The agent dies. The running gateway keeps its SVID and keeps serving, ready.
    fixture.stop_agent().await.unwrap();
    let outage = Instant::now();
    let leaf_before = gw
        .gateway()
        .identity()
        .current()
        .unwrap()
        .certified_key
        .cert[0]
        .to_vec();
    assert!(
        fixture.fetch_svids().await.is_err(),
        "a stopped agent serves nothing"
    );

    // A gateway started now waits for identity, and says so on /readyz.
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let config = standalone_config(dir.path(), &fixture, &policy, admin);
    let late = tokio::spawn(server::start_with(config, Dependencies::default()));
    let mut waited_503 = 0;
    while outage.elapsed() < Duration::from_secs(6) {
        for _ in 0..3 {
            let r = client(&research, gw.proxy_addr())
                .unwrap()
                .request("GET", &url, &[], vec![])
                .await
                .unwrap();
            assert_eq!(r.status, 200, "the running gateway stopped serving");
        }
        assert_eq!(readyz(gw.admin_addr()).await.0, 200);
        let (status, body) = readyz(admin).await;
        assert_eq!(status, 503, "not ready without an SVID: {body}");
        assert!(
            body.contains("waiting for the first X.509-SVID"),
            "/readyz says why: {body}"
        );
        waited_503 += 1;
        assert!(!late.is_finished(), "start returned without an identity");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(waited_503 >= 3);

    // The agent comes back: the new gateway becomes ready without help...
    fixture.start_agent().await.unwrap();
    let back = Instant::now();
    let late = tokio::time::timeout(Duration::from_secs(30), late)
        .await
        .expect("the late gateway starts once the agent is back")
        .unwrap()
        .expect("the late gateway starts");
    let ready_after = back.elapsed();
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        late.identity().current().unwrap().spiffe_id.to_string(),
        GATEWAY_ID
    );
    let r = client(&research, late.proxy_addr())
        .unwrap()
        .request("GET", &url, &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // ...and the running one picks the stream up again without a restart: it rotates
    // to an SVID from the restarted agent and serves with it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rotated_after = loop {
        let now = gw.gateway().identity().current().unwrap();
        if now.certified_key.cert[0].as_ref() != leaf_before.as_slice() {
            break back.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the running gateway never rotated after the agent came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let agent = client(&research, gw.proxy_addr()).unwrap();
    let served = gateway_leaf(&agent).await.unwrap();
    assert_ne!(served, leaf_before, "the rotated SVID is the one presented");
    assert_eq!(
        agent
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    eprintln!(
        "outage test: late gateway ready {ready_after:?} after the agent restart; running gateway rotated {rotated_after:?} after it"
    );
    assert_eq!(readyz(gw.admin_addr()).await.0, 200);

    research.shutdown().await;
    late.shutdown().await;
    gw.shutdown().await;
}

/// A certificate's notAfter.
fn not_after(der: &[u8]) -> std::time::SystemTime {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    std::time::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_longer_than_the_workload_ttl_comes_back_on_its_own_svid() {
    if require_spire().is_none() {
        return;
    }
    // Short workload SVIDs; the agent's own SVID keeps the server's `agent_ttl` (1 h).
    let workload_ttl = Duration::from_secs(10);
    let mut fixture = SpireFixture::start(SpireOptions {
        x509_svid_ttl: workload_ttl,
        ..SpireOptions::default()
    })
    .await
    .unwrap();
    let before = fixture
        .wait_for_svid(RESEARCH, Duration::from_secs(30))
        .await
        .unwrap();
    let expired_at = not_after(&before.cert_chain[0]);

    // The agent is down for longer than any workload SVID (and than an agent SVID with
    // the workload TTL) lives.
    fixture.stop_agent().await.unwrap();
    tokio::time::sleep(workload_ttl + Duration::from_secs(4)).await;
    assert!(
        std::time::SystemTime::now() > expired_at,
        "the outage outlasted the workload SVID"
    );

    // It comes back on its stored agent SVID: no new join token.
    fixture
        .restart_agent_on_stored_svid()
        .await
        .expect("the agent resumes on its own SVID after an outage longer than the workload TTL");
    let deadline = Instant::now() + Duration::from_secs(30);
    let fresh = loop {
        let svid = fixture
            .wait_for_svid(RESEARCH, Duration::from_secs(30))
            .await
            .unwrap();
        let until = not_after(&svid.cert_chain[0]);
        if until > std::time::SystemTime::now() {
            break until;
        }
        assert!(
            Instant::now() < deadline,
            "only expired SVIDs after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(fresh > expired_at, "a new SVID, not the old one");
    // And workloads keep getting SVIDs: through at least one rotation.
    let rotated = loop {
        let svid = fixture
            .wait_for_svid(RESEARCH, Duration::from_secs(30))
            .await
            .unwrap();
        let until = not_after(&svid.cert_chain[0]);
        if until > fresh {
            break until;
        }
        assert!(
            Instant::now() < deadline + workload_ttl,
            "no rotation after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(rotated > std::time::SystemTime::now());
}
