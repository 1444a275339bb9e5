//! SSRF corpus through the running gateway. A pathway allows any host on any port, so
//! only the address guard and the host parser stand between the agent and a private
//! address. A `TcpCounter` listens on loopback where every vector points (or would
//! point, for names and encodings); it must see zero connections. Vectors naming
//! non-loopback private addresses are refused before any connect, so no traffic leaves
//! the machine.

use std::sync::Arc;

use test_harness::gateway::{GatewayOptions, World};
use test_harness::resolver::{RebindingResolver, StaticResolver};
use test_harness::upstream::TcpCounter;

const AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";

fn open_policy() -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {AGENT}
    pathways:
      - name: anything
        destinations: ["*:*"]
"#
    )
}

/// How the gateway must answer a vector.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// 400: the host is not a DNS name or a canonical IP literal.
    BadHost,
    /// 403 `destination address not allowed`: the address guard.
    Blocked,
}

/// `(host as the agent writes it, expected answer)`. `{p}` is the counter's port.
fn host_vectors() -> Vec<(&'static str, Expect)> {
    use Expect::*;
    vec![
        // Loopback, literally and in every IPv6 embedding.
        ("127.0.0.1", Blocked),
        ("127.255.255.254", Blocked),
        ("[::1]", Blocked),
        ("[0:0:0:0:0:0:0:1]", Blocked),
        ("[::ffff:127.0.0.1]", Blocked),
        ("[::ffff:7f00:1]", Blocked),
        ("[::127.0.0.1]", Blocked),
        ("[::ffff:0:127.0.0.1]", Blocked),
        ("[64:ff9b::127.0.0.1]", Blocked),
        ("[64:ff9b:1::7f00:1]", Blocked),
        ("[2002:7f00:1::1]", Blocked),
        ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", Blocked),
        ("0.0.0.0", Blocked),
        ("[::]", Blocked),
        // Numeric spellings C resolvers read as loopback or metadata.
        ("2130706433", BadHost),
        ("0x7f000001", BadHost),
        ("0x7F.0x0.0x0.0x1", BadHost),
        ("0177.0.0.1", BadHost),
        ("017700000001", BadHost),
        ("127.1", BadHost),
        ("127.0.1", BadHost),
        ("0x7f.1", BadHost),
        ("127.000.000.001", BadHost),
        ("127.0.0.01", BadHost),
        ("0", BadHost),
        ("2852039166", BadHost),
        ("0xA9FEA9FE", BadHost),
        ("0251.0376.0251.0376", BadHost),
        ("169.254.169.254.", BadHost),
        ("1.2.3.4.5", BadHost),
        ("１２７.０.０.１", BadHost),
        ("127。0。0。1", BadHost),
        ("[::ffff:127.1]", BadHost),
        ("[fe80::1%25lo]", BadHost),
        ("localhost@127.0.0.1", BadHost),
        ("127.0.0.1%00.example.com", BadHost),
        // Private, link-local (metadata), shared, benchmarking, reserved, multicast, ...
        ("10.0.0.1", Blocked),
        ("172.16.0.1", Blocked),
        ("172.31.255.255", Blocked),
        ("192.168.1.1", Blocked),
        ("169.254.169.254", Blocked),
        ("169.254.170.2", Blocked),
        ("100.64.0.1", Blocked),
        ("100.100.100.200", Blocked),
        ("198.18.0.1", Blocked),
        ("192.0.0.170", Blocked),
        ("192.0.2.1", Blocked),
        ("198.51.100.1", Blocked),
        ("203.0.113.1", Blocked),
        ("224.0.0.1", Blocked),
        ("239.255.255.250", Blocked),
        ("240.0.0.1", Blocked),
        ("255.255.255.255", Blocked),
        ("[fd00:ec2::254]", Blocked),
        ("[fc00::1]", Blocked),
        ("[fe80::a9fe:a9fe]", Blocked),
        ("[fec0::1]", Blocked),
        ("[ff02::1]", Blocked),
        ("[2001:db8::1]", Blocked),
        ("[100::1]", Blocked),
        ("[::ffff:169.254.169.254]", Blocked),
        ("[::ffff:a9fe:a9fe]", Blocked),
        ("[::ffff:10.0.0.1]", Blocked),
        ("[64:ff9b::a9fe:a9fe]", Blocked),
        ("[64:ff9b::10.0.0.1]", Blocked),
        ("[2002:a9fe:a9fe::1]", Blocked),
        ("[2002:c0a8:101::1]", Blocked),
        // Names the test resolver maps to blocked addresses.
        ("localhost", Blocked),
        ("metadata.google.internal", Blocked),
        ("metadata.test", Blocked),
        ("ecs-metadata.test", Blocked),
        ("internal.test", Blocked),
        ("v6-loopback.test", Blocked),
        ("mapped.test", Blocked),
        ("nat64.test", Blocked),
        ("ula.test", Blocked),
        ("all-private.test", Blocked),
        ("LOCALHOST.", Blocked),
    ]
}

