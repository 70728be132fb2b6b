//! The upstream protocol machine: keeps one replica in sync with Rollgate, sans-IO.
//!
//! [`Upstream`] decides every request the replica makes to Rollgate and what to do with every
//! answer; the adapter only performs the I/O it is told to. One machine holds **one** stream.
//!
//! Behaviour (protocol doc §1–§4):
//! - At start: one `GET /api/v1/sdk/flags` ([`Action::Fetch`]), then one stream
//!   ([`Action::OpenStream`]) when streaming is enabled.
//! - Stream events: `init` / `flags` replace the evaluated flags; `flag-changed` triggers a
//!   conditional refetch (`If-None-Match`); `flag-update` merges one flag; `rules-full` switches
//!   to rules (local evaluation), after which the evaluated-data events of the stream are ignored
//!   as the Node SDK ignores them; `heartbeat` and unknown events are ignored. Malformed data
//!   keeps the last good snapshot and is counted.
//! - An idle stream (no byte for `stream_idle_timeout`) is closed and reopened; reconnects back
//!   off from 1 s doubling to 30 s, jittered, and reset once the new stream delivers an event.
//! - While the stream is down (or streaming is off), flags are polled every `refresh_interval`
//!   with the last ETag. A poll answer with new content then wins, also over the rules the
//!   stream sent before it went down; while the stream delivers rules, fetched values do not
//!   replace them.
//! - Stream events carry values, not reasons: unchanged flags keep Rollgate's reasons, and a
//!   change triggers a conditional refetch that brings the new reasons. The change is held
//!   (at most [`REASONS_WAIT`]) until that refetch answers and then published **once**, with
//!   its reasons: one upstream change, one revision, one frame per client.
//! - A `Retry-After` on a 429 or 503 (delta-seconds or HTTP-date, [`parse_retry_after`]) is
//!   honoured by every request to upstream: fetches, the stream and the adapter's own per-user
//!   requests ([`Upstream::admit_side_request`]) wait until it has passed (at most
//!   [`MAX_RETRY_AFTER`]).
//! - A 401 means the server key was rejected: health says so plainly
//!   ([`UpstreamError::KeyRejected`], [`UpstreamStatus::key_rejected`]) and upstream is probed
//!   again only every `refresh_interval`, not on the fast retry and reconnect schedules.
//! - Every request goes through the circuit breaker; a fetch is retried (100 ms·2ⁿ ±10 %, 3
//!   retries) before it counts as **one** breaker failure, as in the SDKs. A failed stream open
//!   counts as one failure too. While the breaker is open nothing reaches upstream; once it is
//!   half-open, conditional polls every second confirm the recovery so it closes within seconds.
//!
//! Inputs are the `handle_*` methods; outputs are drained with [`Upstream::poll_action`], then
//! [`Upstream::poll_timeout`] says when to call [`Upstream::handle_timeout`].

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::backoff::{BackoffConfigError, Jitter, ReconnectBackoff, ReconnectPolicy, RetryPolicy};
use crate::breaker::{
    Admission, BreakerConfig, BreakerConfigError, BreakerState, BreakerStats, CircuitBreaker,
    Outcome,
};
use crate::metrics::SideRequest;
use crate::model::EvaluatedFlags;
use crate::snapshot::{FlagSource, Freshness, Revision, Snapshot, SnapshotError, SnapshotStore};
use crate::sse::decode::{DecodeError, Decoder, DecoderLimits, SseEvent};
use crate::time::Timestamp;

/// How the machine talks to upstream. `Default` is Rollgate's SDK defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConfig {
    /// Hold a stream (`GET /api/v1/sdk/stream`); when off, only poll.
    pub streaming: bool,
    /// Poll interval while the stream is down or streaming is off.
    pub refresh_interval: Duration,
    /// Close and reopen a stream that delivered no byte for this long. Also bounds how long a
    /// stream may take to open.
    pub stream_idle_timeout: Duration,
    /// Data not confirmed by upstream for longer than this is reported stale.
    pub stale_after: Duration,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Retries of one fetch before it counts as a breaker failure.
    pub retry: RetryPolicy,
    /// Stream reconnect schedule.
    pub reconnect: ReconnectPolicy,
    /// Limits that keep a hostile stream from growing memory.
    pub decoder_limits: DecoderLimits,
    /// The largest upstream response body (a flags fetch, per-user or not) an adapter reads;
    /// a longer one is abandoned and reported as [`FetchResult::TooLarge`]. Both adapters take
    /// the limit from here.
    pub max_body_bytes: usize,
    /// Seed of the jitter source; the adapter passes a random value so replicas do not retry in
    /// lockstep, tests pass a constant so transcripts are reproducible.
    pub jitter_seed: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            streaming: true,
            refresh_interval: Duration::from_secs(30),
            stream_idle_timeout: Duration::from_secs(90),
            stale_after: Duration::from_secs(300),
            breaker: BreakerConfig::default(),
            retry: RetryPolicy::default(),
            reconnect: ReconnectPolicy::default(),
            decoder_limits: DecoderLimits::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            jitter_seed: 0x5eed,
        }
    }
}

impl UpstreamConfig {
    /// Checks the settings once, before the machine starts.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.refresh_interval < MIN_INTERVAL {
            return Err(ConfigError::TooShort {
                setting: "refresh_interval",
                min: MIN_INTERVAL,
            });
        }
        if self.stream_idle_timeout < MIN_INTERVAL {
            return Err(ConfigError::TooShort {
                setting: "stream_idle_timeout",
                min: MIN_INTERVAL,
            });
        }
        if self.max_body_bytes < MIN_BODY_BYTES {
            return Err(ConfigError::BodyLimit {
                min: MIN_BODY_BYTES,
            });
        }
        self.breaker.validate()?;
        self.retry.validate()?;
        self.reconnect.validate()?;
        Ok(())
    }
}

