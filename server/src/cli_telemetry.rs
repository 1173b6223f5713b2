//! The history of commands run on each dongle, wherever they were typed (SPEC 4.2): on its UART
//! console, which the dongle reports unasked (REMP CLI_TELEMETRY) and its agent forwards
//! (`cli_telemetry` on the control WebSocket), and remotely through the API (a command's end, from
//! `commands`). Both become rows of `cli_telemetry` and `cli_telemetry` events on the dongle's console.
//!
//! A UART report is taken only from an agent of the dongle's owner that sees the dongle now (the agent
//! checked that the dongle signed it with its token or session MAC); it is acknowledged in any case,
//! so that the agent stops sending it. A report sent twice is one row (its `report_id`). The newest
//! [`KEPT_PER_DONGLE`] rows of a dongle are kept; writing trims the rest. NUL characters, which
//! PostgreSQL text cannot hold, are stripped, and command and output are capped.

use chrono::{DateTime, Utc};
use control_proto::{CliTelemetry, ServerMessage};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agents::AgentIdentity;
use crate::agents::hub::AgentHub;
use crate::console::{self, Console, ConsoleEvent, StreamKey};
use crate::db::storable_text;
use crate::dongles::owned::spoken_for_by;
use crate::paging::{PageInfo, Paging};

/// The rows kept per dongle.
pub const KEPT_PER_DONGLE: i64 = 1000;
/// The longest command line stored, in bytes (the table checks it too).
pub const MAX_COMMAND_LEN: usize = 4096;

/// Where a command was typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The dongle's UART console.
    Uart,
    /// The API (a command sent through the server).
    Remote,
    /// A network diagnostic on the serving agent's workstation (`host_commands`).
    Host,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Uart => "uart",
            Source::Remote => "remote",
            Source::Host => "host",
        }
    }
}

/// One command and its outcome, to record.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub source: Source,
    pub report_id: Uuid,
    pub command: &'a str,
    pub output: &'a str,
    pub exit_code: Option<i32>,
    pub truncated: bool,
    pub error: bool,
}

/// A row as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct TelemetryView {
    pub id: Uuid,
    /// `uart` (typed on the dongle's console), `remote` (sent through the API) or `host` (a network
    /// diagnostic on the serving agent's workstation).
    pub source: String,
    pub command: String,
    pub output: String,
    pub exit_code: Option<i32>,
    /// The output was cut, by the dongle or at the server's cap.
    pub truncated: bool,
    /// The command could not run.
    pub error: bool,
    pub created_at: DateTime<Utc>,
}

/// A page of a dongle's history, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TelemetryPage {
    pub items: Vec<TelemetryView>,
    #[serde(flatten)]
    pub page: PageInfo,
}

/// Records `entry` for dongle `dongle_id` of `owner`, trims the dongle's history, and publishes it on
/// the dongle's console. False when the report was recorded before (nothing changes).
pub async fn record(
    pool: &PgPool,
    console: &Console,
    dongle_id: Uuid,
    owner: Option<Uuid>,
    entry: Entry<'_>,
    output_cap: usize,
) -> Result<bool, sqlx::Error> {
    let (command, _) = storable_text(entry.command, MAX_COMMAND_LEN);
    let (output, cut) = storable_text(entry.output, output_cap);
    let truncated = entry.truncated || cut;
    let mut tx = pool.begin().await?;
    let inserted: Option<DateTime<Utc>> = sqlx::query_scalar(
        "INSERT INTO cli_telemetry \
           (dongle_id, owner_user_id, source, report_id, command, output, exit_code, truncated, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (dongle_id, report_id) DO NOTHING RETURNING created_at",
    )
    .bind(dongle_id)
    .bind(owner)
    .bind(entry.source.as_str())
    .bind(entry.report_id)
    .bind(&command)
    .bind(&output)
    .bind(entry.exit_code)
    .bind(truncated)
    .bind(entry.error)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(created_at) = inserted else {
        return Ok(false);
    };
    sqlx::query(
        "DELETE FROM cli_telemetry WHERE id IN ( \
           SELECT id FROM cli_telemetry WHERE dongle_id = $1 \
           ORDER BY created_at DESC, id DESC OFFSET $2)",
    )
    .bind(dongle_id)
    .bind(KEPT_PER_DONGLE)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    console.publish(
        StreamKey::Dongle(dongle_id),
        ConsoleEvent::CliTelemetry {
            dongle_id,
            source: entry.source.as_str(),
            command,
            output,
            exit_code: entry.exit_code,
            truncated,
            error: entry.error,
            at: console::timestamp(created_at),
        },
    );
    Ok(true)
}

/// A UART report from `agent`: recorded when the agent may speak for the dongle, acknowledged in any
/// case. True when it was recorded now.
pub async fn record_uart(
    pool: &PgPool,
    hub: &AgentHub,
    console: &Console,
    agent: AgentIdentity,
    report: CliTelemetry,
    output_cap: usize,
) -> Result<bool, sqlx::Error> {
    let mut recorded = false;
    if report.source == Source::Uart.as_str()
        && let Some(dongle_id) = spoken_for_by(pool, agent, report.device_id).await?
    {
        recorded = record(
            pool,
            console,
            dongle_id,
            Some(agent.user_id),
            Entry {
                source: Source::Uart,
                report_id: report.report_id,
                command: &report.command,
                output: &report.output,
                exit_code: Some(report.exit_code),
                truncated: report.truncated,
                error: report.error,
            },
            output_cap,
        )
        .await?;
    } else {
        tracing::debug!(agent_id = %agent.agent_id, "a UART report for no dongle this agent serves: acknowledged, ignored");
    }
    let _ = hub
        .send(
            agent.agent_id,
            ServerMessage::CliTelemetryAck {
                report_id: report.report_id,
            },
        )
        .await;
    Ok(recorded)
}

/// A page of dongle `dongle_id`'s history, newest first (the caller checked ownership).
pub async fn list(
    pool: &PgPool,
    dongle_id: Uuid,
    paging: Paging,
) -> Result<TelemetryPage, sqlx::Error> {
    let items: Vec<TelemetryView> = sqlx::query_as(
        "SELECT id, source, command, output, exit_code, truncated, error, created_at \
         FROM cli_telemetry WHERE dongle_id = $1 \
         ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
    )
    .bind(dongle_id)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM cli_telemetry WHERE dongle_id = $1")
        .bind(dongle_id)
        .fetch_one(pool)
        .await?;
    Ok(TelemetryPage {
        items,
        page: paging.info(total),
    })
}
