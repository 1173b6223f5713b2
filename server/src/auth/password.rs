//! Passwords: the policy (length, common passwords) and Argon2id hashing.
//!
//! Hashing and verifying cost tens of milliseconds of CPU on purpose, so they run on tokio's blocking
//! threads, never on the async workers. When an email is unknown, the password is still verified against
//! a dummy hash of the same cost, so that the answer takes as long as for a known email.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};

/// Passwords shorter than this are refused.
pub const MIN_LEN: usize = 8;
/// Passwords longer than this are refused (it also bounds the hashing work a request can cause).
pub const MAX_LEN: usize = 128;

static COMMON: &str = include_str!("common_passwords.txt");

/// Argon2id cost of new hashes. The default is OWASP's: m = 19 MiB, t = 2, p = 1.
///
/// A verified hash always uses the cost written in it, so changing this affects new hashes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for PasswordCost {
    fn default() -> Self {
        Self {
            memory_kib: Params::DEFAULT_M_COST,
            iterations: Params::DEFAULT_T_COST,
            parallelism: Params::DEFAULT_P_COST,
        }
    }
}

/// Why a password was refused or could not be hashed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PasswordError {
    #[error("the password must be {MIN_LEN} to {MAX_LEN} characters long")]
    Length,
    #[error("this password is among the most common ones: choose another")]
    Common,
    #[error("password hashing failed: {0}")]
    Hashing(String),
}

/// Checks the policy: 8..=128 characters, not among the most common passwords.
pub fn check_policy(password: &str) -> Result<(), PasswordError> {
    let len = password.chars().count();
    if !(MIN_LEN..=MAX_LEN).contains(&len) {
        return Err(PasswordError::Length);
    }
    let lower = password.to_lowercase();
    if COMMON
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|common| common == lower)
    {
        return Err(PasswordError::Common);
    }
    Ok(())
}

fn hasher(cost: PasswordCost) -> Result<Argon2<'static>, PasswordError> {
    let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
        .map_err(|e| PasswordError::Hashing(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password into a PHC string (blocking: call through [`hash_async`] from async code).
pub fn hash(password: &str, cost: PasswordCost) -> Result<String, PasswordError> {
    hasher(cost)?
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hashing(e.to_string()))
}

/// True when `password` matches the PHC string `phc`. A malformed hash matches nothing.
pub fn verify(password: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

/// A hash of a random password, made once, to verify against when the email is unknown.
fn dummy_hash(cost: PasswordCost) -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random = crate::auth::token::random_hex(16);
        hash(&random, cost).unwrap_or_default()
    })
}

/// [`hash`] on a blocking thread.
pub async fn hash_async(password: String, cost: PasswordCost) -> Result<String, PasswordError> {
    tokio::task::spawn_blocking(move || hash(&password, cost))
        .await
        .map_err(|e| PasswordError::Hashing(e.to_string()))?
}

/// Verifies on a blocking thread; with no stored hash, verifies against the dummy hash (and fails), so
/// that an unknown account costs the same time as a wrong password.
pub async fn verify_async(password: String, stored: Option<String>, cost: PasswordCost) -> bool {
    tokio::task::spawn_blocking(move || match stored {
        Some(phc) => verify(&password, &phc),
        None => {
            verify(&password, dummy_hash(cost));
            false
        }
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn light() -> PasswordCost {
        PasswordCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn the_policy_refuses_short_long_and_common_passwords() {
        assert_eq!(check_policy("short"), Err(PasswordError::Length));
        assert_eq!(check_policy(&"x".repeat(129)), Err(PasswordError::Length));
        assert_eq!(check_policy("Password123"), Err(PasswordError::Common));
        assert_eq!(check_policy("qwertyuiop"), Err(PasswordError::Common));
        assert!(check_policy("correct horse battery staple").is_ok());
        assert!(check_policy(&"é".repeat(128)).is_ok());
    }

    #[test]
    fn the_list_is_a_few_hundred_lower_case_passwords() {
        let entries: Vec<_> = COMMON.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(entries.len() >= 300, "{}", entries.len());
        assert!(entries.iter().all(|e| *e == e.to_lowercase()));
    }

    #[test]
    fn hashes_verify_and_carry_their_cost() {
        let phc = hash("correct horse battery staple", light()).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        assert!(verify("correct horse battery staple", &phc));
        assert!(!verify("wrong horse battery staple", &phc));
        assert!(!verify("anything", "not a hash"));
    }

    #[test]
    fn the_default_cost_is_owasp() {
        let cost = PasswordCost::default();
        assert_eq!(
            (cost.memory_kib, cost.iterations, cost.parallelism),
            (19 * 1024, 2, 1)
        );
    }
}
