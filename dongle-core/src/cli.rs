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
//!
//! Answers are written into a [`CliOutput`] of fixed size, one byte larger than any output limit
//! the protocol allows, so an answer the buffer had to cut is also longer than the limit and is
//! flagged as truncated like any other.

use core::fmt::{self, Write};
use core::time::Duration;

use firmware_proto::ids::DeviceId;
use firmware_proto::remp::{CliStatus, MAX_PAYLOAD_LEN};

use crate::text::Written;
use crate::timing::CanSettings;

/// The default limit of a command's run time.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default output limit in bytes.
pub const DEFAULT_OUTPUT_LIMIT: usize = 512;
/// The longest command line accepted, in bytes.
pub const MAX_COMMAND_LEN: usize = 1024;
/// The capacity of an answer: one byte more than any response could carry.
pub const OUTPUT_CAPACITY: usize = MAX_PAYLOAD_LEN + 1;

/// A command's full answer, before the dongle cuts it to its output limit.
pub type CliOutput = Written<OUTPUT_CAPACITY>;

// An echo of the longest command fits whole.
const _: () = assert!(OUTPUT_CAPACITY > MAX_COMMAND_LEN);

/// The pairing state, as `remote pairing show` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PairingView {
    /// No window, no token.
    #[default]
    Idle,
    /// The dongle holds a token.
    Claimed,
    /// A pairing window is open.
    Window {
        /// Seconds until it closes.
        seconds_left: u16,
        /// Wrong PINs so far.
        wrong_pins: u8,
    },
    /// Too many wrong PINs: pairing is refused for a while.
    Cooldown {
        /// Seconds until it ends.
        seconds_left: u64,
    },
}

impl fmt::Display for PairingView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Idle => f.write_str("idle"),
            Self::Claimed => f.write_str("claimed"),
            Self::Window {
                seconds_left,
                wrong_pins,
            } => write!(
                f,
                "window open {seconds_left} s left, {wrong_pins} wrong PINs"
            ),
            Self::Cooldown { seconds_left } => write!(f, "cooldown {seconds_left} s left"),
        }
    }
}

/// The CAN configuration on one line, as `can cfg show` and `remote status` tell it.
struct CanLine<'a>(&'a CanSettings);

impl fmt::Display for CanLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        write!(
            f,
            "{} bit/s sp {} prescaler {} tseg1 {} tseg2 {} sjw {} mode {}",
            s.bitrate,
            s.sample_point_permille,
            s.prescaler,
            s.tseg1,
            s.tseg2,
            s.sjw,
            s.mode.name()
        )
    }
}

/// What a command may read about the dongle.
#[derive(Debug, Clone, Default)]
pub struct CliContext<'a> {
    /// The firmware build string.
    pub fw_build: &'a str,
    /// The dongle's device id.
    pub device_id: DeviceId,
    /// Seconds since power-up.
    pub uptime_s: u64,
    /// Whether the dongle holds a token.
    pub claimed: bool,
    /// The pairing state.
    pub pairing: PairingView,
    /// A one-line description of the link.
    pub link: &'a str,
    /// The CAN configuration.
    pub can: CanSettings,
    /// Counter lines, `name value`.
    pub stats: &'a [(&'static str, u64)],
    /// The dongle's command time limit.
    pub timeout: Duration,
    /// ANNOUNCEs sent (for `discovery status`).
    pub announces: u64,
    /// The capability bits announced.
    pub capabilities: u32,
    /// Whether a pairing window is open (the announced pairing mode).
    pub pairing_mode: bool,
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
    pub output: CliOutput,
    /// How long to wait before answering.
    pub delay: Duration,
    /// A side effect.
    pub action: Option<CliAction>,
}

