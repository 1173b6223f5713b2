//! Hardening (SPEC 3.11) that the other test files do not already cover: hostile HTTP framing (huge
//! headers, too many headers, a client that trickles its headers) and device reports
//! over the control WebSocket that try to claim a dongle. docs/SECURITY.md maps every threat to its
//! tests, these and the others.

use crate::common;

use std::time::{Duration, Instant};

use common::agent::{self, TestAgent};
use common::{read, spawn_app, spawn_app_with};
use control_proto::{AgentMessage, DongleReport};
use reqwest::StatusCode;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

/// The host and port of a test server's base URL.
fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Writes `request` on a new connection and reads until the server closes it or `within` passes.
/// Write errors are ignored: a server that refuses a request may close before it has all of it.
async fn exchange(base: &str, request: &[u8], within: Duration) -> String {
    let mut stream = TcpStream::connect(addr(base)).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    // One answer is enough; keep-alive would otherwise hold the connection open.
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).to_string()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn large_headers_within_the_limits_get_the_standard_error_shape(pool: PgPool) {
    let app = spawn_app(pool).await;
    let http = reqwest::Client::new();
    // A 64 KiB header, a 16 KiB cookie that is not a session, and a 16 KiB bearer token: each is just
    // an unauthenticated request, answered in the standard shape, not a 500.
    let big = "x".repeat(64 * 1024);
    let cookie = format!("bridge_session={}", "a".repeat(16 * 1024));
    let bearer = "b".repeat(16 * 1024);
    for request in [
        http.get(format!("{}/api/v1/auth/me", app.base))
            .header("X-Padding", &big),
        http.get(format!("{}/api/v1/auth/me", app.base))
            .header("Cookie", &cookie),
        http.get(format!("{}/api/v1/auth/me", app.base))
            .bearer_auth(&bearer),
    ] {
        read(request.send().await.unwrap())
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
    }
    // A request id far longer than any real one is replaced, not echoed back.
    let answer = read(
        http.get(format!("{}/api/v1/auth/me", app.base))
            .header("X-Request-ID", &big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = answer.assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
    assert!(
        id.len() < 200,
        "an oversized request id is echoed: {} bytes",
        id.len()
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn headers_beyond_the_limits_are_refused_and_the_server_carries_on(pool: PgPool) {
    let app = spawn_app(pool).await;
    // More header bytes than the server buffers (hyper's limit is about 400 KiB).
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "x".repeat(1024 * 1024)
    );
    let answer = exchange(&app.base, huge.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "huge headers answered: {}",
        answer.lines().next().unwrap_or_default()
    );
    // More headers than the server accepts (hyper's limit is 100).
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-Header-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let answer = exchange(&app.base, many.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "500 headers answered: {}",
        answer.lines().next().unwrap_or_default()
    );
    // Neither hurt the server.
    let health = reqwest::get(format!("{}/healthz", app.base)).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_client_that_trickles_its_headers_is_disconnected(pool: PgPool) {
    // The timeout is made short so that the test runs in seconds; the default is 30 s.
    let app = spawn_app_with(pool, |c| c.header_read_timeout = Duration::from_secs(2)).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: one byte at a time\r\n\r\n";

    // One byte a second, as a slowloris client sends: the whole request would take over a minute.
    let mut slow = TcpStream::connect(addr(&app.base)).await.unwrap();
    let started = Instant::now();
    let mut sent = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let closed = loop {
        ticker.tick().await;
        if slow.write_all(&request[sent..sent + 1]).await.is_err() {
            break true;
        }
        sent += 1;
        // The server may have answered (408) or closed: either way the read sees it at once.
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(10), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(text.starts_with("HTTP/1.1 408"), "answered {text}");
                break true;
            }
            Err(_) => {}
        }
        if sent == request.len() {
            break false;
        }
    };
    assert!(closed, "the whole request got through a byte a second");
    assert!(
        sent < 10,
        "the connection lived through {sent} bytes ({:?})",
        started.elapsed()
    );

    // Meanwhile a normal client is served.
    let health = reqwest::get(format!("{}/healthz", app.base)).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_connection_that_sends_nothing_is_closed(pool: PgPool) {
    // hyper's header timeout starts with the first byte; the server's own deadline covers the wait
    // for it. Short here, so that the test runs in seconds.
    let app = spawn_app_with(pool, |c| c.header_read_timeout = Duration::from_secs(1)).await;
    let mut idle = TcpStream::connect(addr(&app.base)).await.unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("an idle connection was sent {n} bytes"),
        Err(_) => panic!("an idle connection is still open after 10 s"),
    }
    // A connection kept alive after a request is closed the same way once it idles.
    let mut kept = TcpStream::connect(addr(&app.base)).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match kept.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        ended.is_ok(),
        "an idle kept-alive connection is still open after 10 s"
    );
}

/// A report of `device_id` that says everything an agent could say to claim it.
fn claiming(device_id: &str) -> DongleReport {
    DongleReport {
        claimed: true,
        pairing_mode: true,
        ..agent::usb_dongle(device_id)
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_device_report_over_the_control_socket_never_makes_an_owner(pool: PgPool) {
    let app = spawn_app(pool).await;
    let owner = common::dongle::paired(&app, "alice@example.com", "00000000000000b1", 1).await;
    let (mallory, mallory_id) = app.logged_in("mallory@example.com", Role::User).await;
    let (_, token) = agent::register(&mallory).await;
    let foreign = TestAgent::connect(&app.base, &token).await;

    // Mallory's agent reports Alice's dongle and a new one, both as claimed and in pairing mode.
    foreign.send(AgentMessage::Devices(control_proto::Devices {
        dongles: vec![claiming("00000000000000b1"), claiming("00000000000000b2")],
    }));
    agent::wait_until(|| async {
        app.count(
            "SELECT count(*) FROM dongle_sightings s JOIN dongles d ON d.id = s.dongle_id \
             WHERE d.device_id = '00000000000000b2' AND s.present",
        )
        .await
            == 1
    })
    .await;

    // Alice still owns hers; the new one is nobody's; Mallory owns nothing and got no token.
    let owners: Vec<(String, Option<Uuid>, String)> = sqlx::query_as(
        "SELECT device_id, owner_user_id, ownership_state::text FROM dongles ORDER BY device_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        owners,
        vec![
            (
                "00000000000000b1".to_string(),
                Some(owner.user_id),
                "CLAIMED_ACTIVE".to_string()
            ),
            (
                "00000000000000b2".to_string(),
                None,
                "UNCLAIMED".to_string()
            ),
        ]
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM dongles WHERE owner_user_id = '{mallory_id}'"
        ))
        .await,
        0
    );
    assert!(foreign.seen.lock().unwrap().dongle_tokens.is_empty());
    // Mallory sees the unclaimed dongle her agent reports, and not Alice's.
    let list = read(mallory.get("/dongles").await).await;
    let seen: Vec<&str> = list.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, vec!["00000000000000b2"], "{}", list.text);

    // An agent of Alice's that does not serve the dongle gets no token either; the one that serves it
    // gets it again on its next report.
    let (_, idle_token) = agent::register(&owner.client).await;
    let idle = TestAgent::connect(&app.base, &idle_token).await;
    idle.report(&app.pool, &[]).await;
    owner.agent.report(&app.pool, &["00000000000000b1"]).await;
    agent::wait_until(|| async { !owner.agent.seen.lock().unwrap().dongle_tokens.is_empty() })
        .await;
    assert!(idle.seen.lock().unwrap().dongle_tokens.is_empty());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_oversized_control_message_ends_the_agents_connection(pool: PgPool) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_app(pool).await;
    let (client, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&client).await;
    let mut ws = agent::try_connect(&app.base, &token).await.unwrap();
    let limit = bridge_server::routes::ws::CONTROL_MAX_MESSAGE_LEN;

    // A message just under the limit is read (and refused as no control message), and the connection
    // stays open.
    ws.send(Message::text("x".repeat(limit - 1024)))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(_)) => {}
                other => panic!("the connection ended: {other:?}"),
            }
        }
    })
    .await
    .expect("an answer in time");
    assert!(answer.contains("bad_message"), "{answer}");
    assert!(app.hub().is_connected(agent_id).await);

    // A larger one ends the connection without being buffered whole.
    let _ = ws.send(Message::text("x".repeat(limit + 1))).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection is still open");
    agent::wait_until(|| async { !app.hub().is_connected(agent_id).await }).await;
    // The agent may connect again, and the server carries on.
    let again = TestAgent::connect(&app.base, &token).await;
    assert!(app.hub().is_connected(again.agent_id).await);
}

/// Too many control messages per second from one agent are throttled, not dropped: the server reads
/// them later (counted in /metrics), answers every one, and keeps the connection.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_flood_of_control_messages_is_throttled_and_nothing_is_dropped(pool: PgPool) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_app_with(pool, |c| c.agent_messages_per_sec = 10).await;
    let (client, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&client).await;
    let mut ws = agent::try_connect(&app.base, &token).await.unwrap();
    // 25 messages at once: each is answered (as no control message), 10 per second.
    for n in 0..25 {
        ws.send(Message::text(format!("not json {n}")))
            .await
            .unwrap();
    }
    let mut answered = 0;
    while answered < 25 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                assert!(text.contains("bad_message"), "{text}");
                answered += 1;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("after {answered} answers: {other:?}"),
        }
    }
    assert!(app.hub().is_connected(agent_id).await);
    let metrics = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let throttled: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("agent_control_messages_throttled_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(throttled >= 2.0, "throttled {throttled}:\n{metrics}");
}
