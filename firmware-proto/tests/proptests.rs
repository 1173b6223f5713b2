//! Property tests: round trips of every packet kind, a hostile byte stream, and decoders that
//! reject every malformed input with a typed error instead of panicking.

use firmware_proto::discovery::{self, Announce, Body, HeaderFormat, PairingState};
use firmware_proto::ext::{
    AuthMessage, AuthStatus, Batch, BusState, BusStatus, BusStatusAction, CanRecord, Forget,
    ForgetAction, ForgetStatus, batch,
};
use firmware_proto::ids::{CanId, CorrelationId, DeviceId, DongleToken, Pin};
use firmware_proto::remp::{
    self, CanConfig, CanFrame, CanMode, CliRequest, CliResponse, CliStatus, CliTelemetry,
    ConfigAction, ConfigStatus, Header, MsgType, Packet, PairingAck, PairingStart, PairingStatus,
    PairingSubmit, Payload, TelemetrySource,
};
use firmware_proto::stream::{StreamDecoder, encode_frame};
use firmware_proto::{MAX_FRAME_LEN, MAX_PACKET_LEN};
use proptest::prelude::*;

fn can_id() -> impl Strategy<Value = CanId> {
    prop_oneof![
        (0u16..=0x7FF).prop_map(|id| CanId::standard(id).unwrap()),
        (0u32..=0x1FFF_FFFF).prop_map(|id| CanId::extended(id).unwrap()),
    ]
}

fn corr() -> impl Strategy<Value = CorrelationId> {
    any::<[u8; 16]>().prop_map(CorrelationId)
}

fn can_frame() -> impl Strategy<Value = CanFrame> {
    (
        can_id(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..=8),
    )
        .prop_map(|(id, flags, data)| {
            let mut f = CanFrame::new(id, &data).unwrap();
            f.flags = flags;
            f
        })
}

fn can_config() -> impl Strategy<Value = CanConfig> {
    (
        prop_oneof![
            Just(ConfigAction::Get),
            Just(ConfigAction::Set),
            Just(ConfigAction::Response)
        ],
        prop_oneof![
            Just(ConfigStatus::Ok),
            Just(ConfigStatus::Invalid),
            Just(ConfigStatus::ApplyFailed)
        ],
        any::<(u32, u16, u16, u8, u8, u8, u8)>(),
        prop_oneof![
            Just(CanMode::Normal),
            Just(CanMode::ListenOnly),
            Just(CanMode::Loopback),
            Just(CanMode::ExtLoop)
        ],
    )
        .prop_map(
            |(action, status, (bitrate, sp, prescaler, sjw, tseg1, tseg2, flags), mode)| {
                CanConfig {
                    action,
                    // The status byte exists only in responses.
                    status: if action == ConfigAction::Response {
                        status
                    } else {
                        ConfigStatus::Ok
                    },
                    bitrate,
                    sample_point_permille: sp,
                    prescaler,
                    sjw,
                    tseg1,
                    tseg2,
                    mode,
                    flags,
                }
            },
        )
}

fn record_data() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        (0u8..=3, prop::collection::vec(any::<u8>(), 0..=8)).prop_map(|(f, d)| (f, d)),
        (
            0u8..8,
            prop::sample::select(vec![0usize, 1, 5, 8, 12, 16, 20, 24, 32, 48, 64]),
            any::<u8>()
        )
            .prop_map(|(f, len, b)| (
                (f << 3 & (batch::flags::BRS | batch::flags::ESI)) | batch::flags::FD | (f & 3),
                vec![b; len]
            )),
    ]
}

type OwnedRecord = (u64, CanId, u8, Vec<u8>);

fn records(max: usize) -> impl Strategy<Value = Vec<OwnedRecord>> {
    prop::collection::vec(
        (any::<u64>(), can_id(), record_data()).prop_map(|(ts, id, (f, d))| (ts, id, f, d)),
        0..max,
    )
}

fn borrow(records: &[OwnedRecord]) -> Vec<CanRecord<'_>> {
    records
        .iter()
        .map(|(ts, id, flags, data)| CanRecord {
            timestamp_us: *ts,
            id: *id,
            flags: *flags,
            data,
        })
        .collect()
}

