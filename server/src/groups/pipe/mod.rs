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
//! [`machine`]: every decision above, as a pure state machine (inputs and the time in, actions out),
//! unit-tested on its own. This file: the thin driver that feeds it the pipe's events and carries out
//! its actions with the database ([`super::buffer`]) and the agents' connections ([`super::relay`]).
//!
//! Every queue is bounded: the pipe's inbox (its senders wait, which slows the sockets' readers), the
//! frames in flight (past the limit, frames are buffered) and the frames waiting for a write (if the
//! database cannot take them, the sending agent's data connection is closed, so that it sends them
//! again later, instead of the server holding more).

mod machine;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use control_proto::data::{self, PerSide, Side};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::buffer::{self, Append, BufferError, Retention, SideCounters};
use super::chunk::Chunk;
use super::links::{Core, PipeShared, RelayEvent, SendError};
use super::model::Mode;
use machine::{Action, Conn, Failure, Frames, Input, Loaded, Machine, Reply, Request, SidesRead};
pub use machine::{MAX_POSITION, bus_frames_per_second};

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
    /// Frames towards `towards` were committed to the buffer, maybe by another instance.
    Buffered { towards: Side },
    /// Look at the group's sides and connections again (`done` answers after the look).
    Refresh { done: Option<oneshot::Sender<()>> },
    /// End: after writing what is held to the buffer, or at once with `discard` (the group is gone).
    Stop {
        discard: bool,
        done: Option<oneshot::Sender<()>>,
    },
}

/// One group's relay: the machine and what it needs to act.
pub(crate) struct Pipe {
    core: Arc<Core>,
    group_id: Uuid,
    user_id: Uuid,
    machine: Machine,
    shared: Arc<PipeShared>,
    /// The group is CROSS_INSTANCE as this pipe knows it, and counts in the `relay_groups_cross_instance`
    /// gauge.
    counted_cross: bool,
    /// The sides whose `relay_sides.served_by` names this instance, as last written.
    marked: PerSide<bool>,
    /// The machine's counters being written in the background ([`Action::Flush`]).
    flushing: Option<tokio::task::JoinHandle<Result<(), Failure>>>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.count_cross(false);
    }
}

impl Pipe {
    /// Reads the group; None when it does not exist or is not relaying.
    pub(crate) async fn load(core: Arc<Core>, group_id: Uuid) -> Result<Option<Pipe>, BufferError> {
        let Some(group) = super::serving::sides_of(&core.pool, group_id).await? else {
            return Ok(None);
        };
        if !group.mode.relaying() {
            return Ok(None);
        }
        let rows = core.frames.load(&core.pool, group_id).await?;
        let buffer_pressure: bool =
            sqlx::query_scalar("SELECT buffer_pressure FROM dongle_groups WHERE id = $1")
                .bind(group_id)
                .fetch_optional(&core.pool)
                .await?
                .unwrap_or(false);
        let [a, b] = group.sides;
        let loaded = Loaded {
            group_id,
            mode: group.mode,
            buffer_pressure,
            dongles: PerSide::new(a.dongle_id, b.dongle_id),
            agents: PerSide::new(a.agents, b.agents),
            bitrates: PerSide::new(a.bitrate, b.bitrate),
            rows: PerSide::new(rows[0], rows[1]),
        };
        let machine = Machine::new(loaded, core.settings.clone(), Instant::now());
        let pipe = Pipe {
            group_id,
            user_id: group.user_id,
            machine,
            shared: Arc::new(PipeShared::default()),
            counted_cross: false,
            marked: PerSide::default(),
            flushing: None,
            core,
        };
        pipe.publish();
        Ok(Some(pipe))
    }

    pub(crate) fn user_id(&self) -> Uuid {
        self.user_id
    }

    pub(crate) fn shared(&self) -> Arc<PipeShared> {
        self.shared.clone()
    }

