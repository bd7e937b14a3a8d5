//! Llama weights from a Hugging Face checkpoint directory: `config.json` and the
//! `*.safetensors` shards beside it.

use super::gguf::{LayerPart, TensorNames, assemble_weights, candle_message, validate_spec};
use super::{RopeStyle, RuntimeError, Weights};
use crate::ModelSpec;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fields of HF's `LlamaConfig` that the architecture needs, with HF's defaults for the
/// optional ones.
#[derive(Deserialize)]
struct HfLlamaConfig {
    model_type: Option<String>,
    hidden_size: u32,
    intermediate_size: u32,
    num_hidden_layers: u32,
    num_attention_heads: u32,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
    vocab_size: u32,
    max_position_embeddings: u32,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// Reads `dir/config.json` into a [`ModelSpec`] named after the directory.
pub fn spec_from_hf_config(dir: &Path) -> Result<ModelSpec, RuntimeError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| RuntimeError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let format = |message: String| RuntimeError::Format {
        path: path.display().to_string(),
        message,
    };
    let config: HfLlamaConfig = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
    if let Some(model_type) = &config.model_type
        && model_type != "llama"
    {
        return Err(format(format!(
            "model_type is \"{model_type}\"; only \"llama\" is supported"
        )));
    }
    let head_dim = match config.head_dim {
        Some(d) => d,
        None if config.num_attention_heads > 0
            && config
                .hidden_size
                .is_multiple_of(config.num_attention_heads) =>
        {
            config.hidden_size / config.num_attention_heads
        }
        None => {
            return Err(format(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let spec = ModelSpec {
        name,
        n_layers: config.num_hidden_layers,
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        n_heads: config.num_attention_heads,
        n_kv_heads: config
            .num_key_value_heads
            .unwrap_or(config.num_attention_heads),
        head_dim,
        vocab_size: config.vocab_size,
        max_position_embeddings: config.max_position_embeddings,
        rope_theta: config.rope_theta,
        rms_norm_eps: config.rms_norm_eps,
        tie_word_embeddings: config.tie_word_embeddings,
    };
    validate_spec(&spec, &path)?;
    Ok(spec)
}

impl Weights {
    /// Loads an HF Llama checkpoint directory (`config.json` + every `*.safetensors` shard),
    /// converting each tensor to `dtype`. HF checkpoints pair rotary dimensions by halves.
    pub fn from_safetensors(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Weights, RuntimeError> {
        let spec = spec_from_hf_config(dir)?;
        let shards = safetensors_files(dir)?;
        let mut tensors: HashMap<String, (Tensor, PathBuf)> = HashMap::new();
        for shard in &shards {
            let loaded = candle_core::safetensors::load(shard, &Device::Cpu).map_err(|e| {
                RuntimeError::Format {
                    path: shard.display().to_string(),
                    message: format!("unreadable safetensors file: {}", candle_message(&e)),
                }
            })?;
            for (name, tensor) in loaded {
                if let Some((_, first)) = tensors.get(&name) {
                    return Err(RuntimeError::Format {
                        path: shard.display().to_string(),
                        message: format!("tensor {name} is also in {}", first.display()),
                    });
                }
                tensors.insert(name, (tensor, shard.clone()));
            }
        }
        assemble_weights(
            dir,
            &spec,
            RopeStyle::Halves,
            dtype,
            device,
            &TensorNames {
                embed: "model.embed_tokens.weight",
                norm: "model.norm.weight",
                lm_head: "lm_head.weight",
                layer: |i, part| {
                    let suffix = match part {
                        LayerPart::AttnNorm => "input_layernorm",
                        LayerPart::Q => "self_attn.q_proj",
                        LayerPart::K => "self_attn.k_proj",
                        LayerPart::V => "self_attn.v_proj",
                        LayerPart::O => "self_attn.o_proj",
                        LayerPart::FfnNorm => "post_attention_layernorm",
                        LayerPart::Gate => "mlp.gate_proj",
                        LayerPart::Up => "mlp.up_proj",
                        LayerPart::Down => "mlp.down_proj",
                    };
                    format!("model.layers.{i}.{suffix}.weight")
                },
            },
            |name| {
                let Some((tensor, shard)) = tensors.remove(name) else {
                    return Ok(None);
                };
                if !tensor.dtype().is_float() {
                    return Err(RuntimeError::Format {
                        path: shard.display().to_string(),
                        message: format!("tensor {name} has dtype {:?}, not float", tensor.dtype()),
                    });
                }
                Ok(Some(tensor))
            },
        )
    }
}

/// The `*.safetensors` files of `dir`, sorted so that errors are reproducible.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let io = |source| RuntimeError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(RuntimeError::Format {
            path: dir.display().to_string(),
            message: "no *.safetensors files in the checkpoint directory".into(),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::gguf::tests::{tiny_spec, values};

    /// `w` in HF's layout, split over `shards` files, stored as `storage`.
    fn save_hf(dir: &Path, w: &Weights, storage: DType, shards: usize) {
        let s = &w.spec;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size,
            "num_hidden_layers": s.n_layers,
            "num_attention_heads": s.n_heads,
            "num_key_value_heads": s.n_kv_heads,
            "vocab_size": s.vocab_size,
            "max_position_embeddings": s.max_position_embeddings,
            "rope_theta": s.rope_theta,
            "rms_norm_eps": s.rms_norm_eps,
            "tie_word_embeddings": s.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut tensors = vec![
            ("model.embed_tokens.weight".to_string(), &w.embed),
            ("model.norm.weight".to_string(), &w.norm),
        ];
        if !s.tie_word_embeddings {
            tensors.push(("lm_head.weight".to_string(), &w.lm_head));
        }
        for (i, l) in w.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            tensors.extend([
                (format!("{p}.input_layernorm.weight"), &l.attn_norm),
                (format!("{p}.self_attn.q_proj.weight"), &l.wq),
                (format!("{p}.self_attn.k_proj.weight"), &l.wk),
                (format!("{p}.self_attn.v_proj.weight"), &l.wv),
                (format!("{p}.self_attn.o_proj.weight"), &l.wo),
                (format!("{p}.post_attention_layernorm.weight"), &l.ffn_norm),
                (format!("{p}.mlp.gate_proj.weight"), &l.w_gate),
                (format!("{p}.mlp.up_proj.weight"), &l.w_up),
                (format!("{p}.mlp.down_proj.weight"), &l.w_down),
            ]);
        }
        let per_shard = tensors.len().div_ceil(shards);
        for (k, chunk) in tensors.chunks(per_shard).enumerate() {
            let map: HashMap<String, Tensor> = chunk
                .iter()
                .map(|(n, t)| (n.clone(), t.to_dtype(storage).unwrap()))
                .collect();
            let name = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
            candle_core::safetensors::save(&map, dir.join(name)).unwrap();
        }
    }

    fn assert_weights_eq(a: &Weights, b: &Weights) {
        let all = |w: &Weights| -> Vec<Vec<f32>> {
            let mut v = vec![values(&w.embed), values(&w.norm), values(&w.lm_head)];
            for l in &w.layers {
                for t in [
                    &l.attn_norm,
                    &l.wq,
                    &l.wk,
                    &l.wv,
                    &l.wo,
                    &l.ffn_norm,
                    &l.w_gate,
                    &l.w_up,
                    &l.w_down,
                ] {
                    v.push(values(t));
                }
            }
            v
        };
        assert_eq!(all(a), all(b));
    }

    #[test]
    fn a_saved_hf_checkpoint_loads_back_exactly() {
        for (tied, shards) in [(false, 1), (true, 3)] {
            let dir = tempfile::tempdir().unwrap();
            let spec = tiny_spec(tied);
            let w = Weights::random(&spec, DType::F32, &Device::Cpu, 11).unwrap();
            save_hf(dir.path(), &w, DType::F32, shards);
            let loaded = Weights::from_safetensors(dir.path(), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(loaded.rope, RopeStyle::Halves);
            assert_eq!(loaded.dtype(), DType::F32);
            let dir_name = dir.path().canonicalize().unwrap();
            assert_eq!(
                loaded.spec,
                ModelSpec {
                    name: dir_name.file_name().unwrap().to_string_lossy().into_owned(),
                    ..spec
                }
            );
            assert_weights_eq(&loaded, &w);
        }
    }

    #[test]
    fn bf16_checkpoints_convert_to_the_requested_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let w = Weights::random(&tiny_spec(false), DType::F32, &Device::Cpu, 5).unwrap();
        save_hf(dir.path(), &w, DType::BF16, 2);
        let f32s = Weights::from_safetensors(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let bf16 = Weights::from_safetensors(dir.path(), DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(bf16.dtype(), DType::BF16);
        assert_eq!(
            values(&f32s.layers[1].wo),
            values(&w.layers[1].wo.to_dtype(DType::BF16).unwrap())
        );
        assert_weights_eq(&f32s, &bf16);
    }

    #[test]
    fn config_fields_follow_hf_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 256}"#,
        )
        .unwrap();
        let spec = spec_from_hf_config(dir.path()).unwrap();
        assert_eq!(spec.n_kv_heads, 4);
        assert_eq!(spec.head_dim, 16);
        assert_eq!(spec.rope_theta, 10_000.0);
        assert_eq!(spec.rms_norm_eps, 1e-6);
        assert!(!spec.tie_word_embeddings);
    }

    #[test]
    fn checkpoint_errors_name_the_file_and_field() {
        let message = |dir: &Path| {
            Weights::from_safetensors(dir, DType::F32, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        let dir = tempfile::tempdir().unwrap();
        let err = message(dir.path());
        assert!(
            err.contains("config.json") && err.contains("No such file"),
            "{err}"
        );

        let w = Weights::random(&tiny_spec(false), DType::F32, &Device::Cpu, 5).unwrap();
        save_hf(dir.path(), &w, DType::F32, 2);
        let config_path = dir.path().join("config.json");
        let config = std::fs::read_to_string(&config_path).unwrap();

        std::fs::write(&config_path, config.replace("\"vocab_size\"", "\"vocab\"")).unwrap();
        let err = message(dir.path());
        assert!(
            err.contains("config.json") && err.contains("vocab_size"),
            "{err}"
        );
        std::fs::write(&config_path, config.replace("\"llama\"", "\"mistral\"")).unwrap();
        let err = message(dir.path());
        assert!(err.contains("mistral"), "{err}");
        std::fs::write(&config_path, &config).unwrap();

        // A shard cut short.
        let shard = dir.path().join("model-00002-of-00002.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
        let err = message(dir.path());
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
        assert!(err.contains("unreadable safetensors"), "{err}");

        // A shard missing: its tensors are reported by name.
        std::fs::remove_file(&shard).unwrap();
        let err = message(dir.path());
        assert!(err.contains("missing tensor"), "{err}");

        // A tensor of the wrong shape.
        let mut bad = w.clone();
        bad.layers[1].wv = bad.layers[1].wq.clone();
        let dir = tempfile::tempdir().unwrap();
        save_hf(dir.path(), &bad, DType::F32, 1);
        match Weights::from_safetensors(dir.path(), DType::F32, &Device::Cpu).unwrap_err() {
            RuntimeError::Shape { name, .. } => {
                assert_eq!(name, "model.layers.1.self_attn.v_proj.weight")
            }
            e => panic!("expected a shape error, got {e}"),
        }

        // No shards at all.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        let err = message(dir.path());
        assert!(err.contains("no *.safetensors files"), "{err}");
    }
}
