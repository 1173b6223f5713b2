//! Commands on dongles (SPEC 3.7): the allow-list, queueing, results, and the dispatcher that sends
//! queued commands to agents and times out those that never end.
//!
//! The database is the queue. A command is a row of `commands`; its state only moves forward,
//! queued -> running -> done | error | timeout (a queued command may also end at once, when its result
//! overtakes the acceptance or nobody ever takes it), and every change is a conditional UPDATE on the
//! state it moves from, so racing writers (the result, the dispatcher, the sweeper, another server
//! instance) cannot move a command back or end it twice.
//!
//! Delivery to the agent is at least once: [`dispatch`] sends a queued command to an agent serving the
//! dongle, marks it running when the agent accepts it, and sends it again (to that same agent) when the
//! agent reconnects before its result arrived; the agent knows the command id and never runs it twice.
//! The result comes back as a `command_result` message on the control WebSocket; it is stored once and
//! acknowledged every time, so a duplicate or late result changes nothing but still empties the agent's
//! outbox.
//!
//! - [`allow_list`]: which commands exist, their arguments and timeouts.
//! - [`dispatch`]: the background task (dispatcher and sweeper) and the reconnect hook.

pub mod allow_list;
pub mod dispatch;

use chrono::{DateTime, Utc};
use control_proto::{CommandOutcome, CommandResult, DeviceId, ServerMessage};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agents::AgentIdentity;
use crate::audit::{self, Entry, Target};
use crate::auth::Caller;
use crate::client::ClientInfo;
use crate::console::{ConsoleEvent, StreamKey};
use crate::dongles;
use crate::dongles::DongleError;
use crate::paging::{PageInfo, Paging};
use crate::rate_limit::{LimitError, RateLimits};

use allow_list::Refusal;

/// How many unfinished commands one dongle may have; more is refused until some end.
pub const MAX_UNFINISHED_PER_DONGLE: i64 = 16;

/// `POST /dongles/:id/commands`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct InvokeRequest {
    /// An allow-listed command, e.g. `version`, `remote status`, `echo`, `sleep`. It may carry its
    /// arguments (`"sleep 100"`).
    pub command: String,
    /// The arguments, one word each.
    #[serde(default)]
    pub args: Vec<String>,
    /// How long the command may run, in milliseconds (100 up to the command's maximum; default per
    /// command, usually 5000).
    pub timeout_ms: Option<i64>,
    /// Lets a dangerous command (`factory-reset`) run. Honoured only by a server in development mode;
    /// elsewhere a request that sets it is refused (COMMAND_NOT_ALLOWED).
    #[serde(default)]
    pub allow_dangerous: bool,
}

/// The answer to `POST /dongles/:id/commands`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Queued {
    pub command_id: Uuid,
    /// `queued`.
    pub status: String,
}

/// A command as listed: everything but its output.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct CommandSummary {
    pub command_id: Uuid,
    pub dongle_id: Uuid,
    /// The allow-listed command, e.g. `remote status`.
    pub command: String,
    #[schema(value_type = Vec<String>)]
    pub args: sqlx::types::Json<Vec<String>>,
    /// `queued`, `running`, `done`, `error` or `timeout`.
    pub status: String,
    /// How the command ended as reported: `done`, `denied`, `error`, `timeout`, or `server_timeout`
    /// when the server stopped waiting; absent while it runs.
    pub outcome: Option<String>,
    pub timeout_ms: i32,
    pub exit_code: Option<i32>,
    /// The output was cut, by the dongle or at the server's cap.
    pub truncated: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One command with its output.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct CommandView {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub summary: CommandSummary,
    /// What the dongle printed.
    pub stdout: Option<String>,
    /// Why the command did not run or end as asked, as the agent or the server tells it.
    pub stderr: Option<String>,
}

/// A page of a dongle's commands, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CommandPage {
    pub items: Vec<CommandSummary>,
    #[serde(flatten)]
    pub page: PageInfo,
}

const SUMMARY_COLUMNS: &str = "id AS command_id, dongle_id, command, args, status::text AS status, \
     outcome, timeout_ms, exit_code, truncated, created_at, started_at, finished_at";

