//! The one error type of the crate.

use core::fmt;

/// A shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong while encoding, decoding or verifying a packet.
///
/// The enum is `#[non_exhaustive]` so that new extensions can add reasons without breaking
/// callers; match the variants you act on and treat the rest as "packet rejected".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The caller's output buffer cannot hold the encoded bytes.
    OutputTooSmall {
        /// How many bytes the encoding needs at least.
        needed: usize,
    },
    /// The input ends before a field that its layout or its length fields promise.
    Truncated,
    /// The input is longer than its layout and length fields account for.
    TrailingBytes,
    /// A packet or field is larger than its documented maximum.
    TooLarge {
        /// The field or packet that is too large.
        field: &'static str,
        /// Its maximum size in bytes.
        max: usize,
    },
    /// The packet does not start with the magic of its family.
    BadMagic,
    /// The protocol version of the packet is not one this crate speaks.
    UnsupportedVersion(u8),
    /// The Discovery header length is neither 18 nor the legacy 16.
    BadHeaderLen(u8),
    /// A length field disagrees with the number of bytes present.
    LengthMismatch,
    /// The CRC-32 carried by the packet does not match its contents.
    BadCrc {
        /// The CRC carried by the packet.
        carried: u32,
        /// The CRC computed over the packet.
        computed: u32,
    },
    /// The message type is not one this decoder knows.
    UnknownMsgType(u8),
    /// A field holds a value outside its documented range (the name says which field).
    InvalidField(&'static str),
    /// A required field (or TLV) is absent.
    MissingField(&'static str),
    /// A known TLV appears twice in one packet.
    DuplicateField(&'static str),
    /// The COBS encoding of a stream frame is invalid.
    Cobs,
    /// The session MAC of a packet does not verify.
    BadMac,
    /// The packet's sequence number is not above the last one accepted in this session.
    Replay {
        /// The sequence number the packet carries.
        seq: u32,
        /// The last sequence number accepted in this session.
        last: u32,
    },
    /// The session has sent 2^32 - 1 packets and must authenticate again for fresh keys.
    SessionExhausted,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::OutputTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
            Error::Truncated => f.write_str("input truncated"),
            Error::TrailingBytes => f.write_str("unexpected trailing bytes"),
            Error::TooLarge { field, max } => write!(f, "{field} larger than {max} bytes"),
            Error::BadMagic => f.write_str("bad magic"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            Error::BadHeaderLen(l) => write!(f, "bad header length {l}"),
            Error::LengthMismatch => f.write_str("length field disagrees with packet size"),
            Error::BadCrc { carried, computed } => {
                write!(
                    f,
                    "bad CRC: carried {carried:#010x}, computed {computed:#010x}"
                )
            }
            Error::UnknownMsgType(t) => write!(f, "unknown message type {t:#04x}"),
            Error::InvalidField(name) => write!(f, "invalid value in field {name}"),
            Error::MissingField(name) => write!(f, "missing field {name}"),
            Error::DuplicateField(name) => write!(f, "duplicate field {name}"),
            Error::Cobs => f.write_str("invalid COBS encoding"),
            Error::BadMac => f.write_str("session MAC does not verify"),
            Error::Replay { seq, last } => {
                write!(
                    f,
                    "replayed or reordered packet: seq {seq} <= last accepted {last}"
                )
            }
            Error::SessionExhausted => f.write_str("session sequence numbers exhausted"),
        }
    }
}

// `core::error::Error` is the same trait as `std::error::Error`, so hosts get `?` into
// `anyhow`/`Box<dyn Error>` without the `std` feature.
impl core::error::Error for Error {}
