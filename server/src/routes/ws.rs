//! `/ws/agent`: the control WebSocket of agents (the protocol is `control_proto`'s module doc).

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::agents::ws;
use crate::app::AppState;
use crate::auth::CurrentAgent;
use crate::http::error::ErrorBody;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(agent_socket))
}

/// The control WebSocket. The upgrade request carries the agent token (`Authorization: Bearer`); an
/// unknown, revoked or expired token is refused with 401 before any upgrade.
#[utoipa::path(get, path = "/ws/agent", tag = "agents", security(("agent_token" = [])),
    responses(
        (status = 101, description = "Switching to the control WebSocket."),
        (status = 400, description = "VALIDATION_ERROR: not a WebSocket upgrade request.", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED: no valid agent token.", body = ErrorBody),
    ))]
async fn agent_socket(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade.on_upgrade(move |socket| ws::serve(state, agent, socket))
}