fn resolver() -> StaticResolver {
    StaticResolver::new()
        .with("localhost", &["127.0.0.1", "::1"])
        .with("metadata.google.internal", &["169.254.169.254"])
        .with("metadata.test", &["169.254.169.254"])
        .with("ecs-metadata.test", &["169.254.170.2"])
        .with("internal.test", &["10.1.2.3"])
        .with("v6-loopback.test", &["::1"])
        .with("mapped.test", &["::ffff:127.0.0.1"])
        .with("nat64.test", &["64:ff9b::7f00:1"])
        .with("ula.test", &["fd12:3456::1"])
        .with(
            "all-private.test",
            &[
                "10.0.0.1",
                "192.168.0.1",
                "127.0.0.1",
                "169.254.169.254",
                "fd00::1",
            ],
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_corpus_never_reaches_a_private_address() {
    let counter = TcpCounter::start().await.unwrap();
    let p = counter.addr.port();
    let resolver = Arc::new(resolver());
    let w = World::start_with(
        &open_policy(),
        GatewayOptions {
            resolver: Some(resolver.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = w.agent(AGENT).unwrap();
    let vectors = host_vectors();
    assert!(vectors.len() >= 50, "{} vectors", vectors.len());

    let mut failures = Vec::new();
    for (host, expect) in &vectors {
        // Every vector twice: as a CONNECT target and as an absolute-form URL.
        let connect = agent.connect_tunnel(&format!("{host}:{p}"), &[]).await;
        let forward = agent
            .request(
                "GET",
                &format!("http://{host}:{p}/latest/meta-data/"),
                &[],
                vec![],
            )
            .await;
        let answers = [
            ("CONNECT", connect.map(|t| (t.status, t.body))),
            ("GET", forward.map(|r| (r.status, r.body))),
        ];
        for (how, answer) in answers {
            let ok = match (&answer, expect) {
                (Ok((400, _)), Expect::BadHost) => true,
                (Ok((403, body)), Expect::Blocked) => {
                    String::from_utf8_lossy(body).contains("destination address not allowed")
                }
                // The HTTP client itself may refuse to send a URL it cannot parse.
                (Err(_), Expect::BadHost) if how == "GET" => true,
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{how} {host}: expected {expect:?}, got {:?}",
                    answer.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        counter.connections(),
        0,
        "the gateway connected to loopback"
    );
    // Names were resolved once per request, never twice (check, then connect).
    let lookups = resolver.lookups();
    for (host, _) in vectors.iter().filter(|(h, _)| h.contains(".test")) {
        let n = lookups.iter().filter(|l| l == host).count();
        assert_eq!(n, 2, "{host} looked up {n} times for 2 requests");
    }
    // Refusals are audited, and nothing was let through.
    let lines = w.gateway.wait_for_audit(vectors.len()).await;
    assert!(lines.len() >= vectors.len(), "{} audit lines", lines.len());
    assert!(
        lines
            .iter()
            .all(|l| l["status"] == 400 || l["status"] == 403),
        "{lines:#?}"
    );
    w.shutdown().await;
}

/// Two listeners on one port number: 127.0.0.2 (the range a pathway opens) and
/// 127.0.0.1 (next to it, must never be reached).
async fn twin_counters() -> (TcpCounter, TcpCounter) {
    for _ in 0..20 {
        let blocked = TcpCounter::start_on("127.0.0.1:0").await.unwrap();
        let port = blocked.addr.port();
        if let Ok(allowed) = TcpCounter::start_on(&format!("127.0.0.2:{port}")).await {
            return (allowed, blocked);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

fn one_service_policy(destination: &str) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {AGENT}
    pathways:
      - name: one-service
        destinations: ["{destination}"]
        allow_cidrs: [127.0.0.2/32]
"#
    )
}

/// A pathway may open exactly the private range it lists, and nothing next to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_cidrs_open_only_what_they_list() {
    let (allowed, blocked) = twin_counters().await;
    let p = allowed.addr.port();
    let resolver = Arc::new(
        StaticResolver::new()
            .with("svc.test", &["127.0.0.2"])
            .with("neighbour.test", &["127.0.0.1"])
            // Blocked answers first: the gateway skips them and uses the one that passes.
            .with("mixed.test", &["10.0.0.1", "127.0.0.1", "127.0.0.2"]),
    );
    let w = World::start_with(
        &one_service_policy("*:*"),
        GatewayOptions {
            resolver: Some(resolver),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = w.agent(AGENT).unwrap();
    for host in ["svc.test", "mixed.test", "127.0.0.2"] {
        let t = agent
            .connect_tunnel(&format!("{host}:{p}"), &[])
            .await
            .unwrap();
        assert_eq!(t.status, 200, "{host}");
    }
    for host in ["neighbour.test", "127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"] {
        let t = agent
            .connect_tunnel(&format!("{host}:{p}"), &[])
            .await
            .unwrap();
        assert_eq!(t.status, 403, "{host}");
    }
    assert_eq!(allowed.connections(), 3);
    assert_eq!(blocked.connections(), 0);
    w.shutdown().await;
}

/// DNS rebinding: the attacker's name answers an allowed address on one lookup and a
/// private one on the next. The gateway resolves once per request and connects only
/// to what it checked: had it looked up again between check and connect, the private
/// listener (same port, next address) would see a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_never_reaches_the_private_answer() {
    let (allowed, blocked) = twin_counters().await;
    let p = allowed.addr.port();
    let rebinder = RebindingResolver::new("rebind.test", &[&["127.0.0.2"], &["127.0.0.1"]]);
    let w = World::start_with(
        &one_service_policy("rebind.test:*"),
        GatewayOptions {
            resolver: Some(rebinder.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = w.agent(AGENT).unwrap();
    let mut statuses = Vec::new();
    for i in 0..10 {
        let t = agent
            .connect_tunnel(&format!("rebind.test:{p}"), &[])
            .await
            .unwrap();
        statuses.push(t.status);
        let r = agent
            .request("GET", &format!("http://rebind.test:{p}/r{i}"), &[], vec![])
            .await
            .unwrap();
        statuses.push(r.status);
    }
    assert_eq!(rebinder.lookups(), 20, "one lookup per request");
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(allowed.connections(), 10);
    assert_eq!(
        blocked.connections(),
        0,
        "the private answer was connected to"
    );
    w.shutdown().await;
}
