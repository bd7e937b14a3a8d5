//! Nearest-rank percentiles, plain and weighted, and the inter-token gap record.
//!
//! Definition: the p-th percentile of n sorted values is the value at 1-based rank
//! `ceil(p * n / 100)`, clamped to `1..=n`; so p = 0 gives the minimum, p = 100 the maximum and
//! every result is an observed value. A weighted sample counts as `weight` copies of its value.
//! The percentile of an empty set is 0, so no NaN reaches an output.

use serde::Serialize;

use crate::time::ns_to_ms;

/// The 1-based nearest rank of percentile `p` among `n` values; `n` must be positive.
/// Multiplying before dividing keeps integer percentiles exact (7 * 100 / 100 is 7, where
/// 0.07 * 100 is not).
fn nearest_rank(p: f64, n: u64) -> u64 {
    let rank = (p * n as f64 / 100.0).ceil();
    // NaN and p <= 0 fall to rank 1; the float-to-int cast saturates.
    (rank as u64).clamp(1, n)
}

/// Nearest-rank percentile `p` (0..=100) of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = nearest_rank(p, sorted.len() as u64);
    sorted[(rank - 1) as usize]
}

/// Nearest-rank percentile `p` over weighted samples `(value, weight)` sorted by value; the
/// same as [`percentile`] over the samples expanded into `weight` copies each. 0 when the total
/// weight is 0.
pub fn weighted_percentile(sorted: &[(u64, u64)], p: f64) -> u64 {
    let total = sorted
        .iter()
        .fold(0u64, |acc, &(_, w)| acc.saturating_add(w));
    if total == 0 {
        return 0;
    }
    let rank = nearest_rank(p, total);
    sorted
        .iter()
        .scan(0u64, |seen, &(value, weight)| {
            *seen = seen.saturating_add(weight);
            Some((*seen, value))
        })
        .find(|&(seen, _)| seen >= rank)
        .map_or(0, |(_, value)| value)
}

/// A latency distribution in milliseconds; all zero for an empty set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// The distribution of `sorted_ns` (ascending nanoseconds).
    pub fn of_sorted_ns(sorted_ns: &[u64]) -> Self {
        let Some(&max) = sorted_ns.last() else {
            return Self::default();
        };
        let sum: u128 = sorted_ns.iter().map(|&v| u128::from(v)).sum();
        Self {
            mean: sum as f64 / sorted_ns.len() as f64 / 1e6,
            p50: ns_to_ms(percentile(sorted_ns, 50.0)),
            p90: ns_to_ms(percentile(sorted_ns, 90.0)),
            p99: ns_to_ms(percentile(sorted_ns, 99.0)),
            max: ns_to_ms(max),
        }
    }

    /// The distribution of weighted samples `(ns, weight)` sorted by value.
    pub fn of_weighted_ns(sorted: &[(u64, u64)]) -> Self {
        let (sum, total) = sorted.iter().fold((0u128, 0u128), |(s, t), &(v, w)| {
            (s + u128::from(v) * u128::from(w), t + u128::from(w))
        });
        if total == 0 {
            return Self::default();
        }
        let max = sorted
            .iter()
            .rev()
            .find(|&&(_, w)| w > 0)
            .map_or(0, |&(v, _)| v);
        Self {
            mean: sum as f64 / total as f64 / 1e6,
            p50: ns_to_ms(weighted_percentile(sorted, 50.0)),
            p90: ns_to_ms(weighted_percentile(sorted, 90.0)),
            p99: ns_to_ms(weighted_percentile(sorted, 99.0)),
            max: ns_to_ms(max),
        }
    }
}

/// Inter-token gaps, weighted: `(gap_ns, count)`. A decode step adds one entry for all the
/// tokens of its batch that waited the same gap, so recording is O(1) per step rather than per
/// token. Consecutive adds of the same gap share an entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenGaps {
    entries: Vec<(u64, u64)>,
    total_count: u64,
}

impl TokenGaps {
    /// Records `count` tokens that each followed their previous token by `gap_ns`.
    #[inline]
    pub fn add(&mut self, gap_ns: u64, count: u32) {
        if count == 0 {
            return;
        }
        let count = u64::from(count);
        self.total_count += count;
        match self.entries.last_mut() {
            Some((gap, c)) if *gap == gap_ns => *c += count,
            _ => self.entries.push((gap_ns, count)),
        }
    }

