//! A software CAN dongle that behaves as the dongle firmware does.
//!
//! Start one inside a test with [`Simulator::start`], talk to it through its pseudo-terminal
//! or UDP socket with the `firmware-proto` codec, and control it (unplug, replug, factory
//! reset, faults) through the returned [`SimHandle`]. The binary `dongle-sim` is a thin
//! command line over the same library.
//!
//! # Layout
//! - [`dongle`]: the core: a link packet in, answers, frames and events out; no I/O.
//! - [`pairing`]: the pairing window, PIN check, attempt counting and cool-down.
//! - [`timing`]: CAN bit timing checks and derivation.
//! - [`cli`]: the allow-listed CLI commands.
//! - [`state`]: the "flash", a JSON state file written atomically.
//! - [`frame`]: an owned CAN/CAN FD frame and its candump text form.
//! - [`bus`]: the virtual CAN bus over Unix datagram sockets, and [`BusTap`].
//! - [`traffic`]: the frame generator and `candump -L` replay.
//! - [`faults`]: fault injection on the link.
//! - [`link`]: the transports, a pseudo-terminal and UDP.
//! - [`sim`]: the runtime that ties them together ([`Simulator`], [`SimHandle`]).
// One `unsafe` block exists: registering the pseudo-terminal's owned descriptor with tokio
// (`link::pty`), which tokio marks unsafe; everything else is safe code.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bus;
pub mod cli;
pub mod dongle;
pub mod faults;
pub mod frame;
pub mod link;
pub mod pairing;
mod shared;
pub mod sim;
pub mod state;
pub mod timing;
pub mod traffic;

pub use bus::BusTap;
pub use dongle::{Counters, Extensions, SimEvent};
pub use faults::Faults;
pub use frame::Frame;
pub use sim::{LinkConfig, SimConfig, SimError, SimHandle, SimStats, Simulator};
pub use state::Flash;
