//! Transports: the only code that does I/O on dongles.
//!
//! Every transport turns its medium into the same thing, a [`Link`]: a channel of whole packets to the
//! dongle and a channel of whole packets from it. A byte stream (USB CDC serial, TCP, an in-memory pipe)
//! frames packets with CRC-32 + COBS + 0x00 ([`stream`]); UDP carries one packet per datagram through one
//! long-lived socket shared by every LAN dongle ([`udp`]). The session layer above sees only packets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

pub mod serial;
pub mod stream;
pub mod udp;

/// How many packets may wait in each direction of a link before the sender waits.
pub const LINK_QUEUE: usize = 1024;

/// Whole packets to and from one dongle. Dropping `incoming`'s sender (the transport's reader) means the
/// dongle is gone: unplugged, or the socket closed.
#[derive(Debug)]
pub struct Link {
    /// Packets to send, each a complete Discovery or REMP packet.
    pub outgoing: mpsc::Sender<Vec<u8>>,
    /// Packets received, each a complete packet that passed the link's integrity checks.
    pub incoming: mpsc::Receiver<Vec<u8>>,
    /// Counters of this link.
    pub stats: Arc<LinkStats>,
    /// Where the link goes, for messages: a device path or an address.
    pub peer: String,
}

/// Counters a link keeps; read them at any time.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Packets lost to a bad CRC, bad COBS or an oversize frame (byte streams only).
    pub packets_rejected: AtomicU64,
    /// Bytes skipped while resynchronising after garbage (byte streams only).
    pub bytes_skipped: AtomicU64,
    /// Packets dropped because the receiving queue was full (UDP only: a stream waits instead).
    pub packets_dropped: AtomicU64,
}

impl LinkStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
