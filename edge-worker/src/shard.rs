//! An SSE shard Durable Object: holds one internal stream of snapshots from the relay and fans
//! frames out to its share of the stream clients, each driven by core's `Subscriber`.
//!
//! One object can hold a limited number of concurrent connections and runs on one thread, so
//! the clients of an environment are spread over `ROLLGATE_PROXY_SSE_SHARDS` of these; the relay
//! then serves that many internal streams, however many clients there are. A per-user client's
//! flags are asked of the relay (which merges `/identify` attributes, evaluates rules or uses
//! its per-user cache), with the client's own key. Shards that the platform placed in one
//! isolate hold one copy of each snapshot (`restore_snapshot`).
//!
//! WebSocket clients (`Upgrade: websocket` on the same routes) are held by the runtime on the
//! hibernation API instead, fed by the relay's pushes: see [`sockets`].

pub(crate) mod sockets;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use rollgate_proxy_core::api::{self, ApiError};
use rollgate_proxy_core::backoff::{ReconnectBackoff, ReconnectPolicy};
use rollgate_proxy_core::downstream::{Answer, Downstream};
use rollgate_proxy_core::encoding::Encoding;
use rollgate_proxy_core::model::{Context, EvaluatedFlags};
use rollgate_proxy_core::snapshot::{Freshness, SharedSnapshots, Snapshot, SnapshotError};
use rollgate_proxy_core::sse::decode::{Decoder, DecoderLimits};
use rollgate_proxy_core::sse::encode::KEEPALIVE;
use rollgate_proxy_core::sse::gzip;
use rollgate_proxy_core::stream::{self, Next, StreamKind, Subscriber};
use worker::{
    Delay, Env, Headers, Method, Request, Response, State, WebSocket, WebSocketIncomingMessage,
    console_error, durable_object,
};

use crate::config::EdgeConfig;
use crate::fanout::{Chunk, JsFrames, Outlet, PUBLISH_BATCH, js_bytes, yield_to_runtime};
use crate::http::{self, Incoming, SHARD_HEADER, now};
use crate::relay::SNAPSHOT_EVENT;
use crate::relay::refresh::{STREAM_HEADER, USER_REFRESHED_EVENT};

thread_local! {
    /// The snapshots this isolate's shards rebuilt from the relay's publishes. The platform
    /// may place several shard objects in one isolate (so does `wrangler dev`, all of them):
    /// they then hold one copy of each publish, its frames and gzip segments rendered once.
    static RESTORED: RefCell<SharedSnapshots> = RefCell::default();
}

/// The snapshot in a relay's `event: snapshot` data, shared with this isolate's other shards.
pub(crate) fn restore_snapshot(data: &str) -> Result<Arc<Snapshot>, SnapshotError> {
    RESTORED.with(|restored| restored.borrow_mut().restore(data.as_bytes()))
}

/// How the shard re-subscribes to the relay after the internal stream ended: quickly at first
/// (clients miss changes meanwhile), backing off with jitter while the relay keeps failing, so
/// that every shard of an environment does not hammer a restarting relay in step.
fn resubscribe_policy() -> ReconnectPolicy {
    ReconnectPolicy {
        initial_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(15),
        jitter: 0.5,
    }
}

/// A shard object: fetch, the hibernation API's WebSocket handlers, and the alarm that ends
/// WebSocket clients at their maximum age.
#[durable_object]
pub struct SseShard {
    inner: Rc<Inner>,
}

struct Inner {
    state: State,
    env: Env,
    core: RefCell<Core>,
}

#[derive(Default)]
struct Core {
    config: Option<Rc<EdgeConfig>>,
    downstream: Option<Rc<Downstream>>,
    index: u32,
    snapshot: Option<Arc<Snapshot>>,
    /// The JS copies of the current snapshot's shared frames: one per kind, for all clients.
    frames: JsFrames,
    /// The keepalive comment, identity and gzip-coded, shared by all clients.
    keepalive: Option<[Chunk; 2]>,
    /// The newest publish; a paced hand-out of an older one stops (see [`rollout`]).
    publish_generation: u64,
    /// Snapshots from the relay refused because they were older than the current one.
    stale_refused: u64,
    clients: Vec<Client>,
    subscribed: bool,
    ticking: bool,
    next_client: u64,
    frames_sent: [u64; 3],
    /// Clients, frames and wasm memory as last reported.
    reported: Option<([u64; 3], [u64; 3], u64)>,
    /// The snapshot the WebSocket clients are served from (pushed by the relay).
    socket_snapshot: Option<Arc<Snapshot>>,
    /// The relay pushes to this shard (registered since it last woke).
    registered: bool,
    /// The alarm the WebSocket clients' maximum age set (unix ms; `Some(None)`: none; `None`:
    /// not known since the object woke).
    close_alarm: Option<Option<u64>>,
    /// This instance's start (random): the relay sums the counters below across restarts
    /// (a woken or evicted shard counts from zero again).
    boot: u64,
    /// WebSocket connects refused because the shard held its `sockets_per_shard`.
    sockets_refused: u64,
    refused_reported: u64,
}

