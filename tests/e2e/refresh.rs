//! Issue 13, bug 1: in evaluated mode, an upstream change that leaves the anonymous flags as
//! they were (a targeting rule for one user) still reaches that user's stream and polls, through
//! the per-user refresher and its budget. A `Retry-After` on a forwarded POST pauses that
//! kind of forward only. An `/identify` reaches Rollgate before that user's next fetch.

use std::time::Duration;

use rollgate_proxy_tests::mock::{Fault, MockConfig, Route, StreamMode};
use serde_json::Value;

use crate::common::{
    Env, event_where, eventually, get, metric_sum, must_get, must_post, next_event, sse,
    wait_metric_at_least,
};
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(a_per_user_targeting_change_reaches_the_users_stream_and_polls),
        scenario!(a_retry_after_on_forwarded_events_pauses_events_only),
        scenario!(identify_happens_before_the_users_next_fetch_and_evicts_its_answer),
        scenario!(many_streaming_users_converge_with_one_upstream_request_each),
    ]
}

const USER: &str = "user-5";

/// Rollgate's own notification style (a `flag-changed` per key), a per-user TTL far longer than
/// any test (only a change may refresh a user's answer), and a refresh budget of 20 per second
/// with `concurrency` upstream requests at a time.
async fn refresh_env(concurrency: u32) -> Env {
    Env::with(
        MockConfig::basic().stream_mode(StreamMode::FlagChanged),
        |config| {
            config.refresh_interval = Some(Duration::from_secs(600));
            config
                .settings
                .push(("ROLLGATE_PROXY_USER_REFRESH_RPS".into(), "20".into()));
            config.settings.push((
                "ROLLGATE_PROXY_USER_REFRESH_CONCURRENCY".into(),
                concurrency.to_string(),
            ));
        },
    )
    .await
}

async fn a_per_user_targeting_change_reaches_the_users_stream_and_polls() {
    let env = refresh_env(2).await;
    let anonymous = must_get(&env.url("/api/flags")).await.expect_json(200)["flags"].clone();
    let poll_url = env.url(&format!("/api/v1/sdk/flags?user_id={USER}"));
    let before = must_get(&poll_url).await.expect_json(200)["flags"].clone();
    assert_eq!(before["enabled-flag"], true, "{before}");

    let mut stream = sse(&env.url(&format!("/api/v1/sdk/stream?user_id={USER}"))).await;
    let first = next_event(&mut stream, Duration::from_secs(15)).await;
    assert_eq!(first.event, "init", "{first:?}");
    assert_eq!(
        first.json().unwrap()["flags"]["enabled-flag"],
        true,
        "{first:?}"
    );

    // Targeting: `enabled-flag` off for user-5 only. The anonymous answer stays the same.
    let mut targeted = env.mock.flags_for(Some(USER));
    targeted
        .flags
        .insert("enabled-flag".into(), Value::Bool(false));
    env.mock.set_user_flags(USER, targeted);
    assert_eq!(
        env.mock.flags_for(None).flags.get("enabled-flag"),
        Some(&Value::Bool(true))
    );

    let changed = event_where(&mut stream, Duration::from_secs(30), |event| {
        event
            .json()
            .is_ok_and(|data| data["flags"]["enabled-flag"] == false)
    })
    .await;
    assert_eq!(changed.event, "init", "{changed:?}");
    eventually(
        "a per-user poll to see the targeting change",
        Duration::from_secs(30),
        || {
            let url = poll_url.clone();
            async move {
                let body = get(&url).await.ok()?;
                (body.status == 200 && body.json()["flags"]["enabled-flag"] == false).then_some(())
            }
        },
    )
    .await;
    // Nothing changed for anyone else.
    assert_eq!(
        must_get(&env.url("/api/flags")).await.expect_json(200)["flags"],
        anonymous
    );
    wait_metric_at_least(
        &env.proxy,
        "rollgate_proxy_user_refresh_total",
        "result=\"done\"",
        1.0,
        Duration::from_secs(15),
    )
    .await;
    assert!(
        metric_sum(&env.proxy, "rollgate_proxy_user_refresh_backlog", "")
            .await
            .is_some(),
        "the backlog gauge is rendered"
    );
}

