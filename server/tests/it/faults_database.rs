//! PostgreSQL goes away under a running server and comes back: while it is down, `/readyz` says not
//! ready and API calls answer 503 SERVICE_UNAVAILABLE in the standard error shape, promptly and without
//! a panic or a 500; once it is back, the same server serves the same session again, unrestarted.
//!
//! The test runs a private cluster (`EmbeddedPostgres`), since stopping the shared one would break every
//! other test, and stops and starts it with `pg_ctl` on the same port and socket, as an administrator's
//! restart would.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bridge_server::embedded_pg::{BinSearch, EmbeddedPostgres};
use bridge_server::users::Role;
use common::{Answer, TestClient, spawn_app};
use reqwest::StatusCode;
use serde_json::json;

/// Far below the pool's 10 s acquire timeout: an answer this quick comes from noticing the outage, not
/// from waiting it out.
const PROMPT: Duration = Duration::from_secs(5);

/// `pg_ctl` on the embedded cluster, as the user that owns it.
struct PgCtl {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    options: String,
}

impl PgCtl {
    /// The cluster that `EmbeddedPostgres::start(dir)` runs: data in `dir/postgres`, log in
    /// `dir/postgres.log`, the port and socket folder of its URL.
    fn for_cluster(dir: &Path, pg: &EmbeddedPostgres) -> Self {
        let url = pg.url();
        let socket = percent_decode(
            url.split("host=")
                .nth(1)
                .expect("the URL names the socket folder"),
        );
        Self {
            bin: BinSearch::default()
                .find()
                .expect("PostgreSQL is installed"),
            data: dir.join("postgres"),
            log: dir.join("postgres.log"),
            options: format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {socket} -c unix_socket_permissions=0700",
                pg.port()
            ),
        }
    }

    fn run(&self, args: &[&std::ffi::OsStr]) -> Output {
        let exe = self.bin.join("pg_ctl");
        // initdb and pg_ctl refuse to run as root: as root, the cluster belongs to `postgres`.
        let mut cmd = if nix::unistd::geteuid().is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).current_dir("/").output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn stop(&self) {
        self.run(&[
            "-D".as_ref(),
            self.data.as_os_str(),
            "-m".as_ref(),
            "fast".as_ref(),
            "-w".as_ref(),
            "stop".as_ref(),
        ]);
    }

    fn start(&self) {
        self.run(&[
            "-D".as_ref(),
            self.data.as_os_str(),
            "-l".as_ref(),
            self.log.as_os_str(),
            "-w".as_ref(),
            "-t".as_ref(),
            "30".as_ref(),
            "-o".as_ref(),
            self.options.as_ref(),
            "start".as_ref(),
        ]);
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Sends a request and reads its answer, failing when it takes longer than [`PROMPT`].
async fn timed(what: &str, request: reqwest::RequestBuilder) -> Answer {
    let started = Instant::now();
    let answer = Answer::read(request.send().await.unwrap()).await;
    let took = started.elapsed();
    assert!(took < PROMPT, "{what} took {took:?}");
    answer
}

/// Asserts the 503 of an unreachable database, in the standard shape with a request id and a
/// `Retry-After`.
fn assert_unavailable(what: &str, answer: &Answer) {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {}",
        answer.text
    );
    answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
    assert!(
        answer.headers.contains_key("retry-after"),
        "{what}: no Retry-After"
    );
}

fn register(user: &TestClient, name: &str) -> reqwest::RequestBuilder {
    user.request(reqwest::Method::POST, "/agents/register")
        .json(&json!({ "agent_name": name }))
}

