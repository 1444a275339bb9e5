//! A fake LLM upstream that speaks each provider's wire format as the official SDKs and
//! the gateway's accounting see it:
//!
//! - OpenAI: `POST /v1/chat/completions` (and any path not listed here) answers with a
//!   `chat.completion` JSON body, or with `"stream": true` an SSE stream of
//!   `chat.completion.chunk` events ending in `data: [DONE]`; as the real API, the stream
//!   reports usage only with `stream_options.include_usage`. Also `/v1/completions`
//!   (legacy `text_completion`, JSON and SSE), `/v1/responses` (the Responses API: JSON,
//!   or SSE ending in `response.completed`) and `/v1/embeddings`;
//! - Anthropic: `POST /v1/messages` answers with a `message` JSON body, or with
//!   `"stream": true` the Messages API's SSE events (`message_start`,
//!   `content_block_start`, `ping`, `content_block_delta`.., `content_block_stop`,
//!   `message_delta`, `message_stop`); half the prompt is reported as cache reads;
//! - Gemini: `.../models/{model}:generateContent` (JSON) and `:streamGenerateContent`
//!   (a JSON array, or SSE with `?alt=sse`), with `usageMetadata`.
//!
//! Every answer names the request's model, says [`FAKE_TEXT`] (streamed as
//! [`FAKE_STREAM_DELTAS`]) and reports a fixed number of tokens. Bodies are compressed
//! with the best coding the request's `Accept-Encoding` allows (zstd, br, gzip, deflate;
//! streams flushed per event). Setters make it answer 500, cut a body mid-way, pad a JSON
//! answer to any size, or pause between events. Every request and every response body
//! (as sent, compressed) is recorded. Plain HTTP, TLS with a certificate from its own
//! test CA (for `localhost`/`127.0.0.1` and, with [`TlsLlm::start_for`], any DNS names
//! such as `api.openai.com`), or mutual TLS (a SPIFFE workload for east-west tests). Over
//! TLS it offers ALPN `h2` and `http/1.1` and serves whichever the client picks; plain
//! HTTP takes HTTP/1.1 or prior-knowledge HTTP/2. Also a real `redis-server` on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ca::{Svid, TestCa};
use crate::upstream::{spawn_accept_loop, RecordedRequest, Task};

/// The assistant's whole answer, in every format.
pub const FAKE_TEXT: &str = "Hello from the fake";
/// The text deltas of a streamed answer, in order; they concatenate to [`FAKE_TEXT`].
pub const FAKE_STREAM_DELTAS: [&str; 4] = ["Hello", " from", " the", " fake"];

/// How the fake speaks to the gateway.
pub enum LlmTls {
    Plain,
    /// Server certificate only.
    Tls(Svid),
    /// Server certificate, and a client certificate chaining to these roots is required.
    Mutual(Svid, Vec<CertificateDer<'static>>),
}

/// What the fake saw, shared with its connection tasks.
#[derive(Default)]
struct Seen {
    /// Each request with the HTTP version it came in.
    requests: Mutex<Vec<(RecordedRequest, Version)>>,
    snis: Mutex<Vec<Option<String>>>,
    refused_models: Mutex<Vec<String>>,
    tokens: AtomicU64,
    handshakes: AtomicUsize,
    behaviour: Mutex<Behaviour>,
    /// Each response body as sent (compressed, cut).
    responses: Mutex<Vec<Bytes>>,
}

pub struct LlmUpstream {
    pub addr: SocketAddr,
    seen: Arc<Seen>,
    /// Aborting the accept loop also ends open connections.
    _task: Task,
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
        Self::start_for(&[], tokens_per_response).await
    }

