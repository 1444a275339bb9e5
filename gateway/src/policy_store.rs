//! The policy in force: loaded from a file, swapped atomically on reload.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use egress_policy::{Policy, PolicyError};
use tokio::sync::watch;

use crate::files::{self, FileKind};
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
    /// One load at a time: two reloads (SIGHUP and the file watcher) never interleave
    /// their read, check and swap.
    reloading: Arc<tokio::sync::Mutex<()>>,
}

/// A gateway-side check of a compiled policy (e.g. that every `secret_file` is
/// readable); an error rejects the load or reload like a parse error would. It is
/// async so the files it reads are read off the runtime, bounded in time.
pub type LoadCheck = Arc<
    dyn Fn(Arc<Policy>) -> Pin<Box<dyn Future<Output = Result<(), PolicyError>> + Send>>
        + Send
        + Sync,
>;

fn text_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl PolicyStore {
    /// Loads the policy; an invalid file is an error, never a half-loaded policy.
    pub async fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_checked(path, None).await
    }

    /// Like [`load`](Self::load), with `check` run on this and every reloaded policy.
    ///
    /// Reading, compiling and checking all happen off the runtime's worker threads
    /// (see [`crate::files`]), so a policy that points at a FIFO or `/dev/zero` is an
    /// error naming the file, not a stalled gateway.
    pub async fn load_checked(path: &Path, check: Option<LoadCheck>) -> Result<Self, PolicyError> {
        let text = read(path).await?;
        let policy = compile(&text, path).await?;
        if let Some(check) = &check {
            check(policy.clone()).await?;
        }
        let tds = policy.trust_domains().to_vec();
        Ok(PolicyStore {
            path: path.to_path_buf(),
            current: Arc::new(ArcSwap::new(policy)),
            accepted_trust_domains: Arc::new(ArcSwap::from_pointee(tds)),
            last_text: Arc::new(Mutex::new(text_hash(&text))),
            generation: Arc::new(watch::channel(0).0),
            check,
            reloading: Arc::default(),
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
    pub async fn reload(&self) -> Result<Arc<Policy>, PolicyError> {
        let _one_at_a_time = self.reloading.lock().await;
        let text = read(&self.path).await?;
        self.apply(&text).await
    }

    /// Like [`reload`](Self::reload), but `None` when the file's text is the one last
    /// tried (editors and ConfigMap updates fire several events per change).
    pub async fn reload_if_changed(&self) -> Option<Result<Arc<Policy>, PolicyError>> {
        let _one_at_a_time = self.reloading.lock().await;
        let text = match read(&self.path).await {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let hash = text_hash(&text);
        if let Ok(last) = self.last_text.lock() {
            if *last == hash {
                return None;
            }
        }
        Some(self.apply(&text).await)
    }

    async fn apply(&self, text: &str) -> Result<Arc<Policy>, PolicyError> {
        if let Ok(mut last) = self.last_text.lock() {
            *last = text_hash(text);
        }
        let policy = compile(text, &self.path).await?;
        if let Some(check) = &self.check {
            check(policy.clone()).await?;
        }
        self.accepted_trust_domains
            .store(Arc::new(policy.trust_domains().to_vec()));
        self.current.store(policy.clone());
        self.generation.send_modify(|g| *g += 1);
        Ok(policy)
    }
}

/// The policy file's text, read off the runtime, bounded in size and time.
async fn read(path: &Path) -> Result<String, PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = files::read_file(path, FileKind::Policy, files::READ_TIMEOUT)
        .await
        .map_err(|e| match e {
            files::FileError::Io { source, .. } => io(source),
            other => io(std::io::Error::other(other.to_string())),
        })?;
    String::from_utf8(bytes)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Compiles on a blocking thread: CEL and regex compilation is CPU work that a large
/// policy makes long enough to matter to the proxy's worker threads.
async fn compile(text: &str, path: &Path) -> Result<Arc<Policy>, PolicyError> {
    let (text, origin) = (text.to_owned(), path.display().to_string());
    tokio::task::spawn_blocking(move || Policy::from_yaml_str(&text, &origin).map(Arc::new))
        .await
        .map_err(|e| PolicyError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(format!("policy compilation failed: {e}")),
        })?
}
