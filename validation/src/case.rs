//! A validation case: one cluster shape, model, transport, calibration profile and workload.
//! Both sides of the comparison are derived from it, the cluster file that `disagg-hw serve`
//! starts and the scenario the simulator runs, so they cannot drift apart.

use crate::reprice::Measurement;
use hw::cluster::Cluster;
use hw::device::DeviceName;
use hw::models::{DType, ModelSpec};
use serde::Deserialize;
use sim::config::{ConfigError, EngineConfig, Scenario, from_toml, invalid_at};
use sim::hardware::HardwareSpec;
use sim::metrics::Slo;
use sim::network::LinkSpec;
use sim::routing::Policy;
use sim::workload::{WorkloadConfig, WorkloadError};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// The block size of the real engine's paged KV cache; the simulator is given the same.
pub const BLOCK_SIZE_TOKENS: u32 = hw::models::runtime::DEFAULT_BLOCK_SIZE_TOKENS as u32;

/// Processes one case may start on one machine: a bound that only a mistake reaches.
const MAX_WORKERS: u32 = 64;

/// The serving paths the probes measured on a real cluster, ns: back to back (a busy
/// cluster's) and after a pause (an idle one's; runs before the idle probes have none), and
/// their way in, to the prefill's first step (runs before it was probed have none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServingPaths {
    pub busy_ns: u64,
    pub idle_ns: Option<u64>,
    pub front_ns: Option<u64>,
    pub idle_front_ns: Option<u64>,
}

/// In ms to the microsecond, as the scenario holds it.
fn ns_to_ms(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e3
}

impl ServingPaths {
    pub fn busy_ms(&self) -> f64 {
        ns_to_ms(self.busy_ns)
    }

    pub fn idle_ms(&self) -> Option<f64> {
        self.idle_ns.map(ns_to_ms)
    }

    /// The way in, within the busy path, and within the idle one too where that has no way
    /// in of its own (the probes' medians come from different probes).
    pub fn front_ms(&self) -> Option<f64> {
        let bound = match (self.idle_ns, self.idle_front_ns) {
            (Some(idle), None) => idle.min(self.busy_ns),
            _ => self.busy_ns,
        };
        self.front_ns.map(|ns| ns_to_ms(ns.min(bound)))
    }

    /// The idle path's way in, within it.
    pub fn idle_front_ms(&self) -> Option<f64> {
        Some(ns_to_ms(self.idle_front_ns?.min(self.idle_ns?)))
    }
}

/// The KV transfers of the probes on a real cluster that moves KV: the medians of the short
/// probes' and of the long ones' (see `hw::loadgen::probe`), and every long one, ns.
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProbe {
    pub short_bytes: u64,
    /// A short probe's transfer, its KV sent to the receiver's ack.
    pub short_transfer_ns: u64,
    pub long_bytes: u64,
    pub long_transfer_ns: u64,
    /// A long probe's serving path (its time to first token less its prefill and transfer),
    /// against the short probes' `serving_path_ns`: the difference is the larger import.
    pub long_serving_path_ns: u64,
    /// Every long probe's transfer, back to back and after a pause: their spread about
    /// `long_transfer_ns` becomes the link's `time_spread` (none where empty, as in files
    /// written before the probes kept them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub long_transfer_samples_ns: Vec<u64>,
    /// The decode worker's recorded imports of the short and of the long probes' KV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_import_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_import_ns: Option<u64>,
}

impl LinkProbe {
    /// The long probes' transfers over their median, sorted (to 4 digits, as the scenario
    /// holds them).
    fn spread(&self) -> Result<Vec<f64>, String> {
        if self.long_transfer_samples_ns.is_empty() {
            return Ok(Vec::new());
        }
        if self.long_transfer_ns == 0 || self.long_transfer_samples_ns.contains(&0) {
            return Err("link.long_transfer_samples_ns: a transfer of 0 ns".into());
        }
        let mut spread: Vec<f64> = self
            .long_transfer_samples_ns
            .iter()
            .map(|&ns| (ns as f64 / self.long_transfer_ns as f64 * 1e4).round() / 1e4)
            .collect();
        spread.sort_by(f64::total_cmp);
        Ok(spread)
    }

    /// `base` (the link the case names) with the figures the probes measure put in: the
    /// per-transfer overhead and the wire's rate from the two transfers (host copies and
    /// latency as in `base`), and the receiving engine's import rate from the two serving
    /// paths: all the decode side pays per byte once the KV landed, the import and what else
    /// grows with the KV (on an H100 the recorded imports alone grew a fifth less, and the
    /// workload's imports ran slower than the probes'). A part the probes cannot resolve (no
    /// longer for more bytes, as noise can make a CPU's import) keeps `base`'s figure.
    /// `short_path_ns` is the short probes' serving path.
    pub fn fit(&self, base: &LinkSpec, short_path_ns: u64) -> Result<LinkSpec, String> {
        if self.long_bytes <= self.short_bytes {
            return Err(format!(
                "the long probes moved {} bytes of KV, the short ones {}: no rate to fit",
                self.long_bytes, self.short_bytes
            ));
        }
        let extra_bytes = (self.long_bytes - self.short_bytes) as f64;
        let mut link = LinkSpec {
            name: format!("{}-probed", base.name),
            ..base.clone()
        };
        let path_ns_per_byte =
            (self.long_serving_path_ns as f64 - short_path_ns as f64) / extra_bytes;
        if path_ns_per_byte > 0.0 {
            link.import_bytes_per_s = Some(1e9 / path_ns_per_byte);
        }
        // The sender's copies per byte, as the link with this import rate counts them.
        let copy_ns_per_byte = (link.endpoint_ns(self.long_bytes) as f64
            - link.endpoint_ns(self.short_bytes) as f64)
            / extra_bytes;
        let transfer_ns_per_byte =
            (self.long_transfer_ns as f64 - self.short_transfer_ns as f64) / extra_bytes;
        let wire_ns_per_byte = transfer_ns_per_byte - copy_ns_per_byte;
        let wire_ns_per_byte = if wire_ns_per_byte > 0.0 {
            link.bandwidth_gbit_per_s = 8.0 / wire_ns_per_byte;
            link.efficiency = 1.0;
            wire_ns_per_byte
        } else {
            1e9 / link.bytes_per_s()
        };
        let per_byte_ns = self.short_bytes as f64 * (copy_ns_per_byte + wire_ns_per_byte);
        let overhead_ns = self.short_transfer_ns as f64 - link.latency_ns as f64 - per_byte_ns;
        link.per_transfer_overhead_ns = overhead_ns.max(0.0).round() as u64;
        link.time_spread = self.spread()?;
        link.validate()
            .map_err(|e| format!("the link fitted to the probes: {e}"))?;
        Ok(link)
    }
}

/// What a real cluster's probes measured that its scenario takes (see
/// [`Case::derive_scenario`]); nothing by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InSitu {
    pub serving_paths: Option<ServingPaths>,
    /// The case's link refitted to the probes' KV transfers.
    pub link: Option<LinkSpec>,
    pub prefill_step_scale: Option<f64>,
    pub decode_step_scale: Option<f64>,
    /// The probes' steps' spread about those scales (none where empty).
    pub prefill_step_spread: Vec<f64>,
    pub decode_step_spread: Vec<f64>,
    /// How much the probes' steps that shared their device slowed each other beyond its
    /// parallelism...
    pub device_contention: Option<f64>,
    /// ...and within it, by kind.
    pub device_interference: Option<sim::config::Interference>,
    /// Landed KV to the decode worker's import of it.
    pub kv_handoff_ns: Option<u64>,
}

