//! `disagg-hw check-gpu`: is the model right on a device? The same seeded weights run in f32 on
//! the CPU (the reference) and on the device in f32, f16 and bf16; the logits of a batched
//! prefill and of greedy decode steps (every run fed the reference's tokens, so each step
//! compares like with like), then of prompts prefilled alone (one of them in two chunks), must
//! agree within bounds set by each dtype's precision; the "graphs" column counts the step
//! shapes a GPU recorded as CUDA graphs (each replayed by every later step of its shape). Then a
//! sequence's KV is exported on the device, imported into a fresh cache there, and decoding
//! continues: tokens and logits must equal those of continuing in place, bit for bit.

use crate::paged::{KvExport, PagedError, PagedModel, SeqId};
use models::ModelSpec;
use models::runtime::{Device, Model, RuntimeError, TensorDType, Weights, argmax};
use std::fmt::Write;

/// What to run.
#[derive(Clone, Debug)]
pub struct CheckPlan {
    /// Seeds the random weights.
    pub seed: u64,
    /// Prompts prefilled together in one step, by length (on a GPU in f16 and bf16 each
    /// takes the flash-attention kernel, the default's over one to five query tiles; see
    /// `models::runtime::fused`). With the late prompt, the default's six decode rows take
    /// decode attention unsplit for TinyLlama's 32 heads and split for SmolLM2's 9; the round
    /// trip's single row takes it split eight ways.
    pub prompt_lens: Vec<usize>,
    /// A prompt that joins at the first decode step, in two chunks (0: none); the default's
    /// second chunk attends over cached keys and crosses a key tile.
    pub late_prompt_len: usize,
    /// Decode steps compared after the prefill.
    pub decode_steps: usize,
    /// Prompts then prefilled alone, one step each, the last in two chunks (the second over
    /// the first's KV). On a GPU in f16 and bf16 each is a recorded prefill: the default's
    /// first records the 128-token bucket's graph, and the rest replay it with other lengths
    /// and contexts.
    pub solo_prompt_lens: Vec<usize>,
    /// Decode steps of each solo prompt alone, fed its own tokens again: batch 1, where a GPU
    /// takes the one-row GEMV kernels and decode attention split over the context.
    pub solo_decode_steps: usize,
    /// Decode steps after the KV round trip.
    pub round_trip_steps: usize,
    pub block_size_tokens: usize,
}

impl Default for CheckPlan {
    fn default() -> CheckPlan {
        CheckPlan {
            seed: 7,
            prompt_lens: vec![37, 150, 300, 5, 64],
            late_prompt_len: 100,
            decode_steps: 8,
            solo_prompt_lens: vec![100, 70, 250],
            solo_decode_steps: 4,
            round_trip_steps: 16,
            block_size_tokens: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Paged(#[from] PagedError),
    #[error("{0}")]
    Invalid(String),
}

/// How far a dtype's logits may be from the f32 reference, relative to the reference's largest
/// logit magnitude.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    pub max_rel: f32,
    pub mean_rel: f32,
}

/// The bounds of `dtype`, from its unit roundoff u (half the spacing of its numbers at 1).
///
/// f16 (u = 2^-11) and bf16 (u = 2^-8) round every weight, activation and KV value while
/// matmuls accumulate in f32: each of the L layers adds errors of a few u to the residual
/// stream, and they grow about as sqrt(L) (random signs), so 30 layers give ~5u on a logit
/// near the largest. Max 16u and mean 4u leave a factor of about 3 for unlucky draws while
/// still failing a wrong kernel (a dropped term, a misplaced block), which costs O(1).
/// f32 (u = 2^-24) only reassociates sums (another kernel's order): sqrt(K) u per dot product
/// of K <= 8192 terms is ~5e-6; max 1e-4 and mean 1e-5 allow for growth through the layers.
pub fn bounds(dtype: TensorDType) -> Bounds {
    let u = match dtype {
        TensorDType::F16 => 2f32.powi(-11),
        TensorDType::BF16 => 2f32.powi(-8),
        _ => {
            return Bounds {
                max_rel: 1e-4,
                mean_rel: 1e-5,
            };
        }
    };
    Bounds {
        max_rel: 16.0 * u,
        mean_rel: 4.0 * u,
    }
}

/// One dtype on the device against the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Accuracy {
    pub dtype: TensorDType,
    /// Logit rows compared (sequences x (prefill + decode steps)).
    pub rows: usize,
    /// Of |logit - reference| / max |reference logit of the row|, over every logit.
    pub max_rel: f32,
    pub mean_rel: f32,
    /// Rows whose largest logit is the reference's.
    pub top1_agree: usize,
    pub bounds: Bounds,
    /// Step shapes the run recorded as CUDA graphs.
    pub graphs: usize,
}

impl Accuracy {
    /// Within both bounds. Top-1 agreement is reported, not required: within the max bound a
    /// different pick is only possible where the reference's margin is under twice that bound.
    pub fn pass(&self) -> bool {
        self.max_rel <= self.bounds.max_rel && self.mean_rel <= self.bounds.mean_rel
    }
}

/// Continuing after an import against continuing in place.
#[derive(Clone, Debug, PartialEq)]
pub struct Continuation {
    pub tokens_equal: bool,
    pub max_abs_diff: f32,
}

impl Continuation {
    pub fn pass(&self) -> bool {
        self.tokens_equal && self.max_abs_diff == 0.0
    }
}

/// The KV round trip in one dtype on the device.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundTrip {
    pub dtype: TensorDType,
    pub steps: usize,
    pub kv_bytes: usize,
    /// The export left in device memory and imported from there.
    pub device_path: Continuation,
    /// The export copied to host bytes (what TCP carries) and imported from them.
    pub host_path: Continuation,
}

