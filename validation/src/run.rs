//! Running one case: the simulator on the derived scenario, then the real cluster (spawned
//! with `disagg-hw serve`) driven by the load generator with the same scenario and seed, and
//! the outputs of the comparison.

use crate::case::{Case, CaseError, Derived, LinkProbe, Mode, Predictor};
use crate::compare::{Comparison, format_error};
use crate::parts::{self, Part};
use crate::steps::{self, StepKind};
use crate::svg::{Panel, cdf_svg};
use hw::loadgen::probe::{IDLE_PAUSE, PROBES, ServingPath, median};
use hw::loadgen::{BenchOptions, BenchOutput, LoadgenError};
use sim::engine::SimError;
use sim::metrics::{RequestRecord, Summary};
use sim::network::LinkSpec;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Case(#[from] CaseError),
    #[error("simulator: {0}")]
    Sim(#[from] SimError),
    #[error("{hw_bin} serve: {message}")]
    Serve { hw_bin: String, message: String },
    #[error("load generator: {0}")]
    Loadgen(#[from] LoadgenError),
    #[error("{path}: {message}")]
    Write { path: String, message: String },
    #[error("step trace: {0}")]
    Steps(String),
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The machine the measurement ran on.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Names the results directory (`validation/results/TAG/`).
    pub tag: String,
    /// CPU model, cores, OS, and the GPUs where there are any.
    pub description: String,
}

impl Machine {
    /// This machine: its CPU model and core count, from /proc/cpuinfo where there is one, and
    /// its NVIDIA GPUs, from the driver's /proc entries.
    pub fn this(tag: Option<String>) -> Machine {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                    .map(|(_, name)| name.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let mut description = format!(
            "{cpu}, {cores} cores, {} {}",
            std::env::consts::OS,
            std::env::consts::ARCH
        );
        let gpus = nvidia_gpus();
        if !gpus.is_empty() {
            description.push_str(&format!("; GPUs: {}", gpus.join(", ")));
        }
        Machine {
            tag: tag.unwrap_or_else(|| format!("cpu-{cores}core")),
            description,
        }
    }
}

/// The model of each NVIDIA GPU the driver lists, in bus order (empty without the driver).
fn nvidia_gpus() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut buses: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    buses.sort();
    buses
        .iter()
        .filter_map(|bus| {
            let info = std::fs::read_to_string(bus.join("information")).ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map(|m| m.trim().to_string())
        })
        .collect()
}

/// `disagg-hw` in the directory of `exe` or the one above (test binaries live in `deps/`).
pub fn hw_bin_beside(exe: &Path) -> Result<PathBuf, String> {
    let name = format!("disagg-hw{}", std::env::consts::EXE_SUFFIX);
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no {name} beside {} (cargo build --release -p hw), or give --hw-bin PATH",
                exe.display()
            )
        })
}

/// What every case of one invocation shares.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub hw_bin: PathBuf,
    pub machine: Machine,
    /// The command line, for the report.
    pub command: String,
    /// Times each case's workload is measured, each on a fresh cluster (at least 1).
    pub repeats: u32,
}

/// A case, its derived sides and where its outputs go.
pub struct Prepared {
    pub case: Case,
    pub derived: Derived,
    pub dir: PathBuf,
}

/// Loads a case (priced by `profile` where one is given, its CPU workers sharing `cores`
/// where given) and derives both sides into `out_root/NAME/`, before anything runs, so a bad
/// case is found at once.
pub fn prepare(
    path: &Path,
    out_root: &Path,
    profile: Option<&Path>,
    cores: Option<u32>,
) -> Result<Prepared, CaseError> {
    let mut case = Case::load(path)?;
    if let Some(profile) = profile {
        case.price_with(profile)?;
    }
    if let Some(cores) = cores {
        case.cores = cores.max(1);
    }
    let dir = out_root.join(&case.name);
    let derived = case.derive(&dir)?;
    Ok(Prepared { case, derived, dir })
}