/// The case file as written.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    seed: u64,
    /// A model preset; the real side serves its GGUF, or its random weights (`random_seed`).
    model: String,
    #[serde(default = "default_dtype")]
    dtype: DType,
    /// The GGUF the real side loads (relative to the case file); smollm2-135m has a default.
    #[serde(default)]
    gguf: Option<PathBuf>,
    /// The real side serves the preset with weights drawn from this seed instead of a GGUF
    /// (step times do not depend on the weights' values).
    #[serde(default)]
    random_seed: Option<u64>,
    transport: Transport,
    /// The calibration profile the simulator prices steps and links with (relative to the
    /// case file).
    profile: PathBuf,
    /// The simulator's link for KV transfers: one the profile fits, a `[[link_spec]]` of this
    /// file or a preset.
    link: String,
    /// Price steps with this roofline (a preset or a `[[hardware_spec]]` of this file)
    /// instead of the profile: for machines without a profile yet.
    #[serde(default)]
    hardware: Option<String>,
    cluster: ClusterShape,
    workload: WorkloadConfig,
    slo: Slo,
    /// Rooflines defined here, beside the presets (`hardware` names a key already).
    #[serde(default, rename = "hardware_spec")]
    hardware_specs: Vec<HardwareSpec>,
    /// Links defined here, beside the presets and the profile's.
    #[serde(default, rename = "link_spec")]
    link_specs: Vec<LinkSpec>,
}

fn default_dtype() -> DType {
    DType::F32
}

/// How KV crosses between workers on the real side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
        }
    }
}

/// Aggregated or disaggregated; conditional placement has no counterpart on the real side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Aggregated,
    Disaggregated,
}

/// The `[cluster]` table: roles, routing and each worker's engine limits.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterShape {
    pub mode: Mode,
    #[serde(default)]
    pub aggregated_workers: u32,
    #[serde(default)]
    pub prefill_workers: u32,
    #[serde(default)]
    pub decode_workers: u32,
    /// Picks the worker of each role for a request.
    pub router: Policy,
    /// KV blocks per worker.
    pub kv_blocks: u32,
    pub max_num_seqs: u32,
    /// Token budget of one step: one per decoding sequence, the rest for prefill chunks.
    pub max_batched_tokens: u32,
    /// Requests waiting at one worker beyond which new ones are refused.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: u32,
    /// CPU threads of each worker's model; default: every core.
    #[serde(default)]
    pub threads_per_worker: Option<u32>,
    /// Where each role's workers run (`cpu` or `cuda:N`; default cpu).
    #[serde(default)]
    pub device: RoleDevices,
}

/// The `[cluster.device]` table: a device per role, so that `prefill = "cuda:0"` and
/// `decode = "cuda:1"` put the two on two GPUs, or one name twice makes them share one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDevices {
    #[serde(default)]
    pub aggregated: DeviceName,
    #[serde(default)]
    pub prefill: DeviceName,
    #[serde(default)]
    pub decode: DeviceName,
}

impl RoleDevices {
    pub fn of(&self, role: sim::routing::Role) -> DeviceName {
        use sim::routing::Role;
        match role {
            Role::Aggregated => self.aggregated,
            Role::Prefill => self.prefill,
            Role::Decode => self.decode,
        }
    }
}

fn default_max_waiting() -> u32 {
    hw::engine::EngineConfig::default().max_waiting as u32
}

/// What prices the simulator's steps.
#[derive(Clone, Debug, PartialEq)]
pub enum Predictor {
    /// The calibration profile (absolute path).
    Profile(PathBuf),
    /// A roofline, named in the case; the profile is not read.
    Roofline(HardwareSpec),
}

/// A checked case.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub model: ModelSpec,
    pub dtype: DType,
    /// The GGUF of the real side; `None`: the fetched file of the model, or random weights.
    pub gguf: Option<PathBuf>,
    /// The seed of the real side's random weights; `None`: it serves a GGUF.
    pub random_seed: Option<u64>,
    pub transport: Transport,
    /// The profile as the case names it, resolved against the case's directory.
    pub profile: PathBuf,
    pub predictor: Predictor,
    pub link: String,
    pub cluster: ClusterShape,
    pub workload: WorkloadConfig,
    pub slo: Slo,
    link_specs: Vec<LinkSpec>,
    /// The case file, as errors name it.
    pub file: String,
    /// Cores of the machine the workers share (this one's, unless set).
    pub cores: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    /// A side derived from the case was refused by the code that runs it; the error names
    /// the derived file, which is written out to be looked at.
    #[error("{case}: the derived {what} is invalid: {source}")]
    Derived {
        case: String,
        what: &'static str,
        source: ConfigError,
    },
    /// The KV transfers the probes timed fit no link.
    #[error("{case}: the probes' KV transfers: {message}")]
    Probes { case: String, message: String },
}

impl Case {
    pub fn load(path: &Path) -> Result<Case, CaseError> {
        let (text, file) = sim::config::read_config(path)?;
        let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Case::parse(&text, &file, &base_dir)
    }

