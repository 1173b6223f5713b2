//! Opening the control WebSocket (`/ws/agent`) with the agent's token.

use std::path::Path;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::tls;

/// The open control connection.
pub type ControlSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why the control connection could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The server refused the token: revoked, expired, or the agent was deleted. Retrying cannot help.
    #[error(
        "the server refused this agent's token (revoked or expired): run `bridge-agent login` again"
    )]
    TokenRefused,
    #[error("could not reach the server: {0}")]
    Unreachable(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Opens `ws_url` with `Authorization: Bearer <token>`.
pub async fn connect(
    ws_url: &str,
    token: &str,
    ca_file: Option<&Path>,
) -> Result<ControlSocket, ConnectError> {
    let mut request = ws_url
        .into_client_request()
        .map_err(|e| ConnectError::Unreachable(format!("bad server URL {ws_url}: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::TokenRefused)?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let connector = if ws_url.starts_with("wss://") {
        Some(Connector::Rustls(tls::client_config(ca_file)?))
    } else {
        None
    };
    match tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector).await {
        Ok((socket, _response)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response))
            if response.status().as_u16() == 401 =>
        {
            Err(ConnectError::TokenRefused)
        }
        Err(e) => Err(ConnectError::Unreachable(e.to_string())),
    }
}
