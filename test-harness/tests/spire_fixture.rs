//! The real-SPIRE fixture against real `spire-server` and `spire-agent`. Each test starts
//! its own SPIRE, so the tests are independent of order and run in parallel. Rotation
//! under traffic and outages are tested end to end in `real_spire.rs`. Without the
//! binaries they are skipped loudly (and fail when `CI` is set): run
//! `scripts/install-spire.sh`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use spiffe::x509_source::SvidPicker;
use spiffe::{X509Source, X509Svid};
use test_harness::spire::{config_entries, require_spire, FetchedSvid, SpireFixture, SpireOptions};

const GATEWAY_ID: &str = "spiffe://example.org/ns/egress-gateway/sa/egress-gateway";
const RESEARCH_ID: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING_ID: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

/// Picks the SVID with one SPIFFE ID out of the several this (uid 0) process gets.
struct ById(&'static str);

impl SvidPicker for ById {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids
            .iter()
            .position(|s| s.spiffe_id().to_string() == self.0)
    }
}

async fn source_for(fixture: &SpireFixture, id: &'static str) -> X509Source {
    X509Source::builder()
        .endpoint(fixture.endpoint())
        .picker(ById(id))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .initial_sync_timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("X509Source against the SPIRE agent")
}

/// Full path validation of the SVID against its bundle (signatures, validity, client EKU).
fn verify_chain(svid: &FetchedSvid) {
    let mut roots = rustls::RootCertStore::empty();
    for ca in &svid.bundle {
        roots
            .add(CertificateDer::from(ca.clone()))
            .expect("bundle CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .expect("verifier");
    let leaf = CertificateDer::from(svid.cert_chain[0].clone());
    let intermediates: Vec<CertificateDer<'_>> = svid.cert_chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    verifier
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .unwrap_or_else(|e| panic!("{} does not chain to its bundle: {e}", svid.spiffe_id));
}

fn leaf_lifetime(der: &[u8]) -> Duration {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("leaf parses");
    let v = cert.validity();
    Duration::from_secs((v.not_after.timestamp() - v.not_before.timestamp()) as u64)
}

#[tokio::test]
async fn agent_serves_gateway_and_demo_agent_svids() {
    if require_spire().is_none() {
        return;
    }
    let fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();
    let svids = fixture.fetch_svids().await.unwrap();

    let mut ids: Vec<&str> = svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![GATEWAY_ID, RESEARCH_ID, CODING_ID];
    want.sort_unstable();
    assert_eq!(ids, want, "one SVID per entry of spire-config/entries.json");
    let configured: Vec<String> = config_entries("example.org")
        .into_iter()
        .map(|e| e.spiffe_id)
        .collect();
    assert_eq!(configured.len(), 3);

    for svid in &svids {
        verify_chain(svid);
        // The key pairs with the leaf, and the leaf carries exactly this SPIFFE ID.
        let chain: Vec<u8> = svid.cert_chain.concat();
        let parsed = X509Svid::parse_from_der(&chain, &svid.private_key).unwrap();
        assert_eq!(parsed.spiffe_id().to_string(), svid.spiffe_id);
        // default_x509_svid_ttl = 60s, plus SPIRE's 10 s backdating of not_before.
        let lifetime = leaf_lifetime(svid.leaf());
        assert!(
            (Duration::from_secs(55)..=Duration::from_secs(75)).contains(&lifetime),
            "{}: lifetime {lifetime:?}",
            svid.spiffe_id
        );
    }
    let distinct_leaves: std::collections::HashSet<&[u8]> =
        svids.iter().map(|s| s.leaf()).collect();
    assert_eq!(distinct_leaves.len(), 3);
}

#[tokio::test]
async fn x509_source_gets_an_svid_from_the_agent_and_new_entries_appear() {
    if require_spire().is_none() {
        return;
    }
    let fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();

    let source = source_for(&fixture, GATEWAY_ID).await;
    let svid = source.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), GATEWAY_ID);
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = source.bundle_set().unwrap().get(&td).expect("own bundle");
    assert!(!bundle.authorities().is_empty());
    source.shutdown().await;

    // An entry created later, with its own TTL, is served without restarting anything.
    let extra = "spiffe://example.org/ns/ai-workloads/sa/summarizer";
    fixture
        .create_entry(extra, &["unix:uid:0"], Some(Duration::from_secs(120)))
        .await
        .unwrap();
    let svid = fixture
        .wait_for_svid(extra, Duration::from_secs(20))
        .await
        .unwrap();
    verify_chain(&svid);
    let lifetime = leaf_lifetime(svid.leaf());
    assert!(
        lifetime > Duration::from_secs(100),
        "entry TTL: {lifetime:?}"
    );
}

