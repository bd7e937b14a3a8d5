//! A flat hash table keyed by block hashes, for the two maps the simulator probes tens of
//! millions of times: a worker's prefix cache and the router's block index.
//!
//! Both are far larger than the CPU caches, so a lookup costs what its cache misses cost. A
//! general-purpose map keeps control bytes and entries in separate arrays (two misses per
//! probe); here a key and its value share one slot of an open-addressing array with linear
//! probing, so a lookup is usually one miss, and [`BlockTable::prefetch`] lets a caller that
//! knows its next keys overlap those misses. Keys are already well mixed (chained hashes), so
//! they index the array directly. Deletion shifts the following entries back rather than
//! leaving tombstones, so probe sequences stay short however many keys come and go.

use super::BlockHash;

/// The key of an empty slot. Key 0 itself is legal; it lives outside the array.
const EMPTY: BlockHash = 0;

/// Smallest array allocated once the table holds anything.
const MIN_SLOTS: usize = 16;

#[derive(Clone, Copy, Debug)]
struct Slot<V> {
    key: BlockHash,
    value: V,
}

/// A map from block hash to a small `Copy` value. Iteration order is unspecified; callers
/// whose output depends on order sort.
#[derive(Clone, Debug)]
pub struct BlockTable<V: Copy + Default> {
    slots: Vec<Slot<V>>,
    /// `slots.len() - 1`; the length is a power of two (or 0).
    mask: usize,
    /// Entries in `slots` (not counting key 0).
    len: usize,
    /// The value of key 0, which cannot sit in the array since 0 marks an empty slot.
    zero: Option<V>,
}

impl<V: Copy + Default> Default for BlockTable<V> {
    fn default() -> Self {
        BlockTable {
            slots: Vec::new(),
            mask: 0,
            len: 0,
            zero: None,
        }
    }
}

