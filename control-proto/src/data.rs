//! The data plane: the binary WebSocket messages of `/ws/data` that carry CAN frames between agents and
//! the server (SPEC 3.8). No JSON here: a saturated bus is thousands of frames a second.
//!
//! The agent opens `GET /ws/data` with the same `Authorization: Bearer <agent token>` as the control
//! WebSocket. Which group sides it serves, the server tells it on the control WebSocket
//! ([`crate::ServerMessage::Groups`]). Every message is one binary WebSocket frame:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version, [`DATA_VERSION`] |
//! | 1 | 1 | kind: 1 FRAMES, 2 ACK, 3 DROPS |
//! | 2 | 16 | group id (UUID bytes) |
//! | 18 | 1 | side: 0 = A, 1 = B |
//! | 19 | 8 | `n`, big-endian: see below |
//! | 27 | .. | FRAMES only: a firmware-proto CAN batch (`u16` count, `u16` reserved, records), as in `CAN_BATCH` |
//!
//! - FRAMES from an agent: frames the dongle of `side` received on its bus; `n` is the stream position of
//!   the first frame (the count of frames this side has sent to this group before it, starting at the
//!   `next_seq` the server gave in [`crate::GroupSide`]). From the server: frames for the dongle of
//!   `side` to transmit; `n` is likewise the position in the stream towards that side.
//! - ACK, in either direction, acknowledges the other party's FRAMES stream of `side`: every frame below
//!   position `n` is safe. The server acknowledges once frames are forwarded or written to the durable
//!   buffer, and the agent forgets them; the agent acknowledges once the dongle has taken frames for
//!   transmission, and the server deletes them from its buffer. Whoever reconnects sends again from the
//!   first frame not acknowledged, with the same positions, and the receiver skips what it already has,
//!   so no frame is lost or repeated while either end merely reconnects.
//! - DROPS from an agent: `n` is the total of frames of `side` the agent had to drop (a full queue), so
//!   that no drop goes unreported.
//!
//! MONITOR (kind 4, protocol 4) carries a dongle's own traffic for its console, for dongles the server
//! asked to watch ([`crate::Watch`]); it is a view, not a stream: no positions, no acknowledgement, and
//! the agent may send only a sample. Its header has the same length with other fields:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version, [`DATA_VERSION`] |
//! | 1 | 1 | kind: 4 MONITOR |
//! | 2 | 8 | the dongle's device id |
//! | 10 | 8 | reserved, zero |
//! | 18 | 1 | direction: 0 = rx (the dongle received the frames on its bus), 1 = tx |
//! | 19 | 8 | `n`, big-endian: the frames the dongle saw in that direction since the previous MONITOR of it, at least the batch's count (more when the agent sent a sample) |
//! | 27 | .. | a firmware-proto CAN batch, as in FRAMES (it may be empty) |

use firmware_proto::ext::batch::Batch;
use firmware_proto::ids::DeviceId;
use uuid::Uuid;

/// The version byte of every data message.
pub const DATA_VERSION: u8 = 1;
/// The bytes before a FRAMES message's batch.
pub const HEADER_LEN: usize = 27;
/// The largest data message either side accepts.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// A side of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

impl Side {
    /// The side as text everywhere it is text (its JSON form, the server's database, notification
    /// payloads): `a` or `b`.
    pub fn letter(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }

    /// The side of a [`Side::letter`]; None for anything else.
    pub fn from_letter(letter: &str) -> Option<Self> {
        [Side::A, Side::B]
            .into_iter()
            .find(|s| s.letter() == letter)
    }

    pub fn other(self) -> Self {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Side::A),
            1 => Some(Side::B),
            _ => None,
        }
    }
}

/// One value per side of a group, indexed by [`Side`]: what `[T; 2]` indexed by `0`, `1` and `1 - t`
/// would be, without the arithmetic on indices that says nothing about which side is meant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerSide<T> {
    pub a: T,
    pub b: T,
}

impl<T> PerSide<T> {
    /// Both sides, A first.
    pub const SIDES: [Side; 2] = [Side::A, Side::B];

    pub fn new(a: T, b: T) -> Self {
        Self { a, b }
    }

    /// Each side's value from a function of the side.
    pub fn from_fn(mut f: impl FnMut(Side) -> T) -> Self {
        Self {
            a: f(Side::A),
            b: f(Side::B),
        }
    }

    /// The sides and their values, A first.
    pub fn iter(&self) -> impl Iterator<Item = (Side, &T)> {
        [(Side::A, &self.a), (Side::B, &self.b)].into_iter()
    }

