//! The reference firmware on an emulated STM32F405 (QEMU's netduinoplus2) as a target.
//!
//! QEMU runs the firmware ELF with USART1 on a pseudo-terminal (the host link, which the agent's
//! serial transport opens as it opens a USB dongle's port) and USART2 on QEMU's stdio (the console:
//! the PIN is read from it, and a factory reset is typed into it, as a technician with a UART cable
//! would). Its flash is RAM, so every start is a fresh dongle. The settings (extensions, a short
//! pairing window, the random seed) travel on the semihosting command line.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::session::{DongleSession, SessionConfig};
use bridge_agent::transport::serial;
use dongle_sim::Extensions;
use firmware_proto::ids::Pin;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::broadcast;

use crate::target::Target;

/// The QEMU board's pairing window in the suite: short, as the simulator's.
pub const QEMU_PAIRING_WINDOW: Duration = Duration::from_millis(1500);
/// How long QEMU may take to boot the firmware to its `ready` line.
const BOOT_LIMIT: Duration = Duration::from_secs(20);

/// Where QEMU and the firmware are.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// `qemu-system-arm`.
    pub qemu: PathBuf,
    /// The firmware ELF.
    pub elf: PathBuf,
}

impl QemuConfig {
    /// The ELF `(cd firmware && cargo build --release)` writes.
    pub fn default_elf() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../firmware/target/thumbv7em-none-eabihf/release/dongle-qemu")
    }

    /// Finds QEMU (`$QEMU_SYSTEM_ARM`, else `qemu-system-arm` on the PATH) and the firmware
    /// (`$HIL_QEMU_ELF`, else [`QemuConfig::default_elf`]); `Err` says which is missing and how to
    /// get it, for the report's skip reason.
    pub fn find() -> Result<QemuConfig, String> {
        let qemu = match std::env::var_os("QEMU_SYSTEM_ARM") {
            Some(path) => PathBuf::from(path),
            None => std::env::var_os("PATH")
                .into_iter()
                .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
                .map(|dir| dir.join("qemu-system-arm"))
                .find(|p| p.is_file())
                .ok_or("qemu-system-arm is not installed (scripts/test installs it as root; or set QEMU_SYSTEM_ARM)")?,
        };
        if !qemu.is_file() {
            return Err(format!("QEMU_SYSTEM_ARM={} does not exist", qemu.display()));
        }
        let elf = std::env::var_os("HIL_QEMU_ELF")
            .map(PathBuf::from)
            .unwrap_or_else(Self::default_elf);
        if !elf.is_file() {
            return Err(format!(
                "the QEMU firmware {} is not built ((cd firmware && cargo build --release); scripts/test does)",
                elf.display()
            ));
        }
        Ok(QemuConfig { qemu, elf })
    }
}

