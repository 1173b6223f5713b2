//! The `email_outbox` table: queueing, leasing due messages to the worker, and recording the outcome.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::AssertSqlSafe;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::templates::{SECRET_KEYS, Template};

/// A message as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxMail {
    pub id: Uuid,
    pub to_email: String,
    pub template: String,
    pub payload: Value,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, to_email, template, payload, attempts, last_error, created_at";

/// Queues a message. Call it inside the transaction of the change that causes the mail.
pub async fn enqueue(
    db: impl PgExecutor<'_>,
    to: &str,
    template: Template,
    payload: Value,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO email_outbox (to_email, template, payload) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(to)
    .bind(template.name())
    .bind(payload)
    .fetch_one(db)
    .await
}

/// Every message still queued, oldest first (`bridge-server outbox`).
pub async fn list_queued(pool: &PgPool) -> Result<Vec<OutboxMail>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM email_outbox WHERE status = 'queued' ORDER BY created_at"
    )))
    .fetch_all(pool)
    .await
}

/// Leases up to `batch` due messages: each gets one more attempt counted and its next attempt pushed
/// `lease_secs` ahead, in one statement that skips rows another instance is leasing, so no two workers
/// send the same message at once.
pub async fn lease_due(
    pool: &PgPool,
    batch: i64,
    lease_secs: f64,
) -> Result<Vec<OutboxMail>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "UPDATE email_outbox SET attempts = attempts + 1, \
           next_attempt_at = now() + make_interval(secs => $2) \
         WHERE id IN (SELECT id FROM email_outbox \
                      WHERE status = 'queued' AND next_attempt_at <= now() \
                      ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING {COLUMNS}"
    )))
    .bind(batch)
    .bind(lease_secs)
    .fetch_all(pool)
    .await
}

fn scrub_sql() -> String {
    SECRET_KEYS.iter().fold("payload".to_string(), |acc, key| {
        format!("({acc} - '{key}')")
    })
}

/// Gives up queued messages whose token has expired (verification links after `verification_ttl`,
/// reset links after `reset_ttl`): they are marked failed and their token and link scrubbed, so that a
/// mail never sent (no SMTP server, or one that never answered) keeps no token in clear past its
/// expiry. Returns how many were given up.
pub async fn give_up_expired(
    pool: &PgPool,
    verification_ttl: std::time::Duration,
    reset_ttl: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(AssertSqlSafe(format!(
        "UPDATE email_outbox SET status = 'failed', \
           last_error = 'the link expired before the mail could be sent', payload = {} \
         WHERE status = 'queued' AND ( \
           (template = $1 AND created_at < now() - make_interval(secs => $2)) OR \
           (template = $3 AND created_at < now() - make_interval(secs => $4)))",
        scrub_sql()
    )))
    .bind(Template::VerifyEmail.name())
    .bind(verification_ttl.as_secs_f64())
    .bind(Template::PasswordReset.name())
    .bind(reset_ttl.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Records a delivery and scrubs the token from the payload.
pub async fn mark_sent(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE email_outbox SET status = 'sent', sent_at = now(), last_error = NULL, \
           payload = {} WHERE id = $1",
        scrub_sql()
    )))
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a failed attempt: the message is retried after `retry_in_secs`, or, when `give_up`, marked
/// failed and scrubbed.
pub async fn mark_attempt_failed(
    pool: &PgPool,
    id: Uuid,
    error: &str,
    retry_in_secs: f64,
    give_up: bool,
) -> Result<(), sqlx::Error> {
    let error: String = error.chars().take(500).collect();
    if give_up {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE email_outbox SET status = 'failed', last_error = $2, payload = {} WHERE id = $1",
            scrub_sql()
        )))
        .bind(id)
        .bind(error)
        .execute(pool)
        .await?;
    } else {
        sqlx::query(
            "UPDATE email_outbox SET last_error = $2, \
               next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(retry_in_secs)
        .execute(pool)
        .await?;
    }
    Ok(())
}
