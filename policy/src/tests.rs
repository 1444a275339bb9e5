//! Semantics of loading and evaluation, including the traps.

use std::time::SystemTime;

use crate::*;

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";

const BASE: &str = r#"
version: 1
trust_domains: [example.org]
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
  - name: shadow-gists
    action: deny
    when: 'request.host == "gist.github.com"'
    dry_run: true
agents:
  - name: research-agent
    id: spiffe://example.org/ns/ai-workloads/sa/research-agent
    pathways:
      - name: wikipedia
        destinations: ["*.wikipedia.org:443", "wikipedia.org:443"]
      - name: github
        destinations: ["gist.github.com:443", "pastebin.com:443", "bücher.example:443"]
      - name: openai
        destinations: ["api.openai.com:443"]
        methods: [post]
        models: [gpt-4o-mini, "gpt-4.1*"]
        when: 'request.path.startsWith("/v1/chat/")'
        upstream:
          tls: true
          inject_headers:
            Authorization: { secret_file: /run/secrets/openai, prefix: "Bearer " }
        limits: { requests_per_minute: 60, llm_tokens_per_hour: 200000 }
      - name: header-gated
        destinations: ["api.internal.example:8080"]
        methods: [GET]
        when: 'request.headers["x-team"] == "research"'
  - name: any-sa-in-ai
    id: spiffe://example.org/ns/ai-workloads/sa/*
    pathways:
      - name: docs
        destinations: ["docs.example.com:443"]
  - name: whole-namespace
    id: spiffe://example.org/ns/ai-workloads/**
    pathways:
      - name: status
        destinations: ["status.example.com:*"]
        methods: [GET, CONNECT]
"#;

