//! Password reset and signup answer the same for known and unknown emails; reset tokens are single use
//! and expire; a reset ends every session of the user.

use crate::common;

use common::{PASSWORD, read, spawn_app};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

const NEW_PASSWORD: &str = "a brand new passphrase";

#[sqlx::test(migrator = "MIGRATOR")]
async fn known_and_unknown_emails_get_identical_answers(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_user("known@example.com", Role::User).await;
    let client = app.client();

    let known = read(
        client
            .post_json(
                "/auth/password-reset/request",
                json!({ "email": "known@example.com" }),
            )
            .await,
    )
    .await;
    let unknown = read(
        client
            .post_json(
                "/auth/password-reset/request",
                json!({ "email": "unknown@example.com" }),
            )
            .await,
    )
    .await;
    assert_eq!(known.status, StatusCode::ACCEPTED);
    assert_eq!((known.status, &known.text), (unknown.status, &unknown.text));

    let known = read(client.signup("known@example.com", PASSWORD).await).await;
    let unknown = read(client.signup("fresh@example.com", PASSWORD).await).await;
    assert_eq!(known.status, StatusCode::ACCEPTED);
    assert_eq!((known.status, &known.text), (unknown.status, &unknown.text));
    // The owner of the known address is told instead.
    assert_eq!(
        app.count("SELECT count(*) FROM email_outbox WHERE to_email = 'known@example.com' AND template = 'account_exists'").await,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM users").await, 2);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_reset_token_works_once_and_ends_every_session(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (laptop, _) = app.logged_in("tech@example.com", Role::User).await;
    let mut phone = app.client();
    phone.login("tech@example.com", PASSWORD).await;
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 2);

    let anon = app.client();
    anon.post_json(
        "/auth/password-reset/request",
        json!({ "email": "tech@example.com" }),
    )
    .await;
    let token = app.mailed_token("tech@example.com", "password_reset").await;

    // A weak password is refused without using the token up.
    let weak = read(
        anon.post_json(
            "/auth/password-reset/confirm",
            json!({ "token": token, "password": "password" }),
        )
        .await,
    )
    .await;
    weak.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    let answer = read(
        anon.post_json(
            "/auth/password-reset/confirm",
            json!({ "token": token, "password": NEW_PASSWORD }),
        )
        .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 0);
    read(laptop.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
    read(phone.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");

    // Single use.
    let again = read(
        anon.post_json(
            "/auth/password-reset/confirm",
            json!({ "token": token, "password": "yet another passphrase" }),
        )
        .await,
    )
    .await;
    again.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    let mut client = app.client();
    client
        .login("tech@example.com", PASSWORD)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID_CREDENTIALS");
    assert_eq!(
        client.login("tech@example.com", NEW_PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_logs WHERE action = 'auth.password_reset'")
            .await,
        1
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_expired_reset_token_is_refused(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_user("tech@example.com", Role::User).await;
    let client = app.client();
    client
        .post_json(
            "/auth/password-reset/request",
            json!({ "email": "tech@example.com" }),
        )
        .await;
    let token = app.mailed_token("tech@example.com", "password_reset").await;
    let ttl_minutes = app
        .count("SELECT round(extract(epoch FROM expires_at - created_at) / 60)::bigint FROM password_reset_tokens")
        .await;
    assert_eq!(ttl_minutes, 60);
    sqlx::query("UPDATE password_reset_tokens SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let answer = read(
        client
            .post_json(
                "/auth/password-reset/confirm",
                json!({ "token": token, "password": NEW_PASSWORD }),
            )
            .await,
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_expired_verification_token_is_refused(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    client.signup("tech@example.com", PASSWORD).await;
    let token = app.mailed_token("tech@example.com", "verify_email").await;
    let ttl_hours = app
        .count("SELECT round(extract(epoch FROM expires_at - created_at) / 3600)::bigint FROM email_verification_tokens")
        .await;
    assert_eq!(ttl_hours, 24);
    sqlx::query("UPDATE email_verification_tokens SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let answer = read(
        client
            .post_json("/auth/verify-email", json!({ "token": token }))
            .await,
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
}