/// An invalid [`UpstreamConfig`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration below the minimum the machine can honour.
    #[error("{setting} must be at least {min:?}")]
    TooShort {
        /// The setting's name.
        setting: &'static str,
        /// The minimum.
        min: Duration,
    },
    /// The upstream body limit is too small for any real flag set.
    #[error("max_body_bytes must be at least {min}")]
    BodyLimit {
        /// The minimum.
        min: usize,
    },
    /// Invalid breaker settings.
    #[error(transparent)]
    Breaker(#[from] BreakerConfigError),
    /// Invalid retry or reconnect settings.
    #[error(transparent)]
    Backoff(#[from] BackoffConfigError),
}

/// Identifies one fetch, so a late answer to an abandoned request is recognised and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

/// Identifies one stream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId(u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fetch#{}", self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream#{}", self.0)
    }
}

/// What the adapter must do next. Drain with [`Upstream::poll_action`] after every input.
#[must_use]
#[derive(Clone, Debug)]
pub enum Action {
    /// Stop reading the stream `id` and drop its connection. Do not report it closed.
    CloseStream(StreamId),
    /// `GET {base}/api/v1/sdk/flags?withReasons=true` with `Authorization: Bearer <key>` and,
    /// when given, `If-None-Match`; report the result with [`Upstream::handle_fetch`].
    Fetch {
        /// Pass back with the result.
        id: RequestId,
        /// The ETag to send as `If-None-Match`.
        if_none_match: Option<String>,
    },
    /// `GET {base}/api/v1/sdk/stream?token=<key>` (also with the Bearer header, which the
    /// Python-style servers need); report with `handle_stream_opened`, `handle_stream_bytes`
    /// and `handle_stream_closed`.
    OpenStream(StreamId),
    /// Write `bytes` (snapshot `revision`'s persisted form) to durable storage, replacing what
    /// was there (atomically). The revision is for the adapter's report of what it wrote
    /// ([`crate::metrics::PersistReport`]).
    Persist {
        /// The snapshot's revision.
        revision: Revision,
        /// [`Snapshot::to_persisted`]'s bytes.
        bytes: Bytes,
    },
    /// Make this snapshot current and send its frames to subscribers.
    Publish(Arc<Snapshot>),
}

/// The result of a [`Action::Fetch`], as the adapter saw it.
#[derive(Clone, Debug)]
pub enum FetchResult {
    /// Upstream answered (any status).
    Response {
        /// HTTP status.
        status: u16,
        /// The `ETag` header, verbatim.
        etag: Option<String>,
        /// The body (empty for 304).
        body: Bytes,
        /// The `Retry-After` header, verbatim (honoured on 429 and 503).
        retry_after: Option<String>,
    },
    /// The body grew past [`UpstreamConfig::max_body_bytes`]; the adapter stopped reading.
    TooLarge {
        /// HTTP status of the answer.
        status: u16,
        /// The limit that was exceeded.
        limit: usize,
    },
    /// No answer: connect error, timeout, reset.
    Transport(String),
}

impl FetchResult {
    /// A response without `ETag` or `Retry-After` (tests and simple adapters).
    pub fn response(status: u16, body: impl Into<Bytes>) -> Self {
        Self::Response {
            status,
            etag: None,
            body: body.into(),
            retry_after: None,
        }
    }
}

/// How a stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The body ended cleanly.
    Eof,
    /// The connection failed (before or after the response head).
    Error(String),
}

/// The stream's state, for health output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Streaming is disabled in the configuration.
    Disabled,
    /// No stream; one will be opened at the reconnect deadline.
    Disconnected,
    /// Waiting for the response head.
    Connecting,
    /// Open and delivering.
    Connected,
}

impl StreamState {
    /// `"disabled"`, `"disconnected"`, `"connecting"` or `"connected"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Disconnected => "disconnected",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
        }
    }
}

/// Counters since start, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCounters {
    /// Fetches answered 200 with valid data.
    pub fetch_ok: u64,
    /// Fetches answered 304.
    pub fetch_not_modified: u64,
    /// Failed fetch attempts (each retry counts).
    pub fetch_errors: u64,
    /// Fetches (logical requests) that the open breaker refused.
    pub breaker_rejections: u64,
    /// Streams opened successfully.
    pub stream_connects: u64,
    /// Stream opens that failed, and streams that broke or went idle.
    pub stream_errors: u64,
    /// SSE events received.
    pub events: u64,
    /// Events or bodies whose data was invalid (the last good snapshot was kept).
    pub malformed: u64,
}

