//! The dongles whose console somebody watches, and the sample of their own traffic that goes to the
//! server as MONITOR messages (`control_proto::data`). Pure: the time comes from the caller.
//!
//! A watch comes from the server ([`Watch`]) and lasts its `seconds` unless repeated, so a console that
//! closes, a server that goes away or an instance that crashes stops the upload on its own. While a
//! dongle is watched, every frame it receives is counted, and at most [`RATE`] a second are kept to be
//! sent: above it one frame in N (N from the previous second's count), so a busy bus costs the link to
//! the server a few hundred frames a second at most, and the counts in each message stay exact.
//!
//! Grouped dongles are not monitored here: their frames go to the group's stream, every one of them,
//! and the relay shows them on the console; the caller asks [`Monitors::take`] only for the others.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use control_proto::Watch;
use control_proto::data::{self, Direction};
use firmware_proto::ext::batch::BatchWriter;
use firmware_proto::ids::DeviceId;
use tokio::time::Instant;

use crate::frame::Frame;

/// The most frames a second of one dongle that are kept for its console; the server's console shows
/// no more than this either.
pub const RATE: u64 = 200;
/// The most kept frames of one dongle waiting to be sent; past it, kept frames are dropped (and still
/// counted as seen).
const QUEUE: usize = 1024;
/// The most dongles watched at once, whatever a server asks.
const MAX_WATCHED: usize = 1024;
/// The most frames in one MONITOR message.
const FRAMES_PER_MESSAGE: usize = 512;

/// Counters of the monitor, for `status` and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MonitorCounts {
    /// Frames of watched dongles seen.
    pub seen: u64,
    /// Frames sent to the server for consoles.
    pub sent: u64,
}

struct Watched {
    until: Instant,
    /// Frames seen since the last message.
    seen: u64,
    kept: VecDeque<Frame>,
    /// The current one-second window: when it began, the frames seen and kept in it.
    window_start: Instant,
    window_seen: u64,
    window_kept: u64,
    /// One frame in `every` is kept in this window, from the previous window's count.
    every: u64,
    /// Frames seen since the last one kept.
    since_kept: u64,
}

impl Watched {
    fn new(now: Instant, until: Instant) -> Self {
        Self {
            until,
            seen: 0,
            kept: VecDeque::new(),
            window_start: now,
            window_seen: 0,
            window_kept: 0,
            every: 1,
            since_kept: 0,
        }
    }

    fn take(&mut self, now: Instant, frame: &Frame) {
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.every = self.window_seen.div_ceil(RATE).max(1);
            self.window_start = now;
            self.window_seen = 0;
            self.window_kept = 0;
        }
        self.window_seen += 1;
        self.seen += 1;
        self.since_kept += 1;
        // One in `every`, spread over the window, and never more than the rate: a burst on a quiet
        // bus (when `every` is still 1) keeps its first frames and then waits for the next window.
        if self.since_kept < self.every || self.window_kept >= RATE {
            return;
        }
        self.since_kept = 0;
        self.window_kept += 1;
        if self.kept.len() < QUEUE {
            self.kept.push_back(*frame);
        }
    }
}

/// The watched dongles of one agent.
#[derive(Default)]
pub struct Monitors {
    watched: HashMap<DeviceId, Watched>,
    counts: MonitorCounts,
}

impl Monitors {
    /// Applies a watch from the server: the dongles it names are watched for its `seconds` (at most
    /// [`control_proto::MAX_WATCH_SECS`]), or no longer with 0.
    pub fn watch(&mut self, watch: &Watch, now: Instant) {
        let seconds = watch.seconds.min(control_proto::MAX_WATCH_SECS);
        let until = now + Duration::from_secs(u64::from(seconds));
        for &device_id in &watch.device_ids {
            if seconds == 0 {
                self.watched.remove(&device_id);
                continue;
            }
            if let Some(w) = self.watched.get_mut(&device_id) {
                w.until = w.until.max(until);
            } else if self.watched.len() < MAX_WATCHED {
                self.watched.insert(device_id, Watched::new(now, until));
            }
        }
    }

    /// Whether any dongle is watched now.
    pub fn any(&self, now: Instant) -> bool {
        self.watched.values().any(|w| w.until > now)
    }

    /// Takes frames `device_id` received, when it is watched; false when it is not.
    pub fn take(&mut self, device_id: DeviceId, frames: &[Frame], now: Instant) -> bool {
        let Some(w) = self.watched.get_mut(&device_id).filter(|w| w.until > now) else {
            return false;
        };
        for frame in frames {
            w.take(now, frame);
        }
        self.counts.seen += frames.len() as u64;
        true
    }

