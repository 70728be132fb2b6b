//! Upstream failures: outages, 500s, breaker open/close, poll fallback, garbage on the
//! stream, restart from the persisted snapshot, readiness before any data.

use std::time::{Duration, Instant};

use rollgate_proxy_tests::mock::{DropKind, Fault, MockConfig, Route};
use rollgate_proxy_tests::target::{TargetKind, TempDir};
use serde_json::Value;

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(outage_serves_last_flags_and_breaker_cycles),
        scenario!(upstream_500s_keep_serving),
        scenario!(poll_fallback_when_the_stream_fails),
        scenario!(garbage_on_the_stream_changes_nothing),
        scenario!(restart_while_upstream_down_serves_persisted_snapshot),
        scenario!(not_ready_before_any_data),
    ]
}

/// Fast breaker settings: 2 failures open it, 1 s open, 1 success closes it.
fn fast_breaker(c: &mut rollgate_proxy_tests::target::ProxyConfig) {
    c.refresh_interval = Some(Duration::from_millis(300));
    c.breaker_threshold = Some(2);
    c.breaker_window = Some(Duration::from_secs(30));
    c.breaker_open_timeout = Some(Duration::from_secs(1));
    c.breaker_success_threshold = Some(1);
}

async fn health(env: &Env) -> Value {
    must_get(&env.url("/api/health")).await.expect_json(200)
}

async fn wait_health(env: &Env, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) {
    let url = env.url("/api/health");
    let pred = &pred;
    eventually(what, timeout, || {
        let url = url.clone();
        async move {
            let h = get(&url).await.ok()?.json();
            pred(&h).then_some(())
        }
    })
    .await;
}

async fn outage_serves_last_flags_and_breaker_cycles() {
    let env = Env::with(MockConfig::basic(), fast_breaker).await;
    let before = must_get(&env.url("/api/flags")).await;
    let flags = before.expect_json(200)["flags"].clone();
    let etag = before.header("etag").unwrap().to_owned();

    env.mock.stop().await;
    wait_health(
        &env,
        "circuit open while upstream is down",
        Duration::from_secs(20),
        |h| h["circuit"] == "open",
    )
    .await;
    let h = health(&env).await;
    assert_eq!(h["status"], "degraded", "{h}");
    // Still serving the last flags, same ETag, and still ready.
    let during = must_get(&env.url("/api/flags")).await;
    assert_eq!(during.expect_json(200)["flags"], flags);
    assert_eq!(during.header("etag"), Some(etag.as_str()));
    assert_eq!(must_get(&env.url("/ready")).await.status, 200);
    assert_eq!(
        must_get(&env.url("/api/v1/sdk/flags"))
            .await
            .expect_json(200)["flags"],
        flags
    );

    // Upstream comes back with a change: the breaker closes and the change arrives.
    env.mock.set_flag("after-outage", true);
    env.mock.start().await.expect("mock restarts");
    wait_health(
        &env,
        "circuit closed after recovery",
        Duration::from_secs(20),
        |h| h["circuit"] == "closed" && h["status"] == "healthy",
    )
    .await;
    wait_served(&env.proxy, "after-outage", true, Duration::from_secs(10)).await;
}

async fn upstream_500s_keep_serving() {
    let env = Env::with(MockConfig::basic(), fast_breaker).await;
    let flags = served_flags(&env.proxy, "").await;
    env.mock.fail(Route::Flags, Fault::status(500));
    env.mock.fail(Route::Stream, Fault::status(500));
    env.mock.drop_streams(DropKind::Abort);
    wait_health(&env, "circuit open on 500s", Duration::from_secs(20), |h| {
        h["circuit"] == "open"
    })
    .await;
    assert_eq!(served_flags(&env.proxy, "").await, flags);
    let h = health(&env).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["upstream"]["lastError"].is_string(),
        "lastError reported: {h}"
    );
    env.mock.clear_faults();
    wait_health(
        &env,
        "circuit closed once 500s stop",
        Duration::from_secs(20),
        |h| h["circuit"] == "closed",
    )
    .await;
}

async fn poll_fallback_when_the_stream_fails() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.refresh_interval = Some(Duration::from_millis(300));
        // Stream failures alone must not stop the polls.
        c.breaker_threshold = Some(1000);
    })
    .await;
    env.mock.fail(Route::Stream, Fault::status(503));
    env.mock.drop_streams(DropKind::Abort);
    env.mock
        .wait_for_open_streams(0, Duration::from_secs(5))
        .await
        .unwrap();
    let polls_before = env.mock.stats().flags_requests;
    env.mock.set_flag("polled", true);
    wait_served(&env.proxy, "polled", true, Duration::from_secs(5)).await;
    assert!(
        env.mock.stats().flags_requests > polls_before,
        "the change came by polling /flags"
    );
    assert_eq!(env.mock.open_streams(), 0);
    // Polls are conditional.
    let last = env.mock.last_request(Route::Flags).unwrap();
    assert!(last.header("if-none-match").is_some(), "{last:?}");
}

