//! The pace at which frames are written to a dongle: never faster than its bus carries them.
//!
//! REMP over UDP has no flow control, and a dongle keeps only a few frames waiting for its bus (the
//! STM32 FDCAN has 32 transmit buffers): a host that writes a burst of a few hundred frames at a
//! dongle loses most of them there, and nobody counts them. So the agent keeps a model of the
//! dongle's transmit queue, in which each frame takes its longest possible time on the bus at the
//! dongle's bitrate ([`firmware_proto::bus_time::worst_case_bits`]), and writes a frame only when
//! fewer than [`DEPTH`] frames are ahead of it. Counting the longest time errs towards a slower
//! write; keeping half the queue free leaves room for a link that delivers two writes at once. A
//! frame counts from the moment the session hands it to its link, not from the moment it was
//! allowed: a writer that waited and woke late would otherwise leave the model ahead of the dongle,
//! which starts a frame only when it comes, and every late wake-up would add to the difference. (The
//! link's writer task may still write it later; that gap is not counted yet.) The
//! model assumes the bus is the dongle's: other nodes' traffic, error frames and retransmissions slow
//! the real queue, which can then still overflow; a dongle that announces bus-status counts what it
//! dropped (`daemon::bus_losses`).
//!
//! CAN FD frames are paced by their own length, with the data phase at the nominal bitrate, since the
//! dongle's configuration names no data bitrate.

use std::collections::VecDeque;
use std::time::Duration;

use firmware_proto::bus_time::{FrameShape, worst_case_bits};
use tokio::time::Instant;

use crate::frame::Frame;

/// Frames written ahead of the dongle's bus at most.
pub const DEPTH: usize = 16;

/// The model of one dongle's transmit queue.
#[derive(Debug, Default)]
pub struct BusPace {
    /// When each frame written and not yet off the bus (in the model) finishes, in order.
    finishing: VecDeque<Instant>,
}

impl BusPace {
    /// When one more frame may be written, asked at `now`: `now` while fewer than [`DEPTH`] frames
    /// are ahead, otherwise when the frame `DEPTH` places ahead has left. Records nothing.
    fn ready_at(&mut self, now: Instant) -> Instant {
        while self.finishing.front().is_some_and(|at| *at <= now) {
            self.finishing.pop_front();
        }
        match self.finishing.len().checked_sub(DEPTH) {
            Some(ahead) => self.finishing.get(ahead).copied().unwrap_or(now).max(now),
            None => now,
        }
    }

    /// The frames at the start of a run that may be written together at `now`, each taking its time
    /// from `times`: returns `(now, how many)` and counts them as written at `now`, when the queue has
    /// room; otherwise `(when it will have, 0)`, counting nothing. A writer that waited asks again when
    /// it wakes, so that a frame is counted from the moment it went, however late the writer woke: a
    /// dongle whose queue ran dry meanwhile starts it only then.
    pub fn next_write(
        &mut self,
        now: Instant,
        times: impl Iterator<Item = Duration>,
    ) -> (Instant, usize) {
        let ready = self.ready_at(now);
        if ready > now {
            return (ready, 0);
        }
        let mut count = 0;
        for time in times {
            if self.finishing.len() >= DEPTH {
                break;
            }
            let start = self.finishing.back().copied().unwrap_or(now).max(now);
            self.finishing.push_back(start + time);
            count += 1;
        }
        (now, count)
    }
}

