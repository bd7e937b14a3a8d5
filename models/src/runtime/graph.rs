//! CUDA graphs of decode steps and of one sequence's prefill.
//!
//! A batch-1 decode step of TinyLlama issues about two hundred launches and allocations, and on
//! an H100 their host cost (2.5 ms) is several times the GPU's work; so does a prefill of a few
//! hundred tokens. A step whose queries are all single tokens is recorded once per shape
//! (batch size rounded up to a power of two, context rounded up to a bucket); a step of one
//! sequence's prefill (or chunk of one) once per token count rounded up to a bucket. Padding
//! rows write no KV, and attention reads each sequence from the input buffer. Either is
//! replayed: the step's inputs are written into the recorded input buffer, and one launch runs
//! every kernel. The first step of a shape runs as usual and is then recorded, so every answer
//! comes from the same kernels whether replayed or not; a GPU engine records the shapes its
//! steps can meet before it serves ([`record_ahead`]), since a recording takes milliseconds.

use super::RuntimeError;
use super::cache::KvCache;
use super::fused::{self, DecodeRows};
use super::model::{Model, Packed, Padding, SeqPlan, StepInputs};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream, DriverError, result, sys};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Graphs kept per cache; a new shape past this many drops them all.
const MAX_GRAPHS: usize = 64;
/// Contexts round up to a power of two, at least this, so one graph serves many steps.
const MIN_CONTEXT_BUCKET: usize = 256;
/// A prefill's tokens round up to a multiple of this.
const PREFILL_BUCKET: usize = 64;
/// Longest prefill recorded: past it the GPU's work outlasts the launches.
const PREFILL_GRAPH_MAX_TOKENS: usize = 1024;
/// (bucket, longest) of the recorded prefills, as the calibration profile records them.
pub(crate) const PREFILL_SHAPE: (usize, usize) = (PREFILL_BUCKET, PREFILL_GRAPH_MAX_TOKENS);

/// The shape a graph was recorded for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GraphKey {
    batch: usize,
    /// Room for this many tokens of context per sequence (decode).
    context: usize,
    /// Rows of a prefill, 0 for a decode step.
    prefill_tokens: usize,
    /// The model's weights (their address), as recorded.
    weights: u64,
}

struct StepGraph {
    graph: CudaGraph,
    /// The recorded step's input buffer (see [`StepInputs`]) and its logits.
    inputs: Tensor,
    logits: Tensor,
}

// SAFETY: the graph's handles are driver objects of one context, which cudarc binds to the
// calling thread before each launch; a cache, and so its graphs, is used by one thread at a
// time (steps take it by `&mut`).
unsafe impl Send for StepGraph {}

/// A cache's recorded steps.
#[derive(Default)]
pub(crate) struct Graphs {
    recorded: HashMap<GraphKey, StepGraph>,
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

/// The graph of a step, or none where the step cannot be replayed: queries of more than one
/// token in a batch of several, a prefill past the bucket or the flash kernel, a context past
/// the decode kernel, or several streams kept in order by cudarc's events, whose waits on work
/// outside the recording cannot be recorded.
pub(crate) fn key(
    model: &Model,
    cache: &KvCache,
    packed: &Packed,
) -> Result<Option<GraphKey>, RuntimeError> {
    let Device::Cuda(dev) = model.device() else {
        return Ok(None);
    };
    if cache.graphs.broken {
        return Ok(None);
    }
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() || ctx.is_managing_stream_synchronization() {
        return Ok(None);
    }
    if let [s] = packed.seqs.as_slice()
        && s.n_tokens > 1
    {
        let fits = fused::prefill_fits(model.dtype(), cache.head_dim())
            && s.n_tokens <= PREFILL_GRAPH_MAX_TOKENS
            && s.blocks.len() <= prefill_table_width(model, cache);
        return Ok(fits.then_some(GraphKey {
            batch: 1,
            context: 0,
            prefill_tokens: s.n_tokens.next_multiple_of(PREFILL_BUCKET),
            weights: model.weights_address()?,
        }));
    }
    if packed.seqs.iter().any(|s| s.n_tokens != 1) {
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
        batch: packed.seqs.len().next_power_of_two(),
        context,
        prefill_tokens: 0,
        weights: model.weights_address()?,
    }))
}

/// Entries of a recorded prefill's block table: enough for the longest context.
fn prefill_table_width(model: &Model, cache: &KvCache) -> usize {
    (model.spec().max_position_embeddings as usize).div_ceil(cache.block_size_tokens())
}

