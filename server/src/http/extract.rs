//! Extractors whose rejections come out in the API's error shape: JSON bodies, query strings, UUID path
//! ids and the client's address.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::app::AppState;
use crate::http::error::{ApiError, ErrorCode};

/// `axum::Json`, with malformed JSON and missing fields answered as VALIDATION_ERROR (400), a wrong
/// content type as UNSUPPORTED_MEDIA_TYPE (415) and oversized bodies as PAYLOAD_TOO_LARGE (413).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::of(ErrorCode::PayloadTooLarge);
    }
    if let JsonRejection::MissingJsonContentType(_) = rejection {
        return ApiError::of(ErrorCode::UnsupportedMediaType);
    }
    // axum's texts say which field is missing or which line is malformed; they quote no input values.
    let message = match &rejection {
        JsonRejection::JsonDataError(e) => format!("The JSON body does not fit: {}", e.body_text()),
        JsonRejection::JsonSyntaxError(_) => "The body is not valid JSON.".to_string(),
        _ => "The request body could not be read.".to_string(),
    };
    ApiError::validation(message)
}

/// `axum::extract::Query`, with a malformed query string answered as VALIDATION_ERROR.
#[derive(Debug, Clone, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::validation(format!(
        "The query string does not fit: {}",
        rejection.body_text()
    ))
}

/// The one path parameter of a route, a UUID. Anything that is not a UUID names no resource, so it
/// answers 404 exactly as an unknown id does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<Uuid>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(_) => Err(ApiError::not_found()),
        }
    }
}

/// The two path parameters of a nested route (`/dongles/{id}/commands/{command_id}`), both UUIDs; as
/// with [`PathId`], anything else names no resource and answers 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathIds(pub Uuid, pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathIds {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<(Uuid, Uuid)>::from_request_parts(parts, state).await {
            Ok(Path((a, b))) => Ok(Self(a, b)),
            Err(_) => Err(ApiError::not_found()),
        }
    }
}

/// Who is on the other end: the client's IP address and user agent, for rate limits and the audit log.
///
/// The address is the socket's peer, or, when that peer is one of the configured trusted proxies, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub ip: IpAddr,
    pub user_agent: Option<String>,
}

impl FromRequestParts<AppState> for ClientInfo {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .ok_or_else(|| ApiError::internal("the server runs without connect info"))?;
        let trusted = &state.config.trusted_proxies;
        let ip = if trusted.contains(&peer) {
            forwarded_for(parts, trusted).unwrap_or(peer)
        } else {
            peer
        };
        let user_agent = parts
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(512).collect());
        Ok(Self { ip, user_agent })
    }
}

fn forwarded_for(parts: &Parts, trusted: &[IpAddr]) -> Option<IpAddr> {
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in parts.headers.get_all("x-forwarded-for") {
        let text = value.to_str().ok()?;
        for hop in text.split(',') {
            hops.push(hop.trim().parse().ok()?);
        }
    }
    hops.into_iter().rev().find(|ip| !trusted.contains(ip))
}
