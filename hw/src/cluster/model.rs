//! Loading the model a cluster file names: the frontend needs its architecture and tokenizer,
//! a worker its weights on the worker's device as well.

use super::config::{Cluster, ModelSource};
use models::ModelSpec;
use models::runtime::{Device, GgufFile, Model, Tokenizer, Weights};

/// The architecture and tokenizer, without the weights.
pub fn spec_and_tokenizer(cluster: &Cluster) -> Result<(ModelSpec, Tokenizer), String> {
    match cluster.model_source()? {
        ModelSource::Gguf(path) => {
            let gguf = GgufFile::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let spec = gguf.spec().map_err(|e| e.to_string())?;
            let tokenizer = gguf.tokenizer().map_err(|e| e.to_string())?;
            Ok((spec, tokenizer))
        }
        ModelSource::Random { spec, .. } => {
            let tokenizer = Tokenizer::token_ids(spec.vocab_size);
            Ok((spec, tokenizer))
        }
    }
}

/// The model with its weights on `device`, and its tokenizer. Random weights are drawn on the
/// host from the seed, so every worker of the cluster, on any device, gets the same ones.
pub fn load(cluster: &Cluster, device: &Device) -> Result<(Model, Tokenizer), String> {
    let dtype = crate::parse_dtype(&cluster.config.model.dtype)?;
    let (weights, tokenizer) = match cluster.model_source()? {
        ModelSource::Gguf(path) => {
            let gguf = GgufFile::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let weights = gguf.weights(dtype, device).map_err(|e| e.to_string())?;
            (weights, gguf.tokenizer().map_err(|e| e.to_string())?)
        }
        ModelSource::Random { spec, seed } => {
            let weights = Weights::random(&spec, dtype, device, seed).map_err(|e| e.to_string())?;
            (weights, Tokenizer::token_ids(spec.vocab_size))
        }
    };
    let model = Model::new(weights).map_err(|e| e.to_string())?;
    Ok((model, tokenizer))
}
