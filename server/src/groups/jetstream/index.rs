//! What this instance knows of one direction's messages in the stream: their positions, stream
//! sequences and (within a budget) their frames. See the parent module's "Positions and the index".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{CACHE_BYTES, CACHE_BYTES_TOTAL};

/// One direction's messages as this instance knows them.
#[derive(Debug)]
pub(super) struct Index {
    /// The messages by the position of their first frame.
    pub(super) by_position: BTreeMap<u64, Entry>,
    /// The same messages by stream sequence (to their position), so that the first one still waiting
    /// and those below a sequence are found without a scan: an acknowledgement runs on the relay path.
    pub(super) by_sequence: BTreeMap<u64, u64>,
    /// The frames in the entries.
    frames: u64,
    /// The last stream sequence read from the subject: every message at or below it is in the index
    /// (or was removed).
    pub(super) scanned: u64,
    /// The bytes of frames held in the entries.
    cached: usize,
    /// The bytes of frames held by every index of the store, this one's included.
    budget: Arc<AtomicUsize>,
    /// When the index was last checked against the stream's front.
    pub(super) pruned_at: Option<tokio::time::Instant>,
    /// The consumer that feeds the index, while it runs.
    pub(super) follower: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) sequence: u64,
    pub(super) count: u32,
    /// The message's frames, when kept in memory.
    pub(super) batch: Option<Arc<[u8]>>,
}

impl Index {
    pub(super) fn new(budget: Arc<AtomicUsize>) -> Self {
        Index {
            by_position: BTreeMap::new(),
            by_sequence: BTreeMap::new(),
            frames: 0,
            scanned: 0,
            cached: 0,
            budget,
            pruned_at: None,
            follower: None,
        }
    }

    pub(super) fn frames(&self) -> u64 {
        self.frames
    }

    /// The stream sequence of the first message still in the index.
    pub(super) fn first_sequence(&self) -> Option<u64> {
        self.by_sequence.keys().next().copied()
    }

    /// The position after the last frame (0 when empty).
    pub(super) fn tail(&self) -> u64 {
        self.by_position
            .iter()
            .map(|(pos, e)| pos + u64::from(e.count))
            .max()
            .unwrap_or(0)
    }

    /// Adds a message; its frames are kept while the cache has room.
    pub(super) fn insert(
        &mut self,
        position: u64,
        sequence: u64,
        count: u32,
        batch: Option<Arc<[u8]>>,
        limit: usize,
    ) {
        let batch = batch.filter(|b| {
            self.cached + b.len() <= CACHE_BYTES
                && self.budget.load(Ordering::Relaxed) + b.len() <= CACHE_BYTES_TOTAL
        });
        let len = batch.as_ref().map_or(0, |b| b.len());
        self.cached += len;
        self.budget.fetch_add(len, Ordering::Relaxed);
        self.frames += u64::from(count);
        self.by_sequence.insert(sequence, position);
        let entry = Entry {
            sequence,
            count,
            batch,
        };
        if let Some(old) = self.by_position.insert(position, entry) {
            self.forget_entry(&old);
        }
        // Within the subject's own message limit, forgetting the oldest positions: the stream drops
        // its oldest messages at that limit too.
        while self.by_position.len() > limit {
            if let Some((_, old)) = self.by_position.pop_first() {
                self.forget_entry(&old);
            }
        }
    }

    pub(super) fn remove(&mut self, position: u64) -> Option<Entry> {
        let entry = self.by_position.remove(&position)?;
        self.forget_entry(&entry);
        Some(entry)
    }

    /// Takes an entry that left `by_position` out of the counts and the sequence map.
    fn forget_entry(&mut self, entry: &Entry) {
        let len = entry.batch.as_ref().map_or(0, |b| b.len());
        self.cached -= len;
        self.budget.fetch_sub(len, Ordering::Relaxed);
        self.frames -= u64::from(entry.count);
        self.by_sequence.remove(&entry.sequence);
    }

    /// The frames of the entries that do not end at or below `acked_out`: still waiting for an
    /// acknowledgement. Only the entries below `acked_out` are looked at.
    pub(super) fn frames_above(&self, acked_out: u64) -> u64 {
        let below: u64 = self
            .by_position
            .range(..acked_out)
            .filter(|(pos, e)| **pos + u64::from(e.count) <= acked_out)
            .map(|(_, e)| u64::from(e.count))
            .sum();
        self.frames - below
    }

    /// Forgets the entries that end at or below `acked_out`: acknowledged, whatever the stream holds.
    pub(super) fn forget_acknowledged(&mut self, acked_out: u64) {
        let gone: Vec<u64> = self
            .by_position
            .iter()
            .take_while(|(pos, _)| **pos < acked_out)
            .filter(|(pos, e)| **pos + u64::from(e.count) <= acked_out)
            .map(|(pos, _)| *pos)
            .collect();
        for pos in gone {
            self.remove(pos);
        }
    }

