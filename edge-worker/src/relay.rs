//! The relay Durable Object: one per environment, it owns core's `Upstream` machine (the single
//! upstream stream, fetches, alarms, the persisted snapshot) and core's `Downstream` (dispatch,
//! per-user cache, identities, metrics); it answers polling misses and feeds the SSE shards.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_channel::oneshot;
use futures_util::StreamExt;
use futures_util::future::{Either, select};
use rollgate_proxy_core::api::{ApiError, Route};
use rollgate_proxy_core::breaker::Outcome;
use rollgate_proxy_core::downstream::{Answer, Downstream, MetricsExtra, SourceReport};
use rollgate_proxy_core::forwards::REPORT_GRACE;
use rollgate_proxy_core::metrics::{
    MAX_SIDE_REQUESTS_IN_FLIGHT, PersistReport, SideOutcome, SideRequest,
};
use rollgate_proxy_core::model::EvaluatedFlags;
use rollgate_proxy_core::reports::RestartingCounters;
use rollgate_proxy_core::snapshot::{FlagSource, Freshness, Revision, Snapshot, SnapshotStore};
use rollgate_proxy_core::sse::encode::KEEPALIVE;
use rollgate_proxy_core::stream::StreamKind;
use rollgate_proxy_core::time::Timestamp;
use rollgate_proxy_core::upstream::{
    Action, FetchResult, RequestId, StreamEnd, StreamId, Upstream,
};
use rollgate_proxy_core::users::{FetchTicket, Lookup, UserFlags};
use worker::{
    AbortController, Delay, Env, Fetch, Headers, Method, Request, Response, State, console_error,
    console_log, durable_object,
};

use wasm_bindgen::{JsCast, JsValue};

use crate::config::EdgeConfig;
use crate::fanout::{Outlet, js_bytes, yield_to_runtime};
use crate::http::{self, EVENT_ID_HEADER, Incoming, now};
use crate::shard::sockets;
use crate::tally::{self, Tally, Verdict};

mod identify;
pub(crate) mod refresh;

/// Storage key of the persisted snapshot.
const SNAPSHOT_KEY: &str = "snapshot";
/// Storage key of the shards holding WebSocket clients (pushed to on every publish).
const SOCKET_SHARDS_KEY: &str = "socket-shards";
/// Storage key of the environment's name (several environments), for alarms without a request.
const ENVIRONMENT_KEY: &str = "environment";
/// Most outcomes of one kind a report records in the breaker (its thresholds are far lower).
const BREAKER_RECORDS: u64 = 1000;
/// SSE event name of the internal relay → shard stream.
pub(crate) const SNAPSHOT_EVENT: &str = "snapshot";

/// The relay object (fetch and alarm handlers only: no `connect` or WebSocket glue in the wasm).
#[durable_object(alarm)]
pub struct Relay {
    inner: Rc<Inner>,
}

struct Inner {
    state: State,
    /// The runtime's storage object, for writes the bindings have no options for.
    storage: Option<JsValue>,
    env: Env,
    core: RefCell<Core>,
}

#[derive(Default)]
struct Core {
    started: bool,
    config: Option<Rc<EdgeConfig>>,
    /// `None` in local mode.
    upstream: Option<Upstream>,
    /// Local mode's snapshot (upstream mode reads the machine's).
    local: Option<Arc<Snapshot>>,
    /// Internal streams of the shard objects (each holds only the newest snapshot frame).
    subscribers: Vec<Outlet>,
    /// Shards holding WebSocket clients: they hibernate and hold no internal stream, so every
    /// publish and refreshed answer is pushed to them (`shard/sockets.rs`). Persisted.
    socket_shards: BTreeSet<u32>,
    /// Registrations so far per socket shard (at most one entry per configured shard): a
    /// shard's 410 to a push drops it only if it did not register again while that push was
    /// under way (its new socket would miss every later push).
    socket_registrations: BTreeMap<u32, u64>,
    /// Notifications dropped on the shards' streams so far, as last logged.
    notifications_dropped: u64,
    /// Open upstream streams, to abort on `CloseStream`.
    streams: HashMap<StreamId, AbortController>,
    /// The alarm currently set (unix ms).
    alarm_at: Option<u64>,
    /// Core's downstream of this environment (set at start).
    downstream: Option<Rc<Downstream>>,
    /// SSE clients per shard and stream kind, as the shards last reported.
    shard_reports: BTreeMap<u32, ShardReport>,
    /// The shards' counters (made with the configured shard count, on the first report).
    shard_counters: Option<ShardCounters>,
    /// Bumped by every `/identify`: part of the edge cache key, so cached answers that did not
    /// see the new attributes are not served after one pointer TTL.
    identity_epoch: u64,
    /// Evaluated mode: the requests waiting for a per-user fetch, by fetch.
    user_waiters: HashMap<FetchTicket, Vec<oneshot::Sender<UserFlags>>>,
    /// Requests outside the machine in flight, per kind (bounded by core).
    side_in_flight: [usize; 4],
    /// A timer for core's next per-user refresh is pending.
    refresh_timer: bool,
    /// The newest snapshot to persist (its revision and a JS string), not written yet: a newer
    /// one replaces it.
    persist_pending: Option<(Revision, JsValue)>,
    /// A write of `persist_pending` is scheduled or under way.
    persist_writer: bool,
    /// What the writes did (for `/api/metrics`).
    persisted: PersistReport,
    /// `/identify` forwards in flight per user (forwarded by the fronts), and the fetches
    /// waiting for them.
    identifies: HashMap<String, (usize, Vec<oneshot::Sender<()>>)>,
    /// The open identify gates, by token: the user each is for.
    identify_gates: HashMap<u64, String>,
    /// The last identify gate token handed out.
    identify_token: u64,
    /// Requests this object served, by route label or internal path (a Worker-only metric:
    /// what reaches the one object per environment).
    requests: BTreeMap<&'static str, u64>,
}

