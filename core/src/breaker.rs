//! The upstream circuit breaker (Closed / Open / HalfOpen) with the Rollgate SDKs' defaults.
//!
//! Semantics follow `packages/sdk-core/src/circuit-breaker.ts` in `rollgate/sdks` (the Python
//! SDK is the same; Go differs only in timing the open period from the moment the circuit
//! opened), because the proxy must shed load on Rollgate exactly as the SDKs it replaces did:
//!
//! - **Closed**: every call is admitted ([`Admission::Allow`]). Failures are kept in a *sliding
//!   window* of timestamps: a failure counts while `now − t < failure_window`. When
//!   `failure_threshold` failures are in the window the circuit opens. A success in Closed does
//!   **not** clear the count (the SDKs only prune expired failures on success), so five failures
//!   interleaved with successes within 60 s still open the circuit.
//! - **Open**: calls are rejected ([`Admission::Reject`]) until `open_timeout` after the last
//!   failure. A failure recorded while Open (a request that was already in flight) pushes the
//!   deadline out, as it does in the SDKs; it never pulls it in. The first [`check`] at or after
//!   the deadline moves to HalfOpen and admits the call as a [`Admission::Probe`].
//! - **HalfOpen**: every call is a probe. As in the SDKs there is no limit on concurrent probes;
//!   the upstream machine issues one request at a time, so in practice there is one. After
//!   `success_threshold` successes the circuit closes and forgets every failure; any failure
//!   reopens it with a fresh `open_timeout`.
//!
//! Memory is bounded: only the `failure_threshold` latest failure timestamps are kept.
//! Keeping the *largest* timestamps (not the last recorded) makes the open decision identical to
//! the SDKs' unbounded list even when `now` jumps backwards, since "at least k failures in the
//! window" holds exactly when the k-th latest failure is in the window.
//!
//! Time is an input and may stand still or go backwards: every comparison saturates and nothing
//! here panics.
//!
//! [`check`]: CircuitBreaker::check

use std::time::Duration;

use crate::time::{Timestamp, duration_millis};

/// Circuit breaker tuning. [`Default`] is what every Rollgate SDK uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures within `failure_window` that open the circuit (SDK `failureThreshold`, 5).
    pub failure_threshold: u32,
    /// How long a failure counts toward `failure_threshold` (SDK `monitoringWindow`, 60 s).
    pub failure_window: Duration,
    /// How long the circuit stays open after the last failure (SDK `recoveryTimeout`, 30 s).
    pub open_timeout: Duration,
    /// Half-open successes that close the circuit again (SDK `successThreshold`, 3).
    pub success_threshold: u32,
}

impl BreakerConfig {
    /// Checks that the configuration can work as a breaker.
    ///
    /// # Errors
    /// A threshold of zero or a duration under one millisecond (core's clock resolution) is
    /// rejected with the matching [`BreakerConfigError`].
    pub fn validate(&self) -> Result<(), BreakerConfigError> {
        if self.failure_threshold == 0 {
            return Err(BreakerConfigError::ZeroFailureThreshold);
        }
        if self.success_threshold == 0 {
            return Err(BreakerConfigError::ZeroSuccessThreshold);
        }
        if duration_millis(self.failure_window) == 0 {
            return Err(BreakerConfigError::FailureWindowTooShort {
                window: self.failure_window,
            });
        }
        if duration_millis(self.open_timeout) == 0 {
            return Err(BreakerConfigError::OpenTimeoutTooShort {
                timeout: self.open_timeout,
            });
        }
        Ok(())
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            failure_window: DEFAULT_FAILURE_WINDOW,
            open_timeout: DEFAULT_OPEN_TIMEOUT,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
        }
    }
}

/// Why a [`BreakerConfig`] was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BreakerConfigError {
    /// `failure_threshold` was zero: the circuit would open on nothing.
    #[error("breaker failure threshold must be at least 1")]
    ZeroFailureThreshold,
    /// `success_threshold` was zero: a half-open circuit would close without a probe.
    #[error("breaker success threshold must be at least 1")]
    ZeroSuccessThreshold,
    /// `failure_window` was under one millisecond: no failure would ever count.
    #[error("breaker failure window must be at least 1 ms, got {window:?}")]
    FailureWindowTooShort {
        /// The rejected window.
        window: Duration,
    },
    /// `open_timeout` was under one millisecond: the circuit would never reject anything.
    #[error("breaker open timeout must be at least 1 ms, got {timeout:?}")]
    OpenTimeoutTooShort {
        /// The rejected timeout.
        timeout: Duration,
    },
}

