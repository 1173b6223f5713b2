//! The embedded PostgreSQL: it starts in a folder, answers, keeps its data across restarts and stops
//! cleanly; without PostgreSQL installed the error says what to install. Also `serve` on it, as a process.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use bridge_server::embedded_pg::{BinSearch, EmbeddedPgError, EmbeddedPostgres};

/// A temporary folder the `postgres` user can enter (tests run as root in CI).
pub(crate) fn workdir() -> tempfile::TempDir {
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

/// `bridge-server serve` on its own database in `data`, and the address it listens on once it does.
pub(crate) fn start_serve(data: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bridge-server"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data)
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
    (child, addr)
}

/// Waits (at most 30 s) for `child` to end.
pub(crate) fn wait_for_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let mut waited = Duration::ZERO;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(waited < Duration::from_secs(30), "serve did not stop");
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    }
}

pub(crate) fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// A pool on the database of the cluster that `serve` runs in `data`, over TCP with the superuser
/// password the cluster keeps for a developer's `psql` (its socket is private to the server).
pub(crate) async fn embedded_pool(data: &std::path::Path) -> sqlx::PgPool {
    let password = std::fs::read_to_string(data.join("postgres.password")).unwrap();
    // postmaster.pid's fourth line is the cluster's port.
    let pid_file = std::fs::read_to_string(data.join("postgres/postmaster.pid")).unwrap();
    let port = pid_file.lines().nth(3).unwrap().trim();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{port}/postgres",
        password.trim()
    );
    bridge_server::db::connect(&url, 5).await.unwrap()
}

fn ready(addr: &str) -> reqwest::StatusCode {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .unwrap()
            .status()
    })
}

#[test]
fn serve_runs_on_its_own_database_and_stops_it_on_sigterm() {
    let dir = workdir();
    let data = dir.path().join("data");
    let (mut child, addr) = start_serve(&data);
    assert_eq!(ready(&addr), reqwest::StatusCode::OK);

    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let exit = wait_for_exit(&mut child);
    assert!(exit.success(), "{exit:?}");
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "the cluster stopped with the server"
    );
}

/// A server killed with SIGKILL (or by the OOM killer) leaves its PostgreSQL running. The next `serve` on
/// the same folder stops that orphan and starts, with the data the first one wrote.
#[test]
fn a_server_killed_with_sigkill_starts_again_on_the_same_folder_with_its_data() {
    let dir = workdir();
    let data = dir.path().join("data");
    let (mut first, addr) = start_serve(&data);
    assert_eq!(ready(&addr), reqwest::StatusCode::OK);
    // Something the next server must still find: an account made through the first one's database.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let signup = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{addr}/api/v1/auth/signup"))
            .json(&serde_json::json!({"email": "kept@example.com", "password": "correct horse battery staple"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(signup.is_success(), "{signup}");
    signal(&first, nix::sys::signal::Signal::SIGKILL);
    wait_for_exit(&mut first);
    assert!(
        data.join("postgres/postmaster.pid").exists(),
        "the orphaned cluster is still running"
    );

    let (mut second, addr) = start_serve(&data);
    assert_eq!(ready(&addr), reqwest::StatusCode::OK);
    // The account the first server wrote is there: its password logs in.
    let login = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{addr}/api/v1/auth/login"))
            .json(&serde_json::json!({"email": "kept@example.com", "password": "correct horse battery staple"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(login, reqwest::StatusCode::OK);
    signal(&second, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_for_exit(&mut second).success());
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "the cluster stopped with the second server"
    );
}

/// Two servers on one data folder would share one cluster and stop it under each other: the second is
/// refused at once, says why, and leaves the first one's cluster running.
#[test]
fn a_second_server_on_the_same_folder_is_refused_and_the_first_keeps_running() {
    let dir = workdir();
    let data = dir.path().join("data");
    let (mut first, addr) = start_serve(&data);
    assert_eq!(ready(&addr), reqwest::StatusCode::OK);

    let second = Command::new(env!("CARGO_BIN_EXE_bridge-server"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(
        text.contains("another bridge-server") && text.contains("--data-dir"),
        "{text}"
    );
    assert_eq!(
        ready(&addr),
        reqwest::StatusCode::OK,
        "the first still answers"
    );

    signal(&first, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_for_exit(&mut first).success());
}

/// After a power loss the pid in a left-over `postmaster.pid` may name another, unrelated process. That
/// process must not be signalled, and the cluster must start.
#[tokio::test]
async fn a_stale_pid_file_naming_another_process_is_not_obeyed() {
    let dir = workdir();
    let data = dir.path().join("data");
    let pg = EmbeddedPostgres::start(&data)
        .await
        .expect("PostgreSQL starts");
    pg.stop().await.expect("PostgreSQL stops");
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    let pid_file = data.join("postgres/postmaster.pid");
    std::fs::write(
        &pid_file,
        format!(
            "{}\n{}\n0\n5432\n/tmp\n",
            bystander.id(),
            data.join("postgres").display()
        ),
    )
    .unwrap();
    let pg = EmbeddedPostgres::start(&data)
        .await
        .expect("PostgreSQL starts despite the stale pid file");
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the process the stale file named was left alone"
    );
    let pool = bridge_server::db::connect(&pg.url(), 1).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    pool.close().await;
    pg.stop().await.unwrap();
    bystander.kill().unwrap();
    let _ = bystander.wait();
}
