//! Accelerator specifications for the roofline cost model, with presets compiled in from
//! `configs/hardware/`.

use models::DType;
use serde::{Deserialize, Serialize};

/// One accelerator as the roofline model sees it: peak rates and the share of them a serving
/// engine reaches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareSpec {
    pub name: String,
    pub bf16_dense_tflop_per_s: f64,
    #[serde(default)]
    pub fp8_dense_tflop_per_s: Option<f64>,
    /// Memory the GPU can use for weights, KV cache and activations.
    pub memory_gib: f64,
    pub memory_bandwidth_gb_per_s: f64,
    /// Share of peak FLOP/s that the engine's matmuls reach.
    pub flops_efficiency: f64,
    /// Share of peak memory bandwidth that weight and KV streaming reach.
    pub bandwidth_efficiency: f64,
    /// Fixed cost of one engine iteration: scheduling, kernel launches, sampling.
    pub step_overhead_us: f64,
}

const PRESET_FILES: [(&str, &str); 3] = [
    (
        "dgx-spark",
        include_str!("../../configs/hardware/dgx-spark.toml"),
    ),
    (
        "h100-sxm",
        include_str!("../../configs/hardware/h100-sxm.toml"),
    ),
    (
        "h200-sxm",
        include_str!("../../configs/hardware/h200-sxm.toml"),
    ),
];

impl HardwareSpec {
    pub const PRESETS: [&'static str; 3] = ["dgx-spark", "h100-sxm", "h200-sxm"];

    /// A compiled-in preset by name.
    pub fn preset(name: &str) -> Option<HardwareSpec> {
        PRESET_FILES
            .iter()
            .find(|(preset, _)| *preset == name)
            .map(|(_, text)| toml::from_str(text).expect("compiled-in hardware preset parses"))
    }

    /// Checks every figure; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("bf16_dense_tflop_per_s", self.bf16_dense_tflop_per_s),
            ("memory_gib", self.memory_gib),
            ("memory_bandwidth_gb_per_s", self.memory_bandwidth_gb_per_s),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("{field}: must be a positive number, got {value}"));
            }
        }
        if let Some(fp8) = self.fp8_dense_tflop_per_s
            && !(fp8.is_finite() && fp8 > 0.0)
        {
            return Err(format!(
                "fp8_dense_tflop_per_s: must be a positive number, got {fp8}"
            ));
        }
        for (field, value) in [
            ("flops_efficiency", self.flops_efficiency),
            ("bandwidth_efficiency", self.bandwidth_efficiency),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(format!("{field}: must be in (0, 1], got {value}"));
            }
        }
        if !(self.step_overhead_us.is_finite() && self.step_overhead_us >= 0.0) {
            return Err(format!(
                "step_overhead_us: must be >= 0, got {}",
                self.step_overhead_us
            ));
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> f64 {
        self.memory_gib * (1u64 << 30) as f64
    }

    /// Peak dense matmul rate for weights of `dtype` (FP8 falls back to BF16 where no FP8
    /// rate is given; F32 runs at half the BF16 tensor rate through TF32).
    pub fn peak_flop_per_s(&self, dtype: DType) -> f64 {
        let tflops = match dtype {
            DType::Fp8 => self
                .fp8_dense_tflop_per_s
                .unwrap_or(self.bf16_dense_tflop_per_s),
            DType::Bf16 | DType::F16 => self.bf16_dense_tflop_per_s,
            DType::F32 => self.bf16_dense_tflop_per_s / 2.0,
        };
        tflops * 1e12
    }

    pub fn peak_bytes_per_s(&self) -> f64 {
        self.memory_bandwidth_gb_per_s * 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for name in HardwareSpec::PRESETS {
            let spec = HardwareSpec::preset(name).unwrap();
            assert_eq!(spec.name, name);
            spec.validate().unwrap();
        }
        assert!(HardwareSpec::preset("tpu").is_none());
    }

    #[test]
    fn validation_names_the_field() {
        let mut spec = HardwareSpec::preset("h100-sxm").unwrap();
        spec.flops_efficiency = 1.5;
        assert!(spec.validate().unwrap_err().starts_with("flops_efficiency"));
        spec.flops_efficiency = 0.5;
        spec.memory_bandwidth_gb_per_s = f64::NAN;
        assert!(
            spec.validate()
                .unwrap_err()
                .starts_with("memory_bandwidth_gb_per_s")
        );
    }
}
