//! `/control/*`: the same control surface as [`MockControl`], as JSON over HTTP, for tests that
//! drive the `mock-upstream` binary from another language. No auth; the mock binds loopback.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::frames::to_json;
use super::state::Shared;
use super::types::{DropKind, Fault, FlagSet, Heartbeat, Route, Stats, StreamAuth, StreamMode};
use super::{MockControl, query};

/// Time given to a `/control/stop` or `/control/outage` answer to leave before the listener
/// (and maybe the very connection carrying the answer) goes away.
const STOP_GRACE: Duration = Duration::from_millis(50);

/// Longest `/control/wait` accepted, so a forgotten condition cannot hang a suite.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/control/stats", get(stats))
        .route("/control/wait", get(wait))
        .route("/control/reset", post(reset))
        .route("/control/api-key", put(api_key))
        .route("/control/flags", put(set_flags).get(get_flags))
        .route("/control/flags/{key}", put(set_flag).delete(remove_flag))
        .route("/control/rollouts/{key}", put(set_rollout))
        .route("/control/users/{user}", put(set_user).delete(remove_user))
        .route("/control/rules", put(set_rules).delete(clear_rules))
        .route("/control/stream-mode", put(stream_mode))
        .route("/control/stream-auth", put(stream_auth))
        .route("/control/heartbeat", put(heartbeat).delete(heartbeat_off))
        .route("/control/faults", post(add_fault).delete(clear_faults))
        .route("/control/faults/{route}", delete(clear_fault))
        .route("/control/delays/{route}", put(set_delay))
        .route("/control/delays", delete(clear_delays))
        .route("/control/streams/drop", post(drop_streams))
        .route("/control/streams/stall", post(stall))
        .route("/control/streams/resume", post(resume))
        .route("/control/streams/raw", post(raw))
        .route("/control/streams/event", post(event))
        .route("/control/down", put(down))
        .route("/control/connections/close", post(close_connections))
        .route("/control/stop", post(stop))
        .route("/control/start", post(start))
        .route("/control/outage", post(outage))
        .route("/control/requests", get(requests).delete(clear_requests))
        .route("/control/requests/last/{route}", get(last_request))
        .route("/control/received", get(received).delete(clear_received))
}

fn reply(status: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(to_json(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(body: &Value) -> Response {
    reply(StatusCode::OK, body)
}

/// A rejected control request: 400 with `{"error":..}`; nothing was changed.
#[derive(Debug)]
struct Invalid(String);

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        reply(StatusCode::BAD_REQUEST, &json!({"error": self.0}))
    }
}

fn invalid(message: impl std::fmt::Display) -> Invalid {
    Invalid(message.to_string())
}

type Reply = Result<Response, Invalid>;

fn done(ctl: &MockControl) -> Response {
    let stats = ctl.stats();
    ok(&json!({
        "ok": true,
        "version": stats.version,
        "last_change_unix_us": stats.last_change_unix_us,
    }))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Invalid> {
    serde_json::from_slice(body).map_err(invalid)
}

fn route(name: &str) -> Result<Route, Invalid> {
    name.parse().map_err(invalid)
}

fn ctl(shared: Arc<Shared>) -> MockControl {
    MockControl::from_shared(shared)
}

fn stats_json(stats: &Stats) -> Value {
    serde_json::to_value(stats).unwrap_or(Value::Null)
}

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    ok(&stats_json(&ctl(s).stats()))
}

/// `GET /control/wait?open_streams=N&streams_accepted=N&flags_requests=N&stream_requests=N&version=N&timeout_ms=N`:
/// `open_streams` must be equal, the others at least the given value. 200 with the stats, or
/// 408 `{"timeout":true,"stats":..}`.
async fn wait(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Reply {
    let q = q.unwrap_or_default();
    let num = |name: &str| -> Result<Option<u64>, Invalid> {
        query::param(&q, name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|e| invalid(format!("{name}: {e}")))
            })
            .transpose()
    };
    let open = num("open_streams")?;
    let accepted = num("streams_accepted")?;
    let flags = num("flags_requests")?;
    let streams = num("stream_requests")?;
    let version = num("version")?;
    let timeout = Duration::from_millis(num("timeout_ms")?.unwrap_or(5000)).min(MAX_WAIT);
    let at_least = |want: Option<u64>, got: u64| want.is_none_or(|w| got >= w);
    let result = ctl(s)
        .wait_until(timeout, |st| {
            open.is_none_or(|n| st.open_streams == n)
                && at_least(accepted, st.streams_accepted)
                && at_least(flags, st.flags_requests)
                && at_least(streams, st.stream_requests)
                && at_least(version, st.version)
        })
        .await;
    Ok(match result {
        Ok(st) => ok(&stats_json(&st)),
        Err(super::MockError::Timeout { stats, .. }) => reply(
            StatusCode::REQUEST_TIMEOUT,
            &json!({"timeout": true, "stats": stats_json(&stats)}),
        ),
        Err(e) => return Err(invalid(e)),
    })
}

