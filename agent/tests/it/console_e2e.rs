//! CAN configuration, commands and frames sent by hand, end to end: the real server, `bridge-agent` as a
//! process, and simulated dongles on pseudo-terminals, across agent kills and server restarts.

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Agent, Dongle, Server, User, pair};
use dongle_sim::SimConfig;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

/// Polls a command until it has finished.
async fn finished(user: &User, dongle: &str, command: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        let (status, body) = user
            .get(&format!("/dongles/{dongle}/commands/{command}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if ["done", "error", "timeout"].contains(&body["status"].as_str().unwrap_or("")) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("command {command} never finished: {last}");
}

async fn wait_status(user: &User, dongle: &str, command: &str, wanted: &str) {
    for _ in 0..100 {
        let (_, body) = user
            .get(&format!("/dongles/{dongle}/commands/{command}"))
            .await;
        if body["status"] == wanted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("command {command} never reached {wanted}");
}

async fn invoke(user: &User, dongle: &str, body: Value) -> String {
    let (status, answer) = user
        .post(&format!("/dongles/{dongle}/commands"), body)
        .await;
    assert!(status.is_success(), "{status} {answer}");
    assert_eq!(answer["status"], "queued");
    answer["command_id"].as_str().unwrap().to_string()
}

/// A paired USB dongle served by a running agent.
async fn setup(server: &Server, config: Option<SimConfig>) -> (User, Dongle, Agent, String) {
    let user = server.user("alice@example.com", Role::User).await;
    let dongle = match config {
        Some(config) => {
            let dir = tempfile::tempdir().unwrap();
            let link = dir.path().join("ttyDONGLE");
            let mut config = config;
            config.state_path = dir.path().join("flash.json");
            config.link = dongle_sim::LinkConfig::Serial {
                link: Some(link.clone()),
            };
            Dongle::start(config, dir, Some(link)).await
        }
        None => Dongle::serial().await,
    };
    let mut agent = Agent::new();
    agent.login(server, &user).await;
    agent.run(&dongle.agent_args());
    let id = pair(&user, &dongle).await;
    (user, dongle, agent, id)
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn can_config_reaches_the_dongle_and_invalid_ones_do_not(pool: PgPool) {
    let server = Server::start(pool).await;
    let (user, dongle, mut agent, id) = setup(&server, None).await;
    let config = json!({
        "bitrate": 250000, "sample_point_permille": 875, "mode": "normal", "use_raw": false,
        "auto_retx": true, "tx_pause": false, "protocol_exc": false
    });
    let (status, body) = user
        .call(
            Method::PUT,
            &format!("/dongles/{id}/can-config"),
            Some(config.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], true);
    assert_eq!(body["effective"]["bitrate"], 250000);
    // 80 MHz / (prescaler * (1 + tseg1 + tseg2)) is the bitrate the dongle really uses.
    let e = &body["effective"];
    let quanta = 1 + e["tseg1"].as_u64().unwrap() + e["tseg2"].as_u64().unwrap();
    assert_eq!(
        80_000_000 / (e["prescaler"].as_u64().unwrap() * quanta),
        250_000
    );
    assert_eq!(dongle.sim.flash().can.bitrate, 250_000);
    // The same config again: the same answer.
    let (status, again) = user
        .call(
            Method::PUT,
            &format!("/dongles/{id}/can-config"),
            Some(config),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["effective"], body["effective"]);

    // Out of range: refused by the server, and nothing reaches the dongle.
    let before = dongle.sim.stats();
    let (status, body) = user
        .call(
            Method::PUT,
            &format!("/dongles/{id}/can-config"),
            Some(json!({"bitrate": 5000, "sample_point_permille": 875, "mode": "normal",
                        "use_raw": false, "auto_retx": true, "tx_pause": false, "protocol_exc": false})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "VALIDATION_ERROR");
    assert_eq!(dongle.sim.flash().can.bitrate, 250_000);
    let after = dongle.sim.stats();
    assert_eq!(before.dongle.packets_in, after.dongle.packets_in);
    agent.stop().await;
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn commands_run_on_the_dongle_with_their_output(pool: PgPool) {
    let server = Server::start(pool).await;
    let mut config = SimConfig::serial("unused");
    config.cli_output_limit = 48;
    let (user, _dongle, mut agent, id) = setup(&server, Some(config)).await;

    let command = invoke(&user, &id, json!({"command": "version", "args": []})).await;
    let done = finished(&user, &id, &command).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["exit_code"], 0);
    assert!(
        done["stdout"].as_str().unwrap().contains("dongle-sim"),
        "{done}"
    );
    assert_eq!(done["truncated"], false);

    let long = invoke(
        &user,
        &id,
        json!({"command": "echo", "args": ["a-rather-long-line", "that-the-dongle-cuts", "at-48-bytes"]}),
    )
    .await;
    let done = finished(&user, &id, &long).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["truncated"], true, "{done}");
    assert_eq!(done["stdout"].as_str().unwrap().len(), 48);

    // Not on the allow-list: refused before anything is queued.
    let (status, body) = user
        .post(
            &format!("/dongles/{id}/commands"),
            json!({"command": "rm", "args": ["-rf", "/"]}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    agent.stop().await;
    server.stop().await;
}

/// The agent is killed while the dongle runs a command: after its restart the command ends, once, in a
/// definite state, and is not run a second time.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_killed_mid_command_reports_it_once_after_restart(pool: PgPool) {
    let server = Server::start(pool).await;
    let (user, dongle, mut agent, id) = setup(&server, None).await;
    let command = invoke(
        &user,
        &id,
        json!({"command": "sleep", "args": ["1500"], "timeout_ms": 10000}),
    )
    .await;
    wait_status(&user, &id, &command, "running").await;
    agent.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.run(&dongle.agent_args());
    let done = finished(&user, &id, &command).await;
    assert_eq!(done["status"], "error", "{done}");
    assert!(
        done["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("not run again"),
        "{done}"
    );
    // The journal holds the command as delivered, so a re-sent command is not run again.
    for _ in 0..50 {
        if agent
            .exec(&["status", "--offline"], None)
            .await
            .1
            .contains("0 running, 0 results waiting")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, out, _) = agent.exec(&["status", "--offline"], None).await;
    assert!(out.contains("0 running, 0 results waiting"), "{out}");
    let runs: i64 = server
        .scalar(
            "SELECT count(*) FROM audit_logs WHERE action = 'command.finish' AND details->>'command_id' = $1",
            &command,
        )
        .await;
    assert_eq!(runs, 1, "one outcome recorded");
    agent.stop().await;
    server.stop().await;
}

/// The server restarts while the dongle runs a command: the agent keeps the result and delivers it
/// when the server is back.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_result_waits_in_the_outbox_while_the_server_restarts(pool: PgPool) {
    let server = Server::start(pool).await;
    let (user, _dongle, mut agent, id) = setup(&server, None).await;
    let command = invoke(
        &user,
        &id,
        json!({"command": "sleep", "args": ["1000"], "timeout_ms": 20000}),
    )
    .await;
    wait_status(&user, &id, &command, "running").await;
    let server = server.restart(Duration::from_millis(1500)).await;
    // Alice's session lives in PostgreSQL, so it outlives the restart.
    let done = finished(&user, &id, &command).await;
    assert_eq!(done["status"], "done", "{done}");
    assert!(
        done["stdout"].as_str().unwrap().contains("slept 1000 ms"),
        "{done}"
    );
    agent.stop().await;
    server.stop().await;
}

/// The server is killed (no shutdown, its database connections cut) while a command runs: the agent
/// finishes it meanwhile, keeps the result in its outbox, and hands it to the new server once; the
/// command ends `done`, with one finish in the audit log.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_server_killed_mid_command_gets_the_result_once_from_the_outbox(pool: PgPool) {
    let server = Server::start_crashable(&pool).await;
    let (user, _dongle, mut agent, id) = setup(&server, None).await;
    let command = invoke(
        &user,
        &id,
        json!({"command": "sleep", "args": ["800"], "timeout_ms": 20000}),
    )
    .await;
    wait_status(&user, &id, &command, "running").await;
    let server = server
        .crash_and_restart(Duration::from_millis(1500), pool.clone())
        .await;
    let done = finished(&user, &id, &command).await;
    assert_eq!(done["status"], "done", "{done}");
    assert!(
        done["stdout"].as_str().unwrap().contains("slept 800 ms"),
        "{done}"
    );
    let finishes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_logs WHERE action = 'command.finish' AND details->>'command_id' = $1",
    )
    .bind(&command)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(finishes, 1);
    agent.stop().await;
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_frame_sent_by_hand_reaches_the_bus(pool: PgPool) {
    let bus_root = tempfile::tempdir().unwrap();
    let server = Server::start(pool).await;
    let mut config = SimConfig::serial("unused").with_bus("bench");
    config.bus_root = Some(bus_root.path().to_path_buf());
    let mut tap = dongle_sim::BusTap::recorder_at(bus_root.path(), "bench").unwrap();
    let (user, _dongle, mut agent, id) = setup(&server, Some(config)).await;
    assert!(tap.wait_for_peers(1, Duration::from_secs(5)).await);

    let (status, body) = user
        .post(
            &format!("/dongles/{id}/can/send"),
            json!({"can_id": 0x7df, "is_extended": false, "data_hex": "02010c"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let frame = tokio::time::timeout(Duration::from_secs(5), tap.recv())
        .await
        .expect("the frame reaches the bus")
        .unwrap();
    assert_eq!(frame.id().raw(), 0x7df);
    assert_eq!(frame.data(), &[0x02, 0x01, 0x0c]);

    // Too long for classic CAN, or an id too large for 11 bits: refused before anything is sent.
    for bad in [
        json!({"can_id": 0x7df, "is_extended": false, "data_hex": "000102030405060708"}),
        json!({"can_id": 0x800, "is_extended": false, "data_hex": "00"}),
    ] {
        let (status, body) = user.post(&format!("/dongles/{id}/can/send"), bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), tap.recv())
            .await
            .is_err(),
        "nothing else reached the bus"
    );
    agent.stop().await;
    server.stop().await;
}

/// Two server instances on one database: the agent is connected to the second, the user talks to the
/// first; pairing, configuration and commands all cross over.
#[sqlx::test(migrator = "MIGRATOR")]
async fn config_and_commands_cross_server_instances(pool: PgPool) {
    let first = Server::start(pool).await;
    let second = first.second_instance().await;
    let alice = first.user("alice@example.com", Role::User).await;
    let dongle = Dongle::serial().await;
    let mut agent = Agent::new();
    // The agent logs in to the second instance and stays connected there.
    agent.login_as(&second.base, &alice.email, &[]).await;
    agent.run(&dongle.agent_args());
    let id = pair(&alice, &dongle).await;

    let (status, body) = alice
        .call(
            Method::PUT,
            &format!("/dongles/{id}/can-config"),
            Some(json!({"bitrate": 125000, "sample_point_permille": 875, "mode": "normal",
                        "use_raw": false, "auto_retx": true, "tx_pause": false, "protocol_exc": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(dongle.sim.flash().can.bitrate, 125_000);

    let command = invoke(&alice, &id, json!({"command": "echo", "args": ["across"]})).await;
    let done = finished(&alice, &id, &command).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["stdout"], "across\n");
    // Whichever instance the user asks, the answer is the same.
    let (_, via_second) = alice
        .via(&second.base)
        .get(&format!("/dongles/{id}/commands/{command}"))
        .await;
    assert_eq!(via_second["stdout"], "across\n");
    agent.stop().await;
    second.stop().await;
    first.stop().await;
}

/// Command results are never dropped because the connection's queue is full. On connecting, the agent
/// sends every unacknowledged result from its journal; past the queue's 1 024, the rest were dropped
/// and waited for the next reconnect. Now each waits for room, and all reach the server at once.
#[sqlx::test(migrator = "MIGRATOR")]
async fn every_journaled_result_reaches_the_server_however_many_wait(pool: PgPool) {
    let server = Server::start_with(pool, |c| c.agent_messages_per_sec = 100_000).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let mut agent = Agent::new();
    agent.login(&server, &alice).await;
    let journal_dir = agent.path("commands");
    {
        let journal = bridge_agent::journal::Journal::open(&journal_dir).unwrap();
        for _ in 0..1_500 {
            let id = uuid::Uuid::new_v4();
            journal
                .admit(id, "00000000000000d1".parse().unwrap())
                .unwrap();
            journal
                .finish(control_proto::CommandResult {
                    command_id: id,
                    device_id: "00000000000000d1".parse().unwrap(),
                    outcome: control_proto::CommandOutcome::Done,
                    exit_code: 0,
                    output: "ok".into(),
                    truncated: false,
                    message: None,
                })
                .unwrap();
        }
    }
    assert_eq!(bridge_agent::journal::Journal::peek(&journal_dir).1, 1_500);
    agent.run(&["--usb-id".into(), "ffff:ffff".into()]);
    let mut waiting = usize::MAX;
    for _ in 0..300 {
        waiting = bridge_agent::journal::Journal::peek(&journal_dir).1;
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(waiting, 0, "results still waiting for the server");
    agent.stop().await;
    server.stop().await;
}

/// The agent's data-plane counters, as its `daemon.json` says them (rewritten once a second).
fn data_stats(agent: &Agent) -> Value {
    std::fs::read(agent.path("daemon.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map(|s| s["data"].clone())
        .unwrap_or(Value::Null)
}

/// The issue's own trial: pair one dongle, open its console, and watch its bus. Frames the dongle
/// receives appear as `rx` (they used to be dropped by the agent, since the dongle is in no group), a
/// frame sent by hand as `tx`; the agent uploads the dongle's frames only while the console is open.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_lone_dongles_console_shows_its_bus_only_while_it_is_open(pool: PgPool) {
    use dongle_sim::frame::Frame as SimFrame;
    use firmware_proto::ids::CanId;

    let bus_root = tempfile::tempdir().unwrap();
    let server = Server::start(pool).await;
    let mut config = SimConfig::serial("unused").with_bus("bench");
    config.bus_root = Some(bus_root.path().to_path_buf());
    let (user, dongle, mut agent, id) = setup(&server, Some(config)).await;
    let reply = SimFrame::classic(
        CanId::standard(0x7e8).unwrap(),
        &[0x04, 0x41, 0x0c, 0x1a, 0xf8],
    )
    .unwrap();

    let mut console = user.console(&id).await;
    // An ECU's answer on the dongle's bus, repeated as an ECU would until the console shows it: the
    // agent starts streaming when the server tells it somebody watches.
    let shown = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            dongle.sim.inject_bus_frames(&[reply]);
            if let Some(frame) = console
                .wait_for("can_frame", Duration::from_millis(200), |d| {
                    d["can_id"] == 0x7e8
                })
                .await
            {
                return frame;
            }
        }
    })
    .await
    .expect("a frame on the lone dongle's bus reaches its console");
    assert_eq!(shown["direction"], "rx", "{shown}");
    assert_eq!(shown["data_hex"], "04410c1af8", "{shown}");
    assert_eq!(shown["dongle_id"], id.as_str());

    // A frame sent by hand shows as tx.
    let (status, body) = user
        .post(
            &format!("/dongles/{id}/can/send"),
            json!({"can_id": 0x7df, "is_extended": false, "data_hex": "02010c"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sent = console
        .wait_for("can_frame", Duration::from_secs(5), |d| {
            d["can_id"] == 0x7df
        })
        .await
        .expect("the frame sent by hand on the console");
    assert_eq!(sent["direction"], "tx", "{sent}");

    // The agent counted what it sent for the console.
    let mut stats = Value::Null;
    for _ in 0..50 {
        stats = data_stats(&agent);
        if stats["console_sent"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stats["console_sent"].as_u64().unwrap_or(0) > 0, "{stats}");

    // The console closes: the agent stops uploading the dongle's frames (within a round of the
    // server's watch), and counts them as unrouted again.
    drop(console);
    let stopped = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let before = data_stats(&agent);
            for _ in 0..8 {
                dongle.sim.inject_bus_frames(&[reply]);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Long enough for the status file's once-a-second rewrite.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let after = data_stats(&agent);
            if after["console_seen"] == before["console_seen"]
                && after["unrouted"].as_u64() > before["unrouted"].as_u64()
            {
                return after;
            }
        }
    })
    .await;
    assert!(
        stopped.is_ok(),
        "the agent kept streaming a console nobody watches: {}",
        data_stats(&agent)
    );
    agent.stop().await;
    server.stop().await;
}

/// A command typed on the dongle's UART console reaches its owner: on the console as `cli_telemetry`
/// and in the dongle's history, beside the commands sent through the API (`remote`), each report once.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_command_typed_on_the_uart_reaches_the_console_and_the_history(pool: PgPool) {
    let server = Server::start(pool).await;
    let (user, dongle, mut agent, id) = setup(&server, None).await;
    // The agent takes UART reports once it has authenticated to the dongle with its token.
    let mut console = user.console(&id).await;
    let typed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            dongle.sim.uart_command("version");
            if let Some(event) = console
                .wait_for("cli_telemetry", Duration::from_millis(500), |_| true)
                .await
            {
                return event;
            }
        }
    })
    .await
    .expect("the UART command reaches the console");
    assert_eq!(typed["source"], "uart", "{typed}");
    assert_eq!(typed["command"], "version");
    assert_eq!(typed["exit_code"], 0);
    assert!(
        typed["output"].as_str().unwrap().contains("dongle-sim"),
        "{typed}"
    );

    // A remote command lands in the same history.
    let command = invoke(
        &user,
        &id,
        json!({"command": "echo", "args": ["from", "afar"]}),
    )
    .await;
    finished(&user, &id, &command).await;
    let remote = console
        .wait_for("cli_telemetry", Duration::from_secs(5), |d| {
            d["source"] == "remote"
        })
        .await
        .expect("the remote command on the console");
    assert_eq!(remote["command"], "echo from afar");
    assert_eq!(remote["output"], "from afar\n");

    let (status, history) = user.get(&format!("/dongles/{id}/cli-telemetry")).await;
    assert_eq!(status, StatusCode::OK, "{history}");
    let items = history["items"].as_array().unwrap();
    let sources: Vec<&str> = items
        .iter()
        .map(|i| i["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources.first(), Some(&"remote"), "newest first: {history}");
    assert!(sources.contains(&"uart"), "{history}");
    let uart_rows = sources.iter().filter(|s| **s == "uart").count();
    assert_eq!(history["total"], items.len());

    // A command that fails on the UART is flagged as an error.
    dongle.sim.uart_command("no-such-command");
    let failed = console
        .wait_for("cli_telemetry", Duration::from_secs(5), |d| {
            d["command"] == "no-such-command"
        })
        .await
        .expect("the failed UART command on the console");
    assert_eq!(failed["error"], true, "{failed}");
    let (_, history) = user.get(&format!("/dongles/{id}/cli-telemetry")).await;
    assert_eq!(
        history["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["source"] == "uart")
            .count(),
        uart_rows + 1,
        "each report once: {history}"
    );
    agent.stop().await;
    server.stop().await;
}

/// Network diagnostics run on the real agent's workstation: the interface list (with the loopback one
/// marked as not scanned), a ping refused for a USB dongle that has no LAN address, and everything
/// refused once the workstation's owner turns them off.
#[sqlx::test(migrator = "MIGRATOR")]
async fn host_commands_run_on_the_agents_workstation_unless_turned_off(pool: PgPool) {
    let server = Server::start(pool).await;
    let (user, dongle, mut agent, id) = setup(&server, None).await;
    let (status, ran) = user
        .post(
            &format!("/dongles/{id}/host-commands"),
            json!({"command": "interfaces"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ran}");
    assert_eq!(ran["exit_code"], 0);
    let output = ran["output"].as_str().unwrap();
    assert!(
        output.contains("lo 127.0.0.1 (not scanned: loopback)"),
        "{output}"
    );

    let (status, body) = user
        .post(
            &format!("/dongles/{id}/host-commands"),
            json!({"command": "ping"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["details"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not on the LAN"),
        "{body}"
    );

    agent.stop().await;
    let mut args = dongle.agent_args();
    args.push("--no-host-commands".into());
    agent.run(&args);
    user.wait_dongle(&dongle.device_id, "served again", |d| {
        d.is_some_and(|d| d["online"] == true)
    })
    .await;
    let mut last = (StatusCode::OK, Value::Null);
    for _ in 0..150 {
        last = user
            .post(
                &format!("/dongles/{id}/host-commands"),
                json!({"command": "interfaces"}),
            )
            .await;
        if last.0 == StatusCode::FORBIDDEN {
            break;
        }
        eprintln!(
            "host command while the agent restarts: {} {}",
            last.0, last.1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, off) = last;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the restarted agent refuses: {off}"
    );
    assert!(
        off["details"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("turned off"),
        "{off}"
    );
    agent.stop().await;
    server.stop().await;
}
