//! Shared state of one proxy process: the current snapshot, the upstream handle, caches, counters.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rollgate_proxy_core::snapshot::{CacheStats, Freshness, Snapshot};
use rollgate_proxy_core::time::Timestamp;
use rollgate_proxy_core::upstream::{Upstream, UpstreamStatus};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Secret, Settings};
use crate::forward::Forwarder;
use crate::users::{IdentityStore, UserCache};

/// The latest snapshot; `None` until the first one exists. A watch channel gives SSE the
/// latest-snapshot semantics (a slow client skips to the newest, bursts coalesce).
pub type SnapshotSender = watch::Sender<Option<Arc<Snapshot>>>;

/// Now, as core's timestamp (unix milliseconds).
pub fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(millis)
}

/// A random `u64` from the standard library's per-process hash keys (no extra dependency; good
/// enough for jitter, never used for secrets).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// `duration` scaled by a random factor in `[1 - spread, 1 + spread]`.
pub fn jittered(duration: Duration, spread: f64) -> Duration {
    // 53 random bits → a uniform sample in [0, 1).
    #[allow(clippy::cast_precision_loss)]
    let sample = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    duration.mul_f64((1.0 - spread + 2.0 * spread * sample).max(0.0))
}

/// Locks a std mutex, ignoring poisoning (every critical section here leaves consistent state).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The upstream machine and what is needed to talk to Rollgate.
#[derive(Debug)]
pub struct UpstreamHandle {
    machine: Mutex<Upstream>,
    notify: Notify,
    /// HTTP client for every upstream request.
    pub http: reqwest::Client,
    /// Base URL without trailing slash.
    pub base_url: String,
    /// The server key.
    pub api_key: Secret,
    /// Timeout of one request.
    pub timeout: Duration,
    /// When upstream last confirmed the data (unix ms, 0 = never), mirrored from the machine
    /// by the driver so requests classify freshness without taking the lock.
    pub last_confirmed: AtomicU64,
}

impl UpstreamHandle {
    /// Wraps a machine.
    pub fn new(
        machine: Upstream,
        http: reqwest::Client,
        base_url: String,
        api_key: Secret,
        timeout: Duration,
    ) -> Self {
        Self {
            machine: Mutex::new(machine),
            notify: Notify::new(),
            http,
            base_url,
            api_key,
            timeout,
            last_confirmed: AtomicU64::new(0),
        }
    }

    /// Runs `f` on the machine under the lock, then wakes the driver so it drains actions.
    /// The lock is never held across an `.await` (`f` is synchronous).
    pub fn with<R>(&self, f: impl FnOnce(&mut Upstream) -> R) -> R {
        let result = f(&mut lock(&self.machine));
        self.notify.notify_one();
        result
    }

    /// Like [`UpstreamHandle::with`], without waking the driver (for reads).
    pub fn peek<R>(&self, f: impl FnOnce(&Upstream) -> R) -> R {
        f(&lock(&self.machine))
    }

    /// Takes every pending action (without waking the driver: the driver is the caller).
    pub fn drain(&self) -> Vec<rollgate_proxy_core::upstream::Action> {
        let mut machine = lock(&self.machine);
        std::iter::from_fn(|| machine.poll_action()).collect()
    }

    /// Waits until an input may have produced actions.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The machine's status now.
    pub fn status(&self) -> UpstreamStatus {
        self.peek(|m| m.status(now()))
    }

    /// Describes a reqwest error without its URL (which may carry `?token=`), with its causes,
    /// and with the key redacted as a second line of defence.
    pub fn describe(&self, error: &reqwest::Error) -> String {
        let mut text = if error.is_timeout() {
            "timed out".to_owned()
        } else if error.is_connect() {
            "connection failed".to_owned()
        } else {
            "request failed".to_owned()
        };
        let mut source = std::error::Error::source(error);
        let mut depth = 0;
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
            depth += 1;
            if depth > 4 {
                break;
            }
        }
        self.api_key.redact(&text)
    }
}

