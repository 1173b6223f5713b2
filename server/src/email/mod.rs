//! Outgoing mail: the outbox table every message goes through, the worker that delivers it with retries,
//! and SMTP.
//!
//! Handlers never talk to SMTP: they add a row to `email_outbox` in their own transaction, and the worker
//! sends it later. Without SMTP configured, mail stays queued and `bridge-server outbox` shows it to a
//! developer. A sent (or given up) message's payload is scrubbed of its token and link.

pub mod outbox;
pub mod smtp;
pub mod templates;
pub mod worker;

pub use templates::Template;
