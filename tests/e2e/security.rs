//! The server key never leaks; client keys; CORS; hostile or malformed input.

use std::time::Duration;

use rollgate_proxy_tests::mock::{Fault, MockConfig, Route};
use serde_json::{Value, json};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(disallowed_origin_gets_no_cors_headers),
        scenario!(server_key_never_leaks),
        scenario!(client_keys_guard_data_routes),
        scenario!(ofrep_event_stream_url_carries_the_callers_key),
        scenario!(cors_allow_list),
        scenario!(bad_input_is_refused_with_json),
    ]
}

fn assert_no_key(what: &str, resp: &Resp) {
    let text = resp.text();
    assert!(
        !text.contains(SERVER_KEY),
        "server key in the body of {what}"
    );
    for (name, value) in &resp.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains(SERVER_KEY),
            "server key in header {name} of {what}"
        );
    }
}

async fn server_key_never_leaks() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.log_level = Some("debug".into());
        c.refresh_interval = Some(Duration::from_millis(200));
        c.breaker_open_timeout = Some(Duration::from_millis(500));
        c.breaker_threshold = Some(2);
    })
    .await;
    let gets = [
        "/api/flags",
        "/api/flags?user_id=u-1",
        "/api/flags/enabled-flag",
        "/api/flags/bad%20key",
        "/api/v1/sdk/flags?withReasons=true",
        "/api/v1/sdk/flags?user_id=u-2",
        "/api/health",
        "/api/metrics",
        "/health",
        "/live",
        "/ready",
        "/",
        "/rollgate-proxy-client.js",
        "/nope",
        "/api/v1/sdk/identify",
    ];
    let posts: [(&str, &str); 7] = [
        ("/api/flags", r#"{"user":{"id":"u-3"}}"#),
        ("/api/flags", "{"),
        ("/api/v1/sdk/identify", r#"{"user":{"id":"u-4"}}"#),
        ("/api/v1/sdk/events", r#"{"events":[]}"#),
        ("/api/v1/sdk/telemetry", r#"{"evaluations":{}}"#),
        (
            "/ofrep/v1/evaluate/flags",
            r#"{"context":{"targetingKey":"u-5"}}"#,
        ),
        ("/ofrep/v1/evaluate/flags/enabled-flag", "{}"),
    ];
    let sweep = |label: &'static str| {
        let env = &env;
        async move {
            for path in gets {
                let resp = must_get(&env.url(path)).await;
                assert_no_key(&format!("{label} GET {path}"), &resp);
            }
            for (path, body) in posts {
                let resp = must_post(&env.url(path), body).await;
                assert_no_key(&format!("{label} POST {path}"), &resp);
            }
            for path in ["/api/stream", "/api/v1/sdk/stream", "/ofrep/v1/sse"] {
                let mut client = sse(&env.url(path)).await;
                let _ = collect_for(&mut client, Duration::from_millis(200)).await;
                let raw = String::from_utf8_lossy(client.raw()).into_owned();
                assert!(!raw.contains(SERVER_KEY), "{label} key in {path} stream");
                for (name, value) in client.headers() {
                    let value = String::from_utf8_lossy(value.as_bytes());
                    assert!(!value.contains(SERVER_KEY), "{label} key in {path} {name}");
                }
            }
        }
    };
    sweep("healthy").await;

    // Make upstream fail in every way that produces error text (status, refused connection,
    // auth failure), so the key would surface in lastError, logs or metrics if it could.
    env.mock
        .fail(Route::Flags, Fault::status(500).body("upstream exploded"));
    env.mock
        .drop_streams(rollgate_proxy_tests::mock::DropKind::Abort);
    let health = env.url("/api/health");
    eventually(
        "the proxy noticed the broken stream",
        Duration::from_secs(10),
        || async {
            let h = get(&health).await.ok()?.json();
            h["upstream"]["lastError"].is_string().then_some(())
        },
    )
    .await;
    env.mock.clear_faults();
    env.mock.set_api_key("a-different-key");
    env.mock
        .drop_streams(rollgate_proxy_tests::mock::DropKind::Abort);
    env.mock
        .wait_until(Duration::from_secs(10), |s| s.auth_failures >= 1)
        .await
        .expect("the proxy met the 401");
    env.mock.stop().await;
    let url = env.url("/api/health");
    eventually(
        "an upstream error is reported",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                let h = get(&url).await.ok()?.json();
                h["upstream"]["lastError"].is_string().then_some(())
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sweep("failing").await;

    let logs = env.proxy.logs();
    assert!(
        !logs.is_empty() || !target().is_process(),
        "logs were captured"
    );
    if let Some(line) = logs.lines().find(|l| l.contains(SERVER_KEY)) {
        panic!("server key in the proxy's logs: {line}");
    }
    let metrics = must_get(&env.url("/api/metrics")).await.text();
    assert!(!metrics.contains(SERVER_KEY), "server key in metrics");
}

const KEY_A: &str = "ck_e2e_alpha";
const KEY_B: &str = "ck_e2e_beta";

async fn client_keys_guard_data_routes() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.client_keys = vec![KEY_A.into(), KEY_B.into()];
    })
    .await;
    let data_gets = [
        "/api/flags",
        "/api/flags/enabled-flag",
        "/api/v1/sdk/flags",
        "/api/stream",
        "/api/v1/sdk/stream",
        "/ofrep/v1/sse",
    ];
    let data_posts = [
        ("/api/flags", "{}"),
        ("/api/v1/sdk/identify", r#"{"user":{"id":"x"}}"#),
        ("/api/v1/sdk/events", r#"{"events":[]}"#),
        ("/api/v1/sdk/telemetry", r#"{"evaluations":{}}"#),
        ("/ofrep/v1/evaluate/flags", "{}"),
        ("/ofrep/v1/evaluate/flags/enabled-flag", "{}"),
    ];
    for path in data_gets {
        must_get(&env.url(path))
            .await
            .expect_error(401, "UNAUTHORIZED");
        send(http().get(env.url(path)).bearer_auth("ck_wrong"))
            .await
            .unwrap()
            .expect_error(401, "UNAUTHORIZED");
        let sep = if path.contains('?') { '&' } else { '?' };
        send(http().get(env.url(&format!("{path}{sep}token=ck_wrong"))))
            .await
            .unwrap()
            .expect_error(401, "UNAUTHORIZED");
    }
    for (path, body) in data_posts {
        must_post(&env.url(path), body)
            .await
            .expect_error(401, "UNAUTHORIZED");
    }
    // Bearer, ?token= and X-API-Key each unlock.
    for path in ["/api/flags", "/api/flags/enabled-flag", "/api/v1/sdk/flags"] {
        let ok = send(http().get(env.url(path)).bearer_auth(KEY_A))
            .await
            .unwrap();
        assert_eq!(ok.status, 200, "{path} with Bearer: {}", ok.text());
        let ok = must_get(&env.url(&format!("{path}?token={KEY_B}"))).await;
        assert_eq!(ok.status, 200, "{path} with ?token=: {}", ok.text());
    }
    for (path, body) in data_posts {
        let ok = send(
            http()
                .post(env.url(path))
                .header("content-type", "application/json")
                .bearer_auth(KEY_B)
                .body(body),
        )
        .await
        .unwrap();
        assert_eq!(ok.status, 200, "{path} with Bearer: {}", ok.text());
    }
    let ofrep = send(
        http()
            .post(env.url("/ofrep/v1/evaluate/flags"))
            .header("x-api-key", KEY_A)
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await
    .unwrap();
    assert_eq!(ofrep.status, 200, "OFREP with X-API-Key: {}", ofrep.text());
    for path in ["/api/stream", "/ofrep/v1/sse", "/api/v1/sdk/stream"] {
        let mut c = sse(&env.url(&format!("{path}?token={KEY_A}"))).await;
        let _ = collect_for(&mut c, Duration::from_millis(100)).await;
        let _ = sse_req(http().get(env.url(path)).bearer_auth(KEY_B)).await;
    }
    // Open routes.
    for path in [
        "/api/health",
        "/api/metrics",
        "/health",
        "/live",
        "/ready",
        "/",
    ] {
        let resp = must_get(&env.url(path)).await;
        assert_eq!(resp.status, 200, "{path} needs no key: {}", resp.text());
    }
    // The error does not echo what was offered.
    let resp = send(
        http()
            .get(env.url("/api/flags"))
            .bearer_auth("ck_guess_123"),
    )
    .await
    .unwrap();
    assert!(!resp.text().contains("ck_guess_123"));
    assert!(!resp.text().contains(KEY_A));
}

/// OFREP web providers open the advertised `eventStreams` URL with an `EventSource`, which
/// cannot send headers: with client keys the URL carries the caller's own key, and works.
async fn ofrep_event_stream_url_carries_the_callers_key() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.client_keys = vec![KEY_A.into(), KEY_B.into()];
    })
    .await;
    for (key, header) in [(KEY_A, "x-api-key"), (KEY_B, "authorization")] {
        let value = if header == "authorization" {
            format!("Bearer {key}")
        } else {
            key.to_owned()
        };
        let bulk = send(
            http()
                .post(env.url("/ofrep/v1/evaluate/flags"))
                .header(header, value)
                .body(r#"{"context":{"targetingKey":"u1"}}"#),
        )
        .await
        .unwrap()
        .expect_json(200);
        let uri = bulk["eventStreams"][0]["endpoint"]["requestUri"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(uri, format!("/ofrep/v1/sse?token={key}"), "{bulk}");
        let mut stream = sse(&env.url(&uri)).await;
        let event = next_event(&mut stream, Duration::from_secs(5)).await;
        assert!(event.data.contains("refetchEvaluation"), "{}", event.data);
    }
}

async fn cors_allow_list() {
    let allowed = "https://app.example.com";
    let env = Env::with(MockConfig::basic(), |c| {
        c.cors_origins = Some(format!("{allowed},http://localhost:5173"));
        c.client_keys = vec![KEY_A.into()];
    })
    .await;
    for path in [
        "/api/flags",
        "/api/v1/sdk/flags",
        "/ofrep/v1/evaluate/flags",
    ] {
        let method = if path.starts_with("/ofrep") {
            "POST"
        } else {
            "GET"
        };
        let pre = send(
            http()
                .request(reqwest::Method::OPTIONS, env.url(path))
                .header("origin", allowed)
                .header("access-control-request-method", method)
                .header(
                    "access-control-request-headers",
                    "authorization,content-type,if-none-match",
                ),
        )
        .await
        .unwrap();
        assert!(
            pre.status == 200 || pre.status == 204,
            "preflight {path} without a key: {} {}",
            pre.status,
            pre.text()
        );
        assert_eq!(
            pre.header("access-control-allow-origin"),
            Some(allowed),
            "{path}"
        );
        let methods = pre
            .header("access-control-allow-methods")
            .unwrap_or_default()
            .to_ascii_uppercase();
        assert!(methods.contains(method), "allow-methods {methods:?}");
        let headers = pre
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        for h in ["authorization", "content-type", "if-none-match"] {
            assert!(
                headers.contains(h) || headers == "*",
                "allow-headers {headers:?} lacks {h}"
            );
        }
    }
    let actual = send(
        http()
            .get(env.url("/api/flags"))
            .header("origin", allowed)
            .bearer_auth(KEY_A),
    )
    .await
    .unwrap();
    assert_eq!(actual.status, 200);
    assert_eq!(actual.header("access-control-allow-origin"), Some(allowed));
    let expose = actual
        .header("access-control-expose-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(expose.contains("etag"), "expose-headers {expose:?}");

    // Another origin is never allowed (the browser then refuses to share the answer).
    assert_origin_refused(&env, Some(KEY_A)).await;
}

async fn disallowed_origin_gets_no_cors_headers() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.cors_origins = Some("https://app.example.com".into());
    })
    .await;
    assert_origin_refused(&env, None).await;
}

/// A preflight and a request from an origin not on the list get no CORS headers at all.
async fn assert_origin_refused(env: &Env, key: Option<&str>) {
    let evil = "https://evil.example";
    let pre = send(
        http()
            .request(reqwest::Method::OPTIONS, env.url("/api/flags"))
            .header("origin", evil)
            .header("access-control-request-method", "GET"),
    )
    .await
    .unwrap();
    assert_eq!(
        pre.header("access-control-allow-origin"),
        None,
        "preflight from {evil}"
    );
    let mut request = http().get(env.url("/api/flags")).header("origin", evil);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let actual = send(request).await.unwrap();
    assert_eq!(actual.header("access-control-allow-origin"), None);
    assert_eq!(actual.header("access-control-expose-headers"), None);
}

async fn bad_input_is_refused_with_json() {
    let env = Env::with(MockConfig::basic(), |c| c.body_limit = Some(4096)).await;
    let flags = env.url("/api/flags");

    let big = format!(
        r#"{{"user":{{"id":"u","attributes":{{"blob":"{}"}}}}}}"#,
        "x".repeat(8192)
    );
    must_post(&flags, big.clone())
        .await
        .expect_error(413, "PAYLOAD_TOO_LARGE");
    must_post(&env.url("/api/v1/sdk/events"), big)
        .await
        .expect_error(413, "PAYLOAD_TOO_LARGE");

    let attrs: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("a{i}"), json!(i))).collect();
    let too_many = json!({"user":{"id":"u","attributes":attrs}}).to_string();
    must_post(&flags, too_many)
        .await
        .expect_error(400, "INVALID_CONTEXT");
    let query: String = (0..65).map(|i| format!("&attr.a{i}=x")).collect();
    must_get(&env.url(&format!("/api/flags?user_id=u{query}")))
        .await
        .expect_error(400, "INVALID_CONTEXT");
    let long_value = format!("/api/flags?user_id={}", "v".repeat(1025));
    must_get(&env.url(&long_value))
        .await
        .expect_error(400, "INVALID_CONTEXT");

    for body in ["{", "[1,2]", r#"{"user":"me"}"#, r#"{"user":{"id":5}}"#] {
        let resp = must_post(&flags, body).await;
        assert_eq!(resp.status, 400, "{body}: {}", resp.text());
        assert!(resp.json()["error"]["code"].is_string(), "{body}");
    }
    must_post(&env.url("/api/v1/sdk/identify"), "nope")
        .await
        .expect_error(400, "INVALID_CONTEXT");

    for path in ["/nope", "/api/flagz", "/api/v2/sdk/flags", "/API/FLAGS"] {
        must_get(&env.url(path))
            .await
            .expect_error(404, "NOT_FOUND");
    }
    for (method, path) in [
        (reqwest::Method::DELETE, "/api/flags"),
        (reqwest::Method::PUT, "/api/stream"),
        (reqwest::Method::POST, "/api/flags/enabled-flag"),
        (reqwest::Method::GET, "/api/v1/sdk/events"),
        (reqwest::Method::POST, "/api/health"),
    ] {
        send(http().request(method.clone(), env.url(path)))
            .await
            .unwrap()
            .expect_error(405, "METHOD_NOT_ALLOWED");
    }
    // Still serving normally afterwards.
    assert_eq!(served_flags(&env.proxy, "").await["enabled-flag"], true);
}
