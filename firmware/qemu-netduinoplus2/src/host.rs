//! What the QEMU board learns from the machine it runs on, through semihosting: its settings (the
//! command line, given as `-semihosting-config enable=on,target=native,arg=dongle,arg=KEY=VALUE...`),
//! the wall clock, and entropy.
//!
//! A real board has option bytes, a real-time clock and an RNG peripheral for these; QEMU's
//! netduinoplus2 emulates none of them, so the emulator's host stands in. Without
//! `-semihosting-config enable=on` the first call faults: the board says so on its console first.
//!
//! Settings (unknown keys are reported on the console and ignored):
//! - `ext=` the REMP extensions, as the simulator's `--extensions` (`none`, `all`, or a list);
//! - `device-id=` 16 hex digits (default `f405` followed by zeros);
//! - `window-ms=`, `cooldown-ms=`, `cli-timeout-ms=` the pairing window, cool-down and CLI limit;
//! - `seed=` 64 hex digits for the random generator (PINs and nonces). Without it the seed mixes the
//!   host's clock and the board's timer, which is not secret: tests pass a seed from the host's
//!   generator.

use core::time::Duration;

use cortex_m_semihosting::nr;
use dongle_core::dongle::FW_BUILD_LEN;
use dongle_core::text::{Text, bounded, utf8_prefix};
use dongle_core::{DongleConfig, Extensions};
use firmware_proto::ids::DeviceId;

/// The longest command line semihosting hands over.
const COMMAND_LINE_LEN: usize = 256;
/// How many words the console reports as not understood (the rest are only counted).
const MAX_REJECTED: usize = 8;

/// What the command line set.
pub struct Settings {
    /// The dongle's configuration.
    pub dongle: DongleConfig,
    /// Its device id.
    pub device_id: DeviceId,
    /// The random generator's seed, when given.
    pub seed: Option<[u8; 32]>,
    /// Words that were not understood, to report on the console (the first [`MAX_REJECTED`], each
    /// cut at 32 bytes).
    pub rejected: heapless::Vec<Text<32>, MAX_REJECTED>,
    /// Words not understood beyond those in `rejected`.
    pub more_rejected: usize,
    /// The command line could not be read (longer than 256 bytes, say): every setting is the default,
    /// the seed included, which the console must say.
    pub unreadable: bool,
}

/// The command line QEMU was given (`arg=` values joined by spaces), at most 256 bytes; None when
/// QEMU refused it (a longer line).
fn command_line() -> Option<Text<COMMAND_LINE_LEN>> {
    let mut buf = [0u8; COMMAND_LINE_LEN];
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    // SAFETY: SYS_GET_CMDLINE writes at most block[1] bytes into `buf` and the length it wrote into
    // block[1]; both outlive the call.
    let status =
        unsafe { cortex_m_semihosting::syscall1(nr::GET_CMDLINE, block.as_mut_ptr() as usize) };
    if status != 0 {
        return None;
    }
    // SAFETY: the host wrote block[1] during the call above.
    let len = unsafe { core::ptr::read_volatile(&block[1]) }.min(buf.len());
    Some(bounded(utf8_prefix(&buf[..len])))
}

/// Seconds since the Unix epoch on the emulator's host.
pub fn unix_seconds() -> u64 {
    // SAFETY: SYS_TIME takes no argument.
    let secs = unsafe { cortex_m_semihosting::syscall1(nr::TIME, 0) };
    secs as u64
}

fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok().map(|()| out)
}

/// Reads the settings from the command line; `fw_build` names this firmware.
pub fn settings(fw_build: Text<FW_BUILD_LEN>) -> Settings {
    let mut s = Settings {
        dongle: DongleConfig {
            fw_build,
            fw_build_number: dongle_core::dongle::FW_BUILD_NUMBER,
            extensions: Extensions::ALL,
            link: bounded("usart1 (qemu netduinoplus2)"),
            // The F405's bxCAN runs from APB1 at 42 MHz.
            can_clock_hz: 42_000_000,
            ..DongleConfig::default()
        },
        device_id: DeviceId([0xf4, 0x05, 0, 0, 0, 0, 0, 0]),
        seed: None,
        rejected: heapless::Vec::new(),
        more_rejected: 0,
        unreadable: false,
    };
    let Some(line) = command_line() else {
        s.unreadable = true;
        return s;
    };
    // The first word is the program's name.
    for word in line.split_whitespace().skip(1) {
        let ok = match word.split_once('=') {
            Some(("ext", list)) => Extensions::parse(list)
                .map(|e| s.dongle.extensions = e)
                .is_ok(),
            Some(("device-id", hex)) => parse_hex::<8>(hex)
                .map(|id| s.device_id = DeviceId(id))
                .is_some(),
            Some(("seed", hex)) => parse_hex::<32>(hex)
                .map(|seed| s.seed = Some(seed))
                .is_some(),
            Some((key @ ("window-ms" | "cooldown-ms" | "cli-timeout-ms"), ms)) => {
                match ms.parse::<u64>() {
                    Ok(ms) => {
                        let d = Duration::from_millis(ms);
                        match key {
                            "window-ms" => s.dongle.pairing_window = d,
                            "cooldown-ms" => s.dongle.cooldown = d,
                            _ => s.dongle.cli_timeout = d,
                        }
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        if !ok && s.rejected.push(bounded(word)).is_err() {
            s.more_rejected += 1;
        }
    }
    s
}
