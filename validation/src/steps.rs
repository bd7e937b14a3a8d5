//! Step times, measured against predicted: every step a real worker ran (its step trace),
//! priced by the simulator's cost model for the same work. Where the latencies miss, this
//! says whether the step times are the part that misses.

use hw::engine::steps::{self, StepRow};
use sim::config::Interference;
use sim::cost::CostModel;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The steps of one kind.
#[derive(Clone, Debug, PartialEq)]
pub struct StepKind {
    pub kind: &'static str,
    pub steps: usize,
    pub measured_ms_p50: f64,
    pub predicted_ms_p50: f64,
    /// Median over steps of (predicted - measured) / measured, in percent.
    pub error_pct_p50: f64,
    /// The 90th percentiles (nearest rank) of the same: the tail a token gap's p90 follows.
    pub measured_ms_p90: f64,
    pub predicted_ms_p90: f64,
    /// Median share of the step spent outside the forward pass (sampling, detokenization,
    /// hand-off), in percent.
    pub outside_forward_pct_p50: f64,
    /// Where several workers ran: the median time of the steps that no other worker's step
    /// overlapped, and of those that other workers' steps overlapped throughout (workers on
    /// one device slow each other only if these differ).
    pub alone_ms_p50: Option<f64>,
    pub overlapped_ms_p50: Option<f64>,
}

fn kind(row: &StepRow) -> &'static str {
    match (row.decode_seqs > 0, row.prefill_seqs > 0) {
        (true, false) => "decode",
        (false, true) => "prefill",
        _ => "mixed",
    }
}

fn median(values: Vec<f64>) -> f64 {
    crate::compare::median(&values).unwrap_or(f64::NAN)
}

/// Steps that others overlap for less than this share of their time count as alone, for more
/// than one minus it as overlapped.
const OVERLAP_MARGIN: f64 = 0.1;

/// The union of the steps of every worker of worker `but`'s device but its own, as sorted
/// disjoint intervals.
fn busy_union(traces: &[Trace], but: usize) -> Vec<(u64, u64)> {
    let device = traces[but].device;
    let mut spans: Vec<(u64, u64)> = traces
        .iter()
        .enumerate()
        .filter(|&(w, t)| w != but && t.device == device)
        .flat_map(|(_, t)| t.rows.iter().map(|r| (r.start_ns, r.end_ns)))
        .collect();
    spans.sort_unstable();
    let mut union: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match union.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => union.push((start, end)),
        }
    }
    union
}

/// The share of `[start, end)` that `union` covers.
fn covered(union: &[(u64, u64)], start: u64, end: u64) -> f64 {
    if end <= start {
        return 0.0;
    }
    let first = union.partition_point(|&(_, e)| e <= start);
    let ns: u64 = union[first..]
        .iter()
        .take_while(|&&(s, _)| s < end)
        .map(|&(s, e)| e.min(end) - s.max(start))
        .sum();
    ns as f64 / (end - start) as f64
}

