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

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
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
        let provider = SdkTracerProvider::builder().build();
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
    pub fn start_span(&self, method: &str, parent: Option<TraceContext>) -> RequestSpan {
        let parent_cx = match parent {
            Some(p) => Context::new().with_remote_span_context(p.to_span_context()),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Server)
            .with_start_time(SystemTime::now())
            .start_with_context(&self.tracer, &parent_cx);
        let ctx = TraceContext::from_span_context(span.span_context());
        RequestSpan { span, ctx }
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

/// The span of one request or tunnel.
pub struct RequestSpan {
    span: Span,
    pub ctx: TraceContext,
}

impl RequestSpan {
    pub fn set(&mut self, attrs: impl IntoIterator<Item = KeyValue>) {
        self.span.set_attributes(attrs);
    }

    pub fn end(mut self, status: u16, error: Option<&str>) {
        if status >= 500 {
            self.span.set_status(Status::error(
                error
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("HTTP {status}")),
            ));
        }
        self.span.end_with_timestamp(SystemTime::now());
    }
}

/// Diagnostic logs go to stderr (stdout is the default audit sink), filtered by
/// `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
