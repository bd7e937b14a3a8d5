//! CUDA graphs of decode steps.
//!
//! A batch-1 decode step of TinyLlama issues about two hundred launches and allocations, and on
//! an H100 their host cost (2.5 ms) is several times the GPU's work. A step whose queries are
//! all single tokens is recorded once per shape (batch size, context rounded up to a bucket)
//! and replayed: the step's inputs are written into the recorded input buffer, and one launch
//! runs every kernel. The first step of a shape runs as usual and is then recorded, so every
//! answer comes from the same kernels whether replayed or not.

use super::RuntimeError;
use super::cache::KvCache;
use super::fused::{self, DecodeRows};
use super::model::{Model, Packed, StepInputs};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream, DriverError, result, sys};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Graphs kept per cache; a new shape past this many drops them all.
const MAX_GRAPHS: usize = 64;
/// Contexts round up to a power of two, at least this, so one graph serves many steps.
const MIN_CONTEXT_BUCKET: usize = 256;

/// The shape a graph was recorded for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GraphKey {
    batch: usize,
    /// Room for this many tokens of context per sequence.
    context: usize,
    /// The model's weights (their address), as recorded.
    weights: u64,
}

struct DecodeGraph {
    graph: CudaGraph,
    /// The recorded step's input buffer (see [`StepInputs`]) and its logits.
    inputs: Tensor,
    logits: Tensor,
}

// SAFETY: the graph's handles are driver objects of one context, which cudarc binds to the
// calling thread before each launch; a cache, and so its graphs, is used by one thread at a
// time (steps take it by `&mut`).
unsafe impl Send for DecodeGraph {}

/// A cache's recorded decode steps.
#[derive(Default)]
pub(crate) struct Graphs {
    recorded: HashMap<GraphKey, DecodeGraph>,
    /// A recording failed: steps run unrecorded from then on.
    broken: bool,
}

impl Graphs {
    pub(crate) fn len(&self) -> usize {
        self.recorded.len()
    }
}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graphs({} recorded)", self.recorded.len())
    }
}

fn driver(e: DriverError) -> RuntimeError {
    candle_core::Error::Cuda(Box::new(e)).into()
}

/// The graph of a step, or none where the step cannot be replayed: a query of more than one
/// token, a context past the decode kernel, or several streams kept in order by cudarc's
/// events (a KV transport's), whose waits on work outside the recording cannot be recorded.
pub(crate) fn key(
    model: &Model,
    cache: &KvCache,
    packed: &Packed,
) -> Result<Option<GraphKey>, RuntimeError> {
    let Device::Cuda(dev) = model.device() else {
        return Ok(None);
    };
    if cache.graphs.broken || packed.seqs.iter().any(|s| s.n_tokens != 1) {
        return Ok(None);
    }
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() || ctx.is_managing_stream_synchronization() {
        return Ok(None);
    }
    let longest = packed.seqs.iter().map(|s| s.context_tokens).max();
    let context = longest
        .unwrap_or(0)
        .next_power_of_two()
        .max(MIN_CONTEXT_BUCKET);
    if !fused::attention_fits(cache.head_dim(), context, cache.block_size_tokens()) {
        return Ok(None);
    }
    Ok(Some(GraphKey {
        batch: packed.seqs.len(),
        context,
        weights: model.weights_address()?,
    }))
}

/// Runs a step of single-token queries: replays the graph of its shape, or runs it and records
/// one.
pub(crate) fn decode_step(
    model: &Model,
    cache: &mut KvCache,
    packed: &Packed,
    key: GraphKey,
) -> Result<Tensor, RuntimeError> {
    let Device::Cuda(dev) = model.device() else {
        return Err(RuntimeError::Invalid(
            "CUDA graphs need a CUDA device".into(),
        ));
    };
    let stream = dev.cuda_stream();
    // Every table padded to one width: the recorded kernel finds row i's at i * width.
    let width = key.context.div_ceil(cache.block_size_tokens());
    let mut decode = DecodeRows::default();
    for s in &packed.seqs {
        let mut table = s.blocks.clone();
        table.resize(width, 0);
        decode.push(s.offset, s.context_tokens, &table);
    }
    let host = StepInputs::host(packed, &decode);

    if let Some(g) = cache.graphs.recorded.get(&key) {
        if g.inputs.dim(0)? != host.len() {
            return Err(RuntimeError::Invalid(format!(
                "CUDA graph of {key:?}: {} inputs recorded, {} given",
                g.inputs.dim(0)?,
                host.len()
            )));
        }
        // SAFETY: the buffer holds host.len() u32s (checked); the copy is ordered on the
        // stream after the previous replay and before this one, and a pageable source is
        // consumed before the call returns.
        unsafe { result::memcpy_htod_async(fused::address(&g.inputs)?, &host, stream.cu_stream()) }
            .map_err(driver)?;
        g.graph.launch().map_err(driver)?;
        // A copy: the next replay overwrites the recorded logits.
        return Ok(g.logits.copy()?);
    }

    let buf = Tensor::from_slice(&host, host.len(), model.device())?;
    let inputs = StepInputs::views(
        &buf,
        packed,
        vec![true; packed.seqs.len()],
        &decode,
        key.context,
    )?;
    // Candle uploads some kernels' layout parameters from the host; a recording would keep
    // pointers to host memory gone by its replay. With this guard held, the uploads are cached
    // on the device by value: the unrecorded run fills the cache, the recording reuses it.
    let _params = dev.enable_cuda_graph_htod_cache();
    let logits = model.run_fused(cache, &packed.seqs, &inputs, None)?;
    let recorded = logits.copy()?;
    match record(model, cache, packed, &inputs, &recorded, &stream) {
        Ok(graph) => {
            let graphs = &mut cache.graphs.recorded;
            if graphs.len() >= MAX_GRAPHS {
                // Destroyed only once nothing in flight uses them.
                stream.synchronize().map_err(driver)?;
                graphs.clear();
            }
            graphs.insert(
                key,
                DecodeGraph {
                    graph,
                    inputs: buf,
                    logits: recorded,
                },
            );
        }
        Err(e) => {
            // Said once: the cache runs unrecorded from here on, correct but slower.
            eprintln!("warning: decode steps run without CUDA graphs: recording failed: {e}");
            cache.graphs.broken = true;
        }
    }
    Ok(logits)
}

/// Records the step over `inputs` into a graph whose last kernel writes the logits into `out`.
/// Nothing runs while recording: the step's KV writes already happened, unrecorded.
fn record(
    model: &Model,
    cache: &mut KvCache,
    packed: &Packed,
    inputs: &StepInputs,
    out: &Tensor,
    stream: &Arc<CudaStream>,
) -> Result<CudaGraph, RuntimeError> {
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(driver)?;
    // Every tensor the step allocates is freed inside the recording, so the graph owns no
    // memory between replays.
    let ran = model
        .run_fused(cache, &packed.seqs, inputs, None)
        .and_then(|logits| Ok(out.slice_set(&logits, 0, 0)?));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    ran?;
    let graph = graph
        .map_err(driver)?
        .ok_or_else(|| RuntimeError::Invalid("the CUDA graph recorded nothing".into()))?;
    graph.upload().map_err(driver)?;
    Ok(graph)
}
