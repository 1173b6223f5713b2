//! Why an operation on a dongle did not happen, in the domain's terms. Each error's message is the one a
//! user reads (it says what to do); [`DongleError::code`] names the API's code for it, which the audit
//! log records, and the routes give it its HTTP shape.

use control_proto::ReplyErrorCode;

use crate::agents::hub::RequestError;
use crate::error_code::ErrorCode;
use crate::rate_limit::LimitError;

#[derive(Debug, thiserror::Error)]
pub enum DongleError {
    /// The dongle does not exist, or the caller may not know of it.
    #[error("Dongle not found.")]
    NotFound,
    /// Nothing has this id (as an administrator is told).
    #[error("Not found.")]
    NoSuchDongle,
    /// The caller's own agent sees a dongle that another account owns.
    #[error("This dongle belongs to another account.")]
    OwnedByOther,
    /// The dongle is on security hold.
    #[error("The dongle is on security hold.")]
    SecurityHold,
    /// The dongle is on security hold, and only an administrator can clear it (its owner asked).
    #[error("The dongle is on security hold: only an administrator can clear it.")]
    SecurityHoldAdminOnly,
    /// Five wrong PINs of the caller's account put the dongle on hold for that account.
    #[error(
        "Five wrong PINs from this account put this dongle on hold for it: only an administrator \
         can clear the hold. Other accounts may still pair the dongle."
    )]
    AccountHeld,
    /// No agent of the caller's user that sees the dongle is connected.
    #[error("The agent serving this dongle is offline.")]
    AgentOffline,
    /// Another operation of the same kind holds the dongle's lease; the text says which.
    #[error("{0}")]
    Busy(&'static str),
    /// A field of the request is not valid; the message says what is wrong with it.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The request names something the dongle's owner may not run; the message says what may.
    #[error("{message}")]
    NotAllowed {
        field: &'static str,
        message: &'static str,
    },
    /// The dongle changed hands while its agent was asked.
    #[error("The dongle changed while its agent was asked: start again.")]
    ChangedMeanwhile,
    /// Another account has a pairing window open on the dongle.
    #[error(
        "A pairing window is open for another account on this dongle: try again when it ends \
         (two minutes at most)."
    )]
    OtherWindowOpen,
    /// The pairing session does not exist (for this dongle and caller).
    #[error("No such pairing session for this dongle.")]
    NoSuchSession,
    /// The pairing window ended (or the dongle left pairing mode).
    #[error("The pairing has expired.")]
    PairingExpired,
    /// The PIN is not six digits.
    #[error("The PIN is the 6 digits the dongle shows.")]
    PinMalformed,
    /// The dongle refused the PIN.
    #[error("The PIN is wrong.")]
    PinInvalid { attempts_left: i32 },
    /// The agent answered with a reply of another request kind; the text says which was asked.
    #[error("{0}")]
    UnexpectedReply(&'static str),
    /// A pairing step's request to the agent failed.
    #[error("{}", pairing_failure(.0).1)]
    PairingAgent(RequestError),
    /// A request to the dongle through its agent failed; a refusal by the dongle is `refused`.
    #[error("{}", request_failure(.error, *.refused).1)]
    Request {
        error: RequestError,
        refused: ErrorCode,
    },
    /// Too many requests of this kind.
    #[error(transparent)]
    Limited(#[from] LimitError),
    /// The dongle's token could not be sealed (a key problem); not the caller's fault.
    #[error("the dongle token could not be sealed: {0}")]
    Sealing(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl DongleError {
    /// The API's code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound => ErrorCode::DongleNotFound,
            Self::OwnedByOther => ErrorCode::DongleOwnedByOther,
            Self::SecurityHold | Self::SecurityHoldAdminOnly | Self::AccountHeld => {
                ErrorCode::PairingSecurityHold
            }
            Self::AgentOffline => ErrorCode::AgentOffline,
            Self::Busy(_)
            | Self::ChangedMeanwhile
            | Self::OtherWindowOpen
            | Self::UnexpectedReply(_) => ErrorCode::Conflict,
            Self::NoSuchSession | Self::NoSuchDongle => ErrorCode::NotFound,
            Self::NotAllowed { .. } => ErrorCode::CommandNotAllowed,
            Self::PairingExpired => ErrorCode::PairingExpired,
            Self::PinMalformed | Self::Invalid { .. } => ErrorCode::ValidationError,
            Self::PinInvalid { .. } => ErrorCode::PairingPinInvalid,
            Self::PairingAgent(e) => pairing_failure(e).0,
            Self::Request { error, refused } => request_failure(error, *refused).0,
            Self::Limited(LimitError::Exceeded { .. }) => ErrorCode::RateLimited,
            Self::Limited(LimitError::Database(_)) | Self::Sealing(_) | Self::Database(_) => {
                ErrorCode::InternalError
            }
        }
    }

    /// The reason the agent or the dongle gave, made safe to echo, when it refused.
    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Request {
                error: RequestError::Failed(e),
                ..
            } if !matches!(
                e.code,
                ReplyErrorCode::UnknownDevice
                    | ReplyErrorCode::DongleTimeout
                    | ReplyErrorCode::Unsupported
            ) =>
            {
                Some(reply_reason(&e.message))
            }
            _ => None,
        }
    }
}

