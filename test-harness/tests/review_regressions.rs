//! Regressions for the findings of an independent review, end to end on the real
//! gateway: headers CEL could not see, requests the HTTP parser answered without a body
//! or an audit line, a header cap that was not exact, keep-alive connections closed by
//! the header timer, upstreams that never answer, and handshake failure labels.
//! Requests the ordinary clients refuse to send are written as raw bytes over mTLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_policy::testing::{parse_tests, run_tests};
use egress_policy::{HeaderView, Policy, Request, RequestKind, SpiffeId};
use test_harness::agent::{AgentClient, AgentError};
use test_harness::ca::{Svid, TestCa};
use test_harness::gateway::{GatewayOptions, World};
use test_harness::upstream::HttpEcho;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";

/// One response read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Reads consecutive HTTP/1.1 responses (Content-Length or chunked) from one stream.
#[derive(Default)]
struct Responses {
    buf: Vec<u8>,
}

impl Responses {
    async fn more<S: AsyncRead + Unpin>(&mut self, s: &mut S) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut chunk))
            .await
            .expect("the gateway answered in time")
            .expect("read from the gateway");
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn next<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> Raw {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.more(s).await;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        let mut raw = Raw {
            status,
            head,
            body: Vec::new(),
        };
        self.buf.drain(..head_end);
        if raw
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.more(s).await;
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&self.buf[..line_end])
                        .split(';')
                        .next()
                        .unwrap_or_default()
                        .trim(),
                    16,
                )
                .expect("chunk size");
                while self.buf.len() < line_end + 2 + size + 2 {
                    self.more(s).await;
                }
                raw.body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    return raw;
                }
            }
        }
        let len = raw
            .header("content-length")
            .map(|v| v.parse::<usize>().expect("content-length"))
            .unwrap_or(0);
        while self.buf.len() < len {
            self.more(s).await;
        }
        raw.body = self.buf.drain(..len).collect();
        raw
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes `bytes` in one write on a fresh mTLS connection and reads one response.
async fn raw(agent: &AgentClient, bytes: &[u8]) -> Raw {
    let mut s = agent.handshake().await.unwrap();
    s.write_all(bytes).await.unwrap();
    Responses::default().next(&mut s).await
}

/// Whether the gateway closes the connection (within a few seconds) after answering.
async fn closes<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

fn http_policy(port: u16, extra_rules: &str, when: &str) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
rules:
{extra_rules}  - name: never-matches
    action: deny
    when: 'request.host == "never.invalid"'
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: local
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
{when}"#
    )
}

