//! The commands a user may run on a dongle (SPEC 3.7): each one's name, argument rules and longest
//! timeout. The list follows the dongle CLI's own (`sim/src/cli.rs`, the firmware's); anything not here
//! is refused before it is queued, so the dongle's own refusal is a second line, not the first.

use thiserror::Error;

/// What a command accepts after its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgRule {
    /// Nothing.
    None,
    /// Up to `max_words` words of printable ASCII without spaces, each at most `max_len` bytes.
    Words { max_words: usize, max_len: usize },
    /// Exactly one decimal number of milliseconds, at most `max`.
    Millis { max: u64 },
}

/// One allowed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// The words of the command as the dongle's CLI reads them, e.g. `remote status`.
    pub name: &'static str,
    pub args: ArgRule,
    /// The timeout when the request names none, in milliseconds.
    pub default_timeout_ms: u32,
    /// The longest timeout a request may ask for, in milliseconds.
    pub max_timeout_ms: u32,
    /// Runs only with the REMP CLI's dangerous-command flag, which only a development server sets.
    pub dangerous: bool,
}

const fn plain(name: &'static str) -> CommandSpec {
    CommandSpec {
        name,
        args: ArgRule::None,
        default_timeout_ms: 5_000,
        max_timeout_ms: 10_000,
        dangerous: false,
    }
}

/// Every command the server lets through.
pub const ALLOW_LIST: &[CommandSpec] = &[
    plain("help"),
    plain("version"),
    plain("uptime"),
    plain("time status"),
    plain("discovery status"),
    plain("can cfg show"),
    plain("remote status"),
    plain("remote stats"),
    plain("remote pairing show"),
    plain("net status"),
    CommandSpec {
        args: ArgRule::Words {
            max_words: 64,
            max_len: 128,
        },
        ..plain("echo")
    },
    CommandSpec {
        args: ArgRule::Millis { max: 60_000 },
        default_timeout_ms: 10_000,
        max_timeout_ms: 70_000,
        ..plain("sleep")
    },
    CommandSpec {
        dangerous: true,
        ..plain("factory-reset")
    },
];

/// The shortest timeout a command may have, in milliseconds.
pub const MIN_TIMEOUT_MS: i64 = 100;
/// The longest command line sent to a dongle, in bytes (the dongle's CLI takes up to 1024).
pub const MAX_LINE_LEN: usize = 1000;

/// Why a command is refused before it is queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("{0:?} is not an allowed command")]
    NotAllowed(String),
    #[error(
        "{0} is a dangerous command: it runs only on a server in development mode, and only with allow_dangerous set"
    )]
    Dangerous(&'static str),
    #[error("allow_dangerous is honoured only on a server in development mode")]
    DangerousFlag,
    #[error("args: {0}")]
    Args(String),
    #[error("timeout_ms: {0}")]
    Timeout(String),
}

/// A command that passed the allow-list, ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub spec: &'static CommandSpec,
    /// The arguments after the name.
    pub args: Vec<String>,
    /// The whole line as the dongle's CLI reads it.
    pub line: String,
    pub timeout_ms: u32,
    /// The REMP CLI's dangerous-command flag to send: set only for a dangerous command that was
    /// permitted.
    pub allow_dangerous: bool,
}

