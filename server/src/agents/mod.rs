//! Agents (SPEC 3.3): registration and bearer tokens, presence, device reports, the [`hub`] of
//! connected agents, and the [`cluster`] transport that lets the hub reach agents connected to other
//! server instances on the same database.
//!
//! An agent token is 256 random bits shown once at registration; the database keeps only its SHA-256.
//! Presence is a heartbeat (HTTP or control WebSocket) in the last [`OFFLINE_AFTER_SECS`] seconds.

pub mod cluster;
pub mod cluster_tasks;
pub mod hub;
pub mod ws;

use chrono::{DateTime, Utc};
use control_proto::{DeviceId, DongleReport, Transport};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::token;

/// An agent with no heartbeat for this long is offline.
pub const OFFLINE_AFTER_SECS: i64 = 30;

/// The SQL condition "agent `a` is online", for queries that alias agents as `a`.
pub const ONLINE_SQL: &str =
    "(a.last_seen_at IS NOT NULL AND a.last_seen_at > now() - interval '30 seconds')";

/// How often, at most, a connected agent's token is checked again as its messages arrive: a token
/// revoked or expired while connected ends the connection at the first message after this.
pub const TOKEN_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Checks a connected agent's token again as its messages arrive, at most once per
/// [`TOKEN_CHECK_EVERY`]; shared by the control and data connections.
pub struct TokenCheck {
    agent_id: Uuid,
    checked: tokio::time::Instant,
}

impl TokenCheck {
    pub fn new(agent_id: Uuid) -> Self {
        Self {
            agent_id,
            checked: tokio::time::Instant::now(),
        }
    }

    /// False when the token is revoked or expired (checked now when `force`, else only if the last
    /// check is old enough). A database that cannot answer ends nothing: the next check asks again.
    pub async fn still_valid(&mut self, pool: &PgPool, force: bool) -> bool {
        if !force && self.checked.elapsed() < TOKEN_CHECK_EVERY {
            return true;
        }
        self.checked = tokio::time::Instant::now();
        match still_authorised(pool, self.agent_id).await {
            Ok(valid) => {
                if !valid {
                    tracing::info!(agent_id = %self.agent_id, "closing a connection: the agent's token is no longer valid");
                }
                valid
            }
            Err(e) => {
                tracing::warn!(agent_id = %self.agent_id, error = %e, "could not check an agent's token");
                true
            }
        }
    }
}

/// A token in use is renewed at most once in this long: a renewal costs a write.
const RENEW_SLACK_SECS: f64 = 86_400.0;

/// An authenticated agent: what a valid bearer token resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: Uuid,
    pub user_id: Uuid,
}

/// An agent as `GET /agents` shows it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct AgentView {
    pub id: Uuid,
    pub agent_name: String,
    pub hostname: Option<String>,
    pub os: Option<String>,
    pub version: Option<String>,
    /// The control protocol of its last hello.
    pub protocol: Option<i32>,
    /// Its workstation's network interfaces at its last hello, and which the LAN discovery uses.
    #[schema(value_type = Vec<Object>)]
    pub interfaces: sqlx::types::Json<Vec<control_proto::InterfaceReport>>,
    /// Its protocol is older than this server supports fully: upgrade `bridge-agent`.
    pub upgrade_required: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// A heartbeat in the last 30 s.
    pub online: bool,
    /// The agent has at least one token that is neither revoked nor expired.
    pub active_token: bool,
    pub created_at: DateTime<Utc>,
}

/// Makes an agent for `user_id` and its first token; returns the agent id and the token (shown once).
pub async fn register(
    pool: &PgPool,
    user_id: Uuid,
    agent_name: &str,
    ttl: Option<std::time::Duration>,
) -> Result<(Uuid, String), sqlx::Error> {
    let secret = token::new_secret();
    let mut tx = pool.begin().await?;
    let agent_id: Uuid =
        sqlx::query_scalar("INSERT INTO agents (user_id, agent_name) VALUES ($1, $2) RETURNING id")
            .bind(user_id)
            .bind(agent_name)
            .fetch_one(&mut *tx)
            .await?;
    sqlx::query(
        "INSERT INTO agent_tokens (agent_id, token_hash, expires_at) \
         VALUES ($1, $2, now() + make_interval(secs => $3))",
    )
    .bind(agent_id)
    .bind(token::digest(&secret))
    .bind(ttl.map(|t| t.as_secs_f64()))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((agent_id, secret))
}

