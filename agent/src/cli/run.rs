//! `bridge-agent run`: the daemon, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::cli::list::DiscoveryArgs;
use crate::daemon::{self, DaemonConfig};
use crate::dongles::ManagerConfig;
use crate::home::Home;
use crate::uplink::backoff::Backoff;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    /// The local address of the UDP socket that talks to LAN dongles.
    #[arg(long, default_value = "0.0.0.0:0", value_name = "ADDR")]
    pub udp_bind: SocketAddr,
    /// Seconds between LAN scans while no pairing is under way (15 to 30 s suits a busy LAN; a LAN
    /// dongle counts as gone after three scans without an answer).
    #[arg(long, default_value_t = 20, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lan_scan_secs: u64,
    /// Refuse the server's network diagnostics on this workstation (the interface list, `ip -brief
    /// address`, a ping of a LAN dongle), which the dongle's owner can otherwise run from the dashboard.
    #[arg(long, env = "BRIDGE_AGENT_NO_HOST_COMMANDS")]
    pub no_host_commands: bool,
}

pub async fn run(home: &Home, args: RunArgs) -> anyhow::Result<()> {
    let credentials = home
        .load_credentials()?
        .context("this agent is not logged in: run `bridge-agent login --server URL` first")?;
    let mut manager = ManagerConfig::new(args.discovery.plan(Duration::from_millis(1500)));
    manager.lan_idle = Duration::from_secs(args.lan_scan_secs);
    manager.lan_pairing = manager.lan_pairing.min(manager.lan_idle);
    let config = DaemonConfig {
        home: home.clone(),
        credentials,
        manager,
        udp_bind: args.udp_bind,
        backoff: Backoff::default(),
        host_commands: !args.no_host_commands,
    };
    tracing::info!(home = %home.dir().display(), "agent starting");
    daemon::run(config, shutdown_signal()).await?;
    tracing::info!("agent stopped");
    Ok(())
}

/// Resolves on Ctrl-C, or on the service manager's stop (SIGTERM from systemd or launchd; the console
/// closing or a shutdown on Windows), so the daemon ends cleanly either way.
async fn shutdown_signal() {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = crate::platform::stop_requested() => {}
    }
}
