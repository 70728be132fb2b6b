//! The downstream behaviour both targets share (issue 8, "drifts"): one scenario per drift the
//! native server and the Worker had, each asserting the shared spec on whichever target runs.
//!
//! 1. identify without a user id
//! 2. per-user streams merge `/identify` attributes
//! 3. per-user streams skip snapshots unchanged for that user
//! 4. merged contexts hold at most 64 attributes, the request's own first
//! 5. forwarded requests count in the breaker
//! 6. metric names, types, labels and meanings
//! 7. setting names and units
//! 8. local mode serves `examples/flags.json`
//! 9. exact CORS headers

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use rollgate_proxy_tests::mock::{DropKind, Fault, MockConfig, Route};
use rollgate_proxy_tests::sse::{SseClient, SseError};
use rollgate_proxy_tests::target::{self, ProxyConfig, ProxyHandle, TargetKind};
use serde_json::{Value, json};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(identify_without_user_id_is_rejected_and_not_forwarded),
        scenario!(per_user_streams_merge_identify_attributes),
        scenario!(per_user_streams_skip_snapshots_unchanged_for_the_user),
        scenario!(merged_context_is_capped_at_64_attributes_own_first),
        scenario!(forwarded_request_failures_open_the_breaker),
        scenario!(metrics_have_the_shared_names_types_labels_and_meanings),
        scenario!(settings_use_the_shared_names_and_units),
        scenario!(local_mode_serves_examples_flags_json),
        scenario!(cors_headers_are_exact),
    ]
}

