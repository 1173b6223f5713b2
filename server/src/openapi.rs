//! The OpenAPI document's frame: title, security schemes, tags and shared schemas. The paths come from
//! the handlers' `#[utoipa::path]` annotations (see `routes`).

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::http::error::{ErrorBody, ErrorCode};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "bridge-server",
        description = "The remote CAN bridge server. Every non-2xx answer is an ErrorBody. Text never contains \
            the NUL character (U+0000): PostgreSQL cannot store it, and a request carrying it answers 400.",
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

/// Documents the answers that come from shared layers rather than from the handlers, so that no route
/// can forget them: on every operation that takes a JSON body, those of its extractor (`ApiJson`)
/// before the handler runs (400 malformed JSON, 413 a body over the limit, 415 a body not sent as
/// JSON); on every operation under `/api/v1`, 503 while the database is unreachable. Answers an
/// operation already documents keep their own description.
pub fn document_common_errors(doc: &mut utoipa::openapi::OpenApi) {
    let body_answers = [
        (
            "400",
            "VALIDATION_ERROR: the body is not valid JSON or does not fit the schema.",
        ),
        (
            "413",
            "PAYLOAD_TOO_LARGE: the body is over the server's limit.",
        ),
        (
            "415",
            "UNSUPPORTED_MEDIA_TYPE: the body is not sent as `application/json`.",
        ),
    ];
    let database_answer = (
        "503",
        "SERVICE_UNAVAILABLE: the database is unreachable for now; try again after `Retry-After` seconds.",
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        let api = path.starts_with(crate::http::API_PREFIX);
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let body = operation.request_body.is_some();
            let answers = body_answers
                .iter()
                .filter(|_| body)
                .chain(std::iter::once(&database_answer).filter(|_| api));
            for &(status, description) in answers {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(description)
                            .content_ref("application/json", Ref::from_schema_name("ErrorBody"))
                            .build()
                            .into()
                    });
            }
        }
    }
}
