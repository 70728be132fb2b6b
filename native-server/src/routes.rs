//! HTTP handling: one fallback handler routes with core's `Route::parse` (so 404/405 bodies match
//! the Worker's), applies limits and client keys, and turns core's `ApiResponse`s into HTTP.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use rollgate_proxy_core::api::{
    self, ApiError, ApiResponse, HealthReport, Route, UpstreamHealth, ofrep,
};
use rollgate_proxy_core::breaker::BreakerState;
use rollgate_proxy_core::model::{Context, EvaluatedFlags};
use rollgate_proxy_core::snapshot::{ContextFlags, Freshness, Snapshot};
use tracing::Instrument;

use crate::config::CorsOrigins;
use crate::metrics as m;
use crate::sse::{self, StreamKind};
use crate::state::{App, lock, now};
use crate::users::user_flags;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const DEMO_CSS: &str = include_str!("../assets/demo.css");
const DEMO_JS: &str = include_str!("../assets/demo.js");
const CLIENT_JS: &str = include_str!("../../clients/js/src/index.js");

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The application: one fallback handler that also answers CORS.
pub fn router(app: Arc<App>) -> Router {
    let cors = Cors::new(&app.settings.cors);
    Router::new()
        .fallback(handle)
        .with_state(Arc::new(Served { app, cors }))
}

/// What the handler needs: the state and the CORS policy, behind one `Arc` (one clone per
/// request).
#[derive(Debug)]
struct Served {
    app: Arc<App>,
    cors: Cors,
}

/// CORS as tower-http's `CorsLayer` answered it for this policy (methods, headers, exposed
/// headers, max age 600 s, default `Vary`), with every header value built once instead of per
/// request: the layer cost about a third of the polling hot path. One difference on purpose:
/// an origin outside the allow-list gets no CORS header at all (tower-http would still send
/// `Access-Control-Expose-Headers`).
#[derive(Debug)]
struct Cors {
    /// `None`: any origin (`*`).
    allowed: Option<Vec<HeaderValue>>,
}

static ANY_ORIGIN: HeaderValue = HeaderValue::from_static("*");
static VARY: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);
static ALLOW_METHODS: HeaderValue = HeaderValue::from_static("GET,HEAD,POST,OPTIONS");
/// The browser SDK's headers, including its tracing headers (protocol doc §1.1).
static ALLOW_HEADERS: HeaderValue = HeaderValue::from_static(
    "authorization,content-type,if-none-match,cache-control,x-api-key,last-event-id,\
     x-request-id,x-trace-id,x-span-id,traceparent,x-sdk-name,x-sdk-version",
);
static EXPOSE_HEADERS: HeaderValue = HeaderValue::from_static("etag,retry-after,x-request-id");
static MAX_AGE: HeaderValue = HeaderValue::from_static("600");

impl Cors {
    fn new(origins: &CorsOrigins) -> Self {
        let allowed = match origins {
            CorsOrigins::Any => None,
            CorsOrigins::List(list) => Some(
                list.iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok())
                    .collect(),
            ),
        };
        Self { allowed }
    }

    /// `Access-Control-Allow-Origin` for a request from `origin`, if it is allowed.
    fn allow_origin(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match &self.allowed {
            None => Some(ANY_ORIGIN.clone()),
            Some(list) => origin.filter(|o| list.contains(o)).cloned(),
        }
    }

    /// The answer to any `OPTIONS` request (it never reaches the routes).
    fn preflight(&self, origin: Option<&HeaderValue>) -> Response {
        let mut response = Response::new(Body::empty());
        let headers = response.headers_mut();
        headers.insert(header::VARY, VARY.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS.clone());
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE.clone());
        if let Some(allow) = self.allow_origin(origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        }
        response
    }

    /// Adds the CORS headers of an actual (non-preflight) request's answer.
    fn decorate(&self, origin: Option<&HeaderValue>, response: &mut Response) {
        let headers = response.headers_mut();
        headers.append(header::VARY, VARY.clone());
        if let Some(allow) = self.allow_origin(origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        }
        if headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                EXPOSE_HEADERS.clone(),
            );
        } else {
            headers.remove(header::ACCESS_CONTROL_EXPOSE_HEADERS);
        }
    }
}

async fn handle(State(served): State<Arc<Served>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let Served { app, cors } = &*served;
    let origin = parts.headers.get(header::ORIGIN);
    if parts.method == Method::OPTIONS {
        return cors.preflight(origin);
    }
    // The caller's id when it is usable, else a sequence number as 16 hex digits; kept as a
    // `HeaderValue` (a cheap clone of the caller's bytes) so it is formatted at most once.
    let request_id = match parts.headers.get(&X_REQUEST_ID).filter(|v| {
        let v = v.as_bytes();
        !v.is_empty() && v.len() <= 128 && v.iter().all(u8::is_ascii_graphic)
    }) {
        Some(value) => value.clone(),
        None => sequence_id(app.request_seq.fetch_add(1, Ordering::Relaxed)),
    };
    let route = Route::parse(parts.method.as_str(), parts.uri.path());
    let label = route.as_ref().map_or("unmatched", Route::label);
    let span = tracing::debug_span!(
        "request",
        id = request_id.to_str().unwrap_or_default(),
        method = %parts.method,
        route = label
    );
    let mut response = async {
        if let Err(error) = check_limits(app, &parts) {
            return error_response(&error);
        }
        match route {
            Ok(route) => dispatch(app, route, &parts, body)
                .await
                .unwrap_or_else(|error| error_response(&error)),
            Err(error) => error_response(&error),
        }
    }
    .instrument(span.clone())
    .await;
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id);
    cors.decorate(origin, &mut response);
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    m::request(label, status, elapsed);
    tracing::debug!(parent: &span, status, micros = elapsed.as_micros() as u64, "answered");
    response
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

