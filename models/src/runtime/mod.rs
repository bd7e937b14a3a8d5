//! The candle Llama runtime: weights (GGUF, safetensors, seeded random), a forward pass over a
//! paged KV cache whose blocks can be exported and imported, the tokenizer and sampling.
//!
//! Block allocation is the caller's: the forward pass reads and writes the blocks named by
//! each sequence's block table, so the same bookkeeping that the simulator runs (sim's block
//! manager) decides which blocks a sequence owns.

mod cache;
mod error;
mod model;
mod rope;
mod sampling;
mod weights;

pub use cache::{DEFAULT_BLOCK_SIZE_TOKENS, KvCache};
pub use error::RuntimeError;
pub use model::{Model, SeqInput};
pub use sampling::{FinishReason, Sampler, SamplingParams, Stop};
pub use weights::{LayerWeights, RopeStyle, Weights};

/// The candle device and dtype types, re-exported so that callers need no direct dependency.
pub use candle_core::{DType as TensorDType, Device, Tensor};
