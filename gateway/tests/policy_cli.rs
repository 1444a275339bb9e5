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

    // A repeated --header joins as a repeated request header does at the gateway.
    let (_, out, _) = run(&[
        "policy",
        "explain",
        &policy,
        "--source",
        id,
        "POST http://api.example.com:443/v1/x",
        "--header",
        "x-team=research",
        "--header",
        "X-Team=evil",
    ]);
    assert!(out.contains("decision: DENY"), "{out}");

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

/// `POLICY` with the `api` pathway's upstream replaced by `upstream`.
fn with_upstream(upstream: &str) -> String {
    POLICY.replace("        upstream: { tls: true }\n", upstream)
}

#[test]
fn check_reads_secret_and_ca_files_unless_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "token", "sk-test\n");
    let ca = write(
        dir.path(),
        "ca.pem",
        &test_harness::ca::TestCa::new("upstream.test").root_pem(),
    );
    let upstream = |secret: &str, ca: &str| {
        format!(
            "        upstream:\n          ca_file: {ca}\n          inject_headers:\n            authorization: {{ secret_file: {secret}, prefix: \"Bearer \" }}\n"
        )
    };
    let good = write(
        dir.path(),
        "good.yaml",
        &with_upstream(&upstream(&secret, &ca)),
    );
    let (code, out, err) = run(&["policy", "check", &good]);
    assert_eq!(code, 0, "{out}{err}");

    // Missing files: errors naming the pathway and the file; `--no-files` skips them.
    let missing = write(
        dir.path(),
        "missing.yaml",
        &with_upstream(&upstream("/nonexistent/token", "/nonexistent/ca.pem")),
    );
    let (code, _, err) = run(&["policy", "check", &missing]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("pathway \"api\": inject_headers.authorization: secret file /nonexistent/token: cannot read"),
        "{err}"
    );
    assert!(
        err.contains("upstream.ca_file: ca_file /nonexistent/ca.pem: cannot read"),
        "{err}"
    );
    let (code, out, err) = run(&["policy", "check", "--no-files", &missing]);
    assert_eq!(code, 0, "{out}{err}");

    // What the gateway would refuse: a FIFO (without blocking), /dev/zero, an empty
    // secret, a CA file without certificates.
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let empty = write(dir.path(), "empty", "\n");
    let not_pem = write(dir.path(), "not.pem", "hello\n");
    for (secret, ca, expect) in [
        (
            fifo.to_str().unwrap(),
            ca.as_str(),
            "is a FIFO, not a regular file",
        ),
        ("/dev/zero", ca.as_str(), "/dev/zero is a character device"),
        (empty.as_str(), ca.as_str(), "is empty"),
        (
            secret.as_str(),
            not_pem.as_str(),
            "no usable PEM certificates",
        ),
    ] {
        let p = write(
            dir.path(),
            "bad.yaml",
            &with_upstream(&upstream(secret, ca)),
        );
        let started = std::time::Instant::now();
        let (code, _, err) = run(&["policy", "check", &p]);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(expect), "{expect}: {err}");
    }
}

#[test]
fn check_catches_unknown_functions_bad_regexes_and_unmatchable_destinations() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to, expect) in [
        (
            "endsWith(\"pastebin.com\")",
            "endswith(\"pastebin.com\")",
            "unknown function `endswith`",
        ),
        (
            "endsWith(\"pastebin.com\")",
            "matches(\"(pastebin\")",
            "invalid regex \"(pastebin\" in matches()",
        ),
        (
            "\"wikipedia.org:443\"",
            "\"2130706433:443\"",
            "\"2130706433\" can never match",
        ),
        (
            "\"wikipedia.org:443\"",
            "\"127.1:443\"",
            "\"127.1\" can never match",
        ),
        (
            "\"wikipedia.org:443\"",
            "\"0x7f.1:443\"",
            "\"0x7f.1\" can never match",
        ),
    ] {
        assert!(POLICY.contains(from), "{from}");
        let p = write(dir.path(), "p.yaml", &POLICY.replace(from, to));
        let (code, _, err) = run(&["policy", "check", &p]);
        assert_eq!(code, 1, "{to}: {err}");
        assert!(err.contains(expect), "{expect}: {err}");
        assert!(
            err.contains("p.yaml:"),
            "the error names the file and line: {err}"
        );
    }
}

#[test]
fn check_warns_about_over_broad_entries_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let broad = POLICY.replace(
        "        destinations: [\"*.wikipedia.org:443\", \"wikipedia.org:443\"]\n",
        "        destinations: [\"*.com:443\", \"*.co.uk:443\", \"*:*\"]\n        allow_cidrs: [0.0.0.0/0]\n",
    );
    let p = write(dir.path(), "broad.yaml", &broad);
    let (code, out, err) = run(&["policy", "check", "--no-files", &p]);
    assert_eq!(code, 0, "warnings are not errors: {err}");
    assert!(out.contains("ok"), "{out}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 4, "{err}");
    for needle in ["`*.com:443`", "`*.co.uk:443`", "`*:*`", "`0.0.0.0/0`"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(needle) && w.contains("pathway \"wikipedia\"")),
            "{needle}: {err}"
        );
    }
    let good = write(dir.path(), "good.yaml", POLICY);
    let (_, _, err) = run(&["policy", "check", &good]);
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn explain_of_an_expensive_comprehension_stops_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ten = "[0,1,2,3,4,5,6,7,8,9]";
    let when = format!(
        "{ten}.all(a, {ten}.all(b, {ten}.all(c, {ten}.all(d, {ten}.all(e, {ten}.all(f, {ten}.all(g, {ten}.all(h, a + b + c + d + e + f + g + h >= 0))))))))"
    );
    let p = write(
        dir.path(),
        "p.yaml",
        &POLICY.replace(
            "'request.host.endsWith(\"pastebin.com\")'",
            &format!("'{when}'"),
        ),
    );
    let started = std::time::Instant::now();
    let (code, _, err) = run(&[
        "policy",
        "explain",
        &p,
        "--source",
        "spiffe://example.org/ns/ai-workloads/sa/research-agent",
        "CONNECT en.wikipedia.org:443",
    ]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "explain ran for {:?}",
        started.elapsed()
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("too expensive"), "{err}");
    let (code, _, err) = run(&["policy", "check", &p]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rule \"no-paste-sites\"") && err.contains("too expensive"),
        "{err}"
    );
}

