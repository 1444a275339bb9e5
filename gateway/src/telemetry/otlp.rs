//! OTLP span export (gRPC or HTTP/protobuf) with delivery counted in metrics.
//!
//! A request's span is encoded into the batch being filled ([`SpanQueue::push`]); a
//! task on the gateway's runtime exports a batch when it holds [`BATCH`] spans or
//! every [`SCHEDULED_DELAY`], one export at a time. A full queue or a slow collector
//! costs dropped spans, never a slower request: every span handed to the queue ends up
//! counted once, delivered (`egress_otlp_spans_exported_total`) or lost
//! (`egress_otlp_spans_dropped_total`: the queue was full, or the collector failed,
//! refused or timed out).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot, Notify};

use super::span_encoding::{Origin, SpanFields};
use crate::config::{OtlpProtocol, Telemetry as TelemetryConfig};
use crate::metrics::Metrics;

/// Spans waiting for export, or being exported; more are dropped (and counted).
const MAX_QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// The longest a span waits for its batch to fill.
const SCHEDULED_DELAY: Duration = Duration::from_millis(500);
/// A slow collector must not hold spans (or shutdown) for long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// gRPC method of `opentelemetry.proto.collector.trace.v1.TraceService`.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint `{endpoint}`: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// Where finished spans go, and the task that exports them.
#[derive(Debug)]
pub(super) struct Exporter {
    queue: Arc<SpanQueue>,
    control: mpsc::UnboundedSender<Control>,
}

enum Control {
    /// Export everything queued, then answer.
    Flush(oneshot::Sender<()>),
}

impl Exporter {
    /// Starts the export task on the current runtime.
    pub(super) fn start(
        cfg: &TelemetryConfig,
        endpoint: &str,
        metrics: &Metrics,
    ) -> Result<Self, TelemetryError> {
        Self::start_with_queue(cfg, endpoint, metrics, MAX_QUEUE)
    }

    fn start_with_queue(
        cfg: &TelemetryConfig,
        endpoint: &str,
        metrics: &Metrics,
        max_queue: usize,
    ) -> Result<Self, TelemetryError> {
        let bad = |reason: String| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            reason,
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| bad("OTLP export needs the gateway's tokio runtime".into()))?;
        let transport =
            Transport::new(cfg.otlp_protocol, endpoint, &cfg.otlp_headers).map_err(bad)?;
        let queue = Arc::new(SpanQueue {
            pending: Mutex::new(Pending::default()),
            ready: Notify::new(),
            admitted: AtomicUsize::new(0),
            max: max_queue,
            batch: BATCH.min(max_queue),
            closed: AtomicBool::new(false),
            dropped: metrics.spans_dropped.clone(),
        });
        let (control, commands) = mpsc::unbounded_channel();
        let task = ExportTask {
            queue: queue.clone(),
            origin: Origin::new(&cfg.service_name),
            transport,
            exported: metrics.spans_exported.clone(),
            dropped: metrics.spans_dropped.clone(),
        };
        runtime.spawn(task.run(commands));
        Ok(Exporter { queue, control })
    }

    pub(super) fn push(&self, span: &SpanFields<'_>) {
        self.queue.push(span);
    }

    /// Exports everything queued so far.
    pub(super) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.control.send(Control::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Turns new spans away and exports what is queued.
    pub(super) async fn shutdown(&self) {
        self.queue.closed.store(true, Ordering::Release);
        self.flush().await;
    }
}

// === impl SpanQueue ===

/// Encoded spans waiting for export, in batches.
#[derive(Debug)]
struct SpanQueue {
    pending: Mutex<Pending>,
    /// Signalled when a batch is full.
    ready: Notify,
    /// Spans taken in and not yet through an export: the bound on the queue.
    admitted: AtomicUsize,
    max: usize,
    batch: usize,
    closed: AtomicBool,
    dropped: Counter,
}

#[derive(Debug, Default)]
struct Pending {
    /// The batch being filled: `ScopeSpans.spans` fields, `filling_spans` of them.
    filling: Vec<u8>,
    filling_spans: usize,
    full: VecDeque<Batch>,
    /// Buffers of exported batches, reused so that a batch does not regrow its own.
    spare: Vec<Vec<u8>>,
}

