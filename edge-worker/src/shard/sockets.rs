//! The shard's WebSocket clients, on the hibernation API: each message is exactly one frame core
//! renders for the event stream, and nothing the object holds for them keeps it in memory.
//!
//! An object holding an open response body or an outgoing streaming fetch cannot hibernate, so
//! WebSocket clients use neither: the runtime holds the sockets (`acceptWebSocket`), each
//! socket's state lives in its attachment (which survives hibernation), keepalives are the
//! client's `ping` answered by the runtime (`setWebSocketAutoResponse`, no wake), and the relay
//! *pushes* every publish and per-user refresh to the shards that registered sockets
//! ([`PUSH_PATH`], a request that wakes the object). After waking, the object rebuilds each
//! socket's core `Subscriber` from the attachment; revisions only move forward per socket.
//!
//! Core also decides each message's form (`Subscriber::socket_message`): text, or for a client
//! that asked `?coding=gzip` a large frame as one binary gzip member. Either is made into one JS
//! value per frame and publish, sent by reference to every socket.

use js_sys::{JsString, Uint8Array};
use rollgate_proxy_core::stream::SocketMessage;
use wasm_bindgen::{JsCast, JsValue};
use worker::{WebSocket, WebSocketPair};

use super::{
    Arc, Context, Decoder, DecoderLimits, Freshness, Incoming, Method, Next, Rc, Request, Response,
    SHARD_HEADER, SNAPSHOT_EVENT, Snapshot, StreamKind, USER_REFRESHED_EVENT, console_error,
    environment_header, http, now, relay_flags, relay_stub, report_closed,
};
use crate::fanout::{PUBLISH_BATCH, yield_to_runtime};
use crate::shard::Inner;

/// The relay's request carrying a publish (the same bytes as its internal stream) to a shard.
pub(crate) const PUSH_PATH: &str = "/__rollgate/ws-push";
/// The shard's request to the relay registering it for pushes; answered with the current
/// snapshot frame.
pub(crate) const REGISTER_PATH: &str = "/__rollgate/ws-shard";
/// What a client sends to learn that the connection is alive, and the runtime's answer.
pub(crate) const PING: &str = "ping";
pub(crate) const PONG: &str = "pong";
/// Status of a push to a shard without sockets: the relay stops pushing to it.
pub(crate) const NO_SOCKETS: u16 = 410;

/// One socket's state, kept by the runtime with the socket.
#[derive(Clone, Debug, Default)]
struct Attachment {
    /// The stream's path and query (context, `?token=`): core re-creates the subscriber.
    path: String,
    query: String,
    /// A key sent as a header (non-browser clients), for the same re-creation.
    authorization: Option<String>,
    /// The environment (several configured): the object reloads its configuration on waking.
    environment: Option<String>,
    /// This shard's index, for its reports after waking on a close (which carries no header).
    shard: u32,
    /// Event id of the last frame sent (its revision and content hash).
    sent_id: Option<String>,
    /// Revision of the last snapshot a frame was decided for: never an older one after it.
    revision: u64,
    /// Hash of the per-user flags last sent (core's `Subscriber::sent_flags`).
    sent_flags: Option<u64>,
    /// The per-user client's user, once the relay tracks it.
    tracked_user: Option<String>,
    /// When core's (jittered) maximum age ends the connection (unix ms): the shard's alarm
    /// closes it cleanly, as the event stream ends, so clients move between shards and
    /// locations over time.
    close_at: Option<u64>,
}

