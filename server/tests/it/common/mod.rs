//! A real server per test: `spawn_app` starts `bridge_server` in this process on 127.0.0.1:0 over the
//! fresh database that `#[sqlx::test]` made, and hands out HTTP clients with their own cookie jars.
//!
//! Set `TEST_LOG=1` to see the server's logs.

#![allow(dead_code)]

use std::time::Duration;

use bridge_server::app::{self, RunningServer};
use bridge_server::config::ServerConfig;
use bridge_server::users::{self, Email, Role};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub mod agent;
pub mod data;
pub mod dongle;

/// A password that passes the policy.
pub const PASSWORD: &str = "correct horse battery staple";

pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub pool: PgPool,
    server: Option<RunningServer>,
}

impl TestApp {
    /// A server that runs elsewhere (a `bridge-server` process) at `base`, over `pool`'s database.
    pub fn external(base: String, pool: PgPool) -> Self {
        TestApp {
            base,
            pool,
            server: None,
        }
    }
}

/// Starts a server with the default configuration.
pub async fn spawn_app(pool: PgPool) -> TestApp {
    spawn_app_with(pool, |_| {}).await
}

/// Starts a server after `adjust` has changed the configuration.
pub async fn spawn_app_with(pool: PgPool, adjust: impl FnOnce(&mut ServerConfig)) -> TestApp {
    init_test_log();
    let mut config = ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    adjust(&mut config);
    let server = app::spawn(config, pool.clone())
        .await
        .expect("the server starts");
    TestApp {
        base: server.base_url.clone(),
        pool,
        server: Some(server),
    }
}

fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,sqlx=warn,hyper=info")
            .with_test_writer()
            .try_init();
    }
}

impl TestApp {
    /// A new client with an empty cookie jar, as a new browser would be.
    pub fn client(&self) -> TestClient {
        TestClient {
            base: self.base.clone(),
            http: reqwest::Client::builder()
                .cookie_store(true)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            csrf: None,
        }
    }

    /// Makes a user directly in the database (verified), returning its id.
    pub async fn create_user(&self, email: &str, role: Role) -> Uuid {
        let hash = bridge_server::auth::password::hash(PASSWORD, Default::default()).unwrap();
        let user = users::insert(&self.pool, &Email::parse(email).unwrap(), &hash, role)
            .await
            .unwrap()
            .expect("a new email");
        users::mark_email_verified(&self.pool, user.id)
            .await
            .unwrap();
        user.id
    }

    /// A client logged in as a new user with `role`.
    pub async fn logged_in(&self, email: &str, role: Role) -> (TestClient, Uuid) {
        let id = self.create_user(email, role).await;
        let mut client = self.client();
        let res = client.login(email, PASSWORD).await;
        assert_eq!(res.status(), StatusCode::OK, "login of {email}");
        (client, id)
    }

    /// The token of the newest queued mail of `template` to `to`, read from the outbox table.
    pub async fn mailed_token(&self, to: &str, template: &str) -> String {
        let payload: Value = sqlx::query_scalar(
            "SELECT payload FROM email_outbox WHERE to_email = $1 AND template = $2 \
             ORDER BY created_at DESC LIMIT 1",
        )
        .bind(to)
        .bind(template)
        .fetch_one(&self.pool)
        .await
        .expect("a mail was queued");
        payload["token"].as_str().expect("a token").to_string()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The dongle-token keys the server runs with.
    pub fn keys(&self) -> bridge_server::dongle_tokens::KeyRing {
        self.server.as_ref().unwrap().state.keys.as_ref().clone()
    }

    /// The registry of agents connected to the server.
    pub fn hub(&self) -> std::sync::Arc<bridge_server::agents::hub::AgentHub> {
        self.server.as_ref().unwrap().state.hub.clone()
    }

    /// The relay of groups' frames (its events are the console's hook).
    pub fn relay(&self) -> std::sync::Arc<bridge_server::groups::relay::Relay> {
        self.server.as_ref().unwrap().state.relay.clone()
    }

    /// Kills the server as a crash would: its pool closes first, so that nothing of it writes to the
    /// database again, then its tasks stop with no cleanup. Start it on a pool of its own.
    pub async fn kill(mut self) {
        self.pool.close().await;
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Stops the server gracefully.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
    }
}

/// An HTTP client with a cookie jar and the CSRF token of its session, once it has one.
#[derive(Clone)]
pub struct TestClient {
    pub base: String,
    pub http: reqwest::Client,
    pub csrf: Option<String>,
}

impl TestClient {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `path` under `/api/v1`.
    pub fn api(&self, path: &str) -> String {
        self.url(&format!("/api/v1{path}"))
    }

