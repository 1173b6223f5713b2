//! The Windows build of the agent, run under Wine on this Linux machine, finds a simulated dongle on
//! the LAN: `bridge-agent.exe --help` and `bridge-agent.exe list --udp ADDR`. scripts/test cross-builds
//! the agent for x86_64-pc-windows-gnu with Debian's MinGW-w64, prepares a Wine prefix and turns on
//! `bridge-agent/wine-tests`, giving the paths in `BRIDGE_AGENT_EXE`, `WINE64` and `WINEPREFIX`.

use std::time::Duration;

use dongle_sim::{SimConfig, Simulator};
use tokio::process::Command;

/// Runs the Windows agent under Wine with `args`; (success, stdout, stderr).
async fn wine_agent(args: &[&str]) -> (bool, String, String) {
    let exe = std::env::var("BRIDGE_AGENT_EXE").expect("scripts/test sets BRIDGE_AGENT_EXE");
    let wine = std::env::var("WINE64").expect("scripts/test sets WINE64");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(wine)
            .arg(exe)
            .args(args)
            .env("WINEDEBUG", "-all")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("Wine finished within two minutes")
    .expect("Wine started");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
#[cfg_attr(
    not(feature = "wine-tests"),
    ignore = "needs the Windows build of the agent and Wine: scripts/test provides both as root and turns on bridge-agent/wine-tests"
)]
async fn the_windows_agent_finds_a_simulated_dongle_under_wine() {
    let (ok, help, err) = wine_agent(&["--help"]).await;
    assert!(ok, "{err}");
    assert!(help.contains("Usage: bridge-agent.exe"), "{help}");

    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::udp(dir.path().join("flash.json")))
        .await
        .expect("a UDP simulator");
    let discovery = sim
        .discovery_addr()
        .expect("a discovery address")
        .to_string();
    // The agent's folder, as Windows names this Linux path (Wine maps Z: to /).
    let home = format!("Z:{}", dir.path().join("agent").display()).replace('/', "\\");
    let (ok, listed, err) = wine_agent(&["--home", &home, "list", "--udp", &discovery]).await;
    assert!(ok, "{err}");
    let device = sim.device_id().to_string();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&device) && l.contains("lan 127.0.0.1")),
        "the Windows agent did not list {device}:\n{listed}\n{err}"
    );
    sim.shutdown().await;
}
