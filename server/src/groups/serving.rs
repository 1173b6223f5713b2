//! The queries the relay needs: which of a user's agents serves each side of a group, which sides an
//! agent serves, and the groups a dongle is in.

use control_proto::DeviceId;
use control_proto::data::{PerSide, Side};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::model::Mode;
use crate::agents::ONLINE_SQL;

/// The agents that see any of `dongle_ids` now (present in their last report): those whose `groups`
/// list may change with these dongles' groups.
pub async fn serving_agents(
    conn: &mut PgConnection,
    dongle_ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT agent_id FROM dongle_sightings WHERE dongle_id = ANY($1) AND present",
    )
    .bind(dongle_ids)
    .fetch_all(conn)
    .await
}

/// The groups a dongle is in (at most one) and the agents concerned, read before an unpair deletes
/// them, so that the relay can stop their pipes and tell the agents afterwards.
pub async fn of_dongle(
    conn: &mut PgConnection,
    dongle_id: Uuid,
) -> Result<(Vec<Uuid>, Vec<Uuid>), sqlx::Error> {
    let groups: Vec<(Uuid, Uuid, Uuid)> = sqlx::query_as(
        "SELECT id, dongle_a_id, dongle_b_id FROM dongle_groups WHERE dongle_a_id = $1 OR dongle_b_id = $1",
    )
    .bind(dongle_id)
    .fetch_all(&mut *conn)
    .await?;
    let dongles: Vec<Uuid> = groups.iter().flat_map(|(_, a, b)| [*a, *b]).collect();
    let agents = if dongles.is_empty() {
        Vec::new()
    } else {
        serving_agents(conn, &dongles).await?
    };
    Ok((groups.into_iter().map(|(id, ..)| id).collect(), agents))
}

/// The agent that serves a dongle for the relay, among those of `user` that see it now and are online:
/// the one that has seen it the longest, so that the choice does not flip with every report when
/// several workstations see a LAN dongle. SQL over a dongle `d` and a user expression.
fn serving_agent_sql(user: &str) -> String {
    format!(
        "(SELECT s.agent_id FROM dongle_sightings s JOIN agents a ON a.id = s.agent_id \
           WHERE s.dongle_id = d.id AND s.present AND a.user_id = {user} AND {ONLINE_SQL} \
           ORDER BY s.created_at, s.agent_id LIMIT 1)"
    )
}

/// One group side an agent serves, with the stream position the database has for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedSide {
    pub group_id: Uuid,
    pub side: Side,
    pub device_id: DeviceId,
    pub next_in: u64,
}

/// The sides of relaying groups (ACTIVE, DEGRADED or CROSS_INSTANCE) whose dongle `agent_id` serves
/// (see [`serving_agent_sql`]).
pub async fn sides_served_by(
    db: impl PgExecutor<'_>,
    agent_id: Uuid,
    user_id: Uuid,
) -> Result<Vec<ServedSide>, sqlx::Error> {
    let rows: Vec<(Uuid, String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT g.id, m.side::text, d.device_id, coalesce(r.next_in, 0) \
         FROM dongle_groups g \
         JOIN dongle_group_members m ON m.group_id = g.id \
         JOIN dongles d ON d.id = m.dongle_id \
         LEFT JOIN relay_sides r ON r.group_id = g.id AND r.side = m.side \
         WHERE g.user_id = $2 AND g.mode IN ('ACTIVE', 'DEGRADED', 'CROSS_INSTANCE') \
           AND d.owner_user_id = $2 AND d.ownership_state = 'CLAIMED_ACTIVE' \
           AND {} = $1 \
         ORDER BY g.id, m.side",
        serving_agent_sql("$2")
    )))
    .bind(agent_id)
    .bind(user_id)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(group_id, side, device_id, next_in)| {
            Ok(ServedSide {
                group_id,
                // `dongle_group_members.side` is `a` or `b` by its CHECK constraint.
                side: Side::from_letter(&side)
                    .ok_or_else(|| sqlx::Error::Decode(format!("a group side {side:?}").into()))?,
                device_id: crate::db::stored_device_id(device_id)?,
                next_in: next_in.max(0) as u64,
            })
        })
        .collect()
}

/// What a pipe needs to know about its group, read when it starts and at each refresh.
#[derive(Debug, Clone)]
pub struct GroupSides {
    pub user_id: Uuid,
    pub mode: Mode,
    /// Index 0 is side A.
    pub sides: [SideInfo; 2],
}

/// One side of a group.
#[derive(Debug, Clone, Default)]
pub struct SideInfo {
    pub dongle_id: Uuid,
    /// The agents of the user that see the dongle now and are online, the serving one first. Empty
    /// when none does, or when the dongle is not CLAIMED_ACTIVE (no relay without a token).
    pub agents: Vec<Uuid>,
    /// The bit rate of the dongle's CAN configuration, when it has one: what its bus can carry.
    pub bitrate: Option<u32>,
}

