//! Frames from the server on their way to dongles: one lane per group side, so that a dongle whose bus
//! is slow (the session paces frames to its bitrate, see `bus_pace`) holds up only its own side, never
//! another side's frames or the acknowledgements the connection reads.
//!
//! A lane takes the FRAMES messages of its side in order and hands them to the side's device in slices
//! of [`SLICE`] frames; what the device took is acknowledged (the latest acknowledgement per side, for
//! the connection to send). A lane holds at most [`LANE_FRAMES`] frames: more than the server sends
//! towards one side without its acknowledgement (its in-flight limit, 20 000 frames, live and replayed
//! alike), so that a server that keeps to it never waits on a lane; one that does not is held up (its
//! socket is not read) rather than given memory without end.
//!
//! When the connection closes, the lanes stop at the end of the slice they are handing over: what they
//! still hold is not acknowledged, so the server sends it again on the next connection, and the frames
//! below the position delivered are skipped then. A slice is never cut in half, which would put part of
//! it on the bus without anyone knowing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::data::{self, Side};
use firmware_proto::ids::DeviceId;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::Shared;
use super::device::{Handed, Rest};
use super::probe::{Split, looks_like_probe};
use crate::frame::Frame;

/// The most frames waiting in one lane.
pub const LANE_FRAMES: usize = 32_768;
/// The most frames handed to a device at once: at most about a second of a slow bus's time, which is
/// what a closing connection waits for.
const SLICE: usize = 16;
/// The most lanes on one connection (sides served at once); frames for more sides wait like frames for
/// a side the agent does not know.
const MAX_LANES: usize = 4096;
/// How long a closing connection waits for its lanes to finish their slice (a dongle whose link hangs
/// is cut off; its slice is then sent again).
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The latest acknowledgement message per side, for the connection to send.
pub(super) type LatestAcks = HashMap<(Uuid, Side), Vec<u8>>;
/// The sides stalled on the current connection, and since when.
pub(super) type Stalled = HashMap<(Uuid, Side), tokio::time::Instant>;

/// What became of frames from the server for a side.
enum Delivery {
    /// All of them are on the dongle's link (or skipped as already delivered, or refused for good and
    /// counted as dropped): acknowledge with this message.
    Ack(Vec<u8>),
    /// The dongle could not take them (all, or those after the acknowledged part): the side stalls.
    Stalled(Option<Vec<u8>>),
    /// No such side here (the group list has not arrived yet, or it left).
    UnknownSide,
}

/// The lanes of one data connection, and what they report to it.
pub(super) struct Downstream {
    shared: Arc<Shared>,
    lanes: HashMap<(Uuid, Side), Lane>,
    /// The latest acknowledgement per side, for the connection to send.
    pub acks: Arc<Mutex<LatestAcks>>,
    /// Wakes the connection when `acks` has something.
    pub acks_ready: Arc<Notify>,
    /// The sides stalled on this connection, and since when.
    pub stalled: Arc<Mutex<Stalled>>,
    /// The connection is closing: lanes stop at the end of their slice.
    closing: Arc<AtomicBool>,
}

struct Lane {
    tx: mpsc::UnboundedSender<Message>,
    room: Arc<Semaphore>,
    task: JoinHandle<()>,
}

/// One FRAMES message for a side: the position of its first frame, and the frames.
struct Message {
    first: u64,
    frames: Vec<Frame>,
    /// The lane's room these frames take, given back when they are handled.
    _room: OwnedSemaphorePermit,
}

/// What a lane reports to its connection.
#[derive(Clone)]
struct Reports {
    acks: Arc<Mutex<LatestAcks>>,
    acks_ready: Arc<Notify>,
    stalled: Arc<Mutex<Stalled>>,
    closing: Arc<AtomicBool>,
}

impl Reports {
    fn stall(&self, key: (Uuid, Side)) {
        self.stalled
            .lock()
            .unwrap()
            .insert(key, tokio::time::Instant::now());
    }
}

