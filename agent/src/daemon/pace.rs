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
//! The budget is a leaky bucket: every message sent costs [`PER_MESSAGE`], and a flush waits until what
//! was sent before is paid for, so small flushes in quick succession keep to the budget as well as large
//! ones. Only the cap can exceed it, for an agent with more sides than the budget carries in
//! [`MAX_WAIT`].
//!
//! "Paid for" is taken within the runtime's timer resolution: tokio's timers fire on whole milliseconds,
//! so a wait of 250 us held every frame for a millisecond or more, which is what one group at 9 000
//! frames/s measured (1.2 ms of its 1.45 ms p50 were this wait, seen in `bench-relay`'s hop table). A
//! flush is therefore due at once when the debt ends within the resolution, and asked for one
//! resolution early otherwise; the bucket keeps the long-run rate whichever way the timer rounds.
//!
//! The budget and the cap are the measured balance between latency and CPU with many groups
//! (docs/BENCHMARKS.md, "Relay"): 4 000 messages a second and 5 ms held 32 groups at p99 11.5 ms and
//! 1.08 cores, 16 000 and 2 ms at p99 9.3 ms and 1.21 cores (8 groups: 4.9 against 1.9 ms).

use std::time::Duration;

use tokio::time::Instant;

/// The message rate the pacing keeps one connection's FRAMES messages under, when busy.
pub const MESSAGES_PER_SECOND: u32 = 16_000;
/// What one message sent costs of the budget.
const PER_MESSAGE: Duration = Duration::from_nanos(1_000_000_000 / MESSAGES_PER_SECOND as u64);
/// The longest a frame waits for its flush, however many messages the last one sent.
pub const MAX_WAIT: Duration = Duration::from_millis(2);
/// The shortest wait the runtime's timers can keep: anything due sooner is done at once.
pub const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The pacing of one connection's flushes: a leaky bucket of messages.
#[derive(Debug, Default)]
pub struct Pace {
    /// When the messages sent so far are paid for, at [`PER_MESSAGE`] each; never further ahead of
    /// the last flush than [`MAX_WAIT`], so that no frame waits longer than that.
    paid_until: Option<Instant>,
}

impl Pace {
    /// When frames that arrive `now` should be sent: `now` itself when what was sent is paid for, or
    /// will be within the timer's resolution. A later answer is one resolution early, since the timer
    /// fires on the first whole millisecond at or after it.
    pub fn flush_at(&self, now: Instant) -> Instant {
        match self.paid_until {
            Some(paid) if paid > now + TIMER_RESOLUTION => paid - TIMER_RESOLUTION,
            _ => now,
        }
    }

    /// Records a flush at `now` that sent `messages` messages (none: nothing changes).
    pub fn flushed(&mut self, now: Instant, messages: usize) {
        if messages == 0 {
            return;
        }
        let from = self.paid_until.map_or(now, |paid| paid.max(now));
        let cost = PER_MESSAGE.saturating_mul(u32::try_from(messages).unwrap_or(u32::MAX));
        self.paid_until = Some((from + cost).min(now + MAX_WAIT));
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
        // 24 messages cost 24 x 62.5 us = 1.5 ms: more than the timers' resolution, less than the cap.
        pace.flushed(start, 24);
        let paid = start + PER_MESSAGE * 24;
        assert_eq!(paid, start + Duration::from_micros(1_500));
        // Asked for one resolution early: the timer fires on the millisecond at or after.
        let due = paid - TIMER_RESOLUTION;
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
        // Eight messages cost 500 us, which a timer would round up to a millisecond or two.
        pace.flushed(start, 8);
        assert_eq!(pace.flush_at(start), start);
        // 24 more cost 1.5 ms on top: paid at 2 ms, asked for at 1 ms.
        pace.flushed(start, 24);
        let soon = start + Duration::from_micros(200);
        assert_eq!(pace.flush_at(soon), start + Duration::from_millis(1));
        // Once less than the resolution is left, the flush is due.
        let later = start + Duration::from_millis(1);
        assert_eq!(pace.flush_at(later), later);
    }

    #[test]
    fn no_frame_waits_longer_than_the_cap() {
        let mut pace = Pace::default();
        let start = Instant::now();
        pace.flushed(start, 10_000);
        assert!(pace.flush_at(start) <= start + MAX_WAIT);
        // The debt does not pile up beyond the cap either.
        pace.flushed(start, 10_000);
        assert!(pace.flush_at(start) <= start + MAX_WAIT);
    }

    #[test]
    fn the_budget_is_the_rate() {
        // MESSAGES_PER_SECOND one-message flushes in a second, back to back, is the budget exactly.
        assert_eq!(PER_MESSAGE * MESSAGES_PER_SECOND, Duration::from_secs(1));
    }

    /// Flushes of ten messages as often as the pace allows, each turn of the loop taking 10 us, every
    /// wait rounded up to a whole millisecond as tokio's timer does: over a second, no more than the
    /// budget goes out, give or take what the timer's resolution lets through early. (Skipping short
    /// waits once let such flushes go out back to back, at 1 000 000 messages a second.)
    #[test]
    fn small_flushes_keep_to_the_budget_too() {
        let mut pace = Pace::default();
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0u64;
        while now < start + Duration::from_secs(1) {
            let at = pace.flush_at(now);
            if at > now {
                let ms = (at - start).as_nanos().div_ceil(1_000_000) as u64;
                now = start + Duration::from_millis(ms);
            }
            pace.flushed(now, 10);
            sent += 10;
            now += Duration::from_micros(10);
        }
        let slack = (TIMER_RESOLUTION.as_nanos() / PER_MESSAGE.as_nanos()) as u64 + 10;
        assert!(
            sent <= u64::from(MESSAGES_PER_SECOND) + slack,
            "{sent} messages in a second"
        );
        assert!(
            sent >= u64::from(MESSAGES_PER_SECOND) / 2,
            "{sent} messages in a second"
        );
    }
}
