//! Dongles and pairing (SPEC 3.4): what a caller may see, the pairing state machine with its limits and
//! holds, unpair and force-unpair.
//!
//! Ownership changes only here, and only through pairing (on the dongle's ok), unpair and admin
//! force-unpair; device reports never touch it. Each pairing step runs in one transaction holding the
//! dongle's row lock, so two racing submits are serialised: the first correct one makes the owner, and
//! the second then finds the dongle owned.

use chrono::{DateTime, Utc};
use control_proto::{ReplyErrorCode, ReplyOk, RequestBody, ServerMessage};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agents::ONLINE_SQL;
use crate::agents::hub::{AgentHub, RequestError};
use crate::audit::{self, Entry, Target};
use crate::auth::Caller;
use crate::dongle_lease::{self, Lease};
use crate::dongle_tokens::{self, DongleToken, KeyRing};
use crate::groups;
use crate::http::{ApiError, ClientInfo, ErrorCode};
use crate::state::AppState;

/// Wrong PINs allowed in one pairing window; the last one puts the dongle on hold.
pub const MAX_WRONG_PINS: i32 = 5;
/// Pairing starts allowed per dongle per hour; one more puts the dongle on hold.
pub const MAX_STARTS_PER_HOUR: i64 = 10;

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

/// A dongle row with what pairing needs to decide.
#[derive(Debug, sqlx::FromRow)]
struct DongleRow {
    device_id: String,
    owner_user_id: Option<Uuid>,
    ownership_state: String,
}

/// One agent of the caller's user that has seen the dongle.
#[derive(Debug, sqlx::FromRow)]
struct Sighting {
    agent_id: Uuid,
    present: bool,
    online: bool,
}

/// Locks and reads a dongle (FOR UPDATE of its row).
async fn lock_dongle(
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
async fn sightings(
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
enum Standing {
    /// Already CLAIMED_ACTIVE by the caller's user.
    AlreadyOwned,
    /// Pairing may go on through this (online, connected) agent.
    Pairable { agent_id: Uuid },
}

fn not_found() -> ApiError {
    ApiError::of(ErrorCode::DongleNotFound)
}

/// The checks shared by pairing start and submit, in the order that reveals the least. `sightings` are
/// those of the caller's user's agents.
async fn standing(
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

/// The answer to a pairing start.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PairingStarted {
    pub dongle_id: Uuid,
    /// Absent when the dongle already belongs to the caller (nothing to do).
    pub pairing_session_id: Option<Uuid>,
    pub expires_at: Option<DateTime<Utc>>,
    /// True when the dongle already belongs to the caller.
    pub paired: bool,
}

/// The answer to a successful (or idempotent) pairing submit.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Paired {
    pub dongle_id: Uuid,
    pub paired: bool,
    pub owner_user_id: Uuid,
}

fn audit_entry<'a>(
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

fn agent_error(e: RequestError) -> ApiError {
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

/// Takes the dongle's pairing lease, waiting while another pairing step of it runs (no transaction or
/// lock is held while the agent answers; the lease serialises the steps on every instance).
async fn pairing_lease(state: &AppState, dongle_id: Uuid) -> Result<Lease, ApiError> {
    let length = state.config.agent_request_timeout + PAIRING_LEASE_MARGIN;
    let deadline = tokio::time::Instant::now() + length;
    loop {
        if let Some(lease) =
            dongle_lease::acquire(&state.pool, dongle_id, "pairing", length).await?
        {
            return Ok(lease);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "Another pairing step of this dongle is in progress: try again in a moment.",
            ));
        }
        tokio::time::sleep(PAIRING_LEASE_POLL).await;
    }
}