/// The agent a bearer token belongs to, if the token is valid: not revoked, not expired, and its user
/// active (disabling a user also revokes the tokens; the status check covers any other path).
pub async fn authenticate(
    db: impl PgExecutor<'_>,
    bearer: &str,
) -> Result<Option<AgentIdentity>, sqlx::Error> {
    let row: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT a.id, a.user_id FROM agent_tokens t \
         JOIN agents a ON a.id = t.agent_id JOIN users u ON u.id = a.user_id \
         WHERE t.token_hash = $1 AND t.revoked_at IS NULL \
           AND (t.expires_at IS NULL OR t.expires_at > now()) AND u.status = 'active'",
    )
    .bind(token::digest(bearer))
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(agent_id, user_id)| AgentIdentity { agent_id, user_id }))
}

/// True while the agent has a token that is neither revoked nor expired and its user is active: a
/// connected agent that loses this (expiry, or a revocation on another instance) is disconnected.
pub async fn still_authorised(
    db: impl PgExecutor<'_>,
    agent_id: Uuid,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM agent_tokens t JOIN agents a ON a.id = t.agent_id \
           JOIN users u ON u.id = a.user_id WHERE t.agent_id = $1 AND t.revoked_at IS NULL \
           AND (t.expires_at IS NULL OR t.expires_at > now()) AND u.status = 'active')",
    )
    .bind(agent_id)
    .fetch_one(db)
    .await
}

/// A heartbeat on the control connection: marks the agent alive now if it is [`still_authorised`], in
/// one statement (a heartbeat is the most frequent message of all); false when it is not, and then
/// nothing changes.
pub async fn heartbeat_if_authorised(
    db: impl PgExecutor<'_>,
    agent_id: Uuid,
    ttl: Option<std::time::Duration>,
) -> Result<bool, sqlx::Error> {
    // One statement: the sign of life, and (at most once a day) the renewal of a token in use, so that
    // an agent left running never expires while a forgotten copy of its token does.
    let alive: i64 = sqlx::query_scalar(
        "WITH alive AS ( \
           UPDATE agents a SET last_seen_at = now() WHERE a.id = $1 AND EXISTS ( \
             SELECT 1 FROM agent_tokens t JOIN users u ON u.id = a.user_id WHERE t.agent_id = a.id \
             AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()) \
             AND u.status = 'active') \
           RETURNING a.id), \
         renewed AS ( \
           UPDATE agent_tokens t SET expires_at = now() + make_interval(secs => $2) \
           WHERE $2 IS NOT NULL AND t.agent_id IN (SELECT id FROM alive) AND t.revoked_at IS NULL \
             AND (t.expires_at IS NULL OR t.expires_at > now()) \
             AND (t.expires_at IS NULL \
                  OR t.expires_at < now() + make_interval(secs => $2 - $3)) \
           RETURNING 1) \
         SELECT count(*) FROM alive",
    )
    .bind(agent_id)
    .bind(ttl.map(|t| t.as_secs_f64()))
    .bind(RENEW_SLACK_SECS)
    .fetch_one(db)
    .await?;
    Ok(alive == 1)
}

pub async fn list(pool: &PgPool, user_id: Uuid) -> Result<Vec<AgentView>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT a.id, a.agent_name, a.hostname, a.os, a.version, a.protocol, a.interfaces, \
           coalesce(a.protocol < {min}, false) AS upgrade_required, a.last_seen_at, \
           {ONLINE_SQL} AS online, \
           EXISTS (SELECT 1 FROM agent_tokens t WHERE t.agent_id = a.id AND t.revoked_at IS NULL \
                   AND (t.expires_at IS NULL OR t.expires_at > now())) AS active_token, \
           a.created_at \
         FROM agents a WHERE a.user_id = $1 ORDER BY a.created_at, a.id",
        min = control_proto::MIN_AGENT_PROTOCOL
    )))
    .bind(user_id)
    .fetch_all(pool)
    .await
}

/// Revokes every token of the agent if it belongs to `user_id`; None when it does not exist for them.
pub async fn revoke_tokens(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    agent_id: Uuid,
) -> Result<Option<u64>, sqlx::Error> {
    let row: Option<(i64,)> = sqlx::query_as(
        "WITH agent AS (SELECT id FROM agents WHERE id = $1 AND user_id = $2), \
         revoked AS (UPDATE agent_tokens SET revoked_at = now() \
                     WHERE agent_id IN (SELECT id FROM agent) AND revoked_at IS NULL RETURNING 1) \
         SELECT (SELECT count(*) FROM revoked) FROM agent",
    )
    .bind(agent_id)
    .bind(user_id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(n,)| n as u64))
}

