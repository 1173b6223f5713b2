//! Agents (SPEC 3.3): registration, bearer tokens, heartbeat and presence, device reports, and the
//! control WebSocket's authentication.

use crate::common;

use common::agent::{self, TestAgent};
use common::{read, spawn_app};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

const DEV_A: &str = "00000000000000a1";

#[sqlx::test(migrator = "MIGRATOR")]
async fn register_heartbeat_and_presence(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&alice).await;
    assert_eq!(token.len(), 64, "256 random bits in hex");
    // Only the SHA-256 of the token is stored.
    let stored: String =
        sqlx::query_scalar("SELECT token_hash FROM agent_tokens WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(stored, token);
    assert_eq!(stored, bridge_server::auth::token::digest(&token));

    let list = read(alice.get("/agents").await).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json["items"][0]["id"], agent_id.to_string());
    assert_eq!(list.json["items"][0]["online"], false, "no heartbeat yet");
    assert!(list.text.find(&token).is_none(), "the token is shown once");

    let http = reqwest::Client::new();
    let res = http
        .post(alice.api("/agents/heartbeat"))
        .bearer_auth(&token)
        .json(&json!({"hostname": "bench-7", "os": "linux", "version": "0.1.0"}))
        .send()
        .await
        .unwrap();
    let answer = read(res).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "bearer requests need no CSRF: {}",
        answer.text
    );
    assert_eq!(answer.json["agent_id"], agent_id.to_string());

    let list = read(alice.get("/agents").await).await;
    let item = &list.json["items"][0];
    assert_eq!(item["online"], true);
    assert_eq!(item["hostname"], "bench-7");
    assert_eq!(item["version"], "0.1.0");

    // 31 s without a heartbeat: offline.
    sqlx::query("UPDATE agents SET last_seen_at = now() - interval '31 seconds' WHERE id = $1")
        .bind(agent_id)
        .execute(&pool)
        .await
        .unwrap();
    let list = read(alice.get("/agents").await).await;
    assert_eq!(list.json["items"][0]["online"], false);

    // A heartbeat over the control WebSocket brings it back.
    let ws = TestAgent::connect(&app.base, &token).await;
    assert_eq!(ws.agent_id, agent_id);
    ws.send(control_proto::AgentMessage::Heartbeat);
    agent::wait_until(|| async {
        let list = read(alice.get("/agents").await).await;
        list.json["items"][0]["online"] == true && list.json["items"][0]["hostname"] == "bench-host"
    })
    .await;

    // Another user sees none of it, and cannot revoke it.
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let list = read(bob.get("/agents").await).await;
    assert_eq!(list.json["items"].as_array().unwrap().len(), 0);
    read(bob.delete(&format!("/agents/{agent_id}/tokens")).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    ws.close();
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_revoked_token_gets_401_on_http_and_is_refused_on_the_websocket(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&alice).await;
    let http = reqwest::Client::new();
    let heartbeat = || {
        http.post(alice.api("/agents/heartbeat"))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
    };
    assert_eq!(heartbeat().await.unwrap().status(), StatusCode::OK);
    let mut live = agent::try_connect(&app.base, &token).await.unwrap();

    let answer = read(alice.delete(&format!("/agents/{agent_id}/tokens")).await).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json["tokens_revoked"], 1);
    // The open control connection is closed by the server.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        use futures::StreamExt;
        loop {
            match live.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(m)) if m.is_close() => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the socket of a revoked agent is closed");

    read(heartbeat().await.unwrap())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
    assert_eq!(agent::try_connect(&app.base, &token).await.err(), Some(401));
    // An unknown token and a session user on an agent route are refused the same way.
    assert_eq!(
        agent::try_connect(&app.base, "not-a-token").await.err(),
        Some(401)
    );
    read(alice.post_json("/agents/heartbeat", json!({})).await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_expired_or_disabled_users_token_is_refused(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, alice_id) = app.logged_in("alice@example.com", Role::User).await;
    let (_, token) = agent::register(&alice).await;
    let http = reqwest::Client::new();
    let status = |t: String| {
        let http = http.clone();
        let url = alice.api("/agents/heartbeat");
        async move {
            http.post(url)
                .bearer_auth(t)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status(token.clone()).await, StatusCode::OK);
    sqlx::query("UPDATE agent_tokens SET expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(status(token.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(agent::try_connect(&app.base, &token).await.err(), Some(401));
    sqlx::query("UPDATE agent_tokens SET expires_at = NULL")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(status(token.clone()).await, StatusCode::OK);
    // A connection open when its token expires is closed at its next heartbeat.
    let connected = TestAgent::connect(&app.base, &token).await;
    sqlx::query("UPDATE agent_tokens SET expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    let last_seen = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT last_seen_at FROM agents WHERE id = $1",
        )
        .bind(connected.agent_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let seen_before = last_seen().await;
    connected.send(control_proto::AgentMessage::Heartbeat);
    let hub = app.hub();
    agent::wait_until(|| async { !hub.is_connected(connected.agent_id).await }).await;
    assert_eq!(
        last_seen().await,
        seen_before,
        "a refused heartbeat does not mark the agent alive"
    );
    sqlx::query("UPDATE agent_tokens SET expires_at = NULL")
        .execute(&pool)
        .await
        .unwrap();
    // An admin disabling the user revokes the agent's tokens and closes its open connection.
    let connected = TestAgent::connect(&app.base, &token).await;
    assert!(hub.is_connected(connected.agent_id).await);
    let (admin, _) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    let res = admin
        .post_json(&format!("/admin/users/{alice_id}/disable"), json!({}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(status(token).await, StatusCode::UNAUTHORIZED);
    assert!(!hub.is_connected(connected.agent_id).await);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_device_report_upserts_dongles_and_never_makes_an_owner(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (_, token) = agent::register(&alice).await;
    let http = reqwest::Client::new();
    let report = |body: serde_json::Value| {
        http.post(alice.api("/agents/devices/report"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let mut dongle = serde_json::to_value(agent::usb_dongle(DEV_A)).unwrap();
    let answer = read(report(json!({"dongles": [dongle.clone()]})).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let list = read(alice.get("/dongles").await).await;
    let items = list.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", list.text);
    assert_eq!(items[0]["device_id"], DEV_A);
    assert_eq!(items[0]["ownership_state"], "UNCLAIMED");
    assert_eq!(items[0]["owned"], false);
    assert_eq!(items[0]["online"], true);
    assert_eq!(items[0]["fw_build"], "1.4.2");
    assert_eq!(items[0]["transport"]["kind"], "usb");
    // A report claiming the dongle, in any shape, makes nobody an owner.
    dongle["claimed"] = json!(true);
    dongle["owner_user_id"] = json!(uuid::Uuid::new_v4());
    let answer = read(report(json!({"dongles": [dongle]})).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        app.count("SELECT count(*) FROM dongles WHERE owner_user_id IS NOT NULL OR ownership_state <> 'UNCLAIMED'")
            .await,
        0
    );
    // A malformed device id is a 400 in our shape.
    let mut bad = serde_json::to_value(agent::usb_dongle(DEV_A)).unwrap();
    bad["device_id"] = json!("00000000000000A1");
    read(report(json!({"dongles": [bad]})).await.unwrap())
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    // The empty snapshot: the agent no longer sees it, so it leaves the list.
    let answer = read(report(json!({"dongles": []})).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    let list = read(alice.get("/dongles").await).await;
    assert_eq!(list.json["items"].as_array().unwrap().len(), 0);
}

/// A local endpoint in a report (SPEC 3.11: an agent gains nothing by what it claims): its id must be
/// the one derived from the reporting agent's id, or the report is refused; the agent's user owns it
/// without pairing (audited once); another agent that reports the same id, as local or as a USB
/// dongle, gains nothing; and an id that is already a real dongle's is never served as local.
#[sqlx::test(migrator = "MIGRATOR")]
async fn local_endpoints_belong_to_their_agents_user_and_nobody_else(pool: PgPool) {
    use control_proto::{DongleReport, Transport};

    let app = spawn_app(pool.clone()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (mallory, _) = app.logged_in("mallory@example.com", Role::User).await;
    let (alice_agent, alice_token) = agent::register(&alice).await;
    let (_, mallory_token) = agent::register(&mallory).await;
    let http = reqwest::Client::new();
    let report = |token: &str, dongles: Vec<DongleReport>| {
        http.post(alice.api("/agents/devices/report"))
            .bearer_auth(token)
            .json(&json!({ "dongles": dongles }))
            .send()
    };
    let local = |device_id: &str, identity: &str| DongleReport {
        device_id: device_id.parse().unwrap(),
        fw_build: "local socketcand".into(),
        proto_ver: 1,
        capabilities: 2,
        transport: Transport::Local {
            endpoint: "socketcand".into(),
            identity: identity.into(),
            location: "127.0.0.1:29536".into(),
            can_set_timing: false,
        },
        pairing_mode: false,
        present: true,
        claimed: true,
    };
    let identity = "socketcand:127.0.0.1:29536";
    let id = control_proto::local_device_id(alice_agent, identity).to_string();

    // Mallory's agent cannot report Alice's endpoint as its own local one: the id is not its.
    read(
        report(&mallory_token, vec![local(&id, identity)])
            .await
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    // Nor any made-up id.
    read(
        report(&alice_token, vec![local(DEV_A, identity)])
            .await
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert_eq!(app.count("SELECT count(*) FROM dongles").await, 0);

    // Alice's agent reports it: Alice owns it, marked local, audited once however often reported.
    for _ in 0..2 {
        let answer = read(
            report(&alice_token, vec![local(&id, identity)])
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }
    let list = read(alice.get("/dongles").await).await;
    let items = list.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", list.text);
    assert_eq!(items[0]["device_id"], id.as_str());
    assert_eq!(items[0]["owned"], true);
    assert_eq!(items[0]["local"], true);
    assert_eq!(items[0]["ownership_state"], "CLAIMED_ACTIVE");
    assert_eq!(
        app.count("SELECT count(*) FROM audit_logs WHERE action = 'dongle.local_claimed'")
            .await,
        1
    );

    // Mallory's agent reports the same id as a USB dongle it sees: ignored, nothing changes hands,
    // and Alice's endpoint stays served by Alice's agent.
    let answer = read(
        report(&mallory_token, vec![agent::usb_dongle(&id)])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(
        read(mallory.get("/dongles").await).await.json["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM dongle_sightings s JOIN dongles d ON d.id = s.dongle_id \
             WHERE d.device_id = '{id}'"
        ))
        .await,
        1
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM dongles WHERE device_id = '{id}' AND transport->>'kind' = 'local'"
        ))
        .await,
        1
    );

    // A real dongle already known under an id is never served as a local endpoint: the report is
    // taken, the entry skipped, and the dongle stays unclaimed.
    sqlx::query("INSERT INTO dongles (device_id) VALUES ($1)")
        .bind(control_proto::local_device_id(alice_agent, "socketcan:can0").to_string())
        .execute(&pool)
        .await
        .unwrap();
    let real = control_proto::local_device_id(alice_agent, "socketcan:can0").to_string();
    let answer = read(
        report(
            &alice_token,
            vec![local(&id, identity), local(&real, "socketcan:can0")],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM dongles WHERE device_id = '{real}' AND owner_user_id IS NULL \
             AND local_agent_id IS NULL"
        ))
        .await,
        1
    );
}

/// An agent says what its workstation is (v0.7 section 9.2): host, OS, version, protocol and network
/// interfaces with which the LAN discovery uses; the API shows them. An agent of a protocol older than
/// the server supports fully is served, but told to upgrade, and the API says so.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_reports_its_workstation_and_an_old_one_is_told_to_upgrade(pool: PgPool) {
    use control_proto::{Hello, InterfaceReport};
    let app = spawn_app(pool).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (_, token) = agent::register(&alice).await;
    let hello = Hello {
        protocol: control_proto::PROTOCOL_VERSION,
        agent_version: "9.9.9".into(),
        hostname: "bench-7".into(),
        os: "linux".into(),
        interfaces: vec![
            InterfaceReport {
                name: "eth0".into(),
                addresses: vec!["192.168.1.20".into()],
                used_for_discovery: true,
                excluded_because: None,
            },
            InterfaceReport {
                name: "wg0".into(),
                addresses: vec!["10.9.0.1".into()],
                used_for_discovery: false,
                excluded_because: Some("a tunnel, VPN or virtual bridge".into()),
            },
        ],
    };
    let current = TestAgent::connect_with(&app.base, &token, hello).await;
    let list = read(alice.get("/agents").await).await;
    let shown = &list.json["items"][0];
    assert_eq!(shown["hostname"], "bench-7");
    assert_eq!(shown["version"], "9.9.9");
    assert_eq!(shown["protocol"], control_proto::PROTOCOL_VERSION);
    assert_eq!(shown["upgrade_required"], false);
    assert_eq!(shown["interfaces"][0]["name"], "eth0");
    assert_eq!(shown["interfaces"][0]["used_for_discovery"], true);
    assert_eq!(
        shown["interfaces"][1]["excluded_because"],
        "a tunnel, VPN or virtual bridge"
    );
    assert!(current.seen.lock().unwrap().errors.is_empty());
    current.close();

    let old = TestAgent::connect_speaking(&app.base, &token, 1).await;
    common::agent::wait_until(|| async {
        old.seen
            .lock()
            .unwrap()
            .errors
            .iter()
            .any(|e| e.contains("agent_too_old"))
    })
    .await;
    assert!(!old.is_closed(), "served all the same");
    let list = read(alice.get("/agents").await).await;
    assert_eq!(list.json["items"][0]["upgrade_required"], true);
    assert_eq!(list.json["items"][0]["protocol"], 1);
}
