//! `bridge-server keys status` and `keys rotate --to N [--dry-run]`, run as real processes.

use crate::common;

use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bridge_server::db::MIGRATOR;
use bridge_server::dongle_tokens::{self, KeyRing};
use common::database_url_of;
use sqlx::PgPool;
use uuid::Uuid;

fn keys_cli(args: &[&str], url: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bridge-server"))
        .arg("keys")
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .env("DONGLE_TOKEN_MASTER_KEY_V1", B64.encode([1u8; 32]))
        .env("DONGLE_TOKEN_MASTER_KEY_V2", B64.encode([2u8; 32]))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn keys_rotate_and_status_from_the_command_line(pool: PgPool) {
    let url = database_url_of(&pool);
    let v1 = KeyRing::new([(1, [1u8; 32])]).unwrap();
    let mut rows = Vec::new();
    for i in 0..3 {
        let id: Uuid =
            sqlx::query_scalar("INSERT INTO dongles (device_id) VALUES ($1) RETURNING id")
                .bind(format!("{i:016x}"))
                .fetch_one(&pool)
                .await
                .unwrap();
        let token = dongle_tokens::generate();
        dongle_tokens::store(&pool, &v1, id, &token).await.unwrap();
        rows.push((id, token));
    }
    let (ok, stdout, stderr) = keys_cli(&["status"], &url);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("key version 1: 3 token(s)"), "{stdout}");
    let (ok, stdout, stderr) = keys_cli(&["rotate", "--to", "2", "--dry-run"], &url);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("3 token(s) would be re-encrypted"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = keys_cli(&["rotate", "--to", "2", "--batch-size", "2"], &url);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("re-encrypted 3 token(s)"), "{stdout}");
    let (ok, stdout, _) = keys_cli(&["status"], &url);
    assert!(
        ok && stdout.contains("key version 2: 3 token(s)"),
        "{stdout}"
    );
    let both = KeyRing::new([(1, [1u8; 32]), (2, [2u8; 32])]).unwrap();
    for (id, token) in &rows {
        assert_eq!(
            &dongle_tokens::load(&pool, &both, *id)
                .await
                .unwrap()
                .unwrap(),
            token
        );
    }
    // No key material in the output.
    let secret = B64.encode([2u8; 32]);
    let (_, stdout, stderr) = keys_cli(&["rotate", "--to", "2"], &url);
    assert!(!stdout.contains(&secret) && !stderr.contains(&secret));
    // An unconfigured version is a clear error.
    let (ok, _, stderr) = keys_cli(&["rotate", "--to", "3"], &url);
    assert!(!ok);
    assert!(stderr.contains("DONGLE_TOKEN_MASTER_KEY_V3"), "{stderr}");
}
