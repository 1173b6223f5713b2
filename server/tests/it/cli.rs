//! `bridge-server admin create-user` and `bridge-server outbox`, run as real processes.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};

use bridge_server::db::MIGRATOR;
use common::{PASSWORD, database_url_of, read, spawn_app};
use reqwest::StatusCode;
use sqlx::PgPool;

fn run(args: &[&str], url: &str, stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bridge-server"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn create_user_makes_a_super_admin_who_can_log_in(pool: PgPool) {
    let url = database_url_of(&pool);
    let (ok, stdout, stderr) = run(
        &[
            "admin",
            "create-user",
            "--email",
            "Boss@Example.com",
            "--role",
            "super_admin",
        ],
        &url,
        &format!("{PASSWORD}\n"),
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("created boss@example.com"), "{stdout}");
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD));

    let (ok, _, stderr) = run(
        &[
            "admin",
            "create-user",
            "--email",
            "boss@example.com",
            "--role",
            "super-admin",
        ],
        &url,
        &format!("{PASSWORD}\n"),
    );
    assert!(!ok);
    assert!(stderr.contains("already exists"), "{stderr}");

    let (ok, _, stderr) = run(
        &["admin", "create-user", "--email", "x@example.com"],
        &url,
        "password\n",
    );
    assert!(!ok);
    assert!(stderr.contains("most common"), "{stderr}");

    let app = spawn_app(pool).await;
    let mut admin = app.client();
    let login = admin.login("boss@example.com", PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text);
    assert_eq!(login.json["user"]["role"], "super_admin");
    assert_eq!(
        read(admin.get("/admin/users").await).await.status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn outbox_lists_queued_mail_with_its_link(pool: PgPool) {
    let url = database_url_of(&pool);
    let app = spawn_app(pool).await;
    app.client().signup("tech@example.com", PASSWORD).await;
    let token = app.mailed_token("tech@example.com", "verify_email").await;

    let (ok, stdout, stderr) = run(&["outbox"], &url, "");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("to tech@example.com"), "{stdout}");
    assert!(stdout.contains("verify_email"), "{stdout}");
    assert!(
        stdout.contains(&format!("/verify-email?token={token}")),
        "{stdout}"
    );
}

/// `serve --nats-url` pointing at no NATS server stops at once with what to check, and the URL's
/// password appears nowhere in what it prints; a stream name that would change the subjects is refused
/// before connecting.
#[sqlx::test(migrator = "MIGRATOR")]
async fn serve_on_an_unreachable_nats_says_so_without_the_password(pool: PgPool) {
    let url = database_url_of(&pool);
    let (ok, stdout, stderr) = run(
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--no-migrate",
            "--nats-url",
            "nats://relay:sesame-secret@127.0.0.1:1",
        ],
        &url,
        "",
    );
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("could not connect to NATS (--nats-url)")
            && stderr.contains("check that nats-server runs"),
        "{stderr}"
    );
    assert!(
        !format!("{stdout}{stderr}").contains("sesame-secret"),
        "{stdout}{stderr}"
    );

    let (ok, _, stderr) = run(
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--no-migrate",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nats-stream",
            "relay.all",
        ],
        &url,
        "",
    );
    assert!(!ok);
    assert!(
        stderr.contains("the NATS stream name \"relay.all\" is not valid"),
        "{stderr}"
    );
}

/// The three-node NATS configuration that docs/QUICKSTART.md section 2.6 installs is one nats-server
/// accepts.
#[test]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs nats-server (Debian: nats-server): scripts/test turns this on where it is installed"
)]
fn the_documented_nats_node_configuration_is_valid() {
    let conf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/nats/nats-server.conf"
    );
    let bin = bridge_rig::nats::binary().expect("nats-server is installed");
    let out = Command::new(bin).args(["-t", "-c", conf]).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.contains("is valid"), "{said}");
}
