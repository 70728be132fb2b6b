//! HTTP handling: one fallback handler turns a hyper request into core's `Request`, runs core's
//! dispatcher, and executes its `Answer` (respond, stream, fetch a user's flags, forward). It
//! adds only what is HTTP's: limits on the head and body, the request id, CORS headers from
//! core's policy, latency metrics.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Request, State};
use axum::response::IntoResponse;
use axum::response::Response;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use rollgate_proxy_core::api::{ApiError, ApiResponse, is_usable_request_id};
use rollgate_proxy_core::cors::{CorsPolicy, CorsValue, EXPOSE_HEADERS, PREFLIGHT_STATUS};
use rollgate_proxy_core::downstream::{self, Admitted, Answer, Forward, MetricsExtra};
use rollgate_proxy_core::metrics::{Metrics, SideRequest};
use tracing::Instrument;

use crate::forward;
use crate::runtime::{lock, now, random_unit};
use crate::server::ConnectionHold;
use crate::sse;
use crate::state::App;
use crate::users::user_flags;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
// Header values every answer may carry, built once: cloning a static `HeaderValue` copies a
// pointer, where building one checks every byte.
static ANY_ORIGIN: HeaderValue = HeaderValue::from_static("*");
static EXPOSE: HeaderValue = HeaderValue::from_static(EXPOSE_HEADERS);
static NO_CACHE: HeaderValue = HeaderValue::from_static(rollgate_proxy_core::api::NO_CACHE);
static JSON: HeaderValue = HeaderValue::from_static(rollgate_proxy_core::api::JSON);

/// The application: one fallback handler.
pub fn router(app: Arc<App>) -> Router {
    Router::new().fallback(handle).with_state(app)
}

async fn handle(State(app): State<Arc<App>>, request: Request) -> Response {
    handle_in(&app, request, Admission::Core).await
}

/// What the server calls: the same handler as [`router`]'s, without a router per request.
impl crate::server::Handler for Arc<App> {
    fn call(&self, request: Request) -> impl Future<Output = Response> + Send {
        handle_in(self, request, Admission::Core)
    }
}

/// Who checks a request's client key.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Core's downstream (one environment: today's configuration).
    Core,
    /// The environments router already did, and found this key (`None`: open).
    Routed(Option<String>),
    /// The environments router refused the request.
    Rejected(ApiError),
    /// Answered already (health, readiness, metrics of every environment).
    Answered(ApiResponse),
}

/// One request for `app`'s environment, its client key checked as `admission` says.
pub(crate) async fn handle_in(app: &Arc<App>, request: Request, admission: Admission) -> Response {
    handle_counted(app, request, admission, &app.downstream.metrics).await
}