/// What one shard last reported: its clients per stream kind (a gauge: the latest report
/// stands, also for a shard that hibernated with its sockets open).
#[derive(Clone, Copy, Debug, Default)]
struct ShardReport {
    clients: [u64; 3],
    /// The shard's wasm memory in bytes.
    wasm_memory: u64,
}

/// The shards' counters summed across their restarts: frames sent per stream kind, then
/// WebSocket connects refused because the shard was full.
type ShardCounters = RestartingCounters<4>;
/// Index of the refused-connects counter in [`ShardCounters`].
const REFUSED: usize = 3;

impl Core {
    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        match &self.upstream {
            Some(upstream) => upstream.snapshot().cloned(),
            None => self.local.clone(),
        }
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

impl worker::DurableObject for Relay {
    fn new(state: State, env: Env) -> Self {
        let raw = state._inner();
        let storage = raw.storage().ok().map(JsValue::from);
        Self {
            inner: Rc::new(Inner {
                state: State::from(raw),
                storage,
                env,
                core: RefCell::new(Core::default()),
            }),
        }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        let inner = Rc::clone(&self.inner);
        let environment = req.headers().get(http::ENVIRONMENT_HEADER)?;
        if let Err(error) = start(&inner, environment).await {
            console_error!("relay start failed: {error}");
            return http::internal();
        }
        handle(&inner, req).await
    }

    async fn alarm(&self) -> worker::Result<Response> {
        let inner = Rc::clone(&self.inner);
        start(&inner, None).await?;
        inner.core.borrow_mut().alarm_at = None;
        let at = now();
        if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
            upstream.handle_timeout(at);
        }
        drive(&inner);
        Response::ok("ok")
    }
}

/// Loads the configuration and the persisted snapshot, and starts the machine, once per
/// instance (a restarted or evicted object serves the stored snapshot at once).
async fn start(inner: &Rc<Inner>, environment: Option<String>) -> worker::Result<()> {
    if inner.core.borrow().started {
        return Ok(());
    }
    // Several environments: the front names this object's environment; an alarm after an
    // eviction reads the name stored by the first request.
    let environment = match environment {
        Some(name) => {
            inner.state.storage().put(ENVIRONMENT_KEY, &name).await?;
            Some(name)
        }
        None => inner
            .state
            .storage()
            .get(ENVIRONMENT_KEY)
            .await
            .unwrap_or(None),
    };
    let config = crate::entry::load_config_for(&inner.env, environment.as_deref())
        .map_err(|e| worker::Error::RustError(e.to_string()))?;
    let persisted: Option<String> = if config.core.api_key.is_some() {
        inner
            .state
            .storage()
            .get(SNAPSHOT_KEY)
            .await
            .unwrap_or(None)
    } else {
        None
    };
    // A comma-separated list (a string, like the other keys: no other serializer linked).
    let socket_shards: Vec<u32> = inner
        .state
        .storage()
        .get::<String>(SOCKET_SHARDS_KEY)
        .await
        .unwrap_or(None)
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    let mut core = inner.core.borrow_mut();
    if core.started {
        return Ok(());
    }
    core.started = true;
    core.socket_shards.extend(socket_shards);
    let at = now();
    if config.core.api_key.is_some() {
        let mut upstream = Upstream::new(config.core.upstream.clone(), at);
        if let Some(bytes) = persisted {
            match upstream.restore(bytes.as_bytes()) {
                Ok(revision) => {
                    core.persisted.revision = revision.get();
                    console_log!("relay: restored the persisted snapshot");
                }
                Err(error) => console_error!("relay: ignoring the persisted snapshot: {error}"),
            }
        }
        core.upstream = Some(upstream);
        console_log!("relay: upstream mode, {}", config.core.base_url);
    } else {
        let rules = FlagSource::rules_from_json(crate::LOCAL_FLAGS.as_bytes())
            .map_err(|e| worker::Error::RustError(e.to_string()))?;
        core.local = SnapshotStore::new().replace(at, rules);
        console_log!("relay: local mode, serving examples/flags.json (no ROLLGATE_API_KEY)");
    }
    core.downstream = Some(Rc::new(Downstream::new(config.core.clone())));
    core.config = Some(Rc::new(config));
    drop(core);
    drive(inner);
    wasm_bindgen_futures::spawn_local(keepalive_loop(Rc::clone(inner)));
    Ok(())
}

fn config_of(inner: &Inner) -> Option<Rc<EdgeConfig>> {
    inner.core.borrow().config.clone()
}