impl Pending {
    /// The batch being filled, as it is; the next one starts in a spare buffer.
    fn seal(&mut self) -> Batch {
        let next = self.spare.pop().unwrap_or_default();
        Batch {
            spans: std::mem::replace(&mut self.filling, next),
            count: std::mem::take(&mut self.filling_spans),
        }
    }
}

#[derive(Debug)]
struct Batch {
    spans: Vec<u8>,
    count: usize,
}

impl SpanQueue {
    fn push(&self, span: &SpanFields<'_>) {
        if self.closed.load(Ordering::Acquire) {
            self.dropped.inc();
            return;
        }
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        span.encode(&mut pending.filling);
        pending.filling_spans += 1;
        if pending.filling_spans >= self.batch {
            let batch = pending.seal();
            pending.full.push_back(batch);
            drop(pending);
            self.ready.notify_one();
        }
    }

    /// The oldest full batch; with `partial`, the one being filled when none is full.
    fn take(&self, partial: bool) -> Option<Batch> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(batch) = pending.full.pop_front() {
            return Some(batch);
        }
        if !partial || pending.filling_spans == 0 {
            return None;
        }
        Some(pending.seal())
    }

    fn finished(&self, mut batch: Batch) {
        self.admitted.fetch_sub(batch.count, Ordering::AcqRel);
        batch.spans.clear();
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.spare.len() < 2 {
            pending.spare.push(batch.spans);
        }
    }
}

// === impl ExportTask ===

struct ExportTask {
    queue: Arc<SpanQueue>,
    origin: Origin,
    transport: Transport,
    exported: Counter,
    dropped: Counter,
}

impl ExportTask {
    async fn run(self, mut commands: mpsc::UnboundedReceiver<Control>) {
        let mut tick = tokio::time::interval(SCHEDULED_DELAY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.queue.ready.notified() => self.export_full().await,
                _ = tick.tick() => self.export_all().await,
                command = commands.recv() => match command {
                    Some(Control::Flush(done)) => {
                        self.export_all().await;
                        let _ = done.send(());
                    }
                    // The gateway is gone: nothing more will be pushed.
                    None => {
                        self.export_all().await;
                        return;
                    }
                },
            }
        }
    }

    async fn export_full(&self) {
        while let Some(batch) = self.queue.take(false) {
            self.export(batch).await;
        }
    }

    async fn export_all(&self) {
        while let Some(batch) = self.queue.take(true) {
            self.export(batch).await;
        }
    }

    async fn export(&self, batch: Batch) {
        let body = self.origin.export_request(&batch.spans);
        let n = batch.count as u64;
        let result = match tokio::time::timeout(EXPORT_TIMEOUT, self.transport.send(body)).await {
            Ok(result) => result,
            Err(_) => Err(ExportError::Timeout),
        };
        self.queue.finished(batch);
        match result {
            Ok(()) => {
                self.exported.inc_by(n);
            }
            Err(e) => {
                self.dropped.inc_by(n);
                tracing::debug!(error = %e, spans = n, "OTLP export failed; spans dropped");
            }
        }
    }
}

// === impl Transport ===

#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("timed out after {EXPORT_TIMEOUT:?}")]
    Timeout,
    #[error("collector unreachable: {0}")]
    Unreachable(String),
    #[error("collector answered {0}")]
    Refused(String),
}

/// The two OTLP transports; both send the same `ExportTraceServiceRequest`.
enum Transport {
    Grpc {
        channel: tonic::transport::Channel,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        url: http::Uri,
        headers: http::HeaderMap,
    },
}

