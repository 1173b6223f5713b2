//! Discovery v1, the "OBD2" packet family (little-endian), exactly as today's dongles speak it.
//!
//! A host sends DISCOVER (empty payload); every dongle answers with ANNOUNCE, echoing the seq
//! and describing itself in TLVs. Current header (18 bytes):
//!
//! | off | size | field       | value                                   |
//! |-----|------|-------------|-----------------------------------------|
//! | 0   | 4    | magic       | `"OBD2"`                                |
//! | 4   | 1    | proto       | 1                                       |
//! | 5   | 1    | msg_type    | 0x01 DISCOVER, 0x02 ANNOUNCE            |
//! | 6   | 1    | flags       | 0                                       |
//! | 7   | 1    | header_len  | 18                                      |
//! | 8   | 2    | payload_len | u16 LE                                  |
//! | 10  | 4    | seq         | u32 LE                                  |
//! | 14  | 4    | crc32       | u32 LE, CRC-32/ISO-HDLC                 |
//!
//! The legacy header (16 bytes), accepted when decoding, is the same up to offset 10, then
//! `seq` u16 LE at 10 and `crc32` u32 LE at 12, with header_len = 16. In both, the CRC covers
//! the header with its crc field zeroed, followed by the payload.

use crate::crc32;
use crate::ids::DeviceId;
use crate::wire::{Reader, Writer};
use crate::{Error, MAX_PACKET_LEN, Result};

/// The 4 magic bytes that open every Discovery packet.
pub const MAGIC: [u8; 4] = *b"OBD2";
/// The only Discovery protocol version.
pub const PROTO: u8 = 1;
/// The current header length.
pub const HEADER_LEN: usize = 18;
/// The legacy header length (u16 seq), accepted when decoding.
pub const LEGACY_HEADER_LEN: usize = 16;
/// The UDP port dongles listen on for DISCOVER by default.
pub const DEFAULT_PORT: u16 = 50000;
/// The longest fw_build string (the TLV length is a u8).
pub const MAX_FW_BUILD_LEN: usize = 255;

/// TLV type numbers of ANNOUNCE.
pub mod tlv {
    /// Device id, 8 bytes.
    pub const DEVICE_ID: u8 = 0x01;
    /// Firmware build, UTF-8, 0..=255 bytes.
    pub const FW_BUILD: u8 = 0x02;
    /// REMP UDP port, u16 LE.
    pub const UDP_PORT: u8 = 0x03;
    /// Capability bit set, u32 LE (see [`crate::caps`]).
    pub const CAPABILITIES: u8 = 0x04;
    /// REMP protocol version, u16 LE.
    pub const PROTO_VER: u8 = 0x05;
    /// LAN IPv4 address, 4 bytes in network order.
    pub const LAN_IP: u8 = 0x06;
    /// Pairing state, u8 (0 normal, 1 pairing mode).
    pub const PAIRING_STATE: u8 = 0x07;
    /// Pairing nonce, 16 bytes, only in pairing mode.
    pub const PAIRING_NONCE: u8 = 0x08;
}

/// Discovery message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// 0x01, host to dongle: who is there?
    Discover,
    /// 0x02, dongle to host: this is me.
    Announce,
}

impl MsgType {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            MsgType::Discover => 0x01,
            MsgType::Announce => 0x02,
        }
    }

    /// Parses the wire value.
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            0x01 => Ok(MsgType::Discover),
            0x02 => Ok(MsgType::Announce),
            other => Err(Error::UnknownMsgType(other)),
        }
    }
}

/// Which header layout a packet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderFormat {
    /// The current 18-byte header with a u32 seq.
    Current,
    /// The legacy 16-byte header with a u16 seq (decoded; encoded only on request).
    Legacy,
}

impl HeaderFormat {
    /// The header length of this format.
    pub const fn len(self) -> usize {
        match self {
            HeaderFormat::Current => HEADER_LEN,
            HeaderFormat::Legacy => LEGACY_HEADER_LEN,
        }
    }

