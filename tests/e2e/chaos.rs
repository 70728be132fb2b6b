//! The chaos suite: the proxy under an upstream that flaps, hangs and talks garbage, and under
//! clients that storm, never read, dribble or get cut off by a deploy. Every scenario asserts
//! that clients see no error (or the documented status) and that the proxy converges to the
//! upstream's final state.
//!
//! The suite is these scenarios plus the earlier ones named in [`EXISTING`] (they live beside
//! the features they test). `cargo test -p rollgate-proxy-tests --test e2e -- --chaos` runs
//! exactly the suite (`E2E_TARGET=edge` for the Worker); the full e2e run includes it.
//! Process-level scenarios (SIGTERM, the snapshot path, slow request heads, overload, memory)
//! are native-only and say so when skipped on the Worker.

use std::time::{Duration, Instant};

use rollgate_proxy_tests::mock::{FlagSet, MockConfig, MockUpstream, Route};
use rollgate_proxy_tests::sse::{SseClient, SseError, SseItem, StreamEnd};
use rollgate_proxy_tests::target::{ProxyConfig, ProxyHandle, TempDir};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::*;
use crate::{Scenario, scenario};

/// Scenarios of other modules that belong to the chaos suite, by what they cover.
pub(crate) const EXISTING: &[&str] = &[
    // Upstream down at start, without a snapshot: 503 NOT_READY + Retry-After, then ready.
    "resilience::not_ready_before_any_data",
    // Upstream down at start (a restart during an outage) with a persisted snapshot.
    "resilience::restart_while_upstream_down_serves_persisted_snapshot",
    // Upstream down during operation: last flags, same ETag, breaker open → closed.
    "resilience::outage_serves_last_flags_and_breaker_cycles",
    // 500s on every route.
    "resilience::upstream_500s_keep_serving",
    // Malformed data on the stream.
    "resilience::garbage_on_the_stream_changes_nothing",
    "upstream_faults::invalid_utf8_and_bad_keys_on_the_stream_change_nothing",
    // A rejected server key (401).
    "upstream_faults::a_rejected_key_is_reported_plainly",
    // Slow request heads closed without a response, over-long heads (native).
    "request_limits::long_uris_and_slow_heads_get_what_the_readme_says",
    // SIGTERM with open streams of every kind, with the log reader gone, right at start (native).
    "ops::sigterm_ends_streams_cleanly_and_exits_zero",
    "signals::sigterm_stops_a_proxy_whose_log_reader_is_gone",
    "signals::sigterm_the_moment_the_address_is_reported_exits_cleanly",
];

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(flapping_upstream_while_clients_stream),
        scenario!(a_hanging_upstream_changes_nothing_for_clients),
        scenario!(malformed_fetch_bodies_keep_the_last_flags),
        scenario!(a_reconnect_storm_is_served_by_one_upstream_stream),
        scenario!(never_reading_clients_stay_bounded_and_harmless),
        scenario!(slow_heads_and_bodies_do_not_starve_others),
        scenario!(overload_sheds_data_routes_but_never_probes),
        scenario!(sigterm_under_load_finishes_in_flight_requests),
        scenario!(an_unwritable_snapshot_path_serves_anyway),
    ]
}

/// Whether `name` (`module::function`, any crate prefix) is in the chaos suite.
pub(crate) fn in_suite(name: &str) -> bool {
    name.contains("::chaos::") || EXISTING.iter().any(|e| name.ends_with(&format!("::{e}")))
}

/// Native-only scenarios print why they skip on the Worker and return `false` there.
fn native_only(why: &str) -> bool {
    if target().is_process() {
        return true;
    }
    println!("(skipped on the Worker: {why})");
    false
}

/// Fast breaker and polling: outages are noticed and left within a second or two.
fn fast(c: &mut ProxyConfig) {
    c.refresh_interval = Some(Duration::from_millis(300));
    c.breaker_threshold = Some(2);
    c.breaker_window = Some(Duration::from_secs(30));
    c.breaker_open_timeout = Some(Duration::from_secs(1));
    c.breaker_success_threshold = Some(1);
}

/// Rollgate's own answer (the mock, asked directly with the server key): the `flags` object.
async fn upstream_flags(mock: &MockUpstream) -> Value {
    let resp = send(
        http()
            .get(format!("{}/api/v1/sdk/flags", mock.base_url()))
            .bearer_auth(SERVER_KEY),
    )
    .await
    .expect("the mock answers");
    resp.expect_json(200)["flags"].clone()
}

