//! One group's relay on this instance: a task that owns both directions of the group's frames.
//!
//! # A direction
//!
//! Frames from side A's agent are accepted in stream order (duplicates of a resend are skipped by
//! position; a gap closes the sender's connection, so that it sends again from the gap) and go towards
//! side B along one of two paths:
//!
//! - **forwarded**: B's agent has its data connection here, nothing of this direction waits in the
//!   buffer, and not too much is in flight: the frames are queued to B's socket, kept in memory until B
//!   acknowledges them, and A is acknowledged at once;
//! - **buffered**: otherwise. They gather for a moment, are written in one transaction with A's stream
//!   position, and A is acknowledged only after the commit, so a crash loses no acknowledged frame.
//!
//! Buffered frames go out to B when it is connected, oldest first, at the replay rate, and new frames
//! keep being buffered behind them until the buffer has been sent, so order holds. They leave the buffer
//! when B acknowledges them. When B's connection goes, what was in flight to it is written to the buffer
//! (it was acknowledged to A, so it must not be lost), and B's next connection gets the buffer again
//! from its oldest frame; B skips by position what it already has.
//!
//! # Layout
//!
//! This file: the pipe's state, its event loop, acceptance, forwarding, acknowledgements and
//! connections. [`durable`]: writes, retention, replay and counters. [`state`]: the group's state and
//! the events subscribers get.
//!
//! Every queue is bounded: the pipe's inbox (its senders wait, which slows the sockets' readers), the
//! frames in flight (past the limit, frames are buffered) and the frames waiting for a write (if the
//! database cannot take them, the sending agent's data connection is closed, so that it sends them
//! again later, instead of the server holding more).

mod durable;
mod state;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use control_proto::data::{self, Side};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::buffer::{self, BufferError};
use super::chunk::Chunk;
use super::relay::{Core, PipeShared, RelayEvent, SendError};
use super::{Mode, side_index};

/// The largest stream position accepted: far beyond any real stream, and small enough that a position
/// plus a batch never overflows, in Rust or in PostgreSQL's bigint.
pub const MAX_POSITION: u64 = 1 << 62;
/// The largest drop total believed: more than any agent can drop, small enough that adding many never
/// overflows a counter.
const MAX_DROPS: u64 = 1 << 48;

/// The most buffered chunks sent in one replay step.
const REPLAY_ROWS: i64 = 32;
/// How long a replay waits when the receiving socket's queue is full.
const REPLAY_BACKOFF: Duration = Duration::from_millis(20);
/// How long to wait before writing again after the database failed.
const DB_RETRY: Duration = Duration::from_millis(500);
/// How often retention runs on a buffer that nobody writes to.
const RETENTION_EVERY: Duration = Duration::from_secs(1);
/// Frames from an agent the pipe does not know for their side make it read the group again, at most
/// this often.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// What a pipe is told.
pub(crate) enum PipeEvent {
    /// FRAMES from an agent, for the stream of `side`.
    Frames {
        agent_id: Uuid,
        side: Side,
        n: u64,
        batch: Arc<[u8]>,
        count: u32,
    },
    /// ACK from an agent: the frames towards `side` below `n` reached its dongle.
    Ack { agent_id: Uuid, side: Side, n: u64 },
    /// DROPS from an agent: its running total for `side`.
    Drops {
        agent_id: Uuid,
        side: Side,
        total: u64,
    },
    /// Look at the group's sides and connections again (`done` answers after the look).
    Refresh { done: Option<oneshot::Sender<()>> },
    /// End: after writing what is held to the buffer, or at once with `discard` (the group is gone).
    Stop {
        discard: bool,
        done: Option<oneshot::Sender<()>>,
    },
}

