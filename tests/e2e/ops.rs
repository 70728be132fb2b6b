//! Operations: graceful shutdown with open streams and sockets, local mode from a rules file.

use std::time::{Duration, Instant};

use rollgate_proxy_tests::sse::StreamEnd;
use rollgate_proxy_tests::target::{ProxyConfig, TempDir};
use serde_json::json;

use crate::common::*;
use crate::websocket;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(sigterm_ends_streams_cleanly_and_exits_zero),
        scenario!(local_mode_serves_and_pushes_file_edits),
    ]
}

async fn sigterm_ends_streams_cleanly_and_exits_zero() {
    if !target().is_process() {
        println!(
            "(skipped on this target: a Worker gets no SIGTERM; Cloudflare ends its streams on \
             deploys and evictions, and clients reconnect after retry:)"
        );
        return;
    }
    let bound = Duration::from_secs(3);
    let mut env = Env::with(rollgate_proxy_tests::mock::MockConfig::basic(), |c| {
        c.shutdown_timeout = Some(bound)
    })
    .await;
    let mut clients = Vec::new();
    for path in [
        "/api/stream",
        "/api/v1/sdk/stream",
        "/ofrep/v1/sse",
        "/api/stream?user_id=u-1",
    ] {
        let mut c = sse(&env.url(path)).await;
        let _ = collect_for(&mut c, Duration::from_millis(100)).await;
        clients.push(c);
    }
    // A WebSocket outlives the HTTP connection it upgraded: shutdown still waits for its close.
    let mut socket = websocket::must_open(&env.url("/api/stream")).await;
    let _ = websocket::next_text(&mut socket).await;
    let port = env.proxy.port();
    let t0 = Instant::now();
    env.proxy.terminate().unwrap();
    let close = websocket::next_close(&mut socket, bound + Duration::from_secs(2)).await;
    assert_eq!(u16::from(close.code), 1001, "going away: {close:?}");
    assert_eq!(close.reason.as_str(), "shutting down");
    for c in &mut clients {
        let end = c
            .wait_end(bound + Duration::from_secs(2))
            .await
            .expect("the stream ends on SIGTERM");
        assert_eq!(
            end,
            StreamEnd::Clean,
            "streams end with a terminating chunk"
        );
    }
    let status = env
        .proxy
        .wait_exit(bound + Duration::from_secs(3))
        .await
        .expect("exits within the shutdown bound");
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took < bound + Duration::from_secs(1),
        "shutdown took {took:?}"
    );
    // Nothing listens any more.
    let refused = http()
        .get(format!("http://127.0.0.1:{port}/live"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "connection after exit: {refused:?}");
    // The upstream stream was closed too.
    env.mock
        .wait_for_open_streams(0, Duration::from_secs(3))
        .await
        .expect("the upstream stream closes on shutdown");
}

async fn local_mode_serves_and_pushes_file_edits() {
    if !target().is_process() {
        println!(
            "(skipped on this target: a Worker has no file system; local mode serves \
             examples/flags.json, built into the Worker)"
        );
        return;
    }
    let dir = TempDir::new("local").unwrap();
    let file = dir.join("flags.json");
    let rules = |beta: bool| {
        json!({"version":"1","flags":{
            "dark-mode":{"key":"dark-mode","enabled":true,"rollout":100},
            "beta":{"key":"beta","enabled":beta,"rollout":100},
            "vip":{"key":"vip","enabled":true,"rollout":0,"targetUsers":["vip-1"]}
        }})
        .to_string()
    };
    std::fs::write(&file, rules(false)).unwrap();
    let proxy = start_proxy(ProxyConfig {
        flags_file: Some(file.clone()),
        ..ProxyConfig::default()
    })
    .await;
    wait_ready(&proxy).await;
    let h = must_get(&proxy.url("/api/health")).await.expect_json(200);
    assert_eq!(h["source"], "local", "{h}");
    assert_eq!(
        served_flags(&proxy, "").await,
        bools(&[("beta", false), ("dark-mode", true), ("vip", false)])
    );
    assert_eq!(served_flags(&proxy, "?user_id=vip-1").await["vip"], true);

    let mut stream = sse(&proxy.url("/api/stream")).await;
    next_event(&mut stream, Duration::from_secs(3)).await;
    // Replace the file as editors do (write elsewhere, rename over).
    let tmp = dir.join("flags.json.tmp");
    std::fs::write(&tmp, rules(true)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let ev = event_where(&mut stream, Duration::from_secs(5), |e| {
        e.json().is_ok_and(|v| v["beta"] == true)
    })
    .await;
    assert_eq!(ev.event, "flags");
    // A broken edit keeps the last good flags.
    std::fs::write(&file, "{ not json").unwrap();
    let url = proxy.url("/api/health");
    eventually(
        "the broken edit reported",
        Duration::from_secs(10),
        || async {
            let h = get(&url).await.ok()?.json();
            h["upstream"]["lastError"].is_string().then_some(())
        },
    )
    .await;
    assert_eq!(served_flags(&proxy, "").await["beta"], true);
    assert_eq!(must_get(&proxy.url("/ready")).await.status, 200);
}
