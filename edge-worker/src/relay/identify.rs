//! Ordering of `/identify` before that user's later flag fetches on the relay (evaluated mode),
//! as the native server's identify gates do: Rollgate evaluates a user with the attributes it
//! last received, so a fetch for a user whose identify is still being forwarded waits (bounded)
//! for it. Entries live only while forwards are in flight.

use std::time::Duration;

use futures_channel::oneshot;
use futures_util::future::{Either, select};
use worker::Delay;

use super::Inner;

/// An identify of `user` starts (before the client is answered).
pub(super) fn begin(inner: &Inner, user: &str) {
    let mut core = inner.core.borrow_mut();
    core.identifies.entry(user.to_owned()).or_default().0 += 1;
}

/// An identify of `user` reached upstream (or gave up): waiting fetches go once none is left.
pub(super) fn end(inner: &Inner, user: &str) {
    let waiters = {
        let mut core = inner.core.borrow_mut();
        let Some((count, _)) = core.identifies.get_mut(user) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return;
        }
        core.identifies.remove(user).map(|(_, waiters)| waiters)
    };
    for waiter in waiters.unwrap_or_default() {
        let _ = waiter.send(());
    }
}

/// Waits until no identify of `user` is in flight, at most `bound`.
pub(super) async fn wait(inner: &Inner, user: &str, bound: Duration) {
    let rx = {
        let mut core = inner.core.borrow_mut();
        let Some((_, waiters)) = core.identifies.get_mut(user) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        waiters.push(tx);
        rx
    };
    if let Either::Right(_) = select(rx, Delay::from(bound)).await {
        worker::console_log!("relay: a fetch stopped waiting for its user's identify");
    }
}
