//! A cluster file: the model, the frontend, the routing policy and the workers, one process
//! each. `disagg-hw serve --config FILE` starts them all on one machine; each role's
//! subcommand starts one of them, so the same file describes a cluster spread over machines.

use crate::device::DeviceName;
use crate::engine::EngineConfig;
use models::ModelSpec;
use serde::Deserialize;
use sim::config::{ConfigError, from_toml, invalid_at, read_config};
use sim::routing::{Policy, Role};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The compiled-in default: one prefill and one decode worker behind a frontend on loopback.
pub const DEFAULT_CLUSTER: &str = include_str!("../../../configs/cluster/disagg-1p1d.toml");
pub const DEFAULT_CLUSTER_NAME: &str = "configs/cluster/disagg-1p1d.toml";

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub model: ModelConfig,
    pub frontend: FrontendConfig,
    /// How the frontend picks a worker of each role.
    #[serde(default = "default_policy")]
    pub router: Policy,
    /// Seeds the router's sampling stream (KV-aware with a temperature).
    #[serde(default)]
    pub seed: u64,
    #[serde(rename = "worker")]
    pub workers: Vec<WorkerConfig>,
}

fn default_policy() -> Policy {
    Policy::KvAware {
        overlap_weight: 1.0,
        temperature: 0.0,
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients put in `model`; default: `preset`.
    #[serde(default)]
    pub id: String,
    /// The GGUF file (relative to the cluster file); default: the fetched file of `id`.
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// Serve this preset with seeded random weights instead of a GGUF: for measuring speed
    /// (a step costs the same whatever the weights). Its tokenizer writes token ids as text
    /// (`<12> <7>`): what it generates is meaningless.
    #[serde(default)]
    pub preset: Option<String>,
    /// The seed of `preset`'s weights (default 0); every worker draws the same weights.
    #[serde(default)]
    pub random_seed: Option<u64>,
    /// f32, f16 or bf16.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

/// Where a cluster's weights come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    /// Seeded random weights of a preset.
    Random {
        spec: ModelSpec,
        seed: u64,
    },
}

fn default_dtype() -> String {
    "f32".into()
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendConfig {
    /// The OpenAI-compatible API; loopback unless said otherwise.
    #[serde(default = "default_frontend_addr")]
    pub addr: SocketAddr,
    /// Where workers register (the embedded registry); port 0 picks a free one, which
    /// `serve` hands to the workers it starts.
    #[serde(default = "default_registry_addr")]
    pub registry_addr: SocketAddr,
    /// Attempts per request when a worker fails before its first token or refuses it.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_frontend_addr() -> SocketAddr {
    crate::frontend::DEFAULT_ADDR
}

fn default_registry_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8100))
}

fn default_attempts() -> u32 {
    3
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Unique in the cluster; names the worker in metrics and logs.
    pub name: String,
    pub role: Role,
    /// Where the worker runs its model: `cpu` or `cuda:N` (a build with feature `cuda`).
    #[serde(default)]
    pub device: DeviceName,
    /// The control API (generate, prefill, KV events); port 0 picks a free one.
    #[serde(default = "any_loopback_port")]
    pub addr: SocketAddr,
    /// Where a decode worker receives KV.
    #[serde(default = "any_loopback_port")]
    pub kv_addr: SocketAddr,
    #[serde(default = "default_kv_blocks")]
    pub kv_blocks: u32,
    #[serde(default = "default_max_batched_tokens")]
    pub max_batched_tokens: usize,
    #[serde(default = "default_max_num_seqs")]
    pub max_num_seqs: usize,
    /// Requests waiting for admission beyond which the worker answers 429.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    #[serde(default = "yes")]
    pub prefix_caching: bool,
    /// A decode worker prefills itself when at most this many prompt tokens are uncached.
    #[serde(default)]
    pub local_prefill_tokens: usize,
    /// A decode worker's wait for a prefill worker's KV before it prefills itself.
    #[serde(default = "default_prefill_timeout_ms")]
    pub prefill_timeout_ms: u64,
    /// A prefill worker sends each layer's KV while the next layers are computed, instead of
    /// the whole KV once the prefill is done.
    #[serde(default = "yes")]
    pub stream_kv_layers: bool,
    /// CPU threads the worker's model computes with (`RAYON_NUM_THREADS` of its process, set
    /// by `serve`); default: every core. One per worker keeps workers sharing a CPU from
    /// stalling each other's parallel steps.
    #[serde(default)]
    pub threads: Option<u32>,
    /// A CSV of every engine step's work and times (relative to the cluster file).
    #[serde(default)]
    pub step_trace: Option<PathBuf>,
}

