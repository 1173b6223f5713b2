//! Several server instances on one database: an agent connected to one instance is reached from
//! another (requests, fire-and-forget messages, kicks), by NOTIFY or by polling, and an instance that
//! stops beating loses its agents after the staleness window.
//!
//! Instance 1 is a `TestApp`; the others are started here on a pool of their own over the same test
//! database, as a separate process would have, with the same dongle-token keys.

use crate::common;

use std::time::Duration;

use bridge_server::agents::cluster::ClusterSettings;
use bridge_server::agents::hub::RequestError;
use bridge_server::app::{self, RunningServer};
use bridge_server::config::ServerConfig;
use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::agent::{self, PIN, TestAgent};
use common::{TestApp, TestClient, read, spawn_app_with};
use control_proto::{AgentMessage, Hello, RequestBody, ServerMessage};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const DEV: &str = "00000000000000e1";

/// Short windows, so a dead instance is noticed within a test; the poll is slow, so that what arrives
/// quickly arrived by NOTIFY.
fn notify_settings() -> ClusterSettings {
    ClusterSettings {
        heartbeat: Duration::from_millis(200),
        stale_after: Duration::from_secs(2),
        poll_interval: Duration::from_secs(60),
        listen: true,
    }
}

/// No LISTEN at all: everything travels by the mailbox poll.
fn polling_settings() -> ClusterSettings {
    ClusterSettings {
        poll_interval: Duration::from_millis(100),
        listen: false,
        ..notify_settings()
    }
}

/// Another instance, with its own pool on the test's database.
struct Instance {
    server: Option<RunningServer>,
    pool: PgPool,
}

impl Instance {
    /// Starts an instance on `first`'s database, with its keys and `settings`.
    async fn start(first: &TestApp, settings: ClusterSettings) -> Self {
        Self::start_with(first, settings, None).await
    }

