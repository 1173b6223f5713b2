//! The reference dongle firmware (`firmware/qemu-netduinoplus2`) on an emulated STM32F405, for tests.
//!
//! [`QemuDongle::start`] runs `qemu-system-arm -M netduinoplus2` with USART1 on a pseudo-terminal
//! (the host link: open [`QemuDongle::serial_path`] as a USB dongle's port) and USART2 on QEMU's
//! stdio (the console: its lines arrive through [`QemuDongle::console_lines`], the PIN among them, and
//! [`QemuDongle::type_line`] types on it as a technician with a UART cable would). The flash is RAM,
//! so every start is a fresh dongle. Its settings (extensions, device id, pairing window, random seed)
//! travel on the semihosting command line, which docs/HIL.md describes.
//!
//! [`image::size`] measures a firmware image's flash and RAM, for the size checks and the benchmark.

pub mod image;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_proto::ids::{DeviceId, Pin};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::broadcast;

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

/// What went wrong with the QEMU board.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU or the firmware is not there; the message says how to get it.
    #[error("{0}")]
    Missing(String),
    /// QEMU did not start.
    #[error("starting {path}: {source}")]
    Spawn {
        /// The QEMU binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The firmware did not come up; `log` is everything QEMU printed.
    #[error("the QEMU board did not boot: {reason}; QEMU printed:\n{log}")]
    Boot {
        /// What was missing.
        reason: String,
        /// QEMU's output.
        log: String,
    },
    /// The board's console did not show what was waited for.
    #[error("the QEMU board's console showed no {what} within {within:?}")]
    NotShown {
        /// What was waited for.
        what: String,
        /// How long.
        within: Duration,
    },
    /// QEMU stopped.
    #[error("QEMU stopped")]
    Stopped,
    /// Writing to the console failed.
    #[error("typing on the QEMU board's console: {0}")]
    Console(std::io::Error),
}

impl QemuConfig {
    /// The ELF that `(cd firmware && cargo build --release)` writes.
    pub fn default_elf() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../firmware/target/thumbv7em-none-eabihf/release/dongle-qemu")
    }

    /// Finds QEMU (`$QEMU_SYSTEM_ARM`, else `qemu-system-arm` on the PATH) and the firmware
    /// (`$HIL_QEMU_ELF`, else [`QemuConfig::default_elf`]). [`QemuError::Missing`] says which is
    /// missing and how to get it, so that a test can report itself ignored with that reason.
    pub fn find() -> Result<QemuConfig, QemuError> {
        let qemu = match std::env::var_os("QEMU_SYSTEM_ARM") {
            Some(path) => PathBuf::from(path),
            None => std::env::var_os("PATH")
                .into_iter()
                .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
                .map(|dir| dir.join("qemu-system-arm"))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    QemuError::Missing(
                        "qemu-system-arm is not installed (scripts/test provides it as root; or set QEMU_SYSTEM_ARM)".into(),
                    )
                })?,
        };
        if !qemu.is_file() {
            return Err(QemuError::Missing(format!(
                "QEMU_SYSTEM_ARM={} does not exist",
                qemu.display()
            )));
        }
        let elf = std::env::var_os("HIL_QEMU_ELF")
            .map(PathBuf::from)
            .unwrap_or_else(Self::default_elf);
        if !elf.is_file() {
            return Err(QemuError::Missing(format!(
                "the QEMU firmware {} is not built ((cd firmware && cargo build --release); scripts/test does)",
                elf.display()
            )));
        }
        Ok(QemuConfig { qemu, elf })
    }
}

/// How to start the board.
#[derive(Debug, Clone)]
pub struct Options {
    /// The REMP extensions, as the simulator's `--extensions` takes them (`none`, `all`, a list).
    pub extensions: String,
    /// The device id (the firmware's default when `None`).
    pub device_id: Option<DeviceId>,
    /// The pairing window.
    pub pairing_window: Duration,
    /// The CLI's command time limit.
    pub cli_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            extensions: "all".into(),
            device_id: None,
            pairing_window: Duration::from_secs(120),
            cli_timeout: Duration::from_secs(5),
        }
    }
}

