//! Load generator: small forwarded HTTP requests on keep-alive connections, sent
//! directly to an upstream (the baseline) and through the gateway over mTLS, in one run.
//!
//! With `--via-sidecar`, also through `egress-gateway sidecar` (plain HTTP proxy from the
//! agent to the sidecar, mTLS from the sidecar to the gateway), compared with the direct
//! mTLS client.
//!
//! With `--l7`, instead: small OpenAI-style POSTs through a plain forwarded pathway and
//! through an L7 pathway (TLS origination with a `ca_file`, an injected key, every limit
//! incl. a token budget), then the same L7 pathway with limits shared through Redis.
//!
//! With `--intercept`: the same L7 pathway reached by an unmodified `https://` client
//! (CONNECT, then TLS the gateway terminates with a leaf from the interception CA, then
//! keep-alive requests inside) against the absolute-form `http://host:443` requests, and
//! how many leaves the CA signs per 1000 new tunnels to one host.
//!
//! With `--llm-budget`: what token accounting costs the agent. The same L7 pathway with
//! and without `llm_tokens_per_hour`, against the real `egress-gateway` binary in its own
//! process (build it first with `cargo build --release -p egress-gateway`): CPU per
//! request with gzip-compressed JSON answers, and time to the first byte of streams.
//!
//! With `--mcp`: what MCP pathways cost. `tools/call` through a pathway with `mcp` against
//! the same pathway without it, CPU per request of the real `egress-gateway` binary in its
//! own process (build it first, as for `--llm-budget`); then `tools/list` answers of 200
//! tools filtered to the 100 the pathway lists, p50 latency against the unfiltered one.
//!
//! `cargo run --release -p test-harness --bin loadgen -- [--connections 8] [--seconds 5] [--via-sidecar | --l7 | --intercept | --llm-budget | --mcp]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use test_harness::gateway::{GatewayOptions, World};
use test_harness::otlp::OtlpReceiver;
use test_harness::sidecar::TestSidecar;
use test_harness::upstream::HttpEcho;

struct Args {
    connections: usize,
    seconds: u64,
    via_sidecar: bool,
    l7: bool,
    intercept: bool,
    llm_budget: bool,
    mcp: bool,
}

fn args() -> Args {
    let mut a = Args {
        connections: 8,
        seconds: 5,
        via_sidecar: false,
        l7: false,
        intercept: false,
        llm_budget: false,
        mcp: false,
    };
    let argv: Vec<String> = std::env::args().collect();
    a.via_sidecar = argv.iter().any(|x| x == "--via-sidecar");
    a.l7 = argv.iter().any(|x| x == "--l7");
    a.intercept = argv.iter().any(|x| x == "--intercept");
    a.llm_budget = argv.iter().any(|x| x == "--llm-budget");
    a.mcp = argv.iter().any(|x| x == "--mcp");
    for w in argv.windows(2) {
        match w[0].as_str() {
            "--connections" => a.connections = w[1].parse().unwrap_or(a.connections),
            "--seconds" => a.seconds = w[1].parse().unwrap_or(a.seconds),
            _ => {}
        }
    }
    a
}

struct Report {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
    fn print(&self, name: &str) {
        println!(
            "{name:<10} {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  ({} requests, {} errors)",
            self.rps(),
            self.pct(0.50).as_secs_f64() * 1e6,
            self.pct(0.99).as_secs_f64() * 1e6,
            self.requests,
            self.errors
        );
    }
}

/// GETs on one plain keep-alive HTTP/1.1 connection until `until`: `/bench` straight to
/// the upstream, or an absolute-form URL to the sidecar as any `HTTP_PROXY` client
/// sends it.
async fn plain_worker(
    addr: std::net::SocketAddr,
    uri: String,
    host: String,
    until: Instant,
) -> (Vec<Duration>, usize) {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (Vec::new(), 1);
    };
    let _ = tcp.set_nodelay(true);
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return (Vec::new(), 1);
    };
    tokio::spawn(conn);
    keep_sending(&mut send, until, usize::MAX, || {
        hyper::Request::get(uri.as_str())
            .header("host", host.as_str())
            .body(Empty::<Bytes>::new())
            .expect("static request")
    })
    .await
}

