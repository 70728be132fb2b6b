//! Per-user refreshes after an upstream change, sans-IO, under a budget toward Rollgate.
//!
//! In evaluated mode each per-user answer is one upstream request. When upstream signals a
//! change (any `init`, `flags`, `flag-changed`, `flag-update`, or new content), every cached
//! per-user answer may be out of date, even when the anonymous flags are not: a targeting rule
//! can change one user's value only. The [`Refresher`] then re-fetches the answers of the users
//! who hold a per-user **stream** (they are waiting for a frame), at most
//! [`RefreshBudget::rps`] starts per second and [`RefreshBudget::concurrency`] in flight, so
//! Rollgate sees a bounded load whatever the number of users. Users only seen polling are not
//! queued: their cached answer is stale from the change on, and their next poll fetches it
//! (one fetch per user, coalesced with a refresh in flight).
//!
//! - Coalesced per user: one refresh in flight per user; a change during it re-queues the user
//!   once, after it ends.
//! - A failure pauses the refresher for [`FAILURE_PAUSE`], or until the `Retry-After` upstream
//!   asked for, whichever is later; the user is re-queued.
//! - Bounded: users tracked at most [`RefreshBudget::max_tracked`] (streams beyond are not
//!   refreshed and are counted as dropped); the backlog holds each tracked user at most once.
//!
//! Inputs: [`Refresher::handle_change`], [`Refresher::handle_stream_opened`] /
//! [`Refresher::handle_stream_closed`], [`Refresher::handle_refreshed`]. Outputs:
//! [`Refresher::poll_refresh`] (the next user to fetch) and [`Refresher::poll_timeout`] (when to
//! ask again).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::time::Timestamp;

/// After a failed refresh, no refresh starts for this long (the user is re-queued).
pub const FAILURE_PAUSE: Duration = Duration::from_secs(1);

/// The longest a `Retry-After` pauses refreshes.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// The budget of per-user refreshes toward Rollgate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshBudget {
    /// Refreshes started per second at most (≥ 1).
    pub rps: u32,
    /// Refreshes in flight at most (≥ 1).
    pub concurrency: usize,
    /// Streaming users tracked at most.
    pub max_tracked: usize,
}

/// One refresh to perform: fetch `user_id`'s flags and report with
/// [`Refresher::handle_refreshed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refresh {
    /// Pass back with the result.
    pub id: u64,
    /// The user whose answer to fetch.
    pub user_id: String,
}

/// How a refresh ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The user's answer is fresh (fetched, or already fetched by someone else).
    Done,
    /// The fetch failed; `hold_until`: upstream asked for quiet until then (`Retry-After`).
    Failed {
        /// When requests may go upstream again, if upstream said.
        hold_until: Option<Timestamp>,
    },
}

/// Counters and gauges for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Users waiting for a refresh.
    pub backlog: usize,
    /// Age of the oldest backlog entry (since the change that queued it).
    pub oldest: Option<Duration>,
    /// Refreshes in flight.
    pub in_flight: usize,
    /// Refreshes completed.
    pub done: u64,
    /// Refreshes failed.
    pub failed: u64,
    /// Streams not tracked (beyond [`RefreshBudget::max_tracked`]): not refreshed.
    pub dropped: u64,
}

#[derive(Debug)]
struct Queued {
    user_id: String,
    /// The change that queued it (the backlog's age).
    since: Timestamp,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    /// A change arrived during the refresh: queue the user again when it ends (since then).
    requeue: Option<Timestamp>,
}

/// The per-user refresh scheduler. See the module docs.
#[derive(Debug)]
pub struct Refresher {
    budget: RefreshBudget,
    /// Open per-user streams per user id.
    streaming: HashMap<String, u32>,
    backlog: VecDeque<Queued>,
    /// Which users are in `backlog` (each once).
    queued: HashMap<String, Timestamp>,
    in_flight: HashMap<String, InFlight>,
    /// No refresh starts before this (the rate limit's spacing).
    next_start: Timestamp,
    /// No refresh starts before this (a failure, a `Retry-After`).
    paused_until: Option<Timestamp>,
    next_id: u64,
    done: u64,
    failed: u64,
    dropped: u64,
}

impl Refresher {
    /// An idle refresher; `budget`'s zeros are raised to one.
    pub fn new(budget: RefreshBudget) -> Self {
        Self {
            budget: RefreshBudget {
                rps: budget.rps.max(1),
                concurrency: budget.concurrency.max(1),
                max_tracked: budget.max_tracked,
            },
            streaming: HashMap::new(),
            backlog: VecDeque::new(),
            queued: HashMap::new(),
            in_flight: HashMap::new(),
            next_start: Timestamp::ZERO,
            paused_until: None,
            next_id: 0,
            done: 0,
            failed: 0,
            dropped: 0,
        }
    }

