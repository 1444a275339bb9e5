//! The mTLS listener: accept, handshake (client SVID required), then serve HTTP/1.1
//! proxy requests on the connection.

use std::net::SocketAddr;
use std::sync::Arc;

use dashmap::DashMap;
use egress_policy::SpiffeId;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ResourceLimits, Timeouts};
use crate::identity::{peer_spiffe_id, SpiffeRejection};
use crate::metrics::Metrics;
use crate::proxy::registry::ConnectionHold;
use crate::proxy::{PeerIdentity, Proxy};
use crate::request_head::{self, HeadLimits};

pub struct Listener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    proxy: Arc<Proxy>,
    timeouts: Timeouts,
    limits: ResourceLimits,
    connections: Arc<Semaphore>,
    per_agent: Arc<DashMap<SpiffeId, usize>>,
    metrics: Arc<Metrics>,
}

impl Listener {
    pub fn new(
        tcp: TcpListener,
        tls: Arc<ServerConfig>,
        proxy: Arc<Proxy>,
        timeouts: Timeouts,
        limits: ResourceLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Listener {
            metrics,
            tcp,
            acceptor: TlsAcceptor::from(tls),
            proxy,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            per_agent: Arc::new(DashMap::new()),
            timeouts,
            limits,
        }
    }

    /// Accepts until `stop` fires; connection tasks go on `tracker` so shutdown can wait.
    pub async fn run(self, stop: CancellationToken, tracker: TaskTracker) {
        let this = Arc::new(self);
        loop {
            let (tcp, addr) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = this.tcp.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = this.connections.clone().try_acquire_owned() else {
                tracing::warn!(peer = %addr, limit = this.limits.max_connections, "connection limit reached; closing new connection");
                // Before the handshake: no TLS work is spent on a connection that is refused.
                this.metrics.global_connection_limit_refusals.inc();
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let conn = this.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                conn.serve(tcp, addr, stop, permit).await;
            });
        }
    }

    async fn serve(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        stop: CancellationToken,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let tls = match tokio::time::timeout(self.timeouts.handshake, self.acceptor.accept(tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = handshake_failure_reason(&e);
                self.metrics.record_handshake_failure(reason);
                tracing::warn!(peer = %addr, reason, error = %e, "mTLS handshake refused");
                return;
            }
            Err(_) => {
                self.metrics.record_handshake_failure("timeout");
                tracing::warn!(peer = %addr, timeout = ?self.timeouts.handshake, "mTLS handshake timed out");
                return;
            }
        };
        // The verifier already required exactly one valid SPIFFE ID; read it back.
        let spiffe_id = match tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(peer_spiffe_id)
        {
            Some(Ok(id)) => id,
            Some(Err(e)) => {
                tracing::warn!(peer = %addr, reason = %e, "client certificate has no usable SPIFFE ID");
                return;
            }
            None => {
                tracing::warn!(peer = %addr, "client presented no certificate");
                return;
            }
        };
        let agent_slot = AgentSlot::take(
            &self.per_agent,
            &spiffe_id,
            self.limits.max_connections_per_agent,
        );
        let peer = Arc::new(PeerIdentity {
            spiffe_id,
            address: addr,
        });
        let Some(agent_slot) = agent_slot else {
            tracing::warn!(peer = %addr, spiffe_id = %peer.spiffe_id, limit = self.limits.max_connections_per_agent, "per-agent connection limit reached; answering 429 and closing");
            self.refuse_over_agent_cap(tls, peer).await;
            return;
        };
        tracing::debug!(peer = %addr, spiffe_id = %peer.spiffe_id, "mTLS connection accepted");
        let _active = GaugeGuard::new(&self.metrics.active_connections);

        // Both slots are released when the connection and every tunnel it opened are done.
        let hold = ConnectionHold(Arc::new((permit, agent_slot)));
        let registered = self
            .proxy
            .registry()
            .register_connection(&peer, peer_credential(&tls));
        let proxy = self.proxy.clone();
        // Heads are read and checked by the guard (exact size cap, JSON refusals with an
        // audit line, header timer only while a head arrives); hyper's own timer stays
        // off because it also runs on idle keep-alive connections.
        let (tls, heads) = request_head::guard(
            tls,
            HeadLimits {
                max_head_bytes: self.limits.max_header_bytes,
                header_timeout: self.timeouts.request_header,
                idle_timeout: self.timeouts.idle,
            },
        );
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(hold.clone());
            proxy
                .clone()
                .handle_guarded(req, peer.clone(), heads.clone())
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_header_size(self.limits.max_header_bytes)
            .max_buf_size(self.limits.max_header_bytes)
            .keep_alive(true);
        let conn = builder
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
                }
            }
            _ = stop.cancelled() => {
                // Finish the in-flight request, then close.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            why = registered.closed() => {
                // A policy reload no longer admits the peer, or its certificate expired
                // or stopped verifying (`proxy::peer_lifetime`).
                tracing::warn!(peer = %addr, reason = %why, "closing connection");
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

impl Listener {
    /// Serves one request on a connection over the per-agent cap with `429`, then closes.
    async fn refuse_over_agent_cap(
        &self,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        peer: Arc<PeerIdentity>,
    ) {
        let proxy = self.proxy.clone();
        let max = self.limits.max_connections_per_agent;
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let response = proxy.refuse_over_connection_cap(&req, &peer, max);
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.timeouts.request_header)
            .max_buf_size(self.limits.max_header_bytes)
            .keep_alive(false);
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        // Bounded: a client that sends nothing must not keep the refused connection.
        let _ = tokio::time::timeout(self.timeouts.request_header, conn).await;
    }
}