/// Sends requests made by `make` on one connection until `until` or `max` answers;
/// returns the latencies of the 200s and how many failed.
async fn keep_sending<B, F>(
    send: &mut hyper::client::conn::http1::SendRequest<B>,
    until: Instant,
    max: usize,
    make: F,
) -> (Vec<Duration>, usize)
where
    B: hyper::body::Body + 'static,
    F: Fn() -> hyper::Request<B>,
{
    let mut lat = Vec::new();
    let mut errors = 0;
    while Instant::now() < until && lat.len() < max {
        let req = make();
        let t = Instant::now();
        match send.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status() == 200;
                let _ = resp.into_body().collect().await;
                if ok {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    (lat, errors)
}

async fn run<F, Fut>(connections: usize, seconds: u64, worker: F) -> Report
where
    F: Fn(Instant) -> Fut,
    Fut: std::future::Future<Output = (Vec<Duration>, usize)> + Send + 'static,
{
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(worker(until)))
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for h in handles {
        if let Ok((l, e)) = h.await {
            latencies.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Report {
        requests: latencies.len(),
        errors,
        elapsed,
        latencies,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    if a.l7 {
        return l7(&a).await;
    }
    if a.intercept {
        return intercept(&a).await;
    }
    if a.llm_budget {
        return llm_budget(&a).await;
    }
    if a.mcp {
        return mcp_bench(&a).await;
    }
    let echo = HttpEcho::start().await?;
    let port = echo.addr.port();
    let policy = format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: bench-agent
    id: spiffe://example.org/ns/ai-workloads/sa/bench-agent
    pathways:
      - name: echo
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
"#
    );
    println!(
        "{} keep-alive connections, {} s each, small GET requests",
        a.connections, a.seconds
    );

    let addr = echo.addr;
    let direct = run(a.connections, a.seconds, move |until| {
        plain_worker(
            addr,
            "/bench".into(),
            format!("localhost:{}", addr.port()),
            until,
        )
    })
    .await;
    direct.print("direct");

    let url = format!("http://localhost:{port}/bench");
    let plain = Arc::new(World::start(&policy).await?);
    let via = through_gateway(&plain, &url, a.connections, a.seconds).await;
    via.print("gateway");

    // The same, with every span exported to an OTLP collector.
    let otlp = OtlpReceiver::start().await?;
    let traced = Arc::new(
        World::start_with(
            &policy,
            GatewayOptions {
                otlp_endpoint: Some(otlp.endpoint()),
                ..Default::default()
            },
        )
        .await?,
    );
    let via_traced = through_gateway(&traced, &url, a.connections, a.seconds).await;
    via_traced.print("+tracing");

    println!(
        "ratio gateway/direct: throughput {:.2}, p50 latency {:.2}x, p99 latency {:.2}x",
        via.rps() / direct.rps(),
        via.pct(0.5).as_secs_f64() / direct.pct(0.5).as_secs_f64(),
        via.pct(0.99).as_secs_f64() / direct.pct(0.99).as_secs_f64()
    );
    println!(
        "ratio tracing on/off: throughput {:.2}, p50 latency {:.2}x, p99 latency {:.2}x ({} spans received)",
        via_traced.rps() / via.rps(),
        via_traced.pct(0.5).as_secs_f64() / via.pct(0.5).as_secs_f64(),
        via_traced.pct(0.99).as_secs_f64() / via.pct(0.99).as_secs_f64(),
        otlp.spans().len()
    );
    if a.via_sidecar {
        let sidecar = TestSidecar::start(
            &plain,
            "spiffe://example.org/ns/ai-workloads/sa/bench-agent",
        )
        .await?;
        let proxy = sidecar.listen_addr();
        let url = url.clone();
        let host = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let side = run(a.connections, a.seconds, move |until| {
            plain_worker(proxy, url.clone(), host.clone(), until)
        })
        .await;
        side.print("sidecar");
        println!(
            "ratio sidecar/gateway (agent with mTLS, no sidecar): throughput {:.2}, p50 latency {:.2}x, p99 latency {:.2}x; the sidecar hop adds p50 {:+.1} µs, p99 {:+.1} µs",
            side.rps() / via.rps(),
            side.pct(0.5).as_secs_f64() / via.pct(0.5).as_secs_f64(),
            side.pct(0.99).as_secs_f64() / via.pct(0.99).as_secs_f64(),
            (side.pct(0.5).as_secs_f64() - via.pct(0.5).as_secs_f64()) * 1e6,
            (side.pct(0.99).as_secs_f64() - via.pct(0.99).as_secs_f64()) * 1e6,
        );
        sidecar.shutdown().await;
    }
    for w in [plain, traced] {
        if let Ok(w) = Arc::try_unwrap(w) {
            w.shutdown().await;
        }
    }
    Ok(())
}

async fn through_gateway(
    world: &Arc<World>,
    url: &str,
    connections: usize,
    seconds: u64,
) -> Report {
    let w = world.clone();
    let url = url.to_string();
    run(connections, seconds, move |until| {
        let agent = w
            .agent("spiffe://example.org/ns/ai-workloads/sa/bench-agent")
            .expect("agent client");
        let url = url.clone();
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let Ok(mut session) = agent.session().await else {
                return (lat, 1);
            };
            while Instant::now() < until {
                let t = Instant::now();
                match session.request("GET", &url, &[], Vec::new()).await {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }
    })
    .await
}

const BENCH_AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/bench-agent";

/// L7 pathway overhead over a plain forwarded one, and Redis over in-memory limits.
async fn l7(a: &Args) -> anyhow::Result<()> {
    use test_harness::llm_upstream::{LlmTls, LlmUpstream, RedisServer, TlsLlm};
    let plain_up = LlmUpstream::start(LlmTls::Plain, 10).await?;
    let tls_up = TlsLlm::start(10).await?;
    let secret = tempfile::NamedTempFile::new()?;
    std::fs::write(secret.path(), "sk-bench-secret\n")?;
    let policy = format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: bench-agent
    id: {BENCH_AGENT}
    pathways:
      - name: plain
        destinations: ["localhost:{}"]
        allow_cidrs: [127.0.0.0/8]
      - name: l7
        destinations: ["localhost:{}"]
        allow_cidrs: [127.0.0.0/8]
        upstream:
          ca_file: {}
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
        limits:
          requests_per_minute: 1000000000
          max_concurrent: 100000
          max_request_body_bytes: 1048576
          bytes_per_hour: 1000000000000
          llm_tokens_per_hour: 1000000000000
"#,
        plain_up.addr.port(),
        tls_up.upstream.addr.port(),
        tls_up.ca_file.path().display(),
        secret.path().display()
    );
    println!(
        "{} keep-alive connections, {} s each, small OpenAI-style POSTs with JSON usage",
        a.connections, a.seconds
    );
    let plain_url = format!(
        "http://localhost:{}/v1/chat/completions",
        plain_up.addr.port()
    );
    let l7_url = format!(
        "http://localhost:{}/v1/chat/completions",
        tls_up.upstream.addr.port()
    );

    let mem = Arc::new(World::start(&policy).await?);
    let plain = post_through(&mem, &plain_url, a.connections, a.seconds).await;
    plain.print("forwarded");
    let l7_mem = post_through(&mem, &l7_url, a.connections, a.seconds).await;
    l7_mem.print("l7-memory");

    let redis = RedisServer::start().await?;
    let shared = Arc::new(
        World::start_with(
            &policy,
            GatewayOptions {
                extra_config: format!("limits_backend: {}\n", redis.url()),
                ..Default::default()
            },
        )
        .await?,
    );
    let l7_redis = post_through(&shared, &l7_url, a.connections, a.seconds).await;
    l7_redis.print("l7-redis");
    println!(
        "ratio L7 pathway (TLS origination + injection + limits) / plain forwarded: throughput {:.2}, p50 latency {:.2}x, p99 latency {:.2}x",
        l7_mem.rps() / plain.rps(),
        l7_mem.pct(0.5).as_secs_f64() / plain.pct(0.5).as_secs_f64(),
        l7_mem.pct(0.99).as_secs_f64() / plain.pct(0.99).as_secs_f64(),
    );
    println!(
        "Redis limits over in-memory: p50 {:+.1} µs, p99 {:+.1} µs per request; throughput {:.2}",
        (l7_redis.pct(0.5).as_secs_f64() - l7_mem.pct(0.5).as_secs_f64()) * 1e6,
        (l7_redis.pct(0.99).as_secs_f64() - l7_mem.pct(0.99).as_secs_f64()) * 1e6,
        l7_redis.rps() / l7_mem.rps(),
    );
    for w in [mem, shared] {
        if let Ok(w) = Arc::try_unwrap(w) {
            w.shutdown().await;
        }
    }
    Ok(())
}

async fn post_through(world: &Arc<World>, url: &str, connections: usize, seconds: u64) -> Report {
    let w = world.clone();
    let url = url.to_string();
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    run(connections, seconds, move |until| {
        let agent = w.agent(BENCH_AGENT).expect("agent client");
        let (url, body) = (url.clone(), body.clone());
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let Ok(mut session) = agent.session().await else {
                return (lat, 1);
            };
            let headers = [
                ("content-type", "application/json"),
                ("authorization", "Bearer agent"),
            ];
            while Instant::now() < until {
                let t = Instant::now();
                match session.request("POST", &url, &headers, body.clone()).await {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }
    })
    .await
}

/// Intercepted `https://` requests against the same requests in absolute form.
async fn intercept(a: &Args) -> anyhow::Result<()> {
    use test_harness::ca::TestCa;
    use test_harness::llm_upstream::TlsLlm;
    use test_harness::resolver::StaticResolver;
    let listener = test_harness::loopback::bind_unique(443).await?;
    let ip = listener.local_addr()?.ip().to_string();
    let llm = TlsLlm::start_for_on(listener, &["api.openai.com"], 10).await?;
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("key");
    std::fs::write(&secret, "sk-bench-secret\n")?;
    let ca = TestCa::new("interception.bench");
    let (ca_cert, ca_key) = ca.write_signing_files(dir.path(), "ca")?;
    let policy = format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: bench-agent
    id: {BENCH_AGENT}
    pathways:
      - name: openai
        destinations: ["api.openai.com:443"]
        allow_cidrs: [127.0.0.0/8]
        upstream:
          ca_file: {}
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
        limits: {{ requests_per_minute: 1000000000, llm_tokens_per_hour: 1000000000000 }}
"#,
        llm.ca_path().display(),
        secret.display()
    );
    let world = Arc::new(
        World::start_with(
            &policy,
            GatewayOptions {
                extra_config: format!(
                    "interception: {{ ca_cert: {}, ca_key: {} }}\n",
                    ca_cert.display(),
                    ca_key.display()
                ),
                resolver: Some(Arc::new(
                    StaticResolver::new().with("api.openai.com", &[ip.as_str()]),
                )),
                ..Default::default()
            },
        )
        .await?,
    );
    println!(
        "{} keep-alive connections, {} s each, small OpenAI-style POSTs to api.openai.com:443",
        a.connections, a.seconds
    );
    let absolute = post_through(
        &world,
        "http://api.openai.com:443/v1/chat/completions",
        a.connections,
        a.seconds,
    )
    .await;
    absolute.print("absolute");
    let roots = vec![ca.root_cert()];
    let w = world.clone();
    let intercepted = run(a.connections, a.seconds, move |until| {
        let agent = w.agent(BENCH_AGENT).expect("agent client");
        let roots = roots.clone();
        async move { intercepted_worker(agent, roots, until, usize::MAX).await }
    })
    .await;
    intercepted.print("intercept");
    println!(
        "ratio intercepted/absolute-form: throughput {:.2}, p50 latency {:.2}x, p99 latency {:.2}x (added p50 {:+.1} µs, p99 {:+.1} µs)",
        intercepted.rps() / absolute.rps(),
        intercepted.pct(0.5).as_secs_f64() / absolute.pct(0.5).as_secs_f64(),
        intercepted.pct(0.99).as_secs_f64() / absolute.pct(0.99).as_secs_f64(),
        (intercepted.pct(0.5).as_secs_f64() - absolute.pct(0.5).as_secs_f64()) * 1e6,
        (intercepted.pct(0.99).as_secs_f64() - absolute.pct(0.99).as_secs_f64()) * 1e6,
    );

    // New tunnels, one request each: the CA signs one leaf for the host, then none.
    let mints = || async {
        let text = world.gateway.metrics().await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("egress_interception_leaf_mints_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = mints().await;
    let tunnels = 1000;
    let started = Instant::now();
    let mut failed = 0;
    for _ in 0..tunnels {
        let agent = world.agent(BENCH_AGENT)?;
        let (lat, errors) = intercepted_worker(
            agent,
            vec![ca.root_cert()],
            Instant::now() + Duration::from_secs(10),
            1,
        )
        .await;
        failed += errors + usize::from(lat.is_empty());
    }
    let elapsed = started.elapsed();
    println!(
        "{tunnels} new tunnels (mTLS + CONNECT + intercepted TLS + 1 request): {:.0} tunnels/s, {} leaf mints per 1000 new tunnels after the first ({failed} failed)",
        f64::from(tunnels) / elapsed.as_secs_f64(),
        mints().await - before,
    );
    if let Ok(w) = Arc::try_unwrap(world) {
        w.shutdown().await;
    }
    Ok(())
}

/// One intercepted tunnel to api.openai.com:443 with up to `max` keep-alive POSTs.
async fn intercepted_worker(
    agent: test_harness::agent::AgentClient,
    roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    until: Instant,
    max: usize,
) -> (Vec<Duration>, usize) {
    let Ok(tunnel) = agent.connect_tunnel("api.openai.com:443", &[]).await else {
        return (Vec::new(), 1);
    };
    let Some(stream) = tunnel.stream else {
        return (Vec::new(), 1);
    };
    let Ok(tls) = agent
        .tls_through_tunnel(stream, "api.openai.com", &roots)
        .await
    else {
        return (Vec::new(), 1);
    };
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
    else {
        return (Vec::new(), 1);
    };
    tokio::spawn(conn);
    let body = Bytes::from_static(
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    );
    keep_sending(&mut send, until, max, || {
        hyper::Request::post("/v1/chat/completions")
            .header("host", "api.openai.com")
            .header("content-type", "application/json")
            .header("authorization", "Bearer agent")
            .body(http_body_util::Full::new(body.clone()))
            .expect("static request")
    })
    .await
}

/// What token accounting costs the agent: the same L7 pathway with and without
/// `llm_tokens_per_hour`, gzip-compressed JSON answers (as the OpenAI SDK accepts
/// them), then streams. The gateway is the real binary in its own process, so its CPU
/// per request is read from `/proc` apart from the load generator and the fake API.
async fn llm_budget(a: &Args) -> anyhow::Result<()> {
    use test_harness::ca::TestCa;
    use test_harness::gateway::{admin_get, gateway_identity, GATEWAY_ID};
    use test_harness::llm_upstream::TlsLlm;
    use test_harness::workload_api::FakeWorkloadApi;

    let binary = std::env::current_exe()?.with_file_name("egress-gateway");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it first (cargo build --release -p egress-gateway)",
        binary.display()
    );
    let up = TlsLlm::start(40).await?;
    let port = up.upstream.addr.port();
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca)).await?;
    let dir = tempfile::tempdir()?;
    let pathway = |budget: &str| {
        format!(
            r#"      - name: llm
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ ca_file: {} }}
        limits: {{ max_concurrent: 100000{budget} }}
"#,
            up.ca_path().display()
        )
    };
    let policy = format!(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: budget-agent\n    id: {BUDGET_AGENT}\n    pathways:\n{}  - name: free-agent\n    id: {FREE_AGENT}\n    pathways:\n{}",
        pathway(", llm_tokens_per_hour: 1000000000000"),
        pathway("")
    );
    std::fs::write(dir.path().join("policy.yaml"), policy)?;
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\npolicy: {}\ntelemetry:\n  audit_log: {}\n",
            dir.path().join("policy.yaml").display(),
            dir.path().join("audit.log").display()
        ),
    )?;
    let mut child = tokio::process::Command::new(&binary)
        .args(["run", "--config"])
        .arg(&config)
        .env("SPIFFE_ENDPOINT_SOCKET", api.endpoint())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (proxy, admin) = listening_addrs(stderr).await?;
    for _ in 0..100 {
        if admin_get(admin, "/readyz").await.map(|r| r.0).unwrap_or(0) == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = |id: &str| -> anyhow::Result<test_harness::agent::AgentClient> {
        Ok(
            test_harness::agent::AgentClient::new(&ca.mint_svid(id), &[ca.root_cert()], proxy)?
                .expect_gateway_id(GATEWAY_ID),
        )
    };
    let (budget, free) = (agent(BUDGET_AGENT)?, agent(FREE_AGENT)?);
    let url = format!("http://localhost:{port}/v1/chat/completions");
    println!(
        "{} keep-alive connections; the gateway in its own process; rounds alternate the two pathways",
        a.connections
    );

    // CPU per request: gzip-compressed JSON answers.
    let json = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    // Short alternating rounds, so load from elsewhere on the machine falls on both
    // sides alike; the median of the per-round ratios is the figure.
    let mut cpu = [0f64; 2];
    let mut done = [0usize; 2];
    let mut ratios = Vec::new();
    let mut latency: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for _round in 0..ROUNDS {
        let mut per_round = [0f64; 2];
        for (i, client) in [&free, &budget].into_iter().enumerate() {
            let before = process_cpu(pid)?;
            let r = post_compressed(client, &url, &json, a.connections, a.seconds).await;
            let used = process_cpu(pid)? - before;
            anyhow::ensure!(r.errors == 0, "{} requests failed", r.errors);
            cpu[i] += used;
            done[i] += r.requests;
            latency[i].extend(r.latencies);
            per_round[i] = used / r.requests.max(1) as f64;
        }
        ratios.push(per_round[1] / per_round[0]);
    }
    ratios.sort_by(f64::total_cmp);
    for l in &mut latency {
        l.sort_unstable();
    }
    let per = |i: usize| cpu[i] / done[i].max(1) as f64 * 1e6;
    let p50 = |i: usize| {
        latency[i]
            .get(latency[i].len() / 2)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "gzip JSON latency p50: without budget {:?}, with budget {:?}",
        p50(0),
        p50(1)
    );
    println!(
        "gzip JSON: without budget {:.1} µs CPU/request ({} requests), with budget {:.1} µs CPU/request ({} requests); per-round ratios {:.3?}",
        per(0),
        done[0],
        per(1),
        done[1],
        ratios
    );

    // Time to the first byte of a stream (events 2 ms apart): `stream: true` without
    // `stream_options`, as the SDK streams by default, with its `Accept-Encoding:
    // gzip, deflate` and without any.
    up.upstream.set_stream_delay(Duration::from_millis(2));
    let stream =
        br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
            .to_vec();
    let p = |t: &[Duration], q: f64| t[((t.len() as f64 - 1.0) * q) as usize];
    let mut ttfb_ratios = Vec::new();
    for accept in ["gzip, deflate", "identity"] {
        let mut ttfb: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for _round in 0..ROUNDS {
            for (i, client) in [&free, &budget].into_iter().enumerate() {
                ttfb[i].extend(
                    first_bytes(client, &url, &stream, accept, a.connections, a.seconds).await?,
                );
            }
        }
        for t in &mut ttfb {
            t.sort_unstable();
        }
        println!(
            "stream TTFB (accept-encoding: {accept}): without budget p50 {:?} p99 {:?} ({} streams), with budget p50 {:?} p99 {:?} ({} streams)",
            p(&ttfb[0], 0.5),
            p(&ttfb[0], 0.99),
            ttfb[0].len(),
            p(&ttfb[1], 0.5),
            p(&ttfb[1], 0.99),
            ttfb[1].len()
        );
        ttfb_ratios.push(p(&ttfb[1], 0.5).as_secs_f64() / p(&ttfb[0], 0.5).as_secs_f64());
    }
    println!(
        "ratio with budget / without: CPU per request {:.3}x median of rounds ({:.3}x overall; limit 1.15x), stream TTFB p50 {:.3}x with gzip accepted, {:.3}x without (limit 1.05x)",
        ratios[ratios.len() / 2],
        per(1) / per(0),
        ttfb_ratios[0],
        ttfb_ratios[1]
    );
    let _ = child.kill().await;
    Ok(())
}

