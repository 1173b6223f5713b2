//! The closed list of error codes the API answers with (SPEC 3.1).
//!
//! It sits at the bottom of the crate so that a domain error can say which code it is (the audit log
//! records it) without knowing anything of HTTP; [`crate::http`] gives each code its status and the
//! shape of the answer.

use serde::Serialize;
use utoipa::ToSchema;

/// Every error code the API answers with. The codes of later features are already here so that the
/// OpenAPI document and clients see one closed list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ErrorCode {
    AuthInvalidCredentials,
    AuthSessionExpired,
    AuthRequired,
    Forbidden,
    CsrfInvalid,
    /// The account's email address is not confirmed yet: it may look around, but not register agents
    /// or pair dongles.
    EmailNotVerified,
    RateLimited,
    ValidationError,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    DongleNotFound,
    DongleOwnedByOther,
    PairingPinInvalid,
    PairingExpired,
    PairingSecurityHold,
    AgentOffline,
    /// The agent reached the dongle but it did not answer in time (CAN config, a frame to send).
    DongleTimeout,
    /// The dongle refused a CAN configuration that passed the server's checks (a NACK).
    CanConfigRejected,
    /// The dongle refused to transmit a frame.
    CanSendRejected,
    CommandNotAllowed,
    Conflict,
    /// `/readyz`: the database is unreachable or not migrated.
    NotReady,
    /// The database is unreachable for now (stopped, restarting, out of connections): try again.
    ServiceUnavailable,
    InternalError,
}

impl ErrorCode {
    /// A neutral message for answers that have no better one.
    pub fn default_message(self) -> &'static str {
        match self {
            Self::AuthInvalidCredentials => "The email or password is wrong.",
            Self::AuthSessionExpired => "The session has expired: log in again.",
            Self::AuthRequired => "Log in first.",
            Self::Forbidden => "This action is not allowed.",
            Self::CsrfInvalid => {
                "The X-CSRF-Token header is missing or does not match the session."
            }
            Self::EmailNotVerified => {
                "Confirm your email address first, with the link mailed to you at signup; if it has \
                 expired, ask for a password reset: its link confirms the address too."
            }
            Self::RateLimited => "Too many attempts: wait before trying again.",
            Self::ValidationError => "The request is not valid.",
            Self::NotFound => "Not found.",
            Self::MethodNotAllowed => "This method is not allowed on this path.",
            Self::PayloadTooLarge => "The request body is too large.",
            Self::UnsupportedMediaType => {
                "Send the body as JSON with `Content-Type: application/json`."
            }
            Self::DongleNotFound => "Dongle not found.",
            Self::DongleOwnedByOther => "This dongle belongs to another account.",
            Self::PairingPinInvalid => "The PIN is wrong.",
            Self::PairingExpired => "The pairing has expired.",
            Self::PairingSecurityHold => "The dongle is on security hold.",
            Self::AgentOffline => "The agent serving this dongle is offline.",
            Self::DongleTimeout => "The dongle did not answer in time.",
            Self::CanConfigRejected => "The dongle refused this CAN configuration.",
            Self::CanSendRejected => "The dongle refused to send this frame.",
            Self::CommandNotAllowed => "This command is not allowed.",
            Self::Conflict => "The request conflicts with the current state.",
            Self::NotReady => {
                "The server is not ready: its database is unreachable or not migrated."
            }
            Self::ServiceUnavailable => {
                "The server cannot reach its database right now: try again in a few seconds."
            }
            Self::InternalError => "Something went wrong on the server.",
        }
    }
}
