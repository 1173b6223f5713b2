//! What the simulator reports to its user (the library's event stream, the binary's log): the
//! dongle core's own [`Event`]s, and what only the simulator's runtime knows (its link, its replay,
//! its state file).

use std::path::PathBuf;

use dongle_core::Event;
use firmware_proto::ids::{DeviceId, Pin};

/// Something the simulator reports to its user.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SimEvent {
    /// The dongle shows a PIN: a pairing window opened. This stands for the dongle's display.
    Pin {
        /// The dongle.
        device_id: DeviceId,
        /// The PIN (its `Debug` is redacted; use `as_str`).
        pin: Pin,
        /// Seconds the window stays open.
        seconds: u16,
    },
    /// The right PIN arrived: the dongle stores the token.
    Paired,
    /// A wrong PIN.
    InvalidPin {
        /// Wrong PINs still allowed.
        attempts_left: u8,
    },
    /// Too many wrong PINs.
    Cooldown {
        /// Seconds of cool-down.
        seconds: u16,
    },
    /// The pairing window closed without a pairing.
    PairingExpired,
    /// A packet without the right token or MAC was refused.
    AuthRefused {
        /// Its REMP type.
        msg_type: u8,
    },
    /// A sealed packet with an old seq was refused.
    ReplayRefused {
        /// The seq it carried.
        seq: u32,
    },
    /// A session handshake completed.
    SessionEstablished,
    /// A CAN configuration was applied.
    ConfigApplied {
        /// The effective bitrate.
        bitrate: u32,
    },
    /// A CAN configuration was refused.
    ConfigRefused {
        /// Why.
        reason: String,
    },
    /// The host made the dongle forget its token.
    TokenForgotten,
    /// Token, pairing state and configuration were erased.
    FactoryReset,
    /// A command typed on the UART console ran (what its console shows).
    UartAnswered {
        /// The exit code.
        exit_code: u16,
        /// The output (cut as the report was).
        output: String,
        /// Whether it was reported to the host (only a claimed dongle reports).
        reported: bool,
    },
    /// The link went away (USB unplugged, or UDP silent).
    Unplugged,
    /// The link is up (again).
    Plugged {
        /// The new pseudo-terminal path, on serial.
        serial_path: Option<PathBuf>,
    },
    /// The replay log was played to its end.
    ReplayFinished {
        /// Frames played.
        frames: usize,
        /// Remote frames skipped.
        skipped_remote: usize,
    },
    /// Writing the state file failed.
    FlashWriteFailed {
        /// The error.
        error: String,
    },
}

impl From<Event> for SimEvent {
    fn from(event: Event) -> Self {
        match event {
            Event::Pin {
                device_id,
                pin,
                seconds,
            } => SimEvent::Pin {
                device_id,
                pin,
                seconds,
            },
            Event::Paired => SimEvent::Paired,
            Event::InvalidPin { attempts_left } => SimEvent::InvalidPin { attempts_left },
            Event::Cooldown { seconds } => SimEvent::Cooldown { seconds },
            Event::PairingExpired => SimEvent::PairingExpired,
            Event::AuthRefused { msg_type } => SimEvent::AuthRefused { msg_type },
            Event::ReplayRefused { seq } => SimEvent::ReplayRefused { seq },
            Event::SessionEstablished => SimEvent::SessionEstablished,
            Event::ConfigApplied { bitrate } => SimEvent::ConfigApplied { bitrate },
            Event::ConfigRefused { reason } => SimEvent::ConfigRefused { reason },
            Event::TokenForgotten => SimEvent::TokenForgotten,
            Event::FactoryReset => SimEvent::FactoryReset,
            Event::UartAnswered {
                exit_code,
                output,
                reported,
            } => SimEvent::UartAnswered {
                exit_code,
                output,
                reported,
            },
        }
    }
}
