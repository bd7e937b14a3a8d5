//! The fused CUDA kernels of `kernels.cu`, launched on candle's stream.
//!
//! On a GPU a decode step is bound by launches, not arithmetic: the tensor-op forward pass
//! issued about 35 kernels per layer plus ten per sequence for attention (6.3 ms for a batch-1
//! step of TinyLlama on an H100, 61 ms at batch 32). These kernels do a layer's residual add and
//! norm, RoPE and the KV write, and the attention of every single-token query of the batch, one
//! launch each. A prefill's attention is one flash-attention kernel per sequence, so its scores
//! never reach memory (the tensor-op path built them and masked and normalised them in five
//! f32 passes: 155 ms of a 2048-token prefill's 173 under Nsight Compute); where that kernel
//! is not built for the shapes, the softmax is one pass over the scores.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, result, sys,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Error, Result, Shape, Storage, Tensor};
use half::{bf16, f16};
use std::cell::RefCell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::OnceLock;

use super::linear::linear;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "disagg_fused";

/// Threads of a block of the per-row kernels.
const ROW_THREADS: u32 = 256;
/// Threads of a decode attention block: a multiple of every head_dim / 8 it takes (see
/// [`attention_fits`]).
const ATTENTION_THREADS: u32 = 256;
/// Shared memory a block may use without opting in.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

fn failed(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Cuda(Box::new(e))
}

fn cuda(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        other => Err(Error::Msg(format!(
            "fused kernels run on CUDA, not {:?}",
            other.location()
        ))),
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::Msg(format!(
            "fused kernels take f32, f16 or bf16, not {other:?}"
        ))),
    }
}

/// Kernel `NAME_SUFFIX` of the module on `dev`, SUFFIX naming `dtype` (loaded once per
/// device). A macro: candle does not name the function type it returns.
macro_rules! kernel {
    ($dev:expr, $name:expr, $dtype:expr) => {
        $dev.get_or_load_custom_func(&format!("{}_{}", $name, suffix($dtype)?), MODULE, PTX)
    };
}

/// The device address of a contiguous CUDA tensor's first element. Valid while the tensor
/// lives; every kernel here runs on the tensor's own stream, after the work that wrote it.
pub(crate) fn address(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(Error::Msg("fused kernels take CUDA tensors".into()));
    };
    let (start, _) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("fused kernels take contiguous tensors".into()))?;
    let stream = s.device().cuda_stream();
    let base = match &s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::F16(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::BF16(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::U32(x) => x.device_ptr(&stream).0,
        _ => return Err(Error::Msg(format!("fused kernels: {:?}", t.dtype()))),
    };
    Ok(base + (start * t.dtype().size_in_bytes()) as u64)
}

/// The arguments of a [`launch_dependent`] launch: each the address of its value, which
/// outlives the launch.
struct Args<'a> {
    ptrs: Vec<*mut c_void>,
    values: PhantomData<&'a ()>,
}

impl<'a> Args<'a> {
    fn new() -> Args<'a> {
        Args {
            ptrs: Vec::new(),
            values: PhantomData,
        }
    }

    fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.ptrs.push(value as *const T as *mut c_void);
        self
    }
}

/// Whether kernels may start before the one before them ends (programmatic dependent launch):
/// on compute capability 9.0 and later, unless `DISAGG_PDL=0`.
fn dependent_launches(dev: &CudaDevice) -> Result<bool> {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    if !*ALLOWED.get_or_init(|| std::env::var_os("DISAGG_PDL").is_none_or(|v| v != "0")) {
        return Ok(false);
    }
    let major = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(failed)?;
    Ok(major >= 9)
}

/// Launches `func` on `dev`'s stream, where the GPU has them as a programmatic dependent launch:
/// the kernel may start while the kernel before it runs, and must call `pdl_wait` (kernels.cu)
/// before it reads what earlier work wrote or writes anything. In a recorded step this is a
/// programmatic edge between the two kernels, so no node may come between them (see
/// [`Scratch`]).
///
/// # Safety
///
/// The arguments match the kernel's signature and it keeps to `pdl_wait`'s rule.
unsafe fn launch_dependent(
    dev: &CudaDevice,
    func: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut Args,
) -> Result<()> {
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().map_err(failed)?;
    let (grid, block) = (cfg.grid_dim, cfg.block_dim);
    if !dependent_launches(dev)? {
        // SAFETY: as the caller promises; the stream is the device's, its context bound.
        return unsafe {
            result::launch_kernel(
                func.cu_function(),
                grid,
                block,
                cfg.shared_mem_bytes,
                stream.cu_stream(),
                &mut args.ptrs,
            )
        }
        .map_err(failed);
    }
    // SAFETY: all zeros is a valid value of the union (its `pad` bytes).
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: as the caller promises; config and the attribute live through the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            args.ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(failed)
}

