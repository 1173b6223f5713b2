//! Numbered frames injected on side A's bus and watched arriving on side B's bus, one stream per group,
//! with each frame's latency, loss, duplicates and order.
//!
//! A frame is injected with `SimHandle::inject_bus_frames`, as if dongle A had received it from its
//! bus, and the injection time is kept by sequence number. Its data carries the stream's tag and the
//! sequence number (as in `bridge-demo`'s traffic), so a `BusTap` on side B's bus can tell which frame
//! arrived and when: the latency is the whole path simulator -> agent A -> server -> agent B ->
//! simulator -> bus. Everything runs in one process, so both times come from the same monotonic clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bridge_demo::traffic;
use dongle_sim::{BusTap, Frame, SimHandle};
use firmware_proto::ids::CanId;

/// The CAN id of every benchmark frame.
const ID: u16 = 0x123;

/// The frame carrying `seq` of stream `tag`, numbered as `bridge-demo` numbers its frames.
pub fn frame(tag: u8, seq: u32) -> Frame {
    traffic::numbered_frame(CanId::standard(ID).expect("an 11-bit id"), tag, seq)
}

/// What one stream delivered.
#[derive(Debug, Clone, Default)]
pub struct FlowResult {
    pub sent: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub latencies: Vec<Duration>,
    /// From the first frame received to the last.
    pub receive_span: Duration,
    /// When each frame arrived, by sequence number, after the run's start (None: never).
    pub arrived_at: Vec<Option<Duration>>,
}

impl FlowResult {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }

    /// Every frame arrived once and in order.
    pub fn clean(&self) -> bool {
        self.lost() == 0 && self.duplicates == 0 && self.out_of_order == 0
    }

    /// The `q` quantile of the latencies (nearest rank), or zero without any.
    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }
}

/// The `q` quantile of `values` (nearest rank), or zero without any.
pub fn quantile(values: &[Duration], q: f64) -> Duration {
    traffic::quantile(values, q).unwrap_or_default()
}

/// Milliseconds with two decimals, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// One stream: where frames go in, and the tap on the far bus where they come out.
pub struct Stream<'a> {
    pub inject: &'a SimHandle,
    pub rx: BusTap,
}

/// How the frames are sent.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Frames per second per stream.
    pub rate: u32,
    /// How long frames are sent.
    pub duration: Duration,
    /// Once sending stops, how long to wait for the rest while nothing arrives.
    pub settle: Duration,
    /// Frames injected per call at most: 1 ms worth at the bus rate is what a real dongle hands over.
    pub burst: usize,
}

