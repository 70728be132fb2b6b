//! An SSE shard Durable Object: holds one internal stream of snapshots from the relay and fans
//! frames out to its share of the stream clients, with keepalives that prune dead clients.
//!
//! One object can hold a limited number of concurrent connections and runs on one thread, so
//! the clients of an environment are spread over `SSE_SHARDS` of these; the relay then serves
//! `SSE_SHARDS` internal streams, however many clients there are.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc::{UnboundedSender, unbounded};
use futures_util::StreamExt;
use rollgate_proxy_core::api::{self, ApiError, Route};
use rollgate_proxy_core::model::{Context, EvaluatedFlags};
use rollgate_proxy_core::render;
use rollgate_proxy_core::snapshot::{ContextFlags, Snapshot};
use rollgate_proxy_core::sse::decode::{Decoder, DecoderLimits};
use rollgate_proxy_core::sse::encode::KEEPALIVE;
use worker::{
    Delay, Env, Headers, Method, Request, Response, State, console_error, durable_object,
};

use crate::config::EdgeConfig;
use crate::http::{self, SHARD_HEADER, now};
use crate::relay::SNAPSHOT_EVENT;

/// `retry:` sent first on every stream, as the native server.
const RETRY: Duration = Duration::from_millis(2000);
/// Pause before re-subscribing to the relay after the internal stream ended.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// A shard object.
#[durable_object]
pub struct SseShard {
    inner: Rc<Inner>,
}

struct Inner {
    env: Env,
    core: RefCell<Core>,
}

#[derive(Default)]
struct Core {
    config: Option<Rc<EdgeConfig>>,
    index: u32,
    snapshot: Option<Arc<Snapshot>>,
    clients: Vec<Client>,
    subscribed: bool,
    ticking: bool,
    next_client: u64,
    reported: Option<u64>,
}

struct Client {
    id: u64,
    route: Route,
    /// `None`: anonymous (the snapshot's own frames).
    context: Option<Context>,
    tx: UnboundedSender<Vec<u8>>,
    /// Unix ms of the last byte sent (keepalives are due after the interval).
    last_sent: u64,
    /// Unix ms after which the connection is closed (`SSE_MAX_AGE_MS`, jittered).
    close_at: Option<u64>,
    /// The `Last-Event-ID` the client reconnected with, until its first snapshot is decided:
    /// a client that already has the content is not sent it again.
    last_event_id: Option<String>,
}

impl std::fmt::Debug for SseShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseShard").finish_non_exhaustive()
    }
}

impl worker::DurableObject for SseShard {
    fn new(_state: State, env: Env) -> Self {
        Self {
            inner: Rc::new(Inner {
                env,
                core: RefCell::new(Core::default()),
            }),
        }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        let inner = Rc::clone(&self.inner);
        if inner.core.borrow().config.is_none() {
            match crate::entry::load_config(&inner.env) {
                Ok(config) => inner.core.borrow_mut().config = Some(Rc::new(config)),
                Err(error) => {
                    console_error!("shard: {error}");
                    return http::internal();
                }
            }
        }
        connect(&inner, &req)
    }
}

fn connect(inner: &Rc<Inner>, req: &Request) -> worker::Result<Response> {
    let (path, query) = http::path_and_query(req);
    let method = req.method().to_string();
    let route = match Route::parse(&method, &path) {
        Ok(route) if crate::serve::is_stream(&route) => route,
        Ok(_) => return http::error_response(&ApiError::not_found(&path)),
        Err(error) => return http::error_response(&error),
    };
    let query = query.as_str();
    let context = match api::context_from_query(query) {
        Ok(context) => context,
        Err(error) => return http::error_response(&error),
    };
    let last_event_id = req.headers().get("last-event-id")?;
    if let Some(index) = req
        .headers()
        .get(SHARD_HEADER)?
        .and_then(|v| v.parse::<u32>().ok())
    {
        inner.core.borrow_mut().index = index;
    }
    let (tx, rx) = unbounded::<Vec<u8>>();
    let _ = tx.unbounded_send(render::retry_frame(RETRY).to_vec());
    let context = (!context.is_anonymous() && route != Route::OfrepStream).then_some(context);
    let opened = now();
    let close_at = inner
        .core
        .borrow()
        .config
        .as_ref()
        .and_then(|c| c.sse_max_age)
        .map(|age| {
            let age = crate::config::jittered_age(age, js_sys::Math::random());
            opened.saturating_add(age).as_millis()
        });
    let id = {
        let mut core = inner.core.borrow_mut();
        core.next_client += 1;
        let id = core.next_client;
        core.clients.push(Client {
            id,
            route,
            context,
            tx,
            last_sent: opened.as_millis(),
            close_at,
            last_event_id,
        });
        id
    };
    let snapshot = inner.core.borrow().snapshot.clone();
    if let Some(snapshot) = snapshot {
        send_snapshot(inner, id, &snapshot);
    }
    ensure_tasks(inner);
    let headers = Headers::new();
    headers.set("content-type", api::EVENT_STREAM)?;
    headers.set("cache-control", api::NO_CACHE)?;
    headers.set("x-accel-buffering", "no")?;
    Ok(Response::from_stream(rx.map(Ok::<Vec<u8>, worker::Error>))?.with_headers(headers))
}