/// Both runs of a case.
pub struct CaseRun {
    pub name: String,
    pub predicted: Summary,
    pub measured: Summary,
    pub comparison: Comparison,
    pub dir: PathBuf,
    /// The machine's 1-minute load average before and after the measurement: other work on
    /// the machine slows the measured side and not the predicted one.
    pub load_before_after: (Option<f64>, Option<f64>),
    /// The real workers' steps against the cost model's price for the same work.
    pub steps: Vec<StepKind>,
    /// The serving path measured on the idle cluster, which the prediction took.
    pub serving_path: ServingPath,
    /// Each part of the TTFT, predicted and measured.
    pub parts: Vec<Part>,
    /// The link the prediction moved KV on (a disaggregated case's).
    pub link: Option<LinkSpec>,
    /// How the prediction priced steps, from the probes' steps.
    pub step_prices: StepPrices,
    /// The measured repeats' own figures ([`crate::repeats::describe`]).
    pub repeats: String,
}

/// How a setup prices steps beyond its cost model, as the probes' steps measured them.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPrices {
    /// The scales for steps that prefill and steps that only decode...
    pub scales: (f64, f64),
    /// ...and the spreads about them.
    pub spreads: (Vec<f64>, Vec<f64>),
    /// How much the busy steps of an oversubscribed device slow each other; `None` where its
    /// workers never oversubscribe it.
    pub device_contention: Option<f64>,
    /// How much steps in flight together slow each other within the device's parallelism;
    /// `None` where it never runs two at once.
    pub device_interference: Option<sim::config::Interference>,
}

impl StepPrices {
    pub fn of(setup: &sim::config::Setup) -> StepPrices {
        StepPrices {
            scales: (setup.prefill_step_scale, setup.decode_step_scale),
            spreads: (setup.step_spread[1].clone(), setup.step_spread[0].clone()),
            device_contention: (setup.workers_per_device > setup.device.parallelism)
                .then(|| setup.device.contention_ppm as f64 / 1e6),
            device_interference: (setup.workers_per_device > 1 && setup.device.parallelism > 1)
                .then(|| sim::config::Interference::from_ppm(&setup.device.interference_ppm)),
        }
    }

    /// A report's line.
    pub fn describe(&self) -> String {
        let (prefill, decode) = self.scales;
        let mut line = format!(
            "step prices scaled by {prefill:.3} for steps that prefill, {decode:.3} for steps \
             that only decode (the long probes' steps alone on their device against the profile)"
        );
        let spread = |kind: &str, s: &[f64]| match s {
            [] => String::new(),
            s => format!(
                "; a {kind} step's time spread by {} factors from {:.4} to {:.4}",
                s.len(),
                s[0],
                s[s.len() - 1]
            ),
        };
        line.push_str(&spread("prefilling", &self.spreads.0));
        line.push_str(&spread("decoding", &self.spreads.1));
        line.push_str(&format!(
            " (the same steps over their kind's median; the prediction pools {} samples of \
             these spreads and the link's)",
            crate::repeats::PREDICTED_SAMPLES
        ));
        if let Some(c) = self.device_contention {
            line.push_str(&format!(
                "; steps beyond the device's parallelism slow each other by a contention of \
                 {c:.3} (1 shares it equally; from the probe pairs' overlapped steps)"
            ));
        }
        if let Some(i) = self.device_interference {
            let slowed: Vec<String> = i
                .fields()
                .into_iter()
                .filter(|&(_, v)| v > 0.0)
                .map(|(field, v)| format!("{} {v:.3}", field.replace('_', " ")))
                .collect();
            line.push_str(&match slowed.as_slice() {
                [] => "; steps in flight together within its parallelism: none measured slowing \
                       another"
                    .into(),
                s => format!(
                    "; steps in flight together within its parallelism slow each other, per \
                     step beside them (from the co-running probes' steps): {}",
                    s.join(", ")
                ),
            });
        }
        line
    }
}

