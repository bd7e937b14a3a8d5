//! Rotary position embeddings over packed tokens: every token carries its own position, so
//! sequences at different offsets rotate in one kernel call.

use super::{RopeStyle, RuntimeError};
use crate::ModelSpec;
use candle_core::{DType, Device, Tensor};

/// cos/sin tables for every position up to `max_position_embeddings`.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    style: RopeStyle,
    /// (max_position_embeddings, head_dim / 2) in the model dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Angles `p * rope_theta^(-2i / head_dim)`, computed in f64 so that far positions keep
    /// their precision, stored in `dtype` (the rope kernels want x's dtype).
    pub fn new(
        spec: &ModelSpec,
        style: RopeStyle,
        dtype: DType,
        device: &Device,
    ) -> Result<Rope, RuntimeError> {
        let half = spec.head_dim as usize / 2;
        let positions = spec.max_position_embeddings as usize;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                spec.rope_theta
                    .powf(-((2 * i) as f64) / spec.head_dim as f64)
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        let table = |v: Vec<f32>| -> Result<Tensor, RuntimeError> {
            Ok(Tensor::from_vec(v, (positions, half), device)?.to_dtype(dtype)?)
        };
        Ok(Rope {
            style,
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// The tables' rows for `positions` (u32, length T), shaped (T, 1, head_dim / 2) to pair
    /// with activations viewed as (T, heads, 1, head_dim).
    pub fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor), RuntimeError> {
        let t = positions.dim(0)?;
        let half = self.cos.dim(1)?;
        let rows = |table: &Tensor| -> Result<Tensor, RuntimeError> {
            Ok(table.index_select(positions, 0)?.reshape((t, 1, half))?)
        };
        Ok((rows(&self.cos)?, rows(&self.sin)?))
    }

    /// The cos and sin tables, (max_position_embeddings, head_dim / 2).
    #[cfg(feature = "cuda")]
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Whether pairs are adjacent (GGUF's layout) rather than half a head apart.
    #[cfg(feature = "cuda")]
    pub fn interleaved(&self) -> bool {
        matches!(self.style, RopeStyle::Interleaved)
    }

    /// Rotates `x`, contiguous (T, heads, 1, head_dim), by the rows [`Rope::at`] returned: each
    /// token is its own batch entry of the rope kernels, so no transpose is needed.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, RuntimeError> {
        Ok(match self.style {
            RopeStyle::Halves => candle_nn::rotary_emb::rope(x, cos, sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        let mut spec = ModelSpec::preset("smollm2-135m").unwrap();
        spec.head_dim = 8;
        spec.max_position_embeddings = 64;
        spec.rope_theta = 10_000.0;
        spec
    }

    /// Each packed token rotates by its own position, as the slow per-sequence kernels do.
    #[test]
    fn packed_positions_match_the_per_sequence_kernels() {
        let dev = Device::Cpu;
        for (style, slow) in [
            (
                RopeStyle::Halves,
                candle_nn::rotary_emb::rope_slow as fn(&Tensor, &Tensor, &Tensor) -> _,
            ),
            (RopeStyle::Interleaved, candle_nn::rotary_emb::rope_i_slow),
        ] {
            let rope = Rope::new(&spec(), style, DType::F32, &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (5, 3, 1, 8), &dev).unwrap();
            let positions = [7u32, 8, 9, 0, 40];
            let (cos, sin) = rope
                .at(&Tensor::new(&positions[..], &dev).unwrap())
                .unwrap();
            let got = rope.apply(&x, &cos, &sin).unwrap();
            for (i, &p) in positions.iter().enumerate() {
                let xi = x.narrow(0, i, 1).unwrap();
                let cos = rope.cos.narrow(0, p as usize, 1).unwrap();
                let sin = rope.sin.narrow(0, p as usize, 1).unwrap();
                let want = slow(&xi.contiguous().unwrap(), &cos, &sin).unwrap();
                let diff = (got.narrow(0, i, 1).unwrap() - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-6, "{style:?} position {p}: {diff}");
            }
        }
    }
}
