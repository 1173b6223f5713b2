//! The durable side of the relay: `relay_buffer` (frames waiting for a side) and `relay_sides` (stream
//! positions and counters), with the retention of SPEC 3.8.
//!
//! Every change to a direction's rows runs in one transaction that first locks that direction's counter
//! row (`relay_sides` of the receiving side), so `buffered_frames` always equals the frames in the rows,
//! and instances that share the database (one writing, another delivering) take turns instead of
//! trimming or deleting the same rows twice.

use std::time::Duration;

use control_proto::data::Side;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::chunk::Chunk;
use super::model::{Mode, direction_to};
use crate::audit::{self, Entry, Target};

/// Why a buffer operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    /// The group was deleted meanwhile: whatever was to be written goes with it.
    #[error("the group no longer exists")]
    Gone,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The JetStream buffer (`serve --nats-url`) failed: NATS is down, or the stream is gone.
    #[error("NATS: {0}")]
    Nats(String),
}

/// The PostgreSQL code of a foreign-key violation (the group's rows are gone).
const FOREIGN_KEY_VIOLATION: &str = "23503";

fn classify(e: sqlx::Error) -> BufferError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(FOREIGN_KEY_VIOLATION) => {
            BufferError::Gone
        }
        _ => BufferError::Db(e),
    }
}

/// Retention per direction: whichever limit is reached first.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_frames: u64,
    pub max_age: Duration,
}

/// What an append (or a retention pass) left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Frames of the direction now in the buffer.
    pub buffered: u64,
    /// Frames trimmed by this transaction.
    pub trimmed: u64,
    /// The trim was audited in this transaction (`audit_due` was set and something was trimmed).
    pub audited: bool,
}

/// A position as PostgreSQL stores it. Positions are checked on arrival (see `pipe::MAX_POSITION`), so
/// this never saturates in practice; if it did, the row would sort last instead of wrapping.
fn pos(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Makes sure the side's row exists (groups made before the relay had rows do not).
async fn ensure_side(
    conn: &mut PgConnection,
    group_id: Uuid,
    side: Side,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_sides (group_id, side) VALUES ($1, $2) ON CONFLICT (group_id, side) DO NOTHING",
    )
    .bind(group_id)
    .bind(side.letter())
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks the counter row of the direction towards `target`, returning its `buffered_frames`.
async fn lock_direction(
    conn: &mut PgConnection,
    group_id: Uuid,
    target: Side,
) -> Result<u64, sqlx::Error> {
    ensure_side(conn, group_id, target).await?;
    let buffered: i64 = sqlx::query_scalar(
        "SELECT buffered_frames FROM relay_sides WHERE group_id = $1 AND side = $2 FOR UPDATE",
    )
    .bind(group_id)
    .bind(target.letter())
    .fetch_one(conn)
    .await?;
    Ok(buffered.max(0) as u64)
}

/// Locks both sides' rows of the group, always side A's first, and answers `target`'s buffered frames.
///
/// A write records its sender's position in the other side's row. Two instances each relaying one
/// direction would otherwise lock their own direction's row and then wait for the other's, in opposite
/// orders: a deadlock, which PostgreSQL breaks only after its deadlock timeout (a second) by failing one
/// write. One order for every transaction that locks both rows makes that impossible.
async fn lock_both_directions(
    conn: &mut PgConnection,
    group_id: Uuid,
    target: Side,
) -> Result<u64, sqlx::Error> {
    ensure_side(conn, group_id, Side::A).await?;
    ensure_side(conn, group_id, Side::B).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT side::text, buffered_frames FROM relay_sides WHERE group_id = $1 \
         ORDER BY side FOR UPDATE",
    )
    .bind(group_id)
    .fetch_all(conn)
    .await?;
    let target = target.letter();
    Ok(rows
        .iter()
        .find(|(side, _)| side == target)
        .map_or(0, |(_, buffered)| (*buffered).max(0) as u64))
}

/// One write to a direction's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub group_id: Uuid,
    /// The side the frames go to.
    pub target: Side,
    /// Frames towards `target`, in order (none: a retention pass).
    pub chunks: &'a [Chunk],
    /// The source side's stream is accepted up to here.
    pub source_next_in: Option<u64>,
    pub retention: Retention,
    /// Audit a trim in the same transaction...
    pub audit_due: bool,
    /// ...together with this many frames trimmed earlier whose entry was held back.
    pub carried: u64,
}

