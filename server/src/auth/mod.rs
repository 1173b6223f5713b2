//! Authentication: passwords, sessions, CSRF tokens, the secrets behind them, and the [`Caller`]
//! extractor that puts them together for handlers.

pub mod caller;
pub mod csrf;
pub mod email_token;
pub mod password;
pub mod session;
pub mod token;

pub use caller::{AdminUser, Caller, CurrentAgent, CurrentUser};