/// A link's figures as a transfer pays them, for a report's line.
pub fn describe_link(link: &LinkSpec) -> String {
    let gb = |rate: Option<f64>| rate.map_or("-".to_string(), |r| format!("{:.2} GB/s", r / 1e9));
    let spread = match link.time_spread.as_slice() {
        [] => String::new(),
        s => format!(
            ", a transfer's time spread by {} factors from {:.4} to {:.4} (median {:.4})",
            s.len(),
            s[0],
            s[s.len() - 1],
            crate::compare::median(s).expect("not empty")
        ),
    };
    format!(
        "KV link `{}`: {:.3} ms a transfer, {:.2} GB/s on the wire, host copies {}, \
         the receiving engine's import {}{spread}",
        link.name,
        (link.per_transfer_overhead_ns + link.latency_ns) as f64 / 1e6,
        link.bytes_per_s() / 1e9,
        gb(link.host_copy_bytes_per_s),
        gb(link.import_bytes_per_s)
    )
}

/// The 1-minute load average (Linux); `None` where /proc/loadavg cannot be read.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `3.52` or `?`.
pub fn format_load(load: Option<f64>) -> String {
    load.map_or("?".to_string(), |l| format!("{l:.2}"))
}

/// Simulates, measures and writes the outputs of one prepared case.
///
/// The cluster's serving path is probed before the workload runs; the simulator then runs on
/// the case's scenario with that path (`scenario.toml` is rewritten to hold it).
pub fn run_case(p: &Prepared, settings: &RunSettings) -> Result<CaseRun, RunError> {
    let load_before = load_average();
    let Measured {
        outputs: repeats,
        serving_path,
        probes_end,
        workload_start,
        repeat_speeds,
    } = measure(p, settings)?;
    let scenario = &p.derived.scenario;
    let measured = crate::repeats::pool(
        &repeats,
        &scenario.slo,
        hw::loadgen::block_size_tokens(scenario),
    );
    let load_before_after = (load_before, load_average());
    let measurement = crate::reprice::Measurement {
        workload_start_ns: workload_start,
        probes_end_ns: Some(probes_end),
        repeat_speeds,
        serving_path_ns: serving_path.median_ns,
        serving_path_idle_ns: Some(serving_path.idle_median_ns),
        serving_path_front_ns: Some(serving_path.front_median_ns),
        serving_path_idle_front_ns: Some(serving_path.idle_front_median_ns),
        serving_path_loaded_back_ns: Some(serving_path.long.loaded_back_median_ns),
        kv_handoff_ns: serving_path.handoff_median_ns,
        link: (serving_path.transfer_bytes > 0).then(|| {
            let long = &serving_path.long;
            LinkProbe {
                short_bytes: serving_path.transfer_bytes,
                short_transfer_ns: median(&serving_path.transfer_samples_ns),
                long_bytes: long.transfer_bytes,
                long_transfer_ns: median(&long.transfer_samples_ns),
                long_serving_path_ns: median(&long.samples_ns),
                long_transfer_samples_ns: [
                    &long.transfer_samples_ns[..],
                    &long.idle_transfer_samples_ns,
                ]
                .concat(),
                short_import_ns: serving_path.import_median_ns,
                long_import_ns: long.import_median_ns,
            }
        }),
    };
    measurement.write(&p.dir)?;
    let (_, scenario) = p
        .case
        .derive_scenario(&p.dir, Some((&measurement, &p.dir)))?;
    let setup = &scenario.setups[0];
    let (predicted, predicted_steps) =
        crate::repeats::predict(&scenario, setup, &measurement.repeat_speeds)?;
    steps::write_predicted(&p.dir, &predicted_steps, &setup.workers).map_err(RunError::Steps)?;
    let steps = steps::compare(
        &p.dir,
        setup.cost_model(&scenario).as_ref(),
        workload_start,
        setup.workers_per_device,
    )
    .map_err(RunError::Steps)?;
    let parts = parts::compare(&predicted.records, &measured.records);
    let comparison = Comparison::new(&predicted.summary, &measured.summary);
    let csv = |name: &str, records: &[RequestRecord]| {
        let path = p.dir.join(name);
        let file = File::create(&path).map_err(|e| write_error(&path, e))?;
        sim::metrics::write_requests_csv(BufWriter::new(file), records)
            .map_err(|e| write_error(&path, e))
    };
    csv("requests-predicted.csv", &predicted.records)?;
    csv("requests-measured.csv", &measured.records)?;
    let path = p.dir.join("comparison.csv");
    let file = File::create(&path).map_err(|e| write_error(&path, e))?;
    comparison
        .write_csv(BufWriter::new(file))
        .map_err(|e| write_error(&path, e))?;
    let svg = cdf(&p.case.name, &predicted.records, &measured.records);
    let path = p.dir.join("cdf.svg");
    std::fs::write(&path, svg).map_err(|e| write_error(&path, e))?;
    let run = CaseRun {
        name: p.case.name.clone(),
        predicted: predicted.summary,
        measured: measured.summary,
        comparison,
        dir: p.dir.clone(),
        load_before_after,
        steps,
        serving_path,
        parts,
        link: (p.case.cluster.mode == Mode::Disaggregated).then(|| setup.link.clone()),
        step_prices: StepPrices::of(setup),
        repeats: crate::repeats::describe(&repeats, &measurement.repeat_speeds, &predicted.records),
    };
    let path = p.dir.join("report.md");
    let text = report(p, &run, settings, measured.delayed_sends);
    std::fs::write(&path, text).map_err(|e| write_error(&path, e))?;
    Ok(run)
}

