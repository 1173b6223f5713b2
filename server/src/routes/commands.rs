//! `/api/v1/dongles/{id}/commands` (SPEC 3.7): allow-listed commands on a dongle, queued and carried out
//! through its agent. Only the dongle's owner (session, or one of the owner's agents by bearer token)
//! reaches them; for anyone else the dongle does not exist.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::cli_telemetry::TelemetryPage;
use crate::commands::{self, CommandPage, CommandView, InvokeRequest, Queued};
use crate::dongles;
use crate::host_commands::{HostCommandRequest, HostCommandRun};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ApiQuery, ClientInfo, PathId, PathIds};
use crate::paging::Paging;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(invoke, list))
        .routes(routes!(get_command))
        .routes(routes!(cli_telemetry))
        .routes(routes!(host_command))
}

/// Runs a network diagnostic on the workstation of the agent serving the dongle: `interfaces` (which
/// the LAN discovery uses, and why not the others), `ip addr`, or `ping` (the LAN dongle's own
/// address). The output streams to the dongle's console as `host_output` events while it runs, and
/// comes whole in the answer and the dongle's command history (source `host`).
#[utoipa::path(post, path = "/dongles/{id}/host-commands", tag = "dongles",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    request_body = HostCommandRequest,
    responses(
        (status = 200, description = "The diagnostic ran.", body = HostCommandRun),
        (status = 400, description = "VALIDATION_ERROR: a malformed body", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "COMMAND_NOT_ALLOWED: not a host command, or the agent's owner turned them off (details.reason); or CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "CONFLICT: the serving agent is too old for host commands (it is never sent one)", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: too many requests to agents by this account, with Retry-After.", body = ErrorBody),
        (status = 503, description = "AGENT_OFFLINE: no agent serves the dongle now", body = ErrorBody),
        (status = 504, description = "DONGLE_TIMEOUT: the agent did not answer in time", body = ErrorBody),
    ))]
async fn host_command(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
    ApiJson(body): ApiJson<HostCommandRequest>,
) -> Result<Json<HostCommandRun>, ApiError> {
    Ok(Json(
        crate::host_commands::run(state.dongle_services(), &caller, &client, id, &body).await?,
    ))
}

/// The dongle's history of commands, newest first: those typed on its UART console (`source` `uart`,
/// as the dongle reported them through its agent) and those sent through the API (`remote`), the newest
/// 1 000 kept.
#[utoipa::path(get, path = "/dongles/{id}/cli-telemetry", tag = "dongles",
    security(("session" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id"), CommandListQuery),
    responses(
        (status = 200, description = "A page of the history.", body = TelemetryPage),
        (status = 400, description = "VALIDATION_ERROR: a malformed page", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
    ))]
async fn cli_telemetry(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    ApiQuery(q): ApiQuery<CommandListQuery>,
) -> Result<Json<TelemetryPage>, ApiError> {
    let dongle = dongles::owned_or_404(&state.pool, caller.user_id(), id).await?;
    let paging = Paging::new(q.page, q.per_page);
    Ok(Json(
        crate::cli_telemetry::list(&state.pool, dongle.id, paging).await?,
    ))
}

/// Queues an allow-listed command. It is checked first (unknown commands, bad arguments and timeouts
/// are refused before anything is queued), then sent to the agent serving the dongle; poll
/// `GET .../commands/{command_id}` for its end.
#[utoipa::path(post, path = "/dongles/{id}/commands", tag = "dongles",
    security(("session" = [], "csrf" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id")),
    request_body = InvokeRequest,
    responses(
        (status = 202, description = "Queued.", body = Queued),
        (status = 400, description = "VALIDATION_ERROR: bad arguments or timeout (details.field)", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "COMMAND_NOT_ALLOWED (not on the allow-list, or dangerous outside development mode), or CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "CONFLICT: too many commands waiting on this dongle", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: too many requests to agents by this account (all its dongles together), with Retry-After.", body = ErrorBody),
    ))]
async fn invoke(
    State(state): State<AppState>,
    caller: Caller,
    client: ClientInfo,
    PathId(id): PathId,
    ApiJson(body): ApiJson<InvokeRequest>,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    let queued = commands::invoke(&state.command_services(), &caller, &client, id, &body).await?;
    Ok((StatusCode::ACCEPTED, Json(queued)))
}

/// Paging of `GET /dongles/{id}/commands` and `GET /dongles/{id}/cli-telemetry`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandListQuery {
    /// From 1 (0 counts as 1).
    // The bounds are those of u32, which the query accepts; utoipa would document u32 as int32.
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub page: Option<u32>,
    /// 1 to 200, default 50 (0 counts as 1, more than 200 as 200).
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    pub per_page: Option<u32>,
}

/// The caller's recent commands on the dongle, newest first, without their output.
#[utoipa::path(get, path = "/dongles/{id}/commands", tag = "dongles",
    security(("session" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id"), CommandListQuery),
    responses(
        (status = 200, description = "A page of commands.", body = CommandPage),
        (status = 400, description = "VALIDATION_ERROR: a malformed page", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
    ))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    ApiQuery(q): ApiQuery<CommandListQuery>,
) -> Result<Json<CommandPage>, ApiError> {
    let paging = Paging::new(q.page, q.per_page);
    Ok(Json(
        commands::list(&state.command_services(), &caller, id, paging).await?,
    ))
}

/// One command: status, times, exit code, stdout (capped at 64 KiB by default; `truncated` says so)
/// and stderr.
#[utoipa::path(get, path = "/dongles/{id}/commands/{command_id}", tag = "dongles",
    security(("session" = []), ("agent_token" = [])),
    params(
        ("id" = Uuid, Path, description = "The dongle's id"),
        ("command_id" = Uuid, Path, description = "The command's id"),
    ),
    responses(
        (status = 200, description = "The command.", body = CommandView),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND, or NOT_FOUND for an unknown command", body = ErrorBody),
    ))]
async fn get_command(
    State(state): State<AppState>,
    caller: Caller,
    PathIds(id, command_id): PathIds,
) -> Result<Json<CommandView>, ApiError> {
    Ok(Json(
        commands::get(&state.command_services(), &caller, id, command_id).await?,
    ))
}
