//! Length limits on text fields, applied while the body is read, so that an over-long value is a 400
//! (VALIDATION_ERROR) before it reaches a rate-limit key, a database index or a hash.
//!
//! A PostgreSQL B-tree entry holds at most 8 KiB even compressed: an email of 10 000 incompressible
//! characters used as a rate-limit key was a 500 before these limits, and shorter ones still made rows
//! of that size. Use them with `#[serde(deserialize_with = ...)]`.

use serde::{Deserialize, Deserializer, de::Error};

/// The longest email address accepted anywhere (RFC 5321's path limit).
pub const EMAIL_MAX: usize = 254;
/// The longest password accepted at login or confirmation: well above the policy's 128 for new ones, so
/// that a password set under an older policy still reaches the comparison.
pub const PASSWORD_MAX: usize = 1024;
/// The longest mailed token accepted (they are 64 hex characters).
pub const TOKEN_MAX: usize = 256;

fn at_most<'de, D: Deserializer<'de>>(
    deserializer: D,
    max: usize,
    what: &str,
) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.chars().count() > max {
        return Err(D::Error::custom(format!(
            "{what} is longer than {max} characters"
        )));
    }
    Ok(text)
}

/// An email address field: at most [`EMAIL_MAX`] characters.
pub fn email<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    at_most(deserializer, EMAIL_MAX, "the email address")
}

/// A password field: at most [`PASSWORD_MAX`] characters.
pub fn password<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    at_most(deserializer, PASSWORD_MAX, "the password")
}

/// A mailed token field: at most [`TOKEN_MAX`] characters.
pub fn token<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    at_most(deserializer, TOKEN_MAX, "the token")
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Body {
        #[serde(deserialize_with = "super::email")]
        email: String,
    }

    #[test]
    fn an_over_long_field_is_refused_and_one_at_the_limit_is_not() {
        let at_limit = format!(r#"{{"email": "{}"}}"#, "a".repeat(super::EMAIL_MAX));
        let body: Body = serde_json::from_str(&at_limit).unwrap();
        assert_eq!(body.email.len(), super::EMAIL_MAX);
        let over = format!(r#"{{"email": "{}"}}"#, "a".repeat(super::EMAIL_MAX + 1));
        let err = serde_json::from_str::<Body>(&over)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("longer than 254"), "{err}");
    }
}