impl CliAnswer {
    fn ok(output: CliOutput) -> Self {
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

    fn error(output: CliOutput) -> Self {
        Self {
            status: CliStatus::Error,
            exit_code: 2,
            output,
            delay: Duration::ZERO,
            action: None,
        }
    }
}

/// Formats an answer. Writing to a [`CliOutput`] never fails (what does not fit is dropped).
fn text(args: fmt::Arguments<'_>) -> CliOutput {
    let mut out = CliOutput::new();
    let _ = out.write_fmt(args);
    out
}

/// The most words a command has; a longer line can only be `echo`.
const MAX_WORDS: usize = 3;

/// Decides the answer to `line`.
pub fn run(line: &str, allow_dangerous: bool, ctx: &CliContext<'_>) -> CliAnswer {
    if line.len() > MAX_COMMAND_LEN {
        return CliAnswer::error(text(format_args!(
            "command longer than {MAX_COMMAND_LEN} bytes\n"
        )));
    }
    // The first words, and one more to tell a longer line from a command.
    let mut head = heapless::Vec::<&str, { MAX_WORDS + 1 }>::new();
    for word in line.split_whitespace().take(MAX_WORDS + 1) {
        let _ = head.push(word);
    }
    match head.as_slice() {
        ["help"] => {
            let mut out = CliOutput::new();
            for command in COMMANDS {
                let _ = writeln!(out, "{command}");
            }
            CliAnswer::ok(out)
        }
        ["version"] => CliAnswer::ok(text(format_args!("{}\nremp 1\n", ctx.fw_build))),
        ["time", "status"] => CliAnswer::ok(text(format_args!(
            "clock_us {}\nsource uptime (no time of day)\n",
            ctx.clock_us
        ))),
        ["discovery", "status"] => CliAnswer::ok(text(format_args!(
            "announces {}\ncapabilities {:#06x}\npairing_mode {}\n",
            ctx.announces,
            ctx.capabilities,
            if ctx.pairing_mode { "yes" } else { "no" }
        ))),
        ["can", "cfg", "show"] => CliAnswer::ok(text(format_args!("{}\n", CanLine(&ctx.can)))),
        ["uptime"] => CliAnswer::ok(text(format_args!("{}\n", ctx.uptime_s))),
        ["remote", "status"] => CliAnswer::ok(text(format_args!(
            "device {}\nclaimed {}\nlink {}\ncan {}\n",
            ctx.device_id,
            if ctx.claimed { "yes" } else { "no" },
            ctx.link,
            CanLine(&ctx.can)
        ))),
        ["remote", "stats"] => {
            let mut out = CliOutput::new();
            for (name, value) in ctx.stats {
                let _ = writeln!(out, "{name} {value}");
            }
            CliAnswer::ok(out)
        }
        ["remote", "pairing", "show"] => CliAnswer::ok(text(format_args!("{}\n", ctx.pairing))),
        ["net", "status"] => CliAnswer::ok(text(format_args!("{}\n", ctx.link))),
        ["echo", ..] => {
            let mut out = CliOutput::new();
            for (i, word) in line.split_whitespace().skip(1).enumerate() {
                let _ = write!(out, "{}{word}", if i == 0 { "" } else { " " });
            }
            let _ = out.write_str("\n");
            CliAnswer::ok(out)
        }
        ["sleep", ms] => match ms.parse::<u64>() {
            Ok(ms) => {
                let wanted = Duration::from_millis(ms);
                if wanted > ctx.timeout {
                    CliAnswer {
                        status: CliStatus::Timeout,
                        exit_code: 124,
                        output: text(format_args!(
                            "timeout after {} ms\n",
                            ctx.timeout.as_millis()
                        )),
                        delay: ctx.timeout,
                        action: None,
                    }
                } else {
                    CliAnswer {
                        delay: wanted,
                        ..CliAnswer::ok(text(format_args!("slept {ms} ms\n")))
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
pub fn truncate(output: &[u8], limit: usize) -> (&[u8], bool) {
    match output.get(..limit) {
        Some(cut) if output.len() > limit => (cut, true),
        _ => (output, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> CliContext<'static> {
        CliContext {
            timeout: DEFAULT_TIMEOUT,
            fw_build: "sim",
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
        c.clock_us = 42;
        c.announces = 3;
        c.capabilities = 0x1f;
        assert_eq!(
            run("can cfg show", false, &c).output,
            "500000 bit/s sp 875 prescaler 10 tseg1 13 tseg2 2 sjw 1 mode normal\n"
        );
        assert!(
            run("time status", false, &c)
                .output
                .as_str()
                .contains("clock_us 42")
        );
        assert_eq!(
            run("discovery status", false, &c).output,
            "announces 3\ncapabilities 0x001f\npairing_mode no\n"
        );
        let help = run("help", false, &c);
        assert_eq!(help.status, CliStatus::Ok);
        for command in COMMANDS {
            assert!(help.output.as_str().contains(command), "{command}");
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
    fn the_pairing_state_reads_as_before() {
        let show = |pairing| {
            let c = CliContext { pairing, ..ctx() };
            run("remote pairing show", false, &c).output
        };
        assert_eq!(show(PairingView::Idle), "idle\n");
        assert_eq!(show(PairingView::Claimed), "claimed\n");
        assert_eq!(
            show(PairingView::Window {
                seconds_left: 90,
                wrong_pins: 2
            }),
            "window open 90 s left, 2 wrong PINs\n"
        );
        assert_eq!(
            show(PairingView::Cooldown { seconds_left: 30 }),
            "cooldown 30 s left\n"
        );
    }

    #[test]
    fn unknown_and_dangerous_commands_are_denied() {
        assert_eq!(run("rm -rf /", true, &ctx()).status, CliStatus::Denied);
        assert_eq!(
            run("factory-reset", false, &ctx()).status,
            CliStatus::Denied
        );
        assert_eq!(
            run("factory-reset now please", true, &ctx()).status,
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
        assert_eq!(
            truncate(long.as_bytes(), 512),
            (&long.as_bytes()[..512], true)
        );
        assert_eq!(truncate(b"ab", 512), (&b"ab"[..], false));
    }

    #[test]
    fn the_longest_echo_is_answered_whole() {
        let words = "ab ".repeat((MAX_COMMAND_LEN - "echo ".len()) / 3);
        let line = format!("echo {words}");
        assert!(line.len() <= MAX_COMMAND_LEN);
        let answer = run(&line, false, &ctx());
        assert_eq!(answer.output, format!("{}\n", words.trim_end()).as_str());
        assert!(!answer.output.is_full());
    }
}
