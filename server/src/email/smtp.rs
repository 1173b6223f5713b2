//! Delivery through SMTP with lettre's pooled async transport.

use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::SmtpConfig;

/// Why a message could not be handed to the SMTP server. Messages never hold the SMTP URL, which may
/// carry a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailError {
    #[error("the SMTP URL is not valid (expected smtp://host:port or smtps://user:pass@host)")]
    BadUrl,
    #[error("a mail address is not valid: {0}")]
    Address(String),
    #[error("building the message failed: {0}")]
    Build(String),
    #[error("the SMTP server refused or failed: {0}")]
    Transport(String),
}

/// An SMTP sender. Build it inside the tokio runtime: the pooled transport spawns tasks.
#[derive(Clone)]
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl SmtpMailer {
    pub fn new(config: &SmtpConfig) -> Result<Self, MailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&config.url)
            .map_err(|_| MailError::BadUrl)?
            .build();
        let from = config
            .from
            .parse()
            .map_err(|e: lettre::address::AddressError| MailError::Address(e.to_string()))?;
        Ok(Self { transport, from })
    }

    /// Sends one plain-text message.
    pub async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), MailError> {
        let to = to
            .parse()
            .map_err(|e: lettre::address::AddressError| MailError::Address(e.to_string()))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| MailError::Build(e.to_string()))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| MailError::Transport(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TLS to the mail server (smtps, or STARTTLS required) needs a rustls crypto provider, which lettre
    /// takes from its own features: the workspace gives it aws-lc-rs, the one back end of every crate, so
    /// these build. A URL that is not one is refused without echoing it (it may carry a password).
    #[tokio::test]
    async fn tls_urls_build_with_the_workspaces_crypto_back_end() {
        let config = |url: &str| SmtpConfig {
            url: url.into(),
            from: "CAN Bridge <no-reply@example.com>".into(),
        };
        for url in [
            "smtps://user:secret@mail.example.com",
            "smtp://user:secret@mail.example.com:587?tls=required",
            "smtp://127.0.0.1:2525",
        ] {
            assert!(SmtpMailer::new(&config(url)).is_ok(), "{url}");
        }
        let err = SmtpMailer::new(&config("imap://user:secret@mail.example.com"))
            .err()
            .expect("not an SMTP URL");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
