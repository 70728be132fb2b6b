//! The pattern's flag routes and the SDK flags route: shapes, headers, ETag/304, per-user
//! answers in evaluated mode.

use std::time::Duration;

use rollgate_proxy_tests::mock::{FlagSet, MockConfig, Route};
use serde_json::{Value, json};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(reasons_survive_the_stream_init),
        scenario!(api_flags_shape_etag_and_304),
        scenario!(single_flag_route),
        scenario!(sdk_flags_route),
        scenario!(etag_follows_the_data),
        scenario!(per_user_answers_in_evaluated_mode),
        scenario!(per_user_answers_are_cached_and_coalesced),
        scenario!(probe_and_info_routes),
    ]
}

/// The stream's `init` carries the same values as the start-up fetch but no reasons; it must
/// not drop the reasons (`withReasons=true`, OFREP reasons) nor change the ETag.
async fn reasons_survive_the_stream_init() {
    let mock = mock(MockConfig::basic()).await;
    // The fetch answers first, the stream's `init` lands after it.
    mock.set_delay(Route::Stream, Duration::from_millis(400));
    let proxy = start_proxy(proxy_config(&mock)).await;
    wait_ready(&proxy).await;
    let before = must_get(&proxy.url("/api/v1/sdk/flags?withReasons=true")).await;
    let etag = before.header("etag").unwrap().to_owned();
    assert_eq!(
        before.json()["reasons"]["disabled-flag"],
        json!({"kind":"OFF"})
    );
    mock.wait_for_open_streams(1, Duration::from_secs(5))
        .await
        .unwrap();
    // The stream's `init` has been taken in once the proxy counts an upstream event.
    wait_metric_at_least(
        &proxy,
        "rollgate_proxy_upstream_events_total",
        "",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let after = must_get(&proxy.url("/api/v1/sdk/flags?withReasons=true")).await;
    let body = after.expect_json(200);
    assert_eq!(
        body["reasons"]["disabled-flag"],
        json!({"kind":"OFF"}),
        "{body}"
    );
    assert_eq!(
        after.header("etag"),
        Some(etag.as_str()),
        "same values, same ETag"
    );
}

fn basic_anonymous() -> Value {
    bools(&[
        ("banner-text", true),
        ("config", true),
        ("disabled-flag", false),
        ("enabled-flag", true),
        ("max-items", true),
        ("rollout-50", false),
    ])
}

async fn api_flags_shape_etag_and_304() {
    let env = Env::basic().await;
    let resp = must_get(&env.url("/api/flags")).await;
    let body = resp.expect_json(200);
    assert_eq!(body["flags"], basic_anonymous(), "{body}");
    let cached_at = body["_meta"]["cachedAt"].as_str().expect("_meta.cachedAt");
    // RFC 3339 UTC with milliseconds: 2026-11-24T20:40:57.123Z
    assert!(
        cached_at.len() == 24 && cached_at.ends_with('Z') && cached_at.as_bytes()[10] == b'T',
        "cachedAt {cached_at:?}"
    );
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    let etag = resp.header("etag").expect("ETag").to_owned();
    assert!(
        etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
        "quoted ETag {etag:?}"
    );

    let not_modified = send(
        http()
            .get(env.url("/api/flags"))
            .header("if-none-match", &etag),
    )
    .await
    .unwrap();
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    let other = send(
        http()
            .get(env.url("/api/flags"))
            .header("if-none-match", "\"not-the-etag\""),
    )
    .await
    .unwrap();
    assert_eq!(other.status, 200);

    // POST without a user is the anonymous answer, same ETag.
    let post = must_post(&env.url("/api/flags"), "{}").await;
    assert_eq!(post.expect_json(200)["flags"], basic_anonymous());
    assert_eq!(post.header("etag"), Some(etag.as_str()));
}

async fn single_flag_route() {
    let env = Env::basic().await;
    let cases: &[(&str, u16, Value)] = &[
        (
            "enabled-flag",
            200,
            json!({"key":"enabled-flag","enabled":true}),
        ),
        (
            "disabled-flag",
            200,
            json!({"key":"disabled-flag","enabled":false}),
        ),
        // Unknown keys are false, as isEnabled(key, false).
        (
            "no-such-flag",
            200,
            json!({"key":"no-such-flag","enabled":false}),
        ),
        (
            "ns.team:flag_1-x",
            200,
            json!({"key":"ns.team:flag_1-x","enabled":false}),
        ),
    ];
    for (key, status, want) in cases {
        let resp = must_get(&env.url(&format!("/api/flags/{key}"))).await;
        assert_eq!(&resp.expect_json(*status), want, "key {key}");
    }
    let long = "a".repeat(257);
    for bad in ["bad%20key", "semi%3Bcolon", "%F0%9F%9A%80", long.as_str()] {
        must_get(&env.url(&format!("/api/flags/{bad}")))
            .await
            .expect_error(400, "INVALID_FLAG_KEY");
    }
    let max = "k".repeat(256);
    let resp = must_get(&env.url(&format!("/api/flags/{max}"))).await;
    assert_eq!(resp.expect_json(200)["enabled"], false);
}

async fn sdk_flags_route() {
    let env = Env::basic().await;
    let plain = must_get(&env.url("/api/v1/sdk/flags")).await;
    let body = plain.expect_json(200);
    assert_eq!(
        body,
        json!({"flags": basic_anonymous()}),
        "no reasons without withReasons"
    );
    let etag = plain.header("etag").expect("ETag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    let with = must_get(&env.url("/api/v1/sdk/flags?withReasons=true"))
        .await
        .expect_json(200);
    assert_eq!(with["flags"], basic_anonymous());
    // Which reasons survive depends on whether the stream's `init` (no reasons) lands after the
    // start-up fetch: see `reasons_survive_the_stream_init` (a known failure).
    assert!(with["reasons"].is_object(), "{with}");

    let not_modified = send(
        http()
            .get(env.url("/api/v1/sdk/flags?withReasons=true"))
            .header("if-none-match", &etag),
    )
    .await
    .unwrap();
    assert_eq!(
        not_modified.status, 304,
        "SDKs keep one ETag for both shapes"
    );
    assert!(not_modified.body.is_empty());
}

async fn etag_follows_the_data() {
    let env = Env::basic().await;
    let first = must_get(&env.url("/api/flags")).await;
    let etag = first.header("etag").unwrap().to_owned();
    env.mock.set_flag("fresh-flag", true);
    wait_served(&env.proxy, "fresh-flag", true, Duration::from_secs(3)).await;
    let resp = send(
        http()
            .get(env.url("/api/flags"))
            .header("if-none-match", &etag),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200, "an old ETag must not get a 304");
    let new_etag = resp.header("etag").unwrap().to_owned();
    assert_ne!(new_etag, etag);
    let again = send(
        http()
            .get(env.url("/api/flags"))
            .header("if-none-match", &new_etag),
    )
    .await
    .unwrap();
    assert_eq!(again.status, 304);
}

async fn per_user_answers_in_evaluated_mode() {
    let user_flags = FlagSet::from_bools([("enabled-flag", false), ("vip-only", true)]);
    let env = Env::with(MockConfig::basic().user_flags("u-123", user_flags), |_| {}).await;
    let want = bools(&[("enabled-flag", false), ("vip-only", true)]);

    let via_query = served_flags(&env.proxy, "?user_id=u-123").await;
    assert_eq!(via_query, want);
    let via_post = must_post(&env.url("/api/flags"), r#"{"user":{"id":"u-123"}}"#)
        .await
        .expect_json(200);
    assert_eq!(via_post["flags"], want);
    let one = must_get(&env.url("/api/flags/vip-only?user_id=u-123"))
        .await
        .expect_json(200);
    assert_eq!(one, json!({"key":"vip-only","enabled":true}));
    let sdk = must_get(&env.url("/api/v1/sdk/flags?user_id=u-123"))
        .await
        .expect_json(200);
    assert_eq!(sdk["flags"], want);
    // The anonymous answer is unchanged.
    assert_eq!(served_flags(&env.proxy, "").await, basic_anonymous());

    // The mock's own rollout bucket decides rollout-50 per user (FNV: 89 and 15).
    let out = served_flags(&env.proxy, "?user_id=consistent-user-123").await;
    assert_eq!(out["rollout-50"], false);
    let inside = served_flags(&env.proxy, "?user_id=user-1").await;
    assert_eq!(inside["rollout-50"], true);

    // Upstream saw the user's id, with the server key.
    let asked = env
        .mock
        .requests_for(Route::Flags)
        .into_iter()
        .find(|r| r.query_param("user_id").as_deref() == Some("u-123"))
        .expect("a per-user fetch for u-123");
    assert_eq!(
        asked.header("authorization"),
        Some(format!("Bearer {SERVER_KEY}").as_str())
    );
}

async fn per_user_answers_are_cached_and_coalesced() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.refresh_interval = Some(Duration::from_secs(30));
    })
    .await;
    // Slow upstream answers make concurrent requests overlap for sure.
    env.mock.set_delay(Route::Flags, Duration::from_millis(300));
    let url = env.url("/api/flags?user_id=coalesce-me");
    let answers = futures_util::future::join_all((0..10).map(|_| must_get(&url))).await;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
    }
    for _ in 0..3 {
        assert_eq!(must_get(&url).await.status, 200);
    }
    let fetches = env
        .mock
        .requests_for(Route::Flags)
        .into_iter()
        .filter(|r| r.query_param("user_id").as_deref() == Some("coalesce-me"))
        .count();
    assert_eq!(
        fetches, 1,
        "13 requests for one user within the TTL: one upstream fetch"
    );
}

