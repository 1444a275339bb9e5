//! A self-contained demo: a test CA and Workload API as the identity provider, the
//! gateway with an example policy, upstreams on loopback, and agents making allowed and
//! denied requests. Audit lines are printed as the gateway writes them.
//!
//! `cargo run -p test-harness --bin demo` (or `scripts/demo.sh`); `--serve` keeps the
//! gateway running afterwards so you can try it with curl. `--real-spire` takes every
//! identity from real `spire-server` and `spire-agent` instead (install them with
//! `scripts/install-spire.sh`).

use std::time::Duration;

use anyhow::Context as _;
use test_harness::agent::AgentClient;
use test_harness::ca::TestCa;
use test_harness::gateway::{GatewayOptions, TestGateway, GATEWAY_ID};
use test_harness::llm_upstream::TlsLlm;
use test_harness::spire::{SpireFixture, SpireOptions};
use test_harness::upstream::{HttpEcho, TlsEcho};
use test_harness::workload_api::FakeWorkloadApi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

fn policy(tls_port: u16, http_port: u16, llm: &LlmDemo) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
mode: enforce
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: knowledge-base        # L4: a TLS site, tunnelled with CONNECT
        destinations: ["localhost:{tls_port}"]
        allow_cidrs: [127.0.0.0/8, "::1/128"]   # the demo upstreams live on loopback
      - name: internal-api          # plain HTTP, forwarded
        destinations: ["localhost:{http_port}"]
        methods: [GET]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
      - name: llm-api               # L7: TLS upstream, injected key, models, token budget
        destinations: ["localhost:{llm_port}"]
        methods: [POST]
        models: [gpt-4o-mini]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
        upstream:
          ca_file: {llm_ca}
          inject_headers:
            authorization: {{ secret_file: {llm_secret}, prefix: "Bearer " }}
        limits: {{ llm_tokens_per_hour: 100 }}
  - name: coding-agent
    id: {CODING}
    pathways:
      - name: internal-api-write
        destinations: ["localhost:{http_port}"]
        methods: [POST]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
"#,
        llm_port = llm.tls.upstream.addr.port(),
        llm_ca = llm.tls.ca_file.path().display(),
        llm_secret = llm.secret.path().display(),
    )
}

/// A fake OpenAI-compatible API over TLS (40 tokens per answer) and the API key file.
struct LlmDemo {
    tls: TlsLlm,
    secret: tempfile::NamedTempFile,
}

