//! Several server instances on one database: the transport that lets [`AgentHub`] reach an agent whose
//! control WebSocket is held by another instance.
//!
//! # How it works
//!
//! - Every instance has an id (a v4 UUID drawn at start) and a row in `server_instances` that it beats
//!   every [`ClusterSettings::heartbeat`]. An instance whose beat is older than
//!   [`ClusterSettings::stale_after`] counts as dead: whatever it held is ignored at once, and the next
//!   beat of a live instance deletes its row, which takes its connections and mailbox with it.
//! - `agent_connections` names the instance holding each agent's connection. A connect overwrites the
//!   row (the newest connection wins, and the instance that held the previous one is told to close it);
//!   a disconnect deletes it only while it still names that connection. Each beat also reconciles the
//!   instance's rows with its in-memory registry, so a write lost to a database hiccup heals itself.
//! - A message for another instance ([`Message`]: a request, its reply, a fire-and-forget message or a
//!   kick) is sealed, written to `agent_mailbox` and announced with `NOTIFY` on the recipient's own
//!   channel ([`channel_of`]), in one statement. The recipient acts on a notification only after it has
//!   claimed the message by deleting its row; a poll every [`ClusterSettings::poll_interval`] claims
//!   whatever is left. So a notification missed while the listening connection was down (it reconnects
//!   with backoff, and drains the mailbox each time it has) costs at most one poll interval, and no
//!   message is ever acted on twice.
//! - A request is answered by a reply addressed to the asking instance, which hands it to the waiter
//!   that [`AgentHub::request`] left in its pending table; the waiter's own timeout bounds everything.
//!   The holding instance forwards it only to its own socket, so a request is never relayed twice.
//! - The listening connection ([`crate::listen`]) has the pool's settings but is not one of the pool's,
//!   so it takes nothing from the requests; when the pool closes it closes too, and the instance's
//!   work stops. A graceful stop deletes the instance's row,
//!   so its agents count as disconnected everywhere at once instead of after the staleness window.
//!
//! # On NATS
//!
//! With the relay on NATS (`serve --nats-url`), a message travels first as a NATS request on the
//! recipient's own subject ([`NatsMailbox`]), which the recipient answers as soon as it has it, before
//! it acts: the same sealed notice, without a row, a NOTIFY or a poll. When no answer comes (the
//! recipient has no subscription, an older instance or one between two NATS connections, or NATS is
//! unreachable), the message goes to the PostgreSQL mailbox as above, with the same id. So a message
//! may reach its recipient twice (its answer was lost): the recipient remembers the ids it acted on
//! lately ([`Cluster::first_time`]) and acts on each once. Whoever may publish on the mailbox subjects
//! still cannot forge a message without the keys, but could replay one it saw after the recipient has
//! forgotten its id: the NATS account is reserved to the instances, as the relay's subjects are.
//!
//! # Limits and secrets
//!
//! A notification carries the whole message, and PostgreSQL refuses payloads of 8000 bytes or more:
//! a message that would not fit is refused with [`ClusterError::TooLarge`] (the hub turns it into
//! `RequestError::TooLarge`) rather than cut. Requests may hold a PIN and dongle tokens, so the message
//! is sealed with AES-256-GCM under a key derived from the dongle-token master key (every instance must
//! run with the same keys, as they already must to read `dongle_tokens`), bound by its associated data
//! to its id, sender and recipient. Nothing here logs a message body.
//!
//! [`AgentHub`]: super::hub::AgentHub
//! [`AgentHub::request`]: super::hub::AgentHub::request

use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use control_proto::{ReplyError, ReplyOk, RequestBody, ServerMessage};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::dongle_tokens::KeyRing;

/// The longest NOTIFY payload PostgreSQL accepts (it must be shorter than 8000 bytes).
pub const NOTIFY_PAYLOAD_MAX: usize = 7999;

/// The label of the derived sealing key, and the start of every sealed message's associated data.
const SEAL_LABEL: &[u8] = b"bridge-server/agent-hub/v1";

/// How long a message that is not a request stays deliverable. A request lives as long as its timeout.
pub const MESSAGE_TTL: Duration = Duration::from_secs(60);

/// The longest a relayed request may keep the holding instance waiting, whatever its sender asked.
pub(super) const MAX_RELAYED_TIMEOUT: Duration = Duration::from_secs(3600);

