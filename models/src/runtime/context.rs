//! Making a GPU's context current on the calling thread.

use candle_core::cuda_backend::cudarc::driver::{CudaContext, DriverError, result, sys};

/// Binds `ctx` to this thread. Binding now and then fails with `CUDA_ERROR_INVALID_CONTEXT`
/// (seen in the prefill workers of the GPU validation cases, on an H200 with driver 580, with
/// and without another context current on the thread); clearing the thread's context and
/// binding again has succeeded every time. A retry says so on stderr.
pub fn bind(ctx: &CudaContext) -> Result<(), DriverError> {
    let Err(first) = ctx.bind_to_thread() else {
        return Ok(());
    };
    let mut current: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: an out pointer to a context handle; a null handle unbinds this thread; `ctx`
    // holds its context alive.
    let query = unsafe { sys::cuCtxGetCurrent(&mut current) };
    unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) }.result()?;
    let bound = unsafe { result::ctx::set_current(ctx.cu_ctx()) };
    eprintln!(
        "warning: binding the CUDA context to thread {:?} failed ({first:?}; its current \
         context {current:?}, queried: {query:?}); after clearing it: {bound:?}",
        std::thread::current().id(),
    );
    bound.map_err(|_| first)
}
