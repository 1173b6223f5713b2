//! The API's operations on groups: each checked against the caller's ownership, audited, and followed by
//! the relay's reaction (new `groups` lists for the agents concerned, pipes started or stopped).

use chrono::{DateTime, Utc};
use control_proto::data::PerSide as BySide;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use super::model::Mode;
use super::relay::Relay;
use super::serving::serving_agents;
use crate::agents::ONLINE_SQL;
use crate::audit::{self, Entry, Target};
use crate::auth::Caller;
use crate::client::ClientInfo;

/// Why an operation on a group was refused. `routes::groups` says how each is answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// Both sides name the same dongle.
    #[error("A group joins two different dongles: dongle_a_id and dongle_b_id are the same.")]
    SameDongle,
    /// The dongle is not the caller's, or not CLAIMED_ACTIVE, or does not exist.
    #[error("dongle {0} not found")]
    DongleNotFound(Uuid),
    /// The dongle is in another group already.
    #[error(
        "This dongle is already in a group: a dongle belongs to at most one group. Delete that group first."
    )]
    AlreadyGrouped(Uuid),
    /// A racing request grouped one of the dongles first.
    #[error("One of these dongles is already in a group: a dongle belongs to at most one group.")]
    GroupedMeanwhile,
    /// A side's dongle lost its token (reset detected, or on hold): no relay without one.
    #[error(
        "A dongle of this group is not in CLAIMED_ACTIVE (reset detected or on hold): pair it again first."
    )]
    DongleNotActive(Uuid),
    /// No such group of the caller's.
    #[error("Group not found.")]
    NotFound,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// One dongle of a group as `GET /groups/{id}` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GroupDongle {
    pub id: Uuid,
    /// 16 lower-case hex characters.
    pub device_id: String,
    /// An online agent of the owner sees the dongle now.
    pub online: bool,
    /// The agent serving this side has its data connection (`/ws/data`) open, on the server instance
    /// that answered or on another one (while the answering instance relays the group).
    pub data_connected: bool,
}

/// A count per direction.
#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema)]
pub struct PerDirection {
    pub a_to_b: i64,
    pub b_to_a: i64,
}

/// A count per side.
#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema)]
pub struct PerSide {
    pub a: i64,
    pub b: i64,
}

/// A group as its owner sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GroupView {
    pub id: Uuid,
    /// INACTIVE, ACTIVE, DEGRADED or CROSS_INSTANCE.
    pub state: Mode,
    /// The relay trimmed buffered frames (retention reached) since the group was last ACTIVE: frames
    /// were lost. Cleared when the group is ACTIVE again (both sides connected, backlog delivered).
    pub buffer_pressure: bool,
    pub dongle_a: GroupDongle,
    pub dongle_b: GroupDongle,
    /// Frames waiting in the durable buffer, per direction.
    pub backlog: PerDirection,
    /// Frames delivered: acknowledged by the receiving side's agent.
    pub frames_relayed: PerDirection,
    /// Frames removed from the buffer by retention (10 minutes or 200 000 frames per direction).
    pub frames_trimmed: PerDirection,
    /// Frames accepted from each side's agent.
    pub frames_received: PerSide,
    /// Frames lost at each side, as its agent reports them: those the agent had to drop (a full queue,
    /// a dongle gone), and those the side's dongle itself reports lost in its BUS_STATUS counters (a full
    /// queue of its own, either way), where it announces that extension.
    pub agent_drops: PerSide,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The flat row behind a [`GroupView`].
#[derive(Debug, sqlx::FromRow)]
struct GroupRow {
    id: Uuid,
    mode: String,
    buffer_pressure: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    a_id: Uuid,
    a_device_id: String,
    a_online: bool,
    b_id: Uuid,
    b_device_id: String,
    b_online: bool,
    backlog_a_to_b: i64,
    backlog_b_to_a: i64,
    relayed_a_to_b: i64,
    relayed_b_to_a: i64,
    trimmed_a_to_b: i64,
    trimmed_b_to_a: i64,
    received_a: i64,
    received_b: i64,
    drops_a: i64,
    drops_b: i64,
}

/// "An online agent of the group's user sees dongle `d` now."
fn online_sql(d: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM dongle_sightings s JOIN agents a ON a.id = s.agent_id \
           WHERE s.dongle_id = {d}.id AND s.present AND a.user_id = g.user_id AND {ONLINE_SQL})"
    )
}