    /// Appends every gap of `other` (one recorder per worker, merged at the end of a run).
    pub fn extend_from(&mut self, other: &TokenGaps) {
        self.entries.extend_from_slice(&other.entries);
        self.total_count += other.total_count;
    }

    /// Number of gaps recorded (tokens after each request's first).
    pub fn total_count(&self) -> u64 {
        self.total_count
    }

    /// The gap distribution in milliseconds.
    pub fn percentiles(&self) -> Percentiles {
        let mut sorted = self.entries.clone();
        sorted.sort_unstable();
        Percentiles::of_weighted_ns(&sorted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nearest_rank_on_one_to_ten() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 50.0), 5);
        assert_eq!(percentile(&v, 90.0), 9);
        assert_eq!(percentile(&v, 99.0), 10);
        assert_eq!(percentile(&v, 100.0), 10);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&v, 10.0), 1);
        assert_eq!(percentile(&v, 10.5), 2);
        assert_eq!(percentile(&v, 25.0), 3);
        assert_eq!(percentile(&v, -5.0), 1);
        assert_eq!(percentile(&v, 250.0), 10);
        assert_eq!(percentile(&v, f64::NAN), 1);
    }

    #[test]
    fn integer_percentiles_are_exact() {
        let v: Vec<u64> = (1..=100).collect();
        for p in 1..=100u64 {
            assert_eq!(percentile(&v, p as f64), p);
        }
    }

    #[test]
    fn small_and_empty_sets() {
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 1.0), 7);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[1, 2], 50.0), 1);
        assert_eq!(percentile(&[1, 2], 51.0), 2);
        assert_eq!(weighted_percentile(&[], 50.0), 0);
        assert_eq!(weighted_percentile(&[(5, 0)], 50.0), 0);
        assert_eq!(Percentiles::of_sorted_ns(&[]), Percentiles::default());
        assert_eq!(Percentiles::of_weighted_ns(&[]), Percentiles::default());
        assert_eq!(TokenGaps::default().percentiles(), Percentiles::default());
    }

    #[test]
    fn percentiles_in_ms() {
        let v: Vec<u64> = (1..=10).map(|i| i * 1_000_000).collect();
        let p = Percentiles::of_sorted_ns(&v);
        assert_eq!(
            p,
            Percentiles {
                mean: 5.5,
                p50: 5.0,
                p90: 9.0,
                p99: 10.0,
                max: 10.0
            }
        );
    }

    #[test]
    fn token_gaps_merge_repeats_and_skip_empty_adds() {
        let mut g = TokenGaps::default();
        g.add(2_000_000, 3);
        g.add(2_000_000, 1);
        g.add(1_000_000, 0);
        g.add(4_000_000, 4);
        assert_eq!(g.total_count(), 8);
        assert_eq!(g.entries, vec![(2_000_000, 4), (4_000_000, 4)]);
        let p = g.percentiles();
        assert_eq!(p.mean, 3.0);
        assert_eq!(p.p50, 2.0);
        assert_eq!(p.p90, 4.0);
        assert_eq!(p.max, 4.0);

        let mut other = TokenGaps::default();
        other.add(1_000_000, 8);
        g.extend_from(&other);
        assert_eq!(g.total_count(), 16);
        assert_eq!(g.percentiles().p50, 1.0);
    }

    proptest! {
        #[test]
        fn weighted_equals_expanded(
            mut samples in prop::collection::vec((0u64..1_000, 0u64..20), 0..40),
            p in 0.0f64..=100.0,
        ) {
            samples.sort_unstable();
            let expanded: Vec<u64> = samples
                .iter()
                .flat_map(|&(v, w)| std::iter::repeat_n(v, w as usize))
                .collect();
            prop_assert_eq!(weighted_percentile(&samples, p), percentile(&expanded, p));
            prop_assert_eq!(Percentiles::of_weighted_ns(&samples), Percentiles::of_sorted_ns(&expanded));
        }

        #[test]
        fn token_gaps_match_expanded(adds in prop::collection::vec((0u64..50, 0u32..10), 0..60)) {
            let mut g = TokenGaps::default();
            let mut expanded = Vec::new();
            for &(gap, count) in &adds {
                g.add(gap, count);
                expanded.extend(std::iter::repeat_n(gap, count as usize));
            }
            expanded.sort_unstable();
            prop_assert_eq!(g.total_count(), expanded.len() as u64);
            prop_assert_eq!(g.percentiles(), Percentiles::of_sorted_ns(&expanded));
        }
    }
}
