//! REMP type 5: CLI_TELEMETRY, a command typed on the dongle's UART console and its outcome, sent by
//! the dongle unasked (with its token, or a session MAC, so that the host knows it is the dongle's).
//!
//! 26 + cmd_len + out_len bytes: action u8 = 1, source u8 (0 uart), flags u8 (0x01 truncated,
//! 0x02 error), reserved u8, corr_id (16), exit_code u16 BE, cmd_len u16 BE, command line (UTF-8),
//! out_len u16 BE, output.

use crate::ids::CorrelationId;
use crate::remp::pairing::expect_action;
use crate::wire::{Reader, Writer};
use crate::{Error, Result};

pub(crate) const ACTION_REPORT: u8 = 1;

/// Where a reported command was typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TelemetrySource {
    /// 0: the dongle's UART console.
    Uart,
    /// Any other value, kept as it came.
    Other(u8),
}

impl TelemetrySource {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            TelemetrySource::Uart => 0,
            TelemetrySource::Other(v) => v,
        }
    }

    /// Parses the wire value.
    pub const fn from_u8(v: u8) -> Self {
        match v {
            0 => TelemetrySource::Uart,
            other => TelemetrySource::Other(other),
        }
    }
}

/// A command typed on the dongle's console, and what came of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CliTelemetry<'a> {
    /// Where it was typed.
    pub source: TelemetrySource,
    /// Flag bits: [`CliTelemetry::FLAG_TRUNCATED`], [`CliTelemetry::FLAG_ERROR`].
    pub flags: u8,
    /// The dongle's own id for this report (a host may use it to spot a report sent twice).
    pub corr_id: CorrelationId,
    /// The command's exit code.
    pub exit_code: u16,
    /// The command line as typed.
    pub command: &'a str,
    /// The output, as bytes (it may be cut in the middle of a UTF-8 sequence).
    pub output: &'a [u8],
}

impl CliTelemetry<'_> {
    /// The output was cut to fit the packet.
    pub const FLAG_TRUNCATED: u8 = 0x01;
    /// The command could not run (unknown, refused, failed).
    pub const FLAG_ERROR: u8 = 0x02;
    /// The fixed part of the payload, without the command and the output.
    pub const FIXED_LEN: usize = 26;

    /// Whether the output was cut.
    pub const fn truncated(&self) -> bool {
        self.flags & Self::FLAG_TRUNCATED != 0
    }

    /// Whether the command failed to run.
    pub const fn error(&self) -> bool {
        self.flags & Self::FLAG_ERROR != 0
    }
}

fn len_u16(len: usize, field: &'static str) -> Result<u16> {
    u16::try_from(len).map_err(|_| Error::TooLarge {
        field,
        max: usize::from(u16::MAX),
    })
}

impl<'a> CliTelemetry<'a> {
    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        let cmd_len = len_u16(self.command.len(), "command")?;
        let out_len = len_u16(self.output.len(), "output")?;
        w.u8(ACTION_REPORT)?;
        w.u8(self.source.to_u8())?;
        w.u8(self.flags)?;
        w.u8(0)?;
        w.put(self.corr_id.as_bytes())?;
        w.u16_be(self.exit_code)?;
        w.u16_be(cmd_len)?;
        w.put(self.command.as_bytes())?;
        w.u16_be(out_len)?;
        w.put(self.output)
    }

    /// Decodes a report; the command must be UTF-8, and both lengths must match the bytes exactly.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        expect_action(&mut r, ACTION_REPORT)?;
        let source = TelemetrySource::from_u8(r.u8()?);
        let flags = r.u8()?;
        let _reserved = r.u8()?;
        let corr_id = CorrelationId(r.array()?);
        let exit_code = r.u16_be()?;
        let cmd_len = usize::from(r.u16_be()?);
        let command = r.bytes(cmd_len)?;
        let out_len = usize::from(r.u16_be()?);
        let output = r.bytes(out_len)?;
        r.finish()?;
        let command = core::str::from_utf8(command).map_err(|_| Error::InvalidField("command"))?;
        Ok(Self {
            source,
            flags,
            corr_id,
            exit_code,
            command,
            output,
        })
    }
}