    /// The same, with the relay (and so the instances' messages) on `nats`.
    async fn start_with(
        first: &TestApp,
        settings: ClusterSettings,
        nats: Option<bridge_server::groups::jetstream::NatsSettings>,
    ) -> Self {
        let options = first.pool.connect_options().as_ref().clone();
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(options)
            .await
            .expect("a second pool on the test database");
        let config = ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            dongle_keys: first.keys(),
            cluster: settings,
            nats,
            ..ServerConfig::default()
        };
        let server = app::spawn(config, pool.clone())
            .await
            .expect("the second instance starts");
        Self {
            server: Some(server),
            pool,
        }
    }

    fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("running")
    }

    fn base(&self) -> String {
        self.server().base_url.clone()
    }

    fn instance_id(&self) -> Uuid {
        self.server().state.hub.instance_id().expect("clustered")
    }

    /// The same user's client, talking to this instance (sessions live in the database, and the cookie
    /// jar sends the session cookie to any port of 127.0.0.1).
    fn client_like(&self, client: &TestClient) -> TestClient {
        TestClient {
            base: self.base(),
            http: client.http.clone(),
            csrf: client.csrf.clone(),
        }
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
        self.pool.close().await;
    }

    /// Kills the instance: no shutdown, no cleanup, its rows stay behind. The pool closes first, so
    /// nothing of the instance (not even a socket task noticing its end) writes to the database again.
    async fn kill(mut self) {
        self.pool.close().await;
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

async fn start_pairing(client: &TestClient, dongle: Uuid) -> common::Answer {
    read(
        client
            .post_json(
                &format!("/dongles/{dongle}/pairing-mode"),
                json!({"action": "start"}),
            )
            .await,
    )
    .await
}

async fn dongle_id(pool: &PgPool) -> Uuid {
    sqlx::query_scalar("SELECT id FROM dongles WHERE device_id = $1")
        .bind(DEV)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Pairing, presence, a too-large request, unpair and revocation, all asked of instance 1 for an agent
/// connected to instance 2.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_on_another_instance_is_paired_told_to_forget_and_kicked(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| c.cluster = notify_settings()).await;
    let second = Instance::start(&app, notify_settings()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&alice).await;
    let agent = TestAgent::connect(&second.base(), &token).await;
    assert_eq!(agent.agent_id, agent_id);
    agent.report(&pool, &[DEV]).await;
    let dongle = dongle_id(&pool).await;

    // Instance 1 does not hold the connection but knows it is connected, and shows the agent online.
    let hub = app.hub();
    assert!(!hub.is_connected_here(agent_id));
    assert!(second.server().state.hub.is_connected_here(agent_id));
    assert!(hub.is_connected(agent_id).await);
    let holder: Uuid =
        sqlx::query_scalar("SELECT instance_id FROM agent_connections WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(holder, second.instance_id());
    let agents = read(alice.get("/agents").await).await;
    assert_eq!(agents.json["items"][0]["online"], true, "{}", agents.text);
    let detail = read(alice.get(&format!("/dongles/{dongle}")).await).await;
    assert_eq!(detail.json["online"], true, "{}", detail.text);

    // Pairing through instance 1: the requests cross to instance 2 and the answers come back.
    let started = start_pairing(&alice, dongle).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    assert_eq!(agent.seen.lock().unwrap().pairing_starts, 1);
    let paired = read(
        alice
            .post_json(
                &format!("/dongles/{dongle}/pairing-submit"),
                json!({"pairing_session_id": started.json["pairing_session_id"], "pin": PIN}),
            )
            .await,
    )
    .await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    // The token reaches the agent on instance 2 as a fire-and-forget message from instance 1.
    let sent = agent.seen.lock().unwrap().paired_tokens.clone();
    assert_eq!(sent.len(), 1);
    agent::wait_until(|| async {
        agent.seen.lock().unwrap().dongle_tokens == vec![(DEV.to_string(), sent[0].clone())]
    })
    .await;
    // The result reaches whichever instance the user asks.
    let on_second = second.client_like(&alice);
    let detail = read(on_second.get(&format!("/dongles/{dongle}")).await).await;
    assert_eq!(
        detail.json["ownership_state"], "CLAIMED_ACTIVE",
        "{}",
        detail.text
    );
    assert_eq!(detail.json["online"], true);

    // A request too large for a notification is refused whole, and never reaches the agent.
    let huge = RequestBody::Command {
        command_id: Uuid::new_v4(),
        device_id: DEV.parse().unwrap(),
        line: "x".repeat(9000),
        timeout_ms: 1000,
        allow_dangerous: false,
    };
    match hub.request(agent_id, huge, Duration::from_secs(2)).await {
        Err(RequestError::TooLarge { size, limit }) => assert!(size > limit),
        other => panic!("expected TooLarge, got {other:?}"),
    }

    // Unpair on instance 1 tells the agent on instance 2 to forget.
    let unpaired = read(
        alice
            .post_json(&format!("/dongles/{dongle}/unpair"), json!({}))
            .await,
    )
    .await;
    assert_eq!(unpaired.status, StatusCode::OK, "{}", unpaired.text);
    assert_eq!(unpaired.json["forget_sent"], true);
    agent::wait_until(|| async { agent.seen.lock().unwrap().forgets == vec![DEV.to_string()] })
        .await;
    // Every message was claimed; nothing is left in the mailbox.
    agent::wait_until(|| async { count(&pool, "SELECT count(*) FROM agent_mailbox").await == 0 })
        .await;

    // Revoking the token on instance 1 closes the socket held by instance 2. This connection sends no
    // heartbeat, so only the relayed kick can close it.
    agent.close();
    agent::wait_until(|| async { !hub.is_connected(agent_id).await }).await;
    let mut ws = agent::try_connect(&second.base(), &token)
        .await
        .expect("the upgrade succeeds");
    let hello = AgentMessage::Hello(Hello {
        protocol: control_proto::PROTOCOL_VERSION,
        agent_version: "test-0.1".into(),
        hostname: "bench-host".into(),
        os: "linux".into(),
        interfaces: vec![],
    });
    ws.send(Message::text(hello.to_json())).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a welcome in time")
        .expect("open")
        .unwrap();
    let Message::Text(text) = frame else {
        panic!("a text frame")
    };
    assert!(matches!(
        ServerMessage::from_json(text.as_str()).unwrap(),
        ServerMessage::Welcome(_)
    ));
    agent::wait_until(|| async { hub.is_connected(agent_id).await }).await;
    let revoked = read(alice.delete(&format!("/agents/{agent_id}/tokens")).await).await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the socket on instance 2 was closed");
    agent::wait_until(|| async {
        count(&pool, "SELECT count(*) FROM agent_connections").await == 0
    })
    .await;
    assert!(!second.server().state.hub.is_connected_here(agent_id));

    second.stop().await;
    app.stop().await;
}

/// With LISTEN turned off on both instances, requests, replies and messages arrive by polling alone.
#[sqlx::test(migrator = "MIGRATOR")]
async fn without_notifications_the_mailbox_poll_delivers_everything(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| c.cluster = polling_settings()).await;
    let second = Instance::start(&app, polling_settings()).await;
    pair_and_unpair_on_the_second(app, second, &pool).await;
}

/// The test's own stream (and so mailbox subjects) on the test run's NATS server.
fn nats() -> bridge_server::groups::jetstream::NatsSettings {
    let url = std::env::var("BRIDGE_TEST_NATS_URL")
        .expect("BRIDGE_TEST_NATS_URL names the nats-server of the test run (scripts/test)");
    bridge_server::groups::jetstream::NatsSettings {
        stream: format!("T{}", Uuid::new_v4().simple()),
        ..bridge_server::groups::jetstream::NatsSettings::new(url)
    }
}

/// A user of instance 1 pairs and unpairs a dongle of an agent connected to `second`: a request, its
/// reply and a message between the instances. Both instances stop at the end.
async fn pair_and_unpair_on_the_second(app: TestApp, second: Instance, pool: &PgPool) {
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&alice).await;
    let agent = TestAgent::connect(&second.base(), &token).await;
    agent.report(pool, &[DEV]).await;
    assert!(app.hub().is_connected(agent_id).await);
    pair_and_unpair_across(&alice, &agent, pool).await;
    agent.close();
    second.stop().await;
    app.stop().await;
}

