//! Focused tests: typed ids, rejection of malformed packets, stream edge cases, sessions.

use firmware_proto::discovery::{self, Announce, PairingState};
use firmware_proto::ext::{AuthMessage, BatchWriter, CanRecord, Role, SessionMac, batch};
use firmware_proto::ids::{CanId, CorrelationId, DeviceId, DongleToken, Pin};
use firmware_proto::remp::{self, CanFrame, Header, MsgType, Packet, Payload};
use firmware_proto::stream::{StreamDecoder, encode_frame, max_frame_len};
use firmware_proto::{Error, MAX_FRAME_LEN, MAX_PACKET_LEN};

const DEV: DeviceId = DeviceId([1, 2, 3, 4, 5, 6, 7, 8]);

#[test]
fn device_id_text() {
    let id: DeviceId = "0011223344556677".parse().unwrap();
    assert_eq!(id.to_string(), "0011223344556677");
    assert_eq!(
        "00112233445566AA".parse::<DeviceId>().unwrap().to_string(),
        "00112233445566aa"
    );
    assert!("001122334455667".parse::<DeviceId>().is_err());
    assert!("0011223344556677 ".parse::<DeviceId>().is_err());
    assert!("00112233445566zz".parse::<DeviceId>().is_err());
    assert!("é011223344556677".parse::<DeviceId>().is_err());
}

#[test]
fn correlation_id_text() {
    let text = "123e4567-e89b-12d3-a456-426614174000";
    let id: CorrelationId = text.parse().unwrap();
    assert_eq!(id.to_string(), text);
    assert_eq!(
        "123e4567e89b12d3a456426614174000"
            .parse::<CorrelationId>()
            .unwrap(),
        id
    );
    assert!(
        "123e4567-e89b-12d3-a456-42661417400"
            .parse::<CorrelationId>()
            .is_err()
    );
    assert!(
        "123e4567-e89b-12d3-a456-4266141740000"
            .parse::<CorrelationId>()
            .is_err()
    );
}

