//! What the hardware does without a transport around it, for `bench-transfer` to compare
//! against: a plain `cuMemcpyPeerAsync` between two preallocated buffers (peer access enabled
//! where possible, as a tuned application would), and copies between a GPU and pinned host
//! memory. Each is timed on the host from enqueueing to the stream's completion, as the
//! transports are.

use super::{CudaError, Gpu, at, p2p::enable_peer_access};
use candle_core::Device;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, PinnedHostSlice, result, sys,
};
use std::time::Instant;

/// Buffers of one size on a source and a destination GPU, and in pinned host memory.
pub struct CopyBaseline {
    src: Gpu,
    dst: Gpu,
    src_buf: CudaSlice<u8>,
    dst_buf: CudaSlice<u8>,
    /// Pinned buffers of each side's context: an event of one context is never recorded on
    /// the other's stream.
    host_out: PinnedHostSlice<u8>,
    host_in: PinnedHostSlice<u8>,
    bytes: usize,
    peer_access: bool,
}

impl CopyBaseline {
    pub fn new(src: &Device, dst: &Device, bytes: usize) -> Result<CopyBaseline, CudaError> {
        let (src, dst) = (Gpu::of(src)?, Gpu::of(dst)?);
        let peer_access = src.ordinal() != dst.ordinal() && enable_peer_access(&src, &dst)?;
        let src_buf = src
            .outbound
            .alloc_zeros::<u8>(bytes)
            .map_err(at("cuMemAllocAsync"))?;
        let dst_buf = dst
            .inbound
            .alloc_zeros::<u8>(bytes)
            .map_err(at("cuMemAllocAsync"))?;
        let pinned = |gpu: &Gpu| {
            // SAFETY: only ever a copy destination or source of whole bytes.
            unsafe {
                gpu.context()
                    .alloc_pinned_with_flags::<u8>(bytes, sys::CU_MEMHOSTALLOC_PORTABLE)
            }
            .map_err(at("cuMemHostAlloc"))
        };
        let (host_out, host_in) = (pinned(&src)?, pinned(&dst)?);
        src.outbound
            .synchronize()
            .and_then(|()| dst.inbound.synchronize())
            .map_err(at("cuStreamSynchronize"))?;
        Ok(CopyBaseline {
            src,
            dst,
            src_buf,
            dst_buf,
            host_out,
            host_in,
            bytes,
            peer_access,
        })
    }

    /// Whether the two GPUs copy with peer access (false on one GPU).
    pub fn peer_access(&self) -> bool {
        self.peer_access
    }

    /// Nanoseconds of one `cuMemcpyPeerAsync` of all the bytes, source to destination.
    pub fn peer_copy_ns(&mut self) -> Result<u64, CudaError> {
        let stream = self.dst.inbound.clone();
        let started = Instant::now();
        {
            let (src, _read) = self.src_buf.device_ptr(&self.src.outbound);
            let (dst, _write) = self.dst_buf.device_ptr_mut(&stream);
            self.dst.bind()?;
            // SAFETY: both buffers hold `bytes` bytes and outlive the synchronisation below.
            unsafe {
                result::memcpy_peer_async(
                    self.dst.context().cu_ctx(),
                    dst,
                    self.src.context().cu_ctx(),
                    src,
                    self.bytes,
                    stream.cu_stream(),
                )
            }
            .map_err(at("cuMemcpyPeerAsync"))?;
        }
        stream.synchronize().map_err(at("cuStreamSynchronize"))?;
        Ok(started.elapsed().as_nanos() as u64)
    }

    /// Nanoseconds of one copy of all the bytes from the source GPU to pinned host memory.
    pub fn to_host_ns(&mut self) -> Result<u64, CudaError> {
        let stream = self.src.outbound.clone();
        let started = Instant::now();
        stream
            .memcpy_dtoh(&self.src_buf, &mut self.host_out)
            .map_err(at("cuMemcpyDtoHAsync"))?;
        stream.synchronize().map_err(at("cuStreamSynchronize"))?;
        Ok(started.elapsed().as_nanos() as u64)
    }

    /// Nanoseconds of one copy of all the bytes from pinned host memory to the destination GPU.
    pub fn from_host_ns(&mut self) -> Result<u64, CudaError> {
        let stream = self.dst.inbound.clone();
        let started = Instant::now();
        stream
            .memcpy_htod(&self.host_in, &mut self.dst_buf)
            .map_err(at("cuMemcpyHtoDAsync"))?;
        stream.synchronize().map_err(at("cuStreamSynchronize"))?;
        Ok(started.elapsed().as_nanos() as u64)
    }
}
