//! Counter totals summed from sources that restart: a Worker shard counts from zero again after
//! it hibernated or was evicted, and reports its totals since it started.
//!
//! Summing each source's latest report (what the Relay did) makes a scraped counter go *down*
//! whenever one shard wakes afresh, which Prometheus reads as a reset of the whole sum and
//! which loses what the other shards counted in between. Here each report carries the source's
//! boot id: a new boot's counters are all new, and within a boot only what grew since its last
//! report is added, so the totals only grow (they restart only with the object that keeps them).

use std::collections::BTreeMap;

/// Per-source reports of `N` counters, summed into totals that only grow.
#[derive(Debug)]
pub struct RestartingCounters<const N: usize> {
    /// Sources accepted: ids `0..max_sources` (the shard count), so the map stays bounded.
    max_sources: u32,
    /// Each source's boot id and counters as last reported.
    last: BTreeMap<u32, (u64, [u64; N])>,
    totals: [u64; N],
}

impl<const N: usize> RestartingCounters<N> {
    /// Totals from sources `0..max_sources`.
    pub fn new(max_sources: u32) -> Self {
        Self {
            max_sources,
            last: BTreeMap::new(),
            totals: [0; N],
        }
    }

    /// Takes `source`'s counters since its start `boot`; `false` (nothing changed) for a source
    /// id out of range. Within one boot a counter never goes down; if one did, nothing is added
    /// for it.
    pub fn report(&mut self, source: u32, boot: u64, counters: [u64; N]) -> bool {
        if source >= self.max_sources {
            return false;
        }
        let previous = self.last.insert(source, (boot, counters));
        let since = match previous {
            Some((last_boot, last)) if last_boot == boot => last,
            // First report, or the source restarted: everything it counted is new.
            _ => [0; N],
        };
        for ((total, now), before) in self.totals.iter_mut().zip(counters).zip(since) {
            *total = total.saturating_add(now.saturating_sub(before));
        }
        true
    }

    /// The sums so far.
    pub fn totals(&self) -> [u64; N] {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_restarted_source_adds_to_the_totals_instead_of_lowering_them() {
        let mut counters = RestartingCounters::<2>::new(4);
        assert!(counters.report(0, 7, [10, 1]));
        assert!(counters.report(1, 9, [5, 0]));
        assert_eq!(counters.totals(), [15, 1]);
        assert!(counters.report(0, 7, [12, 1]));
        assert_eq!(counters.totals(), [17, 1]);
        // Shard 0 woke afresh: it counts from zero again, and its 3 are new.
        assert!(counters.report(0, 8, [3, 0]));
        assert_eq!(counters.totals(), [20, 1]);
        // The same report again adds nothing.
        assert!(counters.report(0, 8, [3, 0]));
        assert_eq!(counters.totals(), [20, 1]);
    }

    #[test]
    fn sources_out_of_range_are_refused() {
        let mut counters = RestartingCounters::<1>::new(2);
        assert!(!counters.report(2, 1, [100]));
        assert!(!counters.report(u32::MAX, 1, [100]));
        assert_eq!(counters.totals(), [0]);
    }

    proptest! {
        #[test]
        fn totals_never_go_down_and_count_every_increment(
            steps in proptest::collection::vec((0u32..3, any::<bool>(), 0u64..50), 1..60),
        ) {
            let mut counters = RestartingCounters::<1>::new(3);
            // The model: each source's boot and count; the true total of increments.
            let mut state = [(0u64, 0u64); 3];
            let mut truth = 0u64;
            let mut before = 0u64;
            for (source, restart, increment) in steps {
                let (boot, count) = &mut state[source as usize];
                if restart {
                    *boot += 1;
                    *count = 0;
                }
                *count += increment;
                truth += increment;
                counters.report(source, *boot, [*count]);
                let [total] = counters.totals();
                prop_assert!(total >= before);
                prop_assert_eq!(total, truth);
                before = total;
            }
        }
    }
}
