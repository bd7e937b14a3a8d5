//! The Llama forward pass (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a paged KV
//! cache, for a batch that mixes prefills and decodes of different lengths in one step.
//!
//! All new tokens of a step are packed into one (T, hidden) activation, so every matmul runs
//! once per layer for the whole batch; only attention runs per sequence, on the context
//! gathered from that sequence's blocks.

use super::cache::KvCache;
use super::linear::linear;
use super::rope::Rope;
use super::{RuntimeError, Weights};
use crate::ModelSpec;
use candle_core::{DType, Device, Tensor};

/// One sequence's share of a forward step.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// The new tokens: a prompt (or a chunk of one), or the last sampled token.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the cache; the new ones take positions from here.
    pub start_pos: usize,
    /// The sequence's blocks in position order; must cover `start_pos + tokens.len()`.
    pub block_table: &'a [u32],
}

/// A layer's weights, with Q/K/V and gate/up fused so that each is one matmul.
#[derive(Debug, Clone)]
struct Layer {
    /// (hidden) f32
    attn_norm: Tensor,
    /// (q_dim + 2 kv_dim, hidden)
    wqkv: Tensor,
    /// (hidden, q_dim)
    wo: Tensor,
    /// (hidden) f32
    ffn_norm: Tensor,
    /// (2 intermediate, hidden)
    w_gate_up: Tensor,
    /// (hidden, intermediate)
    w_down: Tensor,
}

/// A Llama-family model ready to run: weights on their device, RoPE tables precomputed.
#[derive(Debug, Clone)]
pub struct Model {
    spec: ModelSpec,
    dtype: DType,
    device: Device,
    /// (vocab, hidden)
    embed: Tensor,
    layers: Vec<Layer>,
    /// (hidden) f32
    norm: Tensor,
    /// (vocab, hidden)
    lm_head: Tensor,
    rope: Rope,
}

/// Called with each layer once its K and V of the step are in the cache.
type OnLayer<'a> = dyn FnMut(usize, &KvCache) -> Result<(), RuntimeError> + 'a;

/// A sequence's place in the packed batch and what its attention reads.
pub(crate) struct SeqPlan {
    /// First row of its new tokens in the packed batch.
    pub(crate) offset: usize,
    pub(crate) n_tokens: usize,
    pub(crate) context_tokens: usize,
    /// The blocks covering its context.
    pub(crate) blocks: Vec<u32>,
    /// Additive causal mask (n_tokens, context_tokens), f32; none for a single new token,
    /// which sees its whole context, and on a GPU, whose softmax kernel masks.
    mask: Option<Tensor>,
}

#[cfg(feature = "cuda")]
impl SeqPlan {
    /// A recorded step's padding sequence: one token at row `row`, over block 0.
    pub(crate) fn padding(row: usize) -> SeqPlan {
        SeqPlan::dummy(row, 1, 1, 1)
    }

    /// `n` tokens from row `offset`, the last of `context`, every block of which is block 0.
    pub(crate) fn dummy(offset: usize, n: usize, context: usize, block_size: usize) -> SeqPlan {
        SeqPlan {
            offset,
            n_tokens: n,
            context_tokens: context,
            blocks: vec![0; context.div_ceil(block_size)],
            mask: None,
        }
    }
}

