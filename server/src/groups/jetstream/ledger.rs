//! The positions and counts of the JetStream buffer, written to PostgreSQL behind the relay instead of
//! in its path.
//!
//! A pipe on JetStream waits only for the stream: a write returns once the stream has the frames, an
//! acknowledgement once this instance's index has let them go. What PostgreSQL's `relay_sides` must
//! learn of them (the sender's position, the frames written, the receiver's acknowledgement) is
//! recorded here and written by one task per instance, at most every [`WRITE_EVERY`], each direction's
//! changes merged into one statement or two. Waiting for those row updates in the pipe, one after the
//! other, was most of a cross-instance frame's time in the server (`bench-relay --instances 2 --nats`).
//!
//! # Why nothing is lost when the rows lag
//!
//! - **The sender's position** (`next_in`) may be behind what its agent was acknowledged when this
//!   server dies. A load takes the greater of the row and the end of what the stream holds towards the
//!   other side ([`super::JetStreamBuffer::load`]): every acknowledged frame reached the stream first,
//!   and it leaves the stream only by a purge, which comes after the receiver's acknowledgement is in
//!   the row (below), or by the stream's limits, which keep the newest messages.
//! - **The receiver's acknowledgement** (`acked_out`) is written before the purge it allows, here. When
//!   it is lost, the receiver is sent some frames again and skips them by position.
//! - **A deleted group** is found at the next write of its rows; what it left in the stream is purged,
//!   and the store's next write for it fails as gone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::stream;
use control_proto::data::Side;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::super::buffer::{self, BufferError};
use super::Indexes;

/// How often the rows are written at most. Positions in the rows lag the relay by about this much.
pub(super) const WRITE_EVERY: Duration = Duration::from_millis(50);

/// How long a failed write waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How many deleted groups are remembered, to refuse their writes at once; an older one's writes
/// find it gone at their row update instead.
const GONE_REMEMBERED: usize = 1_024;

/// What one direction's row still has to learn (keyed by the group and the side the frames go to).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Pending {
    /// The sending side's stream is accepted up to here.
    pub(super) source_next_in: Option<u64>,
    /// Frames were written to the stream (their count is taken from the index when the row is written).
    pub(super) wrote: bool,
    /// The receiver's latest acknowledgement.
    pub(super) acked: Option<Acked>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Acked {
    /// Every frame below it was acknowledged.
    pub(super) next: u64,
    /// Frames that left the buffer since the last write of the row.
    pub(super) removed: u64,
    /// Every message of the subject below this stream sequence may be purged.
    pub(super) purge_below: u64,
    /// A purge is due (something left the index).
    pub(super) purge: bool,
}

impl Pending {
    /// Adds what came later; positions only move up.
    fn merge(&mut self, later: Pending) {
        self.source_next_in = match (self.source_next_in, later.source_next_in) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.wrote |= later.wrote;
        self.acked = match (self.acked, later.acked) {
            (Some(a), Some(b)) => Some(Acked {
                next: a.next.max(b.next),
                removed: a.removed + b.removed,
                purge_below: a.purge_below.max(b.purge_below),
                purge: a.purge || b.purge,
            }),
            (a, b) => b.or(a),
        };
    }
}