    /// Parses and checks case text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Case, CaseError> {
        let raw: CaseFile = from_toml(text, file)?;
        check(raw, file, base_dir)
            .map_err(|(path, message)| invalid_at(text, file, &path, message).into())
    }

    /// Worker roles in cluster order: prefill workers first, then decode workers, as the
    /// simulator numbers them, so worker ids mean the same on both sides.
    pub fn roles(&self) -> Vec<sim::routing::Role> {
        use sim::routing::Role;
        let c = &self.cluster;
        match c.mode {
            Mode::Aggregated => vec![Role::Aggregated; c.aggregated_workers as usize],
            Mode::Disaggregated => {
                let mut roles = vec![Role::Prefill; c.prefill_workers as usize];
                roles.extend(std::iter::repeat_n(Role::Decode, c.decode_workers as usize));
                roles
            }
        }
    }

    /// The longest prompt plus answer: what the real frontend admits (the KV pool of one
    /// worker or the model's positions, whichever is smaller).
    pub fn max_model_len(&self) -> u32 {
        (self.cluster.kv_blocks.saturating_mul(BLOCK_SIZE_TOKENS))
            .min(self.model.max_position_embeddings)
    }

    /// The cluster file for `disagg-hw serve`: every address a free loopback port.
    pub fn cluster_toml(&self) -> String {
        let mut model = Table::new();
        model.insert("id".into(), self.model.name.clone().into());
        model.insert("dtype".into(), self.dtype.name().into());
        if let Some(gguf) = &self.gguf {
            model.insert("gguf".into(), gguf.display().to_string().into());
        }
        if let Some(seed) = self.random_seed {
            model.insert("preset".into(), self.model.name.clone().into());
            model.insert("random_seed".into(), seed_value(seed));
        }
        let mut frontend = Table::new();
        frontend.insert("addr".into(), "127.0.0.1:0".into());
        frontend.insert("registry_addr".into(), "127.0.0.1:0".into());
        let c = &self.cluster;
        let workers: Vec<Value> = self
            .roles()
            .iter()
            .enumerate()
            .map(|(i, role)| {
                let mut w = Table::new();
                w.insert("name".into(), format!("{}-{i}", role.name()).into());
                w.insert("role".into(), role.name().into());
                w.insert("device".into(), c.device.of(*role).to_string().into());
                w.insert("kv_blocks".into(), i64::from(c.kv_blocks).into());
                w.insert("max_num_seqs".into(), i64::from(c.max_num_seqs).into());
                w.insert(
                    "max_batched_tokens".into(),
                    i64::from(c.max_batched_tokens).into(),
                );
                w.insert("max_waiting".into(), i64::from(c.max_waiting).into());
                w.insert(
                    "step_trace".into(),
                    format!("steps-{}-{i}.csv", role.name()).into(),
                );
                if let Some(threads) = c.threads_per_worker {
                    w.insert("threads".into(), i64::from(threads).into());
                }
                // The simulator starts a transfer when its prefill ends, so the real prefill
                // workers send whole transfers too (no layer streaming) until it models that.
                if *role == sim::routing::Role::Prefill {
                    w.insert("stream_kv_layers".into(), false.into());
                }
                Value::Table(w)
            })
            .collect();
        let mut doc = Table::new();
        doc.insert("seed".into(), seed_value(self.seed));
        doc.insert("model".into(), Value::Table(model));
        doc.insert("frontend".into(), Value::Table(frontend));
        doc.insert("router".into(), to_value(&c.router));
        doc.insert("worker".into(), Value::Array(workers));
        self.header("the real cluster") + &doc.to_string()
    }

    /// The scenario for the simulator: one setup of the same mode, worker counts, router,
    /// engine limits and KV pool, priced by the profile (or the case's roofline), with what
    /// the probes measured on the real cluster once it is known.
    pub fn scenario_toml(&self, in_situ: &InSitu) -> String {
        let c = &self.cluster;
        let engine = to_table(&EngineConfig {
            block_size_tokens: BLOCK_SIZE_TOKENS,
            max_num_seqs: c.max_num_seqs,
            max_batched_tokens: c.max_batched_tokens,
            chunked_prefill: true,
            prefix_caching: true,
            gpu_memory_utilization: 1.0,
            max_queue: c.max_waiting,
            max_model_len: Some(self.max_model_len()),
            kv_blocks: Some(c.kv_blocks),
        });
        let mut setup = Table::new();
        setup.insert("name".into(), self.name.clone().into());
        let mut hardware = Vec::new();
        match &self.predictor {
            Predictor::Profile(path) => {
                setup.insert("profile".into(), path.display().to_string().into());
            }
            Predictor::Roofline(spec) => {
                setup.insert("hardware".into(), spec.name.clone().into());
                hardware.push(to_value(&self.roofline_holding_the_pool(spec)));
            }
        }
        let link = in_situ.link.as_ref().map_or(&self.link, |l| &l.name);
        setup.insert("link".into(), link.clone().into());
        let mode = match c.mode {
            Mode::Aggregated => "aggregated",
            Mode::Disaggregated => "disaggregated",
        };
        setup.insert("mode".into(), mode.into());
        for (field, n) in [
            ("aggregated_workers", c.aggregated_workers),
            ("prefill_workers", c.prefill_workers),
            ("decode_workers", c.decode_workers),
        ] {
            if n > 0 {
                setup.insert(field.into(), i64::from(n).into());
            }
        }
        setup.insert("router".into(), to_value(&c.router));
        let (workers_per_device, device_parallelism) =
            self.sharing().expect("checked when the case was read");
        setup.insert("workers_per_device".into(), workers_per_device.into());
        setup.insert("device_parallelism".into(), device_parallelism.into());
        if let Some(paths) = in_situ.serving_paths {
            setup.insert("serving_path_ms".into(), paths.busy_ms().into());
            if let Some(ms) = paths.idle_ms() {
                setup.insert("serving_path_idle_ms".into(), ms.into());
            }
            if let Some(ms) = paths.front_ms() {
                setup.insert("serving_path_front_ms".into(), ms.into());
            }
            if let Some(ms) = paths.idle_front_ms() {
                setup.insert("serving_path_idle_front_ms".into(), ms.into());
            }
        }
        if let Some(ns) = in_situ.kv_handoff_ns {
            setup.insert("kv_handoff_ms".into(), ns_to_ms(ns).into());
        }
        for (field, scale) in [
            ("prefill_step_scale", in_situ.prefill_step_scale),
            ("decode_step_scale", in_situ.decode_step_scale),
            ("device_contention", in_situ.device_contention),
        ] {
            if let Some(scale) = scale {
                // To a part in 10^4: the probes' medians are not steadier.
                setup.insert(field.into(), ((scale * 1e4).round() / 1e4).into());
            }
        }
        for (field, spread) in [
            ("prefill_step_spread", &in_situ.prefill_step_spread),
            ("decode_step_spread", &in_situ.decode_step_spread),
        ] {
            if !spread.is_empty() {
                setup.insert(field.into(), spread.clone().into());
            }
        }
        if let Some(interference) = in_situ.device_interference.filter(|i| !i.is_none()) {
            let table: Table = interference
                .fields()
                .into_iter()
                .filter(|&(_, v)| v > 0.0)
                .map(|(field, v)| (field.to_string(), ((v * 1e4).round() / 1e4).into()))
                .collect();
            setup.insert("device_interference".into(), Value::Table(table));
        }
        setup.insert("engine".into(), Value::Table(engine));

        let mut model = Table::new();
        model.insert("preset".into(), self.model.name.clone().into());
        model.insert("dtype".into(), self.dtype.name().into());
        let mut doc = Table::new();
        doc.insert("name".into(), self.name.clone().into());
        doc.insert("description".into(), self.description.clone().into());
        doc.insert("seed".into(), seed_value(self.seed));
        doc.insert("model".into(), Value::Table(model));
        doc.insert("workload".into(), to_value(&self.workload));
        doc.insert("slo".into(), to_value(&self.slo));
        if !hardware.is_empty() {
            doc.insert("hardware".into(), Value::Array(hardware));
        }
        let links: Vec<Value> = self
            .link_specs
            .iter()
            .chain(&in_situ.link)
            .map(to_value)
            .collect();
        if !links.is_empty() {
            doc.insert("link".into(), Value::Array(links));
        }
        doc.insert("setup".into(), Value::Array(vec![Value::Table(setup)]));
        self.header("the simulated cluster") + &doc.to_string()
    }

    /// How the workers share devices, as the simulator takes it: (workers per device, how
    /// many of them step at full speed at once). Workers of one device must be consecutive
    /// (prefill workers come first) and every device must hold as many. Workers on the CPU
    /// share its cores (the cores over each worker's threads at once); workers on one GPU
    /// take turns on it.
    pub fn sharing(&self) -> Result<(i64, i64), String> {
        let devices: Vec<DeviceName> = self
            .roles()
            .iter()
            .map(|&r| self.cluster.device.of(r))
            .collect();
        let mut runs: Vec<(DeviceName, usize)> = Vec::new();
        for d in devices {
            match runs.last_mut() {
                Some((last, n)) if *last == d => *n += 1,
                _ => runs.push((d, 1)),
            }
        }
        let n = runs[0].1;
        let distinct = runs
            .iter()
            .enumerate()
            .all(|(i, (d, _))| runs[..i].iter().all(|(e, _)| e != d));
        if runs.iter().any(|&(_, m)| m != n) || !distinct {
            return Err(
                "the simulator models workers sharing a device only as equal groups of \
                 consecutive workers (prefill workers first): give each device as many"
                    .into(),
            );
        }
        let parallel = match runs[0].0 {
            DeviceName::Cpu => {
                let threads = self.cluster.threads_per_worker.unwrap_or(self.cores).max(1);
                (self.cores / threads).clamp(1, n as u32)
            }
            // Processes sharing a GPU take turns: their steps are CUDA graphs that keep the
            // GPU busy, and the driver time-slices the processes' contexts. On an H100 a
            // batch-1 decode step took 1.44 ms alone and 2.95 ms while another worker's step
            // ran (the "overlapped" column of validation/results/gpu-h100/*/report.md). Steps
            // made of kernel launches from the host overlapped instead (gpu-h100-ps1).
            _ => 1,
        };
        Ok((n as i64, i64::from(parallel)))
    }

    /// The roofline with its memory set to the weights plus `kv_blocks` blocks (and half a
    /// block against rounding), so that the simulator's KV pool is the real worker's. A
    /// roofline has no other way to be told the pool.
    fn roofline_holding_the_pool(&self, spec: &HardwareSpec) -> HardwareSpec {
        let block_bytes = self.model.kv_bytes_per_token(self.dtype) * u64::from(BLOCK_SIZE_TOKENS);
        let bytes = self.model.weight_bytes(self.dtype) as f64
            + (f64::from(self.cluster.kv_blocks) + 0.5) * block_bytes as f64;
        HardwareSpec {
            memory_gib: bytes / (1u64 << 30) as f64,
            ..spec.clone()
        }
    }

    fn header(&self, what: &str) -> String {
        format!(
            "# {what} of validation case `{}`, derived from {}: edit the case, not this file.\n\n",
            self.name, self.file
        )
    }

    /// Prices the simulator's steps with `profile` instead of what the case names: a profile
    /// calibrated on the machine that runs the case.
    pub fn price_with(&mut self, profile: &Path) -> Result<(), CaseError> {
        let path = std::fs::canonicalize(profile).map_err(|source| ConfigError::Io {
            file: profile.display().to_string(),
            source,
        })?;
        self.profile = path.clone();
        self.predictor = Predictor::Profile(path);
        Ok(())
    }

    /// Both sides, written into `dir` as `cluster.toml` and `scenario.toml` and then parsed
    /// and checked by the code that will run them (so an error names a file one can open).
    pub fn derive(&self, dir: &Path) -> Result<Derived, CaseError> {
        let cluster_text = self.cluster_toml();
        let cluster_file = dir.join("cluster.toml");
        write(dir, &cluster_file, &cluster_text)?;
        let cluster = Cluster::parse(
            cluster_text.clone(),
            cluster_file.display().to_string(),
            dir.to_path_buf(),
        )
        .map_err(|e| self.derived_error("cluster", e))?;
        let (scenario_text, scenario) = self.derive_scenario(dir, None)?;
        Ok(Derived {
            cluster,
            cluster_text,
            scenario,
            scenario_text,
        })
    }

    /// The simulator's side alone, written into `dir` as `scenario.toml` and parsed. With a
    /// real run's probes (its measurement, and the directory of its step traces): their
    /// serving paths; the scales of the probes' steps against the prices of the case's cost
    /// model; and where they timed KV transfers of two sizes, the case's link refitted to them
    /// (`LINK-probed`), whose import of the short probes' KV then leaves their serving paths,
    /// as the simulator adds it on its own.
    pub fn derive_scenario(
        &self,
        dir: &Path,
        probes: Option<(&Measurement, &Path)>,
    ) -> Result<(String, Scenario), CaseError> {
        let file = dir.join("scenario.toml");
        let parse = |text: &str| {
            write(dir, &file, text)?;
            Scenario::parse(text, &file.display().to_string(), dir.to_path_buf())
                .map_err(|e| self.derived_error("scenario", e))
        };
        let mut in_situ = InSitu::default();
        let text = self.scenario_toml(&in_situ);
        let scenario = parse(&text)?;
        let Some((m, steps_dir)) = probes else {
            return Ok((text, scenario));
        };
        let failed = |message: String| CaseError::Probes {
            case: self.file.clone(),
            message,
        };
        let setup = &scenario.setups[0];
        let cost = setup.cost_model(&scenario);
        let sharing = (setup.workers_per_device, setup.device.parallelism);
        let (probes_end, min_prefill) = (m.probes_end_ns(), u64::from(BLOCK_SIZE_TOKENS));
        let alone = crate::steps::AloneSteps::read(
            steps_dir,
            cost.as_ref(),
            0..probes_end,
            min_prefill,
            sharing.0,
        )
        .map_err(failed)?;
        let (prefill, decode) = alone.scales();
        in_situ.prefill_step_scale = prefill;
        in_situ.decode_step_scale = decode;
        (in_situ.prefill_step_spread, in_situ.decode_step_spread) = alone.spreads();
        if sharing.0 > 1 {
            let scales = (prefill.unwrap_or(1.0), decode.unwrap_or(1.0));
            let measured =
                crate::steps::probe_sharing(steps_dir, cost.as_ref(), probes_end, sharing, scales)
                    .map_err(failed)?;
            if sharing.0 > sharing.1 {
                in_situ.device_contention = measured.contention.map(|(c, _)| c);
            }
            in_situ.device_interference = Some(measured.interference());
        }
        let mut paths = m.serving_paths();
        if let Some(link) = m
            .link
            .as_ref()
            .filter(|_| self.cluster.mode == Mode::Disaggregated)
        {
            let probed = link.fit(&setup.link, m.serving_path_ns).map_err(failed)?;
            // The probes' paths hold their hand-off and import, which the simulator adds.
            let handoff_ns = m.kv_handoff_ns.unwrap_or(0);
            let own_ns = probed.import_ns(link.short_bytes) + handoff_ns;
            paths = ServingPaths {
                busy_ns: paths.busy_ns.saturating_sub(own_ns),
                idle_ns: paths.idle_ns.map(|ns| ns.saturating_sub(own_ns)),
                ..paths
            };
            in_situ.kv_handoff_ns = m.kv_handoff_ns;
            in_situ.link = Some(probed);
        }
        // A request that finds others in flight comes back as the pairs' second probes did.
        if let (Some(front), Some(loaded)) = (paths.front_ns, m.serving_path_loaded_back_ns) {
            paths.busy_ns = front + loaded;
        }
        in_situ.serving_paths = Some(paths);
        let text = self.scenario_toml(&in_situ);
        let scenario = parse(&text)?;
        Ok((text, scenario))
    }

    fn derived_error(&self, what: &'static str, source: ConfigError) -> CaseError {
        CaseError::Derived {
            case: self.file.clone(),
            what,
            source,
        }
    }
}

