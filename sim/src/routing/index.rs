//! The block index (the "registry"): which workers hold which KV block, built only from the
//! Stored/Removed events the workers publish, so it is exactly as fresh as those events.

use std::collections::BTreeMap;

use super::WorkerId;
use crate::kv::{BlockHash, BlockHashMap, BlockTable, KvEvent};

/// Word index and bit mask of a worker.
fn split(worker: WorkerId) -> (usize, u64) {
    ((worker / 64) as usize, 1u64 << (worker % 64))
}

/// Positions of the set bits of `word`, lowest first.
fn bits(mut word: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (word != 0).then(|| {
            let b = word.trailing_zeros() as usize;
            word &= word - 1;
            b
        })
    })
}

/// Words of an overlap walk kept on the stack: clusters of up to 1024 workers allocate nothing.
const STACK_WORDS: usize = 16;

/// Which workers hold which block hash: per hash, a bitset indexed by worker id.
///
/// The first word (workers 0..64) sits in a flat table slot beside its hash, so a cluster of up
/// to 64 workers costs one 16-byte slot per block and one memory access per lookup; the words
/// of higher workers live in a side map, empty in such clusters. A hash is in `low` exactly
/// when some worker holds it (its word may be 0 when only higher workers do).
#[derive(Clone, Debug, Default)]
pub struct BlockIndex {
    low: BlockTable<u64>,
    /// Words 1.. of a hash's set, without trailing zero words; absent when all are zero.
    high: BlockHashMap<Vec<u64>>,
}

