//! Who is calling: the extractor every protected handler starts with.
//!
//! A request authenticates with the session cookie (people, in a browser or with a cookie jar) or with an
//! agent's bearer token (`Authorization: Bearer`). Cookie-authenticated unsafe requests must also carry the
//! session's CSRF token; bearer-authenticated requests are exempt, since no browser sends a bearer token on
//! its own.

use axum::extract::FromRequestParts;
use axum::http::Method;
use axum::http::request::Parts;
use axum_extra::extract::cookie::CookieJar;
use uuid::Uuid;

use crate::agents::{self, AgentIdentity};
use crate::auth::csrf;
use crate::auth::session::{self, Lookup, SessionSecret};
use crate::http::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::users::{Role, Status};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Caller {
    /// A person, through a session cookie.
    User(CurrentUser),
    /// An agent, through its bearer token; it acts for its own user only.
    Agent { agent_id: Uuid, user_id: Uuid },
}

impl Caller {
    /// [`CurrentUser::require_verified_email`] for a person; an agent was registered by a confirmed
    /// account, so it passes.
    pub fn require_verified_email(&self) -> Result<(), ApiError> {
        match self {
            Self::User(user) => user.require_verified_email(),
            Self::Agent { .. } => Ok(()),
        }
    }

    /// The user on whose behalf the request runs.
    pub fn user_id(&self) -> Uuid {
        match self {
            Self::User(user) => user.id,
            Self::Agent { user_id, .. } => *user_id,
        }
    }

    /// The agent making the request, if an agent makes it.
    pub fn agent_id(&self) -> Option<Uuid> {
        match self {
            Self::User(_) => None,
            Self::Agent { agent_id, .. } => Some(*agent_id),
        }
    }
}

/// An authenticated agent (bearer token). People are told to authenticate as an agent.
#[derive(Debug, Clone, Copy)]
pub struct CurrentAgent(pub AgentIdentity);

impl FromRequestParts<AppState> for CurrentAgent {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Agent { agent_id, user_id } => Ok(Self(AgentIdentity { agent_id, user_id })),
            Caller::User(_) => Err(ApiError::new(
                ErrorCode::AuthRequired,
                "This route is for agents: authenticate with the agent token (Authorization: Bearer).",
            )),
        }
    }
}

/// A logged-in user and the session the request came with.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub id: Uuid,
    pub email: String,
    pub role: Role,
    /// Whether the account's email address is confirmed.
    pub email_verified: bool,
    /// The public id of the session (what `GET /auth/sessions` shows).
    pub session_id: Uuid,
    /// The cookie's secret, kept to derive the CSRF token and to end the session at logout.
    pub(crate) session_secret: SessionSecret,
}

impl CurrentUser {
    pub fn is_super_admin(&self) -> bool {
        self.role == Role::SuperAdmin
    }

    /// Refuses (403 EMAIL_NOT_VERIFIED) an account whose email address is not confirmed yet: it may
    /// sign in and look around, but registering agents and pairing dongles wait for the confirmation,
    /// so that nobody acts on hardware from an address they do not hold.
    pub fn require_verified_email(&self) -> Result<(), ApiError> {
        if self.email_verified {
            Ok(())
        } else {
            Err(ApiError::of(ErrorCode::EmailNotVerified))
        }
    }

    /// The CSRF token of this session.
    pub fn csrf_token(&self) -> String {
        csrf::token_for(self.session_secret.expose())
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            // Bearer tokens belong to agents. Any other scheme, or a token that is unknown, revoked or
            // expired, is the same AUTH_REQUIRED, so the answer tells nothing about the token.
            let bearer = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty() && t.len() <= 256)
                .ok_or_else(|| ApiError::of(ErrorCode::AuthRequired))?;
            let agent = agents::authenticate(&state.pool, bearer)
                .await?
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::AuthRequired,
                        "The agent token is unknown, revoked or expired: log the agent in again.",
                    )
                })?;
            let caller = Caller::Agent {
                agent_id: agent.agent_id,
                user_id: agent.user_id,
            };
            parts.extensions.insert(caller.clone());
            return Ok(caller);
        }
        let jar = CookieJar::from_headers(&parts.headers);
        let secret = jar
            .get(session::COOKIE)
            .and_then(|c| SessionSecret::from_cookie(c.value()))
            .ok_or_else(|| ApiError::of(ErrorCode::AuthRequired))?;
        let user = match session::lookup(&state.pool, &secret, state.config.session_idle).await? {
            Lookup::Valid(user) if user.status == Status::Active => user,
            Lookup::Valid(_) | Lookup::Unknown => {
                return Err(ApiError::of(ErrorCode::AuthRequired));
            }
            Lookup::Expired => return Err(ApiError::of(ErrorCode::AuthSessionExpired)),
        };
        if !is_safe(&parts.method) {
            let presented = parts
                .headers
                .get(csrf::HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !csrf::is_valid(secret.expose(), presented) {
                return Err(ApiError::of(ErrorCode::CsrfInvalid));
            }
        }
        let caller = Caller::User(CurrentUser {
            id: user.user_id,
            email: user.email,
            role: user.role,
            email_verified: user.email_verified,
            session_id: user.session_public_id,
            session_secret: secret,
        });
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::User(user) => Ok(user),
            Caller::Agent { .. } => Err(ApiError::new(
                ErrorCode::AuthRequired,
                "This route is for people: log in with a session, not an agent token.",
            )),
        }
    }
}

/// A logged-in super_admin. Anyone else is told the route does not exist (404), as for any resource
/// that is not theirs.
#[derive(Debug, Clone)]
pub struct AdminUser(pub CurrentUser);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let user = CurrentUser::from_request_parts(parts, state).await?;
        if user.is_super_admin() {
            Ok(Self(user))
        } else {
            Err(ApiError::not_found())
        }
    }
}