/// Sends client `id` its frame of `snapshot` (asking the relay for a user's flags in
/// evaluated mode).
fn send_snapshot(inner: &Rc<Inner>, id: u64, snapshot: &Arc<Snapshot>) {
    let (route, context) = {
        let mut core = inner.core.borrow_mut();
        let Some(client) = core.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        if client
            .last_event_id
            .take()
            .is_some_and(|last| snapshot.is_current_event_id(&last))
        {
            return;
        }
        (client.route.clone(), client.context.clone())
    };
    match context.as_ref().map(|c| snapshot.flags_for(c)) {
        // No context, or evaluated mode without a user id (upstream evaluates per id only):
        // the snapshot's own frame.
        None => send(
            inner,
            id,
            &crate::serve::stream_frame(&route, snapshot, None),
        ),
        Some(ContextFlags::NeedsUpstream) if context.as_ref().is_some_and(|c| c.id.is_none()) => {
            send(
                inner,
                id,
                &crate::serve::stream_frame(&route, snapshot, None),
            );
        }
        Some(ContextFlags::Ready(flags)) => {
            send(
                inner,
                id,
                &crate::serve::stream_frame(&route, snapshot, Some(&flags)),
            );
        }
        Some(ContextFlags::NeedsUpstream) => {
            let inner = Rc::clone(inner);
            let snapshot = Arc::clone(snapshot);
            let Some(context) = context else { return };
            wasm_bindgen_futures::spawn_local(async move {
                match relay_user_flags(&inner, &context).await {
                    Ok(flags) => {
                        // Only if no newer snapshot arrived meanwhile.
                        let current = inner
                            .core
                            .borrow()
                            .snapshot
                            .as_ref()
                            .is_some_and(|s| Arc::ptr_eq(s, &snapshot));
                        if current {
                            send(
                                &inner,
                                id,
                                &crate::serve::stream_frame(&route, &snapshot, Some(&flags)),
                            );
                        }
                    }
                    Err(error) => console_error!("shard: user flags unavailable: {error}"),
                }
            });
        }
    }
}

fn send(inner: &Inner, id: u64, frame: &[u8]) {
    let at = now().as_millis();
    inner.core.borrow_mut().clients.retain_mut(|client| {
        if client.id != id {
            return true;
        }
        client.last_sent = at;
        client.tx.unbounded_send(frame.to_vec()).is_ok()
    });
}

async fn relay_user_flags(inner: &Inner, context: &Context) -> worker::Result<EvaluatedFlags> {
    let Some(id) = context.id.as_deref() else {
        return Err(worker::Error::RustError("no user id".into()));
    };
    let query = format!(
        "/api/v1/sdk/flags?withReasons=true&user_id={}",
        String::from(js_sys::encode_uri_component(id))
    );
    let request = http::internal_request(Method::Get, &query, &[], &[])?;
    let mut response = relay_stub(inner)?.fetch_with_request(request).await?;
    if response.status_code() != 200 {
        return Err(worker::Error::RustError(format!(
            "relay answered {}",
            response.status_code()
        )));
    }
    let body = response.bytes().await?;
    EvaluatedFlags::from_json(&body).map_err(|e| worker::Error::RustError(e.to_string()))
}

fn relay_stub(inner: &Inner) -> worker::Result<worker::Stub> {
    let name = inner
        .core
        .borrow()
        .config
        .as_ref()
        .map(|c| c.relay_name())
        .unwrap_or_default();
    inner
        .env
        .durable_object("RELAY")?
        .id_from_name(&name)?
        .get_stub()
}

