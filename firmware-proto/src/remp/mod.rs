//! REMP v1, the "REMP" packet family (big-endian), exactly as today's dongles speak it, plus
//! the extension message types of [`crate::ext`].
//!
//! Header (31 bytes), then `token_len` bytes of token (or of session MAC), then the payload:
//!
//! | off | size | field        | value                                         |
//! |-----|------|--------------|-----------------------------------------------|
//! | 0   | 4    | magic        | `"REMP"`                                      |
//! | 4   | 1    | version      | 1                                             |
//! | 5   | 1    | type         | see [`MsgType`]                               |
//! | 6   | 1    | flags        | see [`flags`]                                 |
//! | 7   | 1    | reserved     | 0                                             |
//! | 8   | 1    | token_len    | 0..=64                                        |
//! | 9   | 2    | fw_build     | u16 BE                                        |
//! | 11  | 8    | device_id    | raw bytes                                     |
//! | 19  | 4    | seq          | u32 BE                                        |
//! | 23  | 8    | timestamp_us | u64 BE                                        |

mod can;
mod cli;
mod config;
mod pairing;
mod telemetry;

pub use can::CanFrame;
pub use cli::{CliRequest, CliResponse, CliStatus};
pub use config::{
    BITRATE_RANGE, CanConfig, CanMode, ConfigAction, ConfigStatus, SAMPLE_POINT_RANGE, TimingLimits,
};
pub use pairing::{PairingAck, PairingStart, PairingStatus, PairingSubmit};
pub use telemetry::{CliTelemetry, TelemetrySource};

use crate::ext::{AuthMessage, Batch, BusStatus, Forget};
use crate::ids::DeviceId;
use crate::wire::{Reader, Writer};
use crate::{Error, MAX_PACKET_LEN, Result};

/// The 4 magic bytes that open every REMP packet.
pub const MAGIC: [u8; 4] = *b"REMP";
/// The only REMP version.
pub const VERSION: u8 = 1;
/// The fixed header length.
pub const HEADER_LEN: usize = 31;
/// The longest token field.
pub const MAX_TOKEN_LEN: usize = 64;
/// The token length the dongle requires on CAN, CAN_CONFIG and CLI (and the extensions).
pub const TOKEN_LEN: usize = 32;
/// The length of the truncated session MAC carried in place of the token.
pub const SESSION_MAC_LEN: usize = 16;
/// The largest REMP payload with a 32-byte token, in bytes.
pub const MAX_PAYLOAD_LEN: usize = MAX_PACKET_LEN - HEADER_LEN - TOKEN_LEN;

/// Header flag bits.
pub mod flags {
    /// The token field holds a 16-byte session MAC (token_len = 16) instead of the token, and
    /// `seq` is strictly increasing within the session (extension, see [`crate::ext::session`]).
    pub const SESSION_MAC: u8 = 0x80;
}

/// REMP message types (the `type` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// 0: one classic CAN frame.
    Can,
    /// 2: CAN controller configuration request or response.
    CanConfig,
    /// 3: pairing start, submit or ack.
    Pairing,
    /// 4: CLI request or response.
    Cli,
    /// 5: CLI_TELEMETRY, a command typed on the dongle's UART console and its output.
    CliTelemetry,
    /// 0x10 (extension): many CAN or CAN FD frames with timestamps.
    CanBatch,
    /// 0x11 (extension): bus state and error counters.
    BusStatus,
    /// 0x12 (extension): forget the token (unpair).
    Forget,
    /// 0x13 (extension): session authentication handshake.
    Auth,
    /// Any other value, carried as an opaque payload.
    Other(u8),
}

impl MsgType {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            MsgType::Can => 0,
            MsgType::CanConfig => 2,
            MsgType::Pairing => 3,
            MsgType::Cli => 4,
            MsgType::CliTelemetry => 5,
            MsgType::CanBatch => 0x10,
            MsgType::BusStatus => 0x11,
            MsgType::Forget => 0x12,
            MsgType::Auth => 0x13,
            MsgType::Other(v) => v,
        }
    }

    /// Parses the wire value; unknown values become [`MsgType::Other`].
    pub const fn from_u8(v: u8) -> Self {
        match v {
            0 => MsgType::Can,
            2 => MsgType::CanConfig,
            3 => MsgType::Pairing,
            4 => MsgType::Cli,
            5 => MsgType::CliTelemetry,
            0x10 => MsgType::CanBatch,
            0x11 => MsgType::BusStatus,
            0x12 => MsgType::Forget,
            0x13 => MsgType::Auth,
            other => MsgType::Other(other),
        }
    }

    /// Whether a dongle accepts this type from a host only with its token (or a session MAC).
    /// PAIRING and AUTH are the only requests sent without one.
    pub const fn requires_token(self) -> bool {
        !matches!(self, MsgType::Pairing | MsgType::Auth)
    }
}