/// Waits until the proxy's `/api/flags` equals Rollgate's flags (after Rollgate's last change).
async fn wait_converged(proxy: &ProxyHandle, mock: &MockUpstream, timeout: Duration) -> Value {
    let want = upstream_flags(mock).await;
    let url = proxy.url("/api/flags");
    let expected = want.clone();
    eventually("the proxy's flags equal Rollgate's", timeout, || {
        let url = url.clone();
        let expected = expected.clone();
        async move {
            let resp = get(&url).await.ok()?;
            (resp.status == 200 && resp.json()["flags"] == expected).then_some(())
        }
    })
    .await;
    want
}

/// The revision of an SSE id (`<revision>-<hash>`).
fn revision(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("an SSE id is <revision>-<hash>: {id:?}"))
}

/// Reads `client` until a `flags` event equals `want`, checking that every event id moves
/// forward and that the stream never breaks; returns how many frames came.
async fn follow_until(
    client: &mut SseClient,
    want: &Value,
    timeout: Duration,
    last: &mut u64,
) -> usize {
    let deadline = Instant::now() + timeout;
    let mut frames = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = client.next_item(left).await;
        match item {
            Ok(SseItem::Comment(_)) => {}
            Ok(SseItem::Event(ev)) => {
                frames += 1;
                let id = ev.id.as_deref().expect("every frame has an id");
                let rev = revision(id);
                assert!(rev > *last, "ids move forward: {rev} after {}", *last);
                *last = rev;
                if ev.json().is_ok_and(|v| &v == want) {
                    return frames;
                }
            }
            Err(SseError::Timeout(_)) => panic!("no frame equal to {want} within {timeout:?}"),
            Err(e) => panic!("the stream broke: {e}"),
        }
    }
}

// ---- flapping -----------------------------------------------------------------------------

/// Rollgate goes down and comes back six times (refused connections, then connections closed
/// unanswered), changing flags while up and while down, as clients stream and poll. No client
/// sees an error; every stream's ids only move forward; everyone ends on Rollgate's flags.
async fn flapping_upstream_while_clients_stream() {
    let env = Env::with(MockConfig::basic(), fast).await;
    let clients = if target().is_process() { 8 } else { 4 };
    let mut streams = Vec::new();
    for _ in 0..clients {
        let mut c = sse(&env.url("/api/stream")).await;
        let first = next_event(&mut c, Duration::from_secs(10)).await;
        streams.push((c, revision(first.id.as_deref().expect("id"))));
    }
    // A poller all along: every answer is a 200 with flags.
    let stop = tokio_util_stop();
    let poll_url = env.url("/api/flags");
    let stop_rx = stop.subscribe();
    let poller = tokio::spawn(async move {
        let mut polls = 0u32;
        while !*stop_rx.borrow() && polls < 10_000 {
            let resp = get(&poll_url).await.expect("a poll during the flapping");
            assert_eq!(resp.status, 200, "{}", resp.text());
            assert!(resp.json()["flags"].is_object());
            polls += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        polls
    });
    for i in 0..6 {
        env.mock.set_flag(format!("flap-up-{i}"), true);
        tokio::time::sleep(Duration::from_millis(400)).await;
        if i % 2 == 0 {
            env.mock.stop().await;
        } else {
            env.mock.set_down(true);
        }
        env.mock.set_flag(format!("flap-down-{i}"), i % 3 == 0);
        tokio::time::sleep(Duration::from_millis(900)).await;
        if i % 2 == 0 {
            env.mock.start().await.expect("the mock comes back");
        } else {
            env.mock.set_down(false);
        }
    }
    env.mock.set_flag("flap-final", true);
    let want = wait_converged(&env.proxy, &env.mock, Duration::from_secs(30)).await;
    for (client, last) in &mut streams {
        follow_until(client, &want, Duration::from_secs(15), last).await;
    }
    stop.send_replace(true);
    let polls = poller.await.expect("the poller saw only 200s");
    assert!(polls > 0);
    assert_eq!(
        must_get(&env.url("/api/v1/sdk/flags"))
            .await
            .expect_json(200)["flags"],
        want,
        "the SDK route converged too"
    );
    let h = must_get(&env.url("/api/health")).await.expect_json(200);
    assert_eq!(h["circuit"], "closed", "{h}");
}

/// A stop signal for helper tasks (a watch channel).
fn tokio_util_stop() -> tokio::sync::watch::Sender<bool> {
    tokio::sync::watch::channel(false).0
}

// ---- hang ---------------------------------------------------------------------------------

/// Rollgate accepts connections and never answers (the stream goes silent, fetches hang): the
/// proxy's timeouts cut them, clients keep their flags at once, and the change made during the
/// hang arrives when Rollgate answers again.
async fn a_hanging_upstream_changes_nothing_for_clients() {
    let env = Env::with(MockConfig::basic(), |c| {
        fast(c);
        c.upstream_timeout = Some(Duration::from_secs(1));
        c.stream_idle_timeout = Some(Duration::from_secs(2));
    })
    .await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .expect("the upstream stream");
    let before = must_get(&env.url("/api/flags")).await;
    let flags = before.expect_json(200)["flags"].clone();
    let mut client = sse(&env.url("/api/stream")).await;
    let mut last = revision(
        next_event(&mut client, Duration::from_secs(10))
            .await
            .id
            .as_deref()
            .expect("id"),
    );
    let hang = Duration::from_secs(120);
    env.mock.set_delay(Route::Flags, hang);
    env.mock.set_delay(Route::Stream, hang);
    env.mock.stall_streams();
    env.mock.set_flag("during-hang", true);
    // The proxy notices (a timeout or an idle stream), and clients never wait on it.
    let url = env.url("/api/health");
    eventually(
        "the hang reported in /api/health",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            let flags_url = env.url("/api/flags");
            let flags = flags.clone();
            async move {
                let now = get(&flags_url).await.expect("a poll during the hang");
                assert_eq!(now.status, 200, "{}", now.text());
                assert_eq!(
                    now.json()["flags"],
                    flags,
                    "nothing changes during the hang"
                );
                let h = get(&url).await.ok()?.json();
                h["upstream"]["lastError"].is_string().then_some(())
            }
        },
    )
    .await;
    assert_eq!(must_get(&env.url("/ready")).await.status, 200);
    env.mock.clear_delays();
    env.mock.resume_streams();
    env.mock.set_flag("after-hang", true);
    let want = wait_converged(&env.proxy, &env.mock, Duration::from_secs(30)).await;
    assert_eq!(want["during-hang"], true);
    follow_until(&mut client, &want, Duration::from_secs(15), &mut last).await;
}