fn write(dir: &Path, path: &Path, text: &str) -> Result<(), CaseError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(path, text))
        .map_err(|source| CaseError::Write {
            path: path.display().to_string(),
            source,
        })
}

/// Both sides of a case.
#[derive(Clone, Debug)]
pub struct Derived {
    pub cluster: Cluster,
    pub cluster_text: String,
    pub scenario: Scenario,
    pub scenario_text: String,
}

/// TOML integers are signed; `check` refuses seeds past `i64::MAX`.
fn seed_value(seed: u64) -> Value {
    Value::Integer(i64::try_from(seed).unwrap_or(i64::MAX))
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    Value::try_from(value).expect("the schema types serialize to TOML")
}

fn to_table<T: serde::Serialize>(value: &T) -> Table {
    match to_value(value) {
        Value::Table(t) => t,
        _ => unreachable!("a struct serializes to a table"),
    }
}

/// Checks what serde cannot; an error is (field path, message).
fn check(raw: CaseFile, file: &str, base_dir: &Path) -> Result<Case, (String, String)> {
    let err = |path: &str, message: String| (path.to_string(), message);
    if raw.name.is_empty()
        || raw.name.starts_with('.')
        || !raw
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(err(
            "name",
            format!(
                "`{}` must be letters, digits, `-`, `_` or `.` (it names the output directory)",
                raw.name
            ),
        ));
    }
    if i64::try_from(raw.seed).is_err() {
        return Err(err(
            "seed",
            format!("at most {}, got {}", i64::MAX, raw.seed),
        ));
    }
    let model = ModelSpec::preset(&raw.model).ok_or_else(|| {
        err(
            "model",
            format!(
                "unknown model `{}`, expected one of {}",
                raw.model,
                ModelSpec::PRESETS.join(", ")
            ),
        )
    })?;
    if !matches!(raw.dtype, DType::F32 | DType::F16 | DType::Bf16) {
        return Err(err(
            "dtype",
            format!(
                "the real side runs f32, f16 or bf16, got {}",
                raw.dtype.name()
            ),
        ));
    }
    match (&raw.gguf, raw.random_seed) {
        (Some(_), Some(_)) => {
            return Err(err(
                "random_seed",
                "the real side serves a `gguf` or random weights, not both".into(),
            ));
        }
        (None, None) if model.name != "smollm2-135m" => {
            return Err(err(
                "model",
                format!(
                    "`{}` needs a `gguf` file for the real side (only smollm2-135m has a \
                     fetched default), or a `random_seed` to serve random weights",
                    model.name
                ),
            ));
        }
        (_, Some(seed)) if i64::try_from(seed).is_err() => {
            return Err(err(
                "random_seed",
                format!("at most {}, got {seed}", i64::MAX),
            ));
        }
        _ => {}
    }
    let c = &raw.cluster;
    match c.mode {
        Mode::Aggregated => {
            if c.aggregated_workers == 0 {
                return Err(err(
                    "cluster.aggregated_workers",
                    "mode = \"aggregated\" needs at least one".into(),
                ));
            }
            if c.prefill_workers + c.decode_workers > 0 {
                return Err(err(
                    "cluster.prefill_workers",
                    "mode = \"aggregated\" takes aggregated_workers only".into(),
                ));
            }
        }
        Mode::Disaggregated => {
            for (field, n) in [
                ("cluster.prefill_workers", c.prefill_workers),
                ("cluster.decode_workers", c.decode_workers),
            ] {
                if n == 0 {
                    return Err(err(
                        field,
                        "mode = \"disaggregated\" needs at least one".into(),
                    ));
                }
            }
            if c.aggregated_workers > 0 {
                return Err(err(
                    "cluster.aggregated_workers",
                    "mode = \"disaggregated\" takes prefill_workers and decode_workers".into(),
                ));
            }
        }
    }
    let workers = c.aggregated_workers + c.prefill_workers + c.decode_workers;
    if workers > MAX_WORKERS {
        return Err(err(
            "cluster.mode",
            format!("at most {MAX_WORKERS} workers on one machine, got {workers}"),
        ));
    }
    for (role, n, device) in [
        ("aggregated", c.aggregated_workers, c.device.aggregated),
        ("prefill", c.prefill_workers, c.device.prefill),
        ("decode", c.decode_workers, c.device.decode),
    ] {
        if n == 0 && device != DeviceName::Cpu {
            return Err(err(
                &format!("cluster.device.{role}"),
                format!("`{device}` for {role} workers, but the cluster has none"),
            ));
        }
    }
    for (field, value) in [
        ("cluster.kv_blocks", c.kv_blocks),
        ("cluster.max_num_seqs", c.max_num_seqs),
        ("cluster.max_batched_tokens", c.max_batched_tokens),
        ("cluster.max_waiting", c.max_waiting),
        (
            "cluster.threads_per_worker",
            c.threads_per_worker.unwrap_or(1),
        ),
    ] {
        if value == 0 {
            return Err(err(field, "must be positive".into()));
        }
    }
    c.router
        .validate()
        .map_err(|e| err("cluster.router", e.to_string()))?;
    raw.workload.validate().map_err(|e| match e {
        WorkloadError::Invalid { field, message } => (field, message),
        other => ("workload".into(), other.to_string()),
    })?;
    raw.slo
        .validate()
        .map_err(|(field, message)| err(field, message))?;
    for (i, spec) in raw.hardware_specs.iter().enumerate() {
        spec.validate()
            .map_err(|e| located(&format!("hardware_spec[{i}]"), &e))?;
    }
    for (i, spec) in raw.link_specs.iter().enumerate() {
        spec.validate()
            .map_err(|e| located(&format!("link_spec[{i}]"), &e))?;
    }
    let profile = normalize(&base_dir.join(&raw.profile));
    let predictor = match &raw.hardware {
        Some(name) => Predictor::Roofline(
            raw.hardware_specs
                .iter()
                .find(|h| &h.name == name)
                .cloned()
                .or_else(|| HardwareSpec::preset(name))
                .ok_or_else(|| {
                    err(
                        "hardware",
                        format!(
                            "unknown hardware `{name}`, expected one of {} or a \
                             [[hardware_spec]] of this file",
                            HardwareSpec::PRESETS.join(", ")
                        ),
                    )
                })?,
        ),
        None => Predictor::Profile(std::fs::canonicalize(&profile).map_err(|e| {
            err(
                "profile",
                format!(
                    "{}: {e} (`disagg-hw calibrate` writes profiles; or name a roofline \
                     in `hardware`)",
                    profile.display()
                ),
            )
        })?),
    };
    // A profile may define links; without one, the link must be known here.
    if matches!(predictor, Predictor::Roofline(_))
        && !raw.link_specs.iter().any(|l| l.name == raw.link)
        && LinkSpec::preset(&raw.link).is_none()
    {
        return Err(err(
            "link",
            format!(
                "unknown link `{}`, expected one of {} or a [[link_spec]] of this file",
                raw.link,
                LinkSpec::PRESETS.join(", ")
            ),
        ));
    }
    let mut workload = raw.workload;
    if let Some(trace) = &workload.trace {
        workload.trace = Some(normalize(&base_dir.join(trace)));
    }
    let case = Case {
        name: raw.name,
        description: raw.description,
        seed: raw.seed,
        model,
        dtype: raw.dtype,
        gguf: raw.gguf.map(|g| normalize(&base_dir.join(g))),
        random_seed: raw.random_seed,
        transport: raw.transport,
        profile,
        predictor,
        link: raw.link,
        cluster: raw.cluster,
        workload,
        slo: raw.slo,
        link_specs: raw.link_specs,
        file: file.to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    case.sharing().map_err(|m| err("cluster.device", m))?;
    Ok(case)
}