/// How much longer than the agent's timeout a pairing lease lasts, for the writes after the answer.
const PAIRING_LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a pairing step waiting for the lease asks again.
const PAIRING_LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// The checks of a pairing step, in a short transaction of their own: refused steps are audited, and
/// one that passes names the agent to ask.
async fn pairing_checks(
    state: &AppState,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    refused_action: &str,
) -> Result<(DongleRow, Standing), ApiError> {
    let mut tx = state.pool.begin().await?;
    let row = lock_dongle(&mut tx, dongle_id)
        .await?
        .ok_or_else(not_found)?;
    let seen = sightings(&mut tx, dongle_id, caller.user_id()).await?;
    drop(tx);
    match standing(&row, &seen, caller, &state.hub).await {
        Ok(standing) => Ok((row, standing)),
        Err(error) => {
            audit_failure(state, caller, client, dongle_id, refused_action, &error).await;
            Err(error)
        }
    }
}

/// Locks the dongle's row for a pairing step's writes, after its agent answered: the dongle may have
/// changed hands meanwhile (an unpair, an admin's force-unpair), and then nothing is written.
async fn relock_unchanged(
    conn: &mut PgConnection,
    dongle_id: Uuid,
    before: &DongleRow,
) -> Result<(), ApiError> {
    let now = lock_dongle(conn, dongle_id).await?.ok_or_else(not_found)?;
    if now.owner_user_id != before.owner_user_id || now.ownership_state != before.ownership_state {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "The dongle changed while its agent was asked: start again.",
        ));
    }
    Ok(())
}

/// `pairing-mode start`: asks the serving agent to put the dongle in pairing mode and opens a window.
pub async fn start(
    state: &AppState,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
) -> Result<PairingStarted, ApiError> {
    // Checked before the lease (a refused caller takes nothing), and again under it.
    pairing_checks(state, caller, client, dongle_id, "pairing.start_refused").await?;
    let lease = pairing_lease(state, dongle_id).await?;
    let started = start_leased(state, caller, client, dongle_id).await;
    lease.release(&state.pool).await;
    started
}

