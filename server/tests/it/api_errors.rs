//! Every non-2xx answer has the standard shape with a request id, including the answers axum would make
//! by itself; the request id is accepted, generated and returned; health, readiness and metrics answer.

use crate::common;

use common::{PASSWORD, read, spawn_app};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

#[sqlx::test(migrator = "MIGRATOR")]
async fn unknown_routes_and_wrong_methods_answer_in_the_standard_shape(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();

    let answer = read(client.get("/no/such/route").await).await;
    answer.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let answer = read(
        client
            .http
            .get(client.url("/nothing-here"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");

    let answer = read(client.get("/auth/login").await).await;
    answer.assert_error(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
    let answer = read(
        client
            .http
            .delete(client.url("/healthz"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn bad_bodies_answer_400_413_and_415_in_the_standard_shape(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    let post_raw = |body: String, content_type: &'static str| {
        client
            .http
            .post(client.api("/auth/signup"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    let answer = read(
        post_raw("{not json".into(), "application/json")
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    let answer = read(
        post_raw(r#"{"email":"a@b.c"}"#.into(), "application/json")
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert!(
        answer.json["message"]
            .as_str()
            .unwrap()
            .contains("password"),
        "{}",
        answer.text
    );

    let answer = read(
        post_raw(r#"{"email":1,"password":2}"#.into(), "application/json")
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    let answer = read(post_raw("{}".into(), "text/plain").await.unwrap()).await;
    answer.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE");

    let huge = format!(
        r#"{{"email":"a@b.c","password":"{}"}}"#,
        "x".repeat(200 * 1024)
    );
    let answer = read(post_raw(huge, "application/json").await.unwrap()).await;
    answer.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_path_id_that_is_not_a_uuid_answers_404(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (user, _) = app.logged_in("user@example.com", Role::User).await;
    let answer = read(user.delete("/auth/sessions/not-a-uuid").await).await;
    answer.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let answer = read(
        user.delete("/auth/sessions/00000000-0000-0000-0000-000000000000")
            .await,
    )
    .await;
    answer.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");

    let (admin, _) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    let answer = read(
        admin
            .post_json("/admin/users/12345/disable", json!({}))
            .await,
    )
    .await;
    answer.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let answer = read(admin.get("/admin/audit-logs?actor=not-a-uuid").await).await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_request_id_is_accepted_generated_and_returned(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();

    let res = client
        .http
        .get(client.api("/auth/me"))
        .header("X-Request-ID", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-42");
    let answer = read(res).await;
    assert_eq!(
        answer.assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED"),
        "trace-42"
    );

    let res = client
        .http
        .get(client.url("/healthz"))
        .send()
        .await
        .unwrap();
    let generated = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");

    let res = client
        .http
        .get(client.url("/healthz"))
        .header("X-Request-ID", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], "bad id with spaces");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn health_readiness_and_metrics_answer(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let client = app.client();

    let answer = read(
        client
            .http
            .get(client.url("/healthz"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json["status"], "ok");

    let answer = read(client.http.get(client.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json["status"], "ready");

    let res = client
        .http
        .get(client.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    assert!(text.contains("http_requests_total"), "{text}");

    // A database that lost a migration is not ready.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 2")
        .execute(&pool)
        .await
        .unwrap();
    let answer = read(client.http.get(client.url("/readyz")).send().await.unwrap()).await;
    answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY");
    app.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn two_servers_in_one_process_share_the_metrics_recorder(pool: PgPool) {
    let first = spawn_app(pool.clone()).await;
    let second = spawn_app(pool).await;
    for app in [&first, &second] {
        let client = app.client();
        let res = client
            .http
            .get(client.url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let _ = PASSWORD;
    first.stop().await;
    second.stop().await;
}
