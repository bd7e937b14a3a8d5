//! Page-locked host buffers through which KV leaves and enters GPUs: allocating them takes
//! milliseconds, and holds up the process's other CUDA calls meanwhile, so pairs are pooled
//! and reused for the life of the process, and a worker that sends or receives KV allocates
//! its pairs before it serves ([`warm`]).

use super::{CudaError, at};
use candle_core::cuda_backend::cudarc::driver::{CudaContext, PinnedHostSlice, sys};
use std::sync::{Arc, Mutex};

/// Bytes of one buffer: large enough that a copy's fixed cost is small beside its bytes,
/// small enough that a pipeline of two fills quickly.
pub(crate) const CHUNK_BYTES: usize = 8 << 20;

/// Two buffers of [`CHUNK_BYTES`], portable (every context may copy through them), so one can
/// be copied while the other is read or written.
pub(crate) struct PinnedPair {
    bufs: [PinnedHostSlice<u8>; 2],
}

static POOL: Mutex<Vec<PinnedPair>> = Mutex::new(Vec::new());

impl PinnedPair {
    /// A pair from the pool, or a new one allocated through `ctx`.
    pub(crate) fn take(ctx: &Arc<CudaContext>) -> Result<PinnedPair, CudaError> {
        if let Some(pair) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(pair);
        }
        PinnedPair::alloc(ctx)
    }

    fn alloc(ctx: &Arc<CudaContext>) -> Result<PinnedPair, CudaError> {
        let alloc = || {
            // SAFETY: the bytes are uninitialised; every use writes a range before reading it.
            unsafe { ctx.alloc_pinned_with_flags::<u8>(CHUNK_BYTES, sys::CU_MEMHOSTALLOC_PORTABLE) }
                .map_err(at("cuMemHostAlloc"))
        };
        Ok(PinnedPair {
            bufs: [alloc()?, alloc()?],
        })
    }

    /// Returns the pair to the pool; the caller has waited for every copy through it.
    pub(crate) fn give_back(self) {
        POOL.lock().unwrap_or_else(|e| e.into_inner()).push(self);
    }

    /// The first `n` bytes of buffer `i` (reaching them waits for the buffer's last copy,
    /// which needs the context on this thread: a task may have moved at an await).
    pub(crate) fn get(&self, i: usize, n: usize) -> Result<&[u8], CudaError> {
        models::runtime::context::bind(self.bufs[i].context()).map_err(at("cuCtxSetCurrent"))?;
        Ok(&self.bufs[i].as_slice().map_err(at("cuEventSynchronize"))?[..n])
    }

    pub(crate) fn get_mut(&mut self, i: usize, n: usize) -> Result<&mut [u8], CudaError> {
        models::runtime::context::bind(self.bufs[i].context()).map_err(at("cuCtxSetCurrent"))?;
        Ok(&mut self.bufs[i]
            .as_mut_slice()
            .map_err(at("cuEventSynchronize"))?[..n])
    }
}

/// Allocates pairs through `ctx` until the pool holds `pairs`, so that as many transfers at
/// once find theirs there. The first transfer to overlap another would otherwise allocate its
/// pair in its path and stall the process's transfers and steps for milliseconds.
pub(crate) fn warm(ctx: &Arc<CudaContext>, pairs: usize) -> Result<(), CudaError> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    while pool.len() < pairs {
        pool.push(PinnedPair::alloc(ctx)?);
    }
    Ok(())
}

/// Pairs in the pool now (none of them in use).
pub(crate) fn pooled() -> usize {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// `len` bytes cut into pieces of at most [`CHUNK_BYTES`]: `(offset, bytes)` of piece `i`.
pub(crate) fn chunk(len: usize, i: usize) -> (usize, usize) {
    let offset = i * CHUNK_BYTES;
    (offset, CHUNK_BYTES.min(len - offset))
}

pub(crate) fn chunks(len: usize) -> usize {
    len.div_ceil(CHUNK_BYTES)
}
