//! The relay with its buffer on NATS JetStream (`serve --nats-url`), over real `/ws/data` connections,
//! against the nats-server that scripts/test starts (`BRIDGE_TEST_NATS_URL`): a backlog for an offline
//! side replayed in order, a killed server that loses no acknowledged frame, and a group whose sides are
//! on two instances. In each, PostgreSQL's `relay_buffer` stays empty: the frames went through the
//! stream.

use crate::common;

use std::time::Duration;

use bridge_server::config::ServerConfig;
use bridge_server::db::MIGRATOR;
use bridge_server::groups::jetstream::NatsSettings;
use common::agent::TestAgent;
use common::data::{DataClient, active_group, group_until, two_dongles};
use common::{TestApp, database_url_of, spawn_app_with};
use control_proto::data::Side;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const DEV_A: &str = "0000000000000aaa";
const DEV_B: &str = "0000000000000bbb";

/// The test's own stream on the test run's NATS server.
fn nats() -> NatsSettings {
    let url = std::env::var("BRIDGE_TEST_NATS_URL")
        .expect("BRIDGE_TEST_NATS_URL names the nats-server of the test run (scripts/test)");
    NatsSettings {
        stream: format!("T{}", Uuid::new_v4().simple()),
        ..NatsSettings::new(url)
    }
}

/// A server on `pool` relaying through `nats`, with quick settings; `adjust` changes more.
async fn app_on(
    pool: PgPool,
    nats: &NatsSettings,
    adjust: impl FnOnce(&mut ServerConfig),
) -> TestApp {
    let nats = nats.clone();
    spawn_app_with(pool, move |c| {
        c.relay.flush_interval = Duration::from_millis(50);
        c.relay.gather = Duration::from_millis(2);
        c.relay.poll_interval = Duration::from_millis(100);
        c.nats = Some(nats);
        adjust(c);
    })
    .await
}

/// A pool of its own on the test's database, as a second process would have.
async fn own_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(5)
        .connect(&database_url_of(pool))
        .await
        .unwrap()
}

