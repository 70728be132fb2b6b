//! Per-user refreshes after an upstream change: the I/O half of core's `Refresher` (the
//! fetches, and waking that user's SSE connections). Core decides who is refreshed and when.
//!
//! One task follows the upstream machine's change epoch ([`UpstreamHandle::changes`]): each new
//! epoch goes to core (per-user answers fetched before are out of date; streaming users are
//! queued), then the task starts every refresh core's budget allows and sleeps until core's
//! next deadline, a new epoch, or a finished refresh. Each refresh runs in its own task:
//! through the per-user cache (so a poll for that user waits for it rather than fetching
//! again), then it wakes the user's streams ([`UserStreams`]), which send a frame only if the
//! answer changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollgate_proxy_core::refresh::Refresh;
use rollgate_proxy_core::users::FetchTicket;
use tokio::sync::{Notify, watch};

use crate::runtime::{lock, now};
use crate::state::App;
use crate::users::fetch_user;

/// Open per-user SSE connections per user id, each user with a counter bumped whenever that
/// user's cached answer was refetched. A `watch` (not a `Notify`): a connection busy writing
/// when the answer lands still sees the bump afterwards. Entries live while a connection of
/// the user is open, so the map is bounded by the open connections.
#[derive(Debug, Default)]
pub struct UserStreams {
    users: Mutex<HashMap<String, (usize, watch::Sender<u64>)>>,
    /// Woken when a refresh ends (a budget slot is free).
    pub(crate) slot_freed: Notify,
}

impl UserStreams {
    /// A connection of `user` opened: its receiver of "answer refetched" bumps.
    pub fn open(&self, user: &str) -> watch::Receiver<u64> {
        let mut users = lock(&self.users);
        let (count, sender) = users
            .entry(user.to_owned())
            .or_insert_with(|| (0, watch::Sender::new(0)));
        *count += 1;
        sender.subscribe()
    }

    /// A connection of `user` closed.
    pub fn close(&self, user: &str) {
        let mut users = lock(&self.users);
        if let Some((count, _)) = users.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                users.remove(user);
            }
        }
    }

    /// `user`'s answer was refetched: its connections re-read the cache.
    pub fn bump(&self, user: &str) {
        if let Some((_, sender)) = lock(&self.users).get(user) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Follows upstream changes and runs core's per-user refreshes until shutdown.
pub async fn run(app: Arc<App>) {
    let Some(upstream) = app.upstream().cloned() else {
        return;
    };
    let mut changes = upstream.changes.subscribe();
    loop {
        let epoch = *changes.borrow_and_update();
        app.downstream.upstream_changed(now(), epoch);
        if let Some(snapshot) = app.current() {
            while let Some((refresh, ticket)) = app.downstream.poll_refresh(now(), &snapshot) {
                tokio::spawn(refresh_user(Arc::clone(&app), refresh, ticket));
            }
        }
        let sleep_for = app
            .downstream
            .refresh_timeout()
            .map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(at.as_millis().saturating_sub(now().as_millis()))
            });
        tokio::select! {
            biased;
            () = app.shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            () = app.user_streams.slot_freed.notified() => {}
            () = tokio::time::sleep(sleep_for) => {}
        }
    }
}

/// One refresh: after the user's identifies (they reach Rollgate first), fetch through the
/// cache's ticket, wake the user's streams, report to core.
async fn refresh_user(app: Arc<App>, refresh: Refresh, ticket: FetchTicket) {
    let user = refresh.user_id.as_str();
    let bound = app.settings.core.upstream_timeout;
    app.identifies.wait(user, bound).await;
    let result = fetch_user(&app, user).await;
    let ok = result.is_some();
    app.downstream.user_fetched(now(), user, ticket, result);
    app.user_fetches.notify_waiters();
    if ok {
        app.user_streams.bump(user);
    }
    let hold_until = app
        .upstream()
        .and_then(|upstream| upstream.peek(|m| m.status(now()).hold_until));
    app.downstream.refreshed(now(), &refresh, ok, hold_until);
    app.user_streams.slot_freed.notify_one();
}