    /// The values, A first.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        [&self.a, &self.b].into_iter()
    }

    pub fn map<U>(self, mut f: impl FnMut(Side, T) -> U) -> PerSide<U> {
        PerSide {
            a: f(Side::A, self.a),
            b: f(Side::B, self.b),
        }
    }
}

impl<T> std::ops::Index<Side> for PerSide<T> {
    type Output = T;

    fn index(&self, side: Side) -> &T {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
}

impl<T> std::ops::IndexMut<Side> for PerSide<T> {
    fn index_mut(&mut self, side: Side) -> &mut T {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }
}

/// What a data message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Frames,
    Ack,
    Drops,
}

/// Which way a monitored frame went, seen from the dongle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Received on the dongle's bus.
    Rx,
    /// Transmitted by the dongle.
    Tx,
}

impl Direction {
    /// The name the console shows.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }
}

/// A decoded MONITOR message: a dongle's own traffic for its console.
#[derive(Debug, Clone, Copy)]
pub struct Monitor<'a> {
    pub device_id: DeviceId,
    pub direction: Direction,
    /// The frames the dongle saw in this direction since the previous MONITOR; at least the batch's
    /// count.
    pub seen: u64,
    pub batch: Batch<'a>,
}

/// Any message of the data plane.
#[derive(Debug, Clone, Copy)]
pub enum AnyMessage<'a> {
    /// FRAMES, ACK or DROPS of a group side.
    Group(DataMessage<'a>),
    /// MONITOR.
    Monitor(Monitor<'a>),
}

impl<'a> AnyMessage<'a> {
    /// Decodes and validates any data message.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DataError> {
        if bytes.get(1) != Some(&KIND_MONITOR) {
            return DataMessage::decode(bytes).map(AnyMessage::Group);
        }
        let header = checked_header(bytes)?;
        if header[10..18] != [0; 8] {
            return Err(DataError::Reserved);
        }
        let device_id = DeviceId::from_bytes(header[2..10].try_into().expect("8 bytes"));
        let direction = match header[18] {
            0 => Direction::Rx,
            1 => Direction::Tx,
            d => return Err(DataError::Direction(d)),
        };
        let seen = u64::from_be_bytes(header[19..27].try_into().expect("8 bytes"));
        let batch =
            Batch::parse(&bytes[HEADER_LEN..]).map_err(|e| DataError::Batch(e.to_string()))?;
        if seen < batch.len() as u64 {
            return Err(DataError::FewerSeenThanSent {
                seen,
                sent: batch.len(),
            });
        }
        Ok(AnyMessage::Monitor(Monitor {
            device_id,
            direction,
            seen,
            batch,
        }))
    }
}

const KIND_MONITOR: u8 = 4;

/// The header of any data message, after the checks every kind shares: the size and the version.
fn checked_header(bytes: &[u8]) -> Result<&[u8], DataError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DataError::TooLarge(bytes.len()));
    }
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(DataError::Short(bytes.len()));
    };
    if header[0] != DATA_VERSION {
        return Err(DataError::Version(header[0]));
    }
    Ok(header)
}

/// A MONITOR message around an encoded batch: `seen` frames in `direction` since the previous one, of
/// which the batch holds a sample (or all).
pub fn encode_monitor(
    device_id: DeviceId,
    direction: Direction,
    seen: u64,
    batch: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + batch.len());
    out.push(DATA_VERSION);
    out.push(KIND_MONITOR);
    out.extend_from_slice(device_id.as_bytes());
    out.extend_from_slice(&[0; 8]);
    out.push(match direction {
        Direction::Rx => 0,
        Direction::Tx => 1,
    });
    out.extend_from_slice(&seen.to_be_bytes());
    out.extend_from_slice(batch);
    out
}

/// A decoded data message; the batch borrows from the message bytes.
#[derive(Debug, Clone, Copy)]
pub struct DataMessage<'a> {
    pub kind: Kind,
    pub group_id: Uuid,
    pub side: Side,
    pub n: u64,
    /// FRAMES only.
    pub batch: Option<Batch<'a>>,
}

/// Why a data message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("data message of {0} bytes: too short for its header")]
    Short(usize),
    #[error("data message of {0} bytes: larger than {MAX_MESSAGE_LEN}")]
    TooLarge(usize),
    #[error("data message version {0}, expected {DATA_VERSION}")]
    Version(u8),
    #[error("unknown data message kind {0}")]
    Kind(u8),
    #[error("unknown side {0}")]
    Side(u8),
    #[error("the frame batch does not parse: {0}")]
    Batch(String),
    #[error("an ACK or DROPS message carries {0} bytes after its header")]
    Trailing(usize),
    #[error("a MONITOR message with non-zero reserved bytes")]
    Reserved,
    #[error("unknown direction {0}")]
    Direction(u8),
    #[error("a MONITOR message says {seen} frames were seen but carries {sent}")]
    FewerSeenThanSent { seen: u64, sent: usize },
}

