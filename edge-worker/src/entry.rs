//! The Worker's fetch handler: CORS and the request id, core's admission (route, client key) and
//! body limit, then the edge cache for polling, a shard object for streams, `forward.rs` for
//! identify, events and telemetry, and the relay object for everything else. Stateless routes
//! (probes, the demo page) are answered here by core.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use rollgate_proxy_core::api::{self, ApiError, ApiResponse, Route, is_usable_request_id};
use rollgate_proxy_core::cors::{CorsValue, PREFLIGHT_STATUS};
use rollgate_proxy_core::downstream::{Admitted, Answer, Downstream};
use rollgate_proxy_core::environments::{KeyRouter, merge_metrics};
use rollgate_proxy_core::render;
use rollgate_proxy_core::settings::SettingsError;
use rollgate_proxy_core::snapshot::Freshness;
use wasm_bindgen::JsValue;
use worker::{Cache, Context, Env, Headers, Method, Request, Response, console_error, event};

use crate::cache;
use crate::config::{ENVIRONMENTS, EdgeConfig};
use crate::http::{self, ENVIRONMENT_HEADER, EVENT_ID_HEADER, Incoming, SHARD_HEADER, now};

/// Header that carries a cached answer's original `Cache-Control` (the stored copy has the
/// cache's own).
const CACHED_CC: &str = "x-rollgate-cache-control";
/// Header that carries a cached answer's status (the stored copy is a 200).
const CACHED_STATUS: &str = "x-rollgate-status";
/// Header carrying a request id, kept from the client when sane, as the native server does.
const REQUEST_ID: &str = "x-request-id";

/// Reads the configuration from vars and secrets.
pub(crate) fn load_config(env: &Env) -> Result<EdgeConfig, SettingsError> {
    EdgeConfig::from_lookup(
        |name| {
            env.secret(name)
                .map(|s| s.to_string())
                .ok()
                .or_else(|| env.var(name).ok().map(|v| v.to_string()))
        },
        // Replicas must not retry in lockstep: seed the jitter per instance.
        (js_sys::Math::random() * 9.0e15) as u64,
    )
}

/// The configuration of the environment a relay or shard object serves: its name comes with
/// the front's requests ([`ENVIRONMENT_HEADER`]); `None` or no environments configured: the
/// deployment's single environment.
pub(crate) fn load_config_for(env: &Env, name: Option<&str>) -> Result<EdgeConfig, SettingsError> {
    let config = load_config(env)?;
    match (name, &config.environments) {
        (Some(name), Some(_)) => config
            .for_environment(name)
            .ok_or_else(|| SettingsError::new(&ENVIRONMENTS, format!("no environment {name}"))),
        _ => Ok(config),
    }
}

/// The header naming `config`'s environment to an object, when several are configured.
fn environment_header(config: &EdgeConfig) -> Option<(&'static str, String)> {
    config
        .environments
        .as_ref()
        .map(|_| (ENVIRONMENT_HEADER, config.environment.clone()))
}

/// What the stateless front needs, built once per isolate (vars do not change within one).
struct Front {
    config: EdgeConfig,
    downstream: Downstream,
    /// Several environments: the key router and each environment's configuration, by index.
    router: Option<KeyRouter>,
    environments: Vec<EdgeConfig>,
}

thread_local! {
    static FRONT: RefCell<Option<Rc<Front>>> = const { RefCell::new(None) };
}

