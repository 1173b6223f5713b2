//! The control connection's life: connect, say hello, report, answer, heartbeat; and when it drops,
//! wait a jittered, growing while and do it again.

use std::sync::Arc;
use std::time::Duration;

use control_proto::{AgentMessage, Hello, PROTOCOL_VERSION, ServerMessage};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{DaemonConfig, DaemonError, Shared};
use crate::uplink::control::{self, ConnectError, ControlSocket};
use crate::uplink::ws_url;

/// How long the server has to answer `hello`.
const WELCOME_WAIT: Duration = Duration::from_secs(10);
/// The largest control message the agent reads; anything longer is a broken server.
const MAX_MESSAGE: usize = 1 << 20;

/// Connects, serves the connection until it drops, and reconnects, forever; returns only when the
/// server refuses the token.
pub(super) async fn keep_connected(
    shared: Arc<Shared>,
    config: &DaemonConfig,
) -> Result<(), DaemonError> {
    let creds = &config.credentials;
    let url = ws_url(&creds.server_url, "/ws/agent");
    let mut backoff = config.backoff.clone();
    loop {
        match control::connect(&url, &creds.agent_token, creds.ca_file.as_deref()).await {
            Ok(socket) => {
                tracing::info!(server = %creds.server_url, "connected to the server");
                let welcomed = serve(&shared, socket, &mut backoff).await;
                *shared.outbound.lock().unwrap() = None;
                shared.status.update(|s| s.connected = false);
                match welcomed {
                    Ok(()) => tracing::warn!("the connection to the server closed"),
                    Err(reason) => tracing::warn!(%reason, "the connection to the server failed"),
                }
            }
            Err(ConnectError::TokenRefused) => {
                shared
                    .status
                    .update(|s| s.last_error = Some(ConnectError::TokenRefused.to_string()));
                return Err(DaemonError::Connect(ConnectError::TokenRefused));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not connect to the server");
                shared.status.update(|s| s.last_error = Some(e.to_string()));
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(?delay, "reconnecting to the server after a pause");
        tokio::time::sleep(delay).await;
    }
}

fn hello() -> AgentMessage {
    let hostname = gethostname::gethostname().into_string().unwrap_or_default();
    // The interfaces as they are when the connection opens (a laptop that changes networks reports
    // the new ones at its next connection).
    let interfaces = crate::discovery::lan_interfaces::system_interfaces()
        .map(|all| crate::discovery::lan_interfaces::report(&all))
        .unwrap_or_default();
    AgentMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname,
        os: std::env::consts::OS.into(),
        interfaces,
    })
}

/// Serves one connection until it ends. The backoff starts over once the server has welcomed us.
async fn serve(
    shared: &Arc<Shared>,
    socket: ControlSocket,
    backoff: &mut crate::uplink::backoff::Backoff,
) -> Result<(), String> {
    let (mut sink, mut stream) = socket.split();
    send(&mut sink, &hello()).await?;
    let welcome = tokio::time::timeout(WELCOME_WAIT, async {
        while let Some(frame) = stream.next().await {
            if let Some(ServerMessage::Welcome(w)) = parse(&frame.map_err(|e| e.to_string())?)? {
                return Ok(w);
            }
        }
        Err("the server closed the connection before its welcome".to_string())
    })
    .await
    .map_err(|_| "the server did not answer hello in time".to_string())??;
    backoff.reset();
    shared.server_speaks(welcome.protocol);
    let heartbeat_secs = welcome.heartbeat_secs;
    let (tx, mut rx) = mpsc::channel::<AgentMessage>(1024);
    *shared.outbound.lock().unwrap() = Some(tx.clone());
    shared.status.update(|s| {
        s.connected = true;
        s.last_error = None;
    });
    // The server learns everything again: the dongles seen now, and every result it has not acknowledged.
    shared.devices_changed();
    for result in shared.journal.unacknowledged() {
        shared.send_result(result);
    }
    for report in shared.telemetry.unacknowledged() {
        shared.send_telemetry(report);
    }
    let period = Duration::from_secs(u64::from(heartbeat_secs.clamp(1, 60)));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(frame) = frame else { return Ok(()) };
                let frame = frame.map_err(|e| e.to_string())?;
                let message = match parse(&frame) {
                    Ok(Some(message)) => message,
                    Ok(None) => continue,
                    Err(closed) if closed.is_empty() => return Ok(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignored a message from the server");
                        // A request this agent cannot read (a newer server's) is answered at once,
                        // rather than left to the server's timeout.
                        if let Message::Text(text) = &frame
                            && text.len() <= MAX_MESSAGE
                            && let Some(reply) = control_proto::unreadable_request_reply(text.as_str())
                        {
                            send(&mut sink, &reply).await?;
                        }
                        continue;
                    }
                };
                handle(shared, message, &tx);
            }
            Some(message) = rx.recv() => send(&mut sink, &message).await?,
            _ = heartbeat.tick() => send(&mut sink, &AgentMessage::Heartbeat).await?,
        }
    }
}

/// A frame as a server message: `Ok(None)` for frames that carry none (pings), `Err("")` for a close.
fn parse(frame: &Message) -> Result<Option<ServerMessage>, String> {
    match frame {
        Message::Text(text) if text.len() <= MAX_MESSAGE => ServerMessage::from_json(text.as_str())
            .map(Some)
            .map_err(|e| format!("not a control message: {e}")),
        Message::Text(_) => Err("a control message larger than 1 MiB".into()),
        Message::Close(_) => Err(String::new()),
        _ => Ok(None),
    }
}

async fn send<S>(sink: &mut S, message: &AgentMessage) -> Result<(), String>
where
    S: SinkExt<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    sink.send(Message::Text(message.to_json().into()))
        .await
        .map_err(|e| e.to_string())
}

fn handle(shared: &Arc<Shared>, message: ServerMessage, tx: &mpsc::Sender<AgentMessage>) {
    match message {
        ServerMessage::Request(request) => {
            tracing::debug!(id = request.id, body = ?request.body, "request from the server");
            let shared = shared.clone();
            let tx = tx.clone();
            shared.clone().spawn(async move {
                let result = shared.handle_request(request.body).await;
                let reply = AgentMessage::Reply(control_proto::Reply {
                    id: request.id,
                    result,
                });
                // A connection that went away meanwhile takes the reply with it; the server has given
                // up on it by then, and a command's result is in the journal.
                let _ = tx.send(reply).await;
            });
        }
        ServerMessage::DongleToken(t) => {
            let (device_id, token) = (t.device_id, t.token);
            let shared = shared.clone();
            shared
                .clone()
                .spawn(async move { shared.store_token(device_id, token).await });
        }
        ServerMessage::CommandResultAck { command_id } => {
            // The journal syncs to disk: on a blocking thread, so that this loop goes on reading.
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = shared.journal.acknowledge(command_id) {
                    tracing::error!(%command_id, error = %e, "could not record the server's acknowledgement");
                }
            });
        }
        ServerMessage::Error { code, message } => {
            tracing::warn!(%code, %message, "the server reported an error");
        }
        ServerMessage::Groups(groups) => shared.groups_changed(groups),
        ServerMessage::Watch(watch) => shared.data.watch(&watch),
        ServerMessage::CliTelemetryAck { report_id } => shared.telemetry.acknowledged(report_id),
        ServerMessage::Welcome(_) => {}
    }
}
