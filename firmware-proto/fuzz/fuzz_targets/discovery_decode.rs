//! Decodes arbitrary bytes as a Discovery packet; whatever decodes must re-encode and decode
//! to the same packet.
#![no_main]

use firmware_proto::discovery;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = discovery::decode(data) {
        let mut out = [0u8; firmware_proto::MAX_PACKET_LEN];
        let n = discovery::encode(&packet, &mut out).expect("a decoded packet re-encodes");
        assert_eq!(discovery::decode(&out[..n]).expect("re-encoded packet decodes"), packet);
    }
});
