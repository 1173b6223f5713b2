//! Latency probes: numbered frames that measure a group's path from one agent round to the other
//! agent and back, without reaching either dongle's bus (protocol 5, [`crate::RequestBody::LatencyProbe`]).
//!
//! The server arms the receiving side's agent first (`echo`), then asks the sending side's agent to
//! `send`. The sender puts each probe into its side's stream as if its dongle had received it, so a
//! probe takes the group's whole path: the sender's data connection, the server's pipe (and its durable
//! buffer when the other side is away or on another instance), and the receiver's data connection. The
//! receiver recognises the run's probes before its dongle would get them, and puts each back into its
//! own side's stream unchanged; the sender recognises the echoes the same way and times them with its
//! own clock, so no two clocks need to agree. Probes keep their stream positions like any frame, so the
//! run also checks that nothing is lost, repeated or reordered.
//!
//! A probe is a CAN FD frame of [`LEN`] bytes with the extended id [`CAN_ID`]:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 16 | the run's id (a random UUID, so that no frame of a real bus is taken for a probe) |
//! | 16 | 4 | the probe's number, big-endian, from 0 |
//! | 20 | 8 | when the sender sent it: microseconds since the run began on the sender's clock, big-endian |
//! | 28 | 4 | zero |
//!
//! An agent keeps recognising a run's probes for a while after its part ends ([`ECHO_GRACE_SECS`]),
//! and drops late ones rather than put them on the bus. It keeps its runs in memory only: probes the
//! server still holds for a side whose agent restarted during a run reach that agent as ordinary
//! frames, which its dongle puts on the bus if it takes CAN FD (a classic-only dongle refuses them,
//! and they are counted as dropped).

use uuid::Uuid;

/// The extended CAN id of every probe.
pub const CAN_ID: u32 = 0x1FFF_FFFF;
/// The data length of a probe (a CAN FD length).
pub const LEN: usize = 32;
/// How long after its part ends an agent still drops the run's late probes (replayed from the
/// server's buffer, say), rather than put them on the bus: a day, far longer than the buffer keeps
/// frames (10 minutes by default).
pub const ECHO_GRACE_SECS: u64 = 24 * 3600;
/// The most probes one run sends.
pub const MAX_COUNT: u32 = 120_000;
/// The highest rate of a run, in probes a second.
pub const MAX_RATE: u32 = 5_000;

/// The data of probe `seq` of run `run_id`, sent `sent_us` after the run began.
pub fn encode(run_id: Uuid, seq: u32, sent_us: u64) -> [u8; LEN] {
    let mut data = [0u8; LEN];
    data[..16].copy_from_slice(run_id.as_bytes());
    data[16..20].copy_from_slice(&seq.to_be_bytes());
    data[20..28].copy_from_slice(&sent_us.to_be_bytes());
    data
}

/// The number and send time of a probe of run `run_id`; None for any other frame's data.
pub fn decode(run_id: Uuid, data: &[u8]) -> Option<(u32, u64)> {
    if data.len() != LEN || data[..16] != run_id.as_bytes()[..] {
        return None;
    }
    let seq = u32::from_be_bytes(data[16..20].try_into().ok()?);
    let sent_us = u64::from_be_bytes(data[20..28].try_into().ok()?);
    Some((seq, sent_us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_reads_back_for_its_run_only() {
        let run = Uuid::new_v4();
        let data = encode(run, 0x0102_0304, 1_234_567);
        assert_eq!(decode(run, &data), Some((0x0102_0304, 1_234_567)));
        assert_eq!(decode(Uuid::new_v4(), &data), None, "another run's probe");
        assert_eq!(decode(run, &data[..31]), None, "another length");
        assert_eq!(&data[28..], &[0; 4]);
    }
}
