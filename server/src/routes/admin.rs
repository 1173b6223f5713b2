//! `/api/v1/admin/...`: users, the audit log and dongle force-unpair (SPEC 3.10, 3.4). Only a super_admin gets past
//! [`AdminUser`]; anyone else is told these routes do not exist.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::audit::{self, AuditView, Entry, Target};
use crate::auth::{AdminUser, session};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiQuery, ClientInfo, ErrorCode, PathId};
use crate::paging::{PageInfo, Paging};
use crate::state::AppState;
use crate::users::{self, Role, Status, User, UserView};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users))
        .routes(routes!(disable_user))
        .routes(routes!(enable_user))
        .routes(routes!(list_audit_logs))
        .routes(routes!(force_unpair))
        .routes(routes!(release_holds))
        .routes(routes!(list_dongles))
        .routes(routes!(latency_test))
}

/// Measures a relaying group's path: numbered probes go from side A's agent through the relay to side
/// B's agent and back, at `rate` a second for `seconds`, and never reach either dongle's bus. Answers
/// when the run is over (up to `seconds` and 12 s more) with what came back and the round trips.
#[utoipa::path(post, path = "/admin/groups/{id}/latency-test", tag = "admin", security(("session" = [], "csrf" = [])),
    params(("id" = Uuid, Path, description = "The group's id")),
    request_body = crate::groups::latency::LatencyTest,
    responses(
        (status = 200, description = "The run's figures.", body = crate::groups::latency::LatencyReport),
        (status = 400, description = "VALIDATION_ERROR: a rate, a time or a count out of bounds.", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such group, or the caller is not a super_admin.", body = ErrorBody),
        (status = 409, description = "CONFLICT: the group is not relaying, or an agent is too old or refused; AGENT_OFFLINE: no agent serves a side.", body = ErrorBody),
    ))]
async fn latency_test(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    client: ClientInfo,
    PathId(id): PathId,
    crate::http::ApiJson(test): crate::http::ApiJson<crate::groups::latency::LatencyTest>,
) -> Result<Json<crate::groups::latency::LatencyReport>, ApiError> {
    let report =
        crate::groups::latency::run(&state.pool, &state.hub, admin.id, &client, id, test).await?;
    Ok(Json(report))
}

/// How the API answers each refusal of a latency test.
impl From<crate::groups::latency::LatencyError> for ApiError {
    fn from(e: crate::groups::latency::LatencyError) -> Self {
        use crate::groups::latency::LatencyError;
        let message = e.to_string();
        match e {
            LatencyError::NotFound => ApiError::new(ErrorCode::NotFound, message),
            LatencyError::Invalid(_) => ApiError::validation(message),
            LatencyError::SideOffline(side) => {
                ApiError::new(ErrorCode::AgentOffline, message).with_detail("side", side.letter())
            }
            LatencyError::NotRelaying(_) => ApiError::new(ErrorCode::Conflict, message),
            LatencyError::AgentTooOld(side) | LatencyError::Agent(side, _) => {
                ApiError::new(ErrorCode::Conflict, message).with_detail("side", side.letter())
            }
            LatencyError::Db(e) => e.into(),
        }
    }
}

/// An ownership state to filter on.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OwnershipFilter {
    Unclaimed,
    ClaimedActive,
    ResetDetected,
    SecurityHold,
}

impl OwnershipFilter {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unclaimed => "UNCLAIMED",
            Self::ClaimedActive => "CLAIMED_ACTIVE",
            Self::ResetDetected => "RESET_DETECTED",
            Self::SecurityHold => "SECURITY_HOLD",
        }
    }
}

/// Filters of `GET /admin/dongles`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DongleSearch {
    /// One ownership state.
    pub state: Option<OwnershipFilter>,
    /// A part of the owner's email address (case-insensitive).
    pub owner: Option<String>,
    /// A part of the device id.
    pub device: Option<String>,
    /// Only dongles on which an account is held from pairing (five wrong PINs).
    pub held: Option<bool>,
    /// From 1 (0 counts as 1).
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub page: Option<u32>,
    /// 1 to 200, default 50 (0 counts as 1, more than 200 as 200).
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub per_page: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminDonglePage {
    pub items: Vec<crate::dongles::views::AdminDongleView>,
    #[serde(flatten)]
    pub page: PageInfo,
}

