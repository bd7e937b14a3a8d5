//! Scenario files: a model, a workload, an SLO and one or more cluster setups to compare on
//! that same workload. Parsing rejects unknown fields; every error is one line naming the file,
//! the line and the field.

use crate::calibration::Profile;
use crate::cost::{CostModel, Measured, Roofline, Scaled};
use crate::hardware::HardwareSpec;
use crate::kv::DEFAULT_BLOCK_SIZE_TOKENS;
use crate::metrics::Slo;
use crate::network::LinkSpec;
use crate::routing::{Policy, Role};
use crate::sharing::DeviceSharing;
use crate::time::{Nanos, secs_to_ns};
use crate::workload::WorkloadConfig;
use models::{DType, ModelSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// The scenario the binary runs when given none: the seed document's comparison table.
pub const DEFAULT_SCENARIO: &str = include_str!("../../configs/scenarios/seed-table.toml");
pub const DEFAULT_SCENARIO_NAME: &str = "configs/scenarios/seed-table.toml";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelConfig,
    pub workload: WorkloadConfig,
    #[serde(default = "default_slo")]
    pub slo: Slo,
    /// Accelerators defined here, beside the compiled-in presets.
    #[serde(default)]
    pub hardware: Vec<HardwareSpec>,
    /// Links defined here, beside the compiled-in presets.
    #[serde(default)]
    pub link: Vec<LinkSpec>,
    pub setup: Vec<SetupConfig>,
}

fn default_slo() -> Slo {
    Slo {
        ttft_ms: 1000.0,
        tpot_ms: 100.0,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// One of `ModelSpec::PRESETS`, or leave out and give `spec`.
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub spec: Option<ModelSpec>,
    #[serde(default = "default_dtype")]
    pub dtype: DType,
    /// Element type of the KV cache; the weights' dtype when left out.
    #[serde(default)]
    pub kv_dtype: Option<DType>,
}

fn default_dtype() -> DType {
    DType::Bf16
}

/// How prefill and decode are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every worker prefills and decodes its own requests.
    Aggregated,
    /// Prompts are prefilled on prefill workers and their KV shipped to decode workers.
    Disaggregated,
    /// As disaggregated, but a decode worker prefills locally when the part of the prompt it
    /// does not hold is shorter than `conditional_threshold_tokens`.
    Conditional,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupConfig {
    pub name: String,
    /// A hardware preset or a `[[hardware]]` of this file, by name: step times from its
    /// roofline. Leave out when `profile` is given.
    #[serde(default)]
    pub hardware: Option<String>,
    /// A calibration profile (`disagg-hw calibrate`), relative to this file: step times
    /// measured on its device, and its fitted links to name in `link`.
    #[serde(default)]
    pub profile: Option<String>,
    /// The link from each GPU to the fabric, by name.
    pub link: String,
    /// The link between GPUs of one host (NVLink), when hosts have several.
    #[serde(default)]
    pub intra_link: Option<String>,
    #[serde(default = "one")]
    pub gpus_per_host: u32,
    /// Workers that time-share one device (two processes on one GPU, or single-threaded
    /// workers on one CPU): workers i * n .. (i + 1) * n share device i.
    #[serde(default = "one")]
    pub workers_per_device: u32,
    /// How many of a device's workers step at full speed at once (a CPU's cores over each
    /// worker's threads); when more are busy, they share it.
    #[serde(default = "one")]
    pub device_parallelism: u32,
    /// How much the busy steps of an oversubscribed device slow each other: with n busy on a
    /// device of parallelism p < n, each runs at p / (p + c (n - p)) of full speed. 1 shares
    /// the device equally (processor sharing); less where the steps overlap on it in part (two
    /// processes on one GPU, each step's host work beside the other's kernels), more where
    /// one's turn on it holds the other up longer than equal shares would. `disagg-validate`
    /// measures it on the cluster it runs. Default 1.
    #[serde(default = "unit_scale")]
    pub device_contention: f64,
    /// How much the steps of workers sharing a device slow each other even where it runs them
    /// all at once: workers on cores of their own still share the memory bus and caches.
    /// Default none.
    #[serde(default)]
    pub device_interference: Interference,
    pub mode: Mode,
    #[serde(default)]
    pub aggregated_workers: u32,
    #[serde(default)]
    pub prefill_workers: u32,
    #[serde(default)]
    pub decode_workers: u32,
    /// Picks the aggregated or decode worker of each request.
    #[serde(default = "round_robin")]
    pub router: Policy,
    /// Picks the prefill worker; `router` when left out.
    #[serde(default)]
    pub prefill_router: Option<Policy>,
    #[serde(default = "default_threshold")]
    pub conditional_threshold_tokens: u32,
    /// How long a worker's KV events take to reach the router's block index.
    #[serde(default)]
    pub registry_delay_ms: f64,
    /// The fixed time a request spends in the serving stack outside its engine steps and its
    /// KV transfer: the client's request reaching a worker's engine, the hand-offs between
    /// workers, and each token travelling back to the client. Added to every time the client
    /// sees. `disagg-validate` measures it on the cluster it runs.
    #[serde(default)]
    pub serving_path_ms: f64,
    /// The serving path of a request that reaches a cluster with nothing in flight, whose
    /// threads and cores have gone to sleep (default: `serving_path_ms`).
    #[serde(default)]
    pub serving_path_idle_ms: Option<f64>,
    /// The serving path's way in: a request reaches its worker's engine this long after it
    /// arrives, and the rest of the path is on the way back (default 0).
    #[serde(default)]
    pub serving_path_front_ms: f64,
    /// The idle serving path's way in (default: `serving_path_front_ms`).
    #[serde(default)]
    pub serving_path_idle_front_ms: Option<f64>,
    /// The hand-off of landed KV: the decode worker can take it in this long after it landed
    /// (the prefill worker's reply reaching the decode worker's process and engine). Default 0.
    #[serde(default)]
    pub kv_handoff_ms: f64,
    /// How long this setup's steps take against the cost model's price: the first for a step
    /// that prefills, the second for one that only decodes (the speed of the machine as it
    /// runs, where that differs from when it was measured; `disagg-validate` measures both with
    /// probes on the cluster it runs). Default 1.
    #[serde(default = "unit_scale")]
    pub prefill_step_scale: f64,
    #[serde(default = "unit_scale")]
    pub decode_step_scale: f64,
    /// The spread of a step's time about its price, as factors (each a measured step's time
    /// over the median of its kind's): each step draws one with equal odds. The first for steps
    /// that prefill, the second for steps that only decode; empty (the default): every step
    /// takes its price. A real machine's steps of the same work vary, and near saturation the
    /// queue turns that into latency; `disagg-validate` measures both with its probes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefill_step_spread: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode_step_spread: Vec<f64>,
    #[serde(default)]
    pub engine: EngineConfig,
}

/// How much one other step in flight on the same device slows a step, by the kind of each (a
/// step that prefills, or one that only decodes): a step with others in flight takes its time
/// times one plus the sum of these over them (and beyond the device's parallelism, its
/// contention's share on top). `disagg-validate` measures it with probes that run two requests
/// at once. On a 2-core cloud machine, one thread a worker, a prefill beside a decode took
/// about 1.1 times its time alone, a decode beside a decode 1.2-1.4 times, a decode beside a
/// prefill 1.0 (the decodes read the weights at the memory bus's pace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interference {
    #[serde(default)]
    pub prefill_by_prefill: f64,
    #[serde(default)]
    pub prefill_by_decode: f64,
    #[serde(default)]
    pub decode_by_prefill: f64,
    #[serde(default)]
    pub decode_by_decode: f64,
}

