//! Odd but legal input that API fuzzing (`scripts/api-fuzz`) turned up: nothing a client sends produces a
//! 500, and the answers are the ones the OpenAPI document promises.

use crate::common;

use common::{read, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

#[sqlx::test(migrator = "MIGRATOR")]
async fn text_with_a_nul_character_is_a_validation_error_not_a_500(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (user, _) = app.logged_in("tech@example.com", Role::User).await;
    // PostgreSQL cannot store U+0000 in text; JSON can carry it.
    let answer = read(
        user.post_json("/agents/register", json!({"agent_name": "bench\u{0}1"}))
            .await,
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert_eq!(app.count("SELECT count(*) FROM agents").await, 0);
    // And the same in a query string.
    let admin = app.logged_in("admin@example.com", Role::SuperAdmin).await.0;
    let answer = read(admin.get("/admin/users?email=a%00b").await).await;
    assert_ne!(
        answer.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        answer.text
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_whole_number_written_with_a_fraction_is_an_integer(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (user, _) = app.logged_in("tech@example.com", Role::User).await;
    let path = format!("/dongles/{}/commands", uuid::Uuid::new_v4());
    // `1000.0` is the integer 1000 to JSON Schema: the body fits, and the unknown dongle answers.
    let answer = read(
        user.post_json(&path, json!({"command": "version", "timeout_ms": 1000.0}))
            .await,
    )
    .await;
    answer.assert_error(StatusCode::NOT_FOUND, "DONGLE_NOT_FOUND");
    // A real fraction still does not fit an integer.
    let answer = read(
        user.post_json(&path, json!({"command": "version", "timeout_ms": 1000.5}))
            .await,
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_document_promises_the_answers_of_the_shared_layers(pool: PgPool) {
    let app = spawn_app(pool).await;
    let doc: Value = reqwest::get(format!("{}/api/v1/openapi.json", app.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut bodies = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = &op["responses"];
            if op.get("requestBody").is_some() {
                bodies += 1;
                for status in ["400", "413", "415"] {
                    assert!(
                        responses.get(status).is_some(),
                        "{method} {path} takes a body but does not document {status}"
                    );
                }
            }
            if path.starts_with("/api/v1/") {
                assert!(
                    responses.get("503").is_some(),
                    "{method} {path} does not document 503"
                );
            }
        }
    }
    assert!(bodies > 10, "only {bodies} operations take a body");

    // The 415 is real: a body without a JSON content type.
    let (user, _) = app.logged_in("tech@example.com", Role::User).await;
    let answer = read(
        user.request(reqwest::Method::POST, "/agents/register")
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE");
}
