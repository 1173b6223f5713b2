//! `bridge-server serve` as a child process, so that its memory can be read from /proc and its file
//! descriptors are its own; stopped with SIGTERM (then SIGKILL) when dropped, and by the kernel if the
//! benchmark itself dies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The `bridge-server` binary of this build: next to the running benchmark (both live in
/// `target/<profile>/`), built with the same profile through cargo when it is missing.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("the benchmark's own path")?;
    let dir = exe.parent().context("the benchmark's folder")?;
    let bin = dir.join("bridge-server");
    // Always ask cargo: it does nothing when the binary is current, and a stale server would measure
    // old code. `CARGO` is set by `cargo run`.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "bridge-server", "--bin", "bridge-server"]);
    if release {
        build.arg("--release");
    }
    let status = build
        .stdout(Stdio::null())
        .status()
        .context("could not run cargo to build bridge-server")?;
    if !status.success() || !bin.is_file() {
        bail!(
            "could not build {}; build it with `cargo build --release -p bridge-server`",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running `bridge-server serve`.
pub struct ServerProcess {
    child: Child,
    pub url: String,
}

impl ServerProcess {
    /// Starts the server on 127.0.0.1:`port` against `database_url`, with its data folder (the
    /// development key file) in `data_dir`, and waits until `/healthz` answers.
    pub async fn start(
        bin: &Path,
        database_url: &str,
        data_dir: &Path,
        port: u16,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log).context("the server's log file")?;
        let mut command = Command::new(bin);
        command
            .args(["serve", "--no-migrate", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe and touches nothing of this process's memory. The server
        // gets SIGTERM if the benchmark dies without dropping this handle (killed with SIGKILL).
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("could not start {}", bin.display()))?;
        let mut server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", server.url)).send().await
                && r.status().is_success()
            {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!(
                    "the server exited at start ({status}); see {}",
                    log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not answer /healthz within 30 s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of /proc/PID/status in kB (`VmRSS`, `VmHWM`), or 0.
    pub fn status_kb(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Open file descriptors of the server process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The server's CPU time (user + system) so far, from /proc/PID/stat.
    pub fn cpu(&self) -> Duration {
        crate::proc_stat_cpu(std::path::Path::new(&format!("/proc/{}/stat", self.pid())))
            .unwrap_or_default()
    }

    /// Stops the server: SIGTERM, up to 10 s for a graceful end, then SIGKILL.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the server binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("a free port")?;
    Ok(listener.local_addr()?.port())
}
