//! A Rollgate-compatible mock upstream: serves the SDK wire protocol (protocol notes §1–§2) and
//! gives tests control of its data, its failures and its listener, in process or over `/control`.
//!
//! # Layout
//! * `types`: the plain data tests pass in and read back.
//! * `config`: start-up configuration and scenarios.
//! * `state`: shared state behind one mutex, plus change fan-out to open streams.
//! * `protocol`: the SDK routes; `stream`: one open SSE response; `frames`: the exact bytes.
//! * `server`: accept loops; `control`: the `/control/*` HTTP API.
//!
//! # `/control/*` (JSON, no auth; served on the protocol port and on the optional control port)
//! The control port is never affected by `down`/`stop`/`outage`; use it to drive restarts.
//!
//! | request | body / query | effect |
//! |---|---|---|
//! | `GET /control/stats` | | [`Stats`] |
//! | `GET /control/wait` | `open_streams` (==), `streams_accepted`, `flags_requests`, `stream_requests`, `version` (>=), `timeout_ms` | 200 stats, or 408 `{"timeout":true,"stats"}` |
//! | `POST /control/reset` | | [`MockControl::reset`] |
//! | `PUT /control/api-key` | `{"api_key"}` | |
//! | `PUT`/`GET /control/flags` | `{"flags","reasons"?}` / `?user_id=` | set default map / current view + `etag` |
//! | `PUT`/`DELETE /control/flags/{key}` | `{"value","reason"?}` | one flag |
//! | `PUT /control/rollouts/{key}` | `{"percentage"}` | per-user rollout |
//! | `PUT`/`DELETE /control/users/{id}` | `{"flags","reasons"?}` | per-user map |
//! | `PUT`/`DELETE /control/rules` | rules payload | `rules-full` |
//! | `PUT /control/stream-mode` | `{"mode":"init\|flags\|flag-changed\|flag-update"}` | |
//! | `PUT /control/stream-auth` | `{"auth":"token-or-bearer\|token-only\|bearer-only"}` | |
//! | `PUT`/`DELETE /control/heartbeat` | `{"interval_ms","comment"?,"event"?}` | |
//! | `POST /control/faults` | `{"route","status","body"?,"content_type"?,"retry_after"?,"location"?,"body_bytes"?,"count"?}` | [`Fault`]; `DELETE` clears all, `DELETE /control/faults/{route}` one |
//! | `PUT /control/delays/{route}` | `{"ms"}` | `DELETE /control/delays` clears (and releases held answers) |
//! | `POST /control/streams/{drop,stall,resume}` | drop: `{"kind":"clean\|abort"}`? | |
//! | `POST /control/streams/raw` | `{"text"}` or `{"hex"}` | bytes on every stream |
//! | `POST /control/streams/event` | `{"event","data"}` (string sent as is, else JSON) | |
//! | `PUT /control/down` | `{"down"}` | refuse (accept + close) connections |
//! | `POST /control/connections/close` | | close every protocol connection |
//! | `POST /control/{stop,start}` | | close / rebind the protocol port |
//! | `POST /control/outage` | `{"ms"}` | stop, then rebind the same port `ms` later |
//! | `GET`/`DELETE /control/requests` | `?route=` | recorded requests; `GET /control/requests/last/{route}` |
//! | `GET`/`DELETE /control/received` | | identify / events / telemetry bodies |
//!
//! A change answers `{"ok","version","last_change_unix_us"}`: the last is when the change was
//! queued on the open streams (microseconds since the Unix epoch), for benches that measure
//! upstream → client on the same machine.

mod config;
mod control;
mod frames;
mod protocol;
mod query;
mod server;
mod state;
mod stream;
mod types;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

pub use config::{DEFAULT_API_KEY, MockConfig, Scenario};
pub use protocol::{UNAUTHORIZED_BODY, default_fault_body, etag_for};
pub use types::{
    DropKind, Fault, FlagSet, Heartbeat, RecordedRequest, Route, Stats, StreamAuth, StreamMode,
};

use server::{Kind, ListenerSlot};
use state::{Shared, lock};