/// Every REMP payload kind except batches (built separately because they borrow a buffer).
fn payload(text: &'static str, bytes: &'static [u8]) -> impl Strategy<Value = Payload<'static>> {
    let auth_status = prop_oneof![
        Just(AuthStatus::Ok),
        Just(AuthStatus::BadProof),
        Just(AuthStatus::NotPaired),
        Just(AuthStatus::Error)
    ];
    prop_oneof![
        can_frame().prop_map(Payload::Can),
        can_config().prop_map(Payload::CanConfig),
        corr().prop_map(|corr_id| Payload::PairingStart(PairingStart { corr_id })),
        (
            corr(),
            0u32..1_000_000,
            any::<[u8; 16]>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(c, pin, n, t)| {
                Payload::PairingSubmit(PairingSubmit {
                    corr_id: c,
                    pin: Pin::parse(&format!("{pin:06}")).unwrap(),
                    pairing_nonce: n,
                    token: DongleToken::from_bytes(t),
                })
            }),
        (0u8..4, any::<u16>(), corr(), any::<Option<[u8; 16]>>()).prop_map(|(s, seconds, c, n)| {
            let status = [
                PairingStatus::Ok,
                PairingStatus::InvalidPin,
                PairingStatus::Cooldown,
                PairingStatus::Error,
            ][s as usize];
            Payload::PairingAck(PairingAck {
                status,
                seconds,
                corr_id: c,
                pairing_nonce: n,
            })
        }),
        (any::<u8>(), corr(), 0..text.len()).prop_map(move |(flags, c, mut n)| {
            while !text.is_char_boundary(n) {
                n -= 1;
            }
            Payload::CliRequest(CliRequest {
                flags,
                corr_id: c,
                command: &text[..n],
            })
        }),
        (0u8..4, any::<u8>(), corr(), any::<u16>(), 0..bytes.len()).prop_map(
            move |(s, flags, c, code, n)| {
                let status = [
                    CliStatus::Ok,
                    CliStatus::Denied,
                    CliStatus::Error,
                    CliStatus::Timeout,
                ][s as usize];
                Payload::CliResponse(CliResponse {
                    status,
                    flags,
                    corr_id: c,
                    exit_code: code,
                    output: &bytes[..n],
                })
            }
        ),
        (
            any::<(u8, u8, u16)>(),
            corr(),
            0..text.len(),
            0..bytes.len()
        )
            .prop_map(move |((source, flags, code), c, mut t, n)| {
                while !text.is_char_boundary(t) {
                    t -= 1;
                }
                Payload::CliTelemetry(CliTelemetry {
                    source: TelemetrySource::from_u8(source),
                    flags,
                    corr_id: c,
                    exit_code: code,
                    command: &text[..t],
                    output: &bytes[..n],
                })
            }),
        (any::<bool>(), 0u8..3, any::<(u8, u8, u32, u32)>()).prop_map(
            |(report, s, (tec, rec, o, l))| {
                Payload::BusStatus(BusStatus {
                    action: if report {
                        BusStatusAction::Report
                    } else {
                        BusStatusAction::Request
                    },
                    state: [
                        BusState::ErrorActive,
                        BusState::ErrorPassive,
                        BusState::BusOff,
                    ][s as usize],
                    tec,
                    rec,
                    rx_overflow: o,
                    lost_frames: l,
                })
            }
        ),
        (any::<bool>(), 0u8..3, corr()).prop_map(|(ack, s, c)| {
            let status = if ack {
                [
                    ForgetStatus::Ok,
                    ForgetStatus::NotPaired,
                    ForgetStatus::Error,
                ][s as usize]
            } else {
                ForgetStatus::Ok
            };
            let action = if ack {
                ForgetAction::Ack
            } else {
                ForgetAction::Request
            };
            Payload::Forget(Forget {
                action,
                status,
                corr_id: c,
            })
        }),
        prop_oneof![
            any::<[u8; 16]>().prop_map(|host_nonce| AuthMessage::Challenge { host_nonce }),
            (auth_status.clone(), any::<[u8; 16]>(), any::<[u8; 32]>()).prop_map(
                |(status, dongle_nonce, dongle_proof)| {
                    AuthMessage::Response {
                        status,
                        dongle_nonce,
                        dongle_proof,
                    }
                }
            ),
            any::<[u8; 32]>().prop_map(|host_proof| AuthMessage::Confirm { host_proof }),
            auth_status.prop_map(|status| AuthMessage::Result { status }),
        ]
        .prop_map(Payload::Auth),
        (0..bytes.len()).prop_map(move |n| Payload::Other(&bytes[..n])),
    ]
}