/// How the instances of one database find each other alive.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// How often this instance beats, cleans up after dead instances and reconciles its rows.
    pub heartbeat: Duration,
    /// An instance whose last beat is older than this counts as dead. It must be several heartbeats.
    pub stale_after: Duration,
    /// How often the mailbox is polled for messages whose notification was missed.
    pub poll_interval: Duration,
    /// Whether to LISTEN at all. Without it messages arrive by polling alone, which is what a
    /// connection pooler without LISTEN support (PgBouncer in transaction mode) needs.
    pub listen: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            stale_after: Duration::from_secs(15),
            poll_interval: Duration::from_secs(2),
            listen: true,
        }
    }
}

/// Why a message could not be handed to another instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error(
        "the message takes {size} bytes as a notification, more than PostgreSQL's limit of {NOTIFY_PAYLOAD_MAX}"
    )]
    TooLarge { size: usize },
    #[error("no dongle-token master key of version {0} to seal or open messages between instances")]
    NoKey(i32),
    #[error(
        "a message between instances does not open: every instance must run with the same dongle-token master keys"
    )]
    Unsealable,
    #[error("a message between instances is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// What one instance asks of another. Sealed inside a [`Notice`]; deliberately without `Debug`, since
/// requests and messages may hold a PIN or a dongle token.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Message {
    /// Forward `body` to the agent and answer with a [`Message::Reply`].
    Request {
        request_id: u64,
        agent_id: Uuid,
        timeout_ms: u64,
        body: RequestBody,
    },
    /// The outcome of the sender's request `request_id`.
    Reply {
        request_id: u64,
        agent_id: Uuid,
        outcome: Outcome,
    },
    /// Queue `message` for the agent without an answer.
    Send {
        agent_id: Uuid,
        message: ServerMessage,
    },
    /// Close the agent's connection: any (token revoked), or only `conn_id` (superseded by a newer one).
    Kick {
        agent_id: Uuid,
        conn_id: Option<u64>,
    },
}

impl Message {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Request { .. } => "request",
            Self::Reply { .. } => "reply",
            Self::Send { .. } => "send",
            Self::Kick { .. } => "kick",
        }
    }
}

/// A request's outcome as it travels back to the asking instance.
#[derive(Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Outcome {
    Ok { body: ReplyOk },
    Failed { error: ReplyError },
    Offline,
    Timeout,
}

/// The NOTIFY payload, and the columns of a mailbox row: routing in clear, the [`Message`] sealed.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Notice {
    pub(super) id: Uuid,
    pub(super) to: Uuid,
    pub(super) from: Uuid,
    sealed: String,
}

/// The NOTIFY channel of an instance: each listens on its own, so no instance wakes for another's mail.
pub fn channel_of(instance_id: Uuid) -> String {
    format!("agent_hub_{}", instance_id.simple())
}

/// The instances' mailboxes on NATS: a subject per instance under `prefix`.
#[derive(Clone)]
pub struct NatsMailbox {
    pub client: async_nats::Client,
    /// The subjects' first token, the relay stream's name with `-mailbox` (`RELAY-mailbox`).
    pub prefix: String,
}

impl NatsMailbox {
    /// The subject an instance reads its messages on.
    pub fn subject_of(&self, instance_id: Uuid) -> String {
        format!("{}.{}", self.prefix, instance_id.simple())
    }
}

/// How long a message posted on NATS waits for the recipient's receipt before it goes to the
/// PostgreSQL mailbox instead.
const NATS_RECEIPT_WAIT: Duration = Duration::from_secs(1);

/// How many message ids an instance remembers, to act on a message that arrived both ways once.
const IDS_REMEMBERED: usize = 4_096;

/// This instance in the cluster: what the hub needs to reach the others.
pub(crate) struct Cluster {
    pub pool: PgPool,
    pub instance_id: Uuid,
    pub settings: ClusterSettings,
    keys: Arc<KeyRing>,
    /// The mailboxes on NATS, tried before PostgreSQL's.
    pub nats: Option<NatsMailbox>,
    /// The ids of the messages acted on lately, oldest first.
    acted_on: std::sync::Mutex<std::collections::VecDeque<Uuid>>,
    /// Serialises this instance's writes to its `agent_connections` rows with the reconciliation of a
    /// beat, which would otherwise delete a row written between its snapshot and its delete.
    pub rows: tokio::sync::Mutex<()>,
}

