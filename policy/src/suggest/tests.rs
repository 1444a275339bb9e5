use std::collections::{BTreeSet, HashSet};

use super::group::{
    agent_name_base, common_dir, group_hosts, path_dir, registrable_domain, unique_name,
    usable_prefix,
};
use super::*;

fn set<'a>(hosts: &[&'a str]) -> BTreeSet<&'a str> {
    hosts.iter().copied().collect()
}

#[test]
fn registrable_domains_follow_the_psl() {
    assert_eq!(
        registrable_domain("en.wikipedia.org"),
        Some("wikipedia.org")
    );
    assert_eq!(
        registrable_domain("a.b.example.co.uk"),
        Some("example.co.uk")
    );
    // Private-section suffixes: each tenant is its own registrable domain.
    assert_eq!(
        registrable_domain("alice.github.io"),
        Some("alice.github.io")
    );
    assert_eq!(
        registrable_domain("bucket.s3.amazonaws.com"),
        Some("bucket.s3.amazonaws.com")
    );
    // Public suffixes themselves, unknown suffixes and IPs are never grouped.
    assert_eq!(registrable_domain("co.uk"), None);
    assert_eq!(registrable_domain("github.io"), None);
    assert_eq!(registrable_domain("x.svc.cluster.local"), None);
    assert_eq!(registrable_domain("10.0.0.1"), None);
    assert_eq!(registrable_domain("fd00::1"), None);
}

#[test]
fn wildcard_needs_k_subdomains() {
    let none = HashSet::new();
    let g = group_hosts(
        Some("wikipedia.org"),
        &set(&["en.wikipedia.org", "de.wikipedia.org", "wikipedia.org"]),
        3,
        &none,
    );
    assert_eq!(g.wildcard, None);
    assert_eq!(g.exact.len(), 3);
    let g = group_hosts(
        Some("wikipedia.org"),
        &set(&[
            "en.wikipedia.org",
            "de.wikipedia.org",
            "fr.wikipedia.org",
            "wikipedia.org",
        ]),
        3,
        &none,
    );
    assert_eq!(g.wildcard.as_deref(), Some("wikipedia.org"));
    assert_eq!(g.exact, vec!["wikipedia.org".to_owned()]);
    assert_eq!(g.covered.len(), 3);
    // K = 0 disables wildcards.
    let g = group_hosts(
        Some("wikipedia.org"),
        &set(&["en.wikipedia.org", "de.wikipedia.org", "fr.wikipedia.org"]),
        0,
        &none,
    );
    assert_eq!(g.wildcard, None);
}

#[test]
fn wildcard_uses_the_narrowest_shared_parent() {
    let g = group_hosts(
        Some("example.com"),
        &set(&[
            "a.api.example.com",
            "b.api.example.com",
            "c.api.example.com",
        ]),
        3,
        &HashSet::new(),
    );
    assert_eq!(g.wildcard.as_deref(), Some("api.example.com"));
    let g = group_hosts(
        Some("example.com"),
        &set(&["a.api.example.com", "b.cdn.example.com", "c.example.com"]),
        3,
        &HashSet::new(),
    );
    assert_eq!(g.wildcard.as_deref(), Some("example.com"));
}

#[test]
fn wildcard_never_covers_an_avoided_host() {
    let avoid: HashSet<&str> = ["metadata.example.com"].into_iter().collect();
    let g = group_hosts(
        Some("example.com"),
        &set(&["a.example.com", "b.example.com", "c.example.com"]),
        3,
        &avoid,
    );
    assert_eq!(g.wildcard, None);
    assert_eq!(g.exact.len(), 3);
}

#[test]
fn ungroupable_hosts_stay_exact() {
    let g = group_hosts(
        None,
        &set(&[
            "x.svc.cluster.local",
            "y.svc.cluster.local",
            "z.svc.cluster.local",
        ]),
        3,
        &HashSet::new(),
    );
    assert_eq!(g.wildcard, None);
}

#[test]
fn path_prefixes() {
    assert_eq!(path_dir("/v1/chat/completions?x=1"), "/v1/chat/");
    assert_eq!(path_dir("/"), "/");
    assert_eq!(common_dir("/v1/chat/", "/v1/embeddings/"), "/v1/");
    assert_eq!(common_dir("/v1/chat/", "/v2/"), "/");
    assert_eq!(usable_prefix("/v1/"), Some("/v1/"));
    assert_eq!(usable_prefix("/"), None);
    // Quotes and backslashes never reach CEL or YAML.
    assert_eq!(usable_prefix("/a/b\"c/"), Some("/a/"));
    assert_eq!(usable_prefix("/x'y/"), None);
}

