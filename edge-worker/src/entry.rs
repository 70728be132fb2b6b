//! The Worker's fetch handler: CORS, routing, client keys and limits, then the edge cache for
//! polling, a shard object for streams, and the relay object for everything else.

use bytes::Bytes;
use rollgate_proxy_core::api::{self, ApiResponse, Route};
use rollgate_proxy_core::render;
use worker::{Cache, Context, Env, Headers, Method, Request, Response, console_error, event};

use crate::cache;
use crate::config::{ConfigError, EdgeConfig};
use crate::cors;
use crate::http::{self, CLIENT_KEY_HEADER, EVENT_ID_HEADER, SHARD_HEADER};
use crate::serve;

/// Header that carries a cached answer's original `Cache-Control` (the stored copy has the
/// cache's own).
const CACHED_CC: &str = "x-rollgate-cache-control";
/// Header that carries a cached answer's status (the stored copy is a 200).
const CACHED_STATUS: &str = "x-rollgate-status";
/// Header carrying a request id, kept from the client when sane, as the native server does.
const REQUEST_ID: &str = "x-request-id";

/// Reads the configuration from vars and secrets.
pub(crate) fn load_config(env: &Env) -> Result<EdgeConfig, ConfigError> {
    EdgeConfig::from_lookup(|name| {
        env.secret(name)
            .map(|s| s.to_string())
            .ok()
            .or_else(|| env.var(name).ok().map(|v| v.to_string()))
    })
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> worker::Result<Response> {
    let config = match load_config(&env) {
        Ok(config) => config,
        Err(error) => {
            console_error!("configuration: {error}");
            return http::internal();
        }
    };
    let origin = req.headers().get("origin")?;
    let request_id = req
        .headers()
        .get(REQUEST_ID)?
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| {
            // Random, not a counter: isolates share no state.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a random sample in [0, 2^53) as an id"
            )]
            let n = (js_sys::Math::random() * 9_007_199_254_740_992.0) as u64;
            format!("{n:016x}")
        });
    if req.method() == Method::Options {
        let mut headers = cors::preflight_headers(&config.cors, origin.as_deref());
        headers.push((REQUEST_ID, request_id));
        return http::with_headers(Response::empty()?, &headers, &[]);
    }
    let response = match handle(req, &env, &ctx, &config).await {
        Ok(response) => response,
        Err(error) => {
            console_error!("request failed: {error}");
            http::internal()?
        }
    };
    let mut headers = cors::response_headers(&config.cors, origin.as_deref());
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
    config: &EdgeConfig,
) -> worker::Result<Response> {
    let (path, query) = http::path_and_query(&req);
    let method = req.method();
    let route = match Route::parse(method.as_ref(), &path) {
        Ok(route) => route,
        Err(error) => return http::error_response(&error),
    };
    let mut client_key = None;
    if route.needs_client_key() {
        let authorization = req.headers().get("authorization")?;
        let api_key = req.headers().get("x-api-key")?;
        match config
            .client_keys
            .matching_key(authorization.as_deref(), api_key.as_deref(), &query)
        {
            Ok(key) => client_key = key.map(str::to_owned),
            Err(error) => return http::error_response(&error),
        }
    }
    // Only OFREP's bulk answer depends on the key (its eventStreams URL carries it).
    let answer_key_of = |route: &Route| match route {
        Route::OfrepFlags => client_key.clone(),
        _ => None,
    };
    let body = match http::read_limited(&mut req, config.body_limit).await? {
        Ok(body) => body,
        Err(error) => return http::error_response(&error),
    };
    match route {
        Route::Live | Route::RootHealth => {
            http::to_response(ApiResponse::json(Bytes::from_static(api::STATUS_OK_BODY)))
        }
        Route::Demo => http::static_text(serve::asset("index.html"), serve::DEMO_CONTENT_TYPE),
        Route::Asset(name) => {
            http::static_text(serve::asset(name), Route::asset_content_type(name))
        }
        ref stream if serve::is_stream(stream) => {
            let index = config.pick_shard(js_sys::Math::random());
            let mut headers = vec![(SHARD_HEADER, index.to_string())];
            if let Some(last) = req.headers().get("last-event-id")? {
                headers.push(("last-event-id", last));
            }
            let request =
                http::internal_request(method, &format!("{path}?{query}"), &headers, &[])?;
            env.durable_object("SSE_SHARD")?
                .id_from_name(&config.shard_name(index))?
                .get_stub()?
                .fetch_with_request(request)
                .await
        }
        ref polling if serve::is_polling(polling) => {
            let inm = req.headers().get("if-none-match")?;
            let client_key = answer_key_of(polling);
            let request = Forward {
                method,
                path: &path,
                query: &query,
                body: &body,
                client_key: client_key.as_deref(),
            };
            poll(env, ctx, config, &request, inm.as_deref()).await
        }
        _ => {
            let request = Forward {
                method,
                path: &path,
                query: &query,
                body: &body,
                client_key: None,
            };
            to_relay(env, config, &request, None).await
        }
    }
}

/// One request's parts, as the Worker hands them on to the relay.
struct Forward<'a> {
    method: Method,
    path: &'a str,
    query: &'a str,
    body: &'a [u8],
    /// The client key presented, for the one answer that carries it (OFREP's stream URL).
    client_key: Option<&'a str>,
}

async fn to_relay(
    env: &Env,
    config: &EdgeConfig,
    request: &Forward<'_>,
    if_none_match: Option<&str>,
) -> worker::Result<Response> {
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if let Some(inm) = if_none_match {
        headers.push(("if-none-match", inm.to_owned()));
    }
    if let Some(key) = request.client_key {
        headers.push((CLIENT_KEY_HEADER, key.to_owned()));
    }
    let url = format!("{}?{}", request.path, request.query);
    let request = http::internal_request(request.method.clone(), &url, &headers, request.body)?;
    env.durable_object("RELAY")?
        .id_from_name(&config.relay_name())?
        .get_stub()?
        .fetch_with_request(request)
        .await
}

/// Polling: answered from the Workers cache when this location has the current snapshot's
/// answer, else by the relay (and then cached).
async fn poll(
    env: &Env,
    ctx: &Context,
    config: &EdgeConfig,
    request: &Forward<'_>,
    if_none_match: Option<&str>,
) -> worker::Result<Response> {
    if config.cache_ttl.is_zero() {
        return to_relay(env, config, request, if_none_match).await;
    }
    let Forward {
        ref method,
        path,
        query,
        body,
        client_key,
    } = *request;
    // Answers that carry the client key are cached per key, under a hash of it: keys never
    // reach a cache URL.
    let scope = |event_id: &str| match client_key {
        Some(key) => format!("{event_id}~k{}", render::content_hash(key.as_bytes())),
        None => event_id.to_owned(),
    };
    let edge = Cache::default();
    let pointer = cache::pointer_key(&config.environment);
    let method_name = method.to_string();
    if let Some(mut current) = edge.get(pointer.as_str(), true).await? {
        let event_id = current.text().await?;
        let key = cache::answer_key(
            &config.environment,
            &scope(&event_id),
            &method_name,
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
    let mut response = to_relay(env, config, request, None).await?;
    let Some(event_id) = response.headers().get(EVENT_ID_HEADER)? else {
        return Ok(response);
    };
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
            &method_name,
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
