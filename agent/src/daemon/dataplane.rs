//! The data plane of the agent: frames of the dongles in groups, to and from the server over `/ws/data`
//! (the messages are `control_proto::data`'s).
//!
//! Each group side the server assigns ([`GroupSide`]) gets a [`SideState`]: the frames its dongle
//! received that the server has not acknowledged yet (numbered from the server's `next_seq`), and the
//! position of the next frame expected from the server for the dongle. Frames stay until acknowledged,
//! so a dropped connection loses none: the next connection sends again from the first unacknowledged
//! one. The queue is bounded ([`MAX_UNACKED`]); past it new frames are dropped, counted, and the count is
//! reported to the server (DROPS), never silently.
//!
//! Frames from the server are acknowledged only once they are on the dongle's link (or handed to the
//! local endpoint). When a side's dongle cannot take them (unplugged, replugged and not yet
//! authenticated, its link closing), the side *stalls* on this connection: nothing more of it is
//! acknowledged or delivered, so that order holds, and the server keeps what it sent (in flight, then
//! in its durable buffer). Once the dongle is ready again the connection is opened anew, and the server
//! sends everything unacknowledged again from its oldest frame; frames below the position already
//! delivered are skipped, so each reaches the bus once.
//!
//! When the daemon stops, the connection takes its leave rather than vanish ([`farewell`]): the
//! lanes finish their slice and what they delivered is acknowledged, the dongles' frames the server
//! has not acknowledged are sent and waited for, and the server's answer to the close is awaited.
//! The positions delivered live only in this process, so a restarted agent depends on the server
//! never sending again what it acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::data::{self, DataMessage, Kind, Side};
use control_proto::{GroupSide, Groups, Watch};
use firmware_proto::ext::batch::BatchWriter;
use firmware_proto::ids::DeviceId;
use futures::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::Shared;
use super::device::Device;
use super::downstream::{DRAIN_TIMEOUT, Downstream, LatestAcks, Stalled};
use super::monitor::Monitors;
use super::pace::Pace;
use crate::frame::Frame;
use crate::home::Credentials;
use crate::uplink::backoff::Backoff;
use crate::uplink::{control, ws_url};

/// The most frames of one side that may wait for the server's acknowledgement.
pub const MAX_UNACKED: usize = 200_000;
/// The most positions of sides that left the list kept at once (far more groups than one workstation
/// serves); past it they are forgotten together.
const MAX_REMEMBERED: usize = 4096;
/// The most frames in one FRAMES message.
const FRAMES_PER_MESSAGE: usize = 1024;

/// Counters of the data plane, for `status` and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataStats {
    /// Frames from dongles sent to the server (first sends; resends not counted).
    pub frames_up: u64,
    /// Frames from the server handed to dongles.
    pub frames_down: u64,
    /// Frames dropped because a queue was full or the dongle was gone.
    pub dropped: u64,
    /// Frames the dongles themselves reported lost (BUS_STATUS); those of group sides are also in the
    /// side's drop count reported to the server.
    #[serde(default)]
    pub dongle_lost: u64,
    /// Frames from dongles that are in no group and whose console nobody watches.
    pub unrouted: u64,
    /// Frames of dongles in no group whose console somebody watches, all counted...
    #[serde(default)]
    pub console_seen: u64,
    /// ...and those of them sent to the server (a sample above `monitor::RATE` a second per dongle).
    #[serde(default)]
    pub console_sent: u64,
}

struct SideState {
    device_id: DeviceId,
    /// The position of `unacked[0]` (everything below it is acknowledged).
    acked: u64,
    unacked: VecDeque<Frame>,
    /// Frames of `unacked` already sent on the current connection.
    sent: usize,
    /// The position after the last frame ever sent, so that resends after a reconnect are not
    /// counted as frames sent.
    sent_end: u64,
    /// The position of the next frame expected from the server.
    inbound_next: u64,
    dropped: u64,
    dropped_reported: u64,
}

