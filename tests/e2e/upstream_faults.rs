//! Upstream misbehaving: Retry-After, oversize bodies, redirects, invalid UTF-8 and bad keys
//! on the stream, a rejected server key, and one revision per streamed change.

use std::time::Duration;

use rollgate_proxy_tests::mock::{DropKind, Fault, MockConfig, MockUpstream, Route, StreamMode};
use rollgate_proxy_tests::target::{ProxyConfig, ProxyHandle, TargetKind};
use serde_json::{Value, json};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(retry_after_on_flags_is_honoured),
        scenario!(retry_after_on_the_stream_is_honoured),
        scenario!(retry_after_on_a_per_user_fetch_holds_the_next_ones),
        scenario!(an_oversize_flags_body_is_refused_without_reading_it_all),
        scenario!(redirects_are_not_followed),
        scenario!(invalid_utf8_and_bad_keys_on_the_stream_change_nothing),
        scenario!(a_rejected_key_is_reported_plainly),
        scenario!(one_streamed_change_is_one_revision),
    ]
}

/// A Retry-After long enough that a busy machine cannot blur it, short enough for the limit.
const RETRY_AFTER_SECS: u64 = 20;
/// How long a scenario watches for requests that should not come (well inside the hold).
const QUIET_WINDOW: Duration = Duration::from_secs(8);

/// The window to watch, starting now, for a hold that began no earlier than `armed` (when the
/// fault was set: the proxy meets it after that): [`QUIET_WINDOW`], cut so that it ends a second
/// before the earliest moment the hold can end. On a machine slow enough to take most of the
/// hold to see the fault, a full window would run past the hold and count the proxy's
/// legitimate next request.
fn quiet_window(armed: std::time::Instant) -> Duration {
    let hold_ends = armed + Duration::from_secs(RETRY_AFTER_SECS - 1);
    let left = hold_ends.saturating_duration_since(std::time::Instant::now());
    assert!(
        left >= Duration::from_secs(2),
        "the fault took {:?} to be seen: too little of the hold is left to watch",
        armed.elapsed()
    );
    left.min(QUIET_WINDOW)
}

async fn health(proxy: &ProxyHandle) -> Value {
    must_get(&proxy.url("/api/health")).await.json()
}

/// Waits until `/api/health`'s `upstream.lastError` contains `needle`; returns it.
async fn wait_last_error(proxy: &ProxyHandle, needle: &str) -> String {
    let url = proxy.url("/api/health");
    eventually(
        &format!("upstream.lastError containing {needle:?}"),
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let h = get(&url).await.ok()?.json();
                let error = h["upstream"]["lastError"].as_str()?.to_owned();
                error.contains(needle).then_some(error)
            }
        },
    )
    .await
}

/// The proxy in poll-only mode (every request to upstream is a `/flags` fetch).
fn polling(mock: &MockUpstream) -> ProxyConfig {
    ProxyConfig {
        streaming: Some(false),
        refresh_interval: Some(Duration::from_millis(500)),
        ..proxy_config(mock)
    }
}

/// Counts `route` requests the mock receives during `window`, starting now.
async fn requests_during(mock: &MockUpstream, route: Route, window: Duration) -> usize {
    let before = mock.requests_for(route).len();
    tokio::time::sleep(window).await;
    mock.requests_for(route).len() - before
}

async fn retry_after_on_flags_is_honoured() {
    let mock = mock(MockConfig::basic()).await;
    let proxy = start_proxy(polling(&mock)).await;
    wait_ready(&proxy).await;
    let armed = std::time::Instant::now();
    mock.fail(
        Route::Flags,
        Fault::status(429).retry_after(RETRY_AFTER_SECS.to_string()),
    );
    mock.wait_until(Duration::from_secs(10), |s| s.faults_served >= 1)
        .await
        .expect("the proxy polls into the 429");
    let error = wait_last_error(&proxy, "Retry-After").await;
    assert!(error.contains("429"), "{error}");
    // Without Retry-After this is four requests in 0.7 s (three retries), then a poll every
    // 500 ms; with it, silence.
    let more = requests_during(&mock, Route::Flags, quiet_window(armed)).await;
    assert_eq!(more, 0, "requests during the Retry-After: {more}");
    assert_eq!(mock.stats().faults_served, 1);
    // After the hold, the proxy asks again and recovers.
    mock.clear_faults();
    mock.wait_until(Duration::from_secs(RETRY_AFTER_SECS + 20), |s| {
        s.flags_requests >= 2 + s.faults_served
    })
    .await
    .expect("polling resumes after the Retry-After");
    let url = proxy.url("/api/health");
    eventually("the error cleared", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let h = get(&url).await.ok()?.json();
            h["upstream"]["lastError"].is_null().then_some(())
        }
    })
    .await;
}

