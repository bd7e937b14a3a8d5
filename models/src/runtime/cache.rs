//! The paged KV cache: per layer one K and one V pool of fixed-size token blocks, addressed
//! through each sequence's block table. Whole blocks export to bytes and import back, so a
//! sequence's KV can leave the process (prefill node to decode node) and skip recomputation.

use super::RuntimeError;
use crate::ModelSpec;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

/// Tokens per block unless the caller picks otherwise (vLLM's and the simulator's default).
pub const DEFAULT_BLOCK_SIZE_TOKENS: usize = 16;

/// Paged K and V pools for every layer.
///
/// A sequence's token at position `p` lives in slot `block_table[p / bs] * bs + p % bs`.
///
/// The pools are head-major, `(n_kv_heads, num_blocks * block_size, head_dim)`: gathering a
/// sequence's blocks along the slot axis yields the `(kv_head, token, head_dim)` operand that
/// attention multiplies by, so a step copies each context once. The export layout is
/// token-major (see [`KvCache::export_blocks`]); that transpose is paid per transfer, not per
/// step.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    num_blocks: usize,
    block_size_tokens: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    /// Decode steps recorded over these pools.
    #[cfg(feature = "cuda")]
    pub(crate) graphs: super::graph::Graphs,
    /// The split decode attention's counters (see `fused::paged_decode_attention`), on a GPU:
    /// zero between launches, at one address for every step, recorded or not.
    #[cfg(feature = "cuda")]
    pub(crate) attention_counters: Option<Tensor>,
}