// ---- malformed fetch bodies ---------------------------------------------------------------

/// A 200 whose body is not Rollgate's JSON (truncated, wrong shape, HTML from a captive
/// portal) is refused like an error: the last good flags stay, health says why, and the next
/// good answer is taken. (Malformed stream frames: see `EXISTING`.)
async fn malformed_fetch_bodies_keep_the_last_flags() {
    let env = Env::with(MockConfig::basic(), |c| {
        fast(c);
        c.streaming = Some(false);
        c.breaker_threshold = Some(1000);
    })
    .await;
    let before = must_get(&env.url("/api/flags")).await;
    let etag = before.header("etag").expect("etag").to_owned();
    let flags = before.expect_json(200)["flags"].clone();
    let bodies = [
        ("{\"flags\":{\"enabled-flag\":tr", "application/json"),
        ("{\"flags\":[true,false]}", "application/json"),
        ("{\"flags\":{\"enabled-flag\":\"yes\"}}", "application/json"),
        (
            "<html><body>Sign in to the Wi-Fi</body></html>",
            "text/html",
        ),
    ];
    for (body, content_type) in bodies {
        let seen = env.mock.stats().faults_served;
        env.mock.fail(
            Route::Flags,
            rollgate_proxy_tests::mock::Fault::status(200)
                .body(body)
                .content_type(content_type),
        );
        env.mock
            .wait_until(Duration::from_secs(15), |s| s.faults_served >= seen + 2)
            .await
            .expect("the proxy polls into the malformed body");
        let now = must_get(&env.url("/api/flags")).await;
        assert_eq!(now.status, 200, "{body}: {}", now.text());
        assert_eq!(now.header("etag"), Some(etag.as_str()), "{body}");
        assert_eq!(now.json()["flags"], flags, "{body}");
        let h = must_get(&env.url("/api/health")).await.expect_json(200);
        assert!(h["upstream"]["lastError"].is_string(), "{body}: {h}");
    }
    env.mock.clear_faults();
    env.mock.set_flag("after-malformed", true);
    wait_converged(&env.proxy, &env.mock, Duration::from_secs(20)).await;
}

// ---- reconnect storm ----------------------------------------------------------------------

/// A raw SSE client (plain TCP, a few hundred bytes of state): thousands fit in one test.
struct RawStream {
    socket: TcpStream,
    buf: Vec<u8>,
}