struct Client {
    id: u64,
    subscriber: Subscriber,
    /// The key the client presented, for the relay requests made on its behalf.
    client_key: Option<String>,
    /// The client's body: holds the newest frame not yet sent, never a queue.
    outlet: Outlet,
    /// The body is gzip-coded: it gets the shared frames' segments.
    gzip: bool,
    /// Unix ms of the last byte sent (keepalives are due after the interval).
    last_sent: u64,
    /// A per-user client's user id once the relay tracks it (its first flags request said
    /// `open`); reported closed when the client goes.
    tracked_user: Option<String>,
}

impl std::fmt::Debug for SseShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseShard").finish_non_exhaustive()
    }
}

impl worker::DurableObject for SseShard {
    fn new(state: State, env: Env) -> Self {
        let raw = state._inner();
        // A client's `ping` is answered by the runtime: a hibernated object is not woken.
        match worker::WebSocketRequestResponsePair::new(sockets::PING, sockets::PONG) {
            Ok(pair) => {
                if let Err(error) = raw.set_websocket_auto_response(&pair) {
                    console_error!("shard: no WebSocket auto-response: {error:?}");
                }
            }
            Err(error) => console_error!("shard: no WebSocket auto-response: {error:?}"),
        }
        Self {
            inner: Rc::new(Inner {
                state: State::from(raw),
                env,
                core: RefCell::new(Core::default()),
            }),
        }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let inner = Rc::clone(&self.inner);
        if inner.core.borrow().config.is_none() {
            let environment = req.headers().get(http::ENVIRONMENT_HEADER)?;
            if !configure(&inner, environment.as_deref()) {
                return http::internal();
            }
        }
        if req.path() == sockets::PUSH_PATH {
            return sockets::push(&inner, &mut req).await;
        }
        let upgrade = req
            .headers()
            .get("upgrade")?
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        if upgrade {
            if let Some(index) = req
                .headers()
                .get(SHARD_HEADER)?
                .and_then(|v| v.parse::<u32>().ok())
            {
                inner.core.borrow_mut().index = index;
            }
            return sockets::connect(&inner, &req).await;
        }
        connect(&inner, &req)
    }

    async fn alarm(&self) -> worker::Result<Response> {
        sockets::expire(&self.inner).await;
        Response::ok("ok")
    }

    async fn websocket_message(
        &self,
        _ws: WebSocket,
        _message: WebSocketIncomingMessage,
    ) -> worker::Result<()> {
        // `ping` is answered by the runtime; clients send nothing else that matters.
        Ok(())
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        _code: usize,
        _reason: String,
        _was_clean: bool,
    ) -> worker::Result<()> {
        sockets::closed(&self.inner, &ws).await;
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: worker::Error) -> worker::Result<()> {
        sockets::closed(&self.inner, &ws).await;
        Ok(())
    }
}

/// Loads the configuration of `environment` (once per instance; again after hibernation);
/// `false` if it is invalid (logged).
fn configure(inner: &Inner, environment: Option<&str>) -> bool {
    match crate::entry::load_config_for(&inner.env, environment) {
        Ok(config) => {
            let mut core = inner.core.borrow_mut();
            if core.boot == 0 {
                core.boot = http::random_id();
            }
            core.downstream = Some(Rc::new(Downstream::new(config.core.clone())));
            core.config = Some(Rc::new(config));
            true
        }
        Err(error) => {
            console_error!("shard: {error}");
            false
        }
    }
}