impl Transport {
    fn new(
        protocol: OtlpProtocol,
        endpoint: &str,
        headers: &http::HeaderMap,
    ) -> Result<Self, String> {
        if !endpoint.starts_with("http://") {
            // Neither client is built with TLS: say so now rather than drop every span.
            return Err(
                "only http:// endpoints are supported (export to a collector beside the gateway)"
                    .into(),
            );
        }
        match protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
                    .map_err(|e| e.to_string())?
                    .connect_timeout(EXPORT_TIMEOUT)
                    .timeout(EXPORT_TIMEOUT)
                    .connect_lazy();
                Ok(Transport::Grpc {
                    channel,
                    metadata: tonic::metadata::MetadataMap::from_headers(headers.clone()),
                })
            }
            OtlpProtocol::HttpProtobuf => {
                let url = http_traces_url(endpoint)
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| e.to_string())?;
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
                connector.set_nodelay(true);
                Ok(Transport::Http {
                    client: Box::new(Client::builder(TokioExecutor::new()).build(connector)),
                    url,
                    headers: headers.clone(),
                })
            }
        }
    }

    async fn send(&self, body: Vec<u8>) -> Result<(), ExportError> {
        match self {
            Transport::Grpc { channel, metadata } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready()
                    .await
                    .map_err(|e| ExportError::Unreachable(e.to_string()))?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                grpc.unary(
                    request,
                    http::uri::PathAndQuery::from_static(GRPC_EXPORT),
                    EncodedCodec,
                )
                .await
                .map(drop)
                .map_err(|status| ExportError::Refused(format!("gRPC status {status}")))
            }
            Transport::Http {
                client,
                url,
                headers,
            } => {
                let mut request = http::Request::post(url.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| ExportError::Unreachable(e.to_string()))?;
                request.headers_mut().extend(headers.clone());
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| ExportError::Unreachable(e.to_string()))?;
                let status = response.status();
                // Read the answer so that the connection can carry the next export.
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(ExportError::Refused(format!("HTTP {status}")))
                }
            }
        }
    }
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

/// Sends an already encoded `ExportTraceServiceRequest` and ignores the answer's body
/// (an `ExportTraceServiceResponse`, whose partial success the collector also logs).
#[derive(Debug, Clone, Copy)]
struct EncodedCodec;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = EncodedCodec;
    type Decoder = EncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for EncodedCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        use bytes::Buf as _;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuditSink;
    use crate::telemetry::span_encoding::Attributes;

    fn config(protocol: OtlpProtocol) -> TelemetryConfig {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: protocol,
            otlp_headers: http::HeaderMap::new(),
            service_name: "egress-gateway".into(),
            audit_log: AuditSink::Stdout,
            audit_rotation: None,
        }
    }

    fn push_one(exporter: &Exporter) {
        exporter.push(&SpanFields {
            trace_id: &[1; 16],
            span_id: &[2; 8],
            remote_parent: None,
            sampled: true,
            name: "GET",
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: &Attributes::for_span(),
            error: None,
        });
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
            let metrics = Metrics::new();
            let exporter =
                Exporter::start_with_queue(&config(protocol), &endpoint, &metrics, 4).unwrap();
            for _ in 0..10 {
                push_one(&exporter);
            }
            // Six found the queue full; the four queued fail with the export.
            assert_eq!(metrics.spans_dropped.get(), 6, "{protocol:?}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while metrics.spans_dropped.get() < 10 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(metrics.spans_dropped.get(), 10, "{protocol:?}");
            assert_eq!(metrics.spans_exported.get(), 0, "{protocol:?}");
            // Once the failed export is through, the queue takes spans again.
            push_one(&exporter);
            assert_eq!(metrics.spans_dropped.get(), 10, "{protocol:?}");
            held.abort();
        }
    }

    /// After shutdown no span is queued; each one turned away is counted.
    #[tokio::test]
    async fn spans_after_shutdown_are_counted_as_dropped() {
        let metrics = Metrics::new();
        let exporter = Exporter::start(
            &config(OtlpProtocol::HttpProtobuf),
            "http://127.0.0.1:9",
            &metrics,
        )
        .unwrap();
        exporter.shutdown().await;
        push_one(&exporter);
        push_one(&exporter);
        assert_eq!(metrics.spans_dropped.get(), 2);
        assert_eq!(exporter.queue.admitted.load(Ordering::Acquire), 0);
    }

    #[test]
    fn endpoints_without_tls_only() {
        let err = Transport::new(
            OtlpProtocol::Grpc,
            "https://collector:4317",
            &http::HeaderMap::new(),
        )
        .err()
        .unwrap();
        assert!(err.contains("http://"), "{err}");
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