/// The NOTIFY channel on which a write to the buffer names its group and direction, so that the
/// instance serving the receiving side (often another one) reads it at once instead of at its next
/// poll ([`super::wake`]).
pub const BUFFERED_CHANNEL: &str = "relay_buffered";

/// The payload of a [`BUFFERED_CHANNEL`] notification: `<group id>:<a|b>`, the side frames go to.
pub fn buffered_payload(group_id: Uuid, towards: Side) -> String {
    format!("{group_id}:{}", towards.letter())
}

/// The payload of a [`BUFFERED_CHANNEL`] notification that says where a side of the group is served
/// changed: `served:<group id>`. The pipes of that group look at their sides again.
pub fn served_payload(group_id: Uuid) -> String {
    format!("served:{group_id}")
}

/// Tells every instance that where a side of `group_id` is served changed, or that the group was
/// activated: the pipes of that group look at its sides, and an instance holding a data connection of
/// one of its agents starts the group's pipe ([`super::relay::Relay::look_at_sides`]). A lost
/// announcement only delays that until the next periodic look or connection.
pub async fn announce_served(pool: &PgPool, group_id: Uuid) {
    let announced = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(BUFFERED_CHANNEL)
        .bind(served_payload(group_id))
        .execute(pool)
        .await;
    if let Err(e) = announced {
        tracing::debug!(%group_id, error = %e, "could not announce where a side is served");
    }
}

/// Reads a [`served_payload`]; None for anything else.
pub fn parse_served_payload(payload: &str) -> Option<Uuid> {
    payload.strip_prefix("served:")?.parse().ok()
}

/// Reads a [`BUFFERED_CHANNEL`] payload; None for anything else.
pub fn parse_buffered_payload(payload: &str) -> Option<(Uuid, Side)> {
    let (group, side) = payload.split_once(':')?;
    Some((group.parse().ok()?, Side::from_letter(side)?))
}

/// Writes the chunks in one transaction, records how far the source side's stream is accepted, and
/// applies retention. When this returns Ok, the frames survive any crash: only then may the sender be
/// acknowledged. Written frames are then announced on [`BUFFERED_CHANNEL`].
pub async fn append(pool: &PgPool, req: Append<'_>) -> Result<Appended, BufferError> {
    let wrote = (!req.chunks.is_empty()).then_some((req.group_id, req.target));
    let mut tx = pool.begin().await.map_err(BufferError::Db)?;
    let result = append_in(&mut tx, req).await;
    match result {
        Ok(appended) => {
            tx.commit().await.map_err(classify)?;
            if let Some((group_id, target)) = wrote {
                announce_buffered(pool, group_id, target).await;
            }
            Ok(appended)
        }
        Err(e) => Err(classify(e)),
    }
}

/// Tells every instance that frames towards `target` of `group_id` are in the buffer now.
///
/// In a statement of its own, after the write's commit: PostgreSQL serialises the commits of all
/// transactions that notify under one lock, held through the commit's flush, so a NOTIFY inside the
/// write would make every group's writes on every instance commit one at a time. This one commits
/// without waiting for the flush (a notification lost in a crash costs a poll), and a failure is only
/// logged: the write is done, and the receiving pipe's poll finds the frames anyway.
async fn announce_buffered(pool: &PgPool, group_id: Uuid, target: Side) {
    let announced =
        sqlx::query("SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)")
            .bind(BUFFERED_CHANNEL)
            .bind(buffered_payload(group_id, target))
            .execute(pool)
            .await;
    if let Err(e) = announced {
        tracing::debug!(%group_id, error = %e, "could not announce buffered frames; the poll will find them");
    }
}

