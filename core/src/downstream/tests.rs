//! Table-driven tests of the dispatcher: every route, and the per-user path on a simulated clock.

use std::time::Duration;

use super::*;
use crate::model::RulesPayload;
use crate::snapshot::FlagSource;
use crate::stream::{Next, StreamKind};
use crate::users::Lookup;

const FLAGS_FILE: &[u8] = include_bytes!("../../../examples/flags.json");

fn settings(pairs: &[(&str, &str)]) -> Settings {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Settings::from_lookup(
        |spec| {
            pairs
                .iter()
                .find(|(k, _)| k == spec.env)
                .map(|(_, v)| v.clone())
        },
        1,
    )
    .unwrap()
}

fn local() -> Downstream {
    Downstream::new(settings(&[]))
}

fn upstream(extra: &[(&str, &str)]) -> Downstream {
    let mut pairs = vec![("ROLLGATE_API_KEY", "rg_server_test")];
    pairs.extend_from_slice(extra);
    Downstream::new(settings(&pairs))
}

fn rules() -> Arc<Snapshot> {
    let payload = RulesPayload::from_json(FLAGS_FILE).unwrap();
    Arc::new(Snapshot::build(
        Revision::new(1),
        Timestamp::from_millis(1_000),
        FlagSource::rules(&payload),
    ))
}

