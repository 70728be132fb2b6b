//! Ordering of `/identify` before that user's later flag fetches on the relay (evaluated mode),
//! as the native server's identify gates do: Rollgate evaluates a user with the attributes it
//! last received, so a fetch for a user whose identify is still being forwarded waits (bounded)
//! for it. The front forwards identifies (`forward.rs`): the relay opens a gate when it stores
//! the attributes, hands the front its token, and the front's report closes it when the forward
//! ended; a gate whose report never comes closes on its own deadline. Entries live only while
//! forwards are in flight, and at most [`MAX_GATES`] at once.

use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::future::{Either, select};
use rollgate_proxy_core::forwards::REPORT_GRACE;
use worker::Delay;

use super::Inner;

/// Most identify gates open at once; past it an identify gets none (token `0`): its user's
/// next fetch does not wait for it.
const MAX_GATES: usize = 4096;

/// An identify of `user` starts (before the client is answered): returns the gate's token for
/// the front's report (`0`: no gate). The gate closes at the latest after `timeout` (the
/// forward's own) and [`REPORT_GRACE`].
pub(super) fn begin(inner: &Rc<Inner>, user: &str, timeout: Duration) -> u64 {
    let token = {
        let mut core = inner.core.borrow_mut();
        if core.identify_gates.len() >= MAX_GATES {
            return 0;
        }
        core.identify_token += 1;
        let token = core.identify_token;
        core.identify_gates.insert(token, user.to_owned());
        core.identifies.entry(user.to_owned()).or_default().0 += 1;
        token
    };
    let inner = Rc::clone(inner);
    wasm_bindgen_futures::spawn_local(async move {
        Delay::from(timeout + REPORT_GRACE).await;
        end(&inner, token);
    });
    token
}

/// The identify behind gate `token` reached upstream (or gave up): waiting fetches go once no
/// other identify of that user is in flight. A closed or unknown token is ignored.
pub(super) fn end(inner: &Inner, token: u64) {
    let waiters = {
        let mut core = inner.core.borrow_mut();
        let Some(user) = core.identify_gates.remove(&token) else {
            return;
        };
        let Some((count, _)) = core.identifies.get_mut(&user) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return;
        }
        core.identifies.remove(&user).map(|(_, waiters)| waiters)
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
