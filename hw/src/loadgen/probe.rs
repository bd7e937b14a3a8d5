//! The serving path: what a request's time to first token holds beyond its prefill and its
//! KV transfer (the request reaching an engine, the hand-offs between workers, the token
//! coming back), which the simulator takes as `serving_path_ms`, and as `serving_path_idle_ms`
//! for a request that finds nothing in flight.
//!
//! Probes go one at a time, each a one-token completion of a prompt shorter than a KV block,
//! so that nothing they leave enters a prefix cache or the router's index: first back to back
//! (the path of a busy cluster), then each after a pause (the path of an idle one, whose
//! threads and cores went to sleep: on a GPU machine it took twice as long or more).

use super::client;
use super::{BenchOptions, LoadgenError, connect, model, streamed_completion, vocab_size};
use sim::config::Scenario;
use std::time::Duration;
use tokio::time::Instant;

/// Probes sent back to back; the first warms the connections and is not counted. A probe
/// takes a few ms on a GPU; medians of 11 moved between runs by up to a factor of 2.5, so more
/// are taken.
pub const PROBES: usize = 32;

/// Probes sent after a pause each.
pub const IDLE_PROBES: usize = 15;

/// The pause before each idle probe: longer than the cluster takes to go to sleep, shorter
/// than the gaps of a light workload.
pub const IDLE_PAUSE: Duration = Duration::from_millis(200);

/// What the probes measured, in ns.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingPath {
    /// The median over the counted back-to-back probes.
    pub median_ns: u64,
    /// Each counted back-to-back probe's time to first token less its prefill and KV transfer.
    pub samples_ns: Vec<u64>,
    /// Each counted back-to-back probe's time to first token.
    pub ttft_ns: Vec<u64>,
    /// The median over the idle probes.
    pub idle_median_ns: u64,
    /// Each idle probe's time to first token less its prefill and KV transfer.
    pub idle_samples_ns: Vec<u64>,
}

/// Sends [`PROBES`] probes to the target one after another, then [`IDLE_PROBES`] after
/// [`IDLE_PAUSE`] each.
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
    // One probe's TTFT, and that less its prefill and KV transfer.
    let probe = async |i: usize| -> Result<(u64, u64), LoadgenError> {
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
        Ok((ttft, ttft.saturating_sub(engine_ns)))
    };
    let mut samples_ns = Vec::with_capacity(PROBES);
    let mut ttft_ns = Vec::with_capacity(PROBES);
    for i in 0..PROBES {
        let (ttft, path) = probe(i).await?;
        if i > 0 {
            samples_ns.push(path);
            ttft_ns.push(ttft);
        }
    }
    let mut idle_samples_ns = Vec::with_capacity(IDLE_PROBES);
    for i in PROBES..PROBES + IDLE_PROBES {
        tokio::time::sleep(IDLE_PAUSE).await;
        idle_samples_ns.push(probe(i).await?.1);
    }
    Ok(ServingPath {
        median_ns: median(&samples_ns),
        samples_ns,
        ttft_ns,
        idle_median_ns: median(&idle_samples_ns),
        idle_samples_ns,
    })
}

fn median(ns: &[u64]) -> u64 {
    let mut sorted = ns.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}
