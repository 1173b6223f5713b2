//! Pairing (SPEC 3.4) end to end: a real server, a test agent on the control WebSocket answering as the
//! dongle would, and the HTTP API of users, agents and an admin.

use crate::common;

use std::time::Duration;

use base64::Engine;
use common::agent::{self, NONCE, PIN, TestAgent};
use common::{TestApp, TestClient, read, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

const DEV: &str = "00000000000000d1";

/// A user with a connected agent that sees `DEV`: (client, user id, agent token, agent, dongle id).
async fn user_with_dongle(
    app: &TestApp,
    email: &str,
) -> (TestClient, Uuid, String, TestAgent, Uuid) {
    let (client, user_id) = app.logged_in(email, Role::User).await;
    let (_, token) = agent::register(&client).await;
    let agent = TestAgent::connect(&app.base, &token).await;
    agent.report(&app.pool, &[DEV]).await;
    let dongle_id: Uuid = sqlx::query_scalar("SELECT id FROM dongles WHERE device_id = $1")
        .bind(DEV)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    (client, user_id, token, agent, dongle_id)
}

async fn ownership_state(pool: &PgPool, dongle: Uuid) -> String {
    sqlx::query_scalar("SELECT ownership_state::text FROM dongles WHERE id = $1")
        .bind(dongle)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn start(client: &TestClient, dongle: Uuid) -> common::Answer {
    read(
        client
            .post_json(
                &format!("/dongles/{dongle}/pairing-mode"),
                json!({"action": "start"}),
            )
            .await,
    )
    .await
}

async fn submit(client: &TestClient, dongle: Uuid, session: &Value, pin: &str) -> common::Answer {
    read(
        client
            .post_json(
                &format!("/dongles/{dongle}/pairing-submit"),
                json!({"pairing_session_id": session, "pin": pin}),
            )
            .await,
    )
    .await
}

async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = $1")
        .bind(action)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_right_pin_claims_the_dongle_and_its_agent_gets_the_token(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, alice_id, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;

    let started = start(&alice, dongle).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    assert_eq!(started.json["dongle_id"], dongle.to_string());
    let session = started.json["pairing_session_id"].clone();
    assert!(session.is_string());
    let expires: chrono::DateTime<chrono::Utc> = started.json["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let window = expires - chrono::Utc::now();
    assert!(
        window.num_seconds() > 100 && window.num_seconds() <= 120,
        "{window}"
    );
    assert_eq!(agent.seen.lock().unwrap().pairing_starts, 1);
    // The agent's report sent before its reply (the dongle is in pairing mode now) went through: a
    // report never waits behind a pairing step, nor the reply behind the report.
    agent::wait_until(|| async {
        read(alice.get(&format!("/dongles/{dongle}")).await)
            .await
            .json["pairing_mode"]
            == true
    })
    .await;
    // Nothing is owned before the dongle's ok.
    assert_eq!(app.count("SELECT count(*) FROM dongle_tokens").await, 0);

    let paired = submit(&alice, dongle, &session, PIN).await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    assert_eq!(paired.json["paired"], true);
    assert_eq!(paired.json["owner_user_id"], alice_id.to_string());
    assert!(
        !paired.text.contains("token"),
        "the token never reaches the user"
    );

    let detail = read(alice.get(&format!("/dongles/{dongle}")).await).await;
    assert_eq!(detail.json["ownership_state"], "CLAIMED_ACTIVE");
    assert_eq!(detail.json["owned"], true);
    assert_eq!(detail.json["online"], true);
    assert_eq!(detail.json["agent_id"], agent.agent_id.to_string());
    assert!(detail.json["group_id"].is_null() && detail.json["can_config"].is_null());

    // The stored token is the one the dongle got, and decrypts with the server's keys.
    let sent = agent.seen.lock().unwrap().paired_tokens.clone();
    assert_eq!(sent.len(), 1);
    let keys = app.keys();
    let stored = bridge_server::dongle_tokens::load(&pool, &keys, dongle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(agent::base64_of(&stored), sent[0]);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&sent[0])
            .unwrap()
            .len(),
        32
    );
    // And the serving agent receives it as a dongle_token for its vault.
    agent::wait_until(|| async {
        agent.seen.lock().unwrap().dongle_tokens == vec![(DEV.to_string(), sent[0].clone())]
    })
    .await;
    assert_eq!(audit_count(&app, "pairing.started").await, 1);
    assert_eq!(audit_count(&app, "pairing.succeeded").await, 1);
    // The next report of its own claimed dongle hands the token over again (e.g. after a restart).
    agent.report(&pool, &[DEV]).await;
    agent::wait_until(|| async { agent.seen.lock().unwrap().dongle_tokens.len() == 2 }).await;
    let _ = NONCE;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn pairing_works_from_the_agent_token_too(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, alice_id, token, _agent, dongle) =
        user_with_dongle(&app, "alice@example.com").await;
    let http = reqwest::Client::new();
    let started = read(
        http.post(alice.api(&format!("/dongles/{dongle}/pairing-mode")))
            .bearer_auth(&token)
            .json(&json!({"action": "start"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    let paired = read(
        http.post(alice.api(&format!("/dongles/{dongle}/pairing-submit")))
            .bearer_auth(&token)
            .json(&json!({"pairing_session_id": started.json["pairing_session_id"], "pin": PIN}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    assert_eq!(paired.json["owner_user_id"], alice_id.to_string());
}

/// Five wrong PINs hold the account that entered them, for that dongle, until an administrator clears
/// the hold; the dongle itself is not held, so a stranger whose agent sees an unclaimed dongle cannot
/// lock out whoever holds it (issue 24). Before, the fifth wrong PIN of anyone put the dongle on
/// SECURITY_HOLD for everybody.
/// An administrator sees which accounts are held from pairing a dongle, in the API and on the
/// dashboard, and releases them without touching the dongle's owner (issue 24: before, holds were
/// invisible, and only a force-unpair, which also unpairs the owner, released them).
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_administrator_sees_and_releases_the_accounts_held_on_a_dongle(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (mallory, _, _, _agent, dongle) = user_with_dongle(&app, "mallory@example.com").await;
    let session = start(&mallory, dongle).await.json["pairing_session_id"].clone();
    for _ in 0..5 {
        submit(&mallory, dongle, &session, "000000").await;
    }
    start(&mallory, dongle)
        .await
        .assert_error(StatusCode::CONFLICT, "PAIRING_SECURITY_HOLD");
    let (alice, alice_id, _, _alices, _) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await;
    submit(&alice, dongle, &session.json["pairing_session_id"], PIN).await;
    assert_eq!(ownership_state(&pool, dongle).await, "CLAIMED_ACTIVE");

    let (admin, _) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    let held = read(admin.get("/admin/dongles?held=true").await).await;
    assert_eq!(held.status, StatusCode::OK, "{}", held.text);
    assert_eq!(held.json["total"], 1, "{}", held.text);
    assert_eq!(held.json["items"][0]["id"], dongle.to_string());
    let holds = &held.json["items"][0]["pairing_holds"];
    assert_eq!(holds.as_array().map(Vec::len), Some(1), "{holds}");
    assert_eq!(holds[0]["email"], "mallory@example.com");
    assert_eq!(holds[0]["reason"], "too_many_wrong_pins");
    assert!(holds[0]["since"].is_string(), "{holds}");
    let page = admin.page("/admin/dongles?held=true").await;
    assert!(
        page.contains("Held from pairing: mallory@example.com"),
        "{page}"
    );
    assert!(page.contains("Release held accounts"), "{page}");

    // Nobody but a super_admin releases them.
    let path = format!("/admin/dongles/{dongle}/release-holds");
    read(mallory.post_json(&path, json!({})).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let released = read(admin.post_json(&path, json!({})).await).await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.text);
    assert_eq!(released.json["released"], 1);
    assert_eq!(audit_count(&app, "pairing.hold_exited").await, 1);
    let held = read(admin.get("/admin/dongles?held=true").await).await;
    assert_eq!(held.json["total"], 0, "{}", held.text);
    // The owner keeps the dongle; mallory is no longer held, only refused as a stranger.
    assert_eq!(ownership_state(&pool, dongle).await, "CLAIMED_ACTIVE");
    let owner: Uuid = sqlx::query_scalar("SELECT owner_user_id FROM dongles WHERE id = $1")
        .bind(dongle)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, alice_id);
    start(&mallory, dongle)
        .await
        .assert_error(StatusCode::CONFLICT, "DONGLE_OWNED_BY_OTHER");
    // Releasing again changes nothing.
    let again = read(admin.post_json(&path, json!({})).await).await;
    assert_eq!(again.json["released"], 0, "{}", again.text);
    assert_eq!(audit_count(&app, "pairing.hold_exited").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn five_wrong_pins_hold_that_account_not_the_dongle_until_an_admin_clears_it(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (mallory, _, _, agent, dongle) = user_with_dongle(&app, "mallory@example.com").await;
    let session = start(&mallory, dongle).await.json["pairing_session_id"].clone();
    for left in (1..=4).rev() {
        let answer = submit(&mallory, dongle, &session, "000000").await;
        answer.assert_error(StatusCode::BAD_REQUEST, "PAIRING_PIN_INVALID");
        assert_eq!(answer.json["details"]["attempts_left"], left);
        assert!(!answer.text.contains("000000"), "the PIN is not echoed");
    }
    submit(&mallory, dongle, &session, "000000")
        .await
        .assert_error(StatusCode::CONFLICT, "PAIRING_SECURITY_HOLD");
    // That account is held: even the right PIN and a new start are refused.
    submit(&mallory, dongle, &session, PIN)
        .await
        .assert_error(StatusCode::CONFLICT, "PAIRING_SECURITY_HOLD");
    start(&mallory, dongle)
        .await
        .assert_error(StatusCode::CONFLICT, "PAIRING_SECURITY_HOLD");
    assert_eq!(agent.seen.lock().unwrap().pairing_submits, 5);
    assert_eq!(audit_count(&app, "pairing.hold_entered").await, 1);
    let state = ownership_state(&pool, dongle).await;
    assert_eq!(state, "UNCLAIMED", "the dongle itself is not held");

    // The one who holds the dongle pairs it all the same (through an agent of their own that sees it).
    let (alice, alice_id, _, _alices, _) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.text);
    let paired = submit(&alice, dongle, &session.json["pairing_session_id"], PIN).await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    assert_eq!(paired.json["owner_user_id"], alice_id.to_string());

    // Only a super_admin clears the hold: a force-unpair clears every account's hold on the dongle.
    read(
        mallory
            .post_json(&format!("/admin/dongles/{dongle}/force-unpair"), json!({}))
            .await,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let (admin, _) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    let answer = read(
        admin
            .post_json(&format!("/admin/dongles/{dongle}/force-unpair"), json!({}))
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(audit_count(&app, "pairing.hold_exited").await, 1);
    assert_eq!(audit_count(&app, "admin.dongle_force_unpaired").await, 1);
    let session = start(&mallory, dongle).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.text);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_expired_window_answers_pairing_expired(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    sqlx::query("UPDATE pairing_sessions SET expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    submit(&alice, dongle, &session, PIN)
        .await
        .assert_error(StatusCode::GONE, "PAIRING_EXPIRED");
    assert_eq!(
        agent.seen.lock().unwrap().pairing_submits,
        0,
        "nothing sent"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM dongles WHERE owner_user_id IS NOT NULL")
            .await,
        0
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_same_user_twice_is_idempotent(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, alice_id, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
    let again = submit(&alice, dongle, &session, PIN).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json["owner_user_id"], alice_id.to_string());
    let restart = start(&alice, dongle).await;
    assert_eq!(restart.status, StatusCode::OK);
    assert_eq!(restart.json["paired"], true);
    assert!(restart.json["pairing_session_id"].is_null());
    let seen = agent.seen.lock().unwrap();
    assert_eq!((seen.pairing_starts, seen.pairing_submits), (1, 1));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn owned_by_another_user_answers_dongle_owned_by_other_and_nothing_else(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, alice_agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
    alice_agent.close();

    // Bob's agent now sees Alice's dongle (it moved to his bench).
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, bob_token) = agent::register(&bob).await;
    let bob_agent = TestAgent::connect(&app.base, &bob_token).await;
    bob_agent.report(&pool, &[DEV]).await;

    let answer = start(&bob, dongle).await;
    answer.assert_error(StatusCode::CONFLICT, "DONGLE_OWNED_BY_OTHER");
    let details = answer.json["details"].as_object().unwrap();
    assert_eq!(
        details.len(),
        1,
        "nothing but the request id: {}",
        answer.text
    );
    // From Bob's agent token too, and for a submit.
    let http = reqwest::Client::new();
    read(
        http.post(bob.api(&format!("/dongles/{dongle}/pairing-mode")))
            .bearer_auth(&bob_token)
            .json(&json!({"action": "start"}))
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "DONGLE_OWNED_BY_OTHER");
    submit(&bob, dongle, &session, PIN)
        .await
        .assert_error(StatusCode::CONFLICT, "DONGLE_OWNED_BY_OTHER");
    assert_eq!(bob_agent.seen.lock().unwrap().pairing_starts, 0);
    assert_eq!(audit_count(&app, "pairing.start_refused").await, 2);
    assert_eq!(audit_count(&app, "pairing.submit_refused").await, 1);
    // Bob's agent never receives Alice's token, and Bob cannot see, read or unpair the dongle.
    assert!(bob_agent.seen.lock().unwrap().dongle_tokens.is_empty());
    read(bob.get(&format!("/dongles/{dongle}")).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    assert_eq!(
        read(bob.get("/dongles").await).await.json["items"],
        json!([])
    );
    read(
        bob.post_json(&format!("/dongles/{dongle}/unpair"), json!({}))
            .await,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    assert_eq!(
        app.count("SELECT count(*) FROM pairing_sessions").await,
        1,
        "no session for Bob"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn cross_user_requests_answer_404(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, _agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    // Bob has an agent, but it does not see the dongle: for him it does not exist.
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, bob_token) = agent::register(&bob).await;
    let bob_agent = TestAgent::connect(&app.base, &bob_token).await;
    read(bob.get(&format!("/dongles/{dongle}")).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    start(&bob, dongle)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    let http = reqwest::Client::new();
    read(
        http.post(bob.api(&format!("/dongles/{dongle}/pairing-mode")))
            .bearer_auth(&bob_token)
            .json(&json!({"action": "start"}))
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    read(
        http.get(bob.api(&format!("/dongles/{dongle}")))
            .bearer_auth(&bob_token)
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    // An unknown id answers exactly the same.
    start(&bob, Uuid::new_v4())
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    // Alice's session cannot be used by Bob either.
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    submit(&bob, dongle, &session, PIN)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    assert_eq!(bob_agent.seen.lock().unwrap().pairing_starts, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn two_racing_submits_have_one_winner(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, alice_id, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    agent.seen.lock().unwrap().submit_delay = Duration::from_millis(300);
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    let (a, b) = tokio::join!(
        submit(&alice, dongle, &session, PIN),
        submit(&alice, dongle, &session, PIN)
    );
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(a.json["owner_user_id"], alice_id.to_string());
    assert_eq!(b.json["owner_user_id"], alice_id.to_string());
    // One pairing reached the dongle; the second found the dongle already owned.
    let (submits, tokens) = {
        let seen = agent.seen.lock().unwrap();
        (seen.pairing_submits, seen.paired_tokens.len())
    };
    assert_eq!((submits, tokens), (1, 1));
    assert_eq!(audit_count(&app, "pairing.succeeded").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM dongle_tokens").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn no_agent_online_answers_agent_offline(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    // Silent for 31 s: offline, though its socket is still open.
    sqlx::query("UPDATE agents SET last_seen_at = now() - interval '31 seconds'")
        .execute(&pool)
        .await
        .unwrap();
    start(&alice, dongle)
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "AGENT_OFFLINE");
    assert_eq!(audit_count(&app, "pairing.start_refused").await, 1);
    // Socket closed: offline too.
    sqlx::query("UPDATE agents SET last_seen_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    agent.close();
    agent::wait_until(|| async { start(&alice, dongle).await.json["code"] == "AGENT_OFFLINE" })
        .await;
}

/// Starts are counted per dongle and user: past ten an hour, that user is told to wait (429 with
/// Retry-After), and the dongle is not put on hold, so a stranger who sees it cannot lock out whoever
/// holds it (issue 24). Before, the eleventh start of anyone put the dongle on SECURITY_HOLD for all.
#[sqlx::test(migrator = "MIGRATOR")]
async fn more_than_ten_starts_an_hour_make_that_user_wait_and_hold_nothing(pool: PgPool) {
    let app = common::spawn_app_with(pool.clone(), |c| {
        c.pairing_window = Duration::from_millis(300);
    })
    .await;
    let (mallory, _, _, agent, dongle) = user_with_dongle(&app, "mallory@example.com").await;
    for _ in 0..10 {
        assert_eq!(start(&mallory, dongle).await.status, StatusCode::OK);
    }
    let refused = start(&mallory, dongle).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    assert!(refused.headers.get("retry-after").is_some());
    assert_eq!(agent.seen.lock().unwrap().pairing_starts, 10);
    let state = ownership_state(&pool, dongle).await;
    assert_eq!(state, "UNCLAIMED");

    // The one who holds the dongle pairs it all the same, once mallory's last window has ended.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (alice, _, _, _alices, _) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.text);
    let session = session.json["pairing_session_id"].clone();
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
}

/// Another account's start no longer cancels an open pairing window: the dongle holds one nonce, and a
/// stranger who sees it could otherwise cancel the holder's pairing again and again.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_stranger_cannot_cancel_an_open_pairing_window(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, _agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    let (mallory, _) = app.logged_in("mallory@example.com", Role::User).await;
    let (_, token) = agent::register(&mallory).await;
    let mallorys = TestAgent::connect(&app.base, &token).await;
    mallorys.report(&app.pool, &[DEV]).await;
    let refused = start(&mallory, dongle).await;
    refused.assert_error(StatusCode::CONFLICT, "CONFLICT");
    assert_eq!(mallorys.seen.lock().unwrap().pairing_starts, 0);
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
}

/// An administrator's force-unpair that lands while a PIN is being checked waits for the check, then
/// undoes the pairing the dongle has already taken: the dongle ends unclaimed, and is told to forget the
/// new token (issue 24: before, the force-unpair cancelled the window and returned at once, and the
/// submit then made the dongle its caller's, as if no administrator had acted).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_force_unpair_during_a_pin_submit_is_not_undone_by_it(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    agent.seen.lock().unwrap().submit_delay = Duration::from_millis(1500);
    let (admin, _) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    let submitting = {
        let alice = alice.clone();
        tokio::spawn(async move { submit(&alice, dongle, &session, PIN).await })
    };
    agent::wait_until(|| async { agent.seen.lock().unwrap().pairing_submits == 1 }).await;
    let unpaired = read(
        admin
            .post_json(&format!("/admin/dongles/{dongle}/force-unpair"), json!({}))
            .await,
    )
    .await;
    assert_eq!(unpaired.status, StatusCode::OK, "{}", unpaired.text);
    // The dongle took the PIN before the force-unpair ran, so the submit succeeded...
    let paired = submitting.await.unwrap();
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    // ...and the force-unpair, which came after it, stands.
    assert_eq!(ownership_state(&pool, dongle).await, "UNCLAIMED");
    assert_eq!(app.count("SELECT count(*) FROM dongle_tokens").await, 0);
    agent::wait_until(|| async { agent.seen.lock().unwrap().forgets == vec![DEV.to_string()] })
        .await;
    assert_eq!(audit_count(&app, "pairing.succeeded").await, 1);
    assert_eq!(audit_count(&app, "admin.dongle_force_unpaired").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unpair_clears_owner_and_token_and_tells_the_dongle_to_forget(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, alice_id, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
    // A group with a second dongle of Alice's: unpairing removes the membership.
    let other: Uuid = sqlx::query_scalar(
        "INSERT INTO dongles (device_id, owner_user_id, ownership_state) \
         VALUES ('00000000000000d2', $1, 'CLAIMED_ACTIVE') RETURNING id",
    )
    .bind(alice_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dongle_groups (user_id, dongle_a_id, dongle_b_id) VALUES ($1, $2, $3)",
    )
    .bind(alice_id)
    .bind(dongle)
    .bind(other)
    .execute(&pool)
    .await
    .unwrap();
    let answer = read(
        alice
            .post_json(&format!("/dongles/{dongle}/unpair"), json!({}))
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json["forget_sent"], true);
    agent::wait_until(|| async { agent.seen.lock().unwrap().forgets == vec![DEV.to_string()] })
        .await;
    assert_eq!(app.count("SELECT count(*) FROM dongle_tokens").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM dongle_group_members").await,
        0
    );
    let detail = read(alice.get(&format!("/dongles/{dongle}")).await).await;
    assert_eq!(detail.json["ownership_state"], "UNCLAIMED");
    assert_eq!(audit_count(&app, "dongle.unpaired").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_rejected_token_marks_the_dongle_reset_detected(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
    agent.send(control_proto::AgentMessage::Event(
        control_proto::Event::TokenRejected {
            device_id: DEV.parse().unwrap(),
        },
    ));
    agent::wait_until(|| async {
        read(alice.get(&format!("/dongles/{dongle}")).await)
            .await
            .json["ownership_state"]
            == "RESET_DETECTED"
    })
    .await;
    assert_eq!(audit_count(&app, "dongle.reset_detected").await, 1);
    // The owner can pair it again.
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
    let detail = read(alice.get(&format!("/dongles/{dongle}")).await).await;
    assert_eq!(detail.json["ownership_state"], "CLAIMED_ACTIVE");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dongle_seen_by_several_agents_is_served_by_the_callers_own(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    // A LAN dongle seen from Alice's two workstations and from Bob's, Bob's report last.
    let (alice, alice_id, first_token, first, dongle) =
        user_with_dongle(&app, "alice@example.com").await;
    let (_, second_token) = agent::register(&alice).await;
    let second = TestAgent::connect(&app.base, &second_token).await;
    second.report(&pool, &[DEV]).await;
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, bob_token) = agent::register(&bob).await;
    let bob_agent = TestAgent::connect(&app.base, &bob_token).await;
    bob_agent.report(&pool, &[DEV]).await;

    // Both users see the unclaimed dongle, each through their own agents.
    let list = read(alice.get("/dongles").await).await;
    assert_eq!(
        list.json["items"][0]["id"],
        dongle.to_string(),
        "{}",
        list.text
    );
    assert_eq!(list.json["items"][0]["online"], true);
    let list = read(bob.get("/dongles").await).await;
    assert_eq!(list.json["items"][0]["id"], dongle.to_string());

    // Alice pairs from her first workstation's token, which did not report last.
    let http = reqwest::Client::new();
    let started = read(
        http.post(alice.api(&format!("/dongles/{dongle}/pairing-mode")))
            .bearer_auth(&first_token)
            .json(&json!({"action": "start"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    assert_eq!(first.seen.lock().unwrap().pairing_starts, 1);
    let paired = read(
        http.post(alice.api(&format!("/dongles/{dongle}/pairing-submit")))
            .bearer_auth(&first_token)
            .json(&json!({"pairing_session_id": started.json["pairing_session_id"], "pin": PIN}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    assert_eq!(paired.json["owner_user_id"], alice_id.to_string());

    // Bob's agent, which sees it too, is told it belongs to someone else, and gets no token.
    read(
        http.post(bob.api(&format!("/dongles/{dongle}/pairing-mode")))
            .bearer_auth(&bob_token)
            .json(&json!({"action": "start"}))
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "DONGLE_OWNED_BY_OTHER");
    assert_eq!(
        read(bob.get("/dongles").await).await.json["items"],
        json!([])
    );
    // Alice's second workstation gets the token when it reports the dongle; Bob's never does.
    second.report(&pool, &[DEV]).await;
    agent::wait_until(|| async { second.seen.lock().unwrap().dongle_tokens.len() == 1 }).await;
    bob_agent.report(&pool, &[DEV]).await;
    assert!(bob_agent.seen.lock().unwrap().dongle_tokens.is_empty());
}

/// A dongle marked RESET_DETECTED because its token seemed refused (a link that lost the answers looks
/// the same as a refusal on plain REMP v1) is the owner's again, without pairing anew, once the owner's
/// agent authenticates to it: `token_accepted`. Another user's agent saying so changes nothing.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dongle_in_reset_detected_recovers_when_its_token_is_accepted_again(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (alice, _, _, agent, dongle) = user_with_dongle(&app, "alice@example.com").await;
    let session = start(&alice, dongle).await.json["pairing_session_id"].clone();
    assert_eq!(
        submit(&alice, dongle, &session, PIN).await.status,
        StatusCode::OK
    );
    let state = || async {
        read(alice.get(&format!("/dongles/{dongle}")).await)
            .await
            .json["ownership_state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    agent.send(control_proto::AgentMessage::Event(
        control_proto::Event::TokenRejected {
            device_id: DEV.parse().unwrap(),
        },
    ));
    agent::wait_until(|| async { state().await == "RESET_DETECTED" }).await;

    // Bob's agent claims the token was accepted: nothing changes.
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, bob_token) = agent::register(&bob).await;
    let bobs = TestAgent::connect(&app.base, &bob_token).await;
    bobs.send(control_proto::AgentMessage::Event(
        control_proto::Event::TokenAccepted {
            device_id: DEV.parse().unwrap(),
        },
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(state().await, "RESET_DETECTED");

    agent.send(control_proto::AgentMessage::Event(
        control_proto::Event::TokenAccepted {
            device_id: DEV.parse().unwrap(),
        },
    ));
    agent::wait_until(|| async { state().await == "CLAIMED_ACTIVE" }).await;
    assert_eq!(audit_count(&app, "dongle.token_accepted_again").await, 1);
}
