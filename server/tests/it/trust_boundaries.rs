//! The trust boundaries of SPEC 3.11 under attack (issue "Trust boundaries hold under attack"): each test
//! is named after the point it proves, and docs/SECURITY.md lists it beside its threat.

use crate::common;

use common::{PASSWORD, read, spawn_app, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

/// An email of 10 000 characters used to become a rate-limit key before anything looked at its length,
/// and PostgreSQL refuses an index entry that long: a 500. Every form that takes an email (and the
/// password and token fields beside it) now refuses an over-long value with a 400 before that.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_over_long_email_or_field_is_a_400_before_it_reaches_a_database_key(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    // Incompressible, as an attacker's would be: PostgreSQL compresses a run of one letter below the
    // index limit, but not this.
    let noise: String = (0..280)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let long_email = format!("{noise}@example.com");
    let long = "p".repeat(5_000);
    for (path, body) in [
        (
            "/auth/login",
            json!({"email": long_email, "password": PASSWORD}),
        ),
        (
            "/auth/signup",
            json!({"email": long_email, "password": PASSWORD}),
        ),
        ("/auth/password-reset/request", json!({"email": long_email})),
        (
            "/auth/login",
            json!({"email": "tech@example.com", "password": long}),
        ),
        (
            "/auth/password-reset/confirm",
            json!({"token": long, "password": PASSWORD}),
        ),
        ("/auth/verify-email", json!({"token": long})),
    ] {
        let answer = read(client.post_json(path, body).await).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    }
    // The longest valid address is still an address.
    let longest = format!("{}@{}.example.com", "a".repeat(64), "b".repeat(177));
    assert_eq!(longest.len(), 254);
    let answer = read(client.signup(&longest, PASSWORD).await).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    app.stop().await;
}

/// HTTP lets a client invent a method; each invented one was a new label value on every request metric,
/// so a client could grow the server's memory and /metrics without bound.
#[sqlx::test(migrator = "MIGRATOR")]
async fn metrics_labels_are_bounded_an_unknown_method_is_recorded_as_other(pool: PgPool) {
    let app = spawn_app(pool).await;
    let client = app.client();
    for i in 0..5 {
        let method = Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let res = client
            .http
            .request(method, client.api("/auth/me"))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_client_error(), "{}", res.status());
        let res = client
            .http
            .request(
                Method::from_bytes(b"PROBE").unwrap(),
                client.url(&format!("/no/such/route/{i}")),
            )
            .send()
            .await
            .unwrap();
        assert!(res.status().is_client_error());
    }
    let text = client.page("/metrics").await;
    assert!(!text.contains("INVENTED"), "{text}");
    assert!(!text.contains("PROBE"), "{text}");
    assert!(!text.contains("/no/such/route"), "{text}");
    assert!(text.contains(r#"method="other""#), "{text}");
    app.stop().await;
}

/// Behind a TLS-terminating proxy the server itself speaks plain HTTP, but browsers reach it over
/// HTTPS: the session cookie must be Secure, or it could leak over a downgraded connection.
#[sqlx::test(migrator = "MIGRATOR")]
async fn cookies_are_secure_behind_a_tls_terminating_proxy(pool: PgPool) {
    let app = spawn_app_with(pool, |config| {
        config.public_url = Some("https://bridge.example.com".into());
    })
    .await;
    app.create_user("tech@example.com", Role::User).await;
    let mut client = app.client();
    let login = client.login("tech@example.com", PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK);
    let cookie = login
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("bridge_session="))
        .expect("a session cookie");
    assert!(cookie.contains("Secure"), "{cookie}");
    app.stop().await;
}

