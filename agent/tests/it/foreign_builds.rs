//! The agent built for other platforms and run on this x86-64 Linux machine through an emulator:
//! - Windows (x86_64-pc-windows-gnu, Debian's MinGW-w64) under Wine: scripts/test turns on
//!   `bridge-agent/wine-tests` and gives `BRIDGE_AGENT_EXE`, `WINE64` and `WINEPREFIX`;
//! - Linux on ARM (aarch64-unknown-linux-gnu, Debian's gcc-aarch64-linux-gnu) under qemu-user:
//!   scripts/test turns on `bridge-agent/aarch64-tests` and gives `BRIDGE_AGENT_AARCH64` (the binary),
//!   `BRIDGE_AGENT_AARCH64_UNIT_TESTS` (the agent crate's unit tests) and `QEMU_AARCH64`.
//!
//! On each, the agent lists a simulated dongle on the LAN (`list --udp ADDR`), which exercises its
//! UDP transport, the Discovery v1 codec and its folder on that platform.

use std::time::Duration;

use dongle_sim::{SimConfig, Simulator};
use tokio::process::Command;

/// How a foreign build is started here: the emulator, and what it is given before the agent's arguments.
struct Foreign {
    emulator: String,
    program: String,
    env: Vec<(&'static str, String)>,
}

impl Foreign {
    fn windows() -> Self {
        Foreign {
            emulator: std::env::var("WINE64").expect("scripts/test sets WINE64"),
            program: std::env::var("BRIDGE_AGENT_EXE").expect("scripts/test sets BRIDGE_AGENT_EXE"),
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
    let agent = Foreign::windows();
    let (ok, help, err) = agent.run(&["--help"]).await;
    assert!(ok, "{err}");
    assert!(help.contains("Usage: bridge-agent.exe"), "{help}");
    // The agent's folder as Windows names this Linux path (Wine maps Z: to /).
    lists_a_simulated_dongle(&agent, |path| {
        format!("Z:{}", path.display()).replace('/', "\\")
    })
    .await;
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

#[tokio::test]
#[cfg_attr(
    not(feature = "aarch64-tests"),
    ignore = "needs the aarch64 build of the agent's unit tests and qemu-user: scripts/test provides both as root and turns on bridge-agent/aarch64-tests"
)]
async fn the_agents_unit_tests_pass_on_arm64_under_qemu_user() {
    let tests = Foreign::aarch64("BRIDGE_AGENT_AARCH64_UNIT_TESTS");
    let (ok, out, err) = tests.run(&["--test-threads", "2"]).await;
    let summary = out
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_else(|| panic!("no test summary:\n{out}\n{err}"));
    assert!(ok, "the aarch64 unit tests failed: {summary}\n{out}\n{err}");
    // "test result: ok. 78 passed; 0 failed; ..." : every unit test ran, not a filtered few.
    let passed: u32 = summary
        .split("ok. ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable summary: {summary}"));
    println!("aarch64 under qemu-user: {summary}");
    assert!(passed >= 50, "only {passed} unit tests ran: {summary}");
}