async fn reset(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.reset();
    done(&c)
}

#[derive(Deserialize)]
struct ApiKeyBody {
    api_key: String,
}

async fn api_key(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: ApiKeyBody = parse(&body)?;
    let c = ctl(s);
    c.set_api_key(b.api_key);
    Ok(done(&c))
}

async fn set_flags(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let set: FlagSet = parse(&body)?;
    let c = ctl(s);
    c.set_flags(set);
    Ok(done(&c))
}

/// `GET /control/flags?user_id=`: the view `/flags` serves now, with its ETag.
async fn get_flags(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let user = q
        .and_then(|q| query::param(&q, "user_id"))
        .filter(|u| !u.is_empty());
    let c = ctl(s);
    let view = c.flags_for(user.as_deref());
    ok(&json!({"flags": view.flags, "reasons": view.reasons,
        "etag": c.etag_for_user(user.as_deref())}))
}

#[derive(Deserialize)]
struct FlagBody {
    value: Value,
    #[serde(default)]
    reason: Option<Value>,
}

async fn set_flag(State(s): State<Arc<Shared>>, Path(key): Path<String>, body: Bytes) -> Reply {
    let b: FlagBody = parse(&body)?;
    let c = ctl(s);
    c.set_flag_with_reason(key, b.value, b.reason);
    Ok(done(&c))
}

async fn remove_flag(State(s): State<Arc<Shared>>, Path(key): Path<String>) -> Response {
    let c = ctl(s);
    c.remove_flag(&key);
    done(&c)
}

#[derive(Deserialize)]
struct RolloutBody {
    percentage: u8,
}

async fn set_rollout(State(s): State<Arc<Shared>>, Path(key): Path<String>, body: Bytes) -> Reply {
    let b: RolloutBody = parse(&body)?;
    let c = ctl(s);
    c.set_rollout(key, b.percentage);
    Ok(done(&c))
}

async fn set_user(State(s): State<Arc<Shared>>, Path(user): Path<String>, body: Bytes) -> Reply {
    let set: FlagSet = parse(&body)?;
    let c = ctl(s);
    c.set_user_flags(user, set);
    Ok(done(&c))
}

async fn remove_user(State(s): State<Arc<Shared>>, Path(user): Path<String>) -> Response {
    let c = ctl(s);
    c.remove_user_flags(&user);
    done(&c)
}

async fn set_rules(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let text = std::str::from_utf8(&body).map_err(invalid)?;
    let c = ctl(s);
    c.set_rules_raw(text).map_err(invalid)?;
    Ok(done(&c))
}

async fn clear_rules(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.clear_rules();
    done(&c)
}

#[derive(Deserialize)]
struct ModeBody {
    mode: StreamMode,
}

async fn stream_mode(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: ModeBody = parse(&body)?;
    let c = ctl(s);
    c.set_stream_mode(b.mode);
    Ok(done(&c))
}

#[derive(Deserialize)]
struct AuthBody {
    auth: StreamAuth,
}

async fn stream_auth(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: AuthBody = parse(&body)?;
    let c = ctl(s);
    c.set_stream_auth(b.auth);
    Ok(done(&c))
}

async fn heartbeat(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let hb: Heartbeat = parse(&body)?;
    let c = ctl(s);
    c.set_heartbeat(Some(hb));
    Ok(done(&c))
}

async fn heartbeat_off(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.set_heartbeat(None);
    done(&c)
}

#[derive(Deserialize)]
struct FaultBody {
    route: Route,
    #[serde(flatten)]
    fault: Fault,
}

async fn add_fault(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: FaultBody = parse(&body)?;
    if StatusCode::from_u16(b.fault.status).is_err() {
        return Err(invalid(format!("invalid status {}", b.fault.status)));
    }
    let c = ctl(s);
    c.fail(b.route, b.fault);
    Ok(done(&c))
}

async fn clear_faults(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.clear_faults();
    done(&c)
}