/// The step traces in `dir` (`steps-WORKER.csv`), sorted.
pub fn trace_paths(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("steps-") && n.ends_with(".csv"))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Reads every `steps-*.csv` in `dir` and compares each kind of step that started at or after
/// `from_epoch_ns` (the workload's start: the serving-path probes' steps are left out) with
/// `cost`; `workers_per_device` tells which workers' steps can overlap one another's.
pub fn compare(
    dir: &Path,
    cost: &dyn CostModel,
    from_epoch_ns: u64,
    workers_per_device: u32,
) -> Result<Vec<StepKind>, String> {
    let traces = read_traces(dir, workers_per_device, |r| r.start_ns >= from_epoch_ns)?;
    let rows = with_overlap(&traces);
    let several = traces.iter().enumerate().any(|(w, t)| {
        traces
            .iter()
            .enumerate()
            .any(|(v, u)| v != w && u.device == t.device)
    });
    Ok(["decode", "prefill", "mixed"]
        .into_iter()
        .filter_map(|k| {
            let of_kind: Vec<&(StepRow, f64)> = rows.iter().filter(|(r, _)| kind(r) == k).collect();
            if of_kind.is_empty() {
                return None;
            }
            let measured = |r: &StepRow| r.end_ns.saturating_sub(r.start_ns) as f64;
            let predicted = |r: &StepRow| cost.step_ns(&r.work()) as f64;
            let by_overlap = |keep: fn(f64) -> bool| {
                let ms: Vec<f64> = of_kind
                    .iter()
                    .filter(|(_, share)| keep(*share))
                    .map(|(r, _)| measured(r) / 1e6)
                    .collect();
                several.then(|| crate::compare::median(&ms)).flatten()
            };
            let of_kind: Vec<&StepRow> = of_kind.iter().map(|(r, _)| r).collect();
            let p90_ms = |ns: &dyn Fn(&StepRow) -> f64| {
                let mut sorted: Vec<u64> = of_kind.iter().map(|r| ns(r) as u64).collect();
                sorted.sort_unstable();
                sim::metrics::percentile(&sorted, 90.0) as f64 / 1e6
            };
            Some(StepKind {
                kind: k,
                steps: of_kind.len(),
                measured_ms_p50: median(of_kind.iter().map(|r| measured(r) / 1e6).collect()),
                predicted_ms_p50: median(of_kind.iter().map(|r| predicted(r) / 1e6).collect()),
                measured_ms_p90: p90_ms(&measured),
                predicted_ms_p90: p90_ms(&predicted),
                error_pct_p50: median(
                    of_kind
                        .iter()
                        .map(|r| 100.0 * (predicted(r) - measured(r)) / measured(r).max(1.0))
                        .collect(),
                ),
                outside_forward_pct_p50: median(
                    of_kind
                        .iter()
                        .map(|r| 100.0 * (1.0 - r.forward_ns as f64 / measured(r).max(1.0)))
                        .collect(),
                ),
                alone_ms_p50: by_overlap(|share| share < OVERLAP_MARGIN),
                overlapped_ms_p50: by_overlap(|share| share > 1.0 - OVERLAP_MARGIN),
            })
        })
        .collect())
}

/// The steps of one worker that a comparison reads, and its device: the trace
/// `steps-ROLE-INDEX.csv` is worker INDEX's, and workers i * n .. (i + 1) * n share device i
/// (n workers per device), as in the simulator.
struct Trace {
    device: u64,
    rows: Vec<StepRow>,
}

/// The device of the worker whose step trace is `path` (see [`Trace`]).
fn device_of(path: &Path, workers_per_device: u32) -> Result<u64, String> {
    let index: u64 = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.rsplit('-').next())
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| {
            format!(
                "{}: a step trace's name ends in its worker's index",
                path.display()
            )
        })?;
    Ok(index / u64::from(workers_per_device.max(1)))
}

/// Every step trace in `dir`, with the steps that `keep` keeps.
fn read_traces(
    dir: &Path,
    workers_per_device: u32,
    keep: impl Fn(&StepRow) -> bool,
) -> Result<Vec<Trace>, String> {
    let mut traces = Vec::new();
    for path in &trace_paths(dir)? {
        let mut rows = steps::read(path)?;
        rows.retain(&keep);
        traces.push(Trace {
            device: device_of(path, workers_per_device)?,
            rows,
        });
    }
    Ok(traces)
}

/// Each step with the share of it that other workers' steps on its device overlap.
fn with_overlap(traces: &[Trace]) -> Vec<(StepRow, f64)> {
    let mut rows = Vec::new();
    for (w, trace) in traces.iter().enumerate() {
        let others = busy_union(traces, w);
        rows.extend(
            trace
                .rows
                .iter()
                .map(|r| (*r, covered(&others, r.start_ns, r.end_ns))),
        );
    }
    rows
}

/// A piece of a step's time: how long, and how many steps of the other workers of its device
/// ran meanwhile, `[only decoding, prefilling]`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Piece {
    ns: u64,
    others: [u32; 2],
}

impl Piece {
    /// The steps its device ran, the step's own among them.
    fn busy(&self) -> u32 {
        1 + self.others[0] + self.others[1]
    }
}

/// Whether a step prefills (else it only decodes): what the simulator's interference tells
/// apart.
fn prefills(row: &StepRow) -> bool {
    row.prefill_seqs > 0
}

