//! CI smoke runs of the fuzz targets (a few seconds each; `FUZZ_SECONDS` to change).
//! Long runs: `cargo run -p egress-gateway --example fuzz -- all 600`.

#[path = "../fuzz/driver.rs"]
mod driver;

use std::time::Duration;

fn smoke(target: &str) {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = std::env::temp_dir().join("egress-fuzz-crashes");
    let report = driver::run(
        target,
        Duration::from_secs(seconds),
        0x5eed_0000 + target.len() as u64,
        &dir,
    );
    println!("{report}");
    assert!(report.executions > 100, "{report}");
    assert!(
        report.accepted > 0,
        "the oracle never saw a valid input: {report}"
    );
    assert_eq!(report.crashes, 0, "{report}: {:?}", report.crash_files);
}

#[test]
fn fuzz_host_parser() {
    smoke("host");
}

#[test]
fn fuzz_client_hello_reader() {
    smoke("client_hello");
}

#[test]
fn fuzz_policy_loader() {
    smoke("policy");
}
