//! Open connections and tunnels end with the identity that opened them.
//!
//! The handshake checks a client's chain once; a keep-alive connection or a tunnel can
//! then stay open for hours. This task closes, through the [`Registry`],
//!
//! - every connection and tunnel whose peer chain reaches its `notAfter` (a connection
//!   after its in-flight request, through hyper's graceful shutdown; a tunnel at once);
//! - after every Workload API update (SVID rotation or trust bundle change), every one
//!   whose chain no longer verifies against the current bundles (a CA dropped from the
//!   bundle, a trust domain's bundle removed).
//!
//! Each closure is counted in `egress_connections_closed_total{kind, reason}` and logged
//! with the peer's SPIFFE ID. A connection's closure gets its own audit line (`kind:
//! "connection"`); a tunnel's is its own audit line, written when it ends, with the
//! reason in `error`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::audit::{now_rfc3339, AuditLog, AuditRecord};
use crate::identity::{IdentitySource, PeerCredential};
use crate::metrics::{ClosedLabels, Metrics};

use super::registry::{PeerClosed, PeerClosure, Registry};

/// The longest the task sleeps between expiry checks: a connection opened after it
/// went to sleep is closed at most this late.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Starts the task; it ends with `stop`.
pub fn enforce(
    registry: Arc<Registry>,
    identity: IdentitySource,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut updates = identity.subscribe();
    tokio::spawn(async move {
        let mut watching = true;
        loop {
            let wait = registry
                .earliest_expiry()
                .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
                .map_or(MAX_WAIT, |d| d.min(MAX_WAIT));
            let closed = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => registry.close_expired(SystemTime::now()),
                changed = updates.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    // Signature checks for every open connection: off the workers.
                    let (registry, identity) = (registry.clone(), identity.clone());
                    tokio::task::spawn_blocking(move || {
                        registry.close_where(|c| still_trusted(c, &identity))
                    })
                    .await
                    .unwrap_or_default()
                }
            };
            for c in closed {
                report(&c, &audit, &metrics);
            }
        }
    });
}

/// `None` when the chain still verifies against the current bundles; otherwise why not.
fn still_trusted(
    credential: &PeerCredential,
    identity: &IdentitySource,
) -> Option<(PeerClosure, String)> {
    use rustls::{CertificateError, Error};
    match credential.verify(identity) {
        Ok(()) => None,
        Err(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => Some((
            PeerClosure::Expired,
            format!(
                "peer certificate expired at {}",
                humantime::format_rfc3339_seconds(credential.not_after)
            ),
        )),
        Err(e) => Some((
            PeerClosure::NoLongerTrusted,
            format!("peer certificate no longer verifies against the current trust bundle ({e})"),
        )),
    }
}

fn report(c: &PeerClosed, audit: &AuditLog, metrics: &Metrics) {
    metrics
        .connections_closed
        .get_or_create(&ClosedLabels {
            kind: c.kind,
            reason: c.reason.as_str(),
        })
        .inc();
    tracing::warn!(
        kind = c.kind,
        source = %c.peer.spiffe_id,
        peer = %c.peer.address,
        destination = c.destination.as_deref().unwrap_or(""),
        reason = c.reason.as_str(),
        "closing: {}",
        c.message
    );
    if c.kind == "connection" {
        audit.record(closure_record(c));
    }
}

/// The audit line for a keep-alive connection the gateway closed.
fn closure_record(c: &PeerClosed) -> AuditRecord {
    AuditRecord {
        ts: now_rfc3339(),
        source_spiffe_id: c.peer.spiffe_id.to_string(),
        source_address: c.peer.address.to_string(),
        kind: "connection",
        decision: "deny",
        enforced: true,
        reason: format!(
            "{}: {}; connection closed after its in-flight request",
            c.reason.as_str(),
            c.message
        ),
        ..Default::default()
    }
}
