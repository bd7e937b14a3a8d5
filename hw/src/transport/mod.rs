//! Moving a sequence's KV from the worker that computed it to the worker that continues it.
//!
//! A [`KvTransport`] sends [`KvTransfer`]s to an [`Endpoint`]; on the receiving side each
//! transport delivers accepted transfers into a tokio channel that the worker drains (its engine
//! thread can `blocking_recv`). Implementations: in-process ([`local`]), TCP ([`tcp`]) and, with
//! feature `cuda`, peer copies between the GPUs of one process ([`cuda`]). A transfer whose
//! blocks stay in device memory ([`crate::paged::KvExport::device`]) crosses TCP through pinned
//! host buffers and lands in the receiver's GPU when its listener is told to
//! ([`Landing::Device`]).

#[cfg(feature = "cuda")]
pub mod cuda;
mod device_io;
pub mod local;
pub mod tcp;
pub mod wire;

pub use device_io::DeviceIoError;
pub use wire::{KvTransfer, WireError, WireLimits, model_fingerprint};

use models::runtime::Device;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;

/// Where a transfer goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP listener (`tcp::TcpKvListener`).
    Tcp(SocketAddr),
    /// A named inbox of a `local::LocalTransport`.
    Local(String),
    /// A named inbox, on one GPU, of a `cuda::CudaP2pTransport`.
    CudaPeer(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
            Endpoint::Local(name) => write!(f, "local://{name}"),
            Endpoint::CudaPeer(name) => write!(f, "cuda-p2p://{name}"),
        }
    }
}

/// The transports, by the names that configuration and command lines use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Local,
    Tcp,
    CudaP2p,
}

impl TransportKind {
    pub const ALL: [TransportKind; 3] = [
        TransportKind::Local,
        TransportKind::Tcp,
        TransportKind::CudaP2p,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Local => "local",
            TransportKind::Tcp => "tcp",
            TransportKind::CudaP2p => "cuda-p2p",
        }
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;

    fn from_str(name: &str) -> Result<TransportKind, String> {
        TransportKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| format!("unknown transport `{name}` (local, tcp or cuda-p2p)"))
    }
}

/// Where a receiver puts the payload of a whole transfer frame as it reads it.
#[derive(Clone, Debug, Default)]
pub enum Landing {
    /// Host memory, one buffer per block.
    #[default]
    Host,
    /// This device's memory (through pinned host buffers on a GPU): the transfer arrives with
    /// [`crate::paged::KvExport::device`] set, ready to import there. Layer-streamed
    /// transfers still arrive in host memory.
    Device(Device),
}

/// What the sender learns once the receiver has accepted a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferReceipt {
    pub request_id: u64,
    pub payload_bytes: u64,
    /// Bytes on the wire for the accepted attempt (payload plus framing); equal to
    /// `payload_bytes` for transports without framing.
    pub wire_bytes: u64,
    /// 1, or 2 when the first attempt was refused for a checksum mismatch.
    pub attempts: u32,
    /// When the first byte left.
    pub started: std::time::Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the {transport} transport cannot send to {endpoint}")]
    UnsupportedEndpoint {
        transport: &'static str,
        endpoint: Endpoint,
    },
    #[error("no receiver registered at {0}")]
    UnknownEndpoint(Endpoint),
    #[error("cannot encode request {request_id}: {source}")]
    Encode { request_id: u64, source: WireError },
    #[error("connecting to {endpoint} failed: {source}")]
    Connect {
        endpoint: Endpoint,
        source: std::io::Error,
    },
    #[error("{endpoint}: no progress for {timeout_ms} ms while {during}")]
    Timeout {
        endpoint: Endpoint,
        during: &'static str,
        timeout_ms: u128,
    },
    #[error(
        "{endpoint} dropped the connection before acknowledging request {request_id}: {reason}"
    )]
    Dropped {
        endpoint: Endpoint,
        request_id: u64,
        reason: String,
    },
    #[error(
        "{endpoint} refused request {request_id}: model fingerprint mismatch (sent {sent:#018x}, receiver serves {receiver:#018x})"
    )]
    FingerprintMismatch {
        endpoint: Endpoint,
        request_id: u64,
        sent: u64,
        receiver: u64,
    },
    #[error("{endpoint} refused request {request_id}: {reason}")]
    Refused {
        endpoint: Endpoint,
        request_id: u64,
        reason: &'static str,
    },
    #[error(
        "{endpoint} saw a checksum mismatch for request {request_id} on all {attempts} attempts"
    )]
    Checksum {
        endpoint: Endpoint,
        request_id: u64,
        attempts: u32,
    },
    #[error("moving request {request_id}'s KV to {endpoint}: {source}")]
    Device {
        endpoint: Endpoint,
        request_id: u64,
        source: Box<DeviceIoError>,
    },
}

