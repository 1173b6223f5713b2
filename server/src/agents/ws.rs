//! The control WebSocket `/ws/agent` (the messages are `control_proto`'s): one task per connection
//! reads the agent's messages, and a writer task drains the connection's queue in the [`AgentHub`].

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use control_proto::{
    AgentMessage, PROTOCOL_VERSION, ReplyError, ReplyErrorCode, ReplyResult, ServerMessage, Welcome,
};
use futures::{SinkExt, StreamExt};

use crate::agents::{self, AgentIdentity};
use crate::state::AppState;
use crate::{cli_telemetry, commands, dongles};

/// The most messages held for a connection whose agent has not been welcomed yet.
const MAX_HELD: usize = 256;

/// A message that will not be sent: a request among them fails at once with `why`, so that its caller
/// does not wait for its timeout; anything else is dropped (the server says it again when it matters).
fn refuse(
    hub: &crate::agents::hub::AgentHub,
    agent_id: uuid::Uuid,
    message: &ServerMessage,
    why: &str,
) {
    if let ServerMessage::Request(request) = message {
        hub.complete(
            agent_id,
            request.id,
            control_proto::ReplyResult::Error(control_proto::ReplyError {
                code: control_proto::ReplyErrorCode::Unsupported,
                message: why.to_string(),
            }),
        );
    }
}