/// Sends every stream's frames at `pace.rate` for `pace.duration`, and collects what arrives. With
/// `trace`, every frame's passage through the bridge's hops is recorded too ([`hop_table`]).
pub async fn run(
    streams: Vec<Stream<'_>>,
    pace: Pace,
    trace: bool,
) -> (Vec<FlowResult>, Option<HopTable>) {
    let count = (f64::from(pace.rate) * pace.duration.as_secs_f64()).ceil() as usize;
    let base = Instant::now();
    if trace {
        hops::enable(
            base,
            u8::try_from(streams.len()).unwrap_or(u8::MAX),
            u32::try_from(count).unwrap_or(u32::MAX),
        );
    }
    // Injection times in nanoseconds after `base`, plus one so that zero means "not sent yet".
    let sent_at: Vec<Arc<Vec<AtomicU64>>> = streams
        .iter()
        .map(|_| Arc::new((0..count).map(|_| AtomicU64::new(0)).collect()))
        .collect();
    let progress: Vec<Arc<AtomicU64>> = streams
        .iter()
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut injectors = Vec::with_capacity(streams.len());
    let mut receivers = Vec::with_capacity(streams.len());
    for (i, stream) in streams.into_iter().enumerate() {
        injectors.push(stream.inject);
        receivers.push(tokio::spawn(receive(
            stream.rx,
            i as u8,
            base,
            sent_at[i].clone(),
            progress[i].clone(),
            stop_rx.clone(),
        )));
    }

    // Frames go out on a 1 ms tick, each stream's due frames in bursts of at most `burst`, so any rate
    // is kept on average and a late tick catches up.
    let start = Instant::now();
    let mut next = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut frames = Vec::with_capacity(pace.burst.max(1));
    while next < count {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * f64::from(pace.rate)) as usize + 1).min(count);
        while next < due {
            let upto = due.min(next + pace.burst.max(1));
            for (i, sim) in injectors.iter().enumerate() {
                frames.clear();
                frames.extend((next..upto).map(|seq| frame(i as u8, seq as u32)));
                let at = base.elapsed().as_nanos() as u64 + 1;
                for slot in &sent_at[i][next..upto] {
                    slot.store(at, Ordering::Relaxed);
                }
                hops::mark_all(hops::Hop::Injected, frames.iter().map(Frame::data));
                sim.inject_bus_frames(&frames);
            }
            next = upto;
        }
    }

    // Stragglers: wait while frames still arrive, up to `settle` of silence.
    let total = |p: &[Arc<AtomicU64>]| p.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let wanted = (count * injectors.len()) as u64;
    let mut last = total(&progress);
    let mut quiet_since = Instant::now();
    while last < wanted && quiet_since.elapsed() < pace.settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = total(&progress);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    let _ = stop_tx.send(true);
    let mut results = Vec::with_capacity(receivers.len());
    for r in receivers {
        let mut result = r.await.unwrap_or_default();
        result.sent = count as u64;
        results.push(result);
    }
    let table = trace.then(|| HopTable::of(&hops::finish()));
    (results, table)
}

/// Where frames spent their time, hop by hop: per segment of the path, the quantiles of the time
/// between a frame passing the hop before and passing this one, over the frames that passed both.
#[derive(Debug, Clone)]
pub struct HopTable {
    /// Per hop after the first: the segment's time for every frame that passed both ends.
    pub segments: Vec<(hops::Hop, Vec<Duration>)>,
    /// Frames that passed every hop.
    pub complete: usize,
    pub frames: usize,
}

impl HopTable {
    pub fn of(marks: &[Vec<[Option<Duration>; hops::Hop::ALL.len()]>]) -> Self {
        let frames: Vec<_> = marks.iter().flatten().collect();
        let segments = hops::Hop::ALL
            .windows(2)
            .map(|pair| {
                let (from, to) = (pair[0] as usize, pair[1] as usize);
                let times = frames
                    .iter()
                    .filter_map(|m| Some(m[to]?.saturating_sub(m[from]?)))
                    .collect();
                (pair[1], times)
            })
            .collect();
        HopTable {
            segments,
            complete: frames
                .iter()
                .filter(|m| m.iter().all(Option::is_some))
                .count(),
            frames: frames.len(),
        }
    }

    /// The table as text: one line per segment with p50, p99 and max in milliseconds.
    pub fn render(&self) -> String {
        let mut out = format!(
            "    hop by hop ({} of {} frames passed every hop; each row: time since the hop before)\n",
            self.complete, self.frames
        );
        for (hop, times) in &self.segments {
            out.push_str(&format!(
                "    {:<14} p50 {:>7} ms  p99 {:>7} ms  max {:>7} ms  {}\n",
                format!("{hop:?}"),
                ms(quantile(times, 0.5)),
                ms(quantile(times, 0.99)),
                ms(times.iter().max().copied().unwrap_or_default()),
                hop.segment(),
            ));
        }
        out
    }
}

