//! `/api/v1/auth/...`: signing up, logging in and out, the current user, CSRF, email verification,
//! password reset and the user's own sessions (SPEC 3.2).

mod account;
mod login;
mod password_reset;
mod sessions;

use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(account::signup))
        .routes(routes!(account::verify_email))
        .routes(routes!(account::me))
        .routes(routes!(account::csrf))
        .routes(routes!(login::login))
        .routes(routes!(login::logout))
        .routes(routes!(password_reset::request))
        .routes(routes!(password_reset::confirm))
        .routes(routes!(sessions::list))
        .routes(routes!(sessions::end))
}

/// A plain acknowledgement. Answers that must not reveal whether an account exists are always this.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Message {
    pub message: &'static str,
}

/// The CSRF token of the caller's session, for the `X-CSRF-Token` header of unsafe requests.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CsrfToken {
    pub csrf_token: String,
}
