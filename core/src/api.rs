//! The downstream API as plain data: routes, request parsing, auth, and every response body.
//!
//! Adapters turn HTTP into these calls and the results back into HTTP; they add nothing to the
//! bytes. That is what keeps the native server and the Worker byte-identical: the routes, the
//! error bodies, the ETag decisions and the OFREP shapes are decided here once.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::encoding::{self, Encoding, Variants};
use crate::model::{AttributeValue, Context, EvaluatedFlags, FlagKey, Reason, ReasonKind};
use crate::render::{self, json_body};
use crate::snapshot::{CacheStats, Snapshot};
use crate::stream::StreamKind;

/// The public routes. Paths are matched exactly (no trailing-slash variants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /api/flags`, `POST /api/flags` (context in the body).
    Flags,
    /// `GET /api/flags/{key}`.
    Flag(String),
    /// `GET /api/stream`: the frontend SSE stream (`event: flags`).
    Stream,
    /// `GET /api/health`.
    Health,
    /// `GET /api/metrics`: Prometheus text.
    Metrics,
    /// `GET /api/v1/sdk/flags`: the Rollgate SDK API.
    SdkFlags,
    /// `GET /api/v1/sdk/stream`: the Rollgate SDK stream (`event: init`).
    SdkStream,
    /// `POST /api/v1/sdk/identify`.
    SdkIdentify,
    /// `POST /api/v1/sdk/events`.
    SdkEvents,
    /// `POST /api/v1/sdk/telemetry`.
    SdkTelemetry,
    /// `GET /health`: what the Rollgate SDK harness checks.
    RootHealth,
    /// `POST /ofrep/v1/evaluate/flags/{key}`.
    OfrepFlag(String),
    /// `POST /ofrep/v1/evaluate/flags`.
    OfrepFlags,
    /// `GET /ofrep/v1/sse`: OFREP ADR-0008 notifications.
    OfrepStream,
    /// `GET /live`: the process is up.
    Live,
    /// `GET /ready`: there is data to serve.
    Ready,
    /// `GET /`: the live demo page.
    Demo,
    /// `GET /rollgate-proxy-client.js`, `/demo.js`, `/demo.css`: the demo page's static files,
    /// by file name (see [`crate::assets::response`]).
    Asset(&'static str),
}

impl Route {
    /// Matches a method and path.
    ///
    /// # Errors
    /// [`ApiError::not_found`] for an unknown path, [`ApiError::method_not_allowed`] for a known
    /// path with the wrong method.
    pub fn parse(method: &str, path: &str) -> Result<Self, ApiError> {
        let get = method == "GET" || method == "HEAD";
        let post = method == "POST";
        let (route, allowed) = match path {
            "/api/flags" => (Self::Flags, get || post),
            "/api/stream" => (Self::Stream, get),
            "/api/health" => (Self::Health, get),
            "/api/metrics" => (Self::Metrics, get),
            "/api/v1/sdk/flags" => (Self::SdkFlags, get),
            "/api/v1/sdk/stream" => (Self::SdkStream, get),
            "/api/v1/sdk/identify" => (Self::SdkIdentify, post),
            "/api/v1/sdk/events" => (Self::SdkEvents, post),
            "/api/v1/sdk/telemetry" => (Self::SdkTelemetry, post),
            "/health" => (Self::RootHealth, get),
            "/ofrep/v1/evaluate/flags" => (Self::OfrepFlags, post),
            "/ofrep/v1/sse" => (Self::OfrepStream, get),
            "/live" => (Self::Live, get),
            "/ready" => (Self::Ready, get),
            "/" | "/demo" => (Self::Demo, get),
            "/rollgate-proxy-client.js" => (Self::Asset("rollgate-proxy-client.js"), get),
            "/demo.js" => (Self::Asset("demo.js"), get),
            "/demo.css" => (Self::Asset("demo.css"), get),
            _ => {
                if let Some(key) = path.strip_prefix("/api/flags/") {
                    (Self::Flag(percent_decode(key)?), get)
                } else if let Some(key) = path.strip_prefix("/ofrep/v1/evaluate/flags/") {
                    (Self::OfrepFlag(percent_decode(key)?), post)
                } else {
                    return Err(ApiError::not_found(path));
                }
            }
        };
        if allowed {
            Ok(route)
        } else {
            Err(ApiError::method_not_allowed(method))
        }
    }

    /// Whether the route serves flag data, and so needs a client key when keys are configured.
    /// Health, metrics, probes and the demo page's static files never do.
    pub fn needs_client_key(&self) -> bool {
        !matches!(
            self,
            Self::Health
                | Self::Metrics
                | Self::RootHealth
                | Self::Live
                | Self::Ready
                | Self::Demo
                | Self::Asset(_)
        )
    }

    /// Whether the route may be shed under overload: everything but the probes, health and
    /// metrics, which must keep answering exactly when the proxy is busiest.
    pub fn is_sheddable(&self) -> bool {
        !matches!(
            self,
            Self::Live | Self::Ready | Self::RootHealth | Self::Health | Self::Metrics
        )
    }

    /// Whether the route is an SSE stream.
    pub fn is_stream(&self) -> bool {
        self.stream_kind().is_some()
    }

    /// The stream a route opens, if it is one.
    pub fn stream_kind(&self) -> Option<StreamKind> {
        match self {
            Self::Stream => Some(StreamKind::Frontend),
            Self::SdkStream => Some(StreamKind::Sdk),
            Self::OfrepStream => Some(StreamKind::Ofrep),
            _ => None,
        }
    }

    /// Whether the route answers flags from a snapshot (so an edge cache may keep its answer
    /// per snapshot).
    pub fn is_polling(&self) -> bool {
        matches!(
            self,
            Self::Flags | Self::Flag(_) | Self::SdkFlags | Self::OfrepFlag(_) | Self::OfrepFlags
        )
    }

    /// Whether the answer depends on no state at all (probes of the process, the demo page).
    pub fn is_stateless(&self) -> bool {
        matches!(
            self,
            Self::Live | Self::RootHealth | Self::Demo | Self::Asset(_)
        )
    }

