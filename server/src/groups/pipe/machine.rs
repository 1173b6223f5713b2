//! The pure core of one group's relay: every decision of the pipe, and no I/O.
//!
//! The [`Machine`] is told what happened ([`Input`]: frames, acknowledgements and drop totals from
//! agents, a tick, and the answers to what it asked for) together with the time, and answers with
//! [`Action`]s: effects to carry out (acknowledge a sender, close a connection, publish to the console)
//! and at most one [`Request`], always last, whose answer the driver must give back as
//! [`Input::Done`] before anything else. The driver ([`super::Pipe`]) does the SQL and the sockets; the
//! tests drive the machine with an in-memory buffer and fake agents instead (see `machine/tests.rs`).
//!
//! Work that takes several round trips (a tick writes, deletes, replays, writes counters, reads the
//! group again, writes the state) is a small program of [`Phase`]s: each phase either finds nothing due
//! and gives way to the next, or sends one request and waits for its answer. An answer can change the
//! rest of the program: a failed delete skips the rest of that direction's work, a lost connection
//! inserts a look at the connections, a group that is gone ends the round.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use control_proto::data::{PerSide, Side};
use tokio::time::Instant;
use uuid::Uuid;

use crate::groups::buffer::{Acknowledged, Appended, SideCounters, SideRow};
use crate::groups::chunk::Chunk;
pub use crate::groups::links::SendError;
use crate::groups::model::Mode;
use crate::groups::settings::RelaySettings;

/// The largest stream position accepted: far beyond any real stream, and small enough that a position
/// plus a batch never overflows, in Rust or in PostgreSQL's bigint.
pub const MAX_POSITION: u64 = 1 << 62;
/// The largest drop total believed: more than any agent can drop, small enough that adding many never
/// overflows a counter.
const MAX_DROPS: u64 = 1 << 48;
/// The most buffered chunks sent in one replay step.
pub const REPLAY_ROWS: usize = 32;
/// How long a replay waits when the receiving socket's queue is full.
const REPLAY_BACKOFF: Duration = Duration::from_millis(20);
/// How long to wait before writing again after the database failed.
const DB_RETRY: Duration = Duration::from_millis(500);
/// How often retention runs on a buffer that nobody writes to.
const RETENTION_EVERY: Duration = Duration::from_secs(1);
/// Frames from an agent the pipe does not know for their side make it read the group again, at most
/// this often.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// An agent's data connection on this instance: the agent and the connection's id.
pub type Conn = (Uuid, u64);

/// Why a database request failed, as far as the machine cares (the driver logs the error itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The group was deleted, or this server's pool is closed: the pipe ends.
    Gone,
    /// Anything else: tried again later.
    Db,
}

/// FRAMES from an agent for the stream of `side`.
#[derive(Debug, Clone)]
pub struct Frames {
    pub agent_id: Uuid,
    pub side: Side,
    pub n: u64,
    pub batch: Arc<[u8]>,
    pub count: u32,
}

/// What the machine is told.
#[derive(Debug)]
pub enum Input {
    /// The pipe starts: look at the connections, then write the state.
    Start,
    Frames(Frames),
    /// ACK from an agent: the frames towards `side` below `n` reached its dongle.
    Ack {
        agent_id: Uuid,
        side: Side,
        n: u64,
    },
    /// DROPS from an agent: its running total for `side`.
    Drops {
        agent_id: Uuid,
        side: Side,
        total: u64,
    },
    /// Read the group's sides, its buffer's rows and the connections again.
    Refresh,
    /// Frames towards `towards` were committed to the buffer (by another instance, as a rule): look
    /// for them at the next tick instead of at the next poll.
    Buffered {
        towards: Side,
    },
    /// Do what is due.
    Tick,
    /// The pipe ends: what is in flight and what waits goes to the buffer, then the counters.
    Finish,
    /// The answer to the last [`Action::Flush`].
    Flushed(Result<(), Failure>),
    /// The answer to the last [`Request`].
    Done(Reply),
}

/// The group's sides as the database has them.
#[derive(Debug, Clone)]
pub struct SidesRead {
    pub mode: Mode,
    /// The agents that see each side's dongle now, the serving one first.
    pub agents: PerSide<Vec<Uuid>>,
    /// Per side: the serving agent is connected to another instance (so its frames cross through the
    /// buffer while it is there).
    pub elsewhere: PerSide<bool>,
    /// Per side: the bit rate its dongle applied (else the one asked for), when it has a configuration.
    pub bitrates: PerSide<Option<u32>>,
}

/// An answer to a [`Request`], of the same name.
#[derive(Debug)]
pub enum Reply {
    /// Each serving agent's data connection here, if it has one.
    Connections(PerSide<Option<u64>>),
    /// None when the group no longer exists.
    Sides(Result<Option<SidesRead>, Failure>),
    Rows(Result<PerSide<SideRow>, Failure>),
    Forwarded(Result<(), SendError>),
    Deleted(Result<Acknowledged, Failure>),
    Written(Result<Appended, Failure>),
    Retained(Result<Appended, Failure>),
    TrimAudited(Result<(), Failure>),
    Fetched(Result<Vec<Chunk>, Failure>),
    /// The first `sent` chunks were queued; `stopped` says why the next one was not.
    Replayed {
        sent: usize,
        stopped: Option<SendError>,
    },
    Flushed(Result<(), Failure>),
    /// The pressure flag after the write; None when the group no longer relays.
    ModeSet(Result<Option<bool>, Failure>),
}

/// What the machine asks of its driver; the answer comes back as the [`Reply`] of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Which of these agents has its data connection here, and its id.
    Connections { agents: PerSide<Option<Uuid>> },
    /// The group's mode and the agents of each side.
    Sides,
    /// Both sides' rows in the buffer tables.
    Rows,
    /// Queue FRAMES on the connection, without waiting.
    Forward {
        towards: Side,
        conn: Conn,
        chunk: Chunk,
    },
    /// The side acknowledged everything below `n`: delete it from the buffer.
    Delete { towards: Side, n: u64 },
    /// Write the chunks to the buffer in one transaction, with the source's position, then retention.
    Write {
        towards: Side,
        chunks: Vec<Chunk>,
        source_next_in: u64,
        audit_due: bool,
        carried: u64,
    },
    /// Retention alone, on a buffer nobody writes to.
    Retain {
        towards: Side,
        audit_due: bool,
        carried: u64,
    },
    /// Write the audit entry of trims held back.
    AuditTrim { towards: Side, frames: u64 },
    /// Up to `limit` buffered chunks from position `from` on.
    Fetch {
        towards: Side,
        from: u64,
        limit: usize,
    },
    /// Queue these buffered chunks on the connection, in order, stopping at the first that cannot be.
    Replay {
        towards: Side,
        conn: Conn,
        chunks: Vec<Chunk>,
    },
    /// Add the side's counters and move its positions up.
    Flush { side: Side, counters: SideCounters },
    /// Write the group's state (and clear its pressure flag).
    SetMode { mode: Mode, clear_pressure: bool },
}

