//! Where a relayed CAN frame spends its time: each component of the bridge marks the moment a frame
//! passes one of its [`Hop`]s, and a benchmark reads the marks back as a table of per-hop latencies.
//!
//! Only the benchmarks' numbered frames are traced (data `[tag, seq as u32 big-endian, ...]`, as
//! `bridge-demo`'s traffic numbers them), and only while a benchmark has called [`enable`]. Otherwise
//! every call is one relaxed atomic load, so the product's hot paths keep their marks at no cost worth
//! measuring. Every component runs in the benchmark's process, so one monotonic clock serves all hops.
//!
//! A mark is kept only the first time a frame passes a hop: a frame sent again after a reconnect keeps
//! the time of its first pass, which is what its latency counts from anyway. Marks of frames outside the
//! traced range (another stream, a sequence number past the end) are ignored, so what a benchmark
//! allocates is all the tracing ever holds. A frame whose data is not a numbered frame's (shorter than
//! five bytes) is ignored too; a product frame that happens to look numbered only adds a mark.

pub mod tally;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// The points of the path a frame passes, in order, from the sending dongle's bus to the receiving
/// dongle's bus (either direction of a group: the sender is the side whose dongle received it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Hop {
    /// The benchmark hands the frame to the sending simulated dongle, as if received from its bus.
    Injected = 0,
    /// The sending agent has decoded it from its dongle's link and handed it to its data plane.
    SenderRead,
    /// The sending agent has written the FRAMES message that carries it to its data socket.
    SenderSent,
    /// The server has read that message from the sending agent's data socket.
    ServerRead,
    /// The group's pipe has queued it for the receiving agent's data connection.
    ServerQueued,
    /// The server has written it to the receiving agent's data socket.
    ServerSent,
    /// The receiving agent has read it from its data socket.
    ReceiverRead,
    /// The receiving agent has written it to its dongle's link.
    ReceiverSent,
    /// It is on the receiving dongle's bus, where the benchmark's tap receives it.
    OnBus,
}

impl Hop {
    /// Every hop, in path order.
    pub const ALL: [Hop; 9] = [
        Hop::Injected,
        Hop::SenderRead,
        Hop::SenderSent,
        Hop::ServerRead,
        Hop::ServerQueued,
        Hop::ServerSent,
        Hop::ReceiverRead,
        Hop::ReceiverSent,
        Hop::OnBus,
    ];