async fn append_in(tx: &mut PgConnection, req: Append<'_>) -> Result<Appended, sqlx::Error> {
    let Append {
        group_id,
        target,
        chunks,
        source_next_in,
        retention,
        audit_due,
        carried,
    } = req;
    let direction = direction_to(target);
    let mut buffered = match source_next_in {
        Some(_) => lock_both_directions(tx, group_id, target).await?,
        None => lock_direction(tx, group_id, target).await?,
    };
    if let Some(next_in) = source_next_in {
        let source = target.other();
        sqlx::query(
            "UPDATE relay_sides SET next_in = GREATEST(next_in, $3) WHERE group_id = $1 AND side = $2",
        )
        .bind(group_id)
        .bind(source.letter())
        .bind(pos(next_in))
        .execute(&mut *tx)
        .await?;
    }
    if !chunks.is_empty() {
        let seqs: Vec<i64> = chunks.iter().map(|c| pos(c.seq)).collect();
        let counts: Vec<i32> = chunks.iter().map(|c| c.count as i32).collect();
        let frames: Vec<&[u8]> = chunks.iter().map(|c| &c.batch[..]).collect();
        // A row already there (the same positions written before a crash) is kept as it is.
        let inserted: i64 = sqlx::query_scalar(
            "WITH ins AS ( \
               INSERT INTO relay_buffer (group_id, direction, seq, frame_count, frames) \
               SELECT $1, $2, s, c, f FROM unnest($3::bigint[], $4::int[], $5::bytea[]) AS r(s, c, f) \
               ON CONFLICT (group_id, direction, seq) DO NOTHING RETURNING frame_count) \
             SELECT coalesce(sum(frame_count), 0)::bigint FROM ins",
        )
        .bind(group_id)
        .bind(direction)
        .bind(&seqs)
        .bind(&counts)
        .bind(&frames)
        .fetch_one(&mut *tx)
        .await?;
        buffered += inserted.max(0) as u64;
    }
    // Retention: first by age, then by count, oldest first.
    let aged: i64 = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM relay_buffer WHERE group_id = $1 AND direction = $2 \
           AND created_at < now() - make_interval(secs => $3) RETURNING frame_count) \
         SELECT coalesce(sum(frame_count), 0)::bigint FROM gone",
    )
    .bind(group_id)
    .bind(direction)
    .bind(retention.max_age.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    let aged = aged.max(0) as u64;
    buffered = buffered.saturating_sub(aged);
    let mut by_count = 0u64;
    while buffered > retention.max_frames {
        let excess = buffered - retention.max_frames;
        let trimmed = trim_oldest(tx, group_id, direction, excess).await?;
        if trimmed == 0 {
            break;
        }
        by_count += trimmed;
        buffered -= trimmed;
    }
    let trimmed = aged + by_count;
    sqlx::query(
        "UPDATE relay_sides SET buffered_frames = $3, frames_trimmed = frames_trimmed + $4 \
         WHERE group_id = $1 AND side = $2",
    )
    .bind(group_id)
    .bind(target.letter())
    .bind(pos(buffered))
    .bind(pos(trimmed))
    .execute(&mut *tx)
    .await?;
    let mut audited = false;
    if trimmed > 0 {
        sqlx::query("UPDATE dongle_groups SET buffer_pressure = true WHERE id = $1")
            .bind(group_id)
            .execute(&mut *tx)
            .await?;
    }
    if audit_due && trimmed + carried > 0 {
        let trim = Trim {
            group_id,
            target,
            frames: trimmed + carried,
            by_age: aged,
            retention,
            buffered,
        };
        record_trim(tx, trim).await?;
        audited = true;
    }
    Ok(Appended {
        buffered,
        trimmed,
        audited,
    })
}

/// Removes up to `excess` of the oldest frames of a direction, cutting the front off a row when only
/// part of it must go. Returns the frames removed.
async fn trim_oldest(
    tx: &mut PgConnection,
    group_id: Uuid,
    direction: &str,
    excess: u64,
) -> Result<u64, sqlx::Error> {
    let rows: Vec<(i64, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, frame_count, frames FROM relay_buffer WHERE group_id = $1 AND direction = $2 \
         ORDER BY seq LIMIT 64",
    )
    .bind(group_id)
    .bind(direction)
    .fetch_all(&mut *tx)
    .await?;
    let mut removed = 0u64;
    for (seq, count, frames) in rows {
        if removed >= excess {
            break;
        }
        let count = count.max(0) as u64;
        let left = excess - removed;
        let delete = || {
            sqlx::query(
                "DELETE FROM relay_buffer WHERE group_id = $1 AND direction = $2 AND seq = $3",
            )
            .bind(group_id)
            .bind(direction)
            .bind(seq)
        };
        if count <= left {
            delete().execute(&mut *tx).await?;
            removed += count;
            continue;
        }
        let chunk = Chunk {
            seq: seq.max(0) as u64,
            count: count as u32,
            batch: frames.into(),
        };
        match chunk.skip(left as u32) {
            Some(rest) => {
                sqlx::query(
                    "UPDATE relay_buffer SET seq = $4, frame_count = $5, frames = $6 \
                     WHERE group_id = $1 AND direction = $2 AND seq = $3",
                )
                .bind(group_id)
                .bind(direction)
                .bind(seq)
                .bind(pos(rest.seq))
                .bind(rest.count as i32)
                .bind(&rest.batch[..])
                .execute(&mut *tx)
                .await?;
                removed += left;
            }
            // A row that does not parse cannot be cut: it goes whole.
            None => {
                delete().execute(&mut *tx).await?;
                removed += count;
            }
        }
    }
    Ok(removed)
}

