//! What a request's tokens are, described without materialising them.
//!
//! The simulator needs block hashes (for prefix caching and KV-aware routing), not tokens. A
//! synthetic token stream is a pure function of (stream id, offset), so a block is identified
//! by which streams it covers, at which offsets: its digest costs O(1) whatever the block size,
//! and equal prefixes give equal hashes. The real load generator asks for the tokens
//! themselves with [`Content::token_at`].

use std::sync::Arc;

use crate::kv::{BlockHash, ROOT_HASH, chain, digest_tokens};
use crate::rng::mix64;

/// Salts keeping the different uses of `mix64` apart.
const PIECE_SALT: u64 = 0x5EED_0FB1_0C00_0001;
const PAIR_SALT: u64 = 0x5EED_0FB1_0C00_0002;
const TOKEN_SALT: u64 = 0x5EED_0F70_1100_0003;
const TAIL_SALT: u64 = 0x5EED_0F7A_1100_0004;

/// How many trailing ids a [`Content::Tokens`] continuation stream is derived from. The block
/// hash chain already covers every id; the stream only has to make the continuation a
/// function of the ids, and a bounded tail keeps deriving it O(1).
const TAIL_IDS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Positions [0, system_tokens) are shared system prompt `system` (0 = none, with
    /// system_tokens = 0); positions >= system_tokens are the conversation's own stream
    /// `stream` at offset p - system_tokens. A conversation's later turns, and the answers the
    /// model generates, continue the same stream, so turn k's prompt extends turn k-1's
    /// prompt and answer exactly.
    Synthetic {
        system: u64,
        system_tokens: u32,
        stream: u64,
    },
    /// Real token ids (from a trace); positions past the end (generated tokens) continue a
    /// synthetic stream derived from the ids.
    Tokens(Arc<[u32]>),
}

impl Content {
    /// Appends to `hashes` the chained hashes of the full blocks covering positions
    /// [0, upto_tokens), starting after the `hashes.len()` blocks already there (so extending
    /// a sequence hashes only its new blocks). Synthetic content digests a block from the
    /// (stream, offset, length) pieces it covers (at most two: system part, conversation
    /// part), O(1) per block; token ids digest with `digest_tokens`, synthetic past their end.
    /// A block size of 0 has no blocks.
    pub fn extend_block_hashes(
        &self,
        hashes: &mut Vec<BlockHash>,
        upto_tokens: u32,
        block_size_tokens: u32,
    ) {
        if block_size_tokens == 0 {
            return;
        }
        let full_blocks = (upto_tokens / block_size_tokens) as usize;
        let first = hashes.len();
        if first >= full_blocks {
            return;
        }
        hashes.reserve(full_blocks - first);
        let mut parent = hashes.last().copied().unwrap_or(ROOT_HASH);
        let tail_stream = match self {
            Content::Tokens(ids) => tail_stream(ids),
            Content::Synthetic { .. } => 0,
        };
        for block in first..full_blocks {
            let begin = block as u32 * block_size_tokens;
            parent = chain(
                parent,
                self.block_digest(begin, block_size_tokens, tail_stream),
            );
            hashes.push(parent);
        }
    }

    /// The token id at a position (for the real load generator), in [0, vocab_size); 0 when
    /// the vocabulary is empty. Trace ids at or above `vocab_size` wrap around.
    pub fn token_at(&self, pos: u32, vocab_size: u32) -> u32 {
        if vocab_size == 0 {
            return 0;
        }
        match self {
            Content::Synthetic {
                system,
                system_tokens,
                stream,
            } => {
                if pos < *system_tokens {
                    synthetic_token(*system, pos, vocab_size)
                } else {
                    synthetic_token(*stream, pos - system_tokens, vocab_size)
                }
            }
            Content::Tokens(ids) => match ids.get(pos as usize) {
                Some(&id) => id % vocab_size,
                None => synthetic_token(tail_stream(ids), pos - ids.len() as u32, vocab_size),
            },
        }
    }

    fn block_digest(&self, begin: u32, len: u32, tail_stream: u64) -> u64 {
        let end = begin + len;
        match *self {
            Content::Synthetic {
                system,
                system_tokens,
                stream,
            } => {
                if begin >= system_tokens {
                    piece_digest(stream, begin - system_tokens, len)
                } else if end <= system_tokens {
                    piece_digest(system, begin, len)
                } else {
                    pair_digest(
                        piece_digest(system, begin, system_tokens - begin),
                        piece_digest(stream, 0, end - system_tokens),
                    )
                }
            }
            Content::Tokens(ref ids) => {
                let n = ids.len();
                let (b, e) = (begin as usize, end as usize);
                if e <= n {
                    digest_tokens(&ids[b..e])
                } else if b >= n {
                    piece_digest(tail_stream, begin - n as u32, len)
                } else {
                    pair_digest(
                        digest_tokens(&ids[b..]),
                        piece_digest(tail_stream, 0, end - n as u32),
                    )
                }
            }
        }
    }
}

/// Digest of the `len` tokens of synthetic stream `stream` starting at `offset`.
fn piece_digest(stream: u64, offset: u32, len: u32) -> u64 {
    mix64(mix64(stream ^ PIECE_SALT) ^ ((offset as u64) << 32 | len as u64))
}

/// Digest of a block made of two consecutive pieces.
fn pair_digest(first: u64, second: u64) -> u64 {
    mix64(first.rotate_left(23) ^ mix64(second ^ PAIR_SALT))
}