/// Where a step's fused kernels put their outputs. In a recorded step every allocation and
/// free is a graph node, and a node between two kernels keeps the second from starting early
/// (see [`launch_dependent`]); so a one-token step carves its outputs from a few allocations
/// made before its first kernel and freed after its last. Nothing carved is reused within the
/// step. Without an arena ([`Scratch::none`]), each output is an allocation of its own.
pub struct Scratch {
    arenas: Option<RefCell<Vec<Arena>>>,
}

/// One allocation of a dtype and how much of it is carved.
struct Arena {
    buf: Tensor,
    used: usize,
}

/// Bytes an arena takes at least, and where each carved tensor starts a multiple of.
const ARENA_BYTES: usize = 2 << 20;
const ARENA_ALIGN: usize = 128;

impl Scratch {
    pub fn none() -> Scratch {
        Scratch { arenas: None }
    }

    /// Outputs carved from arenas, allocated as needed.
    pub fn arena() -> Scratch {
        Scratch {
            arenas: Some(RefCell::new(Vec::new())),
        }
    }

    /// An uninitialised tensor, for a kernel to fill.
    fn empty(&self, dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let Some(arenas) = &self.arenas else {
            return empty(dev, dtype, shape);
        };
        let n = shape.elem_count();
        let align = ARENA_ALIGN / dtype.size_in_bytes();
        let mut arenas = arenas.borrow_mut();
        let fits = |a: &Arena| a.buf.dtype() == dtype && a.used + n <= a.buf.elem_count();
        let i = match arenas.iter().position(fits) {
            Some(i) => i,
            None => {
                let len = n.max(ARENA_BYTES / dtype.size_in_bytes());
                arenas.push(Arena {
                    buf: empty(dev, dtype, len)?,
                    used: 0,
                });
                arenas.len() - 1
            }
        };
        let a = &mut arenas[i];
        let t = a.buf.narrow(0, a.used, n)?.reshape(shape)?;
        a.used = (a.used + n).next_multiple_of(align);
        Ok(t)
    }
}

