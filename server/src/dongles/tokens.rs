//! A dongle's verdict on its token as its agent reports it, and the tokens handed to an agent that
//! connects.

use control_proto::{DeviceId, ServerMessage};
use sqlx::PgPool;
use uuid::Uuid;

use crate::agents::hub::AgentHub;
use crate::audit::{self, Entry, Target};
use crate::dongle_tokens::{self, KeyRing};

/// A claimed dongle of the agent's user rejected its token: RESET_DETECTED.
pub async fn token_rejected(
    pool: &PgPool,
    agent_id: Uuid,
    user_id: Uuid,
    device_id: DeviceId,
) -> Result<bool, sqlx::Error> {
    // Any of the user's agents may say so ($3, the agent, only goes to the audit entry).
    let sql = "UPDATE dongles SET ownership_state = 'RESET_DETECTED' WHERE device_id = $1 \
         AND owner_user_id = $2 AND ownership_state = 'CLAIMED_ACTIVE' AND $3::uuid IS NOT NULL \
         RETURNING id";
    token_verdict(
        pool,
        agent_id,
        user_id,
        device_id,
        sql,
        "dongle.reset_detected",
    )
    .await
}

/// The owner's agent authenticated to a dongle with its token: a dongle marked RESET_DETECTED (a refusal
/// that was really a link losing answers) is CLAIMED_ACTIVE again, audited. Only the owner's agents are
/// believed, and only about a dongle they see now. True when the state changed.
pub async fn token_accepted(
    pool: &PgPool,
    agent_id: Uuid,
    user_id: Uuid,
    device_id: DeviceId,
) -> Result<bool, sqlx::Error> {
    let sql = "UPDATE dongles d SET ownership_state = 'CLAIMED_ACTIVE' WHERE d.device_id = $1 \
         AND d.owner_user_id = $2 AND d.ownership_state = 'RESET_DETECTED' \
         AND EXISTS (SELECT 1 FROM dongle_sightings s WHERE s.dongle_id = d.id AND s.agent_id = $3 \
                     AND s.present) \
         RETURNING d.id";
    token_verdict(
        pool,
        agent_id,
        user_id,
        device_id,
        sql,
        "dongle.token_accepted_again",
    )
    .await
}

/// Applies an agent's word on a dongle's token (`update` binds device id, user id and agent id, and
/// returns the dongle's id when it changed the state) with its audit entry, in one transaction.
async fn token_verdict(
    pool: &PgPool,
    agent_id: Uuid,
    user_id: Uuid,
    device_id: DeviceId,
    update: &'static str,
    action: &'static str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed: Option<Uuid> = sqlx::query_scalar(update)
        .bind(device_id.to_string())
        .bind(user_id)
        .bind(agent_id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(dongle_id) = changed {
        audit::record(
            &mut *tx,
            Entry {
                actor: Some(user_id),
                action,
                target: Some(Target {
                    kind: "dongle",
                    id: dongle_id.to_string(),
                }),
                ip: None,
                user_agent: None,
                details: serde_json::json!({ "agent_id": agent_id }),
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(changed.is_some())
}

/// Sends the token of each owned dongle an agent reported to that agent (it serves them now).
pub async fn hand_out_tokens(
    pool: &PgPool,
    keys: &KeyRing,
    hub: &AgentHub,
    agent_id: Uuid,
    owned: &[crate::agents::OwnedSighting],
) {
    for sighting in owned {
        match dongle_tokens::load(pool, keys, sighting.dongle_id).await {
            Ok(Some(token)) => {
                let _ = hub
                    .send(
                        agent_id,
                        ServerMessage::DongleToken(control_proto::DongleToken {
                            device_id: sighting.device_id,
                            token,
                        }),
                    )
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(dongle_id = %sighting.dongle_id, error = %e, "a dongle token could not be read");
            }
        }
    }
}
