//! The reference firmware on QEMU's emulated STM32F405, served end to end: the real server,
//! `bridge-agent` as a process, and the firmware found on its serial link, paired with the PIN its
//! console shows, configured, commanded, and bridged through a group to a simulated dongle with frames
//! both ways. It needs qemu-system-arm and the firmware build; scripts/test provides both and turns on
//! `bridge-agent/qemu-tests` where they are.

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Agent, Dongle, Server, active_group, pair};
use dongle_sim::BusTap;
use dongle_sim::frame::Frame as SimFrame;
use firmware_proto::ids::CanId;
use qemu_dongle::{Options, QemuConfig, QemuDongle};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "qemu-tests"),
    ignore = "needs qemu-system-arm and the firmware build: scripts/test provides them and turns on bridge-agent/qemu-tests"
)]
async fn the_qemu_board_is_paired_configured_commanded_and_bridged(pool: PgPool) {
    let config = QemuConfig::find().expect("qemu-tests is on, so QEMU and the firmware are there");
    let board = QemuDongle::start(&config, &Options::default())
        .await
        .expect("the QEMU board boots");
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;

    // The far side: a simulated dongle on a vehicle bus that a tap watches.
    let bus_root = tempfile::tempdir().unwrap();
    let sim = Dongle::serial_on_bus(bus_root.path(), "vehicle").await;
    let mut vehicle = BusTap::recorder_at(bus_root.path(), "vehicle").unwrap();

    let mut agent = Agent::new();
    agent.login(&server, &user).await;
    let mut args = vec![
        "--port".to_string(),
        board.serial_path().display().to_string(),
    ];
    args.extend(sim.agent_args());
    agent.run(&args);

    // Discovered on its serial link, and paired with the PIN its console shows.
    let device_id = board.device_id().to_string();
    let listed = user
        .wait_dongle(&device_id, "seen by the agent", |d| {
            d.is_some_and(|d| d["online"] == true)
        })
        .await
        .expect("the listing");
    assert!(
        listed["fw_build"]
            .as_str()
            .is_some_and(|b| b.starts_with("dongle-fw-qemu")),
        "{listed}"
    );
    let board_id = listed["id"].as_str().unwrap().to_string();
    let mut console = board.console_lines();
    let (status, started) = user
        .post(
            &format!("/dongles/{board_id}/pairing-mode"),
            json!({"action": "start"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let pin = qemu_dongle::next_pin(&mut console, Duration::from_secs(10))
        .await
        .unwrap();
    let (status, body) = user
        .post(
            &format!("/dongles/{board_id}/pairing-submit"),
            json!({"pairing_session_id": started["pairing_session_id"], "pin": pin.as_str()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Configured: the bxCAN's 42 MHz clock divides to exactly 250 kbit/s.
    let body = user.apply_can_config(&board_id, 250_000).await;
    let e = &body["effective"];
    let quanta = 1 + e["tseg1"].as_u64().unwrap() + e["tseg2"].as_u64().unwrap();
    assert_eq!(
        42_000_000 / (e["prescaler"].as_u64().unwrap() * quanta),
        250_000,
        "{body}"
    );

    // Commanded: the firmware answers `version` with its own build.
    let answer = user.command_answer(&board_id, "version").await;
    assert!(
        answer["stdout"]
            .as_str()
            .is_some_and(|o| o.contains("dongle-fw-qemu") && o.contains("remp 1")),
        "{answer}"
    );

    // Bridged: frames an ECU sends on the vehicle bus cross to the board, whose bus echoes them (the
    // board's RAM bus stands for an ECU that answers), and cross back: both directions, once, in order.
    let sim_id = pair(&user, &sim).await;
    active_group(&user, &board_id, &sim_id).await;
    assert!(vehicle.wait_for_peers(1, Duration::from_secs(5)).await);
    let id = CanId::standard(0x321).unwrap();
    const FRAMES: u16 = 200;
    for n in 0..FRAMES {
        vehicle
            .send(&SimFrame::classic(id, &n.to_be_bytes()).unwrap())
            .await;
        if n % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut seen = Vec::new();
    while seen.len() < usize::from(FRAMES) {
        match tokio::time::timeout(Duration::from_secs(10), vehicle.recv()).await {
            Ok(Ok(frame)) if frame.id().raw() == 0x321 => {
                seen.push(u16::from_be_bytes([frame.data()[0], frame.data()[1]]));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the bus tap failed: {e}"),
            Err(_) => break,
        }
    }
    assert_eq!(
        seen,
        (0..FRAMES).collect::<Vec<_>>(),
        "the board's console:\n{}",
        board.log()
    );
    agent.stop().await;
    board.shutdown().await;
}
