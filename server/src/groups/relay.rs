//! The relay of this server instance: the agents' data-plane connections (`/ws/data`), one [`Pipe`] per
//! relaying group, the `groups` lists agents are sent, and the events a live console can follow.
//!
//! # Who does what
//!
//! - A data connection registers here ([`Relay::connect`]) and gets a bounded queue of outgoing binary
//!   messages; what it reads goes to [`Relay::from_agent`], which hands it to the group's pipe.
//! - A pipe is a task that owns one group's streams (see [`super::pipe`]); it is started when the group
//!   is activated here, or when a connected agent serves one of its sides, and ends when the group is
//!   deactivated or deleted.
//! - Which agent serves a side is the database's to say (present sightings of the dongle by the owner's
//!   online agents, the longest-standing first: [`super::serving::sides_served_by`]). Whenever that may change (an
//!   agent's control connection opens, it reports its dongles, a group is activated, deactivated or
//!   deleted, a dongle is unpaired) the agents concerned get a new `groups` list on their control
//!   connection, and the pipes of that user look again.
//!
//! # Several instances
//!
//! A side counts as connected only when its agent's data connection is on this instance. Frames for a
//! side whose agent is elsewhere go to the durable buffer, and the instance holding that agent's data
//! connection delivers them: the write notifies at its commit, and [`super::wake`] has the receiving
//! pipe read the new rows at once ([`Relay::buffered`]); a poll every `poll_interval` (backing off while
//! it finds nothing) is the fallback for a missed notification. The group shows DEGRADED meanwhile,
//! which is what it is: relayed through the buffer.
//!
//! # The console's hook
//!
//! [`Relay::subscribe`] gives a broadcast receiver of [`RelayEvent`]s: every accepted run of frames
//! (with its batch, so a console can show it) and every change of a group's state or backlog. A slow
//! subscriber loses events (it sees `Lagged`), never slows the relay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_proto::data::{Kind, PerSide, Side};
use control_proto::{DeviceId, GroupSide, Groups, ServerMessage};
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

use super::pipe::{Pipe, PipeEvent};
use crate::agents::AgentIdentity;
use crate::agents::hub::AgentHub;

pub use super::settings::RelaySettings;
use super::store::FrameStore;

use super::links::{Core, DataConn, PipeShared};
pub use super::links::{RelayEvent, RelayStats, SendError};

#[derive(Clone)]
struct PipeHandle {
    user_id: Uuid,
    tx: mpsc::Sender<PipeEvent>,
    shared: Arc<PipeShared>,
}

/// A data message from an agent, owned (the socket's buffer is reused).
#[derive(Debug, Clone)]
pub struct Inbound {
    pub kind: Kind,
    pub group_id: Uuid,
    pub side: Side,
    pub n: u64,
    /// FRAMES: the batch and its frame count.
    pub frames: Option<(Arc<[u8]>, u32)>,
}

impl Inbound {
    pub fn of(message: &control_proto::data::DataMessage<'_>) -> Self {
        Self {
            kind: message.kind,
            group_id: message.group_id,
            side: message.side,
            n: message.n,
            frames: message
                .batch
                .map(|b| (Arc::from(b.as_bytes()), b.len() as u32)),
        }
    }
}

/// A data connection's registration: its id and the queue its writer drains.
pub struct DataRegistration {
    pub conn_id: u64,
    pub rx: mpsc::Receiver<Vec<u8>>,
}

/// How long a group that is not relaying (or not there) is not looked up again for frames naming it.
const REFUSED_TTL: Duration = Duration::from_secs(2);
/// The most group ids remembered as refused.
const REFUSED_MAX: usize = 1_024;
/// How long an API call waits for a pipe's first look at its group.
const PIPE_ANSWER: Duration = Duration::from_secs(2);

/// A `groups` list as sent, without positions: (group, side, device id).
type SidesSent = Vec<(Uuid, Side, DeviceId)>;