    /// A label for metrics (the route template, never the raw path: keys would explode label
    /// cardinality).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Flags => "/api/flags",
            Self::Flag(_) => "/api/flags/:key",
            Self::Stream => "/api/stream",
            Self::Health => "/api/health",
            Self::Metrics => "/api/metrics",
            Self::SdkFlags => "/api/v1/sdk/flags",
            Self::SdkStream => "/api/v1/sdk/stream",
            Self::SdkIdentify => "/api/v1/sdk/identify",
            Self::SdkEvents => "/api/v1/sdk/events",
            Self::SdkTelemetry => "/api/v1/sdk/telemetry",
            Self::RootHealth => "/health",
            Self::OfrepFlag(_) => "/ofrep/v1/evaluate/flags/:key",
            Self::OfrepFlags => "/ofrep/v1/evaluate/flags",
            Self::OfrepStream => "/ofrep/v1/sse",
            Self::Live => "/live",
            Self::Ready => "/ready",
            Self::Demo => "/",
            Self::Asset(_) => "/asset",
        }
    }
}

/// Every error code the API answers with, and its status: one list for both adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request is malformed.
    BadRequest,
    /// 400: a flag key outside `[A-Za-z0-9._:-]{1,256}`.
    InvalidFlagKey,
    /// 400: the evaluation context is invalid or exceeds the limits.
    InvalidContext,
    /// 401: client keys are configured and none matched.
    Unauthorized,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists with another method.
    MethodNotAllowed,
    /// 408: the request head or body did not arrive in time.
    RequestTimeout,
    /// 413: the request body is larger than the limit.
    PayloadTooLarge,
    /// 414: the request URI is longer than the limit.
    UriTooLong,
    /// 431: the request headers are larger than the limit.
    HeadersTooLarge,
    /// 500: the adapter failed.
    Internal,
    /// 502: a per-user answer needed upstream and upstream failed.
    UpstreamUnavailable,
    /// 503: no flag data yet.
    NotReady,
    /// 503: too many requests in flight; retry after the `Retry-After` delay.
    Overloaded,
}

impl ErrorCode {
    /// The HTTP status.
    pub const fn status(self) -> u16 {
        match self {
            Self::BadRequest | Self::InvalidFlagKey | Self::InvalidContext => 400,
            Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::PayloadTooLarge => 413,
            Self::UriTooLong => 414,
            Self::HeadersTooLarge => 431,
            Self::Internal => 500,
            Self::UpstreamUnavailable => 502,
            Self::NotReady | Self::Overloaded => 503,
        }
    }

    /// The stable machine-readable code of the body.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "BAD_REQUEST",
            Self::InvalidFlagKey => "INVALID_FLAG_KEY",
            Self::InvalidContext => "INVALID_CONTEXT",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::RequestTimeout => "REQUEST_TIMEOUT",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UriTooLong => "URI_TOO_LONG",
            Self::HeadersTooLarge => "HEADERS_TOO_LARGE",
            Self::Internal => "INTERNAL",
            Self::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            Self::NotReady => "NOT_READY",
            Self::Overloaded => "OVERLOADED",
        }
    }
}

/// An error answer: status plus `{"error":{"code","message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {}: {message}", code.status(), code.as_str())]
pub struct ApiError {
    /// What went wrong (gives the status and the code string).
    pub code: ErrorCode,
    /// Human-readable explanation; never contains secrets.
    pub message: String,
}

impl ApiError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// 400 `BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 404 `NOT_FOUND`.
    pub fn not_found(path: &str) -> Self {
        let shown: String = path.chars().take(128).collect();
        Self::new(ErrorCode::NotFound, format!("no route for {shown:?}"))
    }

    /// 405 `METHOD_NOT_ALLOWED`.
    pub fn method_not_allowed(method: &str) -> Self {
        let shown: String = method.chars().take(16).collect();
        Self::new(
            ErrorCode::MethodNotAllowed,
            format!("method {shown} is not allowed here"),
        )
    }

    /// 401 `UNAUTHORIZED`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 413 `PAYLOAD_TOO_LARGE`.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {limit} bytes"),
        )
    }

    /// 414 `URI_TOO_LONG`.
    pub fn uri_too_long(limit: usize) -> Self {
        Self::new(
            ErrorCode::UriTooLong,
            format!("request URI is longer than {limit} bytes"),
        )
    }

    /// 431 `HEADERS_TOO_LARGE`.
    pub fn headers_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::HeadersTooLarge,
            format!("request headers are larger than {limit} bytes"),
        )
    }

    /// 408 `REQUEST_TIMEOUT`.
    pub fn request_timeout() -> Self {
        Self::new(
            ErrorCode::RequestTimeout,
            "the request did not arrive in time",
        )
    }

    /// 500 `INTERNAL`.
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error")
    }

    /// 503 `NOT_READY`: no flag data yet (from upstream or disk).
    pub fn not_ready() -> Self {
        Self::new(
            ErrorCode::NotReady,
            "no flag data yet: waiting for the first snapshot from upstream",
        )
    }

    /// 502 `UPSTREAM_UNAVAILABLE`: a per-user answer needed upstream and upstream failed.
    pub fn upstream_unavailable() -> Self {
        Self::new(
            ErrorCode::UpstreamUnavailable,
            "flags for this user need upstream, which is unavailable",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        json_body(&Outer {
            error: Inner {
                code: self.code.as_str(),
                message: &self.message,
            },
        })
    }
}

/// A response as plain data. `headers` are in addition to `Content-Type` (given by `content_type`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, or `None` for empty bodies (304).
    pub content_type: Option<&'static str>,
    /// Extra headers (`ETag`, `Cache-Control`, `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Bytes,
}

impl ApiResponse {
    /// 200 with a JSON body.
    pub fn json(body: Bytes) -> Self {
        Self {
            status: 200,
            content_type: Some(JSON),
            headers: Vec::new(),
            body,
        }
    }

    /// A JSON body with an ETag, or 304 when `if_none_match` matches it.
    pub fn json_with_etag(body: Bytes, etag: &str, if_none_match: Option<&str>) -> Self {
        let mut headers = vec![
            ("ETag", etag.to_owned()),
            ("Cache-Control", NO_CACHE.to_owned()),
        ];
        if if_none_match.is_some_and(|header| render::if_none_match_matches(header, etag)) {
            headers.shrink_to_fit();
            return Self {
                status: 304,
                content_type: None,
                headers,
                body: Bytes::new(),
            };
        }
        Self {
            status: 200,
            content_type: Some(JSON),
            headers,
            body,
        }
    }

