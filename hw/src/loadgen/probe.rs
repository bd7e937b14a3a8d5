//! The serving path: what a request's time to first token holds beyond its prefill and its
//! KV transfer (the request reaching an engine, the hand-offs between workers, the token
//! coming back), which the simulator takes as `serving_path_ms`, and as `serving_path_idle_ms`
//! for a request that finds nothing in flight.
//!
//! Probes go one at a time, each a one-token completion of a prompt shorter than a KV block,
//! so that nothing they leave enters a prefix cache or the router's index: first back to back
//! (the path of a busy cluster), then each after a pause (the path of an idle one, whose
//! threads and cores went to sleep: on a GPU machine it took twice as long or more).
//!
//! Probes of a longer prompt follow, back to back, each generating a few tokens (their KV
//! stays in the prefix caches, but their prompts are their own: no request finds it). Their
//! steps (in the workers' step traces, before the workload's) show how fast the machine runs as
//! the workload starts, against the profile that prices it. On a cluster that moves KV, against
//! the short probes they give the KV transfer and the decode worker's import as this cluster
//! runs them, a fixed part and a part per byte. (On an H200, the lone transfers of calibration
//! took 0.5-0.7 ms less per transfer than the cluster's, and its imports ran at 4.4 GB/s
//! against the cluster's 2.5-3.0.) More long probes follow, each after a pause, for the
//! spread of a transfer's time: a workload's transfers come both ways, and on an H200 one in
//! ten of them took 1.5-5 times the back-to-back median.
//!
//! Pairs of long probes follow, the second sent as the first's first token is due: the second
//! finds a request in flight, as a busy workload's requests do, and its first token's way back
//! is a loaded cluster's (on an H100 over half as long again as the back-to-back probes'). Where
//! workers share a device that runs one step at a time (processes on one GPU), the second's
//! prefill overlaps the first's decode steps, and on a second decode worker their decode steps
//! overlap each other. Their steps show how much steps sharing the device slow each other (on
//! an H200 two overlapping decode steps took 1.67 times their time alone, not the 2 of equal
//! shares).
//!
//! Each probe's trace splits its serving path into the way in (the server's acceptance to the
//! prefill's first step), on a cluster that moves KV the hand-off (the KV landed to the decode
//! worker's import of it) and the import, and the way back (the last of these to the first
//! token).

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

/// Probes of [`LONG_PROBE_TOKENS`] sent back to back.
pub const LONG_PROBES: usize = 12;

/// Probes of [`LONG_PROBE_TOKENS`] sent after [`IDLE_PAUSE`] each.
pub const IDLE_LONG_PROBES: usize = 12;

/// Pairs of long probes, the second sent the back-to-back long probes' median time to first
/// token after the first.
pub const PROBE_PAIRS: usize = 12;

/// Pairs of long probes where workers share a device that runs several steps at once
/// (single-threaded workers on the cores of one CPU), every other pair sent at once and the
/// rest as the pairs above: sent at once, on an aggregated cluster the two prefill side by
/// side, then decode side by side; staggered, the first decodes while the second prefills,
/// then on a second decode (or aggregated) worker the two decode side by side. Their steps
/// show how much steps in flight together slow each other although each has a core of its own.
pub const CO_RUNNING_PAIRS: usize = 10;

/// Tokens each co-running probe generates: decode steps enough for the first's to outlast the
/// second's prefill (on a 2-core machine, 256 tokens' prefill took as long as 30 decode steps).
pub const CO_RUNNING_OUTPUT_TOKENS: u32 = 48;

/// The long probes' prompt: the size of a typical request's KV, and one prefill step on every
/// engine the validation cases run (fewer where the engine's token budget or pool is smaller).
pub const LONG_PROBE_TOKENS: u32 = 256;

/// Tokens each long probe generates: a few decode steps of one sequence each.
pub const LONG_PROBE_OUTPUT_TOKENS: u32 = 8;

