//! Single-use tokens sent by mail: email verification (24 h) and password reset (1 h).
//!
//! The mail carries the token; the table keeps its SHA-256. Using a token consumes it in the same
//! statement that checks it, so two concurrent uses cannot both succeed.

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::auth::token;

/// Makes a verification token for `user_id`, valid for `ttl`, and returns the secret for the mail.
pub async fn create_verification(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    ttl: Duration,
) -> Result<String, sqlx::Error> {
    let secret = token::new_secret();
    sqlx::query(
        "INSERT INTO email_verification_tokens (user_id, token_hash, expires_at) \
         VALUES ($1, $2, now() + make_interval(secs => $3))",
    )
    .bind(user_id)
    .bind(token::digest(&secret))
    .bind(ttl.as_secs_f64())
    .execute(db)
    .await?;
    Ok(secret)
}

/// Consumes a verification token; the user it was for, or `None` when it is unknown, used or expired.
pub async fn consume_verification(
    db: impl PgExecutor<'_>,
    secret: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "DELETE FROM email_verification_tokens WHERE token_hash = $1 AND expires_at > now() \
         RETURNING user_id",
    )
    .bind(token::digest(secret))
    .fetch_optional(db)
    .await
}

/// Makes a password-reset token for `user_id`, valid for `ttl`, and returns the secret for the mail.
pub async fn create_reset(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
    ttl: Duration,
) -> Result<String, sqlx::Error> {
    let secret = token::new_secret();
    sqlx::query(
        "INSERT INTO password_reset_tokens (user_id, token_hash, expires_at) \
         VALUES ($1, $2, now() + make_interval(secs => $3))",
    )
    .bind(user_id)
    .bind(token::digest(&secret))
    .bind(ttl.as_secs_f64())
    .execute(db)
    .await?;
    Ok(secret)
}

/// Consumes a reset token (marks it used); the user it was for, or `None` when it is unknown, used or
/// expired.
pub async fn consume_reset(
    db: impl PgExecutor<'_>,
    secret: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE password_reset_tokens SET used_at = now() \
         WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now() RETURNING user_id",
    )
    .bind(token::digest(secret))
    .fetch_optional(db)
    .await
}

/// Marks every other open reset token of the user used, once the password has been reset.
pub async fn retire_resets_of_user(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE password_reset_tokens SET used_at = now() WHERE user_id = $1 AND used_at IS NULL",
    )
    .bind(user_id)
    .execute(db)
    .await?;
    Ok(())
}
