//! No secret reaches a log line or an error body (ARCHITECTURE "Invariants", SPEC 3.2 and 3.5): the
//! server runs in this process with every log line at debug level (trace for the server itself) written
//! to a buffer, a whole story is played through it (signup, email verification, logins right and
//! wrong, a password reset, agent registration, the control connection, pairing with a wrong PIN and
//! then the right one, the dongle token handed out, a command), and then every captured line and every
//! error body is searched for each secret the story used.
//!
//! This file is a test binary of its own, so the process-wide log subscriber it installs sees only its
//! own server.

#[path = "it/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::agent::{self, PIN, TestAgent};
use common::{Answer, PASSWORD, read, spawn_app_with};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use bridge_server::db::MIGRATOR;

/// Everything the server logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

/// Installs the process-wide subscriber: debug everywhere, trace for the server, no timestamps (a
/// timestamp's digits could otherwise look like a PIN) and no colours. The test's own HTTP client
/// (reqwest and its cookie jar) is left out: it holds the secrets by design, and is not the server.
fn capture_logs() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug,bridge_server=trace,reqwest=off,cookie_store=off")
        .with_writer(move || writer.clone())
        .without_time()
        .with_ansi(false)
        .try_init()
        .expect("this test binary installs the only subscriber");
    captured
}

/// True when `needle` occurs in `haystack` as a word of its own: not inside a longer run of letters
/// and digits. A 6-digit PIN may occur by chance inside a UUID or a longer number, which is no leak;
/// next to punctuation or spaces (`pin=123456`, `"123456"`) it is.
fn contains_word(haystack: &str, needle: &str) -> bool {
    haystack.match_indices(needle).any(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + needle.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

/// The encodings a 32-byte token could be written in.
fn encodings(token_base64: &str) -> Vec<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token_base64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token_base64))
        .expect("a base64 token");
    vec![
        token_base64.to_string(),
        base64::engine::general_purpose::STANDARD.encode(&bytes),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(&bytes),
        hex::encode(&bytes),
        hex::encode_upper(&bytes),
    ]
}

fn session_cookie(answer: &Answer) -> String {
    answer
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("bridge_session="))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string()
}

const DEV: &str = "00000000000000c1";
const WRONG_PIN: &str = "987650";
const WRONG_PASSWORD: &str = "hunter2 is not my password";
const NEW_PASSWORD: &str = "a brand new passphrase 42";

