//! A model, its paged KV cache, and the simulator's block manager deciding which blocks each
//! sequence owns: the same allocation, prefix caching and LRU eviction the simulator runs,
//! applied to real KV.
//!
//! Sequences are prefilled (in chunks or whole) and decoded in mixed batches; a sequence's KV
//! can be exported as its blocks (bytes plus chained block hashes) and imported into another
//! instance, which reuses whatever prefix it already holds and receives only the rest.

use models::runtime::{Model, RuntimeError, SeqInput, Tensor};
use sim::kv::{
    BlockHash, BlockId, BlockManager, KvError, KvEvent, ROOT_HASH, chain, digest_tokens,
};
use std::collections::BTreeMap;

mod device_blocks;
pub use device_blocks::DeviceBlocks;

pub type SeqId = u64;

#[derive(Debug, thiserror::Error)]
pub enum PagedError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("KV cache full: {0}")]
    Blocks(#[from] KvError),
    #[error("no sequence {0}")]
    UnknownSequence(SeqId),
    #[error("{0}")]
    Invalid(String),
}

/// A sequence's KV, as it leaves one instance for another.
#[derive(Clone, Debug, PartialEq)]
pub struct KvExport {
    /// Every token of the sequence; the KV of the first `kv_len` is in the blocks.
    pub tokens: Vec<u32>,
    pub kv_len: usize,
    /// Hashes of the sequence's full blocks (of the first `kv_len` tokens).
    pub block_hashes: Vec<BlockHash>,
    /// Index of the first block carried: the receiver already holds those before it.
    pub first_block: usize,
    /// Bytes of blocks `first_block..`, in the cache's export layout; one empty entry per
    /// block when the bytes are in `device` (or were streamed layer by layer).
    pub blocks: Vec<Vec<u8>>,
    /// The same blocks left in device memory, when the exporter kept them there.
    pub device: Option<DeviceBlocks>,
}

impl KvExport {
    pub fn payload_bytes(&self) -> usize {
        match &self.device {
            Some(d) => d.payload_bytes(),
            None => self.blocks.iter().map(Vec::len).sum(),
        }
    }

    /// Bytes of each carried block (0 when none is carried).
    pub fn bytes_per_block(&self) -> usize {
        match &self.device {
            Some(d) => d.bytes_per_block(),
            None => self.blocks.first().map_or(0, Vec::len),
        }
    }
}

struct Sequence {
    tokens: Vec<u32>,
    /// Tokens whose KV is in the cache.
    kv_len: usize,
    blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks of `tokens` computed so far.
    hashes: Vec<BlockHash>,
    /// Leading blocks already registered in the prefix cache.
    committed: usize,
}

/// One model instance with its KV pool and block manager.
pub struct PagedModel {
    model: Model,
    cache: models::runtime::KvCache,
    blocks: BlockManager,
    block_size: usize,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: SeqId,
}

/// What an export carries.
enum Payload {
    /// The blocks' bytes in host memory.
    Host,
    /// The blocks left on the model's device.
    Device,
    /// No bytes (they were streamed).
    None,
}

/// Writes the export's carried blocks from the `skip`-th on into `ids` (as many), from host
/// bytes or from device rows (moved to the cache's device first if they live elsewhere).
fn write_payload(
    cache: &mut models::runtime::KvCache,
    ids: &[u32],
    export: &KvExport,
    skip: usize,
) -> Result<(), PagedError> {
    let Some(device) = &export.device else {
        return Ok(cache.import_blocks(ids, &export.blocks[skip..])?);
    };
    if device.n_blocks() != export.blocks.len() {
        return Err(PagedError::Invalid(format!(
            "the transfer names {} blocks but holds {} in device memory",
            export.blocks.len(),
            device.n_blocks()
        )));
    }
    if ids.is_empty() {
        return Ok(());
    }
    let rows = device.narrow(skip, ids.len())?;
    let rows = rows
        .rows()
        .to_device(cache.device())
        .map_err(RuntimeError::from)?;
    cache.import_blocks_tensor(ids, &rows)?;
    // The rows may be dropped, and so freed, on another thread's stream, which nothing orders
    // after this one's: the import completes first.
    cache.device().synchronize().map_err(RuntimeError::from)?;
    Ok(())
}

