//! The upstream driver: one task that performs the I/O core's `Upstream` machine asks for.
//!
//! Loop: drain `poll_action()` under the lock → execute outside it → sleep until
//! `poll_timeout()`, an input (`Notify`) or shutdown → `handle_timeout(now)`. Fetches and the one
//! stream run in their own tasks and report back through [`UpstreamHandle::with`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header;
use rollgate_proxy_core::breaker::BreakerState;
use rollgate_proxy_core::snapshot::Revision;
use rollgate_proxy_core::upstream::{
    Action, FetchResult, RequestId, StreamEnd, StreamId, StreamState,
};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::persist::Persister;
use crate::state::{SnapshotSender, UpstreamHandle, now};

/// Runs until `shutdown`; aborts the stream on the way out.
pub async fn run(
    upstream: Arc<UpstreamHandle>,
    snapshots: SnapshotSender,
    persister: Option<Persister>,
    shutdown: CancellationToken,
) {
    let mut streams: HashMap<StreamId, AbortHandle> = HashMap::new();
    let mut last_stream = None;
    let mut last_breaker = BreakerState::Closed;
    let mut key_rejected = false;
    loop {
        let actions: Vec<Action> = upstream.drain();
        for action in actions {
            match action {
                Action::Fetch { id, if_none_match } => {
                    tokio::spawn(fetch(Arc::clone(&upstream), id, if_none_match));
                }
                Action::OpenStream(id) => {
                    tracing::debug!(%id, "opening upstream stream");
                    let task = tokio::spawn(stream(Arc::clone(&upstream), id));
                    streams.insert(id, task.abort_handle());
                }
                Action::CloseStream(id) => {
                    if let Some(task) = streams.remove(&id) {
                        task.abort();
                    }
                }
                Action::Publish(snapshot) => {
                    tracing::info!(
                        revision = snapshot.revision().get(),
                        etag = snapshot.etag(),
                        mode = snapshot.source().mode(),
                        flags = snapshot.defaults().flags.len(),
                        "publishing snapshot"
                    );
                    snapshots.send_replace(Some(snapshot));
                }
                Action::Persist { revision, bytes } => {
                    if let Some(persister) = &persister {
                        persister.save(revision, bytes);
                    }
                }
            }
        }
        streams.retain(|_, task| !task.is_finished());
        let epoch = upstream.peek(rollgate_proxy_core::upstream::Upstream::change_epoch);
        upstream.changes.send_if_modified(|seen| {
            let changed = *seen != epoch;
            *seen = epoch;
            changed
        });

        let (deadline, status) = upstream.peek(|m| (m.poll_timeout(), m.status(now())));
        if let Some(confirmed) = status.last_confirmed {
            upstream
                .last_confirmed
                .store(confirmed.as_millis().max(1), Ordering::Relaxed);
        }
        if last_stream != Some(status.stream) {
            // Connected and lost are news; the connecting/disconnected flips of a reconnect
            // loop during an outage are not (the breaker transition is logged instead).
            let error = status.last_error.as_ref().map(ToString::to_string);
            if status.stream == StreamState::Connected {
                tracing::info!("upstream stream connected");
            } else if last_stream == Some(StreamState::Connected) {
                tracing::warn!(last_error = ?error, "upstream stream lost; polling until it is back");
            } else {
                tracing::debug!(stream = status.stream.as_str(), last_error = ?error, "upstream stream state");
            }
            last_stream = Some(status.stream);
        }
        if key_rejected != status.key_rejected {
            // Not one more transient failure: nothing works until someone fixes the key.
            if status.key_rejected {
                let error = status.last_error.as_ref().map(ToString::to_string);
                tracing::error!(
                    last_error = ?error,
                    "Rollgate rejected the server API key (401); check ROLLGATE_API_KEY. Serving the last good flags and probing slowly"
                );
            } else {
                tracing::info!("Rollgate accepts the server API key again");
            }
            key_rejected = status.key_rejected;
        }
        if last_breaker != status.breaker.state {
            let error = status.last_error.as_ref().map(ToString::to_string);
            tracing::warn!(
                from = last_breaker.as_str(),
                to = status.breaker.state.as_str(),
                last_error = ?error,
                "circuit breaker changed state"
            );
            last_breaker = status.breaker.state;
        }

        let sleep_for = deadline.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(at.as_millis().saturating_sub(now().as_millis()))
        });
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = upstream.notified() => {}
            () = tokio::time::sleep_until(Instant::now() + sleep_for) => {}
        }
        upstream.with_quiet(|m| m.handle_timeout(now()));
    }
    for (_, task) in streams {
        task.abort();
    }
}