static TEXT: &str = "can status --verbose; ünïcödé ok \u{1F697} set bitrate 500000";
static BYTES: &[u8] = &[
    0, 1, 2, 0xFF, 0xFE, 0x80, b'o', b'k', b'\n', 0, 0, 0, 7, 7, 7, 7,
];

fn header() -> impl Strategy<Value = (u8, u16, [u8; 8], u32, u64, Vec<u8>)> {
    (
        any::<u8>().prop_map(|f| f & !remp::flags::SESSION_MAC),
        any::<u16>(),
        any::<[u8; 8]>(),
        any::<u32>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..=64),
    )
}

fn remp_round_trip(packet: &Packet<'_>) {
    let mut out = [0u8; MAX_PACKET_LEN];
    let n = remp::encode(packet, &mut out).unwrap();
    let decoded = remp::decode(&out[..n]).unwrap();
    assert_eq!(&decoded, packet);
    // Through the stream, too.
    let mut frame = [0u8; MAX_FRAME_LEN];
    let m = encode_frame(&out[..n], &mut frame).unwrap();
    let mut dec: StreamDecoder = StreamDecoder::new();
    let mut seen = 0;
    dec.push(&frame[..m], |p| {
        assert_eq!(p, &out[..n]);
        seen += 1;
    });
    assert_eq!(seen, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn remp_packets_round_trip(
        (flags, fw_build, dev, seq, ts, token) in header(),
        payload in payload(TEXT, BYTES),
        other_type in 0x20u8..=0xFF,
    ) {
        let msg_type = payload.msg_type().unwrap_or(MsgType::Other(other_type));
        let header = Header { msg_type, flags, fw_build, device_id: DeviceId(dev), seq, timestamp_us: ts, token: &token };
        remp_round_trip(&Packet { header, payload });
    }

    #[test]
    fn batches_round_trip(recs in records(40), seq in any::<u32>()) {
        let borrowed = borrow(&recs);
        let mut buf = vec![0u8; 4 + 78 * recs.len()];
        let n = batch::encode_batch(&borrowed, &mut buf).unwrap();
        let parsed = Batch::parse(&buf[..n]).unwrap();
        prop_assert_eq!(parsed.iter().collect::<Vec<_>>(), borrowed.clone());
        prop_assert_eq!(parsed.iter().len(), recs.len());
        if n <= remp::MAX_PAYLOAD_LEN {
            let header = Header::new(MsgType::CanBatch, DeviceId([0; 8]), seq);
            remp_round_trip(&Packet { header, payload: Payload::CanBatch(parsed) });
        }
        // Standalone records round-trip too.
        for r in &borrowed {
            let mut one = [0u8; batch::MAX_RECORD_LEN];
            let len = r.encode(&mut one).unwrap();
            prop_assert_eq!(CanRecord::decode(&one[..len]).unwrap(), (*r, len));
        }
    }

    #[test]
    fn announces_round_trip(
        dev in any::<[u8; 8]>(),
        fw in prop::option::of("[ -~]{0,40}"),
        udp_port in any::<u16>(),
        capabilities in any::<u32>(),
        proto_ver in any::<u16>(),
        lan_ip in any::<Option<[u8; 4]>>(),
        pairing in any::<bool>(),
        nonce in any::<Option<[u8; 16]>>(),
        seq in any::<u32>(),
        legacy in any::<bool>(),
    ) {
        let announce = Announce {
            device_id: DeviceId(dev),
            fw_build: fw.as_deref(),
            udp_port,
            capabilities,
            proto_ver,
            lan_ip,
            pairing_state: if pairing { PairingState::Pairing } else { PairingState::Normal },
            pairing_nonce: nonce,
        };
        let format = if legacy { HeaderFormat::Legacy } else { HeaderFormat::Current };
        let seq = if legacy { seq & 0xFFFF } else { seq };
        for body in [Body::Discover, Body::Announce(announce)] {
            let msg_type = match body { Body::Discover => discovery::MsgType::Discover, _ => discovery::MsgType::Announce };
            let packet = discovery::Packet { header: discovery::Header { msg_type, flags: 0, format, seq }, body };
            let mut out = [0u8; 512];
            let n = discovery::encode(&packet, &mut out).unwrap();
            prop_assert_eq!(discovery::decode(&out[..n]).unwrap(), packet);
        }
    }

    /// Decoders never panic and reject garbage with a typed error.
    #[test]
    fn decoders_survive_garbage(bytes in prop::collection::vec(any::<u8>(), 0..1600)) {
        let _ = discovery::decode(&bytes);
        let _ = remp::decode(&bytes);
        let _ = Batch::parse(&bytes);
        let _ = CanRecord::decode(&bytes);
        let mut dec: StreamDecoder<256> = StreamDecoder::new();
        dec.push(&bytes, |_| {});
    }

    /// Garbage behind a valid magic is rejected, as are truncations and extensions of valid
    /// packets (prefixes and suffixes).
    #[test]
    fn decoders_reject_short_long_and_inconsistent(
        payload in payload(TEXT, BYTES),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
        flip in any::<prop::sample::Index>(),
    ) {
        let msg_type = payload.msg_type().unwrap_or(MsgType::Other(0x7F));
        let packet = Packet { header: Header::new(msg_type, DeviceId([1; 8]), 1), payload };
        let mut out = [0u8; MAX_PACKET_LEN];
        let n = remp::encode(&packet, &mut out).unwrap();
        let good = &out[..n];
        // Opaque payloads have no length of their own; every other kind knows its length.
        let self_delimited = !matches!(payload, Payload::Other(_));
        let short = &good[..cut.index(n)];
        // A pairing ack has two valid lengths (PROTOCOL.md 3.5): with the nonce (a successful start)
        // and without it (everything else). Cut right before its nonce, it is a valid shorter ack.
        let ack_without_nonce = matches!(payload, Payload::PairingAck(a) if a.pairing_nonce.is_some())
            && short.len() == remp::HEADER_LEN + 20;
        if (self_delimited && !ack_without_nonce) || short.len() < remp::HEADER_LEN {
            prop_assert!(remp::decode(short).is_err());
        }
        let mut long = good.to_vec();
        long.extend_from_slice(&extra);
        if self_delimited {
            prop_assert!(remp::decode(&long).is_err());
        }
        // A bit flip in the magic or version is always caught.
        let mut bad = good.to_vec();
        bad[flip.index(5)] ^= 0x10;
        prop_assert!(remp::decode(&bad).is_err());

        let mut d = [0u8; 64];
        let dn = discovery::encode_discover(7, &mut d).unwrap();
        prop_assert!(discovery::decode(&d[..cut.index(dn)]).is_err());
        let mut dl = d[..dn].to_vec();
        dl.extend_from_slice(&extra);
        prop_assert!(discovery::decode(&dl).is_err());
        let mut df = d[..dn].to_vec();
        df[flip.index(dn)] ^= 0x04;
        prop_assert!(discovery::decode(&df).is_err());
    }
}

/// One event of the hostile stream.
#[derive(Debug, Clone)]
enum Piece {
    /// A packet framed intact.
    Frame(Vec<u8>),
    /// A frame cut short (the rest never arrives, not even its terminator).
    Truncated(Vec<u8>, prop::sample::Index),
    /// A frame with one bit flipped.
    Flipped(Vec<u8>, prop::sample::Index, u8),
    /// Line noise, then a 0x00 (a sender's resynchronisation byte).
    Garbage(Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    let pkt = prop::collection::vec(any::<u8>(), 1..300);
    prop_oneof![
        6 => pkt.clone().prop_map(Piece::Frame),
        1 => (pkt.clone(), any::<prop::sample::Index>()).prop_map(|(p, i)| Piece::Truncated(p, i)),
        1 => (pkt, any::<prop::sample::Index>(), 0u8..8).prop_map(|(p, i, b)| Piece::Flipped(p, i, b)),
        1 => prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(1u8..=255, 1500..2000),
        ].prop_map(Piece::Garbage),
    ]
}

fn frame(packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; MAX_FRAME_LEN];
    let n = encode_frame(packet, &mut out).unwrap();
    out.truncate(n);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Valid frames mixed with garbage, truncations and bit flips, split at random points:
    /// every intact frame that follows a 0x00 comes out, in order, and nothing else does.
    #[test]
    fn stream_survives_hostile_input(
        pieces in prop::collection::vec(piece(), 1..40),
        splits in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let mut wire = Vec::new();
        // (start offset, packet) of every frame written intact.
        let mut intact = Vec::new();
        for p in &pieces {
            match p {
                Piece::Frame(pkt) => {
                    intact.push((wire.len(), pkt.clone()));
                    wire.extend(frame(pkt));
                }
                Piece::Truncated(pkt, i) => {
                    let f = frame(pkt);
                    wire.extend_from_slice(&f[..i.index(f.len() - 1)]);
                }
                Piece::Flipped(pkt, i, bit) => {
                    let mut f = frame(pkt);
                    let at = i.index(f.len());
                    f[at] ^= 1 << bit;
                    wire.extend(f);
                }
                Piece::Garbage(g) => {
                    wire.extend_from_slice(g);
                    wire.push(0);
                }
            }
        }
        // A frame is delivered only if the stream is in step where it starts.
        let expected: Vec<Vec<u8>> = intact
            .into_iter()
            .filter(|(start, _)| *start == 0 || wire[start - 1] == 0)
            .map(|(_, p)| p)
            .collect();
        let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.push(0);
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut dec: StreamDecoder = StreamDecoder::new();
        let mut got = Vec::new();
        for w in cuts.windows(2) {
            dec.push(&wire[w[0]..w[1]], |p| got.push(p.to_vec()));
        }
        let stats = dec.stats();
        prop_assert_eq!(stats.packets_ok as usize, got.len());
        prop_assert_eq!(&got, &expected);
        let damaged = pieces.iter().filter(|p| !matches!(p, Piece::Frame(_))).count();
        if damaged == 0 {
            prop_assert_eq!(stats.crc_errors + stats.cobs_errors + stats.oversize, 0);
        }
    }
}

