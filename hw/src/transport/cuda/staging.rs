//! A TCP frame's payload straight from and into GPU memory: device -> pinned host -> socket on
//! the sending side, socket -> pinned host -> device on the receiving side, one chunk copying
//! while the other crosses the socket.

use super::pinned::{PinnedPair, chunk, chunks};
use super::{CudaError, Gpu, at, completed, tensor_span};
use crate::paged::DeviceBlocks;
use crate::transport::DeviceIoError;
use crate::transport::wire::{FrameReader, WireError};
use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::{DType, Device};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

fn device_error(e: CudaError) -> WireError {
    WireError::Device(DeviceIoError::Cuda(e))
}

/// Writes the rows' bytes to `w`, adding them to `crc`.
pub(crate) async fn write_rows<W: AsyncWrite + Unpin>(
    w: &mut W,
    rows: &DeviceBlocks,
    crc: &mut crc32fast::Hasher,
) -> Result<(), WireError> {
    let gpu = Gpu::of(rows.device()).map_err(device_error)?;
    let (src, len) = tensor_span(rows.rows(), &gpu.outbound).map_err(device_error)?;
    let mut pinned = PinnedPair::take(gpu.context()).map_err(device_error)?;
    let written = write_chunks(w, &gpu, src, len, &mut pinned, crc).await;
    // Copies still in flight into the buffers finish before the buffers are reused. The task
    // may have moved to another thread at an await.
    let synced = gpu.bind().and_then(|()| {
        gpu.outbound
            .synchronize()
            .map_err(at("cuStreamSynchronize"))
    });
    pinned.give_back();
    written?;
    synced.map_err(device_error)
}

async fn write_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    gpu: &Gpu,
    src: sys::CUdeviceptr,
    len: usize,
    pinned: &mut PinnedPair,
    crc: &mut crc32fast::Hasher,
) -> Result<(), WireError> {
    let stream = &gpu.outbound;
    let new_event = || {
        gpu.context()
            .new_event(None)
            .map_err(at("cuEventCreate"))
            .map_err(device_error)
    };
    let copied = [new_event()?, new_event()?];
    // Chunk i goes into buffer i % 2; it is enqueued once chunk i - 2 has left through the
    // socket, so the copy of one chunk overlaps the socket write of the previous.
    let enqueue = |i: usize, pinned: &mut PinnedPair| -> Result<(), CudaError> {
        let (offset, n) = chunk(len, i);
        // The buffer first: reaching it binds the context that allocated it.
        let buf = pinned.get_mut(i % 2, n)?;
        gpu.bind()?;
        // SAFETY: `src + offset .. + n` lies in the live tensor; the buffer is not read until
        // the event recorded after the copy completes.
        unsafe { result::memcpy_dtoh_async(buf, src + offset as u64, stream.cu_stream()) }
            .map_err(at("cuMemcpyDtoHAsync"))?;
        copied[i % 2].record(stream).map_err(at("cuEventRecord"))
    };
    let n_chunks = chunks(len);
    if n_chunks > 0 {
        enqueue(0, pinned).map_err(device_error)?;
    }
    for i in 0..n_chunks {
        if i + 1 < n_chunks {
            enqueue(i + 1, pinned).map_err(device_error)?;
        }
        completed(&copied[i % 2]).await.map_err(device_error)?;
        let bytes = pinned.get(i % 2, chunk(len, i).1).map_err(device_error)?;
        crc.update(bytes);
        w.write_all(bytes).await?;
    }
    Ok(())
}

/// Reads a payload of `n_blocks` blocks of `bytes_per_block` bytes from `fr` into new rows of
/// `dtype` on `device`.
pub(crate) async fn read_rows<R: AsyncRead + Unpin>(
    fr: &mut FrameReader<'_, R>,
    n_blocks: usize,
    bytes_per_block: usize,
    dtype: DType,
    device: &Device,
) -> Result<DeviceBlocks, WireError> {
    let gpu = Gpu::of(device).map_err(device_error)?;
    let len = n_blocks * bytes_per_block;
    let elem = dtype.size_in_bytes();
    let (slice, dst) = gpu.alloc(dtype, len / elem).map_err(device_error)?;
    let mut pinned = PinnedPair::take(gpu.context()).map_err(device_error)?;
    let read = read_chunks(fr, &gpu, dst, len, &mut pinned).await;
    let synced = gpu
        .bind()
        .and_then(|()| gpu.inbound.synchronize().map_err(at("cuStreamSynchronize")));
    pinned.give_back();
    read?;
    synced.map_err(device_error)?;
    let rows = gpu.wrap(slice, &[n_blocks, bytes_per_block / elem]);
    Ok(DeviceBlocks::new(rows).map_err(DeviceIoError::from)?)
}

async fn read_chunks<R: AsyncRead + Unpin>(
    fr: &mut FrameReader<'_, R>,
    gpu: &Gpu,
    dst: sys::CUdeviceptr,
    len: usize,
    pinned: &mut PinnedPair,
) -> Result<(), WireError> {
    let stream = &gpu.inbound;
    let new_event = || {
        gpu.context()
            .new_event(None)
            .map_err(at("cuEventCreate"))
            .map_err(device_error)
    };
    let copied = [new_event()?, new_event()?];
    for i in 0..chunks(len) {
        let (offset, n) = chunk(len, i);
        // The copy out of this buffer two chunks ago is done (an unrecorded event is).
        completed(&copied[i % 2]).await.map_err(device_error)?;
        fr.fill(pinned.get_mut(i % 2, n).map_err(device_error)?, "payload")
            .await?;
        let enqueue = || -> Result<(), CudaError> {
            let buf = pinned.get(i % 2, n)?;
            gpu.bind()?;
            // SAFETY: `dst + offset .. + n` lies in the allocation; the buffer is not written
            // again before the event recorded after this copy completes.
            unsafe { result::memcpy_htod_async(dst + offset as u64, buf, stream.cu_stream()) }
                .map_err(at("cuMemcpyHtoDAsync"))?;
            copied[i % 2].record(stream).map_err(at("cuEventRecord"))
        };
        enqueue().map_err(device_error)?;
    }
    Ok(())
}
