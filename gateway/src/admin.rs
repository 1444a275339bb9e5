//! The admin listener: `/healthz`, `/readyz` and, for the gateway, `/metrics`. Never on
//! the mTLS port. The sidecar serves the same endpoints without metrics.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

/// Serves until `stop`; without `metrics`, `/metrics` is a 404.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Option<Arc<Metrics>>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let health = health.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let health = health.clone();
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(route(&req, &health, metrics.as_deref())) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn route(
    req: &Request<Incoming>,
    health: &Health,
    metrics: Option<&Metrics>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match (req.uri().path(), metrics) {
        ("/healthz", _) => text(StatusCode::OK, "ok\n".into()),
        ("/readyz", _) => match health.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        ("/metrics", Some(metrics)) => scrape(health, metrics),
        _ => not_found(),
    }
}

fn scrape(health: &Health, metrics: &Metrics) -> Response<Full<Bytes>> {
    if let Some(expiry) = health.svid_expiry() {
        let secs = expiry
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics.svid_expiry.set(secs);
    }
    let mut r = text(StatusCode::OK, metrics.encode());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

fn not_found() -> Response<Full<Bytes>> {
    text(StatusCode::NOT_FOUND, "not found\n".into())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