    /// Forgets the messages the stream no longer has below `first` (the subject's first sequence):
    /// acknowledged by another instance, or removed by the stream's limits.
    pub(super) fn forget_below(&mut self, first: Option<u64>) {
        let first = first.unwrap_or(u64::MAX);
        // Never what the follower has not read yet: it is above `scanned`.
        let first = first.min(self.scanned + 1);
        let gone: Vec<u64> = self
            .by_sequence
            .range(..first)
            .map(|(_, pos)| *pos)
            .collect();
        for pos in gone {
            self.remove(pos);
        }
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.cached, Ordering::Relaxed);
        if let Some(follower) = self.follower.take() {
            follower.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_forgets_what_left_the_front_and_stays_within_its_limits() {
        let mut index = Index::new(Arc::default());
        let batch: Arc<[u8]> = vec![0u8; 100].into();
        for (pos, sequence) in [(0, 1), (10, 2), (20, 3)] {
            index.insert(pos, sequence, 10, Some(batch.clone()), 3);
        }
        index.scanned = 3;
        assert_eq!((index.frames(), index.tail(), index.cached), (30, 30, 300));
        index.forget_below(Some(2));
        assert_eq!(
            index.by_position.keys().copied().collect::<Vec<_>>(),
            [10, 20]
        );
        assert_eq!(index.cached, 200);
        // The message limit forgets the oldest positions.
        index.insert(30, 4, 10, None, 2);
        assert_eq!(
            index.by_position.keys().copied().collect::<Vec<_>>(),
            [20, 30]
        );
        assert_eq!(index.cached, 100);
        // What the follower has not read (above `scanned`) is never taken for gone.
        index.forget_below(None);
        assert_eq!(index.by_position.keys().copied().collect::<Vec<_>>(), [30]);
        index.scanned = 4;
        index.forget_below(None);
        assert_eq!((index.frames(), index.tail(), index.cached), (0, 0, 0));
    }

    #[test]
    fn an_acknowledgement_finds_the_first_message_still_waiting_by_sequence() {
        let mut index = Index::new(Arc::default());
        // Frames 20.. were written first (sequence 1), the ones in flight before them after.
        index.insert(20, 1, 10, None, 10);
        index.insert(0, 2, 10, None, 10);
        index.insert(10, 3, 10, None, 10);
        index.scanned = 3;
        assert_eq!((index.frames(), index.first_sequence()), (30, Some(1)));
        assert_eq!(index.frames_above(25), 10, "20.. is not wholly below 25");
        assert_eq!(index.frames_above(0), 30);
        assert_eq!(index.frames, 30, "counting forgets nothing");
        index.forget_acknowledged(25);
        assert_eq!(index.by_position.keys().copied().collect::<Vec<_>>(), [20]);
        assert_eq!((index.frames(), index.first_sequence()), (10, Some(1)));
        index.forget_acknowledged(30);
        assert_eq!((index.frames(), index.first_sequence()), (0, None));
        // A position written again (a second copy) replaces the first in both maps.
        index.insert(30, 4, 5, None, 10);
        index.insert(30, 5, 5, None, 10);
        assert_eq!((index.frames(), index.first_sequence()), (5, Some(5)));
        index.scanned = 5;
        index.forget_below(Some(6));
        assert_eq!((index.frames(), index.first_sequence()), (0, None));
    }

    #[test]
    fn the_indexes_of_an_instance_share_one_budget() {
        let budget = Arc::new(AtomicUsize::new(CACHE_BYTES_TOTAL - 100));
        let mut index = Index::new(budget.clone());
        index.insert(0, 1, 1, Some(vec![0u8; 60].into()), 10);
        index.insert(1, 2, 1, Some(vec![0u8; 60].into()), 10);
        assert!(index.by_position[&0].batch.is_some());
        assert!(
            index.by_position[&1].batch.is_none(),
            "past the instance's budget"
        );
        assert_eq!(budget.load(Ordering::Relaxed), CACHE_BYTES_TOTAL - 40);
        drop(index);
        assert_eq!(
            budget.load(Ordering::Relaxed),
            CACHE_BYTES_TOTAL - 100,
            "given back"
        );
    }

    #[test]
    fn frames_past_the_cache_are_not_kept() {
        let mut index = Index::new(Arc::default());
        let big: Arc<[u8]> = vec![0u8; CACHE_BYTES - 10].into();
        index.insert(0, 1, 1, Some(big), 10);
        index.insert(1, 2, 1, Some(vec![0u8; 20].into()), 10);
        assert!(index.by_position[&0].batch.is_some());
        assert!(
            index.by_position[&1].batch.is_none(),
            "read from the stream when sent"
        );
        index.remove(0);
        assert_eq!(index.cached, 0);
    }
}
