//! A LISTEN connection that stays open: notifications on one channel go to a task as [`Wake`]s, and a
//! reopened connection says so ([`Wake::Resync`]), since what was announced meanwhile is lost.
//!
//! Used by the instances' mailbox (`agents::cluster`) and by the relay's wake-ups for frames another
//! instance buffered (`groups::wake`). Every user of it keeps a poll as the fallback: a notification is
//! a hint that saves a wait, never the only way to find the work.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The first and the longest wait before the listening connection is opened again after a failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How many notifications may wait between the listening task and the one acting on them.
pub const WAKE_QUEUE: usize = 256;

/// What the listening task tells the task that acts on notifications.
pub enum Wake {
    /// A notification's payload.
    Notice(String),
    /// The listening connection was (re)opened: whatever was announced while nobody listened was
    /// missed, so the receiver looks at what it would have been told about.
    Resync,
}

/// Opens a LISTEN connection with the pool's settings, but outside the pool: a listener holds its
/// connection for the life of the instance, and an instance has several (the mailbox's, the relay's),
/// which would otherwise leave the pool that many connections short for every request (a test's pool
/// of five lost two).
async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    if pool.is_closed() {
        return Err(sqlx::Error::PoolClosed);
    }
    let own = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let mut listener = PgListener::connect_with(&own).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

/// Keeps a LISTEN connection open (reopening it with exponential backoff) and forwards notifications.
pub async fn listen_loop(
    pool: PgPool,
    channel: String,
    wake: mpsc::Sender<Wake>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        // The listener's connection is its own, so the instance's pool closing (the server stopping
        // or killed) is watched for here.
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = pool.close_event() => return,
            opened = listen(&pool, &channel) => opened,
        };
        match opened {
            Ok(mut listener) => {
                backoff = BACKOFF_FIRST;
                if wake.send(Wake::Resync).await.is_err() {
                    return;
                }
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = pool.close_event() => return,
                        next = listener.try_recv() => next,
                    };
                    match next {
                        Ok(Some(notification)) => {
                            let payload = notification.payload().to_string();
                            if wake.send(Wake::Notice(payload)).await.is_err() {
                                return;
                            }
                        }
                        // The connection dropped and the listener opened a new one: notifications
                        // sent in between are lost, and the receiver must look for itself.
                        Ok(None) => {
                            tracing::info!("the LISTEN connection was reopened");
                            if wake.send(Wake::Resync).await.is_err() {
                                return;
                            }
                        }
                        Err(sqlx::Error::PoolClosed) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "the LISTEN connection failed; polling until it is back");
                            break;
                        }
                    }
                }
            }
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "could not LISTEN; polling until it works");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
