//! The relay's frame store, one suite on both stores: PostgreSQL (`relay_buffer`) and NATS JetStream
//! (`serve --nats-url`, against the nats-server that scripts/test starts, named by
//! `BRIDGE_TEST_NATS_URL`). Every scenario runs on each store (`postgres::*` and `jetstream::*`), with
//! two store handles on one database standing for two server instances: what one writes, the other
//! reads and acknowledges.

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::groups::buffer::{Append, BufferError, Retention};
use bridge_server::groups::chunk::Chunk;
use bridge_server::groups::store::FrameStore;
use common::data::stored_chunk as chunk;
use control_proto::data::Side;
use sqlx::PgPool;
use uuid::Uuid;

/// Two instances' handles on one store, and a third for an instance started after one of them died.
struct Stores {
    writer: FrameStore,
    reader: FrameStore,
    spare: FrameStore,
}

impl Stores {
    fn postgres() -> Self {
        Stores {
            writer: FrameStore::Postgres,
            reader: FrameStore::Postgres,
            spare: FrameStore::Postgres,
        }
    }

    /// Two connections to the test's NATS server, on a stream of the test's own.
    async fn jetstream() -> Self {
        use bridge_server::groups::jetstream::{JetStreamBuffer, NatsSettings};
        use bridge_server::groups::settings::RelaySettings;
        let url = std::env::var("BRIDGE_TEST_NATS_URL")
            .expect("BRIDGE_TEST_NATS_URL names the nats-server of the test run (scripts/test)");
        let settings = NatsSettings {
            stream: format!("T{}", Uuid::new_v4().simple()),
            ..NatsSettings::new(url)
        };
        let relay = RelaySettings::default();
        let connect = || async {
            FrameStore::JetStream(std::sync::Arc::new(
                JetStreamBuffer::connect(&settings, &relay).await.unwrap(),
            ))
        };
        Stores {
            writer: connect().await,
            reader: connect().await,
            spare: connect().await,
        }
    }
}

/// A user, two dongles and their group, as rows.
async fn group(pool: &PgPool) -> Uuid {
    let user: Uuid = sqlx::query_scalar(
        "INSERT INTO users (email, password_hash) VALUES ('store@example.com', 'x') RETURNING id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let mut dongles = Vec::new();
    for device in ["00000000000000a1", "00000000000000b1"] {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO dongles (device_id, owner_user_id) VALUES ($1, $2) RETURNING id",
        )
        .bind(device)
        .bind(user)
        .fetch_one(pool)
        .await
        .unwrap();
        dongles.push(id);
    }
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO dongle_groups (user_id, dongle_a_id, dongle_b_id, mode) \
         VALUES ($1, $2, $3, 'ACTIVE') RETURNING id",
    )
    .bind(user)
    .bind(dongles[0])
    .bind(dongles[1])
    .fetch_one(pool)
    .await
    .unwrap();
    // As the API makes a group: with its two sides' rows.
    sqlx::query("INSERT INTO relay_sides (group_id, side) VALUES ($1, 'a'), ($1, 'b')")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    id
}

const RETENTION: Retention = Retention {
    max_frames: 200_000,
    max_age: Duration::from_secs(600),
};

/// Writes chunks towards B, as side A's stream accepted up to the last one's end.
async fn write(store: &FrameStore, pool: &PgPool, group_id: Uuid, chunks: &[Chunk]) -> u64 {
    let next_in = chunks.iter().map(Chunk::end).max().unwrap_or(0);
    let appended = store
        .append(
            pool,
            Append {
                group_id,
                target: Side::B,
                chunks,
                source_next_in: Some(next_in),
                retention: RETENTION,
                audit_due: false,
                carried: 0,
            },
        )
        .await
        .unwrap();
    appended.buffered
}

/// `writer` appends frames 0..16 (two chunks) and is killed at once, nothing more of it running; then
/// `reader` hands both chunks to B, which acknowledges them all.
async fn write_die_and_deliver(writer: FrameStore, reader: &FrameStore, pool: &PgPool, id: Uuid) {
    write(&writer, pool, id, &[chunk(0, 10), chunk(10, 6)]).await;
    drop(writer);
    assert_eq!(read(reader, pool, id, 0).await.len(), 2);
    reader.acknowledge(pool, id, Side::B, 16).await.unwrap();
}

