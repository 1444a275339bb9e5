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
//! own process (build it first, as for `--llm-budget`), closed loop and at a fixed rate
//! (`--rate`, default 4000 req/s); then `tools/list` answers of 200 tools filtered to
//! the 100 the pathway lists, p50 latency against the unfiltered one.
//!
//! With `--dlp`: what `inspect` costs. 4 KiB chat bodies through a pathway with
//! `inspect.request` (secrets and pii) against the same pathway without it, CPU per
//! request of the real gateway binary in its own process.
//!
//! `cargo run --release -p test-harness --bin loadgen -- [--connections 8] [--seconds 5] [--rate N] [--via-sidecar | --l7 | --intercept | --llm-budget | --mcp | --dlp]`

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
    dlp: bool,
    /// Requests per second over all connections (paced comparisons); 0: closed loop.
    rate: u64,
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
        dlp: false,
        rate: 0,
    };
    let argv: Vec<String> = std::env::args().collect();
    a.via_sidecar = argv.iter().any(|x| x == "--via-sidecar");
    a.l7 = argv.iter().any(|x| x == "--l7");
    a.intercept = argv.iter().any(|x| x == "--intercept");
    a.llm_budget = argv.iter().any(|x| x == "--llm-budget");
    a.mcp = argv.iter().any(|x| x == "--mcp");
    a.dlp = argv.iter().any(|x| x == "--dlp");
    for w in argv.windows(2) {
        match w[0].as_str() {
            "--connections" => a.connections = w[1].parse().unwrap_or(a.connections),
            "--seconds" => a.seconds = w[1].parse().unwrap_or(a.seconds),
            "--rate" => a.rate = w[1].parse().unwrap_or(a.rate),
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
    if a.dlp {
        return dlp_bench(&a).await;
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
    use test_harness::llm_upstream::TlsLlm;

    let up = TlsLlm::start(40).await?;
    let port = up.upstream.addr.port();
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
    let gw = PairedGateway::start(
        &pathway(""),
        &pathway(", llm_tokens_per_hour: 1000000000000"),
    )
    .await?;
    let [free, budget] = &gw.agents;
    let url = format!("http://localhost:{port}/v1/chat/completions");
    println!(
        "{} keep-alive connections; the gateway in its own process; rounds alternate the two pathways",
        a.connections
    );

    // CPU per request: gzip-compressed JSON answers.
    let json = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let c = gw
        .compare(|client| post_compressed(client, &url, &json, a.connections, a.seconds))
        .await?;
    println!(
        "gzip JSON latency p50: without budget {:?}, with budget {:?}",
        c.p50(0),
        c.p50(1)
    );
    println!(
        "gzip JSON: without budget {:.1} µs CPU/request ({} requests), with budget {:.1} µs CPU/request ({} requests); per-round ratios {:.3?}",
        c.per_request_us(0),
        c.done[0],
        c.per_request_us(1),
        c.done[1],
        c.ratios
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
            for (i, client) in [free, budget].into_iter().enumerate() {
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
        c.median_ratio(),
        c.overall_ratio(),
        ttfb_ratios[0],
        ttfb_ratios[1]
    );
    gw.stop().await;
    Ok(())
}

/// The real `egress-gateway` binary in its own process, serving two agents whose
/// pathways differ only in the feature measured: `agents[0]` without it, `agents[1]` with
/// it. Build the binary first (`cargo build --release -p egress-gateway`).
struct PairedGateway {
    child: tokio::process::Child,
    pid: u32,
    agents: [test_harness::agent::AgentClient; 2],
    _api: test_harness::workload_api::FakeWorkloadApi,
    _dir: tempfile::TempDir,
}

const WITHOUT_AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/plain-agent";
const WITH_AGENT: &str = "spiffe://example.org/ns/ai-workloads/sa/featured-agent";

impl PairedGateway {
    /// `without` and `with` are the two agents' `pathways:` entries.
    async fn start(without: &str, with: &str) -> anyhow::Result<PairedGateway> {
        use test_harness::ca::TestCa;
        use test_harness::gateway::{admin_get, gateway_identity, GATEWAY_ID};
        use test_harness::workload_api::FakeWorkloadApi;

        let binary = std::env::current_exe()?.with_file_name("egress-gateway");
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: build it first (cargo build --release -p egress-gateway)",
            binary.display()
        );
        let ca = TestCa::new("example.org");
        let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca)).await?;
        let dir = tempfile::tempdir()?;
        let policy = format!(
            "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: plain-agent\n    id: {WITHOUT_AGENT}\n    pathways:\n{without}  - name: featured-agent\n    id: {WITH_AGENT}\n    pathways:\n{with}"
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
        Ok(PairedGateway {
            agents: [agent(WITHOUT_AGENT)?, agent(WITH_AGENT)?],
            child,
            pid,
            _api: api,
            _dir: dir,
        })
    }

    /// Runs `load` for each agent in [`ROUNDS`] alternating rounds (which side goes
    /// first alternates too, so load from elsewhere falls on both alike).
    async fn compare<F, Fut>(&self, mut load: F) -> anyhow::Result<CpuComparison>
    where
        F: FnMut(test_harness::agent::AgentClient) -> Fut,
        Fut: std::future::Future<Output = Report>,
    {
        let mut c = CpuComparison::default();
        // `LOADGEN_SIDE=0|1` runs one side only, e.g. to profile it alone.
        let only: Option<usize> = std::env::var("LOADGEN_SIDE")
            .ok()
            .and_then(|v| v.parse().ok());
        for round in 0..ROUNDS {
            let mut per_round = [0f64; 2];
            for i in [round % 2, 1 - round % 2] {
                if only.is_some_and(|o| o != i) {
                    continue;
                }
                let before = process_cpu(self.pid)?;
                let r = load(self.agents[i].clone()).await;
                let used = process_cpu(self.pid)? - before;
                anyhow::ensure!(r.errors == 0, "{} requests failed", r.errors);
                c.cpu[i] += used;
                c.done[i] += r.requests;
                per_round[i] = used / r.requests.max(1) as f64;
                c.reports[i].push(r);
            }
            c.ratios.push(per_round[1] / per_round[0]);
        }
        c.ratios.sort_by(f64::total_cmp);
        if only.is_some() {
            // A pause between phases, for a profiler to dump the counts of this one.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Ok(c)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Gateway CPU per request without (`[0]`) and with (`[1]`) a feature.
#[derive(Default)]
struct CpuComparison {
    cpu: [f64; 2],
    done: [usize; 2],
    /// Per-round ratios with / without, sorted.
    ratios: Vec<f64>,
    reports: [Vec<Report>; 2],
}

impl CpuComparison {
    /// Microseconds of gateway CPU per request.
    fn per_request_us(&self, i: usize) -> f64 {
        self.cpu[i] / self.done[i].max(1) as f64 * 1e6
    }
    /// The median of the per-round ratios (of an even count, the mean of the middle two).
    fn median_ratio(&self) -> f64 {
        let n = self.ratios.len();
        match n {
            0 => 0.0,
            _ if n % 2 == 1 => self.ratios[n / 2],
            _ => (self.ratios[n / 2 - 1] + self.ratios[n / 2]) / 2.0,
        }
    }
    fn overall_ratio(&self) -> f64 {
        self.per_request_us(1) / self.per_request_us(0)
    }
    fn p50(&self, i: usize) -> Duration {
        let mut l: Vec<Duration> = self.reports[i]
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        l.sort_unstable();
        l.get(l.len() / 2).copied().unwrap_or_default()
    }
    fn rps(&self, i: usize) -> f64 {
        self.reports[i].iter().map(Report::rps).sum::<f64>() / self.reports[i].len().max(1) as f64
    }
}

/// Alternating rounds per side in the paired comparisons.
const ROUNDS: usize = 6;

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
    agent: test_harness::agent::AgentClient,
    url: &str,
    body: &[u8],
    connections: usize,
    seconds: u64,
) -> Report {
    let (url, body) = (url.to_string(), body.to_vec());
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
    let up = HttpEcho::start_with(mcp_answer).await?;
    let port = up.addr.port();
    let pathway = |mcp: &str| {
        format!(
            "      - name: tools\n        destinations: [\"localhost:{port}\"]\n        allow_cidrs: [127.0.0.0/8]\n        upstream: {{ tls: false }}\n{mcp}"
        )
    };
    let gw = PairedGateway::start(
        &pathway(""),
        &pathway("        mcp: { tools: [search_docs, \"tool_0*\"] }\n"),
    )
    .await?;
    let [plain, mcp] = &gw.agents;
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
    let calls = gw
        .compare(|client| post_mcp(client, &url, &call, a.connections, a.seconds))
        .await?;
    println!(
        "tools/call: without mcp {:.1} µs CPU/request, {:.0} req/s ({} requests); with mcp {:.1} µs CPU/request, {:.0} req/s ({} requests); per-round ratios {:.3?}",
        calls.per_request_us(0), calls.rps(0), calls.done[0], calls.per_request_us(1), calls.rps(1), calls.done[1], calls.ratios
    );

    // The same at a fixed rate both sides sustain: the gateway is not saturated, so
    // its CPU per request is not moved by how the load generator, which shares the
    // cores, is scheduled against it.
    let rate = if a.rate > 0 { a.rate } else { 4000 };
    let paced = gw
        .compare(|client| post_paced(client, &url, &call, a.connections, a.seconds, rate))
        .await?;
    println!(
        "tools/call at {rate} req/s: without mcp {:.1} µs CPU/request ({} requests); with mcp {:.1} µs CPU/request ({} requests); per-round ratios {:.3?}",
        paced.per_request_us(0), paced.done[0], paced.per_request_us(1), paced.done[1], paced.ratios
    );

    // tools/list of 200 tools on one connection: the p50 difference is the filtering.
    let lists = gw
        .compare(|client| post_mcp(client, &url, &list, 1, a.seconds.div_ceil(2)))
        .await?;
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
        lists.p50(0),
        lists.per_request_us(0),
        lists.p50(1),
        lists.per_request_us(1),
    );
    println!(
        "ratio with mcp / without: tools/call CPU per request {:.3}x median of rounds ({:.3}x overall) closed loop, {:.3}x median ({:.3}x overall) at {rate} req/s; limit 1.2x; tools/list filtering {:+.1} µs p50 (limit 200 µs), {:+.1} µs CPU/request",
        calls.median_ratio(),
        calls.overall_ratio(),
        paced.median_ratio(),
        paced.overall_ratio(),
        (lists.p50(1).as_secs_f64() - lists.p50(0).as_secs_f64()) * 1e6,
        lists.per_request_us(1) - lists.per_request_us(0),
    );
    gw.stop().await;
    Ok(())
}

/// What `inspect` costs: a 4 KiB OpenAI-style chat body through the same pathway with
/// and without `inspect.request` (secrets and pii, action deny, nothing found), CPU per
/// request of the real gateway binary in its own process.
async fn dlp_bench(a: &Args) -> anyhow::Result<()> {
    let up = HttpEcho::start_with(|_| {
        Some(test_harness::upstream::CannedResponse::json(
            200,
            &serde_json::json!({"choices": [{"message": {"role": "assistant", "content": "Paris."}}]}),
        ))
    })
    .await?;
    let port = up.addr.port();
    let pathway = |inspect: &str| {
        format!(
            "      - name: llm\n        destinations: [\"localhost:{port}\"]\n        allow_cidrs: [127.0.0.1/32]\n        upstream: {{ tls: false }}\n{inspect}"
        )
    };
    let gw = PairedGateway::start(
        &pathway(""),
        &pathway(
            "        inspect:\n          request: { detectors: [secrets, pii], action: deny }\n",
        ),
    )
    .await?;
    let url = format!("http://localhost:{port}/v1/chat/completions");
    // ~4 KiB of ordinary chat: prose, numbers, a URL, nothing to find.
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You are a careful research assistant. Cite sources."}),
    ];
    while serde_json::to_vec(&messages)?.len() < 4000 {
        messages.push(serde_json::json!({"role": "user", "content": "Summarize the 2023 annual report of ACME Corp (pages 12-18, revenue 4,512 million) and compare it with https://example.com/reports/2022.html in three bullet points."}));
    }
    let body =
        serde_json::to_vec(&serde_json::json!({"model": "gpt-4o-mini", "messages": messages}))?;
    let leak = serde_json::to_vec(
        &serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "AKIAQ3EGRXMPLE7KD2VA"}]}),
    )?;
    let r = gw.agents[1]
        .request("POST", &url, &JSON_HEADERS, leak.clone())
        .await?;
    anyhow::ensure!(r.status == 403, "the inspected pathway let a key through");
    let r = gw.agents[0]
        .request("POST", &url, &JSON_HEADERS, leak)
        .await?;
    anyhow::ensure!(r.status == 200, "the plain pathway answered {}", r.status);
    println!(
        "{} keep-alive connections, {}-byte chat bodies; the gateway in its own process; rounds alternate the two pathways",
        a.connections,
        body.len()
    );
    let c = gw
        .compare(|client| post_json(client, &url, &body, a.connections, a.seconds))
        .await?;
    println!(
        "without inspect {:.1} µs CPU/request, {:.0} req/s, p50 {:?} ({} requests); with inspect {:.1} µs CPU/request, {:.0} req/s, p50 {:?} ({} requests); per-round ratios {:.3?}",
        c.per_request_us(0), c.rps(0), c.p50(0), c.done[0], c.per_request_us(1), c.rps(1), c.p50(1), c.done[1], c.ratios
    );
    println!(
        "ratio with inspect / without: CPU per request {:.3}x median of rounds ({:.3}x overall; limit 1.2x)",
        c.median_ratio(),
        c.overall_ratio()
    );
    gw.stop().await;
    Ok(())
}

