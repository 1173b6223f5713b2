//! Feeds arbitrary bytes, in arbitrary chunks, to a small and a full-size stream decoder, and
//! decodes every packet that comes out with both packet decoders.
#![no_main]

use firmware_proto::stream::StreamDecoder;
use firmware_proto::{discovery, remp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the chunk size, so splits are fuzzed too.
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut small: StreamDecoder<64> = StreamDecoder::new();
    let mut full: StreamDecoder = StreamDecoder::new();
    for piece in rest.chunks(chunk) {
        small.push(piece, |p| assert!(p.len() <= 64));
        full.push(piece, |p| {
            let _ = remp::decode(p);
            let _ = discovery::decode(p);
        });
    }
    let s = full.stats();
    assert!(s.bytes_skipped <= rest.len() as u64);
});
