//! `CONNECT host:port`: decide, dial, answer 200, then relay opaque bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use egress_policy::RequestKind;

use super::client_hello;
use super::exchange::{ByteCounts, Exchange};
use super::metered::{Activity, MeteredIo};
use super::refusal::{empty, Refusal};
use super::registry::{ConnectionHold, TunnelHandle};
use super::target::{parse_authority, Host};
use super::{denial, dial_refusal, refuse, PeerIdentity, Proxy, ProxyBody};

impl Proxy {
    pub(super) async fn connect(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: &PeerIdentity,
    ) -> Response<ProxyBody> {
        let mut ex = Exchange::begin(
            self.audit.clone(),
            &self.telemetry,
            peer,
            "connect",
            "CONNECT",
            req.headers(),
        );
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
        // An L7 pathway's destination: the requests inside must be seen to be decided.
        if decision.pathway.as_ref().is_some_and(|p| p.is_l7()) {
            return match self.interception.clone() {
                Some(ca) => self.intercept(req, peer, target, ex, ca),
                None => refuse(
                    ex,
                    Refusal::Denied {
                        reason: "destination needs L7 inspection: configure interception or use http://host:port".into(),
                        rule: None,
                        code: "interception_not_configured",
                    },
                ),
            };
        }

        // Limits hold for tunnels too: rate, concurrency (for the tunnel's life) and
        // the byte budget, which closes the tunnel once spent.
        let admission = match self.admit(&decision).await {
            Ok(a) => a,
            Err(refusal) => return refuse(ex, refusal),
        };
        let allow = super::allowed_ranges(&decision, &self.global_allow);
        let (upstream, addr) = match self.dialer.dial(&target, &allow).await {
            Ok(ok) => ok,
            Err(e) => return refuse(ex, dial_refusal(&e)),
        };
        ex.set_resolved(addr.ip());

        // Kept for the re-check on policy reload; the connection slot (global and
        // per-agent caps) stays taken while the tunnel is open.
        let handle = self.registry.register_tunnel(
            peer,
            &target,
            super::header_pairs(req.headers()),
            Some(addr.ip()),
        );
        let hold = req.extensions().get::<ConnectionHold>().cloned();
        let sni_check = (target.port == 443
            || decision.pathway.as_ref().is_some_and(|p| p.require_sni))
        .then(|| (target.host.clone(), self.client_hello_timeout));

        let idle = self.tunnel_idle;
        let stop = self.stop_tunnels.clone();
        let (ex_peer, ex_target) = (peer.spiffe_id.clone(), target.clone());
        let active = self.telemetry.metrics.active_tunnels.clone();
        self.tunnels.spawn(async move {
            active.inc();
            let counts = ByteCounts::new();
            let mut sni_refused = None;
            let error = match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let mut agent = TokioIo::new(upgraded);
                    match check_client_hello(&mut agent, sni_check).await {
                        Ok(prefix) => {
                            let ends = Ends { idle, stop, handle: &handle, budget: admission.as_ref() };
                            relay(agent, upstream, prefix, &counts, ends).await
                        }
                        Err(why) => {
                            tracing::warn!(source = %ex_peer, destination = %ex_target, reason = %why, "tunnel closed: SNI check failed");
                            sni_refused = Some(why);
                            None
                        }
                    }
                }
                Err(e) => Some(format!("upgrade failed: {e}")),
            };
            drop(hold);
            if let Some(a) = admission {
                a.finish_tunnel(counts.sent() + counts.received());
            }
            match sni_refused {
                // Opened, then refused: a denial with its reason, not an allowed tunnel.
                Some(why) => ex.deny_after_open(200, &counts, why),
                None => ex.finish(200, &counts, error),
            }
            active.dec();
        });

        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::OK;
        response
    }
}

/// What else ends a tunnel besides either side closing.
struct Ends<'a> {
    idle: Duration,
    stop: CancellationToken,
    handle: &'a TunnelHandle,
    budget: Option<&'a crate::limits::Admission>,
}

/// For tunnels that need it, reads the agent's ClientHello and checks its SNI against
/// the CONNECT host. Returns the bytes read, to be relayed first.
async fn check_client_hello<A>(
    agent: &mut A,
    check: Option<(Host, Duration)>,
) -> Result<Vec<u8>, String>
where
    A: tokio::io::AsyncRead + Unpin,
{
    let Some((host, timeout)) = check else {
        return Ok(Vec::new());
    };
    let (prefix, hello) = client_hello::read(agent, timeout).await;
    let hello = hello.map_err(|e| e.to_string())?;
    client_hello::check_sni(&host, hello.sni.as_deref())?;
    Ok(prefix)
}

/// Copies both ways (after sending `prefix` upstream) until either side closes, the
/// tunnel idles out, a policy reload denies it, or `stop` fires.
/// Returns why it ended abnormally, if it did.
async fn relay<A>(
    mut agent: A,
    upstream: TcpStream,
    prefix: Vec<u8>,
    counts: &Arc<ByteCounts>,
    ends: Ends<'_>,
) -> Option<String>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ends {
        idle,
        stop,
        handle,
        budget,
    } = ends;
    let spent = async {
        match budget {
            Some(a) => a.watch_tunnel(|| counts.sent() + counts.received()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(spent);
    let activity = Activity::new();
    let mut upstream = MeteredIo::new(upstream, counts.clone(), activity.clone());
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(&prefix).await {
            return Some(format!("tunnel closed: {e}"));
        }
    }
    // Buffers are held only while bytes move (copy.rs): idle tunnels hold none.
    let copy = super::copy::copy_both_ways(&mut agent, &mut upstream, super::RELAY_BUFFER_BYTES);
    tokio::pin!(copy);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            result = &mut copy => return match result {
                Ok(_) => None,
                // An agent that drops its mTLS connection without close_notify has
                // simply closed the tunnel.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                Err(e) => Some(format!("tunnel closed: {e}")),
            },
            _ = tick.tick() => {
                if activity.idle_for() >= idle {
                    return Some(format!("tunnel idle for {idle:?}"));
                }
            }
            why = handle.closed() => return Some(why),
            why = &mut spent => return Some(why),
            _ = stop.cancelled() => return Some("gateway shutting down".into()),
        }
    }
}
