//! The embedded PostgreSQL: it starts in a folder, answers, keeps its data across restarts and stops
//! cleanly; without PostgreSQL installed the error says what to install. Also `serve` on it, as a process.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use bridge_server::embedded_pg::{BinSearch, EmbeddedPgError, EmbeddedPostgres};

/// A temporary folder the `postgres` user can enter (tests run as root in CI).
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn starts_answers_keeps_its_data_and_stops() {
    let dir = workdir();
    let data = dir.path().join("data");
    let pg = EmbeddedPostgres::start(&data)
        .await
        .expect("PostgreSQL starts");
    let pool = bridge_server::db::connect(&pg.url(), 2).await.unwrap();
    let applied = bridge_server::db::migrate(&pool).await.unwrap();
    assert!(!applied.is_empty());
    pool.close().await;
    pg.stop().await.expect("PostgreSQL stops");
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "the cluster is down"
    );

    // Second start: same data, nothing to migrate; dropping the handle stops it.
    let pg = EmbeddedPostgres::start(&data)
        .await
        .expect("PostgreSQL starts again");
    let pool = bridge_server::db::connect(&pg.url(), 2).await.unwrap();
    assert!(bridge_server::db::is_up_to_date(&pool).await.unwrap());
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    pool.close().await;
    drop(pg);
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "Drop stopped the cluster"
    );
}

#[tokio::test]
async fn without_postgresql_the_error_says_what_to_install() {
    let dir = workdir();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let search = BinSearch {
        path: Some(empty.clone().into_os_string()),
        versioned_root: empty.clone(),
    };
    let err = EmbeddedPostgres::start_with(dir.path().join("data"), search)
        .await
        .unwrap_err();
    assert!(matches!(err, EmbeddedPgError::NotInstalled));
    let text = err.to_string();
    assert!(text.contains("install PostgreSQL"), "{text}");
    assert!(!text.contains('\n'), "one line: {text}");
}

#[test]
fn serve_runs_on_its_own_database_and_stops_it_on_sigterm() {
    let dir = workdir();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bridge-server"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("serve logs until it listens").unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Drain the rest of the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, reqwest::StatusCode::OK);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut waited = Duration::ZERO;
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(waited < Duration::from_secs(30), "serve did not stop");
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "the cluster stopped with the server"
    );
}