/// The stream FROM one side.
#[derive(Debug, Default)]
struct Source {
    dongle_id: Uuid,
    /// The agents that see the dongle now, the serving one first; only they may send for this side.
    agents: Vec<Uuid>,
    /// The first position not accepted yet.
    next_in: u64,
    /// The first position not acknowledged to the agent yet (forwarded or written below it).
    acked_in: u64,
    /// The agent to acknowledge when the waiting frames are written.
    ack_to: Option<Uuid>,
    // Increments not yet in the database.
    received: u64,
    drops: u64,
    drops_last: u64,
}

/// The stream TOWARDS one side.
#[derive(Debug, Default)]
struct Towards {
    /// The serving agent and its data connection here, when it has one.
    conn: Option<(Uuid, u64)>,
    /// Sent to that connection, not acknowledged yet, never buffered: in order.
    inflight: VecDeque<Chunk>,
    inflight_frames: u64,
    /// Waiting to be written to the buffer: in order, after everything buffered.
    pending: Vec<Chunk>,
    pending_frames: u64,
    pending_since: Option<Instant>,
    /// Frames in the buffer (the database's count after our last write or read).
    buffered: u64,
    /// The position after the last buffered frame known.
    tail: u64,
    /// Buffered frames below this were sent on the current connection.
    cursor: u64,
    /// The highest position sent on the current connection: an ACK never reaches beyond it.
    sent_upto: u64,
    /// Everything below this was acknowledged by the side's agent.
    acked_out: u64,
    /// An acknowledgement to apply to the buffer (deferred, so that many become one write).
    db_ack: Option<u64>,
    /// Frames acknowledged straight from memory, not yet counted in the database.
    delivered: u64,
    /// When the next replay step may run (the rate limit).
    replay_at: Option<Instant>,
    /// When to look for rows another instance buffered (only while the sender is not here).
    poll_at: Option<Instant>,
    /// How long the next poll waits: doubles while polls find nothing (up to 16 intervals).
    poll_every: Option<Duration>,
    retention_at: Option<Instant>,
    retry_at: Option<Instant>,
    /// Frames trimmed whose audit entry is held back, and when the last entry was written.
    trimmed_unaudited: u64,
    last_trim_audit: Option<Instant>,
}

/// One group's relay.
pub(crate) struct Pipe {
    core: Arc<Core>,
    group_id: Uuid,
    user_id: Uuid,
    mode: Mode,
    buffer_pressure: bool,
    /// Index 0 is side A.
    from: [Source; 2],
    /// `towards[1]` is the direction a_to_b.
    towards: [Towards; 2],
    shared: Arc<PipeShared>,
    flush_at: Option<Instant>,
    refresh_at: Instant,
    /// When the pipe last read the group's sides.
    looked_at: Instant,
    /// The last backlog announced to subscribers.
    announced: (Mode, bool, u64, u64),
    /// The group was deactivated or deleted: the pipe ends.
    gone: bool,
}

const SIDES: [Side; 2] = [Side::A, Side::B];

impl Pipe {
    /// Reads the group; None when it does not exist or is not relaying.
    pub(crate) async fn load(core: Arc<Core>, group_id: Uuid) -> Result<Option<Pipe>, BufferError> {
        let Some(group) = super::sides_of(&core.pool, group_id).await? else {
            return Ok(None);
        };
        if !group.mode.relaying() {
            return Ok(None);
        }
        let rows = buffer::load(&core.pool, group_id).await?;
        let pressure: bool =
            sqlx::query_scalar("SELECT buffer_pressure FROM dongle_groups WHERE id = $1")
                .bind(group_id)
                .fetch_optional(&core.pool)
                .await?
                .unwrap_or(false);
        let shared = Arc::new(PipeShared::default());
        let mut from: [Source; 2] = Default::default();
        let mut towards: [Towards; 2] = Default::default();
        for i in 0..2 {
            from[i] = Source {
                dongle_id: group.sides[i].dongle_id,
                agents: group.sides[i].agents.clone(),
                next_in: rows[i].next_in,
                acked_in: rows[i].next_in,
                drops_last: rows[i].agent_drops_last,
                ..Source::default()
            };
            towards[i] = Towards {
                buffered: rows[i].buffered,
                tail: rows[i].tail,
                acked_out: rows[i].acked_out,
                sent_upto: rows[i].acked_out,
                ..Towards::default()
            };
            shared.acked_in[i].store(rows[i].next_in, Ordering::Relaxed);
        }
        let now = Instant::now();
        Ok(Some(Pipe {
            group_id,
            user_id: group.user_id,
            mode: group.mode,
            buffer_pressure: pressure,
            announced: (group.mode, pressure, rows[1].buffered, rows[0].buffered),
            from,
            towards,
            shared,
            flush_at: None,
            refresh_at: now + core.settings.refresh_interval,
            looked_at: now,
            gone: false,
            core,
        }))
    }