/// A mail that was never sent (no SMTP configured, or a mail server that never answered) kept its token
/// in clear in the outbox for ever. Once the token has expired the message is given up and the token and
/// link are scrubbed; a mail whose token is still valid keeps them.
#[sqlx::test(migrator = "MIGRATOR")]
async fn unsent_mailed_tokens_are_scrubbed_from_the_outbox_after_their_expiry(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let client = app.client();
    for email in ["old@example.com", "new@example.com"] {
        let answer = read(client.signup(email, PASSWORD).await).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    }
    // The first one was queued 25 hours ago: its 24-hour verification link has expired.
    sqlx::query(
        "UPDATE email_outbox SET created_at = now() - interval '25 hours' \
         WHERE to_email = 'old@example.com'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let config = bridge_server::config::ServerConfig::default();
    let expired = bridge_server::email::outbox::give_up_expired(
        &pool,
        config.verification_ttl,
        config.reset_ttl,
    )
    .await
    .unwrap();
    assert_eq!(expired, 1);
    let rows: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT to_email, status::text, payload FROM email_outbox ORDER BY to_email",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let (_, status, payload) = rows.iter().find(|r| r.0 == "new@example.com").unwrap();
    assert_eq!(status, "queued");
    assert!(
        payload["token"].is_string(),
        "a valid link stays: {payload}"
    );
    let (_, status, payload) = rows.iter().find(|r| r.0 == "old@example.com").unwrap();
    assert_eq!(status, "failed");
    assert!(
        payload.get("token").is_none() && payload.get("link").is_none(),
        "{payload}"
    );
    app.stop().await;
}

/// Whoever knew the old password may have registered an agent with it, and that agent outlived the
/// reset. A reset now ends every session and revokes every agent token of the account; the mail
/// confirming the change and the audit log say so.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_password_reset_revokes_every_agent_token_and_the_mail_says_so(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (client, _) = app.logged_in("tech@example.com", Role::User).await;
    let (_, token) = common::agent::register(&client).await;
    let heartbeat = || async {
        client
            .http
            .post(client.api("/agents/heartbeat"))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(heartbeat().await, StatusCode::OK);

    let anonymous = app.client();
    let answer = read(
        anonymous
            .post_json(
                "/auth/password-reset/request",
                json!({"email": "tech@example.com"}),
            )
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let reset = app.mailed_token("tech@example.com", "password_reset").await;
    let answer = read(
        anonymous
            .post_json(
                "/auth/password-reset/confirm",
                json!({"token": reset, "password": "an entirely new passphrase"}),
            )
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);

    assert_eq!(heartbeat().await, StatusCode::UNAUTHORIZED);
    let payload: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM email_outbox WHERE to_email = 'tech@example.com' \
         AND template = 'password_changed'",
    )
    .fetch_one(&pool)
    .await
    .expect("a confirmation mail");
    assert_eq!(payload["agent_tokens_revoked"], 1);
    let details: serde_json::Value =
        sqlx::query_scalar("SELECT details FROM audit_logs WHERE action = 'auth.password_reset'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(details["agent_tokens_revoked"], 1, "{details}");
    app.stop().await;
}

/// An account whose address is not confirmed may sign in and look around, but may not register an agent
/// or pair a dongle: 403 EMAIL_NOT_VERIFIED, whose message says what to do. Confirming the address lifts
/// it.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_unverified_account_may_sign_in_but_not_register_agents_or_pair(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut client = app.client();
    let answer = read(client.signup("new@example.com", PASSWORD).await).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let login = client.login("new@example.com", PASSWORD).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.text);
    let me = read(client.get("/auth/me").await).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json["email_verified"], false, "{}", me.text);

    let refused = read(
        client
            .post_json("/agents/register", json!({"agent_name": "bench"}))
            .await,
    )
    .await;
    refused.assert_error(StatusCode::FORBIDDEN, "EMAIL_NOT_VERIFIED");
    assert!(
        refused.json["message"]
            .as_str()
            .unwrap()
            .contains("Confirm your email address"),
        "{}",
        refused.text
    );
    let dongle = uuid::Uuid::new_v4();
    read(
        client
            .post_json(
                &format!("/dongles/{dongle}/pairing-mode"),
                json!({"action": "start"}),
            )
            .await,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "EMAIL_NOT_VERIFIED");
    read(
        client
            .post_json(
                &format!("/dongles/{dongle}/pairing-submit"),
                json!({"pairing_session_id": uuid::Uuid::new_v4(), "pin": "123456"}),
            )
            .await,
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "EMAIL_NOT_VERIFIED");

    let token = app.mailed_token("new@example.com", "verify_email").await;
    let answer = read(
        client
            .post_json("/auth/verify-email", json!({"token": token}))
            .await,
    )
    .await;
    assert!(answer.status.is_success(), "{}", answer.text);
    let registered = read(
        client
            .post_json("/agents/register", json!({"agent_name": "bench"}))
            .await,
    )
    .await;
    assert_eq!(
        registered.status,
        StatusCode::CREATED,
        "{}",
        registered.text
    );
    app.stop().await;
}

