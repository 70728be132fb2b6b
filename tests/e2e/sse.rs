//! The three streams: first frames, change latency (< 1 s), fan-out over one upstream stream,
//! the mock's stream modes, rules-full evaluation and Last-Event-ID.

use std::time::{Duration, Instant};

use rollgate_proxy_tests::mock::{MockConfig, Route, StreamMode};
use rollgate_proxy_tests::sse::SseClient;
use serde_json::{Value, json};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(rules_survive_a_slow_startup_fetch),
        scenario!(api_stream_first_frames_and_change_latency),
        scenario!(sdk_stream_init_and_change_latency),
        scenario!(ofrep_stream_change_latency),
        scenario!(one_upstream_stream_for_fifty_clients_and_after_restart),
        scenario!(mode_init),
        scenario!(mode_flags),
        scenario!(mode_flag_changed_refetches),
        scenario!(mode_flag_update),
        scenario!(rules_full_evaluates_like_the_sdks),
        scenario!(last_event_id_current_gets_no_snapshot),
        scenario!(a_client_that_goes_away_is_released),
    ]
}

/// How long a change took to reach the clients: printed as a figure, never asserted (a busy
/// machine is slow; the waits above are generous bounds on the condition). The latency
/// targets are measured by the benchmarks (`BENCHMARKS.md`).
fn report_latency(what: &str, took: Duration) {
    eprintln!("{what} in {took:?}");
}

async fn api_stream_first_frames_and_change_latency() {
    let env = Env::basic().await;
    let mut client = sse(&env.url("/api/stream")).await;
    assert_eq!(client.header("content-type"), Some("text/event-stream"));
    assert_eq!(client.header("cache-control"), Some("no-cache"));
    assert_eq!(client.header("x-accel-buffering"), Some("no"));
    let first = next_event(&mut client, Duration::from_secs(5)).await;
    // `retry:` first, 2000 ms jittered ±10 % per connection (so a herd does not return at once).
    let raw = String::from_utf8_lossy(client.raw()).into_owned();
    let retry: Option<u64> = raw
        .strip_prefix("retry: ")
        .and_then(|rest| rest.split('\n').next())
        .and_then(|ms| ms.parse().ok());
    assert!(
        retry.is_some_and(|ms| (1800..=2200).contains(&ms)),
        "retry first: {raw:?}"
    );
    assert_eq!(first.event, "flags");
    let first_id = first.id.clone().expect("id on the flags event");
    let (revision, hash) = first_id.split_once('-').expect("id is <revision>-<hash>");
    assert!(revision.parse::<u64>().is_ok(), "{first_id}");
    assert!(!hash.is_empty(), "{first_id}");
    let flags = first.json().unwrap();
    assert_eq!(
        flags,
        served_flags(&env.proxy, "").await,
        "data is the bare map"
    );

    let t0 = Instant::now();
    env.mock.set_flag("enabled-flag", false);
    let changed = event_where(&mut client, Duration::from_secs(5), |e| {
        e.json().is_ok_and(|v| v["enabled-flag"] == false)
    })
    .await;
    let took = t0.elapsed();
    report_latency("change reached /api/stream", took);
    assert_eq!(changed.event, "flags");
    assert_ne!(changed.id, Some(first_id), "a change gets a new id");
}

async fn sdk_stream_init_and_change_latency() {
    let env = Env::basic().await;
    let mut client = sse(&env.url("/api/v1/sdk/stream")).await;
    assert_eq!(client.header("content-type"), Some("text/event-stream"));
    let first = next_event(&mut client, Duration::from_secs(5)).await;
    assert_eq!(first.event, "init");
    let data = first.json().unwrap();
    assert_eq!(data["flags"]["enabled-flag"], true, "{data}");

    let t0 = Instant::now();
    env.mock.set_flag("sdk-new", true);
    let changed = event_where(&mut client, Duration::from_secs(5), |e| {
        e.json().is_ok_and(|v| v["flags"]["sdk-new"] == true)
    })
    .await;
    let took = t0.elapsed();
    report_latency("change reached the SDK stream", took);
    assert_eq!(changed.event, "init");
    // Never a data event without `flags` (the Python SDK would wipe its flags).
    let (events, _) = collect_for(&mut client, Duration::from_millis(300)).await;
    for e in events {
        assert!(e.json().is_ok_and(|v| v["flags"].is_object()), "{e:?}");
    }
}

