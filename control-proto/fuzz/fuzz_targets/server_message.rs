//! Parses arbitrary text as a server-to-agent control message, as the agent's reader does with every
//! text frame on `/ws/agent`; whatever parses must serialize and parse back to the same message.
#![no_main]

use control_proto::ServerMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Invalid UTF-8 never reaches the parser from a WebSocket text frame, but the lossy form lets the
    // fuzzer's byte mutations still produce useful text.
    let text = String::from_utf8_lossy(data);
    if let Ok(msg) = ServerMessage::from_json(&text) {
        let again = ServerMessage::from_json(&msg.to_json()).expect("a serialized message parses");
        assert_eq!(again, msg);
        // Debug output is what reaches logs; it must not fail on anything a peer can send.
        let _ = format!("{msg:?}");
    }
});
