//! When to try the server again: exponential backoff with full jitter.
//!
//! Jitter matters because a server restart drops every agent at once; without it they would all come
//! back in the same instant, again and again.

use std::time::Duration;

use rand::RngExt;

/// The delays between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays drawn from `0..=min(cap, base * 2^attempt)`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // Never zero, so a server that refuses at once is not hammered in a tight loop.
        let floor = self.base / 4;
        let millis = rand::rng()
            .random_range(floor.as_millis()..=ceiling.as_millis().max(floor.as_millis()));
        Duration::from_millis(millis as u64)
    }

    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceiling = Duration::from_millis(100);
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(25) && d <= ceiling,
                "{d:?} > {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(2));
        }
        // Past the cap, delays stay within it.
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut delays = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            b.next_delay();
            b.next_delay();
            delays.insert(b.next_delay());
        }
        assert!(delays.len() > 10, "delays barely vary: {delays:?}");
    }
}