    /// Like [`TlsLlm::start`], with `names` (DNS names or IP addresses, e.g.
    /// `api.openai.com`, `api.anthropic.com`) in the certificate besides `localhost` and
    /// `127.0.0.1`: a stand-in for real API hosts that a test resolver maps to loopback.
    pub async fn start_for(names: &[&str], tokens_per_response: u64) -> anyhow::Result<TlsLlm> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_for_on(listener, names, tokens_per_response).await
    }

    /// Like [`TlsLlm::start_for`], serving on `listener`.
    pub async fn start_for_on(
        listener: TcpListener,
        names: &[&str],
        tokens_per_response: u64,
    ) -> anyhow::Result<TlsLlm> {
        let ca = TestCa::new("llm-ca.test");
        // The listener's own address too (e.g. 127.x.y.z from `loopback::bind_unique`).
        let ip = listener.local_addr()?.ip().to_string();
        let mut sans: Vec<&str> = Vec::new();
        for n in names
            .iter()
            .copied()
            .chain(["localhost", "127.0.0.1", ip.as_str()])
        {
            if !sans.contains(&n) {
                sans.push(n);
            }
        }
        let cert = ca.mint_server_cert(&sans);
        let upstream =
            LlmUpstream::start_on(listener, LlmTls::Tls(cert), tokens_per_response).await?;
        let ca_file = tempfile::NamedTempFile::new()?;
        std::fs::write(ca_file.path(), ca.root_pem())?;
        Ok(TlsLlm {
            upstream,
            ca,
            ca_file,
        })
    }

    /// The PEM file holding the CA that signed the fake's certificate (for `ca_file`,
    /// `SSL_CERT_FILE`, `NODE_EXTRA_CA_CERTS`).
    pub fn ca_path(&self) -> &Path {
        self.ca_file.path()
    }
}