/// Health of local mode (there is no upstream machine).
#[derive(Debug, Default)]
pub struct LocalStatus {
    /// When the file was last loaded successfully (unix ms).
    pub loaded_at: AtomicU64,
    /// Why the last reload failed, cleared by the next good one.
    pub last_error: Mutex<Option<String>>,
}

/// Request counters by data freshness (the SDKs' cache stats).
#[derive(Debug, Default)]
pub struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

impl CacheCounters {
    /// Counts one answer.
    pub fn record(&self, freshness: Freshness) {
        let counter = match freshness {
            Freshness::Fresh => &self.hits,
            Freshness::Missing => &self.misses,
            Freshness::Stale => &self.stale,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stale_hits: self.stale.load(Ordering::Relaxed),
        }
    }
}

/// Everything the request handlers share.
#[derive(Debug)]
pub struct App {
    /// Validated settings.
    pub settings: Settings,
    /// The current snapshot (send side; handlers `borrow()`, streams `subscribe()`).
    pub snapshots: SnapshotSender,
    /// Upstream mode: the machine and client.
    pub upstream: Option<Arc<UpstreamHandle>>,
    /// Local mode: file status.
    pub local: Option<Arc<LocalStatus>>,
    /// Cancelled when the process shuts down (SSE streams end, tasks flush).
    pub shutdown: CancellationToken,
    /// Open SSE connections.
    pub sse_clients: AtomicU64,
    /// Answers by freshness.
    pub cache: CacheCounters,
    /// Per-user answers in evaluated mode.
    pub users: UserCache,
    /// Attributes from `/identify`.
    pub identities: IdentityStore,
    /// Events and telemetry buffers.
    pub forwarder: Forwarder,
    /// Sequence for generated request ids.
    pub request_seq: AtomicU64,
}

impl App {
    /// A new state with no snapshot yet.
    pub fn new(
        settings: Settings,
        upstream: Option<Arc<UpstreamHandle>>,
        local: Option<Arc<LocalStatus>>,
        shutdown: CancellationToken,
    ) -> Self {
        let (snapshots, _) = watch::channel(None);
        Self {
            users: UserCache::new(settings.user_cache_size, settings.upstream.refresh_interval),
            identities: IdentityStore::new(settings.identify_store_size),
            forwarder: Forwarder::default(),
            settings,
            snapshots,
            upstream,
            local,
            shutdown,
            sse_clients: AtomicU64::new(0),
            cache: CacheCounters::default(),
            request_seq: AtomicU64::new(0),
        }
    }

    /// The current snapshot.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshots.borrow().clone()
    }

    /// Freshness of the data now, without locks.
    pub fn freshness(&self, has_data: bool) -> Freshness {
        if !has_data {
            return Freshness::Missing;
        }
        match &self.upstream {
            None => Freshness::Fresh,
            Some(upstream) => match upstream.last_confirmed.load(Ordering::Relaxed) {
                // Restored from disk and not confirmed yet.
                0 => Freshness::Stale,
                ms => Freshness::classify(
                    now(),
                    Some(Timestamp::from_millis(ms)),
                    self.settings.upstream.stale_after,
                ),
            },
        }
    }

    /// When upstream (or the local file) last confirmed the data.
    pub fn last_confirmed(&self) -> Option<Timestamp> {
        let ms = match (&self.upstream, &self.local) {
            (Some(upstream), _) => upstream.last_confirmed.load(Ordering::Relaxed),
            (None, Some(local)) => local.loaded_at.load(Ordering::Relaxed),
            (None, None) => 0,
        };
        (ms != 0).then(|| Timestamp::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let base = Duration::from_secs(100);
        let samples: Vec<Duration> = (0..200).map(|_| jittered(base, 0.1)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= Duration::from_secs(90) && *d <= Duration::from_secs(110))
        );
        assert!(samples.iter().any(|d| *d != samples[0]));
        assert_ne!(random_u64(), random_u64());
    }
}