/// Every dongle, most recently seen first, with its owner, state, the agent that sees it, when it was
/// last seen, its group and the accounts held from pairing it; filtered and paged. Act on one with
/// force-unpair (which also ends a hold, and releases the held accounts).
#[utoipa::path(get, path = "/admin/dongles", tag = "admin", security(("session" = [])),
    params(DongleSearch),
    responses(
        (status = 200, description = "A page of dongles.", body = AdminDonglePage),
        (status = 400, description = "VALIDATION_ERROR: a malformed filter.", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: the caller is not a super_admin.", body = ErrorBody),
    ))]
async fn list_dongles(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(q): ApiQuery<DongleSearch>,
) -> Result<Json<AdminDonglePage>, ApiError> {
    let paging = Paging::new(q.page, q.per_page);
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let filter = crate::dongles::views::AdminFilter {
        state: q.state.map(OwnershipFilter::as_str),
        owner: nonempty(q.owner),
        device: nonempty(q.device),
        held: q.held.unwrap_or(false),
    };
    let (items, total) =
        crate::dongles::views::admin_list(&state.pool, &filter, paging.limit(), paging.offset())
            .await?;
    Ok(Json(AdminDonglePage {
        items,
        page: paging.info(total),
    }))
}

/// Clears a dongle's owner, token, group membership and any security hold (the only way out of a hold),
/// and tells the dongle to forget its token when its agent is connected.
#[utoipa::path(post, path = "/admin/dongles/{id}/force-unpair", tag = "admin", security(("session" = [], "csrf" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    responses(
        (status = 200, description = "Unpaired; any hold is cleared.", body = crate::dongles::Unpaired),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such dongle, or the caller is not a super_admin.", body = ErrorBody),
        (status = 409, description = "CONFLICT: a pairing step of the dongle is in progress and did not end in time; try again.", body = ErrorBody),
    ))]
async fn force_unpair(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<crate::dongles::Unpaired>, ApiError> {
    Ok(Json(
        crate::dongles::unpair(state.dongle_services(), admin.id, &client, id, true).await?,
    ))
}

/// Releases every account held from pairing a dongle (five wrong PINs from that account), leaving the
/// dongle's owner, token and group as they are; each released account may pair the dongle again.
#[utoipa::path(post, path = "/admin/dongles/{id}/release-holds", tag = "admin", security(("session" = [], "csrf" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    responses(
        (status = 200, description = "Released (0 when no account was held).", body = crate::dongles::holds::HoldsReleased),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such dongle, or the caller is not a super_admin.", body = ErrorBody),
    ))]
async fn release_holds(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<crate::dongles::holds::HoldsReleased>, ApiError> {
    Ok(Json(
        crate::dongles::holds::release(state.dongle_services(), admin.id, &client, id).await?,
    ))
}

/// Filters of `GET /admin/users`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserSearch {
    /// A part of the email address (case-insensitive).
    pub email: Option<String>,
    pub status: Option<Status>,
    pub role: Option<Role>,
    /// From 1 (0 counts as 1).
    // The bounds are those of u32, which the query accepts; utoipa would document u32 as int32.
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub page: Option<u32>,
    /// 1 to 200, default 50 (0 counts as 1, more than 200 as 200).
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub per_page: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<UserView>,
    #[serde(flatten)]
    pub page: PageInfo,
}

/// Users, newest first, filtered and paged.
#[utoipa::path(get, path = "/admin/users", tag = "admin", security(("session" = [])),
    params(UserSearch),
    responses(
        (status = 200, description = "A page of users.", body = UserPage),
        (status = 400, description = "VALIDATION_ERROR: a malformed filter.", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: the caller is not a super_admin.", body = ErrorBody),
    ))]
async fn list_users(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(q): ApiQuery<UserSearch>,
) -> Result<Json<UserPage>, ApiError> {
    let paging = Paging::new(q.page, q.per_page);
    // The search text is a literal: LIKE's wildcards in it are escaped.
    let pattern = q.email.as_deref().map(crate::db::like_contains);
    const WHERE: &str = "WHERE ($1::text IS NULL OR email LIKE $1) \
          AND ($2::user_status IS NULL OR status = $2) \
          AND ($3::user_role IS NULL OR role = $3)";
    let items: Vec<User> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, email, password_hash, role, status, email_verified_at, created_at FROM users \
         {WHERE} ORDER BY created_at DESC, id LIMIT $4 OFFSET $5"
    )))
    .bind(&pattern)
    .bind(q.status)
    .bind(q.role)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM users {WHERE}")))
            .bind(&pattern)
            .bind(q.status)
            .bind(q.role)
            .fetch_one(&state.pool)
            .await?;
    Ok(Json(UserPage {
        items: items.iter().map(UserView::from).collect(),
        page: paging.info(total),
    }))
}