async fn receive(
    mut rx: BusTap,
    tag: u8,
    base: Instant,
    sent_at: Arc<Vec<AtomicU64>>,
    progress: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> FlowResult {
    let count = sent_at.len();
    let mut r = FlowResult {
        latencies: Vec::with_capacity(count),
        arrived_at: vec![None; count],
        ..FlowResult::default()
    };
    let mut arrivals = traffic::Arrivals::new(u32::try_from(count).unwrap_or(u32::MAX));
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while r.delivered < count as u64 {
        let frame = tokio::select! {
            frame = rx.recv() => match frame {
                Ok(frame) => frame,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let now = Instant::now();
        hops::mark(hops::Hop::OnBus, frame.data());
        let Some(seq) = traffic::sequence_of(&frame, tag) else {
            continue;
        };
        if !arrivals.arrive(seq) {
            continue;
        }
        let at = sent_at[seq as usize].load(Ordering::Relaxed);
        if at > 0 {
            let sent = base + Duration::from_nanos(at - 1);
            r.latencies.push(now.saturating_duration_since(sent));
        }
        r.arrived_at[seq as usize] = Some(now.saturating_duration_since(base));
        first.get_or_insert(now);
        last = now;
        r.delivered += 1;
        progress.store(r.delivered, Ordering::Relaxed);
    }
    r.receive_span = first.map_or(Duration::ZERO, |f| last.saturating_duration_since(f));
    r.duplicates = arrivals.duplicates;
    r.out_of_order = arrivals.out_of_order;
    r
}

/// Injects frames `seqs` of stream `tag` into `sim` at `rate` frames/s, in bursts of at most `burst`
/// on a 1 ms tick, recording each injection time in `sent_at` (nanoseconds after `base`, plus one).
pub async fn inject_paced(
    sim: &SimHandle,
    tag: u8,
    seqs: std::ops::Range<usize>,
    rate: u32,
    burst: usize,
    base: Instant,
    sent_at: &[AtomicU64],
) {
    let start = Instant::now();
    let first = seqs.start;
    let mut next = seqs.start;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut frames = Vec::with_capacity(burst.max(1));
    while next < seqs.end {
        tick.tick().await;
        let due =
            (first + (start.elapsed().as_secs_f64() * f64::from(rate)) as usize + 1).min(seqs.end);
        while next < due {
            let upto = due.min(next + burst.max(1));
            frames.clear();
            frames.extend((next..upto).map(|seq| frame(tag, seq as u32)));
            let at = base.elapsed().as_nanos() as u64 + 1;
            for slot in sent_at.get(next..upto).into_iter().flatten() {
                slot.store(at, Ordering::Relaxed);
            }
            sim.inject_bus_frames(&frames);
            next = upto;
        }
    }
}

/// One stream whose frames are injected in several parts (say, some while the far side is away and
/// the rest after it is back) and collected on the far bus throughout.
pub struct Tracker {
    tag: u8,
    base: Instant,
    sent_at: Arc<Vec<AtomicU64>>,
    progress: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<FlowResult>,
}

impl Tracker {
    /// Starts collecting `count` frames of stream `tag` from `rx`.
    pub fn start(rx: BusTap, tag: u8, count: usize) -> Self {
        let base = Instant::now();
        let sent_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
        let progress = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(receive(
            rx,
            tag,
            base,
            sent_at.clone(),
            progress.clone(),
            stop_rx,
        ));
        Self {
            tag,
            base,
            sent_at,
            progress,
            stop,
            task,
        }
    }

    /// The moment the tracker's times count from.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Injects frames `seqs` into `sim` at `rate` frames/s.
    pub async fn inject(&self, sim: &SimHandle, seqs: std::ops::Range<usize>, rate: u32) {
        inject_paced(sim, self.tag, seqs, rate, 64, self.base, &self.sent_at).await;
    }

    /// Frames received so far.
    pub fn delivered(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Waits for every frame, or `settle` without a new one, or `limit` in all; answers what arrived.
    pub async fn finish(self, settle: Duration, limit: Duration) -> FlowResult {
        let wanted = self.sent_at.len() as u64;
        let started = Instant::now();
        let mut last = self.delivered();
        let mut quiet_since = Instant::now();
        while last < wanted && quiet_since.elapsed() < settle && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.delivered();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
        let _ = self.stop.send(true);
        let mut result = self.task.await.unwrap_or_default();
        result.sent = self
            .sent_at
            .iter()
            .filter(|t| t.load(Ordering::Relaxed) > 0)
            .count() as u64;
        result
    }
}
