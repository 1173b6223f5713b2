//! The frames a dongle itself lost, read from its BUS_STATUS counters where it announces the extension.
//!
//! REMP v1 gives a host no word of what a dongle could not carry: frames its receive FIFO missed, and
//! frames it dropped because a queue was full (on the way to the host, or waiting for its bus when a
//! host sends faster than the bus carries). A dongle that announces bus-status counts them. The agent
//! reads the counters of such a dongle every [`EVERY`] while it holds the dongle's token, and counts
//! the increase in its status and, when the dongle is a group side, with the side's dropped frames,
//! which the server shows with the group's figures (`agent_drops`): lost frames are counted and shown,
//! never silent. The first reading only sets the baseline, so what a dongle lost before the agent
//! served it is not counted.

use std::sync::Arc;
use std::time::Duration;

use firmware_proto::ext::BusStatus;

use super::Shared;
use crate::session::DongleSession;

/// How often a grouped dongle's counters are read.
pub const EVERY: Duration = Duration::from_secs(2);

/// The most losses one reading may add: more than a 1 Mbit/s bus carries in [`EVERY`] many times
/// over. A larger jump is no loss a dongle could have had (a counter read wrong, or a report that is
/// not the dongle's), and starts a new baseline instead.
pub const MAX_PER_READING: u64 = 200_000;

/// The counters of the last reading.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Losses {
    last: Option<(u32, u32)>,
}

impl Losses {
    /// The frames lost since the last reading. The counters wrap at 2^32; one that went back by less
    /// than half of that is a dongle that restarted, whose counters since its boot are all new.
    pub fn update(&mut self, status: &BusStatus) -> u64 {
        let now = (status.rx_overflow, status.lost_frames);
        let Some(last) = self.last.replace(now) else {
            return 0;
        };
        let restarted = |before: u32, after: u32| after < before && before - after < 1 << 31;
        let lost = if restarted(last.0, now.0) || restarted(last.1, now.1) {
            u64::from(now.0) + u64::from(now.1)
        } else {
            u64::from(now.0.wrapping_sub(last.0)) + u64::from(now.1.wrapping_sub(last.1))
        };
        if lost > MAX_PER_READING { 0 } else { lost }
    }
}

/// Reads the dongle's counters while its session lives, whenever the agent holds its token.
pub(super) async fn watch(shared: Arc<Shared>, session: Arc<DongleSession>) {
    let device_id = session.device_id();
    let mut losses = Losses::default();
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = session.closed() => return,
            _ = every.tick() => {}
        }
        // The request needs the dongle's token; until it has one, the next reading is the baseline.
        if !shared.ready.lock().unwrap().contains(&device_id) {
            losses = Losses::default();
            continue;
        }
        match session.bus_status().await {
            Ok(status) => {
                let lost = losses.update(&status);
                if lost > 0 {
                    tracing::warn!(%device_id, lost, "the dongle reports frames it lost (a queue was full)");
                    shared.data.dongle_lost(&device_id, lost);
                }
            }
            Err(e) => {
                tracing::debug!(%device_id, error = %e, "could not read the dongle's bus status")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ext::BusStatusAction;

    fn report(rx_overflow: u32, lost_frames: u32) -> BusStatus {
        BusStatus {
            action: BusStatusAction::Report,
            rx_overflow,
            lost_frames,
            ..BusStatus::request()
        }
    }

    #[test]
    fn the_first_reading_is_the_baseline_and_later_ones_count_the_increase() {
        let mut losses = Losses::default();
        assert_eq!(losses.update(&report(5, 100)), 0, "lost before the watch");
        assert_eq!(losses.update(&report(5, 100)), 0);
        assert_eq!(losses.update(&report(7, 130)), 2 + 30);
    }

    #[test]
    fn counters_that_wrap_still_count() {
        let mut losses = Losses::default();
        losses.update(&report(0, u32::MAX - 1));
        assert_eq!(losses.update(&report(0, 3)), 5);
    }

    #[test]
    fn a_restarted_dongles_counters_since_its_boot_are_new_losses() {
        let mut losses = Losses::default();
        losses.update(&report(10, 1000));
        assert_eq!(
            losses.update(&report(0, 4)),
            4,
            "counters back near zero after a restart"
        );
        assert_eq!(losses.update(&report(0, 9)), 5);
    }

    #[test]
    fn a_jump_no_dongle_could_lose_counts_nothing() {
        let mut losses = Losses::default();
        losses.update(&report(0, 0));
        assert_eq!(losses.update(&report(0, 1 << 30)), 0);
        // The jump is the new baseline.
        assert_eq!(losses.update(&report(0, (1 << 30) + 3)), 3);
    }
}