/// Why the last upstream interaction failed (for health output and logs).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// Upstream answered 401: the server API key is wrong, revoked, or for another project.
    #[error(
        "Rollgate rejected the server API key (401 to {what}): check ROLLGATE_API_KEY; probing again every {probe:?}"
    )]
    KeyRejected {
        /// The request.
        what: &'static str,
        /// How often upstream is probed until the key works.
        probe: Duration,
    },
    /// Upstream answered 429 or 503 with a `Retry-After`.
    #[error("upstream answered {status} to {what}; waiting {wait:?} as its Retry-After asks")]
    Throttled {
        /// The request.
        what: &'static str,
        /// The status.
        status: u16,
        /// How long nothing is sent upstream.
        wait: Duration,
    },
    /// Upstream answered with a redirect, which is never followed (it would carry the key
    /// to another host).
    #[error(
        "upstream answered {status} (a redirect, not followed) to {what}: check ROLLGATE_BASE_URL"
    )]
    Redirected {
        /// The request.
        what: &'static str,
        /// The status.
        status: u16,
    },
    /// Upstream answered with an unexpected status.
    #[error("upstream answered {status} to {what}")]
    Status {
        /// The request.
        what: &'static str,
        /// The status.
        status: u16,
    },
    /// No answer.
    #[error("{what} failed: {reason}")]
    Transport {
        /// The request.
        what: &'static str,
        /// The adapter's description.
        reason: String,
    },
    /// The answer's data was invalid.
    #[error("upstream sent invalid {what}: {reason}")]
    Malformed {
        /// What was invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The stream stayed silent past the idle timeout.
    #[error("stream idle for {0:?}; reconnecting")]
    Idle(Duration),
    /// The stream broke a decoder limit.
    #[error("stream rejected: {0}")]
    Decode(#[from] DecodeError),
}

/// A summary of the machine's state for `/api/health`.
#[derive(Clone, Debug)]
pub struct UpstreamStatus {
    /// Breaker state and counters.
    pub breaker: BreakerStats,
    /// Stream state.
    pub stream: StreamState,
    /// `"evaluated"` or `"rules"`, when there is data.
    pub mode: Option<&'static str>,
    /// When upstream last confirmed the data (a 200/304, or an event on the stream).
    pub last_confirmed: Option<Timestamp>,
    /// Freshness of the data now.
    pub freshness: Freshness,
    /// The last failure, cleared by the next success.
    pub last_error: Option<UpstreamError>,
    /// Upstream rejected the server key (401) and has not accepted it since.
    pub key_rejected: bool,
    /// Until when nothing is sent upstream, as a `Retry-After` (or a rejected key) asks.
    pub hold_until: Option<Timestamp>,
    /// Counters since start.
    pub counters: UpstreamCounters,
}

/// The protocol machine. See the module docs for its behaviour.
#[derive(Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    store: SnapshotStore,
    breaker: CircuitBreaker,
    reconnect: ReconnectBackoff,
    jitter: Jitter,
    actions: VecDeque<Action>,
    next_id: u64,
    /// The ETag of upstream's last 200, sent as `If-None-Match`.
    upstream_etag: Option<String>,
    fetch: FetchSlot,
    /// A refetch was asked for while one was in flight: issue it when that one ends, so a burst
    /// of `flag-changed` events costs at most two requests.
    refetch_pending: bool,
    /// Next poll while the stream is down or streaming is off.
    poll_at: Option<Timestamp>,
    stream: StreamSlot,
    /// Rules arrived on the stream: the stream's evaluated-data events no longer apply.
    rules_active: bool,
    last_confirmed: Option<Timestamp>,
    last_error: Option<UpstreamError>,
    /// No request goes upstream before this (a `Retry-After`, or the slow probe of a rejected
    /// key).
    hold_until: Option<Timestamp>,
    /// The last answer was a 401 and nothing succeeded since.
    key_rejected: bool,
    /// Streamed values waiting for the refetch that brings their reasons (see
    /// [`Upstream::apply_streamed`]).
    held: Option<HeldChange>,
    /// Advances on every change signal from upstream (see [`Upstream::change_epoch`]).
    change_epoch: u64,
    /// A change signal arrived and has not settled yet ([`Upstream::settle_change`]).
    change_pending: bool,
    /// Forwarded POSTs of one kind wait until this (that kind's `Retry-After`), by
    /// [`SideRequest::index`].
    forward_holds: [Option<Timestamp>; 4],
    counters: UpstreamCounters,
}

/// A streamed change not yet published: it waits (until `until` at most) for the refetch
/// that brings its reasons, so the change becomes one revision instead of two.
#[derive(Debug)]
struct HeldChange {
    flags: EvaluatedFlags,
    until: Timestamp,
}

#[derive(Debug)]
enum FetchSlot {
    /// Nothing in flight, nothing scheduled.
    Idle,
    /// A request is in flight.
    InFlight { id: RequestId, retry: u32 },
    /// Waiting to (re)try: attempt number `retry` at `at` (a retry delay, or the breaker's
    /// reopen deadline).
    Waiting { at: Timestamp, retry: u32 },
}

#[derive(Debug)]
enum StreamSlot {
    Disabled,
    Down { reconnect_at: Option<Timestamp> },
    Connecting { id: StreamId, since: Timestamp },
    Open(Box<OpenStream>),
}

#[derive(Debug)]
struct OpenStream {
    id: StreamId,
    last_byte_at: Timestamp,
    decoder: Decoder,
    /// Whether this connection delivered an event yet (only then is it "healthy").
    delivered: bool,
}

impl Upstream {
    /// A machine that starts by fetching flags. Validate `config` first
    /// ([`UpstreamConfig::validate`]).
    pub fn new(config: UpstreamConfig, now: Timestamp) -> Self {
        let stream = if config.streaming {
            // Open the stream right away, in parallel with the initial fetch: the stream's
            // `init` event carries the same snapshot, and a slow fetch must not delay it.
            StreamSlot::Down {
                reconnect_at: Some(now),
            }
        } else {
            StreamSlot::Disabled
        };
        let mut machine = Self {
            breaker: CircuitBreaker::new(config.breaker.clone()),
            reconnect: ReconnectBackoff::new(config.reconnect.clone()),
            jitter: Jitter::new(config.jitter_seed),
            config,
            store: SnapshotStore::new(),
            actions: VecDeque::new(),
            next_id: 0,
            upstream_etag: None,
            fetch: FetchSlot::Idle,
            refetch_pending: false,
            poll_at: None,
            stream,
            rules_active: false,
            last_confirmed: None,
            last_error: None,
            hold_until: None,
            key_rejected: false,
            held: None,
            change_epoch: 0,
            change_pending: false,
            forward_holds: [None; 4],
            counters: UpstreamCounters::default(),
        };
        machine.request_fetch(now);
        machine.drive(now);
        machine
    }

