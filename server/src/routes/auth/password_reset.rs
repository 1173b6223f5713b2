//! Password reset: ask for a mailed link, then set a new password with its token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use super::Message;
use crate::audit::{self, Entry, Target};
use crate::auth::{email_token, password, session};
use crate::email::{Template, outbox, templates};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ClientInfo};
use crate::rate_limit::{self, Scope};
use crate::state::AppState;
use crate::users::{self, Email, Status};
use uuid::Uuid;

#[derive(Deserialize, ToSchema)]
pub struct ResetRequest {
    #[serde(deserialize_with = "crate::http::bounded::email")]
    pub email: String,
}

const RESET_ACCEPTED: &str =
    "If an account uses this address, a message with a reset link is on its way to it.";

/// Mails a reset link (single use, one hour) when an active account has this email. Every email answers
/// the same, known or not.
#[utoipa::path(post, path = "/auth/password-reset/request", tag = "auth", request_body = ResetRequest,
    responses(
        (status = 202, description = "Accepted, whether or not the email is known.", body = Message),
        (status = 400, description = "VALIDATION_ERROR: malformed body.", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED (3 per hour per IP and per account), with Retry-After.", body = ErrorBody),
    ))]
pub async fn request(
    State(state): State<AppState>,
    client: ClientInfo,
    ApiJson(body): ApiJson<ResetRequest>,
) -> Result<(StatusCode, Json<Message>), ApiError> {
    let limits = &state.config.rate_limits;
    rate_limit::enforce(
        &state.pool,
        Scope::ResetRequestIp,
        &client.ip.to_string(),
        limits.reset_request_per_ip,
    )
    .await?;
    rate_limit::enforce(
        &state.pool,
        Scope::ResetRequestAccount,
        &Email::rate_limit_key(&body.email),
        limits.reset_request_per_account,
    )
    .await?;
    let accepted = (
        StatusCode::ACCEPTED,
        Json(Message {
            message: RESET_ACCEPTED,
        }),
    );
    let Ok(email) = Email::parse(&body.email) else {
        return Ok(accepted);
    };
    let Some(user) = users::find_by_email(&state.pool, &email).await? else {
        return Ok(accepted);
    };
    if user.status != Status::Active {
        return Ok(accepted);
    }
    let mut tx = state.pool.begin().await?;
    let token = email_token::create_reset(&mut *tx, user.id, state.config.reset_ttl).await?;
    let payload = templates::token_payload(&state.public_url, "reset-password", &token);
    outbox::enqueue(&mut *tx, email.as_str(), Template::PasswordReset, payload).await?;
    audit::record(
        &mut *tx,
        Entry::new("auth.password_reset_requested", None, &client).target(Target::user(user.id)),
    )
    .await?;
    tx.commit().await?;
    state.mail_wake.notify_one();
    Ok(accepted)
}

/// No Debug: it holds a password.
#[derive(Deserialize, ToSchema)]
pub struct ResetConfirm {
    /// The token from the mailed link.
    #[serde(deserialize_with = "crate::http::bounded::token")]
    pub token: String,
    /// The new password: 8 to 128 characters, not among the most common ones.
    #[schema(min_length = 8, max_length = 128)]
    #[serde(deserialize_with = "crate::http::bounded::password")]
    pub password: String,
}

/// Sets a new password with a reset token (single use). Every session of the user ends.
#[utoipa::path(post, path = "/auth/password-reset/confirm", tag = "auth", request_body = ResetConfirm,
    responses(
        (status = 200, description = "The password is changed; every session of the account has ended.", body = Message),
        (status = 400, description = "VALIDATION_ERROR: weak password, or the token is unknown, used or expired.", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED (its own counter per IP), with Retry-After.", body = ErrorBody),
    ))]
pub async fn confirm(
    State(state): State<AppState>,
    client: ClientInfo,
    ApiJson(body): ApiJson<ResetConfirm>,
) -> Result<Json<Message>, ApiError> {
    rate_limit::enforce(
        &state.pool,
        Scope::ResetConfirmIp,
        &client.ip.to_string(),
        state.config.rate_limits.reset_confirm_per_ip,
    )
    .await?;
    password::check_policy(&body.password)
        .map_err(|e| ApiError::validation(e.to_string()).with_detail("field", "password"))?;
    let hash = password::hash_async(body.password, state.config.password_cost)
        .await
        .map_err(ApiError::internal)?;

    let mut tx = state.pool.begin().await?;
    let Some(user_id) = email_token::consume_reset(&mut *tx, body.token.trim()).await? else {
        return Err(ApiError::validation(
            "The link is invalid or has expired: ask for a new one.",
        ));
    };
    users::set_password(&mut *tx, user_id, &hash).await?;
    email_token::retire_resets_of_user(&mut *tx, user_id).await?;
    // Following the mailed link proves the mailbox is the user's.
    users::mark_email_verified(&mut *tx, user_id).await?;
    let ended = session::end_all_for_user(&mut *tx, user_id).await?;
    // Whoever knew the old password may have registered an agent with it: every agent of the account
    // must log in again with the new one.
    let tokens_revoked = users::revoke_agent_tokens_of_user(&mut *tx, user_id).await?;
    let agent_ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agents WHERE user_id = $1")
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?;
    let email: Option<String> = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(email) = email {
        outbox::enqueue(
            &mut *tx,
            &email,
            Template::PasswordChanged,
            serde_json::json!({ "agent_tokens_revoked": tokens_revoked }),
        )
        .await?;
    }
    audit::record(
        &mut *tx,
        Entry::new("auth.password_reset", Some(user_id), &client)
            .target(Target::user(user_id))
            .details(serde_json::json!({
                "sessions_ended": ended,
                "agent_tokens_revoked": tokens_revoked,
            })),
    )
    .await?;
    tx.commit().await?;
    state.mail_wake.notify_one();
    // Connected agents lose their control channels now, not at their next reconnect.
    for agent_id in agent_ids {
        state.hub.kick(agent_id).await;
    }
    Ok(Json(Message {
        message: "Your password is changed. Log in with the new one.",
    }))
}
