//! FORGET (REMP type 0x12): the owner's unpair reaches the dongle, which erases its token.
//!
//! One 20-byte layout (big-endian): action u8 (1 request, 2 ack), status u8 (0 in a request;
//! in an ack 0 ok, 1 not_paired, 2 error), reserved u16, corr_id (16). The request must carry
//! the token or a session MAC; the dongle answers after the token is erased from flash.

use crate::ids::CorrelationId;
use crate::wire::{Reader, Writer};
use crate::{Error, Result};

/// Request or ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForgetAction {
    /// 1: host asks the dongle to forget its token.
    Request,
    /// 2: dongle answers.
    Ack,
}

/// The outcome of a forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForgetStatus {
    /// 0: the token is erased (also the value in requests).
    #[default]
    Ok,
    /// 1: the dongle held no token.
    NotPaired,
    /// 2: erasing failed.
    Error,
}

/// A FORGET request or ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forget {
    /// Request or ack.
    pub action: ForgetAction,
    /// The outcome (acks); `Ok` in requests.
    pub status: ForgetStatus,
    /// Ties the ack to the request.
    pub corr_id: CorrelationId,
}

impl Forget {
    /// The payload length.
    pub const LEN: usize = 20;

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        w.u8(match self.action {
            ForgetAction::Request => 1,
            ForgetAction::Ack => 2,
        })?;
        w.u8(match (self.action, self.status) {
            (ForgetAction::Request, _) | (_, ForgetStatus::Ok) => 0,
            (_, ForgetStatus::NotPaired) => 1,
            (_, ForgetStatus::Error) => 2,
        })?;
        w.u16_be(0)?;
        w.put(self.corr_id.as_bytes())
    }

    /// Decodes the 20 payload bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let action = match r.u8()? {
            1 => ForgetAction::Request,
            2 => ForgetAction::Ack,
            _ => return Err(Error::InvalidField("action")),
        };
        let status = match (action, r.u8()?) {
            (ForgetAction::Request, _) | (_, 0) => ForgetStatus::Ok,
            (_, 1) => ForgetStatus::NotPaired,
            (_, 2) => ForgetStatus::Error,
            _ => return Err(Error::InvalidField("status")),
        };
        let _reserved = r.u16_be()?;
        let corr_id = CorrelationId(r.array()?);
        r.finish()?;
        Ok(Self {
            action,
            status,
            corr_id,
        })
    }
}