async fn start_leased(
    state: &AppState,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
) -> Result<PairingStarted, ApiError> {
    let (row, standing) =
        pairing_checks(state, caller, client, dongle_id, "pairing.start_refused").await?;
    let agent_id = match standing {
        Standing::AlreadyOwned => {
            return Ok(PairingStarted {
                dongle_id,
                pairing_session_id: None,
                expires_at: None,
                paired: true,
            });
        }
        Standing::Pairable { agent_id } => agent_id,
    };
    // Starts are counted per dongle and user, and past the limit only that user waits: a dongle-wide
    // hold would let anyone who sees a dongle lock out whoever holds it.
    let (starts, wait_secs): (i64, f64) = sqlx::query_as(
        "SELECT count(*), coalesce(extract(epoch FROM min(created_at) + interval '1 hour' - now()), 0)::float8 \
         FROM pairing_sessions WHERE dongle_id = $1 AND user_id = $2 \
           AND created_at > now() - interval '1 hour'",
    )
    .bind(dongle_id)
    .bind(caller.user_id())
    .fetch_one(&state.pool)
    .await?;
    if starts >= MAX_STARTS_PER_HOUR {
        let error = ApiError::rate_limited(wait_secs.ceil().max(1.0) as u64);
        audit_failure(
            state,
            caller,
            client,
            dongle_id,
            "pairing.start_refused",
            &error,
        )
        .await;
        return Err(error);
    }
    // Another account's open window is not cancelled: the dongle holds one nonce at a time, and a
    // stranger who sees the dongle could otherwise cancel its holder's pairing again and again. Windows
    // open only under the lease, so this check cannot race with another start.
    let others_open: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pairing_sessions WHERE dongle_id = $1 AND status = 'open' \
           AND expires_at > now() AND user_id <> $2)",
    )
    .bind(dongle_id)
    .bind(caller.user_id())
    .fetch_one(&state.pool)
    .await?;
    if others_open {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "A pairing window is open for another account on this dongle: try again when it ends \
             (two minutes at most).",
        ));
    }
    let corr_id = Uuid::new_v4();
    let reply = state
        .hub
        .request(
            agent_id,
            RequestBody::PairingStart {
                device_id: row.device_id.clone(),
                corr_id,
            },
            state.config.agent_request_timeout,
        )
        .await;
    let nonce = match reply {
        Ok(ReplyOk::PairingStarted { pairing_nonce, .. })
            if pairing_nonce.len() == 32
                && pairing_nonce
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            pairing_nonce
        }
        Ok(_) => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "The agent answered pairing start with something else than a pairing nonce.",
            ));
        }
        Err(e) => {
            let error = agent_error(e);
            audit_failure(
                state,
                caller,
                client,
                dongle_id,
                "pairing.start_failed",
                &error,
            )
            .await;
            return Err(error);
        }
    };
    let mut tx = state.pool.begin().await?;
    relock_unchanged(&mut tx, dongle_id, &row).await?;
    // A new window replaces the caller's own open one: the dongle holds one nonce at a time.
    sqlx::query(
        "UPDATE pairing_sessions SET status = 'cancelled' WHERE dongle_id = $1 AND status = 'open'",
    )
    .bind(dongle_id)
    .execute(&mut *tx)
    .await?;
    let window = state.config.pairing_window.as_secs_f64();
    let (session_id, expires_at): (Uuid, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO pairing_sessions (dongle_id, user_id, agent_id, pairing_nonce, expires_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING id, expires_at",
    )
    .bind(dongle_id)
    .bind(caller.user_id())
    .bind(agent_id)
    .bind(&nonce)
    .bind(window)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        audit_entry(
            "pairing.started",
            caller,
            client,
            dongle_id,
            serde_json::json!({
                "pairing_session_id": session_id,
                "agent_id": agent_id,
                "via_agent": caller.agent_id().is_some(),
            }),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(PairingStarted {
        dongle_id,
        pairing_session_id: Some(session_id),
        expires_at: Some(expires_at),
        paired: false,
    })
}

/// Records a pairing step that was refused or failed on the agent's side. The step's transaction is
/// already rolled back, so this entry is written on its own; failing to write it is logged, not answered.
async fn audit_failure(
    state: &AppState,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    action: &str,
    error: &ApiError,
) {
    let entry = audit_entry(
        action,
        caller,
        client,
        dongle_id,
        serde_json::json!({ "code": error.code() }),
    );
    if let Err(e) = audit::record(&state.pool, entry).await {
        tracing::warn!(%dongle_id, error = %e, "could not audit a failed pairing step");
    }
}

async fn enter_hold(
    conn: &mut PgConnection,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dongles SET ownership_state = 'SECURITY_HOLD', hold_reason = $2, pairing_mode = false \
         WHERE id = $1",
    )
    .bind(dongle_id)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE pairing_sessions SET status = 'held' WHERE dongle_id = $1 AND status = 'open'",
    )
    .bind(dongle_id)
    .execute(&mut *conn)
    .await?;
    audit::record(
        &mut *conn,
        audit_entry(
            "pairing.hold_entered",
            caller,
            client,
            dongle_id,
            serde_json::json!({ "reason": reason }),
        ),
    )
    .await?;
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
struct SessionRow {
    status: String,
    expired: bool,
    pairing_nonce: String,
}

/// `pairing-submit`: sends PIN, nonce and a new token through the agent; ownership on the dongle's ok.
pub async fn submit(
    state: &AppState,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    session_id: Uuid,
    pin: &str,
) -> Result<Paired, ApiError> {
    if pin.len() != 6 || !pin.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::validation(
            "The PIN is the 6 digits the dongle shows.",
        ));
    }
    // Checked before the lease (a refused caller takes nothing), and again under it.
    pairing_checks(state, caller, client, dongle_id, "pairing.submit_refused").await?;
    let lease = pairing_lease(state, dongle_id).await?;
    let submitted = submit_leased(state, caller, client, dongle_id, session_id, pin).await;
    lease.release(&state.pool).await;
    submitted
}

