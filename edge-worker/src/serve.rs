//! Answers to the data routes, stream frames, health and metrics, from a snapshot: pure, so the
//! Durable Objects only move bytes and the host tests cover every decision.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::Bytes;
use rollgate_proxy_core::api::{self, ApiError, ApiResponse, Route, ofrep};
use rollgate_proxy_core::model::{Context, EvaluatedFlags};
use rollgate_proxy_core::render;
use rollgate_proxy_core::snapshot::{ContextFlags, Snapshot};

/// Content type of the demo page (as the native server).
pub const DEMO_CONTENT_TYPE: &str = "text/html; charset=utf-8";

/// The demo page and its assets: the native server's very files.
const INDEX_HTML: &str = include_str!("../../native-server/assets/index.html");
const DEMO_CSS: &str = include_str!("../../native-server/assets/demo.css");
const DEMO_JS: &str = include_str!("../../native-server/assets/demo.js");
const CLIENT_JS: &str = include_str!("../../clients/js/src/index.js");

/// The text of asset `name` (`index.html` is the demo page; core's `Route::Asset` names the
/// rest), the same choice as the native server's.
pub fn asset(name: &str) -> &'static str {
    match name {
        "index.html" => INDEX_HTML,
        "demo.css" => DEMO_CSS,
        "demo.js" => DEMO_JS,
        _ => CLIENT_JS,
    }
}

/// The OFREP event stream announced by the bulk answer to a request without a client key.
pub const OFREP_STREAM_URI: &str = ofrep::STREAM_PATH;

/// What a data request needs.
#[derive(Debug)]
pub enum Answer {
    /// The answer.
    Ready(ApiResponse),
    /// Evaluated mode and a user context: the relay must ask upstream for this user's flags, then
    /// call [`respond`].
    NeedsUpstream(Context),
}

/// Whether a route is answered from a snapshot (and so can be cached at the edge).
pub fn is_polling(route: &Route) -> bool {
    matches!(
        route,
        Route::Flags | Route::Flag(_) | Route::SdkFlags | Route::OfrepFlag(_) | Route::OfrepFlags
    )
}

/// Whether a route is an SSE stream (served by a shard object).
pub fn is_stream(route: &Route) -> bool {
    matches!(route, Route::Stream | Route::SdkStream | Route::OfrepStream)
}

/// The context of a data or stream request.
///
/// # Errors
/// The 400 answer for an invalid context (OFREP routes answer in OFREP's error shape).
pub fn context_of(
    route: &Route,
    method: &str,
    query: &str,
    body: &[u8],
) -> Result<Context, ApiResponse> {
    match route {
        Route::Flags if method == "POST" => api::context_from_body(body).map_err(ApiResponse::from),
        Route::OfrepFlag(key) => ofrep::context(body).map_err(|e| e.response(Some(key))),
        Route::OfrepFlags => ofrep::context(body).map_err(|e| e.response(None)),
        _ => api::context_from_query(query).map_err(ApiResponse::from),
    }
}

/// Answers a polling route from `snapshot` (503 `NOT_READY` without one).
pub fn data_route(
    snapshot: Option<&Snapshot>,
    route: &Route,
    method: &str,
    query: &str,
    body: &[u8],
    if_none_match: Option<&str>,
) -> Answer {
    data_route_merged(
        snapshot,
        route,
        method,
        query,
        body,
        if_none_match,
        OFREP_STREAM_URI,
        |_| {},
    )
}