async fn ofrep_stream_change_latency() {
    let env = Env::basic().await;
    let mut client = sse(&env.url("/ofrep/v1/sse")).await;
    assert_eq!(client.header("content-type"), Some("text/event-stream"));
    // Drain whatever the connect sends, then time the change.
    let _ = collect_for(&mut client, Duration::from_millis(300)).await;
    let t0 = Instant::now();
    env.mock.set_flag("ofrep-new", true);
    let ev = event_where(&mut client, Duration::from_secs(5), |e| {
        e.json().is_ok_and(|v| v["type"] == "refetchEvaluation")
    })
    .await;
    let took = t0.elapsed();
    report_latency("change reached /ofrep/v1/sse", took);
    assert_eq!(ev.event, "message");
    let data = ev.json().unwrap();
    assert!(data["etag"].is_string(), "{data}");
    assert!(data["lastModified"].is_u64(), "{data}");
    // The notification is true: the bulk evaluation now has the flag.
    let bulk = must_post(&env.url("/ofrep/v1/evaluate/flags"), "{}")
        .await
        .expect_json(200);
    let items = bulk["flags"].as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|i| i["key"] == "ofrep-new" && i["value"] == true),
        "{bulk}"
    );
}

async fn one_upstream_stream_for_fifty_clients_and_after_restart() {
    let mut env = Env::basic().await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(5))
        .await
        .expect("the proxy holds one upstream stream");
    let paths = ["/api/stream", "/api/v1/sdk/stream", "/ofrep/v1/sse"];
    let mut clients: Vec<SseClient> = futures_util::future::join_all((0..50).map(|i| {
        let url = env.url(paths[i % 3]);
        async move { sse(&url).await }
    }))
    .await;
    for c in &mut clients {
        next_event(c, Duration::from_secs(5)).await;
    }
    let stats = env.mock.stats();
    assert_eq!(stats.open_streams, 1, "{stats:?}");
    assert_eq!(stats.streams_accepted, 1, "{stats:?}");
    eventually("sseClients = 50", Duration::from_secs(3), || async {
        let h = must_get(&env.url("/api/health")).await.json();
        (h["sseClients"] == 50).then_some(())
    })
    .await;

    let t0 = Instant::now();
    env.mock.set_flag("fanout", true);
    let waits = clients.iter_mut().map(|c| async move {
        event_where(c, Duration::from_secs(5), |e| {
            e.json().is_ok_and(|v| {
                v["fanout"] == true || v["flags"]["fanout"] == true || v["type"].is_string()
            })
        })
        .await;
    });
    futures_util::future::join_all(waits).await;
    let took = t0.elapsed();
    report_latency("all 50 clients had the change", took);
    assert_eq!(env.mock.stats().streams_accepted, 1);
    drop(clients);

    env.proxy.restart().await.expect("restart");
    wait_ready(&env.proxy).await;
    env.mock
        .wait_until(Duration::from_secs(5), |s| {
            s.streams_accepted == 2 && s.open_streams == 1
        })
        .await
        .expect("after a restart: the old stream closed, exactly one new one");
    let mut again: Vec<SseClient> = futures_util::future::join_all((0..10).map(|_| {
        let url = env.url("/api/stream");
        async move { sse(&url).await }
    }))
    .await;
    for c in &mut again {
        let ev = next_event(c, Duration::from_secs(5)).await;
        assert_eq!(ev.json().unwrap()["fanout"], true);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = env.mock.stats();
    assert_eq!(
        (stats.open_streams, stats.streams_accepted),
        (1, 2),
        "{stats:?}"
    );
}