async fn submit_leased(
    state: &AppState,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    session_id: Uuid,
    pin: &str,
) -> Result<Paired, ApiError> {
    let user_id = caller.user_id();
    let (row, standing) =
        pairing_checks(state, caller, client, dongle_id, "pairing.submit_refused").await?;
    let agent_id = match standing {
        Standing::AlreadyOwned => {
            return Ok(Paired {
                dongle_id,
                paired: true,
                owner_user_id: user_id,
            });
        }
        Standing::Pairable { agent_id } => agent_id,
    };
    let session: SessionRow = sqlx::query_as(
        "SELECT status::text AS status, expires_at <= now() AS expired, pairing_nonce \
         FROM pairing_sessions WHERE id = $1 AND dongle_id = $2 AND user_id = $3",
    )
    .bind(session_id)
    .bind(dongle_id)
    .bind(user_id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            "No such pairing session for this dongle.",
        )
    })?;
    match session.status.as_str() {
        "open" if !session.expired => {}
        "open" => {
            let mut tx = state.pool.begin().await?;
            sqlx::query("UPDATE pairing_sessions SET status = 'expired' WHERE id = $1")
                .bind(session_id)
                .execute(&mut *tx)
                .await?;
            audit::record(
                &mut *tx,
                audit_entry(
                    "pairing.expired",
                    caller,
                    client,
                    dongle_id,
                    serde_json::json!({ "pairing_session_id": session_id }),
                ),
            )
            .await?;
            tx.commit().await?;
            return Err(ApiError::of(ErrorCode::PairingExpired));
        }
        "held" => return Err(ApiError::of(ErrorCode::PairingSecurityHold)),
        _ => return Err(ApiError::of(ErrorCode::PairingExpired)),
    }

    let token = DongleToken::generate();
    // Sealed before the token leaves the server, so a key problem stops the pairing before the dongle
    // holds a token the server could not keep.
    let sealed = state
        .keys
        .seal(dongle_id, &token)
        .map_err(ApiError::internal)?;
    let reply = state
        .hub
        .request(
            agent_id,
            RequestBody::PairingSubmit {
                device_id: row.device_id.clone(),
                corr_id: session_id,
                pin: pin.to_string(),
                pairing_nonce: session.pairing_nonce.clone(),
                token: token.to_base64(),
            },
            state.config.agent_request_timeout,
        )
        .await;
    let mut tx = state.pool.begin().await?;
    relock_unchanged(&mut tx, dongle_id, &row).await?;
    match reply {
        Ok(ReplyOk::Paired) => {}
        Ok(_) => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "The agent answered the PIN with something else than a pairing result.",
            ));
        }
        Err(RequestError::Failed(e)) if e.code == ReplyErrorCode::InvalidPin => {
            let wrong: i32 = sqlx::query_scalar(
                "UPDATE pairing_sessions SET wrong_pins = wrong_pins + 1 WHERE id = $1 RETURNING wrong_pins",
            )
            .bind(session_id)
            .fetch_one(&mut *tx)
            .await?;
            audit::record(
                &mut *tx,
                audit_entry(
                    "pairing.pin_invalid",
                    caller,
                    client,
                    dongle_id,
                    serde_json::json!({ "pairing_session_id": session_id, "wrong_pins": wrong }),
                ),
            )
            .await?;
            if wrong >= MAX_WRONG_PINS {
                enter_hold(&mut tx, caller, client, dongle_id, "too_many_wrong_pins").await?;
                tx.commit().await?;
                return Err(ApiError::of(ErrorCode::PairingSecurityHold));
            }
            tx.commit().await?;
            return Err(ApiError::of(ErrorCode::PairingPinInvalid)
                .with_detail("attempts_left", MAX_WRONG_PINS - wrong));
        }
        Err(RequestError::Failed(e)) if e.code == ReplyErrorCode::NotInPairingMode => {
            sqlx::query("UPDATE pairing_sessions SET status = 'expired' WHERE id = $1")
                .bind(session_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Err(ApiError::of(ErrorCode::PairingExpired));
        }
        Err(e) => {
            drop(tx);
            let error = agent_error(e);
            audit_failure(
                state,
                caller,
                client,
                dongle_id,
                "pairing.submit_failed",
                &error,
            )
            .await;
            return Err(error);
        }
    }

    sqlx::query(
        "INSERT INTO dongle_tokens (dongle_id, key_version, nonce, ciphertext) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (dongle_id) DO UPDATE SET key_version = EXCLUDED.key_version, \
         nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext",
    )
    .bind(dongle_id)
    .bind(sealed.key_version)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE dongles SET owner_user_id = $2, ownership_state = 'CLAIMED_ACTIVE', hold_reason = NULL, \
         pairing_mode = false WHERE id = $1",
    )
    .bind(dongle_id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE pairing_sessions SET status = 'paired' WHERE id = $1")
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE pairing_sessions SET status = 'cancelled' WHERE dongle_id = $1 AND status = 'open'",
    )
    .bind(dongle_id)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        audit_entry(
            "pairing.succeeded",
            caller,
            client,
            dongle_id,
            serde_json::json!({
                "pairing_session_id": session_id,
                "agent_id": agent_id,
                "key_version": sealed.key_version,
            }),
        ),
    )
    .await?;
    tx.commit().await?;
    // The serving agent keeps the token in its vault to authenticate to the dongle from now on.
    let _ = state
        .hub
        .send(
            agent_id,
            ServerMessage::DongleToken(control_proto::DongleToken {
                device_id: row.device_id,
                token: token.to_base64(),
            }),
        )
        .await;
    Ok(Paired {
        dongle_id,
        paired: true,
        owner_user_id: user_id,
    })
}