/// Executes the machine's actions until it has none, then arms the alarm for its next deadline.
fn drive(inner: &Rc<Inner>) {
    loop {
        // The borrow ends with this statement: nothing below holds it across an await.
        let action = inner
            .core
            .borrow_mut()
            .upstream
            .as_mut()
            .and_then(Upstream::poll_action);
        let Some(action) = action else { break };
        match action {
            Action::Fetch { id, if_none_match } => {
                wasm_bindgen_futures::spawn_local(fetch_flags(Rc::clone(inner), id, if_none_match));
            }
            Action::OpenStream(id) => {
                let controller = AbortController::default();
                let signal = controller.signal();
                inner.core.borrow_mut().streams.insert(id, controller);
                wasm_bindgen_futures::spawn_local(pump_stream(Rc::clone(inner), id, signal));
            }
            Action::CloseStream(id) => {
                if let Some(controller) = inner.core.borrow_mut().streams.remove(&id) {
                    controller.abort();
                }
            }
            Action::Persist { revision, bytes } => {
                // Made a JS string here and the bytes dropped (core writes UTF-8, so borrowed):
                // the wasm copy is not held until the storage write.
                let text = JsValue::from_str(&String::from_utf8_lossy(&bytes));
                drop(bytes);
                persist_later(inner, revision, text);
            }
            Action::Publish(snapshot) => {
                let frame = snapshot_frame(&snapshot);
                broadcast(inner, &frame);
                push_to_sockets(inner, frame);
            }
        }
    }
    let (deadline, armed) = {
        let core = inner.core.borrow();
        (
            core.upstream.as_ref().and_then(Upstream::poll_timeout),
            core.alarm_at,
        )
    };
    refresh::after_drive(inner);
    // Re-armed only for an earlier deadline: the stream's idle deadline moves with every chunk
    // received, and a `setAlarm` per chunk (hundreds for one large rules event) was a large
    // share of a change's time. An alarm that fires before the deadline is harmless: core
    // does what is due, and the drive after it arms the then-current deadline.
    if let Some(deadline) = deadline
        && armed.is_none_or(|at| deadline.as_millis() < at)
    {
        inner.core.borrow_mut().alarm_at = Some(deadline.as_millis());
        let offset = deadline.as_millis().saturating_sub(now().as_millis());
        let inner = Rc::clone(inner);
        wasm_bindgen_futures::spawn_local(async move {
            let offset = i64::try_from(offset).unwrap_or(i64::MAX);
            if let Err(error) = inner.state.storage().set_alarm(offset).await {
                console_error!("relay: set_alarm failed: {error}");
            }
        });
    }
}

/// Writes snapshot `text` to storage in a later turn than the publish the same change makes,
/// and only the newest of those that came in meanwhile (as the native proxy's persister
/// does). Written in the publish's own turn, the write held the change on its way to the
/// shards even with `allowUnconfirmed`: upstream → client p50 9.3–12.6 ms then, 5.9–11.5 ms
/// now (median of eleven runs 7.2; `BENCHMARKS.md`, "Change latency: the floor under it, and
/// the snapshot write").
fn persist_later(inner: &Rc<Inner>, revision: Revision, text: JsValue) {
    let start = {
        let mut core = inner.core.borrow_mut();
        core.persist_pending = Some((revision, text));
        !std::mem::replace(&mut core.persist_writer, true)
    };
    if !start {
        return;
    }
    let inner = Rc::clone(inner);
    wasm_bindgen_futures::spawn_local(async move {
        // Ends once no newer snapshot came in during a write (each write takes the newest).
        loop {
            yield_to_runtime().await;
            let Some((revision, text)) = inner.core.borrow_mut().persist_pending.take() else {
                break;
            };
            match put_unconfirmed(&inner, SNAPSHOT_KEY, text).await {
                Ok(()) => inner.core.borrow_mut().persisted.revision = revision.get(),
                Err(error) => {
                    inner.core.borrow_mut().persisted.failures += 1;
                    console_error!("relay: persisting the snapshot failed: {error}");
                }
            }
        }
        inner.core.borrow_mut().persist_writer = false;
    });
}

/// Writes `value` under `key` with `allowUnconfirmed`: by default the runtime holds every
/// message the object sends (here: the new snapshot's frames to the shards) until the write
/// is on disk, which put the storage's write latency into every change's delivery. The
/// persisted snapshot only speeds up a restart: one lost with the machine leaves an older
/// one, which the shards refuse (revisions only move forward) until upstream's next.
async fn put_unconfirmed(inner: &Inner, key: &str, value: JsValue) -> worker::Result<()> {
    let Some(storage) = &inner.storage else {
        return inner.state.storage().put_raw(key, value).await;
    };
    let options = js_sys::Object::new();
    js_sys::Reflect::set(&options, &"allowUnconfirmed".into(), &JsValue::TRUE)?;
    let put: js_sys::Function = js_sys::Reflect::get(storage, &"put".into())?.dyn_into()?;
    let promise: js_sys::Promise = put
        .call3(storage, &key.into(), &value, &options)?
        .dyn_into()?;
    wasm_bindgen_futures::JsFuture::from(promise).await?;
    Ok(())
}

/// The internal frame carrying a snapshot to the shards: its anonymous answer and content hash
/// (a shard serves anonymous frames and asks the relay for per-user answers), so that a shard
/// rebuilds it without parsing, compiling or hashing the rules.
fn snapshot_frame(snapshot: &Snapshot) -> Bytes {
    snapshot.shared_anonymous_frame(SNAPSHOT_EVENT)
}

/// Hands every shard one JS copy of a snapshot `frame` (a shard that has not taken the
/// previous one yet gets only this newest one).
fn broadcast(inner: &Inner, frame: &[u8]) {
    let js = js_bytes(frame);
    inner
        .core
        .borrow_mut()
        .subscribers
        .retain(|outlet| outlet.offer(&js));
}

