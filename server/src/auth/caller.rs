//! Who is calling: the extractor every protected handler starts with.
//!
//! A request authenticates with the session cookie (people, in a browser or with a cookie jar) or, in a
//! later issue, with an agent's bearer token. Cookie-authenticated unsafe requests must also carry the
//! session's CSRF token; bearer-authenticated requests are exempt, since no browser sends a bearer token on
//! its own.

use axum::extract::FromRequestParts;
use axum::http::Method;
use axum::http::request::Parts;
use axum_extra::extract::cookie::CookieJar;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::csrf;
use crate::auth::session::{self, Lookup, SessionSecret};
use crate::http::{ApiError, ErrorCode};
use crate::users::{Role, Status};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Caller {
    /// A person, through a session cookie.
    User(CurrentUser),
    // `Agent(..)`, authenticated by a bearer token, arrives with the agents issue.
}

/// A logged-in user and the session the request came with.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub id: Uuid,
    pub email: String,
    pub role: Role,
    /// The public id of the session (what `GET /auth/sessions` shows).
    pub session_id: Uuid,
    /// The cookie's secret, kept to derive the CSRF token and to end the session at logout.
    pub(crate) session_secret: SessionSecret,
}

impl CurrentUser {
    pub fn is_super_admin(&self) -> bool {
        self.role == Role::SuperAdmin
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
        if parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .is_some()
        {
            // Bearer tokens belong to agents, which a later issue adds; until then none is valid.
            return Err(ApiError::of(ErrorCode::AuthRequired));
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
