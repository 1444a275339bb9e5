//! The audit log: one JSON line per request or tunnel, allowed or denied.
//!
//! Records go through an unbounded channel to one writer thread, so a slow disk never
//! holds a request, and nothing accepted into the channel is lost: shutdown drains it
//! and flushes before returning. The thread writes with plain blocking calls, a burst
//! of records at a time: it waits 10 ms after each burst, so records gather instead of
//! waking it one by one (a wake-up costs the request's thread a futex call and this
//! one two context switches and a write), and nothing hops through the runtime's
//! blocking pool. A line reaches the file at most that much later; Envoy's access log
//! flushes once a second by default.
//!
//! A file log rotates by size when `audit_log_max_bytes` is set (`audit.log` moves to
//! `audit.log.1`, `.1` to `.2`, ..., keeping `audit_log_keep` files; a line is never
//! split between two files), and is reopened on request (SIGUSR1), after an external
//! rotator such as logrotate moved it.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{AuditRotation, AuditSink};

/// One audit line. Field names are part of the product contract.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    /// RFC 3339 with milliseconds, UTC.
    pub ts: String,
    pub trace_id: String,
    pub span_id: String,
    pub source_spiffe_id: String,
    pub source_address: String,
    pub agent: Option<String>,
    /// `connect` or `http`.
    pub kind: &'static str,
    pub method: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    /// True for a request the gateway read inside an agent's TLS it terminated
    /// (interception), and for the tunnel that carried it when that tunnel failed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tls_intercepted: bool,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// False when a denial was only logged (audit mode); `decision` stays `deny`.
    pub enforced: bool,
    pub rule: Option<String>,
    pub pathway: Option<String>,
    pub reason: String,
    /// Dry-run deny rules that matched ("would deny").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run_rules: Vec<String>,
    /// HTTP status the agent got (200 for an opened tunnel).
    pub status: u16,
    pub resolved_ip: Option<String>,
    /// Bytes sent to the destination (agent -> upstream).
    pub bytes_sent: u64,
    /// Bytes received from the destination (upstream -> agent).
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// Why a request failed after it was allowed (upstream error, tunnel closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The limit that fired, for 429 and 413.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// `gen_ai.system` of the API the request spoke (`openai`, `anthropic`,
    /// `gcp.gemini`), on pathways with `models` or `llm_tokens_per_hour`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_provider: Option<&'static str>,
    /// The model the request named (body `model`, or a Gemini path's `models/{model}:`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_model: Option<String>,
    /// The model the response named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_response_model: Option<String>,
    /// Tokens charged to `llm_tokens_per_hour`, as reported or estimated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_total_tokens: Option<u64>,
    /// `reported` (the provider's usage) or `estimated` (from the bytes, when no usage
    /// could be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_usage_source: Option<&'static str>,
    /// On MCP pathways, one line per JSON-RPC message: its `method` (none for a
    /// response the agent sends to a request of the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_method: Option<String>,
    /// The tool a `tools/call` named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_tool: Option<String>,
    /// The message's JSON-RPC `id`, as JSON text (`7`, `"abc"`); none for notifications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_request_id: Option<String>,
    /// Metric label for the tool: the `mcp.tools` entry that allowed it, `other` for
    /// tools the pathway does not list (labels stay bounded by the policy).
    #[serde(skip)]
    pub mcp_tool_label: Option<String>,
    /// What `inspect` found, per detector, direction and action (never the text).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dlp: Vec<DlpFinding>,
    /// The guard classifier's verdict: `allow`, `deny`, `timeout` or `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<&'static str>,
}

/// One `dlp` entry of an audit line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DlpFinding {
    /// Stable detector name (`openai_api_key`, `email`, an operator pattern's name).
    pub detector: String,
    /// `request` or `response`.
    pub direction: &'static str,
    /// `deny`, `redact` or `audit`.
    pub action: &'static str,
    pub count: u32,
}

/// Adds findings to a line's `dlp`, one entry per detector, direction and action.
pub fn merge_dlp(into: &mut Vec<DlpFinding>, entries: Vec<DlpFinding>) {
    for e in entries {
        match into.iter_mut().find(|f| {
            f.detector == e.detector && f.direction == e.direction && f.action == e.action
        }) {
            Some(f) => f.count = f.count.saturating_add(e.count),
            None => into.push(e),
        }
    }
}

enum Msg {
    Record(Box<AuditRecord>),
    Flush(oneshot::Sender<()>),
    Reopen(oneshot::Sender<Result<(), AuditError>>),
}

/// Cheap to clone; every clone feeds the same writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Msg>,
}

