//! A real dongle as a target: probe-rs flashes its firmware and resets it, RTT carries its log, and
//! the agent's own transports reach it on its USB serial port or on UDP.
//!
//! The rig is described by the environment (see docs/HIL.md):
//! - `HIL_CHIP`: the probe-rs chip name, e.g. `STM32H753ZITx`. Its presence means "a rig is configured".
//! - `HIL_FIRMWARE_ELF`: the firmware to flash (verified after writing).
//! - `HIL_PROBE`: optional probe selector `VID:PID[:SERIAL]` when several probes are attached.
//! - `HIL_SERIAL_NUMBER`: the USB serial number of the dongle's CDC port, or
//! - `HIL_UDP`: the dongle's address `HOST:PORT` on the rig's LAN (DISCOVER goes to port 50000 of
//!   that host; REMP to the port it announces).
//!
//! probe-rs calls block, so they run on blocking threads; the session to the core lives behind a mutex
//! shared with the RTT reader.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::discovery::scan::DEFAULT_DISCOVERY_PORT;
use bridge_agent::discovery::usb_ports;
use bridge_agent::session::{DongleSession, SessionConfig, identify_lan};
use bridge_agent::transport::{serial, udp::UdpHub};
use firmware_proto::caps;
use firmware_proto::ids::Pin;
use probe_rs::flashing::{DownloadOptions, ElfLoader, ElfOptions, download_file_with_options};
use probe_rs::probe::{DebugProbeSelector, Probe, list::Lister};
use probe_rs::rtt::Rtt;
use probe_rs::{Permissions, Session};

use crate::target::Target;

/// How the rig reaches the dongle's REMP link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DongleLink {
    UsbSerialNumber(String),
    Udp(SocketAddr),
}

/// The rig, as the environment describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardwareConfig {
    pub chip: String,
    pub firmware: PathBuf,
    pub probe: Option<String>,
    pub link: DongleLink,
}

impl HardwareConfig {
    /// `Ok(None)` when no rig is configured (no `HIL_CHIP`); an error when one is configured badly.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        let Some(chip) = get("HIL_CHIP").filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let firmware = get("HIL_FIRMWARE_ELF")
            .context("HIL_CHIP is set, so HIL_FIRMWARE_ELF must name the firmware ELF to flash")?
            .into();
        let link = match (get("HIL_SERIAL_NUMBER"), get("HIL_UDP")) {
            (Some(sn), _) => DongleLink::UsbSerialNumber(sn),
            (None, Some(addr)) => DongleLink::Udp(
                addr.parse()
                    .with_context(|| format!("HIL_UDP={addr:?} is not HOST:PORT"))?,
            ),
            (None, None) => bail!(
                "HIL_CHIP is set, so HIL_SERIAL_NUMBER (the dongle's USB serial number) or HIL_UDP \
                 (its HOST:PORT) must say how to reach it"
            ),
        };
        Ok(Some(Self {
            chip,
            firmware,
            probe: get("HIL_PROBE"),
            link,
        }))
    }
}

/// A dongle on the rig.
pub struct ProbeTarget {
    config: HardwareConfig,
    session: Arc<Mutex<Session>>,
    log: Arc<Mutex<String>>,
    rtt_stop: Arc<AtomicBool>,
    hub: Option<UdpHub>,
    pins_seen: usize,
}

impl ProbeTarget {
    /// Opens the probe, attaches to the chip, flashes the firmware (verified), resets it and starts
    /// collecting RTT output.
    pub async fn start(config: HardwareConfig) -> anyhow::Result<Self> {
        let c = config.clone();
        let session = tokio::task::spawn_blocking(move || attach_and_flash(&c, false)).await??;
        let session = Arc::new(Mutex::new(session));
        let log = Arc::new(Mutex::new(String::new()));
        let rtt_stop = Arc::new(AtomicBool::new(false));
        spawn_rtt_reader(session.clone(), log.clone(), rtt_stop.clone());
        let hub = match config.link {
            DongleLink::Udp(_) => Some(UdpHub::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await?),
            DongleLink::UsbSerialNumber(_) => None,
        };
        Ok(Self {
            config,
            session,
            log,
            rtt_stop,
            hub,
            pins_seen: 0,
        })
    }