impl Cluster {
    pub fn new(
        pool: PgPool,
        settings: ClusterSettings,
        keys: Arc<KeyRing>,
        nats: Option<NatsMailbox>,
    ) -> Self {
        Self {
            pool,
            instance_id: Uuid::new_v4(),
            settings,
            keys,
            nats,
            acted_on: Default::default(),
            rows: tokio::sync::Mutex::new(()),
        }
    }

    fn stale_secs(&self) -> f64 {
        self.settings.stale_after.as_secs_f64()
    }

    /// The live instance other than this one holding the agent's connection, if any.
    pub async fn holder(&self, agent_id: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT c.instance_id FROM agent_connections c \
             JOIN server_instances i ON i.instance_id = c.instance_id \
             WHERE c.agent_id = $1 AND c.instance_id <> $2 \
               AND i.last_beat > now() - make_interval(secs => $3)",
        )
        .bind(agent_id)
        .bind(self.instance_id)
        .bind(self.stale_secs())
        .fetch_optional(&self.pool)
        .await
    }

    /// Records that this instance holds the agent's connection `conn_id` now, and returns the
    /// connection it replaces, if another instance held it. The caller holds [`Cluster::rows`].
    pub async fn claim_connection(
        &self,
        agent_id: Uuid,
        conn_id: u64,
    ) -> Result<Option<(Uuid, u64)>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // The instance's row may be gone (it was taken for dead during a long database outage), and
        // the connection row needs it.
        upsert_instance(&mut *tx, self.instance_id).await?;
        let previous: Option<(Uuid, i64)> = sqlx::query_as(
            "SELECT instance_id, conn_id FROM agent_connections WHERE agent_id = $1 FOR UPDATE",
        )
        .bind(agent_id)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO agent_connections (agent_id, instance_id, conn_id) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id) DO UPDATE SET instance_id = EXCLUDED.instance_id, \
               conn_id = EXCLUDED.conn_id, connected_at = now()",
        )
        .bind(agent_id)
        .bind(self.instance_id)
        .bind(conn_id as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(previous
            .filter(|(instance, _)| *instance != self.instance_id)
            .map(|(instance, conn)| (instance, conn as u64)))
    }

    /// Deletes the agent's row if it still names this instance (and `conn_id`, when given). The caller
    /// holds [`Cluster::rows`].
    pub async fn release_connection(
        &self,
        agent_id: Uuid,
        conn_id: Option<u64>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "DELETE FROM agent_connections WHERE agent_id = $1 AND instance_id = $2 \
             AND ($3::bigint IS NULL OR conn_id = $3)",
        )
        .bind(agent_id)
        .bind(self.instance_id)
        .bind(conn_id.map(|c| c as i64))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes this instance's rows say exactly `held` (agent, connection): rows of connections that are
    /// gone are deleted, missing ones written back unless another instance holds the agent now. The
    /// caller holds [`Cluster::rows`].
    pub async fn reconcile(&self, held: &[(Uuid, u64)]) -> Result<(), sqlx::Error> {
        let agents: Vec<Uuid> = held.iter().map(|(a, _)| *a).collect();
        let conns: Vec<i64> = held.iter().map(|(_, c)| *c as i64).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM agent_connections WHERE instance_id = $1 \
             AND (agent_id, conn_id) NOT IN (SELECT * FROM unnest($2::uuid[], $3::bigint[]))",
        )
        .bind(self.instance_id)
        .bind(&agents)
        .bind(&conns)
        .execute(&mut *tx)
        .await?;
        // An agent that vanished with its row meanwhile (deleted elsewhere) makes this insert fail its
        // foreign key; the join on agents skips it instead.
        sqlx::query(
            "INSERT INTO agent_connections (agent_id, instance_id, conn_id) \
             SELECT t.agent_id, $1, t.conn_id FROM unnest($2::uuid[], $3::bigint[]) AS t(agent_id, conn_id) \
             JOIN agents a ON a.id = t.agent_id \
             ON CONFLICT (agent_id) DO NOTHING",
        )
        .bind(self.instance_id)
        .bind(&agents)
        .bind(&conns)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Seals `message` for `to` and hands it over: on NATS when the recipient confirms it there,
    /// otherwise to the mailbox with a notification, in one statement (the notification leaves at
    /// commit, when the row is there to claim). A recipient that is gone fails the mailbox's foreign
    /// key, which the caller sees as an error like any other.
    pub async fn post(
        &self,
        to: Uuid,
        message: &Message,
        ttl: Duration,
    ) -> Result<(), ClusterError> {
        let id = Uuid::new_v4();
        let (sealed, payload) = encode(&self.keys, id, self.instance_id, to, message)?;
        if let Some(nats) = &self.nats {
            let request = nats
                .client
                .request(nats.subject_of(to), payload.clone().into());
            match tokio::time::timeout(NATS_RECEIPT_WAIT, request).await {
                Ok(Ok(_receipt)) => {
                    metrics::counter!("agent_hub_messages_posted_total", "kind" => message.kind(), "path" => "nats")
                        .increment(1);
                    return Ok(());
                }
                Ok(Err(e)) => {
                    tracing::debug!(%to, error = %e, "a message goes to the database's mailbox: NATS did not take it")
                }
                Err(_) => {
                    tracing::debug!(%to, "a message goes to the database's mailbox: no receipt on NATS")
                }
            }
        }
        sqlx::query(
            "WITH m AS (INSERT INTO agent_mailbox (id, to_instance, from_instance, sealed, expires_at) \
               VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING id) \
             SELECT pg_notify($6, $7) FROM m",
        )
        .bind(id)
        .bind(to)
        .bind(self.instance_id)
        .bind(&sealed)
        .bind(ttl.as_secs_f64())
        .bind(channel_of(to))
        .bind(&payload)
        .execute(&self.pool)
        .await?;
        metrics::counter!("agent_hub_messages_posted_total", "kind" => message.kind(), "path" => "database")
            .increment(1);
        Ok(())
    }

    /// Takes the message `id` out of this instance's mailbox: Some(true) when it is this caller's to
    /// act on, Some(false) when it expired, None when someone (the poll) took it first.
    pub(super) async fn claim(&self, id: Uuid) -> Result<Option<bool>, sqlx::Error> {
        sqlx::query_scalar(
            "DELETE FROM agent_mailbox WHERE id = $1 AND to_instance = $2 RETURNING expires_at > now()",
        )
        .bind(id)
        .bind(self.instance_id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Takes every message out of this instance's mailbox, dropping the expired ones.
    pub(super) async fn drain(&self) -> Result<Vec<Notice>, sqlx::Error> {
        let rows: Vec<(Uuid, Uuid, String, bool)> = sqlx::query_as(
            "DELETE FROM agent_mailbox WHERE to_instance = $1 \
             RETURNING id, from_instance, sealed, expires_at > now()",
        )
        .bind(self.instance_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter(|(_, _, _, live)| *live)
            .map(|(id, from, sealed, _)| Notice {
                id,
                to: self.instance_id,
                from,
                sealed,
            })
            .collect())
    }

    /// Marks this instance alive and deletes the instances that are not (and so their connections and
    /// mailboxes). Returns how many dead instances were removed.
    pub(super) async fn beat(&self) -> Result<u64, sqlx::Error> {
        upsert_instance(&self.pool, self.instance_id).await?;
        let dead = sqlx::query(
            "DELETE FROM server_instances WHERE instance_id <> $1 \
             AND last_beat < now() - make_interval(secs => $2)",
        )
        .bind(self.instance_id)
        .bind(self.stale_secs())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(dead)
    }

    /// Removes this instance (at shutdown): its agents count as disconnected everywhere at once.
    pub(super) async fn leave(&self) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM server_instances WHERE instance_id = $1")
            .bind(self.instance_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) fn open(&self, notice: &Notice) -> Result<Message, ClusterError> {
        decode(&self.keys, notice)
    }

    /// True the first time a message id comes here (within the last [`IDS_REMEMBERED`]): a message
    /// whose receipt on NATS was lost comes again through the database's mailbox.
    pub(super) fn first_time(&self, id: Uuid) -> bool {
        let mut acted_on = self.acted_on.lock().expect("cluster lock");
        if acted_on.contains(&id) {
            return false;
        }
        if acted_on.len() == IDS_REMEMBERED {
            acted_on.pop_front();
        }
        acted_on.push_back(id);
        true
    }
}

async fn upsert_instance(
    db: impl sqlx::PgExecutor<'_>,
    instance_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO server_instances (instance_id) VALUES ($1) \
         ON CONFLICT (instance_id) DO UPDATE SET last_beat = now()",
    )
    .bind(instance_id)
    .execute(db)
    .await?;
    Ok(())
}

