//! The handle on core's upstream machine: the machine behind a lock, the HTTP client, the key.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rollgate_proxy_core::secret::Secret;
use rollgate_proxy_core::upstream::{Upstream, UpstreamStatus};
use tokio::sync::Notify;

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