impl SideState {
    /// Queues frames for the server as far as there is room; answers how many did not fit (dropped,
    /// and counted in the side's drops).
    fn queue(&mut self, frames: &[Frame]) -> u64 {
        let room = MAX_UNACKED.saturating_sub(self.unacked.len());
        let taken = frames.len().min(room);
        self.unacked.extend(frames[..taken].iter().copied());
        let dropped = (frames.len() - taken) as u64;
        self.dropped += dropped;
        dropped
    }
}

/// The sides served and their queues.
#[derive(Default)]
pub(super) struct DataPlane {
    sides: Mutex<HashMap<(Uuid, Side), SideState>>,
    /// The position of the next frame expected from the server for sides that left the list (the
    /// dongle was unplugged, say), so that a side coming back skips what its dongle already got
    /// instead of putting it on the bus twice. At most [`MAX_REMEMBERED`] entries.
    remembered: Mutex<HashMap<(Uuid, Side), u64>>,
    stats: Mutex<DataStats>,
    /// The dongles whose console somebody watches.
    monitors: Mutex<Monitors>,
    /// Acknowledgements of frames delivered after the connection they came on closed, for the next one.
    carried_acks: Mutex<LatestAcks>,
    /// Wakes the connection task: frames to send, or the sides or watches changed.
    wake: Notify,
}

impl DataPlane {
    /// The device of a served side and the position of the next frame it expects from the server;
    /// `None` when the side is not served.
    pub(super) fn inbound(&self, group_id: Uuid, side: Side) -> Option<(DeviceId, u64)> {
        let sides = self.sides.lock().unwrap();
        let state = sides.get(&(group_id, side))?;
        Some((state.device_id, state.inbound_next))
    }

    /// Records frames from the server that a side disposed of: `delivered` went onto its bus,
    /// `refused` could never go, and `next` is the position after them.
    pub(super) fn disposed_inbound(
        &self,
        group_id: Uuid,
        side: Side,
        delivered: usize,
        refused: usize,
        next: u64,
    ) {
        {
            let mut stats = self.stats.lock().unwrap();
            stats.frames_down += delivered as u64;
            stats.dropped += refused as u64;
        }
        let mut sides = self.sides.lock().unwrap();
        if let Some(state) = sides.get_mut(&(group_id, side)) {
            state.dropped += refused as u64;
            state.inbound_next = state.inbound_next.max(next);
        } else {
            // The side left the list while these frames went onto its dongle's bus: kept with the
            // positions of the sides that left, so that it skips them if it comes back.
            remember(&mut self.remembered.lock().unwrap(), (group_id, side), next);
        }
    }

    /// Counts frames the dongle `device_id` itself reported lost (`bus_losses`), and with the dropped
    /// frames of its side if it is a group side, for the server to show with the group's figures.
    pub(super) fn dongle_lost(&self, device_id: &DeviceId, lost: u64) {
        self.stats.lock().unwrap().dongle_lost += lost;
        for state in self.sides.lock().unwrap().values_mut() {
            if state.device_id == *device_id {
                state.dropped += lost;
                self.wake.notify_one();
            }
        }
    }

    /// Replaces the served sides with the server's list.
    pub(super) fn set_groups(&self, groups: &Groups) {
        let mut sides = self.sides.lock().unwrap();
        let wanted: HashMap<(Uuid, Side), &GroupSide> = groups
            .sides
            .iter()
            .map(|g| ((g.group_id, g.side), g))
            .collect();
        {
            let mut remembered = self.remembered.lock().unwrap();
            sides.retain(|key, state| {
                let keep = wanted.contains_key(key);
                if !keep && state.inbound_next > 0 {
                    remember(&mut remembered, *key, state.inbound_next);
                }
                keep
            });
        }
        for (key, g) in wanted {
            let device_id = g.device_id;
            let state = sides.entry(key).or_insert_with(|| SideState {
                device_id,
                acked: g.next_seq,
                unacked: VecDeque::new(),
                sent: 0,
                sent_end: g.next_seq,
                inbound_next: self.remembered.lock().unwrap().remove(&key).unwrap_or(0),
                dropped: 0,
                dropped_reported: 0,
            });
            // The server has everything below its next_seq: those frames are acknowledged.
            while state.acked < g.next_seq && state.unacked.pop_front().is_some() {
                state.acked += 1;
                state.sent = state.sent.saturating_sub(1);
            }
            state.acked = state.acked.max(g.next_seq);
        }
        drop(sides);
        self.wake.notify_one();
    }

