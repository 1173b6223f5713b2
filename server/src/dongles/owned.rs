//! A dongle its owner acts on (configuration, commands, frames) and the agent that serves it.

use control_proto::DeviceId;
use sqlx::PgPool;
use uuid::Uuid;

use crate::agents::hub::AgentHub;

use super::DongleError;
use super::access::sightings;

/// The capability bits (as stored, from the dongle's ANNOUNCE) include CAN FD.
pub fn announces_can_fd(capabilities: i64) -> bool {
    capabilities & i64::from(firmware_proto::caps::CAN_FD) != 0
}

/// A dongle its owner acts on: configuration, commands, frames.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwnedDongle {
    pub id: Uuid,
    #[sqlx(try_from = "String")]
    pub device_id: DeviceId,
    /// The capability bits of the last report (0 when none came yet).
    pub capabilities: i64,
}

impl OwnedDongle {
    /// The dongle announces CAN FD.
    pub fn can_fd(&self) -> bool {
        announces_can_fd(self.capabilities)
    }
}

/// The dongle if `user_id` owns it and it is CLAIMED_ACTIVE. Anything else (another owner, unclaimed,
/// a hold, a reset) answers None, which the handlers turn into DONGLE_NOT_FOUND, as for an unknown id.
pub async fn owned(
    db: impl sqlx::PgExecutor<'_>,
    user_id: Uuid,
    dongle_id: Uuid,
) -> Result<Option<OwnedDongle>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, device_id, coalesce(capabilities, 0) AS capabilities FROM dongles \
         WHERE id = $1 AND owner_user_id = $2 AND ownership_state = 'CLAIMED_ACTIVE'",
    )
    .bind(dongle_id)
    .bind(user_id)
    .fetch_optional(db)
    .await
}

/// The dongle `device_id` when `agent` may speak for it: its user's claimed dongle that the agent sees
/// now, or the agent's own local endpoint. What a dongle says unasked (its traffic for the console, a
/// command typed on its UART) is taken from such an agent only.
pub async fn spoken_for_by(
    pool: &PgPool,
    agent: crate::agents::AgentIdentity,
    device_id: DeviceId,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT d.id FROM dongles d \
         WHERE d.device_id = $1 AND d.owner_user_id = $2 \
           AND d.ownership_state = 'CLAIMED_ACTIVE' \
           AND (d.local_agent_id = $3 OR EXISTS ( \
                SELECT 1 FROM dongle_sightings s \
                WHERE s.dongle_id = d.id AND s.agent_id = $3 AND s.present))",
    )
    .bind(device_id.to_string())
    .bind(agent.user_id)
    .bind(agent.agent_id)
    .fetch_optional(pool)
    .await
}

/// [`owned`], or [`DongleError::NotFound`] when the caller may not act on the dongle.
pub async fn owned_or_404(
    pool: &PgPool,
    user_id: Uuid,
    dongle_id: Uuid,
) -> Result<OwnedDongle, DongleError> {
    owned(pool, user_id, dongle_id)
        .await?
        .ok_or(DongleError::NotFound)
}

/// An agent of `user_id` that sees the dongle now, is online and is connected: `prefer` when it
/// qualifies (the calling agent, or the agent a command went to before), otherwise the one that saw the
/// dongle last.
pub async fn serving_agent(
    pool: &PgPool,
    hub: &AgentHub,
    dongle_id: Uuid,
    user_id: Uuid,
    prefer: Option<Uuid>,
) -> Result<Option<Uuid>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let candidates: Vec<Uuid> = sightings(&mut conn, dongle_id, user_id)
        .await?
        .into_iter()
        .filter(|s| s.present && s.online)
        .map(|s| s.agent_id)
        .collect();
    drop(conn);
    if let Some(p) = prefer
        && candidates.contains(&p)
        && hub.is_connected(p).await
    {
        return Ok(Some(p));
    }
    for a in candidates {
        if hub.is_connected(a).await {
            return Ok(Some(a));
        }
    }
    Ok(None)
}

/// [`serving_agent`] for a request a user makes now: [`DongleError::AgentOffline`] when no agent serves
/// the dongle.
pub async fn serving_agent_or_offline(
    pool: &PgPool,
    hub: &AgentHub,
    dongle_id: Uuid,
    user_id: Uuid,
    prefer: Option<Uuid>,
) -> Result<Uuid, DongleError> {
    serving_agent(pool, hub, dongle_id, user_id, prefer)
        .await?
        .ok_or(DongleError::AgentOffline)
}
