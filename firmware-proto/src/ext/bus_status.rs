//! BUS_STATUS (REMP type 0x11): the CAN controller's error state and loss counters.
//!
//! One 12-byte layout for request and report (big-endian): action u8 (1 request, 2 report),
//! state u8 (0 error-active, 1 error-passive, 2 bus-off), tec u8, rec u8, rx_overflow u32,
//! lost_frames u32. A request has every field after the action zero. The dongle answers a
//! request with a report and may send reports unasked when the state changes.

use crate::wire::{Reader, Writer};
use crate::{Error, Result};

/// Request or report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BusStatusAction {
    /// 1: host asks for a report.
    Request,
    /// 2: dongle reports.
    Report,
}

/// The CAN fault-confinement state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BusState {
    /// 0: both error counters below 128.
    #[default]
    ErrorActive,
    /// 1: an error counter at 128 or above.
    ErrorPassive,
    /// 2: TEC above 255; the controller is off the bus.
    BusOff,
}

/// A BUS_STATUS request or report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusStatus {
    /// Request or report.
    pub action: BusStatusAction,
    /// Fault-confinement state.
    pub state: BusState,
    /// Transmit error counter.
    pub tec: u8,
    /// Receive error counter.
    pub rec: u8,
    /// Frames lost because the receive FIFO overflowed, since boot (wraps).
    pub rx_overflow: u32,
    /// Frames the dongle dropped because a queue was full, on the way to the host or waiting for its
    /// bus, since boot (wraps).
    pub lost_frames: u32,
}

impl BusStatus {
    /// The payload length.
    pub const LEN: usize = 12;

    /// A request (every counter zero).
    pub const fn request() -> Self {
        Self {
            action: BusStatusAction::Request,
            state: BusState::ErrorActive,
            tec: 0,
            rec: 0,
            rx_overflow: 0,
            lost_frames: 0,
        }
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        w.u8(match self.action {
            BusStatusAction::Request => 1,
            BusStatusAction::Report => 2,
        })?;
        w.u8(match self.state {
            BusState::ErrorActive => 0,
            BusState::ErrorPassive => 1,
            BusState::BusOff => 2,
        })?;
        w.u8(self.tec)?;
        w.u8(self.rec)?;
        w.u32_be(self.rx_overflow)?;
        w.u32_be(self.lost_frames)
    }

    /// Decodes the 12 payload bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let action = match r.u8()? {
            1 => BusStatusAction::Request,
            2 => BusStatusAction::Report,
            _ => return Err(Error::InvalidField("action")),
        };
        let state = match r.u8()? {
            0 => BusState::ErrorActive,
            1 => BusState::ErrorPassive,
            2 => BusState::BusOff,
            _ => return Err(Error::InvalidField("state")),
        };
        let tec = r.u8()?;
        let rec = r.u8()?;
        let rx_overflow = r.u32_be()?;
        let lost_frames = r.u32_be()?;
        r.finish()?;
        Ok(Self {
            action,
            state,
            tec,
            rec,
            rx_overflow,
            lost_frames,
        })
    }
}
