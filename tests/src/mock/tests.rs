//! In-process tests of the mock over real loopback sockets: protocol bytes, control, faults,
//! stream lifecycle and the listener restart.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::*;
use crate::sse::{SseClient, SseError, SseEvent, SseItem, StreamEnd, test_http_client};

/// Upper bound for anything that should happen "at once" on loopback.
const T: Duration = Duration::from_secs(5);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(250);

const BASIC_FLAGS: &str = r#"{"banner-text":true,"config":true,"disabled-flag":false,"enabled-flag":true,"max-items":true,"rollout-50":false}"#;

fn bearer(mock: &MockControl) -> String {
    format!("Bearer {}", mock.api_key())
}

async fn get(mock: &MockControl, path_and_query: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = test_http_client().get(format!("{}{path_and_query}", mock.base_url()));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    req.send().await.unwrap()
}

async fn flags(mock: &MockControl, query: &str) -> reqwest::Response {
    get(
        mock,
        &format!("/api/v1/sdk/flags{query}"),
        Some(&bearer(mock)),
    )
    .await
}

fn stream_request(mock: &MockControl, query: &str) -> reqwest::RequestBuilder {
    test_http_client().get(format!("{}/api/v1/sdk/stream{query}", mock.base_url()))
}

/// A stream authenticated with `?token=` (what Node, Go and .NET send).
async fn open_stream(mock: &MockControl, extra_query: &str) -> SseClient {
    let q = format!("?token={}{extra_query}", mock.api_key());
    SseClient::open(stream_request(mock, &q), T).await.unwrap()
}

