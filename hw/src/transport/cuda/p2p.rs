//! `cuda-p2p`: KV between the GPUs of one process. A transfer's device rows are copied into
//! the receiving inbox's GPU (peer to peer where the driver says the GPUs can reach each
//! other, else staged through pinned host buffers) before the transfer is delivered.

use super::pinned::{PinnedPair, chunk, chunks};
use super::{CudaError, Gpu, at, completed, mark, tensor_span};
use crate::paged::DeviceBlocks;
use crate::transport::{
    DeviceIoError, Endpoint, KvTransfer, KvTransport, TransferReceipt, TransportError,
};
use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// How a transfer's rows reach the receiving GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Sender and receiver use one candle device: the rows (a fresh export, owned by the
    /// transfer) are handed over without a copy.
    Handover,
    /// One GPU, two device handles: a copy within its memory.
    SameGpu,
    /// Two GPUs with peer access: `cuMemcpyPeerAsync`.
    Peer,
    /// Device -> pinned host -> device, two chunks in flight.
    Staged,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Handover => "handover",
            Route::SameGpu => "same-gpu",
            Route::Peer => "peer",
            Route::Staged => "staged",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct P2pConfig {
    /// Stage through pinned host buffers even where a peer copy is possible (to measure that
    /// path where every GPU pair has peer access).
    pub force_staged: bool,
}

struct Inbox {
    model_fingerprint: u64,
    deliver: mpsc::Sender<KvTransfer>,
    gpu: Gpu,
}

/// Named inboxes, each on one GPU; clones share them.
#[derive(Clone)]
pub struct CudaP2pTransport {
    config: P2pConfig,
    inboxes: Arc<Mutex<BTreeMap<String, Inbox>>>,
    /// Pairs of ordinals whose peer access has been settled: `true` when enabled both ways.
    peers: Arc<Mutex<BTreeMap<(usize, usize), bool>>>,
}

impl CudaP2pTransport {
    pub fn new(config: P2pConfig) -> CudaP2pTransport {
        CudaP2pTransport {
            config,
            inboxes: Arc::default(),
            peers: Arc::default(),
        }
    }

    /// Makes `Endpoint::CudaPeer(name)` deliver into `deliver`, with the rows on `device`, the
    /// transfers made for `model_fingerprint`; replaces an earlier registration of the name.
    pub fn register(
        &self,
        name: &str,
        model_fingerprint: u64,
        device: &Device,
        deliver: mpsc::Sender<KvTransfer>,
    ) -> Result<(), CudaError> {
        let gpu = Gpu::of(device)?;
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                name.to_string(),
                Inbox {
                    model_fingerprint,
                    deliver,
                    gpu,
                },
            );
        Ok(())
    }

    /// The route rows on `src` take to `dst` (enabling peer access on first use).
    pub fn route(&self, src: &Device, dst: &Device) -> Result<Route, CudaError> {
        self.route_between(&Gpu::of(src)?, &Gpu::of(dst)?)
    }

    fn route_between(&self, src: &Gpu, dst: &Gpu) -> Result<Route, CudaError> {
        if self.config.force_staged {
            return Ok(Route::Staged);
        }
        if src.same_handle(dst) {
            return Ok(Route::Handover);
        }
        if src.ordinal() == dst.ordinal() {
            return Ok(Route::SameGpu);
        }
        let key = (src.ordinal(), dst.ordinal());
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let peer = match peers.get(&key) {
            Some(&peer) => peer,
            None => {
                let peer = enable_peer_access(src, dst)?;
                peers.insert(key, peer);
                peers.insert((key.1, key.0), peer);
                peer
            }
        };
        Ok(if peer { Route::Peer } else { Route::Staged })
    }

    /// The rows copied onto `dst` (or handed over), once the copy has completed.
    async fn move_rows(&self, rows: &DeviceBlocks, dst: &Gpu) -> Result<DeviceBlocks, CudaError> {
        if !rows.device().is_cuda() {
            let moved = rows.rows().to_device(dst.device())?;
            return DeviceBlocks::new(moved).map_err(|e| CudaError::Unsupported(e.to_string()));
        }
        let src = Gpu::of(rows.device())?;
        let route = self.route_between(&src, dst)?;
        if route == Route::Handover {
            return Ok(rows.clone());
        }
        let moved = copy_rows(&src, dst, rows.rows(), route).await?;
        DeviceBlocks::new(moved).map_err(|e| CudaError::Unsupported(e.to_string()))
    }
}

/// Whether `src` and `dst` can read each other's memory, enabling that both ways if so.
pub(super) fn enable_peer_access(src: &Gpu, dst: &Gpu) -> Result<bool, CudaError> {
    let can = |from: &Gpu, to: &Gpu| -> Result<bool, CudaError> {
        let mut can: std::ffi::c_int = 0;
        // SAFETY: plain query of two valid device handles.
        unsafe {
            sys::cuDeviceCanAccessPeer(
                &mut can,
                from.context().cu_device(),
                to.context().cu_device(),
            )
        }
        .result()
        .map_err(at("cuDeviceCanAccessPeer"))?;
        Ok(can != 0)
    };
    if !(can(src, dst)? && can(dst, src)?) {
        return Ok(false);
    }
    for (from, to) in [(src, dst), (dst, src)] {
        from.bind()?;
        // SAFETY: both contexts are alive (held by their `Gpu`s).
        match unsafe { sys::cuCtxEnablePeerAccess(to.context().cu_ctx(), 0) }.result() {
            Ok(()) => {}
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
            Err(e) => return Err(at("cuCtxEnablePeerAccess")(e)),
        }
    }
    Ok(true)
}

