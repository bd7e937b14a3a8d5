//! The payload of a transfer frame when it lives in device memory: written to the socket from
//! there and read from the socket into there. On a GPU (feature `cuda`) this goes through pinned
//! host buffers chunk by chunk, so the copies overlap the socket; on other devices through
//! ordinary host memory.

use super::wire::{FrameReader, WireError};
use crate::paged::{DeviceBlocks, PagedError};
use models::runtime::{Device, TensorDType};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Why KV could not be moved into, out of or between devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceIoError {
    #[error(transparent)]
    Kv(#[from] PagedError),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] super::cuda::CudaError),
}

/// Writes the rows' bytes (the frame's payload), adding them to `crc`.
pub(crate) async fn write_rows<W: AsyncWrite + Unpin>(
    w: &mut W,
    rows: &DeviceBlocks,
    crc: &mut crc32fast::Hasher,
) -> Result<(), WireError> {
    #[cfg(feature = "cuda")]
    if rows.device().is_cuda() {
        return super::cuda::staging::write_rows(w, rows, crc).await;
    }
    for block in rows.to_host_blocks().map_err(DeviceIoError::from)? {
        crc.update(&block);
        w.write_all(&block).await?;
    }
    Ok(())
}

/// Reads a payload of `n_blocks` blocks of `bytes_per_block` bytes (already checked against
/// the limits) into rows of `dtype` on `device`.
pub(crate) async fn read_rows<R: AsyncRead + Unpin>(
    fr: &mut FrameReader<'_, R>,
    n_blocks: usize,
    bytes_per_block: usize,
    dtype: TensorDType,
    device: &Device,
) -> Result<DeviceBlocks, WireError> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return super::cuda::staging::read_rows(fr, n_blocks, bytes_per_block, dtype, device).await;
    }
    let mut blocks = Vec::with_capacity(n_blocks);
    for _ in 0..n_blocks {
        let mut block = vec![0u8; bytes_per_block];
        fr.fill(&mut block, "payload").await?;
        blocks.push(block);
    }
    Ok(DeviceBlocks::from_host_blocks(&blocks, dtype, device).map_err(DeviceIoError::from)?)
}
