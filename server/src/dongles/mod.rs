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
//! - [`tokens`]: a dongle's verdict on its token, and tokens handed to a connecting agent.
//! - [`owned`]: a dongle its owner acts on, and how agent failures are answered.

mod access;
pub mod owned;
pub mod pairing;
pub mod tokens;
pub mod unpair;
pub mod views;

pub use owned::{
    OwnedDongle, announces_can_fd, dongle_request_error, owned, owned_or_404, reply_reason,
    serving_agent,
};
pub use pairing::{MAX_STARTS_PER_HOUR, MAX_WRONG_PINS, Paired, PairingStarted, start, submit};
pub use tokens::{hand_out_tokens, token_accepted, token_rejected};
pub use unpair::{Unpaired, unpair};
pub use views::{DongleView, find, list};
