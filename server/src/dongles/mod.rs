//! Dongles and pairing (SPEC 3.4): what a caller may see, the pairing state machine with its limits and
//! holds, unpair and force-unpair.
//!
//! Ownership changes only here, and only through pairing (on the dongle's ok), unpair and admin
//! force-unpair; device reports never touch it. Each pairing step holds the dongle's pairing lease
//! across the agent's round trip, so two racing submits are serialised: the first correct one makes
//! the owner, and the second then finds the dongle owned.
//!
//! - [`views`]: what a caller may see of dongles.
//! - [`access`]: a dongle's row locked, who sees it, and the caller's standing with it.
//! - [`pairing`]: the pairing state machine: start and submit, their limits and holds.
//! - [`unpair`]: unpair and admin force-unpair.
//! - [`holds`]: the accounts held from pairing a dongle, released by an administrator.
//! - [`tokens`]: a dongle's verdict on its token, and tokens handed to a connecting agent.
//! - [`owned`]: a dongle its owner acts on, and the agent that serves it.
//! - [`error`]: why an operation on a dongle did not happen, and how an agent's failure reads.
//!
//! These operations take [`Services`], the few parts of the server they use, rather than the whole
//! application state; the routes map their [`DongleError`] to the API's answers.

mod access;
pub mod error;
pub mod holds;
pub mod owned;
pub mod pairing;
pub mod tokens;
pub mod unpair;
pub mod views;

pub use error::{DongleError, reply_reason};
pub use owned::{OwnedDongle, announces_can_fd, owned, owned_or_404, serving_agent};
pub use pairing::{MAX_STARTS_PER_HOUR, MAX_WRONG_PINS, Paired, PairingStarted, start, submit};
pub use tokens::{hand_out_tokens, token_accepted, token_rejected};
pub use unpair::{Unpaired, unpair};
pub use views::{DongleView, find, list};

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::agents::hub::AgentHub;
use crate::console::Console;
use crate::dongle_tokens::KeyRing;
use crate::groups::relay::Relay;
use crate::rate_limit::RateLimits;

/// What the operations on a dongle (pairing, unpair, CAN configuration, frames sent by hand, host diagnostics) use of the
/// server: its database, its agents, the dongle keys, the relay, the console and a few settings.
#[derive(Clone, Copy)]
pub struct Services<'a> {
    pub pool: &'a PgPool,
    pub hub: &'a Arc<AgentHub>,
    pub keys: &'a KeyRing,
    pub relay: &'a Relay,
    pub console: &'a Console,
    /// How long an agent has to answer a request.
    pub agent_request_timeout: Duration,
    /// How long a dongle has to answer a request through its agent (a CAN configuration, a frame).
    pub dongle_request_timeout: Duration,
    /// How long a pairing window stays open.
    pub pairing_window: Duration,
    pub rate_limits: &'a RateLimits,
    /// The most output of a command kept in a dongle's history.
    pub command_output_cap: usize,
}
