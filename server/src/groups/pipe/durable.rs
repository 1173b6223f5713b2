//! The pipe's work with the database: writing waiting frames (and only then acknowledging their
//! sender), applying acknowledgements to the buffer, retention and its audit, the paced replay of the
//! buffer to a side that is connected, and the counters.

use std::time::Duration;

use tokio::time::Instant;

use super::{DB_RETRY, Pipe, REPLAY_BACKOFF, REPLAY_ROWS, RETENTION_EVERY, SIDES};
use crate::groups::buffer::{self, Append, BufferError, Retention, SideCounters};
use crate::groups::relay::SendError;
use control_proto::data;
use std::sync::atomic::Ordering;

impl Pipe {
    /// Deletes what the side acknowledged from the buffer. False when the database failed.
    pub(super) async fn apply_ack(&mut self, t: usize, n: u64) -> bool {
        match buffer::acknowledge(&self.core.pool, self.group_id, SIDES[t], n).await {
            Ok(buffer::Acknowledged { removed, buffered }) => {
                // The database's count: another instance may have written to this buffer.
                let towards = &mut self.towards[t];
                towards.buffered = buffered;
                self.dirty();
                let stats = &self.core.stats;
                stats.add(
                    &stats.frames_delivered,
                    "relay_frames_delivered_total",
                    removed,
                );
                true
            }
            Err(BufferError::Gone) => {
                self.gone = true;
                false
            }
            Err(BufferError::Db(e)) => {
                tracing::warn!(group_id = %self.group_id, error = %e, "could not apply an acknowledgement to the buffer");
                let towards = &mut self.towards[t];
                towards.db_ack = Some(towards.db_ack.unwrap_or(0).max(n));
                towards.retry_at = Some(Instant::now() + DB_RETRY);
                self.check_pool();
                false
            }
        }
    }

    /// Writes the waiting frames towards `t`, then acknowledges their sender.
    pub(super) async fn commit(&mut self, t: usize) {
        let s = 1 - t;
        let now = Instant::now();
        let settings = &self.core.settings;
        let towards = &self.towards[t];
        let audit_due = towards
            .last_trim_audit
            .is_none_or(|last| now >= last + settings.trim_audit_interval);
        let next_in = self.from[s].next_in;
        let result = buffer::append(
            &self.core.pool,
            Append {
                group_id: self.group_id,
                target: SIDES[t],
                chunks: &towards.pending,
                source_next_in: Some(next_in),
                retention: self.retention_limits(),
                audit_due,
                carried: towards.trimmed_unaudited,
            },
        )
        .await;
        match result {
            Ok(appended) => {
                let written = self.towards[t].pending_frames;
                let towards = &mut self.towards[t];
                if let Some(last) = towards.pending.last() {
                    towards.tail = towards.tail.max(last.end());
                }
                towards.pending.clear();
                towards.pending_frames = 0;
                towards.pending_since = None;
                towards.buffered = appended.buffered;
                self.trimmed(t, appended, now);
                let stats = &self.core.stats;
                stats.add(
                    &stats.frames_buffered,
                    "relay_frames_buffered_total",
                    written,
                );
                let source = &mut self.from[s];
                source.acked_in = source.acked_in.max(next_in);
                self.shared.acked_in[s].store(source.acked_in, Ordering::Relaxed);
                if let Some(agent) = source.ack_to.take() {
                    let ack = data::encode_ack(self.group_id, SIDES[s], source.acked_in);
                    self.core.send_lossy(agent, ack);
                }
                self.dirty();
            }
            Err(BufferError::Gone) => self.gone = true,
            Err(BufferError::Db(e)) => {
                tracing::warn!(group_id = %self.group_id, error = %e, "could not write frames to the buffer; retrying");
                self.towards[t].retry_at = Some(Instant::now() + DB_RETRY);
                self.check_pool();
            }
        }
    }

