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
use rollgate_proxy_core::upstream::{Action, FetchResult, RequestId, StreamEnd, StreamId};
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
                Action::Persist(bytes) => {
                    if let Some(persister) = &persister {
                        persister.save(bytes);
                    }
                }
            }
        }
        streams.retain(|_, task| !task.is_finished());

        let (deadline, status) = upstream.peek(|m| (m.poll_timeout(), m.status(now())));
        if let Some(confirmed) = status.last_confirmed {
            upstream
                .last_confirmed
                .store(confirmed.as_millis().max(1), Ordering::Relaxed);
        }
        if last_stream != Some(status.stream) {
            let error = status.last_error.as_ref().map(ToString::to_string);
            tracing::info!(stream = status.stream.as_str(), last_error = ?error, "upstream stream state");
            last_stream = Some(status.stream);
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
        upstream.with(|m| m.handle_timeout(now()));
    }
    for (_, task) in streams {
        task.abort();
    }
}

/// `GET {base}/api/v1/sdk/flags?withReasons=true` with Bearer and `If-None-Match`.
async fn fetch(upstream: Arc<UpstreamHandle>, id: RequestId, if_none_match: Option<String>) {
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
            match response.bytes().await {
                Ok(body) => FetchResult::Response { status, etag, body },
                Err(error) => FetchResult::Transport(upstream.describe(&error)),
            }
        }
        Err(error) => FetchResult::Transport(upstream.describe(&error)),
    };
    if let FetchResult::Transport(reason) = &result {
        tracing::debug!(%id, reason, "flags request failed");
    }
    upstream.with(|m| m.handle_fetch(now(), id, result));
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
    upstream.with(|m| m.handle_stream_opened(now(), id, status, is_event_stream));
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

/// Loads the persisted snapshot into the machine, if there is a usable one.
pub fn restore(upstream: &UpstreamHandle, bytes: Option<Bytes>) {
    let Some(bytes) = bytes else { return };
    match upstream.with(|m| m.restore(&bytes)) {
        Ok(()) => {
            tracing::info!("restored the persisted snapshot; serving it until upstream answers")
        }
        Err(error) => tracing::warn!(%error, "ignoring the persisted snapshot"),
    }
}
