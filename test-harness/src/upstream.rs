//! Upstream servers on 127.0.0.1:0. Each handle stops its server, open connections
//! included, when dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::ca::Svid;

/// One request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as received (origin-form for ordinary upstreams).
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A canned answer from a custom responder.
#[derive(Debug, Clone)]
pub struct CannedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl CannedResponse {
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        CannedResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }
}

/// Decides the answer to a request; `None` falls back to the JSON echo.
pub type Responder = Arc<dyn Fn(&RecordedRequest) -> Option<CannedResponse> + Send + Sync>;

/// Aborts the server task on drop; the task owns every connection task, so they go too.
pub(crate) struct Task(JoinHandle<()>);
impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts until aborted, running `serve` per connection inside a `JoinSet` so that
/// aborting the accept task also ends keep-alive connections.
pub(crate) fn spawn_accept_loop<F, Fut>(
    listener: TcpListener,
    connections: Arc<AtomicUsize>,
    serve: F,
) -> Task
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Task(tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((tcp, _)) => {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(serve(tcp));
                }
                // Transient (e.g. out of file descriptors): keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }))
}

type Log = Arc<Mutex<Vec<RecordedRequest>>>;

/// Reads a request, records it and answers: the responder's answer, or 200 with JSON
/// describing the request.
async fn echo(
    req: Request<Incoming>,
    log: Log,
    sni: Option<String>,
    responder: Option<Responder>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers,
        body,
    };
    if let Ok(mut log) = log.lock() {
        log.push(recorded.clone());
    }
    if let Some(canned) = responder.and_then(|r| r(&recorded)) {
        return Ok(canned_response(canned));
    }
    // Repeated headers keep their last value here; `requests()` has them all.
    let header_map: serde_json::Map<String, serde_json::Value> = recorded
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let json = serde_json::json!({
        "method": recorded.method,
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or_default(),
        "headers": header_map,
        "body": String::from_utf8_lossy(&recorded.body),
        "sni": sni,
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn canned_response(canned: CannedResponse) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(canned.body)));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(canned.status).unwrap_or(hyper::StatusCode::OK);
    for (k, v) in canned.headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(&v),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

/// Plain HTTP/1.1 echo with keep-alive; records every request and counts connections.
pub struct HttpEcho {
    pub addr: SocketAddr,
    requests: Log,
    connections: Arc<AtomicUsize>,
    _task: Task,
}

impl HttpEcho {
    pub async fn start() -> anyhow::Result<HttpEcho> {
        Self::start_inner(None).await
    }

    /// Like `start`, but `responder` may answer a request itself (status, headers,
    /// body), e.g. an OpenAI-style reply with `usage`; it returns `None` to echo.
    pub async fn start_with(
        responder: impl Fn(&RecordedRequest) -> Option<CannedResponse> + Send + Sync + 'static,
    ) -> anyhow::Result<HttpEcho> {
        Self::start_inner(Some(Arc::new(responder))).await
    }

    async fn start_inner(responder: Option<Responder>) -> anyhow::Result<HttpEcho> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests: Log = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let log = requests.clone();
        let task = spawn_accept_loop(listener, connections.clone(), move |tcp| {
            let (log, responder) = (log.clone(), responder.clone());
            async move {
                let svc = service_fn(move |req| echo(req, log.clone(), None, responder.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            }
        });
        Ok(HttpEcho {
            addr,
            requests,
            connections,
            _task: task,
        })
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// TCP connections accepted so far (keep-alive reuse does not add any).
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A TLS server (HTTP/1.1 inside) that reports the SNI each connection sent.
pub struct TlsEcho {
    pub addr: SocketAddr,
    snis: Arc<Mutex<Vec<Option<String>>>>,
    requests: Log,
    connections: Arc<AtomicUsize>,
    _task: Task,
}

impl TlsEcho {
    /// `cert` is typically `TestCa::mint_server_cert(&["localhost", "127.0.0.1"])`.
    pub async fn start(cert: Svid) -> anyhow::Result<TlsEcho> {
        Self::start_inner(cert, None).await
    }

    /// Like `start`, with a custom responder as in `HttpEcho::start_with`.
    pub async fn start_with(
        cert: Svid,
        responder: impl Fn(&RecordedRequest) -> Option<CannedResponse> + Send + Sync + 'static,
    ) -> anyhow::Result<TlsEcho> {
        Self::start_inner(cert, Some(Arc::new(responder))).await
    }

    async fn start_inner(cert: Svid, responder: Option<Responder>) -> anyhow::Result<TlsEcho> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(cert.cert_chain.clone(), cert.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let snis = Arc::new(Mutex::new(Vec::new()));
        let requests: Log = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (sni_log, log) = (snis.clone(), requests.clone());
        let task = spawn_accept_loop(listener, connections.clone(), move |tcp| {
            let acceptor = acceptor.clone();
            let (sni_log, log, responder) = (sni_log.clone(), log.clone(), responder.clone());
            async move {
                // A failed handshake (e.g. the client rejected our cert) records nothing.
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                if let Ok(mut s) = sni_log.lock() {
                    s.push(sni.clone());
                }
                let svc =
                    service_fn(move |req| echo(req, log.clone(), sni.clone(), responder.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        });
        Ok(TlsEcho {
            addr,
            snis,
            requests,
            connections,
            _task: task,
        })
    }

    /// The SNI of every completed TLS handshake, in order (`None`: no SNI sent).
    pub fn snis_seen(&self) -> Vec<Option<String>> {
        self.snis.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// TCP connections accepted so far, completed TLS handshakes or not.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Accepts TCP connections and only counts them: a target that must see zero.
pub struct TcpCounter {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    _task: Task,
}

impl TcpCounter {
    pub async fn start() -> anyhow::Result<TcpCounter> {
        Self::start_on("127.0.0.1:0").await
    }

    /// Binds `bind` (e.g. `"127.0.0.2:0"` or `"[::1]:0"`) instead of 127.0.0.1.
    pub async fn start_on(bind: &str) -> anyhow::Result<TcpCounter> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let task = spawn_accept_loop(listener, connections.clone(), |tcp| async move {
            drop(tcp);
        });
        Ok(TcpCounter {
            addr,
            connections,
            _task: task,
        })
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Echoes every byte back on each connection: a raw TCP destination for tunnels.
pub struct TcpEcho {
    pub addr: SocketAddr,
    _task: Task,
}

impl TcpEcho {
    pub async fn start() -> anyhow::Result<TcpEcho> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = spawn_accept_loop(
            listener,
            Arc::new(AtomicUsize::new(0)),
            |mut tcp| async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            },
        );
        Ok(TcpEcho { addr, _task: task })
    }
}
