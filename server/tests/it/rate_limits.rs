//! The rate limits of SPEC 3.2, kept in PostgreSQL, with their defaults, keys and Retry-After.

use crate::common;

use common::{Answer, PASSWORD, TestClient, read, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

fn retry_after(answer: &Answer) -> u64 {
    answer.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    let secs: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(answer.json["details"]["retry_after_seconds"], secs);
    secs
}

async fn wrong_login(client: &mut TestClient, email: &str) -> Answer {
    client.login(email, "not the password at all").await
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn login_allows_10_per_10_minutes_per_account_whatever_the_case(pool: PgPool) {
    // Each attempt comes from another (forwarded) address, so only the account counter can trip.
    let app = spawn_app_with(pool, |c| {
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]
    })
    .await;
    app.create_user("tech@example.com", Role::User).await;
    let client = app.client();
    for i in 0..10 {
        let email = if i % 2 == 0 {
            "TECH@example.com"
        } else {
            " tech@EXAMPLE.com"
        };
        let res = client
            .http
            .post(client.api("/auth/login"))
            .header("X-Forwarded-For", format!("203.0.113.{i}"))
            .json(&json!({ "email": email, "password": "wrong wrong wrong" }))
            .send()
            .await
            .unwrap();
        read(res)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID_CREDENTIALS");
    }
    // The 11th is refused even with the right password.
    let res = client
        .http
        .post(client.api("/auth/login"))
        .header("X-Forwarded-For", "203.0.113.99")
        .json(&json!({ "email": "tech@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    let secs = retry_after(&read(res).await);
    assert!((1..=600).contains(&secs), "{secs}");
    let stored: i64 = app
        .count("SELECT count(*) FROM rate_limits WHERE scope = 'login:account' AND key = 'tech@example.com'")
        .await;
    assert_eq!(stored, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn login_allows_10_per_10_minutes_per_ip(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut client = app.client();
    for i in 0..10 {
        let answer = wrong_login(&mut client, &format!("user{i}@example.com")).await;
        answer.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID_CREDENTIALS");
    }
    let secs = retry_after(&wrong_login(&mut client, "user10@example.com").await);
    assert!((1..=600).contains(&secs), "{secs}");

    // When the window has passed, the counter starts again.
    sqlx::query("UPDATE rate_limits SET window_start = now() - interval '11 minutes'")
        .execute(&app.pool)
        .await
        .unwrap();
    wrong_login(&mut client, "user11@example.com")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID_CREDENTIALS");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn forwarded_addresses_count_only_behind_a_trusted_proxy(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    // Not configured: X-Forwarded-For is ignored, so all attempts share 127.0.0.1's counter.
    for i in 0..6 {
        let res = client
            .http
            .post(client.api("/auth/signup"))
            .header("X-Forwarded-For", format!("198.51.100.{i}"))
            .json(&json!({ "email": format!("u{i}@example.com"), "password": PASSWORD }))
            .send()
            .await
            .unwrap();
        let answer = read(res).await;
        if i < 5 {
            assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
        } else {
            retry_after(&answer);
        }
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn signup_allows_5_per_hour_per_ip(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    for i in 0..5 {
        let answer = read(client.signup(&format!("u{i}@example.com"), PASSWORD).await).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    }
    let secs = retry_after(&read(client.signup("u5@example.com", PASSWORD).await).await);
    assert!((3500..=3600).contains(&secs), "about an hour: {secs}");
    assert_eq!(app.count("SELECT count(*) FROM users").await, 5);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn reset_requests_allow_3_per_hour_per_account(pool: PgPool) {
    let app = spawn_app_with(pool, |c| {
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]
    })
    .await;
    let client = app.client();
    let request = |i: u8, email: &'static str| {
        client
            .http
            .post(client.api("/auth/password-reset/request"))
            .header("X-Forwarded-For", format!("203.0.113.{i}"))
            .json(&json!({ "email": email }))
            .send()
    };
    for (i, email) in ["a@example.com", "A@example.com", " a@EXAMPLE.com"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            request(i as u8, email).await.unwrap().status(),
            StatusCode::ACCEPTED
        );
    }
    retry_after(&read(request(9, "a@example.com").await.unwrap()).await);
    // Another account from another address is not affected.
    assert_eq!(
        request(10, "b@example.com").await.unwrap().status(),
        StatusCode::ACCEPTED
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn reset_requests_allow_3_per_hour_per_ip_and_confirm_has_its_own_counter(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    for i in 0..3 {
        let res = client
            .post_json(
                "/auth/password-reset/request",
                json!({ "email": format!("u{i}@example.com") }),
            )
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    let res = client
        .post_json(
            "/auth/password-reset/request",
            json!({ "email": "u3@example.com" }),
        )
        .await;
    retry_after(&read(res).await);

    // Confirming is counted separately: the request limit does not block it.
    let res = client
        .post_json(
            "/auth/password-reset/confirm",
            json!({ "token": "0".repeat(64), "password": PASSWORD }),
        )
        .await;
    read(res)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn reset_confirm_is_limited_per_ip(pool: PgPool) {
    let app = spawn_app_with(pool, |c| {
        c.rate_limits.reset_confirm_per_ip =
            bridge_server::rate_limit::Limit::new(2, std::time::Duration::from_secs(3600));
    })
    .await;
    let client = app.client();
    let confirm = || {
        client.post_json(
            "/auth/password-reset/confirm",
            json!({ "token": "f".repeat(64), "password": PASSWORD }),
        )
    };
    for _ in 0..2 {
        read(confirm().await)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    }
    retry_after(&read(confirm().await).await);
    // The request limit is untouched.
    let res = client
        .post_json(
            "/auth/password-reset/request",
            json!({ "email": "x@example.com" }),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
}