/// Disables a user: every session of theirs ends and their agents' tokens are revoked.
#[utoipa::path(post, path = "/admin/users/{id}/disable", tag = "admin", security(("session" = [], "csrf" = [])),
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The user, now disabled.", body = UserView),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such user, or the caller is not a super_admin.", body = ErrorBody),
        (status = 409, description = "CONFLICT: an administrator cannot disable their own account.", body = ErrorBody),
    ))]
async fn disable_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<UserView>, ApiError> {
    if id == admin.id {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "You cannot disable your own account.",
        ));
    }
    let mut tx = state.pool.begin().await?;
    let Some((before, user)) = users::set_status(&mut tx, id, Status::Disabled).await? else {
        return Err(ApiError::not_found());
    };
    let sessions_ended = session::end_all_for_user(&mut *tx, id).await?;
    let tokens_revoked = users::revoke_agent_tokens_of_user(&mut *tx, id).await?;
    let agent_ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agents WHERE user_id = $1")
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
    audit::record(
        &mut *tx,
        Entry::new("admin.user_disabled", Some(admin.id), &client)
            .target(Target::user(id))
            .details(serde_json::json!({
                "before": { "status": before },
                "after": { "status": user.status },
                "sessions_ended": sessions_ended,
                "agent_tokens_revoked": tokens_revoked,
            })),
    )
    .await?;
    tx.commit().await?;
    // The user's connected agents lose their control channels now.
    for agent_id in agent_ids {
        state.hub.kick(agent_id).await;
    }
    Ok(Json(UserView::from(&user)))
}

/// Enables a disabled user again (they log in anew; ended sessions stay ended).
#[utoipa::path(post, path = "/admin/users/{id}/enable", tag = "admin", security(("session" = [], "csrf" = [])),
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The user, now active.", body = UserView),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such user, or the caller is not a super_admin.", body = ErrorBody),
    ))]
async fn enable_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<UserView>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let Some((before, user)) = users::set_status(&mut tx, id, Status::Active).await? else {
        return Err(ApiError::not_found());
    };
    audit::record(
        &mut *tx,
        Entry::new("admin.user_enabled", Some(admin.id), &client)
            .target(Target::user(id))
            .details(serde_json::json!({
                "before": { "status": before },
                "after": { "status": user.status },
            })),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(UserView::from(&user)))
}

/// Filters of `GET /admin/audit-logs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditSearch {
    /// The acting user's id.
    pub actor: Option<Uuid>,
    /// An exact action, e.g. `auth.login_failed`.
    pub action: Option<String>,
    /// e.g. `user`, `session`.
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    /// Entries at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Entries before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// From 1 (0 counts as 1).
    // The bounds are those of u32, which the query accepts; utoipa would document u32 as int32.
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub page: Option<u32>,
    /// 1 to 200, default 50 (0 counts as 1, more than 200 as 200).
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub per_page: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditView>,
    #[serde(flatten)]
    pub page: PageInfo,
}

/// The audit log, newest first, filtered and paged.
#[utoipa::path(get, path = "/admin/audit-logs", tag = "admin", security(("session" = [])),
    params(AuditSearch),
    responses(
        (status = 200, description = "A page of audit entries.", body = AuditPage),
        (status = 400, description = "VALIDATION_ERROR: a malformed filter.", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: the caller is not a super_admin.", body = ErrorBody),
    ))]
async fn list_audit_logs(
    State(state): State<AppState>,
    _admin: AdminUser,
    ApiQuery(q): ApiQuery<AuditSearch>,
) -> Result<Json<AuditPage>, ApiError> {
    let paging = Paging::new(q.page, q.per_page);
    let filter = audit::Filter {
        actor: q.actor,
        action: q.action,
        target_type: q.target_type,
        target_id: q.target_id,
        since: q.since,
        until: q.until,
    };
    let (items, total) =
        audit::search(&state.pool, &filter, paging.limit(), paging.offset()).await?;
    Ok(Json(AuditPage {
        items,
        page: paging.info(total),
    }))
}