const DEMO_KEY: &str = "sk-demo-not-a-real-key";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let serve = std::env::args().any(|a| a == "--serve");
    let real_spire = std::env::args().any(|a| a == "--real-spire");
    let ca = TestCa::new("example.org");
    let provider = if real_spire {
        // An hour-long SVID TTL: the demo shows decisions, not rotation.
        let opts = SpireOptions {
            x509_svid_ttl: Duration::from_secs(3600),
            ..SpireOptions::default()
        };
        Provider::Spire(Box::new(
            SpireFixture::start(opts)
                .await
                .context("starting real SPIRE")?,
        ))
    } else {
        Provider::Fake(
            FakeWorkloadApi::start_in_tempdir(test_harness::gateway::gateway_identity(&ca))
                .await
                .context("starting the Workload API")?,
        )
    };
    let site_ca = TestCa::new("site.test");
    let site = TlsEcho::start(site_ca.mint_server_cert(&["localhost"])).await?;
    let internal = HttpEcho::start().await?;
    let llm = LlmDemo {
        tls: TlsLlm::start(40).await?,
        secret: tempfile::NamedTempFile::new()?,
    };
    std::fs::write(llm.secret.path(), format!("{DEMO_KEY}\n"))?;
    let policy = policy(site.addr.port(), internal.addr.port(), &llm);

    println!("== egress-gateway demo");
    match &provider {
        Provider::Fake(api) => println!(
            "Workload API (embedded test SPIRE stand-in): {}",
            api.endpoint()
        ),
        Provider::Spire(spire) => println!(
            "Workload API: real SPIRE v{} agent at {} (server 127.0.0.1:{}, logs in {})",
            test_harness::spire::spire_version(),
            spire.endpoint(),
            spire.server_port(),
            spire.log_dir().display()
        ),
    }
    println!(
        "upstreams: TLS site localhost:{}, HTTP API localhost:{}",
        site.addr.port(),
        internal.addr.port()
    );
    println!("\n-- policy.yaml\n{policy}");

    // TLS interception for the L7 pathway: agents keep their https:// URLs.
    let interception = TestCa::new("interception.demo");
    let interception_dir = tempfile::tempdir()?;
    let (ca_cert, ca_key) =
        interception.write_signing_files(interception_dir.path(), "interception-ca")?;
    // Real SPIRE serves this process every entry's SVID: name the gateway's.
    let gw_opts = GatewayOptions {
        identity_spiffe_id: real_spire.then(|| GATEWAY_ID.to_string()),
        extra_config: format!(
            "interception:\n  ca_cert: {}\n  ca_key: {}\n",
            ca_cert.display(),
            ca_key.display()
        ),
        ..Default::default()
    };
    let gw = TestGateway::start_with(&policy, &provider.endpoint(), gw_opts).await?;
    println!(
        "gateway {GATEWAY_ID}\n  mTLS proxy {}  admin http://{}/readyz\n  audit log {}\n",
        gw.proxy_addr(),
        gw.admin_addr(),
        gw.audit_path().display()
    );
    let audit_path = gw.audit_path().to_path_buf();
    let tail = tokio::spawn(async move {
        let mut printed = 0;
        loop {
            let text = std::fs::read_to_string(&audit_path).unwrap_or_default();
            for line in text.lines().skip(printed) {
                println!("   audit: {line}");
                printed += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let (roots, research_svid, coding_svid) = match &provider {
        Provider::Fake(_) => (
            vec![ca.root_cert()],
            ca.mint_svid(RESEARCH),
            ca.mint_svid(CODING),
        ),
        Provider::Spire(spire) => (
            spire.roots().await?,
            spire.svid_for(RESEARCH).await?,
            spire.svid_for(CODING).await?,
        ),
    };
    let research =
        AgentClient::new(&research_svid, &roots, gw.proxy_addr())?.expect_gateway_id(GATEWAY_ID);
    let coding =
        AgentClient::new(&coding_svid, &roots, gw.proxy_addr())?.expect_gateway_id(GATEWAY_ID);

    step("research-agent: CONNECT to the TLS site (allowed, pathway knowledge-base)");
    let t = research
        .connect_tunnel(&format!("localhost:{}", site.addr.port()), &[])
        .await?;
    println!("   gateway answered {}", t.status);
    if let Some(stream) = t.stream {
        let mut tls = research
            .tls_through_tunnel(stream, "localhost", &[site_ca.root_cert()])
            .await?;
        tls.write_all(b"GET /article HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out);
        println!("   site said: {}", text.lines().next().unwrap_or_default());
    }
    pause().await;

    step("research-agent: GET http://localhost/docs (allowed, pathway internal-api)");
    let url = format!("http://localhost:{}/docs", internal.addr.port());
    let r = research.request("GET", &url, &[], Vec::new()).await?;
    println!("   {} {}", r.status, String::from_utf8_lossy(&r.body));
    pause().await;

    step("research-agent: POST to the same API (denied: the pathway allows GET only)");
    let r = research.request("POST", &url, &[], b"{}".to_vec()).await?;
    println!("   {} {}", r.status, String::from_utf8_lossy(&r.body));
    pause().await;

    step("research-agent: CONNECT pastebin.com:443 (denied by rule no-paste-sites)");
    let t = research.connect_tunnel("pastebin.com:443", &[]).await?;
    println!("   {} {}", t.status, String::from_utf8_lossy(&t.body));
    pause().await;

    step("coding-agent: POST to the API (allowed for this agent only)");
    let r = coding
        .request("POST", &url, &[], b"{\"patch\":1}".to_vec())
        .await?;
    println!("   {} {}", r.status, String::from_utf8_lossy(&r.body));
    pause().await;

    step("coding-agent: CONNECT to the TLS site (denied: no pathway for this agent)");
    let t = coding
        .connect_tunnel(&format!("localhost:{}", site.addr.port()), &[])
        .await?;
    println!("   {} {}", t.status, String::from_utf8_lossy(&t.body));
    pause().await;

    step("research-agent: CONNECT to the LLM API and speak https inside (pathway llm-api is L7: the gateway intercepts, decides and injects the key for each request)");
    let llm_authority = format!("localhost:{}", llm.tls.upstream.addr.port());
    let t = research.connect_tunnel(&llm_authority, &[]).await?;
    println!("   gateway answered {}", t.status);
    if let Some(stream) = t.stream {
        let mut tls = research
            .tls_through_tunnel(stream, "localhost", &[interception.root_cert()])
            .await?;
        let chat = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {llm_authority}\r\nContent-Type: application/json\r\nAuthorization: Bearer agent-has-no-real-key\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            chat.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(chat).await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out);
        println!(
            "   inside the tunnel: {} (the leaf the agent verified was signed by the interception CA)",
            text.lines().next().unwrap_or_default()
        );
    }
    wait_for_tokens(&gw, 40).await;
    pause().await;

    step("research-agent: chat completions through pathway llm-api in absolute form, with the OpenAI SDK's `Accept-Encoding: gzip, deflate` (the same budget: 100 tokens per hour, 40 per answer, charged from the compressed answers' usage)");
    let llm_url = format!(
        "http://localhost:{}/v1/chat/completions",
        llm.tls.upstream.addr.port()
    );
    let chat = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    for i in 1..=4u64 {
        let r = research
            .request(
                "POST",
                &llm_url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", "Bearer agent-has-no-real-key"),
                    ("accept-encoding", "gzip, deflate"),
                ],
                chat.to_vec(),
            )
            .await?;
        let retry = r
            .header("retry-after")
            .map(|s| format!(" (Retry-After: {s} s)"))
            .unwrap_or_default();
        let body = match r.header("content-encoding") {
            Some(coding) => format!("({coding}, {} bytes, passed on as sent)", r.body.len()),
            None => String::from_utf8_lossy(&r.body).to_string(),
        };
        println!("   request {i}: {}{retry} {body}", r.status);
        if r.status == 200 {
            wait_for_tokens(&gw, 40 * (i + 1)).await;
        }
    }
    let seen = llm.tls.upstream.requests();
    let injected = seen
        .iter()
        .all(|r| r.header("authorization") == Some(&format!("Bearer {DEMO_KEY}")));
    println!(
        "   the LLM API received {} requests, each with the injected key instead of the agent's: {injected}",
        seen.len()
    );
    for u in gw.gateway().limits().snapshot() {
        println!(
            "   budget {}/{} {}: {} of {}",
            u.agent, u.pathway, u.kind, u.used, u.limit
        );
    }
    pause().await;

    step("an agent of another trust domain (evil.org): refused at the TLS handshake");
    let evil = TestCa::new("evil.org");
    let stranger = AgentClient::new(
        &evil.mint_svid("spiffe://evil.org/sa/x"),
        &roots,
        gw.proxy_addr(),
    )?;
    match stranger.request("GET", &url, &[], Vec::new()).await {
        Ok(r) => println!("   unexpected answer {}", r.status),
        Err(e) => println!("   refused: {e:#}"),
    }
    pause().await;

    if serve {
        println!("\nServing until Ctrl-C. Try it with curl:");
        let dir = gw.dir().to_path_buf();
        std::fs::write(dir.join("agent.crt"), research_svid.cert_pem())?;
        std::fs::write(dir.join("agent.key"), research_svid.key_pem())?;
        let bundle: String = roots
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
            .collect();
        std::fs::write(dir.join("ca.pem"), bundle)?;
        std::fs::write(dir.join("interception-ca.pem"), interception.root_pem())?;
        println!(
            "  curl --proxy https://127.0.0.1:{port} --proxy-cert {d}/agent.crt --proxy-key {d}/agent.key --proxy-cacert {d}/ca.pem {url}",
            port = gw.proxy_addr().port(),
            d = dir.display(),
        );
        println!(
            "  curl --proxy https://127.0.0.1:{port} --proxy-cert {d}/agent.crt --proxy-key {d}/agent.key --proxy-cacert {d}/ca.pem --cacert {d}/interception-ca.pem -H 'content-type: application/json' -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[]}}' https://{llm_authority}/v1/chat/completions",
            port = gw.proxy_addr().port(),
            d = dir.display(),
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    tail.abort();
    gw.shutdown().await;
    if let Provider::Fake(api) = provider {
        api.shutdown().await;
    }
    println!("\n== done: every request above, allowed or denied, has one audit line.");
    Ok(())
}

/// Where identities come from: the embedded fake Workload API, or real SPIRE.
enum Provider {
    Fake(FakeWorkloadApi),
    Spire(Box<SpireFixture>),
}

impl Provider {
    fn endpoint(&self) -> String {
        match self {
            Provider::Fake(api) => api.endpoint(),
            Provider::Spire(spire) => spire.endpoint(),
        }
    }
}

/// Tokens are charged as an answer ends: waits (bounded) until `used` are counted, so
/// the next request sees them.
async fn wait_for_tokens(gw: &TestGateway, used: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline
        && !gw
            .gateway()
            .limits()
            .snapshot()
            .iter()
            .any(|u| u.kind == "llm_tokens_per_hour" && u.used >= used)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn step(what: &str) {
    println!("\n>> {what}");
}

async fn pause() {
    // Lets the audit tail print the line before the next step starts.
    tokio::time::sleep(Duration::from_millis(150)).await;
}
