//! The downstream dispatcher: one request as plain data, plus the current snapshot, → an [`Answer`].
//!
//! Adapters keep no route logic: they parse HTTP into a [`Request`], call
//! [`Downstream::handle`], and execute the [`Answer`]: write a response, open a stream with the
//! [`Subscriber`], fetch a user's flags and call [`Downstream::finish`], forward a body
//! upstream, or gather state for health and metrics. Every status, body, error code and
//! decision is made here once, so the native server and the Worker are byte-identical by
//! construction.
//!
//! A [`Downstream`] is one environment's downstream state: the settings, the `/identify`
//! store, the per-user flag cache and the metrics. Its methods take `&self` (the stores sit
//! behind short-lived locks that are never taken on the anonymous polling path), so the native
//! server shares one across threads and a Durable Object keeps one per instance.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::api::{
    self, ApiError, ApiResponse, ErrorCode, HealthReport, Route, UpstreamHealth, ofrep,
};
use crate::assets;
use crate::breaker::BreakerState;
use crate::metrics::{Metrics, Scrape, SideRequest};
use crate::model::{Context, EvaluatedFlags};
use crate::outbox::Dropped;
use crate::refresh::{Refresh, RefreshOutcome, Refresher};
use crate::rendered::{self, BodyKind, Rendered, RenderedCache};
use crate::secret::Secret;
use crate::settings::Settings;
use crate::snapshot::{ContextFlags, Freshness, Revision, Snapshot};
use crate::stream::{StreamTiming, Subscriber};
use crate::time::Timestamp;
use crate::upstream::{StreamState, UpstreamStatus};
use crate::users::{FetchTicket, IdentityStore, Lookup, UserCache, UserCacheLimits, UserFlags};

/// `Content-Type` of `/api/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bytes of per-user answers the cache may hold, at most: about 64 MiB, so a proxy with the
/// default 10,000 users of a large flag set still fits a 256 MiB container.
pub const USER_CACHE_MAX_BYTES: usize = 64 << 20;

/// Bytes of rendered per-context answers (rules mode) the cache may hold, at most: 32 MiB is
/// about 10,000 users of a 100-flag set in all three renderings.
pub const RENDERED_CACHE_MAX_BYTES: usize = 32 << 20;

/// One request, as the adapter parsed it. Only the headers that change an answer are here.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path, not decoded.
    pub path: &'a str,
    /// The query without `?` (empty if none).
    pub query: &'a str,
    /// `Authorization`.
    pub authorization: Option<&'a str>,
    /// `X-API-Key` (OFREP providers send the key there).
    pub api_key: Option<&'a str>,
    /// `If-None-Match`.
    pub if_none_match: Option<&'a str>,
    /// `Last-Event-ID` (an `EventSource` reconnecting).
    pub last_event_id: Option<&'a str>,
    /// `Accept-Encoding`: picks a precompressed variant of the shared polling bodies
    /// ([`crate::encoding`]). An adapter that leaves it `None` always gets identity.
    pub accept_encoding: Option<&'a str>,
    /// The body (empty for `GET`); the adapter enforces the size limit while reading it.
    pub body: &'a [u8],
}

/// A request that passed routing and the client-key check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// Its route.
    pub route: Route,
    /// The configured client key it presented (`None` when no keys are configured).
    pub client_key: Option<String>,
}