#[sqlx::test(migrator = "MIGRATOR")]
async fn no_secret_reaches_a_log_line_or_an_error_body(pool: PgPool) {
    let logs = capture_logs();
    let app = spawn_app_with(pool, |c| {
        c.command_poll_interval = Duration::from_millis(100);
    })
    .await;
    // Every answer of 400 or more, to be searched with the logs.
    let mut error_bodies: Vec<String> = Vec::new();
    let mut keep = |answer: &Answer| {
        if answer.status.as_u16() >= 400 {
            error_bodies.push(answer.text.clone());
        }
    };

    // Signup, email verification, a wrong password, then a login.
    let mut client = app.client();
    let answer = read(client.signup("tech@example.com", PASSWORD).await).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let verification = app.mailed_token("tech@example.com", "verify_email").await;
    let answer = read(
        client
            .post_json("/auth/verify-email", json!({"token": verification}))
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let answer = client.login("tech@example.com", WRONG_PASSWORD).await;
    answer.assert_error(StatusCode::UNAUTHORIZED, "AUTH_INVALID_CREDENTIALS");
    keep(&answer);
    let login = client.login("tech@example.com", PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text);
    let session = session_cookie(&login);
    let csrf = client.csrf.clone().unwrap();

    // A password reset, requested and confirmed, and a second use of its token refused.
    let answer = read(
        client
            .post_json(
                "/auth/password-reset/request",
                json!({"email": "tech@example.com"}),
            )
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let reset = app.mailed_token("tech@example.com", "password_reset").await;
    for expected in [StatusCode::OK, StatusCode::BAD_REQUEST] {
        let answer = read(
            client
                .post_json(
                    "/auth/password-reset/confirm",
                    json!({"token": reset, "password": NEW_PASSWORD}),
                )
                .await,
        )
        .await;
        assert_eq!(answer.status, expected, "{}", answer.text);
        keep(&answer);
    }
    let login = client.login("tech@example.com", NEW_PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text);
    let second_session = session_cookie(&login);
    let second_csrf = client.csrf.clone().unwrap();

    // The old session and a made-up bearer token are refused.
    let stale = reqwest::Client::new()
        .get(client.api("/auth/me"))
        .header("Cookie", format!("bridge_session={session}"))
        .send()
        .await
        .unwrap();
    let stale = read(stale).await;
    stale.assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
    keep(&stale);

    // An agent: registration, its control connection, a device report, and its token misused.
    let (agent_id, agent_token) = agent::register(&client).await;
    let test_agent = TestAgent::connect(&app.base, &agent_token).await;
    test_agent.report(&app.pool, &[DEV]).await;
    let wrong_bearer = format!("{}x", &agent_token[..agent_token.len() - 1]);
    let answer = read(
        reqwest::Client::new()
            .post(client.api("/agents/heartbeat"))
            .bearer_auth(&wrong_bearer)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    answer.assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
    keep(&answer);

    // Pairing: a wrong PIN, then the right one; the dongle token goes to the agent.
    let dongle: Uuid = sqlx::query_scalar("SELECT id FROM dongles WHERE device_id = $1")
        .bind(DEV)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let started = read(
        client
            .post_json(
                &format!("/dongles/{dongle}/pairing-mode"),
                json!({"action": "start"}),
            )
            .await,
    )
    .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    let submit_path = format!("/dongles/{dongle}/pairing-submit");
    let submit = |pin: &'static str| {
        client.post_json(
            &submit_path,
            json!({"pairing_session_id": started.json["pairing_session_id"], "pin": pin}),
        )
    };
    let wrong = read(submit(WRONG_PIN).await).await;
    wrong.assert_error(StatusCode::BAD_REQUEST, "PAIRING_PIN_INVALID");
    keep(&wrong);
    let paired = read(submit(PIN).await).await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    let dongle_token = test_agent.seen.lock().unwrap().paired_tokens[0].clone();
    // A new connection gets the token of the dongle it serves again, in a `dongle_token` message.
    test_agent.close();
    let test_agent = TestAgent::connect(&app.base, &agent_token).await;
    test_agent.report(&app.pool, &[DEV]).await;
    agent::wait_until(|| async { !test_agent.seen.lock().unwrap().dongle_tokens.is_empty() }).await;
    let handed_out = test_agent.seen.lock().unwrap().dongle_tokens[0].1.clone();

    // A command, run to the end.
    let queued = read(
        client
            .post_json(
                &format!("/dongles/{dongle}/commands"),
                json!({"command": "version"}),
            )
            .await,
    )
    .await;
    assert_eq!(queued.status, StatusCode::ACCEPTED, "{}", queued.text);
    let command = queued.json["command_id"].as_str().unwrap().to_string();
    agent::wait_until(|| async {
        let answer = read(
            client
                .get(&format!("/dongles/{dongle}/commands/{command}"))
                .await,
        )
        .await;
        answer.json["status"] == "done"
    })
    .await;
    test_agent.close();

    // The logs were captured, at debug level, and name what they should (the agent's id).
    let text = logs.text();
    assert!(text.lines().count() > 50, "too few log lines: {text}");
    assert!(text.contains("DEBUG"), "debug lines are captured");
    assert!(
        text.contains(&agent_id.to_string()),
        "the capture sees the server's own lines"
    );

    let mut secrets: Vec<(&str, String)> = vec![
        ("password", PASSWORD.to_string()),
        ("wrong password", WRONG_PASSWORD.to_string()),
        ("new password", NEW_PASSWORD.to_string()),
        ("first session id", session),
        ("second session id", second_session),
        ("first CSRF token", csrf),
        ("second CSRF token", second_csrf),
        ("verification token", verification),
        ("reset token", reset),
        ("agent token", agent_token),
        ("wrong agent token", wrong_bearer),
    ];
    for encoded in encodings(&dongle_token) {
        secrets.push(("dongle token", encoded));
    }
    for encoded in encodings(&handed_out) {
        secrets.push(("handed-out dongle token", encoded));
    }
    for (what, secret) in &secrets {
        for line in text.lines() {
            assert!(
                !line.contains(secret.as_str()),
                "the {what} is in a log line: {line}"
            );
        }
        for body in &error_bodies {
            assert!(
                !body.contains(secret.as_str()),
                "the {what} is in an error body: {body}"
            );
        }
    }
    for (what, pin) in [("PIN", PIN), ("wrong PIN", WRONG_PIN)] {
        for line in text.lines() {
            assert!(
                !contains_word(line, pin),
                "the {what} is in a log line: {line}"
            );
        }
        for body in &error_bodies {
            assert!(
                !contains_word(body, pin),
                "the {what} is in an error body: {body}"
            );
        }
    }
    assert!(error_bodies.len() >= 5, "{error_bodies:?}");
}

#[test]
fn a_pin_is_found_as_a_word_and_not_inside_a_longer_run() {
    assert!(contains_word("pin=123456 ok", "123456"));
    assert!(contains_word("\"pin\":\"123456\"", "123456"));
    assert!(contains_word("123456", "123456"));
    assert!(!contains_word("id 9a123456bc", "123456"));
    assert!(!contains_word("n=11234567", "123456"));
}
