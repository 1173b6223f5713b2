//! Sending a frame by hand (SPEC 3.8b) end to end: checks before anything is sent, the frame through the
//! agent, its own error codes, the per-dongle rate limit, and the audit.

use crate::common;

use std::time::Duration;

use common::agent::{Answer, TestAgent};
use common::dongle::{self, Owner, audit_count};
use common::{Answer as Reply, read, spawn_app, spawn_app_with};
use firmware_proto::caps::CAN_FD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use bridge_server::db::MIGRATOR;
use bridge_server::rate_limit::Limit;
use bridge_server::users::Role;

const DEV: &str = "00000000000000f1";

async fn send(owner: &Owner, body: Value) -> Reply {
    read(
        owner
            .client
            .post_json(&format!("/dongles/{}/can/send", owner.dongle_id), body)
            .await,
    )
    .await
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_frame_goes_out_through_the_agent_and_is_audited(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let answer = send(
        &owner,
        json!({"can_id": 0x7DF, "is_extended": false, "data_hex": "02010D0000000000"}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json, json!({"sent": true}));
    let extended = send(
        &owner,
        json!({"can_id": 0x18DA_F110u32, "is_extended": true, "data_hex": ""}),
    )
    .await;
    assert_eq!(extended.status, StatusCode::OK, "{}", extended.text);
    // The identifier as hex in a string, as v0.7 clients send it.
    for can_id in ["0x7E0", "7e1"] {
        let hex = send(&owner, json!({"can_id": can_id, "data_hex": "01"})).await;
        assert_eq!(hex.status, StatusCode::OK, "{}", hex.text);
    }
    assert_eq!(
        owner.agent.seen.lock().unwrap().frames,
        vec![
            (0x7DF, false, "02010d0000000000".to_string(), false),
            (0x18DA_F110, true, String::new(), false),
            (0x7E0, false, "01".to_string(), false),
            (0x7E1, false, "01".to_string(), false),
        ]
    );
    assert_eq!(audit_count(&app, "can.send").await, 4);
    let details: Value = sqlx::query_scalar(
        "SELECT details FROM audit_logs WHERE action = 'can.send' ORDER BY created_at LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(details["can_id"], 0x7DF);
    assert_eq!(details["len"], 8);
    assert_eq!(details["sent"], true);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn frames_are_checked_before_anything_is_sent(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let classic = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    for (body, field) in [
        (json!({"can_id": 0x800, "data_hex": ""}), "can_id"),
        (json!({"can_id": "0x800", "data_hex": ""}), "can_id"),
        (json!({"can_id": "7DG", "data_hex": ""}), "can_id"),
        (json!({"can_id": -1, "data_hex": ""}), "can_id"),
        (
            json!({"can_id": -1, "is_extended": true, "data_hex": ""}),
            "can_id",
        ),
        (
            json!({"can_id": 0x2000_0000u32, "is_extended": true, "data_hex": ""}),
            "can_id",
        ),
        (json!({"can_id": 1, "data_hex": "0"}), "data_hex"),
        (json!({"can_id": 1, "data_hex": "zz"}), "data_hex"),
        (json!({"can_id": 1, "data_hex": "00".repeat(9)}), "data_hex"),
        (
            json!({"can_id": 1, "data_hex": "00".repeat(12), "fd": true}),
            "fd",
        ),
    ] {
        let answer = send(&classic, body.clone()).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
        assert_eq!(
            answer.json["details"]["field"], field,
            "{body}: {}",
            answer.text
        );
    }
    // Not a frame at all: the same shape.
    send(&classic, json!({"can_id": "7df"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert!(classic.agent.seen.lock().unwrap().frames.is_empty());
    assert_eq!(audit_count(&app, "can.send").await, 0);

    // A dongle that announces FD takes FD frames of the FD lengths only.
    let fd = dongle::paired(&app, "bob@example.com", "00000000000000f2", CAN_FD).await;
    for len in [9, 13, 65] {
        let answer = send(
            &fd,
            json!({"can_id": 1, "data_hex": "ab".repeat(len), "fd": true}),
        )
        .await;
        answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
        assert_eq!(answer.json["details"]["field"], "data_hex");
    }
    send(&fd, json!({"can_id": 1, "data_hex": "00".repeat(9)}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    for len in [0, 8, 12, 64] {
        let answer = send(
            &fd,
            json!({"can_id": 1, "data_hex": "ab".repeat(len), "fd": true}),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{len}: {}", answer.text);
    }
    let frames = fd.agent.seen.lock().unwrap().frames.clone();
    assert_eq!(frames.len(), 4);
    assert!(frames.iter().all(|f| f.3), "sent as FD frames");
    assert_eq!(frames[3].2.len(), 128);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn sends_are_rate_limited_per_dongle(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let frame = json!({"can_id": 0x7DF, "data_hex": "0201000000000000"});
    // The default: 20 per 10 s, whether from the session or the owner's agent.
    let http = reqwest::Client::new();
    for i in 0..20 {
        let answer = if i % 2 == 0 {
            send(&owner, frame.clone()).await
        } else {
            read(
                http.post(
                    owner
                        .client
                        .api(&format!("/dongles/{}/can/send", owner.dongle_id)),
                )
                .bearer_auth(&owner.token)
                .json(&frame)
                .send()
                .await
                .unwrap(),
            )
            .await
        };
        assert_eq!(answer.status, StatusCode::OK, "{i}: {}", answer.text);
    }
    let limited = send(&owner, frame.clone()).await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    assert_eq!(owner.agent.seen.lock().unwrap().frames.len(), 20);
    // Invalid frames are refused before they count.
    send(&owner, json!({"can_id": 0x800, "data_hex": ""}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    // Another dongle has its own counter.
    let other = dongle::paired(&app, "bob@example.com", "00000000000000f2", 0).await;
    assert_eq!(send(&other, frame).await.status, StatusCode::OK);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_window_reopens_after_its_end(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| {
        c.rate_limits.can_send_per_dongle = Limit::new(2, Duration::from_secs(1))
    })
    .await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let frame = json!({"can_id": 1, "data_hex": "00"});
    for _ in 0..2 {
        assert_eq!(send(&owner, frame.clone()).await.status, StatusCode::OK);
    }
    send(&owner, frame.clone())
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(send(&owner, frame).await.status, StatusCode::OK);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_refused_or_unanswered_frame_has_its_own_code(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| {
        c.dongle_request_timeout = Duration::from_millis(400)
    })
    .await;
    let owner = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let frame = json!({"can_id": 0x7DF, "data_hex": "0201000000000000"});
    owner.agent.seen.lock().unwrap().frame_answer = Answer::Refuse("bus off".into());
    let refused = send(&owner, frame.clone()).await;
    refused.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "CAN_SEND_REJECTED");
    assert_eq!(refused.json["details"]["reason"], "bus off");
    owner.agent.seen.lock().unwrap().frame_answer = Answer::Silent;
    send(&owner, frame.clone())
        .await
        .assert_error(StatusCode::GATEWAY_TIMEOUT, "DONGLE_TIMEOUT");
    let sent: Vec<Value> = sqlx::query_scalar(
        "SELECT details->'sent' FROM audit_logs WHERE action = 'can.send' ORDER BY created_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(sent, vec![json!(false), json!(false)]);
    owner.agent.disconnect();
    common::agent::wait_until(|| async {
        send(&owner, frame.clone()).await.json["code"] == "AGENT_OFFLINE"
    })
    .await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn only_the_owner_sends(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let alice = dongle::paired(&app, "alice@example.com", DEV, 0).await;
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, bob_token) = common::agent::register(&bob).await;
    let bob_agent = TestAgent::connect(&app.base, &bob_token).await;
    bob_agent.report(&pool, &[DEV]).await;
    let frame = json!({"can_id": 0x7DF, "data_hex": "0201000000000000"});
    let path = format!("/dongles/{}/can/send", alice.dongle_id);
    read(bob.post_json(&path, frame.clone()).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    read(
        reqwest::Client::new()
            .post(bob.api(&path))
            .bearer_auth(&bob_token)
            .json(&frame)
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    read(
        bob.post_json(&format!("/dongles/{}/can/send", Uuid::new_v4()), frame)
            .await,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    assert!(alice.agent.seen.lock().unwrap().frames.is_empty());
    assert!(bob_agent.seen.lock().unwrap().frames.is_empty());
}