impl<'a> DataMessage<'a> {
    /// Decodes and validates a message (the whole batch included).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DataError> {
        let header = checked_header(bytes)?;
        let kind = match header[1] {
            1 => Kind::Frames,
            2 => Kind::Ack,
            3 => Kind::Drops,
            k => return Err(DataError::Kind(k)),
        };
        let group_id = Uuid::from_bytes(header[2..18].try_into().expect("16 bytes"));
        let side = Side::from_u8(header[18]).ok_or(DataError::Side(header[18]))?;
        let n = u64::from_be_bytes(header[19..27].try_into().expect("8 bytes"));
        let rest = &bytes[HEADER_LEN..];
        let batch = match kind {
            Kind::Frames => Some(Batch::parse(rest).map_err(|e| DataError::Batch(e.to_string()))?),
            _ if !rest.is_empty() => return Err(DataError::Trailing(rest.len())),
            _ => None,
        };
        Ok(Self {
            kind,
            group_id,
            side,
            n,
            batch,
        })
    }

    /// The number of frames of a FRAMES message (0 otherwise).
    pub fn frame_count(&self) -> u64 {
        self.batch.map(|b| b.len() as u64).unwrap_or(0)
    }
}

fn header(kind: u8, group_id: Uuid, side: Side, n: u64, out: &mut Vec<u8>) {
    out.push(DATA_VERSION);
    out.push(kind);
    out.extend_from_slice(group_id.as_bytes());
    out.push(side.to_u8());
    out.extend_from_slice(&n.to_be_bytes());
}

/// A FRAMES message around an encoded batch (as `BatchWriter` or `encode_batch` make it).
pub fn encode_frames(group_id: Uuid, side: Side, first: u64, batch: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + batch.len());
    header(1, group_id, side, first, &mut out);
    out.extend_from_slice(batch);
    out
}

/// An ACK: every frame of `side`'s stream below `next` is safe.
pub fn encode_ack(group_id: Uuid, side: Side, next: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    header(2, group_id, side, next, &mut out);
    out
}

