//! The pages' way to the JSON API: the same routes every client calls, reached in-process with the
//! browser's own session cookie, client address and user agent, so that authorization, CSRF, rate
//! limits, audit and errors are exactly the API's.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::from_fn;
use serde_json::Value;
use tower::ServiceExt;

use crate::auth::csrf;
use crate::http::error;
use crate::http::request_id::RequestId;
use crate::routes::{self, API_PREFIX};
use crate::state::AppState;

/// The API's routes with the error shape, built once per process (each call gives it the state).
fn api_routes() -> Router<AppState> {
    static ROUTES: OnceLock<Router<AppState>> = OnceLock::new();
    ROUTES
        .get_or_init(|| routes::router().layer(from_fn(error::normalize_errors)))
        .clone()
}

/// The largest API answer a page reads.
const MAX_ANSWER: usize = 8 * 1024 * 1024;

/// What a page handler knows of its request, to call the API as the browser would.
#[derive(Clone)]
pub struct Ctx {
    pub state: AppState,
    headers: HeaderMap,
    connect: Option<ConnectInfo<SocketAddr>>,
    request_id: Option<RequestId>,
    /// The path and query of the page asked for.
    pub uri: String,
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let mut headers = HeaderMap::new();
        for name in [header::COOKIE, header::USER_AGENT] {
            for value in parts.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
        for value in parts.headers.get_all("x-forwarded-for") {
            headers.append("x-forwarded-for", value.clone());
        }
        Ok(Self {
            state: state.clone(),
            headers,
            connect: parts.extensions.get::<ConnectInfo<SocketAddr>>().cloned(),
            request_id: parts.extensions.get::<RequestId>().cloned(),
            uri: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".to_string()),
        })
    }
}

/// An API answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub json: Value,
    pub headers: HeaderMap,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// The error's code (`AUTH_REQUIRED`, ...), empty for a success.
    pub fn code(&self) -> &str {
        self.json["code"].as_str().unwrap_or("")
    }

    /// The error's message, with what its details add for people (attempts left, the field).
    pub fn message(&self) -> String {
        let mut message = self.json["message"]
            .as_str()
            .unwrap_or("The request failed.")
            .to_string();
        let details = &self.json["details"];
        if let Some(left) = details["attempts_left"].as_i64() {
            message.push_str(&format!(
                " {left} attempt{} left.",
                if left == 1 { "" } else { "s" }
            ));
        }
        if let Some(reason) = details["reason"].as_str() {
            message.push_str(&format!(" ({reason})"));
        }
        if let Some(wait) = self
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
        {
            message.push_str(&format!(" Try again in {wait} s."));
        }
        message
    }

    /// True when the answer says the browser has no (live) session.
    pub fn signed_out(&self) -> bool {
        matches!(self.code(), "AUTH_REQUIRED" | "AUTH_SESSION_EXPIRED")
    }
}

impl Ctx {
    /// The session cookie's CSRF token, computed as `GET /auth/csrf` does (empty without a session).
    pub fn csrf_from_cookie(&self) -> String {
        let jar = axum_extra::extract::cookie::CookieJar::from_headers(&self.headers);
        jar.get(crate::auth::session::COOKIE)
            .and_then(|c| crate::auth::session::SessionSecret::from_cookie(c.value()))
            .map(|s| csrf::token_for(s.expose()))
            .unwrap_or_default()
    }

    /// Calls `method API_PREFIX+path` with the browser's cookie, and the CSRF token when given.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        csrf_token: Option<&str>,
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{API_PREFIX}{path}"));
        if let Some(headers) = builder.headers_mut() {
            headers.extend(self.headers.clone());
            if let Some(token) = csrf_token.and_then(|t| HeaderValue::from_str(t).ok()) {
                headers.insert(csrf::HEADER, token);
            }
            if body.is_some() {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        let body = match body {
            Some(json) => Body::from(serde_json::to_vec(json).unwrap_or_default()),
            None => Body::empty(),
        };
        let mut request = match builder.body(body) {
            Ok(request) => request,
            Err(_) => return failure("the page built a malformed request"),
        };
        if let Some(connect) = self.connect {
            request.extensions_mut().insert(connect);
        }
        if let Some(id) = &self.request_id {
            request.extensions_mut().insert(id.clone());
        }
        let response = match api_routes()
            .with_state(self.state.clone())
            .oneshot(request)
            .await
        {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_ANSWER)
            .await
            .unwrap_or_default();
        Reply {
            status: parts.status,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers: parts.headers,
        }
    }

    /// `GET` an API path.
    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None, None).await
    }
}

fn failure(message: &str) -> Reply {
    Reply {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        json: serde_json::json!({"code": "INTERNAL_ERROR", "message": message}),
        headers: HeaderMap::new(),
    }
}
