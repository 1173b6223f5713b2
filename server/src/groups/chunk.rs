//! A run of frames with consecutive positions, as the relay moves it: one firmware-proto CAN batch (the
//! bytes of a FRAMES message after its header) and the position of its first frame.
//!
//! The relay never looks inside a batch except to cut frames off its front: the duplicates of a resend
//! that overlaps what the server already has, and the oldest frames of a buffer past its retention.

use std::sync::Arc;

use firmware_proto::ext::batch::{Batch, BatchWriter};

/// Frames `seq .. seq + count` of one stream, as an encoded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The position of the first frame.
    pub seq: u64,
    /// The number of frames (never 0).
    pub count: u32,
    /// The encoded batch, shared between the relay's queues and the console's events.
    pub batch: Arc<[u8]>,
}

impl Chunk {
    /// The position after the last frame.
    pub fn end(&self) -> u64 {
        self.seq + u64::from(self.count)
    }

    /// The chunk without its first `skip` frames; None when nothing is left or the batch does not parse
    /// (it was validated on arrival, so that means a damaged buffer row).
    pub fn skip(&self, skip: u32) -> Option<Chunk> {
        if skip == 0 {
            return Some(self.clone());
        }
        if skip >= self.count {
            return None;
        }
        let batch = Batch::parse(&self.batch).ok()?;
        // The rest is never longer than the original, so the original's size always suffices.
        let mut out = vec![0u8; self.batch.len()];
        let mut writer = BatchWriter::new(&mut out).ok()?;
        for record in batch.iter().skip(skip as usize) {
            writer.push(&record).ok()?;
        }
        let kept = writer.len() as u32;
        let len = writer.finish().ok()?;
        out.truncate(len);
        (kept == self.count - skip).then(|| Chunk {
            seq: self.seq + u64::from(skip),
            count: kept,
            batch: out.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ext::batch::{CanRecord, encode_batch};
    use firmware_proto::ids::CanId;

    fn chunk(seq: u64, ids: &[u16]) -> Chunk {
        let data: Vec<[u8; 1]> = ids.iter().map(|i| [*i as u8]).collect();
        let records: Vec<CanRecord> = ids
            .iter()
            .zip(&data)
            .map(|(id, d)| CanRecord::classic(0, CanId::standard(*id).unwrap(), d))
            .collect();
        let mut buf = vec![0u8; 1024];
        let n = encode_batch(&records, &mut buf).unwrap();
        buf.truncate(n);
        Chunk {
            seq,
            count: ids.len() as u32,
            batch: buf.into(),
        }
    }

    fn ids(chunk: &Chunk) -> Vec<u32> {
        Batch::parse(&chunk.batch)
            .unwrap()
            .iter()
            .map(|r| r.id.raw())
            .collect()
    }

    #[test]
    fn skipping_cuts_the_front_and_moves_the_position() {
        let c = chunk(10, &[1, 2, 3, 4]);
        assert_eq!(c.end(), 14);
        let rest = c.skip(3).unwrap();
        assert_eq!((rest.seq, rest.count, ids(&rest)), (13, 1, vec![4]));
        assert_eq!(c.skip(0).unwrap(), c);
        assert!(c.skip(4).is_none());
        assert!(c.skip(9).is_none());
    }

    #[test]
    fn a_damaged_batch_is_none_not_a_panic() {
        let mut c = chunk(0, &[1, 2]);
        c.batch = vec![0, 2, 0, 0, 1].into();
        assert!(c.skip(1).is_none());
    }
}