#[test]
fn names() {
    assert_eq!(
        agent_name_base("spiffe://example.org/ns/ai-workloads/sa/research-agent"),
        "research-agent"
    );
    let mut taken: HashSet<String> = ["research-agent".to_owned()].into_iter().collect();
    assert_eq!(
        unique_name("research-agent", &mut taken),
        "research-agent-2"
    );
    assert_eq!(
        unique_name("research-agent", &mut taken),
        "research-agent-3"
    );
    assert_eq!(unique_name("*.weird name", &mut taken), "weird-name");
    let long = "x".repeat(100);
    assert!(unique_name(&long, &mut taken).len() <= 63);
}

fn line(ts: &str, src: &str, host: &str, decision: &str, extra: &str) -> String {
    format!(
        r#"{{"ts":"{ts}","source_spiffe_id":"{src}","kind":"connect","method":"CONNECT","host":"{host}","port":443,"decision":"{decision}"{extra}}}"#
    )
}

const R: &str = "spiffe://example.org/ns/ai/sa/research";

fn aggregate(lines: &[String], opts: Options) -> Aggregator {
    let mut agg = Aggregator::new(opts);
    for l in lines {
        let e: AuditEntry<'_> = serde_json::from_str(l).unwrap();
        agg.add(&e).unwrap();
    }
    agg
}

#[test]
fn aggregates_without_keeping_lines() {
    let lines: Vec<String> = (0..1000)
        .map(|i| {
            line(
                &format!("2025-01-01T00:00:{:02}Z", i % 60),
                R,
                "a.example.com",
                "deny",
                "",
            )
        })
        .collect();
    let agg = aggregate(&lines, Options::default());
    assert_eq!(agg.distinct(), 1);
    assert_eq!(agg.counts().used, 1000);
}

#[test]
fn since_and_invalid_entries() {
    let opts = Options {
        since_ms: parse_rfc3339("2025-01-02T00:00:00Z"),
        ..Options::default()
    };
    let mut agg = Aggregator::new(opts);
    let old = line("2025-01-01T00:00:00Z", R, "a.example.com", "deny", "");
    let e: AuditEntry<'_> = serde_json::from_str(&old).unwrap();
    agg.add(&e).unwrap();
    assert_eq!(agg.counts().before_since, 1);
    let bad = line("2025-01-03T00:00:00Z", R, "a.example.com", "maybe", "");
    let e: AuditEntry<'_> = serde_json::from_str(&bad).unwrap();
    assert_eq!(agg.add(&e).unwrap_err().field, "decision");
    let bad = line("2025-01-03T00:00:00Z", R, "*", "deny", "");
    let e: AuditEntry<'_> = serde_json::from_str(&bad).unwrap();
    assert_eq!(agg.add(&e).unwrap_err().field, "host");
    assert_eq!(agg.counts().used, 0);
}

const POLICY: &str = r#"version: 1
trust_domains: [example.org]
mode: audit
rules:
  - name: no-paste
    action: deny
    when: 'request.host == "pastebin.com"'
agents:
  - name: research
    id: spiffe://example.org/ns/ai/sa/research
    pathways:
      - name: wiki
        destinations: ["wikipedia.org:443"]
"#;

#[test]
fn never_widens_rules_or_blocked_addresses() {
    let lines = vec![
        line(
            "2025-01-01T00:00:00Z",
            R,
            "pastebin.com",
            "deny",
            r#","enforced":false,"rule":"no-paste""#,
        ),
        line(
            "2025-01-01T00:00:01Z",
            R,
            "a.example.com",
            "deny",
            r#","enforced":false"#,
        ),
        line(
            "2025-01-01T00:00:02Z",
            R,
            "b.example.com",
            "deny",
            r#","enforced":false"#,
        ),
        line(
            "2025-01-01T00:00:03Z",
            R,
            "c.example.com",
            "deny",
            r#","enforced":false"#,
        ),
        line(
            "2025-01-01T00:00:04Z",
            R,
            "metadata.example.com",
            "deny",
            r#","reason":"destination address not allowed""#,
        ),
        line("2025-01-01T00:00:05Z", R, "wikipedia.org", "allow", ""),
    ];
    let agg = aggregate(&lines, Options::default());
    let s = suggest(
        agg,
        Some(Current {
            text: POLICY,
            origin: "p.yaml",
        }),
    )
    .unwrap();
    // A wildcard would cover the blocked host, so the three hosts stay exact.
    assert!(
        !s.policy_yaml.contains("*.example.com"),
        "{}",
        s.policy_yaml
    );
    assert!(s.policy_yaml.contains("\"a.example.com:443\""));
    assert!(!s.policy_yaml.contains("pastebin.com:443"));
    assert!(!s.policy_yaml.contains("metadata.example.com:443"));
    assert!(s
        .policy_yaml
        .starts_with("# yaml-language-server: $schema="));
    // The original text is kept and only added to.
    for l in POLICY.lines() {
        assert!(s.policy_yaml.contains(l), "lost line {l:?}");
    }
    assert_eq!(s.mode, Mode::Audit);
    assert!(s.tests_yaml.contains("rule: \"no-paste\""));
    assert!(s.summary.contains("blocked address"), "{}", s.summary);
    assert!(
        s.summary.contains("deny rule \"no-paste\""),
        "{}",
        s.summary
    );
    assert_eq!(s.test_cases, 6);
}