/// What the long probes measured, in ns.
#[derive(Clone, Debug, PartialEq)]
pub struct LongProbes {
    /// Their prompt's tokens.
    pub prompt_tokens: u32,
    /// The KV bytes each moved (0 where the cluster moves none).
    pub transfer_bytes: u64,
    /// Each back-to-back probe's transfer: its KV sent, to the receiver's ack.
    pub transfer_samples_ns: Vec<u64>,
    /// Each back-to-back probe's time to first token less its prefill and KV transfer (which
    /// holds the decode worker's import).
    pub samples_ns: Vec<u64>,
    /// Each back-to-back probe's time to first token.
    pub ttft_ns: Vec<u64>,
    /// Each paused probe's transfer.
    pub idle_transfer_samples_ns: Vec<u64>,
    /// The median of the back-to-back probes' imports (where the decode worker recorded them).
    pub import_median_ns: Option<u64>,
    /// The pairs sent.
    pub pairs: usize,
    /// The median way back of each pair's second probe, sent while the first was in flight.
    pub loaded_back_median_ns: u64,
}

/// What the probes measured, in ns.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingPath {
    /// The median over the counted back-to-back probes.
    pub median_ns: u64,
    /// Each counted back-to-back probe's time to first token less its prefill and KV transfer.
    pub samples_ns: Vec<u64>,
    /// Each counted back-to-back probe's time to first token.
    pub ttft_ns: Vec<u64>,
    /// The median over the counted back-to-back probes of the way in: the server's acceptance
    /// to the prefill's first step.
    pub front_median_ns: u64,
    /// The median of their hand-offs: the KV landed to the decode worker's import of it (where
    /// the decode worker recorded one).
    pub handoff_median_ns: Option<u64>,
    /// The median of their imports.
    pub import_median_ns: Option<u64>,
    /// The idle probes' medians of the way in and of the way back.
    pub idle_front_median_ns: u64,
    pub idle_back_median_ns: u64,
    /// The median over the idle probes.
    pub idle_median_ns: u64,
    /// Each idle probe's time to first token less its prefill and KV transfer.
    pub idle_samples_ns: Vec<u64>,
    /// The KV bytes each short probe moved (0 where the cluster moves none).
    pub transfer_bytes: u64,
    /// Each counted back-to-back probe's transfer: its KV sent, to the receiver's ack.
    pub transfer_samples_ns: Vec<u64>,
    /// The long probes.
    pub long: LongProbes,
}

/// One probe's answer, in ns.
struct Sample {
    ttft_ns: u64,
    /// The server's acceptance to the prefill's first step.
    front_ns: u64,
    /// The KV landed to the decode worker's import, and the import.
    handoff_ns: Option<u64>,
    import_ns: Option<u64>,
    /// The last of the prefill, the transfer and the import to the first token.
    back_ns: u64,
    /// The time to first token less the prefill and the KV transfer.
    path_ns: u64,
    transfer_ns: u64,
    transfer_bytes: u64,
}

