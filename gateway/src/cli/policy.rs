//! `egress-gateway policy ...`: check, test, explain, schema.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;
use egress_policy::testing::{load_tests, run_tests};
use egress_policy::{Policy, Request, RequestLine, SpiffeId};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files; exit 0 if all are valid, 1 otherwise. Also reads every
    /// `secret_file` and `ca_file` as the gateway would, and warns (exit 0) about
    /// over-broad entries.
    Check {
        #[arg(required = true)]
        policies: Vec<PathBuf>,
        /// Skip reading `secret_file`s and `ca_file`s (for CI without the secrets).
        #[arg(long)]
        no_files: bool,
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
        /// On an MCP pathway: the JSON-RPC message in the body, e.g.
        /// `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{}}}`.
        #[arg(long, value_name = "JSON")]
        mcp_message: Option<String>,
        /// On an MCP pathway: a `tools/call` of this tool, without arguments.
        #[arg(long, value_name = "TOOL", conflicts_with = "mcp_message")]
        mcp_tool: Option<String>,
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
        PolicyCommand::Check { policies, no_files } => check(&policies, !no_files),
        PolicyCommand::Test { policy, tests } => test(&policy, &tests),
        PolicyCommand::Explain {
            policy,
            source,
            request,
            headers,
            model,
            address,
            mcp_message,
            mcp_tool,
        } => match mcp_call(mcp_message.as_deref(), mcp_tool) {
            Ok(mcp) => explain(
                &policy,
                &source,
                &request,
                &headers,
                model.as_deref(),
                address,
                mcp.as_ref(),
            ),
            Err(code) => code,
        },
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

fn check(policies: &[PathBuf], read_files: bool) -> ExitCode {
    let mut ok = true;
    for path in policies {
        match Policy::load_file(path) {
            Ok(p) => {
                let file_errors = if read_files {
                    check_files(&p)
                } else {
                    Vec::new()
                };
                for w in p.warnings() {
                    eprintln!("warning: {w}");
                }
                if !file_errors.is_empty() {
                    ok = false;
                    for e in file_errors {
                        eprintln!("error: {e}");
                    }
                    continue;
                }
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

/// Reads every `secret_file` and `ca_file` the policy names, with the gateway's own
/// checks (regular file, size cap, a usable credential or certificates); one message
/// per problem, naming the pathway and the file.
fn check_files(policy: &Policy) -> Vec<String> {
    use crate::files::{read_file_blocking, FileKind};
    let mut errors = Vec::new();
    for pathway in policy.pathways() {
        let Some(up) = &pathway.upstream else {
            continue;
        };
        let ctx = format!(
            "{}: agent {:?}, pathway {:?}",
            policy.origin(),
            pathway.agent,
            pathway.name
        );
        for (header, secret) in &up.inject_headers {
            let path = &secret.secret_file;
            let checked = read_file_blocking(path, FileKind::Secret)
                .map_err(crate::upstream::SecretError::from)
                .and_then(|bytes| crate::upstream::secrets::parse_secret(path, bytes));
            if let Err(e) = checked {
                errors.push(format!("{ctx}: inject_headers.{header}: {e}"));
            }
        }
        if let Some(ca) = &up.ca_file {
            let checked = read_file_blocking(ca, FileKind::CaBundle)
                .map_err(crate::upstream::OriginationError::from)
                .and_then(|pem| crate::upstream::tls::parse_ca_pem(ca, &pem));
            if let Err(e) = checked {
                errors.push(format!("{ctx}: upstream.ca_file: {e}"));
            }
        }
    }
    errors
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

/// The MCP message `--mcp-message` or `--mcp-tool` names, if any.
fn mcp_call(
    message: Option<&str>,
    tool: Option<String>,
) -> Result<Option<egress_policy::McpCall>, ExitCode> {
    if let Some(text) = message {
        return match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) if v.get("method").is_some_and(|m| m.is_string()) => {
                Ok(Some(egress_policy::McpCall::from_message(&v)))
            }
            Ok(_) => {
                eprintln!("error: --mcp-message: a JSON-RPC message with a string `method`");
                Err(ExitCode::from(INVALID_INPUT))
            }
            Err(e) => {
                eprintln!("error: --mcp-message: not JSON: {e}");
                Err(ExitCode::from(INVALID_INPUT))
            }
        };
    }
    Ok(tool.map(|t| egress_policy::McpCall {
        method: egress_policy::mcp::TOOLS_CALL.into(),
        name: Some(t),
        arguments: Default::default(),
    }))
}

fn explain(
    policy: &Path,
    source: &str,
    request: &str,
    headers: &[String],
    model: Option<&str>,
    address: Option<std::net::SocketAddr>,
    mcp: Option<&egress_policy::McpCall>,
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
            Some((k, v)) if !k.trim().is_empty() => hs.push((k.trim(), v)),
            _ => {
                eprintln!("error: --header {h:?}: expected NAME=VALUE");
                return ExitCode::from(INVALID_INPUT);
            }
        }
    }
    let path_model = egress_policy::model_from_path(&line.path);
    let req = Request {
        source: &source,
        source_address: address,
        kind: line.kind,
        method: &line.method,
        host: &line.host,
        port: line.port,
        path: &line.path,
        query: &line.query,
        // The same view the gateway builds: a repeated --header joins like a repeated header.
        headers: &egress_policy::HeaderView::new(hs),
        // A Gemini-style path names the model the upstream runs, as live traffic reads it.
        llm_model: path_model.as_deref().or(model),
        now: SystemTime::now(),
    };
    print!("{}", policy.explain_mcp(&req, mcp));
    ExitCode::SUCCESS
}
