//! Local mode: serve a rules file, watch it, and publish every good edit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rollgate_proxy_core::model::RulesPayload;
use rollgate_proxy_core::snapshot::{FlagSource, SnapshotStore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::state::{LocalStatus, SnapshotSender, lock, now};

/// Why the rules file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a rules payload.
    #[error("{path} is not a rules file ({{\"flags\":{{key:rule}}}}): {source}")]
    Parse {
        /// The file.
        path: String,
        /// The model error.
        source: rollgate_proxy_core::model::ModelError,
    },
}

/// Reads and parses the rules file.
///
/// # Errors
/// [`LocalError`] when the file is unreadable or invalid.
pub fn read_rules(path: &Path) -> Result<RulesPayload, LocalError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LocalError::Read {
        path: shown.clone(),
        source,
    })?;
    RulesPayload::from_json(&bytes).map_err(|source| LocalError::Parse {
        path: shown,
        source,
    })
}

/// The local source: a store of revisions built from the file.
#[derive(Debug)]
pub struct LocalSource {
    path: PathBuf,
    store: SnapshotStore,
    snapshots: SnapshotSender,
    status: Arc<LocalStatus>,
}

impl LocalSource {
    /// Loads the file once and publishes it.
    ///
    /// # Errors
    /// [`LocalError`] when the file cannot be used at start.
    pub fn start(
        path: PathBuf,
        snapshots: SnapshotSender,
        status: Arc<LocalStatus>,
    ) -> Result<Self, LocalError> {
        let rules = read_rules(&path)?;
        let mut source = Self {
            path,
            store: SnapshotStore::new(),
            snapshots,
            status,
        };
        source.publish(&rules);
        Ok(source)
    }

    fn publish(&mut self, rules: &RulesPayload) {
        let at = now();
        self.status
            .loaded_at
            .store(at.as_millis().max(1), Ordering::Relaxed);
        *lock(&self.status.last_error) = None;
        if let Some(snapshot) = self.store.replace(at, FlagSource::rules(rules)) {
            tracing::info!(
                path = %self.path.display(),
                revision = snapshot.revision().get(),
                etag = snapshot.etag(),
                flags = snapshot.defaults().flags.len(),
                "publishing snapshot"
            );
            self.snapshots.send_replace(Some(snapshot));
        }
    }

    /// Re-reads the file: a good edit is published, a broken one logged (the last good
    /// snapshot stays).
    pub fn reload(&mut self) {
        match read_rules(&self.path) {
            Ok(rules) => self.publish(&rules),
            Err(error) => {
                tracing::error!(%error, "keeping the last good flags");
                *lock(&self.status.last_error) = Some(error.to_string());
            }
        }
    }

    /// Watches the file until `shutdown`. The parent directory is watched, so editors that
    /// replace the file (write a temp file, rename it over) are seen too; bursts of events are
    /// debounced.
    pub async fn watch(mut self, shutdown: CancellationToken) {
        use notify::Watcher;
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let name = self.path.file_name().map(ToOwned::to_owned);
        let handler = move |event: notify::Result<notify::Event>| {
            let relevant = event.is_ok_and(|event| {
                !event.kind.is_access()
                    && event
                        .paths
                        .iter()
                        .any(|p| p.file_name().map(ToOwned::to_owned) == name)
            });
            if relevant {
                let _ = tx.try_send(());
            }
        };
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::error!(%error, "cannot watch the flags file; edits need a restart");
                return;
            }
        };
        if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::error!(%error, dir = %dir.display(), "cannot watch the flags file; edits need a restart");
            return;
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = rx.recv() => {
                    if event.is_none() {
                        break;
                    }
                    // Debounce: editors write in several steps.
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    self.reload();
                }
            }
        }
        drop(watcher);
    }
}

const DEBOUNCE: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"{"version":"1","flags":{"a":{"enabled":true,"rollout":100}}}"#;

    #[tokio::test]
    async fn edits_are_published_and_broken_edits_keep_the_last_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flags.json");
        std::fs::write(&path, RULES).unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let status = Arc::new(LocalStatus::default());
        let source = LocalSource::start(path.clone(), tx, Arc::clone(&status)).unwrap();
        let first = rx.borrow_and_update().clone().unwrap();
        assert_eq!(first.defaults().flags.get("a"), Some(&true));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.watch(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Replace the file the way editors do: write elsewhere, rename over.
        let tmp = dir.path().join("flags.json.swp");
        std::fs::write(&tmp, RULES.replace("true", "false")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let second = rx.borrow_and_update().clone().unwrap();
        assert_eq!(second.defaults().flags.get("a"), Some(&false));
        assert!(second.revision() > first.revision());

        std::fs::write(&path, "{ broken").unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while lock(&status.last_error).is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(
            rx.borrow().clone().unwrap().revision(),
            second.revision(),
            "a broken edit must not publish"
        );
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn start_fails_on_a_missing_or_invalid_file() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = tokio::sync::watch::channel(None);
        let status = Arc::new(LocalStatus::default());
        let missing = dir.path().join("nope.json");
        assert!(LocalSource::start(missing, tx.clone(), Arc::clone(&status)).is_err());
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "[]").unwrap();
        assert!(LocalSource::start(bad, tx, status).is_err());
    }
}
