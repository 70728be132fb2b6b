//! The relay Durable Object: one per environment, it owns core's `Upstream` machine, holds the
//! single upstream stream, persists snapshots, answers polling misses and feeds the SSE shards.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_channel::mpsc::{UnboundedSender, unbounded};
use futures_util::FutureExt as _;
use futures_util::StreamExt;
use futures_util::future::{Either, LocalBoxFuture, Shared, select};
use rollgate_proxy_core::api::{
    self, ApiError, ApiResponse, HealthReport, Route, UpstreamHealth, ofrep,
};
use rollgate_proxy_core::breaker::{BreakerState, Outcome};
use rollgate_proxy_core::model::{Context, EvaluatedFlags, RulesPayload};
use rollgate_proxy_core::snapshot::{
    CacheStats, FlagSource, Freshness, Revision, Snapshot, SnapshotStore,
};
use rollgate_proxy_core::sse::encode::{Event, KEEPALIVE};
use rollgate_proxy_core::upstream::{
    Action, FetchResult, RequestId, StreamEnd, StreamId, Upstream,
};
use worker::{
    AbortController, Delay, Env, Fetch, Headers, Method, Request, RequestInit, RequestRedirect,
    Response, State, console_error, console_log, durable_object,
};

use crate::config::EdgeConfig;
use crate::http::{self, CLIENT_KEY_HEADER, EVENT_ID_HEADER, now};
use crate::serve::{self, Answer, MetricsInput};

/// Storage key of the persisted snapshot.
const SNAPSHOT_KEY: &str = "snapshot";
/// Most user contexts kept from `/identify`.
const MAX_IDENTITIES: usize = 10_000;
/// Most users whose upstream-evaluated flags are cached (as the native server's default).
const MAX_USERS: usize = 10_000;
/// Longest an upstream request may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// SSE event name of the internal relay → shard stream.
pub(crate) const SNAPSHOT_EVENT: &str = "snapshot";

/// The relay object.
#[durable_object]
pub struct Relay {
    inner: Rc<Inner>,
}

struct Inner {
    state: State,
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
    /// Internal streams of the shard objects.
    subscribers: Vec<UnboundedSender<Vec<u8>>>,
    /// Open upstream streams, to abort on `CloseStream`.
    streams: HashMap<StreamId, AbortController>,
    /// The alarm currently set (unix ms).
    alarm_at: Option<u64>,
    /// SSE clients per shard, as the shards last reported.
    shard_clients: BTreeMap<u32, u64>,
    cache: CacheStats,
    identities: HashMap<String, Context>,
    /// Bumped by every `/identify`: part of the edge cache key, so cached answers that did not
    /// see the new attributes are not served after one pointer TTL.
    identity_epoch: u64,
    /// Evaluated mode: flags per user id, fresh for the refresh interval and the revision.
    users: HashMap<String, CachedUser>,
    /// Evaluated mode: the one upstream fetch per user and revision that callers share.
    inflight_users: HashMap<(String, Revision), PendingUser>,
}

type PendingUser = Shared<LocalBoxFuture<'static, Option<Arc<EvaluatedFlags>>>>;