    /// Runs until stopped, until the group stops relaying, or until the relay drops its handle.
    pub(crate) async fn run(mut self, rx: mpsc::Receiver<PipeEvent>) {
        self.relay(rx).await;
        // The group's sides are no longer served here, whatever their connections do next.
        self.mark_served(PerSide::default()).await;
        self.core.frames.forget(self.group_id);
    }

    async fn relay(&mut self, mut rx: mpsc::Receiver<PipeEvent>) {
        tracing::debug!(group_id = %self.group_id, "group relay started");
        self.step(Input::Start).await;
        loop {
            let wake = self.machine.next_wake(Instant::now());
            // Taken out for the wait, so that the handling below may use `self`.
            let mut flushing = self.flushing.take();
            let woke = tokio::select! {
                event = rx.recv() => Woke::Event(event),
                result = background(&mut flushing) => Woke::Flushed(result),
                () = tokio::time::sleep_until(wake) => Woke::Timer,
            };
            self.flushing = flushing;
            let event = match woke {
                Woke::Event(Some(event)) => Some(event),
                Woke::Event(None) => {
                    self.finish().await;
                    break;
                }
                Woke::Flushed(result) => {
                    self.step(Input::Flushed(result)).await;
                    None
                }
                Woke::Timer => None,
            };
            if let Some(mut event) = event {
                // A burst is handled as a whole, so that it becomes one write.
                loop {
                    let input = match event {
                        PipeEvent::Stop { discard, done } => {
                            if !discard {
                                self.finish().await;
                            }
                            if let Some(done) = done {
                                let _ = done.send(());
                            }
                            tracing::debug!(group_id = %self.group_id, "group relay stopped");
                            return;
                        }
                        PipeEvent::Refresh { done } => {
                            self.step(Input::Refresh).await;
                            if let Some(done) = done {
                                let _ = done.send(());
                            }
                            None
                        }
                        PipeEvent::Frames {
                            agent_id,
                            side,
                            n,
                            batch,
                            count,
                        } => Some(Input::Frames(Frames {
                            agent_id,
                            side,
                            n,
                            batch,
                            count,
                        })),
                        PipeEvent::Ack { agent_id, side, n } => {
                            Some(Input::Ack { agent_id, side, n })
                        }
                        PipeEvent::Buffered { towards } => Some(Input::Buffered { towards }),
                        PipeEvent::Drops {
                            agent_id,
                            side,
                            total,
                        } => Some(Input::Drops {
                            agent_id,
                            side,
                            total,
                        }),
                    };
                    if let Some(input) = input {
                        self.step(input).await;
                    }
                    if self.machine.gathered_enough() {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(next) => event = next,
                        Err(_) => break,
                    }
                }
            }
            self.step(Input::Tick).await;
            if self.machine.gone() {
                self.finish().await;
                tracing::debug!(group_id = %self.group_id, "group relay ended: the group no longer relays");
                return;
            }
        }
    }

    /// Ends the pipe: the counters being written in the background are written first (or given back
    /// to the machine), so that its last flush comes after them.
    async fn finish(&mut self) {
        if let Some(handle) = self.flushing.take() {
            let result = handle.await.unwrap_or(Err(Failure::Db));
            self.step(Input::Flushed(result)).await;
        }
        self.step(Input::Finish).await;
    }

    /// Writes the machine's counters of both sides in a task of their own; the result comes back to the
    /// machine as [`Input::Flushed`].
    fn flush_in_background(&mut self, counters: PerSide<SideCounters>) {
        let pool = self.core.pool.clone();
        let group_id = self.group_id;
        self.flushing = Some(tokio::spawn(async move {
            for side in PerSide::<()>::SIDES {
                if let Err(e) = buffer::flush_counters(&pool, group_id, side, counters[side]).await
                {
                    if let BufferError::Db(e) = &e {
                        tracing::warn!(%group_id, error = %e, "could not write a group's counters");
                    }
                    return Err(failure_of(&pool, e));
                }
            }
            Ok(())
        }));
    }

