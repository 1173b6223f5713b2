//! `/api/v1/dongles/...` (SPEC 3.4): list, detail, pairing, unpair. People (session) and agents (bearer)
//! both reach these; an agent acts for its own user and, in pairing, only on dongles it sees itself.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{Caller, CurrentUser};
use crate::dongles::{self, DongleView, Paired, PairingStarted, Unpaired};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ClientInfo, ErrorCode, PathId};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_dongles))
        .routes(routes!(get_dongle))
        .routes(routes!(pairing_mode))
        .routes(routes!(pairing_submit))
        .routes(routes!(unpair))
}

#[derive(Serialize, ToSchema)]
pub struct DongleList {
    pub items: Vec<DongleView>,
}

/// The caller's dongles, plus unclaimed dongles the caller's own online agents see now.
#[utoipa::path(get, path = "/dongles", tag = "dongles", security(("session" = []), ("agent_token" = [])),
    responses(
        (status = 200, description = "The dongles.", body = DongleList),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
    ))]
async fn list_dongles(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<DongleList>, ApiError> {
    Ok(Json(DongleList {
        items: dongles::list(&state.pool, caller.user_id()).await?,
    }))
}

/// One dongle, if the caller may see it (anything else is DONGLE_NOT_FOUND).
#[utoipa::path(get, path = "/dongles/{id}", tag = "dongles", security(("session" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    responses(
        (status = 200, description = "The dongle.", body = DongleView),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND (or NOT_FOUND for a malformed id)", body = ErrorBody),
    ))]
async fn get_dongle(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<DongleView>, ApiError> {
    dongles::find(&state.pool, caller.user_id(), id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::of(ErrorCode::DongleNotFound))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PairingModeRequest {
    /// `start`.
    #[schema(pattern = "^start$")]
    pub action: String,
}

/// Puts the dongle in pairing mode through the agent that sees it; opens a 120 s pairing window.
#[utoipa::path(post, path = "/dongles/{id}/pairing-mode", tag = "dongles",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    request_body = PairingModeRequest,
    responses(
        (status = 200, description = "Pairing mode started (or the dongle is already the caller's).", body = PairingStarted),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID, or EMAIL_NOT_VERIFIED: the account's address is not confirmed yet.", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "DONGLE_OWNED_BY_OTHER, PAIRING_SECURITY_HOLD, or CONFLICT (another account's pairing window is open)", body = ErrorBody),
        (status = 410, description = "PAIRING_EXPIRED", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: more than 10 starts on this dongle in an hour by this account, or too many requests to agents by this account, with Retry-After.", body = ErrorBody),
        (status = 503, description = "AGENT_OFFLINE", body = ErrorBody),
    ))]
async fn pairing_mode(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
    ApiJson(body): ApiJson<PairingModeRequest>,
) -> Result<Json<PairingStarted>, ApiError> {
    caller.require_verified_email()?;
    if body.action != "start" {
        return Err(ApiError::validation("action must be \"start\"."));
    }
    Ok(Json(
        dongles::start(state.dongle_services(), &caller, &client, id).await?,
    ))
}

#[derive(Deserialize, ToSchema)]
pub struct PairingSubmitRequest {
    pub pairing_session_id: Uuid,
    /// The 6 digits the dongle shows.
    #[schema(pattern = "^[0-9]{6}$")]
    pub pin: String,
}

/// Submits the PIN the dongle shows; on the dongle's ok the dongle becomes the caller's.
#[utoipa::path(post, path = "/dongles/{id}/pairing-submit", tag = "dongles",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    request_body = PairingSubmitRequest,
    responses(
        (status = 200, description = "Paired (or already the caller's).", body = Paired),
        (status = 400, description = "PAIRING_PIN_INVALID (details.attempts_left) or VALIDATION_ERROR", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID, or EMAIL_NOT_VERIFIED: the account's address is not confirmed yet.", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND, or NOT_FOUND for an unknown pairing session", body = ErrorBody),
        (status = 409, description = "DONGLE_OWNED_BY_OTHER, PAIRING_SECURITY_HOLD or CONFLICT", body = ErrorBody),
        (status = 410, description = "PAIRING_EXPIRED", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: too many requests to agents by this account (all its dongles together), with Retry-After.", body = ErrorBody),
        (status = 503, description = "AGENT_OFFLINE", body = ErrorBody),
    ))]
async fn pairing_submit(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
    ApiJson(body): ApiJson<PairingSubmitRequest>,
) -> Result<Json<Paired>, ApiError> {
    caller.require_verified_email()?;
    Ok(Json(
        dongles::submit(
            state.dongle_services(),
            &caller,
            &client,
            id,
            body.pairing_session_id,
            &body.pin,
        )
        .await?,
    ))
}

/// Releases one of the caller's dongles: owner, token and group membership are cleared, and the dongle
/// is told to forget its token when its agent is connected.
#[utoipa::path(post, path = "/dongles/{id}/unpair", tag = "dongles", security(("session" = [], "csrf" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    responses(
        (status = 200, description = "Unpaired.", body = Unpaired),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "PAIRING_SECURITY_HOLD: only an administrator clears a hold; CONFLICT: a pairing step of the dongle is in progress and did not end in time; try again.", body = ErrorBody),
    ))]
async fn unpair(
    State(state): State<AppState>,
    user: CurrentUser,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<Unpaired>, ApiError> {
    Ok(Json(
        dongles::unpair(state.dongle_services(), user.id, &client, id, false).await?,
    ))
}
