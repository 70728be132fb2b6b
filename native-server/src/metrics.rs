//! Prometheus metrics (prefix `rollgate_proxy_`): recording helpers and the `/api/metrics` text.
//!
//! Labels are route templates and fixed words, never raw paths, user ids or keys.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rollgate_proxy_core::upstream::{StreamState, UpstreamError};

use crate::state::{App, lock, now};

const REQUEST_SECONDS: &str = "rollgate_proxy_http_request_duration_seconds";
const REQUESTS_TOTAL: &str = "rollgate_proxy_http_requests_total";

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests embedding the server twice); then
        // this handle renders an empty registry, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// One answered request.
///
/// The hot path: plain atomics in a table indexed by route and status label (no label keys
/// built, no registry lookups, no per-sample storage). [`render`] turns them into the
/// `rollgate_proxy_http_requests_total` counter and the
/// `rollgate_proxy_http_request_duration_seconds` histogram at scrape time.
pub fn request(route: &'static str, status: u16, elapsed: Duration) {
    let status = status_slot(status);
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    match route_slot(route) {
        Some(slot) => REQUESTS[slot].record(status, nanos),
        // A route label this table does not know yet: counted in a locked side list.
        None => {
            let mut others = lock(&OTHER_ROUTES);
            let stats = match others.iter().position(|(label, _)| *label == route) {
                Some(i) => &others[i].1,
                None => {
                    others.push((route, Box::default()));
                    &others[others.len() - 1].1
                }
            };
            stats.record(status, nanos);
        }
    }
}

/// Upper bounds of the latency buckets in nanoseconds, and as rendered in `le`.
const BUCKETS: [(u64, &str); 15] = [
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
];

/// Every label `Route::label` gives, plus `unmatched`; the index is the slot in [`REQUESTS`].
const ROUTE_LABELS: [&str; 19] = [
    "/api/flags",
    "/api/flags/:key",
    "/api/stream",
    "/api/health",
    "/api/metrics",
    "/api/v1/sdk/flags",
    "/api/v1/sdk/stream",
    "/api/v1/sdk/identify",
    "/api/v1/sdk/events",
    "/api/v1/sdk/telemetry",
    "/health",
    "/ofrep/v1/evaluate/flags/:key",
    "/ofrep/v1/evaluate/flags",
    "/ofrep/v1/sse",
    "/live",
    "/ready",
    "/",
    "/asset",
    "unmatched",
];

fn route_slot(route: &str) -> Option<usize> {
    ROUTE_LABELS.iter().position(|label| *label == route)
}

/// The status labels, in [`status_slot`] order.
const STATUS_LABELS: [&str; 19] = [
    "200", "204", "304", "400", "401", "404", "405", "408", "413", "414", "431", "500", "502",
    "503", "1xx", "2xx", "3xx", "4xx", "5xx",
];

fn status_slot(status: u16) -> usize {
    match status {
        200 => 0,
        204 => 1,
        304 => 2,
        400 => 3,
        401 => 4,
        404 => 5,
        405 => 6,
        408 => 7,
        413 => 8,
        414 => 9,
        431 => 10,
        500 => 11,
        502 => 12,
        503 => 13,
        _ => match status / 100 {
            1 => 14,
            2 => 15,
            3 => 16,
            4 => 17,
            _ => 18,
        },
    }
}