fn connect(inner: &Rc<Inner>, req: &Request) -> worker::Result<Response> {
    let incoming = Incoming::read(req)?;
    if let Some(index) = req
        .headers()
        .get(SHARD_HEADER)?
        .and_then(|v| v.parse::<u32>().ok())
    {
        inner.core.borrow_mut().index = index;
    }
    let Some(downstream) = inner.core.borrow().downstream.clone() else {
        return http::internal();
    };
    let snapshot = inner.core.borrow().snapshot.clone();
    let freshness = if snapshot.is_some() {
        Freshness::Fresh
    } else {
        Freshness::Missing
    };
    let answer = downstream.handle(
        now(),
        &incoming.request(&[]),
        snapshot.as_ref(),
        freshness,
        http::random_unit(),
    );
    let (subscriber, client_key) = match answer {
        Answer::Stream {
            subscriber,
            client_key,
        } => (subscriber, client_key),
        Answer::Respond(response) => return http::to_response(response),
        _ => return http::error_response(&ApiError::not_found(&incoming.path)),
    };
    let headers = Headers::new();
    for (name, value) in stream::HEADERS {
        headers.set(name, value)?;
    }
    let accept_encoding = req.headers().get("accept-encoding")?;
    let gzip = subscriber.coding(accept_encoding.as_deref(), snapshot.as_deref()) == Encoding::Gzip;
    if gzip {
        headers.set("content-encoding", "gzip")?;
        headers.set("vary", "accept-encoding")?;
    }
    let (outlet, response) = Outlet::open_coded(&subscriber.preamble(), headers, gzip)?;
    let id = {
        let mut core = inner.core.borrow_mut();
        core.next_client += 1;
        let id = core.next_client;
        core.clients.push(Client {
            id,
            subscriber,
            client_key,
            outlet,
            gzip,
            last_sent: now().as_millis(),
            tracked_user: None,
        });
        id
    };
    if let Some(snapshot) = snapshot {
        send_snapshot(inner, id, &snapshot);
    }
    ensure_tasks(inner);
    Ok(response)
}

/// Sends client `id` what core's subscriber decides for `snapshot` (asking the relay for a
/// per-user client's flags).
fn send_snapshot(inner: &Rc<Inner>, id: u64, snapshot: &Arc<Snapshot>) {
    let (next, client_key, stream) = {
        let mut core = inner.core.borrow_mut();
        let Some(client) = core.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        let next = client.subscriber.on_snapshot(snapshot);
        let stream = track(client, &next);
        (next, client.client_key.clone(), stream)
    };
    match next {
        Next::Frame(frame) => send(inner, id, Shared::Yes(&frame)),
        Next::Nothing => {}
        Next::Resolve(context) => resolve(inner, id, snapshot, context, client_key, stream),
    }
}

/// How a per-user client's flags request names it to the relay: the first one tracks the user
/// (refreshed on upstream changes); later ones read the relay's cache, which the relay's
/// refresher keeps current under its budget.
fn track(client: &mut Client, next: &Next) -> &'static str {
    if !matches!(next, Next::Resolve(_)) {
        return "cached";
    }
    if client.tracked_user.is_some() {
        "cached"
    } else {
        client.tracked_user = client.subscriber.user_id().map(str::to_owned);
        "open"
    }
}

/// Asks the relay for per-user client `id`'s flags and sends the frame core makes of them.
fn resolve(
    inner: &Rc<Inner>,
    id: u64,
    snapshot: &Arc<Snapshot>,
    context: Context,
    client_key: Option<String>,
    stream: &'static str,
) {
    let inner = Rc::clone(inner);
    let snapshot = Arc::clone(snapshot);
    wasm_bindgen_futures::spawn_local(async move {
        match relay_flags(&inner, &context, client_key.as_deref(), stream).await {
            Ok(flags) => {
                let frame = {
                    let mut core = inner.core.borrow_mut();
                    // Only if no newer snapshot arrived meanwhile.
                    let current = core
                        .snapshot
                        .as_ref()
                        .is_some_and(|s| Arc::ptr_eq(s, &snapshot));
                    core.clients
                        .iter_mut()
                        .find(|c| c.id == id)
                        .filter(|_| current)
                        .and_then(|c| c.subscriber.on_flags(&snapshot, &flags))
                };
                if let Some(frame) = frame {
                    send(&inner, id, Shared::No(&frame));
                }
            }
            Err(error) => console_error!("shard: user flags unavailable: {error}"),
        }
    });
}

