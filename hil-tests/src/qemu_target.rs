//! The reference firmware on an emulated STM32F405 (QEMU's netduinoplus2) as a target.
//!
//! [`qemu_dongle::QemuDongle`] runs the board: its host link is a pseudo-terminal, which the agent's
//! serial transport opens as it opens a USB dongle's port; its console is where the PIN is read and
//! where a factory reset is typed, as a technician with a UART cable would.

use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::session::{DongleSession, SessionConfig};
use bridge_agent::transport::serial;
use dongle_sim::Extensions;
use firmware_proto::ids::Pin;
use qemu_dongle::{Options, QemuConfig, QemuDongle};
use tokio::sync::broadcast;

use crate::target::Target;

/// The QEMU board's pairing window in the suite: short, as the simulator's.
pub const QEMU_PAIRING_WINDOW: Duration = Duration::from_millis(1500);

/// A running QEMU board.
pub struct QemuTarget {
    name: String,
    extensions: Extensions,
    board: QemuDongle,
    pins: broadcast::Receiver<String>,
}

impl QemuTarget {
    /// Boots the firmware speaking plain REMP v1 or every extension.
    pub async fn start(config: &QemuConfig, extensions: Extensions) -> anyhow::Result<Self> {
        let plain = extensions == Extensions::NONE;
        let options = Options {
            extensions: if plain { "none" } else { "all" }.into(),
            pairing_window: QEMU_PAIRING_WINDOW,
            cli_timeout: Duration::from_millis(500),
            ..Options::default()
        };
        let board = QemuDongle::start(config, &options).await?;
        let pins = board.console_lines();
        Ok(Self {
            name: format!("qemu-{}", if plain { "plain" } else { "ext" }),
            extensions,
            board,
            pins,
        })
    }

    /// Stops QEMU.
    pub async fn shutdown(self) {
        self.board.shutdown().await;
    }
}

impl Target for QemuTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn expected_capabilities(&self) -> u32 {
        self.extensions.caps()
    }

    fn pairing_window(&self) -> Duration {
        QEMU_PAIRING_WINDOW
    }

    async fn connect(&mut self, config: SessionConfig) -> anyhow::Result<DongleSession> {
        let path = self.board.serial_path();
        let link = serial::open(path)
            .await
            .with_context(|| format!("opening the QEMU board's link {}", path.display()))?;
        Ok(DongleSession::open(link, config).await?)
    }

    async fn next_pin(&mut self, within: Duration) -> anyhow::Result<Pin> {
        Ok(qemu_dongle::next_pin(&mut self.pins, within).await?)
    }

    async fn unplug(&mut self) -> anyhow::Result<()> {
        bail!("a QEMU board has no USB link to unplug")
    }

    async fn replug(&mut self) -> anyhow::Result<()> {
        bail!("a QEMU board has no USB link to unplug")
    }

    async fn factory_reset(&mut self) -> anyhow::Result<()> {
        // A PIN shown before the reset belongs to a window that no longer exists.
        self.pins = self.board.factory_reset().await?;
        Ok(())
    }

    fn log(&self) -> String {
        self.board.log()
    }

    fn cannot_serve(&self, scenario: &str) -> Option<&'static str> {
        (scenario == "unplug_and_replug")
            .then_some("a QEMU board has no USB link to unplug: its emulated UART stays connected")
    }
}