impl Interference {
    /// Each field with its name.
    pub fn fields(&self) -> [(&'static str, f64); 4] {
        [
            ("prefill_by_prefill", self.prefill_by_prefill),
            ("prefill_by_decode", self.prefill_by_decode),
            ("decode_by_prefill", self.decode_by_prefill),
            ("decode_by_decode", self.decode_by_decode),
        ]
    }

    /// How much a step (`prefills`: whether it prefills) is slowed by one other of the kind
    /// `by_prefill` says.
    pub fn of(&self, prefills: bool, by_prefill: bool) -> f64 {
        match (prefills, by_prefill) {
            (true, true) => self.prefill_by_prefill,
            (true, false) => self.prefill_by_decode,
            (false, true) => self.decode_by_prefill,
            (false, false) => self.decode_by_decode,
        }
    }

    /// The figure [`Interference::of`] reads, to set.
    pub fn of_mut(&mut self, prefills: bool, by_prefill: bool) -> &mut f64 {
        match (prefills, by_prefill) {
            (true, true) => &mut self.prefill_by_prefill,
            (true, false) => &mut self.prefill_by_decode,
            (false, true) => &mut self.decode_by_prefill,
            (false, false) => &mut self.decode_by_decode,
        }
    }

    pub fn is_none(&self) -> bool {
        self.fields().iter().all(|&(_, v)| v == 0.0)
    }

    /// In millionths, indexed `[slowed step prefills][other step prefills]`.
    pub fn to_ppm(&self) -> [[u64; 2]; 2] {
        [false, true]
            .map(|prefills| [false, true].map(|by| (self.of(prefills, by) * 1e6).round() as u64))
    }

    pub fn from_ppm(ppm: &[[u64; 2]; 2]) -> Interference {
        let mut i = Interference::default();
        for prefills in [false, true] {
            for by in [false, true] {
                *i.of_mut(prefills, by) = ppm[usize::from(prefills)][usize::from(by)] as f64 / 1e6;
            }
        }
        i
    }
}

/// The largest `device_contention` and `device_interference` term: a step that shares its
/// device with one other taking five times as long as alone.
pub const MAX_DEVICE_CONTENTION: f64 = 4.0;

/// The largest factor of a step spread: a step ten times its kind's median is a stall, not
/// the spread of its work.
pub const MAX_STEP_SPREAD: f64 = 10.0;

fn unit_scale() -> f64 {
    1.0
}

fn one() -> u32 {
    1
}

fn round_robin() -> Policy {
    Policy::RoundRobin
}

fn default_threshold() -> u32 {
    512
}

/// The iteration scheduler of every worker in a setup (vLLM's knobs and defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub block_size_tokens: u32,
    /// Sequences computing in one step at most.
    pub max_num_seqs: u32,
    /// Token budget of one step: one per decoding sequence, the rest for prefill chunks.
    pub max_batched_tokens: u32,
    /// Split long prompts across steps; without it a prompt's prefill runs in one step.
    pub chunked_prefill: bool,
    pub prefix_caching: bool,
    /// Share of GPU memory for weights plus KV cache.
    pub gpu_memory_utilization: f64,
    /// Requests waiting at one worker beyond which new ones are rejected.
    pub max_queue: u32,
    /// Longest prompt plus output; the model's context length when left out.
    pub max_model_len: Option<u32>,
    /// KV blocks per worker. Required with a profile (a measured device has no memory
    /// figure); otherwise it replaces what GPU memory less weights would hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_blocks: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size_tokens: DEFAULT_BLOCK_SIZE_TOKENS,
            max_num_seqs: 256,
            max_batched_tokens: 8192,
            chunked_prefill: true,
            prefix_caching: true,
            gpu_memory_utilization: 0.9,
            max_queue: 4096,
            max_model_len: None,
            kv_blocks: None,
        }
    }
}