impl RoundTrip {
    pub fn pass(&self) -> bool {
        self.device_path.pass() && self.host_path.pass()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub model: String,
    pub device: String,
    pub plan_words: String,
    pub accuracy: Vec<Accuracy>,
    pub round_trips: Vec<RoundTrip>,
}

impl Report {
    pub fn pass(&self) -> bool {
        self.accuracy.iter().all(Accuracy::pass) && self.round_trips.iter().all(RoundTrip::pass)
    }

    /// Markdown tables: accuracy, then the round trips.
    pub fn table(&self) -> String {
        let verdict = |ok: bool| if ok { "pass" } else { "FAIL" };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} (seeded random weights) on {} against the CPU in f32: {}\n",
            self.model, self.device, self.plan_words
        );
        out.push_str(
            "| dtype | logit rows | max rel. error | bound | mean rel. error | bound | top-1 agreement | graphs | result |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for a in &self.accuracy {
            let _ = writeln!(
                out,
                "| {} | {} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {}/{} | {} | {} |",
                dtype_name(a.dtype),
                a.rows,
                a.max_rel,
                a.bounds.max_rel,
                a.mean_rel,
                a.bounds.mean_rel,
                a.top1_agree,
                a.rows,
                a.graphs,
                verdict(a.pass())
            );
        }
        out.push_str(
            "\n| dtype | KV exported | steps after import | device path: tokens, max abs. logit diff | host path: tokens, max abs. logit diff | result |\n\
             |---|---|---|---|---|---|\n",
        );
        let path = |c: &Continuation| {
            format!(
                "{}, {:.1e}",
                if c.tokens_equal { "equal" } else { "DIFFER" },
                c.max_abs_diff
            )
        };
        for r in &self.round_trips {
            let _ = writeln!(
                out,
                "| {} | {} bytes | {} | {} | {} | {} |",
                dtype_name(r.dtype),
                r.kv_bytes,
                r.steps,
                path(&r.device_path),
                path(&r.host_path),
                verdict(r.pass())
            );
        }
        out
    }
}

pub fn dtype_name(dtype: TensorDType) -> &'static str {
    match dtype {
        TensorDType::F16 => "f16",
        TensorDType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Deterministic prompt `k` of `n` tokens.
fn prompt(n: usize, k: usize, vocab: u32) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + k * 104_729 + 31) % vocab as usize) as u32)
        .collect()
}

/// Logit rows of one run: per step, per sequence.
struct Run {
    rows: Vec<Vec<f32>>,
    /// Step shapes recorded as CUDA graphs.
    graphs: usize,
    /// The tokens fed after the prefill, per step, per sequence.
    fed: Vec<Vec<u32>>,
}