struct CachedUser {
    flags: Arc<EvaluatedFlags>,
    /// Unix ms of the fetch.
    fetched: u64,
    /// The revision current at the fetch: any change upstream makes the entry out of date.
    revision: Revision,
}

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
        Self {
            inner: Rc::new(Inner {
                state,
                env,
                core: RefCell::new(Core::default()),
            }),
        }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        let inner = Rc::clone(&self.inner);
        if let Err(error) = start(&inner).await {
            console_error!("relay start failed: {error}");
            return http::internal();
        }
        handle(&inner, req).await
    }

    async fn alarm(&self) -> worker::Result<Response> {
        let inner = Rc::clone(&self.inner);
        start(&inner).await?;
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
async fn start(inner: &Rc<Inner>) -> worker::Result<()> {
    if inner.core.borrow().started {
        return Ok(());
    }
    let config = crate::entry::load_config(&inner.env)
        .map_err(|e| worker::Error::RustError(e.to_string()))?;
    let persisted: Option<String> = if config.api_key.is_some() {
        inner
            .state
            .storage()
            .get(SNAPSHOT_KEY)
            .await
            .unwrap_or(None)
    } else {
        None
    };
    let mut core = inner.core.borrow_mut();
    if core.started {
        return Ok(());
    }
    core.started = true;
    let at = now();
    if config.api_key.is_some() {
        let mut upstream_config = config.upstream.clone();
        // Replicas must not retry in lockstep: seed the jitter per instance.
        upstream_config.jitter_seed = (js_sys::Math::random() * 9.0e15) as u64;
        let mut upstream = Upstream::new(upstream_config, at);
        if let Some(bytes) = persisted {
            match upstream.restore(bytes.as_bytes()) {
                Ok(()) => console_log!("relay: restored the persisted snapshot"),
                Err(error) => console_error!("relay: ignoring the persisted snapshot: {error}"),
            }
        }
        core.upstream = Some(upstream);
        console_log!("relay: upstream mode, {}", config.base_url);
    } else {
        let payload = RulesPayload::from_json(crate::LOCAL_FLAGS.as_bytes())
            .map_err(|e| worker::Error::RustError(e.to_string()))?;
        core.local = SnapshotStore::new().replace(at, FlagSource::rules(&payload));
        console_log!("relay: local mode, serving the built-in rules (no ROLLGATE_API_KEY)");
    }
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
            Action::Persist(bytes) => {
                let inner = Rc::clone(inner);
                wasm_bindgen_futures::spawn_local(async move {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    if let Err(error) = inner.state.storage().put(SNAPSHOT_KEY, text).await {
                        console_error!("relay: persisting the snapshot failed: {error}");
                    }
                });
            }
            Action::Publish(snapshot) => broadcast(inner, &snapshot_frame(&snapshot)),
        }
    }
    let (deadline, armed) = {
        let core = inner.core.borrow();
        (
            core.upstream.as_ref().and_then(Upstream::poll_timeout),
            core.alarm_at,
        )
    };
    if let Some(deadline) = deadline
        && armed.is_none_or(|at| at != deadline.as_millis())
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

/// The internal frame carrying a whole snapshot to the shards.
fn snapshot_frame(snapshot: &Snapshot) -> Vec<u8> {
    let persisted = snapshot.to_persisted(None);
    let data = String::from_utf8_lossy(&persisted);
    let builder = Event::new();
    let builder = builder.clone().event(SNAPSHOT_EVENT).unwrap_or(builder);
    builder.data(&data).into_bytes().to_vec()
}

fn broadcast(inner: &Inner, frame: &[u8]) {
    inner
        .core
        .borrow_mut()
        .subscribers
        .retain(|tx| tx.unbounded_send(frame.to_vec()).is_ok());
}

/// Comments on the internal streams: they find shard streams that went away.
async fn keepalive_loop(inner: Rc<Inner>) {
    loop {
        let period = config_of(&inner).map_or(Duration::from_secs(4), |c| c.sdk_keepalive);
        Delay::from(period).await;
        broadcast(&inner, KEEPALIVE);
    }
}

fn upstream_headers(config: &EdgeConfig, accept: &str) -> worker::Result<Headers> {
    let headers = Headers::new();
    if let Some(key) = &config.api_key {
        headers.set("authorization", &format!("Bearer {}", key.expose()))?;
    }
    headers.set("accept", accept)?;
    Ok(headers)
}

