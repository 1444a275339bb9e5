//! Credentials for `inject_headers`, read from files (Kubernetes Secret volumes) and
//! re-read when the file changes. Values live in `SecretString` and reach nothing but
//! the upstream request: never logs, spans, audit lines, metrics or error bodies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use egress_policy::dlp::Literals;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

use crate::files::{self, FileError, FileKind};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Missing, not a regular file, over the size cap, or a read that timed out.
    #[error(transparent)]
    File(#[from] FileError),
    #[error("secret file {} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("secret file {} holds bytes not allowed in an HTTP header value", path.display())]
    NotHeaderSafe { path: PathBuf },
}

use crate::files::FileStamp as Stamp;

/// `stat` off the runtime (it never blocks on a FIFO, but a hung mount can stall it).
async fn stamp(path: &Path) -> Result<Stamp, SecretError> {
    let m = files::metadata(path, files::READ_TIMEOUT)
        .await
        .map_err(|source| FileError::Io {
            kind: FileKind::Secret,
            path: path.to_owned(),
            source,
        })?;
    Ok(Stamp::of(&m))
}

struct Loaded {
    stamp: Stamp,
    value: SecretString,
}

/// Secret files by path, each read once per change.
#[derive(Clone)]
pub struct Secrets {
    files: Arc<DashMap<PathBuf, Arc<ArcSwap<Loaded>>>>,
    /// Bumped whenever a value is stored, so [`Secrets::literals`] knows to rebuild.
    generation: Arc<AtomicU64>,
    /// The values as DLP literals, and the generation they were built at.
    literals: Arc<ArcSwap<(u64, Arc<Literals>)>>,
}

impl Default for Secrets {
    fn default() -> Self {
        Secrets {
            files: Arc::default(),
            generation: Arc::default(),
            literals: Arc::new(ArcSwap::from_pointee((0, Arc::new(Literals::empty())))),
        }
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

/// The credential in a secret file's bytes: one line, trailing newline dropped, and
/// nothing an HTTP header value may not hold. Errors name the file, never the value.
pub fn parse_secret(path: &Path, bytes: Vec<u8>) -> Result<SecretString, SecretError> {
    let not_header_safe = || SecretError::NotHeaderSafe {
        path: path.to_owned(),
    };
    let text = String::from_utf8(bytes).map_err(|_| not_header_safe())?;
    // Secret files usually end with a newline that is not part of the key.
    let value = text.trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_owned(),
        });
    }
    if HeaderValue::from_str(value).is_err() {
        return Err(not_header_safe());
    }
    Ok(SecretString::from(value.to_string()))
}

/// Reads a secret file off the runtime, bounded in size and time (see [`crate::files`]).
async fn read_secret(path: &Path) -> Result<(Stamp, SecretString), SecretError> {
    let st = stamp(path).await?;
    let bytes = files::read_file(path, FileKind::Secret, files::READ_TIMEOUT).await?;
    Ok((st, parse_secret(path, bytes)?))
}

impl Secrets {
    /// Reads (or re-reads, if it changed) `path`; an error names the file.
    pub async fn load(&self, path: &Path) -> Result<(), SecretError> {
        let (stamp, value) = read_secret(path).await?;
        let loaded = Arc::new(Loaded { stamp, value });
        match self.files.get(path) {
            Some(slot) => slot.store(loaded),
            None => {
                self.files
                    .insert(path.to_owned(), Arc::new(ArcSwap::new(loaded)));
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Every credential the gateway holds, for DLP's `secret_file` detector: an agent
    /// must never send one of them out. Rebuilt only after a value changed.
    pub fn literals(&self) -> Arc<Literals> {
        let generation = self.generation.load(Ordering::Acquire);
        let cached = self.literals.load();
        if cached.0 == generation {
            return cached.1.clone();
        }
        let values: Vec<Vec<u8>> = self
            .files
            .iter()
            .map(|slot| slot.load().value.expose_secret().as_bytes().to_vec())
            .collect();
        let built = Arc::new(Literals::new(values));
        self.literals.store(Arc::new((generation, built.clone())));
        built
    }

    /// The header value `prefix + secret`, marked sensitive (hyper's HPACK and debug
    /// output skip it). A file that changed since the last read is read again; if the
    /// new version cannot be read (a Secret update in progress), the last good value
    /// is used and the problem logged without the value.
    pub async fn header_value(
        &self,
        path: &Path,
        prefix: &str,
    ) -> Result<HeaderValue, SecretError> {
        let slot = self.files.get(path).map(|s| s.clone());
        let slot = match slot {
            Some(s) => s,
            None => {
                // Not seen at load (e.g. a policy reloaded by another path): read it now.
                self.load(path).await?;
                self.files
                    .get(path)
                    .map(|s| s.clone())
                    .ok_or_else(|| FileError::Io {
                        kind: FileKind::Secret,
                        path: path.to_owned(),
                        source: std::io::Error::other("secret not loaded"),
                    })?
            }
        };
        let current = slot.load_full();
        let current = match stamp(path).await {
            Ok(now) if now != current.stamp => match read_secret(path).await {
                Ok((stamp, value)) => {
                    tracing::info!(file = %path.display(), "secret file changed; using the new value");
                    let fresh = Arc::new(Loaded { stamp, value });
                    slot.store(fresh.clone());
                    self.generation.fetch_add(1, Ordering::Release);
                    fresh
                }
                Err(e) => {
                    tracing::warn!(error = %e, "secret file changed but cannot be read; keeping the previous value");
                    current
                }
            },
            Ok(_) => current,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "secret file not readable; keeping the previous value");
                current
            }
        };
        let mut value = String::with_capacity(prefix.len() + current.value.expose_secret().len());
        value.push_str(prefix);
        value.push_str(current.value.expose_secret());
        let mut hv = HeaderValue::from_str(&value).map_err(|_| SecretError::NotHeaderSafe {
            path: path.to_owned(),
        })?;
        hv.set_sensitive(true);
        Ok(hv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_trims_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "sk-one\n").unwrap();
        let s = Secrets::default();
        s.load(&path).await.unwrap();
        let v = s.header_value(&path, "Bearer ").await.unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer sk-one");
        assert!(v.is_sensitive());
        // A different length guarantees a different stamp even within one mtime tick.
        std::fs::write(&path, "sk-second\n").unwrap();
        let v = s.header_value(&path, "Bearer ").await.unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer sk-second");
        // A vanished file keeps the last good value rather than dropping the credential.
        std::fs::remove_file(&path).unwrap();
        let v = s.header_value(&path, "").await.unwrap();
        assert_eq!(v.to_str().unwrap(), "sk-second");
    }

    #[tokio::test]
    async fn errors_name_the_file_and_never_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let s = Secrets::default();
        let missing = dir.path().join("missing");
        let e = s.load(&missing).await.unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(s
            .load(&empty)
            .await
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "sk-\u{7}secret").unwrap();
        let e = s.load(&bad).await.unwrap_err().to_string();
        assert!(!e.contains("sk-"), "{e}");
        assert!(!format!("{s:?}").contains("sk-"));
    }

    #[tokio::test]
    async fn a_secret_replaced_by_a_fifo_keeps_the_last_value_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "sk-one\n").unwrap();
        let s = Secrets::default();
        s.load(&path).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let v = tokio::time::timeout(std::time::Duration::from_secs(5), s.header_value(&path, ""))
            .await
            .expect("no hang on a FIFO")
            .unwrap();
        assert_eq!(v.to_str().unwrap(), "sk-one");
        let e = s.load(&path).await.unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
    }
}
