//! What a group's pipe needs of the relay around it, and nothing more: the agents' data connections on
//! this instance (their bounded outgoing queues), the feed of events a live console follows, the
//! relay's counters, the settings, and the pool. [`super::relay`] owns it and fills it; pipes only use
//! it, so the two never import each other.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use control_proto::data::{PerSide, Side};
use sqlx::PgPool;
use tokio::sync::{Notify, broadcast, mpsc};
use uuid::Uuid;

use super::model::Mode;
use super::settings::RelaySettings;

/// What the relay tells its subscribers (a live console).
#[derive(Debug, Clone)]
pub enum RelayEvent {
    /// A run of frames was accepted from one side, on its way to the other.
    Frames {
        group_id: Uuid,
        from: Side,
        from_dongle_id: Uuid,
        to_dongle_id: Uuid,
        /// The position of the first frame in the sending side's stream.
        first_seq: u64,
        count: u32,
        /// The firmware-proto CAN batch.
        batch: Arc<[u8]>,
    },
    /// The group's state, pressure flag or backlog changed (coalesced to one per flush interval).
    GroupState {
        group_id: Uuid,
        state: Mode,
        buffer_pressure: bool,
        backlog_a_to_b: u64,
        backlog_b_to_a: u64,
        /// The sides whose serving agent has no data connection on this instance.
        offline: PerSide<bool>,
    },
}

/// Counters of this instance's relay (also exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct RelayStats {
    pub frames_accepted: AtomicU64,
    pub frames_forwarded: AtomicU64,
    pub frames_buffered: AtomicU64,
    pub frames_delivered: AtomicU64,
    pub frames_trimmed: AtomicU64,
    /// Frames that arrived again (a resend after a reconnect) and were skipped.
    pub frames_duplicate: AtomicU64,
    /// Frames refused: unknown or inactive group, another user's, or a side the agent does not serve.
    pub frames_refused: AtomicU64,
    /// Data messages that did not decode.
    pub messages_malformed: AtomicU64,
    /// Messages for a data connection whose queue was full.
    pub messages_dropped: AtomicU64,
}

impl RelayStats {
    pub(crate) fn add(&self, counter: &AtomicU64, name: &'static str, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(name).increment(n);
        }
    }
}

/// Why a message could not be queued for an agent's data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the agent has no data connection on this instance")]
    Offline,
    #[error("the agent's data connection queue is full")]
    Full,
}

pub(super) struct DataConn {
    pub(super) conn_id: u64,
    pub(super) tx: mpsc::Sender<Vec<u8>>,
}

/// What pipes share with the relay: the pool, the settings, the connections, the events.
pub(crate) struct Core {
    pub pool: PgPool,
    /// This instance's id and the age at which another's beat counts as dead, when several instances
    /// share the database (the agent hub's cluster).
    pub cluster: Option<(Uuid, std::time::Duration)>,
    pub settings: RelaySettings,
    /// Where frames wait for a side: PostgreSQL, or JetStream with `--nats-url`.
    pub frames: super::store::FrameStore,
    pub stats: RelayStats,
    pub(super) conns: Mutex<HashMap<Uuid, DataConn>>,
    pub(super) events: broadcast::Sender<RelayEvent>,
    /// Agents whose `groups` list a pipe found out of date (a side's serving agent changed), for
    /// [`Relay::send_moved_lists`]; a set, so it holds each agent once however often it is named.
    pub(super) moved: Mutex<HashSet<Uuid>>,
    pub(super) moved_wake: Notify,
}

impl Core {
    /// The id of the agent's data connection here, if it has one.
    pub fn conn_of(&self, agent_id: Uuid) -> Option<u64> {
        self.conns
            .lock()
            .expect("relay lock")
            .get(&agent_id)
            .filter(|c| !c.tx.is_closed())
            .map(|c| c.conn_id)
    }

    /// Queues a binary message for the agent's data connection; returns the connection's id.
    pub fn send(&self, agent_id: Uuid, message: Vec<u8>) -> Result<u64, SendError> {
        let conns = self.conns.lock().expect("relay lock");
        let conn = conns.get(&agent_id).ok_or(SendError::Offline)?;
        match conn.tx.try_send(message) {
            Ok(()) => Ok(conn.conn_id),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Offline),
        }
    }

    /// A side's serving agent changed from `before` to `after` (one logged in anew, went offline, or
    /// the dongle moved): both need a new `groups` list, which no event of their own would send.
    pub fn serving_changed(&self, before: Option<Uuid>, after: Option<Uuid>) {
        let mut moved = self.moved.lock().expect("relay lock");
        moved.extend(before);
        moved.extend(after);
        drop(moved);
        self.moved_wake.notify_one();
    }

    /// Queues a binary message for one data connection of the agent: when the agent has another
    /// connection here now, nothing is sent (`Offline`), so that frames never reach a newer connection
    /// ahead of older ones still in flight on the previous one.
    pub fn send_on(&self, agent_id: Uuid, conn_id: u64, message: Vec<u8>) -> Result<(), SendError> {
        let conns = self.conns.lock().expect("relay lock");
        let conn = conns
            .get(&agent_id)
            .filter(|c| c.conn_id == conn_id)
            .ok_or(SendError::Offline)?;
        match conn.tx.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Offline),
        }
    }

    /// Queues a message whose loss is harmless (an ACK: the next one covers it); counts a loss.
    pub fn send_lossy(&self, agent_id: Uuid, message: Vec<u8>) {
        if let Err(SendError::Full) = self.send(agent_id, message) {
            self.stats.add(
                &self.stats.messages_dropped,
                "relay_messages_dropped_total",
                1,
            );
        }
    }

    /// Closes the agent's data connection (it reconnects and sends again what was not acknowledged).
    pub fn close(&self, agent_id: Uuid) {
        self.conns.lock().expect("relay lock").remove(&agent_id);
    }

    pub fn emit(&self, event: RelayEvent) {
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }
}

/// Positions and flags a pipe publishes for the rest of the instance.
#[derive(Debug, Default)]
pub(crate) struct PipeShared {
    /// Per side: the stream from that side is acknowledged up to here.
    pub acked_in: PerSide<AtomicU64>,
    /// Per side: its serving agent's data connection is on this instance.
    pub data_connected: PerSide<AtomicBool>,
}
