//! The paged KV block manager of one worker: a fixed pool of blocks, a prefix cache keyed by
//! chained block hashes, and LRU eviction of cached blocks that no sequence references.
//!
//! Every operation is O(1) per block touched: the free list is a stack, the evictable blocks
//! form an intrusive doubly linked list threaded through the block table, and the prefix cache
//! is a flat hash table from block hash to block id.

use std::collections::VecDeque;

use super::{BlockHash, BlockId, BlockTable};

/// A change to the set of blocks a worker holds in its prefix cache, as a KV-aware router
/// sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KvEvent {
    Stored(BlockHash),
    Removed(BlockHash),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// `needed` new blocks were asked for beyond the reused prefix; only `available` could be
    /// had without touching blocks in use.
    #[error("out of KV blocks: {needed} needed, {available} available")]
    OutOfBlocks { needed: u32, available: u32 },
    /// More full-block hashes than blocks: the request describes no valid sequence.
    #[error("{hashes} block hashes given for a sequence of {num_blocks} blocks")]
    MoreHashesThanBlocks { hashes: usize, num_blocks: usize },
}

/// The blocks of a newly admitted sequence, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub blocks: Vec<BlockId>,
    /// How many leading blocks were found in the prefix cache (their KV need not be computed).
    pub cached_blocks: usize,
}

/// Eviction-queue entries a block table looks ahead of the one being evicted: the block's
/// own entry at the longer distance, its hash's prefix-cache slot at the shorter (by then
/// the block has arrived, so its hash is known without waiting).
const PREFETCH_BLOCK_AHEAD: usize = 8;
const PREFETCH_SLOT_AHEAD: usize = 4;

/// Bit of `Block::tag` set while the block is registered in the prefix cache under its hash.
const REGISTERED: u32 = 1 << 31;
/// The other bits of `Block::tag`: the stamp of the block's latest eviction-queue entry.
const STAMP_MASK: u32 = REGISTERED - 1;

#[derive(Clone, Copy, Debug, Default)]
struct Block {
    /// The hash under which the block is registered in the prefix cache (when it is).
    hash: BlockHash,
    ref_count: u32,
    /// REGISTERED, plus the stamp of the queue entry that makes it evictable (meaningful only
    /// while the block is evictable: registered, ref 0).
    tag: u32,
}

impl Block {
    fn registered(&self) -> bool {
        self.tag & REGISTERED != 0
    }
}

/// The paged KV block manager of one worker.
///
/// A block is in exactly one state: referenced (ref_count > 0), free (unreferenced and not in
/// the prefix cache) or evictable (unreferenced but still cached, so a later request with the
/// same prefix can reuse it until its space is needed).
///
/// Evictable blocks are kept in least-recently-used order as a queue of (block, stamp)
/// entries rather than a linked list: a block becoming evictable appends an entry with a new
/// stamp, and an entry counts only while its block is still evictable with that stamp, so
/// reusing a block needs no unlinking. Evicting walks an array, whose next entries (and their
/// blocks and cache slots) can be fetched ahead; a linked list would wait on every hop. The
/// order is exactly the linked list's.
#[derive(Clone, Debug)]
pub struct BlockManager {
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    /// Evictable blocks, least recently used first, among stale entries.
    lru: VecDeque<(BlockId, u32)>,
    /// The stamp of the next queue entry.
    next_stamp: u32,
    used: u32,
    cache: BlockTable<BlockId>,
    prefix_caching: bool,
    events: Vec<KvEvent>,
    events_enabled: bool,
}

impl BlockManager {
    pub fn new(capacity_blocks: u32, prefix_caching: bool) -> Self {
        let blocks = vec![Block::default(); capacity_blocks as usize];
        // Reversed so that blocks are handed out in id order, which keeps tests readable.
        let free = (0..capacity_blocks).rev().collect();
        BlockManager {
            blocks,
            free,
            lru: VecDeque::new(),
            next_stamp: 0,
            used: 0,
            cache: BlockTable::default(),
            prefix_caching,
            events: Vec::new(),
            events_enabled: true,
        }
    }

    pub fn capacity_blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Blocks referenced by at least one sequence.
    pub fn used_blocks(&self) -> u32 {
        self.used
    }

    /// Blocks a new sequence could take: free ones plus evictable cached ones.
    pub fn available_blocks(&self) -> u32 {
        self.capacity_blocks() - self.used
    }