fn synthetic_token(stream: u64, offset: u32, vocab_size: u32) -> u32 {
    let h = mix64(mix64(stream ^ TOKEN_SALT) ^ offset as u64);
    // Multiply-shift maps the high 32 bits onto [0, vocab_size) without a division.
    (((h >> 32) * vocab_size as u64) >> 32) as u32
}

/// The stream that continues token ids past their end.
fn tail_stream(ids: &[u32]) -> u64 {
    let tail = &ids[ids.len().saturating_sub(TAIL_IDS)..];
    mix64(digest_tokens(tail) ^ mix64(ids.len() as u64 ^ TAIL_SALT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::token_block_hashes;
    use proptest::prelude::*;

    fn hashes(c: &Content, upto: u32, bs: u32) -> Vec<BlockHash> {
        let mut h = Vec::new();
        c.extend_block_hashes(&mut h, upto, bs);
        h
    }

    fn conv(system: u64, system_tokens: u32, stream: u64) -> Content {
        Content::Synthetic {
            system,
            system_tokens,
            stream,
        }
    }

    #[test]
    fn a_later_turn_extends_the_earlier_prompt_and_answer() {
        let c = conv(77, 100, 5);
        let turn1_prompt_and_answer = 100 + 300 + 150;
        let turn2_prompt = turn1_prompt_and_answer + 90;
        let h1 = hashes(&c, turn1_prompt_and_answer, 16);
        let h2 = hashes(&c, turn2_prompt, 16);
        assert_eq!(h1.len(), 34);
        assert_eq!(h2.len(), 40);
        assert_eq!(&h2[..h1.len()], &h1[..]);
    }

    #[test]
    fn same_system_prompt_shares_exactly_its_full_blocks() {
        let a = hashes(&conv(77, 100, 5), 400, 16);
        let b = hashes(&conv(77, 100, 6), 400, 16);
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert_eq!(
            shared,
            100 / 16,
            "block 6 straddles the system prompt's end"
        );
        assert!(a.iter().zip(&b).skip(shared).all(|(x, y)| x != y));
        let c = hashes(&conv(78, 100, 5), 400, 16);
        assert_ne!(a[0], c[0], "different system prompts share nothing");
        let aligned_a = hashes(&conv(77, 96, 5), 400, 16);
        let aligned_b = hashes(&conv(77, 96, 6), 400, 16);
        let shared = aligned_a
            .iter()
            .zip(&aligned_b)
            .take_while(|(x, y)| x == y)
            .count();
        assert_eq!(shared, 6);
    }

    #[test]
    fn token_ids_hash_like_the_kv_module() {
        let ids: Vec<u32> = (0..100).map(|i| i * 7 + 3).collect();
        let c = Content::Tokens(ids.clone().into());
        assert_eq!(hashes(&c, 100, 16), token_block_hashes(&ids, 16));
        let longer = hashes(&c, 160, 16);
        assert_eq!(longer.len(), 10);
        assert_eq!(&longer[..6], &token_block_hashes(&ids, 16)[..]);
        let again = Content::Tokens(ids.into());
        assert_eq!(
            hashes(&again, 160, 16),
            longer,
            "continuations are reproducible"
        );
    }

    #[test]
    fn token_at_reads_ids_then_continues() {
        let c = Content::Tokens(vec![5, 70_000, 9].into());
        assert_eq!(c.token_at(0, 32_000), 5);
        assert_eq!(c.token_at(1, 32_000), 70_000 % 32_000);
        assert!(c.token_at(3, 32_000) < 32_000);
        assert_eq!(c.token_at(0, 0), 0);
        let s = conv(77, 4, 5);
        let same_system = conv(77, 4, 6);
        assert_eq!(s.token_at(3, 1000), same_system.token_at(3, 1000));
        let toks: Vec<u32> = (4..40).map(|p| s.token_at(p, 1000)).collect();
        let other: Vec<u32> = (4..40).map(|p| same_system.token_at(p, 1000)).collect();
        assert_ne!(toks, other);
        assert!(toks.iter().all(|&t| t < 1000));
    }

    #[test]
    fn degenerate_block_sizes() {
        let c = conv(1, 10, 2);
        assert!(hashes(&c, 100, 0).is_empty());
        assert!(hashes(&c, 15, 16).is_empty());
        assert_eq!(hashes(&c, u32::MAX, 1 << 30).len(), 3);
    }

    proptest! {
        #[test]
        fn extending_in_steps_equals_hashing_at_once(
            system_tokens in 0u32..200,
            steps in proptest::collection::vec(0u32..120, 1..6),
            bs in 1u32..40,
            use_ids in any::<bool>(),
        ) {
            let c = if use_ids {
                Content::Tokens((0..system_tokens).map(|i| i ^ 0x55).collect::<Vec<_>>().into())
            } else {
                conv(if system_tokens > 0 { 9 } else { 0 }, system_tokens, 4)
            };
            let mut incremental = Vec::new();
            let mut upto = 0;
            for s in steps {
                upto += s;
                c.extend_block_hashes(&mut incremental, upto, bs);
            }
            prop_assert_eq!(incremental, hashes(&c, upto, bs));
        }

        #[test]
        fn equal_hash_prefix_iff_same_system_blocks(
            system_tokens in 1u32..300,
            bs in 1u32..64,
        ) {
            let a = hashes(&conv(3, system_tokens, 10), system_tokens + 200, bs);
            let b = hashes(&conv(3, system_tokens, 11), system_tokens + 200, bs);
            let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            prop_assert_eq!(shared as u32, system_tokens / bs);
        }
    }
}
