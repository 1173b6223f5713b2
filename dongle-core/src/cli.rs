//! The dongle's allow-listed CLI commands, modelled on the firmware's.
//!
//! | command               | answer                                                        |
//! |-----------------------|---------------------------------------------------------------|
//! | `version`             | firmware build and protocol version                           |
//! | `uptime`              | seconds since power-up                                        |
//! | `remote status`       | device id, claimed or not, host link, CAN configuration       |
//! | `remote stats`        | packet, frame and refusal counters                            |
//! | `remote pairing show` | pairing state: idle, window open (seconds left), cool-down    |
//! | `net status`          | the link (serial path or UDP address)                         |
//! | `echo ARGS...`        | ARGS joined by spaces (for output-size and truncation tests)  |
//! | `sleep MS`            | answers after MS milliseconds; past the dongle's command limit (default 5 s) it answers `timeout` at the limit |
//! | `factory-reset`       | dangerous: erases token and pairing state; needs allow_dangerous |
//!
//! Anything else, and a dangerous command without the allow_dangerous flag, answers `denied`
//! (exit code 1) without running. Output longer than the dongle's limit (default 512 bytes) is
//! cut there and the response carries the truncated flag. This module only decides what to
//! answer; [`crate::dongle`] carries it out.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use firmware_proto::remp::CliStatus;

/// The default limit of a command's run time.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default output limit in bytes.
pub const DEFAULT_OUTPUT_LIMIT: usize = 512;
/// The longest command line accepted, in bytes.
pub const MAX_COMMAND_LEN: usize = 1024;

/// What a command may read about the dongle.
#[derive(Debug, Clone, Default)]
pub struct CliContext {
    /// The firmware build string.
    pub fw_build: String,
    /// The dongle's device id, as hex.
    pub device_id: String,
    /// Seconds since power-up.
    pub uptime_s: u64,
    /// Whether the dongle holds a token.
    pub claimed: bool,
    /// A one-line description of the pairing state.
    pub pairing: String,
    /// A one-line description of the link.
    pub link: String,
    /// A one-line description of the CAN configuration.
    pub can: String,
    /// Counter lines, `name value`.
    pub stats: Vec<(String, u64)>,
    /// The dongle's command time limit.
    pub timeout: Duration,
    /// Discovery lines, `name value` (announces sent, capability bits, pairing mode).
    pub discovery: Vec<(String, String)>,
    /// The dongle's clock in microseconds (since power-up: it has no time of day).
    pub clock_us: u64,
}

/// The commands this firmware has, as `help` lists them.
pub const COMMANDS: &[&str] = &[
    "help",
    "version",
    "uptime",
    "time status",
    "remote status",
    "remote stats",
    "remote pairing show",
    "net status",
    "discovery status",
    "can cfg show",
    "echo WORDS...",
    "sleep MS",
    "factory-reset (dangerous)",
];

/// Something a command asks the dongle to do besides answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CliAction {
    /// Erase the token and pairing state after answering.
    FactoryReset,
}

/// The decided answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliAnswer {
    /// The response status.
    pub status: CliStatus,
    /// The exit code.
    pub exit_code: u16,
    /// The full output (the dongle truncates it).
    pub output: String,
    /// How long to wait before answering.
    pub delay: Duration,
    /// A side effect.
    pub action: Option<CliAction>,
}

impl CliAnswer {
    fn ok(output: String) -> Self {
        Self {
            status: CliStatus::Ok,
            exit_code: 0,
            output,
            delay: Duration::ZERO,
            action: None,
        }
    }

    fn denied(output: &str) -> Self {
        Self {
            status: CliStatus::Denied,
            exit_code: 1,
            output: output.into(),
            delay: Duration::ZERO,
            action: None,
        }
    }

    fn error(output: String) -> Self {
        Self {
            status: CliStatus::Error,
            exit_code: 2,
            output,
            delay: Duration::ZERO,
            action: None,
        }
    }
}

