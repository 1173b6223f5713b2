//! What pairing and unpair share: a dongle's row locked, who sees it now, the caller's standing with
//! it, and the audit entry of a step.

use control_proto::DeviceId;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::agents::ONLINE_SQL;
use crate::agents::hub::AgentHub;
use crate::audit::{Entry, Target};
use crate::auth::Caller;
use crate::client::ClientInfo;

use super::DongleError;

/// A dongle row with what pairing needs to decide.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct DongleRow {
    #[sqlx(try_from = "String")]
    pub(super) device_id: DeviceId,
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

/// The checks shared by pairing start and submit, in the order that reveals the least. `sightings` are
/// those of the caller's user's agents.
pub(super) async fn standing(
    row: &DongleRow,
    sightings: &[Sighting],
    caller: &Caller,
    hub: &AgentHub,
) -> Result<Standing, DongleError> {
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
                return Err(DongleError::NotFound);
            }
        }
        Some(_) => {
            // The one exception to "someone else's is a 404": the caller's own agent sees it.
            return Err(if seen_now {
                DongleError::OwnedByOther
            } else {
                DongleError::NotFound
            });
        }
        None => {
            if relevant.is_empty() || (caller.agent_id().is_some() && !seen_now) {
                return Err(DongleError::NotFound);
            }
        }
    }
    if row.ownership_state == "SECURITY_HOLD" {
        return Err(DongleError::SecurityHold);
    }
    for s in relevant {
        if s.present && s.online && hub.is_connected(s.agent_id).await {
            return Ok(Standing::Pairable {
                agent_id: s.agent_id,
            });
        }
    }
    Err(DongleError::AgentOffline)
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