/// A scenario with names resolved and every figure checked.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub model: ModelSpec,
    pub dtype: DType,
    pub kv_dtype: DType,
    pub workload: WorkloadConfig,
    pub slo: Slo,
    pub setups: Vec<Setup>,
    /// Relative paths in the scenario (a trace) resolve against this directory.
    pub base_dir: PathBuf,
}

/// Where a setup's step times come from.
#[derive(Clone, Debug)]
pub enum StepTimes {
    /// The roofline of a hardware spec (modelled).
    Roofline(HardwareSpec),
    /// A calibration profile's tables (measured).
    Measured(Measured),
}

/// One cluster to simulate.
#[derive(Clone, Debug)]
pub struct Setup {
    pub name: String,
    pub step_times: StepTimes,
    /// KV blocks of each worker.
    pub kv_blocks: u32,
    pub link: LinkSpec,
    pub intra_link: Option<LinkSpec>,
    pub gpus_per_host: u32,
    /// Workers i * n .. (i + 1) * n time-share device i (n = `workers_per_device`)...
    pub workers_per_device: u32,
    /// ...as these figures say (`SetupConfig::device_*`).
    pub device: DeviceSharing,
    pub mode: Mode,
    /// Role of each worker, by worker id; worker i's KV leaves through GPU i's link.
    pub workers: Vec<Role>,
    pub router: Policy,
    pub prefill_router: Policy,
    pub conditional_threshold_tokens: u32,
    pub registry_delay_ns: Nanos,
    /// `SetupConfig::serving_path_ms`.
    pub serving_path_ns: Nanos,
    /// `SetupConfig::serving_path_idle_ms`.
    pub serving_path_idle_ns: Nanos,
    /// `SetupConfig::serving_path_front_ms`.
    pub serving_path_front_ns: Nanos,
    /// `SetupConfig::serving_path_idle_front_ms`.
    pub serving_path_idle_front_ns: Nanos,
    /// `SetupConfig::kv_handoff_ms`.
    pub kv_handoff_ns: Nanos,
    /// `SetupConfig::prefill_step_scale` and `decode_step_scale`.
    pub prefill_step_scale: f64,
    pub decode_step_scale: f64,
    /// `SetupConfig::prefill_step_spread` and `decode_step_spread`, indexed by whether the
    /// step prefills.
    pub step_spread: [Vec<f64>; 2],
    pub engine: EngineConfig,
}

impl Setup {
    pub fn hosts(&self) -> u32 {
        (self.workers.len() as u32).div_ceil(self.gpus_per_host)
    }

    /// The cost model that prices this setup's steps for `scenario`'s model.
    pub fn cost_model(&self, scenario: &Scenario) -> Box<dyn CostModel> {
        let model: Box<dyn CostModel> = match &self.step_times {
            StepTimes::Roofline(hw) => Box::new(Roofline::new(
                hw,
                &scenario.model,
                scenario.dtype,
                scenario.kv_dtype,
            )),
            StepTimes::Measured(cost) => Box::new(cost.clone()),
        };
        if self.prefill_step_scale == 1.0 && self.decode_step_scale == 1.0 {
            return model;
        }
        Box::new(Scaled {
            model,
            prefill: self.prefill_step_scale,
            decode: self.decode_step_scale,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ConfigError> {
        let (text, file) = read_config(path)?;
        let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Scenario::parse(&text, &file, base_dir)
    }

    /// The compiled-in default scenario.
    pub fn default_scenario() -> Scenario {
        Scenario::parse(DEFAULT_SCENARIO, DEFAULT_SCENARIO_NAME, PathBuf::from("."))
            .expect("the compiled-in default scenario is valid")
    }

    /// Parses and checks scenario text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, base_dir: PathBuf) -> Result<Scenario, ConfigError> {
        let raw: ScenarioFile = from_toml(text, file)?;
        resolve(raw, base_dir).map_err(|(path, message)| invalid_at(text, file, &path, message))
    }
}

/// A config file's text and its name for error messages.
pub fn read_config(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, file)),
        Err(source) => Err(ConfigError::Io { file, source }),
    }
}

/// Parses TOML into `T`; a syntax or schema error becomes `file:line:col: field.path: message`.
/// For every TOML file the project reads (scenarios here, cluster configs in the real system).
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let path = DeTable::parse(text)
            .ok()
            .and_then(|doc| path_at(doc.get_ref(), offset));
        let message = e.message().trim().replace('\n', " ");
        let message = match path {
            Some(path) => format!("{path}: {message}"),
            None => message,
        };
        invalid(text, file, offset, message)
    })
}

