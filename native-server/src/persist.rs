//! Persistence of the last good snapshot: atomic writes (temp file + rename), coalesced.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rollgate_proxy_core::metrics::PersistReport;
use rollgate_proxy_core::snapshot::Revision;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A snapshot to write: its revision and persisted bytes.
type Pending = Option<(Revision, Bytes)>;

/// Sends snapshots to the writer task; only the newest pending write matters.
#[derive(Debug, Clone)]
pub struct Persister {
    pending: watch::Sender<Pending>,
    written: Arc<Written>,
}

/// What the writer did, for `/api/metrics`.
#[derive(Debug, Default)]
pub struct Written {
    revision: AtomicU64,
    failures: AtomicU64,
}

impl Written {
    /// The file held snapshot `revision` at start.
    pub fn restored(&self, revision: Revision) {
        self.revision.store(revision.get(), Ordering::Relaxed);
    }

    /// The revision last written (or loaded at start) and the failed writes, since start.
    pub fn report(&self) -> PersistReport {
        PersistReport {
            revision: self.revision.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

impl Persister {
    /// Starts the writer for `path`. It writes each new value, and the last pending one when
    /// `shutdown` fires, then ends.
    pub fn start(path: PathBuf, shutdown: CancellationToken) -> (Self, JoinHandle<()>) {
        let (pending, mut rx) = watch::channel::<Pending>(None);
        let written = Arc::new(Written::default());
        let counts = Arc::clone(&written);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                    () = shutdown.cancelled() => {
                        if rx.has_changed().unwrap_or(false) {
                            let pending = rx.borrow_and_update().clone();
                            write_logged(&path, pending, &counts).await;
                        }
                        break;
                    }
                }
                let pending = rx.borrow_and_update().clone();
                write_logged(&path, pending, &counts).await;
            }
        });
        (Self { pending, written }, task)
    }

    /// Queues snapshot `revision`'s `bytes` for writing (replacing any write not started yet).
    pub fn save(&self, revision: Revision, bytes: Bytes) {
        self.pending.send_replace(Some((revision, bytes)));
    }

    /// What the writer did so far.
    pub fn written(&self) -> Arc<Written> {
        Arc::clone(&self.written)
    }
}

async fn write_logged(path: &Path, pending: Pending, written: &Written) {
    let Some((revision, bytes)) = pending else {
        return;
    };
    let target = path.to_owned();
    let result = tokio::task::spawn_blocking(move || write_atomic(&target, &bytes)).await;
    match result {
        Ok(Ok(())) => {
            written.revision.store(revision.get(), Ordering::Relaxed);
            tracing::debug!(path = %path.display(), %revision, "persisted snapshot");
        }
        Ok(Err(error)) => {
            written.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %path.display(), %error, "could not persist the snapshot; continuing");
        }
        Err(error) => {
            written.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "snapshot writer task failed; continuing");
        }
    }
}

/// Writes `bytes` to `<path>.tmp`, syncs it, and renames it over `path`, so a reader (or a
/// crash) never sees a half-written file.
///
/// # Errors
/// Any I/O error; the previous file stays intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads the persisted snapshot, if any. A missing file is normal; other errors are logged.
pub fn load(path: &Path) -> Option<Bytes> {
    match std::fs::read(path) {
        Ok(bytes) => Some(Bytes::from(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no persisted snapshot yet");
            None
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the persisted snapshot; ignoring it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("snap.json.tmp").exists());
        assert_eq!(load(&path).unwrap(), Bytes::from_static(b"two"));
        assert!(load(&dir.path().join("missing.json")).is_none());
        // Unwritable target: an error, not a panic, and nothing left behind.
        let bad = dir.path().join("no-such-dir").join("x.json");
        assert!(write_atomic(&bad, b"x").is_err());
    }

    #[tokio::test]
    async fn writer_coalesces_and_flushes_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        let shutdown = CancellationToken::new();
        let (persister, task) = Persister::start(path.clone(), shutdown.clone());
        persister.save(Revision::new(1), Bytes::from_static(b"a"));
        persister.save(Revision::new(2), Bytes::from_static(b"b"));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"b");
        assert_eq!(
            persister.written().report(),
            PersistReport {
                revision: 2,
                failures: 0
            }
        );
    }
}

#[cfg(test)]
mod live_tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn writer_writes_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        let shutdown = CancellationToken::new();
        let (persister, _task) = Persister::start(path.clone(), shutdown.clone());
        persister.save(Revision::new(1), Bytes::from_static(b"a"));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !path.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_failed_write_is_counted_and_keeps_the_last_written_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("snap.json");
        let shutdown = CancellationToken::new();
        let (persister, _task) = Persister::start(path, shutdown.clone());
        persister.written().restored(Revision::new(4));
        persister.save(Revision::new(5), Bytes::from_static(b"a"));
        tokio::time::timeout(Duration::from_secs(5), async {
            while persister.written().report().failures == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(
            persister.written().report(),
            PersistReport {
                revision: 4,
                failures: 1
            }
        );
        shutdown.cancel();
    }
}
