//! `daemon.json` in the agent's folder: what the running daemon is doing, for `bridge-agent status`.
//!
//! The daemon rewrites it whole on every change and deletes it when it stops; a file whose pid no longer
//! runs is what a killed daemon leaves behind, and `status` says so.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use control_proto::DongleReport;
use serde::{Deserialize, Serialize};

use crate::home::{Home, write_private};

const STATUS_FILE: &str = "daemon.json";

/// The daemon's state as written to disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub server_url: String,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub connected: bool,
    pub last_error: Option<String>,
    pub dongles: Vec<DongleReport>,
    /// Frames through the data plane.
    #[serde(default)]
    pub data: super::DataStats,
    /// Commands typed on dongles' UART consoles that the server has not acknowledged yet.
    #[serde(default)]
    pub uart_reports_waiting: usize,
    /// UART reports dropped because too many waited.
    #[serde(default)]
    pub uart_reports_dropped: u64,
}

pub(super) struct StatusFile {
    path: PathBuf,
    status: Mutex<DaemonStatus>,
}

impl StatusFile {
    pub(super) fn new(home: &Home, server_url: &str) -> Self {
        Self {
            path: home.dir().join(STATUS_FILE),
            status: Mutex::new(DaemonStatus {
                pid: std::process::id(),
                server_url: server_url.to_string(),
                started_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                connected: false,
                last_error: None,
                dongles: Vec::new(),
                data: Default::default(),
                uart_reports_waiting: 0,
                uart_reports_dropped: 0,
            }),
        }
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut DaemonStatus)) {
        let mut status = self.status.lock().unwrap();
        change(&mut status);
        let text = serde_json::to_vec_pretty(&*status).expect("status serializes");
        if let Err(e) = write_private(&self.path, &text) {
            tracing::debug!(error = %e, "could not write the status file");
        }
    }

    pub(super) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The status the daemon of `home` last wrote, if any, and whether its process still runs.
pub fn read_status(home: &Home) -> Option<(DaemonStatus, bool)> {
    let path: &Path = &home.dir().join(STATUS_FILE);
    let text = std::fs::read(path).ok()?;
    let status: DaemonStatus = serde_json::from_slice(&text).ok()?;
    // Where the OS cannot tell, the status file's word stands (the daemon removes it when it stops).
    let alive = crate::platform::process_alive(status.pid).unwrap_or(true);
    Some((status, alive))
}
