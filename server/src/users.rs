//! Users: the typed email, roles and statuses, and the queries on the `users` table.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;
use sqlx::{PgExecutor, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

/// An email address, normalised (trimmed, lower case) and loosely checked. Made only by [`Email::parse`],
/// so the normalisation that uniqueness and rate-limit keys depend on cannot be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

/// Why an email was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a valid email address")]
pub struct InvalidEmail;

impl Email {
    pub fn parse(raw: &str) -> Result<Self, InvalidEmail> {
        let email = raw.trim().to_lowercase();
        let Some((local, domain)) = email.split_once('@') else {
            return Err(InvalidEmail);
        };
        let well_formed = (3..=254).contains(&email.len())
            && !local.is_empty()
            && local.len() <= 64
            && !domain.is_empty()
            && !domain.contains('@')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !email.chars().any(|c| c.is_whitespace() || c.is_control());
        if well_formed {
            Ok(Self(email))
        } else {
            Err(InvalidEmail)
        }
    }

    /// The key that rate limits use for an account: the normalised address, also when the input was not
    /// a valid email, so that changing case never resets a counter.
    pub fn rate_limit_key(raw: &str) -> String {
        raw.trim().to_lowercase()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, ToSchema)]
#[sqlx(type_name = "user_role", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    SuperAdmin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, ToSchema)]
#[sqlx(type_name = "user_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    Disabled,
}

/// A user as stored, with the password hash, which never leaves the server.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub password_hash: String,
    pub role: Role,
    pub status: Status,
    pub email_verified_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub role: Role,
    pub status: Status,
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        Self {
            id: u.id,
            email: u.email.clone(),
            role: u.role,
            status: u.status,
            email_verified: u.email_verified_at.is_some(),
            created_at: u.created_at,
        }
    }
}

const COLUMNS: &str = "id, email, password_hash, role, status, email_verified_at, created_at";

pub async fn find_by_email(pool: &PgPool, email: &Email) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM users WHERE email = $1"
    )))
    .bind(email.as_str())
    .fetch_optional(pool)
    .await
}

pub async fn find(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM users WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Inserts a user; `None` when the email is taken (no error, so that callers cannot leak the difference
/// by accident through an error path).
pub async fn insert(
    db: impl PgExecutor<'_>,
    email: &Email,
    password_hash: &str,
    role: Role,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "INSERT INTO users (email, password_hash, role) VALUES ($1, $2, $3) \
         ON CONFLICT (email) DO NOTHING RETURNING {COLUMNS}"
    )))
    .bind(email.as_str())
    .bind(password_hash)
    .bind(role)
    .fetch_optional(db)
    .await
}

pub async fn set_password(
    db: impl PgExecutor<'_>,
    id: Uuid,
    password_hash: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
        .bind(id)
        .bind(password_hash)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn mark_email_verified(db: impl PgExecutor<'_>, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()) WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Sets the status and returns the user as it was before, or `None` for an unknown id.
pub async fn set_status(
    db: &mut sqlx::PgConnection,
    id: Uuid,
    status: Status,
) -> Result<Option<(Status, User)>, sqlx::Error> {
    let before: Option<Status> =
        sqlx::query_scalar("SELECT status FROM users WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *db)
            .await?;
    let Some(before) = before else {
        return Ok(None);
    };
    let after: User = sqlx::query_as(AssertSqlSafe(format!(
        "UPDATE users SET status = $2 WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(status)
    .fetch_one(&mut *db)
    .await?;
    Ok(Some((before, after)))
}

/// Revokes every agent token of the user's agents (a disabled user's agents lose the server at once).
/// Returns how many tokens it revoked.
pub async fn revoke_agent_tokens_of_user(
    db: impl PgExecutor<'_>,
    user_id: Uuid,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE agent_tokens SET revoked_at = now() \
         WHERE revoked_at IS NULL AND agent_id IN (SELECT id FROM agents WHERE user_id = $1)",
    )
    .bind(user_id)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            Email::parse("  Alice@Example.COM ").unwrap().as_str(),
            "alice@example.com"
        );
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "a b@c.d",
            "a@b@c",
            "a@.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Email::rate_limit_key(" A@B.C "), "a@b.c");
    }
}
