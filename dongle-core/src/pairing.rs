//! The dongle's side of pairing: the window, the PIN check, attempt counting and cool-down.
//!
//! Pure state over the host's [`Instant`], given the time and the random values by its caller,
//! so that tests can drive it through any sequence of events without waiting.
//!
//! - `start` opens a window (default 120 s) with a fresh PIN and nonce. A start while a window
//!   is open replaces it, with a new PIN, a new nonce and a fresh attempt count, as "5 wrong
//!   PINs in one pairing window" reads. A claimed dongle refuses to start (error); so does one
//!   in cool-down (cooldown, with the seconds left).
//! - `submit` checks the nonce, then the PIN in constant time. A wrong PIN is counted; the
//!   fifth in one window closes the window and starts a 5 minute cool-down, and is answered
//!   cooldown (not invalid_pin) with the cool-down seconds. A wrong nonce or no open window is
//!   an error and is not counted as a PIN attempt.
//! - A window expires on its own; the caller notices through `poll_expired`.

use core::time::Duration;

use firmware_proto::ids::Pin;

use crate::time::{Instant, since};

/// The default pairing window.
pub const WINDOW: Duration = Duration::from_secs(120);
/// The default cool-down after too many wrong PINs.
pub const COOLDOWN: Duration = Duration::from_secs(300);
/// Wrong PINs allowed in one window before the cool-down.
pub const MAX_WRONG_PINS: u8 = 5;

/// An open pairing window.
#[derive(Clone, Debug)]
struct Window<I> {
    pin: Pin,
    nonce: [u8; 16],
    expires: I,
    wrong: u8,
}

/// The answer to a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// The window is open for `seconds` with this nonce.
    Opened {
        /// Seconds the window stays open.
        seconds: u16,
        /// The window's nonce.
        nonce: [u8; 16],
    },
    /// The dongle is cooling down for `seconds` more.
    Cooldown {
        /// Seconds left.
        seconds: u16,
    },
    /// The dongle is claimed and refuses to pair.
    Claimed,
}

/// The answer to a submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// The PIN was right: store the token.
    Paired,
    /// The PIN was wrong; `attempts_left` before the cool-down.
    InvalidPin {
        /// Wrong PINs still allowed in this window.
        attempts_left: u8,
    },
    /// Too many wrong PINs: cooling down for `seconds`.
    Cooldown {
        /// Seconds left.
        seconds: u16,
    },
    /// No window, an expired window, a wrong nonce, or a claimed dongle.
    Error(&'static str),
}

/// The pairing state machine.
#[derive(Clone, Debug)]
pub struct Pairing<I> {
    window: Option<Window<I>>,
    cooldown_until: Option<I>,
    window_len: Duration,
    cooldown_len: Duration,
}

fn seconds(d: Duration) -> u16 {
    // Round up so that "1 second left" is never shown as 0 while it still holds.
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u16::try_from(secs).unwrap_or(u16::MAX)
}

impl<I: Instant> Pairing<I> {
    /// A machine with the given window and cool-down lengths.
    pub fn new(window_len: Duration, cooldown_len: Duration) -> Self {
        Self {
            window: None,
            cooldown_until: None,
            window_len,
            cooldown_len,
        }
    }

    /// Restores a cool-down read from flash.
    pub fn set_cooldown_until(&mut self, until: Option<I>) {
        self.cooldown_until = until;
    }

    /// When the current cool-down ends, if one is running at `now`.
    pub fn cooldown_until(&self, now: I) -> Option<I> {
        self.cooldown_until.filter(|&t| t > now)
    }

    /// Whether a window is open at `now` (its PIN and nonce).
    pub fn open_window(&self, now: I) -> Option<(Pin, [u8; 16])> {
        self.window
            .as_ref()
            .filter(|w| w.expires > now)
            .map(|w| (w.pin, w.nonce))
    }

    /// Seconds left in the open window.
    pub fn window_seconds_left(&self, now: I) -> Option<u16> {
        self.window
            .as_ref()
            .filter(|w| w.expires > now)
            .map(|w| seconds(since(w.expires, now)))
    }

    /// Wrong PINs so far in the open window.
    pub fn wrong_attempts(&self) -> u8 {
        self.window.as_ref().map_or(0, |w| w.wrong)
    }

    /// Opens a window with `pin` and `nonce` (drawn by the caller).
    pub fn start(&mut self, now: I, claimed: bool, pin: Pin, nonce: [u8; 16]) -> StartOutcome {
        if claimed {
            return StartOutcome::Claimed;
        }
        if let Some(until) = self.cooldown_until(now) {
            return StartOutcome::Cooldown {
                seconds: seconds(since(until, now)),
            };
        }
        self.window = Some(Window {
            pin,
            nonce,
            expires: now + self.window_len,
            wrong: 0,
        });
        StartOutcome::Opened {
            seconds: seconds(self.window_len),
            nonce,
        }
    }

