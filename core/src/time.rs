//! Wall-clock time as plain data: `Timestamp` in unix milliseconds, passed in by the adapter.
//!
//! Core never reads a clock. Every input carries `now`, and every deadline the core reports is a
//! `Timestamp` the adapter sleeps until (tokio) or turns into a Durable Object alarm (Workers).
//! Milliseconds since the unix epoch survive serialisation and are what both runtimes read
//! cheaply (`SystemTime`, `Date.now()`). Arithmetic saturates: a deployed Worker only advances
//! `Date.now()` after I/O, so time may stand still and must never be assumed to move forward.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since the unix epoch (UTC).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The unix epoch.
    pub const ZERO: Self = Self(0);

    /// A timestamp `millis` milliseconds after the unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + duration`, saturating at the end of time.
    pub fn saturating_add(self, duration: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(duration)))
    }

    /// The time elapsed from `earlier` to `self`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Formats as RFC 3339 / ISO 8601 in UTC with milliseconds, as JavaScript's
    /// `Date.prototype.toISOString()` does (`2026-11-24T20:40:57.123Z`).
    pub fn to_rfc3339(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0 % 1000;
        let secs = self.0 / 1000;
        let days = secs / 86_400;
        let secs_of_day = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            secs_of_day / 3600,
            (secs_of_day / 60) % 60,
            secs_of_day % 60,
        )
    }
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
pub fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Howard Hinnant's `civil_from_days`, restricted to non-negative days (timestamps are unsigned).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_javascript_to_iso_string() {
        // Values cross-checked with `new Date(ms).toISOString()` in Node.
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_764_016_857_123, "2025-11-24T20:40:57.123Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
            (1_709_164_800_000, "2024-02-29T00:00:00.000Z"),
        ];
        for (millis, expected) in cases {
            assert_eq!(
                Timestamp::from_millis(millis).to_rfc3339(),
                expected,
                "{millis}"
            );
        }
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_millis(u64::MAX - 5);
        assert_eq!(
            t.saturating_add(Duration::from_secs(1)).as_millis(),
            u64::MAX
        );
        let early = Timestamp::from_millis(10);
        assert_eq!(
            early.saturating_since(Timestamp::from_millis(20)),
            Duration::ZERO
        );
        assert_eq!(
            Timestamp::from_millis(1500).saturating_since(early),
            Duration::from_millis(1490)
        );
    }
}