/// Agent tokens lived for ever unless the server was told otherwise. A new token now lives 90 days by
/// default, renewed (at most once a day) while the agent is in use, so an agent left running never
/// expires and a forgotten copy of its token does.
#[sqlx::test(migrator = "MIGRATOR")]
async fn agent_tokens_expire_after_90_days_unless_the_agent_is_in_use(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (client, _) = app.logged_in("tech@example.com", Role::User).await;
    let (agent_id, token) = common::agent::register(&client).await;
    let days_left = || async {
        let days: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM expires_at - now())::float8 / 86400 FROM agent_tokens \
             WHERE agent_id = $1",
        )
        .bind(agent_id)
        .fetch_one(&pool)
        .await
        .expect("the token has an expiry");
        days
    };
    let left = days_left().await;
    assert!((89.9..=90.0).contains(&left), "{left} days");
    // Ten days later (as far as the token knows), a heartbeat renews it.
    sqlx::query(
        "UPDATE agent_tokens SET expires_at = now() + interval '80 days' WHERE agent_id = $1",
    )
    .bind(agent_id)
    .execute(&pool)
    .await
    .unwrap();
    let res = client
        .http
        .post(client.api("/agents/heartbeat"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let left = days_left().await;
    assert!((89.9..=90.0).contains(&left), "renewed: {left} days");
    // Over the control connection too.
    sqlx::query(
        "UPDATE agent_tokens SET expires_at = now() + interval '80 days' WHERE agent_id = $1",
    )
    .bind(agent_id)
    .execute(&pool)
    .await
    .unwrap();
    let agent = common::agent::TestAgent::connect(&app.base, &token).await;
    agent.send(control_proto::AgentMessage::Heartbeat);
    common::agent::wait_until(|| async { days_left().await > 89.9 }).await;
    app.stop().await;
}

/// A revoked or expired agent token ended the agent's connections only at the next heartbeat (10 s)
/// or the data plane's next periodic check (15 s), and a revocation on another instance reaches no
/// kick. Now the next message of any kind, a second or more after the last check, checks the token.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_expired_or_revoked_agent_token_ends_its_connections_on_the_next_message(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let (client, _) = app.logged_in("tech@example.com", Role::User).await;
    let (agent_id, token) = common::agent::register(&client).await;
    let agent = common::agent::TestAgent::connect(&app.base, &token).await;
    let mut data = common::data::DataClient::connect(&app.base, &token).await;
    // Expired behind the server's back, as a revocation on another instance would be.
    sqlx::query(
        "UPDATE agent_tokens SET expires_at = now() - interval '1 second' WHERE agent_id = $1",
    )
    .bind(agent_id)
    .execute(&pool)
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    agent.send(control_proto::AgentMessage::Devices(
        control_proto::Devices {
            dongles: Vec::new(),
        },
    ));
    data.drops(uuid::Uuid::new_v4(), control_proto::data::Side::A, 0)
        .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while !agent.is_closed() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(agent.is_closed(), "the control connection ends");
    assert!(
        data.closed_within(std::time::Duration::from_secs(2)).await,
        "the data connection ends"
    );
    app.stop().await;
}

