//! The real backend. It imports the simulator's domain (KV block manager, routing, workload,
//! metrics) so that the served system and the simulated one run the same bookkeeping.

pub mod bench_model;
pub mod bench_transfer;
pub mod calibrate;
pub mod check_gpu;
pub mod cluster;
pub mod device;
pub mod engine;
pub mod fetch;
pub mod frontend;
pub mod loadgen;
pub mod paged;
pub mod transport;

pub use models;
pub use sim;

use models::runtime::TensorDType;

/// A `--dtype` or `model.dtype` value.
pub fn parse_dtype(dtype: &str) -> Result<TensorDType, String> {
    match dtype {
        "f32" => Ok(TensorDType::F32),
        "f16" => Ok(TensorDType::F16),
        "bf16" => Ok(TensorDType::BF16),
        other => Err(format!("dtype: expected f32, f16 or bf16, got `{other}`")),
    }
}

/// The element type of a runtime tensor dtype, as `ModelSpec` arithmetic and the KV wire
/// format name it.
pub fn spec_dtype(dtype: TensorDType) -> models::DType {
    match dtype {
        TensorDType::F16 => models::DType::F16,
        TensorDType::BF16 => models::DType::Bf16,
        _ => models::DType::F32,
    }
}
