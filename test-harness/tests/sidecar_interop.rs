//! Interop through the sidecar with HTTP clients nobody here wrote — curl, Python
//! `requests` and `httpx`, Go `net/http` — each configured only by the standard proxy
//! environment variables, against an allowed and a denied destination, over plain HTTP
//! (absolute-form) and HTTPS (CONNECT).
//!
//! Destinations are `*.test` names the gateway's test resolver maps to 127.0.0.1: Go
//! and Python never proxy `localhost`/`127.0.0.1`. The Python clients come from
//! `scripts/install-deps.sh` (a venv under ~/.cache/egress-gateway); Go builds the
//! client in the test. A missing tool fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use test_harness::ca::TestCa;
use test_harness::gateway::{GatewayOptions, World};
use test_harness::sidecar::TestSidecar;
use test_harness::test_resolver::LoopbackTestResolver;
use test_harness::upstream::{HttpEcho, TlsEcho};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn policy(http_port: u16, tls_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: allowed
        destinations: ["api.allowed.test:{http_port}", "api.allowed.test:{tls_port}"]
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

/// The gateway, the sidecar for the research agent, and the two upstreams.
struct Env {
    w: World,
    sidecar: TestSidecar,
    http: HttpEcho,
    tls: TlsEcho,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        let tls_ca = TestCa::new("upstream.test");
        let tls = TlsEcho::start(tls_ca.mint_server_cert(&["api.allowed.test", "api.denied.test"]))
            .await
            .unwrap();
        let http = HttpEcho::start().await.unwrap();
        let opts = GatewayOptions {
            resolver: Some(LoopbackTestResolver::shared()),
            ..Default::default()
        };
        let w = World::start_with(&policy(http.addr.port(), tls.addr.port()), opts)
            .await
            .unwrap();
        let sidecar = TestSidecar::start(&w, RESEARCH).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("upstream-ca.pem"), tls_ca.root_pem()).unwrap();
        Env {
            w,
            sidecar,
            http,
            tls,
            dir,
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("upstream-ca.pem")
    }

    fn allowed_http(&self, tag: &str) -> String {
        format!("http://api.allowed.test:{}/{tag}", self.http.addr.port())
    }
    fn allowed_https(&self, tag: &str) -> String {
        format!("https://api.allowed.test:{}/{tag}", self.tls.addr.port())
    }
    fn denied_http(&self) -> String {
        format!("http://api.denied.test:{}/nope", self.http.addr.port())
    }
    fn denied_https(&self) -> String {
        format!("https://api.denied.test:{}/nope", self.tls.addr.port())
    }

    /// A command with the proxy variables set, upper- and lower-case, and nothing that
    /// would bypass or override them.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let proxy = self.sidecar.proxy_url();
        let mut cmd = Command::new(program);
        for var in ["NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"] {
            cmd.env_remove(var);
        }
        for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
            cmd.env(var, &proxy);
        }
        cmd
    }

    /// Every audit line so far carries the agent's SPIFFE ID; `n` are expected.
    async fn check_audit(&self, n: usize, allowed: usize) {
        let lines = self.w.gateway.wait_for_audit(n).await;
        assert_eq!(lines.len(), n, "{lines:#?}");
        for l in &lines {
            assert_eq!(l["source_spiffe_id"], RESEARCH, "{l}");
        }
        assert_eq!(
            lines.iter().filter(|l| l["decision"] == "allow").count(),
            allowed,
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l["trace_id"] == TRACE_ID),
            "traceparent passed through: {lines:#?}"
        );
    }

    async fn shutdown(self) {
        self.sidecar.shutdown().await;
        self.w.shutdown().await;
    }
}

/// What a client printed: `{"status", "body"}` or `{"error"}`.
#[derive(Debug)]
enum Outcome {
    Response { status: u16, body: String },
    Failed(String),
}

impl Outcome {
    fn from_json(out: &std::process::Output) -> Outcome {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "client output is not JSON ({e}): {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Outcome::Failed(e.to_string()),
            None => Outcome::Response {
                status: v["status"].as_u64().unwrap_or(0) as u16,
                body: v["body"].as_str().unwrap_or_default().to_string(),
            },
        }
    }

    fn expect_ok(&self, tag: &str) {
        match self {
            Outcome::Response { status: 200, body } => {
                assert!(body.contains(tag), "upstream response expected: {body}")
            }
            other => panic!("expected the upstream's 200 for {tag}, got {other:?}"),
        }
    }

    fn expect_gateway_403(&self) {
        match self {
            Outcome::Response { status: 403, body } => {
                let j: serde_json::Value = serde_json::from_str(body)
                    .unwrap_or_else(|e| panic!("gateway JSON expected ({e}): {body}"));
                assert_eq!(j["error"]["type"], "egress_denied", "{j}");
            }
            other => panic!("expected the gateway's 403 JSON, got {other:?}"),
        }
    }

    fn expect_failed_tunnel(&self, mentions: &str) {
        match self {
            Outcome::Failed(e) => assert!(e.contains(mentions), "{e}"),
            other => panic!("expected a failed tunnel, got {other:?}"),
        }
    }
}