/// Pushes an internal-stream `frame` (a publish or a user's refreshed answer) to every shard
/// holding WebSocket clients, one request each (it wakes a hibernated shard); a shard without
/// sockets left answers 410 and is dropped from the set.
fn push_to_sockets(inner: &Rc<Inner>, frame: Bytes) {
    let (shards, config) = {
        let core = inner.core.borrow();
        (
            core.socket_shards.iter().copied().collect::<Vec<_>>(),
            core.config.clone(),
        )
    };
    let Some(config) = config else { return };
    for index in shards {
        let registrations = inner
            .core
            .borrow()
            .socket_registrations
            .get(&index)
            .copied();
        let (inner, config, frame) = (Rc::clone(inner), Rc::clone(&config), frame.clone());
        wasm_bindgen_futures::spawn_local(async move {
            let mut headers = vec![(http::SHARD_HEADER, index.to_string())];
            if config.environments.is_some() {
                headers.push((http::ENVIRONMENT_HEADER, config.environment.clone()));
            }
            let pushed = async {
                let request =
                    http::internal_request(Method::Post, sockets::PUSH_PATH, &headers, &frame)?;
                inner
                    .env
                    .durable_object("SSE_SHARD")?
                    .id_from_name(&config.shard_name(index))?
                    .get_stub()?
                    .fetch_with_request(request)
                    .await
            }
            .await;
            match pushed {
                Ok(response) if response.status_code() == sockets::NO_SOCKETS => {
                    // A registration meanwhile may be this shard's new socket: kept, and the
                    // next push asks again.
                    let removed = {
                        let mut core = inner.core.borrow_mut();
                        core.socket_registrations.get(&index).copied() == registrations
                            && core.socket_shards.remove(&index)
                    };
                    if removed {
                        persist_socket_shards(&inner).await;
                    }
                }
                Ok(_) => {}
                Err(error) => console_error!("relay: push to shard {index} failed: {error}"),
            }
        });
    }
}

async fn persist_socket_shards(inner: &Inner) {
    let shards: Vec<String> = inner
        .core
        .borrow()
        .socket_shards
        .iter()
        .map(u32::to_string)
        .collect();
    if let Err(error) = inner
        .state
        .storage()
        .put(SOCKET_SHARDS_KEY, shards.join(","))
        .await
    {
        console_error!("relay: persisting the WebSocket shards failed: {error}");
    }
}

/// `?shard=N` from a shard that accepted WebSocket clients: pushed to from now on; answered
/// with the current snapshot's internal frame (204 before the first snapshot).
async fn register_sockets(inner: &Rc<Inner>, query: &str) -> worker::Result<Response> {
    let shard = form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "shard")
        .and_then(|(_, value)| value.parse::<u32>().ok());
    let shards = config_of(inner).map_or(1, |c| c.sse_shards);
    if let Some(shard) = shard.filter(|s| *s < shards) {
        let added = {
            let mut core = inner.core.borrow_mut();
            *core.socket_registrations.entry(shard).or_default() += 1;
            core.socket_shards.insert(shard)
        };
        if added {
            persist_socket_shards(inner).await;
        }
    }
    let snapshot = inner.core.borrow().snapshot();
    match snapshot {
        Some(snapshot) => Response::from_bytes(snapshot_frame(&snapshot).to_vec()),
        None => Ok(Response::empty()?.with_status(204)),
    }
}

/// Hands every shard one JS copy of a notification `event` (queued, in order, bounded), and
/// pushes it to the shards holding WebSocket clients.
fn notify(inner: &Rc<Inner>, event: &[u8]) {
    push_to_sockets(inner, Bytes::copy_from_slice(event));
    let js = js_bytes(event);
    let mut core = inner.core.borrow_mut();
    core.subscribers.retain(|outlet| outlet.push(&js));
    let dropped: u64 = core.subscribers.iter().map(Outlet::dropped).sum();
    if dropped > core.notifications_dropped {
        console_error!("relay: {dropped} notifications dropped for shards that stopped reading");
        core.notifications_dropped = dropped;
    }
}

/// Comments on the internal streams: they find shard streams that went away.
async fn keepalive_loop(inner: Rc<Inner>) {
    let comment = js_bytes(KEEPALIVE);
    loop {
        let period = config_of(&inner).map_or(Duration::from_secs(4), |c| c.core.sdk_keepalive);
        Delay::from(period).await;
        inner
            .core
            .borrow_mut()
            .subscribers
            .retain(|outlet| outlet.keepalive(&comment));
    }
}

fn upstream_headers(config: &EdgeConfig, accept: &str) -> worker::Result<Headers> {
    let headers = Headers::new();
    if let Some(key) = &config.core.api_key {
        headers.set("authorization", &format!("Bearer {}", key.expose()))?;
    }
    headers.set("accept", accept)?;
    Ok(headers)
}

/// Why a flags request gave no usable answer.
enum GetError {
    Worker(worker::Error),
    TooLarge(u16),
}

impl From<worker::Error> for GetError {
    fn from(error: worker::Error) -> Self {
        Self::Worker(error)
    }
}

/// One `GET /api/v1/sdk/flags` (for the machine, or for one user with `user_id`).
async fn get_flags(
    config: &EdgeConfig,
    user_id: Option<&str>,
    if_none_match: Option<&str>,
) -> FetchResult {
    let mut url = format!("{}/api/v1/sdk/flags?withReasons=true", config.core.base_url);
    if let Some(user) = user_id {
        url.push_str("&user_id=");
        url.push_str(&String::from(js_sys::encode_uri_component(user)));
    }
    let secret = config.core.api_key.as_ref().map_or("", |k| k.expose());
    let request = (|| {
        let headers = upstream_headers(config, "application/json")?;
        if let Some(etag) = if_none_match {
            headers.set("if-none-match", etag)?;
        }
        // A 3xx is a failed request: following it would send the key wherever it points.
        http::new_request(&url, &Method::Get, &headers, http::Redirect::Manual, None)
    })();
    let request = match request {
        Ok(request) => request,
        Err(error) => return FetchResult::Transport(http::redact(&error.to_string(), secret)),
    };
    let controller = AbortController::default();
    let signal = controller.signal();
    let limit = config.core.upstream.max_body_bytes;
    let call = async {
        let mut response = Fetch::Request(request).send_with_signal(&signal).await?;
        let status = response.status_code();
        let etag = response.headers().get("etag")?;
        let retry_after = response.headers().get("retry-after")?;
        let body = read_capped(&mut response, limit)
            .await?
            .ok_or(GetError::TooLarge(status))?;
        Ok::<_, GetError>((status, etag, retry_after, body))
    };
    let timeout = config.core.upstream_timeout;
    match http::with_timeout(call, controller, timeout).await {
        Some(Ok((status, etag, retry_after, body))) => FetchResult::Response {
            status,
            etag,
            body,
            retry_after,
        },
        Some(Err(GetError::TooLarge(status))) => FetchResult::TooLarge { status, limit },
        Some(Err(GetError::Worker(error))) => {
            FetchResult::Transport(http::redact(&error.to_string(), secret))
        }
        None => FetchResult::Transport(format!("no answer within {timeout:?}")),
    }
}