impl Attachment {
    /// Stored as a form-encoded string through the runtime's methods directly: workers-rs's
    /// `serialize_attachment` (and a serde derive) would link more (de)serializers into the
    /// wasm, which is over its size budget already.
    fn of(ws: &WebSocket) -> Option<Self> {
        let text = call(ws, "deserializeAttachment", None).ok()?.as_string()?;
        let mut attachment = Self::default();
        for (name, value) in form_urlencoded::parse(text.as_bytes()) {
            let value = value.into_owned();
            match &*name {
                "p" => attachment.path = value,
                "q" => attachment.query = value,
                "a" => attachment.authorization = Some(value),
                "e" => attachment.environment = Some(value),
                "i" => attachment.sent_id = Some(value),
                "r" => attachment.revision = value.parse().unwrap_or(0),
                "f" => attachment.sent_flags = value.parse().ok(),
                "u" => attachment.tracked_user = Some(value),
                "s" => attachment.shard = value.parse().unwrap_or(0),
                "c" => attachment.close_at = value.parse().ok(),
                _ => {}
            }
        }
        Some(attachment)
    }

    fn store(&self, ws: &WebSocket) {
        let mut text = form_urlencoded::Serializer::new(String::new());
        text.append_pair("p", &self.path)
            .append_pair("q", &self.query)
            .append_pair("r", &self.revision.to_string())
            .append_pair("s", &self.shard.to_string());
        let optional = [
            ("a", self.authorization.clone()),
            ("e", self.environment.clone()),
            ("i", self.sent_id.clone()),
            ("f", self.sent_flags.map(|f| f.to_string())),
            ("u", self.tracked_user.clone()),
            ("c", self.close_at.map(|at| at.to_string())),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                text.append_pair(name, &value);
            }
        }
        let text = JsValue::from_str(&text.finish());
        if let Err(error) = call(ws, "serializeAttachment", Some(&text)) {
            console_error!("shard: socket attachment not stored: {error:?}");
        }
    }
}

/// `ws.<method>(arg)` on the runtime's socket.
fn call(ws: &WebSocket, method: &str, arg: Option<&JsValue>) -> Result<JsValue, JsValue> {
    let socket: &web_sys::WebSocket = ws.as_ref();
    let function: js_sys::Function =
        js_sys::Reflect::get(socket, &JsValue::from_str(method))?.dyn_into()?;
    match arg {
        Some(arg) => function.call1(socket, arg),
        None => function.call0(socket),
    }
}

/// Sockets of the open connections (a closing one is still listed while its handler runs).
fn open_sockets(inner: &Inner) -> Vec<WebSocket> {
    inner
        .state
        .get_websockets()
        .into_iter()
        .filter(|ws| AsRef::<web_sys::WebSocket>::as_ref(ws).ready_state() == 1)
        .collect()
}

/// Open sockets per stream kind (tags), for the clients gauge.
pub(super) fn counts(inner: &Inner) -> [u64; 3] {
    let mut counts = [0u64; 3];
    for kind in StreamKind::ALL {
        counts[kind.index()] = inner
            .state
            .get_websockets_with_tag(kind.label())
            .iter()
            .filter(|ws| AsRef::<web_sys::WebSocket>::as_ref(*ws).ready_state() == 1)
            .count() as u64;
    }
    counts
}

