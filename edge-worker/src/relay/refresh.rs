//! Per-user refreshes after an upstream change on the Worker: the relay's half of core's
//! `Refresher` (the fetches, and telling the shards whose answer was refetched).
//!
//! The shards announce their per-user stream clients to the relay: the first flags request of
//! a client carries [`STREAM_HEADER`]`: open` (the relay then tracks the user), later ones
//! `cached` (answered from the per-user cache without an upstream request, since refreshing is
//! the refresher's job), and a closed client is reported on `/__rollgate/user-streams-closed`.
//! After every drive of the machine the relay hands its change epoch to core; each refresh core
//! then allows runs as its own task, through the per-user cache's ticket (a poll for the user
//! waits for it), and ends with a [`USER_REFRESHED_EVENT`] on the internal stream: the shards
//! re-ask for that user's clients (from the cache) and send a frame only if the answer changed.

use std::rc::Rc;

use rollgate_proxy_core::downstream::{Downstream, Pending};
use rollgate_proxy_core::refresh::Refresh;
use rollgate_proxy_core::sse::encode::Event;
use rollgate_proxy_core::upstream::Upstream;
use rollgate_proxy_core::users::{FetchTicket, UserFlags};
use worker::Delay;

use super::{Inner, config_of, downstream_of, fetch_user, notify};
use crate::http::now;

/// Header on a shard's per-user flags request: `open` (a new stream client; track the user)
/// or `cached` (an existing one: answer from the cache when there is an answer).
pub(crate) const STREAM_HEADER: &str = "x-rollgate-proxy-stream";
/// SSE event of the internal relay → shard stream: this user's answer was refetched.
pub(crate) const USER_REFRESHED_EVENT: &str = "user-refreshed";

/// After the machine's actions are drained: a new change epoch goes to core, and refreshes
/// start as the budget allows.
pub(super) fn after_drive(inner: &Rc<Inner>) {
    let Some(downstream) = downstream_of(inner) else {
        return;
    };
    let epoch = inner
        .core
        .borrow()
        .upstream
        .as_ref()
        .map(Upstream::change_epoch);
    if let Some(epoch) = epoch
        && downstream.upstream_changed(now(), epoch)
    {
        pump(inner);
    }
}

/// Starts every refresh core allows now, and a timer for the next one.
pub(super) fn pump(inner: &Rc<Inner>) {
    let (Some(downstream), Some(snapshot)) = (downstream_of(inner), inner.core.borrow().snapshot())
    else {
        return;
    };
    while let Some((refresh, ticket)) = downstream.poll_refresh(now(), &snapshot) {
        wasm_bindgen_futures::spawn_local(refresh_user(
            Rc::clone(inner),
            Rc::clone(&downstream),
            refresh,
            ticket,
        ));
    }
    let Some(at) = downstream.refresh_timeout() else {
        return;
    };
    if std::mem::replace(&mut inner.core.borrow_mut().refresh_timer, true) {
        return;
    }
    let wait = at.as_millis().saturating_sub(now().as_millis());
    let inner = Rc::clone(inner);
    wasm_bindgen_futures::spawn_local(async move {
        Delay::from(std::time::Duration::from_millis(wait)).await;
        inner.core.borrow_mut().refresh_timer = false;
        pump(&inner);
    });
}

async fn refresh_user(
    inner: Rc<Inner>,
    downstream: Rc<Downstream>,
    refresh: Refresh,
    ticket: FetchTicket,
) {
    let user = refresh.user_id.clone();
    let result = match config_of(&inner) {
        Some(config) => fetch_user(&inner, &config, &user).await,
        None => None,
    };
    let ok = result.is_some();
    let flags = downstream.user_fetched(now(), &user, ticket, result);
    // Polls of this user that waited for the refresh.
    let waiters = inner.core.borrow_mut().user_waiters.remove(&ticket);
    for waiter in waiters.unwrap_or_default() {
        let _ = waiter.send(flags.clone());
    }
    if ok {
        user_refreshed(&inner, &user);
    }
    let hold_until = inner
        .core
        .borrow()
        .upstream
        .as_ref()
        .and_then(|u| u.status(now()).hold_until);
    downstream.refreshed(now(), &refresh, ok, hold_until);
    pump(&inner);
}

/// Tells the shards that `user`'s cached answer was refetched.
pub(super) fn user_refreshed(inner: &Rc<Inner>, user: &str) {
    let builder = Event::new();
    let builder = builder
        .clone()
        .event(USER_REFRESHED_EVENT)
        .unwrap_or(builder);
    notify(inner, &builder.data(user).into_bytes());
}

/// A shard's per-user flags request: with `open`, the user is tracked; with `cached`, the
/// cached answer (any age: the refresher keeps a tracked user's current) when the user is
/// tracked and has one, `None` when the request must go the usual way.
pub(super) fn shard_request(
    downstream: &Downstream,
    pending: &Pending,
    stream: Option<&str>,
) -> Option<UserFlags> {
    match stream {
        Some("open") => {
            downstream.user_stream_opened(pending.user_id());
            None
        }
        Some("cached") => {
            if downstream.user_stream_seen(pending.user_id()) {
                // Not tracked here (this relay restarted, or the user's streams were counted
                // short): tracked again, but nobody kept its cached answer current, so this
                // request goes the usual way (the per-user cache for the current revision).
                return None;
            }
            downstream
                .user_cached(pending.user_id())
                .map(UserFlags::Stale)
        }
        _ => None,
    }
}

/// `?user=a&user=b`: those shard clients closed.
pub(super) fn streams_closed(inner: &Inner, query: &str) {
    let Some(downstream) = downstream_of(inner) else {
        return;
    };
    for (name, user) in form_urlencoded::parse(query.as_bytes()) {
        if name == "user" {
            downstream.user_stream_closed(&user);
        }
    }
}