#[tokio::test]
async fn while_postgresql_is_down_the_api_answers_503_and_it_recovers_without_a_restart() {
    // A folder the postgres user can enter (the tests run as root in CI).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cluster = dir.path().join("cluster");
    let pg = EmbeddedPostgres::start(&cluster)
        .await
        .expect("PostgreSQL starts");
    let ctl = PgCtl::for_cluster(&cluster, &pg);
    // The pool the server runs on in production, on the cluster's socket.
    let pool = bridge_server::db::connect(&pg.url(), 5).await.unwrap();
    bridge_server::db::migrate(&pool).await.unwrap();

    let app = spawn_app(pool).await;
    let (user, _) = app.logged_in("tech@example.com", Role::User).await;
    let http = &user.http;
    assert_eq!(
        timed("readyz", http.get(user.url("/readyz"))).await.status,
        StatusCode::OK
    );
    assert_eq!(
        timed("register", register(&user, "before")).await.status,
        StatusCode::CREATED
    );

    ctl.stop();

    // The process is up; it is not ready; every call that needs the database says so at once.
    assert_eq!(
        timed("healthz", http.get(user.url("/healthz")))
            .await
            .status,
        StatusCode::OK
    );
    let ready = timed("readyz", http.get(user.url("/readyz"))).await;
    ready.assert_error(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY");
    for _ in 0..3 {
        assert_unavailable(
            "GET /auth/me",
            &timed("me", user.request(reqwest::Method::GET, "/auth/me")).await,
        );
        assert_unavailable(
            "POST /agents/register",
            &timed("register", register(&user, "during")).await,
        );
        assert_unavailable(
            "POST /auth/login",
            &timed(
                "login",
                app.client()
                    .request(reqwest::Method::POST, "/auth/login")
                    .json(&json!({"email": "tech@example.com", "password": common::PASSWORD})),
            )
            .await,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    ctl.start();

    // Back without restarting the server: ready again, and the session from before still works.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = timed("readyz", http.get(user.url("/readyz"))).await.status;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "not ready again: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let me = timed("me", user.request(reqwest::Method::GET, "/auth/me")).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text);
    assert_eq!(me.json["email"], "tech@example.com");
    assert_eq!(
        timed("register", register(&user, "after")).await.status,
        StatusCode::CREATED
    );
    // Nothing the outage left half-done: exactly the agents registered while it was up exist.
    assert_eq!(
        app.count("SELECT count(*) FROM agents WHERE agent_name IN ('before', 'after')")
            .await,
        2
    );
    assert_eq!(
        app.count("SELECT count(*) FROM agents WHERE agent_name = 'during'")
            .await,
        0
    );

    app.stop().await;
    pg.stop().await.expect("PostgreSQL stops");
}

/// Nobody waits for ever on another's lock, and no statement runs for ever: on the server's pool a
/// request blocked behind a lock fails after the lock timeout, and the API answers 503 with
/// Retry-After (the database is busy; trying again is the answer) instead of hanging or a 500.
#[sqlx::test(migrator = "bridge_server::db::MIGRATOR")]
async fn a_request_stuck_behind_a_lock_answers_503_after_the_lock_timeout_not_a_hang(
    _: sqlx::postgres::PgPoolOptions,
    options: sqlx::postgres::PgConnectOptions,
) {
    use bridge_server::db;
    let timeouts = db::Timeouts {
        statement: Duration::from_secs(5),
        lock: Duration::from_millis(300),
    };
    let pool = db::pool_with(db::with_timeouts(options.clone(), timeouts), 10);
    let app = spawn_app(pool.clone()).await;
    let (user, _) = app.logged_in("locked@example.com", Role::User).await;
    assert_eq!(user.get("/auth/me").await.status(), StatusCode::OK);

    // Another session (a migration, an operator's psql, a stuck transaction) holds the sessions table.
    let mut holder: sqlx::PgConnection = sqlx::ConnectOptions::connect(&options).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let started = Instant::now();
    let answer = Answer::read(user.get("/auth/me").await).await;
    assert_unavailable("/auth/me behind a lock", &answer);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        started.elapsed()
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(user.get("/auth/me").await.status(), StatusCode::OK);

    // A statement that runs past the statement timeout is cancelled, and that too is a 503.
    let err = sqlx::query("SELECT pg_sleep(10)")
        .execute(&db::pool_with(
            db::with_timeouts(
                options,
                db::Timeouts {
                    statement: Duration::from_millis(200),
                    lock: Duration::from_secs(1),
                },
            ),
            1,
        ))
        .await
        .unwrap_err();
    let api = bridge_server::http::ApiError::from(err);
    assert_eq!(
        api.code(),
        bridge_server::http::ErrorCode::ServiceUnavailable
    );
}

/// The pool's timeouts are for requests, not for upgrades: `migrate` on a pool whose lock timeout is
/// short still waits for another session that holds the migration table (another instance migrating,
/// an operator's transaction) and then finishes, instead of failing half way with a lock timeout.
/// A deadlock that PostgreSQL breaks by failing one transaction is the database being busy: 503 with
/// Retry-After, not a 500 (seen: `POST /groups/{id}/activate` answered 500 when it met an agent's report
/// locking the same two dongles the other way round; both now lock them in device id order).
#[sqlx::test(migrator = "bridge_server::db::MIGRATOR")]
async fn a_deadlock_broken_by_postgresql_answers_503_not_500(pool: sqlx::PgPool) {
    sqlx::query("CREATE TABLE deadlock_probe (id int PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO deadlock_probe VALUES (1), (2)")
        .execute(&pool)
        .await
        .unwrap();
    let mut first = pool.begin().await.unwrap();
    let mut second = pool.begin().await.unwrap();
    let lock = |id: i32| format!("SELECT id FROM deadlock_probe WHERE id = {id} FOR UPDATE");
    sqlx::query(sqlx::AssertSqlSafe(lock(1)))
        .execute(&mut *first)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(lock(2)))
        .execute(&mut *second)
        .await
        .unwrap();
    // Each now waits for the other's row; PostgreSQL fails one of them after its deadlock timeout.
    let (a, b) = tokio::join!(
        sqlx::query(sqlx::AssertSqlSafe(lock(2))).execute(&mut *first),
        sqlx::query(sqlx::AssertSqlSafe(lock(1))).execute(&mut *second),
    );
    let err = match (a, b) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
        other => panic!("one of them fails: {other:?}"),
    };
    let code = err
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("40P01"), "{err}");
    let api = bridge_server::http::ApiError::from(err);
    assert_eq!(
        api.code(),
        bridge_server::http::ErrorCode::ServiceUnavailable
    );
}

#[sqlx::test(migrator = "bridge_server::db::MIGRATOR")]
async fn migrations_wait_for_a_held_lock_past_the_pools_lock_timeout(
    _: sqlx::postgres::PgPoolOptions,
    options: sqlx::postgres::PgConnectOptions,
) {
    use bridge_server::db;
    let timeouts = db::Timeouts {
        statement: Duration::from_secs(5),
        lock: Duration::from_millis(200),
    };
    let pool = db::pool_with(db::with_timeouts(options.clone(), timeouts), 4);

    let mut holder: sqlx::PgConnection = sqlx::ConnectOptions::connect(&options).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        holder
    });

    let applied = db::migrate(&pool).await;
    release.await.unwrap();
    assert_eq!(
        applied.map_err(|e| format!("{e:#}")),
        Ok(vec![]),
        "everything was applied already, so waiting must end in a no-op"
    );
    // The pool keeps its limits: the lifted connection did not go back into it.
    let lock_timeout: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lock_timeout, "200ms");
}