const MCP_POLICY: &str = r#"
version: 1
trust_domains: [example.org]
agents:
  - name: research-agent
    id: spiffe://example.org/ns/ai-workloads/sa/research-agent
    pathways:
      - name: docs-mcp
        destinations: ["mcp.internal:8080"]
        upstream: { tls: false }
        mcp:
          tools: [search_docs, "read_*"]
          resources: ["docs://*"]
        when: '!(request.mcp.tool == "read_file" && request.mcp.arguments.path.startsWith("/etc/"))'
"#;

#[test]
fn mcp_pathways_check_test_and_explain() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "mcp.yaml", MCP_POLICY);
    let (code, out, err) = run(&["policy", "check", &p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");

    // `mcp` where bodies are not seen, and `request.mcp` where it does not exist.
    let l4 = write(
        dir.path(),
        "l4.yaml",
        &MCP_POLICY.replace("        upstream: { tls: false }\n", ""),
    );
    let (code, _, err) = run(&["policy", "check", &l4]);
    assert_eq!(code, 1);
    assert!(
        err.contains("l4.yaml:") && err.contains("`mcp` needs `upstream`"),
        "{err}"
    );
    let no_mcp = write(
        dir.path(),
        "no-mcp.yaml",
        &MCP_POLICY.replace(
            "        mcp:\n          tools: [search_docs, \"read_*\"]\n          resources: [\"docs://*\"]\n",
            "",
        ),
    );
    let (code, _, err) = run(&["policy", "check", &no_mcp]);
    assert_eq!(code, 1);
    assert!(err.contains("reads request.mcp"), "{err}");
    let pattern = write(
        dir.path(),
        "pattern.yaml",
        &MCP_POLICY.replace("\"read_*\"", "\"read_*_all\""),
    );
    let (code, _, err) = run(&["policy", "check", &pattern]);
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid mcp.tools entry \"read_*_all\""),
        "{err}"
    );

    let tests = write(
        dir.path(),
        "tests.yaml",
        r#"
tests:
  - name: search is allowed
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: POST http://mcp.internal:8080/mcp
    mcp: { tool: search_docs, arguments: { query: rust } }
    expect: allow
    pathway: docs-mcp
  - name: reading docs is allowed
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: POST http://mcp.internal:8080/mcp
    mcp: { tool: read_file, arguments: { path: /docs/guide.md } }
    expect: allow
  - name: reading /etc is not
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: POST http://mcp.internal:8080/mcp
    mcp: { tool: read_file, arguments: { path: /etc/passwd } }
    expect: deny
  - name: listing tools is allowed
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: POST http://mcp.internal:8080/mcp
    mcp: { method: tools/list }
    expect: allow
  - name: wrongly expects delete_repo
    source: spiffe://example.org/ns/ai-workloads/sa/research-agent
    request: POST http://mcp.internal:8080/mcp
    mcp: { tool: delete_repo }
    expect: allow
"#,
    );
    let (code, out, _) = run(&["policy", "test", &p, &tests]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL") && out.contains("wrongly expects delete_repo"),
        "{out}"
    );
    assert!(
        out.contains("tool \"delete_repo\" not allowed by mcp.tools"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("4 passed, 1 failed"), "{out}");

    let bad = write(
        dir.path(),
        "bad-tests.yaml",
        "tests:\n  - name: x\n    source: spiffe://example.org/a\n    request: POST http://m:80/\n    mcp: { tool: x, colour: red }\n    expect: allow\n",
    );
    let (code, _, err) = run(&["policy", "test", &p, &bad]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("colour"), "{err}");

    let source = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
    let (code, out, err) = run(&[
        "policy",
        "explain",
        &p,
        "--source",
        source,
        "--mcp-tool",
        "delete_repo",
        "POST http://mcp.internal:8080/mcp",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("decision: DENY: tool \"delete_repo\" not allowed by mcp.tools"),
        "{out}"
    );
    assert!(out.contains("mcp: tools/call \"delete_repo\""), "{out}");
    let (code, out, err) = run(&[
        "policy",
        "explain",
        &p,
        "--source",
        source,
        "--mcp-message",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/docs/a.md"}}}"#,
        "POST http://mcp.internal:8080/mcp",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("decision: ALLOW"), "{out}");
    assert!(
        out.contains("research-agent/docs-mcp: ALLOWS (mcp.tools entry \"read_*\")"),
        "{out}"
    );
    let (code, _, err) = run(&[
        "policy",
        "explain",
        &p,
        "--source",
        source,
        "--mcp-message",
        "{",
        "POST http://mcp.internal:8080/mcp",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--mcp-message"), "{err}");
}