fn check_limits(app: &App, parts: &Parts) -> Result<(), ApiError> {
    let settings = &app.settings;
    let uri_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > settings.max_uri_length {
        return Err(ApiError::new(
            414,
            "URI_TOO_LONG",
            format!(
                "request URI is longer than {} bytes",
                settings.max_uri_length
            ),
        ));
    }
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > settings.max_header_bytes {
        return Err(ApiError::new(
            431,
            "HEADERS_TOO_LARGE",
            format!(
                "request headers are larger than {} bytes",
                settings.max_header_bytes
            ),
        ));
    }
    Ok(())
}

/// Turns core's response into HTTP, adding nothing to the bytes.
pub fn from_api(response: ApiResponse) -> Response {
    let mut out = Response::new(Body::from(response.body));
    *out.status_mut() = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    let headers = out.headers_mut();
    if let Some(content_type) = response.content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    for (name, value) in response.headers {
        // Takes the `String`'s buffer instead of copying it.
        if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
            headers.insert(name, value);
        }
    }
    out
}

fn error_response(error: &ApiError) -> Response {
    from_api(ApiResponse::error(error))
}

fn json_static(body: &'static [u8]) -> Response {
    from_api(ApiResponse::json(Bytes::from_static(body)))
}

fn text(body: &'static str, content_type: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn dispatch(
    app: &Arc<App>,
    route: Route,
    parts: &Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let query = parts.uri.query().unwrap_or("");
    let header = |name: &HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let if_none_match = header(&header::IF_NONE_MATCH);
    let client_key = if route.needs_client_key() {
        app.settings.client_keys.matching_key(
            header(&header::AUTHORIZATION),
            header(&X_API_KEY),
            query,
        )?
    } else {
        None
    };
    let response = match route {
        Route::Flags => {
            let context = if parts.method == Method::POST {
                api::context_from_body(&read_body(app, parts, body).await?)?
            } else {
                api::context_from_query(query)?
            };
            let snapshot = ready(app)?;
            let flags = context_flags(app, &snapshot, context).await?;
            from_api(api::flags_response(&snapshot, flags, if_none_match))
        }
        Route::Flag(key) => {
            let context = api::context_from_query(query)?;
            let snapshot = ready(app)?;
            let flags = context_flags(app, &snapshot, context).await?;
            from_api(api::flag_response(&key, &flags)?)
        }
        Route::SdkFlags => {
            let context = api::context_from_query(query)?;
            let snapshot = ready(app)?;
            let flags = context_flags(app, &snapshot, context).await?;
            from_api(api::sdk_flags_response(
                &snapshot,
                flags,
                query,
                if_none_match,
            ))
        }
        Route::Stream | Route::SdkStream | Route::OfrepStream => {
            let kind = match route {
                Route::Stream => StreamKind::Frontend,
                Route::SdkStream => StreamKind::Sdk,
                _ => StreamKind::Ofrep,
            };
            let context = if kind == StreamKind::Ofrep {
                Context::anonymous()
            } else {
                api::context_from_query(query)?
            };
            let last_event_id = parts
                .headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok());
            sse::response(app, kind, context, last_event_id)
        }
        Route::SdkIdentify => {
            let body = read_body(app, parts, body).await?;
            let context = api::context_from_body(&body)?;
            if context.id.is_none() {
                return Err(ApiError::new(
                    400,
                    "INVALID_CONTEXT",
                    "identify needs {\"user\":{\"id\":...}}",
                ));
            }
            app.identities.remember(&context);
            if let Some(upstream) = &app.upstream {
                crate::forward::identify(Arc::clone(upstream), body);
            }
            json_static(api::IDENTIFY_BODY)
        }
        Route::SdkEvents => {
            let body = read_body(app, parts, body).await?;
            let count = if app.upstream.is_some() {
                app.forwarder.push_events(&body)?
            } else {
                api::count_events(&body)?
            };
            from_api(ApiResponse::json(api::received_body(count as u64)))
        }
        Route::SdkTelemetry => {
            let body = read_body(app, parts, body).await?;
            let count = if app.upstream.is_some() {
                app.forwarder.push_telemetry(&body)?
            } else {
                api::count_telemetry(&body)?
            };
            from_api(ApiResponse::json(api::received_body(count)))
        }
        Route::OfrepFlag(key) => {
            let body = read_body(app, parts, body).await?;
            let context = match ofrep::context(&body) {
                Ok(context) => context,
                Err(error) => return Ok(from_api(error.response(Some(&key)))),
            };
            let snapshot = ready(app)?;
            let flags = context_flags(app, &snapshot, context).await?;
            from_api(ofrep::single(&key, &flags))
        }
        Route::OfrepFlags => {
            let body = read_body(app, parts, body).await?;
            let context = match ofrep::context(&body) {
                Ok(context) => context,
                Err(error) => return Ok(from_api(error.response(None))),
            };
            let snapshot = ready(app)?;
            let flags = context_flags(app, &snapshot, context.clone()).await?;
            from_api(ofrep::bulk(
                &snapshot,
                &context,
                &flags,
                Some(&ofrep::stream_uri(client_key)),
                if_none_match,
            ))
        }
        Route::Health => from_api(ApiResponse::json(health(app).body())),
        Route::Metrics => {
            let mut response = Response::new(Body::from(m::render(app, m::install())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Route::RootHealth | Route::Live => json_static(api::STATUS_OK_BODY),
        Route::Ready => {
            if app.current().is_some() {
                json_static(api::READY_BODY)
            } else {
                return Err(ApiError::not_ready());
            }
        }
        Route::Demo => text(INDEX_HTML, "text/html; charset=utf-8"),
        Route::Asset(name) => {
            let body = match name {
                "demo.css" => DEMO_CSS,
                "demo.js" => DEMO_JS,
                _ => CLIENT_JS,
            };
            text(body, Route::asset_content_type(name))
        }
    };
    Ok(response)
}

/// The current snapshot, counted by freshness, or 503 `NOT_READY`.
fn ready(app: &App) -> Result<Arc<Snapshot>, ApiError> {
    let snapshot = app.current();
    app.cache.record(app.freshness(snapshot.is_some()));
    snapshot.ok_or_else(ApiError::not_ready)
}

/// The flags for `context`: the snapshot's defaults for the anonymous context, a local
/// evaluation in rules mode (with attributes from `/identify` merged in), or the per-user
/// upstream answer in evaluated mode.
///
/// # Errors
/// 502 `UPSTREAM_UNAVAILABLE` when a per-user answer needs upstream and nothing is cached.
pub async fn context_flags<'s>(
    app: &Arc<App>,
    snapshot: &'s Snapshot,
    context: Context,
) -> Result<Cow<'s, EvaluatedFlags>, ApiError> {
    let context = app.identities.merge(context);
    match snapshot.flags_for(&context) {
        ContextFlags::Ready(flags) => {
            if matches!(flags, Cow::Owned(_)) {
                m::evaluation();
            }
            Ok(flags)
        }
        ContextFlags::NeedsUpstream => match &context.id {
            // Upstream evaluates per user id only (no SDK sends attributes on this call).
            None => Ok(Cow::Borrowed(snapshot.defaults())),
            Some(id) => {
                let flags = user_flags(app, id, snapshot.revision()).await?;
                Ok(Cow::Owned(EvaluatedFlags::clone(&flags)))
            }
        },
    }
}

