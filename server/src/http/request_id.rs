//! `X-Request-ID`: taken from the client when it is sane, made up otherwise, logged with every line of the
//! request (a tracing span), and returned on the answer.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of one request, in the request's extensions for every handler that wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Accepts a client's id only when it is short and made of safe characters, so that it cannot break
    /// a log line or a header; anything else is replaced by a fresh UUID.
    pub fn from_client(value: Option<&HeaderValue>) -> Self {
        value
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 128
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            })
            .map(|v| Self(v.to_string()))
            .unwrap_or_else(Self::generate)
    }

    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Middleware: the outermost layer, so that every log line and every answer carries the id.
pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = RequestId::from_client(request.headers().get(&X_REQUEST_ID));
    request.extensions_mut().insert(id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %id.as_str(),
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| tracing::info!(status = response.status().as_u16(), "answered"));
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_sane_client_id_and_replaces_anything_else() {
        let ok = HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(RequestId::from_client(Some(&ok)).as_str(), "abc-123_x.y:z");
        let bad = HeaderValue::from_static("a b\tc");
        assert_ne!(RequestId::from_client(Some(&bad)).as_str(), "a b\tc");
        let long = HeaderValue::from_str(&"a".repeat(200)).unwrap();
        assert_eq!(RequestId::from_client(Some(&long)).as_str().len(), 36);
        assert_eq!(RequestId::from_client(None).as_str().len(), 36);
    }
}
