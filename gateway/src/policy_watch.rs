//! Reloads the policy when its file changes, and re-checks what is open after a swap.
//!
//! The watcher watches the file's directory, not the file: editors replace files by
//! rename and Kubernetes swaps a ConfigMap volume by re-pointing the `..data` symlink,
//! and neither is an event on the old inode. Events are debounced, and the store
//! reloads only when the text differs from the last text it tried.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::policy_store::PolicyStore;
use crate::proxy::registry::Registry;

/// Quiet time after the last event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Reload at the latest this long after the first event, even if events keep coming.
const MAX_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {dir} for policy changes: {source}")]
pub struct WatchError {
    dir: PathBuf,
    source: notify::Error,
}

/// Watches the policy file; calls `reload` (debounced) after it changes, until `stop`.
pub fn watch_file<F, Fut>(path: &Path, reload: F, stop: CancellationToken) -> Result<(), WatchError>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (dirs, names) = watched(path);
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let names_cb = names.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| names_cb.contains(n) || n.as_encoded_bytes().starts_with(b".."))
        });
        if relevant {
            // A full channel already holds a pending change; this one coalesces into it.
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| WatchError {
        dir: path.to_path_buf(),
        source,
    })?;
    for dir in &dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError {
                dir: dir.clone(),
                source,
            })?;
    }
    tracing::info!(dirs = ?dirs, "watching the policy file for changes");
    tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            let deadline = tokio::time::Instant::now() + MAX_DELAY;
            loop {
                let quiet = tokio::time::sleep(DEBOUNCE);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = quiet => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                    got = rx.recv() => if got.is_none() { break },
                }
            }
            // Reloads read files off the runtime, bounded in time (`crate::files`).
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = reload() => {}
            }
        }
    });
    Ok(())
}

/// Directories to watch and file names that matter: the path as given and, when it is
/// a symlink, its target.
fn watched(path: &Path) -> (Vec<PathBuf>, HashSet<OsString>) {
    let mut dirs = Vec::new();
    let mut names = HashSet::new();
    let canonical = std::fs::canonicalize(path).ok();
    for p in std::iter::once(path.to_path_buf()).chain(canonical) {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
        if let Some(n) = p.file_name() {
            names.insert(n.to_os_string());
        }
    }
    (dirs, names)
}

/// After every policy swap, re-checks open tunnels and connections and closes those
/// the new policy denies.
pub fn recheck_on_swap(store: PolicyStore, registry: Arc<Registry>, stop: CancellationToken) {
    let mut swaps = store.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = swaps.changed() => if changed.is_err() { return },
            }
            let outcome = registry.recheck(&store.current());
            tracing::info!(
                tunnels_checked = outcome.tunnels_checked,
                tunnels_closed = outcome.tunnels_closed,
                connections_closed = outcome.connections_closed,
                "re-checked open tunnels and connections against the reloaded policy"
            );
        }
    });
}