async fn rows_in_relay_buffer(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM relay_buffer")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn numbers(received: &[(u64, u32)]) -> Vec<u32> {
    received.iter().map(|(_, n)| *n).collect()
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs a nats-server with JetStream (BRIDGE_TEST_NATS_URL): scripts/test starts one where nats-server is installed"
)]
async fn an_offline_side_gets_its_backlog_from_jetstream_in_order(pool: PgPool) {
    let nats = nats();
    let app = app_on(pool.clone(), &nats, |c| c.relay.replay_rate = 200).await;
    let users = two_dongles(&app, "alice@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    let mut data_a = DataClient::connect(&app.base, &users.token_a).await;
    // B is away: A's frames wait in the stream, acknowledged once JetStream has them.
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    for first in (0..40).step_by(8) {
        data_a
            .send_frames(id, Side::A, first as u64, first..first + 8)
            .await;
    }
    assert_eq!(data_a.wait_ack(id, Side::A, 40).await, 40);
    let view = group_until(&users.client, id, |g| g["backlog"]["a_to_b"] == 40).await;
    assert_eq!(view["state"], "DEGRADED");
    assert_eq!(
        rows_in_relay_buffer(&pool).await,
        0,
        "the backlog is in the stream, not in PostgreSQL"
    );
    // B comes; more frames from A queue behind the replay.
    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    data_a.send_frames(id, Side::A, 40, 40..45).await;
    data_a.wait_ack(id, Side::A, 45).await;
    let got = data_b.receive(id, Side::B, 45, true).await;
    assert_eq!(
        numbers(&got),
        (0..45).collect::<Vec<_>>(),
        "in order, none twice"
    );
    // The count waiting comes from the ledger (every 50 ms) and the count relayed from the pipe's
    // counters (every second): the view reaches both, not necessarily in the same poll.
    let view = group_until(&users.client, id, |g| {
        g["state"] == "ACTIVE" && g["backlog"]["a_to_b"] == 0 && g["frames_relayed"]["a_to_b"] == 45
    })
    .await;
    assert_eq!(view["buffer_pressure"], false);
}

/// The first server is killed (its pool closed first, so that nothing it held reaches the database
/// afterwards) with frames acknowledged to A and waiting for B in the stream; a new server on the same
/// database and stream delivers every one of them.
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs a nats-server with JetStream (BRIDGE_TEST_NATS_URL): scripts/test starts one where nats-server is installed"
)]
async fn a_killed_server_loses_no_frame_acknowledged_into_jetstream(pool: PgPool) {
    let nats = nats();
    let first = app_on(own_pool(&pool).await, &nats, |_| {}).await;
    let users = two_dongles(&first, "bob@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    let mut data_a = DataClient::connect(&first.base, &users.token_a).await;
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    for first_pos in (0..30).step_by(10) {
        data_a
            .send_frames(id, Side::A, first_pos as u64, first_pos..first_pos + 10)
            .await;
    }
    data_a.wait_ack(id, Side::A, 30).await;
    first.kill().await;
    data_a.cut();
    assert_eq!(
        rows_in_relay_buffer(&pool).await,
        0,
        "the frames are in the stream, not in PostgreSQL"
    );

    let app = app_on(pool.clone(), &nats, |_| {}).await;
    let agent_a = TestAgent::connect(&app.base, &users.token_a).await;
    agent_a.report(&app.pool, &[DEV_A]).await;
    let agent_b = TestAgent::connect(&app.base, &users.token_b).await;
    agent_b.report(&app.pool, &[DEV_B]).await;
    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    let got = data_b.receive(id, Side::B, 30, true).await;
    assert_eq!(numbers(&got), (0..30).collect::<Vec<_>>());
    // A goes on from where the stream is.
    let mut data_a = DataClient::connect(&app.base, &users.token_a).await;
    data_a.send_frames(id, Side::A, 30, 30..32).await;
    data_a.wait_ack(id, Side::A, 32).await;
    assert_eq!(
        numbers(&data_b.receive(id, Side::B, 2, true).await),
        [30, 31]
    );
    let client = common::TestClient {
        base: app.base.clone(),
        ..users.client
    };
    group_until(&client, id, |g| {
        g["state"] == "ACTIVE" && g["backlog"]["a_to_b"] == 0
    })
    .await;
    assert_eq!(rows_in_relay_buffer(&pool).await, 0);
    drop((agent_a, agent_b));
}

/// A's data connection on one instance and B's on the other: frames cross through the stream both
/// ways, the group is CROSS_INSTANCE, and the receiving instance is woken by each write, not by its
/// poll (a minute away here).
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs a nats-server with JetStream (BRIDGE_TEST_NATS_URL): scripts/test starts one where nats-server is installed"
)]
async fn sides_on_two_instances_relay_through_jetstream_both_ways(pool: PgPool) {
    let nats = nats();
    let adjust = |c: &mut ServerConfig| {
        c.relay.refresh_interval = Duration::from_millis(300);
        c.relay.poll_interval = Duration::from_secs(60);
    };
    let first = app_on(pool.clone(), &nats, adjust).await;
    let second = app_on(own_pool(&pool).await, &nats, adjust).await;
    let users = two_dongles(&first, "carol@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    let mut data_a = DataClient::connect(&first.base, &users.token_a).await;
    let mut data_b = DataClient::connect(&second.base, &users.token_b).await;
    group_until(&users.client, id, |g| g["state"] == "CROSS_INSTANCE").await;
    for round in 0..5u32 {
        let from = u64::from(round) * 6;
        data_a
            .send_frames(id, Side::A, from, round * 6..round * 6 + 6)
            .await;
        data_b
            .send_frames(id, Side::B, from, 100 + round * 6..100 + round * 6 + 6)
            .await;
    }
    data_a.wait_ack(id, Side::A, 30).await;
    data_b.wait_ack(id, Side::B, 30).await;
    let to_b = data_b.receive(id, Side::B, 30, true).await;
    let to_a = data_a.receive(id, Side::A, 30, true).await;
    assert_eq!(numbers(&to_b), (0..30).collect::<Vec<_>>());
    assert_eq!(numbers(&to_a), (100..130).collect::<Vec<_>>());
    let view = group_until(&users.client, id, |g| {
        g["backlog"]["a_to_b"] == 0
            && g["backlog"]["b_to_a"] == 0
            && g["frames_relayed"]["a_to_b"] == 30
            && g["frames_relayed"]["b_to_a"] == 30
    })
    .await;
    assert_eq!(view["state"], "CROSS_INSTANCE");
    assert_eq!(rows_in_relay_buffer(&pool).await, 0);
    second.stop().await;
}