    /// A request to an API path, with the CSRF header when the client has a token.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, self.api(path));
        if let Some(token) = &self.csrf {
            req = req.header("X-CSRF-Token", token);
        }
        req
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(Method::GET, path).send().await.unwrap()
    }

    /// The text of a path outside the API (a dashboard page, `/metrics`), with the client's cookies.
    pub async fn page(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.request(Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn put_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.request(Method::PUT, path)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.request(Method::DELETE, path).send().await.unwrap()
    }

    pub async fn signup(&self, email: &str, password: &str) -> reqwest::Response {
        self.post_json(
            "/auth/signup",
            json!({ "email": email, "password": password }),
        )
        .await
    }

    /// Logs in and keeps the new session's CSRF token. Returns the response with its body read into
    /// JSON (status and headers stay available through the tuple's first element).
    pub async fn login(&mut self, email: &str, password: &str) -> Answer {
        let res = self
            .post_json(
                "/auth/login",
                json!({ "email": email, "password": password }),
            )
            .await;
        let answer = Answer::read(res).await;
        if answer.status == StatusCode::OK {
            self.csrf = answer.json["csrf_token"].as_str().map(str::to_string);
        }
        answer
    }

    /// Fetches the session's CSRF token from `GET /auth/csrf` and keeps it.
    pub async fn csrf(&mut self) -> String {
        let answer = Answer::read(self.get("/auth/csrf").await).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json);
        let token = answer.json["csrf_token"].as_str().unwrap().to_string();
        self.csrf = Some(token.clone());
        token
    }
}

/// A response read to the end: status, headers and JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Answer {
    pub async fn read(res: reqwest::Response) -> Self {
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            json,
            text,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Asserts the standard error shape with `code`, and returns the request id it carries.
    pub fn assert_error(&self, status: StatusCode, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text);
        assert_eq!(self.json["code"], code, "body: {}", self.text);
        assert!(self.json["message"].is_string(), "body: {}", self.text);
        let request_id = self.json["details"]["request_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no request id in {}", self.text))
            .to_string();
        assert_eq!(
            self.headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
            Some(request_id.as_str()),
            "the header and the body name the same request"
        );
        request_id
    }
}

/// Reads a response into an [`Answer`].
pub async fn read(res: reqwest::Response) -> Answer {
    Answer::read(res).await
}

/// The URL of the database `#[sqlx::test]` made for this test: DATABASE_URL with its database replaced.
pub fn database_url_of(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by the test command");
    let db = pool
        .connect_options()
        .get_database()
        .expect("the test pool names its database")
        .to_string();
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h.to_string(), format!("?{q}")),
        None => (base.clone(), String::new()),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = head[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(head.len());
    format!("{}/{}{}", &head[..path_start], db, query)
}

/// The server processes of the connections that LISTEN on `channel` now, in pid order.
pub async fn listening_pids(pool: &PgPool, channel: &str) -> Vec<i32> {
    // sqlx's own reopening sends `LISTEN "..";`, with a semicolon.
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE query = $1 OR query = $1 || ';' ORDER BY pid",
    )
    .bind(format!("LISTEN \"{channel}\""))
    .fetch_all(pool)
    .await
    .expect("pg_stat_activity reads")
}

/// Ends the server process `pid`, as a database restart or an administrator would.
pub async fn terminate_backend(pool: &PgPool, pid: i32) {
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .expect("pg_terminate_backend runs");
    assert!(killed, "backend {pid} ended");
}
