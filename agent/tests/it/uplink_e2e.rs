//! The agent's link to the server: TLS with a custom CA file, and reconnecting after the server
//! restarts.

use crate::common;

use std::time::Duration;

use bridge_server::config::TlsFiles;
use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Agent, Server};
use sqlx::PgPool;

/// A server with a self-signed certificate: refused without its CA file, trusted with it, for the API
/// (login) and for the control WebSocket (run).
#[sqlx::test(migrator = "MIGRATOR")]
async fn tls_with_a_custom_ca_file(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let server = Server::start_with(pool, |c| {
        c.tls = Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })
    })
    .await;
    assert!(server.base.starts_with("https://"));
    server.create_user("alice@example.com", Role::User).await;

    let untrusting = Agent::new();
    let out = untrusting
        .command()
        .args([
            "login",
            "--server",
            &server.base,
            "--email",
            "alice@example.com",
        ])
        .env("BRIDGE_AGENT_PASSWORD", common::PASSWORD)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a certificate nobody vouches for must be refused"
    );
    assert!(stderr.contains("could not reach the server"), "{stderr}");
    assert!(!untrusting.path("agent.json").exists());

    let mut agent = Agent::new();
    let ca = cert.display().to_string();
    let before = chrono::Utc::now();
    agent
        .login_as(&server.base, "alice@example.com", &["--ca-file", &ca])
        .await;
    agent.run(&[]);
    server.wait_agent_seen_after(agent.agent_id(), before).await;
    let mut out = String::new();
    for _ in 0..50 {
        out = agent.exec(&["status"], None).await.1;
        if out.contains("connected to the server") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(out.contains("connected to the server"), "{out}");
    assert!(out.contains("token accepted"), "{out}");
    agent.stop().await;
    server.stop().await;
}

/// The server goes away and comes back on the same address: the daemon reconnects on its own.
#[sqlx::test(migrator = "MIGRATOR")]
async fn the_agent_reconnects_after_a_server_restart(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let mut agent = Agent::new();
    agent.login(&server, &alice).await;
    let first = chrono::Utc::now();
    agent.run(&[]);
    server.wait_agent_seen_after(agent.agent_id(), first).await;

    let server = server.restart(Duration::from_secs(2)).await;
    let back = chrono::Utc::now();
    server.wait_agent_seen_after(agent.agent_id(), back).await;
    assert!(agent.daemon.is_some(), "the daemon kept running");
    agent.stop().await;
    server.stop().await;
}