    /// Applies a watch from the server (dongles whose console somebody watches).
    pub(super) fn watch(&self, watch: &Watch) {
        self.monitors
            .lock()
            .unwrap()
            .watch(watch, tokio::time::Instant::now());
        self.wake.notify_one();
    }

    /// Whether the data plane has anything to carry: a group side, or a watched dongle.
    pub(super) fn has_work(&self) -> bool {
        !self.sides.lock().unwrap().is_empty()
            || self
                .monitors
                .lock()
                .unwrap()
                .any(tokio::time::Instant::now())
    }

    pub(super) fn stats(&self) -> DataStats {
        let counts = self.monitors.lock().unwrap().counts();
        DataStats {
            console_seen: counts.seen,
            console_sent: counts.sent,
            ..*self.stats.lock().unwrap()
        }
    }

    /// Takes frames the dongle `device_id` received: into its group side's stream when it has one,
    /// else into its console's sample when somebody watches it, else they are counted as unrouted.
    pub(super) fn take_from_dongle(&self, device_id: DeviceId, frames: &[Frame]) {
        hops::mark_all(hops::Hop::SenderRead, frames.iter().map(Frame::data));
        let mut sides = self.sides.lock().unwrap();
        let Some(state) = sides.values_mut().find(|s| s.device_id == device_id) else {
            drop(sides);
            let now = tokio::time::Instant::now();
            if self.monitors.lock().unwrap().take(device_id, frames, now) {
                self.wake.notify_one();
            } else {
                self.stats.lock().unwrap().unrouted += frames.len() as u64;
            }
            return;
        };
        let dropped = state.queue(frames);
        drop(sides);
        self.queued(dropped);
    }

    /// Puts frames into the stream of a served side as if its dongle had received them (latency
    /// probes, and their echoes). False when the side is not served here.
    pub(super) fn inject(&self, group_id: Uuid, side: Side, frames: &[Frame]) -> bool {
        let mut sides = self.sides.lock().unwrap();
        let Some(state) = sides.get_mut(&(group_id, side)) else {
            return false;
        };
        let dropped = state.queue(frames);
        drop(sides);
        self.queued(dropped);
        true
    }

    /// After frames were queued for a side: counts what did not fit and wakes the connection.
    fn queued(&self, dropped: u64) {
        if dropped > 0 {
            self.stats.lock().unwrap().dropped += dropped;
        }
        self.wake.notify_one();
    }

    /// Starts a new connection: everything unacknowledged is to be sent again.
    fn rewind(&self) {
        for state in self.sides.lock().unwrap().values_mut() {
            state.sent = 0;
            state.dropped_reported = 0;
        }
    }