/// `row`'s time cut into pieces by the steps its device ran in each, from the steps of the
/// other workers of its device.
fn pieces(row: &StepRow, others: &[&StepRow]) -> Vec<Piece> {
    let (start, end) = (row.start_ns, row.end_ns);
    let mut edges: Vec<(u64, i32, usize)> = others
        .iter()
        .filter(|o| o.start_ns < end && o.end_ns > start)
        .flat_map(|o| {
            let k = usize::from(prefills(o));
            [(o.start_ns.max(start), 1, k), (o.end_ns.min(end), -1, k)]
        })
        .collect();
    edges.sort_unstable();
    let (mut pieces, mut at, mut others) = (Vec::new(), start, [0i32; 2]);
    for (t, delta, k) in edges {
        if t > at {
            pieces.push(Piece {
                ns: t - at,
                others: others.map(|n| n as u32),
            });
            at = t;
        }
        others[k] += delta;
    }
    if end > at {
        pieces.push(Piece {
            ns: end - at,
            others: others.map(|n| n as u32),
        });
    }
    pieces
}

/// Each probe step with its pieces (see [`pieces`]).
fn probe_steps(traces: &[Trace]) -> Vec<(StepRow, Vec<Piece>)> {
    let mut steps = Vec::new();
    for (w, trace) in traces.iter().enumerate() {
        let others: Vec<&StepRow> = traces
            .iter()
            .enumerate()
            .filter(|&(v, t)| v != w && t.device == trace.device)
            .flat_map(|(_, t)| &t.rows)
            .collect();
        steps.extend(trace.rows.iter().map(|r| (*r, pieces(r, &others))));
    }
    steps
}

/// How the steps that started in `window` (ns since the UNIX epoch) and that no other step of
/// their device overlapped took against a cost model's price, each as its time over the price:
/// the steps that prefill at least the given tokens (the short probes' are left out: they are
/// mostly fixed costs), and the steps that only decode.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AloneSteps {
    pub prefill: Vec<f64>,
    pub decode: Vec<f64>,
}

impl AloneSteps {
    pub fn read(
        dir: &Path,
        cost: &dyn CostModel,
        window: Range<u64>,
        min_prefill_tokens: u64,
        workers_per_device: u32,
    ) -> Result<Self, String> {
        let mut alone = Self::default();
        let traces = read_traces(dir, workers_per_device, |r| window.contains(&r.start_ns))?;
        for (r, share) in with_overlap(&traces) {
            if share >= OVERLAP_MARGIN {
                continue;
            }
            let ratio =
                r.end_ns.saturating_sub(r.start_ns) as f64 / cost.step_ns(&r.work()).max(1) as f64;
            match kind(&r) {
                "decode" => alone.decode.push(ratio),
                _ if r.prefill_tokens >= min_prefill_tokens => alone.prefill.push(ratio),
                _ => {}
            }
        }
        Ok(alone)
    }

    /// The medians for steps that prefill and for steps that only decode (the probes' are the
    /// simulator's step scales); `None` where none ran.
    pub fn scales(&self) -> (Option<f64>, Option<f64>) {
        let m = crate::compare::median;
        (m(&self.prefill), m(&self.decode))
    }

    /// Their spreads about their scales (see [`spread`]): the simulator's
    /// `prefill_step_spread` and `decode_step_spread`.
    pub fn spreads(&self) -> (Vec<f64>, Vec<f64>) {
        (spread(self.prefill.clone()), spread(self.decode.clone()))
    }
}

/// Most factors a step spread keeps: more probe steps give this many of their quantiles.
const SPREAD_FACTORS: usize = 32;

/// Fewer probe steps of a kind than this give no spread.
const MIN_SPREAD_STEPS: usize = 5;

/// The spread of `ratios` about their median, as the simulator's step spread: each over the
/// median, sorted, [`SPREAD_FACTORS`] evenly spaced quantiles of them where there are more,
/// to four digits, capped at `sim::config::MAX_STEP_SPREAD`; empty under
/// [`MIN_SPREAD_STEPS`] ratios.
fn spread(mut ratios: Vec<f64>) -> Vec<f64> {
    let Some(median) = crate::compare::median(&ratios).filter(|_| ratios.len() >= MIN_SPREAD_STEPS)
    else {
        return Vec::new();
    };
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let picked: Vec<f64> = if n <= SPREAD_FACTORS {
        ratios
    } else {
        (0..SPREAD_FACTORS)
            .map(|i| ratios[((2 * i + 1) * n) / (2 * SPREAD_FACTORS)])
            .collect()
    };
    picked
        .into_iter()
        .map(|r| ((r / median * 1e4).round() / 1e4).clamp(1e-4, sim::config::MAX_STEP_SPREAD))
        .collect()
}

