//! The bitrates an slcan adapter can be set to and the digits of their commands: what the endpoint
//! sends, and what a spec is checked against before any adapter is opened.

/// slcan's nominal bitrates and the digit of their `S` command.
const BITRATES: [(u32, u8); 9] = [
    (10_000, b'0'),
    (20_000, b'1'),
    (50_000, b'2'),
    (100_000, b'3'),
    (125_000, b'4'),
    (250_000, b'5'),
    (500_000, b'6'),
    (800_000, b'7'),
    (1_000_000, b'8'),
];

/// The data bitrates of the CANable 2.0 `Y` command that its variants agree on.
const DATA_BITRATES: [(u32, u8); 4] = [
    (1_000_000, b'1'),
    (2_000_000, b'2'),
    (4_000_000, b'4'),
    (5_000_000, b'5'),
];

/// The digit of the `S` command for `bitrate`, if slcan has one.
pub fn bitrate_code(bitrate: u32) -> Option<u8> {
    BITRATES
        .iter()
        .find(|(b, _)| *b == bitrate)
        .map(|(_, c)| *c)
}

/// The digit of the `Y` command for the data bitrate `bitrate`, if there is one.
pub fn data_bitrate_code(bitrate: u32) -> Option<u8> {
    DATA_BITRATES
        .iter()
        .find(|(b, _)| *b == bitrate)
        .map(|(_, c)| *c)
}

/// The nominal bitrates slcan can set, for messages.
pub fn bitrate_list() -> String {
    list(&BITRATES)
}

/// The data bitrates slcan can set, for messages.
pub fn data_bitrate_list() -> String {
    list(&DATA_BITRATES)
}

fn list(table: &[(u32, u8)]) -> String {
    table
        .iter()
        .map(|(b, _)| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
