//! Traces (OpenTelemetry, exported with OTLP), metrics and diagnostic logs.
//!
//! Every request or tunnel gets one span. Its parent is the agent's `traceparent`, its
//! IDs go into the audit line, and it is the parent of the `traceparent` the gateway
//! sends upstream. Export is batched on a background thread: a collector that is down
//! or slow costs dropped spans (counted), never a slower or failed request.

mod otlp;
pub mod trace_context;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

use crate::config;
use crate::metrics::Metrics;

pub use otlp::TelemetryError;
pub use trace_context::TraceContext;

/// The tracer and metrics every request reports to.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    pub metrics: Arc<Metrics>,
    exporting: bool,
}

impl Telemetry {
    /// Exports spans when an OTLP endpoint is configured; otherwise spans still get IDs
    /// (for the audit log and `traceparent`) but go nowhere.
    pub fn new(cfg: &config::Telemetry) -> Result<Self, TelemetryError> {
        let metrics = Arc::new(Metrics::new());
        let provider = otlp::provider(cfg, &metrics)?;
        Ok(Self::from_provider(
            provider,
            metrics,
            cfg.otlp_endpoint.is_some(),
        ))
    }

    /// No export: for tests and tools that only need IDs and metrics.
    pub fn disabled() -> Self {
        let provider = SdkTracerProvider::builder()
            .with_id_generator(PresetIds)
            .build();
        Self::from_provider(provider, Arc::new(Metrics::new()), false)
    }

    fn from_provider(provider: SdkTracerProvider, metrics: Arc<Metrics>, exporting: bool) -> Self {
        use opentelemetry::trace::TracerProvider as _;
        let tracer = provider.tracer("egress-gateway");
        Telemetry {
            provider,
            tracer,
            metrics,
            exporting,
        }
    }

    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Starts the span of one request; `parent` is the agent's trace context, if any.
    /// Its IDs exist at once (for the audit line and `traceparent`); the span itself
    /// is built when the request ends, from the attributes it ended with, and not at
    /// all when the request is [`RequestSpan::discard`]ed.
    pub fn start_span(&self, method: &str, parent: Option<TraceContext>) -> RequestSpan {
        let ctx = TraceContext {
            trace_id: match parent {
                Some(p) => p.trace_id,
                None => nonzero_id(),
            },
            span_id: nonzero_id(),
            // Parent-based sampling, as the SDK's default sampler decides it.
            sampled: parent.is_none_or(|p| p.sampled),
        };
        RequestSpan {
            // Nothing to build for a span that goes nowhere.
            recorded: self.exporting && ctx.sampled,
            tracer: self.tracer.clone(),
            name: span_name(method),
            parent,
            start: SystemTime::now(),
            attributes: Vec::new(),
            ctx,
        }
    }

    /// Exports what is queued (bounded); call once at shutdown.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        // The SDK's shutdown blocks the calling thread.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::task::spawn_blocking(move || provider.shutdown()),
        )
        .await;
    }

    /// Exports what is queued now (tests use it to see spans without waiting).
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

/// The span of one request or tunnel, until it ends.
pub struct RequestSpan {
    recorded: bool,
    tracer: SdkTracer,
    name: std::borrow::Cow<'static, str>,
    parent: Option<TraceContext>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    pub ctx: TraceContext,
}

impl RequestSpan {
    /// Whether the span is exported (an OTLP endpoint is set and the trace is
    /// sampled): attributes are worth building only then.
    pub fn is_recorded(&self) -> bool {
        self.recorded
    }

    pub fn set(&mut self, attrs: impl IntoIterator<Item = KeyValue>) {
        self.attributes.extend(attrs);
    }

    pub fn end(self, status: u16, error: Option<&str>) {
        if !self.recorded {
            return;
        }
        let parent_cx = match self.parent {
            Some(p) => Context::new().with_remote_span_context(p.to_span_context()),
            None => Context::new(),
        };
        PRESET.set(Some((self.ctx.trace_id, self.ctx.span_id)));
        let mut span: Span = self
            .tracer
            .span_builder(self.name)
            .with_kind(SpanKind::Server)
            .with_start_time(self.start)
            .with_attributes(self.attributes)
            .start_with_context(&self.tracer, &parent_cx);
        PRESET.set(None);
        if status >= 500 {
            span.set_status(Status::error(
                error
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("HTTP {status}")),
            ));
        }
        span.end_with_timestamp(SystemTime::now());
    }

    /// Ends without a span (an intercepted tunnel: its requests have their own).
    pub fn discard(self) {}
}

/// A request's span is named after its method: the standard ones need no copy.
fn span_name(method: &str) -> std::borrow::Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|m| **m == method) {
        Some(m) => std::borrow::Cow::Borrowed(m),
        None => std::borrow::Cow::Owned(method.to_string()),
    }
}

thread_local! {
    /// The IDs the next span built on this thread takes (see [`PresetIds`]).
    static PRESET: std::cell::Cell<Option<([u8; 16], [u8; 8])>> = const { std::cell::Cell::new(None) };
}

/// Gives the span being built the IDs its request has carried since it began (in the
/// audit line, in `traceparent` upstream); the SDK's builder ignores preset IDs.
#[derive(Debug)]
struct PresetIds;

impl opentelemetry_sdk::trace::IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        match PRESET.get() {
            Some((t, _)) => TraceId::from_bytes(t),
            None => TraceId::from_bytes(nonzero_id()),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match PRESET.get() {
            Some((_, s)) => SpanId::from_bytes(s),
            None => SpanId::from_bytes(nonzero_id()),
        }
    }
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
