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
    /// Frames received live from the instance that wrote them (core NATS, see the parent module's
    /// "Live frames"), by position, until the stream's copy is read: sent at once, but never counted
    /// as buffered, nor in the end of the stream, since the stream may never get them (the writer
    /// died first, and its sender was not acknowledged for them).
    live: BTreeMap<u64, (u32, Arc<[u8]>)>,
    /// The subscription that receives the live frames, while it runs.
    pub(super) live_reader: Option<tokio::task::JoinHandle<()>>,
    /// Every frame below it was acknowledged here: later live copies of them are not kept.
    acked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
            live: BTreeMap::new(),
            live_reader: None,
            acked: 0,
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

    /// Whether the cache has room for `len` more bytes, in this index and in the instance's.
    fn room_for(&self, len: usize) -> bool {
        self.cached + len <= CACHE_BYTES
            && self.budget.load(Ordering::Relaxed) + len <= CACHE_BYTES_TOTAL
    }

    fn cache(&mut self, len: usize) {
        self.cached += len;
        self.budget.fetch_add(len, Ordering::Relaxed);
    }

    fn uncache(&mut self, len: usize) {
        self.cached -= len;
        self.budget.fetch_sub(len, Ordering::Relaxed);
    }

    /// Keeps frames received live; false when they are known already (or acknowledged, or there is
    /// no room: the stream's copy brings them then).
    pub(super) fn insert_live(&mut self, position: u64, count: u32, batch: Arc<[u8]>) -> bool {
        let known = position + u64::from(count) <= self.acked
            || self.by_position.contains_key(&position)
            || self.live.contains_key(&position);
        if known || !self.room_for(batch.len()) {
            return false;
        }
        self.cache(batch.len());
        self.live.insert(position, (count, batch));
        true
    }

    fn forget_live(&mut self, position: u64) -> bool {
        match self.live.remove(&position) {
            Some((_, batch)) => {
                self.uncache(batch.len());
                true
            }
            None => false,
        }
    }

    /// Up to `limit` entries from position `from` on, in position order, the live frames among them
    /// (with no stream sequence). A live entry comes only in an unbroken run from `from`: after a hole
    /// (its live copy lost, or not kept for room), the receiver would skip the missing frames, so the
    /// list ends there until the stream's copy fills it.
    pub(super) fn range(&self, from: u64, limit: usize) -> Vec<(u64, Entry)> {
        let stored = self
            .by_position
            .range(from..)
            .take(limit)
            .map(|(pos, e)| (*pos, e.clone()));
        let live = self
            .live
            .range(from..)
            .take(limit)
            .map(|(pos, (count, batch))| {
                (
                    *pos,
                    Entry {
                        sequence: 0,
                        count: *count,
                        batch: Some(batch.clone()),
                    },
                )
            });
        let mut all: Vec<(u64, Entry)> = stored.chain(live).collect();
        // Stable: of a position both stored and live, the stored one comes first and stays.
        all.sort_by_key(|(pos, _)| *pos);
        all.dedup_by_key(|(pos, _)| *pos);
        all.truncate(limit);
        let mut end = from;
        if let Some(hole) = all.iter().position(|(pos, e)| {
            let after_hole = e.sequence == 0 && *pos > end;
            end = end.max(pos.saturating_add(u64::from(e.count)));
            after_hole
        }) {
            all.truncate(hole);
        }
        all
    }

    /// Adds a message; its frames are kept while the cache has room. True when it is new here: not
    /// known live, and not acknowledged already (such a copy is not kept: the next purge passes it).
    pub(super) fn insert(
        &mut self,
        position: u64,
        sequence: u64,
        count: u32,
        batch: Option<Arc<[u8]>>,
        limit: usize,
    ) -> bool {
        let was_live = self.forget_live(position);
        if position.saturating_add(u64::from(count)) <= self.acked {
            return false;
        }
        // The same message again (the follower read it before its write recorded it), or another
        // copy of the position: the old one goes first, so that the maps name only the new one.
        if let Some(old) = self.by_position.remove(&position) {
            self.forget_entry(&old);
        }
        let batch = batch.filter(|b| self.room_for(b.len()));
        self.cache(batch.as_ref().map_or(0, |b| b.len()));
        self.frames += u64::from(count);
        self.by_sequence.insert(sequence, position);
        let entry = Entry {
            sequence,
            count,
            batch,
        };
        self.by_position.insert(position, entry);
        // Within the subject's own message limit, forgetting the oldest positions: the stream drops
        // its oldest messages at that limit too.
        while self.by_position.len() > limit {
            if let Some((_, old)) = self.by_position.pop_first() {
                self.forget_entry(&old);
            }
        }
        !was_live
    }

    pub(super) fn remove(&mut self, position: u64) -> Option<Entry> {
        let entry = self.by_position.remove(&position)?;
        self.forget_entry(&entry);
        Some(entry)
    }

    /// Takes an entry that left `by_position` out of the counts and the sequence map.
    fn forget_entry(&mut self, entry: &Entry) {
        self.uncache(entry.batch.as_ref().map_or(0, |b| b.len()));
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
        self.acked = self.acked.max(acked_out);
        let live: Vec<u64> = self
            .live
            .range(..acked_out)
            .filter(|(pos, (count, _))| **pos + u64::from(*count) <= acked_out)
            .map(|(pos, _)| *pos)
            .collect();
        for pos in live {
            self.forget_live(pos);
        }
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
        if let Some(reader) = self.live_reader.take() {
            reader.abort();
        }
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
    fn live_frames_are_sent_but_never_counted_until_the_stream_has_them() {
        let budget = Arc::new(AtomicUsize::new(0));
        let mut index = Index::new(budget.clone());
        let batch: Arc<[u8]> = vec![0u8; 10].into();
        index.insert(0, 1, 5, Some(batch.clone()), 10);
        assert!(index.insert_live(5, 5, batch.clone()));
        assert!(!index.insert_live(5, 5, batch.clone()), "known live");
        assert!(!index.insert_live(0, 5, batch.clone()), "known stored");
        assert_eq!(
            index
                .range(0, 10)
                .iter()
                .map(|(pos, e)| (*pos, e.sequence))
                .collect::<Vec<_>>(),
            [(0, 1), (5, 0)]
        );
        assert_eq!(index.range(0, 1).len(), 1);
        assert_eq!(
            (index.frames(), index.tail()),
            (5, 5),
            "live is not buffered"
        );
        assert_eq!(budget.load(Ordering::Relaxed), 20);
        // The stream's copy replaces it, and needs no wake.
        assert!(!index.insert(5, 2, 5, Some(batch.clone()), 10));
        assert_eq!((index.frames(), index.tail()), (10, 10));
        assert_eq!(index.range(5, 10)[0].1.sequence, 2);
        assert_eq!(budget.load(Ordering::Relaxed), 20);
        // Acknowledged live frames go, and a late copy of them is not kept.
        assert!(index.insert_live(10, 5, batch.clone()));
        index.forget_acknowledged(15);
        assert_eq!(index.range(0, 10), []);
        assert!(!index.insert_live(10, 5, batch.clone()));
        assert_eq!(budget.load(Ordering::Relaxed), 0);
        assert!(index.insert_live(15, 5, batch));
        drop(index);
        assert_eq!(budget.load(Ordering::Relaxed), 0, "given back");
    }

    /// The follower may read a message of this instance before the write that published it records
    /// it: the second insert of the same position and sequence must keep the message findable by its
    /// sequence, or the next purge would pass it unacknowledged.
    #[test]
    fn a_message_inserted_twice_stays_known_by_its_sequence() {
        let mut index = Index::new(Arc::default());
        index.insert(10, 5, 4, None, 10);
        index.insert(10, 5, 4, None, 10);
        index.scanned = 5;
        assert_eq!((index.frames(), index.first_sequence()), (4, Some(5)));
        index.insert(14, 6, 4, None, 10);
        index.forget_acknowledged(12);
        assert_eq!(index.first_sequence(), Some(5), "10..14 still waits");
    }

    /// Live frames are sent only in an unbroken run from where the receiver is: one whose live copy
    /// before it was lost waits until the stream's copy fills the hole, or the receiver would skip it.
    #[test]
    fn a_live_frame_after_a_hole_waits_for_the_stream() {
        let mut index = Index::new(Arc::default());
        let batch: Arc<[u8]> = vec![0u8; 10].into();
        assert!(index.insert_live(110, 10, batch.clone()));
        assert_eq!(index.range(100, 10), [], "100..110 is missing");
        assert_eq!(index.range(110, 10).len(), 1);
        index.insert(100, 7, 10, Some(batch.clone()), 10);
        assert_eq!(
            index
                .range(100, 10)
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>(),
            [100, 110]
        );
        assert!(index.insert_live(130, 10, batch));
        assert_eq!(
            index
                .range(100, 10)
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>(),
            [100, 110],
            "120..130 is missing"
        );
    }

    /// A stream copy of frames acknowledged already (their live copy was sent) is not kept: it would
    /// count as waiting, and hold the purge back.
    #[test]
    fn a_stream_copy_of_acknowledged_frames_is_not_kept() {
        let mut index = Index::new(Arc::default());
        index.forget_acknowledged(20);
        assert!(!index.insert(10, 3, 10, None, 10));
        assert_eq!((index.frames(), index.first_sequence()), (0, None));
        assert!(index.insert(20, 4, 10, None, 10));
        assert_eq!(index.frames(), 10);
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
