//! CAN configuration (SPEC 3.6) end to end: a real server, a paired dongle behind a test agent that
//! acknowledges (or refuses, or ignores) configurations, and the owner's HTTP API.

use crate::common;

use std::time::Duration;

use common::agent::{self, Answer, TestAgent};
use common::dongle::{self, Owner, audit_count};
use common::{Answer as Reply, TestApp, read, spawn_app, spawn_app_with};
use control_proto::RequestBody;
use firmware_proto::caps::CAN_FD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

const DEV: &str = "00000000000000c1";

async fn put(owner: &Owner, body: Value) -> Reply {
    read(
        owner
            .client
            .put_json(&format!("/dongles/{}/can-config", owner.dongle_id), body)
            .await,
    )
    .await
}

async fn get(owner: &Owner) -> Reply {
    read(
        owner
            .client
            .get(&format!("/dongles/{}/can-config", owner.dongle_id))
            .await,
    )
    .await
}

fn listen_only_250k() -> Value {
    json!({"bitrate": 250000, "sample_point_permille": 800, "mode": "listen_only"})
}

async fn stored_rows(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM can_configs").await
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_valid_config_is_applied_stored_and_returned(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;

    // Nothing applied yet.
    let before = get(&owner).await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.text);
    assert!(before.json["config"].is_null() && before.json["effective"].is_null());
    assert!(before.json["applied_at"].is_null());

    let answer = put(&owner, listen_only_250k()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json["dongle_id"], owner.dongle_id.to_string());
    assert_eq!(answer.json["applied"], true);
    let effective = &answer.json["effective"];
    assert_eq!(effective["bitrate"], 250000);
    assert_eq!(effective["sample_point_permille"], 800);
    assert_eq!(effective["mode"], "listen_only");
    assert_eq!(
        (
            &effective["prescaler"],
            &effective["tseg1"],
            &effective["tseg2"]
        ),
        (&json!(10), &json!(13), &json!(2)),
        "the dongle's derived timing is what is returned"
    );
    assert_eq!(answer.json["config"]["auto_retx"], true, "the default");
    let applied_at: chrono::DateTime<chrono::Utc> =
        answer.json["applied_at"].as_str().unwrap().parse().unwrap();
    assert!((chrono::Utc::now() - applied_at).num_seconds().abs() < 30);

    // The agent got exactly what was asked, without raw timing.
    let sent = owner.agent.seen.lock().unwrap().can_configs.clone();
    assert_eq!(sent.len(), 1);
    let RequestBody::CanConfig {
        device_id,
        settings,
    } = &sent[0]
    else {
        panic!("a CAN configuration")
    };
    assert_eq!(
        (
            device_id.to_string().as_str(),
            settings.bitrate,
            settings.sample_point_permille,
            settings.mode.name(),
            settings.use_raw,
            settings.prescaler
        ),
        (DEV, 250_000, 800, "listen_only", false, None)
    );

    let stored = get(&owner).await;
    assert_eq!(stored.json["config"], answer.json["config"]);
    assert_eq!(stored.json["effective"], answer.json["effective"]);
    assert_eq!(stored.json["applied_at"], answer.json["applied_at"]);
    // The dongle's detail shows it too.
    let detail = read(
        owner
            .client
            .get(&format!("/dongles/{}", owner.dongle_id))
            .await,
    )
    .await;
    assert_eq!(detail.json["can_config"]["bitrate"], 250000);
    assert_eq!(detail.json["can_config"]["effective_bitrate"], 250000);

    // Audited with before and after.
    let details: Value = sqlx::query_scalar(
        "SELECT details FROM audit_logs WHERE action = 'can_config.apply' AND target_id = $1",
    )
    .bind(owner.dongle_id.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(details["before"].is_null(), "{details}");
    assert_eq!(details["after"]["config"]["mode"], "listen_only");
    assert_eq!(details["after"]["effective"]["bitrate"], 250000);
    assert_eq!(details["agent_id"], owner.agent.agent_id.to_string());

    // The owner's agent may apply one too, by its bearer token.
    let http = reqwest::Client::new();
    let by_agent = read(
        http.put(
            owner
                .client
                .api(&format!("/dongles/{}/can-config", owner.dongle_id)),
        )
        .bearer_auth(&owner.token)
        .json(&json!({"bitrate": 500000, "sample_point_permille": 875}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(by_agent.status, StatusCode::OK, "{}", by_agent.text);
    assert_eq!(by_agent.json["config"]["mode"], "normal");
    let details: Value = sqlx::query_scalar(
        "SELECT details FROM audit_logs WHERE action = 'can_config.apply' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(details["before"]["config"]["bitrate"], 250000);
    assert_eq!(details["after"]["config"]["bitrate"], 500000);
    assert_eq!(stored_rows(&app).await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn invalid_configs_are_refused_before_anything_is_sent(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let raw = |prescaler: i64, tseg1: i64, tseg2: i64, sjw: i64| {
        json!({"bitrate": 500000, "sample_point_permille": 875, "use_raw": true,
               "prescaler": prescaler, "tseg1": tseg1, "tseg2": tseg2, "sjw": sjw})
    };
    for (body, field) in [
        (
            json!({"bitrate": 9999, "sample_point_permille": 875}),
            "bitrate",
        ),
        (
            json!({"bitrate": 1000001, "sample_point_permille": 875}),
            "bitrate",
        ),
        (
            json!({"bitrate": -500000, "sample_point_permille": 875}),
            "bitrate",
        ),
        (
            json!({"bitrate": 500000, "sample_point_permille": 499}),
            "sample_point_permille",
        ),
        (
            json!({"bitrate": 500000, "sample_point_permille": 951}),
            "sample_point_permille",
        ),
        (
            json!({"bitrate": 500000, "sample_point_permille": 875, "mode": "fast"}),
            "mode",
        ),
        // bxCAN ranges: this dongle does not announce FD.
        (raw(1025, 13, 2, 1), "prescaler"),
        (raw(0, 13, 2, 1), "prescaler"),
        (raw(10, 17, 2, 1), "tseg1"),
        (raw(10, 13, 9, 1), "tseg2"),
        (raw(10, 13, 8, 5), "sjw"),
        (raw(10, 13, 2, 3), "sjw"),
        (
            json!({"bitrate": 500000, "sample_point_permille": 875, "use_raw": true, "tseg1": 13, "tseg2": 2, "sjw": 1}),
            "prescaler",
        ),
    ] {
        let answer = put(&owner, body.clone()).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
        assert_eq!(
            answer.json["details"]["field"], field,
            "{body}: {}",
            answer.text
        );
    }
    // A body that is not a configuration at all is refused in the same shape.
    put(&owner, json!({"bitrate": "fast"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert!(owner.agent.seen.lock().unwrap().can_configs.is_empty());
    assert_eq!(stored_rows(&app).await, 0);
    assert_eq!(audit_count(&app, "can_config.apply").await, 0);
    assert_eq!(audit_count(&app, "can_config.apply_failed").await, 0);

    // The same raw timing is fine within bxCAN's ranges.
    let answer = put(&owner, raw(4, 15, 4, 4)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json["config"]["tseg1"], 15);
    assert_eq!(answer.json["effective"]["use_raw"], true);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn fd_dongles_get_the_fdcan_timing_ranges(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, CAN_FD).await;
    let raw = |prescaler: i64, tseg1: i64, tseg2: i64, sjw: i64| {
        json!({"bitrate": 500000, "sample_point_permille": 875, "use_raw": true,
               "prescaler": prescaler, "tseg1": tseg1, "tseg2": tseg2, "sjw": sjw})
    };
    // Beyond bxCAN, within FDCAN.
    let answer = put(&owner, raw(512, 100, 60, 50)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    for (body, field) in [
        (raw(513, 13, 2, 1), "prescaler"),
        (raw(10, 256, 2, 1), "tseg1"),
        (raw(10, 13, 129, 1), "tseg2"),
        (raw(10, 13, 100, 129), "sjw"),
        (raw(10, 13, 20, 21), "sjw"),
    ] {
        let answer = put(&owner, body.clone()).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
        assert_eq!(answer.json["details"]["field"], field, "{body}");
    }
    assert_eq!(owner.agent.seen.lock().unwrap().can_configs.len(), 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_nack_a_timeout_and_an_offline_agent_have_their_own_codes_and_change_nothing(
    pool: PgPool,
) {
    let app = spawn_app_with(pool.clone(), |c| {
        c.dongle_request_timeout = Duration::from_millis(500)
    })
    .await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let first = put(&owner, listen_only_250k()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let stored = get(&owner).await.json;

    owner.agent.seen.lock().unwrap().can_config_answer =
        Answer::Refuse("bitrate not reachable with this clock".into());
    let nack = put(
        &owner,
        json!({"bitrate": 333333, "sample_point_permille": 875}),
    )
    .await;
    nack.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "CAN_CONFIG_REJECTED");
    assert_eq!(
        nack.json["details"]["reason"],
        "bitrate not reachable with this clock"
    );
    assert_eq!(get(&owner).await.json, stored, "a NACK stores nothing");

    owner.agent.seen.lock().unwrap().can_config_answer = Answer::Silent;
    let timeout = put(
        &owner,
        json!({"bitrate": 125000, "sample_point_permille": 875}),
    )
    .await;
    timeout.assert_error(StatusCode::GATEWAY_TIMEOUT, "DONGLE_TIMEOUT");
    assert_eq!(get(&owner).await.json, stored, "a timeout stores nothing");
    assert_eq!(owner.agent.seen.lock().unwrap().can_configs.len(), 3);
    assert_eq!(audit_count(&app, "can_config.apply").await, 1);
    let codes: Vec<Value> = sqlx::query_scalar(
        "SELECT details->'code' FROM audit_logs WHERE action = 'can_config.apply_failed' ORDER BY created_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        codes,
        vec![json!("CAN_CONFIG_REJECTED"), json!("DONGLE_TIMEOUT")]
    );

    // No agent connected: AGENT_OFFLINE, and still nothing changes.
    owner.agent.disconnect();
    agent::wait_until(|| async {
        put(
            &owner,
            json!({"bitrate": 125000, "sample_point_permille": 875}),
        )
        .await
        .json["code"]
            == "AGENT_OFFLINE"
    })
    .await;
    put(
        &owner,
        json!({"bitrate": 125000, "sample_point_permille": 875}),
    )
    .await
    .assert_error(StatusCode::SERVICE_UNAVAILABLE, "AGENT_OFFLINE");
    assert_eq!(get(&owner).await.json, stored);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_same_config_twice_is_idempotent(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let body = json!({"bitrate": 500000, "sample_point_permille": 875, "use_raw": true,
                      "prescaler": 10, "tseg1": 13, "tseg2": 2, "sjw": 1, "tx_pause": true});
    let a = put(&owner, body.clone()).await;
    let b = put(&owner, body).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::OK, StatusCode::OK),
        "{}",
        b.text
    );
    assert_eq!(a.json["config"], b.json["config"]);
    assert_eq!(a.json["effective"], b.json["effective"]);
    assert_eq!(b.json["applied"], true);
    // Applied again each time (the dongle may have been reset in between), stored once.
    assert_eq!(owner.agent.seen.lock().unwrap().can_configs.len(), 2);
    assert_eq!(stored_rows(&app).await, 1);
    assert_eq!(audit_count(&app, "can_config.apply").await, 2);
    let details: Value = sqlx::query_scalar(
        "SELECT details FROM audit_logs WHERE action = 'can_config.apply' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(details["before"], details["after"]);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn only_the_owner_reaches_the_config(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let alice = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    assert_eq!(put(&alice, listen_only_250k()).await.status, StatusCode::OK);

    // Bob's agent even sees Alice's dongle (it moved to his bench): still not his.
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, bob_token) = agent::register(&bob).await;
    let bob_agent = TestAgent::connect(&app.base, &bob_token).await;
    bob_agent.report(&pool, &[DEV]).await;
    let path = format!("/dongles/{}/can-config", alice.dongle_id);
    read(bob.get(&path).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    read(bob.put_json(&path, listen_only_250k()).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    let http = reqwest::Client::new();
    for method in [reqwest::Method::GET, reqwest::Method::PUT] {
        read(
            http.request(method, bob.api(&path))
                .bearer_auth(&bob_token)
                .json(&listen_only_250k())
                .send()
                .await
                .unwrap(),
        )
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    }
    // An unknown id answers the same; an invalid body to someone else's dongle too (404 before 400).
    read(
        bob.get(&format!("/dongles/{}/can-config", Uuid::new_v4()))
            .await,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    read(
        bob.put_json(&path, json!({"bitrate": 1, "sample_point_permille": 1}))
            .await,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    assert!(bob_agent.seen.lock().unwrap().can_configs.is_empty());
    assert_eq!(alice.agent.seen.lock().unwrap().can_configs.len(), 1);
    assert_eq!(audit_count(&app, "can_config.apply").await, 1);
}

/// A reply of the right id that does not parse (here a CAN configuration in a mode no controller has)
/// ends its request at once as the agent's failure, instead of leaving the user to wait for the
/// timeout; nothing is stored, and the connection stays up.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_reply_that_does_not_parse_fails_its_request_at_once(pool: PgPool) {
    // A timeout far longer than the test waits: only the garbled reply can end the request in time.
    let app = spawn_app_with(pool.clone(), |c| {
        c.dongle_request_timeout = Duration::from_secs(60)
    })
    .await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    owner.agent.seen.lock().unwrap().can_config_answer = Answer::Garbled;
    let answer = tokio::time::timeout(Duration::from_secs(20), put(&owner, listen_only_250k()))
        .await
        .expect("an answer before the request's timeout");
    answer.assert_error(StatusCode::CONFLICT, "CONFLICT");
    assert_eq!(stored_rows(&app).await, 0, "nothing is stored");
    assert!(app.hub().is_connected(owner.agent.agent_id).await);

    // The next, well-formed answer is taken as usual.
    owner.agent.seen.lock().unwrap().can_config_answer = Answer::Ok;
    let answer = put(&owner, listen_only_250k()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
}