async fn world(policy: &str, extra_config: &str) -> World {
    World::start_with(
        policy,
        GatewayOptions {
            extra_config: extra_config.to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

// === item: headers CEL could not see ===

const EXFIL_RULE: &str = r#"  - name: no-exfil
    action: deny
    when: '"x-exfil" in request.headers'
"#;
const TENANT_WHEN: &str = "        when: '!(\"x-tenant\" in request.headers) || request.headers[\"x-tenant\"] == \"good\"'\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_with_non_utf8_bytes_or_repeats_are_seen_by_rules() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let policy_yaml = http_policy(port, EXFIL_RULE, TENANT_WHEN);
    let w = world(&policy_yaml, "").await;
    let agent = w.agent(RESEARCH).unwrap();
    let get = |headers: &[u8]| {
        let mut req =
            format!("GET http://localhost:{port}/x HTTP/1.1\r\nHost: localhost:{port}\r\n")
                .into_bytes();
        req.extend_from_slice(headers);
        req.extend_from_slice(b"\r\n");
        req
    };

    // Sanity: the rules let ordinary traffic through.
    assert_eq!(raw(&agent, &get(b"X-Tenant: good\r\n")).await.status, 200);
    assert_eq!(http.requests().len(), 1);

    // A raw 0xE9 byte (Latin-1 e-acute) no longer hides the header from the deny rule.
    let r = raw(&agent, &get(b"X-Exfil: caf\xe9\r\n")).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"]["rule"], "no-exfil");
    let r = raw(&agent, &get("X-Exfil: café\r\n".as_bytes())).await;
    assert_eq!(r.status, 403, "{r:?}");
    // Nor from a tunnel's decision.
    let mut connect =
        format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\nX-Exfil: ")
            .into_bytes();
    connect.extend_from_slice(b"\xff\r\n\r\n");
    let r = raw(&agent, &connect).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"]["rule"], "no-exfil");

    // Repeated headers all count: `good` then `evil` is "good, evil", not "good".
    for repeated in [
        &b"X-Tenant: good\r\nX-Tenant: evil\r\n"[..],
        b"X-Tenant: good\r\nx-tenant: evil\xe9\r\n",
    ] {
        let r = raw(&agent, &get(repeated)).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert!(r.json()["error"]["rule"].is_null(), "{r:?}");
    }
    assert_eq!(
        http.requests().len(),
        1,
        "nothing denied reached the upstream"
    );
    let lines = w.gateway.wait_for_audit(6).await;
    assert_eq!(lines.len(), 6);
    assert!(
        lines[1..].iter().all(|l| l["decision"] == "deny"),
        "{lines:#?}"
    );

    // `policy test` and `policy explain` build the same view and agree.
    let policy = Policy::from_yaml_str(&policy_yaml, "policy.yaml").unwrap();
    let tests = format!(
        r#"tests:
  - name: lossy byte
    source: {RESEARCH}
    request: GET http://localhost:{port}/x
    headers: {{ x-exfil: "caf\ufffd" }}
    expect: deny
    rule: no-exfil
  - name: repeated tenant
    source: {RESEARCH}
    request: GET http://localhost:{port}/x
    headers: {{ x-tenant: "good, evil" }}
    expect: deny
  - name: one tenant
    source: {RESEARCH}
    request: GET http://localhost:{port}/x
    headers: {{ x-tenant: good }}
    expect: allow
"#
    );
    let report = run_tests(&policy, &parse_tests(&tests, "t.yaml").unwrap());
    assert_eq!(report.failed(), 0, "{:?}", report.cases);
    let source: SpiffeId = RESEARCH.parse().unwrap();
    let explain = |headers: &HeaderView| {
        policy.explain(&Request {
            source: &source,
            source_address: None,
            kind: RequestKind::Http,
            method: "GET",
            host: "localhost",
            port,
            path: "/x",
            query: "",
            headers,
            llm_model: None,
            now: std::time::SystemTime::now(),
        })
    };
    let e = explain(&HeaderView::new([(&b"X-Exfil"[..], &b"caf\xe9"[..])]));
    assert_eq!(e.decision.rule.as_deref(), Some("no-exfil"));
    let e = explain(&HeaderView::new([
        ("X-Tenant", "good"),
        ("X-Tenant", "evil"),
    ]));
    assert!(!e.decision.allowed);
    w.shutdown().await;
}

// === items: every refusal audited; the header cap exact ===

fn assert_refusal_line(line: &serde_json::Value, status: u16) {
    assert_eq!(line["status"], status, "{line}");
    assert_eq!(line["source_spiffe_id"], RESEARCH, "{line}");
    assert_eq!(line["decision"], "deny", "{line}");
    assert!(
        !line["reason"].as_str().unwrap_or_default().is_empty(),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_parser_refuses_get_a_json_body_and_an_audit_line() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world(&http_policy(port, "", ""), "").await;
    let agent = w.agent(RESEARCH).unwrap();
    let malformed: [&[u8]; 5] = [
        // A space in the host splits the request line.
        b"GET http://exa mple.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
        // An unclosed IPv6 literal.
        b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n",
        // A control byte in a header name, and one in a value.
        b"GET http://localhost/ HTTP/1.1\r\nX-B\x01d: y\r\n\r\n",
        b"GET http://localhost/ HTTP/1.1\r\nX-Bad: a\x00b\r\n\r\n",
        // Two different lengths: a smuggling attempt.
        b"POST http://localhost/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ];
    for (i, bytes) in malformed.iter().enumerate() {
        let mut s = agent.handshake().await.unwrap();
        s.write_all(bytes).await.unwrap();
        let r = Responses::default().next(&mut s).await;
        assert_eq!(r.status, 400, "{}: {r:?}", String::from_utf8_lossy(bytes));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let j = r.json();
        assert_eq!(j["error"]["type"], "bad_request", "{j}");
        assert!(!j["error"]["message"].as_str().unwrap().is_empty(), "{j}");
        assert_eq!(j["error"]["trace_id"].as_str().unwrap().len(), 32, "{j}");
        assert!(
            closes(&mut s).await,
            "the connection stays open after a 400"
        );
        let lines = w.gateway.wait_for_audit(i + 1).await;
        assert_eq!(lines.len(), i + 1, "{lines:#?}");
        assert_refusal_line(&lines[i], 400);
        assert_eq!(lines[i]["trace_id"], j["error"]["trace_id"]);
    }
    let lines = w.gateway.audit_lines();
    assert_eq!(lines[2]["method"], "GET");
    assert_eq!(lines[2]["host"], "localhost");

    // A head that never finishes: 408 with the JSON body, audited, then closed.
    let slow = world(
        &http_policy(port, "", ""),
        "timeouts: { handshake: 5s, request_header: 1s, connect: 5s, idle: 60s }\n",
    )
    .await;
    let agent = slow.agent(RESEARCH).unwrap();
    let mut s = agent.handshake().await.unwrap();
    s.write_all(format!("GET http://localhost:{port}/slow HTTP/1.1\r\nX-A: 1\r\n").as_bytes())
        .await
        .unwrap();
    let r = Responses::default().next(&mut s).await;
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(r.json()["error"]["type"], "request_timeout");
    let lines = slow.gateway.wait_for_audit(1).await;
    assert_refusal_line(&lines[0], 408);
    assert_eq!(lines[0]["path"], "/slow");
    assert!(http.requests().is_empty());
    slow.shutdown().await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_header_bytes_is_exact_even_in_one_write() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    // The default cap, 65536 bytes: request line, header fields and the blank line.
    let w = world(&http_policy(port, "", ""), "").await;
    let agent = w.agent(RESEARCH).unwrap();
    let request_of = |total: usize| {
        let start = format!(
            "GET http://localhost:{port}/big HTTP/1.1\r\nHost: localhost:{port}\r\nX-Big: "
        );
        let filler = total - start.len() - 4;
        format!("{start}{}\r\n\r\n", "a".repeat(filler)).into_bytes()
    };
    let exactly = request_of(65536);
    assert_eq!(exactly.len(), 65536);
    assert_eq!(raw(&agent, &exactly).await.status, 200);
    assert_eq!(http.requests().len(), 1);
    for total in [65537, 70_000, 100 * 1024] {
        let r = raw(&agent, &request_of(total)).await;
        assert_eq!(r.status, 431, "{total} bytes: {r:?}");
        let j = r.json();
        assert_eq!(j["error"]["type"], "request_header_fields_too_large", "{j}");
        assert!(
            j["error"]["message"].as_str().unwrap().contains("65536"),
            "{j}"
        );
    }
    assert_eq!(http.requests().len(), 1, "an oversized head was forwarded");
    let lines = w.gateway.wait_for_audit(4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for line in &lines[1..] {
        assert_refusal_line(line, 431);
        assert_eq!(line["limit"], "max_header_bytes", "{line}");
        assert_eq!(line["path"], "/big", "{line}");
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_with_bodies_are_each_answered_in_order() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world(&http_policy(port, "", ""), "").await;
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{port}");
    let host = format!("Host: localhost:{port}\r\n");
    // A sized body, a chunked body with a trailer, a plain GET, then a malformed head:
    // all in one write. The guard must find each head after each body.
    let wire = format!(
        "POST {url}/a HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\nhello\
         POST {url}/b HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
         GET {url}/c HTTP/1.1\r\n{host}\r\n\
         GET {url}/d HTTP/1.1\r\nBad Header: x\r\n\r\n"
    );
    let mut s = agent.handshake().await.unwrap();
    s.write_all(wire.as_bytes()).await.unwrap();
    let mut responses = Responses::default();
    let statuses = [
        responses.next(&mut s).await.status,
        responses.next(&mut s).await.status,
        responses.next(&mut s).await.status,
        responses.next(&mut s).await.status,
    ];
    assert_eq!(statuses, [200, 200, 200, 400]);
    let seen: Vec<_> = http
        .requests()
        .iter()
        .map(|r| (r.uri.clone(), String::from_utf8_lossy(&r.body).into_owned()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/a".to_string(), "hello".to_string()),
            ("/b".into(), "abc".into()),
            ("/c".into(), String::new())
        ]
    );
    let lines = w.gateway.wait_for_audit(4).await;
    assert_eq!(lines.len(), 4);
    assert_refusal_line(&lines[3], 400);
    w.shutdown().await;
}

// === item: keep-alive connections and the header timer ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
    let http = HttpEcho::start().await.unwrap();
    let port = http.addr.port();
    let w = world(
        &http_policy(port, "", ""),
        "timeouts: { handshake: 5s, request_header: 1s, connect: 5s, idle: 4s }\n",
    )
    .await;
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{port}/keep");
    let mut session = agent.session().await.unwrap();
    assert_eq!(
        session
            .request("GET", &url, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    // Idle for twice the header timeout: a keep-alive connection between requests is
    // governed by `idle`, not by `request_header`.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(
        !session.is_closed(),
        "the idle connection was closed by the header timer"
    );
    assert_eq!(
        session
            .request("GET", &url, &[], vec![])
            .await
            .expect("the keep-alive connection still serves")
            .status,
        200
    );
    // Past `idle`, the gateway closes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !session.is_closed() {
        assert!(
            Instant::now() < deadline,
            "the idle connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http.connection_count(), 1);
    w.shutdown().await;
}

// === item: upstream response timeout ===

/// A TLS server that completes every handshake, reads what it is sent and never answers.
async fn silent_tls_upstream(cert: Svid) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert.cert_chain.clone(), cert.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut sink = [0u8; 4096];
                    while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_a_504_within_the_response_timeout() {
    let up_ca = TestCa::new("upstream.test");
    let addr = silent_tls_upstream(up_ca.mint_server_cert(&["localhost", "127.0.0.1"])).await;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), up_ca.root_pem()).unwrap();
    let port = addr.port();
    let policy = format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: slow-llm
        destinations: ["localhost:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ ca_file: {ca} }}
        timeouts: {{ response: 1s }}
      - name: default
        destinations: ["127.0.0.1:{port}"]
        allow_cidrs: [127.0.0.0/8]
        upstream: {{ ca_file: {ca} }}
"#,
        ca = ca_file.path().display()
    );
    let w = world(
        &policy,
        "timeouts: { handshake: 5s, request_header: 5s, connect: 5s, idle: 60s, response: 3s }\n",
    )
    .await;
    let agent = w.agent(RESEARCH).unwrap();
    for (host, pathway, at_least, below) in [
        ("localhost", "slow-llm", 1.0, 2.5),
        ("127.0.0.1", "default", 3.0, 4.5),
    ] {
        let started = Instant::now();
        let r = agent
            .request(
                "POST",
                &format!("http://{host}:{port}/v1/chat/completions"),
                &[("content-type", "application/json")],
                b"{}".to_vec(),
            )
            .await
            .unwrap();
        let took = started.elapsed().as_secs_f64();
        assert_eq!(
            r.status,
            504,
            "{pathway}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json().unwrap()["error"]["type"], "upstream_timeout");
        assert!(
            (at_least..below).contains(&took),
            "{pathway}: the 504 came after {took:.2}s"
        );
    }
    let lines = w.gateway.wait_for_audit(2).await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for (line, pathway) in lines.iter().zip(["slow-llm", "default"]) {
        assert_eq!(line["pathway"], pathway, "{line}");
        assert_eq!(line["status"], 504, "{line}");
        assert!(
            line["error"]
                .as_str()
                .unwrap_or_default()
                .contains("no response"),
            "{line}"
        );
    }
    w.shutdown().await;
}

// === item: handshake failure labels ===

fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn handshake_failures(w: &World, reason: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = w.gateway.metrics().await.unwrap();
        let got = metric_value(&m, "egress_handshake_failures_total", &[("reason", reason)]);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{reason}: {got:?}, want {want}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_rejects_the_gateway_certificate_has_its_own_failure_label() {
    let http = HttpEcho::start().await.unwrap();
    let w = world(&http_policy(http.addr.port(), "", ""), "").await;
    // Agents that trust another CA refuse the gateway's certificate: one whose CA has
    // another name (alert UnknownCA), one whose CA has the same name as the gateway's,
    // as after a CA rotation with a stale bundle (the signature fails: DecryptError).
    for (i, stranger) in [TestCa::new("other.example"), TestCa::new("example.org")]
        .iter()
        .enumerate()
    {
        let agent = AgentClient::new(
            &w.ca.mint_svid(RESEARCH),
            &[stranger.root_cert()],
            w.gateway.proxy_addr(),
        )
        .unwrap();
        match agent.handshake().await {
            Err(AgentError::GatewayCertRejected(_)) => {}
            other => panic!(
                "expected the agent to reject the gateway: {:?}",
                other.err()
            ),
        }
        handshake_failures(&w, "peer_rejected_certificate", (i + 1) as f64).await;
    }
    // Plain HTTP on the mTLS port is still a protocol error, counted apart.
    let mut tcp = tokio::net::TcpStream::connect(w.gateway.proxy_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    handshake_failures(&w, "protocol_error", 1.0).await;
    handshake_failures(&w, "peer_rejected_certificate", 2.0).await;
    w.shutdown().await;
}
