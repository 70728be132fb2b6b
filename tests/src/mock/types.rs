//! Plain data the tests hand to the mock or read back from it: flag sets, modes, faults, stats.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::MockError;

/// One flag map as `/api/v1/sdk/flags` serves it: `flags` and the optional `reasons`.
///
/// `BTreeMap` keeps the keys sorted whatever serde_json features the build enables, so the
/// bodies and ETags are byte-stable like the official mock's (Go sorts map keys).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlagSet {
    /// Flag key to value; production only sends booleans, tests may send anything.
    pub flags: BTreeMap<String, Value>,
    /// Flag key to reason object (`{"kind":"OFF"}`, ...); served only with `withReasons=true`.
    #[serde(default)]
    pub reasons: BTreeMap<String, Value>,
}

impl FlagSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set of boolean flags without reasons.
    pub fn from_bools<K: Into<String>>(flags: impl IntoIterator<Item = (K, bool)>) -> Self {
        Self {
            flags: flags
                .into_iter()
                .map(|(k, v)| (k.into(), Value::Bool(v)))
                .collect(),
            reasons: BTreeMap::new(),
        }
    }

    /// Adds or replaces one flag value.
    #[must_use]
    pub fn with_flag(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.flags.insert(key.into(), value.into());
        self
    }

    /// Adds or replaces one reason.
    #[must_use]
    pub fn with_reason(mut self, key: impl Into<String>, reason: Value) -> Self {
        self.reasons.insert(key.into(), reason);
        self
    }

    /// Parses `{"flags":{..},"reasons":{..}?}`.
    pub fn from_json(value: Value) -> Result<Self, MockError> {
        serde_json::from_value(value).map_err(|e| MockError::InvalidInput(e.to_string()))
    }
}

/// What an open stream receives when flag data changes (§2.2 of the protocol notes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StreamMode {
    /// `event: init` with the full `{"flags":{..}}` snapshot of the stream's user.
    #[default]
    Init,
    /// `event: flags` with the full snapshot (the production docs' format).
    Flags,
    /// `event: flag-changed` `{"enabled","key"}` per changed key (sorted; a removed key is
    /// announced as `false`): a notification to refetch.
    FlagChanged,
    /// `event: flag-update` `{"enabled","key"}` per changed key, like `FlagChanged`: a merge.
    FlagUpdate,
}

impl StreamMode {
    /// The SSE event name this mode sends.
    pub fn event_name(self) -> &'static str {
        match self {
            Self::Init => "init",
            Self::Flags => "flags",
            Self::FlagChanged => "flag-changed",
            Self::FlagUpdate => "flag-update",
        }
    }

    /// True for the modes that send a whole snapshot rather than per-key notifications.
    pub fn is_snapshot(self) -> bool {
        matches!(self, Self::Init | Self::Flags)
    }
}

impl FromStr for StreamMode {
    type Err = MockError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "init" => Ok(Self::Init),
            "flags" => Ok(Self::Flags),
            "flag-changed" => Ok(Self::FlagChanged),
            "flag-update" => Ok(Self::FlagUpdate),
            other => Err(MockError::InvalidInput(format!(
                "unknown stream mode {other:?}"
            ))),
        }
    }
}

/// Which credentials `/api/v1/sdk/stream` accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StreamAuth {
    /// `?token=<key>` or `Authorization: Bearer <key>` (what a compatible server should do).
    #[default]
    TokenOrBearer,
    /// Only `?token=<key>`, like the official mock (Python SDK clients get 401).
    TokenOnly,
    /// Only `Authorization: Bearer <key>`.
    BearerOnly,
}

impl FromStr for StreamAuth {
    type Err = MockError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "token-or-bearer" => Ok(Self::TokenOrBearer),
            "token-only" => Ok(Self::TokenOnly),
            "bearer-only" => Ok(Self::BearerOnly),
            other => Err(MockError::InvalidInput(format!(
                "unknown stream auth {other:?}"
            ))),
        }
    }
}

/// Keepalive traffic on open streams. The official mock sends none, so it is off by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Time between heartbeats; measured from the stream's last heartbeat (or connect/resume).
    #[serde(with = "millis", rename = "interval_ms")]
    pub interval: Duration,
    /// Send the SSE comment `: keepalive`.
    #[serde(default)]
    pub comment: bool,
    /// Send `event: heartbeat` with `{"timestamp":<unix ms>}` (the docs' format; wipes Python SDK flags).
    #[serde(default)]
    pub event: bool,
}

impl Heartbeat {
    /// Comment-only keepalives (safe for every SDK).
    pub fn comments(interval: Duration) -> Self {
        Self {
            interval,
            comment: true,
            event: false,
        }
    }

    /// `event: heartbeat` only.
    pub fn events(interval: Duration) -> Self {
        Self {
            interval,
            comment: false,
            event: true,
        }
    }
}

