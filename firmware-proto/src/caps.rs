//! Capability bits of the Discovery ANNOUNCE `capabilities` TLV (u32).
//!
//! Bits 0..=15 describe hardware features; bits 16..=31 announce protocol extensions (the
//! `remp` message types 0x10 and up). A host uses an extension only when the dongle announces
//! its bit and otherwise speaks plain REMP v1. A receiver ignores bits it does not know.

/// The dongle's CAN controller supports CAN FD (FDCAN), so FD records may be sent in batches.
pub const CAN_FD: u32 = 1 << 0;

/// Mask of the bits reserved for hardware features.
pub const HARDWARE_MASK: u32 = 0x0000_FFFF;

/// The dongle speaks `CAN_BATCH` (REMP type 0x10).
pub const CAN_BATCH: u32 = 1 << 16;
/// The dongle speaks `BUS_STATUS` (REMP type 0x11).
pub const BUS_STATUS: u32 = 1 << 17;
/// The dongle speaks `FORGET` (REMP type 0x12).
pub const FORGET_TOKEN: u32 = 1 << 18;
/// The dongle speaks `AUTH` (REMP type 0x13) and accepts session-MAC packets.
pub const SESSION_AUTH: u32 = 1 << 19;

/// Every extension bit this crate implements.
pub const ALL_EXTENSIONS: u32 = CAN_BATCH | BUS_STATUS | FORGET_TOKEN | SESSION_AUTH;

/// Whether `announced` contains every bit of `wanted`.
pub const fn has(announced: u32, wanted: u32) -> bool {
    announced & wanted == wanted
}