    /// Checks a submitted PIN and nonce.
    pub fn submit(&mut self, now: I, claimed: bool, pin: &Pin, nonce: &[u8; 16]) -> SubmitOutcome {
        if let Some(until) = self.cooldown_until(now) {
            return SubmitOutcome::Cooldown {
                seconds: seconds(since(until, now)),
            };
        }
        if claimed {
            return SubmitOutcome::Error("already claimed");
        }
        let Some(window) = self.window.as_mut().filter(|w| w.expires > now) else {
            return SubmitOutcome::Error("no pairing window open");
        };
        // The nonce is public (it is in the ANNOUNCE), so a plain comparison leaks nothing.
        if &window.nonce != nonce {
            return SubmitOutcome::Error("nonce does not match the window");
        }
        if window.pin.ct_eq(pin) {
            self.window = None;
            return SubmitOutcome::Paired;
        }
        window.wrong += 1;
        if window.wrong >= MAX_WRONG_PINS {
            self.window = None;
            self.cooldown_until = Some(now + self.cooldown_len);
            return SubmitOutcome::Cooldown {
                seconds: seconds(self.cooldown_len),
            };
        }
        SubmitOutcome::InvalidPin {
            attempts_left: MAX_WRONG_PINS - window.wrong,
        }
    }

    /// Closes an expired window; returns true once when it did.
    pub fn poll_expired(&mut self, now: I) -> bool {
        if self.window.as_ref().is_some_and(|w| w.expires <= now) {
            self.window = None;
            return true;
        }
        false
    }

    /// Forgets the window and the cool-down (factory reset).
    pub fn reset(&mut self) {
        self.window = None;
        self.cooldown_until = None;
    }

    /// Closes the window but keeps the cool-down (power cycle: the window lives in RAM, the
    /// cool-down in flash).
    pub fn power_cycle(&mut self) {
        self.window = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn pin(s: &str) -> Pin {
        Pin::parse(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn right_pin_pairs_once() {
        let mut p = Pairing::new(WINDOW, COOLDOWN);
        let now = Instant::now();
        assert_eq!(
            p.start(now, false, pin("123456"), [1; 16]),
            StartOutcome::Opened {
                seconds: 120,
                nonce: [1; 16]
            }
        );
        assert_eq!(
            p.submit(now, false, &pin("123456"), &[2; 16]),
            SubmitOutcome::Error("nonce does not match the window")
        );
        assert_eq!(
            p.submit(now, false, &pin("123456"), &[1; 16]),
            SubmitOutcome::Paired
        );
        assert!(p.open_window(now).is_none());
        assert_eq!(
            p.start(now, true, pin("000000"), [3; 16]),
            StartOutcome::Claimed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn five_wrong_pins_cool_down() {
        let mut p = Pairing::new(WINDOW, COOLDOWN);
        let now = Instant::now();
        p.start(now, false, pin("123456"), [1; 16]);
        for left in (1..5).rev() {
            assert_eq!(
                p.submit(now, false, &pin("000000"), &[1; 16]),
                SubmitOutcome::InvalidPin {
                    attempts_left: left
                }
            );
        }
        assert_eq!(
            p.submit(now, false, &pin("000000"), &[1; 16]),
            SubmitOutcome::Cooldown { seconds: 300 }
        );
        let later = now + Duration::from_secs(100);
        assert_eq!(
            p.start(later, false, pin("111111"), [2; 16]),
            StartOutcome::Cooldown { seconds: 200 }
        );
        assert_eq!(
            p.submit(later, false, &pin("123456"), &[1; 16]),
            SubmitOutcome::Cooldown { seconds: 200 }
        );
        let after = now + Duration::from_secs(301);
        assert!(matches!(
            p.start(after, false, pin("111111"), [2; 16]),
            StartOutcome::Opened { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn window_expires() {
        let mut p = Pairing::new(WINDOW, COOLDOWN);
        let now = Instant::now();
        p.start(now, false, pin("123456"), [1; 16]);
        assert_eq!(
            p.window_seconds_left(now + Duration::from_millis(500)),
            Some(120)
        );
        assert!(!p.poll_expired(now + Duration::from_secs(119)));
        let late = now + Duration::from_secs(120);
        assert_eq!(
            p.submit(late, false, &pin("123456"), &[1; 16]),
            SubmitOutcome::Error("no pairing window open")
        );
        assert!(p.poll_expired(late));
        assert!(!p.poll_expired(late));
    }
}