/// Decides the answer to `line`.
pub fn run(line: &str, allow_dangerous: bool, ctx: &CliContext) -> CliAnswer {
    if line.len() > MAX_COMMAND_LEN {
        return CliAnswer::error(format!("command longer than {MAX_COMMAND_LEN} bytes\n"));
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["help"] => CliAnswer::ok(COMMANDS.iter().map(|c| format!("{c}\n")).collect()),
        ["version"] => CliAnswer::ok(format!("{}\nremp 1\n", ctx.fw_build)),
        ["time", "status"] => CliAnswer::ok(format!(
            "clock_us {}\nsource uptime (no time of day)\n",
            ctx.clock_us
        )),
        ["discovery", "status"] => CliAnswer::ok(
            ctx.discovery
                .iter()
                .map(|(k, v)| format!("{k} {v}\n"))
                .collect(),
        ),
        ["can", "cfg", "show"] => CliAnswer::ok(format!("{}\n", ctx.can)),
        ["uptime"] => CliAnswer::ok(format!("{}\n", ctx.uptime_s)),
        ["remote", "status"] => CliAnswer::ok(format!(
            "device {}\nclaimed {}\nlink {}\ncan {}\n",
            ctx.device_id,
            if ctx.claimed { "yes" } else { "no" },
            ctx.link,
            ctx.can
        )),
        ["remote", "stats"] => {
            let mut out = String::new();
            for (name, value) in &ctx.stats {
                out.push_str(&format!("{name} {value}\n"));
            }
            CliAnswer::ok(out)
        }
        ["remote", "pairing", "show"] => CliAnswer::ok(format!("{}\n", ctx.pairing)),
        ["net", "status"] => CliAnswer::ok(format!("{}\n", ctx.link)),
        ["echo", rest @ ..] => CliAnswer::ok(format!("{}\n", rest.join(" "))),
        ["sleep", ms] => match ms.parse::<u64>() {
            Ok(ms) => {
                let wanted = Duration::from_millis(ms);
                if wanted > ctx.timeout {
                    CliAnswer {
                        status: CliStatus::Timeout,
                        exit_code: 124,
                        output: format!("timeout after {} ms\n", ctx.timeout.as_millis()),
                        delay: ctx.timeout,
                        action: None,
                    }
                } else {
                    CliAnswer {
                        delay: wanted,
                        ..CliAnswer::ok(format!("slept {ms} ms\n"))
                    }
                }
            }
            Err(_) => CliAnswer::error("usage: sleep MS\n".into()),
        },
        ["factory-reset"] if allow_dangerous => CliAnswer {
            action: Some(CliAction::FactoryReset),
            ..CliAnswer::ok("factory reset: token and pairing state erased\n".into())
        },
        ["factory-reset"] => CliAnswer::denied("denied: dangerous command needs allow_dangerous\n"),
        _ => CliAnswer::denied("denied: command not allowed\n"),
    }
}

/// Cuts `output` to `limit` bytes; returns the bytes and whether it was cut.
pub fn truncate(output: &str, limit: usize) -> (&[u8], bool) {
    let bytes = output.as_bytes();
    match bytes.get(..limit) {
        Some(cut) if bytes.len() > limit => (cut, true),
        _ => (bytes, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> CliContext {
        CliContext {
            timeout: DEFAULT_TIMEOUT,
            fw_build: "sim".into(),
            ..Default::default()
        }
    }

    #[test]
    fn known_commands_answer() {
        assert_eq!(run("version", false, &ctx()).status, CliStatus::Ok);
        assert_eq!(run("echo a  b", false, &ctx()).output, "a b\n");
        assert_eq!(
            run("remote pairing show", false, &ctx()).status,
            CliStatus::Ok
        );
    }

    #[test]
    fn the_firmwares_status_commands_answer_and_help_lists_every_command() {
        let mut c = ctx();
        c.can = "500000 bit/s".into();
        c.clock_us = 42;
        c.discovery = vec![("announces".into(), "3".into())];
        assert_eq!(run("can cfg show", false, &c).output, "500000 bit/s\n");
        assert!(run("time status", false, &c).output.contains("clock_us 42"));
        assert_eq!(run("discovery status", false, &c).output, "announces 3\n");
        let help = run("help", false, &c);
        assert_eq!(help.status, CliStatus::Ok);
        for command in COMMANDS {
            assert!(help.output.contains(command), "{command}");
            // Every listed command is one this firmware answers (with its arguments filled in).
            let line = command
                .replace(" WORDS...", " a")
                .replace(" MS", " 1")
                .replace(" (dangerous)", "");
            assert_ne!(
                run(&line, true, &c).status,
                CliStatus::Denied,
                "{line} is listed but denied"
            );
        }
    }

    #[test]
    fn unknown_and_dangerous_commands_are_denied() {
        assert_eq!(run("rm -rf /", true, &ctx()).status, CliStatus::Denied);
        assert_eq!(
            run("factory-reset", false, &ctx()).status,
            CliStatus::Denied
        );
        let reset = run("factory-reset", true, &ctx());
        assert_eq!(reset.action, Some(CliAction::FactoryReset));
    }

    #[test]
    fn sleep_past_the_limit_times_out() {
        let a = run("sleep 100", false, &ctx());
        assert_eq!(
            (a.status, a.delay),
            (CliStatus::Ok, Duration::from_millis(100))
        );
        let a = run("sleep 60000", false, &ctx());
        assert_eq!((a.status, a.delay), (CliStatus::Timeout, DEFAULT_TIMEOUT));
    }

    #[test]
    fn truncates_at_the_limit() {
        let long = "x".repeat(600);
        assert_eq!(truncate(&long, 512), (&long.as_bytes()[..512], true));
        assert_eq!(truncate("ab", 512), (&b"ab"[..], false));
    }
}
