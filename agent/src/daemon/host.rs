//! Network diagnostics on the agent's own workstation, for a dongle it serves (control protocol 4): the
//! interfaces and which the LAN discovery uses, `ip -brief address`, and a ping of a LAN dongle's own
//! address. The server names the diagnostic only; the agent fills in the address, so nothing the
//! server sends reaches a command line, and nothing runs through a shell. The output goes to the
//! server a line at a time (`host_output` events, for the dongle's console) and whole in the reply,
//! cut at [`MAX_OUTPUT`]. A workstation owner turns them off with `bridge-agent run
//! --no-host-commands`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use control_proto::{AgentMessage, Event, HostCommand, ReplyErrorCode, ReplyOk, ReplyResult};
use firmware_proto::ids::DeviceId;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use super::Shared;
use super::device::Device;
use super::reply::{error, ok};
use crate::discovery::lan_interfaces;

/// The most output kept, in bytes.
pub const MAX_OUTPUT: usize = 16 * 1024;
/// How long a diagnostic may run before it is killed.
const TIME_LIMIT: Duration = Duration::from_secs(10);

/// One diagnostic being run: its id and the dongle it is about.
struct Run {
    id: Uuid,
    device_id: DeviceId,
}

/// What a diagnostic printed so far, bounded.
struct Output {
    text: String,
    truncated: bool,
}

impl Output {
    /// Keeps `line` (and its newline) if it fits; says whether it was kept.
    fn push(&mut self, line: &str) -> bool {
        if self.text.len() + line.len() + 1 > MAX_OUTPUT {
            self.truncated = true;
            return false;
        }
        self.text.push_str(line);
        self.text.push('\n');
        true
    }
}

impl Shared {
    pub(super) async fn host_command(
        self: &Arc<Self>,
        run_id: Uuid,
        id: DeviceId,
        command: HostCommand,
    ) -> ReplyResult {
        if !self.host_commands {
            return error(
                ReplyErrorCode::Refused,
                "host commands are turned off on this workstation (bridge-agent run --no-host-commands)",
            );
        }
        let Some(device) = self.devices.get(&id) else {
            return error(
                ReplyErrorCode::UnknownDevice,
                format!("this agent does not serve dongle {id} now"),
            );
        };
        let run = Run {
            id: run_id,
            device_id: id,
        };
        let mut output = Output {
            text: String::new(),
            truncated: false,
        };
        let exit_code = match command {
            HostCommand::Interfaces => {
                let text = match lan_interfaces::system_interfaces() {
                    Ok(all) => describe(&lan_interfaces::report(&all)),
                    Err(e) => format!("could not list the interfaces: {e}"),
                };
                for line in text.lines() {
                    self.host_line(&run, &mut output, line);
                }
                0
            }
            HostCommand::IpAddr => {
                self.run_program(&run, &mut output, "ip", &["-brief", "address"])
                    .await
            }
            HostCommand::Ping => {
                let lan_ip = match &device {
                    Device::Dongle(session) => session.info().lan_ip,
                    Device::Local { .. } => None,
                };
                let Some(ip) = lan_ip else {
                    return error(
                        ReplyErrorCode::Refused,
                        "ping needs a LAN dongle's address, and this dongle is not on the LAN",
                    );
                };
                let ip = std::net::Ipv4Addr::from(ip).to_string();
                self.run_program(&run, &mut output, "ping", &["-c", "3", "-W", "1", &ip])
                    .await
            }
        };
        ok(ReplyOk::HostCommandDone {
            exit_code,
            output: output.text,
            truncated: output.truncated,
        })
    }

    /// Keeps `line` and sends it to the server as it comes.
    fn host_line(&self, run: &Run, output: &mut Output, line: &str) {
        if output.push(line) {
            self.send(AgentMessage::Event(Event::HostOutput {
                run_id: run.id,
                device_id: run.device_id,
                chunk: format!("{line}\n"),
            }));
        }
    }

    /// Runs `program` with `args` (no shell), streaming its output; its exit code, or -1 when it could
    /// not start or ran out of time (the reason is in the output).
    async fn run_program(
        &self,
        run: &Run,
        output: &mut Output,
        program: &str,
        args: &[&str],
    ) -> i32 {
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                self.host_line(run, output, &format!("could not run {program}: {e}"));
                return -1;
            }
        };
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return -1;
        };
        let mut out = BufReader::new(stdout).lines();
        let mut err = BufReader::new(stderr).lines();
        let running = async {
            let (mut out_open, mut err_open) = (true, true);
            while out_open || err_open {
                tokio::select! {
                    line = out.next_line(), if out_open => match line {
                        Ok(Some(line)) => self.host_line(run, output, &line),
                        _ => out_open = false,
                    },
                    line = err.next_line(), if err_open => match line {
                        Ok(Some(line)) => self.host_line(run, output, &line),
                        _ => err_open = false,
                    },
                }
            }
            child.wait().await
        };
        match tokio::time::timeout(TIME_LIMIT, running).await {
            Ok(Ok(status)) => status.code().unwrap_or(-1),
            Ok(Err(e)) => {
                self.host_line(run, output, &format!("{program} failed: {e}"));
                -1
            }
            Err(_) => {
                self.host_line(
                    run,
                    output,
                    &format!(
                        "{program} ran past {} s and was stopped",
                        TIME_LIMIT.as_secs()
                    ),
                );
                -1
            }
        }
    }
}

/// The interfaces as lines people read.
fn describe(interfaces: &[control_proto::InterfaceReport]) -> String {
    interfaces
        .iter()
        .map(|i| {
            let verdict = match (&i.excluded_because, i.used_for_discovery) {
                (_, true) => "used for discovery".to_string(),
                (Some(why), false) => format!("not scanned: {why}"),
                (None, false) => "not scanned".to_string(),
            };
            format!("{} {} ({verdict})\n", i.name, i.addresses.join(" "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_bounded_and_says_when_it_was_cut() {
        let mut output = Output {
            text: String::new(),
            truncated: false,
        };
        let line = "x".repeat(1000);
        let kept = (0..100).filter(|_| output.push(&line)).count();
        assert_eq!(kept, MAX_OUTPUT / 1001);
        assert!(output.truncated && output.text.len() <= MAX_OUTPUT);
    }

    #[test]
    fn interfaces_read_as_lines() {
        let text = describe(&[control_proto::InterfaceReport {
            name: "lo".into(),
            addresses: vec!["127.0.0.1".into()],
            used_for_discovery: false,
            excluded_because: Some("loopback".into()),
        }]);
        assert_eq!(text, "lo 127.0.0.1 (not scanned: loopback)\n");
    }
}
