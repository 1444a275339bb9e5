//! The audit log: one JSON line per request or tunnel, allowed or denied.
//!
//! Records go through an unbounded channel to one writer task, so a slow disk never
//! holds a request, and nothing accepted into the channel is lost: shutdown drains it
//! and flushes before returning.

use std::path::PathBuf;

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};

use crate::config::AuditSink;

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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_tokens: Option<u64>,
}

enum Msg {
    Record(Box<AuditRecord>),
    Flush(oneshot::Sender<()>),
}

/// Cheap to clone; every clone feeds the same writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Msg>,
}

/// Owns the writer task; `close` drains and flushes.
pub struct AuditWriter {
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuditLog {
    pub async fn open(sink: &AuditSink) -> Result<(AuditLog, AuditWriter), AuditError> {
        let out: Box<dyn AsyncWrite + Send + Unpin> = match sink {
            AuditSink::Stdout => Box::new(tokio::io::stdout()),
            AuditSink::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| AuditError::Open {
                        path: path.clone(),
                        source,
                    })?;
                Box::new(file)
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(write_loop(rx, BufWriter::new(out)));
        Ok((AuditLog { tx }, AuditWriter { task }))
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
        let _ = self.task.await;
    }
}

async fn write_loop(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
) {
    let mut line = Vec::with_capacity(512);
    while let Some(msg) = rx.recv().await {
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
                    if let Err(e) = out.write_all(&line).await {
                        tracing::error!(error = %e, "cannot write audit log");
                    }
                }
                Msg::Flush(done) => {
                    let _ = out.flush().await;
                    let _ = done.send(());
                }
            }
        }
        if let Err(e) = out.flush().await {
            tracing::error!(error = %e, "cannot flush audit log");
        }
    }
    let _ = out.flush().await;
}

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