#[test]
fn secrets_are_redacted_and_compared() {
    let token = DongleToken::from_bytes([7; 32]);
    assert_eq!(format!("{token:?}"), "DongleToken(**redacted**)");
    assert!(token.ct_eq(&[7; 32]));
    assert!(!token.ct_eq(&[7; 31]));
    assert!(!token.ct_eq(&[8; 32]));
    let pin = Pin::parse("012345").unwrap();
    assert_eq!(format!("{pin:?}"), "Pin(**redacted**)");
    assert_eq!(pin.as_str(), "012345");
    for bad in ["12345", "1234567", "12345a", " 12345", "-12345", "١٢٣٤٥٦"] {
        assert!(Pin::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn can_ids() {
    assert!(CanId::standard(0x7FF).is_ok());
    assert!(CanId::standard(0x800).is_err());
    assert!(CanId::extended(0x1FFF_FFFF).is_ok());
    assert!(CanId::extended(0x2000_0000).is_err());
    let ext = CanId::extended(0x18DA_F110).unwrap();
    assert_eq!(ext.to_wire(), 0x98DA_F110);
    assert_eq!(CanId::from_wire(0x98DA_F110).unwrap(), ext);
    assert!(CanId::from_wire(0x0000_0800).is_err());
    assert!(CanId::from_wire(0x4000_0000).is_err());
    assert_eq!(ext.to_string(), "18DAF110");
    assert_eq!(CanId::standard(0x7DF).unwrap().to_string(), "7DF");
}

fn announce() -> Announce<'static> {
    Announce {
        device_id: DEV,
        fw_build: Some("x"),
        udp_port: 1,
        capabilities: 0,
        proto_ver: 1,
        lan_ip: None,
        pairing_state: PairingState::Normal,
        pairing_nonce: None,
    }
}

/// Re-computes the CRC of a (possibly edited) current-format Discovery packet.
fn fix_crc(p: &mut [u8]) {
    p[14..18].fill(0);
    let crc = firmware_proto::crc32::checksum(p);
    p[14..18].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn discovery_rejections() {
    let mut buf = [0u8; 128];
    let n = discovery::encode_announce(&announce(), 9, &mut buf).unwrap();
    let good = buf[..n].to_vec();
    assert!(discovery::decode(&good).is_ok());
    // Every strict prefix is rejected.
    for len in 0..n {
        assert!(discovery::decode(&good[..len]).is_err(), "prefix {len}");
    }
    let mut long = good.clone();
    long.push(0);
    assert_eq!(discovery::decode(&long), Err(Error::LengthMismatch));
    let mut bad = good.clone();
    bad[0] = b'X';
    assert_eq!(discovery::decode(&bad), Err(Error::BadMagic));
    let mut bad = good.clone();
    bad[4] = 2;
    assert_eq!(discovery::decode(&bad), Err(Error::UnsupportedVersion(2)));
    let mut bad = good.clone();
    bad[20] ^= 1;
    assert!(matches!(discovery::decode(&bad), Err(Error::BadCrc { .. })));
    let mut bad = good.clone();
    bad[7] = 17;
    assert_eq!(discovery::decode(&bad), Err(Error::BadHeaderLen(17)));
    // Unknown TLVs are skipped; a wrong length of a known TLV is not.
    let mut ext = good.clone();
    ext.extend_from_slice(&[0x42, 2, 0xAB, 0xCD]);
    let plen = (ext.len() - 18) as u16;
    ext[8..10].copy_from_slice(&plen.to_le_bytes());
    fix_crc(&mut ext);
    assert_eq!(
        discovery::decode(&ext).unwrap().body,
        discovery::decode(&good).unwrap().body
    );
    let mut dup = good.clone();
    dup.extend_from_slice(&[0x03, 2, 0, 1]);
    let plen = (dup.len() - 18) as u16;
    dup[8..10].copy_from_slice(&plen.to_le_bytes());
    fix_crc(&mut dup);
    assert_eq!(
        discovery::decode(&dup),
        Err(Error::DuplicateField("udp_port"))
    );
    let mut short_tlv = good.clone();
    short_tlv.extend_from_slice(&[0x06, 3, 1, 2, 3]);
    let plen = (short_tlv.len() - 18) as u16;
    short_tlv[8..10].copy_from_slice(&plen.to_le_bytes());
    fix_crc(&mut short_tlv);
    assert_eq!(
        discovery::decode(&short_tlv),
        Err(Error::InvalidField("lan_ip"))
    );
    // A DISCOVER with a payload is inconsistent.
    let mut disc = [0u8; 32];
    let n = discovery::encode_discover(1, &mut disc).unwrap();
    let mut d = disc[..n].to_vec();
    d.extend_from_slice(&[0x01, 0]);
    d[8] = 2;
    fix_crc(&mut d);
    assert_eq!(discovery::decode(&d), Err(Error::TrailingBytes));
    // Output buffer too small is an error, never a panic.
    assert!(matches!(
        discovery::encode_announce(&announce(), 9, &mut [0u8; 20]),
        Err(Error::OutputTooSmall { .. })
    ));
}

fn can_packet(token: &[u8]) -> Packet<'_> {
    let mut header = Header::new(MsgType::Can, DEV, 5);
    header.token = token;
    Packet {
        header,
        payload: Payload::Can(CanFrame::new(CanId::standard(0x123).unwrap(), &[1, 2, 3]).unwrap()),
    }
}

#[test]
fn remp_rejections() {
    let token = [9u8; 32];
    let mut buf = [0u8; 128];
    let n = remp::encode(&can_packet(&token), &mut buf).unwrap();
    let good = buf[..n].to_vec();
    for len in 0..n {
        assert!(remp::decode(&good[..len]).is_err(), "prefix {len}");
    }
    let mut long = good.clone();
    long.push(0);
    assert_eq!(remp::decode(&long), Err(Error::TrailingBytes));
    let mut bad = good.clone();
    bad[4] = 2;
    assert_eq!(remp::decode(&bad), Err(Error::UnsupportedVersion(2)));
    let mut bad = good.clone();
    bad[8] = 65;
    assert_eq!(remp::decode(&bad), Err(Error::InvalidField("token_len")));
    let mut bad = good.clone();
    bad[31 + 32 + 5] = 9; // dlc 9
    assert_eq!(remp::decode(&bad), Err(Error::InvalidField("dlc")));
    let mut bad = good.clone();
    bad[6] = remp::flags::SESSION_MAC; // flag with a 32-byte token field
    assert_eq!(remp::decode(&bad), Err(Error::InvalidField("token_len")));
    assert!(remp::decode(&[0u8; MAX_PACKET_LEN + 1]).is_err());
    // Header type and payload disagree.
    let mut p = can_packet(&token);
    p.header.msg_type = MsgType::Cli;
    assert_eq!(
        remp::encode(&p, &mut buf),
        Err(Error::InvalidField("msg_type"))
    );
    // Opaque payloads need a genuinely unknown type.
    p.header.msg_type = MsgType::Other(0);
    p.payload = Payload::Other(b"x");
    assert_eq!(
        remp::encode(&p, &mut buf),
        Err(Error::InvalidField("msg_type"))
    );
    p.header.msg_type = MsgType::Other(0x7F);
    let n = remp::encode(&p, &mut buf).unwrap();
    assert_eq!(
        remp::decode(&buf[..n]).unwrap().payload,
        Payload::Other(b"x")
    );
    // Unknown actions of pairing and CLI are rejected.
    let mut pairing = remp::encode(
        &Packet {
            header: Header::new(MsgType::Pairing, DEV, 1),
            payload: Payload::PairingStart(remp::PairingStart {
                corr_id: CorrelationId([0; 16]),
            }),
        },
        &mut buf,
    )
    .map(|n| buf[..n].to_vec())
    .unwrap();
    pairing[31] = 9;
    assert_eq!(remp::decode(&pairing), Err(Error::InvalidField("action")));
}

#[test]
fn batch_rules() {
    let id = CanId::standard(1).unwrap();
    let mut out = [0u8; 256];
    let rec = |flags, data| CanRecord {
        timestamp_us: 1,
        id,
        flags,
        data,
    };
    assert!(rec(0, &[0; 9][..]).encode(&mut out).is_err());
    assert!(rec(batch::flags::BRS, &[][..]).encode(&mut out).is_err());
    assert!(rec(batch::flags::FD, &[0; 9][..]).encode(&mut out).is_err());
    assert!(rec(0x20, &[][..]).encode(&mut out).is_err());
    for len in [0usize, 1, 8, 12, 16, 20, 24, 32, 48, 64] {
        assert!(
            rec(batch::flags::FD | batch::flags::BRS, &[0xEE; 64][..len])
                .encode(&mut out)
                .is_ok()
        );
    }
    assert_eq!(batch::len_to_dlc(48), Some(14));
    assert_eq!(batch::dlc_to_len(9), Some(12));
    assert_eq!(batch::dlc_to_len(16), None);
    // The writer refuses a record that does not fit and leaves the batch intact.
    let mut small = [0u8; 4 + 22 + 10];
    let mut w = BatchWriter::new(&mut small).unwrap();
    w.push(&rec(0, &[1; 8][..])).unwrap();
    assert!(matches!(
        w.push(&rec(0, &[1; 8][..])),
        Err(Error::OutputTooSmall { .. })
    ));
    let n = w.finish().unwrap();
    assert_eq!(batch::Batch::parse(&small[..n]).unwrap().len(), 1);
    // A count larger than the records present, or bytes left over, is rejected.
    let mut bytes = small[..n].to_vec();
    bytes[1] = 2;
    assert_eq!(batch::Batch::parse(&bytes), Err(Error::Truncated));
    bytes[1] = 0;
    assert_eq!(batch::Batch::parse(&bytes), Err(Error::TrailingBytes));
    assert_eq!(batch::MAX_CLASSIC_RECORDS_PER_PACKET, 63);
}

#[test]
fn session_refuses_tampering_reflection_and_replay() {
    let token = DongleToken::from_bytes([3; 32]);
    let (hn, dn) = ([1u8; 16], [2u8; 16]);
    let mut host = SessionMac::new(Role::Host, &token, &DEV, &hn, &dn);
    let mut dongle = SessionMac::new(Role::Dongle, &token, &DEV, &hn, &dn);
    let mut buf = [0u8; 256];
    let n1 = host.seal(&can_packet(&[]), &mut buf).unwrap();
    let first = buf[..n1].to_vec();
    let n2 = host.seal(&can_packet(&[]), &mut buf).unwrap();
    let second = buf[..n2].to_vec();
    // Reflection: the host does not accept its own packet.
    assert_eq!(host.open(&first), Err(Error::BadMac));
    // Tampering with any byte outside the MAC breaks it.
    for i in [0usize, 10, 20, 30, 50, n1 - 1] {
        if (31..47).contains(&i) {
            continue;
        }
        let mut t = first.clone();
        t[i] ^= 0x01;
        assert!(dongle.open(&t).is_err(), "byte {i}");
    }
    // Out of order: the second first, then the first is a replay.
    assert_eq!(dongle.open(&second).unwrap().header.seq, 2);
    assert_eq!(dongle.open(&first), Err(Error::Replay { seq: 1, last: 2 }));
    // A plain token packet is not a session packet.
    let token_bytes = [3u8; 32];
    let n = remp::encode(&can_packet(&token_bytes), &mut buf).unwrap();
    assert_eq!(dongle.open(&buf[..n]), Err(Error::BadMac));
    // A different token derives different keys.
    let mut other = SessionMac::new(
        Role::Dongle,
        &DongleToken::from_bytes([4; 32]),
        &DEV,
        &hn,
        &dn,
    );
    let n = host.seal(&can_packet(&[]), &mut buf).unwrap();
    assert_eq!(other.open(&buf[..n]), Err(Error::BadMac));
    let _ = AuthMessage::Result {
        status: Default::default(),
    };
}

#[test]
fn stream_edge_cases() {
    let mut frame = [0u8; MAX_FRAME_LEN];
    let big = [0x55u8; MAX_PACKET_LEN];
    let n = encode_frame(&big, &mut frame).unwrap();
    assert_eq!(n, max_frame_len(MAX_PACKET_LEN));
    assert!(encode_frame(&[0u8; MAX_PACKET_LEN + 1], &mut [0u8; 4096]).is_err());
    assert!(matches!(
        encode_frame(&[1, 2, 3], &mut [0u8; 8]),
        Err(Error::OutputTooSmall { .. })
    ));
    // The largest packet fits the default decoder; a small decoder counts it as oversize.
    let mut dec: StreamDecoder = StreamDecoder::new();
    let mut count = 0;
    dec.push(&frame[..n], |p| {
        assert_eq!(p, &big[..]);
        count += 1;
    });
    assert_eq!(count, 1);
    let mut small: StreamDecoder<64> = StreamDecoder::new();
    small.push(&frame[..n], |_| panic!("oversize frame delivered"));
    assert_eq!(small.stats().oversize, 1);
    assert_eq!(small.stats().bytes_skipped, (n - 1) as u64);
    // Lone zeros are idle bytes; a runt is a CRC error; bad COBS is counted.
    let mut dec: StreamDecoder = StreamDecoder::new();
    dec.push(&[0, 0, 0, 2, 1, 0, 5, 1, 2, 0], |_| {
        panic!("garbage delivered")
    });
    let s = dec.stats();
    assert_eq!((s.packets_ok, s.crc_errors, s.cobs_errors), (0, 1, 1));
    dec.count_rejected();
    assert_eq!(dec.stats().rejected, 1);
}

/// A single damaged byte anywhere in a stream frame (its terminator aside, as a noisy line that
/// keeps framing would leave it) never hands on a packet: not the original, not another one.
#[test]
fn every_single_byte_corruption_of_a_stream_frame_is_rejected() {
    for packet_len in [1usize, 13, 60, 253, 254, 255, 300] {
        let packet: Vec<u8> = (0..packet_len).map(|i| (i % 7) as u8).collect();
        let mut frame = vec![0u8; max_frame_len(packet.len())];
        let n = encode_frame(&packet, &mut frame).unwrap();
        frame.truncate(n);
        for index in 0..n - 1 {
            for mask in 1..=255u8 {
                let mut damaged = frame.clone();
                damaged[index] ^= mask;
                let mut decoder = StreamDecoder::<1024>::new();
                let mut got = Vec::new();
                decoder.push(&damaged, |p| got.push(p.to_vec()));
                assert!(
                    got.is_empty(),
                    "len {packet_len}: byte {index} ^ {mask:#04x} passed as {:?}",
                    got.iter().map(|p| p.len()).collect::<Vec<_>>()
                );
            }
        }
    }
}
