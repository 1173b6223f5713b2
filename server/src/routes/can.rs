//! `/api/v1/dongles/{id}/can-config` (SPEC 3.6) and `/api/v1/dongles/{id}/can/send` (SPEC 3.8b): a
//! dongle's CAN configuration and frames sent by hand. Only the dongle's owner (session, or one of the
//! owner's agents by bearer token) reaches them; for anyone else the dongle does not exist.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::can_config::{self, CanConfigApplied, CanConfigRequest, CanConfigState};
use crate::can_send::{self, FrameSent, SendFrameRequest};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ClientInfo, PathId};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_can_config, put_can_config))
        .routes(routes!(send_frame))
}

/// The dongle's stored CAN configuration and the effective values it acknowledged.
#[utoipa::path(get, path = "/dongles/{id}/can-config", tag = "dongles",
    security(("session" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    responses(
        (status = 200, description = "The configuration (null fields when none was applied yet).", body = CanConfigState),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND: no such dongle, or not the caller's", body = ErrorBody),
    ))]
async fn get_can_config(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<CanConfigState>, ApiError> {
    Ok(Json(
        can_config::get(state.dongle_services(), &caller, id).await?,
    ))
}

/// Applies a CAN configuration through the agent serving the dongle. It is checked first (nothing is
/// sent when a field is out of range); it is stored only once the dongle acknowledges it, with the
/// effective values the dongle reports. The same configuration twice is applied twice, alike.
#[utoipa::path(put, path = "/dongles/{id}/can-config", tag = "dongles",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    request_body = CanConfigRequest,
    responses(
        (status = 200, description = "Applied and stored.", body = CanConfigApplied),
        (status = 400, description = "VALIDATION_ERROR (details.field names the field)", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "CONFLICT: the agent could not carry it out", body = ErrorBody),
        (status = 422, description = "CAN_CONFIG_REJECTED: the dongle refused it (details.reason); nothing stored", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: too many requests to agents by this account (all its dongles together), with Retry-After.", body = ErrorBody),
        (status = 503, description = "AGENT_OFFLINE; nothing stored", body = ErrorBody),
        (status = 504, description = "DONGLE_TIMEOUT: no acknowledgement in time; nothing stored", body = ErrorBody),
    ))]
async fn put_can_config(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
    ApiJson(body): ApiJson<CanConfigRequest>,
) -> Result<Json<CanConfigApplied>, ApiError> {
    Ok(Json(
        can_config::apply(state.dongle_services(), &caller, &client, id, &body).await?,
    ))
}

/// Sends one CAN frame through the dongle (e.g. an OBD-II request). Rate-limited per dongle.
#[utoipa::path(post, path = "/dongles/{id}/can/send", tag = "dongles",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    request_body = SendFrameRequest,
    responses(
        (status = 200, description = "The dongle took the frame for transmission.", body = FrameSent),
        (status = 400, description = "VALIDATION_ERROR (details.field names the field)", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "CONFLICT: the agent could not carry it out", body = ErrorBody),
        (status = 422, description = "CAN_SEND_REJECTED: the dongle refused the frame", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: too many frames to this dongle, or too many requests to agents by this account, with Retry-After", body = ErrorBody),
        (status = 503, description = "AGENT_OFFLINE", body = ErrorBody),
        (status = 504, description = "DONGLE_TIMEOUT", body = ErrorBody),
    ))]
async fn send_frame(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
    ApiJson(body): ApiJson<SendFrameRequest>,
) -> Result<Json<FrameSent>, ApiError> {
    Ok(Json(
        can_send::send(state.dongle_services(), &caller, &client, id, &body).await?,
    ))
}
