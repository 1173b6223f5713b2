//! The audit log: one [`record`] call for every feature that must leave a trace (SPEC 3.10).
//!
//! An entry names the actor (a user, or nobody for anonymous attempts such as a failed login), the action
//! (`area.verb`, e.g. `auth.login_failed`, `admin.user_disabled`), the target, the client's IP and user
//! agent, and free-form details (before/after where it applies). Details must never hold a secret.

use sqlx::AssertSqlSafe;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::client::ClientInfo;

/// One audit entry to write.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub actor: Option<Uuid>,
    pub action: &'a str,
    pub target: Option<Target>,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<&'a str>,
    pub details: Value,
}

/// What an action was done to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: &'static str,
    pub id: String,
}

impl Target {
    pub fn user(id: Uuid) -> Self {
        Self {
            kind: "user",
            id: id.to_string(),
        }
    }

    pub fn session(id: Uuid) -> Self {
        Self {
            kind: "session",
            id: id.to_string(),
        }
    }
}

impl<'a> Entry<'a> {
    /// An entry for `action` by `actor`, from the client of the current request.
    pub fn new(action: &'a str, actor: Option<Uuid>, client: &'a ClientInfo) -> Self {
        Self {
            actor,
            action,
            target: None,
            ip: Some(client.ip),
            user_agent: client.user_agent.as_deref(),
            details: Value::Object(Default::default()),
        }
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Writes one entry. Pass the transaction of the change it records, so both land or neither does.
pub async fn record(db: impl PgExecutor<'_>, entry: Entry<'_>) -> Result<Uuid, sqlx::Error> {
    let (target_type, target_id) = match &entry.target {
        Some(t) => (Some(t.kind), Some(t.id.as_str())),
        None => (None, None),
    };
    sqlx::query_scalar(
        "INSERT INTO audit_logs (actor_user_id, action, target_type, target_id, ip, user_agent, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(entry.actor)
    .bind(entry.action)
    .bind(target_type)
    .bind(target_id)
    .bind(entry.ip.map(|ip| ip.to_string()))
    .bind(entry.user_agent)
    .bind(&entry.details)
    .fetch_one(db)
    .await
}

/// One entry as the admin API shows it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct AuditView {
    pub id: Uuid,
    pub actor_user_id: Option<Uuid>,
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    #[schema(value_type = Object)]
    pub details: Value,
    pub created_at: DateTime<Utc>,
}

/// Filters of `GET /admin/audit-logs`; every field narrows the result.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub actor: Option<Uuid>,
    pub action: Option<String>,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// A page of entries matching `filter`, newest first, and the number of all matches.
pub async fn search(
    pool: &sqlx::PgPool,
    filter: &Filter,
    limit: i64,
    offset: i64,
) -> Result<(Vec<AuditView>, i64), sqlx::Error> {
    const WHERE: &str = "WHERE ($1::uuid IS NULL OR actor_user_id = $1) \
          AND ($2::text IS NULL OR action = $2) \
          AND ($3::text IS NULL OR target_type = $3) \
          AND ($4::text IS NULL OR target_id = $4) \
          AND ($5::timestamptz IS NULL OR created_at >= $5) \
          AND ($6::timestamptz IS NULL OR created_at < $6)";
    let items: Vec<AuditView> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, actor_user_id, action, target_type, target_id, ip, user_agent, details, created_at \
         FROM audit_logs {WHERE} ORDER BY created_at DESC, id LIMIT $7 OFFSET $8"
    )))
    .bind(filter.actor)
    .bind(&filter.action)
    .bind(&filter.target_type)
    .bind(&filter.target_id)
    .bind(filter.since)
    .bind(filter.until)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM audit_logs {WHERE}"
    )))
    .bind(filter.actor)
    .bind(&filter.action)
    .bind(&filter.target_type)
    .bind(&filter.target_id)
    .bind(filter.since)
    .bind(filter.until)
    .fetch_one(pool)
    .await?;
    Ok((items, total))
}
