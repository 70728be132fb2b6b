//! The WebSocket transport of the streams: each message is exactly one frame of the event
//! stream (the first the SSE stream's first frame), changes arrive, revisions only move
//! forward, keys are checked as for SSE, and `ping` gets `pong`; a client that asks
//! `?coding=gzip` gets large frames as binary messages, each the frame alone as one gzip member.

use std::io::Read;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rollgate_proxy_tests::mock::MockConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(first_message_is_the_sse_first_frame_then_changes),
        scenario!(sdk_stream_over_websocket),
        scenario!(per_user_stream_over_websocket),
        scenario!(bad_key_is_refused_like_sse),
        scenario!(ping_gets_pong_and_the_socket_is_counted),
        scenario!(max_age_closes_the_socket_cleanly),
        scenario!(large_frames_are_gzip_members_when_asked),
    ]
}

/// Generous: the Worker under `wrangler dev` on a loaded box.
const WAIT: Duration = Duration::from_secs(15);

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(http_url: &str) -> String {
    http_url.replacen("http://", "ws://", 1)
}

/// Opens a WebSocket on `url` (an `http://` URL of the proxy); the refusal's status if any.
async fn open(url: &str) -> Result<Socket, u16> {
    let connect = tokio_tungstenite::connect_async(ws_url(url));
    match tokio::time::timeout(WAIT, connect).await {
        Ok(Ok((socket, response))) => {
            assert_eq!(response.status().as_u16(), 101);
            Ok(socket)
        }
        Ok(Err(tungstenite::Error::Http(response))) => Err(response.status().as_u16()),
        Ok(Err(error)) => panic!("WebSocket {url}: {error}"),
        Err(_) => panic!("WebSocket {url}: no answer within {WAIT:?}"),
    }
}

pub(crate) async fn must_open(url: &str) -> Socket {
    open(url)
        .await
        .unwrap_or_else(|status| panic!("WebSocket {url} refused with {status}"))
}

/// The first message `pick` takes within `bound` (it returns `None` for those to skip); panics,
/// naming `what`, if the socket fails or ends before.
async fn next_picked<T>(
    socket: &mut Socket,
    bound: Duration,
    what: &str,
    mut pick: impl FnMut(Message) -> Option<T>,
) -> T {
    let read = async {
        loop {
            match socket.next().await {
                Some(Ok(message)) => {
                    if let Some(picked) = pick(message) {
                        return picked;
                    }
                }
                Some(Err(error)) => panic!("waiting for {what}: WebSocket failed: {error}"),
                None => panic!("waiting for {what}: WebSocket ended"),
            }
        }
    };
    tokio::time::timeout(bound, read)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {bound:?}"))
}

/// The next text message (pongs and protocol frames skipped); panics on a close.
pub(crate) async fn next_text(socket: &mut Socket) -> String {
    next_picked(socket, WAIT, "WebSocket message", |message| match message {
        Message::Text(text) => Some(text.as_str().to_owned()),
        Message::Close(frame) => panic!("closed: {frame:?}"),
        _ => None,
    })
    .await
}

/// The close frame that ends `socket` within `bound` (other messages skipped); panics on an
/// end without one (an error, or the connection simply dropped).
pub(crate) async fn next_close(
    socket: &mut Socket,
    bound: Duration,
) -> tungstenite::protocol::CloseFrame {
    next_picked(socket, bound, "close frame", |message| match message {
        Message::Close(frame) => Some(frame),
        _ => None,
    })
    .await
    .expect("a close frame with a status")
}

/// One SSE frame's `event`, `id` and `data` (panics unless it is exactly one event).
struct Frame {
    event: String,
    id: String,
    data: serde_json::Value,
}

fn parse(frame: &str) -> Frame {
    assert!(frame.ends_with("\n\n"), "one whole frame: {frame:?}");
    let (mut event, mut id, mut data) = (None, None, String::new());
    for line in frame.trim_end_matches('\n').split('\n') {
        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
        match field {
            "event" => event = Some(value.to_owned()),
            "id" => id = Some(value.to_owned()),
            "data" => data.push_str(value),
            other => panic!("unexpected field {other:?} in {frame:?}"),
        }
    }
    Frame {
        event: event.expect("event:"),
        id: id.expect("id:"),
        data: serde_json::from_str(&data).expect("JSON data"),
    }
}

fn revision(id: &str) -> u64 {
    id.split_once('-')
        .and_then(|(revision, _)| revision.parse().ok())
        .unwrap_or_else(|| panic!("id is <revision>-<hash>: {id}"))
}