/// `pro-feature` is on exactly for `plan == pro`; `everyone` is on for all.
fn plan_rules() -> Value {
    json!({"version":"1","flags":{
        "pro-feature": {"key":"pro-feature","enabled":true,"rollout":0,"rules":[
            {"id":"pro","enabled":true,"rollout":100,
             "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]}]},
        "everyone": {"key":"everyone","enabled":true,"rollout":100}
    }})
}

/// A `basic` mock and a proxy (changed by `tweak`), then `rules` as `rules-full` on the open
/// upstream stream; returns once the proxy reports rules mode.
async fn rules_env_with(rules: &Value, tweak: impl FnOnce(&mut ProxyConfig)) -> Env {
    let env = Env::with(MockConfig::basic(), tweak).await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .expect("the proxy holds an upstream stream");
    env.mock.set_rules(rules);
    eventually("rules mode", Duration::from_secs(10), || async {
        let h = get(&env.url("/api/health")).await.ok()?.json();
        (h["upstream"]["mode"] == "rules").then_some(())
    })
    .await;
    env
}

async fn identify(env: &Env, body: &str) -> Resp {
    must_post(&env.url("/api/v1/sdk/identify"), body.to_owned()).await
}

/// The first event of a stream, as JSON (`/api/stream` data is the bare map; the SDK stream's
/// is `{"flags":{..}}`: returns the map either way).
async fn first_flags(url: &str) -> Value {
    let mut client = sse(url).await;
    let ev = next_event(&mut client, Duration::from_secs(10)).await;
    flags_of(
        &ev.json()
            .unwrap_or_else(|e| panic!("{url}: data is not JSON: {e}")),
    )
}

fn flags_of(data: &Value) -> Value {
    if data["flags"].is_object() {
        data["flags"].clone()
    } else {
        data.clone()
    }
}

// ---- 1 ----------------------------------------------------------------------------------

/// A body without a user id is refused with 400 `INVALID_CONTEXT`, and nothing reaches the
/// upstream; the synchronisation point is a valid identify sent afterwards.
async fn identify_without_user_id_is_rejected_and_not_forwarded() {
    let env = Env::basic().await;
    for body in ["{}", r#"{"user":{"email":"a@x"}}"#, ""] {
        identify(&env, body)
            .await
            .expect_error(400, "INVALID_CONTEXT");
    }
    let ok = identify(&env, r#"{"user":{"id":"after-the-bad-ones"}}"#).await;
    assert_eq!(ok.expect_json(200), json!({"success":true}));
    let mock = env.mock.control();
    eventually(
        "the valid identify forwarded upstream",
        Duration::from_secs(10),
        || {
            let mock = mock.clone();
            async move { mock.identified_user("after-the-bad-ones") }
        },
    )
    .await;
    let bodies = env.mock.identify_bodies();
    assert_eq!(
        bodies.len(),
        1,
        "only the identify with a user id may be forwarded: {bodies:?}"
    );
    assert_eq!(env.mock.stats().identify_requests, 1, "{bodies:?}");
}

// ---- 2 ----------------------------------------------------------------------------------

/// Per-user streams (frontend and SDK) evaluate the context with the `/identify` attributes
/// merged in, the stream request's own values winning.
async fn per_user_streams_merge_identify_attributes() {
    let env = rules_env_with(&plan_rules(), |_| {}).await;
    let ok = identify(
        &env,
        r#"{"user":{"id":"u-pro","attributes":{"plan":"pro"}}}"#,
    )
    .await;
    assert_eq!(ok.expect_json(200), json!({"success":true}));
    // The polling route already merges (reference point for the streams).
    let polled = served_flags(&env.proxy, "?user_id=u-pro").await;
    assert_eq!(polled["pro-feature"], true, "polling merges: {polled}");

    for path in ["/api/stream", "/api/v1/sdk/stream"] {
        let merged = first_flags(&env.url(&format!("{path}?user_id=u-pro"))).await;
        assert_eq!(
            merged["pro-feature"], true,
            "{path}?user_id=u-pro must see the identified plan=pro: {merged}"
        );
        let own = first_flags(&env.url(&format!("{path}?user_id=u-pro&attr.plan=free"))).await;
        assert_eq!(
            own["pro-feature"], false,
            "{path}: the request's own plan=free wins over the stored one: {own}"
        );
        let stranger = first_flags(&env.url(&format!("{path}?user_id=u-other"))).await;
        assert_eq!(
            stranger["pro-feature"], false,
            "{path}: nothing stored for u-other: {stranger}"
        );
    }
}

// ---- 3 ----------------------------------------------------------------------------------

fn targeting_rules(for_u1_rollout: u8, switch: bool) -> Value {
    json!({"version": format!("{for_u1_rollout}-{switch}"), "flags":{
        "for-u1": {"key":"for-u1","enabled":true,"rollout":for_u1_rollout,"targetUsers":["user-1"]},
        "switch": {"key":"switch","enabled":switch,"rollout":100}
    }})
}

/// A snapshot that changes nothing for a user sends that user's stream no frame: an anonymous
/// client sees change A (which only affects anonymous users), then change B (which affects
/// everyone); the per-user client's next event must be B.
async fn per_user_streams_skip_snapshots_unchanged_for_the_user() {
    let env = rules_env_with(&targeting_rules(0, false), |_| {}).await;
    let mut anon = sse(&env.url("/api/stream")).await;
    let first = flags_of(
        &next_event(&mut anon, Duration::from_secs(10))
            .await
            .json()
            .unwrap(),
    );
    assert_eq!(first["for-u1"], false, "{first}");
    let mut per_user = Vec::new();
    for path in [
        "/api/stream?user_id=user-1",
        "/api/v1/sdk/stream?user_id=user-1",
    ] {
        let mut client = sse(&env.url(path)).await;
        let ev = next_event(&mut client, Duration::from_secs(10)).await;
        let flags = flags_of(&ev.json().unwrap());
        assert_eq!(flags["for-u1"], true, "{path}: targeted: {flags}");
        assert_eq!(flags["switch"], false, "{path}: {flags}");
        per_user.push((path, client));
    }

    // A: `for-u1` goes to 100 %: anonymous false → true, user-1 stays true.
    env.mock.set_rules(&targeting_rules(100, false));
    let a = next_event(&mut anon, Duration::from_secs(10)).await;
    assert_eq!(flags_of(&a.json().unwrap())["for-u1"], true, "{a:?}");
    // B: `switch` on for everyone.
    env.mock.set_rules(&targeting_rules(100, true));
    let b = next_event(&mut anon, Duration::from_secs(10)).await;
    assert_eq!(flags_of(&b.json().unwrap())["switch"], true, "{b:?}");

    for (path, client) in &mut per_user {
        let ev = next_event(client, Duration::from_secs(10)).await;
        let flags = flags_of(&ev.json().unwrap());
        assert_eq!(
            flags["switch"], true,
            "{path}: the next event after the first must be change B (A changed nothing for \
             user-1, so it must send no frame); got {} {:?} {flags}",
            ev.event, ev.id
        );
    }
}

// ---- 4 ----------------------------------------------------------------------------------

/// The merged context holds at most 64 attributes, the request's own first: 64 own attributes
/// leave no room for the stored `plan`.
async fn merged_context_is_capped_at_64_attributes_own_first() {
    let env = rules_env_with(&plan_rules(), |_| {}).await;
    let mut stored = serde_json::Map::new();
    stored.insert("plan".into(), json!("pro"));
    for i in 1..64 {
        stored.insert(format!("s{i}"), json!(format!("v{i}")));
    }
    assert_eq!(stored.len(), 64);
    let body = json!({"user":{"id":"u-cap","attributes":stored}}).to_string();
    assert_eq!(
        identify(&env, &body).await.expect_json(200),
        json!({"success":true})
    );

    let own: String = (1..=64).map(|i| format!("&attr.r{i}=x")).collect();
    let cases = [
        ("stored only", "?user_id=u-cap".to_owned(), true),
        ("64 own attributes", format!("?user_id=u-cap{own}"), false),
    ];
    for (what, query, want) in &cases {
        let flags = served_flags(&env.proxy, query).await;
        assert_eq!(
            flags["pro-feature"], *want,
            "/api/flags, {what}: pro-feature {want} expected: {flags}"
        );
        let sdk = must_get(&env.url(&format!("/api/v1/sdk/flags{query}")))
            .await
            .expect_json(200);
        assert_eq!(
            sdk["flags"]["pro-feature"], *want,
            "/api/v1/sdk/flags, {what}: {sdk}"
        );
        for path in ["/api/stream", "/api/v1/sdk/stream"] {
            let flags = first_flags(&env.url(&format!("{path}{query}"))).await;
            assert_eq!(
                flags["pro-feature"], *want,
                "{path}, {what}: pro-feature {want} expected: {flags}"
            );
        }
    }
    let attrs: serde_json::Map<String, Value> =
        (1..=64).map(|i| (format!("r{i}"), json!("x"))).collect();
    let post = must_post(
        &env.url("/api/flags"),
        json!({"user":{"id":"u-cap","attributes":attrs}}).to_string(),
    )
    .await
    .expect_json(200);
    assert_eq!(
        post["flags"]["pro-feature"], false,
        "POST /api/flags, 64 own attributes: {post}"
    );
}

// ---- 5 ----------------------------------------------------------------------------------

/// With upstream failing identify, events and telemetry (500), the forwards' failures open
/// the breaker (each kind on its own proxy, so each is proven alone).
async fn forwarded_request_failures_open_the_breaker() {
    let identify = (
        Route::Identify,
        "/api/v1/sdk/identify",
        r#"{"user":{"id":"u-1"}}"#.to_owned(),
    );
    let events = (
        Route::Events,
        "/api/v1/sdk/events",
        json!({"events":[{"flagKey":"enabled-flag","eventName":"e","userId":"u-1",
            "timestamp":"2026-01-01T00:00:00Z"}]})
        .to_string(),
    );
    let telemetry = (
        Route::Telemetry,
        "/api/v1/sdk/telemetry",
        json!({"evaluations":{"enabled-flag":{"total":1,"true":1,"false":0}},"period_ms":1000})
            .to_string(),
    );
    all_hold(vec![
        ("identify", tokio::spawn(breaker_opens_on(identify))),
        ("events", tokio::spawn(breaker_opens_on(events))),
        ("telemetry", tokio::spawn(breaker_opens_on(telemetry))),
    ])
    .await;
}

/// Awaits every part (spawned, so they run at once and a failing part does not hide the
/// others) and fails with every part's failure message.
async fn all_hold(parts: Vec<(&str, tokio::task::JoinHandle<()>)>) {
    let mut failed = Vec::new();
    for (name, part) in parts {
        if let Err(e) = part.await {
            let msg = if e.is_panic() {
                let payload = e.into_panic();
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panic".to_owned())
            } else {
                e.to_string()
            };
            failed.push(format!("[{name}] {msg}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

async fn breaker_opens_on((route, path, body): (Route, &str, String)) {
    let env = Env::with(MockConfig::basic(), |c| {
        c.breaker_threshold = Some(2);
        c.breaker_window = Some(Duration::from_secs(60));
        c.breaker_open_timeout = Some(Duration::from_secs(60));
        // Native buffers events and telemetry: flush fast (the Worker forwards at once).
        c.events_flush_interval = Some(Duration::from_millis(200));
        c.telemetry_flush_interval = Some(Duration::from_millis(200));
    })
    .await;
    let health = must_get(&env.url("/api/health")).await.expect_json(200);
    assert_eq!(health["circuit"], "closed", "{health}");
    env.mock.fail(route, Fault::status(500));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    loop {
        let resp = must_post(&env.url(path), body.clone()).await;
        assert!(resp.status < 300, "{path}: {} {}", resp.status, resp.text());
        sent += 1;
        let health = must_get(&env.url("/api/health")).await.json();
        if health["circuit"] == "open" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{route}: the breaker is still {} after {sent} forwards that upstream answered 500 \
             ({} failures served); forwarded outcomes must count: {health}",
            health["circuit"],
            env.mock.stats().faults_served
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        env.mock.stats().faults_served >= 2,
        "{route}: opened without forwarded failures?"
    );
}

// ---- 6 ----------------------------------------------------------------------------------

/// Families the spec names, with their type and label names (`None`: no labels).
const SPEC_FAMILIES: &[(&str, &str, &[&str])] = &[
    (
        "rollgate_proxy_http_requests_total",
        "counter",
        &["route", "status"],
    ),
    (
        "rollgate_proxy_http_request_duration_seconds",
        "histogram",
        &["route"],
    ),
    ("rollgate_proxy_sse_clients", "gauge", &["stream"]),
    (
        "rollgate_proxy_sse_frames_sent_total",
        "counter",
        &["stream"],
    ),
    ("rollgate_proxy_websocket_refused_total", "counter", &[]),
    ("rollgate_proxy_upstream_connected", "gauge", &[]),
    (
        "rollgate_proxy_upstream_stream_connects_total",
        "counter",
        &[],
    ),
    ("rollgate_proxy_upstream_reconnects_total", "counter", &[]),
    (
        "rollgate_proxy_upstream_requests_total",
        "counter",
        &["kind", "outcome"],
    ),
    ("rollgate_proxy_breaker_state", "gauge", &[]),
    ("rollgate_proxy_breaker_opens_total", "counter", &[]),
    ("rollgate_proxy_snapshot_revision", "gauge", &[]),
    ("rollgate_proxy_snapshot_age_seconds", "gauge", &[]),
    ("rollgate_proxy_flags", "gauge", &[]),
    (
        "rollgate_proxy_cache_requests_total",
        "counter",
        &["result"],
    ),
    ("rollgate_proxy_user_cache_total", "counter", &["result"]),
    ("rollgate_proxy_evaluations_total", "counter", &[]),
];

/// Polls `f` every 50 ms until it returns `Some`, at most `timeout`; `None` when it never did.
async fn within<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The spec's families are there with HELP, TYPE and label names; `sse_clients` always has
/// its three series; `upstream_reconnects_total` is stream connects − 1 (stream errors do not
/// count). Every difference is collected, then reported at once.
async fn metrics_have_the_shared_names_types_labels_and_meanings() {
    let env = Env::basic().await;
    let mut problems = Vec::new();
    let url = env.url("/api/metrics");
    let scrape = || {
        let url = url.clone();
        async move { Some(parse_metrics(&get(&url).await.ok()?.text())) }
    };
    let sample = |m: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]| {
        m.get(name).and_then(|f| f.value(labels))
    };

    // Reconnects: one stream so far, so 0; then two refused attempts and one success.
    let m = metrics(&env.proxy).await;
    let connects = sample(&m, "rollgate_proxy_upstream_stream_connects_total", &[]);
    let reconnects = sample(&m, "rollgate_proxy_upstream_reconnects_total", &[]);
    if (connects, reconnects) != (Some(1.0), Some(0.0)) {
        problems.push(format!(
            "after start: upstream_stream_connects_total {connects:?} (want 1), \
             upstream_reconnects_total {reconnects:?} (want 0)"
        ));
    }
    env.mock.fail(Route::Stream, Fault::status(500).times(2));
    env.mock.drop_streams(DropKind::Clean);
    env.mock
        .wait_until(Duration::from_secs(30), |s| {
            s.streams_accepted >= 2 && s.open_streams == 1
        })
        .await
        .expect("the proxy reconnects after two refused attempts");
    let after = within(Duration::from_secs(10), || async {
        let m = scrape().await?;
        let connects = sample(&m, "rollgate_proxy_upstream_stream_connects_total", &[])?;
        (connects >= 2.0).then_some(m)
    })
    .await;
    match after {
        None => problems.push(
            "upstream_stream_connects_total did not reach 2 after a drop and a reconnect".into(),
        ),
        Some(m) => {
            let connects = sample(&m, "rollgate_proxy_upstream_stream_connects_total", &[]);
            let reconnects = sample(&m, "rollgate_proxy_upstream_reconnects_total", &[]);
            if (connects, reconnects) != (Some(2.0), Some(1.0)) {
                problems.push(format!(
                    "after a drop, 2 refused attempts and a reconnect: \
                     upstream_stream_connects_total {connects:?} (want 2), \
                     upstream_reconnects_total {reconnects:?} (want 1: streams opened after \
                     the first; errors are not reconnects)"
                ));
            }
        }
    }

    // sse_clients: always labelled, all three series, an open frontend client counted.
    let mut client = sse(&env.url("/api/stream")).await;
    next_event(&mut client, Duration::from_secs(10)).await;
    let counted = within(Duration::from_secs(10), || async {
        let m = scrape().await?;
        let v = |s: &str| sample(&m, "rollgate_proxy_sse_clients", &[("stream", s)]);
        (v("frontend") == Some(1.0) && v("sdk") == Some(0.0) && v("ofrep") == Some(0.0))
            .then_some(())
    })
    .await;
    // A request of each cached kind, so the labelled counters have samples.
    served_flags(&env.proxy, "").await;
    served_flags(&env.proxy, "?user_id=m-1").await;
    let m = metrics(&env.proxy).await;
    if counted.is_none() {
        problems.push(format!(
            "sse_clients: want frontend 1, sdk 0, ofrep 0 with one /api/stream client; got {:?}",
            m.get("rollgate_proxy_sse_clients")
        ));
    }
    if let Some(f) = m.get("rollgate_proxy_sse_clients")
        && f.samples.iter().any(|(_, l, _)| !l.contains_key("stream"))
    {
        problems.push(format!("sse_clients has an unlabelled sample: {f:?}"));
    }

    for (name, kind, labels) in SPEC_FAMILIES {
        let Some(f) = m.get(*name) else {
            problems.push(format!("{name}: missing"));
            continue;
        };
        if f.kind != *kind {
            problems.push(format!("{name}: TYPE {:?}, spec {kind}", f.kind));
        }
        if f.help.is_none() {
            problems.push(format!("{name}: no HELP"));
        }
        let want: BTreeSet<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let got = f.label_names();
        if !f.samples.is_empty() && got != want {
            problems.push(format!("{name}: labels {got:?}, spec {want:?}"));
        }
    }
    if m.contains_key("rollgate_proxy_cache_total") {
        problems.push("rollgate_proxy_cache_total: the old name is still rendered".into());
    }
    assert!(
        problems.is_empty(),
        "{} difference(s) of /api/metrics from the spec:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ---- 7 ----------------------------------------------------------------------------------

/// Every setting is read under its shared name, durations with their unit: a 250ms refresh
/// interval polls, a 1s SSE max age closes streams, a 300ms upstream timeout fails a stalled
/// fetch, and the user-cache and identify-store sizes bound what is kept.
async fn settings_use_the_shared_names_and_units() {
    all_hold(vec![
        (
            "streaming, refresh interval, SSE max age, upstream timeout",
            tokio::spawn(polling_max_age_and_upstream_timeout()),
        ),
        ("user cache size", tokio::spawn(user_cache_size())),
        ("identify store size", tokio::spawn(identify_store_size())),
    ])
    .await;
}

async fn polling_max_age_and_upstream_timeout() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.streaming = Some(false);
        c.refresh_interval = Some(Duration::from_millis(250));
        c.sse_max_age = Some(Duration::from_secs(1));
        c.upstream_timeout = Some(Duration::from_millis(300));
        c.breaker_threshold = Some(2);
        c.breaker_open_timeout = Some(Duration::from_secs(60));
    })
    .await;
    // ROLLGATE_PROXY_STREAMING=false and ROLLGATE_PROXY_REFRESH_INTERVAL=250ms: polls, no stream.
    let before = env.mock.stats().flags_requests;
    env.mock
        .wait_for_flags_requests(before + 4, Duration::from_secs(8))
        .await
        .expect("ROLLGATE_PROXY_REFRESH_INTERVAL=250ms: four more polls within 8 s");
    assert_eq!(
        env.mock.stats().streams_accepted,
        0,
        "ROLLGATE_PROXY_STREAMING=false"
    );

    // ROLLGATE_PROXY_SSE_MAX_AGE=1000ms: the proxy ends the stream (±10 % jitter).
    let mut client = sse(&env.url("/api/stream")).await;
    next_event(&mut client, Duration::from_secs(10)).await;
    wait_stream_end(
        &mut client,
        Duration::from_secs(8),
        "ROLLGATE_PROXY_SSE_MAX_AGE=1000ms",
    )
    .await;

    // ROLLGATE_PROXY_UPSTREAM_TIMEOUT=300ms: polls to a /flags that never answers time out,
    // two failures open the breaker, long before the default 10 s timeout could.
    env.mock.set_delay(Route::Flags, Duration::from_secs(80));
    let url = env.url("/api/health");
    eventually(
        "the breaker open from timed-out polls (ROLLGATE_PROXY_UPSTREAM_TIMEOUT=300ms)",
        Duration::from_secs(7),
        || {
            let url = url.clone();
            async move { (get(&url).await.ok()?.json()["circuit"] == "open").then_some(()) }
        },
    )
    .await;
}

async fn wait_stream_end(client: &mut SseClient, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_item(left).await {
            Ok(_) => {}
            Err(SseError::Ended | SseError::Broken(_)) => return,
            Err(e) => panic!("{what}: the stream did not end within {timeout:?}: {e}"),
        }
    }
}

async fn user_cache_size() {
    // Evaluated mode, a per-user TTL far beyond the scenario, one cached user.
    let env = Env::with(MockConfig::basic(), |c| {
        c.refresh_interval = Some(Duration::from_secs(300));
        c.user_cache_size = Some(1);
        // The Worker's edge cache would answer the repeat itself; off, so the relay does.
        c.settings
            .push(("ROLLGATE_PROXY_EDGE_CACHE_TTL".into(), "0".into()));
    })
    .await;
    for user in ["c-1", "c-2", "c-1"] {
        served_flags(&env.proxy, &format!("?user_id={user}")).await;
    }
    let fetches = |user: &str| {
        env.mock
            .requests_for(Route::Flags)
            .iter()
            .filter(|r| r.query_param("user_id").as_deref() == Some(user))
            .count()
    };
    assert_eq!(
        (fetches("c-1"), fetches("c-2")),
        (2, 1),
        "ROLLGATE_PROXY_USER_CACHE_SIZE=1: c-2 evicts c-1, so c-1 is fetched again"
    );
}

async fn identify_store_size() {
    let env = rules_env_with(&plan_rules(), |c| c.identify_store_size = Some(2)).await;
    for user in ["i-1", "i-2", "i-3"] {
        let body = json!({"user":{"id":user,"attributes":{"plan":"pro"}}}).to_string();
        assert_eq!(
            identify(&env, &body).await.expect_json(200),
            json!({"success":true})
        );
    }
    let pro = |flags: Value| flags["pro-feature"].clone();
    assert_eq!(
        pro(served_flags(&env.proxy, "?user_id=i-3").await),
        true,
        "i-3 is kept"
    );
    assert_eq!(
        pro(served_flags(&env.proxy, "?user_id=i-2").await),
        true,
        "i-2 is kept"
    );
    assert_eq!(
        pro(served_flags(&env.proxy, "?user_id=i-1").await),
        false,
        "ROLLGATE_PROXY_IDENTIFY_STORE_SIZE=2: i-1 (least recently used) was evicted by i-3"
    );
}

// ---- 8 ----------------------------------------------------------------------------------

/// The rules of examples/flags.json, read independently of the proxy.
fn example_rules() -> Value {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/flags.json");
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    serde_json::from_str(&text).expect("examples/flags.json is JSON")
}

async fn start_local(kind: TargetKind) -> ProxyHandle {
    let proxy = target::start(kind, ProxyConfig::default())
        .await
        .unwrap_or_else(|e| panic!("{kind:?} did not start in local mode: {e:#}"));
    wait_ready(&proxy).await;
    proxy
}

/// Without an API key both targets serve the rules of examples/flags.json (the native server
/// from its default path, the Worker embedded), and equal anonymous answers.
async fn local_mode_serves_examples_flags_json() {
    let rules = example_rules();
    let keys: BTreeSet<&str> = rules["flags"]
        .as_object()
        .expect("flags object")
        .keys()
        .map(String::as_str)
        .collect();
    let proxy = start_local(target()).await;
    let resp = must_get(&proxy.url("/api/flags")).await;
    let flags = resp.expect_json(200)["flags"].clone();
    let served: BTreeSet<&str> = flags
        .as_object()
        .expect("flags object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        served, keys,
        "local mode must serve examples/flags.json's flags"
    );
    assert_eq!(flags["dark-mode"], true, "{flags}");
    assert_eq!(flags["maintenance-banner"], false, "{flags}");
    let qa = served_flags(&proxy, "?user_id=u-qa-1").await;
    assert_eq!(
        qa["new-checkout"], true,
        "targetUsers of new-checkout: {qa}"
    );

    if target() == TargetKind::Edge {
        // The same anonymous answer as the native server.
        let native = start_local(TargetKind::Native).await;
        let theirs = must_get(&native.url("/api/flags")).await;
        assert_eq!(
            flags,
            theirs.expect_json(200)["flags"],
            "the Worker's and the native server's anonymous local flags"
        );
        assert_eq!(
            resp.header("etag"),
            theirs.header("etag"),
            "local-mode ETag"
        );
    }
}

// ---- 9 ----------------------------------------------------------------------------------

const EXPOSE: &str = "etag,retry-after,x-request-id";
const METHODS: &str = "GET,HEAD,POST,OPTIONS";
const ALLOW_HEADERS: &str = "authorization,content-type,if-none-match,cache-control,x-api-key,\
    last-event-id,x-request-id,x-trace-id,x-span-id,traceparent,x-sdk-name,x-sdk-version";
const APP: &str = "https://app.example.com";
const EVIL: &str = "https://evil.example";
const CORS_KEY: &str = "cors-client-key";

/// A comma list, lower-cased and trimmed, as a set.
fn list(value: &str) -> BTreeSet<String> {
    value
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The CORS headers one answer must carry (header values compared as comma sets, so case,
/// spaces and order do not matter); every `access-control-*` header not wanted must be absent.
struct Want {
    /// `access-control-allow-origin`.
    allow_origin: Option<&'static str>,
    /// `access-control-expose-headers: etag,retry-after,x-request-id`.
    expose: bool,
    /// `origin` among the `vary` values.
    vary_origin: bool,
    /// The preflight trio: allow-methods, allow-headers, `max-age: 600`.
    preflight_allowed: bool,
}

fn check(resp: &Resp, what: &str, want: &Want, problems: &mut Vec<String>) {
    let mut expect = |name: &str, wanted: Option<&str>| {
        let got = resp.header(name);
        let ok = match (got, wanted) {
            (None, None) => true,
            (Some(g), Some(w)) => list(g) == list(w),
            _ => false,
        };
        if !ok {
            problems.push(format!("{what}: {name}: got {got:?}, want {wanted:?}"));
        }
    };
    expect("access-control-allow-origin", want.allow_origin);
    expect(
        "access-control-expose-headers",
        want.expose.then_some(EXPOSE),
    );
    let pre = want.preflight_allowed;
    expect("access-control-allow-methods", pre.then_some(METHODS));
    expect("access-control-allow-headers", pre.then_some(ALLOW_HEADERS));
    expect("access-control-max-age", pre.then_some("600"));
    expect("access-control-allow-credentials", None);
    let vary: BTreeSet<String> = resp
        .headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(list)
        .collect();
    if vary.contains("origin") != want.vary_origin {
        problems.push(format!(
            "{what}: vary {vary:?}, want origin {}",
            if want.vary_origin { "in it" } else { "absent" }
        ));
    }
    if resp.header("x-request-id").is_none_or(str::is_empty) {
        problems.push(format!("{what}: no x-request-id"));
    }
}

async fn preflight(proxy: &ProxyHandle, path: &str, origin: Option<&str>) -> Resp {
    let mut req = http()
        .request(reqwest::Method::OPTIONS, proxy.url(path))
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization,if-none-match",
        );
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    send(req).await.expect("preflight answered")
}

async fn actual(proxy: &ProxyHandle, path: &str, origin: Option<&str>) -> Resp {
    let mut req = http().get(proxy.url(path)).bearer_auth(CORS_KEY);
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    send(req).await.expect("request answered")
}

/// The CORS headers of the spec, exactly, for `*` and for an allow-list, on normal answers
/// and preflights (which never need a client key and answer 204 with an empty body).
async fn cors_headers_are_exact() {
    let with = |origins: &'static str| {
        Env::with(MockConfig::basic(), move |c| {
            c.cors_origins = Some(origins.into());
            c.client_keys = vec![CORS_KEY.into()];
        })
    };
    let (star, listed) = tokio::join!(with("*"), with(APP));
    let mut problems = Vec::new();
    let none = Want {
        allow_origin: None,
        expose: false,
        vary_origin: true,
        preflight_allowed: false,
    };
    for path in ["/api/flags", "/api/v1/sdk/flags", "/no/such/route"] {
        // Policy `*`.
        let star_normal = Want {
            allow_origin: Some("*"),
            expose: true,
            vary_origin: false,
            preflight_allowed: false,
        };
        let star_pre = Want {
            preflight_allowed: true,
            ..star_normal
        };
        for origin in [Some(APP), None] {
            let what = format!("`*`, GET {path} origin {origin:?}");
            check(
                &actual(&star.proxy, path, origin).await,
                &what,
                &star_normal,
                &mut problems,
            );
        }
        let pre = preflight(&star.proxy, path, Some(APP)).await;
        check_preflight(
            &pre,
            &format!("`*`, OPTIONS {path}"),
            &star_pre,
            &mut problems,
        );

        // Policy list, allowed origin.
        let allowed = Want {
            allow_origin: Some(APP),
            expose: true,
            vary_origin: true,
            preflight_allowed: false,
        };
        let what = format!("list, GET {path} allowed origin");
        check(
            &actual(&listed.proxy, path, Some(APP)).await,
            &what,
            &allowed,
            &mut problems,
        );
        let pre = preflight(&listed.proxy, path, Some(APP)).await;
        let allowed_pre = Want {
            preflight_allowed: true,
            ..allowed
        };
        check_preflight(
            &pre,
            &format!("list, OPTIONS {path} allowed origin"),
            &allowed_pre,
            &mut problems,
        );

        // Policy list, another origin or none: only `vary: origin`.
        for origin in [Some(EVIL), None] {
            let what = format!("list, GET {path} origin {origin:?}");
            check(
                &actual(&listed.proxy, path, origin).await,
                &what,
                &none,
                &mut problems,
            );
            let pre = preflight(&listed.proxy, path, origin).await;
            check_preflight(
                &pre,
                &format!("list, OPTIONS {path} origin {origin:?}"),
                &none,
                &mut problems,
            );
        }
    }
    assert!(
        problems.is_empty(),
        "{} CORS difference(s) from the spec:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

fn check_preflight(resp: &Resp, what: &str, want: &Want, problems: &mut Vec<String>) {
    if resp.status != 204 || !resp.body.is_empty() {
        problems.push(format!(
            "{what}: status {} body {:?}, want 204 and empty",
            resp.status,
            resp.text()
        ));
    }
    check(resp, what, want, problems);
}
