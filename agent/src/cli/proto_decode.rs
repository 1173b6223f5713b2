//! `bridge-agent proto decode HEX`: prints a captured packet field by field.
//!
//! It takes what a technician can capture: a raw Discovery or REMP packet (a UDP payload from Wireshark)
//! or a COBS-framed packet from a serial capture, with or without its 0x00 terminator. A token in the
//! packet is shown by its length only, so that a pasted decode never leaks a dongle's secret.

use std::fmt::Write;

use firmware_proto::stream::StreamDecoder;
use firmware_proto::{MAX_FRAME_LEN, discovery, remp};

/// Why a capture could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(
        "that is not hex: {0} (give the bytes as hex digits; spaces, colons and a 0x prefix are fine)"
    )]
    NotHex(String),
    #[error(
        "the bytes are neither a Discovery packet (\"OBD2\"), a REMP packet (\"REMP\") nor a COBS-framed \
         packet with a valid CRC"
    )]
    Unrecognised,
    #[error("a {family} packet that does not decode: {reason}")]
    Invalid {
        family: &'static str,
        reason: String,
    },
}

/// Parses hex with optional separators (spaces, colons, dashes) and `0x` prefixes.
pub fn parse_hex(input: &str) -> Result<Vec<u8>, DecodeError> {
    let cleaned: String = input
        .split(|c: char| c.is_whitespace() || c == ':' || c == '-' || c == ',')
        .map(|part| part.trim_start_matches("0x").trim_start_matches("0X"))
        .collect();
    hex::decode(&cleaned).map_err(|e| DecodeError::NotHex(e.to_string()))
}

/// Describes `bytes`, trying a raw packet first and a framed one second.
pub fn describe(bytes: &[u8]) -> Result<String, DecodeError> {
    if bytes.starts_with(&discovery::MAGIC) || bytes.starts_with(&remp::MAGIC) {
        return describe_packet(bytes);
    }
    // A serial capture: COBS frame(s) terminated by 0x00; add the terminator if it was cut off.
    let mut decoder: Box<StreamDecoder<MAX_FRAME_LEN>> = Box::default();
    let mut packets = Vec::new();
    let mut input = bytes.to_vec();
    if input.last() != Some(&0) {
        input.push(0);
    }
    decoder.push(&input, |p| packets.push(p.to_vec()));
    if packets.is_empty() {
        return Err(DecodeError::Unrecognised);
    }
    let mut out = String::new();
    for (i, packet) in packets.iter().enumerate() {
        let _ = writeln!(
            out,
            "frame {}: COBS-framed, CRC-32 ok, {} packet bytes",
            i + 1,
            packet.len()
        );
        out.push_str(&describe_packet(packet)?);
    }
    Ok(out)
}

