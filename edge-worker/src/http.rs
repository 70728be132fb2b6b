//! Conversions between core's plain-data answers and `worker` requests/responses.

use bytes::Bytes;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{Either, select};
use rollgate_proxy_core::api::{ApiError, ApiResponse};
use rollgate_proxy_core::downstream::{Admitted, Answer, Downstream};
use rollgate_proxy_core::snapshot::Freshness;
use worker::{AbortController, Delay, Headers, Method, Request, Response, ResponseBody};

/// Header carrying the snapshot event id from the relay to the Worker (stripped before clients).
pub(crate) const EVENT_ID_HEADER: &str = "x-rollgate-event-id";
/// Header carrying the shard index from the Worker to a shard object.
pub(crate) const SHARD_HEADER: &str = "x-rollgate-shard";
/// Names a request's environment to the relay and shard objects (several environments).
pub(crate) const ENVIRONMENT_HEADER: &str = "x-rollgate-environment";
/// Host of the internal URLs used for object requests (never resolved: stubs route by object).
pub(crate) const INTERNAL_ORIGIN: &str = "https://rollgate-proxy.internal";

/// The path and the query (without `?`; empty if none) of `req`, cut from the URL string the
/// runtime already serialized. Not `Request::url()`: re-parsing with `url::Url` would link the
/// url crate's host parser and IDNA/Unicode-normalisation tables into the wasm.
pub(crate) fn path_and_query(req: &Request) -> (String, String) {
    let url = req.inner().url();
    let query = url
        .split_once('?')
        .map_or("", |(_, rest)| rest.split('#').next().unwrap_or(""));
    (req.path(), query.to_owned())
}

/// An `ApiResponse` as a `worker::Response`.
pub(crate) fn to_response(api: ApiResponse) -> worker::Result<Response> {
    let headers = Headers::new();
    if let Some(content_type) = api.content_type {
        headers.set("content-type", content_type)?;
    }
    for (name, value) in &api.headers {
        headers.set(name, value)?;
    }
    let response = if api.body.is_empty() {
        Response::empty()?
    } else {
        Response::from_bytes(api.body.to_vec())?
    };
    Ok(response.with_status(api.status).with_headers(headers))
}

/// An error answer.
pub(crate) fn error_response(error: &ApiError) -> worker::Result<Response> {
    to_response(ApiResponse::error(error))
}

/// 500 `INTERNAL`, without details (they go to the log).
pub(crate) fn internal() -> worker::Result<Response> {
    error_response(&ApiError::internal())
}

