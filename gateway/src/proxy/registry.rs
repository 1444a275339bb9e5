//! Open tunnels and agent connections, kept with the inputs they were decided on, so a
//! policy reload can re-check each one and close those the new policy denies.
//!
//! Requests on a keep-alive connection are each evaluated against the current policy,
//! so a connection only needs closing when its peer is no longer admitted at all (its
//! trust domain was removed). A tunnel was decided once, at CONNECT, so it is
//! re-evaluated as a whole: same peer, host, port and headers, same resolved address.
//!
//! Each entry also keeps the certificate chain its peer authenticated with, so open
//! connections and tunnels end with the identity that opened them: at the chain's
//! `notAfter`, and when a trust bundle change means the chain no longer verifies (see
//! [`super::peer_lifetime`]). A tunnel carries the credential of the connection it was
//! opened on.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use egress_policy::{Policy, RequestKind, SpiffeId};
use tokio_util::sync::CancellationToken;

use crate::identity::PeerCredential;

use super::address_guard;
use super::target::Target;
use super::PeerIdentity;

/// What a reload did to open tunnels and connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecheckOutcome {
    pub tunnels_checked: usize,
    pub tunnels_closed: usize,
    pub connections_closed: usize,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    tunnels: DashMap<u64, TunnelEntry>,
    connections: DashMap<u64, ConnectionEntry>,
    /// The credential of each open connection by peer address (unique while the
    /// connection is open), for the tunnels opened on it.
    credentials: DashMap<SocketAddr, (u64, PeerCredential)>,
    /// The gateway-wide `allow_cidrs`, added to every pathway's.
    global_allow: Vec<ipnet::IpNet>,
}

struct TunnelEntry {
    peer: PeerIdentity,
    target: Target,
    headers: egress_policy::HeaderView,
    /// The address an opaque tunnel was dialled to; `None` for an intercepted tunnel,
    /// whose requests each dial (and are checked) on their own.
    resolved: Option<IpAddr>,
    credential: Option<PeerCredential>,
    closer: Closer,
}

struct ConnectionEntry {
    peer: PeerIdentity,
    credential: Option<PeerCredential>,
    closer: Closer,
}

/// Why an open connection or tunnel was closed because of its peer's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerClosure {
    /// The chain's `notAfter` passed.
    Expired,
    /// After a trust bundle change, the chain no longer verifies.
    NoLongerTrusted,
}

impl PeerClosure {
    /// The metric label and audit code.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerClosure::Expired => "peer_certificate_expired",
            PeerClosure::NoLongerTrusted => "peer_no_longer_trusted",
        }
    }
}

/// One connection or tunnel closed for its peer's certificate.
#[derive(Debug, Clone)]
pub struct PeerClosed {
    /// `connection` or `tunnel`.
    pub kind: &'static str,
    pub reason: PeerClosure,
    /// The sentence the audit line and the log carry.
    pub message: String,
    pub peer: PeerIdentity,
    /// The tunnel's destination (`host:port`); `None` for a connection.
    pub destination: Option<String>,
}

/// A cancellation token with the reason it fired.
#[derive(Clone, Default)]
struct Closer {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Closer {
    fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    fn close(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.token.cancel();
    }

    async fn closed(&self) -> String {
        self.token.cancelled().await;
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "closed".into())
    }
}

/// Held by a tunnel for its lifetime; deregisters on drop.
pub struct TunnelHandle {
    id: u64,
    registry: Arc<Registry>,
    closer: Closer,
}

impl TunnelHandle {
    /// Resolves, with the reason, when a reload decides the tunnel must end.
    pub async fn closed(&self) -> String {
        self.closer.closed().await
    }
}

impl Drop for TunnelHandle {
    fn drop(&mut self) {
        self.registry.tunnels.remove(&self.id);
    }
}

/// Held by an agent connection for its lifetime; deregisters on drop.
pub struct ConnectionHandle {
    id: u64,
    registry: Arc<Registry>,
    closer: Closer,
}

impl ConnectionHandle {
    /// Resolves, with the reason, when a reload no longer admits the peer.
    pub async fn closed(&self) -> String {
        self.closer.closed().await
    }
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        if let Some((_, entry)) = self.registry.connections.remove(&self.id) {
            let id = self.id;
            self.registry
                .credentials
                .remove_if(&entry.peer.address, |_, (owner, _)| *owner == id);
        }
    }
}

impl Registry {
    /// A registry whose re-checks also honour the gateway-wide `allow_cidrs`.
    pub fn with_global_allow(global_allow: Vec<ipnet::IpNet>) -> Self {
        Registry {
            global_allow,
            ..Registry::default()
        }
    }

