//! KV between GPUs, with cudarc: peer copies between the GPUs of one process
//! ([`CudaP2pTransport`]) and the pinned host buffers through which device KV crosses TCP
//! ([`staging`]). Every CUDA call's result is checked and becomes a [`CudaError`].
//!
//! Copies run on streams of this module's own, two per device ([`Gpu`]), and each completes
//! before its result is handed on, so candle's streams never see memory still being written.

pub mod baseline;
mod p2p;
mod pinned;
pub(crate) mod staging;

pub use p2p::{CudaP2pTransport, P2pConfig, Route};

use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, sys,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, DeviceLocation, Storage, Tensor};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{op} failed: {source}")]
    Driver {
        op: &'static str,
        source: DriverError,
    },
    #[error("{what} is on {location:?}, not on a CUDA device")]
    NotCuda {
        what: &'static str,
        location: DeviceLocation,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Names the CUDA call a driver error came from.
fn at(op: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |source| CudaError::Driver { op, source }
}

/// One GPU as the transports use it: candle's device handle (whose tensors they move) and two
/// copy streams of their own, one for bytes leaving the GPU and one for bytes arriving, so that
/// a copy out and a copy in overlap even on one GPU.
#[derive(Clone, Debug)]
pub struct Gpu {
    device: Device,
    cuda: CudaDevice,
    outbound: Arc<CudaStream>,
    inbound: Arc<CudaStream>,
}

/// The [`Gpu`] of every candle device seen so far, so streams are made once per device.
static GPUS: Mutex<Vec<(DeviceId, Gpu)>> = Mutex::new(Vec::new());

impl Gpu {
    /// The GPU behind `device` (a `cuda:N` candle device).
    pub fn of(device: &Device) -> Result<Gpu, CudaError> {
        let Device::Cuda(cuda) = device else {
            return Err(CudaError::NotCuda {
                what: "the device",
                location: device.location(),
            });
        };
        let mut gpus = GPUS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, gpu)) = gpus.iter().find(|(id, _)| *id == cuda.id()) {
            return Ok(gpu.clone());
        }
        let ctx = cuda.cuda_stream().context().clone();
        let gpu = Gpu {
            device: device.clone(),
            cuda: cuda.clone(),
            outbound: ctx.new_stream().map_err(at("cuStreamCreate"))?,
            inbound: ctx.new_stream().map_err(at("cuStreamCreate"))?,
        };
        gpus.push((cuda.id(), gpu.clone()));
        Ok(gpu)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn ordinal(&self) -> usize {
        self.context().ordinal()
    }

    /// The GPU's name, as the driver gives it.
    pub fn name(&self) -> Result<String, CudaError> {
        self.context().name().map_err(at("cuDeviceGetName"))
    }

    fn context(&self) -> &Arc<CudaContext> {
        self.inbound.context()
    }

    fn bind(&self) -> Result<(), CudaError> {
        models::runtime::context::bind(self.context()).map_err(at("cuCtxSetCurrent"))
    }

    /// Whether the tensors of `self` and `other` are one candle device's.
    fn same_handle(&self, other: &Gpu) -> bool {
        self.cuda.id() == other.cuda.id()
    }

    /// Uninitialised memory for `elems` elements of `dtype`, and its address, for copies on the
    /// inbound stream to fill. It is allocated on candle's stream, which is per thread: it is
    /// freed on the stream of the thread that drops it, after the work that thread enqueued on
    /// it (an import's scatter, say).
    fn alloc(
        &self,
        dtype: DType,
        elems: usize,
    ) -> Result<(CudaStorageSlice, sys::CUdeviceptr), CudaError> {
        let stream = &self.cuda.cuda_stream();
        let alloc = at("cuMemAllocAsync");
        // SAFETY (each arm): the memory is written in full by the caller's copies before it is
        // wrapped into a tensor that anything reads.
        let mut slice = match dtype {
            DType::U8 => CudaStorageSlice::U8(unsafe { stream.alloc(elems) }.map_err(alloc)?),
            DType::F16 => CudaStorageSlice::F16(unsafe { stream.alloc(elems) }.map_err(alloc)?),
            DType::BF16 => CudaStorageSlice::BF16(unsafe { stream.alloc(elems) }.map_err(alloc)?),
            DType::F32 => CudaStorageSlice::F32(unsafe { stream.alloc(elems) }.map_err(alloc)?),
            other => return Err(unsupported_dtype(other)),
        };
        let ptr = match &mut slice {
            CudaStorageSlice::U8(s) => address_mut(s, stream),
            CudaStorageSlice::F16(s) => address_mut(s, stream),
            CudaStorageSlice::BF16(s) => address_mut(s, stream),
            CudaStorageSlice::F32(s) => address_mut(s, stream),
            _ => unreachable!("allocated as one of the four above"),
        };
        self.inbound
            .wait(&mark(stream)?)
            .map_err(at("cuStreamWaitEvent"))?;
        Ok((slice, ptr))
    }

    /// `slice` (from [`Gpu::alloc`], its copies complete) as a candle tensor of shape `dims`.
    fn wrap(&self, slice: CudaStorageSlice, dims: &[usize]) -> Tensor {
        let storage = Storage::Cuda(CudaStorage {
            slice,
            device: self.cuda.clone(),
        });
        Tensor::from_storage(storage, dims, BackpropOp::none(), false)
    }
}