async fn read(store: &FrameStore, pool: &PgPool, group_id: Uuid, from: u64) -> Vec<(u64, u32)> {
    store
        .fetch(pool, group_id, Side::B, from, 32)
        .await
        .unwrap()
        .iter()
        .map(|c| (c.seq, c.count))
        .collect()
}

/// What the database says of B's direction: acknowledged up to, frames waiting, once `store` has
/// written what it recorded (JetStream's store writes the rows behind the relay).
async fn side_b(store: &FrameStore, pool: &PgPool, group_id: Uuid) -> (i64, i64) {
    assert!(
        store.settle(Duration::from_secs(5)).await,
        "the rows were written"
    );
    sqlx::query_as(
        "SELECT acked_out, buffered_frames FROM relay_sides WHERE group_id = $1 AND side = 'b'",
    )
    .bind(group_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn what_one_instance_writes_another_reads_by_position(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    assert_eq!(
        write(&stores.writer, &pool, id, &[chunk(0, 10), chunk(10, 5)]).await,
        15
    );
    assert_eq!(write(&stores.writer, &pool, id, &[chunk(15, 1)]).await, 16);
    assert_eq!(
        read(&stores.reader, &pool, id, 0).await,
        [(0, 10), (10, 5), (15, 1)]
    );
    assert_eq!(
        read(&stores.reader, &pool, id, 10).await,
        [(10, 5), (15, 1)]
    );
    assert_eq!(read(&stores.reader, &pool, id, 16).await, []);
    // The frames themselves come back as written.
    let fetched = stores
        .reader
        .fetch(&pool, id, Side::B, 10, 1)
        .await
        .unwrap();
    assert_eq!(fetched, [chunk(10, 5)]);
    // Both instances load the same rows: A's stream accepted up to 16, 16 waiting towards B.
    for store in [&stores.writer, &stores.reader] {
        let rows = store.load(&pool, id).await.unwrap();
        assert_eq!(rows[0].next_in, 16);
        assert_eq!((rows[1].buffered, rows[1].tail), (16, 16));
        assert_eq!((rows[0].buffered, rows[0].tail), (0, 0));
    }
}

async fn a_chunk_written_twice_is_stored_once(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    write(&stores.writer, &pool, id, &[chunk(0, 4)]).await;
    // A write repeated after its answer was lost, and the same again from the other instance.
    assert_eq!(write(&stores.writer, &pool, id, &[chunk(0, 4)]).await, 4);
    write(&stores.reader, &pool, id, &[chunk(0, 4)]).await;
    assert_eq!(read(&stores.reader, &pool, id, 0).await, [(0, 4)]);
    assert_eq!(stores.reader.load(&pool, id).await.unwrap()[1].buffered, 4);
}

async fn writes_out_of_position_order_are_read_in_position_order(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    // Frames 20.. were buffered while 0..20 were in flight to B; B's connection closed, and the frames
    // in flight were written after them.
    write(&stores.writer, &pool, id, &[chunk(20, 10)]).await;
    write(&stores.writer, &pool, id, &[chunk(0, 10), chunk(10, 10)]).await;
    assert_eq!(
        read(&stores.reader, &pool, id, 0).await,
        [(0, 10), (10, 10), (20, 10)]
    );
    // Acknowledging the first two removes them although the stream holds them after the third.
    let acked = stores
        .reader
        .acknowledge(&pool, id, Side::B, 20)
        .await
        .unwrap();
    assert_eq!((acked.removed, acked.buffered), (20, 10));
    assert_eq!(read(&stores.reader, &pool, id, 0).await, [(20, 10)]);
    // The other instance loads the same, once the acknowledgement is written.
    assert!(stores.reader.settle(Duration::from_secs(5)).await);
    assert_eq!(stores.writer.load(&pool, id).await.unwrap()[1].buffered, 10);
}

async fn an_acknowledgement_removes_exactly_the_chunks_wholly_below_it(
    stores: Stores,
    pool: PgPool,
) {
    let id = group(&pool).await;
    write(
        &stores.writer,
        &pool,
        id,
        &[chunk(0, 10), chunk(10, 10), chunk(20, 10)],
    )
    .await;
    // 15 is inside the second chunk: it stays, to be sent again from its start.
    let acked = stores
        .reader
        .acknowledge(&pool, id, Side::B, 15)
        .await
        .unwrap();
    assert_eq!((acked.removed, acked.buffered), (10, 20));
    assert_eq!(
        read(&stores.reader, &pool, id, 10).await,
        [(10, 10), (20, 10)]
    );
    assert_eq!(side_b(&stores.reader, &pool, id).await, (15, 20));
    // An acknowledgement below what was already acknowledged changes nothing.
    let acked = stores
        .reader
        .acknowledge(&pool, id, Side::B, 5)
        .await
        .unwrap();
    assert_eq!((acked.removed, acked.buffered), (0, 20));
    assert_eq!(side_b(&stores.reader, &pool, id).await, (15, 20));
    let acked = stores
        .reader
        .acknowledge(&pool, id, Side::B, 30)
        .await
        .unwrap();
    assert_eq!((acked.removed, acked.buffered), (20, 0));
    assert_eq!(read(&stores.reader, &pool, id, 0).await, []);
    assert_eq!(side_b(&stores.reader, &pool, id).await, (30, 0));
    // The writer's load sees the direction empty too, and writes after it are read from where they
    // start.
    assert_eq!(stores.writer.load(&pool, id).await.unwrap()[1].buffered, 0);
    write(&stores.writer, &pool, id, &[chunk(30, 2)]).await;
    assert_eq!(read(&stores.reader, &pool, id, 30).await, [(30, 2)]);
    assert_eq!(stores.reader.load(&pool, id).await.unwrap()[1].buffered, 2);
}

async fn a_read_returns_at_most_its_limit(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    let chunks: Vec<Chunk> = (0..40).map(|i| chunk(i * 2, 2)).collect();
    write(&stores.writer, &pool, id, &chunks).await;
    let first = stores
        .reader
        .fetch(&pool, id, Side::B, 0, 32)
        .await
        .unwrap();
    assert_eq!(first.len(), 32);
    assert_eq!(first.last().map(Chunk::end), Some(64));
    let rest = stores
        .reader
        .fetch(&pool, id, Side::B, 64, 32)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|c| c.seq).collect::<Vec<_>>(),
        [64, 66, 68, 70, 72, 74, 76, 78]
    );
}

