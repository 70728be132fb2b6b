//! SSE connections: the I/O around core's `Subscriber` (the frontend stream, the Rollgate SDK
//! stream and OFREP notifications), over an event-stream body or a WebSocket.
//!
//! Core decides every frame; this module subscribes to the snapshot watch **before** reading the
//! current snapshot (so no publish falls between the two), hands each snapshot to the
//! subscriber, resolves per-user flags, and times keepalives and the max-age close. A slow
//! client only ever gets the newest snapshot (watch semantics, no buffer). Before the first
//! snapshot exists the stream is accepted and sends keepalives: SDK clients fail permanently on
//! a non-200 stream answer.

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use bytes::Bytes;
use http::header::{CONTENT_ENCODING, VARY};
use http::{HeaderName, HeaderValue};
use rollgate_proxy_core::downstream::Resolved;
use rollgate_proxy_core::encoding::Encoding;
use rollgate_proxy_core::model::{Context, EvaluatedFlags};
use rollgate_proxy_core::snapshot::Snapshot;
use rollgate_proxy_core::sse::gzip::{self, Trailer};
use rollgate_proxy_core::stream::{self, Next, SocketMessage, Subscriber};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::runtime::now;
use crate::server::ConnectionHold;
use crate::state::App;
use crate::users::user_flags;

/// Counts the connection in core's metrics while it lives.
struct ClientGuard {
    app: Arc<App>,
    kind: stream::StreamKind,
}

impl ClientGuard {
    fn new(app: Arc<App>, kind: stream::StreamKind) -> Self {
        app.downstream.metrics.stream_opened(kind);
        Self { app, kind }
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.app.downstream.metrics.stream_closed(self.kind);
    }
}

/// A per-user connection's registration: core refreshes the user's answer on upstream
/// changes, and the receiver is bumped when it was refetched.
struct UserGuard {
    app: Arc<App>,
    user: String,
    refetched: watch::Receiver<u64>,
}

impl UserGuard {
    fn new(app: Arc<App>, user: &str) -> Self {
        app.downstream.user_stream_opened(user);
        let refetched = app.user_streams.open(user);
        Self {
            app,
            user: user.to_owned(),
            refetched,
        }
    }
}

impl Drop for UserGuard {
    fn drop(&mut self) {
        self.app.user_streams.close(&self.user);
        self.app.downstream.user_stream_closed(&self.user);
    }
}

