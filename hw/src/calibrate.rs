//! `disagg-hw calibrate`: measures what the simulator needs to predict this engine on this
//! device, and writes it as a [`Profile`] plus every raw sample as CSV.
//!
//! Each step sample is exactly what the engine does per iteration: one
//! [`PagedModel::step`] over the batch, the logits brought to the host, and a sample from each
//! row whose sequence has no pending token left (greedy, as the load generator asks). Cached
//! context is not computed for every sample: one sequence (the donor) is prefilled for real
//! once and its KV imported wherever a sample needs context, so each sequence still owns its
//! own blocks, as in serving. KV transfers are real exports sent as [`KvTransfer`]s over the
//! TCP transport to a listener in the same process, then imported into another instance.

use crate::paged::{KvExport, PagedError, PagedModel, SeqId};
use crate::transport::tcp::{TcpKvListener, TcpTransport};
use crate::transport::{KvTransfer, KvTransport, TransportError, model_fingerprint};
use indicatif::ProgressBar;
use models::runtime::{Model, RuntimeError, Sampler, SamplingParams};
use sim::calibration::{
    Accuracy, ContextTable, DecodeTable, FitError, GraphShapes, Meta, MixedStep, MixedSteps,
    PrefillTable, Profile, ProfileError, StepShape, TransferTable, fit_link,
};
use sim::cost::{CostModel, Measured};
use sim::kv::token_block_hashes;
use sim::network::LinkKind;
use std::io::Write;
use std::time::Instant;

/// The name of the link fitted to transfers over the TCP transport on loopback.
pub const TCP_LOOPBACK: &str = "tcp-loopback";

/// Tokens of each donor prefill step.
const DONOR_CHUNK_TOKENS: usize = 256;

/// Untimed steps before a shape's timed ones, in every pass: the first step after another
/// shape pays for what that one left behind (memory to map, cold caches), which a server
/// repeating a shape does not.
const WARM_UP_STEPS: usize = 1;

/// `Plan::passes` on a GPU: a pass takes seconds there, and the steps that launch their kernels
/// one by one (several prefills, mixed steps) move with the host's speed, which drifts.
pub const GPU_PASSES: usize = 15;

/// What to measure. Grids must be strictly increasing; mixed steps should sit on the grids so
/// that they test the mixing rule, not the interpolation.
#[derive(Clone, Debug)]
pub struct Plan {
    pub prefill_seqs: Vec<u32>,
    pub prefill_tokens: Vec<u32>,
    /// Chunk sizes of the prefill-after-context table (each in `prefill_tokens`).
    pub context_chunk_tokens: Vec<u32>,
    /// Cached contexts of that table; empty for no table.
    pub context_tokens: Vec<u32>,
    pub decode_seqs: Vec<u32>,
    pub decode_context_tokens: Vec<u32>,
    /// Decodes plus one prefill chunk (`prefill_seqs` is taken as 1).
    pub mixed: Vec<StepShape>,
    /// Steps off every grid, measured only to check the interpolation.
    pub checks: Vec<StepShape>,
    /// Prompt lengths whose KV is transferred.
    pub transfer_tokens: Vec<u32>,
    /// Timed repeats of each step in each pass.
    pub prefill_repeats: usize,
    pub step_repeats: usize,
    pub transfer_repeats: usize,
    /// Sweeps over every step grid; a step's time is the median over all of them, so that a
    /// machine that drifts over minutes (a shared or virtual one) weighs on every point alike.
    pub passes: usize,
}

impl Plan {
    /// Covers prompts up to ~1000 tokens, decode batches up to 32 and contexts up to ~1500;
    /// about five minutes for SmolLM2-135M in f32 on two CPU cores.
    pub fn full() -> Plan {
        Plan {
            prefill_seqs: vec![1, 2],
            // Prefill grows faster than linearly: points every 1.5x past 256 tokens.
            prefill_tokens: vec![16, 32, 64, 128, 256, 384, 512, 768, 1024],
            context_chunk_tokens: vec![16, 64, 256, 512],
            context_tokens: vec![128, 256, 512, 1024, 1536],
            // Every batch up to 6: on a CPU a step's matrix kernels change tiles there (on two
            // cores, 5 decodes took 1.45 times 4's, 8 only 1.2 times 5's).
            decode_seqs: vec![1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32],
            decode_context_tokens: vec![16, 128, 512, 1024, 1536],
            mixed: vec![
                mixed(1, 128, 64, 0),
                mixed(4, 512, 16, 0),
                mixed(4, 512, 256, 0),
                mixed(16, 128, 64, 0),
                mixed(16, 512, 16, 512),
                mixed(16, 1024, 256, 0),
                mixed(32, 512, 64, 0),
                mixed(8, 1024, 64, 1024),
            ],
            checks: vec![
                StepShape::prefill(4, 128, 0),
                StepShape::prefill(2, 192, 0),
                StepShape::prefill(1, 128, 768),
                // Chunks after a shared prefix, as multi-turn serving meets them.
                StepShape::prefill(1, 171, 128),
                StepShape::prefill(1, 358, 128),
                StepShape::decode(3, 64),
                StepShape::decode(12, 768),
                StepShape::decode(24, 320),
                mixed(6, 300, 100, 0),
            ],
            transfer_tokens: vec![16, 64, 256, 512, 1024, 2048],
            prefill_repeats: 2,
            step_repeats: 3,
            transfer_repeats: 9,
            passes: 3,
        }
    }