#[test]
fn empty_input_keeps_the_policy() {
    let agg = Aggregator::new(Options::default());
    let s = suggest(
        agg,
        Some(Current {
            text: POLICY,
            origin: "p.yaml",
        }),
    )
    .unwrap();
    assert!(s.unchanged);
    assert_eq!(s.policy_yaml, POLICY);
    assert!(s.summary.contains("unchanged"));
}

#[test]
fn min_count_and_mode_switch() {
    let lines = vec![
        line("2025-01-01T00:00:00Z", R, "once.example.net", "deny", ""),
        line("2025-01-01T00:00:01Z", R, "twice.example.net", "deny", ""),
        line("2025-01-01T00:00:02Z", R, "twice.example.net", "deny", ""),
    ];
    let agg = aggregate(
        &lines,
        Options {
            min_count: 2,
            mode: Some(Mode::Enforce),
            ..Options::default()
        },
    );
    let s = suggest(
        agg,
        Some(Current {
            text: POLICY,
            origin: "p.yaml",
        }),
    )
    .unwrap();
    assert!(s.policy_yaml.contains("mode: enforce"));
    assert!(s.policy_yaml.contains("twice.example.net:443"));
    assert!(!s.policy_yaml.contains("once.example.net:443"));
    assert!(s.summary.contains("below --min-count 2"), "{}", s.summary);
}

#[test]
fn edits_policies_written_in_other_block_styles() {
    // Items at the key's own column, `pathways` not the last key, no `pathways`.
    let text = "version: 1\ntrust_domains: [example.org]\nagents:\n- id: spiffe://example.org/ns/ai/sa/research\n  pathways:\n  - name: wiki\n    destinations: [\"wikipedia.org:443\"]\n  name: research\n- name: other\n  id: spiffe://example.org/ns/ai/sa/other\n";
    let lines = vec![
        line("2025-01-01T00:00:00Z", R, "arxiv.org", "deny", ""),
        line(
            "2025-01-01T00:00:01Z",
            "spiffe://example.org/ns/ai/sa/other",
            "pypi.org",
            "deny",
            "",
        ),
    ];
    let agg = aggregate(&lines, Options::default());
    let s = suggest(
        agg,
        Some(Current {
            text,
            origin: "p.yaml",
        }),
    )
    .unwrap();
    let p = Policy::from_yaml_str(&s.policy_yaml, "s.yaml").unwrap();
    let names: Vec<Vec<String>> = p
        .agents()
        .map(|a| a.pathways.iter().map(|p| p.name.clone()).collect())
        .collect();
    assert_eq!(
        names,
        vec![
            vec!["wiki".to_owned(), "arxiv.org".to_owned()],
            vec!["pypi.org".to_owned()]
        ]
    );
}

#[test]
fn flow_style_agents_are_an_error_not_a_misplacement() {
    let text = "version: 1\ntrust_domains: [example.org]\nagents: [{name: research, id: \"spiffe://example.org/ns/ai/sa/research\", pathways: [{name: wiki, destinations: [\"wikipedia.org:443\"]}]}]\n";
    let lines = vec![line("2025-01-01T00:00:00Z", R, "arxiv.org", "deny", "")];
    let agg = aggregate(&lines, Options::default());
    let e = suggest(
        agg,
        Some(Current {
            text,
            origin: "p.yaml",
        }),
    )
    .unwrap_err();
    assert!(e.to_string().contains("block style"), "{e}");
}
