//! `/api/v1/groups/...` (SPEC 3.8): two dongles of the caller whose frames the server relays to each
//! other. People (session) and the user's agents (bearer) both reach these; someone else's group answers
//! exactly as an unknown one (404 NOT_FOUND).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::groups::api::{self as groups, GroupError, GroupView};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ClientInfo, ErrorCode, PathId};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_groups, create_group))
        .routes(routes!(get_group, delete_group))
        .routes(routes!(activate))
        .routes(routes!(deactivate))
}

#[derive(Serialize, ToSchema)]
pub struct GroupList {
    pub items: Vec<GroupView>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateGroup {
    /// One of the caller's dongles (CLAIMED_ACTIVE), in no other group.
    pub dongle_a_id: Uuid,
    /// Another of the caller's dongles (CLAIMED_ACTIVE), in no other group.
    pub dongle_b_id: Uuid,
}

/// The caller's groups, oldest first.
#[utoipa::path(get, path = "/groups", tag = "groups", security(("session" = []), ("agent_token" = [])),
    responses(
        (status = 200, description = "The groups.", body = GroupList),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
    ))]
async fn list_groups(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<GroupList>, ApiError> {
    Ok(Json(GroupList {
        items: groups::list(&state.pool, &state.relay, caller.user_id()).await?,
    }))
}

/// Makes an INACTIVE group of two of the caller's dongles. A dongle belongs to at most one group.
#[utoipa::path(post, path = "/groups", tag = "groups",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    request_body = CreateGroup,
    responses(
        (status = 201, description = "The new group.", body = GroupView),
        (status = 400, description = "VALIDATION_ERROR (e.g. the same dongle twice)", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND: not the caller's, or not CLAIMED_ACTIVE (details.dongle_id)", body = ErrorBody),
        (status = 409, description = "CONFLICT: a dongle is already in a group (details.dongle_id)", body = ErrorBody),
    ))]
async fn create_group(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    ApiJson(body): ApiJson<CreateGroup>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let group = groups::create(
        &state.pool,
        &state.relay,
        &caller,
        &client,
        body.dongle_a_id,
        body.dongle_b_id,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(group)))
}

/// One of the caller's groups: state, buffer pressure, backlog and counters per direction, dongles.
#[utoipa::path(get, path = "/groups/{id}", tag = "groups", security(("session" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The group's id")),
    responses(
        (status = 200, description = "The group.", body = GroupView),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such group of the caller", body = ErrorBody),
    ))]
async fn get_group(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<GroupView>, ApiError> {
    groups::find(&state.pool, &state.relay, caller.user_id(), id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "Group not found."))
}

/// Deletes one of the caller's groups with its buffered frames.
#[utoipa::path(delete, path = "/groups/{id}", tag = "groups",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The group's id")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such group of the caller", body = ErrorBody),
    ))]
async fn delete_group(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    groups::delete(&state.pool, &state.relay, &caller, &client, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts relaying: the agents serving the two dongles are told to stream, and the group is ACTIVE
/// once both are connected to the data plane (DEGRADED until then). Idempotent.
#[utoipa::path(post, path = "/groups/{id}/activate", tag = "groups",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The group's id")),
    responses(
        (status = 200, description = "The group, relaying.", body = GroupView),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such group of the caller", body = ErrorBody),
        (status = 409, description = "CONFLICT: a dongle is not CLAIMED_ACTIVE (details.dongle_id)", body = ErrorBody),
    ))]
async fn activate(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(
        groups::activate(&state.pool, &state.relay, &caller, &client, id).await?,
    ))
}

/// Stops relaying; frames already buffered stay (within retention) for a later activation. Idempotent.
#[utoipa::path(post, path = "/groups/{id}/deactivate", tag = "groups",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The group's id")),
    responses(
        (status = 200, description = "The group, INACTIVE.", body = GroupView),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such group of the caller", body = ErrorBody),
    ))]
async fn deactivate(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<GroupView>, ApiError> {
    Ok(Json(
        groups::deactivate(&state.pool, &state.relay, &caller, &client, id).await?,
    ))
}

/// How the API answers each refusal of a group operation.
impl From<GroupError> for ApiError {
    fn from(e: GroupError) -> Self {
        let message = e.to_string();
        match e {
            GroupError::SameDongle => ApiError::validation(message),
            GroupError::DongleNotFound(id) => {
                ApiError::of(ErrorCode::DongleNotFound).with_detail("dongle_id", id.to_string())
            }
            GroupError::AlreadyGrouped(id) | GroupError::DongleNotActive(id) => {
                ApiError::new(ErrorCode::Conflict, message).with_detail("dongle_id", id.to_string())
            }
            GroupError::GroupedMeanwhile => ApiError::new(ErrorCode::Conflict, message),
            GroupError::NotFound => ApiError::new(ErrorCode::NotFound, message),
            GroupError::Db(e) => e.into(),
        }
    }
}