/// What the driver does for the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send ACK `n` for the stream from `side` to the agent (losing it is harmless: the next covers it).
    Ack { agent: Uuid, side: Side, n: u64 },
    /// Close the agent's data connection: it reconnects and sends again what was not acknowledged.
    Close { agent: Uuid },
    /// Frames were accepted from `from`: the console's subscribers may see them.
    Publish {
        from: Side,
        from_dongle_id: Uuid,
        to_dongle_id: Uuid,
        chunk: Chunk,
    },
    /// The group's state, pressure flag or backlog changed.
    Announce(Announcement),
    /// A side's serving agent changed: both agents need a new `groups` list.
    ServingChanged {
        before: Option<Uuid>,
        after: Option<Uuid>,
    },
    /// Add both sides' counters and move their positions up, in the background: the frames go on
    /// meanwhile, and the answer comes back as [`Input::Flushed`]. One is out at a time, so that the
    /// agents' last drop totals are written in order.
    Flush(PerSide<SideCounters>),
    /// Always the last action; answer with [`Input::Done`].
    Request(Request),
}

/// The group's state and backlog as subscribers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    pub state: Mode,
    pub buffer_pressure: bool,
    pub backlog_a_to_b: u64,
    pub backlog_b_to_a: u64,
    /// The sides whose serving agent has no data connection here.
    pub offline: PerSide<bool>,
}

/// Frames counted since the driver last took the tally (it adds them to the relay's metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub accepted: u64,
    pub duplicate: u64,
    pub refused: u64,
    pub forwarded: u64,
    pub buffered: u64,
    pub delivered: u64,
    pub trimmed: u64,
}

/// What the machine knows when it starts (read by the driver).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub group_id: Uuid,
    pub mode: Mode,
    pub buffer_pressure: bool,
    pub dongles: PerSide<Uuid>,
    pub agents: PerSide<Vec<Uuid>>,
    /// Per side: the bit rate of its dongle's CAN configuration, when it has one.
    pub bitrates: PerSide<Option<u32>>,
    pub rows: PerSide<SideRow>,
}

/// The stream FROM one side.
#[derive(Debug, Default)]
struct Source {
    dongle_id: Uuid,
    /// The agents that see the dongle now, the serving one first; only they may send for this side.
    agents: Vec<Uuid>,
    /// The serving agent is connected to another instance.
    elsewhere: bool,
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
    conn: Option<Conn>,
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
    /// The highest position sent on the current connection (the in-flight window is counted from it).
    sent_upto: u64,
    /// The highest position ever sent towards the side, on any connection: an ACK never reaches
    /// beyond it. An agent's last acknowledgement may arrive after the pipe learnt that its connection
    /// closed, and still counts.
    sent_ever: u64,
    /// Everything below this was acknowledged by the side's agent.
    acked_out: u64,
    /// An acknowledgement to apply to the buffer (deferred, so that many become one write).
    db_ack: Option<u64>,
    /// Frames acknowledged straight from memory, not yet counted in the database.
    delivered: u64,
    /// When the next replay step may run (the rate limit).
    replay_at: Option<Instant>,
    /// What the receiving dongle's bus can carry, in frames per second, when its bit rate is known:
    /// replay never goes faster (see [`bus_frames_per_second`]).
    bus_rate: Option<u32>,
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

/// One step of a multi-step piece of work.
#[derive(Debug)]
enum Phase {
    /// Skips the direction's work while a database failure's back-off runs.
    Gate(Side),
    /// Applies the side's latest acknowledgement to the buffer.
    Delete(Side),
    /// Writes the frames waiting for the side (`always`: whether or not they are due).
    Write {
        towards: Side,
        always: bool,
    },
    Retention(Side),
    Replay(Side),
    /// What was in flight goes back in front of what waits (the pipe ends).
    Drain(Side),
    FlushIfDue,
    Flush,
    FlushSide(Side),
    /// Tells subscribers the state and backlog if they changed.
    Announce,
    RefreshIfDue,
    LoadSides,
    LoadRows,
    Connections,
    Evaluate,
    /// Frames from an agent not known for their side, held while the group was read again.
    Accept(Frames),
}

impl Phase {
    /// The direction a per-direction phase works on.
    fn direction(&self) -> Option<Side> {
        match self {
            Phase::Gate(t)
            | Phase::Delete(t)
            | Phase::Write { towards: t, .. }
            | Phase::Retention(t)
            | Phase::Replay(t) => Some(*t),
            _ => None,
        }
    }
}

/// The context of the request the machine waits on.
#[derive(Debug)]
enum Waiting {
    Connections(PerSide<Option<Uuid>>),
    Sides,
    Rows,
    Forward {
        sender: Uuid,
        towards: Side,
        chunk: Chunk,
    },
    Delete {
        towards: Side,
        n: u64,
    },
    Write {
        towards: Side,
        source_next_in: u64,
    },
    Retain {
        towards: Side,
    },
    AuditTrim {
        towards: Side,
    },
    Fetch {
        towards: Side,
    },
    Replay {
        towards: Side,
        sent: Vec<Chunk>,
    },
    Flush {
        side: Side,
        counters: SideCounters,
    },
    SetMode {
        mode: Mode,
    },
}

/// One group's relay, without I/O.
#[derive(Debug)]
pub struct Machine {
    group_id: Uuid,
    settings: RelaySettings,
    mode: Mode,
    buffer_pressure: bool,
    from: PerSide<Source>,
    /// `towards.b` is the direction a_to_b.
    towards: PerSide<Towards>,
    flush_at: Option<Instant>,
    refresh_at: Instant,
    /// When the group's sides were last read.
    looked_at: Instant,
    /// The last state and backlog announced to subscribers.
    announced: Announcement,
    /// The group was deactivated or deleted: the pipe ends.
    gone: bool,
    /// Finishing: failures no longer cut the work short.
    finishing: bool,
    program: VecDeque<Phase>,
    waiting: Option<Waiting>,
    /// The counters of the [`Action::Flush`] out, until its answer; they are no longer in `from` and
    /// `towards`, and go back there if it failed.
    flushing: Option<PerSide<SideCounters>>,
    tally: Tally,
}

impl Machine {
    pub fn new(loaded: Loaded, settings: RelaySettings, now: Instant) -> Machine {
        let Loaded {
            group_id,
            mode,
            buffer_pressure,
            dongles,
            mut agents,
            bitrates,
            rows,
        } = loaded;
        let from = PerSide::from_fn(|side| Source {
            dongle_id: dongles[side],
            agents: std::mem::take(&mut agents[side]),
            next_in: rows[side].next_in,
            acked_in: rows[side].next_in,
            drops_last: rows[side].agent_drops_last,
            ..Source::default()
        });
        let towards = PerSide::from_fn(|side| Towards {
            buffered: rows[side].buffered,
            tail: rows[side].tail,
            acked_out: rows[side].acked_out,
            sent_upto: rows[side].acked_out,
            sent_ever: rows[side].acked_out,
            bus_rate: bitrates[side].map(bus_frames_per_second),
            ..Towards::default()
        });
        Machine {
            group_id,
            mode,
            buffer_pressure,
            announced: Announcement {
                state: mode,
                buffer_pressure,
                backlog_a_to_b: rows.b.buffered,
                backlog_b_to_a: rows.a.buffered,
                offline: PerSide::new(true, true),
            },
            from,
            towards,
            flush_at: None,
            refresh_at: now + settings.refresh_interval,
            looked_at: now,
            gone: false,
            finishing: false,
            program: VecDeque::new(),
            waiting: None,
            flushing: None,
            tally: Tally::default(),
            settings,
        }
    }