/// How much the probes' steps that shared their device slowed each other: the simulator's
/// `device_interference` (each figure with the steps it is the median over, `None` where
/// too few steps tell), and `device_contention` where the device was oversubscribed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sharing {
    /// `[slowed step prefills][other step prefills]`.
    pub interference: [[Option<(f64, usize)>; 2]; 2],
    pub contention: Option<(f64, usize)>,
}

impl Sharing {
    /// The simulator's interference: what was measured, none elsewhere.
    pub fn interference(&self) -> Interference {
        let mut i = Interference::default();
        for slowed in [false, true] {
            for by in [false, true] {
                *i.of_mut(slowed, by) =
                    self.interference[usize::from(slowed)][usize::from(by)].map_or(0.0, |(v, _)| v);
            }
        }
        i
    }
}

/// Probe steps that other steps overlapped for less than this share of their time say too
/// little of how much those slowed them to count.
const MIN_CONTENDED_SHARE: f64 = 0.5;

/// Fewer such steps than this give no figure.
const MIN_CONTENDED_STEPS: usize = 5;

/// The simulator's sharing of a device of parallelism `p` under interference `i` and
/// contention `c`.
fn device_sharing(i: &Interference, c: f64, p: u32) -> sim::sharing::DeviceSharing {
    sim::sharing::DeviceSharing {
        parallelism: p,
        contention_ppm: (c * 1e6).round() as u64,
        interference_ppm: i.to_ppm(),
    }
}

