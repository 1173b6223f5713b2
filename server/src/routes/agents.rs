//! `/api/v1/agents/...` (SPEC 3.3): registration and tokens (people), heartbeat and device reports
//! (agents, with their bearer token).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use control_proto::DongleReport;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::agents::{self, AgentView, ReportError};
use crate::audit::{self, Entry, Target};
use crate::auth::{CurrentAgent, CurrentUser};
use crate::dongles;
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ClientInfo, PathId};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(list_agents))
        .routes(routes!(revoke_tokens))
        .routes(routes!(logout))
        .routes(routes!(heartbeat))
        .routes(routes!(report_devices))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// A name for people to tell agents apart (default: "agent").
    pub agent_name: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Registered {
    pub agent_id: Uuid,
    /// Shown this once; the server keeps only its hash. Send it as `Authorization: Bearer`.
    pub agent_token: String,
    /// Where the agent opens its control WebSocket.
    pub ws_url: String,
}

/// Registers an agent for the logged-in user and issues its token.
#[utoipa::path(post, path = "/agents/register", tag = "agents", security(("session" = [], "csrf" = [])),
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "The agent and its token (shown once).", body = Registered),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID, or EMAIL_NOT_VERIFIED: the account's address is not confirmed yet.", body = ErrorBody),
    ))]
async fn register(
    State(state): State<AppState>,
    user: CurrentUser,
    client: ClientInfo,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    user.require_verified_email()?;
    let name = body
        .agent_name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or("agent");
    if name.chars().count() > 100 {
        return Err(ApiError::validation(
            "agent_name is at most 100 characters.",
        ));
    }
    let (agent_id, token) =
        agents::register(&state.pool, user.id, name, state.config.agent_token_ttl).await?;
    audit::record(
        &state.pool,
        Entry::new("agent.registered", Some(user.id), &client).target(Target {
            kind: "agent",
            id: agent_id.to_string(),
        }),
    )
    .await?;
    let ws_url = format!(
        "{}/ws/agent",
        state
            .public_url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
    );
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            agent_id,
            agent_token: token,
            ws_url,
        }),
    ))
}

#[derive(Serialize, ToSchema)]
pub struct AgentList {
    pub items: Vec<AgentView>,
}

/// The logged-in user's agents, with presence.
#[utoipa::path(get, path = "/agents", tag = "agents", security(("session" = [])),
    responses(
        (status = 200, description = "The user's agents.", body = AgentList),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
    ))]