impl RawStream {
    async fn open(port: u16, path: &str, last_event_id: Option<&str>) -> std::io::Result<Self> {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).await?;
        let lei = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{lei}\r\n"
        );
        socket.write_all(head.as_bytes()).await?;
        Ok(Self {
            socket,
            buf: Vec::new(),
        })
    }

    /// Reads until `done(text so far)` holds; `Err` on a close, an error or `timeout`.
    async fn read_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if done(&String::from_utf8_lossy(&self.buf)) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.read(&mut chunk)).await {
                Err(_) => return Err(format!("timed out; got {:?}", self.tail())),
                Ok(Ok(0)) => return Err(format!("closed; got {:?}", self.tail())),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(format!("{e}; got {:?}", self.tail())),
            }
        }
    }

    fn tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        text.chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    }

    /// The last complete `id:` line's value.
    fn last_id(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.buf);
        let complete = &text[..text.rfind('\n')?];
        complete
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("id: "))
            .map(|s| s.trim().to_owned())
    }
}

/// Every one of `n` streams (opened at once) gets a 200 and the current snapshot; they all
/// drop and reconnect at once with their `Last-Event-ID`; one change then reaches all of them
/// with a later id. Rollgate sees one stream throughout.
async fn a_reconnect_storm_is_served_by_one_upstream_stream() {
    // Native: 2,000 at once (one source address is plenty below ~12.5k); the Worker under
    // `wrangler dev` is one local workerd, so fewer.
    let n: usize = if target().is_process() { 2000 } else { 200 };
    let env = Env::basic().await;
    env.mock
        .wait_for_open_streams(1, Duration::from_secs(10))
        .await
        .expect("the upstream stream");
    let accepted = env.mock.stats().streams_accepted;
    let port = env.proxy.port();
    let connect_all = |last_event_id: Option<String>| {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let lei = last_event_id.clone();
            tasks.spawn(async move {
                let mut s = RawStream::open(port, "/api/stream", lei.as_deref())
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                s.read_until(Duration::from_secs(45), |t| {
                    t.starts_with("HTTP/1.1 ") && t.contains("\r\n\r\n")
                })
                .await?;
                let status = String::from_utf8_lossy(&s.buf[..12]).into_owned();
                if status != "HTTP/1.1 200" {
                    return Err(format!("status {:?}", s.tail()));
                }
                Ok::<_, String>(s)
            });
        }
        tasks
    };
    // Wave 1: everyone at once, each gets the snapshot.
    let mut wave = connect_all(None);
    let mut first = Vec::with_capacity(n);
    while let Some(joined) = wave.join_next().await {
        let mut s = joined
            .expect("task")
            .unwrap_or_else(|e| panic!("wave 1: {e}"));
        s.read_until(Duration::from_secs(45), |t| {
            t.contains("event: flags") && t.contains("\"enabled-flag\":true")
        })
        .await
        .unwrap_or_else(|e| panic!("wave 1 snapshot: {e}"));
        first.push(s);
    }
    let ids: std::collections::BTreeSet<String> =
        first.iter().filter_map(RawStream::last_id).collect();
    assert_eq!(ids.len(), 1, "one snapshot id for everyone: {ids:?}");
    // Each connection drew its own `retry:` (2000 ms ±10 %): the herd comes back spread out.
    let retries: std::collections::BTreeSet<u64> = first
        .iter()
        .map(|s| {
            let text = String::from_utf8_lossy(&s.buf).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("retry: ")?.trim().parse().ok())
                .unwrap_or_else(|| panic!("a retry: line first: {:?}", s.tail()))
        })
        .collect();
    assert!(
        retries.iter().all(|ms| (1800..=2200).contains(ms)),
        "{retries:?}"
    );
    assert!(
        retries.len() >= n.min(400) / 4,
        "retry: is drawn per connection: {} distinct values for {n} clients",
        retries.len()
    );
    let id = ids.into_iter().next().expect("an id");
    // Everyone drops at once (a replica died) and comes back at once with Last-Event-ID.
    drop(first);
    let mut wave = connect_all(Some(id.clone()));
    let mut second = Vec::with_capacity(n);
    while let Some(joined) = wave.join_next().await {
        second.push(
            joined
                .expect("task")
                .unwrap_or_else(|e| panic!("wave 2: {e}")),
        );
    }
    let open = env.url("/api/health");
    eventually(
        &format!("{n} SSE clients counted"),
        Duration::from_secs(30),
        || {
            let open = open.clone();
            async move {
                let h = get(&open).await.ok()?.json();
                (h["sseClients"].as_u64()? >= n as u64).then_some(())
            }
        },
    )
    .await;
    env.mock.set_flag("after-storm", true);
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in second {
        tasks.spawn(async move {
            s.read_until(Duration::from_secs(45), |t| {
                t.contains("\"after-storm\":true")
            })
            .await?;
            Ok::<_, String>(s)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let s = joined
            .expect("task")
            .unwrap_or_else(|e| panic!("the change after the storm: {e}"));
        let text = String::from_utf8_lossy(&s.buf).into_owned();
        // The current id was not sent the snapshot again: the change is the first frame.
        assert_eq!(
            text.matches("event: flags").count(),
            1,
            "one frame after reconnecting with the current id: {:?}",
            s.tail()
        );
        let new = s.last_id().expect("an id");
        assert!(revision(&new) > revision(&id), "{new} after {id}");
    }
    wait_converged(&env.proxy, &env.mock, Duration::from_secs(10)).await;
    assert_eq!(
        env.mock.stats().streams_accepted,
        accepted,
        "the storm never reached Rollgate"
    );
}

// ---- never-reading clients ----------------------------------------------------------------

/// The proxy's resident memory (native), in KiB.
fn rss_kib(proxy: &ProxyHandle) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid()?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Stream clients that send their request and then never read (tiny receive buffers) while a
/// large flag set changes many times: the proxy keeps only the newest frame per client (its
/// memory stays bounded, native) and a reading client and pollers are unaffected.
async fn never_reading_clients_stay_bounded_and_harmless() {
    const FLAGS: usize = 3000;
    let native = target().is_process();
    let (stuck, changes) = if native { (60, 40) } else { (20, 10) };
    let big = FlagSet::from_bools((0..FLAGS).map(|i| {
        (
            format!("bulk-{i:05}-a-long-flag-key-for-a-big-frame"),
            i % 2 == 0,
        )
    }));
    let env = Env::with(MockConfig::basic().flags(big), |_| {}).await;
    let frame_bytes = serde_json::to_vec(&served_flags(&env.proxy, "").await)
        .expect("json")
        .len();
    let port = env.proxy.port();
    let mut sockets = Vec::new();
    for _ in 0..stuck {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        let _ = socket.set_recv_buffer_size(4096);
        let mut stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect");
        stream
            .write_all(b"GET /api/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .expect("request");
        sockets.push(stream);
    }
    let mut reader = sse(&env.url("/api/stream")).await;
    let mut last = revision(
        next_event(&mut reader, Duration::from_secs(10))
            .await
            .id
            .as_deref()
            .expect("id"),
    );
    let baseline = rss_kib(&env.proxy);
    for i in 0..changes {
        env.mock
            .set_flag("bulk-00000-a-long-flag-key-for-a-big-frame", i % 2 == 1);
        env.mock.set_flag(format!("churn-{i}"), true);
        // Each change is published before the next (the reader sees it): no coalescing.
        let key = format!("churn-{i}");
        let ev = event_where(&mut reader, Duration::from_secs(20), |e| {
            e.json().is_ok_and(|v| v[&key] == true)
        })
        .await;
        let rev = revision(ev.id.as_deref().expect("id"));
        assert!(rev > last, "ids move forward");
        last = rev;
        let poll = must_get(&env.url("/api/health")).await;
        assert_eq!(poll.status, 200);
    }
    env.mock.set_flag("after-churn", true);
    let want = wait_converged(&env.proxy, &env.mock, Duration::from_secs(20)).await;
    follow_until(&mut reader, &want, Duration::from_secs(20), &mut last).await;
    if let (Some(before), Some(after)) = (baseline, rss_kib(&env.proxy)) {
        // Buffering every frame for every stuck client would be stuck × changes × frame
        // (about 60 × 40 × 150 KB ≈ 350 MB); newest-only is at most about one frame each.
        let unbounded = (stuck * changes * frame_bytes / 1024) as u64;
        let growth = after.saturating_sub(before);
        assert!(
            growth < 64 * 1024 && growth < unbounded / 4,
            "RSS grew {growth} KiB with {stuck} never-reading clients ({unbounded} KiB if buffered)"
        );
        println!("never-reading: RSS {before} → {after} KiB; unbounded would add {unbounded} KiB");
    }
    assert_eq!(sockets.len(), stuck);
}

// ---- slowloris ----------------------------------------------------------------------------

/// Sends `bytes` on a new connection and reads until the peer closes (at most `timeout`).
async fn raw_exchange(port: u16, bytes: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    let mut socket = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    socket.write_all(bytes).await.map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    match tokio::time::timeout(timeout, socket.read_to_end(&mut got)).await {
        Err(_) => Err(format!("not closed within {timeout:?}")),
        // A reset after a response still shows what was read.
        Ok(_) => Ok(got),
    }
}

/// Hundreds of slow clients (heads that never complete, heads dribbled a byte at a time,
/// bodies that stop short) while ordinary clients poll: the ordinary ones are all answered,
/// slow bodies get 408 `REQUEST_TIMEOUT`, slow heads are closed without a response (the
/// README's `--request-timeout`).
async fn slow_heads_and_bodies_do_not_starve_others() {
    if !native_only("Cloudflare's front end, not the Worker, reads request heads and bodies") {
        return;
    }
    let env = Env::with(MockConfig::basic(), |c| {
        c.extra_args = vec!["--request-timeout".into(), "1s".into()];
    })
    .await;
    let port = env.proxy.port();
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..200 {
        slow.spawn(async move {
            let got = raw_exchange(
                port,
                b"GET /api/flags HTTP/1.1\r\nHost: x\r\n",
                Duration::from_secs(30),
            )
            .await?;
            Ok::<_, String>(("head", got))
        });
    }
    for _ in 0..20 {
        slow.spawn(async move {
            let mut socket = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            let head = b"GET /api/flags?dribble=1 HTTP/1.1\r\nHost: x\r\nX-Pad: ";
            let mut got = Vec::new();
            // A byte every 200 ms (bounded): the head is never complete.
            for &b in head.iter().chain(std::iter::repeat_n(&b'a', 150)) {
                if socket.write_all(&[b]).await.is_err() {
                    break;
                }
                let mut probe = [0u8; 1024];
                match tokio::time::timeout(Duration::from_millis(200), socket.read(&mut probe))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => return Ok(("dribble", got)),
                    Ok(Ok(n)) => got.extend_from_slice(&probe[..n]),
                    Err(_) => {}
                }
            }
            Err("a dribbled head was never closed".to_owned())
        });
    }
    for _ in 0..50 {
        slow.spawn(async move {
            let got = raw_exchange(
                port,
                b"POST /api/v1/sdk/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"kind\":",
                Duration::from_secs(30),
            )
            .await?;
            Ok::<_, String>(("body", got))
        });
    }
    // Meanwhile ordinary clients, on their own connections, are answered.
    let mut ok = 0;
    for _ in 0..20 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let url = env.url("/api/flags");
            batch.spawn(async move { send(http().get(url)).await });
        }
        while let Some(joined) = batch.join_next().await {
            let resp = joined.expect("task").expect("an ordinary request");
            assert_eq!(resp.status, 200, "{}", resp.text());
            ok += 1;
        }
    }
    assert_eq!(ok, 100);
    let (mut heads, mut bodies) = (0, 0);
    while let Some(joined) = slow.join_next().await {
        let (kind, got) = joined.expect("task").unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&got);
        match kind {
            "head" | "dribble" => {
                assert!(
                    got.is_empty(),
                    "{kind}: no response to an incomplete head: {text:?}"
                );
                heads += 1;
            }
            _ => {
                assert!(text.starts_with("HTTP/1.1 408"), "slow body: {text:?}");
                assert!(text.contains("REQUEST_TIMEOUT"), "slow body: {text:?}");
                bodies += 1;
            }
        }
    }
    assert_eq!((heads, bodies), (220, 50));
    // A keep-alive connection left idle after its answer is closed after the same time.
    let mut idle = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    idle.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut got))
        .await
        .expect("an idle keep-alive connection is closed")
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text:?}");
    assert_eq!(must_get(&env.url("/api/flags")).await.status, 200);
}

