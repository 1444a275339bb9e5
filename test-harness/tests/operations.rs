//! Running the gateway in production, end to end with the real gateway: audit log files
//! that rotate by size, `/metrics` in the format the scraper asks for (checked by the
//! official Prometheus parsers), and every metric the shipped alerts read exported from
//! start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use test_harness::gateway::{GatewayOptions, World};
use test_harness::upstream::HttpEcho;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";

fn policy(http_port: u16) -> String {
    // An L7 pathway with a credential file, so `egress_pathway_unavailable` has a series.
    let key = std::env::temp_dir().join("egress-operations-test.key");
    let _ = std::fs::write(&key, "sk-test\n");
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
      - name: llm
        destinations: ["llm.example:443"]
        upstream:
          inject_headers:
            authorization: {{ secret_file: {}, prefix: "Bearer " }}
"#,
        key.display()
    )
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-harness lives in the workspace")
        .to_path_buf()
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    PathBuf::from(format!("{}.{n}", path.display()))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// `audit_log_max_bytes` and `audit_log_keep`: the file moves to `.1`, `.1` to `.2`, and
/// older files go; no file grows past the size, no line is split, and what is kept is
/// the newest records, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_rotates_by_size_and_keeps_the_newest_files() {
    let http = HttpEcho::start().await.unwrap();
    const MAX: u64 = 2048;
    let w = World::start_with(
        &policy(http.addr.port()),
        GatewayOptions {
            telemetry_extra: vec![
                format!("audit_log_max_bytes: {MAX}"),
                "audit_log_keep: 2".into(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let mut session = agent.session().await.unwrap();
    const N: usize = 24;
    for n in 0..N {
        let url = format!("http://localhost:{}/r{n}", http.addr.port());
        let r = session.request("GET", &url, &[], Vec::new()).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let audit = w.gateway.audit_path().to_path_buf();
    let last = format!("/r{}", N - 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !lines(&audit).iter().any(|l| l["path"] == last.as_str()) {
        assert!(tokio::time::Instant::now() < deadline, "{last} not audited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert!(numbered(&audit, 1).is_file() && numbered(&audit, 2).is_file());
    assert!(!numbered(&audit, 3).exists(), "audit_log_keep: 2");
    let mut kept = Vec::new();
    for file in [numbered(&audit, 2), numbered(&audit, 1), audit.clone()] {
        let size = std::fs::metadata(&file).unwrap().len();
        let file_lines = lines(&file);
        assert!(!file_lines.is_empty(), "{}: empty", file.display());
        assert!(
            size <= MAX || file_lines.len() == 1,
            "{}: {size} bytes in {} lines",
            file.display(),
            file_lines.len()
        );
        kept.extend(
            file_lines
                .iter()
                .map(|l| l["path"].as_str().unwrap().to_string()),
        );
    }
    // The newest records, consecutive and in order; the oldest were rotated away.
    assert!(kept.len() < N, "nothing was rotated away: {kept:?}");
    let first: usize = kept[0].trim_start_matches("/r").parse().unwrap();
    let want: Vec<String> = (first..N).map(|n| format!("/r{n}")).collect();
    assert_eq!(kept, want);
    w.shutdown().await;
}

/// GET `path` on the admin listener with `Accept: accept`: (content type, body).
async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: admin\r\n{accept}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// The official Prometheus Python client's parser for `format` (`text` or
/// `openmetrics`) on `body`: every sample as name{labels} -> value. `None` when the
/// interop venv lacks the package (after a loud skip).
fn parse_with_prometheus_client(format: &str, body: &str) -> Option<BTreeMap<String, f64>> {
    use std::io::Write as _;
    let python = test_harness::interop::interop_python("prometheus_client")?;
    let mut child = std::process::Command::new(python)
        .arg(test_harness::interop::interop_dir().join("parse_metrics.py"))
        .arg(format)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut samples = BTreeMap::new();
    for family in parsed["families"].as_array().unwrap() {
        for s in family["samples"].as_array().unwrap() {
            let labels: BTreeMap<&str, &str> = s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
                .collect();
            // OpenMetrics adds a `_created` sample some encoders emit; none here.
            samples.insert(
                format!("{}{labels:?}", s["name"].as_str().unwrap()),
                s["value"].as_f64().unwrap(),
            );
        }
    }
    Some(samples)
}

/// Prometheus asks for OpenMetrics first and gets it; a scraper that asks for the text
/// format 0.0.4 (or nothing) gets that; both parse with the official parsers and carry
/// the same samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_the_format_the_scraper_asks_for() {
    let http = HttpEcho::start().await.unwrap();
    let w = World::start(&policy(http.addr.port())).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{}/m", http.addr.port());
    for _ in 0..3 {
        let r = agent.request("GET", &url, &[], Vec::new()).await.unwrap();
        assert_eq!(r.status, 200);
    }
    w.gateway.wait_for_audit(3).await;
    let admin = w.gateway.admin_addr();

    let (ct, text) = scrape(admin, Some("text/plain;version=0.0.4")).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE egress_requests_total counter"),
        "{text}"
    );
    let (ct_default, _) = scrape(admin, None).await;
    assert_eq!(ct_default, ct, "without Accept: the text format");

    // What Prometheus 3 sends by default.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let (ct, om) = scrape(admin, Some(prometheus_accept)).await;
    assert_eq!(
        ct,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");

    let (Some(from_text), Some(from_om)) = (
        parse_with_prometheus_client("text", &text),
        parse_with_prometheus_client("openmetrics", &om),
    ) else {
        return;
    };
    let requests = format!(
        "egress_requests_total{:?}",
        BTreeMap::from([
            ("agent", "research-agent"),
            ("decision", "allow"),
            ("enforced", "true"),
            ("kind", "http"),
            ("pathway", "docs"),
            ("rule", ""),
            ("status_class", "2xx"),
        ])
    );
    assert_eq!(from_text.get(&requests), Some(&3.0), "{from_text:#?}");
    assert_eq!(from_om.get(&requests), Some(&3.0), "{from_om:#?}");
    // The same samples either way (the scrapes are moments apart: compare the names).
    assert_eq!(
        from_text.keys().collect::<Vec<_>>(),
        from_om.keys().collect::<Vec<_>>()
    );
    w.shutdown().await;
}

/// Metric selectors in a PromQL expression: `name` and its `{k="v"}` matchers.
fn selectors(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("egress_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut matchers = Vec::new();
        let after = &tail[end..];
        if let Some(inner) = after.strip_prefix('{') {
            let close = inner.find('}').unwrap();
            for m in inner[..close].split(',').filter(|m| !m.trim().is_empty()) {
                let (k, v) = m.split_once('=').unwrap();
                matchers.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
            }
        }
        out.push((name, matchers));
        rest = &tail[end..];
    }
    out
}

/// Every series the shipped PrometheusRule reads is on a fresh gateway's `/metrics`
/// before any traffic (at 0), so no alert needs `or vector(0)`; and the exposition
/// passes `promtool check metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_read_is_exported_from_start_up() {
    let http = HttpEcho::start().await.unwrap();
    let w = World::start(&policy(http.addr.port())).await.unwrap();
    let (_, text) = scrape(w.gateway.admin_addr(), Some("text/plain;version=0.0.4")).await;

    let rule_path = repo().join("deploy/kubernetes/components/monitoring/prometheusrule.yaml");
    let rule: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&rule_path).unwrap()).unwrap();
    let mut checked = 0;
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let expr = r["expr"].as_str().unwrap();
            for (name, matchers) in selectors(expr) {
                let found = text.lines().any(|l| {
                    let Some(rest) = l.strip_prefix(name.as_str()) else {
                        return false;
                    };
                    (rest.starts_with('{') || rest.starts_with(' '))
                        && matchers
                            .iter()
                            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                });
                assert!(
                    found,
                    "alert {}: {name}{matchers:?} is not on a fresh gateway's /metrics:\n{text}",
                    r["alert"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "{checked} selectors");

    if let Some(promtool) = promtool() {
        use std::io::Write as _;
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    w.shutdown().await;
}

/// promtool from `scripts/install-promtool.sh`, or `None` after a loud message.
fn promtool() -> Option<PathBuf> {
    let candidates = std::env::var_os("EGRESS_PROMTOOL")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/egress-gateway/bin/promtool")),
        );
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    test_harness::interop::missing("promtool (scripts/install-promtool.sh)");
    None
}

/// The shipped Kubernetes policy names the optional `openai-api-key` Secret: without it
/// the gateway starts, serves every other pathway, and reports `openai` alone as
/// unavailable (503 for its requests) instead of crash-looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_kubernetes_policy_starts_without_the_optional_secret() {
    let shipped =
        std::fs::read_to_string(repo().join("deploy/kubernetes/config/policy.yaml")).unwrap();
    let secret = "/var/run/secrets/openai/token";
    assert!(
        shipped.contains(secret),
        "the shipped policy names {secret}"
    );
    assert!(
        !Path::new(secret).exists(),
        "this machine has the Secret mounted"
    );
    let w = World::start(&shipped).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = scrape(w.gateway.admin_addr(), Some("text/plain;version=0.0.4")).await;
        let openai = text.lines().find(|l| {
            l.starts_with("egress_pathway_unavailable{") && l.contains("pathway=\"openai\"")
        });
        if openai.is_some_and(|l| l.ends_with(" 1")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = test_harness::gateway::admin_get(w.gateway.admin_addr(), "/readyz")
        .await
        .unwrap();
    assert_eq!(
        status, 200,
        "ready: one missing credential is not a reason to stop serving"
    );
    w.shutdown().await;
}
