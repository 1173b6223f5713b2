//! TLS through rustls: with a certificate and key the server speaks HTTPS and its cookies are Secure;
//! a client that does not trust the certificate is refused.

use crate::common;

use bridge_server::config::TlsFiles;
use bridge_server::users::Role;
use common::{PASSWORD, spawn_app_with};
use sqlx::PgPool;

#[sqlx::test(migrator = "bridge_server::db::MIGRATOR")]
async fn https_with_a_self_signed_certificate_and_secure_cookies(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("a self-signed certificate");
    let cert_pem = certified.cert.pem();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();

    let app = spawn_app_with(pool, |c| {
        c.tls = Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })
    })
    .await;
    assert!(app.base.starts_with("https://"), "{}", app.base);
    app.create_user("tls@example.com", Role::User).await;

    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let health = trusting
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("HTTPS with the certificate trusted");
    assert!(health.status().is_success());

    let login = trusting
        .post(format!("{}/api/v1/auth/login", app.base))
        .json(&serde_json::json!({"email": "tls@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert!(login.status().is_success(), "{}", login.status());
    let cookie = login
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| !c.contains("Max-Age=0"))
        .expect("a session cookie");
    assert!(cookie.contains("Secure"), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");

    // A client with only the public roots refuses the self-signed certificate.
    let untrusting = reqwest::Client::new();
    let err = untrusting
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    // And plain HTTP to the TLS port gets no answer it could mistake for one.
    let plain = app.base.replacen("https://", "http://", 1);
    let answer = reqwest::get(format!("{plain}/healthz")).await;
    assert!(answer.map(|r| !r.status().is_success()).unwrap_or(true));
}