/// What can go wrong driving the mock.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MockError {
    /// A listener could not bind (for a restart: someone else took the port).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The owning [`MockUpstream`] was dropped.
    #[error("the mock upstream has been shut down")]
    ShutDown,
    /// Bad control input (unknown name, malformed JSON, ...); nothing was changed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A `wait_*` condition did not hold in time.
    #[error("condition not met after {waited:?}; last stats: {stats:?}")]
    Timeout {
        /// How long it waited.
        waited: Duration,
        /// The counters when it gave up.
        stats: Box<Stats>,
    },
}

/// A running mock. Dropping it closes both listeners and every connection.
///
/// All control methods live on [`MockControl`] (reached through `Deref` or [`Self::control`]),
/// which can be cloned into other tasks.
#[derive(Debug)]
pub struct MockUpstream {
    control: MockControl,
}

impl MockUpstream {
    /// Binds the listener(s) and starts serving.
    pub async fn start(config: MockConfig) -> Result<Self, MockError> {
        let listener = server::bind(config.addr).map_err(|source| MockError::Bind {
            addr: config.addr,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| MockError::Bind {
            addr: config.addr,
            source,
        })?;
        let control_listener = match config.control_addr {
            Some(caddr) => {
                let bind_err = |source| MockError::Bind {
                    addr: caddr,
                    source,
                };
                let cl = server::bind(caddr).map_err(bind_err)?;
                let bound = cl.local_addr().map_err(bind_err)?;
                Some((cl, bound))
            }
            None => None,
        };
        let shared = Arc::new(Shared::new(config, ListenerSlot { addr, task: None }));
        lock(&shared.listener).task = Some(server::spawn(&shared, listener, Kind::Protocol));
        if let Some((cl, bound)) = control_listener {
            *lock(&shared.control_listener) =
                Some((bound, server::spawn(&shared, cl, Kind::Control)));
        }
        Ok(Self {
            control: MockControl { shared },
        })
    }

    /// Starts the `basic` scenario with default settings.
    pub async fn basic() -> Result<Self, MockError> {
        Self::start(MockConfig::basic()).await
    }

    /// A cloneable handle for other tasks.
    pub fn control(&self) -> MockControl {
        self.control.clone()
    }
}

impl Deref for MockUpstream {
    type Target = MockControl;

    fn deref(&self) -> &MockControl {
        &self.control
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let shared = &self.control.shared;
        shared.shutdown.send_replace(true);
        if let Some(task) = lock(&shared.listener).task.take() {
            task.abort();
        }
        if let Some((_, task)) = lock(&shared.control_listener).take() {
            task.abort();
        }
        shared.close_connections();
    }
}

/// Everything a test can do to a running mock. Cheap to clone; all clones drive the same mock.
#[derive(Clone, Debug)]
pub struct MockControl {
    shared: Arc<Shared>,
}

impl MockControl {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    // ---- addresses -------------------------------------------------------------------------

    /// The protocol listener's address (stable across `stop`/`start`).
    pub fn addr(&self) -> SocketAddr {
        lock(&self.shared.listener).addr
    }

    /// `http://127.0.0.1:PORT`: the base URL to give an SDK or the proxy.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The dedicated control listener's address, if one was configured.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        lock(&self.shared.control_listener)
            .as_ref()
            .map(|(addr, _)| *addr)
    }

    /// The API key currently required.
    pub fn api_key(&self) -> String {
        self.shared.read(|inner| inner.api_key.clone())
    }

    /// Changes the API key (open streams stay open).
    pub fn set_api_key(&self, key: impl Into<String>) {
        let key = key.into();
        self.shared.with(|inner| inner.api_key = key);
    }

    // ---- flag data -------------------------------------------------------------------------

    /// Replaces the default map (and drops every rollout flag).
    pub fn set_flags(&self, flags: FlagSet) {
        self.shared.change_flags(|data| {
            data.default = flags;
            data.rollouts.clear();
        });
    }

