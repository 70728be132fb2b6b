//! Conversions between core's plain-data answers and `worker` requests/responses.

use bytes::Bytes;
use futures_util::StreamExt;
use rollgate_proxy_core::api::{ApiError, ApiResponse};
use worker::{Headers, Method, Request, RequestInit, Response, ResponseBody};

/// Header carrying the snapshot event id from the relay to the Worker (stripped before clients).
pub(crate) const EVENT_ID_HEADER: &str = "x-rollgate-event-id";
/// Internal header (Worker → relay only): the client key an OFREP bulk request presented, so
/// the relay can announce an event stream URL that carries it.
pub(crate) const CLIENT_KEY_HEADER: &str = "x-rollgate-client-key";
/// Header carrying the shard index from the Worker to a shard object.
pub(crate) const SHARD_HEADER: &str = "x-rollgate-shard";
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

/// A static text answer (demo page, its assets), `Cache-Control: no-cache` as the native server.
pub(crate) fn static_text(body: &'static str, content_type: &str) -> worker::Result<Response> {
    let headers = Headers::new();
    headers.set("content-type", content_type)?;
    headers.set("cache-control", rollgate_proxy_core::api::NO_CACHE)?;
    Ok(Response::from_bytes(body.as_bytes().to_vec())?.with_headers(headers))
}

/// An error answer.
pub(crate) fn error_response(error: &ApiError) -> worker::Result<Response> {
    to_response(ApiResponse::error(error))
}

/// 500 `INTERNAL`, without details (they go to the log).
pub(crate) fn internal() -> worker::Result<Response> {
    error_response(&ApiError::new(500, "INTERNAL", "internal error"))
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
    let mut init = RequestInit::new();
    init.with_method(method.clone()).with_headers(h);
    if !body.is_empty() && method != Method::Get && method != Method::Head {
        let array = js_sys::Uint8Array::from(body);
        init.with_body(Some(array.into()));
    }
    Request::new_with_init(&format!("{INTERNAL_ORIGIN}{path_and_query}"), &init)
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

/// Hides `secret` in a message that might contain it (a URL with `?token=`).
pub(crate) fn redact(message: &str, secret: &str) -> String {
    if secret.is_empty() {
        message.to_owned()
    } else {
        message.replace(secret, "[redacted]")
    }
}