/// What the adapter does with a request.
#[derive(Debug)]
#[must_use]
pub enum Answer {
    /// Write this response.
    Respond(ApiResponse),
    /// Answer 200 with [`crate::stream::HEADERS`], write [`Subscriber::preamble`], then the
    /// frames the subscriber yields for each snapshot, keepalives, and end at its max age.
    Stream {
        /// The connection's decisions.
        subscriber: Subscriber,
        /// The client key the request presented, for requests the adapter makes on the
        /// client's behalf (the Worker's shard asking its relay for a user's flags).
        client_key: Option<String>,
    },
    /// Evaluated mode, a user's request: obtain the user's flags ([`Downstream::user_lookup`]
    /// and friends), then respond with [`Downstream::finish`].
    NeedUserFlags(Pending),
    /// Respond with `response` now, and forward `body` upstream (`Authorization: Bearer <server
    /// key>`, admitted and recorded by the breaker) to [`Forward::path`].
    Forward(Forward),
    /// Respond with [`Downstream::health`] of the adapter's current state.
    Health,
    /// Respond with [`Downstream::metrics`] of the adapter's current state.
    Metrics,
}

/// A body to hand on to upstream.
#[derive(Debug)]
pub struct Forward {
    /// Which kind (metrics label, batching).
    pub kind: SideRequest,
    /// The body as the client sent it (validated).
    pub body: Bytes,
    /// How many items it holds (events, or the sum of telemetry totals).
    pub count: u64,
    /// The answer for the client.
    pub response: ApiResponse,
    /// The user an `/identify` is for: the adapter forwards it before that user's next
    /// fetch of flags.
    pub user_id: Option<String>,
}

impl Forward {
    /// The upstream path to `POST` to.
    pub fn path(&self) -> &'static str {
        forward_path(self.kind)
    }
}

/// Where a forwarded body of `kind` goes upstream (`POST`). Per-user flag fetches are `GET`s
/// and never forwarded; their kind maps to the telemetry path only to keep this total.
pub fn forward_path(kind: SideRequest) -> &'static str {
    match kind {
        SideRequest::Identify => "/api/v1/sdk/identify",
        SideRequest::Events => "/api/v1/sdk/events",
        SideRequest::Telemetry | SideRequest::UserFlags => "/api/v1/sdk/telemetry",
    }
}

/// A request waiting for one user's flags.
#[derive(Debug)]
pub struct Pending {
    snapshot: Arc<Snapshot>,
    route: Route,
    context: Context,
    user_id: String,
    with_reasons: bool,
    if_none_match: Option<String>,
    ofrep_stream: String,
}

impl Pending {
    /// The user whose flags are needed.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The revision they are needed for.
    pub fn revision(&self) -> Revision {
        self.snapshot.revision()
    }
}

/// A context's flags for a snapshot.
#[derive(Debug)]
pub enum Resolved<'s> {
    /// Known now: the snapshot's own (anonymous, or no user id in evaluated mode) or a local
    /// evaluation (rules mode).
    Flags(Cow<'s, EvaluatedFlags>),
    /// Evaluated mode: upstream evaluates per user id; go through the per-user cache.
    User(String),
}

/// Where the data comes from, for health and metrics.
#[derive(Clone, Debug)]
pub enum SourceReport {
    /// Rollgate, through the upstream machine.
    Upstream(UpstreamStatus),
    /// A local rules file.
    Local {
        /// Why the last reload failed, if it did.
        last_error: Option<String>,
        /// When the file was last loaded.
        loaded_at: Option<Timestamp>,
    },
}

/// What only the adapter knows, for `/api/metrics`.
#[derive(Clone, Debug, Default)]
pub struct MetricsExtra {
    /// What its outbox dropped.
    pub dropped: Dropped,
    /// Open SSE clients per shard object (the Worker).
    pub shard_clients: Vec<(u32, u64)>,
    /// WebSocket connects refused because their shard object was full (the Worker).
    pub sockets_refused: u64,
    /// The adapter's snapshot writes (`None` where nothing is persisted).
    pub persisted: Option<crate::metrics::PersistReport>,
}