// ---- overload -----------------------------------------------------------------------------

/// With `--max-concurrent-requests 8` and eight requests held in flight (bodies not finished),
/// data routes get 503 `OVERLOADED` with a `Retry-After` of 1–5 s, probes, health and metrics
/// still answer 200, and the proxy serves normally once the held requests end.
async fn overload_sheds_data_routes_but_never_probes() {
    if !native_only("a Worker has no process-wide concurrency limit; Cloudflare scales it out") {
        return;
    }
    let env = Env::with(MockConfig::basic(), |c| {
        c.extra_args = vec![
            "--max-concurrent-requests".into(),
            "8".into(),
            // Far longer than the wait for the shed below: the held requests must still be in
            // flight when the shed is looked for, however slow the machine.
            "--request-timeout".into(),
            "90s".into(),
        ];
    })
    .await;
    let port = env.proxy.port();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(held_request(port).await);
    }
    // Shed once all eight are inside the handler. The proxy may take a held request's head
    // after a poll below has entered (its connection task ran later): that makes nine, and the
    // held request itself is shed. Such a one is replaced, so that eight are held.
    let url = env.url("/api/flags");
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    let mut replaced = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let shed = loop {
        for socket in &mut held {
            let mut buf = [0u8; 64];
            if !matches!(socket.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                *socket = held_request(port).await;
                replaced += 1;
            }
        }
        let outcome = get(&url).await;
        let key = match &outcome {
            Ok(resp) => resp.status.to_string(),
            Err(error) => format!("error: {error}"),
        };
        *seen.entry(key).or_default() += 1;
        if let Some(resp) = outcome.ok().filter(|resp| resp.status == 503) {
            break resp;
        }
        assert!(
            Instant::now() < deadline,
            "no data request shed with 8 requests held; polls got {seen:?}; {replaced} held \
             requests were answered early and replaced"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    shed.expect_error(503, "OVERLOADED");
    let mut retry_afters = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let resp = must_get(&env.url("/api/flags")).await;
        resp.expect_error(503, "OVERLOADED");
        let secs: u64 = resp
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in seconds");
        assert!((1..=5).contains(&secs), "Retry-After {secs}");
        retry_afters.insert(secs);
    }
    assert!(
        retry_afters.len() > 1,
        "Retry-After is jittered: {retry_afters:?}"
    );
    for probe in ["/live", "/ready", "/health", "/api/health", "/api/metrics"] {
        assert_eq!(must_get(&env.url(probe)).await.status, 200, "{probe}");
    }
    assert!(
        metric_sum(&env.proxy, "rollgate_proxy_shed_total", "")
            .await
            .is_some_and(|v| v >= 41.0),
        "shed requests are counted"
    );
    // The held requests finish their bodies: answered, and the proxy is no longer shedding.
    for socket in &mut held {
        socket.write_all(b"[]}").await.expect("finish body");
    }
    for mut socket in held {
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut head))
            .await
            .expect("the held request is answered")
            .expect("read");
        assert_eq!(
            &head,
            b"HTTP/1.1 200",
            "{:?}",
            String::from_utf8_lossy(&head)
        );
    }
    let url = env.url("/api/flags");
    eventually("serving again", Duration::from_secs(10), || {
        let url = url.clone();
        async move { (get(&url).await.ok()?.status == 200).then_some(()) }
    })
    .await;
}