/// The SELECT of [`GroupRow`]s of user `$1`; the caller adds conditions and the order.
fn view_sql() -> String {
    format!(
        "SELECT g.id, g.mode::text AS mode, g.buffer_pressure, g.created_at, g.updated_at, \
           da.id AS a_id, da.device_id AS a_device_id, {} AS a_online, \
           db.id AS b_id, db.device_id AS b_device_id, {} AS b_online, \
           coalesce(sb.buffered_frames, 0) AS backlog_a_to_b, \
           coalesce(sa.buffered_frames, 0) AS backlog_b_to_a, \
           coalesce(sb.frames_delivered, 0) AS relayed_a_to_b, \
           coalesce(sa.frames_delivered, 0) AS relayed_b_to_a, \
           coalesce(sb.frames_trimmed, 0) AS trimmed_a_to_b, \
           coalesce(sa.frames_trimmed, 0) AS trimmed_b_to_a, \
           coalesce(sa.frames_received, 0) AS received_a, \
           coalesce(sb.frames_received, 0) AS received_b, \
           coalesce(sa.agent_drops, 0) AS drops_a, \
           coalesce(sb.agent_drops, 0) AS drops_b \
         FROM dongle_groups g \
         JOIN dongles da ON da.id = g.dongle_a_id \
         JOIN dongles db ON db.id = g.dongle_b_id \
         LEFT JOIN relay_sides sa ON sa.group_id = g.id AND sa.side = 'a' \
         LEFT JOIN relay_sides sb ON sb.group_id = g.id AND sb.side = 'b' \
         WHERE g.user_id = $1",
        online_sql("da"),
        online_sql("db"),
    )
}

impl GroupRow {
    fn into_view(self, data_connected: BySide<bool>) -> GroupView {
        GroupView {
            id: self.id,
            state: Mode::parse(&self.mode).unwrap_or(Mode::Inactive),
            buffer_pressure: self.buffer_pressure,
            dongle_a: GroupDongle {
                id: self.a_id,
                device_id: self.a_device_id,
                online: self.a_online,
                data_connected: data_connected.a,
            },
            dongle_b: GroupDongle {
                id: self.b_id,
                device_id: self.b_device_id,
                online: self.b_online,
                data_connected: data_connected.b,
            },
            backlog: PerDirection {
                a_to_b: self.backlog_a_to_b,
                b_to_a: self.backlog_b_to_a,
            },
            frames_relayed: PerDirection {
                a_to_b: self.relayed_a_to_b,
                b_to_a: self.relayed_b_to_a,
            },
            frames_trimmed: PerDirection {
                a_to_b: self.trimmed_a_to_b,
                b_to_a: self.trimmed_b_to_a,
            },
            frames_received: PerSide {
                a: self.received_a,
                b: self.received_b,
            },
            agent_drops: PerSide {
                a: self.drops_a,
                b: self.drops_b,
            },
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// The caller's groups, oldest first.
pub async fn list(
    pool: &PgPool,
    relay: &Relay,
    user_id: Uuid,
) -> Result<Vec<GroupView>, sqlx::Error> {
    let rows: Vec<GroupRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{} ORDER BY g.created_at, g.id",
        view_sql()
    )))
    .bind(user_id)
    .fetch_all(pool)
    .await?;
    let mut views = Vec::with_capacity(rows.len());
    for row in rows {
        let connected = relay.data_connected(row.id).await;
        views.push(row.into_view(connected));
    }
    Ok(views)
}

/// One of the caller's groups; None for an unknown id or someone else's group.
pub async fn find(
    pool: &PgPool,
    relay: &Relay,
    user_id: Uuid,
    group_id: Uuid,
) -> Result<Option<GroupView>, sqlx::Error> {
    let row: Option<GroupRow> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{} AND g.id = $2", view_sql())))
            .bind(user_id)
            .bind(group_id)
            .fetch_optional(pool)
            .await?;
    Ok(match row {
        Some(row) => {
            let connected = relay.data_connected(row.id).await;
            Some(row.into_view(connected))
        }
        None => None,
    })
}

