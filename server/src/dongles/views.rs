//! What a caller may see of dongles: their own, and unclaimed ones their online agents see now.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agents::ONLINE_SQL;

/// A dongle as its owner, or a user whose agent sees it, is shown it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct DongleView {
    pub id: Uuid,
    /// 16 lower-case hex characters.
    pub device_id: String,
    /// UNCLAIMED, CLAIMED_ACTIVE, RESET_DETECTED or SECURITY_HOLD.
    pub ownership_state: String,
    /// The caller owns it.
    pub owned: bool,
    pub fw_build: Option<String>,
    pub proto_ver: Option<i16>,
    pub capabilities: Option<i64>,
    /// `{"kind": "usb", "path", "serial_number"}`, `{"kind": "lan", "addr"}` or, for a local CAN
    /// endpoint, `{"kind": "local", "endpoint", "identity", "location", "can_set_timing"}`, as last
    /// reported.
    #[schema(value_type = Option<Object>)]
    pub transport: Option<serde_json::Value>,
    /// A local CAN endpoint of one of the owner's agents (SocketCAN, slcan or socketcand), owned
    /// without pairing; its device id derives from that agent's id.
    pub local: bool,
    pub pairing_mode: bool,
    /// An online agent of the caller sees it now.
    pub online: bool,
    /// The caller's agent of the last sighting (absent when it was another user's agent).
    pub agent_id: Option<Uuid>,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// The group it belongs to, if any.
    pub group_id: Option<Uuid>,
    /// The stored CAN configuration, if any: the v0.7 fields, the `effective_*` values the dongle
    /// acknowledged and `applied_at` (`GET /dongles/{id}/can-config` has them structured).
    #[schema(value_type = Option<Object>)]
    pub can_config: Option<serde_json::Value>,
}

/// "An online agent of user `$1` sees dongle `d` now", over the agents' sightings.
fn seen_now_sql() -> String {
    format!(
        "EXISTS (SELECT 1 FROM dongle_sightings s JOIN agents a ON a.id = s.agent_id \
           WHERE s.dongle_id = d.id AND s.present AND a.user_id = $1 AND {ONLINE_SQL})"
    )
}

/// Columns of [`DongleView`] for user `$1`, over `dongles d`.
fn view_columns() -> String {
    format!(
        "d.id, d.device_id, d.ownership_state::text AS ownership_state, \
         (d.owner_user_id IS NOT DISTINCT FROM $1) AS owned, d.fw_build, d.proto_ver, d.capabilities, \
         d.transport, (d.local_agent_id IS NOT NULL) AS local, d.pairing_mode, {} AS online, \
         (SELECT s.agent_id FROM dongle_sightings s JOIN agents a ON a.id = s.agent_id \
           WHERE s.dongle_id = d.id AND a.user_id = $1 \
           ORDER BY s.present DESC, s.last_seen_at DESC LIMIT 1) AS agent_id, \
         d.last_seen_at, \
         (SELECT m.group_id FROM dongle_group_members m WHERE m.dongle_id = d.id) AS group_id, \
         (SELECT to_jsonb(c) - 'id' - 'dongle_id' - 'created_at' FROM can_configs c WHERE c.dongle_id = d.id) \
           AS can_config",
        seen_now_sql()
    )
}

/// Visible to user `$1`: theirs, or unclaimed and seen now by one of their online agents.
fn visible_sql() -> String {
    format!(
        "(d.owner_user_id = $1 OR (d.owner_user_id IS NULL AND {}))",
        seen_now_sql()
    )
}

pub async fn list(pool: &PgPool, user_id: Uuid) -> Result<Vec<DongleView>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM dongles d WHERE {} ORDER BY d.device_id",
        view_columns(),
        visible_sql()
    )))
    .bind(user_id)
    .fetch_all(pool)
    .await
}

pub async fn find(
    pool: &PgPool,
    user_id: Uuid,
    dongle_id: Uuid,
) -> Result<Option<DongleView>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM dongles d WHERE {} AND d.id = $2",
        view_columns(),
        visible_sql()
    )))
    .bind(user_id)
    .bind(dongle_id)
    .fetch_optional(pool)
    .await
}

