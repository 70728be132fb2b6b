//! The mock's shared state: flag data, per-user views, faults, recordings and the open streams.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::config::MockConfig;
use super::frames;
use super::server::{ConnProbe, ListenerSlot};
use super::types::{DropKind, Fault, FlagSet, Heartbeat, RecordedRequest, Route, Stats};

/// How many requests the log keeps; older ones are dropped so a long test cannot grow it forever.
const LOG_CAPACITY: usize = 4096;

/// The flag data every view is computed from.
#[derive(Clone, Debug, Default)]
pub(crate) struct FlagData {
    /// The map served to anonymous users and users without an override.
    pub(crate) default: FlagSet,
    /// Flags whose value is a per-user percentage rollout, layered over `default`.
    pub(crate) rollouts: BTreeMap<String, u8>,
    /// Whole-map overrides per `user_id`.
    pub(crate) users: BTreeMap<String, FlagSet>,
    /// Flags on exactly for users whose last `/identify` set attribute `.0` to `.1`, layered
    /// over the rest: Rollgate evaluates a user with the attributes it last received.
    pub(crate) attribute_targets: BTreeMap<String, (String, Value)>,
}

impl FlagData {
    /// What `/flags?user_id=<user>` serves: the user's override, or the default map with the
    /// rollout flags resolved for that user.
    pub(crate) fn view(&self, user: Option<&str>) -> FlagSet {
        if let Some(set) = user.and_then(|u| self.users.get(u)) {
            return set.clone();
        }
        let mut set = self.default.clone();
        for (key, pct) in &self.rollouts {
            let inside = rollout_bucket(user.unwrap_or(""), key) < u32::from(*pct);
            set.flags.insert(key.clone(), Value::Bool(inside));
            let reason = if inside {
                serde_json::json!({"kind": "FALLTHROUGH", "inRollout": true})
            } else {
                serde_json::json!({"kind": "FALLTHROUGH"})
            };
            set.reasons.insert(key.clone(), reason);
        }
        set
    }
}

impl FlagData {
    /// What `/flags?user_id=<user>` serves given the contexts users last sent to `/identify`
    /// (`identified`: user id → the identify's `user` object).
    pub(crate) fn view_identified(
        &self,
        user: Option<&str>,
        identified: &BTreeMap<String, Value>,
    ) -> FlagSet {
        let mut set = self.view(user);
        for (key, (attribute, want)) in &self.attribute_targets {
            let matched = user
                .and_then(|u| identified.get(u))
                .and_then(|context| context.get("attributes")?.get(attribute))
                == Some(want);
            set.flags.insert(key.clone(), Value::Bool(matched));
            let kind = if matched {
                "TARGET_MATCH"
            } else {
                "FALLTHROUGH"
            };
            set.reasons
                .insert(key.clone(), serde_json::json!({ "kind": kind }));
        }
        set
    }
}

/// Keys whose value changed for some user between `before` and `after` (sorted).
fn changed_keys(before: &FlagData, after: &FlagData) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut users: BTreeSet<Option<&str>> = BTreeSet::from([None]);
    users.extend(before.users.keys().map(|u| Some(u.as_str())));
    users.extend(after.users.keys().map(|u| Some(u.as_str())));
    for user in users {
        let (old, new) = (before.view(user), after.view(user));
        for key in old.flags.keys().chain(new.flags.keys()) {
            if old.flags.get(key) != new.flags.get(key) {
                keys.insert(key.clone());
            }
        }
    }
    for key in before.rollouts.keys().chain(after.rollouts.keys()) {
        if before.rollouts.get(key) != after.rollouts.get(key) {
            keys.insert(key.clone());
        }
    }
    keys
}

/// The official mock's bucket: `FNV-1a-32(userId + ":" + flagKey) % 100` (protocol notes §3.5).
/// Deliberately not the SDKs' SHA-256 bucket, so nothing here mirrors the proxy's evaluator.
pub(crate) fn rollout_bucket(user: &str, key: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in user.bytes().chain(std::iter::once(b':')).chain(key.bytes()) {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % 100
}

/// The sending half of one open stream.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    /// `user_id` the stream was opened with; its snapshots are computed for that user.
    pub(crate) user: Option<String>,
    /// Ordered data for the stream (initial snapshot first).
    pub(crate) data: mpsc::UnboundedSender<Bytes>,
    /// Out-of-band end requests, honoured even while the stream is stalled.
    pub(crate) end: mpsc::UnboundedSender<DropKind>,
    /// The connection's socket, to see the client's close before the stream's next write.
    pub(crate) probe: Option<ConnProbe>,
}

/// Everything behind the one state mutex.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) api_key: String,
    pub(crate) data: FlagData,
    /// The `rules-full` payload as compact one-line JSON.
    pub(crate) rules: Option<String>,
    pub(crate) mode: super::types::StreamMode,
    pub(crate) stream_auth: super::types::StreamAuth,
    pub(crate) faults: BTreeMap<Route, Fault>,
    pub(crate) delays: BTreeMap<Route, Duration>,
    pub(crate) stats: Stats,
    pub(crate) log: VecDeque<RecordedRequest>,
    pub(crate) last: BTreeMap<Route, RecordedRequest>,
    pub(crate) identify: Vec<Value>,
    pub(crate) identified: BTreeMap<String, Value>,
    pub(crate) events: Vec<Value>,
    pub(crate) telemetry: Vec<Value>,
    pub(crate) streams: HashMap<u64, StreamEntry>,
    pub(crate) next_stream_id: u64,
}

