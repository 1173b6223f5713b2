//! Network diagnostics on the workstation of the agent serving a dongle (v0.7's host commands): the
//! interface list, `ip -brief address`, a ping of a LAN dongle's address. The owner names one of the
//! allow-listed diagnostics (`control_proto::HostCommand`), nothing more: the agent fills in the
//! address and runs no shell. Its output streams to the dongle's console (`host_output` events) while it
//! runs, and whole it joins the dongle's history of commands (`cli_telemetry`, source `host`) and the
//! answer. The agent's owner may turn them off (`bridge-agent run --no-host-commands`).

use control_proto::{DeviceId, HostCommand, ReplyOk, RequestBody};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agents::AgentIdentity;
use crate::audit::{self, Entry, Target};
use crate::auth::Caller;
use crate::client::ClientInfo;
use crate::console::{ConsoleEvent, StreamKey};
use crate::dongles;
use crate::dongles::{DongleError, Services};
use crate::error_code::ErrorCode;

/// How long the server waits for a diagnostic (the agent stops one after 10 s).
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// The longest piece of streamed output published at once.
const MAX_CHUNK: usize = 4096;

/// `POST /dongles/{id}/host-commands`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct HostCommandRequest {
    /// `interfaces`, `ip addr` or `ping` (a LAN dongle's own address).
    pub command: String,
}

/// A diagnostic that ran.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HostCommandRun {
    pub run_id: Uuid,
    pub command: String,
    pub exit_code: i32,
    pub output: String,
    /// The output was cut at the agent's limit.
    pub truncated: bool,
}

/// Runs `req` on the workstation of the agent serving the caller's dongle `dongle_id`.
pub async fn run(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    req: &HostCommandRequest,
) -> Result<HostCommandRun, DongleError> {
    let dongle = dongles::owned_or_404(svc.pool, caller.user_id(), dongle_id).await?;
    let command = HostCommand::from_name(&req.command).ok_or(DongleError::NotAllowed {
        field: "command",
        message: "Not a host command: interfaces, ip addr or ping.",
    })?;
    crate::rate_limit::agent_request(svc.pool, svc.rate_limits, caller.user_id()).await?;
    let agent_id = dongles::owned::serving_agent_or_offline(
        svc.pool,
        svc.hub,
        dongle.id,
        caller.user_id(),
        caller.agent_id(),
    )
    .await?;
    let run_id = Uuid::new_v4();
    let reply = svc
        .hub
        .request(
            agent_id,
            RequestBody::HostCommand {
                run_id,
                device_id: dongle.device_id,
                command,
            },
            WAIT,
        )
        .await;
    let (exit_code, output, truncated) = match reply {
        Ok(ReplyOk::HostCommandDone {
            exit_code,
            output,
            truncated,
        }) => (exit_code, output, truncated),
        Ok(other) => {
            tracing::warn!(%agent_id, reply = ?other, "an agent answered a host command oddly");
            return Err(DongleError::UnexpectedReply(
                "The agent answered the host command with something else than its output.",
            ));
        }
        // A refusal (host commands turned off, ping of a USB dongle) is COMMAND_NOT_ALLOWED with the
        // agent's reason; an agent too old for the request CONFLICT, answered by the control writer
        // without sending it.
        Err(e) => {
            return Err(DongleError::Request {
                error: e,
                refused: ErrorCode::CommandNotAllowed,
            });
        }
    };
    let entry = Entry::new("host.command", Some(caller.user_id()), client)
        .target(Target {
            kind: "dongle",
            id: dongle.id.to_string(),
        })
        .details(serde_json::json!({
            "agent_id": agent_id,
            "run_id": run_id,
            "command": command.name(),
            "exit_code": exit_code,
        }));
    audit::record(svc.pool, entry).await?;
    crate::cli_telemetry::record(
        svc.pool,
        svc.console,
        dongle.id,
        Some(caller.user_id()),
        crate::cli_telemetry::Entry {
            source: crate::cli_telemetry::Source::Host,
            report_id: run_id,
            command: command.name(),
            output: &output,
            exit_code: Some(exit_code),
            truncated,
            error: exit_code != 0,
        },
        svc.command_output_cap,
    )
    .await?;
    Ok(HostCommandRun {
        run_id,
        command: command.name().to_string(),
        exit_code,
        output,
        truncated,
    })
}

/// A piece of a running diagnostic's output from `agent`, published on the dongle's console when the
/// agent may speak for that dongle.
pub async fn output(
    svc: Services<'_>,
    agent: AgentIdentity,
    run_id: Uuid,
    device_id: DeviceId,
    chunk: &str,
) -> Result<(), sqlx::Error> {
    let Some(dongle_id) = dongles::owned::spoken_for_by(svc.pool, agent, device_id).await? else {
        return Ok(());
    };
    let (chunk, _) = crate::db::storable_text(chunk, MAX_CHUNK);
    svc.console.publish(
        StreamKey::Dongle(dongle_id),
        ConsoleEvent::HostOutput {
            dongle_id,
            run_id,
            chunk,
        },
    );
    Ok(())
}
