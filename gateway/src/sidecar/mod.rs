//! `egress-gateway sidecar`: a plain-HTTP proxy beside an agent that cannot present a
//! client certificate, forwarding over mTLS to the gateway.
//!
//! The sidecar takes the agent's own SVID from the Workload API (the same
//! [`IdentitySource`] the gateway uses), accepts `CONNECT` and absolute-form requests on
//! loopback, and sends each to the gateway over mTLS, accepting only the configured
//! gateway SPIFFE ID. The gateway therefore sees the agent's SPIFFE ID, exactly as for a
//! direct mTLS client; the sidecar decides nothing itself and relays the gateway's
//! answers (403, 429, 502, ...) unchanged.

mod config;
mod proxy;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{SidecarConfig, SidecarOverrides, SidecarTimeouts};
pub use upstream::GatewayError;

use crate::health::Health;
use crate::identity::{IdentityError, IdentitySource, TlsError};
use proxy::SidecarProxy;
use upstream::{Affinity, GatewayClient};

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to listen on {0}: not a loopback address, and the proxy port is unauthenticated \
         (pass --allow-non-loopback if that is really meant)"
    )]
    NotLoopback(SocketAddr),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running sidecar; [`RunningSidecar::shutdown`] stops it.
pub struct RunningSidecar {
    listen_addr: SocketAddr,
    admin_addr: SocketAddr,
    grace: std::time::Duration,
    health: Arc<Health>,
    identity: IdentitySource,
    stop: CancellationToken,
    stop_admin: CancellationToken,
    connections: TaskTracker,
    proxy: Arc<SidecarProxy>,
}

/// Starts the admin listener, waits (bounded) for the agent's first SVID, then listens
/// for proxy requests. Ports 0 are resolved: read them back from the handle.
pub async fn start(config: SidecarConfig) -> Result<RunningSidecar, SidecarError> {
    // Checked here too, not only in config loading, so embedders cannot skip it.
    if !config.listen.ip().is_loopback() && !config.allow_non_loopback {
        return Err(SidecarError::NotLoopback(config.listen));
    }
    let health = Arc::new(Health::without_policy());
    let admin = bind("admin", config.admin).await?;
    let admin_addr = local_addr("admin", config.admin, &admin)?;
    let stop_admin = CancellationToken::new();
    tokio::spawn(crate::admin::serve(
        admin,
        health.clone(),
        crate::admin::AdminExtras::default(),
        stop_admin.clone(),
    ));
    tracing::info!(%admin_addr, "sidecar admin listener up (/healthz, /readyz)");

    let identity = match IdentitySource::connect(&config.workload_api, config.startup_timeout).await
    {
        Ok(i) => i,
        Err(e) => {
            stop_admin.cancel();
            return Err(e.into());
        }
    };
    health.set_identity(identity.clone());

    let started = async {
        let client = GatewayClient::new(
            config.gateway.clone(),
            identity.clone(),
            config.gateway_id.clone(),
            config.timeouts.connect,
            config.timeouts.idle,
            config.max_idle_connections,
        )?;
        let tcp = bind("sidecar proxy", config.listen).await?;
        let listen_addr = local_addr("sidecar proxy", config.listen, &tcp)?;
        Ok::<_, SidecarError>((client, tcp, listen_addr))
    }
    .await;
    let (client, tcp, listen_addr) = match started {
        Ok(s) => s,
        Err(e) => {
            stop_admin.cancel();
            identity.shutdown().await;
            return Err(e);
        }
    };
    let stop = CancellationToken::new();
    tokio::spawn(client.clone().reap(stop_admin.clone()));
    let proxy = Arc::new(SidecarProxy {
        client,
        tunnels: TaskTracker::new(),
        stop_tunnels: CancellationToken::new(),
    });
    let connections = TaskTracker::new();
    tokio::spawn(accept_loop(
        tcp,
        proxy.clone(),
        config.timeouts.request_header,
        stop.clone(),
        connections.clone(),
    ));
    tracing::info!(
        %listen_addr,
        gateway = %config.gateway,
        gateway_id = %config.gateway_id,
        spiffe_id = ?identity.current().map(|m| m.spiffe_id.to_string()),
        "sidecar listening (plain HTTP proxy; mTLS to the gateway)"
    );
    Ok(RunningSidecar {
        listen_addr,
        admin_addr,
        grace: config.shutdown_grace,
        health,
        identity,
        stop,
        stop_admin,
        connections,
        proxy,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind { what, addr, source })
}

fn local_addr(
    what: &'static str,
    addr: SocketAddr,
    l: &TcpListener,
) -> Result<SocketAddr, SidecarError> {
    l.local_addr()
        .map_err(|source| SidecarError::Bind { what, addr, source })
}

async fn accept_loop(
    tcp: TcpListener,
    proxy: Arc<SidecarProxy>,
    header_timeout: std::time::Duration,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "sidecar accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            serve(stream, peer, proxy, header_timeout, stop).await;
        });
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<SidecarProxy>,
    header_timeout: std::time::Duration,
    stop: CancellationToken,
) {
    let affinity = Arc::new(Affinity::new(proxy.client.clone()));
    let service = service_fn(move |req| proxy.clone().handle(affinity.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "agent connection ended with an error");
            }
        }
        _ = stop.cancelled() => {
            // Finish the in-flight request, then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

impl RunningSidecar {
    /// The plain HTTP proxy address for `HTTPS_PROXY`/`HTTP_PROXY`.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// `/healthz` and `/readyz`.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn identity(&self) -> &IdentitySource {
        &self.identity
    }

    /// Stops accepting, lets in-flight requests and tunnels finish for the grace
    /// period, then closes what is left.
    pub async fn shutdown(self) {
        tracing::info!(grace = ?self.grace, "sidecar shutting down");
        self.health.set_draining();
        self.stop.cancel();
        self.connections.close();
        self.proxy.tunnels.close();
        let drained = tokio::time::timeout(self.grace, async {
            self.connections.wait().await;
            self.proxy.tunnels.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over; closing remaining tunnels");
            self.proxy.stop_tunnels.cancel();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), self.proxy.tunnels.wait())
                    .await;
        }
        self.stop_admin.cancel();
        self.identity.shutdown().await;
    }
}
