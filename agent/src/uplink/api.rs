//! The server's JSON API, as the agent's commands use it: logging in to register the agent, and the
//! technician's calls made with the agent's own token (dongles, pairing).

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

use super::tls;

/// What a call to the server can fail with. Messages say what to do; never a password or a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("could not reach the server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with its error shape.
    #[error("{message} ({code}, HTTP {status})")]
    Refused {
        status: u16,
        code: String,
        message: String,
        details: Value,
    },
    #[error("the server answered something unexpected (HTTP {status}): {reason}")]
    Unexpected { status: u16, reason: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl ApiError {
    /// The server's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The answer to `POST /agents/register`.
#[derive(Deserialize)]
pub struct Registered {
    pub agent_id: Uuid,
    pub agent_token: String,
}

/// A dongle as `GET /dongles` lists it (the fields the agent's commands use).
#[derive(Debug, Clone, Deserialize)]
pub struct DongleSummary {
    pub id: Uuid,
    pub device_id: String,
    pub ownership_state: String,
    pub owned: bool,
    #[serde(default)]
    pub fw_build: Option<String>,
    #[serde(default)]
    pub pairing_mode: bool,
    #[serde(default)]
    pub online: bool,
    #[serde(default)]
    pub agent_id: Option<Uuid>,
}

#[derive(Deserialize)]
struct DongleList {
    items: Vec<DongleSummary>,
}

/// The answer to a pairing start.
#[derive(Debug, Deserialize)]
pub struct PairingStarted {
    pub pairing_session_id: Option<Uuid>,
    #[serde(default)]
    pub paired: bool,
}

/// A client of one server.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
    csrf: Option<String>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// A client for the server at `server_url`, trusting `ca_file`'s certificates besides the public
    /// roots. It keeps cookies, so a login's session carries over to the next calls.
    pub fn new(server_url: &str, ca_file: Option<&Path>) -> Result<Self, ApiError> {
        let mut builder = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("bridge-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            for cert in tls::read_ca_file(path)? {
                let cert = reqwest::Certificate::from_der(&cert).map_err(|e| {
                    tls::TlsError::BadCertificate {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    }
                })?;
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| tls::TlsError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            base: server_url.trim_end_matches('/').to_string(),
            bearer: None,
            csrf: None,
        })
    }

    /// The same client, authenticated as an agent from now on.
    pub fn with_agent_token(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_string());
        self
    }

    /// Logs in as a person (the session cookie and CSRF token are kept for the next calls).
    pub async fn login(&mut self, email: &str, password: &str) -> Result<(), ApiError> {
        #[derive(Deserialize)]
        struct LoginAnswer {
            csrf_token: String,
        }
        let answer: LoginAnswer = self
            .call(
                Method::POST,
                "/auth/login",
                Some(json!({"email": email, "password": password})),
            )
            .await?;
        self.csrf = Some(answer.csrf_token);
        Ok(())
    }

    /// Registers an agent for the logged-in person.
    pub async fn register_agent(&self, agent_name: &str) -> Result<Registered, ApiError> {
        self.call(
            Method::POST,
            "/agents/register",
            Some(json!({"agent_name": agent_name})),
        )
        .await
    }

    /// Ends the person's session (after registering, the agent needs only its token).
    pub async fn logout(&self) -> Result<(), ApiError> {
        self.call::<Value>(Method::POST, "/auth/logout", Some(json!({})))
            .await
            .map(|_| ())
    }

    /// Revokes every token of the calling agent (`bridge-agent logout`); after it, the agent's token
    /// opens nothing.
    pub async fn revoke_own_token(&self) -> Result<(), ApiError> {
        self.call::<Value>(Method::POST, "/agents/logout", None)
            .await
            .map(|_| ())
    }

    /// The dongles this agent's user owns, and the unclaimed ones their online agents see.
    pub async fn dongles(&self) -> Result<Vec<DongleSummary>, ApiError> {
        Ok(self
            .call::<DongleList>(Method::GET, "/dongles", None)
            .await?
            .items)
    }

    /// Puts a dongle in pairing mode through this agent.
    pub async fn pairing_start(&self, dongle_id: Uuid) -> Result<PairingStarted, ApiError> {
        self.call(
            Method::POST,
            &format!("/dongles/{dongle_id}/pairing-mode"),
            Some(json!({"action": "start"})),
        )
        .await
    }

    /// Submits the PIN the dongle shows.
    pub async fn pairing_submit(
        &self,
        dongle_id: Uuid,
        pairing_session_id: Uuid,
        pin: &str,
    ) -> Result<(), ApiError> {
        self.call::<Value>(
            Method::POST,
            &format!("/dongles/{dongle_id}/pairing-submit"),
            Some(json!({"pairing_session_id": pairing_session_id, "pin": pin})),
        )
        .await
        .map(|_| ())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ApiError> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.bearer {
            request = request.bearer_auth(token);
        }
        if let Some(csrf) = &self.csrf {
            request = request.header("x-csrf-token", csrf);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| ApiError::Unreachable {
            url: self.base.clone(),
            // Without the URL, which the error would repeat; reqwest never puts bodies in errors.
            reason: e.without_url().to_string(),
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| ApiError::Unexpected {
            status: status.as_u16(),
            reason: e.without_url().to_string(),
        })?;
        if status.is_success() {
            let bytes = if bytes.is_empty() {
                &b"null"[..]
            } else {
                &bytes
            };
            return serde_json::from_slice(bytes).map_err(|e| ApiError::Unexpected {
                status: status.as_u16(),
                reason: e.to_string(),
            });
        }
        Err(refusal(status, &bytes))
    }
}

fn refusal(status: StatusCode, bytes: &[u8]) -> ApiError {
    #[derive(Deserialize)]
    struct ErrorShape {
        code: String,
        message: String,
        #[serde(default)]
        details: Value,
    }
    match serde_json::from_slice::<ErrorShape>(bytes) {
        Ok(e) => ApiError::Refused {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
            details: e.details,
        },
        Err(_) => ApiError::Unexpected {
            status: status.as_u16(),
            reason: "not the server's error shape (is this the bridge server?)".into(),
        },
    }
}
