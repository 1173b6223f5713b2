//! The technicians' dashboard (SPEC 9): HTML pages under `/`, next to the JSON API under `/api/v1`.
//!
//! Every page is rendered on the server from the API's own answers ([`api::Ctx`] calls the API routes
//! in-process with the browser's session cookie), so each page is complete without JavaScript: lists,
//! details, and forms that post to `/forms` ([`forms`]), which hands them to the API with the session's
//! CSRF token from a hidden field. With JavaScript, `assets/app.js` sends the same forms to the API
//! with `fetch()` and the `X-CSRF-Token` header (from `GET /api/v1/auth/csrf`), and the live parts
//! need it: presence, the pairing countdown, the timing preview, command output as it comes, the live
//! console over SSE (`EventSource`, resumed with `Last-Event-ID`) with its frames-per-second chart,
//! and the group page's state and backlog chart.
//!
//! The assets (`assets/`: one stylesheet, a few small scripts, an icon) are compiled into the binary;
//! a strict Content-Security-Policy lets the pages load nothing from anywhere else. These routes are
//! not part of the OpenAPI document, which describes the API only.
//!
//! - [`html`]: escaping, the page frame, shared builders.
//! - [`api`]: the in-process API client the pages use.
//! - [`forms`]: `POST /forms`, the no-JavaScript path of every form.
//! - [`auth_pages`], [`dongle_pages`], [`group_pages`], [`agent_pages`], [`admin_pages`]: the pages.

pub mod admin_pages;
pub mod agent_pages;
pub mod api;
pub mod assets;
pub mod auth_pages;
pub mod dongle_pages;
pub mod forms;
pub mod group_pages;
pub mod html;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::state::AppState;
use api::{Ctx, Reply};
use html::{Me, Nav, Page, esc, url_encode};

/// The dashboard's routes. Merged into the application's router beside the API, outside the API's
/// error-shape layer (pages answer HTML, also for errors).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/login", get(auth_pages::login))
        .route("/signup", get(auth_pages::signup))
        .route("/reset-password", get(auth_pages::reset_password))
        .route("/verify-email", get(auth_pages::verify_email))
        .route("/dongles", get(dongle_pages::list))
        .route("/dongles/{id}", get(dongle_pages::detail))
        .route(
            "/dongles/{id}/commands/{command_id}",
            get(dongle_pages::command),
        )
        .route("/groups", get(group_pages::list))
        .route("/groups/{id}", get(group_pages::detail))
        .route("/agents", get(agent_pages::list))
        .route("/admin", get(|| async { Redirect::to("/admin/users") }))
        .route("/admin/users", get(admin_pages::users))
        .route("/admin/audit", get(admin_pages::audit))
        .route("/admin/dongles", get(admin_pages::dongles))
        .route("/admin/groups/{id}/latency", get(admin_pages::latency))
        .route("/forms", post(forms::submit))
        .route("/assets/{file}", get(assets::serve))
        .layer(from_fn(security_headers))
}

/// Headers on every page and asset: nothing may be loaded from elsewhere, framed, or sniffed.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// `/`: the dongles when signed in, the sign-in page otherwise.
async fn home(ctx: Ctx) -> Response {
    match signed_in(&ctx).await {
        Ok(_) => Redirect::to("/dongles").into_response(),
        Err(response) => response,
    }
}

/// The signed-in user of a page and the session's CSRF token.
pub struct Session {
    pub me: Me,
    pub csrf: String,
}

impl Session {
    /// A page for this user, with the notice of the page's `?notice=`.
    pub fn page(&self, ctx: &Ctx, title: impl Into<String>, nav: Nav) -> Page {
        let mut page = Page::new(title, nav);
        page.me = Some(self.me.clone());
        page.csrf = self.csrf.clone();
        page.notice = query_value(&ctx.uri, "notice");
        page
    }
}

/// The signed-in user, or the redirect to the sign-in page (saying the session ended when the browser
/// had one).
pub async fn signed_in(ctx: &Ctx) -> Result<Session, Response> {
    let me = ctx.get("/auth/me").await;
    if me.ok() {
        return Ok(Session {
            me: Me::from_json(&me.json),
            csrf: ctx.csrf_from_cookie(),
        });
    }
    if me.signed_out() {
        let had_session = !ctx.csrf_from_cookie().is_empty();
        let notice = if had_session {
            "&notice=signed_out"
        } else {
            ""
        };
        return Err(
            Redirect::to(&format!("/login?next={}{notice}", url_encode(&ctx.uri))).into_response(),
        );
    }
    Err(error_page(&me, None))
}

/// A page for an API error met while rendering: not found, refused, or the server's trouble.
pub fn error_page(reply: &Reply, session: Option<&Session>) -> Response {
    let (title, status) = match reply.status {
        StatusCode::NOT_FOUND => ("Not found", StatusCode::NOT_FOUND),
        s if s.is_client_error() => ("Refused", s),
        _ => ("Something went wrong", StatusCode::BAD_GATEWAY),
    };
    let mut page = Page::new(title, Nav::None);
    if let Some(session) = session {
        page.me = Some(session.me.clone());
        page.csrf = session.csrf.clone();
    }
    page.status = status;
    page.body = format!(
        "<p class=\"error\" role=\"alert\">{}</p><p><code>{}</code></p>\
         <p><a href=\"/\">Back to the start page</a></p>",
        esc(&reply.message()),
        esc(reply.code()),
    );
    page.render()
}

/// A page for a path that names nothing (a malformed id, say).
pub fn not_found(session: Option<&Session>) -> Response {
    let reply = Reply {
        status: StatusCode::NOT_FOUND,
        json: serde_json::json!({"code": "NOT_FOUND", "message": "There is nothing at this address."}),
        headers: Default::default(),
    };
    error_page(&reply, session)
}

/// The first value of `key` in the query of `uri`, percent-decoded.
pub fn query_value(uri: &str, key: &str) -> Option<String> {
    let query = uri.split_once('?')?.1;
    query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// The pairs of a query string, percent-decoded.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    let Ok(uri) = format!("/?{query}").parse::<axum::http::Uri>() else {
        return Vec::new();
    };
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

/// A UUID from a path segment.
pub fn parse_id(raw: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(raw).ok()
}
