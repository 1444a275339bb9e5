//! The policy in force: loaded from a file, swapped atomically on reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use egress_policy::{Policy, PolicyError};

use crate::identity::AcceptedTrustDomains;

#[derive(Clone)]
pub struct PolicyStore {
    path: PathBuf,
    current: Arc<ArcSwap<Policy>>,
    accepted_trust_domains: AcceptedTrustDomains,
}

impl PolicyStore {
    /// Loads the policy; an invalid file is an error, never a half-loaded policy.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let policy = Policy::load_file(path)?;
        let tds = policy.trust_domains().to_vec();
        Ok(PolicyStore {
            path: path.to_path_buf(),
            current: Arc::new(ArcSwap::from_pointee(policy)),
            accepted_trust_domains: Arc::new(ArcSwap::from_pointee(tds)),
        })
    }

    /// The policy as of now; callers evaluate one request against one snapshot.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Trust domains the mTLS listener accepts, kept in step with the policy.
    pub fn accepted_trust_domains(&self) -> AcceptedTrustDomains {
        self.accepted_trust_domains.clone()
    }

    /// Re-reads the file; on success the new policy replaces the old one in one step.
    pub fn reload(&self) -> Result<Arc<Policy>, PolicyError> {
        let policy = Arc::new(Policy::load_file(&self.path)?);
        self.accepted_trust_domains
            .store(Arc::new(policy.trust_domains().to_vec()));
        self.current.store(policy.clone());
        Ok(policy)
    }
}