/// A mode scenario: change a flag at the mock, see it on `/api/stream` and `/api/flags`.
async fn mode(mode: StreamMode) -> Env {
    let env = Env::with(MockConfig::basic().stream_mode(mode), |_| {}).await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(5))
        .await
        .unwrap();
    let mut client = sse(&env.url("/api/stream")).await;
    next_event(&mut client, Duration::from_secs(5)).await;
    let t0 = Instant::now();
    env.mock.set_flag("enabled-flag", false);
    env.mock.set_flag("added-flag", true);
    event_where(&mut client, Duration::from_secs(5), |e| {
        e.json()
            .is_ok_and(|v| v["enabled-flag"] == false && v["added-flag"] == true)
    })
    .await;
    let took = t0.elapsed();
    report_latency(&format!("{mode:?}: change reached clients"), took);
    let flags = served_flags(&env.proxy, "").await;
    assert_eq!(flags["enabled-flag"], false, "{mode:?}: {flags}");
    assert_eq!(flags["added-flag"], true, "{mode:?}: {flags}");
    assert_eq!(
        flags["disabled-flag"], false,
        "{mode:?}: others kept: {flags}"
    );
    assert_eq!(flags["banner-text"], true, "{mode:?}: others kept: {flags}");
    env
}

async fn mode_init() {
    mode(StreamMode::Init).await;
}

async fn mode_flags() {
    mode(StreamMode::Flags).await;
}

async fn mode_flag_changed_refetches() {
    let env = mode(StreamMode::FlagChanged).await;
    // The notification made the proxy refetch, conditionally.
    let fetches = env.mock.requests_for(Route::Flags);
    assert!(fetches.len() >= 2, "initial fetch + refetch: {fetches:?}");
    assert!(
        fetches[1..]
            .iter()
            .any(|r| r.header("if-none-match").is_some()),
        "refetch carries If-None-Match: {fetches:?}"
    );
}

async fn mode_flag_update() {
    let env = Env::with(
        MockConfig::basic().stream_mode(StreamMode::FlagUpdate),
        |_| {},
    )
    .await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(5))
        .await
        .unwrap();
    let mut client = sse(&env.url("/api/stream")).await;
    next_event(&mut client, Duration::from_secs(5)).await;
    let flag_fetches = || {
        env.mock
            .requests_for(Route::Flags)
            .into_iter()
            .filter(|r| r.query_param("user_id").is_none())
            .count()
    };
    // Start-up may cost a second (conditional) fetch when the stream's snapshot races the
    // first one; what matters is that the merge itself costs none.
    let before = flag_fetches();
    env.mock.set_flag("enabled-flag", false);
    event_where(&mut client, Duration::from_secs(5), |e| {
        e.json().is_ok_and(|v| v["enabled-flag"] == false)
    })
    .await;
    let flags = served_flags(&env.proxy, "").await;
    assert_eq!(flags["banner-text"], true, "others kept: {flags}");
    assert_eq!(
        flag_fetches(),
        before,
        "flag-update is applied without a refetch"
    );
}