/// One environment's downstream state. See the module docs.
#[derive(Debug)]
pub struct Downstream {
    settings: Settings,
    identities: Mutex<IdentityStore>,
    /// Skips the identity lock on the hot path until someone has identified.
    identified: AtomicBool,
    users: Mutex<UserCache>,
    /// Rules mode: rendered per-context answers of the current revision.
    rendered: Mutex<RenderedCache>,
    /// Per-user refreshes after upstream changes (evaluated mode), under the budget.
    refresher: Mutex<Refresher>,
    /// The last upstream change epoch handed to [`Downstream::upstream_changed`].
    change_epoch: std::sync::atomic::AtomicU64,
    /// Counters of this environment, recorded by core and by the adapter.
    pub metrics: Metrics,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves consistent state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Downstream {
    /// A downstream for `settings`.
    pub fn new(settings: Settings) -> Self {
        let limits = UserCacheLimits {
            max_users: settings.user_cache_size,
            max_bytes: USER_CACHE_MAX_BYTES,
            ttl: settings.upstream.refresh_interval,
            // A fetch that has not reported back after its timeout (plus slack for the
            // adapter's scheduling) is forgotten: the next request fetches again.
            fetch_deadline: settings.upstream_timeout + std::time::Duration::from_secs(1),
        };
        Self {
            identities: Mutex::new(IdentityStore::new(settings.identify_store_size)),
            identified: AtomicBool::new(false),
            users: Mutex::new(UserCache::new(limits)),
            rendered: Mutex::new(RenderedCache::new(RENDERED_CACHE_MAX_BYTES)),
            refresher: Mutex::new(Refresher::new(settings.user_refresh)),
            change_epoch: std::sync::atomic::AtomicU64::new(0),
            metrics: Metrics::new(),
            settings,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether a Rollgate key is configured (identify, events and telemetry are forwarded).
    pub fn is_upstream(&self) -> bool {
        self.settings.api_key.is_some()
    }

    /// Routes `request` and checks its client key.
    ///
    /// # Errors
    /// 404, 405, 400 (bad path encoding) or 401.
    pub fn admit(&self, request: &Request<'_>) -> Result<Admitted, ApiError> {
        let route = Route::parse(request.method, request.path)?;
        let client_key = if route.needs_client_key() {
            self.settings
                .client_keys
                .matching_key(request.authorization, request.api_key, request.query)?
                .map(str::to_owned)
        } else {
            None
        };
        Ok(Admitted { route, client_key })
    }

    /// [`Downstream::admit`], then [`Downstream::dispatch`].
    pub fn handle(
        &self,
        now: Timestamp,
        request: &Request<'_>,
        snapshot: Option<&Arc<Snapshot>>,
        freshness: Freshness,
        jitter: f64,
    ) -> Answer {
        match self.admit(request) {
            Ok(admitted) => self.dispatch(now, request, admitted, snapshot, freshness, jitter),
            Err(error) => Answer::Respond(error.into()),
        }
    }

    /// The answer to an admitted request, given the current `snapshot` and its `freshness`;
    /// `jitter` is a uniform random sample in `[0, 1)` (spreads stream reconnects).
    pub fn dispatch(
        &self,
        now: Timestamp,
        request: &Request<'_>,
        admitted: Admitted,
        snapshot: Option<&Arc<Snapshot>>,
        freshness: Freshness,
        jitter: f64,
    ) -> Answer {
        let Admitted { route, client_key } = admitted;
        match self.route(now, request, route, client_key, snapshot, freshness, jitter) {
            Ok(answer) => answer,
            Err(error) => Answer::Respond(error.into()),
        }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one request's parts, passed through once"
    )]
    fn route(
        &self,
        now: Timestamp,
        request: &Request<'_>,
        route: Route,
        client_key: Option<String>,
        snapshot: Option<&Arc<Snapshot>>,
        freshness: Freshness,
        jitter: f64,
    ) -> Result<Answer, ApiError> {
        let respond = |response: ApiResponse| Ok(Answer::Respond(response));
        match route {
            Route::Live | Route::RootHealth => {
                respond(ApiResponse::json(Bytes::from_static(api::STATUS_OK_BODY)))
            }
            Route::Demo => respond(assets::response("index.html")),
            Route::Asset(name) => respond(assets::response(name)),
            Route::Ready => match snapshot {
                Some(_) => respond(ApiResponse::json(Bytes::from_static(api::READY_BODY))),
                None => Err(ApiError::not_ready()),
            },
            Route::Health => Ok(Answer::Health),
            Route::Metrics => Ok(Answer::Metrics),
            Route::Stream | Route::SdkStream | Route::OfrepStream => {
                let kind = route
                    .stream_kind()
                    .unwrap_or(crate::stream::StreamKind::Frontend);
                let context = if route == Route::OfrepStream {
                    Context::anonymous()
                } else {
                    api::context_from_query(request.query)?
                };
                let timing = StreamTiming {
                    keepalive: self.settings.keepalive,
                    sdk_keepalive: self.settings.sdk_keepalive,
                    max_age: self.settings.sse_max_age,
                };
                Ok(Answer::Stream {
                    subscriber: Subscriber::new(
                        now,
                        kind,
                        context,
                        request.last_event_id,
                        timing,
                        jitter,
                    )
                    .with_socket_coding(request.query),
                    client_key,
                })
            }
            Route::SdkIdentify => {
                let context = api::context_from_body(request.body)?;
                let Some(user_id) = context.id.clone() else {
                    return Err(ApiError::new(
                        ErrorCode::InvalidContext,
                        "identify needs {\"user\":{\"id\":...}}",
                    ));
                };
                lock(&self.identities).remember(&context);
                self.identified.store(true, Ordering::Relaxed);
                // The stored attributes change this user's answers: drop the cached one.
                lock(&self.users).forget(&user_id);
                let response = ApiResponse::json(Bytes::from_static(api::IDENTIFY_BODY));
                Ok(self.forward_or_respond(
                    SideRequest::Identify,
                    request,
                    1,
                    response,
                    Some(user_id),
                ))
            }
            Route::SdkEvents => {
                let count = api::count_events(request.body)? as u64;
                let response = ApiResponse::json(api::received_body(count));
                Ok(self.forward_or_respond(SideRequest::Events, request, count, response, None))
            }
            Route::SdkTelemetry => {
                let count = api::count_telemetry(request.body)?;
                let response = ApiResponse::json(api::received_body(count));
                Ok(self.forward_or_respond(SideRequest::Telemetry, request, count, response, None))
            }
            Route::Flags
            | Route::Flag(_)
            | Route::SdkFlags
            | Route::OfrepFlag(_)
            | Route::OfrepFlags => {
                let context = match context_of(&route, request) {
                    Ok(context) => context,
                    Err(response) => return respond(response),
                };
                self.metrics.cache(freshness);
                let snapshot = snapshot.ok_or_else(ApiError::not_ready)?;
                let with_reasons = api::with_reasons(request.query);
                if let Some(kind) = body_kind(&route, with_reasons)
                    && let Some(rules) = snapshot.rules()
                    && !context.is_anonymous()
                {
                    return respond(
                        self.rendered_answer(snapshot, rules, kind, context, request.if_none_match)
                            .vary_encoding(),
                    );
                }
                // Only the OFREP bulk answer names its stream: no string for the other routes.
                let ofrep_stream = if matches!(route, Route::OfrepFlags) {
                    ofrep::stream_uri(client_key.as_deref())
                } else {
                    String::new()
                };
                match self.resolve(snapshot, context.clone()) {
                    Resolved::Flags(flags) => respond(respond_with(
                        snapshot,
                        &route,
                        &context,
                        flags,
                        with_reasons,
                        request.if_none_match,
                        request.accept_encoding,
                        &ofrep_stream,
                    )),
                    Resolved::User(user_id) => Ok(Answer::NeedUserFlags(Pending {
                        snapshot: Arc::clone(snapshot),
                        route,
                        context,
                        user_id,
                        with_reasons,
                        if_none_match: request.if_none_match.map(str::to_owned),
                        ofrep_stream,
                    })),
                }
            }
        }
    }

    fn forward_or_respond(
        &self,
        kind: SideRequest,
        request: &Request<'_>,
        count: u64,
        response: ApiResponse,
        user_id: Option<String>,
    ) -> Answer {
        if !self.is_upstream() {
            return Answer::Respond(response);
        }
        Answer::Forward(Forward {
            kind,
            body: Bytes::copy_from_slice(request.body),
            count,
            response,
            user_id,
        })
    }

    /// `context`'s flags for `snapshot`: the `/identify` attributes merged in, then the
    /// snapshot's own flags, a local evaluation (rules mode), or the per-user cache.
    pub fn resolve<'s>(&self, snapshot: &'s Snapshot, context: Context) -> Resolved<'s> {
        let context = self.merge_identity(context);
        match snapshot.flags_for(&context) {
            ContextFlags::Ready(flags) => {
                if matches!(flags, Cow::Owned(_)) {
                    self.metrics.evaluation();
                }
                Resolved::Flags(flags)
            }
            ContextFlags::NeedsUpstream => match context.id {
                // Upstream evaluates per user id only (no SDK sends attributes on this call):
                // without one, the snapshot's own flags.
                None => Resolved::Flags(Cow::Borrowed(snapshot.defaults())),
                Some(id) => Resolved::User(id),
            },
        }
    }

