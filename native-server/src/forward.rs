//! Forwarding to Rollgate: SDK events and telemetry buffered (bounded) and sent in batches, and
//! single bodies (`/identify`) sent at once; every request admitted and recorded by the breaker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rollgate_proxy_core::api::ApiError;
use rollgate_proxy_core::breaker::Outcome;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use rollgate_proxy_core::metrics::{SideOutcome, SideRequest};

use crate::runtime::{lock, now};
use crate::upstream::UpstreamHandle;

/// Records how a forwarded request ended (core's metrics, owned by the caller).
pub trait Record: Fn(SideRequest, SideOutcome) + Send + Sync + 'static {}
impl<F: Fn(SideRequest, SideOutcome) + Send + Sync + 'static> Record for F {}

/// Most events held while upstream is unreachable; older ones are dropped first.
pub const MAX_BUFFERED_EVENTS: usize = 10_000;
/// Most distinct flags in the telemetry aggregate.
const MAX_TELEMETRY_FLAGS: usize = 10_000;

/// Evaluation counts of one flag, as the SDKs report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// All evaluations.
    #[serde(default)]
    pub total: u64,
    /// Evaluations that returned `true`.
    #[serde(default, rename = "true")]
    pub true_count: u64,
    /// Evaluations that returned `false`.
    #[serde(default, rename = "false")]
    pub false_count: u64,
}

#[derive(Debug)]
struct Telemetry {
    evaluations: BTreeMap<String, Counts>,
    since: Instant,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            evaluations: BTreeMap::new(),
            since: Instant::now(),
        }
    }
}

/// The buffers.
#[derive(Debug, Default)]
pub struct Outbox {
    events: std::sync::Mutex<Vec<serde_json::Value>>,
    telemetry: std::sync::Mutex<Telemetry>,
}

impl Outbox {
    /// Buffers a batch `{"events":[..]}`; returns how many it held.
    ///
    /// # Errors
    /// 400 `BAD_REQUEST` when the body is not an events batch.
    pub fn push_events(&self, body: &[u8]) -> Result<usize, ApiError> {
        #[derive(Deserialize)]
        struct Batch {
            events: Vec<serde_json::Value>,
        }
        let batch: Batch = serde_json::from_slice(body).map_err(|error| {
            ApiError::bad_request(format!("expected {{\"events\":[...]}}: {error}"))
        })?;
        let count = batch.events.len();
        let mut events = lock(&self.events);
        events.extend(batch.events);
        if events.len() > MAX_BUFFERED_EVENTS {
            let excess = events.len() - MAX_BUFFERED_EVENTS;
            events.drain(..excess);
        }
        Ok(count)
    }

    /// Merges a report `{"evaluations":{key:{total,true,false}}}`; returns the sum of totals.
    ///
    /// # Errors
    /// 400 `BAD_REQUEST` when the body is not a telemetry report.
    pub fn push_telemetry(&self, body: &[u8]) -> Result<u64, ApiError> {
        #[derive(Deserialize)]
        struct Report {
            evaluations: BTreeMap<String, Counts>,
        }
        let report: Report = serde_json::from_slice(body).map_err(|error| {
            ApiError::bad_request(format!("expected {{\"evaluations\":{{...}}}}: {error}"))
        })?;
        let mut telemetry = lock(&self.telemetry);
        let mut received = 0u64;
        for (key, counts) in report.evaluations {
            received = received.saturating_add(counts.total);
            let full = telemetry.evaluations.len() >= MAX_TELEMETRY_FLAGS;
            if full && !telemetry.evaluations.contains_key(&key) {
                continue;
            }
            let entry = telemetry.evaluations.entry(key).or_default();
            entry.total = entry.total.saturating_add(counts.total);
            entry.true_count = entry.true_count.saturating_add(counts.true_count);
            entry.false_count = entry.false_count.saturating_add(counts.false_count);
        }
        Ok(received)
    }

    fn take_events(&self) -> Vec<serde_json::Value> {
        std::mem::take(&mut *lock(&self.events))
    }

    fn restore_events(&self, mut failed: Vec<serde_json::Value>) {
        let mut events = lock(&self.events);
        failed.append(&mut events);
        if failed.len() > MAX_BUFFERED_EVENTS {
            let excess = failed.len() - MAX_BUFFERED_EVENTS;
            failed.drain(..excess);
        }
        *events = failed;
    }

    fn take_telemetry(&self) -> Option<(BTreeMap<String, Counts>, Duration)> {
        let mut telemetry = lock(&self.telemetry);
        if telemetry.evaluations.is_empty() {
            return None;
        }
        let taken = std::mem::take(&mut *telemetry);
        Some((taken.evaluations, taken.since.elapsed()))
    }

