//! OTLP span export (gRPC or HTTP/protobuf) with delivery counted in metrics.
//!
//! The SDK's batch processor runs on its own thread and drives each export with a
//! plain executor, but both exporters are tokio clients (tonic, hyper). So every
//! export runs as a task on the gateway's runtime and the batch thread only waits for
//! it. Every span handed to the exporter ends up counted once: delivered
//! (`egress_otlp_spans_exported_total`) or lost (`egress_otlp_spans_dropped_total`:
//! the queue was full, the collector failed, refused or timed out, or the export task
//! died).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;

use crate::config::{OtlpProtocol, Telemetry as TelemetryConfig};
use crate::metrics::Metrics;

/// Spans waiting for export; more are dropped (and counted), never buffered.
const MAX_QUEUE: usize = 8192;
/// A slow collector must not hold spans (or shutdown) for long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint `{endpoint}`: {reason}")]
    Exporter { endpoint: String, reason: String },
}

pub(super) fn provider(
    cfg: &TelemetryConfig,
    metrics: &Arc<Metrics>,
) -> Result<SdkTracerProvider, TelemetryError> {
    provider_with_queue(cfg, metrics, MAX_QUEUE)
}

fn provider_with_queue(
    cfg: &TelemetryConfig,
    metrics: &Arc<Metrics>,
    max_queue: usize,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_id_generator(super::PresetIds);
    if let Some(endpoint) = &cfg.otlp_endpoint {
        let bad = |reason: String| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            reason,
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| bad("OTLP export needs the gateway's tokio runtime".into()))?;
        let exporter = match cfg.otlp_protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| bad(e.to_string()))?,
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(http_traces_url(endpoint))
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| bad(e.to_string()))?,
        };
        let queued = Arc::new(AtomicUsize::new(0));
        let counted = CountingExporter {
            inner: Arc::new(exporter),
            runtime,
            exported: metrics.spans_exported.clone(),
            dropped: metrics.spans_dropped.clone(),
            queued: queued.clone(),
        };
        let processor = BatchSpanProcessor::builder(counted)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(max_queue)
                    .with_max_export_batch_size(512.min(max_queue))
                    .with_scheduled_delay(Duration::from_millis(500))
                    .build(),
            )
            .build();
        builder = builder.with_span_processor(BoundedQueue {
            inner: processor,
            queued,
            max: max_queue,
            closed: AtomicBool::new(false),
            dropped: metrics.spans_dropped.clone(),
        });
    }
    Ok(builder.build())
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT` names the collector's base URL; the HTTP exporter
/// wants the traces path.
fn http_traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    if trimmed.ends_with("/v1/traces") {
        trimmed.to_string()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

// === impl BoundedQueue ===

/// Admits a span to the batch processor only while fewer than `max` are waiting, so
/// the processor's own queue never overflows (it drops silently) and every span
/// turned away is counted.
#[derive(Debug)]
struct BoundedQueue<P> {
    inner: P,
    /// Spans admitted and not yet through an export (shared with the exporter).
    queued: Arc<AtomicUsize>,
    max: usize,
    closed: AtomicBool,
    dropped: Counter,
}

impl<P: SpanProcessor> SpanProcessor for BoundedQueue<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.closed.load(Ordering::Acquire) {
            self.dropped.inc();
            return;
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.closed.store(true, Ordering::Release);
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

// === impl CountingExporter ===

#[derive(Debug)]
struct CountingExporter<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
    exported: Counter,
    dropped: Counter,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter + 'static> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let inner = self.inner.clone();
        // The exporter's own timeout bounds the request; this one also bounds a
        // client that ignores it, so the batch thread is never stuck.
        let task = self.runtime.spawn(async move {
            match tokio::time::timeout(EXPORT_TIMEOUT * 2, inner.export(batch)).await {
                Ok(result) => result,
                Err(_) => Err(OTelSdkError::Timeout(EXPORT_TIMEOUT * 2)),
            }
        });
        // A runtime that is shutting down cancels the task: the spans are lost too.
        let result = task
            .await
            .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())));
        self.queued.fetch_sub(n, Ordering::AcqRel);
        match &result {
            Ok(()) => {
                self.exported.inc_by(n as u64);
            }
            Err(e) => {
                self.dropped.inc_by(n as u64);
                tracing::debug!(error = %e, spans = n, "OTLP export failed; spans dropped");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Set before the first export, while this is the only holder.
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.set_resource(resource),
            None => tracing::warn!("OTLP exporter busy; resource not updated"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuditSink;
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};

    fn config(endpoint: String, protocol: OtlpProtocol) -> TelemetryConfig {
        TelemetryConfig {
            otlp_endpoint: Some(endpoint),
            otlp_protocol: protocol,
            service_name: "egress-gateway".into(),
            audit_log: AuditSink::Stdout,
            audit_rotation: None,
        }
    }

    /// A collector that accepts connections and never answers: exports time out, and
    /// spans beyond the queue are turned away at once. Every span is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_span_a_stalled_collector_costs_is_counted_on_both_transports() {
        for protocol in [OtlpProtocol::HttpProtobuf, OtlpProtocol::Grpc] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            let held = tokio::spawn(async move {
                let mut open = Vec::new();
                while let Ok((tcp, _)) = listener.accept().await {
                    open.push(tcp);
                }
            });
            let metrics = Arc::new(Metrics::new());
            let provider = provider_with_queue(&config(endpoint, protocol), &metrics, 4).unwrap();
            let tracer = provider.tracer("test");
            for _ in 0..10 {
                tracer.in_span("request", |_| {});
            }
            // Six found the queue full; the four queued fail with the export.
            assert_eq!(metrics.spans_dropped.get(), 6, "{protocol:?}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while metrics.spans_dropped.get() < 10 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(metrics.spans_dropped.get(), 10, "{protocol:?}");
            assert_eq!(metrics.spans_exported.get(), 0, "{protocol:?}");
            held.abort();
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }

    #[test]
    fn the_http_exporter_posts_to_the_traces_path() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