/// A device report is what one agent sees, not proof of anything: a stranger's agent reporting someone
/// else's dongle (a LAN dongle seen from another desk, or a modified agent) changed the owned row's
/// capabilities, firmware build, transport and presence. Now only the owner's agents change an owned
/// dongle's row.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_strangers_report_never_changes_an_owned_dongles_row(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let owner = common::dongle::paired(&app, "alice@example.com", "00000000000000f1", 1).await;
    let row = || async {
        let row: (String, i64, serde_json::Value, bool) = sqlx::query_as(
            "SELECT fw_build, capabilities, transport, present FROM dongles WHERE id = $1",
        )
        .bind(owner.dongle_id)
        .fetch_one(&pool)
        .await
        .unwrap();
        row
    };
    let before = row().await;
    let (mallory, _) = app.logged_in("mallory@example.com", Role::User).await;
    let (_, token) = common::agent::register(&mallory).await;
    let agent = common::agent::TestAgent::connect(&app.base, &token).await;
    agent.send(control_proto::AgentMessage::Devices(
        control_proto::Devices {
            dongles: vec![control_proto::DongleReport {
                fw_build: "evil-9.9".into(),
                capabilities: 0xffff,
                present: false,
                transport: control_proto::Transport::Lan {
                    addr: "10.0.0.66:40000".into(),
                },
                ..common::agent::usb_dongle("00000000000000f1")
            }],
        },
    ));
    // The report is recorded (the sighting is mallory's own), and the owned row is as it was.
    common::agent::wait_until(|| async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM dongle_sightings s JOIN agents a ON a.id = s.agent_id \
             JOIN users u ON u.id = a.user_id WHERE u.email = 'mallory@example.com')",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(row().await, before);
    app.stop().await;
}

