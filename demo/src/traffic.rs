//! Frames through the bridge: handed to one dongle as received from its bus at a set rate, received
//! from the other dongle's bus, with each frame's latency and order checked.
//!
//! The frames enter through [`SimHandle::inject_bus_frames`] rather than through a tap on the sending
//! bus. A tap is a member of its bus, and the dongle on that bus sends every frame it transmits (the
//! other direction's) to each member; a tap that only sends never reads them, its socket queue fills
//! after ten datagrams, and from then on each of the dongle's bus writes waits out the bus's 200 ms send
//! timeout for it. That capped each bus at about 160 frames a second and held up the frames for the
//! tap that did read and measured by seconds, so the demo measured its own harness, not the bridge.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dongle_sim::{BusTap, Frame, SimHandle};
use firmware_proto::ids::CanId;

/// What one direction of one phase delivered.
#[derive(Debug, Clone, Default)]
pub struct Flow {
    pub sent: u64,
    pub delivered: u64,
    /// Frames that arrived after a later one.
    pub out_of_order: u64,
    /// Frames that arrived twice.
    pub duplicates: u64,
    pub latencies: Vec<Duration>,
}

impl Flow {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }

    /// The `q` quantile of the latencies (0.5 for the median).
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        quantile(&self.latencies, q)
    }
}

/// The `q` quantile of `values` (nearest rank; 0.5 for the median), or None without any; sorts a copy.
pub fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let index = ((sorted.len().checked_sub(1)?) as f64 * q).round() as usize;
    sorted.get(index.min(sorted.len() - 1)).copied()
}

/// The frame carrying `seq` of stream `stream`: the stream's tag in the first data byte, the sequence
/// number in the next four. The benchmarks number their frames the same way. Five bytes, no more: a
/// 1 Mbit/s bus carries 9 000 such frames a second even when each is stuffed the most (105 bits).
pub fn numbered_frame(id: CanId, stream: u8, seq: u32) -> Frame {
    let s = seq.to_be_bytes();
    Frame::classic(id, &[stream, s[0], s[1], s[2], s[3]]).expect("5 bytes fit")
}

/// The sequence number of a [`numbered_frame`] of stream `stream`, or None for any other frame.
pub fn sequence_of(frame: &Frame, stream: u8) -> Option<u32> {
    match *frame.data() {
        [tag, a, b, c, d] if tag == stream => Some(u32::from_be_bytes([a, b, c, d])),
        _ => None,
    }
}

/// One stream of numbered frames.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    /// The CAN id of every frame.
    pub id: CanId,
    /// Tells this stream's frames from others with the same id (the first data byte).
    pub tag: u8,
    pub count: u32,
    /// Frames per second.
    pub rate: u32,
    /// How long to wait for stragglers once the frames stop arriving.
    pub settle: Duration,
}

/// Hands `s.count` frames to the dongle `tx` at `s.rate` frames per second, as if its bus carried them,
/// while `rx` collects them on the far bus; waits while they keep arriving, up to `s.settle` of silence.
/// `on_progress` sees the number delivered so far.
pub async fn run(
    tx: &SimHandle,
    rx: BusTap,
    s: Stream,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Flow {
    let Stream {
        id,
        tag: stream,
        count,
        rate,
        settle,
    } = s;
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; count as usize]));
    let (done_tx, done_rx) = tokio::sync::watch::channel(0u64);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = {
        let sent_at = sent_at.clone();
        tokio::spawn(receive(rx, id, stream, count, sent_at, done_tx, stop_rx))
    };
    let mut flow = Flow::default();
    // Frames go out in small bursts on a 1 ms tick, so any rate up to the bus's own is kept on average.
    let start = Instant::now();
    let mut next = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while next < count {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as u32 + 1).min(count);
        if next < due {
            // The frames due in this tick arrive together, as on a busy bus.
            let burst: Vec<Frame> = (next..due)
                .map(|seq| numbered_frame(id, stream, seq))
                .collect();
            let now = Instant::now();
            sent_at.lock().unwrap()[next as usize..due as usize].fill(Some(now));
            tx.inject_bus_frames(&burst);
            flow.sent += u64::from(due - next);
            next = due;
        }
        on_progress(*done_rx.borrow());
    }
    // Stragglers: wait while frames still arrive, up to `settle` of silence.
    let mut last = *done_rx.borrow();
    let mut quiet_since = Instant::now();
    while last < u64::from(count) && quiet_since.elapsed() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = *done_rx.borrow();
        if now != last {
            last = now;
            quiet_since = Instant::now();
            on_progress(now);
        }
    }
    let _ = stop_tx.send(());
    if let Ok(r) = receiver.await {
        flow.delivered = r.delivered;
        flow.out_of_order = r.out_of_order;
        flow.duplicates = r.duplicates;
        flow.latencies = r.latencies;
    }
    flow
}

#[derive(Default)]
struct Received {
    delivered: u64,
    out_of_order: u64,
    duplicates: u64,
    latencies: Vec<Duration>,
}

async fn receive(
    mut rx: BusTap,
    id: CanId,
    stream: u8,
    count: u32,
    sent_at: Arc<Mutex<Vec<Option<Instant>>>>,
    progress: tokio::sync::watch::Sender<u64>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Received {
    let mut r = Received::default();
    let mut arrivals = Arrivals::new(count);
    while r.delivered < u64::from(count) {
        let frame = tokio::select! {
            frame = rx.recv() => match frame {
                Ok(frame) => frame,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let Some(seq) = sequence_of(&frame, stream).filter(|_| frame.id() == id) else {
            continue;
        };
        if !arrivals.arrive(seq) {
            continue;
        }
        if let Some(at) = sent_at.lock().unwrap()[seq as usize] {
            r.latencies.push(at.elapsed());
        }
        r.delivered += 1;
        progress.send_replace(r.delivered);
    }
    r.duplicates = arrivals.duplicates;
    r.out_of_order = arrivals.out_of_order;
    r
}

/// The sequence numbers of one numbered stream as they arrive: which came, which came twice, which
/// came after a higher one. Shared with the benchmarks, which number their frames the same way.
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use firmware_proto::ids::CanId;

    use super::{Arrivals, numbered_frame, quantile, sequence_of};

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
    fn a_numbered_frame_gives_back_its_sequence_number_for_its_stream_only() {
        let f = numbered_frame(CanId::standard(0x123).unwrap(), 7, 0x0102_0304);
        assert_eq!(sequence_of(&f, 7), Some(0x0102_0304));
        assert_eq!(sequence_of(&f, 8), None, "another stream's frame");
        let short =
            dongle_sim::Frame::classic(CanId::standard(0x123).unwrap(), &[7, 1, 2]).unwrap();
        assert_eq!(sequence_of(&short, 7), None, "not a numbered frame");
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
