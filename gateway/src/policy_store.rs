//! The policy in force: loaded from a file, swapped atomically on reload.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use egress_policy::{Policy, PolicyError};
use tokio::sync::watch;

use crate::identity::AcceptedTrustDomains;

#[derive(Clone)]
pub struct PolicyStore {
    path: PathBuf,
    current: Arc<ArcSwap<Policy>>,
    accepted_trust_domains: AcceptedTrustDomains,
    /// Hash of the file text last tried (valid or not), so the file watcher reloads, and
    /// reports an invalid file, once per change rather than once per event.
    last_text: Arc<Mutex<u64>>,
    /// Bumped after each swap; open tunnels and connections are re-checked on it.
    generation: Arc<watch::Sender<u64>>,
    /// Run on every compiled policy before it is put in force.
    check: Option<LoadCheck>,
}

/// A gateway-side check of a compiled policy (e.g. that every `secret_file` is
/// readable); an error rejects the load or reload like a parse error would.
pub type LoadCheck = Arc<dyn Fn(&Policy) -> Result<(), PolicyError> + Send + Sync>;

fn text_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl PolicyStore {
    /// Loads the policy; an invalid file is an error, never a half-loaded policy.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_checked(path, None)
    }

    /// Like [`load`](Self::load), with `check` run on this and every reloaded policy.
    pub fn load_checked(path: &Path, check: Option<LoadCheck>) -> Result<Self, PolicyError> {
        let text = read(path)?;
        let policy = Policy::from_yaml_str(&text, &path.display().to_string())?;
        if let Some(check) = &check {
            check(&policy)?;
        }
        let tds = policy.trust_domains().to_vec();
        Ok(PolicyStore {
            path: path.to_path_buf(),
            current: Arc::new(ArcSwap::from_pointee(policy)),
            accepted_trust_domains: Arc::new(ArcSwap::from_pointee(tds)),
            last_text: Arc::new(Mutex::new(text_hash(&text))),
            generation: Arc::new(watch::channel(0).0),
            check,
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

    /// Changes after every successful swap (the value counts swaps).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the file; on success the new policy replaces the old one in one step.
    /// The file is read once and compiled completely before anything is swapped, so no
    /// decision ever sees a partly loaded policy.
    pub fn reload(&self) -> Result<Arc<Policy>, PolicyError> {
        let text = read(&self.path)?;
        self.apply(&text)
    }

    /// Like [`reload`](Self::reload), but `None` when the file's text is the one last
    /// tried (editors and ConfigMap updates fire several events per change).
    pub fn reload_if_changed(&self) -> Option<Result<Arc<Policy>, PolicyError>> {
        let text = match read(&self.path) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let hash = text_hash(&text);
        if let Ok(last) = self.last_text.lock() {
            if *last == hash {
                return None;
            }
        }
        Some(self.apply(&text))
    }

    fn apply(&self, text: &str) -> Result<Arc<Policy>, PolicyError> {
        if let Ok(mut last) = self.last_text.lock() {
            *last = text_hash(text);
        }
        let policy = Arc::new(Policy::from_yaml_str(
            text,
            &self.path.display().to_string(),
        )?);
        if let Some(check) = &self.check {
            check(&policy)?;
        }
        self.accepted_trust_domains
            .store(Arc::new(policy.trust_domains().to_vec()));
        self.current.store(policy.clone());
        self.generation.send_modify(|g| *g += 1);
        Ok(policy)
    }
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })
}
