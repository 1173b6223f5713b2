//! The data WebSocket `/ws/data` (the messages are `control_proto::data`'s): one task per connection
//! reads the agent's binary messages and hands them to the relay, and a writer task drains the
//! connection's queue in the [`Relay`](crate::groups::relay::Relay).
//!
//! Nothing an agent sends here can make the server panic or hold more than one message: a message that
//! does not decode is counted and ignored, and after `max_malformed` of them the connection is closed;
//! text frames count as malformed (the data plane is binary only); the socket refuses messages over
//! `control_proto::data::MAX_MESSAGE_LEN`. The reader waits while a group's pipe is busy, which is the
//! agent's backpressure: it keeps its frames until they are acknowledged.

use axum::extract::ws::{Message, WebSocket};
use control_proto::data::AnyMessage;
use futures::{SinkExt, StreamExt};

use super::relay::Inbound;
use crate::agents::{self, AgentIdentity};
use crate::monitor::MonitorIngest;
use crate::state::AppState;

/// How many messages in a row may name groups or dongles the agent does not serve (a group just
/// deactivated, or a dongle just unplugged, is still named for a moment by an honest agent) before the
/// connection closes.
const MAX_REFUSED_IN_A_ROW: u32 = 100;
/// The most queued messages the writer puts in one write to the socket.
const WRITE_BATCH: usize = 64;

/// How long a connection whose writer ended goes on reading what the agent sent before.
const WRITER_GONE_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves one agent's data connection until either side closes it, the agent's token stops being
/// valid, or a newer data connection of the same agent replaces it.
pub async fn serve(state: AppState, agent: AgentIdentity, socket: WebSocket) {
    let agent_id = agent.agent_id;
    let relay = state.relay.clone();
    let registration = relay.connect(agent).await;
    let conn_id = registration.conn_id;
    let mut rx = registration.rx;
    let (mut sink, mut stream) = socket.split();
    let mut writer = tokio::spawn(async move {
        // What is queued when the writer wakes goes out in one write: with many groups on one
        // connection, a write per message was most of the relay's cost in system calls.
        let mut queued = Vec::with_capacity(WRITE_BATCH);
        // The messages of the write, kept only while a benchmark traces hops.
        let mut traced = Vec::new();
        'writing: while rx.recv_many(&mut queued, WRITE_BATCH).await > 0 {
            for message in queued.drain(..) {
                let message = axum::body::Bytes::from(message);
                if hops::enabled() {
                    traced.push(message.clone());
                }
                if sink.feed(Message::Binary(message)).await.is_err() {
                    break 'writing;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
            for message in traced.drain(..) {
                hops::mark_message(hops::Hop::ServerSent, &message);
            }
        }
        let _ = sink.close().await;
    });
    tracing::info!(%agent_id, conn_id, "data plane connected");
    let max_malformed = relay.settings().max_malformed;
    let mut malformed = 0u32;
    let mut recheck = tokio::time::interval(relay.settings().auth_recheck);
    recheck.tick().await;
    let mut token = agents::TokenCheck::new(agent_id);
    // Messages in a row for groups this agent does not serve: past the limit, the connection closes.
    let mut refused = 0u32;
    let mut monitor_ingest = MonitorIngest::new(agent);
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            // What the agent sent is read before anything ends the connection: its last
            // acknowledgements come just before it closes, and the writer may see the socket end first.
            biased;
            frame = stream.next() => {
                // Against an agent that never pauses, which would keep this branch first for ever: once
                // the writer ended, what had arrived is read for a moment more, then the loop ends.
                if writer.is_finished() {
                    let until = *drain_until.get_or_insert_with(|| tokio::time::Instant::now() + WRITER_GONE_DRAIN);
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                }
                let bytes = match frame {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Text(_))) => {
                        relay.malformed();
                        malformed += 1;
                        if malformed > max_malformed {
                            tracing::warn!(%agent_id, "closing a data connection: too many malformed messages");
                            break;
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                };
                // A token revoked or expired behind this connection's back ends it at the next
                // message, a second or more after the last check, not only at the periodic one.
                if !token.still_valid(&state.pool, false).await {
                    break;
                }
                hops::mark_message(hops::Hop::ServerRead, &bytes);
                let accepted = match AnyMessage::decode(&bytes) {
                    Ok(AnyMessage::Group(message)) => Ok(relay.from_agent(agent, Inbound::of(&message)).await),
                    Ok(AnyMessage::Monitor(monitor)) => {
                        match monitor_ingest.publish(&state.pool, &state.console, monitor).await {
                            Ok(allowed) => Ok(allowed),
                            // A console view missed for a moment: nothing to hold the agent to.
                            Err(e) => {
                                tracing::debug!(%agent_id, error = %e, "could not check a MONITOR message");
                                Ok(true)
                            }
                        }
                    }
                    Err(e) => Err(e),
                };
                match accepted {
                    Ok(accepted) => {
                        if accepted {
                            refused = 0;
                        } else {
                            refused += 1;
                            if refused > MAX_REFUSED_IN_A_ROW {
                                tracing::warn!(%agent_id, "closing a data connection: too many messages for groups or dongles it does not serve");
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        relay.malformed();
                        malformed += 1;
                        tracing::debug!(%agent_id, error = %e, "ignored a malformed data message");
                        if malformed > max_malformed {
                            tracing::warn!(%agent_id, "closing a data connection: too many malformed messages");
                            break;
                        }
                    }
                }
            }
            _ = recheck.tick() => {
                if !token.still_valid(&state.pool, true).await {
                    break;
                }
            }
            // The relay dropped the queue: a newer connection replaced this one, or the server stops.
            _ = &mut writer => break,
        }
    }
    relay.disconnect(agent, conn_id).await;
    writer.abort();
    tracing::info!(%agent_id, conn_id, "data plane disconnected");
}
