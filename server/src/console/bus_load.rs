//! How busy each dongle's bus is, from the frames the server sees of it (the relay's, for grouped
//! dongles; the agent's counted sample, for watched ones): frames per second, and the share of the bus
//! they take at its bitrate, estimated from each frame's length with bit stuffing.
//!
//! The estimate of one frame's bits: its fields (start of frame to the end of the frame, and the
//! interframe space: 47 bits plus the data for an 11-bit identifier, 67 for a 29-bit one), and half of
//! the worst-case stuff bits (one per four bits of the stuffed part), which is what random data needs on
//! average. A CAN FD frame's data phase may run faster than the nominal bitrate; it is counted at the
//! nominal one, so the figure errs high for FD.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use firmware_proto::bus_time::{FrameShape, typical_bits};
use uuid::Uuid;

/// The estimated bits one frame takes on the bus (`firmware_proto::bus_time::typical_bits`); a frame
/// longer than 8 bytes is a CAN FD one.
pub fn frame_bits(extended: bool, len: usize) -> u64 {
    let shape = FrameShape {
        extended,
        fd: len > 8,
        brs: false,
        len: len.min(64) as u8,
    };
    u64::from(typical_bits(shape).total())
}

/// One dongle's figures over the last period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub frames_per_sec: f64,
    pub bits_per_sec: f64,
}

impl Rate {
    /// The share of a bus at `bitrate` these frames take, in percent.
    pub fn load_percent(&self, bitrate: u32) -> f64 {
        if bitrate == 0 {
            return 0.0;
        }
        100.0 * self.bits_per_sec / f64::from(bitrate)
    }
}

/// Frames and bits per dongle since the last [`BusMeter::take`].
///
/// Several instances may each see part of one dongle's traffic (the relay on one, frames sent by hand
/// on another). An instance counts what it sees and, while sharing is on, also keeps it for the
/// instances whose clients watch the dongle (`console::peers`), which add it with
/// [`BusMeter::add_from_peer`]: so every instance's figure covers all of it, and nothing is counted
/// twice, since counts from a peer are never shared on.
#[derive(Default)]
pub struct BusMeter {
    counts: Mutex<HashMap<Uuid, (u64, u64)>>,
    /// What this instance saw since the last [`BusMeter::take_shared`], while sharing is on.
    shared: Mutex<Option<HashMap<Uuid, (u64, u64)>>>,
}

/// The most dongles counted between two takes; past it new ones are not counted until the next take.
const MAX_DONGLES: usize = 100_000;

fn count(counts: &mut HashMap<Uuid, (u64, u64)>, dongle_id: Uuid, frames: u64, bits: u64) {
    if counts.len() >= MAX_DONGLES && !counts.contains_key(&dongle_id) {
        return;
    }
    let c = counts.entry(dongle_id).or_default();
    c.0 = c.0.saturating_add(frames);
    c.1 = c.1.saturating_add(bits);
}

impl BusMeter {
    /// Counts `frames` frames of `bits` bits in all on dongle `dongle_id`'s bus.
    pub fn add(&self, dongle_id: Uuid, frames: u64, bits: u64) {
        count(
            &mut self.counts.lock().expect("meter lock"),
            dongle_id,
            frames,
            bits,
        );
        if let Some(shared) = &mut *self.shared.lock().expect("meter lock") {
            count(shared, dongle_id, frames, bits);
        }
    }

    /// Counts what another instance saw of dongle `dongle_id`'s bus.
    pub fn add_from_peer(&self, dongle_id: Uuid, frames: u64, bits: u64) {
        count(
            &mut self.counts.lock().expect("meter lock"),
            dongle_id,
            frames,
            bits,
        );
    }

    /// Starts keeping what this instance sees for other instances.
    pub fn share(&self) {
        self.shared
            .lock()
            .expect("meter lock")
            .get_or_insert_with(HashMap::new);
    }

    /// What this instance saw since the last call (frames and bits per dongle), when sharing is on.
    pub fn take_shared(&self) -> HashMap<Uuid, (u64, u64)> {
        self.shared
            .lock()
            .expect("meter lock")
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The rates over `period` of every dongle counted in it, and starts counting anew.
    pub fn take(&self, period: Duration) -> HashMap<Uuid, Rate> {
        let counts = std::mem::take(&mut *self.counts.lock().expect("meter lock"));
        let secs = period.as_secs_f64().max(1e-3);
        counts
            .into_iter()
            .map(|(id, (frames, bits))| {
                (
                    id,
                    Rate {
                        frames_per_sec: frames as f64 / secs,
                        bits_per_sec: bits as f64 / secs,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frames_bits_are_its_fields_and_half_the_worst_stuffing() {
        // 8 data bytes, 11-bit id: 98 stuffed bits (24 stuff bits at worst), 111 without stuffing.
        assert_eq!(frame_bits(false, 8), 98 + 13 + 24 / 2);
        // An empty extended frame: 54 + 13 + 13 / 2.
        assert_eq!(frame_bits(true, 0), 54 + 13 + 6);
        assert!(frame_bits(true, 8) > frame_bits(false, 8));
    }

    #[test]
    fn rates_are_per_second_and_a_take_starts_anew() {
        let meter = BusMeter::default();
        let dongle = Uuid::new_v4();
        // 1 000 frames of 8 bytes in 2 s at 500 kbit/s.
        meter.add(dongle, 1000, 1000 * frame_bits(false, 8));
        let rates = meter.take(Duration::from_secs(2));
        let rate = rates[&dongle];
        assert_eq!(rate.frames_per_sec, 500.0);
        let load = rate.load_percent(500_000);
        assert!((12.0..13.0).contains(&load), "{load}");
        assert!(meter.take(Duration::from_secs(2)).is_empty());
    }
}