    /// Sets one default flag, without a reason (an old reason for the key is removed).
    pub fn set_flag(&self, key: impl Into<String>, value: impl Into<Value>) {
        self.set_flag_with_reason(key, value, None);
    }

    /// Sets one default flag and its reason (`None` removes the reason).
    pub fn set_flag_with_reason(
        &self,
        key: impl Into<String>,
        value: impl Into<Value>,
        reason: Option<Value>,
    ) {
        let (key, value) = (key.into(), value.into());
        self.shared.change_flags(|data| {
            data.rollouts.remove(&key);
            match reason {
                Some(r) => data.default.reasons.insert(key.clone(), r),
                None => data.default.reasons.remove(&key),
            };
            data.default.flags.insert(key, value);
        });
    }

    /// Removes one default flag (and its reason and rollout).
    pub fn remove_flag(&self, key: &str) {
        self.shared.change_flags(|data| {
            data.rollouts.remove(key);
            data.default.reasons.remove(key);
            data.default.flags.remove(key);
        });
    }

    /// Makes `key` a per-user percentage rollout (FNV-1a bucket, like the official mock).
    pub fn set_rollout(&self, key: impl Into<String>, percentage: u8) {
        let key = key.into();
        self.shared.change_flags(|data| {
            data.rollouts.insert(key, percentage.min(100));
        });
    }

    /// Gives `user` a whole map of its own, replacing the default map for that user.
    pub fn set_user_flags(&self, user: impl Into<String>, flags: FlagSet) {
        let user = user.into();
        self.shared.change_flags(|data| {
            data.users.insert(user, flags);
        });
    }

    /// Removes `user`'s override; the user falls back to the default map.
    pub fn remove_user_flags(&self, user: &str) {
        self.shared.change_flags(|data| {
            data.users.remove(user);
        });
    }

    /// Makes `key` on exactly for users whose last `/identify` gave attribute `attribute` the
    /// value `value` (as Rollgate evaluates with the attributes it last received).
    pub fn set_attribute_target(
        &self,
        key: impl Into<String>,
        attribute: impl Into<String>,
        value: impl Into<Value>,
    ) {
        let (key, target) = (key.into(), (attribute.into(), value.into()));
        self.shared.change_flags(|data| {
            data.attribute_targets.insert(key, target);
        });
    }

    /// What `/flags?user_id=<user>` serves right now (`None`: anonymous).
    pub fn flags_for(&self, user: Option<&str>) -> FlagSet {
        self.shared.read(|inner| inner.data.view(user))
    }

    /// The ETag `/flags` sends right now for `user`.
    pub fn etag_for_user(&self, user: Option<&str>) -> String {
        etag_for(frames::to_json(&self.flags_for(user).flags).as_bytes())
    }

    /// Sets the `rules-full` payload and sends it to every open stream; new streams get it
    /// after their `init`.
    pub fn set_rules(&self, rules: &Value) {
        self.shared.change_rules(Some(frames::to_json(rules)));
    }

    /// Like [`Self::set_rules`] from raw JSON text, kept byte-for-byte when it is one line.
    pub fn set_rules_raw(&self, rules: &str) -> Result<(), MockError> {
        let value: Value =
            serde_json::from_str(rules).map_err(|e| MockError::InvalidInput(e.to_string()))?;
        let text = if rules.contains(['\n', '\r']) {
            frames::to_json(&value)
        } else {
            rules.to_owned()
        };
        self.shared.change_rules(Some(text));
        Ok(())
    }

    /// Forgets the rules payload (bumps the version; sends nothing).
    pub fn clear_rules(&self) {
        self.shared.change_rules(None);
    }

    // ---- stream behaviour ------------------------------------------------------------------

    /// How later changes are announced on open streams.
    pub fn set_stream_mode(&self, mode: StreamMode) {
        self.shared.with(|inner| inner.mode = mode);
    }

    /// The current stream mode.
    pub fn stream_mode(&self) -> StreamMode {
        self.shared.read(|inner| inner.mode)
    }

    /// Which credentials new streams must carry.
    pub fn set_stream_auth(&self, auth: StreamAuth) {
        self.shared.with(|inner| inner.stream_auth = auth);
    }

