//! Fault injection on the dongle's outgoing link traffic.
//!
//! Faults act where a real link fails: between the dongle and the host. Each outgoing packet
//! (answers, ANNOUNCEs and frames alike) is, in this order: dropped with `drop_pct` percent
//! probability; delayed by `delay`; preceded by a burst of garbage when `garbage` is on; and
//! corrupted with `corrupt_pct` percent probability. On a byte stream a garbage burst is
//! 1..=32 random non-zero bytes and a 0x00 (a rejected frame for the host's decoder), and a
//! corruption flips bits of one byte of the encoded frame without creating a 0x00 (so the
//! host's CRC check catches it). On UDP a garbage burst is an extra datagram of random bytes,
//! and a corruption flips one byte of the datagram (REMP has no checksum of its own, so a
//! host may decode it with wrong contents, as on a real LAN without the UDP checksum).

use std::time::Duration;

use rand::{Rng, RngExt};

/// The faults to inject; the default injects none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Send a burst of garbage before every outgoing packet.
    pub garbage: bool,
    /// Percentage (0..=100) of outgoing packets corrupted.
    pub corrupt_pct: u8,
    /// Percentage (0..=100) of outgoing packets dropped.
    pub drop_pct: u8,
    /// Delay before every outgoing packet.
    pub delay: Duration,
}

/// What to do with one outgoing packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Do not send it.
    pub drop: bool,
    /// Send garbage before it.
    pub garbage: bool,
    /// Corrupt it.
    pub corrupt: bool,
}

impl Faults {
    /// Whether any fault is on.
    pub fn any(&self) -> bool {
        *self != Faults::default()
    }

    /// Draws the fate of one packet.
    pub fn decide(&self, rng: &mut impl Rng) -> Decision {
        let roll = |pct: u8, rng: &mut dyn FnMut() -> u8| pct > 0 && rng() < pct.min(100);
        let mut draw = || rng.random_range(0..100u8);
        Decision {
            drop: roll(self.drop_pct, &mut draw),
            garbage: self.garbage,
            corrupt: roll(self.corrupt_pct, &mut draw),
        }
    }
}

/// A garbage burst for a byte stream: random non-zero bytes, then a 0x00.
pub fn stream_garbage(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    let len = len.clamp(1, 4096);
    let mut out: Vec<u8> = (0..len).map(|_| rng.random_range(1..=255u8)).collect();
    out.push(0);
    out
}

/// A garbage datagram: 1..=64 random bytes that start with neither packet magic.
pub fn datagram_garbage(rng: &mut impl Rng) -> Vec<u8> {
    let len = rng.random_range(1..=64usize);
    let mut out: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    if let Some(first) = out.first_mut() {
        *first = b'#';
    }
    out
}

/// Replaces one byte of an encoded stream frame with another non-zero value, never touching the
/// final terminator, so the frame stays one frame and fails its CRC or COBS check.
pub fn corrupt_stream_frame(frame: &mut [u8], rng: &mut impl Rng) {
    let body = frame.len().saturating_sub(1);
    if body == 0 {
        return;
    }
    let index = rng.random_range(0..body);
    if let Some(byte) = frame.get_mut(index) {
        *byte = other_nonzero_byte(*byte, rng);
    }
}

/// A value in 1..=255 that differs from `byte`, uniformly: drawing from 254 values and stepping
/// over `byte` means the damage is certain (an XOR with a random mask could cancel itself out).
fn other_nonzero_byte(byte: u8, rng: &mut impl Rng) -> u8 {
    let value = rng.random_range(1..=254u8);
    if byte != 0 && value >= byte {
        value + 1
    } else {
        value
    }
}

/// Flips bits of one byte of a datagram.
pub fn corrupt_datagram(datagram: &mut [u8], rng: &mut impl Rng) {
    if datagram.is_empty() {
        return;
    }
    let index = rng.random_range(0..datagram.len());
    if let Some(byte) = datagram.get_mut(index) {
        *byte ^= rng.random_range(1..=255u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupted_byte_always_changes_and_never_becomes_a_delimiter() {
        let mut rng = rand::rng();
        for byte in 0..=255u8 {
            for _ in 0..200 {
                let damaged = other_nonzero_byte(byte, &mut rng);
                assert!(
                    damaged != byte && damaged != 0,
                    "{byte:#04x} -> {damaged:#04x}"
                );
            }
        }
    }
    use firmware_proto::stream::{StreamDecoder, encode_frame};

    #[test]
    fn corrupted_frames_and_garbage_are_rejected_by_a_decoder() {
        let mut rng = rand::rng();
        let mut decoder: StreamDecoder = StreamDecoder::new();
        for _ in 0..200 {
            let packet = b"REMP payload for the corruption test";
            let mut frame = vec![0u8; 128];
            let n = encode_frame(packet, &mut frame).unwrap();
            frame.truncate(n);
            corrupt_stream_frame(&mut frame, &mut rng);
            assert_eq!(frame.iter().filter(|&&b| b == 0).count(), 1);
            let mut garbage = stream_garbage(&mut rng, 16);
            garbage.extend_from_slice(&frame);
            decoder.push(&garbage, |_| panic!("a corrupted frame passed"));
        }
        let stats = decoder.stats();
        assert_eq!(stats.packets_ok, 0);
        assert_eq!(stats.crc_errors + stats.cobs_errors, 400);
    }

    #[test]
    fn percentages_hold_roughly() {
        let mut rng = rand::rng();
        let faults = Faults {
            drop_pct: 50,
            ..Faults::default()
        };
        let dropped = (0..1000).filter(|_| faults.decide(&mut rng).drop).count();
        assert!((350..650).contains(&dropped), "{dropped}");
        assert!(!Faults::default().decide(&mut rng).drop);
        let all = Faults {
            drop_pct: 100,
            corrupt_pct: 100,
            ..Faults::default()
        };
        assert!((0..100).all(|_| all.decide(&mut rng)
            == Decision {
                drop: true,
                garbage: false,
                corrupt: true
            }));
    }
}