/// A trim to audit.
struct Trim {
    group_id: Uuid,
    target: Side,
    frames: u64,
    by_age: u64,
    retention: Retention,
    buffered: u64,
}

async fn record_trim(tx: &mut PgConnection, trim: Trim) -> Result<(), sqlx::Error> {
    let Trim {
        group_id,
        target,
        frames,
        by_age,
        retention,
        buffered,
    } = trim;
    audit::record(
        &mut *tx,
        Entry {
            actor: None,
            action: "group.buffer_trim",
            target: Some(Target {
                kind: "group",
                id: group_id.to_string(),
            }),
            ip: None,
            user_agent: None,
            details: serde_json::json!({
                "direction": direction_to(target),
                "count": frames,
                "by_age": by_age,
                "max_frames": retention.max_frames,
                "max_age_secs": retention.max_age.as_secs(),
                "buffered_after": buffered,
            }),
        },
    )
    .await?;
    Ok(())
}

/// Audits frames trimmed earlier whose entry was held back (see `RelaySettings::trim_audit_interval`).
pub async fn audit_trim(
    pool: &PgPool,
    group_id: Uuid,
    target: Side,
    frames: u64,
    retention: Retention,
) -> Result<(), BufferError> {
    let mut conn = pool.acquire().await?;
    let buffered = sqlx::query_scalar::<_, i64>(
        "SELECT buffered_frames FROM relay_sides WHERE group_id = $1 AND side = $2",
    )
    .bind(group_id)
    .bind(target.letter())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(BufferError::Gone)?;
    let trim = Trim {
        group_id,
        target,
        frames,
        by_age: 0,
        retention,
        buffered: buffered.max(0) as u64,
    };
    record_trim(&mut conn, trim).await.map_err(classify)
}

/// What an acknowledgement did to a direction's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    /// Frames that left the buffer.
    pub removed: u64,
    /// Frames still in it.
    pub buffered: u64,
}

/// The receiving agent of `target` acknowledged every frame below `next`: rows wholly below it leave
/// the buffer, and `acked_out` moves up.
pub async fn acknowledge(
    pool: &PgPool,
    group_id: Uuid,
    target: Side,
    next: u64,
) -> Result<Acknowledged, BufferError> {
    let mut tx = pool.begin().await?;
    let buffered = lock_direction(&mut tx, group_id, target)
        .await
        .map_err(classify)?;
    let removed: i64 = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM relay_buffer WHERE group_id = $1 AND direction = $2 \
           AND seq < $3 AND seq + frame_count <= $3 RETURNING frame_count) \
         SELECT coalesce(sum(frame_count), 0)::bigint FROM gone",
    )
    .bind(group_id)
    .bind(direction_to(target))
    .bind(pos(next))
    .fetch_one(&mut *tx)
    .await?;
    let removed = removed.max(0) as u64;
    let left = buffered.saturating_sub(removed);
    record_acknowledged(&mut *tx, group_id, target, next, Some(left), removed).await?;
    tx.commit().await.map_err(classify)?;
    Ok(Acknowledged {
        removed,
        buffered: buffered.saturating_sub(removed),
    })
}

/// Up to `limit` buffered chunks towards `target` from position `from` on, in order.
pub async fn fetch(
    pool: &PgPool,
    group_id: Uuid,
    target: Side,
    from: u64,
    limit: i64,
) -> Result<Vec<Chunk>, BufferError> {
    let rows: Vec<(i64, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, frame_count, frames FROM relay_buffer WHERE group_id = $1 AND direction = $2 \
         AND seq >= $3 ORDER BY seq LIMIT $4",
    )
    .bind(group_id)
    .bind(direction_to(target))
    .bind(pos(from))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, count, _)| *count > 0)
        .map(|(seq, count, frames)| Chunk {
            seq: seq.max(0) as u64,
            count: count as u32,
            batch: frames.into(),
        })
        .collect())
}