/// The CDF figure of a case from both runs' completed requests.
pub fn cdf(case: &str, predicted: &[RequestRecord], measured: &[RequestRecord]) -> String {
    let ms = |records: &[RequestRecord], f: fn(&RequestRecord) -> u64| -> Vec<f64> {
        records
            .iter()
            .filter(|r| r.is_completed())
            .map(|r| f(r) as f64 / 1e6)
            .collect()
    };
    let (p_ttft, m_ttft) = (
        ms(predicted, RequestRecord::ttft_ns),
        ms(measured, RequestRecord::ttft_ns),
    );
    let (p_e2e, m_e2e) = (
        ms(predicted, RequestRecord::e2e_ns),
        ms(measured, RequestRecord::e2e_ns),
    );
    cdf_svg(
        &format!("{case}: CDF of TTFT and E2E latency"),
        &[
            Panel {
                title: "TTFT",
                predicted_ms: &p_ttft,
                measured_ms: &m_ttft,
            },
            Panel {
                title: "E2E latency",
                predicted_ms: &p_e2e,
                measured_ms: &m_e2e,
            },
        ],
    )
}

/// A running `disagg-hw serve`; killed on drop, and it ends with this process however that
/// ends (`--exit-with-parent`); its workers end with it.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the case's cluster and waits for its `ready` line; the cluster's log goes to
/// `serve.log` in the case's directory.
fn serve(p: &Prepared, hw_bin: &Path) -> Result<Served, RunError> {
    let error = |message: String| RunError::Serve {
        hw_bin: hw_bin.display().to_string(),
        message,
    };
    let log_path = p.dir.join("serve.log");
    let log = File::create(&log_path).map_err(|e| write_error(&log_path, e))?;
    let mut child = Command::new(hw_bin)
        .args(["serve", "--exit-with-parent", "--config"])
        .arg(p.dir.join("cluster.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| error(format!("cannot start it: {e}")))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut served = Served {
        child,
        url: String::new(),
    };
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.map_err(|e| error(format!("reading its output: {e}")))?;
        if let Some(url) = line.strip_prefix("ready ") {
            served.url = url.trim().to_string();
            break;
        }
    }
    if served.url.is_empty() {
        let status = served
            .child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        return Err(error(format!(
            "exited before it was ready ({status}); its log is {}",
            log_path.display()
        )));
    }
    // The worker and registry lines follow; nothing else is expected, but a full pipe must
    // never stall the cluster.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(served)
}

