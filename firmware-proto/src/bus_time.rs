//! How long a CAN frame holds the bus: its bits, stuffing included, and their time at a bitrate.
//!
//! Two readings serve two purposes. [`worst_case_bits`] is an upper bound that needs only the frame's
//! shape (identifier format, FD or not, data length): a host that sends no faster than it allows never
//! outruns a bus that carries its frames alone, whatever the data (other nodes' traffic, error frames
//! and retransmissions take their share too). [`classic_bits`] is the exact
//! count of a classic frame, computed from its content (the CRC-15 and every stuff bit): a simulated
//! bus that takes exactly this long per frame behaves as a real one does.
//!
//! A classic frame is, before stuffing, the start of frame, the arbitration and control fields (19
//! bits with an 11-bit identifier, 39 with a 29-bit one), the data, and the 15-bit CRC; stuffing
//! inserts one opposite bit after every five equal ones in that part, at most one per four bits after
//! the first. The CRC delimiter, the acknowledgement slot and its delimiter, the end of frame and the
//! interframe space follow unstuffed: 13 bits.
//!
//! A CAN FD frame (ISO 11898-1:2015) has an arbitration part (start of frame through the BRS bit: 17
//! bits, or 36 with a 29-bit identifier) sent at the nominal bitrate, and a data part (ESI, DLC, data,
//! the 4-bit stuff count, a 17-bit CRC up to 16 data bytes or 21-bit beyond, and the CRC delimiter)
//! sent at the data bitrate when the frame switches bitrate (BRS). The CRC field has a fixed stuff
//! bit before every four bits; the rest is stuffed as in a classic frame. The acknowledgement, end of
//! frame and interframe space (12 bits) are at the nominal bitrate again.

use crc::{CRC_15_CAN, Crc};

/// The shape of a frame: what its length on the bus depends on, apart from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameShape {
    /// A 29-bit identifier.
    pub extended: bool,
    /// A CAN FD frame.
    pub fd: bool,
    /// An FD frame whose data part goes at the data bitrate.
    pub brs: bool,
    /// Data bytes (0..=8 classic, 0..=64 FD; longer lengths count as the longest).
    pub len: u8,
}

/// A frame's bits at each of the two bitrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameBits {
    /// Bits at the nominal bitrate.
    pub nominal: u32,
    /// Bits at the data bitrate (only in an FD frame that switches bitrate).
    pub data: u32,
}

impl FrameBits {
    /// Every bit of the frame.
    pub const fn total(&self) -> u32 {
        self.nominal + self.data
    }

    /// The time these bits take, in nanoseconds, at `nominal` bit/s, and at `data` bit/s for the
    /// data-phase bits (the nominal bitrate when `None`). A zero bitrate counts as 1 bit/s.
    pub fn nanos(&self, nominal: u32, data: Option<u32>) -> u64 {
        let at = |bits: u32, rate: u32| u64::from(bits) * 1_000_000_000 / u64::from(rate.max(1));
        at(self.nominal, nominal) + at(self.data, data.unwrap_or(nominal))
    }
}

/// Bits after the CRC in a classic frame: CRC delimiter, ACK slot and delimiter, end of frame (7),
/// interframe space (3).
const CLASSIC_TAIL: u32 = 13;
/// Bits after the CRC delimiter in an FD frame, at the nominal bitrate: ACK slot and delimiter, end
/// of frame, interframe space.
const FD_TAIL: u32 = 12;

/// The data length an FD frame carries for `len` bytes: the next of 0..=8, 12, 16, 20, 24, 32, 48, 64.
pub const fn fd_padded_len(len: u8) -> u32 {
    match len {
        0..=8 => len as u32,
        9..=12 => 12,
        13..=16 => 16,
        17..=20 => 20,
        21..=24 => 24,
        25..=32 => 32,
        33..=48 => 48,
        _ => 64,
    }
}

/// Stuff bits a stuffed run of `bits` bits can need at most: one after the first five, then one per
/// four (a stuff bit starts the next run of equal bits).
const fn worst_stuff(bits: u32) -> u32 {
    if bits < 5 { 0 } else { (bits - 1) / 4 }
}

/// The most bits a frame of this shape can take, stuffing included.
pub const fn worst_case_bits(shape: FrameShape) -> FrameBits {
    bits(shape, false)
}

/// The bits a frame of this shape takes on average: half of the worst case's stuff bits where they
/// depend on the data (what random data needs), the fixed ones of an FD frame's CRC field in full. For
/// estimating a bus's load, not for pacing.
pub const fn typical_bits(shape: FrameShape) -> FrameBits {
    bits(shape, true)
}

