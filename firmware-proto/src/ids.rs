//! Typed values for the identifiers and secrets that travel in packets.
//!
//! Wrapping raw bytes in types keeps a device id from being passed where a correlation id is
//! expected, keeps secrets out of logs (their `Debug` output is redacted) and makes secret
//! comparisons constant-time.

use core::fmt;
use core::str::FromStr;

use subtle::ConstantTimeEq;

use crate::{Error, Result};

/// Parses exactly `2 * N` hex digits (either case) into `N` bytes.
fn parse_hex<const N: usize>(s: &str, field: &'static str) -> Result<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return Err(Error::InvalidField(field));
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let hi = hex_value(pair.first().copied()).ok_or(Error::InvalidField(field))?;
        let lo = hex_value(pair.get(1).copied()).ok_or(Error::InvalidField(field))?;
        *byte = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_value(c: Option<u8>) -> Option<u8> {
    match c? {
        c @ b'0'..=b'9' => Some(c - b'0'),
        c @ b'a'..=b'f' => Some(c - b'a' + 10),
        c @ b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

/// The 8-byte identity of a dongle, shown as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId(pub [u8; 8]);

impl DeviceId {
    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 8]) -> Self {
        Self(bytes)
    }

    /// The raw bytes, as on the wire.
    pub const fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = Error;

    /// Accepts exactly 16 hex digits, in either case.
    fn from_str(s: &str) -> Result<Self> {
        parse_hex(s, "device_id").map(Self)
    }
}

/// For hosts that read ids as owned text, such as a database column (`#[sqlx(try_from = "String")]`).
#[cfg(feature = "std")]
impl TryFrom<std::string::String> for DeviceId {
    type Error = Error;

    fn try_from(s: std::string::String) -> Result<Self> {
        s.parse()
    }
}

/// A 16-byte correlation id (a UUID as raw bytes) that ties an answer to its request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CorrelationId(pub [u8; 16]);

impl CorrelationId {
    /// Wraps raw bytes (for example `uuid::Uuid::as_bytes()`).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw bytes, as on the wire.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for CorrelationId {
    /// The hyphenated UUID form, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write_hex(f, &b[..4])?;
        f.write_str("-")?;
        write_hex(f, &b[4..6])?;
        f.write_str("-")?;
        write_hex(f, &b[6..8])?;
        f.write_str("-")?;
        write_hex(f, &b[8..10])?;
        f.write_str("-")?;
        write_hex(f, &b[10..])
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CorrelationId({self})")
    }
}

impl FromStr for CorrelationId {
    type Err = Error;

    /// Accepts the hyphenated UUID form or 32 bare hex digits.
    fn from_str(s: &str) -> Result<Self> {
        let mut digits = [0u8; 32];
        let mut n = 0;
        for (i, c) in s.bytes().enumerate() {
            if c == b'-' && matches!(i, 8 | 13 | 18 | 23) && s.len() == 36 {
                continue;
            }
            *digits.get_mut(n).ok_or(Error::InvalidField("corr_id"))? = c;
            n += 1;
        }
        let digits =
            core::str::from_utf8(&digits[..n]).map_err(|_| Error::InvalidField("corr_id"))?;
        parse_hex(digits, "corr_id").map(Self)
    }
}

/// The 32-byte secret a paired dongle shares with its owner's server.
///
/// `Debug` never prints it, and equality is constant-time so that comparing a received token
/// leaks nothing through timing. It is `Copy` so that packets holding it stay `Copy`.
#[derive(Clone, Copy)]
pub struct DongleToken([u8; 32]);

impl DongleToken {
    /// The token length on the wire.
    pub const LEN: usize = 32;

    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Wraps a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| Error::InvalidField("token"))
    }

    /// The raw secret bytes. Keep them out of logs.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time comparison with raw bytes of any length (a length mismatch is `false`).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        other.len() == Self::LEN && bool::from(self.0.as_slice().ct_eq(other))
    }
}

impl PartialEq for DongleToken {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(&other.0)
    }
}

impl Eq for DongleToken {}

impl fmt::Debug for DongleToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DongleToken(**redacted**)")
    }
}

/// The 6-digit pairing PIN a dongle shows while in pairing mode, as 6 ASCII digits.
#[derive(Clone, Copy)]
pub struct Pin([u8; 6]);

impl Pin {
    /// Accepts exactly 6 ASCII digits and nothing else (no spaces, no signs).
    pub fn parse(s: &str) -> Result<Self> {
        let bytes: [u8; 6] = s
            .as_bytes()
            .try_into()
            .map_err(|_| Error::InvalidField("pin"))?;
        Self::from_bytes(bytes)
    }

    /// Accepts 6 bytes that must all be ASCII digits.
    pub fn from_bytes(bytes: [u8; 6]) -> Result<Self> {
        if bytes.iter().all(u8::is_ascii_digit) {
            Ok(Self(bytes))
        } else {
            Err(Error::InvalidField("pin"))
        }
    }

    /// The 6 ASCII digits, as on the wire.
    pub const fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// The PIN as text (always 6 ASCII digits).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("")
    }

    /// Constant-time comparison, for the dongle's PIN check.
    pub fn ct_eq(&self, other: &Pin) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl PartialEq for Pin {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for Pin {}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(**redacted**)")
    }
}

/// A CAN identifier: standard (11 bits) or extended (29 bits).
///
/// The fields are private so that every value is valid: the constructors check the range.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CanId {
    raw: u32,
    extended: bool,
}

impl CanId {
    /// The largest standard identifier.
    pub const MAX_STANDARD: u32 = 0x7FF;
    /// The largest extended identifier.
    pub const MAX_EXTENDED: u32 = 0x1FFF_FFFF;
    /// The wire bit that marks an extended identifier.
    pub const EXTENDED_FLAG: u32 = 0x8000_0000;

    /// A standard 11-bit identifier (0..=0x7FF).
    pub fn standard(id: u16) -> Result<Self> {
        Self::new(u32::from(id), false)
    }

    /// An extended 29-bit identifier (0..=0x1FFF_FFFF).
    pub fn extended(id: u32) -> Result<Self> {
        Self::new(id, true)
    }

    /// An identifier of either format, checked against that format's range.
    pub fn new(id: u32, extended: bool) -> Result<Self> {
        let max = if extended {
            Self::MAX_EXTENDED
        } else {
            Self::MAX_STANDARD
        };
        if id > max {
            return Err(Error::InvalidField("can_id"));
        }
        Ok(Self { raw: id, extended })
    }

    /// The identifier bits without the format flag.
    pub const fn raw(&self) -> u32 {
        self.raw
    }

    /// Whether this is a 29-bit identifier.
    pub const fn is_extended(&self) -> bool {
        self.extended
    }

    /// The u32 on the wire: the identifier with bit 31 set for an extended one.
    pub const fn to_wire(&self) -> u32 {
        if self.extended {
            self.raw | Self::EXTENDED_FLAG
        } else {
            self.raw
        }
    }

    /// Parses the wire u32; bits 29 and 30 must be clear, and a standard id must fit 11 bits.
    pub fn from_wire(wire: u32) -> Result<Self> {
        Self::new(wire & !Self::EXTENDED_FLAG, wire & Self::EXTENDED_FLAG != 0)
    }
}

impl fmt::Display for CanId {
    /// The candump form: 3 hex digits for a standard id, 8 for an extended one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.extended {
            write!(f, "{:08X}", self.raw)
        } else {
            write!(f, "{:03X}", self.raw)
        }
    }
}

impl fmt::Debug for CanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CanId({self})")
    }
}
