//! `disagg-hw bench-model`: prefill tokens/s by prompt length and decode tokens/s by batch size
//! for a model on a device, through the same paged runtime that serves, beside the device's
//! measured limits ([`limits`]).
//!
//! Every timed region starts and ends with the device synchronized: GPU launches are
//! asynchronous, and without the final wait the host would time its own queueing.

pub mod limits;

use crate::paged::{PagedError, PagedModel};
use models::runtime::{Device, GgufFile, Model, TensorDType, Weights};
use models::{ModelSpec, runtime::RuntimeError};
use std::path::Path;
use std::time::Instant;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub prompt_lens: Vec<usize>,
    pub batch_sizes: Vec<usize>,
    /// Tokens already in each sequence's cache when decode is timed.
    pub decode_context_tokens: usize,
    pub decode_steps: usize,
    /// Timed repetitions of each measurement; the fastest counts, so 2 or more leave kernel
    /// loading and library warm-up out.
    pub repeats: usize,
}

impl BenchPlan {
    /// One line naming the first flag whose value leaves nothing to time.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |what: &str| Err(BenchError::Invalid(what.to_string()));
        if self.prompt_lens.contains(&0) {
            return bad("--prompt-lens: every length must be at least 1 token");
        }
        if self.batch_sizes.contains(&0) {
            return bad("--batch-sizes: every batch must hold at least 1 sequence");
        }
        if self.decode_steps == 0 {
            return bad("--steps: must be at least 1");
        }
        if self.repeats == 0 {
            return bad("--repeats: must be at least 1");
        }
        Ok(())
    }
}

/// The phase a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One forward pass over a whole prompt, into an empty cache.
    Prefill,
    /// Steps of one new token for each sequence of a batch.
    Decode,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    pub phase: Phase,
    /// Prompt length (prefill) or batch size (decode).
    pub size: usize,
    /// Tokens in each sequence's cache at the first timed step (0 for prefill).
    pub context_tokens: usize,
    /// Steps in the timed region (1 for prefill).
    pub steps: usize,
    /// Seconds of one step: the fastest region over its steps.
    pub step_s: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Paged(#[from] PagedError),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] crate::transport::cuda::CudaError),
    #[error("{0}")]
    Invalid(String),
}

/// The weights of `model`: the fetched GGUF for `smollm2-135m`, seeded random weights for any
/// other preset (or for smollm2 with `random`).
pub fn load_model(
    model: &str,
    random: bool,
    gguf: Option<&Path>,
    dtype: TensorDType,
    device: &Device,
) -> Result<Model, BenchError> {
    let weights = match (model, random, gguf) {
        (_, false, Some(path)) => GgufFile::open(path)?.weights(dtype, device)?,
        ("smollm2-135m", false, None) => {
            GgufFile::open(&models::runtime::test_gguf_path()?)?.weights(dtype, device)?
        }
        (name, _, _) => {
            let spec = ModelSpec::preset(name).ok_or_else(|| {
                BenchError::Invalid(format!(
                    "unknown model `{name}`, expected one of {}",
                    ModelSpec::PRESETS.join(", ")
                ))
            })?;
            Weights::random(&spec, dtype, device, 0)?
        }
    };
    Ok(Model::new(weights)?)
}

fn tokens(n: usize, seed: usize, vocab: u32) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729 + 17) % vocab as usize) as u32)
        .collect()
}

/// Waits for everything queued on `device`.
pub(crate) fn synchronize(device: &Device) -> Result<(), BenchError> {
    device.synchronize().map_err(RuntimeError::from)?;
    Ok(())
}

