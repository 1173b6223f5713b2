//! Where the relay keeps the frames waiting for a side: the one interface the pipes use (load, append
//! with retention, read from a position, acknowledge up to a position, discard), over PostgreSQL
//! ([`super::buffer`], the default) or NATS JetStream ([`super::jetstream`], `serve --nats-url`).
//!
//! Both keep the same promises, which one test suite checks on each (`tests/it/frame_store.rs`): an
//! append has survived once it returns, a chunk written twice is stored once, reads go by position
//! whatever the order of the writes, an acknowledgement removes exactly the chunks wholly below it,
//! and a deleted group's writes fail as [`BufferError::Gone`]. They differ in retention: PostgreSQL
//! trims to the frame limit exactly and audits the trim; JetStream applies its per-subject message limit
//! and age itself, and the receiver sees what they removed as a gap in the positions.
//!
//! Either way, the positions and counters of each direction live in PostgreSQL's `relay_sides`: with
//! the frames on PostgreSQL, written in the same transaction; on JetStream, written behind the relay
//! within about 50 ms, which [`FrameStore::settle`] waits for.

use std::sync::Arc;
use std::time::Duration;

use control_proto::data::Side;
use sqlx::PgPool;
use uuid::Uuid;

use super::buffer::{self, Acknowledged, Append, Appended, BufferError, SideRow};
use super::chunk::Chunk;
use super::jetstream::JetStreamBuffer;
use super::settings::RelaySettings;

/// The relay's frame store. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub enum FrameStore {
    /// `relay_buffer` rows in the server's database.
    #[default]
    Postgres,
    /// A JetStream stream.
    JetStream(Arc<JetStreamBuffer>),
}

impl FrameStore {
    /// The relay's settings as this store wants them. PostgreSQL's writes are transactions that each
    /// wait for a flush, so frames gather for `gather` to make each one count; JetStream's publishes are
    /// pipelined and acknowledged in a fraction of a millisecond, so a pipe writes what it holds at
    /// once, and what arrives while a write is out gathers by itself for the next one.
    pub fn tune(&self, mut settings: RelaySettings) -> RelaySettings {
        if let FrameStore::JetStream(_) = self {
            settings.gather = Duration::ZERO;
        }
        settings
    }

    /// Its name in the demo's summary.
    pub fn kind(&self) -> &'static str {
        match self {
            FrameStore::Postgres => "postgres",
            FrameStore::JetStream(_) => "jetstream",
        }
    }

    /// Both sides' positions and counters, and each direction's frames waiting and the end of its buffer.
    pub async fn load(&self, pool: &PgPool, group_id: Uuid) -> Result<[SideRow; 2], BufferError> {
        match self {
            FrameStore::Postgres => buffer::load(pool, group_id).await,
            FrameStore::JetStream(js) => js.load(pool, group_id).await,
        }
    }

    /// Writes chunks towards a side (none: a retention pass). Once this returns Ok, the frames survive
    /// a crash of this server, and the sender may be acknowledged.
    pub async fn append(&self, pool: &PgPool, req: Append<'_>) -> Result<Appended, BufferError> {
        match self {
            FrameStore::Postgres => buffer::append(pool, req).await,
            FrameStore::JetStream(js) => js.append(pool, req).await,
        }
    }

    /// The receiver of `target` acknowledged every frame below `next`.
    pub async fn acknowledge(
        &self,
        pool: &PgPool,
        group_id: Uuid,
        target: Side,
        next: u64,
    ) -> Result<Acknowledged, BufferError> {
        match self {
            FrameStore::Postgres => buffer::acknowledge(pool, group_id, target, next).await,
            FrameStore::JetStream(js) => js.acknowledge(pool, group_id, target, next).await,
        }
    }

    /// Up to `limit` chunks towards `target` that start at or after position `from`, in position order.
    pub async fn fetch(
        &self,
        pool: &PgPool,
        group_id: Uuid,
        target: Side,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Chunk>, BufferError> {
        match self {
            FrameStore::Postgres => {
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                buffer::fetch(pool, group_id, target, from, limit).await
            }
            FrameStore::JetStream(js) => js.fetch(group_id, target, from, limit).await,
        }
    }

    /// Removes what a deleted group left. PostgreSQL's rows went with the group already.
    pub async fn discard(&self, group_id: Uuid) {
        if let FrameStore::JetStream(js) = self {
            js.discard(group_id).await;
        }
    }

    /// Waits until the positions and counts written so far are in PostgreSQL's `relay_sides`, or
    /// `limit` passed (false then). PostgreSQL's store writes them with the frames; JetStream's
    /// behind the relay ([`super::jetstream`]).
    pub async fn settle(&self, limit: Duration) -> bool {
        match self {
            FrameStore::Postgres => true,
            FrameStore::JetStream(js) => js.settle(limit).await,
        }
    }

    /// The group's pipe here ended: what the store remembers of it for speed may go.
    pub fn forget(&self, group_id: Uuid) {
        if let FrameStore::JetStream(js) = self {
            js.forget(group_id);
        }
    }
}
