//! Discovery and pairing, over a real pseudo-terminal and real UDP sockets.

use crate::common;

use std::time::Duration;

use common::*;
use dongle_sim::{Extensions, SimConfig, SimEvent};
use firmware_proto::caps;
use firmware_proto::discovery::PairingState;
use firmware_proto::remp::PairingStatus;

#[tokio::test]
async fn serial_discover_is_answered_with_an_announce() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(SimConfig::serial(state_in(&dir))).await;
    let mut host = Host::connect(&sim).await;
    let a = host.discover(77).await.expect("announce");
    assert_eq!(a.seq, 77);
    assert_eq!(a.device_id, sim.device_id());
    assert_eq!((a.udp_port, a.capabilities, a.proto_ver), (0, 0, 1));
    assert!(a.fw_build.unwrap().starts_with("dongle-sim"));
    assert_eq!(a.pairing_state, PairingState::Normal);
    assert!(a.nonce.is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn udp_discover_is_answered_with_the_remp_port_and_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let config = SimConfig::udp(state_in(&dir)).with_extensions(Extensions::ALL);
    let sim = start(config).await;
    let mut host = Host::udp(&sim).await;
    let a = host.discover(5).await.expect("announce");
    assert_eq!(a.device_id, sim.device_id());
    assert_eq!(a.udp_port, sim.udp_addr().unwrap().port());
    assert_eq!(a.lan_ip, Some([127, 0, 0, 1]));
    assert_eq!(a.capabilities, caps::ALL_EXTENSIONS);
    sim.shutdown().await;
}

#[tokio::test]
async fn pairing_with_the_right_pin_stores_the_token_and_announces_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(SimConfig::serial(state_in(&dir))).await;
    let mut events = sim.events();
    let mut host = Host::connect(&sim).await;

    let ack = host.pairing_start().await;
    assert_eq!((ack.status, ack.seconds), (PairingStatus::Ok, 120));
    let nonce = ack.pairing_nonce.expect("nonce in the start ack");
    let pin = wait_pin(&mut events).await;
    assert_eq!(pin.len(), 6);
    let a = host.discover(1).await.unwrap();
    assert_eq!(
        (a.pairing_state, a.nonce),
        (PairingState::Pairing, Some(nonce))
    );

    let ack = host.pairing_submit(&pin, nonce, TOKEN).await;
    assert_eq!(ack.status, PairingStatus::Ok);
    assert_eq!(sim.flash().token.map(|t| *t.as_bytes()), Some(TOKEN));
    assert_eq!(
        host.discover(2).await.unwrap().pairing_state,
        PairingState::Normal
    );
    assert_eq!(
        host.cli("version").await.status,
        firmware_proto::remp::CliStatus::Ok
    );

    // A claimed dongle refuses a new pairing until its token is forgotten or it is reset.
    let ack = host.pairing_start().await;
    assert_eq!(ack.status, PairingStatus::Error);
    sim.factory_reset();
    assert_eq!(host.pairing_start().await.status, PairingStatus::Ok);
    sim.shutdown().await;
}

#[tokio::test]
async fn five_wrong_pins_start_a_cooldown_that_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(SimConfig::udp(state_in(&dir))).await;
    let mut events = sim.events();
    let mut host = Host::udp(&sim).await;
    let ack = host.pairing_start().await;
    let nonce = ack.pairing_nonce.unwrap();
    let pin = wait_pin(&mut events).await;
    let wrong = if pin == "000000" { "111111" } else { "000000" };
    for _ in 0..4 {
        let ack = host.pairing_submit(wrong, nonce, TOKEN).await;
        assert_eq!((ack.status, ack.seconds), (PairingStatus::InvalidPin, 0));
    }
    let ack = host.pairing_submit(wrong, nonce, TOKEN).await;
    assert_eq!((ack.status, ack.seconds), (PairingStatus::Cooldown, 300));
    // Even the right PIN is refused now, and so is a new window.
    assert_eq!(
        host.pairing_submit(&pin, nonce, TOKEN).await.status,
        PairingStatus::Cooldown
    );
    let ack = host.pairing_start().await;
    assert_eq!(ack.status, PairingStatus::Cooldown);
    assert!((295..=300).contains(&ack.seconds), "{}", ack.seconds);
    assert_eq!(sim.stats().dongle.pin_failures, 5);
    assert!(sim.flash().token.is_none());
    sim.shutdown().await;

    let sim = start(SimConfig::udp(state_in(&dir))).await;
    let mut host = Host::udp(&sim).await;
    let ack = host.pairing_start().await;
    assert_eq!(ack.status, PairingStatus::Cooldown);
    assert!(ack.seconds > 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_pairing_window_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::serial(state_in(&dir));
    config.pairing_window = Duration::from_millis(400);
    let sim = start(config).await;
    let mut events = sim.events();
    let mut host = Host::connect(&sim).await;
    let ack = host.pairing_start().await;
    assert_eq!((ack.status, ack.seconds), (PairingStatus::Ok, 1));
    let pin = wait_pin(&mut events).await;
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Dongle(dongle_sim::Event::PairingExpired)).then_some(())
    })
    .await;
    assert_eq!(
        host.discover(3).await.unwrap().pairing_state,
        PairingState::Normal
    );
    let ack = host
        .pairing_submit(&pin, ack.pairing_nonce.unwrap(), TOKEN)
        .await;
    assert_eq!(ack.status, PairingStatus::Error);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_state_file_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(SimConfig::serial(state_in(&dir))).await;
    let id = sim.device_id();
    let mut events = sim.events();
    let mut host = Host::connect(&sim).await;
    host.pair(&mut events).await;
    let set = host
        .config(set_config(
            250_000,
            875,
            firmware_proto::remp::CanMode::Normal,
        ))
        .await
        .unwrap();
    assert_eq!(set.bitrate, 250_000);
    drop(host);
    sim.shutdown().await;

    let sim = start(SimConfig::serial(state_in(&dir))).await;
    assert_eq!(sim.device_id(), id);
    let mut host = Host::connect(&sim).await;
    assert_eq!(
        host.cli("version").await.status,
        firmware_proto::remp::CliStatus::Ok
    );
    let get = host
        .config(firmware_proto::remp::CanConfig::get())
        .await
        .unwrap();
    assert_eq!(get.bitrate, 250_000);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_damaged_state_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(state_in(&dir), "{ not json").unwrap();
    let err = dongle_sim::Simulator::start(SimConfig::serial(state_in(&dir)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
}
