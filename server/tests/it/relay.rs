//! The relay (SPEC 3.8) over real `/ws/data` connections: frames in order both ways, the durable buffer
//! while a side is offline and its replay, a crash and a restart, retention and BUFFER_PRESSURE,
//! duplicates after a reconnect, malformed messages, and sides an agent does not serve.

use crate::common;

use std::time::Duration;

use bridge_server::config::ServerConfig;
use bridge_server::db::MIGRATOR;
use bridge_server::groups::relay::RelayEvent;
use bridge_server::users::Role;
use common::agent::{self, TestAgent};
use common::data::{DataClient, TwoDongles, active_group, group, group_until, pair, two_dongles};
use common::{TestApp, database_url_of, read, spawn_app_with};
use control_proto::data::{self, Side};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const DEV_A: &str = "0000000000000aaa";
const DEV_B: &str = "0000000000000bbb";

/// Small, quick settings: a short gather, frequent counter writes.
fn fast(config: &mut ServerConfig) {
    config.relay.flush_interval = Duration::from_millis(50);
    config.relay.gather = Duration::from_millis(2);
    config.relay.poll_interval = Duration::from_millis(100);
}

async fn app_with(pool: PgPool, adjust: impl FnOnce(&mut ServerConfig)) -> TestApp {
    spawn_app_with(pool, |c| {
        fast(c);
        adjust(c);
    })
    .await
}

/// Two server instances on the test's database, each with its own pool (as two processes would have),
/// both configured by `adjust`.
async fn two_instances(
    pool: &PgPool,
    adjust: impl Fn(&mut ServerConfig) + Copy,
) -> (TestApp, TestApp) {
    let first = app_with(pool.clone(), adjust).await;
    let own = PgPoolOptions::new()
        .max_connections(5)
        .connect(&database_url_of(pool))
        .await
        .unwrap();
    (first, app_with(own, adjust).await)
}