/// [`handle_in`], the request counted in `counted` (the process's unrouted requests, when no
/// environment is the one it was for).
pub(crate) async fn handle_counted(
    app: &Arc<App>,
    request: Request,
    admission: Admission,
    counted: &Metrics,
) -> Response {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    // A WebSocket upgrade is taken from the head here and used only if core opens a stream.
    let upgrade = websocket_upgrade(&mut parts).await;
    let origin = parts.headers.get(header::ORIGIN).cloned();
    // The caller's id when it is usable, else a sequence number as 16 hex digits; kept as a
    // `HeaderValue` (a cheap clone of the caller's bytes) so it is formatted at most once.
    let request_id = match parts
        .headers
        .get(&X_REQUEST_ID)
        .filter(|v| is_usable_request_id(v.as_bytes()))
    {
        Some(value) => value.clone(),
        None => sequence_id(next_request_seq()),
    };
    let mut response;
    let label;
    if parts.method == Method::OPTIONS {
        response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::from_u16(PREFLIGHT_STATUS).unwrap_or(StatusCode::OK);
        let cors = app
            .settings
            .core
            .cors
            .preflight(origin_str(origin.as_ref()));
        set_cors(response.headers_mut(), &cors, origin.as_ref());
        label = "preflight";
    } else {
        let head = head_of(&parts);
        // The head's limits first (414/431 whatever the route), then core's routing and keys;
        // an answer the environments router already made is sent for a known route only.
        let routed = |client_key| {
            rollgate_proxy_core::api::Route::parse(head.method, head.path)
                .map(|route| Admitted { route, client_key })
        };
        let (admitted, answered) = match check_limits(app, &parts) {
            Err(error) => (Err(error), None),
            Ok(()) => match admission {
                Admission::Core => (app.downstream.admit(&head), None),
                Admission::Routed(client_key) => (routed(client_key), None),
                Admission::Rejected(error) => (Err(error), None),
                Admission::Answered(response) => (routed(None), Some(response)),
            },
        };
        label = admitted.as_ref().map_or("unmatched", |a| a.route.label());
        let span = tracing::debug_span!(
            "request",
            id = request_id.to_str().unwrap_or_default(),
            method = %parts.method,
            route = label
        );
        let in_flight = InFlight::enter(&app.in_flight);
        response = match (admitted, answered) {
            (Ok(_), Some(response)) => from_api(response),
            (Ok(admitted), None)
                if admitted.route.is_sheddable()
                    && app
                        .settings
                        .max_concurrent_requests
                        .is_some_and(|max| in_flight.count > max) =>
            {
                from_api(app.downstream.overloaded(random_unit()))
            }
            (Ok(admitted), None)
                if admitted.route.is_stream() && upgrade.as_ref().is_some_and(Result::is_err) =>
            {
                match upgrade {
                    Some(Err(refused)) => refused,
                    _ => from_api(ApiError::internal().into()),
                }
            }
            (Ok(admitted), None) => {
                answer(
                    app,
                    &parts,
                    head,
                    body,
                    admitted,
                    upgrade.and_then(Result::ok),
                )
                .instrument(span.clone())
                .await
            }
            (Err(error), _) => from_api(error.into()),
        };
        let policy = &app.settings.core.cors;
        if matches!(policy, CorsPolicy::Any) {
            // What `response_headers` gives for `*`, without building the list per request.
            let headers = response.headers_mut();
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, ANY_ORIGIN.clone());
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE.clone());
        } else {
            let cors = policy.response_headers(origin_str(origin.as_ref()));
            set_cors(response.headers_mut(), &cors, origin.as_ref());
        }
        tracing::debug!(parent: &span, status = response.status().as_u16(), "answered");
    }
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id);
    counted.request(label, response.status().as_u16(), Some(started.elapsed()));
    response
}

/// Counts one request as being handled until dropped.
struct InFlight<'a> {
    counter: &'a AtomicUsize,
    /// Requests in flight including this one, when it entered.
    count: usize,
}

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
        Self { counter, count }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

fn origin_str(origin: Option<&HeaderValue>) -> Option<&str> {
    origin.and_then(|o| o.to_str().ok())
}

/// Writes core's CORS headers: constants as static values, the echoed origin as the caller's
/// own header value (no formatting on the hot path).
fn set_cors(
    headers: &mut HeaderMap,
    cors: &[(&'static str, CorsValue<'_>)],
    origin: Option<&HeaderValue>,
) {
    for (name, value) in cors {
        let value = match (value, origin) {
            (CorsValue::Static(value), _) => HeaderValue::from_static(value),
            (CorsValue::Origin(_), Some(origin)) => origin.clone(),
            (CorsValue::Origin(_), None) => continue,
        };
        let name = HeaderName::from_static(name);
        if name == header::VARY {
            // Added to core's own `Vary` (`Accept-Encoding` on the flag routes), not in its place.
            headers.append(name, value);
        } else {
            headers.insert(name, value);
        }
    }
}

