//! L7 pathways end to end: TLS and SPIFFE mTLS origination, credential injection,
//! model access, per-agent limits and LLM token budgets (in memory and through Redis).

use std::time::Duration;

use test_harness::agent::{AgentClient, AgentResponse};
use test_harness::gateway::{GatewayOptions, World};
use test_harness::llm_upstream::{LlmTls, LlmUpstream, RedisServer, TlsLlm};
use test_harness::otlp::OtlpReceiver;
use test_harness::upstream::TcpEcho;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const SUMMARIZER: &str = "spiffe://example.org/ns/ai-workloads/sa/summarizer";
const SECRET: &str = "sk-live-0123456789abcdef";

fn pathway_policy(pathways: &str) -> String {
    format!(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: research-agent\n    id: {RESEARCH}\n    pathways:\n{pathways}"
    )
}

fn secret_file(value: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), format!("{value}\n")).unwrap();
    f
}

fn chat(model: &str, stream: bool) -> Vec<u8> {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

async fn post(agent: &AgentClient, port: u16, body: Vec<u8>) -> AgentResponse {
    agent
        .request(
            "POST",
            &format!("http://localhost:{port}/v1/chat/completions"),
            &[
                ("authorization", "Bearer agent-own-key"),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
        .unwrap()
}

/// Waits (bounded) until the gateway has charged at least `used` to a budget.
async fn charged(w: &World, kind: &str, used: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let snap = w.gateway.gateway().limits().snapshot();
        if snap.iter().any(|u| u.kind == kind && u.used >= used) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{kind} never reached {used}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_credential_replaces_the_agents_over_verified_tls_and_stays_secret() {
    let llm = TlsLlm::start(10).await.unwrap();
    let secret = secret_file(SECRET);
    let policy = pathway_policy(&format!(
        r#"      - name: openai
        destinations: ["localhost:{}"]
        allow_cidrs: [127.0.0.0/8]
        upstream:
          ca_file: {}
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
"#,
        llm.upstream.addr.port(),
        llm.ca_file.path().display(),
        secret.path().display()
    ));
    let otlp = OtlpReceiver::start().await.unwrap();
    let w = World::start_with(
        &policy,
        GatewayOptions {
            otlp_endpoint: Some(otlp.endpoint()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let port = llm.upstream.addr.port();
    for _ in 0..2 {
        let r = post(&agent, port, chat("gpt-4o-mini", false)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let seen = llm.upstream.requests();
    assert_eq!(seen.len(), 2);
    for req in &seen {
        let auth: Vec<_> = req
            .headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(auth, vec![format!("Bearer {SECRET}").as_str()]);
        assert_eq!(req.uri, "/v1/chat/completions");
    }
    // Keep-alive: the pool reused the TLS connection.
    assert_eq!(llm.upstream.handshakes(), 1);

    // A Kubernetes Secret update: the next request carries the new value.
    std::fs::write(secret.path(), "sk-rotated-value-987\n").unwrap();
    let r = post(&agent, port, chat("gpt-4o-mini", false)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        llm.upstream.requests()[2].header("authorization"),
        Some("Bearer sk-rotated-value-987")
    );

    let lines = w.gateway.wait_for_audit(3).await;
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["pathway"] == "openai" && l["status"] == 200));
    let audit = std::fs::read_to_string(w.gateway.audit_path()).unwrap();
    let metrics = w.gateway.metrics().await.unwrap();
    // Every span attribute, as the collector received it.
    let spans = otlp.wait_for_spans(3).await;
    assert!(
        spans
            .iter()
            .filter(|s| s.str("egress.pathway") == Some("openai"))
            .count()
            >= 3,
        "{spans:?}"
    );
    let exported = format!("{spans:?}");
    for text in [&audit, &metrics, &exported] {
        assert!(!text.contains(SECRET) && !text.contains("sk-rotated"));
        // The agent's own key is dropped, never echoed either.
        assert!(!text.contains("agent-own-key"));
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_with_the_wrong_ca_is_a_502_and_sends_nothing() {
    let llm = TlsLlm::start(10).await.unwrap();
    let other = test_harness::ca::TestCa::new("other-ca.test");
    let wrong_ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong_ca.path(), other.root_pem()).unwrap();
    let port = llm.upstream.addr.port();
    let policy = pathway_policy(&format!(
        r#"      - name: wrong-ca
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ ca_file: {} }}
      - name: public-roots
        destinations: ["127.0.0.1:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ tls: true }}
"#,
        wrong_ca.path().display()
    ));
    let w = World::start(&policy).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let r = post(&agent, port, chat("m", false)).await;
    assert_eq!(r.status, 502);
    let reason = r.json().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("wrong-ca") && reason.contains("TLS"),
        "{reason}"
    );
    // A test CA is not among the public roots either.
    let r = agent
        .request(
            "POST",
            &format!("http://127.0.0.1:{port}/v1/chat/completions"),
            &[],
            chat("m", false),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert!(llm.upstream.requests().is_empty());
    let lines = w.gateway.wait_for_audit(2).await;
    assert!(lines
        .iter()
        .all(|l| l["status"] == 502 && l["error"].as_str().unwrap().contains("TLS handshake")));
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn east_west_mtls_accepts_only_the_expected_spiffe_id() {
    // The harness workload's own SVID comes from the same trust domain as the gateway's.
    let policy_for = |port: u16| {
        pathway_policy(&format!(
            r#"      - name: summarizer
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ spiffe_id: {SUMMARIZER} }}
      - name: impostor-check
        destinations: ["127.0.0.1:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ spiffe_id: spiffe://example.org/ns/ai-workloads/sa/translator }}
"#
        ))
    };
    // The World's CA must sign the workload, so start the world on a placeholder
    // port first, then the workload, then reload the policy with its port.
    let w = World::start(&policy_for(1)).await.unwrap();
    let workload = LlmUpstream::start(
        LlmTls::Mutual(w.ca.mint_svid(SUMMARIZER), vec![w.ca.root_cert()]),
        5,
    )
    .await
    .unwrap();
    let port = workload.addr.port();
    std::fs::write(w.gateway.policy_path(), policy_for(port)).unwrap();
    w.gateway.gateway().reload_policy().await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();

    let r = post(&agent, port, chat("m", false)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(workload.requests().len(), 1);

    let r = agent
        .request(
            "POST",
            &format!("http://127.0.0.1:{port}/v1/x"),
            &[],
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(
        workload.requests().len(),
        1,
        "nothing reached the wrong peer"
    );
    let lines = w.gateway.wait_for_audit(2).await;
    let bad = lines
        .iter()
        .find(|l| l["pathway"] == "impostor-check")
        .unwrap();
    let err = bad["error"].as_str().unwrap();
    assert!(
        err.contains(SUMMARIZER) && err.contains("translator"),
        "{err}"
    );
    w.shutdown().await;
}

/// `egress_pathway_unavailable{agent="research-agent",pathway="openai"}`, if exported.
async fn unavailable(w: &World) -> Option<f64> {
    let metrics = w.gateway.metrics().await.unwrap();
    metrics
        .lines()
        .find(|l| {
            l.starts_with("egress_pathway_unavailable{")
                && l.contains("pathway=\"openai\"")
                && l.contains("agent=\"research-agent\"")
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Waits (bounded) until the gauge reads `value`.
async fn unavailable_becomes(w: &World, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while unavailable(w).await != Some(value) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "egress_pathway_unavailable never became {value}: {:?}",
            unavailable(w).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An L7 pathway to the TLS fake with its key from `secret`, beside a plain pathway.
fn openai_and_docs(llm: &TlsLlm, secret: &str, docs_port: u16) -> String {
    pathway_policy(&format!(
        "      - name: openai\n        destinations: [\"localhost:{}\"]\n        allow_cidrs: [127.0.0.0/8]\n        upstream:\n          ca_file: {}\n          inject_headers:\n            x-api-key: {{ secret_file: {secret} }}\n      - name: docs\n        destinations: [\"localhost:{docs_port}\"]\n        allow_cidrs: [127.0.0.0/8]\n",
        llm.upstream.addr.port(),
        llm.ca_file.path().display(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_file_takes_only_its_pathway_out_until_the_file_appears() {
    let llm = TlsLlm::start(1).await.unwrap();
    let docs = test_harness::upstream::HttpEcho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("openai-token");
    let policy = openai_and_docs(&llm, &secret.display().to_string(), docs.addr.port());
    // Starts without the credential (a Kubernetes Secret not created yet).
    let w = World::start(&policy).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    unavailable_becomes(&w, 1.0).await;
    let r = post(&agent, llm.upstream.addr.port(), chat("m", false)).await;
    assert_eq!(r.status, 503);
    let body = r.json().unwrap();
    assert_eq!(body["error"]["type"], "credential_unavailable", "{body}");
    assert_eq!(
        body["error"]["message"], "credential unavailable: openai",
        "{body}"
    );
    assert!(
        llm.upstream.requests().is_empty(),
        "forwarded without its key"
    );
    // Every other pathway keeps working.
    let ok = agent
        .request(
            "GET",
            &format!("http://localhost:{}/x", docs.addr.port()),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let lines = w.gateway.wait_for_audit(2).await;
    let refused = lines.iter().find(|l| l["status"] == 503).unwrap();
    assert_eq!(refused["pathway"], "openai", "{refused}");
    assert!(
        refused.to_string().contains("credential unavailable"),
        "{refused}"
    );

    // The Secret appears: the pathway comes back without a reload.
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    unavailable_becomes(&w, 0.0).await;
    let r = post(&agent, llm.upstream.addr.port(), chat("m", false)).await;
    assert_eq!(r.status, 200);
    assert_eq!(llm.upstream.requests()[0].header("x-api-key"), Some(SECRET));

    // A reload that loses it again is taken, and only this pathway goes out.
    std::fs::write(
        w.gateway.policy_path(),
        policy.replace(&secret.display().to_string(), "/nonexistent/other"),
    )
    .unwrap();
    w.gateway.gateway().reload_policy().await.unwrap();
    unavailable_becomes(&w, 1.0).await;
    let r = post(&agent, llm.upstream.addr.port(), chat("m", false)).await;
    assert_eq!(r.status, 503);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_outside_the_list_are_refused_before_the_upstream() {
    let tls = TlsLlm::start(3).await.unwrap();
    let llm = &tls.upstream;
    let port = llm.addr.port();
    let policy = pathway_policy(&format!(
        r#"      - name: llm
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        methods: [POST]
        models: [gpt-4o-mini, "gpt-4.1*"]
        when: 'request.llm.model != "gpt-4.1-banned"'
        upstream: {{ ca_file: {} }}
"#,
        tls.ca_file.path().display()
    ));
    let w = World::start(&policy).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    for ok in ["gpt-4o-mini", "gpt-4.1-nano"] {
        assert_eq!(
            post(&agent, port, chat(ok, false)).await.status,
            200,
            "{ok}"
        );
    }
    let r = post(&agent, port, chat("gpt-5", false)).await;
    assert_eq!(r.status, 403);
    assert!(r.json().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-5"));
    assert_eq!(
        post(&agent, port, chat("gpt-4.1-banned", false))
            .await
            .status,
        403
    );
    assert_eq!(
        post(&agent, port, b"model=gpt-4o-mini".to_vec())
            .await
            .status,
        403
    );
    assert_eq!(
        post(&agent, port, br#"{"messages":[]}"#.to_vec())
            .await
            .status,
        403
    );
    let models: Vec<String> = llm
        .requests()
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["model"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(models, ["gpt-4o-mini", "gpt-4.1-nano"]);
    let lines = w.gateway.wait_for_audit(6).await;
    assert_eq!(lines[0]["llm_model"], "gpt-4o-mini");
    assert_eq!(lines[2]["llm_model"], "gpt-5");
    assert_eq!(lines[2]["status"], 403);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limits_fire_at_their_threshold_and_not_before() {
    let llm = LlmUpstream::start(LlmTls::Plain, 3).await.unwrap();
    let port = llm.addr.port();
    let policy = pathway_policy(&format!(
        r#"      - name: llm
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ requests_per_minute: 3, max_request_body_bytes: 100 }}
"#
    ));
    let w = World::start(&policy).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    // Exactly at the body limit passes; one byte over is 413 and not forwarded (and
    // does not use up the rate).
    let at_limit = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(100 - 22));
    assert_eq!(at_limit.len(), 100);
    assert_eq!(
        post(&agent, port, at_limit.clone().into_bytes())
            .await
            .status,
        200
    );
    let over = format!("{at_limit} ");
    let r = post(&agent, port, over.into_bytes()).await;
    assert_eq!(r.status, 413);
    assert_eq!(llm.requests().len(), 1);
    for _ in 0..2 {
        assert_eq!(post(&agent, port, chat("m", false)).await.status, 200);
    }
    let r = post(&agent, port, chat("m", false)).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(r.json().unwrap()["error"]["type"], "rate_limited");
    assert_eq!(llm.requests().len(), 3);
    let lines = w.gateway.wait_for_audit(5).await;
    assert_eq!(lines[1]["status"], 413);
    assert_eq!(lines[1]["limit"], "max_request_body_bytes");
    assert_eq!(lines[4]["status"], 429);
    assert_eq!(lines[4]["limit"], "requests_per_minute");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_hold_concurrency_and_are_closed_when_the_byte_budget_is_spent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo_server = TcpEcho::start().await.unwrap();
    let echo = echo_server.addr;
    let policy = pathway_policy(&format!(
        r#"      - name: raw
        destinations: ["127.0.0.1:{}"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ max_concurrent: 1, bytes_per_hour: 4000 }}
"#,
        echo.port()
    ));
    let w = World::start(&policy).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let authority = format!("127.0.0.1:{}", echo.port());
    let mut first = agent.connect_tunnel(&authority, &[]).await.unwrap();
    assert_eq!(first.status, 200);
    let second = agent.connect_tunnel(&authority, &[]).await.unwrap();
    assert_eq!(second.status, 429, "one tunnel at a time");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&second.body).unwrap()["error"]["type"],
        "rate_limited"
    );

    // 1000 bytes each way, echoed: 2000 of 4000. Then 1500 more crosses the budget.
    let s = first.stream.as_mut().unwrap();
    let mut buf = vec![0u8; 1000];
    s.write_all(&[7u8; 1000]).await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    s.write_all(&[7u8; 1500]).await.unwrap();
    // The gateway closes the tunnel: reads end (after whatever was echoed).
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    assert!(closed.is_ok(), "tunnel stayed open past its budget");
    drop(first);
    let lines = w.gateway.wait_for_audit(2).await;
    let tunnel = lines.iter().find(|l| l["status"] == 200).unwrap();
    assert!(tunnel["error"].as_str().unwrap().contains("bytes_per_hour"));
    // The spent budget refuses the next tunnel.
    let mut third = None;
    for _ in 0..100 {
        let r = agent.connect_tunnel(&authority, &[]).await.unwrap();
        if r.status == 429 {
            third = Some(r);
            break;
        }
        // The previous tunnel's slot is released as it winds down.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = third.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&third.body).unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("bytes"),
        "{body}"
    );
    assert!(third
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("retry-after")));
    w.shutdown().await;
}

fn token_policy(port: u16) -> String {
    pathway_policy(&format!(
        r#"      - name: llm
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ llm_tokens_per_hour: 100 }}
"#
    ))
}

async fn token_budget_runs_out(stream: bool) {
    let llm = LlmUpstream::start(LlmTls::Plain, 40).await.unwrap();
    let port = llm.addr.port();
    let w = World::start(&token_policy(port)).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    // 0, 40 and 80 tokens used when they start: all three run.
    for i in 1..=3u64 {
        let r = post(&agent, port, chat("m", stream)).await;
        assert_eq!(r.status, 200);
        if stream {
            // Charged from the usage the gateway asked for; the agent, which did not
            // ask, never sees the usage chunk.
            let body = String::from_utf8_lossy(&r.body);
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
            assert!(!body.contains("\"total_tokens\""), "{body}");
        }
        charged(&w, "llm_tokens_per_hour", 40 * i).await;
    }
    let r = post(&agent, port, chat("m", stream)).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert!(r.json().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("120 of 100"));
    assert_eq!(llm.requests().len(), 3);
    let lines = w.gateway.wait_for_audit(4).await;
    assert_eq!(lines[3]["limit"], "llm_tokens_per_hour");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_from_json_responses() {
    token_budget_runs_out(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_from_streamed_responses() {
    token_budget_runs_out(true).await;
}

async fn redis_world(policy: &str, redis: &RedisServer, on_error: &str) -> World {
    World::start_with(
        policy,
        GatewayOptions {
            extra_config: format!(
                "limits_backend: {}\non_backend_error: {on_error}\n",
                redis.url()
            ),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn skip_without_redis() -> bool {
    if RedisServer::binary().is_none() {
        assert!(
            !test_harness::deps_required(),
            "redis-server is required here (scripts/install-deps.sh installs it)"
        );
        eprintln!("SKIPPED: redis-server not installed (scripts/install-deps.sh)");
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_enforce_one_budget() {
    if skip_without_redis() {
        return;
    }
    let redis = RedisServer::start().await.unwrap();
    let llm = LlmUpstream::start(LlmTls::Plain, 40).await.unwrap();
    let port = llm.addr.port();
    let policy = pathway_policy(&format!(
        r#"      - name: llm
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ requests_per_minute: 4, llm_tokens_per_hour: 1000 }}
"#
    ));
    let a = redis_world(&policy, &redis, "deny").await;
    let b = redis_world(&policy, &redis, "deny").await;
    let (agent_a, agent_b) = (a.agent(RESEARCH).unwrap(), b.agent(RESEARCH).unwrap());
    // Four requests per minute between them, alternating replicas.
    for agent in [&agent_a, &agent_b, &agent_a, &agent_b] {
        assert_eq!(post(agent, port, chat("m", false)).await.status, 200);
    }
    for agent in [&agent_a, &agent_b] {
        let r = post(agent, port, chat("m", false)).await;
        assert_eq!(r.status, 429);
        assert!(r.json().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests per minute"));
    }
    // Tokens charged by both replicas land in one shared total.
    charged(&a, "llm_tokens_per_hour", 80).await;
    charged(&b, "llm_tokens_per_hour", 80).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_share_a_token_budget() {
    if skip_without_redis() {
        return;
    }
    let redis = RedisServer::start().await.unwrap();
    let llm = LlmUpstream::start(LlmTls::Plain, 40).await.unwrap();
    let port = llm.addr.port();
    let a = redis_world(&token_policy(port), &redis, "deny").await;
    let b = redis_world(&token_policy(port), &redis, "deny").await;
    let (agent_a, agent_b) = (a.agent(RESEARCH).unwrap(), b.agent(RESEARCH).unwrap());
    assert_eq!(post(&agent_a, port, chat("m", true)).await.status, 200);
    charged(&a, "llm_tokens_per_hour", 40).await;
    assert_eq!(post(&agent_b, port, chat("m", false)).await.status, 200);
    charged(&b, "llm_tokens_per_hour", 80).await;
    assert_eq!(post(&agent_a, port, chat("m", false)).await.status, 200);
    charged(&a, "llm_tokens_per_hour", 120).await;
    // 120 of 100 used across both replicas: each refuses.
    for agent in [&agent_b, &agent_a] {
        let r = post(agent, port, chat("m", false)).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json().unwrap()["error"]["type"], "rate_limited");
    }
    assert_eq!(llm.requests().len(), 3);
    a.shutdown().await;
    b.shutdown().await;
}

/// Sends requests back to back until `stop`; returns each one's status and, for a
/// refusal, the limit its body names.
async fn traffic(
    agent: AgentClient,
    port: u16,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(u16, String)> {
    let mut seen = Vec::new();
    while !*stop.borrow() {
        let r = tokio::time::timeout(Duration::from_secs(5), post(&agent, port, chat("m", false)))
            .await
            .expect("a request hung while Redis went away");
        let reason = r
            .json()
            .ok()
            .and_then(|b| b["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        seen.push((r.status, reason));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_traffic_follows_on_backend_error() {
    if skip_without_redis() {
        return;
    }
    let mut redis = RedisServer::start().await.unwrap();
    let llm = LlmUpstream::start(LlmTls::Plain, 1).await.unwrap();
    let port = llm.addr.port();
    let policy = pathway_policy(&format!(
        r#"      - name: llm
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ requests_per_minute: 1000000, llm_tokens_per_hour: 1000000000 }}
"#
    ));
    let deny = redis_world(&policy, &redis, "deny").await;
    let local = redis_world(&policy, &redis, "allow_local").await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let d = tokio::spawn(traffic(deny.agent(RESEARCH).unwrap(), port, stop.clone()));
    let l = tokio::spawn(traffic(local.agent(RESEARCH).unwrap(), port, stop));

    // Both replicas are serving through Redis; then it dies under them.
    for w in [&deny, &local] {
        w.gateway.wait_for_audit(5).await;
    }
    redis.kill().await;
    let before = deny.gateway.audit_lines().len();
    // Long enough for several requests after the outage on each replica.
    deny.gateway.wait_for_audit(before + 10).await;
    let before = local.gateway.audit_lines().len();
    local.gateway.wait_for_audit(before + 10).await;
    stop_tx.send(true).unwrap();
    let (d, l) = (d.await.unwrap(), l.await.unwrap());

    // deny: served until the outage, then refused with 429 naming the backend; nothing
    // else (no 5xx, no other limit).
    let first_refusal = d
        .iter()
        .position(|(s, _)| *s != 200)
        .expect("deny never refused");
    assert!(first_refusal >= 5, "{d:?}");
    for (status, reason) in &d[first_refusal..] {
        assert_eq!(*status, 429, "{d:?}");
        assert!(reason.contains("on_backend_error: deny"), "{reason}");
    }
    // allow_local: every request served, before and after.
    assert!(l.iter().all(|(s, _)| *s == 200), "{l:?}");
    let lines = deny.gateway.audit_lines();
    assert!(lines
        .iter()
        .any(|l| l["status"] == 429 && l["limit"] == "limits_backend"));
    // The outage shows in the metrics as well as the log.
    let refused = d.len() - first_refusal;
    let m = deny.gateway.metrics().await.unwrap();
    let line = format!("egress_limits_backend_errors_total{{outcome=\"denied\"}} {refused}");
    assert!(m.lines().any(|l| l == line), "no `{line}` in\n{m}");
    let m = local.gateway.metrics().await.unwrap();
    assert!(
        m.lines()
            .any(|l| l
                .starts_with("egress_limits_backend_errors_total{outcome=\"counted_locally\"}")),
        "{m}"
    );
    deny.shutdown().await;
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_share_max_concurrent() {
    if skip_without_redis() {
        return;
    }
    let redis = RedisServer::start().await.unwrap();
    let echo_server = TcpEcho::start().await.unwrap();
    let echo = echo_server.addr;
    let policy = pathway_policy(&format!(
        r#"      - name: raw
        destinations: ["127.0.0.1:{}"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ max_concurrent: 2 }}
"#,
        echo.port()
    ));
    let a = redis_world(&policy, &redis, "deny").await;
    let b = redis_world(&policy, &redis, "deny").await;
    let (agent_a, agent_b) = (a.agent(RESEARCH).unwrap(), b.agent(RESEARCH).unwrap());
    let authority = format!("127.0.0.1:{}", echo.port());

    let first = agent_a.connect_tunnel(&authority, &[]).await.unwrap();
    assert_eq!(first.status, 200);
    let second = agent_b.connect_tunnel(&authority, &[]).await.unwrap();
    assert_eq!(second.status, 200);
    // Each replica holds one; together they hold the pathway's two.
    for agent in [&agent_a, &agent_b] {
        let third = agent.connect_tunnel(&authority, &[]).await.unwrap();
        assert_eq!(third.status, 429, "a third tunnel on either replica");
        let body: serde_json::Value = serde_json::from_slice(&third.body).unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("all replicas"),
            "{body}"
        );
    }
    // Open tunnels are audited when they end; the refusal already is.
    let lines = b.gateway.wait_for_audit(1).await;
    assert_eq!(lines[0]["status"], 429);
    assert_eq!(lines[0]["limit"], "max_concurrent");

    // Closing the tunnel on replica A frees its slot for replica B.
    drop(first);
    let mut reopened = None;
    for _ in 0..200 {
        let r = agent_b.connect_tunnel(&authority, &[]).await.unwrap();
        if r.status == 200 {
            reopened = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reopened.is_some(), "the released slot never came back");
    let used = b.gateway.metrics().await.unwrap();
    assert!(
        used.lines().any(|l| l.starts_with("egress_limit_used{")
            && l.contains("limit=\"max_concurrent\"")
            && l.ends_with(" 2")),
        "{used}"
    );
    drop((second, reopened));
    a.shutdown().await;
    b.shutdown().await;
}

/// A replica that dies mid-request never gives its slot back; its lease must expire
/// while a live replica's lease, renewed in the background, must not.
#[test]
fn a_crashed_replicas_concurrency_slot_expires_and_a_live_ones_does_not() {
    use egress_gateway::config::OnBackendError;
    use egress_gateway::limits::{LimitKind, Limits, RedisBackend};
    if skip_without_redis() {
        return;
    }
    let runtime = |threads| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    };
    let main_rt = runtime(2);
    let redis = main_rt.block_on(RedisServer::start()).unwrap();
    let policy = egress_policy::Policy::from_yaml_str(
        &pathway_policy(
            "      - name: raw\n        destinations: [\"127.0.0.1:9\"]\n        limits: { max_concurrent: 1 }\n",
        ),
        "test",
    )
    .unwrap();
    let pathway = policy.pathways().next().unwrap().clone();
    // Renewed every second: two seconds of slack for a loaded machine.
    let ttl = Duration::from_secs(3);
    let replica = || {
        Limits::shared(
            RedisBackend::new(&redis.url()).unwrap().with_lease_ttl(ttl),
            OnBackendError::Deny,
        )
    };

    // Replica A runs on its own runtime so that it can "crash" holding the slot.
    let crashing_rt = runtime(1);
    let a = replica();
    let held = match crashing_rt.block_on(a.admit("research-agent", &pathway)) {
        Ok(admission) => admission,
        Err(hit) => panic!("first admission refused: {hit:?}"),
    };
    let b = replica();
    let refused_by_b = |b: &Limits| {
        main_rt.block_on(async {
            match b.admit("research-agent", &pathway).await {
                Ok(_) => None,
                Err(hit) => Some(hit.kind),
            }
        })
    };
    // Alive, A renews its lease: after three TTLs the slot is still taken.
    std::thread::sleep(ttl * 3);
    assert_eq!(refused_by_b(&b), Some(LimitKind::MaxConcurrent));

    // The crash: A's runtime (and its renewal task) stops; the slot is never released.
    std::mem::forget(held);
    drop(crashing_rt);
    let started = std::time::Instant::now();
    while refused_by_b(&b) == Some(LimitKind::MaxConcurrent) {
        assert!(
            started.elapsed() < ttl * 10,
            "the dead replica's slot never expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(a);
    main_rt.block_on(async move { drop(redis) });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_zero_or_a_fifo_as_secret_file_disables_its_pathway_at_start_and_on_reload_without_a_stall(
) {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let llm = TlsLlm::start(1).await.unwrap();
    let docs = test_harness::upstream::HttpEcho::start().await.unwrap();
    // At start: the gateway comes up (the start runs in its own task so that a blocked
    // worker cannot hold up this test's timer) with the pathway out of service.
    for path in ["/dev/zero", fifo.to_str().unwrap()] {
        let policy = openai_and_docs(&llm, path, docs.addr.port());
        let start = tokio::spawn(async move { World::start(&policy).await });
        let w = tokio::time::timeout(Duration::from_secs(20), start)
            .await
            .unwrap_or_else(|_| panic!("the gateway wedged starting with {path} as secret_file"))
            .unwrap()
            .unwrap();
        unavailable_becomes(&w, 1.0).await;
        let agent = w.agent(RESEARCH).unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            post(&agent, llm.upstream.addr.port(), chat("m", false)),
        )
        .await
        .expect("the request is answered, not stalled");
        assert_eq!(r.status, 503, "{path}");
        w.shutdown().await;
    }

    // On reload: taken without a stall, the pathway goes out, /healthz answers.
    let secret = secret_file(SECRET);
    let good = openai_and_docs(&llm, &secret.path().display().to_string(), docs.addr.port());
    let w = World::start(&good).await.unwrap();
    unavailable_becomes(&w, 0.0).await;
    for path in ["/dev/zero", fifo.to_str().unwrap()] {
        std::fs::write(
            w.gateway.policy_path(),
            good.replace(&secret.path().display().to_string(), path),
        )
        .unwrap();
        let reload = tokio::spawn(w.gateway.gateway().reload_policy());
        tokio::time::timeout(Duration::from_secs(20), reload)
            .await
            .expect("the reload returns")
            .unwrap()
            .unwrap();
        unavailable_becomes(&w, 1.0).await;
        let health = tokio::time::timeout(
            Duration::from_secs(5),
            test_harness::gateway::admin_get(w.gateway.admin_addr(), "/healthz"),
        )
        .await
        .expect("/healthz answers")
        .unwrap();
        assert_eq!(health.0, 200);
    }
    w.shutdown().await;
}
