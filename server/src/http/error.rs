//! The one error type of the HTTP API, and the layer that gives every non-2xx answer its shape.
//!
//! Every answer that is not a success is `{"code": "UPPER_SNAKE", "message": "...", "details": {...}}`,
//! with the request id in `details.request_id` (SPEC 3.1). Handlers return [`ApiError`]; answers that axum
//! or tower make on their own (unknown route, wrong method, a body over the limit) are rewritten into the
//! same shape by [`normalize_errors`], so a client never meets a second format.

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

pub use crate::error_code::ErrorCode;
use crate::http::request_id::RequestId;

/// Each code's HTTP status and neutral message belong to the HTTP layer, not to the list itself.
impl ErrorCode {
    /// The HTTP status each code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::AuthInvalidCredentials | Self::AuthSessionExpired | Self::AuthRequired => {
                StatusCode::UNAUTHORIZED
            }
            Self::Forbidden | Self::CsrfInvalid | Self::EmailNotVerified => StatusCode::FORBIDDEN,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::ValidationError | Self::PairingPinInvalid => StatusCode::BAD_REQUEST,
            Self::NotFound | Self::DongleNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::DongleOwnedByOther | Self::PairingSecurityHold | Self::Conflict => {
                StatusCode::CONFLICT
            }
            Self::PairingExpired => StatusCode::GONE,
            Self::AgentOffline => StatusCode::SERVICE_UNAVAILABLE,
            Self::DongleTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::CanConfigRejected | Self::CanSendRejected => StatusCode::UNPROCESSABLE_ENTITY,
            Self::CommandNotAllowed => StatusCode::FORBIDDEN,
            Self::NotReady | Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The JSON body of every non-2xx answer, as the OpenAPI document shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// Always holds `request_id`; some codes add fields (e.g. `retry_after_seconds`, `fields`).
    #[schema(value_type = Object)]
    pub details: Map<String, Value>,
}

/// An error answer of the API.
///
/// The message is meant for people and must never carry a secret; internal causes are logged (without
/// secrets) and answered as a bare INTERNAL_ERROR.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    details: Map<String, Value>,
    retry_after_seconds: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Map::new(),
            retry_after_seconds: None,
        }
    }

    /// The code with its default message.
    pub fn of(code: ErrorCode) -> Self {
        Self::new(code, code.default_message())
    }

    pub fn not_found() -> Self {
        Self::of(ErrorCode::NotFound)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationError, message)
    }

    /// RATE_LIMITED with the `Retry-After` header (whole seconds, at least one).
    pub fn rate_limited(retry_after_seconds: u64) -> Self {
        let secs = retry_after_seconds.max(1);
        Self::of(ErrorCode::RateLimited)
            .with_detail("retry_after_seconds", secs)
            .retry_after(secs)
    }

    /// An unexpected failure. The cause is logged here, once, and never reaches the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::of(ErrorCode::InternalError)
    }

    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_seconds = Some(secs);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    fn body(&self, request_id: Option<&RequestId>) -> ErrorBody {
        let mut details = self.details.clone();
        if let Some(id) = request_id {
            details.insert("request_id".into(), Value::String(id.as_str().to_string()));
        }
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
            details,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// How long a client is asked to wait before trying again while the database is unreachable.
const DATABASE_RETRY_AFTER_SECS: u64 = 5;

impl From<sqlx::Error> for ApiError {
    /// A database that cannot be reached is a passing condition, not a bug: it answers 503
    /// SERVICE_UNAVAILABLE with `Retry-After`, and the server recovers on its own once the database is
    /// back (the pool opens new connections). Anything else is an INTERNAL_ERROR.
    fn from(err: sqlx::Error) -> Self {
        if database_unavailable(&err) {
            // sqlx's messages name the failure (refused, timed out, shutting down), never a password.
            tracing::warn!(error = %err, "database unavailable");
            return Self::of(ErrorCode::ServiceUnavailable)
                .with_detail("retry_after_seconds", DATABASE_RETRY_AFTER_SECS)
                .retry_after(DATABASE_RETRY_AFTER_SECS);
        }
        if text_not_storable(&err) {
            return Self::validation(
                "Text in this request contains the NUL character (U+0000), which cannot be stored.",
            );
        }
        Self::internal(format_args!("database: {err}"))
    }
}

/// Whether PostgreSQL refused a text or JSON value for holding U+0000, the one character valid UTF-8
/// (and so a Rust string) can carry that PostgreSQL cannot store. Only a client's text gets there, so
/// it is the client's error, not the server's (SQLSTATE 22021 for text, 22P05 for jsonb).
fn text_not_storable(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "22021" || c == "22P05"))
}

/// Whether `err` means the database cannot be reached or is going away, rather than a failed query.
fn database_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // SQLSTATE class 08 is "connection exception"; 57P01..57P03 are an administrator's or a
        // crash's shutdown and "cannot connect now" (starting up); 53300 is "too many connections";
        // 55P03 (lock not available) and 57014 (query cancelled) are the pool's lock and statement
        // timeouts (`db::Timeouts`), and 40P01 and 40001 a deadlock or a serialization failure that
        // PostgreSQL broke by failing this transaction: the database is busy, and trying again later
        // is the answer.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "53300" | "55P03" | "57014" | "40P01" | "40001"
                )
        }),
        _ => false,
    }
}

impl IntoResponse for ApiError {
    /// The body is written here without the request id, and the error itself rides along in the
    /// response's extensions: [`normalize_errors`], which knows the request id, writes the final body.
    fn into_response(self) -> Response {
        let mut response = (self.code.status(), Json(self.body(None))).into_response();
        if let Some(secs) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(self);
        response
    }
}

/// Middleware: every answer of 400 or more leaves in the standard shape with the request id.
///
/// Answers made from an [`ApiError`] are re-rendered with the request id; answers that axum or tower
/// made themselves get the code that matches their status.
pub async fn normalize_errors(request: Request, next: Next) -> Response {
    let request_id = request.extensions().get::<RequestId>().cloned();
    let response = next.run(request).await;
    let status = response.status();
    if status.as_u16() < 400 {
        return response;
    }
    let (mut parts, _body) = response.into_parts();
    let error = parts
        .extensions
        .remove::<ApiError>()
        .unwrap_or_else(|| ApiError::of(code_for_status(status)));
    let body = serde_json::to_vec(&error.body(request_id.as_ref()))
        .unwrap_or_else(|_| b"{\"code\":\"INTERNAL_ERROR\"}".to_vec());
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    // A rewritten body keeps the status the error was answered with.
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The code for an answer that axum or tower made without an [`ApiError`].
fn code_for_status(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNAUTHORIZED => ErrorCode::AuthRequired,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        StatusCode::CONFLICT => ErrorCode::Conflict,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::NotReady,
        s if s.is_client_error() => ErrorCode::ValidationError,
        _ => ErrorCode::InternalError,
    }
}

/// The answer to a path that matches no route.
pub async fn fallback() -> ApiError {
    ApiError::not_found()
}

/// The answer to a known path asked with a method it does not serve.
pub async fn method_not_allowed() -> ApiError {
    ApiError::of(ErrorCode::MethodNotAllowed)
}
