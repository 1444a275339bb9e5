//! Traces, metrics and health endpoints, end to end: the real gateway exporting OTLP to
//! a real gRPC TraceService, scraped over its admin listener.

use std::time::Duration;

use test_harness::ca::{SvidOptions, TestCa};
use test_harness::gateway::{admin_get, gateway_identity, GatewayOptions, World, GATEWAY_ID};
use test_harness::otlp::{Behaviour, CapturedSpan, HttpOtlpReceiver, OtlpReceiver};
use test_harness::upstream::{HttpEcho, TlsEcho};
use test_harness::workload_api::WorkloadIdentity;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const AGENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";

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
        methods: [GET]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
"#
    )
}

async fn start(otlp: Option<&OtlpReceiver>) -> (World, TlsEcho, HttpEcho) {
    start_exporting(otlp.map(|o| o.endpoint()), None).await
}

/// The gateway exporting to `endpoint` with `telemetry.otlp_protocol: protocol`.
async fn start_exporting(
    endpoint: Option<String>,
    protocol: Option<&str>,
) -> (World, TlsEcho, HttpEcho) {
    let tls_ca = TestCa::new("upstream.test");
    let tls = TlsEcho::start(tls_ca.mint_server_cert(&["localhost"]))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let w = World::start_with(
        &policy(tls.addr.port(), http.addr.port()),
        GatewayOptions {
            otlp_endpoint: endpoint,
            otlp_protocol: protocol.map(str::to_string),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (w, tls, http)
}

/// Where the spans went: our gRPC receiver, or the Python OTLP/HTTP one.
enum Collector<'a> {
    Grpc(&'a OtlpReceiver),
    Http(&'a HttpOtlpReceiver),
}

impl Collector<'_> {
    async fn wait_for_spans(&self, n: usize) -> Vec<CapturedSpan> {
        match self {
            Collector::Grpc(c) => c.wait_for_spans(n).await,
            Collector::Http(c) => c.wait_for_spans(n).await,
        }
    }

    fn spans(&self) -> Vec<CapturedSpan> {
        match self {
            Collector::Grpc(c) => c.spans(),
            Collector::Http(c) => c.spans(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_exactly_one_span_and_one_audit_line_with_the_same_ids() {
    let otlp = OtlpReceiver::start().await.unwrap();
    let (w, tls, http) = start(Some(&otlp)).await;
    one_span_per_request(w, tls, http, Collector::Grpc(&otlp)).await;
}

/// `telemetry.otlp_protocol: http/protobuf`, received by a collector that is not ours
/// (the official `opentelemetry-proto` Python messages decode what arrives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_reaches_an_independent_collector_one_span_per_request() {
    let Some(otlp) = HttpOtlpReceiver::start(200).await.unwrap() else {
        return;
    };
    let (w, tls, http) = start_exporting(Some(otlp.endpoint()), Some("http/protobuf")).await;
    one_span_per_request(w, tls, http, Collector::Http(&otlp)).await;
}

/// Six requests (tunnels and forwarded, allowed and denied, one malformed, one failed by
/// its upstream): each has one audit line and one span at the collector, with the same
/// IDs, and each span is counted as exported.
async fn one_span_per_request(w: World, tls: TlsEcho, http: HttpEcho, collector: Collector<'_>) {
    let agent = w.agent(RESEARCH).unwrap();
    let traceparent = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    let tp: &[(&str, &str)] = &[("traceparent", traceparent.as_str())];

    // Allowed tunnel (with the agent's trace context), closed right away.
    let t = agent
        .connect_tunnel(&format!("localhost:{}", tls.addr.port()), tp)
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    drop(t);
    // Denied tunnel.
    let t = agent.connect_tunnel("pastebin.com:443", &[]).await.unwrap();
    assert_eq!(t.status, 403);
    // Allowed forwarded request (with the agent's trace context).
    let url = format!("http://localhost:{}/traced", http.addr.port());
    let r = agent.request("GET", &url, tp, Vec::new()).await.unwrap();
    assert_eq!(r.status, 200);
    // Denied forwarded request (method).
    let r = agent.request("POST", &url, &[], Vec::new()).await.unwrap();
    assert_eq!(r.status, 403);
    // Malformed request.
    let r = agent
        .request("GET", "http://0x7f.1/", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    // Allowed, but the upstream speaks TLS to a plain-HTTP request: the gateway fails it.
    let r = agent
        .request(
            "GET",
            &format!("http://localhost:{}/plain", tls.addr.port()),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 502);

    let lines = w.gateway.wait_for_audit(6).await;
    assert_eq!(lines.len(), 6, "{lines:#?}");
    w.gateway.gateway().telemetry().flush().await;
    let spans = collector.wait_for_spans(6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spans_after = collector.spans();
    assert_eq!(
        spans_after.len(),
        6,
        "exactly one span per request: {spans_after:#?}"
    );
    let m = w.gateway.metrics().await.unwrap();
    assert_eq!(
        metric_value(&m, "egress_otlp_spans_exported_total", &[]),
        Some(6.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "egress_otlp_spans_dropped_total", &[]),
        Some(0.0),
        "{m}"
    );

    for line in &lines {
        let trace_id = line["trace_id"].as_str().unwrap();
        let span_id = line["span_id"].as_str().unwrap();
        let matching: Vec<_> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id && s.span_id == span_id)
            .collect();
        assert_eq!(matching.len(), 1, "audit line {line} has no single span");
        let span = matching[0];
        assert_eq!(span.str("spiffe.peer_id"), Some(RESEARCH));
        assert_eq!(span.str("egress.decision"), line["decision"].as_str());
        assert_eq!(
            span.str("egress.pathway").unwrap_or_default(),
            line["pathway"].as_str().unwrap_or_default()
        );
        assert_eq!(
            span.str("egress.rule").unwrap_or_default(),
            line["rule"].as_str().unwrap_or_default()
        );
        assert_eq!(
            span.int("http.response.status_code"),
            line["status"].as_i64()
        );
        assert_eq!(span.int("egress.bytes_sent"), line["bytes_sent"].as_i64());
        assert_eq!(
            span.int("egress.bytes_received"),
            line["bytes_received"].as_i64()
        );
        assert_eq!(span.str("http.request.method"), line["method"].as_str());
        // Only what failed on the gateway's side (5xx) is an error span, with the
        // audit line's error as its message; a denial is the gateway working.
        if line["status"].as_i64() == Some(502) {
            assert_eq!(span.status_code, 2, "{span:#?}");
            assert_eq!(
                Some(span.status_message.as_str()),
                line["error"].as_str(),
                "{line}"
            );
            assert_eq!(span.str("error.type"), line["error"].as_str(), "{line}");
        } else {
            assert_eq!(span.status_code, 0, "{span:#?}");
        }
        assert_eq!(span.service_name.as_deref(), Some("egress-gateway"));
        // HTTP semantic conventions: the agent's IP and port apart, the destination
        // as `server.*`, the address connected to as `network.peer.address`.
        let agent_addr: std::net::SocketAddr =
            line["source_address"].as_str().unwrap().parse().unwrap();
        assert_eq!(span.str("client.address"), Some("127.0.0.1"), "{line}");
        assert_eq!(
            span.int("client.port"),
            Some(i64::from(agent_addr.port())),
            "{line}"
        );
        assert_eq!(span.str("server.address"), line["host"].as_str(), "{line}");
        assert_eq!(span.int("server.port"), line["port"].as_i64(), "{line}");
        assert_eq!(
            span.str("network.peer.address"),
            line["resolved_ip"].as_str(),
            "{line}"
        );
    }

    // The agent's traceparent is the parent of the gateway's span...
    let children: Vec<_> = spans.iter().filter(|s| s.trace_id == AGENT_TRACE).collect();
    assert_eq!(children.len(), 2, "{spans:#?}");
    assert!(children.iter().all(|s| s.parent_span_id == AGENT_SPAN));
    // ...and requests without one start a new trace.
    let roots = spans.iter().filter(|s| s.parent_span_id.is_empty()).count();
    assert_eq!(roots, 4);

    // The gateway's span is the upstream's parent.
    let forwarded = children.iter().find(|s| s.name == "GET").unwrap();
    let seen = http.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("traceparent"),
        Some(format!("00-{AGENT_TRACE}-{}-01", forwarded.span_id).as_str())
    );
    assert_eq!(forwarded.str("url.full"), Some(url.as_str()));
    w.shutdown().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_labels_stay_bounded() {
    let (w, tls, http) = start(None).await;
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{}/m", http.addr.port());

    let before = w.gateway.metrics().await.unwrap();
    assert_eq!(
        metric_value(
            &before,
            "egress_requests_total",
            &[("pathway", "local-http")]
        ),
        None
    );
    for _ in 0..3 {
        assert_eq!(
            agent
                .request("GET", &url, &[], Vec::new())
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(
        agent
            .connect_tunnel("pastebin.com:443", &[])
            .await
            .unwrap()
            .status,
        403
    );
    // A tunnel held open shows in the gauge.
    let open = agent
        .connect_tunnel(&format!("localhost:{}", tls.addr.port()), &[])
        .await
        .unwrap();
    assert_eq!(open.status, 200);
    // A refused handshake: an agent of a trust domain the policy does not accept.
    let foreign = TestCa::new("evil.org");
    let stranger = test_harness::agent::AgentClient::new(
        &foreign.mint_svid("spiffe://evil.org/sa/x"),
        &w.roots(),
        w.gateway.proxy_addr(),
    )
    .unwrap();
    assert!(stranger
        .request("GET", &url, &[], Vec::new())
        .await
        .is_err());
    w.gateway.wait_for_audit(4).await;

    let m = w.gateway.metrics().await.unwrap();
    let allowed = [
        ("kind", "http"),
        ("decision", "allow"),
        ("agent", "research-agent"),
        ("pathway", "local-http"),
    ];
    assert_eq!(
        metric_value(&m, "egress_requests_total", &allowed),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "egress_requests_total",
            &[("decision", "deny"), ("rule", "no-paste-sites")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "egress_transferred_bytes_total",
            &[("direction", "received"), ("pathway", "local-http")]
        )
        .unwrap()
            > 0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "egress_active_tunnels", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "egress_handshake_failures_total",
            &[("reason", "trust_domain_not_accepted")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "egress_request_duration_seconds_count",
            &[("kind", "http")]
        )
        .expect(&m)
            >= 3.0,
        "{m}"
    );
    let expiry = metric_value(&m, "egress_svid_expiry_timestamp_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "SVID expiry {expiry} is not in the future");
    // Bounded labels: no SPIFFE IDs, hosts or addresses.
    for forbidden in [
        "spiffe://",
        "pastebin",
        "localhost",
        "127.0.0.1",
        "evil.org",
    ] {
        assert!(
            !m.contains(forbidden),
            "/metrics mentions {forbidden}:\n{m}"
        );
    }
    drop(open);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_does_not_affect_traffic() {
    let mut otlp = OtlpReceiver::start().await.unwrap();
    let (w, _tls, http) = start(Some(&otlp)).await;
    otlp.kill().await;
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{}/while-collector-down", http.addr.port());
    let mut session = agent.session().await.unwrap();
    for _ in 0..50 {
        let r = session.request("GET", &url, &[], Vec::new()).await.unwrap();
        assert_eq!(r.status, 200);
    }
    assert_eq!(w.gateway.wait_for_audit(50).await.len(), 50);
    // The lost spans are counted.
    w.gateway.gateway().telemetry().flush().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = w.gateway.metrics().await.unwrap();
        let dropped = metric_value(&m, "egress_otlp_spans_dropped_total", &[]).unwrap_or(0.0);
        if dropped >= 50.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped spans not counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_refusing_collector_does_not_delay_traffic() {
    let otlp = OtlpReceiver::start().await.unwrap();
    let (w, _tls, http) = start(Some(&otlp)).await;
    let agent = w.agent(RESEARCH).unwrap();
    let mut session = agent.session().await.unwrap();
    let mut sent = 0;
    for behaviour in [Behaviour::Stall, Behaviour::Refuse] {
        otlp.set_behaviour(behaviour);
        let url = format!("http://localhost:{}/{behaviour:?}", http.addr.port());
        for _ in 0..30 {
            // The exporter's own timeout is 3 s; a request that waited on it would
            // take at least that long.
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                session.request("GET", &url, &[], Vec::new()),
            )
            .await
            .unwrap_or_else(|_| panic!("a request waited on a collector that does {behaviour:?}"))
            .unwrap();
            assert_eq!(r.status, 200);
            sent += 1;
        }
        // Let the batch go out (and fail) before the next behaviour.
        w.gateway.gateway().telemetry().flush().await;
    }
    assert_eq!(w.gateway.wait_for_audit(sent).await.len(), sent);
    let m = w.gateway.metrics().await.unwrap();
    assert!(
        metric_value(&m, "egress_otlp_spans_dropped_total", &[]).unwrap_or(0.0) >= 1.0,
        "failed exports are counted:\n{m}"
    );

    // The collector recovers: new spans arrive again, without a restart.
    otlp.set_behaviour(Behaviour::Accept);
    let url = format!("http://localhost:{}/recovered", http.addr.port());
    assert_eq!(
        session
            .request("GET", &url, &[], Vec::new())
            .await
            .unwrap()
            .status,
        200
    );
    w.gateway.gateway().telemetry().flush().await;
    let spans = otlp.wait_for_spans(1).await;
    assert!(
        spans.iter().any(|s| s.attributes.values().any(
            |v| matches!(v, test_harness::otlp::AttrValue::Str(p) if p.contains("/recovered"))
        )),
        "{spans:?}"
    );
    w.shutdown().await;
}

/// Over `http/protobuf`, a collector that answers 503 and then one that is gone cost
/// spans, never requests, and every lost span is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_spans_lost_to_a_refusing_or_dead_collector_are_counted() {
    let Some(mut otlp) = HttpOtlpReceiver::start(503).await.unwrap() else {
        return;
    };
    let (w, _tls, http) = start_exporting(Some(otlp.endpoint()), Some("http/protobuf")).await;
    let agent = w.agent(RESEARCH).unwrap();
    let mut session = agent.session().await.unwrap();
    let mut sent = 0;
    for phase in ["refusing", "dead"] {
        if phase == "dead" {
            otlp.kill().await;
        }
        let url = format!("http://localhost:{}/{phase}", http.addr.port());
        for _ in 0..20 {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                session.request("GET", &url, &[], Vec::new()),
            )
            .await
            .unwrap_or_else(|_| panic!("a request waited on a {phase} collector"))
            .unwrap();
            assert_eq!(r.status, 200);
            sent += 1;
        }
        assert_eq!(w.gateway.wait_for_audit(sent).await.len(), sent);
        w.gateway.gateway().telemetry().flush().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = w.gateway.metrics().await.unwrap();
            let dropped = metric_value(&m, "egress_otlp_spans_dropped_total", &[]);
            if dropped == Some(sent as f64) {
                assert_eq!(
                    metric_value(&m, "egress_otlp_spans_exported_total", &[]),
                    Some(0.0),
                    "{m}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{phase}: {sent} spans lost, counted {dropped:?}:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        otlp.spans().is_empty(),
        "a refusing collector records nothing"
    );
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_tells_the_truth_about_the_svid() {
    let (w, _tls, _http) = start(None).await;
    let admin = w.gateway.admin_addr();
    assert_eq!(admin_get(admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(admin_get(admin, "/readyz").await.unwrap().0, 200);

    // The Workload API hands out an SVID that expires in two seconds and then goes
    // quiet (as if the agent were stuck): the gateway stays live but not ready.
    let short = w.ca.mint(SvidOptions {
        spiffe_id: Some(GATEWAY_ID.into()),
        ttl: Some(Duration::from_secs(2)),
        ..Default::default()
    });
    let short_cert = short.cert_chain[0].clone();
    w.api.update(WorkloadIdentity {
        svids: vec![short],
        bundle: vec![w.ca.root_cert()],
        federated_bundles: vec![],
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while w
        .gateway
        .gateway()
        .identity()
        .current()
        .unwrap()
        .certified_key
        .cert[0]
        != short_cert
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = admin_get(admin, "/readyz").await.unwrap();
        if status == 503 {
            assert!(body.contains("expired"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became unready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(admin_get(admin, "/healthz").await.unwrap().0, 200);

    // A fresh SVID makes it ready again, without a restart.
    w.api.update(gateway_identity(&w.ca));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while admin_get(admin, "/readyz").await.unwrap().0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_consumption_is_exported_per_agent_and_pathway() {
    let http = HttpEcho::start().await.unwrap();
    let policy = format!(
        r#"version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: metered
        destinations: ["localhost:{}"]
        allow_cidrs: [127.0.0.0/8, "::1/128"]
        limits:
          bytes_per_hour: 100000
          max_concurrent: 4
"#,
        http.addr.port()
    );
    let w = World::start(&policy).await.unwrap();
    let agent = w.agent(RESEARCH).unwrap();
    let url = format!("http://localhost:{}/metered", http.addr.port());
    let r = agent
        .request("POST", &url, &[], vec![b'x'; 500])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    w.gateway.wait_for_audit(1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let labels = [
        ("agent", "research-agent"),
        ("pathway", "metered"),
        ("limit", "bytes_per_hour"),
    ];
    loop {
        let m = w.gateway.metrics().await.unwrap();
        let used = metric_value(&m, "egress_limit_used", &labels).unwrap_or(0.0);
        if used >= 500.0 {
            assert_eq!(
                metric_value(&m, "egress_limit_max", &labels),
                Some(100000.0),
                "{m}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumption not exported:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.shutdown().await;
}