/// A sub-schema's "field: message" placed under `prefix`.
fn located(prefix: &str, error: &str) -> (String, String) {
    match error.split_once(": ") {
        Some((field, message)) if !field.contains(' ') => {
            (format!("{prefix}.{field}"), message.to_string())
        }
        _ => (prefix.to_string(), error.to_string()),
    }
}

/// `a/b/../c` as `a/c`, so paths read as a person would write them; a `..` with nothing to
/// undo is kept.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // The root's parent is the root.
                Some(Component::RootDir) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::routing::Role;

    #[test]
    fn the_way_in_stays_within_the_shorter_path() {
        let paths = ServingPaths {
            busy_ns: 412_400,
            idle_ns: Some(1_034_000),
            front_ns: Some(251_600),
            idle_front_ns: None,
        };
        assert_eq!(
            (paths.busy_ms(), paths.idle_ms(), paths.front_ms()),
            (0.412, Some(1.034), Some(0.252))
        );
        let past = ServingPaths {
            front_ns: Some(500_000),
            ..paths
        };
        assert_eq!(past.front_ms(), Some(0.412));
    }

    const CASE: &str = r#"name = "t"
seed = 3
model = "smollm2-135m"
transport = "tcp"
profile = "profile.toml"
link = "tcp-10g"
hardware = "dgx-spark"

