//! KV-cache bookkeeping: token blocks, chained block hashes and the paged block manager.

pub mod hash;
pub mod manager;
pub mod table;

pub use hash::{BlockHash, BlockHashMap, ROOT_HASH, chain, digest_tokens, token_block_hashes};
pub use manager::{Allocation, BlockManager, KvError, KvEvent};
pub use table::BlockTable;

/// Index of a block in a worker's KV pool.
pub type BlockId = u32;

/// Tokens per KV block unless a configuration says otherwise (vLLM's default).
pub const DEFAULT_BLOCK_SIZE_TOKENS: u32 = 16;
