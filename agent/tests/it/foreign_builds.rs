//! The agent built for other platforms and run on this x86-64 Linux machine through an emulator:
//! - Windows (x86_64-pc-windows-gnu, Debian's MinGW-w64) under Wine: scripts/test turns on
//!   `bridge-agent/wine-tests` and gives `BRIDGE_AGENT_EXE` (the binary), `BRIDGE_AGENT_WINDOWS_UNIT_TESTS`
//!   (the agent crate's unit tests), `WINE64` and `WINEPREFIX`;
//! - Linux on ARM (aarch64-unknown-linux-gnu, Debian's gcc-aarch64-linux-gnu) under qemu-user:
//!   scripts/test turns on `bridge-agent/aarch64-tests` and gives `BRIDGE_AGENT_AARCH64` (the binary),
//!   `BRIDGE_AGENT_AARCH64_UNIT_TESTS` (the agent crate's unit tests) and `QEMU_AARCH64`.
//!
//! On each, the agent's unit tests pass and the agent lists a simulated dongle on the LAN (`list --udp
//! ADDR`), which exercises its UDP transport, the Discovery v1 codec and its folder on that platform.
//! The Windows build is also served end to end under Wine against the Linux server: logged in, pairing,
//! a CAN configuration, a command, and frames both ways through a group with a Linux agent.

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Agent, Dongle, Server, active_group, collect, numbered, pair};
use dongle_sim::{BusTap, SimConfig, Simulator};
use sqlx::PgPool;
use tokio::process::Command;

/// How a foreign build is started here: the emulator, and what it is given before the agent's arguments.
struct Foreign {
    emulator: String,
    program: String,
    env: Vec<(&'static str, String)>,
}

impl Foreign {
    fn windows(program: &str) -> Self {
        Foreign {
            emulator: std::env::var("WINE64").expect("scripts/test sets WINE64"),
            program: std::env::var(program)
                .unwrap_or_else(|_| panic!("scripts/test sets {program}")),
            env: vec![("WINEDEBUG", "-all".into())],
        }
    }

    fn aarch64(program: &str) -> Self {
        Foreign {
            emulator: std::env::var("QEMU_AARCH64").expect("scripts/test sets QEMU_AARCH64"),
            program: std::env::var(program)
                .unwrap_or_else(|_| panic!("scripts/test sets {program}")),
            // The dynamic loader and libc of the cross toolchain (libc6-arm64-cross).
            env: vec![("QEMU_LD_PREFIX", "/usr/aarch64-linux-gnu".into())],
        }
    }

    /// Runs the program with `args`: (success, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let output = tokio::time::timeout(
            Duration::from_secs(300),
            Command::new(&self.emulator)
                .arg(&self.program)
                .args(args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the emulated program finished within five minutes")
        .expect("the emulator started");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// `list --udp` against a simulated UDP dongle finds it; `home` is the agent's folder as the platform
/// names `path`.
async fn lists_a_simulated_dongle(agent: &Foreign, home: impl Fn(&std::path::Path) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::udp(dir.path().join("flash.json")))
        .await
        .expect("a UDP simulator");
    let discovery = sim
        .discovery_addr()
        .expect("a discovery address")
        .to_string();
    let home = home(&dir.path().join("agent"));
    let (ok, listed, err) = agent
        .run(&["--home", &home, "list", "--udp", &discovery])
        .await;
    assert!(ok, "{err}");
    let device = sim.device_id().to_string();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&device) && l.contains("lan 127.0.0.1")),
        "the agent did not list {device}:\n{listed}\n{err}"
    );
    sim.shutdown().await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "wine-tests"),
    ignore = "needs the Windows build of the agent and Wine: scripts/test provides both as root and turns on bridge-agent/wine-tests"
)]
async fn the_windows_agent_finds_a_simulated_dongle_under_wine() {
    let agent = Foreign::windows("BRIDGE_AGENT_EXE");
    let (ok, help, err) = agent.run(&["--help"]).await;
    assert!(ok, "{err}");
    assert!(help.contains("Usage: bridge-agent.exe"), "{help}");
    lists_a_simulated_dongle(&agent, common::windows_path).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "aarch64-tests"),
    ignore = "needs the aarch64 build of the agent and qemu-user: scripts/test provides both as root and turns on bridge-agent/aarch64-tests"
)]
async fn the_arm64_agent_finds_a_simulated_dongle_under_qemu_user() {
    let agent = Foreign::aarch64("BRIDGE_AGENT_AARCH64");
    let (ok, version, err) = agent.run(&["--version"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        version.trim(),
        format!("bridge-agent {}", env!("CARGO_PKG_VERSION"))
    );
    lists_a_simulated_dongle(&agent, |path| path.display().to_string()).await;
}

/// Runs the agent crate's unit tests and checks that all of them ran and passed, `must_pass` among
/// them (the tests of that platform's own code).
async fn unit_tests_pass(tests: Foreign, platform: &str, must_pass: &[&str]) {
    let (ok, out, err) = tests.run(&["--test-threads", "2"]).await;
    let summary = out
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_else(|| panic!("no test summary:\n{out}\n{err}"));
    assert!(
        ok,
        "the {platform} unit tests failed: {summary}\n{out}\n{err}"
    );
    // "test result: ok. 78 passed; 0 failed; ..." : every unit test ran, not a filtered few.
    let passed: u32 = summary
        .split("ok. ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable summary: {summary}"));
    println!("{platform}: {summary}");
    assert!(passed >= 50, "only {passed} unit tests ran: {summary}");
    for test in must_pass {
        assert!(
            out.lines().any(|l| l == format!("test {test} ... ok")),
            "{test} did not pass on {platform}:\n{out}"
        );
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "aarch64-tests"),
    ignore = "needs the aarch64 build of the agent's unit tests and qemu-user: scripts/test provides both as root and turns on bridge-agent/aarch64-tests"
)]
async fn the_agents_unit_tests_pass_on_arm64_under_qemu_user() {
    unit_tests_pass(
        Foreign::aarch64("BRIDGE_AGENT_AARCH64_UNIT_TESTS"),
        "aarch64 under qemu-user",
        &["vault::tests::tokens_survive_reopening_and_files_are_private"],
    )
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "wine-tests"),
    ignore = "needs the Windows build of the agent's unit tests and Wine: scripts/test provides both as root and turns on bridge-agent/wine-tests"
)]
async fn the_agents_unit_tests_pass_on_windows_under_wine() {
    unit_tests_pass(
        Foreign::windows("BRIDGE_AGENT_WINDOWS_UNIT_TESTS"),
        "Windows under Wine",
        &["vault::tests::on_windows_the_key_is_sealed_for_the_user"],
    )
    .await;
}

