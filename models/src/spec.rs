use serde::{Deserialize, Serialize};

/// Element type of weights or of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
    /// 8-bit float (E4M3), as used for FP8 weights and KV caches.
    Fp8,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::Fp8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::Fp8 => "fp8",
        }
    }
}

/// The architecture numbers of a Llama-family decoder (RMSNorm, RoPE, grouped-query attention,
/// SwiGLU MLP), as published in each model's `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub n_layers: u32,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub vocab_size: u32,
    pub max_position_embeddings: u32,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// The output projection shares the token embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelSpec {
    /// Names accepted by [`ModelSpec::preset`].
    pub const PRESETS: [&'static str; 4] = [
        "tinyllama-1.1b",
        "smollm2-135m",
        "llama-3.1-8b",
        "llama-3.1-70b",
    ];

    /// A published architecture by name (case-insensitive).
    pub fn preset(name: &str) -> Option<ModelSpec> {
        let spec = |name: &str,
                    n_layers,
                    hidden_size,
                    intermediate_size,
                    n_heads,
                    n_kv_heads,
                    vocab_size,
                    max_position_embeddings,
                    rope_theta,
                    tie_word_embeddings| ModelSpec {
            name: name.to_string(),
            n_layers,
            hidden_size,
            intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim: hidden_size / n_heads,
            vocab_size,
            max_position_embeddings,
            rope_theta,
            rms_norm_eps: 1e-5,
            tie_word_embeddings,
        };
        match name.to_ascii_lowercase().as_str() {
            // TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json
            "tinyllama-1.1b" => Some(spec(
                "tinyllama-1.1b",
                22,
                2048,
                5632,
                32,
                4,
                32000,
                2048,
                10_000.0,
                false,
            )),
            // HuggingFaceTB/SmolLM2-135M-Instruct config.json
            "smollm2-135m" => Some(spec(
                "smollm2-135m",
                30,
                576,
                1536,
                9,
                3,
                49152,
                8192,
                100_000.0,
                true,
            )),
            // meta-llama/Llama-3.1-8B config.json
            "llama-3.1-8b" => Some(spec(
                "llama-3.1-8b",
                32,
                4096,
                14336,
                32,
                8,
                128_256,
                131_072,
                500_000.0,
                false,
            )),
            // meta-llama/Llama-3.1-70B config.json
            "llama-3.1-70b" => Some(spec(
                "llama-3.1-70b",
                80,
                8192,
                28672,
                64,
                8,
                128_256,
                131_072,
                500_000.0,
                false,
            )),
            _ => None,
        }
    }

    fn q_dim(&self) -> u64 {
        self.n_heads as u64 * self.head_dim as u64
    }

    fn kv_dim(&self) -> u64 {
        self.n_kv_heads as u64 * self.head_dim as u64
    }

    /// Parameters of the matrices every token passes through in one layer.
    fn layer_matmul_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let attention = h * self.q_dim() + 2 * h * self.kv_dim() + self.q_dim() * h;
        let mlp = 3 * h * self.intermediate_size as u64;
        attention + mlp
    }

    fn embedding_params(&self) -> u64 {
        self.vocab_size as u64 * self.hidden_size as u64
    }

    /// Total parameter count, norms and embeddings included.
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let per_layer = self.layer_matmul_params() + 2 * h;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            self.embedding_params()
        };
        self.n_layers as u64 * per_layer + self.embedding_params() + lm_head + h
    }

    /// Bytes of all weights stored in `dtype`.
    pub fn weight_bytes(&self, dtype: DType) -> u64 {
        self.param_count() * dtype.bytes()
    }

    /// Bytes of weights read from memory by one forward step: everything but an untied
    /// embedding table, of which a step gathers only a few rows.
    pub fn step_weight_bytes(&self, dtype: DType) -> u64 {
        let gathered = if self.tie_word_embeddings {
            0
        } else {
            self.embedding_params()
        };
        (self.param_count() - gathered) * dtype.bytes()
    }

    /// KV-cache bytes per token: layers x 2 (K and V) x kv_heads x head_dim x dtype bytes.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> u64 {
        self.n_layers as u64 * 2 * self.kv_dim() * dtype.bytes()
    }

    /// Matmul FLOPs of one token through all layers (2 per multiply-accumulate), without the
    /// output projection.
    pub fn linear_flops_per_token(&self) -> f64 {
        2.0 * self.n_layers as f64 * self.layer_matmul_params() as f64
    }

    /// FLOPs of the output projection for one sampled position.
    pub fn lm_head_flops(&self) -> f64 {
        2.0 * self.embedding_params() as f64
    }

    /// Attention FLOPs for one query attending to one key, over all layers:
    /// QK^T and AV each cost 2 x heads x head_dim.
    pub fn attention_flops_per_pair(&self) -> f64 {
        4.0 * self.n_layers as f64 * self.q_dim() as f64
    }

    /// Query-key pairs of a causal prefill chunk of `chunk_tokens` after `context_tokens`
    /// already cached: each new token attends to the context, the earlier new tokens and itself.
    pub fn prefill_attention_pairs(chunk_tokens: u64, context_tokens: u64) -> f64 {
        let n = chunk_tokens as f64;
        n * context_tokens as f64 + n * (n + 1.0) / 2.0
    }

    /// FLOPs of a prefill chunk of `chunk_tokens` after `context_tokens` already cached,
    /// logits computed for the last position only.
    pub fn prefill_flops(&self, chunk_tokens: u64, context_tokens: u64) -> f64 {
        if chunk_tokens == 0 {
            return 0.0;
        }
        chunk_tokens as f64 * self.linear_flops_per_token()
            + self.attention_flops_per_pair()
                * Self::prefill_attention_pairs(chunk_tokens, context_tokens)
            + self.lm_head_flops()
    }

    /// FLOPs of one decode step of one sequence whose cache holds `context_tokens`: the new
    /// token attends to the context and to itself.
    pub fn decode_flops(&self, context_tokens: u64) -> f64 {
        self.linear_flops_per_token()
            + self.attention_flops_per_pair() * (context_tokens as f64 + 1.0)
            + self.lm_head_flops()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> ModelSpec {
        ModelSpec::preset(name).unwrap()
    }

    #[test]
    fn every_preset_name_resolves() {
        for name in ModelSpec::PRESETS {
            assert_eq!(preset(name).name, name);
        }
        assert!(ModelSpec::preset("gpt-5").is_none());
        assert_eq!(preset("TinyLlama-1.1B").name, "tinyllama-1.1b");
    }

    #[test]
    fn parameter_counts_match_published_checkpoints() {
        // Counts of the published safetensors checkpoints.
        assert_eq!(preset("tinyllama-1.1b").param_count(), 1_100_048_384);
        assert_eq!(preset("smollm2-135m").param_count(), 134_515_008);
        assert_eq!(preset("llama-3.1-8b").param_count(), 8_030_261_248);
        assert_eq!(preset("llama-3.1-70b").param_count(), 70_553_706_496);
    }

    #[test]
    fn kv_bytes_per_token_match_published_figures() {
        assert_eq!(
            preset("tinyllama-1.1b").kv_bytes_per_token(DType::Bf16),
            22_528
        );
        assert_eq!(
            preset("llama-3.1-8b").kv_bytes_per_token(DType::Bf16),
            131_072
        );
        assert_eq!(
            preset("llama-3.1-70b").kv_bytes_per_token(DType::Bf16),
            327_680
        );
        assert_eq!(
            preset("smollm2-135m").kv_bytes_per_token(DType::F32),
            46_080
        );
        assert_eq!(
            preset("llama-3.1-8b").kv_bytes_per_token(DType::Fp8),
            65_536
        );
    }

    #[test]
    fn weight_bytes_scale_with_dtype() {
        let m = preset("llama-3.1-8b");
        assert_eq!(m.weight_bytes(DType::Bf16), 16_060_522_496);
        assert_eq!(m.weight_bytes(DType::F32), 2 * m.weight_bytes(DType::Bf16));
        // An untied embedding table is gathered, not streamed, by a step.
        assert_eq!(
            m.weight_bytes(DType::Bf16) - m.step_weight_bytes(DType::Bf16),
            128_256 * 4096 * 2
        );
        let tied = preset("smollm2-135m");
        assert_eq!(
            tied.weight_bytes(DType::Bf16),
            tied.step_weight_bytes(DType::Bf16)
        );
    }

    #[test]
    fn flops_follow_the_two_flops_per_parameter_rule() {
        let m = preset("llama-3.1-8b");
        let non_embedding = m.param_count() - 2 * 128_256 * 4096 - (32 * 2 + 1) * 4096;
        assert_eq!(m.linear_flops_per_token(), 2.0 * non_embedding as f64);
        // A 1-token prefill with no context is a decode step on an empty cache.
        assert_eq!(m.prefill_flops(1, 0), m.decode_flops(0));
        // Attention: 4 x layers x heads x head_dim per query-key pair.
        assert_eq!(m.attention_flops_per_pair(), 4.0 * 32.0 * 4096.0);
        let long = m.decode_flops(8191) - m.decode_flops(0);
        assert_eq!(long, m.attention_flops_per_pair() * 8191.0);
    }

    #[test]
    fn chunked_prefill_adds_up_to_one_prefill() {
        let m = preset("tinyllama-1.1b");
        let whole = m.prefill_flops(1024, 0) - m.lm_head_flops();
        let chunks = m.prefill_flops(512, 0) + m.prefill_flops(512, 512) - 2.0 * m.lm_head_flops();
        assert!((whole - chunks).abs() / whole < 1e-12);
        assert_eq!(m.prefill_flops(0, 100), 0.0);
        assert_eq!(ModelSpec::prefill_attention_pairs(4, 0), 10.0);
        assert_eq!(ModelSpec::prefill_attention_pairs(2, 3), 9.0);
    }
}