async fn find_or_404(
    pool: &PgPool,
    relay: &Relay,
    user_id: Uuid,
    group_id: Uuid,
) -> Result<GroupView, GroupError> {
    find(pool, relay, user_id, group_id)
        .await?
        .ok_or(GroupError::NotFound)
}

fn audit_entry<'a>(
    action: &'a str,
    caller: &Caller,
    client: &'a ClientInfo,
    group_id: Uuid,
    details: serde_json::Value,
) -> Entry<'a> {
    Entry::new(action, Some(caller.user_id()), client)
        .target(Target {
            kind: "group",
            id: group_id.to_string(),
        })
        .details(details)
}

/// Of `dongle_ids`, those the caller may put in a group: theirs and CLAIMED_ACTIVE. Locked until the
/// transaction ends, so that an unpair cannot slip in between the check and the insert, and locked in
/// the order of their device ids, the order an agent's report locks them in: two transactions that
/// lock the same dongles in opposite orders would deadlock.
async fn lock_owned_dongles(
    conn: &mut PgConnection,
    user_id: Uuid,
    dongle_ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM dongles WHERE id = ANY($1) AND owner_user_id = $2 \
         AND ownership_state = 'CLAIMED_ACTIVE' ORDER BY device_id FOR UPDATE",
    )
    .bind(dongle_ids)
    .bind(user_id)
    .fetch_all(conn)
    .await
}

/// The PostgreSQL code of a unique violation.
const UNIQUE_VIOLATION: &str = "23505";

/// `POST /groups`: a new, INACTIVE group of two of the caller's dongles.
pub async fn create(
    pool: &PgPool,
    relay: &Relay,
    caller: &Caller,
    client: &ClientInfo,
    dongle_a: Uuid,
    dongle_b: Uuid,
) -> Result<GroupView, GroupError> {
    if dongle_a == dongle_b {
        return Err(GroupError::SameDongle);
    }
    let user_id = caller.user_id();
    let mut tx = pool.begin().await?;
    let locked = lock_owned_dongles(&mut tx, user_id, &[dongle_a, dongle_b]).await?;
    let (first, second) = if dongle_a < dongle_b {
        (dongle_a, dongle_b)
    } else {
        (dongle_b, dongle_a)
    };
    if let Some(missing) = [first, second].into_iter().find(|id| !locked.contains(id)) {
        return Err(GroupError::DongleNotFound(missing));
    }
    let grouped: Vec<Uuid> = sqlx::query_scalar(
        "SELECT dongle_id FROM dongle_group_members WHERE dongle_id = ANY($1) ORDER BY dongle_id",
    )
    .bind([dongle_a, dongle_b].as_slice())
    .fetch_all(&mut *tx)
    .await?;
    if let Some(id) = grouped.first() {
        return Err(GroupError::AlreadyGrouped(*id));
    }
    let inserted: Result<(Uuid,), sqlx::Error> = sqlx::query_as(
        "INSERT INTO dongle_groups (user_id, dongle_a_id, dongle_b_id) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(user_id)
    .bind(dongle_a)
    .bind(dongle_b)
    .fetch_one(&mut *tx)
    .await;
    let group_id = match inserted {
        Ok((id,)) => id,
        // Another request grouped one of them since the check above: the membership table said no.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            return Err(GroupError::GroupedMeanwhile);
        }
        Err(e) => return Err(e.into()),
    };
    sqlx::query("INSERT INTO relay_sides (group_id, side) VALUES ($1, 'a'), ($1, 'b')")
        .bind(group_id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut *tx,
        audit_entry(
            "group.create",
            caller,
            client,
            group_id,
            serde_json::json!({ "dongle_a_id": dongle_a, "dongle_b_id": dongle_b }),
        ),
    )
    .await?;
    tx.commit().await?;
    find_or_404(pool, relay, user_id, group_id).await
}

/// A group row locked for a state change.
#[derive(Debug, sqlx::FromRow)]
struct LockedGroup {
    mode: String,
    dongle_a_id: Uuid,
    dongle_b_id: Uuid,
}