/// A running QEMU board.
pub struct QemuTarget {
    name: String,
    extensions: Extensions,
    child: Child,
    console: ChildStdin,
    pty: PathBuf,
    lines: broadcast::Sender<String>,
    pins: broadcast::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl QemuTarget {
    /// Boots the firmware with `extensions` and waits for its `ready` line.
    pub async fn start(config: &QemuConfig, extensions: Extensions) -> anyhow::Result<Self> {
        let ext = if extensions == Extensions::NONE {
            "none"
        } else {
            "all"
        };
        let seed: [u8; 32] = rand::random();
        let semihosting = format!(
            "enable=on,target=native,arg=dongle,arg=ext={ext},arg=window-ms={},arg=cli-timeout-ms=500,arg=seed={}",
            QEMU_PAIRING_WINDOW.as_millis(),
            hex_string(&seed)
        );
        let mut child = Command::new(&config.qemu)
            .args([
                "-M",
                "netduinoplus2",
                "-display",
                "none",
                "-monitor",
                "none",
            ])
            .args(["-semihosting-config", &semihosting])
            .args(["-serial", "pty", "-serial", "stdio", "-kernel"])
            .arg(&config.elf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", config.qemu.display()))?;
        let console = child.stdin.take().context("QEMU's stdin")?;
        let stdout = child.stdout.take().context("QEMU's stdout")?;
        let stderr = child.stderr.take().context("QEMU's stderr")?;
        let (lines, mut boot) = broadcast::channel(1024);
        let log = Arc::new(Mutex::new(Vec::new()));
        for reader in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(reader).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let line = line.trim_end_matches('\r').to_string();
                    log.lock().unwrap().push(line.clone());
                    let _ = lines.send(line);
                }
            });
        }
        let pins = lines.subscribe();
        let mut pty = None;
        let booted = tokio::time::timeout(BOOT_LIMIT, async {
            loop {
                let line = match boot.recv().await {
                    Ok(line) => line,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => bail!("QEMU stopped while booting"),
                };
                if let Some(rest) = line.strip_prefix("char device redirected to ")
                    && rest.ends_with("(label serial0)")
                {
                    pty = rest.split_whitespace().next().map(PathBuf::from);
                }
                if line.starts_with("ready:") {
                    return Ok(());
                }
                if line.starts_with("PANIC") || line.starts_with("HARDFAULT") {
                    bail!("the firmware failed while booting: {line}");
                }
            }
        })
        .await;
        let log_text = || log.lock().unwrap().join("\n");
        match booted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("{e:#}; QEMU printed:\n{}", log_text()),
            Err(_) => bail!(
                "the firmware did not print `ready` within {BOOT_LIMIT:?}; QEMU printed:\n{}",
                log_text()
            ),
        }
        let pty = pty.context("QEMU did not say where USART1's pseudo-terminal is")?;
        Ok(Self {
            name: format!(
                "qemu-{}",
                if extensions == Extensions::NONE {
                    "plain"
                } else {
                    "ext"
                }
            ),
            extensions,
            child,
            console,
            pty,
            lines,
            pins,
            log,
        })
    }

    /// The pseudo-terminal of the board's host link.
    pub fn serial_path(&self) -> &Path {
        &self.pty
    }

    /// A receiver of the console's lines from now on.
    pub fn console_lines(&self) -> broadcast::Receiver<String> {
        self.lines.subscribe()
    }

    /// Types a line on the board's console.
    pub async fn type_line(&mut self, line: &str) -> anyhow::Result<()> {
        self.console
            .write_all(format!("{line}\r").as_bytes())
            .await
            .context("writing to the QEMU console")?;
        self.console.flush().await?;
        Ok(())
    }

    /// Stops QEMU.
    pub async fn shutdown(mut self) {
        let _ = self.child.kill().await;
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits for a console line that `accept` turns into a value.
async fn wait_for<T>(
    lines: &mut broadcast::Receiver<String>,
    within: Duration,
    what: &str,
    mut accept: impl FnMut(&str) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Ok(line)) => {
                if let Some(value) = accept(&line) {
                    return Ok(value);
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => bail!("QEMU stopped"),
            Err(_) => bail!("the board's console showed no {what} within {within:?}"),
        }
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
        let link = serial::open(&self.pty)
            .await
            .with_context(|| format!("opening the QEMU board's link {}", self.pty.display()))?;
        Ok(DongleSession::open(link, config).await?)
    }

    async fn next_pin(&mut self, within: Duration) -> anyhow::Result<Pin> {
        wait_for(&mut self.pins, within, "PIN", |line| {
            let digits = line.strip_prefix("PIN ")?.split_whitespace().next()?;
            Pin::parse(digits).ok()
        })
        .await
    }

    async fn unplug(&mut self) -> anyhow::Result<()> {
        bail!("a QEMU board has no USB link to unplug")
    }

    async fn replug(&mut self) -> anyhow::Result<()> {
        bail!("a QEMU board has no USB link to unplug")
    }

    async fn factory_reset(&mut self) -> anyhow::Result<()> {
        let mut lines = self.lines.subscribe();
        self.type_line("factory-reset").await?;
        wait_for(
            &mut lines,
            Duration::from_secs(5),
            "factory reset",
            |line| (line == "FactoryReset").then_some(()),
        )
        .await?;
        // A PIN shown before the reset belongs to a window that no longer exists.
        self.pins = lines;
        Ok(())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn cannot_serve(&self, scenario: &str) -> Option<&'static str> {
        (scenario == "unplug_and_replug")
            .then_some("a QEMU board has no USB link to unplug: its emulated UART stays connected")
    }
}
