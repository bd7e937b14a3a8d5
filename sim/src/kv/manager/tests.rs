use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::kv::token_block_hashes;

fn events(m: &mut BlockManager) -> Vec<KvEvent> {
    let mut out = Vec::new();
    m.drain_events(&mut out);
    out
}

/// Hashes of `n` full blocks of a sequence identified by `doc`.
fn hashes(doc: u32, n: usize) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..n as u32 * 4).map(|t| doc * 1000 + t).collect();
    token_block_hashes(&tokens, 4)
}

/// Allocates a sequence and commits all its full blocks.
fn admit(m: &mut BlockManager, hs: &[BlockHash], num_blocks: usize) -> Allocation {
    let a = m.allocate(hs, num_blocks).unwrap();
    for (&b, &h) in a.blocks.iter().zip(hs) {
        m.commit(b, h);
    }
    a
}

#[test]
fn prefix_is_reused_and_shared() {
    let mut m = BlockManager::new(10, true);
    let hs = hashes(1, 3);
    let a = admit(&mut m, &hs, 4);
    assert_eq!(a.cached_blocks, 0);
    assert_eq!(a.blocks, vec![0, 1, 2, 3]);
    assert_eq!(m.cached_blocks(), 3);
    assert_eq!(
        events(&mut m),
        hs.iter().map(|&h| KvEvent::Stored(h)).collect::<Vec<_>>()
    );

    // A second live sequence with the same first two blocks shares them.
    let b = m.allocate(&[hs[0], hs[1], 77], 3).unwrap();
    assert_eq!(b.cached_blocks, 2);
    assert_eq!(&b.blocks[..2], &a.blocks[..2]);
    assert_eq!(m.used_blocks(), 5);
    assert_eq!(m.cached_prefix(&hs), 3);
    assert_eq!(
        m.cached_prefix(&[hs[0], 999, hs[2]]),
        1,
        "a miss ends the prefix"
    );

    // After both finish, the blocks stay cached and a third sequence reuses all three.
    m.free(&a.blocks);
    m.free(&b.blocks);
    assert_eq!(m.used_blocks(), 0);
    assert_eq!(m.available_blocks(), 10);
    let c = m.allocate(&hs, 3).unwrap();
    assert_eq!(c.cached_blocks, 3);
    assert_eq!(c.blocks, a.blocks[..3]);
    assert!(events(&mut m).is_empty());
}

#[test]
fn lru_evicts_tail_first_and_recently_freed_last() {
    let mut m = BlockManager::new(6, true);
    let old = hashes(1, 3);
    let new = hashes(2, 3);
    let a = admit(&mut m, &old, 3);
    let b = admit(&mut m, &new, 3);
    m.free(&a.blocks);
    m.free(&b.blocks);
    events(&mut m);
    assert_eq!(m.available_blocks(), 6);

    // No free block is left: each new block evicts one cached block, oldest sequence first,
    // and within it the tail before the head.
    let c = m.allocate(&[], 1).unwrap();
    assert_eq!(c.blocks, vec![a.blocks[2]]);
    assert_eq!(events(&mut m), vec![KvEvent::Removed(old[2])]);
    m.allocate(&[], 2).unwrap();
    assert_eq!(
        events(&mut m),
        vec![KvEvent::Removed(old[1]), KvEvent::Removed(old[0])]
    );
    assert_eq!(m.cached_prefix(&old), 0);
    assert_eq!(m.cached_prefix(&new), 3);

    // Touching `new` by reuse makes its blocks the most recently used once freed again.
    let d = m.allocate(&new[..1], 1).unwrap();
    m.free(&d.blocks);
    m.allocate(&[], 1).unwrap();
    assert_eq!(events(&mut m), vec![KvEvent::Removed(new[2])]);
    m.allocate(&[], 1).unwrap();
    assert_eq!(events(&mut m), vec![KvEvent::Removed(new[1])]);
    assert_eq!(m.cached_prefix(&new), 1);
}

#[test]
fn allocate_never_evicts_the_prefix_it_reuses() {
    let mut m = BlockManager::new(4, true);
    let hs = hashes(1, 2);
    let a = admit(&mut m, &hs, 2);
    let filler = admit(&mut m, &[], 2);
    m.free(&a.blocks);
    m.free(&filler.blocks);
    events(&mut m);
    // Two cached blocks are the only candidates for eviction, and the request reuses them:
    // it must get the free ones for its new blocks and leave the prefix alone.
    let b = m.allocate(&hs, 4).unwrap();
    assert_eq!(b.cached_blocks, 2);
    assert_eq!(&b.blocks[..2], &a.blocks[..]);
    assert!(events(&mut m).is_empty());
    assert_eq!(m.available_blocks(), 0);
}

