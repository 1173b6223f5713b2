//! A dongle its owner acts on (configuration, commands, frames), the agent that serves it, and how an
//! agent's failure is answered.

use control_proto::ReplyErrorCode;
use sqlx::PgPool;
use uuid::Uuid;

use crate::agents::hub::{AgentHub, RequestError};
use crate::http::{ApiError, ErrorCode};

use super::access::{not_found, sightings};

/// The capability bits (as stored, from the dongle's ANNOUNCE) include CAN FD.
pub fn announces_can_fd(capabilities: i64) -> bool {
    capabilities & i64::from(firmware_proto::caps::CAN_FD) != 0
}

/// A dongle its owner acts on: configuration, commands, frames.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwnedDongle {
    pub id: Uuid,
    pub device_id: String,
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
    device_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT d.id FROM dongles d \
         WHERE d.device_id = $1 AND d.owner_user_id = $2 \
           AND d.ownership_state = 'CLAIMED_ACTIVE' \
           AND (d.local_agent_id = $3 OR EXISTS ( \
                SELECT 1 FROM dongle_sightings s \
                WHERE s.dongle_id = d.id AND s.agent_id = $3 AND s.present))",
    )
    .bind(device_id)
    .bind(agent.user_id)
    .bind(agent.agent_id)
    .fetch_optional(pool)
    .await
}

/// [`owned`], answering DONGLE_NOT_FOUND when the caller may not act on the dongle.
pub async fn owned_or_404(
    pool: &PgPool,
    user_id: Uuid,
    dongle_id: Uuid,
) -> Result<OwnedDongle, ApiError> {
    owned(pool, user_id, dongle_id).await?.ok_or_else(not_found)
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

/// [`serving_agent`] for a request a user makes now: AGENT_OFFLINE when no agent serves the dongle.
pub async fn serving_agent_or_offline(
    pool: &PgPool,
    hub: &AgentHub,
    dongle_id: Uuid,
    user_id: Uuid,
    prefer: Option<Uuid>,
) -> Result<Uuid, ApiError> {
    serving_agent(pool, hub, dongle_id, user_id, prefer)
        .await?
        .ok_or_else(|| ApiError::of(ErrorCode::AgentOffline))
}

/// The answer to a failed request to a dongle through its agent (CAN configuration, a frame): offline
/// agents and dongles the agent no longer reaches are AGENT_OFFLINE, no answer in time is DONGLE_TIMEOUT,
/// and the dongle's refusal is `refused`, with the dongle's reason in `details.reason`.
pub fn dongle_request_error(e: RequestError, refused: ErrorCode) -> ApiError {
    match e {
        RequestError::Offline => ApiError::new(
            ErrorCode::AgentOffline,
            "The agent serving this dongle is not connected: check that it runs and sees the dongle.",
        ),
        RequestError::Timeout => ApiError::new(
            ErrorCode::DongleTimeout,
            "The dongle did not answer in time through its agent; nothing was changed.",
        ),
        RequestError::Failed(e) => match e.code {
            ReplyErrorCode::UnknownDevice => ApiError::new(
                ErrorCode::AgentOffline,
                "The agent no longer reaches this dongle.",
            ),
            ReplyErrorCode::DongleTimeout => ApiError::new(
                ErrorCode::DongleTimeout,
                "The dongle did not answer its agent in time; nothing was changed.",
            ),
            ReplyErrorCode::Refused => {
                ApiError::of(refused).with_detail("reason", reply_reason(&e.message))
            }
            ReplyErrorCode::NotSettable => ApiError::new(
                refused,
                "This dongle is a local CAN endpoint that cannot apply this setting; nothing was \
                 changed. The reason says where it is set instead.",
            )
            .with_detail("reason", reply_reason(&e.message)),
            ReplyErrorCode::Unsupported => ApiError::new(
                ErrorCode::Conflict,
                "The agent serving this dongle does not support this request: update the agent.",
            ),
            _ => ApiError::new(
                ErrorCode::Conflict,
                "The agent could not carry out the request.",
            )
            .with_detail("reason", reply_reason(&e.message)),
        },
        RequestError::TooLarge { .. } => ApiError::new(
            ErrorCode::PayloadTooLarge,
            "The request is too large to relay to the agent's server instance.",
        ),
    }
}

/// A reason an agent or dongle gave, made safe to echo: printable characters only, at most 400.
pub fn reply_reason(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(400)
        .collect()
}