/// An uninitialised tensor, for a kernel to fill.
fn empty(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: every caller launches a kernel that writes each element before any read.
    let slice = unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(dev.alloc::<f32>(n)?),
            DType::F16 => CudaStorageSlice::F16(dev.alloc::<f16>(n)?),
            DType::BF16 => CudaStorageSlice::BF16(dev.alloc::<bf16>(n)?),
            other => return Err(Error::Msg(format!("fused kernels: {other:?}"))),
        }
    };
    let storage = CudaStorage {
        slice,
        device: dev.clone(),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// `(x + y, RMSNorm(x + y) * w)` over rows of `x` (rows, cols); without `y`, `(x, RMSNorm(x) *
/// w)`. The sum is rounded to x's dtype, the norm computed in f32; `w` is f32. The norm has
/// [`matmul_rows`]`(rows)` rows, the padding zero: it feeds the matmuls.
pub fn add_rms_norm(
    x: &Tensor,
    y: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    scratch: &Scratch,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda(x.device())?;
    let (rows, cols) = x.dims2()?;
    let h_rows = matmul_rows(rows);
    let h = scratch.empty(dev, x.dtype(), (h_rows, cols))?;
    let x_out = match y {
        Some(_) => scratch.empty(dev, x.dtype(), (rows, cols))?,
        None => x.clone(),
    };
    let func = kernel!(dev, "add_rms_norm", x.dtype())?;
    let (px, pw, ph) = (address(x)?, address(w)?, address(&h)?);
    let (py, pout) = match y {
        Some(y) => (address(&y.contiguous()?)?, address(&x_out)?),
        None => (0, 0),
    };
    let (rows_i, cols_i) = (rows as i32, cols as i32);
    let vec = i32::from(cols % 8 == 0 && [px, py, pw, pout, ph].iter().all(|p| p % 16 == 0));
    let mut b = Args::new();
    b.arg(&px)
        .arg(&py)
        .arg(&pw)
        .arg(&pout)
        .arg(&ph)
        .arg(&rows_i)
        .arg(&cols_i)
        .arg(&eps)
        .arg(&vec);
    let cfg = LaunchConfig {
        grid_dim: (h_rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; x, y and x_out hold at least rows x
    // cols, h h_rows x cols; the kernel waits before its loads.
    unsafe { launch_dependent(dev, &func, cfg, &mut b) }?;
    Ok((x_out, h))
}

/// Where a step's new tokens go: rotated Q out, K and V into the cache pools.
pub struct RopeKv<'a> {
    /// (max_position, head_dim / 2) tables in the activations' dtype.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Per token: its position and its cache slot.
    pub positions: &'a Tensor,
    pub slots: &'a Tensor,
    /// (n_kv_heads, n_slots, head_dim) pools of one layer, written in place.
    pub k_pool: &'a Tensor,
    pub v_pool: &'a Tensor,
    pub n_heads: usize,
    pub interleaved: bool,
}

/// The fused QKV projection of x (tokens, hidden) by w ((n_heads + 2 n_kv_heads) head_dim,
/// hidden), then [`rope_write_kv`]: in one GEMV launch for one token of f16 or bf16.
pub fn qkv_rope(x: &Tensor, w: &Tensor, a: &RopeKv, scratch: &Scratch) -> Result<Tensor> {
    let (kvh, n_slots, hd) = a.k_pool.dims3()?;
    let fits = gemv_fits(x, w, Product::Plain)?
        && a.positions.dim(0)? == 1
        && hd.is_multiple_of(2)
        && w.dim(0)? == (a.n_heads + 2 * kvh) * hd;
    if !fits {
        return rope_write_kv(&matmul(x, w)?, a);
    }
    let dev = cuda(x.device())?;
    let k = x.dim(1)?;
    let q = scratch.empty(dev, x.dtype(), (1, a.n_heads, hd))?;
    let func = kernel!(dev, "gemv_rope", x.dtype())?;
    let pairs = w.dim(0)? / 2;
    let ksplit = gemv_ksplit(k);
    let ptrs = [
        address(a.cos)?,
        address(a.sin)?,
        address(a.positions)?,
        address(a.slots)?,
        address(&q)?,
        address(a.k_pool)?,
        address(a.v_pool)?,
    ];
    let (px, pw) = (address(x)?, address(w)?);
    let (pairs_i, k_i, ksplit_i) = (pairs as i32, k as i32, ksplit as i32);
    let (nh, kvh_i, hd_i) = (a.n_heads as i32, kvh as i32, hd as i32);
    let interleaved = i32::from(a.interleaved);
    let mut b = Args::new();
    b.arg(&px).arg(&pw).arg(&pairs_i).arg(&k_i).arg(&ksplit_i);
    for p in &ptrs {
        b.arg(p);
    }
    b.arg(&nh)
        .arg(&kvh_i)
        .arg(&hd_i)
        .arg(&n_slots)
        .arg(&interleaved);
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(GEMV_THREADS / 32 / ksplit) as u32, 1, 1),
        block_dim: (GEMV_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; x holds k elements and w 2 x pairs
    // rows of k, 16-byte aligned, k a multiple of 8 (gemv_fits); one token's position and
    // slot, checked in range by the caller or NO_SLOT, which the kernel skips. Before its
    // wait the kernel reads only w and the step's inputs and tables.
    unsafe { launch_dependent(dev, &func, cfg, &mut b) }?;
    Ok(q)
}

/// RoPE on every Q and K head of every token of `qkv` (tokens, n_heads + 2 n_kv_heads,
/// head_dim), the fused QKV projection (each token at its own position), K and V written to
/// their slots; returns Q, (tokens, n_heads, head_dim).
pub fn rope_write_kv(qkv: &Tensor, a: &RopeKv) -> Result<Tensor> {
    let dev = cuda(qkv.device())?;
    let (kvh, n_slots, hd) = a.k_pool.dims3()?;
    // The step's tokens; qkv may have padding rows past them (see [`matmul_rows`]).
    let t = a.positions.dim(0)?;
    let q = empty(dev, qkv.dtype(), (t, a.n_heads, hd))?;
    let func = kernel!(dev, "rope_write_kv", qkv.dtype())?;
    let ptrs = [
        address(qkv)?,
        address(a.cos)?,
        address(a.sin)?,
        address(a.positions)?,
        address(a.slots)?,
        address(&q)?,
        address(a.k_pool)?,
        address(a.v_pool)?,
    ];
    let (nh, kvh, hd) = (a.n_heads as i32, kvh as i32, hd as i32);
    let interleaved = i32::from(a.interleaved);
    let mut b = func.builder();
    for p in &ptrs {
        b.arg(p);
    }
    b.arg(&nh)
        .arg(&kvh)
        .arg(&hd)
        .arg(&n_slots)
        .arg(&interleaved);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, (a.n_heads + 2 * kvh as usize) as u32, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; slots are checked to be in range
    // and distinct by the caller, or NO_SLOT, which the kernel skips.
    unsafe { b.launch(cfg) }.map_err(failed)?;
    Ok(q)
}

/// The single-token queries of a step: row in the packed batch, context length (the new token
/// included) and the blocks holding that context.
#[derive(Default)]
pub struct DecodeRows {
    pub rows: Vec<u32>,
    pub context: Vec<u32>,
    pub table_start: Vec<u32>,
    pub tables: Vec<u32>,
}

impl DecodeRows {
    pub fn push(&mut self, row: usize, context: usize, blocks: &[u32]) {
        self.rows.push(row as u32);
        self.context.push(context as u32);
        self.table_start.push(self.tables.len() as u32);
        self.tables.extend_from_slice(blocks);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn max_context(&self) -> usize {
        self.context.iter().copied().max().unwrap_or(0) as usize
    }

    pub fn meta_len(&self) -> usize {
        3 * self.rows.len() + self.tables.len()
    }

    /// Appends `[rows | context | table_start | tables]`, the layout the kernel reads.
    pub fn meta(&self, out: &mut Vec<u32>) {
        for part in [&self.rows, &self.context, &self.table_start, &self.tables] {
            out.extend_from_slice(part);
        }
    }

    /// These rows, their [`DecodeRows::meta`] in `meta` on the device; the launch is shaped
    /// (split) for `max_context` (at least [`DecodeRows::max_context`]) tokens of context, so
    /// a recorded step serves every context up to it.
    pub fn on_device(&self, meta: Tensor, max_context: usize) -> DeviceDecodeRows {
        DeviceDecodeRows {
            n: self.rows.len(),
            max_context: max_context.max(self.max_context()),
            meta,
        }
    }
}

/// The decode rows' tables on the device.
pub struct DeviceDecodeRows {
    n: usize,
    max_context: usize,
    meta: Tensor,
}

/// Blocks a decode attention launch aims for, beyond the SMs of an H100 (132): a batch of one
/// sequence (32 heads of TinyLlama) splits its context up to eight ways.
const ATTENTION_TARGET_BLOCKS: usize = 256;
/// Fewest keys a split of the context takes: at head_dim 64 a block's 32 groups, four keys
/// ahead each, take 128 keys in one round of loads. On an H200 a batch-1 step of TinyLlama at 256 tokens of context (recorded for 512)
/// took 1.005 ms with 128, 1.013 with 64 and 1.048 with 256, in one run.
const MIN_SPLIT_KEYS: usize = 128;
/// Counters a split launch needs at most: one per (row, head), and a split launch has at most
/// half the target's blocks of them.
pub(crate) const ATTENTION_COUNTERS: usize = ATTENTION_TARGET_BLOCKS / 2;

/// How a decode attention launch of `rows` queries of `heads` heads over at most
/// `max_context` tokens splits the context: (splits, keys per split).
fn attention_splits(rows: usize, heads: usize, max_context: usize) -> (usize, usize) {
    let most = max_context.div_ceil(MIN_SPLIT_KEYS).max(1);
    let splits = (ATTENTION_TARGET_BLOCKS / (rows * heads).max(1)).clamp(1, most);
    (splits, max_context.div_ceil(splits))
}

/// Shared memory of an attention block over `keys` keys in blocks of `block_size`: its
/// groups' sums, maxima and totals, and the block ids the keys span.
fn attention_shared_bytes(head_dim: usize, keys: usize, block_size: usize) -> usize {
    let groups = ATTENTION_THREADS as usize / (head_dim / 8).max(1);
    (groups * head_dim + 2 * groups + keys.div_ceil(block_size.max(1)) + 1) * 4
}

/// Whether the decode kernel takes this head size and context: head_dim in whole 8-element
/// loads, a power-of-two count of them of at most a warp, and an unsplit context's block ids
/// in the default shared memory.
pub fn attention_fits(head_dim: usize, max_context: usize, block_size: usize) -> bool {
    let vecs = head_dim / 8;
    head_dim.is_multiple_of(8)
        && vecs.is_power_of_two()
        && vecs <= 32
        && attention_shared_bytes(head_dim, max_context, block_size) <= DEFAULT_SHARED_BYTES
}

/// Attention of each decode row's query over its paged context, written into `out` (tokens,
/// n_heads * head_dim) at the row; other rows of `out` are left as they are. A context split
/// over several blocks (see [`attention_splits`]) is merged by the last of them to finish,
/// counting in `counters` ([`ATTENTION_COUNTERS`] u32 zeros, left zero).
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    decode: &DeviceDecodeRows,
    block_size: usize,
    counters: &Tensor,
    out: &Tensor,
    scratch: &Scratch,
) -> Result<()> {
    let dev = cuda(q.device())?;
    let (_, nh, hd) = q.dims3()?;
    let (kvh, n_slots, _) = k_pool.dims3()?;
    let (pk, pv) = (address(k_pool)?, address(v_pool)?);
    if !attention_fits(hd, decode.max_context, block_size) || pk % 16 != 0 || pv % 16 != 0 {
        return Err(Error::Msg(format!(
            "decode attention: head_dim {hd} with {} tokens of context does not fit a block",
            decode.max_context
        )));
    }
    let (splits, split_keys) = attention_splits(decode.n, nh, decode.max_context);
    let partial = match splits {
        1 => None,
        _ => Some(scratch.empty(dev, DType::F32, decode.n * nh * splits * (hd + 2))?),
    };
    if splits > 1 && (decode.n * nh > counters.elem_count() || counters.dtype() != DType::U32) {
        return Err(Error::Msg(format!(
            "decode attention: {} rows of {nh} heads split {splits} ways need {} u32 counters",
            decode.n,
            decode.n * nh
        )));
    }
    let func = kernel!(dev, "paged_decode_attention", q.dtype())?;
    let meta = address(&decode.meta)?;
    let n = decode.n as u64;
    let (rows, po) = (meta, address(out)?);
    let pp = partial.as_ref().map(address).transpose()?.unwrap_or(0);
    let ptrs = [
        address(q)?,
        pk,
        pv,
        rows,
        meta + 4 * n,
        meta + 8 * n,
        meta + 12 * n,
        po,
        pp,
        address(counters)?,
    ];
    let (nh_i, kvh_i, hd_i, bs) = (nh as i32, kvh as i32, hd as i32, block_size as i32);
    let (split_keys_i, scale) = (split_keys as i32, 1.0 / (hd as f32).sqrt());
    let mut b = Args::new();
    for p in &ptrs {
        b.arg(p);
    }
    b.arg(&nh_i)
        .arg(&kvh_i)
        .arg(&hd_i)
        .arg(&n_slots)
        .arg(&bs)
        .arg(&split_keys_i)
        .arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (decode.n as u32, nh as u32, splits as u32),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: attention_shared_bytes(hd, split_keys, block_size) as u32,
    };
    // SAFETY: the arguments match the kernel's signature; the tables hold checked block ids
    // covering each row's context, the pools are aligned for 8-element loads, the shared
    // memory fits (checked above), partial holds every split's head_dim + 2 floats and
    // counters one u32 per (row, head) where the context is split. Before its wait the
    // kernel reads only the step's tables (inputs, which no kernel writes).
    unsafe { launch_dependent(dev, &func, cfg, &mut b) }?;
    Ok(())
}

/// The head size the prefill attention kernel is built for.
const PREFILL_HEAD_DIM: usize = 64;

/// Whether [`prefill_attention`] takes this dtype and head size (tensor cores: f16 or bf16).
pub fn prefill_fits(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && head_dim == PREFILL_HEAD_DIM
}

/// What one sequence's prefill attention reads and where it writes.
pub struct Prefill<'a> {
    /// (tokens, n_heads, head_dim): the step's rotated queries.
    pub q: &'a Tensor,
    /// (n_kv_heads, n_slots, head_dim) pools of the layer.
    pub k_pool: &'a Tensor,
    pub v_pool: &'a Tensor,
    /// The sequence, u32: `[offset, n, context, block table...]` (see [`prefill_seq`]). Its
    /// new tokens are rows offset..offset + n of q and out, the last n of its context.
    pub seq: &'a Tensor,
    /// Its n and context as `seq` holds them, checked against the table here.
    pub n: usize,
    pub context: usize,
    /// Query rows the launch covers, at least n: a recorded step covers its bucket's.
    pub queries: usize,
    pub block_size: usize,
    /// (tokens, n_heads * head_dim), the rows written in place.
    pub out: &'a Tensor,
}