/// Marks the agent alive now, with what it says about itself (fields left out keep their value).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    agent_id: Uuid,
    hostname: Option<&str>,
    os: Option<&str>,
    version: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE agents SET last_seen_at = now(), hostname = coalesce($2, hostname), \
         os = coalesce($3, os), version = coalesce($4, version) WHERE id = $1",
    )
    .bind(agent_id)
    .bind(hostname.map(|s| clip(s, 255)))
    .bind(os.map(|s| clip(s, 255)))
    .bind(version.map(|s| clip(s, 64)))
    .execute(db)
    .await?;
    Ok(())
}

/// The most interfaces, and addresses per interface, kept from a hello.
const MAX_INTERFACES: usize = 64;
const MAX_ADDRESSES: usize = 16;

/// Records an agent's hello: alive now, with its host name, OS, version, protocol and interfaces (the
/// lists bounded and the texts clipped, whatever the agent sends).
pub async fn hello(
    db: impl PgExecutor<'_>,
    agent_id: Uuid,
    hello: &control_proto::Hello,
) -> Result<(), sqlx::Error> {
    let interfaces: Vec<control_proto::InterfaceReport> = hello
        .interfaces
        .iter()
        .take(MAX_INTERFACES)
        .map(|i| control_proto::InterfaceReport {
            name: clip(&i.name, 64),
            addresses: i
                .addresses
                .iter()
                .take(MAX_ADDRESSES)
                .map(|a| clip(a, 64))
                .collect(),
            used_for_discovery: i.used_for_discovery,
            excluded_because: i.excluded_because.as_deref().map(|r| clip(r, 200)),
        })
        .collect();
    sqlx::query(
        "UPDATE agents SET last_seen_at = now(), hostname = $2, os = $3, version = $4, \
         protocol = $5, interfaces = $6 WHERE id = $1",
    )
    .bind(agent_id)
    .bind(clip(&hello.hostname, 255))
    .bind(clip(&hello.os, 255))
    .bind(clip(&hello.agent_version, 64))
    .bind(i32::try_from(hello.protocol).unwrap_or(i32::MAX))
    .bind(sqlx::types::Json(interfaces))
    .execute(db)
    .await?;
    Ok(())
}

fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Why a device report was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("a report lists at most 256 dongles")]
    TooMany,
    #[error(
        "device_id {0} is not the local device id of this agent for its endpoint: local ids derive from the agent's id and the endpoint's identity"
    )]
    ForgedLocalId(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A claimed dongle of the agent's own user in a report: its token may go to that agent.
#[derive(Debug, Clone)]
pub struct OwnedSighting {
    pub dongle_id: Uuid,
    pub device_id: DeviceId,
}

/// Makes the local endpoint `dongle_id` the agent's user's, without pairing: the first report claims
/// it (audited), and later ones claim it again after an unpair, since the agent still serves it.
async fn claim_local(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    agent: AgentIdentity,
    dongle_id: Uuid,
    device_id: &str,
) -> Result<(), sqlx::Error> {
    let claimed = sqlx::query(
        "UPDATE dongles SET local_agent_id = $2, owner_user_id = $3,            ownership_state = 'CLAIMED_ACTIVE', updated_at = now()          WHERE id = $1 AND (local_agent_id IS DISTINCT FROM $2 OR owner_user_id IS DISTINCT FROM $3            OR ownership_state <> 'CLAIMED_ACTIVE')",
    )
    .bind(dongle_id)
    .bind(agent.agent_id)
    .bind(agent.user_id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if claimed > 0 {
        crate::audit::record(
            &mut **tx,
            crate::audit::Entry {
                actor: Some(agent.user_id),
                action: "dongle.local_claimed",
                target: Some(crate::audit::Target {
                    kind: "dongle",
                    id: dongle_id.to_string(),
                }),
                ip: None,
                user_agent: None,
                details: serde_json::json!({
                    "device_id": device_id,
                    "agent_id": agent.agent_id,
                }),
            },
        )
        .await?;
    }
    Ok(())
}

/// How long a dongle row nobody owns, and an agent's sighting that is no longer present, are kept after
/// they were last seen. Reports create rows for whatever ids an agent names; this bounds what a
/// modified agent (or a LAN full of passing dongles) leaves behind.
pub const STALE_DONGLE_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);

/// What [`forget_stale_dongles`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub dongles: u64,
    pub sightings: u64,
}