    /// Keepalives on every open and future stream (`None`: off).
    pub fn set_heartbeat(&self, heartbeat: Option<Heartbeat>) {
        self.shared.heartbeat.send_replace(heartbeat);
    }

    // ---- faults ----------------------------------------------------------------------------

    /// Arms `fault` on `route` (replacing any fault there). It applies before auth, like the
    /// official mock's error simulation.
    pub fn fail(&self, route: Route, fault: Fault) {
        self.shared.with(|inner| {
            if fault.remaining == Some(0) {
                inner.faults.remove(&route);
            } else {
                inner.faults.insert(route, fault);
            }
        });
    }

    /// Disarms the fault on `route`.
    pub fn clear_fault(&self, route: Route) {
        self.shared.with(|inner| inner.faults.remove(&route));
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        self.shared.with(|inner| inner.faults.clear());
    }

    /// Delays every answer on `route` (faults included) by `delay`; zero removes the delay.
    /// Removing a delay also releases the answers it is holding.
    pub fn set_delay(&self, route: Route, delay: Duration) {
        self.shared.with(|inner| {
            if delay.is_zero() {
                inner.delays.remove(&route);
            } else {
                inner.delays.insert(route, delay);
            }
        });
    }

    /// Removes every delay.
    pub fn clear_delays(&self) {
        self.shared.with(|inner| inner.delays.clear());
    }

    /// Ends every open stream now; returns how many there were.
    pub fn drop_streams(&self, kind: DropKind) -> usize {
        self.shared.end_streams(kind)
    }

    /// Stops writing on every stream (new ones included) but keeps them open; data and
    /// changes queue up and are written on [`Self::resume_streams`]. Drops still work.
    pub fn stall_streams(&self) {
        self.shared.stall.send_replace(true);
    }

    /// Ends a stall.
    pub fn resume_streams(&self) {
        self.shared.stall.send_replace(false);
    }

    /// Writes `bytes` verbatim on every open stream (garbage, partial lines, bad JSON...).
    pub fn send_raw(&self, bytes: impl Into<Bytes>) -> usize {
        self.shared.broadcast(&bytes.into())
    }

    /// Sends `event: <name>` with `data` (split into `data:` lines) on every open stream.
    pub fn send_event(&self, name: &str, data: &str) -> usize {
        self.shared.broadcast(&frames::event(name, data))
    }

    /// While `down`, the protocol listener closes every new connection without answering, and
    /// going down also closes every open connection (keep-alive pools included).
    pub fn set_down(&self, down: bool) {
        self.shared.set_down_flag(down);
        if down {
            self.shared.close_connections();
        }
    }

    /// Closes every open protocol connection now (streams abort mid-body).
    pub fn close_connections(&self) {
        self.shared.close_connections();
    }

    /// Closes the protocol listener (connects are refused) and every protocol connection.
    pub async fn stop(&self) {
        let task = lock(&self.shared.listener).task.take();
        if let Some(task) = task {
            task.abort();
            // Awaiting the aborted task guarantees the listening socket is closed.
            let _ = task.await;
        }
        self.shared.close_connections();
        self.shared.bump();
        let _ = self.wait_for_open_streams(0, Duration::from_secs(2)).await;
    }

    /// Rebinds the protocol listener on the same address; a no-op when it is running.
    pub async fn start(&self) -> Result<SocketAddr, MockError> {
        if *self.shared.shutdown.borrow() {
            return Err(MockError::ShutDown);
        }
        let mut slot = lock(&self.shared.listener);
        if slot.task.is_some() {
            return Ok(slot.addr);
        }
        let addr = slot.addr;
        let listener = server::bind(addr).map_err(|source| MockError::Bind { addr, source })?;
        slot.task = Some(server::spawn(&self.shared, listener, Kind::Protocol));
        drop(slot);
        self.shared.bump();
        Ok(addr)
    }

    /// True while the protocol listener is bound.
    pub fn is_running(&self) -> bool {
        lock(&self.shared.listener).task.is_some()
    }