pub fn run(model: Model, plan: &BenchPlan) -> Result<Vec<BenchRow>, BenchError> {
    plan.validate()?;
    const BS: u32 = 16;
    let vocab = model.spec().vocab_size;
    let device = model.device().clone();
    let max_batch = plan.batch_sizes.iter().copied().max().unwrap_or(1);
    let longest = plan.prompt_lens.iter().copied().max().unwrap_or(1);
    let context = plan.decode_context_tokens.max(1);
    let per_seq = (context + plan.decode_steps + 1).div_ceil(BS as usize);
    let blocks = (max_batch * per_seq).max(longest.div_ceil(BS as usize)) + 4;
    // No prefix caching: every repetition computes everything.
    let mut paged = PagedModel::new(model, blocks as u32, BS, false)?;
    let mut rows = Vec::new();
    for &len in &plan.prompt_lens {
        let mut best = f64::INFINITY;
        for r in 0..plan.repeats {
            let (id, _) = paged.admit(&tokens(len, r, vocab))?;
            synchronize(&device)?;
            let start = Instant::now();
            paged.step(&[(id, len)])?;
            synchronize(&device)?;
            best = best.min(start.elapsed().as_secs_f64());
            paged.release(id)?;
        }
        rows.push(BenchRow {
            phase: Phase::Prefill,
            size: len,
            context_tokens: 0,
            steps: 1,
            step_s: best,
            tokens_per_s: len as f64 / best,
        });
    }
    for &batch in &plan.batch_sizes {
        let mut best = f64::INFINITY;
        for r in 0..plan.repeats {
            let mut ids = Vec::with_capacity(batch);
            for s in 0..batch {
                let prompt = tokens(context, r * 1000 + s, vocab);
                let (id, _) = paged.admit(&prompt)?;
                paged.step(&[(id, prompt.len())])?;
                paged.push_token(id, 1)?;
                ids.push(id);
            }
            let work: Vec<(u64, usize)> = ids.iter().map(|&id| (id, 1)).collect();
            synchronize(&device)?;
            let start = Instant::now();
            for step in 0..plan.decode_steps {
                paged.step(&work)?;
                for &id in &ids {
                    paged.push_token(id, (step % vocab as usize) as u32)?;
                }
            }
            synchronize(&device)?;
            best = best.min(start.elapsed().as_secs_f64());
            for id in ids {
                paged.release(id)?;
            }
        }
        rows.push(BenchRow {
            phase: Phase::Decode,
            size: batch,
            context_tokens: context,
            steps: plan.decode_steps,
            step_s: best / plan.decode_steps as f64,
            tokens_per_s: (batch * plan.decode_steps) as f64 / best,
        });
    }
    Ok(rows)
}

/// Markdown table of the rows.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| phase | prompt tokens / batch | s per step | tokens/s |\n|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.6} | {:.1} |\n",
            r.phase.name(),
            r.size,
            r.step_s,
            r.tokens_per_s
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_size_with_positive_rates() {
        let mut spec = ModelSpec::preset("smollm2-135m").unwrap();
        spec.n_layers = 2;
        let model =
            Model::new(Weights::random(&spec, TensorDType::F32, &Device::Cpu, 1).unwrap()).unwrap();
        let plan = BenchPlan {
            prompt_lens: vec![8, 40],
            batch_sizes: vec![1, 3],
            decode_context_tokens: 20,
            decode_steps: 3,
            repeats: 1,
        };
        let rows = run(model, &plan).unwrap();
        let sizes: Vec<(&str, usize)> = rows.iter().map(|r| (r.phase.name(), r.size)).collect();
        assert_eq!(
            sizes,
            vec![
                ("prefill", 8),
                ("prefill", 40),
                ("decode", 1),
                ("decode", 3)
            ]
        );
        assert!(rows.iter().all(|r| r.tokens_per_s > 0.0 && r.step_s > 0.0));
        let decode = &rows[3];
        assert_eq!((decode.context_tokens, decode.steps), (20, 3));
        assert!((decode.tokens_per_s * decode.step_s - 3.0).abs() < 1e-9);
        assert!(table(&rows).lines().count() == 6);
    }

    #[test]
    fn a_plan_with_nothing_to_time_is_refused_naming_its_flag() {
        let mut spec = ModelSpec::preset("smollm2-135m").unwrap();
        spec.n_layers = 1;
        let model =
            || Model::new(Weights::random(&spec, TensorDType::F32, &Device::Cpu, 1).unwrap());
        let plan = BenchPlan {
            prompt_lens: vec![8],
            batch_sizes: vec![1],
            decode_context_tokens: 4,
            decode_steps: 0,
            repeats: 1,
        };
        let err = run(model().unwrap(), &plan).unwrap_err();
        assert_eq!(err.to_string(), "--steps: must be at least 1");
        let plan = BenchPlan {
            decode_steps: 1,
            batch_sizes: vec![2, 0],
            ..plan
        };
        let err = run(model().unwrap(), &plan).unwrap_err();
        assert!(err.to_string().starts_with("--batch-sizes:"), "{err}");
        let plan = BenchPlan {
            batch_sizes: vec![1],
            repeats: 0,
            ..plan
        };
        assert_eq!(
            plan.validate().unwrap_err().to_string(),
            "--repeats: must be at least 1"
        );
    }

    #[test]
    fn an_unknown_model_is_an_error() {
        let err = load_model("gpt-9", true, None, TensorDType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("unknown model `gpt-9`"));
    }
}
