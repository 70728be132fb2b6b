//! Prometheus metrics (prefix `rollgate_proxy_`): recording helpers and the `/api/metrics` text.
//!
//! Labels are route templates and fixed words, never raw paths, user ids or keys.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rollgate_proxy_core::upstream::StreamState;

use crate::state::{App, now};

const REQUEST_SECONDS: &str = "rollgate_proxy_http_request_duration_seconds";

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_SECONDS.to_owned()),
                &[
                    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests embedding the server twice); then
        // this handle renders an empty registry, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// One answered request.
pub fn request(route: &'static str, status: u16, elapsed: Duration) {
    counter!("rollgate_proxy_http_requests_total", "route" => route, "status" => status_label(status))
        .increment(1);
    histogram!(REQUEST_SECONDS, "route" => route).record(elapsed.as_secs_f64());
}

/// An SSE connection opened (+1) or closed (-1).
pub fn sse_clients(stream: &'static str, delta: f64) {
    gauge!("rollgate_proxy_sse_clients", "stream" => stream).increment(delta);
}

/// One SSE data frame written.
pub fn frame_sent(stream: &'static str) {
    counter!("rollgate_proxy_sse_frames_sent_total", "stream" => stream).increment(1);
}

/// One per-user cache lookup: `hit`, `miss`, `stale` or `error`.
pub fn user_cache(result: &'static str) {
    counter!("rollgate_proxy_user_cache_total", "result" => result).increment(1);
}

/// One upstream request made outside the machine (per-user fetches, forwarding).
pub fn upstream_request(kind: &'static str, outcome: &'static str) {
    counter!("rollgate_proxy_upstream_requests_total", "kind" => kind, "outcome" => outcome)
        .increment(1);
}

/// One local rules evaluation for a context.
pub fn evaluation() {
    counter!("rollgate_proxy_evaluations_total").increment(1);
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
        counter!("rollgate_proxy_breaker_opens_total").absolute(status.breaker.opens_total);
        counter!("rollgate_proxy_upstream_reconnects_total").absolute(c.stream_connects);
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
    }
    handle.render()
}

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        414 => "414",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        _ => match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}
