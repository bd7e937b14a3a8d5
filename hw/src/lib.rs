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
/// `listener` with TCP_NODELAY on every connection it accepts: a streamed token is a small
/// write, which Nagle's algorithm would hold back until the peer's delayed ACK (40 ms).
pub(crate) fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

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
