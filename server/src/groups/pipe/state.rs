//! The group's state as this instance sees it, and what subscribers are told.
//!
//! ACTIVE while both sides' serving agents are connected here and nothing is buffered or waiting to be;
//! DEGRADED otherwise. An instance where neither side is connected leaves the state to the others. The
//! buffer pressure flag is cleared when the group is ACTIVE again, that is when the backlog was
//! delivered (retention emptying a buffer does not end it: frames were lost).

use super::Pipe;
use crate::groups::Mode;
use crate::groups::buffer;
use crate::groups::relay::RelayEvent;

impl Pipe {
    /// The state this instance sees, written when it changed.
    pub(super) async fn evaluate(&mut self) {
        let online = [
            self.towards[0].conn.is_some(),
            self.towards[1].conn.is_some(),
        ];
        if !online[0] && !online[1] {
            // Nothing of this group is connected here: the instances that hold its agents decide.
            return;
        }
        let backlog = self
            .towards
            .iter()
            .any(|t| t.buffered > 0 || !t.pending.is_empty());
        let want = if online[0] && online[1] && !backlog {
            Mode::Active
        } else {
            Mode::Degraded
        };
        // The pressure ends when the backlog has been delivered, not when retention emptied it.
        let clear = want == Mode::Active && self.buffer_pressure;
        if want == self.mode && !clear {
            return;
        }
        let clear = want == Mode::Active;
        match buffer::set_mode(&self.core.pool, self.group_id, want, clear).await {
            Ok(Some(pressure)) => {
                if want != self.mode {
                    tracing::info!(group_id = %self.group_id, from = self.mode.as_str(), to = want.as_str(), "group state");
                }
                self.mode = want;
                self.buffer_pressure = pressure;
                self.announce(true);
            }
            Ok(None) => self.gone = true,
            Err(e) => {
                tracing::warn!(group_id = %self.group_id, error = %e, "could not write a group's state")
            }
        }
    }

    /// Tells subscribers the state and backlog when they changed (`always`: even if only the state).
    pub(super) fn announce(&mut self, always: bool) {
        let now = (
            self.mode,
            self.buffer_pressure,
            self.towards[1].buffered + self.towards[1].pending_frames,
            self.towards[0].buffered + self.towards[0].pending_frames,
        );
        if !always && now == self.announced {
            return;
        }
        self.announced = now;
        self.core.emit(RelayEvent::GroupState {
            group_id: self.group_id,
            state: now.0,
            buffer_pressure: now.1,
            backlog_a_to_b: now.2,
            backlog_b_to_a: now.3,
        });
    }
}
