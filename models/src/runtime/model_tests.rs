//! The forward pass against candle-transformers' Llama, batched against alone, chunked against
//! one-shot, and KV moved between instances against an uninterrupted run.

use super::*;
use crate::runtime::{RopeStyle, argmax};
use candle_transformers::models::llama as reference;
use std::collections::HashMap;

/// Largest logit difference allowed, relative to the largest reference logit (f32 throughout;
/// what remains is summation order).
const TOL: f32 = 1e-4;

fn small_spec() -> ModelSpec {
    ModelSpec {
        name: "tiny".into(),
        n_layers: 3,
        hidden_size: 128,
        intermediate_size: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        vocab_size: 384,
        max_position_embeddings: 512,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
    }
}

/// Seeded random weights with norms away from 1 and Q/K scaled up so that attention is peaked
/// and a wrong position, mask or block shows in the logits.
fn test_weights(spec: &ModelSpec, seed: u64) -> Weights {
    let dev = Device::Cpu;
    let mut w = Weights::random(spec, DType::F32, &dev, seed).unwrap();
    let h = spec.hidden_size as usize;
    let norm = |phase: f64| -> Tensor {
        Tensor::arange(0u32, h as u32, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(0.7, phase)
            .unwrap()
            .sin()
            .unwrap()
            .affine(0.3, 1.0)
            .unwrap()
    };
    for (i, l) in w.layers.iter_mut().enumerate() {
        l.attn_norm = norm(i as f64);
        l.ffn_norm = norm(i as f64 + 0.5);
        l.wq = l.wq.affine(4.0, 0.0).unwrap();
        l.wk = l.wk.affine(4.0, 0.0).unwrap();
    }
    w.norm = norm(-1.0);
    w
}

fn reference_model(w: &Weights) -> reference::Llama {
    let s = &w.spec;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    map.insert("model.embed_tokens.weight".into(), w.embed.clone());
    map.insert("model.norm.weight".into(), w.norm.clone());
    if !s.tie_word_embeddings {
        map.insert("lm_head.weight".into(), w.lm_head.clone());
    }
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, t) in [
            ("input_layernorm", &l.attn_norm),
            ("post_attention_layernorm", &l.ffn_norm),
            ("self_attn.q_proj", &l.wq),
            ("self_attn.k_proj", &l.wk),
            ("self_attn.v_proj", &l.wv),
            ("self_attn.o_proj", &l.wo),
            ("mlp.gate_proj", &l.w_gate),
            ("mlp.up_proj", &l.w_up),
            ("mlp.down_proj", &l.w_down),
        ] {
            map.insert(format!("{p}.{name}.weight"), t.clone());
        }
    }
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    reference::Llama::load(vb, &reference_config(s)).unwrap()
}

fn reference_config(s: &ModelSpec) -> reference::Config {
    reference::Config {
        hidden_size: s.hidden_size as usize,
        intermediate_size: s.intermediate_size as usize,
        vocab_size: s.vocab_size as usize,
        num_hidden_layers: s.n_layers as usize,
        num_attention_heads: s.n_heads as usize,
        num_key_value_heads: s.n_kv_heads as usize,
        use_flash_attn: false,
        rms_norm_eps: s.rms_norm_eps,
        rope_theta: s.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: s.max_position_embeddings as usize,
        tie_word_embeddings: s.tie_word_embeddings,
    }
}

/// `n` deterministic token ids spread over the vocabulary.
fn prompt(n: usize, salt: u32, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + salt * 101 + 11) % vocab)
        .collect()
}

/// `count` distinct block ids out of `num_blocks`, in a scattered order.
fn scattered(num_blocks: u32, count: usize, stride: u32) -> Vec<u32> {
    let ids: Vec<u32> = (0..count as u32)
        .map(|i| (i * stride + 5) % num_blocks)
        .collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), count, "stride must be coprime to num_blocks");
    ids
}