/// Runs a blocking client process off the async runtime.
async fn run(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run the interop client: {e}"))
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_sidecar() {
    let env = Env::start().await;
    let curl = |url: String| {
        let mut cmd = env.command("curl");
        cmd.env("CURL_CA_BUNDLE", env.ca_file())
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}", "-H"])
            .arg(format!("traceparent: {TRACEPARENT}"))
            .arg(url);
        cmd
    };
    let status_body = |out: &std::process::Output| {
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (code.to_string(), body.to_string())
    };

    let out = run(curl(env.allowed_http("curl-http"))).await;
    let (code, body) = status_body(&out);
    assert_eq!(code, "200", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(body.contains("/curl-http"), "{body}");

    let out = run(curl(env.allowed_https("curl-https"))).await;
    let (code, body) = status_body(&out);
    assert_eq!(code, "200", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(body.contains("/curl-https"), "{body}");

    let out = run(curl(env.denied_http())).await;
    let (code, body) = status_body(&out);
    assert_eq!(code, "403");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["error"]["type"], "egress_denied");

    let out = run(curl(env.denied_https())).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("403"), "{stderr}");

    env.check_audit(4, 2).await;
    env.shutdown().await;
}

fn interop_python() -> PathBuf {
    if let Ok(p) = std::env::var("EGRESS_INTEROP_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var("EGRESS_INTEROP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(&std::env::var("HOME").unwrap_or_default())
                .join(".cache/egress-gateway/venv-interop")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps.sh (it installs requests and httpx there)",
        python.display()
    );
    python
}

async fn python_client(lib: &'static str) {
    let env = Env::start().await;
    let python = interop_python();
    let script = interop_dir().join("proxy_client.py");
    let fetch = |url: String| {
        let mut cmd = env.command(&python);
        cmd.env("REQUESTS_CA_BUNDLE", env.ca_file())
            .env("SSL_CERT_FILE", env.ca_file())
            .arg(&script)
            .arg(lib)
            .arg(url)
            .arg(format!("traceparent={TRACEPARENT}"));
        cmd
    };
    let http_tag = format!("{lib}-http");
    let https_tag = format!("{lib}-https");
    Outcome::from_json(&run(fetch(env.allowed_http(&http_tag))).await).expect_ok(&http_tag);
    Outcome::from_json(&run(fetch(env.allowed_https(&https_tag))).await).expect_ok(&https_tag);
    Outcome::from_json(&run(fetch(env.denied_http())).await).expect_gateway_403();
    // Both expose the proxy's status in the exception text.
    Outcome::from_json(&run(fetch(env.denied_https())).await).expect_failed_tunnel("403");
    env.check_audit(4, 2).await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_through_the_sidecar() {
    python_client("requests").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_httpx_through_the_sidecar() {
    python_client("httpx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_net_http_through_the_sidecar() {
    let build_dir = tempfile::tempdir().unwrap();
    let binary = build_dir.path().join("goclient");
    let mut build = Command::new("go");
    build
        .arg("build")
        .arg("-o")
        .arg(&binary)
        .arg(interop_dir().join("goclient/main.go"))
        .current_dir(build_dir.path())
        // Standard library only: never reach for a toolchain or module download.
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GO111MODULE", "auto");
    let out = run(build).await;
    assert!(
        out.status.success(),
        "go build failed (is Go installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let env = Env::start().await;
    let fetch = |url: String| {
        let mut cmd = env.command(&binary);
        cmd.env("SSL_CERT_FILE", env.ca_file())
            .arg(url)
            .arg(format!("traceparent={TRACEPARENT}"));
        cmd
    };
    Outcome::from_json(&run(fetch(env.allowed_http("go-http"))).await).expect_ok("go-http");
    Outcome::from_json(&run(fetch(env.allowed_https("go-https"))).await).expect_ok("go-https");
    Outcome::from_json(&run(fetch(env.denied_http())).await).expect_gateway_403();
    // Go reports a refused CONNECT by its reason phrase only ("Forbidden"), not the code.
    Outcome::from_json(&run(fetch(env.denied_https())).await).expect_failed_tunnel("Forbidden");
    env.check_audit(4, 2).await;
    env.shutdown().await;
}
