//! `egress-gateway run` and `egress-gateway sidecar` as an operator starts them: the real
//! binary, its config file or documented flags, the Workload API socket from
//! `SPIFFE_ENDPOINT_SOCKET`, and real signals (SIGHUP reloads the policy, SIGTERM drains
//! open tunnels and exits cleanly).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use test_harness::agent::AgentClient;
use test_harness::ca::TestCa;
use test_harness::gateway::{admin_get, gateway_identity, read_audit, GATEWAY_ID};
use test_harness::otlp::{HttpOtlpReceiver, OtlpReceiver};
use test_harness::upstream::{HttpEcho, TcpEcho};
use test_harness::workload_api::FakeWorkloadApi;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";

fn policy(http_port: u16, echo_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: docs
        destinations: ["localhost:{http_port}"]
        methods: [GET]
        allow_cidrs: [127.0.0.0/8]
      - name: raw
        destinations: ["127.0.0.1:{echo_port}"]
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

/// The gateway's log (stderr), collected line by line.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (bounded) for a line containing `needle`; returns it.
    async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..300 {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no log line with {needle:?}:\n{}", self.lines().join("\n"));
    }
}

/// Starts the binary with `args`, the Workload API socket in `SPIFFE_ENDPOINT_SOCKET`,
/// and its log collected.
fn spawn(args: &[&str], workload_api: &str) -> (tokio::process::Child, Log) {
    spawn_with_env(args, workload_api, &[])
}

fn spawn_with_env(
    args: &[&str],
    workload_api: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, Log) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_egress-gateway"))
        .args(args)
        .envs(env.iter().copied())
        .env("SPIFFE_ENDPOINT_SOCKET", workload_api)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Log::default();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            sink.0.lock().unwrap().push(line);
        }
    });
    (child, log)
}

/// The proxy listener's address, from the gateway's start-up log line.
async fn proxy_addr(log: &Log) -> SocketAddr {
    field(
        &log.wait_for("egress gateway listening").await,
        "proxy_addr",
    )
    .parse()
    .unwrap()
}

/// The research agent, with an SVID of `ca`, talking to the gateway at `proxy`.
fn research_agent(ca: &TestCa, proxy: SocketAddr) -> AgentClient {
    AgentClient::new(&ca.mint_svid(RESEARCH), &[ca.root_cert()], proxy)
        .unwrap()
        .expect_gateway_id(GATEWAY_ID)
}

/// A field of a log line. Logs to a pipe are JSON, one object per line.
fn field(line: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .to_string()
}

/// Logs to a pipe (not a terminal) are JSON lines a collector parses as they are:
/// level, message and timestamp on every line, never an ANSI escape.
fn assert_json_log(log: &Log) {
    let lines = log.lines();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(!line.contains('\u{1b}'), "ANSI escape in {line:?}");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "message"] {
            assert!(v[key].is_string(), "no {key} in {line}");
        }
    }
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

async fn get(agent: &AgentClient, url: &str) -> u16 {
    agent
        .request("GET", url, &[], Vec::new())
        .await
        .unwrap()
        .status
}

