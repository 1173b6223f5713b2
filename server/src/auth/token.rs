//! Random secrets and their digests: session ids, email tokens.
//!
//! A secret is 256 random bits written as 64 hex characters; the database keeps only the hex SHA-256 of
//! it, so a read of the database yields nothing that logs anyone in or confirms anything.

use rand::RngExt;
use sha2::{Digest, Sha256};

/// `bytes` random bytes from the thread-local CSPRNG (reseeded from the OS), as lower-case hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(&mut buf[..]);
    hex::encode(buf)
}

/// A fresh 256-bit secret.
pub fn new_secret() -> String {
    random_hex(32)
}

/// The hex SHA-256 of a secret: what the database stores and looks up.
pub fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_256_bit_hex_and_differ() {
        let a = new_secret();
        let b = new_secret();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn the_digest_is_hex_sha256() {
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
