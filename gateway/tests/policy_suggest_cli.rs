//! `egress-gateway policy suggest` through the real binary, on the audit-log
//! fixtures; every suggestion must pass `policy check` and its own `policy test`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_egress-gateway"))
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policy/tests/fixtures/suggest")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = bin().args(args).output().unwrap();
    Run {
        code: status.code().unwrap(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

/// Runs `suggest` with `args` into a fresh directory, then `policy check` and
/// `policy test` on what it wrote; returns the directory, the suggest output
/// and the policy text.
fn suggest(args: &[&str]) -> (tempfile::TempDir, Run, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    let mut all = vec!["policy", "suggest", "--out", &out];
    all.extend_from_slice(args);
    let r = run(&all);
    assert_eq!(r.code, 0, "suggest failed:\n{}\n{}", r.stdout, r.stderr);
    let policy = dir.path().join("suggested-policy.yaml");
    let tests = dir.path().join("suggested-tests.yaml");
    assert_passes(&policy, &tests);
    let text = std::fs::read_to_string(&policy).unwrap();
    (dir, r, text)
}

fn assert_passes(policy: &Path, tests: &Path) {
    let p = policy.to_string_lossy();
    let check = run(&["policy", "check", &p]);
    assert_eq!(
        check.code, 0,
        "policy check: {}{}",
        check.stdout, check.stderr
    );
    let t = run(&["policy", "test", &p, &tests.to_string_lossy()]);
    assert_eq!(t.code, 0, "policy test: {}{}", t.stdout, t.stderr);
    assert!(t.stdout.trim_end().ends_with(" 0 failed"), "{}", t.stdout);
    for f in [policy, tests] {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema="),
            "{text}"
        );
    }
}

fn test_count(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("suggested-tests.yaml"))
        .unwrap()
        .matches("\n  - name:")
        .count()
}

#[test]
fn subdomains_become_one_wildcard() {
    let (dir, r, text) = suggest(&[&fixture("subdomains.log")]);
    assert!(text.contains("\"*.wikipedia.org:443\""), "{text}");
    assert!(text.contains("\"wikipedia.org:443\""), "{text}");
    // Two subdomains are below K = 3: exact entries.
    assert!(text.contains("\"api.example.net:443\""), "{text}");
    assert!(!text.contains("*.example.net"), "{text}");
    assert!(text.contains("name: \"research-agent\""), "{text}");
    assert!(text.contains("mode: audit"), "{text}");
    assert!(
        text.contains("# suggested: 15 requests, first seen 2025-03-01T10:00:00Z"),
        "{text}"
    );
    assert!(r.stdout.contains("agent research-agent:"), "{}", r.stdout);
    assert_eq!(test_count(dir.path()), 9);
}

#[test]
fn wildcard_threshold_and_min_count_flags() {
    let (_dir, r, text) = suggest(&[
        &fixture("subdomains.log"),
        "--wildcard-min",
        "5",
        "--min-count",
        "2",
    ]);
    assert!(!text.contains("*.wikipedia.org"), "{text}");
    assert!(text.contains("\"en.wikipedia.org:443\""), "{text}");
    assert!(!text.contains("rare.example.com"), "{text}");
    assert!(r.stdout.contains("below --min-count 2"), "{}", r.stdout);
}

#[test]
fn public_suffixes_are_never_wildcarded() {
    let (_dir, _r, text) = suggest(&[&fixture("psl-traps.log")]);
    for trap in [
        "*.github.io",
        "*.co.uk",
        "*.amazonaws.com",
        "*.s3.amazonaws.com",
        "*.svc.cluster.local",
        "\"*:",
    ] {
        assert!(!text.contains(trap), "{trap} in\n{text}");
    }
    assert!(text.contains("\"alice.github.io:443\""), "{text}");
    assert!(text.contains("\"x.svc.cluster.local:8443\""), "{text}");
}

#[test]
fn l7_methods_and_path_prefixes() {
    let (_dir, _r, text) = suggest(&[&fixture("l7.log")]);
    assert!(text.contains("\"api.openai.com:443\""), "{text}");
    assert!(text.contains("methods: [\"POST\"]"), "{text}");
    assert!(
        text.contains("when: 'request.path.startsWith(\"/v1/\")'"),
        "{text}"
    );
    assert!(text.contains("methods: [\"GET\", \"HEAD\"]"), "{text}");
    assert!(
        text.contains("when: 'request.path.startsWith(\"/data/\")'"),
        "{text}"
    );
    // /alpha/ and /beta/ share nothing: no path condition for that host.
    let mixed = text.split("mixed.example.org").nth(1).unwrap();
    let mixed = mixed.split("- name:").next().unwrap();
    assert!(!mixed.contains("when:"), "{mixed}");
}