    /// A shared JSON body in the coding `accept_encoding` prefers among `variants` (identity
    /// when none fits), with that coding's ETag (`etag` with a suffix, see
    /// [`Encoding::etag`]), or 304 when `if_none_match` names the content in any coding.
    pub fn json_negotiated(
        identity: &Bytes,
        variants: &Variants,
        etag: &str,
        if_none_match: Option<&str>,
        accept_encoding: Option<&str>,
    ) -> Self {
        let (encoding, body) = variants
            .choose(accept_encoding)
            .map_or((Encoding::Identity, identity), |(e, b)| (e, b));
        let matches = if_none_match.is_some_and(|header| encoding::etag_matches_any(header, etag));
        // Room for `Content-Encoding` and the `Vary` every caller adds: one allocation.
        let mut headers = Vec::with_capacity(4);
        headers.push(("ETag", encoding.etag(etag)));
        headers.push(("Cache-Control", NO_CACHE.to_owned()));
        if matches {
            return Self {
                status: 304,
                content_type: None,
                headers,
                body: Bytes::new(),
            };
        }
        if let Some(coding) = encoding.header() {
            headers.push(("Content-Encoding", coding.to_owned()));
        }
        Self {
            status: 200,
            content_type: Some(JSON),
            headers,
            body: body.clone(),
        }
    }

    /// Adds `Vary: Accept-Encoding`: answers of routes whose body may be compressed carry it
    /// whatever their coding, so a shared cache never hands gzip to a client that did not ask.
    #[must_use]
    pub fn vary_encoding(mut self) -> Self {
        self.headers.push(("Vary", VARY_ENCODING.to_owned()));
        self
    }

    /// The error's status and JSON body.
    pub fn error(error: &ApiError) -> Self {
        let mut response = Self::json(error.body());
        response.status = error.status();
        if error.code == ErrorCode::NotReady {
            response.headers.push(("Retry-After", "1".to_owned()));
        }
        response
    }
}

impl From<ApiError> for ApiResponse {
    fn from(error: ApiError) -> Self {
        Self::error(&error)
    }
}

/// Configured client keys. Empty: the API is open.
#[derive(Clone, Default)]
pub struct ClientKeys(Vec<String>);

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: show how many, never which.
        write!(f, "ClientKeys({} configured)", self.0.len())
    }
}

impl ClientKeys {
    /// Keys that unlock the data routes.
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        Self(keys.into_iter().filter(|k| !k.is_empty()).collect())
    }

    /// The configured keys (for building an environments router; never log them).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Whether any key is configured.
    pub fn is_enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// Checks a request's key, from `Authorization: Bearer <key>`, `X-API-Key` (OFREP), or the
    /// `token` query parameter (EventSource cannot send headers). Comparison is constant-time.
    ///
    /// # Errors
    /// [`ApiError::unauthorized`] when keys are configured and none given matches.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
        query: &str,
    ) -> Result<(), ApiError> {
        self.matching_key(authorization, api_key, query).map(drop)
    }

    /// Like [`ClientKeys::authorize`], and returns the configured key the request presented
    /// (`None` when no keys are configured), so an answer can hand the same key on, as OFREP's
    /// `eventStreams` URL must for an `EventSource` that cannot send headers.
    ///
    /// # Errors
    /// [`ApiError::unauthorized`] when keys are configured and none given matches.
    pub fn matching_key(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
        query: &str,
    ) -> Result<Option<&str>, ApiError> {
        if !self.is_enabled() {
            return Ok(None);
        }
        let offered = OfferedKeys::of(authorization, api_key, query)?;
        // Compare against every key in constant time, so timing reveals neither which key nor
        // how much of it matched.
        let mut matched = None;
        for given in offered.iter() {
            for key in &self.0 {
                if bool::from(key.as_bytes().ct_eq(given.as_bytes())) {
                    matched = Some(key.as_str());
                }
            }
        }
        matched
            .map(Some)
            .ok_or_else(|| ApiError::unauthorized("the client key is not valid"))
    }
}

/// The client keys a request offers, from where clients put them: `Authorization: Bearer`,
/// `X-API-Key`, and `?token=` (an `EventSource` cannot send headers).
pub(crate) struct OfferedKeys<'a> {
    bearer: Option<&'a str>,
    api_key: Option<&'a str>,
    token: Option<Cow<'a, str>>,
}

impl<'a> OfferedKeys<'a> {
    /// The keys offered by a request with these headers and query.
    ///
    /// # Errors
    /// [`ApiError::unauthorized`] saying how to send a key when none is offered.
    pub(crate) fn of(
        authorization: Option<&'a str>,
        api_key: Option<&'a str>,
        query: &'a str,
    ) -> Result<Self, ApiError> {
        let bearer = authorization.and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let token = query_pairs(query)
            .find(|(name, _)| name == "token")
            .map(|(_, value)| value);
        let offered = Self {
            bearer,
            api_key: api_key.map(str::trim),
            token,
        };
        if offered.iter().next().is_none() {
            return Err(ApiError::unauthorized(
                "a client key is required: send Authorization: Bearer <key>, or ?token=<key> \
                 for EventSource",
            ));
        }
        Ok(offered)
    }

    /// Each offered key (up to three).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        [self.bearer, self.api_key, self.token.as_deref()]
            .into_iter()
            .flatten()
    }
}

/// Limits on client-supplied contexts.
pub mod limits {
    /// Most attributes in one context.
    pub const MAX_ATTRIBUTES: usize = 64;
    /// Longest attribute name, in bytes.
    pub const MAX_ATTRIBUTE_NAME: usize = 128;
    /// Longest attribute value, user id or email, in bytes.
    pub const MAX_VALUE: usize = 1024;
}

/// The context of a request from its query: `user_id`, `email`, and `attr.<name>=<value>`.
/// Unknown parameters (such as `token` or `withReasons`) are ignored.
///
/// # Errors
/// 400 `INVALID_CONTEXT` when a limit in [`limits`] is exceeded or a value is empty-named.
pub fn context_from_query(query: &str) -> Result<Context, ApiError> {
    let mut context = Context::anonymous();
    for (name, value) in query_pairs(query) {
        match name.as_ref() {
            "user_id" | "userId" => context.id = non_empty(checked_value("user_id", &value)?),
            "email" => context.email = non_empty(checked_value("email", &value)?),
            other => {
                if let Some(attribute) = other.strip_prefix("attr.") {
                    insert_attribute(
                        &mut context,
                        attribute,
                        AttributeValue::String(checked_value(attribute, &value)?),
                    )?;
                }
            }
        }
    }
    Ok(context)
}