async fn writes_for_a_deleted_group_fail_as_gone(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    write(&stores.writer, &pool, id, &[chunk(0, 3)]).await;
    sqlx::query("DELETE FROM dongle_groups WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    stores.writer.discard(id).await;
    let append = Append {
        group_id: id,
        target: Side::B,
        chunks: &[chunk(3, 3)],
        source_next_in: Some(6),
        retention: RETENTION,
        audit_due: false,
        carried: 0,
    };
    let written = stores.writer.append(&pool, append).await;
    assert!(
        matches!(written, Err(BufferError::Gone)),
        "a write for a deleted group: {written:?}"
    );
    // What the group left is gone too.
    assert_eq!(read(&stores.reader, &pool, id, 0).await, []);
}

/// Two instances, each writing one direction of a group at the same moment, never wait on each other:
/// each write records its sender's position in one side's row and the frames waiting in the other's.
/// Taken in opposite orders, the two writes deadlocked, and PostgreSQL failed one of them a second
/// later (seen with `bench-relay --instances 2 --nats --both-directions`: p50 0.5 s).
async fn writes_of_both_directions_at_once_never_deadlock(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    fn towards(group_id: Uuid, target: Side, chunks: &[Chunk]) -> Append<'_> {
        Append {
            group_id,
            target,
            chunks,
            source_next_in: chunks.last().map(Chunk::end),
            retention: RETENTION,
            audit_due: false,
            carried: 0,
        }
    }
    for round in 0..40u64 {
        let (to_b, to_a) = ([chunk(round * 4, 4)], [chunk(round * 4, 4)]);
        let (b, a) = tokio::join!(
            stores.writer.append(&pool, towards(id, Side::B, &to_b)),
            stores.reader.append(&pool, towards(id, Side::A, &to_a)),
        );
        b.unwrap_or_else(|e| panic!("round {round}, the write towards B: {e}"));
        a.unwrap_or_else(|e| panic!("round {round}, the write towards A: {e}"));
    }
    let rows = stores.reader.load(&pool, id).await.unwrap();
    assert_eq!((rows[0].next_in, rows[1].next_in), (160, 160));
    assert_eq!((rows[0].buffered, rows[1].buffered), (160, 160));
}