/// The answer to unpair and force-unpair.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Unpaired {
    pub dongle_id: Uuid,
    pub unpaired: bool,
    /// The serving agent was connected and was told to make the dongle forget its token.
    pub forget_sent: bool,
}

/// Clears owner, token, group membership and holds. `as_admin` skips the owner check.
pub async fn unpair(
    state: &AppState,
    actor: Uuid,
    client: &ClientInfo,
    dongle_id: Uuid,
    as_admin: bool,
) -> Result<Unpaired, ApiError> {
    let mut tx = state.pool.begin().await?;
    let row = lock_dongle(&mut tx, dongle_id).await?.ok_or_else(|| {
        if as_admin {
            ApiError::not_found()
        } else {
            not_found()
        }
    })?;
    if !as_admin {
        if row.owner_user_id != Some(actor) {
            return Err(not_found());
        }
        if row.ownership_state == "SECURITY_HOLD" {
            return Err(ApiError::new(
                ErrorCode::PairingSecurityHold,
                "The dongle is on security hold: only an administrator can clear it.",
            ));
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
    if row.ownership_state == "SECURITY_HOLD" {
        audit::record(
            &mut *tx,
            Entry::new("pairing.hold_exited", Some(actor), client)
                .target(target)
                .details(serde_json::json!({ "by": action })),
        )
        .await?;
    }
    tx.commit().await?;
    if !group_ids.is_empty() {
        state.relay.groups_removed(&group_ids, &group_agents).await;
    }
    // The previous owner's agents that see the dongle now make it forget its token. The answer is not
    // awaited: the dongle may be busy, and the server side is already clean.
    let mut forget_sent = false;
    for agent_id in serving {
        if state.hub.is_connected(agent_id).await {
            let hub = state.hub.clone();
            let timeout = state.config.agent_request_timeout;
            let device_id = row.device_id.clone();
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

/// A claimed dongle of the agent's user rejected its token: RESET_DETECTED.
pub async fn token_rejected(
    pool: &PgPool,
    agent_id: Uuid,
    user_id: Uuid,
    device_id: &str,
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
    device_id: &str,
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
    device_id: &str,
    update: &'static str,
    action: &'static str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed: Option<Uuid> = sqlx::query_scalar(update)
        .bind(device_id)
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
                            device_id: sighting.device_id.clone(),
                            token: token.to_base64(),
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
