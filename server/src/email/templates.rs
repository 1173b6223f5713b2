//! The messages the server sends, rendered from a template name and the row's payload at send time.

use serde_json::{Value, json};

/// The kinds of mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// "Confirm your address", with a single-use link valid 24 hours.
    VerifyEmail,
    /// "Reset your password", with a single-use link valid one hour.
    PasswordReset,
    /// Sent instead of a verification mail when someone signs up with a known address, so that signing
    /// up answers the same either way while the owner still learns of it.
    AccountExists,
    /// "Your password was changed": sent after a reset, saying that every session ended and every
    /// agent must log in again (payload: `agent_tokens_revoked`).
    PasswordChanged,
}

impl Template {
    pub fn name(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::PasswordReset => "password_reset",
            Self::AccountExists => "account_exists",
            Self::PasswordChanged => "password_changed",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "verify_email" => Some(Self::VerifyEmail),
            "password_reset" => Some(Self::PasswordReset),
            "account_exists" => Some(Self::AccountExists),
            "password_changed" => Some(Self::PasswordChanged),
            _ => None,
        }
    }
}

/// The payload of a mail that carries a token: the token and the link a person clicks.
pub fn token_payload(base_url: &str, page: &str, token: &str) -> Value {
    json!({
        "token": token,
        "link": format!("{}/{page}?token={token}", base_url.trim_end_matches('/')),
    })
}

/// The keys removed from a payload once the message is sent or given up.
pub const SECRET_KEYS: [&str; 2] = ["token", "link"];

/// Subject and plain-text body of a message.
pub fn render(template: Template, payload: &Value) -> (String, String) {
    let link = payload.get("link").and_then(Value::as_str).unwrap_or("");
    match template {
        Template::VerifyEmail => (
            "Confirm your email address".to_string(),
            format!(
                "Welcome to CAN Bridge.\n\nConfirm your email address by opening this link within 24 hours:\n\n{link}\n\n\
                 If you did not sign up, ignore this message.\n"
            ),
        ),
        Template::PasswordReset => (
            "Reset your password".to_string(),
            format!(
                "Someone asked to reset the password of your CAN Bridge account.\n\nOpen this link within one hour to choose a new password:\n\n{link}\n\n\
                 If it was not you, ignore this message: your password stays as it is.\n"
            ),
        ),
        Template::AccountExists => (
            "You already have an account".to_string(),
            "Someone tried to sign up for CAN Bridge with this address, which already has an account.\n\n\
             If it was you, log in, or ask for a password reset if you forgot your password.\n\
             If it was not you, ignore this message.\n"
                .to_string(),
        ),
        Template::PasswordChanged => {
            let agents = payload
                .get("agent_tokens_revoked")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let agents = if agents == 0 {
                String::new()
            } else {
                format!(
                    "Your agents were logged out as well ({agents} token(s) revoked): on each workstation, run \
                     `bridge-agent login --force` to connect it again.\n\n"
                )
            };
            (
                "Your password was changed".to_string(),
                format!(
                    "The password of your CAN Bridge account was changed with a reset link, and every session \
                     of the account was ended.\n\n{agents}If it was not you, reset your password again at once \
                     and tell your administrator.\n"
                ),
            )
        }
    }
}
