//! Hardening, end to end: SNI checks in tunnels, policy reload (file watcher and
//! SIGHUP path) with re-checks of open tunnels and connections, and resource limits.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use test_harness::agent::AgentClient;
use test_harness::ca::{SvidOptions, TestCa};
use test_harness::gateway::{GatewayOptions, World};
use test_harness::upstream::{HttpEcho, TlsEcho};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

/// Polls `cond` until it holds; patience is generous and only bounds a failing test.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The ClientHello bytes a rustls client sends, with `sni` or none at all.
fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("no-sni.test").to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

fn tunnel_line(lines: &[serde_json::Value]) -> serde_json::Value {
    lines
        .iter()
        .find(|l| l["kind"] == "connect" && l["status"] == 200)
        .cloned()
        .unwrap_or_else(|| panic!("no tunnel audit line in {lines:#?}"))
}

fn sni_policy(tls_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: checked
        destinations: ["localhost:{tls_port}", "127.0.0.1:{tls_port}"]
        require_sni: true
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

async fn tls_upstream() -> (TestCa, TlsEcho) {
    let ca = TestCa::new("upstream.test");
    let cert = ca.mint(SvidOptions {
        dns_names: vec!["localhost".into()],
        ip_addresses: vec!["127.0.0.1".parse().unwrap()],
        ..Default::default()
    });
    let echo = TlsEcho::start(cert).await.unwrap();
    (ca, echo)
}

/// Opens a tunnel to `authority`, speaks TLS through it as `server_name` (which sets
/// the SNI), sends one GET and returns the whole response; the tunnel is then closed.
async fn https_get_through_tunnel(
    agent: &AgentClient,
    authority: &str,
    server_name: &str,
    up_ca: &TestCa,
) -> String {
    let t = agent.connect_tunnel(authority, &[]).await.unwrap();
    assert_eq!(t.status, 200);
    let mut tls = agent
        .tls_through_tunnel(t.stream.unwrap(), server_name, &[up_ca.root_cert()])
        .await
        .unwrap();
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_matching_the_connect_host_is_relayed_untouched() {
    let (up_ca, up) = tls_upstream().await;
    let w = World::start(&sni_policy(up.addr.port())).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let out = https_get_through_tunnel(
        &agent,
        &format!("localhost:{}", up.addr.port()),
        "LocalHost",
        &up_ca,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"));
    assert_eq!(up.snis_seen(), vec![Some("localhost".to_string())]);
    let line = tunnel_line(&w.gateway.wait_for_audit(1).await);
    // (The agent hangs up without close_notify; that is the only error allowed.)
    assert!(
        !line["error"].as_str().unwrap_or_default().contains("SNI"),
        "{line}"
    );
    assert!(
        line["bytes_sent"].as_u64().unwrap() > 500,
        "the ClientHello was relayed: {line}"
    );
    w.shutdown().await;
}

/// Sends `hello` into a fresh tunnel to the upstream and returns what came back before
/// the gateway closed the tunnel.
async fn send_hello(agent: &AgentClient, authority: &str, hello: &[u8]) -> Vec<u8> {
    let t = agent.connect_tunnel(authority, &[]).await.unwrap();
    assert_eq!(t.status, 200);
    let mut s = t.stream.unwrap();
    s.write_all(hello).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_mismatch_missing_sni_and_non_tls_close_the_tunnel() {
    let (_up_ca, up) = tls_upstream().await;
    let w = World::start(&sni_policy(up.addr.port())).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let authority = format!("localhost:{}", up.addr.port());

    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("fronted", client_hello(Some("evil.test")), "does not match"),
        (
            "parent domain",
            client_hello(Some("host")),
            "does not match",
        ),
        ("no sni", client_hello(None), "no SNI"),
        (
            "plain http",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "not start with a TLS",
        ),
    ];
    for (i, (name, hello, why)) in cases.iter().enumerate() {
        let back = send_hello(&agent, &authority, hello).await;
        assert!(back.is_empty(), "{name}: the upstream answered: {back:?}");
        let lines = w.gateway.wait_for_audit(i + 1).await;
        let line = &lines[i];
        // The CONNECT got its 200; the tunnel was then refused: a denial, with why.
        assert_eq!(line["status"], 200, "{name}: {line}");
        assert_eq!(line["decision"], "deny", "{name}: {line}");
        assert_eq!(line["enforced"], true, "{name}: {line}");
        let reason = line["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{name}: {line}");
        assert_eq!(
            line["bytes_sent"], 0,
            "{name}: nothing may reach the upstream: {line}"
        );
    }
    // No ClientHello ever reached the upstream.
    assert!(up.snis_seen().is_empty(), "{:?}", up.snis_seen());
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literal_tunnel_may_omit_sni() {
    let (up_ca, up) = tls_upstream().await;
    let w = World::start(&sni_policy(up.addr.port())).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    // rustls sends no SNI for an IP address, as RFC 6066 requires.
    let out = https_get_through_tunnel(
        &agent,
        &format!("127.0.0.1:{}", up.addr.port()),
        "127.0.0.1",
        &up_ca,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"));
    assert_eq!(up.snis_seen(), vec![None]);

    // A DNS name in the SNI of an IP-literal tunnel picks a virtual host the policy never saw.
    let back = send_hello(
        &agent,
        &format!("127.0.0.1:{}", up.addr.port()),
        &client_hello(Some("localhost")),
    )
    .await;
    assert!(back.is_empty());
    let lines = w.gateway.wait_for_audit(2).await;
    assert!(
        lines.iter().any(|l| l["decision"] == "deny"
            && l["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("does not match")),
        "{lines:#?}"
    );
    w.shutdown().await;
}

// === reload ===

fn two_pathways(tls_port: u16, http_port: u16, keep_tls: bool) -> String {
    let tls = if keep_tls {
        format!(
            "      - name: tls\n        destinations: [\"localhost:{tls_port}\"]\n        allow_cidrs: [127.0.0.0/8]\n"
        )
    } else {
        String::new()
    };
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
{tls}      - name: http
        destinations: ["localhost:{http_port}"]
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

/// Writes the policy the way a careful operator (or a ConfigMap) does: a new file renamed over.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_reload_closes_tunnels_the_new_policy_denies() {
    let tls_ca = TestCa::new("upstream.test");
    let tls = TlsEcho::start(tls_ca.mint_server_cert(&["localhost"]))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let w = World::start(&two_pathways(tls.addr.port(), http.addr.port(), true))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();

    // One tunnel the new policy denies, one it still allows.
    let doomed = agent
        .connect_tunnel(&format!("localhost:{}", tls.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(doomed.status, 200);
    let mut doomed = agent
        .tls_through_tunnel(doomed.stream.unwrap(), "localhost", &[tls_ca.root_cert()])
        .await
        .unwrap();
    let kept = agent
        .connect_tunnel(&format!("localhost:{}", http.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(kept.status, 200);
    let mut kept = kept.stream.unwrap();

    write_atomically(
        w.gateway.policy_path(),
        &two_pathways(tls.addr.port(), http.addr.port(), false),
    );
    // The doomed tunnel ends without the agent closing it.
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), doomed.read_to_end(&mut buf))
        .await
        .expect("the denied tunnel was closed");
    let lines = w.gateway.wait_for_audit(1).await;
    let line = tunnel_line(&lines);
    assert_eq!(line["port"], tls.addr.port());
    let err = line["error"].as_str().unwrap_or_default();
    assert!(
        err.starts_with("closed: denied by reloaded policy"),
        "{line}"
    );

    // The allowed tunnel still carries traffic after the reload.
    kept.write_all(b"GET /still-open HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    kept.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).contains("still-open"));
    // And new tunnels are decided by the new policy.
    let again = agent
        .connect_tunnel(&format!("localhost:{}", tls.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(again.status, 403);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_is_rejected_and_the_old_one_stays_in_force() {
    let http = HttpEcho::start().await.unwrap();
    let w = World::start(&two_pathways(1, http.addr.port(), false))
        .await
        .unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{}/x", http.addr.port());

    // The SIGHUP path: the error names the problem.
    std::fs::write(
        w.gateway.policy_path(),
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: not-a-spiffe-id\n",
    )
    .unwrap();
    let err = w
        .gateway
        .gateway()
        .reload_policy()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not-a-spiffe-id") || err.contains("id"),
        "{err}"
    );
    assert_eq!(
        agent
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );

    // The watcher path: an invalid file is reported (counted) and changes nothing.
    let metrics_url = format!("http://{}/metrics", w.gateway.admin_addr());
    let before = rejected_reloads(&metrics_url).await;
    std::fs::write(w.gateway.policy_path(), "version: 1\nagents: [[[\n").unwrap();
    let mut rejected = false;
    for _ in 0..400 {
        if rejected_reloads(&metrics_url).await > before {
            rejected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rejected, "the watcher never rejected the invalid file");
    assert_eq!(
        agent
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    w.shutdown().await;
}

async fn rejected_reloads(metrics_url: &str) -> u64 {
    fetch_text(metrics_url)
        .await
        .lines()
        .find(|l| l.starts_with("egress_policy_reloads_total") && l.contains("rejected"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

async fn fetch_text(url: &str) -> String {
    let uri: hyper::Uri = url.parse().unwrap();
    let Ok(tcp) = tokio::net::TcpStream::connect(uri.authority().unwrap().as_str()).await else {
        return String::new();
    };
    let mut tcp = tcp;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        uri.path()
    );
    if tcp.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Policy A allows GET /a paths only, policy B /b only; the invalid one would allow
/// /z if any part of it were applied.
fn ab_policy(http_port: u16, allowed: &str) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: only-{allowed}
        destinations: ["localhost:{http_port}"]
        when: 'request.path.startsWith("/{allowed}")'
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_traffic_never_decides_with_a_half_loaded_policy() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = World::start(&ab_policy(port, "a")).await.unwrap();
    let agent = Arc::new(w.agent(RESEARCH).unwrap());
    let invalid = format!(
        "{}rules:\n  - name: broken\n    action: deny\n    when: 'request.host ==== 1'\n",
        ab_policy(port, "z")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..3 {
        let (agent, stop, served) = (agent.clone(), stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let mut session = agent.session().await.unwrap();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let path = ["a", "b", "z"][(i + c) % 3];
                let url = format!("http://localhost:{port}/{path}/{i}");
                let resp = session.request("GET", &url, &[], vec![]).await.unwrap();
                // /z is allowed only by the invalid policy: it must never be in force.
                match path {
                    "z" => assert_eq!(resp.status, 403, "{url}"),
                    _ => assert!(resp.status == 200 || resp.status == 403, "{url}"),
                }
                served.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let path = w.gateway.policy_path().to_path_buf();
    for round in 0..6 {
        let next = if round % 2 == 0 { "b" } else { "a" };
        write_atomically(&path, &invalid);
        w.gateway.gateway().reload_policy().await.unwrap_err();
        write_atomically(&path, &ab_policy(port, next));
        w.gateway.gateway().reload_policy().await.unwrap();
        let before = served.load(Ordering::SeqCst);
        eventually("traffic flows", || {
            served.load(Ordering::SeqCst) > before + 5
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // Each request was decided by A or B as a whole: /a and /b allowed at different times.
    let lines = w.gateway.audit_lines();
    let allowed = |p: &str| {
        lines
            .iter()
            .filter(|l| l["decision"] == "allow" && l["path"].as_str().unwrap_or("").starts_with(p))
            .count()
    };
    assert!(
        allowed("/a") > 0 && allowed("/b") > 0,
        "both policies were in force"
    );
    assert_eq!(allowed("/z"), 0);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_trust_domain_closes_that_peers_keep_alive_connections() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = World::start(&two_pathways(1, port, false)).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let mut session = agent.session().await.unwrap();
    let url = format!("http://localhost:{port}/k");
    assert_eq!(
        session
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );

    std::fs::write(
        w.gateway.policy_path(),
        "version: 1\ntrust_domains: [other.org]\nagents:\n  - name: x\n    id: spiffe://other.org/x\n    pathways:\n      - name: p\n        destinations: [\"localhost:1\"]\n",
    )
    .unwrap();
    w.gateway.gateway().reload_policy().await.unwrap();
    // The connection is closed by the gateway: the next request on it fails.
    let mut closed = false;
    for _ in 0..400 {
        if session.request("GET", &url, &[], vec![]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "the keep-alive connection stayed open");
    w.shutdown().await;
}

// === resource limits ===

fn http_policy(port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: agents
    id: spiffe://example.org/ns/ai-workloads/sa/*
    pathways:
      - name: http
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
"#
    )
}

async fn world_with(port: u16, extra: &str) -> World {
    World::start_with(
        &http_policy(port),
        GatewayOptions {
            extra_config: extra.to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_do_not_block_others() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world_with(
        port,
        "timeouts: { handshake: 1s, request_header: 1s, connect: 5s, idle: 60s }\n",
    )
    .await;
    let slow = w.agent(RESEARCH).unwrap();
    let fast = w.agent(CODING).unwrap();

    // A slowloris: headers trickle in and never finish.
    let mut loris = slow.handshake().await.unwrap();
    loris
        .write_all(format!("GET http://localhost:{port}/ HTTP/1.1\r\n").as_bytes())
        .await
        .unwrap();
    // A TCP connection that never starts its TLS handshake.
    let mut mute = tokio::net::TcpStream::connect(w.gateway.proxy_addr())
        .await
        .unwrap();

    let url = format!("http://localhost:{port}/fast");
    for _ in 0..5 {
        assert_eq!(
            fast.request("GET", &url, &[], vec![]).await.unwrap().status,
            200
        );
    }
    // Both are closed by the gateway's timeouts.
    let mut buf = [0u8; 256];
    let _ = loris.write_all(b"X-Slow: 1\r\n").await;
    // Closed (a 408 first is fine too) by request_header, long before the patience runs out.
    let cut = tokio::time::timeout(Duration::from_secs(20), loris.read(&mut buf)).await;
    assert!(cut.is_ok(), "the slow client was never cut off");
    let n = tokio::time::timeout(Duration::from_secs(20), mute.read(&mut buf))
        .await
        .expect("the mute connection was never closed");
    assert!(matches!(n, Ok(0) | Err(_)));
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_headers_are_refused() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world_with(port, "limits: { max_header_bytes: 8192 }\n").await;
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{port}/big");
    let big = "x".repeat(32 * 1024);
    let refused = match agent.request("GET", &url, &[("x-big", &big)], vec![]).await {
        Ok(r) => r.status == 431,
        Err(_) => true,
    };
    assert!(refused, "a 32 KiB header was accepted");
    assert!(http.requests().is_empty());
    // Normal requests still work.
    assert_eq!(
        agent
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    w.shutdown().await;
}

async fn open_tunnel(agent: &AgentClient, port: u16) -> Option<test_harness::agent::GatewayStream> {
    match agent
        .connect_tunnel(&format!("localhost:{port}"), &[])
        .await
    {
        Ok(t) if t.status == 200 => t.stream,
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_the_per_agent_connection_cap() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world_with(port, "limits: { max_connections_per_agent: 2 }\n").await;
    let greedy = w.agent(RESEARCH).unwrap();
    let other = w.agent(CODING).unwrap();

    let t1 = open_tunnel(&greedy, port).await.expect("first tunnel");
    let t2 = open_tunnel(&greedy, port).await.expect("second tunnel");
    // Both HTTP connections have upgraded; the tunnels still hold the agent's slots.
    assert!(
        open_tunnel(&greedy, port).await.is_none(),
        "a third connection was admitted"
    );
    // Another agent is not starved.
    let t3 = open_tunnel(&other, port)
        .await
        .expect("another agent's tunnel");
    drop(t1);
    let mut reopened = None;
    for _ in 0..400 {
        reopened = open_tunnel(&greedy, port).await;
        if reopened.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reopened.is_some(),
        "the slot was not released when the tunnel closed"
    );
    drop((t2, t3, reopened));
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_the_global_connection_cap() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world_with(port, "limits: { max_connections: 2 }\n").await;
    let a = w.agent(RESEARCH).unwrap();
    let b = w.agent(CODING).unwrap();
    let t1 = open_tunnel(&a, port).await.expect("first tunnel");
    let t2 = open_tunnel(&b, port).await.expect("second tunnel");
    assert!(
        open_tunnel(&a, port).await.is_none(),
        "a third connection was admitted"
    );
    drop((t1, t2));
    w.shutdown().await;
}
