//! Signing up, confirming the email address, and who the caller is.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{CsrfToken, Message};
use crate::audit::{self, Entry, Target};
use crate::auth::{CurrentUser, email_token, password};
use crate::email::{Template, outbox, templates};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ClientInfo};
use crate::rate_limit::{self, Scope};
use crate::state::AppState;
use crate::users::{self, Email, Role, UserView};

/// `POST /auth/signup`. No Debug: it holds a password.
#[derive(Deserialize, ToSchema)]
pub struct SignupRequest {
    #[schema(example = "tech@example.com")]
    #[serde(deserialize_with = "crate::http::bounded::email")]
    pub email: String,
    /// 8 to 128 characters, not among the most common passwords.
    #[schema(min_length = 8, max_length = 128)]
    #[serde(deserialize_with = "crate::http::bounded::password")]
    pub password: String,
}

const SIGNUP_ACCEPTED: &str =
    "If the address can be used, a message is on its way to it: follow the link to continue.";

/// Creates an account and mails a verification link. A known email answers exactly the same (and its
/// owner gets a notice instead), so signing up reveals nothing about who has an account.
#[utoipa::path(post, path = "/auth/signup", tag = "auth", request_body = SignupRequest,
    responses(
        (status = 202, description = "Accepted, whether or not the email was known.", body = Message),
        (status = 400, description = "VALIDATION_ERROR: bad email or password.", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED (5 per hour per IP), with Retry-After.", body = ErrorBody),
    ))]
pub async fn signup(
    State(state): State<AppState>,
    client: ClientInfo,
    ApiJson(body): ApiJson<SignupRequest>,
) -> Result<(StatusCode, Json<Message>), ApiError> {
    let limits = &state.config.rate_limits;
    rate_limit::enforce(
        &state.pool,
        Scope::SignupIp,
        &client.ip.to_string(),
        limits.signup_per_ip,
    )
    .await?;
    let email = Email::parse(&body.email).map_err(|_| {
        ApiError::validation("Enter a valid email address.").with_detail("field", "email")
    })?;
    password::check_policy(&body.password)
        .map_err(|e| ApiError::validation(e.to_string()).with_detail("field", "password"))?;
    // Hashing happens for known emails too, so both paths cost the same.
    let hash = password::hash_async(body.password, state.config.password_cost)
        .await
        .map_err(ApiError::internal)?;

    let mut tx = state.pool.begin().await?;
    match users::insert(&mut *tx, &email, &hash, Role::User).await? {
        Some(user) => {
            let token =
                email_token::create_verification(&mut *tx, user.id, state.config.verification_ttl)
                    .await?;
            let payload = templates::token_payload(&state.public_url, "verify-email", &token);
            outbox::enqueue(&mut *tx, email.as_str(), Template::VerifyEmail, payload).await?;
            audit::record(
                &mut *tx,
                Entry::new("auth.signup", Some(user.id), &client).target(Target::user(user.id)),
            )
            .await?;
        }
        None => {
            let payload = serde_json::json!({});
            outbox::enqueue(&mut *tx, email.as_str(), Template::AccountExists, payload).await?;
            audit::record(
                &mut *tx,
                Entry::new("auth.signup_known_email", None, &client)
                    .details(serde_json::json!({ "email": email.as_str() })),
            )
            .await?;
        }
    }
    tx.commit().await?;
    state.mail_wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(Message {
            message: SIGNUP_ACCEPTED,
        }),
    ))
}

/// `POST /auth/verify-email`.
#[derive(Deserialize, ToSchema)]
pub struct TokenRequest {
    /// The token from the mailed link.
    #[serde(deserialize_with = "crate::http::bounded::token")]
    pub token: String,
}

/// Confirms the email address with the mailed token (single use, 24 hours).
#[utoipa::path(post, path = "/auth/verify-email", tag = "auth", request_body = TokenRequest,
    responses(
        (status = 200, description = "The address is confirmed.", body = Message),
        (status = 400, description = "VALIDATION_ERROR: the token is unknown, used or expired.", body = ErrorBody),
    ))]
pub async fn verify_email(
    State(state): State<AppState>,
    client: ClientInfo,
    ApiJson(body): ApiJson<TokenRequest>,
) -> Result<Json<Message>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let Some(user_id) = email_token::consume_verification(&mut *tx, body.token.trim()).await?
    else {
        return Err(ApiError::validation(
            "The link is invalid or has expired: ask for a new one.",
        ));
    };
    users::mark_email_verified(&mut *tx, user_id).await?;
    audit::record(
        &mut *tx,
        Entry::new("auth.email_verified", Some(user_id), &client).target(Target::user(user_id)),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(Message {
        message: "Your email address is confirmed.",
    }))
}

/// The logged-in user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("session" = [])),
    responses(
        (status = 200, description = "The caller.", body = UserView),
        (status = 401, description = "AUTH_REQUIRED or AUTH_SESSION_EXPIRED", body = ErrorBody),
    ))]
pub async fn me(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<UserView>, ApiError> {
    let found = users::find(&state.pool, user.id)
        .await?
        .ok_or_else(|| ApiError::of(crate::http::ErrorCode::AuthRequired))?;
    Ok(Json(UserView::from(&found)))
}

/// The CSRF token of the caller's session.
#[utoipa::path(get, path = "/auth/csrf", tag = "auth", security(("session" = [])),
    responses(
        (status = 200, description = "Send it as X-CSRF-Token on POST, PUT, PATCH and DELETE.", body = CsrfToken),
        (status = 401, description = "AUTH_REQUIRED or AUTH_SESSION_EXPIRED", body = ErrorBody),
    ))]
pub async fn csrf(user: CurrentUser) -> Json<CsrfToken> {
    Json(CsrfToken {
        csrf_token: user.csrf_token(),
    })
}
