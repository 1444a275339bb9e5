//! `egress-gateway policy ...` through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_egress-gateway"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples")
}

fn run(args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = bin().args(args).output().unwrap();
    (
        status.code().unwrap(),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

const POLICY: &str = r#"
version: 1
trust_domains: [example.org]
rules:
  - name: no-paste-sites
    action: deny
    when: 'request.host.endsWith("pastebin.com")'
agents:
  - name: research-agent
    id: spiffe://example.org/ns/ai-workloads/sa/research-agent
    pathways:
      - name: wikipedia
        destinations: ["*.wikipedia.org:443", "wikipedia.org:443"]
      - name: api
        destinations: ["api.example.com:443"]
        methods: [POST]
        when: 'request.headers["x-team"] == "research"'
        upstream: { tls: true }
"#;

#[test]
fn check_valid_and_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.yaml", POLICY);
    let (code, out, _) = run(&["policy", "check", &good]);
    assert_eq!(code, 0);
    assert!(out.contains("ok"), "{out}");

    let bad = write(
        dir.path(),
        "bad.yaml",
        &POLICY.replace("\"wikipedia.org:443\"", "\"wikipedia.org\""),
    );
    let (code, _, err) = run(&["policy", "check", &bad]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.yaml:13"), "{err}");
    assert!(
        err.contains("pathway \"wikipedia\"") && err.contains("\"wikipedia.org\""),
        "{err}"
    );

    let cel = write(
        dir.path(),
        "cel.yaml",
        &POLICY.replace("endsWith(\"pastebin.com\")", "endsWith(\"pastebin.com\""),
    );
    let (code, _, err) = run(&["policy", "check", &cel]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rule \"no-paste-sites\"") && err.contains("syntax error at 1:"),
        "{err}"
    );
}

#[test]
fn test_command_reports_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "p.yaml", POLICY);
    let tests = write(
        dir.path(),
        "p.tests.yaml",
        r#"
tests:
  - name: research agent may read wikipedia
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: CONNECT en.wikipedia.org:443
    expect: allow
    pathway: wikipedia
  - name: paste sites stay closed
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: CONNECT pastebin.com:443
    expect: deny
    rule: no-paste-sites
"#,
    );
    let (code, out, _) = run(&["policy", "test", &policy, &tests]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().last(), Some("2 passed, 0 failed"));

    let failing = write(
        dir.path(),
        "f.tests.yaml",
        r#"
tests:
  - name: wrong on purpose
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: CONNECT evilwikipedia.org:443
    expect: allow
"#,
    );
    let (code, out, _) = run(&["policy", "test", &policy, &tests, &failing]);
    assert_eq!(code, 1);
    assert!(out.contains("wrong on purpose"), "{out}");
    assert!(out.contains("expected: allow"), "{out}");
    assert!(out.contains("got:      deny"), "{out}");
    assert!(out.contains("no pathway allows this destination"), "{out}");
    assert_eq!(out.lines().last(), Some("2 passed, 1 failed"));

    let invalid = write(
        dir.path(),
        "i.tests.yaml",
        "tests:\n  - name: x\n    expect: perhaps\n",
    );
    let (code, _, err) = run(&["policy", "test", &policy, &invalid]);
    assert_eq!(code, 2, "{err}");
    let bad_policy = write(dir.path(), "bad.yaml", "version: 1\n");
    let (code, _, _) = run(&["policy", "test", &bad_policy, &tests]);
    assert_eq!(code, 2);
}

#[test]
fn explain_shows_rules_and_pathways() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "p.yaml", POLICY);
    let id = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
    let (code, out, err) = run(&[
        "policy",
        "explain",
        &policy,
        "--source",
        id,
        "POST http://api.example.com:443/v1/x",
        "--header",
        "x-team=research",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("decision: ALLOW"), "{out}");
    assert!(out.contains("no-paste-sites: no match"), "{out}");
    assert!(
        out.contains("research-agent/wikipedia: destination not listed"),
        "{out}"
    );
    assert!(out.contains("research-agent/api: ALLOWS"), "{out}");

    let (_, out, _) = run(&[
        "policy",
        "explain",
        &policy,
        "--source",
        id,
        "POST http://api.example.com:443/v1/x",
    ]);
    assert!(out.contains("decision: DENY"), "{out}");
    assert!(out.contains("`when` failed"), "{out}");

    let (code, _, _) = run(&[
        "policy",
        "explain",
        &policy,
        "--source",
        "nope",
        "CONNECT a:1",
    ]);
    assert_eq!(code, 2);
}

#[test]
fn schema_matches_checked_in_file() {
    let (code, out, _) = run(&["policy", "schema"]);
    assert_eq!(code, 0);
    let on_disk = std::fs::read_to_string(examples().join("../policy.schema.json")).unwrap();
    assert_eq!(out, on_disk);
}

#[test]
fn examples_pass_through_the_cli() {
    let ex = examples();
    for name in ["research-agent", "llm-openai", "east-west", "audit-mode"] {
        let p = ex.join(format!("{name}.yaml"));
        let t = ex.join(format!("{name}.tests.yaml"));
        let (code, out, err) = run(&["policy", "test", p.to_str().unwrap(), t.to_str().unwrap()]);
        assert_eq!(code, 0, "{name}: {out}{err}");
        assert!(out.ends_with(" passed, 0 failed\n"), "{out}");
    }
}