/// The bits of a frame of this shape, with every dynamic stuff bit the rule allows, or half of them.
const fn bits(shape: FrameShape, half_stuff: bool) -> FrameBits {
    let share = if half_stuff { 2 } else { 1 };
    if !shape.fd {
        let len = if shape.len > 8 { 8 } else { shape.len as u32 };
        let stuffed = if shape.extended { 54 } else { 34 } + 8 * len;
        return FrameBits {
            nominal: stuffed + worst_stuff(stuffed) / share + CLASSIC_TAIL,
            data: 0,
        };
    }
    let len = fd_padded_len(shape.len);
    let arbitration = if shape.extended { 36 } else { 17 };
    // ESI, DLC and data: dynamically stuffed, continuing the arbitration part's runs.
    let control = 5 + 8 * len;
    let crc: u32 = if len > 16 { 21 } else { 17 };
    // The stuff count (4 bits) and the CRC, with a fixed stuff bit before each four of them, then the
    // CRC delimiter.
    let crc_field = 4 + crc + (4 + crc).div_ceil(4) + 1;
    // Runs of equal bits continue from one part into the other, so each part may hold one stuff bit
    // per four of its own bits, which together bound the whole frame's.
    let arbitration_stuff = worst_stuff(arbitration) / share;
    let control_stuff = control.div_ceil(4) / share;
    let (nominal, data) = if shape.brs {
        (
            arbitration + arbitration_stuff + FD_TAIL,
            control + control_stuff + crc_field,
        )
    } else {
        (
            arbitration + arbitration_stuff + control + control_stuff + crc_field + FD_TAIL,
            0,
        )
    };
    FrameBits { nominal, data }
}

/// The exact bits of a classic data frame (or a remote frame, `remote`, whose `data` is empty and
/// whose `dlc` says what it asks for), stuffing included. `id` is masked to 11 or 29 bits and `data`
/// is cut at 8 bytes.
pub fn classic_bits(id: u32, extended: bool, remote: bool, dlc: u8, data: &[u8]) -> u32 {
    let data = if remote {
        &[][..]
    } else {
        &data[..data.len().min(8)]
    };
    let mut bits = Bits::default();
    bits.push(0, 1); // start of frame
    if extended {
        let id = id & 0x1FFF_FFFF;
        bits.push(id >> 18, 11);
        bits.push(1, 1); // SRR
        bits.push(1, 1); // IDE
        bits.push(id & 0x3FFFF, 18);
        bits.push(u32::from(remote), 1);
        bits.push(0, 2); // r1, r0
    } else {
        bits.push(id & 0x7FF, 11);
        bits.push(u32::from(remote), 1);
        bits.push(0, 2); // IDE, r0
    }
    bits.push(u32::from(dlc.min(15)), 4);
    for byte in data {
        bits.push(u32::from(*byte), 8);
    }
    let crc = bits.crc15();
    bits.push(u32::from(crc), 15);
    bits.len as u32 + bits.stuff_bits() + CLASSIC_TAIL
}

/// The CAN CRC-15 (polynomial 0x4599, initial value 0).
const CAN_CRC15: Crc<u16> = Crc::<u16>::new(&CRC_15_CAN);

/// The stuffed part of a classic frame, most significant bit first: at most 1 + 39 + 64 + 15 bits.
#[derive(Default)]
struct Bits {
    bytes: [u8; 16],
    len: usize,
}

impl Bits {
    fn push(&mut self, value: u32, count: u32) {
        for i in (0..count).rev() {
            let bit = (value >> i) & 1 == 1;
            if let Some(byte) = self.bytes.get_mut(self.len / 8) {
                if bit {
                    *byte |= 0x80 >> (self.len % 8);
                }
                self.len += 1;
            }
        }
    }

    fn get(&self, i: usize) -> bool {
        self.bytes
            .get(i / 8)
            .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
    }

    /// The CRC-15 of the bits so far. The CRC works on bytes, so the bits are shifted right to end
    /// on a byte boundary; with an initial value of zero, the leading zero bits this adds do not
    /// change it.
    fn crc15(&self) -> u16 {
        let pad = (8 - self.len % 8) % 8;
        let mut shifted = [0u8; 16];
        for i in 0..self.len {
            if self.get(i) {
                let j = i + pad;
                if let Some(byte) = shifted.get_mut(j / 8) {
                    *byte |= 0x80 >> (j % 8);
                }
            }
        }
        CAN_CRC15.checksum(shifted.get(..(self.len + pad) / 8).unwrap_or(&[]))
    }

