//! The OpenAPI document's frame: title, security schemes, tags and shared schemas. The paths come from
//! the handlers' `#[utoipa::path]` annotations (see `routes`).

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::error::{ErrorBody, ErrorCode};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "bridge-server",
        description = "The remote CAN bridge server. Every non-2xx answer is an ErrorBody.",
    ),
    components(schemas(ErrorBody, ErrorCode)),
    modifiers(&Security),
    tags(
        (name = "auth", description = "Accounts, sessions, CSRF, email verification, password reset"),
        (name = "admin", description = "Administration (super_admin only; others get 404)"),
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "agents", description = "Agents: registration, tokens, presence, device reports, the control WebSocket"),
        (name = "dongles", description = "Dongles and pairing"),
    )
)]
pub struct ApiDoc;

/// The credentials: a browser client's session cookie and the CSRF header that unsafe
/// cookie-authenticated requests add; an agent's bearer token (CSRF-exempt).
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::auth::session::COOKIE,
            ))),
        );
        components.add_security_scheme(
            "csrf",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-CSRF-Token"))),
        );
        components.add_security_scheme(
            "agent_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