/// Rows an agent's reports create do not pile up: a dongle row nobody owns and nobody has seen for the
/// retention period is deleted with its old sightings, while owned dongles, recent ones and those an
/// agent sees now stay.
#[sqlx::test(migrator = "MIGRATOR")]
async fn dongles_nobody_owns_or_has_seen_for_the_retention_period_are_deleted(pool: PgPool) {
    use bridge_server::agents::{Forgotten, STALE_DONGLE_RETENTION, forget_stale_dongles};
    let app = spawn_app(pool.clone()).await;
    let owned = common::dongle::paired(&app, "alice@example.com", "00000000000000f1", 1).await;
    let (mallory, _) = app.logged_in("mallory@example.com", Role::User).await;
    let (_, token) = common::agent::register(&mallory).await;
    let agent = common::agent::TestAgent::connect(&app.base, &token).await;
    agent
        .report(
            &pool,
            &["00000000000000e1", "00000000000000e2", "00000000000000e3"],
        )
        .await;
    // The agent no longer sees e1 and e2; it still sees e3.
    agent.report(&pool, &["00000000000000e3"]).await;
    common::agent::wait_until(|| async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dongle_sightings WHERE present")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 2
    })
    .await;
    let long_ago = "now() - interval '31 days'";
    for sql in [
        format!(
            "UPDATE dongles SET last_seen_at = {long_ago} WHERE device_id IN ('00000000000000e1', '00000000000000e3')"
        ),
        format!("UPDATE dongle_sightings SET last_seen_at = {long_ago}"),
        format!(
            "UPDATE dongles SET last_seen_at = {long_ago}, present = false WHERE id = '{}'",
            owned.dongle_id
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    let forgotten = forget_stale_dongles(&pool, STALE_DONGLE_RETENTION)
        .await
        .unwrap();
    let left: Vec<String> = sqlx::query_scalar("SELECT device_id FROM dongles ORDER BY device_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        left,
        ["00000000000000e2", "00000000000000e3", "00000000000000f1"],
        "e1: unowned, unseen for 31 days; e2 seen lately; e3 seen now; f1 owned"
    );
    assert_eq!(forgotten.dongles, 1);
    assert!(forgotten.sightings >= 2, "{forgotten:?}");
    let present: i64 = sqlx::query_scalar("SELECT count(*) FROM dongle_sightings WHERE present")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(present >= 1, "a present sighting is never deleted");
    assert_eq!(
        forget_stale_dongles(&pool, STALE_DONGLE_RETENTION)
            .await
            .unwrap(),
        Forgotten::default(),
        "nothing more the second time"
    );
    app.stop().await;
}

/// One user cannot keep the agents busy for everybody: the requests a user sends to agents (frames by
/// hand, commands, CAN configurations, pairing) are counted together per user across all their
/// dongles, and past the limit they answer 429 with Retry-After, while another user is not affected.
#[sqlx::test(migrator = "MIGRATOR")]
async fn agent_bound_requests_are_limited_per_user_across_dongles(pool: PgPool) {
    use bridge_server::rate_limit::Limit;
    let app = spawn_app_with(pool, |c| {
        // Pairing a dongle is two of them (start and submit).
        c.rate_limits.agent_requests_per_user = Limit::new(5, std::time::Duration::from_secs(60));
        c.rate_limits.can_send_per_dongle = Limit::new(100, std::time::Duration::from_secs(60));
    })
    .await;
    let first = common::dongle::paired(&app, "alice@example.com", "00000000000000c1", 0).await;
    let frame = json!({"can_id": 1, "data_hex": "00"});
    async fn send(owner: &common::dongle::Owner, body: serde_json::Value) -> common::Answer {
        let path = format!("/dongles/{}/can/send", owner.dongle_id);
        read(owner.client.post_json(&path, body).await).await
    }
    for _ in 0..3 {
        assert_eq!(send(&first, frame.clone()).await.status, StatusCode::OK);
    }
    // The sixth agent-bound request of the same user (two went to pairing), whatever it is, waits.
    let command = read(
        first
            .client
            .post_json(
                &format!("/dongles/{}/commands", first.dongle_id),
                json!({"command": "remote status"}),
            )
            .await,
    )
    .await;
    command.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    assert!(command.headers.contains_key("retry-after"));
    send(&first, frame.clone())
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    // Another user has a counter of their own.
    let other = common::dongle::paired(&app, "bob@example.com", "00000000000000c2", 0).await;
    assert_eq!(send(&other, frame).await.status, StatusCode::OK);
    app.stop().await;
}

/// A user's agents cannot fill the dongles table: ids the server has no row for count against the
/// user's allowance of new ids, and a report past it has its new ids left out (known ones still apply).
#[sqlx::test(migrator = "MIGRATOR")]
async fn reports_cannot_introduce_more_new_dongle_ids_than_the_users_allowance(pool: PgPool) {
    use bridge_server::rate_limit::Limit;
    let app = spawn_app_with(pool.clone(), |c| {
        c.rate_limits.new_dongle_ids_per_user = Limit::new(3, std::time::Duration::from_secs(3600));
    })
    .await;
    let (mallory, _) = app.logged_in("mallory@example.com", Role::User).await;
    let (_, token) = common::agent::register(&mallory).await;
    let report = |ids: &[&str]| {
        let body = json!({ "dongles": ids.iter().map(|d| common::agent::usb_dongle(d)).collect::<Vec<_>>() });
        let http = reqwest::Client::new();
        let url = format!("{}/api/v1/agents/devices/report", app.base);
        let token = token.clone();
        async move {
            let res = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
    };
    let rows = || async {
        sqlx::query_scalar::<_, String>("SELECT device_id FROM dongles ORDER BY device_id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    report(&["00000000000000a1", "00000000000000a2"]).await;
    assert_eq!(rows().await, ["00000000000000a1", "00000000000000a2"]);
    // Two more new ids would make four: they are left out, the known ones still count as seen.
    report(&[
        "00000000000000a1",
        "00000000000000a2",
        "00000000000000a3",
        "00000000000000a4",
    ])
    .await;
    assert_eq!(rows().await, ["00000000000000a1", "00000000000000a2"]);
    let present: i64 = sqlx::query_scalar("SELECT count(*) FROM dongle_sightings WHERE present")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(present, 2);
    app.stop().await;
}

/// The database pool is not a weapon: a CAN configuration held a transaction (and an advisory lock) for
/// the whole round trip to the agent, and a pairing start the dongle's row lock, so a user whose own agent never answers could fire requests
/// until every pooled connection waited on it, and everybody else's requests stalled or answered 503.
/// Now no transaction waits on an agent: one request per dongle holds a lease, the others are told to
/// try again at once.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_that_never_answers_cannot_take_the_database_pool(pool: PgPool) {
    use futures::SinkExt;
    let app = spawn_app_with(pool, |c| {
        c.dongle_request_timeout = std::time::Duration::from_secs(3);
        c.agent_request_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let owner = common::dongle::paired(&app, "alice@example.com", "00000000000000f7", 0).await;
    owner.agent.close();
    // The same agent again, now silent: it reads nothing and answers nothing.
    let mut silent = common::agent::try_connect(&app.base, &owner.token)
        .await
        .unwrap();
    let hello = control_proto::AgentMessage::Hello(control_proto::Hello {
        protocol: control_proto::PROTOCOL_VERSION,
        agent_version: "silent".into(),
        hostname: "silent".into(),
        os: "linux".into(),
        interfaces: vec![],
    });
    silent
        .send(tokio_tungstenite::tungstenite::Message::text(
            hello.to_json(),
        ))
        .await
        .unwrap();
    // It also sees an unclaimed dongle, which its user tries to pair.
    let report = control_proto::AgentMessage::Devices(control_proto::Devices {
        dongles: vec![
            common::agent::usb_dongle("00000000000000f7"),
            common::agent::usb_dongle("00000000000000f8"),
        ],
    });
    silent
        .send(tokio_tungstenite::tungstenite::Message::text(
            report.to_json(),
        ))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let path = format!("/dongles/{}/can-config", owner.dongle_id);
    let body = json!({"bitrate": 500000, "sample_point_permille": 875, "mode": "normal"});
    let unclaimed: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM dongles WHERE device_id = '00000000000000f8'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let pairing = format!("/dongles/{unclaimed}/pairing-mode");
    let requests: Vec<_> = (0..50)
        .map(|i| {
            let request = if i % 2 == 0 {
                owner
                    .client
                    .request(reqwest::Method::PUT, &path)
                    .json(&body)
                    .send()
            } else {
                owner
                    .client
                    .request(reqwest::Method::POST, &pairing)
                    .json(&json!({"action": "start"}))
                    .send()
            };
            tokio::spawn(async move {
                let response = request.await.unwrap();
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                (
                    status,
                    body["code"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for _ in 0..5 {
        for path in ["/auth/me", "/dongles"] {
            let started = std::time::Instant::now();
            let status = bob.get(path).await.status();
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(1),
                "{path} took {:?} while the silent agent was asked",
                started.elapsed()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for request in requests {
        // The silent agent's own requests time out (504 DONGLE_TIMEOUT, 503 AGENT_OFFLINE) or are told
        // to try again (409); none finds the database out of connections, and nothing is a 500.
        let (status, code) = request.await.unwrap();
        assert!(
            code != "SERVICE_UNAVAILABLE" && status != StatusCode::INTERNAL_SERVER_ERROR,
            "{status} {code}"
        );
    }
    app.stop().await;
}
