//! A cluster file: the model, the frontend, the routing policy and the workers, one process
//! each. `disagg-hw serve --config FILE` starts them all on one machine; each role's
//! subcommand starts one of them, so the same file describes a cluster spread over machines.

use crate::engine::EngineConfig;
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
    /// The name clients put in `model`.
    pub id: String,
    /// The GGUF file (relative to the cluster file); default: the fetched file of `id`.
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// f32, f16 or bf16.
    #[serde(default = "default_dtype")]
    pub dtype: String,
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
        let config: ClusterConfig = from_toml(&text, &file)?;
        check(&config).map_err(|(path, message)| invalid_at(&text, &file, &path, message))?;
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

    /// The GGUF file the model loads from.
    pub fn gguf_path(&self) -> Result<PathBuf, String> {
        match &self.config.model.gguf {
            Some(path) => Ok(self.base_dir.join(path)),
            None if self.config.model.id == "smollm2-135m" => {
                models::runtime::test_gguf_path().map_err(|e| e.to_string())
            }
            None => Err(format!(
                "{}: model.gguf: required for model `{}` (only smollm2-135m has a default file)",
                self.file, self.config.model.id
            )),
        }
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
}
