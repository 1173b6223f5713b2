//! Accounts from signup to logout: verification, login, me, sessions, CSRF, cookies, expiry, and what
//! must never leave the server.

use crate::common;

use common::{PASSWORD, TestApp, read, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

fn set_cookie(answer: &common::Answer) -> String {
    answer
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("bridge_session="))
        .expect("a session cookie")
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("bridge_session=")
        .to_string()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_whole_account_lifecycle(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut client = app.client();

    // Sign up; the verification token is read from the outbox.
    let answer = read(client.signup(" Tech@Example.com ", PASSWORD).await).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let token = app.mailed_token("tech@example.com", "verify_email").await;
    assert!(!answer.text.contains(&token));

    // Log in (the email is normalised), then see ourselves, unverified.
    let login = client.login("TECH@example.com", PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text);
    assert_eq!(login.json["user"]["email"], "tech@example.com");
    assert_eq!(login.json["user"]["role"], "user");
    let me = read(client.get("/auth/me").await).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json["email_verified"], false);

    // Verify the address; the token is single use.
    let answer = read(
        client
            .post_json("/auth/verify-email", json!({ "token": token }))
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let me = read(client.get("/auth/me").await).await;
    assert_eq!(me.json["email_verified"], true);
    let answer = read(
        client
            .post_json("/auth/verify-email", json!({ "token": token }))
            .await,
    )
    .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    // A second login elsewhere; both sessions are listed, one of them current.
    let mut phone = app.client();
    assert_eq!(
        phone.login("tech@example.com", PASSWORD).await.status,
        StatusCode::OK
    );
    let list = read(client.get("/auth/sessions").await).await;
    assert_eq!(list.status, StatusCode::OK);
    let sessions = list.json["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    let other = sessions.iter().find(|s| s["current"] == false).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // End the phone's session from the first client.
    let answer = read(client.delete(&format!("/auth/sessions/{other}")).await).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text);
    read(phone.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");

    // Logout ends the server session and clears the cookie.
    let secret_before: i64 = app.count("SELECT count(*) FROM sessions").await;
    assert_eq!(secret_before, 1);
    let answer = read(client.post_json("/auth/logout", json!({})).await).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text);
    let cleared = set_cookie(&answer);
    assert!(cleared.starts_with("bridge_session=;"), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 0);
    read(client.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");

    // The audit log has the story.
    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_logs ORDER BY created_at, action")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    for expected in [
        "auth.signup",
        "auth.login",
        "auth.email_verified",
        "auth.session_ended",
        "auth.logout",
    ] {
        assert!(
            actions.iter().any(|a| a == expected),
            "{expected} missing from {actions:?}"
        );
    }
    let _ = phone.csrf.take();
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_session_cookie_is_httponly_lax_rooted_and_not_secure_over_http(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_user("tech@example.com", Role::User).await;
    let mut client = app.client();
    let login = client.login("tech@example.com", PASSWORD).await;
    let cookie = set_cookie(&login);
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let value = cookie_value(&cookie);
    assert_eq!(value.len(), 64, "256 random bits in hex");

    // The database keeps only the SHA-256 of the id.
    let stored: String = sqlx::query_scalar("SELECT id FROM sessions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_ne!(stored, value);
    assert_eq!(stored, bridge_server::auth::token::digest(&value));

    // A new id at every login, and the old one ends.
    let again = client.login("tech@example.com", PASSWORD).await;
    assert_ne!(cookie_value(&set_cookie(&again)), value);
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unsafe_requests_need_the_sessions_csrf_token(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (mut client, _) = app.logged_in("tech@example.com", Role::User).await;
    let good = client.csrf.take().unwrap();

    // Without the header, or with another value, an unsafe request is refused.
    read(client.post_json("/auth/logout", json!({})).await)
        .await
        .assert_error(StatusCode::FORBIDDEN, "CSRF_INVALID");
    client.csrf = Some("0".repeat(64));
    read(client.post_json("/auth/logout", json!({})).await)
        .await
        .assert_error(StatusCode::FORBIDDEN, "CSRF_INVALID");

    // Another session's token does not fit this one.
    let (other, _) = app.logged_in("other@example.com", Role::User).await;
    client.csrf = other.csrf.clone();
    read(client.post_json("/auth/logout", json!({})).await)
        .await
        .assert_error(StatusCode::FORBIDDEN, "CSRF_INVALID");

    // GET is safe; /auth/csrf gives the token that the login gave.
    client.csrf = None;
    assert_eq!(client.csrf().await, good);
    let answer = read(client.post_json("/auth/logout", json!({})).await).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn logout_without_a_session_still_clears_the_cookie(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    let answer = read(client.post_json("/auth/logout", json!({})).await).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert!(set_cookie(&answer).contains("Max-Age=0"));
}

async fn expire(app: &TestApp, column: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE sessions SET {column} = now() - interval '1 second'"
    )))
    .execute(&app.pool)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_idle_session_expires(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (client, _) = app.logged_in("tech@example.com", Role::User).await;
    // Each use slides the idle deadline forward, never past the absolute one.
    let (idle, absolute): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT expires_at, absolute_expires_at FROM sessions")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(idle < absolute);
    let minutes = (idle - chrono::Utc::now()).num_minutes();
    assert!(
        (28..=30).contains(&minutes),
        "idle timeout 30 min: {minutes}"
    );
    let hours = (absolute - chrono::Utc::now()).num_minutes();
    assert!(
        (11 * 60 + 58..=12 * 60).contains(&hours),
        "absolute 12 h: {hours} min"
    );

    sqlx::query("UPDATE sessions SET expires_at = now() + interval '1 minute'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        read(client.get("/auth/me").await).await.status,
        StatusCode::OK
    );
    let slid: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT expires_at FROM sessions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        (slid - chrono::Utc::now()).num_minutes() >= 28,
        "the use slid the deadline"
    );

    expire(&app, "expires_at").await;
    read(client.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_SESSION_EXPIRED");
    // The expired session is gone: asking again is simply unauthenticated.
    read(client.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_session_ends_at_its_absolute_lifetime_however_active(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (client, _) = app.logged_in("tech@example.com", Role::User).await;
    expire(&app, "absolute_expires_at").await;
    read(client.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_SESSION_EXPIRED");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_disabled_account_gets_the_same_answer_for_a_wrong_password(pool: PgPool) {
    let app = spawn_app(pool).await;
    let id = app.create_user("tech@example.com", Role::User).await;
    sqlx::query("UPDATE users SET status = 'disabled' WHERE id = $1")
        .bind(id)
        .execute(&app.pool)
        .await
        .unwrap();
    let mut client = app.client();

    let disabled_wrong = client
        .login("tech@example.com", "wrong password here")
        .await;
    let unknown_wrong = client
        .login("nobody@example.com", "wrong password here")
        .await;
    disabled_wrong.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID_CREDENTIALS");
    unknown_wrong.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID_CREDENTIALS");
    assert_eq!(
        disabled_wrong.json["message"],
        unknown_wrong.json["message"]
    );

    let disabled_right = client.login("tech@example.com", PASSWORD).await;
    disabled_right.assert_error(StatusCode::FORBIDDEN, "FORBIDDEN");
    assert!(disabled_right.headers.get("set-cookie").is_none());
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 0);

    let failures = app
        .count("SELECT count(*) FROM audit_logs WHERE action = 'auth.login_failed' AND ip = '127.0.0.1'")
        .await;
    assert_eq!(failures, 2);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn signup_refuses_bad_emails_and_weak_passwords(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    for (email, password, field) in [
        ("not-an-email", PASSWORD, "email"),
        ("a@example.com", "short", "password"),
        ("a@example.com", "password123", "password"),
        ("a@example.com", &"x".repeat(129), "password"),
    ] {
        let answer = read(client.signup(email, password).await).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
        assert_eq!(answer.json["details"]["field"], field, "{}", answer.text);
    }
    assert_eq!(app.count("SELECT count(*) FROM users").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn secrets_never_appear_in_answers(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    let answer = read(client.signup("tech@example.com", PASSWORD).await).await;
    let token = app.mailed_token("tech@example.com", "verify_email").await;
    let mut texts = vec![answer.text];

    let mut client = app.client();
    let login = client.login("tech@example.com", PASSWORD).await;
    let session_id = cookie_value(&set_cookie(&login));
    texts.push(login.text.clone());
    for path in ["/auth/me", "/auth/sessions", "/auth/csrf"] {
        texts.push(read(client.get(path).await).await.text);
    }
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let stored_session: String = sqlx::query_scalar("SELECT id FROM sessions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    for text in &texts {
        for secret in [
            PASSWORD,
            token.as_str(),
            session_id.as_str(),
            hash.as_str(),
            stored_session.as_str(),
        ] {
            assert!(!text.contains(secret), "a secret leaked into {text}");
        }
    }
    let _ = Method::GET;
}