/// The slot of a row that writes no KV: a recorded prefill's padding (see graph.rs).
pub const NO_SLOT: u32 = u32::MAX;

/// u32s before a sequence's block table in [`Prefill::seq`].
pub const PREFILL_SEQ_HEAD: usize = 3;

/// [`Prefill::seq`]'s contents, the table padded with block 0 to `width` entries.
pub fn prefill_seq(
    offset: usize,
    n: usize,
    context: usize,
    table: &[u32],
    width: usize,
) -> Vec<u32> {
    let mut seq = Vec::with_capacity(PREFILL_SEQ_HEAD + width.max(table.len()));
    seq.extend([offset, n, context].map(|v| v as u32));
    seq.extend_from_slice(table);
    seq.resize(PREFILL_SEQ_HEAD + width.max(table.len()), 0);
    seq
}

/// Causal attention of a sequence's new tokens over its paged context (see `kernels.cu`).
pub fn prefill_attention(a: &Prefill) -> Result<()> {
    let dev = cuda(a.q.device())?;
    let (_, nh, hd) = a.q.dims3()?;
    let (kvh, n_slots, _) = a.k_pool.dims3()?;
    let (pk, pv) = (address(a.k_pool)?, address(a.v_pool)?);
    let blocks = a.seq.dim(0)?.saturating_sub(PREFILL_SEQ_HEAD);
    if !prefill_fits(a.q.dtype(), hd)
        || pk % 16 != 0
        || pv % 16 != 0
        || a.n == 0
        || a.n > a.context
        || a.n > a.queries
        || blocks * a.block_size < a.context
    {
        return Err(Error::Msg(format!(
            "prefill attention: {:?} head_dim {hd}, {} new of {} tokens in {blocks} blocks",
            a.q.dtype(),
            a.n,
            a.context
        )));
    }
    let func = kernel!(dev, "prefill_attention", a.q.dtype())?;
    let ptrs = [address(a.q)?, pk, pv, address(a.seq)?, address(a.out)?];
    let ints = [nh, kvh].map(|v| v as i32);
    let (bs, scale) = (a.block_size as i32, 1.0 / (hd as f32).sqrt());
    let mut b = func.builder();
    for p in &ptrs {
        b.arg(p);
    }
    for v in &ints {
        b.arg(v);
    }
    b.arg(&n_slots).arg(&bs).arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (a.queries.div_ceil(64) as u32, nh as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; the table covers the context and
    // holds checked block ids, the pools are aligned for 8-element loads (checked above).
    unsafe { b.launch(cfg) }.map_err(failed)?;
    Ok(())
}

/// In place over `scores` (rows, ctx), the scores of queries against a sequence's ctx keys
/// where row r is query r % n of its n newest tokens: scaled by `scale`, causally masked and
/// normalised (masked keys get 0).
pub fn causal_softmax(scores: &Tensor, n: usize, scale: f32) -> Result<()> {
    let dev = cuda(scores.device())?;
    let ctx = scores.dim(scores.rank() - 1)?;
    let rows = scores.elem_count() / ctx.max(1);
    if n == 0 || n > ctx || !rows.is_multiple_of(n) {
        return Err(Error::Msg(format!(
            "causal softmax: {n} queries over {ctx} keys in {rows} rows"
        )));
    }
    let func = kernel!(dev, "causal_softmax", scores.dtype())?;
    let (ps, n_i, ctx_i) = (address(scores)?, n as i32, ctx as i32);
    let mut b = func.builder();
    b.arg(&ps).arg(&n_i).arg(&ctx_i).arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; scores holds rows x ctx.
    unsafe { b.launch(cfg) }.map_err(failed)?;
    Ok(())
}

/// SiLU(gate) * up over (tokens, 2 inter) rows laid out [gate | up].
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let dev = cuda(gate_up.device())?;
    let (t, two_inter) = gate_up.dims2()?;
    let inter = two_inter / 2;
    let act = empty(dev, gate_up.dtype(), (t, inter))?;
    let func = kernel!(dev, "silu_mul", gate_up.dtype())?;
    let (pin, pout, inter_i) = (address(gate_up)?, address(&act)?, inter as i32);
    let mut b = func.builder();
    b.arg(&pin).arg(&pout).arg(&t).arg(&inter_i);
    let n = (t * inter) as u32;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(ROW_THREADS).min(65_535), 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; act holds tokens x inter.
    unsafe { b.launch(cfg) }.map_err(failed)?;
    Ok(act)
}