/// The group's user, state, dongles and the agents that see each; None when the group is gone.
pub async fn sides_of(pool: &PgPool, group_id: Uuid) -> Result<Option<GroupSides>, sqlx::Error> {
    type Head = (Uuid, String, Uuid, Uuid, Option<i64>, Option<i64>);
    // The bit rate the dongle reported applying, else the one asked for (raw timing may differ).
    let head: Option<Head> = sqlx::query_as(
        "SELECT g.user_id, g.mode::text, g.dongle_a_id, g.dongle_b_id, \
                coalesce(ca.effective_bitrate, ca.bitrate), coalesce(cb.effective_bitrate, cb.bitrate) \
         FROM dongle_groups g \
         LEFT JOIN can_configs ca ON ca.dongle_id = g.dongle_a_id \
         LEFT JOIN can_configs cb ON cb.dongle_id = g.dongle_b_id \
         WHERE g.id = $1",
    )
    .bind(group_id)
    .fetch_optional(pool)
    .await?;
    let Some((user_id, mode, a, b, bitrate_a, bitrate_b)) = head else {
        return Ok(None);
    };
    // Within classic CAN's range, as the requested column's CHECK is: the reported one is not checked.
    let bitrate = |b: Option<i64>| b.and_then(|b| u32::try_from(b.clamp(10_000, 1_000_000)).ok());
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT d.id, s.agent_id FROM dongles d \
         JOIN dongle_sightings s ON s.dongle_id = d.id AND s.present \
         JOIN agents a ON a.id = s.agent_id AND a.user_id = $2 AND {ONLINE_SQL} \
         WHERE d.id = ANY($1) AND d.owner_user_id = $2 AND d.ownership_state = 'CLAIMED_ACTIVE' \
         ORDER BY s.created_at, s.agent_id"
    )))
    .bind([a, b].as_slice())
    .bind(user_id)
    .fetch_all(pool)
    .await?;
    let agents_of = |dongle: Uuid| -> Vec<Uuid> {
        rows.iter()
            .filter(|(d, _)| *d == dongle)
            .map(|(_, agent)| *agent)
            .collect()
    };
    Ok(Some(GroupSides {
        user_id,
        mode: Mode::parse(&mode).unwrap_or(Mode::Inactive),
        sides: [
            SideInfo {
                dongle_id: a,
                agents: agents_of(a),
                bitrate: bitrate(bitrate_a),
            },
            SideInfo {
                dongle_id: b,
                agents: agents_of(b),
                bitrate: bitrate(bitrate_b),
            },
        ],
    }))
}

/// Records that this instance holds (`here`) or no longer holds the data connection serving `side`
/// of the group. Clearing leaves a row naming another instance alone. True when the row changed.
pub async fn mark_served(
    pool: &PgPool,
    group_id: Uuid,
    side: Side,
    instance_id: Uuid,
    here: bool,
) -> Result<bool, sqlx::Error> {
    let sql = if here {
        "UPDATE relay_sides SET served_by = $3 WHERE group_id = $1 AND side = $2 \
         AND served_by IS DISTINCT FROM $3"
    } else {
        "UPDATE relay_sides SET served_by = NULL WHERE group_id = $1 AND side = $2 AND served_by = $3"
    };
    let changed = sqlx::query(sql)
        .bind(group_id)
        .bind(side.letter())
        .bind(instance_id)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(changed > 0)
}

/// Per side of the group: its data connection is held by a live instance other than `instance_id`
/// (one whose last beat is younger than `stale_after`).
pub async fn served_elsewhere(
    pool: &PgPool,
    group_id: Uuid,
    instance_id: Uuid,
    stale_after: std::time::Duration,
) -> Result<PerSide<bool>, sqlx::Error> {
    let sides: Vec<String> = sqlx::query_scalar(
        "SELECT r.side::text FROM relay_sides r \
         JOIN server_instances i ON i.instance_id = r.served_by \
         WHERE r.group_id = $1 AND r.served_by <> $2 \
           AND i.last_beat > now() - make_interval(secs => $3)",
    )
    .bind(group_id)
    .bind(instance_id)
    .bind(stale_after.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(PerSide::from_fn(|side| {
        sides.iter().any(|s| s == side.letter())
    }))
}

/// The relaying groups of a user (the pipes an agent's change may concern).
pub async fn relaying_groups_of(pool: &PgPool, user_id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM dongle_groups WHERE user_id = $1 AND mode IN ('ACTIVE', 'DEGRADED', 'CROSS_INSTANCE')",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await
}
