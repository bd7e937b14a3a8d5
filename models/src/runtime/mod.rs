//! The candle Llama runtime: weights (GGUF, safetensors, seeded random), a forward pass over a
//! paged KV cache whose blocks can be exported and imported, the tokenizer and sampling.
//!
//! Block allocation is the caller's: the forward pass reads and writes the blocks named by
//! each sequence's block table, so the same bookkeeping that the simulator runs (sim's block
//! manager) decides which blocks a sequence owns.

mod cache;
#[cfg(feature = "cuda")]
pub mod context;
mod error;
#[cfg(feature = "cuda")]
mod fused;
mod gguf;
#[cfg(feature = "cuda")]
mod graph;
mod linear;
mod model;
mod rope;
mod safetensors;
mod sampling;
mod token_ids;
mod tokenizer;
mod weights;

pub use cache::{DEFAULT_BLOCK_SIZE_TOKENS, KvCache, tensor_le_bytes};
pub use error::RuntimeError;
pub use linear::linear;
pub use model::{Model, SeqInput};
pub use sampling::{FinishReason, Sampler, SamplingParams, Stop, argmax};
pub use weights::{LayerWeights, RopeStyle, Weights};

pub use gguf::{GgufFile, SMOLLM2_GGUF_RELPATH, default_cache_dir, test_gguf_path};
pub use safetensors::spec_from_hf_config;
pub use tokenizer::{ChatMessage, SMOLLM2_DEFAULT_SYSTEM, Tokenizer};

/// The candle device and dtype types, re-exported so that callers need no direct dependency.
pub use candle_core::{DType as TensorDType, Device, Tensor};