/// An error about the entry at dotted `path` (`worker[1].kv_blocks`) of a parsed file, found
/// after parsing, located at that entry's line and column.
pub fn invalid_at(text: &str, file: &str, path: &str, message: String) -> ConfigError {
    let offset = DeTable::parse(text)
        .ok()
        .map_or(0, |doc| offset_of(doc.get_ref(), path));
    invalid(text, file, offset, format!("{path}: {message}"))
}

fn invalid(text: &str, file: &str, offset: usize, message: String) -> ConfigError {
    let (line, column) = line_column(text, offset);
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// Names resolved and figures checked; an error is (field path, message).
fn resolve(raw: ScenarioFile, base_dir: PathBuf) -> Result<Scenario, (String, String)> {
    let err = |path: &str, msg: String| (path.to_string(), msg);
    let model = match (&raw.model.preset, &raw.model.spec) {
        (Some(name), None) => ModelSpec::preset(name).ok_or_else(|| {
            err(
                "model.preset",
                format!(
                    "unknown model `{name}`, expected one of {}",
                    ModelSpec::PRESETS.join(", ")
                ),
            )
        })?,
        (None, Some(spec)) => spec.clone(),
        _ => {
            return Err(err(
                "model",
                "give exactly one of `preset` and `spec`".to_string(),
            ));
        }
    };
    if model.n_layers == 0
        || model.n_heads == 0
        || model.n_kv_heads == 0
        || model.head_dim == 0
        || model.hidden_size == 0
    {
        return Err(err(
            "model.spec",
            "layer, head and size counts must be positive".to_string(),
        ));
    }
    raw.workload
        .validate()
        .map_err(|e| split_path(&e.to_string(), "workload"))?;
    raw.slo
        .validate()
        .map_err(|(field, message)| err(field, message))?;
    for (i, hw) in raw.hardware.iter().enumerate() {
        hw.validate()
            .map_err(|e| split_path(&e, &format!("hardware[{i}]")))?;
    }
    for (i, link) in raw.link.iter().enumerate() {
        link.validate()
            .map_err(|e| split_path(&e, &format!("link[{i}]")))?;
    }
    if raw.setup.is_empty() {
        return Err(err(
            "setup",
            "at least one [[setup]] is required".to_string(),
        ));
    }
    let hardware = |name: &str| {
        raw.hardware
            .iter()
            .find(|h| h.name == name)
            .cloned()
            .or_else(|| HardwareSpec::preset(name))
    };
    let link = |name: &str, profile: Option<&Profile>| {
        raw.link
            .iter()
            .find(|l| l.name == name)
            .or_else(|| profile.and_then(|p| p.link(name)))
            .cloned()
            .or_else(|| LinkSpec::preset(name))
    };
    let dtype = raw.model.dtype;
    let kv_dtype = raw.model.kv_dtype.unwrap_or(dtype);
    let mut setups = Vec::with_capacity(raw.setup.len());
    for (i, s) in raw.setup.iter().enumerate() {
        let at = |field: &str| format!("setup[{i}].{field}");
        let (step_times, profile) = match (&s.hardware, &s.profile) {
            (Some(name), None) => {
                let hw = hardware(name).ok_or_else(|| {
                    err(
                        &at("hardware"),
                        format!(
                            "unknown hardware `{name}`, expected one of {} or a [[hardware]] \
                             of this file",
                            HardwareSpec::PRESETS.join(", ")
                        ),
                    )
                })?;
                (StepTimes::Roofline(hw), None)
            }
            (None, Some(file)) => {
                let path = base_dir.join(file);
                let profile =
                    Profile::load(&path).map_err(|e| err(&at("profile"), e.to_string()))?;
                let measured = &profile.meta;
                if measured.model != model.name || measured.dtype != dtype || kv_dtype != dtype {
                    return Err(err(
                        &at("profile"),
                        format!(
                            "the profile measured {} in {} (KV too); the scenario's model is {} \
                             in {} (KV {})",
                            measured.model,
                            measured.dtype.name(),
                            model.name,
                            dtype.name(),
                            kv_dtype.name()
                        ),
                    ));
                }
                let cost = Measured::new(&profile)
                    .map_err(|e| err(&at("profile"), format!("{}: {e}", path.display())))?;
                (StepTimes::Measured(cost), Some(profile))
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    &at("hardware"),
                    "give `hardware` or `profile`, not both: a profile's measured step times \
                     replace the hardware's roofline"
                        .to_string(),
                ));
            }
            (None, None) => {
                return Err(err(
                    &at("hardware"),
                    "missing: give `hardware` (a preset or a [[hardware]], for modelled step \
                     times) or `profile` (a calibration profile, for measured ones)"
                        .to_string(),
                ));
            }
        };
        let unknown_link = |field: &str, name: &str| {
            err(
                &at(field),
                format!(
                    "unknown link `{name}`, expected one of {} or a [[link]] of this file{}",
                    LinkSpec::PRESETS.join(", "),
                    if profile.is_some() {
                        " or of the profile"
                    } else {
                        ""
                    }
                ),
            )
        };
        let fabric =
            link(&s.link, profile.as_ref()).ok_or_else(|| unknown_link("link", &s.link))?;
        let intra = match &s.intra_link {
            Some(name) => {
                Some(link(name, profile.as_ref()).ok_or_else(|| unknown_link("intra_link", name))?)
            }
            None => None,
        };
        if s.gpus_per_host == 0 {
            return Err(err(&at("gpus_per_host"), "must be at least 1".to_string()));
        }
        if s.workers_per_device == 0 {
            return Err(err(
                &at("workers_per_device"),
                "must be at least 1".to_string(),
            ));
        }
        if s.device_parallelism == 0 || s.device_parallelism > s.workers_per_device {
            return Err(err(
                &at("device_parallelism"),
                format!(
                    "must be in 1..={} (workers_per_device)",
                    s.workers_per_device
                ),
            ));
        }
        let workers: Vec<Role> = match s.mode {
            Mode::Aggregated => {
                if s.aggregated_workers == 0 {
                    return Err(err(
                        &at("aggregated_workers"),
                        "mode = \"aggregated\" needs at least one".to_string(),
                    ));
                }
                if s.prefill_workers + s.decode_workers > 0 {
                    return Err(err(
                        &at("prefill_workers"),
                        "mode = \"aggregated\" takes aggregated_workers only".to_string(),
                    ));
                }
                vec![Role::Aggregated; s.aggregated_workers as usize]
            }
            Mode::Disaggregated | Mode::Conditional => {
                for (field, n) in [
                    ("prefill_workers", s.prefill_workers),
                    ("decode_workers", s.decode_workers),
                ] {
                    if n == 0 {
                        return Err(err(
                            &at(field),
                            "a disaggregated setup needs at least one".to_string(),
                        ));
                    }
                }
                if s.aggregated_workers > 0 {
                    return Err(err(
                        &at("aggregated_workers"),
                        "a disaggregated setup takes prefill_workers and decode_workers"
                            .to_string(),
                    ));
                }
                let mut roles = vec![Role::Prefill; s.prefill_workers as usize];
                roles.extend(std::iter::repeat_n(Role::Decode, s.decode_workers as usize));
                roles
            }
        };
        if workers.len() > 100_000 {
            return Err(err(&at("mode"), "at most 100000 workers".to_string()));
        }
        if intra.is_none() && s.gpus_per_host > 1 {
            return Err(err(
                &at("intra_link"),
                "hosts with several GPUs need an intra_link (e.g. \"nvlink\")".to_string(),
            ));
        }
        s.router
            .validate()
            .map_err(|e| split_path(&e.to_string(), &at("router")))?;
        let prefill_router = s.prefill_router.clone().unwrap_or_else(|| s.router.clone());
        prefill_router
            .validate()
            .map_err(|e| split_path(&e.to_string(), &at("prefill_router")))?;
        if !(s.registry_delay_ms >= 0.0 && s.registry_delay_ms.is_finite()) {
            return Err(err(&at("registry_delay_ms"), "must be >= 0".to_string()));
        }
        if !(s.serving_path_ms >= 0.0 && s.serving_path_ms.is_finite()) {
            return Err(err(&at("serving_path_ms"), "must be >= 0".to_string()));
        }
        let serving_path_idle_ms = s.serving_path_idle_ms.unwrap_or(s.serving_path_ms);
        if !(serving_path_idle_ms >= 0.0 && serving_path_idle_ms.is_finite()) {
            return Err(err(&at("serving_path_idle_ms"), "must be >= 0".to_string()));
        }
        let idle_front_ms = s
            .serving_path_idle_front_ms
            .unwrap_or(s.serving_path_front_ms);
        for (field, front, path, which) in [
            (
                "serving_path_front_ms",
                s.serving_path_front_ms,
                s.serving_path_ms,
                "serving_path_ms",
            ),
            (
                "serving_path_idle_front_ms",
                idle_front_ms,
                serving_path_idle_ms,
                "the idle serving path",
            ),
        ] {
            if !(front >= 0.0 && front <= path) {
                return Err(err(&at(field), format!("must be in 0..={path} ({which})")));
            }
        }
        if !(s.kv_handoff_ms >= 0.0 && s.kv_handoff_ms.is_finite()) {
            return Err(err(&at("kv_handoff_ms"), "must be >= 0".to_string()));
        }
        for (field, scale) in [
            ("prefill_step_scale", s.prefill_step_scale),
            ("decode_step_scale", s.decode_step_scale),
        ] {
            if !(scale > 0.0 && scale.is_finite()) {
                return Err(err(&at(field), format!("must be positive, got {scale}")));
            }
        }
        for (field, spread) in [
            ("prefill_step_spread", &s.prefill_step_spread),
            ("decode_step_spread", &s.decode_step_spread),
        ] {
            if let Some((i, factor)) = spread
                .iter()
                .enumerate()
                .find(|&(_, &f)| !(f > 0.0 && f <= MAX_STEP_SPREAD))
            {
                return Err(err(
                    &at(&format!("{field}[{i}]")),
                    format!("must be in (0, {MAX_STEP_SPREAD}], got {factor}"),
                ));
            }
        }
        if !(0.0..=MAX_DEVICE_CONTENTION).contains(&s.device_contention) {
            return Err(err(
                &at("device_contention"),
                format!(
                    "must be in 0..={MAX_DEVICE_CONTENTION}, got {}",
                    s.device_contention
                ),
            ));
        }
        for (field, v) in s.device_interference.fields() {
            if !(0.0..=MAX_DEVICE_CONTENTION).contains(&v) {
                return Err(err(
                    &at(&format!("device_interference.{field}")),
                    format!("must be in 0..={MAX_DEVICE_CONTENTION}, got {v}"),
                ));
            }
        }
        let e = &s.engine;
        let engine_checks = [
            (
                "block_size_tokens",
                e.block_size_tokens > 0 && e.block_size_tokens <= 1024,
            ),
            ("max_num_seqs", e.max_num_seqs > 0),
            ("max_batched_tokens", e.max_batched_tokens > 0),
            ("max_queue", e.max_queue > 0),
            (
                "gpu_memory_utilization",
                e.gpu_memory_utilization > 0.0 && e.gpu_memory_utilization <= 1.0,
            ),
            ("max_model_len", e.max_model_len != Some(0)),
            ("kv_blocks", e.kv_blocks != Some(0)),
        ];
        for (field, ok) in engine_checks {
            if !ok {
                return Err(err(
                    &at(&format!("engine.{field}")),
                    "out of range (block_size_tokens in 1..=1024, counts > 0, \
                     gpu_memory_utilization in (0, 1])"
                        .to_string(),
                ));
            }
        }
        let kv_blocks = match (&step_times, e.kv_blocks) {
            (_, Some(blocks)) => blocks,
            (StepTimes::Measured(_), None) => {
                return Err(err(
                    &at("engine.kv_blocks"),
                    "required with a profile: a measured device has no memory figure to \
                     size the KV pool from (blocks per worker)"
                        .to_string(),
                ));
            }
            (StepTimes::Roofline(hw), None) => {
                let kv_block_bytes =
                    model.kv_bytes_per_token(kv_dtype) * e.block_size_tokens as u64;
                // Each worker sharing the device holds its own weights and its share of memory.
                let kv_bytes = hw.memory_bytes() * e.gpu_memory_utilization
                    / s.workers_per_device as f64
                    - model.weight_bytes(dtype) as f64;
                if kv_bytes < kv_block_bytes as f64 {
                    return Err(err(
                        &at("hardware"),
                        format!(
                            "{} ({} GiB x {}{}) cannot hold {} in {} ({:.1} GiB) and a KV block",
                            hw.name,
                            hw.memory_gib,
                            e.gpu_memory_utilization,
                            match s.workers_per_device {
                                1 => String::new(),
                                n => format!(" / {n} workers"),
                            },
                            model.name,
                            dtype.name(),
                            model.weight_bytes(dtype) as f64 / (1u64 << 30) as f64
                        ),
                    ));
                }
                (kv_bytes / kv_block_bytes as f64).floor() as u32
            }
        };
        setups.push(Setup {
            name: s.name.clone(),
            step_times,
            kv_blocks,
            link: fabric,
            intra_link: intra,
            gpus_per_host: s.gpus_per_host,
            workers_per_device: s.workers_per_device,
            device: DeviceSharing {
                parallelism: s.device_parallelism,
                contention_ppm: (s.device_contention * 1e6).round() as u64,
                interference_ppm: s.device_interference.to_ppm(),
            },
            mode: s.mode,
            workers,
            router: s.router.clone(),
            prefill_router,
            conditional_threshold_tokens: s.conditional_threshold_tokens,
            registry_delay_ns: secs_to_ns(s.registry_delay_ms / 1e3),
            serving_path_ns: secs_to_ns(s.serving_path_ms / 1e3),
            serving_path_idle_ns: secs_to_ns(serving_path_idle_ms / 1e3),
            serving_path_front_ns: secs_to_ns(s.serving_path_front_ms / 1e3),
            serving_path_idle_front_ns: secs_to_ns(idle_front_ms / 1e3),
            kv_handoff_ns: secs_to_ns(s.kv_handoff_ms / 1e3),
            prefill_step_scale: s.prefill_step_scale,
            decode_step_scale: s.decode_step_scale,
            step_spread: [s.decode_step_spread.clone(), s.prefill_step_spread.clone()],
            engine: s.engine.clone(),
        });
    }
    Ok(Scenario {
        name: raw.name,
        description: raw.description,
        seed: raw.seed,
        model,
        dtype,
        kv_dtype,
        workload: raw.workload,
        slo: raw.slo,
        setups,
        base_dir,
    })
}

