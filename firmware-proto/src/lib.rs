//! The wire protocol between bridge hosts and CAN dongle firmware.
//!
//! The crate implements, byte for byte, the two packet families that today's dongles speak
//! ([`discovery`] "OBD2" v1, little-endian, and [`remp`] "REMP" v1, big-endian), the byte-stream
//! link framing used on USB serial and TCP ([`stream`]), and the opt-in extensions announced by
//! capability bits ([`caps`], [`ext`]).
//!
//! The codec is `no_std` and never allocates: encoders write into a caller's buffer and return
//! the number of bytes written, decoders borrow from their input. Every decoder checks every
//! length before reading, so no input can make it panic. `PROTOCOL.md` next to this crate
//! documents every packet byte by byte.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod bus_time;
pub mod caps;
pub mod crc32;
pub mod discovery;
mod error;
pub mod ext;
pub mod ids;
pub mod remp;
#[cfg(feature = "serde")]
mod serde_text;
pub mod stream;
mod wire;

pub use error::{Error, Result};

/// The largest packet of either family, in bytes, that this crate encodes or decodes.
///
/// 1472 bytes is the payload of one unfragmented UDP datagram on a 1500-byte Ethernet MTU
/// (1500 - 20 bytes IPv4 header - 8 bytes UDP header), so a packet never needs IP fragmentation
/// on a LAN, and a stream receiver knows how much buffer one packet can need.
pub const MAX_PACKET_LEN: usize = 1472;

/// The largest stream frame on the wire, in bytes: a [`MAX_PACKET_LEN`] packet plus its 4-byte
/// CRC trailer, COBS-encoded (one overhead byte per 254 bytes), plus the 0x00 terminator.
pub const MAX_FRAME_LEN: usize = stream::max_frame_len(MAX_PACKET_LEN);