    /// Rules mode, a non-anonymous context: its answer from the rendered cache, or evaluated,
    /// rendered and remembered. The ETag is [`rendered::context_etag`].
    fn rendered_answer(
        &self,
        snapshot: &Snapshot,
        rules: &crate::eval::CompiledRules,
        kind: BodyKind,
        context: Context,
        if_none_match: Option<&str>,
    ) -> ApiResponse {
        let context = self.merge_identity(context);
        let key = rendered::cache_key(kind, &context);
        let revision = snapshot.revision();
        let cached = lock(&self.rendered).get(revision, &key);
        let Rendered { body, etag } = match cached {
            Some(rendered) => rendered,
            None => {
                self.metrics.evaluation();
                let flags = rules.evaluate_all(&context);
                let body = match kind {
                    BodyKind::Flags => {
                        crate::render::evaluation_flags_body(&flags, snapshot.cached_at())
                    }
                    BodyKind::Sdk => crate::render::evaluation_sdk_flags_body(&flags, false),
                    BodyKind::SdkWithReasons => {
                        crate::render::evaluation_sdk_flags_body(&flags, true)
                    }
                };
                let rendered = Rendered {
                    body,
                    etag: rendered::context_etag(snapshot, rendered::context_part(&key)),
                };
                lock(&self.rendered).insert(revision, key, rendered.clone());
                rendered
            }
        };
        ApiResponse::json_with_etag(body, &etag, if_none_match)
    }