    /// Feeds the machine one input and carries out what it asks, answer after answer.
    async fn step(&mut self, input: Input) {
        let mut actions = self.machine.on(Instant::now(), input);
        loop {
            let mut reply = None;
            for action in actions {
                if let Some(answer) = self.perform(action).await {
                    reply = Some(answer);
                }
            }
            match reply {
                Some(reply) => actions = self.machine.on(Instant::now(), Input::Done(reply)),
                None => break,
            }
        }
        self.count();
        self.publish();
        self.count_cross(self.machine.mode() == Mode::CrossInstance);
    }

    /// What the rest of the instance reads of the pipe: positions, connections, counters.
    fn publish(&self) {
        for side in PerSide::<()>::SIDES {
            self.shared.acked_in[side].store(self.machine.acked_in(side), Ordering::Relaxed);
            self.shared.data_connected[side]
                .store(self.machine.data_connected(side), Ordering::Relaxed);
        }
    }

    async fn perform(&mut self, action: Action) -> Option<Reply> {
        let core = &self.core;
        match action {
            Action::Ack { agent, side, n } => {
                core.send_lossy(agent, data::encode_ack(self.group_id, side, n));
            }
            Action::Close { agent } => core.close(agent),
            Action::Publish {
                from,
                from_dongle_id,
                to_dongle_id,
                chunk,
            } => core.emit(RelayEvent::Frames {
                group_id: self.group_id,
                from,
                from_dongle_id,
                to_dongle_id,
                first_seq: chunk.seq,
                count: chunk.count,
                batch: chunk.batch,
            }),
            Action::Announce(a) => core.emit(RelayEvent::GroupState {
                group_id: self.group_id,
                state: a.state,
                buffer_pressure: a.buffer_pressure,
                backlog_a_to_b: a.backlog_a_to_b,
                backlog_b_to_a: a.backlog_b_to_a,
                offline: a.offline,
            }),
            Action::ServingChanged { before, after } => core.serving_changed(before, after),
            Action::Flush(counters) => self.flush_in_background(counters),
            Action::Request(request) => return Some(self.request(request).await),
        }
        None
    }

    /// Adds the machine's counts to the relay's counters.
    fn count(&mut self) {
        let tally = self.machine.take_tally();
        let stats = &self.core.stats;
        for (counter, name, n) in [
            (
                &stats.frames_accepted,
                "relay_frames_accepted_total",
                tally.accepted,
            ),
            (
                &stats.frames_duplicate,
                "relay_frames_duplicate_total",
                tally.duplicate,
            ),
            (
                &stats.frames_refused,
                "relay_frames_refused_total",
                tally.refused,
            ),
            (
                &stats.frames_forwarded,
                "relay_frames_forwarded_total",
                tally.forwarded,
            ),
            (
                &stats.frames_buffered,
                "relay_frames_buffered_total",
                tally.buffered,
            ),
            (
                &stats.frames_delivered,
                "relay_frames_delivered_total",
                tally.delivered,
            ),
            (
                &stats.frames_trimmed,
                "relay_frames_trimmed_total",
                tally.trimmed,
            ),
        ] {
            stats.add(counter, name, n);
        }
    }

    fn retention(&self) -> Retention {
        Retention {
            max_frames: self.core.settings.buffer_max_frames,
            max_age: self.core.settings.buffer_max_age,
        }
    }

