//! The agents' control connections, across every server instance on the database: agent id -> the
//! sender of its control WebSocket when this instance holds it, and request/response by id with
//! timeouts wherever it is held.
//!
//! Everything that talks to an agent goes through [`AgentHub`]. An agent connected to this instance is
//! reached through its socket's queue, as in a single instance; one connected to another instance is
//! reached through [`cluster`](super::cluster) (a mailbox row and a NOTIFY, polled as a fallback), and
//! its reply comes back the same way. `is_connected` consults the database for other instances' agents,
//! which is why it, `send` and `kick` are async. A hub made with [`AgentHub::new`] has no cluster and
//! reaches only this process's agents (unit tests, tools).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::{ReplyError, ReplyOk, ReplyResult, Request, RequestBody, ServerMessage};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::cluster::{self, Cluster, ClusterError, ClusterSettings, Message, Outcome};
use crate::dongle_tokens::KeyRing;

/// How many messages may wait for one agent's socket before sends fail.
const QUEUE: usize = 64;

/// Why a request to an agent got no ok answer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("the agent is not connected")]
    Offline,
    #[error("the agent did not answer in time")]
    Timeout,
    #[error("the agent answered with an error: {0:?}")]
    Failed(ReplyError),
    /// The agent is held by another instance and the message would not fit in a notification; it was
    /// refused whole rather than cut.
    #[error("the message is {size} bytes on its way to another server instance, more than {limit}")]
    TooLarge { size: usize, limit: usize },
}

struct Connection {
    /// Tells two connections of the same agent apart, so the old one leaving does not unregister the new.
    conn_id: u64,
    tx: mpsc::Sender<ServerMessage>,
}

struct Pending {
    agent_id: Uuid,
    /// The local connection the request went out on; None for a request relayed to another instance,
    /// which only a relayed reply completes.
    conn_id: Option<u64>,
    reply: oneshot::Sender<Result<ReplyOk, RequestError>>,
}

/// The registry of connected agents.
#[derive(Default)]
pub struct AgentHub {
    connections: Mutex<HashMap<Uuid, Connection>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    cluster: Option<Cluster>,
}

/// What a connection task holds: its id (to leave) and the queue its writer drains.
pub struct Registration {
    pub conn_id: u64,
    pub rx: mpsc::Receiver<ServerMessage>,
}

impl AgentHub {
    /// A hub that reaches only the agents connected to this process.
    pub fn new() -> Self {
        Self::default()
    }

    /// A hub that also reaches agents connected to the other instances on `pool`'s database. The
    /// instance gets a fresh id; [`cluster::start`] must run for it to beat, listen and poll. `keys`
    /// seal the messages between instances, so every instance needs the same ones.
    /// With `nats`, messages between instances go on NATS first.
    pub fn clustered(
        pool: PgPool,
        settings: ClusterSettings,
        keys: Arc<KeyRing>,
        nats: Option<cluster::NatsMailbox>,
    ) -> Self {
        Self {
            cluster: Some(Cluster::new(pool, settings, keys, nats)),
            ..Self::default()
        }
    }

    /// This instance's id in the cluster (None without one).
    pub fn instance_id(&self) -> Option<Uuid> {
        self.cluster.as_ref().map(|c| c.instance_id)
    }

    /// This instance's id and the age at which another instance's beat counts as dead, when several
    /// instances share the database.
    pub fn cluster_identity(&self) -> Option<(Uuid, std::time::Duration)> {
        self.cluster
            .as_ref()
            .map(|c| (c.instance_id, c.settings.stale_after))
    }

