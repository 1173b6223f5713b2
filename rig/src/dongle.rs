//! A simulated dongle on a virtual CAN bus of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::discovery::scan::ScanPlan;
use dongle_sim::{BusTap, LinkConfig, SimConfig, SimEvent, SimHandle, Simulator};
use tokio::sync::broadcast;

/// A simulated dongle on its own virtual CAN bus, with every protocol extension on.
pub struct DonglePart {
    pub sim: SimHandle,
    pub device_id: String,
    /// Where an agent finds it: `--port PATH` or `--udp ADDR`.
    pub plan: ScanPlan,
    /// The folder of the dongle's virtual buses, and the name of its bus there.
    pub bus_root: PathBuf,
    pub bus: String,
    /// How it is linked, for people reading a report.
    pub link: &'static str,
}

impl DonglePart {
    /// A dongle on a pseudo-terminal in `dir`, as if plugged into USB.
    pub async fn usb(dir: &Path, bus: &str) -> anyhow::Result<Self> {
        let link = dir.join("ttyDONGLE");
        let mut config = SimConfig::serial(dir.join("flash.json")).with_bus(bus);
        config.link = LinkConfig::Serial {
            link: Some(link.clone()),
        };
        Self::start(config, dir, bus, "usb (pseudo-terminal)", |_| ScanPlan {
            usb_filter: Vec::new(),
            explicit_ports: vec![link.clone()],
            broadcast: false,
            ..ScanPlan::default()
        })
        .await
    }

    /// A dongle on UDP on 127.0.0.1, as if on the workstation's LAN.
    pub async fn lan(dir: &Path, bus: &str) -> anyhow::Result<Self> {
        let config = SimConfig::udp(dir.join("flash.json")).with_bus(bus);
        Self::start(config, dir, bus, "lan (udp)", |sim| ScanPlan {
            usb_filter: Vec::new(),
            broadcast: false,
            udp_targets: sim.discovery_addr().into_iter().collect(),
            ..ScanPlan::default()
        })
        .await
    }

    async fn start(
        mut config: SimConfig,
        dir: &Path,
        bus: &str,
        link: &'static str,
        plan: impl FnOnce(&SimHandle) -> ScanPlan,
    ) -> anyhow::Result<Self> {
        // The bus folder lives inside `dir`, so this makes `dir` too, before the simulator puts its
        // flash file and its link there.
        let bus_root = dir.join("bus");
        std::fs::create_dir_all(&bus_root)
            .with_context(|| format!("could not make {}", bus_root.display()))?;
        config.bus_root = Some(bus_root.clone());
        config.extensions = dongle_sim::Extensions::ALL;
        let sim = Simulator::start(config)
            .await
            .context("could not start a simulated dongle")?;
        Ok(Self {
            device_id: sim.device_id().to_string(),
            plan: plan(&sim),
            sim,
            bus_root,
            bus: bus.to_string(),
            link,
        })
    }

    /// A tap on the dongle's bus, as another device on it (an ECU, a tester), which records what the
    /// others send whenever its caller reads ([`BusTap::recorder_at`]).
    pub fn tap(&self) -> anyhow::Result<BusTap> {
        BusTap::recorder_at(&self.bus_root, &self.bus)
            .with_context(|| format!("could not join the bus {}", self.bus))
    }
}

/// The PIN a dongle shows next (the simulator's `PIN ...` log line, as a dongle's display would),
/// from its events; waits up to 15 s.
pub async fn next_pin(events: &mut broadcast::Receiver<SimEvent>) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(SimEvent::Dongle(dongle_sim::Event::Pin { pin, .. }))) => {
                return Ok(pin.as_str().to_string());
            }
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => bail!("the dongle stopped"),
            Err(_) => bail!("the dongle showed no PIN within 15 s"),
        }
    }
}