fn ensure_tasks(inner: &Rc<Inner>) {
    let (subscribe, tick) = {
        let mut core = inner.core.borrow_mut();
        let subscribe = !core.subscribed;
        let tick = !core.ticking;
        core.subscribed = true;
        core.ticking = true;
        (subscribe, tick)
    };
    if subscribe {
        wasm_bindgen_futures::spawn_local(subscription(Rc::clone(inner)));
    }
    if tick {
        wasm_bindgen_futures::spawn_local(ticker(Rc::clone(inner)));
    }
}

/// Holds the internal stream from the relay, re-subscribing while there are clients.
async fn subscription(inner: Rc<Inner>) {
    loop {
        if let Err(error) = follow_relay(&inner).await {
            console_error!("shard: relay stream failed: {error}");
        }
        if inner.core.borrow().clients.is_empty() {
            inner.core.borrow_mut().subscribed = false;
            return;
        }
        Delay::from(RESUBSCRIBE_DELAY).await;
    }
}

async fn follow_relay(inner: &Rc<Inner>) -> worker::Result<()> {
    let request = http::internal_request(Method::Get, "/__rollgate/subscribe", &[], &[])?;
    let mut response = relay_stub(inner)?.fetch_with_request(request).await?;
    let mut body = response.stream()?;
    let mut decoder = Decoder::new(DecoderLimits::default());
    while let Some(chunk) = body.next().await {
        decoder
            .push(&chunk?)
            .map_err(|e| worker::Error::RustError(e.to_string()))?;
        while let Some(event) = decoder.next_event() {
            if event.event != SNAPSHOT_EVENT {
                continue;
            }
            match Snapshot::from_persisted(event.data.as_bytes()) {
                Ok((snapshot, _)) => publish(inner, Arc::new(snapshot)),
                Err(error) => console_error!("shard: bad snapshot from relay: {error}"),
            }
        }
        if inner.core.borrow().clients.is_empty() {
            // Nobody to serve: let the internal stream go (the next client re-subscribes).
            return Ok(());
        }
    }
    Ok(())
}

fn publish(inner: &Rc<Inner>, snapshot: Arc<Snapshot>) {
    let ids: Vec<u64> = {
        let mut core = inner.core.borrow_mut();
        if core
            .snapshot
            .as_ref()
            .is_some_and(|s| s.content_hash() == snapshot.content_hash())
        {
            // The relay re-sent what we have (a re-subscription): clients are up to date.
            core.snapshot = Some(snapshot);
            return;
        }
        core.snapshot = Some(Arc::clone(&snapshot));
        core.clients.iter().map(|c| c.id).collect()
    };
    for id in ids {
        send_snapshot(inner, id, &snapshot);
    }
}

/// Keepalive comments (the write to a gone client fails and drops it) and client-count reports
/// to the relay for `/api/health`.
async fn ticker(inner: Rc<Inner>) {
    loop {
        let Some(config) = inner.core.borrow().config.clone() else {
            return;
        };
        let tick = (config.sdk_keepalive.min(config.keepalive) / 4).max(Duration::from_millis(50));
        Delay::from(tick).await;
        let at = now().as_millis();
        let (count, changed, index) = {
            let mut core = inner.core.borrow_mut();
            core.clients.retain_mut(|client| {
                if client.close_at.is_some_and(|end| at >= end) {
                    // Dropping the sender ends the response body cleanly; the client
                    // reconnects after `retry:` and may land on another shard or location.
                    return false;
                }
                let interval = if client.route == Route::SdkStream {
                    config.sdk_keepalive
                } else {
                    config.keepalive
                };
                let due = client.last_sent + rollgate_proxy_core::time::duration_millis(interval);
                if at < due {
                    // Nothing due; a closed receiver still shows up as a failed write later.
                    return !client.tx.is_closed();
                }
                client.last_sent = at;
                client.tx.unbounded_send(KEEPALIVE.to_vec()).is_ok()
            });
            let count = core.clients.len() as u64;
            let changed = core.reported != Some(count);
            core.reported = Some(count);
            (count, changed, core.index)
        };
        if changed {
            let path = format!("/__rollgate/shard-clients?shard={index}&clients={count}");
            if let Ok(request) = http::internal_request(Method::Get, &path, &[], &[])
                && let Ok(stub) = relay_stub(&inner)
                && let Err(error) = stub.fetch_with_request(request).await
            {
                console_error!("shard: reporting clients failed: {error}");
            }
        }
        let mut core = inner.core.borrow_mut();
        if core.clients.is_empty() {
            core.ticking = false;
            return;
        }
    }
}