/// Splits a "field: message" error of a sub-schema into (prefix.field, message).
fn split_path(error: &str, prefix: &str) -> (String, String) {
    let error = error.strip_prefix(&format!("{prefix}.")).unwrap_or(error);
    match error.split_once(": ") {
        Some((field, message)) if !field.contains(' ') => {
            (format!("{prefix}.{field}"), message.to_string())
        }
        _ => (prefix.to_string(), error.to_string()),
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The dotted path (`setup[1].engine.max_num_seqs`) of the entry an error at `offset` is
/// about: the key or table header that starts last at or before it. (Spans of tables cover
/// only their headers, so containment cannot be used.)
fn path_at(table: &DeTable, offset: usize) -> Option<String> {
    fn consider(best: &mut Option<(usize, String)>, offset: usize, start: usize, path: String) {
        if start <= offset && best.as_ref().is_none_or(|(b, _)| start >= *b) {
            *best = Some((start, path));
        }
    }
    fn walk(table: &DeTable, prefix: &str, offset: usize, best: &mut Option<(usize, String)>) {
        for (key, value) in table.iter() {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            consider(best, offset, key.span().start, path.clone());
            match value.get_ref() {
                DeValue::Table(inner) => walk(inner, &path, offset, best),
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let item_path = format!("{path}[{i}]");
                        consider(best, offset, item.span().start, item_path.clone());
                        if let DeValue::Table(inner) = item.get_ref() {
                            walk(inner, &item_path, offset, best);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut best = None;
    walk(table, "", offset, &mut best);
    best.map(|(_, path)| path)
}

/// Byte offset of the deepest existing entry along a dotted path, for locating errors found
/// after parsing.
fn offset_of(table: &DeTable, path: &str) -> usize {
    let mut offset = 0;
    let mut current: Option<&DeValue> = None;
    let mut root = Some(table);
    for part in path.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let table = match (root.take(), current) {
            (Some(t), _) => t,
            (None, Some(DeValue::Table(t))) => t,
            _ => break,
        };
        let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref() == name) else {
            break;
        };
        offset = key.span().start;
        current = Some(value.get_ref());
        if let (Some(i), Some(DeValue::Array(items))) = (index, current) {
            match items.get(i) {
                Some(item) => {
                    offset = item.span().start;
                    current = Some(item.get_ref());
                }
                None => break,
            }
        }
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ConfigError> {
        Scenario::parse(text, "test.toml", PathBuf::from("."))
    }

    #[test]
    fn the_default_scenario_parses() {
        let s = Scenario::default_scenario();
        assert_eq!(s.setups.len(), 4);
        assert_eq!(s.model.name, "tinyllama-1.1b");
    }

    #[test]
    fn unknown_fields_name_the_field_and_line() {
        let text = DEFAULT_SCENARIO.replacen("prefix_caching", "prefix_cache", 1);
        let line = text
            .lines()
            .position(|l| l.contains("prefix_cache "))
            .unwrap()
            + 1;
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("test.toml:{line}:")), "{msg}");
        assert!(msg.contains("unknown field `prefix_cache`"), "{msg}");
        assert!(msg.contains(".engine"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn wrong_types_and_values_name_the_field() {
        let text = DEFAULT_SCENARIO.replacen(
            "gpu_memory_utilization = 0.9",
            "gpu_memory_utilization = 1.5",
            1,
        );
        if text != DEFAULT_SCENARIO {
            let msg = parse(&text).unwrap_err().to_string();
            assert!(msg.contains("engine.gpu_memory_utilization"), "{msg}");
        }
        let text =
            DEFAULT_SCENARIO.replacen("hardware = \"dgx-spark\"", "hardware = \"dgx-sprak\"", 1);
        let line = text.lines().position(|l| l.contains("dgx-sprak")).unwrap() + 1;
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("test.toml:{line}:")), "{msg}");
        assert!(
            msg.contains("setup[0].hardware: unknown hardware `dgx-sprak`"),
            "{msg}"
        );
        let text = DEFAULT_SCENARIO.replacen("seed = ", "seed = \"x\" #", 1);
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("seed"), "{msg}");
    }

    #[test]
    fn a_model_too_large_for_the_gpu_is_refused() {
        let text = DEFAULT_SCENARIO.replacen(
            "preset = \"tinyllama-1.1b\"",
            "preset = \"llama-3.1-70b\"",
            1,
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("cannot hold llama-3.1-70b"), "{msg}");
    }

    /// A scenario of `model` in f32 with a small workload and the start of one setup.
    fn head(model: &str) -> String {
        format!(
            r#"name = "t"
[model]
preset = "{model}"
dtype = "f32"
[workload]
arrival = {{ process = "poisson", rate_per_s = 1.0 }}
sessions = 3
turns = {{ dist = "constant", value = 2 }}
user_tokens = {{ dist = "uniform", min = 16, max = 64 }}
output_tokens = {{ dist = "uniform", min = 8, max = 16 }}
think_time = {{ dist = "exponential", mean_secs = 1.0 }}
[[setup]]
name = "s"
mode = "aggregated"
aggregated_workers = 1
"#
        )
    }

    /// A scenario beside the sample profile in a fresh directory; `setup` is its one setup.
    fn with_profile(tag: &str, setup: &str) -> Result<Scenario, ConfigError> {
        // One directory a call: tests running at once may share a tag.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "disagg-profile-{tag}-{}-{call}",
            std::process::id()
        ));
        std::fs::create_dir_all(dir.join("cal")).unwrap();
        let profile = crate::calibration::tests::sample();
        std::fs::write(dir.join("cal/p.toml"), profile.to_toml().unwrap()).unwrap();
        let text = format!("{}{setup}", head("smollm2-135m"));
        let result = Scenario::parse(&text, "s.toml", dir.clone());
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[test]
    fn a_setup_with_a_profile_needs_no_hardware_and_names_its_links() {
        let s = with_profile(
            "ok",
            "profile = \"cal/p.toml\"\nlink = \"tcp-test\"\n[setup.engine]\nkv_blocks = 256\n",
        )
        .unwrap();
        let setup = &s.setups[0];
        assert_eq!(setup.kv_blocks, 256);
        assert_eq!(setup.link.name, "tcp-test");
        assert!(matches!(setup.step_times, StepTimes::Measured(_)));
        let mut w = crate::cost::StepWork::default();
        w.add_decode(256);
        let profile = crate::calibration::tests::sample();
        assert_eq!(
            setup.cost_model(&s).step_ns(&w),
            profile.decode.time_ns[0][1]
        );
        // A preset link still resolves beside the profile's.
        let s = with_profile(
            "preset",
            "profile = \"cal/p.toml\"\nlink = \"tcp-10g\"\n[setup.engine]\nkv_blocks = 8\n",
        )
        .unwrap();
        assert_eq!(s.setups[0].link.name, "tcp-10g");
    }

    /// The step scales multiply the profile's prices, prefill and decode apart; a scale of
    /// zero is refused by name.
    #[test]
    fn step_scales_multiply_the_prices_of_their_steps() {
        let setup = "profile = \"cal/p.toml\"\nlink = \"tcp-test\"\n\
                     prefill_step_scale = 1.5\ndecode_step_scale = 0.5\n\
                     [setup.engine]\nkv_blocks = 256\n";
        let s = with_profile("scaled", setup).unwrap();
        let plain = with_profile(
            "unscaled",
            "profile = \"cal/p.toml\"\nlink = \"tcp-test\"\n[setup.engine]\nkv_blocks = 256\n",
        )
        .unwrap();
        let (scaled, plain) = (
            s.setups[0].cost_model(&s),
            plain.setups[0].cost_model(&plain),
        );
        let mut decode = crate::cost::StepWork::default();
        decode.add_decode(256);
        let mut mixed = decode;
        mixed.add_prefill(64, 0);
        let ratio = |w| scaled.step_ns(w) as f64 / plain.step_ns(w) as f64;
        assert!((ratio(&decode) - 0.5).abs() < 1e-6);
        assert!((ratio(&mixed) - 1.5).abs() < 1e-6);
        let e = with_profile(
            "zero",
            &setup.replace("decode_step_scale = 0.5", "decode_step_scale = 0.0"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("setup[0].decode_step_scale: must be positive"),
            "{e}"
        );
    }

    #[test]
    fn profile_setups_are_checked_field_by_field() {
        let cases = [
            (
                "nokv",
                "profile = \"cal/p.toml\"\nlink = \"tcp-test\"\n",
                "setup[0].engine.kv_blocks: required with a profile",
            ),
            (
                "both",
                "profile = \"cal/p.toml\"\nhardware = \"dgx-spark\"\nlink = \"tcp-10g\"\n",
                "setup[0].hardware: give `hardware` or `profile`, not both",
            ),
            (
                "neither",
                "link = \"tcp-10g\"\n",
                "setup[0].hardware: missing: give `hardware`",
            ),
            (
                "absent",
                "profile = \"cal/none.toml\"\nlink = \"tcp-10g\"\n[setup.engine]\nkv_blocks = 8\n",
                "setup[0].profile: ",
            ),
            (
                "link",
                "hardware = \"dgx-spark\"\nlink = \"tcp-test\"\n",
                "setup[0].link: unknown link `tcp-test`",
            ),
            (
                "zero",
                "profile = \"cal/p.toml\"\nlink = \"tcp-test\"\n[setup.engine]\nkv_blocks = 0\n",
                "setup[0].engine.kv_blocks: out of range",
            ),
        ];
        for (tag, setup, expected) in cases {
            let msg = with_profile(tag, setup).unwrap_err().to_string();
            assert!(msg.starts_with("s.toml:"), "{msg}");
            assert!(msg.contains(expected), "{tag}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let msg = with_profile(
            "absent2",
            "profile = \"cal/none.toml\"\nlink = \"tcp-10g\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("none.toml"), "{msg}");
    }

    #[test]
    fn a_profile_of_another_model_is_refused() {
        let dir = std::env::temp_dir().join(format!("disagg-profile-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let profile = crate::calibration::tests::sample();
        std::fs::write(dir.join("p.toml"), profile.to_toml().unwrap()).unwrap();
        let text = format!(
            "{}profile = \"p.toml\"\nlink = \"tcp-10g\"\n[setup.engine]\nkv_blocks = 8\n",
            head("tinyllama-1.1b")
        );
        let msg = Scenario::parse(&text, "s.toml", dir.clone())
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            msg.contains("the profile measured smollm2-135m in f32"),
            "{msg}"
        );
    }

    #[test]
    fn kv_blocks_overrides_the_memory_arithmetic() {
        let s = Scenario::default_scenario();
        assert!(s.setups[0].kv_blocks > 100_000, "a DGX Spark holds many");
        let text =
            DEFAULT_SCENARIO.replacen("[setup.engine]", "[setup.engine]\nkv_blocks = 123", 1);
        assert_ne!(text, DEFAULT_SCENARIO);
        let s = parse(&text).unwrap();
        assert_eq!(s.setups[1].kv_blocks, 123);
        assert_eq!(
            s.setups[0].kv_blocks,
            Scenario::default_scenario().setups[0].kv_blocks
        );
    }

    #[test]
    fn line_columns_are_one_based() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