    /// `context` with what its user sent to `/identify` filled in.
    pub fn merge_identity(&self, context: Context) -> Context {
        if context.id.is_none() || !self.identified.load(Ordering::Relaxed) {
            return context;
        }
        lock(&self.identities).merge(context)
    }

    /// Step one of a user's flags: fresh from the cache, or fetch, or wait for another fetch.
    pub fn user_lookup(&self, now: Timestamp, user_id: &str, revision: Revision) -> Lookup {
        let lookup = lock(&self.users).lookup(now, user_id, revision);
        if matches!(lookup, Lookup::Fresh(_)) {
            self.metrics.user_cache("hit");
        }
        lookup
    }

    /// The result of the fetch [`Lookup::Fetch`] asked for (`None`: it failed or upstream
    /// refused it); returns what to serve.
    pub fn user_fetched(
        &self,
        now: Timestamp,
        user_id: &str,
        ticket: FetchTicket,
        result: Option<EvaluatedFlags>,
    ) -> UserFlags {
        let flags = lock(&self.users).handle_fetch(now, user_id, ticket, result);
        self.metrics.user_cache(flags.label());
        flags
    }

    /// Upstream's change epoch is `epoch` (from [`crate::upstream::Upstream::change_epoch`],
    /// handed over after every drain of the machine's actions): when it advanced, every
    /// per-user answer fetched before is out of date and every streaming user is queued for a
    /// refresh. Returns whether it advanced (the adapter then drives the refresher).
    pub fn upstream_changed(&self, now: Timestamp, epoch: u64) -> bool {
        let previous = self.change_epoch.fetch_max(epoch, Ordering::Relaxed);
        if epoch <= previous {
            return false;
        }
        lock(&self.users).handle_change(epoch);
        lock(&self.refresher).handle_change(now);
        true
    }

