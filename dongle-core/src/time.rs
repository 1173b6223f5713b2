//! What the core asks of its host's clock.
//!
//! The core never reads a clock: every call that depends on time takes `now`. Any monotonic
//! instant type that can add a [`Duration`] and subtract another instant serves, so the simulator
//! passes `tokio::time::Instant` (and its tests pause and advance tokio's clock), while a firmware
//! passes [`Ticks`], the microseconds its timer counted since boot.

use core::fmt::Debug;
use core::ops::{Add, Sub};
use core::time::Duration;

/// A monotonic point in time, as the host's clock gives it.
pub trait Instant:
    Copy + Ord + Debug + Add<Duration, Output = Self> + Sub<Self, Output = Duration>
{
}

impl<T> Instant for T where
    T: Copy + Ord + Debug + Add<Duration, Output = T> + Sub<T, Output = Duration>
{
}

/// The time from `earlier` to `later`, or zero when `later` is not later.
///
/// Written out rather than left to `Sub`, since `std::time::Instant`'s subtraction only promises to
/// saturate for now.
pub fn since<I: Instant>(later: I, earlier: I) -> Duration {
    if later > earlier {
        later - earlier
    } else {
        Duration::ZERO
    }
}

/// Microseconds since boot: the instant a firmware's timer gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Ticks(pub u64);

impl Add<Duration> for Ticks {
    type Output = Ticks;

    fn add(self, d: Duration) -> Ticks {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Ticks(self.0.saturating_add(us))
    }
}

impl Sub for Ticks {
    type Output = Duration;

    fn sub(self, earlier: Ticks) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_add_and_subtract_without_overflow() {
        let t = Ticks(5);
        assert_eq!((t + Duration::from_millis(2)).0, 2005);
        assert_eq!(Ticks(2005) - t, Duration::from_micros(2000));
        assert_eq!(since(t, Ticks(2005)), Duration::ZERO);
        assert_eq!((Ticks(u64::MAX - 1) + Duration::from_secs(1)).0, u64::MAX);
    }
}
