//! Shared state of one proxy process: the current snapshot, the flag source, core's downstream.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rollgate_proxy_core::downstream::{Downstream, SourceReport};
use rollgate_proxy_core::outbox::Outbox;
use rollgate_proxy_core::snapshot::{Freshness, Snapshot};
use rollgate_proxy_core::time::Timestamp;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::identify::IdentifyGates;
pub use crate::runtime::{lock, now, random_u64};
pub use crate::upstream::UpstreamHandle;

/// The latest snapshot; `None` until the first one exists. A watch channel gives SSE the
/// latest-snapshot semantics (a slow client skips to the newest, bursts coalesce).
pub type SnapshotSender = watch::Sender<Option<Arc<Snapshot>>>;

/// Health of local mode (there is no upstream machine).
#[derive(Debug, Default)]
pub struct LocalStatus {
    /// When the file was last loaded successfully (unix ms).
    pub loaded_at: AtomicU64,
    /// Why the last reload failed, cleared by the next good one.
    pub last_error: Mutex<Option<String>>,
}

/// Where the flags come from.
#[derive(Debug)]
pub enum Source {
    /// A watched local rules file.
    Local(Arc<LocalStatus>),
    /// Rollgate, through core's upstream machine.
    Upstream(Arc<UpstreamHandle>),
}

/// Everything the request handlers share.
#[derive(Debug)]
pub struct App {
    /// Validated settings.
    pub settings: Settings,
    /// Core's downstream: dispatch, per-user cache, identities, metrics.
    pub downstream: Downstream,
    /// The current snapshot (send side; handlers `borrow()`, streams `subscribe()`).
    pub snapshots: SnapshotSender,
    /// Where the flags come from.
    pub source: Source,
    /// Cancelled when the process shuts down (SSE streams end, tasks flush).
    pub shutdown: CancellationToken,
    /// Events and telemetry waiting to be forwarded.
    pub outbox: Arc<Mutex<Outbox>>,
    /// Woken whenever a per-user fetch completes (waiters re-check the cache).
    pub user_fetches: Notify,
    /// `/identify` forwards in flight, per user: that user's fetches wait for them.
    pub identifies: Arc<IdentifyGates>,
    /// Open per-user SSE connections, woken when their user's answer is refetched.
    pub user_streams: crate::refresh::UserStreams,
    /// Requests being handled now, for overload shedding: process-wide, since every
    /// environment's state of one process shares it (`--max-concurrent-requests` bounds the
    /// process, not each environment).
    pub in_flight: Arc<AtomicUsize>,
    /// What the snapshot file's writer did (`None` without `--snapshot-file`).
    pub persisted: Option<Arc<crate::persist::Written>>,
}

impl App {
    /// A new state with no snapshot yet.
    pub fn new(settings: Settings, source: Source, shutdown: CancellationToken) -> Self {
        let (snapshots, _) = watch::channel(None);
        Self {
            downstream: Downstream::new(settings.core.clone()),
            outbox: Arc::default(),
            settings,
            snapshots,
            source,
            shutdown,
            user_fetches: Notify::new(),
            identifies: Arc::default(),
            user_streams: crate::refresh::UserStreams::default(),
            in_flight: Arc::default(),
            persisted: None,
        }
    }

    /// The upstream handle, in upstream mode.
    pub fn upstream(&self) -> Option<&Arc<UpstreamHandle>> {
        match &self.source {
            Source::Upstream(upstream) => Some(upstream),
            Source::Local(_) => None,
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
        match &self.source {
            Source::Local(_) => Freshness::Fresh,
            Source::Upstream(upstream) => match upstream.last_confirmed.load(Ordering::Relaxed) {
                // Restored from disk and not confirmed yet.
                0 => Freshness::Stale,
                ms => Freshness::classify(
                    now(),
                    Some(Timestamp::from_millis(ms)),
                    self.settings.core.upstream.stale_after,
                ),
            },
        }
    }

    /// The source's state, for health and metrics.
    pub fn report(&self) -> SourceReport {
        match &self.source {
            Source::Upstream(upstream) => SourceReport::Upstream(upstream.status()),
            Source::Local(local) => SourceReport::Local {
                last_error: lock(&local.last_error).clone(),
                loaded_at: match local.loaded_at.load(Ordering::Relaxed) {
                    0 => None,
                    ms => Some(Timestamp::from_millis(ms)),
                },
            },
        }
    }
}