/// Each scenario as a test on each store.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            use super::*;
            $(
                #[sqlx::test(migrator = "MIGRATOR")]
                async fn $scenario(pool: PgPool) {
                    super::$scenario(Stores::postgres(), pool).await
                }
            )*
        }
        mod jetstream {
            use super::*;
            $(
                #[sqlx::test(migrator = "MIGRATOR")]
                #[cfg_attr(
                    not(feature = "nats-tests"),
                    ignore = "needs a nats-server with JetStream (BRIDGE_TEST_NATS_URL): scripts/test starts one where nats-server is installed"
                )]
                async fn $scenario(pool: PgPool) {
                    super::$scenario(Stores::jetstream().await, pool).await
                }
            )*
        }
    };
}

/// A server killed right after a write (before JetStream's store wrote the rows behind it): the
/// sender's agent was acknowledged, so the next instance must expect its stream from past those frames,
/// or the agent, which no longer holds them, could never fill the gap.
async fn a_sender_position_survives_a_kill_right_after_the_write(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    write(&stores.writer, &pool, id, &[chunk(0, 10), chunk(10, 6)]).await;
    // Killed: nothing more of it runs (its task writing the rows is aborted with it).
    drop(stores.writer);
    let rows = stores.reader.load(&pool, id).await.unwrap();
    assert_eq!(rows[0].next_in, 16, "A's stream is accepted up to 16");
    assert_eq!((rows[1].buffered, rows[1].tail), (16, 16));
}

/// A server killed right after its receiver acknowledged frames: whatever the rows then say, the next
/// instance reads on from where they say without a gap (the receiver skips by position what it had).
async fn an_acknowledgement_lost_in_a_kill_leaves_no_gap(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    write(
        &stores.writer,
        &pool,
        id,
        &[chunk(0, 10), chunk(10, 10), chunk(20, 10)],
    )
    .await;
    assert_eq!(read(&stores.reader, &pool, id, 0).await.len(), 3);
    stores
        .reader
        .acknowledge(&pool, id, Side::B, 20)
        .await
        .unwrap();
    drop(stores.reader);
    let rows = stores.spare.load(&pool, id).await.unwrap();
    let from = rows[1].acked_out;
    assert!(from <= 20, "never past what was acknowledged: {from}");
    let chunks = read(&stores.spare, &pool, id, from).await;
    assert_eq!(chunks.first().map(|c| c.0), Some(from), "{chunks:?}");
    assert_eq!(chunks.last(), Some(&(20, 10)));
    assert!(
        chunks
            .windows(2)
            .all(|w| w[0].0 + u64::from(w[0].1) == w[1].0),
        "no gap: {chunks:?}"
    );
}

/// The receiver acknowledged frames (and their messages were purged) before the writer, killed, wrote
/// its sender's position: the next instance expects the sender's stream from past them all the same.
async fn a_sender_position_survives_a_kill_after_the_receiver_took_its_frames(
    stores: Stores,
    pool: PgPool,
) {
    let id = group(&pool).await;
    write_die_and_deliver(stores.writer, &stores.reader, &pool, id).await;
    assert!(stores.reader.settle(Duration::from_secs(5)).await);
    let rows = stores.spare.load(&pool, id).await.unwrap();
    assert_eq!(rows[0].next_in, 16, "A's stream is accepted up to 16");
    assert_eq!(rows[1].buffered, 0);
}

