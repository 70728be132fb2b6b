//! SSE connections: the I/O around core's `Subscriber` (the frontend stream, the Rollgate SDK
//! stream and OFREP notifications).
//!
//! Core decides every frame; this module subscribes to the snapshot watch **before** reading the
//! current snapshot (so no publish falls between the two), hands each snapshot to the
//! subscriber, resolves per-user flags, and times keepalives and the max-age close. A slow
//! client only ever gets the newest snapshot (watch semantics, no buffer). Before the first
//! snapshot exists the stream is accepted and sends keepalives: SDK clients fail permanently on
//! a non-200 stream answer.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use rollgate_proxy_core::downstream::Resolved;
use rollgate_proxy_core::model::{Context, EvaluatedFlags};
use rollgate_proxy_core::snapshot::Snapshot;
use rollgate_proxy_core::stream::{self, Next, Subscriber};
use tokio::sync::watch;
use tokio::time::{Instant, Interval};

use crate::runtime::now;
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

struct Connection {
    guard: ClientGuard,
    user: Option<UserGuard>,
    /// A per-user answer was resolved once: later ones come from the cache.
    resolved: bool,
    subscriber: Subscriber,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    preamble: Option<Bytes>,
    initial: Option<Arc<Snapshot>>,
    keepalive: Interval,
    deadline: Option<Instant>,
}

impl Connection {
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(preamble) = self.preamble.take() {
            return Some(preamble);
        }
        loop {
            if let Some(snapshot) = self.initial.take() {
                // At connect, a per-user answer is fetched if it is not cached.
                if let Some(frame) = self.frame(&snapshot, true).await {
                    return Some(frame);
                }
                continue;
            }
            let app = Arc::clone(&self.guard.app);
            let far = Instant::now() + Duration::from_secs(86_400 * 365);
            tokio::select! {
                biased;
                () = app.shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(self.deadline.unwrap_or(far)) => return None,
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
                _ = self.keepalive.tick() => return Some(self.subscriber.keepalive()),
            }
        }
    }

    /// The frame for `snapshot`, or `None` when there is nothing new for this client. `fetch`:
    /// a per-user answer not cached is fetched (at connect); else the cached one is used.
    async fn frame(&mut self, snapshot: &Arc<Snapshot>, fetch: bool) -> Option<Bytes> {
        let frame = match self.subscriber.on_snapshot(snapshot) {
            Next::Frame(frame) => Some(frame),
            Next::Nothing => None,
            Next::Resolve(context) => {
                // On an upstream failure without cached data, send nothing now: the refresher
                // tries again after the next change.
                let fetch = fetch || !self.resolved;
                let flags = resolve(&self.guard.app, snapshot, context, fetch).await?;
                self.resolved = true;
                self.subscriber.on_flags(snapshot, &flags)
            }
        }?;
        let kind = self.subscriber.kind();
        self.guard.app.downstream.metrics.frames_sent(kind, 1);
        // A data frame is as good as a keepalive: restart the period.
        self.keepalive.reset();
        Some(frame)
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

/// The streaming response for `subscriber`.
pub fn response(app: &Arc<App>, subscriber: Subscriber) -> Response {
    // Subscribe first, then read: a publish in between is seen as a change, never lost.
    let mut snapshots = app.snapshots.subscribe();
    let initial = snapshots.borrow_and_update().clone();
    let period = subscriber.keepalive_interval();
    let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = subscriber.close_at().map(|at| {
        Instant::now() + Duration::from_millis(at.as_millis().saturating_sub(now().as_millis()))
    });
    let user = subscriber
        .user_id()
        .map(|user| UserGuard::new(Arc::clone(app), user));
    let connection = Connection {
        guard: ClientGuard::new(Arc::clone(app), subscriber.kind()),
        user,
        resolved: false,
        preamble: Some(subscriber.preamble()),
        subscriber,
        snapshots,
        initial,
        keepalive,
        deadline,
    };
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
    response
}
