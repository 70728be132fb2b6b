//! Scaling out: three replicas behind one upstream hold exactly three upstream streams and all
//! deliver a change; a proxy whose upstream is another proxy serves and streams the same flags.

use std::time::Duration;

use rollgate_proxy_tests::mock::MockConfig;
use rollgate_proxy_tests::sse::SseClient;
use rollgate_proxy_tests::target::{ProxyConfig, ProxyHandle};
use serde_json::Value;

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(three_replicas_three_upstream_streams_one_change_each),
        scenario!(a_proxy_chained_behind_a_proxy_serves_and_streams_the_same),
    ]
}

/// Whether the selected target can run several independent replicas (native processes). A
/// Worker deployment has one relay object per environment, so "replicas" means nothing there.
fn native_only(what: &str) -> bool {
    if target().is_process() {
        return true;
    }
    println!("(skipped on this target: {what} runs native replicas)");
    false
}

/// Reads the first frames of a stream (the snapshot) and returns the client ready for changes.
async fn subscribed(url: String) -> SseClient {
    let mut client = sse(&url).await;
    next_event(&mut client, Duration::from_secs(10)).await;
    client
}

/// Whether an event of any of the three streams carries `key` = true (or is an OFREP refetch).
fn announces(event_data: &Value, key: &str) -> bool {
    event_data[key] == true || event_data["flags"][key] == true
}

async fn three_replicas_three_upstream_streams_one_change_each() {
    if !native_only("three replicas") {
        return;
    }
    let mock = mock(MockConfig::basic()).await;
    let mut replicas: Vec<ProxyHandle> = Vec::new();
    for _ in 0..3 {
        replicas.push(start_proxy(proxy_config(&mock)).await);
    }
    for replica in &replicas {
        wait_ready(replica).await;
    }
    mock.wait_for_open_streams(3, Duration::from_secs(10))
        .await
        .expect("each replica holds its own upstream stream");

    // Clients spread over every replica and both push APIs.
    let mut clients = Vec::new();
    for replica in &replicas {
        for path in ["/api/stream", "/api/stream", "/api/v1/sdk/stream"] {
            clients.push(subscribed(replica.url(path)).await);
        }
    }
    let stats = mock.stats();
    assert_eq!(
        (stats.open_streams, stats.streams_accepted),
        (3, 3),
        "9 clients on 3 replicas still make 3 upstream streams: {stats:?}"
    );

    mock.set_flag("replicated", true);
    for (i, client) in clients.iter_mut().enumerate() {
        let event = event_where(client, Duration::from_secs(10), |e| {
            e.json().is_ok_and(|v| announces(&v, "replicated"))
        })
        .await;
        assert!(
            matches!(event.event.as_str(), "flags" | "init"),
            "client {i}: {event:?}"
        );
    }
    // One change is one event per client: nothing else arrives for it.
    for (i, client) in clients.iter_mut().enumerate() {
        let (events, _) = collect_for(client, Duration::from_millis(300)).await;
        assert!(
            events.is_empty(),
            "client {i} got more after the change: {events:?}"
        );
    }
    for replica in &replicas {
        wait_served(replica, "replicated", true, Duration::from_secs(5)).await;
    }
    let stats = mock.stats();
    assert_eq!(
        (stats.open_streams, stats.streams_accepted),
        (3, 3),
        "no replica reconnected: {stats:?}"
    );
}

async fn a_proxy_chained_behind_a_proxy_serves_and_streams_the_same() {
    if !native_only("the chain") {
        return;
    }
    const CHAIN_KEY: &str = "ck_chain-2f8e";
    let mock = mock(MockConfig::basic()).await;
    // The inner proxy holds Rollgate's key and lets the outer one in with a client key.
    let inner = start_proxy(ProxyConfig {
        client_keys: vec![CHAIN_KEY.to_owned()],
        ..proxy_config(&mock)
    })
    .await;
    wait_ready(&inner).await;
    // The outer proxy treats the inner one as its Rollgate: the client key is its server key.
    let outer = start_proxy(ProxyConfig {
        refresh_interval: Some(Duration::from_secs(2)),
        ..ProxyConfig::upstream(inner.base_url(), CHAIN_KEY)
    })
    .await;
    wait_ready(&outer).await;

    let authorized = |req: reqwest::RequestBuilder| req.bearer_auth(CHAIN_KEY);
    let inner_flags = send(authorized(http().get(inner.url("/api/flags"))))
        .await
        .expect("inner /api/flags")
        .expect_json(200)["flags"]
        .clone();
    assert!(
        inner_flags.as_object().is_some_and(|f| !f.is_empty()),
        "{inner_flags}"
    );
    assert_eq!(
        served_flags(&outer, "").await,
        inner_flags,
        "same flags at both hops"
    );
    let inner_sdk = send(authorized(http().get(inner.url("/api/v1/sdk/flags"))))
        .await
        .expect("inner SDK flags")
        .expect_json(200)["flags"]
        .clone();
    let outer_sdk = must_get(&outer.url("/api/v1/sdk/flags"))
        .await
        .expect_json(200)["flags"]
        .clone();
    assert_eq!(outer_sdk, inner_sdk, "same SDK answer at both hops");

    // Rollgate sees only the inner proxy; the inner proxy sees the outer one as an SSE client.
    mock.wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .expect("one upstream stream at Rollgate");
    let health = inner.url("/api/health");
    eventually(
        "the outer proxy streams from the inner one",
        Duration::from_secs(10),
        || {
            let health = health.clone();
            async move { (must_get(&health).await.json()["sseClients"] == 1).then_some(()) }
        },
    )
    .await;

    let mut at_inner = sse_req(authorized(http().get(inner.url("/api/stream")))).await;
    next_event(&mut at_inner, Duration::from_secs(10)).await;
    let mut at_outer = subscribed(outer.url("/api/stream")).await;
    mock.set_flag("chained", true);
    let inner_event = event_where(&mut at_inner, Duration::from_secs(10), |e| {
        e.json().is_ok_and(|v| announces(&v, "chained"))
    })
    .await;
    let outer_event = event_where(&mut at_outer, Duration::from_secs(10), |e| {
        e.json().is_ok_and(|v| announces(&v, "chained"))
    })
    .await;
    assert_eq!(
        outer_event.json().unwrap(),
        inner_event.json().unwrap(),
        "the change arrives with the same flags at both hops"
    );
    assert_eq!(mock.stats().streams_accepted, 1, "{:?}", mock.stats());
}