/// Runs `future` for at most [`UPSTREAM_TIMEOUT`]; on timeout, or when it returns `Err` (a
/// request given up on, e.g. an oversize body), aborts the request through `controller`.
async fn with_timeout<T, E>(
    future: impl Future<Output = Result<T, E>>,
    controller: AbortController,
) -> Option<Result<T, E>> {
    let future = std::pin::pin!(future);
    match select(future, Delay::from(UPSTREAM_TIMEOUT)).await {
        Either::Left((Ok(value), _)) => Some(Ok(value)),
        Either::Left((Err(error), _)) => {
            controller.abort();
            Some(Err(error))
        }
        Either::Right(((), _)) => {
            controller.abort();
            None
        }
    }
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
    let mut url = format!("{}/api/v1/sdk/flags?withReasons=true", config.base_url);
    if let Some(user) = user_id {
        url.push_str("&user_id=");
        url.push_str(&String::from(js_sys::encode_uri_component(user)));
    }
    let secret = config.api_key.as_ref().map_or("", |k| k.expose());
    let request = (|| {
        let headers = upstream_headers(config, "application/json")?;
        if let Some(etag) = if_none_match {
            headers.set("if-none-match", etag)?;
        }
        let mut init = RequestInit::new();
        // A 3xx is a failed request: following it would send the key wherever it points.
        init.with_method(Method::Get)
            .with_headers(headers)
            .with_redirect(RequestRedirect::Manual);
        Request::new_with_init(&url, &init)
    })();
    let request = match request {
        Ok(request) => request,
        Err(error) => return FetchResult::Transport(http::redact(&error.to_string(), secret)),
    };
    let controller = AbortController::default();
    let signal = controller.signal();
    let limit = config.upstream.max_body_bytes;
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
    match with_timeout(call, controller).await {
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
        None => FetchResult::Transport(format!("no answer within {UPSTREAM_TIMEOUT:?}")),
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
    let url = format!(
        "{}/api/v1/sdk/stream?token={}",
        config.base_url,
        String::from(js_sys::encode_uri_component(&secret))
    );
    let request = upstream_headers(&config, "text/event-stream").and_then(|headers| {
        let mut init = RequestInit::new();
        init.with_method(Method::Get)
            .with_headers(headers)
            .with_redirect(RequestRedirect::Manual);
        Request::new_with_init(&url, &init)
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

async fn handle(inner: &Rc<Inner>, mut req: Request) -> worker::Result<Response> {
    let (path, query) = http::path_and_query(&req);
    let method = req.method().to_string();
    match path.as_str() {
        "/__rollgate/subscribe" => return subscribe(inner),
        "/__rollgate/shard-clients" => {
            let mut shard = None;
            let mut clients = None;
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                match name.as_ref() {
                    "shard" => shard = value.parse::<u32>().ok(),
                    "clients" => clients = value.parse::<u64>().ok(),
                    _ => {}
                }
            }
            if let (Some(shard), Some(clients)) = (shard, clients) {
                inner.core.borrow_mut().shard_clients.insert(shard, clients);
            }
            return Response::ok("ok");
        }
        _ => {}
    }
    let route = match Route::parse(&method, &path) {
        Ok(route) => route,
        Err(error) => return http::error_response(&error),
    };
    let body = Bytes::from(req.bytes().await.unwrap_or_default());
    let inm = req.headers().get("if-none-match")?;
    // The Worker hands on the client key the request presented, for OFREP's stream URL only.
    let ofrep_stream = ofrep::stream_uri(req.headers().get(CLIENT_KEY_HEADER)?.as_deref());
    let Some(config) = config_of(inner) else {
        return http::internal();
    };
    match route {
        Route::Health => http::to_response(ApiResponse::json(health(inner, &config).body())),
        Route::Metrics => {
            let text = serve::metrics_text(&metrics(inner));
            let headers = Headers::new();
            headers.set("content-type", "text/plain; version=0.0.4; charset=utf-8")?;
            Ok(Response::ok(text)?.with_headers(headers))
        }
        Route::Ready => match inner.core.borrow().snapshot() {
            Some(_) => http::to_response(ApiResponse::json(Bytes::from_static(api::READY_BODY))),
            None => http::error_response(&ApiError::not_ready()),
        },
        Route::SdkIdentify => identify(inner, &config, &body).await,
        Route::SdkEvents => match api::count_events(&body) {
            Ok(n) => {
                forward(inner, &config, "/api/v1/sdk/events", body);
                http::to_response(ApiResponse::json(api::received_body(n as u64)))
            }
            Err(error) => http::error_response(&error),
        },
        Route::SdkTelemetry => match api::count_telemetry(&body) {
            Ok(n) => {
                forward(inner, &config, "/api/v1/sdk/telemetry", body);
                http::to_response(ApiResponse::json(api::received_body(n)))
            }
            Err(error) => http::error_response(&error),
        },
        ref data if serve::is_polling(data) => {
            poll(
                inner,
                &config,
                data,
                &method,
                &query,
                &body,
                inm.as_deref(),
                &ofrep_stream,
            )
            .await
        }
        _ => http::error_response(&ApiError::not_found(&path)),
    }
}

/// A polling answer, with the snapshot's event id for the Worker's cache.
#[allow(
    clippy::too_many_arguments,
    reason = "one request's parts, passed through once"
)]
async fn poll(
    inner: &Rc<Inner>,
    config: &EdgeConfig,
    route: &Route,
    method: &str,
    query: &str,
    body: &[u8],
    inm: Option<&str>,
    ofrep_stream: &str,
) -> worker::Result<Response> {
    let snapshot = inner.core.borrow().snapshot();
    let freshness = freshness(inner);
    inner.core.borrow_mut().cache.record(freshness);
    let answer = serve::data_route_merged(
        snapshot.as_deref(),
        route,
        method,
        query,
        body,
        inm,
        ofrep_stream,
        |context| merge_identity(inner, context),
    );
    let response = match answer {
        Answer::Ready(response) => response,
        Answer::NeedsUpstream(context) => {
            let Some(snapshot) = snapshot.as_deref() else {
                return http::error_response(&ApiError::not_ready());
            };
            match user_flags(inner, config, &context, snapshot.revision()).await {
                Some(flags) => serve::respond(
                    snapshot,
                    route,
                    &context,
                    Cow::Owned(EvaluatedFlags::clone(&flags)),
                    query,
                    inm,
                    ofrep_stream,
                ),
                None => ApiError::upstream_unavailable().into(),
            }
        }
    };
    // The edge cache keys answers by this: the snapshot, and the `/identify` epoch, since
    // stored attributes change answers without a new snapshot.
    let epoch = inner.core.borrow().identity_epoch;
    let event_id = snapshot.map(|s| format!("{}~{epoch}", s.event_id()));
    let mut response = http::to_response(response)?;
    if let Some(event_id) = event_id {
        response.headers_mut().set(EVENT_ID_HEADER, &event_id)?;
    }
    Ok(response)
}

/// A user's flags in evaluated mode, as the native server: from the cache while younger than
/// the refresh interval and fetched at `revision`; else one upstream fetch per user and
/// revision, shared by every caller meanwhile; when that fails, an expired entry (stale).
async fn user_flags(
    inner: &Rc<Inner>,
    config: &EdgeConfig,
    context: &Context,
    revision: Revision,
) -> Option<Arc<EvaluatedFlags>> {
    let id = context.id.clone()?;
    let ttl = rollgate_proxy_core::time::duration_millis(config.upstream.refresh_interval);
    let at = now().as_millis();
    let stale = match inner.core.borrow().users.get(&id) {
        Some(entry) if entry.revision == revision && at.saturating_sub(entry.fetched) < ttl => {
            return Some(Arc::clone(&entry.flags));
        }
        Some(entry) => Some(Arc::clone(&entry.flags)),
        None => None,
    };
    let pending = {
        let key = (id, revision);
        let mut core = inner.core.borrow_mut();
        core.inflight_users
            .entry(key.clone())
            .or_insert_with(|| {
                let inner = Rc::clone(inner);
                async move {
                    let config = config_of(&inner)?;
                    let flags = fetch_user(&inner, &config, &key.0).await.map(Arc::new);
                    let mut core = inner.core.borrow_mut();
                    core.inflight_users.remove(&key);
                    if let Some(flags) = &flags {
                        if core.users.len() >= MAX_USERS && !core.users.contains_key(&key.0) {
                            // Bounded: drop the oldest entry.
                            let oldest = core
                                .users
                                .iter()
                                .min_by_key(|(_, e)| e.fetched)
                                .map(|(k, _)| k.clone());
                            if let Some(oldest) = oldest {
                                core.users.remove(&oldest);
                            }
                        }
                        core.users.insert(
                            key.0.clone(),
                            CachedUser {
                                flags: Arc::clone(flags),
                                fetched: now().as_millis(),
                                revision: key.1,
                            },
                        );
                    }
                    flags
                }
                .boxed_local()
                .shared()
            })
            .clone()
    };
    pending.await.or(stale)
}

/// One upstream fetch of a user's flags, admitted and recorded by the breaker.
async fn fetch_user(
    inner: &Rc<Inner>,
    config: &EdgeConfig,
    user_id: &str,
) -> Option<EvaluatedFlags> {
    let admitted = inner
        .core
        .borrow_mut()
        .upstream
        .as_mut()
        .is_some_and(|u| u.admit_side_request(now()));
    if !admitted {
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
    let outcome = if flags.is_some() {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    if let Some(upstream) = inner.core.borrow_mut().upstream.as_mut() {
        upstream.record_side_request(now(), outcome);
    }
    drive(inner);
    flags
}

fn merge_identity(inner: &Inner, context: &mut Context) {
    let Some(id) = context.id.clone() else { return };
    if let Some(stored) = inner.core.borrow().identities.get(&id) {
        if context.email.is_none() {
            context.email.clone_from(&stored.email);
        }
        for (name, value) in &stored.attributes {
            context
                .attributes
                .entry(name.clone())
                .or_insert_with(|| value.clone());
        }
    }
}

async fn identify(
    inner: &Rc<Inner>,
    config: &EdgeConfig,
    body: &Bytes,
) -> worker::Result<Response> {
    let context = match api::context_from_body(body) {
        Ok(context) => context,
        Err(error) => return http::error_response(&error),
    };
    if let Some(id) = context.id.clone() {
        let mut core = inner.core.borrow_mut();
        if core.identities.len() >= MAX_IDENTITIES && !core.identities.contains_key(&id) {
            // Bounded: forget an arbitrary entry rather than grow without limit.
            if let Some(victim) = core.identities.keys().next().cloned() {
                core.identities.remove(&victim);
            }
        }
        core.identities.insert(id, context);
        core.identity_epoch += 1;
    }
    forward(inner, config, "/api/v1/sdk/identify", body.clone());
    http::to_response(ApiResponse::json(Bytes::from_static(api::IDENTIFY_BODY)))
}

/// Sends a client's batch on to upstream in the background (upstream mode, breaker permitting).
fn forward(inner: &Rc<Inner>, config: &EdgeConfig, path: &'static str, body: Bytes) {
    let Some(key) = config.api_key.clone() else {
        return;
    };
    let admitted = inner
        .core
        .borrow_mut()
        .upstream
        .as_mut()
        .is_some_and(|u| u.admit_side_request(now()));
    if !admitted {
        return;
    }
    let url = format!("{}{path}", config.base_url);
    wasm_bindgen_futures::spawn_local(async move {
        let request = (|| {
            let headers = Headers::new();
            headers.set("authorization", &format!("Bearer {}", key.expose()))?;
            headers.set("content-type", "application/json")?;
            let mut init = RequestInit::new();
            init.with_method(Method::Post)
                .with_headers(headers)
                .with_body(Some(js_sys::Uint8Array::from(&body[..]).into()));
            Request::new_with_init(&url, &init)
        })();
        if let Ok(request) = request
            && let Err(error) = Fetch::Request(request).send().await
        {
            console_error!(
                "relay: forwarding {path} failed: {}",
                http::redact(&error.to_string(), key.expose())
            );
        }
    });
}

/// The internal stream of a shard: the current snapshot at once, then every new one.
fn subscribe(inner: &Rc<Inner>) -> worker::Result<Response> {
    let (tx, rx) = unbounded::<Vec<u8>>();
    if let Some(snapshot) = inner.core.borrow().snapshot() {
        let _ = tx.unbounded_send(snapshot_frame(&snapshot));
    }
    inner.core.borrow_mut().subscribers.push(tx);
    let headers = Headers::new();
    headers.set("content-type", api::EVENT_STREAM)?;
    headers.set("cache-control", api::NO_CACHE)?;
    Ok(Response::from_stream(rx.map(Ok::<Vec<u8>, worker::Error>))?.with_headers(headers))
}

fn freshness(inner: &Inner) -> Freshness {
    let core = inner.core.borrow();
    match (&core.upstream, &core.local) {
        (Some(upstream), _) => upstream.freshness(now()),
        (None, Some(_)) => Freshness::Fresh,
        (None, None) => Freshness::Missing,
    }
}

fn health(inner: &Inner, _config: &EdgeConfig) -> HealthReport {
    let at = now();
    let core = inner.core.borrow();
    let snapshot = core.snapshot();
    let sse_clients = core.shard_clients.values().sum();
    let flags = snapshot.as_ref().map_or(0, |s| s.defaults().flags.len());
    match &core.upstream {
        Some(upstream) => {
            let status = upstream.status(at);
            let fresh = status.freshness == Freshness::Fresh;
            let degraded = status.breaker.state == BreakerState::Open || !fresh;
            HealthReport {
                status: if degraded { "degraded" } else { "healthy" },
                circuit: status.breaker.state.as_str(),
                cache: core.cache,
                source: "upstream",
                upstream: UpstreamHealth {
                    stream: status.stream.as_str(),
                    mode: status.mode,
                    fresh,
                    last_error: status.last_error.map(|e| e.to_string()),
                },
                revision: snapshot.as_ref().map(|s| s.revision().get()),
                etag: snapshot.as_ref().map(|s| s.etag().to_owned()),
                data_age_ms: status
                    .last_confirmed
                    .map(|c| rollgate_proxy_core::time::duration_millis(at.saturating_since(c))),
                flags,
                sse_clients,
            }
        }
        None => HealthReport {
            status: "healthy",
            circuit: BreakerState::Closed.as_str(),
            cache: core.cache,
            source: "local",
            upstream: UpstreamHealth {
                stream: "disabled",
                mode: snapshot.as_ref().map(|s| s.source().mode()),
                fresh: true,
                last_error: None,
            },
            revision: snapshot.as_ref().map(|s| s.revision().get()),
            etag: snapshot.as_ref().map(|s| s.etag().to_owned()),
            data_age_ms: snapshot.as_ref().map(|s| {
                rollgate_proxy_core::time::duration_millis(at.saturating_since(s.cached_at()))
            }),
            flags,
            sse_clients,
        },
    }
}

fn metrics(inner: &Inner) -> MetricsInput {
    let at = now();
    let core = inner.core.borrow();
    let snapshot = core.snapshot();
    let mut m = MetricsInput {
        upstream_mode: core.upstream.is_some(),
        revision: snapshot.as_ref().map_or(0, |s| s.revision().get()),
        flags: snapshot.as_ref().map_or(0, |s| s.defaults().flags.len()),
        sse_clients: core.shard_clients.values().sum(),
        shard_clients: core.shard_clients.iter().map(|(s, n)| (*s, *n)).collect(),
        cache: core.cache,
        ..MetricsInput::default()
    };
    if let Some(upstream) = &core.upstream {
        let status = upstream.status(at);
        m.breaker_state = status.breaker.state.gauge();
        m.breaker_opens = status.breaker.opens_total;
        m.upstream_connected = status.stream.as_str() == "connected";
        m.counters = status.counters;
        m.data_age_seconds = status
            .last_confirmed
            .map_or(0.0, |c| at.saturating_since(c).as_secs_f64());
    }
    m
}