/// [`data_route`] with `merge` applied to the request's context first (the relay adds the
/// attributes stored by `/identify`, as the native server does for every route), and the OFREP
/// event stream to announce (`ofrep::stream_uri` of the caller's client key).
#[allow(
    clippy::too_many_arguments,
    reason = "one request's parts, passed through once"
)]
pub fn data_route_merged(
    snapshot: Option<&Snapshot>,
    route: &Route,
    method: &str,
    query: &str,
    body: &[u8],
    if_none_match: Option<&str>,
    ofrep_stream: &str,
    merge: impl FnOnce(&mut Context),
) -> Answer {
    let Some(snapshot) = snapshot else {
        return Answer::Ready(ApiError::not_ready().into());
    };
    let mut context = match context_of(route, method, query, body) {
        Ok(context) => context,
        Err(response) => return Answer::Ready(response),
    };
    merge(&mut context);
    match snapshot.flags_for(&context) {
        ContextFlags::Ready(flags) => Answer::Ready(respond(
            snapshot,
            route,
            &context,
            flags,
            query,
            if_none_match,
            ofrep_stream,
        )),
        // Upstream evaluates per user id only: without one, the snapshot's own flags (as the
        // native server; asking upstream would give the same flags under a per-context ETag).
        ContextFlags::NeedsUpstream if context.id.is_none() => Answer::Ready(respond(
            snapshot,
            route,
            &context,
            Cow::Borrowed(snapshot.defaults()),
            query,
            if_none_match,
            ofrep_stream,
        )),
        ContextFlags::NeedsUpstream => Answer::NeedsUpstream(context),
    }
}

/// The answer of `route` given the context's flags.
pub fn respond(
    snapshot: &Snapshot,
    route: &Route,
    context: &Context,
    flags: Cow<'_, EvaluatedFlags>,
    query: &str,
    if_none_match: Option<&str>,
    ofrep_stream: &str,
) -> ApiResponse {
    match route {
        Route::Flags => api::flags_response(snapshot, flags, if_none_match),
        Route::Flag(key) => api::flag_response(key, &flags).unwrap_or_else(ApiResponse::from),
        Route::SdkFlags => api::sdk_flags_response(snapshot, flags, query, if_none_match),
        Route::OfrepFlag(key) => ofrep::single(key, &flags),
        Route::OfrepFlags => {
            ofrep::bulk(snapshot, context, &flags, Some(ofrep_stream), if_none_match)
        }
        other => ApiError::not_found(other.label()).into(),
    }
}

/// The frame a stream client of `route` receives for `snapshot`, given its context's flags
/// (`None`: the anonymous context, whose frames the snapshot serialized once).
pub fn stream_frame(route: &Route, snapshot: &Snapshot, flags: Option<&EvaluatedFlags>) -> Bytes {
    match (route, flags) {
        (Route::SdkStream, None) => snapshot.init_frame().clone(),
        (Route::SdkStream, Some(flags)) => render::init_frame(flags, snapshot.event_id()),
        (Route::OfrepStream, _) => snapshot.ofrep_frame().clone(),
        (_, None) => snapshot.flags_frame().clone(),
        (_, Some(flags)) => render::flags_frame(flags, snapshot.event_id()),
    }
}

/// Numbers behind `/api/metrics`, gathered by the relay object.
#[derive(Clone, Debug, Default)]
pub struct MetricsInput {
    /// Whether a Rollgate key is configured.
    pub upstream_mode: bool,
    /// Breaker gauge: 0 closed, 0.5 half-open, 1 open.
    pub breaker_state: f64,
    /// Times the breaker opened.
    pub breaker_opens: u64,
    /// Whether the upstream stream is open.
    pub upstream_connected: bool,
    /// The upstream machine's counters (zero in local mode).
    pub counters: rollgate_proxy_core::upstream::UpstreamCounters,
    /// Current revision.
    pub revision: u64,
    /// Seconds since upstream confirmed the data.
    pub data_age_seconds: f64,
    /// Number of flags.
    pub flags: usize,
    /// SSE clients over all shards.
    pub sse_clients: u64,
    /// SSE clients per shard index, as the shards last reported.
    pub shard_clients: Vec<(u32, u64)>,
    /// Relay-side cache statistics.
    pub cache: rollgate_proxy_core::snapshot::CacheStats,
}