/// Sends [`PROBES`] probes to the target one after another, then [`IDLE_PROBES`] after
/// [`IDLE_PAUSE`] each, then [`LONG_PROBES`] long ones one after another,
/// [`IDLE_LONG_PROBES`] after the pause each, then [`PROBE_PAIRS`] pairs, and where the
/// scenario's workers share a device that runs several steps at once, [`CO_RUNNING_PAIRS`].
pub async fn serving_path(
    scenario: &Scenario,
    options: &BenchOptions,
) -> Result<ServingPath, LoadgenError> {
    let (target, http) = connect(options)?;
    let vocab = vocab_size(scenario)?;
    let model = model(&http, target, options).await?;
    let (short_tokens, long_tokens) = probe_tokens(scenario);
    let url = format!("{target}/v1/completions");
    let failed = |i: usize, message: String| LoadgenError::Target {
        url: url.clone(),
        message: format!("serving-path probe {i}: {message}"),
    };
    let probe =
        async |i: usize, prompt_tokens: u32, max_tokens: u32| -> Result<Sample, LoadgenError> {
            let body = streamed_completion(
                &model,
                probe_prompt(i as u64, prompt_tokens, vocab),
                max_tokens,
            );
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
            let ready_ns = trace.prefill_end_ns.max(trace.transfer_end_ns);
            let engine_ns = ready_ns.saturating_sub(trace.prefill_start_ns);
            let imported = trace.transfer_bytes > 0 && trace.import_end_ns > 0;
            Ok(Sample {
                ttft_ns: ttft,
                front_ns: trace.prefill_start_ns,
                handoff_ns: imported
                    .then(|| trace.import_start_ns.saturating_sub(trace.transfer_end_ns)),
                import_ns: imported
                    .then(|| trace.import_end_ns.saturating_sub(trace.import_start_ns)),
                back_ns: ttft.saturating_sub(ready_ns.max(trace.import_end_ns)),
                path_ns: ttft.saturating_sub(engine_ns),
                transfer_ns: trace
                    .transfer_end_ns
                    .saturating_sub(trace.transfer_start_ns),
                transfer_bytes: trace.transfer_bytes,
            })
        };
    let mut samples_ns = Vec::with_capacity(PROBES);
    let mut ttft_ns = Vec::with_capacity(PROBES);
    let mut front_ns = Vec::with_capacity(PROBES);
    let mut handoff_ns = Vec::with_capacity(PROBES);
    let mut import_ns = Vec::with_capacity(PROBES);
    let mut transfer_samples_ns = Vec::with_capacity(PROBES);
    let mut transfer_bytes = 0;
    for i in 0..PROBES {
        let s = probe(i, short_tokens, 1).await?;
        if i > 0 {
            samples_ns.push(s.path_ns);
            ttft_ns.push(s.ttft_ns);
            front_ns.push(s.front_ns);
            handoff_ns.extend(s.handoff_ns);
            import_ns.extend(s.import_ns);
            transfer_samples_ns.push(s.transfer_ns);
            transfer_bytes = s.transfer_bytes;
        }
    }
    let mut idle_samples_ns = Vec::with_capacity(IDLE_PROBES);
    let mut idle_front_ns = Vec::with_capacity(IDLE_PROBES);
    let mut idle_back_ns = Vec::with_capacity(IDLE_PROBES);
    for i in PROBES..PROBES + IDLE_PROBES {
        tokio::time::sleep(IDLE_PAUSE).await;
        let s = probe(i, short_tokens, 1).await?;
        idle_samples_ns.push(s.path_ns);
        idle_front_ns.push(s.front_ns);
        idle_back_ns.push(s.back_ns);
    }
    let mut long = LongProbes {
        prompt_tokens: long_tokens,
        transfer_bytes: 0,
        transfer_samples_ns: Vec::with_capacity(LONG_PROBES),
        samples_ns: Vec::with_capacity(LONG_PROBES),
        ttft_ns: Vec::with_capacity(LONG_PROBES),
        idle_transfer_samples_ns: Vec::with_capacity(IDLE_LONG_PROBES),
        import_median_ns: None,
        pairs: 0,
        loaded_back_median_ns: 0,
    };
    let mut long_import_ns = Vec::with_capacity(LONG_PROBES);
    let first = PROBES + IDLE_PROBES;
    for i in first..first + LONG_PROBES {
        let s = probe(i, long_tokens, LONG_PROBE_OUTPUT_TOKENS).await?;
        long.transfer_bytes = s.transfer_bytes;
        long.transfer_samples_ns.push(s.transfer_ns);
        long.samples_ns.push(s.path_ns);
        long.ttft_ns.push(s.ttft_ns);
        long_import_ns.extend(s.import_ns);
    }
    long.import_median_ns = median_of(&long_import_ns);
    let first = first + LONG_PROBES;
    for i in first..first + IDLE_LONG_PROBES {
        tokio::time::sleep(IDLE_PAUSE).await;
        let s = probe(i, long_tokens, LONG_PROBE_OUTPUT_TOKENS).await?;
        long.idle_transfer_samples_ns.push(s.transfer_ns);
    }
    let first = first + IDLE_LONG_PROBES;
    let stagger = Duration::from_nanos(median(&long.ttft_ns));
    let mut loaded_back_ns = Vec::with_capacity(PROBE_PAIRS);
    for pair in 0..PROBE_PAIRS {
        let i = first + 2 * pair;
        let (a, b) = tokio::join!(probe(i, long_tokens, LONG_PROBE_OUTPUT_TOKENS), async {
            tokio::time::sleep(stagger).await;
            probe(i + 1, long_tokens, LONG_PROBE_OUTPUT_TOKENS).await
        });
        a?;
        loaded_back_ns.push(b?.back_ns);
    }
    long.pairs = PROBE_PAIRS;
    long.loaded_back_median_ns = median(&loaded_back_ns);
    let co_running = scenario
        .setups
        .first()
        .filter(|s| s.workers_per_device >= 2 && s.device.parallelism >= 2);
    if let Some(setup) = co_running {
        let first = first + 2 * PROBE_PAIRS;
        let tokens = setup.engine.max_model_len.map_or(long_tokens, |l| {
            long_tokens.min(l.saturating_sub(CO_RUNNING_OUTPUT_TOKENS).max(1))
        });
        for pair in 0..CO_RUNNING_PAIRS {
            let i = first + 2 * pair;
            let pause = if pair % 2 == 0 {
                Duration::ZERO
            } else {
                stagger
            };
            let (a, b) = tokio::join!(probe(i, tokens, CO_RUNNING_OUTPUT_TOKENS), async {
                tokio::time::sleep(pause).await;
                probe(i + 1, tokens, CO_RUNNING_OUTPUT_TOKENS).await
            });
            a?;
            b?;
        }
    }
    Ok(ServingPath {
        median_ns: median(&samples_ns),
        samples_ns,
        ttft_ns,
        front_median_ns: median(&front_ns),
        handoff_median_ns: median_of(&handoff_ns),
        import_median_ns: median_of(&import_ns),
        idle_front_median_ns: median(&idle_front_ns),
        idle_back_median_ns: median(&idle_back_ns),
        idle_median_ns: median(&idle_samples_ns),
        idle_samples_ns,
        transfer_bytes,
        transfer_samples_ns,
        long,
    })
}

