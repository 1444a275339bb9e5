//! The admin listener: `/healthz`, `/readyz` and, for the gateway, `/metrics` and
//! `/interception-ca.pem` (the CA agents trust for intercepted tunnels). Never on the
//! mTLS port. The sidecar serves the same endpoints without metrics.

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
use crate::interception::InterceptionCa;
use crate::metrics::Metrics;

/// What the gateway's admin listener serves beyond health; the sidecar has neither.
#[derive(Clone, Default)]
pub struct AdminExtras {
    pub metrics: Option<Arc<Metrics>>,
    pub interception_ca: Option<Arc<InterceptionCa>>,
}

/// Serves until `stop`; what `extras` lacks is a 404.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    extras: AdminExtras,
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
        let extras = extras.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let health = health.clone();
                let extras = extras.clone();
                async move { Ok::<_, Infallible>(route(&req, &health, &extras)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, health: &Health, extras: &AdminExtras) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    if req.uri().path() == "/interception-ca.pem" {
        return match &extras.interception_ca {
            Some(ca) => {
                let mut r = text(StatusCode::OK, ca.certificate_pem());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-pem-file"),
                );
                r
            }
            None => not_found(),
        };
    }
    match (req.uri().path(), extras.metrics.as_deref()) {
        ("/healthz", _) => text(StatusCode::OK, "ok\n".into()),
        ("/readyz", _) => match health.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        ("/metrics", Some(metrics)) => scrape(health, metrics, req.headers()),
        _ => not_found(),
    }
}

fn scrape(health: &Health, metrics: &Metrics, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
    if let Some(expiry) = health.svid_expiry() {
        let secs = expiry
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics.svid_expiry.set(secs);
    }
    let openmetrics = metrics.encode();
    let (body, content_type) = match exposition_format(headers) {
        Exposition::OpenMetrics => (
            openmetrics,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        Exposition::Text => (
            prometheus_text(&openmetrics),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
    };
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

#[derive(Debug, PartialEq, Eq)]
enum Exposition {
    OpenMetrics,
    Text,
}

/// Picks the format the scraper prefers by its `Accept` q-values: OpenMetrics when it
/// ranks `application/openmetrics-text` highest, otherwise the Prometheus text format
/// 0.0.4 (also without `Accept`, as curl and older scrapers send).
fn exposition_format(headers: &http::HeaderMap) -> Exposition {
    let mut best = (0.0_f32, Exposition::Text);
    let mut text_q = 0.0_f32;
    for value in headers.get_all(http::header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for range in value.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1.0_f32;
            for p in parts {
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            match media.as_str() {
                "application/openmetrics-text" if q > best.0 => {
                    best = (q, Exposition::OpenMetrics);
                }
                "text/plain" | "text/*" | "*/*" => text_q = text_q.max(q),
                _ => {}
            }
        }
    }
    // A tie goes to OpenMetrics: the scraper named it.
    if best.1 == Exposition::OpenMetrics && best.0 >= text_q {
        Exposition::OpenMetrics
    } else {
        Exposition::Text
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: the same samples;
/// counter families are named with their `_total` suffix, `unknown` is `untyped`, and
/// there is no `# UNIT` or `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, "counter")) = rest.split_once(' ') {
                counters.insert(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) && !name.ends_with("_total") {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                let tail = if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                out.push_str(prefix);
                out.push_str(&name);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_str(v).unwrap(),
        );
        h
    }

    #[test]
    fn the_scrapers_preference_picks_the_format() {
        use Exposition::*;
        assert_eq!(exposition_format(&http::HeaderMap::new()), Text);
        assert_eq!(exposition_format(&accept("text/plain;version=0.0.4")), Text);
        assert_eq!(exposition_format(&accept("*/*")), Text);
        assert_eq!(
            exposition_format(&accept("application/openmetrics-text;version=1.0.0")),
            OpenMetrics
        );
        // What Prometheus 2.x and 3.x send by default.
        assert_eq!(
            exposition_format(&accept(
                "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            )),
            OpenMetrics
        );
        assert_eq!(
            exposition_format(&accept(
                "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"
            )),
            Text
        );
    }

    #[test]
    fn text_format_names_counter_families_with_total_and_has_no_eof() {
        let om = "# HELP egress_requests Requests.\n# TYPE egress_requests counter\negress_requests_total{a=\"b\"} 1\n# HELP egress_request_duration_seconds D.\n# TYPE egress_request_duration_seconds histogram\n# UNIT egress_request_duration_seconds seconds\negress_request_duration_seconds_count 0\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP egress_requests_total Requests.\n# TYPE egress_requests_total counter\negress_requests_total{a=\"b\"} 1\n# HELP egress_request_duration_seconds D.\n# TYPE egress_request_duration_seconds histogram\negress_request_duration_seconds_count 0\n"
        );
    }
}