    pub(crate) fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a new connection of `agent_id`, replacing (and so closing) any earlier one, here or
    /// on another instance.
    pub async fn connect(&self, agent_id: Uuid) -> Registration {
        let conn_id = self.next_id();
        let (tx, rx) = mpsc::channel(QUEUE);
        let Some(cluster) = &self.cluster else {
            self.insert_here(agent_id, conn_id, tx);
            return Registration { conn_id, rx };
        };
        let _rows = cluster.rows.lock().await;
        self.insert_here(agent_id, conn_id, tx);
        match cluster.claim_connection(agent_id, conn_id).await {
            Ok(Some((instance, old_conn))) => {
                // The agent's previous socket is on another instance (it reconnected here before that
                // one noticed): close it there, as a reconnect to this instance closes the old socket.
                let kick = Message::Kick {
                    agent_id,
                    conn_id: Some(old_conn),
                };
                if let Err(e) = cluster.post(instance, &kick, cluster::MESSAGE_TTL).await {
                    tracing::debug!(%agent_id, error = %e, "could not close the agent's older connection");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                %agent_id,
                error = %e,
                "could not record the agent's connection; other instances reach it after the next beat"
            ),
        }
        Registration { conn_id, rx }
    }

    fn insert_here(&self, agent_id: Uuid, conn_id: u64, tx: mpsc::Sender<ServerMessage>) {
        self.connections
            .lock()
            .expect("hub lock")
            .insert(agent_id, Connection { conn_id, tx });
    }

    /// Unregisters the connection `conn_id` of `agent_id` if it is still the current one.
    pub async fn disconnect(&self, agent_id: Uuid, conn_id: u64) {
        let _rows = match &self.cluster {
            Some(cluster) => Some(cluster.rows.lock().await),
            None => None,
        };
        {
            let mut connections = self.connections.lock().expect("hub lock");
            if connections
                .get(&agent_id)
                .is_some_and(|c| c.conn_id == conn_id)
            {
                connections.remove(&agent_id);
            }
        }
        // Requests waiting on this connection fail at once instead of running into their timeout.
        self.fail_pending(agent_id, conn_id);
        if let Some(cluster) = &self.cluster
            && let Err(e) = cluster.release_connection(agent_id, Some(conn_id)).await
        {
            tracing::warn!(%agent_id, error = %e, "could not record the agent's disconnection; the next beat will");
        }
    }

    fn fail_pending(&self, agent_id: Uuid, conn_id: u64) {
        self.pending
            .lock()
            .expect("hub lock")
            .retain(|_, p| !(p.agent_id == agent_id && p.conn_id == Some(conn_id)));
    }

    /// Closes the agent's connection (its token was revoked), on whichever instance holds it: dropping
    /// the queue's sender ends the writer, which closes the socket.
    pub async fn kick(&self, agent_id: Uuid) {
        self.kick_here(agent_id, None).await;
        let Some(cluster) = &self.cluster else {
            return;
        };
        let kick = Message::Kick {
            agent_id,
            conn_id: None,
        };
        match cluster.holder(agent_id).await {
            Ok(Some(instance)) => {
                if let Err(e) = cluster.post(instance, &kick, cluster::MESSAGE_TTL).await {
                    // The holder closes the connection at the agent's next heartbeat anyway, when it
                    // finds the token revoked.
                    tracing::warn!(%agent_id, error = %e, "could not ask another instance to close an agent's connection");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%agent_id, error = %e, "could not look up which instance holds an agent")
            }
        }
    }

    /// Closes the agent's connection on this instance: any, or only `conn_id`.
    pub(crate) async fn kick_here(&self, agent_id: Uuid, conn_id: Option<u64>) {
        let _rows = match &self.cluster {
            Some(cluster) => Some(cluster.rows.lock().await),
            None => None,
        };
        let removed = {
            let mut connections = self.connections.lock().expect("hub lock");
            match connections.get(&agent_id) {
                Some(c) if conn_id.is_none_or(|id| id == c.conn_id) => {
                    connections.remove(&agent_id)
                }
                _ => None,
            }
        };
        let Some(removed) = removed else {
            return;
        };
        self.fail_pending(agent_id, removed.conn_id);
        if let Some(cluster) = &self.cluster
            && let Err(e) = cluster
                .release_connection(agent_id, Some(removed.conn_id))
                .await
        {
            tracing::warn!(%agent_id, error = %e, "could not record the agent's disconnection; the next beat will");
        }
    }

    /// The agent has a control connection open, on this instance or on another live one.
    pub async fn is_connected(&self, agent_id: Uuid) -> bool {
        if self.is_connected_here(agent_id) {
            return true;
        }
        let Some(cluster) = &self.cluster else {
            return false;
        };
        match cluster.holder(agent_id).await {
            Ok(holder) => holder.is_some(),
            Err(e) => {
                tracing::warn!(%agent_id, error = %e, "could not look up which instance holds an agent");
                false
            }
        }
    }

    /// The agent has a control connection open on this instance.
    pub fn is_connected_here(&self, agent_id: Uuid) -> bool {
        self.connections
            .lock()
            .expect("hub lock")
            .get(&agent_id)
            .is_some_and(|c| !c.tx.is_closed())
    }

    fn connection_here(&self, agent_id: Uuid) -> Option<(u64, mpsc::Sender<ServerMessage>)> {
        self.connections
            .lock()
            .expect("hub lock")
            .get(&agent_id)
            .map(|c| (c.conn_id, c.tx.clone()))
    }

    /// The live instance holding an agent that is not connected here; Offline when there is none.
    async fn holder(&self, agent_id: Uuid) -> Result<(&Cluster, Uuid), RequestError> {
        let cluster = self.cluster.as_ref().ok_or(RequestError::Offline)?;
        match cluster.holder(agent_id).await {
            Ok(Some(instance)) => Ok((cluster, instance)),
            Ok(None) => Err(RequestError::Offline),
            Err(e) => {
                tracing::warn!(%agent_id, error = %e, "could not look up which instance holds an agent");
                Err(RequestError::Offline)
            }
        }
    }

    /// Queues a message for the agent without waiting for an answer.
    pub async fn send(&self, agent_id: Uuid, message: ServerMessage) -> Result<(), RequestError> {
        if self.connection_here(agent_id).is_some() {
            return self.send_here(agent_id, message);
        }
        let (cluster, instance) = self.holder(agent_id).await?;
        let relayed = Message::Send { agent_id, message };
        cluster
            .post(instance, &relayed, cluster::MESSAGE_TTL)
            .await
            .map_err(|e| relay_error(agent_id, e))
    }

    /// Queues a message for the agent's connection on this instance only: what the connection's own
    /// task sends its agent (welcome, protocol errors) must never go to another connection.
    pub fn send_here(&self, agent_id: Uuid, message: ServerMessage) -> Result<(), RequestError> {
        let (_, tx) = self
            .connection_here(agent_id)
            .ok_or(RequestError::Offline)?;
        tx.try_send(message).map_err(|_| RequestError::Offline)
    }

    /// Sends a request and waits up to `timeout` for the agent's reply, wherever the agent is connected.
    pub async fn request(
        &self,
        agent_id: Uuid,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ReplyOk, RequestError> {
        if self.connection_here(agent_id).is_some() {
            return self.request_here(agent_id, body, timeout).await;
        }
        let (cluster, instance) = self.holder(agent_id).await?;
        let id = self.next_id();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending.lock().expect("hub lock").insert(
            id,
            Pending {
                agent_id,
                conn_id: None,
                reply: reply_tx,
            },
        );
        let relayed = Message::Request {
            request_id: id,
            agent_id,
            timeout_ms: timeout.as_millis() as u64,
            body,
        };
        if let Err(e) = cluster.post(instance, &relayed, timeout).await {
            self.pending.lock().expect("hub lock").remove(&id);
            return Err(relay_error(agent_id, e));
        }
        self.wait(id, reply_rx, timeout).await
    }

    /// Sends a request to the agent's connection on this instance and waits up to `timeout`.
    pub(crate) async fn request_here(
        &self,
        agent_id: Uuid,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ReplyOk, RequestError> {
        let (conn_id, tx) = self
            .connection_here(agent_id)
            .ok_or(RequestError::Offline)?;
        let id = self.next_id();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending.lock().expect("hub lock").insert(
            id,
            Pending {
                agent_id,
                conn_id: Some(conn_id),
                reply: reply_tx,
            },
        );
        let message = ServerMessage::Request(Request {
            id,
            timeout_ms: timeout.as_millis() as u64,
            body,
        });
        if tx.try_send(message).is_err() {
            self.pending.lock().expect("hub lock").remove(&id);
            return Err(RequestError::Offline);
        }
        self.wait(id, reply_rx, timeout).await
    }

    async fn wait(
        &self,
        id: u64,
        reply: oneshot::Receiver<Result<ReplyOk, RequestError>>,
        timeout: Duration,
    ) -> Result<ReplyOk, RequestError> {
        let outcome = tokio::time::timeout(timeout, reply).await;
        self.pending.lock().expect("hub lock").remove(&id);
        match outcome {
            Ok(Ok(result)) => result,
            // The connection went away while we waited.
            Ok(Err(_)) => Err(RequestError::Offline),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    /// Hands a reply from `agent_id` (connected here) to the request waiting for it. A reply to an
    /// unknown id, a late one, one naming another agent's request, or one to a request relayed to
    /// another instance is dropped.
    pub fn complete(&self, agent_id: Uuid, id: u64, result: ReplyResult) -> bool {
        let result = match result {
            ReplyResult::Ok { body } => Ok(body),
            ReplyResult::Error(e) => Err(RequestError::Failed(e)),
        };
        self.complete_pending(agent_id, id, true, result)
    }

    /// Hands the outcome of a request relayed to another instance to its waiter.
    pub(crate) fn complete_relayed(
        &self,
        agent_id: Uuid,
        id: u64,
        result: Result<ReplyOk, RequestError>,
    ) -> bool {
        self.complete_pending(agent_id, id, false, result)
    }

    fn complete_pending(
        &self,
        agent_id: Uuid,
        id: u64,
        local: bool,
        result: Result<ReplyOk, RequestError>,
    ) -> bool {
        let mut pending = self.pending.lock().expect("hub lock");
        match pending.get(&id) {
            Some(p) if p.agent_id == agent_id && p.conn_id.is_some() == local => pending
                .remove(&id)
                .is_some_and(|p| p.reply.send(result).is_ok()),
            _ => false,
        }
    }

    /// Makes this instance's rows in `agent_connections` match its open connections (a beat does it).
    pub(crate) async fn reconcile(&self) -> Result<(), sqlx::Error> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let _rows = cluster.rows.lock().await;
        let held: Vec<(Uuid, u64)> = self
            .connections
            .lock()
            .expect("hub lock")
            .iter()
            .filter(|(_, c)| !c.tx.is_closed())
            .map(|(agent_id, c)| (*agent_id, c.conn_id))
            .collect();
        cluster.reconcile(&held).await
    }
}

/// A message that could not be handed to another instance: too large is said, anything else is
/// logged and answered as offline (the agent cannot be reached, whatever the reason).
fn relay_error(agent_id: Uuid, e: ClusterError) -> RequestError {
    match e {
        ClusterError::TooLarge { size } => RequestError::TooLarge {
            size,
            limit: cluster::NOTIFY_PAYLOAD_MAX,
        },
        e => {
            tracing::warn!(%agent_id, error = %e, "could not hand a message to the instance holding an agent");
            RequestError::Offline
        }
    }
}

impl From<Result<ReplyOk, RequestError>> for Outcome {
    fn from(result: Result<ReplyOk, RequestError>) -> Self {
        match result {
            Ok(body) => Self::Ok { body },
            Err(RequestError::Failed(error)) => Self::Failed { error },
            Err(RequestError::Timeout) => Self::Timeout,
            // Too large cannot happen on the holding instance (it talks to its own socket).
            Err(RequestError::Offline | RequestError::TooLarge { .. }) => Self::Offline,
        }
    }
}

impl From<Outcome> for Result<ReplyOk, RequestError> {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Ok { body } => Ok(body),
            Outcome::Failed { error } => Err(RequestError::Failed(error)),
            Outcome::Offline => Err(RequestError::Offline),
            Outcome::Timeout => Err(RequestError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_proto::ReplyErrorCode;

    #[tokio::test]
    async fn a_request_gets_its_reply_and_only_from_its_agent() {
        let hub = std::sync::Arc::new(AgentHub::new());
        let agent = Uuid::new_v4();
        let mut reg = hub.connect(agent).await;
        let h = hub.clone();
        let waiter = tokio::spawn(async move {
            h.request(
                agent,
                RequestBody::Forget {
                    device_id: "0123456789abcdef".parse().unwrap(),
                },
                Duration::from_secs(5),
            )
            .await
        });
        let Some(ServerMessage::Request(req)) = reg.rx.recv().await else {
            panic!("a request")
        };
        assert!(!hub.complete(
            Uuid::new_v4(),
            req.id,
            ReplyResult::Ok {
                body: ReplyOk::Forgotten
            }
        ));
        // A relayed outcome never completes a request that went to a local socket.
        assert!(!hub.complete_relayed(agent, req.id, Ok(ReplyOk::Forgotten)));
        assert!(hub.complete(
            agent,
            req.id,
            ReplyResult::Ok {
                body: ReplyOk::Forgotten
            }
        ));
        assert_eq!(waiter.await.unwrap().unwrap(), ReplyOk::Forgotten);
    }

    #[tokio::test]
    async fn timeouts_offline_and_errors() {
        let hub = AgentHub::new();
        let agent = Uuid::new_v4();
        let body = || RequestBody::Forget {
            device_id: "0123456789abcdef".parse().unwrap(),
        };
        assert!(matches!(
            hub.request(agent, body(), Duration::from_millis(10)).await,
            Err(RequestError::Offline)
        ));
        assert!(!hub.is_connected(agent).await);
        let _reg = hub.connect(agent).await;
        assert!(hub.is_connected(agent).await);
        assert!(matches!(
            hub.request(agent, body(), Duration::from_millis(10)).await,
            Err(RequestError::Timeout)
        ));
        assert!(!hub.complete(
            agent,
            999,
            ReplyResult::Error(ReplyError {
                code: ReplyErrorCode::Internal,
                message: String::new()
            })
        ));
    }

    #[tokio::test]
    async fn an_old_connection_leaving_keeps_the_new_one_and_its_requests() {
        let hub = std::sync::Arc::new(AgentHub::new());
        let agent = Uuid::new_v4();
        let old = hub.connect(agent).await;
        let mut new = hub.connect(agent).await;
        let h = hub.clone();
        let waiter = tokio::spawn(async move {
            h.request(
                agent,
                RequestBody::Forget {
                    device_id: "0123456789abcdef".parse().unwrap(),
                },
                Duration::from_secs(5),
            )
            .await
        });
        let Some(ServerMessage::Request(req)) = new.rx.recv().await else {
            panic!("a request on the new connection")
        };
        hub.disconnect(agent, old.conn_id).await;
        assert!(hub.is_connected(agent).await);
        assert!(hub.complete(
            agent,
            req.id,
            ReplyResult::Ok {
                body: ReplyOk::Forgotten
            }
        ));
        assert_eq!(waiter.await.unwrap().unwrap(), ReplyOk::Forgotten);
        // A kick closes it: the writer's queue ends.
        hub.kick(agent).await;
        assert!(!hub.is_connected(agent).await);
        assert!(new.rx.recv().await.is_none());
    }
}