/// A step of several tokens runs its matmuls on a multiple of this many rows.
const MATMUL_ROW_STEP: usize = 16;

/// The rows the matmuls of a step of `t` tokens run on: one token as it is, more padded to a
/// multiple of [`MATMUL_ROW_STEP`]. cuBLAS spends milliseconds on the first matmul of each
/// new shape (on an H100, a first 128-token prefill took 12 ms against 2.8 ms after); padded,
/// a server meets few enough shapes to run them all once at start ([`MatmulShapes`]).
pub fn matmul_rows(t: usize) -> usize {
    match t {
        0 | 1 => t,
        _ => t.next_multiple_of(MATMUL_ROW_STEP),
    }
}

/// The row counts the matmuls of steps of up to `max_tokens` tokens and `max_seqs` sequences
/// run on: the padded step sizes for the layers, and every sequence count for the output
/// projection (one row per sequence).
pub struct MatmulShapes {
    pub layer_rows: Vec<usize>,
    pub head_rows: Vec<usize>,
}

impl MatmulShapes {
    pub fn new(max_tokens: usize, max_seqs: usize) -> MatmulShapes {
        let mut layer_rows = vec![1];
        layer_rows.extend(
            (1..=matmul_rows(max_tokens.max(2)) / MATMUL_ROW_STEP).map(|k| k * MATMUL_ROW_STEP),
        );
        MatmulShapes {
            layer_rows,
            head_rows: (1..=max_seqs.max(1)).collect(),
        }
    }
}