    /// The MONITOR messages to send now; expired watches are forgotten (what they still held is sent
    /// first).
    pub fn outgoing(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        let mut buf = Vec::new();
        for (device_id, w) in &mut self.watched {
            while w.seen > 0 {
                buf.resize(data::MAX_MESSAGE_LEN - data::HEADER_LEN, 0);
                let Ok(mut writer) = BatchWriter::new(&mut buf) else {
                    break;
                };
                let mut count = 0;
                for frame in w.kept.iter().take(FRAMES_PER_MESSAGE) {
                    if writer.push(&frame.record()).is_err() {
                        break;
                    }
                    count += 1;
                }
                let Ok(len) = writer.finish() else { break };
                w.kept.drain(..count);
                // The frames not kept (sampled out, or a full queue) are told with the last message of
                // the turn, so `seen` covers every frame exactly once.
                let seen = if w.kept.is_empty() {
                    std::mem::take(&mut w.seen)
                } else {
                    w.seen -= count as u64;
                    count as u64
                };
                messages.push(data::encode_monitor(
                    *device_id,
                    Direction::Rx,
                    seen,
                    &buf[..len],
                ));
                self.counts.sent += count as u64;
            }
        }
        self.watched.retain(|_, w| w.until > now);
        messages
    }

    pub fn counts(&self) -> MonitorCounts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_proto::data::AnyMessage;
    use firmware_proto::ids::CanId;

    fn frame(i: u16) -> Frame {
        Frame::classic(CanId::standard(0x100).unwrap(), &i.to_be_bytes()).unwrap()
    }

    fn dev() -> DeviceId {
        "00000000000000d1".parse().unwrap()
    }

    fn watch(seconds: u32) -> Watch {
        Watch {
            device_ids: vec![dev()],
            seconds,
        }
    }

    /// (frames seen, frames carried) over the messages.
    fn totals(messages: &[Vec<u8>]) -> (u64, u64) {
        messages.iter().fold((0, 0), |(seen, sent), m| {
            let AnyMessage::Monitor(m) = AnyMessage::decode(m).unwrap() else {
                panic!("a MONITOR message");
            };
            assert_eq!(m.device_id, dev());
            (seen + m.seen, sent + m.batch.len() as u64)
        })
    }

    #[test]
    fn only_watched_dongles_are_taken_and_a_watch_expires_unless_repeated() {
        let t0 = Instant::now();
        let mut m = Monitors::default();
        assert!(!m.take(dev(), &[frame(0)], t0), "not watched yet");
        m.watch(&watch(6), t0);
        assert!(m.any(t0));
        assert!(m.take(dev(), &[frame(1), frame(2)], t0));
        assert_eq!(totals(&m.outgoing(t0)), (2, 2));
        assert!(m.outgoing(t0).is_empty(), "each frame is sent once");
        // Repeated before it ends: still watched past the first end.
        m.watch(&watch(6), t0 + Duration::from_secs(4));
        assert!(m.take(dev(), &[frame(3)], t0 + Duration::from_secs(8)));
        // Not repeated: over.
        let end = t0 + Duration::from_secs(11);
        assert!(!m.take(dev(), &[frame(4)], end));
        assert_eq!(totals(&m.outgoing(end)), (1, 1), "what it held still goes");
        assert!(!m.any(end));
        assert!(m.watched.is_empty());
    }

    #[test]
    fn a_watch_of_zero_seconds_stops_at_once_and_no_server_asks_for_more_than_the_cap() {
        let t0 = Instant::now();
        let mut m = Monitors::default();
        m.watch(&watch(u32::MAX), t0);
        let cap = Duration::from_secs(u64::from(control_proto::MAX_WATCH_SECS));
        assert!(!m.any(t0 + cap));
        m.watch(&watch(6), t0);
        m.watch(&watch(0), t0);
        assert!(!m.take(dev(), &[frame(0)], t0));
    }

    #[test]
    fn a_busy_bus_is_sampled_and_the_counts_stay_exact() {
        let t0 = Instant::now();
        let mut m = Monitors::default();
        m.watch(&watch(60), t0);
        let mut seen = 0;
        let mut sent = 0;
        // Three seconds of 2 000 frames a second, in 10 ms slices.
        for slice in 0..300u64 {
            let now = t0 + Duration::from_millis(slice * 10);
            let frames: Vec<Frame> = (0..20).map(|i| frame(i as u16)).collect();
            m.take(dev(), &frames, now);
            let (s, c) = totals(&m.outgoing(now));
            seen += s;
            sent += c;
        }
        assert_eq!(seen, 6000, "every frame counted once");
        // The first second keeps its first 200; the next two one in ten of their 2 000 each.
        assert!(
            (3 * RATE - 2..=3 * RATE).contains(&sent),
            "at most the rate each second: {sent} frames kept"
        );
        assert_eq!(m.counts(), MonitorCounts { seen: 6000, sent });
    }

    #[test]
    fn a_full_queue_keeps_the_count_exact() {
        let t0 = Instant::now();
        let mut m = Monitors::default();
        m.watch(&watch(60), t0);
        // A server that does not read for a while: the kept frames wait, bounded.
        for second in 0..20u64 {
            let now = t0 + Duration::from_secs(second);
            let frames: Vec<Frame> = (0..RATE as u16).map(frame).collect();
            m.take(dev(), &frames, now);
        }
        let (seen, sent) = totals(&m.outgoing(t0 + Duration::from_secs(20)));
        assert_eq!(seen, 20 * RATE);
        assert_eq!(sent, QUEUE as u64);
    }
}
