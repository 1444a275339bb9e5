//! Interop with a proxy client nobody here wrote: curl speaking mTLS to the gateway
//! (`--proxy https://...` with `--proxy-cert`).

use std::path::Path;
use std::process::Output;

use test_harness::ca::TestCa;
use test_harness::gateway::World;
use test_harness::upstream::{HttpEcho, TlsEcho};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";

fn policy(tls_port: u16, http_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: local-tls
        destinations: ["localhost:{tls_port}"]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
      - name: local-http
        destinations: ["localhost:{http_port}"]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
"#
    )
}

async fn curl(proxy_port: u16, dir: &Path, extra: &[&str], url: &str) -> Output {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "--proxy",
        &format!("https://127.0.0.1:{proxy_port}"),
        "--proxy-cert",
    ])
    .arg(dir.join("agent.crt"))
    .arg("--proxy-key")
    .arg(dir.join("agent.key"))
    .arg("--proxy-cacert")
    .arg(dir.join("gateway-ca.pem"))
    .args(["-w", "\n%{http_code}"])
    .args(extra)
    .arg(url);
    cmd.output()
        .await
        .expect("curl is installed (scripts/install-deps.sh)")
}

fn status_and_body(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_client_certificate_through_the_gateway() {
    let tls_ca = TestCa::new("upstream.test");
    let tls = TlsEcho::start(tls_ca.mint_server_cert(&["localhost"]))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let w = World::start(&policy(tls.addr.port(), http.addr.port()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let svid = w.ca.mint_svid(RESEARCH);
    std::fs::write(dir.path().join("agent.crt"), svid.cert_pem()).unwrap();
    std::fs::write(dir.path().join("agent.key"), svid.key_pem()).unwrap();
    std::fs::write(dir.path().join("gateway-ca.pem"), w.ca.root_pem()).unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), tls_ca.root_pem()).unwrap();
    let port = w.gateway.proxy_addr().port();

    // Forwarded plain HTTP, allowed.
    let out = curl(
        port,
        dir.path(),
        &[],
        &format!("http://localhost:{}/from-curl", http.addr.port()),
    )
    .await;
    let (code, body) = status_and_body(&out);
    assert_eq!(
        code,
        "200",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.contains("/from-curl"), "{body}");

    // HTTPS through a CONNECT tunnel, allowed.
    let upstream_ca = dir.path().join("upstream-ca.pem");
    let out = curl(
        port,
        dir.path(),
        &["--cacert", upstream_ca.to_str().unwrap()],
        &format!("https://localhost:{}/tunnelled", tls.addr.port()),
    )
    .await;
    let (code, body) = status_and_body(&out);
    assert_eq!(
        code,
        "200",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.contains("tunnelled"), "{body}");

    // Forwarded plain HTTP, denied: the agent sees the gateway's JSON.
    let out = curl(port, dir.path(), &[], "http://pastebin.com/raw/abc").await;
    let (code, body) = status_and_body(&out);
    assert_eq!(code, "403");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["type"], "egress_denied");
    assert_eq!(json["error"]["rule"], "no-paste-sites");

    // HTTPS to a denied destination: curl reports the refused CONNECT.
    let out = curl(port, dir.path(), &[], "https://pastebin.com/").await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("403"), "{stderr}");

    let lines = w.gateway.wait_for_audit(4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(lines.iter().all(|l| l["source_spiffe_id"] == RESEARCH));
    assert_eq!(lines.iter().filter(|l| l["decision"] == "deny").count(), 2);
    w.shutdown().await;
}