/// Records a write to a buffer kept elsewhere (the JetStream buffer): how far the source side's stream is
/// accepted. Answers how far the receiver of `target` acknowledged, for [`record_waiting`]. A deleted
/// group is [`BufferError::Gone`].
///
/// Both sides' rows are taken in one statement, side A's first, as every write does: an instance
/// writing towards B and another writing towards A at the same moment would otherwise each hold one
/// row and wait for the other's, until PostgreSQL broke the deadlock a second later.
pub async fn record_sent(
    pool: &PgPool,
    group_id: Uuid,
    target: Side,
    source_next_in: Option<u64>,
) -> Result<u64, BufferError> {
    let next_in = |side: Side| {
        if side == target {
            0
        } else {
            pos(source_next_in.unwrap_or(0))
        }
    };
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO relay_sides (group_id, side, next_in) VALUES ($1, 'a', $2), ($1, 'b', $3) \
         ON CONFLICT (group_id, side) DO UPDATE SET \
           next_in = GREATEST(relay_sides.next_in, EXCLUDED.next_in) \
         RETURNING side::text, acked_out",
    )
    .bind(group_id)
    .bind(next_in(Side::A))
    .bind(next_in(Side::B))
    .fetch_all(pool)
    .await
    .map_err(classify)?;
    let target = target.letter();
    Ok(rows
        .iter()
        .find(|(side, _)| side == target)
        .map_or(0, |(_, acked_out)| (*acked_out).max(0) as u64))
}

/// Sets the frames waiting towards `target`, counted by a buffer kept elsewhere above the
/// acknowledgement `counted_above`, unless the acknowledgement moved meanwhile: then the count is
/// stale, and the answer is the new acknowledgement to count above. Several instances count one
/// direction (the one writing it and the one sending it), and this keeps a count taken before an
/// acknowledgement from overwriting one taken after it.
pub async fn record_waiting(
    pool: &PgPool,
    group_id: Uuid,
    target: Side,
    counted_above: u64,
    waiting: u64,
) -> Result<Option<u64>, BufferError> {
    let acked_out: Option<i64> = sqlx::query_scalar(
        "UPDATE relay_sides SET buffered_frames = CASE WHEN acked_out = $3 THEN $4 \
           ELSE buffered_frames END WHERE group_id = $1 AND side = $2 RETURNING acked_out",
    )
    .bind(group_id)
    .bind(target.letter())
    .bind(pos(counted_above))
    .bind(pos(waiting))
    .fetch_optional(pool)
    .await
    .map_err(classify)?;
    Ok(acked_out
        .map(|a| a.max(0) as u64)
        .filter(|a| *a != counted_above))
}

/// Records an acknowledgement of the frames towards `target` below `next` in its side's row: `removed`
/// frames left the buffer and `buffered` (when counted) are still waiting. The PostgreSQL store calls it
/// inside the transaction that deleted the rows, the JetStream store before its purge.
pub async fn record_acknowledged(
    db: impl sqlx::PgExecutor<'_>,
    group_id: Uuid,
    target: Side,
    next: u64,
    buffered: Option<u64>,
    removed: u64,
) -> Result<(), BufferError> {
    // Without a count, the row's stays: JetStream's store counts after this, above the row's
    // acknowledgement (`record_waiting`), which a pipe's flush may have moved past `next`.
    let updated = sqlx::query(
        "UPDATE relay_sides SET acked_out = GREATEST(acked_out, $3), \
           buffered_frames = coalesce($4, buffered_frames), \
           frames_delivered = frames_delivered + $5 WHERE group_id = $1 AND side = $2",
    )
    .bind(group_id)
    .bind(target.letter())
    .bind(pos(next))
    .bind(buffered.map(pos))
    .bind(pos(removed))
    .execute(db)
    .await
    .map_err(classify)?;
    // The rows go only with their group: without them, the acknowledgement is recorded nowhere.
    if updated.rows_affected() == 0 {
        return Err(BufferError::Gone);
    }
    Ok(())
}

/// What the database holds about one side (index 0 is A).
#[derive(Debug, Clone, Copy, Default)]
pub struct SideRow {
    /// The stream from this side.
    pub next_in: u64,
    pub agent_drops_last: u64,
    /// The stream towards this side.
    pub acked_out: u64,
    pub buffered: u64,
    /// The position after the last buffered frame towards this side (0 when none).
    pub tail: u64,
}

