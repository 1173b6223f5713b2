//! The replies the daemon answers the server's requests with, and how a dongle session's failure reads
//! as one; shared by the request paths of dongles, local endpoints and the workstation.

use control_proto::{ReplyError, ReplyErrorCode, ReplyOk, ReplyResult};

use crate::session::SessionError;

pub(super) fn error(code: ReplyErrorCode, message: impl Into<String>) -> ReplyResult {
    ReplyResult::Error(ReplyError {
        code,
        message: message.into(),
    })
}

pub(super) fn ok(body: ReplyOk) -> ReplyResult {
    ReplyResult::Ok { body }
}

/// A session error as the reply's error: a timeout or a closed link is the dongle's silence, anything
/// else the agent's own failure.
pub(super) fn session_error(e: SessionError) -> ReplyResult {
    let code = match e {
        SessionError::Timeout { .. } => ReplyErrorCode::DongleTimeout,
        SessionError::Closed => ReplyErrorCode::UnknownDevice,
        SessionError::Unsupported(_) => ReplyErrorCode::Unsupported,
        SessionError::NoToken(_) | SessionError::AuthRefused(_) => ReplyErrorCode::Refused,
        _ => ReplyErrorCode::Internal,
    };
    error(code, e.to_string())
}