fn any_loopback_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn default_kv_blocks() -> u32 {
    EngineConfig::default().kv_blocks
}

fn default_max_batched_tokens() -> usize {
    EngineConfig::default().max_batched_tokens
}

fn default_max_num_seqs() -> usize {
    EngineConfig::default().max_num_seqs
}

fn default_max_waiting() -> usize {
    EngineConfig::default().max_waiting
}

fn yes() -> bool {
    true
}

fn default_prefill_timeout_ms() -> u64 {
    60_000
}

impl WorkerConfig {
    /// The engine of this worker, the `worker_id`-th of its cluster file.
    pub fn engine(&self, worker_id: u32) -> EngineConfig {
        EngineConfig {
            worker_id,
            kv_blocks: self.kv_blocks,
            max_batched_tokens: self.max_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            max_waiting: self.max_waiting,
            prefix_caching: self.prefix_caching,
            local_prefill_tokens: self.local_prefill_tokens,
            ..EngineConfig::default()
        }
    }
}

/// A cluster file with its location, so relative paths resolve beside it.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub config: ClusterConfig,
    /// The file as read (`serve` hands it to the workers it starts).
    pub text: String,
    pub file: String,
    pub base_dir: PathBuf,
}

impl Cluster {
    pub fn load(path: &Path) -> Result<Cluster, ConfigError> {
        let (text, file) = read_config(path)?;
        let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Cluster::parse(text, file, base_dir)
    }

    pub fn default_cluster() -> Cluster {
        Cluster::parse(
            DEFAULT_CLUSTER.to_owned(),
            DEFAULT_CLUSTER_NAME.to_owned(),
            PathBuf::from("."),
        )
        .expect("the compiled-in cluster is valid")
    }

    pub fn parse(text: String, file: String, base_dir: PathBuf) -> Result<Cluster, ConfigError> {
        let mut config: ClusterConfig = from_toml(&text, &file)?;
        check(&config).map_err(|(path, message)| invalid_at(&text, &file, &path, message))?;
        if config.model.id.is_empty()
            && let Some(preset) = &config.model.preset
        {
            config.model.id = preset.clone();
        }
        Ok(Cluster {
            config,
            text,
            file,
            base_dir,
        })
    }

    /// The worker named `name` and its cluster index.
    pub fn worker(&self, name: &str) -> Option<(u32, &WorkerConfig)> {
        self.config
            .workers
            .iter()
            .enumerate()
            .find(|(_, w)| w.name == name)
            .map(|(i, w)| (i as u32, w))
    }

    /// Where the weights come from: the preset's random weights, the GGUF named, or the
    /// fetched GGUF of smollm2-135m.
    pub fn model_source(&self) -> Result<ModelSource, String> {
        let model = &self.config.model;
        if let Some(name) = &model.preset {
            let spec = ModelSpec::preset(name).expect("checked when parsed");
            let seed = model.random_seed.unwrap_or(0);
            return Ok(ModelSource::Random { spec, seed });
        }
        match &model.gguf {
            Some(path) => Ok(ModelSource::Gguf(self.base_dir.join(path))),
            None if model.id == "smollm2-135m" => models::runtime::test_gguf_path()
                .map(ModelSource::Gguf)
                .map_err(|e| e.to_string()),
            None => Err(format!(
                "{}: model.gguf: required for model `{}` (only smollm2-135m has a default \
                 file; or name a `preset` to serve random weights)",
                self.file, model.id
            )),
        }
    }