/// Threads of a GEMV block (`32 * GEMV_WARPS` in `kernels.cu`), and the outputs a group of
/// its warps covers (`GEMV_ROWS`; gated, one).
const GEMV_THREADS: usize = 128;
const GEMV_GROUP_ROWS: usize = 2;
/// Rows of w longer than this are split over four warps, shorter over two (see `kernels.cu`).
const GEMV_LONG_ROW: usize = 4096;

/// What a matmul yields.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Product {
    /// `x · wᵀ`, stored as x's dtype.
    Plain,
    /// `x · wᵀ` in f32 (the logits).
    F32,
    /// A SwiGLU's `SiLU(x · w_gateᵀ) * (x · w_upᵀ)` for w (2 inter, k) = [w_gate | w_up].
    Silu,
}

/// Warps that share a GEMV's rows of k.
fn gemv_ksplit(k: usize) -> usize {
    if k > GEMV_LONG_ROW { 4 } else { 2 }
}

/// Whether x (1, k) and w (n, k) fit the GEMV kernel: f16 or bf16, contiguous, k a multiple
/// of 8, both 16-byte aligned; gated, w of an even number of rows.
fn gemv_fits(x: &Tensor, w: &Tensor, product: Product) -> Result<bool> {
    let (m, k) = x.dims2()?;
    Ok(m == 1
        && matches!(x.dtype(), DType::F16 | DType::BF16)
        && w.dtype() == x.dtype()
        && x.is_contiguous()
        && w.is_contiguous()
        && w.rank() == 2
        && w.dim(1)? == k
        && (product != Product::Silu || w.dim(0)?.is_multiple_of(2))
        && k.is_multiple_of(8)
        && address(x)? % 16 == 0
        && address(w)? % 16 == 0)
}