    /// Handles one input; the actions are to be carried out in order.
    pub fn on(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Done(reply) => self.reply(now, reply, &mut out),
            // Inputs other than answers only come between requests (the driver answers first).
            _ if self.waiting.is_some() => {
                debug_assert!(false, "an input arrived while a request was open");
                tracing::error!(group_id = %self.group_id, "relay: an input arrived while a request was open");
                return out;
            }
            Input::Start => self.program.extend([Phase::Connections, Phase::Evaluate]),
            Input::Flushed(result) => self.flushed(now, result),
            Input::Frames(frames) => self.frames(now, frames, false, &mut out),
            Input::Ack { agent_id, side, n } => self.ack(now, agent_id, side, n),
            Input::Drops {
                agent_id,
                side,
                total,
            } => self.drops(now, agent_id, side, total),
            Input::Refresh => {
                self.program
                    .extend([Phase::LoadSides, Phase::LoadRows, Phase::Connections])
            }
            Input::Buffered { towards } => {
                let towards = &mut self.towards[towards];
                towards.poll_at = Some(now);
                towards.poll_every = None;
            }
            Input::Tick => {
                for t in PerSide::<()>::SIDES {
                    self.program.extend([
                        Phase::Gate(t),
                        Phase::Delete(t),
                        Phase::Write {
                            towards: t,
                            always: false,
                        },
                        Phase::Retention(t),
                        Phase::Replay(t),
                    ]);
                }
                self.program
                    .extend([Phase::FlushIfDue, Phase::RefreshIfDue, Phase::Evaluate]);
            }
            Input::Finish => {
                self.finishing = true;
                self.program.clear();
                for t in PerSide::<()>::SIDES {
                    self.program.extend([
                        Phase::Drain(t),
                        Phase::Delete(t),
                        Phase::Write {
                            towards: t,
                            always: true,
                        },
                    ]);
                }
                self.program.push_back(Phase::Flush);
            }
        }
        self.run(now, &mut out);
        out
    }

    /// The group no longer relays (or this server is going away): the pipe ends.
    pub fn gone(&self) -> bool {
        self.gone
    }

    /// The group's state as this pipe last wrote or read it.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Enough frames wait for a write that the driver should stop gathering input and tick.
    pub fn gathered_enough(&self) -> bool {
        self.towards
            .values()
            .any(|t| t.pending_frames >= self.settings.gather_max_frames)
    }

    /// The stream from `side` is acknowledged (forwarded or written) up to here.
    pub fn acked_in(&self, side: Side) -> u64 {
        self.from[side].acked_in
    }

    /// The serving agent of `side` has its data connection here, or on another live instance.
    pub fn data_connected(&self, side: Side) -> bool {
        self.towards[side].conn.is_some() || self.from[side].elsewhere
    }

