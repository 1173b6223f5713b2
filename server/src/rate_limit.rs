//! Rate limits kept in PostgreSQL, so that every server instance behind a load balancer counts the same
//! attempts.
//!
//! Each (scope, key) has a fixed window: the first attempt opens it, every attempt counts, and the first
//! attempt after the window's end opens a new one. An attempt over the limit is refused with the seconds
//! left in the window, which become the `Retry-After` header.

use std::time::Duration;

use sqlx::PgPool;

/// Why an attempt was not let through.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// Over the limit: the caller may try again after this many whole seconds (at least one).
    #[error("too many attempts: try again in {retry_after_secs} s")]
    Exceeded { retry_after_secs: u64 },
    /// The counter could not be read or written.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// At most `max` attempts per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: u32,
    pub window: Duration,
}

impl Limit {
    pub const fn new(max: u32, window: Duration) -> Self {
        Self { max, window }
    }
}

/// The limits of the account endpoints and of frames sent by hand (defaults in `config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    pub login_per_ip: Limit,
    pub login_per_account: Limit,
    pub signup_per_ip: Limit,
    pub reset_request_per_ip: Limit,
    pub reset_request_per_account: Limit,
    pub reset_confirm_per_ip: Limit,
    /// Frames sent by hand to one dongle (`POST /dongles/:id/can/send`), whoever sends them.
    pub can_send_per_dongle: Limit,
    /// Requests one user makes that go to an agent (CAN configurations, commands, frames sent by
    /// hand, pairing starts and submits), across all their dongles and instances: each costs an agent
    /// round trip, so one user cannot keep the agents' hub and the database busy for everybody.
    pub agent_requests_per_user: Limit,
    /// Device ids one user's agents may introduce (ids the server has no row for yet): a report past
    /// it has its new ids left out, so a modified agent cannot fill the dongles table.
    pub new_dongle_ids_per_user: Limit,
}

/// What is being counted. Each scope has its own counters, so that e.g. reset requests and reset
/// confirmations never share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    LoginIp,
    LoginAccount,
    SignupIp,
    ResetRequestIp,
    ResetRequestAccount,
    ResetConfirmIp,
    CanSendDongle,
    AgentRequestsUser,
    NewDongleIdsUser,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoginIp => "login:ip",
            Self::LoginAccount => "login:account",
            Self::SignupIp => "signup:ip",
            Self::ResetRequestIp => "reset-request:ip",
            Self::ResetRequestAccount => "reset-request:account",
            Self::ResetConfirmIp => "reset-confirm:ip",
            Self::CanSendDongle => "can-send:dongle",
            Self::AgentRequestsUser => "agent-requests:user",
            Self::NewDongleIdsUser => "new-dongle-ids:user",
        }
    }
}

/// The outcome of counting one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after: Duration },
}

/// Counts one attempt for (scope, key) and says whether it is within the limit.
///
/// The upsert is one statement, so two instances counting at once both see the sum.
pub async fn hit(
    pool: &PgPool,
    scope: Scope,
    key: &str,
    limit: Limit,
) -> Result<Decision, sqlx::Error> {
    hit_n(pool, scope, key, limit, 1).await
}

/// Counts `n` attempts at once (e.g. the new device ids of one report).
pub async fn hit_n(
    pool: &PgPool,
    scope: Scope,
    key: &str,
    limit: Limit,
    n: u32,
) -> Result<Decision, sqlx::Error> {
    let (hits, seconds_left): (i32, f64) = sqlx::query_as(
        "INSERT INTO rate_limits AS r (scope, key, window_start, hits) VALUES ($1, $2, now(), $4) \
         ON CONFLICT (scope, key) DO UPDATE SET \
           window_start = CASE WHEN r.window_start + make_interval(secs => $3) <= now() \
                               THEN now() ELSE r.window_start END, \
           hits = CASE WHEN r.window_start + make_interval(secs => $3) <= now() \
                       THEN $4 ELSE LEAST(r.hits + $4, 1000000000) END \
         RETURNING hits, \
           EXTRACT(EPOCH FROM (window_start + make_interval(secs => $3) - now()))::float8",
    )
    .bind(scope.as_str())
    .bind(key)
    .bind(limit.window.as_secs_f64())
    .bind(n.min(1_000_000) as i32)
    .fetch_one(pool)
    .await?;
    if hits as i64 > limit.max as i64 {
        Ok(Decision::Limited {
            retry_after: Duration::from_secs_f64(seconds_left.max(0.0)),
        })
    } else {
        Ok(Decision::Allowed)
    }
}

/// Counts one attempt and refuses it, with the whole seconds to wait (rounded up), when it is over the
/// limit; the API answers that as RATE_LIMITED with Retry-After.
pub async fn enforce(
    pool: &PgPool,
    scope: Scope,
    key: &str,
    limit: Limit,
) -> Result<(), LimitError> {
    match hit(pool, scope, key, limit).await? {
        Decision::Allowed => Ok(()),
        Decision::Limited { retry_after } => {
            tracing::info!(scope = scope.as_str(), "rate limited");
            Err(LimitError::Exceeded {
                retry_after_secs: (retry_after.as_secs_f64().ceil() as u64).max(1),
            })
        }
    }
}

/// Counts one request of `user_id` that goes to an agent, against
/// [`RateLimits::agent_requests_per_user`]; refused past it.
pub async fn agent_request(
    pool: &PgPool,
    limits: &RateLimits,
    user_id: uuid::Uuid,
) -> Result<(), LimitError> {
    enforce(
        pool,
        Scope::AgentRequestsUser,
        &user_id.to_string(),
        limits.agent_requests_per_user,
    )
    .await
}

/// Deletes counters whose window ended more than a day ago (housekeeping; windows are at most hours).
pub async fn purge_stale(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM rate_limits WHERE window_start < now() - interval '1 day'")
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