/// Deletes the sightings no longer present for `retention`, then the dongle rows that nobody owns,
/// that no agent sees now, that are in no group and were last seen (or created, if never seen) longer
/// than `retention` ago. An owned dongle is never deleted here, however long it is away.
pub async fn forget_stale_dongles(
    pool: &PgPool,
    retention: std::time::Duration,
) -> Result<Forgotten, sqlx::Error> {
    let secs = retention.as_secs_f64();
    let sightings = sqlx::query(
        "DELETE FROM dongle_sightings WHERE NOT present \
         AND last_seen_at < now() - make_interval(secs => $1)",
    )
    .bind(secs)
    .execute(pool)
    .await?
    .rows_affected();
    let dongles = sqlx::query(
        "DELETE FROM dongles d WHERE d.owner_user_id IS NULL \
         AND coalesce(d.last_seen_at, d.created_at) < now() - make_interval(secs => $1) \
         AND NOT EXISTS (SELECT 1 FROM dongle_sightings s WHERE s.dongle_id = d.id AND s.present) \
         AND NOT EXISTS (SELECT 1 FROM dongle_group_members m WHERE m.dongle_id = d.id)",
    )
    .bind(secs)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(Forgotten { dongles, sightings })
}

/// Applies a full snapshot of the dongles an agent sees: upserts each by device id (identity, and the
/// latest sighting: transport, pairing mode, presence, agent) and this agent's sighting of it, and marks
/// the agent's sightings of other dongles as no longer present.
/// Ownership is never touched here, except for the agent's own local endpoints (see [`claim_local`]). Returns the present, CLAIMED_ACTIVE dongles owned by the agent's user.
pub async fn report_devices(
    pool: &PgPool,
    agent: AgentIdentity,
    dongles: &[DongleReport],
    new_ids: crate::rate_limit::Limit,
) -> Result<Vec<OwnedSighting>, ReportError> {
    if dongles.len() > 256 {
        return Err(ReportError::TooMany);
    }
    // Every id is well formed (the report's type says so); a local endpoint's must also be the one
    // derived from this agent's id.
    for d in dongles {
        if let Transport::Local { identity, .. } = &d.transport
            && control_proto::local_device_id(agent.agent_id, identity) != d.device_id
        {
            return Err(ReportError::ForgedLocalId(d.device_id.to_string()));
        }
    }
    // Ids the server has no row for count against the user's allowance of new ids; past it, they are
    // left out of this report (known ones are still applied), so reports cannot fill the table.
    let ids: Vec<String> = dongles.iter().map(|d| d.device_id.to_string()).collect();
    let known: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT device_id FROM dongles WHERE device_id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let fresh = ids.iter().filter(|id| !known.contains(*id)).count() as u32;
    let admit_new = fresh == 0
        || crate::rate_limit::hit_n(
            pool,
            crate::rate_limit::Scope::NewDongleIdsUser,
            &agent.user_id.to_string(),
            new_ids,
            fresh,
        )
        .await?
            == crate::rate_limit::Decision::Allowed;
    if !admit_new {
        tracing::warn!(agent_id = %agent.agent_id, new_ids = fresh,
            "an agent's report names more new dongles than its user may introduce now; they are left out");
    }
    let mut tx = pool.begin().await?;
    let mut seen = Vec::with_capacity(dongles.len());
    // Rows are locked in the order of their device ids, as everything that locks several dongles does:
    // two transactions locking the same rows in opposite orders would deadlock.
    let mut in_order: Vec<(&DongleReport, &String)> = dongles.iter().zip(&ids).collect();
    in_order.sort_by_key(|(d, _)| d.device_id);
    for (d, device_id) in in_order {
        if !admit_new && !known.contains(device_id) {
            continue;
        }
        let local = matches!(d.transport, Transport::Local { .. });
        // Which agent's local endpoint the id already is, if any: NULL for a real dongle.
        let existing: Option<Option<Uuid>> = sqlx::query_scalar(
            "SELECT local_agent_id FROM dongles WHERE device_id = $1 FOR UPDATE",
        )
        .bind(device_id)
        .fetch_optional(&mut *tx)
        .await?;
        match (local, existing) {
            (true, Some(None)) => {
                tracing::warn!(agent_id = %agent.agent_id, device_id = %d.device_id,
                    "a local endpoint's id is a real dongle's; the endpoint is not served");
                continue;
            }
            (_, Some(Some(owner))) if owner != agent.agent_id || !local => {
                // Another agent's endpoint, or an endpoint reported as a dongle: no one gains it.
                tracing::warn!(agent_id = %agent.agent_id, device_id = %d.device_id,
                    "an agent reported another agent's local endpoint; ignored");
                continue;
            }
            _ => {}
        }
        // Stored in its wire form: {"kind": "usb", ...}, {"kind": "lan", ...} or {"kind": "local", ...}.
        let transport = serde_json::to_value(&d.transport).expect("a transport always serializes");
        // A report is what one agent sees, not proof: an owned dongle's row changes only on its
        // owner's agents' reports. A stranger's report of it records the stranger's sighting only.
        let updated: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO dongles (device_id, fw_build, proto_ver, capabilities, transport, pairing_mode, \
               present, last_agent_id, last_seen_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now()) \
             ON CONFLICT (device_id) DO UPDATE SET fw_build = EXCLUDED.fw_build, \
               proto_ver = EXCLUDED.proto_ver, capabilities = EXCLUDED.capabilities, \
               transport = EXCLUDED.transport, pairing_mode = EXCLUDED.pairing_mode, \
               present = EXCLUDED.present, last_agent_id = EXCLUDED.last_agent_id, \
               last_seen_at = CASE WHEN EXCLUDED.present THEN now() ELSE dongles.last_seen_at END \
             WHERE dongles.owner_user_id IS NULL OR dongles.owner_user_id = $9 \
             RETURNING id",
        )
        .bind(device_id)
        .bind(clip(&d.fw_build, 64))
        .bind(d.proto_ver as i16)
        .bind(d.capabilities as i64)
        .bind(&transport)
        .bind(d.pairing_mode)
        .bind(d.present)
        .bind(agent.agent_id)
        .bind(agent.user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let dongle_id: Uuid = match updated {
            Some(id) => id,
            None => {
                sqlx::query_scalar("SELECT id FROM dongles WHERE device_id = $1")
                    .bind(device_id)
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        if local {
            claim_local(&mut tx, agent, dongle_id, device_id).await?;
        }
        sqlx::query(
            "INSERT INTO dongle_sightings (dongle_id, agent_id, present, pairing_mode, transport) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (dongle_id, agent_id) DO UPDATE SET present = EXCLUDED.present, \
               pairing_mode = EXCLUDED.pairing_mode, transport = EXCLUDED.transport, \
               last_seen_at = CASE WHEN EXCLUDED.present THEN now() ELSE dongle_sightings.last_seen_at END",
        )
        .bind(dongle_id)
        .bind(agent.agent_id)
        .bind(d.present)
        .bind(d.pairing_mode)
        .bind(&transport)
        .execute(&mut *tx)
        .await?;
        seen.push(device_id.clone());
    }
    // The snapshot is complete: what this agent listed before and not now, it no longer sees.
    sqlx::query(
        "UPDATE dongle_sightings s SET present = false, pairing_mode = false FROM dongles d \
         WHERE d.id = s.dongle_id AND s.agent_id = $1 AND s.present AND NOT (d.device_id = ANY($2))",
    )
    .bind(agent.agent_id)
    .bind(&seen)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE dongles SET present = false, pairing_mode = false \
         WHERE last_agent_id = $1 AND present AND NOT (device_id = ANY($2))",
    )
    .bind(agent.agent_id)
    .bind(&seen)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE agents SET last_seen_at = now() WHERE id = $1")
        .bind(agent.agent_id)
        .execute(&mut *tx)
        .await?;
    let owned: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT d.id, d.device_id FROM dongles d \
         JOIN dongle_sightings s ON s.dongle_id = d.id AND s.agent_id = $2 AND s.present \
         WHERE d.device_id = ANY($1) AND d.owner_user_id = $3 AND d.ownership_state = 'CLAIMED_ACTIVE'",
    )
    .bind(&seen)
    .bind(agent.agent_id)
    .bind(agent.user_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    owned
        .into_iter()
        .map(|(dongle_id, device_id)| {
            Ok(OwnedSighting {
                dongle_id,
                device_id: crate::db::stored_device_id(device_id)?,
            })
        })
        .collect()
}
