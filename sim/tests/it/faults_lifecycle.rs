//! Fault injection, unplug and replug, factory reset, and the binary's own interface.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use dongle_sim::state::StateFile;
use dongle_sim::{Faults, LinkConfig, SimConfig};
use firmware_proto::discovery::PairingState;
use firmware_proto::ids::DeviceId;
use firmware_proto::remp::{CliStatus, PairingStatus};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

async fn claimed_serial(
    tweak: impl FnOnce(&mut SimConfig),
) -> (tempfile::TempDir, dongle_sim::SimHandle) {
    let dir = tempfile::tempdir().unwrap();
    let state = state_in(&dir);
    provision_claimed(&state, DeviceId([0xF0, 0, 0, 0, 0, 0, 0, 1]));
    let mut config = SimConfig::serial(&state);
    tweak(&mut config);
    (dir, start(config).await)
}

#[tokio::test]
async fn garbage_from_the_dongle_is_skipped_and_counted_by_the_host() {
    let (_dir, sim) = claimed_serial(|c| c.faults.garbage = true).await;
    let mut host = Host::connect(&sim).await;
    for _ in 0..5 {
        assert_eq!(host.cli("version").await.status, CliStatus::Ok);
    }
    sim.inject_garbage(100);
    assert_eq!(host.cli("uptime").await.status, CliStatus::Ok);
    let stats = host.stream_stats();
    assert_eq!(stats.packets_ok, 6);
    assert!(stats.crc_errors + stats.cobs_errors >= 7, "{stats:?}");
    assert!(stats.bytes_skipped > 100);
    assert_eq!(sim.stats().link.tx_garbage_bursts, 7);
    sim.shutdown().await;
}

#[tokio::test]
async fn corrupted_and_dropped_packets_are_counted() {
    let (_dir, sim) = claimed_serial(|_| {}).await;
    let mut host = Host::connect(&sim).await;
    sim.set_faults(Faults {
        corrupt_pct: 100,
        ..Faults::default()
    });
    for _ in 0..3 {
        let request = firmware_proto::remp::CliRequest {
            flags: 0,
            corr_id: Default::default(),
            command: "version",
        };
        let p = host.packet(firmware_proto::remp::Payload::CliRequest(request), &TOKEN);
        host.send(&p).await;
        assert!(
            host.recv(QUIET).await.is_none(),
            "a corrupted packet got through"
        );
    }
    let stats = host.stream_stats();
    assert_eq!(stats.packets_ok, 0);
    assert_eq!(stats.crc_errors + stats.cobs_errors, 3, "{stats:?}");
    assert_eq!(sim.stats().link.tx_corrupted, 3);

    sim.set_faults(Faults {
        drop_pct: 100,
        ..Faults::default()
    });
    let p = host.packet(
        firmware_proto::remp::Payload::CanConfig(firmware_proto::remp::CanConfig::get()),
        &TOKEN,
    );
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    assert_eq!(sim.stats().link.tx_dropped, 1);

    sim.set_faults(Faults {
        delay: Duration::from_millis(200),
        ..Faults::default()
    });
    let t = Instant::now();
    assert_eq!(host.cli("version").await.status, CliStatus::Ok);
    assert!(t.elapsed() >= Duration::from_millis(200));
    sim.set_faults(Faults::default());
    assert_eq!(host.cli("version").await.status, CliStatus::Ok);
    sim.shutdown().await;
}