/// Reads `response`'s body chunk by chunk; `None` as soon as it would pass `limit` bytes (a
/// declared `Content-Length` over it is refused before any byte is read).
async fn read_capped(response: &mut Response, limit: usize) -> worker::Result<Option<Bytes>> {
    let declared = response
        .headers()
        .get("content-length")?
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Ok(None);
    }
    if response.status_code() == 304 || (300..400).contains(&response.status_code()) {
        // No body worth reading (and a manual redirect's may not be readable).
        return Ok(Some(Bytes::new()));
    }
    let mut body = Vec::new();
    let mut stream = response.stream()?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(Bytes::from(body)))
}

async fn fetch_flags(inner: Rc<Inner>, id: RequestId, if_none_match: Option<String>) {
    let Some(config) = config_of(&inner) else {
        return;
    };
    let result = get_flags(&config, None, if_none_match.as_deref()).await;
    if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
        upstream.handle_fetch(now(), id, result);
    }
    drive(&inner);
}

/// Holds the upstream stream `id`: reports its head, feeds every chunk to the machine as it
/// arrives, and reports its end. `CloseStream` aborts it through `signal`.
async fn pump_stream(inner: Rc<Inner>, id: StreamId, signal: worker::AbortSignal) {
    let Some(config) = config_of(&inner) else {
        return;
    };
    let secret = config
        .core
        .api_key
        .as_ref()
        .map_or("", |k| k.expose())
        .to_owned();
    let report_end = |end: StreamEnd| {
        if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
            upstream.handle_stream_closed(now(), id, end);
        }
        inner.core.borrow_mut().streams.remove(&id);
        drive(&inner);
    };
    // The key goes in the Authorization header: Workers traces and logs record subrequest
    // URLs, so `?token=` only when the operator opted in for an upstream that needs it.
    let mut url = format!("{}/api/v1/sdk/stream", config.core.base_url);
    if config.stream_token_in_url {
        url.push_str("?token=");
        url.push_str(&String::from(js_sys::encode_uri_component(&secret)));
    }
    let request = upstream_headers(&config, "text/event-stream").and_then(|headers| {
        http::new_request(&url, &Method::Get, &headers, http::Redirect::Manual, None)
    });
    let response = match request {
        Ok(request) => Fetch::Request(request).send_with_signal(&signal).await,
        Err(error) => Err(error),
    };
    let mut response = match response {
        Ok(response) => response,
        Err(error) => {
            if !signal.aborted() {
                report_end(StreamEnd::Error(http::redact(&error.to_string(), &secret)));
            }
            return;
        }
    };
    let status = response.status_code();
    let is_event_stream = response
        .headers()
        .get("content-type")
        .ok()
        .flatten()
        .is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
    let retry_after = response.headers().get("retry-after").ok().flatten();
    if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
        upstream.handle_stream_opened(now(), id, status, is_event_stream, retry_after.as_deref());
    }
    drive(&inner);
    if status != 200 || !is_event_stream {
        inner.core.borrow_mut().streams.remove(&id);
        return;
    }
    let mut body = match response.stream() {
        Ok(body) => body,
        Err(error) => {
            report_end(StreamEnd::Error(http::redact(&error.to_string(), &secret)));
            return;
        }
    };
    while let Some(chunk) = body.next().await {
        if signal.aborted() {
            return;
        }
        match chunk {
            Ok(bytes) => {
                if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
                    upstream.handle_stream_bytes(now(), id, &bytes);
                }
                drive(&inner);
            }
            Err(error) => {
                report_end(StreamEnd::Error(http::redact(&error.to_string(), &secret)));
                return;
            }
        }
    }
    if !signal.aborted() {
        report_end(StreamEnd::Eof);
    }
}

fn downstream_of(inner: &Inner) -> Option<Rc<Downstream>> {
    inner.core.borrow().downstream.clone()
}