    /// The frames counted since the last call.
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    /// The next moment something is due.
    pub fn next_wake(&self, now: Instant) -> Instant {
        let settings = &self.settings;
        let mut wake = self.refresh_at;
        let mut at = |t: Instant| wake = wake.min(t);
        if let Some(flush) = self.flush_at {
            at(flush);
        }
        for (side, t) in self.towards.iter() {
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
                } else if self.sender_elsewhere(side) {
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
        wake
    }

    /// Runs the program until a phase waits on a request or nothing is left.
    fn run(&mut self, now: Instant, out: &mut Vec<Action>) {
        while self.waiting.is_none() {
            if self.gone && !self.finishing {
                // Nothing more to do for a group that is gone but end.
                self.program.clear();
                return;
            }
            let Some(phase) = self.program.pop_front() else {
                return;
            };
            self.phase(now, phase, out);
        }
    }

    fn ask(&mut self, out: &mut Vec<Action>, request: Request, waiting: Waiting) {
        out.push(Action::Request(request));
        self.waiting = Some(waiting);
    }

    /// Drops the rest of this direction's phases from the program (a failure's back-off).
    fn skip_direction(&mut self, t: Side) {
        while self
            .program
            .front()
            .is_some_and(|p| p.direction() == Some(t))
        {
            self.program.pop_front();
        }
    }

    fn dirty(&mut self, now: Instant) {
        if self.flush_at.is_none() {
            self.flush_at = Some(now + self.settings.flush_interval);
        }
    }

    /// The side's counters to write: the counts since the last write, and the positions.
    fn counters(&self, side: Side) -> SideCounters {
        SideCounters {
            next_in: self.from[side].acked_in,
            frames_received: self.from[side].received,
            agent_drops: self.from[side].drops,
            agent_drops_last: self.from[side].drops_last,
            frames_delivered: self.towards[side].delivered,
            acked_out: self.towards[side].acked_out,
        }
    }

    /// The counts of `counters` are written (or being written): they are no longer to be written.
    fn counted(&mut self, side: Side, counters: &SideCounters) {
        self.from[side].received -= counters.frames_received;
        self.from[side].drops -= counters.agent_drops;
        self.towards[side].delivered -= counters.frames_delivered;
    }

    /// The answer to the background flush: a failed one's counts are to be written again.
    fn flushed(&mut self, now: Instant, result: Result<(), Failure>) {
        let Some(counters) = self.flushing.take() else {
            return;
        };
        match result {
            Ok(()) => {}
            Err(Failure::Gone) => self.gone = true,
            Err(Failure::Db) => {
                for side in PerSide::<()>::SIDES {
                    let c = &counters[side];
                    self.from[side].received += c.frames_received;
                    self.from[side].drops += c.agent_drops;
                    self.towards[side].delivered += c.frames_delivered;
                }
                self.dirty(now);
            }
        }
    }

    /// The side sending towards `t` is not connected here: its frames can only come through the
    /// buffer, written by another instance.
    fn sender_elsewhere(&self, t: Side) -> bool {
        self.towards[t.other()].conn.is_none()
    }

    // ---- Frames, acknowledgements and drops from agents ----

    fn frames(&mut self, now: Instant, f: Frames, looked: bool, out: &mut Vec<Action>) {
        if f.count == 0 {
            return;
        }
        let s = f.side;
        let t = s.other();
        if f.n > MAX_POSITION {
            self.tally.refused += u64::from(f.count);
            return;
        }
        if !self.from[s].agents.contains(&f.agent_id) {
            if looked || now.saturating_duration_since(self.looked_at) < LOOK_AGAIN {
                tracing::debug!(group_id = %self.group_id, agent_id = %f.agent_id, side = ?s,
                    "frames refused: the agent does not serve this side");
                self.tally.refused += u64::from(f.count);
                return;
            }
            // The agent may have started serving the side since the group was read: read it again,
            // then decide.
            let agent_id = f.agent_id;
            for phase in [
                Phase::Accept(f),
                Phase::Connections,
                Phase::LoadRows,
                Phase::LoadSides,
            ] {
                self.program.push_front(phase);
            }
            tracing::debug!(group_id = %self.group_id, %agent_id, "frames from an agent not known for the side: reading the group again");
            return;
        }
        if self.towards[t].pending_frames >= self.settings.gather_max_frames.saturating_mul(16) {
            // The database does not keep up (or is down): accept no more. The sender's connection
            // closes, and it sends these again, from its first unacknowledged frame, when it is back.
            tracing::warn!(group_id = %self.group_id, side = ?s, "frames wait too long for the buffer: closing the sender's data connection");
            out.push(Action::Close { agent: f.agent_id });
            return;
        }
        let chunk = Chunk {
            seq: f.n,
            count: f.count,
            batch: f.batch,
        };
        let source = &mut self.from[s];
        if chunk.end() <= source.next_in {
            // All of it arrived before (a resend after a reconnect): acknowledge what is safe.
            self.tally.duplicate += u64::from(f.count);
            if source.acked_in > f.n {
                out.push(Action::Ack {
                    agent: f.agent_id,
                    side: s,
                    n: source.acked_in,
                });
            }
            return;
        }
        if f.n > source.next_in {
            // Frames before these never reached the pipe (refused while it did not yet count the agent
            // as serving the side, say), and the agent still holds them, unacknowledged. Accepting these
            // would lose those for good: closing the connection makes the agent send again from its
            // first unacknowledged frame.
            tracing::info!(group_id = %self.group_id, side = ?s, expected = source.next_in, got = f.n,
                "a gap in a side's stream: closing the sender's data connection so that it sends again");
            self.tally.refused += u64::from(f.count);
            out.push(Action::Close { agent: f.agent_id });
            return;
        }
        let skip = (source.next_in - f.n) as u32;
        let Some(chunk) = chunk.skip(skip) else {
            return;
        };
        self.tally.duplicate += u64::from(skip);
        self.tally.accepted += u64::from(chunk.count);
        source.next_in = chunk.end();
        source.received += u64::from(chunk.count);
        self.dirty(now);
        out.push(Action::Publish {
            from: s,
            from_dongle_id: self.from[s].dongle_id,
            to_dongle_id: self.from[t].dongle_id,
            chunk: chunk.clone(),
        });
        match self.forwardable(t, &chunk) {
            Some(conn) => self.ask(
                out,
                Request::Forward {
                    towards: t,
                    conn,
                    chunk: chunk.clone(),
                },
                Waiting::Forward {
                    sender: f.agent_id,
                    towards: t,
                    chunk,
                },
            ),
            None => self.hold(now, f.agent_id, t, chunk),
        }
    }

    /// The connection to send a chunk to straight away, if the direction allows it; None when it must
    /// be buffered instead (no connection, older frames still buffered or waiting, too much in flight).
    fn forwardable(&self, t: Side, chunk: &Chunk) -> Option<Conn> {
        let towards = &self.towards[t];
        let conn = towards.conn?;
        let room = self.unacked(t) + u64::from(chunk.count) <= self.settings.inflight_max_frames;
        (towards.pending.is_empty() && towards.tail <= towards.cursor && room).then_some(conn)
    }

    /// Queues a chunk for the next write to the buffer; its sender is acknowledged after the commit.
    fn hold(&mut self, now: Instant, sender: Uuid, t: Side, chunk: Chunk) {
        let towards = &mut self.towards[t];
        towards.pending_frames += u64::from(chunk.count);
        towards.pending.push(chunk);
        towards.pending_since.get_or_insert(now);
        self.from[t.other()].ack_to = Some(sender);
    }

    fn forwarded(
        &mut self,
        now: Instant,
        sender: Uuid,
        t: Side,
        chunk: Chunk,
        result: Result<(), SendError>,
        out: &mut Vec<Action>,
    ) {
        let s = t.other();
        match result {
            Ok(()) => {
                let towards = &mut self.towards[t];
                towards.inflight_frames += u64::from(chunk.count);
                towards.sent_upto = towards.sent_upto.max(chunk.end());
                towards.sent_ever = towards.sent_ever.max(chunk.end());
                self.tally.forwarded += u64::from(chunk.count);
                towards.inflight.push_back(chunk);
                // Everything of this source below its next position is now forwarded or written.
                let source = &mut self.from[s];
                source.acked_in = source.next_in;
                out.push(Action::Ack {
                    agent: sender,
                    side: s,
                    n: source.acked_in,
                });
            }
            Err(SendError::Full) => self.hold(now, sender, t, chunk),
            Err(SendError::Offline) => {
                // Gone, or a newer connection of the agent: what was in flight on the old one must
                // reach the new one first, so this chunk is buffered behind it.
                self.hold(now, sender, t, chunk);
                self.program.push_front(Phase::Connections);
            }
        }
    }

    fn ack(&mut self, now: Instant, agent_id: Uuid, side: Side, n: u64) {
        if !self.from[side].agents.contains(&agent_id) {
            return;
        }
        let towards = &mut self.towards[side];
        // Never beyond what was sent: an agent cannot acknowledge frames away unseen.
        let n = n.min(towards.sent_ever);
        if n <= towards.acked_out {
            return;
        }
        towards.acked_out = n;
        towards.sent_upto = towards.sent_upto.max(n);
        let mut delivered = 0u64;
        while let Some(front) = towards.inflight.front() {
            if front.end() > n {
                break;
            }
            delivered += u64::from(front.count);
            towards.inflight_frames -= u64::from(front.count);
            towards.inflight.pop_front();
        }
        // What was in flight on a connection that closed went back to wait for the buffer; an
        // acknowledgement that arrives after the close covers it all the same.
        let covered = towards.pending.iter().take_while(|c| c.end() <= n).count();
        for chunk in towards.pending.drain(..covered) {
            delivered += u64::from(chunk.count);
            towards.pending_frames -= u64::from(chunk.count);
        }
        if towards.pending.is_empty() {
            towards.pending_since = None;
        }
        towards.delivered += delivered;
        if towards.buffered > 0 {
            towards.db_ack = Some(n);
        }
        self.tally.delivered += delivered;
        self.dirty(now);
    }

    fn drops(&mut self, now: Instant, agent_id: Uuid, side: Side, total: u64) {
        let source = &mut self.from[side];
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
        self.dirty(now);
    }

    // ---- The phases ----

    fn phase(&mut self, now: Instant, phase: Phase, out: &mut Vec<Action>) {
        match phase {
            Phase::Gate(t) => {
                if self.towards[t].retry_at.is_some_and(|r| r > now) {
                    self.skip_direction(t);
                } else {
                    self.towards[t].retry_at = None;
                }
            }
            Phase::Delete(t) => {
                if let Some(n) = self.towards[t].db_ack.take() {
                    self.ask(
                        out,
                        Request::Delete { towards: t, n },
                        Waiting::Delete { towards: t, n },
                    );
                }
            }
            Phase::Write { towards: t, always } => {
                let towards = &self.towards[t];
                let due = always
                    || self.gathered_enough()
                    || towards
                        .pending_since
                        .is_some_and(|since| now >= since + self.settings.gather);
                if due && !towards.pending.is_empty() {
                    let audit_due = towards
                        .last_trim_audit
                        .is_none_or(|last| now >= last + self.settings.trim_audit_interval);
                    let source_next_in = self.from[t.other()].next_in;
                    let request = Request::Write {
                        towards: t,
                        chunks: towards.pending.clone(),
                        source_next_in,
                        audit_due,
                        carried: towards.trimmed_unaudited,
                    };
                    self.ask(
                        out,
                        request,
                        Waiting::Write {
                            towards: t,
                            source_next_in,
                        },
                    );
                }
            }
            Phase::Retention(t) => self.retention(now, t, out),
            Phase::Replay(t) => self.replay(now, t, out),
            Phase::Drain(t) => {
                let towards = &mut self.towards[t];
                let inflight: Vec<Chunk> = towards.inflight.drain(..).collect();
                towards.pending_frames += towards.inflight_frames;
                towards.inflight_frames = 0;
                towards.pending.splice(0..0, inflight);
            }
            Phase::FlushIfDue => {
                if self.flush_at.is_some_and(|f| now >= f) {
                    self.program.push_front(Phase::Flush);
                }
            }
            Phase::Flush => {
                self.flush_at = None;
                self.program.push_front(Phase::Announce);
                if self.finishing {
                    // The pipe's last word is awaited: nothing runs after it.
                    self.program.push_front(Phase::FlushSide(Side::B));
                    self.program.push_front(Phase::FlushSide(Side::A));
                } else if self.flushing.is_some() {
                    // The last one is still being written; this one waits for the next interval.
                    self.flush_at = Some(now + self.settings.flush_interval);
                } else {
                    // Written in the background: a slow database holds up no frame.
                    let counters = PerSide::from_fn(|side| self.counters(side));
                    for side in PerSide::<()>::SIDES {
                        self.counted(side, &counters[side]);
                    }
                    self.flushing = Some(counters);
                    out.push(Action::Flush(counters));
                }
            }
            Phase::FlushSide(side) => {
                let counters = self.counters(side);
                self.ask(
                    out,
                    Request::Flush { side, counters },
                    Waiting::Flush { side, counters },
                );
            }
            Phase::Announce => self.announce(false, out),
            Phase::RefreshIfDue => {
                if now >= self.refresh_at {
                    for phase in [Phase::Connections, Phase::LoadRows, Phase::LoadSides] {
                        self.program.push_front(phase);
                    }
                }
            }
            Phase::LoadSides => {
                self.looked_at = now;
                self.refresh_at = now + self.settings.refresh_interval;
                self.ask(out, Request::Sides, Waiting::Sides);
            }
            Phase::LoadRows => self.ask(out, Request::Rows, Waiting::Rows),
            Phase::Connections => {
                let agents = PerSide::from_fn(|side| self.from[side].agents.first().copied());
                self.ask(
                    out,
                    Request::Connections { agents },
                    Waiting::Connections(agents),
                );
            }
            Phase::Evaluate => self.evaluate(out),
            Phase::Accept(frames) => self.frames(now, frames, true, out),
        }
    }

    /// Retention on a buffer nobody writes to, and trim entries that were held back.
    fn retention(&mut self, now: Instant, t: Side, out: &mut Vec<Action>) {
        let settings = &self.settings;
        let towards = &mut self.towards[t];
        let pass_due = towards.buffered > 0 && towards.retention_at.is_none_or(|r| now >= r);
        // A trim may be audited now (the pass audits what it trims in its own transaction, with what
        // was held back); without a pass, only what was held back needs an entry.
        let audit_due = towards
            .last_trim_audit
            .is_none_or(|l| now >= l + settings.trim_audit_interval);
        if pass_due {
            towards.retention_at = Some(now + RETENTION_EVERY);
            let carried = towards.trimmed_unaudited;
            self.ask(
                out,
                Request::Retain {
                    towards: t,
                    audit_due,
                    carried,
                },
                Waiting::Retain { towards: t },
            );
        } else if audit_due && towards.trimmed_unaudited > 0 {
            let frames = towards.trimmed_unaudited;
            self.ask(
                out,
                Request::AuditTrim { towards: t, frames },
                Waiting::AuditTrim { towards: t },
            );
        }
    }

    /// Frames sent towards `t` on its connection and not acknowledged yet, live and replayed alike.
    fn unacked(&self, t: Side) -> u64 {
        let towards = &self.towards[t];
        towards.sent_upto.saturating_sub(towards.acked_out)
    }

    /// Asks for buffered frames to send to the side's connection, within the replay rate and the
    /// in-flight limit: the side's agent holds what it has not put on its dongle's bus yet, and a
    /// slow bus must not make it hold more than the limit.
    fn replay(&mut self, now: Instant, t: Side, out: &mut Vec<Action>) {
        if self.towards[t].conn.is_none() {
            return;
        }
        if self.towards[t].tail > self.towards[t].cursor
            && self.unacked(t) >= self.settings.inflight_max_frames
        {
            // Tried again once acknowledgements have made room.
            self.towards[t].replay_at = Some(now + REPLAY_BACKOFF);
            return;
        }
        let towards = &self.towards[t];
        let wanted = if towards.tail > towards.cursor {
            towards.replay_at.is_none_or(|at| now >= at)
        } else {
            self.sender_elsewhere(t) && towards.poll_at.is_none_or(|at| now >= at)
        };
        if wanted {
            let from = towards.cursor;
            self.ask(
                out,
                Request::Fetch {
                    towards: t,
                    from,
                    limit: REPLAY_ROWS,
                },
                Waiting::Fetch { towards: t },
            );
        }
    }

    fn fetched(&mut self, now: Instant, t: Side, chunks: Vec<Chunk>, out: &mut Vec<Action>) {
        let settings = &self.settings;
        let towards = &mut self.towards[t];
        let Some(conn) = towards.conn else {
            return;
        };
        // At least these are buffered (another instance may have written them), so the side's
        // acknowledgement must reach the buffer.
        let fetched: u64 = chunks.iter().map(|c| u64::from(c.count)).sum();
        towards.buffered = towards.buffered.max(fetched);
        if chunks.is_empty() {
            // Sent it all (or what was left was acknowledged or trimmed meanwhile). Polls that find
            // nothing come less and less often.
            towards.tail = towards.cursor;
            let every = towards.poll_every.map_or(settings.poll_interval, |e| {
                (e * 2).min(settings.poll_interval * 16)
            });
            towards.poll_every = Some(every);
            towards.poll_at = Some(now + every);
            return;
        }
        // What the receiver acknowledged is never sent again, not even the front of a chunk it took
        // part of: an agent that restarted remembers nothing of what it put on its bus, so it could
        // not skip it. (The rows wholly below are on their way out of the buffer.) A row that does
        // not parse goes as it is, for the agent to refuse.
        let acked = towards.acked_out;
        let chunks: Vec<Chunk> = chunks
            .into_iter()
            .filter_map(|chunk| {
                if chunk.end() <= acked {
                    towards.cursor = towards.cursor.max(chunk.end());
                    return None;
                }
                let skip = u32::try_from(acked.saturating_sub(chunk.seq)).unwrap_or(u32::MAX);
                Some(chunk.skip(skip).unwrap_or(chunk))
            })
            .collect();
        if chunks.is_empty() {
            // All of them were acknowledged: the next rows are fetched at once.
            towards.replay_at = Some(now);
            return;
        }
        // One step sends about a twentieth of a second's worth, within the in-flight limit (at least
        // one chunk).
        let room = settings
            .inflight_max_frames
            .saturating_sub(towards.sent_upto.saturating_sub(towards.acked_out));
        let budget = (u64::from(replay_rate(settings, towards)) / 20)
            .min(room)
            .max(1);
        let mut planned = 0u64;
        let chunks: Vec<Chunk> = chunks
            .into_iter()
            .take_while(|chunk| {
                let take = planned < budget;
                planned += u64::from(chunk.count);
                take
            })
            .collect();
        self.ask(
            out,
            Request::Replay {
                towards: t,
                conn,
                chunks: chunks.clone(),
            },
            Waiting::Replay {
                towards: t,
                sent: chunks,
            },
        );
    }

    fn replayed(
        &mut self,
        now: Instant,
        t: Side,
        chunks: Vec<Chunk>,
        sent: usize,
        stopped: Option<SendError>,
    ) {
        let settings = &self.settings;
        let towards = &mut self.towards[t];
        let mut frames = 0u64;
        for chunk in chunks.iter().take(sent) {
            towards.cursor = chunk.end();
            towards.sent_upto = towards.sent_upto.max(chunk.end());
            towards.sent_ever = towards.sent_ever.max(chunk.end());
            towards.tail = towards.tail.max(chunk.end());
            frames += u64::from(chunk.count);
        }
        let rate = u64::from(replay_rate(settings, towards));
        let pace = Duration::from_secs_f64(frames as f64 / rate as f64);
        // Paced from when this step was due rather than from when it ran: the timer wakes the pipe a
        // little late every time, and counting from `now` would add that up into a rate about 2 %
        // under the set one. A step that ran far behind its time (a busy pipe) starts afresh instead
        // of sending a burst to catch up.
        let due = towards
            .replay_at
            .filter(|at| *at <= now && now - *at < pace)
            .unwrap_or(now);
        towards.replay_at = Some(match stopped {
            Some(SendError::Full) => now + REPLAY_BACKOFF,
            _ => due + pace,
        });
        towards.poll_every = None;
        towards.poll_at = Some(now + settings.poll_interval);
        if stopped == Some(SendError::Offline) {
            // The connection changed under us (nothing went to the new one): look again.
            self.program.push_front(Phase::Connections);
        }
    }

    /// Books a write's or a retention pass's trim.
    fn trimmed(&mut self, now: Instant, t: Side, appended: Appended) {
        let towards = &mut self.towards[t];
        if appended.audited {
            towards.trimmed_unaudited = 0;
            towards.last_trim_audit = Some(now);
        } else {
            towards.trimmed_unaudited += appended.trimmed;
        }
        if appended.trimmed > 0 {
            self.buffer_pressure = true;
            self.tally.trimmed += appended.trimmed;
            tracing::warn!(group_id = %self.group_id, direction = crate::groups::model::direction_to(t),
                frames = appended.trimmed, "the relay buffer is full: trimmed the oldest frames");
        }
    }

    /// Which sides' serving agents have their data connection here; handles those that came and went.
    fn connections(
        &mut self,
        now: Instant,
        agents: PerSide<Option<Uuid>>,
        conns: PerSide<Option<u64>>,
    ) {
        for side in PerSide::<()>::SIDES {
            let current = agents[side].zip(conns[side]);
            let towards = &mut self.towards[side];
            if towards.conn == current {
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
                    towards.pending_since =
                        Some(now.checked_sub(self.settings.gather).unwrap_or(now));
                }
            }
            towards.conn = current;
            // A new connection gets the buffer from its oldest frame.
            towards.cursor = 0;
            towards.sent_upto = towards.acked_out;
            towards.replay_at = current.map(|_| now);
            towards.poll_at = None;
            towards.poll_every = None;
        }
    }