/// A pipe's periodic write of its positions may put the receiver's acknowledgement in the row ahead
/// of the store's own: the frames waiting are then counted above the row's, not left as they were.
async fn the_count_waiting_follows_an_acknowledgement_written_ahead(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    write(&stores.writer, &pool, id, &[chunk(0, 10), chunk(10, 6)]).await;
    assert!(stores.writer.settle(Duration::from_secs(5)).await);
    assert_eq!(read(&stores.reader, &pool, id, 0).await.len(), 2);
    // Frames 16..20 went to B straight from memory, and the pipe wrote B's acknowledgement of them.
    sqlx::query("UPDATE relay_sides SET acked_out = 20 WHERE group_id = $1 AND side = 'b'")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    stores
        .reader
        .acknowledge(&pool, id, Side::B, 16)
        .await
        .unwrap();
    assert_eq!(side_b(&stores.reader, &pool, id).await, (20, 0));
}

/// A group made before the relay had rows for its sides: its acknowledgement is recorded all the
/// same (the rows are made), never lost while the frames it covers are purged.
async fn an_acknowledgement_for_a_group_without_rows_is_recorded(stores: Stores, pool: PgPool) {
    let id = group(&pool).await;
    sqlx::query("DELETE FROM relay_sides WHERE group_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    // The writer dies before it wrote any row.
    write_die_and_deliver(stores.writer, &stores.reader, &pool, id).await;
    assert_eq!(side_b(&stores.reader, &pool, id).await, (16, 0));
}

on_both_stores!(
    the_count_waiting_follows_an_acknowledgement_written_ahead,
    an_acknowledgement_for_a_group_without_rows_is_recorded,
    a_sender_position_survives_a_kill_after_the_receiver_took_its_frames,
    a_sender_position_survives_a_kill_right_after_the_write,
    an_acknowledgement_lost_in_a_kill_leaves_no_gap,
    what_one_instance_writes_another_reads_by_position,
    a_chunk_written_twice_is_stored_once,
    writes_out_of_position_order_are_read_in_position_order,
    an_acknowledgement_removes_exactly_the_chunks_wholly_below_it,
    a_read_returns_at_most_its_limit,
    writes_for_a_deleted_group_fail_as_gone,
    writes_of_both_directions_at_once_never_deadlock,
);

/// Frames published live (core NATS, beside the stream) reach the instance that follows the direction
/// without waiting for the stream: they are sent, but never counted as buffered nor taken as the end of
/// the sender's stream, since the writer may die before the stream has them. Whatever else arrives on
/// the live subject (another client of the NATS server may publish anything) is skipped.
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs a nats-server with JetStream (BRIDGE_TEST_NATS_URL): scripts/test starts one where nats-server is installed"
)]
async fn live_frames_are_sent_but_not_counted_until_the_stream_has_them(pool: PgPool) {
    use control_proto::data::encode_frames;
    let stores = Stores::jetstream().await;
    let FrameStore::JetStream(js) = &stores.reader else {
        unreachable!("a JetStream store")
    };
    let subject = |group: Uuid, side: &str| format!("{}-live.{group}.{side}", js.stream_name());
    let id = group(&pool).await;
    // The reader follows B's direction from here on.
    assert_eq!(read(&stores.reader, &pool, id, 0).await, []);
    let url = std::env::var("BRIDGE_TEST_NATS_URL").unwrap();
    let client = async_nats::connect(url).await.unwrap();
    let frames = chunk(0, 3);
    for (to, message) in [
        (subject(id, "b"), b"not a data message".to_vec()),
        (
            subject(id, "b"),
            encode_frames(Uuid::new_v4(), Side::B, 0, &frames.batch),
        ),
        (
            subject(id, "b"),
            encode_frames(id, Side::A, 0, &frames.batch),
        ),
        (
            subject(id, "b"),
            encode_frames(id, Side::B, u64::MAX - 1, &frames.batch),
        ),
        (
            subject(id, "b"),
            encode_frames(id, Side::B, 0, &frames.batch),
        ),
    ] {
        client.publish(to, message.into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..250 {
        got = read(&stores.reader, &pool, id, 0).await;
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, [(0, 3)], "the live frames, and nothing else");
    let fetched = stores.reader.fetch(&pool, id, Side::B, 0, 8).await.unwrap();
    assert_eq!(fetched, std::slice::from_ref(&frames));
    let rows = stores.reader.load(&pool, id).await.unwrap();
    assert_eq!((rows[1].buffered, rows[1].tail, rows[0].next_in), (0, 0, 0));
    // Once the stream has them, they count.
    write(&stores.writer, &pool, id, &[frames]).await;
    let rows = stores.reader.load(&pool, id).await.unwrap();
    assert_eq!((rows[1].buffered, rows[1].tail, rows[0].next_in), (3, 3, 3));
    assert_eq!(read(&stores.reader, &pool, id, 0).await, [(0, 3)]);
}

/// A three-node NATS cluster, a stream of three replicas, and one node killed in the middle of a
/// buffered stream: writes that fail while the cluster elects a new leader are written again (as a
/// pipe does), and the reader gets every frame once and in order, before and after the node returns.
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs nats-server (Debian: nats-server): scripts/test turns this on where it is installed"
)]
async fn a_three_node_cluster_loses_nothing_when_a_node_dies(pool: PgPool) {
    use bridge_server::groups::jetstream::{JetStreamBuffer, NatsSettings};
    use bridge_server::groups::settings::RelaySettings;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = bridge_rig::nats::start_cluster(dir.path(), 3).unwrap();
    let settings = NatsSettings {
        replicas: 3,
        stream: "CLUSTERED".into(),
        ..NatsSettings::new(bridge_rig::nats::cluster_url(&nodes))
    };
    let relay = RelaySettings::default();
    // The cluster elects its JetStream leader first: until then the stream cannot be made.
    let connect = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match JetStreamBuffer::connect(&settings, &relay).await {
                Ok(buffer) => return FrameStore::JetStream(std::sync::Arc::new(buffer)),
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("waiting for the cluster: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("the cluster never took the stream: {e}"),
            }
        }
    };
    let stores = Stores {
        writer: connect().await,
        reader: connect().await,
        spare: connect().await,
    };
    let id = group(&pool).await;
    // Written as a pipe writes: a failed write is written again until it succeeds.
    let write_until_done = |seq: u64| {
        let (store, pool) = (&stores.writer, &pool);
        async move {
            let chunks = [chunk(seq, 4)];
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let append = Append {
                    group_id: id,
                    target: Side::B,
                    chunks: &chunks,
                    source_next_in: Some(seq + 4),
                    retention: RETENTION,
                    audit_due: false,
                    carried: 0,
                };
                match store.append(pool, append).await {
                    Ok(_) => return,
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("write at {seq} failed, again: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("the write at {seq} never succeeded: {e}"),
                }
            }
        }
    };
    let mut delivered = Vec::new();
    let read_all = async |delivered: &mut Vec<u64>, upto: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while delivered.last().map_or(0, |p| p + 1) < upto {
            let from = delivered.last().map_or(0, |p| p + 1);
            match stores.reader.fetch(&pool, id, Side::B, from, 32).await {
                Ok(chunks) => {
                    for c in &chunks {
                        delivered.extend(c.seq..c.end());
                    }
                    if let Some(end) = chunks.last().map(Chunk::end) {
                        // Acknowledged as the receiving agent would; a failure is retried later.
                        let _ = stores.reader.acknowledge(&pool, id, Side::B, end).await;
                    }
                }
                Err(e) => eprintln!("read from {from} failed, again: {e}"),
            }
            assert!(std::time::Instant::now() < deadline, "stuck at {from}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for seq in (0..100).step_by(4) {
        write_until_done(seq).await;
    }
    read_all(&mut delivered, 60).await;
    // The stream's leader dies with 40 frames still waiting in the stream and more to come.
    let client = async_nats::connect(nodes[0].url()).await.unwrap();
    let info = async_nats::jetstream::new(client)
        .get_stream("CLUSTERED")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .expect("a replicated stream has a leader");
    let victim = nodes.iter().position(|n| n.name == leader).unwrap();
    nodes[victim].kill();
    for seq in (100..200).step_by(4) {
        write_until_done(seq).await;
    }
    read_all(&mut delivered, 200).await;
    // It comes back; the stream goes on.
    nodes[victim].restart().unwrap();
    for seq in (200..240).step_by(4) {
        write_until_done(seq).await;
    }
    read_all(&mut delivered, 240).await;
    assert_eq!(
        delivered,
        (0..240).collect::<Vec<u64>>(),
        "every frame once, in order"
    );
}