    /// Carries out one request of the machine; every failure is logged here, with its cause.
    async fn request(&mut self, request: Request) -> Reply {
        let core = self.core.clone();
        let pool = &core.pool;
        let group_id = self.group_id;
        match request {
            Request::Connections { agents } => {
                let conns = agents.map(|_, agent| agent.and_then(|a| core.conn_of(a)));
                self.mark_served(conns.map(|_, c| c.is_some())).await;
                Reply::Connections(conns)
            }
            Request::Sides => Reply::Sides(read_sides(&core, group_id).await.map_err(|e| {
                tracing::warn!(%group_id, error = %e, "could not read a group's sides");
                self.failure(BufferError::Db(e))
            })),
            Request::Rows => Reply::Rows(
                core.frames
                    .load(pool, group_id)
                    .await
                    .map(|rows| PerSide::new(rows[0], rows[1]))
                    .map_err(|e| self.failed(e, "could not read a group's buffer rows")),
            ),
            Request::Forward {
                towards,
                conn,
                chunk,
            } => Reply::Forwarded(self.queue(towards, conn, &chunk)),
            Request::Delete { towards, n } => Reply::Deleted(
                core.frames
                    .acknowledge(pool, group_id, towards, n)
                    .await
                    .map_err(|e| {
                        self.failed(e, "could not apply an acknowledgement to the buffer")
                    }),
            ),
            Request::Write {
                towards,
                chunks,
                source_next_in,
                audit_due,
                carried,
            } => Reply::Written(
                self.append(towards, &chunks, Some(source_next_in), audit_due, carried)
                    .await
                    .map_err(|e| self.failed(e, "could not write frames to the buffer; retrying")),
            ),
            Request::Retain {
                towards,
                audit_due,
                carried,
            } => Reply::Retained(
                self.append(towards, &[], None, audit_due, carried)
                    .await
                    .map_err(|e| self.failed(e, "could not apply the buffer's retention")),
            ),
            Request::AuditTrim { towards, frames } => Reply::TrimAudited(
                buffer::audit_trim(pool, group_id, towards, frames, self.retention())
                    .await
                    .map_err(|e| self.failed(e, "could not audit a buffer trim")),
            ),
            Request::Fetch {
                towards,
                from,
                limit,
            } => Reply::Fetched(
                core.frames
                    .fetch(pool, group_id, towards, from, limit)
                    .await
                    .map_err(|e| self.failed(e, "could not read the buffer to replay it")),
            ),
            Request::Replay {
                towards,
                conn,
                chunks,
            } => {
                let mut sent = 0;
                let mut stopped = None;
                for chunk in &chunks {
                    match self.queue(towards, conn, chunk) {
                        Ok(()) => sent += 1,
                        Err(e) => {
                            stopped = Some(e);
                            break;
                        }
                    }
                }
                Reply::Replayed { sent, stopped }
            }
            Request::Flush { side, counters } => Reply::Flushed(
                buffer::flush_counters(pool, group_id, side, counters)
                    .await
                    .map_err(|e| self.failed(e, "could not write a group's counters")),
            ),
            Request::SetMode {
                mode,
                clear_pressure,
            } => Reply::ModeSet(
                buffer::set_mode(pool, group_id, mode, clear_pressure)
                    .await
                    .map_err(|e| {
                        self.failed(BufferError::Db(e), "could not write a group's state")
                    }),
            ),
        }
    }