/// Pairing and unpairing an agent on another instance: a request, its reply and a message.
async fn pair_and_unpair_across(alice: &TestClient, agent: &TestAgent, pool: &PgPool) {
    let dongle = dongle_id(pool).await;
    let started = start_pairing(alice, dongle).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    let paired = read(
        alice
            .post_json(
                &format!("/dongles/{dongle}/pairing-submit"),
                json!({"pairing_session_id": started.json["pairing_session_id"], "pin": PIN}),
            )
            .await,
    )
    .await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    agent::wait_until(|| async { agent.seen.lock().unwrap().dongle_tokens.len() == 1 }).await;
    let unpaired = read(
        alice
            .post_json(&format!("/dongles/{dongle}/unpair"), json!({}))
            .await,
    )
    .await;
    assert_eq!(unpaired.status, StatusCode::OK, "{}", unpaired.text);
    agent::wait_until(|| async { agent.seen.lock().unwrap().forgets.len() == 1 }).await;
}

/// With the relay on NATS, the instances' messages go there too: the database's mailbox is made to
/// refuse every row, and a pairing and an unpairing across two instances still work, with the poll
/// and NOTIFY turned off.
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs a nats-server (BRIDGE_TEST_NATS_URL): scripts/test starts one where nats-server is installed"
)]
async fn with_the_relay_on_nats_the_instances_messages_go_there(pool: PgPool) {
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_mail() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'the database mailbox was used'; END $$; \
         CREATE TRIGGER refuse_mail BEFORE INSERT ON agent_mailbox \
           FOR EACH ROW EXECUTE FUNCTION refuse_mail();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let nats = nats();
    let settings = ClusterSettings {
        poll_interval: Duration::from_secs(60),
        listen: false,
        ..notify_settings()
    };
    let (first_nats, first_settings) = (nats.clone(), settings.clone());
    let app = spawn_app_with(pool.clone(), move |c| {
        c.cluster = first_settings;
        c.nats = Some(first_nats);
    })
    .await;
    let second = Instance::start_with(&app, settings, Some(nats)).await;
    pair_and_unpair_on_the_second(app, second, &pool).await;
}

