//! What `/readyz` reports: ready only with a valid SVID and a loaded policy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::identity::IdentitySource;
use crate::policy_store::PolicyStore;

#[derive(Default)]
pub struct Health {
    identity: OnceLock<IdentitySource>,
    policy: OnceLock<PolicyStore>,
    draining: AtomicBool,
    /// The sidecar has no policy; its readiness is the SVID alone.
    policy_optional: bool,
}

impl Health {
    /// Readiness without a policy: for `egress-gateway sidecar`.
    pub fn without_policy() -> Self {
        Health {
            policy_optional: true,
            ..Health::default()
        }
    }

    pub fn set_identity(&self, identity: IdentitySource) {
        let _ = self.identity.set(identity);
    }

    pub fn set_policy(&self, policy: PolicyStore) {
        let _ = self.policy.set(policy);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// When the current SVID expires, once there is one.
    pub fn svid_expiry(&self) -> Option<std::time::SystemTime> {
        self.identity.get()?.current().map(|m| m.not_after)
    }

    /// `None` when ready; otherwise why not, in words an operator can act on.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("shutting down".into());
        }
        if !self.policy_optional && self.policy.get().is_none() {
            return Some("no policy loaded".into());
        }
        let Some(identity) = self.identity.get() else {
            return Some("waiting for the first X.509-SVID from the Workload API".into());
        };
        match identity.current() {
            None => Some("no X.509-SVID".into()),
            Some(_) if !identity.is_ready() => Some(format!(
                "the X.509-SVID is expired or not yet valid; is the Workload API at {} reachable?",
                identity.endpoint()
            )),
            Some(_) => None,
        }
    }
}