async fn retry_after_on_the_stream_is_honoured() {
    let env = Env::basic().await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .unwrap();
    let armed = std::time::Instant::now();
    env.mock.fail(
        Route::Stream,
        Fault::status(503).retry_after(RETRY_AFTER_SECS.to_string()),
    );
    env.mock.drop_streams(DropKind::Clean);
    env.mock
        .wait_until(Duration::from_secs(15), |s| s.faults_served >= 1)
        .await
        .expect("the proxy reconnects into the 503");
    let error = wait_last_error(&env.proxy, "Retry-After").await;
    assert!(error.contains("503"), "{error}");
    // Neither the stream (backoff 1 s, 2 s, ...) nor the polls that stand in for it (every 2 s)
    // go upstream while the hold lasts.
    let before = env.mock.stats();
    tokio::time::sleep(quiet_window(armed)).await;
    let after = env.mock.stats();
    assert_eq!(
        (after.stream_requests, after.flags_requests),
        (before.stream_requests, before.flags_requests),
        "requests during the Retry-After"
    );
    env.mock.clear_faults();
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(RETRY_AFTER_SECS + 20))
        .await
        .expect("the stream is back after the Retry-After");
}

async fn retry_after_on_a_per_user_fetch_holds_the_next_ones() {
    // Evaluated mode: each new user id costs one upstream fetch.
    let env = Env::basic().await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .unwrap();
    env.mock.fail(
        Route::Flags,
        Fault::status(429)
            .retry_after(RETRY_AFTER_SECS.to_string())
            .times(1),
    );
    // Without upstream, a user's evaluated flags are not available (documented 502).
    let first = must_get(&env.url("/api/flags?user_id=throttled-0")).await;
    assert_eq!(first.status, 502, "{}", first.text());
    env.mock
        .wait_until(Duration::from_secs(10), |s| s.faults_served >= 1)
        .await
        .expect("the per-user fetch met the 429");
    let before = env.mock.requests_for(Route::Flags).len();
    for i in 1..=5 {
        let resp = must_get(&env.url(&format!("/api/flags?user_id=throttled-{i}"))).await;
        assert_eq!(resp.status, 502, "{}", resp.text());
    }
    let after = env.mock.requests_for(Route::Flags).len();
    assert_eq!(
        after - before,
        0,
        "per-user fetches went upstream during the Retry-After"
    );
}

async fn an_oversize_flags_body_is_refused_without_reading_it_all() {
    const HUGE: u64 = 256 * 1024 * 1024;
    let mock = mock(MockConfig::basic()).await;
    mock.fail(Route::Flags, Fault::status(200).body_of_len(HUGE));
    let proxy = start_proxy(polling(&mock)).await;
    let error = wait_last_error(&proxy, "larger than").await;
    assert!(error.contains("16777216"), "the default limit: {error}");
    assert_eq!(
        must_get(&proxy.url("/ready")).await.status,
        503,
        "no data yet"
    );
    if let Some(pid) = proxy.pid() {
        // The process never held the body: its peak RSS stays far below it.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let peak_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        assert!(
            peak_kib > 0 && peak_kib < 128 * 1024,
            "peak RSS {peak_kib} KiB while refusing a {HUGE}-byte body"
        );
    }
    mock.clear_faults();
    wait_ready(&proxy).await;
    let flags = served_flags(&proxy, "").await;
    assert_eq!(flags["enabled-flag"], true, "{flags}");
}

async fn redirects_are_not_followed() {
    // The redirect points at a second Rollgate that would answer (same key): following it
    // would make the proxy ready with its data and hand it the key.
    let elsewhere = mock(MockConfig::basic()).await;
    elsewhere.set_flag("from-elsewhere", true);
    let mock = mock(MockConfig::basic()).await;
    mock.fail(
        Route::Flags,
        Fault::status(302).location(format!("{}/api/v1/sdk/flags", elsewhere.base_url())),
    );
    let proxy = start_proxy(polling(&mock)).await;
    let error = wait_last_error(&proxy, "redirect").await;
    assert!(error.contains("302"), "{error}");
    assert_eq!(
        elsewhere.stats().flags_requests,
        0,
        "the redirect was followed"
    );
    assert_eq!(must_get(&proxy.url("/ready")).await.status, 503);
    mock.clear_faults();
    wait_ready(&proxy).await;
    let flags = served_flags(&proxy, "").await;
    assert!(flags.get("from-elsewhere").is_none(), "{flags}");
    assert_eq!(elsewhere.stats().flags_requests, 0);
}

