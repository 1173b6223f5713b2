//! Commands typed on the dongles' UART consoles, on their way to the server: each report a dongle
//! signs (REMP CLI_TELEMETRY, checked by the session) waits here until the server acknowledges it
//! (`cli_telemetry_ack`), and goes again on every reconnect, so a dropped connection loses none. The
//! server makes a report sent twice one row.
//!
//! The outbox lives in memory and is bounded ([`MAX_PENDING`]): past it the oldest report is dropped
//! and counted. Reports only go to servers of control protocol 4 or later, which know them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use control_proto::{AgentMessage, CliTelemetry};
use firmware_proto::ids::DeviceId;
use firmware_proto::remp::TelemetrySource;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Shared;
use crate::session::UartReport;

/// The most reports waiting for the server's acknowledgement.
pub const MAX_PENDING: usize = 256;

/// The reports not acknowledged yet, oldest first.
#[derive(Default)]
pub(super) struct Outbox {
    pending: Mutex<VecDeque<CliTelemetry>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Outbox {
    /// Keeps `report` until acknowledged; false when it is already waiting (sent twice by the dongle).
    fn keep(&self, report: CliTelemetry) -> bool {
        let mut pending = self.pending.lock().unwrap();
        if pending.iter().any(|r| r.report_id == report.report_id) {
            return false;
        }
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        pending.push_back(report);
        true
    }

    /// The server has the report `report_id`.
    pub(super) fn acknowledged(&self, report_id: Uuid) {
        self.pending
            .lock()
            .unwrap()
            .retain(|r| r.report_id != report_id);
    }

    /// Every report not acknowledged yet, oldest first.
    pub(super) fn unacknowledged(&self) -> Vec<CliTelemetry> {
        self.pending.lock().unwrap().iter().cloned().collect()
    }

    /// Reports dropped because the outbox was full.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The control message for `report` of dongle `device_id`.
fn message(device_id: DeviceId, report: UartReport) -> CliTelemetry {
    CliTelemetry {
        report_id: Uuid::from_bytes(*report.corr_id.as_bytes()),
        device_id,
        source: match report.source {
            TelemetrySource::Uart => "uart".to_string(),
            TelemetrySource::Other(n) => format!("source_{n}"),
        },
        command: report.command,
        output: report.output,
        exit_code: i32::from(report.exit_code),
        truncated: report.truncated,
        error: report.error,
    }
}

impl Shared {
    /// Sends `report` now when the server knows reports; it waits in the outbox either way.
    pub(super) fn send_telemetry(&self, report: CliTelemetry) {
        if self.server_protocol.load(Ordering::Relaxed) >= control_proto::WATCH_SINCE {
            self.send(AgentMessage::CliTelemetry(report));
        }
    }
}

/// Moves the UART reports of dongle `device_id` to the server, for as long as its session lives.
pub(super) async fn pump(
    shared: Arc<Shared>,
    device_id: DeviceId,
    mut reports: mpsc::Receiver<UartReport>,
) {
    while let Some(report) = reports.recv().await {
        let report = message(device_id, report);
        tracing::info!(%device_id, command = %report.command, "a command was typed on the dongle's console");
        if shared.telemetry.keep(report.clone()) {
            shared.send_telemetry(report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(n: u16) -> CliTelemetry {
        let mut corr = [0u8; 16];
        corr[..2].copy_from_slice(&n.to_be_bytes());
        message(
            "00000000000000d1".parse().unwrap(),
            UartReport {
                corr_id: firmware_proto::ids::CorrelationId(corr),
                source: TelemetrySource::Uart,
                command: "version".into(),
                output: "fw\n".into(),
                exit_code: 0,
                truncated: false,
                error: false,
            },
        )
    }

    #[test]
    fn reports_wait_for_their_ack_once_each_and_bounded() {
        let outbox = Outbox::default();
        assert!(outbox.keep(report(1)));
        assert!(!outbox.keep(report(1)), "the same report once");
        assert!(outbox.keep(report(2)));
        outbox.acknowledged(report(1).report_id);
        let left: Vec<Uuid> = outbox
            .unacknowledged()
            .iter()
            .map(|r| r.report_id)
            .collect();
        assert_eq!(left, vec![report(2).report_id]);
        assert_eq!(report(2).source, "uart");
        for n in 3..=(MAX_PENDING as u16 + 3) {
            outbox.keep(report(n));
        }
        assert_eq!(outbox.unacknowledged().len(), MAX_PENDING);
        assert_eq!(outbox.dropped(), 2);
    }
}