    /// A per-user stream of `user_id` opened (evaluated mode): it is refreshed on changes.
    pub fn user_stream_opened(&self, user_id: &str) {
        lock(&self.refresher).handle_stream_opened(user_id);
    }

    /// A per-user stream of `user_id` is known to be open (the Worker's shards say so on each
    /// request): tracked again if it was not. Returns `true` then: this instance did not
    /// refresh the user's cached answer on the changes it missed (the relay object restarted,
    /// or the user's streams were counted short since, so that an earlier close untracked it),
    /// and that answer must not be served as current.
    pub fn user_stream_seen(&self, user_id: &str) -> bool {
        let mut refresher = lock(&self.refresher);
        if refresher.is_streaming(user_id) {
            return false;
        }
        refresher.handle_stream_opened(user_id);
        true
    }

    /// A per-user stream of `user_id` closed (pairs with [`Downstream::user_stream_opened`]).
    pub fn user_stream_closed(&self, user_id: &str) {
        lock(&self.refresher).handle_stream_closed(user_id);
    }

    /// The next per-user refresh to perform now, within the budget: fetch `refresh.user_id`'s
    /// flags through the per-user cache (the ticket), report with
    /// [`Downstream::user_fetched`] then [`Downstream::refreshed`], and tell that user's
    /// streams. Users whose answer is already current (a poll fetched it, or its fetch is in
    /// flight) are skipped here: that fetch wakes the streams.
    /// With rules (local evaluation) nothing is fetched: queued users are let go at once.
    pub fn poll_refresh(
        &self,
        now: Timestamp,
        snapshot: &Snapshot,
    ) -> Option<(Refresh, FetchTicket)> {
        let mut refresher = lock(&self.refresher);
        if snapshot.rules().is_some() {
            refresher.clear_backlog();
            return None;
        }
        let revision = snapshot.revision();
        // Bounded: each iteration takes one backlog entry.
        while let Some(refresh) = refresher.poll_refresh(now) {
            match lock(&self.users).lookup(now, &refresh.user_id, revision) {
                Lookup::Fetch { ticket, .. } => return Some((refresh, ticket)),
                Lookup::Fresh(_) | Lookup::Wait { .. } => {
                    refresher.handle_refreshed(now, &refresh, RefreshOutcome::Done);
                }
            }
        }
        None
    }

    /// When to call [`Downstream::poll_refresh`] again, if refreshes wait for the budget.
    pub fn refresh_timeout(&self) -> Option<Timestamp> {
        lock(&self.refresher).poll_timeout()
    }

    /// A refresh ended (`ok`: the user's answer was fetched; else `hold_until`: when upstream
    /// allows requests again, from the machine's status, if it asked for quiet).
    pub fn refreshed(
        &self,
        now: Timestamp,
        refresh: &Refresh,
        ok: bool,
        hold_until: Option<Timestamp>,
    ) {
        let outcome = if ok {
            RefreshOutcome::Done
        } else {
            RefreshOutcome::Failed { hold_until }
        };
        lock(&self.refresher).handle_refreshed(now, refresh, outcome);
    }

