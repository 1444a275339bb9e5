//! Long fuzz runs: `cargo run -p egress-gateway --example fuzz -- TARGET SECONDS [SEED]`
//! with TARGET one of host, client_hello, policy (or `all`). Exits 1 on any crash;
//! crashing inputs go to target/fuzz-crashes/.
#![forbid(unsafe_code)]

#[path = "../fuzz/driver.rs"]
mod driver;

use std::time::Duration;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = args.first().map(String::as_str).unwrap_or("all");
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let crash_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
    let targets: Vec<&str> = if target == "all" {
        driver::TARGETS.to_vec()
    } else {
        vec![target]
    };
    let mut crashed = false;
    for t in targets {
        println!("fuzzing {t} for {seconds}s (seed {seed})");
        let report = driver::run(t, Duration::from_secs(seconds), seed, &crash_dir);
        println!("{report}");
        crashed |= report.crashes > 0;
    }
    if crashed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
