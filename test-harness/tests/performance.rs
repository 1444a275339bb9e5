//! Connection reuse and connection caps: the properties the throughput benchmarks
//! (`bench/`) depend on, checked by counting rather than timing.

use std::time::Duration;

use test_harness::agent::AgentSession;
use test_harness::gateway::{GatewayOptions, World};
use test_harness::upstream::HttpEcho;
use tokio::io::AsyncReadExt;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

fn http_policy(port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: agents
    id: spiffe://example.org/ns/ai-workloads/sa/*
    pathways:
      - name: http
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

async fn world_with(port: u16, extra: &str) -> World {
    World::start_with(
        &http_policy(port),
        GatewayOptions {
            extra_config: extra.to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// The value of an unlabelled series in a Prometheus exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Every session sends one request; returns when all have their answer.
async fn round(sessions: Vec<AgentSession>, url: &str) -> Vec<AgentSession> {
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|mut s| {
            let url = url.to_string();
            tokio::spawn(async move {
                let r = s.request("GET", &url, &[], vec![]).await.unwrap();
                assert_eq!(r.status, 200);
                s
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keep_alive_agents_reuse_pooled_upstream_connections() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    // Above 32, the idle cap the pool once had: every round would then dial again.
    const AGENTS: usize = 64;
    let w = world_with(port, "").await;
    let agent = w.agent(RESEARCH).unwrap();
    let mut sessions = Vec::new();
    for _ in 0..AGENTS {
        sessions.push(agent.session().await.unwrap());
    }
    let url = format!("http://localhost:{port}/pooled");
    // Warm-up: the first rounds dial up to one connection per concurrent request.
    for _ in 0..2 {
        sessions = round(sessions, &url).await;
    }
    let warm = http.connection_count();
    assert!(warm <= AGENTS + 8, "{warm} connections for {AGENTS} agents");
    const ROUNDS: usize = 5;
    for _ in 0..ROUNDS {
        sessions = round(sessions, &url).await;
    }
    let dialed = http.connection_count() - warm;
    // A request can finish at the agent a moment before its upstream connection is back
    // in the pool, so allow a handful; churn would be ~32 per round.
    assert!(
        dialed <= 8,
        "{dialed} new upstream connections for {} requests after warm-up",
        AGENTS * ROUNDS
    );
    // The connector's counter sees what the upstream sees.
    let text = w.gateway.metrics().await.unwrap();
    assert_eq!(
        metric(&text, "egress_upstream_connections_total"),
        Some(http.connection_count() as f64),
        "{text}"
    );
    drop(sessions);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pool_size_is_configurable() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    const AGENTS: usize = 8;
    let w = world_with(port, "upstream_pool: { max_idle_per_destination: 2 }\n").await;
    let agent = w.agent(RESEARCH).unwrap();
    let mut sessions = Vec::new();
    for _ in 0..AGENTS {
        sessions.push(agent.session().await.unwrap());
    }
    let url = format!("http://localhost:{port}/small-pool");
    sessions = round(sessions, &url).await;
    let before = http.connection_count();
    for _ in 0..3 {
        sessions = round(sessions, &url).await;
    }
    // Only 2 of the 8 connections stay idle between rounds; the rest are dialed again.
    assert!(
        http.connection_count() - before >= 3,
        "a pool of 2 kept {AGENTS} connections"
    );
    drop(sessions);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_per_agent_cap_requests_get_429_with_retry_after() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world_with(port, "limits: { max_connections_per_agent: 1 }\n").await;
    let greedy = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{port}/capped");
    let mut first = greedy.session().await.unwrap();
    assert_eq!(
        first
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );

    let mut second = greedy.session().await.unwrap();
    let refused = second.request("GET", &url, &[], vec![]).await.unwrap();
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let body = refused.json().unwrap();
    assert_eq!(
        body["error"]["limit"], "max_connections_per_agent",
        "{body}"
    );
    // The refused connection is closed after its answer.
    let mut closed = false;
    for _ in 0..100 {
        if second.is_closed() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the connection over the cap stayed open");

    // Another agent is not affected, and the first connection still works.
    let other = w.agent(CODING).unwrap();
    assert_eq!(
        other
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        first
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        http.requests().len(),
        3,
        "the refused request reached upstream"
    );

    let lines = w.gateway.wait_for_audit(4).await;
    let line = lines
        .iter()
        .find(|l| l["status"] == 429)
        .unwrap_or_else(|| panic!("no audit line for the 429: {lines:?}"));
    assert_eq!(line["source_spiffe_id"], RESEARCH);
    assert_eq!(line["limit"], "max_connections_per_agent");
    assert_eq!(line["port"], port, "{line}");
    drop(first);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_closes_before_the_handshake_and_is_counted() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world_with(port, "limits: { max_connections: 1 }\n").await;
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{port}/global");
    let mut held = agent.session().await.unwrap();
    assert_eq!(
        held.request("GET", &url, &[], vec![]).await.unwrap().status,
        200
    );
    // No TLS is spoken to the connection over the cap: it reads end-of-stream.
    let mut tcp = tokio::net::TcpStream::connect(w.gateway.proxy_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the connection over the global cap stayed open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let text = w.gateway.metrics().await.unwrap();
    assert!(
        metric(&text, "egress_global_connection_limit_refusals_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    drop(held);
    w.shutdown().await;
}