    fn with_core<R>(
        &self,
        f: impl FnOnce(&mut probe_rs::Core<'_>) -> Result<R, probe_rs::Error>,
    ) -> anyhow::Result<R> {
        let mut session = self.session.lock().unwrap();
        let mut core = session.core(0)?;
        Ok(f(&mut core)?)
    }
}

impl Drop for ProbeTarget {
    fn drop(&mut self) {
        self.rtt_stop.store(true, Ordering::Relaxed);
    }
}

fn attach_and_flash(config: &HardwareConfig, erase_all: bool) -> anyhow::Result<Session> {
    let probe = select_probe(config.probe.as_deref())?;
    let mut session = attach(probe, &config.chip)?;
    flash(&mut session, &config.firmware, erase_all)?;
    reset(&mut session)?;
    Ok(session)
}

/// Opens the probe `selector` names (`VID:PID[:SERIAL]`), or the only one attached.
fn select_probe(selector: Option<&str>) -> anyhow::Result<Probe> {
    let lister = Lister::new();
    let probes = lister.list_all();
    let info = match selector {
        Some(selector) => {
            let selector: DebugProbeSelector = selector
                .parse()
                .with_context(|| format!("HIL_PROBE={selector:?} is not VID:PID[:SERIAL]"))?;
            probes
                .into_iter()
                .find(|p| {
                    p.vendor_id == selector.vendor_id
                        && p.product_id == selector.product_id
                        && (selector.serial_number.is_none()
                            || p.serial_number == selector.serial_number)
                })
                .with_context(|| format!("no debug probe matches HIL_PROBE={selector}"))?
        }
        None => probes.into_iter().next().context(
            "no debug probe found: is the probe plugged in, and may this user open it (udev rules)?",
        )?,
    };
    info.open().context("opening the debug probe")
}

fn attach(probe: Probe, chip: &str) -> anyhow::Result<Session> {
    probe
        .attach(chip, Permissions::default())
        .with_context(|| format!("attaching to {chip}"))
}

/// Writes the firmware and verifies it; `erase_all` erases the whole chip first (a factory reset).
fn flash(session: &mut Session, firmware: &std::path::Path, erase_all: bool) -> anyhow::Result<()> {
    let mut options = DownloadOptions::default();
    options.verify = true;
    options.do_chip_erase = erase_all;
    download_file_with_options(session, firmware, ElfLoader(ElfOptions::default()), options)
        .with_context(|| format!("flashing {}", firmware.display()))
}

fn reset(session: &mut Session) -> anyhow::Result<()> {
    session.core(0)?.reset().context("resetting the target")
}

/// Copies RTT up-channel 0 into `log` until `stop`, and fails the log loudly on a HardFault.
fn spawn_rtt_reader(session: Arc<Mutex<Session>>, log: Arc<Mutex<String>>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut rtt: Option<Rtt> = None;
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            let Ok(mut session) = session.lock() else {
                return;
            };
            let Ok(mut core) = session.core(0) else {
                continue;
            };
            if rtt.is_none() {
                rtt = Rtt::attach(&mut core).ok();
            }
            let Some(channel) = rtt.as_mut().and_then(|r| r.up_channel(0)) else {
                continue;
            };
            if let Ok(n) = channel.read(&mut core, &mut buf)
                && n > 0
            {
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            if core.core_halted().unwrap_or(false)
                && let Ok(status) = core.status()
            {
                log.lock()
                    .unwrap()
                    .push_str(&format!("\n[hil] core halted: {status:?} (HardFault?)\n"));
            }
        }
    });
}

/// The PINs shown in a log, oldest first: lines `PIN dddddd`.
pub fn pins_in(log: &str) -> Vec<Pin> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("PIN ")? + 4..];
            Pin::parse(rest.get(..6)?).ok()
        })
        .collect()
}

impl Target for ProbeTarget {
    fn name(&self) -> &str {
        "hardware"
    }