/// The chain the peer authenticated with, kept so the connection (and its tunnels)
/// end when it expires or stops verifying.
fn peer_credential(
    tls: &tokio_rustls::server::TlsStream<TcpStream>,
) -> Option<crate::identity::PeerCredential> {
    crate::identity::PeerCredential::from_chain(tls.get_ref().1.peer_certificates()?)
}

/// A bounded name for why a handshake failed, for the metric label.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(CertificateError::BadSignature) => "bad_signature",
        Error::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<SpiffeRejection>() {
                Some(SpiffeRejection::PeerId(_)) => "no_spiffe_id",
                Some(SpiffeRejection::TrustDomainNotAccepted(_)) => "trust_domain_not_accepted",
                Some(SpiffeRejection::NoBundle(_)) => "no_trust_bundle",
                Some(_) => "spiffe_rejected",
                None => "bad_certificate",
            }
        }
        Error::InvalidCertificate(_) => "bad_certificate",
        // The client refused the gateway's certificate (wrong bundle, expired SVID,
        // unexpected SPIFFE ID): a configuration problem on one side, not garbage.
        Error::AlertReceived(alert) if rejects_certificate(*alert) => "peer_rejected_certificate",
        _ => "protocol_error",
    }
}

/// TLS alerts a peer sends when it does not accept the certificate it was shown.
/// `DecryptError` is what rustls sends when a chain's signature does not verify, as
/// when the client's bundle holds a different CA under the same name (a stale bundle
/// after a CA rotation); during the handshake it refers to the gateway's credentials.
fn rejects_certificate(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::DecryptError
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::BadCertificateStatusResponse
    )
}

/// Increments a gauge for as long as it lives.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One of an agent's connection slots, given back on drop.
struct AgentSlot {
    map: Arc<DashMap<SpiffeId, usize>>,
    id: SpiffeId,
}

impl AgentSlot {
    fn take(map: &Arc<DashMap<SpiffeId, usize>>, id: &SpiffeId, max: usize) -> Option<Self> {
        let mut count = map.entry(id.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AgentSlot {
            map: map.clone(),
            id: id.clone(),
        })
    }
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        let empty = match self.map.get_mut(&self.id) {
            Some(mut c) => {
                *c = c.saturating_sub(1);
                *c == 0
            }
            None => false,
        };
        if empty {
            self.map.remove_if(&self.id, |_, c| *c == 0);
        }
    }
}