/// Copies contiguous `rows` (on `src`) into new rows of the same shape on `dst` along `route`
/// (not [`Route::Handover`]); returns them once the copy has completed.
pub(super) async fn copy_rows(
    src: &Gpu,
    dst: &Gpu,
    rows: &Tensor,
    route: Route,
) -> Result<Tensor, CudaError> {
    let (src_ptr, len) = tensor_span(rows, &src.outbound)?;
    let (slice, dst_ptr) = dst.alloc(rows.dtype(), rows.elem_count())?;
    match route {
        Route::Handover | Route::SameGpu | Route::Peer => {
            // The inbound stream starts once the rows are ready (the outbound stream waited).
            dst.inbound
                .wait(&mark(&src.outbound)?)
                .map_err(at("cuStreamWaitEvent"))?;
            dst.bind()?;
            // SAFETY: both ranges are `len` bytes of live allocations; the source stays alive
            // (borrowed) until the completion awaited below.
            unsafe {
                if route == Route::Peer {
                    result::memcpy_peer_async(
                        dst.context().cu_ctx(),
                        dst_ptr,
                        src.context().cu_ctx(),
                        src_ptr,
                        len,
                        dst.inbound.cu_stream(),
                    )
                    .map_err(at("cuMemcpyPeerAsync"))?;
                } else {
                    result::memcpy_dtod_async(dst_ptr, src_ptr, len, dst.inbound.cu_stream())
                        .map_err(at("cuMemcpyDtoDAsync"))?;
                }
            }
            completed(&mark(&dst.inbound)?).await?;
        }
        Route::Staged => {
            let mut pinned = PinnedPair::take(src.context())?;
            let enqueued = enqueue_staged(src, dst, src_ptr, dst_ptr, len, &mut pinned);
            let done = match enqueued {
                Ok(()) => match mark(&dst.inbound) {
                    Ok(event) => completed(&event).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            // Whatever happened, nothing may still be copying through the buffers (the task
            // may have moved to another thread at the await).
            let synced = src.bind().and_then(|()| {
                src.outbound
                    .synchronize()
                    .and_then(|()| dst.inbound.synchronize())
                    .map_err(at("cuStreamSynchronize"))
            });
            pinned.give_back();
            done?;
            synced?;
        }
    }
    Ok(dst.wrap(slice, rows.dims()))
}

/// Enqueues the staged copy: per chunk, device -> buffer on the source's outbound stream, then
/// buffer -> device on the destination's inbound stream, each waiting for the other through
/// events, so two chunks are in flight and the host only enqueues.
fn enqueue_staged(
    src: &Gpu,
    dst: &Gpu,
    src_ptr: sys::CUdeviceptr,
    dst_ptr: sys::CUdeviceptr,
    len: usize,
    pinned: &mut PinnedPair,
) -> Result<(), CudaError> {
    let event = |gpu: &Gpu| gpu.context().new_event(None).map_err(at("cuEventCreate"));
    let out_done = [event(src)?, event(src)?];
    let in_done = [event(dst)?, event(dst)?];
    for i in 0..chunks(len) {
        let (b, (offset, n)) = (i % 2, chunk(len, i));
        // The buffer's previous chunk has reached the destination (an unrecorded event has).
        src.outbound
            .wait(&in_done[b])
            .map_err(at("cuStreamWaitEvent"))?;
        // The buffer first: reaching it binds the context that allocated it.
        let buf = pinned.get_mut(b, n)?;
        src.bind()?;
        // SAFETY: in-range copies; the buffer's reuse is ordered by the events.
        unsafe {
            result::memcpy_dtoh_async(buf, src_ptr + offset as u64, src.outbound.cu_stream())
        }
        .map_err(at("cuMemcpyDtoHAsync"))?;
        out_done[b]
            .record(&src.outbound)
            .map_err(at("cuEventRecord"))?;
        dst.inbound
            .wait(&out_done[b])
            .map_err(at("cuStreamWaitEvent"))?;
        let buf = pinned.get(b, n)?;
        dst.bind()?;
        // SAFETY: as above.
        unsafe { result::memcpy_htod_async(dst_ptr + offset as u64, buf, dst.inbound.cu_stream()) }
            .map_err(at("cuMemcpyHtoDAsync"))?;
        in_done[b]
            .record(&dst.inbound)
            .map_err(at("cuEventRecord"))?;
    }
    Ok(())
}

impl KvTransport for CudaP2pTransport {
    async fn send(
        &self,
        to: &Endpoint,
        mut transfer: KvTransfer,
    ) -> Result<TransferReceipt, TransportError> {
        let Endpoint::CudaPeer(name) = to else {
            return Err(TransportError::UnsupportedEndpoint {
                transport: "cuda-p2p",
                endpoint: to.clone(),
            });
        };
        let (model_fingerprint, deliver, gpu) = {
            let inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
            let inbox = inboxes
                .get(name)
                .ok_or_else(|| TransportError::UnknownEndpoint(to.clone()))?;
            (
                inbox.model_fingerprint,
                inbox.deliver.clone(),
                inbox.gpu.clone(),
            )
        };
        let request_id = transfer.request_id;
        super::super::check_fingerprint(to, &transfer, model_fingerprint)?;
        let payload_bytes = transfer.kv.payload_bytes() as u64;
        let started = std::time::Instant::now();
        if let Some(rows) = transfer.kv.device.take() {
            let moved = self
                .move_rows(&rows, &gpu)
                .await
                .map_err(|e| TransportError::Device {
                    endpoint: to.clone(),
                    request_id,
                    source: Box::new(DeviceIoError::Cuda(e)),
                })?;
            transfer.kv.device = Some(moved);
        }
        super::super::hand_over(to, &deliver, transfer, payload_bytes, started).await
    }
}
