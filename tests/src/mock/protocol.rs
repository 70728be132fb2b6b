//! The Rollgate SDK routes (`/api/v1/sdk/*`, `/health`) as production and the official mock
//! answer them (protocol notes §1, §2), plus the per-route recording, delay and fault hooks.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::frames::to_json;
use super::server::ConnProbe;
use super::state::Shared;
use super::types::{Fault, RecordedRequest, Route, StreamAuth};
use super::{query, stream};

/// The body of every 401 (the structured form `sdk-core` parses, `category` AUTH).
pub const UNAUTHORIZED_BODY: &str = r#"{"error":{"code":"AUTH_001","category":"AUTH","message":"Invalid API key","retryable":false}}"#;

/// Largest request body the POST routes read.
const BODY_LIMIT: usize = 4 * 1024 * 1024;

/// The protocol routes; `/control` is merged in by the caller.
pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v1/sdk/flags", get(flags))
        .route("/api/v1/sdk/stream", get(stream_route))
        .route("/api/v1/sdk/identify", post(identify))
        .route("/api/v1/sdk/events", post(events))
        .route("/api/v1/sdk/telemetry", post(telemetry))
        .route("/health", get(health))
}

/// `"` + hex(SHA-256(JSON of the flags map)[0..8]) + `"`, as the official mock computes it.
/// (Go also escapes `<`, `>`, `&` in JSON strings; flag keys never contain them in practice.)
pub fn etag_for(flags_json: &[u8]) -> String {
    let digest = Sha256::digest(flags_json);
    let mut out = String::with_capacity(18);
    out.push('"');
    for b in digest.iter().take(8) {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('"');
    out
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response {
    let mut resp = Response::new(Body::from(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn unauthorized(shared: &Shared) -> Response {
    shared.with(|inner| inner.stats.auth_failures += 1);
    json_response(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY)
}

fn bad_request(message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": "VALIDATION_001", "category": "VALIDATION",
        "message": message, "retryable": false}});
    json_response(StatusCode::BAD_REQUEST, to_json(&body))
}

/// The structured error body of an injected fault without a body of its own.
pub fn default_fault_body(status: u16) -> String {
    let (code, category) = match status {
        400 => ("VALIDATION_001", "VALIDATION"),
        401 => ("AUTH_001", "AUTH"),
        403 => ("AUTH_002", "AUTH"),
        404 => ("NOT_FOUND_001", "NOT_FOUND"),
        409 => ("CONFLICT_001", "CONFLICT"),
        429 => ("RATE_001", "RATE_LIMIT"),
        _ => ("INTERNAL_001", "INTERNAL"),
    };
    let message = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Simulated error");
    let body = serde_json::json!({"error": {"code": code, "category": category,
        "message": message, "retryable": status >= 500 || status == 429}});
    to_json(&body)
}

/// A body of exactly `len` bytes, `{"flags":{` then spaces, in 64 KiB chunks made on demand.
fn generated_body(len: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let prefix = Bytes::from_static(b"{\"flags\":{");
    let filler = Bytes::from(vec![b' '; CHUNK as usize]);
    let chunks = futures_util::stream::unfold(0u64, move |sent| {
        let (prefix, filler) = (prefix.clone(), filler.clone());
        async move {
            if sent >= len {
                return None;
            }
            let n = (len - sent).min(CHUNK);
            let chunk = if sent == 0 && n >= prefix.len() as u64 {
                let mut first = bytes::BytesMut::from(&prefix[..]);
                first.extend_from_slice(&filler[..(n as usize - prefix.len())]);
                first.freeze()
            } else {
                filler.slice(..n as usize)
            };
            Some((Ok::<_, std::io::Error>(chunk), sent + n))
        }
    });
    Body::from_stream(chunks)
}

fn fault_response(fault: Fault) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = match fault.body_bytes {
        Some(len) => Response::new(generated_body(len)),
        None => Response::new(Body::from(
            fault
                .body
                .unwrap_or_else(|| default_fault_body(status.as_u16())),
        )),
    };
    if let Some(value) = fault.location.and_then(|v| HeaderValue::from_str(&v).ok()) {
        resp.headers_mut().insert(header::LOCATION, value);
    }
    *resp.status_mut() = status;
    let content_type = fault
        .content_type
        .and_then(|c| HeaderValue::from_str(&c).ok())
        .unwrap_or(HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    if let Some(value) = fault
        .retry_after
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, value);
    }
    resp
}

/// Records the request, waits out the route's delay, and answers with a fault if one is armed.
async fn prelude(shared: &Shared, route: Route, parts: &http::request::Parts) -> Option<Response> {
    let recorded = RecordedRequest {
        route,
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    if let Some(delay) = shared.record(recorded) {
        // Removing the delay (`DELETE /control/delays`, a zero delay) also ends the waits in
        // progress: a test can hold requests for as long as it needs, then release them.
        let deadline = tokio::time::Instant::now() + delay;
        let mut changes = shared.subscribe_changes();
        while shared.read(|inner| inner.delays.contains_key(&route)) {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
        }
    }
    shared.take_fault(route).map(fault_response)
}

fn bearer_ok(shared: &Shared, headers: &http::HeaderMap) -> bool {
    let key = shared.read(|inner| inner.api_key.clone());
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|v| v == key)
}

