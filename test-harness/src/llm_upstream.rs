//! An OpenAI-compatible fake upstream: `POST /v1/chat/completions` answers with a JSON
//! completion, or an SSE stream when the request says `"stream": true`, each carrying
//! `usage` with a fixed number of tokens. Records every request (headers included).
//! Plain HTTP, TLS with a certificate from its own test CA, or mutual TLS (a SPIFFE
//! workload for east-west tests). Also a real `redis-server` on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ca::{Svid, TestCa};
use crate::upstream::RecordedRequest;

/// How the fake speaks to the gateway.
pub enum LlmTls {
    Plain,
    /// Server certificate only.
    Tls(Svid),
    /// Server certificate, and a client certificate chaining to these roots is required.
    Mutual(Svid, Vec<CertificateDer<'static>>),
}

pub struct LlmUpstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    tokens: Arc<AtomicU64>,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LlmUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS LLM upstream and the CA its certificate comes from (`ca_file` in policies).
pub struct TlsLlm {
    pub upstream: LlmUpstream,
    pub ca: TestCa,
    pub ca_file: tempfile::NamedTempFile,
}

impl TlsLlm {
    /// A TLS upstream for `localhost`/`127.0.0.1` with its own test CA, written to a PEM file.
    pub async fn start(tokens_per_response: u64) -> anyhow::Result<TlsLlm> {
        let ca = TestCa::new("llm-ca.test");
        let cert = ca.mint_server_cert(&["localhost", "127.0.0.1"]);
        let upstream = LlmUpstream::start(LlmTls::Tls(cert), tokens_per_response).await?;
        let ca_file = tempfile::NamedTempFile::new()?;
        std::fs::write(ca_file.path(), ca.root_pem())?;
        Ok(TlsLlm {
            upstream,
            ca,
            ca_file,
        })
    }
}

impl LlmUpstream {
    pub async fn start(tls: LlmTls, tokens_per_response: u64) -> anyhow::Result<LlmUpstream> {
        let acceptor = match tls {
            LlmTls::Plain => None,
            LlmTls::Tls(cert) => Some(server_config(cert, None)?),
            LlmTls::Mutual(cert, roots) => Some(server_config(cert, Some(roots))?),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let tokens = Arc::new(AtomicU64::new(tokens_per_response));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let (log, tok, hs) = (requests.clone(), tokens.clone(), handshakes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (log, tok, hs, acceptor) =
                    (log.clone(), tok.clone(), hs.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, log.clone(), tok.clone()));
                    match acceptor {
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(Ok(tls)) =
                                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                                    .await
                            else {
                                return;
                            };
                            hs.fetch_add(1, Ordering::Relaxed);
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Ok(LlmUpstream {
            addr,
            requests,
            tokens,
            handshakes,
            task,
        })
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Completed TLS handshakes (connections the pool made).
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Tokens reported in `usage` from now on.
    pub fn set_tokens_per_response(&self, n: u64) {
        self.tokens.store(n, Ordering::Relaxed);
    }
}

fn server_config(
    cert: Svid,
    client_roots: Option<Vec<CertificateDer<'static>>>,
) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let mut store = RootCertStore::empty();
            for r in roots {
                store.add(r)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(cert.cert_chain.clone(), cert.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

type Body = Full<Bytes>;

async fn answer(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<RecordedRequest>>>,
    tokens: Arc<AtomicU64>,
) -> Result<Response<Body>, hyper::Error> {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    let body = req.into_body().collect().await?.to_bytes().to_vec();
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Ok(mut l) = log.lock() {
        l.push(RecordedRequest {
            method,
            uri,
            headers,
            body,
        });
    }
    let total = tokens.load(Ordering::Relaxed);
    let prompt = total / 2;
    let usage = serde_json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": total - prompt,
        "total_tokens": total,
    });
    let model = parsed["model"].as_str().unwrap_or("unknown").to_string();
    let response = if parsed["stream"].as_bool() == Some(true) {
        let mut sse = String::new();
        for word in ["Hello", " from", " the", " fake"] {
            let chunk = serde_json::json!({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": word}}],
            });
            sse.push_str(&format!("data: {chunk}\n\n"));
        }
        let last = serde_json::json!({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
            "choices": [], "usage": usage,
        });
        sse.push_str(&format!("data: {last}\n\ndata: [DONE]\n\n"));
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from(sse)))
    } else {
        let body = serde_json::json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake"}, "finish_reason": "stop"}],
            "usage": usage,
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// A real `redis-server` on 127.0.0.1 on a free port, without persistence; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<tokio::process::Child>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// The `redis-server` binary, if installed (`scripts/install-deps.sh` installs it).
    pub fn binary() -> Option<PathBuf> {
        ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    pub async fn start() -> anyhow::Result<RedisServer> {
        let bin =
            Self::binary().context("redis-server not installed (run scripts/install-deps.sh)")?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let dir = tempfile::tempdir()?;
        let child = tokio::process::Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("redis-server did not start on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(RedisServer {
            port,
            child: Some(child),
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (an outage mid-traffic).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }
}