    /// A few points of each kind: checks that everything runs, in seconds.
    pub fn quick() -> Plan {
        Plan {
            prefill_seqs: vec![1, 2],
            prefill_tokens: vec![8, 32],
            context_chunk_tokens: vec![8],
            context_tokens: vec![32],
            decode_seqs: vec![1, 4],
            decode_context_tokens: vec![16, 64],
            mixed: vec![mixed(2, 64, 32, 0), mixed(1, 16, 8, 32)],
            checks: vec![StepShape::decode(2, 40)],
            transfer_tokens: vec![16, 2048],
            prefill_repeats: 1,
            step_repeats: 3,
            transfer_repeats: 3,
            passes: 1,
        }
    }

    /// Leaves out what an engine within `limits` never runs, so that a sweep measures only
    /// the steps its cases can take. Step tokens cut exactly: prefill lengths and context
    /// chunks past the limit go, as do mixed steps and checks holding more. Contexts and
    /// decode batches keep the first grid point at or past their limit, so that every step
    /// within it is interpolated, not extended; mixed steps and checks past that point go.
    /// Refused where a grid would be left empty.
    pub fn limit(&mut self, limits: &Limits) -> Result<(), CalibrateError> {
        if let Some(max) = limits.step_tokens {
            for (name, grid) in [
                ("prefill length", &self.prefill_tokens),
                ("context chunk", &self.context_chunk_tokens),
            ] {
                if grid.first().is_none_or(|&t| t > max) {
                    return Err(CalibrateError::Plan(format!(
                        "max_step_tokens {max} leaves no {name} (the shortest is {})",
                        grid.first().copied().unwrap_or(0)
                    )));
                }
            }
            self.prefill_tokens.retain(|&t| t <= max);
            self.context_chunk_tokens.retain(|&t| t <= max);
            self.mixed.retain(|s| s.tokens() <= max);
            self.checks.retain(|s| s.tokens() <= max);
        }
        if let Some(max) = limits.context_tokens {
            let decode = cover(&mut self.decode_context_tokens, max);
            let cached = cover(&mut self.context_tokens, max);
            let within = |s: &StepShape| {
                s.decode_context_tokens <= decode && s.prefill_context_tokens <= cached
            };
            self.mixed.retain(within);
            self.checks.retain(within);
        }
        if let Some(max) = limits.num_seqs {
            let decode = cover(&mut self.decode_seqs, max);
            let prefill = cover(&mut self.prefill_seqs, max);
            let within = |s: &StepShape| s.decode_seqs <= decode && s.prefill_seqs <= prefill;
            self.mixed.retain(within);
            self.checks.retain(within);
        }
        Ok(())
    }

    /// Adds every length that an engine replaying recorded prefills runs one as (the multiples
    /// of `bucket` up to `longest`) to the prefill lengths and context chunks, within each
    /// grid's range: between the grid's points the GPU's matrix kernels change tiles (on an
    /// H100, chunks after 128 cached tokens run as 320-token graphs took 2.80 ms, as long as
    /// 384-token ones, where the line between 256 and 384 priced them at 2.5 ms), so every
    /// length the engine runs is measured, not interpolated.
    pub fn add_graph_buckets(&mut self, bucket: u32, longest: u32) {
        if bucket == 0 {
            return;
        }
        for grid in [&mut self.prefill_tokens, &mut self.context_chunk_tokens] {
            let top = grid.last().copied().unwrap_or(0).min(longest);
            grid.extend((1..).map(|k| k * bucket).take_while(|&t| t <= top));
            grid.sort_unstable();
            grid.dedup();
        }
    }

    /// The decode grid's steps, row by row (sequences x context).
    fn decode_shapes(&self) -> Vec<StepShape> {
        cells(
            &self.decode_seqs,
            &self.decode_context_tokens,
            StepShape::decode,
        )
    }

    /// The prefill grid's steps (sequences x tokens, from an empty cache).
    fn prefill_shapes(&self) -> Vec<StepShape> {
        cells(&self.prefill_seqs, &self.prefill_tokens, |b, t| {
            StepShape::prefill(b, t, 0)
        })
    }

    /// The prefill-after-context grid's steps (chunk tokens x cached context).
    fn context_shapes(&self) -> Vec<StepShape> {
        cells(&self.context_chunk_tokens, &self.context_tokens, |t, c| {
            StepShape::prefill(1, t, c)
        })
    }

    /// Timed samples the plan takes, for the progress bar.
    fn samples(&self) -> u64 {
        let prefill = self.prefill_seqs.len() * self.prefill_tokens.len();
        let context = self.context_chunk_tokens.len() * self.context_tokens.len();
        let decode = self.decode_seqs.len() * self.decode_context_tokens.len();
        let steps = decode + self.mixed.len() + self.checks.len();
        (((prefill + context) * self.prefill_repeats + steps * self.step_repeats) * self.passes
            + self.transfer_tokens.len() * self.transfer_repeats) as u64
    }

