//! Every example policy loads, and its test file passes.

use std::path::Path;

use egress_policy::testing::{load_tests, run_tests};
use egress_policy::Policy;

#[test]
fn every_example_loads_and_passes_its_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name.ends_with(".tests.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../policy.schema.json\n"),
            "{name} must start with the yaml-language-server schema line"
        );
        let policy = Policy::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let tests = path.with_file_name(name.replace(".yaml", ".tests.yaml"));
        let cases = load_tests(&tests).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!cases.is_empty(), "{name}: no tests");
        let report = run_tests(&policy, &cases);
        for f in report.failures() {
            eprintln!(
                "{name}: {}: expected {}, got {} ({})",
                f.name, f.expected, f.got, f.why
            );
        }
        assert_eq!(report.failed(), 0, "{name}");
        seen += 1;
    }
    assert!(seen >= 4, "expected at least 4 examples, found {seen}");
}
