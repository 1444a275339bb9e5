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
//! `cargo run --release -p test-harness --bin loadgen -- [--connections 8] [--seconds 5] [--via-sidecar | --l7]`

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
}

fn args() -> Args {
    let mut a = Args {
        connections: 8,
        seconds: 5,
        via_sidecar: false,
        l7: false,
    };
    let argv: Vec<String> = std::env::args().collect();
    a.via_sidecar = argv.iter().any(|x| x == "--via-sidecar");
    a.l7 = argv.iter().any(|x| x == "--l7");
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
    let mut lat = Vec::new();
    let mut errors = 0;
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (lat, 1);
    };
    let _ = tcp.set_nodelay(true);
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return (lat, 1);
    };
    tokio::spawn(conn);
    while Instant::now() < until {
        let req = hyper::Request::get(uri.as_str())
            .header("host", host.as_str())
            .body(Empty::<Bytes>::new())
            .expect("static request");
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