async fn list_agents(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<AgentList>, ApiError> {
    Ok(Json(AgentList {
        items: agents::list(&state.pool, user.id).await?,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Revoked {
    pub agent_id: Uuid,
    pub tokens_revoked: u64,
}

/// Revokes every token of one of the user's agents (it must log in again).
#[utoipa::path(delete, path = "/agents/{id}/tokens", tag = "agents", security(("session" = [], "csrf" = [])),
    params(("id" = Uuid, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The tokens are revoked.", body = Revoked),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such agent of this user.", body = ErrorBody),
    ))]
async fn revoke_tokens(
    State(state): State<AppState>,
    user: CurrentUser,
    client: ClientInfo,
    PathId(id): PathId,
) -> Result<Json<Revoked>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let revoked = agents::revoke_tokens(&mut *tx, user.id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    audit::record(
        &mut *tx,
        Entry::new("agent.tokens_revoked", Some(user.id), &client)
            .target(Target {
                kind: "agent",
                id: id.to_string(),
            })
            .details(serde_json::json!({ "tokens_revoked": revoked })),
    )
    .await?;
    tx.commit().await?;
    // A connected agent loses its control channel at once, not at its next reconnect.
    state.hub.kick(id).await;
    Ok(Json(Revoked {
        agent_id: id,
        tokens_revoked: revoked,
    }))
}

/// An agent logs itself out (`bridge-agent logout`): every token of the calling agent is revoked, so a
/// copy of its credentials file left behind can never be used again, and its connections end.
#[utoipa::path(post, path = "/agents/logout", tag = "agents", security(("agent_token" = [])),
    responses(
        (status = 200, description = "The agent's tokens are revoked.", body = Revoked),
        (status = 401, description = "AUTH_REQUIRED: no valid agent token.", body = ErrorBody),
    ))]
async fn logout(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    client: ClientInfo,
) -> Result<Json<Revoked>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let revoked = agents::revoke_tokens(&mut *tx, agent.user_id, agent.agent_id)
        .await?
        .unwrap_or(0);
    audit::record(
        &mut *tx,
        Entry::new("agent.logged_out", Some(agent.user_id), &client)
            .target(Target {
                kind: "agent",
                id: agent.agent_id.to_string(),
            })
            .details(serde_json::json!({ "tokens_revoked": revoked })),
    )
    .await?;
    tx.commit().await?;
    state.hub.kick(agent.agent_id).await;
    Ok(Json(Revoked {
        agent_id: agent.agent_id,
        tokens_revoked: revoked,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct HeartbeatRequest {
    pub hostname: Option<String>,
    pub os: Option<String>,
    /// The agent's version.
    pub version: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HeartbeatAck {
    pub agent_id: Uuid,
    /// The period the server expects heartbeats at.
    pub heartbeat_secs: u32,
}

/// An agent's sign of life (the control WebSocket's `heartbeat` does the same).
#[utoipa::path(post, path = "/agents/heartbeat", tag = "agents", security(("agent_token" = [])),
    request_body = HeartbeatRequest,
    responses(
        (status = 200, description = "Recorded.", body = HeartbeatAck),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED: no valid agent token.", body = ErrorBody),
    ))]
async fn heartbeat(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiJson(body): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    agents::heartbeat(
        &state.pool,
        agent.agent_id,
        body.hostname.as_deref(),
        body.os.as_deref(),
        body.version.as_deref(),
    )
    .await?;
    // The token is valid (the extractor checked): this renews it while the agent is in use.
    agents::heartbeat_if_authorised(&state.pool, agent.agent_id, state.config.agent_token_ttl)
        .await?;
    Ok(Json(HeartbeatAck {
        agent_id: agent.agent_id,
        heartbeat_secs: control_proto::DEFAULT_HEARTBEAT_SECS,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DevicesReport {
    /// Every dongle the agent sees now (a full snapshot), at most 256.
    #[schema(max_items = 256)]
    pub dongles: Vec<DongleReport>,
}

#[derive(Serialize, ToSchema)]
pub struct ReportAck {
    pub accepted: usize,
}

/// A full snapshot of the dongles an agent sees. It never makes anyone an owner of a dongle; the
/// agent's own local CAN endpoints (transport `local`, device ids derived from the agent's id) become
/// its user's.
#[utoipa::path(post, path = "/agents/devices/report", tag = "agents", security(("agent_token" = [])),
    request_body = DevicesReport,
    responses(
        (status = 200, description = "Recorded.", body = ReportAck),
        (status = 400, description = "VALIDATION_ERROR: a malformed device id or report, or a local endpoint whose id is not this agent's.", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED: no valid agent token.", body = ErrorBody),
    ))]
async fn report_devices(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    ApiJson(body): ApiJson<DevicesReport>,
) -> Result<Json<ReportAck>, ApiError> {
    let owned = agents::report_devices(
        &state.pool,
        agent,
        &body.dongles,
        state.config.rate_limits.new_dongle_ids_per_user,
    )
    .await
    .map_err(|e| match e {
        ReportError::Db(e) => ApiError::from(e),
        other => ApiError::validation(other.to_string()),
    })?;
    // Tokens travel only over the control WebSocket; without one the agent gets them when it connects.
    dongles::hand_out_tokens(&state.pool, &state.keys, &state.hub, agent.agent_id, &owned).await;
    Ok(Json(ReportAck {
        accepted: body.dongles.len(),
    }))
}
