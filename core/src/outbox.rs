//! What waits to be forwarded upstream: SDK events and aggregated telemetry, bounded in bytes.
//!
//! Clients' `/events` and `/telemetry` are answered at once; the adapter buffers them here and
//! flushes batches on its intervals. The buffers hold the events' raw JSON (no value trees) and
//! are bounded in bytes: when full, the oldest events are dropped, and telemetry for new flag
//! keys is dropped, and both are counted ([`Outbox::dropped`]), so an upstream outage or a
//! flood of clients can never grow memory without bound. A failed flush puts its batch back in
//! front of what arrived meanwhile, still within the bound.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::ApiError;
use crate::time::Timestamp;

/// Bytes of buffered events at most: 8 MiB by default (fits a 256 MiB container with room).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 << 20;
/// Distinct flags in the telemetry aggregate at most.
pub const DEFAULT_MAX_TELEMETRY_FLAGS: usize = 10_000;

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

impl Counts {
    fn add(&mut self, other: Self) {
        self.total = self.total.saturating_add(other.total);
        self.true_count = self.true_count.saturating_add(other.true_count);
        self.false_count = self.false_count.saturating_add(other.false_count);
    }
}

/// What was dropped to stay within the bounds, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Events (oldest first).
    pub events: u64,
    /// Telemetry reports for flag keys beyond the key limit.
    pub telemetry_flags: u64,
}

/// A batch taken for a flush: its body, and what to put back if the flush fails.
#[derive(Debug)]
pub struct EventsBatch {
    /// `{"events":[...]}`.
    pub body: Bytes,
    events: Vec<Box<RawValue>>,
}

/// A telemetry report taken for a flush.
#[derive(Debug)]
pub struct TelemetryBatch {
    /// `{"evaluations":{..},"period_ms":N}`.
    pub body: Bytes,
    evaluations: BTreeMap<String, Counts>,
}

/// The buffers. See the module docs.
#[derive(Debug)]
pub struct Outbox {
    events: VecDeque<Box<RawValue>>,
    event_bytes: usize,
    max_event_bytes: usize,
    telemetry: BTreeMap<String, Counts>,
    telemetry_since: Option<Timestamp>,
    max_telemetry_flags: usize,
    dropped: Dropped,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_TELEMETRY_FLAGS)
    }
}

impl Outbox {
    /// Empty buffers with these bounds.
    pub fn new(max_event_bytes: usize, max_telemetry_flags: usize) -> Self {
        Self {
            events: VecDeque::new(),
            event_bytes: 0,
            max_event_bytes,
            telemetry: BTreeMap::new(),
            telemetry_since: None,
            max_telemetry_flags,
            dropped: Dropped::default(),
        }
    }

    /// Buffers a batch `{"events":[..]}`; returns how many it held.
    ///
    /// # Errors
    /// 400 `BAD_REQUEST` when the body is not an events batch (nothing is buffered).
    pub fn push_events(&mut self, body: &[u8]) -> Result<usize, ApiError> {
        #[derive(Deserialize)]
        struct Batch {
            events: Vec<Box<RawValue>>,
        }
        let batch: Batch = serde_json::from_slice(body).map_err(|error| {
            ApiError::bad_request(format!("expected {{\"events\":[...]}}: {error}"))
        })?;
        let count = batch.events.len();
        for event in batch.events {
            self.event_bytes += event.get().len();
            self.events.push_back(event);
        }
        self.trim_events();
        Ok(count)
    }

    /// Merges a report `{"evaluations":{key:{total,true,false}}}` at `now`; returns the sum of
    /// totals.
    ///
    /// # Errors
    /// 400 `BAD_REQUEST` when the body is not a telemetry report (nothing is merged).
    pub fn push_telemetry(&mut self, now: Timestamp, body: &[u8]) -> Result<u64, ApiError> {
        #[derive(Deserialize)]
        struct Report {
            evaluations: BTreeMap<String, Counts>,
        }
        let report: Report = serde_json::from_slice(body).map_err(|error| {
            ApiError::bad_request(format!("expected {{\"evaluations\":{{...}}}}: {error}"))
        })?;
        let received = report
            .evaluations
            .values()
            .fold(0u64, |sum, c| sum.saturating_add(c.total));
        self.merge_telemetry(report.evaluations);
        self.telemetry_since.get_or_insert(now);
        Ok(received)
    }