/// The GEMV kernel over x and w that fit it: (1, n) for w (n, k), gated (1, n / 2).
fn gemv(x: &Tensor, w: &Tensor, product: Product, scratch: &Scratch) -> Result<Tensor> {
    let dev = cuda(x.device())?;
    let (n, k) = w.dims2()?;
    let ksplit = gemv_ksplit(k);
    let groups = GEMV_THREADS / 32 / ksplit;
    let (name, outputs, dtype, block_outputs) = match product {
        Product::Plain => ("gemv", n, x.dtype(), groups * GEMV_GROUP_ROWS),
        Product::F32 => ("gemv_f32_out", n, DType::F32, groups * GEMV_GROUP_ROWS),
        Product::Silu => ("gemv_silu", n / 2, x.dtype(), groups),
    };
    let y = scratch.empty(dev, dtype, (1, outputs))?;
    let func = kernel!(dev, name, x.dtype())?;
    let (px, pw, py) = (address(x)?, address(w)?, address(&y)?);
    let (n_i, k_i, ksplit_i) = (outputs as i32, k as i32, ksplit as i32);
    let mut b = Args::new();
    b.arg(&px)
        .arg(&pw)
        .arg(&py)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&ksplit_i);
    let cfg = LaunchConfig {
        grid_dim: (outputs.div_ceil(block_outputs) as u32, 1, 1),
        block_dim: (GEMV_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; x holds k elements, w n x k rows
    // (gated: 2 x outputs), y `outputs` of its dtype; k is a multiple of 8 and both inputs
    // are 16-byte aligned; ksplit divides the block's warps. Before its wait the kernel reads
    // only w.
    unsafe { launch_dependent(dev, &func, cfg, &mut b) }?;
    Ok(y)
}

/// The `product` of x (m, k) and w (n, k): one row of f16 or bf16 in the GEMV kernel, which
/// reads w once at close to the copy bandwidth; more rows, or other dtypes, through cuBLAS
/// (gated, then [`silu_mul`]). The GEMV's output comes from `scratch`.
pub fn product(x: &Tensor, w: &Tensor, product: Product, scratch: &Scratch) -> Result<Tensor> {
    if gemv_fits(x, w, product)? {
        return gemv(x, w, product, scratch);
    }
    match product {
        Product::Plain => linear(x, w),
        Product::F32 => linear(x, w)?.to_dtype(DType::F32),
        Product::Silu => silu_mul(&linear(x, w)?),
    }
}

/// `x · wᵀ`: [`product`]'s plain one.
pub fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    product(x, w, Product::Plain, &Scratch::none())
}