const JSON_HEADERS: [(&str, &str); 1] = [("content-type", "application/json")];

/// JSON POSTs on keep-alive connections, each answered 200.
async fn post_json(
    agent: test_harness::agent::AgentClient,
    url: &str,
    body: &[u8],
    connections: usize,
    seconds: u64,
) -> Report {
    post_with(agent, url, &JSON_HEADERS, body, connections, seconds, None).await
}

const MCP_HEADERS: [(&str, &str); 2] = [
    ("content-type", "application/json"),
    ("accept", "application/json, text/event-stream"),
];

/// JSON-RPC POSTs on keep-alive connections.
async fn post_mcp(
    agent: test_harness::agent::AgentClient,
    url: &str,
    body: &[u8],
    connections: usize,
    seconds: u64,
) -> Report {
    post_with(agent, url, &MCP_HEADERS, body, connections, seconds, None).await
}

/// MCP POSTs at `rate` requests/s spread over `connections` keep-alive connections,
/// each sent when due (a late one is sent at once, not skipped).
async fn post_paced(
    agent: test_harness::agent::AgentClient,
    url: &str,
    body: &[u8],
    connections: usize,
    seconds: u64,
    rate: u64,
) -> Report {
    let per_connection = (rate as f64 / connections.max(1) as f64).max(1.0);
    let pace = Some(Duration::from_secs_f64(1.0 / per_connection));
    post_with(agent, url, &MCP_HEADERS, body, connections, seconds, pace).await
}

/// POSTs of `body` with `headers` on keep-alive connections, each answered 200: one
/// after another, or one per `pace` on each connection.
async fn post_with(
    agent: test_harness::agent::AgentClient,
    url: &str,
    headers: &'static [(&'static str, &'static str)],
    body: &[u8],
    connections: usize,
    seconds: u64,
    pace: Option<Duration>,
) -> Report {
    let (url, body) = (url.to_string(), body.to_vec());
    run(connections, seconds, move |until| {
        let (agent, url, body) = (agent.clone(), url.clone(), body.clone());
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let Ok(mut session) = agent.session().await else {
                return (lat, 1);
            };
            let mut tick = pace.map(tokio::time::interval);
            if let Some(t) = &mut tick {
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            }
            while Instant::now() < until {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                let t = Instant::now();
                match session.request("POST", &url, headers, body.clone()).await {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }
    })
    .await
}
