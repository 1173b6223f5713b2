//! Counting a stream of numbered frames as it arrives: which came, which came twice, which came after a
//! higher one, and the quantiles of their latencies. One implementation for the benchmark binaries,
//! `bridge-demo`'s summary and the agent's latency probes (the dashboard's benchmark), so that every
//! figure the project prints is counted the same way.

use std::time::Duration;

/// The sequence numbers of one numbered stream as they arrive.
#[derive(Debug)]
pub struct Arrivals {
    seen: Vec<bool>,
    highest: Option<u32>,
    pub duplicates: u64,
    pub out_of_order: u64,
}

impl Arrivals {
    /// For a stream of `count` frames numbered from 0.
    pub fn new(count: u32) -> Self {
        Self {
            seen: vec![false; count as usize],
            highest: None,
            duplicates: 0,
            out_of_order: 0,
        }
    }

    /// Counts the arrival of `seq`; true the first time it arrives, false for a duplicate or a number
    /// outside the stream.
    pub fn arrive(&mut self, seq: u32) -> bool {
        let Some(slot) = self.seen.get_mut(seq as usize) else {
            return false;
        };
        if *slot {
            self.duplicates += 1;
            return false;
        }
        *slot = true;
        if self.highest.is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        true
    }
}

/// The `q` quantile of `values` (nearest rank; 0.5 for the median), or None without any; sorts a copy.
pub fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    quantile_sorted(&sorted, q)
}

/// [`quantile`] of values already sorted, for several quantiles of one set without sorting each time.
pub fn quantile_sorted(sorted: &[Duration], q: f64) -> Option<Duration> {
    let index = ((sorted.len().checked_sub(1)?) as f64 * q).round() as usize;
    sorted.get(index.min(sorted.len() - 1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_count_duplicates_and_frames_out_of_order() {
        let mut a = Arrivals::new(4);
        assert!(a.arrive(0) && a.arrive(2) && a.arrive(1));
        assert!(!a.arrive(2), "a duplicate");
        assert!(!a.arrive(9), "outside the stream");
        assert!(a.arrive(3));
        assert_eq!((a.duplicates, a.out_of_order), (1, 1));
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let values: Vec<Duration> = (1..=100).rev().map(ms).collect();
        assert_eq!(quantile(&values, 0.5), Some(ms(51)));
        assert_eq!(quantile(&values, 0.99), Some(ms(99)));
        assert_eq!(quantile(&values, 1.0), Some(ms(100)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