/// `context` as the query [`context_from_query`] reads back (`user_id`, `email`, `attr.<name>`),
/// for an internal request that must carry a context.
pub fn context_to_query(context: &Context) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(id) = &context.id {
        query.append_pair("user_id", id);
    }
    if let Some(email) = &context.email {
        query.append_pair("email", email);
    }
    for (name, value) in &context.attributes {
        query.append_pair(&format!("attr.{name}"), &value.to_js_string());
    }
    query.finish()
}

/// The context of `POST /api/flags` and `POST /api/v1/sdk/identify`:
/// `{"user":{"id","email","attributes"}}`. An empty body is the anonymous context.
///
/// # Errors
/// 400 `INVALID_CONTEXT` for invalid JSON, wrong types, or exceeded [`limits`].
pub fn context_from_body(body: &[u8]) -> Result<Context, ApiError> {
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        user: Option<Context>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Context::anonymous());
    }
    let body: Body = serde_json::from_slice(body).map_err(|error| {
        invalid_context(format!(
            "expected {{\"user\":{{\"id\",\"email\",\"attributes\"}}}}: {error}"
        ))
    })?;
    let user = body.user.unwrap_or_default();
    let mut context = Context {
        id: user
            .id
            .map(|id| checked_value("id", &id))
            .transpose()?
            .and_then(non_empty),
        email: user
            .email
            .map(|email| checked_value("email", &email))
            .transpose()?
            .and_then(non_empty),
        attributes: BTreeMap::new(),
    };
    for (name, value) in user.attributes {
        insert_attribute(&mut context, &name, value)?;
    }
    Ok(context)
}

/// `GET /api/flags` (and `POST`): the flag map with `_meta.cachedAt`, ETag and 304.
///
/// The anonymous body is sent in the coding `accept_encoding` prefers among the snapshot's
/// precompressed variants ([`encoding`]); every answer carries `Vary: Accept-Encoding`.
pub fn flags_response(
    snapshot: &Snapshot,
    flags: Cow<'_, EvaluatedFlags>,
    if_none_match: Option<&str>,
    accept_encoding: Option<&str>,
) -> ApiResponse {
    let response = match flags {
        Cow::Borrowed(_) => ApiResponse::json_negotiated(
            snapshot.flags_body(),
            snapshot.flags_body_variants(),
            snapshot.etag(),
            if_none_match,
            accept_encoding,
        ),
        Cow::Owned(flags) => ApiResponse::json_with_etag(
            render::flags_body(&flags, snapshot.cached_at()),
            &flags_etag(&flags),
            if_none_match,
        ),
    };
    response.vary_encoding()
}

/// `GET /api/flags/{key}`: `{"key","enabled"}`; unknown keys are `false`, as
/// `isEnabled(key, false)`.
///
/// # Errors
/// 400 `INVALID_FLAG_KEY` for a key outside `[A-Za-z0-9._:-]{1,256}`.
pub fn flag_response(key: &str, flags: &EvaluatedFlags) -> Result<ApiResponse, ApiError> {
    let key = FlagKey::parse(key)
        .map_err(|error| ApiError::new(ErrorCode::InvalidFlagKey, error.to_string()))?;
    let enabled = flags.is_enabled(key.as_str(), false);
    let mut response = ApiResponse::json(render::flag_body(key.as_str(), enabled));
    response
        .headers
        .push(("Cache-Control", NO_CACHE.to_owned()));
    Ok(response)
}

/// `GET /api/v1/sdk/flags`: `{"flags"}` or `{"flags","reasons"}` (with `withReasons=true`),
/// quoted ETag, 304; the anonymous body in the coding negotiated as for [`flags_response`].
pub fn sdk_flags_response(
    snapshot: &Snapshot,
    flags: Cow<'_, EvaluatedFlags>,
    with_reasons: bool,
    if_none_match: Option<&str>,
    accept_encoding: Option<&str>,
) -> ApiResponse {
    let response = match flags {
        Cow::Borrowed(_) => ApiResponse::json_negotiated(
            snapshot.sdk_body(with_reasons),
            snapshot.sdk_body_variants(with_reasons),
            snapshot.etag(),
            if_none_match,
            accept_encoding,
        ),
        Cow::Owned(flags) => ApiResponse::json_with_etag(
            render::sdk_flags_body(&flags, with_reasons),
            &flags_etag(&flags),
            if_none_match,
        ),
    };
    response.vary_encoding()
}

/// Whether the query asks for reasons (`withReasons=true`, as the SDKs send it).
pub fn with_reasons(query: &str) -> bool {
    query_pairs(query).any(|(name, value)| name == "withReasons" && value == "true")
}

/// The ETag of a per-context answer: a hash of its values and reasons.
pub fn flags_etag(flags: &EvaluatedFlags) -> String {
    render::etag_for(&render::sdk_flags_body(flags, true))
}

/// `POST /api/v1/sdk/events`: how many events a batch holds (`{"events":[..]}`).
///
/// # Errors
/// 400 `BAD_REQUEST` when the body is not `{"events":[...]}`.
pub fn count_events(body: &[u8]) -> Result<usize, ApiError> {
    #[derive(Deserialize)]
    struct Batch {
        events: Vec<serde_json::Value>,
    }
    serde_json::from_slice::<Batch>(body)
        .map(|batch| batch.events.len())
        .map_err(|error| ApiError::bad_request(format!("expected {{\"events\":[...]}}: {error}")))
}

/// `POST /api/v1/sdk/telemetry`: the sum of `total` over `{"evaluations":{key:{total,..}}}`.
///
/// # Errors
/// 400 `BAD_REQUEST` when the body is not a telemetry report.
pub fn count_telemetry(body: &[u8]) -> Result<u64, ApiError> {
    #[derive(Deserialize)]
    struct Counts {
        #[serde(default)]
        total: u64,
    }
    #[derive(Deserialize)]
    struct Report {
        evaluations: BTreeMap<String, Counts>,
    }
    serde_json::from_slice::<Report>(body)
        .map(|report| report.evaluations.values().map(|c| c.total).sum())
        .map_err(|error| {
            ApiError::bad_request(format!("expected {{\"evaluations\":{{...}}}}: {error}"))
        })
}

/// `{"received":N}`: what every SDK expects back from `/events` and `/telemetry`.
pub fn received_body(count: u64) -> Bytes {
    json_body(&serde_json::json!({ "received": count }))
}

