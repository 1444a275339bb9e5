//! Reading the files a policy points at (`secret_file`, `ca_file`, the policy itself)
//! without ever stalling the async runtime.
//!
//! An operator's mistake, or an attacker with write access to a mounted volume, can put
//! something other than a small regular file where a policy expects one: a FIFO (whose
//! `open` blocks until a writer appears), `/dev/zero` (which never ends), a directory, a
//! huge file, a file on a hung network mount. Every read here therefore
//!
//! - refuses anything that is not a regular file, judged from `stat` *before* opening
//!   (a FIFO blocks in `open`, so checking the opened handle would be too late), and
//!   again on the opened handle (the path may have been swapped in between);
//! - reads at most the kind's cap plus one byte, so an oversized file is an error, not
//!   an allocation;
//! - runs on a blocking thread ([`tokio::task::spawn_blocking`]) under a timeout, so a
//!   read that hangs anyway leaves that one thread stuck, never the runtime, the caller
//!   or the signal handlers. Errors always name the file.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a read of a policy-referenced file may take before it is given up.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a file is for: its name in messages and its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A credential for `inject_headers` (`secret_file`): 64 KiB.
    Secret,
    /// PEM trust anchors (`upstream.ca_file`): 1 MiB.
    CaBundle,
    /// The policy file itself: 16 MiB.
    Policy,
    /// The interception CA's certificate or key (`interception.ca_cert`/`ca_key`): 1 MiB.
    InterceptionCa,
}

impl FileKind {
    /// The most bytes a file of this kind may hold.
    pub fn cap(self) -> u64 {
        match self {
            FileKind::Secret => 64 * 1024,
            FileKind::CaBundle | FileKind::InterceptionCa => 1024 * 1024,
            FileKind::Policy => 16 * 1024 * 1024,
        }
    }

    /// The name the policy gives it, for messages.
    pub fn what(self) -> &'static str {
        match self {
            FileKind::Secret => "secret file",
            FileKind::CaBundle => "ca_file",
            FileKind::Policy => "policy file",
            FileKind::InterceptionCa => "interception CA file",
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{kind} {}: cannot read: {source}", path.display())]
    Io {
        kind: FileKind,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{kind} {} is a {found}, not a regular file; refusing to read it", path.display())]
    NotRegular {
        kind: FileKind,
        path: PathBuf,
        found: &'static str,
    },
    #[error("{kind} {} is larger than the {cap}-byte limit", path.display())]
    TooLarge {
        kind: FileKind,
        path: PathBuf,
        cap: u64,
    },
    #[error("{kind} {}: no answer within {timeout:?} reading it (a hung mount?)", path.display())]
    Timeout {
        kind: FileKind,
        path: PathBuf,
        timeout: Duration,
    },
}

impl FileError {
    pub fn path(&self) -> &Path {
        match self {
            FileError::Io { path, .. }
            | FileError::NotRegular { path, .. }
            | FileError::TooLarge { path, .. }
            | FileError::Timeout { path, .. } => path,
        }
    }
}

fn file_type_name(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Reads `path` on the calling thread: for code that already runs on a blocking thread
/// (the CLI, `spawn_blocking`). Never call it on an async worker thread; use
/// [`read_file`] there.
pub fn read_file_blocking(path: &Path, kind: FileKind) -> Result<Vec<u8>, FileError> {
    let io = |source| FileError::Io {
        kind,
        path: path.to_owned(),
        source,
    };
    let not_regular = |t: &std::fs::FileType| FileError::NotRegular {
        kind,
        path: path.to_owned(),
        found: file_type_name(t),
    };
    // `metadata` follows symlinks (Kubernetes volumes are symlinks to regular files).
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(not_regular(&meta.file_type()));
    }
    let cap = kind.cap();
    let too_large = || FileError::TooLarge {
        kind,
        path: path.to_owned(),
        cap,
    };
    if meta.len() > cap {
        return Err(too_large());
    }
    let file = std::fs::File::open(path).map_err(io)?;
    // The path may have been replaced between `stat` and `open`.
    let opened = file.metadata().map_err(io)?;
    if !opened.file_type().is_file() {
        return Err(not_regular(&opened.file_type()));
    }
    let mut out = Vec::with_capacity(opened.len().min(cap) as usize);
    file.take(cap + 1).read_to_end(&mut out).map_err(io)?;
    if out.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(out)
}

/// Reads `path` off the runtime, bounded in size and in time. If the read hangs (a
/// hung mount), the blocking thread may stay stuck, but this returns after `timeout`.
pub async fn read_file(
    path: &Path,
    kind: FileKind,
    timeout: Duration,
) -> Result<Vec<u8>, FileError> {
    let owned = path.to_owned();
    let task = tokio::task::spawn_blocking(move || read_file_blocking(&owned, kind));
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(FileError::Io {
            kind,
            path: path.to_owned(),
            source: std::io::Error::other(format!("reader thread failed: {join}")),
        }),
        Err(_) => Err(FileError::Timeout {
            kind,
            path: path.to_owned(),
            timeout,
        }),
    }
}

/// What identifies one version of a file without reading it: a Kubernetes Secret
/// update swaps the `..data` symlink, which changes the inode `metadata` (following
/// links) sees, even when size and time happen to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        }
    }
}

/// `stat` alone (never blocks on a FIFO): what identifies a version of a file, and
/// whether it is a regular file at all.
pub async fn metadata(path: &Path, timeout: Duration) -> std::io::Result<std::fs::Metadata> {
    let owned = path.to_owned();
    let task = tokio::task::spawn_blocking(move || std::fs::metadata(owned));
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(std::io::Error::other(format!("stat thread failed: {join}"))),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo");
        assert!(status.success());
    }

    #[tokio::test]
    async fn regular_files_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "sk-1\n").unwrap();
        let got = read_file(&p, FileKind::Secret, READ_TIMEOUT).await.unwrap();
        assert_eq!(got, b"sk-1\n");
        // A symlink to a regular file (how Kubernetes mounts Secrets) is fine.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(
            read_file_blocking(&link, FileKind::Secret).unwrap(),
            b"sk-1\n"
        );
    }

    #[tokio::test]
    async fn fifos_devices_and_directories_are_refused_without_opening() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        // Opening a FIFO with no writer would block forever; this must return at once.
        let started = std::time::Instant::now();
        let e = read_file(&fifo, FileKind::Secret, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = e.to_string();
        assert!(
            msg.contains("FIFO") && msg.contains(&fifo.display().to_string()),
            "{msg}"
        );

        let e = read_file_blocking(Path::new("/dev/zero"), FileKind::Secret).unwrap_err();
        assert!(
            e.to_string().contains("/dev/zero is a character device"),
            "{e}"
        );
        let e = read_file_blocking(dir.path(), FileKind::CaBundle).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn oversized_files_are_refused_naming_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'a'; 64 * 1024 + 1]).unwrap();
        let e = read_file_blocking(&p, FileKind::Secret).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("65536-byte limit") && msg.contains("big"),
            "{msg}"
        );
        std::fs::write(&p, vec![b'a'; 64 * 1024]).unwrap();
        assert_eq!(
            read_file_blocking(&p, FileKind::Secret).unwrap().len(),
            64 * 1024
        );
        assert!(read_file_blocking(&p, FileKind::CaBundle).is_ok());
    }

    #[tokio::test]
    async fn missing_files_name_the_path() {
        let e = read_file(
            Path::new("/nonexistent/x"),
            FileKind::CaBundle,
            READ_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("ca_file /nonexistent/x: cannot read"),
            "{e}"
        );
    }
}
