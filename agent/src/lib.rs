//! The bridge agent: finds CAN dongles on USB serial and on the LAN, speaks firmware-proto to them,
//! and bridges them to the server.
//!
//! # Layout
//! Data flows one way: transport -> session -> the daemon's services.
//! - [`transport`]: the only code that does I/O on dongles; serial ports, byte streams and the shared
//!   UDP socket, each turned into a [`transport::Link`] of whole packets.
//! - [`session`]: [`session::DongleSession`], typed requests and answers with one dongle.
//! - [`discovery`]: which serial ports and LAN interfaces may carry dongles, and one scan of both.
//! - [`dongles`]: the dongles served, one session each, kept current as they come and go.
//! - [`cli`]: the technician's commands, thin shells over the rest.
//! - [`vault`]: dongle tokens on disk, encrypted with AES-256-GCM.
pub mod cli;
pub mod discovery;
pub mod dongles;
pub mod session;
pub mod transport;
pub mod vault;