    pub(crate) fn user_id(&self) -> Uuid {
        self.user_id
    }

    pub(crate) fn shared(&self) -> Arc<PipeShared> {
        self.shared.clone()
    }

    /// Runs until stopped, until the group stops relaying, or until the relay drops its handle.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<PipeEvent>) {
        tracing::debug!(group_id = %self.group_id, "group relay started");
        self.look_at_connections();
        self.evaluate().await;
        loop {
            let wake = self.next_wake();
            let event = tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => Some(event),
                    None => {
                        self.finish(true).await;
                        break;
                    }
                },
                () = sleep_until(wake) => None,
            };
            if let Some(mut event) = event {
                // A burst is handled as a whole, so that it becomes one write.
                loop {
                    if let PipeEvent::Stop { discard, done } = event {
                        if !discard {
                            self.finish(true).await;
                        }
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                        tracing::debug!(group_id = %self.group_id, "group relay stopped");
                        return;
                    }
                    self.handle(event).await;
                    if self.gathered_enough() {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(next) => event = next,
                        Err(_) => break,
                    }
                }
            }
            self.work().await;
            if self.gone {
                self.finish(true).await;
                tracing::debug!(group_id = %self.group_id, "group relay ended: the group no longer relays");
                return;
            }
        }
    }

    fn gathered_enough(&self) -> bool {
        self.towards
            .iter()
            .any(|t| t.pending_frames >= self.core.settings.gather_max_frames)
    }

    async fn handle(&mut self, event: PipeEvent) {
        match event {
            PipeEvent::Frames {
                agent_id,
                side,
                n,
                batch,
                count,
            } => self.frames(agent_id, side, n, batch, count).await,
            PipeEvent::Ack { agent_id, side, n } => self.ack(agent_id, side, n),
            PipeEvent::Drops {
                agent_id,
                side,
                total,
            } => self.drops(agent_id, side, total),
            PipeEvent::Refresh { done } => {
                self.refresh().await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            PipeEvent::Stop { .. } => {}
        }
    }

    /// May `agent_id` speak for `side`? Looks again if not (at most once a second), since the agent
    /// may have just reported the dongle.
    async fn serves(&mut self, agent_id: Uuid, side: Side) -> bool {
        let i = side_index(side);
        if self.from[i].agents.contains(&agent_id) {
            return true;
        }
        if self.looked_at.elapsed() < LOOK_AGAIN {
            return false;
        }
        self.refresh().await;
        self.from[i].agents.contains(&agent_id)
    }

    async fn frames(&mut self, agent_id: Uuid, side: Side, n: u64, batch: Arc<[u8]>, count: u32) {
        if count == 0 {
            return;
        }
        let core = self.core.clone();
        let stats = &core.stats;
        if n > MAX_POSITION || !self.serves(agent_id, side).await {
            tracing::debug!(group_id = %self.group_id, %agent_id, ?side, "frames refused: the agent does not serve this side");
            stats.add(
                &stats.frames_refused,
                "relay_frames_refused_total",
                u64::from(count),
            );
            return;
        }
        let s = side_index(side);
        let t = side_index(side.other());
        if self.towards[t].pending_frames >= self.core.settings.gather_max_frames.saturating_mul(16)
        {
            // The database does not keep up (or is down): accept no more. The sender's connection
            // closes, and it sends these again, from its first unacknowledged frame, when it is back.
            tracing::warn!(group_id = %self.group_id, ?side, "frames wait too long for the buffer: closing the sender's data connection");
            self.core.close(agent_id);
            return;
        }
        let chunk = Chunk {
            seq: n,
            count,
            batch,
        };
        let source = &mut self.from[s];
        if chunk.end() <= source.next_in {
            // All of it arrived before (a resend after a reconnect): acknowledge what is safe.
            stats.add(
                &stats.frames_duplicate,
                "relay_frames_duplicate_total",
                u64::from(count),
            );
            if source.acked_in > n {
                let ack = data::encode_ack(self.group_id, side, source.acked_in);
                self.core.send_lossy(agent_id, ack);
            }
            return;
        }
        if n > source.next_in {
            // Frames before these never reached the pipe (refused while it did not yet count the agent
            // as serving the side, say), and the agent still holds them, unacknowledged. Accepting these
            // would lose those for good: closing the connection makes the agent send again from its
            // first unacknowledged frame.
            tracing::info!(group_id = %self.group_id, ?side, expected = source.next_in, got = n,
                "a gap in a side's stream: closing the sender's data connection so that it sends again");
            stats.add(
                &stats.frames_refused,
                "relay_frames_refused_total",
                u64::from(count),
            );
            self.core.close(agent_id);
            return;
        }
        let skip = source.next_in.saturating_sub(n) as u32;
        let Some(chunk) = chunk.skip(skip) else {
            return;
        };
        stats.add(
            &stats.frames_duplicate,
            "relay_frames_duplicate_total",
            u64::from(skip),
        );
        stats.add(
            &stats.frames_accepted,
            "relay_frames_accepted_total",
            u64::from(chunk.count),
        );
        source.next_in = chunk.end();
        source.received += u64::from(chunk.count);
        self.dirty();
        self.core.emit(RelayEvent::Frames {
            group_id: self.group_id,
            from: side,
            from_dongle_id: self.from[s].dongle_id,
            to_dongle_id: self.from[t].dongle_id,
            first_seq: chunk.seq,
            count: chunk.count,
            batch: chunk.batch.clone(),
        });
        if self.forward(t, &chunk) {
            // Everything of this source below its next position is now forwarded or written.
            let source = &mut self.from[s];
            source.acked_in = source.next_in;
            self.shared.acked_in[s].store(source.acked_in, Ordering::Relaxed);
            let ack = data::encode_ack(self.group_id, side, source.acked_in);
            self.core.send_lossy(agent_id, ack);
            return;
        }
        let towards = &mut self.towards[t];
        towards.pending_frames += u64::from(chunk.count);
        towards.pending.push(chunk);
        towards.pending_since.get_or_insert_with(Instant::now);
        self.from[s].ack_to = Some(agent_id);
    }

    /// Sends a chunk straight to the side's connection if the direction allows it; false when it must
    /// be buffered instead.
    fn forward(&mut self, t: usize, chunk: &Chunk) -> bool {
        let limit = self.core.settings.inflight_max_frames;
        let towards = &mut self.towards[t];
        let Some((agent, conn)) = towards.conn else {
            return false;
        };
        if !towards.pending.is_empty()
            || towards.tail > towards.cursor
            || towards.inflight_frames + u64::from(chunk.count) > limit
        {
            return false;
        }
        let message = data::encode_frames(self.group_id, SIDES[t], chunk.seq, &chunk.batch);
        match self.core.send_on(agent, conn, message) {
            Ok(()) => {
                towards.inflight_frames += u64::from(chunk.count);
                towards.sent_upto = towards.sent_upto.max(chunk.end());
                towards.inflight.push_back(chunk.clone());
                let stats = &self.core.stats;
                stats.add(
                    &stats.frames_forwarded,
                    "relay_frames_forwarded_total",
                    u64::from(chunk.count),
                );
                true
            }
            Err(SendError::Full) => false,
            // Gone, or a newer connection of the agent: what was in flight on the old one must reach
            // the new one first, so this chunk is buffered behind it.
            Err(SendError::Offline) => {
                self.look_at_connections();
                false
            }
        }
    }

    fn ack(&mut self, agent_id: Uuid, side: Side, n: u64) {
        let t = side_index(side);
        if !self.from[t].agents.contains(&agent_id) {
            return;
        }
        let towards = &mut self.towards[t];
        // Never beyond what was sent: an agent cannot acknowledge frames away unseen.
        let n = n.min(towards.sent_upto);
        if n <= towards.acked_out {
            return;
        }
        towards.acked_out = n;
        let mut delivered = 0u64;
        while let Some(front) = towards.inflight.front() {
            if front.end() > n {
                break;
            }
            delivered += u64::from(front.count);
            towards.inflight_frames -= u64::from(front.count);
            towards.inflight.pop_front();
        }
        towards.delivered += delivered;
        if towards.buffered > 0 {
            towards.db_ack = Some(n);
        }
        let stats = &self.core.stats;
        stats.add(
            &stats.frames_delivered,
            "relay_frames_delivered_total",
            delivered,
        );
        self.dirty();
    }

    fn drops(&mut self, agent_id: Uuid, side: Side, total: u64) {
        let source = &mut self.from[side_index(side)];
        if !source.agents.contains(&agent_id) || total > MAX_DROPS {
            return;
        }
        // A running total; a smaller one means the agent started counting again (it restarted).
        let increment = if total >= source.drops_last {
            total - source.drops_last
        } else {
            total
        };
        source.drops += increment;
        source.drops_last = total;
        self.dirty();
    }

    fn dirty(&mut self) {
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + self.core.settings.flush_interval);
        }
    }

    /// The group's sides and agents from the database, then the connections.
    async fn refresh(&mut self) {
        self.looked_at = Instant::now();
        self.refresh_at = self.looked_at + self.core.settings.refresh_interval;
        match super::sides_of(&self.core.pool, self.group_id).await {
            Ok(Some(group)) if group.mode.relaying() => {
                for i in 0..2 {
                    let before = self.from[i].agents.first().copied();
                    self.from[i].agents = group.sides[i].agents.clone();
                    let after = self.from[i].agents.first().copied();
                    if before != after {
                        // Nothing else tells the new serving agent (the old one timing out is no
                        // event), and a side nobody is told of stays in the buffer for ever.
                        self.core.serving_changed(before, after);
                    }
                }
                self.mode = group.mode;
            }
            Ok(_) => {
                self.gone = true;
                return;
            }
            Err(e) => {
                tracing::warn!(group_id = %self.group_id, error = %e, "could not read a group's sides");
                return;
            }
        }
        // Another instance may have written or delivered meanwhile.
        if let Ok(rows) = buffer::load(&self.core.pool, self.group_id).await {
            for (i, row) in rows.iter().enumerate() {
                let from = &mut self.from[i];
                if row.next_in > from.next_in {
                    from.next_in = row.next_in;
                    from.acked_in = from.acked_in.max(row.next_in);
                    self.shared.acked_in[i].store(from.acked_in, Ordering::Relaxed);
                }
                let towards = &mut self.towards[i];
                towards.buffered = row.buffered;
                towards.tail = towards.tail.max(row.tail);
                towards.acked_out = towards.acked_out.max(row.acked_out);
            }
        }
        self.look_at_connections();
    }

    /// Which sides' serving agents have their data connection here; handles those that came and went.
    fn look_at_connections(&mut self) {
        for i in 0..2 {
            let now = self.from[i]
                .agents
                .first()
                .and_then(|agent| self.core.conn_of(*agent).map(|conn| (*agent, conn)));
            let towards = &mut self.towards[i];
            if towards.conn == now {
                continue;
            }
            if towards.conn.is_some() {
                // What was in flight on the old connection goes back in front of what waits: it was
                // acknowledged to its sender, so it must not be lost.
                let inflight: Vec<Chunk> = towards.inflight.drain(..).collect();
                let frames = towards.inflight_frames;
                towards.inflight_frames = 0;
                if !inflight.is_empty() {
                    towards.pending.splice(0..0, inflight);
                    towards.pending_frames += frames;
                    towards.pending_since = Some(Instant::now() - self.core.settings.gather);
                }
            }
            towards.conn = now;
            // A new connection gets the buffer from its oldest frame.
            towards.cursor = 0;
            towards.sent_upto = towards.acked_out;
            towards.replay_at = now.map(|_| Instant::now());
            towards.poll_at = None;
            towards.poll_every = None;
            self.shared.data_connected[i].store(now.is_some(), Ordering::Relaxed);
        }
    }

    /// The next moment something is due.
    fn next_wake(&self) -> Option<Instant> {
        let settings = &self.core.settings;
        let now = Instant::now();
        let mut wake = self.refresh_at;
        let mut at = |t: Instant| wake = wake.min(t);
        if let Some(flush) = self.flush_at {
            at(flush);
        }
        for (i, t) in self.towards.iter().enumerate() {
            if let Some(retry) = t.retry_at {
                at(retry);
                continue;
            }
            if let Some(since) = t.pending_since {
                at(since + settings.gather);
            }
            if t.db_ack.is_some() {
                at(now);
            }
            if t.conn.is_some() {
                if t.tail > t.cursor {
                    at(t.replay_at.unwrap_or(now));
                } else if self.sender_elsewhere(i) {
                    at(t.poll_at.unwrap_or(now));
                }
            }
            if t.buffered > 0 {
                at(t.retention_at.unwrap_or(now));
            }
            if t.trimmed_unaudited > 0 {
                at(t.last_trim_audit
                    .map_or(now, |l| l + settings.trim_audit_interval));
            }
        }
        Some(wake)
    }

    /// The side sending towards `t` is not connected here: its frames can only come through the
    /// buffer, written by another instance.
    fn sender_elsewhere(&self, t: usize) -> bool {
        self.towards[1 - t].conn.is_none()
    }

    /// Does what is due: writes, acknowledgements to the buffer, replay, retention, counters, a look at
    /// the group, the state.
    async fn work(&mut self) {
        let now = Instant::now();
        for t in 0..2 {
            if self.towards[t].retry_at.is_some_and(|r| r > now) {
                continue;
            }
            self.towards[t].retry_at = None;
            if let Some(n) = self.towards[t].db_ack.take()
                && !self.apply_ack(t, n).await
            {
                continue;
            }
            let due = self.towards[t]
                .pending_since
                .is_some_and(|since| now >= since + self.core.settings.gather);
            if (due || self.gathered_enough()) && !self.towards[t].pending.is_empty() {
                self.commit(t).await;
            }
            if self.gone {
                return;
            }
            self.retention(t, now).await;
            self.replay(t).await;
        }
        if self.flush_at.is_some_and(|f| now >= f) {
            self.flush().await;
        }
        if now >= self.refresh_at {
            self.refresh().await;
        }
        self.evaluate().await;
    }

    /// Before the pipe ends: with `keep`, what is in flight and what waits goes to the buffer (it was
    /// or will be acknowledged to its sender); then the counters go to the database.
    async fn finish(&mut self, keep: bool) {
        if keep {
            for t in 0..2 {
                let towards = &mut self.towards[t];
                let inflight: Vec<Chunk> = towards.inflight.drain(..).collect();
                towards.pending_frames += towards.inflight_frames;
                towards.inflight_frames = 0;
                towards.pending.splice(0..0, inflight);
                if let Some(n) = towards.db_ack.take() {
                    self.apply_ack(t, n).await;
                }
                if !self.towards[t].pending.is_empty() {
                    self.commit(t).await;
                }
            }
        }
        self.flush().await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