    /// The messages to send now: frames not yet sent on this connection, and new drop counts.
    fn outgoing(&self) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        let mut first_sends = 0u64;
        // One scratch buffer for every batch of this call: `encode_frames` copies what it needs.
        let mut buf = Vec::new();
        let mut sides = self.sides.lock().unwrap();
        for ((group_id, side), state) in sides.iter_mut() {
            while state.sent < state.unacked.len() {
                let start = state.sent;
                buf.resize(data::MAX_MESSAGE_LEN - data::HEADER_LEN, 0);
                let Ok(mut writer) = BatchWriter::new(&mut buf) else {
                    break;
                };
                let mut count = 0;
                // `range` starts at `start` directly; `skip` would walk the whole queue each time.
                for frame in state.unacked.range(start..).take(FRAMES_PER_MESSAGE) {
                    if writer.push(&frame.record()).is_err() {
                        break;
                    }
                    count += 1;
                }
                let Ok(len) = writer.finish() else { break };
                if count == 0 {
                    break;
                }
                let position = state.acked + start as u64;
                messages.push(data::encode_frames(*group_id, *side, position, &buf[..len]));
                state.sent += count;
                let end = position + count as u64;
                first_sends += end.saturating_sub(state.sent_end.max(position));
                state.sent_end = state.sent_end.max(end);
            }
            if state.dropped != state.dropped_reported {
                messages.push(data::encode_drops(*group_id, *side, state.dropped));
                state.dropped_reported = state.dropped;
            }
        }
        drop(sides);
        self.stats.lock().unwrap().frames_up += first_sends;
        messages.extend(
            self.monitors
                .lock()
                .unwrap()
                .outgoing(tokio::time::Instant::now()),
        );
        messages
    }

    /// Keeps acknowledgements that could not go on their connection for the next one (the latest per
    /// side: they are cumulative).
    fn carry_acks(&self, acks: LatestAcks) {
        self.carried_acks.lock().unwrap().extend(acks);
    }

    /// The acknowledgements kept for this connection.
    fn take_carried_acks(&self) -> LatestAcks {
        std::mem::take(&mut *self.carried_acks.lock().unwrap())
    }

    /// The frames of the agent's dongles that the server has not acknowledged yet.
    fn unacknowledged(&self) -> usize {
        self.sides
            .lock()
            .unwrap()
            .values()
            .map(|state| state.unacked.len())
            .sum()
    }

    /// The server acknowledged `side`'s frames below `next`.
    fn acknowledged(&self, group_id: Uuid, side: Side, next: u64) {
        let mut sides = self.sides.lock().unwrap();
        if let Some(state) = sides.get_mut(&(group_id, side)) {
            while state.acked < next && state.unacked.pop_front().is_some() {
                state.acked += 1;
                state.sent = state.sent.saturating_sub(1);
            }
        }
    }
}

/// Keeps the position of the next frame expected for a side that left the list (the highest one
/// seen), forgetting every side at once past [`MAX_REMEMBERED`].
fn remember(remembered: &mut HashMap<(Uuid, Side), u64>, key: (Uuid, Side), next: u64) {
    if remembered.len() >= MAX_REMEMBERED && !remembered.contains_key(&key) {
        remembered.clear();
    }
    let position = remembered.entry(key).or_insert(0);
    *position = (*position).max(next);
}

/// The latest acknowledgement of every side that has one, taken out for sending.
fn take_acks(acks: &Mutex<LatestAcks>) -> Vec<Vec<u8>> {
    acks.lock().unwrap().drain().map(|(_, ack)| ack).collect()
}