fn is_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks `command` with `args` and a requested timeout against the allow-list. A dangerous command
/// passes only when `dangerous_permitted` (the server runs in development mode and the request set
/// allow_dangerous).
///
/// The name may carry its arguments itself (`"sleep 100"` is `"sleep"` with `["100"]`), and words are
/// matched after splitting on whitespace, so `"remote  status"` is `remote status`. Each element of
/// `args` must be one word: a space inside one would reach the dongle as two.
pub fn check(
    command: &str,
    args: &[String],
    timeout_ms: Option<i64>,
    dangerous_permitted: bool,
) -> Result<Checked, Refusal> {
    if let Some(bad) = args.iter().find(|a| !is_word(a)) {
        let shown: String = bad.chars().filter(|c| !c.is_control()).take(40).collect();
        return Err(Refusal::Args(format!(
            "each argument is one word of printable ASCII without spaces; {shown:?} is not"
        )));
    }
    let words: Vec<&str> = command
        .split_whitespace()
        .chain(args.iter().map(String::as_str))
        .collect();
    let shown_name = || {
        command
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect::<String>()
    };
    // The longest name that the words start with: `remote pairing show` before a shorter one.
    let spec = ALLOW_LIST
        .iter()
        .filter(|spec| {
            let name: Vec<&str> = spec.name.split(' ').collect();
            words.len() >= name.len() && words[..name.len()] == name[..]
        })
        .max_by_key(|spec| spec.name.split(' ').count())
        .ok_or_else(|| Refusal::NotAllowed(shown_name()))?;
    let rest: Vec<String> = words[spec.name.split(' ').count()..]
        .iter()
        .map(|w| w.to_string())
        .collect();
    if !words.iter().all(|w| is_word(w)) {
        return Err(Refusal::Args(
            "the command holds characters that are not printable ASCII".into(),
        ));
    }
    match spec.args {
        ArgRule::None if !rest.is_empty() => {
            return Err(Refusal::Args(format!("{} takes no arguments", spec.name)));
        }
        ArgRule::None => {}
        ArgRule::Words { max_words, max_len } => {
            if rest.len() > max_words {
                return Err(Refusal::Args(format!(
                    "{} takes at most {max_words} words",
                    spec.name
                )));
            }
            if rest.iter().any(|w| w.len() > max_len) {
                return Err(Refusal::Args(format!(
                    "each word of {} is at most {max_len} characters",
                    spec.name
                )));
            }
        }
        ArgRule::Millis { max } => {
            let ok = match rest.as_slice() {
                [ms] => {
                    ms.len() <= 6
                        && ms.bytes().all(|b| b.is_ascii_digit())
                        && ms.parse::<u64>().is_ok_and(|v| v <= max)
                }
                _ => false,
            };
            if !ok {
                return Err(Refusal::Args(format!(
                    "{} takes one number of milliseconds, 0 to {max}",
                    spec.name
                )));
            }
        }
    }
    if spec.dangerous && !dangerous_permitted {
        return Err(Refusal::Dangerous(spec.name));
    }
    let timeout_ms = match timeout_ms {
        None => spec.default_timeout_ms,
        Some(t) if (MIN_TIMEOUT_MS..=spec.max_timeout_ms as i64).contains(&t) => t as u32,
        Some(_) => {
            return Err(Refusal::Timeout(format!(
                "{} allows {MIN_TIMEOUT_MS} to {} milliseconds",
                spec.name, spec.max_timeout_ms
            )));
        }
    };
    let mut line = spec.name.to_string();
    for word in &rest {
        line.push(' ');
        line.push_str(word);
    }
    if line.len() > MAX_LINE_LEN {
        return Err(Refusal::Args(format!(
            "the command line is longer than {MAX_LINE_LEN} bytes"
        )));
    }
    Ok(Checked {
        spec,
        args: rest,
        line,
        timeout_ms,
        allow_dangerous: spec.dangerous && dangerous_permitted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn known_commands_pass_with_their_arguments() {
        let c = check("remote  status", &[], None, false).unwrap();
        assert_eq!(
            (c.spec.name, c.line.as_str(), c.timeout_ms),
            ("remote status", "remote status", 5_000)
        );
        let c = check("remote pairing show", &[], Some(200), false).unwrap();
        assert_eq!((c.spec.name, c.timeout_ms), ("remote pairing show", 200));
        let c = check("echo", &words(&["hello", "world"]), None, false).unwrap();
        assert_eq!((c.line.as_str(), c.args.len()), ("echo hello world", 2));
        let c = check("sleep 250", &[], Some(1_000), false).unwrap();
        assert_eq!(
            (c.line.as_str(), c.args.clone()),
            ("sleep 250", words(&["250"]))
        );
        assert!(!c.allow_dangerous);
    }

    #[test]
    fn anything_else_is_refused() {
        assert!(matches!(
            check("rm -rf /", &[], None, true),
            Err(Refusal::NotAllowed(_))
        ));
        assert!(matches!(
            check("remote", &[], None, false),
            Err(Refusal::NotAllowed(_))
        ));
        assert!(matches!(
            check("", &[], None, false),
            Err(Refusal::NotAllowed(_))
        ));
        assert!(matches!(
            check("version", &words(&["x"]), None, false),
            Err(Refusal::Args(_))
        ));
        assert!(matches!(
            check("echo", &words(&["a b"]), None, false),
            Err(Refusal::Args(_))
        ));
        assert!(matches!(
            check("echo", &words(&["\u{7}"]), None, false),
            Err(Refusal::Args(_))
        ));
        assert!(matches!(
            check("echo", &words(&[""]), None, false),
            Err(Refusal::Args(_))
        ));
        let many = vec!["w".to_string(); 65];
        assert!(matches!(
            check("echo", &many, None, false),
            Err(Refusal::Args(_))
        ));
        assert!(matches!(
            check("echo é", &[], None, false),
            Err(Refusal::Args(_))
        ));
        for bad in [
            "sleep",
            "sleep -1",
            "sleep 1.5",
            "sleep 60001",
            "sleep 1 2",
            "sleep 0x10",
        ] {
            assert!(
                matches!(check(bad, &[], None, false), Err(Refusal::Args(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn timeouts_are_bounded_per_command() {
        assert!(matches!(
            check("version", &[], Some(99), false),
            Err(Refusal::Timeout(_))
        ));
        assert!(matches!(
            check("version", &[], Some(10_001), false),
            Err(Refusal::Timeout(_))
        ));
        assert!(matches!(
            check("version", &[], Some(-5), false),
            Err(Refusal::Timeout(_))
        ));
        assert_eq!(
            check("sleep 100", &[], Some(70_000), false)
                .unwrap()
                .timeout_ms,
            70_000
        );
    }

    #[test]
    fn dangerous_commands_need_development_mode() {
        assert_eq!(
            check("factory-reset", &[], None, false),
            Err(Refusal::Dangerous("factory-reset"))
        );
        let c = check("factory-reset", &[], None, true).unwrap();
        assert!(c.allow_dangerous);
        // The flag goes only with the dangerous command itself.
        assert!(!check("version", &[], None, true).unwrap().allow_dangerous);
    }
}
