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
/// Shared with the benchmarks and with the agent's latency probes, which count the same way.
pub use hops::tally::{Arrivals, quantile};

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

#[cfg(test)]
mod tests {
    use firmware_proto::ids::CanId;

    use super::{numbered_frame, sequence_of};

    #[test]
    fn a_numbered_frame_gives_back_its_sequence_number_for_its_stream_only() {
        let f = numbered_frame(CanId::standard(0x123).unwrap(), 7, 0x0102_0304);
        assert_eq!(sequence_of(&f, 7), Some(0x0102_0304));
        assert_eq!(sequence_of(&f, 8), None, "another stream's frame");
        let short =
            dongle_sim::Frame::classic(CanId::standard(0x123).unwrap(), &[7, 1, 2]).unwrap();
        assert_eq!(sequence_of(&short, 7), None, "not a numbered frame");
    }
}