async fn garbage_on_the_stream_changes_nothing() {
    let env = Env::basic().await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(5))
        .await
        .unwrap();
    let before = must_get(&env.url("/api/flags")).await;
    let etag = before.header("etag").unwrap().to_owned();
    let flags = before.json()["flags"].clone();

    let garbage: [&[u8]; 6] = [
        b"event: init\ndata: {not json\n\n",
        b"event: flags\ndata: [1,2,3]\n\n",
        b"event: init\ndata: {\"flags\":{\"enabled-flag\":\"yes\"}}\n\n",
        b"event: flag-update\ndata: {\"key\":\"\",\"enabled\":7}\n\n",
        b"\x00\xff\xfe binary \x01\n\n",
        b"data: {\"flags\":{\"x\":true}}\n\n",
    ];
    for g in garbage {
        env.mock.send_raw(g.to_vec());
    }
    // Give the proxy time to (wrongly) act on it, checking all the while.
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline {
        let now = must_get(&env.url("/api/flags")).await;
        assert_eq!(now.status, 200);
        assert_eq!(now.header("etag"), Some(etag.as_str()), "{}", now.text());
        assert_eq!(now.json()["flags"], flags);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A good change still gets through afterwards (over this or a reopened stream).
    env.mock.set_flag("after-garbage", true);
    wait_served(&env.proxy, "after-garbage", true, Duration::from_secs(5)).await;
}

/// Native: the snapshot file and a process restart. Edge: the relay object's storage and a
/// `wrangler dev` restart on the same persisted state (the object restarts and reloads it).
async fn restart_while_upstream_down_serves_persisted_snapshot() {
    let edge = target() == TargetKind::Edge;
    let dir = TempDir::new("snapshot").unwrap();
    let file = dir.join("snapshot.json");
    let file2 = file.clone();
    let mut env = Env::with(MockConfig::basic(), move |c| {
        c.snapshot_file = Some(file2);
    })
    .await;
    env.mock.set_flag("persisted-flag", true);
    wait_served(&env.proxy, "persisted-flag", true, Duration::from_secs(3)).await;
    let served = served_flags(&env.proxy, "").await;
    // The served snapshot written: both targets say so in `/api/metrics` (the Relay's storage
    // cannot be read from outside; the native file is checked as well, below).
    let revision = metric_sum(&env.proxy, "rollgate_proxy_snapshot_revision", "")
        .await
        .expect("the served revision in /api/metrics");
    assert!(revision >= 1.0, "served revision {revision}");
    wait_metric_at_least(
        &env.proxy,
        "rollgate_proxy_snapshot_persisted_revision",
        "",
        revision,
        Duration::from_secs(10),
    )
    .await;
    if !edge {
        eventually(
            "the snapshot file has the change",
            Duration::from_secs(5),
            || {
                let file = file.clone();
                async move {
                    let text = std::fs::read_to_string(&file).ok()?;
                    text.contains("persisted-flag").then_some(())
                }
            },
        )
        .await;
    }

    env.mock.stop().await;
    env.proxy.restart().await.expect("restart");
    // At once: the very first requests after the process listens.
    let ready = must_get(&env.url("/ready")).await;
    assert_eq!(ready.status, 200, "ready from disk: {}", ready.text());
    assert_eq!(served_flags(&env.proxy, "").await, served);
    // What storage held at start counts as persisted, before any write.
    let persisted = metric_sum(&env.proxy, "rollgate_proxy_snapshot_persisted_revision", "").await;
    assert!(
        persisted.is_some_and(|p| p >= revision),
        "persisted revision after the restart {persisted:?}, served before it {revision}"
    );
    let sdk = must_get(&env.url("/api/v1/sdk/flags"))
        .await
        .expect_json(200);
    assert_eq!(sdk["flags"]["persisted-flag"], true);
    let mut stream = sse(&env.url("/api/stream")).await;
    let ev = next_event(&mut stream, Duration::from_secs(3)).await;
    assert_eq!(ev.json().unwrap()["persisted-flag"], true);
    // Chaos suite: when Rollgate is back, the proxy converges to its flags (a change made
    // during the outage included) and the open stream gets it.
    env.mock.set_flag("changed-during-outage", true);
    env.mock.start().await.expect("mock restarts");
    wait_served(
        &env.proxy,
        "changed-during-outage",
        true,
        Duration::from_secs(20),
    )
    .await;
    event_where(&mut stream, Duration::from_secs(10), |e| {
        e.json().is_ok_and(|v| v["changed-during-outage"] == true)
    })
    .await;
}

async fn not_ready_before_any_data() {
    let mock = mock(MockConfig::basic()).await;
    mock.stop().await;
    let mut config = proxy_config(&mock);
    fast_breaker(&mut config);
    let proxy = start_proxy(config).await;

    let ready = must_get(&proxy.url("/ready")).await;
    ready.expect_error(503, "NOT_READY");
    let retry_after = ready.header("retry-after").expect("Retry-After on 503");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s > 0),
        "Retry-After {retry_after:?}"
    );
    assert_eq!(must_get(&proxy.url("/live")).await.status, 200);
    assert_eq!(must_get(&proxy.url("/health")).await.status, 200);
    let h = must_get(&proxy.url("/api/health")).await.expect_json(200);
    assert_eq!(h["status"], "degraded", "no data is degraded: {h}");

    mock.start().await.expect("mock restarts");
    wait_ready(&proxy).await;
    assert_eq!(served_flags(&proxy, "").await["enabled-flag"], true);
}