fn policy(yaml: &str) -> Policy {
    Policy::from_yaml_str(yaml, "policy.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn err(yaml: &str) -> String {
    Policy::from_yaml_str(yaml, "policy.yaml")
        .unwrap_err()
        .to_string()
}

struct R {
    id: SpiffeId,
    kind: RequestKind,
    method: String,
    host: String,
    port: u16,
    path: String,
    headers: Vec<(String, String)>,
    model: Option<String>,
}

fn connect(id: &str, host: &str, port: u16) -> R {
    R {
        id: id.parse().unwrap(),
        kind: RequestKind::Connect,
        method: "CONNECT".into(),
        host: host.into(),
        port,
        path: String::new(),
        headers: vec![],
        model: None,
    }
}

fn http(id: &str, method: &str, host: &str, port: u16, path: &str) -> R {
    R {
        kind: RequestKind::Http,
        method: method.into(),
        path: path.into(),
        ..connect(id, host, port)
    }
}

impl R {
    fn header(mut self, k: &str, v: &str) -> R {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn model(mut self, m: &str) -> R {
        self.model = Some(m.into());
        self
    }
    fn eval(&self, p: &Policy) -> Decision {
        let req = Request {
            source: &self.id,
            source_address: Some("10.1.2.3:45678".parse().unwrap()),
            kind: self.kind,
            method: &self.method,
            host: &self.host,
            port: self.port,
            path: &self.path,
            query: "",
            headers: &HeaderView::new(self.headers.iter().map(|(k, v)| (k, v))),
            llm_model: self.model.as_deref(),
            now: SystemTime::now(),
        };
        let d = p.evaluate(&req);
        // explain must reach the same verdict through its exhaustive path
        let e = p.explain(&req);
        assert_eq!(e.decision.allowed, d.allowed);
        assert_eq!(e.decision.reason, d.reason);
        assert_eq!(e.decision.pathway_name(), d.pathway_name());
        d
    }
}

fn allowed_by(d: &Decision) -> Option<&str> {
    assert!(d.allowed, "denied: {} ({:?})", d.reason, d.rule);
    d.pathway_name()
}

#[test]
fn wildcard_subdomain_apex_and_lookalikes() {
    let p = policy(BASE);
    assert_eq!(
        allowed_by(&connect(RESEARCH, "en.wikipedia.org", 443).eval(&p)),
        Some("wikipedia")
    );
    assert_eq!(
        allowed_by(&connect(RESEARCH, "a.b.wikipedia.org", 443).eval(&p)),
        Some("wikipedia")
    );
    assert_eq!(
        allowed_by(&connect(RESEARCH, "wikipedia.org", 443).eval(&p)),
        Some("wikipedia")
    );
    let look = connect(RESEARCH, "evilwikipedia.org", 443).eval(&p);
    assert!(!look.allowed);
    assert_eq!(look.reason, Reason::NoMatchingPathway);
    assert!(
        !connect(RESEARCH, "wikipedia.org.evil.com", 443)
            .eval(&p)
            .allowed
    );
    assert!(!connect(RESEARCH, "en.wikipedia.org", 80).eval(&p).allowed);

    // apex only without the explicit apex entry
    let only_wild = policy(
        r#"
version: 1
trust_domains: [example.org]
agents:
  - name: a
    id: spiffe://example.org/a
    pathways:
      - name: w
        destinations: ["*.wikipedia.org:443"]
"#,
    );
    assert!(
        !connect("spiffe://example.org/a", "wikipedia.org", 443)
            .eval(&only_wild)
            .allowed
    );
    assert!(
        connect("spiffe://example.org/a", "en.wikipedia.org", 443)
            .eval(&only_wild)
            .allowed
    );
}

#[test]
fn case_trailing_dot_and_idn() {
    let p = policy(BASE);
    assert!(connect(RESEARCH, "EN.WikiPedia.ORG.", 443).eval(&p).allowed);
    assert!(connect(RESEARCH, "Wikipedia.org.", 443).eval(&p).allowed);
    assert_eq!(
        allowed_by(&connect(RESEARCH, "BÜCHER.example", 443).eval(&p)),
        Some("github")
    );
    assert_eq!(
        allowed_by(&connect(RESEARCH, "xn--bcher-kva.example.", 443).eval(&p)),
        Some("github")
    );
}

#[test]
fn deny_rules_come_first_and_dry_run_does_not_enforce() {
    let p = policy(BASE);
    let d = connect(RESEARCH, "pastebin.com", 443).eval(&p);
    assert!(!d.allowed && d.enforced && !d.permits());
    assert_eq!(d.rule.as_deref(), Some("no-paste-sites"));
    assert_eq!(d.reason, Reason::DeniedByRule);
    assert_eq!(d.agent.as_deref(), Some("research-agent"));
    assert!(d.pathway.is_none());

    let d = connect(RESEARCH, "gist.github.com", 443).eval(&p);
    assert!(d.allowed, "dry run must not deny");
    assert_eq!(d.dry_run_rules, ["shadow-gists"]);
    assert_eq!(d.rule.as_deref(), Some("shadow-gists"));
    assert_eq!(d.pathway_name(), Some("github"));
}

#[test]
fn cel_error_in_deny_rule_denies_but_in_when_is_no_match() {
    let p = policy(
        r#"
version: 1
trust_domains: [example.org]
rules:
  - name: needs-header
    action: deny
    when: 'request.headers["x-block"] == "yes"'
agents:
  - name: a
    id: spiffe://example.org/a
    pathways:
      - name: gated
        destinations: ["x.example:443"]
        when: 'request.headers["x-team"] == "research"'
      - name: open
        destinations: ["y.example:443"]
"#,
    );
    let a = "spiffe://example.org/a";
    // no x-block header: the deny rule errors -> deny
    let d = http(a, "GET", "y.example", 443, "/").eval(&p);
    assert!(!d.allowed);
    assert!(matches!(d.reason, Reason::DenyRuleError), "{:?}", d.reason);
    assert_eq!(d.rule.as_deref(), Some("needs-header"));

    let d = http(a, "GET", "y.example", 443, "/")
        .header("x-block", "no")
        .eval(&p);
    assert_eq!(allowed_by(&d), Some("open"));
    // `when` errors (missing header): non-match, not an allow
    let d = http(a, "GET", "x.example", 443, "/")
        .header("x-block", "no")
        .eval(&p);
    assert!(!d.allowed);
    assert!(
        matches!(d.reason, Reason::ConditionError { .. }),
        "{:?}",
        d.reason
    );
    let d = http(a, "GET", "x.example", 443, "/")
        .header("x-block", "no")
        .header("x-team", "research")
        .eval(&p);
    assert_eq!(allowed_by(&d), Some("gated"));
    let d = http(a, "GET", "x.example", 443, "/")
        .header("x-block", "no")
        .header("x-team", "other")
        .eval(&p);
    assert_eq!(d.reason, Reason::ConditionNotMet);
}

#[test]
fn repeated_headers_are_joined() {
    let p = policy(BASE);
    let d = http(RESEARCH, "GET", "api.internal.example", 8080, "/")
        .header("x-team", "research")
        .header("x-team", "other")
        .eval(&p);
    assert_eq!(
        d.reason,
        Reason::ConditionNotMet,
        "joined value is \"research, other\""
    );
}

#[test]
fn header_values_that_are_not_utf8_are_still_seen() {
    let p = policy(
        "version: 1\ntrust_domains: [example.org]\nrules:\n  - {name: no-exfil, action: deny, when: '\"x-exfil\" in request.headers'}\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - {name: p, destinations: [\"example.com:80\"]}\n",
    );
    let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
    let headers = HeaderView::new([(&b"X-Exfil"[..], &b"caf\xe9"[..])]);
    let d = p.evaluate(&Request {
        source: &id,
        source_address: None,
        kind: RequestKind::Http,
        method: "GET",
        host: "example.com",
        port: 80,
        path: "/",
        query: "",
        headers: &headers,
        llm_model: None,
        now: SystemTime::now(),
    });
    assert_eq!(d.rule.as_deref(), Some("no-exfil"));
}

#[test]
fn pathway_response_timeout() {
    let yaml = |t: &str| {
        format!(
            "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: llm\n        destinations: [\"api.example.com:443\"]\n        upstream: {{ tls: true }}\n        timeouts: {{ response: {t} }}\n"
        )
    };
    let p = policy(&yaml("5m"));
    let llm = p.pathways().find(|pw| pw.name == "llm").unwrap();
    assert_eq!(
        llm.timeouts.response,
        Some(std::time::Duration::from_secs(300))
    );
    let e = err(&yaml("soon"));
    assert!(e.contains("timeouts.response") && e.contains("soon"), "{e}");
    assert!(err(&yaml("0s")).contains("longer than zero"));
    assert!(err(&yaml("1s, connect: 2s")).contains("connect"));
}

#[test]
fn methods_and_tunnels() {
    let p = policy(BASE);
    // `methods: [GET]` has no CONNECT: no tunnel
    let d = connect(RESEARCH, "api.internal.example", 8080).eval(&p);
    assert_eq!(d.reason, Reason::MethodNotAllowed);
    // case-insensitive method
    let d = http(RESEARCH, "get", "api.internal.example", 8080, "/")
        .header("x-team", "research")
        .eval(&p);
    assert_eq!(allowed_by(&d), Some("header-gated"));
    let d = http(RESEARCH, "DELETE", "api.internal.example", 8080, "/").eval(&p);
    assert_eq!(d.reason, Reason::MethodNotAllowed);
    // an L7 pathway's destination is intercepted even when a broader L4 pathway
    // earlier in the file would tunnel it
    let broad = policy(&BASE.replace(
        "    pathways:\n",
        "    pathways:\n      - name: any-tls\n        destinations: [\"*:443\"]\n",
    ));
    let d = connect(RESEARCH, "api.openai.com", 443).eval(&broad);
    assert_eq!(
        (d.reason.clone(), allowed_by(&d)),
        (Reason::Intercepted, Some("openai"))
    );
    assert_eq!(
        allowed_by(&connect(RESEARCH, "example.net", 443).eval(&broad)),
        Some("any-tls")
    );
    // a tunnel to an L7 pathway's destination is intercepted, whatever its methods
    // and `when` say: the requests inside are decided one by one
    let d = connect(RESEARCH, "api.openai.com", 443).eval(&p);
    assert!(d.allowed);
    assert_eq!(d.reason, Reason::Intercepted);
    assert!(d.pathway.as_ref().is_some_and(|p| p.is_l7()));
    // no methods on an L4 pathway: plain HTTP and tunnels both fine
    assert!(
        http(RESEARCH, "GET", "en.wikipedia.org", 443, "/")
            .eval(&p)
            .allowed
    );
    // explicit CONNECT in the list
    assert_eq!(
        allowed_by(&connect(RESEARCH, "status.example.com", 9999).eval(&p)),
        Some("status")
    );
}

#[test]
fn models_and_l7_settings() {
    let p = policy(BASE);
    let ok = http(
        RESEARCH,
        "POST",
        "api.openai.com",
        443,
        "/v1/chat/completions",
    )
    .model("gpt-4.1-mini");
    let d = ok.eval(&p);
    let pw = d.pathway.clone().unwrap();
    assert_eq!(pw.name, "openai");
    assert_eq!(pw.agent, "research-agent");
    assert!(pw.is_l7());
    let up = pw.upstream.as_ref().unwrap();
    assert!(up.tls);
    assert_eq!(up.inject_headers[0].0, "authorization");
    assert_eq!(up.inject_headers[0].1.prefix, "Bearer ");
    assert_eq!(pw.limits.requests_per_minute, Some(60));
    assert_eq!(pw.limits.llm_tokens_per_hour, Some(200000));

    assert!(
        http(RESEARCH, "POST", "api.openai.com", 443, "/v1/chat/x")
            .model("gpt-4o-mini")
            .eval(&p)
            .allowed
    );
    let d = http(RESEARCH, "POST", "api.openai.com", 443, "/v1/chat/x")
        .model("gpt-4o")
        .eval(&p);
    assert_eq!(
        d.reason,
        Reason::ModelNotAllowed {
            model: Some("gpt-4o".into())
        }
    );
    assert!(d.reason.to_string().contains("gpt-4o"));
    let d = http(RESEARCH, "POST", "api.openai.com", 443, "/v1/chat/x").eval(&p);
    assert_eq!(d.reason, Reason::ModelNotAllowed { model: None });
    let d = http(RESEARCH, "POST", "api.openai.com", 443, "/v1/embeddings")
        .model("gpt-4o-mini")
        .eval(&p);
    assert_eq!(d.reason, Reason::ConditionNotMet);
}

#[test]
fn llm_model_only_visible_to_pathways_with_models() {
    let p = policy(
        r#"
version: 1
trust_domains: [example.org]
agents:
  - name: a
    id: spiffe://example.org/a
    pathways:
      - name: no-models
        destinations: ["x.example:443"]
        when: 'has(request.llm)'
        upstream: { tls: true }
      - name: with-models
        destinations: ["y.example:443"]
        models: ["m*"]
        when: 'request.llm.model == "m1"'
        upstream: { tls: true }
"#,
    );
    let a = "spiffe://example.org/a";
    assert_eq!(
        http(a, "POST", "x.example", 443, "/")
            .model("m1")
            .eval(&p)
            .reason,
        Reason::ConditionNotMet
    );
    assert!(
        http(a, "POST", "y.example", 443, "/")
            .model("m1")
            .eval(&p)
            .allowed
    );
    assert_eq!(
        http(a, "POST", "y.example", 443, "/")
            .model("m2")
            .eval(&p)
            .reason,
        Reason::ConditionNotMet
    );
}

#[test]
fn id_patterns_and_agent_order() {
    let p = policy(BASE);
    // research-agent matches all three entries; pathways are tried in file order
    assert_eq!(
        allowed_by(&connect(RESEARCH, "docs.example.com", 443).eval(&p)),
        Some("docs")
    );
    let d = connect(RESEARCH, "docs.example.com", 443).eval(&p);
    assert_eq!(d.agent.as_deref(), Some("any-sa-in-ai"));
    // `*` is one segment: a deeper path only matches `**`
    let deep = "spiffe://example.org/ns/ai-workloads/sa/x/extra";
    assert!(!connect(deep, "docs.example.com", 443).eval(&p).allowed);
    assert_eq!(
        allowed_by(&connect(deep, "status.example.com", 443).eval(&p)),
        Some("status")
    );
    // unknown identity
    let d = connect(
        "spiffe://example.org/ns/other/sa/x",
        "en.wikipedia.org",
        443,
    )
    .eval(&p);
    assert_eq!(d.reason, Reason::NoMatchingAgent);
    assert!(d.agent.is_none());
    // foreign trust domain, even with a matching-looking path
    let d = connect(
        "spiffe://evil.org/ns/ai-workloads/sa/research-agent",
        "en.wikipedia.org",
        443,
    )
    .eval(&p);
    assert_eq!(d.reason, Reason::UntrustedTrustDomain);
}

#[test]
fn audit_mode_computes_but_does_not_enforce() {
    let yaml = BASE.replace(
        "trust_domains: [example.org]",
        "trust_domains: [example.org]\nmode: audit",
    );
    let p = policy(&yaml);
    assert_eq!(p.mode(), Mode::Audit);
    let d = connect(RESEARCH, "example.net", 443).eval(&p);
    assert!(!d.allowed && !d.enforced && d.permits());
    assert_eq!(d.reason, Reason::NoMatchingPathway);
    // denied by rule, but the pathway that would allow is carried along
    let d = connect(RESEARCH, "pastebin.com", 443).eval(&p);
    assert!(!d.allowed && !d.enforced && d.permits());
    assert_eq!(d.rule.as_deref(), Some("no-paste-sites"));
    assert_eq!(d.pathway_name(), Some("github"));
    // allowed stays allowed and enforced
    let d = connect(RESEARCH, "en.wikipedia.org", 443).eval(&p);
    assert!(d.allowed && d.enforced);
}

#[test]
fn empty_policy_denies_everything() {
    let p = policy("version: 1\ntrust_domains: [example.org]\n");
    let d = connect("spiffe://example.org/a", "example.com", 443).eval(&p);
    assert!(!d.allowed && d.enforced);
}

#[test]
fn cel_attributes() {
    let p = policy(
        r#"
version: 1
trust_domains: [example.org]
agents:
  - name: a
    id: spiffe://example.org/ns/x
    pathways:
      - name: all-attrs
        destinations: ["*:*"]
        when: >-
          source.spiffe_id == "spiffe://example.org/ns/x" && source.trust_domain == "example.org"
          && source.path == "/ns/x" && source.address == "10.1.2.3:45678"
          && request.kind == "http" && request.method == "PUT" && request.host == "x.example"
          && request.port == 8443 && request.path == "/p" && request.query == ""
          && request.headers["content-type"] == "application/json"
          && now > timestamp("2020-01-01T00:00:00Z")
      - name: connect-attrs
        destinations: ["*:*"]
        when: 'request.kind == "connect" && request.method == "CONNECT" && request.path == ""'
"#,
    );
    let id = "spiffe://example.org/ns/x";
    let d = http(id, "put", "X.Example.", 8443, "/p")
        .header("content-type", "application/json")
        .eval(&p);
    assert_eq!(allowed_by(&d), Some("all-attrs"));
    assert_eq!(
        allowed_by(&connect(id, "x.example", 443).eval(&p)),
        Some("connect-attrs")
    );
}

#[test]
fn load_errors_name_file_context_value_and_line() {
    let e = err("version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: p\n        destinations: [\"wikipedia.org\"]\n");
    assert!(e.contains("policy.yaml:8"), "{e}");
    assert!(e.contains("agent \"a\", pathway \"p\""), "{e}");
    assert!(
        e.contains("\"wikipedia.org\"") && e.contains("no port"),
        "{e}"
    );

    let e = err("version: 1\ntrust_domains: [example.org]\nbogus: 1\n");
    assert!(e.contains("policy.yaml:3"), "{e}");
    assert!(e.contains("bogus"), "{e}");

    let e = err("version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: p\n        destinations: [\"x:443\"]\n        limit: {}\n");
    assert!(e.contains("agents[0].pathways[0]"), "{e}");
    assert!(e.contains("limit"), "{e}");

    let e = err("version: 1\ntrust_domains: [example.org]\nmode: enforcing\n");
    assert!(e.contains("mode") && e.contains("enforcing"), "{e}");

    let e = err("version: 1\ntrust_domains: [example.org]\nrules:\n  - name: r\n    action: allow\n    when: 'true'\n");
    assert!(e.contains("allow"), "{e}");
}

#[test]
fn validation_errors() {
    let agent = |id: &str, dests: &str, extra: &str| {
        format!(
            "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: {id}\n    pathways:\n      - name: p\n        destinations: {dests}\n{extra}"
        )
    };
    let cases = [
        (agent("spiffe://example.org/a", r#"["x.example:0"]"#, ""), "1..=65535"),
        (agent("spiffe://example.org/a", r#"["x.example:70000"]"#, ""), "70000"),
        (agent("spiffe://example.org/a", r#"["api.*.example:443"]"#, ""), "wildcard"),
        (agent("spiffe://example.org/a", r#"["*x.example:443"]"#, ""), "wildcard"),
        (agent("spiffe://Example.org/a", r#"["x:443"]"#, ""), "invalid id"),
        (agent("spiffe://example.org/a/../b", r#"["x:443"]"#, ""), "invalid id"),
        (agent("spiffe://example.org/**/b", r#"["x:443"]"#, ""), "`**`"),
        (agent("spiffe://example.org/sa-*", r#"["x:443"]"#, ""), "whole segments"),
        (agent("spiffe://other.org/a", r#"["x:443"]"#, ""), "not in trust_domains"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        when: 'request.host ==' \n"), "CEL syntax error at 1:"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        when: 'requst.host == \"x\"'\n"), "unknown variable `requst`"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        methods: [\"GE T\"]\n"), "invalid method"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        models: [gpt]\n"), "`models` needs `upstream`"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        upstream: {tls: true}\n        methods: [CONNECT]\n"), "CONNECT"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        upstream: {spiffe_id: \"spiffe://example.org\"}\n"), "upstream.spiffe_id"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        upstream: {tls: false, ca_file: /x}\n"), "contradicts"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        limits: {requests_per_minute: 0}\n"), "at least 1"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        allow_cidrs: [10.0.0.1/8]\n"), "host bits"),
        (agent("spiffe://example.org/a", r#"["x:443"]"#, "        allow_cidrs: [nonsense]\n"), "not a CIDR"),
        (agent("spiffe://example.org/a", "[]", ""), "at least one destination"),
        (
            agent("spiffe://example.org/a", r#"["x:443"]"#, "      - name: p\n        destinations: [\"y:443\"]\n"),
            "duplicate pathway name",
        ),
        (
            format!("{}  - name: a\n    id: spiffe://example.org/b\n", agent("spiffe://example.org/a", r#"["x:443"]"#, "")),
            "duplicate agent name",
        ),
        ("version: 2\ntrust_domains: [example.org]\n".into(), "unsupported version"),
        ("version: 1\ntrust_domains: []\n".into(), "at least one trust domain"),
        (
            "version: 1\ntrust_domains: [example.org]\nrules:\n  - {name: r, action: deny, when: 'true'}\n  - {name: r, action: deny, when: 'false'}\n".into(),
            "duplicate rule name",
        ),
        (
            "version: 1\ntrust_domains: [example.org]\nrules:\n  - {name: r, action: deny, when: 'request.host ==='}\n".into(),
            "rule \"r\"",
        ),
    ];
    for (yaml, want) in cases {
        let e = err(&yaml);
        assert!(
            e.contains(want),
            "want {want:?} in error:\n{e}\nfor:\n{yaml}"
        );
        assert!(e.starts_with("policy.yaml"), "{e}");
    }
}

#[test]
fn several_errors_are_all_reported() {
    let e = Policy::from_yaml_str(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: p\n        destinations: [\"x\", \"y:0\"]\n",
        "policy.yaml",
    )
    .unwrap_err();
    assert_eq!(e.errors().len(), 2, "{e}");
}

#[test]
fn comprehension_variables_are_not_unknown() {
    policy(
        "version: 1\ntrust_domains: [example.org]\nrules:\n  - {name: r, action: deny, when: 'request.headers.exists(h, h.startsWith(\"x-evil\"))'}\n",
    );
}

#[test]
fn policy_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Policy>();
    check::<Decision>();
}

#[test]
fn accessors() {
    let p = policy(BASE);
    assert_eq!(p.trust_domains(), ["example.org"]);
    assert_eq!(
        p.agent_names().collect::<Vec<_>>(),
        ["research-agent", "any-sa-in-ai", "whole-namespace"]
    );
    assert_eq!(p.rules().count(), 2);
    assert_eq!(p.pathways().count(), 6);
}

#[test]
fn large_policies_are_not_cut_off_by_the_yaml_budget() {
    // more than serde-saphyr's default 250k-node budget
    let dests: Vec<String> = (0..260_000)
        .map(|i| format!("\"h{i}.example.com:443\""))
        .collect();
    let yaml = format!(
        "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: p\n        destinations: [{}]\n",
        dests.join(", ")
    );
    let p = policy(&yaml);
    assert!(
        connect("spiffe://example.org/a", "h259999.example.com", 443)
            .eval(&p)
            .allowed
    );
}
