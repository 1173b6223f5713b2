//! The command dispatcher and sweeper: one background task per server instance, driven by the
//! `commands` table rather than by memory, so that several instances share the work and a restarted one
//! picks up where the last one stopped.
//!
//! Each pass (every `command_poll_interval`, or at once when a handler or a reconnecting agent wakes it):
//! 1. the sweeper ends every unfinished command past its deadline, `started_at` (or `created_at` while
//!    queued) + `timeout_ms` + `command_grace`, as `timeout`: all of it comes from the row, so a command
//!    dispatched before a restart still times out after it;
//! 2. the dispatcher claims due rows (`next_dispatch_at <= now()`, `FOR UPDATE SKIP LOCKED`, pushing
//!    `next_dispatch_at` out by a lease so another instance leaves them alone) and sends each to an agent
//!    through [`crate::agents::hub::AgentHub`]: a queued command to any connected agent of the owner that
//!    serves the dongle (the one it went to before, first), a running one only to the agent that accepted
//!    it. On `command_accepted` the command is running and `next_dispatch_at` is cleared; when no agent
//!    could take it, it is tried again after a poll interval.
//!
//! [`agent_connected`] makes an agent's unfinished commands due again when it (re)connects: it may have
//! lost them with its connection, and it never runs a command id twice.

use std::sync::Arc;
use std::time::Duration;

use control_proto::{ReplyErrorCode, ReplyOk, RequestBody};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{CommandServices, Ending, finish};
use crate::agents::hub::RequestError;
use crate::audit::{self, Entry, Target};
use crate::dongles;

/// Commands being sent at once by one instance.
const MAX_IN_FLIGHT: usize = 32;

/// Runs the sweeper and the dispatcher until `shutdown`, then lets the sends in flight end.
pub async fn run(svc: CommandServices, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(svc.command_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = svc.command_wake.notified() => {}
        }
        if let Err(e) = sweep(&svc).await {
            tracing::warn!(error = %e, "the command sweeper failed; it tries again");
        }
        let free = permits.available_permits();
        if free == 0 {
            continue;
        }
        let claimed = match claim(&svc, free as i64).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim commands to dispatch; trying again");
                continue;
            }
        };
        for command in claimed {
            // Never fails: no more rows were claimed than permits were free, and only this loop takes
            // them. A row left over would be sent after its lease anyway.
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            let svc = svc.clone();
            tokio::spawn(async move {
                let id = command.id;
                if let Err(e) = dispatch_one(&svc, command).await {
                    tracing::warn!(command_id = %id, error = %e, "dispatching a command failed; it is retried");
                }
                drop(permit);
            });
        }
    }
    // A send cut between the agent's acceptance and its record would only be repeated, but waiting a
    // little keeps a clean shutdown clean.
    let wait = svc.dongle_request_timeout + Duration::from_secs(1);
    let _ = tokio::time::timeout(wait, permits.acquire_many(MAX_IN_FLIGHT as u32)).await;
}

/// Makes the unfinished commands last sent to `agent_id` due at once, and wakes the dispatcher: an agent
/// that (re)connects gets again what it may have lost with its connection.
pub async fn agent_connected(svc: &CommandServices, agent_id: Uuid) {
    let due = sqlx::query(
        "UPDATE commands SET next_dispatch_at = now() \
         WHERE agent_id = $1 AND status IN ('queued', 'running')",
    )
    .bind(agent_id)
    .execute(&svc.pool)
    .await;
    if let Err(e) = due {
        tracing::warn!(%agent_id, error = %e, "could not make an agent's commands due again");
    }
    svc.command_wake.notify_one();
}

/// A row claimed for sending.
#[derive(Debug, sqlx::FromRow)]
struct Claimed {
    id: Uuid,
    dongle_id: Uuid,
    user_id: Option<Uuid>,
    command: String,
    args: sqlx::types::Json<Vec<String>>,
    timeout_ms: i32,
    allow_dangerous: bool,
    status: String,
    agent_id: Option<Uuid>,
}

/// Claims up to `limit` due commands for this instance for a lease long enough for one send.
async fn claim(svc: &CommandServices, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let lease = svc.dongle_request_timeout + Duration::from_secs(5);
    sqlx::query_as(
        "UPDATE commands c SET next_dispatch_at = now() + make_interval(secs => $2), \
           dispatch_attempts = c.dispatch_attempts + 1 \
         FROM (SELECT id FROM commands WHERE status IN ('queued', 'running') \
                 AND next_dispatch_at <= now() \
               ORDER BY next_dispatch_at, created_at LIMIT $1 FOR UPDATE SKIP LOCKED) due \
         WHERE c.id = due.id \
         RETURNING c.id, c.dongle_id, c.user_id, c.command, c.args, c.timeout_ms, c.allow_dangerous, \
           c.status::text AS status, c.agent_id",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(&svc.pool)
    .await
}

/// Sends the command again after `delay`, unless it finished meanwhile.
async fn retry_later(svc: &CommandServices, id: Uuid, delay: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE commands SET next_dispatch_at = now() + make_interval(secs => $2) \
         WHERE id = $1 AND status IN ('queued', 'running')",
    )
    .bind(id)
    .bind(delay.as_secs_f64())
    .execute(&svc.pool)
    .await?;
    Ok(())
}

/// Ends a command the server cannot deliver, with the reason as stderr.
async fn give_up(
    svc: &CommandServices,
    id: Uuid,
    outcome: &'static str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    finish(
        svc,
        id,
        Ending {
            status: "error",
            outcome,
            exit_code: None,
            stdout: None,
            stderr: Some(reason),
            truncated: false,
            reporter: None,
            started: false,
            by: "dispatcher",
        },
    )
    .await?;
    Ok(())
}

