//! Golden vectors: hand-built hex files decoded field by field and re-encoded byte for byte.

use firmware_proto::discovery::{self, Body, HeaderFormat, PairingState};
use firmware_proto::ext::{
    AuthMessage, AuthStatus, Batch, BusState, BusStatusAction, ForgetAction, ForgetStatus, Role,
    SessionMac, auth,
};
use firmware_proto::ids::{CanId, CorrelationId, DeviceId, DongleToken, Pin};
use firmware_proto::remp::{
    self, CanMode, CliStatus, ConfigAction, ConfigStatus, MsgType, PairingStatus, Payload,
};
use firmware_proto::stream::{StreamDecoder, encode_frame};
use firmware_proto::{MAX_FRAME_LEN, crc32};

fn load(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let digits: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    hex::decode(digits).unwrap()
}

const DEV: DeviceId = DeviceId([0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);

fn token() -> DongleToken {
    DongleToken::from_bytes(core::array::from_fn(|i| 0xa0 + i as u8))
}

fn corr() -> CorrelationId {
    "123e4567-e89b-12d3-a456-426614174000".parse().unwrap()
}

fn nonce(start: u8) -> [u8; 16] {
    core::array::from_fn(|i| start + i as u8)
}

/// Decodes a REMP vector, checks the common header fields, and checks it re-encodes exactly.
fn remp_vector(name: &str, msg_type: MsgType, with_token: bool) -> Vec<u8> {
    let bytes = load(name);
    let packet = remp::decode(&bytes).unwrap();
    assert_eq!(packet.header.msg_type, msg_type, "{name}");
    assert_eq!(packet.header.device_id, DEV, "{name}");
    assert_eq!(packet.header.timestamp_us, 12_345_678, "{name}");
    if with_token {
        assert!(token().ct_eq(packet.header.token), "{name}");
    } else {
        assert!(packet.header.token.is_empty(), "{name}");
    }
    let mut out = [0u8; 2048];
    let n = remp::encode(&packet, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..], "{name} re-encodes");
    bytes
}

fn remp_payload(bytes: &[u8]) -> Payload<'_> {
    remp::decode(bytes).unwrap().payload
}