async fn handle(inner: &Rc<Inner>, mut req: Request) -> worker::Result<Response> {
    let incoming = Incoming::read(&req)?;
    count_request(inner, &incoming);
    match incoming.path.as_str() {
        crate::forward::REPORT_PATH => {
            let body = req.text().await.unwrap_or_default();
            return forwards_report(inner, &body);
        }
        "/__rollgate/subscribe" => return subscribe(inner),
        sockets::REGISTER_PATH => return register_sockets(inner, &incoming.query).await,
        "/__rollgate/shard-clients" => {
            shard_report(inner, &incoming.query);
            return Response::ok("ok");
        }
        crate::local::SNAPSHOT_PATH => return snapshot_check(inner, &incoming.query),
        "/__rollgate/user-streams-closed" => {
            refresh::streams_closed(inner, &incoming.query);
            return Response::ok("ok");
        }
        _ => {}
    }
    let (Some(config), Some(downstream)) = (config_of(inner), downstream_of(inner)) else {
        return http::internal();
    };
    let stream_header = req.headers().get(refresh::STREAM_HEADER).ok().flatten();
    let body = Bytes::from(req.bytes().await.unwrap_or_default());
    let request = incoming.request(&body);
    let route = Route::parse(&incoming.method, &incoming.path).ok();
    let snapshot = inner.core.borrow().snapshot();
    let mut forward_token = None;
    let answer = downstream.handle(
        now(),
        &request,
        snapshot.as_ref(),
        freshness(inner),
        http::random_unit(),
    );
    let response = match answer {
        Answer::Respond(response) => response,
        Answer::NeedUserFlags(pending) => {
            let flags =
                match refresh::shard_request(&downstream, &pending, stream_header.as_deref()) {
                    Some(flags) => flags,
                    None => user_flags(inner, &config, pending.user_id(), pending.revision()).await,
                };
            downstream.finish(pending, &flags)
        }
        Answer::Forward(forward) => {
            // The front forwards it (`forward.rs`); an identify's gate holds that user's next
            // fetch until the front reports the forward ended.
            forward_token = Some(match (forward.kind, &forward.user_id) {
                (SideRequest::Identify, Some(user)) => {
                    identify::begin(inner, user, config.core.upstream_timeout)
                }
                _ => 0,
            });
            forward.response
        }
        Answer::Health => downstream.health(
            now(),
            snapshot.as_deref(),
            &report(inner),
            config.core.api_key.as_ref(),
        ),
        // Nothing is buffered (the fronts forward at once): nothing dropped.
        Answer::Metrics => {
            let shard_clients = inner
                .core
                .borrow()
                .shard_reports
                .iter()
                .map(|(shard, report)| (*shard, report.clients.iter().sum()))
                .collect();
            let refused = inner
                .core
                .borrow()
                .shard_counters
                .as_ref()
                .map_or(0, |counters| counters.totals()[REFUSED]);
            let mut metrics = downstream.metrics(
                now(),
                snapshot.as_deref(),
                &report(inner),
                MetricsExtra {
                    shard_clients,
                    sockets_refused: refused,
                    // Upstream mode persists every snapshot; local mode reads its file.
                    persisted: {
                        let core = inner.core.borrow();
                        core.upstream.is_some().then_some(core.persisted)
                    },
                    ..MetricsExtra::default()
                },
            );
            // Only when asked (`/api/metrics?objects`): the plain scrape has exactly the native
            // server's families (the parity scenario compares them).
            if form_urlencoded::parse(incoming.query.as_bytes()).any(|(name, _)| name == "objects")
            {
                let mut text = metrics.body.to_vec();
                text.extend_from_slice(object_families(inner).as_bytes());
                metrics.body = Bytes::from(text);
            }
            metrics
        }
        // The Worker sends streams to the shards, never here.
        Answer::Stream { .. } => ApiError::not_found(&incoming.path).into(),
    };
    if route == Some(Route::SdkIdentify) && response.status == 200 {
        inner.core.borrow_mut().identity_epoch += 1;
    }
    let polling = route.as_ref().is_some_and(Route::is_polling);
    // The edge cache keys answers by this: the snapshot, the `/identify` epoch, since stored
    // attributes change answers without a new snapshot, and upstream's change epoch, since a
    // targeting change alters per-user answers without one too.
    let (epoch, changes) = {
        let core = inner.core.borrow();
        let changes = core.upstream.as_ref().map_or(0, Upstream::change_epoch);
        (core.identity_epoch, changes)
    };
    let event_id = snapshot
        .filter(|_| polling)
        .map(|s| format!("{}~{epoch}~{changes}", s.event_id()));
    let mut response = http::to_response(response)?;
    if let Some(event_id) = event_id {
        response.headers_mut().set(EVENT_ID_HEADER, &event_id)?;
    }
    if let Some(token) = forward_token {
        response
            .headers_mut()
            .set(crate::forward::FORWARD_HEADER, &token.to_string())?;
    }
    Ok(response)
}

/// Counts a request in `rollgate_proxy_relay_requests_total`.
fn count_request(inner: &Inner, incoming: &Incoming) {
    let label = match incoming.path.as_str() {
        crate::forward::REPORT_PATH => "forward_reports",
        "/__rollgate/subscribe" => "shard_subscribe",
        "/__rollgate/shard-clients" => "shard_reports",
        "/__rollgate/user-streams-closed" => "shard_user_streams",
        crate::local::SNAPSHOT_PATH => "snapshot_checks",
        path => Route::parse(&incoming.method, path).map_or("unmatched", |r| r.label()),
    };
    *inner.core.borrow_mut().requests.entry(label).or_default() += 1;
}

/// The Worker-only families (`rollgate_proxy_relay_requests_total`, and the objects'
/// `rollgate_proxy_wasm_memory_bytes`), appended to this object's metrics on `?objects`.
fn object_families(inner: &Inner) -> String {
    let mut text = String::from(
        "# HELP rollgate_proxy_relay_requests_total Requests the environment's relay object \
         served (Worker only), by route or internal path.\n\
         # TYPE rollgate_proxy_relay_requests_total counter\n",
    );
    let core = inner.core.borrow();
    for (label, n) in &core.requests {
        text.push_str(&format!(
            "rollgate_proxy_relay_requests_total{{route=\"{label}\"}} {n}\n"
        ));
    }
    text.push_str(
        "# HELP rollgate_proxy_wasm_memory_bytes WebAssembly memory of the relay and of each \
         shard as last reported (Worker only): its high-water mark, never shrinking; objects \
         sharing an isolate share one.\n\
         # TYPE rollgate_proxy_wasm_memory_bytes gauge\n",
    );
    text.push_str(&format!(
        "rollgate_proxy_wasm_memory_bytes{{object=\"relay\"}} {}\n",
        http::wasm_memory_bytes()
    ));
    for (shard, report) in &core.shard_reports {
        text.push_str(&format!(
            "rollgate_proxy_wasm_memory_bytes{{object=\"shard\",shard=\"{shard}\"}} {}\n",
            report.wasm_memory
        ));
    }
    text
}

