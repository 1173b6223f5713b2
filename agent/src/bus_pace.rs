//! The pace at which frames are written to a dongle: never faster than its bus carries them.
//!
//! REMP over UDP has no flow control, and a dongle keeps only a few frames waiting for its bus (the
//! STM32 FDCAN has 32 transmit buffers): a host that writes a burst of a few hundred frames at a
//! dongle loses most of them there, and nobody counts them. So the agent keeps a model of the
//! dongle's transmit queue, in which each frame takes its longest possible time on the bus at the
//! dongle's bitrate ([`firmware_proto::bus_time::worst_case_bits`]), and writes a frame only when
//! fewer than [`DEPTH`] frames are ahead of it. Counting the longest time errs towards a slower
//! write; keeping half the queue free leaves room for a link that delivers two writes at once. The
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
    /// Schedules a frame that takes `time` on the bus, offered at `now`: returns when it may be
    /// written (`now` when the queue has room). The caller writes it then; the model counts it from
    /// that moment.
    pub fn schedule(&mut self, now: Instant, time: Duration) -> Instant {
        while self.finishing.front().is_some_and(|at| *at <= now) {
            self.finishing.pop_front();
        }
        let write_at = match self.finishing.len().checked_sub(DEPTH) {
            // Once the frame `DEPTH` places ahead of this one has left, this one may be written.
            Some(ahead) => self.finishing.get(ahead).copied().unwrap_or(now).max(now),
            None => now,
        };
        let start = self
            .finishing
            .back()
            .copied()
            .unwrap_or(write_at)
            .max(write_at);
        self.finishing.push_back(start + time);
        write_at
    }

    /// Schedules the frames at the start of a run that may be written together, each taking its time
    /// from `times`: returns when they may be written and how many they are (at least one, unless
    /// `times` is empty).
    pub fn next_write(
        &mut self,
        now: Instant,
        mut times: impl Iterator<Item = Duration>,
    ) -> (Instant, usize) {
        let Some(first) = times.next() else {
            return (now, 0);
        };
        let at = self.schedule(now, first);
        let mut count = 1;
        for time in times {
            // The frames still in the queue when these are written: the finishing times are sorted.
            let left_by_then = self.finishing.partition_point(|f| *f <= at);
            if self.finishing.len() - left_by_then >= DEPTH {
                break;
            }
            let start = self.finishing.back().copied().unwrap_or(at).max(at);
            self.finishing.push_back(start + time);
            count += 1;
        }
        (at, count)
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
        let writes: Vec<Instant> = (0..DEPTH + 3).map(|_| pace.schedule(now, time)).collect();
        assert!(writes[..DEPTH].iter().all(|at| *at == now));
        // The next ones wait for the first, second and third frame to leave.
        assert_eq!(writes[DEPTH], now + time);
        assert_eq!(writes[DEPTH + 1], now + 2 * time);
        assert_eq!(writes[DEPTH + 2], now + 3 * time);
    }

    #[test]
    fn over_a_long_run_the_rate_is_the_buss() {
        let start = Instant::now();
        let time = frame_time(&eight_bytes(), 125_000);
        let mut pace = BusPace::default();
        let mut now = start;
        for _ in 0..1000 {
            // The writer waits as told, then offers the next frame.
            now = pace.schedule(now, time);
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
        // The rest wait, and go one frame time apart as the queue empties.
        let (at, n) = pace.next_write(now, std::iter::repeat_n(time, 24));
        assert_eq!((at, n), (now + time, 1));
        // Asked later, when several frames have left, several go together.
        let later = now + 4 * time;
        let (at, n) = pace.next_write(later, std::iter::repeat_n(time, 23));
        assert_eq!((at, n), (later, 3));
        assert_eq!(pace.next_write(later, std::iter::empty()), (later, 0));
    }

    #[test]
    fn an_idle_bus_takes_a_new_burst_at_once() {
        let start = Instant::now();
        let time = frame_time(&eight_bytes(), 500_000);
        let mut pace = BusPace::default();
        for _ in 0..DEPTH {
            pace.schedule(start, time);
        }
        let later = start + Duration::from_secs(1);
        assert_eq!(pace.schedule(later, time), later);
    }

    #[test]
    fn fd_frames_are_paced_by_their_length() {
        let id = CanId::standard(0x10).unwrap();
        let short = Frame::with_flags(id, firmware_proto::ext::batch::flags::FD, &[0; 12]).unwrap();
        let long = Frame::with_flags(id, firmware_proto::ext::batch::flags::FD, &[0; 64]).unwrap();
        assert!(frame_time(&long, 500_000) > 3 * frame_time(&short, 500_000));
    }
}
