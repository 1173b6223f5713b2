//! The caller's own sessions: list them, end one (e.g. a forgotten browser).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum_extra::extract::cookie::CookieJar;
use serde::Serialize;
use utoipa::ToSchema;

use crate::audit::{self, Entry, Target};
use crate::auth::CurrentUser;
use crate::auth::session::{self, SessionView};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ClientInfo, PathId};
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// The caller's live sessions, newest first; `current` marks the one of this request.
#[utoipa::path(get, path = "/auth/sessions", tag = "auth", security(("session" = [])),
    responses(
        (status = 200, description = "The caller's sessions.", body = SessionList),
        (status = 401, description = "AUTH_REQUIRED or AUTH_SESSION_EXPIRED", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<SessionList>, ApiError> {
    let sessions = session::list_for_user(&state.pool, user.id, user.session_id).await?;
    Ok(Json(SessionList { sessions }))
}

/// Ends one of the caller's sessions. Another user's session answers 404, as an unknown one does.
#[utoipa::path(delete, path = "/auth/sessions/{id}", tag = "auth", security(("session" = [], "csrf" = [])),
    params(("id" = uuid::Uuid, Path, description = "The session's public id")),
    responses(
        (status = 204, description = "The session has ended."),
        (status = 401, description = "AUTH_REQUIRED or AUTH_SESSION_EXPIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    ))]
pub async fn end(
    State(state): State<AppState>,
    client: ClientInfo,
    user: CurrentUser,
    jar: CookieJar,
    PathId(id): PathId,
) -> Result<(CookieJar, StatusCode), ApiError> {
    if !session::end_owned(&state.pool, user.id, id).await? {
        return Err(ApiError::not_found());
    }
    audit::record(
        &state.pool,
        Entry::new("auth.session_ended", Some(user.id), &client).target(Target::session(id)),
    )
    .await?;
    // Ending the session of this very request is a logout: clear the cookie too.
    let jar = if id == user.session_id {
        jar.add(session::removal_cookie(state.config.secure_cookies()))
    } else {
        jar
    };
    Ok((jar, StatusCode::NO_CONTENT))
}