impl LlmUpstream {
    pub async fn start(tls: LlmTls, tokens_per_response: u64) -> anyhow::Result<LlmUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, tls, tokens_per_response).await
    }

    /// Serves on `listener`: e.g. port 443 of a loopback address of its own
    /// ([`crate::loopback::bind_unique`]), where a test resolver sends a real API host.
    pub async fn start_on(
        listener: TcpListener,
        tls: LlmTls,
        tokens_per_response: u64,
    ) -> anyhow::Result<LlmUpstream> {
        let acceptor = match tls {
            LlmTls::Plain => None,
            LlmTls::Tls(cert) => Some(server_config(cert, None)?),
            LlmTls::Mutual(cert, roots) => Some(server_config(cert, Some(roots))?),
        };
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        seen.tokens.store(tokens_per_response, Ordering::Relaxed);
        let shared = seen.clone();
        let task = spawn_accept_loop(listener, Arc::default(), move |tcp| {
            let (seen, acceptor) = (shared.clone(), acceptor.clone());
            async move {
                let svc_seen = seen.clone();
                let svc = service_fn(move |req| answer(req, svc_seen.clone()));
                let server = auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    None => {
                        let _ = server.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                    Some(acceptor) => {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                                .await
                        else {
                            return;
                        };
                        seen.handshakes.fetch_add(1, Ordering::Relaxed);
                        let sni = tls.get_ref().1.server_name().map(str::to_string);
                        if let Ok(mut s) = seen.snis.lock() {
                            s.push(sni);
                        }
                        let _ = server.serve_connection(TokioIo::new(tls), svc).await;
                    }
                }
            }
        });
        Ok(LlmUpstream {
            addr,
            seen,
            _task: task,
        })
    }

    /// Every request received, in order. `uri` is the origin-form target (path and
    /// query) for HTTP/1.1 and HTTP/2 alike; an HTTP/2 request's `:authority` is
    /// recorded as a header of that name first (HTTP/2 has no `host` header).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.seen
            .requests
            .lock()
            .map(|r| r.iter().map(|(r, _)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// The HTTP version of every request received, in the order of [`Self::requests`].
    pub fn http_versions(&self) -> Vec<Version> {
        self.seen
            .requests
            .lock()
            .map(|r| r.iter().map(|(_, v)| *v).collect())
            .unwrap_or_default()
    }

    /// The SNI of every completed TLS handshake, in order (`None`: no SNI sent).
    pub fn snis_seen(&self) -> Vec<Option<String>> {
        self.seen.snis.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Completed TLS handshakes (connections the pool made).
    pub fn handshakes(&self) -> usize {
        self.seen.handshakes.load(Ordering::Relaxed)
    }

    /// Tokens reported in `usage` from now on.
    pub fn set_tokens_per_response(&self, n: u64) {
        self.seen.tokens.store(n, Ordering::Relaxed);
    }

    /// Every response body as the fake sent it (compressed when the request accepted
    /// it; cut short when told to), in order.
    pub fn responses(&self) -> Vec<Bytes> {
        self.seen
            .responses
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// From now on every request gets `status` with an OpenAI-shaped error body (no
    /// usage), e.g. 500.
    pub fn set_status(&self, status: Option<u16>) {
        self.change(|b| b.status = status);
    }

    /// From now on bodies are cut (the connection reset) after `pieces` pieces: SSE
    /// events, or 16 KiB of a JSON body. `None`: whole bodies.
    pub fn set_cut_after(&self, pieces: Option<usize>) {
        self.change(|b| b.cut_after = pieces);
    }

    /// From now on the answer's text is padded so that JSON bodies are at least
    /// `bytes` long (usage still comes last).
    pub fn set_pad_to(&self, bytes: usize) {
        self.change(|b| b.pad_to = bytes);
    }

    /// From now on streamed bodies pause `delay` between pieces.
    pub fn set_stream_delay(&self, delay: Duration) {
        self.change(|b| b.delay = delay);
    }

    /// From now on bodies are never compressed.
    pub fn set_no_compression(&self, off: bool) {
        self.change(|b| b.no_compression = off);
    }

    fn change(&self, f: impl FnOnce(&mut Behaviour)) {
        if let Ok(mut b) = self.seen.behaviour.lock() {
            f(&mut b);
        }
    }

    /// From now on, requests for `model` get 403 with a body shaped like the gateway's
    /// refusal (`{"error":{"type":"egress_denied","message",..}}`): a stand-in for the
    /// gateway's model denial when a test drives an SDK client against the fake alone.
    /// Such requests are still recorded.
    pub fn refuse_model(&self, model: &str) {
        if let Ok(mut m) = self.seen.refused_models.lock() {
            m.push(model.to_string());
        }
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

type Body = BoxBody<Bytes, std::io::Error>;

/// What the fake does besides answering normally (see the setters on [`LlmUpstream`]).
#[derive(Debug, Clone, Default)]
struct Behaviour {
    /// Answer every request with this status and an OpenAI-shaped error body.
    status: Option<u16>,
    /// Send this many pieces of the body (events, or 16 KiB of JSON), then cut the
    /// connection.
    cut_after: Option<usize>,
    /// Pad the answer's text to make the JSON body at least this large.
    pad_to: usize,
    /// Pause between the pieces of a streamed body.
    delay: Duration,
    /// Never compress, whatever the request accepts.
    no_compression: bool,
}

/// Which API a request speaks, by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Api {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Anthropic,
    /// `models/{model}:generateContent` or `:streamGenerateContent` (`?alt=sse`: SSE).
    Gemini {
        model: String,
        stream: bool,
        sse: bool,
    },
}

fn api_for(path: &str, query: &str) -> Api {
    if let Some((_, rest)) = path.rsplit_once("/models/") {
        if let Some((model, method)) = rest.split_once(':') {
            return Api::Gemini {
                model: model.to_string(),
                stream: method == "streamGenerateContent",
                sse: query.split('&').any(|p| p == "alt=sse"),
            };
        }
    }
    if path == "/v1/messages" {
        Api::Anthropic
    } else if path.ends_with("/responses") {
        Api::Responses
    } else if path.ends_with("/embeddings") {
        Api::Embeddings
    } else if path.ends_with("/completions") && !path.ends_with("/chat/completions") {
        Api::Completions
    } else {
        Api::Chat
    }
}

async fn answer(req: Request<Incoming>, seen: Arc<Seen>) -> Result<Response<Body>, hyper::Error> {
    let version = req.version();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let (uri, authority) = if version == Version::HTTP_2 {
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        (target, req.uri().authority().map(|a| a.to_string()))
    } else {
        (req.uri().to_string(), None)
    };
    let method = req.method().to_string();
    let headers: Vec<(String, String)> = authority
        .map(|a| (":authority".to_string(), a))
        .into_iter()
        .chain(req.headers().iter().map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        }))
        .collect();
    let body = req.into_body().collect().await?.to_bytes().to_vec();
    let recorded = RecordedRequest {
        method,
        uri,
        headers,
        body,
    };
    let coding = if seen.behaviour().no_compression {
        Coding::Identity
    } else {
        Coding::accepted(recorded.header("accept-encoding").unwrap_or_default())
    };
    // A request body the agent compressed is read decoded, as the real APIs do.
    let text = match recorded.header("content-encoding") {
        Some(c) => Coding::named(c).decode(&recorded.body),
        None => recorded.body.clone(),
    };
    let parsed: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
    if let Ok(mut l) = seen.requests.lock() {
        l.push((recorded, version));
    }
    let behaviour = seen.behaviour();
    let total = seen.tokens.load(Ordering::Relaxed);
    let tokens = Tokens {
        prompt: total / 2,
        completion: total - total / 2,
    };
    let api = api_for(&path, &query);
    let model = match &api {
        Api::Gemini { model, .. } => model.clone(),
        _ => parsed["model"].as_str().unwrap_or("unknown").to_string(),
    };
    let model = model.as_str();
    let stream = parsed["stream"].as_bool() == Some(true);
    let include_usage = parsed["stream_options"]["include_usage"].as_bool() == Some(true);
    let refused = seen
        .refused_models
        .lock()
        .map(|m| m.iter().any(|r| r == model))
        .unwrap_or(false);
    if refused {
        let body = serde_json::json!({"error": {
            "type": "egress_denied",
            "code": "model_not_allowed",
            "message": format!("model {model:?} not allowed (refused by the fake upstream)"),
            "rule": null,
            "limit": null,
            "trace_id": null,
        }});
        return Ok(seen.send(
            403,
            "application/json",
            json_pieces(body.to_string()),
            Coding::Identity,
            &Behaviour::default(),
        ));
    }
    if let Some(status) = behaviour.status {
        let body = serde_json::json!({"error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error", "param": null, "code": null,
        }});
        return Ok(seen.send(
            status,
            "application/json",
            json_pieces(body.to_string()),
            coding,
            &behaviour,
        ));
    }
    let text = padded_text(behaviour.pad_to);
    let (content_type, pieces) = match (&api, stream) {
        (Api::Anthropic, false) => (
            "application/json",
            json_pieces(anthropic_message(model, tokens, &text).to_string()),
        ),
        (Api::Anthropic, true) => ("text/event-stream", anthropic_stream(model, tokens)),
        (Api::Responses, false) => (
            "application/json",
            json_pieces(responses_json(model, tokens, &text).to_string()),
        ),
        (Api::Responses, true) => ("text/event-stream", responses_stream(model, tokens)),
        (Api::Embeddings, _) => (
            "application/json",
            json_pieces(embeddings(model, tokens).to_string()),
        ),
        (Api::Completions, false) => (
            "application/json",
            json_pieces(completions_json(model, tokens, &text).to_string()),
        ),
        (Api::Completions, true) => (
            "text/event-stream",
            completions_stream(model, tokens, include_usage),
        ),
        (Api::Chat, false) => (
            "application/json",
            json_pieces(openai_completion(model, tokens, &text).to_string()),
        ),
        (Api::Chat, true) => (
            "text/event-stream",
            openai_stream(model, tokens, include_usage),
        ),
        (Api::Gemini { sse: true, .. }, _) => ("text/event-stream", gemini_sse(model, tokens)),
        (Api::Gemini { stream: true, .. }, _) => {
            ("application/json", json_pieces(gemini_array(model, tokens)))
        }
        (Api::Gemini { .. }, _) => (
            "application/json",
            json_pieces(gemini_json(model, tokens, &text).to_string()),
        ),
    };
    Ok(seen.send(200, content_type, pieces, coding, &behaviour))
}

impl Seen {
    fn behaviour(&self) -> Behaviour {
        self.behaviour.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// The response: `pieces` encoded with `coding` (each flushed, so a stream stays a
    /// stream), sent with the behaviour's pauses and cut, recorded as sent.
    fn send(
        self: &Arc<Self>,
        status: u16,
        content_type: &str,
        pieces: Vec<String>,
        coding: Coding,
        behaviour: &Behaviour,
    ) -> Response<Body> {
        let mut enc = Encoder::new(coding);
        let mut wire: Vec<Bytes> = pieces.iter().map(|p| enc.piece(p.as_bytes())).collect();
        let tail = enc.finish();
        if !tail.is_empty() {
            match wire.last_mut() {
                Some(last) => *last = [last.as_ref(), tail.as_ref()].concat().into(),
                None => wire.push(tail),
            }
        }
        let cut = behaviour.cut_after.filter(|n| *n < wire.len());
        if let Some(n) = cut {
            wire.truncate(n);
        }
        if let Ok(mut r) = self.responses.lock() {
            r.push(wire.concat().into());
        }
        let delay = behaviour.delay;
        let frames = futures::stream::iter(wire.into_iter().enumerate())
            .then(move |(i, piece)| async move {
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok::<_, std::io::Error>(Frame::data(piece))
            })
            .chain(futures::stream::iter(cut.map(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "stream cut by the fake",
                ))
            })));
        let mut builder = Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("x-request-id", "req_fake");
        if content_type == "text/event-stream" {
            builder = builder.header("cache-control", "no-cache");
        }
        if let Some(name) = coding.name() {
            builder = builder.header("content-encoding", name);
        }
        builder
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap_or_else(|_| Response::new(Empty::new().map_err(|never| match never {}).boxed()))
    }
}

