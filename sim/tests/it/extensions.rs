//! Plain REMP v1 and each extension, switched on one at a time.

use crate::common;

use common::*;
use dongle_sim::{BusTap, Extensions, SimConfig, SimHandle};
use firmware_proto::ext::{
    AuthMessage, AuthStatus, BusState, BusStatus, BusStatusAction, Forget, ForgetAction,
    ForgetStatus,
};
use firmware_proto::ids::{CorrelationId, DeviceId};
use firmware_proto::remp::{self, CanConfig, CliRequest, CliStatus, MsgType, Payload};

async fn claimed(
    ext: Extensions,
    bus: Option<&std::path::Path>,
) -> (tempfile::TempDir, SimHandle, Host) {
    let dir = tempfile::tempdir().unwrap();
    let state = state_in(&dir);
    provision_claimed(&state, DeviceId([0xE0, 1, 2, 3, 4, 5, 6, 7]));
    let mut config = SimConfig::serial(&state).with_extensions(ext);
    if let Some(root) = bus {
        config.bus = Some("ext".into());
        config.bus_root = Some(root.to_path_buf());
    }
    let sim = start(config).await;
    let host = Host::connect(&sim).await;
    (dir, sim, host)
}

#[tokio::test]
async fn plain_v1_ignores_extension_types_and_sends_single_frames() {
    let root = tempfile::tempdir().unwrap();
    let (_dir, sim, mut host) = claimed(Extensions::NONE, Some(root.path())).await;
    assert_eq!(host.discover(1).await.unwrap().capabilities, 0);
    let p = host.packet(Payload::BusStatus(BusStatus::request()), &TOKEN);
    host.send(&p).await;
    let p = host.packet(
        Payload::Auth(AuthMessage::Challenge {
            host_nonce: [1; 16],
        }),
        &[],
    );
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    assert_eq!(sim.stats().dongle.unknown_type, 2);

    host.config(CanConfig::get()).await.unwrap();
    let mut tap = BusTap::join_at(root.path(), "ext").unwrap();
    assert!(tap.wait_for_peers(1, WAIT).await);
    tap.send_all(&[frame("100#01"), frame("101#02")]).await;
    let first = host
        .recv_until(WAIT, |b| remp::decode_header(b).is_ok())
        .await
        .unwrap();
    assert_eq!(
        remp::decode_header(&first).unwrap().0.msg_type,
        MsgType::Can
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn batch_extension_carries_frames_both_ways() {
    let root = tempfile::tempdir().unwrap();
    let ext = Extensions {
        batch: true,
        ..Extensions::NONE
    };
    let (_dir, sim, mut host) = claimed(ext, Some(root.path())).await;
    assert_eq!(
        host.discover(1).await.unwrap().capabilities,
        firmware_proto::caps::CAN_BATCH
    );
    host.config(CanConfig::get()).await.unwrap();
    let mut tap = BusTap::join_at(root.path(), "ext").unwrap();
    assert!(tap.wait_for_peers(1, WAIT).await);
    tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;

    let frames: Vec<_> = (0..20u8)
        .map(|i| dongle_sim::Frame::classic(can_id(0x7E8), &[i]).unwrap())
        .collect();
    tap.send_all(&frames).await;
    let packet = host
        .recv_type(MsgType::CanBatch, WAIT)
        .await
        .expect("a batch");
    let Payload::CanBatch(batch) = remp::decode(&packet).unwrap().payload else {
        panic!()
    };
    assert!(!batch.is_empty());
    let mut got: Vec<u8> = batch.iter().map(|r| r.data[0]).collect();
    got.extend(
        host.recv_frames(20 - got.len(), WAIT)
            .await
            .iter()
            .map(|f| f.data()[0]),
    );
    assert_eq!(got, (0..20).collect::<Vec<u8>>());

    // A batch from the host goes onto the bus, in order.
    let mut buf = [0u8; 512];
    let records: Vec<_> = frames.iter().take(3).map(|f| f.to_record(0)).collect();
    let n = firmware_proto::ext::batch::encode_batch(&records, &mut buf).unwrap();
    let batch = firmware_proto::ext::Batch::parse(&buf[..n]).unwrap();
    let p = host.packet(Payload::CanBatch(batch), &TOKEN);
    host.send(&p).await;
    for i in 0..3u8 {
        let f = tokio::time::timeout(WAIT, tap.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.data(), [i]);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn bus_status_extension_reports_the_controller_state() {
    let ext = Extensions {
        bus_status: true,
        ..Extensions::NONE
    };
    let (_dir, sim, mut host) = claimed(ext, None).await;
    let p = host.packet(Payload::BusStatus(BusStatus::request()), &TOKEN);
    let reply = host.request(&p, MsgType::BusStatus).await.expect("report");
    let Payload::BusStatus(report) = remp::decode(&reply).unwrap().payload else {
        panic!()
    };
    assert_eq!(
        (report.action, report.state, report.tec, report.rec),
        (BusStatusAction::Report, BusState::ErrorActive, 0, 0)
    );
    // Without the token: no answer.
    let p = host.packet(Payload::BusStatus(BusStatus::request()), &[]);
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn forget_extension_erases_the_token() {
    let ext = Extensions {
        forget: true,
        ..Extensions::NONE
    };
    let (_dir, sim, mut host) = claimed(ext, None).await;
    let request = Forget {
        action: ForgetAction::Request,
        status: ForgetStatus::Ok,
        corr_id: CorrelationId([4; 16]),
    };
    let p = host.packet(Payload::Forget(request), &TOKEN);
    let reply = host.request(&p, MsgType::Forget).await.expect("ack");
    let Payload::Forget(ack) = remp::decode(&reply).unwrap().payload else {
        panic!()
    };
    assert_eq!(
        (ack.action, ack.status, ack.corr_id),
        (ForgetAction::Ack, ForgetStatus::Ok, request.corr_id)
    );
    assert!(sim.flash().token.is_none());
    // The forgotten token no longer opens anything: a request with it gets no answer.
    let cli = remp::CliRequest {
        flags: 0,
        corr_id: firmware_proto::ids::CorrelationId([6; 16]),
        command: "version",
    };
    let p = host.packet(Payload::CliRequest(cli), &TOKEN);
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    // A forgotten dongle can pair again.
    assert_eq!(host.pairing_start().await.status, remp::PairingStatus::Ok);
    sim.shutdown().await;
}

#[tokio::test]
async fn session_extension_authenticates_seals_and_refuses_replays() {
    let ext = Extensions {
        session: true,
        ..Extensions::NONE
    };
    let (_dir, sim, mut host) = claimed(ext, None).await;
    assert_eq!(host.authenticate().await, AuthStatus::Ok);

    // A sealed request gets a sealed answer.
    let request = CliRequest {
        flags: 0,
        corr_id: CorrelationId([5; 16]),
        command: "echo sealed",
    };
    let sealed = host.sealed(Payload::CliRequest(request));
    let reply = host.request(&sealed, MsgType::Cli).await.expect("answer");
    assert!(remp::decode_header(&reply).unwrap().0.has_session_mac());
    let Payload::CliResponse(r) = host.open(&reply).payload else {
        panic!()
    };
    assert_eq!((r.status, r.output), (CliStatus::Ok, &b"sealed\n"[..]));

    // The same packet again is a replay: no answer, counted.
    host.send(&sealed).await;
    assert!(host.recv(QUIET).await.is_none());
    assert_eq!(sim.stats().dongle.replays_refused, 1);

    // A tampered MAC is dropped without an answer, and counted.
    let failures = sim.stats().dongle.auth_failures;
    let mut tampered = host.sealed(Payload::CliRequest(request));
    tampered[31] ^= 1;
    host.send(&tampered).await;
    assert!(host.recv(QUIET).await.is_none());
    assert_eq!(sim.stats().dongle.auth_failures, failures + 1);

    // The session keeps working after the refusals.
    let answer = host.cli_with("version", 0, None).await.unwrap();
    assert_eq!(answer.status, CliStatus::Ok);
    sim.shutdown().await;
}

#[tokio::test]
async fn session_handshake_with_an_unpaired_dongle_says_not_paired() {
    let dir = tempfile::tempdir().unwrap();
    let config = SimConfig::udp(state_in(&dir)).with_extensions(Extensions::ALL);
    let sim = start(config).await;
    let mut host = Host::udp(&sim).await;
    assert_eq!(host.authenticate().await, AuthStatus::NotPaired);
    sim.shutdown().await;
}
