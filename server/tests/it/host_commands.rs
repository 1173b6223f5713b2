//! Network diagnostics on the workstation of the agent serving a dongle: allow-listed by name only,
//! streamed to the dongle's console, kept in its history, refused when the agent's owner turned them
//! off, and never sent to an agent too old to know them.

use crate::common;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::agent::{self, Answer, TestAgent};
use common::dongle::paired;
use common::{read, spawn_app};
use control_proto::HostCommand;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

const DEV: &str = "00000000000000f7";

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_diagnostic_runs_on_the_agent_streams_to_the_console_and_is_kept(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let console = owner
        .client
        .get(&format!("/streams/dongles/{}/console", owner.dongle_id))
        .await;
    assert_eq!(console.status(), StatusCode::OK);
    let ran = read(
        owner
            .client
            .post_json(
                &format!("/dongles/{}/host-commands", owner.dongle_id),
                json!({"command": "ip addr"}),
            )
            .await,
    )
    .await;
    assert_eq!(ran.status, StatusCode::OK, "{}", ran.text);
    assert_eq!(ran.json["command"], "ip addr");
    assert_eq!(ran.json["output"], "ip addr ok\n");
    assert_eq!(
        owner.agent.seen.lock().unwrap().host_commands,
        vec![HostCommand::IpAddr]
    );
    // The streamed line reached the console.
    let mut console = console;
    let mut text = String::new();
    while !text.contains("host_output") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), console.chunk())
            .await
            .expect("the streamed output in time")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("ip addr ok"), "{text}");
    // And the history keeps it, as a host command.
    let history = read(
        owner
            .client
            .get(&format!("/dongles/{}/cli-telemetry", owner.dongle_id))
            .await,
    )
    .await;
    assert_eq!(history.json["items"][0]["source"], "host");
    assert_eq!(history.json["items"][0]["command"], "ip addr");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = 'host.command'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);

    // Anything off the list is refused before the agent hears of it.
    for bad in ["rm -rf /", "ping 8.8.8.8", ""] {
        read(
            owner
                .client
                .post_json(
                    &format!("/dongles/{}/host-commands", owner.dongle_id),
                    json!({"command": bad}),
                )
                .await,
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "COMMAND_NOT_ALLOWED");
    }
    assert_eq!(owner.agent.seen.lock().unwrap().host_commands.len(), 1);

    // The workstation's owner turned them off: refused, with the agent's reason.
    owner.agent.seen.lock().unwrap().host_answer =
        Answer::Refuse("host commands are turned off on this workstation".into());
    let off = read(
        owner
            .client
            .post_json(
                &format!("/dongles/{}/host-commands", owner.dongle_id),
                json!({"command": "interfaces"}),
            )
            .await,
    )
    .await;
    off.assert_error(StatusCode::FORBIDDEN, "COMMAND_NOT_ALLOWED");
    assert!(off.text.contains("turned off"), "{}", off.text);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_too_old_for_host_commands_is_not_sent_one(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, token) = agent::register(&bob).await;
    let old = TestAgent::connect_speaking(&app.base, &token, 3).await;
    old.report_caps(&app.pool, &[(DEV, 0)]).await;
    let dongle = common::data::pair(&app, &bob, DEV).await;
    read(
        bob.post_json(
            &format!("/dongles/{dongle}/host-commands"),
            json!({"command": "interfaces"}),
        )
        .await,
    )
    .await
    .assert_error(StatusCode::CONFLICT, "CONFLICT");
    assert!(old.seen.lock().unwrap().host_commands.is_empty());
}

/// A request the server queues for an agent whose new connection has not been welcomed yet (it is
/// reconnecting) goes out right after the welcome: it used to go out before it, and an agent reads
/// nothing before its welcome, so the request was lost and its caller waited the whole timeout for a
/// 504 (seen as a 20 s host command after an agent restart).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_request_queued_before_the_hello_is_delivered_after_it(pool: PgPool) {
    use control_proto::{
        AgentMessage, Hello, Reply, ReplyOk, ReplyResult, RequestBody, ServerMessage,
    };
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let app = spawn_app(pool.clone()).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    // The agent reconnects: its new socket replaces the old one, and is slow to say hello.
    let mut ws = agent::try_connect(&app.base, &owner.token).await.unwrap();
    let client = owner.client.clone();
    let path = format!("/dongles/{}/host-commands", owner.dongle_id);
    let call = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let answer = read(
            client
                .post_json(&path, json!({"command": "interfaces"}))
                .await,
        )
        .await;
        (answer, started.elapsed())
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let hello = AgentMessage::Hello(Hello {
        protocol: control_proto::PROTOCOL_VERSION,
        agent_version: "test".into(),
        hostname: "bench".into(),
        os: "linux".into(),
        interfaces: vec![],
    });
    ws.send(Message::text(hello.to_json())).await.unwrap();
    // The welcome comes first (an agent reads nothing before it), then the queued request, which the
    // agent answers.
    let (first, request) = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut first = None;
        loop {
            let Some(Ok(Message::Text(text))) = ws.next().await else {
                continue;
            };
            let Ok(message) = ServerMessage::from_json(text.as_str()) else {
                continue;
            };
            let name = match &message {
                ServerMessage::Welcome(_) => "welcome",
                ServerMessage::Request(_) => "request",
                _ => "other",
            };
            first.get_or_insert(name);
            if let ServerMessage::Request(r) = message
                && matches!(r.body, RequestBody::HostCommand { .. })
            {
                return (first, r);
            }
        }
    })
    .await
    .expect("the queued request is delivered after the hello");
    assert_eq!(first, Some("welcome"), "the welcome before anything else");
    let reply = AgentMessage::Reply(Reply {
        id: request.id,
        result: ReplyResult::Ok {
            body: ReplyOk::HostCommandDone {
                exit_code: 0,
                output: "lo 127.0.0.1\n".into(),
                truncated: false,
            },
        },
    });
    ws.send(Message::text(reply.to_json())).await.unwrap();
    let (answer, took) = call.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

/// A request newer than the agent's protocol is never written to its socket (an older agent would take
/// it for a violation and reconnect); its caller gets an answer at once, not after the timeout. Here the
/// agents table still says protocol 4 from an earlier, newer agent on the same token.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_request_too_new_for_the_connected_agent_fails_at_once(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&bob).await;
    let old = TestAgent::connect_speaking(&app.base, &token, 3).await;
    old.report_caps(&app.pool, &[(DEV, 0)]).await;
    let dongle = common::data::pair(&app, &bob, DEV).await;
    sqlx::query("UPDATE agents SET protocol = 4 WHERE id = $1")
        .bind(agent_id)
        .execute(&pool)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = read(
        bob.post_json(
            &format!("/dongles/{dongle}/host-commands"),
            json!({"command": "interfaces"}),
        )
        .await,
    )
    .await;
    assert!(answer.status.is_client_error(), "{}", answer.text);
    assert!(answer.text.contains("update the agent"), "{}", answer.text);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
    assert!(old.seen.lock().unwrap().host_commands.is_empty());
    assert!(!old.is_closed());
}