#[test]
fn crc_check_value() {
    assert_eq!(crc32::checksum(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32::checksum_parts(&[b"1234", b"56789"]), 0xCBF4_3926);
}

#[test]
fn discovery_discover() {
    let bytes = load("discovery_discover.hex");
    let p = discovery::decode(&bytes).unwrap();
    assert_eq!(p.header.msg_type, discovery::MsgType::Discover);
    assert_eq!(p.header.seq, 0x1234_5678);
    assert_eq!(p.header.format, HeaderFormat::Current);
    assert_eq!(p.body, Body::Discover);
    let mut out = [0u8; 64];
    let n = discovery::encode_discover(0x1234_5678, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn discovery_announce() {
    let bytes = load("discovery_announce.hex");
    let p = discovery::decode(&bytes).unwrap();
    let Body::Announce(a) = p.body else {
        panic!("not an announce")
    };
    assert_eq!(p.header.seq, 0x1234_5678);
    assert_eq!(a.device_id, DEV);
    assert_eq!(a.fw_build, Some("1.4.2-h753"));
    assert_eq!(a.udp_port, 50001);
    assert_eq!(a.capabilities, 0x000F_0001);
    assert!(firmware_proto::caps::has(
        a.capabilities,
        firmware_proto::caps::ALL_EXTENSIONS
    ));
    assert_eq!(a.proto_ver, 1);
    assert_eq!(a.lan_ip, Some([192, 168, 1, 50]));
    assert_eq!(a.pairing_state, PairingState::Pairing);
    assert_eq!(a.pairing_nonce, Some(nonce(0x30)));
    let mut out = [0u8; 512];
    let n = discovery::encode_announce(&a, 0x1234_5678, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn discovery_announce_legacy_header() {
    let bytes = load("discovery_announce_legacy16.hex");
    let p = discovery::decode(&bytes).unwrap();
    assert_eq!(p.header.format, HeaderFormat::Legacy);
    assert_eq!(p.header.seq, 0x42);
    let Body::Announce(a) = p.body else {
        panic!("not an announce")
    };
    assert_eq!(a.fw_build, Some("0.9.0"));
    assert_eq!(a.capabilities, 0);
    assert_eq!(a.lan_ip, Some([10, 0, 0, 7]));
    assert_eq!(a.pairing_state, PairingState::Normal);
    assert_eq!(a.pairing_nonce, None);
    let mut out = [0u8; 512];
    let n = discovery::encode(&p, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn remp_can_standard() {
    let bytes = remp_vector("remp_can.hex", MsgType::Can, true);
    let Payload::Can(f) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(f.id, CanId::standard(0x7DF).unwrap());
    assert_eq!((f.flags, f.dlc), (0, 8));
    assert_eq!(f.data(), &[0x02, 0x01, 0x0C, 0, 0, 0, 0, 0]);
    assert_eq!(remp::decode(&bytes).unwrap().header.seq, 1);
}

#[test]
fn remp_can_extended() {
    let bytes = remp_vector("remp_can_extended.hex", MsgType::Can, false);
    let p = remp::decode(&bytes).unwrap();
    assert_eq!((p.header.fw_build, p.header.seq), (0x0102, 7));
    let Payload::Can(f) = p.payload else { panic!() };
    assert_eq!(f.id, CanId::extended(0x18DA_F110).unwrap());
    assert_eq!(
        f.flags,
        remp::CanFrame::FLAG_SIMULATED | remp::CanFrame::FLAG_LOOPBACK
    );
    assert_eq!(f.data(), &[0xAA, 0xBB, 0xCC]);
}

#[test]
fn remp_can_config() {
    for (name, action, token) in [
        ("remp_can_config_set.hex", ConfigAction::Set, true),
        (
            "remp_can_config_response.hex",
            ConfigAction::Response,
            false,
        ),
    ] {
        let bytes = remp_vector(name, MsgType::CanConfig, token);
        let Payload::CanConfig(c) = remp_payload(&bytes) else {
            panic!()
        };
        assert_eq!(c.action, action);
        assert_eq!(c.status, ConfigStatus::Ok);
        assert_eq!(
            (c.bitrate, c.sample_point_permille, c.prescaler),
            (500_000, 875, 4)
        );
        assert_eq!((c.sjw, c.tseg1, c.tseg2), (1, 13, 2));
        assert_eq!(c.mode, CanMode::Normal);
        assert_eq!(
            c.flags,
            remp::CanConfig::FLAG_USE_RAW | remp::CanConfig::FLAG_AUTO_RETX
        );
    }
}

#[test]
fn remp_pairing() {
    let bytes = remp_vector("remp_pairing_start.hex", MsgType::Pairing, false);
    let Payload::PairingStart(s) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(s.corr_id, corr());

    let bytes = remp_vector("remp_pairing_ack_start.hex", MsgType::Pairing, false);
    let Payload::PairingAck(a) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(
        (a.status, a.seconds, a.corr_id),
        (PairingStatus::Ok, 120, corr())
    );
    assert_eq!(a.pairing_nonce, Some(nonce(0x30)));

    let bytes = remp_vector("remp_pairing_submit.hex", MsgType::Pairing, false);
    let Payload::PairingSubmit(s) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(s.corr_id, corr());
    assert_eq!(s.pin, Pin::parse("482915").unwrap());
    assert_eq!(s.pairing_nonce, nonce(0x30));
    assert_eq!(s.token, token());

    let bytes = remp_vector("remp_pairing_ack_submit.hex", MsgType::Pairing, false);
    let Payload::PairingAck(a) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(
        (a.status, a.seconds, a.pairing_nonce),
        (PairingStatus::Cooldown, 300, None)
    );
}

#[test]
fn remp_cli() {
    let bytes = remp_vector("remp_cli_request.hex", MsgType::Cli, true);
    let Payload::CliRequest(r) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!((r.flags, r.corr_id, r.command), (0, corr(), "version"));

    let bytes = remp_vector("remp_cli_response.hex", MsgType::Cli, false);
    let Payload::CliResponse(r) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(r.status, CliStatus::Ok);
    assert_eq!(r.flags, remp::CliResponse::FLAG_TRUNCATED);
    assert_eq!(
        (r.corr_id, r.exit_code, r.output),
        (corr(), 0, &b"fw 1.4.2\n"[..])
    );
}

#[test]
fn remp_cli_telemetry() {
    let bytes = remp_vector("remp_cli_telemetry.hex", MsgType::CliTelemetry, true);
    let Payload::CliTelemetry(t) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(t.source, remp::TelemetrySource::Uart);
    assert!(!t.truncated() && !t.error());
    assert_eq!(
        (t.corr_id, t.exit_code, t.command, t.output),
        (corr(), 0, "version", &b"fw 1.4.2\n"[..])
    );
}

fn check_first_two_records(batch: &Batch<'_>) {
    let records: Vec<_> = batch.iter().collect();
    assert_eq!(records[0].timestamp_us, 1000);
    assert_eq!(records[0].id, CanId::standard(0x7E8).unwrap());
    assert_eq!(records[0].flags, 0);
    assert_eq!(records[0].data, &[0x04, 0x41, 0x0C, 0x1A, 0xF8, 0, 0, 0]);
    assert_eq!(records[1].timestamp_us, 2500);
    assert_eq!(records[1].id, CanId::extended(0x18DA_F110).unwrap());
    assert!(records[1].is_fd());
    assert_eq!(records[1].flags, 0x0C);
    assert_eq!(records[1].data, &(1..=12).collect::<Vec<u8>>()[..]);
}

#[test]
fn remp_can_batch() {
    let bytes = remp_vector("remp_can_batch.hex", MsgType::CanBatch, false);
    let Payload::CanBatch(b) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(b.len(), 2);
    check_first_two_records(&b);
}

#[test]
fn standalone_batch() {
    let bytes = load("batch_dataplane.hex");
    let batch = Batch::parse(&bytes).unwrap();
    assert_eq!(batch.len(), 3);
    check_first_two_records(&batch);
    let records: Vec<_> = batch.iter().collect();
    assert_eq!(records[2].timestamp_us, 1 << 40);
    assert_eq!(records[2].flags, 0x01);
    assert!(records[2].data.is_empty());
    let mut out = [0u8; 256];
    let n = firmware_proto::ext::batch::encode_batch(&records, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn remp_bus_status() {
    let bytes = remp_vector("remp_bus_status.hex", MsgType::BusStatus, false);
    let Payload::BusStatus(s) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!(
        (s.action, s.state),
        (BusStatusAction::Report, BusState::ErrorPassive)
    );
    assert_eq!((s.tec, s.rec, s.rx_overflow, s.lost_frames), (130, 5, 2, 7));
}

#[test]
fn remp_forget() {
    let bytes = remp_vector("remp_forget_request.hex", MsgType::Forget, true);
    let Payload::Forget(f) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!((f.action, f.corr_id), (ForgetAction::Request, corr()));
    let bytes = remp_vector("remp_forget_ack.hex", MsgType::Forget, false);
    let Payload::Forget(f) = remp_payload(&bytes) else {
        panic!()
    };
    assert_eq!((f.action, f.status), (ForgetAction::Ack, ForgetStatus::Ok));
}

#[test]
fn remp_auth_handshake() {
    let (hn, dn) = (nonce(0x10), nonce(0x20));
    let bytes = remp_vector("remp_auth_challenge.hex", MsgType::Auth, false);
    assert_eq!(
        remp_payload(&bytes),
        Payload::Auth(AuthMessage::Challenge { host_nonce: hn })
    );

    let bytes = remp_vector("remp_auth_response.hex", MsgType::Auth, false);
    let Payload::Auth(AuthMessage::Response {
        status,
        dongle_nonce,
        dongle_proof,
    }) = remp_payload(&bytes)
    else {
        panic!()
    };
    assert_eq!((status, dongle_nonce), (AuthStatus::Ok, dn));
    let expected = auth::dongle_proof(&token(), &DEV, &hn, &dn);
    assert!(auth::proof_matches(&expected, &dongle_proof));

    let bytes = remp_vector("remp_auth_confirm.hex", MsgType::Auth, false);
    let Payload::Auth(AuthMessage::Confirm { host_proof }) = remp_payload(&bytes) else {
        panic!()
    };
    assert!(auth::proof_matches(
        &auth::host_proof(&token(), &DEV, &hn, &dn),
        &host_proof
    ));

    let bytes = remp_vector("remp_auth_result.hex", MsgType::Auth, false);
    assert_eq!(
        remp_payload(&bytes),
        Payload::Auth(AuthMessage::Result {
            status: AuthStatus::Ok
        })
    );
}

#[test]
fn remp_session_mac() {
    let bytes = load("remp_session_can.hex");
    let (hn, dn) = (nonce(0x10), nonce(0x20));
    let mut dongle = SessionMac::new(Role::Dongle, &token(), &DEV, &hn, &dn);
    let packet = dongle.open(&bytes).unwrap();
    assert_eq!(packet.header.seq, 1);
    let Payload::Can(f) = packet.payload else {
        panic!()
    };
    assert_eq!(f.id, CanId::standard(0x7DF).unwrap());
    // The same bytes again are a replay.
    assert!(matches!(
        dongle.open(&bytes),
        Err(firmware_proto::Error::Replay { .. })
    ));
    // The host side seals the same packet to the same bytes.
    let mut host = SessionMac::new(Role::Host, &token(), &DEV, &hn, &dn);
    let mut out = [0u8; 256];
    let n = host.seal(&packet, &mut out).unwrap();
    assert_eq!(&out[..n], &bytes[..]);
}

#[test]
fn stream_framed_vector() {
    let framed = load("stream_remp_can.hex");
    let packet = load("remp_can.hex");
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = encode_frame(&packet, &mut out).unwrap();
    assert_eq!(&out[..n], &framed[..]);
    let mut decoder: StreamDecoder = StreamDecoder::new();
    let mut got = Vec::new();
    // Byte by byte, to exercise the streaming path.
    for b in &framed {
        decoder.push(core::slice::from_ref(b), |p| got.push(p.to_vec()));
    }
    assert_eq!(got, vec![packet]);
    assert_eq!(decoder.stats().packets_ok, 1);
}