/// The associated data of a sealed message: label, key version, id, sender and recipient, so a sealed
/// message copied into another notice (or onto another channel, whose label differs) does not open.
fn aad(envelope: &Envelope<'_>, version: i32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(envelope.label.len() + 1 + 4 + 48);
    aad.extend_from_slice(envelope.label);
    aad.push(0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(envelope.id.as_bytes());
    aad.extend_from_slice(envelope.from.as_bytes());
    aad.extend_from_slice(envelope.to.as_bytes());
    aad
}

fn cipher(keys: &KeyRing, label: &[u8], version: i32) -> Result<Aes256Gcm, ClusterError> {
    let key = keys
        .derive(version, label)
        .ok_or(ClusterError::NoKey(version))?;
    Ok(Aes256Gcm::new_from_slice(&key).expect("a 32-byte key"))
}

/// Who a sealed message is from and for, and its id: what its seal is bound to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Envelope<'a> {
    /// What the message is (each kind of traffic between instances has its own label).
    pub label: &'a [u8],
    pub id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
}

/// Seals `plain` under the newest dongle-token master key, bound to `envelope`: base64 of the key's
/// version, the nonce and the ciphertext.
pub(crate) fn seal(
    keys: &KeyRing,
    envelope: Envelope<'_>,
    plain: &[u8],
) -> Result<String, ClusterError> {
    let version = keys.write_version();
    let mut nonce = [0u8; 12];
    rand::rng().fill(&mut nonce[..]);
    let ciphertext = cipher(keys, envelope.label, version)?
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plain,
                aad: &aad(&envelope, version),
            },
        )
        .expect("AES-GCM encryption of a short message cannot fail");
    let mut bytes = Vec::with_capacity(4 + 12 + ciphertext.len());
    bytes.extend_from_slice(&version.to_be_bytes());
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&ciphertext);
    Ok(B64.encode(bytes))
}

