//! What pairing and unpair share: a dongle's row locked, who sees it now, the caller's standing with
//! it, the audit entry of a step, and how an agent's failure is answered.

use control_proto::ReplyErrorCode;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::agents::ONLINE_SQL;
use crate::agents::hub::{AgentHub, RequestError};
use crate::audit::{Entry, Target};
use crate::auth::Caller;
use crate::http::{ApiError, ClientInfo, ErrorCode};

/// A dongle row with what pairing needs to decide.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct DongleRow {
    pub(super) device_id: String,
    pub(super) owner_user_id: Option<Uuid>,
    pub(super) ownership_state: String,
}

/// One agent of the caller's user that has seen the dongle.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Sighting {
    pub(super) agent_id: Uuid,
    pub(super) present: bool,
    pub(super) online: bool,
}

/// Locks and reads a dongle (FOR UPDATE of its row).
pub(super) async fn lock_dongle(
    conn: &mut PgConnection,
    dongle_id: Uuid,
) -> Result<Option<DongleRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT device_id, owner_user_id, ownership_state::text AS ownership_state \
         FROM dongles WHERE id = $1 FOR UPDATE",
    )
    .bind(dongle_id)
    .fetch_optional(conn)
    .await
}

/// The sightings of a dongle by agents of `user_id`, latest first.
pub(super) async fn sightings(
    conn: &mut PgConnection,
    dongle_id: Uuid,
    user_id: Uuid,
) -> Result<Vec<Sighting>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT s.agent_id, s.present, {ONLINE_SQL} AS online FROM dongle_sightings s \
         JOIN agents a ON a.id = s.agent_id WHERE s.dongle_id = $1 AND a.user_id = $2 \
         ORDER BY s.last_seen_at DESC"
    )))
    .bind(dongle_id)
    .bind(user_id)
    .fetch_all(conn)
    .await
}

/// What the state of a dongle means for a pairing request of `caller`.
pub(super) enum Standing {
    /// Already CLAIMED_ACTIVE by the caller's user.
    AlreadyOwned,
    /// Pairing may go on through this (online, connected) agent.
    Pairable { agent_id: Uuid },
}

pub(super) fn not_found() -> ApiError {
    ApiError::of(ErrorCode::DongleNotFound)
}

/// The checks shared by pairing start and submit, in the order that reveals the least. `sightings` are
/// those of the caller's user's agents.
pub(super) async fn standing(
    row: &DongleRow,
    sightings: &[Sighting],
    caller: &Caller,
    hub: &AgentHub,
) -> Result<Standing, ApiError> {
    let user_id = caller.user_id();
    // "Seen by the caller": by this agent when an agent calls, by any of the user's agents otherwise.
    let relevant: Vec<&Sighting> = sightings
        .iter()
        .filter(|s| caller.agent_id().is_none_or(|a| s.agent_id == a))
        .collect();
    let seen_now = relevant.iter().any(|s| s.present);
    match row.owner_user_id {
        Some(owner) if owner == user_id => {
            if row.ownership_state == "CLAIMED_ACTIVE" {
                return Ok(Standing::AlreadyOwned);
            }
            if caller.agent_id().is_some() && !seen_now {
                return Err(not_found());
            }
        }
        Some(_) => {
            // The one exception to "someone else's is a 404": the caller's own agent sees it.
            return Err(if seen_now {
                ApiError::of(ErrorCode::DongleOwnedByOther)
            } else {
                not_found()
            });
        }
        None => {
            if relevant.is_empty() || (caller.agent_id().is_some() && !seen_now) {
                return Err(not_found());
            }
        }
    }
    if row.ownership_state == "SECURITY_HOLD" {
        return Err(ApiError::of(ErrorCode::PairingSecurityHold));
    }
    for s in relevant {
        if s.present && s.online && hub.is_connected(s.agent_id).await {
            return Ok(Standing::Pairable {
                agent_id: s.agent_id,
            });
        }
    }
    Err(ApiError::of(ErrorCode::AgentOffline))
}

/// The audit entry of a pairing or unpair step.
pub(super) fn audit_entry<'a>(
    action: &'a str,
    caller: &Caller,
    client: &'a ClientInfo,
    dongle_id: Uuid,
    details: serde_json::Value,
) -> Entry<'a> {
    Entry::new(action, Some(caller.user_id()), client)
        .target(Target {
            kind: "dongle",
            id: dongle_id.to_string(),
        })
        .details(details)
}

pub(super) fn agent_error(e: RequestError) -> ApiError {
    match e {
        RequestError::Offline | RequestError::Timeout => ApiError::new(
            ErrorCode::AgentOffline,
            "The agent serving this dongle did not answer: check that it runs and sees the dongle.",
        ),
        RequestError::TooLarge { .. } => ApiError::new(
            ErrorCode::PayloadTooLarge,
            "The request is too large to hand to the server instance the agent is connected to.",
        ),
        RequestError::Failed(e) => match e.code {
            ReplyErrorCode::UnknownDevice | ReplyErrorCode::DongleTimeout => ApiError::new(
                ErrorCode::AgentOffline,
                "The agent no longer reaches this dongle.",
            ),
            ReplyErrorCode::Cooldown => ApiError::new(
                ErrorCode::Conflict,
                "The dongle is cooling down after wrong PINs: wait a few minutes and start again.",
            ),
            ReplyErrorCode::NotInPairingMode => ApiError::of(ErrorCode::PairingExpired),
            _ => ApiError::new(ErrorCode::Conflict, "The dongle refused the request."),
        },
    }
}
