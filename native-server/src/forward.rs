//! SDK events and telemetry: answered at once, buffered (bounded), forwarded upstream in batches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rollgate_proxy_core::api::ApiError;
use rollgate_proxy_core::breaker::Outcome;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::state::{App, UpstreamHandle, lock, now};

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
pub struct Forwarder {
    events: std::sync::Mutex<Vec<serde_json::Value>>,
    telemetry: std::sync::Mutex<Telemetry>,
}

impl Forwarder {
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
            m::dropped("events", excess as u64);
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
                m::dropped("telemetry_flags", 1);
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

/// Flushes events and telemetry on their intervals and once more at shutdown.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let Some(upstream) = app.upstream.clone() else {
        return;
    };
    let mut events_tick = tokio::time::interval(app.settings.events_flush_interval);
    let mut telemetry_tick = tokio::time::interval(app.settings.telemetry_flush_interval);
    events_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    telemetry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval is immediate; skip it.
    events_tick.tick().await;
    telemetry_tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = events_tick.tick() => flush_events(&app, &upstream).await,
            _ = telemetry_tick.tick() => flush_telemetry(&app, &upstream).await,
        }
    }
    flush_events(&app, &upstream).await;
    flush_telemetry(&app, &upstream).await;
}

async fn flush_events(app: &App, upstream: &UpstreamHandle) {
    let events = app.forwarder.take_events();
    if events.is_empty() {
        return;
    }
    let body = serde_json::json!({ "events": events });
    if !post(upstream, "events", "/api/v1/sdk/events", &body).await {
        let serde_json::Value::Object(mut body) = body else {
            return;
        };
        if let Some(serde_json::Value::Array(events)) = body.remove("events") {
            app.forwarder.restore_events(events);
        }
    }
}

async fn flush_telemetry(app: &App, upstream: &UpstreamHandle) {
    let Some((evaluations, period)) = app.forwarder.take_telemetry() else {
        return;
    };
    let body = serde_json::json!({
        "evaluations": evaluations,
        "period_ms": u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
    });
    if !post(upstream, "telemetry", "/api/v1/sdk/telemetry", &body).await {
        app.forwarder.restore_telemetry(evaluations);
    }
}

/// Forwards an identify upstream (fire and forget, through the breaker).
pub fn identify(upstream: Arc<UpstreamHandle>, body: Bytes) {
    tokio::spawn(async move {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return;
        };
        post(&upstream, "identify", "/api/v1/sdk/identify", &value).await;
    });
}

/// POSTs JSON upstream if the breaker admits it; returns whether upstream accepted it.
async fn post(
    upstream: &UpstreamHandle,
    kind: &'static str,
    path: &str,
    body: &serde_json::Value,
) -> bool {
    if !upstream.with(|machine| machine.admit_side_request(now())) {
        m::upstream_request(kind, "rejected");
        return false;
    }
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
                kind,
                status = response.status().as_u16(),
                "upstream refused forwarded data"
            );
            false
        }
        Err(error) => {
            tracing::warn!(kind, error = %upstream.describe(&error), "forwarding failed");
            false
        }
    };
    let outcome = if ok {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    upstream.with(|machine| machine.record_side_request(now(), outcome));
    m::upstream_request(kind, if ok { "ok" } else { "error" });
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_telemetry_are_counted_and_bounded() {
        let forwarder = Forwarder::default();
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
