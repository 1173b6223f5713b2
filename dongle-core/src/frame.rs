//! One CAN or CAN FD frame as the simulator moves it around, and its `candump` text form.
//!
//! The simulator needs a frame type that owns its data (frames cross tasks, processes and
//! queues), covers CAN FD (the batch extension and the virtual bus carry FD frames) and can be
//! written and read in the `candump -L` syntax that `tap`, `inject` and `--replay` use. The
//! wire forms stay in `firmware-proto`: [`Frame::to_record`] and [`Frame::from_record`] convert
//! to and from its batch record, [`Frame::to_can_frame`] to a plain REMP CAN payload.

use core::fmt;
use core::str::FromStr;

use firmware_proto::ext::CanRecord;
use firmware_proto::ext::batch::{flags as rec_flags, len_to_dlc};
use firmware_proto::ids::CanId;
use firmware_proto::remp::CanFrame;

use crate::text::{Text, bounded};

/// How much of a bad input an error quotes, in bytes: enough to recognise it, small enough that
/// the error stays cheap to return.
pub const QUOTED_LEN: usize = 64;
/// The part of a bad input an error quotes (cut at [`QUOTED_LEN`] bytes).
pub type Quoted = Text<QUOTED_LEN>;

/// A classic or FD CAN frame with owned data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    id: CanId,
    /// Batch record flag bits (`firmware_proto::ext::batch::flags`): simulated, loopback, FD,
    /// BRS, ESI. The two low bits have the same meaning as in a REMP CAN payload.
    flags: u8,
    len: u8,
    data: [u8; 64],
}

/// Why a frame could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The identifier is not 1..=3 hex digits (standard) or 8 hex digits (extended), or out of range.
    #[error(
        "invalid CAN id {0:?}: use 3 hex digits (standard, up to 7FF) or 8 (extended, up to 1FFFFFFF)"
    )]
    BadId(Quoted),
    /// The data is not an even number of hex digits.
    #[error("invalid data {0:?}: use pairs of hex digits")]
    BadData(Quoted),
    /// More data than the frame format allows.
    #[error("{len} data bytes do not fit a {kind} frame")]
    BadLength {
        /// The number of bytes given.
        len: usize,
        /// "classic" or "FD".
        kind: &'static str,
    },
    /// A remote (RTR) frame, which REMP cannot carry.
    #[error("remote (RTR) frames are not supported")]
    Remote,
    /// The text has no `#` separator.
    #[error("invalid frame {0:?}: expected ID#DATA or ID##FLAGSDATA")]
    Syntax(Quoted),
}

impl Frame {
    /// A classic frame with up to 8 data bytes.
    pub fn classic(id: CanId, data: &[u8]) -> Result<Self, FrameError> {
        if data.len() > 8 {
            return Err(FrameError::BadLength {
                len: data.len(),
                kind: "classic",
            });
        }
        Ok(Self::build(id, 0, data))
    }

    /// An FD frame; `data.len()` must be a length an FD DLC can express (0..=8, 12, 16, 20,
    /// 24, 32, 48, 64).
    pub fn fd(id: CanId, data: &[u8], brs: bool) -> Result<Self, FrameError> {
        let valid = u8::try_from(data.len()).ok().and_then(len_to_dlc).is_some();
        if !valid {
            return Err(FrameError::BadLength {
                len: data.len(),
                kind: "FD",
            });
        }
        let flags = rec_flags::FD | if brs { rec_flags::BRS } else { 0 };
        Ok(Self::build(id, flags, data))
    }

    /// Builds a frame without checking `flags` against the length; at most 64 bytes are kept. For
    /// generators that know their frames are valid; everything else uses [`Frame::classic`] or
    /// [`Frame::fd`].
    pub fn build(id: CanId, flags: u8, data: &[u8]) -> Self {
        let mut buf = [0u8; 64];
        let len = data.len().min(64);
        if let (Some(dst), Some(src)) = (buf.get_mut(..len), data.get(..len)) {
            dst.copy_from_slice(src);
        }
        Self {
            id,
            flags,
            len: len as u8,
            data: buf,
        }
    }

    /// The identifier.
    pub fn id(&self) -> CanId {
        self.id
    }

    /// The data bytes.
    pub fn data(&self) -> &[u8] {
        self.data.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// The batch record flag bits.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether this is a CAN FD frame.
    pub fn is_fd(&self) -> bool {
        self.flags & rec_flags::FD != 0
    }

    /// Whether the simulator generated this frame (generator or replay).
    pub fn is_simulated(&self) -> bool {
        self.flags & rec_flags::SIMULATED != 0
    }

    /// Whether this frame is the dongle's own transmission echoed back.
    pub fn is_loopback(&self) -> bool {
        self.flags & rec_flags::LOOPBACK != 0
    }

    /// The same frame with the simulated and loopback bits replaced.
    pub fn with_origin(mut self, simulated: bool, loopback: bool) -> Self {
        self.flags &= !(rec_flags::SIMULATED | rec_flags::LOOPBACK);
        if simulated {
            self.flags |= rec_flags::SIMULATED;
        }
        if loopback {
            self.flags |= rec_flags::LOOPBACK;
        }
        self
    }

    /// The batch record of this frame, stamped with `timestamp_us`.
    pub fn to_record(&self, timestamp_us: u64) -> CanRecord<'_> {
        CanRecord {
            timestamp_us,
            id: self.id,
            flags: self.flags,
            data: self.data(),
        }
    }

