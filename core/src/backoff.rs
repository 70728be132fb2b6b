//! Request retry and stream reconnect schedules, with jitter passed in as a number.
//!
//! [`RetryPolicy`] is the SDKs' `calculateBackoff` (`packages/sdk-core/src/retry.ts` in
//! `rollgate/sdks`): retry `n` (0-based) waits `min(base · 2ⁿ, max)` scaled by a uniform factor in
//! `[1 − jitter, 1 + jitter]`, so the defaults give about 100 / 200 / 400 ms for the three retries.
//! [`ReconnectBackoff`] is the Go/Python SDKs' stream reconnect loop (1 s doubling to a 30 s cap),
//! with jitter added so that many proxies dropped by one upstream incident do not reconnect in
//! lock-step. In both, jitter is applied *after* the cap, so a capped delay still spreads out.
//!
//! Core has no random source: callers pass a `jitter_sample` in `[0, 1)`, typically from a
//! [`Jitter`] seeded by the adapter. A sample of 0.5 means "no jitter".

use std::time::Duration;

use crate::time::duration_millis;

/// How an upstream request is retried. [`Default`] is what every Rollgate SDK uses.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (SDK `maxRetries`, 3, so at most 4 attempts).
    pub max_retries: u32,
    /// Delay before the first retry (SDK `baseDelayMs`, 100 ms).
    pub base_delay: Duration,
    /// Cap on the delay before jitter (SDK `maxDelayMs`, 10 s).
    pub max_delay: Duration,
    /// Relative jitter: 0.1 spreads each delay uniformly over ±10 % (SDK `jitterFactor`).
    pub jitter: f64,
}

impl RetryPolicy {
    /// The delay before retry number `retry` (0-based: `0` is the wait after the first failed
    /// attempt): `min(base · 2^retry, max) · (1 + jitter · (2 · jitter_sample − 1))`.
    ///
    /// Never panics and never overflows: a huge `retry` gives the capped delay. A
    /// `jitter_sample` outside `[0, 1)` is clamped into it (NaN counts as 0.5, no jitter), and a
    /// `jitter` outside `[0, 1]` is clamped into that (NaN counts as 0);
    /// [`validate`](Self::validate) rejects such policies up front.
    pub fn delay(&self, retry: u32, jitter_sample: f64) -> Duration {
        let nominal = exponential(self.base_delay, retry, self.max_delay);
        apply_jitter(nominal, self.jitter, jitter_sample)
    }

    /// Checks that the policy makes sense.
    ///
    /// # Errors
    /// [`BackoffConfigError::DelayTooShort`] if `base_delay` is under 1 ms (core's clock
    /// resolution), [`BackoffConfigError::MaxBelowInitial`] if `max_delay < base_delay`, and
    /// [`BackoffConfigError::InvalidJitter`] unless `jitter` is a number in `[0, 1]`.
    pub fn validate(&self) -> Result<(), BackoffConfigError> {
        validate_schedule("base_delay", self.base_delay, self.max_delay, self.jitter)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            jitter: 0.1,
        }
    }
}

/// How the upstream stream is reopened after it drops. [`Default`]: 1 s doubling to 30 s, ±20 %.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconnectPolicy {
    /// Delay before the first reconnect (1 s, as the Go and Python SDKs).
    pub initial_delay: Duration,
    /// Cap on the delay before jitter (30 s, as the Go and Python SDKs).
    pub max_delay: Duration,
    /// Relative jitter, uniform over `±jitter` (0.2). The SDKs use none; a relay should, because
    /// all its replicas lose the same upstream at the same moment.
    pub jitter: f64,
}