    fn check(&self) -> Result<(), CalibrateError> {
        let grids: [(&str, &[u32]); 6] = [
            ("prefill_seqs", &self.prefill_seqs),
            ("prefill_tokens", &self.prefill_tokens),
            ("decode_seqs", &self.decode_seqs),
            ("decode_context_tokens", &self.decode_context_tokens),
            ("transfer_tokens", &self.transfer_tokens),
            ("context_chunk_tokens", &self.context_chunk_tokens),
        ];
        for (name, grid) in grids {
            if grid.is_empty() || grid.contains(&0) || grid.windows(2).any(|w| w[0] >= w[1]) {
                return Err(CalibrateError::Plan(format!(
                    "{name} must be positive and strictly increasing"
                )));
            }
        }
        if !self.context_tokens.is_empty() {
            let c = &self.context_tokens;
            if c.contains(&0) || c.windows(2).any(|w| w[0] >= w[1]) {
                return Err(CalibrateError::Plan(
                    "context_tokens must be positive and strictly increasing".into(),
                ));
            }
            if self.prefill_seqs[0] != 1
                || self
                    .context_chunk_tokens
                    .iter()
                    .any(|t| !self.prefill_tokens.contains(t))
            {
                return Err(CalibrateError::Plan(
                    "a context table needs prefill_seqs to start at 1 and its chunk sizes in \
                     prefill_tokens"
                        .into(),
                ));
            }
        }
        if self.prefill_repeats == 0
            || self.step_repeats == 0
            || self.transfer_repeats == 0
            || self.passes == 0
        {
            return Err(CalibrateError::Plan(
                "repeats and passes must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// What the engines a profile is for can run: the cluster's `max_batched_tokens`, the longest
/// context its workloads reach, and its `max_num_seqs`. `None` is no limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub step_tokens: Option<u32>,
    pub context_tokens: Option<u32>,
    pub num_seqs: Option<u32>,
}

/// Cuts an increasing grid after its first point at or past `max` (keeping it whole where
/// none is) and returns how far steps still reach: that point, or `max` where the grid
/// stops short of it.
fn cover(grid: &mut Vec<u32>, max: u32) -> u32 {
    if let Some(i) = grid.iter().position(|&x| x >= max) {
        grid.truncate(i + 1);
    }
    grid.last().map_or(max, |&last| last.max(max))
}

/// `decode_seqs` decodes after `decode_context` each and one chunk of `prefill_tokens` after
/// `prefill_context`.
fn mixed(
    decode_seqs: u32,
    decode_context: u32,
    prefill_tokens: u32,
    prefill_context: u32,
) -> StepShape {
    StepShape {
        decode_seqs,
        decode_context_tokens: decode_context,
        prefill_seqs: 1,
        prefill_tokens,
        prefill_context_tokens: prefill_context,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Paged(#[from] PagedError),
    #[error("KV transfer: {0}")]
    Transport(#[from] TransportError),
    #[error("the profile: {0}")]
    Profile(#[from] ProfileError),
    #[error("fitting {TCP_LOOPBACK}: {0}")]
    Fit(#[from] FitError),
    #[error("plan: {0}")]
    Plan(String),
    #[error("the KV listener stopped before delivering a transfer")]
    ListenerStopped,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What one timed sample measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Prefill,
    PrefillContext,
    Decode,
    Mixed,
    Check,
    Transfer,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Prefill => "prefill",
            Kind::PrefillContext => "prefill_context",
            Kind::Decode => "decode",
            Kind::Mixed => "mixed",
            Kind::Check => "check",
            Kind::Transfer => "transfer",
        }
    }
}

/// One timed sample. For steps, `shape` is what ran (decode contexts as they were at that
/// step); for transfers, the prompt tokens are `shape.prefill_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub kind: Kind,
    pub repeat: u32,
    pub shape: StepShape,
    pub payload_bytes: u64,
    pub time_ns: u64,
    pub export_ns: u64,
    pub send_ns: u64,
    pub import_ns: u64,
}

/// A measured off-grid step beside the profile's prediction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CheckPoint {
    pub shape: StepShape,
    pub measured_ns: u64,
    pub model_ns: u64,
}

/// A calibration run's results.
#[derive(Clone, Debug)]
pub struct Calibration {
    pub profile: Profile,
    pub samples: Vec<Sample>,
    pub checks: Vec<CheckPoint>,
}

/// The median of the samples, the mean of the two middle ones for an even count.
fn median(values: &[u64]) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    match n {
        0 => 0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]).div_ceil(2),
    }
}

fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

/// Runs the plan on `model` and returns the profile (with `meta`), its samples and the
/// off-grid checks. `bar` counts timed samples.
pub fn run(
    model: Model,
    plan: &Plan,
    meta: Meta,
    bar: &ProgressBar,
) -> Result<Calibration, CalibrateError> {
    plan.check()?;
    let block_size = meta.block_size_tokens as usize;
    if block_size == 0 {
        return Err(CalibrateError::Plan(
            "block_size_tokens must be positive".into(),
        ));
    }
    bar.set_length(plan.samples());
    // The engine pads its replayed prefills; the profile says so, so that they are priced so.
    let graphs = model
        .prefill_graph_shape()
        .map(|(bucket, longest)| GraphShapes {
            prefill_bucket_tokens: bucket as u32,
            prefill_max_tokens: longest as u32,
        });
    let mut bench = Bench::new(model.clone(), plan, block_size)?;
    bar.set_message("prefilling the donor sequence");
    bench.build_donor(plan)?;

    let (decode_shapes, prefill_shapes, context_shapes) = (
        plan.decode_shapes(),
        plan.prefill_shapes(),
        plan.context_shapes(),
    );
    let mixed_shapes: Vec<StepShape> = plan
        .mixed
        .iter()
        .map(|s| StepShape {
            prefill_seqs: 1,
            ..*s
        })
        .collect();
    // Decode first: its cells are cheap and the most numerous, so the bar's estimate settles.
    let grids: [(Kind, &str, &[StepShape], usize); 5] = [
        (Kind::Decode, "decode", &decode_shapes, plan.step_repeats),
        (
            Kind::Prefill,
            "prefill",
            &prefill_shapes,
            plan.prefill_repeats,
        ),
        (
            Kind::PrefillContext,
            "prefill after context",
            &context_shapes,
            plan.prefill_repeats,
        ),
        (Kind::Mixed, "mixed", &mixed_shapes, plan.step_repeats),
        (Kind::Check, "check", &plan.checks, plan.step_repeats),
    ];
    let mut samples: Vec<Vec<Vec<u64>>> = grids
        .iter()
        .map(|(_, _, shapes, _)| vec![Vec::new(); shapes.len()])
        .collect();
    for pass in 0..plan.passes {
        for ((kind, what, shapes, repeats), samples) in grids.iter().zip(&mut samples) {
            for (&shape, samples) in shapes.iter().zip(samples) {
                bar.set_message(format!(
                    "pass {}/{}: {what} {}",
                    pass + 1,
                    plan.passes,
                    describe(&shape)
                ));
                samples.extend(bench.measure(*kind, shape, *repeats, bar)?);
            }
        }
    }
    let mut medians = samples
        .iter()
        .map(|points| points.iter().map(|s| median(s)).collect::<Vec<u64>>());
    let mut next = || medians.next().expect("one per grid");
    let (decode, prefill, context, mixed, checks) = (next(), next(), next(), next(), next());
    let rows = |medians: Vec<u64>, cols: usize| -> Vec<Vec<u64>> {
        medians.chunks(cols).map(<[u64]>::to_vec).collect()
    };
    let (step_repeats, prefill_repeats) = (
        (plan.step_repeats * plan.passes) as u32,
        (plan.prefill_repeats * plan.passes) as u32,
    );
    let prefill_context = (!plan.context_tokens.is_empty()).then(|| ContextTable {
        repeats: prefill_repeats,
        tokens: plan.context_chunk_tokens.clone(),
        context_tokens: plan.context_tokens.clone(),
        time_ns: rows(context, plan.context_tokens.len()),
    });
    bar.set_message("KV transfers over TCP on loopback");
    let transfer = bench.transfers(model, plan, bar)?;
    let link = fit_link(TCP_LOOPBACK, LinkKind::Tcp, &transfer)?;

    let mut profile = Profile {
        meta,
        graphs,
        prefill: PrefillTable {
            repeats: prefill_repeats,
            seqs: plan.prefill_seqs.clone(),
            tokens: plan.prefill_tokens.clone(),
            time_ns: rows(prefill, plan.prefill_tokens.len()),
        },
        prefill_context,
        decode: DecodeTable {
            repeats: step_repeats,
            seqs: plan.decode_seqs.clone(),
            context_tokens: plan.decode_context_tokens.clone(),
            time_ns: rows(decode, plan.decode_context_tokens.len()),
        },
        mixed: MixedSteps {
            shared_ns: 0,
            repeats: step_repeats,
            step: mixed_shapes
                .iter()
                .zip(mixed)
                .map(|(s, time_ns)| MixedStep {
                    decode_seqs: s.decode_seqs,
                    decode_context_tokens: s.decode_context_tokens,
                    prefill_tokens: s.prefill_tokens,
                    prefill_context_tokens: s.prefill_context_tokens,
                    time_ns,
                })
                .collect(),
        },
        transfer: vec![transfer],
        link: vec![link],
    };
    profile.fit_shared_ns()?;
    let model = Measured::new(&profile)?;
    let checks = plan
        .checks
        .iter()
        .zip(checks)
        .map(|(&shape, measured_ns)| CheckPoint {
            shape,
            measured_ns,
            model_ns: model.step_ns(&shape.work()),
        })
        .collect();
    bar.finish_and_clear();
    Ok(Calibration {
        profile,
        samples: bench.samples,
        checks,
    })
}

/// Every (row, column) of a grid as a shape, row-major.
fn cells(rows: &[u32], cols: &[u32], shape: impl Fn(u32, u32) -> StepShape) -> Vec<StepShape> {
    rows.iter()
        .flat_map(|&r| cols.iter().map(move |&c| (r, c)))
        .map(|(r, c)| shape(r, c))
        .collect()
}

fn describe(s: &StepShape) -> String {
    let mut parts = Vec::new();
    if s.decode_seqs > 0 {
        parts.push(format!(
            "{} x decode @{}",
            s.decode_seqs, s.decode_context_tokens
        ));
    }
    if s.prefill_seqs > 0 {
        parts.push(format!(
            "{} x {} tokens @{}",
            s.prefill_seqs, s.prefill_tokens, s.prefill_context_tokens
        ));
    }
    parts.join(" + ")
}

/// The model under measurement, its KV pool and the donor's KV.
struct Bench {
    paged: PagedModel,
    sampler: Sampler,
    block_size: usize,
    /// Token ids long enough for any prompt of the plan.
    tokens: Vec<u32>,
    /// The donor's KV: whole blocks of real KV, tiled where a longer context is needed.
    donor: Option<KvExport>,
    samples: Vec<Sample>,
}

impl Bench {
    fn new(model: Model, plan: &Plan, block_size: usize) -> Result<Bench, CalibrateError> {
        let blocks = |tokens: u32| (tokens as usize).div_ceil(block_size);
        let repeats = (plan.step_repeats.max(plan.prefill_repeats) + WARM_UP_STEPS) as u32 + 1;
        let shape_blocks = |s: &StepShape| {
            s.decode_seqs as usize * blocks(s.decode_context_tokens + repeats)
                + s.prefill_seqs as usize * blocks(s.prefill_context_tokens + s.prefill_tokens)
        };
        let (decode, prefill, context) = (
            plan.decode_shapes(),
            plan.prefill_shapes(),
            plan.context_shapes(),
        );
        let max_transfer = plan.transfer_tokens.iter().max().copied().unwrap_or(0);
        let pool = decode
            .iter()
            .chain(&prefill)
            .chain(&context)
            .chain(&plan.mixed)
            .chain(&plan.checks)
            .map(shape_blocks)
            .chain([
                blocks(donor_tokens(plan, block_size)),
                blocks(max_transfer + 1),
            ])
            .max()
            .unwrap_or(1)
            + 2;
        let vocab = model.spec().vocab_size as usize;
        let longest = donor_tokens(plan, block_size) as usize
            + max_transfer as usize
            + plan.prefill_tokens.last().copied().unwrap_or(0) as usize
            + 2 * block_size;
        // The serving engine runs every matmul shape once at start; so does the bench, so that
        // the profile prices steps as a warm server runs them.
        let all = || {
            decode
                .iter()
                .chain(&prefill)
                .chain(&context)
                .chain(&plan.mixed)
        };
        let max_tokens = all()
            .map(|s| s.tokens() as usize)
            .chain([max_transfer as usize + 1])
            .max()
            .unwrap_or(1);
        let max_seqs = all()
            .map(|s| (s.decode_seqs + s.prefill_seqs) as usize)
            .max()
            .unwrap_or(1);
        model.warm_up_matmuls(max_tokens, max_seqs)?;
        Ok(Bench {
            paged: PagedModel::new(model, pool as u32, block_size as u32, false)?,
            sampler: Sampler::new(&SamplingParams::greedy(1))?,
            block_size,
            tokens: (0..longest)
                .map(|i| ((i * 7919 + 17) % vocab) as u32)
                .collect(),
            donor: None,
            samples: Vec::new(),
        })
    }

    /// Prefills the donor in chunks, as chunked prefill would, and keeps its KV.
    fn build_donor(&mut self, plan: &Plan) -> Result<(), CalibrateError> {
        let n = donor_tokens(plan, self.block_size) as usize;
        let (id, _) = self.paged.admit(&self.tokens[..n])?;
        while self.paged.pending_tokens(id)? > 0 {
            self.paged.step(&[(id, DONOR_CHUNK_TOKENS)])?;
        }
        self.donor = Some(self.paged.export(id, 0)?);
        self.paged.release(id)?;
        Ok(())
    }

    /// A sequence's export with `kv_len` tokens of KV and `pending` tokens after them: the
    /// donor's blocks (repeated cyclically past its length) and matching tokens and hashes.
    fn kv(&self, kv_len: usize, pending: usize) -> KvExport {
        let donor = self.donor.as_ref().expect("the donor is built first");
        let bs = self.block_size;
        let full = (donor.kv_len / bs).max(1);
        let period = full * bs;
        let tokens: Vec<u32> = (0..kv_len + pending)
            .map(|i| donor.tokens[i % period])
            .collect();
        KvExport {
            block_hashes: token_block_hashes(&tokens[..kv_len], bs as u32),
            kv_len,
            first_block: 0,
            blocks: (0..kv_len.div_ceil(bs))
                .map(|b| donor.blocks[b % full].clone())
                .collect(),
            device: None,
            tokens,
        }
    }

    /// One engine step as the engine runs it: the forward pass, the logits to the host, a
    /// token sampled for every sequence with nothing left pending. Returns its time and the
    /// sampled tokens.
    fn step(
        &mut self,
        work: &[(SeqId, usize)],
    ) -> Result<(u64, Vec<(SeqId, u32)>), CalibrateError> {
        let start = Instant::now();
        let rows = self
            .paged
            .step(work)?
            .to_vec2::<f32>()
            .map_err(RuntimeError::from)?;
        let mut sampled = Vec::with_capacity(work.len());
        for (&(id, _), row) in work.iter().zip(&rows) {
            if self.paged.pending_tokens(id)? == 0 {
                sampled.push((id, self.sampler.sample(row)?));
            }
        }
        Ok((elapsed_ns(start), sampled))
    }

    /// `repeats` timed steps of `shape`, after [`WARM_UP_STEPS`] untimed ones. Decoding
    /// sequences are set up once and decode on from step to step, starting so that the middle
    /// timed step sees the nominal context; prefill sequences are set up afresh for every step.
    fn measure(
        &mut self,
        kind: Kind,
        shape: StepShape,
        repeats: usize,
        bar: &ProgressBar,
    ) -> Result<Vec<u64>, CalibrateError> {
        let start_context = (shape.decode_context_tokens as usize)
            .saturating_sub(repeats / 2 + WARM_UP_STEPS)
            .max(1);
        let mut decodes = Vec::with_capacity(shape.decode_seqs as usize);
        if shape.decode_seqs > 0 {
            let kv = self.kv(start_context, 1);
            for _ in 0..shape.decode_seqs {
                decodes.push(self.paged.import(&kv)?);
            }
        }
        let (t, c) = (
            shape.prefill_tokens as usize,
            shape.prefill_context_tokens as usize,
        );
        let context_kv = (shape.prefill_seqs > 0 && c > 0).then(|| self.kv(c, t));
        let mut times = Vec::with_capacity(repeats);
        for step in 0..WARM_UP_STEPS + repeats {
            let mut prefills = Vec::with_capacity(shape.prefill_seqs as usize);
            for s in 0..shape.prefill_seqs as usize {
                let id = match &context_kv {
                    Some(kv) => self.paged.import(kv)?,
                    None => {
                        let from = (step * 31 + s * 101) % self.block_size;
                        self.paged.admit(&self.tokens[from..from + t])?.0
                    }
                };
                prefills.push(id);
            }
            let decode_context = match decodes.first() {
                Some(&id) => self.paged.tokens(id)?.len() - self.paged.pending_tokens(id)?,
                None => 0,
            };
            let work: Vec<(SeqId, usize)> = decodes
                .iter()
                .map(|&id| (id, 1))
                .chain(prefills.iter().map(|&id| (id, t)))
                .collect();
            let (time_ns, sampled) = self.step(&work)?;
            for (id, token) in sampled {
                if decodes.contains(&id) {
                    self.paged.push_token(id, token)?;
                }
            }
            for id in prefills {
                self.paged.release(id)?;
            }
            let Some(repeat) = step.checked_sub(WARM_UP_STEPS) else {
                continue;
            };
            times.push(time_ns);
            self.samples.push(Sample {
                kind,
                repeat: repeat as u32,
                shape: StepShape {
                    decode_context_tokens: decode_context as u32,
                    ..shape
                },
                payload_bytes: 0,
                time_ns,
                export_ns: 0,
                send_ns: 0,
                import_ns: 0,
            });
            bar.inc(1);
        }
        for id in decodes {
            self.paged.release(id)?;
        }
        Ok(times)
    }

    /// KV of each prompt length exported here as a prefill worker exports it (left in device
    /// memory on a GPU), sent over TCP on loopback to a listener of this process, and imported
    /// into a second instance that reserved the prompt's blocks first (as a decode worker
    /// does).
    fn transfers(
        &mut self,
        model: Model,
        plan: &Plan,
        bar: &ProgressBar,
    ) -> Result<TransferTable, CalibrateError> {
        let spec = model.spec().clone();
        let dtype = crate::spec_dtype(model.dtype());
        let fingerprint = model_fingerprint(&spec, dtype);
        let max_tokens = plan.transfer_tokens.iter().max().copied().unwrap_or(1) as usize;
        let mut receiver = PagedModel::new(
            model,
            max_tokens.div_ceil(self.block_size) as u32 + 1,
            self.block_size as u32,
            false,
        )?;
        let runtime = tokio::runtime::Runtime::new()?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let listener = runtime.block_on(TcpKvListener::bind_loopback(
            fingerprint,
            Default::default(),
            tx,
        ))?;
        let endpoint = listener.endpoint();
        let transport = TcpTransport::default();
        let mut table = TransferTable {
            link: TCP_LOOPBACK.to_string(),
            repeats: plan.transfer_repeats as u32,
            payload_bytes: Vec::new(),
            time_ns: Vec::new(),
            export_ns: Vec::new(),
            send_ns: Vec::new(),
            import_ns: Vec::new(),
        };
        let mut request_id = 0;
        for &tokens in &plan.transfer_tokens {
            let n = tokens as usize;
            // The prefill side's sequence: the prompt's KV and the first token after it.
            let kv = self.kv(n, 1);
            let mut columns: [Vec<u64>; 4] = Default::default();
            let mut payload_bytes = 0;
            for repeat in 0..plan.transfer_repeats {
                let sender = self.paged.import(&kv)?;
                let (reserved, _) = receiver.admit(&kv.tokens[..n])?;
                let start = Instant::now();
                let export = self.paged.export_for_transfer(sender, 0)?;
                let export_ns = elapsed_ns(start);
                payload_bytes = export.payload_bytes() as u64;
                request_id += 1;
                let transfer = KvTransfer {
                    request_id,
                    model_fingerprint: fingerprint,
                    dtype,
                    n_layers: spec.n_layers,
                    block_size_tokens: self.block_size as u32,
                    kv: export,
                };
                let sent = Instant::now();
                runtime.block_on(transport.send(&endpoint, transfer))?;
                let send_ns = elapsed_ns(sent);
                let landed = Instant::now();
                let arrived = rx.blocking_recv().ok_or(CalibrateError::ListenerStopped)?;
                receiver.import_into(reserved, &arrived.kv)?;
                let import_ns = elapsed_ns(landed);
                let time_ns = elapsed_ns(start);
                self.paged.release(sender)?;
                receiver.release(reserved)?;
                for (column, value) in columns
                    .iter_mut()
                    .zip([time_ns, export_ns, send_ns, import_ns])
                {
                    column.push(value);
                }
                self.samples.push(Sample {
                    kind: Kind::Transfer,
                    repeat: repeat as u32,
                    shape: StepShape::prefill(1, tokens, 0),
                    payload_bytes,
                    time_ns,
                    export_ns,
                    send_ns,
                    import_ns,
                });
                bar.inc(1);
            }
            table.payload_bytes.push(payload_bytes);
            table.time_ns.push(median(&columns[0]));
            table.export_ns.push(median(&columns[1]));
            table.send_ns.push(median(&columns[2]));
            table.import_ns.push(median(&columns[3]));
        }
        drop(listener);
        Ok(table)
    }
}

/// Tokens the donor is prefilled with: enough for every cached context the plan imports
/// (longer transfers tile it), a whole number of blocks.
fn donor_tokens(plan: &Plan, block_size: usize) -> u32 {
    let repeats = (plan.step_repeats.max(plan.prefill_repeats) + WARM_UP_STEPS) as u32;
    let contexts = plan
        .decode_context_tokens
        .iter()
        .chain(&plan.context_tokens)
        .copied()
        .chain(
            plan.mixed
                .iter()
                .chain(&plan.checks)
                .flat_map(|s| [s.decode_context_tokens, s.prefill_context_tokens]),
        )
        .max()
        .unwrap_or(0);
    (contexts + repeats + 1).max(1).div_ceil(block_size as u32) * block_size as u32
}

/// Writes every raw sample, one row each.
pub fn write_csv<W: Write>(mut w: W, samples: &[Sample]) -> std::io::Result<()> {
    writeln!(
        w,
        "kind,repeat,decode_seqs,decode_context_tokens,prefill_seqs,prefill_tokens,\
         prefill_context_tokens,payload_bytes,time_ns,export_ns,send_ns,import_ns"
    )?;
    for s in samples {
        let p = &s.shape;
        writeln!(
            w,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            s.kind.name(),
            s.repeat,
            p.decode_seqs,
            p.decode_context_tokens,
            p.prefill_seqs,
            p.prefill_tokens,
            p.prefill_context_tokens,
            s.payload_bytes,
            s.time_ns,
            s.export_ns,
            s.send_ns,
            s.import_ns
        )?;
    }
    w.flush()
}

/// How well the profile reproduces the measurements: its tables and rule against the medians
/// they were made from, the fitted link against the transfers, the off-grid checks, and the
/// spread of the samples around their medians (the noise floor).
pub fn accuracy(cal: &Calibration) -> Result<Vec<Accuracy>, CalibrateError> {
    let mut rows = cal.profile.accuracy()?;
    rows.push(Accuracy::of(
        "off-grid steps (interpolated, not fitted)",
        cal.checks
            .iter()
            .map(|c| (c.model_ns as f64, c.measured_ns as f64)),
    ));
    // Samples of one cell are consecutive in `samples`, with repeat numbers from 0.
    let mut spread = Vec::new();
    let mut cell: Vec<u64> = Vec::new();
    let mut flush = |cell: &mut Vec<u64>| {
        let m = median(cell) as f64;
        spread.extend(cell.iter().map(|&v| (v as f64, m)));
        cell.clear();
    };
    for s in &cal.samples {
        if s.repeat == 0 && !cell.is_empty() {
            flush(&mut cell);
        }
        cell.push(s.time_ns);
    }
    if !cell.is_empty() {
        flush(&mut cell);
    }
    rows.push(Accuracy::of("samples around their medians (noise)", spread));
    Ok(rows)
}

/// The accuracy rows as a table.
pub fn accuracy_table(rows: &[Accuracy]) -> String {
    let width = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let mut out = format!(
        "{:width$}  points  max error  median error\n",
        "relative error of the fitted model"
    );
    for r in rows {
        out.push_str(&format!(
            "{:width$}  {:>6}  {:>8.2}%  {:>11.2}%\n",
            r.what,
            r.points,
            100.0 * r.max_rel_error,
            100.0 * r.median_rel_error
        ));
    }
    out
}

/// Each off-grid step: what was measured, what the profile predicts, and the error.
pub fn checks_table(checks: &[CheckPoint]) -> String {
    let names: Vec<String> = checks.iter().map(|c| describe(&c.shape)).collect();
    let width = names.iter().map(String::len).max().unwrap_or(0).max(14);
    let mut out = format!("{:width$}  measured     model  error\n", "off-grid step");
    for (c, name) in checks.iter().zip(&names) {
        let error = c.model_ns as f64 / c.measured_ns as f64 - 1.0;
        out.push_str(&format!(
            "{name:width$}  {:>5.0} ms  {:>5.0} ms  {:>+5.1}%\n",
            c.measured_ns as f64 / 1e6,
            c.model_ns as f64 / 1e6,
            100.0 * error
        ));
    }
    out
}

/// The version of candle this binary was built with, from the workspace's lock file.
pub fn candle_version() -> String {
    let lock = include_str!("../../Cargo.lock");
    lock.split("[[package]]")
        .find(|p| p.contains("\nname = \"candle-core\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map_or_else(
            || "unknown".to_string(),
            |v| v.trim_matches('"').to_string(),
        )
}

/// Today in UTC as YYYY-MM-DD.
pub fn utc_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The CPU's model name and core count, from /proc/cpuinfo where there is one.
pub fn cpu_description() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{name}, {cores} cores available")
}

/// Threads the runtime computes with: `RAYON_NUM_THREADS` when set, else every core.
pub fn compute_threads() -> u32 {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &u32| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::ModelSpec;
    use models::runtime::{Device, TensorDType, Weights};

    fn meta() -> Meta {
        Meta {
            machine: cpu_description(),
            device: "cpu".into(),
            model: "smollm2-135m".into(),
            dtype: models::DType::F32,
            threads: compute_threads(),
            block_size_tokens: 16,
            sampling: "greedy".into(),
            disagg_version: env!("CARGO_PKG_VERSION").into(),
            candle_version: candle_version(),
            date: utc_date(),
            command: "test".into(),
        }
    }

    fn step_limit(max: u32) -> Limits {
        Limits {
            step_tokens: Some(max),
            ..Limits::default()
        }
    }

    #[test]
    fn a_step_token_limit_leaves_out_only_the_steps_past_it() {
        let full = Plan::full();
        let mut plan = Plan::full();
        plan.limit(&step_limit(512)).unwrap();
        plan.check().unwrap();
        assert_eq!(plan.prefill_tokens, [16, 32, 64, 128, 256, 384, 512]);
        assert_eq!(plan.context_chunk_tokens, full.context_chunk_tokens);
        assert_eq!(plan.decode_shapes(), full.decode_shapes());
        assert!(
            plan.mixed
                .iter()
                .chain(&plan.checks)
                .all(|s| s.tokens() <= 512)
        );
        assert_eq!(plan.mixed.len(), full.mixed.len());
        assert_eq!(plan.checks.len(), full.checks.len());
        assert!(plan.samples() < full.samples());

        plan.limit(&step_limit(128)).unwrap();
        assert_eq!(plan.context_chunk_tokens, [16, 64]);
        assert!(plan.checks.len() < full.checks.len());
        let err = Plan::full().limit(&step_limit(8)).unwrap_err().to_string();
        assert_eq!(
            err,
            "plan: max_step_tokens 8 leaves no prefill length (the shortest is 16)"
        );
    }

    #[test]
    fn graph_buckets_join_the_prefill_grids_within_their_range() {
        let mut plan = Plan::full();
        plan.limit(&step_limit(512)).unwrap();
        plan.add_graph_buckets(64, 1024);
        plan.check().unwrap();
        assert_eq!(
            plan.prefill_tokens,
            [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
        );
        assert_eq!(
            plan.context_chunk_tokens,
            [16, 64, 128, 192, 256, 320, 384, 448, 512]
        );
        // Past the longest graph a prefill is not padded: the grid keeps its own points.
        let mut plan = Plan::full();
        plan.add_graph_buckets(256, 512);
        plan.check().unwrap();
        assert_eq!(
            plan.prefill_tokens,
            [16, 32, 64, 128, 256, 384, 512, 768, 1024]
        );
        assert_eq!(plan.context_chunk_tokens, [16, 64, 256, 512]);
    }

    #[test]
    fn context_and_batch_limits_keep_the_grid_point_that_covers_them() {
        let full = Plan::full();
        let mut plan = Plan::full();
        plan.limit(&Limits {
            step_tokens: Some(512),
            context_tokens: Some(400),
            num_seqs: Some(16),
        })
        .unwrap();
        plan.check().unwrap();
        assert_eq!(plan.decode_context_tokens, [16, 128, 512]);
        assert_eq!(plan.context_tokens, [128, 256, 512]);
        assert_eq!(plan.decode_seqs, [1, 2, 3, 4, 5, 6, 8, 12, 16]);
        assert_eq!(plan.prefill_seqs, full.prefill_seqs);
        assert_eq!(plan.prefill_tokens, [16, 32, 64, 128, 256, 384, 512]);
        let within = |s: &StepShape| {
            s.decode_seqs <= 16 && s.decode_context_tokens <= 512 && s.prefill_context_tokens <= 512
        };
        assert!(plan.mixed.iter().chain(&plan.checks).all(within));
        // What is left out is exactly what lies past the covering points.
        let kept = |steps: &[StepShape]| steps.iter().filter(|s| within(s)).count();
        assert_eq!(plan.mixed.len(), kept(&full.mixed));
        assert_eq!(plan.checks.len(), kept(&full.checks));
        assert!(plan.mixed.len() >= 4 && plan.checks.len() >= 5);
        assert!(plan.samples() * 10 < full.samples() * 7);

        // A limit past every grid point keeps the whole grid.
        let mut wide = Plan::full();
        wide.limit(&Limits {
            context_tokens: Some(100_000),
            num_seqs: Some(1000),
            ..Limits::default()
        })
        .unwrap();
        assert_eq!(wide.samples(), full.samples());
    }

    #[test]
    fn a_quick_run_gives_a_profile_the_simulator_reads() {
        let mut spec = ModelSpec::preset("smollm2-135m").unwrap();
        spec.n_layers = 2;
        let model =
            Model::new(Weights::random(&spec, TensorDType::F32, &Device::Cpu, 1).unwrap()).unwrap();
        let plan = Plan::quick();
        let bar = ProgressBar::hidden();
        let cal = run(model, &plan, meta(), &bar).unwrap();
        assert_eq!(cal.samples.len() as u64, plan.samples());
        let text = cal.profile.to_toml().unwrap();
        let read = Profile::parse(&text, "quick.toml").unwrap();
        assert_eq!(read, cal.profile);
        assert_eq!(read.decode.time_ns.len(), plan.decode_seqs.len());
        assert_eq!(read.mixed.step.len(), plan.mixed.len());
        let link = read.link(TCP_LOOPBACK).unwrap();
        // Each transfer carries whole blocks of the prompt's KV.
        let per_block = 16 * spec.kv_bytes_per_token(models::DType::F32);
        assert_eq!(
            read.transfer[0].payload_bytes,
            plan.transfer_tokens
                .iter()
                .map(|&t| (t as u64).div_ceil(16) * per_block)
                .collect::<Vec<_>>()
        );
        assert!(link.lone_transfer_ns(per_block) > 0);

        // The grid is reproduced exactly; every sample is a CSV row.
        let rows = accuracy(&cal).unwrap();
        assert_eq!(rows[0].max_rel_error, 0.0);
        assert_eq!(rows.last().unwrap().points, cal.samples.len());
        assert!(accuracy_table(&rows).contains("off-grid steps"));
        assert_eq!(
            checks_table(&cal.checks).lines().count(),
            plan.checks.len() + 1
        );
        let mut csv = Vec::new();
        write_csv(&mut csv, &cal.samples).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        assert_eq!(csv.lines().count(), cal.samples.len() + 1);
        assert!(csv.lines().nth(1).unwrap().starts_with("decode,0,1,15,"));
    }

    #[test]
    fn medians_dates_and_versions() {
        assert_eq!(median(&[5, 1, 3]), 3);
        assert_eq!(median(&[4, 1, 3, 10]), 4);
        let date = utc_date();
        assert_eq!(date.len(), 10);
        assert!(date.as_str() > "2024-01-01", "{date}");
        assert!(candle_version().starts_with("0."), "{}", candle_version());
    }

    #[test]
    fn a_bad_plan_is_refused() {
        let mut plan = Plan::quick();
        plan.decode_seqs = vec![4, 1];
        let mut spec = ModelSpec::preset("smollm2-135m").unwrap();
        spec.n_layers = 1;
        let model =
            Model::new(Weights::random(&spec, TensorDType::F32, &Device::Cpu, 1).unwrap()).unwrap();
        let err = run(model, &plan, meta(), &ProgressBar::hidden()).unwrap_err();
        assert!(err.to_string().contains("decode_seqs"), "{err}");
    }
}