impl BlockIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stored twice by the same worker is idempotent; Removed of a hash the worker does not
    /// hold is ignored.
    pub fn apply(&mut self, worker: WorkerId, event: KvEvent) {
        let (word, bit) = split(worker);
        match event {
            KvEvent::Stored(hash) => {
                let low = self.low.get_or_default(hash);
                if word == 0 {
                    *low |= bit;
                } else {
                    let high = self.high.entry(hash).or_default();
                    if high.len() < word {
                        high.resize(word, 0);
                    }
                    high[word - 1] |= bit;
                }
            }
            KvEvent::Removed(hash) => {
                let Some(low) = self.low.get_mut(hash) else {
                    return;
                };
                if word == 0 {
                    *low &= !bit;
                    if *low != 0 {
                        return;
                    }
                } else {
                    let Some(high) = self.high.get_mut(&hash) else {
                        return;
                    };
                    if let Some(w) = high.get_mut(word - 1) {
                        *w &= !bit;
                    }
                    while high.last() == Some(&0) {
                        high.pop();
                    }
                    if high.is_empty() {
                        self.high.remove(&hash);
                    }
                    if *low != 0 {
                        return;
                    }
                }
                if !self.high.contains_key(&hash) {
                    self.low.remove(hash);
                }
            }
        }
    }

    /// Applies a batch of one worker's events in order, fetching their table slots ahead so
    /// that the lookups overlap their memory accesses instead of waiting on each in turn.
    pub fn apply_all(&mut self, worker: WorkerId, events: &[KvEvent]) {
        for &event in events {
            let (KvEvent::Stored(hash) | KvEvent::Removed(hash)) = event;
            self.low.prefetch(hash);
        }
        for &event in events {
            self.apply(worker, event);
        }
    }

    /// Forget everything a worker held (it died or left). O(blocks indexed).
    pub fn remove_worker(&mut self, worker: WorkerId) {
        let (word, bit) = split(worker);
        if word == 0 {
            let high = &self.high;
            self.low.retain(|hash, low| {
                *low &= !bit;
                *low != 0 || high.contains_key(&hash)
            });
            return;
        }
        self.high.retain(|_, high| {
            if let Some(w) = high.get_mut(word - 1) {
                *w &= !bit;
            }
            while high.last() == Some(&0) {
                high.pop();
            }
            !high.is_empty()
        });
        let high = &self.high;
        self.low
            .retain(|hash, low| *low != 0 || high.contains_key(&hash));
    }

    /// Distinct hashes held by at least one worker.
    pub fn len(&self) -> usize {
        self.low.len()
    }

    pub fn is_empty(&self) -> bool {
        self.low.is_empty()
    }

    /// Word `i` of the set of `hash`, whose first word is `low`.
    fn word(&self, hash: BlockHash, low: u64, i: usize) -> u64 {
        if i == 0 {
            low
        } else {
            self.high
                .get(&hash)
                .and_then(|h| h.get(i - 1))
                .copied()
                .unwrap_or(0)
        }
    }

    /// overlap[w] = number of leading blocks of `hashes` that worker w holds, for every
    /// w < overlap.len() (the caller sizes the slice to the worker count). Walks the hashes
    /// once, stopping when no worker holds the next block: O(matched depth), not O(workers x depth).
    ///
    /// The walk keeps the set of workers that still match as bitset words; at each depth the
    /// workers that drop out get their overlap, so the cost is one word operation per 64
    /// workers per depth plus one write per worker that matched at all.
    pub fn overlaps(&self, hashes: &[BlockHash], overlap: &mut [u32]) {
        overlap.fill(0);
        let Some(first) = hashes.first().and_then(|&h| self.low.get(h)) else {
            return;
        };
        for &h in &hashes[1..] {
            self.low.prefetch(h);
        }
        let words = overlap.len().div_ceil(64);
        let mut stack = [0u64; STACK_WORDS];
        let mut heap = Vec::new();
        let alive: &mut [u64] = if words <= STACK_WORDS {
            &mut stack[..words]
        } else {
            heap.resize(words, 0);
            &mut heap
        };
        for (i, a) in alive.iter_mut().enumerate() {
            *a = self.word(hashes[0], first, i);
        }
        if !overlap.len().is_multiple_of(64) {
            alive[words - 1] &= (1u64 << (overlap.len() % 64)) - 1;
        }
        // Words past the last one with a matching worker are zero and stay zero.
        let mut live_words = alive.iter().rposition(|&a| a != 0).map_or(0, |i| i + 1);

        let mut depth = 1;
        while depth < hashes.len() && live_words > 0 {
            let hash = hashes[depth];
            let set = self.low.get(hash);
            let mut last_live = 0;
            for (i, a) in alive[..live_words].iter_mut().enumerate() {
                let next = set.map_or(0, |low| self.word(hash, low, i)) & *a;
                for b in bits(*a & !next) {
                    overlap[i * 64 + b] = depth as u32;
                }
                *a = next;
                if next != 0 {
                    last_live = i + 1;
                }
            }
            live_words = last_live;
            depth += 1;
        }
        for (i, &a) in alive[..live_words].iter().enumerate() {
            for b in bits(a) {
                overlap[i * 64 + b] = depth as u32;
            }
        }
    }

    /// Sorted (hash, sorted workers) view, for tests and debugging.
    pub fn snapshot(&self) -> BTreeMap<BlockHash, Vec<WorkerId>> {
        self.low
            .iter()
            .map(|(hash, low)| {
                let high = self.high.get(&hash).map_or(&[][..], |h| &h[..]);
                let workers = std::iter::once(low)
                    .chain(high.iter().copied())
                    .enumerate()
                    .flat_map(|(i, word)| bits(word).map(move |b| (i * 64 + b) as WorkerId))
                    .collect();
                (hash, workers)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn stored(index: &mut BlockIndex, worker: WorkerId, hashes: &[BlockHash]) {
        for &h in hashes {
            index.apply(worker, KvEvent::Stored(h));
        }
    }

    #[test]
    fn stores_removes_and_forgets_workers() {
        let mut index = BlockIndex::new();
        assert!(index.is_empty());
        stored(&mut index, 3, &[10, 11]);
        stored(&mut index, 3, &[10]);
        stored(&mut index, 200, &[10]);
        index.apply(5, KvEvent::Removed(11));
        index.apply(3, KvEvent::Removed(99));
        assert_eq!(
            index.snapshot(),
            BTreeMap::from([(10, vec![3, 200]), (11, vec![3])])
        );
        index.apply(3, KvEvent::Removed(11));
        assert_eq!(index.len(), 1);
        index.remove_worker(200);
        index.remove_worker(3);
        assert!(index.is_empty());
    }

    #[test]
    fn overlaps_count_leading_blocks_only() {
        let mut index = BlockIndex::new();
        stored(&mut index, 0, &[1, 2, 3]);
        stored(&mut index, 1, &[1, 2]);
        stored(&mut index, 2, &[2, 3]);
        stored(&mut index, 70, &[1, 2, 3, 4]);
        let mut overlap = vec![9; 72];
        index.overlaps(&[1, 2, 3, 4], &mut overlap);
        assert_eq!(&overlap[..3], &[3, 2, 0]);
        assert_eq!(overlap[70], 4);
        assert_eq!(overlap[71], 0);
        // A slice too short for worker 70 leaves it out.
        let mut short = vec![9; 2];
        index.overlaps(&[1, 2, 3, 4], &mut short);
        assert_eq!(short, vec![3, 2]);
        index.overlaps(&[7, 1], &mut overlap);
        assert!(overlap.iter().all(|&o| o == 0));
    }

    #[derive(Clone, Debug)]
    enum Ev {
        Stored(WorkerId, BlockHash),
        Removed(WorkerId, BlockHash),
        Forget(WorkerId),
    }

    fn ev(max_worker: WorkerId) -> impl Strategy<Value = Ev> {
        let w = 0..max_worker;
        let h = 0u64..12;
        prop_oneof![
            6 => (w.clone(), h.clone()).prop_map(|(w, h)| Ev::Stored(w, h)),
            3 => (w.clone(), h).prop_map(|(w, h)| Ev::Removed(w, h)),
            1 => w.prop_map(Ev::Forget),
        ]
    }

    fn naive_overlap(
        model: &BTreeMap<BlockHash, BTreeSet<WorkerId>>,
        hashes: &[BlockHash],
        w: WorkerId,
    ) -> u32 {
        hashes
            .iter()
            .take_while(|h| model.get(h).is_some_and(|s| s.contains(&w)))
            .count() as u32
    }

    proptest! {
        #[test]
        fn index_equals_its_events(
            max_worker in prop_oneof![Just(3u32), Just(64), Just(70), Just(1100)],
            events in prop::collection::vec(ev(1100), 0..120),
            queries in prop::collection::vec(
                prop_oneof![
                    (0u64..10).prop_map(|n| (0..n).collect::<Vec<_>>()),
                    prop::collection::vec(0u64..12, 0..8),
                ],
                1..6,
            ),
            slice_len in 0usize..1200,
        ) {
            let mut index = BlockIndex::new();
            let mut model: BTreeMap<BlockHash, BTreeSet<WorkerId>> = BTreeMap::new();
            for e in events {
                match e {
                    Ev::Stored(w, h) => {
                        let w = w % max_worker;
                        index.apply(w, KvEvent::Stored(h));
                        model.entry(h).or_default().insert(w);
                    }
                    Ev::Removed(w, h) => {
                        let w = w % max_worker;
                        index.apply(w, KvEvent::Removed(h));
                        if let Some(s) = model.get_mut(&h) {
                            s.remove(&w);
                            if s.is_empty() {
                                model.remove(&h);
                            }
                        }
                    }
                    Ev::Forget(w) => {
                        let w = w % max_worker;
                        index.remove_worker(w);
                        model.retain(|_, s| {
                            s.remove(&w);
                            !s.is_empty()
                        });
                    }
                }
            }
            let expected: BTreeMap<BlockHash, Vec<WorkerId>> = model
                .iter()
                .map(|(&h, s)| (h, s.iter().copied().collect()))
                .collect();
            prop_assert_eq!(index.snapshot(), expected);
            prop_assert_eq!(index.len(), model.len());
            let mut overlap = vec![u32::MAX; slice_len];
            for q in queries {
                index.overlaps(&q, &mut overlap);
                for (w, &o) in overlap.iter().enumerate() {
                    prop_assert_eq!(o, naive_overlap(&model, &q, w as WorkerId), "worker {}", w);
                }
            }
        }
    }
}