/// Alternating rounds per side in `--llm-budget`.
const ROUNDS: usize = 6;
const BUDGET_AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/budget-agent";
const FREE_AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/free-agent";

/// The proxy and admin addresses from the gateway's JSON log lines.
async fn listening_addrs(
    stderr: tokio::process::ChildStderr,
) -> anyhow::Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let (mut proxy, mut admin) = (None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while proxy.is_none() || admin.is_none() {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("the gateway did not start"))??
            .ok_or_else(|| anyhow::anyhow!("the gateway exited"))?;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(p) = v["proxy_addr"].as_str() {
            proxy = Some(p.parse()?);
        }
        if let Some(p) = v["admin_addr"].as_str() {
            admin = Some(p.parse()?);
        }
    }
    // Keep draining the log so the gateway never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((
        proxy.unwrap_or(([0, 0, 0, 0], 0).into()),
        admin.unwrap_or(([0, 0, 0, 0], 0).into()),
    ))
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
fn process_cpu(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// JSON POSTs accepting gzip, on keep-alive connections.
async fn post_compressed(
    agent: &test_harness::agent::AgentClient,
    url: &str,
    body: &[u8],
    connections: usize,
    seconds: u64,
) -> Report {
    let (agent, url, body) = (agent.clone(), url.to_string(), body.to_vec());
    run(connections, seconds, move |until| {
        let (agent, url, body) = (agent.clone(), url.clone(), body.clone());
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let Ok(mut session) = agent.session().await else {
                return (lat, 1);
            };
            let headers = [
                ("content-type", "application/json"),
                ("accept-encoding", "gzip, deflate"),
            ];
            while Instant::now() < until {
                let t = Instant::now();
                match session.request("POST", &url, &headers, body.clone()).await {
                    Ok(r) if r.status == 200 && r.header("content-encoding") == Some("gzip") => {
                        lat.push(t.elapsed())
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }
    })
    .await
}

/// Streams on keep-alive connections: the time from sending each to its first body
/// byte (each stream is then read to its end).
async fn first_bytes(
    agent: &test_harness::agent::AgentClient,
    url: &str,
    body: &[u8],
    accept: &'static str,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<Vec<Duration>> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (agent, url, body) = (agent.clone(), url.to_string(), body.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let s = agent.handshake().await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            let conn = tokio::spawn(conn);
            while Instant::now() < until {
                let req = hyper::Request::post(url.as_str())
                    .header(
                        "host",
                        url.trim_start_matches("http://")
                            .split('/')
                            .next()
                            .unwrap_or_default(),
                    )
                    .header("content-type", "application/json")
                    .header("accept-encoding", accept)
                    .body(http_body_util::Full::new(Bytes::from(body.clone())))?;
                let t = Instant::now();
                let resp = send.send_request(req).await?;
                anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
                let mut body = resp.into_body();
                let mut first = None;
                while let Some(frame) = body.frame().await {
                    if frame?.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
                        first = Some(t.elapsed());
                    }
                }
                out.extend(first);
            }
            conn.abort();
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

const MCP_AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/mcp-agent";
const PLAIN_AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/plain-agent";
/// Tools in the `tools/list` answer; the pathway lists half of them (`tool_0*`).
const LISTED_TOOLS: usize = 200;

/// An MCP server's answers: a small `tools/call` result, or `tools/list` with
/// [`LISTED_TOOLS`] tools, each with a realistic input schema.
fn mcp_answer(
    req: &test_harness::upstream::RecordedRequest,
) -> Option<test_harness::upstream::CannedResponse> {
    let msg: serde_json::Value = serde_json::from_slice(&req.body).ok()?;
    let id = msg["id"].clone();
    let result = match msg["method"].as_str()? {
        "tools/list" => {
            let tools: Vec<serde_json::Value> = (0..LISTED_TOOLS)
                .map(|i| {
                    serde_json::json!({
                        "name": format!("tool_{i:03}"),
                        "description": format!("Tool number {i}: searches, reads or writes things in the workspace."),
                        "inputSchema": {
                            "type": "object",
                            "properties": {
                                "query": {"type": "string", "description": "What to look for"},
                                "limit": {"type": "integer", "minimum": 1, "maximum": 100}
                            },
                            "required": ["query"]
                        }
                    })
                })
                .collect();
            serde_json::json!({"tools": tools})
        }
        _ => {
            serde_json::json!({"content": [{"type": "text", "text": "3 results"}], "isError": false})
        }
    };
    Some(test_harness::upstream::CannedResponse::json(
        200,
        &serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}),
    ))
}

/// What MCP pathways cost: `tools/call` CPU per request with and without `mcp` on the
/// same pathway (the real gateway binary in its own process), and `tools/list` filtering.
async fn mcp_bench(a: &Args) -> anyhow::Result<()> {
    use test_harness::ca::TestCa;
    use test_harness::gateway::{admin_get, gateway_identity, GATEWAY_ID};
    use test_harness::workload_api::FakeWorkloadApi;

    let binary = std::env::current_exe()?.with_file_name("egress-gateway");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it first (cargo build --release -p egress-gateway)",
        binary.display()
    );
    let up = HttpEcho::start_with(mcp_answer).await?;
    let port = up.addr.port();
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca)).await?;
    let dir = tempfile::tempdir()?;
    let pathway = |mcp: &str| {
        format!(
            "      - name: tools\n        destinations: [\"localhost:{port}\"]\n        allow_cidrs: [127.0.0.0/8]\n        upstream: {{ tls: false }}\n{mcp}"
        )
    };
    let policy = format!(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: mcp-agent\n    id: {MCP_AGENT}\n    pathways:\n{}  - name: plain-agent\n    id: {PLAIN_AGENT}\n    pathways:\n{}",
        pathway("        mcp: { tools: [search_docs, \"tool_0*\"] }\n"),
        pathway("")
    );
    std::fs::write(dir.path().join("policy.yaml"), policy)?;
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\npolicy: {}\ntelemetry:\n  audit_log: {}\n",
            dir.path().join("policy.yaml").display(),
            dir.path().join("audit.log").display()
        ),
    )?;
    let mut child = tokio::process::Command::new(&binary)
        .args(["run", "--config"])
        .arg(&config)
        .env("SPIFFE_ENDPOINT_SOCKET", api.endpoint())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (proxy, admin) = listening_addrs(stderr).await?;
    for _ in 0..100 {
        if admin_get(admin, "/readyz").await.map(|r| r.0).unwrap_or(0) == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = |id: &str| -> anyhow::Result<test_harness::agent::AgentClient> {
        Ok(
            test_harness::agent::AgentClient::new(&ca.mint_svid(id), &[ca.root_cert()], proxy)?
                .expect_gateway_id(GATEWAY_ID),
        )
    };
    let (plain, mcp) = (agent(PLAIN_AGENT)?, agent(MCP_AGENT)?);
    let url = format!("http://localhost:{port}/mcp");
    let call = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_docs","arguments":{"query":"rust"}}}"#.to_vec();
    let list = br#"{"jsonrpc":"2.0","id":8,"method":"tools/list"}"#.to_vec();

    // The pathway does what it says before anything is timed.
    let listed = |r: &test_harness::agent::AgentResponse| {
        r.json()
            .ok()
            .and_then(|v| v["result"]["tools"].as_array().map(Vec::len))
    };
    let r = mcp
        .request("POST", &url, &MCP_HEADERS, list.clone())
        .await?;
    anyhow::ensure!(
        listed(&r) == Some(100),
        "filtered list: {}",
        String::from_utf8_lossy(&r.body)
    );
    let r = plain
        .request("POST", &url, &MCP_HEADERS, list.clone())
        .await?;
    anyhow::ensure!(listed(&r) == Some(LISTED_TOOLS), "unfiltered list");
    let denied = br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete_repo","arguments":{}}}"#.to_vec();
    let r = mcp.request("POST", &url, &MCP_HEADERS, denied).await?;
    anyhow::ensure!(r.json()?["error"]["code"] == -32001, "delete_repo refused");

    println!(
        "{} keep-alive connections; the gateway in its own process; rounds alternate the two pathways",
        a.connections
    );
    let mut cpu = [0f64; 2];
    let mut done = [0usize; 2];
    let mut ratios = Vec::new();
    let mut reports: [Vec<Report>; 2] = [Vec::new(), Vec::new()];
    let clients = [&plain, &mcp];
    for round in 0..ROUNDS {
        let mut per_round = [0f64; 2];
        // Which side goes first alternates too, so neither always follows the other.
        for i in [round % 2, 1 - round % 2] {
            let client = clients[i];
            let before = process_cpu(pid)?;
            let r = post_mcp(client, &url, &call, a.connections, a.seconds).await;
            let used = process_cpu(pid)? - before;
            anyhow::ensure!(r.errors == 0, "{} requests failed", r.errors);
            cpu[i] += used;
            done[i] += r.requests;
            per_round[i] = used / r.requests.max(1) as f64;
            reports[i].push(r);
        }
        ratios.push(per_round[1] / per_round[0]);
    }
    ratios.sort_by(f64::total_cmp);
    let per = |i: usize| cpu[i] / done[i].max(1) as f64 * 1e6;
    let rps = |i: usize| reports[i].iter().map(Report::rps).sum::<f64>() / ROUNDS as f64;
    println!(
        "tools/call: without mcp {:.1} µs CPU/request, {:.0} req/s ({} requests); with mcp {:.1} µs CPU/request, {:.0} req/s ({} requests); per-round ratios {:.3?}",
        per(0), rps(0), done[0], per(1), rps(1), done[1], ratios
    );

    // tools/list of 200 tools on one connection: the p50 difference is the filtering.
    let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut list_cpu = [0f64; 2];
    let mut list_done = [0usize; 2];
    for round in 0..ROUNDS {
        for i in [round % 2, 1 - round % 2] {
            let client = clients[i];
            let before = process_cpu(pid)?;
            let r = post_mcp(client, &url, &list, 1, a.seconds.div_ceil(2)).await;
            list_cpu[i] += process_cpu(pid)? - before;
            anyhow::ensure!(r.errors == 0, "{} list requests failed", r.errors);
            list_done[i] += r.requests;
            lat[i].extend(r.latencies);
        }
    }
    for l in &mut lat {
        l.sort_unstable();
    }
    let p50 = |l: &[Duration]| l.get(l.len() / 2).copied().unwrap_or_default();
    let list_bytes = mcp_answer(&test_harness::upstream::RecordedRequest {
        method: "POST".into(),
        uri: "/mcp".into(),
        headers: Vec::new(),
        body: list.clone(),
    })
    .map(|c| c.body.len())
    .unwrap_or_default();
    println!(
        "tools/list ({LISTED_TOOLS} tools, {list_bytes} bytes): unfiltered p50 {:?} ({:.1} µs CPU/request), filtered to 100 p50 {:?} ({:.1} µs CPU/request)",
        p50(&lat[0]),
        list_cpu[0] / list_done[0].max(1) as f64 * 1e6,
        p50(&lat[1]),
        list_cpu[1] / list_done[1].max(1) as f64 * 1e6,
    );
    println!(
        "ratio with mcp / without: tools/call CPU per request {:.3}x median of rounds ({:.3}x overall; limit 1.2x); tools/list filtering {:+.1} µs p50 (limit 200 µs), {:+.1} µs CPU/request",
        ratios[ratios.len() / 2],
        per(1) / per(0),
        (p50(&lat[1]).as_secs_f64() - p50(&lat[0]).as_secs_f64()) * 1e6,
        (list_cpu[1] / list_done[1].max(1) as f64 - list_cpu[0] / list_done[0].max(1) as f64) * 1e6,
    );
    let _ = child.kill().await;
    Ok(())
}

const MCP_HEADERS: [(&str, &str); 2] = [
    ("content-type", "application/json"),
    ("accept", "application/json, text/event-stream"),
];

/// JSON-RPC POSTs on keep-alive connections.
async fn post_mcp(
    agent: &test_harness::agent::AgentClient,
    url: &str,
    body: &[u8],
    connections: usize,
    seconds: u64,
) -> Report {
    let (agent, url, body) = (agent.clone(), url.to_string(), body.to_vec());
    run(connections, seconds, move |until| {
        let (agent, url, body) = (agent.clone(), url.clone(), body.clone());
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let Ok(mut session) = agent.session().await else {
                return (lat, 1);
            };
            while Instant::now() < until {
                let t = Instant::now();
                match session
                    .request("POST", &url, &MCP_HEADERS, body.clone())
                    .await
                {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }
    })
    .await
}