    /// What the segment ending at this hop is, for tables.
    pub fn segment(self) -> &'static str {
        match self {
            Hop::Injected => "injected",
            Hop::SenderRead => "the sending dongle's link, the agent's reader",
            Hop::SenderSent => "the sending agent's data plane (gathering, encoding, socket write)",
            Hop::ServerRead => "loopback to the server, its socket reader",
            Hop::ServerQueued => "the group's pipe",
            Hop::ServerSent => "the receiving agent's connection queue, the server's socket write",
            Hop::ReceiverRead => "loopback to the receiving agent, its socket reader",
            Hop::ReceiverSent => "the receiving agent's hand-over to its dongle's link",
            Hop::OnBus => "the receiving dongle's link, the dongle, its bus",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The table being filled, if any.
static CURRENT: RwLock<Option<Arc<Table>>> = RwLock::new(None);

/// The marks of one traced run: per stream, per frame, per hop, nanoseconds after `base` plus one
/// (zero: not passed).
#[derive(Debug)]
struct Table {
    base: Instant,
    streams: usize,
    frames: usize,
    marks: Vec<AtomicU64>,
}

impl Table {
    fn slot(&self, tag: u8, seq: u32, hop: Hop) -> Option<&AtomicU64> {
        let (tag, seq) = (usize::from(tag), seq as usize);
        if tag >= self.streams || seq >= self.frames {
            return None;
        }
        self.marks
            .get((tag * self.frames + seq) * Hop::ALL.len() + hop as usize)
    }
}

/// The table being filled, if tracing is on.
fn current() -> Option<Arc<Table>> {
    CURRENT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Starts tracing frames of streams `0..streams`, sequence numbers `0..frames`, counting time from
/// `base` (the benchmark's own clock, so that its injection and arrival times line up with the marks).
pub fn enable(base: Instant, streams: u8, frames: u32) {
    let (streams, frames) = (usize::from(streams), frames as usize);
    let marks = (0..streams * frames * Hop::ALL.len())
        .map(|_| AtomicU64::new(0))
        .collect();
    let table = Arc::new(Table {
        base,
        streams,
        frames,
        marks,
    });
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = Some(table);
    ENABLED.store(true, Ordering::Release);
}

/// Whether any hop is traced now: callers that must decode frames to mark them ask first.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Marks that the frame with this data passed `hop` now (ignored unless it is a traced frame).
#[inline]
pub fn mark(hop: Hop, data: &[u8]) {
    if enabled() {
        mark_all(hop, [data]);
    }
}

/// Marks every frame of `frames` (their data) as passing `hop` now.
#[inline]
pub fn mark_all<'a>(hop: Hop, frames: impl IntoIterator<Item = &'a [u8]>) {
    if !enabled() {
        return;
    }
    let Some(table) = current() else { return };
    let at = Instant::now()
        .saturating_duration_since(table.base)
        .as_nanos() as u64
        + 1;
    for data in frames {
        let [tag, a, b, c, d, ..] = *data else {
            continue;
        };
        if let Some(slot) = table.slot(tag, u32::from_be_bytes([a, b, c, d]), hop) {
            let _ = slot.compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// Marks the frames of a FRAMES data message (`control_proto::data`, encoded) as passing `hop` now.
#[inline]
pub fn mark_message(hop: Hop, message: &[u8]) {
    if !enabled() {
        return;
    }
    if let Ok(control_proto::data::DataMessage {
        batch: Some(batch), ..
    }) = control_proto::data::DataMessage::decode(message)
    {
        mark_all(hop, batch.iter().map(|record| record.data));
    }
}

/// Stops tracing and answers, per stream and frame, the time each hop was passed (after `base`; None:
/// not passed).
pub fn finish() -> Vec<Vec<[Option<std::time::Duration>; Hop::ALL.len()]>> {
    ENABLED.store(false, Ordering::Release);
    let Some(table) = CURRENT.write().unwrap_or_else(|e| e.into_inner()).take() else {
        return Vec::new();
    };
    (0..table.streams)
        .map(|tag| {
            (0..table.frames)
                .map(|seq| {
                    Hop::ALL.map(|hop| {
                        table
                            .slot(tag as u8, seq as u32, hop)
                            .map(|s| s.load(Ordering::Relaxed))
                            .filter(|&at| at > 0)
                            .map(|at| std::time::Duration::from_nanos(at - 1))
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test, since the tracer is process-wide state.
    #[test]
    fn marks_are_kept_once_per_frame_and_hop_and_only_while_enabled() {
        let frame = |tag: u8, seq: u32| {
            let s = seq.to_be_bytes();
            [tag, s[0], s[1], s[2], s[3], 0, 0, 0]
        };
        mark(Hop::SenderRead, &frame(0, 0));
        assert!(!enabled());
        let base = Instant::now();
        enable(base, 2, 4);
        mark(Hop::SenderRead, &frame(1, 3));
        let first = finish_peek(1, 3, Hop::SenderRead);
        std::thread::sleep(std::time::Duration::from_millis(2));
        mark(Hop::SenderRead, &frame(1, 3));
        assert_eq!(
            finish_peek(1, 3, Hop::SenderRead),
            first,
            "the first pass is kept"
        );
        mark_all(
            Hop::ServerRead,
            [
                &frame(0, 1)[..],
                &frame(9, 1)[..],
                &frame(0, 99)[..],
                &[1u8][..],
            ],
        );
        let marks = finish();
        assert!(!enabled());
        assert_eq!(marks.len(), 2);
        assert!(marks[1][3][Hop::SenderRead as usize].is_some());
        assert!(marks[0][1][Hop::ServerRead as usize].is_some());
        assert!(
            marks[0][0][Hop::SenderRead as usize].is_none(),
            "marked before enabling"
        );
        let passed: usize = marks
            .iter()
            .flatten()
            .flatten()
            .filter(|m| m.is_some())
            .count();
        assert_eq!(passed, 2, "frames out of range are ignored");
        mark(Hop::SenderRead, &frame(0, 2));
        assert!(finish().is_empty(), "nothing traced after finishing");
    }

    fn finish_peek(tag: u8, seq: u32, hop: Hop) -> u64 {
        current()
            .and_then(|t| t.slot(tag, seq, hop).map(|s| s.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }
}
