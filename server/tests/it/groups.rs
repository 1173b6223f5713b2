//! Groups (SPEC 3.8): create, list, read, activate, deactivate, delete; ownership (someone else's group
//! or dongle is a 404); one group per dongle; audit; the `groups` lists agents are sent; unpair.

use crate::common;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::agent::{self, TestAgent};
use common::data::{group, pair};
use common::dongle::audit_count;
use common::{TestApp, TestClient, read, spawn_app};
use control_proto::data::Side;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const DEV_A: &str = "00000000000000a1";
const DEV_B: &str = "00000000000000b2";
const DEV_C: &str = "00000000000000c3";
const DEV_D: &str = "00000000000000d4";

/// A user whose one agent serves three paired dongles.
struct Alice {
    client: TestClient,
    agent: TestAgent,
    a: Uuid,
    b: Uuid,
    c: Uuid,
}

async fn alice(app: &TestApp) -> Alice {
    let (client, _) = app.logged_in("alice@example.com", Role::User).await;
    let (_, token) = agent::register(&client).await;
    let agent = TestAgent::connect(&app.base, &token).await;
    agent.report(&app.pool, &[DEV_A, DEV_B, DEV_C]).await;
    let a = pair(app, &client, DEV_A).await;
    let b = pair(app, &client, DEV_B).await;
    let c = pair(app, &client, DEV_C).await;
    Alice {
        client,
        agent,
        a,
        b,
        c,
    }
}

async fn create(client: &TestClient, a: Uuid, b: Uuid) -> common::Answer {
    read(
        client
            .post_json("/groups", json!({"dongle_a_id": a, "dongle_b_id": b}))
            .await,
    )
    .await
}

async fn post(client: &TestClient, path: &str) -> common::Answer {
    read(client.post_json(path, json!({})).await).await
}

/// The last `groups` list the agent received, as (group, side, device id, next_seq).
fn last_groups(agent: &TestAgent) -> Option<Vec<(Uuid, Side, String, u64)>> {
    agent.seen.lock().unwrap().groups.last().map(|g| {
        g.sides
            .iter()
            .map(|s| (s.group_id, s.side, s.device_id.to_string(), s.next_seq))
            .collect()
    })
}