/// A content coding the fake compresses with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Br,
    Zstd,
}

impl Coding {
    /// The fake's pick among what `Accept-Encoding` allows (q > 0): zstd, br, gzip,
    /// deflate, in that order, else identity.
    pub fn accepted(accept: &str) -> Coding {
        let offered: Vec<String> = accept
            .split(',')
            .filter_map(|t| {
                let mut parts = t.split(';');
                let name = parts.next()?.trim().to_ascii_lowercase();
                let q_zero = parts.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        == Some(0.0)
                });
                (!q_zero && !name.is_empty()).then_some(name)
            })
            .collect();
        [
            ("zstd", Coding::Zstd),
            ("br", Coding::Br),
            ("gzip", Coding::Gzip),
            ("deflate", Coding::Deflate),
        ]
        .into_iter()
        .find(|(n, _)| offered.iter().any(|o| o == n))
        .map(|(_, c)| c)
        .unwrap_or(Coding::Identity)
    }

    pub fn named(name: &str) -> Coding {
        match name.trim().to_ascii_lowercase().as_str() {
            "gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Br,
            "zstd" => Coding::Zstd,
            _ => Coding::Identity,
        }
    }

    pub fn name(self) -> Option<&'static str> {
        match self {
            Coding::Identity => None,
            Coding::Gzip => Some("gzip"),
            Coding::Deflate => Some("deflate"),
            Coding::Br => Some("br"),
            Coding::Zstd => Some("zstd"),
        }
    }

    /// `data` compressed whole.
    pub fn encode(self, data: &[u8]) -> Vec<u8> {
        let mut enc = Encoder::new(self);
        let mut out = enc.piece(data).to_vec();
        out.extend_from_slice(&enc.finish());
        out
    }

    /// `data` decompressed (what a client that accepts this coding reads); empty when
    /// it does not decode.
    pub fn decode(self, data: &[u8]) -> Vec<u8> {
        use std::io::Read as _;
        let mut out = Vec::new();
        let ok = match self {
            Coding::Identity => {
                out.extend_from_slice(data);
                true
            }
            Coding::Gzip => flate2::read::MultiGzDecoder::new(data)
                .read_to_end(&mut out)
                .is_ok(),
            Coding::Deflate => flate2::read::ZlibDecoder::new(data)
                .read_to_end(&mut out)
                .is_ok(),
            Coding::Br => brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .is_ok(),
            Coding::Zstd => zstd::stream::read::Decoder::new(data)
                .and_then(|mut d| d.read_to_end(&mut out))
                .is_ok(),
        };
        if ok {
            out
        } else {
            Vec::new()
        }
    }
}

