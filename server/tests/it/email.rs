//! Mail goes through the outbox to a real SMTP listener on 127.0.0.1; sent and given-up messages are
//! scrubbed of their tokens; failures are retried with backoff.

use crate::common;

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_server::config::SmtpConfig;
use bridge_server::db::MIGRATOR;
use common::{PASSWORD, TestApp, read, spawn_app_with};
use mailin_embedded::{Handler, Response, Server, SslConfig, response};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

/// Messages received by the sink: (recipients, raw message).
type Inbox = Arc<Mutex<Vec<(Vec<String>, String)>>>;

#[derive(Clone)]
struct Sink {
    inbox: Inbox,
    to: Vec<String>,
    data: Vec<u8>,
}

impl Handler for Sink {
    fn data_start(&mut self, _domain: &str, _from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.to = to.to_vec();
        self.data.clear();
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let text = String::from_utf8_lossy(&self.data).into_owned();
        self.inbox.lock().unwrap().push((self.to.clone(), text));
        response::OK
    }
}

/// Starts an SMTP sink on a thread (its `serve` blocks) and returns its URL and inbox.
fn smtp_sink() -> (String, Inbox) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let inbox: Inbox = Arc::default();
    let mut server = Server::new(Sink {
        inbox: inbox.clone(),
        to: Vec::new(),
        data: Vec::new(),
    });
    server
        .with_name("sink.test")
        .with_ssl(SslConfig::None)
        .unwrap()
        .with_tcp_listener(listener);
    std::thread::spawn(move || {
        let _ = server.serve();
    });
    (format!("smtp://127.0.0.1:{port}"), inbox)
}

async fn spawn_with_smtp(pool: PgPool, url: String, max_attempts: i32) -> TestApp {
    spawn_app_with(pool, move |c| {
        c.smtp = Some(SmtpConfig {
            url,
            from: "CAN Bridge <no-reply@bridge.test>".into(),
        });
        c.mail_poll_interval = Duration::from_millis(50);
        c.mail_retry_base = Duration::from_millis(20);
        c.mail_max_attempts = max_attempts;
    })
    .await
}

/// Waits (briefly, polling) until `sql` returns true.
async fn until(app: &TestApp, sql: &str) {
    for _ in 0..200 {
        let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {sql}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn verification_mail_is_delivered_over_smtp_and_then_scrubbed(pool: PgPool) {
    let (url, inbox) = smtp_sink();
    let app = spawn_with_smtp(pool, url, 8).await;
    let client = app.client();
    let token = {
        let answer = read(client.signup("tech@example.com", PASSWORD).await).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        // Read before the worker scrubs it (it may already have).
        sqlx::query_scalar::<_, Value>("SELECT payload FROM email_outbox")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    until(&app, "SELECT status = 'sent' FROM email_outbox").await;

    let messages = inbox.lock().unwrap().clone();
    assert_eq!(messages.len(), 1);
    let (to, raw) = &messages[0];
    // The body is quoted-printable: undo its soft line breaks and its escaped '='.
    let raw = &raw.replace("=\r\n", "").replace("=3D", "=");
    assert_eq!(to, &vec!["tech@example.com".to_string()]);
    assert!(raw.contains("Subject: Confirm your email address"), "{raw}");
    assert!(raw.contains("/verify-email?token="), "{raw}");

    // The token in the mail confirms the address; the stored payload no longer has it.
    let mailed: String = raw
        .split("token=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert_eq!(mailed.len(), 64);
    if let Some(t) = token["token"].as_str() {
        assert_eq!(t, mailed);
    }
    let payload: Value = sqlx::query_scalar("SELECT payload FROM email_outbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        payload.get("token").is_none() && payload.get("link").is_none(),
        "{payload}"
    );
    let answer = read(
        client
            .post_json("/auth/verify-email", json!({ "token": mailed }))
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    app.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn failed_deliveries_are_retried_then_given_up_and_scrubbed(pool: PgPool) {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_with_smtp(pool, format!("smtp://127.0.0.1:{port}"), 2).await;
    let client = app.client();
    client
        .post_json(
            "/auth/password-reset/request",
            json!({ "email": "nobody@example.com" }),
        )
        .await;
    app.create_user("tech@example.com", bridge_server::users::Role::User)
        .await;
    client
        .post_json(
            "/auth/password-reset/request",
            json!({ "email": "tech@example.com" }),
        )
        .await;
    until(&app, "SELECT status = 'failed' FROM email_outbox").await;
    let (attempts, last_error, payload): (i32, Option<String>, Value) =
        sqlx::query_as("SELECT attempts, last_error, payload FROM email_outbox")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 2);
    assert!(last_error.is_some());
    assert!(payload.get("token").is_none(), "{payload}");
    app.stop().await;
}
