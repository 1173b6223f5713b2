//! Feeds the live console (SPEC 3.9) from the relay's events: every relayed frame as `can_frame` (rx
//! on the sending dongle's stream and the group's, tx on the receiving dongle's), and every change of a
//! group's state or backlog as `group_state` on the group's stream.
//!
//! It only reads the relay's broadcast: when it falls behind, it skips what it missed (the console is a
//! view, never a record), and the relay is never slowed by it. The console samples frames above its
//! rate on its own.

use std::sync::Arc;

use control_proto::data::PerSide;
use firmware_proto::ext::batch::Batch;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::relay::{Relay, RelayEvent};
use crate::console::{Console, ConsoleEvent, FrameView, StreamKey, bus_load};

/// Publishes the relay's events on the console until `shutdown`.
pub async fn feed(relay: Arc<Relay>, console: Arc<Console>, shutdown: CancellationToken) {
    let mut events = relay.subscribe();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = shutdown.cancelled() => return,
        };
        match event {
            Ok(RelayEvent::Frames {
                group_id,
                from_dongle_id,
                to_dongle_id,
                batch,
                ..
            }) => frames(&console, group_id, from_dongle_id, to_dongle_id, &batch),
            Ok(RelayEvent::GroupState {
                group_id,
                state,
                buffer_pressure,
                backlog_a_to_b,
                backlog_b_to_a,
                offline,
            }) => console.publish(
                StreamKey::Group(group_id),
                ConsoleEvent::GroupState {
                    group_id,
                    detail: serde_json::json!({
                        // v0.7's names (section 18.4) ...
                        "mode": state,
                        "offline_side": offline_side(offline),
                        "buffered_a_to_b": backlog_a_to_b,
                        "buffered_b_to_a": backlog_b_to_a,
                        // ... and this server's, which the dashboard reads.
                        "state": state,
                        "buffer_pressure": buffer_pressure,
                        "backlog": { "a_to_b": backlog_a_to_b, "b_to_a": backlog_b_to_a },
                    }),
                },
            ),
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(
                    missed,
                    "the console skipped relay events it could not keep up with"
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// `"a"` or `"b"` when one side is offline, `"both"`, or null when neither is.
fn offline_side(offline: PerSide<bool>) -> Option<&'static str> {
    match (offline.a, offline.b) {
        (false, false) => None,
        (true, false) => Some("a"),
        (false, true) => Some("b"),
        (true, true) => Some("both"),
    }
}

fn frames(console: &Console, group_id: Uuid, from: Uuid, to: Uuid, batch: &[u8]) {
    let Ok(batch) = Batch::parse(batch) else {
        return;
    };
    // Both buses carry these frames: the sender's received them, the receiver's transmits them.
    let bits: u64 = batch
        .iter()
        .map(|r| bus_load::frame_bits(r.id.is_extended(), r.data.len()))
        .sum();
    let count = batch.len() as u64;
    console.bus_meter.add(from, count, bits);
    console.bus_meter.add(to, count, bits);
    // Formatted once, and only when the sampling keeps a frame.
    let ts_cell = std::cell::OnceCell::new();
    let ts = || {
        ts_cell
            .get_or_init(|| crate::console::timestamp(chrono::Utc::now()))
            .as_str()
    };
    console.publish_frames(StreamKey::Dongle(from), batch.iter(), |r| {
        ConsoleEvent::can_frame(from, "rx", ts(), (&r).into(), None)
    });
    console.publish_frames(StreamKey::Group(group_id), batch.iter(), |r| {
        ConsoleEvent::can_frame(from, "rx", ts(), (&r).into(), None)
    });
    // The time on the frame is the sending dongle's clock, which says nothing of the receiver.
    console.publish_frames(StreamKey::Dongle(to), batch.iter(), |r| {
        let tx = FrameView {
            dongle_ts_us: 0,
            ..(&r).into()
        };
        ConsoleEvent::can_frame(to, "tx", ts(), tx, None)
    });
}