/// The one prefix of a valid packet that is itself valid: a start ack cut before its nonce decodes as
/// an ack without one, which is what a submit ack looks like. The layout makes this so; the status and
/// the correlation id tell the two apart.
#[test]
fn a_pairing_ack_cut_before_its_nonce_is_an_ack_without_one() {
    use firmware_proto::ids::CorrelationId;
    use firmware_proto::remp::{PairingAck, PairingStatus};
    let ack = PairingAck {
        status: PairingStatus::Ok,
        seconds: 120,
        corr_id: CorrelationId([7; 16]),
        pairing_nonce: Some([9; 16]),
    };
    let packet = Packet {
        header: Header::new(MsgType::Pairing, DeviceId([1; 8]), 1),
        payload: Payload::PairingAck(ack),
    };
    let mut out = [0u8; MAX_PACKET_LEN];
    let n = remp::encode(&packet, &mut out).unwrap();
    assert_eq!(n, remp::HEADER_LEN + 36);
    let cut = remp::decode(&out[..remp::HEADER_LEN + 20]).unwrap();
    assert_eq!(
        cut.payload,
        Payload::PairingAck(PairingAck {
            pairing_nonce: None,
            ..ack
        })
    );
    for len in (remp::HEADER_LEN + 21)..n {
        assert!(
            remp::decode(&out[..len]).is_err(),
            "a {len}-byte prefix decoded"
        );
    }
}
