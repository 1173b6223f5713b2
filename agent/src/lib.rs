//! The bridge agent: finds CAN dongles on USB serial and on the LAN, speaks firmware-proto to them,
//! and bridges them to the server.
//!
//! # Layout
//! Data flows one way: transport -> session -> the daemon's services.
//! - [`transport`]: the only code that does I/O on dongles; serial ports, byte streams and the shared
//!   UDP socket, each turned into a [`transport::Link`] of whole packets.
//! - [`frame`]: [`frame::Frame`], one CAN or CAN FD frame as the agent moves it.
//! - [`session`]: [`session::DongleSession`], typed requests and answers with one dongle.
//! - [`bus_pace`]: the pace of frames to a dongle, no faster than its bus carries them.
//! - [`discovery`]: which serial ports and LAN interfaces may carry dongles, and one scan of both.
//! - [`dongles`]: the dongles served, one session each, kept current as they come and go.
//! - [`endpoints`]: local CAN endpoints (SocketCAN, slcan, socketcand) that stand in for dongles.
//! - [`uplink`]: the link to the server: TLS, the JSON API, the control WebSocket, reconnect delays.
//! - [`daemon`]: `bridge-agent run`: the dongles, the server link and the requests between them.
//! - [`journal`]: the commands the agent accepted, until the server has their results.
//! - [`home`]: the agent's folder: credentials, vault and journal.
//! - [`cli`]: the technician's commands, thin shells over the rest.
//! - [`vault`]: dongle tokens on disk, encrypted with AES-256-GCM.
pub mod bus_pace;
pub mod cli;
pub mod daemon;
pub mod discovery;
pub mod dongles;
pub mod endpoints;
pub mod frame;
pub mod home;
pub mod journal;
pub mod platform;
pub mod session;
pub mod transport;
pub mod uplink;
pub mod vault;
