//! The pairing state machine (SPEC 3.4): start and submit, each holding the dongle's pairing lease
//! across the agent's round trip; wrong PINs, holds and the per-user limit on starts.

use chrono::{DateTime, Utc};
use control_proto::{Pin, ReplyErrorCode, ReplyOk, RequestBody, ServerMessage};
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agents::hub::RequestError;
use crate::audit;
use crate::auth::Caller;
use crate::client::ClientInfo;
use crate::dongle_lease::{self, Lease};
use crate::dongle_tokens;
use crate::rate_limit::LimitError;

use super::DongleError;
use super::Services;
use super::access::*;

/// Wrong PINs allowed in one pairing window; the last one puts the dongle on hold.
pub const MAX_WRONG_PINS: i32 = 5;
/// Pairing starts allowed per dongle per hour; one more puts the dongle on hold.
pub const MAX_STARTS_PER_HOUR: i64 = 10;

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
/// Takes the dongle's pairing lease, waiting while another pairing step of it runs (no transaction or
/// lock is held while the agent answers; the lease serialises the steps on every instance).
pub(super) async fn pairing_lease(
    svc: Services<'_>,
    dongle_id: Uuid,
) -> Result<Lease, DongleError> {
    let length = svc.agent_request_timeout + PAIRING_LEASE_MARGIN;
    let deadline = tokio::time::Instant::now() + length;
    loop {
        if let Some(lease) = dongle_lease::acquire(svc.pool, dongle_id, "pairing", length).await? {
            return Ok(lease);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DongleError::Busy(
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
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    refused_action: &str,
) -> Result<(DongleRow, Standing), DongleError> {
    let mut tx = svc.pool.begin().await?;
    let row = lock_dongle(&mut tx, dongle_id)
        .await?
        .ok_or(DongleError::NotFound)?;
    let seen = sightings(&mut tx, dongle_id, caller.user_id()).await?;
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pairing_holds WHERE dongle_id = $1 AND user_id = $2)",
    )
    .bind(dongle_id)
    .bind(caller.user_id())
    .fetch_one(&mut *tx)
    .await?;
    drop(tx);
    let standing = match standing(&row, &seen, caller, svc.hub).await {
        Ok(_) if held => Err(DongleError::AccountHeld),
        other => other,
    };
    match standing {
        Ok(standing) => Ok((row, standing)),
        Err(error) => {
            audit_failure(svc, caller, client, dongle_id, refused_action, &error).await;
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
) -> Result<(), DongleError> {
    let now = lock_dongle(conn, dongle_id)
        .await?
        .ok_or(DongleError::NotFound)?;
    if now.owner_user_id != before.owner_user_id || now.ownership_state != before.ownership_state {
        return Err(DongleError::ChangedMeanwhile);
    }
    Ok(())
}

/// `pairing-mode start`: asks the serving agent to put the dongle in pairing mode and opens a window.
pub async fn start(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
) -> Result<PairingStarted, DongleError> {
    // Checked before the lease (a refused caller takes nothing), and again under it.
    pairing_checks(svc, caller, client, dongle_id, "pairing.start_refused").await?;
    crate::rate_limit::agent_request(svc.pool, svc.rate_limits, caller.user_id()).await?;
    let lease = pairing_lease(svc, dongle_id).await?;
    let started = start_leased(svc, caller, client, dongle_id).await;
    lease.release(svc.pool).await;
    started
}

async fn start_leased(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
) -> Result<PairingStarted, DongleError> {
    let (row, standing) =
        pairing_checks(svc, caller, client, dongle_id, "pairing.start_refused").await?;
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
    .fetch_one(svc.pool)
    .await?;
    if starts >= MAX_STARTS_PER_HOUR {
        let error = DongleError::Limited(LimitError::Exceeded {
            retry_after_secs: wait_secs.ceil().max(1.0) as u64,
        });
        audit_failure(
            svc,
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
    .fetch_one(svc.pool)
    .await?;
    if others_open {
        return Err(DongleError::OtherWindowOpen);
    }
    let corr_id = Uuid::new_v4();
    let reply = svc
        .hub
        .request(
            agent_id,
            RequestBody::PairingStart {
                device_id: row.device_id,
                corr_id,
            },
            svc.agent_request_timeout,
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
            return Err(DongleError::UnexpectedReply(
                "The agent answered pairing start with something else than a pairing nonce.",
            ));
        }
        Err(e) => {
            let error = DongleError::PairingAgent(e);
            audit_failure(
                svc,
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
    let mut tx = svc.pool.begin().await?;
    relock_unchanged(&mut tx, dongle_id, &row).await?;
    // A new window replaces the caller's own open one: the dongle holds one nonce at a time.
    sqlx::query(
        "UPDATE pairing_sessions SET status = 'cancelled' WHERE dongle_id = $1 AND status = 'open'",
    )
    .bind(dongle_id)
    .execute(&mut *tx)
    .await?;
    let window = svc.pairing_window.as_secs_f64();
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
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    action: &str,
    error: &DongleError,
) {
    let entry = audit_entry(
        action,
        caller,
        client,
        dongle_id,
        serde_json::json!({ "code": error.code() }),
    );
    if let Err(e) = audit::record(svc.pool, entry).await {
        tracing::warn!(%dongle_id, error = %e, "could not audit a failed pairing step");
    }
}

/// Holds the caller's account for this dongle (five wrong PINs): its pairing steps on the dongle answer
/// PAIRING_SECURITY_HOLD until an administrator clears the hold with a force-unpair.
async fn hold_user(
    conn: &mut PgConnection,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    session_id: Uuid,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO pairing_holds (dongle_id, user_id, reason) VALUES ($1, $2, $3) \
         ON CONFLICT (dongle_id, user_id) DO NOTHING",
    )
    .bind(dongle_id)
    .bind(caller.user_id())
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE pairing_sessions SET status = 'held' WHERE id = $1 AND status = 'open'")
        .bind(session_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE dongles SET pairing_mode = false WHERE id = $1")
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
            serde_json::json!({ "reason": reason, "scope": "user", "user_id": caller.user_id() }),
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
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    session_id: Uuid,
    pin: &str,
) -> Result<Paired, DongleError> {
    let pin = Pin::parse(pin).map_err(|_| DongleError::PinMalformed)?;
    // Checked before the lease (a refused caller takes nothing), and again under it.
    pairing_checks(svc, caller, client, dongle_id, "pairing.submit_refused").await?;
    crate::rate_limit::agent_request(svc.pool, svc.rate_limits, caller.user_id()).await?;
    let lease = pairing_lease(svc, dongle_id).await?;
    let submitted = submit_leased(svc, caller, client, dongle_id, session_id, pin).await;
    lease.release(svc.pool).await;
    submitted
}

async fn submit_leased(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    session_id: Uuid,
    pin: Pin,
) -> Result<Paired, DongleError> {
    let user_id = caller.user_id();
    let (row, standing) =
        pairing_checks(svc, caller, client, dongle_id, "pairing.submit_refused").await?;
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
    .fetch_optional(svc.pool)
    .await?
    .ok_or(DongleError::NoSuchSession)?;
    match session.status.as_str() {
        "open" if !session.expired => {}
        "open" => {
            let mut tx = svc.pool.begin().await?;
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
            return Err(DongleError::PairingExpired);
        }
        "held" => return Err(DongleError::SecurityHold),
        _ => return Err(DongleError::PairingExpired),
    }

    let token = dongle_tokens::generate();
    // Sealed before the token leaves the server, so a key problem stops the pairing before the dongle
    // holds a token the server could not keep.
    let sealed = svc
        .keys
        .seal(dongle_id, &token)
        .map_err(|e| DongleError::Sealing(e.to_string()))?;
    let reply = svc
        .hub
        .request(
            agent_id,
            RequestBody::PairingSubmit {
                device_id: row.device_id,
                corr_id: session_id,
                pin,
                pairing_nonce: session.pairing_nonce.clone(),
                token,
            },
            svc.agent_request_timeout,
        )
        .await;
    let mut tx = svc.pool.begin().await?;
    relock_unchanged(&mut tx, dongle_id, &row).await?;
    match reply {
        Ok(ReplyOk::Paired) => {}
        Ok(_) => {
            return Err(DongleError::UnexpectedReply(
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
                // The account that entered the PINs is held, not the dongle: a stranger who sees an
                // unclaimed dongle must not lock out whoever holds it.
                hold_user(
                    &mut tx,
                    caller,
                    client,
                    dongle_id,
                    session_id,
                    "too_many_wrong_pins",
                )
                .await?;
                tx.commit().await?;
                return Err(DongleError::SecurityHold);
            }
            tx.commit().await?;
            return Err(DongleError::PinInvalid {
                attempts_left: MAX_WRONG_PINS - wrong,
            });
        }
        Err(RequestError::Failed(e)) if e.code == ReplyErrorCode::NotInPairingMode => {
            sqlx::query("UPDATE pairing_sessions SET status = 'expired' WHERE id = $1")
                .bind(session_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Err(DongleError::PairingExpired);
        }
        Err(e) => {
            drop(tx);
            let error = DongleError::PairingAgent(e);
            audit_failure(
                svc,
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
    let _ = svc
        .hub
        .send(
            agent_id,
            ServerMessage::DongleToken(control_proto::DongleToken {
                device_id: row.device_id,
                token,
            }),
        )
        .await;
    Ok(Paired {
        dongle_id,
        paired: true,
        owner_user_id: user_id,
    })
}
