//! Traces (OpenTelemetry, exported with OTLP), metrics and diagnostic logs.
//!
//! Every request or tunnel gets one span. Its parent is the agent's `traceparent`, its
//! IDs go into the audit line, and it is the parent of the `traceparent` the gateway
//! sends upstream. A span is encoded as OTLP protobuf when its request ends and exported
//! in batches by a task of its own: a collector that is down or slow costs dropped spans
//! (counted), never a slower or failed request.

mod otlp;
mod span_encoding;
pub mod trace_context;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config;
use crate::metrics::Metrics;

pub use otlp::TelemetryError;
pub use span_encoding::Attributes;
pub use trace_context::TraceContext;

/// The span exporter and metrics every request reports to.
pub struct Telemetry {
    exporter: Option<otlp::Exporter>,
    pub metrics: Arc<Metrics>,
}

impl Telemetry {
    /// Exports spans when an OTLP endpoint is configured; otherwise spans still get IDs
    /// (for the audit log and `traceparent`) but go nowhere. Call within the gateway's
    /// runtime, which runs the export.
    pub fn new(cfg: &config::Telemetry) -> Result<Self, TelemetryError> {
        let metrics = Arc::new(Metrics::new());
        let exporter = match &cfg.otlp_endpoint {
            Some(endpoint) => Some(otlp::Exporter::start(cfg, endpoint, &metrics)?),
            None => None,
        };
        Ok(Telemetry { exporter, metrics })
    }

    /// Starts the span of one request; `parent` is the agent's trace context, if any.
    /// Its IDs exist at once (for the audit line and `traceparent`); the span itself
    /// is encoded when the request ends, from the attributes it ended with, and not at
    /// all when the request is [`RequestSpan::discard`]ed.
    pub fn start_span(&self, method: &str, parent: Option<TraceContext>) -> RequestSpan {
        let ctx = TraceContext {
            trace_id: match parent {
                Some(p) => p.trace_id,
                None => nonzero_id(),
            },
            span_id: nonzero_id(),
            // Parent-based sampling: the agent's decision when it sent one, else on.
            sampled: parent.is_none_or(|p| p.sampled),
        };
        RequestSpan {
            // Nothing to build for a span that goes nowhere.
            recorded: self.exporter.is_some() && ctx.sampled,
            name: span_name(method),
            parent,
            start: SystemTime::now(),
            ctx,
        }
    }

    /// Ends `span` with the attributes its request ended with; a 5xx `status` marks
    /// it failed, with `error` (or the status) as the message.
    pub fn end_span(
        &self,
        span: RequestSpan,
        attributes: &Attributes,
        status: u16,
        error: Option<&str>,
    ) {
        let Some(exporter) = self.exporter.as_ref().filter(|_| span.recorded) else {
            return;
        };
        let status_message;
        let error = if status >= 500 {
            match error {
                Some(e) => Some(e),
                None => {
                    status_message = format!("HTTP {status}");
                    Some(status_message.as_str())
                }
            }
        } else {
            None
        };
        exporter.push(&span_encoding::SpanFields {
            trace_id: &span.ctx.trace_id,
            span_id: &span.ctx.span_id,
            remote_parent: span.parent.as_ref().map(|p| &p.span_id),
            sampled: span.ctx.sampled,
            name: &span.name,
            start_unix_nanos: unix_nanos(span.start),
            end_unix_nanos: unix_nanos(SystemTime::now()),
            attributes,
            error,
        });
    }

    /// Exports what is queued (bounded); call once at shutdown.
    pub async fn shutdown(&self) {
        if let Some(exporter) = &self.exporter {
            let _ = tokio::time::timeout(Duration::from_secs(5), exporter.shutdown()).await;
        }
    }

    /// Exports what is queued now (tests use it to see spans without waiting).
    pub async fn flush(&self) {
        if let Some(exporter) = &self.exporter {
            exporter.flush().await;
        }
    }
}

/// The span of one request or tunnel, until it ends.
pub struct RequestSpan {
    recorded: bool,
    name: Cow<'static, str>,
    parent: Option<TraceContext>,
    start: SystemTime,
    pub ctx: TraceContext,
}

impl RequestSpan {
    /// Whether the span is exported (an OTLP endpoint is set and the trace is
    /// sampled): attributes are worth building only then.
    pub fn is_recorded(&self) -> bool {
        self.recorded
    }

    /// Ends without a span (an intercepted tunnel: its requests have their own).
    pub fn discard(self) {}
}

/// A request's span is named after its method: the standard ones need no copy.
fn span_name(method: &str) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|m| **m == method) {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(method.to_string()),
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A random trace or span ID (never all zeroes, which W3C trace context forbids).
fn nonzero_id<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id.iter().any(|b| *b != 0) {
            return id;
        }
    }
}

/// Diagnostic logs go to stderr (stdout is the default audit sink), filtered by
/// `RUST_LOG` (default `info`): readable text on a terminal, one JSON object per line
/// otherwise (a container log, a file, a pipe), which log collectors parse as is and
/// which never holds ANSI colour codes.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
    };
}
