//! Extractors whose rejections come out in the API's error shape: JSON bodies, query strings, UUID path
//! ids and the client's address.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

pub use crate::client::ClientInfo;
use crate::http::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// `axum::Json`, with malformed JSON and missing fields answered as VALIDATION_ERROR (400), a wrong
/// content type as UNSUPPORTED_MEDIA_TYPE (415) and oversized bodies as PAYLOAD_TOO_LARGE (413).
///
/// A number with a zero fraction (`2.0`) is accepted where an integer is expected: JSON has one number
/// type, and to the JSON Schema of the OpenAPI document `2.0` is the integer 2, while serde refuses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::of(ErrorCode::UnsupportedMediaType));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::of(ErrorCode::PayloadTooLarge)
            } else {
                ApiError::validation("The request body could not be read.")
            }
        })?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Self(value)),
            // Only a body that does not fit is read again, so the common path parses once and keeps
            // axum's messages, which point at the client's own text.
            Err(rejection @ JsonRejection::JsonDataError(_)) => {
                let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
                    return Err(json_rejection(rejection));
                };
                if !whole_floats_to_integers(&mut value) {
                    return Err(json_rejection(rejection));
                }
                let rewritten = serde_json::to_vec(&value)
                    .map_err(|_| ApiError::validation("The body is not valid JSON."))?;
                axum::Json::<T>::from_bytes(&rewritten)
                    .map(|axum::Json(value)| Self(value))
                    .map_err(json_rejection)
            }
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Whether the request says its body is JSON: `application/json` or `application/*+json`, with any
/// parameters, as `axum::Json` checks it.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.strip_prefix("application/") {
        Some(subtype) => subtype == "json" || subtype.ends_with("+json"),
        None => false,
    }
}

/// Rewrites every number with a zero fraction that an integer can hold (`2.0`, `-1e3`) as that
/// integer; true when anything changed.
fn whole_floats_to_integers(value: &mut Value) -> bool {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Within +-2^53 every integer is exact in an f64, so the conversion changes no value.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if f.fract() == 0.0 && f.abs() <= EXACT {
                *value = Value::from(f as i64);
                true
            } else {
                false
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| whole_floats_to_integers(v) | changed),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |changed, v| whole_floats_to_integers(v) | changed),
        _ => false,
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

/// The client's address comes from the socket, or from `X-Forwarded-For` when the socket's peer is one
/// of the configured trusted proxies (see [`ClientInfo`]).
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

/// The client's address from `X-Forwarded-For`, read from the right: each trusted proxy appends the
/// address it heard from, so the right-most entry that is not a trusted proxy is the one our proxies
/// vouch for. Entries to its left were written by the client and are never read, so a client can put
/// nothing there (an unparsable entry included) that changes the address recorded. None when the
/// header is missing, or an entry our own proxies wrote is unparsable.
fn forwarded_for(parts: &Parts, trusted: &[IpAddr]) -> Option<IpAddr> {
    let values: Vec<&[u8]> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    client_of(&values, trusted)
}

/// Works on bytes, and decodes only the hops it looks at: a client's non-ASCII byte to the left of them
/// (in the same header line, once a proxy has merged it) must not spoil the line.
fn client_of(values: &[&[u8]], trusted: &[IpAddr]) -> Option<IpAddr> {
    for hop in values.iter().rev().flat_map(|v| v.rsplit(|b| *b == b',')) {
        let ip: IpAddr = std::str::from_utf8(hop).ok()?.trim().parse().ok()?;
        if !trusted.contains(&ip) {
            return Some(ip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unparsable_forwarded_for_entry_does_not_let_a_client_choose_the_ip_recorded() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = [proxy];
        // The client wrote "1.2.3.4, garbage"; our proxy appended the address it heard from.
        let client = Some("9.9.9.9".parse().unwrap());
        assert_eq!(client_of(&[b"1.2.3.4, garbage, 9.9.9.9"], &trusted), client);
        assert_eq!(client_of(&[b"garbage", b"9.9.9.9"], &trusted), client);
        // A byte that is not ASCII, written by the client into the line a proxy then appended to.
        assert_eq!(
            client_of(&[b"1.2.3.4, \xff\xfe, 9.9.9.9"], &trusted),
            client
        );
        // Through two trusted proxies: the first address neither of them is.
        assert_eq!(
            client_of(&[b"1.2.3.4, 9.9.9.9, 10.0.0.1"], &trusted),
            client
        );
        // What our own proxies wrote is unreadable: nothing is believed (the peer is recorded).
        assert_eq!(client_of(&[b"1.2.3.4, garbage"], &trusted), None);
        assert_eq!(client_of(&[b"10.0.0.1"], &trusted), None);
    }

    #[test]
    fn whole_floats_become_integers_and_nothing_else_changes() {
        let mut v = json!({"a": 2.0, "b": [-1e3, 1.5, "3.0"], "c": {"d": 7, "e": 1e300}});
        assert!(whole_floats_to_integers(&mut v));
        assert_eq!(
            v,
            json!({"a": 2, "b": [-1000, 1.5, "3.0"], "c": {"d": 7, "e": 1e300}})
        );
        let mut v = json!({"a": 2, "b": 0.25});
        assert!(!whole_floats_to_integers(&mut v));
    }

    #[test]
    fn json_content_types() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/problem+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
