//! Serde for the typed values of [`ids`](crate::ids) and the CAN mode, in the text forms the hosts'
//! JSON uses (feature `serde`).
//!
//! Each value is checked while it is read, so a message that deserializes holds only valid values:
//! a device id is exactly 16 lower-case hex digits (the one form every host writes, so that a
//! database key never has two spellings), a PIN exactly 6 ASCII digits, a dongle token exactly 32
//! bytes in standard base64 with padding, and a CAN mode one of its four names.

use core::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, DongleToken, Pin};
use crate::remp::CanMode;

/// Reads a string and turns it into a value with `parse`, or fails with what was `expected`.
struct TextVisitor<T> {
    expected: &'static str,
    parse: fn(&str) -> Option<T>,
}

impl<T> Visitor<'_> for TextVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        // The rejected text is not echoed: it may be a secret (a PIN, a token) typed in the wrong
        // field, and errors reach logs.
        (self.parse)(v).ok_or_else(|| E::invalid_value(de::Unexpected::Other("text"), &self))
    }

    // Values of other types are refused without their value either: serde's own refusal names it (a
    // PIN sent as the number 123456 would be in the message). Booleans, null, lists and maps keep
    // serde's refusal, which holds no secret.
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Err(E::invalid_type(de::Unexpected::Other("a number"), &self))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Err(E::invalid_type(de::Unexpected::Other("a number"), &self))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Err(E::invalid_type(de::Unexpected::Other("a number"), &self))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<T, E> {
        Err(E::invalid_type(de::Unexpected::Other("bytes"), &self))
    }
}

fn read_text<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    expected: &'static str,
    parse: fn(&str) -> Option<T>,
) -> Result<T, D::Error> {
    // `deserialize_any`, so that a value of another type reaches the visitor, which refuses it without
    // naming it; asked for a string, a format such as JSON names the number it found itself. These are
    // text forms: the formats they are for (JSON) describe their own types.
    deserializer.deserialize_any(TextVisitor { expected, parse })
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_text(deserializer, "a device id: 16 lower-case hex digits", |s| {
            s.bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                .then(|| s.parse().ok())
                .flatten()
        })
    }
}

impl Serialize for Pin {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Pin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_text(deserializer, "a PIN: 6 digits", |s| Pin::parse(s).ok())
    }
}

/// The length of a token in standard base64: 32 bytes make 44 characters with padding.
const TOKEN_BASE64_LEN: usize = 44;

impl Serialize for DongleToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut text = [0u8; TOKEN_BASE64_LEN];
        let written = STANDARD
            .encode_slice(self.as_bytes(), &mut text)
            .map_err(serde::ser::Error::custom)?;
        let text = core::str::from_utf8(&text[..written]).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(text)
    }
}

impl<'de> Deserialize<'de> for DongleToken {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_text(
            deserializer,
            "a dongle token: 32 bytes in standard base64",
            |s| {
                if s.len() != TOKEN_BASE64_LEN {
                    return None;
                }
                // Room for what 44 characters could hold, so that the decoder never runs short.
                let mut bytes = [0u8; 33];
                let n = STANDARD.decode_slice(s, &mut bytes).ok()?;
                DongleToken::from_slice(bytes.get(..n)?).ok()
            },
        )
    }
}

impl Serialize for CanMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for CanMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_text(
            deserializer,
            "a CAN mode: normal, listen_only, loopback or ext_loop",
            CanMode::from_name,
        )
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::format;
    use std::string::ToString;

    use super::*;

    fn read<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn a_device_id_is_16_lower_case_hex_digits_both_ways() {
        let id = DeviceId::from_bytes([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""0123456789abcdef""#);
        assert_eq!(read::<DeviceId>(r#""0123456789abcdef""#).unwrap(), id);
        for bad in [
            r#""0123456789ABCDEF""#,
            r#""0123456789abcde""#,
            r#""0123456789abcdef0""#,
            r#""0123456789abcdeg""#,
            r#""""#,
            "81985529216486895",
            "null",
        ] {
            assert!(read::<DeviceId>(bad).is_err(), "{bad} is refused");
        }
        // An escaped string is read as its text.
        assert_eq!(read::<DeviceId>(r#""\u0030123456789abcdef""#).unwrap(), id);
    }

    #[test]
    fn a_pin_is_6_digits_and_its_rejection_does_not_echo_it() {
        let pin = read::<Pin>(r#""012345""#).unwrap();
        assert_eq!(pin.as_str(), "012345");
        assert_eq!(serde_json::to_string(&pin).unwrap(), r#""012345""#);
        for bad in [
            r#""12345""#,
            r#""1234567""#,
            r#""12345a""#,
            r#"" 12345""#,
            "123456",
        ] {
            assert!(read::<Pin>(bad).is_err(), "{bad} is refused");
        }
        let error = read::<Pin>(r#""98765x""#).unwrap_err().to_string();
        assert!(!error.contains("98765"), "{error}");
        // Nor as a number, which serde's own refusal would name.
        let error = read::<Pin>("987654").unwrap_err().to_string();
        assert!(!error.contains("987654"), "{error}");
        let error = read::<Pin>("-987654").unwrap_err().to_string();
        assert!(!error.contains("987654"), "{error}");
    }

    #[test]
    fn a_token_is_32_bytes_in_standard_base64_and_never_echoed() {
        let token = DongleToken::from_bytes([0xfb; 32]);
        let text = serde_json::to_string(&token).unwrap();
        assert_eq!(text, format!(r#""{}""#, STANDARD.encode([0xfb; 32])));
        assert_eq!(read::<DongleToken>(&text).unwrap(), token);
        let short = format!(r#""{}""#, STANDARD.encode([0xfb; 31]));
        let long = format!(r#""{}""#, STANDARD.encode([0xfb; 33]));
        let url_safe = text.replace('+', "-").replace('/', "_");
        let unpadded = text.replace('=', "");
        for bad in [short, long, url_safe, unpadded, r#""""#.to_string()] {
            assert!(read::<DongleToken>(&bad).is_err(), "{bad} is refused");
        }
        let error = read::<DongleToken>(&text.replace('+', "!"))
            .unwrap_err()
            .to_string();
        assert!(!error.contains("+++"), "{error}");
    }

    #[test]
    fn a_can_mode_is_read_and_written_by_its_name() {
        for mode in CanMode::ALL {
            let text = serde_json::to_string(&mode).unwrap();
            assert_eq!(text, format!(r#""{}""#, mode.name()));
            assert_eq!(read::<CanMode>(&text).unwrap(), mode);
        }
        assert!(read::<CanMode>(r#""Normal""#).is_err());
        assert!(read::<CanMode>("0").is_err());
    }
}