/// The next generated request id's number, unique in the process. Each thread takes numbers
/// from the shared counter a block at a time: one shared atomic per request would move its
/// cache line between the cores on every request.
fn next_request_seq() -> u64 {
    const BLOCK: u64 = 1024;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        /// This thread's block: the next number and the end of the block.
        static BLOCK_LEFT: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    BLOCK_LEFT.with(|left| {
        let (mut next, mut end) = left.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            end = next.wrapping_add(BLOCK);
        }
        left.set((next.wrapping_add(1), end));
        next
    })
}

/// `seq` as 16 lowercase hex digits (what `format!("{seq:016x}")` gives, without a `String`).
pub(crate) fn sequence_id(seq: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    for (i, digit) in digits.iter_mut().enumerate() {
        *digit = HEX[((seq >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&digits).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Core's view of a request head (the body is added once read).
pub(crate) fn head_of(parts: &Parts) -> downstream::Request<'_> {
    let header = |name: &HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    downstream::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        authorization: header(&header::AUTHORIZATION),
        api_key: header(&X_API_KEY),
        if_none_match: header(&header::IF_NONE_MATCH),
        last_event_id: header(&LAST_EVENT_ID),
        accept_encoding: header(&header::ACCEPT_ENCODING),
        body: &[],
    }
}

/// The request's WebSocket upgrade (`Upgrade: websocket`), or the answer refusing a malformed
/// one (axum's status and text); `None` for a plain request.
async fn websocket_upgrade(parts: &mut Parts) -> Option<Result<WebSocketUpgrade, Response>> {
    let asked = parts
        .headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !asked {
        return None;
    }
    Some(
        WebSocketUpgrade::from_request_parts(parts, &())
            .await
            .map_err(IntoResponse::into_response),
    )
}

/// The answer to one admitted (non-preflight) request; a stream goes over `upgrade` when the
/// client asked for a WebSocket.
async fn answer(
    app: &Arc<App>,
    parts: &Parts,
    head: downstream::Request<'_>,
    body: Body,
    admitted: Admitted,
    upgrade: Option<WebSocketUpgrade>,
) -> Response {
    let body = if parts.method == Method::POST {
        match read_body(app, parts, body).await {
            Ok(body) => body,
            Err(error) => return from_api(error.into()),
        }
    } else {
        Bytes::new()
    };
    let request = downstream::Request {
        body: &body,
        ..head
    };
    let snapshot = app.current();
    let freshness = app.freshness(snapshot.is_some());
    // Only streams use the jitter (their retry and max age): no random draw per poll.
    let jitter = if admitted.route.is_stream() {
        random_unit()
    } else {
        0.5
    };
    let answer = app.downstream.dispatch(
        now(),
        &request,
        admitted,
        snapshot.as_ref(),
        freshness,
        jitter,
    );
    match answer {
        Answer::Respond(response) => from_api(response),
        Answer::Stream { subscriber, .. } => match upgrade {
            Some(upgrade) => {
                let hold = parts.extensions.get::<ConnectionHold>().cloned();
                sse::websocket(app, subscriber, upgrade, hold)
            }
            None => sse::response(
                app,
                subscriber,
                request.accept_encoding,
                snapshot.as_deref(),
            ),
        },
        Answer::NeedUserFlags(pending) => {
            let flags = user_flags(app, pending.user_id(), pending.revision()).await;
            from_api(app.downstream.finish(pending, &flags))
        }
        Answer::Forward(forward) => from_api(forward_upstream(app, forward)),
        Answer::Health => from_api(health_of(app)),
        Answer::Metrics => from_api(metrics_of(app)),
    }
}

/// `/api/health` of one environment's state.
pub(crate) fn health_of(app: &App) -> ApiResponse {
    let upstream = app.upstream().map(|u| &u.api_key);
    app.downstream
        .health(now(), app.current().as_deref(), &app.report(), upstream)
}

/// `/metrics` of one environment's state.
pub(crate) fn metrics_of(app: &App) -> ApiResponse {
    app.downstream.metrics(
        now(),
        app.current().as_deref(),
        &app.report(),
        MetricsExtra {
            dropped: lock(&app.outbox).dropped(),
            persisted: app.persisted.as_ref().map(|written| written.report()),
            ..MetricsExtra::default()
        },
    )
}

/// Hands a body on to upstream (identify at once, events and telemetry through the outbox's
/// batches) and returns the client's answer.
fn forward_upstream(app: &Arc<App>, forward: Forward) -> ApiResponse {
    let Forward {
        kind,
        body,
        response,
        user_id,
        ..
    } = forward;
    let Some(upstream) = app.upstream() else {
        return response;
    };
    let result = match kind {
        SideRequest::Identify => {
            let recorder = Arc::clone(app);
            forward::identify(
                Arc::clone(upstream),
                Arc::clone(&app.identifies),
                user_id.unwrap_or_default(),
                body,
                move |kind, outcome| recorder.downstream.metrics.side_request(kind, outcome),
            );
            Ok(())
        }
        SideRequest::Events => lock(&app.outbox).push_events(&body).map(drop),
        SideRequest::Telemetry | SideRequest::UserFlags => {
            lock(&app.outbox).push_telemetry(now(), &body).map(drop)
        }
    };
    match result {
        Ok(()) => response,
        Err(error) => error.into(),
    }
}

fn check_limits(app: &App, parts: &Parts) -> Result<(), ApiError> {
    let settings = &app.settings;
    let uri_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > settings.max_uri_length {
        return Err(ApiError::uri_too_long(settings.max_uri_length));
    }
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > settings.max_header_bytes {
        return Err(ApiError::headers_too_large(settings.max_header_bytes));
    }
    Ok(())
}

/// Headers a data answer carries: content type, `ETag`, `Cache-Control`, `Vary`,
/// `Content-Encoding`, two of CORS and `X-Request-ID`.
const ANSWER_HEADERS: usize = 8;

/// Turns core's response into HTTP, adding nothing to the bytes.
pub fn from_api(response: ApiResponse) -> Response {
    let mut out = Response::new(Body::from(response.body));
    *out.status_mut() = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    let headers = out.headers_mut();
    // Core's headers, CORS and the request id in one allocation: the map would otherwise
    // grow (and rehash) past its first six entries on every data answer.
    headers.reserve(ANSWER_HEADERS);
    if let Some(content_type) = response.content_type {
        let value = if content_type == rollgate_proxy_core::api::JSON {
            JSON.clone()
        } else {
            HeaderValue::from_static(content_type)
        };
        headers.insert(header::CONTENT_TYPE, value);
    }
    for (name, value) in response.headers {
        // The common names and values without parsing; other values take the `String`'s
        // buffer instead of copying it.
        let name = match name {
            "ETag" => header::ETAG,
            "Cache-Control" => header::CACHE_CONTROL,
            "Retry-After" => header::RETRY_AFTER,
            "Vary" => header::VARY,
            "Content-Encoding" => header::CONTENT_ENCODING,
            other => match HeaderName::from_bytes(other.as_bytes()) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        let value = if value == rollgate_proxy_core::api::NO_CACHE {
            NO_CACHE.clone()
        } else {
            match HeaderValue::from_maybe_shared(Bytes::from(value)) {
                Ok(value) => value,
                Err(_) => continue,
            }
        };
        headers.insert(name, value);
    }
    out
}

async fn read_body(app: &App, parts: &Parts, body: Body) -> Result<Bytes, ApiError> {
    let limit = app.settings.core.body_limit;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    let collected = tokio::time::timeout(
        app.settings.request_timeout,
        Limited::new(body, limit).collect(),
    )
    .await;
    match collected {
        Err(_) => Err(ApiError::request_timeout()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::payload_too_large(limit))
        }
        Ok(Err(_)) => Err(ApiError::bad_request("the request body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}