/// Owns the writer thread; `close` drains and flushes.
pub struct AuditWriter {
    done: oneshot::Receiver<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot rotate audit log {path}: {source}")]
    Rotate {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuditLog {
    pub async fn open(sink: &AuditSink) -> Result<(AuditLog, AuditWriter), AuditError> {
        Self::open_rotating(sink, None).await
    }

    /// Like [`AuditLog::open`]; a file sink rotates by size when `rotation` is set.
    pub async fn open_rotating(
        sink: &AuditSink,
        rotation: Option<AuditRotation>,
    ) -> Result<(AuditLog, AuditWriter), AuditError> {
        let (out, name) = match sink {
            AuditSink::Stdout => (
                Out::Stdout(BufWriter::with_capacity(WRITE_BUFFER, std::io::stdout())),
                PathBuf::from("stdout"),
            ),
            AuditSink::File(path) => (
                Out::File(AuditFile::open(path.clone(), rotation)?),
                path.clone(),
            ),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                write_loop(rx, out);
                let _ = done_tx.send(());
            })
            .map_err(|source| AuditError::Open { path: name, source })?;
        Ok((AuditLog { tx }, AuditWriter { done }))
    }

    /// Flushes, closes and reopens a file log at its path (SIGUSR1, after logrotate
    /// moved it); records keep their order across the switch. Nothing for stdout.
    pub async fn reopen(&self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Reopen(tx)).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    pub fn record(&self, record: AuditRecord) {
        if self.tx.send(Msg::Record(Box::new(record))).is_err() {
            tracing::error!("audit log writer has stopped; a record was lost");
        }
    }

    /// Waits until every record sent before this call is written and flushed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl AuditWriter {
    /// Call after every `AuditLog` clone is dropped: writes what is queued and flushes.
    pub async fn close(self) {
        let _ = self.done.await;
    }
}

/// Bytes buffered between flushes; a burst of records larger than this is written in
/// several calls.
const WRITE_BUFFER: usize = 64 * 1024;

/// Where the writer thread writes.
enum Out {
    Stdout(BufWriter<std::io::Stdout>),
    File(AuditFile),
}

impl Out {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Stdout(w) => w.write_all(line),
            Out::File(f) => f.write_line(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::Stdout(w) => w.flush(),
            Out::File(f) => f.out.flush(),
        }
    }
}

/// A file audit log: its path, the open file, and how much it holds.
struct AuditFile {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    size: u64,
    rotation: Option<AuditRotation>,
}

impl AuditFile {
    fn open(path: PathBuf, rotation: Option<AuditRotation>) -> Result<Self, AuditError> {
        let (out, size) = open_append(&path)?;
        Ok(AuditFile {
            path,
            out,
            size,
            rotation,
        })
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let len = line.len() as u64;
        if let Some(r) = self.rotation {
            if self.size > 0 && self.size + len > r.max_bytes {
                if let Err(e) = self.rotate(r.keep) {
                    // Better a file past its size than a lost record.
                    tracing::error!(error = %e, path = %self.path.display(), "cannot rotate the audit log");
                }
            }
        }
        self.out.write_all(line)?;
        self.size += len;
        Ok(())
    }

    /// `path.{keep-1}` -> `path.{keep}`, ..., `path` -> `path.1`, then a new `path`.
    fn rotate(&mut self, keep: usize) -> Result<(), AuditError> {
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Rotate { path, source }
        };
        self.out.flush().map_err(failed(&self.path))?;
        // The oldest kept file is overwritten by the next one down.
        for n in (1..keep).rev() {
            let from = numbered(&self.path, n);
            match std::fs::rename(&from, numbered(&self.path, n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(AuditError::Rotate { path: from, source }),
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1)).map_err(failed(&self.path))?;
        self.reopen()
    }

    fn reopen(&mut self) -> Result<(), AuditError> {
        // Flush into the old file first: its lines stay where they were written.
        let _ = self.out.flush();
        let (out, size) = open_append(&self.path)?;
        self.out = out;
        self.size = size;
        Ok(())
    }
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn open_append(path: &Path) -> Result<(BufWriter<std::fs::File>, u64), AuditError> {
    let err = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    Ok((BufWriter::with_capacity(WRITE_BUFFER, file), size))
}

/// The writer thread: runs until every `AuditLog` clone is dropped.
fn write_loop(mut rx: mpsc::UnboundedReceiver<Msg>, mut out: Out) {
    let mut line = Vec::with_capacity(512);
    while let Some(msg) = rx.blocking_recv() {
        let mut pending = Some(msg);
        // Write everything queued, then flush once: one syscall per burst, not per line.
        while let Some(msg) = pending.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Record(record) => {
                    line.clear();
                    if let Err(e) = serde_json::to_writer(&mut line, &record) {
                        tracing::error!(error = %e, "cannot encode audit record");
                        continue;
                    }
                    line.push(b'\n');
                    if let Err(e) = out.write_line(&line) {
                        tracing::error!(error = %e, "cannot write audit log");
                    }
                }
                Msg::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
                Msg::Reopen(done) => {
                    let result = match &mut out {
                        Out::Stdout(w) => {
                            let _ = w.flush();
                            Ok(())
                        }
                        Out::File(f) => f.reopen(),
                    };
                    if let Err(e) = &result {
                        // The old file stays open: records keep being written.
                        tracing::error!(error = %e, "cannot reopen the audit log");
                    }
                    let _ = done.send(result);
                }
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "cannot flush audit log");
        }
        // Let the next records gather rather than waking this thread for each one: a
        // burst per 10 ms, not a wake-up and a syscall per request.
        std::thread::sleep(GATHER);
    }
    let _ = out.flush();
}

/// How long the writer waits after each burst.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