/// Resolves when the connection's user's answer was refetched; never for other connections.
async fn refetched(user: &mut Option<UserGuard>) -> bool {
    match user {
        Some(user) => user.refetched.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// One stream's state. The timers and the shutdown wait live as long as the connection, so a
/// fan-out wakeup registers nothing new: a data frame only notes when it was sent, and the
/// keepalive timer is re-armed when it fires (not on every frame, which would take the timer
/// wheel's lock once per client per publish).
struct Connection {
    guard: ClientGuard,
    user: Option<UserGuard>,
    /// A per-user answer was resolved once: later ones come from the cache.
    resolved: bool,
    subscriber: Subscriber,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    preamble: Option<Bytes>,
    /// A gzip-coded body: what it carried so far, for the trailer of a clean end (boxed: most
    /// streams are identity and idle connections are counted in KiB).
    gzip: Option<Box<Trailer>>,
    /// The body ended (after its trailer, if coded).
    ended: bool,
    /// A WebSocket: frames become core's [`SocketMessage`]s (text, or a gzip member).
    socket: bool,
    initial: Option<Arc<Snapshot>>,
    /// Fires `period` after the last frame of any kind (re-armed lazily, see above).
    keepalive: Pin<Box<Sleep>>,
    period: Duration,
    last_sent: Instant,
    /// The max-age close, if any.
    deadline: Option<Pin<Box<Sleep>>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Connection {
    /// The body's next bytes, in its coding; a gzip-coded body ends with its trailer.
    async fn next(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        if let Some(message) = self.next_frame().await {
            // An event-stream connection makes only text (body bytes).
            return Some(match message {
                SocketMessage::Text(bytes) | SocketMessage::Gzip(bytes) => bytes,
            });
        }
        self.ended = true;
        self.gzip
            .take()
            .map(|trailer| Bytes::copy_from_slice(&trailer.finish()))
    }

    /// The next frame: for an event stream as body bytes (`Text`, in the body's coding), for
    /// a socket as core decides its message.
    async fn next_frame(&mut self) -> Option<SocketMessage> {
        if let Some(preamble) = self.preamble.take() {
            return Some(SocketMessage::Text(preamble));
        }
        loop {
            if let Some(snapshot) = self.initial.take() {
                // At connect, a per-user answer is fetched if it is not cached.
                if let Some(frame) = self.frame(&snapshot, true).await {
                    return Some(frame);
                }
                continue;
            }
            let deadline = async {
                match &mut self.deadline {
                    Some(deadline) => deadline.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.shutdown.as_mut() => return None,
                () = deadline => return None,
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let current = self.snapshots.borrow_and_update().clone();
                    // A per-user answer is not fetched here: core's refresher does that for
                    // every streaming user under its budget, and then wakes this connection.
                    if let Some(snapshot) = current
                        && let Some(frame) = self.frame(&snapshot, false).await
                    {
                        return Some(frame);
                    }
                }
                alive = refetched(&mut self.user) => {
                    if !alive {
                        self.user = None;
                        continue;
                    }
                    let current = self.snapshots.borrow().clone();
                    if let Some(snapshot) = current
                        && let Some(frame) = self.frame(&snapshot, false).await
                    {
                        return Some(frame);
                    }
                }
                () = self.keepalive.as_mut() => {
                    let due = self.last_sent + self.period;
                    let now = Instant::now();
                    if now >= due {
                        self.last_sent = now;
                        self.keepalive.as_mut().reset(now + self.period);
                        return Some(SocketMessage::Text(match self.gzip.as_mut() {
                            Some(trailer) => {
                                let segment = gzip::keepalive();
                                trailer.add(segment);
                                segment.bytes().clone()
                            }
                            None => self.subscriber.keepalive(),
                        }));
                    }
                    // A frame went out since the timer was armed: wait out the rest.
                    self.keepalive.as_mut().reset(due);
                }
            }
        }
    }

    /// The frame for `snapshot`, or `None` when there is nothing new for this client. `fetch`:
    /// a per-user answer not cached is fetched (at connect); else the cached one is used.
    async fn frame(&mut self, snapshot: &Arc<Snapshot>, fetch: bool) -> Option<SocketMessage> {
        let frame = match self.subscriber.on_snapshot(snapshot) {
            Next::Frame(frame) => Some(frame),
            Next::Nothing => None,
            Next::Resolve(context) => {
                // On an upstream failure without cached data, send nothing now: the refresher
                // tries again after the next change. Boxed: an idle anonymous stream must not
                // carry room for a per-user fetch.
                let fetch = fetch || !self.resolved;
                let flags = Box::pin(resolve(&self.guard.app, snapshot, context, fetch)).await?;
                self.resolved = true;
                self.subscriber.on_flags(snapshot, &flags)
            }
        }?;
        let kind = self.subscriber.kind();
        self.guard.app.downstream.metrics.frames_sent(kind, 1);
        // A data frame is as good as a keepalive: the period restarts from here.
        self.last_sent = Instant::now();
        if self.socket {
            return Some(self.subscriber.socket_message(snapshot, frame));
        }
        Some(SocketMessage::Text(match self.gzip.as_mut() {
            Some(trailer) => {
                // The snapshot's own frames are compressed once for every connection.
                let segment = snapshot.gzip_segment(&frame);
                trailer.add(&segment);
                segment.bytes().clone()
            }
            None => frame,
        }))
    }
}

/// `context`'s flags for `snapshot`: local, or through the per-user cache (fetching when
/// `fetch`, else what is cached).
async fn resolve(
    app: &Arc<App>,
    snapshot: &Snapshot,
    context: Context,
    fetch: bool,
) -> Option<EvaluatedFlags> {
    match app.downstream.resolve(snapshot, context) {
        Resolved::Flags(Cow::Borrowed(flags)) => Some(flags.clone()),
        Resolved::Flags(Cow::Owned(flags)) => Some(flags),
        Resolved::User(user_id) if !fetch => app
            .downstream
            .user_cached(&user_id)
            .map(|flags| EvaluatedFlags::clone(&flags)),
        Resolved::User(user_id) => user_flags(app, &user_id, snapshot.revision())
            .await
            .flags()
            .map(|flags| EvaluatedFlags::clone(flags)),
    }
}

/// The streaming response for `subscriber`, gzip-coded when core says so for a client that
/// sent `accept_encoding` (large flag frames, each compressed once for every connection).
pub fn response(
    app: &Arc<App>,
    subscriber: Subscriber,
    accept_encoding: Option<&str>,
    current: Option<&Snapshot>,
) -> Response {
    let gzip = subscriber.coding(accept_encoding, current) == Encoding::Gzip;
    let mut connection = connection(app, subscriber, true);
    if gzip && let Some(preamble) = connection.preamble.take() {
        let mut trailer = Box::<Trailer>::default();
        connection.preamble = Some(gzip::head(&preamble, &mut trailer));
        connection.gzip = Some(trailer);
    }
    let body = futures_util::stream::unfold(connection, |mut connection| async move {
        let bytes = connection.next().await?;
        Some((Ok::<_, Infallible>(bytes), connection))
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    for (name, value) in stream::HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    }
    response
}

/// What a WebSocket client sends to learn that the connection is alive, and the answer (the
/// Worker's shard answers it without waking, see `edge-worker/src/shard.rs`).
pub const PING: &str = "ping";
/// The answer to [`PING`].
pub const PONG: &str = "pong";

/// The WebSocket transport of the same stream: each text message is exactly one frame core
/// renders for the event stream (`event:`/`id:`/`data:`), the first the snapshot an SSE client
/// gets after its `retry:` preamble. No preamble and no keepalive comments: the client keeps
/// the connection alive with [`PING`] (the Worker's hibernated objects would wake for a
/// server-side keepalive). Same metrics, limits and max-age close as the event stream. A client
/// that asked `?coding=gzip` gets each large frame as a binary message instead: the frame alone
/// as one gzip member, compressed once for every socket (core's [`SocketMessage`]).
///
/// `hold` (from the request, see [`ConnectionHold`]) lives as long as the socket, so graceful
/// shutdown waits for its close frame.
pub fn websocket(
    app: &Arc<App>,
    subscriber: Subscriber,
    upgrade: WebSocketUpgrade,
    hold: Option<ConnectionHold>,
) -> Response {
    let connection = connection(app, subscriber, false);
    let shutdown = app.shutdown.clone();
    upgrade
        // Clients only send pings: nothing large is ever read, so a small read buffer (the
        // default reserves 128 KiB per connection) and small message limits.
        .read_buffer_size(4096)
        .max_message_size(4096)
        .max_frame_size(4096)
        .on_upgrade(move |socket| async move {
            serve_socket(connection, socket, &shutdown).await;
            drop(hold);
        })
}

/// Sends the connection's frames on `socket` until either side ends; answers pings.
async fn serve_socket(
    mut connection: Connection,
    mut socket: WebSocket,
    shutdown: &CancellationToken,
) {
    loop {
        // Kept across incoming messages: a frame being resolved is never abandoned.
        let next = connection.next_frame();
        tokio::pin!(next);
        let frame = loop {
            tokio::select! {
                frame = &mut next => break frame,
                message = socket.recv() => match message {
                    Some(Ok(Message::Text(text))) if text.as_str() == PING => {
                        if socket.send(Message::Text(Utf8Bytes::from_static(PONG))).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                    // Protocol pings are answered by the socket itself; other messages ignored.
                    Some(Ok(_)) => {}
                },
            }
        };
        let Some(frame) = frame else {
            // Shutdown or max age: a clean close; the client reconnects, maybe elsewhere.
            // "Going away" (1001) is the code for a server going down.
            let (code, reason) = if shutdown.is_cancelled() {
                (close_code::AWAY, "shutting down")
            } else {
                (close_code::NORMAL, "max age")
            };
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                })))
                .await;
            return;
        };
        let message = match frame {
            // Frames are UTF-8 (JSON under ASCII field names); a text message like the SSE body.
            SocketMessage::Text(frame) => match Utf8Bytes::try_from(frame) {
                Ok(text) => Message::Text(text),
                Err(_) => return,
            },
            // A large frame for a client that asked `coding=gzip`: one gzip member, shared.
            SocketMessage::Gzip(member) => Message::Binary(member),
        };
        if socket.send(message).await.is_err() {
            return;
        }
    }
}

/// A connection's state; `sse`: with the `retry:` preamble and keepalive comments.
fn connection(app: &Arc<App>, subscriber: Subscriber, sse: bool) -> Connection {
    // Subscribe first, then read: a publish in between is seen as a change, never lost.
    let mut snapshots = app.snapshots.subscribe();
    let initial = snapshots.borrow_and_update().clone();
    // WebSocket: no keepalive comment (see `websocket`); a timer that never fires in practice.
    let period = if sse {
        subscriber.keepalive_interval()
    } else {
        Duration::from_secs(365 * 86_400)
    };
    let started = Instant::now();
    let deadline = subscriber.close_at().map(|at| {
        Box::pin(tokio::time::sleep_until(
            started + Duration::from_millis(at.as_millis().saturating_sub(now().as_millis())),
        ))
    });
    let user = subscriber
        .user_id()
        .map(|user| UserGuard::new(Arc::clone(app), user));
    Connection {
        guard: ClientGuard::new(Arc::clone(app), subscriber.kind()),
        user,
        resolved: false,
        preamble: sse.then(|| subscriber.preamble()),
        gzip: None,
        ended: false,
        socket: !sse,
        subscriber,
        snapshots,
        initial,
        keepalive: Box::pin(tokio::time::sleep_until(started + period)),
        period,
        last_sent: started,
        deadline,
        shutdown: Box::pin(app.shutdown.clone().cancelled_owned()),
    }
}
