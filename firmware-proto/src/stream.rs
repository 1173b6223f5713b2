//! Packet framing on byte streams (USB CDC serial, TCP).
//!
//! A frame is `COBS(packet || crc32(packet) as u32 LE) || 0x00`. COBS removes every 0x00 from
//! the encoded bytes, so 0x00 marks frame ends unambiguously and a receiver that lost track
//! (garbage, a dropped byte, a reset peer) is back in step at the next 0x00. A sender may also
//! send a lone 0x00 at any time, for example before its first frame, to end whatever partial
//! frame the receiver holds; empty frames are ignored and not counted.

use crate::{Error, MAX_PACKET_LEN, Result, crc32};

/// The CRC trailer length.
pub const CRC_LEN: usize = 4;

/// The largest frame (terminator included) that a packet of `packet_len` bytes can need.
pub const fn max_frame_len(packet_len: usize) -> usize {
    cobs::max_encoding_length(packet_len + CRC_LEN) + 1
}

/// Frames `packet` into `out` (encoding with the `cobs` crate); returns the frame length, terminator included.
///
/// `out` must hold [`max_frame_len`]`(packet.len())` bytes (the worst case), and `packet` at
/// most [`MAX_PACKET_LEN`] bytes.
pub fn encode_frame(packet: &[u8], out: &mut [u8]) -> Result<usize> {
    if packet.len() > MAX_PACKET_LEN {
        return Err(Error::TooLarge {
            field: "packet",
            max: MAX_PACKET_LEN,
        });
    }
    let needed = max_frame_len(packet.len());
    if out.len() < needed {
        return Err(Error::OutputTooSmall { needed });
    }
    let crc = crc32::checksum(packet).to_le_bytes();
    let mut encoder = cobs::CobsEncoder::new(out);
    encoder
        .push(packet)
        .map_err(|_| Error::OutputTooSmall { needed })?;
    encoder
        .push(&crc)
        .map_err(|_| Error::OutputTooSmall { needed })?;
    let len = encoder.finalize();
    *out.get_mut(len).ok_or(Error::OutputTooSmall { needed })? = 0;
    Ok(len + 1)
}

/// Counters of a [`StreamDecoder`]. They only grow (wrapping after 2^64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStats {
    /// Frames whose COBS and CRC verified; their packets were handed on.
    pub packets_ok: u64,
    /// Frames that decoded but whose CRC did not match, or that were too short to hold one.
    pub crc_errors: u64,
    /// Frames whose COBS encoding was invalid.
    pub cobs_errors: u64,
    /// Frames longer than the decoder's buffer (discarded up to the next 0x00).
    pub oversize: u64,
    /// Input bytes discarded with rejected frames (terminators not counted).
    pub bytes_skipped: u64,
    /// Packets that passed the CRC but were rejected by the layer above (bad magic,
    /// inconsistent lengths), as reported through [`StreamDecoder::count_rejected`].
    pub rejected: u64,
}

/// A streaming frame decoder with a fixed `N`-byte buffer for one encoded frame.
///
/// Feed it bytes in chunks of any size with [`push`](Self::push); it calls back with each
/// verified packet (CRC trailer removed), borrowed from its buffer. `N` bounds the longest
/// encoded frame (terminator excluded) it accepts; the default fits [`MAX_PACKET_LEN`].
#[derive(Clone)]
pub struct StreamDecoder<const N: usize = { crate::MAX_FRAME_LEN }> {
    buf: [u8; N],
    len: usize,
    /// The current frame overflowed the buffer: skip to the next 0x00.
    overflow: bool,
    stats: StreamStats,
}

impl<const N: usize> Default for StreamDecoder<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> core::fmt::Debug for StreamDecoder<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("capacity", &N)
            .field("buffered", &self.len)
            .field("overflow", &self.overflow)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<const N: usize> StreamDecoder<N> {
    /// An empty decoder.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            overflow: false,
            stats: zero_stats(),
        }
    }

    /// The counters so far.
    pub const fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Counts a packet that the layer above rejected after its CRC verified.
    pub fn count_rejected(&mut self) {
        self.stats.rejected = self.stats.rejected.wrapping_add(1);
    }

    /// Drops any partial frame (for example after the link was reopened).
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// Consumes `input` and calls `on_packet` with every packet completed by it, in order.
    pub fn push(&mut self, mut input: &[u8], mut on_packet: impl FnMut(&[u8])) {
        while !input.is_empty() {
            match input.iter().position(|&b| b == 0) {
                Some(end) => {
                    let (chunk, rest) = input.split_at(end);
                    self.append(chunk);
                    self.end_frame(&mut on_packet);
                    input = rest.get(1..).unwrap_or(&[]);
                }
                None => {
                    self.append(input);
                    input = &[];
                }
            }
        }
    }

    fn append(&mut self, chunk: &[u8]) {
        if self.overflow {
            self.skip(chunk.len());
            return;
        }
        let end = self.len + chunk.len();
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(chunk);
                self.len = end;
            }
            None => {
                self.overflow = true;
                self.skip(self.len + chunk.len());
                self.len = 0;
            }
        }
    }

    fn skip(&mut self, n: usize) {
        self.stats.bytes_skipped = self.stats.bytes_skipped.wrapping_add(n as u64);
    }

    fn end_frame(&mut self, on_packet: &mut impl FnMut(&[u8])) {
        let len = core::mem::take(&mut self.len);
        if core::mem::take(&mut self.overflow) {
            self.stats.oversize = self.stats.oversize.wrapping_add(1);
            return;
        }
        if len == 0 {
            return; // An empty frame: a sender's resynchronisation byte.
        }
        let Some(frame) = self.buf.get_mut(..len) else {
            return;
        };
        // The `cobs` crate decodes; a hand-written decoder was about twice as fast on batch data,
        // but both are hundreds of times faster than any link, and one well-kept decoder is worth
        // more than the margin.
        let decoded = match cobs::decode_in_place(frame) {
            Ok(size) => size,
            Err(_) => {
                self.stats.cobs_errors = self.stats.cobs_errors.wrapping_add(1);
                self.skip(len);
                return;
            }
        };
        let verified = decoded
            .checked_sub(CRC_LEN)
            .filter(|&n| n > 0)
            .and_then(|n| {
                let packet = self.buf.get(..n)?;
                let trailer: [u8; CRC_LEN] = self.buf.get(n..decoded)?.try_into().ok()?;
                (crc32::checksum(packet) == u32::from_le_bytes(trailer)).then_some(packet)
            });
        match verified {
            Some(packet) => {
                self.stats.packets_ok = self.stats.packets_ok.wrapping_add(1);
                on_packet(packet);
            }
            None => {
                self.stats.crc_errors = self.stats.crc_errors.wrapping_add(1);
                self.skip(len);
            }
        }
    }
}

const fn zero_stats() -> StreamStats {
    StreamStats {
        packets_ok: 0,
        crc_errors: 0,
        cobs_errors: 0,
        oversize: 0,
        bytes_skipped: 0,
        rejected: 0,
    }
}