/// The breaker's state, as the SDKs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Normal operation: calls pass.
    Closed,
    /// Testing recovery: calls pass as probes whose outcome decides the next state.
    HalfOpen,
    /// Failing fast: calls are rejected until the deadline.
    Open,
}

impl BreakerState {
    /// The SDKs' `getCircuitState()` string: `"closed"`, `"half_open"` or `"open"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    /// The Prometheus `circuit_state` gauge value: 0 closed, 0.5 half-open, 1 open.
    pub const fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 0.5,
            Self::Open => 1.0,
        }
    }
}

/// What [`CircuitBreaker::check`] decided about one call.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: make the call and [`record`](CircuitBreaker::record) its outcome.
    Allow,
    /// HalfOpen: make the call as a recovery probe and record its outcome.
    Probe,
    /// Open: do not call upstream; ask again at `until`.
    Reject {
        /// When the circuit will admit a probe (the Open deadline).
        until: Timestamp,
    },
}

/// The outcome of an admitted call, fed back with [`CircuitBreaker::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The call failed in a way that counts against upstream health.
    Failure,
    /// The call succeeded.
    Success,
}

/// A snapshot of the breaker for metrics and status pages (the SDKs' `getCircuitStats()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerStats {
    /// Current state.
    pub state: BreakerState,
    /// Failures in the window as of the last `check` or `record`, at most `failure_threshold`.
    pub failures: u32,
    /// When the most recently recorded failure happened, if any since the breaker was created.
    pub last_failure: Option<Timestamp>,
    /// Successes recorded in the current HalfOpen period.
    pub half_open_successes: u32,
    /// How many times the circuit went from Closed or HalfOpen to Open.
    pub opens_total: u64,
}

/// The circuit breaker: [`check`](Self::check) before a call, [`record`](Self::record) after.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: Inner,
    /// The latest failure timestamps in the window, ascending; at most `failure_threshold`
    /// (one slot for a zero threshold).
    failures: Vec<Timestamp>,
    last_failure: Option<Timestamp>,
    opens_total: u64,
}

/// State plus the data that only exists in that state, so a deadline cannot outlive Open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inner {
    Closed,
    HalfOpen { successes: u32 },
    Open { until: Timestamp },
}