/// An instance whose relay is on NATS and one whose relay is not (an upgrade in progress): the first
/// finds no one reading its messages on NATS and writes them to the database's mailbox instead.
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs a nats-server (BRIDGE_TEST_NATS_URL): scripts/test starts one where nats-server is installed"
)]
async fn a_message_no_one_reads_on_nats_goes_through_the_database(pool: PgPool) {
    let nats = nats();
    let app = spawn_app_with(pool.clone(), move |c| {
        c.cluster = notify_settings();
        c.nats = Some(nats);
    })
    .await;
    let second = Instance::start(&app, notify_settings()).await;
    pair_and_unpair_on_the_second(app, second, &pool).await;
}

/// The LISTEN connection of instance 2 is killed by the database; it comes back, and a request posted
/// meanwhile is still delivered (the poll is a minute away, so the resync on reconnect delivered it).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_lost_listen_connection_is_reopened_and_nothing_is_lost(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| c.cluster = notify_settings()).await;
    let second = Instance::start(&app, notify_settings()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (_, token) = agent::register(&alice).await;
    let agent = TestAgent::connect(&second.base(), &token).await;
    agent.report(&pool, &[DEV]).await;
    let dongle = dongle_id(&pool).await;

    let channel = bridge_server::agents::cluster::channel_of(second.instance_id());
    let listening = || async {
        common::listening_pids(&pool, &channel)
            .await
            .first()
            .copied()
    };
    agent::wait_until(|| async { listening().await.is_some() }).await;
    let pid = listening().await.unwrap();
    common::terminate_backend(&pool, pid).await;

    let started = start_pairing(&alice, dongle).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    assert_eq!(agent.seen.lock().unwrap().pairing_starts, 1);
    // It listens again, on a new connection.
    agent::wait_until(|| async { listening().await.is_some_and(|p| p != pid) }).await;

    agent.close();
    second.stop().await;
    app.stop().await;
}

/// An instance that dies without a word: within the staleness window its agents still count as
/// connected, after it they do not, and the survivors delete its rows.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dead_instance_loses_its_agents_after_the_staleness_window(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| c.cluster = notify_settings()).await;
    let second = Instance::start(&app, notify_settings()).await;
    let dead_id = second.instance_id();
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&alice).await;
    let agent = TestAgent::connect(&second.base(), &token).await;
    agent.report(&pool, &[DEV]).await;
    let dongle = dongle_id(&pool).await;
    let hub = app.hub();
    assert!(hub.is_connected(agent_id).await);

    second.kill().await;
    // Within the staleness window (2 s after its last beat) its rows are still trusted.
    let age: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - last_beat)::float8 FROM server_instances WHERE instance_id = $1",
    )
    .bind(dead_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    if age < 1.0 {
        assert!(
            hub.is_connected(agent_id).await,
            "its last beat is {age} s old"
        );
    }
    agent::wait_until(|| async { !hub.is_connected(agent_id).await }).await;
    // Pairing through the survivor now finds no connected agent.
    start_pairing(&alice, dongle)
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "AGENT_OFFLINE");
    // The survivor's beat removed the dead instance and, with it, its connections.
    agent::wait_until(|| async {
        count(
            &pool,
            &format!("SELECT count(*) FROM server_instances WHERE instance_id = '{dead_id}'"),
        )
        .await
            == 0
    })
    .await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM agent_connections").await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM server_instances").await,
        1
    );

    agent.close();
    app.stop().await;
}

/// A graceful stop removes the instance at once: its agents are disconnected everywhere without
/// waiting for the staleness window.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_stopped_instance_leaves_at_once(pool: PgPool) {
    let app = spawn_app_with(pool.clone(), |c| {
        c.cluster = ClusterSettings {
            stale_after: Duration::from_secs(600),
            ..notify_settings()
        }
    })
    .await;
    let second = Instance::start(&app, notify_settings()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (agent_id, token) = agent::register(&alice).await;
    let agent = TestAgent::connect(&second.base(), &token).await;
    let hub = app.hub();
    assert!(hub.is_connected(agent_id).await);
    agent.close();
    second.stop().await;
    assert!(!hub.is_connected(agent_id).await);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM server_instances").await,
        1
    );
    app.stop().await;
}