[cluster]
mode = "disaggregated"
prefill_workers = 1
decode_workers = 2
router = { policy = "kv_aware", overlap_weight = 2.0 }
kv_blocks = 64
max_num_seqs = 8
max_batched_tokens = 256
max_waiting = 32

[workload]
arrival = { process = "poisson", rate_per_s = 1.0 }
sessions = 3
turns = { dist = "constant", value = 2 }
system_prompt_tokens = 16
user_tokens = { dist = "constant", value = 8 }
output_tokens = { dist = "constant", value = 4 }

[slo]
ttft_ms = 500.0
tpot_ms = 50.0
"#;

    fn parse(text: &str) -> Result<Case, CaseError> {
        Case::parse(text, "case.toml", Path::new("cases"))
    }

    fn error(text: &str) -> String {
        let e = parse(text).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    /// The 1-based line of the first line of `text` containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn a_case_parses_with_paths_beside_it() {
        let case = parse(CASE).unwrap();
        assert_eq!(case.name, "t");
        assert_eq!(case.seed, 3);
        assert_eq!(case.dtype, DType::F32);
        assert_eq!(case.profile, Path::new("cases/profile.toml"));
        assert_eq!(
            case.roles(),
            vec![Role::Prefill, Role::Decode, Role::Decode]
        );
        assert!(matches!(&case.predictor, Predictor::Roofline(h) if h.name == "dgx-spark"));
        assert_eq!(case.max_model_len(), 64 * 16);
        let up = parse(&CASE.replace("\"profile.toml\"", "\"../configs/p.toml\"")).unwrap();
        assert_eq!(up.profile, Path::new("configs/p.toml"));
    }

    /// The cases of `validation/cases/DIR` (its `*.toml` files), each parsed and derived,
    /// sorted by name.
    fn shipped(dir: &str) -> Vec<Case> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let out = tempfile::tempdir().unwrap();
        let mut cases = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let case = Case::load(&path).unwrap_or_else(|e| panic!("{e}"));
            case.derive(&out.path().join(&case.name))
                .unwrap_or_else(|e| panic!("{e}"));
            cases.push(case);
        }
        cases.sort_by(|a, b| a.name.cmp(&b.name));
        cases
    }

    const SIX: [&str; 6] = [
        "aggregated-heavy",
        "aggregated-light",
        "disagg-kv-heavy",
        "disagg-kv-light",
        "disagg-tcp-heavy",
        "disagg-tcp-light",
    ];

    #[test]
    fn the_shipped_cases_parse_and_derive() {
        let cases = shipped("cases");
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, SIX);
        for case in &cases {
            assert_eq!(case.cluster.device, RoleDevices::default(), "{}", case.name);
        }
    }

    /// The GPU cases: the same six shapes, a random-weights model, every worker sharing the
    /// one GPU of the machine they were written for.
    #[test]
    fn the_shipped_gpu_cases_parse_and_derive() {
        let cases = shipped("cases/gpu");
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, SIX);
        for case in &cases {
            assert!(case.random_seed.is_some(), "{}", case.name);
            // Every worker shares the one GPU, one step at a time.
            let workers = case.roles().len() as i64;
            assert_eq!(case.sharing(), Ok((workers, 1)), "{}", case.name);
            for role in case.roles() {
                assert_eq!(
                    case.cluster.device.of(role),
                    DeviceName::Cuda(0),
                    "{}",
                    case.name
                );
            }
            assert!(
                matches!(&case.predictor, Predictor::Profile(p) if p.ends_with("tinyllama-1.1b-bf16-h100.toml")),
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn a_random_weights_case_puts_each_role_on_its_device() {
        let text = CASE
            .replace(
                "model = \"smollm2-135m\"",
                "model = \"tinyllama-1.1b\"\nrandom_seed = 9",
            )
            .replace(
                "max_waiting = 32",
                "max_waiting = 32\ndevice = { prefill = \"cuda:0\", decode = \"cuda:1\" }",
            );
        // One prefill worker on one GPU and two decode workers on the other: groups the
        // simulator cannot share alike.
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("cluster.device: the simulator models"), "{e}");
        let text = text.replace("prefill_workers = 1", "prefill_workers = 2");
        let case = parse(&text).unwrap();
        assert_eq!(case.sharing(), Ok((2, 1)));
        let dir = tempfile::tempdir().unwrap();
        let d = case.derive(dir.path()).unwrap();
        let model = &d.cluster.config.model;
        assert_eq!(model.preset.as_deref(), Some("tinyllama-1.1b"));
        assert_eq!((model.random_seed, model.gguf.as_ref()), (Some(9), None));
        assert_eq!(model.id, "tinyllama-1.1b");
        let devices: Vec<(Role, DeviceName)> = d
            .cluster
            .config
            .workers
            .iter()
            .map(|w| (w.role, w.device))
            .collect();
        assert_eq!(
            devices,
            [
                (Role::Prefill, DeviceName::Cuda(0)),
                (Role::Prefill, DeviceName::Cuda(0)),
                (Role::Decode, DeviceName::Cuda(1)),
                (Role::Decode, DeviceName::Cuda(1)),
            ]
        );
        assert!(matches!(
            d.cluster.model_source().unwrap(),
            hw::cluster::config::ModelSource::Random { seed: 9, .. }
        ));
    }

    #[test]
    fn schema_errors_name_the_file_line_and_field() {
        let text = CASE.replace("max_waiting = 32", "max_wait = 32");
        let e = error(&text);
        let line = line_of(&text, "max_wait");
        assert!(e.starts_with(&format!("case.toml:{line}:")), "{e}");
        assert!(
            e.contains("cluster") && e.contains("unknown field `max_wait`"),
            "{e}"
        );

        let text = CASE.replace("mode = \"disaggregated\"", "mode = \"conditional\"");
        let e = error(&text);
        assert!(
            e.starts_with(&format!("case.toml:{}:", line_of(&text, "conditional"))),
            "{e}"
        );
        assert!(
            e.contains("cluster.mode") && e.contains("unknown variant"),
            "{e}"
        );

        let e = error(&CASE.replace("transport = \"tcp\"", "transport = \"rdma\""));
        assert!(e.contains("transport") && e.contains("`tcp`"), "{e}");
    }

    #[test]
    fn value_errors_name_the_file_line_and_field() {
        let cases = [
            (
                "kv_blocks = 64",
                "kv_blocks = 0",
                "cluster.kv_blocks: must be positive",
            ),
            (
                "decode_workers = 2",
                "decode_workers = 0",
                "cluster.decode_workers: mode",
            ),
            (
                "prefill_workers = 1",
                "prefill_workers = 1\naggregated_workers = 1",
                "cluster.aggregated_workers:",
            ),
            (
                "model = \"smollm2-135m\"",
                "model = \"gpt-9\"",
                "model: unknown model `gpt-9`",
            ),
            (
                "model = \"smollm2-135m\"",
                "model = \"tinyllama-1.1b\"",
                "model: `tinyllama-1.1b` needs a `gguf`",
            ),
            (
                "model = \"smollm2-135m\"",
                "model = \"smollm2-135m\"\ngguf = \"m.gguf\"\nrandom_seed = 1",
                "random_seed: the real side serves a `gguf` or random weights",
            ),
            (
                "max_waiting = 32",
                "max_waiting = 32\ndevice = { aggregated = \"cuda:0\" }",
                "cluster.device.aggregated: `cuda:0` for aggregated workers, but the cluster has none",
            ),
            (
                "max_waiting = 32",
                "max_waiting = 32\ndevice = { decode = \"tpu:0\" }",
                "expected cpu or cuda:N, got `tpu:0`",
            ),
            (
                "hardware = \"dgx-spark\"",
                "hardware = \"abacus\"",
                "hardware: unknown hardware `abacus`",
            ),
            ("name = \"t\"", "name = \"../t\"", "name: `../t` must be"),
            (
                "ttft_ms = 500.0",
                "ttft_ms = -1.0",
                "slo.ttft_ms: must be a positive number",
            ),
            (
                "sessions = 3",
                "sessions = 0",
                "workload.sessions: must be at least 1",
            ),
            (
                "overlap_weight = 2.0",
                "overlap_weight = -2.0",
                "cluster.router: overlap_weight",
            ),
            (
                "decode_workers = 2",
                "decode_workers = 100",
                "cluster.mode: at most 64 workers",
            ),
        ];
        for (from, to, expected) in cases {
            let text = CASE.replacen(from, to, 1);
            assert_ne!(text, CASE, "{from}");
            let e = error(&text);
            let needle = to.lines().last().unwrap();
            let line = line_of(&text, needle.split(" = ").next().unwrap());
            assert!(e.starts_with("case.toml:"), "{e}");
            assert!(e.contains(expected), "{to}: {e}");
            if !expected.starts_with("cluster.mode") {
                assert!(
                    e.starts_with(&format!("case.toml:{line}:")),
                    "{to}: line {line}: {e}"
                );
            }
        }
    }

    #[test]
    fn a_profile_that_is_not_there_is_named_when_no_roofline_replaces_it() {
        let text = CASE.replace("hardware = \"dgx-spark\"\n", "");
        let e = error(&text);
        assert!(
            e.starts_with(&format!("case.toml:{}:", line_of(&text, "profile ="))),
            "{e}"
        );
        assert!(e.contains("profile: cases/profile.toml:"), "{e}");
    }

    #[test]
    fn a_profile_case_hands_the_simulator_the_profile_and_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("profile.toml"), "").unwrap();
        let text = CASE.replace("hardware = \"dgx-spark\"\n", "");
        let case = Case::parse(&text, "case.toml", dir.path()).unwrap();
        let profile = std::fs::canonicalize(dir.path().join("profile.toml")).unwrap();
        assert_eq!(case.predictor, Predictor::Profile(profile.clone()));
        let doc: Table = case.scenario_toml(&InSitu::default()).parse().unwrap();
        let setup = &doc["setup"].as_array().unwrap()[0];
        assert_eq!(setup["profile"].as_str(), Some(profile.to_str().unwrap()));
        assert!(setup.get("hardware").is_none());
        assert!(doc.get("hardware").is_none());
        assert_eq!(setup["engine"]["kv_blocks"].as_integer(), Some(64));
        assert_eq!(setup["link"].as_str(), Some("tcp-10g"));
    }

    /// The probes' interference reaches the simulator to a part in 10^4, what they measured
    /// none of left out.
    #[test]
    fn measured_interference_reaches_the_scenario() {
        let case = parse(CASE).unwrap();
        let measured = sim::config::Interference {
            decode_by_decode: 0.31234,
            prefill_by_decode: 0.05,
            ..Default::default()
        };
        let in_situ = InSitu {
            device_interference: Some(measured),
            ..InSitu::default()
        };
        let text = case.scenario_toml(&in_situ);
        let doc: Table = text.parse().unwrap();
        let table = doc["setup"].as_array().unwrap()[0]["device_interference"]
            .as_table()
            .unwrap();
        assert_eq!(table.len(), 2, "{table:?}");
        let scenario = Scenario::parse(&text, "scenario.toml", PathBuf::from(".")).unwrap();
        assert_eq!(
            scenario.setups[0].device.interference_ppm,
            [[312_300, 0], [50_000, 0]]
        );
        let none = InSitu {
            device_interference: Some(sim::config::Interference::default()),
            ..InSitu::default()
        };
        let doc: Table = case.scenario_toml(&none).parse().unwrap();
        assert!(
            doc["setup"].as_array().unwrap()[0]
                .get("device_interference")
                .is_none()
        );
    }

    /// Probes timed on a link of known figures give those figures back; what they cannot
    /// resolve keeps the named link's, and probes of one size are refused.
    #[test]
    fn a_link_fitted_to_two_probe_sizes_recovers_its_figures() {
        let base = LinkSpec {
            name: "tcp-loopback".into(),
            kind: sim::network::LinkKind::Tcp,
            bandwidth_gbit_per_s: 19.0,
            efficiency: 1.0,
            latency_ns: 10_000,
            per_transfer_overhead_ns: 230_000,
            host_copy_bytes_per_s: Some(50e9),
            serialize_bytes_per_s: None,
            import_bytes_per_s: Some(4.4e9),
            time_spread: Vec::new(),
        };
        let truth = LinkSpec {
            bandwidth_gbit_per_s: 8.0 * 2.6,
            per_transfer_overhead_ns: 700_000,
            import_bytes_per_s: Some(2.8e9),
            ..base.clone()
        };
        let (short, long) = (180_224, 5_767_168);
        let transfer = |b: u64| truth.endpoint_ns(b) + truth.latency_ns + b * 10 / 26;
        let path_ns = 1_000_000;
        let probe = LinkProbe {
            short_bytes: short,
            short_transfer_ns: transfer(short),
            long_bytes: long,
            long_transfer_ns: transfer(long),
            long_serving_path_ns: path_ns + truth.import_ns(long) - truth.import_ns(short),
            long_transfer_samples_ns: vec![transfer(long) * 3, transfer(long), transfer(long) / 2],
            short_import_ns: None,
            long_import_ns: None,
        };
        let fit = probe.fit(&base, path_ns).unwrap();
        assert_eq!(fit.time_spread, [0.5, 1.0, 3.0]);
        assert_eq!(fit.name, "tcp-loopback-probed");
        let near = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b;
        assert!(near(fit.bytes_per_s(), 2.6e9), "{fit:?}");
        assert!(near(fit.import_bytes_per_s.unwrap(), 2.8e9), "{fit:?}");
        assert!(
            fit.per_transfer_overhead_ns.abs_diff(700_000) <= 2,
            "{fit:?}"
        );
        assert_eq!(
            (fit.latency_ns, fit.host_copy_bytes_per_s),
            (base.latency_ns, base.host_copy_bytes_per_s)
        );

        // The long probes' serving path no longer than the short ones': the import stays.
        let flat = LinkProbe {
            long_serving_path_ns: path_ns - 1,
            long_transfer_samples_ns: Vec::new(),
            ..probe.clone()
        };
        let flat = flat.fit(&base, path_ns).unwrap();
        assert_eq!(flat.import_bytes_per_s, base.import_bytes_per_s);
        assert!(flat.time_spread.is_empty());
        let stalled = LinkProbe {
            long_transfer_samples_ns: vec![transfer(long), 0],
            ..probe.clone()
        };
        let e = stalled.fit(&base, path_ns).unwrap_err();
        assert!(e.contains("link.long_transfer_samples_ns"), "{e}");
        let same = LinkProbe {
            long_bytes: short,
            ..probe
        };
        let e = same.fit(&base, path_ns).unwrap_err();
        assert!(e.contains("no rate to fit"), "{e}");
    }

    #[test]
    fn workers_share_the_cpu_as_their_threads_allow() {
        let sharing = |threads: Option<&str>, cores: u32| {
            let text = match threads {
                Some(t) => CASE.replace(
                    "max_batched_tokens = ",
                    &format!("threads_per_worker = {t}\nmax_batched_tokens = "),
                ),
                None => CASE.to_string(),
            };
            let mut case = parse(&text).unwrap();
            case.cores = cores;
            let doc: Table = case.scenario_toml(&InSitu::default()).parse().unwrap();
            let setup = &doc["setup"].as_array().unwrap()[0];
            let cluster: Table = case.cluster_toml().parse().unwrap();
            let threads = cluster["worker"].as_array().unwrap()[0]
                .get("threads")
                .cloned();
            (
                setup["workers_per_device"].as_integer().unwrap(),
                setup["device_parallelism"].as_integer().unwrap(),
                threads.and_then(|t| t.as_integer()),
            )
        };
        let workers = parse(CASE).unwrap().roles().len() as i64;
        assert_eq!(workers, 3);
        // Every worker computes on every core: one at a time at full speed.
        assert_eq!(sharing(None, 8), (3, 1, None));
        assert_eq!(sharing(Some("1"), 2), (3, 2, Some(1)));
        assert_eq!(sharing(Some("1"), 16), (3, 3, Some(1)));
        assert_eq!(sharing(Some("4"), 8), (3, 2, Some(4)));
        assert!(
            error(&CASE.replace(
                "max_batched_tokens = ",
                "threads_per_worker = 0\nmax_batched_tokens = "
            ))
            .contains("cluster.threads_per_worker: must be positive")
        );
    }

    #[test]
    fn both_sides_agree_on_the_cluster() {
        let case = parse(CASE).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = case.derive(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cluster.toml")).unwrap(),
            d.cluster_text
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("scenario.toml")).unwrap(),
            d.scenario_text
        );
        let cluster = &d.cluster.config;
        let [setup] = d.scenario.setups.as_slice() else {
            panic!("one setup")
        };
        let roles: Vec<Role> = cluster.workers.iter().map(|w| w.role).collect();
        assert_eq!(roles, setup.workers);
        assert_eq!(setup.mode, sim::config::Mode::Disaggregated);
        assert_eq!(cluster.router, setup.router);
        assert_eq!(setup.prefill_router, setup.router);
        assert_eq!(cluster.seed, d.scenario.seed);
        assert_eq!(cluster.model.id, d.scenario.model.name);
        assert_eq!(cluster.model.dtype, d.scenario.dtype.name());
        for w in &cluster.workers {
            let engine = w.engine(0);
            assert_eq!(engine.kv_blocks, 64);
            assert_eq!(engine.max_num_seqs, setup.engine.max_num_seqs as usize);
            assert_eq!(
                engine.max_batched_tokens,
                setup.engine.max_batched_tokens as usize
            );
            assert_eq!(engine.max_waiting, setup.engine.max_queue as usize);
            assert_eq!(engine.block_size_tokens, setup.engine.block_size_tokens);
            assert!(engine.prefix_caching && setup.engine.prefix_caching);
            assert_eq!(w.addr.port(), 0, "a free port");
        }
        assert_eq!(setup.engine.max_model_len, Some(64 * 16));
        assert_eq!(setup.link.name, "tcp-10g");
        assert_eq!(d.scenario.workload, case.workload);
        assert_eq!(d.scenario.slo, case.slo);
        // The simulator's KV pool per worker is the real one.
        let out = sim::engine::run(&d.scenario, setup, Default::default()).unwrap();
        assert_eq!(out.workers.len(), 3);
        for w in &out.workers {
            assert_eq!(w.capacity_blocks, 64, "{w:?}");
        }
        assert_eq!(out.summary.completed, 6);
    }

    #[test]
    fn an_aggregated_case_derives_aggregated_workers() {
        let text = CASE
            .replace("mode = \"disaggregated\"", "mode = \"aggregated\"")
            .replace(
                "prefill_workers = 1\ndecode_workers = 2",
                "aggregated_workers = 2",
            );
        let case = parse(&text).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = case.derive(dir.path()).unwrap();
        let roles: Vec<Role> = d.cluster.config.workers.iter().map(|w| w.role).collect();
        assert_eq!(roles, vec![Role::Aggregated; 2]);
        assert_eq!(d.scenario.setups[0].workers, roles);
        assert_eq!(d.scenario.setups[0].mode, sim::config::Mode::Aggregated);
    }

    #[test]
    fn a_side_the_runner_refuses_names_the_derived_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("profile.toml"), "not = [a profile").unwrap();
        let text = CASE.replace("hardware = \"dgx-spark\"\n", "");
        let case = Case::parse(&text, "case.toml", dir.path()).unwrap();
        let out = dir.path().join("out");
        let e = case.derive(&out).unwrap_err().to_string();
        let scenario = out.join("scenario.toml");
        // Today the simulator refuses the profile's fields; once it reads profiles, it
        // refuses this one's content. Either way the error is located in the written file.
        assert!(
            e.starts_with(&format!(
                "case.toml: the derived scenario is invalid: {}:",
                scenario.display()
            )),
            "{e}"
        );
        assert!(scenario.is_file());
        assert!(e.contains(": setup[0]."), "{e}");
    }

    #[test]
    fn a_roofline_case_needs_a_link_it_can_find() {
        let text = CASE.replace("link = \"tcp-10g\"", "link = \"smoke-signals\"");
        let e = error(&text);
        assert!(
            e.starts_with(&format!("case.toml:{}:", line_of(&text, "smoke"))),
            "{e}"
        );
        assert!(e.contains("link: unknown link `smoke-signals`"), "{e}");
        let own = format!(
            "{text}\n[[link_spec]]\nname = \"smoke-signals\"\nkind = \"tcp\"\n\
             bandwidth_gbit_per_s = 1.0\nefficiency = 0.5\nlatency_ns = 1000\n\
             per_transfer_overhead_ns = 0\n"
        );
        let case = parse(&own).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = case.derive(dir.path()).unwrap();
        assert_eq!(d.scenario.setups[0].link.bandwidth_gbit_per_s, 1.0);
    }
}