/// Runs a step that has a key: replays the graph of its shape, or runs it and records one.
pub(crate) fn step(
    model: &Model,
    cache: &mut KvCache,
    mut packed: Packed,
    key: GraphKey,
) -> Result<Tensor, RuntimeError> {
    let Device::Cuda(dev) = model.device() else {
        return Err(RuntimeError::Invalid(
            "CUDA graphs need a CUDA device".into(),
        ));
    };
    let stream = dev.cuda_stream();
    let mut decode = DecodeRows::default();
    let batch = packed.seqs.len();
    let (decoded, pad) = if key.prefill_tokens == 0 {
        // Rows past the batch's: token 0 at position 0 over block 0, writing no KV.
        for row in batch..key.batch {
            packed.tokens.push(0);
            packed.positions.push(0);
            packed.slots.push(fused::NO_SLOT);
            packed.last_rows.push(row as u32);
            packed.seqs.push(SeqPlan::padding(row));
        }
        // Every table padded to one width: the recorded kernel finds row i's at i * width.
        let width = key.context.div_ceil(cache.block_size_tokens());
        for s in &packed.seqs {
            let mut table = s.blocks.clone();
            table.resize(width, 0);
            decode.push(s.offset, s.context_tokens, &table);
        }
        let pad = Padding {
            max_context: key.context,
            ..Padding::default()
        };
        (vec![true; packed.seqs.len()], pad)
    } else {
        // Rows past the prompt's: token 0 at position 0, writing no KV.
        let rows = key.prefill_tokens;
        packed.tokens.resize(rows, 0);
        packed.positions.resize(rows, 0);
        packed.slots.resize(rows, fused::NO_SLOT);
        let pad = Padding {
            table_width: prefill_table_width(model, cache),
            queries: rows,
            ..Padding::default()
        };
        (vec![false], pad)
    };
    let packed = &packed;
    let host = StepInputs::host(packed, &decoded, &decode, &pad);

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
        return Ok(g.logits.narrow(0, 0, batch)?.copy()?);
    }

    let buf = Tensor::from_slice(&host, host.len(), model.device())?;
    let inputs = StepInputs::views(&buf, packed, decoded, &decode, &pad)?;
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
                StepGraph {
                    graph,
                    inputs: buf,
                    logits: recorded,
                },
            );
        }
        Err(e) => {
            // Said once: the cache runs unrecorded from here on, correct but slower.
            eprintln!("warning: steps run without CUDA graphs: recording failed: {e}");
            cache.graphs.broken = true;
        }
    }
    Ok(logits.narrow(0, 0, batch)?)
}

/// Records the graphs of the steps an engine can meet, so that no request waits for a
/// recording: prefills of up to `max_tokens` tokens (to the longest recorded), and decode
/// steps of up to `max_seqs` sequences over up to `max_context` tokens each, as many of them
/// as the cache keeps. The recorded steps run on dummy inputs that write no KV. Returns the
/// number of graphs the cache holds.
pub(crate) fn record_ahead(
    model: &Model,
    cache: &mut KvCache,
    max_seqs: usize,
    max_tokens: usize,
    max_context: usize,
) -> Result<usize, RuntimeError> {
    let bs = cache.block_size_tokens();
    let longest = max_context.min(model.spec().max_position_embeddings as usize);
    let mut steps = Vec::new();
    for n in (PREFILL_BUCKET..=max_tokens.min(PREFILL_GRAPH_MAX_TOKENS).min(longest))
        .step_by(PREFILL_BUCKET)
    {
        steps.push(dummy_step(&[n], n, bs));
    }
    let mut batch = 1;
    while batch <= max_seqs.next_power_of_two() {
        let mut context = MIN_CONTEXT_BUCKET;
        while context <= longest.next_power_of_two() {
            steps.push(dummy_step(&vec![1; batch], context.min(longest), bs));
            context *= 2;
        }
        batch *= 2;
    }
    for packed in steps {
        if cache.graphs.len() >= MAX_GRAPHS {
            break;
        }
        match key(model, cache, &packed)? {
            Some(key) if !cache.graphs.recorded.contains_key(&key) => {
                step(model, cache, packed, key)?;
            }
            _ => {}
        }
    }
    Ok(cache.graphs.len())
}

/// A step of one sequence per entry of `n_tokens`, each its last n tokens of `context`, over
/// block 0 alone and writing no KV.
fn dummy_step(n_tokens: &[usize], context: usize, block_size: usize) -> Packed {
    let mut p = Packed::default();
    for &n in n_tokens {
        let offset = p.tokens.len();
        p.tokens.extend(std::iter::repeat_n(0, n));
        p.positions
            .extend((context - n..context).map(|pos| pos as u32));
        p.slots.extend(std::iter::repeat_n(fused::NO_SLOT, n));
        p.last_rows.push((offset + n - 1) as u32);
        p.seqs.push(SeqPlan::dummy(offset, n, context, block_size));
    }
    p
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