    /// Never true: a header always has bytes (present for API symmetry with `len`).
    pub const fn is_empty(self) -> bool {
        false
    }
}

/// A decoded Discovery header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message type.
    pub msg_type: MsgType,
    /// The flags byte (0 today; carried through unchanged).
    pub flags: u8,
    /// The header layout the packet used.
    pub format: HeaderFormat,
    /// The sequence number; DISCOVER's is echoed in ANNOUNCE. Legacy headers carry 16 bits.
    pub seq: u32,
}

/// Pairing state of ANNOUNCE TLV 0x07.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PairingState {
    /// 0: normal operation.
    #[default]
    Normal,
    /// 1: pairing mode (a PIN is shown, the 120 s window is open).
    Pairing,
}

impl PairingState {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            PairingState::Normal => 0,
            PairingState::Pairing => 1,
        }
    }

    /// Parses the wire value.
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(PairingState::Normal),
            1 => Ok(PairingState::Pairing),
            _ => Err(Error::InvalidField("pairing_state")),
        }
    }
}

/// The contents of an ANNOUNCE.
///
/// `device_id` is required. A missing `udp_port` decodes as 0 ("no UDP service", e.g. a
/// USB-only dongle), a missing `capabilities` as 0 (no extensions, the safe reading), a missing
/// `proto_ver` as 1 and a missing `pairing_state` as normal. The encoder always writes these
/// five TLVs and writes the `Option` ones only when they are `Some`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce<'a> {
    /// TLV 0x01.
    pub device_id: DeviceId,
    /// TLV 0x02, UTF-8, at most 255 bytes.
    pub fw_build: Option<&'a str>,
    /// TLV 0x03: the UDP port the dongle serves REMP on.
    pub udp_port: u16,
    /// TLV 0x04: see [`crate::caps`].
    pub capabilities: u32,
    /// TLV 0x05: the REMP version (1).
    pub proto_ver: u16,
    /// TLV 0x06: the dongle's IPv4 address on the LAN.
    pub lan_ip: Option<[u8; 4]>,
    /// TLV 0x07.
    pub pairing_state: PairingState,
    /// TLV 0x08: present only in pairing mode.
    pub pairing_nonce: Option<[u8; 16]>,
}

/// The body of a Discovery packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// DISCOVER has no payload.
    Discover,
    /// ANNOUNCE carries TLVs.
    Announce(Announce<'a>),
}

/// A decoded Discovery packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The header (its msg_type agrees with the body).
    pub header: Header,
    /// The body.
    pub body: Body<'a>,
}

/// Encodes a DISCOVER with the current header; returns the number of bytes written.
pub fn encode_discover(seq: u32, out: &mut [u8]) -> Result<usize> {
    encode(&Packet::discover(seq), out)
}

/// Encodes an ANNOUNCE with the current header; returns the number of bytes written.
pub fn encode_announce(announce: &Announce<'_>, seq: u32, out: &mut [u8]) -> Result<usize> {
    let packet = Packet {
        header: Header {
            msg_type: MsgType::Announce,
            flags: 0,
            format: HeaderFormat::Current,
            seq,
        },
        body: Body::Announce(*announce),
    };
    encode(&packet, out)
}

impl Packet<'_> {
    /// A DISCOVER with the current header.
    pub const fn discover(seq: u32) -> Self {
        Packet {
            header: Header {
                msg_type: MsgType::Discover,
                flags: 0,
                format: HeaderFormat::Current,
                seq,
            },
            body: Body::Discover,
        }
    }
}