fn sha_etag(body: &str) -> String {
    let d = Sha256::digest(body.as_bytes());
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

fn raw_event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

async fn next_raw(client: &mut SseClient) -> String {
    let before = client.raw().len();
    client.next_item(T).await.unwrap();
    String::from_utf8(client.raw()[before..].to_vec()).unwrap()
}

async fn post_json(mock: &MockControl, path: &str, body: &str, auth: bool) -> reqwest::Response {
    let mut req = test_http_client()
        .post(format!("{}{path}", mock.base_url()))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if auth {
        req = req.header("authorization", bearer(mock));
    }
    req.send().await.unwrap()
}

async fn control(
    mock: &MockControl,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let base = match mock.control_addr() {
        Some(addr) => format!("http://{addr}"),
        None => mock.base_url(),
    };
    let mut req = test_http_client().request(method, format!("{base}{path}"));
    if let Some(body) = body {
        req = req.body(body.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn health_needs_no_auth() {
    let mock = MockUpstream::basic().await.unwrap();
    let resp = get(&mock, "/health", None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.unwrap(), r#"{"status":"ok"}"#);
    assert_eq!(mock.stats().health_requests, 1);
}

#[tokio::test]
async fn flags_require_the_bearer_key() {
    let mock = MockUpstream::basic().await.unwrap();
    let key = mock.api_key();
    let cases = [
        (None, 401),
        (Some("Bearer wrong".to_owned()), 401),
        (Some(key.clone()), 401),
        (Some(format!("bearer {key}")), 401),
        (Some(format!("Bearer {key}")), 200),
    ];
    for (auth, want) in &cases {
        let resp = get(&mock, "/api/v1/sdk/flags", auth.as_deref()).await;
        assert_eq!(resp.status().as_u16(), *want, "auth {auth:?}");
        if *want == 401 {
            assert_eq!(resp.headers()["content-type"], "application/json");
            assert_eq!(resp.text().await.unwrap(), UNAUTHORIZED_BODY);
        }
    }
    assert_eq!(mock.stats().auth_failures, 4);
    mock.set_api_key("rg_server_other");
    let resp = get(&mock, "/api/v1/sdk/flags", Some("Bearer rg_server_other")).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn flags_body_and_etag_are_byte_exact() {
    let mock = MockUpstream::basic().await.unwrap();
    let resp = flags(&mock, "?withReasons=true").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, sha_etag(BASIC_FLAGS));
    assert_eq!(etag, mock.etag_for_user(None));
    let body = resp.text().await.unwrap();
    let reasons = r#"{"banner-text":{"inRollout":true,"kind":"FALLTHROUGH"},"config":{"inRollout":true,"kind":"FALLTHROUGH"},"disabled-flag":{"kind":"OFF"},"enabled-flag":{"inRollout":true,"kind":"FALLTHROUGH"},"max-items":{"inRollout":true,"kind":"FALLTHROUGH"},"rollout-50":{"kind":"FALLTHROUGH"}}"#;
    assert_eq!(
        body,
        format!(r#"{{"flags":{BASIC_FLAGS},"reasons":{reasons}}}"#)
    );

    let plain = flags(&mock, "").await;
    assert_eq!(
        plain.headers()["etag"].to_str().unwrap(),
        etag,
        "ETag ignores reasons"
    );
    assert_eq!(
        plain.text().await.unwrap(),
        format!(r#"{{"flags":{BASIC_FLAGS}}}"#)
    );
    let not_true = flags(&mock, "?withReasons=1").await.text().await.unwrap();
    assert!(!not_true.contains("reasons"));
}

#[tokio::test]
async fn if_none_match_gives_304_until_the_flags_change() {
    let mock = MockUpstream::basic().await.unwrap();
    let etag = flags(&mock, "").await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let with_inm = |tag: String| {
        test_http_client()
            .get(format!(
                "{}/api/v1/sdk/flags?withReasons=true",
                mock.base_url()
            ))
            .header("authorization", bearer(&mock))
            .header("if-none-match", tag)
            .send()
    };
    let resp = with_inm(etag.clone()).await.unwrap();
    assert_eq!(resp.status(), 304);
    assert!(resp.headers().get("etag").is_none());
    assert!(resp.headers().get("content-type").is_none());
    assert!(resp.bytes().await.unwrap().is_empty());

    let unquoted = etag.trim_matches('"').to_owned();
    assert_eq!(with_inm(unquoted).await.unwrap().status(), 200);

    mock.set_flag("enabled-flag", false);
    let resp = with_inm(etag.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_ne!(resp.headers()["etag"].to_str().unwrap(), etag);

    let s = mock.stats();
    assert_eq!(
        (
            s.flags_requests,
            s.flags_if_none_match,
            s.flags_not_modified,
            s.flags_ok
        ),
        (4, 3, 1, 3)
    );
    assert_eq!(s.version, 1);
}

#[tokio::test]
async fn per_user_flags_and_rollouts() {
    let mock = MockUpstream::basic().await.unwrap();
    let alice = FlagSet::from_bools([("only-alice", true)])
        .with_reason("only-alice", json!({"kind": "TARGET_MATCH"}));
    mock.set_user_flags("alice", alice);

    let body = flags(&mock, "?withReasons=true&user_id=alice")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        body,
        r#"{"flags":{"only-alice":true},"reasons":{"only-alice":{"kind":"TARGET_MATCH"}}}"#
    );
    let resp = flags(&mock, "?user_id=alice").await;
    assert_eq!(
        resp.headers()["etag"].to_str().unwrap(),
        sha_etag(r#"{"only-alice":true}"#)
    );

    // rollout-50 with the official mock's buckets: user-1 -> 15 (in), consistent-user-123 -> 89.
    let user1: Value = flags(&mock, "?user_id=user-1").await.json().await.unwrap();
    assert_eq!(user1["flags"]["rollout-50"], true);
    let other: Value = flags(&mock, "?user_id=consistent-user-123")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(other["flags"]["rollout-50"], false);
    let anon: Value = flags(&mock, "?user_id=").await.json().await.unwrap();
    assert_eq!(anon["flags"].to_string(), BASIC_FLAGS);
    let encoded: Value = flags(&mock, "?user_id=al%69ce").await.json().await.unwrap();
    assert_eq!(encoded["flags"], json!({"only-alice": true}));

    mock.remove_user_flags("alice");
    let back: Value = flags(&mock, "?user_id=alice").await.json().await.unwrap();
    assert_eq!(back["flags"]["enabled-flag"], true);
}

#[tokio::test]
async fn stream_auth_modes() {
    let mock = MockUpstream::basic().await.unwrap();
    let key = mock.api_key();
    let token = format!("?token={key}");
    let cases = [
        (StreamAuth::TokenOrBearer, "", true, true),
        (StreamAuth::TokenOrBearer, token.as_str(), false, true),
        (StreamAuth::TokenOrBearer, "?token=nope", false, false),
        (StreamAuth::TokenOrBearer, "", false, false),
        (StreamAuth::TokenOnly, "", true, false),
        (StreamAuth::TokenOnly, token.as_str(), false, true),
        (StreamAuth::BearerOnly, token.as_str(), false, false),
        (StreamAuth::BearerOnly, "", true, true),
    ];
    for (auth, query, with_bearer, want_ok) in cases {
        mock.set_stream_auth(auth);
        let mut req = stream_request(&mock, query);
        if with_bearer {
            req = req.header("authorization", bearer(&mock));
        }
        match SseClient::open(req, T).await {
            Ok(mut client) => {
                assert!(want_ok, "{auth:?} {query} bearer={with_bearer} should fail");
                assert_eq!(client.header("content-type"), Some("text/event-stream"));
                assert_eq!(client.header("cache-control"), Some("no-cache"));
                assert_eq!(client.next_event(T).await.unwrap().event, "init");
            }
            Err(SseError::Status {
                status,
                content_type,
                body,
            }) => {
                assert!(
                    !want_ok,
                    "{auth:?} {query} bearer={with_bearer} should pass"
                );
                assert_eq!(status, 401);
                assert_eq!(content_type.as_deref(), Some("application/json"));
                assert_eq!(body, UNAUTHORIZED_BODY);
            }
            Err(e) => panic!("{e}"),
        }
    }
    mock.wait_for_open_streams(0, T).await.unwrap();
    assert_eq!(mock.stats().streams_accepted, 4);
}

#[tokio::test]
async fn stream_starts_with_the_users_init_snapshot() {
    let mock = MockUpstream::basic().await.unwrap();
    mock.set_user_flags("alice", FlagSet::from_bools([("a", true)]));
    let mut anon = open_stream(&mock, "").await;
    assert_eq!(
        next_raw(&mut anon).await,
        raw_event("init", &format!(r#"{{"flags":{BASIC_FLAGS}}}"#))
    );
    let mut alice = open_stream(&mock, "&user_id=alice").await;
    assert_eq!(
        next_raw(&mut alice).await,
        raw_event("init", r#"{"flags":{"a":true}}"#)
    );
    let mut user1 = open_stream(&mock, "&user_id=user-1").await;
    let init = user1.next_event(T).await.unwrap().json().unwrap();
    assert_eq!(init["flags"]["rollout-50"], true);
    // No heartbeat by default, like the official mock.
    anon.expect_silence(QUIET).await.unwrap();

    // A change reaches each stream as its own user's snapshot.
    mock.set_user_flags("alice", FlagSet::from_bools([("a", false)]));
    assert_eq!(
        next_raw(&mut alice).await,
        raw_event("init", r#"{"flags":{"a":false}}"#)
    );
    assert_eq!(
        next_raw(&mut anon).await,
        raw_event("init", &format!(r#"{{"flags":{BASIC_FLAGS}}}"#))
    );
    assert_eq!(
        mock.last_request(Route::Stream)
            .unwrap()
            .query_param("user_id")
            .as_deref(),
        Some("user-1")
    );
}

#[tokio::test]
async fn stream_modes_send_their_event_bytes() {
    let on = r#"{"flags":{"a":true,"b":false}}"#;
    let off = r#"{"flags":{"a":false,"b":false}}"#;
    let cases: [(StreamMode, Vec<String>); 4] = [
        (StreamMode::Init, vec![raw_event("init", off)]),
        (StreamMode::Flags, vec![raw_event("flags", off)]),
        (
            StreamMode::FlagChanged,
            vec![raw_event("flag-changed", r#"{"enabled":false,"key":"a"}"#)],
        ),
        (
            StreamMode::FlagUpdate,
            vec![raw_event("flag-update", r#"{"enabled":false,"key":"a"}"#)],
        ),
    ];
    for (mode, want) in cases {
        let mock = MockUpstream::start(
            MockConfig::new()
                .flags(FlagSet::from_bools([("a", true), ("b", false)]))
                .stream_mode(mode),
        )
        .await
        .unwrap();
        let mut client = open_stream(&mock, "").await;
        assert_eq!(
            next_raw(&mut client).await,
            raw_event("init", on),
            "{mode:?}"
        );
        mock.set_flag("a", false);
        for frame in &want {
            assert_eq!(&next_raw(&mut client).await, frame, "{mode:?}");
        }
        client.expect_silence(QUIET).await.unwrap();
        // An unchanged value still counts as a change for snapshots, but not for notifications.
        mock.set_flag("a", false);
        if mode.is_snapshot() {
            assert_eq!(next_raw(&mut client).await, want[0], "{mode:?}");
        } else {
            client.expect_silence(QUIET).await.unwrap();
        }
    }
}

#[tokio::test]
async fn notification_modes_send_one_event_per_changed_key() {
    let mock = MockUpstream::start(
        MockConfig::new()
            .flags(FlagSet::from_bools([("a", true), ("b", true), ("c", true)]))
            .stream_mode(StreamMode::FlagChanged),
    )
    .await
    .unwrap();
    let mut client = open_stream(&mock, "").await;
    client.next_event(T).await.unwrap();
    mock.set_flags(FlagSet::from_bools([
        ("a", true),
        ("b", false),
        ("d", true),
    ]));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(client.next_event(T).await.unwrap().data);
    }
    assert_eq!(
        got,
        [
            r#"{"enabled":false,"key":"b"}"#,
            r#"{"enabled":false,"key":"c"}"#,
            r#"{"enabled":true,"key":"d"}"#,
        ]
    );
    client.expect_silence(QUIET).await.unwrap();
}

#[tokio::test]
async fn rules_full_is_sent_on_change_and_after_init() {
    let mock = MockUpstream::basic().await.unwrap();
    let mut client = open_stream(&mock, "").await;
    client.next_event(T).await.unwrap();
    let rules = r#"{"version":"v2","flags":{"x":{"key":"x","enabled":true,"rollout":100}}}"#;
    mock.set_rules_raw(rules).unwrap();
    assert_eq!(next_raw(&mut client).await, raw_event("rules-full", rules));
    assert_eq!(mock.stats().version, 1);

    let mut late = open_stream(&mock, "").await;
    assert_eq!(late.next_event(T).await.unwrap().event, "init");
    assert_eq!(next_raw(&mut late).await, raw_event("rules-full", rules));

    assert!(mock.set_rules_raw("{not json").is_err());
    mock.set_rules_raw("{\n  \"version\": \"v3\",\n  \"flags\": {}\n}")
        .unwrap();
    let ev = client.next_event(T).await.unwrap();
    assert_eq!(ev.event, "rules-full");
    assert!(!ev.data.contains('\n'));
    assert_eq!(ev.json().unwrap(), json!({"version": "v3", "flags": {}}));

    mock.clear_rules();
    let mut after = open_stream(&mock, "").await;
    after.next_event(T).await.unwrap();
    after.expect_silence(QUIET).await.unwrap();
}

#[tokio::test]
async fn heartbeats_are_configurable() {
    let mock = MockUpstream::basic().await.unwrap();
    let mut client = open_stream(&mock, "").await;
    client.next_event(T).await.unwrap();
    client.expect_silence(QUIET).await.unwrap();

    mock.set_heartbeat(Some(Heartbeat::comments(Duration::from_millis(30))));
    assert_eq!(
        client.next_item(T).await.unwrap(),
        SseItem::Comment("keepalive".into())
    );
    assert_eq!(
        client.next_item(T).await.unwrap(),
        SseItem::Comment("keepalive".into())
    );

    mock.set_heartbeat(Some(Heartbeat::events(Duration::from_millis(30))));
    // Drain anything written under the old setting, then expect heartbeat events only.
    let ev = loop {
        if let SseItem::Event(ev) = client.next_item(T).await.unwrap() {
            break ev;
        }
    };
    assert_eq!(ev.event, "heartbeat");
    let ts = ev.json().unwrap()["timestamp"].as_u64().unwrap();
    assert!(ts > 1_600_000_000_000, "unix ms, got {ts}");

    mock.set_heartbeat(None);
    // At most one heartbeat could have been in flight when it was switched off.
    let _ = client.next_item(QUIET).await;
    client.expect_silence(QUIET).await.unwrap();
}

#[tokio::test]
async fn faults_answer_before_auth_then_expire() {
    let mock = MockUpstream::basic().await.unwrap();
    mock.fail(Route::Flags, Fault::status(503).times(2).retry_after("7"));
    for _ in 0..2 {
        let resp = get(&mock, "/api/v1/sdk/flags", None).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "7");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": {"code": "INTERNAL_001", "category": "INTERNAL",
            "message": "Service Unavailable", "retryable": true}})
        );
    }
    assert_eq!(flags(&mock, "").await.status(), 200);

    mock.fail(
        Route::Flags,
        Fault::status(200)
            .body("{not json")
            .content_type("text/plain"),
    );
    for _ in 0..3 {
        let resp = flags(&mock, "").await;
        assert_eq!(resp.headers()["content-type"], "text/plain");
        assert_eq!(resp.text().await.unwrap(), "{not json");
    }
    mock.clear_fault(Route::Flags);
    assert_eq!(
        flags(&mock, "").await.text().await.unwrap(),
        format!(r#"{{"flags":{BASIC_FLAGS}}}"#)
    );

    mock.fail(Route::Stream, Fault::status(429).times(1));
    let q = format!("?token={}", mock.api_key());
    match SseClient::open(stream_request(&mock, &q), T).await {
        Err(SseError::Status {
            status: 429, body, ..
        }) => {
            assert!(body.contains("RATE_001"), "{body}");
        }
        other => panic!("expected a 429, got {other:?}"),
    }
    let mut ok = open_stream(&mock, "").await;
    ok.next_event(T).await.unwrap();

    mock.fail(Route::Events, Fault::status(500).times(0));
    assert_eq!(
        post_json(&mock, "/api/v1/sdk/events", r#"{"events":[]}"#, true)
            .await
            .status(),
        200
    );
    let s = mock.stats();
    assert_eq!(s.faults_served, 6);
    assert_eq!(s.stream_requests, 2);
    assert_eq!(s.streams_accepted, 1);
}

#[tokio::test]
async fn delays_hold_the_answer() {
    let mock = MockUpstream::basic().await.unwrap();
    mock.set_delay(Route::Flags, Duration::from_secs(30));
    let err = test_http_client()
        .get(format!("{}/api/v1/sdk/flags", mock.base_url()))
        .header("authorization", bearer(&mock))
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // The request was seen even though it was never answered.
    assert_eq!(mock.stats().flags_requests, 1);
    mock.clear_delays();
    assert_eq!(flags(&mock, "").await.status(), 200);
}

#[tokio::test]
async fn clearing_a_delay_releases_the_answers_it_holds() {
    let mock = MockUpstream::basic().await.unwrap();
    mock.set_delay(Route::Flags, Duration::from_secs(3600));
    let held = tokio::spawn({
        let url = format!("{}/api/v1/sdk/flags", mock.base_url());
        let auth = bearer(&mock);
        async move {
            test_http_client()
                .get(url)
                .header("authorization", auth)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    mock.wait_until(T, |s| s.flags_requests == 1).await.unwrap();
    mock.clear_delays();
    let status = tokio::time::timeout(T, held).await.expect("released");
    assert_eq!(status.unwrap().unwrap(), 200);
}

#[tokio::test]
async fn drops_end_streams_cleanly_or_abort_them() {
    for (kind, want) in [
        (DropKind::Clean, StreamEnd::Clean),
        (DropKind::Abort, StreamEnd::Broken),
    ] {
        let mock = MockUpstream::basic().await.unwrap();
        let mut a = open_stream(&mock, "").await;
        let mut b = open_stream(&mock, "&user_id=b").await;
        a.next_event(T).await.unwrap();
        b.next_event(T).await.unwrap();
        mock.wait_for_open_streams(2, T).await.unwrap();
        assert_eq!(mock.drop_streams(kind), 2);
        assert_eq!(a.wait_end(T).await.unwrap(), want, "{kind:?}");
        assert_eq!(b.wait_end(T).await.unwrap(), want, "{kind:?}");
        mock.wait_for_open_streams(0, T).await.unwrap();
        // The mock keeps serving: reconnects get a fresh init.
        let mut again = open_stream(&mock, "").await;
        assert_eq!(again.next_event(T).await.unwrap().event, "init");
        assert_eq!(mock.stats().streams_accepted, 3);
    }
}

#[tokio::test]
async fn client_disconnects_are_counted() {
    let mock = MockUpstream::basic().await.unwrap();
    let mut a = open_stream(&mock, "").await;
    a.next_event(T).await.unwrap();
    let mut b = open_stream(&mock, "").await;
    b.next_event(T).await.unwrap();
    assert_eq!(mock.open_streams(), 2);
    drop(a);
    mock.wait_for_open_streams(1, T).await.unwrap();
    drop(b);
    mock.wait_for_open_streams(0, T).await.unwrap();
    let s = mock.stats();
    assert_eq!((s.streams_accepted, s.open_streams), (2, 0));
}

#[tokio::test]
async fn stalls_hold_everything_until_resumed() {
    let mock = MockUpstream::basic().await.unwrap();
    let mut old = open_stream(&mock, "").await;
    old.next_event(T).await.unwrap();
    mock.set_heartbeat(Some(Heartbeat::comments(Duration::from_millis(20))));
    mock.stall_streams();
    // Stalled: no heartbeat, no change, and a new stream gets its headers but no init.
    let _ = old.next_item(Duration::from_millis(50)).await; // a heartbeat may have been in flight
    mock.set_flag("enabled-flag", false);
    old.expect_silence(QUIET).await.unwrap();
    let mut fresh = open_stream(&mock, "").await;
    fresh.expect_silence(QUIET).await.unwrap();
    mock.set_heartbeat(None);

    mock.resume_streams();
    let ev = old.next_event(T).await.unwrap();
    assert_eq!(ev.json().unwrap()["flags"]["enabled-flag"], false);
    let init = fresh.next_event(T).await.unwrap();
    assert_eq!(
        (
            init.event.as_str(),
            init.json().unwrap()["flags"]["enabled-flag"].clone()
        ),
        ("init", json!(false))
    );

    // A drop still works on a stalled stream.
    mock.stall_streams();
    mock.drop_streams(DropKind::Clean);
    assert_eq!(old.wait_end(T).await.unwrap(), StreamEnd::Clean);
    assert_eq!(fresh.wait_end(T).await.unwrap(), StreamEnd::Clean);
}

#[tokio::test]
async fn raw_bytes_and_custom_events() {
    let mock = MockUpstream::basic().await.unwrap();
    let mut client = open_stream(&mock, "").await;
    client.next_event(T).await.unwrap();
    let start = client.raw().len();
    assert_eq!(mock.send_raw(&b"event: flags\ndata: {\"fla"[..]), 1);
    client.read_until_bytes(start + 23, T).await.unwrap();
    assert_eq!(client.parser().pending(), b"data: {\"fla");
    mock.send_raw(&b"gs\":{}}\n\n"[..]);
    let ev = client.next_event(T).await.unwrap();
    assert_eq!(
        (ev.event.as_str(), ev.data.as_str()),
        ("flags", r#"{"flags":{}}"#)
    );

    mock.send_raw(vec![0xff, 0xfe, b'\n', b'\n']);
    mock.send_event("init", "{not json");
    let ev: SseEvent = client.next_event(T).await.unwrap();
    assert_eq!(ev.data, "{not json");
    assert!(ev.json().is_err());
    mock.send_event("heartbeat", "line1\nline2");
    assert_eq!(
        next_raw(&mut client).await,
        "event: heartbeat\ndata: line1\ndata: line2\n\n"
    );
}

#[tokio::test]
async fn down_mode_closes_connections_without_answering() {
    let mock = MockUpstream::basic().await.unwrap();
    let mut client = open_stream(&mock, "").await;
    client.next_event(T).await.unwrap();
    mock.set_down(true);
    assert_eq!(client.wait_end(T).await.unwrap(), StreamEnd::Broken);
    let err = test_http_client()
        .get(format!("{}/health", mock.base_url()))
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err}");
    // Raw TCP: the connection is accepted, then closed with no byte of answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(mock.addr()).await.unwrap();
    let _ = tcp
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(T, tcp.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(read.is_err() || buf.is_empty(), "got {buf:?}");
    let s = mock
        .wait_until(T, |s| s.connections_refused >= 2)
        .await
        .unwrap();
    assert_eq!(s.health_requests, 0);

    mock.set_down(false);
    assert_eq!(get(&mock, "/health", None).await.status(), 200);
}

#[tokio::test]
async fn stop_and_restart_on_the_same_port() {
    let mock = MockUpstream::basic().await.unwrap();
    let addr = mock.addr();
    let mut client = open_stream(&mock, "").await;
    client.next_event(T).await.unwrap();

    mock.stop().await;
    assert!(!mock.is_running());
    assert_eq!(client.wait_end(T).await.unwrap(), StreamEnd::Broken);
    assert_eq!(mock.open_streams(), 0);
    let err = test_http_client()
        .get(format!("{}/health", mock.base_url()))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "refused, got {err}");

    mock.set_flag("enabled-flag", false);
    assert_eq!(mock.start().await.unwrap(), addr);
    assert_eq!(mock.start().await.unwrap(), addr, "start is idempotent");
    let mut back = open_stream(&mock, "").await;
    let init = back.next_event(T).await.unwrap().json().unwrap();
    assert_eq!(init["flags"]["enabled-flag"], false);
    assert_eq!(mock.stats().streams_accepted, 2);
}

#[tokio::test]
async fn post_routes_store_bodies() {
    let mock = MockUpstream::basic().await.unwrap();
    let resp = post_json(
        &mock,
        "/api/v1/sdk/identify",
        r#"{"user":{"id":"u1","email":"a@b.c","attributes":{"plan":"pro"}}}"#,
        true,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), r#"{"success":true}"#);
    assert_eq!(
        mock.identified_user("u1").unwrap()["attributes"]["plan"],
        "pro"
    );

    let events = r#"{"events":[{"flagKey":"f","eventName":"e","userId":"u1","timestamp":"2026-01-01T00:00:00Z"},{"flagKey":"g","eventName":"e","userId":"u2","timestamp":"2026-01-01T00:00:00Z"}]}"#;
    let resp = post_json(&mock, "/api/v1/sdk/events", events, true).await;
    assert_eq!(resp.text().await.unwrap(), r#"{"received":2}"#);
    assert_eq!(mock.events().len(), 2);

    let telemetry = r#"{"evaluations":{"a":{"total":3,"true":2,"false":1},"b":{"total":4,"true":4,"false":0}},"period_ms":60000}"#;
    let resp = post_json(&mock, "/api/v1/sdk/telemetry", telemetry, true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), r#"{"received":7}"#);
    assert_eq!(mock.telemetry_bodies()[0]["period_ms"], 60000);

    assert_eq!(
        post_json(&mock, "/api/v1/sdk/events", events, false)
            .await
            .status(),
        401
    );
    assert_eq!(
        post_json(&mock, "/api/v1/sdk/events", "{oops", true)
            .await
            .status(),
        400
    );
    assert_eq!(
        post_json(&mock, "/api/v1/sdk/events", r#"{"events":3}"#, true)
            .await
            .status(),
        400
    );
    assert_eq!(mock.event_bodies().len(), 1);
    let s = mock.stats();
    assert_eq!(
        (s.identify_requests, s.events_requests, s.telemetry_requests),
        (1, 4, 1)
    );

    mock.clear_received();
    assert!(mock.identify_bodies().is_empty() && mock.events().is_empty());
}

#[tokio::test]
async fn requests_are_recorded_with_headers() {
    let mock = MockUpstream::basic().await.unwrap();
    test_http_client()
        .get(format!(
            "{}/api/v1/sdk/flags?withReasons=true&user_id=u%201",
            mock.base_url()
        ))
        .header("authorization", bearer(&mock))
        .header("x-sdk-name", "rollgate-go")
        .send()
        .await
        .unwrap();
    let req = mock.last_request(Route::Flags).unwrap();
    assert_eq!(req.method, "GET");
    assert_eq!(req.path, "/api/v1/sdk/flags");
    assert_eq!(req.query_param("user_id").as_deref(), Some("u 1"));
    assert_eq!(req.header("Authorization"), Some(bearer(&mock).as_str()));
    assert_eq!(req.header("x-sdk-name"), Some("rollgate-go"));
    let _ = open_stream(&mock, "").await;
    assert_eq!(mock.requests().len(), 2);
    let stream_req = &mock.requests_for(Route::Stream)[0];
    assert_eq!(stream_req.query_param("token"), Some(mock.api_key()));
    assert_eq!(stream_req.header("authorization"), None);
    mock.clear_requests();
    assert!(mock.last_request(Route::Flags).is_none());
}

#[tokio::test]
async fn wait_until_times_out_with_the_last_stats() {
    let mock = MockUpstream::basic().await.unwrap();
    match mock
        .wait_for_open_streams(1, Duration::from_millis(50))
        .await
    {
        Err(MockError::Timeout { stats, .. }) => assert_eq!(stats.open_streams, 0),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let ctl = mock.control();
    let waiter = tokio::spawn(async move { ctl.wait_for_flags_requests(2, T).await });
    flags(&mock, "").await;
    flags(&mock, "").await;
    assert_eq!(waiter.await.unwrap().unwrap().flags_requests, 2);
}

#[tokio::test]
async fn reset_returns_to_the_start_configuration() {
    let mock = MockUpstream::basic().await.unwrap();
    mock.set_flags(FlagSet::from_bools([("x", true)]));
    mock.set_stream_mode(StreamMode::FlagChanged);
    mock.fail(Route::Flags, Fault::status(500));
    mock.set_down(true);
    mock.reset();
    assert_eq!(mock.stream_mode(), StreamMode::Init);
    let resp = flags(&mock, "").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.unwrap(),
        format!(r#"{{"flags":{BASIC_FLAGS}}}"#)
    );
    let s = mock.stats();
    assert_eq!((s.flags_requests, s.faults_served), (1, 0));
}

#[tokio::test]
async fn control_over_http() {
    let mock = MockUpstream::basic().await.unwrap();
    use reqwest::Method;
    let (status, body) = control(
        &mock,
        Method::PUT,
        "/control/flags",
        Some(json!({"flags": {"a": true}, "reasons": {"a": {"kind": "OFF"}}})),
    )
    .await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(1)));
    assert_eq!(
        flags(&mock, "").await.text().await.unwrap(),
        r#"{"flags":{"a":true}}"#
    );
    let (_, view) = control(&mock, Method::GET, "/control/flags", None).await;
    assert_eq!(view["etag"], sha_etag(r#"{"a":true}"#));

    control(
        &mock,
        Method::PUT,
        "/control/flags/b%2Fc",
        Some(json!({"value": false})),
    )
    .await;
    assert_eq!(mock.flags_for(None).flags["b/c"], false);
    control(
        &mock,
        Method::PUT,
        "/control/users/alice",
        Some(json!({"flags": {"z": true}})),
    )
    .await;
    assert_eq!(mock.flags_for(Some("alice")).flags["z"], true);
    control(
        &mock,
        Method::PUT,
        "/control/stream-mode",
        Some(json!({"mode": "flag-update"})),
    )
    .await;
    assert_eq!(mock.stream_mode(), StreamMode::FlagUpdate);
    let (status, err) = control(
        &mock,
        Method::PUT,
        "/control/stream-mode",
        Some(json!({"mode": "nope"})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(mock.stream_mode(), StreamMode::FlagUpdate);

    control(
        &mock,
        Method::POST,
        "/control/faults",
        Some(json!({"route": "flags", "status": 502, "count": 1, "body": "bad gateway"})),
    )
    .await;
    let resp = flags(&mock, "").await;
    assert_eq!(
        (resp.status().as_u16(), resp.text().await.unwrap()),
        (502, "bad gateway".to_owned())
    );
    assert_eq!(
        flags(&mock, "").await.status(),
        200,
        "count:1 means one failure"
    );

    let mut client = open_stream(&mock, "").await;
    client.next_event(T).await.unwrap();
    let (_, stats) = control(
        &mock,
        Method::GET,
        "/control/wait?open_streams=1&timeout_ms=2000",
        None,
    )
    .await;
    assert_eq!(stats["open_streams"], 1);
    let (status, _) = control(
        &mock,
        Method::GET,
        "/control/wait?open_streams=5&timeout_ms=50",
        None,
    )
    .await;
    assert_eq!(status, 408);

    control(
        &mock,
        Method::POST,
        "/control/streams/raw",
        Some(json!({"hex": "3a20780a0a"})),
    )
    .await;
    assert_eq!(
        client.next_item(T).await.unwrap(),
        SseItem::Comment("x".into())
    );
    control(
        &mock,
        Method::POST,
        "/control/streams/event",
        Some(json!({"event": "flags", "data": {"flags": {}}})),
    )
    .await;
    assert_eq!(client.next_event(T).await.unwrap().data, r#"{"flags":{}}"#);
    let before = state::unix_micros();
    let (_, changed) = control(
        &mock,
        Method::PUT,
        "/control/rules",
        Some(json!({"version": "1", "flags": {}})),
    )
    .await;
    let after = state::unix_micros();
    assert_eq!(client.next_event(T).await.unwrap().event, "rules-full");
    // When the event was queued: while the control request was in flight.
    let queued = changed["last_change_unix_us"].as_u64().expect("a time");
    assert!(
        (before..=after).contains(&queued),
        "{before} <= {queued} <= {after}"
    );

    let (_, last) = control(&mock, Method::GET, "/control/requests/last/stream", None).await;
    assert_eq!(last["path"], "/api/v1/sdk/stream");
    let (_, stats) = control(&mock, Method::GET, "/control/stats", None).await;
    assert_eq!(stats["streams_accepted"], 1);

    control(
        &mock,
        Method::PUT,
        "/control/heartbeat",
        Some(json!({"interval_ms": 30, "comment": true})),
    )
    .await;
    assert_eq!(
        client.next_item(T).await.unwrap(),
        SseItem::Comment("keepalive".into())
    );
    control(&mock, Method::DELETE, "/control/heartbeat", None).await;

    control(
        &mock,
        Method::POST,
        "/control/streams/drop",
        Some(json!({"kind": "abort"})),
    )
    .await;
    assert_eq!(client.wait_end(T).await.unwrap(), StreamEnd::Broken);

    // An outage requested over the protocol listener itself: down, then back on the same port.
    let (status, _) = control(
        &mock,
        Method::POST,
        "/control/outage",
        Some(json!({"ms": 1000})),
    )
    .await;
    assert_eq!(status, 200);
    mock.wait_until(T, |_| !mock.is_running()).await.unwrap();
    let err = test_http_client()
        .get(format!("{}/health", mock.base_url()))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "refused during the outage, got {err}");
    mock.wait_until(T, |_| mock.is_running()).await.unwrap();
    assert_eq!(get(&mock, "/health", None).await.status(), 200);
}

#[tokio::test]
async fn dedicated_control_listener_survives_stop() {
    let mock = MockUpstream::start(
        MockConfig::basic().control_addr(SocketAddr::from(([127, 0, 0, 1], 0))),
    )
    .await
    .unwrap();
    use reqwest::Method;
    let caddr = mock.control_addr().unwrap();
    assert_ne!(caddr, mock.addr());
    let (status, _) = control(&mock, Method::POST, "/control/stop", None).await;
    assert_eq!(status, 200);
    mock.wait_until(T, |_| !mock.is_running()).await.unwrap();
    let (status, body) = control(&mock, Method::POST, "/control/start", None).await;
    assert_eq!(
        (status, body["addr"].as_str()),
        (200, Some(mock.addr().to_string().as_str()))
    );
    assert_eq!(get(&mock, "/health", None).await.status(), 200);
    // The control listener serves only /control.
    let resp = test_http_client()
        .get(format!("http://{caddr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// Opens a stream over a bare socket and reads until the first event has arrived, so the
/// stream is registered; dropping the socket closes it at once (no pool in between).
async fn raw_stream(mock: &MockControl) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(mock.addr()).await.unwrap();
    let request = format!(
        "GET /api/v1/sdk/stream?token={} HTTP/1.1\r\nhost: mock\r\n\r\n",
        mock.api_key()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: init") {
        let n = tokio::time::timeout(T, tcp.read(&mut buf))
            .await
            .expect("the init event in time")
            .unwrap();
        assert!(n > 0, "closed before the init event");
        seen.extend_from_slice(&buf[..n]);
    }
    tcp
}

#[tokio::test]
async fn a_stream_closed_before_the_next_opens_is_never_counted_with_it() {
    let mock = MockUpstream::basic().await.unwrap();
    // Closed, then another opened at once: the mock has not written to the first since, yet
    // counts it closed before it counts the second.
    for _ in 0..5 {
        drop(raw_stream(&mock).await);
        let open = raw_stream(&mock).await;
        let stats = mock.stats();
        assert_eq!(
            (stats.open_streams, stats.peak_open_streams),
            (1, 1),
            "{stats:?}"
        );
        drop(open);
    }
    // Two really open at once are counted as two.
    let first = raw_stream(&mock).await;
    let second = raw_stream(&mock).await;
    let stats = mock.stats();
    assert_eq!(
        (stats.open_streams, stats.peak_open_streams),
        (2, 2),
        "{stats:?}"
    );
    drop((first, second));
    mock.wait_for_open_streams(0, T).await.unwrap();
}
