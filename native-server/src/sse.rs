//! SSE responses: the frontend stream, the Rollgate SDK stream and OFREP notifications.
//!
//! Every byte comes from core (`retry_frame`, the snapshot's pre-built frames, per-user frames
//! from `render`, `KEEPALIVE`). Each connection subscribes to the snapshot watch **before**
//! reading the current snapshot, so no publish falls between the two; a slow client only ever
//! gets the newest snapshot (watch semantics, no buffer). Before the first snapshot exists the
//! stream is accepted and sends keepalives, then the snapshot when it arrives: SDK clients fail
//! permanently on a non-200 stream answer.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, header};
use rollgate_proxy_core::api;
use rollgate_proxy_core::model::Context;
use rollgate_proxy_core::render;
use rollgate_proxy_core::snapshot::Snapshot;
use rollgate_proxy_core::sse::encode::KEEPALIVE;
use tokio::sync::watch;
use tokio::time::{Instant, Interval};

use crate::metrics as m;
use crate::routes::context_flags;
use crate::state::{App, jittered};

/// How long clients wait before reconnecting (the `retry:` field sent first).
pub const RETRY: Duration = Duration::from_millis(2000);

/// Which stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// `GET /api/stream`: `event: flags` with the bare map.
    Frontend,
    /// `GET /api/v1/sdk/stream`: `event: init` with `{"flags":..}`.
    Sdk,
    /// `GET /ofrep/v1/sse`: `refetchEvaluation` notifications.
    Ofrep,
}

impl StreamKind {
    fn label(self) -> &'static str {
        match self {
            Self::Frontend => "frontend",
            Self::Sdk => "sdk",
            Self::Ofrep => "ofrep",
        }
    }
}

/// Counts the connection while it lives.
struct ClientGuard {
    app: Arc<App>,
    kind: StreamKind,
}

impl ClientGuard {
    fn new(app: Arc<App>, kind: StreamKind) -> Self {
        app.sse_clients.fetch_add(1, Ordering::Relaxed);
        m::sse_clients(kind.label(), 1.0);
        Self { app, kind }
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.app.sse_clients.fetch_sub(1, Ordering::Relaxed);
        m::sse_clients(self.kind.label(), -1.0);
    }
}

struct Connection {
    guard: ClientGuard,
    kind: StreamKind,
    context: Context,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    queue: VecDeque<Bytes>,
    initial: Option<Arc<Snapshot>>,
    keepalive: Interval,
    deadline: Option<Instant>,
    /// The last per-user flag map sent (per-user streams skip changes that do not change it).
    last_sent: Option<BTreeMap<String, bool>>,
}

impl Connection {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.queue.pop_front() {
                return Some(bytes);
            }
            if let Some(snapshot) = self.initial.take() {
                if let Some(frame) = self.render(&snapshot).await {
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
                    if let Some(snapshot) = current
                        && let Some(frame) = self.render(&snapshot).await
                    {
                        return Some(frame);
                    }
                }
                _ = self.keepalive.tick() => return Some(Bytes::from_static(KEEPALIVE)),
            }
        }
    }

    /// The frame for `snapshot`, or `None` when there is nothing new for this client.
    async fn render(&mut self, snapshot: &Arc<Snapshot>) -> Option<Bytes> {
        let frame = if self.kind == StreamKind::Ofrep || self.context.is_anonymous() {
            match self.kind {
                StreamKind::Frontend => snapshot.flags_frame().clone(),
                StreamKind::Sdk => snapshot.init_frame().clone(),
                StreamKind::Ofrep => snapshot.ofrep_frame().clone(),
            }
        } else {
            // Per user: evaluated locally (rules) or from the per-user cache; on an upstream
            // failure without cached data, send nothing now and try again on the next change.
            let flags = context_flags(&self.guard.app, snapshot, self.context.clone())
                .await
                .ok()?;
            if self.last_sent.as_ref() == Some(&flags.flags) {
                return None;
            }
            let frame = if self.kind == StreamKind::Sdk {
                render::init_frame(&flags, snapshot.event_id())
            } else {
                render::flags_frame(&flags, snapshot.event_id())
            };
            self.last_sent = Some(flags.into_owned().flags);
            frame
        };
        m::frame_sent(self.kind.label());
        Some(frame)
    }
}

/// Opens a stream for `context`; `last_event_id` suppresses the initial snapshot when current.
pub fn response(
    app: &Arc<App>,
    kind: StreamKind,
    context: Context,
    last_event_id: Option<&str>,
) -> Response {
    // Subscribe first, then read: a publish in between is seen as a change, never lost.
    let mut snapshots = app.snapshots.subscribe();
    let current = snapshots.borrow_and_update().clone();
    let initial = current
        .filter(|snapshot| !last_event_id.is_some_and(|id| snapshot.is_current_event_id(id)));
    let period = match kind {
        StreamKind::Sdk => app.settings.sdk_keepalive,
        StreamKind::Frontend | StreamKind::Ofrep => app.settings.keepalive,
    };
    let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let connection = Connection {
        guard: ClientGuard::new(Arc::clone(app), kind),
        kind,
        context,
        snapshots,
        queue: VecDeque::from([render::retry_frame(RETRY)]),
        initial,
        keepalive,
        deadline: app
            .settings
            .sse_max_age
            .map(|age| Instant::now() + jittered(age, 0.1)),
        last_sent: None,
    };
    let stream = futures_util::stream::unfold(connection, |mut connection| async move {
        let bytes = connection.next().await?;
        Some((Ok::<_, Infallible>(bytes), connection))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(api::EVENT_STREAM),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