/// Encodes any Discovery packet, in the header format its header names (the legacy format
/// exists so that a simulator can imitate old firmware; it needs `seq <= 0xFFFF`).
pub fn encode(packet: &Packet<'_>, out: &mut [u8]) -> Result<usize> {
    let header = &packet.header;
    let body_type = match packet.body {
        Body::Discover => MsgType::Discover,
        Body::Announce(_) => MsgType::Announce,
    };
    if header.msg_type != body_type {
        return Err(Error::InvalidField("msg_type"));
    }
    let header_len = header.format.len();
    let mut w = Writer::new(out);
    w.put(&MAGIC)?;
    w.u8(PROTO)?;
    w.u8(header.msg_type.to_u8())?;
    w.u8(header.flags)?;
    w.u8(header_len as u8)?;
    w.u16_le(0)?; // payload_len, patched below
    match header.format {
        HeaderFormat::Current => w.u32_le(header.seq)?,
        HeaderFormat::Legacy => {
            let seq = u16::try_from(header.seq).map_err(|_| Error::InvalidField("seq"))?;
            w.u16_le(seq)?;
        }
    }
    w.u32_le(0)?; // crc32, zero while computing it
    if let Body::Announce(a) = &packet.body {
        encode_tlvs(a, &mut w)?;
    }
    let total = w.position();
    if total > MAX_PACKET_LEN {
        return Err(Error::TooLarge {
            field: "packet",
            max: MAX_PACKET_LEN,
        });
    }
    let payload_len = (total - header_len) as u16;
    w.patch(8, &payload_len.to_le_bytes())?;
    let crc = crc32::checksum(w.written());
    w.patch(header_len - 4, &crc.to_le_bytes())?;
    Ok(total)
}

fn put_tlv(w: &mut Writer<'_>, t: u8, value: &[u8]) -> Result<()> {
    let len = u8::try_from(value.len()).map_err(|_| Error::TooLarge {
        field: "tlv",
        max: MAX_FW_BUILD_LEN,
    })?;
    w.u8(t)?;
    w.u8(len)?;
    w.put(value)
}

fn encode_tlvs(a: &Announce<'_>, w: &mut Writer<'_>) -> Result<()> {
    put_tlv(w, tlv::DEVICE_ID, a.device_id.as_bytes())?;
    if let Some(fw) = a.fw_build {
        if fw.len() > MAX_FW_BUILD_LEN {
            return Err(Error::TooLarge {
                field: "fw_build",
                max: MAX_FW_BUILD_LEN,
            });
        }
        put_tlv(w, tlv::FW_BUILD, fw.as_bytes())?;
    }
    put_tlv(w, tlv::UDP_PORT, &a.udp_port.to_le_bytes())?;
    put_tlv(w, tlv::CAPABILITIES, &a.capabilities.to_le_bytes())?;
    put_tlv(w, tlv::PROTO_VER, &a.proto_ver.to_le_bytes())?;
    if let Some(ip) = a.lan_ip {
        put_tlv(w, tlv::LAN_IP, &ip)?;
    }
    put_tlv(w, tlv::PAIRING_STATE, &[a.pairing_state.to_u8()])?;
    if let Some(nonce) = a.pairing_nonce {
        put_tlv(w, tlv::PAIRING_NONCE, &nonce)?;
    }
    Ok(())
}