/// A streaming compressor: each piece comes out flushed, decodable on its own arrival.
enum Encoder {
    Identity,
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    fn new(coding: Coding) -> Encoder {
        let level = flate2::Compression::default();
        match coding {
            Coding::Identity => Encoder::Identity,
            Coding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            Coding::Deflate => Encoder::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            Coding::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            Coding::Zstd => match zstd::stream::write::Encoder::new(Vec::new(), 3) {
                Ok(e) => Encoder::Zstd(e),
                Err(_) => Encoder::Identity,
            },
        }
    }

    fn piece(&mut self, data: &[u8]) -> Bytes {
        use std::io::Write as _;
        fn drain(v: &mut Vec<u8>) -> Bytes {
            Bytes::from(std::mem::take(v))
        }
        match self {
            Encoder::Identity => Bytes::copy_from_slice(data),
            Encoder::Gzip(e) => {
                let _ = e.write_all(data).and_then(|_| e.flush());
                drain(e.get_mut())
            }
            Encoder::Deflate(e) => {
                let _ = e.write_all(data).and_then(|_| e.flush());
                drain(e.get_mut())
            }
            Encoder::Br(e) => {
                let _ = e.write_all(data).and_then(|_| e.flush());
                drain(e.get_mut())
            }
            Encoder::Zstd(e) => {
                let _ = e.write_all(data).and_then(|_| e.flush());
                drain(e.get_mut())
            }
        }
    }

