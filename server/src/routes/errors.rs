//! How the domain's errors are answered: each module below the routes says what went wrong in its own
//! terms (and which API code that is); here each becomes the API's error, with its status, details and
//! `Retry-After`. Causes that are not the caller's (the database, a key) are logged once and answered
//! without detail.

use crate::commands::CommandError;
use crate::commands::allow_list::Refusal;
use crate::dongles::DongleError;
use crate::error_code::ErrorCode;
use crate::http::ApiError;
use crate::rate_limit::LimitError;

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::Exceeded { retry_after_secs } => ApiError::rate_limited(retry_after_secs),
            LimitError::Database(e) => e.into(),
        }
    }
}

impl From<DongleError> for ApiError {
    fn from(e: DongleError) -> Self {
        match e {
            DongleError::Database(e) => e.into(),
            DongleError::Limited(e) => e.into(),
            DongleError::Sealing(cause) => ApiError::internal(cause),
            DongleError::Invalid { field, message } => {
                ApiError::validation(message).with_detail("field", field)
            }
            DongleError::NotAllowed { field, .. } => {
                ApiError::new(e.code(), e.to_string()).with_detail("field", field)
            }
            DongleError::PinInvalid { attempts_left } => {
                ApiError::new(e.code(), e.to_string()).with_detail("attempts_left", attempts_left)
            }
            e => {
                let error = ApiError::new(e.code(), e.to_string());
                match e.reason() {
                    Some(reason) => error.with_detail("reason", reason),
                    None => error,
                }
            }
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Dongle(e) => e.into(),
            CommandError::Database(e) => e.into(),
            CommandError::Refused(ref refusal) => {
                let (code, field) = match refusal {
                    Refusal::NotAllowed(_) | Refusal::Dangerous(_) => {
                        (ErrorCode::CommandNotAllowed, "command")
                    }
                    Refusal::DangerousFlag => (ErrorCode::CommandNotAllowed, "allow_dangerous"),
                    Refusal::Args(_) => (ErrorCode::ValidationError, "args"),
                    Refusal::Timeout(_) => (ErrorCode::ValidationError, "timeout_ms"),
                };
                ApiError::new(code, e.to_string()).with_detail("field", field)
            }
            CommandError::TooManyUnfinished => ApiError::new(ErrorCode::Conflict, e.to_string()),
            CommandError::NoSuchCommand => ApiError::new(ErrorCode::NotFound, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;
    use control_proto::{ReplyError, ReplyErrorCode};
    use serde_json::Value;

    use super::*;
    use crate::agents::hub::RequestError;

    /// The status, body and `Retry-After` of the answer an error becomes.
    async fn answer(error: impl Into<ApiError>) -> (u16, Value, Option<String>) {
        let response = error.into().into_response();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap(), retry_after)
    }

    fn refused(code: ReplyErrorCode, message: &str) -> RequestError {
        RequestError::Failed(ReplyError {
            code,
            message: message.into(),
        })
    }

    #[tokio::test]
    async fn dongle_errors_keep_their_code_status_and_details() {
        let (status, body, _) = answer(DongleError::PinInvalid { attempts_left: 3 }).await;
        assert_eq!(
            (status, &body["code"]),
            (400, &Value::from("PAIRING_PIN_INVALID"))
        );
        assert_eq!(body["details"]["attempts_left"], 3);

        // The dongle's reason is echoed without its control characters.
        let (status, body, _) = answer(DongleError::Request {
            error: refused(ReplyErrorCode::Refused, "bus off\u{7}"),
            refused: ErrorCode::CanConfigRejected,
        })
        .await;
        assert_eq!(
            (status, &body["code"]),
            (422, &Value::from("CAN_CONFIG_REJECTED"))
        );
        assert_eq!(body["details"]["reason"], "bus off");

        let (status, body, _) = answer(DongleError::Request {
            error: RequestError::Timeout,
            refused: ErrorCode::CanSendRejected,
        })
        .await;
        assert_eq!(
            (status, &body["code"]),
            (504, &Value::from("DONGLE_TIMEOUT"))
        );
        assert!(body["details"].get("reason").is_none());

        // A pairing step's agent failures read differently from a configuration's.
        let (status, body, _) = answer(DongleError::PairingAgent(refused(
            ReplyErrorCode::NotInPairingMode,
            "",
        )))
        .await;
        assert_eq!(
            (status, &body["code"]),
            (410, &Value::from("PAIRING_EXPIRED"))
        );

        let (status, body, retry_after) = answer(DongleError::Limited(LimitError::Exceeded {
            retry_after_secs: 7,
        }))
        .await;
        assert_eq!((status, &body["code"]), (429, &Value::from("RATE_LIMITED")));
        assert_eq!(retry_after.as_deref(), Some("7"));
        assert_eq!(body["details"]["retry_after_seconds"], 7);

        let (status, body, _) = answer(DongleError::Invalid {
            field: "bitrate",
            message: "bitrate must be between 10000 and 1000000.".into(),
        })
        .await;
        assert_eq!(
            (status, &body["code"]),
            (400, &Value::from("VALIDATION_ERROR"))
        );
        assert_eq!(body["details"]["field"], "bitrate");

        let (status, body, _) = answer(DongleError::NotFound).await;
        assert_eq!(
            (status, &body["code"]),
            (404, &Value::from("DONGLE_NOT_FOUND"))
        );

        // A cause that is not the caller's is never shown to them.
        let (status, body, _) =
            answer(DongleError::Sealing("key version 2 is missing".into())).await;
        assert_eq!(
            (status, &body["code"]),
            (500, &Value::from("INTERNAL_ERROR"))
        );
        assert!(!body.to_string().contains("version 2"), "{body}");
    }

    #[tokio::test]
    async fn command_refusals_name_the_field_at_fault() {
        for (refusal, status, code, field) in [
            (
                Refusal::NotAllowed("rm".into()),
                403,
                "COMMAND_NOT_ALLOWED",
                "command",
            ),
            (
                Refusal::DangerousFlag,
                403,
                "COMMAND_NOT_ALLOWED",
                "allow_dangerous",
            ),
            (
                Refusal::Args("too many".into()),
                400,
                "VALIDATION_ERROR",
                "args",
            ),
            (
                Refusal::Timeout("too long".into()),
                400,
                "VALIDATION_ERROR",
                "timeout_ms",
            ),
        ] {
            let (got_status, body, _) = answer(CommandError::Refused(refusal)).await;
            assert_eq!((got_status, &body["code"]), (status, &Value::from(code)));
            assert_eq!(body["details"]["field"], field);
            assert!(body["message"].as_str().unwrap().ends_with('.'), "{body}");
        }
        let (status, body, _) = answer(CommandError::TooManyUnfinished).await;
        assert_eq!((status, &body["code"]), (409, &Value::from("CONFLICT")));
    }
}