impl<V: Copy + Default> BlockTable<V> {
    pub fn len(&self) -> usize {
        self.len + usize::from(self.zero.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn home(&self, key: BlockHash) -> usize {
        key as usize & self.mask
    }

    /// The slot holding `key`, or the empty slot where it would go. The array must be
    /// non-empty (it always has an empty slot, since growth keeps the load below 1).
    fn find(&self, key: BlockHash) -> (usize, bool) {
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].key;
            if k == key {
                return (i, true);
            }
            if k == EMPTY {
                return (i, false);
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn get(&self, key: BlockHash) -> Option<V> {
        if key == EMPTY {
            return self.zero;
        }
        if self.slots.is_empty() {
            return None;
        }
        let (i, found) = self.find(key);
        found.then(|| self.slots[i].value)
    }

    pub fn get_mut(&mut self, key: BlockHash) -> Option<&mut V> {
        if key == EMPTY {
            return self.zero.as_mut();
        }
        if self.slots.is_empty() {
            return None;
        }
        let (i, found) = self.find(key);
        found.then(|| &mut self.slots[i].value)
    }

    pub fn contains_key(&self, key: BlockHash) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key`, inserting `V::default()` first if it is absent.
    pub fn get_or_default(&mut self, key: BlockHash) -> &mut V {
        if key == EMPTY {
            return self.zero.get_or_insert_with(V::default);
        }
        self.reserve_one();
        let (i, found) = self.find(key);
        if !found {
            self.slots[i] = Slot {
                key,
                value: V::default(),
            };
            self.len += 1;
        }
        &mut self.slots[i].value
    }

    /// Inserts `key` with `value` unless `key` is present; returns whether it inserted.
    pub fn insert_new(&mut self, key: BlockHash, value: V) -> bool {
        if key == EMPTY {
            if self.zero.is_some() {
                return false;
            }
            self.zero = Some(value);
            return true;
        }
        self.reserve_one();
        let (i, found) = self.find(key);
        if found {
            return false;
        }
        self.slots[i] = Slot { key, value };
        self.len += 1;
        true
    }

    pub fn remove(&mut self, key: BlockHash) -> Option<V> {
        if key == EMPTY {
            return self.zero.take();
        }
        if self.slots.is_empty() {
            return None;
        }
        let (mut hole, found) = self.find(key);
        if !found {
            return None;
        }
        let value = self.slots[hole].value;
        // Backward shift: move up every later entry of the run whose home is not between the
        // hole and its own slot, so that no probe sequence crosses an empty slot.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let k = self.slots[j].key;
            if k == EMPTY {
                break;
            }
            let home = self.home(k);
            // Distance from home to j versus from hole to j, on the ring.
            if (j.wrapping_sub(home) & self.mask) >= (j.wrapping_sub(hole) & self.mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole].key = EMPTY;
        self.len -= 1;
        Some(value)
    }

    /// Starts loading the slot where `key` would be found, so that a lookup soon after does
    /// not wait for memory. A hint only: no effect on the table's contents.
    #[inline]
    pub fn prefetch(&self, key: BlockHash) {
        #[cfg(target_arch = "x86_64")]
        if !self.slots.is_empty() {
            let slot: *const Slot<V> = &self.slots[self.home(key)];
            // SAFETY: prefetching is a hint that never faults; the address is in bounds anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    slot.cast::<i8>(),
                )
            };
        }
    }

    /// Every (key, value), in unspecified order.
    pub fn iter(&self) -> impl Iterator<Item = (BlockHash, V)> + '_ {
        self.zero.map(|v| (EMPTY, v)).into_iter().chain(
            self.slots
                .iter()
                .filter(|s| s.key != EMPTY)
                .map(|s| (s.key, s.value)),
        )
    }

    /// Keeps the entries for which `keep` returns true, after letting it change their value.
    /// O(capacity): the kept entries are reinserted.
    pub fn retain(&mut self, mut keep: impl FnMut(BlockHash, &mut V) -> bool) {
        let old = std::mem::take(self);
        for (key, mut value) in old.iter() {
            if keep(key, &mut value) {
                self.insert_new(key, value);
            }
        }
    }

    /// Room for one more entry, keeping the load at most 3/4 (linear probing slows sharply
    /// beyond that).
    fn reserve_one(&mut self) {
        if (self.len + 1) * 4 <= self.slots.len() * 3 {
            return;
        }
        let size = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(
            &mut self.slots,
            vec![
                Slot {
                    key: EMPTY,
                    value: V::default(),
                };
                size
            ],
        );
        self.mask = size - 1;
        for slot in old.into_iter().filter(|s| s.key != EMPTY) {
            let (i, _) = self.find(slot.key);
            self.slots[i] = slot;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(BlockHash, u32),
        Bump(BlockHash),
        Remove(BlockHash),
        Retain(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct keys, some with the same home slot (small values differ only in low
        // bits; multiples of 1 << 20 share every low bit), and key 0.
        let key = prop_oneof![0u64..40, (0u64..8).prop_map(|k| k << 20)];
        prop_oneof![
            4 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => key.clone().prop_map(Op::Bump),
            3 => key.prop_map(Op::Remove),
            1 => (2u32..5).prop_map(Op::Retain),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_map(ops in prop::collection::vec(op(), 0..400)) {
            let mut table = BlockTable::<u32>::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let vacant = !model.contains_key(&k);
                        prop_assert_eq!(table.insert_new(k, v), vacant);
                        model.entry(k).or_insert(v);
                    }
                    Op::Bump(k) => {
                        *table.get_or_default(k) += 1;
                        *model.entry(k).or_default() += 1;
                    }
                    Op::Remove(k) => prop_assert_eq!(table.remove(k), model.remove(&k)),
                    Op::Retain(m) => {
                        table.retain(|_, v| {
                            *v = v.wrapping_add(1);
                            *v % m != 0
                        });
                        model.retain(|_, v| {
                            *v = v.wrapping_add(1);
                            *v % m != 0
                        });
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                for k in (0u64..40).chain((0..8).map(|k| k << 20)) {
                    prop_assert_eq!(table.get(k), model.get(&k).copied());
                    prop_assert_eq!(table.contains_key(k), model.contains_key(&k));
                    table.prefetch(k);
                }
                let mut all: Vec<_> = table.iter().collect();
                all.sort_unstable();
                let expected: Vec<_> = model.iter().map(|(&k, &v)| (k, v)).collect();
                prop_assert_eq!(all, expected);
            }
        }
    }

    #[test]
    fn get_mut_changes_the_value_in_place() {
        let mut table = BlockTable::<u64>::default();
        assert_eq!(table.get_mut(5), None);
        assert!(table.is_empty());
        table.insert_new(5, 1);
        table.insert_new(0, 2);
        *table.get_mut(5).unwrap() += 10;
        *table.get_mut(0).unwrap() += 10;
        assert_eq!((table.get(5), table.get(0)), (Some(11), Some(12)));
        assert_eq!(table.len(), 2);
    }
}