    fn finish(self) -> Bytes {
        let out = match self {
            Encoder::Identity => Ok(Vec::new()),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Deflate(e) => e.finish(),
            Encoder::Br(e) => Ok(e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
        };
        Bytes::from(out.unwrap_or_default())
    }
}

#[derive(Clone, Copy)]
struct Tokens {
    prompt: u64,
    completion: u64,
}

/// A JSON body in pieces of 16 KiB (so a cut can fall inside it).
fn json_pieces(body: String) -> Vec<String> {
    const PIECE: usize = 16 * 1024;
    if body.len() <= PIECE {
        return vec![body];
    }
    let bytes = body.into_bytes();
    // JSON text here is ASCII, so every split is a char boundary.
    bytes
        .chunks(PIECE)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect()
}

/// [`FAKE_TEXT`], padded with spaces to at least `pad_to` bytes.
fn padded_text(pad_to: usize) -> String {
    let mut t = FAKE_TEXT.to_string();
    if t.len() < pad_to {
        t.push_str(&" ".repeat(pad_to - t.len()));
    }
    t
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn openai_usage(t: Tokens) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": t.prompt,
        "completion_tokens": t.completion,
        "total_tokens": t.prompt + t.completion,
    })
}

fn openai_completion(model: &str, t: Tokens, text: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": unix_now(), "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": openai_usage(t),
    })
}