    pub(super) fn retention_limits(&self) -> Retention {
        Retention {
            max_frames: self.core.settings.buffer_max_frames,
            max_age: self.core.settings.buffer_max_age,
        }
    }

    /// Books a write's or a retention pass's trim.
    pub(super) fn trimmed(&mut self, t: usize, appended: buffer::Appended, now: Instant) {
        let towards = &mut self.towards[t];
        if appended.audited {
            towards.trimmed_unaudited = 0;
            towards.last_trim_audit = Some(now);
        } else {
            towards.trimmed_unaudited += appended.trimmed;
        }
        if appended.trimmed > 0 {
            self.buffer_pressure = true;
            let stats = &self.core.stats;
            stats.add(
                &stats.frames_trimmed,
                "relay_frames_trimmed_total",
                appended.trimmed,
            );
            tracing::warn!(group_id = %self.group_id, direction = crate::groups::direction_to(SIDES[t]),
                frames = appended.trimmed, "the relay buffer is full: trimmed the oldest frames");
        }
    }

    /// Retention on a buffer nobody writes to, and trim entries that were held back.
    pub(super) async fn retention(&mut self, t: usize, now: Instant) {
        let settings = &self.core.settings;
        let towards = &self.towards[t];
        let pass_due = towards.buffered > 0 && towards.retention_at.is_none_or(|r| now >= r);
        let audit_due = towards.trimmed_unaudited > 0
            && towards
                .last_trim_audit
                .is_none_or(|l| now >= l + settings.trim_audit_interval);
        if pass_due {
            self.towards[t].retention_at = Some(now + RETENTION_EVERY);
            let result = buffer::append(
                &self.core.pool,
                Append {
                    group_id: self.group_id,
                    target: SIDES[t],
                    chunks: &[],
                    source_next_in: None,
                    retention: self.retention_limits(),
                    audit_due,
                    carried: self.towards[t].trimmed_unaudited,
                },
            )
            .await;
            match result {
                Ok(appended) => {
                    self.towards[t].buffered = appended.buffered;
                    self.trimmed(t, appended, now);
                }
                Err(BufferError::Gone) => self.gone = true,
                Err(BufferError::Db(e)) => {
                    tracing::warn!(group_id = %self.group_id, error = %e, "could not apply the buffer's retention")
                }
            }
        } else if audit_due {
            let frames = self.towards[t].trimmed_unaudited;
            match buffer::audit_trim(
                &self.core.pool,
                self.group_id,
                SIDES[t],
                frames,
                self.retention_limits(),
            )
            .await
            {
                Ok(()) => {
                    self.towards[t].trimmed_unaudited = 0;
                    self.towards[t].last_trim_audit = Some(now);
                }
                Err(BufferError::Gone) => self.gone = true,
                Err(BufferError::Db(e)) => {
                    tracing::warn!(group_id = %self.group_id, error = %e, "could not audit a buffer trim")
                }
            }
        }
    }