fn rules_payload() -> Value {
    json!({"version":"7","flags":{
        "rollout-50": {"key":"rollout-50","enabled":true,"rollout":50},
        "beta-users": {"key":"beta-users","enabled":true,"rollout":0,"targetUsers":["vip-1","vip-2"]},
        "pro-feature": {"key":"pro-feature","enabled":true,"rollout":0,"rules":[
            {"id":"pro","enabled":true,"rollout":100,
             "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]}]},
        "everyone": {"key":"everyone","enabled":true,"rollout":100},
        "killed": {"key":"killed","enabled":false,"rollout":100}
    }})
}

/// `basic` mock and proxy, then `rules` sent as `rules-full` on the open stream once the
/// start-up fetch is done; returns when the proxy reports rules mode.
pub(crate) async fn rules_env(rules: &Value) -> Env {
    let env = Env::basic().await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(5))
        .await
        .unwrap();
    env.mock.set_rules(rules);
    eventually("rules mode", Duration::from_secs(10), || async {
        let h = must_get(&env.url("/api/health")).await.json();
        (h["upstream"]["mode"] == "rules").then_some(())
    })
    .await;
    // The health mode is the upstream machine's; the served snapshot is published after it.
    // Wait until `/api/flags` serves exactly the rules' flag keys.
    let mut want: Vec<String> = rules["flags"]
        .as_object()
        .map(|flags| flags.keys().cloned().collect())
        .unwrap_or_default();
    want.sort();
    eventually(
        "the rules' flags served",
        Duration::from_secs(10),
        || async {
            let flags = served_flags(&env.proxy, "").await;
            let mut keys: Vec<String> = flags.as_object()?.keys().cloned().collect();
            keys.sort();
            (keys == want).then_some(())
        },
    )
    .await;
    env
}

async fn rules_full_evaluates_like_the_sdks() {
    let env = rules_env(&rules_payload()).await;
    let anon = served_flags(&env.proxy, "").await;
    assert_eq!(
        anon,
        bools(&[
            ("beta-users", false),
            ("everyone", true),
            ("killed", false),
            ("pro-feature", false),
            ("rollout-50", false),
        ]),
        "anonymous evaluation of the rules"
    );
    env.mock.clear_requests();
    // SDK vectors: sha256("rollout-50:consistent-user-123") → bucket 99, "…:user-1" → 32.
    let cases: &[(&str, &str, bool)] = &[
        ("?user_id=consistent-user-123", "rollout-50", false),
        ("?user_id=user-1", "rollout-50", true),
        ("?user_id=vip-1", "beta-users", true),
        ("?user_id=user-1", "beta-users", false),
        ("?user_id=u-9&attr.plan=pro", "pro-feature", true),
        ("?user_id=u-9&attr.plan=free", "pro-feature", false),
        ("?user_id=u-9", "killed", false),
    ];
    for (query, key, want) in cases {
        let flags = served_flags(&env.proxy, query).await;
        assert_eq!(flags[*key], *want, "{key} for {query}: {flags}");
    }
    let post = must_post(
        &env.url("/api/flags"),
        r#"{"user":{"id":"u-10","attributes":{"plan":"pro"}}}"#,
    )
    .await
    .expect_json(200);
    assert_eq!(post["flags"]["pro-feature"], true, "{post}");

    let sdk = must_get(&env.url("/api/v1/sdk/flags?withReasons=true&user_id=user-1"))
        .await
        .expect_json(200);
    assert_eq!(sdk["flags"]["rollout-50"], true);
    assert_eq!(
        sdk["reasons"]["rollout-50"],
        json!({"kind":"FALLTHROUGH","inRollout":true})
    );
    assert_eq!(sdk["reasons"]["beta-users"]["kind"], "FALLTHROUGH");
    let vip = must_get(&env.url("/api/v1/sdk/flags?withReasons=true&user_id=vip-2"))
        .await
        .expect_json(200);
    assert_eq!(vip["reasons"]["beta-users"], json!({"kind":"TARGET_MATCH"}));

    // Attributes stored with /identify are used for the SDK route's user_id.
    let ok = must_post(
        &env.url("/api/v1/sdk/identify"),
        r#"{"user":{"id":"ident-1","attributes":{"plan":"pro"}}}"#,
    )
    .await
    .expect_json(200);
    assert_eq!(ok, json!({"success":true}));
    let ident = must_get(&env.url("/api/v1/sdk/flags?user_id=ident-1"))
        .await
        .expect_json(200);
    assert_eq!(ident["flags"]["pro-feature"], true, "{ident}");

    // Per-user streams evaluate locally too.
    let mut stream = sse(&env.url("/api/stream?user_id=user-1")).await;
    let ev = next_event(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(ev.json().unwrap()["rollout-50"], true);

    // Rules mode answers every context locally: no per-user fetch upstream.
    let per_user: Vec<_> = env
        .mock
        .requests_for(Route::Flags)
        .into_iter()
        .filter(|r| r.query_param("user_id").is_some())
        .collect();
    assert!(
        per_user.is_empty(),
        "per-user upstream fetches: {per_user:?}"
    );
}

async fn last_event_id_current_gets_no_snapshot() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.keepalive = Some(Duration::from_millis(300));
    })
    .await;
    let mut first = sse(&env.url("/api/stream")).await;
    let ev = next_event(&mut first, Duration::from_secs(5)).await;
    let id = ev.id.expect("an id");
    drop(first);

    let mut again = sse_req(
        http()
            .get(env.url("/api/stream"))
            .header("last-event-id", &id),
    )
    .await;
    let (events, comments) = collect_for(&mut again, Duration::from_millis(1200)).await;
    assert!(
        events.is_empty(),
        "no snapshot for a current id: {events:?}"
    );
    assert!(comments >= 1, "keepalives keep flowing");
    // A change still arrives on that connection.
    env.mock.set_flag("after-resume", true);
    let ev = event_where(&mut again, Duration::from_secs(3), |_| true).await;
    assert_eq!(ev.json().unwrap()["after-resume"], true);

    // An old id gets the snapshot at once.
    let mut stale = sse_req(
        http()
            .get(env.url("/api/stream"))
            .header("last-event-id", &id),
    )
    .await;
    let ev = next_event(&mut stale, Duration::from_secs(3)).await;
    assert_eq!(ev.json().unwrap()["after-resume"], true);
}