/// The Windows agent as a technician on a Windows laptop uses it, against the Linux server: `login`,
/// `list` and `run` find its dongle on the LAN; the dongle is paired with the PIN it shows, configured and
/// commanded through the API; then it is bridged through a group to a dongle that a Linux agent serves,
/// with frames both ways, each once and in order.
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "wine-tests"),
    ignore = "needs the Windows build of the agent and Wine: scripts/test provides both as root and turns on bridge-agent/wine-tests"
)]
async fn the_windows_agent_pairs_configures_commands_and_bridges_under_wine(pool: PgPool) {
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;
    let bus_root = tempfile::tempdir().unwrap();

    // The Windows agent's dongle is on the LAN, on the workshop's bus; the Linux agent's is on USB
    // serial, on the vehicle's.
    let lan = Dongle::udp_on_bus(bus_root.path(), "workshop").await;
    let usb = Dongle::serial_on_bus(bus_root.path(), "vehicle").await;
    let mut workshop = BusTap::recorder_at(bus_root.path(), "workshop").unwrap();
    let mut vehicle = BusTap::recorder_at(bus_root.path(), "vehicle").unwrap();

    let mut windows = Agent::windows();
    windows.login(&server, &user).await;
    let lan_args = lan.agent_args();
    let (ok, listed, err) = windows
        .exec(&["list", lan_args[0].as_str(), lan_args[1].as_str()], None)
        .await;
    assert!(ok, "{err}");
    assert!(listed.contains(&lan.device_id), "{listed}\n{err}");
    windows.run(&lan_args);

    // Paired while only the Windows agent runs: the one that serves the dongle.
    let lan_id = pair(&user, &lan).await;
    let seen = user.dongle(&lan.device_id).await.expect("the listing");
    assert_eq!(
        seen["agent_id"].as_str(),
        Some(windows.agent_id().to_string().as_str()),
        "{seen}"
    );
    user.apply_can_config(&lan_id, 500_000).await;
    let answer = user.command_answer(&lan_id, "version").await;
    assert!(
        answer["stdout"]
            .as_str()
            .is_some_and(|o| o.contains("remp 1")),
        "{answer}"
    );

    let mut linux = Agent::new();
    linux.login(&server, &user).await;
    linux.run(&usb.agent_args());
    let usb_id = pair(&user, &usb).await;
    active_group(&user, &lan_id, &usb_id).await;
    assert!(workshop.wait_for_peers(1, Duration::from_secs(5)).await);
    assert!(vehicle.wait_for_peers(1, Duration::from_secs(5)).await);

    // Each way in turn, so that a frame seen on a bus is one that crossed.
    crosses(&mut workshop, &mut vehicle, "Windows to Linux").await;
    crosses(&mut vehicle, &mut workshop, "Linux to Windows").await;
    windows.kill().await;
    linux.stop().await;
    server.stop().await;
}

/// A hundred numbered frames sent on `from` arrive on `to`, once and in order.
async fn crosses(from: &mut BusTap, to: &mut BusTap, way: &str) {
    const FRAMES: u16 = 100;
    for n in 0..FRAMES {
        from.send(&numbered(n)).await;
        if n % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let seen = collect(to, usize::from(FRAMES), Duration::from_secs(10)).await;
    assert_eq!(seen, (0..FRAMES).collect::<Vec<_>>(), "{way}");
}
