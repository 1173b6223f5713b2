//! The LISTEN connection every instance keeps (`bridge_server::listen`): notifications arrive as
//! notices, and a connection the database ends is reopened and says so, so that its user looks for what
//! was announced while nobody listened.

use std::time::Duration;

use crate::common;

use bridge_server::db::MIGRATOR;
use bridge_server::listen::{Wake, listen_loop};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const CHANNEL: &str = "listen_test";

/// The next wake-up, as text: `resync` or the notice's payload.
async fn next(wakes: &mut mpsc::Receiver<Wake>) -> String {
    match tokio::time::timeout(Duration::from_secs(10), wakes.recv()).await {
        Ok(Some(Wake::Resync)) => "resync".into(),
        Ok(Some(Wake::Notice(payload))) => payload,
        Ok(None) => panic!("the listening task ended"),
        Err(_) => panic!("nothing within 10 s"),
    }
}

async fn notify(pool: &PgPool, payload: &str) {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_connection_the_database_ends_is_reopened_and_says_so(pool: PgPool) {
    let (wake_tx, mut wakes) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(listen_loop(
        pool.clone(),
        CHANNEL.to_string(),
        wake_tx,
        shutdown.clone(),
    ));
    // Opening is a resync too: nothing was heard before it.
    assert_eq!(next(&mut wakes).await, "resync");
    notify(&pool, "one").await;
    assert_eq!(next(&mut wakes).await, "one");

    let listening = common::listening_pids(&pool, CHANNEL).await;
    assert_eq!(listening.len(), 1, "one listening connection");
    common::terminate_backend(&pool, listening[0]).await;
    // Whatever was sent while it was away may be lost; the reopened connection says so first.
    assert_eq!(next(&mut wakes).await, "resync");
    notify(&pool, "two").await;
    assert_eq!(next(&mut wakes).await, "two");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the listening task ends when told")
        .unwrap();
}
