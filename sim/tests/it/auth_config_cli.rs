//! Token checks, CAN configuration and the CLI, over real links.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use dongle_sim::SimConfig;
use firmware_proto::remp::{CanConfig, CanMode, CliRequest, CliStatus, ConfigStatus, Payload};

#[tokio::test]
async fn packets_without_the_right_token_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(SimConfig::serial(state_in(&dir))).await;
    let mut events = sim.events();
    let mut host = Host::connect(&sim).await;
    host.pair(&mut events).await;

    // Every request with a wrong or a missing token is dropped without an answer (PROTOCOL.md:
    // an answer would be an oracle), and counted.
    let wrong = [0x11u8; 32];
    let cli = CliRequest {
        flags: 0,
        corr_id: firmware_proto::ids::CorrelationId([5; 16]),
        command: "version",
    };
    for token in [&wrong[..], &[]] {
        let p = host.packet(Payload::CliRequest(cli), token);
        host.send(&p).await;
        assert!(host.recv(QUIET).await.is_none());
    }
    let p = host.packet(Payload::CanConfig(CanConfig::get()), &wrong);
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    let can = frame("123#01").to_can_frame().unwrap();
    let p = host.packet(Payload::Can(can), &wrong);
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    // The right token still works.
    assert_eq!(host.cli("version").await.status, CliStatus::Ok);
    assert_eq!(sim.stats().dongle.auth_failures, 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn can_configuration_get_set_invalid_and_effective_values() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(SimConfig::udp(state_in(&dir))).await;
    let mut events = sim.events();
    let mut host = Host::udp(&sim).await;
    host.pair(&mut events).await;

    let get = host.config(CanConfig::get()).await.unwrap();
    assert_eq!(
        (get.status, get.bitrate, get.sample_point_permille),
        (ConfigStatus::Ok, 500_000, 875)
    );

    // Derived timing: effective values for an 80 MHz clock.
    let set = host
        .config(set_config(125_000, 875, CanMode::Normal))
        .await
        .unwrap();
    assert_eq!(set.status, ConfigStatus::Ok);
    assert_eq!(set.bitrate, 125_000);
    assert_eq!(
        80_000_000 / (u32::from(set.prescaler) * (1 + u32::from(set.tseg1) + u32::from(set.tseg2))),
        125_000
    );
    assert_eq!(set.sample_point_permille, 875);

    // Raw timing: checked against bxCAN ranges, effective bitrate computed.
    let mut raw = set_config(0, 0, CanMode::Normal);
    raw.flags |= CanConfig::FLAG_USE_RAW;
    (raw.prescaler, raw.tseg1, raw.tseg2, raw.sjw) = (5, 13, 2, 1);
    let r = host.config(raw).await.unwrap();
    assert_eq!(
        (r.status, r.bitrate, r.sample_point_permille),
        (ConfigStatus::Ok, 1_000_000, 875)
    );

    // Out of range: invalid, and the effective configuration is unchanged.
    raw.tseg1 = 17;
    let r = host.config(raw).await.unwrap();
    assert_eq!((r.status, r.bitrate), (ConfigStatus::Invalid, 1_000_000));
    raw.tseg1 = 13;
    (raw.sjw, raw.tseg2) = (3, 2);
    assert_eq!(
        host.config(raw).await.unwrap().status,
        ConfigStatus::Invalid
    );
    assert_eq!(
        host.config(set_config(5_000, 875, CanMode::Normal))
            .await
            .unwrap()
            .status,
        ConfigStatus::Invalid
    );
    assert_eq!(
        host.config(set_config(500_000, 400, CanMode::Normal))
            .await
            .unwrap()
            .status,
        ConfigStatus::Invalid
    );

    // In range but not reachable within 1 %: apply_failed.
    let r = host
        .config(set_config(970_000, 875, CanMode::Normal))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.bitrate),
        (ConfigStatus::ApplyFailed, 1_000_000)
    );

    // The same configuration twice is the same answer.
    let a = host
        .config(set_config(500_000, 800, CanMode::ListenOnly))
        .await
        .unwrap();
    let b = host
        .config(set_config(500_000, 800, CanMode::ListenOnly))
        .await
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.mode, CanMode::ListenOnly);
    sim.shutdown().await;
}

#[tokio::test]
async fn fd_dongles_check_fdcan_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::serial(state_in(&dir));
    config.fd = true;
    let sim = start(config).await;
    let mut events = sim.events();
    let mut host = Host::connect(&sim).await;
    assert_eq!(
        host.discover(1).await.unwrap().capabilities,
        firmware_proto::caps::CAN_FD
    );
    host.pair(&mut events).await;
    let mut raw = set_config(0, 0, CanMode::Normal);
    raw.flags |= CanConfig::FLAG_USE_RAW;
    (raw.prescaler, raw.tseg1, raw.tseg2, raw.sjw) = (2, 63, 16, 16);
    let r = host.config(raw).await.unwrap();
    assert_eq!((r.status, r.bitrate), (ConfigStatus::Ok, 500_000));
    sim.shutdown().await;
}

#[tokio::test]
async fn cli_commands_answer_truncate_deny_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::serial(state_in(&dir));
    config.cli_timeout = Duration::from_millis(400);
    let sim = start(config).await;
    let mut events = sim.events();
    let mut host = Host::connect(&sim).await;
    host.pair(&mut events).await;

    for command in [
        "version",
        "uptime",
        "remote status",
        "remote stats",
        "remote pairing show",
        "net status",
    ] {
        let a = host.cli(command).await;
        assert_eq!(
            (a.status, a.exit_code, a.truncated),
            (CliStatus::Ok, 0, false),
            "{command}"
        );
        assert!(!a.output.is_empty(), "{command}");
        assert_eq!(a.corr_id, firmware_proto::ids::CorrelationId([9; 16]));
    }
    assert!(
        host.cli("remote status")
            .await
            .output
            .contains(&sim.device_id().to_string())
    );
    assert!(host.cli("net status").await.output.contains("/dev/pts/"));

    let long = "y".repeat(200);
    let a = host.cli(&format!("echo {long} {long} {long}")).await;
    assert!(a.truncated);
    assert_eq!(a.output.len(), 512);
    let a = host.cli("echo hello").await;
    assert_eq!((a.output.as_str(), a.truncated), ("hello\n", false));

    assert_eq!(host.cli("reboot now").await.status, CliStatus::Denied);
    assert_eq!(host.cli("factory-reset").await.status, CliStatus::Denied);

    let t = Instant::now();
    let a = host.cli("sleep 150").await;
    assert_eq!(a.status, CliStatus::Ok);
    assert!(t.elapsed() >= Duration::from_millis(150));
    let t = Instant::now();
    let a = host.cli("sleep 10000").await;
    assert_eq!(a.status, CliStatus::Timeout);
    assert!(t.elapsed() >= Duration::from_millis(400) && t.elapsed() < Duration::from_secs(3));

    // allow_dangerous lets the dangerous command run: the dongle forgets its token.
    let a = host
        .cli_with(
            "factory-reset",
            CliRequest::FLAG_ALLOW_DANGEROUS,
            Some(&TOKEN),
        )
        .await
        .unwrap();
    assert_eq!(a.status, CliStatus::Ok);
    assert!(sim.flash().token.is_none());
    // The erased token opens nothing any more: the request goes unanswered.
    let p = host.packet(
        Payload::CliRequest(CliRequest {
            flags: 0,
            corr_id: firmware_proto::ids::CorrelationId([8; 16]),
            command: "version",
        }),
        &TOKEN,
    );
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    sim.shutdown().await;
}