/// A client's `Upgrade: websocket` on a stream route: checked by core exactly as the event
/// stream (the front already refused a bad key), accepted for hibernation, and sent the current
/// snapshot's frame.
pub(super) async fn connect(inner: &Rc<Inner>, req: &Request) -> worker::Result<Response> {
    let incoming = Incoming::read(req)?;
    // Hibernatable sockets one shard accepts (`ROLLGATE_PROXY_SOCKETS_PER_SHARD`, 10,000 by
    // default; the runtime allows 32,768 per object, and a publish goes to every socket from
    // one thread); beyond that a connect gets 503, counted.
    let limit = inner
        .core
        .borrow()
        .config
        .as_ref()
        .map_or(10_000, |config| config.sockets_per_shard);
    if inner.state.get_websockets().len() >= limit {
        inner.core.borrow_mut().sockets_refused += 1;
        super::report_now(inner);
        return http::error_response(&rollgate_proxy_core::api::ApiError::not_ready());
    }
    let mut attachment = Attachment {
        path: incoming.path.clone(),
        query: incoming.query.clone(),
        authorization: req.headers().get("authorization")?,
        environment: req.headers().get(http::ENVIRONMENT_HEADER)?,
        shard: inner.core.borrow().index,
        ..Attachment::default()
    };
    let Some(downstream) = inner.core.borrow().downstream.clone() else {
        return http::internal();
    };
    // Core's answer without a snapshot: a stream (then fed below) or an error answer.
    let kind = match downstream.handle(
        now(),
        &request_of(&attachment),
        None,
        Freshness::Missing,
        http::random_unit(),
    ) {
        rollgate_proxy_core::downstream::Answer::Stream { subscriber, .. } => {
            attachment.close_at = subscriber.close_at().map(|at| at.as_millis());
            subscriber.kind()
        }
        rollgate_proxy_core::downstream::Answer::Respond(response) => {
            return http::to_response(response);
        }
        _ => {
            return http::error_response(&rollgate_proxy_core::api::ApiError::not_found(
                &incoming.path,
            ));
        }
    };
    let pair = WebSocketPair::new()?;
    inner
        .state
        .accept_websocket_with_tags(&pair.server, &[kind.label()]);
    attachment.store(&pair.server);
    if let Some(snapshot) = current(inner).await {
        deliver(inner, &pair.server, &snapshot, &SharedMessages::default());
    }
    if let Some(at) = attachment.close_at {
        schedule_close(inner, at).await;
    }
    super::report_now(inner);
    Response::from_websocket(pair.client)
}

/// Makes sure the shard's alarm fires by `at` (a socket's maximum age). The alarm is the
/// only timer a hibernated object has; one is kept, for the earliest close.
async fn schedule_close(inner: &Rc<Inner>, at: u64) {
    let known = inner.core.borrow().close_alarm;
    let armed = match known {
        Some(armed) => armed,
        None => {
            let stored = match inner.state.storage().get_alarm().await {
                Ok(alarm) => alarm.and_then(|ms| u64::try_from(ms).ok()),
                Err(error) => {
                    console_error!("shard: get_alarm failed: {error}");
                    None
                }
            };
            // Another connect may have armed it while this one waited for the storage.
            inner.core.borrow().close_alarm.unwrap_or(stored)
        }
    };
    if armed.is_some_and(|armed| armed <= at) {
        inner.core.borrow_mut().close_alarm = Some(armed);
        return;
    }
    inner.core.borrow_mut().close_alarm = Some(Some(at));
    let offset = i64::try_from(at.saturating_sub(now().as_millis())).unwrap_or(i64::MAX);
    if let Err(error) = inner.state.storage().set_alarm(offset).await {
        console_error!("shard: set_alarm failed: {error}");
        inner.core.borrow_mut().close_alarm = None;
    }
}

/// The shard's alarm: closes every socket at or near its maximum age (within a twentieth of
/// it, so one wake serves the sockets that connected close together) and arms the alarm for
/// the next one.
pub(super) async fn expire(inner: &Rc<Inner>) {
    inner.core.borrow_mut().close_alarm = Some(None);
    let sockets = open_sockets(inner);
    let attachments: Vec<Option<Attachment>> = sockets.iter().map(Attachment::of).collect();
    // Woken by the alarm: the configuration and index come from a socket.
    wake_from(inner, attachments.iter().flatten().next());
    let slack = inner
        .core
        .borrow()
        .config
        .as_ref()
        .and_then(|config| config.core.sse_max_age)
        .map_or(0, |age| {
            rollgate_proxy_core::time::duration_millis(age) / 20
        });
    let due = now().as_millis().saturating_add(slack);
    let mut users = Vec::new();
    let mut next: Option<u64> = None;
    for (ws, attachment) in sockets.iter().zip(attachments) {
        let Some(mut attachment) = attachment else {
            continue;
        };
        match attachment.close_at {
            Some(at) if at <= due => {
                // Reported closed here, once: the close handler that runs when the client
                // answers then finds no tracked user.
                if let Some(user) = attachment.tracked_user.take() {
                    attachment.store(ws);
                    users.push(user);
                }
                // A clean close: the client reconnects, maybe to another shard or location.
                let _ = ws.close(Some(1000), Some("max age"));
            }
            Some(at) => next = Some(next.map_or(at, |next| next.min(at))),
            None => {}
        }
    }
    report_closed(inner, users);
    if let Some(at) = next {
        schedule_close(inner, at).await;
    }
    super::report_now(inner);
}

