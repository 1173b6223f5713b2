//! Commands (SPEC 3.7) end to end: the allow-list, the dispatcher sending queued commands to the test
//! agent, results stored once and always acknowledged, the sweeper's timeouts (also across a restart),
//! re-delivery to a reconnecting agent, and who may see what.

use crate::common;

use std::time::Duration;

use bridge_server::config::ServerConfig;
use common::agent::{self, Answer, CommandPlan, TestAgent};
use common::dongle::{self, Owner, audit_count};
use common::{Answer as Reply, TestApp, read, spawn_app_with};
use control_proto::{AgentMessage, CommandOutcome, CommandResult};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

const DEV: &str = "00000000000000e1";

/// Short intervals so that timeouts and retries happen within a test.
fn fast(c: &mut ServerConfig) {
    c.command_poll_interval = Duration::from_millis(100);
    c.command_grace = Duration::from_millis(200);
    c.dongle_request_timeout = Duration::from_secs(1);
}

async fn app(pool: PgPool) -> TestApp {
    spawn_app_with(pool, fast).await
}

async fn invoke(owner: &Owner, body: Value) -> Reply {
    read(
        owner
            .client
            .post_json(&format!("/dongles/{}/commands", owner.dongle_id), body)
            .await,
    )
    .await
}

async fn queued(owner: &Owner, body: Value) -> Uuid {
    let answer = invoke(owner, body).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    assert_eq!(answer.json["status"], "queued");
    answer.json["command_id"].as_str().unwrap().parse().unwrap()
}