/// A dongle as an administrator sees it in the list of every dongle.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct AdminDongleView {
    pub id: Uuid,
    pub device_id: String,
    /// UNCLAIMED, CLAIMED_ACTIVE, RESET_DETECTED or SECURITY_HOLD.
    pub ownership_state: String,
    pub owner_user_id: Option<Uuid>,
    pub owner_email: Option<String>,
    /// The agent that sees it now (an online one first), if any.
    pub agent_id: Option<Uuid>,
    pub agent_name: Option<String>,
    pub agent_online: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// The group it is in, if any.
    pub group_id: Option<Uuid>,
    /// The accounts held from pairing this dongle (five wrong PINs), oldest first, at most
    /// [`MAX_HOLDS_SHOWN`]; releasing them releases them all.
    #[sqlx(json)]
    pub pairing_holds: Vec<PairingHoldView>,
}

/// The most held accounts listed per dongle: strangers' accounts must not make one row of the list
/// unbounded.
pub const MAX_HOLDS_SHOWN: i64 = 20;

/// An account held from pairing one dongle.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PairingHoldView {
    pub user_id: Uuid,
    pub email: String,
    /// Why: `too_many_wrong_pins`.
    pub reason: String,
    pub since: DateTime<Utc>,
}

/// The filters of the administrators' list; each absent one matches everything.
#[derive(Debug, Clone, Default)]
pub struct AdminFilter {
    /// One ownership state, as stored.
    pub state: Option<&'static str>,
    /// A part of the owner's email address.
    pub owner: Option<String>,
    /// A part of the device id.
    pub device: Option<String>,
    /// Only dongles on which an account is held.
    pub held: bool,
}

/// Every dongle matching `filter`, most recently seen first, a page of them, and how many match.
pub async fn admin_list(
    pool: &PgPool,
    filter: &AdminFilter,
    limit: i64,
    offset: i64,
) -> Result<(Vec<AdminDongleView>, i64), sqlx::Error> {
    const WHERE: &str = "WHERE ($1::text IS NULL OR d.ownership_state::text = $1) \
           AND ($2::text IS NULL OR u.email LIKE $2) \
           AND ($3::text IS NULL OR d.device_id LIKE $3) \
           AND (NOT $4 OR EXISTS (SELECT 1 FROM pairing_holds h WHERE h.dongle_id = d.id))";
    let owner = filter.owner.as_deref().map(crate::db::like_contains);
    let device = filter.device.as_deref().map(crate::db::like_contains);
    let items: Vec<AdminDongleView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT d.id, d.device_id, d.ownership_state::text AS ownership_state, d.owner_user_id, \
           u.email AS owner_email, seen.agent_id, seen.agent_name, \
           coalesce(seen.online, false) AS agent_online, d.last_seen_at, m.group_id, \
           coalesce((SELECT json_agg(json_build_object('user_id', h.user_id, 'email', h.email, \
               'reason', h.reason, 'since', h.created_at) ORDER BY h.created_at) \
             FROM (SELECT ph.user_id, hu.email, ph.reason, ph.created_at FROM pairing_holds ph \
                   JOIN users hu ON hu.id = ph.user_id WHERE ph.dongle_id = d.id \
                   ORDER BY ph.created_at LIMIT {MAX_HOLDS_SHOWN}) h), \
             '[]'::json) AS pairing_holds \
         FROM dongles d \
         LEFT JOIN users u ON u.id = d.owner_user_id \
         LEFT JOIN LATERAL ( \
           SELECT s.agent_id, a.agent_name, {ONLINE_SQL} AS online \
           FROM dongle_sightings s JOIN agents a ON a.id = s.agent_id \
           WHERE s.dongle_id = d.id AND s.present \
           ORDER BY {ONLINE_SQL} DESC, s.last_seen_at DESC LIMIT 1) seen ON true \
         LEFT JOIN dongle_group_members m ON m.dongle_id = d.id \
         {WHERE} ORDER BY d.last_seen_at DESC NULLS LAST, d.id LIMIT $5 OFFSET $6"
    )))
    .bind(filter.state)
    .bind(&owner)
    .bind(&device)
    .bind(filter.held)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM dongles d LEFT JOIN users u ON u.id = d.owner_user_id {WHERE}"
    )))
    .bind(filter.state)
    .bind(&owner)
    .bind(&device)
    .bind(filter.held)
    .fetch_one(pool)
    .await?;
    Ok((items, total))
}