async fn read_body(app: &App, parts: &Parts, body: Body) -> Result<Bytes, ApiError> {
    let limit = app.settings.body_limit;
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
        Err(_) => Err(ApiError::new(
            408,
            "REQUEST_TIMEOUT",
            "the request body did not arrive in time",
        )),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::payload_too_large(limit))
        }
        Ok(Err(_)) => Err(ApiError::bad_request("the request body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn health(app: &App) -> HealthReport {
    let snapshot = app.current();
    let (circuit, stream, mode, fresh, last_error, source) = match (&app.upstream, &app.local) {
        (Some(upstream), _) => {
            let status = upstream.status();
            (
                status.breaker.state,
                status.stream.as_str(),
                status.mode,
                status.freshness == Freshness::Fresh,
                status
                    .last_error
                    .map(|e| upstream.api_key.redact(&e.to_string())),
                "upstream",
            )
        }
        (None, local) => (
            BreakerState::Closed,
            "disabled",
            snapshot.as_ref().map(|s| s.source().mode()),
            snapshot.is_some(),
            local.as_ref().and_then(|l| lock(&l.last_error).clone()),
            "local",
        ),
    };
    let degraded = circuit == BreakerState::Open || !fresh || snapshot.is_none();
    HealthReport {
        status: if degraded { "degraded" } else { "healthy" },
        circuit: circuit.as_str(),
        cache: app.cache.stats(),
        source,
        upstream: UpstreamHealth {
            stream,
            mode,
            fresh,
            last_error,
        },
        revision: snapshot.as_ref().map(|s| s.revision().get()),
        etag: snapshot.as_ref().map(|s| s.etag().to_owned()),
        data_age_ms: app
            .last_confirmed()
            .map(|at| u64::try_from(now().saturating_since(at).as_millis()).unwrap_or(u64::MAX)),
        flags: snapshot.as_ref().map_or(0, |s| s.defaults().flags.len()),
        sse_clients: app.sse_clients.load(Ordering::Relaxed),
    }
}
