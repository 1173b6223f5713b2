//! When the data plane sends the frames its dongles received: at once when the connection has been
//! quiet, and paced when it is busy.
//!
//! A FRAMES message costs the same at every hop (the server's relay, the other agent, its dongle's link)
//! whether it carries one frame or a thousand, so a busy agent gathers frames into few messages. A fixed
//! gathering time would hold every frame for that time, even on a quiet bus where nothing else waits to
//! be sent: the latency of the whole bridge would be that timer. Instead each flush earns the next one a
//! wait in proportion to the messages it sent ([`PER_MESSAGE`] each), so one group on a busy bus sends
//! each frame as it comes (about 1 000 small messages a second), while many groups share a budget of
//! about [`MESSAGES_PER_SECOND`] messages and gather longer, never more than [`MAX_WAIT`].
//!
//! A wait shorter than the runtime's timer resolution is not waited at all: tokio's timers fire on
//! whole milliseconds, so a 250 us wait held every frame for a millisecond or more, which is what one
//! group at 9 000 frames/s measured (1.2 ms of its 1.45 ms p50 were this wait, seen in `bench-relay`'s
//! hop table). Such a flush has sent at most a few messages, so the budget still holds for a busy
//! agent, whose flushes send many. The budget and the cap are the measured balance between latency and
//! CPU with many groups (docs/BENCHMARKS.md, "Relay"): 4 000 messages a second and 5 ms held 32 groups
//! at p99 11.5 ms and 1.08 cores, 16 000 and 2 ms at p99 9.3 ms and 1.21 cores (8 groups: 4.9 against
//! 1.9 ms).

use std::time::Duration;

use tokio::time::Instant;

/// The message rate the pacing keeps one connection's FRAMES messages under, when busy.
pub const MESSAGES_PER_SECOND: u32 = 16_000;
/// The wait one message sent earns the next flush.
const PER_MESSAGE: Duration = Duration::from_nanos(1_000_000_000 / MESSAGES_PER_SECOND as u64);
/// The longest a frame waits for its flush, however many messages the last one sent.
pub const MAX_WAIT: Duration = Duration::from_millis(2);
/// The shortest wait the runtime's timers can keep: anything due sooner is done at once.
pub const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The pacing of one connection's flushes.
#[derive(Debug, Default)]
pub struct Pace {
    /// When the last flush that sent anything happened, and how many messages it sent.
    last: Option<(Instant, usize)>,
}

impl Pace {
    /// When frames that arrive `now` should be sent: `now` itself when the last flush's wait is over.
    pub fn flush_at(&self, now: Instant) -> Instant {
        match self.last {
            None => now,
            Some((at, messages)) => {
                let wait = PER_MESSAGE
                    .saturating_mul(u32::try_from(messages).unwrap_or(u32::MAX))
                    .min(MAX_WAIT);
                let due = at + wait;
                if due <= now + TIMER_RESOLUTION {
                    now
                } else {
                    due
                }
            }
        }
    }

    /// Records a flush at `now` that sent `messages` messages (none: nothing changes).
    pub fn flushed(&mut self, now: Instant, messages: usize) {
        if messages > 0 {
            self.last = Some((now, messages));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `Pace` takes the time as an argument, so the tests name instants instead of waiting.

    #[test]
    fn a_quiet_connection_sends_at_once() {
        let mut pace = Pace::default();
        let start = Instant::now();
        assert_eq!(pace.flush_at(start), start, "nothing sent yet");
        pace.flushed(start, 1);
        // One group at 9 000 frames/s: a packet of frames every millisecond, one message each.
        let later = start + Duration::from_millis(1);
        assert_eq!(pace.flush_at(later), later);
    }

    #[test]
    fn a_busy_connection_waits_in_proportion_to_what_it_sent() {
        let mut pace = Pace::default();
        let start = Instant::now();
        // 24 messages earn 24 x 62.5 us = 1.5 ms: more than the timers' resolution, less than the cap.
        pace.flushed(start, 24);
        let due = start + PER_MESSAGE * 24;
        assert_eq!(due, start + Duration::from_micros(1_500));
        assert_eq!(pace.flush_at(start), due);
        let later = start + Duration::from_micros(400);
        assert_eq!(
            pace.flush_at(later),
            due,
            "frames arriving meanwhile wait for the same flush"
        );
        pace.flushed(later, 0);
        assert_eq!(pace.flush_at(later), due, "an empty flush changes nothing");
    }

    #[test]
    fn a_wait_shorter_than_the_timers_resolution_is_not_waited() {
        let mut pace = Pace::default();
        let start = Instant::now();
        // Eight messages earn 500 us, which a timer would round up to a millisecond or two.
        pace.flushed(start, 8);
        assert_eq!(pace.flush_at(start), start);
        // 24 earn 1.5 ms: that much is waited, counted from the flush.
        pace.flushed(start, 24);
        let soon = start + Duration::from_micros(200);
        assert_eq!(pace.flush_at(soon), start + Duration::from_micros(1_500));
        // Once less than the resolution is left, the flush is due.
        let later = start + Duration::from_micros(600);
        assert_eq!(pace.flush_at(later), later);
    }

    #[test]
    fn no_frame_waits_longer_than_the_cap() {
        let mut pace = Pace::default();
        let start = Instant::now();
        pace.flushed(start, 10_000);
        assert_eq!(pace.flush_at(start), start + MAX_WAIT);
    }

    #[test]
    fn the_budget_is_the_rate() {
        // 4 000 one-message flushes in a second, back to back, is the budget exactly.
        assert_eq!(PER_MESSAGE * MESSAGES_PER_SECOND, Duration::from_secs(1));
    }
}