/// Keeps `/ws/data` open while the agent serves any group side or watched dongle; reconnects with
/// backoff. Ends when the daemon stops, after the connection of the moment took its leave (see
/// [`farewell`]), so it is started as a task that the daemon's cancellation does not cut short.
pub(super) async fn run(shared: Arc<Shared>, creds: Credentials, mut backoff: Backoff) {
    let url = ws_url(&creds.server_url, "/ws/data");
    let stopping = shared.cancel.clone();
    loop {
        let has_work = async {
            while !shared.data.has_work() {
                shared.data.wake.notified().await;
            }
        };
        let connected = tokio::select! {
            () = stopping.cancelled() => return,
            connected = async {
                has_work.await;
                control::connect(&url, &creds.agent_token, creds.ca_file.as_deref()).await
            } => connected,
        };
        match connected {
            Ok(socket) => {
                tracing::info!("data plane connected");
                shared.data.rewind();
                let carried: Vec<Vec<u8>> = shared.data.take_carried_acks().into_values().collect();
                let started = tokio::time::Instant::now();
                if let Err(reason) = serve(&shared, socket, carried).await {
                    tracing::warn!(%reason, "the data plane connection failed");
                }
                // Only a connection that lasted resets the backoff: one that ends at once (a side that
                // stalls again and again) must not make the agent reconnect in a tight loop.
                if started.elapsed() >= STEADY_CONNECTION {
                    backoff.reset();
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not open the data plane"),
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// How a connection's loop ended.
enum End {
    /// The server closed it, or it asked to be opened anew.
    Closed,
    /// The daemon is stopping: the connection takes its leave.
    Stopping,
}

/// Serves one connection; `carried` are acknowledgements of frames delivered after an earlier
/// connection closed, sent first.
async fn serve(
    shared: &Arc<Shared>,
    socket: control::ControlSocket,
    carried: Vec<Vec<u8>>,
) -> Result<(), String> {
    let (mut sink, mut stream) = socket.split();
    send_all(&mut sink, carried, hops::Hop::SenderSent).await?;
    // Frames for dongles go through a lane per side to their own task, so that a slow dongle never
    // holds up another side or the acknowledgements this task reads. Acknowledgements are cumulative,
    // so the lanes keep only the latest per side for this task to send: a bounded map, however far
    // behind the sending is.
    let mut downstream = Downstream::new(shared.clone());
    let (acks, acks_ready, stalled) = (
        downstream.acks.clone(),
        downstream.acks_ready.clone(),
        downstream.stalled.clone(),
    );
    let mut stall_check = tokio::time::interval(STALL_CHECK);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the frames that woke this task go out: at once on a quiet connection, a little later on a
    // busy one so that frames share messages (see `pace`), while the socket goes on being read meanwhile.
    let mut pace = Pace::default();
    let mut flush_at: Option<tokio::time::Instant> = None;
    // Made once: this loop turns for every message, and a new wait on the token each turn would
    // register and drop a waiter every time.
    let stopping = shared.cancel.cancelled();
    tokio::pin!(stopping);
    let result: Result<End, String> = async {
        loop {
            // Only when the pace allows: this loop also turns for every acknowledgement and every frame
            // from the server, and flushing on each of those would send a small message per turn.
            let now = tokio::time::Instant::now();
            if flush_at.is_none() && pace.flush_at(now) <= now {
                let messages = shared.data.outgoing();
                pace.flushed(now, messages.len());
                send_all(&mut sink, messages, hops::Hop::SenderSent).await?;
            }
            tokio::select! {
                frame = stream.next() => {
                    let bytes = match frame {
                        Some(Ok(Message::Binary(bytes))) => bytes,
                        Some(Ok(Message::Close(_))) | None => return Ok(End::Closed),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.to_string()),
                    };
                    // Only group messages come from the server; anything else is ignored like a
                    // message that does not decode.
                    let message = match DataMessage::decode(&bytes) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "ignored a data message from the server");
                            continue;
                        }
                    };
                    match message.kind {
                        Kind::Ack => shared.data.acknowledged(message.group_id, message.side, message.n),
                        Kind::Frames => {
                            if let Some(batch) = &message.batch {
                                hops::mark_all(hops::Hop::ReceiverRead, batch.iter().map(|r| r.data));
                            }
                            let frames: Vec<Frame> = message
                                .batch
                                .iter()
                                .flat_map(|b| b.iter())
                                .filter_map(|r| Frame::from_record(&r))
                                .collect();
                            // A full lane means a dongle far behind: the socket waits for it (the
                            // server holds the rest), rather than skip frames and deliver later ones.
                            downstream
                                .hand(message.group_id, message.side, message.n, frames)
                                .await;
                        }
                        Kind::Drops => {}
                    }
                }
                () = acks_ready.notified() => {
                    send_all(&mut sink, take_acks(&acks), hops::Hop::SenderSent).await?;
                }
                () = shared.data.wake.notified(), if flush_at.is_none() => {
                    // A flush due now happens at the top of the loop.
                    let now = tokio::time::Instant::now();
                    flush_at = Some(pace.flush_at(now)).filter(|at| *at > now);
                }
                () = sleep_until_flush(flush_at) => {
                    flush_at = None;
                }
                _ = stall_check.tick() => {
                    if shared.stall_over(&stalled.lock().unwrap()) {
                        // Acknowledgements of other sides go out first, so they are not sent again.
                        send_all(&mut sink, take_acks(&acks), hops::Hop::SenderSent).await?;
                        tracing::info!("a stalled side's dongle is ready: reconnecting the data plane so that the server sends its frames again");
                        let _ = sink.close().await;
                        return Ok(End::Closed);
                    }
                }
                () = &mut stopping => return Ok(End::Stopping),
            }
        }
    }
    .await;
    // What is queued for dongles is still handed over (a send cut in half would put part of a batch on
    // the bus without its acknowledgement); only a dongle that does not take it for long is cut off,
    // and sooner when the daemon stops, which has its own budget.
    let stopping = matches!(result, Ok(End::Stopping));
    let started = tokio::time::Instant::now();
    downstream
        .finish(if stopping { STOP_DRAIN } else { DRAIN_TIMEOUT })
        .await;
    match result {
        Ok(End::Stopping) => {
            farewell(shared, &mut sink, &mut stream, &acks, started + STOP_BUDGET).await
        }
        Ok(End::Closed) | Err(_) => {
            // What the lanes delivered while finishing is acknowledged on the next connection (the
            // server takes an acknowledgement of anything it ever sent), or the server would send it
            // again to an agent that may have restarted meanwhile.
            shared
                .data
                .carry_acks(std::mem::take(&mut *acks.lock().unwrap()));
            result.map(|_| ())
        }
    }
}

/// The most a stopping daemon's data connection takes to take its leave, within the daemon's own grace
/// of five seconds.
const STOP_BUDGET: Duration = Duration::from_secs(4);
/// The most a stopping connection waits for its lanes to finish their slice.
const STOP_DRAIN: Duration = Duration::from_secs(1);
/// The part of the budget kept for the server's answer to the close.
const CLOSE_ANSWER: Duration = Duration::from_millis(500);

/// Takes leave of the server when the daemon stops, so that a stop and a start lose no frame and put
/// none on a bus twice: the frames the lanes put on dongles' links are acknowledged (the server would
/// send them again otherwise), the frames of the agent's dongles that the server has not acknowledged
/// yet are sent and waited for (the agent keeps them in memory only), and the server's answer to the
/// close is awaited, all by `deadline`. Frames that arrive from the server meanwhile are not taken:
/// unacknowledged, they stay with it.
async fn farewell<S, R>(
    shared: &Shared,
    sink: &mut S,
    stream: &mut R,
    acks: &Mutex<LatestAcks>,
    deadline: tokio::time::Instant,
) -> Result<(), String>
where
    S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    R: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let late = || "the server did not take the last messages in time".to_string();
    let mut delivered = shared.data.take_carried_acks();
    delivered.extend(acks.lock().unwrap().drain());
    let mut messages: Vec<Vec<u8>> = delivered.into_values().collect();
    messages.extend(shared.data.outgoing());
    tokio::time::timeout_at(deadline, send_all(sink, messages, hops::Hop::SenderSent))
        .await
        .map_err(|_| late())??;
    let acknowledged_by = deadline - CLOSE_ANSWER;
    while shared.data.unacknowledged() > 0 {
        let next = match tokio::time::timeout_at(acknowledged_by, stream.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => bytes,
            Ok(Some(Ok(Message::Close(_))) | None) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Err(_) => {
                tracing::warn!(
                    frames = shared.data.unacknowledged(),
                    "stopping before the server acknowledged every frame of the dongles: those are lost"
                );
                break;
            }
        };
        if let Ok(message) = DataMessage::decode(&next)
            && message.kind == Kind::Ack
        {
            shared
                .data
                .acknowledged(message.group_id, message.side, message.n);
        }
    }
    // The server answers the close once it has read everything before it: until then, the last
    // acknowledgements may still be in the socket, and a process that exits loses them.
    tokio::time::timeout_at(deadline, sink.close())
        .await
        .map_err(|_| late())?
        .map_err(|e| e.to_string())?;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, stream.next()).await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
    Ok(())
}