/// The longest time `frame` can take on a bus at `bitrate`.
pub fn frame_time(frame: &Frame, bitrate: u32) -> Duration {
    let shape = FrameShape {
        extended: frame.id.is_extended(),
        fd: frame.is_fd(),
        brs: false,
        len: frame.data().len() as u8,
    };
    Duration::from_nanos(worst_case_bits(shape).nanos(bitrate, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ids::CanId;

    fn eight_bytes() -> Frame {
        Frame::classic(CanId::standard(0x123).unwrap(), &[0; 8]).unwrap()
    }

    #[test]
    fn a_burst_goes_at_once_up_to_the_depth_then_at_the_bus_pace() {
        let now = Instant::now();
        let time = frame_time(&eight_bytes(), 500_000);
        // 135 bits at 500 kbit/s.
        assert_eq!(time, Duration::from_micros(270));
        let mut pace = BusPace::default();
        let one = || std::iter::once(time);
        let writes: Vec<(Instant, usize)> =
            (0..DEPTH).map(|_| pace.next_write(now, one())).collect();
        assert!(writes.iter().all(|w| *w == (now, 1)));
        // The next one waits for the first frame to leave, and then goes.
        assert_eq!(pace.next_write(now, one()), (now + time, 0));
        assert_eq!(pace.next_write(now + time, one()), (now + time, 1));
        assert_eq!(pace.next_write(now + time, one()), (now + 2 * time, 0));
    }

    #[test]
    fn over_a_long_run_the_rate_is_the_buss() {
        let start = Instant::now();
        let time = frame_time(&eight_bytes(), 125_000);
        let mut pace = BusPace::default();
        let mut now = start;
        let mut written = 0;
        while written < 1000 {
            // The writer waits as told, then offers the next frame.
            match pace.next_write(now, std::iter::once(time)) {
                (_, 1) => written += 1,
                (at, _) => now = at,
            }
        }
        let elapsed = now - start;
        // 1000 frames, the first DEPTH of them at once: (1000 - DEPTH) frame times.
        assert_eq!(elapsed, time * (1000 - DEPTH as u32));
    }

    #[test]
    fn frames_written_together_are_those_the_queue_has_room_for() {
        let now = Instant::now();
        let time = frame_time(&eight_bytes(), 500_000);
        let mut pace = BusPace::default();
        let (at, n) = pace.next_write(now, std::iter::repeat_n(time, 40));
        assert_eq!((at, n), (now, DEPTH));
        // The rest wait until the first frame has left.
        let (at, n) = pace.next_write(now, std::iter::repeat_n(time, 24));
        assert_eq!((at, n), (now + time, 0));
        // Asked later, when several frames have left, several go together.
        let later = now + 4 * time;
        let (at, n) = pace.next_write(later, std::iter::repeat_n(time, 24));
        assert_eq!((at, n), (later, 4));
        assert_eq!(
            pace.next_write(later, std::iter::empty()),
            (later + time, 0)
        );
    }

    /// A writer told to wait often wakes later than told (a timer's granularity, a busy machine). If
    /// the model counted the frame from when it was allowed rather than from when it went, a dongle
    /// whose queue ran dry meanwhile would start it later than the model thinks, and the model would
    /// let more frames ahead of it than [`DEPTH`]; every late wake-up would add to that.
    #[test]
    fn a_frame_written_late_is_counted_from_when_it_was_written() {
        let start = Instant::now();
        let time = frame_time(&eight_bytes(), 500_000);
        let mut pace = BusPace::default();
        // The dongle's queue as it is: when each frame written finishes, a frame starting when it
        // comes or when the one before it has left.
        let mut dongle: VecDeque<Instant> = VecDeque::new();
        let mut write = |at: Instant, n: usize| {
            for _ in 0..n {
                while dongle.front().is_some_and(|f| *f <= at) {
                    dongle.pop_front();
                }
                let begin = dongle.back().copied().unwrap_or(at).max(at);
                dongle.push_back(begin + time);
                assert!(dongle.len() <= DEPTH, "{} frames ahead", dongle.len());
            }
        };
        let (at, n) = pace.next_write(start, std::iter::repeat_n(time, DEPTH));
        assert_eq!((at, n), (start, DEPTH));
        write(at, n);
        // The next frame must wait for the first to leave; its writer wakes 20 frame times late, when
        // the dongle's queue is empty, and then writes all it may.
        let mut left = DEPTH + 1;
        let (at, n) = pace.next_write(start, std::iter::repeat_n(time, left));
        assert_eq!(at, start + time);
        let woke = at + 19 * time;
        write(woke, n);
        left -= n;
        while left > 0 {
            let (at, n) = pace.next_write(woke, std::iter::repeat_n(time, left));
            if at > woke || n == 0 {
                break;
            }
            write(woke, n);
            left -= n;
        }
        assert_eq!(left, 1, "a queue's depth goes at once, the last one waits");
    }

    #[test]
    fn an_idle_bus_takes_a_new_burst_at_once() {
        let start = Instant::now();
        let time = frame_time(&eight_bytes(), 500_000);
        let mut pace = BusPace::default();
        assert_eq!(
            pace.next_write(start, std::iter::repeat_n(time, DEPTH)),
            (start, DEPTH)
        );
        let later = start + Duration::from_secs(1);
        assert_eq!(
            pace.next_write(later, std::iter::repeat_n(time, DEPTH)),
            (later, DEPTH)
        );
    }

    #[test]
    fn fd_frames_are_paced_by_their_length() {
        let id = CanId::standard(0x10).unwrap();
        let short = Frame::with_flags(id, firmware_proto::ext::batch::flags::FD, &[0; 12]).unwrap();
        let long = Frame::with_flags(id, firmware_proto::ext::batch::flags::FD, &[0; 64]).unwrap();
        assert!(frame_time(&long, 500_000) > 3 * frame_time(&short, 500_000));
    }
}
