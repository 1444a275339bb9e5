//! Open tunnels and agent connections, kept with the inputs they were decided on, so a
//! policy reload can re-check each one and close those the new policy denies.
//!
//! Requests on a keep-alive connection are each evaluated against the current policy,
//! so a connection only needs closing when its peer is no longer admitted at all (its
//! trust domain was removed). A tunnel was decided once, at CONNECT, so it is
//! re-evaluated as a whole: same peer, host, port and headers, same resolved address.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use egress_policy::{Policy, RequestKind, SpiffeId};
use tokio_util::sync::CancellationToken;

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
    /// The gateway-wide `allow_cidrs`, added to every pathway's.
    global_allow: Vec<ipnet::IpNet>,
}

struct TunnelEntry {
    peer: PeerIdentity,
    target: Target,
    headers: Vec<(String, String)>,
    resolved: IpAddr,
    closer: Closer,
}

struct ConnectionEntry {
    spiffe_id: SpiffeId,
    closer: Closer,
}

/// A cancellation token with the reason it fired.
#[derive(Clone, Default)]
struct Closer {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Closer {
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
        self.registry.connections.remove(&self.id);
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
        headers: Vec<(String, String)>,
        resolved: IpAddr,
    ) -> TunnelHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closer = Closer::default();
        self.tunnels.insert(
            id,
            TunnelEntry {
                peer: peer.clone(),
                target: target.clone(),
                headers,
                resolved,
                closer: closer.clone(),
            },
        );
        TunnelHandle {
            id,
            registry: self.clone(),
            closer,
        }
    }

    pub fn register_connection(self: &Arc<Self>, spiffe_id: &SpiffeId) -> ConnectionHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closer = Closer::default();
        self.connections.insert(
            id,
            ConnectionEntry {
                spiffe_id: spiffe_id.clone(),
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
            if !admitted(&entry.spiffe_id) {
                entry.closer.close(format!(
                    "closed: trust domain {} no longer accepted by reloaded policy",
                    entry.spiffe_id.trust_domain()
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
    let allow = super::allowed_ranges(&decision, global_allow);
    address_guard::check(t.resolved, &allow).err().map(|range| {
        format!(
            "destination address not allowed: {} is {}",
            t.resolved, range.name
        )
    })
}

/// Put in each request's extensions by the listener: a share of the connection's slots
/// (global and per-agent). A tunnel keeps it until it ends, so tunnels count against
/// the connection caps after the HTTP connection has upgraded.
#[derive(Clone)]
pub struct ConnectionHold(pub Arc<dyn std::any::Any + Send + Sync>);