#[tokio::test]
async fn a_process_of_another_uid_gets_no_svid() {
    if require_spire().is_none() {
        return;
    }
    let fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();

    // Control: the same command as uid 0 gets the registered identities.
    let root = fixture.fetch_x509_as_uid(0).await.unwrap();
    assert!(
        root.status.success(),
        "{}",
        String::from_utf8_lossy(&root.stderr)
    );
    assert!(String::from_utf8_lossy(&root.stdout).contains(GATEWAY_ID));

    let nobody = fixture.fetch_x509_as_uid(65534).await.unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&nobody.stdout),
        String::from_utf8_lossy(&nobody.stderr)
    );
    assert!(!nobody.status.success(), "uid 65534 got an SVID: {out}");
    assert!(
        !out.contains("spiffe://"),
        "uid 65534 got an identity: {out}"
    );
    // Reached the agent and was refused an identity (not a socket permission problem).
    assert!(
        out.contains("no identity issued"),
        "unexpected failure: {out}"
    );
}

#[tokio::test]
async fn agent_restart_serves_svids_again() {
    if require_spire().is_none() {
        return;
    }
    let mut fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();
    let source = source_for(&fixture, RESEARCH_ID).await;
    let before = source.svid().unwrap().leaf().as_bytes().to_vec();
    // Subscribed before the outage, so no update after the restart can be missed.
    let mut updates = source.updated();

    fixture.stop_agent().await.unwrap();
    assert!(
        fixture.fetch_svids().await.is_err(),
        "a stopped agent serves nothing"
    );
    // The source keeps its last SVID while the agent is away.
    assert_eq!(source.svid().unwrap().spiffe_id().to_string(), RESEARCH_ID);

    let restarted = Instant::now();
    fixture.start_agent().await.unwrap();
    for id in [GATEWAY_ID, RESEARCH_ID, CODING_ID] {
        let svid = fixture
            .wait_for_svid(id, Duration::from_secs(30))
            .await
            .unwrap();
        verify_chain(&svid);
    }
    eprintln!("agent back with SVIDs after {:?}", restarted.elapsed());

    // The source reconnects by itself and takes the SVID the new agent process minted
    // (an agent keeps workload SVIDs in memory only, so a restart issues new ones).
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            updates.changed().await.unwrap();
            if source.svid().unwrap().leaf().as_bytes() != before.as_slice() {
                break;
            }
        }
    })
    .await
    .expect("X509Source takes the restarted agent's SVID");
    eprintln!(
        "X509Source updated {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(source.svid().unwrap().spiffe_id().to_string(), RESEARCH_ID);
    source.shutdown().await;

    // A second restart works the same way.
    fixture.stop_agent().await.unwrap();
    fixture.start_agent().await.unwrap();
    fixture
        .wait_for_svid(GATEWAY_ID, Duration::from_secs(30))
        .await
        .unwrap();
}

#[tokio::test]
async fn x509_source_observes_rotation() {
    if require_spire().is_none() {
        return;
    }
    let fixture = SpireFixture::start(SpireOptions::default()).await.unwrap();
    let source = source_for(&fixture, GATEWAY_ID).await;
    let first_leaf = source.svid().unwrap().leaf().as_bytes().to_vec();

    // With a 60 s TTL the agent renews at about half of it; allow the whole TTL.
    let started = Instant::now();
    let mut updates = source.updated();
    let rotated = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            updates.changed().await.unwrap();
            let now = source.svid().unwrap();
            if now.leaf().as_bytes() != first_leaf.as_slice() {
                return now;
            }
        }
    })
    .await
    .expect("no rotation within 60 s");
    let (_, first_cert) = x509_parser::parse_x509_certificate(&first_leaf).unwrap();
    // SPIRE backdates not_before by 10 s.
    let issued = first_cert.validity().not_before.timestamp() + 10;
    let age = time::OffsetDateTime::now_utc().unix_timestamp() - issued;
    eprintln!(
        "gateway SVID rotated {:?} after the source started, {age} s after issuance",
        started.elapsed()
    );

    assert_eq!(rotated.spiffe_id().to_string(), GATEWAY_ID);
    let (_, new) = x509_parser::parse_x509_certificate(rotated.leaf().as_bytes()).unwrap();
    assert!(new.validity().not_after > first_cert.validity().not_after);
    source.shutdown().await;
}
