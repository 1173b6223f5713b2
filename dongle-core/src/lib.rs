//! The dongle's behaviour, with no I/O: written once, run by the simulator on a workstation and by
//! the firmware on a board.
//!
//! A host (the simulator's runtime, or a firmware's main loop) owns a [`Dongle`], feeds it decoded
//! link packets, bus frames, typed UART commands and the passing of time, and carries out the
//! [`Output`]s it hands over: packets to the host, frames to the bus, events for the dongle's display
//! or log, and "the flash changed". Time and randomness come from the host ([`time::Instant`],
//! a [`rand::Rng`] of its choice), so that the same code runs under tokio's paused clock in tests and
//! on SysTick on a board.
//!
//! The crate is `no_std` and allocates nothing: a packet is a buffer of the protocol's packet size,
//! text has a capacity fixed at compile time ([`text`]), and outputs go one at a time to whatever
//! the host gives as [`dongle::Outputs`] (a `Vec` in the simulator; on a board, a driver that carries
//! each out at once), so a firmware needs no heap and its RAM use is known when it links.
//!
//! # Layout
//! - [`dongle`]: the core: a link packet in, answers, frames and events out.
//! - [`pairing`]: the pairing window, PIN check, attempt counting and cool-down.
//! - [`timing`]: CAN bit timing checks and derivation.
//! - [`cli`]: the allow-listed CLI commands.
//! - [`flash`]: what the dongle keeps across a restart, and its fixed binary image.
//! - [`frame`]: an owned CAN/CAN FD frame and its candump text form.
//! - [`time`]: what the core asks of the host's clock.
//! - [`text`]: text of bounded size.
//! - [`board`]: a firmware's main loop over a byte-stream link ([`board::StreamHost`]) and what it
//!   asks of its [`board::Board`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// Only the tests and the `alloc` feature (a `Vec` as the outputs' sink, for hosts with a heap)
// touch the heap; the core's own code does not.
#[cfg(any(test, feature = "alloc"))]
extern crate alloc;

pub mod board;
pub mod cli;
pub mod dongle;
pub mod flash;
pub mod frame;
pub mod pairing;
pub mod text;
pub mod time;
pub mod timing;

pub use dongle::{
    Counters, Deferred, Dongle, DongleConfig, Event, Extensions, Output, Outputs, PacketBuf,
};
pub use flash::Flash;
pub use frame::Frame;
