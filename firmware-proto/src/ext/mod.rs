//! The extensions of REMP v1: new message types that a dongle announces with a capability bit
//! ([`crate::caps`]). None of them changes an existing layout.
//!
//! | type | name       | capability              | module        |
//! |------|------------|-------------------------|---------------|
//! | 0x10 | CAN_BATCH  | [`crate::caps::CAN_BATCH`]    | [`batch`]     |
//! | 0x11 | BUS_STATUS | [`crate::caps::BUS_STATUS`]   | [`bus_status`] |
//! | 0x12 | FORGET     | [`crate::caps::FORGET_TOKEN`] | [`forget`]    |
//! | 0x13 | AUTH       | [`crate::caps::SESSION_AUTH`] | [`auth`], [`session`] |

pub mod auth;
pub mod batch;
pub mod bus_status;
pub mod forget;
pub mod session;

pub use auth::{AuthMessage, AuthStatus};
pub use batch::{Batch, BatchWriter, CanRecord, Records};
pub use bus_status::{BusState, BusStatus, BusStatusAction};
pub use forget::{Forget, ForgetAction, ForgetStatus};
pub use session::{Role, SessionMac};