    /// The stuff bits the sender inserts: after five equal bits, one of the other value, which
    /// counts as the first of the next run.
    fn stuff_bits(&self) -> u32 {
        let mut stuffed = 0;
        let mut last = None;
        let mut run = 0;
        for i in 0..self.len {
            let bit = self.get(i);
            if Some(bit) == last {
                run += 1;
            } else {
                last = Some(bit);
                run = 1;
            }
            if run == 5 {
                stuffed += 1;
                last = Some(!bit);
                run = 1;
            }
        }
        stuffed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classic_worst_cases_are_the_textbook_figures() {
        // 8 data bytes: 111 bits before stuffing plus 24 stuff bits with an 11-bit identifier; 131
        // plus 29 with a 29-bit one.
        let standard = FrameShape {
            len: 8,
            ..FrameShape::default()
        };
        assert_eq!(worst_case_bits(standard).total(), 111 + 24);
        let extended = FrameShape {
            extended: true,
            len: 8,
            ..FrameShape::default()
        };
        assert_eq!(worst_case_bits(extended).total(), 131 + 29);
        // The typical frame has half the dynamic stuff bits; an FD frame's fixed ones stay.
        assert_eq!(typical_bits(standard).total(), 111 + 12);
        let fd = FrameShape {
            fd: true,
            len: 64,
            ..FrameShape::default()
        };
        assert!(typical_bits(fd).total() < worst_case_bits(fd).total());
        // Lengths past 8 count as 8.
        let long = FrameShape {
            len: 64,
            ..FrameShape::default()
        };
        assert_eq!(worst_case_bits(long), worst_case_bits(standard));
    }

    #[test]
    fn a_frame_of_zeros_has_a_stuff_bit_after_every_five() {
        // Identifier 0, no data: the start of frame, arbitration and control fields are 19 zeros,
        // and the CRC-15 of zeros is zero: 34 zeros, stuffed after the 5th, 10th, ... 30th.
        assert_eq!(classic_bits(0, false, false, 0, &[]), 47 + 6);
        // Alternating bits are never stuffed, but the CRC of such a frame may be.
        let exact = classic_bits(0x555, false, false, 1, &[0x55]);
        assert!((47 + 8..47 + 8 + 4).contains(&exact), "{exact}");
    }

    #[test]
    fn the_crc_makes_the_stuffed_part_divisible() {
        // A message followed by its CRC leaves no remainder, with or without leading zeros.
        let mut bits = Bits::default();
        bits.push(0, 1);
        bits.push(0x123, 11);
        bits.push(0, 3);
        bits.push(2, 4);
        bits.push(0x1122, 16);
        assert_eq!(bits.len, 35);
        let crc = bits.crc15();
        assert!(crc < 0x8000);
        bits.push(u32::from(crc), 15);
        assert_eq!(bits.crc15(), 0);
        let mut padded = Bits::default();
        padded.push(0, 3);
        padded.push(0x123, 12);
        assert_eq!(padded.crc15(), {
            let mut plain = Bits::default();
            plain.push(0x123, 12);
            plain.crc15()
        });
    }

    #[test]
    fn fd_frames_switch_their_data_part_to_the_data_bitrate() {
        let slow = FrameShape {
            fd: true,
            len: 64,
            ..FrameShape::default()
        };
        let fast = FrameShape { brs: true, ..slow };
        assert_eq!(worst_case_bits(slow).data, 0);
        assert_eq!(worst_case_bits(slow).total(), worst_case_bits(fast).total());
        // 64 bytes at 500 kbit/s nominal: about 1.3 ms without switching, well under 0.3 ms at 4 Mbit/s.
        let without = worst_case_bits(slow).nanos(500_000, Some(4_000_000));
        let with = worst_case_bits(fast).nanos(500_000, Some(4_000_000));
        assert!((1_200_000..1_500_000).contains(&without), "{without}");
        assert!(with < 300_000, "{with}");
        // An FD length between the steps is padded up to the next one.
        let twenty = FrameShape {
            fd: true,
            len: 17,
            ..FrameShape::default()
        };
        assert_eq!(
            worst_case_bits(twenty),
            worst_case_bits(FrameShape { len: 20, ..twenty })
        );
    }

    #[test]
    fn time_is_bits_over_the_bitrate() {
        let bits = FrameBits {
            nominal: 100,
            data: 0,
        };
        assert_eq!(bits.nanos(1_000_000, None), 100_000);
        assert_eq!(
            bits.nanos(0, None),
            100_000_000_000,
            "a zero bitrate does not divide by zero"
        );
    }

    proptest! {
        #[test]
        fn no_classic_frame_is_longer_than_its_worst_case(
            id in any::<u32>(),
            extended in any::<bool>(),
            data in proptest::collection::vec(any::<u8>(), 0..=8),
        ) {
            let exact = classic_bits(id, extended, false, data.len() as u8, &data);
            let shape = FrameShape { extended, len: data.len() as u8, ..FrameShape::default() };
            let bound = worst_case_bits(shape).total();
            prop_assert!(exact <= bound, "{exact} > {bound}");
            // Unstuffed length is the least.
            let unstuffed = if extended { 54 } else { 34 } + 8 * data.len() as u32 + CLASSIC_TAIL;
            prop_assert!(exact >= unstuffed);
        }
    }
}
