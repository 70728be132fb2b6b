//! The metrics both adapters publish: plain atomic counters, and one Prometheus text renderer.
//!
//! [`Metrics`] is recorded into on the hot paths (an atomic add on a fixed slot: no label keys
//! built, no registry lookup, no per-sample storage) and rendered at scrape time with
//! [`Metrics::render`], together with the gauges read from state ([`Scrape`]). Every family is
//! always rendered with its `# HELP` and `# TYPE` lines, so both targets expose the same names,
//! types and labels even where one has no samples (the Worker's isolates do not aggregate
//! per-request latency). Labels are route templates and fixed words, never raw paths, user ids
//! or keys.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::snapshot::CacheStats;
use crate::snapshot::Freshness;
use crate::stream::StreamKind;
use crate::upstream::{StreamState, UpstreamStatus};

/// Prefix of every metric.
pub const PREFIX: &str = "rollgate_proxy_";

/// Every label `Route::label` gives, plus `preflight` (CORS `OPTIONS`) and `unmatched`; the
/// index is the slot in the table.
pub const ROUTE_LABELS: [&str; 20] = [
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
    "preflight",
    "unmatched",
];

/// The status labels, in [`status_slot`] order.
const STATUS_LABELS: [&str; 19] = [
    "200", "204", "304", "400", "401", "404", "405", "408", "413", "414", "431", "500", "502",
    "503", "1xx", "2xx", "3xx", "4xx", "5xx",
];

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

/// Kinds of upstream requests made outside the protocol machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideRequest {
    /// A per-user flags fetch (evaluated mode).
    UserFlags,
    /// A forwarded `/identify`.
    Identify,
    /// A forwarded events batch.
    Events,
    /// A forwarded telemetry report.
    Telemetry,
}

impl SideRequest {
    /// Every kind.
    pub const ALL: [Self; 4] = [
        Self::UserFlags,
        Self::Identify,
        Self::Events,
        Self::Telemetry,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::UserFlags => "user_flags",
            Self::Identify => "identify",
            Self::Events => "events",
            Self::Telemetry => "telemetry",
        }
    }

    /// Index in [`SideRequest::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::UserFlags => 0,
            Self::Identify => 1,
            Self::Events => 2,
            Self::Telemetry => 3,
        }
    }
}

/// Most upstream requests of one [`SideRequest`] kind in flight at once, per process or
/// object: past it a request is not sent (counted as `busy`), so a flood of clients or a hanging
/// upstream can never open thousands of upstream connections.
pub const MAX_SIDE_REQUESTS_IN_FLIGHT: usize = 32;

/// How a side request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideOutcome {
    /// Upstream accepted it.
    Ok,
    /// It failed (status, transport, timeout).
    Error,
    /// The breaker did not admit it.
    Rejected,
    /// Too many of its kind were in flight ([`MAX_SIDE_REQUESTS_IN_FLIGHT`]): not sent.
    Busy,
}