    /// Sends buffered frames to the side's connection, in order, within the replay rate.
    pub(super) async fn replay(&mut self, t: usize) {
        let now = Instant::now();
        let settings = &self.core.settings;
        let towards = &self.towards[t];
        let Some((agent, conn)) = towards.conn else {
            return;
        };
        let wanted = if towards.tail > towards.cursor {
            towards.replay_at.is_none_or(|at| now >= at)
        } else {
            self.sender_elsewhere(t) && towards.poll_at.is_none_or(|at| now >= at)
        };
        if !wanted {
            return;
        }
        let rate = u64::from(settings.replay_rate.max(1));
        // One step sends about a twentieth of a second's worth (at least one chunk).
        let budget = (rate / 20).max(1);
        let cursor = towards.cursor;
        let chunks = match buffer::fetch(
            &self.core.pool,
            self.group_id,
            SIDES[t],
            cursor,
            REPLAY_ROWS,
        )
        .await
        {
            Ok(chunks) => chunks,
            Err(BufferError::Gone) => {
                self.gone = true;
                return;
            }
            Err(BufferError::Db(e)) => {
                tracing::warn!(group_id = %self.group_id, error = %e, "could not read the buffer to replay it");
                self.towards[t].replay_at = Some(now + DB_RETRY);
                return;
            }
        };
        let towards = &mut self.towards[t];
        // At least these are buffered (another instance may have written them), so the side's
        // acknowledgement must reach the buffer.
        let fetched: u64 = chunks.iter().map(|c| u64::from(c.count)).sum();
        towards.buffered = towards.buffered.max(fetched);
        if chunks.is_empty() {
            // Sent it all (or what was left was acknowledged or trimmed meanwhile). Polls that find
            // nothing come less and less often.
            towards.tail = towards.cursor;
            let every = towards.poll_every.map_or(settings.poll_interval, |e| {
                (e * 2).min(settings.poll_interval * 16)
            });
            towards.poll_every = Some(every);
            towards.poll_at = Some(now + every);
            return;
        }
        let mut sent = 0u64;
        let mut next_at = None;
        for chunk in chunks {
            if sent >= budget {
                break;
            }
            let message = data::encode_frames(self.group_id, SIDES[t], chunk.seq, &chunk.batch);
            match self.core.send_on(agent, conn, message) {
                Ok(()) => {
                    towards.cursor = chunk.end();
                    towards.sent_upto = towards.sent_upto.max(chunk.end());
                    towards.tail = towards.tail.max(chunk.end());
                    sent += u64::from(chunk.count);
                }
                Err(SendError::Offline) => {
                    // The connection changed under us (nothing went to the new one): the next look
                    // starts over.
                    break;
                }
                Err(SendError::Full) => {
                    next_at = Some(now + REPLAY_BACKOFF);
                    break;
                }
            }
        }
        let pace = Duration::from_secs_f64(sent as f64 / rate as f64);
        // Paced from when this step was due rather than from when it ran: the timer wakes the pipe a
        // little late every time, and counting from `now` would add that up into a rate about 2 %
        // under the set one. A step that ran far behind its time (a busy pipe) starts afresh instead
        // of sending a burst to catch up.
        let due = towards
            .replay_at
            .filter(|at| *at <= now && now - *at < pace)
            .unwrap_or(now);
        towards.replay_at = Some(next_at.unwrap_or(due + pace));
        towards.poll_every = None;
        towards.poll_at = Some(now + settings.poll_interval);
        if self.core.conn_of(agent) != Some(conn) {
            self.look_at_connections();
        }
    }

    /// Writes counters and positions that changed.
    pub(super) async fn flush(&mut self) {
        self.flush_at = None;
        for (i, side) in SIDES.into_iter().enumerate() {
            let counters = SideCounters {
                next_in: self.from[i].acked_in,
                frames_received: self.from[i].received,
                agent_drops: self.from[i].drops,
                agent_drops_last: self.from[i].drops_last,
                frames_delivered: self.towards[i].delivered,
                acked_out: self.towards[i].acked_out,
            };
            match buffer::flush_counters(&self.core.pool, self.group_id, side, counters).await {
                Ok(()) => {
                    self.from[i].received -= counters.frames_received;
                    self.from[i].drops -= counters.agent_drops;
                    self.towards[i].delivered -= counters.frames_delivered;
                }
                Err(BufferError::Gone) => {
                    self.gone = true;
                    return;
                }
                Err(BufferError::Db(e)) => {
                    tracing::warn!(group_id = %self.group_id, error = %e, "could not write a group's counters");
                    self.dirty();
                    self.check_pool();
                }
            }
        }
        self.announce(false);
    }

    /// A closed pool means this server is gone (stopped or killed): the pipe ends.
    pub(super) fn check_pool(&mut self) {
        if self.core.pool.is_closed() {
            self.gone = true;
        }
    }
}