    /// `user_id`'s cached answer whatever its age, without fetching: what a per-user stream
    /// sends after a refresh or a new snapshot (its refresh is the refresher's job).
    pub fn user_cached(&self, user_id: &str) -> Option<Arc<EvaluatedFlags>> {
        lock(&self.users).peek(user_id)
    }

    /// After waiting for another caller's fetch ([`Lookup::Wait`]): what to serve.
    pub fn user_waited(&self, now: Timestamp, user_id: &str, revision: Revision) -> UserFlags {
        let flags = lock(&self.users).after_wait(now, user_id, revision);
        self.metrics.user_cache(flags.label());
        flags
    }

    /// The answer of a request that waited for its user's flags.
    pub fn finish(&self, pending: Pending, flags: &UserFlags) -> ApiResponse {
        let Some(flags) = flags.flags() else {
            return ApiError::upstream_unavailable().into();
        };
        respond_with(
            &pending.snapshot,
            &pending.route,
            &pending.context,
            Cow::Owned(EvaluatedFlags::clone(flags)),
            pending.with_reasons,
            pending.if_none_match.as_deref(),
            // A user's own answer is rendered for this request: never compressed.
            None,
            &pending.ofrep_stream,
        )
    }

    /// `/api/health` for the adapter's current state.
    pub fn health(
        &self,
        now: Timestamp,
        snapshot: Option<&Snapshot>,
        source: &SourceReport,
        server_key: Option<&Secret>,
    ) -> ApiResponse {
        let key_rejected = matches!(source, SourceReport::Upstream(s) if s.key_rejected);
        let (circuit, stream, fresh, last_error, confirmed, kind) = match source {
            SourceReport::Upstream(status) => (
                status.breaker.state,
                status.stream,
                status.freshness == Freshness::Fresh,
                status.last_error.as_ref().map(|error| {
                    let text = error.to_string();
                    match server_key {
                        Some(key) => key.redact(&text),
                        None => text,
                    }
                }),
                status.last_confirmed,
                "upstream",
            ),
            SourceReport::Local {
                last_error,
                loaded_at,
            } => (
                BreakerState::Closed,
                StreamState::Disabled,
                snapshot.is_some(),
                last_error.clone(),
                *loaded_at,
                "local",
            ),
        };
        let degraded =
            circuit == BreakerState::Open || !fresh || snapshot.is_none() || key_rejected;
        let report = HealthReport {
            status: if degraded { "degraded" } else { "healthy" },
            circuit: circuit.as_str(),
            cache: self.metrics.cache_stats(),
            source: kind,
            upstream: UpstreamHealth {
                stream: stream.as_str(),
                mode: snapshot.map(|s| s.source().mode()),
                fresh,
                last_error,
                key_rejected,
            },
            revision: snapshot.map(|s| s.revision().get()),
            etag: snapshot.map(|s| s.etag().to_owned()),
            data_age_ms: confirmed.map(|at| crate::time::duration_millis(now.saturating_since(at))),
            flags: snapshot.map_or(0, |s| s.defaults().flags.len()),
            sse_clients: self.metrics.stream_clients(),
        };
        ApiResponse::json(report.body())
    }

    /// `/api/metrics` for the adapter's current state: `extra` carries what only the adapter
    /// knows (what its outbox dropped, its shards' clients).
    pub fn metrics(
        &self,
        now: Timestamp,
        snapshot: Option<&Snapshot>,
        source: &SourceReport,
        extra: MetricsExtra,
    ) -> ApiResponse {
        let (upstream, confirmed) = match source {
            SourceReport::Upstream(status) => (Some(status.clone()), status.last_confirmed),
            SourceReport::Local { loaded_at, .. } => (None, *loaded_at),
        };
        // One lock for both figures (two temporaries in one expression would deadlock).
        let (rendered, rendered_entries) = {
            let cache = lock(&self.rendered);
            (cache.stats(), cache.len())
        };
        let scrape = Scrape {
            upstream,
            revision: snapshot.map_or(0, |s| s.revision().get()),
            data_age: confirmed.map(|at| now.saturating_since(at)),
            flags: snapshot.map_or(0, |s| s.defaults().flags.len()),
            user_cache_entries: lock(&self.users).len(),
            rendered,
            rendered_entries,
            user_refresh: lock(&self.refresher).stats(now),
            dropped: extra.dropped,
            shard_clients: extra.shard_clients,
            sockets_refused: extra.sockets_refused,
            persisted: extra.persisted,
        };
        ApiResponse {
            status: 200,
            content_type: Some(METRICS_CONTENT_TYPE),
            headers: Vec::new(),
            body: Bytes::from(self.metrics.render(&scrape)),
        }
    }

