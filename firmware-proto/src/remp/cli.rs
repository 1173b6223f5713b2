//! REMP type 4: CLI. The first payload byte is the action.
//!
//! - request (1), host to dongle, 22 + cmd_len bytes: action, flags u8 (0x01 allow_dangerous),
//!   reserved u16, corr_id (16), cmd_len u16 BE, command line (UTF-8).
//! - response (2), dongle to host, 24 + out_len bytes: action, status u8, flags u8
//!   (0x01 truncated), reserved u8, corr_id (16), exit_code u16 BE, out_len u16 BE, output.

use crate::ids::CorrelationId;
use crate::remp::pairing::expect_action;
use crate::wire::{Reader, Writer};
use crate::{Error, Result};

pub(crate) const ACTION_REQUEST: u8 = 1;
pub(crate) const ACTION_RESPONSE: u8 = 2;

/// A command for the dongle's CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CliRequest<'a> {
    /// Flag bits: [`CliRequest::FLAG_ALLOW_DANGEROUS`].
    pub flags: u8,
    /// Ties the response to this request (the server's command id).
    pub corr_id: CorrelationId,
    /// The command line.
    pub command: &'a str,
}

impl CliRequest<'_> {
    /// Lets the dongle run commands it marks dangerous (development servers only).
    pub const FLAG_ALLOW_DANGEROUS: u8 = 0x01;
    /// The fixed part of the payload before the command.
    pub const FIXED_LEN: usize = 22;
}

/// The outcome of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CliStatus {
    /// 0: the command ran; see exit_code.
    Ok,
    /// 1: not allowed.
    Denied,
    /// 2: could not run.
    Error,
    /// 3: ran out of time.
    Timeout,
}

/// The dongle's answer to a [`CliRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CliResponse<'a> {
    /// The outcome.
    pub status: CliStatus,
    /// Flag bits: [`CliResponse::FLAG_TRUNCATED`].
    pub flags: u8,
    /// The request's correlation id.
    pub corr_id: CorrelationId,
    /// The command's exit code.
    pub exit_code: u16,
    /// The output, as bytes (it may be cut in the middle of a UTF-8 sequence).
    pub output: &'a [u8],
}

impl CliResponse<'_> {
    /// The output was cut to fit the packet.
    pub const FLAG_TRUNCATED: u8 = 0x01;
    /// The fixed part of the payload before the output.
    pub const FIXED_LEN: usize = 24;
}

fn len_u16(len: usize, field: &'static str) -> Result<u16> {
    u16::try_from(len).map_err(|_| Error::TooLarge {
        field,
        max: usize::from(u16::MAX),
    })
}

impl<'a> CliRequest<'a> {
    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        let len = len_u16(self.command.len(), "command")?;
        w.u8(ACTION_REQUEST)?;
        w.u8(self.flags)?;
        w.u16_be(0)?;
        w.put(self.corr_id.as_bytes())?;
        w.u16_be(len)?;
        w.put(self.command.as_bytes())
    }

    /// Decodes a request payload; the command must be UTF-8 and exactly cmd_len bytes.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        expect_action(&mut r, ACTION_REQUEST)?;
        let flags = r.u8()?;
        let _reserved = r.u16_be()?;
        let corr_id = CorrelationId(r.array()?);
        let len = usize::from(r.u16_be()?);
        let command = r.bytes(len)?;
        r.finish()?;
        let command = core::str::from_utf8(command).map_err(|_| Error::InvalidField("command"))?;
        Ok(Self {
            flags,
            corr_id,
            command,
        })
    }
}

impl<'a> CliResponse<'a> {
    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        let len = len_u16(self.output.len(), "output")?;
        let status = match self.status {
            CliStatus::Ok => 0,
            CliStatus::Denied => 1,
            CliStatus::Error => 2,
            CliStatus::Timeout => 3,
        };
        w.u8(ACTION_RESPONSE)?;
        w.u8(status)?;
        w.u8(self.flags)?;
        w.u8(0)?;
        w.put(self.corr_id.as_bytes())?;
        w.u16_be(self.exit_code)?;
        w.u16_be(len)?;
        w.put(self.output)
    }

    /// Decodes a response payload; the output must be exactly out_len bytes.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        expect_action(&mut r, ACTION_RESPONSE)?;
        let status = match r.u8()? {
            0 => CliStatus::Ok,
            1 => CliStatus::Denied,
            2 => CliStatus::Error,
            3 => CliStatus::Timeout,
            _ => return Err(Error::InvalidField("status")),
        };
        let flags = r.u8()?;
        let _reserved = r.u8()?;
        let corr_id = CorrelationId(r.array()?);
        let exit_code = r.u16_be()?;
        let len = usize::from(r.u16_be()?);
        let output = r.bytes(len)?;
        r.finish()?;
        Ok(Self {
            status,
            flags,
            corr_id,
            exit_code,
            output,
        })
    }
}