/// `data: {chunk}` events: the text deltas (the first also carries the role), a chunk
/// with `finish_reason`, then `[DONE]`. As the real API: with
/// `stream_options.include_usage` every chunk has `"usage": null` and a last chunk with
/// no choices carries the usage; without it no chunk mentions usage.
fn openai_stream(model: &str, t: Tokens, include_usage: bool) -> Vec<String> {
    let created = unix_now();
    let chunk = |choices: serde_json::Value| {
        let mut c = serde_json::json!({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices,
        });
        if include_usage {
            c["usage"] = serde_json::Value::Null;
        }
        c
    };
    let mut events = Vec::new();
    for (i, word) in FAKE_STREAM_DELTAS.iter().enumerate() {
        let delta = if i == 0 {
            serde_json::json!({"role": "assistant", "content": word})
        } else {
            serde_json::json!({"content": word})
        };
        let c = chunk(serde_json::json!([{"index": 0, "delta": delta, "finish_reason": null}]));
        events.push(format!("data: {c}\n\n"));
    }
    let done = chunk(serde_json::json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]));
    events.push(format!("data: {done}\n\n"));
    if include_usage {
        let mut last = chunk(serde_json::json!([]));
        last["usage"] = openai_usage(t);
        events.push(format!("data: {last}\n\n"));
    }
    events.push("data: [DONE]\n\n".into());
    events
}

fn completions_json(model: &str, t: Tokens, text: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "cmpl-fake", "object": "text_completion", "created": unix_now(), "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": openai_usage(t),
    })
}

fn completions_stream(model: &str, t: Tokens, include_usage: bool) -> Vec<String> {
    let created = unix_now();
    let chunk = |choices: serde_json::Value| {
        let mut c = serde_json::json!({
            "id": "cmpl-fake", "object": "text_completion", "created": created,
            "model": model, "choices": choices,
        });
        if include_usage {
            c["usage"] = serde_json::Value::Null;
        }
        c
    };
    let mut events: Vec<String> = FAKE_STREAM_DELTAS
        .iter()
        .map(|w| {
            let c = chunk(serde_json::json!([{"text": w, "index": 0, "logprobs": null, "finish_reason": null}]));
            format!("data: {c}\n\n")
        })
        .collect();
    if include_usage {
        let mut last = chunk(serde_json::json!([]));
        last["usage"] = openai_usage(t);
        events.push(format!("data: {last}\n\n"));
    }
    events.push("data: [DONE]\n\n".into());
    events
}

fn embeddings(model: &str, t: Tokens) -> serde_json::Value {
    let total = t.prompt + t.completion;
    serde_json::json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093, 0.0158, -0.0047]}],
        "model": model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    })
}

fn responses_object(
    model: &str,
    status: &str,
    output: serde_json::Value,
    usage: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "id": "resp_fake", "object": "response", "created_at": unix_now(), "status": status,
        "model": model, "output": output, "usage": usage,
    })
}

fn responses_usage(t: Tokens) -> serde_json::Value {
    serde_json::json!({
        "input_tokens": t.prompt, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": t.completion, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": t.prompt + t.completion,
    })
}