/// What [`measure`] measured.
struct Measured {
    /// Each repeat's output.
    outputs: Vec<BenchOutput>,
    serving_path: ServingPath,
    /// When the probes ended and when the first workload started (ns since the UNIX epoch,
    /// as the step traces count).
    probes_end: u64,
    workload_start: u64,
    /// Each repeat's speed against the first's (`Measurement::repeat_speeds`).
    repeat_speeds: Vec<[f64; 2]>,
}

/// Probes a fresh cluster's serving path, warms it, then runs the case's workload against it,
/// then again `settings.repeats - 1` times, each on a fresh cluster warmed alike (the workers'
/// step traces gather every repeat's workload steps). Each warm-up's steps, against the first's,
/// give its repeat's machine speed: a machine that drifts between repeats is seen drifting.
fn measure(p: &Prepared, settings: &RunSettings) -> Result<Measured, RunError> {
    let served = serve(p, &settings.hw_bin)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Serve {
            hw_bin: settings.hw_bin.display().to_string(),
            message: format!("cannot start the load generator's runtime: {e}"),
        })?;
    let options = BenchOptions::new(served.url.clone());
    let scenario = &p.derived.scenario;
    let serving_path = runtime.block_on(hw::loadgen::probe::serving_path(scenario, &options))?;
    let probes_end = hw::engine::steps::epoch_ns();
    runtime.block_on(hw::loadgen::probe::warm(scenario, &options))?;
    let workload_start = hw::engine::steps::epoch_ns();
    let mut outputs = vec![runtime.block_on(hw::loadgen::run(scenario, &options))?];
    drop(served);
    let warm_up_speed = |window: std::ops::Range<u64>| -> Result<[Option<f64>; 2], RunError> {
        let setup = &scenario.setups[0];
        let (prefill, decode) = steps::AloneSteps::read(
            &p.dir,
            setup.cost_model(scenario).as_ref(),
            window,
            u64::from(crate::case::BLOCK_SIZE_TOKENS),
            setup.workers_per_device,
        )
        .map_err(RunError::Steps)?
        .scales();
        Ok([prefill, decode])
    };
    let first = warm_up_speed(probes_end..workload_start)?;
    let mut repeat_speeds = vec![[1.0; 2]];
    for _ in 1..settings.repeats {
        let earlier = crate::repeats::EarlierSteps::move_aside(&p.dir).map_err(RunError::Steps)?;
        let served = serve(p, &settings.hw_bin)?;
        let options = BenchOptions::new(served.url.clone());
        runtime.block_on(hw::loadgen::probe::warm(scenario, &options))?;
        let start = hw::engine::steps::epoch_ns();
        outputs.push(runtime.block_on(hw::loadgen::run(scenario, &options))?);
        drop(served);
        let speed = warm_up_speed(0..start)?;
        repeat_speeds.push([0, 1].map(|k| match (speed[k], first[k]) {
            (Some(s), Some(f)) if f > 0.0 => (s / f * 1e4).round() / 1e4,
            _ => 1.0,
        }));
        earlier.join(start).map_err(RunError::Steps)?;
    }
    Ok(Measured {
        outputs,
        serving_path,
        probes_end,
        workload_start,
        repeat_speeds,
    })
}