/// What `/api/health` reports. Adapters fill it; [`HealthReport::body`] renders it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// `healthy`, or `degraded` when the breaker is open, the data is stale or missing.
    pub status: &'static str,
    /// Breaker state: `closed`, `open` or `half_open`.
    pub circuit: &'static str,
    /// Cache statistics (`hits`, `misses`, `staleHits`).
    pub cache: CacheStats,
    /// `upstream` (with a Rollgate key) or `local` (a flags file).
    pub source: &'static str,
    /// Upstream connection details.
    pub upstream: UpstreamHealth,
    /// Current revision, if any data.
    pub revision: Option<u64>,
    /// Current ETag, if any data.
    pub etag: Option<String>,
    /// Milliseconds since upstream last confirmed the data (`None`: never).
    pub data_age_ms: Option<u64>,
    /// Number of flags served.
    pub flags: usize,
    /// Open SSE connections.
    pub sse_clients: u64,
}

/// The upstream part of [`HealthReport`].
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamHealth {
    /// `disabled`, `disconnected`, `connecting`, `connected`.
    pub stream: &'static str,
    /// `evaluated` or `rules`.
    pub mode: Option<&'static str>,
    /// Whether the data is fresh.
    pub fresh: bool,
    /// The last error, if the last interaction failed.
    pub last_error: Option<String>,
    /// Whether Rollgate rejects the server key (401): nothing will work until it is fixed.
    pub key_rejected: bool,
}

impl HealthReport {
    /// The JSON body.
    pub fn body(&self) -> Bytes {
        json_body(self)
    }
}

/// OFREP (OpenFeature Remote Evaluation Protocol) bodies.
pub mod ofrep {
    use super::*;

    /// An OFREP error: status and `{"errorCode","errorDetails"}` (plus `key` for one flag).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct OfrepError {
        /// HTTP status.
        pub status: u16,
        /// `PARSE_ERROR`, `INVALID_CONTEXT`, `FLAG_NOT_FOUND`, `GENERAL`.
        pub code: &'static str,
        /// Explanation.
        pub details: String,
    }

    impl OfrepError {
        /// The response, with `key` for single-flag errors.
        pub fn response(&self, key: Option<&str>) -> ApiResponse {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Body<'a> {
                #[serde(skip_serializing_if = "Option::is_none")]
                key: Option<&'a str>,
                error_code: &'a str,
                error_details: &'a str,
            }
            let mut response = ApiResponse::json(json_body(&Body {
                key,
                error_code: self.code,
                error_details: &self.details,
            }));
            response.status = self.status;
            response
        }
    }

    /// The evaluation context of an OFREP request: `{"context":{"targetingKey":..,..}}`.
    /// `targetingKey` is the user id, `email` the email, other scalar fields are attributes;
    /// nested objects and arrays are ignored (Rollgate conditions compare scalars). An empty
    /// body or a missing context is the anonymous context (lenient, like flagd).
    ///
    /// # Errors
    /// 400 `PARSE_ERROR` for invalid JSON, 400 `INVALID_CONTEXT` for a non-object context or
    /// exceeded [`limits`].
    pub fn context(body: &[u8]) -> Result<Context, OfrepError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Context::anonymous());
        }
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|error| OfrepError {
                status: 400,
                code: "PARSE_ERROR",
                details: format!("request body is not JSON: {error}"),
            })?;
        let invalid = |details: String| OfrepError {
            status: 400,
            code: "INVALID_CONTEXT",
            details,
        };
        let fields = match value.get("context") {
            None | Some(serde_json::Value::Null) => return Ok(Context::anonymous()),
            Some(serde_json::Value::Object(fields)) => fields,
            Some(_) => return Err(invalid("context must be an object".to_owned())),
        };
        let mut context = Context::anonymous();
        for (name, value) in fields {
            let value = match value {
                serde_json::Value::String(s) => AttributeValue::String(s.clone()),
                serde_json::Value::Bool(b) => AttributeValue::Bool(*b),
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(n) => AttributeValue::Number(n),
                    None => continue,
                },
                _ => continue,
            };
            match (name.as_str(), value) {
                ("targetingKey", AttributeValue::String(id)) => {
                    context.id = non_empty(
                        checked_value("targetingKey", &id).map_err(|e| invalid(e.message))?,
                    );
                }
                ("email", AttributeValue::String(email)) => {
                    context.email =
                        non_empty(checked_value("email", &email).map_err(|e| invalid(e.message))?);
                }
                (name, value) => {
                    insert_attribute(&mut context, name, value).map_err(|e| invalid(e.message))?;
                }
            }
        }
        Ok(context)
    }

    /// The path of OFREP's event stream to advertise in `eventStreams`. With client keys the
    /// caller's own key rides along as `?token=`: the OFREP web provider opens the stream with an
    /// `EventSource`, which cannot send headers (ADR-0008 allows credentials in this URL).
    pub fn stream_uri(client_key: Option<&str>) -> String {
        match client_key {
            None => STREAM_PATH.to_owned(),
            Some(key) => {
                let query: String = form_urlencoded::Serializer::new(String::new())
                    .append_pair("token", key)
                    .finish();
                format!("{STREAM_PATH}?{query}")
            }
        }
    }

    /// Path of the OFREP event stream.
    pub const STREAM_PATH: &str = "/ofrep/v1/sse";

    /// `POST /ofrep/v1/evaluate/flags/{key}`.
    pub fn single(key: &str, flags: &EvaluatedFlags) -> ApiResponse {
        match flags.flags.get(key) {
            Some(value) => ApiResponse::json(json_body(&item(key, *value, flags.reasons.get(key)))),
            None => OfrepError {
                status: 404,
                code: "FLAG_NOT_FOUND",
                details: format!("flag {key:?} was not found"),
            }
            .response(Some(key)),
        }
    }

    /// `POST /ofrep/v1/evaluate/flags`: every flag, with an ETag derived from the snapshot and
    /// the context (so a 304 needs no evaluation), and `eventStreams` when `stream_uri` is given.
    pub fn bulk(
        snapshot: &Snapshot,
        context: &Context,
        flags: &EvaluatedFlags,
        stream_uri: Option<&str>,
        if_none_match: Option<&str>,
    ) -> ApiResponse {
        #[derive(Serialize)]
        struct Endpoint<'a> {
            #[serde(rename = "requestUri")]
            request_uri: &'a str,
        }
        #[derive(Serialize)]
        struct EventStream<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            endpoint: Endpoint<'a>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            flags: Vec<Item<'a>>,
            #[serde(rename = "eventStreams", skip_serializing_if = "Option::is_none")]
            event_streams: Option<[EventStream<'a>; 1]>,
        }
        let etag = bulk_etag(snapshot, context);
        if if_none_match.is_some_and(|header| render::if_none_match_matches(header, &etag)) {
            return ApiResponse::json_with_etag(Bytes::new(), &etag, if_none_match);
        }
        let body = Body {
            flags: flags
                .flags
                .iter()
                .map(|(key, value)| item(key, *value, flags.reasons.get(key)))
                .collect(),
            event_streams: stream_uri.map(|request_uri| {
                [EventStream {
                    kind: "sse",
                    endpoint: Endpoint { request_uri },
                }]
            }),
        };
        ApiResponse::json_with_etag(json_body(&body), &etag, None)
    }

    /// The bulk ETag: snapshot content × context.
    pub fn bulk_etag(snapshot: &Snapshot, context: &Context) -> String {
        let mut material = snapshot.content_hash().as_bytes().to_vec();
        material.push(b'|');
        material.extend(serde_json::to_vec(context).unwrap_or_default());
        render::etag_for(&material)
    }

    #[derive(Serialize)]
    struct Item<'a> {
        key: &'a str,
        value: bool,
        reason: &'static str,
        variant: &'static str,
        metadata: BTreeMap<&'static str, &'static str>,
    }

    fn item<'a>(key: &'a str, value: bool, reason: Option<&Reason>) -> Item<'a> {
        Item {
            key,
            value,
            reason: reason.map_or("UNKNOWN", openfeature_reason),
            variant: if value { "on" } else { "off" },
            metadata: BTreeMap::new(),
        }
    }

    /// Maps a Rollgate reason onto OpenFeature's reason vocabulary.
    pub fn openfeature_reason(reason: &Reason) -> &'static str {
        match reason.kind {
            ReasonKind::Off => "DISABLED",
            ReasonKind::TargetMatch | ReasonKind::RuleMatch => "TARGETING_MATCH",
            // A rollout decided: that is OpenFeature's pseudorandom SPLIT.
            ReasonKind::Fallthrough if reason.in_rollout.is_some() => "SPLIT",
            ReasonKind::Fallthrough => "DEFAULT",
            ReasonKind::Error => "ERROR",
            ReasonKind::Unknown => "UNKNOWN",
        }
    }
}