    /// A frame from a validated batch record.
    pub fn from_record(record: &CanRecord<'_>) -> Self {
        Self::build(record.id, record.flags, record.data)
    }

    /// The REMP CAN payload of a classic frame (`None` for FD frames, which REMP type 0
    /// cannot carry).
    pub fn to_can_frame(&self) -> Option<CanFrame> {
        if self.is_fd() {
            return None;
        }
        let mut frame = CanFrame::new(self.id, self.data()).ok()?;
        frame.flags = self.flags & (CanFrame::FLAG_SIMULATED | CanFrame::FLAG_LOOPBACK);
        Some(frame)
    }

    /// A classic frame from a REMP CAN payload, keeping its simulated and loopback bits.
    pub fn from_can_frame(frame: &CanFrame) -> Self {
        let flags = frame.flags & (rec_flags::SIMULATED | rec_flags::LOOPBACK);
        Self::build(frame.id, flags, frame.data())
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({self}")?;
        if self.is_simulated() {
            f.write_str(" simulated")?;
        }
        if self.is_loopback() {
            f.write_str(" loopback")?;
        }
        f.write_str(")")
    }
}

impl fmt::Display for Frame {
    /// The candump form: `123#DEADBEEF`, or `123##1DEADBEEF` for FD (the digit after `##`
    /// holds the BRS (1) and ESI (2) bits).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#", self.id)?;
        if self.is_fd() {
            let mut nibble = 0;
            if self.flags & rec_flags::BRS != 0 {
                nibble |= 1;
            }
            if self.flags & rec_flags::ESI != 0 {
                nibble |= 2;
            }
            write!(f, "#{nibble:X}")?;
        }
        self.data().iter().try_for_each(|b| write!(f, "{b:02X}"))
    }
}

impl FromStr for Frame {
    type Err = FrameError;

    /// Parses the candump frame syntax: `ID#DATA`, `ID##FLAGSDATA` (FD) and `ID#R...` (remote,
    /// refused with [`FrameError::Remote`]). IDs of 1..=3 hex digits are standard, 8 digits
    /// extended.
    fn from_str(s: &str) -> Result<Self, FrameError> {
        let (id_text, rest) = s
            .split_once('#')
            .ok_or_else(|| FrameError::Syntax(bounded(s)))?;
        let id = parse_id(id_text)?;
        if let Some(fd) = rest.strip_prefix('#') {
            let mut chars = fd.chars();
            let nibble = chars
                .next()
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| FrameError::Syntax(bounded(s)))?;
            let (data, len) = parse_data(chars.as_str())?;
            let mut frame = Frame::fd(id, &data[..len], nibble & 1 != 0)?;
            if nibble & 2 != 0 {
                frame.flags |= rec_flags::ESI;
            }
            return Ok(frame);
        }
        if rest.starts_with(['R', 'r']) {
            return Err(FrameError::Remote);
        }
        let (data, len) = parse_data(rest)?;
        Frame::classic(id, &data[..len])
    }
}

fn parse_id(text: &str) -> Result<CanId, FrameError> {
    let bad = || FrameError::BadId(bounded(text));
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let value = u32::from_str_radix(text, 16).map_err(|_| bad())?;
    match text.len() {
        1..=3 => CanId::new(value, false).map_err(|_| bad()),
        8 => CanId::new(value, true).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// The data bytes of `text` (pairs of hex digits) and how many there are.
fn parse_data(text: &str) -> Result<([u8; 64], usize), FrameError> {
    // 64 bytes is the largest frame; anything longer is refused before decoding.
    if text.len() > 128 || !text.len().is_multiple_of(2) {
        return Err(FrameError::BadData(bounded(text)));
    }
    let mut data = [0u8; 64];
    let len = text.len() / 2;
    hex::decode_to_slice(text, &mut data[..len]).map_err(|_| FrameError::BadData(bounded(text)))?;
    Ok((data, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candump_round_trips() {
        for text in [
            "123#DEADBEEF",
            "7DF#0201000000000000",
            "1ABCDEF0#",
            "123##1DEADBEEF",
        ] {
            let frame: Frame = text.parse().unwrap();
            assert_eq!(frame.to_string(), text);
        }
        let ext: Frame = "18DAF110#01".parse().unwrap();
        assert!(ext.id().is_extended());
    }

    #[test]
    fn candump_rejects_bad_input() {
        assert_eq!("123#R".parse::<Frame>(), Err(FrameError::Remote));
        assert!("800#00".parse::<Frame>().is_err());
        assert!("12345#00".parse::<Frame>().is_err());
        assert!("123#0".parse::<Frame>().is_err());
        assert!("123#001122334455667788".parse::<Frame>().is_err());
        assert!("123##1001122334455667788".parse::<Frame>().is_err());
        assert!("123".parse::<Frame>().is_err());
    }

    #[test]
    fn records_and_remp_payloads_convert() {
        let frame: Frame = "123#0102".parse().unwrap();
        let frame = frame.with_origin(true, false);
        let can = frame.to_can_frame().unwrap();
        assert_eq!(can.flags, CanFrame::FLAG_SIMULATED);
        assert_eq!(Frame::from_can_frame(&can), frame);
        assert_eq!(Frame::from_record(&frame.to_record(5)), frame);
        let fd: Frame = "123##0DEADBEEF".parse().unwrap();
        assert!(fd.to_can_frame().is_none());
    }
}