async fn clear_fault(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Reply {
    let r = route(&name)?;
    let c = ctl(s);
    c.clear_fault(r);
    Ok(done(&c))
}

#[derive(Deserialize)]
struct DelayBody {
    ms: u64,
}

async fn set_delay(State(s): State<Arc<Shared>>, Path(name): Path<String>, body: Bytes) -> Reply {
    let r = route(&name)?;
    let b: DelayBody = parse(&body)?;
    let c = ctl(s);
    c.set_delay(r, Duration::from_millis(b.ms));
    Ok(done(&c))
}

async fn clear_delays(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.clear_delays();
    done(&c)
}

#[derive(Deserialize, Default)]
struct DropBody {
    #[serde(default)]
    kind: DropKind,
}

async fn drop_streams(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: DropBody = if body.is_empty() {
        DropBody::default()
    } else {
        parse(&body)?
    };
    Ok(ok(
        &json!({"ok": true, "streams": ctl(s).drop_streams(b.kind)}),
    ))
}

async fn stall(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.stall_streams();
    done(&c)
}

async fn resume(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.resume_streams();
    done(&c)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBody {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    hex: Option<String>,
}

async fn raw(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: RawBody = parse(&body)?;
    let bytes = match (b.text, b.hex) {
        (Some(t), None) => t.into_bytes(),
        (None, Some(h)) => {
            decode_hex(&h).ok_or_else(|| invalid("hex must be an even number of hex digits"))?
        }
        _ => return Err(invalid("give exactly one of text, hex")),
    };
    Ok(ok(&json!({"ok": true, "streams": ctl(s).send_raw(bytes)})))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(text, 16).ok()
        })
        .collect()
}

#[derive(Deserialize)]
struct EventBody {
    event: String,
    data: Value,
}

async fn event(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: EventBody = parse(&body)?;
    if b.event.contains(['\n', '\r']) {
        return Err(invalid("event name must be one line"));
    }
    // A JSON string is sent as its text; anything else as compact JSON.
    let data = match b.data {
        Value::String(text) => text,
        other => to_json(&other),
    };
    Ok(ok(
        &json!({"ok": true, "streams": ctl(s).send_event(&b.event, &data)}),
    ))
}

#[derive(Deserialize)]
struct DownBody {
    down: bool,
}

async fn down(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: DownBody = parse(&body)?;
    let c = ctl(s);
    c.set_down(b.down);
    Ok(done(&c))
}

/// Closes every protocol connection after the grace (this one may be among them).
async fn close_connections(State(s): State<Arc<Shared>>) -> Response {
    let later = ctl(s);
    tokio::spawn(async move {
        tokio::time::sleep(STOP_GRACE).await;
        later.close_connections();
    });
    ok(&json!({"ok": true, "closing_in_ms": STOP_GRACE.as_millis()}))
}

/// Stops the protocol listener after the grace, so this answer can leave first.
async fn stop(State(s): State<Arc<Shared>>) -> Response {
    let later = ctl(s);
    tokio::spawn(async move {
        tokio::time::sleep(STOP_GRACE).await;
        later.stop().await;
    });
    ok(&json!({"ok": true, "stopping_in_ms": STOP_GRACE.as_millis()}))
}

async fn start(State(s): State<Arc<Shared>>) -> Response {
    match ctl(s).start().await {
        Ok(addr) => ok(&json!({"ok": true, "addr": addr.to_string()})),
        Err(e) => reply(StatusCode::CONFLICT, &json!({"error": e.to_string()})),
    }
}

#[derive(Deserialize)]
struct OutageBody {
    ms: u64,
}

/// `{"ms":N}`: stop the protocol listener (after the grace) and rebind the same port N ms later.
/// Works from the protocol listener itself, unlike `/control/stop` + `/control/start`.
async fn outage(State(s): State<Arc<Shared>>, body: Bytes) -> Reply {
    let b: OutageBody = parse(&body)?;
    let later = ctl(s);
    tokio::spawn(async move {
        tokio::time::sleep(STOP_GRACE).await;
        later.stop().await;
        tokio::time::sleep(Duration::from_millis(b.ms)).await;
        let _ = later.start().await;
    });
    Ok(ok(
        &json!({"ok": true, "stopping_in_ms": STOP_GRACE.as_millis(), "down_for_ms": b.ms}),
    ))
}

/// `GET /control/requests?route=flags`: recorded requests, oldest first.
async fn requests(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Reply {
    let c = ctl(s);
    let list = match q.and_then(|q| query::param(&q, "route")) {
        Some(name) => c.requests_for(route(&name)?),
        None => c.requests(),
    };
    Ok(ok(&serde_json::to_value(list).unwrap_or(Value::Null)))
}

async fn last_request(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Reply {
    let r = route(&name)?;
    Ok(match ctl(s).last_request(r) {
        Some(req) => ok(&serde_json::to_value(req).unwrap_or(Value::Null)),
        None => reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "no request recorded"}),
        ),
    })
}

async fn clear_requests(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.clear_requests();
    done(&c)
}

async fn received(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    ok(&json!({
        "identify": c.identify_bodies(),
        "events": c.event_bodies(),
        "telemetry": c.telemetry_bodies(),
    }))
}

async fn clear_received(State(s): State<Arc<Shared>>) -> Response {
    let c = ctl(s);
    c.clear_received();
    done(&c)
}

#[cfg(test)]
mod tests {
    use super::decode_hex;

    #[test]
    fn hex_decoding() {
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("00ff41"), Some(vec![0, 255, b'A']));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é0"), None);
    }
}
