//! The serving path of an idle cluster: what a request's time to first token holds beyond its
//! prefill and its KV transfer (the request reaching an engine, the hand-offs between workers,
//! the token coming back), which the simulator takes as `serving_path_ms`.
//!
//! Probes go one at a time, each a one-token completion of a prompt shorter than a KV block,
//! so that nothing they leave enters a prefix cache or the router's index.

use super::client;
use super::{BenchOptions, LoadgenError, connect, model, streamed_completion, vocab_size};
use sim::config::Scenario;
use tokio::time::Instant;

/// Probes sent; the first warms the connections and is not counted. A probe takes a few ms
/// on a GPU; medians of 11 moved between runs by up to a factor of 2.5, so more are taken.
pub const PROBES: usize = 32;

/// What the probes measured, in ns.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingPath {
    /// The median over the counted probes.
    pub median_ns: u64,
    /// Each counted probe's time to first token less its prefill and KV transfer.
    pub samples_ns: Vec<u64>,
    /// Each counted probe's time to first token.
    pub ttft_ns: Vec<u64>,
}

/// Sends [`PROBES`] probes to the target, one after another.
pub async fn serving_path(
    scenario: &Scenario,
    options: &BenchOptions,
) -> Result<ServingPath, LoadgenError> {
    let (target, http) = connect(options)?;
    let vocab = vocab_size(scenario)?;
    let model = model(&http, target, options).await?;
    let block = scenario
        .setups
        .first()
        .map_or(sim::kv::DEFAULT_BLOCK_SIZE_TOKENS, |s| {
            s.engine.block_size_tokens
        });
    let prompt_tokens = block.saturating_sub(1).clamp(1, 8);
    let url = format!("{target}/v1/completions");
    let failed = |i: usize, message: String| LoadgenError::Target {
        url: url.clone(),
        message: format!("serving-path probe {i}: {message}"),
    };
    let mut samples_ns = Vec::with_capacity(PROBES);
    let mut ttft_ns = Vec::with_capacity(PROBES);
    for i in 0..PROBES {
        // Distinct prompts: no probe finds another's KV.
        let prompt = (0..prompt_tokens)
            .map(|k| ((i as u64 * 7919 + u64::from(k) * 104_729 + 17) % u64::from(vocab)) as u32)
            .collect();
        let body = streamed_completion(&model, prompt, 1);
        let start = Instant::now();
        let answer = client::complete(&http, &url, &body, start, options.request_timeout)
            .await
            .map_err(|reason| failed(i, reason))?;
        let ttft = answer.first_token_ns.unwrap_or(answer.end_ns);
        let trace = answer
            .trace
            .ok_or_else(|| failed(i, "the answer carries no serving trace".into()))?;
        if trace.prefill_end_ns == 0 {
            return Err(failed(i, "its serving trace has no prefill times".into()));
        }
        let engine_ns = trace
            .prefill_end_ns
            .max(trace.transfer_end_ns)
            .saturating_sub(trace.prefill_start_ns);
        if i > 0 {
            samples_ns.push(ttft.saturating_sub(engine_ns));
            ttft_ns.push(ttft);
        }
    }
    let mut sorted = samples_ns.clone();
    sorted.sort_unstable();
    Ok(ServingPath {
        median_ns: sorted[sorted.len() / 2],
        samples_ns,
        ttft_ns,
    })
}