mod millis {
    //! Serde helper: a `Duration` as integer milliseconds.
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The protocol routes the mock serves; faults, delays and recordings are per route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Route {
    /// `GET /api/v1/sdk/flags`
    Flags,
    /// `GET /api/v1/sdk/stream`
    Stream,
    /// `POST /api/v1/sdk/identify`
    Identify,
    /// `POST /api/v1/sdk/events`
    Events,
    /// `POST /api/v1/sdk/telemetry`
    Telemetry,
    /// `GET /health`
    Health,
}

impl Route {
    /// Every route, in a fixed order.
    pub const ALL: [Self; 6] = [
        Self::Flags,
        Self::Stream,
        Self::Identify,
        Self::Events,
        Self::Telemetry,
        Self::Health,
    ];

    /// The kebab-case name used by the control API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flags => "flags",
            Self::Stream => "stream",
            Self::Identify => "identify",
            Self::Events => "events",
            Self::Telemetry => "telemetry",
            Self::Health => "health",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Route {
    type Err = MockError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| MockError::InvalidInput(format!("unknown route {s:?}")))
    }
}

/// An injected failure: answer with `status` instead of serving the route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// HTTP status to answer with.
    pub status: u16,
    /// Body; `None` gives the structured `{"error":{code,category,message,retryable}}` body.
    #[serde(default)]
    pub body: Option<String>,
    /// Content-Type; `None` gives `application/json`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// `Retry-After` header value, sent verbatim.
    #[serde(default)]
    pub retry_after: Option<String>,
    /// `Location` header value (for a 3xx), sent verbatim.
    #[serde(default)]
    pub location: Option<String>,
    /// Instead of `body`: a generated body of this many bytes (`{"flags":{` then padding),
    /// streamed in chunks so the mock never holds it whole.
    #[serde(default)]
    pub body_bytes: Option<u64>,
    /// How many more requests fail; `None` means every request until the fault is cleared.
    #[serde(default, rename = "count")]
    pub remaining: Option<u32>,
}

impl Fault {
    /// A fault that answers every request with `status` until cleared.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: None,
            content_type: None,
            retry_after: None,
            location: None,
            body_bytes: None,
            remaining: None,
        }
    }

    /// Limits the fault to the next `n` requests.
    #[must_use]
    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }

    /// Replaces the default body.
    #[must_use]
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets the Content-Type.
    #[must_use]
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a `Retry-After` header.
    #[must_use]
    pub fn retry_after(mut self, value: impl Into<String>) -> Self {
        self.retry_after = Some(value.into());
        self
    }

    /// Adds a `Location` header (for redirects).
    #[must_use]
    pub fn location(mut self, value: impl Into<String>) -> Self {
        self.location = Some(value.into());
        self
    }

    /// Answers with a generated body of `n` bytes, streamed (see [`Fault::body_bytes`]).
    #[must_use]
    pub fn body_of_len(mut self, n: u64) -> Self {
        self.body_bytes = Some(n);
        self
    }
}

/// How `drop_streams` ends the open streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DropKind {
    /// End the body properly (terminating chunk); the client sees a clean EOF.
    #[default]
    Clean,
    /// Abort the connection mid-body; the client sees a truncated response.
    Abort,
}

/// Counters the tests assert on. Every field only grows, except `open_streams` (and `peak_open_streams` on a reset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stats {
    /// Bumped by every flag-data change.
    pub version: u64,
    /// TCP connections accepted on the protocol listener (including refused ones).
    pub connections_accepted: u64,
    /// Connections closed at once because the mock was "down".
    pub connections_refused: u64,
    /// Requests to `/flags` (all outcomes).
    pub flags_requests: u64,
    /// `/flags` requests carrying `If-None-Match`.
    pub flags_if_none_match: u64,
    /// `/flags` answered 304.
    pub flags_not_modified: u64,
    /// `/flags` answered 200 with a body.
    pub flags_ok: u64,
    /// Requests to `/stream` (all outcomes).
    pub stream_requests: u64,
    /// Streams opened (200 sent).
    pub streams_accepted: u64,
    /// Streams open right now.
    pub open_streams: u64,
    /// Most streams open at once (a reset starts it again from those open then).
    #[serde(default)]
    pub peak_open_streams: u64,
    /// Requests rejected with 401 on any route.
    pub auth_failures: u64,
    /// Requests answered by an injected fault.
    pub faults_served: u64,
    /// Requests to `/identify`.
    pub identify_requests: u64,
    /// Requests to `/events`.
    pub events_requests: u64,
    /// Requests to `/telemetry`.
    pub telemetry_requests: u64,
    /// Requests to `/health`.
    pub health_requests: u64,
    /// When the last flag-data change was queued on the open streams, in microseconds since
    /// the Unix epoch (0: none yet): a bench on this machine measures upstream → client from
    /// here, without the control request that made the change.
    #[serde(default)]
    pub last_change_unix_us: u64,
}

/// One request as the mock received it (protocol routes only, not `/control`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// The route it hit.
    pub route: Route,
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Headers in arrival order, names lowercase, values lossily decoded.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of query parameter `name` (last one wins).
    pub fn query_param(&self, name: &str) -> Option<String> {
        super::query::param(self.query.as_deref()?, name)
    }
}