async fn dispatch_one(svc: &CommandServices, command: Claimed) -> Result<(), sqlx::Error> {
    let retry = svc.command_poll_interval;
    let Some(user_id) = command.user_id else {
        return give_up(
            svc,
            command.id,
            "not_owned",
            "the user who queued the command no longer exists",
        )
        .await;
    };
    let Some(dongle) = dongles::owned(&svc.pool, user_id, command.dongle_id).await? else {
        return give_up(
            svc,
            command.id,
            "not_owned",
            "the dongle is no longer paired to the user who queued the command",
        )
        .await;
    };
    // A command an agent accepted goes again only to that agent, which knows its id; a queued one may
    // go to any agent of the owner that serves the dongle, the one it went to before first.
    let agent = if command.status == "running" {
        match command.agent_id {
            Some(a) if svc.hub.is_connected(a).await => Some(a),
            _ => None,
        }
    } else {
        dongles::serving_agent(&svc.pool, &svc.hub, dongle.id, user_id, command.agent_id).await?
    };
    let Some(agent_id) = agent else {
        return retry_later(svc, command.id, retry).await;
    };
    let pinned = sqlx::query(
        "UPDATE commands SET agent_id = $2 WHERE id = $1 AND status IN ('queued', 'running')",
    )
    .bind(command.id)
    .bind(agent_id)
    .execute(&svc.pool)
    .await?;
    if pinned.rows_affected() == 0 {
        // It finished meanwhile (its result, or the sweeper).
        return Ok(());
    }
    let mut line = command.command.clone();
    for arg in command.args.iter() {
        line.push(' ');
        line.push_str(arg);
    }
    let reply = svc
        .hub
        .request(
            agent_id,
            RequestBody::Command {
                command_id: command.id,
                device_id: dongle.device_id,
                line,
                timeout_ms: command.timeout_ms.max(0) as u64,
                allow_dangerous: command.allow_dangerous,
            },
            svc.dongle_request_timeout,
        )
        .await;
    match reply {
        Ok(ReplyOk::CommandAccepted) => {
            sqlx::query(
                "UPDATE commands SET status = 'running', started_at = coalesce(started_at, now()), \
                   next_dispatch_at = NULL \
                 WHERE id = $1 AND status IN ('queued', 'running')",
            )
            .bind(command.id)
            .execute(&svc.pool)
            .await?;
            super::publish_status(svc, command.dongle_id, command.id, "running", None);
            Ok(())
        }
        Ok(other) => {
            tracing::warn!(%agent_id, command_id = %command.id, reply = ?other,
                "an agent answered a command with something else than command_accepted");
            retry_later(svc, command.id, retry).await
        }
        Err(RequestError::Failed(e)) if e.code == ReplyErrorCode::Unsupported => {
            give_up(
                svc,
                command.id,
                "unsupported",
                "the agent serving the dongle does not run commands: update the agent",
            )
            .await
        }
        Err(RequestError::Failed(e)) if e.code == ReplyErrorCode::Refused => {
            let reason = format!(
                "the agent refused the command: {}",
                dongles::reply_reason(&e.message)
            );
            give_up(svc, command.id, "refused", &reason).await
        }
        Err(e) => {
            tracing::debug!(%agent_id, command_id = %command.id, error = %e,
                "a command could not be handed to its agent yet");
            retry_later(svc, command.id, retry).await
        }
    }
}

/// A command the sweeper ended.
#[derive(Debug, sqlx::FromRow)]
struct Expired {
    id: Uuid,
    dongle_id: Uuid,
    user_id: Option<Uuid>,
    command: String,
    agent_id: Option<Uuid>,
    timeout_ms: i32,
    started: bool,
}

/// Ends every unfinished command past its deadline as `timeout`, and audits each. Returns how many.
pub async fn sweep(svc: &CommandServices) -> Result<usize, sqlx::Error> {
    let mut tx = svc.pool.begin().await?;
    let expired: Vec<Expired> = sqlx::query_as(
        "UPDATE commands SET status = 'timeout', outcome = 'server_timeout', finished_at = now(), \
               next_dispatch_at = NULL, \
               stderr = CASE WHEN started_at IS NULL \
                 THEN 'no agent took the command within ' || timeout_ms || ' ms' \
                 ELSE 'no result from the agent within ' || timeout_ms || ' ms' END \
             WHERE status IN ('queued', 'running') \
               AND coalesce(started_at, created_at) + timeout_ms * interval '1 millisecond' \
                   + make_interval(secs => $1) < now() \
             RETURNING id, dongle_id, user_id, command, agent_id, timeout_ms, \
               started_at IS NOT NULL AS started",
    )
    .bind(svc.command_grace.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    for e in &expired {
        audit::record(
            &mut *tx,
            Entry {
                actor: e.user_id,
                action: "command.finish",
                target: Some(Target {
                    kind: "dongle",
                    id: e.dongle_id.to_string(),
                }),
                ip: None,
                user_agent: None,
                details: serde_json::json!({
                    "command_id": e.id,
                    "command": e.command,
                    "status": "timeout",
                    "outcome": "server_timeout",
                    "timeout_ms": e.timeout_ms,
                    "started": e.started,
                    "agent_id": e.agent_id,
                    "by": "sweeper",
                }),
            },
        )
        .await?;
    }
    tx.commit().await?;
    for e in &expired {
        super::publish_status(svc, e.dongle_id, e.id, "timeout", None);
    }
    if !expired.is_empty() {
        tracing::info!(count = expired.len(), "commands timed out without a result");
    }
    Ok(expired.len())
}