/// Prometheus text exposition of `m` (metric names shared with the native server where they
/// apply).
pub fn metrics_text(m: &MetricsInput) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP rollgate_proxy_{name} {help}");
        let _ = writeln!(out, "# TYPE rollgate_proxy_{name} gauge");
        let _ = writeln!(out, "rollgate_proxy_{name} {value}");
    };
    gauge(
        "sse_clients",
        "Open SSE client connections.",
        m.sse_clients.to_string(),
    );
    gauge(
        "upstream_connected",
        "1 while the upstream stream is open.",
        u8::from(m.upstream_connected).to_string(),
    );
    gauge(
        "breaker_state",
        "Circuit breaker: 0 closed, 0.5 half-open, 1 open.",
        m.breaker_state.to_string(),
    );
    gauge(
        "snapshot_revision",
        "Revision of the served snapshot.",
        m.revision.to_string(),
    );
    gauge(
        "snapshot_age_seconds",
        "Seconds since upstream last confirmed the data.",
        format!("{:.3}", m.data_age_seconds),
    );
    gauge(
        "flags",
        "Flags in the served snapshot.",
        m.flags.to_string(),
    );
    let _ = writeln!(
        out,
        "# HELP rollgate_proxy_sse_shard_clients Open SSE client connections per shard object."
    );
    let _ = writeln!(out, "# TYPE rollgate_proxy_sse_shard_clients gauge");
    for (shard, clients) in &m.shard_clients {
        let _ = writeln!(
            out,
            "rollgate_proxy_sse_shard_clients{{shard=\"{shard}\"}} {clients}"
        );
    }
    let mut counter = |name: &str, help: &str, series: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP rollgate_proxy_{name} {help}");
        let _ = writeln!(out, "# TYPE rollgate_proxy_{name} counter");
        for (labels, value) in series {
            if labels.is_empty() {
                let _ = writeln!(out, "rollgate_proxy_{name} {value}");
            } else {
                let _ = writeln!(out, "rollgate_proxy_{name}{{{labels}}} {value}");
            }
        }
    };
    counter(
        "upstream_requests_total",
        "Upstream flag requests by outcome.",
        &[
            ("outcome=\"ok\"", m.counters.fetch_ok),
            ("outcome=\"not_modified\"", m.counters.fetch_not_modified),
            ("outcome=\"error\"", m.counters.fetch_errors),
            ("outcome=\"rejected\"", m.counters.breaker_rejections),
        ],
    );
    counter(
        "upstream_stream_connects_total",
        "Upstream streams opened.",
        &[("", m.counters.stream_connects)],
    );
    counter(
        "upstream_reconnects_total",
        "Upstream stream failures followed by a reconnect.",
        &[("", m.counters.stream_errors)],
    );
    counter(
        "upstream_events_total",
        "Upstream SSE events received.",
        &[("", m.counters.events)],
    );
    counter(
        "upstream_malformed_total",
        "Upstream bodies or events rejected as invalid.",
        &[("", m.counters.malformed)],
    );
    counter(
        "breaker_opens_total",
        "Times the circuit breaker opened.",
        &[("", m.breaker_opens)],
    );
    counter(
        "cache_total",
        "Relay lookups by freshness (edge cache hits are not counted here).",
        &[
            ("result=\"hit\"", m.cache.hits),
            ("result=\"miss\"", m.cache.misses),
            ("result=\"stale\"", m.cache.stale_hits),
        ],
    );
    out
}

#[cfg(test)]
mod tests {
    use rollgate_proxy_core::model::RulesPayload;
    use rollgate_proxy_core::snapshot::{FlagSource, Revision};
    use rollgate_proxy_core::time::Timestamp;

    use super::*;

    fn rules() -> Snapshot {
        let payload = RulesPayload::from_json(include_bytes!("local-flags.json")).unwrap();
        Snapshot::build(
            Revision::new(1),
            Timestamp::from_millis(1_000),
            FlagSource::rules(&payload),
        )
    }