/// Opens what [`seal`] sealed for `envelope`.
pub(crate) fn unseal(
    keys: &KeyRing,
    envelope: Envelope<'_>,
    sealed: &str,
) -> Result<Vec<u8>, ClusterError> {
    let bytes = B64
        .decode(sealed)
        .map_err(|_| ClusterError::Malformed("the sealed message is not base64".into()))?;
    if bytes.len() < 4 + 12 + 16 {
        return Err(ClusterError::Malformed(
            "the sealed message is too short".into(),
        ));
    }
    let (version, rest) = bytes.split_at(4);
    let version = i32::from_be_bytes(version.try_into().expect("4 bytes"));
    let (nonce, ciphertext) = rest.split_at(12);
    let nonce: [u8; 12] = nonce.try_into().expect("12 bytes");
    cipher(keys, envelope.label, version)?
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad(&envelope, version),
            },
        )
        .map_err(|_| ClusterError::Unsealable)
}

/// Seals `message` and builds the notification payload: (sealed, payload). Fails with
/// [`ClusterError::TooLarge`] when the payload would not fit in a NOTIFY.
fn encode(
    keys: &KeyRing,
    id: Uuid,
    from: Uuid,
    to: Uuid,
    message: &Message,
) -> Result<(String, String), ClusterError> {
    let plain = serde_json::to_vec(message).expect("messages always serialize");
    let sealed = seal(
        keys,
        Envelope {
            label: SEAL_LABEL,
            id,
            from,
            to,
        },
        &plain,
    )?;
    let payload = serde_json::to_string(&Notice {
        id,
        to,
        from,
        sealed: sealed.clone(),
    })
    .expect("a notice always serializes");
    check_size(&payload)?;
    Ok((sealed, payload))
}

/// Refuses a notification payload PostgreSQL would refuse.
fn check_size(payload: &str) -> Result<(), ClusterError> {
    if payload.len() > NOTIFY_PAYLOAD_MAX {
        return Err(ClusterError::TooLarge {
            size: payload.len(),
        });
    }
    Ok(())
}