/// `GET {base}/api/v1/sdk/flags?withReasons=true` with Bearer and `If-None-Match`.
async fn fetch(upstream: Arc<UpstreamHandle>, id: RequestId, if_none_match: Option<String>) {
    let limit = upstream.peek(|m| m.max_body_bytes());
    let mut request = upstream
        .http
        .get(format!(
            "{}/api/v1/sdk/flags?withReasons=true",
            upstream.base_url
        ))
        .bearer_auth(upstream.api_key.expose())
        .timeout(upstream.timeout);
    if let Some(etag) = &if_none_match {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    let result = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let etag = response
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let retry_after = retry_after(&response);
            match read_capped(response, limit).await {
                Ok(Ok(body)) => FetchResult::Response {
                    status,
                    etag,
                    body,
                    retry_after,
                },
                Ok(Err(TooLarge)) => FetchResult::TooLarge { status, limit },
                Err(error) => FetchResult::Transport(upstream.describe(&error)),
            }
        }
        Err(error) => FetchResult::Transport(upstream.describe(&error)),
    };
    match &result {
        FetchResult::Transport(reason) => tracing::debug!(%id, reason, "flags request failed"),
        FetchResult::TooLarge { limit, .. } => {
            tracing::warn!(%id, limit, "upstream flags body over the limit; not read further");
        }
        FetchResult::Response { .. } => {}
    }
    upstream.with(|m| m.handle_fetch(now(), id, result));
}

/// A body longer than the limit: reading stopped there.
#[derive(Debug)]
pub struct TooLarge;

/// Reads `response`'s body chunk by chunk, giving up as soon as it would pass `limit` bytes
/// (a declared `Content-Length` over it is refused before any byte is read), so a huge or
/// endless answer costs at most `limit` bytes of memory.
///
/// # Errors
/// The transport failed while reading.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Result<Bytes, TooLarge>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Ok(Err(TooLarge));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(Err(TooLarge));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body.freeze()))
}

/// The response's `Retry-After` header, verbatim (core parses it).
pub fn retry_after(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `GET {base}/api/v1/sdk/stream?token=<key>` (and Bearer, for servers that want the header).
async fn stream(upstream: Arc<UpstreamHandle>, id: StreamId) {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("token", upstream.api_key.expose())
        .finish();
    let response = upstream
        .http
        .get(format!("{}/api/v1/sdk/stream?{query}", upstream.base_url))
        .bearer_auth(upstream.api_key.expose())
        .header(header::ACCEPT, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            let reason = upstream.describe(&error);
            upstream.with(|m| m.handle_stream_closed(now(), id, StreamEnd::Error(reason)));
            return;
        }
    };
    let status = response.status().as_u16();
    let is_event_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let retry_after = retry_after(&response);
    upstream.with(|m| {
        m.handle_stream_opened(now(), id, status, is_event_stream, retry_after.as_deref());
    });
    if status != 200 || !is_event_stream {
        return;
    }
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => upstream.with(|m| m.handle_stream_bytes(now(), id, &bytes)),
            Err(error) => {
                let reason = upstream.describe(&error);
                upstream.with(|m| m.handle_stream_closed(now(), id, StreamEnd::Error(reason)));
                return;
            }
        }
    }
    upstream.with(|m| m.handle_stream_closed(now(), id, StreamEnd::Eof));
}

/// Loads the persisted snapshot `bytes` into the machine, if they are a usable one; returns
/// its revision when it was taken.
pub fn restore(upstream: &UpstreamHandle, bytes: Option<Bytes>) -> Option<Revision> {
    let bytes = bytes?;
    match upstream.with_quiet(|m| m.restore(&bytes)) {
        Ok(revision) => {
            tracing::info!("restored the persisted snapshot; serving it until upstream answers");
            Some(revision)
        }
        Err(error) => {
            tracing::warn!(%error, "ignoring the persisted snapshot");
            None
        }
    }
}