fn report(p: &Prepared, run: &CaseRun, settings: &RunSettings, delayed_sends: u64) -> String {
    let case = &p.case;
    let c = &case.cluster;
    let plural = |n: u32| if n == 1 { "" } else { "s" };
    let workers = match c.mode {
        Mode::Aggregated => format!(
            "{} aggregated worker{} on {}",
            c.aggregated_workers,
            plural(c.aggregated_workers),
            c.device.aggregated
        ),
        Mode::Disaggregated => format!(
            "{} prefill worker{} on {} + {} decode worker{} on {}, KV over {}",
            c.prefill_workers,
            plural(c.prefill_workers),
            c.device.prefill,
            c.decode_workers,
            plural(c.decode_workers),
            c.device.decode,
            case.transport.name()
        ),
    };
    let weights = match case.random_seed {
        Some(seed) => format!(" (random weights, seed {seed})"),
        None => String::new(),
    };
    let predictor = match &case.predictor {
        Predictor::Profile(path) => format!("calibration profile `{}`", path.display()),
        Predictor::Roofline(spec) => format!(
            "the roofline `{}` (the profile `{}` is not read while the case names a roofline)",
            spec.name,
            case.profile.display()
        ),
    };
    let mut out = format!("# Validation case `{}`\n\n", case.name);
    if !case.description.is_empty() {
        out.push_str(&format!("{}\n\n", case.description));
    }
    out.push_str(&format!(
        "- case: `{}`\n- command: `{}`\n- machine: {} (results tag `{}`)\n",
        case.file, settings.command, settings.machine.description, settings.machine.tag
    ));
    out.push_str(&format!(
        "- real: `disagg-hw serve --config cluster.toml`: {} {}{weights}; {workers}; router \
         `{}`; {} KV blocks, {} seqs and {} tokens per step per worker\n",
        case.model.name,
        case.dtype.name(),
        c.router.name(),
        c.kv_blocks,
        c.max_num_seqs,
        c.max_batched_tokens
    ));
    out.push_str(&format!(
        "- predicted: `scenario.toml` (one setup of the same shape), steps priced by {predictor}, \
         KV over link `{}`; {} samples of its step and transfer time spreads over the same \
         workload, their requests pooled as the measured repeats'\n",
        case.link,
        crate::repeats::PREDICTED_SAMPLES
    ));
    out.push_str(&format!(
        "- workload: seed {}; requests completed / rejected: measured {} / {}, predicted {} / {}\n",
        case.seed,
        run.measured.completed,
        run.measured.rejected,
        run.predicted.completed,
        run.predicted.rejected
    ));
    out.push_str(&format!("- {}\n", run.repeats));
    out.push_str(&format!(
        "- machine load: 1-minute load average {} before the measurement, {} after\n",
        format_load(run.load_before_after.0),
        format_load(run.load_before_after.1)
    ));
    if delayed_sends > 0 {
        out.push_str(&format!(
            "- note: {delayed_sends} sends waited for a free slot: the measured load was not \
             fully open loop\n"
        ));
    }
    let path = &run.serving_path;
    let ms = |ns: &[u64]| {
        ns.iter()
            .map(|&n| format!("{:.2}", n as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push_str(&format!(
        "- serving path: {:.3} ms, the median of {} one-token probes (after {} warming the \
         connections) sent back to back before the workload: each probe's TTFT less its \
         prefill and KV transfer. Probes in ms: {}; their TTFTs: {}\n",
        path.median_ns as f64 / 1e6,
        path.samples_ns.len(),
        PROBES - path.samples_ns.len(),
        ms(&path.samples_ns),
        ms(&path.ttft_ns)
    ));
    out.push_str(&format!(
        "- serving path of an idle cluster: {:.3} ms, the median of {} such probes sent {} ms \
         after the one before. Probes in ms: {}\n",
        path.idle_median_ns as f64 / 1e6,
        path.idle_samples_ns.len(),
        IDLE_PAUSE.as_millis(),
        ms(&path.idle_samples_ns)
    ));
    let long = &path.long;
    if path.transfer_bytes > 0 {
        out.push_str(&format!(
            "- KV transfers: {:.3} ms for the short probes' {} bytes (medians; in ms: {}), \
             {:.3} ms for the {} bytes of {} probes of {} tokens sent back to back after them \
             (in ms: {}), whose serving paths took {:.3} ms (in ms: {}), and {} of them after \
             a pause of {} ms each (transfers in ms: {}); the link is refitted to them\n",
            median(&path.transfer_samples_ns) as f64 / 1e6,
            path.transfer_bytes,
            ms(&path.transfer_samples_ns),
            median(&long.transfer_samples_ns) as f64 / 1e6,
            long.transfer_bytes,
            long.samples_ns.len(),
            long.prompt_tokens,
            ms(&long.transfer_samples_ns),
            median(&long.samples_ns) as f64 / 1e6,
            ms(&long.samples_ns),
            long.idle_transfer_samples_ns.len(),
            IDLE_PAUSE.as_millis(),
            ms(&long.idle_transfer_samples_ns)
        ));
    }
    if long.pairs > 0 {
        out.push_str(&format!(
            "- {} pairs of long probes, the second sent {:.3} ms (the back-to-back long probes' \
             median time to first token) after the first: the second's way back (its first \
             token after its prefill, transfer and import) took {:.3} ms (median), a loaded \
             cluster's; on a shared device their steps overlapped\n",
            long.pairs,
            median(&path.long.ttft_ns) as f64 / 1e6,
            long.loaded_back_median_ns as f64 / 1e6,
        ));
    }
    let handoff = path.handoff_median_ns.map_or(String::new(), |ns| {
        format!(
            ", and {:.3} ms from their KV landing to the decode worker's import",
            ns as f64 / 1e6
        )
    });
    let imports = match (path.import_median_ns, long.import_median_ns) {
        (Some(short), Some(long_ns)) => format!(
            "; the decode worker's imports {:.3} ms (short) and {:.3} ms (long)",
            short as f64 / 1e6,
            long_ns as f64 / 1e6
        ),
        _ => String::new(),
    };
    out.push_str(&format!(
        "- the serving path taken apart (medians): the way in (acceptance to the prefill's \
         first step) {:.3} ms back to back, {:.3} ms idle; the idle probes' way back {:.3} ms\
         {handoff}{imports}. The simulator takes each path's way in (`serving_path_front_ms`, \
         `serving_path_idle_front_ms`) and the hand-off (`kv_handoff_ms`) out of the paths; \
         a request that finds others in flight takes the way in and the pairs' way back \
         (`serving_path_ms`)\n",
        path.front_median_ns as f64 / 1e6,
        path.idle_front_median_ns as f64 / 1e6,
        path.idle_back_median_ns as f64 / 1e6,
    ));
    if let Some(link) = &run.link {
        out.push_str(&format!("- {}\n", describe_link(link)));
    }
    out.push_str(&format!("- {}\n", run.step_prices.describe()));
    out.push_str("\n## Predicted against measured\n\n");
    out.push_str(&run.comparison.markdown_table());
    out.push_str("\nError is (predicted - measured) / measured.\n\n");
    match run.comparison.worst() {
        Some((row, error)) => out.push_str(&format!(
            "Worst error: **{}**, {} (predicted {}, measured {}).\n",
            row.metric,
            format_error(Some(error)),
            row.unit.format(row.predicted),
            row.unit.format(row.measured)
        )),
        None => out.push_str("No metric has a relative error (nothing was measured).\n"),
    }
    out.push_str(
        "\n## Time to first token by part\n\nMedians over completed requests: wait (arrival \
         to the prefill's first step), prefill (to its last step's sample), transfer (the KV \
         landing after that), to import (the decode worker starting to copy it into its cache: \
         the prefill's reply and the worker's running step), import, delivery (the first token \
         reaching the client after the last of these):\n\n",
    );
    out.push_str(&parts::table(&run.parts));
    out.push_str(
        "\n## Step times\n\nEvery step the real workers ran (`steps-WORKER.csv`), against \
         the cost model's price for the same work:\n\n",
    );
    out.push_str(&steps::table(&run.steps));
    out.push_str(
        "\n![TTFT and E2E CDFs, predicted dashed, measured solid](cdf.svg)\n\n\
         Files: `requests-measured.csv`, `requests-predicted.csv` (one row per request, the \
         simulator's schema), `steps-WORKER.csv` (one row per real step), `comparison.csv`, \
         `cdf.svg`, `cluster.toml`, `scenario.toml`, `measurement.toml` (what `disagg-validate \
         reprice` reads), `serve.log`.\n",
    );
    out
}