async fn probe_and_info_routes() {
    let env = Env::basic().await;
    assert_eq!(
        must_get(&env.url("/health")).await.expect_json(200),
        json!({"status":"ok"})
    );
    assert_eq!(must_get(&env.url("/live")).await.status, 200);
    assert_eq!(must_get(&env.url("/ready")).await.status, 200);

    let health = must_get(&env.url("/api/health")).await.expect_json(200);
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["circuit"], "closed", "{health}");
    assert_eq!(health["source"], "upstream", "{health}");
    for k in ["hits", "misses", "staleHits"] {
        assert!(health["cache"][k].is_u64(), "cache.{k}: {health}");
    }
    assert_eq!(health["upstream"]["mode"], "evaluated", "{health}");
    assert_eq!(health["upstream"]["fresh"], true, "{health}");
    assert!(health["upstream"]["stream"].is_string(), "{health}");
    assert!(health["revision"].is_u64(), "{health}");
    assert!(health["etag"].is_string(), "{health}");
    assert!(health["dataAgeMs"].is_u64(), "{health}");
    assert_eq!(health["flags"], 6, "{health}");
    assert!(health["sseClients"].is_u64(), "{health}");
    eventually(
        "upstream stream connected",
        Duration::from_secs(5),
        || async {
            let h = must_get(&env.url("/api/health")).await.json();
            (h["upstream"]["stream"] == "connected").then_some(())
        },
    )
    .await;

    let metrics = must_get(&env.url("/api/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{:?}",
        metrics.header("content-type")
    );
    let text = metrics.text();
    assert!(
        text.lines()
            .any(|l| l.starts_with("rollgate_proxy_") || l.starts_with("# TYPE rollgate_proxy_")),
        "{text}"
    );
    assert!(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .all(|l| l.starts_with("rollgate_proxy_")),
        "every metric has the prefix:\n{text}"
    );

    let demo = must_get(&env.url("/")).await;
    assert_eq!(demo.status, 200);
    assert!(
        demo.header("content-type")
            .unwrap_or_default()
            .starts_with("text/html"),
        "{:?}",
        demo.header("content-type")
    );
}