/// The `x` in `0..=max` at which `work(x)`, falling as `x` rises, meets `price` (by
/// bisection; the nearer end where it never does).
fn solve(work: impl Fn(f64) -> f64, price: f64, max: f64) -> f64 {
    if work(0.0) <= price {
        return 0.0;
    }
    if work(max) >= price {
        return max;
    }
    let (mut lo, mut hi) = (0.0, max);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if work(mid) > price {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// How much the probes' steps (before `before_epoch_ns`) that shared their device slowed each
/// other, as the simulator runs steps: each at full speed alone, slowed by each other step in
/// flight on its device by the interference of their kinds, and beyond the device's
/// `parallelism` by the contention on top. Its price is `cost`'s, scaled as the simulator
/// scales it (`scales`: steps that prefill, steps that only decode).
///
/// The interference of kind A by kind B: the median over the steps of kind A that one step of
/// kind B overlapped for at least [`MIN_CONTENDED_SHARE`] of their time, no other step and
/// never more than the device's parallelism, of the figure under which each does its price's
/// work in its measured time. The contention: the same over the steps with more steps busy
/// than the parallelism for at least that share, under the interference found. Each clamped
/// to `0..=sim::config::MAX_DEVICE_CONTENTION`, from [`MIN_CONTENDED_STEPS`] steps or more.
pub fn probe_sharing(
    dir: &Path,
    cost: &dyn CostModel,
    before_epoch_ns: u64,
    (workers_per_device, parallelism): (u32, u32),
    (prefill_scale, decode_scale): (f64, f64),
) -> Result<Sharing, String> {
    let p = parallelism.max(1);
    let traces = read_traces(dir, workers_per_device, |r| r.start_ns < before_epoch_ns)?;
    let steps: Vec<(StepRow, Vec<Piece>, f64)> = probe_steps(&traces)
        .into_iter()
        .map(|(r, pieces)| {
            let scale = if prefills(&r) {
                prefill_scale
            } else {
                decode_scale
            };
            let price = cost.step_ns(&r.work()) as f64 * scale;
            (r, pieces, price)
        })
        .collect();
    let max = sim::config::MAX_DEVICE_CONTENTION;
    let share = |pieces: &[Piece], r: &StepRow, of: &dyn Fn(&Piece) -> bool| -> f64 {
        let ns: u64 = pieces.iter().filter(|x| of(x)).map(|x| x.ns).sum();
        ns as f64 / r.end_ns.saturating_sub(r.start_ns).max(1) as f64
    };
    let figure = |estimates: Vec<f64>| {
        (estimates.len() >= MIN_CONTENDED_STEPS)
            .then(|| crate::compare::median(&estimates).map(|v| (v, estimates.len())))
            .flatten()
    };
    let mut sharing = Sharing::default();
    for slowed in [false, true] {
        for by in [false, true] {
            let mut estimates = Vec::new();
            for (r, pieces, price) in &steps {
                let one_other = |x: &Piece| x.others[usize::from(by)] == 1 && x.busy() == 2;
                let fits = prefills(r) == slowed
                    && pieces
                        .iter()
                        .all(|x| x.busy() == 1 || (one_other(x) && x.busy() <= p))
                    && share(pieces, r, &one_other) >= MIN_CONTENDED_SHARE;
                if !fits {
                    continue;
                }
                let work = |v: f64| -> f64 {
                    let mut i = Interference::default();
                    *i.of_mut(slowed, by) = v;
                    let device = device_sharing(&i, 1.0, p);
                    pieces
                        .iter()
                        .map(|x| x.ns as f64 * device.speed_f64(x.others, slowed))
                        .sum()
                };
                estimates.push(solve(work, *price, max));
            }
            sharing.interference[usize::from(slowed)][usize::from(by)] = figure(estimates);
        }
    }
    let interference = sharing.interference();
    let mut estimates = Vec::new();
    for (r, pieces, price) in &steps {
        if share(pieces, r, &|x: &Piece| x.busy() > p) < MIN_CONTENDED_SHARE {
            continue;
        }
        let work = |c: f64| -> f64 {
            let device = device_sharing(&interference, c, p);
            pieces
                .iter()
                .map(|x| x.ns as f64 * device.speed_f64(x.others, prefills(r)))
                .sum()
        };
        estimates.push(solve(work, *price, max));
    }
    sharing.contention = figure(estimates);
    Ok(sharing)
}

/// Writes the steps the simulator ran as the real workers' traces are written, into
/// `DIR/predicted/steps-ROLE-INDEX.csv` (the step of a worker of role `roles[INDEX]`), so that
/// one reader lays the two side by side.
pub fn write_predicted(
    dir: &Path,
    steps: &[sim::engine::StepRecord],
    roles: &[sim::routing::Role],
) -> Result<(), String> {
    let dir = dir.join("predicted");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut writers = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        let path = dir.join(format!("steps-{}-{i}.csv", role.name()));
        let out = csv::Writer::from_path(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        writers.push((path, out));
    }
    for step in steps {
        let (path, out) = &mut writers[step.worker as usize];
        let w = &step.work;
        out.serialize(StepRow {
            start_ns: step.start_ns,
            forward_ns: step.end_ns - step.start_ns,
            end_ns: step.end_ns,
            decode_seqs: w.decode_seqs,
            decode_context_tokens: w.decode_context_tokens,
            prefill_seqs: w.prefill_seqs,
            prefill_tokens: w.prefill_tokens,
            prefill_attention_pairs: w.prefill_attention_pairs,
            prefill_kv_read_tokens: w.prefill_kv_read_tokens,
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    for (path, mut out) in writers {
        out.flush()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The markdown table of `kinds`.
pub fn table(kinds: &[StepKind]) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} ms"));
    let mut out = String::from(
        "| step | steps | measured p50 | predicted p50 | error p50 | measured p90 \
         | predicted p90 | outside the forward pass | alone p50 | overlapped p50 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for k in kinds {
        out.push_str(&format!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:+.1}% | {:.1} ms | {:.1} ms | {:.1}% | {} | {} |\n",
            k.kind,
            k.steps,
            k.measured_ms_p50,
            k.predicted_ms_p50,
            k.error_pct_p50,
            k.measured_ms_p90,
            k.predicted_ms_p90,
            k.outside_forward_pct_p50,
            ms(k.alone_ms_p50),
            ms(k.overlapped_ms_p50)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::cost::StepWork;

    const HEADER: &str = "start_ns,forward_ns,end_ns,decode_seqs,decode_context_tokens,prefill_seqs,prefill_tokens,prefill_attention_pairs,prefill_kv_read_tokens\n";

    /// 10 ms per step, whatever the work.
    struct Flat;
    impl CostModel for Flat {
        fn step_ns(&self, _: &StepWork) -> u64 {
            10_000_000
        }
    }

    #[test]
    fn steps_are_grouped_by_kind_and_compared_with_the_cost_model() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{HEADER}0,7000000,8000000,1,100,0,0,0,0\n\
             9000000,11000000,21500000,2,200,0,0,0,0\n\
             30000000,19000000,50000000,0,0,1,64,2080,64\n"
        );
        std::fs::write(dir.path().join("steps-decode-1.csv"), text).unwrap();
        std::fs::write(dir.path().join("other.csv"), "not a trace").unwrap();
        // Steps before the workload (the probes') are left out.
        let after_probes = compare(dir.path(), &Flat, 9_000_000, 1).unwrap();
        assert_eq!(after_probes[0].steps, 1);
        let kinds = compare(dir.path(), &Flat, 0, 2).unwrap();
        assert_eq!(kinds.len(), 2);
        let decode = &kinds[0];
        assert_eq!((decode.kind, decode.steps), ("decode", 2));
        assert!((decode.measured_ms_p50 - 10.25).abs() < 1e-9);
        // +25% and -20%: the median of the two.
        assert!((decode.error_pct_p50 - 2.5).abs() < 1e-9);
        let prefill = &kinds[1];
        assert_eq!((prefill.kind, prefill.steps), ("prefill", 1));
        assert!((prefill.error_pct_p50 + 50.0).abs() < 1e-9);
        assert!((prefill.outside_forward_pct_p50 - 5.0).abs() < 1e-9);
        assert!(
            table(&kinds)
                .contains("| decode | 2 | 10.2 ms | 10.0 ms | +2.5% | 12.5 ms | 10.0 ms |"),
            "{}",
            table(&kinds)
        );
        std::fs::write(dir.path().join("steps-bad.csv"), "start_ns\nx\n").unwrap();
        assert!(
            compare(dir.path(), &Flat, 0, 2)
                .unwrap_err()
                .contains("steps-bad.csv")
        );
    }

    /// Only the probes' steps count (before the workload), the short probes' prefills left out.
    #[test]
    fn the_probes_steps_scale_the_prices_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        // Before 100 ms: an 8-token prefill of 30 ms, 256-token ones of 12 and 14 ms, decode
        // steps of 20 and 25 ms; after it, the workload's 50 ms steps.
        let rows = format!(
            "{HEADER}0,1,30000000,0,0,1,8,36,8\n30000000,1,42000000,0,0,1,256,32896,256\n\
             42000000,1,56000000,0,0,1,256,32896,256\n56000000,1,76000000,1,256,0,0,0,0\n\
             76000000,1,101000000,1,257,0,0,0,0\n\
             100000000,1,150000000,0,0,1,256,32896,256\n150000000,1,200000000,1,300,0,0,0,0\n"
        );
        std::fs::write(dir.path().join("steps-aggregated-0.csv"), rows).unwrap();
        let (prefill, decode) = AloneSteps::read(dir.path(), &Flat, 0..100_000_000, 16, 1)
            .unwrap()
            .scales();
        assert!((prefill.unwrap() - 1.3).abs() < 1e-9, "{prefill:?}");
        assert_eq!(decode, Some(2.25));
        assert_eq!(
            AloneSteps::read(dir.path(), &Flat, 0..0, 16, 1)
                .unwrap()
                .scales(),
            (None, None)
        );
    }

    /// The spread of the probes' steps alone about their kind's median: every ratio where they
    /// are few, evenly spaced quantiles where many, none under five.
    #[test]
    fn the_probes_steps_spread_about_their_median() {
        assert_eq!(spread(vec![1.0, 2.0, 1.1, 0.9]), Vec::<f64>::new());
        assert_eq!(
            spread(vec![2.4, 2.0, 2.2, 1.8, 2.0]),
            vec![0.9, 1.0, 1.0, 1.1, 1.2]
        );
        let many: Vec<f64> = (1..=320).map(f64::from).collect();
        let s = spread(many);
        assert_eq!(s.len(), SPREAD_FACTORS);
        // The 5th, 15th, ... 315th of 320 over the median (160.5).
        assert_eq!(s[0], (6.0 / 160.5 * 1e4_f64).round() / 1e4);
        assert_eq!(s[31], (316.0 / 160.5 * 1e4_f64).round() / 1e4);
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        // A stall is capped at the simulator's largest factor.
        assert_eq!(
            spread(vec![1.0, 1.0, 1.0, 1.0, 50.0]).last(),
            Some(&sim::config::MAX_STEP_SPREAD)
        );
        // From the traces: the decode steps alone before the workload, 20 and 25 ms for 10
        // priced, are too few; five prefills of 10 to 14 ms are enough.
        let dir = tempfile::tempdir().unwrap();
        let mut rows = HEADER.to_string();
        for (i, ms) in [10u64, 11, 12, 13, 14].into_iter().enumerate() {
            let start = i as u64 * 20_000_000;
            rows.push_str(&format!(
                "{start},1,{},0,0,1,256,32896,256\n",
                start + ms * 1_000_000
            ));
        }
        rows.push_str("100000000,1,120000000,1,256,0,0,0,0\n120000000,1,145000000,1,257,0,0,0,0\n");
        std::fs::write(dir.path().join("steps-aggregated-0.csv"), rows).unwrap();
        let (prefill, decode) = AloneSteps::read(dir.path(), &Flat, 0..200_000_000, 16, 1)
            .unwrap()
            .spreads();
        assert_eq!(prefill, vec![0.8333, 0.9167, 1.0, 1.0833, 1.1667]);
        assert!(decode.is_empty());
    }

    /// Two workers of one device, 10 ms a step priced: three pairs of 15 ms decode steps
    /// overlapping throughout (each did 10 ms of work in 15: 0.5 of contention where the device
    /// runs one at a time, of interference where it runs both), five 15 ms prefills with their
    /// last 10 ms overlapped by the other's 10 ms decodes (5 + 10 / (1 + x) = 10: x = 1; the
    /// decodes ran as priced: 0), alone steps of 12 ms, and the workload's steps after 1 s.
    #[test]
    fn overlapping_probe_steps_give_the_device_contention_and_interference() {
        let dir = tempfile::tempdir().unwrap();
        let ms = |a: u64, b: u64, decode: bool| {
            let (d, p) = if decode { (1, 0) } else { (0, 1) };
            format!(
                "{},1,{},{d},100,{p},{},0,0\n",
                a * 1_000_000,
                b * 1_000_000,
                p * 64
            )
        };
        let mut zero = format!("{HEADER}{}{}", ms(0, 12, true), ms(12, 24, false));
        let mut one = format!("{HEADER}{}", ms(30, 42, true));
        for start in [100, 200, 300] {
            zero.push_str(&ms(start, start + 15, true));
            one.push_str(&ms(start, start + 15, true));
        }
        for start in [400, 500, 600, 700, 800] {
            zero.push_str(&ms(start, start + 15, false));
            one.push_str(&ms(start + 5, start + 15, true));
        }
        zero.push_str(&ms(1000, 1100, true));
        one.push_str(&ms(1000, 1100, true));
        std::fs::write(dir.path().join("steps-prefill-0.csv"), &zero).unwrap();
        std::fs::write(dir.path().join("steps-decode-1.csv"), &one).unwrap();
        let before = 900_000_000;
        let sharing = |of, scales| probe_sharing(dir.path(), &Flat, before, of, scales).unwrap();
        // One at a time: six steps at 0.5, the five prefills at 1 and the five decodes inside
        // them at 0; the median is 0.5. Beyond the parallelism throughout: no interference.
        let one_at_a_time = sharing((2, 1), (1.0, 1.0));
        let (c, steps) = one_at_a_time.contention.unwrap();
        assert_eq!(steps, 16);
        assert!((c - 0.5).abs() < 1e-6, "{c}");
        assert_eq!(one_at_a_time.interference, [[None; 2]; 2]);
        // Priced at twice the time, every step ran faster than alone: no contention.
        assert_eq!(sharing((2, 1), (2.0, 2.0)).contention.unwrap().0, 0.0);
        // Workers on devices of their own: nothing shared.
        assert_eq!(sharing((1, 1), (1.0, 1.0)), Sharing::default());
        // A device that runs both at once: interference, by kind; two prefills never met.
        let both = sharing((2, 2), (1.0, 1.0));
        assert_eq!(both.contention, None);
        let [
            [by_decode, by_prefill],
            [prefill_by_decode, prefill_by_prefill],
        ] = both.interference;
        let (i, steps) = by_decode.unwrap();
        assert!((i - 0.5).abs() < 1e-6 && steps == 6, "{i} {steps}");
        let (i, steps) = prefill_by_decode.unwrap();
        assert!((i - 1.0).abs() < 1e-6 && steps == 5, "{i} {steps}");
        assert_eq!(by_prefill, Some((0.0, 5)));
        assert_eq!(prefill_by_prefill, None);
        let i = both.interference();
        assert!((i.decode_by_decode - 0.5).abs() < 1e-6);
        assert!((i.prefill_by_decode - 1.0).abs() < 1e-6);
        assert_eq!((i.decode_by_prefill, i.prefill_by_prefill), (0.0, 0.0));
        // The scales come from the steps alone: 12 ms for 10 priced.
        let (prefill, decode) = AloneSteps::read(dir.path(), &Flat, 0..before, 16, 2)
            .unwrap()
            .scales();
        assert_eq!((prefill, decode), (Some(1.2), Some(1.2)));
        // Counted as on devices of their own, the overlapped steps are alone too: five
        // decodes of 10 ms, two of 12 and six of 15.
        let (_, decode) = AloneSteps::read(dir.path(), &Flat, 0..before, 16, 1)
            .unwrap()
            .scales();
        assert_eq!(decode, Some(1.2));
        let (_, decode) = AloneSteps::read(dir.path(), &Flat, 0..350_000_000, 16, 1)
            .unwrap()
            .scales();
        assert_eq!(decode, Some(1.5));
    }

    #[test]
    fn steps_are_split_by_whether_another_worker_stepped_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        // Worker 1: a 2 ms step alone, then a 4 ms one inside worker 2's long step, then a
        // 3 ms one half overlapped (neither alone nor overlapped).
        let one = format!(
            "{HEADER}0,1,2000000,1,10,0,0,0,0\n10000000,1,14000000,1,10,0,0,0,0\n\
             19000000,1,22000000,1,10,0,0,0,0\n"
        );
        let two =
            format!("{HEADER}9000000,1,15000000,1,10,0,0,0,0\n20500000,1,30000000,1,10,0,0,0,0\n");
        std::fs::write(dir.path().join("steps-decode-1.csv"), one).unwrap();
        std::fs::write(dir.path().join("steps-decode-2.csv"), &two).unwrap();
        // Workers 1 and 2 share device 0 (three workers a device).
        let kinds = compare(dir.path(), &Flat, 0, 3).unwrap();
        assert_eq!(kinds[0].steps, 5);
        // Alone: worker 1's first step; overlapped: its second, and worker 2's first (covered
        // from 10 to 14 of 9..15 ms: two thirds, so neither).
        assert_eq!(kinds[0].alone_ms_p50, Some(2.0));
        assert_eq!(kinds[0].overlapped_ms_p50, Some(4.0));
        assert!(
            table(&kinds).contains("| 2.00 ms | 4.00 ms |"),
            "{}",
            table(&kinds)
        );
        // Each on a device of its own: nothing to split by.
        let apart = compare(dir.path(), &Flat, 0, 1).unwrap();
        assert_eq!(
            (apart[0].alone_ms_p50, apart[0].overlapped_ms_p50),
            (None, None)
        );
        // One worker: nothing to split by.
        let single = tempfile::tempdir().unwrap();
        std::fs::write(single.path().join("steps-decode-2.csv"), two).unwrap();
        let kinds = compare(single.path(), &Flat, 0, 2).unwrap();
        assert_eq!(
            (kinds[0].alone_ms_p50, kinds[0].overlapped_ms_p50),
            (None, None)
        );
        assert!(table(&kinds).ends_with("| - | - |\n"));
    }
}