fn evaluated() -> Arc<Snapshot> {
    let flags = EvaluatedFlags::from_json(br#"{"flags":{"a":true,"b":false}}"#).unwrap();
    Arc::new(Snapshot::build(
        Revision::new(2),
        Timestamp::ZERO,
        FlagSource::Evaluated(flags),
    ))
}

fn get<'a>(path: &'a str, query: &'a str) -> Request<'a> {
    Request {
        method: "GET",
        path,
        query,
        ..Request::default()
    }
}

fn post<'a>(path: &'a str, body: &'a [u8]) -> Request<'a> {
    Request {
        method: "POST",
        path,
        body,
        ..Request::default()
    }
}

fn answer(d: &Downstream, request: &Request<'_>, snapshot: Option<&Arc<Snapshot>>) -> Answer {
    d.handle(
        Timestamp::from_millis(5_000),
        request,
        snapshot,
        Freshness::Fresh,
        0.5,
    )
}

fn respond(answer: Answer) -> ApiResponse {
    match answer {
        Answer::Respond(response) => response,
        other => panic!("expected a response, got {other:?}"),
    }
}

fn text(response: &ApiResponse) -> &str {
    std::str::from_utf8(&response.body).unwrap()
}

#[test]
fn every_route_answers_as_documented() {
    let d = local();
    let s = rules();
    // (method, path, query, body, status, a substring of the body)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [u8], u16, &'a str);
    let table: &[Case<'_>] = &[
        ("GET", "/api/flags", "", b"", 200, r#""dark-mode":true"#),
        (
            "POST",
            "/api/flags",
            "",
            br#"{"user":{"id":"u1"}}"#,
            200,
            r#""flags":{"#,
        ),
        ("POST", "/api/flags", "", b"{", 400, "INVALID_CONTEXT"),
        (
            "GET",
            "/api/flags/dark-mode",
            "",
            b"",
            200,
            r#"{"key":"dark-mode","enabled":true}"#,
        ),
        ("GET", "/api/flags/nope", "", b"", 200, r#""enabled":false"#),
        (
            "GET",
            "/api/flags/bad%20key",
            "",
            b"",
            400,
            "INVALID_FLAG_KEY",
        ),
        (
            "GET",
            "/api/v1/sdk/flags",
            "withReasons=true",
            b"",
            200,
            r#""reasons""#,
        ),
        (
            "POST",
            "/ofrep/v1/evaluate/flags/dark-mode",
            "",
            b"{}",
            200,
            r#""value":true"#,
        ),
        (
            "POST",
            "/ofrep/v1/evaluate/flags/zz",
            "",
            b"{}",
            404,
            "FLAG_NOT_FOUND",
        ),
        (
            "POST",
            "/ofrep/v1/evaluate/flags",
            "",
            b"{",
            400,
            "PARSE_ERROR",
        ),
        (
            "POST",
            "/ofrep/v1/evaluate/flags",
            "",
            b"{}",
            200,
            r#""requestUri":"/ofrep/v1/sse""#,
        ),
        (
            "POST",
            "/api/v1/sdk/identify",
            "",
            br#"{"user":{"id":"u1"}}"#,
            200,
            r#"{"success":true}"#,
        ),
        (
            "POST",
            "/api/v1/sdk/identify",
            "",
            br#"{"user":{"email":"a@x"}}"#,
            400,
            "INVALID_CONTEXT",
        ),
        (
            "POST",
            "/api/v1/sdk/identify",
            "",
            b"",
            400,
            "INVALID_CONTEXT",
        ),
        (
            "POST",
            "/api/v1/sdk/events",
            "",
            br#"{"events":[{},{}]}"#,
            200,
            r#"{"received":2}"#,
        ),
        ("POST", "/api/v1/sdk/events", "", b"[]", 400, "BAD_REQUEST"),
        (
            "POST",
            "/api/v1/sdk/telemetry",
            "",
            br#"{"evaluations":{"a":{"total":3}}}"#,
            200,
            r#"{"received":3}"#,
        ),
        ("GET", "/health", "", b"", 200, r#"{"status":"ok"}"#),
        ("GET", "/live", "", b"", 200, r#"{"status":"ok"}"#),
        ("GET", "/ready", "", b"", 200, r#"{"status":"ready"}"#),
        ("GET", "/", "", b"", 200, "<html"),
        ("GET", "/demo.css", "", b"", 200, ""),
        ("GET", "/nope", "", b"", 404, "NOT_FOUND"),
        ("DELETE", "/api/flags", "", b"", 405, "METHOD_NOT_ALLOWED"),
    ];
    for (method, path, query, body, status, needle) in table {
        let request = Request {
            method,
            path,
            query,
            body,
            ..Request::default()
        };
        let response = respond(answer(&d, &request, Some(&s)));
        assert_eq!(
            response.status,
            *status,
            "{method} {path}: {}",
            text(&response)
        );
        assert!(
            text(&response).contains(needle),
            "{method} {path}: {}",
            text(&response)
        );
    }
}

#[test]
fn no_data_is_503_for_data_routes_but_streams_open() {
    let d = local();
    for path in ["/api/flags", "/api/v1/sdk/flags", "/ready"] {
        let response = respond(answer(&d, &get(path, ""), None));
        assert_eq!(response.status, 503, "{path}");
        assert!(response.headers.contains(&("Retry-After", "1".to_owned())));
    }
    assert!(matches!(
        answer(&d, &get("/api/stream", ""), None),
        Answer::Stream { .. }
    ));
    assert!(matches!(
        answer(&d, &get("/api/health", ""), None),
        Answer::Health
    ));
    assert!(matches!(
        answer(&d, &get("/api/metrics", ""), None),
        Answer::Metrics
    ));
}

#[test]
fn client_keys_guard_data_routes_only() {
    let d = Downstream::new(settings(&[("ROLLGATE_PROXY_CLIENT_KEYS", "k1,k 2")]));
    let s = rules();
    assert_eq!(
        respond(answer(&d, &get("/api/flags", ""), Some(&s))).status,
        401
    );
    assert_eq!(
        respond(answer(&d, &get("/api/flags", "token=k1"), Some(&s))).status,
        200
    );
    assert_eq!(respond(answer(&d, &get("/live", ""), Some(&s))).status, 200);
    assert!(matches!(
        answer(&d, &get("/api/health", ""), Some(&s)),
        Answer::Health
    ));
    // OFREP's bulk answer hands the caller's key on in its event stream URL.
    let request = Request {
        api_key: Some("k 2"),
        ..post("/ofrep/v1/evaluate/flags", b"{}")
    };
    let bulk = respond(answer(&d, &request, Some(&s)));
    assert!(
        text(&bulk).contains("/ofrep/v1/sse?token=k+2"),
        "{}",
        text(&bulk)
    );
    let Answer::Stream { client_key, .. } = answer(&d, &get("/api/stream", "token=k1"), Some(&s))
    else {
        panic!("a stream");
    };
    assert_eq!(client_key.as_deref(), Some("k1"));
}

#[test]
fn identify_merges_attributes_capped_and_is_forwarded_upstream() {
    let d = upstream(&[]);
    let s = rules();
    let identify = post(
        "/api/v1/sdk/identify",
        br#"{"user":{"id":"u1","attributes":{"plan":"enterprise","seats":80}}}"#,
    );
    let Answer::Forward(forward) = answer(&d, &identify, Some(&s)) else {
        panic!("identify is forwarded in upstream mode");
    };
    assert_eq!(forward.path(), "/api/v1/sdk/identify");
    assert_eq!(forward.user_id.as_deref(), Some("u1"));
    assert_eq!(text(&forward.response), r#"{"success":true}"#);
    let merged = d.merge_identity(Context::with_id("u1"));
    assert_eq!(merged.attribute("plan").as_deref(), Some("enterprise"));
    // 64 attributes of the request's own leave no room for the stored ones.
    let query: String = (0..64)
        .map(|i| format!("attr.a{i:02}=x&"))
        .collect::<String>()
        + "user_id=u1";
    let Resolved::Flags(flags) = d.resolve(&s, api::context_from_query(&query).unwrap()) else {
        panic!("rules mode evaluates locally");
    };
    let Resolved::Flags(with_plan) = d.resolve(&s, Context::with_id("u1")) else {
        panic!("rules mode evaluates locally");
    };
    assert!(
        with_plan.flags["ai-assistant"],
        "the stored attributes are merged"
    );
    assert!(
        !flags.flags["ai-assistant"],
        "the cap dropped the stored attributes"
    );
    // Local mode answers without forwarding.
    assert!(matches!(
        answer(&local(), &identify, Some(&s)),
        Answer::Respond(_)
    ));
    // No user id: 400 and nothing to forward.
    let bad = post("/api/v1/sdk/identify", br#"{"user":{}}"#);
    assert_eq!(respond(answer(&d, &bad, Some(&s))).status, 400);
}

#[test]
fn evaluated_mode_asks_for_user_flags_through_the_cache() {
    let d = upstream(&[("ROLLGATE_PROXY_REFRESH_INTERVAL", "30s")]);
    let s = evaluated();
    let now = Timestamp::from_millis(10_000);
    // No user id: the snapshot's own answer.
    let response = respond(answer(&d, &get("/api/flags", "attr.plan=pro"), Some(&s)));
    assert_eq!(&response.body, s.flags_body());
    let Answer::NeedUserFlags(pending) = answer(&d, &get("/api/flags/a", "user_id=u1"), Some(&s))
    else {
        panic!("evaluated mode needs the user's flags");
    };
    assert_eq!(pending.user_id(), "u1");
    let Lookup::Fetch { ticket, .. } = d.user_lookup(now, "u1", pending.revision()) else {
        panic!("first lookup fetches");
    };
    assert!(matches!(
        d.user_lookup(now, "u1", pending.revision()),
        Lookup::Wait { .. }
    ));
    let user = EvaluatedFlags::from_json(br#"{"flags":{"a":false}}"#).unwrap();
    let flags = d.user_fetched(now, "u1", ticket, Some(user));
    let response = d.finish(pending, &flags);
    assert_eq!(text(&response), r#"{"key":"a","enabled":false}"#);
    assert!(matches!(
        d.user_lookup(
            now.saturating_add(Duration::from_secs(29)),
            "u1",
            s.revision()
        ),
        Lookup::Fresh(_)
    ));
    // After the TTL a failing upstream serves the stale answer; for an unknown user, 502.
    let later = now.saturating_add(Duration::from_secs(31));
    let Lookup::Fetch { ticket, .. } = d.user_lookup(later, "u1", s.revision()) else {
        panic!("expired: fetch again");
    };
    assert!(matches!(
        d.user_fetched(later, "u1", ticket, None),
        UserFlags::Stale(_)
    ));
    let Answer::NeedUserFlags(pending) = answer(&d, &get("/api/flags", "user_id=u2"), Some(&s))
    else {
        panic!("needs u2");
    };
    let Lookup::Fetch { ticket, .. } = d.user_lookup(later, "u2", s.revision()) else {
        panic!("fetch u2");
    };
    let unavailable = d.user_fetched(later, "u2", ticket, None);
    assert_eq!(d.finish(pending, &unavailable).status, 502);
    // An identify drops the user's cached answer.
    let _ = answer(
        &d,
        &post("/api/v1/sdk/identify", br#"{"user":{"id":"u1"}}"#),
        Some(&s),
    );
    assert!(matches!(
        d.user_lookup(later, "u1", s.revision()),
        Lookup::Fetch { .. }
    ));
}

#[test]
fn streams_get_a_subscriber_with_the_requests_context() {
    let d = local();
    let s = rules();
    let request = Request {
        last_event_id: Some(s.event_id()),
        ..get("/api/v1/sdk/stream", "user_id=u1&attr.plan=pro")
    };
    let Answer::Stream { mut subscriber, .. } = answer(&d, &request, Some(&s)) else {
        panic!("a stream");
    };
    assert_eq!(subscriber.kind(), StreamKind::Sdk);
    assert!(subscriber.is_per_user());
    assert_eq!(subscriber.on_snapshot(&s), Next::Nothing);
    let Next::Resolve(context) = subscriber.on_snapshot(&s) else {
        panic!("per-user frames are resolved");
    };
    assert_eq!(context.attribute("plan").as_deref(), Some("pro"));
    let bad = respond(answer(&d, &get("/api/stream", "attr.=x"), Some(&s)));
    assert_eq!(bad.status, 400);
}

#[test]
fn health_and_metrics_render_the_adapters_state() {
    let d = local();
    let s = rules();
    let now = Timestamp::from_millis(3_000);
    let source = SourceReport::Local {
        last_error: None,
        loaded_at: Some(Timestamp::from_millis(1_000)),
    };
    let health = d.health(now, Some(&s), &source, None);
    let value: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    assert_eq!(value["status"], "healthy");
    assert_eq!(value["source"], "local");
    assert_eq!(value["dataAgeMs"], 2000);
    assert_eq!(value["upstream"]["stream"], "disabled");
    let missing = d.health(now, None, &source, None);
    assert!(text(&missing).contains(r#""status":"degraded""#));
    let _ = answer(&d, &get("/api/flags", ""), Some(&s));
    let metrics = d.metrics(now, Some(&s), &source, MetricsExtra::default());
    assert_eq!(metrics.content_type, Some(METRICS_CONTENT_TYPE));
    assert!(text(&metrics).contains("rollgate_proxy_cache_requests_total{result=\"hit\"} 1\n"));
    assert!(text(&metrics).contains("rollgate_proxy_snapshot_age_seconds 2\n"));
}

#[test]
fn overload_answers_are_jittered_and_spare_probes() {
    let d = local();
    let low = d.overloaded(0.0);
    let high = d.overloaded(0.999);
    assert_eq!(low.status, 503);
    assert!(text(&low).contains("OVERLOADED"));
    assert!(low.headers.contains(&("Retry-After", "1".to_owned())));
    assert!(high.headers.contains(&("Retry-After", "5".to_owned())));
    for probe in [
        Route::Live,
        Route::Ready,
        Route::Health,
        Route::Metrics,
        Route::RootHealth,
    ] {
        assert!(!probe.is_sheddable(), "{probe:?}");
    }
    assert!(Route::Flags.is_sheddable());
    let metrics = d.metrics(
        Timestamp::ZERO,
        None,
        &SourceReport::Local {
            last_error: None,
            loaded_at: None,
        },
        MetricsExtra {
            shard_clients: vec![(1, 3)],
            ..MetricsExtra::default()
        },
    );
    assert!(text(&metrics).contains("rollgate_proxy_shed_total 2\n"));
    assert!(text(&metrics).contains("rollgate_proxy_sse_shard_clients{shard=\"1\"} 3\n"));
}

#[test]
fn snapshot_writes_are_rendered_only_where_snapshots_are_persisted() {
    let d = local();
    let source = SourceReport::Local {
        last_error: None,
        loaded_at: None,
    };
    let none = d.metrics(Timestamp::ZERO, None, &source, MetricsExtra::default());
    let none = text(&none);
    assert!(!none.contains("snapshot_persisted_revision"), "{none}");
    assert!(!none.contains("snapshot_persist_failures_total"), "{none}");
    let written = d.metrics(
        Timestamp::ZERO,
        None,
        &source,
        MetricsExtra {
            persisted: Some(crate::metrics::PersistReport {
                revision: 7,
                failures: 2,
            }),
            ..MetricsExtra::default()
        },
    );
    let written = text(&written);
    assert!(
        written.contains(
            "# TYPE rollgate_proxy_snapshot_persisted_revision gauge\n\
             rollgate_proxy_snapshot_persisted_revision 7\n"
        ),
        "{written}"
    );
    assert!(
        written.contains(
            "# TYPE rollgate_proxy_snapshot_persist_failures_total counter\n\
             rollgate_proxy_snapshot_persist_failures_total 2\n"
        ),
        "{written}"
    );
}

#[test]
fn rules_mode_answers_are_rendered_once_per_revision_and_context() {
    let d = local();
    let snapshot = rules();
    let header = |r: &ApiResponse, name: &str| {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    };
    let query = "user_id=u1&attr.plan=pro&attr.country=NL";
    let first = respond(answer(&d, &get("/api/flags", query), Some(&snapshot)));
    let again = respond(answer(&d, &get("/api/flags", query), Some(&snapshot)));
    assert_eq!(first.status, 200);
    // The second poll is the first one's bytes, from the cache.
    assert_eq!(first, again);
    let stats = lock(&d.rendered).stats();
    assert_eq!((stats.hits, stats.misses), (1, 1));
    // The body is the evaluation's, exactly as before the cache.
    let context = api::context_from_query(query).unwrap();
    let flags = snapshot.rules().unwrap().evaluate_all(&context).to_flags();
    assert_eq!(
        first.body,
        crate::render::flags_body(&flags, snapshot.cached_at())
    );
    // The ETag is per content and context, never the anonymous one, and gives 304s.
    let etag = header(&first, "ETag").unwrap();
    assert_ne!(etag, snapshot.etag());
    let revalidate = Request {
        if_none_match: Some(&etag),
        ..get("/api/flags", query)
    };
    let not_modified = respond(answer(&d, &revalidate, Some(&snapshot)));
    assert_eq!((not_modified.status, not_modified.body.len()), (304, 0));
    // The SDK route of the same context shares the ETag, with its own body.
    let sdk = respond(answer(
        &d,
        &get("/api/v1/sdk/flags", query),
        Some(&snapshot),
    ));
    assert_eq!(header(&sdk, "ETag"), Some(etag.clone()));
    assert_eq!(sdk.body, crate::render::sdk_flags_body(&flags, false));
    let reasons = respond(answer(
        &d,
        &get("/api/v1/sdk/flags", &format!("{query}&withReasons=true")),
        Some(&snapshot),
    ));
    assert_eq!(reasons.body, crate::render::sdk_flags_body(&flags, true));
    // Another user: another tag.
    let other = respond(answer(
        &d,
        &get("/api/flags", "user_id=u2&attr.plan=pro&attr.country=NL"),
        Some(&snapshot),
    ));
    assert_ne!(header(&other, "ETag"), Some(etag.clone()));
    // New content: a miss and a new tag (the old one no longer gives a 304).
    let payload =
        RulesPayload::from_json(br#"{"flags":{"new-checkout":{"enabled":true,"rollout":100}}}"#)
            .unwrap();
    let changed = Arc::new(Snapshot::build(
        Revision::new(2),
        Timestamp::from_millis(2_000),
        FlagSource::rules(&payload),
    ));
    let after = respond(answer(&d, &revalidate, Some(&changed)));
    assert_eq!(after.status, 200);
    assert_ne!(header(&after, "ETag"), Some(etag));
    assert_eq!(lock(&d.rendered).len(), 1);
    // The metrics count what the cache did (the 304 was a hit too).
    let scrape = d.metrics(
        Timestamp::from_millis(5_000),
        Some(&changed),
        &SourceReport::Local {
            last_error: None,
            loaded_at: None,
        },
        MetricsExtra::default(),
    );
    assert!(
        text(&scrape).contains("rollgate_proxy_rendered_cache_total{result=\"hit\"} 2"),
        "{}",
        text(&scrape)
    );
}

#[test]
fn a_streaming_user_this_instance_does_not_track_is_tracked_again_and_reported_so() {
    // A Worker relay after a restart: shards still hold user streams it never saw open.
    let d = upstream(&[]);
    let now = Timestamp::from_millis(1_000);
    assert!(
        d.user_stream_seen("u1"),
        "unknown here: tracked again, and said so"
    );
    assert!(
        !d.user_stream_seen("u1"),
        "known now: its cached answer is kept current"
    );
    // Tracked for real: the next change queues its refresh.
    assert!(d.upstream_changed(now, 1));
    let (refresh, _ticket) = d.poll_refresh(now, &evaluated()).expect("u1 is refreshed");
    assert_eq!(refresh.user_id, "u1");
    // Counted short (two streams, seen as one): the first close untracks the user, and the
    // next request of its other stream is told again.
    assert!(d.user_stream_seen("u2"));
    d.user_stream_closed("u2");
    assert!(d.user_stream_seen("u2"));
}
