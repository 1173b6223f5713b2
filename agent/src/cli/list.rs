//! `bridge-agent list`: the dongles this workstation sees, on USB serial and on the LAN.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use firmware_proto::caps;

use crate::discovery::scan::{self, DEFAULT_DISCOVERY_PORT, Found, ScanPlan};
use crate::discovery::usb_ports::{STM32_VCP, UsbId};
use crate::transport::udp::UdpHub;

/// Where to look for dongles; shared by `list` and, later, the daemon.
#[derive(Debug, Clone, Args)]
pub struct DiscoveryArgs {
    /// Serial ports to probe whatever their USB id (repeat for several), e.g. --port /dev/ttyUSB0 on
    /// Linux, --port COM7 on Windows, --port /dev/cu.usbmodem1101 on macOS.
    #[arg(long = "port", value_name = "PATH")]
    pub ports: Vec<PathBuf>,
    /// USB VID:PID of serial ports to probe (repeat for several).
    #[arg(long = "usb-id", value_name = "VID:PID", default_values_t = [STM32_VCP])]
    pub usb_ids: Vec<UsbId>,
    /// LAN dongles to ask directly, for networks without broadcast (repeat for several).
    #[arg(long = "udp", value_name = "HOST:PORT")]
    pub udp_targets: Vec<SocketAddr>,
    /// Do not broadcast DISCOVER on the LAN interfaces.
    #[arg(long)]
    pub no_broadcast: bool,
    /// The UDP port dongles listen for DISCOVER on.
    #[arg(long, default_value_t = DEFAULT_DISCOVERY_PORT, value_name = "PORT")]
    pub discovery_port: u16,
}

impl DiscoveryArgs {
    /// The scan these arguments describe, waiting `wait` for answers.
    pub fn plan(&self, wait: Duration) -> ScanPlan {
        ScanPlan {
            usb_filter: self.usb_ids.clone(),
            explicit_ports: self.ports.clone(),
            broadcast: !self.no_broadcast,
            discovery_port: self.discovery_port,
            udp_targets: self.udp_targets.clone(),
            wait,
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    /// How long to wait for answers, in milliseconds.
    #[arg(long, default_value_t = 1500, value_name = "MS")]
    pub wait_ms: u64,
    /// Also list the ports and targets that did not answer as dongles, and why.
    #[arg(long, short)]
    pub verbose: bool,
}

pub async fn run(home: &crate::home::Home, args: ListArgs) -> anyhow::Result<()> {
    // A running daemon holds the serial ports; what it serves is the answer then.
    if let Some((status, true)) = crate::daemon::read_status(home) {
        eprintln!(
            "the agent's daemon (pid {}) serves these dongles; stop it to scan afresh",
            status.pid
        );
        print!("{}", render_reports(&status.dongles));
        return Ok(());
    }
    let plan = args.discovery.plan(Duration::from_millis(args.wait_ms));
    let hub = UdpHub::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
        .await
        .context("could not open a UDP socket for LAN discovery")?;
    eprintln!("looking for dongles for {} ms ...", args.wait_ms);
    let (found, skipped) = scan::scan(&plan, &hub).await;
    print!("{}", render(&found));
    if args.verbose {
        for s in &skipped {
            println!("not a dongle: {}: {}", s.place, s.reason);
        }
    }
    Ok(())
}

/// The daemon's dongles as a table, one per line.
pub fn render_reports(dongles: &[control_proto::DongleReport]) -> String {
    if dongles.is_empty() {
        return "no dongles served\n".to_string();
    }
    let mut out = format!(
        "{:<16}  {:<8}  {:<12}  {:<10}  {}\n",
        "DEVICE ID", "PAIRING", "FIRMWARE", "TOKEN", "WHERE"
    );
    for d in dongles {
        let place = d.transport.to_string();
        out.push_str(&format!(
            "{:<16}  {:<8}  {:<12}  {:<10}  {}\n",
            d.device_id,
            if d.pairing_mode { "open" } else { "-" },
            d.fw_build,
            match (&d.transport, d.claimed) {
                (control_proto::Transport::Local { .. }, _) if !d.present => "local, closed",
                (control_proto::Transport::Local { .. }, _) => "local",
                (_, true) => "held",
                (_, false) => "-",
            },
            place
        ));
    }
    out
}

/// The listing as a table, one dongle per line.
pub fn render(found: &[Found]) -> String {
    if found.is_empty() {
        return "no dongles found (plugged in? on this LAN? try --port or --udp, and -v)\n"
            .to_string();
    }
    let mut out = format!(
        "{:<16}  {:<8}  {:<12}  {:<24}  {}\n",
        "DEVICE ID", "PAIRING", "FIRMWARE", "EXTENSIONS", "WHERE"
    );
    for f in found {
        let i = &f.info;
        let mut ext = Vec::new();
        for (bit, name) in [
            (caps::CAN_BATCH, "batch"),
            (caps::BUS_STATUS, "bus-status"),
            (caps::FORGET_TOKEN, "forget"),
            (caps::SESSION_AUTH, "session"),
            (caps::CAN_FD, "fd"),
        ] {
            if i.has(bit) {
                ext.push(name);
            }
        }
        let ext = if ext.is_empty() {
            "-".to_string()
        } else {
            ext.join(",")
        };
        let where_ = f
            .locations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            "{:<16}  {:<8}  {:<12}  {:<24}  {}\n",
            i.device_id,
            if i.pairing_mode { "open" } else { "-" },
            i.fw_build,
            ext,
            where_
        ));
    }
    out
}