/// The relay of this instance.
pub struct Relay {
    core: Arc<Core>,
    hub: Arc<AgentHub>,
    pipes: tokio::sync::Mutex<HashMap<Uuid, PipeHandle>>,
    /// The last `groups` list sent to each agent, without positions, to skip sending the same again.
    sent: Mutex<HashMap<Uuid, SidesSent>>,
    /// Groups recently found not relaying, so that frames naming them do not cost a query each.
    refused: Mutex<HashMap<Uuid, Instant>>,
    next_conn: AtomicU64,
    /// Set at shutdown: no pipe starts and no connection registers any more.
    closed: AtomicBool,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        settings: RelaySettings,
        frames: FrameStore,
        hub: Arc<AgentHub>,
    ) -> Self {
        let (events, _) = broadcast::channel(1_024);
        Self {
            core: Arc::new(Core {
                cluster: hub.cluster_identity(),
                pool,
                settings: frames.tune(settings),
                frames,
                stats: RelayStats::default(),
                conns: Mutex::new(HashMap::new()),
                events,
                moved: Mutex::new(std::collections::HashSet::new()),
                moved_wake: tokio::sync::Notify::new(),
            }),
            hub,
            pipes: tokio::sync::Mutex::new(HashMap::new()),
            sent: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    pub fn settings(&self) -> &RelaySettings {
        &self.core.settings
    }

    /// The hook of a live console: frames relayed and group state changes, as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<RelayEvent> {
        self.core.events.subscribe()
    }

    /// Frames towards `towards` of `group_id` were committed to the buffer (a notification from
    /// [`super::wake`]): the group's pipe here, if any, looks for them now. A pipe whose queue is full
    /// is busy and looks at its next poll anyway.
    pub async fn buffered(&self, group_id: Uuid, towards: Side) {
        if let Some(pipe) = self.pipes.lock().await.get(&group_id) {
            let _ = pipe.tx.try_send(PipeEvent::Buffered { towards });
        }
    }

    /// The group's pipe here looks at its sides and connections again (another instance now holds, or
    /// no longer holds, one of them, or the group was activated there). Without a pipe here, one
    /// starts when an agent serving a side of the group has its data connection here: a group
    /// activated through another instance would otherwise have no pipe on the instance that holds its
    /// receiving side until that agent connected again, and its frames would wait in the buffer.
    pub async fn look_at_sides(&self, group_id: Uuid) {
        if let Some(pipe) = self.pipes.lock().await.get(&group_id) {
            let _ = pipe.tx.try_send(PipeEvent::Refresh { done: None });
            return;
        }
        let sides = match super::serving::sides_of(&self.core.pool, group_id).await {
            Ok(Some(sides)) if sides.mode.relaying() => sides,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(%group_id, error = %e, "could not read a group's sides");
                return;
            }
        };
        let served_here = sides
            .sides
            .iter()
            .flat_map(|side| &side.agents)
            .any(|agent| self.core.conn_of(*agent).is_some());
        if served_here {
            self.forget_refused(group_id);
            let _ = self.pipe(group_id).await;
        }
    }

    /// Every pipe here looks at its sides now: notifications may have been missed (the listening
    /// connection was down).
    pub async fn look_at_every_side(&self) {
        for pipe in self.pipes.lock().await.values() {
            let _ = pipe.tx.try_send(PipeEvent::Refresh { done: None });
        }
    }

    /// Every pipe here looks at its buffer now: notifications may have been missed (the listening
    /// connection was down).
    pub async fn look_at_every_buffer(&self) {
        for pipe in self.pipes.lock().await.values() {
            for towards in PerSide::<()>::SIDES {
                let _ = pipe.tx.try_send(PipeEvent::Buffered { towards });
            }
        }
    }

    pub fn stats(&self) -> &RelayStats {
        &self.core.stats
    }

    /// Counts a data message that did not decode.
    pub fn malformed(&self) {
        let stats = &self.core.stats;
        stats.add(
            &stats.messages_malformed,
            "relay_messages_malformed_total",
            1,
        );
    }

    /// Per side: the serving agent's data connection is on this instance or on another live one (false
    /// without a pipe here).
    pub async fn data_connected(&self, group_id: Uuid) -> PerSide<bool> {
        match self.pipes.lock().await.get(&group_id) {
            Some(p) => {
                PerSide::from_fn(|side| p.shared.data_connected[side].load(Ordering::Relaxed))
            }
            None => PerSide::default(),
        }
    }

    /// Registers an agent's data connection, replacing (and so closing) an earlier one of the same
    /// agent, and starts the pipes of the groups it serves.
    pub async fn connect(&self, agent: AgentIdentity) -> DataRegistration {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(self.core.settings.connection_queue.max(1));
        if self.closed.load(Ordering::Relaxed) {
            // The sender goes with this scope: the connection's writer ends at once, and so does it.
            return DataRegistration { conn_id, rx };
        }
        self.core
            .conns
            .lock()
            .expect("relay lock")
            .insert(agent.agent_id, DataConn { conn_id, tx });
        self.start_served_pipes(agent).await;
        self.refresh_user(agent.user_id).await;
        DataRegistration { conn_id, rx }
    }

    /// Unregisters the connection if it is still the agent's current one.
    pub async fn disconnect(&self, agent: AgentIdentity, conn_id: u64) {
        let removed = {
            let mut conns = self.core.conns.lock().expect("relay lock");
            if conns.get(&agent.agent_id).map(|c| c.conn_id) == Some(conn_id) {
                conns.remove(&agent.agent_id);
                true
            } else {
                false
            }
        };
        if removed {
            self.refresh_user(agent.user_id).await;
        }
    }

    /// Hands a data message from an agent to its group's pipe. Frames for a group that is unknown, not
    /// relaying or someone else's are dropped and counted; nothing is acknowledged for them.
    /// Hands a data message to its group's pipe; false when it was refused (a group the agent does not
    /// serve, or one that is not relaying), which the connection counts.
    pub async fn from_agent(&self, agent: AgentIdentity, message: Inbound) -> bool {
        let event = match (message.kind, message.frames) {
            (Kind::Frames, Some((batch, count))) => PipeEvent::Frames {
                agent_id: agent.agent_id,
                side: message.side,
                n: message.n,
                batch,
                count,
            },
            (Kind::Ack, _) => PipeEvent::Ack {
                agent_id: agent.agent_id,
                side: message.side,
                n: message.n,
            },
            (Kind::Drops, _) => PipeEvent::Drops {
                agent_id: agent.agent_id,
                side: message.side,
                total: message.n,
            },
            (Kind::Frames, None) => return false,
        };
        let refused_frames = match &event {
            PipeEvent::Frames { count, .. } => u64::from(*count),
            _ => 0,
        };
        let mut event = Some(event);
        // A group missing from the list this instance sent the agent is refused without a query.
        if self.not_in_list(agent, message.group_id) {
            event = None;
        }
        // Twice at most: a pipe that has just ended (its group stopped relaying) is looked up again.
        for _ in 0..2 {
            if event.is_none() {
                break;
            }
            let Some(pipe) = self.pipe(message.group_id).await else {
                break;
            };
            if pipe.user_id != agent.user_id {
                break;
            }
            match pipe.tx.send(event.take().expect("an event")).await {
                Ok(()) => return true,
                Err(mpsc::error::SendError(back)) => event = Some(back),
            }
        }
        let stats = &self.core.stats;
        stats.add(
            &stats.frames_refused,
            "relay_frames_refused_total",
            refused_frames,
        );
        false
    }

    /// True when this instance sent the agent its `groups` list, the group is not in it, and no pipe of
    /// the group runs here for the agent's user: the agent does not serve the group, and no database
    /// query is needed to say so. False when this instance does not know (the agent's control
    /// connection is elsewhere): the pipe's own checks decide.
    fn not_in_list(&self, agent: AgentIdentity, group_id: Uuid) -> bool {
        let listed = {
            let sent = self.sent.lock().expect("relay lock");
            match sent.get(&agent.agent_id) {
                None => return false,
                Some(sides) => sides.iter().any(|(g, ..)| *g == group_id),
            }
        };
        if listed {
            return false;
        }
        match self.pipes.try_lock() {
            Ok(pipes) => !pipes
                .get(&group_id)
                .is_some_and(|p| p.user_id == agent.user_id && !p.tx.is_closed()),
            // Busy: let the usual path decide.
            Err(_) => false,
        }
    }

    /// An agent's control connection opened (`force`: send its `groups` list even if unchanged) or it
    /// reported its dongles: its list may have changed, and so may the sides of its user's pipes.
    pub async fn agent_changed(&self, agent: AgentIdentity, force: bool) {
        self.send_groups(agent, force).await;
        if self.core.conn_of(agent.agent_id).is_some() {
            self.start_served_pipes(agent).await;
        }
        self.refresh_user(agent.user_id).await;
    }

    /// A group was activated: its pipe here starts (and takes its first look), and the agents that see
    /// its dongles get their new lists.
    pub async fn group_activated(&self, group_id: Uuid, user_id: Uuid, agents: &[Uuid]) {
        self.forget_refused(group_id);
        if let Some(pipe) = self.pipe(group_id).await {
            let (done, answered) = oneshot::channel();
            if pipe
                .tx
                .send(PipeEvent::Refresh { done: Some(done) })
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(PIPE_ANSWER, answered).await;
            }
        }
        self.groups_changed(agents).await;
        self.refresh_user(user_id).await;
        if self.core.cluster.is_some() {
            // The instances holding the sides' data connections start their pipes now.
            super::buffer::announce_served(&self.core.pool, group_id).await;
        }
    }

    /// Stops a group's pipe here: with `discard` (the group is gone) at once; otherwise after it wrote
    /// what it holds to the buffer.
    pub async fn stop_group(&self, group_id: Uuid, discard: bool) {
        let pipe = self.pipes.lock().await.remove(&group_id);
        if let Some(pipe) = pipe {
            let (done, stopped) = oneshot::channel();
            if pipe
                .tx
                .send(PipeEvent::Stop {
                    discard,
                    done: Some(done),
                })
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(PIPE_ANSWER, stopped).await;
            }
        }
        if discard {
            self.core.frames.discard(group_id).await;
        }
    }

    /// Where this instance keeps frames waiting for a side.
    pub fn frame_store(&self) -> &FrameStore {
        &self.core.frames
    }

    /// Groups were deleted with a dongle (unpair): their pipes stop, and the agents get new lists.
    pub async fn groups_removed(&self, group_ids: &[Uuid], agents: &[Uuid]) {
        for id in group_ids {
            self.stop_group(*id, true).await;
        }
        self.groups_changed(agents).await;
    }

    /// Sends the agents whose side a pipe saw move their new `groups` lists, as they are named, until
    /// `shutdown`. One task per server runs this.
    pub async fn send_moved_lists(&self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.core.moved_wake.notified() => {}
            }
            let agents: Vec<Uuid> = self
                .core
                .moved
                .lock()
                .expect("relay lock")
                .drain()
                .collect();
            self.groups_changed(&agents).await;
        }
    }

    /// Sends each agent its current `groups` list.
    pub async fn groups_changed(&self, agents: &[Uuid]) {
        if agents.is_empty() {
            return;
        }
        let owners: Vec<(Uuid, Uuid)> =
            match sqlx::query_as("SELECT id, user_id FROM agents WHERE id = ANY($1)")
                .bind(agents)
                .fetch_all(&self.core.pool)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "could not look up the agents of changed groups");
                    return;
                }
            };
        for (agent_id, user_id) in owners {
            self.send_groups(AgentIdentity { agent_id, user_id }, true)
                .await;
        }
    }

    /// Stops every pipe (each writes what it holds to the buffer) and closes every data connection.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let pipes: Vec<PipeHandle> = self.pipes.lock().await.drain().map(|(_, p)| p).collect();
        for pipe in pipes {
            let (done, stopped) = oneshot::channel();
            if pipe
                .tx
                .send(PipeEvent::Stop {
                    discard: false,
                    done: Some(done),
                })
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(Duration::from_secs(5), stopped).await;
            }
        }
        // What the pipes' last writes left for the database's rows gets there before the pool closes.
        if !self.core.frames.settle(Duration::from_secs(5)).await {
            tracing::warn!(
                "some relay positions did not reach the database before the stop; the next start takes them from the NATS stream"
            );
        }
        self.core.conns.lock().expect("relay lock").clear();
    }

    /// The agent's `groups` list, sent on its control connection when it differs from the last one
    /// sent (or always with `force`). Positions are the relay's own when a pipe runs here.
    async fn send_groups(&self, agent: AgentIdentity, force: bool) {
        let served = match super::serving::sides_served_by(
            &self.core.pool,
            agent.agent_id,
            agent.user_id,
        )
        .await
        {
            Ok(served) => served,
            Err(e) => {
                tracing::warn!(agent_id = %agent.agent_id, error = %e, "could not compute an agent's group sides");
                return;
            }
        };
        let key: SidesSent = served
            .iter()
            .map(|s| (s.group_id, s.side, s.device_id))
            .collect();
        {
            let mut sent = self.sent.lock().expect("relay lock");
            if !force && sent.get(&agent.agent_id) == Some(&key) {
                return;
            }
            sent.insert(agent.agent_id, key);
        }
        let mut sides = Vec::with_capacity(served.len());
        {
            let pipes = self.pipes.lock().await;
            for s in served {
                let here = pipes
                    .get(&s.group_id)
                    .map(|p| p.shared.acked_in[s.side].load(Ordering::Relaxed))
                    .unwrap_or(0);
                sides.push(GroupSide {
                    group_id: s.group_id,
                    side: s.side,
                    device_id: s.device_id,
                    next_seq: here.max(s.next_in),
                });
            }
        }
        let message = ServerMessage::Groups(Groups { sides });
        if let Err(e) = self.hub.send(agent.agent_id, message).await {
            tracing::debug!(agent_id = %agent.agent_id, error = %e, "could not send an agent its group sides");
            // Not sent: the next change sends it whatever it is.
            self.sent
                .lock()
                .expect("relay lock")
                .remove(&agent.agent_id);
        }
    }

    /// Starts the pipes of the groups whose sides the agent serves.
    async fn start_served_pipes(&self, agent: AgentIdentity) {
        match super::serving::sides_served_by(&self.core.pool, agent.agent_id, agent.user_id).await
        {
            Ok(served) => {
                for s in served {
                    self.forget_refused(s.group_id);
                    let _ = self.pipe(s.group_id).await;
                }
            }
            Err(e) => {
                tracing::warn!(agent_id = %agent.agent_id, error = %e, "could not look up an agent's groups")
            }
        }
    }

    /// Tells the pipes of a user to look at their sides again (an agent came or went).
    async fn refresh_user(&self, user_id: Uuid) {
        let pipes: Vec<PipeHandle> = self
            .pipes
            .lock()
            .await
            .values()
            .filter(|p| p.user_id == user_id)
            .cloned()
            .collect();
        for pipe in pipes {
            let _ = pipe.tx.send(PipeEvent::Refresh { done: None }).await;
        }
    }

    fn forget_refused(&self, group_id: Uuid) {
        self.refused.lock().expect("relay lock").remove(&group_id);
    }

    fn recently_refused(&self, group_id: Uuid) -> bool {
        let refused = self.refused.lock().expect("relay lock");
        refused
            .get(&group_id)
            .is_some_and(|at| at.elapsed() < REFUSED_TTL)
    }

    fn remember_refused(&self, group_id: Uuid) {
        let mut refused = self.refused.lock().expect("relay lock");
        if refused.len() >= REFUSED_MAX {
            refused.retain(|_, at| at.elapsed() < REFUSED_TTL);
            if refused.len() >= REFUSED_MAX {
                refused.clear();
            }
        }
        refused.insert(group_id, Instant::now());
    }

    /// The group's running pipe, started when the group is relaying; None otherwise.
    ///
    /// The registry's lock is never held across the database: the group is read without it, and the
    /// pipe is started under it only if no other caller started one meanwhile (reading twice is
    /// harmless; starting twice would not be).
    async fn pipe(&self, group_id: Uuid) -> Option<PipeHandle> {
        if self.closed.load(Ordering::Relaxed) || self.recently_refused(group_id) {
            return None;
        }
        {
            let mut pipes = self.pipes.lock().await;
            if let Some(pipe) = pipes.get(&group_id) {
                if !pipe.tx.is_closed() {
                    return Some(pipe.clone());
                }
                pipes.remove(&group_id);
            }
        }
        match Pipe::load(self.core.clone(), group_id).await {
            Ok(Some(pipe)) => {
                let mut pipes = self.pipes.lock().await;
                if let Some(running) = pipes.get(&group_id)
                    && !running.tx.is_closed()
                {
                    return Some(running.clone());
                }
                let (tx, rx) = mpsc::channel(self.core.settings.pipe_queue.max(1));
                let handle = PipeHandle {
                    user_id: pipe.user_id(),
                    tx,
                    shared: pipe.shared(),
                };
                pipes.insert(group_id, handle.clone());
                tokio::spawn(pipe.run(rx));
                Some(handle)
            }
            Ok(None) => {
                self.remember_refused(group_id);
                None
            }
            Err(e) => {
                tracing::warn!(%group_id, error = %e, "could not start a group's relay");
                None
            }
        }
    }
}