/// Two dongles on two agents, grouped and activated, both agents' data planes connected, ACTIVE.
async fn relaying(app: &TestApp) -> (TwoDongles, Uuid, DataClient, DataClient) {
    let users = two_dongles(app, "alice@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    let data_a = DataClient::connect(&app.base, &users.token_a).await;
    let data_b = DataClient::connect(&app.base, &users.token_b).await;
    group_until(&users.client, id, |g| g["state"] == "ACTIVE").await;
    (users, id, data_a, data_b)
}

/// A relaying group whose side B goes away, then 30 frames from A, acknowledged: they wait in the
/// buffer for B. Answers A's data connection, still open.
async fn thirty_frames_wait_for_b(app: &TestApp) -> (TwoDongles, Uuid, DataClient) {
    let (users, id, mut data_a, data_b) = relaying(app).await;
    data_b.cut();
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    for first_pos in (0..30).step_by(10) {
        data_a
            .send_frames(id, Side::A, first_pos as u64, first_pos..first_pos + 10)
            .await;
    }
    data_a.wait_ack(id, Side::A, 30).await;
    (users, id, data_a)
}

fn numbers(received: &[(u64, u32)]) -> Vec<u32> {
    received.iter().map(|(_, n)| *n).collect()
}

fn positions(received: &[(u64, u32)]) -> Vec<u64> {
    received.iter().map(|(p, _)| *p).collect()
}

async fn buffered_rows(app: &TestApp, id: Uuid, direction: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(frame_count), 0)::bigint FROM relay_buffer WHERE group_id = $1 AND direction = $2",
    )
    .bind(id)
    .bind(direction)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn frames_go_from_a_to_b_and_back_in_order(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let mut events = app.relay().subscribe();
    let (users, id, mut data_a, mut data_b) = relaying(&app).await;
    let view = group(&users.client, id).await;
    assert_eq!(view["dongle_a"]["data_connected"], true);
    assert_eq!(view["dongle_b"]["data_connected"], true);

    // Both agents were told their side, numbered from 0.
    for (agent, side, dev) in [
        (&users.agent_a, Side::A, DEV_A),
        (&users.agent_b, Side::B, DEV_B),
    ] {
        let groups = agent.seen.lock().unwrap().groups.last().cloned().unwrap();
        assert_eq!(groups.sides.len(), 1);
        assert_eq!(
            (
                groups.sides[0].group_id,
                groups.sides[0].side,
                groups.sides[0].device_id.to_string().as_str(),
                groups.sides[0].next_seq
            ),
            (id, side, dev, 0)
        );
    }

    data_a.send_frames(id, Side::A, 0, 0..5).await;
    data_a.send_frames(id, Side::A, 5, 5..10).await;
    data_a.send_frames(id, Side::A, 10, 10..12).await;
    assert_eq!(data_a.wait_ack(id, Side::A, 12).await, 12);
    let got = data_b.receive(id, Side::B, 12, true).await;
    assert_eq!(numbers(&got), (0..12).collect::<Vec<_>>());
    assert_eq!(positions(&got), (0..12).collect::<Vec<_>>());

    data_b.send_frames(id, Side::B, 0, 100..107).await;
    data_b.wait_ack(id, Side::B, 7).await;
    let back = data_a.receive(id, Side::A, 7, true).await;
    assert_eq!(numbers(&back), (100..107).collect::<Vec<_>>());

    let view = group_until(&users.client, id, |g| {
        g["frames_relayed"] == json!({"a_to_b": 12, "b_to_a": 7})
    })
    .await;
    assert_eq!(view["frames_received"], json!({"a": 12, "b": 7}));
    assert_eq!(view["backlog"], json!({"a_to_b": 0, "b_to_a": 0}));
    assert_eq!(view["state"], "ACTIVE");
    // Nothing touched the buffer on the way.
    assert_eq!(app.count("SELECT count(*) FROM relay_buffer").await, 0);

    // The console's hook saw the frames, with their dongles.
    let mut seen = 0u32;
    while let Ok(event) = events.try_recv() {
        if let RelayEvent::Frames {
            group_id,
            from,
            from_dongle_id,
            count,
            ..
        } = event
        {
            assert_eq!(group_id, id);
            let expected = if from == Side::A {
                users.dongle_a
            } else {
                users.dongle_b
            };
            assert_eq!(from_dongle_id, expected);
            seen += count;
        }
    }
    assert_eq!(seen, 19);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_offline_side_gets_its_frames_from_the_buffer_in_order(pool: PgPool) {
    // A slow replay, so that new frames arrive while the backlog is still going out.
    let app = app_with(pool, |c| c.relay.replay_rate = 100).await;
    let (users, id, mut data_a, data_b) = relaying(&app).await;

    data_b.cut();
    let view = group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    assert_eq!(view["dongle_b"]["data_connected"], false);

    for first in (0..20).step_by(5) {
        data_a
            .send_frames(id, Side::A, first as u64, first..first + 5)
            .await;
    }
    assert_eq!(data_a.wait_ack(id, Side::A, 20).await, 20);
    // Acknowledged means written: the rows are there the moment the ACK is.
    assert_eq!(buffered_rows(&app, id, "a_to_b").await, 20);
    let view = group(&users.client, id).await;
    assert_eq!(view["backlog"]["a_to_b"], 20);
    assert_eq!(view["state"], "DEGRADED");

    let started = std::time::Instant::now();
    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    // New frames from A while the backlog replays queue behind it.
    data_a.send_frames(id, Side::A, 20, 20..25).await;
    data_a.wait_ack(id, Side::A, 25).await;
    let got = data_b.receive(id, Side::B, 25, true).await;
    assert_eq!(
        numbers(&got),
        (0..25).collect::<Vec<_>>(),
        "in order, none twice"
    );
    // 20 buffered frames at 100 frames/s, five per step: the steps are paced.
    assert!(
        started.elapsed() >= Duration::from_millis(120),
        "replayed in {:?}",
        started.elapsed()
    );

    // The count relayed is written with the pipe's counters (every second), not with the
    // acknowledgement that empties the backlog: the view reaches both, not necessarily in one poll.
    let view = group_until(&users.client, id, |g| {
        g["state"] == "ACTIVE" && g["backlog"]["a_to_b"] == 0 && g["frames_relayed"]["a_to_b"] == 25
    })
    .await;
    assert_eq!(buffered_rows(&app, id, "a_to_b").await, 0);
    assert_eq!(view["buffer_pressure"], false);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn frames_in_flight_to_a_side_that_drops_are_sent_again(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let (users, id, mut data_a, mut data_b) = relaying(&app).await;
    data_a.send_frames(id, Side::A, 0, 0..8).await;
    data_a.wait_ack(id, Side::A, 8).await;
    // B gets them but its connection drops before it acknowledges.
    let got = data_b.receive(id, Side::B, 8, false).await;
    assert_eq!(numbers(&got), (0..8).collect::<Vec<_>>());
    data_b.cut();
    group_until(&users.client, id, |g| g["backlog"]["a_to_b"] == 8).await;

    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    let again = data_b.receive(id, Side::B, 8, true).await;
    assert_eq!(positions(&again), (0..8).collect::<Vec<_>>());
    group_until(&users.client, id, |g| {
        g["state"] == "ACTIVE" && g["frames_relayed"]["a_to_b"] == 8
    })
    .await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_killed_server_loses_no_acknowledged_frame(pool: PgPool) {
    // The first server has a pool of its own, closed before it is killed: nothing it held in memory
    // reaches the database afterwards, as with SIGKILL.
    let own = PgPoolOptions::new()
        .max_connections(5)
        .connect(&database_url_of(&pool))
        .await
        .unwrap();
    let first = app_with(own, |_| {}).await;
    let (users, id, data_a) = thirty_frames_wait_for_b(&first).await;
    first.kill().await;
    data_a.cut();

    let app = app_with(pool, |_| {}).await;
    let client = common::TestClient {
        base: app.base.clone(),
        ..users.client
    };
    // A's agent comes back first: it is told to number its frames from 30, where the server is.
    let agent_a = TestAgent::connect(&app.base, &users.token_a).await;
    agent_a.report(&app.pool, &[DEV_A]).await;
    agent::wait_until(|| {
        let next = agent_a
            .seen
            .lock()
            .unwrap()
            .groups
            .last()
            .and_then(|g| g.sides.first().map(|s| s.next_seq));
        async move { next == Some(30) }
    })
    .await;
    let agent_b = TestAgent::connect(&app.base, &users.token_b).await;
    agent_b.report(&app.pool, &[DEV_B]).await;
    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    let got = data_b.receive(id, Side::B, 30, true).await;
    assert_eq!(numbers(&got), (0..30).collect::<Vec<_>>());
    let mut data_a = DataClient::connect(&app.base, &users.token_a).await;
    data_a.send_frames(id, Side::A, 30, 30..32).await;
    data_a.wait_ack(id, Side::A, 32).await;
    let more = data_b.receive(id, Side::B, 2, true).await;
    assert_eq!(numbers(&more), vec![30, 31]);
    group_until(&client, id, |g| {
        g["state"] == "ACTIVE" && g["backlog"]["a_to_b"] == 0
    })
    .await;
    drop((agent_a, agent_b));
}

/// Replay's bus limit comes from the bit rate each side's dongle applied (its configuration's
/// `effective_bitrate`), else the one asked for, kept within classic CAN's range; a dongle without a
/// configuration has none.
#[sqlx::test(migrator = "MIGRATOR")]
async fn the_relay_reads_the_bit_rate_each_dongle_applied(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let (users, id, _data_a, _data_b) = relaying(&app).await;
    let bitrates = |app: &TestApp| {
        let pool = app.pool.clone();
        async move {
            let sides = bridge_server::groups::serving::sides_of(&pool, id)
                .await
                .unwrap()
                .unwrap()
                .sides;
            (sides[0].bitrate, sides[1].bitrate)
        }
    };
    assert_eq!(bitrates(&app).await, (None, None));
    let configure = |dongle: Uuid, asked: i32, applied: Option<i64>| {
        sqlx::query(
            "INSERT INTO can_configs (dongle_id, bitrate, sample_point_permille, effective_bitrate) \
             VALUES ($1, $2, 875, $3) ON CONFLICT (dongle_id) DO UPDATE \
             SET bitrate = $2, effective_bitrate = $3",
        )
        .bind(dongle)
        .bind(asked)
        .bind(applied)
        .execute(&app.pool)
    };
    configure(users.dongle_a, 500_000, None).await.unwrap();
    // Raw timing asked for 1 Mbit/s of a bus that runs at 125 kbit/s: the applied rate counts.
    configure(users.dongle_b, 1_000_000, Some(125_000))
        .await
        .unwrap();
    assert_eq!(bitrates(&app).await, (Some(500_000), Some(125_000)));
    // A nonsensical report cannot stop replay, nor lift the limit.
    configure(users.dongle_a, 500_000, Some(0)).await.unwrap();
    configure(users.dongle_b, 500_000, Some(i64::from(u32::MAX) + 1))
        .await
        .unwrap();
    assert_eq!(bitrates(&app).await, (Some(10_000), Some(1_000_000)));
}

/// The README's default, `serve` on its embedded PostgreSQL, killed with SIGKILL mid-stream (as the OOM
/// killer would): its cluster outlives it, the next `serve` on the same folder stops that orphan and
/// starts its own, and every frame the first one acknowledged reaches B once and in order.
#[tokio::test]
async fn a_killed_server_on_its_embedded_database_loses_no_acknowledged_frame() {
    use crate::embedded_pg::{embedded_pool, signal, start_serve, wait_for_exit, workdir};
    use nix::sys::signal::Signal;

    let dir = workdir();
    let data = dir.path().join("data");
    let (mut first, addr) = start_serve(&data);
    let app = TestApp::external(format!("http://{addr}"), embedded_pool(&data).await);
    let (users, id, data_a) = thirty_frames_wait_for_b(&app).await;
    let postmaster = || -> i32 {
        let pid_file = std::fs::read_to_string(data.join("postgres/postmaster.pid")).unwrap();
        pid_file.lines().next().unwrap().trim().parse().unwrap()
    };
    // Running, not a zombie that nobody reaped (the container's first process may not reap).
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z'))
            })
            .unwrap_or(false)
    };
    let orphan = postmaster();
    signal(&first, Signal::SIGKILL);
    wait_for_exit(&mut first);
    assert!(alive(orphan), "the cluster outlives the killed server");
    data_a.cut();
    app.pool.close().await;
    drop(users.agent_a);
    drop(users.agent_b);

    let (mut second, addr) = start_serve(&data);
    // The orphan was stopped and a cluster of the new server's own started.
    assert_ne!(postmaster(), orphan);
    assert!(!alive(orphan), "the orphaned cluster is stopped");
    let app = TestApp::external(format!("http://{addr}"), embedded_pool(&data).await);
    let client = common::TestClient {
        base: app.base.clone(),
        ..users.client
    };
    let agent_a = TestAgent::connect(&app.base, &users.token_a).await;
    agent_a.report(&app.pool, &[DEV_A]).await;
    let agent_b = TestAgent::connect(&app.base, &users.token_b).await;
    agent_b.report(&app.pool, &[DEV_B]).await;
    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    let got = data_b.receive(id, Side::B, 30, true).await;
    assert_eq!(numbers(&got), (0..30).collect::<Vec<_>>());
    // Once: the buffer is empty and nothing more was relayed than the 30.
    group_until(&client, id, |g| {
        g["backlog"]["a_to_b"] == 0 && g["frames_relayed"]["a_to_b"] == 30
    })
    .await;
    drop((agent_a, agent_b, data_b));
    app.pool.close().await;
    signal(&second, Signal::SIGTERM);
    assert!(wait_for_exit(&mut second).success());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_stopped_server_keeps_what_was_in_flight(pool: PgPool) {
    let first = app_with(pool.clone(), |_| {}).await;
    let (users, id, mut data_a, mut data_b) = relaying(&first).await;
    data_a.send_frames(id, Side::A, 0, 0..6).await;
    data_a.wait_ack(id, Side::A, 6).await;
    // Forwarded to B, never acknowledged by it: a graceful stop writes them to the buffer.
    data_b.receive(id, Side::B, 6, false).await;
    first.stop().await;
    assert_eq!(buffered_rows_of(&pool, id).await, 6);
    data_a.cut();
    data_b.cut();

    let app = app_with(pool, |_| {}).await;
    let _agent_b = TestAgent::connect(&app.base, &users.token_b).await;
    _agent_b.report(&app.pool, &[DEV_B]).await;
    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    let got = data_b.receive(id, Side::B, 6, true).await;
    assert_eq!(numbers(&got), (0..6).collect::<Vec<_>>());
}

async fn buffered_rows_of(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(frame_count), 0)::bigint FROM relay_buffer WHERE group_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_full_buffer_trims_the_oldest_frames_and_says_so(pool: PgPool) {
    let app = app_with(pool, |c| {
        c.relay.buffer_max_frames = 10;
        c.relay.trim_audit_interval = Duration::ZERO;
    })
    .await;
    let (users, id, mut data_a, data_b) = relaying(&app).await;
    data_b.cut();
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    for first in (0..25).step_by(5) {
        data_a
            .send_frames(id, Side::A, first as u64, first..first + 5)
            .await;
        data_a.wait_ack(id, Side::A, first as u64 + 5).await;
    }
    let view = group(&users.client, id).await;
    assert_eq!(view["backlog"]["a_to_b"], 10);
    assert_eq!(view["frames_trimmed"]["a_to_b"], 15);
    assert_eq!(view["buffer_pressure"], true);
    assert_eq!(buffered_rows(&app, id, "a_to_b").await, 10);
    let audited: Vec<Value> = sqlx::query_scalar(
        "SELECT details FROM audit_logs WHERE action = 'group.buffer_trim' AND target_id = $1",
    )
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(!audited.is_empty());
    let total: u64 = audited.iter().map(|d| d["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 15, "{audited:?}");
    assert!(audited.iter().all(|d| d["direction"] == "a_to_b"));

    // B comes back to the newest ten, in order; the pressure ends with the backlog.
    let mut data_b = DataClient::connect(&app.base, &users.token_b).await;
    let got = data_b.receive(id, Side::B, 10, true).await;
    assert_eq!(numbers(&got), (15..25).collect::<Vec<_>>());
    assert_eq!(positions(&got), (15..25).collect::<Vec<_>>());
    group_until(&users.client, id, |g| {
        g["state"] == "ACTIVE" && g["buffer_pressure"] == false
    })
    .await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn old_frames_leave_the_buffer_with_age(pool: PgPool) {
    let app = app_with(pool, |c| {
        c.relay.buffer_max_age = Duration::from_millis(300);
        c.relay.trim_audit_interval = Duration::ZERO;
    })
    .await;
    let (users, id, mut data_a, data_b) = relaying(&app).await;
    data_b.cut();
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    data_a.send_frames(id, Side::A, 0, 0..4).await;
    data_a.wait_ack(id, Side::A, 4).await;
    let view = group_until(&users.client, id, |g| g["backlog"]["a_to_b"] == 0).await;
    assert_eq!(view["frames_trimmed"]["a_to_b"], 4);
    assert_eq!(view["buffer_pressure"], true);
    let audited: i64 = app
        .count("SELECT count(*) FROM audit_logs WHERE action = 'group.buffer_trim'")
        .await;
    assert!(audited >= 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn frames_sent_again_after_a_reconnect_are_delivered_once(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let (users, id, mut data_a, mut data_b) = relaying(&app).await;
    data_a.send_frames(id, Side::A, 0, 0..10).await;
    data_a.wait_ack(id, Side::A, 10).await;
    data_a.cut();
    // The agent lost the ACK with its connection: it sends 5..10 again, then new ones.
    let mut data_a = DataClient::connect(&app.base, &users.token_a).await;
    data_a.send_frames(id, Side::A, 5, 5..15).await;
    assert_eq!(data_a.wait_ack(id, Side::A, 15).await, 15);
    // All of it again: nothing new, and the ACK says so.
    data_a.send_frames(id, Side::A, 0, 0..10).await;
    assert_eq!(data_a.wait_ack(id, Side::A, 15).await, 15);

    let got = data_b.receive(id, Side::B, 15, true).await;
    assert_eq!(
        positions(&got),
        (0..15).collect::<Vec<_>>(),
        "each position once"
    );
    assert_eq!(numbers(&got), (0..15).collect::<Vec<_>>());
    data_b.no_frames(Duration::from_millis(300)).await;
    let stats = app.relay();
    assert_eq!(
        stats
            .stats()
            .frames_duplicate
            .load(std::sync::atomic::Ordering::Relaxed),
        15
    );
    group_until(&users.client, id, |g| g["frames_received"]["a"] == 15).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn malformed_data_messages_are_ignored_then_the_connection_closes(pool: PgPool) {
    let app = app_with(pool, |c| c.relay.max_malformed = 5).await;
    let (users, id, mut data_a, mut data_b) = relaying(&app).await;
    let good = data::encode_frames(id, Side::A, 0, &common::data::batch(0..3));
    let mut bad_version = good.clone();
    bad_version[0] = 9;
    let mut bad_side = good.clone();
    bad_side[18] = 7;
    let mut cut_batch = good.clone();
    cut_batch.pop();
    for bad in [vec![], vec![1, 1, 0], bad_version, bad_side, cut_batch] {
        data_a.send_raw(bad).await;
    }
    // Five malformed messages are tolerated; valid ones still work.
    data_a.send_raw(good).await;
    data_a.wait_ack(id, Side::A, 3).await;
    let got = data_b.receive(id, Side::B, 3, true).await;
    assert_eq!(numbers(&got), vec![0, 1, 2]);
    // The sixth closes the connection; the server carries on.
    data_a.send_text("not binary").await;
    assert!(data_a.closed_within(Duration::from_secs(5)).await);
    let health = read(
        users
            .client
            .http
            .get(users.client.url("/healthz"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(health.status, reqwest::StatusCode::OK);
    assert!(
        app.relay()
            .stats()
            .messages_malformed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 6
    );
    let mut data_a = DataClient::connect(&app.base, &users.token_a).await;
    data_a.send_frames(id, Side::A, 3, 3..5).await;
    data_a.wait_ack(id, Side::A, 5).await;
    assert_eq!(
        numbers(&data_b.receive(id, Side::B, 2, true).await),
        vec![3, 4]
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_cannot_send_for_a_side_it_does_not_serve(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let (users, id, mut data_a, mut data_b) = relaying(&app).await;

    // B's agent sends as side A: refused, never acknowledged, never delivered.
    data_b.send_frames(id, Side::A, 0, 0..3).await;
    let seen = data_b.no_frames(Duration::from_millis(300)).await;
    assert!(seen.is_empty(), "{seen:?}");
    data_a.no_frames(Duration::from_millis(100)).await;

    // Another user's agent knows the group id: refused too.
    let (mallory, _) = app.logged_in("mallory@example.com", Role::User).await;
    let (_, token) = agent::register(&mallory).await;
    let mallory_agent = TestAgent::connect(&app.base, &token).await;
    mallory_agent.report(&app.pool, &["00000000000000ee"]).await;
    pair(&app, &mallory, "00000000000000ee").await;
    let mut data_m = DataClient::connect(&app.base, &token).await;
    data_m.send_frames(id, Side::A, 0, 0..3).await;
    data_m.send_frames(id, Side::B, 0, 0..3).await;
    data_m.send_frames(Uuid::new_v4(), Side::A, 0, 0..3).await;
    data_m.ack(id, Side::B, 1000).await;
    assert!(
        data_m
            .no_frames(Duration::from_millis(300))
            .await
            .is_empty()
    );
    data_b.no_frames(Duration::from_millis(100)).await;
    data_a.no_frames(Duration::from_millis(100)).await;
    assert!(
        app.relay()
            .stats()
            .frames_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 12
    );

    // An inactive group relays nothing.
    let deactivated = read(
        users
            .client
            .post_json(&format!("/groups/{id}/deactivate"), json!({}))
            .await,
    )
    .await;
    assert_eq!(deactivated.json["state"], "INACTIVE");
    data_a.send_frames(id, Side::A, 0, 0..3).await;
    assert!(
        data_a
            .no_frames(Duration::from_millis(300))
            .await
            .is_empty()
    );
    data_b.no_frames(Duration::from_millis(100)).await;
    assert_eq!(group(&users.client, id).await["frames_received"]["a"], 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn drops_reported_by_agents_are_counted_once(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let (users, id, mut data_a, _data_b) = relaying(&app).await;
    data_a.drops(id, Side::A, 7).await;
    data_a.drops(id, Side::A, 9).await;
    group_until(&users.client, id, |g| g["agent_drops"]["a"] == 9).await;
    // After a reconnect the agent reports its total again: no double count.
    data_a.cut();
    let mut data_a = DataClient::connect(&app.base, &users.token_a).await;
    data_a.drops(id, Side::A, 9).await;
    data_a.drops(id, Side::A, 11).await;
    group_until(&users.client, id, |g| g["agent_drops"]["a"] == 11).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_console_hook_sees_state_changes(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let mut events = app.relay().subscribe();
    let (users, id, _data_a, data_b) = relaying(&app).await;
    data_b.cut();
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    let mut states = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let RelayEvent::GroupState {
            group_id, state, ..
        } = event
        {
            assert_eq!(group_id, id);
            states.push(state.as_str());
        }
    }
    assert!(states.ends_with(&["ACTIVE", "DEGRADED"]), "{states:?}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_data_plane_needs_a_valid_agent_token(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    assert_eq!(
        common::data::try_connect(&app.base, "not-a-token")
            .await
            .err(),
        Some(401)
    );
    // A good token is enough to connect, even with no group to serve yet.
    let (client, _) = app.logged_in("carol@example.com", Role::User).await;
    let (_, token) = agent::register(&client).await;
    let mut conn = DataClient::connect(&app.base, &token).await;
    assert!(!conn.closed_within(Duration::from_millis(200)).await);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn one_agent_can_serve_both_sides(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let (client, _) = app.logged_in("dave@example.com", Role::User).await;
    let (_, token) = agent::register(&client).await;
    let bench = TestAgent::connect(&app.base, &token).await;
    bench.report(&app.pool, &[DEV_A, DEV_B]).await;
    let a = pair(&app, &client, DEV_A).await;
    let b = pair(&app, &client, DEV_B).await;
    let id = active_group(&client, a, b).await;
    let mut data = DataClient::connect(&app.base, &token).await;
    group_until(&client, id, |g| g["state"] == "ACTIVE").await;
    data.send_frames(id, Side::A, 0, 0..4).await;
    data.wait_ack(id, Side::A, 4).await;
    let got = data.receive(id, Side::B, 4, true).await;
    assert_eq!(numbers(&got), vec![0, 1, 2, 3]);
    group_until(&client, id, |g| g["frames_relayed"]["a_to_b"] == 4).await;
}

/// Reads an SSE response until its text contains every one of `wanted` (up to 10 s).
async fn sse_until(response: &mut reqwest::Response, wanted: &[String]) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !wanted.iter().all(|w| text.contains(w.as_str())) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("not all of {wanted:?} in: {text}"))
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_group_console_shows_relayed_frames_and_state(pool: PgPool) {
    let app = app_with(pool, |_| {}).await;
    let (users, id, mut data_a, data_b) = relaying(&app).await;
    let mut stream = users
        .client
        .get(&format!("/streams/groups/{id}/console"))
        .await;
    assert_eq!(stream.status(), reqwest::StatusCode::OK);
    data_a.send_frames(id, Side::A, 0, [7, 8]).await;
    data_a.wait_ack(id, Side::A, 2).await;
    let a = users.dongle_a;
    sse_until(
        &mut stream,
        &[
            "can_frame".to_string(),
            format!("\"dongle_id\":\"{a}\""),
            "\"direction\":\"rx\"".to_string(),
            "\"data_hex\":\"00000008\"".to_string(),
            // The fields of v0.7 section 18.4.
            "\"id\":\"0x100\"".to_string(),
            "\"is_extended\":false".to_string(),
            "\"dlc\":4".to_string(),
            "\"bus\":0".to_string(),
            "\"ts\":\"20".to_string(),
        ],
    )
    .await;
    data_b.cut();
    sse_until(
        &mut stream,
        &[
            "group_state".to_string(),
            "\"mode\":\"DEGRADED\"".to_string(),
            "\"offline_side\":\"b\"".to_string(),
            "\"buffered_a_to_b\":".to_string(),
            "\"buffered_b_to_a\":0".to_string(),
        ],
    )
    .await;
}

/// A group whose sides are connected to two instances relays through the buffer, and says so: it is
/// CROSS_INSTANCE on both instances (before, DEGRADED, as if a side were away), and DEGRADED once a
/// side really is away.
#[sqlx::test(migrator = "MIGRATOR")]
async fn sides_on_two_server_instances_relay_through_the_buffer(pool: PgPool) {
    let quick_refresh =
        |c: &mut ServerConfig| c.relay.refresh_interval = Duration::from_millis(300);
    let (first, second) = two_instances(&pool, quick_refresh).await;
    let users = two_dongles(&first, "erin@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    // A's data connection on one instance, B's on the other.
    let mut data_a = DataClient::connect(&first.base, &users.token_a).await;
    let mut data_b = DataClient::connect(&second.base, &users.token_b).await;
    data_a.send_frames(id, Side::A, 0, 0..6).await;
    data_a.send_frames(id, Side::A, 6, 6..10).await;
    data_a.wait_ack(id, Side::A, 10).await;
    let got = data_b.receive(id, Side::B, 10, true).await;
    assert_eq!(numbers(&got), (0..10).collect::<Vec<_>>());
    // Relayed through the buffer, which drains as B acknowledges; each instance sees one side here and
    // the other on the other instance: CROSS_INSTANCE, on both.
    let view = group_until(&users.client, id, |g| {
        g["backlog"]["a_to_b"] == 0
            && g["frames_relayed"]["a_to_b"] == 10
            && g["state"] == "CROSS_INSTANCE"
            // Connected, to the other instance (as this instance's next look at the sides finds).
            && g["dongle_b"]["data_connected"] == true
    })
    .await;
    assert_eq!(view["buffer_pressure"], false);
    // The gauge counts it (both instances share this process's metrics recorder, as do other tests:
    // at least this group).
    let metrics = users.client.page("/metrics").await;
    let cross: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_groups_cross_instance "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(cross >= 1.0, "{metrics}");
    // Both instances write the state: they agree, so it stays (several refreshes of each later).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(group(&users.client, id).await["state"], "CROSS_INSTANCE");
    // Where a side is served is written again at every look, so a record lost behind the pipes' backs
    // (an instance taken for dead during a database outage loses its rows) comes back; before, the
    // instances disagreed and wrote DEGRADED and CROSS_INSTANCE in turn for as long as it lasted.
    sqlx::query("UPDATE relay_sides SET served_by = NULL WHERE group_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let marked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM relay_sides WHERE group_id = $1 AND served_by IS NOT NULL",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        marked, 2,
        "both sides' instances wrote where they are served again"
    );
    assert_eq!(group(&users.client, id).await["state"], "CROSS_INSTANCE");
    // B goes away: A's instance sees a side away.
    data_b.cut();
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    second.stop().await;
}

/// A group activated through one instance while its agents' data connections are already open, one on
/// each instance, relays at once. Before, the instance holding B's connection started no pipe for the
/// new group (pipes started there only when an agent connected or reported), so the group stayed
/// DEGRADED and A's frames waited in the buffer until B's agent reconnected (`bench-relay --instances 2
/// --max-groups 8` stopped at set-up: a group "stayed DEGRADED, not CROSS_INSTANCE, for 20 s").
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_group_activated_while_its_agents_are_connected_to_two_instances_relays(pool: PgPool) {
    let slow = |c: &mut ServerConfig| {
        c.relay.refresh_interval = Duration::from_secs(60);
        c.relay.poll_interval = Duration::from_secs(60);
    };
    let (first, second) = two_instances(&pool, slow).await;
    let users = two_dongles(&first, "gail@example.com", DEV_A, DEV_B).await;
    let mut data_a = DataClient::connect(&first.base, &users.token_a).await;
    let mut data_b = DataClient::connect(&second.base, &users.token_b).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    group_until(&users.client, id, |g| g["state"] == "CROSS_INSTANCE").await;
    data_a.send_frames(id, Side::A, 0, 0..5).await;
    data_a.wait_ack(id, Side::A, 5).await;
    let got = data_b.receive(id, Side::B, 5, true).await;
    assert_eq!(numbers(&got), (0..5).collect::<Vec<_>>());
    second.stop().await;
}

/// An instance learns at once that the other side of a group connected to (or left) another instance:
/// the instance that records where a side is served announces it, and the pipes of that group look at
/// their sides again. Here the periodic look is a minute away; before, the group's view on the first
/// instance said side B was away until that look (10 s by default).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_side_connecting_to_another_instance_is_seen_at_once(pool: PgPool) {
    let slow_refresh = |c: &mut ServerConfig| c.relay.refresh_interval = Duration::from_secs(60);
    let (first, second) = two_instances(&pool, slow_refresh).await;
    let users = two_dongles(&first, "frank@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    let _data_a = DataClient::connect(&first.base, &users.token_a).await;
    group_until(&users.client, id, |g| {
        g["dongle_a"]["data_connected"] == true && g["dongle_b"]["data_connected"] == false
    })
    .await;
    // B connects to the other instance: the first one's view follows within the wait, not a minute.
    let data_b = DataClient::connect(&second.base, &users.token_b).await;
    group_until(&users.client, id, |g| {
        g["dongle_b"]["data_connected"] == true && g["state"] == "CROSS_INSTANCE"
    })
    .await;
    // And it follows B away.
    data_b.cut();
    group_until(&users.client, id, |g| {
        g["dongle_b"]["data_connected"] == false && g["state"] == "DEGRADED"
    })
    .await;
    second.stop().await;
}

/// Frames one instance buffers for a side connected to another wake that instance at once (a
/// notification), rather than waiting for its poll: here the poll is a minute away, and the frames must
/// arrive within the receive's 10 s. Before the notification they took up to the poll's backoff (8 s
/// by default, measured by `bench-relay --instances 2`: p50 7.7 s).
#[sqlx::test(migrator = "MIGRATOR")]
async fn frames_buffered_for_a_side_on_another_instance_wake_it_at_once(pool: PgPool) {
    let slow_poll = |c: &mut ServerConfig| {
        c.relay.poll_interval = Duration::from_secs(60);
        c.relay.refresh_interval = Duration::from_secs(60);
    };
    let (first, second) = two_instances(&pool, slow_poll).await;
    let users = two_dongles(&first, "frank@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    let mut data_a = DataClient::connect(&first.base, &users.token_a).await;
    let mut data_b = DataClient::connect(&second.base, &users.token_b).await;
    // B's pipe has looked at the buffer once, found it empty, and waits for its next poll.
    group_until(&users.client, id, |g| g["state"] == "DEGRADED").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..3u32 {
        let from = round * 5;
        data_a
            .send_frames(id, Side::A, u64::from(from), from..from + 5)
            .await;
        data_a.wait_ack(id, Side::A, u64::from(from) + 5).await;
        let got = data_b.receive(id, Side::B, 5, true).await;
        assert_eq!(numbers(&got), (from..from + 5).collect::<Vec<_>>());
    }
    second.stop().await;
}

/// The relay's LISTEN connections are killed by the database while a side on another instance waits for
/// frames: they are reopened on new connections, and frames committed right after the kill and once
/// they are back reach that side long before the poll, a minute away. (Whether the first batch's
/// notification is lost depends on how fast the listener is back; the resync a reopened listener makes
/// covers that case, and `listen::a_connection_the_database_ends_is_reopened_and_says_so` checks it.)
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_lost_relay_listen_connection_is_reopened_and_no_frame_waits_for_the_poll(pool: PgPool) {
    let slow_poll = |c: &mut ServerConfig| {
        c.relay.poll_interval = Duration::from_secs(60);
        c.relay.refresh_interval = Duration::from_secs(60);
    };
    let (first, second) = two_instances(&pool, slow_poll).await;
    let users = two_dongles(&first, "grace@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    let mut data_a = DataClient::connect(&first.base, &users.token_a).await;
    let mut data_b = DataClient::connect(&second.base, &users.token_b).await;
    data_a.send_frames(id, Side::A, 0, 0..5).await;
    data_a.wait_ack(id, Side::A, 5).await;
    assert_eq!(
        numbers(&data_b.receive(id, Side::B, 5, true).await),
        (0..5).collect::<Vec<_>>()
    );

    // Both instances listen on the relay's channel; the database ends both connections.
    let listening =
        || common::listening_pids(&pool, bridge_server::groups::buffer::BUFFERED_CHANNEL);
    agent::wait_until(|| async { listening().await.len() == 2 }).await;
    let before = listening().await;
    for pid in &before {
        common::terminate_backend(&pool, *pid).await;
    }

    // Committed right after the kill, while the listeners may still be away.
    data_a.send_frames(id, Side::A, 5, 5..10).await;
    data_a.wait_ack(id, Side::A, 10).await;
    assert_eq!(
        numbers(&data_b.receive(id, Side::B, 5, true).await),
        (5..10).collect::<Vec<_>>()
    );
    // Both listen again, on new connections, and the next frames wake B's instance as before.
    agent::wait_until(|| async {
        let now = listening().await;
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    })
    .await;
    data_a.send_frames(id, Side::A, 10, 10..15).await;
    data_a.wait_ack(id, Side::A, 15).await;
    assert_eq!(
        numbers(&data_b.receive(id, Side::B, 5, true).await),
        (10..15).collect::<Vec<_>>()
    );
    second.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_slow_side_gets_the_overflow_through_the_buffer(pool: PgPool) {
    let app = app_with(pool, |c| {
        c.relay.inflight_max_frames = 2_000;
        c.relay.gather_max_frames = 1_000;
        c.relay.replay_rate = 100_000;
    })
    .await;
    let (users, id, mut data_a, mut data_b) = relaying(&app).await;
    for i in 0..10u32 {
        data_a
            .send_frames(id, Side::A, u64::from(i * 500), i * 500..(i + 1) * 500)
            .await;
    }
    data_a.wait_ack(id, Side::A, 5_000).await;
    // B takes what comes but acknowledges nothing: past 2 000 frames in flight the rest is buffered,
    // and nothing more is sent to B, live or replayed, until it acknowledges (a slow bus behind B's
    // agent must not make it hold more than the limit).
    let got = data_b.receive(id, Side::B, 2_000, false).await;
    assert_eq!(numbers(&got), (0..2_000).collect::<Vec<_>>());
    assert_eq!(buffered_rows(&app, id, "a_to_b").await, 3_000);
    data_b.ack(id, Side::B, 2_000).await;
    // As B acknowledges, the rest reaches it from the buffer, in order.
    let got = data_b.receive(id, Side::B, 3_000, true).await;
    assert_eq!(numbers(&got), (2_000..5_000).collect::<Vec<_>>());
    data_b.ack(id, Side::B, 5_000).await;
    group_until(&users.client, id, |g| {
        g["state"] == "ACTIVE"
            && g["backlog"]["a_to_b"] == 0
            && g["frames_relayed"]["a_to_b"] == 5_000
    })
    .await;
}

/// A group side follows its dongle. Agent B logs in again (`bridge-agent login --force`: a new agent)
/// while the old one still counts as online; once the old one is gone the new one must be told the side
/// and get the frames. Before, nothing told it: the group stayed DEGRADED and every frame for B stayed
/// in the buffer (the trial: 15 of 15 never delivered).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_group_side_follows_its_dongle_to_another_agent(pool: PgPool) {
    let app = app_with(pool, |c| {
        c.relay.refresh_interval = Duration::from_millis(200);
    })
    .await;
    let (users, id, mut data_a, data_b) = relaying(&app).await;
    data_a.send_frames(id, Side::A, 0, 0..5).await;
    data_a.wait_ack(id, Side::A, 5).await;

    // B's workstation logs in anew: a new agent sees the dongle; the old one is still "online".
    let (_, token_b2) = agent::register(&users.client).await;
    let agent_b2 = TestAgent::connect(&app.base, &token_b2).await;
    agent_b2.report(&app.pool, &[DEV_B]).await;
    users.agent_b.disconnect();
    data_b.cut();
    data_a.send_frames(id, Side::A, 5, 5..15).await;
    data_a.wait_ack(id, Side::A, 15).await;
    // The old agent's last sign of life grows old, as it does 30 s after it stopped.
    sqlx::query("UPDATE agents SET last_seen_at = now() - interval '1 minute' WHERE id = $1")
        .bind(users.agent_b.agent_id)
        .execute(&app.pool)
        .await
        .unwrap();

    // The new agent is told the side, connects its data plane, and gets every frame.
    agent::wait_until(|| async {
        agent_b2
            .seen
            .lock()
            .unwrap()
            .groups
            .last()
            .is_some_and(|g| {
                g.sides
                    .iter()
                    .any(|s| s.group_id == id && s.side == Side::B)
            })
    })
    .await;
    let mut data_b2 = DataClient::connect(&app.base, &token_b2).await;
    let got = data_b2.receive(id, Side::B, 15, true).await;
    let mut numbers: Vec<u32> = got.iter().map(|(_, n)| *n).collect();
    numbers.dedup();
    assert_eq!(numbers, (0..15).collect::<Vec<u32>>());
    group_until(&users.client, id, |g| g["state"] == "ACTIVE").await;
}

/// Every data message naming a group the relay did not know cost a database query, made while holding
/// the relay's registry lock, so an agent sending made-up group ids stalled every group of the
/// instance. Now a group missing from the agent's own list is refused without a query, the lock is
/// never held across one, and an agent that keeps naming groups it does not serve loses its data
/// connection.
#[sqlx::test(migrator = "MIGRATOR")]
async fn messages_for_groups_an_agent_does_not_serve_are_refused_cheaply_and_close_it(
    pool: PgPool,
) {
    let app = app_with(pool, |_| {}).await;
    let (users, id, mut data_a, mut data_b) = relaying(&app).await;
    let (mallory, _) = app.logged_in("mallory@example.com", Role::User).await;
    let (_, token) = agent::register(&mallory).await;
    let _control = TestAgent::connect(&app.base, &token).await;
    let mut data_m = DataClient::connect(&app.base, &token).await;
    // Meanwhile, the real group relays.
    data_a.send_frames(id, Side::A, 0, 0..5).await;
    for _ in 0..300 {
        data_m.send_frames(Uuid::new_v4(), Side::A, 0, 0..1).await;
    }
    assert!(
        data_m.closed_within(Duration::from_secs(5)).await,
        "the flooding agent's data connection is closed"
    );
    let got = data_b.receive(id, Side::B, 5, true).await;
    assert_eq!(numbers(&got), vec![0, 1, 2, 3, 4]);
    let _ = users;
}

/// Two instances, each relaying one direction of a group through the buffer, write at the same moment:
/// each write locks its direction's row and then records its sender's position in the other row. Taken
/// in opposite orders, the two writes deadlocked, PostgreSQL aborted one after its deadlock timeout (a
/// second), and frames crossing instances both ways waited 1.5 s at p99 (`bench-relay --instances 2
/// --both-directions`). The rows are now locked in one order.
#[sqlx::test(migrator = "MIGRATOR")]
async fn writes_of_both_directions_at_once_never_deadlock(pool: PgPool) {
    use bridge_server::groups::buffer::{self, Append, Retention};
    let app = app_with(pool.clone(), |_| {}).await;
    let users = two_dongles(&app, "gina@example.com", DEV_A, DEV_B).await;
    let id = active_group(&users.client, users.dongle_a, users.dongle_b).await;
    // The other instance's own connections.
    let other = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url_of(&pool))
        .await
        .unwrap();
    let retention = Retention {
        max_frames: 1_000_000,
        max_age: Duration::from_secs(3600),
    };
    for round in 0..40u64 {
        let (to_b, to_a) = (
            [common::data::stored_chunk(round * 4, 4)],
            [common::data::stored_chunk(round * 4, 4)],
        );
        let write = |target: Side, chunks| Append {
            group_id: id,
            target,
            chunks,
            source_next_in: Some(round * 4 + 4),
            retention,
            audit_due: false,
            carried: 0,
        };
        let (b, a) = tokio::join!(
            buffer::append(&pool, write(Side::B, &to_b[..])),
            buffer::append(&other, write(Side::A, &to_a[..])),
        );
        b.unwrap_or_else(|e| panic!("round {round}, the write towards B: {e}"));
        a.unwrap_or_else(|e| panic!("round {round}, the write towards A: {e}"));
    }
}
