//! mTLS connections from the sidecar to the gateway, and their reuse.
//!
//! Every connection presents the agent's current SVID and accepts only the configured
//! gateway SPIFFE ID. An agent's keep-alive connection keeps one gateway connection for
//! its forwarded requests (see [`Affinity`]); when the agent connection ends, that
//! gateway connection goes into a shared idle pool for the next agent connection or
//! tunnel. Pooled connections are tagged with the SVID generation that opened them and
//! are not reused after a rotation, so the gateway sees the new SVID from then on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::config::split_host_port;
use crate::identity::{client_config_for_peer, describe_tls_failure, IdentitySource, TlsError};

/// Why the sidecar could not get a request to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot resolve the gateway address {gateway}: {reason}")]
    Resolve { gateway: String, reason: String },
    #[error("cannot connect to the gateway at {gateway}: {reason}")]
    Connect { gateway: String, reason: String },
    #[error("connecting to the gateway at {gateway} timed out after {timeout:?}")]
    Timeout { gateway: String, timeout: Duration },
    #[error(
        "mTLS handshake with the gateway at {gateway} failed: {reason} \
         (is --gateway-id the gateway's SPIFFE ID, and do both trust the same bundle?)"
    )]
    Handshake { gateway: String, reason: String },
    #[error("the connection to the gateway failed: {0}")]
    Http(#[from] hyper::Error),
}

impl GatewayError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, GatewayError::Timeout { .. })
    }
}

/// A gateway connection ready for a request, and the SVID generation it presented.
pub(crate) struct Conn {
    pub sender: SendRequest<Incoming>,
    pub generation: u64,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

pub(crate) struct GatewayClient {
    gateway: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    identity: IdentitySource,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
}

impl GatewayClient {
    pub fn new(
        gateway: String,
        identity: IdentitySource,
        gateway_id: egress_policy::SpiffeId,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Result<Arc<Self>, TlsError> {
        let tls = client_config_for_peer(&identity, gateway_id)?;
        // The SPIFFE verifier decides by URI SAN; the name only goes into SNI.
        let server_name = split_host_port(&gateway)
            .ok()
            .and_then(|(host, _)| ServerName::try_from(host.to_string()).ok())
            .unwrap_or_else(|| ServerName::try_from("egress-gateway").expect("static DNS name"));
        Ok(Arc::new(GatewayClient {
            gateway,
            server_name,
            connector: TlsConnector::from(tls),
            identity,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        }))
    }

    fn generation(&self) -> u64 {
        self.identity.current().map(|m| m.generation).unwrap_or(0)
    }

    /// A pooled idle connection opened with the current SVID, or a new one.
    pub async fn checkout(&self) -> Result<Conn, GatewayError> {
        let generation = self.generation();
        if let Some(conn) = self.take_idle(generation) {
            return Ok(conn);
        }
        self.dial(generation).await
    }

    fn take_idle(&self, generation: u64) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        // Most recently used first: the likeliest to still be open.
        while let Some(i) = idle.pop() {
            if self.reusable(&i, generation) {
                return Some(i.conn);
            }
        }
        None
    }

    fn reusable(&self, i: &Idle, generation: u64) -> bool {
        i.conn.generation == generation
            && i.since.elapsed() < self.idle_timeout
            && i.conn.sender.is_ready()
    }

    /// Gives a connection back once its last response has been read.
    pub fn checkin(self: &Arc<Self>, mut conn: Conn) {
        let this = self.clone();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            if conn.sender.ready().await.is_err() || conn.generation != this.generation() {
                return;
            }
            if let Ok(mut idle) = this.idle.lock() {
                if idle.len() < this.max_idle {
                    idle.push(Idle {
                        conn,
                        since: Instant::now(),
                    });
                }
            }
        });
    }

    /// Closes idle connections that expired or were opened with an older SVID.
    pub async fn reap(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval((self.idle_timeout / 2).max(Duration::from_secs(1)));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let generation = self.generation();
            if let Ok(mut idle) = self.idle.lock() {
                idle.retain(|i| self.reusable(i, generation));
            }
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A new mTLS connection to the gateway: resolve, connect, handshake, all bounded by
    /// the connect timeout.
    pub async fn dial(&self, generation: u64) -> Result<Conn, GatewayError> {
        let timeout = self.connect_timeout;
        let tls = tokio::time::timeout(timeout, self.connect_tls())
            .await
            .map_err(|_| GatewayError::Timeout {
                gateway: self.gateway.clone(),
                timeout,
            })??;
        let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "gateway connection ended with an error");
            }
        });
        Ok(Conn { sender, generation })
    }

    async fn connect_tls(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, GatewayError> {
        let addrs: Vec<_> = tokio::net::lookup_host(self.gateway.as_str())
            .await
            .map_err(|e| GatewayError::Resolve {
                gateway: self.gateway.clone(),
                reason: e.to_string(),
            })?
            .collect();
        let mut last = String::from("the name resolved to no address");
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let tcp = tcp.ok_or_else(|| GatewayError::Connect {
            gateway: self.gateway.clone(),
            reason: last,
        })?;
        let _ = tcp.set_nodelay(true);
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| GatewayError::Handshake {
                gateway: self.gateway.clone(),
                reason: describe_tls_failure(&e, "the gateway"),
            })
    }
}

/// One agent connection's gateway connection, kept across its keep-alive requests so
/// consecutive requests ride the same mTLS connection without a pool round trip.
/// Dropped with the agent connection, it hands the gateway connection to the pool.
pub(crate) struct Affinity {
    client: Arc<GatewayClient>,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

impl Affinity {
    pub fn new(client: Arc<GatewayClient>) -> Self {
        Affinity {
            client,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends a forwarded request; retries once on a fresh connection when a reused
    /// one turned out closed before the request was written.
    pub async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, GatewayError> {
        let mut slot = self.conn.lock().await;
        let mut conn = match slot.take() {
            Some(mut c) if c.generation == self.client.generation() => {
                // The previous response was read in full before hyper handed us this
                // request, so this resolves at once unless the connection closed.
                match c.sender.ready().await {
                    Ok(()) => c,
                    Err(_) => self.client.checkout().await?,
                }
            }
            Some(_) | None => self.client.checkout().await?,
        };
        match conn.sender.try_send_request(req).await {
            Ok(resp) => {
                *slot = Some(conn);
                Ok(resp)
            }
            Err(mut e) => {
                let Some(req) = e.take_message() else {
                    return Err(GatewayError::Http(e.into_error()));
                };
                tracing::debug!(error = %e.error(), "reused gateway connection was closed; redialing");
                let mut conn = self.client.dial(self.client.generation()).await?;
                let resp = conn.sender.send_request(req).await?;
                *slot = Some(conn);
                Ok(resp)
            }
        }
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.get_mut().take() {
            self.client.checkin(conn);
        }
    }
}