/// The SSE stream's first frame as bytes: the raw body after the `retry:` preamble, up to the
/// end of the first event.
async fn sse_first_frame(url: &str) -> String {
    let mut client = sse(url).await;
    next_event(&mut client, WAIT).await;
    let raw = String::from_utf8_lossy(client.raw()).into_owned();
    let (_, rest) = raw.split_once("\n\n").expect("the retry: preamble");
    let end = rest.find("\n\n").expect("a whole first frame") + 2;
    rest[..end].to_owned()
}

async fn first_message_is_the_sse_first_frame_then_changes() {
    let env = Env::basic().await;
    let url = env.url("/api/stream");
    let mut socket = must_open(&url).await;
    let first = next_text(&mut socket).await;
    assert_eq!(
        first,
        sse_first_frame(&url).await,
        "the first message is the SSE stream's first frame, byte for byte"
    );
    let frame = parse(&first);
    assert_eq!(frame.event, "flags");
    assert_eq!(frame.data, served_flags(&env.proxy, "").await);

    // Changes arrive, each a whole frame, revisions only moving forward.
    let mut last = revision(&frame.id);
    for (i, value) in [false, true, false].into_iter().enumerate() {
        env.mock.set_flag("enabled-flag", value);
        let changed = loop {
            let frame = parse(&next_text(&mut socket).await);
            let at = revision(&frame.id);
            assert!(at >= last, "revision {at} after {last}");
            last = at;
            if frame.data["enabled-flag"] == value {
                break frame;
            }
        };
        assert_eq!(changed.event, "flags", "change {i}");
    }
    assert!(last > revision(&frame.id), "the changes moved the revision");

    // What an SSE client gets now is where the socket ended up.
    let now = parse(&sse_first_frame(&url).await);
    assert_eq!(now.data["enabled-flag"], false);
    assert_eq!(revision(&now.id), last);
    socket.close(None).await.ok();
}

/// The SDK stream at `path` over a WebSocket: its first message is the SSE stream's first frame
/// (an `init` with `enabled-flag` on), and a change at Rollgate arrives with revisions that
/// never go back.
async fn sdk_stream_follows_a_change(path: &str) {
    let env = Env::basic().await;
    let url = env.url(path);
    let mut socket = must_open(&url).await;
    let first = next_text(&mut socket).await;
    assert_eq!(first, sse_first_frame(&url).await);
    let frame = parse(&first);
    assert_eq!(frame.event, "init");
    assert_eq!(frame.data["flags"]["enabled-flag"], true, "{}", frame.data);
    env.mock.set_flag("enabled-flag", false);
    let mut last = revision(&frame.id);
    loop {
        let frame = parse(&next_text(&mut socket).await);
        let at = revision(&frame.id);
        assert!(at >= last, "revision {at} after {last}");
        last = at;
        if frame.data["flags"]["enabled-flag"] == false {
            break;
        }
    }
}

async fn sdk_stream_over_websocket() {
    sdk_stream_follows_a_change("/api/v1/sdk/stream").await;
}

async fn per_user_stream_over_websocket() {
    sdk_stream_follows_a_change("/api/v1/sdk/stream?user_id=ws-user").await;
}

const KEY: &str = "ck_e2e_socket";

async fn bad_key_is_refused_like_sse() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.client_keys = vec![KEY.into()];
    })
    .await;
    for query in ["", "?token=ck_wrong"] {
        let url = env.url(&format!("/api/stream{query}"));
        let sse_status = get(&url).await.expect("SSE answer").status;
        assert_eq!(sse_status, 401, "SSE {query}");
        assert_eq!(
            open(&url).await.err(),
            Some(sse_status),
            "WebSocket {query}"
        );
    }
    let mut socket = must_open(&env.url(&format!("/api/stream?token={KEY}"))).await;
    assert_eq!(parse(&next_text(&mut socket).await).event, "flags");
}

