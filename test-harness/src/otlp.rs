//! An OTLP trace receiver: a real gRPC `TraceService` built from the OpenTelemetry
//! protos, collecting every span it is sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_stream::wrappers::TcpListenerStream;

/// One received span, with IDs as lower-case hex.
#[derive(Debug, Clone)]
pub struct CapturedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub kind: i32,
    pub attributes: HashMap<String, AttrValue>,
    pub service_name: Option<String>,
    /// `Status.code` (2: error) and `Status.message`.
    pub status_code: i32,
    pub status_message: String,
    /// Headers (gRPC metadata) of the export request that carried the span, names in
    /// lower case.
    pub request_headers: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Other(String),
}

impl CapturedSpan {
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(AttrValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<CapturedSpan>>>,
    behaviour: Arc<std::sync::atomic::AtomicU8>,
}

/// How the receiver answers an export (collector failure modes short of an outage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Behaviour {
    /// Records the spans and answers OK.
    Accept = 0,
    /// Never answers: a collector that hangs.
    Stall = 1,
    /// Answers `UNAVAILABLE` without recording: a collector shedding load.
    Refuse = 2,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.behaviour.load(std::sync::atomic::Ordering::Relaxed) {
            1 => std::future::pending::<()>().await,
            2 => return Err(tonic::Status::unavailable("collector overloaded (test)")),
            _ => {}
        }
        let request_headers: HashMap<String, String> = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service_name = rs.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(
                        |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(Value::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        },
                    )
            });
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Value::StringValue(s)) => AttrValue::Str(s.clone()),
                                Some(Value::IntValue(i)) => AttrValue::Int(*i),
                                Some(Value::BoolValue(b)) => AttrValue::Bool(*b),
                                other => AttrValue::Other(format!("{other:?}")),
                            };
                            (kv.key.clone(), v)
                        })
                        .collect();
                    out.push(CapturedSpan {
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind: span.kind,
                        attributes,
                        service_name: service_name.clone(),
                        status_code: span.status.as_ref().map_or(0, |s| s.code),
                        status_message: span
                            .status
                            .as_ref()
                            .map(|s| s.message.clone())
                            .unwrap_or_default(),
                        request_headers: request_headers.clone(),
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(out);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver on 127.0.0.1; stops when dropped or killed.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    collector: Collector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl OtlpReceiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = TraceServiceServer::new(collector.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(OtlpReceiver {
            addr,
            collector,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Changes how later exports are answered.
    pub fn set_behaviour(&self, b: Behaviour) {
        self.collector
            .behaviour
            .store(b as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// `http://127.0.0.1:PORT`, for `telemetry.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<CapturedSpan> {
        self.collector
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Waits (bounded) until at least `n` spans arrived.
    pub async fn wait_for_spans(&self, n: usize) -> Vec<CapturedSpan> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if spans.len() >= n || tokio::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the receiver: the port then refuses connections (a collector outage).
    pub async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An OTLP/HTTP receiver that is not ours: `interop/otlp_http_receiver.py`, decoding
/// each `POST /v1/traces` with the official `opentelemetry-proto` Python messages, as
/// the OpenTelemetry Collector's receiver does. Stops when dropped.
pub struct HttpOtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<CapturedSpan>>>,
    child: tokio::process::Child,
}

impl HttpOtlpReceiver {
    /// `None` (after a loud skip, or a failure under `EGRESS_REQUIRE_DEPS`) when the
    /// interop venv lacks `opentelemetry-proto`. `status` other than 200 answers every
    /// export with it, recording nothing (a collector shedding load).
    pub async fn start(status: u16) -> anyhow::Result<Option<Self>> {
        use anyhow::Context as _;
        use tokio::io::AsyncBufReadExt as _;
        let Some(python) = crate::interop::interop_python("opentelemetry.proto") else {
            return Ok(None);
        };
        let mut child = tokio::process::Command::new(python)
            .arg(crate::interop::interop_dir().join("otlp_http_receiver.py"))
            .arg("--status")
            .arg(status.to_string())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the Python OTLP/HTTP receiver")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("the receiver did not start in 20s")??
            .context("the receiver exited before listening")?;
        let port: u16 = first
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("unexpected first line from the receiver: {first}"))?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Ok(mut s) = sink.lock() {
                    s.push(captured_from_json(&v));
                }
            }
        });
        Ok(Some(HttpOtlpReceiver {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            spans,
            child,
        }))
    }

    /// `http://127.0.0.1:PORT` (the collector's base URL, as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`), for `telemetry.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<CapturedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (bounded) until at least `n` spans arrived.
    pub async fn wait_for_spans(&self, n: usize) -> Vec<CapturedSpan> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if spans.len() >= n || tokio::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the receiver: the port then refuses connections (a collector outage).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

fn captured_from_json(v: &serde_json::Value) -> CapturedSpan {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let attributes = v["attributes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, a)| {
            let value = match a {
                serde_json::Value::String(s) => AttrValue::Str(s.clone()),
                serde_json::Value::Bool(b) => AttrValue::Bool(*b),
                serde_json::Value::Number(n) if n.is_i64() => {
                    AttrValue::Int(n.as_i64().unwrap_or_default())
                }
                other => AttrValue::Other(other.to_string()),
            };
            (k.clone(), value)
        })
        .collect();
    CapturedSpan {
        name: s("name"),
        trace_id: s("trace_id"),
        span_id: s("span_id"),
        parent_span_id: s("parent_span_id"),
        kind: v["kind"]
            .as_i64()
            .and_then(|k| i32::try_from(k).ok())
            .unwrap_or_default(),
        attributes,
        service_name: v["service_name"].as_str().map(str::to_string),
        status_code: v["status_code"]
            .as_i64()
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or_default(),
        status_message: s("status_message"),
        request_headers: v["request_headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, h)| (k.clone(), h.as_str().unwrap_or_default().to_string()))
            .collect(),
    }
}
