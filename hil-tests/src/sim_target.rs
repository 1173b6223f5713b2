//! The simulator as a target: started in-process on a pseudo-terminal or on UDP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::session::{DongleSession, SessionConfig, identify_lan};
use bridge_agent::transport::{serial, udp::UdpHub};
use dongle_sim::{Extensions, SimConfig, SimEvent, SimHandle, Simulator};
use firmware_proto::caps;
use firmware_proto::ids::Pin;
use tokio::sync::broadcast;

use crate::target::Target;

/// Which link the simulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimLink {
    Serial,
    Udp,
}

/// A simulator started for the suite, with its own state folder.
pub struct SimTarget {
    name: String,
    link: SimLink,
    extensions: Extensions,
    sim: SimHandle,
    events: broadcast::Receiver<SimEvent>,
    log: Arc<Mutex<Vec<String>>>,
    hub: Option<UdpHub>,
    _dir: tempfile::TempDir,
}

/// The simulator's pairing window in the suite: short, so that expiry is tested in a second.
pub const SIM_PAIRING_WINDOW: Duration = Duration::from_millis(1500);

impl SimTarget {
    pub async fn start(link: SimLink, extensions: Extensions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a temporary folder for the simulator")?;
        let state = dir.path().join("flash.json");
        let mut config = match link {
            SimLink::Serial => SimConfig::serial(&state),
            SimLink::Udp => SimConfig::udp(&state),
        }
        .with_extensions(extensions)
        .with_bus(format!("hil-{}", rand::random::<u64>()));
        config.bus_root = Some(dir.path().join("buses"));
        config.pairing_window = SIM_PAIRING_WINDOW;
        config.cli_timeout = Duration::from_millis(500);
        let sim = Simulator::start(config)
            .await
            .context("starting the simulator")?;
        let events = sim.events();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut log_events = sim.events();
        let log_sink = log.clone();
        tokio::spawn(async move {
            while let Ok(event) = log_events.recv().await {
                // The PIN is the dongle's display, so the log keeps it: that is what a technician reads.
                let line = match &event {
                    SimEvent::Dongle(dongle_sim::Event::Pin { pin, seconds, .. }) => {
                        format!("PIN {} ({seconds} s)", pin.as_str())
                    }
                    other => format!("{other:?}"),
                };
                log_sink.lock().unwrap().push(line);
            }
        });
        let hub = match link {
            SimLink::Serial => None,
            SimLink::Udp => Some(UdpHub::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?),
        };
        let ext = if extensions == Extensions::NONE {
            "plain"
        } else {
            "ext"
        };
        let name = match link {
            SimLink::Serial => format!("sim-serial-{ext}"),
            SimLink::Udp => format!("sim-udp-{ext}"),
        };
        Ok(Self {
            name,
            link,
            extensions,
            sim,
            events,
            log,
            hub,
            _dir: dir,
        })
    }

    pub fn handle(&self) -> &SimHandle {
        &self.sim
    }

    pub async fn shutdown(self) {
        self.sim.shutdown().await;
    }
}

impl Target for SimTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn expected_capabilities(&self) -> u32 {
        let e = self.extensions;
        [
            (e.batch, caps::CAN_BATCH),
            (e.bus_status, caps::BUS_STATUS),
            (e.forget, caps::FORGET_TOKEN),
            (e.session, caps::SESSION_AUTH),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, bit)| acc | bit)
    }

    fn pairing_window(&self) -> Duration {
        SIM_PAIRING_WINDOW
    }

    async fn connect(&mut self, config: SessionConfig) -> anyhow::Result<DongleSession> {
        match self.link {
            SimLink::Serial => {
                let path = self
                    .sim
                    .serial_path()
                    .context("the simulator has no serial port")?;
                Ok(DongleSession::open(serial::open(&path).await?, config).await?)
            }
            SimLink::Udp => {
                let hub = self.hub.as_ref().expect("UDP targets have a hub");
                let discovery = self
                    .sim
                    .discovery_addr()
                    .context("the simulator has no discovery address")?;
                let (info, remp) = identify_lan(hub, discovery, config.request_timeout).await?;
                let link = hub.link(info.device_id, remp);
                Ok(DongleSession::start(link, info, config)?)
            }
        }
    }

    async fn next_pin(&mut self, within: Duration) -> anyhow::Result<Pin> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(SimEvent::Dongle(dongle_sim::Event::Pin { pin, .. }))) => return Ok(pin),
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => bail!("the simulator stopped"),
                Err(_) => bail!("the dongle showed no PIN within {within:?}"),
            }
        }
    }

    async fn unplug(&mut self) -> anyhow::Result<()> {
        self.sim.unplug().await;
        Ok(())
    }

    async fn replug(&mut self) -> anyhow::Result<()> {
        self.sim.replug().await;
        Ok(())
    }

    async fn factory_reset(&mut self) -> anyhow::Result<()> {
        self.sim.factory_reset();
        // A PIN shown before the reset belongs to a window that no longer exists.
        self.events = self.sim.events();
        Ok(())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}