/// The prompts prefilled in one step, then `steps` decode steps of all of them, fed `forced`
/// (the reference's tokens) or, for the reference itself, its own greedy picks. A `late`
/// prompt joins at the first decode step, prefilled in two chunks beside the others' decode
/// tokens (a mixed step, then a chunk over context already cached), and decodes from then on.
/// Then each `solo` prompt is prefilled alone, the last in two chunks, and decodes `solo_steps`
/// steps alone, fed its own tokens from the first (no run's picks, so every run is fed alike).
#[allow(clippy::too_many_arguments)]
fn run(
    model: Model,
    prompts: &[Vec<u32>],
    late: &[u32],
    steps: usize,
    solo: &[Vec<u32>],
    solo_steps: usize,
    forced: Option<&[Vec<u32>]>,
    block_size: usize,
) -> Result<Run, CheckError> {
    let blocks: usize = prompts
        .iter()
        .chain(std::iter::once(&late.to_vec()))
        .map(|p| (p.len() + steps + 1).div_ceil(block_size))
        .chain(
            solo.iter()
                .map(|p| (p.len() + solo_steps).div_ceil(block_size)),
        )
        .sum();
    let mut m = PagedModel::new(model, blocks as u32 + 1, block_size as u32, false)?;
    // Each step's work, and whether each of its rows picks the sequence's next token (the
    // first chunk of the late prompt does not).
    let mut work = Vec::with_capacity(prompts.len() + 1);
    for p in prompts {
        work.push((m.admit(p)?.0, p.len()));
    }
    let mut picks = vec![true; work.len()];
    let mut out = Run {
        rows: Vec::new(),
        graphs: 0,
        fed: Vec::with_capacity(steps),
    };
    let first_chunk = late.len().div_ceil(2);
    let mut late_id = None;
    for step in 0..=steps {
        let logits = m
            .step(&work)?
            .to_vec2::<f32>()
            .map_err(RuntimeError::from)?;
        out.rows.extend(logits.iter().cloned());
        if step == steps {
            break;
        }
        let feeders: Vec<(SeqId, &Vec<f32>)> = work
            .iter()
            .zip(&logits)
            .zip(&picks)
            .filter(|(_, pick)| **pick)
            .map(|((w, row), _)| (w.0, row))
            .collect();
        let next: Vec<u32> = match forced {
            Some(f) => f[step].clone(),
            None => feeders.iter().map(|(_, row)| argmax(row)).collect(),
        };
        work.clear();
        for (&(id, _), &t) in feeders.iter().zip(&next) {
            m.push_token(id, t)?;
            work.push((id, 1));
        }
        picks = vec![true; work.len()];
        if !late.is_empty() {
            match late_id {
                None => {
                    let id = m.admit(late)?.0;
                    late_id = Some(id);
                    work.push((id, first_chunk));
                    picks.push(first_chunk == late.len());
                }
                Some(id) if step == 1 && first_chunk < late.len() => {
                    work.push((id, late.len() - first_chunk));
                    picks.push(true);
                }
                _ => {}
            }
        }
        out.fed.push(next);
    }
    for (k, p) in solo.iter().enumerate() {
        let id = m.admit(p)?.0;
        let chunk = match k + 1 == solo.len() {
            true => p.len().div_ceil(2),
            false => p.len(),
        };
        for n in [chunk, p.len() - chunk].into_iter().filter(|&n| n > 0) {
            let logits = m
                .step(&[(id, n)])?
                .to_vec2::<f32>()
                .map_err(RuntimeError::from)?;
            out.rows.extend(logits);
        }
        for &t in p.iter().cycle().take(solo_steps) {
            m.push_token(id, t)?;
            let logits = m
                .step(&[(id, 1)])?
                .to_vec2::<f32>()
                .map_err(RuntimeError::from)?;
            out.rows.extend(logits);
        }
        m.release(id)?;
    }
    out.graphs = m.recorded_graphs();
    Ok(out)
}

fn compare(dtype: TensorDType, got: &[Vec<f32>], want: &[Vec<f32>]) -> Accuracy {
    let (mut max_rel, mut sum_rel, mut n, mut top1_agree) = (0f32, 0f64, 0usize, 0);
    for (g, w) in got.iter().zip(want) {
        let scale = w
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(f32::MIN_POSITIVE);
        for (a, b) in g.iter().zip(w) {
            let rel = (a - b).abs() / scale;
            // NaN fails the bound rather than hiding in max().
            max_rel = if rel.is_nan() {
                f32::INFINITY
            } else {
                max_rel.max(rel)
            };
            sum_rel += rel as f64;
            n += 1;
        }
        top1_agree += usize::from(argmax(g) == argmax(w));
    }
    Accuracy {
        dtype,
        rows: got.len(),
        max_rel,
        mean_rel: (sum_rel / n.max(1) as f64) as f32,
        top1_agree,
        bounds: bounds(dtype),
        graphs: 0,
    }
}

