//! The body of one open `/api/v1/sdk/stream` response: queued frames, stalls, heartbeats, drops.

use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::frames;
use super::server::ConnProbe;
use super::state::{Shared, StreamEntry};
use super::types::{DropKind, Heartbeat};

/// Removes the stream from the registry when hyper drops the body (client gone, connection
/// closed, or the stream ended), so `open_streams` is always what is really open.
#[derive(Debug)]
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.with(|inner| {
            if inner.streams.remove(&self.id).is_some() {
                inner.stats.open_streams = inner.stats.open_streams.saturating_sub(1);
            }
        });
    }
}

struct StreamState {
    data: mpsc::UnboundedReceiver<Bytes>,
    end: mpsc::UnboundedReceiver<DropKind>,
    stall: watch::Receiver<bool>,
    heartbeat: watch::Receiver<Option<Heartbeat>>,
    next_beat: Option<Instant>,
    finished: bool,
    _registration: Registration,
}

/// Registers a stream for `user` and returns its body. The initial frames are computed under
/// the same lock that registers the stream, so no change can fall between snapshot and
/// subscription (a change is either in the snapshot or delivered after it).
///
/// Streams whose clients have already closed are counted out first, so a client that closes a
/// stream and then opens another is never seen with two open.
pub(crate) fn open(shared: &Arc<Shared>, user: Option<String>, probe: Option<ConnProbe>) -> Body {
    let (data_tx, data_rx) = mpsc::unbounded_channel();
    let (end_tx, end_rx) = mpsc::unbounded_channel();
    let id = shared.with(|inner| {
        let before = inner.streams.len();
        inner
            .streams
            .retain(|_, stream| !stream.probe.as_ref().is_some_and(ConnProbe::peer_closed));
        let closed = (before - inner.streams.len()) as u64;
        inner.stats.open_streams = inner.stats.open_streams.saturating_sub(closed);
        for frame in inner.initial_frames(user.as_deref()) {
            let _ = data_tx.send(frame);
        }
        let id = inner.next_stream_id;
        inner.next_stream_id += 1;
        inner.streams.insert(
            id,
            StreamEntry {
                user,
                data: data_tx,
                end: end_tx,
                probe,
            },
        );
        inner.stats.streams_accepted += 1;
        inner.stats.open_streams += 1;
        inner.stats.peak_open_streams = inner.stats.peak_open_streams.max(inner.stats.open_streams);
        id
    });
    let mut heartbeat = shared.heartbeat.subscribe();
    let next_beat = beat_deadline(*heartbeat.borrow_and_update());
    let mut stall = shared.stall.subscribe();
    stall.borrow_and_update();
    let state = StreamState {
        data: data_rx,
        end: end_rx,
        stall,
        heartbeat,
        next_beat,
        finished: false,
        _registration: Registration {
            shared: Arc::clone(shared),
            id,
        },
    };
    Body::from_stream(futures_util::stream::unfold(state, next_chunk))
}

fn beat_deadline(hb: Option<Heartbeat>) -> Option<Instant> {
    hb.filter(|h| !h.interval.is_zero() && (h.comment || h.event))
        .map(|h| Instant::now() + h.interval)
}

fn heartbeat_bytes(hb: Heartbeat) -> Bytes {
    let mut out = Vec::new();
    if hb.comment {
        out.extend_from_slice(frames::KEEPALIVE_COMMENT);
    }
    if hb.event {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        out.extend_from_slice(&frames::event("heartbeat", &frames::heartbeat_json(ms)));
    }
    Bytes::from(out)
}

/// Yields the next chunk to write. An `Err` makes hyper abort the connection mid-body, which is
/// how `DropKind::Abort` reaches the client; `None` ends the body cleanly.
async fn next_chunk(mut st: StreamState) -> Option<(Result<Bytes, io::Error>, StreamState)> {
    if st.finished {
        return None;
    }
    loop {
        let stalled = *st.stall.borrow_and_update();
        let beat_at = if stalled { None } else { st.next_beat };
        tokio::select! {
            biased;
            kind = st.end.recv() => {
                return match kind {
                    Some(DropKind::Abort) => {
                        st.finished = true;
                        Some((Err(io::Error::other("stream aborted by the mock")), st))
                    }
                    _ => None,
                };
            }
            changed = st.stall.changed() => {
                changed.ok()?;
                // Leaving a stall re-arms the keepalive from now, as a fresh connection would.
                if !*st.stall.borrow_and_update() {
                    st.next_beat = beat_deadline(*st.heartbeat.borrow());
                }
            }
            changed = st.heartbeat.changed() => {
                changed.ok()?;
                st.next_beat = beat_deadline(*st.heartbeat.borrow_and_update());
            }
            msg = st.data.recv(), if !stalled => return msg.map(|b| (Ok(b), st)),
            () = sleep_until_opt(beat_at), if beat_at.is_some() => {
                let hb = *st.heartbeat.borrow();
                st.next_beat = beat_deadline(hb);
                if let Some(hb) = hb {
                    return Some((Ok(heartbeat_bytes(hb)), st));
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
