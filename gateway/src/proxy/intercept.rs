//! Intercepted tunnels: `CONNECT host:port` to a destination an L7 pathway of the agent
//! names. The gateway answers `200`, requires the ClientHello's SNI to be the CONNECT
//! host, completes the agent's TLS with a leaf for that host from the interception CA,
//! and serves every HTTP request inside (HTTP/1.1 or HTTP/2) as an L7 request of its
//! own: one decision, limits, injected credentials, upstream TLS, audit line and span.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use crate::interception::InterceptionCa;

use super::client_hello;
use super::exchange::{ByteCounts, Exchange};
use super::metered::{Activity, MeteredIo};
use super::refusal::{empty, Refusal};
use super::registry::{ConnectionHold, TunnelHandle};
use super::target::Target;
use super::{PeerIdentity, Proxy, ProxyBody};

/// How long a graceful close waits for in-flight requests (shutdown, reload, idle).
const DRAIN: Duration = Duration::from_secs(30);

/// Why an intercepted tunnel ended before serving a request, as its audit line says.
enum Failure {
    /// The policy's checks failed (SNI): a denial.
    Refused(String),
    /// Something broke (timeout, handshake, CA): an error on an allowed tunnel.
    Error(String),
}

impl Proxy {
    /// Answers the CONNECT with `200` and serves the tunnel in the background.
    pub(super) fn intercept(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: &PeerIdentity,
        target: Target,
        mut ex: Exchange,
        ca: Arc<InterceptionCa>,
    ) -> Response<ProxyBody> {
        ex.set_intercepted();
        let handle =
            self.registry
                .register_tunnel(peer, &target, super::header_pairs(req.headers()), None);
        let hold = req.extensions().get::<ConnectionHold>().cloned();
        let peer = Arc::new(peer.clone());
        let active = self.telemetry.metrics.active_tunnels.clone();
        let proxy = self.clone();
        self.tunnels.spawn(async move {
            active.inc();
            let counts = ByteCounts::new();
            let outcome = match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    proxy
                        .serve_intercepted(upgraded, &peer, &target, &ca, &handle, &counts)
                        .await
                }
                Err(e) => Err(Failure::Error(format!("upgrade failed: {e}"))),
            };
            drop(hold);
            match outcome {
                // Each request inside wrote its own line and span.
                Ok(served) if served > 0 => ex.discard(),
                Ok(_) => ex.finish(200, &counts, None),
                Err(Failure::Refused(why)) => {
                    tracing::warn!(source = %peer.spiffe_id, destination = %target, reason = %why, "intercepted tunnel refused");
                    ex.refuse(&Refusal::Denied {
                        reason: why,
                        rule: None,
                        code: "intercepted_tls_refused",
                    });
                }
                Err(Failure::Error(why)) => {
                    tracing::warn!(source = %peer.spiffe_id, destination = %target, error = %why, "intercepted tunnel failed");
                    ex.finish(200, &counts, Some(why));
                }
            }
            active.dec();
        });
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::OK;
        response
    }

    /// Terminates the agent's TLS and serves HTTP inside until the agent closes, the
    /// tunnel idles out, a reload denies it or the gateway stops. Returns how many
    /// requests it served.
    async fn serve_intercepted(
        self: &Arc<Self>,
        upgraded: hyper::upgrade::Upgraded,
        peer: &Arc<PeerIdentity>,
        target: &Target,
        ca: &InterceptionCa,
        handle: &TunnelHandle,
        counts: &Arc<ByteCounts>,
    ) -> Result<usize, Failure> {
        let activity = Activity::new();
        let io = MeteredIo::new(TokioIo::new(upgraded), counts.clone(), activity.clone());
        let timeout = self.client_hello_timeout;
        let start = match tokio::time::timeout(
            timeout,
            LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io),
        )
        .await
        {
            Err(_) => {
                return Err(Failure::Error(format!(
                    "no TLS ClientHello within {timeout:?}"
                )))
            }
            Ok(Err(e)) => return Err(Failure::Refused(format!("not a TLS ClientHello: {e}"))),
            Ok(Ok(start)) => start,
        };
        let sni = start.client_hello().server_name().map(str::to_owned);
        client_hello::check_sni(&target.host, sni.as_deref()).map_err(Failure::Refused)?;
        let host = target.host.as_policy_str();
        let config = ca
            .server_config(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|e| Failure::Error(e.to_string()))?;
        let tls = match tokio::time::timeout(timeout, start.into_stream(config)).await {
            Err(_) => {
                return Err(Failure::Error(format!(
                    "TLS handshake with the agent not done within {timeout:?}"
                )))
            }
            Ok(Err(e)) => {
                return Err(Failure::Error(format!(
                    "TLS handshake with the agent failed: {e}"
                )))
            }
            Ok(Ok(tls)) => tls,
        };

        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service = {
            let (proxy, peer, target, served) =
                (self.clone(), peer.clone(), target.clone(), served.clone());
            service_fn(move |req| {
                let (proxy, peer, target) = (proxy.clone(), peer.clone(), target.clone());
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move { Ok::<_, Infallible>(proxy.forward_intercepted(req, &peer, &target).await) }
            })
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // No header-read timer: hyper re-arms it while a keep-alive connection idles
        // between requests and would close it; the tunnel's idle timeout applies.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);

        let idle = self.tunnel_idle;
        let stop: CancellationToken = self.stop_tunnels.clone();
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
        // Set once a graceful close has begun: why, and until when requests may finish.
        let mut closing: Option<(String, tokio::time::Instant)> = None;
        let ended = loop {
            let deadline = closing.as_ref().map(|(_, d)| *d);
            tokio::select! {
                result = conn.as_mut() => break match result {
                    Ok(()) => closing.map(|(why, _)| why),
                    Err(e) => Some(e.to_string()),
                },
                _ = tick.tick(), if closing.is_none() => {
                    if activity.idle_for() >= idle {
                        conn.as_mut().graceful_shutdown();
                        closing = Some((format!("tunnel idle for {idle:?}"), tokio::time::Instant::now() + DRAIN));
                    }
                }
                why = handle.closed(), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some((why, tokio::time::Instant::now() + DRAIN));
                }
                _ = stop.cancelled(), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    // The shutdown grace is already over when this fires.
                    closing = Some(("gateway shutting down".into(), tokio::time::Instant::now() + Duration::from_secs(1)));
                }
                _ = sleep_until_some(deadline) => {
                    break Some("requests still in flight when the tunnel was closed".into());
                }
            }
        };
        let served = served.load(std::sync::atomic::Ordering::Relaxed);
        match ended {
            Some(why) if served == 0 => Err(Failure::Error(why)),
            _ => Ok(served),
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