    /// Asks to write the state this instance sees, when it changed.
    ///
    /// ACTIVE while both sides' serving agents are connected here and nothing is buffered or waiting to
    /// be; CROSS_INSTANCE while one side's agent is connected here and the other's is connected to
    /// another instance (frames cross through the buffer, so a backlog is how they travel); DEGRADED
    /// otherwise. An instance where neither side is connected
    /// leaves the state to the others. The buffer pressure flag is cleared when the group is ACTIVE
    /// again, that is when the backlog was delivered (retention emptying a buffer does not end it:
    /// frames were lost).
    fn evaluate(&mut self, out: &mut Vec<Action>) {
        let online = PerSide::new(self.towards.a.conn.is_some(), self.towards.b.conn.is_some());
        if !online.a && !online.b {
            return;
        }
        let backlog = self
            .towards
            .values()
            .any(|t| t.buffered > 0 || !t.pending.is_empty());
        let elsewhere = PerSide::from_fn(|side| self.from[side].elsewhere);
        let want = if online.a && online.b && !backlog {
            Mode::Active
        } else if (online.a && elsewhere.b) || (online.b && elsewhere.a) {
            Mode::CrossInstance
        } else {
            Mode::Degraded
        };
        let clear = want == Mode::Active && self.buffer_pressure;
        if want == self.mode && !clear {
            return;
        }
        self.ask(
            out,
            Request::SetMode {
                mode: want,
                clear_pressure: want == Mode::Active,
            },
            Waiting::SetMode { mode: want },
        );
    }