async fn lock_group(
    conn: &mut PgConnection,
    user_id: Uuid,
    group_id: Uuid,
) -> Result<LockedGroup, GroupError> {
    sqlx::query_as(
        "SELECT mode::text AS mode, dongle_a_id, dongle_b_id FROM dongle_groups \
         WHERE id = $1 AND user_id = $2 FOR UPDATE",
    )
    .bind(group_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?
    .ok_or(GroupError::NotFound)
}

/// `POST /groups/{id}/activate`: the relay starts (or keeps) running for the group. It enters DEGRADED
/// until both sides' agents are connected to the data plane, then ACTIVE. Idempotent.
pub async fn activate(
    pool: &PgPool,
    relay: &Relay,
    caller: &Caller,
    client: &ClientInfo,
    group_id: Uuid,
) -> Result<GroupView, GroupError> {
    let user_id = caller.user_id();
    let mut tx = pool.begin().await?;
    let group = lock_group(&mut tx, user_id, group_id).await?;
    let dongles = [group.dongle_a_id, group.dongle_b_id];
    let locked = lock_owned_dongles(&mut tx, user_id, &dongles).await?;
    if let Some(missing) = dongles.into_iter().find(|id| !locked.contains(id)) {
        // Still the caller's (unpairing deletes the group), but reset or on hold: no token, no relay.
        return Err(GroupError::DongleNotActive(missing));
    }
    let agents = serving_agents(&mut tx, &[group.dongle_a_id, group.dongle_b_id]).await?;
    let before = group.mode;
    if before == Mode::Inactive.as_str() {
        sqlx::query("UPDATE dongle_groups SET mode = 'DEGRADED' WHERE id = $1")
            .bind(group_id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut *tx,
            audit_entry(
                "group.activate",
                caller,
                client,
                group_id,
                serde_json::json!({ "before": { "state": before }, "after": { "state": "DEGRADED" } }),
            ),
        )
        .await?;
    }
    tx.commit().await?;
    relay.group_activated(group_id, user_id, &agents).await;
    find_or_404(pool, relay, user_id, group_id).await
}

/// `POST /groups/{id}/deactivate`: the relay stops for the group; its agents stop streaming. Buffered
/// frames stay (within retention) for a later activation. Idempotent.
pub async fn deactivate(
    pool: &PgPool,
    relay: &Relay,
    caller: &Caller,
    client: &ClientInfo,
    group_id: Uuid,
) -> Result<GroupView, GroupError> {
    let user_id = caller.user_id();
    let mut tx = pool.begin().await?;
    let group = lock_group(&mut tx, user_id, group_id).await?;
    let agents = serving_agents(&mut tx, &[group.dongle_a_id, group.dongle_b_id]).await?;
    if group.mode != Mode::Inactive.as_str() {
        sqlx::query("UPDATE dongle_groups SET mode = 'INACTIVE' WHERE id = $1")
            .bind(group_id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut *tx,
            audit_entry(
                "group.deactivate",
                caller,
                client,
                group_id,
                serde_json::json!({ "before": { "state": group.mode }, "after": { "state": "INACTIVE" } }),
            ),
        )
        .await?;
    }
    tx.commit().await?;
    // The pipe writes what it holds to the buffer before it ends, so nothing acknowledged is lost.
    relay.stop_group(group_id, false).await;
    relay.groups_changed(&agents).await;
    find_or_404(pool, relay, user_id, group_id).await
}

/// `DELETE /groups/{id}`: the group, its counters and its buffer go.
pub async fn delete(
    pool: &PgPool,
    relay: &Relay,
    caller: &Caller,
    client: &ClientInfo,
    group_id: Uuid,
) -> Result<(), GroupError> {
    let user_id = caller.user_id();
    let mut tx = pool.begin().await?;
    let group = lock_group(&mut tx, user_id, group_id).await?;
    let agents = serving_agents(&mut tx, &[group.dongle_a_id, group.dongle_b_id]).await?;
    let dropped: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(buffered_frames), 0)::bigint FROM relay_sides WHERE group_id = $1",
    )
    .bind(group_id)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM dongle_groups WHERE id = $1")
        .bind(group_id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut *tx,
        audit_entry(
            "group.delete",
            caller,
            client,
            group_id,
            serde_json::json!({
                "dongle_a_id": group.dongle_a_id,
                "dongle_b_id": group.dongle_b_id,
                "state": group.mode,
                "buffered_frames_dropped": dropped,
            }),
        ),
    )
    .await?;
    tx.commit().await?;
    relay.stop_group(group_id, true).await;
    relay.groups_changed(&agents).await;
    Ok(())
}
