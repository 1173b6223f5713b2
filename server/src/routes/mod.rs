//! The routes, laid out like the URL tree: `health` and `ws` at the root; `auth`, `admin`,
//! `agents`, `dongles` and `groups` under `/api/v1`, with a dongle's `can` (configuration, frames) and `commands`
//! in files of their own.
//!
//! Every handler is annotated for the OpenAPI document, and the router is built with utoipa-axum, so a
//! route cannot exist without being documented, nor be documented without existing.

pub mod admin;
pub mod agents;
pub mod auth;
pub mod can;
pub mod commands;
pub mod dongles;
mod errors;
pub mod groups;
pub mod health;
pub mod streams;
pub mod ws;

use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::openapi::ApiDoc;
use crate::state::AppState;

pub use crate::http::API_PREFIX;

/// Every documented route, with its OpenAPI document.
pub fn documented() -> OpenApiRouter<AppState> {
    let mut router = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest(
            API_PREFIX,
            OpenApiRouter::new()
                .merge(auth::router())
                .merge(admin::router())
                .merge(agents::router())
                .merge(dongles::router())
                .merge(streams::router())
                .merge(can::router())
                .merge(commands::router())
                .merge(groups::router()),
        )
        .merge(health::router())
        .merge(ws::router());
    crate::openapi::document_common_errors(router.get_openapi_mut());
    router
}

/// The OpenAPI document, as served at `/api/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// The routes, plus `/api/v1/openapi.json`.
pub fn router() -> Router<AppState> {
    let (router, doc) = documented().split_for_parts();
    let doc = Arc::new(doc);
    router.route(
        &format!("{API_PREFIX}/openapi.json"),
        get(move || {
            let doc = doc.clone();
            async move { Json(doc.as_ref().clone()) }
        }),
    )
}