async fn groups_until(agent: &TestAgent, expected: Vec<(Uuid, Side, String, u64)>) {
    agent::wait_until(|| {
        let got = last_groups(agent);
        let expected = expected.clone();
        async move { got == Some(expected) }
    })
    .await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_group_is_made_activated_deactivated_and_deleted_by_its_owner(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = alice(&app).await;

    let created = create(&alice.client, alice.a, alice.b).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let g = &created.json;
    let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(g["state"], "INACTIVE");
    assert_eq!(g["buffer_pressure"], false);
    assert_eq!(g["dongle_a"]["id"], alice.a.to_string());
    assert_eq!(g["dongle_a"]["device_id"], DEV_A);
    assert_eq!(g["dongle_a"]["online"], true);
    assert_eq!(g["dongle_a"]["data_connected"], false);
    assert_eq!(g["dongle_b"]["id"], alice.b.to_string());
    assert_eq!(g["backlog"], json!({"a_to_b": 0, "b_to_a": 0}));
    assert_eq!(g["frames_relayed"], json!({"a_to_b": 0, "b_to_a": 0}));
    assert_eq!(g["frames_trimmed"], json!({"a_to_b": 0, "b_to_a": 0}));
    assert_eq!(g["frames_received"], json!({"a": 0, "b": 0}));
    assert_eq!(g["agent_drops"], json!({"a": 0, "b": 0}));
    assert_eq!(audit_count(&app, "group.create").await, 1);

    let list = read(alice.client.get("/groups").await).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json["items"].as_array().unwrap().len(), 1);
    assert_eq!(list.json["items"][0]["id"], id.to_string());
    assert_eq!(group(&alice.client, id).await["state"], "INACTIVE");
    // The dongle list shows the membership too.
    let dongle = read(alice.client.get(&format!("/dongles/{}", alice.a)).await).await;
    assert_eq!(dongle.json["group_id"], id.to_string());

    // Activation: the agent serving both dongles is told to stream both sides from position 0. With no
    // data connection yet, the group waits in DEGRADED.
    let activated = post(&alice.client, &format!("/groups/{id}/activate")).await;
    assert_eq!(activated.status, StatusCode::OK, "{}", activated.text);
    assert_eq!(activated.json["state"], "DEGRADED");
    groups_until(
        &alice.agent,
        vec![
            (id, Side::A, DEV_A.into(), 0),
            (id, Side::B, DEV_B.into(), 0),
        ],
    )
    .await;
    assert_eq!(audit_count(&app, "group.activate").await, 1);
    // Idempotent, and audited once.
    let again = post(&alice.client, &format!("/groups/{id}/activate")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(audit_count(&app, "group.activate").await, 1);

    let deactivated = post(&alice.client, &format!("/groups/{id}/deactivate")).await;
    assert_eq!(deactivated.status, StatusCode::OK, "{}", deactivated.text);
    assert_eq!(deactivated.json["state"], "INACTIVE");
    groups_until(&alice.agent, vec![]).await;
    assert_eq!(audit_count(&app, "group.deactivate").await, 1);

    let deleted = alice.client.delete(&format!("/groups/{id}")).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    read(alice.client.get(&format!("/groups/{id}")).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(audit_count(&app, "group.delete").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM dongle_group_members").await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM relay_sides").await, 0);
    // The dongles are free again.
    let regrouped = create(&alice.client, alice.a, alice.c).await;
    assert_eq!(regrouped.status, StatusCode::CREATED, "{}", regrouped.text);

    // A path id that is not a UUID names nothing.
    read(alice.client.get("/groups/not-a-uuid").await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dongle_belongs_to_at_most_one_group(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = alice(&app).await;
    let first = create(&alice.client, alice.a, alice.b).await;
    assert_eq!(first.status, StatusCode::CREATED);
    for (x, y) in [
        (alice.a, alice.c),
        (alice.c, alice.a),
        (alice.b, alice.c),
        (alice.c, alice.b),
        (alice.b, alice.a),
    ] {
        let answer = create(&alice.client, x, y).await;
        answer.assert_error(StatusCode::CONFLICT, "CONFLICT");
        assert!(
            answer.json["message"]
                .as_str()
                .unwrap()
                .contains("already in a group")
        );
    }
    create(&alice.client, alice.c, alice.c)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    read(alice.client.post_json("/groups", json!({})).await)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert_eq!(app.count("SELECT count(*) FROM dongle_groups").await, 1);
    assert_eq!(audit_count(&app, "group.create").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn two_concurrent_requests_cannot_group_one_dongle_twice(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = alice(&app).await;
    let (one, two) = tokio::join!(
        create(&alice.client, alice.a, alice.b),
        create(&alice.client, alice.c, alice.a),
    );
    let mut statuses = [one.status, two.status];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
    assert_eq!(app.count("SELECT count(*) FROM dongle_groups").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn someone_elses_groups_and_dongles_do_not_exist(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = alice(&app).await;
    let id: Uuid = create(&alice.client, alice.a, alice.b).await.json["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, bob_token) = agent::register(&bob).await;
    let bob_agent = TestAgent::connect(&app.base, &bob_token).await;
    bob_agent.report(&app.pool, &[DEV_D]).await;
    let d = pair(&app, &bob, DEV_D).await;

    read(bob.get(&format!("/groups/{id}")).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    for action in ["activate", "deactivate"] {
        post(&bob, &format!("/groups/{id}/{action}"))
            .await
            .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    read(bob.delete(&format!("/groups/{id}")).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let bobs = read(bob.get("/groups").await).await;
    assert_eq!(bobs.json["items"], json!([]));
    // Someone else's dongle, on either side, is not found, as an unknown one is.
    create(&bob, d, alice.c)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    create(&alice.client, alice.c, d)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    create(&alice.client, alice.c, Uuid::new_v4())
        .await
        .assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    // Bob's agent, with its bearer token, sees no more.
    let as_agent = read(
        bob.http
            .get(bob.api(&format!("/groups/{id}")))
            .bearer_auth(&bob_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    as_agent.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(group(&alice.client, id).await["state"], "INACTIVE");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unpairing_a_dongle_deletes_its_group_and_tells_the_agent(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = alice(&app).await;
    let id: Uuid = create(&alice.client, alice.a, alice.b).await.json["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let activated = post(&alice.client, &format!("/groups/{id}/activate")).await;
    assert_eq!(activated.status, StatusCode::OK);
    groups_until(
        &alice.agent,
        vec![
            (id, Side::A, DEV_A.into(), 0),
            (id, Side::B, DEV_B.into(), 0),
        ],
    )
    .await;

    let unpaired = post(&alice.client, &format!("/dongles/{}/unpair", alice.b)).await;
    assert_eq!(unpaired.status, StatusCode::OK, "{}", unpaired.text);
    assert_eq!(unpaired.json["unpaired"], true);
    read(alice.client.get(&format!("/groups/{id}")).await)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    groups_until(&alice.agent, vec![]).await;
    // Dongle A is free for another group.
    let regrouped = create(&alice.client, alice.a, alice.c).await;
    assert_eq!(regrouped.status, StatusCode::CREATED, "{}", regrouped.text);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_group_with_a_reset_dongle_cannot_be_activated(pool: PgPool) {
    let app = spawn_app(pool).await;
    let alice = alice(&app).await;
    let id: Uuid = create(&alice.client, alice.a, alice.b).await.json["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    sqlx::query("UPDATE dongles SET ownership_state = 'RESET_DETECTED' WHERE id = $1")
        .bind(alice.b)
        .execute(&app.pool)
        .await
        .unwrap();
    let refused = post(&alice.client, &format!("/groups/{id}/activate")).await;
    refused.assert_error(StatusCode::CONFLICT, "CONFLICT");
    assert_eq!(refused.json["details"]["dongle_id"], alice.b.to_string());
    assert_eq!(group(&alice.client, id).await["state"], "INACTIVE");
}
