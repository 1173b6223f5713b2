//! `/ws/agent`: the control WebSocket of agents (the protocol is `control_proto`'s module doc); `/ws/data`:
//! their data WebSocket (`control_proto::data`).

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::agents::ws;
use crate::auth::CurrentAgent;
use crate::groups::data_ws;
use crate::http::error::ErrorBody;
use crate::state::AppState;

/// The largest control message accepted, in bytes. The largest real ones (a device report of every
/// dongle a workstation sees, a command result whose output the server caps at 64 KiB anyway) are far
/// smaller; a larger message ends the connection instead of being buffered (the default is 64 MiB).
pub const CONTROL_MAX_MESSAGE_LEN: usize = 1 << 20;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(agent_socket))
        .routes(routes!(data_socket))
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
    // Control messages are small JSON, and a server holds thousands of these sockets: tungstenite's
    // default 128 KiB read buffer per connection was most of a connection's memory.
    upgrade
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_message_size(CONTROL_MAX_MESSAGE_LEN)
        .max_frame_size(CONTROL_MAX_MESSAGE_LEN)
        .on_upgrade(move |socket| ws::serve(state, agent, socket))
}

/// The data WebSocket: binary FRAMES, ACK and DROPS messages of the group sides the agent serves (see
/// `control_proto::data`). The same agent token as `/ws/agent`; refused with 401 before any upgrade.
#[utoipa::path(get, path = "/ws/data", tag = "agents", security(("agent_token" = [])),
    responses(
        (status = 101, description = "Switching to the data WebSocket."),
        (status = 400, description = "VALIDATION_ERROR: not a WebSocket upgrade request.", body = ErrorBody),
        (status = 401, description = "AUTH_REQUIRED: no valid agent token.", body = ErrorBody),
    ))]
async fn data_socket(
    State(state): State<AppState>,
    CurrentAgent(agent): CurrentAgent,
    upgrade: WebSocketUpgrade,
) -> Response {
    // No message of the protocol is larger; a larger one ends the connection instead of being buffered.
    upgrade
        .max_message_size(control_proto::data::MAX_MESSAGE_LEN)
        .max_frame_size(control_proto::data::MAX_MESSAGE_LEN)
        .on_upgrade(move |socket| data_ws::serve(state, agent, socket))
}