fn invalid_context(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidContext, message)
}

fn checked_value(name: &str, value: &str) -> Result<String, ApiError> {
    if value.len() > limits::MAX_VALUE {
        return Err(invalid_context(format!(
            "value of {:?} is longer than {} bytes",
            name.chars().take(64).collect::<String>(),
            limits::MAX_VALUE
        )));
    }
    Ok(value.to_owned())
}

fn insert_attribute(
    context: &mut Context,
    name: &str,
    value: AttributeValue,
) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > limits::MAX_ATTRIBUTE_NAME {
        return Err(invalid_context(format!(
            "attribute names must be 1 to {} bytes",
            limits::MAX_ATTRIBUTE_NAME
        )));
    }
    if let AttributeValue::String(s) = &value {
        checked_value(name, s)?;
    }
    if context.attributes.len() >= limits::MAX_ATTRIBUTES && !context.attributes.contains_key(name)
    {
        return Err(invalid_context(format!(
            "a context may have at most {} attributes",
            limits::MAX_ATTRIBUTES
        )));
    }
    context.attributes.insert(name.to_owned(), value);
    Ok(())
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(query.trim_start_matches('?').as_bytes())
}

fn percent_decode(segment: &str) -> Result<String, ApiError> {
    // Path segments use %XX escapes but not '+' for space: only `%XX` sequences are special.
    // `percent_decode_str` passes a malformed `%` through, so check the escapes first.
    let bytes = segment.as_bytes();
    let malformed = bytes.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(ApiError::bad_request("invalid percent-encoding in path"));
    }
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| ApiError::bad_request("path is not valid UTF-8"))
}

/// Whether a caller's `X-Request-ID` may be kept and echoed: 1 to 128 visible ASCII bytes
/// (anything else is replaced by the adapter's own id, so logs never carry control bytes).
pub fn is_usable_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 128 && value.iter().all(u8::is_ascii_graphic)
}

/// `{"status":"ok"}`: `GET /health` (what the Rollgate SDK harness checks) and `GET /live`.
pub const STATUS_OK_BODY: &[u8] = br#"{"status":"ok"}"#;
/// `{"status":"ready"}`: `GET /ready` once a snapshot exists.
pub const READY_BODY: &[u8] = br#"{"status":"ready"}"#;
/// `{"success":true}`: `POST /api/v1/sdk/identify`, as Rollgate answers it.
pub const IDENTIFY_BODY: &[u8] = br#"{"success":true}"#;

