//! The relay's limits and rates, in one plain value the pure pipe core and the I/O around it share.

use std::time::Duration;

/// The relay's limits and rates (SPEC 3.8 gives the defaults); tests make them small.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Retention per direction: at most this many buffered frames...
    pub buffer_max_frames: u64,
    /// ...none older than this.
    pub buffer_max_age: Duration,
    /// Buffered frames are replayed to a side that comes back at this rate (frames per second).
    pub replay_rate: u32,
    /// Frames to buffer wait this long for others, so that one transaction writes many.
    pub gather: Duration,
    /// ...or until this many wait.
    pub gather_max_frames: u64,
    /// Counters and positions reach the database at least this often while they change.
    pub flush_interval: Duration,
    /// A pipe reads its group's sides and agents again this often, besides when told to.
    pub refresh_interval: Duration,
    /// Frames sent to a connected side and not acknowledged yet, live and replayed; past it, frames are
    /// buffered and replay waits. The agent holds up to this many for a dongle whose bus is slower than
    /// the traffic, so keep it under its lane of 32 768 frames (`bridge_agent`'s `daemon::downstream`).
    pub inflight_max_frames: u64,
    /// Trims are audited at most this often per direction, each entry with the frames trimmed since
    /// the previous one (a full buffer trims with every write).
    pub trim_audit_interval: Duration,
    /// How often a side connected here looks for frames another instance buffered for it.
    pub poll_interval: Duration,
    /// Outgoing messages that may wait for one data connection.
    pub connection_queue: usize,
    /// Events that may wait for one pipe.
    pub pipe_queue: usize,
    /// Malformed messages a data connection may send before it is closed.
    pub max_malformed: u32,
    /// How often a data connection checks that its agent's token is still valid.
    pub auth_recheck: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            buffer_max_frames: 200_000,
            buffer_max_age: Duration::from_secs(600),
            replay_rate: 5_000,
            gather: Duration::from_millis(5),
            gather_max_frames: 4_096,
            flush_interval: Duration::from_secs(1),
            refresh_interval: Duration::from_secs(10),
            inflight_max_frames: 20_000,
            trim_audit_interval: Duration::from_secs(1),
            poll_interval: Duration::from_millis(500),
            connection_queue: 1_024,
            pipe_queue: 256,
            max_malformed: 20,
            auth_recheck: Duration::from_secs(15),
        }
    }
}