    /// Fails, naming the worker's `device` field, when this build cannot run a worker that
    /// this machine is to start: a CPU-only tool reads GPU clusters' files, but only a build
    /// with feature `cuda` runs their workers.
    pub fn check_device(&self, worker_index: usize) -> Result<(), ConfigError> {
        let w = &self.config.workers[worker_index];
        w.device.check_supported().map_err(|message| {
            invalid_at(
                &self.text,
                &self.file,
                &format!("worker[{worker_index}].device"),
                message,
            )
        })
    }

    /// The device of the worker at `worker_index`, opened; an error names its field.
    pub fn open_device(&self, worker_index: usize) -> Result<models::runtime::Device, ConfigError> {
        self.check_device(worker_index)?;
        self.config.workers[worker_index]
            .device
            .open()
            .map_err(|message| {
                invalid_at(
                    &self.text,
                    &self.file,
                    &format!("worker[{worker_index}].device"),
                    message,
                )
            })
    }
}

/// Checks what serde cannot; an error is (field path, message).
fn check(c: &ClusterConfig) -> Result<(), (String, String)> {
    if !matches!(c.model.dtype.as_str(), "f32" | "f16" | "bf16") {
        return Err((
            "model.dtype".into(),
            format!("expected f32, f16 or bf16, got `{}`", c.model.dtype),
        ));
    }
    let m = &c.model;
    if let Some(name) = &m.preset {
        if ModelSpec::preset(name).is_none() {
            return Err((
                "model.preset".into(),
                format!(
                    "unknown model `{name}`, expected one of {}",
                    ModelSpec::PRESETS.join(", ")
                ),
            ));
        }
        if m.gguf.is_some() {
            return Err((
                "model.gguf".into(),
                "a `preset` serves random weights; give a `gguf` or a `preset`, not both".into(),
            ));
        }
    } else {
        if m.random_seed.is_some() {
            return Err((
                "model.random_seed".into(),
                "seeds the random weights of a `preset`, and none is named".into(),
            ));
        }
        if m.id.is_empty() {
            return Err((
                "model.id".into(),
                "required (the name clients ask for) unless a `preset` names the model".into(),
            ));
        }
    }
    if c.frontend.max_attempts == 0 {
        return Err(("frontend.max_attempts".into(), "must be at least 1".into()));
    }
    c.router
        .validate()
        .map_err(|e| ("router".to_string(), e.to_string()))?;
    if c.workers.is_empty() {
        return Err((
            "worker".into(),
            "a cluster needs at least one worker".into(),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, w) in c.workers.iter().enumerate() {
        let at = |field: &str| format!("worker[{i}].{field}");
        if w.name.is_empty() || !names.insert(w.name.as_str()) {
            return Err((at("name"), format!("`{}` is empty or not unique", w.name)));
        }
        for (field, addr) in [("addr", w.addr), ("kv_addr", w.kv_addr)] {
            if addr.ip().is_unspecified() {
                return Err((
                    at(field),
                    format!(
                        "{addr}: workers advertise this address, so it must be one others can reach"
                    ),
                ));
            }
        }
        for (field, value) in [
            ("kv_blocks", w.kv_blocks as usize),
            ("max_batched_tokens", w.max_batched_tokens),
            ("max_num_seqs", w.max_num_seqs),
            ("threads", w.threads.unwrap_or(1) as usize),
        ] {
            if value == 0 {
                return Err((at(field), "must be positive".into()));
            }
        }
    }
    let has = |role| c.workers.iter().any(|w| w.role == role);
    if has(Role::Prefill) && !has(Role::Decode) {
        return Err((
            "worker".into(),
            "prefill workers need a decode worker to hand their KV to".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Cluster, ConfigError> {
        Cluster::parse(text.into(), "c.toml".into(), PathBuf::from("."))
    }

    #[test]
    fn the_shipped_cluster_files_parse() {
        let c = Cluster::default_cluster();
        assert_eq!(c.config.workers.len(), 2);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cluster");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            Cluster::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let text = "[model]\nid = \"m\"\n[frontend]\n\n[[worker]]\nname = \"a\"\nrole = \"decode\"\nkv_blocks = 0\n";
        let e = parse(text).unwrap_err().to_string();
        assert_eq!(e, "c.toml:8:1: worker[0].kv_blocks: must be positive");
        let e =
            parse("[model]\nid = \"m\"\n[frontend]\n[[worker]]\nname = \"a\"\nrole = \"cook\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.starts_with("c.toml:6:8: worker[0].role: unknown variant `cook`"),
            "{e}"
        );
        let e = parse(
            "[model]\nid = \"m\"\n[frontend]\n[[worker]]\nname = \"p\"\nrole = \"prefill\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("need a decode worker"), "{e}");
        let dup = "[model]\nid = \"m\"\n[frontend]\n[[worker]]\nname = \"a\"\nrole = \"decode\"\n[[worker]]\nname = \"a\"\nrole = \"decode\"\n";
        assert!(
            parse(dup)
                .unwrap_err()
                .to_string()
                .contains("worker[1].name")
        );
    }

    const WORKER: &str = "[frontend]\n[[worker]]\nname = \"a\"\nrole = \"aggregated\"\n";

    #[test]
    fn a_preset_serves_seeded_random_weights_under_its_name() {
        let c = parse(&format!(
            "[model]\npreset = \"tinyllama-1.1b\"\nrandom_seed = 7\ndtype = \"bf16\"\n{WORKER}"
        ))
        .unwrap();
        assert_eq!(c.config.model.id, "tinyllama-1.1b");
        match c.model_source().unwrap() {
            ModelSource::Random { spec, seed } => {
                assert_eq!((spec.name.as_str(), seed), ("tinyllama-1.1b", 7));
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&format!(
            "[model]\nid = \"mine\"\npreset = \"smollm2-135m\"\n{WORKER}"
        ))
        .unwrap();
        assert_eq!(c.config.model.id, "mine");
        assert!(matches!(
            c.model_source().unwrap(),
            ModelSource::Random { seed: 0, .. }
        ));
    }

    #[test]
    fn model_errors_name_the_field() {
        for (model, expected) in [
            (
                "preset = \"gpt-9\"",
                "c.toml:2:1: model.preset: unknown model `gpt-9`",
            ),
            (
                "preset = \"smollm2-135m\"\ngguf = \"m.gguf\"",
                "c.toml:3:1: model.gguf: a `preset` serves random weights",
            ),
            (
                "id = \"m\"\nrandom_seed = 3",
                "c.toml:3:1: model.random_seed: seeds the random weights of a `preset`",
            ),
            ("dtype = \"f32\"", "c.toml:1:2: model.id: required"),
        ] {
            let e = parse(&format!("[model]\n{model}\n{WORKER}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expected), "{model}: {e}");
        }
    }

    #[test]
    fn a_device_is_cpu_or_cuda_n() {
        let with = |device: &str| {
            parse(&format!(
                "[model]\nid = \"m\"\n{WORKER}device = \"{device}\"\n"
            ))
        };
        let c = with("cuda:1").unwrap();
        assert_eq!(c.config.workers[0].device, DeviceName::Cuda(1));
        let c = parse(&format!("[model]\nid = \"m\"\n{WORKER}")).unwrap();
        assert_eq!(c.config.workers[0].device, DeviceName::Cpu);
        let e = with("gpu0").unwrap_err().to_string();
        assert!(
            e.starts_with("c.toml:7:10: worker[0].device: expected cpu or cuda:N, got `gpu0`"),
            "{e}"
        );
    }

    /// A CPU build reads a GPU cluster's file (to derive or inspect it) but refuses to run its
    /// workers, naming the field.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_worker_is_refused_by_a_cpu_build() {
        let c = parse(&format!(
            "[model]\nid = \"m\"\n{WORKER}device = \"cuda:0\"\n"
        ))
        .unwrap();
        for e in [
            c.check_device(0).unwrap_err().to_string(),
            c.open_device(0).unwrap_err().to_string(),
        ] {
            assert!(
                e.starts_with("c.toml:7:1: worker[0].device: `cuda:0` needs a disagg-hw built with feature `cuda`"),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