/// A front's batch of forward outcomes (`forward.rs`): upstream's refusals and every outcome go
/// to the machine (breaker, `Retry-After` holds, the rejected key) and the metrics, ended
/// identifies close their gates; the answer is the verdict for the front's next forwards.
fn forwards_report(inner: &Rc<Inner>, body: &str) -> worker::Result<Response> {
    let tally = Tally::decode(body);
    for token in tally.ended() {
        identify::end(inner, *token);
    }
    let at = now();
    if let Some(downstream) = downstream_of(inner) {
        for kind in tally::KINDS {
            for outcome in SideOutcome::ALL {
                downstream
                    .metrics
                    .side_requests(kind, outcome, tally.counted(kind, outcome));
            }
        }
    }
    let mut verdict = Verdict::default();
    if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
        for (i, kind) in tally::KINDS.into_iter().enumerate() {
            if let Some((status, retry_after)) = tally.refusal(kind) {
                upstream.record_forward_response(at, kind, status, retry_after);
            }
            // Successes first: a failure in the same batch then reopens a half-open breaker.
            // Bounded: past the breaker's thresholds more of the same change nothing.
            let ok = tally.counted(kind, SideOutcome::Ok).min(BREAKER_RECORDS);
            let failed = tally.counted(kind, SideOutcome::Error).min(BREAKER_RECORDS);
            for _ in 0..ok {
                upstream.record_side_request(at, Outcome::Success);
            }
            for _ in 0..failed {
                upstream.record_side_request(at, Outcome::Failure);
            }
            verdict.until[i] = upstream
                .forward_blocked_until(at, kind)
                .map(Timestamp::as_millis);
        }
    }
    drive(inner);
    Response::ok(verdict.encode())
}

/// The stateless Worker's revision check, `?have=<event id>`: 204 when that is still current,
/// else 200 with the persisted snapshot; the current event id (with the identity epoch) in
/// [`EVENT_ID_HEADER`] either way.
fn snapshot_check(inner: &Inner, query: &str) -> worker::Result<Response> {
    let have = form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "have")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    let (snapshot, epoch) = {
        let core = inner.core.borrow();
        (core.snapshot(), core.identity_epoch)
    };
    let Some(snapshot) = snapshot else {
        return Ok(Response::empty()?.with_status(503));
    };
    let event_id = format!("{}~{epoch}", snapshot.event_id());
    let mut response = if have == event_id {
        Response::empty()?.with_status(204)
    } else {
        // `Vec::from` takes the buffer core wrote (no copy: the `Bytes` is its only holder).
        Response::from_bytes(Vec::from(snapshot.to_persisted(None)))?
    };
    response.headers_mut().set(EVENT_ID_HEADER, &event_id)?;
    Ok(response)
}

/// `?shard=N&boot=B&frontend=..&sdk=..&ofrep=..&frames_frontend=..&frames_sdk=..&frames_ofrep=..
/// &sockets_refused=..&wasm_memory=..` from a shard: its clients (summed over shards into the
/// gauge), its memory, and its counters since it started `B` (summed across its restarts, see
/// core's `reports`).
fn shard_report(inner: &Inner, query: &str) {
    let mut shard = None;
    let mut boot = 0;
    let mut report = ShardReport::default();
    let mut counters = [0u64; 4];
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.parse::<u64>().ok();
        match &*name {
            "shard" => shard = value.and_then(|v| u32::try_from(v).ok()),
            "boot" => boot = value.unwrap_or(0),
            "sockets_refused" => counters[REFUSED] = value.unwrap_or(0),
            "wasm_memory" => report.wasm_memory = value.unwrap_or(0),
            _ => {}
        }
        for kind in StreamKind::ALL {
            if name == kind.label() {
                report.clients[kind.index()] = value.unwrap_or(0);
            } else if name.strip_prefix("frames_") == Some(kind.label()) {
                counters[kind.index()] = value.unwrap_or(0);
            }
        }
    }
    let Some(shard) = shard else { return };
    let mut core = inner.core.borrow_mut();
    let shards = core.config.as_ref().map_or(1, |config| config.sse_shards);
    if shard >= shards {
        // Not one of this environment's shards: nothing a shard sends (bounds the map).
        return;
    }
    core.shard_reports.insert(shard, report);
    let totals = {
        let tally = core
            .shard_counters
            .get_or_insert_with(|| ShardCounters::new(shards));
        tally.report(shard, boot, counters);
        tally.totals()
    };
    if let Some(downstream) = &core.downstream {
        for kind in StreamKind::ALL {
            let i = kind.index();
            let clients = core.shard_reports.values().map(|r| r.clients[i]).sum();
            downstream.metrics.set_stream_clients(kind, clients);
            downstream.metrics.set_frames_sent(kind, totals[i]);
        }
    }
}