    /// Blocks registered in the prefix cache, referenced or not.
    pub fn cached_blocks(&self) -> u32 {
        self.cache.len() as u32
    }

    /// Longest prefix of `hashes` present in the prefix cache. No side effects.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        self.probe(hashes, |_| {}).0
    }

    /// Blocks for a sequence of `num_blocks` blocks whose first `hashes.len()` full blocks have
    /// these hashes (`hashes.len() <= num_blocks`). The cached prefix is shared (ref +1, no
    /// longer evictable); the rest come from free blocks, evicting the least recently used
    /// unreferenced cached blocks (each eviction emits Removed). All or nothing: on error
    /// nothing changes. `cached_blocks` = how many leading blocks were reused.
    pub fn allocate(
        &mut self,
        hashes: &[BlockHash],
        num_blocks: usize,
    ) -> Result<Allocation, KvError> {
        // Bounded by the pool: `num_blocks` is unchecked input at this point.
        let mut blocks = Vec::with_capacity(num_blocks.min(self.blocks.len()));
        let cached = self.check(hashes, num_blocks, |id| blocks.push(id))?;
        // Pin the reused prefix first so that the evictions below cannot take it.
        for &id in &blocks {
            self.pin(id);
        }
        for _ in cached..num_blocks {
            blocks.push(self.take());
        }
        Ok(Allocation {
            blocks,
            cached_blocks: cached,
        })
    }

    /// Whether `allocate(hashes, num_blocks)` would succeed now. Cheap, no side effects.
    pub fn can_allocate(&self, hashes: &[BlockHash], num_blocks: usize) -> bool {
        self.check(hashes, num_blocks, |_| {}).is_ok()
    }

    /// One more block at the end of a growing sequence.
    pub fn append(&mut self, seq: &mut Vec<BlockId>) -> Result<(), KvError> {
        if self.available_blocks() == 0 {
            return Err(KvError::OutOfBlocks {
                needed: 1,
                available: 0,
            });
        }
        seq.push(self.take());
        Ok(())
    }

    /// `block` is full and its KV computed: register it in the prefix cache under `hash`
    /// (emits Stored). No-op when caching is off, when the block already has this hash, or when
    /// another block already holds `hash` (the duplicate stays unregistered, freed normally).
    ///
    /// A registered block's content is fixed, so a block already registered under another hash
    /// keeps it; an unreferenced or unknown block is ignored.
    pub fn commit(&mut self, block: BlockId, hash: BlockHash) {
        if !self.prefix_caching {
            return;
        }
        let Some(b) = self.blocks.get_mut(block as usize) else {
            return;
        };
        if b.ref_count == 0 || b.registered() {
            return;
        }
        if self.cache.insert_new(hash, block) {
            b.hash = hash;
            b.tag |= REGISTERED;
            if self.events_enabled {
                self.events.push(KvEvent::Stored(hash));
            }
        }
    }

    /// `commit` of each (block, hash) pair in order, with every block and cache slot fetched
    /// ahead so that their memory accesses overlap.
    pub fn commit_all(&mut self, blocks: &[BlockId], hashes: &[BlockHash]) {
        if !self.prefix_caching {
            return;
        }
        for (&block, &hash) in blocks.iter().zip(hashes) {
            if let Some(b) = self.blocks.get(block as usize) {
                prefetch(b);
            }
            self.cache.prefetch(hash);
        }
        for (&block, &hash) in blocks.iter().zip(hashes) {
            self.commit(block, hash);
        }
    }

    /// Release a sequence's blocks (ref -1). At ref 0 a registered block becomes evictable
    /// (most recently used; release in reverse order so a sequence's tail is evicted before its
    /// head), an unregistered one returns to the free list. Ids that are unknown or already
    /// unreferenced are ignored.
    pub fn free(&mut self, seq: &[BlockId]) {
        for &id in seq {
            if let Some(b) = self.blocks.get(id as usize) {
                prefetch(b);
            }
        }
        for &id in seq.iter().rev() {
            let Some(b) = self.blocks.get_mut(id as usize) else {
                continue;
            };
            if b.ref_count == 0 {
                continue;
            }
            b.ref_count -= 1;
            if b.ref_count > 0 {
                continue;
            }
            self.used -= 1;
            if b.registered() {
                let stamp = self.next_stamp;
                self.next_stamp = (stamp + 1) & STAMP_MASK;
                b.tag = REGISTERED | stamp;
                self.lru.push_back((id, stamp));
                self.compact_lru();
            } else {
                self.free.push(id);
            }
        }
    }

    /// Events since the last call, in the order they happened.
    pub fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        out.append(&mut self.events);
    }

    /// Stop recording events (a simulation without a KV-aware router does not need them).
    pub fn set_events_enabled(&mut self, enabled: bool) {
        self.events_enabled = enabled;
    }

    /// The cached prefix length of `hashes` and how many of those blocks are evictable now
    /// (reusing them takes them out of the pool available to new blocks). `visit` sees each
    /// prefix block, so that `allocate` looks every hash up once.
    fn probe(&self, hashes: &[BlockHash], mut visit: impl FnMut(BlockId)) -> (usize, u32) {
        if !self.prefix_caching {
            return (0, 0);
        }
        for &hash in hashes {
            self.cache.prefetch(hash);
        }
        let mut unreferenced = 0;
        for (i, hash) in hashes.iter().enumerate() {
            match self.cache.get(*hash) {
                Some(id) => {
                    unreferenced += u32::from(self.blocks[id as usize].ref_count == 0);
                    visit(id);
                }
                None => return (i, unreferenced),
            }
        }
        (hashes.len(), unreferenced)
    }

    /// The cached prefix length if `allocate(hashes, num_blocks)` can succeed; `visit` sees
    /// the prefix blocks.
    fn check(
        &self,
        hashes: &[BlockHash],
        num_blocks: usize,
        visit: impl FnMut(BlockId),
    ) -> Result<usize, KvError> {
        if hashes.len() > num_blocks {
            return Err(KvError::MoreHashesThanBlocks {
                hashes: hashes.len(),
                num_blocks,
            });
        }
        let (cached, pinned) = self.probe(hashes, visit);
        // Saturating: a hash listed twice counts its block twice, which only errs on the safe side.
        let available = self.available_blocks().saturating_sub(pinned);
        let needed = num_blocks - cached;
        if needed > available as usize {
            return Err(KvError::OutOfBlocks {
                needed: u32::try_from(needed).unwrap_or(u32::MAX),
                available,
            });
        }
        Ok(cached)
    }

    /// One more reference to a cached block, taking it off the LRU list if it was evictable.
    fn pin(&mut self, id: BlockId) {
        if self.blocks[id as usize].ref_count == 0 {
            // Its queue entry goes stale now that the block is referenced.
            self.used += 1;
        }
        self.blocks[id as usize].ref_count += 1;
    }

    /// A fresh block with ref 1: a free one if any, else the least recently used evictable
    /// one, dropped from the cache. The caller has checked that one is available.
    fn take(&mut self) -> BlockId {
        let id = match self.free.pop() {
            Some(id) => id,
            None => self.evict(),
        };
        self.blocks[id as usize].ref_count = 1;
        self.used += 1;
        id
    }

    /// Takes the least recently used evictable block out of the cache (emits Removed).
    fn evict(&mut self) -> BlockId {
        loop {
            let (id, stamp) = self
                .lru
                .pop_front()
                .expect("an evictable block exists when none is free");
            let b = self.blocks[id as usize];
            if b.ref_count != 0 || b.tag != REGISTERED | stamp {
                continue;
            }
            if let Some(&(ahead, _)) = self.lru.get(PREFETCH_BLOCK_AHEAD) {
                prefetch(&self.blocks[ahead as usize]);
            }
            if let Some(&(ahead, _)) = self.lru.get(PREFETCH_SLOT_AHEAD) {
                self.cache.prefetch(self.blocks[ahead as usize].hash);
            }
            self.blocks[id as usize].tag = 0;
            self.cache.remove(b.hash);
            if self.events_enabled {
                self.events.push(KvEvent::Removed(b.hash));
            }
            return id;
        }
    }

    /// Drops stale queue entries once they outnumber the blocks (a block reused and released
    /// many times between evictions leaves one per release), keeping the queue O(capacity).
    fn compact_lru(&mut self) {
        if self.lru.len() <= 2 * self.blocks.len() + 16 {
            return;
        }
        let blocks = &self.blocks;
        self.lru.retain(|&(id, stamp)| {
            blocks[id as usize].ref_count == 0 && blocks[id as usize].tag == REGISTERED | stamp
        });
    }
}

/// Starts loading `block` into the cache ahead of use; a hint with no effect on results.
#[inline]
fn prefetch(block: &Block) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint that never faults; the reference is valid anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (block as *const Block).cast::<i8>(),
        )
    };
}

#[cfg(test)]
mod tests;