impl Model {
    /// Checks every tensor against the spec, fuses Q/K/V and gate/up, and precomputes RoPE
    /// tables for every position up to `max_position_embeddings`.
    pub fn new(weights: Weights) -> Result<Model, RuntimeError> {
        let spec = weights.spec.clone();
        let dtype = weights.dtype();
        let device = weights.device().clone();
        check_spec(&spec)?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(RuntimeError::Invalid(format!(
                "model {}: weights dtype {dtype:?} is not supported (f32, f16 or bf16)",
                spec.name
            )));
        }
        if weights.layers.len() != spec.n_layers as usize {
            return Err(RuntimeError::Invalid(format!(
                "model {}: {} layers of weights, the spec says {}",
                spec.name,
                weights.layers.len(),
                spec.n_layers
            )));
        }
        let h = spec.hidden_size as usize;
        let q = (spec.n_heads * spec.head_dim) as usize;
        let kv = (spec.n_kv_heads * spec.head_dim) as usize;
        let inter = spec.intermediate_size as usize;
        let vocab = spec.vocab_size as usize;
        let check = |name: &str, t: &Tensor, dims: &[usize]| -> Result<(), RuntimeError> {
            if t.dims() != dims {
                return Err(RuntimeError::Shape {
                    name: name.to_string(),
                    expected: dims.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            if t.dtype() != dtype || !t.device().same_device(&device) {
                return Err(RuntimeError::Invalid(format!(
                    "tensor {name}: {:?} on {:?}, the embedding is {dtype:?} on {:?}",
                    t.dtype(),
                    t.device().location(),
                    device.location()
                )));
            }
            Ok(())
        };
        check("embed", &weights.embed, &[vocab, h])?;
        check("norm", &weights.norm, &[h])?;
        check("lm_head", &weights.lm_head, &[vocab, h])?;
        let mut layers = Vec::with_capacity(weights.layers.len());
        for (i, l) in weights.layers.iter().enumerate() {
            let name = |t: &str| format!("layers.{i}.{t}");
            check(&name("attn_norm"), &l.attn_norm, &[h])?;
            check(&name("wq"), &l.wq, &[q, h])?;
            check(&name("wk"), &l.wk, &[kv, h])?;
            check(&name("wv"), &l.wv, &[kv, h])?;
            check(&name("wo"), &l.wo, &[h, q])?;
            check(&name("ffn_norm"), &l.ffn_norm, &[h])?;
            check(&name("w_gate"), &l.w_gate, &[inter, h])?;
            check(&name("w_up"), &l.w_up, &[inter, h])?;
            check(&name("w_down"), &l.w_down, &[h, inter])?;
            layers.push(Layer {
                attn_norm: l.attn_norm.to_dtype(DType::F32)?,
                wqkv: Tensor::cat(&[&l.wq, &l.wk, &l.wv], 0)?,
                wo: l.wo.clone(),
                ffn_norm: l.ffn_norm.to_dtype(DType::F32)?,
                w_gate_up: Tensor::cat(&[&l.w_gate, &l.w_up], 0)?,
                w_down: l.w_down.clone(),
            });
        }
        let rope = Rope::new(&spec, weights.rope, dtype, &device)?;
        Ok(Model {
            norm: weights.norm.to_dtype(DType::F32)?,
            embed: weights.embed,
            lm_head: weights.lm_head,
            layers,
            rope,
            spec,
            dtype,
            device,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step: writes every sequence's new K/V into its blocks and returns the logits
    /// of each sequence's last new token, (batch, vocab) f32, in batch order.
    ///
    /// Sequences may mix prefills, prefill chunks and single-token decodes. The batch is
    /// validated whole before the cache is touched; two sequences may share read-only blocks
    /// (a common prefix) but never write the same slot.
    pub fn forward(&self, cache: &mut KvCache, batch: &[SeqInput]) -> Result<Tensor, RuntimeError> {
        self.forward_impl(cache, batch, None)
    }

    /// [`Model::forward`], calling `on_layer(l, cache)` once layer `l`'s K and V of the step
    /// are in the cache: a prefill worker sends each layer's KV while the next is computed.
    pub fn forward_observed(
        &self,
        cache: &mut KvCache,
        batch: &[SeqInput],
        on_layer: &mut dyn FnMut(usize, &KvCache) -> Result<(), RuntimeError>,
    ) -> Result<Tensor, RuntimeError> {
        self.forward_impl(cache, batch, Some(on_layer))
    }

    fn forward_impl(
        &self,
        cache: &mut KvCache,
        batch: &[SeqInput],
        mut on_layer: Option<&mut OnLayer>,
    ) -> Result<Tensor, RuntimeError> {
        self.check_cache(cache)?;
        let packed = self.pack(cache, batch)?;
        let dev = &self.device;
        let t = packed.tokens.len();
        let (kvh, hd) = (cache.n_kv_heads(), cache.head_dim());
        let nh = self.spec.n_heads as usize;
        let group = nh / kvh;
        let (q_dim, kv_dim) = (nh * hd, kvh * hd);
        let inter = self.spec.intermediate_size as usize;
        let eps = self.spec.rms_norm_eps as f32;

        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            return self.forward_fused(cache, packed, on_layer);
        }
        let blocks = packed.block_tensors(dev)?;
        let tokens = Tensor::from_vec(packed.tokens, t, dev)?;
        let positions = Tensor::from_vec(packed.positions, t, dev)?;
        let (cos, sin) = self.rope.at(&positions)?;
        let slots = Tensor::from_vec(packed.slots, (1, t, 1), dev)?
            .broadcast_as((kvh, t, hd))?
            .contiguous()?;

        let mut x = self.embed.index_select(&tokens, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, eps)?;
            let qkv = linear(&h, &layer.wqkv)?;
            let q = qkv
                .narrow(1, 0, q_dim)?
                .contiguous()?
                .reshape((t, nh, 1, hd))?;
            let k = qkv.narrow(1, q_dim, kv_dim)?.contiguous()?;
            let k = k.reshape((t, kvh, 1, hd))?;
            let q = self.rope.apply(&q, &cos, &sin)?;
            let k = self.rope.apply(&k, &cos, &sin)?;
            // (T, kv_heads, head_dim) -> (kv_heads, T, head_dim), the pools' layout.
            let k = k.reshape((t, kvh, hd))?.transpose(0, 1)?.contiguous()?;
            let v = qkv
                .narrow(1, q_dim + kv_dim, kv_dim)?
                .reshape((t, kvh, hd))?;
            let v = v.transpose(0, 1)?.contiguous()?;
            cache.write(li, &slots, &k, &v)?;
            if let Some(f) = on_layer.as_mut() {
                f(li, cache)?;
            }

            // Head h attends with kv head h / group: view Q as (T, kv_heads, group, head_dim).
            let q = q.reshape((t, kvh, group, hd))?;
            let mut outs = Vec::with_capacity(packed.seqs.len());
            for (s, blocks) in packed.seqs.iter().zip(&blocks) {
                outs.push(self.seq_attention(cache, li, &q, s, blocks)?);
            }
            let attn = Tensor::cat(&outs, 0)?;
            x = (x + linear(&attn, &layer.wo)?)?;

            let h = rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate_up = linear(&h, &layer.w_gate_up)?;
            let act = (gate_up.narrow(1, 0, inter)?.silu()? * gate_up.narrow(1, inter, inter)?)?;
            x = (x + linear(&act, &layer.w_down)?)?;
        }
        let last = Tensor::from_vec(packed.last_rows, batch.len(), dev)?;
        let h = rms_norm(&x.index_select(&last, 0)?, &self.norm, eps)?;
        Ok(linear(&h, &self.lm_head)?.to_dtype(DType::F32)?)
    }

    /// [`Model::forward_observed`] on a GPU: the same arithmetic in fewer launches. The
    /// residual add and the next norm, RoPE and the KV write, SiLU and the gating product are
    /// one kernel each, and all single-token queries of the step attend in one kernel over
    /// their blocks in place; a longer query (a prefill or a chunk of one) attends in one
    /// flash-attention kernel per sequence (f16 or bf16, head_dim 64), else through cuBLAS and
    /// the softmax kernel. With no observer, a step of single-token queries, or of one
    /// sequence's prefill (f16 or bf16, up to 1024 tokens), replays a CUDA graph of its shape
    /// (see graph.rs).
    #[cfg(feature = "cuda")]
    fn forward_fused(
        &self,
        cache: &mut KvCache,
        packed: Packed,
        on_layer: Option<&mut OnLayer>,
    ) -> Result<Tensor, RuntimeError> {
        use super::{fused, graph};
        let dev = &self.device;
        // Raw driver calls (a graph's upload) need the context on this thread, and a step may
        // be a thread's first call: an engine's graphs are recorded before its thread starts.
        if let Device::Cuda(cuda) = dev {
            super::context::bind(cuda.cuda_stream().context()).map_err(|e| {
                RuntimeError::from(candle_core::Error::Cuda(Box::new(e)))
                    .during("binding the CUDA context to the step's thread")
            })?;
        }
        let block_size = cache.block_size_tokens();
        if on_layer.is_none()
            && let Some(key) = graph::key(self, cache, &packed)?
        {
            return graph::step(self, cache, packed, key);
        }
        let mut decode = fused::DecodeRows::default();
        let decoded: Vec<bool> = packed
            .seqs
            .iter()
            .map(|s| {
                let fits = s.n_tokens == 1
                    && fused::attention_fits(cache.head_dim(), s.context_tokens, block_size);
                if fits {
                    decode.push(s.offset, s.context_tokens, &s.blocks);
                }
                fits
            })
            .collect();
        let pad = Padding::default();
        let host = StepInputs::host(&packed, &decoded, &decode, &pad);
        let buf = Tensor::from_slice(&host, host.len(), dev)?;
        let inputs = StepInputs::views(&buf, &packed, decoded, &decode, &pad)?;
        self.run_fused(cache, &packed.seqs, &inputs, on_layer)
    }

    /// Runs once, on zeros, every matmul that steps of up to `max_tokens` tokens and `max_seqs`
    /// sequences can meet, so that no request pays for cuBLAS's first call of a shape (see
    /// `fused::matmul_rows`). Does nothing off CUDA; returns the number of matmuls run.
    pub fn warm_up_matmuls(
        &self,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<usize, RuntimeError> {
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() {
            use super::fused;
            let shapes = fused::MatmulShapes::new(max_tokens, max_seqs);
            let zeros =
                |rows: usize, cols: usize| Tensor::zeros((rows, cols), self.dtype, &self.device);
            let hidden = self.spec.hidden_size as usize;
            let q_dim = (self.spec.n_heads * self.spec.head_dim) as usize;
            let inter = self.spec.intermediate_size as usize;
            // Every layer has the same shapes.
            let layer = &self.layers[0];
            for &rows in &shapes.layer_rows {
                let (x, attn, act) = (
                    zeros(rows, hidden)?,
                    zeros(rows, q_dim)?,
                    zeros(rows, inter)?,
                );
                fused::matmul(&x, &layer.wqkv)?;
                fused::matmul(&attn, &layer.wo)?;
                fused::matmul(&x, &layer.w_gate_up)?;
                fused::matmul(&act, &layer.w_down)?;
            }
            for &rows in &shapes.head_rows {
                fused::matmul(&zeros(rows, hidden)?, &self.lm_head)?;
            }
            self.device.synchronize()?;
            return Ok(4 * shapes.layer_rows.len() + shapes.head_rows.len());
        }
        let _ = (max_tokens, max_seqs);
        Ok(0)
    }

    /// Records into `cache` the CUDA graphs of the steps an engine of up to `max_seqs`
    /// sequences, `max_tokens` tokens a step and `max_context` tokens a sequence can replay
    /// (see graph.rs), so that none is recorded while serving. Does nothing off CUDA; returns
    /// the number of graphs the cache holds.
    pub fn record_graphs(
        &self,
        cache: &mut KvCache,
        max_seqs: usize,
        max_tokens: usize,
        max_context: usize,
    ) -> Result<usize, RuntimeError> {
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() {
            self.check_cache(cache)?;
            return super::graph::record_ahead(self, cache, max_seqs, max_tokens, max_context);
        }
        let _ = (cache, max_seqs, max_tokens, max_context);
        Ok(0)
    }

    /// How the steps this model replays are padded: a lone prefill chunk of up to `longest`
    /// tokens runs as the graph of its tokens rounded up to a multiple of `bucket`. Returns
    /// `(bucket, longest)`, or `None` where no prefill is replayed (off CUDA, or a prefill the
    /// fused kernel cannot take).
    pub fn prefill_graph_shape(&self) -> Option<(usize, usize)> {
        #[cfg(feature = "cuda")]
        if self.device.is_cuda()
            && super::fused::prefill_fits(self.dtype(), self.spec().head_dim as usize)
        {
            return Some(super::graph::PREFILL_SHAPE);
        }
        None
    }

    /// Where the weights live: steps recorded for one model replay only with it.
    #[cfg(feature = "cuda")]
    pub(crate) fn weights_address(&self) -> Result<u64, RuntimeError> {
        Ok(super::fused::address(&self.embed)?)
    }

    /// The fused forward pass over inputs already on the device.
    #[cfg(feature = "cuda")]
    pub(crate) fn run_fused(
        &self,
        cache: &mut KvCache,
        seqs: &[SeqPlan],
        inputs: &StepInputs,
        mut on_layer: Option<&mut OnLayer>,
    ) -> Result<Tensor, RuntimeError> {
        use super::fused::{self, Product};
        let dev = &self.device;
        let t = inputs.tokens.dim(0)?;
        let (kvh, hd) = (cache.n_kv_heads(), cache.head_dim());
        let nh = self.spec.n_heads as usize;
        let eps = self.spec.rms_norm_eps as f32;
        let (cos, sin) = self.rope.tables();
        // A one-token step's kernels run back to back, each starting as the one before ends
        // (see `fused::Scratch`); with more tokens, cuBLAS's allocations come between them.
        let scratch = match t {
            1 => fused::Scratch::arena(),
            _ => fused::Scratch::none(),
        };
        let s = &scratch;

        // Kept to the end, so that its free comes after the step's kernels.
        let embedded = self.embed.index_select(&inputs.tokens, 0)?;
        let (mut x, mut h) =
            fused::add_rms_norm(&embedded, None, &self.layers[0].attn_norm, eps, s)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let (k_pool, v_pool) = cache.pools(li);
            let rope = fused::RopeKv {
                cos,
                sin,
                positions: &inputs.positions,
                slots: &inputs.slots,
                k_pool,
                v_pool,
                n_heads: nh,
                interleaved: self.rope.interleaved(),
            };
            let q = fused::qkv_rope(&h, &layer.wqkv, &rope, s)?;
            if let Some(f) = on_layer.as_mut() {
                f(li, cache)?;
            }
            let (k_pool, v_pool) = cache.pools(li);

            // The matmuls' rows: padding rows zero (see `fused::matmul_rows`). A recorded
            // prefill's padding rows (past its tokens, see graph.rs) are left unwritten: every
            // row's arithmetic is its own, and they write no KV.
            let attn = match fused::matmul_rows(t) {
                rows if rows > t => Tensor::zeros((rows, nh * hd), self.dtype, dev)?,
                _ => fused::rows(dev, self.dtype, t, nh * hd, s)?,
            };
            if let Some(d) = &inputs.decode {
                let counters = cache.attention_counters.as_ref().ok_or_else(|| {
                    RuntimeError::Invalid("decode attention: the cache is not on a GPU".into())
                })?;
                fused::paged_decode_attention(
                    &q,
                    k_pool,
                    v_pool,
                    d,
                    cache.block_size_tokens(),
                    counters,
                    &attn,
                    s,
                )?;
            }
            // Longer queries: the flash-attention kernel where it is built for the shapes.
            if fused::prefill_fits(self.dtype, hd) {
                for p in &inputs.prefills {
                    let s = &seqs[p.index];
                    fused::prefill_attention(&fused::Prefill {
                        q: &q,
                        k_pool,
                        v_pool,
                        seq: &p.seq,
                        n: s.n_tokens,
                        context: s.context_tokens,
                        queries: p.queries,
                        block_size: cache.block_size_tokens(),
                        out: &attn,
                    })?;
                }
            } else {
                let q = q.reshape((t, kvh, nh / kvh, hd))?;
                for p in &inputs.prefills {
                    let s = &seqs[p.index];
                    let blocks = p.seq.narrow(0, fused::PREFILL_SEQ_HEAD, s.blocks.len())?;
                    attn.slice_set(&self.seq_attention(cache, li, &q, s, &blocks)?, 0, s.offset)?;
                }
            }
            let o = fused::product(&attn, &layer.wo, Product::Plain, s)?;
            let (x1, h1) = fused::add_rms_norm(&x, Some(&o), &layer.ffn_norm, eps, s)?;
            let act = fused::product(&h1, &layer.w_gate_up, Product::Silu, s)?;
            let down = fused::product(&act, &layer.w_down, Product::Plain, s)?;
            let next_norm = self.layers.get(li + 1).map_or(&self.norm, |l| &l.attn_norm);
            (x, h) = fused::add_rms_norm(&x1, Some(&down), next_norm, eps, s)?;
        }
        // A one-token step's last row is its only one.
        let last = match t {
            1 => h,
            _ => h.index_select(&inputs.last, 0)?,
        };
        Ok(fused::product(&last, &self.lm_head, Product::F32, s)?)
    }

    /// Attention of one sequence's new tokens (rows of `q`, viewed as (T, kv_heads, group,
    /// head_dim)) over its context in `blocks`: (n_tokens, n_heads * head_dim).
    fn seq_attention(
        &self,
        cache: &KvCache,
        layer: usize,
        q: &Tensor,
        s: &SeqPlan,
        blocks: &Tensor,
    ) -> Result<Tensor, RuntimeError> {
        let (_, kvh, group, hd) = q.dims4()?;
        let n = s.n_tokens;
        let scale = 1.0 / (hd as f64).sqrt();
        let qs = q
            .narrow(0, s.offset, n)?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((kvh, group * n, hd))?;
        let (ks, vs) = cache.gather(layer, blocks, s.context_tokens)?;
        let (ks, vs) = (ks.to_dtype(self.dtype)?, vs.to_dtype(self.dtype)?);
        let scores = qs.matmul(&ks.t()?)?;
        #[cfg(feature = "cuda")]
        let probs = match scores.device().is_cuda() {
            // Scale, mask and softmax in one pass over the scores, in place.
            true => {
                super::fused::causal_softmax(&scores, n, scale as f32)?;
                scores
            }
            false => self.probs(scores, s, scale)?,
        };
        #[cfg(not(feature = "cuda"))]
        let probs = self.probs(scores, s, scale)?;
        Ok(probs
            .matmul(&vs)?
            .reshape((kvh, group, n, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((n, kvh * group * hd))?)
    }

    /// Softmax of scores (kv_heads, group * n, context) scaled and masked by the sequence's
    /// causal mask, in f32, rounded to the model's dtype.
    fn probs(&self, scores: Tensor, s: &SeqPlan, scale: f64) -> Result<Tensor, RuntimeError> {
        let (kvh, rows, context) = scores.dims3()?;
        let scores = scores.to_dtype(DType::F32)?.affine(scale, 0.0)?;
        let scores = match &s.mask {
            Some(mask) => scores
                .reshape((kvh, rows / s.n_tokens, s.n_tokens, context))?
                .broadcast_add(mask)?
                .reshape((kvh, rows, context))?,
            None => scores,
        };
        Ok(candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?)
    }

    fn check_cache(&self, cache: &KvCache) -> Result<(), RuntimeError> {
        let spec = &self.spec;
        if cache.n_layers() != spec.n_layers as usize
            || cache.n_kv_heads() != spec.n_kv_heads as usize
            || cache.head_dim() != spec.head_dim as usize
        {
            return Err(RuntimeError::Invalid(format!(
                "KV cache of {} layers x {} kv heads x {} head_dim does not fit model {} \
                 ({} x {} x {})",
                cache.n_layers(),
                cache.n_kv_heads(),
                cache.head_dim(),
                spec.name,
                spec.n_layers,
                spec.n_kv_heads,
                spec.head_dim
            )));
        }
        if !cache.device().same_device(&self.device) {
            return Err(RuntimeError::Invalid(format!(
                "KV cache on {:?}, model on {:?}",
                cache.device().location(),
                self.device.location()
            )));
        }
        Ok(())
    }

    /// Validates the batch and lays it out: packed token ids, positions and slots, each
    /// sequence's blocks and mask, and the row of each sequence's last token.
    fn pack(&self, cache: &KvCache, batch: &[SeqInput]) -> Result<Packed, RuntimeError> {
        if batch.is_empty() {
            return Err(RuntimeError::Invalid("forward: empty batch".into()));
        }
        let bs = cache.block_size_tokens();
        let max_pos = self.spec.max_position_embeddings as usize;
        let vocab = self.spec.vocab_size;
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut p = Packed {
            tokens: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            slots: Vec::with_capacity(total),
            seqs: Vec::with_capacity(batch.len()),
            last_rows: Vec::with_capacity(batch.len()),
        };
        for (i, s) in batch.iter().enumerate() {
            let n = s.tokens.len();
            if n == 0 {
                return Err(RuntimeError::Invalid(format!(
                    "forward: sequence {i} has no new tokens"
                )));
            }
            if let Some(tok) = s.tokens.iter().find(|&&tok| tok >= vocab) {
                return Err(RuntimeError::Invalid(format!(
                    "forward: sequence {i}: token id {tok} out of range (vocab {vocab})"
                )));
            }
            let context = s.start_pos.saturating_add(n);
            if context > max_pos {
                return Err(RuntimeError::Invalid(format!(
                    "forward: sequence {i}: {} cached + {n} new tokens exceed \
                     max_position_embeddings {max_pos}",
                    s.start_pos
                )));
            }
            let needed = context.div_ceil(bs);
            if s.block_table.len() < needed {
                return Err(RuntimeError::Invalid(format!(
                    "forward: sequence {i}: {context} tokens need {needed} blocks of {bs}, \
                     the block table has {}",
                    s.block_table.len()
                )));
            }
            let blocks = &s.block_table[..needed];
            cache.check_block_ids(blocks, &format!("forward: sequence {i}"))?;
            let offset = p.tokens.len();
            p.tokens.extend_from_slice(s.tokens);
            for pos in s.start_pos..context {
                p.positions.push(pos as u32);
                p.slots
                    .push(blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            // A GPU masks inside its softmax kernel.
            let mask = if n > 1 && !self.device.is_cuda() {
                Some(causal_mask(s.start_pos, n, &self.device)?)
            } else {
                None
            };
            p.seqs.push(SeqPlan {
                offset,
                n_tokens: n,
                context_tokens: context,
                blocks: blocks.to_vec(),
                mask,
            });
            p.last_rows.push((offset + n - 1) as u32);
        }
        let mut sorted = p.slots.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(RuntimeError::Invalid(format!(
                "forward: two new tokens of the batch write slot {} (block {})",
                w[0],
                w[0] as usize / bs
            )));
        }
        Ok(p)
    }
}

#[derive(Default)]
pub(crate) struct Packed {
    pub(crate) tokens: Vec<u32>,
    pub(crate) positions: Vec<u32>,
    pub(crate) slots: Vec<u32>,
    pub(crate) seqs: Vec<SeqPlan>,
    pub(crate) last_rows: Vec<u32>,
}

/// A step's inputs on the device, views of one buffer uploaded at once: `[tokens | positions |
/// slots | last rows | decode rows | each longer query's sequence]` (u32; see
/// [`super::fused::DecodeRows::meta`] and [`super::fused::prefill_seq`]).
#[cfg(feature = "cuda")]
pub(crate) struct StepInputs {
    pub(crate) tokens: Tensor,
    pub(crate) positions: Tensor,
    pub(crate) slots: Tensor,
    pub(crate) last: Tensor,
    /// The single-token queries attended by the decode kernel.
    pub(crate) decode: Option<super::fused::DeviceDecodeRows>,
    /// The other sequences, attended one by one.
    pub(crate) prefills: Vec<DevicePrefill>,
}

/// A sequence whose query is longer than a token (or past the decode kernel), on the device.
#[cfg(feature = "cuda")]
pub(crate) struct DevicePrefill {
    /// Its place in the step's sequences.
    pub(crate) index: usize,
    /// `[offset, n, context, block table...]`.
    pub(crate) seq: Tensor,
    /// Query rows its attention launch covers.
    pub(crate) queries: usize,
}

/// How a recorded step's inputs are shaped beyond the step itself, so that one recording
/// serves every step that fits (all zero for a step run once).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Padding {
    /// Context the decode attention is split for.
    pub(crate) max_context: usize,
    /// Entries of each longer query's block table.
    pub(crate) table_width: usize,
    /// Query rows of each longer query's attention launch.
    pub(crate) queries: usize,
}

#[cfg(feature = "cuda")]
impl StepInputs {
    /// The buffer's contents; `decoded` says which sequences `decode` holds.
    pub(crate) fn host(
        packed: &Packed,
        decoded: &[bool],
        decode: &super::fused::DecodeRows,
        pad: &Padding,
    ) -> Vec<u32> {
        let mut host = Vec::with_capacity(4 * packed.tokens.len() + decode.meta_len());
        host.extend_from_slice(&packed.tokens);
        host.extend_from_slice(&packed.positions);
        host.extend_from_slice(&packed.slots);
        host.extend_from_slice(&packed.last_rows);
        decode.meta(&mut host);
        for (s, _) in packed.seqs.iter().zip(decoded).filter(|(_, d)| !**d) {
            host.extend(super::fused::prefill_seq(
                s.offset,
                s.n_tokens,
                s.context_tokens,
                &s.blocks,
                pad.table_width,
            ));
        }
        host
    }

    pub(crate) fn views(
        buf: &Tensor,
        packed: &Packed,
        decoded: Vec<bool>,
        decode: &super::fused::DecodeRows,
        pad: &Padding,
    ) -> Result<StepInputs, RuntimeError> {
        let (t, n) = (packed.tokens.len(), packed.seqs.len());
        let mut at = 3 * t + n;
        let decode = match decode.is_empty() {
            true => None,
            false => {
                let meta = buf.narrow(0, at, decode.meta_len())?;
                at += decode.meta_len();
                Some(decode.on_device(meta, pad.max_context))
            }
        };
        let mut prefills = Vec::new();
        for (index, s) in packed.seqs.iter().enumerate() {
            if decoded[index] {
                continue;
            }
            let len = super::fused::PREFILL_SEQ_HEAD + s.blocks.len().max(pad.table_width);
            prefills.push(DevicePrefill {
                index,
                seq: buf.narrow(0, at, len)?,
                queries: s.n_tokens.max(pad.queries),
            });
            at += len;
        }
        Ok(StepInputs {
            tokens: buf.narrow(0, 0, t)?,
            positions: buf.narrow(0, t, t)?,
            slots: buf.narrow(0, 2 * t, t)?,
            last: buf.narrow(0, 3 * t, n)?,
            decode,
            prefills,
        })
    }
}

impl Packed {
    /// Each sequence's blocks as a u32 tensor on `device`.
    fn block_tensors(&self, device: &Device) -> Result<Vec<Tensor>, RuntimeError> {
        self.seqs
            .iter()
            .map(|s| Ok(Tensor::from_slice(&s.blocks, s.blocks.len(), device)?))
            .collect()
    }
}

fn check_spec(spec: &ModelSpec) -> Result<(), RuntimeError> {
    let bad = |why: &str| {
        Err(RuntimeError::Invalid(format!(
            "model {}: {why} (n_heads {}, n_kv_heads {}, head_dim {}, hidden_size {})",
            spec.name, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.hidden_size
        )))
    };
    if spec.n_heads == 0 || spec.n_kv_heads == 0 || spec.hidden_size == 0 {
        return bad("head counts and hidden_size must be positive");
    }
    if !spec.n_heads.is_multiple_of(spec.n_kv_heads) {
        return bad("n_heads must be a multiple of n_kv_heads");
    }
    if spec.head_dim == 0 || !spec.head_dim.is_multiple_of(2) {
        return bad("head_dim must be even and positive for RoPE");
    }
    if spec.max_position_embeddings == 0 || spec.vocab_size == 0 {
        return Err(RuntimeError::Invalid(format!(
            "model {}: max_position_embeddings and vocab_size must be positive",
            spec.name
        )));
    }
    Ok(())
}

/// RMSNorm in f32 whatever the activations' dtype, returned in that dtype.
fn rms_norm(x: &Tensor, weight_f32: &Tensor, eps: f32) -> Result<Tensor, RuntimeError> {
    let dtype = x.dtype();
    Ok(candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, weight_f32, eps)?.to_dtype(dtype)?)
}

/// 0 where new token i (at position start + i) may see key j (j <= start + i), -inf elsewhere;
/// (n, start + n) f32, built with tensor ops on the device.
fn causal_mask(start: usize, n: usize, device: &Device) -> Result<Tensor, RuntimeError> {
    let context = start + n;
    let queries = Tensor::arange(start as u32, context as u32, device)?.reshape((n, 1))?;
    let keys = Tensor::arange(0u32, context as u32, device)?.reshape((1, context))?;
    let visible = keys.broadcast_le(&queries)?;
    let zeros = Tensor::zeros((n, context), DType::F32, device)?;
    let blocked = Tensor::full(f32::NEG_INFINITY, (n, context), device)?;
    Ok(visible.where_cond(&zeros, &blocked)?)
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