impl ReconnectPolicy {
    /// Checks that the policy makes sense.
    ///
    /// # Errors
    /// [`BackoffConfigError::DelayTooShort`] if `initial_delay` is under 1 ms,
    /// [`BackoffConfigError::MaxBelowInitial`] if `max_delay < initial_delay`, and
    /// [`BackoffConfigError::InvalidJitter`] unless `jitter` is a number in `[0, 1]`.
    pub fn validate(&self) -> Result<(), BackoffConfigError> {
        validate_schedule(
            "initial_delay",
            self.initial_delay,
            self.max_delay,
            self.jitter,
        )
    }
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
        }
    }
}

/// Why a [`RetryPolicy`] or [`ReconnectPolicy`] was rejected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BackoffConfigError {
    /// The starting delay was under one millisecond, so the schedule would busy-loop.
    #[error("{field} must be at least 1 ms, got {delay:?}")]
    DelayTooShort {
        /// Which setting (`base_delay` or `initial_delay`).
        field: &'static str,
        /// The rejected value.
        delay: Duration,
    },
    /// The jitter factor was negative, above 1, infinite or NaN.
    #[error("jitter must be a number from 0 to 1, got {jitter}")]
    InvalidJitter {
        /// The rejected value.
        jitter: f64,
    },
    /// `max_delay` was below the starting delay.
    #[error("max_delay {max:?} is below the initial delay {initial:?}")]
    MaxBelowInitial {
        /// The starting delay (`base_delay` or `initial_delay`).
        initial: Duration,
        /// The rejected cap.
        max: Duration,
    },
}

/// The reconnect schedule's position: 1 s, 2 s, 4 s … capped at 30 s, until [`reset`].
///
/// Call [`next_delay`] each time the stream fails and [`reset`] once it is healthy again (the
/// SDKs reset as soon as a connection is established).
///
/// [`next_delay`]: Self::next_delay
/// [`reset`]: Self::reset
#[derive(Clone, Debug)]
pub struct ReconnectBackoff {
    policy: ReconnectPolicy,
    /// Delays handed out since the last reset; the exponent of the next one.
    attempts: u32,
}

impl ReconnectBackoff {
    /// A schedule at its start. The policy is used as given; see [`ReconnectPolicy::validate`].
    pub fn new(policy: ReconnectPolicy) -> Self {
        Self {
            policy,
            attempts: 0,
        }
    }

    /// The delay before the next reconnect, `min(initial · 2^attempts, max)` jittered by
    /// `jitter_sample` (clamped into `[0, 1)`), and advances the schedule. Never panics.
    pub fn next_delay(&mut self, jitter_sample: f64) -> Duration {
        let nominal = exponential(
            self.policy.initial_delay,
            self.attempts,
            self.policy.max_delay,
        );
        self.attempts = self.attempts.saturating_add(1);
        apply_jitter(nominal, self.policy.jitter, jitter_sample)
    }

    /// Starts over from `initial_delay` (call when a connection succeeds).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// How many delays were handed out since the last reset (the consecutive failures so far).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// A tiny deterministic PRNG (SplitMix64) so core can jitter without a random source: seeded by
/// the adapter.
///
/// SplitMix64 (Steele, Lea and Flood, 2014) is one add and a few multiply-xorshifts per value,
/// passes BigCrush and needs no dependency; jitter needs spread, not secrecy. Give each replica
/// a different seed (from the OS or `crypto.getRandomValues`) so replicas do not jitter alike.
#[derive(Clone, Debug)]
pub struct Jitter {
    state: u64,
}

impl Jitter {
    /// A generator; the same seed always yields the same samples.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next sample, uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_sample(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly, so the result is below 1.
        #[allow(
            clippy::cast_precision_loss,
            reason = "a 53-bit integer is exact in an f64"
        )]
        let mantissa = (self.next_u64() >> 11) as f64;
        mantissa * TWO_POW_MINUS_53
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `min(start · 2^exponent, max)` without overflow.
fn exponential(start: Duration, exponent: u32, max: Duration) -> Duration {
    1u32.checked_shl(exponent)
        .and_then(|factor| start.checked_mul(factor))
        .unwrap_or(Duration::MAX)
        .min(max)
}