/// How often a connection looks whether a stalled side's dongle can take frames again.
const STALL_CHECK: Duration = Duration::from_millis(200);
/// The least time a side stays stalled before the connection is opened anew for it, so that a dongle
/// whose link fails and recovers at once cannot make the connection turn over and over.
const STALL_MIN: Duration = Duration::from_millis(300);
/// A data connection that lasted this long resets the reconnect backoff.
const STEADY_CONNECTION: Duration = Duration::from_secs(5);

/// Sends `messages` in one write to the socket (a write per message costs a system call each), and
/// marks the frames they carry as passing `hop` for a benchmark that traces them.
async fn send_all<S>(sink: &mut S, messages: Vec<Vec<u8>>, hop: hops::Hop) -> Result<(), String>
where
    S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    if messages.is_empty() {
        return Ok(());
    }
    let mut traced = Vec::new();
    for message in messages {
        let message = tokio_tungstenite::tungstenite::Bytes::from(message);
        if hops::enabled() {
            traced.push(message.clone());
        }
        sink.feed(Message::Binary(message))
            .await
            .map_err(|e| e.to_string())?;
    }
    sink.flush().await.map_err(|e| e.to_string())?;
    for message in traced {
        hops::mark_message(hop, &message);
    }
    Ok(())
}

/// Resolves at `at`, or never when there is nothing to flush.
async fn sleep_until_flush(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Shared {
    /// Whether a side stalled on this connection (for long enough) has a dongle that can take frames
    /// again, so that a new connection would get them delivered.
    fn stall_over(&self, stalled: &Stalled) -> bool {
        stalled.iter().any(|(&(group_id, side), since)| {
            since.elapsed() >= STALL_MIN
                && self
                    .data
                    .inbound(group_id, side)
                    .is_some_and(|(device_id, _)| self.can_deliver(&device_id))
        })
    }

    /// Whether frames for `device_id` can go onto its link now.
    fn can_deliver(&self, device_id: &DeviceId) -> bool {
        self.devices
            .get(device_id)
            .is_some_and(|device| self.can_deliver_to(&device))
    }

    /// Whether a device can take frames now: a local endpoint that is open, or a dongle whose session
    /// is authenticated and whose dongle took the token.
    pub(super) fn can_deliver_to(&self, device: &Device) -> bool {
        match device {
            Device::Local { endpoint, .. } => endpoint.is_some(),
            Device::Dongle(session) => {
                !session.is_closed()
                    && session.is_authenticated()
                    && self.ready.lock().unwrap().contains(&session.device_id())
            }
        }
    }

    pub(super) fn groups_changed(&self, groups: Groups) {
        tracing::info!(sides = groups.sides.len(), "group sides from the server");
        self.data.set_groups(&groups);
    }
}

/// Moves the frames a dongle receives into the data plane, for as long as its session lives.
pub(super) async fn pump(
    shared: Arc<Shared>,
    device_id: DeviceId,
    mut frames: mpsc::Receiver<Frame>,
) {
    let mut batch = Vec::with_capacity(256);
    while frames.recv_many(&mut batch, 256).await > 0 {
        shared.data.take_from_dongle(device_id, &batch);
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ids::CanId;

    fn frame(i: u8) -> Frame {
        Frame::classic(CanId::standard(0x100).unwrap(), &[i]).unwrap()
    }

    fn groups(device: DeviceId, next_seq: u64) -> (Uuid, Groups) {
        let g = Uuid::new_v4();
        (
            g,
            Groups {
                sides: vec![GroupSide {
                    group_id: g,
                    side: Side::A,
                    device_id: device,
                    next_seq,
                }],
            },
        )
    }

    #[test]
    fn frames_wait_for_their_ack_and_are_resent_after_a_rewind() {
        let plane = DataPlane::default();
        let dev: DeviceId = "0123456789abcdef".parse().unwrap();
        let (g, list) = groups(dev, 10);
        plane.take_from_dongle(dev, &[frame(0)]);
        assert_eq!(
            plane.stats().unrouted,
            1,
            "no group yet: unrouted, not queued"
        );
        plane.set_groups(&list);
        plane.take_from_dongle(dev, &[frame(1), frame(2), frame(3)]);
        let sent = plane.outgoing();
        assert_eq!(sent.len(), 1);
        let m = DataMessage::decode(&sent[0]).unwrap();
        assert_eq!(
            (m.kind, m.group_id, m.n, m.frame_count()),
            (Kind::Frames, g, 10, 3)
        );
        assert!(plane.outgoing().is_empty(), "sent once per connection");
        plane.acknowledged(g, Side::A, 12);
        plane.rewind();
        let resent = plane.outgoing();
        assert_eq!(
            plane.stats().frames_up,
            3,
            "a resend is not a new frame sent"
        );
        let m = DataMessage::decode(&resent[0]).unwrap();
        assert_eq!(
            (m.n, m.frame_count()),
            (12, 1),
            "only the unacknowledged frame again"
        );
        // The server says it already has frame 12 (it wrote it before a crash): nothing to resend.
        plane.set_groups(&groups_with(g, dev, 13));
        plane.rewind();
        assert!(plane.outgoing().is_empty());
    }

    fn groups_with(g: Uuid, dev: DeviceId, next_seq: u64) -> Groups {
        Groups {
            sides: vec![GroupSide {
                group_id: g,
                side: Side::A,
                device_id: dev,
                next_seq,
            }],
        }
    }

    /// A lane may be putting frames on a dongle's bus while its side leaves the list for a moment (the
    /// server's list comes and goes as an agent's dongles reappear after a restart): what it delivered
    /// then still counts when the side comes back, or the server's resend put those frames on the bus
    /// twice (seen under load: 16 frames, one slice, twice).
    #[test]
    fn what_reaches_a_dongle_while_its_side_is_out_of_the_list_counts_when_the_side_returns() {
        let plane = DataPlane::default();
        let dev: DeviceId = "0123456789abcdef".parse().unwrap();
        let (g, list) = groups(dev, 0);
        plane.set_groups(&list);
        plane.disposed_inbound(g, Side::A, 16, 0, 16);
        assert_eq!(plane.inbound(g, Side::A), Some((dev, 16)));
        // The lane reads position 16, the side leaves the list, the slice reaches the dongle.
        plane.set_groups(&Groups { sides: Vec::new() });
        plane.disposed_inbound(g, Side::A, 16, 0, 32);
        plane.set_groups(&list);
        assert_eq!(
            plane.inbound(g, Side::A),
            Some((dev, 32)),
            "frames below 32 are on the bus already"
        );
        assert_eq!(plane.stats().frames_down, 32);
    }

    #[test]
    fn a_watched_dongle_is_monitored_unless_it_is_a_group_side() {
        let plane = DataPlane::default();
        let dev: DeviceId = "0123456789abcdef".parse().unwrap();
        assert!(!plane.has_work());
        plane.watch(&Watch {
            device_ids: vec![dev],
            seconds: 6,
        });
        assert!(plane.has_work(), "a watched dongle opens the data plane");
        plane.take_from_dongle(dev, &[frame(0), frame(1)]);
        let sent = plane.outgoing();
        assert_eq!(sent.len(), 1);
        assert!(matches!(
            data::AnyMessage::decode(&sent[0]),
            Ok(data::AnyMessage::Monitor(m)) if m.seen == 2 && m.batch.len() == 2
        ));
        // In a group, every frame goes to the group's stream (the relay shows it on the console).
        let (g, list) = groups(dev, 0);
        plane.set_groups(&list);
        plane.take_from_dongle(dev, &[frame(2)]);
        let sent = plane.outgoing();
        assert_eq!(sent.len(), 1);
        let m = DataMessage::decode(&sent[0]).unwrap();
        assert_eq!((m.kind, m.group_id, m.frame_count()), (Kind::Frames, g, 1));
        let stats = plane.stats();
        assert_eq!(
            (stats.console_seen, stats.console_sent, stats.unrouted),
            (2, 2, 0)
        );
    }

    #[test]
    fn a_full_queue_drops_new_frames_and_reports_them() {
        let plane = DataPlane::default();
        let dev: DeviceId = "0123456789abcdef".parse().unwrap();
        let (g, list) = groups(dev, 0);
        plane.set_groups(&list);
        let many = vec![frame(0); MAX_UNACKED + 5];
        plane.take_from_dongle(dev, &many);
        assert_eq!(plane.stats().dropped, 5);
        let messages = plane.outgoing();
        let drops = messages
            .iter()
            .map(|m| DataMessage::decode(m).unwrap())
            .find(|m| m.kind == Kind::Drops)
            .expect("a DROPS report");
        assert_eq!((drops.group_id, drops.n), (g, 5));
        let frames: u64 = messages
            .iter()
            .map(|m| DataMessage::decode(m).unwrap().frame_count())
            .sum();
        assert_eq!(frames, MAX_UNACKED as u64);
    }
}
