//! Logging in and out.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum_extra::extract::cookie::CookieJar;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit::{self, Entry, Target};
use crate::auth::session::{self, SessionSecret};
use crate::auth::{CurrentUser, csrf, password};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ApiJson, ClientInfo, ErrorCode};
use crate::rate_limit::{self, Decision, Scope};
use crate::state::AppState;
use crate::users::{self, Email, Status, UserView};

/// `POST /auth/login`. No Debug: it holds a password.
#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    #[serde(deserialize_with = "crate::http::bounded::email")]
    pub email: String,
    #[serde(deserialize_with = "crate::http::bounded::password")]
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    pub user: UserView,
    /// The CSRF token of the new session (also at `GET /auth/csrf`).
    pub csrf_token: String,
}

/// Logs in: a new session (and a new cookie) at every login.
///
/// A wrong password answers AUTH_INVALID_CREDENTIALS whether the account is unknown, active or disabled;
/// only the right password of a disabled account answers FORBIDDEN.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in; the session cookie is set.", body = LoginResponse),
        (status = 400, description = "VALIDATION_ERROR: malformed body.", body = ErrorBody),
        (status = 401, description = "AUTH_INVALID_CREDENTIALS", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: the account is disabled.", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED (10 per 10 minutes per IP and per account), with Retry-After.", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<AppState>,
    client: ClientInfo,
    jar: CookieJar,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<(CookieJar, Json<LoginResponse>), ApiError> {
    let limits = &state.config.rate_limits;
    let account_key = Email::rate_limit_key(&body.email);
    let by_ip = rate_limit::hit(
        &state.pool,
        Scope::LoginIp,
        &client.ip.to_string(),
        limits.login_per_ip,
    )
    .await?;
    let by_account = rate_limit::hit(
        &state.pool,
        Scope::LoginAccount,
        &account_key,
        limits.login_per_account,
    )
    .await?;
    let retry_after = [by_ip, by_account]
        .into_iter()
        .filter_map(|d| match d {
            Decision::Limited { retry_after } => Some(retry_after),
            Decision::Allowed => None,
        })
        .max();
    if let Some(wait) = retry_after {
        return Err(ApiError::rate_limited(wait.as_secs_f64().ceil() as u64));
    }

    let user = match Email::parse(&body.email) {
        Ok(email) => users::find_by_email(&state.pool, &email).await?,
        Err(_) => None,
    };
    let stored = user.as_ref().map(|u| u.password_hash.clone());
    let matches = password::verify_async(body.password, stored, state.config.password_cost).await;
    let user = match user {
        Some(user) if matches => user,
        other => {
            let mut entry = Entry::new("auth.login_failed", None, &client)
                .details(serde_json::json!({ "email": account_key }));
            if let Some(u) = &other {
                entry = entry.target(Target::user(u.id));
            }
            audit::record(&state.pool, entry).await?;
            return Err(ApiError::of(ErrorCode::AuthInvalidCredentials));
        }
    };
    if user.status == Status::Disabled {
        audit::record(
            &state.pool,
            Entry::new("auth.login_refused_disabled", None, &client).target(Target::user(user.id)),
        )
        .await?;
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "This account is disabled.",
        ));
    }

    // The session a browser arrives with is never reused: it ends, and a new id is issued.
    if let Some(old) = jar
        .get(session::COOKIE)
        .and_then(|c| SessionSecret::from_cookie(c.value()))
    {
        session::end(&state.pool, &old).await?;
    }
    let new = session::create(
        &state.pool,
        user.id,
        client.ip,
        client.user_agent.as_deref(),
        state.config.session_idle,
        state.config.session_absolute,
    )
    .await?;
    audit::record(
        &state.pool,
        Entry::new("auth.login", Some(user.id), &client).target(Target::session(new.public_id)),
    )
    .await?;
    let cookie = session::cookie(&new.secret, state.config.secure_cookies());
    Ok((
        jar.add(cookie),
        Json(LoginResponse {
            user: UserView::from(&user),
            csrf_token: csrf::token_for(new.secret.expose()),
        }),
    ))
}

/// Logs out: ends the session on the server and clears the cookie. Without a live session there is
/// nothing to end, and the cookie is cleared all the same.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", security(("session" = [], "csrf" = [])),
    responses(
        (status = 204, description = "Logged out; the cookie is cleared."),
        (status = 403, description = "CSRF_INVALID", body = ErrorBody),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    client: ClientInfo,
    jar: CookieJar,
    caller: Result<CurrentUser, ApiError>,
) -> Result<(CookieJar, StatusCode), ApiError> {
    match caller {
        Ok(user) => {
            session::end(&state.pool, &user.session_secret).await?;
            audit::record(
                &state.pool,
                Entry::new("auth.logout", Some(user.id), &client)
                    .target(Target::session(user.session_id)),
            )
            .await?;
        }
        Err(e) if matches!(e.code(), ErrorCode::CsrfInvalid | ErrorCode::InternalError) => {
            return Err(e);
        }
        Err(_) => {}
    }
    let removal = session::removal_cookie(state.config.secure_cookies());
    Ok((jar.add(removal), StatusCode::NO_CONTENT))
}
