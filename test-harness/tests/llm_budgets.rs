//! LLM token budgets an agent cannot dodge, end to end through the gateway, against
//! fake upstreams that speak each provider's wire format: every allowed request on a
//! pathway with `llm_tokens_per_hour` is charged, from the usage the provider reports
//! whatever the content coding and whether or not the agent streams, or from an
//! estimate (marked as such) when no usage can be read; the agent's bytes are the
//! upstream's. Also through the sidecar, through TLS interception with the real OpenAI
//! Python SDK streaming with its defaults, and the refusals the OpenAI and Anthropic
//! SDKs show.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use test_harness::agent::{AgentClient, AgentResponse};
use test_harness::ca::TestCa;
use test_harness::gateway::{GatewayOptions, World};
use test_harness::interop::{client_command, interop_dir, interop_python, run, with_proxy, Steps};
use test_harness::llm_upstream::{
    Coding, LlmTls, LlmUpstream, TlsLlm, FAKE_STREAM_DELTAS, FAKE_TEXT,
};
use test_harness::otlp::OtlpReceiver;
use test_harness::resolver::StaticResolver;
use test_harness::sidecar::TestSidecar;
use test_harness::upstream::HttpEcho;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
/// Tokens the fake reports per response (half prompt, half completion).
const TOKENS: u64 = 40;

fn policy(pathways: &str) -> String {
    format!(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: research-agent\n    id: {RESEARCH}\n    pathways:\n{pathways}"
    )
}

/// A plain-HTTP pathway to `port` with a token budget (and `extra` keys).
fn budget_pathway(name: &str, port: u16, budget: u64, extra: &str) -> String {
    format!(
        r#"      - name: {name}
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ llm_tokens_per_hour: {budget} }}
{extra}"#
    )
}