/// Scales `nominal` by `1 + jitter · (2 · sample − 1)`, clamping both inputs into range.
fn apply_jitter(nominal: Duration, jitter: f64, sample: f64) -> Duration {
    // `!(x >= 0)` also catches NaN; `clamp` would propagate it.
    let jitter = if jitter >= 0.0 { jitter.min(1.0) } else { 0.0 };
    let sample = if sample.is_nan() {
        0.5
    } else {
        sample.clamp(0.0, MAX_SAMPLE)
    };
    let factor = 1.0 + jitter * (2.0 * sample - 1.0);
    if factor == 1.0 {
        // Exact: no float round trip for unjittered delays.
        return nominal;
    }
    let secs = nominal.as_secs_f64() * factor;
    // `factor` is in [0, 2], so the only failure is overflow past `Duration::MAX`.
    Duration::try_from_secs_f64(secs).unwrap_or(if secs > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

fn validate_schedule(
    field: &'static str,
    initial: Duration,
    max: Duration,
    jitter: f64,
) -> Result<(), BackoffConfigError> {
    if duration_millis(initial) == 0 {
        return Err(BackoffConfigError::DelayTooShort {
            field,
            delay: initial,
        });
    }
    if max < initial {
        return Err(BackoffConfigError::MaxBelowInitial { initial, max });
    }
    if !(0.0..=1.0).contains(&jitter) {
        return Err(BackoffConfigError::InvalidJitter { jitter });
    }
    Ok(())
}

/// 2⁻⁵³: maps a 53-bit integer onto `[0, 1)`.
const TWO_POW_MINUS_53: f64 = 1.0 / (1u64 << 53) as f64;
/// The largest f64 below 1, so a clamped sample stays in `[0, 1)`.
const MAX_SAMPLE: f64 = 1.0 - f64::EPSILON / 2.0;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// `a` is within `[lo, hi]` up to float rounding (1 ns plus a relative 1e-12).
    fn within(a: Duration, lo: f64, hi: f64) -> bool {
        let a = a.as_secs_f64();
        let slack = 1e-9 + hi.abs() * 1e-12;
        a >= lo - slack && a <= hi + slack
    }

    #[test]
    fn retry_defaults_are_rollgates() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_retries, 3);
        assert_eq!(policy.base_delay, ms(100));
        assert_eq!(policy.max_delay, ms(10_000));
        assert!((policy.jitter - 0.1).abs() < f64::EPSILON);
        assert_eq!(policy.validate(), Ok(()));
    }

    #[test]
    fn retry_schedule_table() {
        let policy = RetryPolicy::default();
        // (retry, sample, expected)
        let cases = [
            (0, 0.5, ms(100)),
            (1, 0.5, ms(200)),
            (2, 0.5, ms(400)),
            (0, 0.0, ms(90)),
            (2, 0.0, ms(360)),
            (1, 0.75, ms(210)),
            (6, 0.5, ms(6_400)),
            (7, 0.5, ms(10_000)), // 12.8 s capped
            (7, 0.0, ms(9_000)),
            (40, 0.5, ms(10_000)),
            (u32::MAX, 0.5, ms(10_000)),
            (0, f64::NAN, ms(100)),
            (0, -3.0, ms(90)),
            (0, 7.0, ms(110)), // clamped just below 1: rounds to the upper bound
        ];
        for (retry, sample, expected) in cases {
            let got = policy.delay(retry, sample);
            let diff = got.abs_diff(expected);
            assert!(
                diff < Duration::from_micros(1),
                "retry {retry}, sample {sample}: {got:?}"
            );
        }
    }

    #[test]
    fn retry_jitter_out_of_range_is_clamped() {
        let mut policy = RetryPolicy {
            jitter: f64::NAN,
            ..RetryPolicy::default()
        };
        assert_eq!(policy.delay(0, 0.0), ms(100));
        policy.jitter = -1.0;
        assert_eq!(policy.delay(0, 0.0), ms(100));
        policy.jitter = 5.0;
        assert_eq!(policy.delay(0, 0.0), Duration::ZERO);
        policy.jitter = f64::INFINITY;
        assert_eq!(policy.delay(0, 0.0), Duration::ZERO);
        // Huge cap and 2x jitter saturate instead of panicking.
        let policy = RetryPolicy {
            max_retries: 3,
            base_delay: Duration::MAX,
            max_delay: Duration::MAX,
            jitter: 1.0,
        };
        assert_eq!(policy.delay(u32::MAX, 0.999), Duration::MAX);
    }

    #[test]
    fn reconnect_schedule_and_reset() {
        let mut backoff = ReconnectBackoff::new(ReconnectPolicy::default());
        let secs: Vec<u64> = (0..8).map(|_| backoff.next_delay(0.5).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff.attempts(), 8);
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        let low = backoff.next_delay(0.0);
        assert!(low.abs_diff(ms(800)) < Duration::from_micros(1), "{low:?}");
        let high = backoff.next_delay(0.999_999_999);
        assert!(
            high.abs_diff(ms(2_400)) < Duration::from_micros(1),
            "{high:?}"
        );
    }

    #[test]
    fn reconnect_attempts_saturate() {
        let mut backoff = ReconnectBackoff::new(ReconnectPolicy::default());
        backoff.attempts = u32::MAX - 1;
        assert_eq!(backoff.next_delay(0.5), ms(30_000));
        assert_eq!(backoff.next_delay(0.5), ms(30_000));
        assert_eq!(backoff.attempts(), u32::MAX);
    }

    #[test]
    fn validation_table() {
        let retry = RetryPolicy::default();
        let reconnect = ReconnectPolicy::default();
        assert_eq!(reconnect.validate(), Ok(()));
        let cases = [
            (
                RetryPolicy {
                    base_delay: Duration::ZERO,
                    ..retry
                }
                .validate(),
                BackoffConfigError::DelayTooShort {
                    field: "base_delay",
                    delay: Duration::ZERO,
                },
            ),
            (
                RetryPolicy {
                    max_delay: ms(99),
                    ..retry
                }
                .validate(),
                BackoffConfigError::MaxBelowInitial {
                    initial: ms(100),
                    max: ms(99),
                },
            ),
            (
                RetryPolicy {
                    jitter: -0.1,
                    ..retry
                }
                .validate(),
                BackoffConfigError::InvalidJitter { jitter: -0.1 },
            ),
            (
                RetryPolicy {
                    jitter: 1.5,
                    ..retry
                }
                .validate(),
                BackoffConfigError::InvalidJitter { jitter: 1.5 },
            ),
            (
                ReconnectPolicy {
                    initial_delay: Duration::from_micros(500),
                    ..reconnect
                }
                .validate(),
                BackoffConfigError::DelayTooShort {
                    field: "initial_delay",
                    delay: Duration::from_micros(500),
                },
            ),
            (
                ReconnectPolicy {
                    max_delay: ms(999),
                    ..reconnect
                }
                .validate(),
                BackoffConfigError::MaxBelowInitial {
                    initial: ms(1_000),
                    max: ms(999),
                },
            ),
        ];
        for (got, expected) in cases {
            assert_eq!(got, Err(expected));
        }
        // NaN never equals itself, so match on the variant.
        let nan = ReconnectPolicy {
            jitter: f64::NAN,
            ..reconnect
        };
        assert!(matches!(
            nan.validate(),
            Err(BackoffConfigError::InvalidJitter { jitter }) if jitter.is_nan()
        ));
        // Edges are allowed.
        for jitter in [0.0, 1.0] {
            assert_eq!(RetryPolicy { jitter, ..retry }.validate(), Ok(()));
        }
    }

    #[test]
    fn splitmix64_reference_values() {
        // Outputs of the reference SplitMix64 (Vigna's splitmix64.c) for seed 0.
        let mut jitter = Jitter::new(0);
        assert_eq!(jitter.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(jitter.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(jitter.next_u64(), 0x06C4_5D18_8009_454F);
        let mut jitter = Jitter::new(0);
        let expected = (0xE220_A839_7B1D_CDAF_u64 >> 11) as f64 / (1u64 << 53) as f64;
        assert!((jitter.next_sample() - expected).abs() < f64::EPSILON);
    }

    proptest! {
        #[test]
        fn retry_delay_is_within_jitter_bounds(
            base_ms in 1u64..5_000,
            extra_ms in 0u64..60_000,
            jitter in 0.0f64..=1.0,
            retry in any::<u32>(),
            sample in any::<f64>(),
        ) {
            let policy = RetryPolicy {
                max_retries: 3,
                base_delay: ms(base_ms),
                max_delay: ms(base_ms + extra_ms),
                jitter,
            };
            let nominal = exponential(policy.base_delay, retry, policy.max_delay);
            prop_assert!(nominal <= policy.max_delay);
            let d = nominal.as_secs_f64();
            let got = policy.delay(retry, sample);
            prop_assert!(within(got, d * (1.0 - jitter), d * (1.0 + jitter)), "{got:?} vs {d}");
            let ceiling = policy.max_delay.as_secs_f64() * (1.0 + jitter);
            prop_assert!(within(got, 0.0, ceiling));
        }

        #[test]
        fn retry_delay_nominal_doubles_until_capped(
            base_ms in 1u64..5_000,
            extra_ms in 0u64..60_000,
            retry in 0u32..40,
        ) {
            let policy = RetryPolicy {
                max_retries: 3,
                base_delay: ms(base_ms),
                max_delay: ms(base_ms + extra_ms),
                jitter: 0.1,
            };
            let now = policy.delay(retry, 0.5);
            let next = policy.delay(retry + 1, 0.5);
            prop_assert!(next == policy.max_delay || next == now * 2);
        }

        #[test]
        fn reconnect_nominal_is_non_decreasing_and_capped(
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..120_000,
            jitter in 0.0f64..=1.0,
            samples in prop::collection::vec(any::<f64>(), 1..80),
        ) {
            let policy = ReconnectPolicy {
                initial_delay: ms(initial_ms),
                max_delay: ms(initial_ms + extra_ms),
                jitter,
            };
            let mut jittered = ReconnectBackoff::new(policy.clone());
            let mut plain = ReconnectBackoff::new(policy.clone());
            let mut previous = Duration::ZERO;
            for (i, &sample) in samples.iter().enumerate() {
                // A sample of 0.5 is the exact nominal delay.
                let nominal = plain.next_delay(0.5);
                prop_assert!(nominal >= previous, "step {i}: {nominal:?} < {previous:?}");
                prop_assert!(nominal <= policy.max_delay);
                previous = nominal;
                let got = jittered.next_delay(sample);
                let d = nominal.as_secs_f64();
                prop_assert!(within(got, d * (1.0 - jitter), d * (1.0 + jitter)));
                prop_assert_eq!(jittered.attempts(), u32::try_from(i + 1).unwrap());
            }
        }

        #[test]
        fn jitter_samples_are_in_unit_interval_and_deterministic(seed in any::<u64>()) {
            let mut a = Jitter::new(seed);
            let mut b = Jitter::new(seed);
            let mut c = Jitter::new(seed.wrapping_add(1));
            let mut differs = false;
            for _ in 0..256 {
                let x = a.next_sample();
                prop_assert!((0.0..1.0).contains(&x), "{x}");
                prop_assert_eq!(x.to_bits(), b.next_sample().to_bits());
                differs |= x.to_bits() != c.next_sample().to_bits();
            }
            prop_assert!(differs, "neighbouring seeds must give different streams");
        }
    }
}
