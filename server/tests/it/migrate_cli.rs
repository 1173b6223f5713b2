//! `bridge-server migrate`, run as a real process against a fresh database.

use crate::common;

use std::process::Command;

use common::database_url_of;

use sqlx::PgPool;

fn migrate(url: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bridge-server"))
        .arg("migrate")
        .env("DATABASE_URL", url)
        .output()
        .expect("bridge-server runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrations = false)]
async fn migrate_applies_once_then_is_a_no_op(pool: PgPool) {
    let url = database_url_of(&pool);
    let (ok, stdout, stderr) = migrate(&url);
    assert!(ok, "first migrate failed: {stderr}");
    assert!(stdout.contains("applied 0001 v07 schema"), "{stdout}");

    let (ok, stdout, stderr) = migrate(&url);
    assert!(ok, "second migrate failed: {stderr}");
    assert!(stdout.contains("up to date"), "{stdout}");
    assert!(!stdout.contains("applied 0001"), "{stdout}");

    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(tables >= 14);
}

#[test]
fn migrate_against_an_unreachable_database_says_where_without_the_password() {
    let (ok, _stdout, stderr) = migrate("postgres://me:hunter2@127.0.0.1:1/nothing");
    assert!(!ok);
    assert!(
        stderr.contains("could not connect to PostgreSQL"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
}