/// Decodes and verifies one Discovery packet (one UDP datagram or one stream packet).
///
/// The checks, in order: size limits, magic, proto = 1, header_len 18 or 16, payload_len equal
/// to the bytes present, CRC, msg_type, then the body (DISCOVER must be empty; ANNOUNCE TLVs
/// must be well formed, known TLVs must have their exact length and appear at most once,
/// unknown TLVs are skipped).
pub fn decode(bytes: &[u8]) -> Result<Packet<'_>> {
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
    let proto = r.u8()?;
    if proto != PROTO {
        return Err(Error::UnsupportedVersion(proto));
    }
    let msg_type = r.u8()?;
    let flags = r.u8()?;
    let header_len = r.u8()?;
    let format = match usize::from(header_len) {
        HEADER_LEN => HeaderFormat::Current,
        LEGACY_HEADER_LEN => HeaderFormat::Legacy,
        _ => return Err(Error::BadHeaderLen(header_len)),
    };
    let payload_len = usize::from(r.u16_le()?);
    let seq = match format {
        HeaderFormat::Current => r.u32_le()?,
        HeaderFormat::Legacy => u32::from(r.u16_le()?),
    };
    let carried = r.u32_le()?;
    let payload = r.rest();
    if payload.len() != payload_len {
        return Err(Error::LengthMismatch);
    }
    let head = bytes.get(..format.len() - 4).ok_or(Error::Truncated)?;
    let computed = crc32::checksum_parts(&[head, &[0; 4], payload]);
    if computed != carried {
        return Err(Error::BadCrc { carried, computed });
    }
    let msg_type = MsgType::from_u8(msg_type)?;
    let body = match msg_type {
        MsgType::Discover if payload.is_empty() => Body::Discover,
        MsgType::Discover => return Err(Error::TrailingBytes),
        MsgType::Announce => Body::Announce(decode_tlvs(payload)?),
    };
    Ok(Packet {
        header: Header {
            msg_type,
            flags,
            format,
            seq,
        },
        body,
    })
}

fn exact<const N: usize>(value: &[u8], field: &'static str) -> Result<[u8; N]> {
    value.try_into().map_err(|_| Error::InvalidField(field))
}

fn decode_tlvs(payload: &[u8]) -> Result<Announce<'_>> {
    let mut r = Reader::new(payload);
    let mut seen = 0u16;
    let mut device_id = None;
    let mut a = Announce {
        device_id: DeviceId::default(),
        fw_build: None,
        udp_port: 0,
        capabilities: 0,
        proto_ver: 1,
        lan_ip: None,
        pairing_state: PairingState::Normal,
        pairing_nonce: None,
    };
    while r.remaining() > 0 {
        let t = r.u8()?;
        let len = usize::from(r.u8()?);
        let value = r.bytes(len)?;
        if (1..=8).contains(&t) {
            let bit = 1u16 << t;
            if seen & bit != 0 {
                return Err(Error::DuplicateField(tlv_name(t)));
            }
            seen |= bit;
        }
        match t {
            tlv::DEVICE_ID => device_id = Some(DeviceId(exact(value, "device_id")?)),
            tlv::FW_BUILD => {
                let s = core::str::from_utf8(value).map_err(|_| Error::InvalidField("fw_build"))?;
                a.fw_build = Some(s);
            }
            tlv::UDP_PORT => a.udp_port = u16::from_le_bytes(exact(value, "udp_port")?),
            tlv::CAPABILITIES => a.capabilities = u32::from_le_bytes(exact(value, "capabilities")?),
            tlv::PROTO_VER => a.proto_ver = u16::from_le_bytes(exact(value, "proto_ver")?),
            tlv::LAN_IP => a.lan_ip = Some(exact(value, "lan_ip")?),
            tlv::PAIRING_STATE => {
                let [v] = exact::<1>(value, "pairing_state")?;
                a.pairing_state = PairingState::from_u8(v)?;
            }
            tlv::PAIRING_NONCE => a.pairing_nonce = Some(exact(value, "pairing_nonce")?),
            _ => {} // Unknown TLVs are skipped: that is how Discovery grows.
        }
    }
    a.device_id = device_id.ok_or(Error::MissingField("device_id"))?;
    Ok(a)
}

fn tlv_name(t: u8) -> &'static str {
    match t {
        tlv::DEVICE_ID => "device_id",
        tlv::FW_BUILD => "fw_build",
        tlv::UDP_PORT => "udp_port",
        tlv::CAPABILITIES => "capabilities",
        tlv::PROTO_VER => "proto_ver",
        tlv::LAN_IP => "lan_ip",
        tlv::PAIRING_STATE => "pairing_state",
        _ => "pairing_nonce",
    }
}
