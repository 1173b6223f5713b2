//! The trust boundaries of SPEC 3.11 under attack (issue "Trust boundaries hold under attack"): each test
//! is named after the point it proves, and docs/SECURITY.md lists it beside its threat.

use crate::common;

use common::{PASSWORD, read, spawn_app, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

/// An email of 10 000 characters used to become a rate-limit key before anything looked at its length,
/// and PostgreSQL refuses an index entry that long: a 500. Every form that takes an email (and the
/// password and token fields beside it) now refuses an over-long value with a 400 before that.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_over_long_email_or_field_is_a_400_before_it_reaches_a_database_key(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    // Incompressible, as an attacker's would be: PostgreSQL compresses a run of one letter below the
    // index limit, but not this.
    let noise: String = (0..280)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let long_email = format!("{noise}@example.com");
    let long = "p".repeat(5_000);
    for (path, body) in [
        (
            "/auth/login",
            json!({"email": long_email, "password": PASSWORD}),
        ),
        (
            "/auth/signup",
            json!({"email": long_email, "password": PASSWORD}),
        ),
        ("/auth/password-reset/request", json!({"email": long_email})),
        (
            "/auth/login",
            json!({"email": "tech@example.com", "password": long}),
        ),
        (
            "/auth/password-reset/confirm",
            json!({"token": long, "password": PASSWORD}),
        ),
        ("/auth/verify-email", json!({"token": long})),
    ] {
        let answer = read(client.post_json(path, body).await).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    }
    // The longest valid address is still an address.
    let longest = format!("{}@{}.example.com", "a".repeat(64), "b".repeat(177));
    assert_eq!(longest.len(), 254);
    let answer = read(client.signup(&longest, PASSWORD).await).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    app.stop().await;
}

/// HTTP lets a client invent a method; each invented one was a new label value on every request metric,
/// so a client could grow the server's memory and /metrics without bound.
#[sqlx::test(migrator = "MIGRATOR")]
async fn metrics_labels_are_bounded_an_unknown_method_is_recorded_as_other(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    for i in 0..5 {
        let method = Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let res = client
            .http
            .request(method, client.api("/auth/me"))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_client_error(), "{}", res.status());
        let res = client
            .http
            .request(
                Method::from_bytes(b"PROBE").unwrap(),
                client.url(&format!("/no/such/route/{i}")),
            )
            .send()
            .await
            .unwrap();
        assert!(res.status().is_client_error());
    }
    let text = client
        .http
        .get(client.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("INVENTED"), "{text}");
    assert!(!text.contains("PROBE"), "{text}");
    assert!(!text.contains("/no/such/route"), "{text}");
    assert!(text.contains(r#"method="other""#), "{text}");
    app.stop().await;
}

/// Behind a TLS-terminating proxy the server itself speaks plain HTTP, but browsers reach it over
/// HTTPS: the session cookie must be Secure, or it could leak over a downgraded connection.
#[sqlx::test(migrator = "MIGRATOR")]
async fn cookies_are_secure_behind_a_tls_terminating_proxy(pool: PgPool) {
    let app = spawn_app_with(pool, |config| {
        config.public_url = Some("https://bridge.example.com".into());
    })
    .await;
    app.create_user("tech@example.com", Role::User).await;
    let mut client = app.client();
    let login = client.login("tech@example.com", PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK);
    let cookie = login
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("bridge_session="))
        .expect("a session cookie");
    assert!(cookie.contains("Secure"), "{cookie}");
    app.stop().await;
}
