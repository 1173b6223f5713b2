//! The connected agents of this server instance: agent id -> the sender of its control WebSocket, and
//! request/response by id with timeouts.
//!
//! Everything that talks to an agent goes through [`AgentHub`], so that a later issue can put a
//! cross-instance transport (PostgreSQL LISTEN/NOTIFY) behind the same methods when several instances
//! run: today an agent is reachable only from the instance its socket is connected to.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use control_proto::{ReplyError, ReplyOk, ReplyResult, Request, RequestBody, ServerMessage};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

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
}

struct Connection {
    /// Tells two connections of the same agent apart, so the old one leaving does not unregister the new.
    conn_id: u64,
    tx: mpsc::Sender<ServerMessage>,
}

struct Pending {
    agent_id: Uuid,
    reply: oneshot::Sender<ReplyResult>,
}

/// The registry of connected agents.
#[derive(Default)]
pub struct AgentHub {
    connections: Mutex<HashMap<Uuid, Connection>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
}

/// What a connection task holds: its id (to leave) and the queue its writer drains.
pub struct Registration {
    pub conn_id: u64,
    pub rx: mpsc::Receiver<ServerMessage>,
}

impl AgentHub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a new connection of `agent_id`, replacing (and so closing) any earlier one.
    pub fn connect(&self, agent_id: Uuid) -> Registration {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(QUEUE);
        self.connections
            .lock()
            .expect("hub lock")
            .insert(agent_id, Connection { conn_id, tx });
        Registration { conn_id, rx }
    }

    /// Unregisters the connection `conn_id` of `agent_id` if it is still the current one.
    pub fn disconnect(&self, agent_id: Uuid, conn_id: u64) {
        let mut connections = self.connections.lock().expect("hub lock");
        if connections
            .get(&agent_id)
            .is_some_and(|c| c.conn_id == conn_id)
        {
            connections.remove(&agent_id);
        }
        drop(connections);
        // Waiting requests of that agent fail at once instead of running into their timeout.
        self.pending
            .lock()
            .expect("hub lock")
            .retain(|_, p| p.agent_id != agent_id);
    }

    /// Closes the agent's connection (its token was revoked): dropping the queue's sender ends the
    /// writer, which closes the socket.
    pub fn kick(&self, agent_id: Uuid) {
        let removed = self.connections.lock().expect("hub lock").remove(&agent_id);
        if removed.is_some() {
            self.pending
                .lock()
                .expect("hub lock")
                .retain(|_, p| p.agent_id != agent_id);
        }
    }

    pub fn is_connected(&self, agent_id: Uuid) -> bool {
        self.connections
            .lock()
            .expect("hub lock")
            .get(&agent_id)
            .is_some_and(|c| !c.tx.is_closed())
    }

    /// Queues a message for the agent without waiting for an answer.
    pub fn send(&self, agent_id: Uuid, message: ServerMessage) -> Result<(), RequestError> {
        let tx = self
            .connections
            .lock()
            .expect("hub lock")
            .get(&agent_id)
            .map(|c| c.tx.clone())
            .ok_or(RequestError::Offline)?;
        tx.try_send(message).map_err(|_| RequestError::Offline)
    }

    /// Sends a request and waits up to `timeout` for the agent's reply.
    pub async fn request(
        &self,
        agent_id: Uuid,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ReplyOk, RequestError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending.lock().expect("hub lock").insert(
            id,
            Pending {
                agent_id,
                reply: reply_tx,
            },
        );
        let message = ServerMessage::Request(Request {
            id,
            timeout_ms: timeout.as_millis() as u64,
            body,
        });
        if let Err(e) = self.send(agent_id, message) {
            self.pending.lock().expect("hub lock").remove(&id);
            return Err(e);
        }
        let outcome = tokio::time::timeout(timeout, reply_rx).await;
        self.pending.lock().expect("hub lock").remove(&id);
        match outcome {
            Ok(Ok(ReplyResult::Ok { body })) => Ok(body),
            Ok(Ok(ReplyResult::Error(e))) => Err(RequestError::Failed(e)),
            // The connection went away while we waited.
            Ok(Err(_)) => Err(RequestError::Offline),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    /// Hands a reply from `agent_id` to the request waiting for it. A reply to an unknown id, a late
    /// one, or one naming another agent's request is dropped.
    pub fn complete(&self, agent_id: Uuid, id: u64, result: ReplyResult) -> bool {
        let mut pending = self.pending.lock().expect("hub lock");
        match pending.get(&id) {
            Some(p) if p.agent_id == agent_id => {
                let p = pending.remove(&id).expect("present");
                p.reply.send(result).is_ok()
            }
            _ => false,
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
        let mut reg = hub.connect(agent);
        let h = hub.clone();
        let waiter = tokio::spawn(async move {
            h.request(
                agent,
                RequestBody::Forget {
                    device_id: "0123456789abcdef".into(),
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
            device_id: "0123456789abcdef".into(),
        };
        assert!(matches!(
            hub.request(agent, body(), Duration::from_millis(10)).await,
            Err(RequestError::Offline)
        ));
        let _reg = hub.connect(agent);
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
}