fn chat(model: &str, stream: bool) -> Vec<u8> {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

async fn post(
    agent: &AgentClient,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> AgentResponse {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    agent
        .request(
            "POST",
            &format!("http://localhost:{port}{path}"),
            &all,
            body,
        )
        .await
        .unwrap()
}

/// The tokens charged to the pathway's budget so far, once it has settled at (at
/// least) `at_least`.
async fn tokens_used(w: &World, pathway: &str, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let used = w
            .gateway
            .gateway()
            .limits()
            .snapshot()
            .iter()
            .find(|u| u.kind == "llm_tokens_per_hour" && u.pathway == pathway)
            .map(|u| u.used)
            .unwrap_or(0);
        if used >= at_least || tokio::time::Instant::now() > deadline {
            // Charges run in the background: give a stray one time to land.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return w
                .gateway
                .gateway()
                .limits()
                .snapshot()
                .iter()
                .find(|u| u.kind == "llm_tokens_per_hour" && u.pathway == pathway)
                .map(|u| u.used)
                .unwrap_or(0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `n`th audit line (1-based), once written.
async fn audit_line(w: &World, n: usize) -> Value {
    let lines = w.gateway.wait_for_audit(n).await;
    lines[n - 1].clone()
}

fn expect_reported(line: &Value, provider: &str, input: u64, output: u64) {
    assert_eq!(line["llm_usage_source"], "reported", "{line}");
    assert_eq!(line["llm_provider"], provider, "{line}");
    assert_eq!(line["llm_input_tokens"], input, "{line}");
    assert_eq!(line["llm_output_tokens"], output, "{line}");
    assert_eq!(line["llm_total_tokens"], input + output, "{line}");
}

/// An estimate: at least a token per 4 bytes moved, never 0.
fn expect_estimated(line: &Value) -> u64 {
    assert_eq!(line["llm_usage_source"], "estimated", "{line}");
    let total = line["llm_total_tokens"].as_u64().unwrap();
    let bytes = line["bytes_sent"].as_u64().unwrap() + line["bytes_received"].as_u64().unwrap();
    assert!(total >= 1 && total >= bytes.div_ceil(4), "{line}");
    total
}

fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_responses_are_charged_and_reach_the_agent_unchanged() {
    let llm = LlmUpstream::start(LlmTls::Plain, TOKENS).await.unwrap();
    let port = llm.addr.port();
    let w = World::start(&policy(&budget_pathway("llm", port, 1_000_000, "")))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let cases = [
        ("gzip, deflate", Some("gzip"), false),
        ("br", Some("br"), false),
        ("zstd", Some("zstd"), false),
        ("deflate", Some("deflate"), false),
        ("identity", None, false),
        // A stream the agent asked usage for: untouched, compressed.
        ("gzip", Some("gzip"), true),
        ("br", Some("br"), true),
    ];
    for (i, (accept, coding, stream)) in cases.iter().enumerate() {
        let body = if *stream {
            serde_json::to_vec(&serde_json::json!({"model": "gpt-4o-mini", "stream": true,
                "stream_options": {"include_usage": true}, "messages": []}))
            .unwrap()
        } else {
            chat("gpt-4o-mini", false)
        };
        let r = post(
            &agent,
            port,
            "/v1/chat/completions",
            &[("accept-encoding", accept)],
            body,
        )
        .await;
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.header("content-encoding"), *coding, "{accept}");
        // Byte for byte what the upstream sent.
        let sent = llm.responses().last().unwrap().clone();
        assert_eq!(r.body, sent.to_vec(), "{accept}");
        let decoded = Coding::named(coding.unwrap_or("identity")).decode(&r.body);
        assert!(
            String::from_utf8_lossy(&decoded).contains("\"usage\""),
            "{accept}"
        );
        let line = audit_line(&w, i + 1).await;
        expect_reported(&line, "openai", TOKENS / 2, TOKENS / 2);
        assert_eq!(line["llm_model"], "gpt-4o-mini");
        assert_eq!(line["llm_response_model"], "gpt-4o-mini");
        let want = TOKENS * (i as u64 + 1);
        assert_eq!(tokens_used(&w, "llm", want).await, want, "{accept}");
    }
    w.shutdown().await;
}

/// The issue's case: the OpenAI SDK's `Accept-Encoding: gzip, deflate` against an upstream
/// that compresses, 100-token answers, a budget of 300: three run, the rest get 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_answer_no_longer_slips_past_the_budget() {
    let llm = LlmUpstream::start(LlmTls::Plain, 100).await.unwrap();
    let port = llm.addr.port();
    let w = World::start(&policy(&budget_pathway("llm", port, 300, "")))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let mut statuses = Vec::new();
    for i in 0..5u64 {
        let r = post(
            &agent,
            port,
            "/v1/chat/completions",
            &[("accept-encoding", "gzip, deflate")],
            chat("gpt-4o-mini", i % 2 == 1),
        )
        .await;
        statuses.push(r.status);
        if r.status == 200 {
            tokens_used(&w, "llm", 100 * (i + 1)).await;
        } else {
            let j = r.json().unwrap();
            assert_eq!(j["error"]["type"], "rate_limited", "{j}");
            assert_eq!(j["error"]["code"], "llm_tokens_per_hour", "{j}");
            assert_eq!(j["error"]["limit"], "llm_tokens_per_hour", "{j}");
            assert!(
                j["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("300 of 300"),
                "{j}"
            );
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(tokens_used(&w, "llm", 300).await, 300);
    let metrics = w.gateway.metrics().await.unwrap();
    assert!(
        metrics.contains(r#"egress_limit_used{agent="research-agent",pathway="llm",limit="llm_tokens_per_hour"} 300"#),
        "{metrics}"
    );
    w.shutdown().await;
}

/// Each provider's endpoints, JSON and streamed: charged what the provider reports, with
/// the provider, models and tokens in the audit line, the span and the counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_is_charged_what_it_reports() {
    let llm = LlmUpstream::start(LlmTls::Plain, TOKENS).await.unwrap();
    let port = llm.addr.port();
    let otlp = OtlpReceiver::start().await.unwrap();
    let w = World::start_with(
        &policy(&budget_pathway("llm", port, 1_000_000, "")),
        GatewayOptions {
            otlp_endpoint: Some(otlp.endpoint()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let half = TOKENS / 2;
    let json = |v: Value| serde_json::to_vec(&v).unwrap();
    let msg = serde_json::json!([{"role": "user", "content": "hi"}]);
    // (path, body, accept-encoding, provider, input, output, request/response model)
    type Case<'a> = (&'a str, Vec<u8>, &'a str, &'a str, u64, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/v1/chat/completions",
            chat("gpt-4o-mini", false),
            "br",
            "openai",
            half,
            half,
            "gpt-4o-mini",
        ),
        (
            "/v1/chat/completions",
            chat("gpt-4o-mini", true),
            "gzip",
            "openai",
            half,
            half,
            "gpt-4o-mini",
        ),
        (
            "/v1/completions",
            json(serde_json::json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"})),
            "zstd",
            "openai",
            half,
            half,
            "gpt-3.5-turbo-instruct",
        ),
        (
            "/v1/completions",
            json(
                serde_json::json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": true}),
            ),
            "",
            "openai",
            half,
            half,
            "gpt-3.5-turbo-instruct",
        ),
        (
            "/v1/responses",
            json(serde_json::json!({"model": "gpt-4.1", "input": "hi"})),
            "gzip",
            "openai",
            half,
            half,
            "gpt-4.1",
        ),
        (
            "/v1/responses",
            json(serde_json::json!({"model": "gpt-4.1", "input": "hi", "stream": true})),
            "br",
            "openai",
            half,
            half,
            "gpt-4.1",
        ),
        (
            "/v1/embeddings",
            json(serde_json::json!({"model": "text-embedding-3-small", "input": "hi"})),
            "gzip",
            "openai",
            TOKENS,
            0,
            "text-embedding-3-small",
        ),
        // Anthropic reports half the prompt as cache reads: counted.
        (
            "/v1/messages",
            json(
                serde_json::json!({"model": "claude-haiku-4-5", "max_tokens": 64, "messages": msg}),
            ),
            "gzip",
            "anthropic",
            half,
            half,
            "claude-haiku-4-5",
        ),
        (
            "/v1/messages",
            json(
                serde_json::json!({"model": "claude-haiku-4-5", "max_tokens": 64, "messages": msg, "stream": true}),
            ),
            "zstd",
            "anthropic",
            half,
            half,
            "claude-haiku-4-5",
        ),
        // Gemini: the model is in the path; thoughts count as output.
        (
            "/v1beta/models/gemini-2.0-flash:generateContent",
            json(serde_json::json!({"contents": [{"parts": [{"text": "hi"}]}]})),
            "gzip",
            "gcp.gemini",
            half,
            half,
            "gemini-2.0-flash",
        ),
        (
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
            json(serde_json::json!({"contents": [{"parts": [{"text": "hi"}]}]})),
            "br",
            "gcp.gemini",
            half,
            half,
            "gemini-2.0-flash",
        ),
        (
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            json(serde_json::json!({"contents": [{"parts": [{"text": "hi"}]}]})),
            "",
            "gcp.gemini",
            half,
            half,
            "gemini-2.0-flash",
        ),
    ];
    let mut total = 0;
    for (i, (path, body, accept, provider, input, output, model)) in cases.iter().enumerate() {
        let headers: Vec<(&str, &str)> = if accept.is_empty() {
            Vec::new()
        } else {
            vec![("accept-encoding", *accept)]
        };
        let r = post(&agent, port, path, &headers, body.clone()).await;
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let line = audit_line(&w, i + 1).await;
        expect_reported(&line, provider, *input, *output);
        assert_eq!(line["llm_model"], *model, "{path}: {line}");
        assert_eq!(line["llm_response_model"], *model, "{path}: {line}");
        total += input + output;
        assert_eq!(tokens_used(&w, "llm", total).await, total, "{path}");
    }

    let spans = otlp.wait_for_spans(cases.len()).await;
    let gemini = spans
        .iter()
        .find(|s| s.str("gen_ai.system") == Some("gcp.gemini"))
        .unwrap_or_else(|| panic!("{spans:?}"));
    assert_eq!(gemini.str("gen_ai.request.model"), Some("gemini-2.0-flash"));
    assert_eq!(
        gemini.str("gen_ai.response.model"),
        Some("gemini-2.0-flash")
    );
    assert_eq!(gemini.int("gen_ai.usage.input_tokens"), Some(half as i64));
    assert_eq!(gemini.int("gen_ai.usage.output_tokens"), Some(half as i64));
    assert!(spans
        .iter()
        .any(|s| s.str("gen_ai.system") == Some("anthropic")));

    let metrics = w.gateway.metrics().await.unwrap();
    let input: u64 = cases.iter().map(|c| c.4).sum();
    for (direction, n) in [("input", input), ("output", total - input)] {
        let series = format!(
            r#"egress_llm_tokens_total{{agent="research-agent",pathway="llm",direction="{direction}"}} {n}"#
        );
        assert!(metrics.contains(&series), "{series}\n{metrics}");
    }
    w.shutdown().await;
}

/// `stream: true` without `stream_options`: the gateway asks for the usage and the agent
/// still gets the stream it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_charged_and_the_agent_gets_the_stream_it_asked_for() {
    let llm = LlmUpstream::start(LlmTls::Plain, TOKENS).await.unwrap();
    let port = llm.addr.port();
    let w = World::start(&policy(&budget_pathway("llm", port, 1_000_000, "")))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();

    // As the OpenAI SDK sends it by default.
    let r = post(
        &agent,
        port,
        "/v1/chat/completions",
        &[("accept-encoding", "gzip, deflate")],
        chat("gpt-4o-mini", true),
    )
    .await;
    assert_eq!(r.status, 200);
    let forwarded: Value = serde_json::from_slice(&llm.requests()[0].body).unwrap();
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    assert_eq!(forwarded["messages"][0]["content"], "hi");
    let data = sse_data(&r.body);
    let text: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, FAKE_STREAM_DELTAS.concat());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(
        data.iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .all(|c| c["usage"].is_null()),
        "the usage chunk reached the agent: {data:?}"
    );
    // What the upstream sent, less exactly the usage chunk.
    let sent = String::from_utf8_lossy(&llm.responses()[0]).to_string();
    let usage_chunk = sent
        .split("\n\n")
        .find(|e| e.contains("\"total_tokens\""))
        .unwrap()
        .to_string();
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        sent.replace(&format!("{usage_chunk}\n\n"), "")
    );
    expect_reported(&audit_line(&w, 1).await, "openai", TOKENS / 2, TOKENS / 2);

    // The agent's own `include_usage`: nothing changed either way.
    let own = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "stream_options": {"include_usage": true}, "messages": []});
    let r = post(
        &agent,
        port,
        "/v1/chat/completions",
        &[],
        serde_json::to_vec(&own).unwrap(),
    )
    .await;
    assert_eq!(llm.requests()[1].body, serde_json::to_vec(&own).unwrap());
    assert_eq!(r.body, llm.responses()[1].to_vec());
    assert!(sse_data(&r.body)
        .iter()
        .any(|d| d.contains("\"total_tokens\"")));
    expect_reported(&audit_line(&w, 2).await, "openai", TOKENS / 2, TOKENS / 2);
    assert_eq!(tokens_used(&w, "llm", 2 * TOKENS).await, 2 * TOKENS);
    w.shutdown().await;
}

/// No usage to read: an upstream error, streams and JSON cut mid-way (plain and
/// compressed), an API that reports none. Each is charged an estimate, marked so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_read_is_charged_an_estimate() {
    let llm = LlmUpstream::start(LlmTls::Plain, TOKENS).await.unwrap();
    let port = llm.addr.port();
    let echo = HttpEcho::start().await.unwrap();
    let pathways = budget_pathway("llm", port, 1_000_000, "")
        + &budget_pathway("echo", echo.addr.port(), 1_000_000, "");
    let w = World::start(&policy(&pathways)).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let mut charged = 0;
    let mut n = 0;

    // Upstream 500.
    llm.set_status(Some(500));
    let r = post(
        &agent,
        port,
        "/v1/chat/completions",
        &[("accept-encoding", "gzip")],
        chat("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.body, llm.responses()[0].to_vec());
    n += 1;
    charged += expect_estimated(&audit_line(&w, n).await);
    assert_eq!(tokens_used(&w, "llm", charged).await, charged);
    llm.set_status(None);

    // A stream the agent asked usage for, cut after two events: no usage arrived.
    llm.set_cut_after(Some(2));
    let own = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
        "stream_options": {"include_usage": true}, "messages": []});
    let _ = agent
        .request(
            "POST",
            &format!("http://localhost:{port}/v1/chat/completions"),
            &[],
            serde_json::to_vec(&own).unwrap(),
        )
        .await;
    n += 1;
    let line = audit_line(&w, n).await;
    charged += expect_estimated(&line);
    assert_eq!(tokens_used(&w, "llm", charged).await, charged);

    // An Anthropic stream cut after `message_start` (input tokens known, output not).
    let body = serde_json::json!({"model": "claude-haiku-4-5", "max_tokens": 64, "stream": true, "messages": []});
    let _ = agent
        .request(
            "POST",
            &format!("http://localhost:{port}/v1/messages"),
            &[],
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
    n += 1;
    charged += expect_estimated(&audit_line(&w, n).await);
    assert_eq!(tokens_used(&w, "llm", charged).await, charged);

    // A gzip JSON answer cut inside (a 64 KiB body, cut after 16 KiB).
    llm.set_cut_after(Some(1));
    llm.set_pad_to(64 * 1024);
    let _ = agent
        .request(
            "POST",
            &format!("http://localhost:{port}/v1/chat/completions"),
            &[("accept-encoding", "gzip")],
            chat("gpt-4o-mini", false),
        )
        .await;
    n += 1;
    charged += expect_estimated(&audit_line(&w, n).await);
    assert_eq!(tokens_used(&w, "llm", charged).await, charged);
    llm.set_cut_after(None);
    llm.set_pad_to(0);

    // An API that reports no usage at all.
    let r = post(
        &agent,
        echo.addr.port(),
        "/v1/chat/completions",
        &[],
        chat("m", false),
    )
    .await;
    assert_eq!(r.status, 200);
    n += 1;
    let echo_charged = expect_estimated(&audit_line(&w, n).await);
    assert_eq!(tokens_used(&w, "echo", echo_charged).await, echo_charged);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mib_json_answer_is_charged_what_it_reports() {
    let llm = LlmUpstream::start(LlmTls::Plain, TOKENS).await.unwrap();
    llm.set_pad_to(10 * 1024 * 1024);
    let port = llm.addr.port();
    let w = World::start(&policy(&budget_pathway("llm", port, 1_000_000, "")))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    for (i, accept) in ["identity", "gzip"].iter().enumerate() {
        let r = post(
            &agent,
            port,
            "/v1/chat/completions",
            &[("accept-encoding", accept)],
            chat("gpt-4o-mini", false),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(
            r.body == llm.responses()[i].to_vec(),
            "{accept}: the body changed"
        );
        let text = Coding::named(accept).decode(&r.body);
        assert!(text.len() > 10 * 1024 * 1024);
        let line = audit_line(&w, i + 1).await;
        expect_reported(&line, "openai", TOKENS / 2, TOKENS / 2);
    }
    assert_eq!(tokens_used(&w, "llm", 2 * TOKENS).await, 2 * TOKENS);
    w.shutdown().await;
}

/// `models` reads a compressed body decoded, and a Gemini path's model; a coding the
/// gateway cannot read is 415 on a pathway that must read the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_read_from_compressed_bodies_and_gemini_paths() {
    let llm = LlmUpstream::start(LlmTls::Plain, TOKENS).await.unwrap();
    let port = llm.addr.port();
    let w = World::start(&policy(&budget_pathway(
        "llm",
        port,
        1_000_000,
        "        models: [gpt-4o-mini, gemini-2.0-flash]\n        upstream: { tls: false }\n",
    )))
    .await
    .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let gz = |b: Vec<u8>| Coding::Gzip.encode(&b);
    let r = post(
        &agent,
        port,
        "/v1/chat/completions",
        &[("content-encoding", "gzip")],
        gz(chat("gpt-4o", false)),
    )
    .await;
    assert_eq!(r.status, 403);
    let j = r.json().unwrap();
    assert_eq!(j["error"]["type"], "egress_denied", "{j}");
    assert_eq!(j["error"]["code"], "model_not_allowed", "{j}");
    assert_eq!(j["error"]["message"], "model \"gpt-4o\" not allowed", "{j}");
    assert!(
        j["error"]["trace_id"]
            .as_str()
            .is_some_and(|t| t.len() == 32),
        "{j}"
    );
    let r = post(
        &agent,
        port,
        "/v1/chat/completions",
        &[("content-encoding", "gzip")],
        gz(chat("gpt-4o-mini", false)),
    )
    .await;
    assert_eq!(r.status, 200);
    // Forwarded as the agent sent it.
    assert_eq!(llm.requests()[0].body, gz(chat("gpt-4o-mini", false)));
    expect_reported(&audit_line(&w, 2).await, "openai", TOKENS / 2, TOKENS / 2);

    let r = post(
        &agent,
        port,
        "/v1/chat/completions",
        &[("content-encoding", "compress")],
        chat("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(r.status, 415);
    assert_eq!(r.json().unwrap()["error"]["type"], "unsupported_media_type");

    // The path names the model the upstream runs, whatever the body says.
    let gemini = |m: &str| format!("/v1beta/models/{m}:generateContent");
    let body =
        serde_json::to_vec(&serde_json::json!({"model": "gemini-2.0-flash", "contents": []}))
            .unwrap();
    let r = post(&agent, port, &gemini("gemini-2.5-pro"), &[], body.clone()).await;
    assert_eq!(r.status, 403);
    assert!(r.json().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gemini-2.5-pro"));
    let r = post(&agent, port, &gemini("gemini-2.0-flash"), &[], body).await;
    assert_eq!(r.status, 200);
    let lines = w.gateway.wait_for_audit(5).await;
    assert_eq!(lines[3]["llm_model"], "gemini-2.5-pro");
    expect_reported(&lines[4], "gcp.gemini", TOKENS / 2, TOKENS / 2);
    w.shutdown().await;
}

// === through the sidecar ===

/// A plain-HTTP proxy request, as an agent beside the sidecar sends it.
async fn via_proxy(
    proxy: std::net::SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> AgentResponse {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let uri: hyper::Uri = url.parse().unwrap();
    let mut req =
        hyper::Request::post(uri.clone()).header("host", uri.authority().unwrap().as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    AgentResponse {
        status,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_sidecar_a_compressed_stream_is_charged() {
    let llm = LlmUpstream::start(LlmTls::Plain, TOKENS).await.unwrap();
    let port = llm.addr.port();
    let w = World::start(&policy(&budget_pathway("llm", port, 2 * TOKENS, "")))
        .await
        .unwrap();
    let sidecar = TestSidecar::start(&w, RESEARCH).await.unwrap();
    let url = format!("http://localhost:{port}/v1/messages");
    let body = serde_json::to_vec(&serde_json::json!({"model": "claude-haiku-4-5", "max_tokens": 64, "stream": true, "messages": []})).unwrap();
    for i in 0..2 {
        let r = via_proxy(
            sidecar.listen_addr(),
            &url,
            &[
                ("accept-encoding", "br"),
                ("content-type", "application/json"),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some("br"));
        assert_eq!(r.body, llm.responses()[i].to_vec());
        let text = String::from_utf8_lossy(&Coding::Br.decode(&r.body)).to_string();
        assert!(text.contains("message_stop"), "{text}");
        expect_reported(
            &audit_line(&w, i + 1).await,
            "anthropic",
            TOKENS / 2,
            TOKENS / 2,
        );
    }
    assert_eq!(tokens_used(&w, "llm", 2 * TOKENS).await, 2 * TOKENS);
    // Spent: the SDK-shaped 429 reaches the agent through the sidecar.
    let r = via_proxy(sidecar.listen_addr(), &url, &[], body).await;
    assert_eq!(r.status, 429);
    let j = r.json().unwrap();
    assert_eq!(j["error"]["type"], "rate_limited", "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("LLM tokens"),
        "{j}"
    );
    sidecar.shutdown().await;
    w.shutdown().await;
}

// === the real SDKs, through interception ===

const OPENAI_SECRET: &str = "sk-live-openai-0123456789";
const ANTHROPIC_SECRET: &str = "sk-ant-live-0123456789";

/// api.openai.com and api.anthropic.com resolve to a fake on port 443 of a loopback
/// address of its own; the gateway intercepts the agents' TLS for them.
struct Intercepted {
    world: World,
    llm: TlsLlm,
    interception: TestCa,
    files: tempfile::TempDir,
}

impl Intercepted {
    async fn start(tokens: u64, budget: u64) -> Intercepted {
        let listener = test_harness::loopback::bind_unique(443).await.unwrap();
        let ip = listener.local_addr().unwrap().ip().to_string();
        let llm = TlsLlm::start_for_on(listener, &["api.openai.com", "api.anthropic.com"], tokens)
            .await
            .unwrap();
        let files = tempfile::tempdir().unwrap();
        let openai_key = files.path().join("openai.key");
        std::fs::write(&openai_key, OPENAI_SECRET).unwrap();
        let anthropic_key = files.path().join("anthropic.key");
        std::fs::write(&anthropic_key, ANTHROPIC_SECRET).unwrap();
        let interception = TestCa::new("interception.test");
        let (ca_cert, ca_key) = interception
            .write_signing_files(files.path(), "interception-ca")
            .unwrap();
        let ca_file = llm.ca_path().display().to_string();
        let policy = policy(&format!(
            r#"      - name: openai
        destinations: ["api.openai.com:443"]
        methods: [POST]
        models: [gpt-4o-mini]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ llm_tokens_per_hour: {budget} }}
        upstream:
          ca_file: {ca_file}
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
      - name: anthropic
        destinations: ["api.anthropic.com:443"]
        methods: [POST]
        models: ["claude-haiku-*"]
        allow_cidrs: [127.0.0.0/8]
        limits: {{ llm_tokens_per_hour: {budget} }}
        upstream:
          ca_file: {ca_file}
          inject_headers:
            x-api-key: {{ secret_file: {} }}
"#,
            openai_key.display(),
            anthropic_key.display(),
        ));
        let resolver = StaticResolver::new()
            .with("api.openai.com", &[ip.as_str()])
            .with("api.anthropic.com", &[ip.as_str()]);
        let world = World::start_with(
            &policy,
            GatewayOptions {
                extra_config: format!(
                    "interception:\n  ca_cert: {}\n  ca_key: {}\n",
                    ca_cert.display(),
                    ca_key.display()
                ),
                resolver: Some(Arc::new(resolver)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        Intercepted {
            world,
            llm,
            interception,
            files,
        }
    }

    fn trust_file(&self) -> PathBuf {
        let path = self.files.path().join("trust.pem");
        std::fs::write(&path, self.interception.root_pem()).unwrap();
        path
    }
}

/// The official OpenAI Python SDK with its defaults (`Accept-Encoding: gzip, deflate`,
/// `stream=True` without `include_usage`), intercepted: both calls are charged what the
/// API reports, and the stream the SDK reads is the one it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streaming_with_defaults_is_charged() {
    let Some(python) = interop_python("openai") else {
        return;
    };
    let s = Intercepted::start(10, 1_000_000).await;
    let sidecar = TestSidecar::start(&s.world, RESEARCH).await.unwrap();
    let mut cmd = client_command(&python, &s.trust_file(), "gpt-4o-mini");
    cmd.arg(interop_dir().join("openai_client.py"));
    with_proxy(&mut cmd, &sidecar.proxy_url());
    let out = run(cmd).await;
    let steps = Steps::parse(&out);
    steps.expect_answers("gpt-4o-mini");
    steps.expect_denied_skipped(out.status.success());
    assert_eq!(steps.step("completion")["text"], FAKE_TEXT);

    let seen = s.llm.upstream.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    // The SDK's defaults, as the API got them.
    assert!(
        seen[0]
            .header("accept-encoding")
            .unwrap_or_default()
            .contains("gzip"),
        "{:?}",
        seen[0]
    );
    let stream: Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(stream["stream"], true);
    assert_eq!(stream["stream_options"]["include_usage"], true);
    // The completion came back compressed, the stream plain (so its usage chunk could go).
    let responses = s.llm.upstream.responses();
    assert_ne!(responses[0].first(), Some(&b'{'));
    assert!(responses[1].starts_with(b"data: "));
    let lines = s.world.gateway.wait_for_audit(2).await;
    for line in &lines {
        assert_eq!(line["tls_intercepted"], true, "{line}");
        expect_reported(line, "openai", 5, 5);
    }
    assert_eq!(tokens_used(&s.world, "openai", 20).await, 20);
    sidecar.shutdown().await;
    s.world.shutdown().await;
}

/// The OpenAI and Anthropic Python SDKs put the gateway's reason in `str(error)` for a
/// model the pathway does not list (403) and for a spent budget (429).
async fn sdk_shows_the_reason(which: &str, model: &str, denied: &str) {
    let Some(python) = interop_python(which) else {
        return;
    };
    // 10 tokens a call, 25 allowed: three calls run (0, 10, 20 used), the fourth is 429.
    let s = Intercepted::start(10, 25).await;
    let sidecar = TestSidecar::start(&s.world, RESEARCH).await.unwrap();
    let mut cmd = client_command(&python, &s.trust_file(), model);
    cmd.arg(interop_dir().join("sdk_refusals.py"))
        .arg(which)
        .env("EGRESS_TEST_DENIED_MODEL", denied);
    with_proxy(&mut cmd, &sidecar.proxy_url());
    let out = run(cmd).await;
    let steps = Steps::parse(&out);
    assert!(out.status.success(), "{}", steps.output);
    let d = steps.step("denied");
    assert_eq!(d["status"], 403, "{}", steps.output);
    let message = d["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("model \"{denied}\" not allowed")),
        "{message}"
    );
    let l = steps.step("limited");
    assert_eq!(l["status"], 429, "{}", steps.output);
    // Three calls fit; a fourth may start before the third's charge lands.
    let answered = l["answered"].as_u64().unwrap();
    assert!((3..=4).contains(&answered), "{}", steps.output);
    let message = l["message"].as_str().unwrap();
    assert!(
        message.contains("of 25 LLM tokens this hour used on pathway"),
        "{message}"
    );
    sidecar.shutdown().await;
    s.world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_shows_the_gateways_reason() {
    sdk_shows_the_reason("openai", "gpt-4o-mini", "gpt-4o").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_shows_the_gateways_reason() {
    sdk_shows_the_reason("anthropic", "claude-haiku-4-5", "claude-opus-4").await;
}