/// A user's flags in evaluated mode, through core's per-user cache: one upstream fetch per user
/// and revision (run as its own task, so it completes even if its requester goes away), the
/// other requests waiting for it.
async fn user_flags(
    inner: &Rc<Inner>,
    config: &Rc<EdgeConfig>,
    user_id: &str,
    revision: Revision,
) -> UserFlags {
    let Some(downstream) = downstream_of(inner) else {
        return UserFlags::Unavailable;
    };
    let ticket = match downstream.user_lookup(now(), user_id, revision) {
        Lookup::Fresh(flags) => return UserFlags::Fresh(flags),
        Lookup::Wait { ticket, .. } => ticket,
        Lookup::Fetch { ticket, .. } => {
            let inner = Rc::clone(inner);
            let config = Rc::clone(config);
            let user = user_id.to_owned();
            let downstream = Rc::clone(&downstream);
            wasm_bindgen_futures::spawn_local(async move {
                let result = fetch_user(&inner, &config, &user).await;
                let fetched = result.is_some();
                let flags = downstream.user_fetched(now(), &user, ticket, result);
                let waiters = inner.core.borrow_mut().user_waiters.remove(&ticket);
                for waiter in waiters.unwrap_or_default() {
                    let _ = waiter.send(flags.clone());
                }
                if fetched {
                    // The user's stream clients re-read the cache (a change may be waiting).
                    refresh::user_refreshed(&inner, &user);
                }
            });
            ticket
        }
    };
    let (tx, rx) = oneshot::channel();
    inner
        .core
        .borrow_mut()
        .user_waiters
        .entry(ticket)
        .or_default()
        .push(tx);
    let bound = config.core.upstream_timeout + Duration::from_secs(1);
    match select(rx, Delay::from(bound)).await {
        Either::Left((Ok(flags), _)) => flags,
        // The fetch went away or took too long: what core has for this user now.
        _ => downstream.user_waited(now(), user_id, revision),
    }
}

/// Takes a slot for a request of `kind` outside the machine (`false`: core's bound is reached,
/// the request is not sent and counts as busy). Release it with [`release_side_slot`].
fn take_side_slot(inner: &Inner, downstream: &Downstream, kind: SideRequest) -> bool {
    let mut core = inner.core.borrow_mut();
    let in_flight = &mut core.side_in_flight[kind.index()];
    if *in_flight >= MAX_SIDE_REQUESTS_IN_FLIGHT {
        downstream.metrics.side_request(kind, SideOutcome::Busy);
        return false;
    }
    *in_flight += 1;
    true
}

fn release_side_slot(inner: &Inner, kind: SideRequest) {
    let mut core = inner.core.borrow_mut();
    let in_flight = &mut core.side_in_flight[kind.index()];
    *in_flight = in_flight.saturating_sub(1);
}

/// One upstream fetch of a user's flags, admitted and recorded by the breaker.
async fn fetch_user(
    inner: &Rc<Inner>,
    config: &EdgeConfig,
    user_id: &str,
) -> Option<EvaluatedFlags> {
    let downstream = downstream_of(inner)?;
    // The user's identify reaches Rollgate before this fetch does.
    identify::wait(inner, user_id, config.core.upstream_timeout + REPORT_GRACE).await;
    if !take_side_slot(inner, &downstream, SideRequest::UserFlags) {
        return None;
    }
    let flags = fetch_user_admitted(inner, config, &downstream, user_id).await;
    release_side_slot(inner, SideRequest::UserFlags);
    flags
}

async fn fetch_user_admitted(
    inner: &Rc<Inner>,
    config: &EdgeConfig,
    downstream: &Downstream,
    user_id: &str,
) -> Option<EvaluatedFlags> {
    let admitted = inner
        .core
        .borrow_mut()
        .upstream
        .as_mut()
        .is_some_and(|u| u.admit_side_request(now()));
    if !admitted {
        downstream
            .metrics
            .side_request(SideRequest::UserFlags, SideOutcome::Rejected);
        return None;
    }
    let result = get_flags(config, Some(user_id), None).await;
    if let (
        FetchResult::Response {
            status,
            retry_after,
            ..
        },
        Some(upstream),
    ) = (&result, inner.core.borrow_mut().upstream.as_mut())
    {
        upstream.record_side_response(now(), *status, retry_after.as_deref());
    }
    let flags = match result {
        FetchResult::Response {
            status: 200, body, ..
        } => EvaluatedFlags::from_json(&body).ok(),
        _ => None,
    };
    record_side_request(inner, downstream, SideRequest::UserFlags, flags.is_some());
    flags
}

fn record_side_request(inner: &Rc<Inner>, downstream: &Downstream, kind: SideRequest, ok: bool) {
    let (outcome, side) = if ok {
        (Outcome::Success, SideOutcome::Ok)
    } else {
        (Outcome::Failure, SideOutcome::Error)
    };
    if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
        upstream.record_side_request(now(), outcome);
    }
    downstream.metrics.side_request(kind, side);
    drive(inner);
}

/// The internal stream of a shard: the current snapshot at once, then every new one.
fn subscribe(inner: &Rc<Inner>) -> worker::Result<Response> {
    let head = inner
        .core
        .borrow()
        .snapshot()
        .map(|snapshot| js_bytes(&snapshot_frame(&snapshot)));
    let headers = Headers::new();
    headers.set("content-type", rollgate_proxy_core::api::EVENT_STREAM)?;
    headers.set("cache-control", rollgate_proxy_core::api::NO_CACHE)?;
    let (outlet, response) = Outlet::open(head, headers)?;
    inner.core.borrow_mut().subscribers.push(outlet);
    Ok(response)
}

fn freshness(inner: &Inner) -> Freshness {
    let core = inner.core.borrow();
    match (&core.upstream, &core.local) {
        (Some(upstream), _) => upstream.freshness(now()),
        (None, Some(_)) => Freshness::Fresh,
        (None, None) => Freshness::Missing,
    }
}

/// The source's state for health and metrics.
fn report(inner: &Inner) -> SourceReport {
    let core = inner.core.borrow();
    match (&core.upstream, &core.local) {
        (Some(upstream), _) => SourceReport::Upstream(upstream.status(now())),
        (None, local) => SourceReport::Local {
            last_error: None,
            loaded_at: local.as_ref().map(|s| s.cached_at()),
        },
    }
}
