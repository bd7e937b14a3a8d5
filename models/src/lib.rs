//! Model architecture presets (`ModelSpec`) and the arithmetic both halves of the project
//! agree on: parameter count, weight bytes, KV-cache bytes per token and FLOPs per step.

mod spec;

pub use spec::{DType, ModelSpec};

#[cfg(feature = "runtime")]
pub mod runtime;
