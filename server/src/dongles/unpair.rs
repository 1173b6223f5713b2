//! Unpair (the owner) and force-unpair (an admin): owner, token and group cleared, the agent told.

use control_proto::RequestBody;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::audit::{self, Entry, Target};
use crate::client::ClientInfo;
use crate::groups;

use super::access::*;
use super::{DongleError, Services};

/// The answer to unpair and force-unpair.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Unpaired {
    pub dongle_id: Uuid,
    pub unpaired: bool,
    /// The serving agent was connected and was told to make the dongle forget its token.
    pub forget_sent: bool,
}

/// Clears owner, token, group membership and holds. `as_admin` skips the owner check.
///
/// An unpair changes the dongle's owner, so it takes its turn with the pairing steps (the dongle's
/// pairing lease): one that lands while a PIN is being checked waits for the check, and then undoes
/// the pairing the dongle has already taken, rather than being undone by it.
pub async fn unpair(
    svc: Services<'_>,
    actor: Uuid,
    client: &ClientInfo,
    dongle_id: Uuid,
    as_admin: bool,
) -> Result<Unpaired, DongleError> {
    // A stranger's unpair, or one of a dongle that does not exist (whose lease could not even be
    // written), takes no lease: it is refused before, and checked again under it.
    let owner: Option<Option<Uuid>> =
        sqlx::query_scalar("SELECT owner_user_id FROM dongles WHERE id = $1")
            .bind(dongle_id)
            .fetch_optional(svc.pool)
            .await?;
    match owner {
        None if as_admin => return Err(DongleError::NoSuchDongle),
        Some(owner) if as_admin || owner == Some(actor) => {}
        _ => return Err(DongleError::NotFound),
    }
    let lease = super::pairing::pairing_lease(svc, dongle_id).await?;
    let unpaired = unpair_leased(svc, actor, client, dongle_id, as_admin).await;
    lease.release(svc.pool).await;
    unpaired
}

async fn unpair_leased(
    svc: Services<'_>,
    actor: Uuid,
    client: &ClientInfo,
    dongle_id: Uuid,
    as_admin: bool,
) -> Result<Unpaired, DongleError> {
    let mut tx = svc.pool.begin().await?;
    // An administrator is told plainly that nothing has this id; an owner, as for any dongle not theirs.
    let row = lock_dongle(&mut tx, dongle_id).await?.ok_or(if as_admin {
        DongleError::NoSuchDongle
    } else {
        DongleError::NotFound
    })?;
    if !as_admin {
        if row.owner_user_id != Some(actor) {
            return Err(DongleError::NotFound);
        }
        if row.ownership_state == "SECURITY_HOLD" {
            return Err(DongleError::SecurityHoldAdminOnly);
        }
    }
    let serving: Vec<Uuid> = match row.owner_user_id {
        Some(owner) => sightings(&mut tx, dongle_id, owner)
            .await?
            .into_iter()
            .filter(|s| s.present)
            .map(|s| s.agent_id)
            .collect(),
        None => Vec::new(),
    };
    // The relay stops the group's pipes and tells the agents concerned, once this is committed.
    let (group_ids, group_agents) = groups::serving::of_dongle(&mut tx, dongle_id).await?;
    let groups_removed =
        sqlx::query("DELETE FROM dongle_groups WHERE dongle_a_id = $1 OR dongle_b_id = $1")
            .bind(dongle_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    sqlx::query("DELETE FROM dongle_tokens WHERE dongle_id = $1")
        .bind(dongle_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE dongles SET owner_user_id = NULL, ownership_state = 'UNCLAIMED', hold_reason = NULL \
         WHERE id = $1",
    )
    .bind(dongle_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE pairing_sessions SET status = 'cancelled' WHERE dongle_id = $1 AND status IN ('open', 'held')",
    )
    .bind(dongle_id)
    .execute(&mut *tx)
    .await?;
    let action = if as_admin {
        "admin.dongle_force_unpaired"
    } else {
        "dongle.unpaired"
    };
    let target = Target {
        kind: "dongle",
        id: dongle_id.to_string(),
    };
    audit::record(
        &mut *tx,
        Entry::new(action, Some(actor), client)
            .target(target.clone())
            .details(serde_json::json!({
                "before": { "owner_user_id": row.owner_user_id, "ownership_state": row.ownership_state },
                "after": { "owner_user_id": null, "ownership_state": "UNCLAIMED" },
                "groups_removed": groups_removed,
            })),
    )
    .await?;
    // An administrator's force-unpair also clears the accounts held for wrong PINs on this dongle.
    let users_held: Vec<Uuid> = if as_admin {
        sqlx::query_scalar("DELETE FROM pairing_holds WHERE dongle_id = $1 RETURNING user_id")
            .bind(dongle_id)
            .fetch_all(&mut *tx)
            .await?
    } else {
        Vec::new()
    };
    if row.ownership_state == "SECURITY_HOLD" || !users_held.is_empty() {
        audit::record(
            &mut *tx,
            Entry::new("pairing.hold_exited", Some(actor), client)
                .target(target)
                .details(serde_json::json!({ "by": action, "users_held": users_held })),
        )
        .await?;
    }
    tx.commit().await?;
    if !group_ids.is_empty() {
        svc.relay.groups_removed(&group_ids, &group_agents).await;
    }
    // The previous owner's agents that see the dongle now make it forget its token. The answer is not
    // awaited: the dongle may be busy, and the server side is already clean.
    let mut forget_sent = false;
    for agent_id in serving {
        if svc.hub.is_connected(agent_id).await {
            let hub = svc.hub.clone();
            let timeout = svc.agent_request_timeout;
            let device_id = row.device_id;
            tokio::spawn(async move {
                if let Err(e) = hub
                    .request(agent_id, RequestBody::Forget { device_id }, timeout)
                    .await
                {
                    tracing::info!(%agent_id, error = %e, "the agent did not confirm a forget");
                }
            });
            forget_sent = true;
        }
    }
    Ok(Unpaired {
        dongle_id,
        unpaired: true,
        forget_sent,
    })
}
