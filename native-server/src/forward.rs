//! Forwarding to Rollgate: core's outbox (events and telemetry, bounded in bytes) flushed in
//! batches on its intervals, and single bodies (`/identify`) sent at once; every request
//! admitted and recorded by the breaker, its outcome recorded in core's metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rollgate_proxy_core::breaker::Outcome;
use rollgate_proxy_core::downstream::forward_path;
use rollgate_proxy_core::metrics::{SideOutcome, SideRequest};
use rollgate_proxy_core::outbox::Outbox;
use tokio_util::sync::CancellationToken;

use crate::identify::IdentifyGates;
use crate::runtime::{lock, now};
use crate::upstream::UpstreamHandle;

/// Records how a forwarded request ended (core's metrics, owned by the caller).
pub trait Record: Fn(SideRequest, SideOutcome) + Send + Sync + 'static {}
impl<F: Fn(SideRequest, SideOutcome) + Send + Sync + 'static> Record for F {}

/// When the outbox is flushed.
#[derive(Clone, Copy, Debug)]
pub struct Intervals {
    /// Events.
    pub events: Duration,
    /// Telemetry.
    pub telemetry: Duration,
}

/// Flushes events and telemetry on their intervals and once more at shutdown.
pub async fn run(
    outbox: Arc<Mutex<Outbox>>,
    upstream: Arc<UpstreamHandle>,
    intervals: Intervals,
    shutdown: CancellationToken,
    record: impl Record,
) {
    let mut events_tick = tokio::time::interval(intervals.events);
    let mut telemetry_tick = tokio::time::interval(intervals.telemetry);
    events_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    telemetry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval is immediate; skip it.
    events_tick.tick().await;
    telemetry_tick.tick().await;
    let mut reported = lock(&outbox).dropped();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = events_tick.tick() => flush_events(&outbox, &upstream, &record).await,
            _ = telemetry_tick.tick() => flush_telemetry(&outbox, &upstream, &record).await,
        }
        // At most one line per flush, however much was dropped (the metric has the counts).
        let dropped = lock(&outbox).dropped();
        if dropped != reported {
            tracing::warn!(
                events = dropped.events - reported.events,
                telemetry_flags = dropped.telemetry_flags - reported.telemetry_flags,
                "outbox full: dropped buffered data (see rollgate_proxy_dropped_total)"
            );
            reported = dropped;
        }
    }
    flush_events(&outbox, &upstream, &record).await;
    flush_telemetry(&outbox, &upstream, &record).await;
}

async fn flush_events(outbox: &Mutex<Outbox>, upstream: &UpstreamHandle, record: &impl Record) {
    if lock(outbox).events().0 == 0 {
        return;
    }
    // Ask the breaker before building the batch: while it is open nothing is copied.
    if !admit(upstream, SideRequest::Events, record) {
        return;
    }
    let Some(batch) = lock(outbox).take_events() else {
        return;
    };
    if !post(upstream, SideRequest::Events, batch.body.clone(), record).await {
        lock(outbox).restore_events(batch);
    }
}

async fn flush_telemetry(outbox: &Mutex<Outbox>, upstream: &UpstreamHandle, record: &impl Record) {
    let Some(batch) = lock(outbox).take_telemetry(now()) else {
        return;
    };
    if !admit(upstream, SideRequest::Telemetry, record)
        || !post(upstream, SideRequest::Telemetry, batch.body.clone(), record).await
    {
        lock(outbox).restore_telemetry(now(), batch);
    }
}

/// Forwards `user`'s identify upstream in the background, through the breaker; the user's
/// fetches wait for it (`gates`), so Rollgate sees the attributes before evaluating for them.
pub fn identify(
    upstream: Arc<UpstreamHandle>,
    gates: Arc<IdentifyGates>,
    user: String,
    body: Bytes,
    record: impl Record,
) {
    // Taken now, so a flood of identifies is refused at once instead of queueing tasks.
    let Some(slot) = upstream.side_slot(SideRequest::Identify) else {
        record(SideRequest::Identify, SideOutcome::Busy);
        return;
    };
    gates.begin(&user);
    tokio::spawn(async move {
        if admit(&upstream, SideRequest::Identify, &record) {
            post(&upstream, SideRequest::Identify, body, &record).await;
        }
        drop(slot);
        gates.end(&user);
    });
}

/// Whether a request of `kind` may go now: the breaker, and no `Retry-After` holding that kind
/// back (a refusal is counted; the data stays buffered).
fn admit(upstream: &UpstreamHandle, kind: SideRequest, record: &impl Record) -> bool {
    let admitted = upstream.with(|machine| machine.admit_forward(now(), kind));
    if !admitted {
        record(kind, SideOutcome::Rejected);
    }
    admitted
}

/// POSTs a JSON body upstream (already admitted); records the outcome in the breaker and the
/// metrics and returns whether upstream accepted it.
async fn post(
    upstream: &UpstreamHandle,
    kind: SideRequest,
    body: Bytes,
    record: &impl Record,
) -> bool {
    let path = forward_path(kind);
    let result = upstream
        .http
        .post(format!("{}{path}", upstream.base_url))
        .bearer_auth(upstream.api_key.expose())
        .timeout(upstream.timeout)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let ok = match result {
        Ok(response) if response.status().is_success() => true,
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = crate::driver::retry_after(&response);
            // A 429/503 `Retry-After` pauses this kind; a 401 is the rejected key; a 403 and
            // the rest are ordinary failures.
            upstream.with(|machine| {
                machine.record_forward_response(now(), kind, status, retry_after.as_deref());
            });
            tracing::warn!(
                kind = kind.label(),
                status,
                retry_after = retry_after.as_deref(),
                "upstream refused forwarded data"
            );
            false
        }
        Err(error) => {
            tracing::warn!(kind = kind.label(), error = %upstream.describe(&error), "forwarding failed");
            false
        }
    };
    let outcome = if ok {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    upstream.with(|machine| machine.record_side_request(now(), outcome));
    record(
        kind,
        if ok {
            SideOutcome::Ok
        } else {
            SideOutcome::Error
        },
    );
    ok
}