    fn restore_telemetry(&self, failed: BTreeMap<String, Counts>) {
        let mut telemetry = lock(&self.telemetry);
        for (key, counts) in failed {
            let entry = telemetry.evaluations.entry(key).or_default();
            entry.total = entry.total.saturating_add(counts.total);
            entry.true_count = entry.true_count.saturating_add(counts.true_count);
            entry.false_count = entry.false_count.saturating_add(counts.false_count);
        }
    }
}

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
    outbox: Arc<Outbox>,
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
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = events_tick.tick() => flush_events(&outbox, &upstream, &record).await,
            _ = telemetry_tick.tick() => flush_telemetry(&outbox, &upstream, &record).await,
        }
    }
    flush_events(&outbox, &upstream, &record).await;
    flush_telemetry(&outbox, &upstream, &record).await;
}

async fn flush_events(outbox: &Outbox, upstream: &UpstreamHandle, record: &impl Record) {
    let events = outbox.take_events();
    if events.is_empty() {
        return;
    }
    let body = serde_json::json!({ "events": events });
    if !post(upstream, SideRequest::Events, &body, record).await {
        let serde_json::Value::Object(mut body) = body else {
            return;
        };
        if let Some(serde_json::Value::Array(events)) = body.remove("events") {
            outbox.restore_events(events);
        }
    }
}

async fn flush_telemetry(outbox: &Outbox, upstream: &UpstreamHandle, record: &impl Record) {
    let Some((evaluations, period)) = outbox.take_telemetry() else {
        return;
    };
    let body = serde_json::json!({
        "evaluations": evaluations,
        "period_ms": u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
    });
    if !post(upstream, SideRequest::Telemetry, &body, record).await {
        outbox.restore_telemetry(evaluations);
    }
}

/// Forwards an identify upstream (in the background, through the breaker).
pub fn identify(upstream: Arc<UpstreamHandle>, body: Bytes, record: impl Record) {
    tokio::spawn(async move {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return;
        };
        post(&upstream, SideRequest::Identify, &value, &record).await;
    });
}

/// POSTs JSON upstream if the breaker admits it; returns whether upstream accepted it.
async fn post(
    upstream: &UpstreamHandle,
    kind: SideRequest,
    body: &serde_json::Value,
    record: &impl Record,
) -> bool {
    if !upstream.with(|machine| machine.admit_side_request(now())) {
        record(kind, SideOutcome::Rejected);
        return false;
    }
    let path = match kind {
        SideRequest::Identify => "/api/v1/sdk/identify",
        SideRequest::Events => "/api/v1/sdk/events",
        SideRequest::Telemetry | SideRequest::UserFlags => "/api/v1/sdk/telemetry",
    };
    let kind_label = kind.label();
    let result = upstream
        .http
        .post(format!("{}{path}", upstream.base_url))
        .bearer_auth(upstream.api_key.expose())
        .timeout(upstream.timeout)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).unwrap_or_default())
        .send()
        .await;
    let ok = match result {
        Ok(response) if response.status().is_success() => true,
        Ok(response) => {
            tracing::warn!(
                kind = kind_label,
                status = response.status().as_u16(),
                "upstream refused forwarded data"
            );
            false
        }
        Err(error) => {
            tracing::warn!(kind = kind_label, error = %upstream.describe(&error), "forwarding failed");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_telemetry_are_counted_and_bounded() {
        let forwarder = Outbox::default();
        assert_eq!(forwarder.push_events(br#"{"events":[{},{}]}"#).unwrap(), 2);
        assert!(forwarder.push_events(b"[]").is_err());
        assert_eq!(
            forwarder
                .push_telemetry(
                    br#"{"evaluations":{"a":{"total":3,"true":2,"false":1}},"period_ms":5}"#
                )
                .unwrap(),
            3
        );
        forwarder
            .push_telemetry(br#"{"evaluations":{"a":{"total":1,"true":1}}}"#)
            .unwrap();
        let (evaluations, _) = forwarder.take_telemetry().unwrap();
        assert_eq!(
            evaluations["a"],
            Counts {
                total: 4,
                true_count: 3,
                false_count: 1
            }
        );
        let big: Vec<serde_json::Value> = vec![serde_json::json!({}); MAX_BUFFERED_EVENTS];
        forwarder.restore_events(big);
        assert_eq!(forwarder.take_events().len(), MAX_BUFFERED_EVENTS);
    }
}