    fn evaluated() -> Snapshot {
        let flags = EvaluatedFlags::from_json(br#"{"flags":{"a":true}}"#).unwrap();
        Snapshot::build(
            Revision::new(2),
            Timestamp::ZERO,
            FlagSource::Evaluated(flags),
        )
    }

    fn ready(answer: Answer) -> ApiResponse {
        match answer {
            Answer::Ready(response) => response,
            Answer::NeedsUpstream(_) => panic!("needs upstream"),
        }
    }

    #[test]
    fn anonymous_polling_serves_the_snapshots_bytes_and_304s() {
        let s = rules();
        let r = ready(data_route(Some(&s), &Route::Flags, "GET", "", b"", None));
        assert_eq!(&r.body, s.flags_body());
        let r = ready(data_route(
            Some(&s),
            &Route::Flags,
            "GET",
            "",
            b"",
            Some(s.etag()),
        ));
        assert_eq!(r.status, 304);
        let r = ready(data_route(
            Some(&s),
            &Route::SdkFlags,
            "GET",
            "withReasons=true",
            b"",
            None,
        ));
        assert_eq!(&r.body, s.sdk_body(true));
        assert_eq!(
            ready(data_route(None, &Route::Flags, "GET", "", b"", None)).status,
            503
        );
    }

    #[test]
    fn contexts_are_evaluated_in_rules_mode_and_deferred_in_evaluated_mode() {
        let s = rules();
        let pro = ready(data_route(
            Some(&s),
            &Route::Flag("pro-dashboard".into()),
            "GET",
            "user_id=u1&attr.plan=pro",
            b"",
            None,
        ));
        assert_eq!(&pro.body[..], br#"{"key":"pro-dashboard","enabled":true}"#);
        let free = ready(data_route(
            Some(&s),
            &Route::Flag("pro-dashboard".into()),
            "GET",
            "user_id=u1&attr.plan=free",
            b"",
            None,
        ));
        assert_eq!(
            &free.body[..],
            br#"{"key":"pro-dashboard","enabled":false}"#
        );
        let e = evaluated();
        assert!(matches!(
            data_route(Some(&e), &Route::Flags, "GET", "user_id=u1", b"", None),
            Answer::NeedsUpstream(_)
        ));
        // Attributes but no user id: the snapshot's own answer, ETag included.
        let no_id = ready(data_route(
            Some(&e),
            &Route::Flags,
            "GET",
            "attr.plan=pro",
            b"",
            None,
        ));
        assert_eq!(&no_id.body, e.flags_body());
        assert!(no_id.headers.iter().any(|(_, v)| v == e.etag()));
        let bad = ready(data_route(
            Some(&s),
            &Route::OfrepFlags,
            "POST",
            "",
            b"{",
            None,
        ));
        assert_eq!(bad.status, 400);
        assert!(
            std::str::from_utf8(&bad.body)
                .unwrap()
                .contains("PARSE_ERROR")
        );
        let bulk = ready(data_route(
            Some(&s),
            &Route::OfrepFlags,
            "POST",
            "",
            b"{}",
            None,
        ));
        assert!(
            std::str::from_utf8(&bulk.body)
                .unwrap()
                .contains(OFREP_STREAM_URI)
        );
    }

    #[test]
    fn stream_frames_come_from_the_snapshot() {
        let s = rules();
        assert_eq!(&stream_frame(&Route::Stream, &s, None), s.flags_frame());
        assert_eq!(&stream_frame(&Route::SdkStream, &s, None), s.init_frame());
        assert_eq!(
            &stream_frame(&Route::OfrepStream, &s, None),
            s.ofrep_frame()
        );
        let user = s.defaults().clone();
        assert_eq!(
            stream_frame(&Route::Stream, &s, Some(&user)),
            s.flags_frame().clone()
        );
    }

    #[test]
    fn assets_are_the_native_servers_files() {
        assert!(asset("index.html").contains("<html"));
        assert!(asset("demo.css").len() > 10);
        assert_eq!(asset("demo.js"), DEMO_JS);
        assert_eq!(asset("rollgate-proxy-client.js"), CLIENT_JS);
        for path in ["/demo.css", "/demo.js", "/rollgate-proxy-client.js"] {
            let Ok(Route::Asset(name)) = Route::parse("GET", path) else {
                panic!("{path} is an asset route");
            };
            assert!(!asset(name).is_empty(), "{path}");
        }
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let text = metrics_text(&MetricsInput {
            sse_clients: 3,
            shard_clients: vec![(0, 1), (1, 2)],
            counters: rollgate_proxy_core::upstream::UpstreamCounters {
                fetch_ok: 2,
                ..Default::default()
            },
            ..MetricsInput::default()
        });
        assert!(
            text.contains(
                "# TYPE rollgate_proxy_sse_clients gauge\nrollgate_proxy_sse_clients 3\n"
            )
        );
        assert!(text.contains("rollgate_proxy_upstream_requests_total{outcome=\"ok\"} 2\n"));
        assert!(text.contains("rollgate_proxy_sse_shard_clients{shard=\"1\"} 2\n"));
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("rollgate_proxy_"))
        );
    }
}
