//! The dongle's CAN transmitter: a queue of [`TX_QUEUE`] frames that the bus empties one frame at a
//! time, each taking its bit time at the configured bitrate, stuffing included.
//!
//! A frame offered while the queue is full waits up to [`TX_WAIT`] for a free place, and is dropped
//! and counted when none frees in that time, as the reference firmware waits for a transmit buffer and
//! then drops: a host that sends faster than the bus carries loses frames here as it would on a real
//! dongle. The queue holds only the times at which its frames finish; the frames
//! themselves travel with those times to the task that puts them on the virtual bus.
//!
//! Classic frames take their exact bits ([`firmware_proto::bus_time::classic_bits`]); CAN FD frames
//! their worst case, with the data phase at the nominal bitrate, since the dongle's configuration has
//! no data bitrate. Other nodes' traffic (the generator, a replayed log) is not modelled: this bus is
//! the dongle's alone.

use std::collections::VecDeque;
use std::time::Duration;

use firmware_proto::bus_time::{FrameShape, classic_bits, worst_case_bits};
use tokio::time::Instant;

use crate::frame::Frame;

/// The frames waiting to go onto the bus at most: the transmit buffers of the STM32's FDCAN.
pub const TX_QUEUE: usize = 32;
/// How long a frame that finds the queue full waits for a place before it is dropped (the reference
/// firmware's `CAN_TX_WAIT`).
pub const TX_WAIT: Duration = Duration::from_millis(5);

/// The transmit queue's state.
#[derive(Debug, Default)]
pub struct Transmitter {
    /// When each queued frame finishes, in order.
    finishing: VecDeque<Instant>,
    /// Frames dropped because the queue was full.
    dropped: u64,
}

impl Transmitter {
    /// Queues `frame` at `now` on a bus at `bitrate`: the time it will have left the bus, or `None`
    /// when the queue stays full for [`TX_WAIT`] and the frame is dropped.
    pub fn offer(&mut self, now: Instant, frame: &Frame, bitrate: u32) -> Option<Instant> {
        while self.finishing.front().is_some_and(|at| *at <= now) {
            self.finishing.pop_front();
        }
        // The frames ahead beyond the queue's places are those that wait for one, in order: this one
        // gets a place when the frame that many places ahead has left.
        if let Some(ahead) = self.finishing.len().checked_sub(TX_QUEUE)
            && self
                .finishing
                .get(ahead)
                .is_some_and(|free| *free > now + TX_WAIT)
        {
            self.dropped += 1;
            return None;
        }
        let start = self.finishing.back().copied().unwrap_or(now).max(now);
        let done = start + frame_time(frame, bitrate);
        self.finishing.push_back(done);
        Some(done)
    }

    /// Frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// The time `frame` holds a bus at `bitrate`.
pub fn frame_time(frame: &Frame, bitrate: u32) -> Duration {
    let id = frame.id();
    let bits = if frame.is_fd() {
        let shape = FrameShape {
            extended: id.is_extended(),
            fd: true,
            brs: false,
            len: frame.data().len() as u8,
        };
        worst_case_bits(shape).total()
    } else {
        let data = frame.data();
        classic_bits(id.raw(), id.is_extended(), false, data.len() as u8, data)
    };
    Duration::from_nanos(u64::from(bits) * 1_000_000_000 / u64::from(bitrate.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ids::CanId;

    fn frame(data: &[u8]) -> Frame {
        Frame::classic(CanId::standard(0x123).unwrap(), data).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn frames_leave_one_bit_time_after_another() {
        let mut tx = Transmitter::default();
        let now = Instant::now();
        let f = frame(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let one = frame_time(&f, 500_000);
        // An 8-byte frame at 500 kbit/s: 111 bits unstuffed, 135 at most.
        assert!(
            (Duration::from_micros(222)..=Duration::from_micros(270)).contains(&one),
            "{one:?}"
        );
        assert_eq!(tx.offer(now, &f, 500_000), Some(now + one));
        assert_eq!(tx.offer(now, &f, 500_000), Some(now + 2 * one));
        // A bus that was idle starts the next frame when it is offered, not when the last one ended.
        let later = now + Duration::from_secs(1);
        assert_eq!(tx.offer(later, &f, 500_000), Some(later + one));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_and_counts() {
        let mut tx = Transmitter::default();
        let now = Instant::now();
        let f = frame(&[0xAA; 8]);
        let time = frame_time(&f, 125_000);
        // The queue's places, and then as many as free a place within the wait: about 1 ms each.
        let waiting = (TX_WAIT.as_nanos() / time.as_nanos()) as usize;
        assert!((4..=5).contains(&waiting), "{waiting} {time:?}");
        for _ in 0..TX_QUEUE + waiting {
            assert!(tx.offer(now, &f, 125_000).is_some());
        }
        assert_eq!(tx.offer(now, &f, 125_000), None);
        assert_eq!(tx.dropped(), 1);
        // Once the first frame has left, one more fits.
        let first_done = now + time;
        assert!(tx.offer(first_done, &f, 125_000).is_some());
        assert_eq!(tx.offer(first_done, &f, 125_000), None);
        assert_eq!(tx.dropped(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_fd_frame_takes_longer_than_a_short_one() {
        let id = CanId::standard(0x10).unwrap();
        let short = Frame::fd(id, &[0; 8], false).unwrap();
        let long = Frame::fd(id, &[0; 64], false).unwrap();
        assert!(frame_time(&long, 500_000) > 4 * frame_time(&short, 500_000) / 2);
        assert!(frame_time(&long, 500_000) > Duration::from_millis(1));
    }
}
