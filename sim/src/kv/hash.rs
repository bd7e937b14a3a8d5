//! Chained block hashes: a block's hash covers its own tokens and, through its parent's hash,
//! every token before it, so equal hashes mean equal prefixes (as in vLLM's prefix cache).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::rng::mix64;

pub type BlockHash = u64;

/// A map keyed by block hashes. The keys are already mixed, so hashing them again (SipHash)
/// would only cost time; lookups never depend on a per-process random seed either.
pub type BlockHashMap<V> = HashMap<BlockHash, V, BuildHasherDefault<PremixedHasher>>;

/// Passes a well-mixed `u64` key through as its own hash.
#[derive(Clone, Copy, Debug, Default)]
pub struct PremixedHasher(u64);

impl Hasher for PremixedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ b as u64);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(32) ^ n;
    }
}

/// The parent hash of a sequence's first block.
pub const ROOT_HASH: BlockHash = 0x243F_6A88_85A3_08D3;

/// The hash of a block whose parent hashes to `parent` and whose own content digests to
/// `content_digest`.
pub fn chain(parent: BlockHash, content_digest: u64) -> BlockHash {
    mix64(parent.rotate_left(29) ^ mix64(content_digest))
}

/// Digest of one block's token ids.
pub fn digest_tokens(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0xA076_1D64_78BD_642F_u64, |acc, &t| {
        mix64(acc ^ t as u64).wrapping_add(tokens.len() as u64)
    })
}

/// Hashes of every full block of `tokens`; a trailing partial block has none.
pub fn token_block_hashes(tokens: &[u32], block_size_tokens: u32) -> Vec<BlockHash> {
    let mut parent = ROOT_HASH;
    tokens
        .chunks_exact(block_size_tokens as usize)
        .map(|block| {
            parent = chain(parent, digest_tokens(block));
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_hash_equal_and_parents_matter() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[35] = 999;
        let ha = token_block_hashes(&a, 16);
        let hb = token_block_hashes(&b, 16);
        assert_eq!(ha.len(), 2);
        assert_eq!(ha, hb, "the partial third block has no hash");
        b[3] = 999;
        let hb = token_block_hashes(&b, 16);
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1], "a change in block 0 changes every later hash");
        let block = &a[16..32];
        assert_ne!(
            chain(ROOT_HASH, digest_tokens(block)),
            chain(ha[0], digest_tokens(block))
        );
    }
}