    /// Back to the start-up configuration: flags, rules, key, modes, heartbeat; clears faults,
    /// delays, stall, down, counters (except `open_streams`), recordings and received bodies.
    /// Open streams are told about the flag change per the mode. A stopped listener stays stopped.
    pub fn reset(&self) {
        self.shared.reset();
    }

    // ---- observation -----------------------------------------------------------------------

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.shared.read(|inner| inner.stats.clone())
    }

    /// Streams open right now.
    pub fn open_streams(&self) -> u64 {
        self.shared.read(|inner| inner.stats.open_streams)
    }

    /// The last request that hit `route`.
    pub fn last_request(&self, route: Route) -> Option<RecordedRequest> {
        self.shared.read(|inner| inner.last.get(&route).cloned())
    }

    /// Every recorded request (the newest 4096), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .read(|inner| inner.log.iter().cloned().collect())
    }

    /// The recorded requests for one route, oldest first.
    pub fn requests_for(&self, route: Route) -> Vec<RecordedRequest> {
        self.shared.read(|inner| {
            inner
                .log
                .iter()
                .filter(|r| r.route == route)
                .cloned()
                .collect()
        })
    }

    /// Forgets recorded requests (counters stay).
    pub fn clear_requests(&self) {
        self.shared.with(|inner| {
            inner.log.clear();
            inner.last.clear();
        });
    }

    /// Every `/identify` body received, in order.
    pub fn identify_bodies(&self) -> Vec<Value> {
        self.shared.read(|inner| inner.identify.clone())
    }

    /// The last `user` object identified with `id`.
    pub fn identified_user(&self, id: &str) -> Option<Value> {
        self.shared.read(|inner| inner.identified.get(id).cloned())
    }

    /// Every `/events` body received, in order.
    pub fn event_bodies(&self) -> Vec<Value> {
        self.shared.read(|inner| inner.events.clone())
    }

    /// Every event object received, flattened across bodies.
    pub fn events(&self) -> Vec<Value> {
        self.shared.read(|inner| {
            inner
                .events
                .iter()
                .filter_map(|b| b.get("events").and_then(Value::as_array))
                .flatten()
                .cloned()
                .collect()
        })
    }

    /// Every `/telemetry` body received, in order.
    pub fn telemetry_bodies(&self) -> Vec<Value> {
        self.shared.read(|inner| inner.telemetry.clone())
    }

    /// Forgets received identify, events and telemetry bodies.
    pub fn clear_received(&self) {
        self.shared.with(|inner| {
            inner.identify.clear();
            inner.identified.clear();
            inner.events.clear();
            inner.telemetry.clear();
        });
    }

    /// Waits until `cond(stats)` holds, re-checking on every change, for at most `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&Stats) -> bool,
    ) -> Result<Stats, MockError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.subscribe_changes();
        loop {
            // Mark the current version seen *before* checking, so no change is missed.
            changes.borrow_and_update();
            let stats = self.stats();
            if cond(&stats) {
                return Ok(stats);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let stats = self.stats();
                    return if cond(&stats) {
                        Ok(stats)
                    } else {
                        Err(MockError::Timeout {
                            waited: timeout,
                            stats: Box::new(stats),
                        })
                    };
                }
            }
        }
    }

    /// Waits until exactly `n` streams are open.
    pub async fn wait_for_open_streams(
        &self,
        n: u64,
        timeout: Duration,
    ) -> Result<Stats, MockError> {
        self.wait_until(timeout, |s| s.open_streams == n).await
    }

    /// Waits until at least `n` streams have been accepted in total.
    pub async fn wait_for_streams_accepted(
        &self,
        n: u64,
        timeout: Duration,
    ) -> Result<Stats, MockError> {
        self.wait_until(timeout, |s| s.streams_accepted >= n).await
    }

    /// Waits until at least `n` `/flags` requests have arrived in total.
    pub async fn wait_for_flags_requests(
        &self,
        n: u64,
        timeout: Duration,
    ) -> Result<Stats, MockError> {
        self.wait_until(timeout, |s| s.flags_requests >= n).await
    }
}
