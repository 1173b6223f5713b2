//! How the domain's errors are answered: each module below the routes says what went wrong in its own
//! terms (and which API code that is); here each becomes the API's error, with its status, details and
//! `Retry-After`. Causes that are not the caller's (the database, a key) are logged once and answered
//! without detail.

use crate::dongles::DongleError;
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