/// Opens the message of a notice.
fn decode(keys: &KeyRing, notice: &Notice) -> Result<Message, ClusterError> {
    let plain = unseal(
        keys,
        Envelope {
            label: SEAL_LABEL,
            id: notice.id,
            from: notice.from,
            to: notice.to,
        },
        &notice.sealed,
    )?;
    // The error names a position and a field, never a value.
    serde_json::from_slice(&plain).map_err(|e| ClusterError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(line_len: usize) -> Message {
        Message::Request {
            request_id: 7,
            agent_id: Uuid::new_v4(),
            timeout_ms: 5000,
            body: RequestBody::Command {
                command_id: Uuid::new_v4(),
                device_id: "0123456789abcdef".parse().unwrap(),
                line: "x".repeat(line_len),
                timeout_ms: 3000,
                allow_dangerous: false,
            },
        }
    }

    #[tokio::test]
    async fn a_message_that_came_both_ways_is_acted_on_once_within_the_memory() {
        let pool = PgPool::connect_lazy("postgres://nowhere/none").unwrap();
        let cluster = Cluster::new(
            pool,
            ClusterSettings::default(),
            Arc::new(KeyRing::default()),
            None,
        );
        let first = Uuid::new_v4();
        assert!(cluster.first_time(first));
        assert!(!cluster.first_time(first), "the second arrival");
        for _ in 0..IDS_REMEMBERED {
            assert!(cluster.first_time(Uuid::new_v4()));
        }
        assert_eq!(cluster.acted_on.lock().unwrap().len(), IDS_REMEMBERED);
        assert!(cluster.first_time(first), "forgotten after the newest ones");
    }

    #[test]
    fn a_message_too_large_for_notify_is_refused_not_cut() {
        let keys = KeyRing::default();
        let (id, from, to) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let (_, payload) = encode(&keys, id, from, to, &command(100)).unwrap();
        assert!(payload.len() <= NOTIFY_PAYLOAD_MAX);
        match encode(&keys, id, from, to, &command(8000)) {
            Err(ClusterError::TooLarge { size }) => assert!(size > NOTIFY_PAYLOAD_MAX),
            other => panic!("expected TooLarge, got {:?}", other.map(|_| ())),
        }
        // The boundary is PostgreSQL's: 7999 bytes pass, 8000 do not.
        assert!(check_size(&"a".repeat(7999)).is_ok());
        assert!(matches!(
            check_size(&"a".repeat(8000)),
            Err(ClusterError::TooLarge { size: 8000 })
        ));
        // Find the longest line that fits and check the next one is refused, so no message is cut.
        let fits = (4000..8000)
            .rev()
            .find(|n| encode(&keys, id, from, to, &command(*n)).is_ok())
            .unwrap();
        assert!(encode(&keys, id, from, to, &command(fits + 1)).is_err());
    }

    #[test]
    fn sealed_messages_open_only_for_their_notice_and_keys() {
        let keys = KeyRing::default();
        let (id, from, to) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let message = Message::Request {
            request_id: 1,
            agent_id: Uuid::new_v4(),
            timeout_ms: 1000,
            body: RequestBody::PairingSubmit {
                device_id: "0123456789abcdef".parse().unwrap(),
                corr_id: Uuid::nil(),
                pin: control_proto::Pin::parse("654321").unwrap(),
                pairing_nonce: "ab".repeat(16),
                // 0x5a bytes: `WlpaWlpa...` in base64.
                token: control_proto::Token::from_bytes([0x5a; 32]),
            },
        };
        let (sealed, payload) = encode(&keys, id, from, to, &message).unwrap();
        // Neither the PIN nor the token travels in clear.
        assert!(!payload.contains("654321") && !payload.contains("WlpaWlpa"));
        let notice: Notice = serde_json::from_str(&payload).unwrap();
        assert_eq!(notice.sealed, sealed);
        match decode(&keys, &notice).unwrap() {
            Message::Request {
                request_id: 1,
                body: RequestBody::PairingSubmit { pin, .. },
                ..
            } => assert_eq!(pin.as_str(), "654321"),
            _ => panic!("the same request"),
        }
        // Readdressed, or under other keys, it does not open.
        let readdressed = Notice {
            to: Uuid::new_v4(),
            ..notice
        };
        assert!(matches!(
            decode(&keys, &readdressed),
            Err(ClusterError::Unsealable)
        ));
        let notice: Notice = serde_json::from_str(&payload).unwrap();
        assert!(matches!(
            decode(&KeyRing::default(), &notice),
            Err(ClusterError::Unsealable)
        ));
    }
}
