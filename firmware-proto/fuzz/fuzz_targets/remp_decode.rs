//! Decodes arbitrary bytes as a REMP packet, as a standalone CAN batch and as a session
//! packet; whatever decodes must re-encode and decode to the same packet.
#![no_main]

use firmware_proto::ext::{Batch, Role, SessionMac};
use firmware_proto::ids::{DeviceId, DongleToken};
use firmware_proto::remp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = remp::decode(data) {
        let mut out = [0u8; firmware_proto::MAX_PACKET_LEN];
        let n = remp::encode(&packet, &mut out).expect("a decoded packet re-encodes");
        assert_eq!(remp::decode(&out[..n]).expect("re-encoded packet decodes"), packet);
    }
    if let Ok(batch) = Batch::parse(data) {
        assert_eq!(batch.iter().count(), batch.len());
    }
    let token = DongleToken::from_bytes([0x42; 32]);
    let mut session = SessionMac::new(Role::Dongle, &token, &DeviceId([0; 8]), &[1; 16], &[2; 16]);
    let _ = session.open(data);
});