/// A DROPS report: `total` frames of `side` dropped by the agent so far.
pub fn encode_drops(group_id: Uuid, side: Side, total: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    header(3, group_id, side, total, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ext::batch::{CanRecord, encode_batch};
    use firmware_proto::ids::CanId;

    fn batch() -> Vec<u8> {
        let records = [
            CanRecord {
                timestamp_us: 1,
                id: CanId::standard(0x7e8).unwrap(),
                flags: 0,
                data: &[2, 0x41, 0x0c],
            },
            CanRecord {
                timestamp_us: 2,
                id: CanId::extended(0x18db33f1).unwrap(),
                flags: 0,
                data: &[],
            },
        ];
        let mut buf = vec![0u8; 256];
        let n = encode_batch(&records, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_sides_letter_is_its_json_name_and_reads_back() {
        for side in [Side::A, Side::B] {
            assert_eq!(Side::from_letter(side.letter()), Some(side));
            assert_eq!(
                serde_json::to_string(&side).unwrap(),
                format!("\"{}\"", side.letter())
            );
        }
        assert_eq!(Side::from_letter("A"), None);
        assert_eq!(Side::from_letter(""), None);
    }

    #[test]
    fn frames_round_trip_with_the_documented_layout() {
        let group = Uuid::from_u128(0x0102030405060708090a0b0c0d0e0f10);
        let msg = encode_frames(group, Side::B, 42, &batch());
        assert_eq!(&msg[..2], &[1, 1]);
        assert_eq!(&msg[2..18], group.as_bytes());
        assert_eq!(msg[18], 1);
        assert_eq!(&msg[19..27], &42u64.to_be_bytes());
        let decoded = DataMessage::decode(&msg).unwrap();
        assert_eq!(decoded.kind, Kind::Frames);
        assert_eq!(
            (decoded.group_id, decoded.side, decoded.n),
            (group, Side::B, 42)
        );
        assert_eq!(decoded.frame_count(), 2);
        let ids: Vec<u32> = decoded.batch.unwrap().iter().map(|r| r.id.raw()).collect();
        assert_eq!(ids, vec![0x7e8, 0x18db33f1]);
    }

    #[test]
    fn monitor_round_trips_with_the_documented_layout() {
        let dev = DeviceId::from_bytes([0xa1, 2, 3, 4, 5, 6, 7, 8]);
        let msg = encode_monitor(dev, Direction::Rx, 40, &batch());
        assert_eq!(&msg[..2], &[1, 4]);
        assert_eq!(&msg[2..10], dev.as_bytes());
        assert_eq!(&msg[10..18], &[0; 8]);
        assert_eq!(msg[18], 0);
        assert_eq!(&msg[19..27], &40u64.to_be_bytes());
        let AnyMessage::Monitor(m) = AnyMessage::decode(&msg).unwrap() else {
            panic!("a MONITOR message");
        };
        assert_eq!(
            (m.device_id, m.direction, m.seen, m.batch.len()),
            (dev, Direction::Rx, 40, 2)
        );
        // The group messages decode through the same door.
        let ack = encode_ack(Uuid::new_v4(), Side::A, 3);
        assert!(matches!(
            AnyMessage::decode(&ack),
            Ok(AnyMessage::Group(DataMessage {
                kind: Kind::Ack,
                n: 3,
                ..
            }))
        ));
        // Only the door that knows MONITOR opens for it.
        assert_eq!(DataMessage::decode(&msg).unwrap_err(), DataError::Kind(4));
    }

    #[test]
    fn malformed_monitors_are_errors_not_panics() {
        let dev = DeviceId::from_bytes([1; 8]);
        let good = encode_monitor(dev, Direction::Tx, 2, &batch());
        let mut bad = good.clone();
        bad[12] = 1;
        assert_eq!(AnyMessage::decode(&bad).unwrap_err(), DataError::Reserved);
        let mut bad = good.clone();
        bad[18] = 2;
        assert_eq!(
            AnyMessage::decode(&bad).unwrap_err(),
            DataError::Direction(2)
        );
        let fewer = encode_monitor(dev, Direction::Rx, 1, &batch());
        assert_eq!(
            AnyMessage::decode(&fewer).unwrap_err(),
            DataError::FewerSeenThanSent { seen: 1, sent: 2 }
        );
        for cut in 0..good.len() {
            let _ = AnyMessage::decode(&good[..cut]);
        }
        for i in 0..good.len() {
            let mut m = good.clone();
            m[i] ^= 0xff;
            let _ = AnyMessage::decode(&m);
        }
    }

    #[test]
    fn acks_and_drops() {
        let g = Uuid::new_v4();
        let ack = encode_ack(g, Side::A, 7);
        let ack = DataMessage::decode(&ack).unwrap();
        assert_eq!(
            (ack.kind, ack.side, ack.n, ack.frame_count()),
            (Kind::Ack, Side::A, 7, 0)
        );
        let drops = encode_drops(g, Side::B, 3);
        let drops = DataMessage::decode(&drops).unwrap();
        assert_eq!((drops.kind, drops.n), (Kind::Drops, 3));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let g = Uuid::new_v4();
        assert_eq!(
            DataMessage::decode(&[1, 1]).unwrap_err(),
            DataError::Short(2)
        );
        let mut bad = encode_ack(g, Side::A, 0);
        bad[0] = 9;
        assert_eq!(
            DataMessage::decode(&bad).unwrap_err(),
            DataError::Version(9)
        );
        let mut bad = encode_ack(g, Side::A, 0);
        bad[1] = 7;
        assert_eq!(DataMessage::decode(&bad).unwrap_err(), DataError::Kind(7));
        let mut bad = encode_ack(g, Side::A, 0);
        bad[18] = 2;
        assert_eq!(DataMessage::decode(&bad).unwrap_err(), DataError::Side(2));
        let mut bad = encode_ack(g, Side::A, 0);
        bad.push(0);
        assert_eq!(
            DataMessage::decode(&bad).unwrap_err(),
            DataError::Trailing(1)
        );
        let mut frames = encode_frames(g, Side::A, 0, &batch());
        frames.pop();
        assert!(matches!(
            DataMessage::decode(&frames),
            Err(DataError::Batch(_))
        ));
        assert!(matches!(
            DataMessage::decode(&vec![1u8; MAX_MESSAGE_LEN + 1]),
            Err(DataError::TooLarge(_))
        ));
        // Every prefix and every single-byte change of a valid message decodes or fails cleanly.
        let good = encode_frames(g, Side::A, 5, &batch());
        for cut in 0..good.len() {
            let _ = DataMessage::decode(&good[..cut]);
        }
        for i in 0..good.len() {
            let mut m = good.clone();
            m[i] ^= 0xff;
            let _ = DataMessage::decode(&m);
        }
    }
}