/// What the commands' API and their dispatcher use of the server.
#[derive(Clone)]
pub struct CommandServices {
    pub pool: sqlx::PgPool,
    pub hub: std::sync::Arc<crate::agents::hub::AgentHub>,
    pub console: std::sync::Arc<crate::console::Console>,
    /// Wakes the dispatcher when a command is queued or an agent connects.
    pub command_wake: std::sync::Arc<tokio::sync::Notify>,
    pub rate_limits: RateLimits,
    /// Development mode: commands flagged dangerous may run.
    pub dev_mode: bool,
    /// The most output of a command kept.
    pub command_output_cap: usize,
    /// How long a dongle has to answer a request through its agent.
    pub dongle_request_timeout: std::time::Duration,
    /// How often the dispatcher looks for due commands when nothing wakes it.
    pub command_poll_interval: std::time::Duration,
    /// How long after its timeout an unfinished command is ended by the server.
    pub command_grace: std::time::Duration,
}

/// Why a command was not queued or cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The dongle is not the caller's, or too many requests went to agents.
    #[error(transparent)]
    Dongle(#[from] DongleError),
    /// The allow-list refused the command.
    #[error("{0}.")]
    Refused(Refusal),
    #[error(
        "This dongle already has {MAX_UNFINISHED_PER_DONGLE} commands waiting or running: wait for \
         some to end."
    )]
    TooManyUnfinished,
    #[error("No such command on this dongle.")]
    NoSuchCommand,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<LimitError> for CommandError {
    fn from(e: LimitError) -> Self {
        Self::Dongle(e.into())
    }
}

fn dongle_target(dongle_id: Uuid) -> Target {
    Target {
        kind: "dongle",
        id: dongle_id.to_string(),
    }
}

/// Queues a command for the caller's dongle after the allow-list let it through, audits the invocation
/// and wakes the dispatcher. Whether an agent is online does not matter here: a queued command waits for
/// one until its timeout.
pub async fn invoke(
    svc: &CommandServices,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    req: &InvokeRequest,
) -> Result<Queued, CommandError> {
    let dongle = dongles::owned_or_404(&svc.pool, caller.user_id(), dongle_id).await?;
    if req.allow_dangerous && !svc.dev_mode {
        return Err(CommandError::Refused(Refusal::DangerousFlag));
    }
    let checked = allow_list::check(
        &req.command,
        &req.args,
        req.timeout_ms,
        svc.dev_mode && req.allow_dangerous,
    )
    .map_err(CommandError::Refused)?;
    crate::rate_limit::agent_request(&svc.pool, &svc.rate_limits, caller.user_id()).await?;
    let mut tx = svc.pool.begin().await?;
    // Counted under the dongle's row lock, so that racing requests cannot both take the last slot.
    sqlx::query("SELECT 1 FROM dongles WHERE id = $1 FOR NO KEY UPDATE")
        .bind(dongle.id)
        .execute(&mut *tx)
        .await?;
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands WHERE dongle_id = $1 AND status IN ('queued', 'running')",
    )
    .bind(dongle.id)
    .fetch_one(&mut *tx)
    .await?;
    if unfinished >= MAX_UNFINISHED_PER_DONGLE {
        return Err(CommandError::TooManyUnfinished);
    }
    let command_id: Uuid = sqlx::query_scalar(
        "INSERT INTO commands (dongle_id, user_id, command, args, timeout_ms, allow_dangerous) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(dongle.id)
    .bind(caller.user_id())
    .bind(checked.spec.name)
    .bind(sqlx::types::Json(&checked.args))
    .bind(checked.timeout_ms as i32)
    .bind(checked.allow_dangerous)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        Entry::new("command.invoke", Some(caller.user_id()), client)
            .target(dongle_target(dongle.id))
            .details(serde_json::json!({
                "command_id": command_id,
                "command": checked.spec.name,
                "args": checked.args,
                "timeout_ms": checked.timeout_ms,
                "allow_dangerous": checked.allow_dangerous,
                "via_agent": caller.agent_id().is_some(),
            })),
    )
    .await?;
    tx.commit().await?;
    publish_status(svc, dongle.id, command_id, "queued", None);
    svc.command_wake.notify_one();
    Ok(Queued {
        command_id,
        status: "queued".into(),
    })
}