fn reloads(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("egress_policy_reloads_total{result=\"success\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn write_config(dir: &Path, policy: &str) -> std::path::PathBuf {
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\npolicy: {}\ntelemetry:\n  audit_log: {}\nshutdown_grace: 20s\n",
            policy_path.display(),
            dir.join("audit.log").display()
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_reloads_on_sighup_and_drains_tunnels_on_sigterm() {
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let echo_server = TcpEcho::start().await.unwrap();
    let echo = echo_server.addr;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &policy(http.addr.port(), echo.port()));

    // No `identity.workload_api` in the file: the socket comes from the environment.
    let config_arg = config.display().to_string();
    let (mut child, log) = spawn(&["run", "--config", &config_arg], &api.endpoint());
    let pid = child.id().unwrap();
    let proxy = proxy_addr(&log).await;
    let admin: SocketAddr = field(&log.wait_for("admin listener up").await, "admin_addr")
        .parse()
        .unwrap();
    assert_eq!(admin_get(admin, "/readyz").await.unwrap().0, 200);

    let agent = research_agent(&ca, proxy);
    let url = format!("http://localhost:{}/docs", http.addr.port());
    assert_eq!(get(&agent, &url).await, 200);

    // SIGHUP reloads (even an unchanged file) and does not stop the process.
    let before = reloads(&admin_get(admin, "/metrics").await.unwrap().1);
    signal(pid, "HUP");
    log.wait_for("SIGHUP: reloading the policy").await;
    let mut after = before;
    for _ in 0..100 {
        after = reloads(&admin_get(admin, "/metrics").await.unwrap().1);
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(after, before + 1, "one successful reload per SIGHUP");
    assert_eq!(get(&agent, &url).await, 200);

    // SIGTERM with a tunnel open: the tunnel keeps working through the grace period,
    // new connections are refused, and the process exits 0 once the tunnel closes.
    let mut tunnel = agent
        .connect_tunnel(&format!("127.0.0.1:{}", echo.port()), &[])
        .await
        .unwrap();
    assert_eq!(tunnel.status, 200);
    signal(pid, "TERM");
    log.wait_for("shutting down").await;
    let s = tunnel.stream.as_mut().unwrap();
    s.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    assert!(
        agent.request("GET", &url, &[], Vec::new()).await.is_err(),
        "a draining gateway accepts no new connection"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), child.wait())
            .await
            .is_err(),
        "exited while a tunnel was still open"
    );
    drop(tunnel);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the gateway did not exit after its last tunnel closed")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", log.lines().join("\n"));
    assert_json_log(&log);

    // Everything was audited and flushed: two GETs and the tunnel.
    let audit = read_audit(&dir.path().join("audit.log"));
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert!(audit.iter().all(|l| l["source_spiffe_id"] == RESEARCH));
    let tunnel_line = audit.iter().find(|l| l["kind"] == "connect").unwrap();
    assert_eq!(tunnel_line["bytes_sent"], 10);
    assert_eq!(tunnel_line["bytes_received"], 10);
    api.shutdown().await;
}

/// The standard OpenTelemetry variables alone configure span export, on both
/// transports: endpoint, protocol, service name, and headers (a collector's token)
/// sent with every export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_environment_variables_configure_span_export() {
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let grpc = OtlpReceiver::start().await.unwrap();
    let Some(http_collector) = HttpOtlpReceiver::start(200).await.unwrap() else {
        return;
    };
    for (protocol, endpoint) in [
        ("grpc", grpc.endpoint()),
        ("http/protobuf", http_collector.endpoint()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &policy(http.addr.port(), 9));
        let config_arg = config.display().to_string();
        let (_child, log) = spawn_with_env(
            &["run", "--config", &config_arg],
            &api.endpoint(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_SERVICE_NAME", "egress-gateway-cli-test"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "x-collector-token=s3cret%2Fvalue,x-tenant=ai",
                ),
            ],
        );
        let proxy = proxy_addr(&log).await;
        let agent = research_agent(&ca, proxy);
        let url = format!("http://localhost:{}/exported", http.addr.port());
        assert_eq!(get(&agent, &url).await, 200);

        // Exported within the 500 ms batch delay.
        let spans = match protocol {
            "grpc" => grpc.wait_for_spans(1).await,
            _ => http_collector.wait_for_spans(1).await,
        };
        let span = spans
            .iter()
            .find(|s| s.str("url.path") == Some("/exported"))
            .unwrap_or_else(|| panic!("{protocol}: no span for the request: {spans:#?}"));
        assert_eq!(
            span.service_name.as_deref(),
            Some("egress-gateway-cli-test"),
            "{protocol}"
        );
        let header = |name: &str| span.request_headers.get(name).map(String::as_str);
        assert_eq!(
            header("x-collector-token"),
            Some("s3cret/value"),
            "{protocol}"
        );
        assert_eq!(header("x-tenant"), Some("ai"), "{protocol}");
    }
    api.shutdown().await;
}