async fn invalid_utf8_and_bad_keys_on_the_stream_change_nothing() {
    let env = Env::basic().await;
    // The stream's own init taken in first, so the counters below start clean.
    wait_first_stream_event(&env).await;
    let before = must_get(&env.url("/api/flags")).await;
    let etag = before.header("etag").unwrap().to_owned();
    let malformed = metric_sum(&env.proxy, "rollgate_proxy_upstream_malformed_total", "")
        .await
        .unwrap_or(0.0);
    let bad: [&[u8]; 4] = [
        b"event: init\ndata: {\"flags\":{\"\xff\xfe-bad\":true}}\n\n",
        b"event: flags\ndata: {\"flags\":{\"\\ufffd\\ufffd-bad\":true}}\n\n",
        b"event: init\ndata: {\"flags\":{\"a\\r\\nb\":true,\"enabled-flag\":true}}\n\n",
        b"event: flag-update\ndata: {\"key\":\"x y\",\"enabled\":true}\n\n",
    ];
    for frame in bad {
        env.mock.send_raw(frame.to_vec());
    }
    wait_metric_at_least(
        &env.proxy,
        "rollgate_proxy_upstream_malformed_total",
        "",
        malformed + 4.0,
        Duration::from_secs(10),
    )
    .await;
    let now = must_get(&env.url("/api/flags")).await;
    assert_eq!(now.header("etag"), Some(etag.as_str()), "{}", now.text());
    assert_eq!(now.json()["flags"], before.json()["flags"]);
    env.mock.set_flag("after-bad-bytes", true);
    wait_served(&env.proxy, "after-bad-bytes", true, Duration::from_secs(10)).await;
}

async fn a_rejected_key_is_reported_plainly() {
    let env = Env::basic().await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .unwrap();
    env.mock.set_api_key("a-rotated-key");
    env.mock.drop_streams(DropKind::Clean);
    let error = wait_last_error(&env.proxy, "rejected the server API key").await;
    assert!(error.contains("401"), "{error}");
    assert!(!error.contains(SERVER_KEY), "{error}");
    if target() == TargetKind::Native {
        wait_metric_at_least(
            &env.proxy,
            "rollgate_proxy_upstream_key_rejected",
            "",
            1.0,
            Duration::from_secs(10),
        )
        .await;
        assert!(
            env.proxy
                .wait_log("rejected the server API key", Duration::from_secs(10))
                .await,
            "the log says it plainly: {}",
            env.proxy.logs()
        );
    }
    // The last good flags are still served.
    assert_eq!(served_flags(&env.proxy, "").await["enabled-flag"], true);
    // The key works again: the slow probe (every refresh interval, 2 s here) finds out.
    env.mock.set_api_key(SERVER_KEY);
    let url = env.url("/api/health");
    eventually("the key accepted again", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let h = get(&url).await.ok()?.json();
            h["upstream"]["lastError"].is_null().then_some(())
        }
    })
    .await;
    if target() == TargetKind::Native {
        let v = metric_sum(&env.proxy, "rollgate_proxy_upstream_key_rejected", "").await;
        assert_eq!(v, Some(0.0));
    }
}

async fn one_streamed_change_is_one_revision() {
    // The stream pushes whole snapshots (values only); each change must be one revision and
    // one frame per client, with its reasons, not a values-only revision and then another.
    let env = Env::with(MockConfig::basic().stream_mode(StreamMode::Init), |_| {}).await;
    wait_first_stream_event(&env).await;
    let mut client = sse(&env.url("/api/stream")).await;
    next_event(&mut client, Duration::from_secs(10)).await;
    let first = health(&env.proxy).await["revision"].as_u64().unwrap();
    const CHANGES: u64 = 6;
    for i in 0..CHANGES {
        let key = format!("change-{i}");
        env.mock
            .set_flag_with_reason(key.as_str(), true, Some(json!({"kind":"TARGET_MATCH"})));
        wait_served(&env.proxy, &key, true, Duration::from_secs(10)).await;
    }
    let last_key = format!("change-{}", CHANGES - 1);
    let mut frames = 0;
    loop {
        let ev = next_event(&mut client, Duration::from_secs(10)).await;
        frames += 1;
        if ev.json().is_ok_and(|v| v[&last_key] == true) {
            break;
        }
        assert!(frames <= 2 * CHANGES, "too many frames");
    }
    // Let a second, reasons-only revision of the last change (the bug) show up if it exists:
    // the proxy has answered the refetch once /api/v1/sdk/flags has the last change's reason.
    let url = env.url("/api/v1/sdk/flags?withReasons=true");
    let last = last_key.clone();
    eventually("the last change's reason", Duration::from_secs(10), || {
        let url = url.clone();
        let last = last.clone();
        async move {
            let body = get(&url).await.ok()?.json();
            body["reasons"][last.as_str()].is_object().then_some(())
        }
    })
    .await;
    let revision = health(&env.proxy).await["revision"].as_u64().unwrap();
    assert_eq!(revision - first, CHANGES, "revisions for {CHANGES} changes");
    assert_eq!(frames, CHANGES, "frames for {CHANGES} changes");
}

/// Waits until the proxy's upstream stream is open and its first event has been taken in.
async fn wait_first_stream_event(env: &Env) {
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .unwrap();
    wait_metric_at_least(
        &env.proxy,
        "rollgate_proxy_upstream_events_total",
        "",
        1.0,
        Duration::from_secs(10),
    )
    .await;
}