fn user_id(query: Option<&str>) -> Option<String> {
    query
        .and_then(|q| query::param(q, "user_id"))
        .filter(|u| !u.is_empty())
}

async fn flags(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    if let Some(resp) = prelude(&shared, Route::Flags, &parts).await {
        return resp;
    }
    if !bearer_ok(&shared, &parts.headers) {
        return unauthorized(&shared);
    }
    let q = parts.uri.query();
    let user = user_id(q);
    let with_reasons = q.and_then(|q| query::param(q, "withReasons")).as_deref() == Some("true");
    let view = shared.read(|inner| {
        inner
            .data
            .view_identified(user.as_deref(), &inner.identified)
    });
    let flags_json = to_json(&view.flags);
    let etag = etag_for(flags_json.as_bytes());
    let if_none_match = parts
        .headers
        .get(header::IF_NONE_MATCH)
        .map(|v| v.as_bytes());
    if if_none_match == Some(etag.as_bytes()) {
        shared.with(|inner| inner.stats.flags_not_modified += 1);
        // Like the official mock: no body, no ETag, no Content-Type.
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return resp;
    }
    let body = if with_reasons {
        format!(
            "{{\"flags\":{flags_json},\"reasons\":{}}}",
            to_json(&view.reasons)
        )
    } else {
        format!("{{\"flags\":{flags_json}}}")
    };
    shared.with(|inner| inner.stats.flags_ok += 1);
    let mut resp = json_response(StatusCode::OK, body);
    if let Ok(value) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, value);
    }
    resp
}

async fn stream_route(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    if let Some(resp) = prelude(&shared, Route::Stream, &parts).await {
        return resp;
    }
    let q = parts.uri.query();
    let (key, auth) = shared.read(|inner| (inner.api_key.clone(), inner.stream_auth));
    let token_ok = q.and_then(|q| query::param(q, "token")).as_deref() == Some(key.as_str());
    let bearer = bearer_ok(&shared, &parts.headers);
    let allowed = match auth {
        StreamAuth::TokenOrBearer => token_ok || bearer,
        StreamAuth::TokenOnly => token_ok,
        StreamAuth::BearerOnly => bearer,
    };
    if !allowed {
        return unauthorized(&shared);
    }
    let probe = parts.extensions.get::<ConnProbe>().cloned();
    let body = stream::open(&shared, user_id(q), probe);
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

/// Reads a JSON POST body after the common checks; `Err` is the response to send instead.
async fn json_post(shared: &Arc<Shared>, route: Route, req: Request) -> Result<Value, Response> {
    let (parts, body) = req.into_parts();
    if let Some(resp) = prelude(shared, route, &parts).await {
        return Err(resp);
    }
    if !bearer_ok(shared, &parts.headers) {
        return Err(unauthorized(shared));
    }
    let bytes = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .map_err(|_| bad_request("unreadable body"))?;
    serde_json::from_slice(&bytes).map_err(|_| bad_request("body is not valid JSON"))
}

async fn identify(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let body = match json_post(&shared, Route::Identify, req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    shared.with(|inner| {
        if let Some(user) = body.get("user")
            && let Some(id) = user.get("id").and_then(Value::as_str)
            && !id.is_empty()
        {
            inner.identified.insert(id.to_owned(), user.clone());
        }
        inner.identify.push(body);
    });
    json_response(StatusCode::OK, r#"{"success":true}"#)
}

async fn events(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let body = match json_post(&shared, Route::Events, req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let Some(count) = body.get("events").and_then(Value::as_array).map(Vec::len) else {
        return bad_request("events must be an array");
    };
    shared.with(|inner| inner.events.push(body));
    json_response(StatusCode::OK, format!("{{\"received\":{count}}}"))
}

async fn telemetry(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let body = match json_post(&shared, Route::Telemetry, req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let total: u64 = body
        .get("evaluations")
        .and_then(Value::as_object)
        .map(|evals| {
            evals
                .values()
                .filter_map(|e| e.get("total").and_then(Value::as_u64))
                .sum()
        })
        .unwrap_or(0);
    shared.with(|inner| inner.telemetry.push(body));
    json_response(StatusCode::OK, format!("{{\"received\":{total}}}"))
}

async fn health(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    if let Some(resp) = prelude(&shared, Route::Health, &parts).await {
        return resp;
    }
    json_response(StatusCode::OK, r#"{"status":"ok"}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_quoted_16_hex() {
        // sha256("{}") = 44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a
        assert_eq!(etag_for(b"{}"), "\"44136fa355b3678a\"");
    }

    #[test]
    fn default_fault_bodies() {
        let cases = [
            (401, "AUTH_001", "AUTH", false),
            (429, "RATE_001", "RATE_LIMIT", true),
            (400, "VALIDATION_001", "VALIDATION", false),
            (503, "INTERNAL_001", "INTERNAL", true),
            (500, "INTERNAL_001", "INTERNAL", true),
        ];
        for (status, code, category, retryable) in cases {
            let v: Value = serde_json::from_str(&default_fault_body(status)).unwrap();
            assert_eq!(v["error"]["code"], code, "{status}");
            assert_eq!(v["error"]["category"], category, "{status}");
            assert_eq!(v["error"]["retryable"], retryable, "{status}");
        }
    }
}