impl CircuitBreaker {
    /// A closed breaker. The configuration is used as given; call
    /// [`BreakerConfig::validate`] first to reject degenerate values (a zero threshold or
    /// timeout still behaves predictably here: it opens, or probes, immediately).
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: Inner::Closed,
            failures: Vec::new(),
            last_failure: None,
            opens_total: 0,
        }
    }

    /// Decides whether a call may go upstream now.
    ///
    /// Closed → [`Admission::Allow`]; HalfOpen → [`Admission::Probe`]; Open before its deadline
    /// → [`Admission::Reject`] with the deadline; Open at or after the deadline → moves to
    /// HalfOpen and returns [`Admission::Probe`].
    pub fn check(&mut self, now: Timestamp) -> Admission {
        self.prune(now);
        match self.state {
            Inner::Closed => Admission::Allow,
            Inner::HalfOpen { .. } => Admission::Probe,
            Inner::Open { until } if now < until => Admission::Reject { until },
            Inner::Open { .. } => {
                self.state = Inner::HalfOpen { successes: 0 };
                Admission::Probe
            }
        }
    }

    /// Feeds back the outcome of a call made at or before `now`.
    ///
    /// Outcomes are accepted in any state: a request admitted while Closed may finish after the
    /// circuit opened. A success while Open changes nothing; a failure while Open extends the
    /// deadline to `now + open_timeout` if that is later.
    pub fn record(&mut self, now: Timestamp, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.record_success(now),
            Outcome::Failure => self.record_failure(now),
        }
    }

    /// The current state (an Open breaker past its deadline stays Open until the next `check`).
    pub fn state(&self) -> BreakerState {
        match self.state {
            Inner::Closed => BreakerState::Closed,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
        }
    }

    /// While Open, when the next `check` will admit a probe (feeds the driver's `poll_timeout`).
    pub fn reopen_at(&self) -> Option<Timestamp> {
        match self.state {
            Inner::Open { until } => Some(until),
            Inner::Closed | Inner::HalfOpen { .. } => None,
        }
    }

    /// Counters and state for metrics.
    pub fn stats(&self) -> BreakerStats {
        BreakerStats {
            state: self.state(),
            failures: u32::try_from(self.failures.len()).unwrap_or(u32::MAX),
            last_failure: self.last_failure,
            half_open_successes: match self.state {
                Inner::HalfOpen { successes } => successes,
                Inner::Closed | Inner::Open { .. } => 0,
            },
            opens_total: self.opens_total,
        }
    }

    fn record_success(&mut self, now: Timestamp) {
        self.prune(now);
        if let Inner::HalfOpen { successes } = self.state {
            let successes = successes.saturating_add(1);
            if successes >= self.config.success_threshold {
                // Recovered: the SDKs forget every failure, so the next outage starts from zero.
                self.failures.clear();
                self.state = Inner::Closed;
            } else {
                self.state = Inner::HalfOpen { successes };
            }
        }
    }

    fn record_failure(&mut self, now: Timestamp) {
        self.last_failure = Some(now);
        self.insert_failure(now);
        self.prune(now);
        let fresh_deadline = now.saturating_add(self.config.open_timeout);
        match self.state {
            Inner::Closed => {
                if self.failures.len() >= self.threshold() {
                    self.open(fresh_deadline);
                }
            }
            // Any failing probe means upstream has not recovered: a full, fresh open period.
            Inner::HalfOpen { .. } => self.open(fresh_deadline),
            // A late failure from a request already in flight: the SDKs restart the cool-down
            // from the last failure. Never shorten it, even if `now` went backwards.
            Inner::Open { until } => {
                self.state = Inner::Open {
                    until: until.max(fresh_deadline),
                };
            }
        }
    }

    fn open(&mut self, until: Timestamp) {
        self.state = Inner::Open { until };
        self.opens_total = self.opens_total.saturating_add(1);
    }

    /// Inserts `at` keeping `failures` sorted and no longer than the threshold; when full, the
    /// earliest timestamp goes (it is the first to leave any window).
    fn insert_failure(&mut self, at: Timestamp) {
        let capacity = self.threshold().max(1);
        let index = self.failures.partition_point(|&t| t <= at);
        if self.failures.len() >= capacity {
            if index == 0 {
                // Earlier than every kept failure: it can never matter for the threshold.
                return;
            }
            self.failures.remove(0);
            self.failures.insert(index - 1, at);
        } else {
            self.failures.insert(index, at);
        }
    }

    /// Forgets failures that have left the window. A failure "in the future" (the clock went
    /// backwards) has zero age and stays, as it does in the SDKs (`t > now − window`).
    fn prune(&mut self, now: Timestamp) {
        let window = self.config.failure_window;
        self.failures.retain(|&t| now.saturating_since(t) < window);
    }

    fn threshold(&self) -> usize {
        usize::try_from(self.config.failure_threshold).unwrap_or(usize::MAX)
    }
}

