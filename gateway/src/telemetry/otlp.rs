//! OTLP span export (gRPC or HTTP/protobuf) with delivery counted in metrics.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;

use crate::config::{OtlpProtocol, Telemetry as TelemetryConfig};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint `{endpoint}`: {reason}")]
    Exporter { endpoint: String, reason: String },
}

pub(super) fn provider(
    cfg: &TelemetryConfig,
    metrics: &Arc<Metrics>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &cfg.otlp_endpoint {
        let bad = |e: &dyn std::fmt::Display| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        };
        // A slow collector must not hold spans (or shutdown) for long.
        let timeout = Duration::from_secs(3);
        let exporter = match cfg.otlp_protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(timeout)
                .build()
                .map_err(|e| bad(&e))?,
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(http_traces_url(endpoint))
                .with_timeout(timeout)
                .build()
                .map_err(|e| bad(&e))?,
        };
        let counted = CountingExporter {
            inner: exporter,
            metrics: metrics.clone(),
        };
        let processor = BatchSpanProcessor::builder(counted)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(8192)
                    .with_scheduled_delay(Duration::from_millis(500))
                    .build(),
            )
            .build();
        builder = builder.with_span_processor(processor);
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

#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.metrics.spans_exported.inc_by(n);
            }
            Err(e) => {
                self.metrics.spans_dropped.inc_by(n);
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
        self.inner.set_resource(resource);
    }
}