    /// Tells subscribers the state and backlog when they changed (`always`: even if only the state).
    fn announce(&mut self, always: bool, out: &mut Vec<Action>) {
        let now = Announcement {
            state: self.mode,
            buffer_pressure: self.buffer_pressure,
            backlog_a_to_b: self.towards.b.buffered + self.towards.b.pending_frames,
            backlog_b_to_a: self.towards.a.buffered + self.towards.a.pending_frames,
            offline: PerSide::new(self.towards.a.conn.is_none(), self.towards.b.conn.is_none()),
        };
        if !always && now == self.announced {
            return;
        }
        self.announced = now;
        out.push(Action::Announce(now));
    }

    // ---- Answers ----

    fn reply(&mut self, now: Instant, reply: Reply, out: &mut Vec<Action>) {
        let Some(waiting) = self.waiting.take() else {
            debug_assert!(false, "an answer arrived with no request open");
            return;
        };
        match (waiting, reply) {
            (Waiting::Connections(agents), Reply::Connections(conns)) => {
                self.connections(now, agents, conns)
            }
            (Waiting::Sides, Reply::Sides(result)) => self.sides_read(result, out),
            (Waiting::Rows, Reply::Rows(result)) => {
                if let Ok(rows) = result {
                    self.rows_read(rows);
                }
            }
            (
                Waiting::Forward {
                    sender,
                    towards,
                    chunk,
                },
                Reply::Forwarded(result),
            ) => self.forwarded(now, sender, towards, chunk, result, out),
            (Waiting::Delete { towards: t, n }, Reply::Deleted(result)) => match result {
                Ok(Acknowledged { removed, buffered }) => {
                    // The database's count: another instance may have written to this buffer.
                    self.towards[t].buffered = buffered;
                    self.tally.delivered += removed;
                    self.dirty(now);
                }
                Err(Failure::Gone) => self.gone = true,
                Err(Failure::Db) => {
                    let towards = &mut self.towards[t];
                    towards.db_ack = Some(towards.db_ack.unwrap_or(0).max(n));
                    towards.retry_at = Some(now + DB_RETRY);
                    if !self.finishing {
                        self.skip_direction(t);
                    }
                }
            },
            (
                Waiting::Write {
                    towards: t,
                    source_next_in,
                },
                Reply::Written(result),
            ) => self.written(now, t, source_next_in, result, out),
            (Waiting::Retain { towards: t }, Reply::Retained(result)) => match result {
                Ok(appended) => {
                    self.towards[t].buffered = appended.buffered;
                    self.trimmed(now, t, appended);
                }
                Err(Failure::Gone) => self.gone = true,
                Err(Failure::Db) => {}
            },
            (Waiting::AuditTrim { towards: t }, Reply::TrimAudited(result)) => match result {
                Ok(()) => {
                    self.towards[t].trimmed_unaudited = 0;
                    self.towards[t].last_trim_audit = Some(now);
                }
                Err(Failure::Gone) => self.gone = true,
                Err(Failure::Db) => {}
            },
            (Waiting::Fetch { towards: t }, Reply::Fetched(result)) => match result {
                Ok(chunks) => self.fetched(now, t, chunks, out),
                Err(Failure::Gone) => self.gone = true,
                Err(Failure::Db) => self.towards[t].replay_at = Some(now + DB_RETRY),
            },
            (
                Waiting::Replay {
                    towards: t,
                    sent: chunks,
                },
                Reply::Replayed { sent, stopped },
            ) => self.replayed(now, t, chunks, sent, stopped),
            (Waiting::Flush { side, counters }, Reply::Flushed(result)) => match result {
                Ok(()) => self.counted(side, &counters),
                Err(Failure::Gone) => {
                    self.gone = true;
                    // The rest of this flush (and its announcement) is pointless.
                    while matches!(
                        self.program.front(),
                        Some(Phase::FlushSide(_) | Phase::Announce)
                    ) {
                        self.program.pop_front();
                    }
                }
                Err(Failure::Db) => self.dirty(now),
            },
            (Waiting::SetMode { mode }, Reply::ModeSet(result)) => match result {
                Ok(Some(pressure)) => {
                    if mode != self.mode {
                        tracing::info!(group_id = %self.group_id, from = self.mode.as_str(), to = mode.as_str(), "group state");
                    }
                    self.mode = mode;
                    self.buffer_pressure = pressure;
                    self.announce(true, out);
                }
                Ok(None) => self.gone = true,
                Err(_) => {}
            },
            (waiting, reply) => {
                debug_assert!(false, "answer {reply:?} to {waiting:?}");
                tracing::error!(group_id = %self.group_id, ?waiting, "relay: an answer to another request");
            }
        }
        self.run(now, out);
    }

