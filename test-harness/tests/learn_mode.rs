//! Learn mode end to end: run the gateway in audit mode, send traffic, run
//! `policy suggest` on the real audit log, enforce the suggestion, and show the same
//! traffic allowed and anything else still denied.

use std::sync::Arc;

use egress_gateway::cli::suggest::{run as suggest, ModeArg, SuggestArgs};
use test_harness::ca::TestCa;
use test_harness::gateway::{GatewayOptions, World};
use test_harness::resolver::StaticResolver;
use test_harness::upstream::{HttpEcho, TlsEcho};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const CODING: &str = "spiffe://example.org/ns/ai-workloads/sa/coding-agent";

fn audit_policy(http_port: u16) -> String {
    format!(
        r#"version: 1
trust_domains: [example.org]
mode: audit
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
agents:
  - name: research-agent
    id: {RESEARCH}
    pathways:
      - name: docs-read
        destinations: ["docs.internal.test:{http_port}"]
        methods: [GET]
"#
    )
}

fn resolver() -> Arc<StaticResolver> {
    Arc::new(
        StaticResolver::new()
            .with("docs.internal.test", &["127.0.0.1"])
            .with("api.internal.test", &["127.0.0.1"])
            .with("site.internal.test", &["127.0.0.1"])
            .with("other.internal.test", &["127.0.0.1"])
            .with("pastebin.com", &["127.0.0.1"]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_then_suggest_then_enforce() {
    let site_ca = TestCa::new("site.test");
    let site = TlsEcho::start(site_ca.mint_server_cert(&["site.internal.test"]))
        .await
        .unwrap();
    let http = HttpEcho::start().await.unwrap();
    let (hp, tp) = (http.addr.port(), site.addr.port());
    // The test's upstreams live on loopback, which the address guard blocks: the
    // gateway-wide allow_cidrs opens it, as an operator would for a dev cluster.
    let opts = || GatewayOptions {
        resolver: Some(resolver()),
        extra_config: "allow_cidrs: [127.0.0.0/8]\n".into(),
        ..Default::default()
    };

    // 1. Audit mode: denials are logged, not enforced.
    let w = World::start_with(&audit_policy(hp), opts()).await.unwrap();
    let research = w.agent(RESEARCH).unwrap();
    let coding = w.agent(CODING).unwrap();
    let post = format!("http://api.internal.test:{hp}/v1/items");
    // Not on research-agent's pathways: let through by audit mode.
    for _ in 0..2 {
        let r = research
            .request("POST", &post, &[], b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let get = format!("http://docs.internal.test:{hp}/guide");
    assert_eq!(
        research
            .request("GET", &get, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    let t = coding
        .connect_tunnel(&format!("site.internal.test:{tp}"), &[])
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    drop(t);
    // A deny rule in audit mode: logged as a denial, not enforced.
    let paste = research
        .connect_tunnel("pastebin.com:443", &[])
        .await
        .unwrap();
    drop(paste);
    let lines = w.gateway.wait_for_audit(5).await;
    assert_eq!(lines.len(), 5);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["decision"] == "deny" && l["enforced"] == false)
            .count(),
        4,
        "{lines:#?}"
    );
    let audit_text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let policy_path = w.gateway.policy_path().to_path_buf();
    let current_policy = std::fs::read_to_string(&policy_path).unwrap();
    w.shutdown().await;

    // 2. Suggest from the real audit log.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    std::fs::write(&log, &audit_text).unwrap();
    let current = dir.path().join("policy.yaml");
    std::fs::write(&current, &current_policy).unwrap();
    let out = dir.path().join("suggested");
    std::fs::create_dir_all(&out).unwrap();
    let _ = suggest(SuggestArgs {
        logs: vec![log],
        policy: Some(current),
        out: out.clone(),
        min_count: 1,
        wildcard_min: 3,
        since: None,
        mode: Some(ModeArg::Enforce),
        parse_only: false,
    });
    let suggested =
        std::fs::read_to_string(out.join("suggested-policy.yaml")).expect("suggest wrote a policy");
    let tests =
        std::fs::read_to_string(out.join("suggested-tests.yaml")).expect("suggest wrote tests");
    let policy = egress_policy::Policy::from_yaml_str(&suggested, "suggested-policy.yaml")
        .unwrap_or_else(|e| panic!("suggested policy does not load: {e}\n{suggested}"));
    assert_eq!(policy.mode(), egress_policy::Mode::Enforce);
    let cases = egress_policy::testing::parse_tests(&tests, "suggested-tests.yaml").unwrap();
    let report = egress_policy::testing::run_tests(&policy, &cases);
    assert_eq!(
        report.failed(),
        0,
        "suggested tests fail:\n{suggested}\n{tests}"
    );
    // The deny rule and the blocked address are not widened.
    assert!(!suggested.contains("pastebin.com:"), "{suggested}");

    assert!(
        suggested.contains(&format!("api.internal.test:{hp}")),
        "{suggested}"
    );
    assert!(
        suggested.contains(&format!("site.internal.test:{tp}")),
        "{suggested}"
    );

    // 3. Enforce the suggestion as written: what was seen is now allowed...
    let reviewed = suggested;
    let w = World::start_with(&reviewed, opts()).await.unwrap();
    let research = w.agent(RESEARCH).unwrap();
    let coding = w.agent(CODING).unwrap();
    let r = research
        .request("POST", &post, &[], b"{}".to_vec())
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{reviewed}\n{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        research
            .request("GET", &get, &[], vec![])
            .await
            .unwrap()
            .status,
        200
    );
    let t = coding
        .connect_tunnel(&format!("site.internal.test:{tp}"), &[])
        .await
        .unwrap();
    assert_eq!(t.status, 200, "{reviewed}");
    drop(t);
    // ...and anything else is still denied.
    let r = research
        .request("DELETE", &post, &[], vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = coding.request("POST", &post, &[], vec![]).await.unwrap();
    assert_eq!(r.status, 403);
    let r = research
        .request(
            "GET",
            &format!("http://other.internal.test:{hp}/"),
            &[],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        research
            .connect_tunnel("pastebin.com:443", &[])
            .await
            .unwrap()
            .status,
        403
    );
    let lines = w.gateway.wait_for_audit(7).await;
    assert!(lines.iter().all(|l| l["enforced"] == true));
    w.shutdown().await;
}