    pub fn register_tunnel(
        self: &Arc<Self>,
        peer: &PeerIdentity,
        target: &Target,
        headers: egress_policy::HeaderView,
        resolved: Option<IpAddr>,
    ) -> TunnelHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closer = Closer::default();
        // The connection the CONNECT arrived on is still open (its response is not
        // sent yet): the tunnel inherits its peer's credential.
        let credential = self
            .credentials
            .get(&peer.address)
            .map(|c| c.value().1.clone());
        self.tunnels.insert(
            id,
            TunnelEntry {
                peer: peer.clone(),
                target: target.clone(),
                headers,
                resolved,
                credential,
                closer: closer.clone(),
            },
        );
        TunnelHandle {
            id,
            registry: self.clone(),
            closer,
        }
    }

    /// Registers an agent connection with the chain its peer authenticated with.
    pub fn register_connection(
        self: &Arc<Self>,
        peer: &PeerIdentity,
        credential: Option<PeerCredential>,
    ) -> ConnectionHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closer = Closer::default();
        if let Some(c) = &credential {
            self.credentials.insert(peer.address, (id, c.clone()));
        }
        self.connections.insert(
            id,
            ConnectionEntry {
                peer: peer.clone(),
                credential,
                closer: closer.clone(),
            },
        );
        ConnectionHandle {
            id,
            registry: self.clone(),
            closer,
        }
    }

    pub fn open_tunnels(&self) -> usize {
        self.tunnels.len()
    }

    /// Re-checks everything open against `policy` and closes what it no longer allows.
    pub fn recheck(&self, policy: &Policy) -> RecheckOutcome {
        let mut out = RecheckOutcome::default();
        let admitted = |id: &SpiffeId| {
            policy
                .trust_domains()
                .iter()
                .any(|td| td == id.trust_domain())
        };
        for entry in self.connections.iter() {
            if !admitted(&entry.peer.spiffe_id) {
                entry.closer.close(format!(
                    "closed: trust domain {} no longer accepted by reloaded policy",
                    entry.peer.spiffe_id.trust_domain()
                ));
                out.connections_closed += 1;
            }
        }
        for entry in self.tunnels.iter() {
            out.tunnels_checked += 1;
            if let Some(why) = tunnel_denial(policy, &entry, &self.global_allow) {
                tracing::info!(
                    source = %entry.peer.spiffe_id,
                    destination = %entry.target,
                    reason = %why,
                    "closing tunnel denied by the reloaded policy"
                );
                entry
                    .closer
                    .close(format!("closed: denied by reloaded policy ({why})"));
                out.tunnels_closed += 1;
            }
        }
        out
    }
}

// === peer certificates ===

impl Registry {
    /// The earliest `notAfter` among open connections and tunnels not yet closed.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        let connections = self
            .connections
            .iter()
            .filter(|e| !e.closer.is_closed())
            .filter_map(|e| e.credential.as_ref().map(|c| c.not_after))
            .min();
        let tunnels = self
            .tunnels
            .iter()
            .filter(|e| !e.closer.is_closed())
            .filter_map(|e| e.credential.as_ref().map(|c| c.not_after))
            .min();
        connections.into_iter().chain(tunnels).min()
    }

    /// Closes every open connection and tunnel whose peer chain has expired at `now`.
    /// A connection finishes its in-flight request first (the listener shuts it down
    /// gracefully); a tunnel is closed.
    pub fn close_expired(&self, now: SystemTime) -> Vec<PeerClosed> {
        self.close_where(|c| {
            (c.not_after <= now).then(|| {
                (
                    PeerClosure::Expired,
                    format!(
                        "peer certificate expired at {}",
                        humantime::format_rfc3339_seconds(c.not_after)
                    ),
                )
            })
        })
    }

    /// Closes every open connection and tunnel for which `check` says why it must end
    /// (re-verification after a trust bundle change). `check` runs on a snapshot, with
    /// no lock held, so a slow check never holds up new connections.
    pub fn close_where(
        &self,
        check: impl Fn(&PeerCredential) -> Option<(PeerClosure, String)>,
    ) -> Vec<PeerClosed> {
        let open = |closer: &Closer, credential: &Option<PeerCredential>| {
            credential.clone().filter(|_| !closer.is_closed())
        };
        let connections: Vec<(u64, PeerCredential)> = self
            .connections
            .iter()
            .filter_map(|e| Some((*e.key(), open(&e.closer, &e.credential)?)))
            .collect();
        let tunnels: Vec<(u64, PeerCredential)> = self
            .tunnels
            .iter()
            .filter_map(|e| Some((*e.key(), open(&e.closer, &e.credential)?)))
            .collect();
        let mut out = Vec::new();
        for (id, credential) in connections {
            let Some((reason, message)) = check(&credential) else {
                continue;
            };
            if let Some(entry) = self.connections.get(&id) {
                entry.closer.close(format!("closed: {message}"));
                out.push(PeerClosed {
                    kind: "connection",
                    reason,
                    message,
                    peer: entry.peer.clone(),
                    destination: None,
                });
            }
        }
        for (id, credential) in tunnels {
            let Some((reason, message)) = check(&credential) else {
                continue;
            };
            if let Some(entry) = self.tunnels.get(&id) {
                entry.closer.close(format!("closed: {message}"));
                out.push(PeerClosed {
                    kind: "tunnel",
                    reason,
                    message,
                    peer: entry.peer.clone(),
                    destination: Some(entry.target.to_string()),
                });
            }
        }
        out
    }
}

/// Why `policy` would not open this tunnel now, if it would not.
fn tunnel_denial(
    policy: &Policy,
    t: &TunnelEntry,
    global_allow: &[ipnet::IpNet],
) -> Option<String> {
    let host = t.target.host.as_policy_str();
    let request = egress_policy::Request {
        source: &t.peer.spiffe_id,
        source_address: Some(t.peer.address),
        kind: RequestKind::Connect,
        method: "CONNECT",
        host: &host,
        port: t.target.port,
        path: "",
        query: "",
        headers: &t.headers,
        llm_model: None,
        now: SystemTime::now(),
    };
    let decision = policy.evaluate(&request);
    if !decision.permits() {
        return Some(decision.reason.to_string());
    }
    let resolved = t.resolved?;
    let allow = super::allowed_ranges(&decision, global_allow);
    address_guard::check(resolved, &allow).err().map(|range| {
        format!(
            "destination address not allowed: {resolved} is {}",
            range.name
        )
    })
}

/// Put in each request's extensions by the listener: a share of the connection's slots
/// (global and per-agent). A tunnel keeps it until it ends, so tunnels count against
/// the connection caps after the HTTP connection has upgraded.
#[derive(Clone)]
pub struct ConnectionHold(pub Arc<dyn std::any::Any + Send + Sync>);