/// Transfers a worker stages at once without allocating: a prefill worker's sends (and a
/// decode worker's receipts) overlap when prefills end close together, seldom more than two at
/// a time in the validation runs. Each costs
/// 2 x [`pinned::CHUNK_BYTES`] of page-locked host memory.
pub const STAGING_PAIRS: usize = 4;

/// Allocates the pinned buffers through which `device`'s KV crosses TCP until `pairs` transfers
/// at once find theirs ready; returns how many the process holds.
pub fn warm_staging(device: &Device, pairs: usize) -> Result<usize, CudaError> {
    pinned::warm(Gpu::of(device)?.context(), pairs)?;
    Ok(pinned::pooled())
}

fn unsupported_dtype(dtype: DType) -> CudaError {
    CudaError::Unsupported(format!(
        "{dtype:?} tensors cannot be moved (u8, f16, bf16 or f32)"
    ))
}

fn address<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> sys::CUdeviceptr {
    s.device_ptr(stream).0
}

fn address_mut<T>(s: &mut CudaSlice<T>, stream: &Arc<CudaStream>) -> sys::CUdeviceptr {
    s.device_ptr_mut(stream).0
}

/// The device address of a contiguous CUDA tensor's first element and its size in bytes, for
/// copies on `stream` (of the tensor's context). The tensor's writes have completed
/// ([`crate::paged::DeviceBlocks::new`] waits for them). The address stays valid while the
/// tensor lives: the caller keeps it alive until its copies have completed, and nothing
/// writes to exported KV rows.
fn tensor_span(
    t: &Tensor,
    stream: &Arc<CudaStream>,
) -> Result<(sys::CUdeviceptr, usize), CudaError> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(CudaError::NotCuda {
            what: "the tensor",
            location: t.device().location(),
        });
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| CudaError::Unsupported("the tensor is not contiguous".into()))?;
    let base = match &s.slice {
        CudaStorageSlice::U8(x) => address(x, stream),
        CudaStorageSlice::F16(x) => address(x, stream),
        CudaStorageSlice::BF16(x) => address(x, stream),
        CudaStorageSlice::F32(x) => address(x, stream),
        _ => return Err(unsupported_dtype(t.dtype())),
    };
    // Waiting for the writer and recording the read are checked here.
    stream
        .context()
        .check_err()
        .map_err(at("cuStreamWaitEvent"))?;
    let elem = t.dtype().size_in_bytes();
    Ok((base + (start * elem) as u64, (end - start) * elem))
}

/// Waits, yielding to the async runtime between polls, until the work recorded in `event` is
/// done. (A copy takes microseconds to a millisecond; a blocking wait would hold a runtime
/// thread, a sleeping one would add its own latency.)
async fn completed(event: &CudaEvent) -> Result<(), CudaError> {
    while !event.try_is_complete().map_err(at("cuEventQuery"))? {
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Records `stream`'s work so far into a new event.
fn mark(stream: &Arc<CudaStream>) -> Result<CudaEvent, CudaError> {
    stream.record_event(None).map_err(at("cuEventRecord"))
}