impl KvCache {
    /// Zeroed pools of `num_blocks` blocks of `block_size_tokens` tokens for every layer of
    /// `spec`, in `dtype` (f32, f16 or bf16) on `device`.
    pub fn new(
        spec: &ModelSpec,
        num_blocks: usize,
        block_size_tokens: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<KvCache, RuntimeError> {
        if num_blocks == 0 || block_size_tokens == 0 {
            return Err(RuntimeError::Invalid(format!(
                "KV cache: num_blocks ({num_blocks}) and block_size_tokens \
                 ({block_size_tokens}) must be positive"
            )));
        }
        // Slot ids travel as u32 index tensors.
        let slots = num_blocks
            .checked_mul(block_size_tokens)
            .filter(|&s| s <= u32::MAX as usize)
            .ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "KV cache: {num_blocks} blocks of {block_size_tokens} tokens exceed 2^32 slots"
                ))
            })?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(RuntimeError::Invalid(format!(
                "KV cache: dtype {dtype:?} is not supported (f32, f16 or bf16)"
            )));
        }
        let (n_kv_heads, head_dim) = (spec.n_kv_heads as usize, spec.head_dim as usize);
        if spec.n_layers == 0 || n_kv_heads == 0 || head_dim == 0 {
            return Err(RuntimeError::Invalid(format!(
                "KV cache: model {} needs n_layers, n_kv_heads and head_dim > 0",
                spec.name
            )));
        }
        let pool = || Tensor::zeros((n_kv_heads, slots, head_dim), dtype, device);
        let mut k = Vec::with_capacity(spec.n_layers as usize);
        let mut v = Vec::with_capacity(spec.n_layers as usize);
        for _ in 0..spec.n_layers {
            k.push(pool()?);
            v.push(pool()?);
        }
        Ok(KvCache {
            k,
            v,
            num_blocks,
            block_size_tokens,
            n_kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
            #[cfg(feature = "cuda")]
            attention_counters: match device {
                Device::Cuda(_) => Some(Tensor::zeros(
                    super::fused::ATTENTION_COUNTERS,
                    DType::U32,
                    device,
                )?),
                _ => None,
            },
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Decode step shapes recorded as CUDA graphs over these pools (none off a GPU).
    pub fn recorded_graphs(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.graphs.len();
        #[cfg(not(feature = "cuda"))]
        0
    }

    pub fn block_size_tokens(&self) -> usize {
        self.block_size_tokens
    }

    pub fn n_layers(&self) -> usize {
        self.k.len()
    }

    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of one block over all layers, K and V: what [`KvCache::export_blocks`] yields per
    /// block.
    pub fn bytes_per_block(&self) -> usize {
        self.n_layers() * 2 * self.layer_block_bytes()
    }

    /// Bytes of one block of one layer's K (or V).
    fn layer_block_bytes(&self) -> usize {
        self.layer_block_elems() * self.dtype.size_in_bytes()
    }

    /// Elements of one block of one layer's K (or V).
    fn layer_block_elems(&self) -> usize {
        self.block_size_tokens * self.n_kv_heads * self.head_dim
    }

    /// Elements of one block over all layers, K and V: a row of
    /// [`KvCache::export_blocks_tensor`].
    pub fn elems_per_block(&self) -> usize {
        self.n_layers() * 2 * self.layer_block_elems()
    }

    /// Fails with a message naming the first block id outside the pool.
    pub(crate) fn check_block_ids(&self, blocks: &[u32], what: &str) -> Result<(), RuntimeError> {
        match blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            Some(b) => Err(RuntimeError::Invalid(format!(
                "{what}: block id {b} out of range (the cache has {} blocks)",
                self.num_blocks
            ))),
            None => Ok(()),
        }
    }

    /// Writes new K and V, each `(n_kv_heads, n, head_dim)`, into the slots named by `slots`:
    /// `(n_kv_heads, n, head_dim)` u32, every row holding the token's slot id (as scatter
    /// wants one index per element). Slot ids must be in range and distinct.
    pub(crate) fn write(
        &self,
        layer: usize,
        slots: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), RuntimeError> {
        self.k[layer].scatter_set(slots, &k.to_dtype(self.dtype)?, 1)?;
        self.v[layer].scatter_set(slots, &v.to_dtype(self.dtype)?, 1)?;
        Ok(())
    }

    /// Layer `layer`'s K and V pools, `(n_kv_heads, num_blocks * block_size, head_dim)`: the
    /// fused kernels read and write them in place.
    #[cfg(feature = "cuda")]
    pub(crate) fn pools(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// The first `len_tokens` tokens of the context held in `blocks` (u32, checked ids), as K
    /// and V of shape `(n_kv_heads, len_tokens, head_dim)`.
    pub(crate) fn gather(
        &self,
        layer: usize,
        blocks: &Tensor,
        len_tokens: usize,
    ) -> Result<(Tensor, Tensor), RuntimeError> {
        let n = blocks.dim(0)?;
        let gather = |pool: &Tensor| -> Result<Tensor, RuntimeError> {
            Ok(self
                .blocked(pool)?
                .index_select(blocks, 1)?
                .reshape((self.n_kv_heads, n * self.block_size_tokens, self.head_dim))?
                .narrow(1, 0, len_tokens)?)
        };
        Ok((gather(&self.k[layer])?, gather(&self.v[layer])?))
    }

    /// Every pool in export order: layer 0 K, layer 0 V, layer 1 K, ...
    #[cfg(feature = "cuda")]
    fn layer_pools(&self) -> Vec<&Tensor> {
        self.k
            .iter()
            .zip(&self.v)
            .flat_map(|(k, v)| [k, v])
            .collect()
    }

    /// A pool viewed as `(n_kv_heads, num_blocks, block_size, head_dim)`.
    fn blocked(&self, pool: &Tensor) -> Result<Tensor, RuntimeError> {
        Ok(pool.reshape((
            self.n_kv_heads,
            self.num_blocks,
            self.block_size_tokens,
            self.head_dim,
        ))?)
    }

    /// Each block's bytes, [`KvCache::bytes_per_block`] long, in a fixed layout: layer-major;
    /// within a layer K then V, each `(block_size, n_kv_heads, head_dim)` row-major in the
    /// cache dtype, little-endian. Whole blocks travel, the unused tail of a partly filled
    /// last block included.
    pub fn export_blocks(&self, blocks: &[u32]) -> Result<Vec<Vec<u8>>, RuntimeError> {
        self.check_block_ids(blocks, "export")?;
        let mut out = vec![Vec::with_capacity(self.bytes_per_block()); blocks.len()];
        for layer in 0..self.n_layers() {
            for (block, part) in out.iter_mut().zip(self.export_layer(layer, blocks)?) {
                block.extend_from_slice(&part);
            }
        }
        Ok(out)
    }

    /// Bytes of one layer of one block, K then V: what [`KvCache::export_layer`] yields per
    /// block.
    pub fn layer_part_bytes(&self) -> usize {
        2 * self.layer_block_bytes()
    }

    /// One layer's part of [`KvCache::export_blocks`]: per block, that layer's K then V bytes.
    /// Part `l` of a block sits at byte `l * layer_part_bytes()` of its export, so the layers of
    /// a transfer can be sent as each is computed and put together on arrival.
    pub fn export_layer(&self, layer: usize, blocks: &[u32]) -> Result<Vec<Vec<u8>>, RuntimeError> {
        self.check_block_ids(blocks, "export")?;
        if layer >= self.n_layers() {
            return Err(RuntimeError::Invalid(format!(
                "export: layer {layer} out of range (the cache has {} layers)",
                self.n_layers()
            )));
        }
        let mut out = vec![Vec::with_capacity(self.layer_part_bytes()); blocks.len()];
        if blocks.is_empty() {
            return Ok(out);
        }
        let ids = Tensor::from_slice(blocks, blocks.len(), &self.device)?;
        let chunk = self.layer_block_bytes();
        for pool in [&self.k[layer], &self.v[layer]] {
            // (kv_heads, n, bs, head_dim) -> (n, bs, kv_heads, head_dim)
            let t = self
                .blocked(pool)?
                .index_select(&ids, 1)?
                .permute((1, 2, 0, 3))?
                .contiguous()?;
            let bytes = tensor_le_bytes(&t)?;
            for (block, part) in out.iter_mut().zip(bytes.chunks_exact(chunk)) {
                block.extend_from_slice(part);
            }
        }
        Ok(out)
    }

    /// [`KvCache::export_blocks`] without leaving the cache's device: one contiguous
    /// `(blocks, elems_per_block)` tensor in the cache dtype whose row `i` holds exactly the
    /// bytes that `export_blocks` gives for block `i`, so a transfer can stay in device memory
    /// and still be written to the wire unchanged. At least one block.
    pub fn export_blocks_tensor(&self, blocks: &[u32]) -> Result<Tensor, RuntimeError> {
        self.check_block_ids(blocks, "export")?;
        if blocks.is_empty() {
            return Err(RuntimeError::Invalid(
                "export: a device export needs at least one block".into(),
            ));
        }
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() && self.head_dim.is_multiple_of(8) {
            // One launch, not two copies per pool and a concatenation.
            let pools = self.layer_pools();
            return Ok(super::fused::gather_blocks(
                &pools,
                blocks,
                self.block_size_tokens,
            )?);
        }
        let n = blocks.len();
        let ids = Tensor::from_slice(blocks, n, &self.device)?;
        let row = self.layer_block_elems();
        let mut parts = Vec::with_capacity(2 * self.n_layers());
        for layer in 0..self.n_layers() {
            for pool in [&self.k[layer], &self.v[layer]] {
                // (kv_heads, n, bs, head_dim) -> (n, bs, kv_heads, head_dim), one row per block
                parts.push(
                    self.blocked(pool)?
                        .index_select(&ids, 1)?
                        .permute((1, 2, 0, 3))?
                        .contiguous()?
                        .reshape((n, row))?,
                );
            }
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Writes rows made by [`KvCache::export_blocks_tensor`] (from a cache of the same model,
    /// block size and dtype; on this cache's device) into the blocks `blocks`, pairwise.
    pub fn import_blocks_tensor(
        &mut self,
        blocks: &[u32],
        data: &Tensor,
    ) -> Result<(), RuntimeError> {
        self.check_block_ids(blocks, "import")?;
        let expected = [blocks.len(), self.elems_per_block()];
        if data.dims() != expected {
            return Err(RuntimeError::Invalid(format!(
                "import: device data of shape {:?} for {} blocks of {} elements",
                data.dims(),
                expected[0],
                expected[1]
            )));
        }
        if data.dtype() != self.dtype || !data.device().same_device(&self.device) {
            return Err(RuntimeError::Invalid(format!(
                "import: device data is {:?} on {:?}, the cache is {:?} on {:?}",
                data.dtype(),
                data.device().location(),
                self.dtype,
                self.device.location()
            )));
        }
        check_distinct(blocks)?;
        if blocks.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() && self.head_dim.is_multiple_of(8) {
            let pools = self.layer_pools();
            let rows = data.contiguous()?;
            return Ok(super::fused::scatter_blocks(
                &pools,
                blocks,
                &rows,
                self.block_size_tokens,
            )?);
        }
        let (n, bs, h, d) = (
            blocks.len(),
            self.block_size_tokens,
            self.n_kv_heads,
            self.head_dim,
        );
        let slots = self.slots_of(blocks)?;
        let parts = data.reshape((n, 2 * self.n_layers(), bs, h, d))?;
        for layer in 0..self.n_layers() {
            for (kind, pool) in [&self.k[layer], &self.v[layer]].into_iter().enumerate() {
                // (n, bs, kv_heads, head_dim) -> (kv_heads, n * bs, head_dim), one copy
                let t = parts
                    .narrow(1, layer * 2 + kind, 1)?
                    .squeeze(1)?
                    .permute((2, 0, 1, 3))?
                    .contiguous()?
                    .reshape((h, n * bs, d))?;
                pool.scatter_set(&slots, &t, 1)?;
            }
        }
        Ok(())
    }

    /// The scatter index of every slot of `blocks`, `(n_kv_heads, n * bs, head_dim)` u32.
    fn slots_of(&self, blocks: &[u32]) -> Result<Tensor, RuntimeError> {
        let (n, bs) = (blocks.len(), self.block_size_tokens);
        let slots: Vec<u32> = blocks
            .iter()
            .flat_map(|&b| (0..bs as u32).map(move |j| b * bs as u32 + j))
            .collect();
        let shape = (self.n_kv_heads, n * bs, self.head_dim);
        Ok(Tensor::from_vec(slots, (1, n * bs, 1), &self.device)?
            .broadcast_as(shape)?
            .contiguous()?)
    }

    /// Writes blocks exported by [`KvCache::export_blocks`] (from a cache of the same model,
    /// block size and dtype) into the blocks `blocks`, pairwise.
    pub fn import_blocks(&mut self, blocks: &[u32], data: &[Vec<u8>]) -> Result<(), RuntimeError> {
        if blocks.len() != data.len() {
            return Err(RuntimeError::Invalid(format!(
                "import: {} block ids for {} blocks of data",
                blocks.len(),
                data.len()
            )));
        }
        self.check_block_ids(blocks, "import")?;
        let expected = self.bytes_per_block();
        if let Some((b, d)) = blocks.iter().zip(data).find(|(_, d)| d.len() != expected) {
            return Err(RuntimeError::Invalid(format!(
                "import: data for block {b} is {} bytes, a block is {expected} bytes \
                 ({} layers, block size {}, {} kv heads x {} head_dim, {:?})",
                d.len(),
                self.n_layers(),
                self.block_size_tokens,
                self.n_kv_heads,
                self.head_dim,
                self.dtype
            )));
        }
        check_distinct(blocks)?;
        if blocks.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() && self.head_dim.is_multiple_of(8) {
            // One upload and one launch, not an upload and two copies per pool.
            let rows = Tensor::from_raw_buffer(
                &data.concat(),
                self.dtype,
                &[blocks.len(), self.elems_per_block()],
                &self.device,
            )?;
            return self.import_blocks_tensor(blocks, &rows);
        }
        let (n, bs) = (blocks.len(), self.block_size_tokens);
        let shape = (self.n_kv_heads, n * bs, self.head_dim);
        let slots = self.slots_of(blocks)?;
        let chunk = self.layer_block_bytes();
        let mut buf = Vec::with_capacity(n * chunk);
        for layer in 0..self.n_layers() {
            for (kind, pool) in [&self.k[layer], &self.v[layer]].into_iter().enumerate() {
                let offset = (layer * 2 + kind) * chunk;
                buf.clear();
                for d in data {
                    buf.extend_from_slice(&d[offset..offset + chunk]);
                }
                let dims = [n, bs, self.n_kv_heads, self.head_dim];
                // (n, bs, kv_heads, head_dim) -> (kv_heads, n * bs, head_dim)
                let t = Tensor::from_raw_buffer(&buf, self.dtype, &dims, &self.device)?
                    .permute((2, 0, 1, 3))?
                    .contiguous()?
                    .reshape(shape)?;
                pool.scatter_set(&slots, &t, 1)?;
            }
        }
        Ok(())
    }
}

/// Fails naming the first block id given twice.
fn check_distinct(blocks: &[u32]) -> Result<(), RuntimeError> {
    let mut sorted = blocks.to_vec();
    sorted.sort_unstable();
    match sorted.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(RuntimeError::Invalid(format!(
            "import: block id {} given twice",
            w[0]
        ))),
        None => Ok(()),
    }
}

/// A contiguous f32/f16/bf16 tensor's elements as little-endian bytes, on the host (copied
/// there from any device).
pub fn tensor_le_bytes(t: &Tensor) -> Result<Vec<u8>, RuntimeError> {
    fn encode<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * N);
        for &x in v {
            out.extend_from_slice(&f(x));
        }
        out
    }
    let t = t.to_device(&Device::Cpu)?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| RuntimeError::Invalid("export: tensor not contiguous".into()))?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(encode(&v[start..end], |x| x.to_le_bytes())),
        Storage::Cpu(CpuStorage::F16(v)) => Ok(encode(&v[start..end], |x| x.to_le_bytes())),
        Storage::Cpu(CpuStorage::BF16(v)) => Ok(encode(&v[start..end], |x| x.to_le_bytes())),
        _ => Err(RuntimeError::Invalid(format!(
            "export: dtype {:?} is not supported",
            t.dtype()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_spec() -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            n_layers: 3,
            hidden_size: 64,
            intermediate_size: 128,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 100,
            max_position_embeddings: 256,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
        }
    }

    fn spec_dtype(dtype: DType) -> crate::DType {
        match dtype {
            DType::F32 => crate::DType::F32,
            DType::F16 => crate::DType::F16,
            DType::BF16 => crate::DType::Bf16,
            other => panic!("no spec dtype for {other:?}"),
        }
    }

    #[test]
    fn block_bytes_per_token_equal_spec_kv_bytes_per_token() {
        let smollm = ModelSpec::preset("smollm2-135m").unwrap();
        for spec in [small_spec(), smollm] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let cache = KvCache::new(&spec, 3, 16, dtype, &Device::Cpu).unwrap();
                let exported = cache.export_blocks(&[2]).unwrap();
                assert_eq!(exported[0].len(), cache.bytes_per_block());
                assert_eq!(
                    (exported[0].len() / 16) as u64,
                    spec.kv_bytes_per_token(spec_dtype(dtype)),
                    "{} {dtype:?}",
                    spec.name
                );
            }
        }
    }

    /// Fills every slot of every pool with a distinct value so that misplaced bytes show.
    fn filled(cache: &KvCache, seed: f32) {
        for (l, (k, v)) in cache.k.iter().zip(&cache.v).enumerate() {
            for (kind, pool) in [k, v].into_iter().enumerate() {
                let n = pool.elem_count();
                let base = seed + (l * 2 + kind) as f32 * n as f32;
                let values = Tensor::arange(base, base + n as f32, &Device::Cpu)
                    .unwrap()
                    .reshape(pool.dims())
                    .unwrap()
                    .to_dtype(cache.dtype)
                    .unwrap();
                pool.slice_set(&values, 0, 0).unwrap();
            }
        }
    }

    #[test]
    fn export_layout_is_token_major_per_layer_k_then_v() {
        let spec = small_spec();
        let cache = KvCache::new(&spec, 4, 8, DType::F32, &Device::Cpu).unwrap();
        filled(&cache, 0.0);
        let block = 2u32;
        let bytes = &cache.export_blocks(&[block]).unwrap()[0];
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let bs = 8;
        let mut want = Vec::new();
        for layer in 0..3 {
            for pool in [&cache.k[layer], &cache.v[layer]] {
                // pool[head][slot][d]; the export walks slot, then head, then d.
                let pool = pool.to_vec3::<f32>().unwrap();
                for t in 0..bs {
                    for head in &pool {
                        want.extend_from_slice(&head[block as usize * bs + t]);
                    }
                }
            }
        }
        assert_eq!(floats, want);
    }

    #[test]
    fn import_writes_exported_blocks_under_other_ids() {
        let spec = small_spec();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let a = KvCache::new(&spec, 6, 4, dtype, &Device::Cpu).unwrap();
            filled(&a, 0.0);
            let mut b = KvCache::new(&spec, 5, 4, dtype, &Device::Cpu).unwrap();
            filled(&b, 0.5);
            let untouched = b.export_blocks(&[0, 2]).unwrap();
            let sent = a.export_blocks(&[5, 1, 3]).unwrap();
            b.import_blocks(&[4, 1, 3], &sent).unwrap();
            assert_eq!(b.export_blocks(&[4, 1, 3]).unwrap(), sent, "{dtype:?}");
            assert_eq!(b.export_blocks(&[0, 2]).unwrap(), untouched, "{dtype:?}");
        }
    }

    #[test]
    fn device_rows_hold_the_exported_bytes_and_import_back() {
        let spec = small_spec();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let a = KvCache::new(&spec, 6, 4, dtype, &Device::Cpu).unwrap();
            filled(&a, 0.0);
            let rows = a.export_blocks_tensor(&[5, 1, 3]).unwrap();
            assert_eq!(rows.dims(), &[3, a.elems_per_block()]);
            assert_eq!(rows.dtype(), dtype);
            let sent = a.export_blocks(&[5, 1, 3]).unwrap();
            assert_eq!(tensor_le_bytes(&rows).unwrap(), sent.concat(), "{dtype:?}");

            let mut b = KvCache::new(&spec, 5, 4, dtype, &Device::Cpu).unwrap();
            filled(&b, 0.5);
            let untouched = b.export_blocks(&[0, 2]).unwrap();
            b.import_blocks_tensor(&[4, 1, 3], &rows).unwrap();
            assert_eq!(b.export_blocks(&[4, 1, 3]).unwrap(), sent, "{dtype:?}");
            assert_eq!(b.export_blocks(&[0, 2]).unwrap(), untouched, "{dtype:?}");
        }
    }

    #[test]
    fn device_rows_of_another_shape_or_dtype_are_refused() {
        let spec = small_spec();
        let a = KvCache::new(&spec, 4, 4, DType::F32, &Device::Cpu).unwrap();
        let mut b = KvCache::new(&spec, 4, 4, DType::F32, &Device::Cpu).unwrap();
        let rows = a.export_blocks_tensor(&[0, 1]).unwrap();
        let msg = invalid(b.import_blocks_tensor(&[2], &rows));
        assert!(msg.contains("for 1 blocks"), "{msg}");
        let msg = invalid(b.import_blocks_tensor(&[2, 2], &rows));
        assert!(msg.contains("block id 2 given twice"), "{msg}");
        let msg = invalid(b.import_blocks_tensor(&[2, 3], &rows.to_dtype(DType::F16).unwrap()));
        assert!(msg.contains("F16"), "{msg}");
        let msg = invalid(a.export_blocks_tensor(&[]));
        assert!(msg.contains("at least one block"), "{msg}");
        let msg = invalid(a.export_blocks_tensor(&[4]));
        assert!(msg.contains("block id 4"), "{msg}");
    }

    fn invalid(r: Result<impl std::fmt::Debug, RuntimeError>) -> String {
        match r {
            Err(RuntimeError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn bad_ids_lengths_and_parameters_are_errors() {
        let spec = small_spec();
        let mut cache = KvCache::new(&spec, 4, 4, DType::F32, &Device::Cpu).unwrap();
        let msg = invalid(cache.export_blocks(&[1, 4]));
        assert!(msg.contains("block id 4"), "{msg}");
        let block = cache.export_blocks(&[1]).unwrap();
        let msg = invalid(cache.import_blocks(&[7], &block));
        assert!(msg.contains("block id 7"), "{msg}");
        let msg = invalid(cache.import_blocks(&[0, 1], &block));
        assert!(msg.contains("2 block ids for 1"), "{msg}");
        let short = vec![block[0][..100].to_vec()];
        let msg = invalid(cache.import_blocks(&[0], &short));
        assert!(msg.contains("block 0 is 100 bytes"), "{msg}");
        let twice = vec![block[0].clone(), block[0].clone()];
        let msg = invalid(cache.import_blocks(&[2, 2], &twice));
        assert!(msg.contains("block id 2 given twice"), "{msg}");
        assert!(cache.export_blocks(&[]).unwrap().is_empty());
        cache.import_blocks(&[], &[]).unwrap();
        invalid(KvCache::new(&spec, 0, 4, DType::F32, &Device::Cpu));
        invalid(KvCache::new(&spec, 4, 0, DType::F32, &Device::Cpu));
        let msg = invalid(KvCache::new(&spec, 4, 4, DType::U8, &Device::Cpu));
        assert!(msg.contains("U8"), "{msg}");
    }
}