/// Reads both sides' rows and the end of each direction's buffer.
pub async fn load(pool: &PgPool, group_id: Uuid) -> Result<[SideRow; 2], BufferError> {
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.side::text, r.next_in, r.agent_drops_last, r.acked_out, r.buffered_frames, \
           coalesce((SELECT max(b.seq + b.frame_count) FROM relay_buffer b WHERE b.group_id = r.group_id \
             AND b.direction = CASE r.side WHEN 'a' THEN 'b_to_a' ELSE 'a_to_b' END), 0) \
         FROM relay_sides r WHERE r.group_id = $1",
    )
    .bind(group_id)
    .fetch_all(pool)
    .await?;
    let mut out = [SideRow::default(); 2];
    for (side, next_in, drops_last, acked_out, buffered, tail) in rows {
        let i = if side == "a" { 0 } else { 1 };
        out[i] = SideRow {
            next_in: next_in.max(0) as u64,
            agent_drops_last: drops_last.max(0) as u64,
            acked_out: acked_out.max(0) as u64,
            buffered: buffered.max(0) as u64,
            tail: tail.max(0) as u64,
        };
    }
    Ok(out)
}

/// Counter increments of one side to add to its row (positions only ever move up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideCounters {
    /// The stream from this side is acknowledged up to here.
    pub next_in: u64,
    pub frames_received: u64,
    pub agent_drops: u64,
    pub agent_drops_last: u64,
    /// Frames towards this side acknowledged straight from memory (never buffered).
    pub frames_delivered: u64,
    pub acked_out: u64,
}

/// Adds a side's counters; positions only move up, so a stale writer never moves one back.
pub async fn flush_counters(
    pool: &PgPool,
    group_id: Uuid,
    side: Side,
    c: SideCounters,
) -> Result<(), BufferError> {
    sqlx::query(
        "INSERT INTO relay_sides (group_id, side, next_in, frames_received, agent_drops, agent_drops_last, \
           frames_delivered, acked_out) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (group_id, side) DO UPDATE SET \
           next_in = GREATEST(relay_sides.next_in, EXCLUDED.next_in), \
           frames_received = relay_sides.frames_received + EXCLUDED.frames_received, \
           agent_drops = relay_sides.agent_drops + EXCLUDED.agent_drops, \
           agent_drops_last = EXCLUDED.agent_drops_last, \
           frames_delivered = relay_sides.frames_delivered + EXCLUDED.frames_delivered, \
           acked_out = GREATEST(relay_sides.acked_out, EXCLUDED.acked_out)",
    )
    .bind(group_id)
    .bind(side.letter())
    .bind(pos(c.next_in))
    .bind(pos(c.frames_received))
    .bind(pos(c.agent_drops))
    .bind(pos(c.agent_drops_last))
    .bind(pos(c.frames_delivered))
    .bind(pos(c.acked_out))
    .execute(pool)
    .await
    .map_err(classify)?;
    Ok(())
}

/// Moves a relaying group between ACTIVE, DEGRADED and CROSS_INSTANCE, and clears its buffer pressure
/// when asked.
/// A group that was deactivated or deleted meanwhile is left alone: None.
pub async fn set_mode(
    pool: &PgPool,
    group_id: Uuid,
    mode: Mode,
    clear_pressure: bool,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE dongle_groups SET mode = $2::text::group_mode, \
           buffer_pressure = buffer_pressure AND NOT $3 \
         WHERE id = $1 AND mode IN ('ACTIVE', 'DEGRADED', 'CROSS_INSTANCE') RETURNING buffer_pressure",
    )
    .bind(group_id)
    .bind(mode.as_str())
    .bind(clear_pressure)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_kinds_of_notification_are_never_taken_for_each_other() {
        let group_id = Uuid::new_v4();
        let buffered = buffered_payload(group_id, Side::B);
        let served = served_payload(group_id);
        assert_eq!(parse_buffered_payload(&buffered), Some((group_id, Side::B)));
        assert_eq!(parse_served_payload(&served), Some(group_id));
        assert_eq!(parse_buffered_payload(&served), None);
        assert_eq!(parse_served_payload(&buffered), None);
        assert_eq!(parse_served_payload("served:not-a-uuid"), None);
    }
}