/// A `POST /api/v1/sdk/events` whose body never completes (10 of 13 bytes): it stays inside
/// the handler until the rest comes or the request timeout ends it.
async fn held_request(port: u16) -> TcpStream {
    let mut socket = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    socket
        .write_all(b"POST /api/v1/sdk/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"events\":")
        .await
        .expect("write");
    socket
}

// ---- SIGTERM under load -------------------------------------------------------------------

/// SIGTERM while 20 per-user requests wait on a slow Rollgate, streams are open and pollers
/// hammer the proxy: every in-flight request completes with its 200, every stream ends with
/// a clean terminating chunk, no answer is anything but a 200, and the exit status is 0.
async fn sigterm_under_load_finishes_in_flight_requests() {
    if !native_only("a Worker gets no SIGTERM; Cloudflare drains it on deploys") {
        return;
    }
    let dir = TempDir::new("sigterm").expect("temp dir");
    let file = dir.join("snapshot.json");
    let snapshot_file = file.clone();
    let mut env = Env::with(MockConfig::basic(), move |c| {
        c.shutdown_timeout = Some(Duration::from_secs(15));
        c.snapshot_file = Some(snapshot_file);
        // Nothing is flushed on the timer during the scenario: only the shutdown flushes.
        c.events_flush_interval = Some(Duration::from_secs(600));
        c.telemetry_flush_interval = Some(Duration::from_secs(600));
    })
    .await;
    env.mock.set_flag("before-sigterm", true);
    wait_served(&env.proxy, "before-sigterm", true, Duration::from_secs(10)).await;
    let events = r#"{"events":[{"flagKey":"enabled-flag","eventName":"at-shutdown","userId":"u-1","timestamp":"2026-01-01T00:00:00.000Z"}]}"#;
    assert_eq!(
        must_post(&env.url("/api/v1/sdk/events"), events)
            .await
            .expect_json(200)["received"],
        1
    );
    let mut streams = Vec::new();
    for path in [
        "/api/stream",
        "/api/v1/sdk/stream",
        "/api/stream?user_id=s-1",
    ] {
        for _ in 0..3 {
            let mut c = sse(&env.url(path)).await;
            next_event(&mut c, Duration::from_secs(10)).await;
            streams.push(c);
        }
    }
    // Rollgate is slow: each per-user fetch takes 3 s.
    env.mock.set_delay(Route::Flags, Duration::from_secs(3));
    let users: Vec<String> = (0..20).map(|i| format!("in-flight-{i}")).collect();
    let mut in_flight = tokio::task::JoinSet::new();
    for user in &users {
        let url = env.url(&format!("/api/flags?user_id={user}"));
        in_flight.spawn(async move { send(http().get(url)).await });
    }
    let mock = env.mock.control();
    let wanted = users.clone();
    eventually(
        "all 20 per-user fetches at Rollgate",
        Duration::from_secs(20),
        || {
            let seen: std::collections::BTreeSet<String> = mock
                .requests_for(Route::Flags)
                .iter()
                .filter_map(|r| r.query_param("user_id"))
                .collect();
            let all = wanted.iter().all(|u| seen.contains(u));
            async move { all.then_some(()) }
        },
    )
    .await;
    // Pollers on fresh connections right through the shutdown.
    let stop = tokio_util_stop();
    let mut pollers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let url = env.url("/api/flags");
        let stop = stop.subscribe();
        pollers.spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client");
            let (mut ok, mut refused) = (0u32, 0u32);
            for _ in 0..2000 {
                if *stop.borrow() {
                    break;
                }
                match send(client.get(&url)).await {
                    Ok(resp) => {
                        assert_eq!(resp.status, 200, "a poll got {}", resp.text());
                        ok += 1;
                    }
                    // The listener is closed (or the connection was accepted just before it
                    // closed and never read): nothing was answered; a client retries elsewhere.
                    Err(e) if e.is_connect() || e.is_request() => refused += 1,
                    Err(e) => panic!("a poll failed after an answer began: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, refused)
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.proxy.terminate().expect("SIGTERM");
    while let Some(joined) = in_flight.join_next().await {
        let resp = joined
            .expect("task")
            .expect("an in-flight request completes");
        let body = resp.expect_json(200);
        assert_eq!(body["flags"]["enabled-flag"], true, "{body}");
    }
    for c in &mut streams {
        let end = c
            .wait_end(Duration::from_secs(20))
            .await
            .expect("the stream ends on SIGTERM");
        assert_eq!(end, StreamEnd::Clean, "a clean terminating chunk");
    }
    let status = env
        .proxy
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    stop.send_replace(true);
    let mut answered = 0;
    while let Some(joined) = pollers.join_next().await {
        let (ok, _refused) = joined.expect("pollers saw only 200s");
        answered += ok;
    }
    assert!(
        answered > 0,
        "the pollers were answered before the shutdown"
    );
    assert!(
        env.proxy
            .wait_log("shutting down", Duration::from_secs(10))
            .await,
        "the shutdown is logged"
    );
    // The buffered event was flushed on the way out, and the snapshot file has the last change.
    assert!(
        env.mock
            .events()
            .iter()
            .any(|e| e["eventName"] == "at-shutdown"),
        "buffered events are flushed at shutdown: {:?}",
        env.mock.events()
    );
    let persisted = std::fs::read_to_string(&file).expect("the snapshot file");
    assert!(persisted.contains("before-sigterm"), "{persisted}");
}

// ---- unwritable snapshot path -------------------------------------------------------------

/// `--snapshot-file` under a path that cannot be written (its parent is a regular file, which
/// stops root too): the proxy starts, serves and takes changes, and says so in its log.
async fn an_unwritable_snapshot_path_serves_anyway() {
    if !native_only("a Worker persists to its Durable Object's storage, not a path") {
        return;
    }
    let dir = TempDir::new("unwritable").expect("temp dir");
    let not_a_dir = dir.join("not-a-dir");
    std::fs::write(&not_a_dir, "a file where a directory should be").expect("write");
    let file = not_a_dir.join("snapshot.json");
    let env = Env::with(MockConfig::basic(), move |c| c.snapshot_file = Some(file)).await;
    env.mock.set_flag("unpersisted", true);
    wait_converged(&env.proxy, &env.mock, Duration::from_secs(10)).await;
    let logs = env.proxy.logs();
    let url = env.url("/api/health");
    eventually("the failed write logged", Duration::from_secs(10), || {
        let found = env.proxy.logs().contains("could not persist the snapshot");
        let url = url.clone();
        async move {
            let h = get(&url).await.ok()?.json();
            (found && h["status"] == "healthy").then_some(())
        }
    })
    .await;
    assert!(!logs.contains("panicked"), "{logs}");
    assert_eq!(must_get(&env.url("/ready")).await.status, 200);
}