/// How a pairing step's failed request to the agent is answered: an agent that does not answer, or no
/// longer reaches the dongle, is AGENT_OFFLINE; a dongle that left pairing mode, PAIRING_EXPIRED.
fn pairing_failure(e: &RequestError) -> (ErrorCode, &'static str) {
    match e {
        RequestError::Offline | RequestError::Timeout => (
            ErrorCode::AgentOffline,
            "The agent serving this dongle did not answer: check that it runs and sees the dongle.",
        ),
        RequestError::TooLarge { .. } => (
            ErrorCode::PayloadTooLarge,
            "The request is too large to hand to the server instance the agent is connected to.",
        ),
        RequestError::Failed(e) => match e.code {
            ReplyErrorCode::UnknownDevice | ReplyErrorCode::DongleTimeout => (
                ErrorCode::AgentOffline,
                "The agent no longer reaches this dongle.",
            ),
            ReplyErrorCode::Cooldown => (
                ErrorCode::Conflict,
                "The dongle is cooling down after wrong PINs: wait a few minutes and start again.",
            ),
            ReplyErrorCode::NotInPairingMode => {
                (ErrorCode::PairingExpired, "The pairing has expired.")
            }
            _ => (ErrorCode::Conflict, "The dongle refused the request."),
        },
    }
}

/// How a failed request to a dongle through its agent (CAN configuration, a frame, a host command) is
/// answered: offline agents and dongles the agent no longer reaches are AGENT_OFFLINE, no answer in time
/// is DONGLE_TIMEOUT, and the dongle's refusal is `refused`, with the dongle's reason beside it.
fn request_failure(e: &RequestError, refused: ErrorCode) -> (ErrorCode, &'static str) {
    match e {
        RequestError::Offline => (
            ErrorCode::AgentOffline,
            "The agent serving this dongle is not connected: check that it runs and sees the dongle.",
        ),
        RequestError::Timeout => (
            ErrorCode::DongleTimeout,
            "The dongle did not answer in time through its agent; nothing was changed.",
        ),
        RequestError::Failed(e) => match e.code {
            ReplyErrorCode::UnknownDevice => (
                ErrorCode::AgentOffline,
                "The agent no longer reaches this dongle.",
            ),
            ReplyErrorCode::DongleTimeout => (
                ErrorCode::DongleTimeout,
                "The dongle did not answer its agent in time; nothing was changed.",
            ),
            ReplyErrorCode::Refused => (refused, refused.default_message()),
            ReplyErrorCode::NotSettable => (
                refused,
                "This dongle is a local CAN endpoint that cannot apply this setting; nothing was \
                 changed. The reason says where it is set instead.",
            ),
            ReplyErrorCode::Unsupported => (
                ErrorCode::Conflict,
                "The agent serving this dongle does not support this request: update the agent.",
            ),
            _ => (
                ErrorCode::Conflict,
                "The agent could not carry out the request.",
            ),
        },
        RequestError::TooLarge { .. } => (
            ErrorCode::PayloadTooLarge,
            "The request is too large to relay to the agent's server instance.",
        ),
    }
}

/// A reason an agent or dongle gave, made safe to echo: printable characters only, at most 400.
pub fn reply_reason(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(400)
        .collect()
}
