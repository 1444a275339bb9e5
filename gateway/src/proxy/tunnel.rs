//! `CONNECT host:port`: decide, dial, answer 200, then relay opaque bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use egress_policy::RequestKind;

use super::exchange::{ByteCounts, Exchange};
use super::metered::{Activity, MeteredIo};
use super::refusal::{empty, Refusal};
use super::target::parse_authority;
use super::{denial, dial_refusal, refuse, PeerIdentity, Proxy, ProxyBody};
use crate::telemetry::TraceContext;

impl Proxy {
    pub(super) async fn connect(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: &PeerIdentity,
        trace: TraceContext,
    ) -> Response<ProxyBody> {
        let mut ex = Exchange::begin(self.audit.clone(), peer, "connect", "CONNECT", trace);
        let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) else {
            return refuse(
                ex,
                Refusal::BadRequest("CONNECT needs an authority-form target: host:port".into()),
            );
        };
        let target = match parse_authority(&authority) {
            Ok(t) => t,
            Err(e) => {
                ex.set_target(&authority, 0, "");
                return refuse(ex, Refusal::BadRequest(e.to_string()));
            }
        };
        ex.set_target(&target.host.as_policy_str(), target.port, "");

        let decision = self.decide(
            peer,
            RequestKind::Connect,
            "CONNECT",
            &target,
            "",
            "",
            req.headers(),
            None,
        );
        ex.set_decision(&decision);
        if !decision.permits() {
            return refuse(ex, denial(&decision));
        }

        let allow = decision
            .pathway
            .as_ref()
            .map(|p| p.allow_cidrs.clone())
            .unwrap_or_default();
        let (upstream, addr) = match self.dialer.dial(&target, &allow).await {
            Ok(ok) => ok,
            Err(e) => return refuse(ex, dial_refusal(&e)),
        };
        ex.set_resolved(addr.ip());

        let idle = self.tunnel_idle;
        let stop = self.stop_tunnels.clone();
        self.tunnels.spawn(async move {
            let counts = ByteCounts::new();
            let error = match hyper::upgrade::on(req).await {
                Ok(upgraded) => relay(TokioIo::new(upgraded), upstream, &counts, idle, stop).await,
                Err(e) => Some(format!("upgrade failed: {e}")),
            };
            ex.finish(200, &counts, error);
        });

        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::OK;
        response
    }
}

/// Copies both ways until either side closes, the tunnel idles out, or `stop` fires.
/// Returns why it ended abnormally, if it did.
async fn relay<A>(
    mut agent: A,
    upstream: TcpStream,
    counts: &Arc<ByteCounts>,
    idle: Duration,
    stop: CancellationToken,
) -> Option<String>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let mut upstream = MeteredIo::new(upstream, counts.clone(), activity.clone());
    let copy = tokio::io::copy_bidirectional(&mut agent, &mut upstream);
    tokio::pin!(copy);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            result = &mut copy => return result.err().map(|e| format!("tunnel closed: {e}")),
            _ = tick.tick() => {
                if activity.idle_for() >= idle {
                    return Some(format!("tunnel idle for {idle:?}"));
                }
            }
            _ = stop.cancelled() => return Some("gateway shutting down".into()),
        }
    }
}
