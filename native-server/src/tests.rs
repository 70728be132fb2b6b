//! In-crate tests of the HTTP surface: routing, auth, CORS, limits, probes, SSE, shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use rollgate_proxy_core::model::RulesPayload;
use rollgate_proxy_core::snapshot::{FlagSource, Revision, Snapshot};
use rollgate_proxy_core::time::Timestamp;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::{self, Settings};
use crate::routes::router;
use crate::state::{App, LocalStatus, Source};

const RULES: &str = r#"{"version":"1","flags":{
  "on":{"enabled":true,"rollout":100},
  "off":{"enabled":false,"rollout":100},
  "pro-only":{"enabled":true,"rollout":0,"rules":[{"id":"r1","enabled":true,"rollout":100,
    "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]}]}
}}"#;

fn settings(args: &[&str]) -> Settings {
    let mut argv = vec!["rollgate-proxy", "--api-key", ""];
    argv.extend_from_slice(args);
    config::parse_from(argv, 7).unwrap().unwrap()
}

fn snapshot(rules: &str) -> Arc<Snapshot> {
    let payload = RulesPayload::from_json(rules.as_bytes()).unwrap();
    Arc::new(Snapshot::build(
        Revision::new(1),
        Timestamp::from_millis(1_764_016_857_123),
        FlagSource::rules(&payload),
    ))
}

fn app(args: &[&str], with_data: bool) -> Arc<App> {
    let app = Arc::new(App::new(
        settings(args),
        Source::Local(Arc::new(LocalStatus::default())),
        CancellationToken::new(),
    ));
    if with_data {
        app.snapshots.send_replace(Some(snapshot(RULES)));
    }
    app
}

async fn call(app: &Arc<App>, request: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let response = router(Arc::clone(app)).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn flags_routes_etag_and_errors() {
    let app = app(&[], true);
    let (status, headers, body) = call(&app, get("/api/flags")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with(r#"{"flags":{"off":false,"on":true,"pro-only":false},"_meta""#));
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"'));
    let (status, _, body) = call(
        &app,
        Request::get("/api/flags")
            .header("if-none-match", &etag)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!((status.as_u16(), body.as_str()), (304, ""));

    let (_, _, body) = call(&app, get("/api/flags?user_id=u1&attr.plan=pro")).await;
    assert!(body.contains(r#""pro-only":true"#), "{body}");
    let (_, _, body) = call(&app, get("/api/flags/on")).await;
    assert_eq!(body, r#"{"key":"on","enabled":true}"#);
    let (_, _, body) = call(&app, get("/api/flags/unknown")).await;
    assert_eq!(body, r#"{"key":"unknown","enabled":false}"#);
    let (status, _, body) = call(&app, get("/api/flags/bad%20key")).await;
    assert_eq!(status, 400);
    assert!(body.contains("INVALID_FLAG_KEY"));

    let (status, _, body) = call(&app, get("/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(
        body.as_bytes(),
        &rollgate_proxy_core::api::Route::parse("GET", "/nope")
            .unwrap_err()
            .body()[..]
    );
    let (status, _, body) = call(
        &app,
        Request::delete("/api/flags").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    assert!(body.contains("METHOD_NOT_ALLOWED"));

    let post = Request::post("/api/flags")
        .body(Body::from(
            r#"{"user":{"id":"u1","attributes":{"plan":"pro"}}}"#,
        ))
        .unwrap();
    let (_, _, body) = call(&app, post).await;
    assert!(body.contains(r#""pro-only":true"#));
}

#[tokio::test]
async fn cors_headers_follow_cores_policy() {
    let request = |method: &str, origin: Option<&str>| {
        let mut request = Request::builder().method(method).uri("/api/flags");
        if let Some(origin) = origin {
            request = request
                .header("origin", origin)
                .header("access-control-request-method", "GET");
        }
        request.body(Body::empty()).unwrap()
    };
    let any = app(&[], true);
    let (status, headers, _) = call(&any, request("GET", Some("https://x.example"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(
        headers["access-control-expose-headers"],
        "etag,retry-after,x-request-id"
    );
    // `*` adds no `Vary: origin`; the flag route's own `Vary: Accept-Encoding` stays.
    let vary = |headers: &http::HeaderMap| -> Vec<String> {
        headers
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .collect()
    };
    assert_eq!(vary(&headers), ["accept-encoding"]);
    let (status, headers, body) = call(&any, request("OPTIONS", None)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(body.is_empty());
    assert_eq!(headers["access-control-max-age"], "600");
    assert_eq!(
        headers["access-control-allow-methods"],
        "GET,HEAD,POST,OPTIONS"
    );

    let list = app(
        &["--cors-origins", "https://app.example,https://b.example"],
        true,
    );
    let (_, headers, _) = call(&list, request("GET", Some("https://app.example"))).await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(vary(&headers), ["accept-encoding", "origin"]);
    for method in ["GET", "OPTIONS"] {
        let (_, headers, _) = call(&list, request(method, Some("https://evil.example"))).await;
        let cors: Vec<&str> = headers
            .keys()
            .map(http::HeaderName::as_str)
            .filter(|name| name.starts_with("access-control") || *name == "vary")
            .collect();
        assert_eq!(cors, ["vary"], "{method}");
    }
}

#[tokio::test]
async fn every_answer_carries_a_request_id() {
    let app = app(&[], true);
    let (_, first, _) = call(&app, get("/api/flags")).await;
    let (_, second, _) = call(&app, get("/nope")).await;
    // Generated ids are 16 hex digits, unique in the process: one thread's come from its
    // block of the process's sequence, in order (other tests take numbers meanwhile).
    let number = |headers: &http::HeaderMap| {
        let id = headers["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 16, "{id}");
        u64::from_str_radix(id, 16).unwrap()
    };
    assert_eq!(number(&second), number(&first) + 1);
    let with_id = |id: &str| {
        Request::get("/api/flags")
            .header("x-request-id", id)
            .body(Body::empty())
            .unwrap()
    };
    let (_, headers, _) = call(&app, with_id("caller-7f")).await;
    assert_eq!(headers["x-request-id"], "caller-7f");
    // Unusable ids (a space, over 128 bytes) are replaced by the next sequence number.
    for bad in ["has space", &"x".repeat(129)] {
        let (_, headers, _) = call(&app, with_id(bad)).await;
        let id = headers["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    assert_eq!(
        crate::routes::sequence_id(u64::MAX - 1),
        format!("{:016x}", u64::MAX - 1).as_str()
    );
}

#[tokio::test]
async fn sdk_api_ofrep_identify_events_telemetry() {
    let app = app(&[], true);
    let (_, headers, body) = call(&app, get("/api/v1/sdk/flags?withReasons=true")).await;
    assert!(body.contains(r#""reasons""#));
    assert!(headers.contains_key("etag"));

    let identify = Request::post("/api/v1/sdk/identify")
        .body(Body::from(
            r#"{"user":{"id":"u9","attributes":{"plan":"pro"}}}"#,
        ))
        .unwrap();
    let (status, _, body) = call(&app, identify).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, r#"{"success":true}"#)
    );
    let (_, _, body) = call(&app, get("/api/flags/pro-only?user_id=u9")).await;
    assert_eq!(body, r#"{"key":"pro-only","enabled":true}"#);

    let events = Request::post("/api/v1/sdk/events")
        .body(Body::from(r#"{"events":[{},{},{}]}"#))
        .unwrap();
    assert_eq!(call(&app, events).await.2, r#"{"received":3}"#);
    let telemetry = Request::post("/api/v1/sdk/telemetry")
        .body(Body::from(
            r#"{"evaluations":{"on":{"total":5,"true":5,"false":0}},"period_ms":1}"#,
        ))
        .unwrap();
    assert_eq!(call(&app, telemetry).await.2, r#"{"received":5}"#);

    let single = Request::post("/ofrep/v1/evaluate/flags/on")
        .body(Body::from(r#"{"context":{"targetingKey":"u1"}}"#))
        .unwrap();
    let (status, _, body) = call(&app, single).await;
    assert_eq!(status, 200);
    assert!(body.starts_with(r#"{"key":"on","value":true"#), "{body}");
    let missing = Request::post("/ofrep/v1/evaluate/flags/zz")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = call(&app, missing).await;
    assert_eq!(status, 404);
    assert!(body.contains("FLAG_NOT_FOUND"));
    let bulk = Request::post("/ofrep/v1/evaluate/flags")
        .body(Body::from(r#"{"context":{"plan":"pro"}}"#))
        .unwrap();
    let (status, headers, body) = call(&app, bulk).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""requestUri":"/ofrep/v1/sse""#));
    let again = Request::post("/ofrep/v1/evaluate/flags")
        .header("if-none-match", headers["etag"].clone())
        .body(Body::from(r#"{"context":{"plan":"pro"}}"#))
        .unwrap();
    assert_eq!(call(&app, again).await.0, 304);
}

#[tokio::test]
async fn client_keys_and_cors() {
    let app = app(
        &[
            "--client-keys",
            "ck1,ck2",
            "--cors-origins",
            "https://app.example",
        ],
        true,
    );
    let (status, _, body) = call(&app, get("/api/flags")).await;
    assert_eq!(status, 401);
    assert!(body.contains("UNAUTHORIZED"));
    let bearer = Request::get("/api/flags")
        .header("authorization", "Bearer ck2")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, bearer).await.0, 200);
    let api_key = Request::get("/api/flags")
        .header("x-api-key", "ck1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, api_key).await.0, 200);
    assert_eq!(call(&app, get("/api/flags?token=ck1")).await.0, 200);
    assert_eq!(call(&app, get("/api/flags?token=wrong")).await.0, 401);
    // Probes and health never need a key.
    for path in ["/api/health", "/live", "/ready", "/health", "/api/metrics"] {
        assert_eq!(call(&app, get(path)).await.0, 200, "{path}");
    }

    // A preflight needs no key and lists the headers clients send.
    let preflight = Request::options("/api/flags")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization,if-none-match",
        )
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = call(&app, preflight).await;
    assert!(status.is_success());
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("authorization") && allowed.contains("if-none-match"));

    let foreign = Request::get("/api/flags?token=ck1")
        .header("origin", "https://evil.example")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = call(&app, foreign).await;
    assert!(!headers.contains_key("access-control-allow-origin"));
    let allowed = Request::get("/api/flags?token=ck1")
        .header("origin", "https://app.example")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = call(&app, allowed).await;
    assert!(
        headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("etag")
    );
}

#[tokio::test]
async fn limits_answer_json_errors() {
    let app = app(&["--body-limit", "1024"], true);
    let big = Request::post("/api/flags")
        .body(Body::from(vec![b' '; 4096]))
        .unwrap();
    let (status, _, body) = call(&app, big).await;
    assert_eq!(status, 413);
    assert!(body.contains("PAYLOAD_TOO_LARGE"));

    let long = format!("/api/flags?user_id={}", "x".repeat(9000));
    let (status, _, body) = call(&app, get(&long)).await;
    assert_eq!(status, 414);
    assert!(body.contains("URI_TOO_LONG"));

    let mut request = get("/api/flags");
    for i in 0..40 {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
            http::HeaderValue::from_str(&"v".repeat(500)).unwrap(),
        );
    }
    let (status, _, body) = call(&app, request).await;
    assert_eq!(status, 431);
    assert!(body.contains("HEADERS_TOO_LARGE"));

    let attrs: String = (0..65).map(|i| format!("&attr.a{i}=v")).collect();
    let (status, _, body) = call(&app, get(&format!("/api/flags?user_id=u{attrs}"))).await;
    assert_eq!(status, 400);
    assert!(body.contains("INVALID_CONTEXT"));
}

#[tokio::test]
async fn probes_before_and_after_the_first_snapshot() {
    let app = app(&[], false);
    let (status, headers, body) = call(&app, get("/ready")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert!(body.contains("NOT_READY"));
    assert_eq!(call(&app, get("/api/flags")).await.0, 503);
    assert_eq!(call(&app, get("/live")).await.0, 200);
    let (_, _, body) = call(&app, get("/api/health")).await;
    assert!(body.contains(r#""status":"degraded""#), "{body}");
    app.snapshots.send_replace(Some(snapshot(RULES)));
    let (status, _, body) = call(&app, get("/ready")).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, r#"{"status":"ready"}"#)
    );
    let (_, _, body) = call(&app, get("/api/health")).await;
    assert!(body.contains(r#""status":"healthy""#), "{body}");
    assert!(body.contains(r#""flags":3"#), "{body}");
}

async fn next_chunk(body: &mut Body, wait: Duration) -> Option<Bytes> {
    match tokio::time::timeout(wait, body.frame()).await {
        Ok(Some(Ok(frame))) => frame.into_data().ok(),
        _ => None,
    }
}

/// The first chunk is `retry:` with 2000 ms ±10 %, drawn per connection (core's `Subscriber`).
async fn assert_retry_first(body: &mut Body, wait: Duration) {
    let retry = next_chunk(body, wait).await.unwrap();
    let retry: u64 = std::str::from_utf8(&retry)
        .unwrap()
        .trim()
        .strip_prefix("retry: ")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1800..=2200).contains(&retry), "{retry}");
}

#[tokio::test]
async fn sse_initial_frames_changes_and_last_event_id() {
    let app = app(&[], true);
    let current = app.current().unwrap();
    let response = router(Arc::clone(&app))
        .oneshot(get("/api/stream"))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut body = response.into_body();
    let wait = Duration::from_secs(2);
    assert_retry_first(&mut body, wait).await;
    assert_eq!(
        &next_chunk(&mut body, wait).await.unwrap(),
        current.flags_frame()
    );
    let changed = snapshot(&RULES.replace(r#""on":{"enabled":true"#, r#""on":{"enabled":false"#));
    app.snapshots.send_replace(Some(Arc::clone(&changed)));
    assert_eq!(
        &next_chunk(&mut body, wait).await.unwrap(),
        changed.flags_frame()
    );

    // Reconnect with the current id: no snapshot resent.
    let request = Request::get("/api/v1/sdk/stream")
        .header("last-event-id", changed.event_id())
        .body(Body::empty())
        .unwrap();
    let mut body = router(Arc::clone(&app))
        .oneshot(request)
        .await
        .unwrap()
        .into_body();
    assert_retry_first(&mut body, wait).await;
    assert!(
        next_chunk(&mut body, Duration::from_millis(300))
            .await
            .is_none()
    );

    // A per-user SDK stream gets `init` frames evaluated for its context.
    let mut body = router(Arc::clone(&app))
        .oneshot(get("/api/v1/sdk/stream?user_id=u1&attr.plan=pro"))
        .await
        .unwrap()
        .into_body();
    next_chunk(&mut body, wait).await.unwrap();
    let frame = next_chunk(&mut body, wait).await.unwrap();
    let text = std::str::from_utf8(&frame).unwrap();
    assert!(text.starts_with("event: init\n"), "{text}");
    assert!(text.contains(r#""pro-only":true"#), "{text}");
    // Three streams are open (shadowed bodies are still alive).
    assert_eq!(app.downstream.metrics.stream_clients(), 3);

    // Shutdown ends every stream.
    app.shutdown.cancel();
    assert!(
        tokio::time::timeout(wait, body.frame())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn sse_waits_for_the_first_snapshot_with_keepalives() {
    let app = app(&["--sdk-keepalive", "100ms"], false);
    let mut body = router(Arc::clone(&app))
        .oneshot(get("/api/v1/sdk/stream"))
        .await
        .unwrap()
        .into_body();
    let wait = Duration::from_secs(2);
    next_chunk(&mut body, wait).await.unwrap();
    assert_eq!(
        next_chunk(&mut body, wait).await.unwrap(),
        Bytes::from_static(rollgate_proxy_core::sse::encode::KEEPALIVE)
    );
    let first = snapshot(RULES);
    app.snapshots.send_replace(Some(Arc::clone(&first)));
    loop {
        let chunk = next_chunk(&mut body, wait).await.unwrap();
        if chunk != rollgate_proxy_core::sse::encode::KEEPALIVE {
            assert_eq!(&chunk, first.init_frame());
            break;
        }
    }
}

#[tokio::test]
async fn upstream_mode_never_reveals_the_key() {
    let settings = config::parse_from(
        [
            "rollgate-proxy",
            "--api-key",
            "rg_server_TOPSECRET",
            "--base-url",
            "http://127.0.0.1:1",
            "--snapshot-file",
            "",
        ],
        3,
    )
    .unwrap()
    .unwrap();
    let shutdown = CancellationToken::new();
    let started = crate::start(settings, shutdown.clone()).unwrap();
    let app = started.app;
    // Let the machine fail a few times against the closed port.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in [
        "/api/health",
        "/api/metrics",
        "/api/flags",
        "/api/flags?user_id=u1",
    ] {
        let (_, headers, body) = call(&app, get(path)).await;
        assert!(!body.contains("TOPSECRET"), "{path}: {body}");
        assert!(
            headers
                .values()
                .all(|v| !v.to_str().unwrap_or("").contains("TOPSECRET"))
        );
    }
    let (_, _, body) = call(&app, get("/api/health")).await;
    assert!(body.contains(r#""source":"upstream""#), "{body}");
    shutdown.cancel();
}

#[tokio::test]
async fn real_socket_local_mode_reload_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flags.json");
    std::fs::write(&path, RULES).unwrap();
    let settings = settings(&[
        "--flags-file",
        path.to_str().unwrap(),
        "--shutdown-timeout",
        "3s",
    ]);
    let listener = crate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::run(listener, settings, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let response = client
        .get(format!("http://{addr}/api/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen.contains(r#""on":true"#) {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // Edit the file: the change is pushed.
    std::fs::write(
        &path,
        RULES.replace(r#""on":{"enabled":true"#, r#""on":{"enabled":false"#),
    )
    .unwrap();
    while !seen.contains(r#""on":false"#) {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let flags = client
        .get(format!("http://{addr}/api/flags/on"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(flags, r#"{"key":"on","enabled":false}"#);

    // Shutdown: the stream ends cleanly and run() returns in bounded time.
    stop.send(()).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the SSE stream must end at shutdown");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn evaluated_mode_per_user_answers_are_cached_coalesced_and_served_stale() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Mock {
        user_requests: AtomicUsize,
        failing: AtomicBool,
    }
    let mock = Arc::new(Mock::default());
    let state = Arc::clone(&mock);
    let upstream = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let state = Arc::clone(&state);
        async move {
            let query = request.uri().query().unwrap_or("").to_owned();
            let auth = request
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(auth.as_deref(), Some("Bearer rg_server_k"));
            if !query.contains("user_id=") {
                return (StatusCode::OK, r#"{"flags":{"a":true}}"#.to_owned());
            }
            state.user_requests.fetch_add(1, Ordering::SeqCst);
            if state.failing.load(Ordering::SeqCst) {
                return (StatusCode::INTERNAL_SERVER_ERROR, String::new());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            (
                StatusCode::OK,
                r#"{"flags":{"a":false,"u":true}}"#.to_owned(),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await.unwrap() });

    let settings = config::parse_from(
        [
            "rollgate-proxy",
            "--api-key",
            "rg_server_k",
            "--base-url",
            &base,
            "--streaming",
            "false",
            "--refresh-interval",
            "300ms",
            "--snapshot-file",
            "",
        ],
        5,
    )
    .unwrap()
    .unwrap();
    let shutdown = CancellationToken::new();
    let app = crate::start(settings, shutdown.clone()).unwrap().app;
    tokio::time::timeout(Duration::from_secs(5), async {
        while app.current().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        call(&app, get("/api/flags"))
            .await
            .2
            .contains(r#""a":true"#)
    );

    // Ten concurrent requests for one user: one upstream request.
    let answers =
        futures_util::future::join_all((0..10).map(|_| call(&app, get("/api/flags?user_id=u1"))))
            .await;
    for (status, _, body) in &answers {
        assert_eq!(*status, 200);
        assert!(body.contains(r#""u":true"#), "{body}");
    }
    assert_eq!(mock.user_requests.load(Ordering::SeqCst), 1);
    // Cached: no new request.
    call(&app, get("/api/v1/sdk/flags?user_id=u1")).await;
    assert_eq!(mock.user_requests.load(Ordering::SeqCst), 1);

    // Expired and upstream failing: the stale entry is served; an unknown user gets 502.
    mock.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, body) = call(&app, get("/api/flags?user_id=u1")).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""u":true"#));
    let (status, _, body) = call(&app, get("/api/flags?user_id=u2")).await;
    assert_eq!(status, 502);
    assert!(body.contains("UPSTREAM_UNAVAILABLE"));
    shutdown.cancel();
}

#[tokio::test]
async fn overload_sheds_data_routes_with_a_jittered_retry_after_but_never_probes() {
    let app = app(&["--max-concurrent-requests", "1"], true);
    // Pretend one request is already being handled: the next data request is over the bound.
    app.in_flight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (status, headers, body) = call(&app, get("/api/flags")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("OVERLOADED"), "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    for probe in ["/live", "/ready", "/api/health", "/api/metrics", "/health"] {
        assert_eq!(call(&app, get(probe)).await.0, StatusCode::OK, "{probe}");
    }
    app.in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(call(&app, get("/api/flags")).await.0, StatusCode::OK);
    assert!(
        call(&app, get("/api/metrics"))
            .await
            .2
            .contains("rollgate_proxy_shed_total 1\n")
    );
}

mod fleet {
    //! Several environments in one process: what is per process, not per environment.

    use std::io::Write;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use rollgate_proxy_core::environments::Environments;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    use super::{RULES, get, settings, snapshot};
    use crate::environments::{Fleet, router};

    /// A base URL nothing listens on: the environments never get data from it.
    const NOWHERE: &str = "http://127.0.0.1:9";

    fn environments(text: &str) -> Environments {
        Environments::from_toml(text, |_| None).unwrap()
    }

    fn table(name: &str, server_key: &str, client_key: &str) -> String {
        format!(
            "[environments.{name}]\nserver_key = \"{server_key}\"\nbase_url = \"{NOWHERE}\"\n\
             client_keys = [\"{client_key}\"]\n"
        )
    }

    fn fleet(args: &[&str], text: &str) -> (Arc<Fleet>, CancellationToken) {
        let mut argv = vec!["--snapshot-file", ""];
        argv.extend_from_slice(args);
        let shutdown = CancellationToken::new();
        let fleet = Fleet::start(settings(&argv), environments(text), shutdown.clone()).unwrap();
        // Data for every environment (their upstream is nowhere).
        for app in &fleet.current().apps {
            app.snapshots.send_replace(Some(snapshot(RULES)));
        }
        (fleet, shutdown)
    }

    async fn call(fleet: &Arc<Fleet>, uri: &str, key: Option<&str>) -> (u16, String) {
        let mut request = get(uri);
        if let Some(key) = key {
            request
                .headers_mut()
                .insert("x-api-key", key.parse().unwrap());
        }
        let response = router(Arc::clone(fleet)).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_overload_bound_is_per_process_not_per_environment() {
        let text =
            table("one", "rg_server_one", "ck-one") + &table("two", "rg_server_two", "ck-two");
        let (fleet, shutdown) = fleet(&["--max-concurrent-requests", "1"], &text);
        assert_eq!(call(&fleet, "/api/flags", Some("ck-two")).await.0, 200);
        // One request in flight in environment `one`: a request to `two` is over the bound.
        let apps = fleet.current().apps.clone();
        apps[0].in_flight.fetch_add(1, Ordering::Relaxed);
        let (status, body) = call(&fleet, "/api/flags", Some("ck-two")).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("OVERLOADED"), "{body}");
        apps[0].in_flight.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(call(&fleet, "/api/flags", Some("ck-two")).await.0, 200);
        // The shed request is counted in the environment it was routed to.
        let metrics = call(&fleet, "/api/metrics", None).await.1;
        assert!(
            metrics.contains("rollgate_proxy_shed_total{environment=\"two\"} 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("rollgate_proxy_shed_total{environment=\"one\"} 0\n"),
            "{metrics}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn requests_refused_before_routing_are_not_counted_under_an_environment() {
        let text =
            table("one", "rg_server_one", "ck-one") + &table("two", "rg_server_two", "ck-two");
        let (fleet, shutdown) = fleet(&[], &text);
        assert_eq!(call(&fleet, "/api/flags", Some("ck-nobody")).await.0, 401);
        assert_eq!(call(&fleet, "/api/flags", None).await.0, 401);
        assert_eq!(
            call(&fleet, "/env/nope/api/flags", Some("ck-one")).await.0,
            404
        );
        assert_eq!(call(&fleet, "/api/health", None).await.0, 200);
        assert_eq!(call(&fleet, "/api/flags", Some("ck-two")).await.0, 200);
        let metrics = call(&fleet, "/api/metrics", None).await.1;
        let requests = |env: &str| -> Vec<&str> {
            let prefix = format!("rollgate_proxy_http_requests_total{{environment=\"{env}\",");
            metrics.lines().filter(|l| l.starts_with(&prefix)).collect()
        };
        assert_eq!(requests("one"), Vec::<&str>::new(), "{metrics}");
        assert_eq!(
            requests("two"),
            [
                "rollgate_proxy_http_requests_total{environment=\"two\",route=\"/api/flags\",status=\"200\"} 1"
            ],
            "{metrics}"
        );
        assert_eq!(
            requests(""),
            [
                "rollgate_proxy_http_requests_total{environment=\"\",route=\"/api/health\",status=\"200\"} 1",
                "rollgate_proxy_http_requests_total{environment=\"\",route=\"unmatched\",status=\"401\"} 2",
                "rollgate_proxy_http_requests_total{environment=\"\",route=\"unmatched\",status=\"404\"} 1",
            ],
            "{metrics}"
        );
        // One HELP and TYPE per family, whoever the samples are from.
        assert_eq!(
            metrics
                .matches("# TYPE rollgate_proxy_http_requests_total counter")
                .count(),
            1
        );
        shutdown.cancel();
    }

    /// Everything logged while it runs, on this thread (a current-thread runtime's tasks too).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn keys_are_never_logged_through_start_requests_and_reloads() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let text = table("one", "rg_server_SECRET1", "ck_SECRET2")
            + &table("two", "rg_server_SECRET3", "ck_SECRET4");
        let (fleet, shutdown) = fleet(&[], &text);
        call(&fleet, "/api/flags", Some("ck_SECRET2")).await;
        call(&fleet, "/api/flags", Some("ck_SECRET5")).await;
        call(&fleet, "/api/flags?token=ck_SECRET4", None).await;
        // A reload: `one`'s server key changed (a restart), `two`'s client key rotated, `three`
        // added; then a file that does not parse, a key on the broken line.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("environments.toml");
        let text = table("one", "rg_server_SECRET6", "ck_SECRET2")
            + &table("two", "rg_server_SECRET3", "ck_SECRET7")
            + &table("three", "rg_server_SECRET8", "ck_SECRET9");
        std::fs::write(&path, text).unwrap();
        fleet.reload(&path).await;
        assert_eq!(fleet.reloads.load(Ordering::Relaxed), 1);
        std::fs::write(
            &path,
            "[environments.one]\nclient_keys = [\"ck_SECRET10\" oops\n",
        )
        .unwrap();
        fleet.reload(&path).await;
        assert_eq!(fleet.reload_errors.load(Ordering::Relaxed), 1);
        // Every environment's upstream failed at least once (and logged why).
        let deadline = Instant::now() + Duration::from_secs(20);
        for app in &fleet.current().apps {
            while app.upstream().unwrap().status().last_error.is_none() {
                assert!(Instant::now() < deadline, "no upstream attempt");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        shutdown.cancel();
        for task in fleet.take_tasks() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("environments reloaded"), "{logs}");
        assert!(logs.contains("environments not reloaded"), "{logs}");
        assert!(!logs.contains("SECRET"), "a key was logged:\n{logs}");
    }
}