/// The rows' changes on their way to PostgreSQL, and the writer that takes them there.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    pending: Mutex<HashMap<(Uuid, Side), Pending>>,
    /// Directions taken by the writer and not written yet.
    writing: AtomicUsize,
    wake: Arc<Notify>,
    gone: Mutex<VecDeque<Uuid>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Ledger {
    /// Records a change of a direction's row, and makes sure the writer runs.
    pub(super) fn record(
        self: &Arc<Self>,
        key: (Uuid, Side),
        change: Pending,
        context: impl FnOnce() -> Context,
    ) {
        self.pending
            .lock()
            .expect("ledger lock")
            .entry(key)
            .or_default()
            .merge(change);
        let mut writer = self.writer.lock().expect("ledger lock");
        if writer.as_ref().is_none_or(|w| w.is_finished()) {
            *writer = Some(tokio::spawn(write_rows(Arc::downgrade(self), context())));
        }
        drop(writer);
        self.wake.notify_one();
    }

    /// The acknowledgement recorded here and not written yet, if any.
    pub(super) fn pending_ack(&self, key: (Uuid, Side)) -> Option<u64> {
        let pending = self.pending.lock().expect("ledger lock");
        pending.get(&key).and_then(|p| p.acked).map(|a| a.next)
    }

    /// Waits until what was recorded before the call is written, or `limit` passed (PostgreSQL is
    /// unreachable): at a shutdown, and in tests that read the rows.
    pub(super) async fn settle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        self.wake.notify_one();
        loop {
            let idle = self.pending.lock().expect("ledger lock").is_empty()
                && self.writing.load(Ordering::Acquire) == 0;
            if idle {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Remembers a deleted group, so that its writes are refused.
    pub(super) fn mark_gone(&self, group_id: Uuid) {
        let mut gone = self.gone.lock().expect("ledger lock");
        if !gone.contains(&group_id) {
            if gone.len() == GONE_REMEMBERED {
                gone.pop_front();
            }
            gone.push_back(group_id);
        }
        self.pending
            .lock()
            .expect("ledger lock")
            .retain(|(g, _), _| *g != group_id);
    }

    pub(super) fn is_gone(&self, group_id: Uuid) -> bool {
        self.gone.lock().expect("ledger lock").contains(&group_id)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.get_mut().ok().and_then(Option::take) {
            writer.abort();
        }
    }
}

/// What the writer needs of the store.
pub(super) struct Context {
    pub(super) pool: PgPool,
    pub(super) stream: stream::Stream<()>,
    pub(super) name: String,
    pub(super) indexes: Indexes,
}

/// Writes what the ledger records, at most every [`WRITE_EVERY`], until the ledger is dropped.
async fn write_rows(ledger: Weak<Ledger>, context: Context) {
    let pool = &context.pool;
    loop {
        // Not holding the ledger while waiting, so that a dropped store ends the writer. A wake that
        // came while writing or sleeping is kept by the `Notify`, so this returns at once then.
        let Some(wake) = ledger.upgrade().map(|l| l.wake.clone()) else {
            return;
        };
        wake.notified().await;
        let Some(ledger) = ledger.upgrade() else {
            return;
        };
        let taken: Vec<((Uuid, Side), Pending)> = {
            let mut pending = ledger.pending.lock().expect("ledger lock");
            let taken: Vec<_> = pending.drain().collect();
            ledger.writing.store(taken.len(), Ordering::Release);
            taken
        };
        let mut failed = false;
        for (key, change) in taken {
            let again = match write_one(&context, key, change).await {
                Ok(()) => None,
                Err(Failed::Row(BufferError::Gone)) => {
                    ledger.mark_gone(key.0);
                    super::purge_group(&context.stream, &context.name, key.0).await;
                    None
                }
                Err(Failed::Row(e)) => Some((change, e)),
                Err(Failed::Purge(acked, e)) => Some((
                    Pending {
                        acked: Some(acked),
                        ..Pending::default()
                    },
                    e,
                )),
            };
            if let Some((change, e)) = again {
                if !pool.is_closed() {
                    tracing::warn!(group_id = %key.0, error = %e, "could not record the NATS buffer's positions in the database; retrying");
                }
                failed = true;
                // Written again together with what came meanwhile.
                let mut pending = ledger.pending.lock().expect("ledger lock");
                let mut merged = change;
                if let Some(later) = pending.remove(&key) {
                    merged.merge(later);
                }
                pending.insert(key, merged);
                ledger.wake.notify_one();
            }
            ledger.writing.fetch_sub(1, Ordering::AcqRel);
        }
        drop(ledger);
        if pool.is_closed() {
            return;
        }
        tokio::time::sleep(if failed { RETRY_AFTER } else { WRITE_EVERY }).await;
    }
}

/// How many times a count of the frames waiting is taken again when an acknowledgement moved while it
/// was written; past that, the instance that acknowledged has the last word, as it should.
const RECOUNTS: usize = 3;

/// Why a direction's changes were not all written.
enum Failed {
    /// The rows were not written: everything is to be written again.
    Row(BufferError),
    /// The rows were written, the purge was not: only the purge is to be made again (the frames
    /// delivered must not be added twice).
    Purge(Acked, BufferError),
}

impl From<BufferError> for Failed {
    fn from(e: BufferError) -> Self {
        Failed::Row(e)
    }
}

/// One direction's changes: the rows first, then the purge that the acknowledgement allows. The frames
/// waiting are counted now, not when the change was recorded, above the acknowledgement the row holds
/// ([`recount`]).
async fn write_one(
    context: &Context,
    key @ (group_id, towards): (Uuid, Side),
    change: Pending,
) -> Result<(), Failed> {
    let pool = &context.pool;
    if change.wrote || change.source_next_in.is_some() {
        let acked_out = buffer::record_sent(pool, group_id, towards, change.source_next_in).await?;
        recount(context, key, acked_out).await?;
    }
    if let Some(acked) = change.acked {
        if acked.removed > 0 || acked.next > 0 {
            // The rows made first if the group has none yet (groups made before the relay had
            // rows): an acknowledgement recorded nowhere must not let the purge pass its frames.
            buffer::record_sent(pool, group_id, towards, None).await?;
            buffer::record_acknowledged(pool, group_id, towards, acked.next, None, acked.removed)
                .await?;
            recount(context, key, acked.next).await?;
        }
        // A purge "below 1" purges nothing, but the server reads a sequence of 1 (or 0) as no bound at
        // all and would purge the whole subject.
        if acked.purge && acked.purge_below > 1 {
            let purged = context
                .stream
                .purge()
                .filter(super::subject_of(&context.name, group_id, towards))
                .sequence(acked.purge_below)
                .await;
            if let Err(e) = purged {
                let again = Acked {
                    next: 0,
                    removed: 0,
                    ..acked
                };
                return Err(Failed::Purge(again, super::nats(e)));
            }
        }
    }
    Ok(())
}

/// Writes the frames waiting towards a side, counted by this instance above the row's acknowledgement
/// (first taken to be `acked_out`), taken again when the row's moved meanwhile. Without an index here
/// (the direction's pipe ended), the row's count stays as it is.
async fn recount(
    context: &Context,
    key @ (group_id, towards): (Uuid, Side),
    mut acked_out: u64,
) -> Result<(), BufferError> {
    for _ in 0..RECOUNTS {
        let Some(waiting) = super::count_waiting(context, key, acked_out).await? else {
            return Ok(());
        };
        match buffer::record_waiting(&context.pool, group_id, towards, acked_out, waiting).await? {
            Some(moved) => acked_out = moved,
            None => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_merge_with_positions_that_only_move_up() {
        let mut p = Pending {
            source_next_in: Some(10),
            wrote: true,
            acked: Some(Acked {
                next: 8,
                removed: 2,
                purge_below: 3,
                purge: false,
            }),
        };
        p.merge(Pending {
            source_next_in: Some(7),
            wrote: false,
            acked: Some(Acked {
                next: 5,
                removed: 1,
                purge_below: 2,
                purge: true,
            }),
        });
        assert_eq!(p.source_next_in, Some(10));
        assert!(p.wrote);
        assert_eq!(
            p.acked,
            Some(Acked {
                next: 8,
                removed: 3,
                purge_below: 3,
                purge: true,
            })
        );
        p.merge(Pending::default());
        assert_eq!(p.source_next_in, Some(10));
        assert!(p.acked.is_some());
        let mut q = Pending::default();
        q.merge(Pending {
            source_next_in: Some(2),
            ..Default::default()
        });
        assert_eq!(q.source_next_in, Some(2));
    }

    #[test]
    fn the_deleted_groups_remembered_are_bounded() {
        let ledger = Ledger::default();
        let first = Uuid::new_v4();
        ledger.mark_gone(first);
        for _ in 0..GONE_REMEMBERED {
            ledger.mark_gone(Uuid::new_v4());
        }
        assert!(!ledger.is_gone(first), "the oldest is forgotten");
        assert_eq!(ledger.gone.lock().unwrap().len(), GONE_REMEMBERED);
    }
}