/// Chained hashes of the full blocks of `tokens`, extending `hashes` (which covers a prefix).
fn extend_hashes(hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = hashes.last().copied().unwrap_or(ROOT_HASH);
        hashes.push(chain(
            parent,
            digest_tokens(&tokens[i * block_size..(i + 1) * block_size]),
        ));
    }
}

impl PagedModel {
    pub fn new(
        model: Model,
        num_blocks: u32,
        block_size_tokens: u32,
        prefix_caching: bool,
    ) -> Result<PagedModel, PagedError> {
        let cache = models::runtime::KvCache::new(
            model.spec(),
            num_blocks as usize,
            block_size_tokens as usize,
            model.dtype(),
            model.device(),
        )?;
        Ok(PagedModel {
            model,
            cache,
            blocks: BlockManager::new(num_blocks, prefix_caching),
            block_size: block_size_tokens as usize,
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// Decode step shapes its cache holds recorded as CUDA graphs.
    pub fn recorded_graphs(&self) -> usize {
        self.cache.recorded_graphs()
    }

    /// Records the CUDA graphs of the steps these limits allow (see
    /// [`Model::record_graphs`]); returns the number the cache holds.
    pub fn record_graphs(
        &mut self,
        max_seqs: usize,
        max_tokens: usize,
        max_context: usize,
    ) -> Result<usize, PagedError> {
        Ok(self
            .model
            .record_graphs(&mut self.cache, max_seqs, max_tokens, max_context)?)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    /// Stored/Removed events of the prefix cache since the last call.
    pub fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        self.blocks.drain_events(out);
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence, PagedError> {
        self.seqs.get(&id).ok_or(PagedError::UnknownSequence(id))
    }

    /// Admits a prompt: allocates its blocks, reusing the longest cached prefix. Returns the
    /// sequence and how many prompt tokens need no prefill (at least the last is recomputed,
    /// for its logits).
    pub fn admit(&mut self, prompt: &[u32]) -> Result<(SeqId, usize), PagedError> {
        if prompt.is_empty() {
            return Err(PagedError::Invalid("empty prompt".into()));
        }
        let mut hashes = Vec::new();
        extend_hashes(&mut hashes, prompt, self.block_size);
        let allocation = self
            .blocks
            .allocate(&hashes, prompt.len().div_ceil(self.block_size))?;
        let cached = (allocation.cached_blocks * self.block_size).min(prompt.len() - 1);
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Sequence {
                tokens: prompt.to_vec(),
                kv_len: cached,
                blocks: allocation.blocks,
                hashes,
                committed: allocation.cached_blocks,
            },
        );
        Ok((id, cached))
    }

    /// Tokens of a sequence still waiting for their KV (prefill left, or the last sampled
    /// token).
    pub fn pending_tokens(&self, id: SeqId) -> Result<usize, PagedError> {
        let s = self.seq(id)?;
        Ok(s.tokens.len() - s.kv_len)
    }

    pub fn tokens(&self, id: SeqId) -> Result<&[u32], PagedError> {
        Ok(&self.seq(id)?.tokens)
    }

    /// Appends a sampled token; its KV is computed by the sequence's next step.
    pub fn push_token(&mut self, id: SeqId, token: u32) -> Result<(), PagedError> {
        self.seqs
            .get_mut(&id)
            .ok_or(PagedError::UnknownSequence(id))?
            .tokens
            .push(token);
        Ok(())
    }

    /// One batched forward step: each `(sequence, max_tokens)` feeds up to `max_tokens` of its
    /// pending tokens (a prefill chunk, or one decode token). Returns the logits of each
    /// sequence's last fed token, (batch, vocab) f32, in `work` order. Blocks are grown from
    /// the block manager first; when it has none, nothing runs and the error says so.
    pub fn step(&mut self, work: &[(SeqId, usize)]) -> Result<Tensor, PagedError> {
        self.step_streaming(work, &[], &mut |_, _, _| {})
    }

    /// [`PagedModel::step`], exporting layer by layer, as each is computed, the KV of the
    /// sequences in `stream` (`(sequence, first block)`: blocks from there to the end of the
    /// step's KV): `on_layer(i, layer, blocks)` gets layer `layer` of `stream[i]`'s blocks in
    /// [`models::runtime::KvCache::export_layer`]'s layout.
    pub fn step_streaming(
        &mut self,
        work: &[(SeqId, usize)],
        stream: &[(SeqId, usize)],
        on_layer: &mut dyn FnMut(usize, usize, Vec<Vec<u8>>),
    ) -> Result<Tensor, PagedError> {
        let bs = self.block_size;
        let mut feeds = Vec::with_capacity(work.len());
        for &(id, max_tokens) in work {
            let seq = self
                .seqs
                .get_mut(&id)
                .ok_or(PagedError::UnknownSequence(id))?;
            let n = (seq.tokens.len() - seq.kv_len).min(max_tokens);
            if n == 0 {
                return Err(PagedError::Invalid(format!(
                    "sequence {id} has no pending token"
                )));
            }
            while seq.blocks.len() * bs < seq.kv_len + n {
                self.blocks.append(&mut seq.blocks)?;
            }
            feeds.push(n);
        }
        let inputs: Vec<SeqInput> = work
            .iter()
            .zip(&feeds)
            .map(|(&(id, _), &n)| {
                let seq = &self.seqs[&id];
                SeqInput {
                    tokens: &seq.tokens[seq.kv_len..seq.kv_len + n],
                    start_pos: seq.kv_len,
                    block_table: &seq.blocks,
                }
            })
            .collect();
        // The blocks each streamed sequence's KV will fill once the step has run.
        let mut streamed = Vec::with_capacity(stream.len());
        for &(id, first_block) in stream {
            let seq = self.seq(id)?;
            let fed = work
                .iter()
                .zip(&feeds)
                .find(|((w, _), _)| *w == id)
                .map_or(0, |(_, &n)| n);
            let used = (seq.kv_len + fed).div_ceil(bs);
            if first_block > used {
                return Err(PagedError::Invalid(format!(
                    "sequence {id} will have {used} blocks of KV; cannot stream from block {first_block}"
                )));
            }
            streamed.push(seq.blocks[first_block..used].to_vec());
        }
        // Without an observer a GPU step may replay a recorded graph.
        let logits = match streamed.is_empty() {
            true => self.model.forward(&mut self.cache, &inputs),
            false => self
                .model
                .forward_observed(&mut self.cache, &inputs, &mut |layer, cache| {
                    for (i, blocks) in streamed.iter().enumerate() {
                        let parts = cache
                            .export_layer(layer, blocks)
                            .map_err(|e| e.during("exporting a layer's KV"))?;
                        on_layer(i, layer, parts);
                    }
                    Ok(())
                }),
        }
        .map_err(|e| e.during("forward pass"))?;
        for (&(id, _), &n) in work.iter().zip(&feeds) {
            let seq = self.seqs.get_mut(&id).expect("checked above");
            seq.kv_len += n;
            self.commit(id);
        }
        Ok(logits)
    }

    /// Registers the sequence's newly full blocks in the prefix cache.
    fn commit(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("live sequence");
        let full = seq.kv_len / self.block_size;
        extend_hashes(&mut seq.hashes, &seq.tokens[..seq.kv_len], self.block_size);
        self.blocks.commit_all(
            &seq.blocks[seq.committed..full],
            &seq.hashes[seq.committed..full],
        );
        seq.committed = full;
    }

    /// Frees a sequence's blocks; its full blocks stay in the prefix cache until evicted.
    pub fn release(&mut self, id: SeqId) -> Result<(), PagedError> {
        let seq = self
            .seqs
            .remove(&id)
            .ok_or(PagedError::UnknownSequence(id))?;
        self.blocks.free(&seq.blocks);
        Ok(())
    }

    /// How many leading blocks of a sequence with these full-block hashes this instance holds
    /// (what an exporter may skip).
    pub fn cached_prefix_blocks(&self, block_hashes: &[BlockHash]) -> usize {
        self.blocks.cached_prefix(block_hashes)
    }

    /// The sequence's KV from block `first_block` on (the receiver holds the ones before).
    pub fn export(&self, id: SeqId, first_block: usize) -> Result<KvExport, PagedError> {
        self.export_with(id, first_block, Payload::Host)
    }

    /// [`PagedModel::export`] without the bytes: one empty block per block, for a transfer
    /// whose layers were streamed during the step that computed them.
    pub fn export_header(&self, id: SeqId, first_block: usize) -> Result<KvExport, PagedError> {
        self.export_with(id, first_block, Payload::None)
    }

    /// [`PagedModel::export`] with the bytes left on the model's device
    /// ([`KvExport::device`]): a GPU transport moves them from there.
    pub fn export_device(&self, id: SeqId, first_block: usize) -> Result<KvExport, PagedError> {
        self.export_with(id, first_block, Payload::Device)
    }

    /// The export a transfer to another worker sends: on a GPU, [`PagedModel::export_device`]
    /// (gathered there; the transport copies the bytes out, off the caller's thread), else
    /// [`PagedModel::export`].
    pub fn export_for_transfer(
        &self,
        id: SeqId,
        first_block: usize,
    ) -> Result<KvExport, PagedError> {
        match self.model.device().is_cuda() {
            true => self.export_device(id, first_block),
            false => self.export(id, first_block),
        }
    }

    fn export_with(
        &self,
        id: SeqId,
        first_block: usize,
        payload: Payload,
    ) -> Result<KvExport, PagedError> {
        let seq = self.seq(id)?;
        let used = seq.kv_len.div_ceil(self.block_size);
        if first_block > used {
            return Err(PagedError::Invalid(format!(
                "sequence {id} has {used} blocks of KV; cannot start at block {first_block}"
            )));
        }
        let ids = &seq.blocks[first_block..used];
        let (blocks, device) = match payload {
            Payload::Host => (self.cache.export_blocks(ids)?, None),
            Payload::Device if !ids.is_empty() => (
                vec![Vec::new(); ids.len()],
                Some(DeviceBlocks::new(self.cache.export_blocks_tensor(ids)?)?),
            ),
            Payload::Device | Payload::None => (vec![Vec::new(); ids.len()], None),
        };
        let full = seq.kv_len / self.block_size;
        Ok(KvExport {
            tokens: seq.tokens.clone(),
            kv_len: seq.kv_len,
            block_hashes: seq.hashes[..full].to_vec(),
            first_block,
            blocks,
            device,
        })
    }

    /// Fills an admitted sequence with the KV another instance computed for its prompt: the
    /// blocks this instance found cached at admission stay, the rest are written from the
    /// payload, which must start no later than they end. `export` must cover exactly the
    /// sequence's tokens; tokens it carries beyond them (sampled by the exporter) are not
    /// taken: the caller pushes them as it does its own samples.
    pub fn import_into(&mut self, id: SeqId, export: &KvExport) -> Result<(), PagedError> {
        let bs = self.block_size;
        let seq = self.seq(id)?;
        let used = export.kv_len.div_ceil(bs);
        let consistent = export.kv_len == seq.tokens.len()
            && export.tokens.len() >= export.kv_len
            && export.tokens[..export.kv_len] == seq.tokens[..]
            && export.block_hashes.len() == export.kv_len / bs
            && export.first_block + export.blocks.len() == used
            && seq.blocks.len() >= used;
        if !consistent {
            return Err(PagedError::Invalid(format!(
                "the transfer does not continue sequence {id} of {} tokens: it has {} tokens, {} with KV, blocks {}..{}",
                seq.tokens.len(),
                export.tokens.len(),
                export.kv_len,
                export.first_block,
                export.first_block + export.blocks.len()
            )));
        }
        let have = seq.committed;
        if export.first_block > have {
            return Err(PagedError::Invalid(format!(
                "the transfer starts at block {} but sequence {id} holds only {have} leading blocks",
                export.first_block
            )));
        }
        let mut hashes = Vec::new();
        extend_hashes(&mut hashes, &export.tokens[..export.kv_len], bs);
        if hashes != export.block_hashes {
            return Err(PagedError::Invalid(format!(
                "the transfer's block hashes do not match the tokens of sequence {id}"
            )));
        }
        let skip = have - export.first_block;
        let seq = self.seqs.get_mut(&id).expect("checked above");
        write_payload(&mut self.cache, &seq.blocks[have..used], export, skip)?;
        seq.kv_len = export.kv_len;
        self.commit(id);
        Ok(())
    }

    /// A sequence from another instance's export: reuses the prefix this instance holds and
    /// writes the rest from the payload, which must start no later than that prefix ends.
    pub fn import(&mut self, export: &KvExport) -> Result<SeqId, PagedError> {
        let bs = self.block_size;
        let used = export.kv_len.div_ceil(bs);
        if export.kv_len > export.tokens.len()
            || export.block_hashes.len() != export.kv_len / bs
            || export.first_block + export.blocks.len() != used
        {
            return Err(PagedError::Invalid(format!(
                "inconsistent export: {} tokens, {} with KV, {} hashes, blocks {}..{}",
                export.tokens.len(),
                export.kv_len,
                export.block_hashes.len(),
                export.first_block,
                export.first_block + export.blocks.len()
            )));
        }
        let allocation = self.blocks.allocate(&export.block_hashes, used)?;
        let have = allocation.cached_blocks;
        if export.first_block > have {
            self.blocks.free(&allocation.blocks);
            return Err(PagedError::Invalid(format!(
                "export starts at block {} but only {have} leading blocks are cached here",
                export.first_block
            )));
        }
        let skip = have - export.first_block;
        if let Err(e) = write_payload(&mut self.cache, &allocation.blocks[have..], export, skip) {
            self.blocks.free(&allocation.blocks);
            return Err(e);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Sequence {
                tokens: export.tokens.clone(),
                kv_len: export.kv_len,
                blocks: allocation.blocks,
                hashes: export.block_hashes.clone(),
                committed: have,
            },
        );
        self.commit(id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::ModelSpec;
    use models::runtime::{Device, TensorDType, Weights};

    fn tiny() -> Model {
        let spec = ModelSpec {
            name: "tiny".into(),
            n_layers: 2,
            hidden_size: 64,
            intermediate_size: 128,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 97,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
        };
        // Larger weights than the N(0, 0.02) default would give near-uniform logits.
        let w = Weights::random(&spec, TensorDType::F32, &Device::Cpu, 5).unwrap();
        Model::new(scale(w, 12.0)).unwrap()
    }

    fn scale(mut w: Weights, by: f64) -> Weights {
        let s = |t: &Tensor| (t * by).unwrap();
        w.embed = s(&w.embed);
        w.lm_head = s(&w.lm_head);
        for l in &mut w.layers {
            l.wq = s(&l.wq);
            l.wk = s(&l.wk);
        }
        w
    }

    fn argmax(logits: &Tensor, row: usize) -> u32 {
        models::runtime::argmax(&logits.get(row).unwrap().to_vec1::<f32>().unwrap())
    }

    /// Prefills `id` whole, then decodes `n` greedy tokens; returns them.
    fn run(m: &mut PagedModel, id: SeqId, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let pending = m.pending_tokens(id).unwrap();
        let mut logits = m.step(&[(id, pending)]).unwrap();
        for _ in 0..n {
            let t = argmax(&logits, 0);
            out.push(t);
            m.push_token(id, t).unwrap();
            logits = m.step(&[(id, 1)]).unwrap();
        }
        out
    }

    #[test]
    fn prefix_cache_hits_skip_prefill_and_give_the_same_tokens() {
        let prompt: Vec<u32> = (0..40).map(|i| (i * 7 % 97) as u32).collect();
        let mut m = PagedModel::new(tiny(), 64, 16, true).unwrap();
        let (a, cached) = m.admit(&prompt).unwrap();
        assert_eq!(cached, 0);
        let first = run(&mut m, a, 12);
        m.release(a).unwrap();
        let (b, cached) = m.admit(&prompt).unwrap();
        assert_eq!(cached, 32, "two full blocks of the prompt are reused");
        assert_eq!(m.pending_tokens(b).unwrap(), 8);
        assert_eq!(run(&mut m, b, 12), first);
    }

    #[test]
    fn export_then_import_continues_as_if_uninterrupted() {
        let prompt: Vec<u32> = (0..37).map(|i| (i * 5 % 97) as u32).collect();
        let mut whole = PagedModel::new(tiny(), 64, 16, true).unwrap();
        let (id, _) = whole.admit(&prompt).unwrap();
        let expected = run(&mut whole, id, 24);

        let mut prefill = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let (p, _) = prefill.admit(&prompt).unwrap();
        let pending = prefill.pending_tokens(p).unwrap();
        let logits = prefill.step(&[(p, pending)]).unwrap();
        let first = argmax(&logits, 0);
        prefill.push_token(p, first).unwrap();

        let mut decode = PagedModel::new(tiny(), 48, 16, true).unwrap();
        // Another sequence already resident, so the import lands on other block ids.
        let (_other, _) = decode
            .admit(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17])
            .unwrap();
        let export = prefill.export(p, 0).unwrap();
        assert_eq!(export.blocks.len(), 3);
        assert_eq!(
            export.payload_bytes(),
            3 * 16
                * prefill
                    .model()
                    .spec()
                    .kv_bytes_per_token(models::DType::F32) as usize
        );
        let d = decode.import(&export).unwrap();
        let mut out = vec![first];
        let mut logits = decode.step(&[(d, 1)]).unwrap();
        for _ in 1..24 {
            let t = argmax(&logits, 0);
            out.push(t);
            decode.push_token(d, t).unwrap();
            logits = decode.step(&[(d, 1)]).unwrap();
        }
        assert_eq!(out, expected);
    }

    #[test]
    fn a_device_export_carries_the_host_bytes_and_imports_the_same() {
        let prompt: Vec<u32> = (0..45).map(|i| (i * 3 % 97) as u32).collect();
        let mut prefill = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let (p, _) = prefill.admit(&prompt).unwrap();
        let n = prefill.pending_tokens(p).unwrap();
        let first = argmax(&prefill.step(&[(p, n)]).unwrap(), 0);
        prefill.push_token(p, first).unwrap();

        let host = prefill.export(p, 0).unwrap();
        let device = prefill.export_device(p, 0).unwrap();
        let rows = device.device.as_ref().expect("rows left on the device");
        assert_eq!(rows.to_host_blocks().unwrap(), host.blocks);
        assert_eq!(device.blocks, vec![Vec::<u8>::new(); 3]);
        assert_eq!(device.payload_bytes(), host.payload_bytes());
        assert_eq!(device.bytes_per_block(), host.bytes_per_block());
        let none = prefill.export_device(p, 3).unwrap();
        assert!(none.device.is_none() && none.blocks.is_empty());

        let continue_from = |export: &KvExport, reserve: bool| -> Vec<u32> {
            let mut decode = PagedModel::new(tiny(), 24, 16, true).unwrap();
            let d = if reserve {
                let (d, _) = decode.admit(&prompt).unwrap();
                decode.import_into(d, export).unwrap();
                decode.push_token(d, first).unwrap();
                d
            } else {
                decode.import(export).unwrap()
            };
            let mut out = Vec::new();
            let mut logits = decode.step(&[(d, 1)]).unwrap();
            for _ in 0..6 {
                let t = argmax(&logits, 0);
                out.push(t);
                decode.push_token(d, t).unwrap();
                logits = decode.step(&[(d, 1)]).unwrap();
            }
            out
        };
        let expected = continue_from(&host, false);
        assert_eq!(continue_from(&device, false), expected);
        assert_eq!(continue_from(&device, true), expected);

        let mut short = device.clone();
        short.device = Some(rows.narrow(0, 2).unwrap());
        let mut decode = PagedModel::new(tiny(), 24, 16, true).unwrap();
        let err = decode.import(&short).unwrap_err().to_string();
        assert!(err.contains("names 3 blocks but holds 2"), "{err}");
    }

    #[test]
    fn a_prefix_the_importer_holds_is_not_sent_again() {
        let system: Vec<u32> = (0..32).map(|i| (i * 3 % 97) as u32).collect();
        let mut turn = system.clone();
        turn.extend((0..20).map(|i| (i * 11 % 97) as u32));

        let mut prefill = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let mut decode = PagedModel::new(tiny(), 32, 16, true).unwrap();
        // The decode instance computed the shared system prompt earlier.
        let (s, _) = decode.admit(&system).unwrap();
        let n = decode.pending_tokens(s).unwrap();
        decode.step(&[(s, n)]).unwrap();
        decode.release(s).unwrap();

        let (p, _) = prefill.admit(&turn).unwrap();
        let n = prefill.pending_tokens(p).unwrap();
        let first = argmax(&prefill.step(&[(p, n)]).unwrap(), 0);
        prefill.push_token(p, first).unwrap();
        let hashes = prefill.export(p, 0).unwrap().block_hashes;
        let have = decode.cached_prefix_blocks(&hashes);
        assert_eq!(
            have, 2,
            "both system-prompt blocks are cached on the decode side"
        );
        let suffix = prefill.export(p, have).unwrap();
        assert_eq!(suffix.blocks.len(), 2, "only the turn's blocks travel");
        let d = decode.import(&suffix).unwrap();

        let mut reference = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let (r, _) = reference.admit(&turn).unwrap();
        let expected = run(&mut reference, r, 10);
        let mut continued = vec![first];
        let mut logits = decode.step(&[(d, 1)]).unwrap();
        for _ in 1..10 {
            let t = argmax(&logits, 0);
            continued.push(t);
            decode.push_token(d, t).unwrap();
            logits = decode.step(&[(d, 1)]).unwrap();
        }
        assert_eq!(continued, expected);
    }
    #[test]
    fn import_into_fills_a_reserved_sequence_around_its_cached_prefix() {
        let system: Vec<u32> = (0..32).map(|i| (i * 5 % 89) as u32).collect();
        let mut turn = system.clone();
        turn.extend((0..21).map(|i| (i * 7 % 89) as u32));

        let mut prefill = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let mut decode = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let (s, _) = decode.admit(&system).unwrap();
        let n = decode.pending_tokens(s).unwrap();
        decode.step(&[(s, n)]).unwrap();
        decode.release(s).unwrap();
        // The decode side reserves the turn first: its cached system prompt is pinned.
        let (d, cached) = decode.admit(&turn).unwrap();
        assert_eq!(cached, 32);

        let (p, _) = prefill.admit(&turn).unwrap();
        let n = prefill.pending_tokens(p).unwrap();
        let first = argmax(&prefill.step(&[(p, n)]).unwrap(), 0);
        prefill.push_token(p, first).unwrap();
        // A payload starting after the reserved prefix would leave a hole.
        let too_late = prefill.export(p, 3).unwrap();
        assert!(decode.import_into(d, &too_late).is_err());
        let mut other = prefill.export(p, 2).unwrap();
        other.tokens[40] ^= 1;
        assert!(decode.import_into(d, &other).is_err(), "tokens differ");
        decode
            .import_into(d, &prefill.export(p, 2).unwrap())
            .unwrap();
        assert_eq!(
            decode.pending_tokens(d).unwrap(),
            0,
            "the whole prompt has its KV"
        );
        decode.push_token(d, first).unwrap();

        let mut reference = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let (r, _) = reference.admit(&turn).unwrap();
        let expected = run(&mut reference, r, 8);
        let mut continued = vec![first];
        let mut logits = decode.step(&[(d, 1)]).unwrap();
        for _ in 1..8 {
            let t = argmax(&logits, 0);
            continued.push(t);
            decode.push_token(d, t).unwrap();
            logits = decode.step(&[(d, 1)]).unwrap();
        }
        assert_eq!(continued, expected);
    }

    #[test]
    fn layers_streamed_during_a_step_make_up_its_export() {
        let mut m = PagedModel::new(tiny(), 32, 16, true).unwrap();
        let prompt: Vec<u32> = (0..40).map(|i| (i * 7 % 89) as u32).collect();
        let (s, _) = m.admit(&prompt).unwrap();
        let n = m.pending_tokens(s).unwrap();
        let mut layers: Vec<Vec<Vec<u8>>> = Vec::new();
        m.step_streaming(&[(s, n)], &[(s, 1)], &mut |i, layer, parts| {
            assert_eq!((i, layer), (0, layers.len()));
            layers.push(parts);
        })
        .unwrap();
        assert_eq!(layers.len(), 2);
        let export = m.export(s, 1).unwrap();
        assert_eq!(export.blocks.len(), 2);
        for (b, block) in export.blocks.iter().enumerate() {
            let streamed: Vec<u8> = layers.iter().flat_map(|l| l[b].clone()).collect();
            assert_eq!(&streamed, block);
        }
        let header = m.export_header(s, 1).unwrap();
        assert_eq!(header.blocks, vec![Vec::<u8>::new(); 2]);
        assert_eq!(header.tokens, export.tokens);
    }
}
