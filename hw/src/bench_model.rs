//! `disagg-hw bench-model`: prefill tokens/s by prompt length and decode tokens/s by batch size
//! for a model on a device, through the same paged runtime that serves.

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
    /// Timed repetitions of each measurement; the fastest counts.
    pub repeats: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    pub phase: &'static str,
    /// Prompt length (prefill) or batch size (decode).
    pub size: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Paged(#[from] PagedError),
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

pub fn run(model: Model, plan: &BenchPlan) -> Result<Vec<BenchRow>, BenchError> {
    const BS: u32 = 16;
    let vocab = model.spec().vocab_size;
    let max_batch = plan.batch_sizes.iter().copied().max().unwrap_or(1);
    let longest = plan.prompt_lens.iter().copied().max().unwrap_or(1);
    let per_seq = (plan.decode_context_tokens + plan.decode_steps + 1).div_ceil(BS as usize);
    let blocks = (max_batch * per_seq).max(longest.div_ceil(BS as usize)) + 4;
    // No prefix caching: every repetition computes everything.
    let mut paged = PagedModel::new(model, blocks as u32, BS, false)?;
    let mut rows = Vec::new();
    for &len in &plan.prompt_lens {
        let mut best = f64::INFINITY;
        for r in 0..plan.repeats.max(1) {
            let (id, _) = paged.admit(&tokens(len, r, vocab))?;
            let start = Instant::now();
            paged.step(&[(id, len)])?;
            best = best.min(start.elapsed().as_secs_f64());
            paged.release(id)?;
        }
        rows.push(BenchRow {
            phase: "prefill",
            size: len,
            seconds: best,
            tokens_per_s: len as f64 / best,
        });
    }
    for &batch in &plan.batch_sizes {
        let mut best = f64::INFINITY;
        for r in 0..plan.repeats.max(1) {
            let mut ids = Vec::with_capacity(batch);
            for s in 0..batch {
                let prompt = tokens(plan.decode_context_tokens.max(1), r * 1000 + s, vocab);
                let (id, _) = paged.admit(&prompt)?;
                paged.step(&[(id, prompt.len())])?;
                paged.push_token(id, 1)?;
                ids.push(id);
            }
            let work: Vec<(u64, usize)> = ids.iter().map(|&id| (id, 1)).collect();
            let start = Instant::now();
            for step in 0..plan.decode_steps {
                paged.step(&work)?;
                for &id in &ids {
                    paged.push_token(id, (step % vocab as usize) as u32)?;
                }
            }
            best = best.min(start.elapsed().as_secs_f64());
            for id in ids {
                paged.release(id)?;
            }
        }
        rows.push(BenchRow {
            phase: "decode",
            size: batch,
            seconds: best,
            tokens_per_s: (batch * plan.decode_steps) as f64 / best,
        });
    }
    Ok(rows)
}

/// Markdown table of the rows.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out =
        String::from("| phase | prompt tokens / batch | seconds | tokens/s |\n|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.4} | {:.1} |\n",
            r.phase, r.size, r.seconds, r.tokens_per_s
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
        let sizes: Vec<(&str, usize)> = rows.iter().map(|r| (r.phase, r.size)).collect();
        assert_eq!(
            sizes,
            vec![
                ("prefill", 8),
                ("prefill", 40),
                ("decode", 1),
                ("decode", 3)
            ]
        );
        assert!(rows.iter().all(|r| r.tokens_per_s > 0.0 && r.seconds > 0.0));
        assert!(table(&rows).lines().count() == 6);
    }

    #[test]
    fn an_unknown_model_is_an_error() {
        let err = load_model("gpt-9", true, None, TensorDType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("unknown model `gpt-9`"));
    }
}
