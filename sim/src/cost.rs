//! Step-time cost models. The engine describes one iteration's work in aggregate and a cost
//! model prices it: a roofline from the hardware spec for hardware nobody has measured, or
//! [`Measured`], a calibration profile's tables interpolated.

mod measured;

pub use measured::Measured;

use crate::hardware::HardwareSpec;
use crate::time::Nanos;
use models::{DType, ModelSpec};

/// The work of one engine iteration, summed over its sequences.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepWork {
    /// Prefill chunks in the step, and their tokens.
    pub prefill_seqs: u32,
    pub prefill_tokens: u64,
    /// Query-key pairs of the prefill chunks' causal attention.
    pub prefill_attention_pairs: f64,
    /// KV tokens the prefill chunks' attention reads (context plus chunk).
    pub prefill_kv_read_tokens: u64,
    /// Sequences decoding one token each, and the tokens in their caches.
    pub decode_seqs: u32,
    pub decode_context_tokens: u64,
}

impl StepWork {
    pub fn is_empty(&self) -> bool {
        self.prefill_seqs == 0 && self.decode_seqs == 0
    }

    /// Adds a prefill chunk of `tokens` after `context_tokens` already in the cache.
    pub fn add_prefill(&mut self, tokens: u64, context_tokens: u64) {
        self.prefill_seqs += 1;
        self.prefill_tokens += tokens;
        self.prefill_attention_pairs += ModelSpec::prefill_attention_pairs(tokens, context_tokens);
        self.prefill_kv_read_tokens += context_tokens + tokens;
    }

    /// Adds one decode token of a sequence whose cache holds `context_tokens`.
    pub fn add_decode(&mut self, context_tokens: u64) {
        self.decode_seqs += 1;
        self.decode_context_tokens += context_tokens;
    }
}

/// Prices an iteration.
pub trait CostModel {
    fn step_ns(&self, work: &StepWork) -> Nanos;
}

/// Roofline: a step takes the longer of its FLOPs over the achievable FLOP rate and its bytes
/// (weights once, KV read and written) over the achievable bandwidth, plus a fixed overhead.
#[derive(Clone, Debug)]
pub struct Roofline {
    linear_flops_per_token: f64,
    lm_head_flops: f64,
    attention_flops_per_pair: f64,
    step_weight_bytes: f64,
    kv_bytes_per_token: f64,
    flop_per_s: f64,
    bytes_per_s: f64,
    overhead_ns: f64,
}

impl Roofline {
    pub fn new(hw: &HardwareSpec, model: &ModelSpec, dtype: DType, kv_dtype: DType) -> Self {
        Roofline {
            linear_flops_per_token: model.linear_flops_per_token(),
            lm_head_flops: model.lm_head_flops(),
            attention_flops_per_pair: model.attention_flops_per_pair(),
            step_weight_bytes: model.step_weight_bytes(dtype) as f64,
            kv_bytes_per_token: model.kv_bytes_per_token(kv_dtype) as f64,
            flop_per_s: hw.peak_flop_per_s(dtype) * hw.flops_efficiency,
            bytes_per_s: hw.peak_bytes_per_s() * hw.bandwidth_efficiency,
            overhead_ns: hw.step_overhead_us * 1e3,
        }
    }

    pub fn flops(&self, w: &StepWork) -> f64 {
        let tokens = (w.prefill_tokens + w.decode_seqs as u64) as f64;
        let sampled = (w.prefill_seqs + w.decode_seqs) as f64;
        let pairs =
            w.prefill_attention_pairs + (w.decode_context_tokens + w.decode_seqs as u64) as f64;
        tokens * self.linear_flops_per_token
            + sampled * self.lm_head_flops
            + pairs * self.attention_flops_per_pair
    }

    pub fn bytes(&self, w: &StepWork) -> f64 {
        let kv_read = (w.prefill_kv_read_tokens + w.decode_context_tokens) as f64;
        let kv_written = (w.prefill_tokens + w.decode_seqs as u64) as f64;
        self.step_weight_bytes + (kv_read + kv_written) * self.kv_bytes_per_token
    }
}

impl CostModel for Roofline {
    fn step_ns(&self, w: &StepWork) -> Nanos {
        if w.is_empty() {
            return 0;
        }
        let compute_s = self.flops(w) / self.flop_per_s;
        let memory_s = self.bytes(w) / self.bytes_per_s;
        (compute_s.max(memory_s) * 1e9 + self.overhead_ns).ceil() as Nanos
    }
}

/// Another model's prices times a factor: `prefill` for a step that prefills, `decode` for one
/// that only decodes.
pub struct Scaled {
    pub model: Box<dyn CostModel>,
    pub prefill: f64,
    pub decode: f64,
}

impl CostModel for Scaled {
    fn step_ns(&self, w: &StepWork) -> Nanos {
        let scale = if w.prefill_seqs > 0 {
            self.prefill
        } else {
            self.decode
        };
        (self.model.step_ns(w) as f64 * scale).round() as Nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roofline(hw: &str, model: &str) -> Roofline {
        Roofline::new(
            &HardwareSpec::preset(hw).unwrap(),
            &ModelSpec::preset(model).unwrap(),
            DType::Bf16,
            DType::Bf16,
        )
    }

    #[test]
    fn small_batch_decode_is_memory_bound() {
        let hw = HardwareSpec::preset("h100-sxm").unwrap();
        let model = ModelSpec::preset("llama-3.1-8b").unwrap();
        let r = roofline("h100-sxm", "llama-3.1-8b");
        let mut w = StepWork::default();
        w.add_decode(1000);
        let expected_s = (model.step_weight_bytes(DType::Bf16) as f64 + 1001.0 * 131_072.0)
            / (hw.peak_bytes_per_s() * hw.bandwidth_efficiency);
        let expected = (expected_s * 1e9 + hw.step_overhead_us * 1e3).ceil() as Nanos;
        assert_eq!(r.step_ns(&w), expected);
    }

    #[test]
    fn long_prefill_is_compute_bound_and_grows_superlinearly() {
        let r = roofline("h100-sxm", "llama-3.1-8b");
        let time = |tokens| {
            let mut w = StepWork::default();
            w.add_prefill(tokens, 0);
            assert!(r.flops(&w) / r.flop_per_s > r.bytes(&w) / r.bytes_per_s);
            r.step_ns(&w) as f64 - r.overhead_ns
        };
        let (t4k, t8k) = (time(4096), time(8192));
        assert!(t8k > 2.0 * t4k, "attention makes 8k more than twice 4k");
        assert!(t8k < 2.5 * t4k);
    }

    #[test]
    fn batching_decode_amortises_weights() {
        let r = roofline("dgx-spark", "tinyllama-1.1b");
        let mut one = StepWork::default();
        one.add_decode(500);
        let mut many = StepWork::default();
        for _ in 0..32 {
            many.add_decode(500);
        }
        assert!(r.step_ns(&many) < 2 * r.step_ns(&one));
        assert_eq!(r.step_ns(&StepWork::default()), 0);
    }
}