    /// The answer to a request shed under overload: 503 `OVERLOADED` with a `Retry-After` of 1
    /// to 5 seconds drawn from `jitter` (uniform in `[0, 1)`), so a shed herd does not come
    /// back in lockstep. Counted in the metrics.
    pub fn overloaded(&self, jitter: f64) -> ApiResponse {
        self.metrics.shed();
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "jitter is in [0, 1), so the product is in [0, 5)"
        )]
        let seconds = 1 + (jitter.clamp(0.0, 0.999) * 5.0) as u64;
        let mut response = ApiResponse::json(
            ApiError::new(
                ErrorCode::Overloaded,
                "too many requests in flight; retry after the Retry-After delay",
            )
            .body(),
        );
        response.status = ErrorCode::Overloaded.status();
        response.headers.push(("Retry-After", seconds.to_string()));
        response
    }
}

/// The context of a data request: from the body (`POST /api/flags`, OFREP) or the query.
///
/// # Errors
/// The 400 answer for an invalid context (OFREP routes answer in OFREP's error shape).
fn context_of(route: &Route, request: &Request<'_>) -> Result<Context, ApiResponse> {
    match route {
        Route::Flags if request.method == "POST" => {
            api::context_from_body(request.body).map_err(ApiResponse::from)
        }
        Route::OfrepFlag(key) => ofrep::context(request.body).map_err(|e| e.response(Some(key))),
        Route::OfrepFlags => ofrep::context(request.body).map_err(|e| e.response(None)),
        _ => api::context_from_query(request.query).map_err(ApiResponse::from),
    }
}

/// Which cached rendering a data route serves, if its answers are cached per context.
fn body_kind(route: &Route, with_reasons: bool) -> Option<BodyKind> {
    match route {
        Route::Flags => Some(BodyKind::Flags),
        Route::SdkFlags if with_reasons => Some(BodyKind::SdkWithReasons),
        Route::SdkFlags => Some(BodyKind::Sdk),
        _ => None,
    }
}

/// The answer of a data `route` given the context's flags.
#[allow(
    clippy::too_many_arguments,
    reason = "one request's parts, passed through once"
)]
fn respond_with(
    snapshot: &Snapshot,
    route: &Route,
    context: &Context,
    flags: Cow<'_, EvaluatedFlags>,
    with_reasons: bool,
    if_none_match: Option<&str>,
    accept_encoding: Option<&str>,
    ofrep_stream: &str,
) -> ApiResponse {
    match route {
        Route::Flags => api::flags_response(snapshot, flags, if_none_match, accept_encoding),
        Route::Flag(key) => api::flag_response(key, &flags).unwrap_or_else(ApiResponse::from),
        Route::SdkFlags => api::sdk_flags_response(
            snapshot,
            flags,
            with_reasons,
            if_none_match,
            accept_encoding,
        ),
        Route::OfrepFlag(key) => ofrep::single(key, &flags),
        Route::OfrepFlags => {
            ofrep::bulk(snapshot, context, &flags, Some(ofrep_stream), if_none_match)
        }
        other => ApiError::not_found(other.label()).into(),
    }
}

#[cfg(test)]
mod tests;