/// Events answered 429 with `Retry-After: 20`: no events request reaches upstream during the
/// hold, however many arrive or flushes come due, while identify (another kind) still goes.
async fn a_retry_after_on_forwarded_events_pauses_events_only() {
    let env = Env::with(MockConfig::basic(), |config| {
        config.events_flush_interval = Some(Duration::from_millis(200));
    })
    .await;
    env.mock
        .fail(Route::Events, Fault::status(429).retry_after("20"));
    let events = r#"{"events":[{"flagKey":"enabled-flag","eventName":"view","userId":"u","timestamp":"2026-01-01T00:00:00.000Z"}]}"#;
    must_post(&env.url("/api/v1/sdk/events"), events)
        .await
        .expect_json(200);
    env.mock
        .wait_until(Duration::from_secs(15), |s| s.events_requests >= 1)
        .await
        .expect("the events reach upstream once and get the 429");
    // The mock counts the request before its 429 is back at the proxy: the quiet window starts
    // once the proxy has taken the answer in (the Worker forwards each POST at once, so a POST
    // in between would be a second forward with no hold known yet).
    wait_metric_at_least(
        &env.proxy,
        "rollgate_proxy_upstream_requests_total",
        r#"kind="events",outcome="error""#,
        1.0,
        Duration::from_secs(15),
    )
    .await;
    // Without the hold: a retry every 200 ms flush (native), a forward per POST (Worker).
    let quiet = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < quiet {
        must_post(&env.url("/api/v1/sdk/events"), events)
            .await
            .expect_json(200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        env.mock.stats().events_requests,
        1,
        "events requests during the Retry-After"
    );
    // Identify is not held back by the events' Retry-After.
    must_post(
        &env.url("/api/v1/sdk/identify"),
        r#"{"user":{"id":"held-back-not"}}"#,
    )
    .await
    .expect_json(200);
    env.mock
        .wait_until(Duration::from_secs(15), |s| s.identify_requests >= 1)
        .await
        .expect("identify reaches upstream during the events' Retry-After");
}

/// Rollgate evaluates a user with the attributes it last received. With identify slow to reach
/// upstream (1.5 s), a poll right after `/identify` must still see the new attributes: the
/// identify evicted the user's cached answer and the fetch waited for the forward.
async fn identify_happens_before_the_users_next_fetch_and_evicts_its_answer() {
    let env = Env::with(MockConfig::basic(), |config| {
        config.refresh_interval = Some(Duration::from_secs(600));
        // The Worker's edge cache would serve the pre-identify answer for one pointer TTL.
        config
            .settings
            .push(("ROLLGATE_PROXY_EDGE_CACHE_TTL".into(), "0s".into()));
    })
    .await;
    env.mock.set_attribute_target("pro-feature", "plan", "pro");
    env.mock
        .set_delay(Route::Identify, Duration::from_millis(1500));
    let user = "identified-user";
    let poll_url = env.url(&format!("/api/v1/sdk/flags?user_id={user}"));
    let pro = |body: &Value| body["flags"]["pro-feature"].clone();
    // Wait until the change reached the proxy, and cache the user's answer.
    eventually("pro-feature served", Duration::from_secs(20), || {
        let url = poll_url.clone();
        async move {
            let body = get(&url).await.ok()?;
            (body.status == 200 && body.json()["flags"]["pro-feature"] == false).then_some(())
        }
    })
    .await;
    for (plan, want) in [("pro", true), ("free", false), ("pro", true)] {
        let body = format!(r#"{{"user":{{"id":"{user}","attributes":{{"plan":"{plan}"}}}}}}"#);
        must_post(&env.url("/api/v1/sdk/identify"), body)
            .await
            .expect_json(200);
        let answer = must_get(&poll_url).await.expect_json(200);
        assert_eq!(
            pro(&answer),
            want,
            "the poll right after identify(plan={plan}): {answer}"
        );
    }
}

/// 60 per-user streams and one change: every stream gets it, and Rollgate sees one per-user
/// request per user (the refresher's), not one per stream and publish. The time it took is
/// printed (users ÷ the budget's rate, 3 s here), not asserted.
async fn many_streaming_users_converge_with_one_upstream_request_each() {
    const USERS: usize = 60;
    let env = refresh_env(4).await;
    let mut streams = Vec::new();
    for i in 0..USERS {
        let mut stream = sse(&env.url(&format!("/api/v1/sdk/stream?user_id=wave-{i}"))).await;
        let first = next_event(&mut stream, Duration::from_secs(30)).await;
        assert!(
            first.json().is_ok_and(|d| d["flags"]["wave"].is_null()),
            "{first:?}"
        );
        streams.push(stream);
    }
    env.mock.clear_requests();
    let started = std::time::Instant::now();
    env.mock.set_flag("wave", true);
    for stream in &mut streams {
        event_where(stream, Duration::from_secs(60), |event| {
            event.json().is_ok_and(|d| d["flags"]["wave"] == true)
        })
        .await;
    }
    let took = started.elapsed();
    let per_user = env
        .mock
        .requests_for(Route::Flags)
        .iter()
        .filter(|r| r.query_param("user_id").is_some())
        .count();
    eprintln!(
        "refresh: {USERS} streaming users at 20 rps / 4 in flight converged in {took:?} with {per_user} per-user upstream requests"
    );
    assert!(
        per_user <= USERS,
        "{per_user} per-user upstream requests for {USERS} users and one change"
    );
    wait_metric_at_least(
        &env.proxy,
        "rollgate_proxy_user_refresh_total",
        "result=\"done\"",
        USERS as f64,
        Duration::from_secs(30),
    )
    .await;
}
