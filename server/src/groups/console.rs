//! Feeds the live console (SPEC 3.9) from the relay's events: every relayed frame as `can_frame` (rx
//! on the sending dongle's stream and the group's, tx on the receiving dongle's), and every change of a
//! group's state or backlog as `group_state` on the group's stream.
//!
//! It only reads the relay's broadcast: when it falls behind, it skips what it missed (the console is a
//! view, never a record), and the relay is never slowed by it. The console samples frames above its
//! rate on its own.

use std::sync::Arc;

use firmware_proto::ext::batch::Batch;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::relay::{Relay, RelayEvent};
use crate::console::{Console, ConsoleEvent, StreamKey};

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
            }) => console.publish(
                StreamKey::Group(group_id),
                ConsoleEvent::GroupState {
                    group_id,
                    detail: serde_json::json!({
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

fn frames(console: &Console, group_id: Uuid, from: Uuid, to: Uuid, batch: &[u8]) {
    let Ok(batch) = Batch::parse(batch) else {
        return;
    };
    for record in batch.iter() {
        let frame = |dongle_id: Uuid, direction: &'static str| ConsoleEvent::CanFrame {
            dongle_id,
            direction,
            can_id: record.id.raw(),
            extended: record.id.is_extended(),
            data_hex: hex::encode(record.data),
            sampled: None,
        };
        console.publish(StreamKey::Dongle(from), frame(from, "rx"));
        console.publish(StreamKey::Group(group_id), frame(from, "rx"));
        console.publish(StreamKey::Dongle(to), frame(to, "tx"));
    }
}