/// A copy of `response` with `extra` headers set and `remove` headers dropped. Responses from
/// `fetch` and object stubs have immutable headers, so the headers are rebuilt.
pub(crate) fn with_headers(
    response: Response,
    extra: &[(&'static str, String)],
    remove: &[&str],
) -> worker::Result<Response> {
    let headers = Headers::new();
    for (name, value) in response.headers().entries() {
        if !remove.contains(&name.as_str()) {
            headers.append(&name, &value)?;
        }
    }
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    let status = response.status_code();
    let (_, body) = response.into_parts();
    let response = match body {
        ResponseBody::Empty => Response::empty()?,
        ResponseBody::Body(bytes) => Response::from_bytes(bytes)?,
        ResponseBody::Stream(stream) => Response::builder().stream(stream),
    };
    Ok(response.with_status(status).with_headers(headers))
}

/// A request to an object: `path_and_query` on the internal origin, with `headers` and `body`.
pub(crate) fn internal_request(
    method: Method,
    path_and_query: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> worker::Result<Request> {
    let h = Headers::new();
    for (name, value) in headers {
        h.set(name, value)?;
    }
    let body =
        (!body.is_empty() && method != Method::Get && method != Method::Head).then_some(body);
    new_request(
        &format!("{INTERNAL_ORIGIN}{path_and_query}"),
        &method,
        &h,
        Redirect::Follow,
        body,
    )
}

/// What a request does with a 3xx answer (the Fetch standard's `redirect` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Redirect {
    /// Follow it (the default).
    Follow,
    /// Hand it back as the answer.
    Manual,
}

/// A request to `url`, built on web-sys's `RequestInit` rather than `worker::RequestInit`: the
/// latter's conversion links the JS serializer of every `cf` option (image resizing, Polish, ...)
/// into the wasm even though none is ever set here. Same request otherwise: method, headers,
/// redirect mode and body, as `worker::Request::new_with_init` would send them.
pub(crate) fn new_request(
    url: &str,
    method: &Method,
    headers: &Headers,
    redirect: Redirect,
    body: Option<&[u8]>,
) -> worker::Result<Request> {
    let init = web_sys::RequestInit::new();
    init.set_headers(headers.as_ref());
    init.set_method(method.as_ref());
    init.set_redirect(match redirect {
        Redirect::Follow => web_sys::RequestRedirect::Follow,
        Redirect::Manual => web_sys::RequestRedirect::Manual,
    });
    if let Some(body) = body {
        init.set_body(&js_sys::Uint8Array::from(body).into());
    }
    web_sys::Request::new_with_str_and_init(url, &init)
        .map(Request::from)
        .map_err(|error| {
            worker::Error::JsError(
                error
                    .as_string()
                    .unwrap_or_else(|| "invalid URL or options for Request".to_owned()),
            )
        })
}

/// Sends `request` to `config`'s environment's Relay object.
pub(crate) async fn fetch_relay(
    env: &worker::Env,
    config: &crate::config::EdgeConfig,
    request: Request,
) -> worker::Result<Response> {
    env.durable_object("RELAY")?
        .id_from_name(&config.relay_name())?
        .get_stub()?
        .fetch_with_request(request)
        .await
}

/// Reads a body up to `limit` bytes.
///
/// # Errors
/// `Ok(Err(413))` when it is larger.
pub(crate) async fn read_limited(
    req: &mut Request,
    limit: usize,
) -> worker::Result<Result<Bytes, ApiError>> {
    if let Some(length) = req.headers().get("content-length")?
        && length.trim().parse::<usize>().is_ok_and(|n| n > limit)
    {
        return Ok(Err(ApiError::payload_too_large(limit)));
    }
    let mut out = Vec::new();
    let Ok(mut stream) = req.stream() else {
        return Ok(Ok(Bytes::new()));
    };
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
        if out.len() > limit {
            return Ok(Err(ApiError::payload_too_large(limit)));
        }
    }
    Ok(Ok(Bytes::from(out)))
}

/// Milliseconds since the epoch, as core wants time.
pub(crate) fn now() -> rollgate_proxy_core::time::Timestamp {
    rollgate_proxy_core::time::Timestamp::from_millis(worker::Date::now().as_millis())
}

/// This instance's WebAssembly memory in bytes: the object's Rust heap, which grows to its
/// high-water mark and never shrinks (Cloudflare allows 128 MB per isolate, JS heap included).
pub(crate) fn wasm_memory_bytes() -> u64 {
    core::arch::wasm32::memory_size(0) as u64 * 65_536
}

/// The parts of a client request core's dispatcher reads, owned (a `worker::Request` hands out
/// owned strings), and passed on to an object as the same headers.
#[derive(Debug, Default)]
pub(crate) struct Incoming {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    authorization: Option<String>,
    api_key: Option<String>,
    pub(crate) if_none_match: Option<String>,
    last_event_id: Option<String>,
}

/// The request headers core reads, by name.
const FORWARDED: [&str; 4] = [
    "authorization",
    "x-api-key",
    "if-none-match",
    "last-event-id",
];

impl Incoming {
    /// Core's answer for an admitted request that needs no snapshot (a stateless route, or a
    /// forward's own answer): the front and the forwarder ask it the same way.
    pub(crate) fn dispatch_without_snapshot(
        &self,
        downstream: &Downstream,
        body: &Bytes,
        admitted: Admitted,
    ) -> Answer {
        downstream.dispatch(
            now(),
            &self.request(body),
            admitted,
            None,
            Freshness::Missing,
            random_unit(),
        )
    }

    /// Reads `req`'s method, path, query and the headers core reads.
    pub(crate) fn read(req: &Request) -> worker::Result<Self> {
        let (path, query) = path_and_query(req);
        let headers = req.headers();
        Ok(Self {
            method: req.method().to_string(),
            path,
            query,
            authorization: headers.get(FORWARDED[0])?,
            api_key: headers.get(FORWARDED[1])?,
            if_none_match: headers.get(FORWARDED[2])?,
            last_event_id: headers.get(FORWARDED[3])?,
        })
    }

    /// Core's view of the request, with `body`.
    pub(crate) fn request<'a>(
        &'a self,
        body: &'a [u8],
    ) -> rollgate_proxy_core::downstream::Request<'a> {
        rollgate_proxy_core::downstream::Request {
            method: &self.method,
            path: &self.path,
            query: &self.query,
            authorization: self.authorization.as_deref(),
            api_key: self.api_key.as_deref(),
            if_none_match: self.if_none_match.as_deref(),
            last_event_id: self.last_event_id.as_deref(),
            // Core is built without `compression` here: Cloudflare's edge compresses answers.
            accept_encoding: None,
            body,
        }
    }

    /// The same request for an object: path, query, the headers core reads (without
    /// `If-None-Match` when `conditional` is false, so the answer can be cached), and `body`.
    pub(crate) fn to_object(
        &self,
        extra: &[(&str, String)],
        conditional: bool,
        body: &[u8],
    ) -> worker::Result<Request> {
        let mut headers: Vec<(&str, String)> = extra.to_vec();
        let values = [
            &self.authorization,
            &self.api_key,
            &self.if_none_match,
            &self.last_event_id,
        ];
        for (name, value) in FORWARDED.iter().zip(values) {
            if *name == "if-none-match" && !conditional {
                continue;
            }
            if let Some(value) = value {
                headers.push((name, value.clone()));
            }
        }
        if !body.is_empty() {
            headers.push(("content-type", "application/json".to_owned()));
        }
        let method = Method::from(self.method.clone());
        let url = if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        };
        internal_request(method, &url, &headers, body)
    }
}

/// A uniform random sample in `[0, 1)` (core's jitter input).
pub(crate) fn random_unit() -> f64 {
    js_sys::Math::random()
}

/// A random id in `[1, 2^53)` (isolates and objects share no state, so ids are random, not
/// counted).
pub(crate) fn random_id() -> u64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a random sample in [0, 2^53) as an id"
    )]
    let n = (random_unit() * 9_007_199_254_740_992.0) as u64;
    n.max(1)
}

/// Hides `secret` in a message that might contain it (a URL with `?token=`).
pub(crate) fn redact(message: &str, secret: &str) -> String {
    rollgate_proxy_core::secret::Secret::new(secret).redact(message)
}

/// Runs `future` for at most `timeout`; on timeout, or when it returns `Err` (a
/// request given up on, e.g. an oversize body), aborts the request through `controller`.
pub(crate) async fn with_timeout<T, E>(
    future: impl Future<Output = Result<T, E>>,
    controller: AbortController,
    timeout: Duration,
) -> Option<Result<T, E>> {
    let future = std::pin::pin!(future);
    match select(future, Delay::from(timeout)).await {
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