/// Greedy decode of `steps` tokens from a sequence whose next token is pending: tokens and the
/// logits of every step.
fn continue_decoding(
    m: &mut PagedModel,
    id: SeqId,
    steps: usize,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), CheckError> {
    let (mut tokens, mut rows) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        let row = m
            .step(&[(id, 1)])?
            .to_vec2::<f32>()
            .map_err(RuntimeError::from)?;
        let t = argmax(&row[0]);
        m.push_token(id, t)?;
        tokens.push(t);
        rows.push(row.into_iter().next().unwrap_or_default());
    }
    Ok((tokens, rows))
}

fn round_trip(
    model: &Model,
    prompt: &[u32],
    steps: usize,
    block_size: usize,
) -> Result<RoundTrip, CheckError> {
    let blocks = (prompt.len() + steps + 1).div_ceil(block_size) as u32;
    let mut source = PagedModel::new(model.clone(), blocks + 1, block_size as u32, true)?;
    let (id, _) = source.admit(prompt)?;
    let first = source
        .step(&[(id, prompt.len())])?
        .to_vec2::<f32>()
        .map_err(RuntimeError::from)?;
    source.push_token(id, argmax(&first[0]))?;
    let on_device = source.export_device(id, 0)?;
    let on_host = source.export(id, 0)?;
    let kv_bytes = on_host.payload_bytes();
    let in_place = continue_decoding(&mut source, id, steps)?;
    let continued = |export: &KvExport| -> Result<Continuation, CheckError> {
        // Another sequence first, so the import lands on other block ids.
        let mut fresh = PagedModel::new(model.clone(), 2 * blocks + 3, block_size as u32, true)?;
        fresh.admit(&self::prompt(block_size + 1, 99, model.spec().vocab_size))?;
        let imported = fresh.import(export)?;
        let (tokens, rows) = continue_decoding(&mut fresh, imported, steps)?;
        let max_abs_diff =
            rows.iter()
                .flatten()
                .zip(in_place.1.iter().flatten())
                .fold(0f32, |m, (a, b)| {
                    let d = (a - b).abs();
                    if d.is_nan() { f32::INFINITY } else { m.max(d) }
                });
        Ok(Continuation {
            tokens_equal: tokens == in_place.0,
            max_abs_diff,
        })
    };
    if on_device.device.is_none() {
        return Err(CheckError::Invalid(
            "the device export carried no device rows".into(),
        ));
    }
    Ok(RoundTrip {
        dtype: model.dtype(),
        steps,
        kv_bytes,
        device_path: continued(&on_device)?,
        host_path: continued(&on_host)?,
    })
}