    /// Restores a persisted snapshot (from disk or Durable Object storage) so clients are served
    /// at once, before upstream answers. Call right after [`Upstream::new`].
    ///
    /// The restored data counts as unconfirmed (stale) until upstream confirms it. Returns the
    /// persisted snapshot's revision.
    ///
    /// # Errors
    /// [`SnapshotError`] when the bytes are not a valid persisted snapshot; nothing changes.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<Revision, SnapshotError> {
        let (snapshot, etag) = Snapshot::from_persisted(bytes)?;
        // What storage holds until the next `Persist` (for the adapter's `PersistReport`).
        let revision = snapshot.revision();
        if let Some(snapshot) = self.store.restore(snapshot) {
            self.upstream_etag = etag;
            self.rules_active = false;
            self.actions.push_back(Action::Publish(snapshot));
        }
        Ok(revision)
    }

    /// The current snapshot, if any.
    pub fn snapshot(&self) -> Option<&Arc<Snapshot>> {
        self.store.current()
    }

    /// Breaker state, for metrics.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// A summary for health output.
    pub fn status(&self, now: Timestamp) -> UpstreamStatus {
        UpstreamStatus {
            breaker: self.breaker.stats(),
            stream: self.stream_state(),
            mode: self.store.current().map(|s| s.source().mode()),
            last_confirmed: self.last_confirmed,
            freshness: self.freshness(now),
            last_error: self.last_error.clone(),
            key_rejected: self.key_rejected,
            hold_until: self.held_until(now),
            counters: self.counters,
        }
    }

    /// The largest upstream body to read ([`UpstreamConfig::max_body_bytes`]).
    pub fn max_body_bytes(&self) -> usize {
        self.config.max_body_bytes
    }

    /// Freshness of the data now (see [`UpstreamConfig::stale_after`]).
    pub fn freshness(&self, now: Timestamp) -> Freshness {
        match (self.store.current(), self.last_confirmed) {
            (None, _) => Freshness::Missing,
            // Restored from storage and not confirmed yet.
            (Some(_), None) => Freshness::Stale,
            (Some(_), confirmed) => Freshness::classify(now, confirmed, self.config.stale_after),
        }
    }

    /// The stream's state.
    pub fn stream_state(&self) -> StreamState {
        match &self.stream {
            StreamSlot::Disabled => StreamState::Disabled,
            StreamSlot::Down { .. } => StreamState::Disconnected,
            StreamSlot::Connecting { .. } => StreamState::Connecting,
            StreamSlot::Open(_) => StreamState::Connected,
        }
    }

    /// Asks whether a request the adapter makes on its own (a per-user fetch in evaluated
    /// mode, a forwarded POST) may go to upstream now: not while a `Retry-After` (or the slow
    /// probe of a rejected key) holds requests back, nor while the breaker is open. Report its
    /// outcome with [`Upstream::record_side_request`] and, when upstream answered, its status
    /// and `Retry-After` with [`Upstream::record_side_response`].
    pub fn admit_side_request(&mut self, now: Timestamp) -> bool {
        self.held_until(now).is_none()
            && !matches!(self.breaker.check(now), Admission::Reject { .. })
    }

    /// Tells the machine what upstream answered to a side request: a 429/503 `Retry-After`
    /// then holds back every request (the machine's too), and a 401 marks the key rejected.
    pub fn record_side_response(&mut self, now: Timestamp, status: u16, retry_after: Option<&str>) {
        let what = "per-user flags request";
        if let Some(error) = self.note_refusal(now, what, status, retry_after) {
            self.last_error = Some(error);
        }
    }

    /// Like [`Upstream::admit_side_request`] for a forwarded POST of `kind` (events,
    /// telemetry, identify): also not while a `Retry-After` upstream sent to that kind holds
    /// it back ([`Upstream::record_forward_response`]).
    pub fn admit_forward(&mut self, now: Timestamp, kind: SideRequest) -> bool {
        self.forward_held_until(now, kind).is_none() && self.admit_side_request(now)
    }

    /// When forwarded POSTs of `kind` may go upstream again, if later than `now`.
    pub fn forward_held_until(&self, now: Timestamp, kind: SideRequest) -> Option<Timestamp> {
        self.forward_holds[kind.index()].filter(|&at| at > now)
    }

    /// Until when forwarded POSTs of `kind` are held back, if later than `now`: by a
    /// `Retry-After` on that kind, one on every request (or the slow probe of a rejected key),
    /// or the open breaker. What [`Upstream::admit_forward`] decides, without asking the
    /// breaker (so no probe is taken): the verdict handed to adapters that forward elsewhere
    /// ([`crate::forwards::ForwardGate::verdict`]).
    pub fn forward_blocked_until(&self, now: Timestamp, kind: SideRequest) -> Option<Timestamp> {
        let open = self.breaker.reopen_at().filter(|&at| at > now);
        [
            self.forward_held_until(now, kind),
            self.held_until(now),
            open,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Tells the machine what upstream answered to a forwarded POST of `kind` that was not a
    /// success: a 429/503 `Retry-After` pauses **that kind** until it has passed (at most
    /// [`MAX_RETRY_AFTER`]; flag fetches and the other kinds go on), a 401 marks the key
    /// rejected (as everywhere), and any other status (a 403 too) is an ordinary failure.
    pub fn record_forward_response(
        &mut self,
        now: Timestamp,
        kind: SideRequest,
        status: u16,
        retry_after: Option<&str>,
    ) {
        let what = "forwarded request";
        match status {
            401 => {
                if let Some(error) = self.note_refusal(now, what, status, None) {
                    self.last_error = Some(error);
                }
            }
            429 | 503 => {
                let Some(wait) = retry_after.and_then(|value| parse_retry_after(value, now)) else {
                    return;
                };
                let until = now.saturating_add(wait.min(MAX_RETRY_AFTER));
                let hold = &mut self.forward_holds[kind.index()];
                *hold = Some(hold.map_or(until, |at| at.max(until)));
            }
            _ => {}
        }
    }

    /// Records the outcome of a request admitted by [`Upstream::admit_side_request`].
    pub fn record_side_request(&mut self, now: Timestamp, outcome: Outcome) {
        self.breaker.record(now, outcome);
    }

    /// Upstream's change epoch: it advances on every change signal (a stream `init`, `flags`,
    /// `flag-changed` or `flag-update` event, and every publish), also when the anonymous flags
    /// did not change. In evaluated mode, per-user answers fetched before the epoch last
    /// advanced may be out of date: the adapter hands each new epoch to
    /// [`crate::downstream::Downstream::upstream_changed`] after draining actions.
    pub fn change_epoch(&self) -> u64 {
        self.change_epoch
    }

    /// The next action to perform, or `None` when there is nothing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Upstream::handle_timeout`] next. `None`: only inputs can make progress.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let fetch_at = match self.fetch {
            FetchSlot::Waiting { at, .. } => Some(at),
            FetchSlot::Idle | FetchSlot::InFlight { .. } => None,
        };
        let stream_at = match &self.stream {
            StreamSlot::Disabled => None,
            StreamSlot::Down { reconnect_at } => *reconnect_at,
            StreamSlot::Connecting { since, .. } => {
                Some(since.saturating_add(self.config.stream_idle_timeout))
            }
            StreamSlot::Open(open) => Some(
                open.last_byte_at
                    .saturating_add(self.config.stream_idle_timeout),
            ),
        };
        let held_at = self.held.as_ref().map(|held| held.until);
        [fetch_at, self.poll_at, stream_at, held_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Advances timers: retries, polls, reconnects and idle checks that are due at `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.held.as_ref().is_some_and(|held| held.until <= now) {
            // The refetch did not answer in time: the values must not wait any longer.
            self.release_held(now);
        }
        if let FetchSlot::Waiting { at, retry } = self.fetch
            && at <= now
        {
            self.fetch = FetchSlot::Idle;
            self.start_fetch(now, retry);
        }
        if self.poll_at.is_some_and(|at| at <= now) {
            self.poll_at = None;
            self.request_fetch(now);
        }
        match &self.stream {
            StreamSlot::Connecting { id, since }
                if now >= since.saturating_add(self.config.stream_idle_timeout) =>
            {
                let id = *id;
                self.actions.push_back(Action::CloseStream(id));
                self.stream_failed(
                    now,
                    UpstreamError::Transport {
                        what: "stream open",
                        reason: format!("no response within {:?}", self.config.stream_idle_timeout),
                    },
                    true,
                );
            }
            StreamSlot::Open(open)
                if now
                    >= open
                        .last_byte_at
                        .saturating_add(self.config.stream_idle_timeout) =>
            {
                let id = open.id;
                self.actions.push_back(Action::CloseStream(id));
                self.stream_failed(
                    now,
                    UpstreamError::Idle(self.config.stream_idle_timeout),
                    false,
                );
            }
            _ => {}
        }
        self.settle_change();
        self.drive(now);
    }

    /// Reports the result of [`Action::Fetch`] `id`.
    pub fn handle_fetch(&mut self, now: Timestamp, id: RequestId, result: FetchResult) {
        let FetchSlot::InFlight {
            id: in_flight,
            retry,
        } = self.fetch
        else {
            return;
        };
        if in_flight != id {
            return;
        }
        self.fetch = FetchSlot::Idle;
        match result {
            FetchResult::Response { status: 304, .. } => {
                self.counters.fetch_not_modified += 1;
                // Upstream's data is what we last fetched. Unless a refetch queued behind this
                // one may still bring a held change's reasons, the change goes out as it is.
                if !self.refetch_pending {
                    self.release_held(now);
                }
                self.fetch_succeeded(now);
            }
            FetchResult::Response {
                status: 200,
                etag,
                body,
                ..
            } => {
                match EvaluatedFlags::from_json(&body) {
                    Ok(flags) => {
                        self.counters.fetch_ok += 1;
                        self.upstream_etag = etag;
                        if self.rules_active && self.stream_delivering() {
                            // The live stream's rules are newer and richer than these values (the
                            // fetch may have been sent before `rules-full` arrived): keep them.
                        } else if self.held.as_ref().is_some_and(|held| {
                            held.flags.flags != flags.flags && self.refetch_pending
                        }) {
                            // This answer left before the held change happened; the refetch queued
                            // behind it brings the change's reasons.
                        } else {
                            // The answer to a held change (same values, with reasons) publishes it
                            // once. Otherwise, with the stream silent, fresh values are the newest
                            // information there is, also over rules the stream sent before it went
                            // down.
                            self.held = None;
                            self.rules_active = false;
                            self.apply(now, FlagSource::Evaluated(flags));
                        }
                        self.fetch_succeeded(now);
                    }
                    Err(error) => {
                        self.counters.malformed += 1;
                        // Retrying cannot fix bad content: one breaker failure, no retries.
                        self.fetch_failed(
                            now,
                            UpstreamError::Malformed {
                                what: "flags response",
                                reason: error.to_string(),
                            },
                            retry,
                            false,
                        );
                    }
                }
            }
            FetchResult::Response {
                status,
                retry_after,
                ..
            } => {
                let what = "flags request";
                match self.note_refusal(now, what, status, retry_after.as_deref()) {
                    // Upstream said when to come back (or the key is wrong): no quick retries.
                    Some(error) => self.fetch_failed(now, error, retry, false),
                    None => {
                        // 5xx and 429 are worth retrying; other statuses (403, 404, ...) are
                        // not.
                        let retryable = status >= 500 || status == 429;
                        self.fetch_failed(now, status_error(what, status), retry, retryable);
                    }
                }
            }
            FetchResult::TooLarge { status, limit } => {
                self.counters.malformed += 1;
                // The next attempt would be just as large: one breaker failure, no retries.
                self.fetch_failed(
                    now,
                    UpstreamError::Malformed {
                        what: "flags response",
                        reason: format!("{status} body larger than {limit} bytes"),
                    },
                    retry,
                    false,
                );
            }
            FetchResult::Transport(reason) => self.fetch_failed(
                now,
                UpstreamError::Transport {
                    what: "flags request",
                    reason,
                },
                retry,
                true,
            ),
        }
        self.settle_change();
        self.drive(now);
    }

    /// Reports the response head of [`Action::OpenStream`] `id`.
    /// `retry_after` is the response's `Retry-After` header, verbatim.
    pub fn handle_stream_opened(
        &mut self,
        now: Timestamp,
        id: StreamId,
        status: u16,
        is_event_stream: bool,
        retry_after: Option<&str>,
    ) {
        let StreamSlot::Connecting { id: connecting, .. } = self.stream else {
            return;
        };
        if connecting != id {
            return;
        }
        if status != 200 || !is_event_stream {
            self.actions.push_back(Action::CloseStream(id));
            let what = "stream request";
            let error = self
                .note_refusal(now, what, status, retry_after)
                .unwrap_or_else(|| status_error(what, status));
            self.stream_failed(now, error, true);
        } else {
            self.counters.stream_connects += 1;
            self.stream = StreamSlot::Open(Box::new(OpenStream {
                id,
                last_byte_at: now,
                decoder: Decoder::new(self.config.decoder_limits),
                delivered: false,
            }));
        }
        self.drive(now);
    }

    /// Reports body bytes of stream `id`.
    pub fn handle_stream_bytes(&mut self, now: Timestamp, id: StreamId, bytes: &[u8]) {
        let StreamSlot::Open(open) = &mut self.stream else {
            return;
        };
        if open.id != id {
            return;
        }
        open.last_byte_at = now;
        if let Err(error) = open.decoder.push(bytes) {
            self.actions.push_back(Action::CloseStream(id));
            self.counters.malformed += 1;
            self.stream_failed(now, UpstreamError::Decode(error), false);
            self.drive(now);
            return;
        }
        let mut events = Vec::new();
        while let Some(event) = open.decoder.next_event() {
            events.push(event);
        }
        if !events.is_empty() && !open.delivered {
            open.delivered = true;
            // A stream that delivers is healthy: reset the reconnect schedule and tell the
            // breaker (this is what closes it again after an outage).
            self.reconnect.reset();
            self.breaker.record(now, Outcome::Success);
            self.poll_at = None;
            self.last_error = None;
            self.key_rejected = false;
        }
        for event in events {
            self.counters.events += 1;
            self.last_confirmed = Some(now);
            self.handle_event(now, &event);
            // A snapshot's data was the decoder's line buffer: the next one reuses it.
            if let StreamSlot::Open(open) = &mut self.stream
                && open.id == id
            {
                open.decoder.recycle(event);
            }
        }
        self.settle_change();
        self.drive(now);
    }

    /// Reports that stream `id` ended.
    pub fn handle_stream_closed(&mut self, now: Timestamp, id: StreamId, end: StreamEnd) {
        let (current, connecting) = match &self.stream {
            StreamSlot::Connecting { id, .. } => (*id, true),
            StreamSlot::Open(open) => (open.id, false),
            StreamSlot::Disabled | StreamSlot::Down { .. } => return,
        };
        if current != id {
            return;
        }
        let error = match end {
            StreamEnd::Eof => UpstreamError::Transport {
                what: "stream",
                reason: "closed by upstream".to_owned(),
            },
            StreamEnd::Error(reason) => UpstreamError::Transport {
                what: if connecting {
                    "stream request"
                } else {
                    "stream"
                },
                reason,
            },
        };
        self.stream_failed(now, error, connecting);
        self.drive(now);
    }

    fn handle_event(&mut self, now: Timestamp, event: &SseEvent) {
        let carries_data = matches!(
            event.event.as_str(),
            "init" | "flags" | "flag-update" | "rules-full"
        );
        if carries_data && event.lossy {
            // The same bytes in a fetch body are rejected as invalid JSON: so are they here,
            // instead of acting on U+FFFD replacements.
            return self.malformed(event, "data is not valid UTF-8".to_owned());
        }
        if matches!(
            event.event.as_str(),
            "init" | "flags" | "flag-changed" | "flag-update"
        ) {
            // Any of these may mean a per-user answer changed, even when the anonymous flags
            // (and so the snapshot) stay as they are. The epoch advances once the change has
            // settled (published, or refetched unchanged): per-user answers refetched then go
            // out with the snapshot they belong to.
            self.change_pending = true;
        }
        match event.event.as_str() {
            "init" | "flags" => {
                if self.rules_active {
                    return;
                }
                match EvaluatedFlags::from_json(event.data.as_bytes()) {
                    Ok(flags) => self.apply_streamed(now, flags),
                    Err(error) => self.malformed(event, error.to_string()),
                }
            }
            "flag-changed" if !self.rules_active => self.request_fetch(now),
            "flag-update" => {
                if self.rules_active {
                    return;
                }
                #[derive(Deserialize)]
                struct FlagUpdate {
                    key: String,
                    enabled: bool,
                }
                let update = match serde_json::from_str::<FlagUpdate>(&event.data) {
                    Ok(update) => update,
                    Err(error) => return self.malformed(event, error.to_string()),
                };
                if let Err(error) = crate::model::FlagKey::parse(&update.key) {
                    return self.malformed(event, error.to_string());
                }
                if let Some(held) = self.held.as_mut() {
                    // Merge into the change still waiting for its reasons: still one publish.
                    held.flags.flags.insert(update.key.clone(), update.enabled);
                    held.flags.reasons.remove(&update.key);
                    return;
                }
                let Some(current) = self.store.current() else {
                    // Nothing to merge into yet: the full snapshot is on its way.
                    return self.request_fetch(now);
                };
                let mut flags = current.defaults().clone();
                flags.flags.insert(update.key.clone(), update.enabled);
                // The old reason no longer explains the new value. Unlike a full snapshot, a
                // single-flag merge exists to avoid a request, so none is made for the reason.
                flags.reasons.remove(&update.key);
                self.apply(now, FlagSource::Evaluated(flags));
            }
            "rules-full" => match FlagSource::rules_from_json(event.data.as_bytes()) {
                Ok(rules) => {
                    self.rules_active = true;
                    // Rules replace evaluated values, held ones too.
                    self.held = None;
                    self.apply(now, rules);
                }
                Err(error) => self.malformed(event, error.to_string()),
            },
            // `heartbeat` and events this version does not know: the bytes already proved the
            // stream alive, and the data must not touch the flags.
            _ => {}
        }
    }

    fn malformed(&mut self, event: &SseEvent, reason: String) {
        self.counters.malformed += 1;
        self.last_error = Some(UpstreamError::Malformed {
            what: if event.event == "rules-full" {
                "rules-full event"
            } else {
                "stream event"
            },
            reason,
        });
    }

    /// Applies evaluated flags that came over the stream. Stream events carry values only, no
    /// reasons (`init`/`flags` are `{"flags":{..}}`), yet SDKs asking with `withReasons=true`
    /// must get Rollgate's reasons: flags whose value did not change keep their reason. When
    /// values changed and reasons are missing, a conditional refetch brings them, and the
    /// change is **held** until it answers (at most [`REASONS_WAIT`]), then published once with
    /// its reasons. Publishing at once and again with the reasons made every change two
    /// revisions, and every SSE client got two frames for it (and two full snapshots after a
    /// resync); the wait costs one request's latency, bounded, and a failed or refused refetch
    /// releases the values at once.
    fn apply_streamed(&mut self, now: Timestamp, mut flags: EvaluatedFlags) {
        if flags.reasons.is_empty() {
            let previous = match (&self.held, self.store.current().map(|c| c.source())) {
                (Some(held), _) => Some(&held.flags),
                (None, Some(FlagSource::Evaluated(previous))) => Some(previous),
                (None, _) => None,
            };
            if let Some(previous) = previous {
                flags.reasons = flags
                    .flags
                    .iter()
                    .filter(|(key, value)| previous.flags.get(*key) == Some(*value))
                    .filter_map(|(key, _)| Some((key.clone(), previous.reasons.get(key)?.clone())))
                    .collect();
            }
        }
        let missing_reasons = flags.flags.len() != flags.reasons.len();
        let values_changed = !matches!(
            self.store.current().map(|c| c.source()),
            Some(FlagSource::Evaluated(current)) if current.flags == flags.flags
        );
        if !(missing_reasons && values_changed) {
            self.held = None;
            self.apply(now, FlagSource::Evaluated(flags));
            return;
        }
        self.last_confirmed = Some(now);
        let until = self
            .held
            .as_ref()
            .map_or_else(|| now.saturating_add(REASONS_WAIT), |held| held.until);
        self.held = Some(HeldChange { flags, until });
        self.request_fetch(now);
    }

    /// Advances the change epoch for a change signal once nothing about it is still in flight
    /// (no refetch running or queued, nothing held): the snapshot it leads to, if any, is
    /// published by then.
    fn settle_change(&mut self) {
        if self.change_pending
            && !self.refetch_pending
            && self.held.is_none()
            && matches!(self.fetch, FetchSlot::Idle)
        {
            self.change_pending = false;
            self.change_epoch += 1;
        }
    }

    /// Publishes a held change as it is (its reasons did not come).
    fn release_held(&mut self, now: Timestamp) {
        if let Some(held) = self.held.take() {
            self.apply(now, FlagSource::Evaluated(held.flags));
        }
    }

    /// What a refusal with `status` means beyond a failure: a 429/503 `Retry-After` holds
    /// every request back until it has passed, and a 401 marks the key rejected and holds
    /// requests back for `refresh_interval` (a slow probe). Returns the error to report, or
    /// `None` for an ordinary failure.
    fn note_refusal(
        &mut self,
        now: Timestamp,
        what: &'static str,
        status: u16,
        retry_after: Option<&str>,
    ) -> Option<UpstreamError> {
        let (wait, error) = match status {
            401 => {
                self.key_rejected = true;
                let probe = self.config.refresh_interval;
                (probe, UpstreamError::KeyRejected { what, probe })
            }
            429 | 503 => {
                let wait = parse_retry_after(retry_after?, now)?.min(MAX_RETRY_AFTER);
                (wait, UpstreamError::Throttled { what, status, wait })
            }
            _ => return None,
        };
        let until = now.saturating_add(wait);
        self.hold_until = Some(self.hold_until.map_or(until, |at| at.max(until)));
        Some(error)
    }

    /// When requests may go upstream again, if that is later than `now`.
    fn held_until(&self, now: Timestamp) -> Option<Timestamp> {
        self.hold_until.filter(|&at| at > now)
    }

    /// Publishes `source` if it changes the content, and persists it. Returns whether it did.
    fn apply(&mut self, now: Timestamp, source: FlagSource) -> bool {
        self.last_confirmed = Some(now);
        let Some(snapshot) = self.store.replace(now, source) else {
            return false;
        };
        self.change_epoch += 1;
        self.change_pending = false;
        // Publish first: clients wait on it; storage does not.
        let persisted = snapshot.to_persisted(self.upstream_etag.as_deref());
        let revision = snapshot.revision();
        self.actions.push_back(Action::Publish(snapshot));
        self.actions.push_back(Action::Persist {
            revision,
            bytes: persisted,
        });
        true
    }

    /// Asks for a (conditional) fetch: now, or after the one in flight.
    fn request_fetch(&mut self, now: Timestamp) {
        match self.fetch {
            FetchSlot::InFlight { .. } => self.refetch_pending = true,
            // Already scheduled (retry or breaker wait): that attempt will fetch fresh data.
            FetchSlot::Waiting { .. } => {}
            FetchSlot::Idle => self.start_fetch(now, 0),
        }
    }

    /// Issues attempt `retry` of a fetch, through the breaker on every attempt: a retry that
    /// comes due after the breaker opened (a stream failure can open it meanwhile) must not
    /// reach upstream either; it waits for the breaker as a new request.
    fn start_fetch(&mut self, now: Timestamp, retry: u32) {
        if let Some(until) = self.held_until(now) {
            // Upstream asked for quiet (Retry-After, or a rejected key's slow probe).
            self.fetch = FetchSlot::Waiting {
                at: until,
                retry: 0,
            };
            return;
        }
        if let Admission::Reject { until } = self.breaker.check(now) {
            self.counters.breaker_rejections += 1;
            self.fetch = FetchSlot::Waiting {
                at: until.max(now),
                retry: 0,
            };
            return;
        }
        let id = RequestId(self.next_id());
        self.fetch = FetchSlot::InFlight { id, retry };
        // Without data there is nothing a 304 could keep.
        let if_none_match = self
            .store
            .current()
            .and_then(|_| self.upstream_etag.clone());
        self.actions.push_back(Action::Fetch { id, if_none_match });
    }

    fn fetch_succeeded(&mut self, now: Timestamp) {
        self.last_confirmed = Some(now);
        self.last_error = None;
        self.key_rejected = false;
        self.breaker.record(now, Outcome::Success);
        if self.refetch_pending {
            self.refetch_pending = false;
            self.start_fetch(now, 0);
        }
    }

    fn fetch_failed(&mut self, now: Timestamp, error: UpstreamError, retry: u32, retryable: bool) {
        self.counters.fetch_errors += 1;
        self.last_error = Some(error);
        // A held change does not wait for retries: its values go out now.
        self.release_held(now);
        if retryable && retry < self.config.retry.max_retries {
            let delay = self.config.retry.delay(retry, self.jitter.next_sample());
            self.fetch = FetchSlot::Waiting {
                at: now.saturating_add(delay),
                retry: retry + 1,
            };
            return;
        }
        // Retries exhausted: one breaker failure for the whole logical request (SDK semantics).
        self.breaker.record(now, Outcome::Failure);
        // A pending refetch is answered by the next poll; there is no point asking again now.
        self.refetch_pending = false;
    }

    /// The stream is gone: schedule a reconnect; polling takes over meanwhile.
    fn stream_failed(&mut self, now: Timestamp, error: UpstreamError, open_failed: bool) {
        self.counters.stream_errors += 1;
        if open_failed {
            self.breaker.record(now, Outcome::Failure);
        }
        self.last_error = Some(error);
        let delay = self.reconnect.next_delay(self.jitter.next_sample());
        let at = now.saturating_add(delay);
        self.stream = StreamSlot::Down {
            reconnect_at: Some(self.held_until(now).map_or(at, |until| until.max(at))),
        };
    }

    /// Brings the schedule in line with the state: opens a due stream, (re)arms polling.
    fn drive(&mut self, now: Timestamp) {
        if let StreamSlot::Down {
            reconnect_at: Some(at),
        } = self.stream
            && at <= now
        {
            if let Some(until) = self.held_until(now) {
                self.stream = StreamSlot::Down {
                    reconnect_at: Some(until),
                };
            } else {
                self.open_stream_if_admitted(now);
            }
        }
        self.schedule_polls(now);
    }

    /// Opens the due stream unless the breaker refuses (then waits for it).
    fn open_stream_if_admitted(&mut self, now: Timestamp) {
        match self.breaker.check(now) {
            Admission::Reject { until } => {
                self.stream = StreamSlot::Down {
                    reconnect_at: Some(until.max(now)),
                };
            }
            Admission::Allow | Admission::Probe => {
                let id = StreamId(self.next_id());
                self.stream = StreamSlot::Connecting { id, since: now };
                self.actions.push_back(Action::OpenStream(id));
            }
        }
    }

    /// (Re)arms polling: quick probes while half-open, none while the stream delivers, else
    /// every `refresh_interval`.
    fn schedule_polls(&mut self, now: Timestamp) {
        let stream_delivering = self.stream_delivering();
        if self.breaker.state() == BreakerState::HalfOpen {
            // Recovering: confirm with quick conditional polls (cheap 304s) so the breaker
            // closes within seconds instead of waiting for the stream to happen to carry news.
            let probe_at = now.saturating_add(RECOVERY_POLL_INTERVAL);
            self.poll_at = Some(self.poll_at.map_or(probe_at, |at| at.min(probe_at)));
        } else if stream_delivering {
            self.poll_at = None;
        } else if self.poll_at.is_none() {
            self.poll_at = Some(now.saturating_add(self.config.refresh_interval));
        }
    }

    /// Whether the stream is open and has delivered an event (so it is the source of truth).
    fn stream_delivering(&self) -> bool {
        matches!(&self.stream, StreamSlot::Open(open) if open.delivered)
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The error for an answer with an unexpected `status`.
fn status_error(what: &'static str, status: u16) -> UpstreamError {
    if (300..400).contains(&status) {
        UpstreamError::Redirected { what, status }
    } else {
        UpstreamError::Status { what, status }
    }
}

/// How long a streamed change waits for the refetch that brings its reasons before it is
/// published without them.
pub const REASONS_WAIT: Duration = Duration::from_secs(2);

/// The longest `Retry-After` honoured: a larger (or far-future) value is cut to this, so a
/// wrong header cannot silence the proxy for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// [`UpstreamConfig::max_body_bytes`] by default: far above any real flag set, far below what
/// would hurt the process.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The smallest accepted [`UpstreamConfig::max_body_bytes`].
const MIN_BODY_BYTES: usize = 1024;

/// Parses a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`, IMF-fixdate) taken relative to `now`. A date in the past
/// is zero. `None` when the value is neither.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits to fit is "very long", which MAX_RETRY_AFTER cuts anyway.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at_ms = parse_imf_fixdate(value)?;
    Some(Duration::from_millis(at_ms.saturating_sub(now.as_millis())))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` → Unix milliseconds.
fn parse_imf_fixdate(value: &str) -> Option<u64> {
    let mut parts = value.split(' ');
    let weekday = parts.next()?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = parts.next()?;
    let year: u64 = parts.next()?.parse().ok()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || parts.next().is_some() || !weekday.ends_with(',') {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let mut hms = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    if year < 1970 {
        return Some(0);
    }
    // Days from the civil date (Howard Hinnant's algorithm), for years since 1970.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    secs.checked_mul(1000)
}

/// Poll interval while the breaker is half-open and recovery is being confirmed.
const RECOVERY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Shortest interval the machine accepts for polling and idle timeouts: below this, a
/// misconfiguration would hammer upstream.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests;
