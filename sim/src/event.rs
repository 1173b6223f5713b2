//! What the simulator reports to its user (the library's event stream, the binary's log): what the
//! dongle core shows ([`Event`], the PIN among them), and what only the simulator's runtime knows (its
//! link, its replay, its state file).

use std::path::PathBuf;

use dongle_core::Event;

/// Something the simulator reports to its user.
// The dongle's events are as large as the console text one carries (256 bytes and a little more:
// the core has no heap to box it in); the simulator's event buffer of [`crate::sim::EVENT_BUFFER`]
// slots is that size per slot (an estimate from the types, not a measurement).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SimEvent {
    /// What the dongle shows on its display or log: the PIN, pairing, refusals, configurations,
    /// resets, UART commands.
    Dongle(Event),
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
        SimEvent::Dongle(event)
    }
}