    /// Records in `relay_sides.served_by` which sides' data connections this instance holds, when
    /// several instances share the database, so that the instance serving the other side can tell
    /// CROSS_INSTANCE from DEGRADED. A side held here is written at every look (the update changes
    /// nothing when the row already says so): the record may be lost behind this pipe's back, when
    /// another instance took this one for dead and deleted its rows, and the instances must not then
    /// disagree for as long as the connection lasts. A failed write is retried at the next look.
    ///
    /// A change of this pipe's own view (a side it now holds, or no longer holds) is announced to the
    /// other instances; rewriting a row that another instance had taken is not, so that two instances
    /// that both hold a connection of one side (an old one not yet dead) do not wake each other in a
    /// loop: they take the row in turn at their periodic looks, as before.
    async fn mark_served(&mut self, here: PerSide<bool>) {
        let Some((instance_id, _)) = self.core.cluster else {
            return;
        };
        for (side, here) in here.iter() {
            if !*here && !self.marked[side] {
                continue;
            }
            match super::serving::mark_served(
                &self.core.pool,
                self.group_id,
                side,
                instance_id,
                *here,
            )
            .await
            {
                Ok(changed) => {
                    let view_changed = self.marked[side] != *here;
                    self.marked[side] = *here;
                    if changed && view_changed {
                        // The instance serving the other side looks at the sides now rather
                        // than at its next periodic look.
                        buffer::announce_served(&self.core.pool, self.group_id).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(group_id = %self.group_id, error = %e, "could not record where a group side is served")
                }
            }
        }
    }

    /// Keeps the `relay_groups_cross_instance` gauge: the groups relaying on this instance that are
    /// CROSS_INSTANCE.
    fn count_cross(&mut self, cross: bool) {
        if cross != self.counted_cross {
            self.counted_cross = cross;
            let gauge = metrics::gauge!("relay_groups_cross_instance");
            if cross {
                gauge.increment(1.0);
            } else {
                gauge.decrement(1.0);
            }
        }
    }

    /// Queues FRAMES of one chunk on an agent's data connection, without waiting.
    fn queue(&self, towards: Side, (agent, conn): Conn, chunk: &Chunk) -> Result<(), SendError> {
        let message = data::encode_frames(self.group_id, towards, chunk.seq, &chunk.batch);
        hops::mark_message(hops::Hop::ServerQueued, &message);
        self.core.send_on(agent, conn, message)
    }

    /// One write to a direction's buffer (none of `chunks`: a retention pass).
    async fn append(
        &self,
        towards: Side,
        chunks: &[Chunk],
        source_next_in: Option<u64>,
        audit_due: bool,
        carried: u64,
    ) -> Result<buffer::Appended, BufferError> {
        let append = Append {
            group_id: self.group_id,
            target: towards,
            chunks,
            source_next_in,
            retention: self.retention(),
            audit_due,
            carried,
        };
        self.core.frames.append(&self.core.pool, append).await
    }

    /// Logs a failed request and says what it means for the machine.
    fn failed(&self, e: BufferError, what: &'static str) -> Failure {
        if let BufferError::Db(e) = &e {
            tracing::warn!(group_id = %self.group_id, error = %e, "{what}");
        }
        self.failure(e)
    }

    fn failure(&self, e: BufferError) -> Failure {
        failure_of(&self.core.pool, e)
    }
}

/// What a buffer error means to the machine. A closed pool means this server is gone (stopped or
/// killed): the pipe ends.
fn failure_of(pool: &sqlx::PgPool, e: BufferError) -> Failure {
    match e {
        BufferError::Gone => Failure::Gone,
        _ if pool.is_closed() => Failure::Gone,
        _ => Failure::Db,
    }
}

/// What woke the pipe.
enum Woke {
    Event(Option<PipeEvent>),
    Flushed(Result<(), Failure>),
    Timer,
}

/// The result of the background flush, when one is out; never otherwise. Cancel-safe: the handle
/// stays until the task has ended.
async fn background(
    handle: &mut Option<tokio::task::JoinHandle<Result<(), Failure>>>,
) -> Result<(), Failure> {
    let Some(task) = handle.as_mut() else {
        return std::future::pending().await;
    };
    let result = task.await.unwrap_or(Err(Failure::Db));
    *handle = None;
    result
}

/// The group's sides as the database has them, and whether each side's data connection is held by
/// another live instance (which makes the group CROSS_INSTANCE rather than DEGRADED while the other
/// side is here).
async fn read_sides(core: &Core, group_id: Uuid) -> Result<Option<SidesRead>, sqlx::Error> {
    let Some(group) = super::serving::sides_of(&core.pool, group_id).await? else {
        return Ok(None);
    };
    let [a, b] = group.sides;
    let elsewhere = match core.cluster {
        Some((instance_id, stale_after)) => {
            super::serving::served_elsewhere(&core.pool, group_id, instance_id, stale_after).await?
        }
        None => PerSide::default(),
    };
    Ok(Some(SidesRead {
        mode: group.mode,
        agents: PerSide::new(a.agents, b.agents),
        elsewhere,
        bitrates: PerSide::new(a.bitrate, b.bitrate),
    }))
}
