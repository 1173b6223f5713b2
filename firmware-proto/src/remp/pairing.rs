//! REMP type 3: pairing. The first payload byte is the action.
//!
//! - start (1), host to dongle, 20 bytes: action, reserved u8, reserved u16, corr_id (16).
//! - submit (2), host to dongle, 43 + token_len bytes: action, reserved u8, reserved u16,
//!   corr_id (16), pin (6 ASCII digits), pairing_nonce (16), token_len u8 (32), token.
//! - ack (3), dongle to host, 20 or 36 bytes: action, status u8, seconds u16 BE, corr_id (16),
//!   and the pairing_nonce (16) in a successful start ack.
//!
//! Pairing packets carry no token in the REMP header (token_len = 0).

use crate::ids::{CorrelationId, DongleToken, Pin};
use crate::wire::{Reader, Writer};
use crate::{Error, Result};

pub(crate) const ACTION_START: u8 = 1;
pub(crate) const ACTION_SUBMIT: u8 = 2;
pub(crate) const ACTION_ACK: u8 = 3;

/// Pairing start: the dongle draws a PIN and a nonce and opens its 120 s pairing window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairingStart {
    /// Ties the ack to this request.
    pub corr_id: CorrelationId,
}

/// Pairing submit: the PIN the technician read, the window's nonce and the new token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairingSubmit {
    /// Ties the ack to this request.
    pub corr_id: CorrelationId,
    /// The 6-digit PIN.
    pub pin: Pin,
    /// The nonce of the pairing window (from the start ack or the ANNOUNCE).
    pub pairing_nonce: [u8; 16],
    /// The token the dongle stores on success (32 bytes on the wire).
    pub token: DongleToken,
}

/// The outcome of a start or submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairingStatus {
    /// 0.
    Ok,
    /// 1: wrong PIN (attempts count towards the cool-down).
    InvalidPin,
    /// 2: too many wrong PINs; `seconds` says how long the cool-down lasts.
    Cooldown,
    /// 3: any other failure (no window open, nonce mismatch, flash error).
    Error,
}

/// Pairing ack, the dongle's answer to start and submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairingAck {
    /// The outcome.
    pub status: PairingStatus,
    /// Window left after a start; cool-down left after a submit.
    pub seconds: u16,
    /// The request's correlation id.
    pub corr_id: CorrelationId,
    /// The pairing nonce, in a successful start ack only.
    pub pairing_nonce: Option<[u8; 16]>,
}

fn write_prefix(w: &mut Writer<'_>, action: u8, second: u8, word: u16) -> Result<()> {
    w.u8(action)?;
    w.u8(second)?;
    w.u16_be(word)
}

impl PairingStart {
    /// The payload length.
    pub const LEN: usize = 20;

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        write_prefix(w, ACTION_START, 0, 0)?;
        w.put(self.corr_id.as_bytes())
    }

    /// Decodes a start payload.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        expect_action(&mut r, ACTION_START)?;
        let _reserved = (r.u8()?, r.u16_be()?);
        let corr_id = CorrelationId(r.array()?);
        r.finish()?;
        Ok(Self { corr_id })
    }
}

impl PairingSubmit {
    /// The payload length with a 32-byte token.
    pub const LEN: usize = 75;

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        write_prefix(w, ACTION_SUBMIT, 0, 0)?;
        w.put(self.corr_id.as_bytes())?;
        w.put(self.pin.as_bytes())?;
        w.put(&self.pairing_nonce)?;
        w.u8(DongleToken::LEN as u8)?;
        w.put(self.token.as_bytes())
    }

    /// Decodes a submit payload; the token must be exactly 32 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        expect_action(&mut r, ACTION_SUBMIT)?;
        let _reserved = (r.u8()?, r.u16_be()?);
        let corr_id = CorrelationId(r.array()?);
        let pin = Pin::from_bytes(r.array()?)?;
        let pairing_nonce = r.array()?;
        let token_len = usize::from(r.u8()?);
        if token_len != DongleToken::LEN {
            return Err(Error::InvalidField("token_len"));
        }
        let token = DongleToken::from_bytes(r.array()?);
        r.finish()?;
        Ok(Self {
            corr_id,
            pin,
            pairing_nonce,
            token,
        })
    }
}

impl PairingAck {
    /// The payload length without a nonce.
    pub const LEN: usize = 20;
    /// The payload length with a nonce.
    pub const LEN_WITH_NONCE: usize = 36;

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        let status = match self.status {
            PairingStatus::Ok => 0,
            PairingStatus::InvalidPin => 1,
            PairingStatus::Cooldown => 2,
            PairingStatus::Error => 3,
        };
        write_prefix(w, ACTION_ACK, status, self.seconds)?;
        w.put(self.corr_id.as_bytes())?;
        match &self.pairing_nonce {
            Some(nonce) => w.put(nonce),
            None => Ok(()),
        }
    }

    /// Decodes an ack payload (20 bytes, or 36 with the nonce).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        expect_action(&mut r, ACTION_ACK)?;
        let status = match r.u8()? {
            0 => PairingStatus::Ok,
            1 => PairingStatus::InvalidPin,
            2 => PairingStatus::Cooldown,
            3 => PairingStatus::Error,
            _ => return Err(Error::InvalidField("status")),
        };
        let seconds = r.u16_be()?;
        let corr_id = CorrelationId(r.array()?);
        let pairing_nonce = match r.remaining() {
            0 => None,
            _ => Some(r.array()?),
        };
        r.finish()?;
        Ok(Self {
            status,
            seconds,
            corr_id,
            pairing_nonce,
        })
    }
}

pub(crate) fn expect_action(r: &mut Reader<'_>, action: u8) -> Result<()> {
    if r.u8()? == action {
        Ok(())
    } else {
        Err(Error::InvalidField("action"))
    }
}