fn front(env: &Env) -> Result<Rc<Front>, SettingsError> {
    if let Some(front) = FRONT.with(|f| f.borrow().clone()) {
        return Ok(front);
    }
    let config = load_config(env)?;
    let (router, environments) = match &config.environments {
        Some(environments) => (
            Some(KeyRouter::new(environments)),
            environments
                .list()
                .iter()
                .filter_map(|e| config.for_environment(&e.name))
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    let front = Rc::new(Front {
        downstream: Downstream::new(config.core.clone()),
        config,
        router,
        environments,
    });
    FRONT.with(|f| *f.borrow_mut() = Some(Rc::clone(&front)));
    Ok(front)
}

/// Core's CORS headers as `(name, value)` pairs.
fn cors_pairs(cors: &[(&'static str, CorsValue<'_>)]) -> Vec<(&'static str, String)> {
    cors.iter()
        .map(|(name, value)| (*name, value.as_str().to_owned()))
        .collect()
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> worker::Result<Response> {
    let front = match front(&env) {
        Ok(front) => front,
        Err(error) => {
            console_error!("configuration: {error}");
            return http::internal();
        }
    };
    let origin = req.headers().get("origin")?;
    let request_id = req
        .headers()
        .get(REQUEST_ID)?
        .filter(|v| is_usable_request_id(v.as_bytes()))
        // Random, not a counter: isolates share no state.
        .unwrap_or_else(|| format!("{:016x}", http::random_id()));
    let policy = &front.config.core.cors;
    if req.method() == Method::Options {
        let mut headers = cors_pairs(&policy.preflight(origin.as_deref()));
        headers.push((REQUEST_ID, request_id));
        let response = Response::empty()?.with_status(PREFLIGHT_STATUS);
        return http::with_headers(response, &headers, &[]);
    }
    let response = match handle(req, &env, &ctx, &front).await {
        Ok(response) => response,
        Err(error) => {
            console_error!("request failed: {error}");
            http::internal()?
        }
    };
    if response.status_code() == 101 {
        // A stream's WebSocket, accepted by its shard: rebuilding the answer to add headers
        // would drop the socket (CORS does not apply to WebSockets).
        return Ok(response);
    }
    let mut headers = cors_pairs(&policy.response_headers(origin.as_deref()));
    headers.push((REQUEST_ID, request_id));
    http::with_headers(
        response,
        &headers,
        &[EVENT_ID_HEADER, CACHED_CC, CACHED_STATUS],
    )
}

async fn handle(
    mut req: Request,
    env: &Env,
    ctx: &Context,
    front: &Front,
) -> worker::Result<Response> {
    let mut incoming = Incoming::read(&req)?;
    let (config, admitted) = match &front.router {
        None => match front.downstream.admit(&incoming.request(&[])) {
            Ok(admitted) => (&front.config, admitted),
            Err(error) => return http::error_response(&error),
        },
        Some(router) => match route_environment(front, router, &mut incoming) {
            Ok(Routing::To(config, admitted)) => (config, admitted),
            Ok(Routing::All(route)) => return across_environments(env, front, &route).await,
            Err(error) => return http::error_response(&error),
        },
    };
    let body = if incoming.method == "POST" {
        match http::read_limited(&mut req, front.config.core.body_limit).await? {
            Ok(body) => body,
            Err(error) => return http::error_response(&error),
        }
    } else {
        Bytes::new()
    };
    let route = admitted.route.clone();
    if route.is_stateless() {
        let answer = incoming.dispatch_without_snapshot(&front.downstream, &body, admitted);
        return match answer {
            Answer::Respond(response) => http::to_response(response),
            _ => http::internal(),
        };
    }
    if route.is_stream() {
        let index = config.pick_shard(js_sys::Math::random());
        let mut extra = vec![(SHARD_HEADER, index.to_string())];
        extra.extend(environment_header(config));
        // The shard picks the stream's coding (core: gzip for large frames, if accepted).
        if let Some(accept) = client_accept_encoding(&req)? {
            extra.push(("accept-encoding", accept));
        }
        // The WebSocket transport: the shard accepts the upgrade (hibernatable).
        if let Some(upgrade) = req
            .headers()
            .get("upgrade")?
            .filter(|v| v.eq_ignore_ascii_case("websocket"))
        {
            extra.push(("upgrade", upgrade));
        }
        let request = incoming.to_object(&extra, true, &[])?;
        return env
            .durable_object("SSE_SHARD")?
            .id_from_name(&config.shard_name(index))?
            .get_stub()?
            .fetch_with_request(request)
            .await;
    }
    if route.is_polling() {
        // Only OFREP's bulk answer depends on the key (its eventStreams URL carries it).
        let key_scope = match route {
            Route::OfrepFlags => admitted.client_key,
            _ => None,
        };
        return poll(
            env,
            ctx,
            front,
            config,
            &incoming,
            &body,
            key_scope.as_deref(),
        )
        .await;
    }
    if crate::forward::is_forwarded(&route) {
        return crate::forward::handle(env, ctx, config, &incoming, body, admitted).await;
    }
    to_relay(env, config, &incoming, &body, true).await
}

/// What the client itself accepts: Cloudflare rewrites `Accept-Encoding` for the Worker (to
/// `br, gzip`, and so does `wrangler dev`) and keeps the client's own header in
/// `request.cf.clientAcceptEncoding`; a stream coded for a client that cannot decode it would
/// be passed through as it is (`text/event-stream` is not a type the edge re-codes).
fn client_accept_encoding(req: &Request) -> worker::Result<Option<String>> {
    let cf = js_sys::Reflect::get(req.inner(), &JsValue::from_str("cf"))
        .ok()
        .filter(JsValue::is_object);
    if let Some(cf) = cf
        && let Ok(original) = js_sys::Reflect::get(&cf, &JsValue::from_str("clientAcceptEncoding"))
        && let Some(original) = original.as_string()
    {
        return Ok(Some(original));
    }
    req.headers().get("accept-encoding")
}

/// Where a request goes when several environments are configured.
enum Routing<'a> {
    /// To this environment.
    To(&'a EdgeConfig, Admitted),
    /// Health, readiness or metrics of every environment.
    All(Route),
}

/// Routes by client key (and an optional `/env/<name>` prefix, stripped from `incoming`).
fn route_environment<'a>(
    front: &'a Front,
    router: &KeyRouter,
    incoming: &mut Incoming,
) -> Result<Routing<'a>, ApiError> {
    let (bare, named) = match KeyRouter::split_path(&incoming.path) {
        Some((name, rest)) => (rest.to_owned(), Some(name)),
        None => (incoming.path.clone(), None),
    };
    if named.is_some_and(|name| !router.names().iter().any(|n| n == name)) {
        return Err(ApiError::not_found(&incoming.path));
    }
    let route = Route::parse(&incoming.method, &bare)?;
    if !route.needs_client_key() {
        if matches!(route, Route::Health | Route::Ready | Route::Metrics) {
            return Ok(Routing::All(route));
        }
        // Probes, the demo page: the same for every environment.
        incoming.path = bare;
        return Ok(Routing::To(
            &front.config,
            Admitted {
                route,
                client_key: None,
            },
        ));
    }
    let request = incoming.request(&[]);
    let routed = router.route(
        now(),
        &incoming.path,
        request.authorization,
        request.api_key,
        request.query,
    )?;
    let config = front
        .environments
        .get(routed.index)
        .ok_or_else(ApiError::not_ready)?;
    let admitted = Admitted {
        route,
        client_key: routed.key,
    };
    incoming.path = routed.path.to_owned();
    Ok(Routing::To(config, admitted))
}

/// `/ready`, `/api/health` and `/api/metrics` of several environments, from each relay.
async fn across_environments(env: &Env, front: &Front, route: &Route) -> worker::Result<Response> {
    let path = match route {
        Route::Ready => "/ready",
        Route::Health => "/api/health",
        _ => "/api/metrics",
    };
    let mut answers = Vec::new();
    for config in &front.environments {
        let headers: Vec<_> = environment_header(config).into_iter().collect();
        let request = http::internal_request(Method::Get, path, &headers, &[])?;
        let mut response = http::fetch_relay(env, config, request).await?;
        let status = response.status_code();
        let text = response.text().await?;
        answers.push((config.environment.as_str(), status, text));
    }
    let api = match route {
        Route::Ready => match answers.iter().find(|(_, status, _)| *status != 200) {
            None => ApiResponse::json(Bytes::from_static(api::READY_BODY)),
            Some((name, _, _)) => {
                let mut error = ApiError::not_ready();
                error.message = format!("{} (environment {name} has no data)", error.message);
                error.into()
            }
        },
        Route::Health => {
            let mut environments = serde_json::Map::new();
            let mut degraded = false;
            for (name, _, text) in &answers {
                let report: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                degraded |= report.get("status").and_then(|s| s.as_str()) != Some("healthy");
                environments.insert((*name).to_owned(), report);
            }
            let body = serde_json::json!({
                "status": if degraded { "degraded" } else { "healthy" },
                "environments": environments,
            });
            ApiResponse::json(Bytes::from(body.to_string()))
        }
        _ => {
            let mut text =
                merge_metrics(answers.iter().map(|(name, _, text)| (*name, text.as_str())));
            text.push_str(&format!(
                "# HELP rollgate_proxy_environments Environments configured.\n\
                 # TYPE rollgate_proxy_environments gauge\n\
                 rollgate_proxy_environments {}\n",
                answers.len()
            ));
            ApiResponse {
                status: 200,
                content_type: Some(rollgate_proxy_core::downstream::METRICS_CONTENT_TYPE),
                headers: Vec::new(),
                body: Bytes::from(text),
            }
        }
    };
    http::to_response(api)
}

pub(crate) async fn to_relay(
    env: &Env,
    config: &EdgeConfig,
    incoming: &Incoming,
    body: &[u8],
    conditional: bool,
) -> worker::Result<Response> {
    let extra: Vec<_> = environment_header(config).into_iter().collect();
    let request = incoming.to_object(&extra, conditional, body)?;
    http::fetch_relay(env, config, request).await
}

/// Polling: answered from the Workers cache when this location has the current snapshot's
/// answer, else by the relay (and then cached).
async fn poll(
    env: &Env,
    ctx: &Context,
    front: &Front,
    config: &EdgeConfig,
    incoming: &Incoming,
    body: &[u8],
    client_key: Option<&str>,
) -> worker::Result<Response> {
    let if_none_match = incoming.if_none_match.as_deref();
    if config.cache_ttl.is_zero() {
        return to_relay(env, config, incoming, body, true).await;
    }
    // One environment only: the isolate's copy and the front's dispatcher are that one's (with
    // several, each request goes to its environment's relay as before).
    if front.router.is_none() && crate::local::worth_asking() {
        // Rules mode: evaluated here, from this isolate's copy of the current snapshot.
        match crate::local::current(env, ctx, config).await {
            Ok(Some((event_id, snapshot)))
                if snapshot.rules().is_some() && crate::local::without_identities(&event_id) =>
            {
                if let Answer::Respond(response) = front.downstream.handle(
                    now(),
                    &incoming.request(body),
                    Some(&snapshot),
                    Freshness::Fresh,
                    http::random_unit(),
                ) {
                    return http::to_response(response);
                }
            }
            Ok(_) => {}
            Err(error) => console_error!("edge snapshot unavailable: {error}"),
        }
    }
    let path = incoming.path.as_str();
    let query = incoming.query.as_str();
    // Answers that carry the client key are cached per key, under a hash of it: keys never
    // reach a cache URL.
    let scope = |event_id: &str| match client_key {
        Some(key) => format!("{event_id}~k{}", render::content_hash(key.as_bytes())),
        None => event_id.to_owned(),
    };
    let edge = Cache::default();
    let pointer = cache::pointer_key(&config.environment);
    let method_name = incoming.method.as_str();
    if let Some(mut current) = edge.get(pointer.as_str(), true).await? {
        let event_id = current.text().await?;
        let key = cache::answer_key(
            &config.environment,
            &scope(&event_id),
            method_name,
            path,
            query,
            body,
        );
        if let Some(mut hit) = edge.get(key.as_str(), true).await? {
            let status = hit
                .headers()
                .get(CACHED_STATUS)?
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(200);
            let cache_control = hit.headers().get(CACHED_CC)?;
            let content_type = hit.headers().get("content-type")?;
            let etag = hit.headers().get("etag")?;
            let bytes = hit.bytes().await?;
            return answer(
                status,
                content_type,
                cache_control,
                etag,
                bytes,
                if_none_match,
            );
        }
    }
    // Miss: ask the relay for the full answer (no If-None-Match, so it can be cached).
    let mut response = to_relay(env, config, incoming, body, false).await?;
    let Some(event_id) = response.headers().get(EVENT_ID_HEADER)? else {
        return Ok(response);
    };
    crate::local::seen(&event_id);
    let status = response.status_code();
    let cache_control = response.headers().get("cache-control")?;
    let content_type = response.headers().get("content-type")?;
    let etag = response.headers().get("etag")?;
    let bytes = response.bytes().await?;
    let cacheable = matches!(status, 200 | 404);
    if cacheable {
        let ttl = config.cache_ttl.as_secs().max(1);
        let key = cache::answer_key(
            &config.environment,
            &scope(&event_id),
            method_name,
            path,
            query,
            body,
        );
        let stored = stored_copy(
            status,
            content_type.as_deref(),
            cache_control.as_deref(),
            etag.as_deref(),
            &bytes,
            ttl * 2,
        )?;
        let pointer_copy = {
            let headers = Headers::new();
            headers.set("cache-control", &format!("max-age={ttl}"))?;
            Response::ok(event_id.clone())?.with_headers(headers)
        };
        ctx.wait_until(async move {
            if let Err(error) = edge.put(key.as_str(), stored).await {
                console_error!("edge cache put failed: {error}");
            }
            if let Err(error) = edge.put(pointer.as_str(), pointer_copy).await {
                console_error!("edge cache put failed: {error}");
            }
        });
    }
    answer(
        status,
        content_type,
        cache_control,
        etag,
        bytes,
        if_none_match,
    )
}

fn stored_copy(
    status: u16,
    content_type: Option<&str>,
    cache_control: Option<&str>,
    etag: Option<&str>,
    body: &[u8],
    ttl_secs: u64,
) -> worker::Result<Response> {
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={ttl_secs}"))?;
    headers.set(CACHED_STATUS, &status.to_string())?;
    if let Some(ct) = content_type {
        headers.set("content-type", ct)?;
    }
    if let Some(cc) = cache_control {
        headers.set(CACHED_CC, cc)?;
    }
    if let Some(etag) = etag {
        headers.set("etag", etag)?;
    }
    Ok(Response::from_bytes(body.to_vec())?.with_headers(headers))
}

/// Rebuilds the client's answer exactly as core shapes it (ETag + 304 through core).
fn answer(
    status: u16,
    content_type: Option<String>,
    cache_control: Option<String>,
    etag: Option<String>,
    body: Vec<u8>,
    if_none_match: Option<&str>,
) -> worker::Result<Response> {
    if status == 200
        && let Some(etag) = etag
    {
        return http::to_response(ApiResponse::json_with_etag(
            Bytes::from(body),
            &etag,
            if_none_match,
        ));
    }
    let headers = Headers::new();
    if let Some(ct) = content_type {
        headers.set("content-type", &ct)?;
    }
    if let Some(cc) = cache_control {
        headers.set("cache-control", &cc)?;
    }
    Ok(Response::from_bytes(body)?
        .with_status(status)
        .with_headers(headers))
}