/// One layer of a transfer's blocks, as the prefill computes it: `(layer, per block that
/// layer's bytes)`.
pub type LayerParts = (u32, Vec<Vec<u8>>);

/// Sends KV to other workers. Async: tokio runs the I/O around the synchronous engine thread.
pub trait KvTransport: Send + Sync {
    /// Delivers `transfer` into the receiver's channel, or says clearly why not.
    fn send(
        &self,
        to: &Endpoint,
        transfer: KvTransfer,
    ) -> impl Future<Output = Result<TransferReceipt, TransportError>> + Send;

    /// Delivers a transfer whose layers come one by one on `layers` while the prefill runs,
    /// closed by `last` (the transfer with one empty block per block). The receiver gets the
    /// same [`KvTransfer`] as from [`KvTransport::send`]. This default waits for every layer and
    /// sends the whole; a transport that can overlap the layers with the compute does.
    fn send_streamed(
        &self,
        to: &Endpoint,
        request_id: u64,
        mut layers: tokio::sync::mpsc::UnboundedReceiver<LayerParts>,
        last: tokio::sync::oneshot::Receiver<KvTransfer>,
    ) -> impl Future<Output = Result<TransferReceipt, TransportError>> + Send {
        async move {
            let mut parts = Vec::new();
            while let Some(layer) = layers.recv().await {
                parts.push(layer);
            }
            let mut whole = last.await.map_err(|_| TransportError::Refused {
                endpoint: to.clone(),
                request_id,
                reason: "the sender gave up before the transfer was complete",
            })?;
            whole.kv.blocks = assemble_layers(parts, whole.kv.blocks.len());
            self.send(to, whole).await
        }
    }
}

/// The blocks that `n_blocks` blocks' layer parts make, layer by layer in layer order.
pub fn assemble_layers(mut parts: Vec<LayerParts>, n_blocks: usize) -> Vec<Vec<u8>> {
    parts.sort_by_key(|(layer, _)| *layer);
    let mut blocks = vec![Vec::new(); n_blocks];
    for (_, layer) in parts {
        for (block, part) in blocks.iter_mut().zip(layer) {
            block.extend_from_slice(&part);
        }
    }
    blocks
}

/// Refuses a transfer computed by another model than the receiving inbox's.
pub(crate) fn check_fingerprint(
    to: &Endpoint,
    transfer: &KvTransfer,
    model_fingerprint: u64,
) -> Result<(), TransportError> {
    if transfer.model_fingerprint == model_fingerprint {
        return Ok(());
    }
    Err(TransportError::FingerprintMismatch {
        endpoint: to.clone(),
        request_id: transfer.request_id,
        sent: transfer.model_fingerprint,
        receiver: model_fingerprint,
    })
}

/// Delivers a transfer into an in-process inbox (the local and cuda-p2p transports, once its
/// blocks are where the receiver reads them).
pub(crate) async fn hand_over(
    to: &Endpoint,
    deliver: &tokio::sync::mpsc::Sender<KvTransfer>,
    transfer: KvTransfer,
    payload_bytes: u64,
    started: std::time::Instant,
) -> Result<TransferReceipt, TransportError> {
    let request_id = transfer.request_id;
    deliver
        .send(transfer)
        .await
        .map_err(|_| TransportError::Refused {
            endpoint: to.clone(),
            request_id,
            reason: "the receiving worker is gone",
        })?;
    Ok(TransferReceipt {
        request_id,
        payload_bytes,
        wire_bytes: payload_bytes,
        attempts: 1,
        started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_are_selected_by_name() {
        for kind in TransportKind::ALL {
            assert_eq!(kind.name().parse::<TransportKind>(), Ok(kind));
        }
        let err = "rdma".parse::<TransportKind>().unwrap_err();
        assert!(err.contains("`rdma`"), "{err}");
        assert_eq!(
            Endpoint::CudaPeer("decode-0".into()).to_string(),
            "cuda-p2p://decode-0"
        );
    }
}