/// Rollgate sends `rules-full` right after `init` on connect. When the start-up `/flags` answer
/// arrives after that (a slow `/flags`), it must not switch the proxy back to evaluated mode.
async fn rules_survive_a_slow_startup_fetch() {
    let mock = mock(MockConfig::basic().rules(&rules_payload())).await;
    mock.set_delay(Route::Flags, Duration::from_millis(400));
    let proxy = start_proxy(proxy_config(&mock)).await;
    wait_ready(&proxy).await;
    mock.wait_until(Duration::from_secs(5), |s| {
        s.flags_ok >= 1 && s.open_streams == 1
    })
    .await
    .unwrap();
    // Wait until the proxy has taken in the delayed start-up answer, then check the mode holds.
    wait_metric_at_least(
        &proxy,
        "rollgate_proxy_upstream_requests_total",
        "outcome=\"ok\"",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let h = must_get(&proxy.url("/api/health")).await.expect_json(200);
    assert_eq!(h["upstream"]["mode"], "rules", "{h}");
    let flags = served_flags(&proxy, "?user_id=user-1").await;
    assert_eq!(flags["rollout-50"], true, "SDK bucket 32 < 50: {flags}");
}

/// A client that closes its event stream is released (uncounted, its slot dropped): natively
/// when its connection ends; on the Worker once a write to it has failed (the runtime then
/// cancels the body, and a chunk can no longer be enqueued: either releases the slot), so
/// within about two keepalive intervals (1 s here). Two clients, so that the one left is still
/// served afterwards.
async fn a_client_that_goes_away_is_released() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.keepalive = Some(Duration::from_secs(1));
    })
    .await;
    let mut staying = sse(&env.url("/api/stream")).await;
    let mut leaving = sse(&env.url("/api/stream")).await;
    next_event(&mut staying, Duration::from_secs(5)).await;
    next_event(&mut leaving, Duration::from_secs(5)).await;
    let open = |want: f64| {
        let proxy = &env.proxy;
        async move {
            let open = metric_sum(proxy, "rollgate_proxy_sse_clients", "").await?;
            (open == want).then_some(())
        }
    };
    eventually("both streams counted", Duration::from_secs(30), || {
        open(2.0)
    })
    .await;
    drop(leaving);
    eventually(
        "the closed stream uncounted",
        Duration::from_secs(30),
        || open(1.0),
    )
    .await;
    env.mock.set_flag("enabled-flag", false);
    event_where(&mut staying, Duration::from_secs(10), |e| {
        e.json().is_ok_and(|v| v["enabled-flag"] == false)
    })
    .await;
}