/// Requests that warm a fresh cluster before a repeat of a workload, as the probes warmed the
/// first: the connections opened and each worker's first steps run, two short requests one
/// after the other, then two long ones at once (a router with two workers of a role sends one
/// to each). Their prompts are the probes' kind, which no workload prompt shares.
pub async fn warm(scenario: &Scenario, options: &BenchOptions) -> Result<(), LoadgenError> {
    let (target, http) = connect(options)?;
    let vocab = vocab_size(scenario)?;
    let model = model(&http, target, options).await?;
    let url = format!("{target}/v1/completions");
    let (short_tokens, long_tokens) = probe_tokens(scenario);
    let send = async |i: u64, prompt_tokens: u32| -> Result<(), LoadgenError> {
        let body = streamed_completion(
            &model,
            probe_prompt(i, prompt_tokens, vocab),
            LONG_PROBE_OUTPUT_TOKENS,
        );
        client::complete(&http, &url, &body, Instant::now(), options.request_timeout)
            .await
            .map(drop)
            .map_err(|reason| LoadgenError::Target {
                url: url.clone(),
                message: format!("warm-up request {i}: {reason}"),
            })
    };
    // Past the probes' numbers: no warm-up prompt is a probe's either.
    let first = 100_000;
    send(first, short_tokens).await?;
    send(first + 1, short_tokens).await?;
    let (a, b) = tokio::join!(send(first + 2, long_tokens), send(first + 3, long_tokens));
    a.and(b)
}

/// Probe `i`'s prompt: distinct for each `i`, so that no probe finds another's KV.
fn probe_prompt(i: u64, tokens: u32, vocab: u32) -> Vec<u32> {
    (0..tokens)
        .map(|k| ((i * 7919 + u64::from(k) * 104_729 + 17) % u64::from(vocab)) as u32)
        .collect()
}

/// The short and long probes' prompt lengths for the scenario's engine: under a block, and
/// [`LONG_PROBE_TOKENS`] where one step, a quarter of the pool and the model's length allow.
fn probe_tokens(scenario: &Scenario) -> (u32, u32) {
    let block = super::block_size_tokens(scenario);
    let short = block.saturating_sub(1).clamp(1, 8);
    let long = scenario.setups.first().map_or(LONG_PROBE_TOKENS, |s| {
        let e = &s.engine;
        let pool_tokens = e
            .kv_blocks
            .map_or(u32::MAX, |b| b.saturating_mul(block) / 4);
        let longest = e
            .max_model_len
            .map_or(u32::MAX, |l| l.saturating_sub(LONG_PROBE_OUTPUT_TOKENS));
        LONG_PROBE_TOKENS
            .min(e.max_batched_tokens)
            .min(pool_tokens)
            .min(longest)
            .max(short)
    });
    (short, long)
}

/// The middle sample (the upper one of an even count).
pub fn median(ns: &[u64]) -> u64 {
    let mut sorted = ns.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}

/// The median, `None` of no samples.
fn median_of(ns: &[u64]) -> Option<u64> {
    (!ns.is_empty()).then(|| median(ns))
}