    /// The buffered events as one batch (`None` when there are none), removed from the buffer.
    pub fn take_events(&mut self) -> Option<EventsBatch> {
        if self.events.is_empty() {
            return None;
        }
        let events: Vec<Box<RawValue>> = self.events.drain(..).collect();
        self.event_bytes = 0;
        let mut body =
            Vec::with_capacity(events.iter().map(|e| e.get().len() + 1).sum::<usize>() + 12);
        body.extend_from_slice(b"{\"events\":[");
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(event.get().as_bytes());
        }
        body.extend_from_slice(b"]}");
        Some(EventsBatch {
            body: Bytes::from(body),
            events,
        })
    }

    /// Puts a batch whose flush failed back in front of what arrived meanwhile (the oldest are
    /// dropped first if that is over the bound).
    pub fn restore_events(&mut self, batch: EventsBatch) {
        for event in batch.events.into_iter().rev() {
            self.event_bytes += event.get().len();
            self.events.push_front(event);
        }
        self.trim_events();
    }

    /// The aggregated telemetry as one report for the period since the first report (`None`
    /// when empty), removed from the buffer.
    pub fn take_telemetry(&mut self, now: Timestamp) -> Option<TelemetryBatch> {
        if self.telemetry.is_empty() {
            return None;
        }
        let evaluations = std::mem::take(&mut self.telemetry);
        let since = self.telemetry_since.take().unwrap_or(now);
        let period: Duration = now.saturating_since(since);
        #[derive(Serialize)]
        struct Report<'a> {
            evaluations: &'a BTreeMap<String, Counts>,
            period_ms: u64,
        }
        let body = serde_json::to_vec(&Report {
            evaluations: &evaluations,
            period_ms: crate::time::duration_millis(period),
        })
        .unwrap_or_default();
        Some(TelemetryBatch {
            body: Bytes::from(body),
            evaluations,
        })
    }

    /// Merges a report whose flush failed back into the aggregate.
    pub fn restore_telemetry(&mut self, now: Timestamp, batch: TelemetryBatch) {
        self.merge_telemetry(batch.evaluations);
        self.telemetry_since.get_or_insert(now);
    }

    /// Buffered events and their bytes.
    pub fn events(&self) -> (usize, usize) {
        (self.events.len(), self.event_bytes)
    }

    /// What was dropped so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    fn merge_telemetry(&mut self, evaluations: BTreeMap<String, Counts>) {
        for (key, counts) in evaluations {
            if let Some(entry) = self.telemetry.get_mut(&key) {
                entry.add(counts);
            } else if self.telemetry.len() < self.max_telemetry_flags {
                self.telemetry.insert(key, counts);
            } else {
                self.dropped.telemetry_flags += 1;
            }
        }
    }

    fn trim_events(&mut self) {
        while self.event_bytes > self.max_event_bytes {
            let Some(oldest) = self.events.pop_front() else {
                break;
            };
            self.event_bytes -= oldest.get().len();
            self.dropped.events += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_batched_as_raw_json_and_bounded_in_bytes() {
        let mut outbox = Outbox::new(40, 10);
        assert_eq!(
            outbox.push_events(br#"{"events":[{"a":1},{"b":2}]}"#),
            Ok(2)
        );
        assert!(outbox.push_events(b"[]").is_err());
        let batch = outbox.take_events().unwrap();
        assert_eq!(&batch.body[..], br#"{"events":[{"a":1},{"b":2}]}"#);
        assert!(outbox.take_events().is_none());
        // A failed flush goes back in front of what arrived meanwhile.
        outbox.push_events(br#"{"events":[{"c":3}]}"#).unwrap();
        outbox.restore_events(batch);
        assert_eq!(
            &outbox.take_events().unwrap().body[..],
            br#"{"events":[{"a":1},{"b":2},{"c":3}]}"#
        );
        // Over the byte bound: the oldest are dropped and counted.
        let big = format!(r#"{{"events":[{{"x":"{}"}}]}}"#, "y".repeat(30));
        outbox.push_events(br#"{"events":[{"old":1}]}"#).unwrap();
        outbox.push_events(big.as_bytes()).unwrap();
        assert_eq!(outbox.events().0, 1);
        assert!(outbox.events().1 <= 40);
        assert_eq!(outbox.dropped().events, 1);
    }

    #[test]
    fn telemetry_is_aggregated_over_a_bounded_key_set() {
        let mut outbox = Outbox::new(1024, 2);
        let at = Timestamp::from_millis(1_000);
        let report = br#"{"evaluations":{"a":{"total":3,"true":2,"false":1}},"period_ms":5}"#;
        assert_eq!(outbox.push_telemetry(at, report), Ok(3));
        outbox
            .push_telemetry(
                at,
                br#"{"evaluations":{"a":{"total":1,"true":1},"b":{"total":1},"c":{"total":1}}}"#,
            )
            .unwrap();
        assert_eq!(outbox.dropped().telemetry_flags, 1);
        let batch = outbox
            .take_telemetry(Timestamp::from_millis(61_000))
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        assert_eq!(body["evaluations"]["a"]["total"], 4);
        assert_eq!(body["evaluations"]["a"]["true"], 3);
        assert_eq!(body["period_ms"], 60_000);
        assert!(outbox.take_telemetry(at).is_none());
        outbox.restore_telemetry(at, batch);
        assert!(outbox.take_telemetry(at).is_some());
        assert!(outbox.push_telemetry(at, b"{}").is_err());
    }
}