/// The rows of an export (see `KvCache::export_blocks_tensor`) in one launch: row i holds block
/// `ids[i]` of each pool in turn, `(block_size, n_kv_heads, head_dim)` token-major, from pools
/// `(n_kv_heads, n_slots, head_dim)` of one dtype, head_dim a multiple of 8, every id checked.
pub fn gather_blocks(pools: &[&Tensor], ids: &[u32], block_size: usize) -> Result<Tensor> {
    let first = pools
        .first()
        .ok_or_else(|| Error::Msg("gather blocks: no pools".into()))?;
    let (kvh, _, hd) = first.dims3()?;
    let rows = empty(
        cuda(first.device())?,
        first.dtype(),
        (ids.len(), pools.len() * block_size * kvh * hd),
    )?;
    move_blocks("gather_blocks", pools, ids, &rows, block_size)?;
    Ok(rows)
}

/// [`gather_blocks`] the other way, in one launch: `rows` (one per id, as gathered) written
/// into blocks `ids` of the pools, in place.
pub fn scatter_blocks(
    pools: &[&Tensor],
    ids: &[u32],
    rows: &Tensor,
    block_size: usize,
) -> Result<()> {
    move_blocks("scatter_blocks", pools, ids, rows, block_size)
}

fn move_blocks(
    name: &str,
    pools: &[&Tensor],
    ids: &[u32],
    rows: &Tensor,
    block_size: usize,
) -> Result<()> {
    let first = pools
        .first()
        .ok_or_else(|| Error::Msg(format!("{name}: no pools")))?;
    let dev = cuda(first.device())?;
    let (kvh, n_slots, hd) = first.dims3()?;
    let mut meta = Vec::with_capacity(2 * pools.len() + ids.len());
    for p in pools {
        let a = address(p)?;
        if p.dims3()? != (kvh, n_slots, hd) || p.dtype() != first.dtype() || a % 16 != 0 {
            return Err(Error::Msg(format!(
                "{name}: pools differ or are misaligned"
            )));
        }
        meta.extend([a as u32, (a >> 32) as u32]);
    }
    let row = pools.len() * block_size * kvh * hd;
    let pr = address(rows)?;
    if ids.is_empty()
        || !hd.is_multiple_of(8)
        || rows.dims() != [ids.len(), row]
        || rows.dtype() != first.dtype()
        || pr % 16 != 0
    {
        return Err(Error::Msg(format!(
            "{name}: {} blocks of head_dim {hd} and rows {:?}",
            ids.len(),
            rows.dims()
        )));
    }
    meta.extend_from_slice(ids);
    let meta = Tensor::from_slice(&meta, meta.len(), first.device())?;
    let func = kernel!(dev, name, first.dtype())?;
    let pm = address(&meta)?;
    let ints = [pools.len(), kvh, block_size, hd].map(|v| v as i32);
    let mut b = func.builder();
    b.arg(&pm).arg(&pr);
    for v in &ints {
        b.arg(v);
    }
    b.arg(&n_slots);
    let cfg = LaunchConfig {
        grid_dim: (ids.len() as u32, pools.len() as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; meta holds every pool's address and
    // the ids, which the caller checked against the pools; rows holds one row per id of every
    // pool's part; head_dim is a multiple of 8 and every buffer 16-byte aligned (checked).
    unsafe { b.launch(cfg) }.map_err(failed)?;
    Ok(())
}

/// An uninitialised (tokens, width) tensor, for kernels and copies that fill every row.
pub fn rows(
    device: &Device,
    dtype: DType,
    tokens: usize,
    width: usize,
    scratch: &Scratch,
) -> Result<Tensor> {
    scratch.empty(cuda(device)?, dtype, (tokens, width))
}