    fn written(
        &mut self,
        now: Instant,
        t: Side,
        source_next_in: u64,
        result: Result<Appended, Failure>,
        out: &mut Vec<Action>,
    ) {
        match result {
            Ok(appended) => {
                let towards = &mut self.towards[t];
                let written = towards.pending_frames;
                if let Some(last) = towards.pending.last() {
                    towards.tail = towards.tail.max(last.end());
                }
                towards.pending.clear();
                towards.pending_frames = 0;
                towards.pending_since = None;
                towards.buffered = appended.buffered;
                self.trimmed(now, t, appended);
                self.tally.buffered += written;
                let s = t.other();
                let source = &mut self.from[s];
                source.acked_in = source.acked_in.max(source_next_in);
                if let Some(agent) = source.ack_to.take() {
                    out.push(Action::Ack {
                        agent,
                        side: s,
                        n: source.acked_in,
                    });
                }
                self.dirty(now);
            }
            Err(Failure::Gone) => self.gone = true,
            Err(Failure::Db) => self.towards[t].retry_at = Some(now + DB_RETRY),
        }
    }

    fn sides_read(&mut self, result: Result<Option<SidesRead>, Failure>, out: &mut Vec<Action>) {
        let read = match result {
            Ok(Some(read)) if read.mode.relaying() => read,
            Ok(_) | Err(Failure::Gone) => {
                self.gone = true;
                self.skip_refresh();
                return;
            }
            Err(Failure::Db) => {
                self.skip_refresh();
                return;
            }
        };
        let SidesRead {
            mode,
            agents,
            elsewhere,
            bitrates,
        } = read;
        for (side, elsewhere) in elsewhere.iter() {
            self.from[side].elsewhere = *elsewhere;
        }
        for (side, bitrate) in bitrates.iter() {
            self.towards[side].bus_rate = bitrate.map(bus_frames_per_second);
        }
        for (side, agents) in [(Side::A, agents.a), (Side::B, agents.b)] {
            let before = self.from[side].agents.first().copied();
            self.from[side].agents = agents;
            let after = self.from[side].agents.first().copied();
            if before != after {
                // Nothing else tells the new serving agent (the old one timing out is no event), and a
                // side nobody is told of stays in the buffer for ever.
                out.push(Action::ServingChanged { before, after });
            }
        }
        self.mode = mode;
    }