/// One command of the caller's dongle, with its output.
pub async fn get(
    svc: &CommandServices,
    caller: &Caller,
    dongle_id: Uuid,
    command_id: Uuid,
) -> Result<CommandView, CommandError> {
    let dongle = dongles::owned_or_404(&svc.pool, caller.user_id(), dongle_id).await?;
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS}, stdout, stderr FROM commands \
         WHERE id = $1 AND dongle_id = $2 AND user_id = $3"
    )))
    .bind(command_id)
    .bind(dongle.id)
    .bind(caller.user_id())
    .fetch_optional(&svc.pool)
    .await?
    .ok_or(CommandError::NoSuchCommand)
}

/// The caller's commands on their dongle, newest first, without output.
pub async fn list(
    svc: &CommandServices,
    caller: &Caller,
    dongle_id: Uuid,
    paging: Paging,
) -> Result<CommandPage, CommandError> {
    let dongle = dongles::owned_or_404(&svc.pool, caller.user_id(), dongle_id).await?;
    let items: Vec<CommandSummary> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SUMMARY_COLUMNS} FROM commands WHERE dongle_id = $1 AND user_id = $2 \
         ORDER BY created_at DESC, id LIMIT $3 OFFSET $4"
    )))
    .bind(dongle.id)
    .bind(caller.user_id())
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&svc.pool)
    .await?;
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM commands WHERE dongle_id = $1 AND user_id = $2")
            .bind(dongle.id)
            .bind(caller.user_id())
            .fetch_one(&svc.pool)
            .await?;
    Ok(CommandPage {
        items,
        page: paging.info(total),
    })
}

/// How a command ends, for [`finish`].
#[derive(Debug, Clone)]
pub(crate) struct Ending<'a> {
    /// `done`, `error` or `timeout`.
    pub status: &'static str,
    /// `done`, `denied`, `error`, `timeout` (the agent's word) or `server_timeout`, `refused`, ...
    pub outcome: &'static str,
    pub exit_code: Option<i32>,
    pub stdout: Option<&'a str>,
    pub stderr: Option<&'a str>,
    pub truncated: bool,
    /// Set for a result an agent reported: only a command of that agent's user, on the device the
    /// result names, is ended. Any agent of the user may report it (the one the command went to may
    /// have been replaced, or a LAN dongle served by two workstations may have run it on either).
    pub reporter: Option<(AgentIdentity, DeviceId)>,
    /// The command ran (a result came back): a command that ends straight from queued gets a start time.
    pub started: bool,
    /// Who ended it, for the audit entry: `agent`, `dispatcher`.
    pub by: &'static str,
}