impl Downstream {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            lanes: HashMap::new(),
            acks: Arc::default(),
            acks_ready: Arc::new(Notify::new()),
            stalled: Arc::default(),
            closing: Arc::default(),
        }
    }

    fn reports(&self) -> Reports {
        Reports {
            acks: self.acks.clone(),
            acks_ready: self.acks_ready.clone(),
            stalled: self.stalled.clone(),
            closing: self.closing.clone(),
        }
    }

    /// Queues frames from the server for a side, waiting only while that side's lane is full.
    pub async fn hand(&mut self, group_id: Uuid, side: Side, first: u64, frames: Vec<Frame>) {
        let key = (group_id, side);
        if !self.lanes.contains_key(&key) && self.lanes.len() >= MAX_LANES {
            // Not acknowledged: the server sends them again on the next connection.
            self.reports().stall(key);
            return;
        }
        let reports = self.reports();
        let lane = self
            .lanes
            .entry(key)
            .or_insert_with(|| Lane::start(&self.shared, key, reports));
        // A message of no frames still takes a place, so that such messages cannot pile up.
        let n = frames.len().clamp(1, LANE_FRAMES) as u32;
        let Ok(room) = lane.room.clone().acquire_many_owned(n).await else {
            return;
        };
        let message = Message {
            first,
            frames,
            _room: room,
        };
        if lane.tx.send(message).is_err() {
            // The lane's task ended (it cannot, short of a panic): the side waits for the next
            // connection rather than lose these frames' place.
            tracing::error!(%group_id, ?side, "a side's lane to its dongle ended");
            self.reports().stall(key);
        }
    }

    /// Closes the lanes: each finishes the slice it is handing over and drops the rest (unacknowledged,
    /// so the server sends it again). A lane whose device does not finish `within` is cut off.
    pub async fn finish(self, within: Duration) {
        self.closing.store(true, Ordering::Relaxed);
        let tasks: Vec<JoinHandle<()>> = self
            .lanes
            .into_values()
            .map(|lane| {
                drop(lane.tx);
                lane.task
            })
            .collect();
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(within, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            for abort in aborts {
                abort.abort();
            }
        }
    }
}

impl Lane {
    fn start(shared: &Arc<Shared>, key: (Uuid, Side), reports: Reports) -> Lane {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let shared = shared.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                hand_over(&shared, key, &message, &reports).await;
                reports.acks_ready.notify_one();
            }
        });
        Lane {
            tx,
            room: Arc::new(Semaphore::new(LANE_FRAMES)),
            task,
        }
    }
}

/// Hands one message to the side's device, slice after slice, and keeps the acknowledgement of what it
/// took. Stops at a stall, and when the connection closes.
async fn hand_over(shared: &Shared, key: (Uuid, Side), message: &Message, reports: &Reports) {
    let (group_id, side) = key;
    let mut first = message.first;
    for slice in message.frames.chunks(SLICE) {
        // Not acknowledged: the server sends these again on the next connection.
        if reports.closing.load(Ordering::Relaxed)
            || reports.stalled.lock().unwrap().contains_key(&key)
        {
            return;
        }
        let ack = match shared.to_dongle(group_id, side, first, slice).await {
            Delivery::Ack(ack) => Some(ack),
            Delivery::Stalled(ack) => {
                tracing::info!(%group_id, ?side, "the side's dongle cannot take frames now: they stay with the server until it can");
                reports.stall(key);
                ack
            }
            // Frames for a side whose `groups` list has not arrived yet (it comes over the control
            // connection, they over this one): delivering later ones would let their acknowledgement
            // cover these, so the side stalls until the list is here.
            Delivery::UnknownSide => {
                reports.stall(key);
                None
            }
        };
        if let Some(ack) = ack {
            reports.acks.lock().unwrap().insert(key, ack);
        }
        first += slice.len() as u64;
    }
}

/// What became of frames from the server for a side's dongle.
#[derive(Default)]
struct Handover {
    /// Frames now on the dongle's link.
    delivered: usize,
    /// Frames that could never go (counted as dropped).
    refused: usize,
    /// Frames disposed of from the first on: the delivered and refused ones, and latency probes.
    disposed: usize,
    /// The dongle could not take the frames after the disposed ones.
    stalled: bool,
}