/// One plain-HTTP proxy request, as an agent's `HTTP_PROXY` client sends it.
async fn proxy_request(proxy: SocketAddr, method: &str, url: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    s.write_all(
        format!("{method} {url} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_with_the_documented_flags_proxies_as_the_agent_and_stops_on_sigterm() {
    let http = HttpEcho::start().await.unwrap();
    let world = test_harness::gateway::World::start(&policy(http.addr.port(), 9))
        .await
        .unwrap();
    // The agent's own Workload API: its SVID and the trust bundle.
    let agent_api = FakeWorkloadApi::start_in_tempdir(
        test_harness::workload_api::WorkloadIdentity::single(&world.ca, RESEARCH),
    )
    .await
    .unwrap();
    let gateway = world.gateway.proxy_addr().to_string();
    let (mut child, log) = spawn(
        &[
            "sidecar",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--gateway",
            &gateway,
            "--gateway-id",
            GATEWAY_ID,
        ],
        &agent_api.endpoint(),
    );
    let pid = child.id().unwrap();
    let listen: SocketAddr = field(&log.wait_for("sidecar listening").await, "listen_addr")
        .parse()
        .unwrap();
    let admin: SocketAddr = field(
        &log.wait_for("sidecar admin listener up").await,
        "admin_addr",
    )
    .parse()
    .unwrap();
    assert_eq!(admin_get(admin, "/readyz").await.unwrap().0, 200);

    let url = format!("http://localhost:{}/docs", http.addr.port());
    assert_eq!(proxy_request(listen, "GET", &url).await.0, 200);
    let (status, body) = proxy_request(listen, "POST", &url).await;
    assert_eq!(status, 403, "the gateway's refusal, relayed: {body}");
    assert!(body.contains("egress_denied"), "{body}");
    let audit = world.gateway.wait_for_audit(2).await;
    assert!(
        audit.iter().all(|l| l["source_spiffe_id"] == RESEARCH),
        "{audit:?}"
    );

    signal(pid, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the sidecar did not stop on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", log.lines().join("\n"));
    world.shutdown().await;
    agent_api.shutdown().await;
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// The `docs` pathway with a credential injected from `secret_file`.
fn secret_policy(http_port: u16, secret_file: &Path) -> String {
    policy(http_port, 9).replace(
        "        methods: [GET]\n",
        &format!(
            "        methods: [GET]\n        upstream:\n          inject_headers:\n            x-api-key: {{ secret_file: {} }}\n",
            secret_file.display()
        ),
    )
}

/// Waits (bounded) for the child to exit; its status and log.
async fn exits_within(
    child: &mut tokio::process::Child,
    log: &Log,
    secs: u64,
) -> std::process::ExitStatus {
    match tokio::time::timeout(Duration::from_secs(secs), child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => panic!(
            "the gateway did not exit within {secs}s (wedged?):\n{}",
            log.lines().join("\n")
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_or_dev_zero_as_secret_file_takes_only_its_pathway_out_naming_the_file() {
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token.fifo");
    mkfifo(&fifo);
    for secret in [fifo.as_path(), Path::new("/dev/zero")] {
        let config = write_config(dir.path(), &secret_policy(8080, secret));
        let config_arg = config.display().to_string();
        let (mut child, log) = spawn(&["run", "--config", &config_arg], &api.endpoint());
        // It serves (other pathways are unaffected) and says which file is wrong.
        log.wait_for("egress gateway listening").await;
        let unavailable = log.wait_for("pathway unavailable").await;
        assert!(
            unavailable.contains(&secret.display().to_string())
                && unavailable.contains("not a regular file"),
            "the log names the file and says what is wrong: {unavailable}"
        );
        signal(child.id().unwrap(), "TERM");
        let status = exits_within(&mut child, &log, 15).await;
        assert!(status.success(), "{status:?}\n{}", log.lines().join("\n"));
    }
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_onto_a_fifo_secret_takes_its_pathway_out_and_the_gateway_keeps_serving() {
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token");
    std::fs::write(&secret, "sk-good\n").unwrap();
    let config = write_config(dir.path(), &secret_policy(http.addr.port(), &secret));
    let config_arg = config.display().to_string();
    let (mut child, log) = spawn(&["run", "--config", &config_arg], &api.endpoint());
    let pid = child.id().unwrap();
    let proxy = proxy_addr(&log).await;
    let admin: SocketAddr = field(&log.wait_for("admin listener up").await, "admin_addr")
        .parse()
        .unwrap();
    let agent = research_agent(&ca, proxy);
    let url = format!("http://localhost:{}/docs", http.addr.port());
    assert_eq!(get(&agent, &url).await, 200);

    // The policy now points at a FIFO and SIGHUP asks for it: nothing wedges, the
    // pathway answers 503 and the log names the file.
    let fifo = dir.path().join("token.fifo");
    mkfifo(&fifo);
    std::fs::write(
        dir.path().join("policy.yaml"),
        secret_policy(http.addr.port(), &fifo),
    )
    .unwrap();
    signal(pid, "HUP");
    let unavailable = log.wait_for("pathway unavailable").await;
    assert!(
        unavailable.contains(&fifo.display().to_string()),
        "{unavailable}"
    );
    for _ in 0..3 {
        let health = tokio::time::timeout(Duration::from_secs(5), admin_get(admin, "/healthz"))
            .await
            .expect("/healthz answers during and after the reload")
            .unwrap();
        assert_eq!(health.0, 200);
        let status = tokio::time::timeout(Duration::from_secs(5), get(&agent, &url))
            .await
            .expect("the proxy answers after the reload");
        assert_eq!(status, 503, "the pathway is out without its credential");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A regular file where the FIFO was brings it back, without a reload.
    std::fs::remove_file(&fifo).unwrap();
    std::fs::write(&fifo, "sk-new\n").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get(&agent, &url).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pathway never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        http.requests().last().unwrap().header("x-api-key"),
        Some("sk-new")
    );

    signal(pid, "TERM");
    let status = exits_within(&mut child, &log, 15).await;
    assert!(status.success(), "{status:?}\n{}", log.lines().join("\n"));
    api.shutdown().await;
}

/// logrotate's `create` mode: it moves the audit file away and sends SIGUSR1; the
/// gateway then writes to a new file at the configured path, and no line is lost or
/// split between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_audit_log_after_logrotate_moved_it() {
    let ca = TestCa::new("example.org");
    let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &policy(http.addr.port(), 1));
    let config_arg = config.display().to_string();
    let (mut child, log) = spawn(&["run", "--config", &config_arg], &api.endpoint());
    let pid = child.id().unwrap();
    let proxy = proxy_addr(&log).await;
    let agent = research_agent(&ca, proxy);
    let audit = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log-20260101");
    let url = |n: u32| format!("http://localhost:{}/before-{n}", http.addr.port());
    for n in 0..3 {
        assert_eq!(get(&agent, &url(n)).await, 200);
    }
    // Written (the writer flushes after each burst), then moved as logrotate does.
    for _ in 0..100 {
        if read_audit(&audit).len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::rename(&audit, &rotated).unwrap();
    signal(pid, "USR1");
    log.wait_for("audit log reopened").await;
    let after = format!("http://localhost:{}/after", http.addr.port());
    assert_eq!(get(&agent, &after).await, 200);

    signal(pid, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the gateway did not exit on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", log.lines().join("\n"));
    let old: Vec<String> = read_audit(&rotated)
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(old, ["/before-0", "/before-1", "/before-2"]);
    let new: Vec<String> = read_audit(&audit)
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(new, ["/after"], "the new file holds only what came after");
    api.shutdown().await;
}