    fn expected_capabilities(&self) -> u32 {
        // The firmware under test says what it offers; the scenarios for an extension run when it does.
        std::env::var("HIL_EXPECT_CAPS")
            .ok()
            .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0)
            & caps::ALL_EXTENSIONS
    }

    fn pairing_window(&self) -> Duration {
        Duration::from_secs(120)
    }

    async fn connect(&mut self, config: SessionConfig) -> anyhow::Result<DongleSession> {
        match &self.config.link {
            DongleLink::UsbSerialNumber(sn) => {
                // After a reset the dongle re-enumerates on USB; give it a few seconds to appear.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
                let path = loop {
                    let ports = usb_ports::scan_sysfs("/sys/class/tty".as_ref(), "/dev".as_ref());
                    if let Some(p) = ports
                        .into_iter()
                        .find(|p| p.serial_number.as_deref() == Some(sn))
                    {
                        break p.path;
                    }
                    if tokio::time::Instant::now() > deadline {
                        bail!("no serial port with USB serial number {sn} appeared");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                };
                Ok(DongleSession::open(serial::open(&path).await?, config).await?)
            }
            DongleLink::Udp(addr) => {
                let hub = self.hub.as_ref().expect("UDP rigs have a hub");
                let discovery = SocketAddr::new(addr.ip(), DEFAULT_DISCOVERY_PORT);
                let (info, remp) = identify_lan(hub, discovery, config.request_timeout).await?;
                Ok(DongleSession::start(
                    hub.link(info.device_id, remp),
                    info,
                    config,
                )?)
            }
        }
    }

    async fn next_pin(&mut self, within: Duration) -> anyhow::Result<Pin> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let pins = pins_in(&self.log.lock().unwrap());
            if let Some(pin) = pins.get(self.pins_seen) {
                self.pins_seen = pins.len();
                return Ok(*pin);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the dongle showed no PIN on RTT within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn unplug(&mut self) -> anyhow::Result<()> {
        // Held in reset-and-halt, the dongle drops off USB and stops answering UDP.
        self.with_core(|core| core.reset_and_halt(Duration::from_secs(1)).map(|_| ()))
    }

    async fn replug(&mut self) -> anyhow::Result<()> {
        self.with_core(|core| core.run())
    }

    async fn factory_reset(&mut self) -> anyhow::Result<()> {
        // Erasing the whole flash and writing the firmware again is the one reset every firmware
        // honours: the token and any lock-out live in flash.
        let config = self.config.clone();
        let session = self.session.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut session = session.lock().unwrap();
            flash(&mut session, &config.firmware, true)?;
            reset(&mut session)
        })
        .await??;
        self.pins_seen = pins_in(&self.log.lock().unwrap()).len();
        Ok(())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_chip_means_no_rig() {
        assert_eq!(HardwareConfig::from_lookup(env(&[])).unwrap(), None);
    }

    #[test]
    fn a_rig_needs_firmware_and_a_way_to_the_dongle() {
        let err = HardwareConfig::from_lookup(env(&[("HIL_CHIP", "STM32H753ZITx")])).unwrap_err();
        assert!(err.to_string().contains("HIL_FIRMWARE_ELF"), "{err}");
        let err = HardwareConfig::from_lookup(env(&[
            ("HIL_CHIP", "STM32H753ZITx"),
            ("HIL_FIRMWARE_ELF", "fw.elf"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("HIL_SERIAL_NUMBER"), "{err}");
        let cfg = HardwareConfig::from_lookup(env(&[
            ("HIL_CHIP", "STM32H753ZITx"),
            ("HIL_FIRMWARE_ELF", "fw.elf"),
            ("HIL_UDP", "192.0.2.7:50001"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            cfg.link,
            DongleLink::Udp("192.0.2.7:50001".parse().unwrap())
        );
    }

    /// probe-rs's fake probe stands in for an ST-LINK: attaching to the dongle's chip and resetting it
    /// run their real sequences against a mocked Cortex-M core. Flashing needs a core that runs the
    /// flash algorithm, which the mock cannot, so only its failure path is checked here.
    #[test]
    fn the_hardware_sequence_attaches_resets_and_names_a_missing_firmware() {
        use probe_rs::probe::fake_probe::FakeProbe;
        let probe = FakeProbe::with_mocked_core().into_probe();
        let mut session = attach(probe, "STM32H753ZITx").expect("attach to the mocked core");
        assert_eq!(session.list_cores().len(), 1);
        reset(&mut session).expect("reset through the probe");
        let err = flash(
            &mut session,
            std::path::Path::new("/nonexistent/firmware.elf"),
            false,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/firmware.elf"),
            "{err:#}"
        );
        assert!(attach(FakeProbe::with_mocked_core().into_probe(), "NoSuchChip").is_err());
    }

    #[test]
    fn pins_are_read_from_the_rtt_log() {
        let log = "boot\n[pair] PIN 042917 for 120 s\nnoise PIN 12\nPIN 999999\n";
        let pins: Vec<String> = pins_in(log)
            .iter()
            .map(|p| p.as_str().to_string())
            .collect();
        assert_eq!(pins, vec!["042917", "999999"]);
    }
}