impl Handover {
    /// What a device did with `n` frames.
    fn of(n: usize, handed: Handed) -> Self {
        let delivered = handed.delivered;
        let (refused, stalled) = match handed.rest {
            Rest::None => (0, false),
            Rest::Refused => (n - delivered, false),
            Rest::Stalled => (0, true),
        };
        Self {
            delivered,
            refused,
            disposed: delivered + refused,
            stalled,
        }
    }
}

impl Shared {
    async fn hand_to_device(&self, device_id: DeviceId, frames: &[Frame]) -> Handed {
        match self.devices.get(&device_id) {
            Some(device) if self.can_deliver_to(&device) => device.send_frames(frames).await,
            _ => Handed::new(0, Rest::Stalled),
        }
    }

    /// Hands frames to a side's dongle while a latency run is armed for the side: the run's probes
    /// never reach the bus (an echoing side sends them back into its own stream, the sender counts
    /// them), and the frames between them go to the dongle as usual, in order. Each stretch is recorded
    /// as it is done (the frames of `frames` start at position `first`), since a lane cut off between
    /// two stretches must not forget frames already on the bus; the answer therefore carries only how
    /// many were disposed of, and whether the dongle stalled.
    async fn hand_with_probes(
        &self,
        group_id: Uuid,
        side: Side,
        device_id: DeviceId,
        split: &Split,
        frames: &[Frame],
        first: u64,
    ) -> Handover {
        let mut total = Handover::default();
        let mut rest = frames;
        while !rest.is_empty() {
            let real = rest.iter().take_while(|f| !split.is_probe(f)).count();
            if real > 0 {
                let handed =
                    Handover::of(real, self.hand_to_device(device_id, &rest[..real]).await);
                total.disposed += handed.disposed;
                self.data.disposed_inbound(
                    group_id,
                    side,
                    handed.delivered,
                    handed.refused,
                    first + total.disposed as u64,
                );
                if handed.stalled {
                    total.stalled = true;
                    break;
                }
                rest = &rest[real..];
            }
            let probes = rest.iter().take_while(|f| split.is_probe(f)).count();
            let echoes = split.take(&rest[..probes]);
            if !echoes.is_empty() {
                self.data.inject(group_id, side, &echoes);
            }
            total.disposed += probes;
            self.data
                .disposed_inbound(group_id, side, 0, 0, first + total.disposed as u64);
            rest = &rest[probes..];
        }
        total
    }

    /// Hands frames from the server to the dongle of `side`, and says what to acknowledge: only frames
    /// that are on the dongle's link (or the endpoint) are, and everything after a frame the dongle
    /// could not take waits for the next connection.
    async fn to_dongle(
        &self,
        group_id: Uuid,
        side: Side,
        first: u64,
        frames: &[Frame],
    ) -> Delivery {
        let Some((device_id, expected)) = self.data.inbound(group_id, side) else {
            return Delivery::UnknownSide;
        };
        // Frames below the expected position arrived before (a resend after a reconnect).
        let skip = expected.saturating_sub(first) as usize;
        let fresh = frames.get(skip..).unwrap_or(&[]);
        let skipped_to = first + skip.min(frames.len()) as u64;
        // Only a slice with a frame of a probe's shape may hold a latency run's probes, and only while
        // the agent holds a run (one atomic load otherwise).
        let split = if self.probes.any() && fresh.iter().any(looks_like_probe) {
            self.probes.split(group_id, side)
        } else {
            None
        };
        let handed = match split {
            _ if fresh.is_empty() => Handover::default(),
            Some(split) => {
                self.hand_with_probes(group_id, side, device_id, &split, fresh, skipped_to)
                    .await
            }
            None => Handover::of(fresh.len(), self.hand_to_device(device_id, fresh).await),
        };
        let Handover {
            delivered,
            refused,
            disposed,
            stalled,
        } = handed;
        // The position after what this call disposed of: delivered frames, refused ones after them,
        // and latency probes. (`hand_with_probes` recorded its frames as it went, and answers no
        // counts: this record then only confirms the position.)
        let next = skipped_to + disposed as u64;
        self.data
            .disposed_inbound(group_id, side, delivered, refused, next);
        let ack = data::encode_ack(group_id, side, next);
        if stalled {
            Delivery::Stalled((next > first).then_some(ack))
        } else {
            Delivery::Ack(ack)
        }
    }
}