impl Inner {
    fn from_config(config: &MockConfig) -> Self {
        Self {
            api_key: config.api_key.clone(),
            data: config.data.clone(),
            rules: config.rules.clone(),
            mode: config.stream_mode,
            stream_auth: config.stream_auth,
            faults: BTreeMap::new(),
            delays: BTreeMap::new(),
            stats: Stats::default(),
            log: VecDeque::new(),
            last: BTreeMap::new(),
            identify: Vec::new(),
            identified: BTreeMap::new(),
            events: Vec::new(),
            telemetry: Vec::new(),
            streams: HashMap::new(),
            next_stream_id: 0,
        }
    }

    /// The frames a freshly opened stream for `user` starts with.
    pub(crate) fn initial_frames(&self, user: Option<&str>) -> Vec<Bytes> {
        let view = self.data.view(user);
        let mut out = vec![frames::event("init", &frames::snapshot_json(&view.flags))];
        if let Some(rules) = &self.rules {
            out.push(frames::event("rules-full", rules));
        }
        out
    }
}

/// State shared by the handlers, the listeners and every control handle.
#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every observable change; `wait_until` sleeps on it.
    changed: watch::Sender<u64>,
    /// True while streams must not write.
    pub(crate) stall: watch::Sender<bool>,
    /// Current keepalive setting; streams re-arm their timer when it changes.
    pub(crate) heartbeat: watch::Sender<Option<Heartbeat>>,
    /// While true, new protocol connections are closed without an answer.
    pub(crate) down: AtomicBool,
    /// Bumped to close every protocol-listener connection at once.
    pub(crate) conn_epoch: watch::Sender<u64>,
    /// Set once when the owning `MockUpstream` is dropped: closes everything, control included.
    pub(crate) shutdown: watch::Sender<bool>,
    /// The protocol listener (address and accept task).
    pub(crate) listener: Mutex<ListenerSlot>,
    /// The dedicated control listener's accept task, if any.
    pub(crate) control_listener: Mutex<Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>>,
    /// What `reset` returns to.
    pub(crate) initial: MockConfig,
}

