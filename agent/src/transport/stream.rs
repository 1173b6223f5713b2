//! A link over any byte stream: packets framed as CRC-32 trailer + COBS + 0x00 (PROTOCOL.md, "Byte
//! streams").
//!
//! Two tasks serve the stream: the reader feeds bytes to a fixed-size [`StreamDecoder`] and forwards each
//! verified packet; the writer frames queued packets and writes as many as are waiting in one write, so a
//! burst of frames costs one system call rather than one per packet.

use std::sync::Arc;

use firmware_proto::stream::{StreamDecoder, encode_frame, max_frame_len};
use firmware_proto::{MAX_FRAME_LEN, MAX_PACKET_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{LINK_QUEUE, Link, LinkStats};

/// The most bytes the writer gathers into one write.
const WRITE_BATCH: usize = 16 * 1024;

/// Serves `io` as a [`Link`]. The link closes when the stream reaches its end or fails, or when every
/// sender of `outgoing` is dropped.
pub fn spawn<T>(io: T, peer: impl Into<String>) -> Link
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(LINK_QUEUE);
    let (in_tx, in_rx) = mpsc::channel(LINK_QUEUE);
    let stats = Arc::new(LinkStats::default());
    tokio::spawn(read_loop(reader, in_tx, stats.clone()));
    tokio::spawn(write_loop(writer, out_rx, stats.clone()));
    Link {
        outgoing: out_tx,
        incoming: in_rx,
        stats,
        peer: peer.into(),
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    incoming: mpsc::Sender<Vec<u8>>,
    stats: Arc<LinkStats>,
) {
    let mut decoder: Box<StreamDecoder<MAX_FRAME_LEN>> = Box::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut packets: Vec<Vec<u8>> = Vec::new();
    loop {
        // Stop reading as soon as nobody listens, so that dropping a session closes the port (a serial
        // port is opened exclusively, and the next session must be able to open it).
        let n = tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            () = incoming.closed() => break,
        };
        LinkStats::add(&stats.bytes_in, n as u64);
        let before = decoder.stats();
        decoder.push(&buf[..n], |packet| packets.push(packet.to_vec()));
        let after = decoder.stats();
        LinkStats::add(
            &stats.packets_rejected,
            (after.crc_errors + after.cobs_errors + after.oversize)
                .saturating_sub(before.crc_errors + before.cobs_errors + before.oversize),
        );
        LinkStats::add(
            &stats.bytes_skipped,
            after.bytes_skipped.saturating_sub(before.bytes_skipped),
        );
        for packet in packets.drain(..) {
            LinkStats::add(&stats.packets_in, 1);
            if incoming.send(packet).await.is_err() {
                return;
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut outgoing: mpsc::Receiver<Vec<u8>>,
    stats: Arc<LinkStats>,
) {
    let frame_max = max_frame_len(MAX_PACKET_LEN);
    let mut buf = Vec::with_capacity(WRITE_BATCH + frame_max);
    let mut frame = vec![0u8; frame_max];
    while let Some(first) = outgoing.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(packet) = next.take() {
            match encode_frame(&packet, &mut frame) {
                Ok(n) => {
                    buf.extend_from_slice(&frame[..n]);
                    LinkStats::add(&stats.packets_out, 1);
                }
                // An oversize packet is the caller's bug; it is dropped, not sent half-framed.
                Err(e) => tracing::warn!(error = %e, "dropping a packet that cannot be framed"),
            }
            if buf.len() < WRITE_BATCH {
                next = outgoing.try_recv().ok();
            }
        }
        if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        LinkStats::add(&stats.bytes_out, buf.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn packets_cross_a_pipe_and_garbage_costs_only_itself() {
        let (a, mut b) = tokio::io::duplex(4096);
        let mut link = spawn(a, "pipe");

        // The far end writes garbage, a good frame, a frame with a broken CRC, and another good frame.
        let mut frame = vec![0u8; 64];
        let mut wire = vec![0x13, 0x37, 0x00];
        let n = encode_frame(b"first", &mut frame).unwrap();
        wire.extend_from_slice(&frame[..n]);
        let n = encode_frame(b"broken", &mut frame).unwrap();
        frame[2] ^= 0x40;
        wire.extend_from_slice(&frame[..n]);
        let n = encode_frame(b"second", &mut frame).unwrap();
        wire.extend_from_slice(&frame[..n]);
        b.write_all(&wire).await.unwrap();

        assert_eq!(link.incoming.recv().await.unwrap(), b"first");
        assert_eq!(link.incoming.recv().await.unwrap(), b"second");
        assert_eq!(link.stats.packets_rejected.load(Ordering::Relaxed), 2);

        // And the other way.
        link.outgoing.send(b"to the dongle".to_vec()).await.unwrap();
        let mut got = vec![0u8; 64];
        let n = b.read(&mut got).await.unwrap();
        let mut decoder: StreamDecoder<64> = StreamDecoder::default();
        let mut seen = Vec::new();
        decoder.push(&got[..n], |p| seen.push(p.to_vec()));
        assert_eq!(seen, vec![b"to the dongle".to_vec()]);

        // The far end going away closes the link.
        drop(b);
        assert!(link.incoming.recv().await.is_none());
    }
}
