//! The handle on core's upstream machine: the machine behind a lock, the HTTP client, the key.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rollgate_proxy_core::metrics::{MAX_SIDE_REQUESTS_IN_FLIGHT, SideRequest};
use rollgate_proxy_core::secret::Secret;
use rollgate_proxy_core::upstream::{Upstream, UpstreamStatus};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::runtime::{lock, now};

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
    /// The machine's change epoch, mirrored by the driver after every drain (the per-user
    /// refresher follows it).
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Slots for requests outside the machine, one pool per kind (core's bound).
    side_slots: [std::sync::Arc<Semaphore>; 4],
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
            changes: tokio::sync::watch::Sender::new(0),
            side_slots: std::array::from_fn(|_| {
                std::sync::Arc::new(Semaphore::new(MAX_SIDE_REQUESTS_IN_FLIGHT))
            }),
        }
    }

    /// A slot for one request of `kind` outside the machine, if fewer than core's bound are in
    /// flight (`None`: do not send it; it counts as busy).
    pub fn side_slot(&self, kind: SideRequest) -> Option<OwnedSemaphorePermit> {
        std::sync::Arc::clone(&self.side_slots[kind.index()])
            .try_acquire_owned()
            .ok()
    }

    /// Runs `f` on the machine under the lock, then wakes the driver so it drains actions.
    /// The lock is never held across an `.await` (`f` is synchronous).
    pub fn with<R>(&self, f: impl FnOnce(&mut Upstream) -> R) -> R {
        let result = f(&mut lock(&self.machine));
        self.notify.notify_one();
        result
    }

    /// Like [`UpstreamHandle::with`], without waking the driver: for the driver itself (a
    /// self-notification would make its loop spin).
    pub fn with_quiet<R>(&self, f: impl FnOnce(&mut Upstream) -> R) -> R {
        f(&mut lock(&self.machine))
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

#[cfg(test)]
mod tests {
    use rollgate_proxy_core::time::Timestamp;
    use rollgate_proxy_core::upstream::UpstreamConfig;

    use super::*;

    #[test]
    fn side_requests_are_bounded_per_kind() {
        let handle = UpstreamHandle::new(
            Upstream::new(UpstreamConfig::default(), Timestamp::ZERO),
            reqwest::Client::new(),
            "http://127.0.0.1:9".to_owned(),
            Secret::new("k"),
            Duration::from_secs(1),
        );
        let mut held: Vec<_> = (0..MAX_SIDE_REQUESTS_IN_FLIGHT)
            .map(|_| handle.side_slot(SideRequest::Identify).unwrap())
            .collect();
        assert!(handle.side_slot(SideRequest::Identify).is_none());
        // Other kinds have their own slots.
        assert!(handle.side_slot(SideRequest::UserFlags).is_some());
        held.pop();
        assert!(handle.side_slot(SideRequest::Identify).is_some());
    }
}