async fn ping_gets_pong_and_the_socket_is_counted() {
    let env = Env::basic().await;
    let mut socket = must_open(&env.url("/api/stream")).await;
    next_text(&mut socket).await;
    socket
        .send(Message::Text("ping".into()))
        .await
        .expect("ping sent");
    assert_eq!(next_text(&mut socket).await, "pong");
    // Counted as an open stream of its kind, like an SSE client, until it closes.
    wait_metric_at_least(
        &env.proxy,
        "rollgate_proxy_sse_clients",
        "stream=\"frontend\"",
        1.0,
        WAIT,
    )
    .await;
    socket.close(None).await.expect("close sent");
    eventually("the closed socket uncounted", WAIT, || async {
        let open = metric_sum(&env.proxy, "rollgate_proxy_sse_clients", "").await?;
        (open == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        metric_sum(&env.proxy, "rollgate_proxy_websocket_refused_total", "").await,
        Some(0.0)
    );
}

/// The maximum age ends a WebSocket cleanly too, as it ends an event stream (native: the
/// connection's deadline; the Worker: the shard's alarm, as a hibernated object has no other
/// timer), so clients move between replicas and shards over time; the socket is uncounted.
async fn max_age_closes_the_socket_cleanly() {
    let env = Env::with(MockConfig::basic(), |c| {
        c.sse_max_age = Some(Duration::from_secs(2));
    })
    .await;
    let mut socket = must_open(&env.url("/api/stream")).await;
    assert_eq!(parse(&next_text(&mut socket).await).event, "flags");
    // 2 s ± 10 % (the Worker closes up to a twentieth early): far inside the bound.
    let frame = next_close(&mut socket, Duration::from_secs(30)).await;
    assert_eq!(u16::from(frame.code), 1000, "a normal close: {frame:?}");
    assert_eq!(frame.reason.as_str(), "max age");
    eventually("the closed socket uncounted", WAIT, || async {
        let open = metric_sum(&env.proxy, "rollgate_proxy_sse_clients", "").await?;
        (open == 0.0).then_some(())
    })
    .await;
}

/// The next frame and whether it came as a binary message (a gzip member, checked whole: its
/// CRC and length, and nothing after it); pongs and protocol frames skipped.
async fn next_frame_message(socket: &mut Socket) -> (String, bool) {
    next_picked(socket, WAIT, "WebSocket frame", |message| match message {
        Message::Text(text) => Some((text.as_str().to_owned(), false)),
        Message::Binary(member) => {
            let mut decoder = flate2::read::GzDecoder::new(&member[..]);
            let mut frame = String::new();
            decoder
                .read_to_string(&mut frame)
                .unwrap_or_else(|e| panic!("a binary message is one whole gzip member: {e}"));
            assert!(
                decoder.into_inner().is_empty(),
                "one member, nothing after it"
            );
            assert!(
                member.len() * 4 < frame.len(),
                "{} B for a {} B frame",
                member.len(),
                frame.len()
            );
            Some((frame, true))
        }
        Message::Close(frame) => panic!("closed: {frame:?}"),
        _ => None,
    })
    .await
}

/// `?coding=gzip`: the large frames of a 2,000-flag set arrive as binary gzip members that
/// decode to the SSE stream's frames byte for byte (anonymous, SDK and per-user streams, and a
/// change); without it, and for a small set, frames stay text.
async fn large_frames_are_gzip_members_when_asked() {
    let env = Env::with(crate::compression::large_set(), |_| {}).await;
    for path in [
        "/api/stream",
        "/api/v1/sdk/stream",
        "/api/stream?user_id=ws-gzip-user",
    ] {
        let separator = if path.contains('?') { '&' } else { '?' };
        let url = env.url(&format!("{path}{separator}coding=gzip"));
        let mut socket = must_open(&url).await;
        let (frame, binary) = next_frame_message(&mut socket).await;
        assert!(binary, "{path}: a large frame, asked for gzip");
        assert_eq!(frame, sse_first_frame(&env.url(path)).await, "{path}");
        socket.close(None).await.ok();
    }

    // Not asked: text, the same frame.
    let url = env.url("/api/stream");
    let mut plain = must_open(&url).await;
    let (frame, binary) = next_frame_message(&mut plain).await;
    assert!(!binary, "not asked for, not coded");
    assert_eq!(frame, sse_first_frame(&url).await);

    // A change reaches a coded socket as one more member.
    let mut coded = must_open(&env.url("/api/stream?coding=gzip")).await;
    let (first, _) = next_frame_message(&mut coded).await;
    let mut last = revision(&parse(&first).id);
    env.mock.set_flag("team-1-feature-0001-rollout", true);
    loop {
        let (text, binary) = next_frame_message(&mut coded).await;
        assert!(binary);
        let frame = parse(&text);
        let at = revision(&frame.id);
        assert!(at >= last, "revision {at} after {last}");
        last = at;
        if frame.data["team-1-feature-0001-rollout"] == true {
            break;
        }
    }
    coded.close(None).await.ok();
    plain.close(None).await.ok();

    // A small set's frames gain nothing from gzip: text even when asked.
    let small = Env::basic().await;
    let url = small.url("/api/stream?coding=gzip");
    let mut socket = must_open(&url).await;
    let (frame, binary) = next_frame_message(&mut socket).await;
    assert!(!binary, "a small frame stays text");
    assert_eq!(frame, sse_first_frame(&url).await);
}