/// Locks a mutex, ignoring poisoning: a panicking test must not cascade into every other call.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn new(config: MockConfig, listener: ListenerSlot) -> Self {
        Self {
            inner: Mutex::new(Inner::from_config(&config)),
            changed: watch::Sender::new(0),
            stall: watch::Sender::new(false),
            heartbeat: watch::Sender::new(config.heartbeat),
            down: AtomicBool::new(false),
            conn_epoch: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            listener: Mutex::new(listener),
            control_listener: Mutex::new(None),
            initial: config,
        }
    }

    /// Runs `f` under the state lock, then wakes waiters.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let out = f(&mut lock(&self.inner));
        self.bump();
        out
    }

    /// Reads under the state lock without waking anyone.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Inner) -> R) -> R {
        f(&lock(&self.inner))
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    pub(crate) fn set_down_flag(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Closes every open protocol connection (streams included) right now.
    pub(crate) fn close_connections(&self) {
        self.conn_epoch.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Applies a change to the flag data, bumps the version and tells every open stream,
    /// according to the stream mode (one event per stream for snapshot modes, one event per
    /// changed key for the notification modes).
    pub(crate) fn change_flags(&self, f: impl FnOnce(&mut FlagData)) {
        self.with(|inner| {
            let before = inner.data.clone();
            f(&mut inner.data);
            inner.stats.version += 1;
            let mode = inner.mode;
            // As Rollgate does, a flag whose targeting changed is announced to every stream,
            // also to streams (like the anonymous one) whose own value stayed the same: the
            // keys whose value changed for anyone (the default view, a rollout, an override).
            let changed = changed_keys(&before, &inner.data);
            for entry in inner.streams.values() {
                let user = entry.user.as_deref();
                let after = inner.data.view(user);
                if mode.is_snapshot() {
                    let frame =
                        frames::event(mode.event_name(), &frames::snapshot_json(&after.flags));
                    let _ = entry.data.send(frame);
                    continue;
                }
                for key in &changed {
                    let new_value = after.flags.get(key);
                    let enabled = new_value.cloned().unwrap_or(Value::Bool(false));
                    let frame =
                        frames::event(mode.event_name(), &frames::key_enabled_json(key, &enabled));
                    let _ = entry.data.send(frame);
                }
            }
            inner.stats.last_change_unix_us = unix_micros();
        });
    }

    /// Sets (or clears) the rules payload; setting sends `rules-full` to every open stream.
    pub(crate) fn change_rules(&self, rules: Option<String>) {
        self.with(|inner| {
            inner.stats.version += 1;
            if let Some(rules) = &rules {
                let frame = frames::event("rules-full", rules);
                for entry in inner.streams.values() {
                    let _ = entry.data.send(frame.clone());
                }
                inner.stats.last_change_unix_us = unix_micros();
            }
            inner.rules = rules;
        });
    }

    /// Queues `bytes` on every open stream.
    pub(crate) fn broadcast(&self, bytes: &Bytes) -> usize {
        self.read(|inner| {
            for entry in inner.streams.values() {
                let _ = entry.data.send(bytes.clone());
            }
            inner.streams.len()
        })
    }

    /// Ends every open stream.
    pub(crate) fn end_streams(&self, kind: DropKind) -> usize {
        self.read(|inner| {
            for entry in inner.streams.values() {
                let _ = entry.end.send(kind);
            }
            inner.streams.len()
        })
    }

    /// Records a protocol request, counts it, and returns the delay configured for its route.
    pub(crate) fn record(&self, request: RecordedRequest) -> Option<Duration> {
        self.with(|inner| {
            let s = &mut inner.stats;
            match request.route {
                Route::Flags => {
                    s.flags_requests += 1;
                    if request.header("if-none-match").is_some() {
                        s.flags_if_none_match += 1;
                    }
                }
                Route::Stream => s.stream_requests += 1,
                Route::Identify => s.identify_requests += 1,
                Route::Events => s.events_requests += 1,
                Route::Telemetry => s.telemetry_requests += 1,
                Route::Health => s.health_requests += 1,
            }
            let route = request.route;
            if inner.log.len() >= LOG_CAPACITY {
                inner.log.pop_front();
            }
            inner.log.push_back(request.clone());
            inner.last.insert(route, request);
            inner.delays.get(&route).copied()
        })
    }

    /// Takes one use of the fault configured for `route`, if any.
    pub(crate) fn take_fault(&self, route: Route) -> Option<Fault> {
        self.with(|inner| {
            let fault = inner.faults.get_mut(&route)?;
            let out = fault.clone();
            match &mut fault.remaining {
                None => {}
                Some(0) => {
                    inner.faults.remove(&route);
                    return None;
                }
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        inner.faults.remove(&route);
                    }
                }
            }
            inner.stats.faults_served += 1;
            Some(out)
        })
    }

    /// Back to the configuration the mock started with; open streams are told per the mode.
    pub(crate) fn reset(&self) {
        let initial = self.initial.clone();
        self.with(|inner| {
            inner.api_key = initial.api_key.clone();
            inner.mode = initial.stream_mode;
            inner.stream_auth = initial.stream_auth;
            inner.faults.clear();
            inner.delays.clear();
            inner.log.clear();
            inner.last.clear();
            inner.identify.clear();
            inner.identified.clear();
            inner.events.clear();
            inner.telemetry.clear();
            let open = inner.streams.len() as u64;
            let version = inner.stats.version;
            inner.stats = Stats {
                open_streams: open,
                peak_open_streams: open,
                version,
                ..Stats::default()
            };
        });
        self.change_flags(|data| *data = initial.data.clone());
        self.change_rules(initial.rules.clone());
        self.heartbeat.send_replace(initial.heartbeat);
        self.stall.send_replace(false);
        self.set_down_flag(false);
    }
}

/// Now, in microseconds since the Unix epoch (0 for a clock before it).
pub(super) fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_buckets_match_the_official_mock() {
        // Vectors from the protocol notes §3.5 ("mock FNV bucket" column).
        let cases = [
            ("consistent-user-123", "rollout-50", 89),
            ("user-1", "rollout-50", 15),
            ("user-123", "my-feature", 54),
            ("user-1", "rollout-10", 75),
        ];
        for (user, key, want) in cases {
            assert_eq!(rollout_bucket(user, key), want, "{user}:{key}");
        }
    }

    #[test]
    fn user_override_replaces_the_whole_map() {
        let mut data = FlagData {
            default: FlagSet::from_bools([("a", true), ("b", false)]),
            ..FlagData::default()
        };
        data.users
            .insert("u1".into(), FlagSet::from_bools([("a", false)]));
        assert_eq!(data.view(Some("u1")), FlagSet::from_bools([("a", false)]));
        assert_eq!(data.view(Some("u2")), data.default);
        assert_eq!(data.view(None), data.default);
    }

    #[test]
    fn rollouts_resolve_per_user() {
        let mut data = FlagData::default();
        data.rollouts.insert("rollout-50".into(), 50);
        // bucket 89 is out of a 50% rollout, bucket 15 is in.
        let out = data.view(Some("consistent-user-123"));
        assert_eq!(out.flags["rollout-50"], Value::Bool(false));
        assert_eq!(
            out.reasons["rollout-50"],
            serde_json::json!({"kind":"FALLTHROUGH"})
        );
        let inside = data.view(Some("user-1"));
        assert_eq!(inside.flags["rollout-50"], Value::Bool(true));
        assert_eq!(
            inside.reasons["rollout-50"],
            serde_json::json!({"kind":"FALLTHROUGH","inRollout":true})
        );
    }
}