/// An instance keeps two LISTEN connections open for its life (the mailbox's and the relay's). Taken
/// from its pool, they left a pool of five three connections for every request, which a test pool
/// felt as waits; now they are opened beside the pool, and all of it stays for requests.
#[sqlx::test(migrator = "MIGRATOR")]
async fn listening_takes_nothing_from_the_pool(pool: PgPool) {
    let own = PgPoolOptions::new()
        .max_connections(5)
        .connect(&common::database_url_of(&pool))
        .await
        .unwrap();
    let app = spawn_app_with(own.clone(), |_| {}).await;
    // Both listeners are open once the instance answers and a moment has passed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = tokio::time::timeout(Duration::from_secs(5), async {
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(own.acquire().await.unwrap());
        }
        held
    })
    .await
    .expect("every connection of the pool can be had while the instance listens");
    assert_eq!(all.len(), 5);
    drop(all);
    app.stop().await;
}

/// A console opened on one instance shows what happens on another: the frames that an agent connected
/// to instance 2 streams for a dongle in no group, an event of instance 2 (a frame sent by hand) and
/// the bus load of the traffic, which only instance 2 sees.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_console_on_one_instance_shows_what_an_agent_on_another_streams(pool: PgPool) {
    use crate::console::Sse;
    use common::data::{DataClient, batch};
    use control_proto::data::{Direction, encode_monitor};
    let app = spawn_app_with(pool.clone(), |c| c.cluster = notify_settings()).await;
    let second = Instance::start(&app, notify_settings()).await;
    let (alice, _) = app.logged_in("alice@example.com", Role::User).await;
    let (_, token) = agent::register(&alice).await;
    let agent = TestAgent::connect(&second.base(), &token).await;
    agent.report_caps(&pool, &[(DEV, 0)]).await;
    let dongle = common::data::pair(&app, &alice, DEV).await;

    // Alice watches on instance 1; the agent is asked for the dongle's traffic all the same.
    let path = format!("/streams/dongles/{dongle}/console");
    let (_, stream, _) = Sse::open(&alice, &path, None).await;
    let mut stream = stream.expect("the console opens");
    agent::wait_until(|| async {
        agent
            .seen
            .lock()
            .unwrap()
            .watches
            .iter()
            .any(|w| w.seconds > 0)
    })
    .await;
    let key = bridge_server::console::StreamKey::Dongle(dongle);
    agent::wait_until(|| async { second.server().state.console.wanted_by_peers(key) }).await;

    // The agent streams 4 000 frames seen, a sample of 2, on its data connection to instance 2.
    let mut data = DataClient::connect(&second.base(), &token).await;
    data.send_raw(encode_monitor(
        DEV.parse().unwrap(),
        Direction::Rx,
        4000,
        &batch([0x0102_0304, 0x0506_0708]),
    ))
    .await;
    let mut frames = Vec::new();
    let mut load = None;
    while frames.len() < 2 || load.is_none() {
        let event = stream.next().await;
        match event.name.as_str() {
            "can_frame" => frames.push(event.data),
            "bus_load" if event.data["frames_per_sec"].as_f64().unwrap() > 0.0 => {
                load = Some(event.data)
            }
            _ => {}
        }
    }
    assert_eq!(frames[0]["dongle_id"], dongle.to_string());
    assert_eq!(frames[0]["direction"], "rx");
    assert_eq!(frames[0]["data_hex"], "01020304");
    assert_eq!(frames[1]["data_hex"], "05060708");
    assert_eq!(frames[0]["sampled"], 2000, "{}", frames[0]);
    let load = load.unwrap();
    assert!(load["frames_per_sec"].as_f64().unwrap() >= 1000.0, "{load}");

    // An event published on instance 2 by other means: a log line of the relay, for example.
    second.server().state.console.publish(
        key,
        bridge_server::console::ConsoleEvent::Log {
            level: "warning",
            message: "from instance 2".into(),
        },
    );
    let log = loop {
        let event = stream.next().await;
        if event.name == "log" {
            break event.data;
        }
    };
    assert_eq!(log["message"], "from instance 2");

    // Closed on instance 1: instance 2 stops forwarding the stream.
    drop(stream);
    agent::wait_until(|| async { !second.server().state.console.wanted_by_peers(key) }).await;
    second.stop().await;
}