impl SideOutcome {
    const LABELS: [&'static str; 4] = ["ok", "error", "rejected", "busy"];

    /// Every outcome, in label order.
    pub const ALL: [Self; 4] = [Self::Ok, Self::Error, Self::Rejected, Self::Busy];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    fn index(self) -> usize {
        match self {
            Self::Ok => 0,
            Self::Error => 1,
            Self::Rejected => 2,
            Self::Busy => 3,
        }
    }
}

const USER_CACHE_RESULTS: [&str; 4] = ["hit", "miss", "stale", "error"];

/// Counts and latency of one route: per-status counts, per-bucket (not cumulative) counts,
/// the sum in nanoseconds.
#[derive(Debug)]
struct RouteStats {
    statuses: [AtomicU64; STATUS_LABELS.len()],
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl RouteStats {
    const fn new() -> Self {
        Self {
            statuses: [const { AtomicU64::new(0) }; STATUS_LABELS.len()],
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn record(&self, status: usize, nanos: Option<u64>) {
        self.statuses[status].fetch_add(1, Ordering::Relaxed);
        if let Some(nanos) = nanos {
            let bucket = BUCKETS
                .iter()
                .position(|(bound, _)| nanos <= *bound)
                .unwrap_or(BUCKETS.len());
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
            self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    /// Adds `other`'s counts to these.
    fn add(&self, other: &Self) {
        let add = |to: &AtomicU64, from: &AtomicU64| {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for (to, from) in self.statuses.iter().zip(&other.statuses) {
            add(to, from);
        }
        for (to, from) in self.buckets.iter().zip(&other.buckets) {
            add(to, from);
        }
        add(&self.sum_nanos, &other.sum_nanos);
    }
}

/// How many copies of the per-request counters there are: each thread records into one
/// (threads take them in turn), so two cores answering requests at once do not move the same
/// cache lines back and forth on every request; a scrape adds them up.
const SHARDS: usize = 4;

/// The counters every answered request touches, one copy per [`SHARDS`], each on its own cache
/// lines.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    requests: [RouteStats; ROUTE_LABELS.len()],
    cache: [AtomicU64; 3],
}

impl Shard {
    const fn new() -> Self {
        Self {
            requests: [const { RouteStats::new() }; ROUTE_LABELS.len()],
            cache: [const { AtomicU64::new(0) }; 3],
        }
    }
}

/// This thread's shard.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

/// The counters of one environment. Cheap to record into from any thread.
#[derive(Debug)]
pub struct Metrics {
    shards: [Shard; SHARDS],
    sse_clients: [AtomicU64; 3],
    frames_sent: [AtomicU64; 3],
    user_cache: [AtomicU64; 4],
    evaluations: AtomicU64,
    side: [[AtomicU64; 4]; 4],
    shed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The gauges read from state at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// The upstream machine's status (`None` in local mode).
    pub upstream: Option<UpstreamStatus>,
    /// Served revision (0 before any data).
    pub revision: u64,
    /// Time since upstream (or the local file) last confirmed the data.
    pub data_age: Option<Duration>,
    /// Flags in the served snapshot.
    pub flags: usize,
    /// Users in the per-user cache.
    pub user_cache_entries: usize,
    /// What the rules-mode cache of rendered per-context answers did, and what it holds.
    pub rendered: crate::rendered::RenderedStats,
    /// Rendered per-context answers held.
    pub rendered_entries: usize,
    /// The per-user refresher's backlog and counters.
    pub user_refresh: crate::refresh::RefreshStats,
    /// What the bounded buffers dropped (the adapter's outbox).
    pub dropped: crate::outbox::Dropped,
    /// Open SSE clients per shard object (the Worker only; empty elsewhere, and then the
    /// family is not rendered).
    pub shard_clients: Vec<(u32, u64)>,
    /// WebSocket connects refused because their shard object was full (the Worker; the native
    /// server refuses none beyond what refuses an SSE stream).
    pub sockets_refused: u64,
    /// The adapter's snapshot writes to durable storage; `None` where nothing is persisted
    /// (no snapshot file, local mode), and then the families are not rendered.
    pub persisted: Option<PersistReport>,
}

/// What an adapter's writes of [`crate::upstream::Action::Persist`] did, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistReport {
    /// Revision of the snapshot in durable storage: the last one written, or the one loaded at
    /// start (0: none).
    pub revision: u64,
    /// Writes that failed.
    pub failures: u64,
}

impl Metrics {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            shards: [const { Shard::new() }; SHARDS],
            sse_clients: [const { AtomicU64::new(0) }; 3],
            frames_sent: [const { AtomicU64::new(0) }; 3],
            user_cache: [const { AtomicU64::new(0) }; 4],
            evaluations: AtomicU64::new(0),
            side: [const { [const { AtomicU64::new(0) }; 4] }; 4],
            shed: AtomicU64::new(0),
        }
    }

    /// One answered request: its route label (`Route::label` or `unmatched`), status and, where
    /// the adapter measures it, latency.
    pub fn request(&self, route: &str, status: u16, elapsed: Option<Duration>) {
        let slot = ROUTE_LABELS
            .iter()
            .position(|label| *label == route)
            .unwrap_or(ROUTE_LABELS.len() - 1);
        let nanos = elapsed.map(|e| u64::try_from(e.as_nanos()).unwrap_or(u64::MAX));
        self.shards[shard_index()].requests[slot].record(status_slot(status), nanos);
    }

    /// An SSE connection of `kind` opened.
    pub fn stream_opened(&self, kind: StreamKind) {
        self.sse_clients[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// An SSE connection of `kind` closed.
    pub fn stream_closed(&self, kind: StreamKind) {
        let _ = self.sse_clients[kind.index()].fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |n| Some(n.saturating_sub(1)),
        );
    }

    /// Sets the open connections of `kind` (an adapter that counts them elsewhere, such as the
    /// Worker's shard objects).
    pub fn set_stream_clients(&self, kind: StreamKind, clients: u64) {
        self.sse_clients[kind.index()].store(clients, Ordering::Relaxed);
    }

    /// Open SSE connections, all kinds.
    pub fn stream_clients(&self) -> u64 {
        self.sse_clients
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Open SSE connections of `kind`.
    pub fn stream_clients_of(&self, kind: StreamKind) -> u64 {
        self.sse_clients[kind.index()].load(Ordering::Relaxed)
    }

    /// `n` data frames of `kind` written.
    pub fn frames_sent(&self, kind: StreamKind, n: u64) {
        self.frames_sent[kind.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the frames of `kind` written so far (an adapter that counts them elsewhere).
    pub fn set_frames_sent(&self, kind: StreamKind, total: u64) {
        self.frames_sent[kind.index()].store(total, Ordering::Relaxed);
    }

    /// One answer served from data of this freshness.
    pub fn cache(&self, freshness: Freshness) {
        let slot = match freshness {
            Freshness::Fresh => 0,
            Freshness::Missing => 1,
            Freshness::Stale => 2,
        };
        self.shards[shard_index()].cache[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Answers by freshness (`/api/health`'s `cache`).
    pub fn cache_stats(&self) -> CacheStats {
        let total = |slot: usize| {
            self.shards
                .iter()
                .map(|shard| shard.cache[slot].load(Ordering::Relaxed))
                .sum()
        };
        CacheStats {
            hits: total(0),
            misses: total(1),
            stale_hits: total(2),
        }
    }

    /// One per-user cache result: `hit`, `miss`, `stale` or `error`.
    pub fn user_cache(&self, result: &str) {
        let slot = USER_CACHE_RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(USER_CACHE_RESULTS.len() - 1);
        self.user_cache[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// One request shed under overload.
    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    /// One local rules evaluation for a context.
    pub fn evaluation(&self) {
        self.evaluations.fetch_add(1, Ordering::Relaxed);
    }

    /// One upstream request outside the machine.
    pub fn side_request(&self, kind: SideRequest, outcome: SideOutcome) {
        self.side[kind.index()][outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` side requests of `kind` that ended with `outcome` (reported in a batch).
    pub fn side_requests(&self, kind: SideRequest, outcome: SideOutcome, n: u64) {
        self.side[kind.index()][outcome.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Only the request families (`http_requests_total`, `http_request_duration_seconds`) of
    /// [`Metrics::render`]: what an adapter of several environments renders for the requests
    /// it answered before routing them to any environment (refused keys, unknown environments,
    /// the combined health and metrics), so they are not counted under one environment.
    pub fn render_requests(&self) -> String {
        let mut out = String::with_capacity(1024);
        self.render_request_families(&mut out);
        out
    }

    /// Every route's counts, the shards added up.
    fn request_totals(&self) -> [RouteStats; ROUTE_LABELS.len()] {
        let totals = [const { RouteStats::new() }; ROUTE_LABELS.len()];
        for shard in &self.shards {
            for (total, stats) in totals.iter().zip(&shard.requests) {
                total.add(stats);
            }
        }
        totals
    }

    fn render_request_families(&self, out: &mut String) {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let requests = self.request_totals();
        family(
            out,
            "http_requests_total",
            "counter",
            "Answered HTTP requests by route template and status.",
        );
        for (route, stats) in ROUTE_LABELS.iter().zip(&requests) {
            for (status, n) in STATUS_LABELS.iter().zip(&stats.statuses) {
                let n = load(n);
                if n > 0 {
                    sample(
                        out,
                        "http_requests_total",
                        &[("route", route), ("status", status)],
                        n,
                    );
                }
            }
        }
        family(
            out,
            "http_request_duration_seconds",
            "histogram",
            "Time to answer (to the start of the body for streams), by route template.",
        );
        for (route, stats) in ROUTE_LABELS.iter().zip(&requests) {
            render_histogram(out, route, stats);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, scrape: &Scrape) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        self.render_request_families(&mut out);
        family(
            &mut out,
            "sse_clients",
            "gauge",
            "Open SSE client connections by stream.",
        );
        for kind in StreamKind::ALL {
            sample(
                &mut out,
                "sse_clients",
                &[("stream", kind.label())],
                load(&self.sse_clients[kind.index()]),
            );
        }
        gauge(
            &mut out,
            "sse_connections",
            "Open SSE client connections, all streams.",
            self.stream_clients() as f64,
        );
        if !scrape.shard_clients.is_empty() {
            family(
                &mut out,
                "sse_shard_clients",
                "gauge",
                "Open SSE client connections per shard object (Cloudflare Worker only).",
            );
            for (shard, clients) in &scrape.shard_clients {
                sample(
                    &mut out,
                    "sse_shard_clients",
                    &[("shard", &shard.to_string())],
                    *clients,
                );
            }
        }
        family(
            &mut out,
            "websocket_refused_total",
            "counter",
            "Stream WebSocket connects refused because their shard object was full.",
        );
        sample(
            &mut out,
            "websocket_refused_total",
            &[],
            scrape.sockets_refused,
        );
        family(
            &mut out,
            "sse_frames_sent_total",
            "counter",
            "SSE data frames written to clients, by stream.",
        );
        for kind in StreamKind::ALL {
            sample(
                &mut out,
                "sse_frames_sent_total",
                &[("stream", kind.label())],
                load(&self.frames_sent[kind.index()]),
            );
        }
        let stats = self.cache_stats();
        family(
            &mut out,
            "cache_requests_total",
            "counter",
            "Flag answers by the freshness of the data they came from.",
        );
        for (result, n) in [
            ("hit", stats.hits),
            ("miss", stats.misses),
            ("stale", stats.stale_hits),
        ] {
            sample(&mut out, "cache_requests_total", &[("result", result)], n);
        }
        family(
            &mut out,
            "user_cache_total",
            "counter",
            "Per-user answer lookups in evaluated mode, by result.",
        );
        for (result, n) in USER_CACHE_RESULTS.iter().zip(&self.user_cache) {
            sample(&mut out, "user_cache_total", &[("result", result)], load(n));
        }
        gauge(
            &mut out,
            "user_cache_entries",
            "Users in the per-user answer cache.",
            scrape.user_cache_entries as f64,
        );
        let refresh = &scrape.user_refresh;
        gauge(
            &mut out,
            "user_refresh_backlog",
            "Streaming users waiting for their per-user answer to be refreshed after an upstream change.",
            refresh.backlog as f64,
        );
        gauge(
            &mut out,
            "user_refresh_backlog_oldest_seconds",
            "Age of the oldest per-user refresh waiting (0 when none waits).",
            refresh.oldest.map_or(0.0, |age| age.as_secs_f64()),
        );
        gauge(
            &mut out,
            "user_refresh_in_flight",
            "Per-user refreshes in flight toward Rollgate.",
            refresh.in_flight as f64,
        );
        family(
            &mut out,
            "user_refresh_total",
            "counter",
            "Per-user refreshes after upstream changes, by result.",
        );
        for (result, n) in [("done", refresh.done), ("failed", refresh.failed)] {
            sample(&mut out, "user_refresh_total", &[("result", result)], n);
        }
        family(
            &mut out,
            "user_refresh_untracked_total",
            "counter",
            "Per-user streams not refreshed on changes because the tracked users were at their bound.",
        );
        sample(
            &mut out,
            "user_refresh_untracked_total",
            &[],
            refresh.dropped,
        );
        family(
            &mut out,
            "rendered_cache_total",
            "counter",
            "Rules-mode per-context answers: served rendered (hit), evaluated (miss), or dropped to stay within the byte bound (evicted).",
        );
        let rendered = scrape.rendered;
        for (result, n) in [
            ("hit", rendered.hits),
            ("miss", rendered.misses),
            ("evicted", rendered.evicted),
        ] {
            sample(&mut out, "rendered_cache_total", &[("result", result)], n);
        }
        gauge(
            &mut out,
            "rendered_cache_entries",
            "Rendered per-context answers held (rules mode).",
            scrape.rendered_entries as f64,
        );
        family(
            &mut out,
            "shed_total",
            "counter",
            "Requests answered 503 OVERLOADED because too many were in flight.",
        );
        sample(&mut out, "shed_total", &[], load(&self.shed));
        family(
            &mut out,
            "dropped_total",
            "counter",
            "Items dropped to keep buffers within their byte bounds, by what.",
        );
        sample(
            &mut out,
            "dropped_total",
            &[("what", "events")],
            scrape.dropped.events,
        );
        sample(
            &mut out,
            "dropped_total",
            &[("what", "telemetry_flags")],
            scrape.dropped.telemetry_flags,
        );
        family(
            &mut out,
            "evaluations_total",
            "counter",
            "Local rules evaluations for a context.",
        );
        sample(&mut out, "evaluations_total", &[], load(&self.evaluations));
        self.render_upstream(&mut out, scrape);
        gauge(
            &mut out,
            "snapshot_revision",
            "Revision of the served snapshot (0 before any data).",
            scrape.revision as f64,
        );
        if let Some(persisted) = scrape.persisted {
            gauge(
                &mut out,
                "snapshot_persisted_revision",
                "Revision of the snapshot in durable storage: the last written or the one loaded at start (0: none).",
                persisted.revision as f64,
            );
            family(
                &mut out,
                "snapshot_persist_failures_total",
                "counter",
                "Snapshot writes to durable storage that failed.",
            );
            sample(
                &mut out,
                "snapshot_persist_failures_total",
                &[],
                persisted.failures,
            );
        }
        gauge(
            &mut out,
            "snapshot_age_seconds",
            "Seconds since upstream (or the local file) last confirmed the data.",
            scrape.data_age.map_or(0.0, |age| age.as_secs_f64()),
        );
        gauge(
            &mut out,
            "flags",
            "Flags in the served snapshot.",
            scrape.flags as f64,
        );
        out
    }

    fn render_upstream(&self, out: &mut String, scrape: &Scrape) {
        let status = scrape.upstream.as_ref();
        let counters = status.map(|s| s.counters).unwrap_or_default();
        gauge(
            out,
            "upstream_connected",
            "1 while the upstream stream is open.",
            f64::from(u8::from(
                status.is_some_and(|s| s.stream == StreamState::Connected),
            )),
        );
        family(
            out,
            "upstream_requests_total",
            "counter",
            "Upstream requests by kind and outcome.",
        );
        for (outcome, n) in [
            ("ok", counters.fetch_ok),
            ("not_modified", counters.fetch_not_modified),
            ("error", counters.fetch_errors),
            ("rejected", counters.breaker_rejections),
        ] {
            sample(
                out,
                "upstream_requests_total",
                &[("kind", "flags"), ("outcome", outcome)],
                n,
            );
        }
        for kind in SideRequest::ALL {
            for (outcome, n) in SideOutcome::LABELS.iter().zip(&self.side[kind.index()]) {
                sample(
                    out,
                    "upstream_requests_total",
                    &[("kind", kind.label()), ("outcome", outcome)],
                    n.load(Ordering::Relaxed),
                );
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, n: u64| {
            family(out, name, "counter", help);
            sample(out, name, &[], n);
        };
        counter(
            out,
            "upstream_stream_connects_total",
            "Upstream streams opened.",
            counters.stream_connects,
        );
        counter(
            out,
            "upstream_reconnects_total",
            "Upstream streams opened after the first (connects - 1).",
            counters.stream_connects.saturating_sub(1),
        );
        counter(
            out,
            "upstream_stream_errors_total",
            "Upstream streams that ended in an error or an idle timeout.",
            counters.stream_errors,
        );
        counter(
            out,
            "upstream_events_total",
            "Upstream SSE events received.",
            counters.events,
        );
        counter(
            out,
            "upstream_malformed_total",
            "Upstream bodies or events rejected as invalid.",
            counters.malformed,
        );
        gauge(
            out,
            "upstream_key_rejected",
            "1 while Rollgate rejects the server API key (401): check ROLLGATE_API_KEY.",
            f64::from(u8::from(status.is_some_and(|s| s.key_rejected))),
        );
        gauge(
            out,
            "breaker_state",
            "Circuit breaker: 0 closed, 0.5 half-open, 1 open.",
            status.map_or(0.0, |s| s.breaker.state.gauge()),
        );
        counter(
            out,
            "breaker_opens_total",
            "Times the circuit breaker opened.",
            status.map_or(0, |s| s.breaker.opens_total),
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(PREFIX);
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{label}=\"{value}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{PREFIX}{name} {value}");
}

fn render_histogram(out: &mut String, route: &str, stats: &RouteStats) {
    let counts: Vec<u64> = stats
        .buckets
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect();
    let count: u64 = counts.iter().sum();
    if count == 0 {
        return;
    }
    let name = "http_request_duration_seconds";
    let mut cumulative = 0;
    for ((_, le), n) in BUCKETS.iter().zip(&counts) {
        cumulative += n;
        let _ = writeln!(
            out,
            "{PREFIX}{name}_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
        );
    }
    let sum = stats.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    let _ = writeln!(
        out,
        "{PREFIX}{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "{PREFIX}{name}_sum{{route=\"{route}\"}} {sum}");
    let _ = writeln!(out, "{PREFIX}{name}_count{{route=\"{route}\"}} {count}");
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Route;

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
            assert!(
                ROUTE_LABELS[..ROUTE_LABELS.len() - 2].contains(&label),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn the_request_families_alone_are_the_start_of_the_full_rendering() {
        let metrics = Metrics::new();
        metrics.request("unmatched", 401, Some(Duration::from_millis(2)));
        let requests = metrics.render_requests();
        assert!(
            requests.contains("route=\"unmatched\",status=\"401\"} 1\n"),
            "{requests}"
        );
        assert!(
            requests.contains("http_request_duration_seconds_bucket"),
            "{requests}"
        );
        assert!(!requests.contains("sse_clients"), "{requests}");
        assert!(metrics.render(&Scrape::default()).starts_with(&requests));
    }

    #[test]
    fn status_slots_name_the_status() {
        for status in [
            200, 204, 304, 400, 401, 404, 405, 408, 413, 414, 431, 500, 502, 503,
        ] {
            assert_eq!(STATUS_LABELS[status_slot(status)], status.to_string());
        }
        for (status, label) in [
            (101, "1xx"),
            (201, "2xx"),
            (302, "3xx"),
            (418, "4xx"),
            (504, "5xx"),
        ] {
            assert_eq!(STATUS_LABELS[status_slot(status)], label);
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_le_inclusive() {
        let metrics = Metrics::new();
        metrics.request("/x-unknown", 200, Some(Duration::from_nanos(100_000)));
        metrics.request("/api/flags", 200, Some(Duration::from_nanos(100_000)));
        metrics.request("/api/flags", 200, Some(Duration::from_nanos(100_001)));
        metrics.request("/api/flags", 503, Some(Duration::from_secs(6)));
        metrics.request("/api/flags", 200, None);
        let out = metrics.render(&Scrape::default());
        let bucket = |le: &str| {
            format!(
                "rollgate_proxy_http_request_duration_seconds_bucket{{route=\"/api/flags\",le=\"{le}\"}} "
            )
        };
        assert!(out.contains(&format!("{}1\n", bucket("0.0001"))), "{out}");
        assert!(out.contains(&format!("{}2\n", bucket("0.00025"))), "{out}");
        assert!(out.contains(&format!("{}2\n", bucket("5"))), "{out}");
        assert!(out.contains(&format!("{}3\n", bucket("+Inf"))), "{out}");
        assert!(out.contains(
            "rollgate_proxy_http_request_duration_seconds_sum{route=\"/api/flags\"} 6.000200001\n"
        ));
        assert!(out.contains(
            "rollgate_proxy_http_requests_total{route=\"/api/flags\",status=\"200\"} 3\n"
        ));
        assert!(out.contains(
            "rollgate_proxy_http_requests_total{route=\"unmatched\",status=\"200\"} 1\n"
        ));
    }

    #[test]
    fn every_family_is_always_rendered_with_help_and_type() {
        let out = Metrics::new().render(&Scrape::default());
        for name in [
            "http_requests_total counter",
            "http_request_duration_seconds histogram",
            "sse_clients gauge",
            "sse_frames_sent_total counter",
            "cache_requests_total counter",
            "user_cache_total counter",
            "user_refresh_backlog gauge",
            "user_refresh_backlog_oldest_seconds gauge",
            "user_refresh_in_flight gauge",
            "user_refresh_total counter",
            "user_refresh_untracked_total counter",
            "upstream_connected gauge",
            "upstream_requests_total counter",
            "upstream_reconnects_total counter",
            "breaker_state gauge",
            "snapshot_age_seconds gauge",
        ] {
            assert!(
                out.contains(&format!("# TYPE rollgate_proxy_{name}\n")),
                "{name}"
            );
        }
        assert!(out.contains("rollgate_proxy_sse_clients{stream=\"ofrep\"} 0\n"));
        assert!(
            out.lines().all(|l| l.starts_with("# HELP rollgate_proxy_")
                || l.starts_with("# TYPE rollgate_proxy_")
                || l.starts_with("rollgate_proxy_")),
            "{out}"
        );
    }

    #[test]
    fn stream_gauges_never_go_negative() {
        let metrics = Metrics::new();
        metrics.stream_opened(StreamKind::Sdk);
        metrics.stream_closed(StreamKind::Sdk);
        metrics.stream_closed(StreamKind::Sdk);
        assert_eq!(metrics.stream_clients(), 0);
        metrics.set_stream_clients(StreamKind::Frontend, 7);
        assert_eq!(metrics.stream_clients_of(StreamKind::Frontend), 7);
    }
}
