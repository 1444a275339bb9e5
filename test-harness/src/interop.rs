//! The interop clients under `test-harness/interop/` (official LLM SDKs for Python and
//! Node, a Go `net/http` client): where they live, how to run them with nothing but
//! proxy and CA variables, and what they print (one JSON line per step).
//!
//! The Python SDKs live in the interop venv and the Node packages in the interop cache
//! that `scripts/install-deps.sh` fills (`EGRESS_INTEROP_VENV`, `EGRESS_NODE_INTEROP`).
//! A missing one fails the test under `EGRESS_REQUIRE_DEPS=1` or `CI`, else skips it
//! with a message.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::llm_upstream::{FAKE_STREAM_DELTAS, FAKE_TEXT};

/// The key the agent's SDK holds: it must never reach an upstream behind the gateway.
pub const AGENT_KEY: &str = "sk-agent-side-dummy-key";

pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

pub fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
}

/// Reports that `what` is missing: a loud skip message, or a failure when the
/// dependencies are required (`EGRESS_REQUIRE_DEPS=1`, `CI`).
pub fn missing(what: &str) {
    assert!(
        !crate::deps_required(),
        "{what} is required here (run scripts/install-deps.sh)"
    );
    // Straight to stderr: the harness captures eprintln! of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPING: {what} is missing; run scripts/install-deps.sh ***\n"
    );
}

/// The interop venv's python, if it can import `module`.
pub fn interop_python(module: &str) -> Option<PathBuf> {
    let python = match std::env::var_os("EGRESS_INTEROP_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("EGRESS_INTEROP_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".cache/egress-gateway/venv-interop"))
            .join("bin/python"),
    };
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else {
        missing(&format!(
            "the Python package `{module}` in {}",
            python.display()
        ));
        None
    }
}

/// The Node interop cache, if `node` runs and `openai` and `undici` are installed there.
pub fn node_interop() -> Option<PathBuf> {
    let dir = std::env::var_os("EGRESS_NODE_INTEROP")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/egress-gateway/node-interop"));
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let pkgs_ok = ["openai", "undici"].iter().all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .is_file()
    });
    if node_ok && pkgs_ok {
        Some(dir)
    } else {
        missing(&format!(
            "node with the `openai` and `undici` packages in {}",
            dir.display()
        ));
        None
    }
}

/// Builds the Go client (standard library only, as sidecar_interop builds its own).
pub async fn build_go_client(dir: &Path) -> Option<PathBuf> {
    let go = ["go", "/usr/local/go/bin/go", "/usr/lib/go/bin/go"]
        .into_iter()
        .find(|g| Command::new(g).arg("version").output().is_ok());
    let Some(go) = go else {
        missing("go");
        return None;
    };
    let binary = dir.join("go_https_client");
    let mut build = Command::new(go);
    build
        .arg("build")
        .arg("-o")
        .arg(&binary)
        .arg(interop_dir().join("go_https_client/main.go"))
        .current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GO111MODULE", "auto");
    let out = run(build).await;
    assert!(
        out.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(binary)
}

/// Runs a blocking client process off the async runtime.
pub async fn run(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run the interop client: {e}"))
}

// === what the clients print ===

/// The JSON lines a client printed, by step; panics with its output when one is not JSON.
pub struct Steps {
    pub lines: Vec<Value>,
    pub output: String,
}

impl Steps {
    pub fn parse(out: &std::process::Output) -> Steps {
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let output = format!(
            "exit: {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Shown with --nocapture, or when the test fails.
        eprintln!("{output}");
        let lines = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{output}"))
            })
            .collect();
        Steps { lines, output }
    }

    pub fn step(&self, name: &str) -> &Value {
        self.lines
            .iter()
            .find(|l| l["step"] == name)
            .unwrap_or_else(|| panic!("no {name} step\n{}", self.output))
    }

    /// The completion and stream steps succeeded with the fake's text and `model`.
    pub fn expect_answers(&self, model: &str) {
        let c = self.step("completion");
        assert_eq!(c["ok"], true, "{}", self.output);
        assert_eq!(c["text"], FAKE_TEXT, "{}", self.output);
        assert_eq!(c["model"], model, "{}", self.output);
        let s = self.step("stream");
        assert_eq!(s["ok"], true, "{}", self.output);
        assert_eq!(s["text"], FAKE_STREAM_DELTAS.concat(), "{}", self.output);
        assert_eq!(s["chunks"], FAKE_STREAM_DELTAS.len(), "{}", self.output);
    }

    pub fn expect_denied_skipped(&self, success: bool) {
        let d = self.step("denied");
        assert_eq!(d["skipped"], true, "{}", self.output);
        assert!(success, "every step ok, exit 0 expected\n{}", self.output);
    }

    pub fn expect_denied_403(&self, success: bool) {
        let d = self.step("denied");
        assert_eq!(d["ok"], true, "{}", self.output);
        assert_eq!(d["status"], 403, "{}", self.output);
        assert_eq!(d["body_error"], "egress_denied", "{}", self.output);
        assert!(success, "every step ok, exit 0 expected\n{}", self.output);
    }

    /// The SDK's error message (`str(e)`, `e.message`) for the denied step shows the
    /// gateway's reason: it names `model`.
    pub fn expect_denied_message_names(&self, model: &str) {
        let message = self.step("denied")["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("model \"{model}\" not allowed")),
            "the SDK's message hides the gateway's reason: {message:?}\n{}",
            self.output
        );
    }
}

// === the environment the clients get ===

/// A command with nothing inherited but PATH and HOME (no stray proxy, base-URL or
/// SDK variables), the agent-side key for both SDKs, and the fake's CA for every
/// runtime's trust variable.
pub fn client_command(program: impl AsRef<std::ffi::OsStr>, ca: &Path, model: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for var in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.env("OPENAI_API_KEY", AGENT_KEY)
        .env("ANTHROPIC_API_KEY", AGENT_KEY)
        .env("SSL_CERT_FILE", ca)
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("NODE_EXTRA_CA_CERTS", ca)
        .env("EGRESS_TEST_MODEL", model)
        .env("EGRESS_TEST_TIMEOUT", "20")
        // No __pycache__ (sdk_steps.py is imported) inside the repository.
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

pub fn with_proxy(cmd: &mut Command, proxy: &str) {
    for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        cmd.env(var, proxy);
    }
}