/// The snapshot the sockets are served from: the one pushed last, else the relay's (asked
/// once after waking, which also registers this shard for pushes).
async fn current(inner: &Rc<Inner>) -> Option<Arc<Snapshot>> {
    let (snapshot, registered) = {
        let core = inner.core.borrow();
        (core.socket_snapshot.clone(), core.registered)
    };
    if let (Some(snapshot), true) = (&snapshot, registered) {
        return Some(Arc::clone(snapshot));
    }
    match register(inner).await {
        Ok(Some(fresh)) => {
            accept_snapshot(inner, fresh);
            inner.core.borrow_mut().registered = true;
        }
        Ok(None) => inner.core.borrow_mut().registered = true,
        Err(error) => console_error!("shard: registering for pushes failed: {error}"),
    }
    inner.core.borrow().socket_snapshot.clone()
}

/// Registers this shard with the relay; its current snapshot if it has one.
async fn register(inner: &Rc<Inner>) -> worker::Result<Option<Arc<Snapshot>>> {
    let index = inner.core.borrow().index;
    let headers: Vec<_> = environment_header(inner).into_iter().collect();
    let path = format!("{REGISTER_PATH}?shard={index}");
    let request = http::internal_request(Method::Get, &path, &headers, &[])?;
    let mut response = relay_stub(inner)?.fetch_with_request(request).await?;
    if response.status_code() != 200 {
        return Ok(None);
    }
    let body = response.bytes().await?;
    let mut snapshot = None;
    for_each_event(&body, |event, data| {
        if event == SNAPSHOT_EVENT {
            match super::restore_snapshot(data) {
                Ok(s) => snapshot = Some(s),
                Err(error) => console_error!("shard: bad snapshot from relay: {error}"),
            }
        }
    });
    Ok(snapshot)
}

fn for_each_event(body: &[u8], mut each: impl FnMut(&str, &str)) {
    let mut decoder = Decoder::new(DecoderLimits::default());
    if let Err(error) = decoder.push(body) {
        console_error!("shard: bad push from relay: {error}");
        return;
    }
    while let Some(event) = decoder.next_event() {
        each(&event.event, &event.data);
    }
}

/// Keeps `snapshot` as the sockets' current one unless it is older; `false` if refused.
fn accept_snapshot(inner: &Inner, snapshot: Arc<Snapshot>) -> bool {
    let mut core = inner.core.borrow_mut();
    if let Some(current) = &core.socket_snapshot {
        if snapshot.revision() < current.revision() {
            core.stale_refused += 1;
            return false;
        }
        if current.content_hash() == snapshot.content_hash() {
            return false;
        }
    }
    core.socket_snapshot = Some(snapshot);
    true
}

