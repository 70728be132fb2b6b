//! The few things the native adapter takes from the OS for core: the clock, randomness, locks.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rollgate_proxy_core::time::Timestamp;

/// Now, as core's timestamp (unix milliseconds).
pub fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(millis)
}

/// A random `u64` from the standard library's per-process hash keys (no extra dependency; good
/// enough for jitter, never used for secrets).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// A uniform random sample in `[0, 1)` (core's jitter input).
pub fn random_unit() -> f64 {
    // 53 random bits → a uniform sample in [0, 1).
    #[allow(clippy::cast_precision_loss)]
    let sample = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    sample
}

/// Locks a std mutex, ignoring poisoning (every critical section here leaves consistent state).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_samples_stay_in_range_and_vary() {
        let samples: Vec<f64> = (0..200).map(|_| random_unit()).collect();
        assert!(samples.iter().all(|s| (0.0..1.0).contains(s)));
        assert!(samples.iter().any(|s| *s != samples[0]));
        assert_ne!(random_u64(), random_u64());
    }
}
