//! Upstream servers on 127.0.0.1:0. Each handle stops its server when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::ca::Svid;

/// One request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
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

/// Aborts the server task on drop.
struct Task(JoinHandle<()>);
impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads a request and answers 200 with JSON describing it.
async fn echo(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<RecordedRequest>>>,
    sni: Option<String>,
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
    let header_map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or_default(),
        "headers": header_map,
        "body": String::from_utf8_lossy(&body),
        "sni": sni,
    });
    if let Ok(mut log) = log.lock() {
        log.push(RecordedRequest {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers,
            body,
        });
    }
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Plain HTTP/1.1 echo with keep-alive; records every request and counts connections.
pub struct HttpEcho {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    connections: Arc<AtomicUsize>,
    _task: Task,
}

impl HttpEcho {
    pub async fn start() -> anyhow::Result<HttpEcho> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (log, count) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| echo(req, log.clone(), None));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok(HttpEcho {
            addr,
            requests,
            connections,
            _task: Task(task),
        })
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A TLS server (HTTP/1.1 inside) that reports the SNI each connection sent.
pub struct TlsEcho {
    pub addr: SocketAddr,
    snis: Arc<Mutex<Vec<Option<String>>>>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    _task: Task,
}

impl TlsEcho {
    pub async fn start(cert: Svid) -> anyhow::Result<TlsEcho> {
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
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (sni_log, log) = (snis.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (sni_log, log) = (sni_log.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    if let Ok(mut s) = sni_log.lock() {
                        s.push(sni.clone());
                    }
                    let svc = service_fn(move |req| echo(req, log.clone(), sni.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(TlsEcho {
            addr,
            snis,
            requests,
            _task: Task(task),
        })
    }

    pub fn snis_seen(&self) -> Vec<Option<String>> {
        self.snis.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
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

    pub async fn start_on(bind: &str) -> anyhow::Result<TcpCounter> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(tcp);
            }
        });
        Ok(TcpCounter {
            addr,
            connections,
            _task: Task(task),
        })
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}
