//! `egress-gateway policy ...`: check, test, explain, schema.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;
use egress_policy::testing::{load_tests, run_tests};
use egress_policy::{Policy, Request, RequestLine, SpiffeId};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files; exit 0 if all are valid, 1 otherwise.
    Check {
        #[arg(required = true)]
        policies: Vec<PathBuf>,
    },
    /// Run policy tests; the last line is "N passed, M failed".
    /// Exit 0 if all pass, 1 if any fail, 2 if a file is invalid.
    Test {
        policy: PathBuf,
        #[arg(required = true)]
        tests: Vec<PathBuf>,
    },
    /// Show the decision for one request and every rule and pathway considered.
    Explain {
        policy: PathBuf,
        /// The peer's SPIFFE ID.
        #[arg(long)]
        source: String,
        /// `CONNECT host:port` or `METHOD http://host:port/path?query`.
        request: String,
        /// A request header `name=value`; repeatable.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// The LLM model named in the request body.
        #[arg(long)]
        model: Option<String>,
        /// The peer's `ip:port`.
        #[arg(long)]
        address: Option<std::net::SocketAddr>,
    },
    /// Print the JSON Schema of the policy file (for yaml-language-server).
    Schema {
        /// Print the schema of policy test files instead.
        #[arg(long)]
        tests: bool,
    },
    /// Propose pathways from observed audit logs, with a policy test file.
    Suggest(super::suggest::SuggestArgs),
}

const INVALID_INPUT: u8 = 2;

pub fn run(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Check { policies } => check(&policies),
        PolicyCommand::Test { policy, tests } => test(&policy, &tests),
        PolicyCommand::Explain {
            policy,
            source,
            request,
            headers,
            model,
            address,
        } => explain(
            &policy,
            &source,
            &request,
            &headers,
            model.as_deref(),
            address,
        ),
        PolicyCommand::Schema { tests } => {
            if tests {
                print!("{}", egress_policy::schema::tests_schema_json());
            } else {
                print!("{}", egress_policy::schema::policy_schema_json());
            }
            ExitCode::SUCCESS
        }
        PolicyCommand::Suggest(args) => super::suggest::run(args),
    }
}

fn check(policies: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in policies {
        match Policy::load_file(path) {
            Ok(p) => {
                let pathways = p.pathways().count();
                println!(
                    "{}: ok ({} rules, {} agents, {pathways} pathways, mode {})",
                    path.display(),
                    p.rules().count(),
                    p.agent_names().count(),
                    p.mode()
                );
            }
            Err(e) => {
                ok = false;
                for e in e.errors() {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Loads a policy, or prints every error in it and gives the exit code for bad input.
fn load_or_report(path: &Path) -> Result<Policy, ExitCode> {
    Policy::load_file(path).map_err(|e| {
        for e in e.errors() {
            eprintln!("error: {e}");
        }
        ExitCode::from(INVALID_INPUT)
    })
}

fn test(policy: &Path, tests: &[PathBuf]) -> ExitCode {
    let policy = match load_or_report(policy) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // Validate every test file before running any, so exit 2 means nothing ran.
    let mut files = Vec::new();
    for path in tests {
        match load_tests(path) {
            Ok(cases) => files.push((path, cases)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(INVALID_INPUT);
            }
        }
    }
    let (mut passed, mut failed) = (0, 0);
    for (path, cases) in &files {
        let report = run_tests(&policy, cases);
        for f in report.failures() {
            println!("FAIL {}: {}", path.display(), f.name);
            println!("  expected: {}", f.expected);
            println!("  got:      {}", f.got);
            println!("  why:      {}", f.why);
        }
        passed += report.passed();
        failed += report.failed();
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn explain(
    policy: &Path,
    source: &str,
    request: &str,
    headers: &[String],
    model: Option<&str>,
    address: Option<std::net::SocketAddr>,
) -> ExitCode {
    let policy = match load_or_report(policy) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let source: SpiffeId = match source.parse() {
        Ok(id) => id,
        Err(e) => {
            eprintln!("error: --source {source:?}: {e}");
            return ExitCode::from(INVALID_INPUT);
        }
    };
    let line = match RequestLine::parse(request) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(INVALID_INPUT);
        }
    };
    let mut hs = Vec::new();
    for h in headers {
        match h.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                hs.push((k.trim().to_ascii_lowercase(), v.to_owned()))
            }
            _ => {
                eprintln!("error: --header {h:?}: expected NAME=VALUE");
                return ExitCode::from(INVALID_INPUT);
            }
        }
    }
    let req = Request {
        source: &source,
        source_address: address,
        kind: line.kind,
        method: &line.method,
        host: &line.host,
        port: line.port,
        path: &line.path,
        query: &line.query,
        headers: &hs,
        llm_model: model,
        now: SystemTime::now(),
    };
    print!("{}", policy.explain(&req));
    ExitCode::SUCCESS
}