fn describe_packet(bytes: &[u8]) -> Result<String, DecodeError> {
    let mut out = String::new();
    if bytes.starts_with(&discovery::MAGIC) {
        let p = discovery::decode(bytes).map_err(|e| DecodeError::Invalid {
            family: "Discovery",
            reason: e.to_string(),
        })?;
        let _ = writeln!(out, "Discovery v1 {:?}", p.header.msg_type);
        let _ = writeln!(out, "  header format: {:?}", p.header.format);
        let _ = writeln!(out, "  flags: 0x{:02x}", p.header.flags);
        let _ = writeln!(out, "  seq: {}", p.header.seq);
        match p.body {
            discovery::Body::Discover => {
                let _ = writeln!(out, "  (no payload)");
            }
            discovery::Body::Announce(a) => {
                let _ = writeln!(out, "  device_id: {}", a.device_id);
                let _ = writeln!(out, "  fw_build: {}", a.fw_build.unwrap_or("(absent)"));
                let _ = writeln!(out, "  udp_port: {}", a.udp_port);
                let _ = writeln!(out, "  capabilities: 0x{:08x}", a.capabilities);
                let _ = writeln!(out, "  proto_ver: {}", a.proto_ver);
                if let Some(ip) = a.lan_ip {
                    let _ = writeln!(out, "  lan_ip: {}", std::net::Ipv4Addr::from(ip));
                }
                let _ = writeln!(out, "  pairing_state: {:?}", a.pairing_state);
                if let Some(nonce) = a.pairing_nonce {
                    let _ = writeln!(out, "  pairing_nonce: {}", hex::encode(nonce));
                }
            }
        }
        return Ok(out);
    }
    let p = remp::decode(bytes).map_err(|e| DecodeError::Invalid {
        family: "REMP",
        reason: e.to_string(),
    })?;
    let h = &p.header;
    let _ = writeln!(
        out,
        "REMP v1 {:?} (type {})",
        h.msg_type,
        h.msg_type.to_u8()
    );
    let _ = writeln!(out, "  flags: 0x{:02x}", h.flags);
    let _ = writeln!(out, "  fw_build: {}", h.fw_build);
    let _ = writeln!(out, "  device_id: {}", h.device_id);
    let _ = writeln!(out, "  seq: {}", h.seq);
    let _ = writeln!(out, "  timestamp_us: {}", h.timestamp_us);
    let token = match (h.token.len(), h.has_session_mac()) {
        (0, _) => "none".to_string(),
        (n, true) => format!("session MAC, {n} bytes (not shown)"),
        (n, false) => format!("{n} bytes (not shown)"),
    };
    let _ = writeln!(out, "  token: {token}");
    let _ = writeln!(out, "  payload: {:#?}", p.payload);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ids::{CanId, DeviceId};
    use firmware_proto::remp::{CanFrame, Header, MsgType, Packet, Payload};
    use firmware_proto::stream::encode_frame;

    fn can_packet(token: &[u8]) -> Vec<u8> {
        let mut header = Header::new(MsgType::Can, DeviceId::from_bytes([0xab; 8]), 7);
        header.token = token;
        let frame = CanFrame::new(CanId::standard(0x7df).unwrap(), &[2, 1, 0x0c]).unwrap();
        let mut buf = [0u8; 128];
        let n = remp::encode(
            &Packet {
                header,
                payload: Payload::Can(frame),
            },
            &mut buf,
        )
        .unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn hex_with_separators_parses() {
        assert_eq!(parse_hex("0x52 45:4d-50").unwrap(), b"REMP");
        assert!(matches!(parse_hex("zz"), Err(DecodeError::NotHex(_))));
    }

    #[test]
    fn a_raw_remp_packet_is_described_without_its_token() {
        let token = [0x5a; 32];
        let text = describe(&can_packet(&token)).unwrap();
        assert!(text.contains("REMP v1 Can (type 0)"), "{text}");
        assert!(text.contains("device_id: abababababababab"), "{text}");
        assert!(text.contains("token: 32 bytes (not shown)"), "{text}");
        assert!(!text.to_lowercase().contains(&hex::encode(token)), "{text}");
        assert!(!text.contains("90, 90, 90"), "{text}");
    }

    #[test]
    fn a_framed_packet_is_unframed_first_with_or_without_its_terminator() {
        let packet = can_packet(&[]);
        let mut frame = [0u8; 256];
        let n = encode_frame(&packet, &mut frame).unwrap();
        for capture in [&frame[..n], &frame[..n - 1]] {
            let text = describe(capture).unwrap();
            assert!(
                text.starts_with("frame 1: COBS-framed, CRC-32 ok"),
                "{text}"
            );
            assert!(text.contains("REMP v1 Can"), "{text}");
        }
    }

    #[test]
    fn a_discover_is_described() {
        let mut buf = [0u8; 32];
        let n = discovery::encode_discover(42, &mut buf).unwrap();
        let text = describe(&buf[..n]).unwrap();
        assert!(text.contains("Discovery v1 Discover"), "{text}");
        assert!(text.contains("seq: 42"), "{text}");
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert_eq!(describe(&[1, 2, 3]), Err(DecodeError::Unrecognised));
        let mut bad = can_packet(&[]);
        bad.truncate(20);
        assert!(matches!(
            describe(&bad),
            Err(DecodeError::Invalid { family: "REMP", .. })
        ));
    }
}
