//! The session MAC that replaces the token after an AUTH handshake.
//!
//! A sealed packet has the [`crate::remp::flags::SESSION_MAC`] flag set, token_len = 16, and in
//! the token field the first 16 bytes of `HMAC-SHA-256(key, header (31 bytes) || payload)`,
//! where the key is the sender's direction key from [`super::auth::session_keys`]. Each
//! direction numbers its packets 1, 2, 3, ... in `seq`; the receiver accepts only a seq above
//! the last one it accepted, so a replayed or reflected packet is refused. Separate keys per
//! direction mean a packet cannot be bounced back to its sender either.

use core::fmt;

use subtle::ConstantTimeEq;

use super::auth::{hmac_sha256, session_keys};
use crate::ids::{DeviceId, DongleToken};
use crate::remp::{self, HEADER_LEN, Header, Packet, SESSION_MAC_LEN, flags};
use crate::{Error, Result};

/// Which end of the link this [`SessionMac`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The agent (sends with the host-to-dongle key).
    Host,
    /// The dongle (sends with the dongle-to-host key).
    Dongle,
}

/// Signs outgoing and verifies incoming packets of one authenticated session.
#[derive(Clone)]
pub struct SessionMac {
    tx_key: [u8; 32],
    rx_key: [u8; 32],
    /// The seq of the next sealed packet; 0 once 2^32 - 1 packets have been sent.
    next_tx_seq: u32,
    /// The highest seq accepted so far; 0 before the first.
    last_rx_seq: u32,
}

impl fmt::Debug for SessionMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionMac")
            .field("keys", &"**redacted**")
            .field("next_tx_seq", &self.next_tx_seq)
            .field("last_rx_seq", &self.last_rx_seq)
            .finish()
    }
}

impl SessionMac {
    /// Derives the session from the token and the handshake's nonces.
    pub fn new(
        role: Role,
        token: &DongleToken,
        device_id: &DeviceId,
        host_nonce: &[u8; 16],
        dongle_nonce: &[u8; 16],
    ) -> Self {
        let (h2d, d2h) = session_keys(token, device_id, host_nonce, dongle_nonce);
        let (tx_key, rx_key) = match role {
            Role::Host => (h2d, d2h),
            Role::Dongle => (d2h, h2d),
        };
        Self {
            tx_key,
            rx_key,
            next_tx_seq: 1,
            last_rx_seq: 0,
        }
    }

    /// The seq the next sealed packet will carry (0 when the session is exhausted).
    pub const fn next_tx_seq(&self) -> u32 {
        self.next_tx_seq
    }

    /// The highest seq accepted so far (0 before the first packet).
    pub const fn last_rx_seq(&self) -> u32 {
        self.last_rx_seq
    }

    /// Encodes `packet` with the session MAC into `out`; returns the bytes written.
    ///
    /// The header's `seq`, `token` and the SESSION_MAC flag are set here; the caller's values
    /// of those are ignored.
    pub fn seal(&mut self, packet: &Packet<'_>, out: &mut [u8]) -> Result<usize> {
        if self.next_tx_seq == 0 {
            return Err(Error::SessionExhausted);
        }
        let zero_mac = [0u8; SESSION_MAC_LEN];
        let header = Header {
            flags: packet.header.flags | flags::SESSION_MAC,
            seq: self.next_tx_seq,
            token: &zero_mac,
            ..packet.header
        };
        let len = remp::encode(
            &Packet {
                header,
                payload: packet.payload,
            },
            out,
        )?;
        let signed = out.get(..len).ok_or(Error::Truncated)?;
        let tag = mac(&self.tx_key, signed)?;
        out.get_mut(HEADER_LEN..HEADER_LEN + SESSION_MAC_LEN)
            .ok_or(Error::Truncated)?
            .copy_from_slice(&tag);
        self.next_tx_seq = self.next_tx_seq.wrapping_add(1);
        Ok(len)
    }

    /// Verifies and decodes a sealed packet: flag and MAC first, then the seq (which must be
    /// above every seq accepted before), then the payload.
    pub fn open<'a>(&mut self, bytes: &'a [u8]) -> Result<Packet<'a>> {
        let (header, payload) = remp::decode_header(bytes)?;
        if !header.has_session_mac() {
            return Err(Error::BadMac);
        }
        let expected = mac(&self.rx_key, bytes)?;
        if !bool::from(expected.as_slice().ct_eq(header.token)) {
            return Err(Error::BadMac);
        }
        if header.seq <= self.last_rx_seq {
            return Err(Error::Replay {
                seq: header.seq,
                last: self.last_rx_seq,
            });
        }
        let payload = remp::Payload::decode(header.msg_type, payload)?;
        self.last_rx_seq = header.seq;
        Ok(Packet { header, payload })
    }
}

/// The truncated MAC of a packet whose token field holds 16 bytes: the MAC covers the header
/// and the payload, skipping the token field itself.
fn mac(key: &[u8; 32], packet: &[u8]) -> Result<[u8; SESSION_MAC_LEN]> {
    let header = packet.get(..HEADER_LEN).ok_or(Error::Truncated)?;
    let payload = packet
        .get(HEADER_LEN + SESSION_MAC_LEN..)
        .ok_or(Error::Truncated)?;
    let full = hmac_sha256(key, &[header, payload]);
    let mut tag = [0u8; SESSION_MAC_LEN];
    tag.copy_from_slice(full.get(..SESSION_MAC_LEN).ok_or(Error::Truncated)?);
    Ok(tag)
}