#[test]
fn out_of_blocks_changes_nothing() {
    let mut m = BlockManager::new(4, true);
    let hs = hashes(1, 2);
    let a = admit(&mut m, &hs, 2);
    m.free(&a.blocks);
    events(&mut m);
    let held = m.allocate(&[], 2).unwrap();
    assert_eq!(
        held.blocks,
        vec![2, 3],
        "free blocks go before evicting cached ones"
    );
    // Only the 2 cached blocks are left, and the request reuses both: its one new block could
    // come only from evicting its own prefix.
    assert!(!m.can_allocate(&hs, 3));
    assert_eq!(
        m.allocate(&hs, 3),
        Err(KvError::OutOfBlocks {
            needed: 1,
            available: 0
        })
    );
    assert_eq!(
        m.allocate(&hs[..1], 4),
        Err(KvError::OutOfBlocks {
            needed: 3,
            available: 1
        })
    );
    assert_eq!(m.used_blocks(), 2);
    assert_eq!(m.cached_blocks(), 2);
    assert!(events(&mut m).is_empty());
    assert_eq!(
        m.allocate(&hs, 1),
        Err(KvError::MoreHashesThanBlocks {
            hashes: 2,
            num_blocks: 1
        })
    );
    assert!(m.can_allocate(&hs, 2));
}

#[test]
fn append_grows_and_fails_when_full() {
    let mut m = BlockManager::new(2, false);
    let mut seq = m.allocate(&[], 1).unwrap().blocks;
    m.append(&mut seq).unwrap();
    assert_eq!(seq, vec![0, 1]);
    assert_eq!(
        m.append(&mut seq),
        Err(KvError::OutOfBlocks {
            needed: 1,
            available: 0
        })
    );
    assert_eq!(seq.len(), 2);
    m.free(&seq);
    assert_eq!(m.available_blocks(), 2);
}

#[test]
fn caching_disabled_reuses_nothing_and_says_nothing() {
    let mut m = BlockManager::new(4, false);
    let hs = hashes(1, 2);
    let a = admit(&mut m, &hs, 2);
    assert_eq!(m.cached_blocks(), 0);
    m.free(&a.blocks);
    let b = m.allocate(&hs, 2).unwrap();
    assert_eq!(b.cached_blocks, 0);
    assert_eq!(m.cached_prefix(&hs), 0);
    assert!(events(&mut m).is_empty());
}

#[test]
fn commit_dedupes_and_duplicates_are_freed() {
    let mut m = BlockManager::new(4, true);
    let hs = hashes(1, 1);
    // Two sequences computed the same block concurrently; only the first registers.
    let a = m.allocate(&hs, 1).unwrap();
    let b = m.allocate(&hs, 1).unwrap();
    assert_ne!(a.blocks, b.blocks);
    m.commit(a.blocks[0], hs[0]);
    m.commit(b.blocks[0], hs[0]);
    m.commit(a.blocks[0], hs[0]);
    m.commit(a.blocks[0], 12345);
    assert_eq!(events(&mut m), vec![KvEvent::Stored(hs[0])]);
    assert_eq!(m.cached_blocks(), 1);
    m.free(&b.blocks);
    m.free(&a.blocks);
    // The duplicate went back to the free list, so a fresh block is it, not an eviction.
    let c = m.allocate(&[], 3).unwrap();
    assert!(c.blocks.contains(&b.blocks[0]));
    assert!(events(&mut m).is_empty());
    assert_eq!(m.cached_prefix(&hs), 1);
}

#[test]
fn bad_ids_and_double_frees_are_ignored() {
    let mut m = BlockManager::new(2, true);
    let a = m.allocate(&[], 1).unwrap();
    m.commit(99, 1);
    m.commit(1, 1);
    m.free(&[99]);
    m.free(&a.blocks);
    m.free(&a.blocks);
    assert_eq!(m.used_blocks(), 0);
    assert_eq!(m.cached_blocks(), 0);
    assert!(events(&mut m).is_empty());
}

#[test]
fn disabled_events_are_not_recorded() {
    let mut m = BlockManager::new(2, true);
    m.set_events_enabled(false);
    let hs = hashes(1, 1);
    admit(&mut m, &hs, 1);
    assert!(events(&mut m).is_empty());
    assert_eq!(m.cached_prefix(&hs), 1, "caching itself goes on");
}

#[derive(Clone, Debug)]
enum Op {
    /// Admit a sequence whose tokens are `tokens` (block size 1) plus `extra` partial blocks.
    Allocate {
        tokens: Vec<u32>,
        extra: usize,
    },
    Append {
        seq: usize,
    },
    /// Commit the next full block of a sequence that is not yet registered.
    Commit {
        seq: usize,
    },
    Free {
        seq: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop::collection::vec(0u32..2, 0..7), 0usize..3)
            .prop_map(|(tokens, extra)| Op::Allocate { tokens, extra }),
        1 => any::<usize>().prop_map(|seq| Op::Append { seq }),
        4 => any::<usize>().prop_map(|seq| Op::Commit { seq }),
        2 => any::<usize>().prop_map(|seq| Op::Free { seq }),
    ]
}

