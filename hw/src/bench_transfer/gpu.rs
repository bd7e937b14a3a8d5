//! The measurements of `bench-transfer` on GPUs.

use super::{Row, Size, median, repeats_for};
use crate::paged::{DeviceBlocks, KvExport, PagedError};
use crate::transport::cuda::baseline::CopyBaseline;
use crate::transport::cuda::{CudaError, CudaP2pTransport, P2pConfig};
use crate::transport::tcp::{TcpConfig, TcpKvListener, TcpTransport};
use crate::transport::{Endpoint, KvTransfer, KvTransport, Landing, TransportError, TransportKind};
use models::runtime::{Device, TensorDType};
use sim::kv::token_block_hashes;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;
use tokio::sync::mpsc;

const FINGERPRINT: u64 = 0xbe9c_4a7e;
const BLOCK_TOKENS: usize = 16;
const WARMUP: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum TransferBenchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Paged(#[from] PagedError),
    #[error("{0}")]
    Invalid(String),
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct TransferPlan {
    pub transport: TransportKind,
    pub src: Device,
    pub dst: Device,
    pub sizes: Vec<Size>,
    /// Bytes of one KV block: messages are whole blocks.
    pub block_bytes: usize,
    /// `cuda-p2p` through pinned host buffers even where peer copies are possible.
    pub staged: bool,
}

/// The transport under test, and where it delivers.
enum Under {
    P2p(CudaP2pTransport),
    Tcp(TcpTransport, TcpKvListener),
}

impl Under {
    async fn send(&self, t: KvTransfer) -> Result<(), TransportError> {
        match self {
            Under::P2p(p) => p.send(&Endpoint::CudaPeer("bench".into()), t).await,
            Under::Tcp(tcp, listener) => tcp.send(&listener.endpoint(), t).await,
        }
        .map(|_| ())
    }
}

/// Measures every size of the plan, smallest first as given.
pub fn run(plan: &TransferPlan) -> Result<Vec<Row>, TransferBenchError> {
    if plan.block_bytes == 0 || !plan.block_bytes.is_multiple_of(2) {
        return Err(TransferBenchError::Invalid(format!(
            "--block-bytes: {} is not a positive whole number of bf16 elements",
            plan.block_bytes
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| TransferBenchError::Invalid(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(measure(plan))
}

async fn measure(plan: &TransferPlan) -> Result<Vec<Row>, TransferBenchError> {
    let (tx, mut rx) = mpsc::channel(1);
    let (under, route) = match plan.transport {
        TransportKind::CudaP2p => {
            let p2p = CudaP2pTransport::new(P2pConfig {
                force_staged: plan.staged,
            });
            p2p.register("bench", FINGERPRINT, &plan.dst, tx)?;
            let route = p2p.route(&plan.src, &plan.dst)?.name().to_string();
            (Under::P2p(p2p), route)
        }
        TransportKind::Tcp => {
            let listener = TcpKvListener::bind_landing(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                FINGERPRINT,
                TcpConfig::default(),
                tx,
                Landing::Device(plan.dst.clone()),
            )
            .await
            .map_err(|e| TransferBenchError::Invalid(format!("cannot listen on loopback: {e}")))?;
            let tcp = TcpTransport::new(TcpConfig::default());
            (Under::Tcp(tcp, listener), "pinned+loopback".to_string())
        }
        TransportKind::Local => {
            return Err(TransferBenchError::Invalid(
                "--transport: bench-transfer measures cuda-p2p or tcp".into(),
            ));
        }
    };
    let mut rows = Vec::with_capacity(plan.sizes.len());
    for size in &plan.sizes {
        let blocks = size.bytes.div_ceil(plan.block_bytes).max(1);
        let (message, sent) = message(blocks, plan.block_bytes, &plan.src)?;
        let bytes = blocks * plan.block_bytes;
        let repeats = repeats_for(bytes);
        let mut times = Vec::with_capacity(repeats);
        let mut received = None;
        for i in 0..WARMUP + repeats {
            let started = Instant::now();
            under.send(message.clone()).await?;
            let ns = started.elapsed().as_nanos() as u64;
            let got = rx
                .recv()
                .await
                .ok_or_else(|| TransferBenchError::Invalid("the receiving inbox closed".into()))?;
            if i >= WARMUP {
                times.push(ns);
            }
            received = Some(got);
        }
        let arrived = received.and_then(|t| t.kv.device).ok_or_else(|| {
            TransferBenchError::Invalid("no transfer arrived in device memory".into())
        })?;
        if !arrived.device().same_device(&plan.dst) {
            return Err(TransferBenchError::Invalid(
                "the transfer arrived on another device".into(),
            ));
        }
        if crc32fast::hash(&arrived.to_host_blocks()?.concat()) != sent {
            return Err(TransferBenchError::Invalid(format!(
                "{}: the bytes that arrived differ from those sent",
                size.label
            )));
        }
        let mut baseline = CopyBaseline::new(&plan.src, &plan.dst, bytes)?;
        let (mut peer, mut to_host, mut from_host) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..WARMUP + repeats {
            let sample = (
                baseline.peer_copy_ns()?,
                baseline.to_host_ns()?,
                baseline.from_host_ns()?,
            );
            if i >= WARMUP {
                peer.push(sample.0);
                to_host.push(sample.1);
                from_host.push(sample.2);
            }
        }
        let row = Row {
            transport: plan.transport.name().to_string(),
            route: route.clone(),
            size: size.label.clone(),
            bytes,
            blocks,
            repeats,
            transport_ns: median(times),
            peer_copy_ns: median(peer),
            to_host_ns: median(to_host),
            from_host_ns: median(from_host),
        };
        eprintln!(
            "{}: {:.1} GB/s ({}), plain peer copy {:.1} GB/s",
            row.size,
            row.transport_gb_per_s(),
            row.route,
            row.peer_copy_gb_per_s()
        );
        rows.push(row);
    }
    Ok(rows)
}

/// A transfer of `blocks` blocks of `block_bytes` bytes held as bf16 rows on `device`, and
/// the CRC32 of its bytes.
fn message(
    blocks: usize,
    block_bytes: usize,
    device: &Device,
) -> Result<(KvTransfer, u32), TransferBenchError> {
    let host: Vec<Vec<u8>> = (0..blocks)
        .map(|b| {
            (0..block_bytes)
                .map(|i| (i.wrapping_mul(131) ^ b.wrapping_mul(7919) ^ (i >> 12)) as u8)
                .collect()
        })
        .collect();
    let crc = crc32fast::hash(&host.concat());
    let rows = DeviceBlocks::from_host_blocks(&host, TensorDType::BF16, device)?;
    let tokens: Vec<u32> = (0..(blocks * BLOCK_TOKENS) as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 32_000)
        .collect();
    let transfer = KvTransfer {
        request_id: blocks as u64,
        model_fingerprint: FINGERPRINT,
        dtype: models::DType::Bf16,
        n_layers: 1,
        block_size_tokens: BLOCK_TOKENS as u32,
        kv: KvExport {
            block_hashes: token_block_hashes(&tokens, BLOCK_TOKENS as u32),
            kv_len: tokens.len(),
            tokens,
            first_block: 0,
            blocks: vec![Vec::new(); blocks],
            device: Some(rows),
        },
    };
    Ok((transfer, crc))
}