/// A running QEMU board. QEMU stops when this is dropped.
pub struct QemuDongle {
    child: Child,
    console: ChildStdin,
    pty: PathBuf,
    device_id: DeviceId,
    lines: broadcast::Sender<String>,
    log: Arc<Mutex<Vec<String>>>,
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl QemuDongle {
    /// Boots the firmware and waits for its `ready` line.
    pub async fn start(config: &QemuConfig, options: &Options) -> Result<Self, QemuError> {
        // A seed from this host's generator: the board has no entropy of its own under QEMU.
        let seed: [u8; 32] = rand::random();
        let mut semihosting = format!(
            "enable=on,target=native,arg=dongle,arg=ext={},arg=window-ms={},arg=cli-timeout-ms={},arg=seed={}",
            options.extensions,
            options.pairing_window.as_millis(),
            options.cli_timeout.as_millis(),
            hex_string(&seed)
        );
        if let Some(id) = options.device_id {
            semihosting.push_str(&format!(",arg=device-id={id}"));
        }
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
            .map_err(|source| QemuError::Spawn {
                path: config.qemu.clone(),
                source,
            })?;
        let (Some(console), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(QemuError::Stopped);
        };
        let (lines, mut boot) = broadcast::channel(4096);
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
                    lock(&log).push(line.clone());
                    let _ = lines.send(line);
                }
            });
        }
        let mut pty = None;
        let mut device_id = None;
        let booted = tokio::time::timeout(BOOT_LIMIT, async {
            loop {
                let line = match boot.recv().await {
                    Ok(line) => line,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err("QEMU stopped while booting".to_string());
                    }
                };
                if let Some(rest) = line.strip_prefix("char device redirected to ")
                    && rest.ends_with("(label serial0)")
                {
                    pty = rest.split_whitespace().next().map(PathBuf::from);
                }
                // `ready: device <id> capabilities <bits>`
                if let Some(rest) = line.strip_prefix("ready: device ") {
                    device_id = rest
                        .split_whitespace()
                        .next()
                        .and_then(|id| id.parse().ok());
                    return Ok(());
                }
                if line.starts_with("PANIC") || line.starts_with("HARDFAULT") {
                    return Err(format!("the firmware failed: {line}"));
                }
            }
        })
        .await;
        let failed = |reason: String| QemuError::Boot {
            reason,
            log: lock(&log).join("\n"),
        };
        match booted {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(failed(reason)),
            Err(_) => return Err(failed(format!("no `ready` line within {BOOT_LIMIT:?}"))),
        }
        let pty =
            pty.ok_or_else(|| failed("QEMU did not say where USART1's pseudo-terminal is".into()))?;
        let device_id =
            device_id.ok_or_else(|| failed("the `ready` line names no device id".into()))?;
        Ok(Self {
            child,
            console,
            pty,
            device_id,
            lines,
            log,
        })
    }

    /// The pseudo-terminal of the board's host link.
    pub fn serial_path(&self) -> &Path {
        &self.pty
    }

    /// The board's device id, as its `ready` line gave it.
    pub fn device_id(&self) -> DeviceId {
        self.device_id
    }

    /// A receiver of the console's lines from now on.
    pub fn console_lines(&self) -> broadcast::Receiver<String> {
        self.lines.subscribe()
    }

    /// Everything QEMU printed so far.
    pub fn log(&self) -> String {
        lock(&self.log).join("\n")
    }

    /// Types a line on the board's console.
    pub async fn type_line(&mut self, line: &str) -> Result<(), QemuError> {
        self.console
            .write_all(format!("{line}\r").as_bytes())
            .await
            .map_err(QemuError::Console)?;
        self.console.flush().await.map_err(QemuError::Console)
    }

    /// Types `factory-reset` on the console and waits until the board has done it. Returns a
    /// receiver of the lines after the reset, so that a PIN shown before it is not taken for a new one.
    pub async fn factory_reset(&mut self) -> Result<broadcast::Receiver<String>, QemuError> {
        let mut lines = self.lines.subscribe();
        self.type_line("factory-reset").await?;
        wait_for(
            &mut lines,
            Duration::from_secs(5),
            "factory reset",
            |line| (line == "FactoryReset").then_some(()),
        )
        .await?;
        Ok(lines)
    }

    /// Stops QEMU.
    pub async fn shutdown(mut self) {
        let _ = self.child.kill().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next PIN the console shows (`PIN 123456 (120 s)`) among `lines`.
pub async fn next_pin(
    lines: &mut broadcast::Receiver<String>,
    within: Duration,
) -> Result<Pin, QemuError> {
    wait_for(lines, within, "PIN", |line| {
        let digits = line.strip_prefix("PIN ")?.split_whitespace().next()?;
        Pin::parse(digits).ok()
    })
    .await
}

/// Waits for a console line that `accept` turns into a value.
pub async fn wait_for<T>(
    lines: &mut broadcast::Receiver<String>,
    within: Duration,
    what: &str,
    mut accept: impl FnMut(&str) -> Option<T>,
) -> Result<T, QemuError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Ok(line)) => {
                if let Some(value) = accept(&line) {
                    return Ok(value);
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => return Err(QemuError::Stopped),
            Err(_) => {
                return Err(QemuError::NotShown {
                    what: what.into(),
                    within,
                });
            }
        }
    }
}