    /// The rest of a refresh (rows, connections) after the sides could not be read.
    fn skip_refresh(&mut self) {
        while matches!(
            self.program.front(),
            Some(Phase::LoadRows | Phase::Connections)
        ) {
            self.program.pop_front();
        }
    }

    fn rows_read(&mut self, rows: PerSide<SideRow>) {
        // Another instance may have written or delivered meanwhile.
        for (side, row) in rows.iter() {
            let from = &mut self.from[side];
            if row.next_in > from.next_in {
                from.next_in = row.next_in;
                from.acked_in = from.acked_in.max(row.next_in);
            }
            let towards = &mut self.towards[side];
            towards.buffered = row.buffered;
            towards.tail = towards.tail.max(row.tail);
            towards.acked_out = towards.acked_out.max(row.acked_out);
        }
    }
}

#[cfg(test)]
mod tests;

/// The bits a classic CAN frame takes on the bus at most: an extended identifier, 8 data bytes, and
/// every stuff bit the rule can insert (160).
const WORST_CASE_FRAME_BITS: u32 =
    firmware_proto::bus_time::worst_case_bits(firmware_proto::bus_time::FrameShape {
        extended: true,
        fd: false,
        brs: false,
        len: 8,
    })
    .total();

/// The frames per second a bus at `bitrate` carries when every classic frame is as long as it can be
/// (shorter frames only make it safer). CAN FD frames are counted as classic ones: a long FD frame sent
/// without bit-rate switching takes up to about 700 bits, so for such traffic this is too high, by up to
/// four times. This is a coarse cap on what the server sends; the agent paces each frame by its own
/// length as it writes it to the dongle (`bridge_agent::bus_pace`), and what waits there stays in
/// flight, then buffered.
pub fn bus_frames_per_second(bitrate: u32) -> u32 {
    (bitrate / WORST_CASE_FRAME_BITS).max(1)
}

/// The rate frames are replayed towards a side: the configured one, never more than its bus carries.
fn replay_rate(settings: &RelaySettings, towards: &Towards) -> u32 {
    let set = settings.replay_rate.max(1);
    towards.bus_rate.map_or(set, |bus| set.min(bus))
}
