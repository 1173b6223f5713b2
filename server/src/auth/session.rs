//! Login sessions: made at login, found by the cookie, slid forward on use, ended by logout, by the
//! owner, by a password reset or by an administrator.
//!
//! The cookie carries a 256-bit random id; the `sessions` table keys rows by its SHA-256 only. A session
//! ends at the first of two deadlines: `expires_at`, the idle deadline that each use pushes forward, and
//! `absolute_expires_at`, fixed at login.

use std::net::IpAddr;
use std::time::Duration;

use axum_extra::extract::cookie::{Cookie, SameSite};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::token;
use crate::users::{Role, Status};

/// The name of the session cookie.
pub const COOKIE: &str = "bridge_session";

/// A raw session id: the secret in the cookie. Its `Debug` hides the value, so that it cannot reach a log
/// through a stray `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSecret(String);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

impl SessionSecret {
    /// Accepts a cookie value only if it has the shape of an id this server makes.
    pub fn from_cookie(value: &str) -> Option<Self> {
        (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(value.to_ascii_lowercase()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn digest(&self) -> String {
        token::digest(&self.0)
    }
}

/// A new session, just stored.
#[derive(Debug)]
pub struct NewSession {
    pub secret: SessionSecret,
    pub public_id: Uuid,
}

/// The user behind a valid session.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionUser {
    pub session_public_id: Uuid,
    pub user_id: Uuid,
    pub email: String,
    pub role: Role,
    pub status: Status,
    pub email_verified: bool,
}

/// What a cookie's session turned out to be.
#[derive(Debug)]
pub enum Lookup {
    Valid(SessionUser),
    /// It existed but one of its deadlines passed; it has now been deleted.
    Expired,
    /// No such session (never existed, logged out, or ended).
    Unknown,
}

/// Stores a new session for `user_id` and returns its secret for the cookie.
pub async fn create(
    pool: &PgPool,
    user_id: Uuid,
    ip: IpAddr,
    user_agent: Option<&str>,
    idle: Duration,
    absolute: Duration,
) -> Result<NewSession, sqlx::Error> {
    let secret = SessionSecret(token::new_secret());
    let public_id: Uuid = sqlx::query_scalar(
        "INSERT INTO sessions (id, user_id, ip, user_agent, expires_at, absolute_expires_at) \
         VALUES ($1, $2, $3, $4, \
                 now() + LEAST(make_interval(secs => $5), make_interval(secs => $6)), \
                 now() + make_interval(secs => $6)) \
         RETURNING public_id",
    )
    .bind(secret.digest())
    .bind(user_id)
    .bind(ip.to_string())
    .bind(user_agent)
    .bind(idle.as_secs_f64())
    .bind(absolute.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(NewSession { secret, public_id })
}

/// Finds the session of a cookie. A valid one has its idle deadline pushed forward (never past the
/// absolute one); an expired one is deleted.
pub async fn lookup(
    pool: &PgPool,
    secret: &SessionSecret,
    idle: Duration,
) -> Result<Lookup, sqlx::Error> {
    let digest = secret.digest();
    let found: Option<(SessionUser, bool)> = sqlx::query_as::<_, SessionRow>(
        "SELECT s.public_id AS session_public_id, u.id AS user_id, u.email, u.role, u.status, \
                (u.email_verified_at IS NOT NULL) AS email_verified, \
                (s.expires_at <= now() OR s.absolute_expires_at <= now()) AS expired \
         FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1",
    )
    .bind(&digest)
    .fetch_optional(pool)
    .await?
    .map(|row| (row.user.clone(), row.expired));
    match found {
        None => Ok(Lookup::Unknown),
        Some((_, true)) => {
            end(pool, secret).await?;
            Ok(Lookup::Expired)
        }
        Some((user, false)) => {
            sqlx::query(
                "UPDATE sessions SET last_seen_at = now(), \
                   expires_at = LEAST(now() + make_interval(secs => $2), absolute_expires_at) \
                 WHERE id = $1",
            )
            .bind(&digest)
            .bind(idle.as_secs_f64())
            .execute(pool)
            .await?;
            Ok(Lookup::Valid(user))
        }
    }
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    #[sqlx(flatten)]
    user: SessionUser,
    expired: bool,
}

/// Ends the session of a cookie (logout). Ending an unknown session is not an error.
pub async fn end(db: impl PgExecutor<'_>, secret: &SessionSecret) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM sessions WHERE id = $1")
        .bind(secret.digest())
        .execute(db)
        .await?;
    Ok(())
}

/// Ends one session of a user, named by its public id; false when the user has no such session.
pub async fn end_owned(pool: &PgPool, user_id: Uuid, public_id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND public_id = $2")
        .bind(user_id)
        .bind(public_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Ends every session of a user (password reset, account disabled). Returns how many it ended.
pub async fn end_all_for_user(db: impl PgExecutor<'_>, user_id: Uuid) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(user_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes sessions past either deadline (housekeeping).
pub async fn purge_expired(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM sessions WHERE expires_at <= now() OR absolute_expires_at <= now()",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// One session as its owner sees it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct SessionView {
    /// The session's public id (not the secret in the cookie).
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub absolute_expires_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// True for the session this request came with.
    #[sqlx(default)]
    pub current: bool,
}

/// The user's live sessions, newest first.
pub async fn list_for_user(
    pool: &PgPool,
    user_id: Uuid,
    current: Uuid,
) -> Result<Vec<SessionView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT public_id AS id, created_at, last_seen_at, expires_at, absolute_expires_at, ip, \
                user_agent, public_id = $2 AS current \
         FROM sessions \
         WHERE user_id = $1 AND expires_at > now() AND absolute_expires_at > now() \
         ORDER BY created_at DESC",
    )
    .bind(user_id)
    .bind(current)
    .fetch_all(pool)
    .await
}

/// The cookie that carries a new session: HttpOnly, SameSite=Lax, Path=/, Secure over TLS. It has no
/// Max-Age: the server decides when the session ends, and the browser forgets it when it closes.
pub fn cookie(secret: &SessionSecret, secure: bool) -> Cookie<'static> {
    Cookie::build((COOKIE, secret.expose().to_string()))
        .http_only(true)
        .same_site(SameSite::Lax)
        .path("/")
        .secure(secure)
        .build()
}

/// The cookie that clears the session cookie in the browser (empty, Max-Age=0, expired).
pub fn removal_cookie(secure: bool) -> Cookie<'static> {
    let mut cookie = Cookie::build((COOKIE, ""))
        .http_only(true)
        .same_site(SameSite::Lax)
        .path("/")
        .secure(secure)
        .build();
    cookie.make_removal();
    cookie
}