const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
const DEFAULT_FAILURE_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_SUCCESS_THRESHOLD: u32 = 3;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use BreakerState::{Closed, HalfOpen, Open};
    use Step::{Check, Fail, Succeed};

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_millis(secs * 1000)
    }

    fn ms(millis: u64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    /// One scripted step and what must be observed right after it.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Check(Timestamp, Admission),
        Fail(Timestamp),
        Succeed(Timestamp),
    }

    fn run(steps: &[(Step, BreakerState)]) -> CircuitBreaker {
        let mut breaker = CircuitBreaker::new(BreakerConfig::default());
        for (i, &(step, expected_state)) in steps.iter().enumerate() {
            match step {
                Check(now, expected) => {
                    assert_eq!(breaker.check(now), expected, "step {i}: {step:?}");
                }
                Fail(now) => breaker.record(now, Outcome::Failure),
                Succeed(now) => breaker.record(now, Outcome::Success),
            }
            assert_eq!(breaker.state(), expected_state, "step {i}: {step:?}");
        }
        breaker
    }

    #[test]
    fn defaults_are_rollgates() {
        let config = BreakerConfig::default();
        assert_eq!(config.failure_threshold, 5);
        assert_eq!(config.failure_window, Duration::from_secs(60));
        assert_eq!(config.open_timeout, Duration::from_secs(30));
        assert_eq!(config.success_threshold, 3);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn full_cycle_with_exact_timestamps() {
        let breaker = run(&[
            (Check(t(0), Admission::Allow), Closed),
            (Fail(t(0)), Closed),
            (Fail(t(10)), Closed),
            (Fail(t(20)), Closed),
            (Fail(t(30)), Closed),
            (Check(t(40), Admission::Allow), Closed),
            (Fail(t(40)), Open),
            (Check(t(40), Admission::Reject { until: t(70) }), Open),
            (Check(ms(69_999), Admission::Reject { until: t(70) }), Open),
            (Check(t(70), Admission::Probe), HalfOpen),
            (Check(t(70), Admission::Probe), HalfOpen),
            (Succeed(t(71)), HalfOpen),
            (Succeed(t(72)), HalfOpen),
            (Succeed(t(73)), Closed),
            (Check(t(73), Admission::Allow), Closed),
        ]);
        let stats = breaker.stats();
        assert_eq!(stats.failures, 0, "closing forgets failures");
        assert_eq!(stats.last_failure, Some(t(40)));
        assert_eq!(stats.opens_total, 1);
        assert_eq!(stats.half_open_successes, 0);
    }

    #[test]
    fn sliding_window_drops_old_failures() {
        // Failures at 0..=40 s: the one at 0 s leaves the window at exactly 60 s.
        let breaker = run(&[
            (Fail(t(0)), Closed),
            (Fail(t(10)), Closed),
            (Fail(t(20)), Closed),
            (Fail(t(30)), Closed),
            (Fail(t(60)), Closed), // 0 s is 60 s old: out (age must be < window)
            (Fail(ms(69_999)), Open),
        ]);
        assert_eq!(breaker.reopen_at(), Some(ms(99_999)));

        // One millisecond earlier, the first failure still counts.
        run(&[
            (Fail(t(0)), Closed),
            (Fail(t(10)), Closed),
            (Fail(t(20)), Closed),
            (Fail(t(30)), Closed),
            (Fail(ms(59_999)), Open),
        ]);
    }

    #[test]
    fn success_in_closed_does_not_clear_failures() {
        let breaker = run(&[
            (Fail(t(1)), Closed),
            (Succeed(t(2)), Closed),
            (Fail(t(3)), Closed),
            (Succeed(t(4)), Closed),
            (Fail(t(5)), Closed),
            (Fail(t(6)), Closed),
            (Succeed(t(7)), Closed),
            (Fail(t(8)), Open),
        ]);
        assert_eq!(breaker.stats().failures, 5);
    }

    #[test]
    fn half_open_failure_reopens_for_a_fresh_timeout() {
        let breaker = run(&[
            (Fail(t(0)), Closed),
            (Fail(t(0)), Closed),
            (Fail(t(0)), Closed),
            (Fail(t(0)), Closed),
            (Fail(t(0)), Open),
            (Check(t(30), Admission::Probe), HalfOpen),
            (Succeed(t(31)), HalfOpen),
            (Succeed(t(32)), HalfOpen),
            (Fail(t(33)), Open),
            (Check(t(62), Admission::Reject { until: t(63) }), Open),
            (Check(t(63), Admission::Probe), HalfOpen),
            (Succeed(t(64)), HalfOpen),
        ]);
        let stats = breaker.stats();
        assert_eq!(stats.opens_total, 2);
        assert_eq!(
            stats.half_open_successes, 1,
            "the count restarts per half-open period"
        );
    }

    #[test]
    fn late_failure_while_open_extends_never_shortens() {
        let mut breaker = CircuitBreaker::new(BreakerConfig::default());
        for _ in 0..5 {
            breaker.record(t(100), Outcome::Failure);
        }
        assert_eq!(breaker.reopen_at(), Some(t(130)));
        breaker.record(t(110), Outcome::Failure);
        assert_eq!(breaker.reopen_at(), Some(t(140)));
        breaker.record(t(50), Outcome::Failure); // clock went backwards
        assert_eq!(breaker.reopen_at(), Some(t(140)));
        breaker.record(t(120), Outcome::Success); // success while open: no effect
        assert_eq!(breaker.state(), Open);
        assert_eq!(
            breaker.stats().opens_total,
            1,
            "extending is not a new open"
        );
        assert_eq!(breaker.stats().last_failure, Some(t(50)));
    }

    #[test]
    fn time_standing_still_or_going_backwards() {
        let mut breaker = CircuitBreaker::new(BreakerConfig::default());
        for _ in 0..5 {
            breaker.record(t(1000), Outcome::Failure);
        }
        assert_eq!(breaker.check(t(0)), Admission::Reject { until: t(1030) });
        assert_eq!(breaker.check(t(1000)), Admission::Reject { until: t(1030) });
        assert_eq!(breaker.check(t(1030)), Admission::Probe);
        assert_eq!(
            breaker.check(t(5)),
            Admission::Probe,
            "half-open does not undo"
        );

        // Deadlines saturate at the end of time instead of overflowing.
        let mut breaker = CircuitBreaker::new(BreakerConfig::default());
        let end = ms(u64::MAX - 1);
        for _ in 0..5 {
            breaker.record(end, Outcome::Failure);
        }
        assert_eq!(breaker.reopen_at(), Some(ms(u64::MAX)));
        assert_eq!(
            breaker.check(end),
            Admission::Reject {
                until: ms(u64::MAX)
            }
        );
        assert_eq!(breaker.check(ms(u64::MAX)), Admission::Probe);
    }

    #[test]
    fn storage_is_bounded_by_the_threshold() {
        let mut breaker = CircuitBreaker::new(BreakerConfig::default());
        for i in 0..10_000 {
            breaker.record(ms(i), Outcome::Failure);
        }
        assert_eq!(breaker.failures.len(), 5);
        assert_eq!(
            breaker.failures,
            (9_995..10_000).map(ms).collect::<Vec<_>>()
        );
        assert_eq!(breaker.stats().failures, 5);
    }

    #[test]
    fn state_strings_and_gauges() {
        let table = [
            (Closed, "closed", 0.0),
            (HalfOpen, "half_open", 0.5),
            (Open, "open", 1.0),
        ];
        for (state, name, gauge) in table {
            assert_eq!(state.as_str(), name);
            assert!((state.gauge() - gauge).abs() < f64::EPSILON, "{state:?}");
        }
    }

    #[test]
    fn validation_rejects_degenerate_configs() {
        let base = BreakerConfig::default();
        let cases = [
            (
                BreakerConfig {
                    failure_threshold: 0,
                    ..base
                },
                BreakerConfigError::ZeroFailureThreshold,
            ),
            (
                BreakerConfig {
                    success_threshold: 0,
                    ..base
                },
                BreakerConfigError::ZeroSuccessThreshold,
            ),
            (
                BreakerConfig {
                    failure_window: Duration::from_micros(999),
                    ..base
                },
                BreakerConfigError::FailureWindowTooShort {
                    window: Duration::from_micros(999),
                },
            ),
            (
                BreakerConfig {
                    open_timeout: Duration::ZERO,
                    ..base
                },
                BreakerConfigError::OpenTimeoutTooShort {
                    timeout: Duration::ZERO,
                },
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(config.validate(), Err(expected));
        }
    }

    #[test]
    fn degenerate_configs_do_not_panic() {
        let mut breaker = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 0,
            failure_window: Duration::ZERO,
            open_timeout: Duration::ZERO,
            success_threshold: 0,
        });
        breaker.record(t(1), Outcome::Failure);
        assert_eq!(breaker.state(), Open);
        assert_eq!(breaker.check(t(1)), Admission::Probe);
        breaker.record(t(1), Outcome::Success);
        assert_eq!(breaker.state(), Closed);
    }

    /// The SDKs' breaker, transcribed naively (unbounded failure list), to check that the
    /// bounded implementation makes the same decisions.
    #[derive(Debug)]
    struct Reference {
        config: BreakerConfig,
        state: BreakerState,
        failures: Vec<u64>,
        until: u64,
        successes: u32,
    }

    impl Reference {
        fn prune(&mut self, now: u64) {
            let window = duration_millis(self.config.failure_window);
            self.failures.retain(|&f| now.saturating_sub(f) < window);
        }

        fn check(&mut self, now: u64) -> Admission {
            self.prune(now);
            match self.state {
                Closed => Admission::Allow,
                HalfOpen => Admission::Probe,
                Open if now < self.until => Admission::Reject {
                    until: ms(self.until),
                },
                Open => {
                    self.state = HalfOpen;
                    self.successes = 0;
                    Admission::Probe
                }
            }
        }

        fn record(&mut self, now: u64, outcome: Outcome) {
            let timeout = duration_millis(self.config.open_timeout);
            match outcome {
                Outcome::Success => {
                    self.prune(now);
                    if self.state == HalfOpen {
                        self.successes += 1;
                        if self.successes >= self.config.success_threshold {
                            self.failures.clear();
                            self.state = Closed;
                        }
                    }
                }
                Outcome::Failure => {
                    self.failures.push(now);
                    self.prune(now);
                    let deadline = now.saturating_add(timeout);
                    match self.state {
                        Closed if self.failures.len() >= self.config.failure_threshold as usize => {
                            self.state = Open;
                            self.until = deadline;
                        }
                        Closed => {}
                        HalfOpen => {
                            self.state = Open;
                            self.until = deadline;
                        }
                        Open => self.until = self.until.max(deadline),
                    }
                }
            }
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        Check,
        /// A check within a few milliseconds of the Open deadline (plain `Check` if not Open),
        /// where an off-by-one would show; random times almost never land there.
        CheckNearDeadline(i8),
        Fail,
        Succeed,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Check),
            (-2i8..=2).prop_map(Op::CheckNearDeadline),
            Just(Op::Fail),
            Just(Op::Succeed),
        ]
    }

    fn small_config() -> impl Strategy<Value = BreakerConfig> {
        (1u32..8, 1u64..120_000, 1u64..60_000, 1u32..5).prop_map(
            |(failure_threshold, window, timeout, success_threshold)| BreakerConfig {
                failure_threshold,
                failure_window: Duration::from_millis(window),
                open_timeout: Duration::from_millis(timeout),
                success_threshold,
            },
        )
    }

    /// Drives a breaker through `ops`, asserting the Open-deadline invariant and agreement with
    /// the reference model at every step. With `monotonic`, times never go backwards.
    fn drive(
        config: &BreakerConfig,
        ops: &[(Op, u64)],
        monotonic: bool,
    ) -> Result<(), TestCaseError> {
        let mut breaker = CircuitBreaker::new(config.clone());
        let mut reference = Reference {
            config: config.clone(),
            state: Closed,
            failures: Vec::new(),
            until: 0,
            successes: 0,
        };
        let mut clock = 0u64;
        for &(op, at) in ops {
            let mut now = at;
            if let (Op::CheckNearDeadline(delta), Some(until)) = (op, breaker.reopen_at()) {
                now = until.as_millis().saturating_add_signed(i64::from(delta));
            }
            if monotonic {
                now = now.max(clock);
            }
            clock = clock.max(now);
            let before = (breaker.state(), breaker.reopen_at());
            match op {
                Op::Check | Op::CheckNearDeadline(_) => {
                    let admission = breaker.check(ms(now));
                    if let (Open, Some(until)) = before
                        && ms(now) < until
                    {
                        prop_assert_eq!(admission, Admission::Reject { until });
                    }
                    match admission {
                        Admission::Allow => prop_assert_eq!(breaker.state(), Closed),
                        Admission::Probe => prop_assert_eq!(breaker.state(), HalfOpen),
                        Admission::Reject { until } => {
                            prop_assert!(ms(now) < until);
                            prop_assert_eq!(breaker.reopen_at(), Some(until));
                        }
                    }
                    prop_assert_eq!(admission, reference.check(now));
                }
                Op::Fail => {
                    breaker.record(ms(now), Outcome::Failure);
                    reference.record(now, Outcome::Failure);
                }
                Op::Succeed => {
                    breaker.record(ms(now), Outcome::Success);
                    reference.record(now, Outcome::Success);
                }
            }
            prop_assert_eq!(breaker.state(), reference.state);
            prop_assert_eq!(breaker.reopen_at().is_some(), breaker.state() == Open);
            prop_assert!(breaker.failures.len() <= config.failure_threshold as usize);
            prop_assert!(breaker.failures.is_sorted());
            let expected = reference
                .failures
                .len()
                .min(config.failure_threshold as usize);
            prop_assert_eq!(breaker.stats().failures as usize, expected);
            if let (Some(old), Some(new)) = (before.1, breaker.reopen_at()) {
                prop_assert!(new >= old, "an open deadline never moves earlier");
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn never_admits_before_deadline_monotonic_time(
            config in small_config(),
            steps in prop::collection::vec((op(), 0u64..20_000), 0..200),
        ) {
            let mut now = 0u64;
            let ops: Vec<(Op, u64)> = steps
                .into_iter()
                .map(|(op, dt)| {
                    now += dt;
                    (op, now)
                })
                .collect();
            drive(&config, &ops, true)?;
        }

        #[test]
        fn never_admits_before_deadline_arbitrary_time(
            config in small_config(),
            ops in prop::collection::vec((op(), 0u64..300_000), 0..200),
        ) {
            drive(&config, &ops, false)?;
        }

        #[test]
        fn never_panics_at_the_edges_of_time(
            ops in prop::collection::vec(
                (op(), prop_oneof![Just(0u64), Just(u64::MAX), u64::MAX - 100_000..=u64::MAX]),
                0..100,
            ),
        ) {
            drive(&BreakerConfig::default(), &ops, false)?;
        }
    }
}
