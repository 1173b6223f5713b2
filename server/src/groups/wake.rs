//! Wakes this instance's pipes when frames for a side they serve are committed to the buffer, usually
//! by another instance: the write notifies [`super::buffer::BUFFERED_CHANNEL`] with the group and the
//! direction, and this task hands that to the group's pipe ([`Relay::buffered`]), which reads the new
//! rows at once. Without it, a group whose sides reach different instances waited for the receiving
//! pipe's poll, which backs off to 16 times `poll_interval` while it finds nothing (p50 7.7 s measured by
//! `bench-relay --instances 2`). The poll stays as the fallback for a missed notification, and a
//! reopened listening connection makes every pipe look once. The same channel says when where a side
//! is served changed (`served:<group id>`), so that the group's pipe here looks at its sides at once.
//!
//! With the buffer on JetStream ([`super::jetstream`]) the writes are not announced in PostgreSQL: the
//! stream's followers on this instance name each direction that received a message, and this task
//! hands those to the pipes the same way.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::buffer::{BUFFERED_CHANNEL, parse_buffered_payload, parse_served_payload};
use super::relay::Relay;
use super::store::FrameStore;
use crate::listen::{WAKE_QUEUE, Wake, listen_loop};

/// Listens until `shutdown` and wakes the pipes that notifications name.
pub async fn run(pool: PgPool, relay: Arc<Relay>, shutdown: CancellationToken) {
    let jetstream = match relay.frame_store() {
        FrameStore::JetStream(js) => js.take_wakes().map(|mut wakes| {
            let (relay, shutdown) = (relay.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        wake = wakes.recv() => match wake {
                            Some((group_id, towards)) => relay.buffered(group_id, towards).await,
                            None => return,
                        },
                    }
                }
            })
        }),
        FrameStore::Postgres => None,
    };
    let (wake_tx, mut wake_rx) = mpsc::channel(WAKE_QUEUE);
    let listener = tokio::spawn(listen_loop(
        pool,
        BUFFERED_CHANNEL.to_string(),
        wake_tx,
        shutdown.clone(),
    ));
    while let Some(wake) = wake_rx.recv().await {
        match wake {
            Wake::Notice(payload) => {
                if let Some((group_id, towards)) = parse_buffered_payload(&payload) {
                    relay.buffered(group_id, towards).await;
                } else if let Some(group_id) = parse_served_payload(&payload) {
                    relay.look_at_sides(group_id).await;
                } else {
                    tracing::debug!("ignored a relay notification that does not parse");
                }
            }
            Wake::Resync => {
                relay.look_at_every_buffer().await;
                relay.look_at_every_side().await;
            }
        }
    }
    let _ = listener.await;
    if let Some(jetstream) = jetstream {
        let _ = jetstream.await;
    }
}