struct Seq {
    blocks: Vec<BlockId>,
    hashes: Vec<BlockHash>,
    committed: usize,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn manager_matches_its_model(
        capacity in 0u32..16,
        caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut m = BlockManager::new(capacity, caching);
        let mut seqs: Vec<Seq> = Vec::new();
        // References per block, from the sequences the test holds.
        let mut refs: BTreeMap<BlockId, u32> = BTreeMap::new();
        // The prefix cache as the event stream tells it, and which block holds each hash.
        let mut cache: BTreeSet<BlockHash> = BTreeSet::new();
        let mut holder: BTreeMap<BlockHash, BlockId> = BTreeMap::new();
        let mut evs = Vec::new();

        for op in ops {
            let cache_before = cache.clone();
            let refs_before = refs.clone();
            let mut committed: Option<(BlockId, BlockHash)> = None;
            match op {
                Op::Allocate { tokens, extra } => {
                    let hs = token_block_hashes(&tokens, 1);
                    let num = hs.len() + extra;
                    let prefix = hs.iter().take_while(|h| cache.contains(h)).count();
                    let owned = refs.len() as u32;
                    let pinned = hs[..prefix]
                        .iter()
                        .filter(|h| !refs.contains_key(&holder[h]))
                        .count() as u32;
                    let room = (capacity - owned - pinned) as usize;
                    let fits = num - prefix <= room;
                    prop_assert_eq!(m.cached_prefix(&hs), prefix);
                    prop_assert_eq!(m.can_allocate(&hs, num), fits);
                    let (used, avail, cached) =
                        (m.used_blocks(), m.available_blocks(), m.cached_blocks());
                    match m.allocate(&hs, num) {
                        Ok(a) => {
                            prop_assert!(fits);
                            prop_assert_eq!(a.cached_blocks, prefix);
                            prop_assert_eq!(a.blocks.len(), num);
                            let distinct: BTreeSet<_> = a.blocks.iter().collect();
                            prop_assert_eq!(distinct.len(), num);
                            for (i, &b) in a.blocks.iter().enumerate() {
                                if i < prefix {
                                    prop_assert_eq!(holder[&hs[i]], b);
                                } else {
                                    prop_assert!(!refs.contains_key(&b), "block {} in use", b);
                                }
                                *refs.entry(b).or_default() += 1;
                            }
                            seqs.push(Seq { blocks: a.blocks, hashes: hs, committed: prefix });
                        }
                        Err(e) => {
                            prop_assert!(!fits);
                            prop_assert_eq!(
                                e,
                                KvError::OutOfBlocks {
                                    needed: (num - prefix) as u32,
                                    available: room as u32
                                }
                            );
                            prop_assert_eq!(
                                (m.used_blocks(), m.available_blocks(), m.cached_blocks()),
                                (used, avail, cached)
                            );
                        }
                    }
                }
                Op::Append { seq } if !seqs.is_empty() => {
                    let n = seqs.len();
                    let s = &mut seqs[seq % n];
                    let len = s.blocks.len();
                    match m.append(&mut s.blocks) {
                        Ok(()) => {
                            let b = s.blocks[len];
                            prop_assert!(!refs.contains_key(&b), "block {} in use", b);
                            refs.insert(b, 1);
                        }
                        Err(_) => {
                            prop_assert_eq!(refs.len() as u32, capacity);
                            prop_assert_eq!(s.blocks.len(), len);
                        }
                    }
                }
                Op::Commit { seq } if !seqs.is_empty() => {
                    let n = seqs.len();
                    let s = &mut seqs[seq % n];
                    if s.committed < s.hashes.len() {
                        let (b, h) = (s.blocks[s.committed], s.hashes[s.committed]);
                        m.commit(b, h);
                        s.committed += 1;
                        committed = Some((b, h));
                    }
                }
                Op::Free { seq } if !seqs.is_empty() => {
                    let s = seqs.swap_remove(seq % seqs.len());
                    m.free(&s.blocks);
                    for b in s.blocks {
                        let r = refs.get_mut(&b).unwrap();
                        *r -= 1;
                        if *r == 0 {
                            refs.remove(&b);
                        }
                    }
                }
                _ => {}
            }

            m.drain_events(&mut evs);
            for ev in evs.drain(..) {
                match ev {
                    KvEvent::Stored(h) => {
                        prop_assert!(cache.insert(h), "stored twice: {}", h);
                        let (b, ch) = committed.take().expect("Stored only on commit");
                        prop_assert_eq!(ch, h);
                        holder.insert(h, b);
                    }
                    KvEvent::Removed(h) => {
                        prop_assert!(cache.remove(&h), "removed but not stored: {}", h);
                        let b = holder.remove(&h).unwrap();
                        prop_assert!(!refs_before.contains_key(&b), "evicted block {} in use", b);
                    }
                }
            }
            if let Some((_, h)) = committed {
                // A commit without Stored: caching is off or the hash was already cached.
                prop_assert!(!caching || cache_before.contains(&h));
            }

            prop_assert!(m.used_blocks() <= m.capacity_blocks());
            prop_assert_eq!(m.used_blocks(), refs.len() as u32);
            prop_assert_eq!(m.available_blocks(), capacity - refs.len() as u32);
            prop_assert_eq!(m.cached_blocks() as usize, cache.len());
            for &h in &cache {
                prop_assert_eq!(m.cached_prefix(&[h]), 1);
            }
        }
    }
}
