//! A test classifier for `inspect.guard`: answers the gateway's questions the way the
//! test sets it to (allow, deny with a reason, hang, fail) and records each question.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::upstream::{spawn_accept_loop, Task};

/// How the guard answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardMode {
    /// `{"action":"allow"}`.
    Allow,
    /// `{"action":"deny","reason":...}` when the text contains `needle`, else allow.
    DenyWhenContains { needle: String, reason: String },
    /// Never answers.
    Hang,
    /// `500` with a body that is not a verdict.
    Fail,
    /// `200` with JSON that has no `action`.
    Nonsense,
}

pub struct TestGuard {
    pub addr: SocketAddr,
    mode: Arc<Mutex<GuardMode>>,
    questions: Arc<Mutex<Vec<serde_json::Value>>>,
    _task: Task,
}

impl TestGuard {
    pub async fn start(mode: GuardMode) -> anyhow::Result<TestGuard> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(Mutex::new(mode));
        let questions = Arc::new(Mutex::new(Vec::new()));
        let (m, q) = (mode.clone(), questions.clone());
        let task = spawn_accept_loop(listener, Arc::new(AtomicUsize::new(0)), move |tcp| {
            let (m, q) = (m.clone(), q.clone());
            async move {
                let svc = service_fn(move |req| answer(req, m.clone(), q.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            }
        });
        Ok(TestGuard {
            addr,
            mode,
            questions,
            _task: task,
        })
    }

    /// `http://127.0.0.1:port/v1/classify`.
    pub fn url(&self) -> String {
        format!("http://{}/v1/classify", self.addr)
    }

    pub fn set_mode(&self, mode: GuardMode) {
        if let Ok(mut m) = self.mode.lock() {
            *m = mode;
        }
    }

    /// Every question received, as JSON.
    pub fn questions(&self) -> Vec<serde_json::Value> {
        self.questions.lock().map(|q| q.clone()).unwrap_or_default()
    }
}

async fn answer(
    req: Request<Incoming>,
    mode: Arc<Mutex<GuardMode>>,
    questions: Arc<Mutex<Vec<serde_json::Value>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let question: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Ok(mut q) = questions.lock() {
        q.push(question.clone());
    }
    let mode = mode.lock().map(|m| m.clone()).unwrap_or(GuardMode::Fail);
    let json = |status: u16, v: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        r
    };
    Ok(match mode {
        GuardMode::Allow => json(200, serde_json::json!({"action": "allow"})),
        GuardMode::DenyWhenContains { needle, reason } => {
            let text = question["text"].as_str().unwrap_or_default();
            if text.contains(&needle) {
                json(200, serde_json::json!({"action": "deny", "reason": reason}))
            } else {
                json(200, serde_json::json!({"action": "allow"}))
            }
        }
        GuardMode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            json(200, serde_json::json!({"action": "allow"}))
        }
        GuardMode::Fail => json(500, serde_json::json!({"detail": "model not loaded"})),
        GuardMode::Nonsense => json(200, serde_json::json!({"label": "SAFE"})),
    })
}