/// Counts and latency of one route: per-status counts, per-bucket (not cumulative) counts,
/// the sum in nanoseconds.
#[derive(Debug)]
struct RouteStats {
    statuses: [AtomicU64; STATUS_LABELS.len()],
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for RouteStats {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteStats {
    const fn new() -> Self {
        Self {
            statuses: [const { AtomicU64::new(0) }; STATUS_LABELS.len()],
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn record(&self, status: usize, nanos: u64) {
        self.statuses[status].fetch_add(1, Ordering::Relaxed);
        let bucket = BUCKETS
            .iter()
            .position(|(bound, _)| nanos <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Appends this route's histogram series (nothing when it saw no request).
    fn render_histogram(&self, route: &str, out: &mut String) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return;
        }
        let mut cumulative = 0;
        for ((_, le), n) in BUCKETS.iter().zip(&counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{REQUEST_SECONDS}_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{REQUEST_SECONDS}_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "{REQUEST_SECONDS}_sum{{route=\"{route}\"}} {sum}");
        let _ = writeln!(out, "{REQUEST_SECONDS}_count{{route=\"{route}\"}} {count}");
    }

    /// Hands the per-status totals to the exporter (it renders the counter family).
    fn publish_counts(&self, route: &'static str) {
        for (label, n) in STATUS_LABELS.iter().zip(&self.statuses) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                counter!(REQUESTS_TOTAL, "route" => route, "status" => *label).absolute(n);
            }
        }
    }
}

static REQUESTS: [RouteStats; ROUTE_LABELS.len()] =
    [const { RouteStats::new() }; ROUTE_LABELS.len()];

/// Routes whose label is not in [`ROUTE_LABELS`] (none today; a safety net for new routes).
static OTHER_ROUTES: Mutex<Vec<(&'static str, Box<RouteStats>)>> = Mutex::new(Vec::new());

/// Local rules evaluations, counted here and handed to the exporter at scrape time.
static EVALUATIONS: AtomicU64 = AtomicU64::new(0);

/// An SSE connection opened (+1) or closed (-1).
pub fn sse_clients(stream: &'static str, delta: f64) {
    gauge!("rollgate_proxy_sse_clients", "stream" => stream).increment(delta);
}

/// One SSE data frame written. Called once per client per publish, so it is an atomic on a
/// fixed label set (handed to the exporter at scrape time), not a registry lookup.
pub fn frame_sent(stream: &'static str) {
    count(&FRAMES_SENT, &FRAME_STREAMS, stream);
}

/// One per-user cache lookup: `hit`, `miss`, `stale` or `error`.
pub fn user_cache(result: &'static str) {
    count(&USER_CACHE, &USER_CACHE_RESULTS, result);
}

/// Adds one to the counter of `label` in a fixed label set; an unknown label (a programming
/// error) is counted under the last one rather than lost.
fn count<const N: usize>(counters: &[AtomicU64; N], labels: &[&str; N], label: &str) {
    let index = labels.iter().position(|l| *l == label).unwrap_or(N - 1);
    counters[index].fetch_add(1, Ordering::Relaxed);
}

/// Hands the non-zero counters of a fixed label set to the exporter.
fn publish<const N: usize>(
    name: &'static str,
    label: &'static str,
    counters: &[AtomicU64; N],
    labels: &[&'static str; N],
) {
    for (counter, value) in counters.iter().zip(labels) {
        let n = counter.load(Ordering::Relaxed);
        if n > 0 {
            counter!(name, label => *value).absolute(n);
        }
    }
}

const FRAME_STREAMS: [&str; 3] = ["frontend", "sdk", "ofrep"];
static FRAMES_SENT: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
const USER_CACHE_RESULTS: [&str; 4] = ["hit", "miss", "stale", "error"];
static USER_CACHE: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// One upstream request made outside the machine (per-user fetches, forwarding).
pub fn upstream_request(kind: &'static str, outcome: &'static str) {
    counter!("rollgate_proxy_upstream_requests_total", "kind" => kind, "outcome" => outcome)
        .increment(1);
}

/// `n` items discarded because a bounded buffer was full (`events`: buffered SDK events,
/// oldest first; `telemetry_flags`: telemetry for flags beyond the per-flush bound).
pub fn dropped(what: &'static str, n: u64) {
    counter!("rollgate_proxy_dropped_total", "what" => what).increment(n);
}

/// One local rules evaluation for a context.
pub fn evaluation() {
    EVALUATIONS.fetch_add(1, Ordering::Relaxed);
}

/// Refreshes the gauges that are read from state, then renders the text format.
pub fn render(app: &App, handle: &PrometheusHandle) -> String {
    let snapshot = app.current();
    gauge!("rollgate_proxy_snapshot_revision")
        .set(snapshot.as_ref().map_or(0.0, |s| s.revision().get() as f64));
    if let Some(confirmed) = app.last_confirmed() {
        gauge!("rollgate_proxy_snapshot_age_seconds")
            .set(now().saturating_since(confirmed).as_secs_f64());
    }
    gauge!("rollgate_proxy_flags").set(snapshot.map_or(0.0, |s| s.defaults().flags.len() as f64));
    let stats = app.cache.stats();
    counter!("rollgate_proxy_cache_requests_total", "result" => "hit").absolute(stats.hits);
    counter!("rollgate_proxy_cache_requests_total", "result" => "miss").absolute(stats.misses);
    counter!("rollgate_proxy_cache_requests_total", "result" => "stale").absolute(stats.stale_hits);
    gauge!("rollgate_proxy_sse_connections").set(app.sse_clients.load(Ordering::Relaxed) as f64);
    gauge!("rollgate_proxy_user_cache_entries").set(app.users.len() as f64);
    if let Some(upstream) = &app.upstream {
        let status = upstream.status();
        let c = status.counters;
        gauge!("rollgate_proxy_upstream_connected").set(
            if status.stream == StreamState::Connected {
                1.0
            } else {
                0.0
            },
        );
        gauge!("rollgate_proxy_breaker_state").set(status.breaker.state.gauge());
        // 1 while Rollgate refuses the server key: retries cannot fix that, an operator must.
        let key_rejected = matches!(
            status.last_error,
            Some(UpstreamError::Status {
                status: 401 | 403,
                ..
            })
        );
        gauge!("rollgate_proxy_upstream_key_rejected").set(if key_rejected { 1.0 } else { 0.0 });
        counter!("rollgate_proxy_breaker_opens_total").absolute(status.breaker.opens_total);
        counter!("rollgate_proxy_upstream_stream_connects_total").absolute(c.stream_connects);
        // Every successful open after the first is a reconnect.
        counter!("rollgate_proxy_upstream_reconnects_total")
            .absolute(c.stream_connects.saturating_sub(1));
        counter!("rollgate_proxy_upstream_stream_errors_total").absolute(c.stream_errors);
        counter!("rollgate_proxy_upstream_events_total").absolute(c.events);
        counter!("rollgate_proxy_upstream_malformed_total").absolute(c.malformed);
        let flags = [
            ("ok", c.fetch_ok),
            ("not_modified", c.fetch_not_modified),
            ("error", c.fetch_errors),
            ("rejected", c.breaker_rejections),
        ];
        for (outcome, value) in flags {
            counter!("rollgate_proxy_upstream_requests_total", "kind" => "flags", "outcome" => outcome)
                .absolute(value);
        }
    } else {
        gauge!("rollgate_proxy_upstream_connected").set(0.0);
        gauge!("rollgate_proxy_breaker_state").set(0.0);
        gauge!("rollgate_proxy_upstream_key_rejected").set(0.0);
    }
    publish(
        "rollgate_proxy_sse_frames_sent_total",
        "stream",
        &FRAMES_SENT,
        &FRAME_STREAMS,
    );
    publish(
        "rollgate_proxy_user_cache_total",
        "result",
        &USER_CACHE,
        &USER_CACHE_RESULTS,
    );
    let evaluations = EVALUATIONS.load(Ordering::Relaxed);
    if evaluations > 0 {
        counter!("rollgate_proxy_evaluations_total").absolute(evaluations);
    }
    for (route, stats) in ROUTE_LABELS.iter().zip(&REQUESTS) {
        stats.publish_counts(route);
    }
    let others = lock(&OTHER_ROUTES);
    for (route, stats) in others.iter() {
        stats.publish_counts(route);
    }
    let mut histograms = String::new();
    for (route, stats) in ROUTE_LABELS.iter().zip(&REQUESTS) {
        stats.render_histogram(route, &mut histograms);
    }
    for (route, stats) in others.iter() {
        stats.render_histogram(route, &mut histograms);
    }
    drop(others);
    let mut text = handle.render();
    if !histograms.is_empty() {
        if !text.is_empty() && !text.ends_with("\n\n") {
            text.push('\n');
        }
        let _ = writeln!(text, "# TYPE {REQUEST_SECONDS} histogram");
        text.push_str(&histograms);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollgate_proxy_core::api::Route;

    #[test]
    fn every_route_label_has_a_slot() {
        let routes = [
            ("GET", "/api/flags"),
            ("GET", "/api/flags/some-key"),
            ("GET", "/api/stream"),
            ("GET", "/api/health"),
            ("GET", "/api/metrics"),
            ("GET", "/api/v1/sdk/flags"),
            ("GET", "/api/v1/sdk/stream"),
            ("POST", "/api/v1/sdk/identify"),
            ("POST", "/api/v1/sdk/events"),
            ("POST", "/api/v1/sdk/telemetry"),
            ("GET", "/health"),
            ("POST", "/ofrep/v1/evaluate/flags/some-key"),
            ("POST", "/ofrep/v1/evaluate/flags"),
            ("GET", "/ofrep/v1/sse"),
            ("GET", "/live"),
            ("GET", "/ready"),
            ("GET", "/"),
            ("GET", "/demo.js"),
        ];
        for (method, path) in routes {
            let label = Route::parse(method, path).map_or("unmatched", |r| r.label());
            assert_ne!(label, "unmatched", "{method} {path}");
            assert_eq!(route_slot(label).map(|i| ROUTE_LABELS[i]), Some(label));
        }
        assert_eq!(route_slot("unmatched"), Some(ROUTE_LABELS.len() - 1));
        assert_eq!(route_slot("/nope"), None);
    }

    #[test]
    fn status_slots_name_the_status() {
        for status in [
            200, 204, 304, 400, 401, 404, 405, 408, 413, 414, 431, 500, 502, 503,
        ] {
            assert_eq!(STATUS_LABELS[status_slot(status)], status.to_string());
        }
        let classes = [
            (101, "1xx"),
            (201, "2xx"),
            (302, "3xx"),
            (418, "4xx"),
            (504, "5xx"),
        ];
        for (status, label) in classes {
            assert_eq!(STATUS_LABELS[status_slot(status)], label);
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_le_inclusive() {
        let stats = RouteStats::new();
        stats.record(0, 100_000);
        stats.record(0, 100_001);
        stats.record(5, 6_000_000_000);
        let mut out = String::new();
        stats.render_histogram("/x", &mut out);
        let line = |le: &str| format!("{REQUEST_SECONDS}_bucket{{route=\"/x\",le=\"{le}\"}} ");
        assert!(out.contains(&format!("{}1\n", line("0.0001"))), "{out}");
        assert!(out.contains(&format!("{}2\n", line("0.00025"))), "{out}");
        assert!(out.contains(&format!("{}2\n", line("5"))), "{out}");
        assert!(out.contains(&format!("{}3\n", line("+Inf"))), "{out}");
        assert!(out.contains(&format!("{REQUEST_SECONDS}_count{{route=\"/x\"}} 3\n")));
        assert!(out.contains(&format!(
            "{REQUEST_SECONDS}_sum{{route=\"/x\"}} 6.000200001\n"
        )));
        let mut empty = String::new();
        RouteStats::new().render_histogram("/y", &mut empty);
        assert!(empty.is_empty());
    }
}