#[test]
fn audit_mode_rules_and_blocked_addresses() {
    let policy = fixture("audit-mode.policy.yaml");
    let (dir, r, text) = suggest(&[&fixture("audit-mode.log"), "--policy", &policy]);
    let original = std::fs::read_to_string(&policy).unwrap();
    // The current policy is kept line for line; only additions (an empty
    // `pathways: []` becomes a block list).
    for l in original.lines().filter(|l| !l.contains("pathways: []")) {
        assert!(text.contains(l), "lost {l:?}");
    }
    assert!(text.contains("mode: audit"), "{text}");
    assert!(text.contains("\"pypi.org:443\""), "{text}");
    assert!(!text.contains("pastebin.com:443"), "{text}");
    assert!(!text.contains("metadata.internal.example.com"), "{text}");
    // A new workload whose name is taken gets a unique one; a pattern agent is narrowed.
    assert!(text.contains("name: \"research-agent-2\""), "{text}");
    assert!(
        text.contains(
            "source.spiffe_id == \"spiffe://example.org/ns/ai-workloads/sa/batch-worker\""
        ),
        "{text}"
    );
    let tests = std::fs::read_to_string(dir.path().join("suggested-tests.yaml")).unwrap();
    assert!(tests.contains("rule: \"no-paste-sites\""), "{tests}");
    assert!(
        tests.contains("request: \"CONNECT metadata.internal.example.com:443\"\n    expect: deny"),
        "{tests}"
    );
    assert!(
        r.stdout.contains(
            "stays denied: CONNECT pastebin.com:443 (1 request): deny rule \"no-paste-sites\""
        ),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("blocked address"), "{}", r.stdout);
    assert!(
        r.stdout.contains("only because of mode: audit"),
        "{}",
        r.stdout
    );

    let (_dir, _r, text) = suggest(&[
        &fixture("audit-mode.log"),
        "--policy",
        &policy,
        "--mode",
        "enforce",
    ]);
    assert!(
        text.contains("mode: enforce") && !text.contains("mode: audit"),
        "{text}"
    );
}

#[test]
fn malformed_lines_are_counted_with_file_and_line() {
    let (_dir, r, text) = suggest(&[&fixture("malformed.log")]);
    let f = fixture("malformed.log");
    for n in [2, 3, 4, 5, 6, 7, 10] {
        assert!(
            r.stderr.contains(&format!("{f}:{n}: malformed audit line")),
            "line {n}: {}",
            r.stderr
        );
    }
    assert!(
        r.stderr.contains("7 malformed audit lines skipped"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("2 used"), "{}", r.stdout);
    assert!(text.contains("\"good.example.com:443\""), "{text}");
}

#[test]
fn empty_log_leaves_the_policy_unchanged() {
    let policy = fixture("audit-mode.policy.yaml");
    let (_dir, r, text) = suggest(&[&fixture("empty.log"), "--policy", &policy]);
    assert_eq!(text, std::fs::read_to_string(&policy).unwrap());
    assert!(r.stdout.contains("the policy is unchanged"), "{}", r.stdout);
}

#[test]
fn gzip_stdin_and_several_files() {
    let dir = tempfile::tempdir().unwrap();
    let gz: PathBuf = dir.path().join("l7.log.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(&std::fs::read(fixture("l7.log")).unwrap())
        .unwrap();
    enc.finish().unwrap();

    let out = dir.path().join("out");
    let mut child = bin()
        .args([
            "policy",
            "suggest",
            "-",
            &gz.to_string_lossy(),
            "--out",
            &out.to_string_lossy(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(fixture("subdomains.log")).unwrap())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_passes(
        &out.join("suggested-policy.yaml"),
        &out.join("suggested-tests.yaml"),
    );
    let text = std::fs::read_to_string(out.join("suggested-policy.yaml")).unwrap();
    assert!(
        text.contains("*.wikipedia.org:443") && text.contains("api.openai.com:443"),
        "{text}"
    );
}

#[test]
fn since_filters_old_records() {
    let (_dir, r, text) = suggest(&[
        &fixture("subdomains.log"),
        "--since",
        "2025-03-01T10:00:15Z",
    ]);
    assert!(!text.contains("wikipedia"), "{text}");
    assert!(r.stdout.contains("15 before --since"), "{}", r.stdout);
    let bad = run(&[
        "policy",
        "suggest",
        &fixture("subdomains.log"),
        "--since",
        "yesterday",
    ]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
}

#[test]
fn missing_file_and_nothing_to_do() {
    let r = run(&["policy", "suggest", "/nonexistent/audit.log"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("/nonexistent/audit.log"), "{}", r.stderr);
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[
        "policy",
        "suggest",
        &fixture("empty.log"),
        "--out",
        &dir.path().to_string_lossy(),
    ]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("nothing to suggest"), "{}", r.stdout);
    assert!(!dir.path().join("suggested-policy.yaml").exists());
}