    /// The budget.
    pub fn budget(&self) -> RefreshBudget {
        self.budget
    }

    /// A per-user stream of `user_id` opened. Returns whether the user is tracked (refreshed
    /// on changes); beyond [`RefreshBudget::max_tracked`] users it is not, and is counted.
    pub fn handle_stream_opened(&mut self, user_id: &str) -> bool {
        if let Some(count) = self.streaming.get_mut(user_id) {
            *count += 1;
            return true;
        }
        if self.streaming.len() >= self.budget.max_tracked {
            self.dropped += 1;
            return false;
        }
        self.streaming.insert(user_id.to_owned(), 1);
        true
    }

    /// A per-user stream of `user_id` closed (its last one: the user is no longer refreshed).
    pub fn handle_stream_closed(&mut self, user_id: &str) {
        if let Entry::Occupied(mut entry) = self.streaming.entry(user_id.to_owned()) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
                // Its backlog entry is skipped when reached; drop the index now, and compact
                // the backlog once skipped entries dominate it (open/close churn).
                self.queued.remove(user_id);
                if self.backlog.len() > 2 * self.queued.len() + 64 {
                    let queued = &self.queued;
                    self.backlog
                        .retain(|q| queued.get(&q.user_id) == Some(&q.since));
                }
            }
        }
    }

    /// Upstream signalled a change at `now`: every streaming user is queued (once; a user
    /// being refreshed is queued again when that refresh ends).
    pub fn handle_change(&mut self, now: Timestamp) {
        for user_id in self.streaming.keys() {
            if let Some(flight) = self.in_flight.get_mut(user_id) {
                flight.requeue.get_or_insert(now);
            } else if !self.queued.contains_key(user_id) {
                self.queued.insert(user_id.clone(), now);
                self.backlog.push_back(Queued {
                    user_id: user_id.clone(),
                    since: now,
                });
            }
        }
    }

    /// The next refresh to start now, if the budget allows one. Call until `None`, then
    /// again at [`Refresher::poll_timeout`] or after any input.
    pub fn poll_refresh(&mut self, now: Timestamp) -> Option<Refresh> {
        if self.paused_until.is_some_and(|until| now < until)
            || now < self.next_start
            || self.in_flight.len() >= self.budget.concurrency
        {
            return None;
        }
        while let Some(queued) = self.backlog.pop_front() {
            // Skip users whose stream closed (or who were re-queued later).
            if self.queued.get(&queued.user_id) != Some(&queued.since) {
                continue;
            }
            self.queued.remove(&queued.user_id);
            self.next_id += 1;
            let id = self.next_id;
            self.in_flight
                .insert(queued.user_id.clone(), InFlight { id, requeue: None });
            // Evenly spaced starts: at most `rps` in any second (plus the one at its edge).
            self.next_start = now.saturating_add(Duration::from_secs(1) / self.budget.rps.max(1));
            return Some(Refresh {
                id,
                user_id: queued.user_id,
            });
        }
        None
    }

    /// When a refresh may start next, if one is waiting for the budget; `None`: nothing queued,
    /// or every slot busy (an input will come).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if self.queued.is_empty() || self.in_flight.len() >= self.budget.concurrency {
            return None;
        }
        Some(
            self.paused_until
                .map_or(self.next_start, |until| until.max(self.next_start)),
        )
    }

    /// Refresh `refresh` ended at `now` with `outcome`.
    pub fn handle_refreshed(&mut self, now: Timestamp, refresh: &Refresh, outcome: RefreshOutcome) {
        let Some(flight) = self.in_flight.get(&refresh.user_id) else {
            return;
        };
        if flight.id != refresh.id {
            return;
        }
        let requeue = flight.requeue;
        self.in_flight.remove(&refresh.user_id);
        let requeue = match outcome {
            RefreshOutcome::Done => {
                self.done += 1;
                requeue
            }
            RefreshOutcome::Failed { hold_until } => {
                self.failed += 1;
                let pause = now.saturating_add(FAILURE_PAUSE);
                let until = hold_until.map_or(pause, |hold| {
                    hold.min(now.saturating_add(MAX_PAUSE)).max(pause)
                });
                self.paused_until = Some(self.paused_until.map_or(until, |at| at.max(until)));
                // The change still has to reach the user.
                Some(requeue.unwrap_or(now))
            }
        };
        if let Some(since) = requeue
            && self.streaming.contains_key(&refresh.user_id)
            && !self.queued.contains_key(&refresh.user_id)
        {
            self.queued.insert(refresh.user_id.clone(), since);
            self.backlog.push_back(Queued {
                user_id: refresh.user_id.clone(),
                since,
            });
        }
    }

    /// Counters and gauges at `now`.
    pub fn stats(&self, now: Timestamp) -> RefreshStats {
        RefreshStats {
            backlog: self.queued.len(),
            oldest: self
                .queued
                .values()
                .min()
                .map(|since| now.saturating_since(*since)),
            in_flight: self.in_flight.len(),
            done: self.done,
            failed: self.failed,
            dropped: self.dropped,
        }
    }

    /// Lets every queued user go without a fetch (rules mode: answers are evaluated locally).
    pub fn clear_backlog(&mut self) {
        self.backlog.clear();
        self.queued.clear();
    }

    /// Whether `user_id` has a per-user stream open (tracked).
    pub fn is_streaming(&self, user_id: &str) -> bool {
        self.streaming.contains_key(user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(rps: u32, concurrency: usize) -> RefreshBudget {
        RefreshBudget {
            rps,
            concurrency,
            max_tracked: 1000,
        }
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    /// A virtual-clock simulation: `users` streaming users, one change at 0, each fetch taking
    /// `latency`; returns the start times of every refresh and the highest concurrency seen.
    fn simulate(r: &mut Refresher, latency: u64, until: u64) -> (Vec<u64>, usize) {
        let mut now = 0;
        let mut flying: Vec<(u64, Refresh)> = Vec::new();
        let mut starts = Vec::new();
        let mut peak = 0;
        while now <= until {
            flying.retain(|(end, refresh)| {
                if *end <= now {
                    r.handle_refreshed(at(now), refresh, RefreshOutcome::Done);
                    false
                } else {
                    true
                }
            });
            while let Some(refresh) = r.poll_refresh(at(now)) {
                starts.push(now);
                flying.push((now + latency, refresh));
            }
            peak = peak.max(flying.len());
            assert!(r.stats(at(now)).in_flight <= r.budget().concurrency);
            now += 1;
        }
        (starts, peak)
    }

    #[test]
    fn budget_bounds_concurrency_and_rate() {
        let mut r = Refresher::new(budget(50, 4));
        for i in 0..200 {
            assert!(r.handle_stream_opened(&format!("u{i}")));
        }
        r.handle_change(at(0));
        assert_eq!(r.stats(at(0)).backlog, 200);
        // Slow upstream (300 ms): concurrency binds.
        let (starts, peak) = simulate(&mut r, 300, 30_000);
        assert_eq!(starts.len(), 200);
        assert_eq!(peak, 4);
        // Fast upstream (5 ms): the rate binds, never more than 50 starts in any second.
        let mut r = Refresher::new(budget(50, 8));
        for i in 0..200 {
            r.handle_stream_opened(&format!("u{i}"));
        }
        r.handle_change(at(0));
        let (starts, _) = simulate(&mut r, 5, 30_000);
        assert_eq!(starts.len(), 200);
        for (i, start) in starts.iter().enumerate() {
            let window = starts[i..]
                .iter()
                .take_while(|s| **s < start + 1000)
                .count();
            assert!(window <= 50, "{window} starts within a second from {start}");
        }
        // 200 users at 50/s: converged in about 4 s.
        assert!(*starts.last().unwrap() < 4_100);
        let stats = r.stats(at(30_000));
        assert_eq!((stats.backlog, stats.done, stats.oldest), (0, 200, None));
    }

    #[test]
    fn only_streaming_users_are_queued_and_closed_streams_skipped() {
        let mut r = Refresher::new(budget(1000, 8));
        r.handle_stream_opened("a");
        r.handle_stream_opened("b");
        r.handle_stream_opened("b");
        r.handle_change(at(0));
        r.handle_stream_closed("a");
        r.handle_stream_closed("b");
        // One of b's two streams is still open; a's only stream closed.
        assert_eq!(
            r.poll_refresh(at(0)).map(|x| x.user_id).as_deref(),
            Some("b")
        );
        assert_eq!(r.poll_refresh(at(10)), None);
        assert!(!r.is_streaming("a") && r.is_streaming("b"));
        // Tracking is bounded and what is not tracked is counted.
        let mut small = Refresher::new(RefreshBudget {
            rps: 10,
            concurrency: 1,
            max_tracked: 1,
        });
        assert!(small.handle_stream_opened("x"));
        assert!(!small.handle_stream_opened("y"));
        assert_eq!(small.stats(at(0)).dropped, 1);
        // Rules mode: the queue is let go at once.
        small.handle_change(at(0));
        assert_eq!(small.stats(at(0)).backlog, 1);
        small.clear_backlog();
        assert_eq!(small.stats(at(0)).backlog, 0);
        assert_eq!(small.poll_refresh(at(0)), None);
    }

    #[test]
    fn a_change_during_a_refresh_requeues_the_user_once() {
        let mut r = Refresher::new(budget(1000, 8));
        r.handle_stream_opened("u");
        r.handle_change(at(0));
        let first = r.poll_refresh(at(0)).unwrap();
        // Three changes while it is in flight: queued again once, not three times.
        for t in 1..4 {
            r.handle_change(at(t));
        }
        assert_eq!(r.poll_refresh(at(5)), None);
        assert_eq!(r.stats(at(5)).backlog, 0);
        r.handle_refreshed(at(10), &first, RefreshOutcome::Done);
        assert_eq!(r.stats(at(10)).backlog, 1);
        // Its age counts from the first change it has not seen.
        assert_eq!(r.stats(at(10)).oldest, Some(Duration::from_millis(9)));
        let second = r.poll_refresh(at(10)).unwrap();
        assert_ne!(second.id, first.id);
        r.handle_refreshed(at(12), &second, RefreshOutcome::Done);
        assert_eq!(r.poll_refresh(at(20)), None);
        assert_eq!(r.stats(at(20)).done, 2);
        // A change while queued does not queue twice.
        r.handle_change(at(30));
        r.handle_change(at(31));
        assert_eq!(r.stats(at(31)).backlog, 1);
        // A stale report (an unknown id) changes nothing.
        r.handle_refreshed(at(32), &first, RefreshOutcome::Done);
        assert_eq!(r.stats(at(32)).done, 2);
    }

    #[test]
    fn retry_after_pauses_the_refresher_and_requeues() {
        let mut r = Refresher::new(budget(1000, 8));
        for user in ["a", "b", "c"] {
            r.handle_stream_opened(user);
        }
        r.handle_change(at(0));
        let first = r.poll_refresh(at(0)).unwrap();
        r.handle_refreshed(
            at(5),
            &first,
            RefreshOutcome::Failed {
                hold_until: Some(at(60_005)),
            },
        );
        // Nothing starts before the Retry-After, and the refresher says when to come back.
        assert_eq!(r.poll_refresh(at(6)), None);
        assert_eq!(r.poll_refresh(at(60_004)), None);
        assert_eq!(r.poll_timeout(), Some(at(60_005)));
        let mut users = Vec::new();
        while let Some(refresh) = r.poll_refresh(at(60_005 + 10 * users.len() as u64)) {
            users.push(refresh.user_id);
        }
        // The failed user is retried after the others.
        assert_eq!(users.len(), 3);
        assert_eq!(users.last(), Some(&first.user_id));
        assert_eq!(r.stats(at(70_000)).failed, 1);
        // An ordinary failure pauses briefly.
        let mut r = Refresher::new(budget(1000, 8));
        r.handle_stream_opened("a");
        r.handle_change(at(0));
        let refresh = r.poll_refresh(at(0)).unwrap();
        r.handle_refreshed(at(1), &refresh, RefreshOutcome::Failed { hold_until: None });
        assert_eq!(r.poll_refresh(at(1000)), None);
        assert!(r.poll_refresh(at(1001)).is_some());
    }

    #[test]
    fn idle_refresher_asks_for_no_timeout() {
        let mut r = Refresher::new(budget(2, 1));
        assert_eq!(r.poll_timeout(), None);
        r.handle_stream_opened("a");
        r.handle_stream_opened("b");
        r.handle_change(at(0));
        let a = r.poll_refresh(at(0)).unwrap();
        // The slot is taken: no timeout until the refresh reports.
        assert_eq!(r.poll_timeout(), None);
        r.handle_refreshed(at(10), &a, RefreshOutcome::Done);
        // 2 rps: the next start is 500 ms after the first.
        assert_eq!(r.poll_timeout(), Some(at(500)));
        assert_eq!(r.poll_refresh(at(499)), None);
        assert!(r.poll_refresh(at(500)).is_some());
    }
}