async fn command(owner: &Owner, id: Uuid) -> Value {
    let answer = read(
        owner
            .client
            .get(&format!("/dongles/{}/commands/{id}", owner.dongle_id))
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    answer.json
}

/// Waits until the command's status is `status` and returns the command.
async fn until_status(owner: &Owner, id: Uuid, status: &str) -> Value {
    agent::wait_until(|| async { command(owner, id).await["status"] == status }).await;
    command(owner, id).await
}

fn acks(agent: &TestAgent, id: Uuid) -> usize {
    agent
        .seen
        .lock()
        .unwrap()
        .acks
        .iter()
        .filter(|a| **a == id)
        .count()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_command_runs_and_its_output_is_stored(pool: PgPool) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let id = queued(&owner, json!({"command": "remote status"})).await;
    let done = until_status(&owner, id, "done").await;
    assert_eq!(done["command_id"], id.to_string());
    assert_eq!(done["command"], "remote status");
    assert_eq!(done["args"], json!([]));
    assert_eq!(done["outcome"], "done");
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["stdout"], "ran remote status\n");
    assert_eq!(done["truncated"], false);
    assert_eq!(done["timeout_ms"], 5000);
    assert!(done["started_at"].is_string() && done["finished_at"].is_string());
    assert!(done["stderr"].is_null());
    // The command id is the correlation id down to the agent, and the result was acknowledged.
    {
        let seen = owner.agent.seen.lock().unwrap();
        assert_eq!(
            seen.commands,
            vec![(id, "remote status".to_string(), false)]
        );
        assert!(seen.acks.contains(&id));
    }

    // Arguments, also given inside the command, reach the dongle as one line.
    let echo = queued(
        &owner,
        json!({"command": "echo", "args": ["hello", "world"], "timeout_ms": 2000}),
    )
    .await;
    let sleep = queued(&owner, json!({"command": "sleep 10"})).await;
    until_status(&owner, echo, "done").await;
    let slept = until_status(&owner, sleep, "done").await;
    assert_eq!(slept["args"], json!(["10"]));
    let lines: Vec<String> = owner
        .agent
        .seen
        .lock()
        .unwrap()
        .commands
        .iter()
        .map(|c| c.1.clone())
        .collect();
    assert!(lines.contains(&"echo hello world".to_string()), "{lines:?}");
    assert!(lines.contains(&"sleep 10".to_string()), "{lines:?}");

    // The list: newest first, without output.
    let list = read(
        owner
            .client
            .get(&format!("/dongles/{}/commands?per_page=2", owner.dongle_id))
            .await,
    )
    .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert_eq!(list.json["total"], 3);
    let items = list.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["command_id"], sleep.to_string());
    assert!(items[0].get("stdout").is_none());

    assert_eq!(audit_count(&app, "command.invoke").await, 3);
    assert_eq!(audit_count(&app, "command.finish").await, 3);
    let details: Value = sqlx::query_scalar(
        "SELECT details FROM audit_logs WHERE action = 'command.finish' AND details->>'command_id' = $1",
    )
    .bind(id.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(details["status"], "done");
    assert_eq!(details["agent_id"], owner.agent.agent_id.to_string());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn long_output_is_capped_and_flagged(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| {
        fast(c);
        c.command_output_cap = 1024;
    })
    .await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    owner.agent.seen.lock().unwrap().command.output = Some("é".repeat(3000));
    let id = queued(&owner, json!({"command": "version"})).await;
    let done = until_status(&owner, id, "done").await;
    let stdout = done["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), 1024, "capped on a character boundary");
    assert_eq!(done["truncated"], true);

    // The dongle's own flag is kept too.
    {
        let mut seen = owner.agent.seen.lock().unwrap();
        seen.command.output = Some("short\n".into());
        seen.command.truncated = true;
    }
    let id = queued(&owner, json!({"command": "version"})).await;
    let done = until_status(&owner, id, "done").await;
    assert_eq!(
        (done["stdout"].as_str(), &done["truncated"]),
        (Some("short\n"), &json!(true))
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn commands_off_the_allow_list_are_refused_before_they_are_queued(pool: PgPool) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    for (body, status, code, field) in [
        (
            json!({"command": "rm -rf /"}),
            403,
            "COMMAND_NOT_ALLOWED",
            "command",
        ),
        (
            json!({"command": "remote"}),
            403,
            "COMMAND_NOT_ALLOWED",
            "command",
        ),
        (
            json!({"command": "factory-reset"}),
            403,
            "COMMAND_NOT_ALLOWED",
            "command",
        ),
        (
            json!({"command": "factory-reset", "allow_dangerous": true}),
            403,
            "COMMAND_NOT_ALLOWED",
            "allow_dangerous",
        ),
        (
            json!({"command": "version", "args": ["x"]}),
            400,
            "VALIDATION_ERROR",
            "args",
        ),
        (
            json!({"command": "echo", "args": ["two words"]}),
            400,
            "VALIDATION_ERROR",
            "args",
        ),
        (
            json!({"command": "sleep", "args": ["soon"]}),
            400,
            "VALIDATION_ERROR",
            "args",
        ),
        (
            json!({"command": "sleep 60001"}),
            400,
            "VALIDATION_ERROR",
            "args",
        ),
        (
            json!({"command": "version", "timeout_ms": 50}),
            400,
            "VALIDATION_ERROR",
            "timeout_ms",
        ),
        (
            json!({"command": "version", "timeout_ms": 600000}),
            400,
            "VALIDATION_ERROR",
            "timeout_ms",
        ),
    ] {
        let answer = invoke(&owner, body.clone()).await;
        answer.assert_error(StatusCode::from_u16(status).unwrap(), code);
        assert_eq!(
            answer.json["details"]["field"], field,
            "{body}: {}",
            answer.text
        );
    }
    invoke(&owner, json!({"args": []}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert_eq!(app.count("SELECT count(*) FROM commands").await, 0);
    assert_eq!(audit_count(&app, "command.invoke").await, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(owner.agent.seen.lock().unwrap().commands.is_empty());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_dangerous_flag_is_set_only_in_development_mode(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| {
        fast(c);
        c.dev_mode = true;
    })
    .await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    // Even in development mode, only a request that asks for it explicitly.
    let refused = owner
        .client
        .post_json(
            &format!("/dongles/{}/commands", owner.dongle_id),
            json!({"command": "factory-reset"}),
        )
        .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let reset = queued(
        &owner,
        json!({"command": "factory-reset", "allow_dangerous": true}),
    )
    .await;
    // The flag goes only with the dangerous command itself.
    let version = queued(
        &owner,
        json!({"command": "version", "allow_dangerous": true}),
    )
    .await;
    until_status(&owner, reset, "done").await;
    until_status(&owner, version, "done").await;
    let mut sent = owner.agent.seen.lock().unwrap().commands.clone();
    sent.sort_by_key(|c| c.1.clone());
    assert_eq!(
        sent,
        vec![
            (reset, "factory-reset".to_string(), true),
            (version, "version".to_string(), false)
        ]
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn denied_and_failed_commands_end_as_error(pool: PgPool) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    owner.agent.seen.lock().unwrap().command = CommandPlan {
        outcome: CommandOutcome::Denied,
        exit_code: 1,
        output: Some("denied: command not allowed\n".into()),
        ..CommandPlan::default()
    };
    let id = queued(&owner, json!({"command": "uptime"})).await;
    let denied = until_status(&owner, id, "error").await;
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(denied["exit_code"], 1);
    assert_eq!(denied["stdout"], "denied: command not allowed\n");

    owner.agent.seen.lock().unwrap().command = CommandPlan {
        outcome: CommandOutcome::Error,
        exit_code: -1,
        output: Some(String::new()),
        message: Some("the dongle went away".into()),
        ..CommandPlan::default()
    };
    let id = queued(&owner, json!({"command": "uptime"})).await;
    let failed = until_status(&owner, id, "error").await;
    assert_eq!(failed["outcome"], "error");
    assert_eq!(failed["stderr"], "the dongle went away");

    // The dongle's own timeout is the command's timeout state.
    owner.agent.seen.lock().unwrap().command = CommandPlan {
        outcome: CommandOutcome::Timeout,
        exit_code: 124,
        ..CommandPlan::default()
    };
    let id = queued(&owner, json!({"command": "sleep 100"})).await;
    let timed_out = until_status(&owner, id, "timeout").await;
    assert_eq!(timed_out["outcome"], "timeout");
    assert_eq!(timed_out["exit_code"], 124);

    // An agent that refuses the command outright (not `command_accepted`): it ends as error.
    owner.agent.seen.lock().unwrap().command_answer = Answer::Refuse("journal full".into());
    let id = queued(&owner, json!({"command": "uptime"})).await;
    let refused = until_status(&owner, id, "error").await;
    assert_eq!(refused["outcome"], "refused");
    assert!(refused["stderr"].as_str().unwrap().contains("journal full"));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_sweeper_times_out_a_command_without_a_result_and_late_results_change_nothing(
    pool: PgPool,
) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    owner.agent.seen.lock().unwrap().command.send_result = false;
    let id = queued(&owner, json!({"command": "version", "timeout_ms": 300})).await;
    let running = until_status(&owner, id, "running").await;
    assert!(running["started_at"].is_string());
    let timed_out = until_status(&owner, id, "timeout").await;
    assert_eq!(timed_out["outcome"], "server_timeout");
    assert!(
        timed_out["stderr"]
            .as_str()
            .unwrap()
            .contains("no result from the agent within 300 ms"),
        "{timed_out}"
    );
    let details: Value = sqlx::query_scalar(
        "SELECT details FROM audit_logs WHERE action = 'command.finish' AND details->>'command_id' = $1",
    )
    .bind(id.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(details["by"], "sweeper");

    // The result arrives late: acknowledged, and ignored.
    owner.agent.send(AgentMessage::CommandResult(CommandResult {
        command_id: id,
        device_id: DEV.parse().unwrap(),
        outcome: CommandOutcome::Done,
        exit_code: 0,
        output: "too late\n".into(),
        truncated: false,
        message: None,
    }));
    agent::wait_until(|| async { acks(&owner.agent, id) == 1 }).await;
    let after = command(&owner, id).await;
    assert_eq!(after, timed_out);
    assert_eq!(audit_count(&app, "command.finish").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_queued_command_nobody_takes_times_out(pool: PgPool) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    owner.agent.disconnect();
    // Offline: the command waits, then times out without ever starting.
    let id = queued(&owner, json!({"command": "version", "timeout_ms": 200})).await;
    let timed_out = until_status(&owner, id, "timeout").await;
    assert!(timed_out["started_at"].is_null(), "{timed_out}");
    assert!(
        timed_out["stderr"]
            .as_str()
            .unwrap()
            .contains("no agent took the command")
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_result_sent_twice_is_stored_once(pool: PgPool) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let id = queued(&owner, json!({"command": "uptime"})).await;
    let done = until_status(&owner, id, "done").await;
    agent::wait_until(|| async { acks(&owner.agent, id) >= 1 }).await;
    let before = acks(&owner.agent, id);
    // The agent's outbox sends it again (e.g. after a reconnect), even with other content.
    for output in ["ran uptime\n", "something else\n"] {
        owner.agent.send(AgentMessage::CommandResult(CommandResult {
            command_id: id,
            device_id: DEV.parse().unwrap(),
            outcome: CommandOutcome::Error,
            exit_code: 3,
            output: output.into(),
            truncated: false,
            message: None,
        }));
    }
    agent::wait_until(|| async { acks(&owner.agent, id) == before + 2 }).await;
    assert_eq!(command(&owner, id).await, done);
    assert_eq!(audit_count(&app, "command.finish").await, 1);

    // A result for a command nobody knows is acknowledged too, so the agent's outbox drains.
    let unknown = Uuid::new_v4();
    owner.agent.send(AgentMessage::CommandResult(CommandResult {
        command_id: unknown,
        device_id: DEV.parse().unwrap(),
        outcome: CommandOutcome::Done,
        exit_code: 0,
        output: String::new(),
        truncated: false,
        message: None,
    }));
    agent::wait_until(|| async { acks(&owner.agent, unknown) == 1 }).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_reconnecting_agent_gets_its_running_command_again(pool: PgPool) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    owner.agent.seen.lock().unwrap().command.send_result = false;
    let id = queued(
        &owner,
        json!({"command": "remote stats", "timeout_ms": 10000}),
    )
    .await;
    until_status(&owner, id, "running").await;
    owner.agent.disconnect();

    // The same agent comes back: the command is delivered again, with the same id, and its result
    // ends it.
    let again = TestAgent::connect(&app.base, &owner.token).await;
    agent::wait_until(|| async {
        again
            .seen
            .lock()
            .unwrap()
            .commands
            .iter()
            .any(|c| c.0 == id)
    })
    .await;
    let done = until_status(&owner, id, "done").await;
    assert_eq!(done["stdout"], "ran remote stats\n");
    assert_eq!(owner.agent.seen.lock().unwrap().commands.len(), 1);
    let delivered = again.seen.lock().unwrap().commands.clone();
    assert_eq!(delivered, vec![(id, "remote stats".to_string(), false)]);
    assert_eq!(audit_count(&app, "command.finish").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn commands_survive_a_server_restart(pool: PgPool) {
    let app = app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    // One command the agent took and never ends; one queued while no agent is connected.
    owner.agent.seen.lock().unwrap().command.send_result = false;
    let running = queued(&owner, json!({"command": "version", "timeout_ms": 1500})).await;
    until_status(&owner, running, "running").await;
    owner.agent.disconnect();
    agent::wait_until(|| async { !app.hub().is_connected(owner.agent.agent_id).await }).await;
    let waiting = queued(&owner, json!({"command": "uptime", "timeout_ms": 10000})).await;
    let Owner {
        client,
        token,
        dongle_id,
        ..
    } = owner;
    app.stop().await;

    // A new server on the same database: the running command still times out at its deadline, taken
    // from the database alone.
    let app = spawn_app_with(pool.clone(), fast).await;
    let client = common::TestClient {
        base: app.base.clone(),
        ..client
    };
    let path = format!("/dongles/{dongle_id}/commands/{running}");
    agent::wait_until(|| async { read(client.get(&path).await).await.json["status"] == "timeout" })
        .await;
    let timed_out = read(client.get(&path).await).await.json;
    assert_eq!(timed_out["outcome"], "server_timeout");
    assert_eq!(
        read(
            client
                .get(&format!("/dongles/{dongle_id}/commands/{waiting}"))
                .await
        )
        .await
        .json["status"],
        "queued"
    );

    // The queued one goes to the agent once it connects to the new server.
    let agent = TestAgent::connect(&app.base, &token).await;
    agent.report_caps(&pool, &[(DEV, 0)]).await;
    let owner = Owner {
        client,
        user_id: Uuid::nil(),
        token,
        agent,
        dongle_id,
    };
    let done = until_status(&owner, waiting, "done").await;
    assert_eq!(done["stdout"], "ran uptime\n");
    let delivered = owner.agent.seen.lock().unwrap().commands.clone();
    assert_eq!(delivered, vec![(waiting, "uptime".to_string(), false)]);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn only_the_owner_reaches_commands(pool: PgPool) {
    let app = app(pool.clone()).await;
    let alice = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let id = queued(&alice, json!({"command": "version"})).await;
    until_status(&alice, id, "done").await;

    // Bob has a dongle of his own and an agent that also sees Alice's.
    let bob = dongle::paired(&app, "bob@example.com", "00000000000000e2", 0).await;
    bob.agent
        .report_caps(&pool, &[("00000000000000e2", 0), (DEV, 0)])
        .await;
    let http = reqwest::Client::new();
    for (method, path, body) in [
        (
            "POST",
            format!("/dongles/{}/commands", alice.dongle_id),
            json!({"command": "version"}),
        ),
        (
            "GET",
            format!("/dongles/{}/commands", alice.dongle_id),
            json!({}),
        ),
        (
            "GET",
            format!("/dongles/{}/commands/{id}", alice.dongle_id),
            json!({}),
        ),
    ] {
        let method: reqwest::Method = method.parse().unwrap();
        read(
            bob.client
                .request(method.clone(), &path)
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
        read(
            http.request(method, bob.client.api(&path))
                .bearer_auth(&bob.token)
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    }
    // Alice's command through Bob's own dongle: no such command.
    read(
        bob.client
            .get(&format!("/dongles/{}/commands/{id}", bob.dongle_id))
            .await,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    // Bob's agent cannot end Alice's commands either: a result from it is acknowledged and ignored.
    alice.agent.seen.lock().unwrap().command.send_result = false;
    let pending = queued(&alice, json!({"command": "uptime", "timeout_ms": 5000})).await;
    until_status(&alice, pending, "running").await;
    bob.agent.send(AgentMessage::CommandResult(CommandResult {
        command_id: pending,
        device_id: DEV.parse().unwrap(),
        outcome: CommandOutcome::Done,
        exit_code: 0,
        output: "forged\n".into(),
        truncated: false,
        message: None,
    }));
    agent::wait_until(|| async { acks(&bob.agent, pending) == 1 }).await;
    assert_eq!(command(&alice, pending).await["status"], "running");
    let list = read(
        bob.client
            .get(&format!("/dongles/{}/commands", bob.dongle_id))
            .await,
    )
    .await;
    assert_eq!(list.json["total"], 0);
    assert!(bob.agent.seen.lock().unwrap().commands.is_empty());
    let _ = Role::User;
}

/// The allow-list is the firmware's command set, as the firmware's own `help` lists it (the simulator is
/// the executable statement of the firmware): nothing the dongle has is missing, nothing is extra.
#[test]
fn the_allow_list_is_the_firmwares_command_set() {
    use std::collections::BTreeSet;
    let firmware: BTreeSet<String> = dongle_sim::cli::COMMANDS
        .iter()
        .map(|c| {
            c.replace(" WORDS...", "")
                .replace(" MS", "")
                .replace(" (dangerous)", "")
        })
        .collect();
    let allowed: BTreeSet<String> = bridge_server::commands::allow_list::ALLOW_LIST
        .iter()
        .map(|spec| spec.name.to_string())
        .collect();
    assert_eq!(allowed, firmware);
}