/// The relay's push: a publish or a user's refreshed answer, the same events as its internal
/// stream. 410 when this shard has no sockets left (the relay stops pushing).
pub(super) async fn push(inner: &Rc<Inner>, req: &mut Request) -> worker::Result<Response> {
    if let Some(index) = req
        .headers()
        .get(SHARD_HEADER)?
        .and_then(|v| v.parse::<u32>().ok())
    {
        inner.core.borrow_mut().index = index;
    }
    if inner.state.get_websockets().is_empty() {
        // The relay stops pushing on this answer: the next socket must register again, or it
        // would be served a snapshot nobody updates.
        let mut core = inner.core.borrow_mut();
        core.registered = false;
        core.socket_snapshot = None;
        return Ok(Response::empty()?.with_status(NO_SOCKETS));
    }
    inner.core.borrow_mut().registered = true;
    let body = req.bytes().await?;
    let mut users = Vec::new();
    let mut published = false;
    for_each_event(&body, |event, data| {
        if event == USER_REFRESHED_EVENT {
            users.push(data.to_owned());
        } else if event == SNAPSHOT_EVENT {
            match super::restore_snapshot(data) {
                Ok(snapshot) => published |= accept_snapshot(inner, snapshot),
                Err(error) => console_error!("shard: bad snapshot from relay: {error}"),
            }
        }
    });
    let Some(snapshot) = current(inner).await else {
        return Response::ok("no snapshot");
    };
    let sockets: Vec<WebSocket> = open_sockets(inner)
        .into_iter()
        .filter(|ws| {
            published
                || Attachment::of(ws)
                    .and_then(|a| a.tracked_user)
                    .is_some_and(|user| users.contains(&user))
        })
        .collect();
    // One JS value per shared message, sent by reference to every socket; paced like the
    // event streams' hand-out (the runtime copies each socket's message into its own buffer).
    let shared = SharedMessages::default();
    for (n, ws) in sockets.iter().enumerate() {
        if n > 0 && n % PUBLISH_BATCH == 0 {
            yield_to_runtime().await;
        }
        deliver(inner, ws, &snapshot, &shared);
    }
    super::report_now(inner);
    Response::ok("ok")
}

/// The JS values of the current publish's shared messages (a few: one per frame and form),
/// keyed by the bytes core shares between sockets.
#[derive(Default)]
struct SharedMessages {
    made: std::cell::RefCell<Vec<(SocketMessage, JsValue)>>,
}

impl SharedMessages {
    fn get(&self, message: SocketMessage) -> JsValue {
        let mut made = self.made.borrow_mut();
        let same = |made: &SocketMessage| match (made, &message) {
            (SocketMessage::Text(a), SocketMessage::Text(b))
            | (SocketMessage::Gzip(a), SocketMessage::Gzip(b)) => {
                a.as_ptr() == b.as_ptr() && a.len() == b.len()
            }
            _ => false,
        };
        if let Some((_, value)) = made.iter().find(|(m, _)| same(m)) {
            return value.clone();
        }
        let value = js_message(&message);
        made.push((message, value.clone()));
        value
    }
}

/// `message` as what `ws.send` takes: a JS string (made once: `WebSocket::send_with_str` would
/// convert the Rust string again for every socket), or the gzip member's bytes.
fn js_message(message: &SocketMessage) -> JsValue {
    match message {
        SocketMessage::Text(frame) => {
            JsString::from(String::from_utf8_lossy(frame).as_ref()).into()
        }
        SocketMessage::Gzip(member) => Uint8Array::from(&member[..]).into(),
    }
}

/// Sends `ws` what core's subscriber, re-created from the attachment, decides for `snapshot`;
/// a per-user socket's flags are asked of the relay in a task of their own.
fn deliver(inner: &Rc<Inner>, ws: &WebSocket, snapshot: &Arc<Snapshot>, shared: &SharedMessages) {
    let Some(mut attachment) = Attachment::of(ws) else {
        return;
    };
    if snapshot.revision().get() < attachment.revision {
        return;
    }
    let Some(downstream) = inner.core.borrow().downstream.clone() else {
        return;
    };
    let answer = downstream.handle(
        now(),
        &request_of(&attachment),
        Some(snapshot),
        Freshness::Fresh,
        http::random_unit(),
    );
    let rollgate_proxy_core::downstream::Answer::Stream {
        mut subscriber,
        client_key,
    } = answer
    else {
        // The key was removed meanwhile: the client reconnects and gets core's answer.
        let _ = ws.close(Some(1008), Some("refused"));
        return;
    };
    subscriber.resume_sent_flags(attachment.sent_flags);
    match subscriber.on_snapshot(snapshot) {
        Next::Frame(frame) => {
            attachment.sent_id = Some(snapshot.event_id().to_owned());
            let message = shared.get(subscriber.socket_message(snapshot, frame));
            if send(ws, &message) {
                inner.core.borrow_mut().frames_sent[subscriber.kind().index()] += 1;
            }
        }
        Next::Nothing => {}
        Next::Resolve(context) => {
            let stream = if attachment.tracked_user.is_some() {
                "cached"
            } else {
                attachment.tracked_user = context.id.clone();
                "open"
            };
            attachment.store(ws);
            wasm_bindgen_futures::spawn_local(resolve(
                Rc::clone(inner),
                ws.clone(),
                Arc::clone(snapshot),
                subscriber,
                context,
                client_key,
                stream,
            ));
            return;
        }
    }
    attachment.revision = snapshot.revision().get();
    attachment.store(ws);
}

