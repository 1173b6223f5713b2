//! Codec benchmarks: one REMP CAN packet, one full CAN batch, and stream decoding throughput.
//!
//! Run: `cargo bench -p firmware-proto --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use firmware_proto::ext::{Batch, BatchWriter, CanRecord, batch};
use firmware_proto::ids::{CanId, DeviceId};
use firmware_proto::remp::{self, CanFrame, Header, MsgType, Packet, Payload};
use firmware_proto::stream::{StreamDecoder, encode_frame};
use firmware_proto::{MAX_FRAME_LEN, MAX_PACKET_LEN};

const DEV: DeviceId = DeviceId([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
const TOKEN: [u8; 32] = [0xA5; 32];

fn can_packet() -> Packet<'static> {
    let mut header = Header::new(MsgType::Can, DEV, 1);
    header.token = &TOKEN;
    let frame = CanFrame::new(
        CanId::standard(0x7DF).unwrap(),
        &[2, 1, 0x0C, 0, 0, 0, 0, 0],
    )
    .unwrap();
    Packet {
        header,
        payload: Payload::Can(frame),
    }
}

/// A batch of as many 8-byte classic records as fit one REMP packet with a token.
fn full_batch(seq: u32) -> Vec<u8> {
    let mut buf = vec![0u8; remp::MAX_PAYLOAD_LEN];
    let mut w = BatchWriter::new(&mut buf).unwrap();
    for i in 0..batch::MAX_CLASSIC_RECORDS_PER_PACKET as u32 {
        let n = seq.wrapping_mul(64).wrapping_add(i);
        let data = n.to_be_bytes();
        let data = [data[0], data[1], data[2], data[3], 0xAA, 0xBB, 0xCC, 0xDD];
        let id = CanId::standard((n % 0x800) as u16).unwrap();
        w.push(&CanRecord::classic(u64::from(n) * 100, id, &data))
            .unwrap();
    }
    let n = w.finish().unwrap();
    buf.truncate(n);
    buf
}

fn batch_packet(batch: &[u8], seq: u32) -> Vec<u8> {
    let mut header = Header::new(MsgType::CanBatch, DEV, seq);
    header.token = &TOKEN;
    let packet = Packet {
        header,
        payload: Payload::CanBatch(Batch::parse(batch).unwrap()),
    };
    let mut out = vec![0u8; MAX_PACKET_LEN];
    let n = remp::encode(&packet, &mut out).unwrap();
    out.truncate(n);
    out
}

fn single_packet(c: &mut Criterion) {
    let packet = can_packet();
    let mut out = [0u8; 128];
    let n = remp::encode(&packet, &mut out).unwrap();
    let bytes = out[..n].to_vec();
    let mut g = c.benchmark_group("remp_can");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| remp::encode(black_box(&packet), &mut out).unwrap())
    });
    g.bench_function("decode", |b| {
        b.iter(|| remp::decode(black_box(&bytes)).unwrap())
    });
    g.finish();
}

fn full_batches(c: &mut Criterion) {
    let batch = full_batch(1);
    let records: Vec<CanRecord<'_>> = Batch::parse(&batch).unwrap().iter().collect();
    let mut out = vec![0u8; remp::MAX_PAYLOAD_LEN];
    let mut g = c.benchmark_group("can_batch");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("encode_63_records", |b| {
        b.iter(|| batch::encode_batch(black_box(&records), &mut out).unwrap())
    });
    g.bench_function("decode_63_records", |b| {
        b.iter(|| {
            let parsed = Batch::parse(black_box(&batch)).unwrap();
            parsed
                .iter()
                .fold(0u32, |acc, r| acc ^ r.id.raw() ^ u32::from(r.data[0]))
        })
    });
    g.finish();
}

fn stream_decoding(c: &mut Criterion) {
    // 256 framed CAN_BATCH packets back to back, each with 63 classic 8-byte frames.
    let mut wire = Vec::new();
    let mut frames = 0u64;
    let mut frame = vec![0u8; MAX_FRAME_LEN];
    for seq in 0..256u32 {
        let packet = batch_packet(&full_batch(seq), seq);
        let n = encode_frame(&packet, &mut frame).unwrap();
        wire.extend_from_slice(&frame[..n]);
        frames += batch::MAX_CLASSIC_RECORDS_PER_PACKET as u64;
    }
    let decode_all = |wire: &[u8]| {
        let mut decoder: StreamDecoder = StreamDecoder::new();
        let mut count = 0u64;
        // Chunks of 4 KiB, like reads from a serial port or a socket.
        for chunk in wire.chunks(4096) {
            decoder.push(chunk, |bytes| {
                if let Ok(Packet {
                    payload: Payload::CanBatch(b),
                    ..
                }) = remp::decode(bytes)
                {
                    for r in b.iter() {
                        count += u64::from(r.data.len() == 8);
                    }
                }
            });
        }
        count
    };
    assert_eq!(decode_all(&wire), frames);
    let mut g = c.benchmark_group("stream_decode");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("bytes", |b| b.iter(|| decode_all(black_box(&wire))));
    g.throughput(Throughput::Elements(frames));
    g.bench_function("can_frames", |b| b.iter(|| decode_all(black_box(&wire))));
    g.finish();
}

/// The two per-byte costs of stream decoding, measured alone on one full batch packet.
fn stream_components(c: &mut Criterion) {
    let packet = batch_packet(&full_batch(1), 1);
    let mut frame = vec![0u8; MAX_FRAME_LEN];
    let n = encode_frame(&packet, &mut frame).unwrap();
    let mut g = c.benchmark_group("stream_components");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("crc32", |b| {
        b.iter(|| firmware_proto::crc32::checksum(black_box(&packet)))
    });
    g.bench_function("frame_decode", |b| {
        let mut decoder: StreamDecoder = StreamDecoder::new();
        b.iter(|| {
            let mut len = 0;
            decoder.push(black_box(&frame[..n]), |p| len = p.len());
            len
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    single_packet,
    full_batches,
    stream_decoding,
    stream_components
);
criterion_main!(benches);
