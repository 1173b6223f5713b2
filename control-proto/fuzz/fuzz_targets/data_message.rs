//! Decodes arbitrary bytes as a data-plane message of `/ws/data`, as the server and the agent do with
//! every binary frame; whatever decodes must re-encode to exactly the same bytes, and a FRAMES batch must
//! yield as many records as it announces.
#![no_main]

use control_proto::data::{self, DataMessage, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(msg) = DataMessage::decode(bytes) else {
        return;
    };
    let encoded = match msg.kind {
        Kind::Frames => {
            let batch = msg.batch.expect("FRAMES carry a batch");
            assert_eq!(batch.iter().count(), batch.len());
            assert_eq!(msg.frame_count(), batch.len() as u64);
            data::encode_frames(msg.group_id, msg.side, msg.n, batch.as_bytes())
        }
        Kind::Ack => {
            assert!(msg.batch.is_none());
            data::encode_ack(msg.group_id, msg.side, msg.n)
        }
        Kind::Drops => {
            assert!(msg.batch.is_none());
            data::encode_drops(msg.group_id, msg.side, msg.n)
        }
    };
    assert_eq!(encoded, bytes);
});
