//! CSRF tokens bound to the session.
//!
//! The token is an HMAC-SHA256 of a fixed label keyed with the raw session id. Only a holder of the
//! session cookie can compute it, it reveals nothing about the id, and any server instance can check it
//! without storing anything. Cookie-authenticated unsafe requests must send it in `X-CSRF-Token`; a
//! cross-site form can send the cookie but can never read the token.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The header that carries the token.
pub const HEADER: &str = "x-csrf-token";

const LABEL: &[u8] = b"bridge-server csrf v1";

/// The CSRF token of the session whose raw id is `session_id`.
pub fn token_for(session_id: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(session_id.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(LABEL);
    hex::encode(mac.finalize().into_bytes())
}

/// True when `presented` is the token of the session, compared in constant time.
pub fn is_valid(session_id: &str, presented: &str) -> bool {
    let expected = token_for(session_id);
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_fits_its_session_only() {
        let t = token_for("session-a");
        assert_eq!(t.len(), 64);
        assert!(is_valid("session-a", &t));
        assert!(!is_valid("session-b", &t));
        assert!(!is_valid("session-a", ""));
    }
}
