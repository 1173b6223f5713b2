//! A software CAN dongle that behaves as the dongle firmware does.
//!
//! Start one inside a test with [`Simulator::start`], talk to it through its pseudo-terminal
//! or UDP socket with the `firmware-proto` codec, and control it (unplug, replug, factory
//! reset, faults) through the returned [`SimHandle`]. The binary `dongle-sim` is a thin
//! command line over the same library.
//!
//! # Layout
//! - [`dongle_core`] (re-exported as [`dongle`], [`pairing`], [`timing`], [`cli`] and [`frame`]): the
//!   dongle's behaviour without I/O, the same code the reference firmware runs.
//! - [`event`]: what the simulator reports: the core's events and its own.
//! - [`state`]: the "flash", a JSON state file written atomically.
//! - [`bus`]: the virtual CAN bus over Unix datagram sockets, and [`BusTap`].
//! - [`traffic`]: the frame generator and `candump -L` replay.
//! - [`transmitter`]: the dongle's transmit queue, emptied at the bus's bitrate.
//! - [`faults`]: fault injection on the link.
//! - [`link`]: the transports, a pseudo-terminal and UDP.
//! - [`sim`]: the runtime that ties them together ([`Simulator`], [`SimHandle`]).
// One `unsafe` block exists: registering the pseudo-terminal's owned descriptor with tokio
// (`link::pty`), which tokio marks unsafe; everything else is safe code.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bus;
pub mod event;
pub mod faults;
pub mod link;
mod shared;
pub mod sim;
pub mod state;
pub mod traffic;
pub mod transmitter;

pub use dongle_core::{cli, dongle, frame, pairing, timing};

pub use bus::BusTap;
pub use dongle_core::{Counters, Event, Extensions};
pub use event::SimEvent;
pub use faults::Faults;
pub use frame::Frame;
pub use sim::{LinkConfig, SimConfig, SimError, SimHandle, SimStats, Simulator};
pub use state::Flash;