/// Whether a frame is the snapshot's own (one JS copy shared by every client) or a client's.
enum Shared<'a> {
    Yes(&'a Bytes),
    No(&'a Bytes),
}

fn send(inner: &Rc<Inner>, id: u64, frame: Shared<'_>) {
    let at = now().as_millis();
    let mut closed = Vec::new();
    {
        let mut core = inner.core.borrow_mut();
        let Some(gzip) = core.clients.iter().find(|c| c.id == id).map(|c| c.gzip) else {
            return;
        };
        let chunk = match (frame, core.snapshot.clone()) {
            (Shared::Yes(frame), Some(snapshot)) => core.frames.get_chunk(&snapshot, frame, gzip),
            (Shared::Yes(frame) | Shared::No(frame), _) => Chunk::own(frame, gzip),
        };
        let mut sent = None;
        core.clients.retain_mut(|client| {
            if client.id != id {
                return true;
            }
            client.last_sent = at;
            let ok = client.outlet.offer_chunk(&chunk);
            if ok {
                sent = Some(client.subscriber.kind());
            } else {
                closed.extend(client.tracked_user.take());
            }
            ok
        });
        if let Some(kind) = sent {
            core.frames_sent[kind.index()] += 1;
        }
    }
    report_closed(inner, closed);
}

/// Tells the relay that these tracked per-user clients closed (it stops refreshing a user
/// whose last stream went).
fn report_closed(inner: &Rc<Inner>, users: Vec<String>) {
    if users.is_empty() {
        return;
    }
    let mut query = form_urlencoded::Serializer::new(String::new());
    for user in &users {
        query.append_pair("user", user);
    }
    let path = format!("/__rollgate/user-streams-closed?{}", query.finish());
    let inner = Rc::clone(inner);
    wasm_bindgen_futures::spawn_local(async move {
        let headers: Vec<_> = environment_header(&inner).into_iter().collect();
        if let Ok(request) = http::internal_request(Method::Get, &path, &headers, &[])
            && let Ok(stub) = relay_stub(&inner)
            && let Err(error) = stub.fetch_with_request(request).await
        {
            console_error!("shard: reporting closed streams failed: {error}");
        }
    });
}

/// The relay refetched `user`'s answer: that user's clients re-read it (a frame only if it
/// changed).
fn user_refreshed(inner: &Rc<Inner>, user: &str) {
    let (ids, snapshot) = {
        let core = inner.core.borrow();
        let ids: Vec<u64> = core
            .clients
            .iter()
            .filter(|c| c.tracked_user.as_deref() == Some(user))
            .map(|c| c.id)
            .collect();
        (ids, core.snapshot.clone())
    };
    let Some(snapshot) = snapshot else { return };
    for id in ids {
        send_snapshot(inner, id, &snapshot);
    }
}

/// A per-user client's flags, as the relay answers `/api/v1/sdk/flags` for its context.
async fn relay_flags(
    inner: &Inner,
    context: &Context,
    client_key: Option<&str>,
    stream: &str,
) -> worker::Result<EvaluatedFlags> {
    let path = format!(
        "/api/v1/sdk/flags?withReasons=true&{}",
        api::context_to_query(context)
    );
    let mut headers: Vec<(&str, String)> = client_key
        .map(|key| ("authorization", format!("Bearer {key}")))
        .into_iter()
        .collect();
    headers.push((STREAM_HEADER, stream.to_owned()));
    headers.extend(environment_header(inner));
    let request = http::internal_request(Method::Get, &path, &headers, &[])?;
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

/// Names this shard's environment to the relay (several environments), which may be starting.
fn environment_header(inner: &Inner) -> Option<(&'static str, String)> {
    let core = inner.core.borrow();
    let config = core.config.as_ref()?;
    config
        .environments
        .as_ref()
        .map(|_| (http::ENVIRONMENT_HEADER, config.environment.clone()))
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
    let mut backoff = ReconnectBackoff::new(resubscribe_policy());
    loop {
        match follow_relay(&inner).await {
            // A stream that delivered snapshots was healthy: start the schedule over.
            Ok(true) => backoff.reset(),
            Ok(false) => {}
            Err(error) => console_error!("shard: relay stream failed: {error}"),
        }
        if inner.core.borrow().clients.is_empty() {
            inner.core.borrow_mut().subscribed = false;
            return;
        }
        Delay::from(backoff.next_delay(http::random_unit())).await;
    }
}

/// Follows one internal stream; `Ok(true)` when it delivered at least one snapshot.
async fn follow_relay(inner: &Rc<Inner>) -> worker::Result<bool> {
    let headers: Vec<_> = environment_header(inner).into_iter().collect();
    let request = http::internal_request(Method::Get, "/__rollgate/subscribe", &headers, &[])?;
    let mut response = relay_stub(inner)?.fetch_with_request(request).await?;
    let mut body = response.stream()?;
    let mut decoder = Decoder::new(DecoderLimits::default());
    let mut delivered = false;
    while let Some(chunk) = body.next().await {
        decoder
            .push(&chunk?)
            .map_err(|e| worker::Error::RustError(e.to_string()))?;
        while let Some(event) = decoder.next_event() {
            if event.event == USER_REFRESHED_EVENT {
                user_refreshed(inner, &event.data);
                continue;
            }
            if event.event != SNAPSHOT_EVENT {
                continue;
            }
            match restore_snapshot(&event.data) {
                Ok(snapshot) => {
                    delivered = true;
                    publish(inner, snapshot);
                }
                Err(error) => console_error!("shard: bad snapshot from relay: {error}"),
            }
            // The envelope's data was the decoder's line buffer: the next one reuses it.
            decoder.recycle(event);
        }
        if inner.core.borrow().clients.is_empty() {
            // Nobody to serve: let the internal stream go (the next client re-subscribes).
            return Ok(delivered);
        }
    }
    Ok(delivered)
}

/// Hands every client what core's subscriber decides for a new `snapshot`, in one pass over
/// the clients: the shared frame (one JS copy for all) to anonymous ones, a relay request per
/// per-user one.
fn publish(inner: &Rc<Inner>, snapshot: Arc<Snapshot>) {
    let at = now().as_millis();
    let mut offers = Vec::new();
    let mut resolves = Vec::new();
    let generation;
    {
        let mut core = inner.core.borrow_mut();
        if let Some(current) = core.snapshot.clone() {
            if snapshot.revision() < current.revision() {
                // A relay restarted from an older persisted snapshot: never take clients back.
                // Its next snapshot from upstream gets a revision past this one's again.
                core.stale_refused += 1;
                console_error!(
                    "shard: refused revision {} older than {} ({} so far)",
                    snapshot.revision(),
                    current.revision(),
                    core.stale_refused
                );
                return;
            }
            if current.content_hash() == snapshot.content_hash() {
                // The relay re-sent what we have (a re-subscription): clients are up to date.
                return;
            }
        }
        // An equal revision with other content is taken: only upstream moves the relay's
        // content, so it is newer than what a relay that lost its last write had published.
        let core = &mut *core;
        core.frames.clear();
        core.snapshot = Some(Arc::clone(&snapshot));
        core.publish_generation += 1;
        generation = core.publish_generation;
        let frames = &mut core.frames;
        for client in &mut core.clients {
            let next = client.subscriber.on_snapshot(&snapshot);
            let stream = track(client, &next);
            match next {
                Next::Frame(frame) => {
                    client.last_sent = at;
                    offers.push((client.id, frames.get_chunk(&snapshot, &frame, client.gzip)));
                }
                Next::Nothing => {}
                Next::Resolve(context) => {
                    resolves.push((client.id, context, client.client_key.clone(), stream));
                }
            }
        }
    }
    if !offers.is_empty() {
        wasm_bindgen_futures::spawn_local(rollout(Rc::clone(inner), generation, offers));
    }
    for (id, context, client_key, stream) in resolves {
        resolve(inner, id, &snapshot, context, client_key, stream);
    }
}

/// Hands a publish's frames to its clients [`PUBLISH_BATCH`] at a time, yielding to the
/// runtime between batches: it copies each client's chunk into its own buffers on every hop,
/// and handed to 2,000 clients at once those copies all live at once (measured: +98 MiB for a
/// 130 KB frame, +18 MiB paced; `BENCHMARKS.md`). The first batch goes at once. A newer
/// publish stops an older hand-out: its decisions cover every client again.
async fn rollout(inner: Rc<Inner>, generation: u64, offers: Vec<(u64, Chunk)>) {
    for (n, batch) in offers.chunks(PUBLISH_BATCH).enumerate() {
        if n > 0 {
            yield_to_runtime().await;
        }
        let mut closed = Vec::new();
        {
            let mut core = inner.core.borrow_mut();
            if core.publish_generation != generation {
                return;
            }
            let core = &mut *core;
            let mut gone = Vec::new();
            for (id, chunk) in batch {
                // Clients are kept in id order (new ones are appended with a larger id).
                let Ok(at) = core.clients.binary_search_by_key(id, |c| c.id) else {
                    continue;
                };
                let client = &mut core.clients[at];
                if client.outlet.offer_chunk(chunk) {
                    core.frames_sent[client.subscriber.kind().index()] += 1;
                } else {
                    closed.extend(client.tracked_user.take());
                    gone.push(*id);
                }
            }
            if !gone.is_empty() {
                core.clients.retain(|c| !gone.contains(&c.id));
            }
        }
        report_closed(&inner, closed);
    }
}

/// Keepalive comments (the write to a gone client fails and drops it), the max-age close, and
/// client/frame reports to the relay for `/api/health` and `/api/metrics`.
async fn ticker(inner: Rc<Inner>) {
    loop {
        let Some(config) = inner.core.borrow().config.clone() else {
            return;
        };
        let tick = (config.core.sdk_keepalive.min(config.core.keepalive) / 4)
            .max(Duration::from_millis(50));
        Delay::from(tick).await;
        let at = now();
        let mut closed = Vec::new();
        {
            let mut core = inner.core.borrow_mut();
            let comments = core
                .keepalive
                .get_or_insert_with(|| {
                    [
                        Chunk::plain(js_bytes(KEEPALIVE)),
                        Chunk::coded(gzip::keepalive().clone()),
                    ]
                })
                .clone();
            core.clients.retain_mut(|client| {
                let keep = if client.subscriber.close_at().is_some_and(|end| at >= end) {
                    // Dropping the sender ends the response body cleanly; the client
                    // reconnects after `retry:` and may land on another shard or location.
                    false
                } else {
                    let interval = client.subscriber.keepalive_interval();
                    let due =
                        client.last_sent + rollgate_proxy_core::time::duration_millis(interval);
                    if at.as_millis() < due {
                        !client.outlet.is_gone()
                    } else {
                        client.last_sent = at.as_millis();
                        client
                            .outlet
                            .keepalive_chunk(&comments[usize::from(client.gzip)])
                    }
                };
                if !keep {
                    closed.extend(client.tracked_user.take());
                }
                keep
            });
        }
        report_closed(&inner, closed);
        if let Some(request) = report_request(&inner)
            && let Ok(stub) = relay_stub(&inner)
            && let Err(error) = stub.fetch_with_request(request).await
        {
            console_error!("shard: reporting clients failed: {error}");
        }
        let mut core = inner.core.borrow_mut();
        // WebSocket clients need no ticker (it would keep the object from hibernating).
        if core.clients.is_empty() {
            core.ticking = false;
            return;
        }
    }
}

/// The report of this shard's clients (event-stream and WebSocket, per kind), frames sent,
/// refused sockets and wasm memory to the relay, when it changed since the last one.
fn report_request(inner: &Inner) -> Option<Request> {
    let sockets = sockets::counts(inner);
    let memory = http::wasm_memory_bytes();
    let (clients, frames, refused, index) = {
        let mut core = inner.core.borrow_mut();
        let mut clients = sockets;
        for client in &core.clients {
            clients[client.subscriber.kind().index()] += 1;
        }
        let report = (clients, core.frames_sent, memory);
        if core.reported == Some(report) && core.refused_reported == core.sockets_refused {
            return None;
        }
        core.reported = Some(report);
        core.refused_reported = core.sockets_refused;
        (clients, core.frames_sent, core.sockets_refused, core.index)
    };
    let boot = inner.core.borrow().boot;
    let mut path = format!(
        "/__rollgate/shard-clients?shard={index}&boot={boot}&sockets_refused={refused}&wasm_memory={memory}"
    );
    for kind in StreamKind::ALL {
        let i = kind.index();
        let label = kind.label();
        path.push_str(&format!(
            "&{label}={}&frames_{label}={}",
            clients[i], frames[i]
        ));
    }
    let headers: Vec<_> = environment_header(inner).into_iter().collect();
    http::internal_request(Method::Get, &path, &headers, &[]).ok()
}

/// Sends the report now (WebSocket connects and closes: no ticker runs for them).
fn report_now(inner: &Rc<Inner>) {
    let Some(request) = report_request(inner) else {
        return;
    };
    let inner = Rc::clone(inner);
    wasm_bindgen_futures::spawn_local(async move {
        if let Ok(stub) = relay_stub(&inner)
            && let Err(error) = stub.fetch_with_request(request).await
        {
            console_error!("shard: reporting clients failed: {error}");
        }
    });
}