/// Checks `spec` with seeded random weights on `device` in each of `dtypes` against the CPU in
/// f32. `device_label` names the device in the report.
pub fn check(
    spec: &ModelSpec,
    device: &Device,
    device_label: &str,
    dtypes: &[TensorDType],
    plan: &CheckPlan,
) -> Result<Report, CheckError> {
    let vocab = spec.vocab_size;
    if plan.prompt_lens.is_empty() || plan.prompt_lens.contains(&0) || plan.block_size_tokens == 0 {
        return Err(CheckError::Invalid(
            "check-gpu: prompt lengths and the block size must be positive".into(),
        ));
    }
    let prompts: Vec<Vec<u32>> = plan
        .prompt_lens
        .iter()
        .enumerate()
        .map(|(k, &n)| prompt(n, k, vocab))
        .collect();
    let late = prompt(plan.late_prompt_len, prompts.len(), vocab);
    let solo: Vec<Vec<u32>> = plan
        .solo_prompt_lens
        .iter()
        .enumerate()
        .map(|(k, &n)| prompt(n, prompts.len() + 1 + k, vocab))
        .collect();
    let weights = Weights::random(spec, TensorDType::F32, &Device::Cpu, plan.seed)?;
    let reference = run(
        Model::new(weights.clone())?,
        &prompts,
        &late,
        plan.decode_steps,
        &solo,
        plan.solo_decode_steps,
        None,
        plan.block_size_tokens,
    )?;
    let mut report = Report {
        model: spec.name.clone(),
        device: device_label.to_string(),
        plan_words: format!(
            "a prefill of {} prompts ({} tokens) in one step, then {} decode steps fed the \
             reference's greedy tokens, a prompt of {} tokens joining them in two chunks, then \
             prompts of {} tokens prefilled alone, the last in two chunks, each decoding {} \
             steps alone; the KV round trip continues {} steps",
            prompts.len(),
            plan.prompt_lens
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" and "),
            plan.decode_steps,
            plan.late_prompt_len,
            plan.solo_prompt_lens
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            plan.solo_decode_steps,
            plan.round_trip_steps
        ),
        accuracy: Vec::new(),
        round_trips: Vec::new(),
    };
    let mut models = Vec::with_capacity(dtypes.len());
    for &dtype in dtypes {
        let model = Model::new(weights.to(dtype, device)?)?;
        let got = run(
            model.clone(),
            &prompts,
            &late,
            plan.decode_steps,
            &solo,
            plan.solo_decode_steps,
            Some(&reference.fed),
            plan.block_size_tokens,
        )?;
        report.accuracy.push(Accuracy {
            graphs: got.graphs,
            ..compare(dtype, &got.rows, &reference.rows)
        });
        models.push(model);
    }
    for model in &models {
        report.round_trips.push(round_trip(
            model,
            &prompts[prompts.len() - 1],
            plan.round_trip_steps,
            plan.block_size_tokens,
        )?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            n_layers: 3,
            hidden_size: 64,
            intermediate_size: 160,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 211,
            max_position_embeddings: 256,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
        }
    }

    /// The CPU in f16 and bf16 stays within the bounds the GPU is held to, the CPU in f32 is
    /// the reference exactly, and the KV round trip continues bit for bit in every dtype.
    #[test]
    fn the_cpu_passes_its_own_check_in_every_dtype() {
        let plan = CheckPlan {
            prompt_lens: vec![21, 40],
            late_prompt_len: 13,
            decode_steps: 5,
            solo_prompt_lens: vec![9, 30],
            round_trip_steps: 6,
            ..CheckPlan::default()
        };
        let dtypes = [TensorDType::F32, TensorDType::F16, TensorDType::BF16];
        let report = check(&tiny(), &Device::Cpu, "cpu", &dtypes, &plan).unwrap();
        assert!(report.pass(), "{}", report.table());
        let f32_row = &report.accuracy[0];
        // 2 prefill rows, then 5 steps of 2 decodes and the late prompt's chunk or token, then
        // one solo prompt's row and two chunks of the other's, each solo prompt then decoding
        // four steps alone.
        assert_eq!((f32_row.max_rel, f32_row.rows), (0.0, 28));
        assert_eq!(f32_row.top1_agree, 28);
        for a in &report.accuracy[1..] {
            assert!(a.max_rel > 0.0, "{:?} rounds", a.dtype);
        }
        assert_eq!(report.round_trips.len(), 3);
        let table = report.table();
        assert!(
            table.contains("| bf16 |") && !table.contains("FAIL"),
            "{table}"
        );
    }

    #[test]
    fn a_wrong_logit_fails_the_bound() {
        let want = vec![vec![1.0, -2.0, 0.5], vec![0.0, 4.0, -1.0]];
        let mut got = want.clone();
        assert!(compare(TensorDType::BF16, &got, &want).pass());
        got[1][2] += 0.5;
        let a = compare(TensorDType::BF16, &got, &want);
        assert!((a.max_rel - 0.125).abs() < 1e-6, "{}", a.max_rel);
        assert!(!a.pass());
        got[0][0] = f32::NAN;
        assert!(compare(TensorDType::F32, &got, &want).max_rel.is_infinite());
    }

    #[test]
    fn bounds_follow_the_unit_roundoff() {
        assert_eq!(bounds(TensorDType::BF16).max_rel, 16.0 / 256.0);
        assert_eq!(bounds(TensorDType::F16).mean_rel, 4.0 / 2048.0);
        assert!(bounds(TensorDType::F32).max_rel < bounds(TensorDType::F16).mean_rel);
    }
}
