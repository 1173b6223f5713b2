//! One CAN or CAN FD frame as the agent moves it: out of a dongle's session or a local endpoint, through
//! the data plane, and into another dongle or endpoint. A fixed-size value (no allocation per frame).

use firmware_proto::ext::batch::{self, CanRecord};
use firmware_proto::ids::CanId;

/// One CAN or CAN FD frame as the session hands it over.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub id: CanId,
    /// The dongle's microsecond clock when it saw the frame (0 where the packet carries none).
    pub timestamp_us: u64,
    /// Batch record flags (FD, BRS, ESI), or 0 for a classic frame.
    pub fd_flags: u8,
    /// The dongle echoed its own transmission (loopback modes).
    pub loopback: bool,
    len: u8,
    data: [u8; 64],
}

impl Frame {
    /// A classic frame; fails above 8 bytes.
    pub fn classic(id: CanId, data: &[u8]) -> Option<Self> {
        Self::with_flags(id, 0, data).filter(|_| data.len() <= 8)
    }

    /// A frame with batch record flags (FD, BRS, ESI); the length must suit them.
    pub fn with_flags(id: CanId, fd_flags: u8, data: &[u8]) -> Option<Self> {
        let mut buf = [0u8; 64];
        buf.get_mut(..data.len())?.copy_from_slice(data);
        Some(Self {
            id,
            timestamp_us: 0,
            fd_flags,
            loopback: false,
            len: data.len() as u8,
            data: buf,
        })
    }

    pub fn data(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }

    /// A frame from a batch record; `None` when its length does not suit its flags.
    pub fn from_record(record: &CanRecord<'_>) -> Option<Self> {
        let mut frame = Self::with_flags(record.id, record.flags, record.data)?;
        frame.timestamp_us = record.timestamp_us;
        Some(frame)
    }

    pub fn is_fd(&self) -> bool {
        self.fd_flags & batch::flags::FD != 0
    }

    /// The frame as a batch record (the encoding of `CAN_BATCH` and of the data plane).
    pub fn record(&self) -> CanRecord<'_> {
        CanRecord {
            timestamp_us: self.timestamp_us,
            id: self.id,
            flags: self.fd_flags,
            data: self.data(),
        }
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({}#{}", self.id, hex::encode(self.data()))?;
        if self.is_fd() {
            write!(f, " fd")?;
        }
        if self.loopback {
            write!(f, " loopback")?;
        }
        write!(f, " @{}us)", self.timestamp_us)
    }
}