/// Serves one agent's control connection until either side closes it.
pub async fn serve(state: AppState, agent: AgentIdentity, socket: WebSocket) {
    let agent_id = agent.agent_id;
    let registration = state.hub.connect(agent_id).await;
    let conn_id = registration.conn_id;
    let mut rx = registration.rx;
    let (mut sink, mut stream) = socket.split();
    // An agent reads nothing before its `welcome` (it waits for that first), so whatever the server
    // queues for a new connection before then (a request made as the agent reconnects) is held and
    // sent right after the welcome, in order, instead of being lost and left to time out. Then a
    // message newer than the agent's protocol (from its hello) is not sent: an older agent would take
    // it for a violation and reconnect; a request is failed at once instead.
    let (protocol, agent_protocol) = tokio::sync::watch::channel(None::<u32>);
    let hub = state.hub.clone();
    let writer = tokio::spawn(async move {
        let mut held: Vec<ServerMessage> = Vec::new();
        let mut welcomed = false;
        while let Some(message) = rx.recv().await {
            // An error about the connection itself (a message that is no control message) goes at
            // once: it is for whoever is on the other end, welcomed or not.
            if !welcomed
                && !matches!(
                    message,
                    ServerMessage::Welcome(_) | ServerMessage::Error { .. }
                )
            {
                if held.len() < MAX_HELD {
                    held.push(message);
                } else {
                    refuse(&hub, agent_id, &message, "the agent has not said hello yet");
                }
                continue;
            }
            let welcome = matches!(message, ServerMessage::Welcome(_));
            let known = agent_protocol.borrow().unwrap_or(1);
            let mut batch = vec![message];
            if welcome {
                welcomed = true;
                batch.append(&mut held);
            }
            for message in batch {
                if message.since() > known {
                    refuse(
                        &hub,
                        agent_id,
                        &message,
                        &format!(
                            "this agent speaks control protocol {known}; the request needs {}: upgrade bridge-agent",
                            message.since()
                        ),
                    );
                    continue;
                }
                if sink
                    .send(Message::Text(message.to_json().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let _ = sink.close().await;
    });
    tracing::info!(%agent_id, "agent connected");
    // Connecting counts as a sign of life.
    if let Err(e) = agents::heartbeat(&state.pool, agent_id, None, None, None).await {
        tracing::warn!(%agent_id, error = %e, "could not record the agent's presence");
    }
    // Replies are handed to their waiters right here, but everything that touches the database goes to a
    // worker of its own, in order: a database write may wait on a lock (a report racing a pairing step's
    // writes, say),
    // and a device report queued before that reply would otherwise block the reply behind the lock.
    let (work_tx, mut work_rx) = tokio::sync::mpsc::channel::<AgentMessage>(64);
    let worker_state = state.clone();
    // A message the database could not take (a command result, a device report) is lost unless the
    // agent says it again, and the agent says everything again on connecting: so a failed message ends
    // the connection, and the agent reconnects (with backoff) once the database answers.
    let failed = Arc::new(tokio::sync::Notify::new());
    let worker_failed = failed.clone();
    let worker = tokio::spawn(async move {
        while let Some(message) = work_rx.recv().await {
            if let Err(e) = handle(&worker_state, agent, message).await {
                tracing::warn!(%agent_id, error = %e, "a control message failed; closing the connection so that the agent says it again");
                worker_failed.notify_one();
                return;
            }
        }
    });
    let mut budget = MessageBudget::new(state.config.agent_messages_per_sec);
    let mut token = agents::TokenCheck::new(agent_id);
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            () = failed.notified() => break,
        };
        // Over its budget, the agent waits: nothing it sent is dropped, it only arrives later.
        if let Some(until) = budget.take(tokio::time::Instant::now()) {
            metrics::counter!("agent_control_messages_throttled_total").increment(1);
            tokio::time::sleep_until(until).await;
        }
        let Some(frame) = frame else { break };
        let text = match frame {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        // A token revoked or expired behind this connection's back (on another instance, or by its
        // date) ends it at the next message of any kind, not only at a heartbeat.
        if !token.still_valid(&state.pool, false).await {
            break;
        }
        let message = match AgentMessage::from_json(text.as_str()) {
            Ok(m) => m,
            Err(e) => {
                // A reply whose body does not parse still names its request: that request fails now
                // as the agent's, rather than its caller waiting for the timeout.
                if let Some(id) = reply_id(text.as_str()) {
                    state.hub.complete(
                        agent_id,
                        id,
                        ReplyResult::Error(ReplyError {
                            code: ReplyErrorCode::Internal,
                            message: format!("the agent's reply did not parse: {e}"),
                        }),
                    );
                }
                // The parse error names a position and a field, never a value: safe to send and log.
                let _ = state.hub.send_here(
                    agent_id,
                    ServerMessage::Error {
                        code: "bad_message".into(),
                        message: format!("not a control message: {e}"),
                    },
                );
                continue;
            }
        };
        if let AgentMessage::Hello(hello) = &message {
            protocol.send_replace(Some(hello.protocol));
        }
        match message {
            AgentMessage::Reply(reply) => {
                state.hub.complete(agent_id, reply.id, reply.result);
            }
            other => {
                // The worker is gone only after a failure, which ends the connection.
                if work_tx.send(other).await.is_err() {
                    break;
                }
            }
        }
    }
    state.hub.disconnect(agent_id, conn_id).await;
    drop(work_tx);
    let _ = worker.await;
    writer.abort();
    // The dongles this agent served are offline for their consoles now, whatever the database says
    // until the agent's presence times out.
    if let Ok(served) = present_dongles(&state.pool, agent_id).await {
        publish_presence(&state, agent_id, &served, &[]);
    }
    tracing::info!(%agent_id, "agent disconnected");
}

/// A fixed one-second window of at most `per_sec` messages.
struct MessageBudget {
    per_sec: u32,
    window_start: tokio::time::Instant,
    used: u32,
}

impl MessageBudget {
    fn new(per_sec: u32) -> Self {
        Self {
            per_sec: per_sec.max(1),
            window_start: tokio::time::Instant::now(),
            used: 0,
        }
    }

    /// Counts one message read at `now`; answers when to handle it if this window is spent.
    fn take(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let window = std::time::Duration::from_secs(1);
        if now >= self.window_start + window {
            self.window_start = now;
            self.used = 0;
        }
        self.used += 1;
        if self.used <= self.per_sec {
            return None;
        }
        // This message opens the next window.
        let next = self.window_start + window;
        self.window_start = next;
        self.used = 1;
        Some(next)
    }
}

/// The request id of a text that is a `reply` (whether or not the rest of it parses), so that a
/// malformed reply can still end its request.
fn reply_id(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        kind: String,
        id: u64,
    }
    serde_json::from_str::<Head>(text)
        .ok()
        .filter(|h| h.kind == "reply")
        .map(|h| h.id)
}

/// The dongles the agent reports present now.
async fn present_dongles(
    pool: &sqlx::PgPool,
    agent_id: uuid::Uuid,
) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT dongle_id FROM dongle_sightings WHERE agent_id = $1 AND present")
        .bind(agent_id)
        .fetch_all(pool)
        .await
}

/// Presence events for the dongles that appeared (in `after` only) and went (in `before` only) on
/// agent `agent_id`.
fn publish_presence(
    state: &AppState,
    agent_id: uuid::Uuid,
    before: &[uuid::Uuid],
    after: &[uuid::Uuid],
) {
    let seen_at = crate::console::timestamp(chrono::Utc::now());
    let changes = after
        .iter()
        .filter(|d| !before.contains(d))
        .map(|d| (*d, true))
        .chain(
            before
                .iter()
                .filter(|d| !after.contains(d))
                .map(|d| (*d, false)),
        );
    for (dongle_id, online) in changes {
        state.console.publish(
            crate::console::StreamKey::Dongle(dongle_id),
            crate::console::ConsoleEvent::Presence {
                dongle_id,
                online,
                agent_id,
                seen_at: seen_at.clone(),
            },
        );
    }
}

async fn handle(
    state: &AppState,
    agent: AgentIdentity,
    message: AgentMessage,
) -> Result<(), sqlx::Error> {
    let agent_id = agent.agent_id;
    match message {
        AgentMessage::Hello(hello) => {
            agents::hello(&state.pool, agent_id, &hello).await?;
            let _ = state.hub.send_here(
                agent_id,
                ServerMessage::Welcome(Welcome {
                    agent_id,
                    heartbeat_secs: control_proto::DEFAULT_HEARTBEAT_SECS,
                    protocol: PROTOCOL_VERSION,
                }),
            );
            if hello.protocol < control_proto::MIN_AGENT_PROTOCOL {
                // Served all the same, as far as its protocol goes; the agent logs this, and the
                // agents page says so.
                let _ = state.hub.send_here(
                    agent_id,
                    ServerMessage::Error {
                        code: "agent_too_old".into(),
                        message: format!(
                            "this server supports agents of control protocol {} or later fully, and \
                             this agent speaks {}: upgrade bridge-agent",
                            control_proto::MIN_AGENT_PROTOCOL,
                            hello.protocol
                        ),
                    },
                );
            }
            // Commands this agent took before and has not ended may have been lost with its last
            // connection: they go to it again (it never runs a command id twice).
            commands::dispatch::agent_connected(&state.command_services(), agent_id).await;
            // The group sides it serves, with the positions to number its frames from.
            state.relay.agent_changed(agent, true).await;
        }
        AgentMessage::Heartbeat => {
            if !agents::heartbeat_if_authorised(&state.pool, agent_id, state.config.agent_token_ttl)
                .await?
            {
                state.hub.kick(agent_id).await;
                return Ok(());
            }
        }
        AgentMessage::Devices(devices) => {
            let before = present_dongles(&state.pool, agent_id).await?;
            match agents::report_devices(
                &state.pool,
                agent,
                &devices.dongles,
                state.config.rate_limits.new_dongle_ids_per_user,
            )
            .await
            {
                Ok(owned) => {
                    let after = present_dongles(&state.pool, agent_id).await?;
                    publish_presence(state, agent_id, &before, &after);
                    dongles::hand_out_tokens(
                        &state.pool,
                        &state.keys,
                        &state.hub,
                        agent_id,
                        &owned,
                    )
                    .await;
                    // Queued commands for a dongle this agent now serves can go out at once.
                    state.command_wake.notify_one();
                    // The group sides it serves may have changed with what it sees.
                    state.relay.agent_changed(agent, false).await;
                }
                Err(agents::ReportError::Db(e)) => return Err(e),
                Err(e) => {
                    let _ = state.hub.send_here(
                        agent_id,
                        ServerMessage::Error {
                            code: "bad_report".into(),
                            message: e.to_string(),
                        },
                    );
                }
            }
        }
        AgentMessage::Reply(reply) => {
            state.hub.complete(agent_id, reply.id, reply.result);
        }
        AgentMessage::CommandResult(result) => {
            // Stored once, acknowledged every time (a duplicate or late result changes nothing).
            commands::record_result(&state.command_services(), agent, result).await?;
        }
        AgentMessage::Event(control_proto::Event::HostOutput {
            run_id,
            device_id,
            chunk,
        }) => {
            crate::host_commands::output(state.dongle_services(), agent, run_id, device_id, &chunk)
                .await?;
        }
        AgentMessage::CliTelemetry(report) => {
            // The same: one row however often it comes, acknowledged every time.
            cli_telemetry::record_uart(
                &state.pool,
                &state.hub,
                &state.console,
                agent,
                report,
                state.config.command_output_cap,
            )
            .await?;
        }
        AgentMessage::Event(control_proto::Event::TokenRejected { device_id }) => {
            dongles::token_rejected(&state.pool, agent_id, agent.user_id, device_id).await?;
        }
        AgentMessage::Event(control_proto::Event::TokenAccepted { device_id }) => {
            if dongles::token_accepted(&state.pool, agent_id, agent.user_id, device_id).await? {
                // The dongle relays again: its groups' sides go back to this agent.
                state.relay.agent_changed(agent, false).await;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_budget_lets_a_window_through_and_defers_the_rest() {
        let start = tokio::time::Instant::now();
        let mut budget = MessageBudget {
            per_sec: 3,
            window_start: start,
            used: 0,
        };
        assert_eq!(budget.take(start), None);
        assert_eq!(budget.take(start), None);
        assert_eq!(budget.take(start + Duration::from_millis(10)), None);
        // The fourth in the first second waits for the second window, and counts in it.
        let second = start + Duration::from_secs(1);
        assert_eq!(budget.take(start + Duration::from_millis(20)), Some(second));
        assert_eq!(budget.take(second), None);
        assert_eq!(budget.take(second), None);
        assert_eq!(budget.take(second), Some(second + Duration::from_secs(1)));
        // A quiet agent starts a fresh window.
        let later = start + Duration::from_secs(10);
        assert_eq!(budget.take(later), None);
    }
}