#[tokio::test]
async fn garbage_from_the_host_is_skipped_and_counted_by_the_dongle() {
    let (_dir, sim) = claimed_serial(|_| {}).await;
    let mut host = Host::connect(&sim).await;
    host.write_raw(&[0x13, 0x37, 0xFF, 0x42, 0x00, 0x01, 0x02, 0x03, 0x00])
        .await;
    assert_eq!(host.cli("version").await.status, CliStatus::Ok);
    let rx = sim.stats().link.rx;
    assert_eq!(rx.packets_ok, 1);
    assert!(rx.crc_errors + rx.cobs_errors >= 2, "{rx:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn unplug_and_replug_keep_the_link_path() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_in(&dir);
    provision_claimed(&state, DeviceId([0xF0, 0, 0, 0, 0, 0, 0, 2]));
    let link = dir.path().join("ttyDONGLE");
    let mut config = SimConfig::serial(&state);
    config.link = LinkConfig::Serial {
        link: Some(link.clone()),
    };
    let sim = start(config).await;
    let first = sim.serial_path().unwrap();
    assert_eq!(std::fs::read_link(&link).unwrap(), first);
    let mut host = Host::serial(&link, sim.device_id()).await;
    assert_eq!(host.cli("version").await.status, CliStatus::Ok);

    sim.unplug().await;
    assert!(!link.exists());
    assert!(sim.serial_path().is_none());
    let request = firmware_proto::remp::CliRequest {
        flags: 0,
        corr_id: Default::default(),
        command: "version",
    };
    let p = host.packet(firmware_proto::remp::Payload::CliRequest(request), &TOKEN);
    assert!(!host.send(&p).await || host.recv(QUIET).await.is_none());
    drop(host);

    let second = sim.replug().await.unwrap();
    assert_eq!(std::fs::read_link(&link).unwrap(), second);
    let mut host = Host::serial(&link, sim.device_id()).await;
    assert_eq!(host.discover(9).await.unwrap().device_id, sim.device_id());
    assert_eq!(host.cli("version").await.status, CliStatus::Ok);
    sim.shutdown().await;
    assert!(!link.exists());
}

#[tokio::test]
async fn an_unplugged_udp_dongle_is_silent() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(SimConfig::udp(state_in(&dir))).await;
    let mut host = Host::udp(&sim).await;
    assert!(host.discover(1).await.is_some());
    sim.unplug().await;
    let mut buf = [0u8; 64];
    let n = firmware_proto::discovery::encode_discover(2, &mut buf).unwrap();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&buf[..n], sim.discovery_addr().unwrap())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(QUIET, socket.recv(&mut buf))
            .await
            .is_err()
    );
    sim.replug().await;
    assert!(host.discover(3).await.is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_factory_reset_is_detectable_by_the_host() {
    let (_dir, sim) = claimed_serial(|_| {}).await;
    let mut host = Host::connect(&sim).await;
    assert_eq!(host.cli("version").await.status, CliStatus::Ok);
    sim.factory_reset();
    let a = host.discover(1).await.unwrap();
    assert_eq!(a.pairing_state, PairingState::Normal);
    // The old token goes unanswered while DISCOVER and PAIRING are answered: that is how the host
    // tells a reset dongle from an unplugged one.
    let cli = firmware_proto::remp::CliRequest {
        flags: 0,
        corr_id: firmware_proto::ids::CorrelationId([7; 16]),
        command: "version",
    };
    let p = host.packet(firmware_proto::remp::Payload::CliRequest(cli), &TOKEN);
    host.send(&p).await;
    assert!(host.recv(QUIET).await.is_none());
    assert_eq!(host.pairing_start().await.status, PairingStatus::Ok);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_binary_prints_its_link_and_the_pin_and_obeys_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttySIM");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dongle-sim"))
        .args([
            "--state",
            state_in(&dir).to_str().unwrap(),
            "--serial",
            "--device-id",
            "00112233445566ff",
        ])
        .args(["--link", link.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let first = next().await;
    assert!(first.starts_with("serial /dev/pts/"), "{first}");
    assert_eq!(next().await, "device 00112233445566ff");
    let id: DeviceId = "00112233445566ff".parse().unwrap();

    let mut host = Host::serial(&link, id).await;
    let ack = host.pairing_start().await;
    let line = next().await;
    let pin = line
        .strip_prefix("PIN ")
        .and_then(|l| l.strip_suffix(" for device 00112233445566ff"));
    let pin = pin.unwrap_or_else(|| panic!("{line}"));
    assert_eq!(
        host.pairing_submit(pin, ack.pairing_nonce.unwrap(), TOKEN)
            .await
            .status,
        PairingStatus::Ok
    );
    assert_eq!(next().await, "paired device 00112233445566ff");

    stdin.write_all(b"unplug\n").await.unwrap();
    assert_eq!(next().await, "unplugged");
    stdin.write_all(b"replug\n").await.unwrap();
    assert!(next().await.starts_with("serial /dev/pts/"));
    stdin.write_all(b"quit\n").await.unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(!link.exists());
    let flash = dongle_sim::Flash::load(&state_in(&dir)).unwrap().unwrap();
    assert!(flash.token.is_some());
}

#[tokio::test]
async fn the_binary_explains_itself_and_its_errors() {
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_dongle-sim"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success());
    for option in [
        "--state",
        "--udp",
        "--bus",
        "--generate",
        "--replay",
        "--extensions",
        "--fault-drop-pct",
        "tap",
        "inject",
    ] {
        assert!(text.contains(option), "--help lacks {option}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(state_in(&dir), "garbage").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dongle-sim"))
        .args(["--state", state_in(&dir).to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
}

#[tokio::test]
async fn tap_and_inject_subcommands_share_a_bus() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let mut tap = tokio::process::Command::new(env!("CARGO_BIN_EXE_dongle-sim"))
        .args([
            "tap",
            "--bus",
            "cmd",
            "--bus-dir",
            root.to_str().unwrap(),
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dongle-sim"))
        .args([
            "inject",
            "--bus",
            "cmd",
            "--bus-dir",
            root.to_str().unwrap(),
            "--wait-ms",
            "3000",
        ])
        .args(["123#DEADBEEF", "18DAF110##1"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = tokio::io::BufReader::new(tap.stdout.take().unwrap()).lines();
    let a = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let b = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(a.ends_with(" cmd 123#DEADBEEF"), "{a}");
    assert!(b.ends_with(" cmd 18DAF110##1"), "{b}");
    assert!(
        tokio::time::timeout(WAIT, tap.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
}