/// `Content-Type` of JSON answers.
pub const JSON: &str = "application/json";
/// `Content-Type` of SSE answers.
pub const EVENT_STREAM: &str = "text/event-stream";
/// `Cache-Control` of flag answers: caches must revalidate (with the ETag) every time.
pub const NO_CACHE: &str = "no-cache";
/// `Vary` of answers whose body may be compressed.
pub const VARY_ENCODING: &str = "Accept-Encoding";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{FlagSource, Revision};
    use crate::time::Timestamp;

    fn snapshot() -> Snapshot {
        let flags = EvaluatedFlags::from_json(
            br#"{"flags":{"a":true,"b":false},"reasons":{"a":{"kind":"FALLTHROUGH","inRollout":true},"b":{"kind":"OFF"}}}"#,
        )
        .unwrap();
        Snapshot::build(
            Revision::new(1),
            Timestamp::ZERO,
            FlagSource::Evaluated(flags),
        )
    }

    #[test]
    fn routes() {
        assert_eq!(Route::parse("GET", "/api/flags"), Ok(Route::Flags));
        assert_eq!(Route::parse("POST", "/api/flags"), Ok(Route::Flags));
        assert_eq!(
            Route::parse("GET", "/api/flags/new%2Dcheckout"),
            Ok(Route::Flag("new-checkout".into()))
        );
        assert_eq!(
            Route::parse("POST", "/ofrep/v1/evaluate/flags/x"),
            Ok(Route::OfrepFlag("x".into()))
        );
        assert_eq!(
            Route::parse("DELETE", "/api/flags").unwrap_err().status(),
            405
        );
        assert_eq!(Route::parse("GET", "/nope").unwrap_err().status(), 404);
        assert_eq!(
            Route::parse("GET", "/api/flags/%zz").unwrap_err().status(),
            400
        );
        assert_eq!(
            Route::parse("GET", "/demo.css"),
            Ok(Route::Asset("demo.css"))
        );
        assert!(!Route::Health.needs_client_key());
        assert!(Route::Stream.needs_client_key());
    }

    #[test]
    fn request_ids() {
        assert!(is_usable_request_id(b"caller-7f"));
        assert!(!is_usable_request_id(b""));
        assert!(!is_usable_request_id(b"has space"));
        assert!(!is_usable_request_id(&[b'x'; 129]));
    }

    #[test]
    fn error_bodies() {
        let error = ApiError::unauthorized("no key");
        assert_eq!(
            &error.body()[..],
            br#"{"error":{"code":"UNAUTHORIZED","message":"no key"}}"#
        );
        let response = ApiResponse::from(ApiError::not_ready());
        assert_eq!(response.status, 503);
        assert!(response.headers.contains(&("Retry-After", "1".to_owned())));
    }

    #[test]
    fn client_keys() {
        let keys = ClientKeys::new(["k1".to_owned(), "k2".to_owned()]);
        assert!(keys.authorize(Some("Bearer k2"), None, "").is_ok());
        assert!(keys.authorize(Some("bearer  k1 "), None, "").is_ok());
        assert!(keys.authorize(None, Some("k1"), "").is_ok());
        assert!(keys.authorize(None, None, "user_id=u&token=k1").is_ok());
        assert_eq!(keys.authorize(None, None, "").unwrap_err().status(), 401);
        let wrong = keys.authorize(Some("Bearer nope"), None, "").unwrap_err();
        assert!(!wrong.message.contains("k1"));
        assert!(ClientKeys::default().authorize(None, None, "").is_ok());
        assert_eq!(keys.matching_key(None, None, "token=k2"), Ok(Some("k2")));
        assert_eq!(ClientKeys::default().matching_key(None, None, ""), Ok(None));
        assert_eq!(ofrep::stream_uri(None), "/ofrep/v1/sse");
        assert_eq!(
            ofrep::stream_uri(Some("k 1&x")),
            "/ofrep/v1/sse?token=k+1%26x"
        );
        assert_eq!(format!("{keys:?}"), "ClientKeys(2 configured)");
    }

    #[test]
    fn contexts_from_query_and_body() {
        let ctx = context_from_query("user_id=u%201&email=a%40b.c&attr.plan=pro&token=x").unwrap();
        assert_eq!(ctx.id.as_deref(), Some("u 1"));
        assert_eq!(ctx.email.as_deref(), Some("a@b.c"));
        assert_eq!(ctx.attribute("plan").as_deref(), Some("pro"));
        assert!(context_from_query("").unwrap().is_anonymous());
        let too_many: String = (0..65).map(|i| format!("attr.a{i}=v&")).collect();
        assert_eq!(
            context_from_query(&too_many).unwrap_err().code,
            ErrorCode::InvalidContext
        );
        let long = format!("user_id={}", "x".repeat(2000));
        assert_eq!(context_from_query(&long).unwrap_err().status(), 400);

        let ctx = context_from_body(br#"{"user":{"id":"u1","attributes":{"age":30,"beta":true}}}"#)
            .unwrap();
        assert_eq!(ctx.id.as_deref(), Some("u1"));
        assert_eq!(ctx.attribute("age").as_deref(), Some("30"));
        assert!(context_from_body(b"").unwrap().is_anonymous());
        assert_eq!(
            context_from_body(b"{").unwrap_err().code,
            ErrorCode::InvalidContext
        );
        assert_eq!(
            context_from_body(br#"{"user":{"id":5}}"#).unwrap_err().code,
            ErrorCode::InvalidContext
        );
    }

    #[test]
    fn flags_and_sdk_responses_with_etags() {
        let snapshot = snapshot();
        let defaults = Cow::Borrowed(snapshot.defaults());
        let response = flags_response(&snapshot, defaults.clone(), None, None);
        assert_eq!(response.status, 200);
        assert_eq!(&response.body, snapshot.flags_body());
        let not_modified = flags_response(&snapshot, defaults.clone(), Some(snapshot.etag()), None);
        assert_eq!(not_modified.status, 304);
        assert!(not_modified.body.is_empty());
        assert!(
            not_modified
                .headers
                .contains(&("ETag", snapshot.etag().to_owned()))
        );

        let sdk = sdk_flags_response(
            &snapshot,
            defaults.clone(),
            with_reasons("withReasons=true&user_id="),
            None,
            None,
        );
        assert!(
            std::str::from_utf8(&sdk.body)
                .unwrap()
                .contains("\"reasons\"")
        );
        let bare = sdk_flags_response(&snapshot, defaults, with_reasons(""), None, None);
        assert_eq!(&bare.body[..], br#"{"flags":{"a":true,"b":false}}"#);

        let owned: Cow<'_, EvaluatedFlags> = Cow::Owned(snapshot.defaults().clone());
        let per_user = flags_response(&snapshot, owned.clone(), None, None);
        let etag = per_user
            .headers
            .iter()
            .find(|(n, _)| *n == "ETag")
            .unwrap()
            .1
            .clone();
        assert_eq!(
            flags_response(&snapshot, owned, Some(&etag), None).status,
            304
        );
    }

    fn header<'a>(response: &'a ApiResponse, name: &str) -> Option<&'a str> {
        response
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn small_bodies_are_identity_with_vary() {
        let snapshot = snapshot();
        let defaults = Cow::Borrowed(snapshot.defaults());
        let response = flags_response(&snapshot, defaults.clone(), None, Some("gzip, br"));
        assert_eq!(&response.body, snapshot.flags_body());
        assert_eq!(header(&response, "Content-Encoding"), None);
        assert_eq!(header(&response, "Vary"), Some(VARY_ENCODING));
        assert_eq!(header(&response, "ETag"), Some(snapshot.etag()));
        let owned: Cow<'_, EvaluatedFlags> = Cow::Owned(snapshot.defaults().clone());
        let per_user = sdk_flags_response(&snapshot, owned, false, None, Some("br"));
        assert_eq!(header(&per_user, "Vary"), Some(VARY_ENCODING));
        assert_eq!(header(&per_user, "Content-Encoding"), None);
    }

    #[cfg(feature = "compression")]
    #[test]
    fn large_bodies_are_sent_compressed_with_their_own_etags() {
        use std::io::Read;
        let flags: String = (0..2000)
            .map(|i| format!("\"feature-flag-number-{i}\":{}", i % 2 == 0))
            .collect::<Vec<_>>()
            .join(",");
        let flags =
            EvaluatedFlags::from_json(format!("{{\"flags\":{{{flags}}}}}").as_bytes()).unwrap();
        let snapshot = Snapshot::build(
            Revision::new(1),
            Timestamp::from_millis(0),
            FlagSource::Evaluated(flags),
        );
        let etag = snapshot.etag();
        for with_reasons in [false, true] {
            let identity = snapshot.sdk_body(with_reasons);
            let defaults = Cow::Borrowed(snapshot.defaults());
            let br =
                sdk_flags_response(&snapshot, defaults.clone(), with_reasons, None, Some("br"));
            assert_eq!(header(&br, "Content-Encoding"), Some("br"));
            assert_eq!(header(&br, "Vary"), Some(VARY_ENCODING));
            let br_etag = header(&br, "ETag").unwrap().to_owned();
            assert_eq!(br_etag, Encoding::Brotli.etag(etag));
            let mut decoded = Vec::new();
            brotli::Decompressor::new(&br.body[..], 4096)
                .read_to_end(&mut decoded)
                .unwrap();
            assert_eq!(&decoded[..], &identity[..]);
            assert!(br.body.len() * 5 < identity.len());

            let gz = sdk_flags_response(
                &snapshot,
                defaults.clone(),
                with_reasons,
                None,
                Some("gzip, deflate"),
            );
            assert_eq!(header(&gz, "Content-Encoding"), Some("gzip"));
            assert_eq!(header(&gz, "ETag"), Some(&*Encoding::Gzip.etag(etag)));
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(&gz.body[..])
                .read_to_end(&mut decoded)
                .unwrap();
            assert_eq!(&decoded[..], &identity[..]);

            // Revalidating with the br ETag gives 304 whatever the coding asked now.
            for accept in [None, Some("gzip"), Some("br")] {
                let revalidated = sdk_flags_response(
                    &snapshot,
                    defaults.clone(),
                    with_reasons,
                    Some(&br_etag),
                    accept,
                );
                assert_eq!(revalidated.status, 304, "{accept:?}");
                assert!(revalidated.body.is_empty());
                assert_eq!(header(&revalidated, "Vary"), Some(VARY_ENCODING));
                assert_eq!(header(&revalidated, "Content-Encoding"), None);
            }
            // Another content's tag does not.
            let stale = sdk_flags_response(
                &snapshot,
                defaults.clone(),
                with_reasons,
                Some("\"0000000000000000-br\""),
                Some("br"),
            );
            assert_eq!(stale.status, 200);
        }
        let identity = flags_response(
            &snapshot,
            Cow::Borrowed(snapshot.defaults()),
            None,
            Some("br;q=0, gzip;q=0"),
        );
        assert_eq!(&identity.body, snapshot.flags_body());
        assert_eq!(header(&identity, "ETag"), Some(etag));
        assert_eq!(header(&identity, "Content-Encoding"), None);
    }

    #[test]
    fn single_flag() {
        let snapshot = snapshot();
        let body = flag_response("a", snapshot.defaults()).unwrap().body;
        assert_eq!(&body[..], br#"{"key":"a","enabled":true}"#);
        let body = flag_response("missing", snapshot.defaults()).unwrap().body;
        assert_eq!(&body[..], br#"{"key":"missing","enabled":false}"#);
        assert_eq!(
            flag_response("bad key", snapshot.defaults())
                .unwrap_err()
                .code,
            ErrorCode::InvalidFlagKey
        );
    }

    #[test]
    fn events_and_telemetry_counts() {
        assert_eq!(count_events(br#"{"events":[{},{}]}"#), Ok(2));
        assert!(count_events(b"[]").is_err());
        assert_eq!(
            count_telemetry(br#"{"evaluations":{"a":{"total":3,"true":2,"false":1},"b":{"total":4}},"period_ms":1}"#),
            Ok(7)
        );
        assert_eq!(&received_body(7)[..], br#"{"received":7}"#);
    }

    #[test]
    fn ofrep_bodies() {
        let snapshot = snapshot();
        let flags = snapshot.defaults();
        let single = ofrep::single("a", flags);
        assert_eq!(
            &single.body[..],
            br#"{"key":"a","value":true,"reason":"SPLIT","variant":"on","metadata":{}}"#
        );
        let off = ofrep::single("b", flags);
        assert!(
            std::str::from_utf8(&off.body)
                .unwrap()
                .contains(r#""reason":"DISABLED""#)
        );
        let missing = ofrep::single("zz", flags);
        assert_eq!(missing.status, 404);
        assert_eq!(
            &missing.body[..],
            br#"{"key":"zz","errorCode":"FLAG_NOT_FOUND","errorDetails":"flag \"zz\" was not found"}"#
        );

        let context = ofrep::context(
            br#"{"context":{"targetingKey":"u1","email":"e@x","plan":"pro","n":3,"deep":{"x":1}}}"#,
        )
        .unwrap();
        assert_eq!(context.id.as_deref(), Some("u1"));
        assert_eq!(context.attribute("n").as_deref(), Some("3"));
        assert_eq!(context.attribute("deep"), None);
        assert_eq!(ofrep::context(b"{").unwrap_err().code, "PARSE_ERROR");
        assert_eq!(
            ofrep::context(br#"{"context":1}"#).unwrap_err().code,
            "INVALID_CONTEXT"
        );
        assert!(ofrep::context(b"").unwrap().is_anonymous());

        let bulk = ofrep::bulk(&snapshot, &context, flags, Some("/ofrep/v1/sse"), None);
        let text = std::str::from_utf8(&bulk.body).unwrap();
        assert!(
            text.starts_with(r#"{"flags":[{"key":"a","value":true"#),
            "{text}"
        );
        assert!(
            text.ends_with(
                r#""eventStreams":[{"type":"sse","endpoint":{"requestUri":"/ofrep/v1/sse"}}]}"#
            ),
            "{text}"
        );
        let etag = ofrep::bulk_etag(&snapshot, &context);
        assert_ne!(etag, ofrep::bulk_etag(&snapshot, &Context::anonymous()));
        assert_eq!(
            ofrep::bulk(&snapshot, &context, flags, None, Some(&etag)).status,
            304
        );
    }
}
