//! AUTH (REMP type 0x13): a challenge-response handshake that proves both sides hold the
//! dongle's 32-byte token without sending it, and yields the keys of a [`super::SessionMac`].
//!
//! Every AUTH payload starts with action u8, status u8, reserved u16 (big-endian), then:
//!
//! | action | name      | from   | rest of payload                          | total |
//! |--------|-----------|--------|------------------------------------------|-------|
//! | 1      | challenge | host   | host_nonce (16)                          | 20    |
//! | 2      | response  | dongle | dongle_nonce (16), dongle_proof (32)     | 52    |
//! | 3      | confirm   | host   | host_proof (32)                          | 36    |
//! | 4      | result    | dongle | nothing                                  | 4     |
//!
//! With `ctx = device_id (8) || host_nonce (16) || dongle_nonce (16)`:
//! `dongle_proof = HMAC-SHA-256(token, "REMP-AUTH-DONGLE" || ctx)` and
//! `host_proof = HMAC-SHA-256(token, "REMP-AUTH-HOST" || ctx)`. AUTH packets carry no token
//! (token_len = 0). Status is 0 in challenge and confirm; in response and result it is an
//! [`AuthStatus`].

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::ids::{DeviceId, DongleToken};
use crate::wire::{Reader, Writer};
use crate::{Error, Result};

/// Label of the dongle's proof.
pub const LABEL_DONGLE_PROOF: &[u8] = b"REMP-AUTH-DONGLE";
/// Label of the host's proof.
pub const LABEL_HOST_PROOF: &[u8] = b"REMP-AUTH-HOST";
/// Label of the host-to-dongle session key.
pub const LABEL_KEY_H2D: &[u8] = b"REMP-KEY-H2D";
/// Label of the dongle-to-host session key.
pub const LABEL_KEY_D2H: &[u8] = b"REMP-KEY-D2H";

/// The outcome reported by a response or result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AuthStatus {
    /// 0.
    #[default]
    Ok,
    /// 1: the host's proof is wrong.
    BadProof,
    /// 2: the dongle holds no token (nonce and proof are zero).
    NotPaired,
    /// 3: no handshake in progress, or any other failure.
    Error,
}

/// One message of the AUTH handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMessage {
    /// Host to dongle: a fresh random nonce.
    Challenge {
        /// 16 random bytes from the host.
        host_nonce: [u8; 16],
    },
    /// Dongle to host: its nonce and proof.
    Response {
        /// Ok, or NotPaired.
        status: AuthStatus,
        /// 16 random bytes from the dongle.
        dongle_nonce: [u8; 16],
        /// See the module documentation.
        dongle_proof: [u8; 32],
    },
    /// Host to dongle: the host's proof.
    Confirm {
        /// See the module documentation.
        host_proof: [u8; 32],
    },
    /// Dongle to host: whether the session is established.
    Result {
        /// Ok, BadProof, NotPaired or Error.
        status: AuthStatus,
    },
}

const fn status_to_u8(s: AuthStatus) -> u8 {
    match s {
        AuthStatus::Ok => 0,
        AuthStatus::BadProof => 1,
        AuthStatus::NotPaired => 2,
        AuthStatus::Error => 3,
    }
}

fn status_from_u8(v: u8) -> Result<AuthStatus> {
    Ok(match v {
        0 => AuthStatus::Ok,
        1 => AuthStatus::BadProof,
        2 => AuthStatus::NotPaired,
        3 => AuthStatus::Error,
        _ => return Err(Error::InvalidField("status")),
    })
}

impl AuthMessage {
    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        let (action, status) = match self {
            AuthMessage::Challenge { .. } => (1, 0),
            AuthMessage::Response { status, .. } => (2, status_to_u8(*status)),
            AuthMessage::Confirm { .. } => (3, 0),
            AuthMessage::Result { status } => (4, status_to_u8(*status)),
        };
        w.u8(action)?;
        w.u8(status)?;
        w.u16_be(0)?;
        match self {
            AuthMessage::Challenge { host_nonce } => w.put(host_nonce),
            AuthMessage::Response {
                dongle_nonce,
                dongle_proof,
                ..
            } => {
                w.put(dongle_nonce)?;
                w.put(dongle_proof)
            }
            AuthMessage::Confirm { host_proof } => w.put(host_proof),
            AuthMessage::Result { .. } => Ok(()),
        }
    }

    /// Decodes an AUTH payload.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let action = r.u8()?;
        let status = r.u8()?;
        let _reserved = r.u16_be()?;
        let msg = match action {
            1 => AuthMessage::Challenge {
                host_nonce: r.array()?,
            },
            2 => AuthMessage::Response {
                status: status_from_u8(status)?,
                dongle_nonce: r.array()?,
                dongle_proof: r.array()?,
            },
            3 => AuthMessage::Confirm {
                host_proof: r.array()?,
            },
            4 => AuthMessage::Result {
                status: status_from_u8(status)?,
            },
            _ => return Err(Error::InvalidField("action")),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// HMAC-SHA-256 of the concatenated `parts` under `key`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail; the fallback keeps the
    // code free of unwrap all the same (an all-zero output never verifies).
    if let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        for part in parts {
            mac.update(part);
        }
        out.copy_from_slice(mac.finalize().into_bytes().as_slice());
    }
    out
}

fn derive(
    label: &[u8],
    token: &DongleToken,
    device_id: &DeviceId,
    host_nonce: &[u8; 16],
    dongle_nonce: &[u8; 16],
) -> [u8; 32] {
    hmac_sha256(
        token.as_bytes(),
        &[label, device_id.as_bytes(), host_nonce, dongle_nonce],
    )
}

/// The dongle's proof that it holds `token`.
pub fn dongle_proof(
    token: &DongleToken,
    device_id: &DeviceId,
    host_nonce: &[u8; 16],
    dongle_nonce: &[u8; 16],
) -> [u8; 32] {
    derive(
        LABEL_DONGLE_PROOF,
        token,
        device_id,
        host_nonce,
        dongle_nonce,
    )
}

/// The host's proof that it holds `token`.
pub fn host_proof(
    token: &DongleToken,
    device_id: &DeviceId,
    host_nonce: &[u8; 16],
    dongle_nonce: &[u8; 16],
) -> [u8; 32] {
    derive(LABEL_HOST_PROOF, token, device_id, host_nonce, dongle_nonce)
}

/// Derives the session keys `(host_to_dongle, dongle_to_host)`.
pub fn session_keys(
    token: &DongleToken,
    device_id: &DeviceId,
    host_nonce: &[u8; 16],
    dongle_nonce: &[u8; 16],
) -> ([u8; 32], [u8; 32]) {
    (
        derive(LABEL_KEY_H2D, token, device_id, host_nonce, dongle_nonce),
        derive(LABEL_KEY_D2H, token, device_id, host_nonce, dongle_nonce),
    )
}

/// Constant-time comparison of a received proof with the expected one.
pub fn proof_matches(expected: &[u8; 32], received: &[u8; 32]) -> bool {
    bool::from(expected.ct_eq(received))
}
