//! What a scenario may ask of the dongle under test.

use std::time::Duration;

use bridge_agent::session::{DongleSession, SessionConfig};
use firmware_proto::ids::Pin;

/// A dongle under test, with the means to do to it what a technician's hands would.
#[allow(async_fn_in_trait)]
pub trait Target {
    /// A short name for reports, e.g. `sim-serial-plain`.
    fn name(&self) -> &str;

    /// The capability bits this target is expected to announce.
    fn expected_capabilities(&self) -> u32;

    /// How long the dongle's pairing window lasts.
    fn pairing_window(&self) -> Duration;

    /// Opens a fresh session: a new link, DISCOVER, ANNOUNCE.
    async fn connect(&mut self, config: SessionConfig) -> anyhow::Result<DongleSession>;

    /// Waits for the next PIN the dongle shows (its display: the simulator's log, or RTT on hardware).
    async fn next_pin(&mut self, within: Duration) -> anyhow::Result<Pin>;

    /// Cuts the dongle's link as unplugging would (close the port, or go silent on UDP).
    async fn unplug(&mut self) -> anyhow::Result<()>;

    /// Brings the link back after [`Target::unplug`].
    async fn replug(&mut self) -> anyhow::Result<()>;

    /// Erases the dongle's pairing: it forgets its token and any lock-out, as after a factory reset.
    async fn factory_reset(&mut self) -> anyhow::Result<()>;

    /// What the dongle logged so far, attached to a failing scenario's report.
    fn log(&self) -> String;

    /// Why this target cannot serve `scenario`, when it cannot (an emulated board has no USB to
    /// unplug, say). The scenario is then reported as skipped with that reason.
    fn cannot_serve(&self, scenario: &str) -> Option<&'static str> {
        let _ = scenario;
        None
    }
}
