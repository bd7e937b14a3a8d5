//! A Llama model's weights as candle tensors, in the layout of HF checkpoints: every linear
//! layer is (out_features, in_features), applied as `x @ W^T`.

use super::RuntimeError;
use crate::ModelSpec;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i with i + head_dim/2 (HF checkpoints, "rotate half").
    Halves,
    /// Dimension 2i with 2i + 1 (llama.cpp's GGUF files, whose Q and K rows are permuted to
    /// match).
    Interleaved,
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub ffn_norm: Tensor,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

#[derive(Clone, Debug)]
pub struct Weights {
    pub spec: ModelSpec,
    pub rope: RopeStyle,
    /// (vocab, hidden)
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    /// (hidden)
    pub norm: Tensor,
    /// (vocab, hidden); the embedding itself when tied.
    pub lm_head: Tensor,
}

impl Weights {
    /// The dtype the weights are held in.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The same weights converted to `dtype` on `device`: one seeded draw serves every
    /// device and dtype that is compared against it.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Weights, RuntimeError> {
        let to = |t: &Tensor| -> Result<Tensor, RuntimeError> {
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        let embed = to(&self.embed)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    attn_norm: to(&l.attn_norm)?,
                    wq: to(&l.wq)?,
                    wk: to(&l.wk)?,
                    wv: to(&l.wv)?,
                    wo: to(&l.wo)?,
                    ffn_norm: to(&l.ffn_norm)?,
                    w_gate: to(&l.w_gate)?,
                    w_up: to(&l.w_up)?,
                    w_down: to(&l.w_down)?,
                })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let lm_head = if self.spec.tie_word_embeddings {
            embed.clone()
        } else {
            to(&self.lm_head)?
        };
        Ok(Weights {
            spec: self.spec.clone(),
            rope: self.rope,
            embed,
            layers,
            norm: to(&self.norm)?,
            lm_head,
        })
    }

    /// Seeded random weights for any architecture: N(0, 0.02) matrices and unit norms, drawn
    /// on the CPU from ChaCha8 so that every device and dtype starts from the same numbers.
    pub fn random(
        spec: &ModelSpec,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Weights, RuntimeError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let h = spec.hidden_size as usize;
        let q = (spec.n_heads * spec.head_dim) as usize;
        let kv = (spec.n_kv_heads * spec.head_dim) as usize;
        let inter = spec.intermediate_size as usize;
        let vocab = spec.vocab_size as usize;
        let mut matrix = |rows: usize, cols: usize| -> Result<Tensor, RuntimeError> {
            let data = normal_f32(&mut rng, rows * cols, 0.02);
            Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        let ones = |n: usize| -> Result<Tensor, RuntimeError> {
            Ok(Tensor::ones(n, DType::F32, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        let embed = matrix(vocab, h)?;
        let mut layers = Vec::with_capacity(spec.n_layers as usize);
        for _ in 0..spec.n_layers {
            layers.push(LayerWeights {
                attn_norm: ones(h)?,
                wq: matrix(q, h)?,
                wk: matrix(kv, h)?,
                wv: matrix(kv, h)?,
                wo: matrix(h, q)?,
                ffn_norm: ones(h)?,
                w_gate: matrix(inter, h)?,
                w_up: matrix(inter, h)?,
                w_down: matrix(h, inter)?,
            });
        }
        let norm = ones(h)?;
        let lm_head = if spec.tie_word_embeddings {
            embed.clone()
        } else {
            matrix(vocab, h)?
        };
        Ok(Weights {
            spec: spec.clone(),
            rope: RopeStyle::Halves,
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}

/// `n` draws of N(0, std) by the Box-Muller transform on ChaCha8 uniforms: specified bit for
/// bit, so the weights are the same on every platform and release.
fn normal_f32(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand::RngExt;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // (0, 1] keeps the logarithm finite.
        let u1 = 1.0 - rng.random::<f32>();
        let u2 = rng.random::<f32>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        out.push(r * c);
        if out.len() < n {
            out.push(r * s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_seeded_and_shaped() {
        let spec = ModelSpec::preset("smollm2-135m").unwrap();
        let a = Weights::random(&spec, DType::F32, &Device::Cpu, 1).unwrap();
        let b = Weights::random(&spec, DType::F32, &Device::Cpu, 1).unwrap();
        let c = Weights::random(&spec, DType::F32, &Device::Cpu, 2).unwrap();
        assert_eq!(a.layers.len(), 30);
        assert_eq!(a.layers[0].wk.dims(), &[192, 576]);
        assert_eq!(a.layers[0].w_down.dims(), &[576, 1536]);
        let first = |w: &Weights| {
            w.layers[3]
                .wv
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(first(&a), first(&b));
        assert_ne!(first(&a), first(&c));
        let values = first(&a);
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "{}", var.sqrt());
        let bf16 = Weights::random(&spec, DType::BF16, &Device::Cpu, 1).unwrap();
        assert_eq!(bf16.dtype(), DType::BF16);
        let converted = a.to(DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(converted.dtype(), DType::BF16);
        let bits = |w: &Weights| {
            w.layers[3]
                .wv
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(
            bits(&converted),
            bits(&bf16),
            "converting equals drawing in bf16"
        );
    }
}