/// A REMP header; `token` borrows the token (or session MAC) bytes of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The message type; [`encode`] checks that it agrees with the payload.
    pub msg_type: MsgType,
    /// Flag bits, see [`flags`].
    pub flags: u8,
    /// The sender's firmware build number (0 from hosts).
    pub fw_build: u16,
    /// The dongle this packet is from or for.
    pub device_id: DeviceId,
    /// The sender's sequence number; answers echo the request's.
    pub seq: u32,
    /// The sender's clock in microseconds.
    pub timestamp_us: u64,
    /// The raw token (32 bytes), a session MAC (16 bytes) or nothing.
    pub token: &'a [u8],
}

impl<'a> Header<'a> {
    /// A header with flags 0, fw_build 0, timestamp 0 and no token.
    pub const fn new(msg_type: MsgType, device_id: DeviceId, seq: u32) -> Self {
        Header {
            msg_type,
            flags: 0,
            fw_build: 0,
            device_id,
            seq,
            timestamp_us: 0,
            token: &[],
        }
    }

    /// Whether the token field holds a session MAC.
    pub const fn has_session_mac(&self) -> bool {
        self.flags & flags::SESSION_MAC != 0
    }
}

/// Every REMP payload this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Type 0.
    Can(CanFrame),
    /// Type 2, request or response.
    CanConfig(CanConfig),
    /// Type 3, action 1.
    PairingStart(PairingStart),
    /// Type 3, action 2.
    PairingSubmit(PairingSubmit),
    /// Type 3, action 3.
    PairingAck(PairingAck),
    /// Type 4, action 1.
    CliRequest(CliRequest<'a>),
    /// Type 4, action 2.
    CliResponse(CliResponse<'a>),
    /// Type 5, action 1.
    CliTelemetry(CliTelemetry<'a>),
    /// Type 0x10 (extension).
    CanBatch(Batch<'a>),
    /// Type 0x11 (extension).
    BusStatus(BusStatus),
    /// Type 0x12 (extension).
    Forget(Forget),
    /// Type 0x13 (extension).
    Auth(AuthMessage),
    /// A type this crate does not know ([`MsgType::Other`]), opaque bytes.
    Other(&'a [u8]),
}

impl Payload<'_> {
    /// The message type this payload travels as (`None` for [`Payload::Other`], whose type is
    /// the header's).
    pub const fn msg_type(&self) -> Option<MsgType> {
        Some(match self {
            Payload::Can(_) => MsgType::Can,
            Payload::CanConfig(_) => MsgType::CanConfig,
            Payload::PairingStart(_) | Payload::PairingSubmit(_) | Payload::PairingAck(_) => {
                MsgType::Pairing
            }
            Payload::CliRequest(_) | Payload::CliResponse(_) => MsgType::Cli,
            Payload::CliTelemetry(_) => MsgType::CliTelemetry,
            Payload::CanBatch(_) => MsgType::CanBatch,
            Payload::BusStatus(_) => MsgType::BusStatus,
            Payload::Forget(_) => MsgType::Forget,
            Payload::Auth(_) => MsgType::Auth,
            Payload::Other(_) => return None,
        })
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        match self {
            Payload::Can(p) => p.write(w),
            Payload::CanConfig(p) => p.write(w),
            Payload::PairingStart(p) => p.write(w),
            Payload::PairingSubmit(p) => p.write(w),
            Payload::PairingAck(p) => p.write(w),
            Payload::CliRequest(p) => p.write(w),
            Payload::CliResponse(p) => p.write(w),
            Payload::CliTelemetry(p) => p.write(w),
            Payload::Other(b) => w.put(b),
            Payload::CanBatch(b) => w.put(b.as_bytes()),
            Payload::BusStatus(p) => p.write(w),
            Payload::Forget(p) => p.write(w),
            Payload::Auth(p) => p.write(w),
        }
    }

    /// Decodes the payload of a packet of type `msg_type`.
    pub fn decode(msg_type: MsgType, bytes: &[u8]) -> Result<Payload<'_>> {
        let action = bytes.first().copied();
        Ok(match msg_type {
            MsgType::Can => Payload::Can(CanFrame::decode(bytes)?),
            MsgType::CanConfig => Payload::CanConfig(CanConfig::decode(bytes)?),
            MsgType::Pairing => match action {
                Some(pairing::ACTION_START) => Payload::PairingStart(PairingStart::decode(bytes)?),
                Some(pairing::ACTION_SUBMIT) => {
                    Payload::PairingSubmit(PairingSubmit::decode(bytes)?)
                }
                Some(pairing::ACTION_ACK) => Payload::PairingAck(PairingAck::decode(bytes)?),
                Some(_) => return Err(Error::InvalidField("action")),
                None => return Err(Error::Truncated),
            },
            MsgType::Cli => match action {
                Some(cli::ACTION_REQUEST) => Payload::CliRequest(CliRequest::decode(bytes)?),
                Some(cli::ACTION_RESPONSE) => Payload::CliResponse(CliResponse::decode(bytes)?),
                Some(_) => return Err(Error::InvalidField("action")),
                None => return Err(Error::Truncated),
            },
            MsgType::CliTelemetry => Payload::CliTelemetry(CliTelemetry::decode(bytes)?),
            MsgType::CanBatch => Payload::CanBatch(Batch::parse(bytes)?),
            MsgType::BusStatus => Payload::BusStatus(BusStatus::decode(bytes)?),
            MsgType::Forget => Payload::Forget(Forget::decode(bytes)?),
            MsgType::Auth => Payload::Auth(AuthMessage::decode(bytes)?),
            MsgType::Other(_) => Payload::Other(bytes),
        })
    }
}

/// A decoded REMP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The header, with the token borrowed from the packet.
    pub header: Header<'a>,
    /// The decoded payload.
    pub payload: Payload<'a>,
}

/// Encodes a packet into `out`; returns the number of bytes written.
///
/// Fails if the header's type disagrees with the payload, the token is longer than 64 bytes,
/// the session-MAC flag is set with a token field that is not 16 bytes, a payload field is out
/// of range, the packet exceeds [`MAX_PACKET_LEN`] or `out` is too small.
pub fn encode(packet: &Packet<'_>, out: &mut [u8]) -> Result<usize> {
    let header = &packet.header;
    match packet.payload.msg_type() {
        Some(t) if t != header.msg_type => return Err(Error::InvalidField("msg_type")),
        Some(_) => {}
        // An opaque payload needs a type this crate does not know, or it would decode
        // differently from what was encoded.
        None => match header.msg_type {
            MsgType::Other(v) if matches!(MsgType::from_u8(v), MsgType::Other(_)) => {}
            _ => return Err(Error::InvalidField("msg_type")),
        },
    }
    check_token_len(header.flags, header.token.len())?;
    let mut w = Writer::new(out);
    write_header(header, &mut w)?;
    w.put(header.token)?;
    packet.payload.write(&mut w)?;
    let total = w.position();
    if total > MAX_PACKET_LEN {
        return Err(Error::TooLarge {
            field: "packet",
            max: MAX_PACKET_LEN,
        });
    }
    Ok(total)
}

fn check_token_len(flags: u8, token_len: usize) -> Result<()> {
    if token_len > MAX_TOKEN_LEN {
        return Err(Error::InvalidField("token_len"));
    }
    if flags & flags::SESSION_MAC != 0 && token_len != SESSION_MAC_LEN {
        return Err(Error::InvalidField("token_len"));
    }
    Ok(())
}

pub(crate) fn write_header(h: &Header<'_>, w: &mut Writer<'_>) -> Result<()> {
    w.put(&MAGIC)?;
    w.u8(VERSION)?;
    w.u8(h.msg_type.to_u8())?;
    w.u8(h.flags)?;
    w.u8(0)?;
    w.u8(h.token.len() as u8)?;
    w.u16_be(h.fw_build)?;
    w.put(h.device_id.as_bytes())?;
    w.u32_be(h.seq)?;
    w.u64_be(h.timestamp_us)
}

/// Decodes one REMP packet: the header, the token field and the payload of its type.
///
/// The reserved header byte is ignored. Unknown types decode as [`Payload::Other`]. Whether the
/// token is right is for the receiver to decide (see [`MsgType::requires_token`] and
/// [`crate::ext::SessionMac::open`]).
pub fn decode(bytes: &[u8]) -> Result<Packet<'_>> {
    let (header, payload) = decode_header(bytes)?;
    let payload = Payload::decode(header.msg_type, payload)?;
    Ok(Packet { header, payload })
}

/// Decodes the header and token field only; returns the header and the raw payload bytes.
/// Useful to route or authenticate a packet before decoding its payload.
pub fn decode_header(bytes: &[u8]) -> Result<(Header<'_>, &[u8])> {
    if bytes.len() > MAX_PACKET_LEN {
        return Err(Error::TooLarge {
            field: "packet",
            max: MAX_PACKET_LEN,
        });
    }
    let mut r = Reader::new(bytes);
    if r.array::<4>()? != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    let msg_type = MsgType::from_u8(r.u8()?);
    let flags = r.u8()?;
    let _reserved = r.u8()?;
    let token_len = usize::from(r.u8()?);
    let fw_build = r.u16_be()?;
    let device_id = DeviceId(r.array()?);
    let seq = r.u32_be()?;
    let timestamp_us = r.u64_be()?;
    check_token_len(flags, token_len)?;
    let token = r.bytes(token_len)?;
    let header = Header {
        msg_type,
        flags,
        fw_build,
        device_id,
        seq,
        timestamp_us,
        token,
    };
    Ok((header, r.rest()))
}
