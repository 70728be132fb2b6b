//! Ordering of `/identify` before that user's later flag fetches (evaluated mode).
//!
//! An identify is answered at once and forwarded in the background; Rollgate evaluates the
//! user's flags with the attributes it last received, so a fetch for that user must not reach
//! Rollgate before the forward does. Each user with identifies in flight has a counter; a fetch
//! for that user waits (bounded) until it is zero. Entries live only while forwards are in
//! flight, so the map is bounded by the concurrent forwards.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::runtime::lock;

/// Identifies in flight, per user.
#[derive(Debug, Default)]
pub struct IdentifyGates {
    users: Mutex<HashMap<String, watch::Sender<usize>>>,
}

impl IdentifyGates {
    /// An identify of `user` starts (called before the client is answered).
    pub fn begin(&self, user: &str) {
        let mut users = lock(&self.users);
        match users.get(user) {
            Some(count) => {
                count.send_modify(|n| *n += 1);
            }
            None => {
                users.insert(user.to_owned(), watch::Sender::new(1));
            }
        }
    }

    /// An identify of `user` reached upstream (or gave up).
    pub fn end(&self, user: &str) {
        let mut users = lock(&self.users);
        if let Some(count) = users.get(user) {
            count.send_modify(|n| *n = n.saturating_sub(1));
            if *count.borrow() == 0 {
                users.remove(user);
            }
        }
    }

    /// Waits until no identify of `user` is in flight, at most `bound`.
    pub async fn wait(&self, user: &str, bound: Duration) {
        let receiver = lock(&self.users).get(user).map(watch::Sender::subscribe);
        if let Some(mut receiver) = receiver {
            let _ = tokio::time::timeout(bound, receiver.wait_for(|n| *n == 0)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_fetch_waits_for_the_users_identifies_only() {
        let gates = Arc::new(IdentifyGates::default());
        gates.begin("u1");
        gates.begin("u1");
        // Another user is not held back.
        tokio::time::timeout(
            Duration::from_secs(5),
            gates.wait("u2", Duration::from_secs(60)),
        )
        .await
        .unwrap();
        let waiter = tokio::spawn({
            let gates = Arc::clone(&gates);
            async move { gates.wait("u1", Duration::from_secs(60)).await }
        });
        gates.end("u1");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        gates.end("u1");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(lock(&gates.users).is_empty());
    }
}
