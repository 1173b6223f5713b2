//! The parts of a whole running system, as the demo (`bridge-demo`), the benchmarks (`bridge-bench`)
//! and the dashboard's browser tests (`bridge-server`'s `web_*` tests) start them:
//!
//! - [`DonglePart`]: a simulated dongle on its own virtual CAN bus, on a pseudo-terminal (as if
//!   plugged into USB) or on UDP (as if on the LAN);
//! - [`AgentPart`]: the agent daemon as a workstation runs it, with its own folder and credentials;
//! - [`UserClient`] and [`pair`]: a technician using the JSON API, pairing a dongle with the PIN it
//!   shows;
//! - [`nats`]: a throwaway `nats-server` with JetStream (one node or a cluster) for a server whose
//!   relay buffers on NATS (`serve --nats-url`).
//!
//! Each caller starts its own server (the demo and the benchmarks on an embedded PostgreSQL, the
//! browser tests on the test's database), so the server is not a part here; see the crate's manifest
//! for why.

mod agent;
mod dongle;
pub mod nats;
mod user;

pub use agent::AgentPart;
pub use dongle::{DonglePart, next_pin};
pub use user::{UserClient, pair, wait_dongle};