fn responses_message(text: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

fn responses_json(model: &str, t: Tokens, text: &str) -> serde_json::Value {
    responses_object(
        model,
        "completed",
        serde_json::json!([responses_message(text)]),
        responses_usage(t),
    )
}

/// The Responses API's events: `response.created`, the text deltas, and
/// `response.completed` with the usage.
fn responses_stream(model: &str, t: Tokens) -> Vec<String> {
    let mut events = vec![
        serde_json::json!({"type": "response.created",
            "response": responses_object(model, "in_progress", serde_json::json!([]), serde_json::Value::Null)}),
        serde_json::json!({"type": "response.output_item.added", "output_index": 0,
            "item": {"type": "message", "id": "msg_fake", "status": "in_progress", "role": "assistant", "content": []}}),
    ];
    for word in FAKE_STREAM_DELTAS {
        events.push(
            serde_json::json!({"type": "response.output_text.delta", "item_id": "msg_fake",
            "output_index": 0, "content_index": 0, "delta": word}),
        );
    }
    events.push(
        serde_json::json!({"type": "response.output_text.done", "item_id": "msg_fake",
        "output_index": 0, "content_index": 0, "text": FAKE_TEXT}),
    );
    events.push(serde_json::json!({"type": "response.completed",
        "response": responses_object(model, "completed", serde_json::json!([responses_message(FAKE_TEXT)]), responses_usage(t))}));
    events
        .iter_mut()
        .enumerate()
        .map(|(i, e)| {
            e["sequence_number"] = i.into();
            format!(
                "event: {}\ndata: {e}\n\n",
                e["type"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// Anthropic's usage: half the prompt as cache reads, as a cached prompt reports it.
fn anthropic_usage(t: Tokens, output: u64) -> serde_json::Value {
    serde_json::json!({
        "input_tokens": t.prompt - t.prompt / 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": t.prompt / 2,
        "output_tokens": output,
    })
}

fn anthropic_message(model: &str, t: Tokens, text: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": anthropic_usage(t, t.completion),
    })
}

/// The Messages API's event sequence, each `event: <type>\ndata: {json}\n\n`. As the
/// real API does, `message_start` reports the input tokens and one output token, and
/// `message_delta` the cumulative output tokens.
fn anthropic_stream(model: &str, t: Tokens) -> Vec<String> {
    let mut events = vec![
        serde_json::json!({"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": anthropic_usage(t, 1),
        }}),
        serde_json::json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        serde_json::json!({"type": "ping"}),
    ];
    for word in FAKE_STREAM_DELTAS {
        events.push(
            serde_json::json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": word}}),
        );
    }
    events.extend([
        serde_json::json!({"type": "content_block_stop", "index": 0}),
        serde_json::json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": t.completion}}),
        serde_json::json!({"type": "message_stop"}),
    ]);
    events
        .iter()
        .map(|e| {
            format!(
                "event: {}\ndata: {e}\n\n",
                e["type"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// Gemini's `usageMetadata`: the completion split between answer and thoughts.
fn gemini_usage(t: Tokens, completion: u64) -> serde_json::Value {
    let thoughts = completion / 2;
    serde_json::json!({
        "promptTokenCount": t.prompt,
        "candidatesTokenCount": completion - thoughts,
        "thoughtsTokenCount": thoughts,
        "totalTokenCount": t.prompt + completion,
    })
}

fn gemini_chunk(
    model: &str,
    text: &str,
    finish: bool,
    usage: serde_json::Value,
) -> serde_json::Value {
    let mut candidate = serde_json::json!({
        "content": {"parts": [{"text": text}], "role": "model"}, "index": 0,
    });
    if finish {
        candidate["finishReason"] = "STOP".into();
    }
    serde_json::json!({
        "candidates": [candidate], "usageMetadata": usage,
        "modelVersion": model, "responseId": "resp_fake",
    })
}

fn gemini_json(model: &str, t: Tokens, text: &str) -> serde_json::Value {
    gemini_chunk(model, text, true, gemini_usage(t, t.completion))
}

/// One response object per text delta; each reports the usage so far, the last the
/// total.
fn gemini_objects(model: &str, t: Tokens) -> Vec<serde_json::Value> {
    let n = FAKE_STREAM_DELTAS.len() as u64;
    FAKE_STREAM_DELTAS
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let last = i as u64 + 1 == n;
            let so_far = if last {
                t.completion
            } else {
                t.completion * (i as u64 + 1) / (n + 1)
            };
            gemini_chunk(model, w, last, gemini_usage(t, so_far))
        })
        .collect()
}

/// `streamGenerateContent` without `alt=sse`: a JSON array, one element per chunk.
fn gemini_array(model: &str, t: Tokens) -> String {
    let parts: Vec<String> = gemini_objects(model, t)
        .iter()
        .map(|o| o.to_string())
        .collect();
    format!("[{}]", parts.join(",\r\n"))
}

/// `streamGenerateContent?alt=sse`: `data: {json}\r\n\r\n` per chunk.
fn gemini_sse(model: &str, t: Tokens) -> Vec<String> {
    gemini_objects(model, t)
        .iter()
        .map(|o| format!("data: {o}\r\n\r\n"))
        .collect()
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
