//! Commands typed on a dongle's UART console (SPEC 4.2), as its agent reports them: stored once per
//! report, capped per dongle, shown to the owner only, and acknowledged so that the agent stops sending.

use crate::common;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::agent::{self, TestAgent, wait_until};
use common::dongle::paired;
use common::spawn_app;
use control_proto::{AgentMessage, CliTelemetry};
use reqwest::StatusCode;
use sqlx::PgPool;
use uuid::Uuid;

const DEV: &str = "00000000000000e1";

fn report(device_id: &str, command: &str, output: &str) -> CliTelemetry {
    CliTelemetry {
        report_id: Uuid::new_v4(),
        device_id: device_id.parse().unwrap(),
        source: "uart".into(),
        command: command.into(),
        output: output.into(),
        exit_code: 0,
        truncated: false,
        error: false,
    }
}

async fn rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM cli_telemetry")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_report_is_stored_once_acknowledged_and_shown_to_the_owner_only(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let sent = report(DEV, "can status", "bus ok\0\n");
    owner.agent.send(AgentMessage::CliTelemetry(sent.clone()));
    // Sent again, as an agent does after a reconnect: still one row, acknowledged both times.
    owner.agent.send(AgentMessage::CliTelemetry(sent.clone()));
    wait_until(|| async {
        owner.agent.seen.lock().unwrap().telemetry_acks == vec![sent.report_id; 2]
    })
    .await;
    assert_eq!(rows(&pool).await, 1);

    let history = owner
        .client
        .get(&format!("/dongles/{}/cli-telemetry", owner.dongle_id))
        .await;
    assert_eq!(history.status(), StatusCode::OK);
    let history: serde_json::Value = history.json().await.unwrap();
    assert_eq!(history["total"], 1);
    let item = &history["items"][0];
    assert_eq!(item["source"], "uart");
    assert_eq!(item["command"], "can status");
    assert_eq!(item["output"], "bus ok\n", "NUL stripped: {item}");

    // Somebody else sees no such dongle.
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let theirs = bob
        .get(&format!("/dongles/{}/cli-telemetry", owner.dongle_id))
        .await;
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_cannot_write_into_another_users_dongle_history(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let _owner = paired(&app, "alice@example.com", DEV, 0).await;
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, token) = agent::register(&bob).await;
    let intruder = TestAgent::connect(&app.base, &token).await;
    // Bob's agent even reports seeing the dongle: a sighting makes nobody the owner.
    intruder.report(&pool, &[DEV]).await;
    let forged = report(DEV, "factory-reset", "done\n");
    intruder.send(AgentMessage::CliTelemetry(forged.clone()));
    // Acknowledged, so that an honest agent in this position stops sending, and not stored.
    wait_until(|| async { intruder.seen.lock().unwrap().telemetry_acks == vec![forged.report_id] })
        .await;
    assert_eq!(rows(&pool).await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dongles_history_keeps_its_newest_rows(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let kept = bridge_server::cli_telemetry::KEPT_PER_DONGLE;
    // Older rows straight in the table, as if typed over weeks.
    sqlx::query(
        "INSERT INTO cli_telemetry (dongle_id, source, report_id, command, output, created_at) \
         SELECT $1, 'uart', gen_random_uuid(), 'uptime', '', now() - make_interval(secs => n) \
         FROM generate_series(1, $2) AS n",
    )
    .bind(owner.dongle_id)
    .bind(kept)
    .execute(&pool)
    .await
    .unwrap();
    let newest = report(DEV, "version", "fw\n");
    owner.agent.send(AgentMessage::CliTelemetry(newest.clone()));
    wait_until(|| async { !owner.agent.seen.lock().unwrap().telemetry_acks.is_empty() }).await;
    assert_eq!(rows(&pool).await, kept);
    let commands: Vec<String> =
        sqlx::query_scalar("SELECT command FROM cli_telemetry ORDER BY created_at DESC LIMIT 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(commands, vec!["version".to_string()]);
}