/// Asks the relay for a per-user socket's flags and sends the frame core makes of them.
async fn resolve(
    inner: Rc<Inner>,
    ws: WebSocket,
    snapshot: Arc<Snapshot>,
    mut subscriber: rollgate_proxy_core::stream::Subscriber,
    context: Context,
    client_key: Option<String>,
    stream: &'static str,
) {
    let flags = match relay_flags(&inner, &context, client_key.as_deref(), stream).await {
        Ok(flags) => flags,
        Err(error) => {
            console_error!("shard: user flags unavailable: {error}");
            return;
        }
    };
    // Re-read: a newer snapshot may have been decided meanwhile.
    let Some(mut attachment) = Attachment::of(&ws) else {
        return;
    };
    if attachment.revision > snapshot.revision().get() {
        return;
    }
    attachment.revision = snapshot.revision().get();
    subscriber.resume_sent_flags(attachment.sent_flags);
    if let Some(frame) = subscriber.on_flags(&snapshot, &flags) {
        attachment.sent_id = Some(snapshot.event_id().to_owned());
        let message = js_message(&subscriber.socket_message(&snapshot, frame));
        if send(&ws, &message) {
            inner.core.borrow_mut().frames_sent[subscriber.kind().index()] += 1;
        }
    }
    attachment.sent_flags = subscriber.sent_flags();
    attachment.store(&ws);
}

/// `ws.send(message)` with a JS value made once per frame ([`js_message`]).
fn send(ws: &WebSocket, message: &JsValue) -> bool {
    call(ws, "send", Some(message)).is_ok()
}

/// Core's request for a socket's stream, as the client first sent it.
fn request_of(attachment: &Attachment) -> rollgate_proxy_core::downstream::Request<'_> {
    rollgate_proxy_core::downstream::Request {
        method: "GET",
        path: &attachment.path,
        query: &attachment.query,
        authorization: attachment.authorization.as_deref(),
        api_key: None,
        if_none_match: None,
        // An anonymous client is not sent the snapshot it has; a per-user one decides by its
        // flags (a refreshed answer comes with the same snapshot).
        last_event_id: attachment
            .sent_id
            .as_deref()
            .filter(|_| attachment.sent_flags.is_none()),
        accept_encoding: None,
        body: &[],
    }
}

/// An object woken by a handler that carries no request headers (a close, the alarm): its
/// environment's configuration and its index come from a socket's attachment.
fn wake_from(inner: &Rc<Inner>, attachment: Option<&Attachment>) {
    if inner.core.borrow().config.is_some() {
        return;
    }
    let environment = attachment.and_then(|a| a.environment.clone());
    super::configure(inner, environment.as_deref());
    if let Some(attachment) = attachment {
        inner.core.borrow_mut().index = attachment.shard;
    }
}

/// A socket closed or failed: its tracked user is reported closed, the gauge updated.
pub(super) async fn closed(inner: &Rc<Inner>, ws: &WebSocket) {
    let attachment = Attachment::of(ws);
    // Woken by this close: the configuration and index come from the socket.
    wake_from(inner, attachment.as_ref());
    // Completes the closing handshake (the runtime may have done so already).
    let _ = ws.close(Some(1000), Some("closed"));
    if let Some(user) = attachment.and_then(|a| a.tracked_user) {
        report_closed(inner, vec![user]);
    }
    super::report_now(inner);
}
