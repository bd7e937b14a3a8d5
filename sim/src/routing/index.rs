//! The block index (the "registry"): which workers hold which KV block, built only from the
//! Stored/Removed events the workers publish, so it is exactly as fresh as those events.

use std::collections::BTreeMap;

use super::WorkerId;
use crate::kv::{BlockHash, BlockHashMap, KvEvent};

/// The workers holding one block: a bitset indexed by worker id. The first word is inline, so
/// a cluster of up to 64 workers costs no allocation per block.
#[derive(Clone, Debug, Default)]
struct WorkerSet {
    low: u64,
    /// Words 1.., without trailing zero words (so an empty set is `low == 0 && high.is_empty()`).
    high: Vec<u64>,
}

impl WorkerSet {
    fn insert(&mut self, worker: WorkerId) {
        let (word, bit) = split(worker);
        if word == 0 {
            self.low |= bit;
        } else {
            if self.high.len() < word {
                self.high.resize(word, 0);
            }
            self.high[word - 1] |= bit;
        }
    }

    fn remove(&mut self, worker: WorkerId) {
        let (word, bit) = split(worker);
        if word == 0 {
            self.low &= !bit;
        } else if let Some(w) = self.high.get_mut(word - 1) {
            *w &= !bit;
            while self.high.last() == Some(&0) {
                self.high.pop();
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.low == 0 && self.high.is_empty()
    }

    fn word(&self, i: usize) -> u64 {
        if i == 0 {
            self.low
        } else {
            self.high.get(i - 1).copied().unwrap_or(0)
        }
    }

    fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        std::iter::once(self.low)
            .chain(self.high.iter().copied())
            .enumerate()
            .flat_map(|(i, word)| bits(word).map(move |b| (i * 64 + b) as WorkerId))
    }
}

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

/// Which workers hold which block hash.
#[derive(Clone, Debug, Default)]
pub struct BlockIndex {
    holders: BlockHashMap<WorkerSet>,
}

impl BlockIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stored twice by the same worker is idempotent; Removed of a hash the worker does not
    /// hold is ignored.
    pub fn apply(&mut self, worker: WorkerId, event: KvEvent) {
        match event {
            KvEvent::Stored(hash) => self.holders.entry(hash).or_default().insert(worker),
            KvEvent::Removed(hash) => {
                if let Some(set) = self.holders.get_mut(&hash) {
                    set.remove(worker);
                    if set.is_empty() {
                        self.holders.remove(&hash);
                    }
                }
            }
        }
    }

    /// Forget everything a worker held (it died or left). O(blocks indexed).
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.holders.retain(|_, set| {
            set.remove(worker);
            !set.is_empty()
        });
    }

    /// Distinct hashes held by at least one worker.
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
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
        let Some(first) = hashes.first().and_then(|h| self.holders.get(h)) else {
            return;
        };
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
            *a = first.word(i);
        }
        if !overlap.len().is_multiple_of(64) {
            alive[words - 1] &= (1u64 << (overlap.len() % 64)) - 1;
        }
        // Words past the last one with a matching worker are zero and stay zero.
        let mut live_words = alive.iter().rposition(|&a| a != 0).map_or(0, |i| i + 1);

        let mut depth = 1;
        while depth < hashes.len() && live_words > 0 {
            let set = self.holders.get(&hashes[depth]);
            let mut last_live = 0;
            for (i, a) in alive[..live_words].iter_mut().enumerate() {
                let next = set.map_or(0, |s| s.word(i)) & *a;
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
        self.holders
            .iter()
            .map(|(&hash, set)| (hash, set.workers().collect()))
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