/// max |a - b| / max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Prefill and `steps` greedy decodes in the reference and in ours (paged over a scattered
/// block table); every step's logits agree.
fn compare_with_reference(spec: &ModelSpec, block_size: usize, prompt_len: usize, steps: usize) {
    let w = test_weights(spec, 3);
    let reference = reference_model(&w);
    let model = Model::new(w).unwrap();
    let dev = Device::Cpu;
    let mut ref_cache =
        reference::Cache::new(true, DType::F32, &reference_config(spec), &dev).unwrap();
    let total = prompt_len + steps;
    let num_blocks = total.div_ceil(block_size) as u32 * 3 + 1;
    let table = scattered(num_blocks, total.div_ceil(block_size), 7);
    let mut cache = KvCache::new(spec, num_blocks as usize, block_size, DType::F32, &dev).unwrap();

    let mut new_tokens = prompt(prompt_len, 1, spec.vocab_size);
    let mut pos = 0;
    let mut worst = 0f32;
    for step in 0..=steps {
        let input = Tensor::new(&new_tokens[..], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = reference.forward(&input, pos, &mut ref_cache).unwrap();
        let want = want.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let seq = SeqInput {
            tokens: &new_tokens,
            start_pos: pos,
            block_table: &table,
        };
        let got = model.forward(&mut cache, &[seq]).unwrap();
        assert_eq!(got.dims(), &[1, spec.vocab_size as usize]);
        let got = got.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let d = rel_diff(&got, &want);
        assert!(d <= TOL, "step {step}: relative logit difference {d}");
        worst = worst.max(d);
        pos += new_tokens.len();
        new_tokens = vec![argmax(&want)];
    }
    eprintln!("{}: worst relative logit difference {worst:e}", spec.name);
}

#[test]
fn logits_match_candle_llama_small() {
    compare_with_reference(&small_spec(), 4, 13, 8);
}

#[test]
fn logits_match_candle_llama_smollm2_shape() {
    compare_with_reference(&ModelSpec::preset("smollm2-135m").unwrap(), 16, 29, 5);
}

/// llama.cpp's layout: Q and K rows permuted within each head so that rotated pairs are
/// adjacent, run with interleaved RoPE, gives the same model.
#[test]
fn interleaved_rope_on_permuted_rows_equals_halves() {
    let spec = small_spec();
    let w = test_weights(&spec, 5);
    let hd = spec.head_dim as usize;
    let permute = |t: &Tensor, heads: usize| -> Tensor {
        let rows: Vec<u32> = (0..heads * hd)
            .map(|r| {
                let (head, i) = (r / hd, r % hd);
                (head * hd + (i % 2) * hd / 2 + i / 2) as u32
            })
            .collect();
        let n = rows.len();
        t.index_select(&Tensor::from_vec(rows, n, &Device::Cpu).unwrap(), 0)
            .unwrap()
    };
    let mut wi = w.clone();
    wi.rope = RopeStyle::Interleaved;
    for l in &mut wi.layers {
        l.wq = permute(&l.wq, spec.n_heads as usize);
        l.wk = permute(&l.wk, spec.n_kv_heads as usize);
    }
    let halves = Model::new(w).unwrap();
    let interleaved = Model::new(wi).unwrap();
    let tokens = prompt(11, 2, spec.vocab_size);
    let table = [3, 0, 2];
    let run = |m: &Model| {
        let mut cache = KvCache::new(&spec, 4, 4, DType::F32, &Device::Cpu).unwrap();
        let a = m
            .forward(
                &mut cache,
                &[SeqInput {
                    tokens: &tokens,
                    start_pos: 0,
                    block_table: &table,
                }],
            )
            .unwrap();
        let b = m
            .forward(
                &mut cache,
                &[SeqInput {
                    tokens: &[7],
                    start_pos: 11,
                    block_table: &table,
                }],
            )
            .unwrap();
        [a, b].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    for (got, want) in run(&interleaved).iter().zip(run(&halves)) {
        let d = rel_diff(got, &want);
        assert!(d <= TOL, "{d}");
    }
}

/// A sequence as the caller tracks it: every token so far, how many are cached, its blocks,
/// and the logits of each step.
struct Seq {
    tokens: Vec<u32>,
    cached: usize,
    table: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

impl Seq {
    fn new(prompt: Vec<u32>) -> Seq {
        Seq {
            tokens: prompt,
            cached: 0,
            table: Vec::new(),
            logits: Vec::new(),
        }
    }

    /// The generated tokens.
    fn generated(&self) -> &[u32] {
        &self.tokens[self.tokens.len() - self.logits.len()..]
    }
}

/// One forward over `seqs`, each feeding all its uncached tokens, then a greedy token each.
fn step(model: &Model, cache: &mut KvCache, seqs: &mut [&mut Seq], free: &mut Vec<u32>) {
    let bs = cache.block_size_tokens();
    for s in seqs.iter_mut() {
        while s.table.len() * bs < s.tokens.len() {
            s.table.push(free.pop().expect("test cache too small"));
        }
    }
    let logits = {
        let inputs: Vec<SeqInput> = seqs
            .iter()
            .map(|s| SeqInput {
                tokens: &s.tokens[s.cached..],
                start_pos: s.cached,
                block_table: &s.table,
            })
            .collect();
        model.forward(cache, &inputs).unwrap()
    };
    for (s, row) in seqs.iter_mut().zip(logits.to_vec2::<f32>().unwrap()) {
        s.cached = s.tokens.len();
        s.tokens.push(argmax(&row));
        s.logits.push(row);
    }
}

fn assert_same_run(got: &Seq, want: &Seq, what: &str) {
    assert_eq!(got.generated(), want.generated(), "{what}: greedy tokens");
    for (i, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
        let d = rel_diff(g, w);
        assert!(d <= TOL, "{what}: step {i}: relative logit difference {d}");
    }
}

#[test]
fn batched_prefill_and_decode_equal_each_sequence_alone() {
    let spec = small_spec();
    let model = Model::new(test_weights(&spec, 7)).unwrap();
    let (bs, num_blocks) = (4, 61);
    let mut cache = KvCache::new(&spec, num_blocks, bs, DType::F32, &Device::Cpu).unwrap();
    let mut free = scattered(num_blocks as u32, num_blocks, 13);
    let vocab = spec.vocab_size;
    let prompts = [(7, 1), (1, 2), (13, 3), (22, 4), (9, 5)];
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .map(|&(n, salt)| Seq::new(prompt(n, salt, vocab)))
        .collect();
    let [a, b, c, d, e] = &mut seqs[..] else {
        unreachable!()
    };
    // A, B and C prefill together; D joins at step 5 (its prefill beside three decodes); B
    // leaves after step 9 and E takes its freed blocks, stale contents and all.
    for i in 0..20 {
        let mut batch: Vec<&mut Seq> = vec![&mut *a, &mut *c];
        if i < 10 {
            batch.push(&mut *b);
        }
        if i >= 5 {
            batch.push(&mut *d);
        }
        if i >= 12 {
            batch.push(&mut *e);
        }
        step(&model, &mut cache, &mut batch, &mut free);
        if i == 9 {
            free.extend(b.table.iter().rev());
        }
    }
    assert_eq!(
        [a.logits.len(), b.logits.len(), c.logits.len()],
        [20, 10, 20]
    );
    assert_eq!([d.logits.len(), e.logits.len()], [15, 8]);
    for (s, &(n, salt)) in seqs.iter().zip(&prompts) {
        let mut alone = Seq::new(prompt(n, salt, vocab));
        let mut cache = KvCache::new(&spec, 16, bs, DType::F32, &Device::Cpu).unwrap();
        let mut free = scattered(16, 16, 5);
        for _ in 0..s.logits.len() {
            step(&model, &mut cache, &mut [&mut alone], &mut free);
        }
        assert_same_run(s, &alone, &format!("prompt of {n}"));
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let spec = small_spec();
    let model = Model::new(test_weights(&spec, 9)).unwrap();
    let tokens = prompt(23, 6, spec.vocab_size);
    let table = scattered(17, 8, 3);
    let run = |chunks: &[usize]| {
        let mut cache = KvCache::new(&spec, 17, 4, DType::F32, &Device::Cpu).unwrap();
        let mut start = 0;
        let mut last = None;
        for &end in chunks {
            let logits = model
                .forward(
                    &mut cache,
                    &[SeqInput {
                        tokens: &tokens[start..end],
                        start_pos: start,
                        block_table: &table,
                    }],
                )
                .unwrap();
            last = Some(logits);
            start = end;
        }
        let mut seq = Seq::new(tokens.clone());
        seq.cached = tokens.len();
        seq.table = table.clone();
        let row = last.unwrap().to_vec2::<f32>().unwrap().remove(0);
        seq.tokens.push(argmax(&row));
        seq.logits.push(row);
        let mut free = Vec::new();
        for _ in 0..8 {
            step(&model, &mut cache, &mut [&mut seq], &mut free);
        }
        seq
    };
    let one_shot = run(&[23]);
    assert_same_run(&run(&[8, 15, 23]), &one_shot, "3 chunks");
    assert_same_run(&run(&[5, 23]), &one_shot, "2 chunks");
}

/// Prefill in instance A, ship the blocks, decode in instance B beside a resident sequence.
#[test]
fn exported_kv_continues_in_another_instance() {
    let spec = small_spec();
    let w = test_weights(&spec, 11);
    let model_a = Model::new(w.clone()).unwrap();
    let model_b = Model::new(w).unwrap();
    let bs = 4;
    let mut cache_a = KvCache::new(&spec, 32, bs, DType::F32, &Device::Cpu).unwrap();
    let mut cache_b = KvCache::new(&spec, 40, bs, DType::F32, &Device::Cpu).unwrap();
    let mut free_a = scattered(32, 32, 5);
    let mut free_b = scattered(40, 40, 3);

    let mut resident = Seq::new(prompt(10, 8, spec.vocab_size));
    step(&model_b, &mut cache_b, &mut [&mut resident], &mut free_b);

    let mut a = Seq::new(prompt(18, 9, spec.vocab_size));
    step(&model_a, &mut cache_a, &mut [&mut a], &mut free_a);
    let sent = cache_a.export_blocks(&a.table).unwrap();
    assert_eq!(sent.len(), 5);

    let mut b = Seq {
        tokens: a.tokens.clone(),
        cached: a.cached,
        table: (0..a.table.len()).map(|_| free_b.pop().unwrap()).collect(),
        logits: a.logits.clone(),
    };
    assert_ne!(b.table, a.table);
    cache_b.import_blocks(&b.table, &sent).unwrap();

    for _ in 0..32 {
        step(&model_a, &mut cache_a, &mut [&mut a], &mut free_a);
        step(
            &model_b,
            &mut cache_b,
            &mut [&mut resident, &mut b],
            &mut free_b,
        );
    }
    assert_eq!(b.generated().len(), 33);
    assert_same_run(&b, &a, "imported");
}

/// A prefix already cached in B (computed there) is not sent: only the suffix blocks travel.
#[test]
fn only_suffix_blocks_travel_when_the_prefix_is_resident() {
    let spec = small_spec();
    let w = test_weights(&spec, 13);
    let model_a = Model::new(w.clone()).unwrap();
    let model_b = Model::new(w).unwrap();
    let bs = 4;
    let mut cache_a = KvCache::new(&spec, 32, bs, DType::F32, &Device::Cpu).unwrap();
    let mut cache_b = KvCache::new(&spec, 40, bs, DType::F32, &Device::Cpu).unwrap();
    let mut free_a = scattered(32, 32, 5);
    let mut free_b = scattered(40, 40, 3);

    let full = prompt(25, 10, spec.vocab_size);
    let prefix_blocks = 4;
    let prefix = &full[..prefix_blocks * bs];

    // B computed the shared prefix for an earlier request.
    let mut earlier = Seq::new(prefix.to_vec());
    step(&model_b, &mut cache_b, &mut [&mut earlier], &mut free_b);

    let mut a = Seq::new(full.clone());
    step(&model_a, &mut cache_a, &mut [&mut a], &mut free_a);
    let suffix_blocks = &a.table[prefix_blocks..];
    let sent = cache_a.export_blocks(suffix_blocks).unwrap();
    assert_eq!(sent.len(), 3);

    let suffix_ids: Vec<u32> = (0..sent.len()).map(|_| free_b.pop().unwrap()).collect();
    cache_b.import_blocks(&suffix_ids, &sent).unwrap();
    let mut b = Seq {
        tokens: a.tokens.clone(),
        cached: a.cached,
        table: [&earlier.table[..prefix_blocks], &suffix_ids[..]].concat(),
        logits: a.logits.clone(),
    };
    for _ in 0..32 {
        step(&model_a, &mut cache_a, &mut [&mut a], &mut free_a);
        step(&model_b, &mut cache_b, &mut [&mut b], &mut free_b);
    }
    assert_same_run(&b, &a, "prefix resident, suffix imported");
}

/// Half-precision weights and caches run and stay near the f32 logits.
#[test]
fn half_precision_weights_and_caches_track_f32() {
    let spec = small_spec();
    let w = test_weights(&spec, 15);
    let run = |weights: Weights, cache_dtype: DType| -> Vec<Vec<f32>> {
        let model = Model::new(weights).unwrap();
        let mut cache = KvCache::new(&spec, 8, 4, cache_dtype, &Device::Cpu).unwrap();
        let tokens = prompt(14, 12, spec.vocab_size);
        let table = [6, 1, 4, 3, 7];
        let mut rows = Vec::new();
        let mut start = 0;
        let steps: [&[u32]; 3] = [&tokens, &[5], &[9]];
        for new in steps {
            let logits = model
                .forward(
                    &mut cache,
                    &[SeqInput {
                        tokens: new,
                        start_pos: start,
                        block_table: &table,
                    }],
                )
                .unwrap();
            assert_eq!(logits.dtype(), DType::F32);
            rows.push(logits.to_vec2::<f32>().unwrap().remove(0));
            start += new.len();
        }
        rows
    };
    let exact = run(w.clone(), DType::F32);
    for (weights, cache_dtype, tol) in [
        (w.to(DType::F16, &Device::Cpu).unwrap(), DType::F16, 0.02),
        (w.to(DType::BF16, &Device::Cpu).unwrap(), DType::BF16, 0.1),
        (w.clone(), DType::BF16, 0.05),
    ] {
        let dtype = weights.dtype();
        for (got, want) in run(weights, cache_dtype).iter().zip(&exact) {
            let d = rel_diff(got, want);
            assert!(
                d <= tol,
                "{dtype:?} weights, {cache_dtype:?} cache: relative difference {d}"
            );
        }
    }
}

fn invalid<T: std::fmt::Debug>(r: Result<T, RuntimeError>) -> String {
    match r {
        Err(RuntimeError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn bad_batches_are_errors_and_leave_the_cache_untouched() {
    let spec = small_spec();
    let model = Model::new(test_weights(&spec, 17)).unwrap();
    let mut cache = KvCache::new(&spec, 8, 4, DType::F32, &Device::Cpu).unwrap();
    let tokens = prompt(9, 1, spec.vocab_size);
    fn seq<'a>(tokens: &'a [u32], start_pos: usize, block_table: &'a [u32]) -> SeqInput<'a> {
        SeqInput {
            tokens,
            start_pos,
            block_table,
        }
    }
    model
        .forward(&mut cache, &[seq(&tokens, 0, &[0, 1, 2])])
        .unwrap();
    let before = cache.export_blocks(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();

    let fine = seq(&tokens[..2], 9, &[0, 1, 2]);
    let cases: Vec<(Vec<SeqInput>, &str)> = vec![
        (vec![], "empty batch"),
        (
            vec![fine, seq(&[], 0, &[3])],
            "sequence 1 has no new tokens",
        ),
        (
            vec![fine, seq(&[3, 384], 0, &[3])],
            "token id 384 out of range",
        ),
        (
            vec![fine, seq(&tokens, 0, &[3, 4])],
            "9 tokens need 3 blocks of 4, the block table has 2",
        ),
        (vec![fine, seq(&tokens, 0, &[3, 8, 4])], "block id 8"),
        (
            vec![fine, seq(&[1], 512, &[0; 129])],
            "exceed max_position_embeddings 512",
        ),
        (
            vec![fine, seq(&[1, 2], 9, &[5, 6, 2])],
            "write slot 9 (block 2)",
        ),
    ];
    for (batch, want) in cases {
        let msg = invalid(model.forward(&mut cache, &batch));
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    let other = ModelSpec {
        n_kv_heads: 4,
        head_dim: 32,
        ..small_spec()
    };
    let mut wrong = KvCache::new(&other, 8, 4, DType::F32, &Device::Cpu).unwrap();
    let msg = invalid(model.forward(&mut wrong, &[fine]));
    assert!(msg.contains("does not fit model tiny"), "{msg}");
    assert_eq!(
        cache.export_blocks(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap(),
        before
    );
}

#[test]
fn mis_shaped_weights_are_named() {
    let spec = small_spec();
    let mut w = test_weights(&spec, 19);
    w.layers[1].wk = Tensor::zeros((32, 128), DType::F32, &Device::Cpu).unwrap();
    match Model::new(w) {
        Err(RuntimeError::Shape {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "layers.1.wk");
            assert_eq!((expected, found), (vec![64, 128], vec![32, 128]));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    let mut w = test_weights(&spec, 19);
    w.layers.pop();
    let msg = invalid(Model::new(w));
    assert!(
        msg.contains("2 layers of weights, the spec says 3"),
        "{msg}"
    );
    let bad = ModelSpec {
        n_kv_heads: 3,
        ..small_spec()
    };
    let msg = invalid(Model::new(test_weights(&bad, 1)));
    assert!(msg.contains("multiple of n_kv_heads"), "{msg}");
}