/// Ends an unfinished command and audits `command.finish`, in one transaction. Returns false, changing
/// nothing, when the command is already finished (or not the reporter's to end).
pub(crate) async fn finish(
    svc: &CommandServices,
    command_id: Uuid,
    ending: Ending<'_>,
) -> Result<bool, sqlx::Error> {
    let mut tx = svc.pool.begin().await?;
    let (agent_id, user_id, device_id) = match ending.reporter {
        Some((agent, device)) => (
            Some(agent.agent_id),
            Some(agent.user_id),
            Some(device.to_string()),
        ),
        None => (None, None, None),
    };
    let ended: Option<(Uuid, Option<Uuid>, String, Option<Uuid>)> = sqlx::query_as(
        "UPDATE commands c SET status = $2::command_status, outcome = $3, exit_code = $4, \
           stdout = $5, stderr = $6, truncated = $7, \
           started_at = CASE WHEN $10 THEN coalesce(c.started_at, now()) ELSE c.started_at END, \
           finished_at = now(), next_dispatch_at = NULL \
         FROM dongles d \
         WHERE c.id = $1 AND d.id = c.dongle_id AND c.status IN ('queued', 'running') \
           AND ($8::uuid IS NULL OR c.user_id = $8) \
           AND ($9::text IS NULL OR d.device_id = $9) \
         RETURNING c.dongle_id, c.user_id, c.command, c.agent_id",
    )
    .bind(command_id)
    .bind(ending.status)
    .bind(ending.outcome)
    .bind(ending.exit_code)
    .bind(ending.stdout)
    .bind(ending.stderr)
    .bind(ending.truncated)
    .bind(user_id)
    .bind(device_id)
    .bind(ending.started)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((dongle_id, owner, command, pinned)) = ended else {
        return Ok(false);
    };
    audit::record(
        &mut *tx,
        Entry {
            actor: owner,
            action: "command.finish",
            target: Some(dongle_target(dongle_id)),
            ip: None,
            user_agent: None,
            details: serde_json::json!({
                "command_id": command_id,
                "command": command,
                "status": ending.status,
                "outcome": ending.outcome,
                "exit_code": ending.exit_code,
                "truncated": ending.truncated,
                "agent_id": agent_id.or(pinned),
                "by": ending.by,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    publish_status(svc, dongle_id, command_id, ending.status, ending.exit_code);
    Ok(true)
}

/// Tells the dongle's live console that a command changed state.
pub(crate) fn publish_status(
    svc: &CommandServices,
    dongle_id: Uuid,
    command_id: Uuid,
    status: &str,
    exit_code: Option<i32>,
) {
    svc.console.publish(
        StreamKey::Dongle(dongle_id),
        ConsoleEvent::CommandStatus {
            dongle_id,
            command_id,
            status: status.to_string(),
            exit_code,
        },
    );
}

/// Stores a `command_result` from an agent (once: a duplicate or late one changes nothing) and always
/// acknowledges it once the database has answered, so the agent can drop it from its outbox. A result
/// the database could not take is not acknowledged; the agent sends it again.
pub async fn record_result(
    svc: &CommandServices,
    agent: AgentIdentity,
    result: CommandResult,
) -> Result<bool, sqlx::Error> {
    let (status, outcome) = match result.outcome {
        CommandOutcome::Done => ("done", "done"),
        CommandOutcome::Denied => ("error", "denied"),
        CommandOutcome::Error => ("error", "error"),
        CommandOutcome::Timeout => ("timeout", "timeout"),
    };
    let (stdout, cut) = crate::db::storable_text(&result.output, svc.command_output_cap);
    let stderr = result
        .message
        .as_deref()
        .map(|m| crate::db::storable_text(m, 4096).0)
        .filter(|m| !m.is_empty());
    let stored = finish(
        svc,
        result.command_id,
        Ending {
            status,
            outcome,
            exit_code: Some(result.exit_code),
            stdout: Some(&stdout),
            stderr: stderr.as_deref(),
            truncated: result.truncated || cut,
            reporter: Some((agent, result.device_id)),
            started: true,
            by: "agent",
        },
    )
    .await?;
    if !stored {
        tracing::debug!(agent_id = %agent.agent_id, command_id = %result.command_id,
            "a command result for no unfinished command of this agent's user: acknowledged, ignored");
    }
    let _ = svc
        .hub
        .send(
            agent.agent_id,
            ServerMessage::CommandResultAck {
                command_id: result.command_id,
            },
        )
        .await;
    // The result is stored and acknowledged; the dongle's history of commands is a view of it, and
    // does not hold the acknowledgement up.
    if stored {
        remember_in_history(svc, &result, &stdout, result.truncated || cut).await?;
    }
    Ok(stored)
}

/// A remote command that ended goes into the dongle's history of commands beside those typed on its
/// UART console (`cli_telemetry`), with its command line as the user sent it.
async fn remember_in_history(
    svc: &CommandServices,
    result: &CommandResult,
    stdout: &str,
    truncated: bool,
) -> Result<(), sqlx::Error> {
    let row: Option<(Uuid, Uuid, String, sqlx::types::Json<Vec<String>>)> =
        sqlx::query_as("SELECT dongle_id, user_id, command, args FROM commands WHERE id = $1")
            .bind(result.command_id)
            .fetch_optional(&svc.pool)
            .await?;
    let Some((dongle_id, owner, command, args)) = row else {
        return Ok(());
    };
    let line = std::iter::once(command.as_str())
        .chain(args.0.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    crate::cli_telemetry::record(
        &svc.pool,
        &svc.console,
        dongle_id,
        Some(owner),
        crate::cli_telemetry::Entry {
            source: crate::cli_telemetry::Source::Remote,
            report_id: result.command_id,
            command: &line,
            output: stdout,
            exit_code: Some(result.exit_code),
            truncated,
            error: !matches!(result.outcome, CommandOutcome::Done),
        },
        svc.command_output_cap,
    )
    .await?;
    Ok(())
}
