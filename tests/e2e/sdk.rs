//! The Rollgate SDK API as an SDK pointed at the proxy sees it: stream auth and keepalives,
//! identify / events / telemetry answers and their forwarding upstream.

use std::time::{Duration, Instant};

use rollgate_proxy_tests::mock::{MockConfig, Route};
use rollgate_proxy_tests::sse::{SseClient, SseError, SseItem};
use serde_json::{Value, json};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(sdk_stream_auth_and_default_keepalive),
        scenario!(identify_events_telemetry_reach_upstream),
    ]
}

const CLIENT_KEY: &str = "ck_e2e_sdk_1";

async fn sdk_stream_auth_and_default_keepalive() {
    // Default SDK keepalive (no override): it must be under the Python SDK's 5 s read timeout.
    let env = Env::with(MockConfig::basic(), |c| {
        c.client_keys = vec![CLIENT_KEY.into(), "ck_other".into()];
    })
    .await;
    let url = env.url("/api/v1/sdk/stream");

    // Node/Go/Java/.NET: ?token=
    let mut by_token = sse(&format!("{url}?token={CLIENT_KEY}&user_id=u-1")).await;
    let init = next_event(&mut by_token, Duration::from_secs(5)).await;
    assert_eq!(init.event, "init");
    assert!(init.json().unwrap()["flags"].is_object());

    // Python: Authorization: Bearer
    let mut by_bearer = sse_req(http().get(&url).bearer_auth(CLIENT_KEY)).await;
    let init = next_event(&mut by_bearer, Duration::from_secs(5)).await;
    assert_eq!(init.event, "init");

    for (what, req) in [
        ("no key", http().get(&url)),
        ("wrong token", http().get(format!("{url}?token=nope"))),
        ("wrong bearer", http().get(&url).bearer_auth("nope")),
    ] {
        match SseClient::open(req, Duration::from_secs(5)).await {
            Err(SseError::Status { status, body, .. }) => {
                assert_eq!(status, 401, "{what}");
                let body: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{what}");
            }
            other => panic!("{what}: expected 401, got {other:?}"),
        }
    }

    // A keepalive comment within 5 s of the init frame.
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(5).saturating_sub(t0.elapsed());
        match by_bearer.next_item(left).await {
            Ok(SseItem::Comment(_)) => break,
            Ok(SseItem::Event(e)) => {
                assert!(e.json().is_ok_and(|v| v["flags"].is_object()), "{e:?}");
            }
            Err(e) => panic!("no keepalive within 5 s: {e}"),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
}

async fn identify_events_telemetry_reach_upstream() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.events_flush_interval = Some(Duration::from_millis(300));
        c.telemetry_flush_interval = Some(Duration::from_millis(300));
    })
    .await;

    let identify = must_post(
        &env.url("/api/v1/sdk/identify"),
        r#"{"user":{"id":"sdk-user","email":"a@example.com","attributes":{"plan":"pro"}}}"#,
    )
    .await;
    assert_eq!(identify.expect_json(200), json!({"success":true}));

    let events = json!({"events":[
        {"flagKey":"enabled-flag","eventName":"checkout","userId":"sdk-user","timestamp":"2026-01-01T00:00:00.000Z"},
        {"flagKey":"enabled-flag","eventName":"view","userId":"sdk-user","timestamp":"2026-01-01T00:00:01.000Z","value":3.5},
        {"flagKey":"rollout-50","eventName":"click","userId":"sdk-user","timestamp":"2026-01-01T00:00:02.000Z","metadata":{"k":"v"}}
    ]});
    let answer = must_post(&env.url("/api/v1/sdk/events"), events.to_string()).await;
    assert_eq!(answer.expect_json(200), json!({"received":3}));

    let telemetry = json!({"evaluations":{
        "enabled-flag":{"total":5,"true":5,"false":0},
        "rollout-50":{"total":2,"true":1,"false":1}},"period_ms":60000});
    let answer = must_post(&env.url("/api/v1/sdk/telemetry"), telemetry.to_string()).await;
    assert_eq!(answer.expect_json(200), json!({"received":7}));

    // Bad batches are refused and not counted.
    must_post(&env.url("/api/v1/sdk/events"), r#"{"evnts":[]}"#)
        .await
        .expect_error(400, "BAD_REQUEST");
    must_post(&env.url("/api/v1/sdk/telemetry"), "[]")
        .await
        .expect_error(400, "BAD_REQUEST");

    // After the flush, upstream has every event and the telemetry totals.
    let mock = env.mock.control();
    eventually("events forwarded upstream", Duration::from_secs(5), || {
        let mock = mock.clone();
        async move { (mock.events().len() >= 3).then_some(()) }
    })
    .await;
    let got = env.mock.events();
    assert_eq!(got.len(), 3, "each event forwarded once: {got:?}");
    let names: Vec<&str> = got.iter().filter_map(|e| e["eventName"].as_str()).collect();
    assert_eq!(names, ["checkout", "view", "click"]);
    assert_eq!(got[1]["value"], 3.5);

    eventually(
        "telemetry forwarded upstream",
        Duration::from_secs(5),
        || {
            let mock = mock.clone();
            async move {
                let total: u64 = mock
                    .telemetry_bodies()
                    .iter()
                    .filter_map(|b| b["evaluations"].as_object())
                    .flat_map(|e| e.values())
                    .filter_map(|c| c["total"].as_u64())
                    .sum();
                (total >= 7).then_some(total)
            }
        },
    )
    .await;
    let per_flag = |key: &str| -> u64 {
        env.mock
            .telemetry_bodies()
            .iter()
            .filter_map(|b| b["evaluations"][key]["total"].as_u64())
            .sum()
    };
    assert_eq!(per_flag("enabled-flag"), 5);
    assert_eq!(per_flag("rollout-50"), 2);

    // Forwarded with the server key (the mock refuses anything else).
    for route in [Route::Events, Route::Telemetry] {
        let req = env.mock.last_request(route).expect("forwarded");
        assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {SERVER_KEY}").as_str())
        );
    }
    // Identify is forwarded upstream too (fire and forget).
    eventually(
        "identify forwarded upstream",
        Duration::from_secs(5),
        || {
            let mock = mock.clone();
            async move { mock.identified_user("sdk-user") }
        },
    )
    .await;
}
