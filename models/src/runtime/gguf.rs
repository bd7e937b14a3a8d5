//! Llama weights and metadata from llama.cpp's GGUF files, dequantized on load.
//!
//! The whole file is validated when it is opened (magic, header, every tensor's extent against
//! the file length), so a truncated or corrupt download fails with one clear error before any
//! tensor is read.

use super::{LayerWeights, RopeStyle, RuntimeError, Tokenizer, Weights};
use crate::ModelSpec;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

/// Where `disagg-hw fetch-model smollm2-135m` puts SmolLM2-135M-Instruct (Q4_1), relative to
/// the cache directory.
pub const SMOLLM2_GGUF_RELPATH: &str = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory for fetched models: `$DISAGG_CACHE`, else `$XDG_CACHE_HOME/disagg`,
/// else `~/.cache/disagg`.
pub fn default_cache_dir() -> Result<PathBuf, RuntimeError> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("DISAGG_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("disagg"));
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("disagg")),
        None => Err(RuntimeError::Invalid(
            "no cache directory: set DISAGG_CACHE, XDG_CACHE_HOME or HOME".into(),
        )),
    }
}

/// The SmolLM2-135M-Instruct GGUF that tests run against: `$DISAGG_SMOLLM2_GGUF`, else the
/// default cache's copy. A missing file is an error that says how to fetch it, so that tests
/// fail loudly instead of skipping.
pub fn test_gguf_path() -> Result<PathBuf, RuntimeError> {
    let path = match std::env::var_os("DISAGG_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => default_cache_dir()?.join(SMOLLM2_GGUF_RELPATH),
    };
    existing_test_gguf(path)
}

fn existing_test_gguf(path: PathBuf) -> Result<PathBuf, RuntimeError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(RuntimeError::Invalid(format!(
            "{}: no such file; run `disagg-hw fetch-model smollm2-135m` \
             (or point DISAGG_SMOLLM2_GGUF at a copy)",
            path.display()
        )))
    }
}

/// An opened, validated GGUF file: its metadata and tensor directory, not yet its tensors.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl GgufFile {
    /// Reads and checks the header and the tensor directory; every tensor's bytes must lie
    /// inside the file.
    pub fn open(path: &Path) -> Result<GgufFile, RuntimeError> {
        let io = |source| RuntimeError::Io {
            path: path.display().to_string(),
            source,
        };
        let format = |message: String| RuntimeError::Format {
            path: path.display().to_string(),
            message,
        };
        let mut file = File::open(path).map_err(io)?;
        let file_bytes = file.metadata().map_err(io)?.len();
        let mut magic = [0u8; 4];
        if file_bytes < 8 {
            return Err(format(format!(
                "not a GGUF file: {file_bytes} bytes, shorter than a GGUF header"
            )));
        }
        file.read_exact(&mut magic).map_err(io)?;
        if &magic != b"GGUF" {
            return Err(format(format!(
                "not a GGUF file: starts with bytes {magic:02x?}, not \"GGUF\""
            )));
        }
        file.rewind().map_err(io)?;
        let mut reader = BufReader::new(file);
        // candle's parser bounds its reads, but some corrupt values still panic in it (a
        // general.alignment of 0 divides by zero): such a file is an error like any other.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => {
                return Err(format(format!(
                    "unreadable GGUF header (truncated or corrupt file?): {}",
                    candle_message(&e)
                )));
            }
            Err(_) => return Err(format("corrupt GGUF header".into())),
        };
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &content.tensor_infos[name];
            let block_elems = info.ggml_dtype.block_size() as u64;
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            let data_bytes = elems
                .filter(|e| e.is_multiple_of(block_elems))
                .and_then(|e| (e / block_elems).checked_mul(info.ggml_dtype.type_size() as u64));
            let Some(data_bytes) = data_bytes else {
                return Err(format(format!(
                    "tensor {name}: shape {:?} is not a whole number of {:?} blocks \
                     addressable in 64 bits",
                    info.shape.dims(),
                    info.ggml_dtype
                )));
            };
            let start = content.tensor_data_offset.checked_add(info.offset);
            let end = start.and_then(|s| s.checked_add(data_bytes));
            match end {
                Some(end) if end <= file_bytes => {}
                _ => {
                    return Err(format(format!(
                        "tensor {name}: needs {data_bytes} bytes at offset {} but the file is \
                         {file_bytes} bytes long (truncated?)",
                        content.tensor_data_offset.saturating_add(info.offset)
                    )));
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw metadata and tensor directory, as candle reads them.
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn format_error(&self, message: String) -> RuntimeError {
        RuntimeError::Format {
            path: self.path.display().to_string(),
            message,
        }
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u32(&self, key: &str) -> Result<Option<u32>, RuntimeError> {
        self.meta(key)
            .map(|v| {
                value_u64(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        self.format_error(format!("metadata {key}: expected a count, found {v:?}"))
                    })
            })
            .transpose()
    }

    fn required_u32(&self, key: &str) -> Result<u32, RuntimeError> {
        self.meta_u32(key)?
            .ok_or_else(|| self.format_error(format!("missing metadata key {key}")))
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>, RuntimeError> {
        self.meta(key)
            .map(|v| {
                value_f64(v).ok_or_else(|| {
                    self.format_error(format!("metadata {key}: expected a number, found {v:?}"))
                })
            })
            .transpose()
    }

    /// The architecture from `general.architecture` and the `llama.*` hyper-parameters; the
    /// vocabulary size is the tokenizer's token count (else `llama.vocab_size`), and the
    /// output projection is tied when the file has no `output.weight`.
    pub fn spec(&self) -> Result<ModelSpec, RuntimeError> {
        match self.meta("general.architecture") {
            Some(Value::String(arch)) if arch == "llama" => {}
            Some(Value::String(arch)) => {
                return Err(self.format_error(format!(
                    "general.architecture is \"{arch}\"; only \"llama\" is supported"
                )));
            }
            Some(v) => {
                return Err(self.format_error(format!(
                    "metadata general.architecture: expected a string, found {v:?}"
                )));
            }
            None => {
                return Err(self.format_error("missing metadata key general.architecture".into()));
            }
        }
        if self.meta_u32("llama.expert_count")?.unwrap_or(0) > 0 {
            return Err(self.format_error(
                "llama.expert_count > 0: mixture-of-experts models are not supported".into(),
            ));
        }
        let hidden_size = self.required_u32("llama.embedding_length")?;
        let n_heads = self.required_u32("llama.attention.head_count")?;
        let n_kv_heads = self
            .meta_u32("llama.attention.head_count_kv")?
            .unwrap_or(n_heads);
        let head_dim = match self.meta_u32("llama.attention.key_length")? {
            Some(d) => d,
            None if n_heads > 0 && hidden_size.is_multiple_of(n_heads) => hidden_size / n_heads,
            None => {
                return Err(self.format_error(format!(
                    "llama.embedding_length {hidden_size} is not a multiple of \
                     llama.attention.head_count {n_heads}"
                )));
            }
        };
        if let Some(v) = self.meta_u32("llama.attention.value_length")?
            && v != head_dim
        {
            return Err(self.format_error(format!(
                "llama.attention.value_length {v} differs from the key length {head_dim}"
            )));
        }
        if let Some(r) = self.meta_u32("llama.rope.dimension_count")?
            && r != head_dim
        {
            return Err(self.format_error(format!(
                "llama.rope.dimension_count {r} differs from the head dimension {head_dim}: \
                 partial rotary embeddings are not supported"
            )));
        }
        let vocab_size = match self.meta("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => u32::try_from(tokens.len()).ok(),
            _ => self.meta_u32("llama.vocab_size")?,
        };
        let Some(vocab_size) = vocab_size else {
            return Err(self.format_error(
                "missing metadata key tokenizer.ggml.tokens (and llama.vocab_size)".into(),
            ));
        };
        let name = match self.meta("general.name") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => self
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let rms_norm_eps = self
            .meta_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| {
                self.format_error(
                    "missing metadata key llama.attention.layer_norm_rms_epsilon".into(),
                )
            })?;
        let spec = ModelSpec {
            name,
            n_layers: self.required_u32("llama.block_count")?,
            hidden_size,
            intermediate_size: self.required_u32("llama.feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: self.required_u32("llama.context_length")?,
            // llama.cpp's default when the key is absent.
            rope_theta: self.meta_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
            rms_norm_eps,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        };
        validate_spec(&spec, &self.path)?;
        Ok(spec)
    }

    /// Every tensor dequantized to `dtype` on `device`. Q and K rows stay in llama.cpp's
    /// permuted order, hence [`RopeStyle::Interleaved`]. Dequantization runs on the CPU so
    /// that every device starts from bit-identical weights.
    pub fn weights(&self, dtype: DType, device: &Device) -> Result<Weights, RuntimeError> {
        let spec = self.spec()?;
        let io = |source| RuntimeError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let mut reader = BufReader::new(File::open(&self.path).map_err(io)?);
        assemble_weights(
            &self.path,
            &spec,
            RopeStyle::Interleaved,
            dtype,
            device,
            &TensorNames {
                embed: "token_embd.weight",
                norm: "output_norm.weight",
                lm_head: "output.weight",
                layer: |i, part| {
                    let suffix = match part {
                        LayerPart::AttnNorm => "attn_norm",
                        LayerPart::Q => "attn_q",
                        LayerPart::K => "attn_k",
                        LayerPart::V => "attn_v",
                        LayerPart::O => "attn_output",
                        LayerPart::FfnNorm => "ffn_norm",
                        LayerPart::Gate => "ffn_gate",
                        LayerPart::Up => "ffn_up",
                        LayerPart::Down => "ffn_down",
                    };
                    format!("blk.{i}.{suffix}.weight")
                },
            },
            |name| {
                let Some(info) = self.content.tensor_infos.get(name) else {
                    return Ok(None);
                };
                let tensor = info
                    .read(&mut reader, self.content.tensor_data_offset, &Device::Cpu)
                    .and_then(|q| q.dequantize(&Device::Cpu))
                    .map_err(|e| {
                        self.format_error(format!("tensor {name}: {}", candle_message(&e)))
                    })?;
                Ok(Some(tensor))
            },
        )
    }

    /// The tokenizer described by the `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer, RuntimeError> {
        Tokenizer::from_gguf(&self.content).map_err(|e| match e {
            RuntimeError::Format { message, .. } => self.format_error(message),
            e => e,
        })
    }
}

impl Weights {
    /// Loads a GGUF Llama checkpoint, dequantizing every tensor to `dtype` (see
    /// [`GgufFile::weights`]).
    pub fn from_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Weights, RuntimeError> {
        GgufFile::open(path)?.weights(dtype, device)
    }
}

/// candle's message without the backtrace that it appends when RUST_BACKTRACE is set.
pub(super) fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        e => e.to_string(),
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(n) => Some(n.into()),
        Value::U16(n) => Some(n.into()),
        Value::U32(n) => Some(n.into()),
        Value::U64(n) => Some(n),
        Value::I8(n) => u64::try_from(n).ok(),
        Value::I16(n) => u64::try_from(n).ok(),
        Value::I32(n) => u64::try_from(n).ok(),
        Value::I64(n) => u64::try_from(n).ok(),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x.into()),
        Value::F64(x) => Some(x),
        _ => value_u64(v).map(|n| n as f64),
    }
}

/// The checks both loaders make before trusting a spec's numbers for shapes.
pub(super) fn validate_spec(spec: &ModelSpec, path: &Path) -> Result<(), RuntimeError> {
    let fields = [
        ("layers", spec.n_layers),
        ("hidden size", spec.hidden_size),
        ("intermediate size", spec.intermediate_size),
        ("attention heads", spec.n_heads),
        ("key/value heads", spec.n_kv_heads),
        ("head dimension", spec.head_dim),
        ("vocabulary size", spec.vocab_size),
        ("context length", spec.max_position_embeddings),
    ];
    let error = |message: String| RuntimeError::Format {
        path: path.display().to_string(),
        message,
    };
    if let Some((field, _)) = fields.iter().find(|(_, v)| *v == 0) {
        return Err(error(format!("the {field} is 0")));
    }
    if !spec.n_heads.is_multiple_of(spec.n_kv_heads) {
        return Err(error(format!(
            "{} attention heads are not a multiple of {} key/value heads",
            spec.n_heads, spec.n_kv_heads
        )));
    }
    if !spec.head_dim.is_multiple_of(2) {
        return Err(error(format!(
            "head dimension {} is odd: rotary embeddings need pairs",
            spec.head_dim
        )));
    }
    if !(spec.rope_theta > 0.0 && spec.rms_norm_eps > 0.0) {
        return Err(error(format!(
            "rope theta {} and RMSNorm epsilon {} must be positive",
            spec.rope_theta, spec.rms_norm_eps
        )));
    }
    Ok(())
}

/// The tensors of one decoder layer, by role.
#[derive(Clone, Copy)]
pub(super) enum LayerPart {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// A checkpoint format's tensor names.
pub(super) struct TensorNames<F: Fn(usize, LayerPart) -> String> {
    pub embed: &'static str,
    pub norm: &'static str,
    pub lm_head: &'static str,
    pub layer: F,
}

/// Builds [`Weights`] from a checkpoint's tensors, checking each one's shape against the spec
/// (the one shape table both loaders share). `load` gives a tensor by name, in any float
/// dtype on the CPU, or `None` when the checkpoint lacks it.
pub(super) fn assemble_weights<F: Fn(usize, LayerPart) -> String>(
    path: &Path,
    spec: &ModelSpec,
    rope: RopeStyle,
    dtype: DType,
    device: &Device,
    names: &TensorNames<F>,
    mut load: impl FnMut(&str) -> Result<Option<Tensor>, RuntimeError>,
) -> Result<Weights, RuntimeError> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(RuntimeError::Invalid(format!(
            "weights dtype {dtype:?}: expected f32, f16 or bf16"
        )));
    }
    let h = spec.hidden_size as usize;
    let q = (spec.n_heads * spec.head_dim) as usize;
    let kv = (spec.n_kv_heads * spec.head_dim) as usize;
    let inter = spec.intermediate_size as usize;
    let vocab = spec.vocab_size as usize;
    let mut tensor = |name: &str, expected: &[usize]| -> Result<Tensor, RuntimeError> {
        let Some(t) = load(name)? else {
            return Err(RuntimeError::Format {
                path: path.display().to_string(),
                message: format!("missing tensor {name}"),
            });
        };
        if t.dims() != expected {
            return Err(RuntimeError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    };
    let embed = tensor(names.embed, &[vocab, h])?;
    let mut layers = Vec::with_capacity(spec.n_layers as usize);
    for i in 0..spec.n_layers as usize {
        let mut part = |part, shape: &[usize]| tensor(&(names.layer)(i, part), shape);
        layers.push(LayerWeights {
            attn_norm: part(LayerPart::AttnNorm, &[h])?,
            wq: part(LayerPart::Q, &[q, h])?,
            wk: part(LayerPart::K, &[kv, h])?,
            wv: part(LayerPart::V, &[kv, h])?,
            wo: part(LayerPart::O, &[h, q])?,
            ffn_norm: part(LayerPart::FfnNorm, &[h])?,
            w_gate: part(LayerPart::Gate, &[inter, h])?,
            w_up: part(LayerPart::Up, &[inter, h])?,
            w_down: part(LayerPart::Down, &[h, inter])?,
        });
    }
    let norm = tensor(names.norm, &[h])?;
    let lm_head = if spec.tie_word_embeddings {
        embed.clone()
    } else {
        tensor(names.lm_head, &[vocab, h])?
    };
    Ok(Weights {
        spec: spec.clone(),
        rope,
        embed,
        layers,
        norm,
        lm_head,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

    type Metadata = Vec<(String, Value)>;
    type Tensors = Vec<(String, QTensor)>;

    /// A Llama small enough to write and read in milliseconds.
    pub(in crate::runtime) fn tiny_spec(tied: bool) -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            n_layers: 2,
            hidden_size: 64,
            intermediate_size: 128,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 100,
            max_position_embeddings: 256,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: tied,
        }
    }

    pub(in crate::runtime) fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The metadata and tensors of `w` under llama.cpp's names, stored as `storage`.
    fn gguf_parts(w: &Weights, storage: GgmlDType) -> (Metadata, Tensors) {
        let s = &w.spec;
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("general.name".to_string(), Value::String(s.name.clone())),
            ("llama.block_count".to_string(), Value::U32(s.n_layers)),
            (
                "llama.context_length".to_string(),
                Value::U32(s.max_position_embeddings),
            ),
            (
                "llama.embedding_length".to_string(),
                Value::U32(s.hidden_size),
            ),
            (
                "llama.feed_forward_length".to_string(),
                Value::U32(s.intermediate_size),
            ),
            (
                "llama.attention.head_count".to_string(),
                Value::U32(s.n_heads),
            ),
            (
                "llama.attention.head_count_kv".to_string(),
                Value::U32(s.n_kv_heads),
            ),
            (
                "llama.rope.freq_base".to_string(),
                Value::F32(s.rope_theta as f32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon".to_string(),
                Value::F32(s.rms_norm_eps as f32),
            ),
            ("llama.vocab_size".to_string(), Value::U32(s.vocab_size)),
        ];
        let q = |t: &Tensor| QTensor::quantize(t, storage).unwrap();
        let mut tensors = vec![
            ("token_embd.weight".to_string(), q(&w.embed)),
            ("output_norm.weight".to_string(), q(&w.norm)),
        ];
        if !s.tie_word_embeddings {
            tensors.push(("output.weight".to_string(), q(&w.lm_head)));
        }
        for (i, l) in w.layers.iter().enumerate() {
            for (name, t) in [
                ("attn_norm", &l.attn_norm),
                ("attn_q", &l.wq),
                ("attn_k", &l.wk),
                ("attn_v", &l.wv),
                ("attn_output", &l.wo),
                ("ffn_norm", &l.ffn_norm),
                ("ffn_gate", &l.w_gate),
                ("ffn_up", &l.w_up),
                ("ffn_down", &l.w_down),
            ] {
                tensors.push((format!("blk.{i}.{name}.weight"), q(t)));
            }
        }
        (metadata, tensors)
    }

    fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) {
        let mut file = File::create(path).unwrap();
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    }

    fn assert_same_weights(a: &Weights, b: &Weights) {
        assert_eq!(a.spec, b.spec);
        assert_eq!(values(&a.embed), values(&b.embed));
        assert_eq!(values(&a.norm), values(&b.norm));
        assert_eq!(values(&a.lm_head), values(&b.lm_head));
        assert_eq!(a.layers.len(), b.layers.len());
        for (x, y) in a.layers.iter().zip(&b.layers) {
            for (p, q) in [
                (&x.attn_norm, &y.attn_norm),
                (&x.wq, &y.wq),
                (&x.wk, &y.wk),
                (&x.wv, &y.wv),
                (&x.wo, &y.wo),
                (&x.ffn_norm, &y.ffn_norm),
                (&x.w_gate, &y.w_gate),
                (&x.w_up, &y.w_up),
                (&x.w_down, &y.w_down),
            ] {
                assert_eq!(p.dims(), q.dims());
                assert_eq!(values(p), values(q));
            }
        }
    }

    fn message(e: RuntimeError) -> String {
        e.to_string()
    }

    #[test]
    fn a_written_gguf_loads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for tied in [true, false] {
            let spec = tiny_spec(tied);
            let w = Weights::random(&spec, DType::F32, &Device::Cpu, 7).unwrap();
            let (metadata, tensors) = gguf_parts(&w, GgmlDType::F32);
            let path = dir.path().join(format!("tiny-{tied}.gguf"));
            write_gguf(&path, &metadata, &tensors);
            let loaded = Weights::from_gguf(&path, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(loaded.rope, RopeStyle::Interleaved);
            // Metadata stores f32: compare the spec after the same rounding.
            let mut expected = w.clone();
            expected.spec.rms_norm_eps = spec.rms_norm_eps as f32 as f64;
            expected.spec.rope_theta = spec.rope_theta as f32 as f64;
            assert_same_weights(&loaded, &expected);
            let bf16 = Weights::from_gguf(&path, DType::BF16, &Device::Cpu).unwrap();
            assert_eq!(bf16.dtype(), DType::BF16);
            assert_eq!(
                values(&bf16.layers[1].w_up),
                values(&w.layers[1].w_up.to_dtype(DType::BF16).unwrap())
            );
        }
    }

    #[test]
    fn gguf_structure_errors_name_the_tensor_or_key() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny_spec(false);
        let w = Weights::random(&spec, DType::F32, &Device::Cpu, 7).unwrap();
        let (metadata, tensors) = gguf_parts(&w, GgmlDType::F32);
        let load = |name: &str, metadata: &[(String, Value)], tensors: &[(String, QTensor)]| {
            let path = dir.path().join(name);
            write_gguf(&path, metadata, tensors);
            Weights::from_gguf(&path, DType::F32, &Device::Cpu).unwrap_err()
        };

        let without = |name: &str| -> Vec<(String, QTensor)> {
            let (_, mut t) = gguf_parts(&w, GgmlDType::F32);
            t.retain(|(n, _)| n != name);
            t
        };
        let err = message(load("a.gguf", &metadata, &without("blk.1.ffn_up.weight")));
        assert!(err.contains("missing tensor blk.1.ffn_up.weight"), "{err}");
        assert!(err.contains("a.gguf"), "{err}");

        let mut reshaped = without("blk.0.attn_k.weight");
        reshaped.push((
            "blk.0.attn_k.weight".into(),
            QTensor::quantize(&w.layers[0].wq, GgmlDType::F32).unwrap(),
        ));
        match load("c.gguf", &metadata, &reshaped) {
            RuntimeError::Shape {
                name,
                expected,
                found,
            } => {
                assert_eq!(name, "blk.0.attn_k.weight");
                assert_eq!(expected, vec![32, 64]);
                assert_eq!(found, vec![64, 64]);
            }
            e => panic!("expected a shape error, got {e}"),
        }

        let mut no_layers = metadata.clone();
        no_layers.retain(|(k, _)| k != "llama.block_count");
        let err = message(load("d.gguf", &no_layers, &tensors));
        assert!(
            err.contains("missing metadata key llama.block_count"),
            "{err}"
        );

        let mut bad_type = metadata.clone();
        bad_type.retain(|(k, _)| k != "llama.block_count");
        bad_type.push(("llama.block_count".into(), Value::String("two".into())));
        let err = message(load("e.gguf", &bad_type, &tensors));
        assert!(err.contains("llama.block_count"), "{err}");

        let mut other_arch = metadata.clone();
        other_arch[0].1 = Value::String("gemma".into());
        let err = message(load("f.gguf", &other_arch, &tensors));
        assert!(err.contains("gemma") && err.contains("llama"), "{err}");

        // candle's parser divides by the alignment: a zero must be an error, not a panic.
        let mut zero_alignment = metadata.clone();
        zero_alignment.push(("general.alignment".into(), Value::U32(0)));
        let err = message(load("g.gguf", &zero_alignment, &tensors));
        assert!(err.contains("corrupt GGUF header"), "{err}");
    }

    /// llama.cpp's convention: a file without `output.weight` ties it to the embedding.
    #[test]
    fn a_gguf_without_output_weight_is_tied() {
        let dir = tempfile::tempdir().unwrap();
        let w = Weights::random(&tiny_spec(true), DType::F32, &Device::Cpu, 3).unwrap();
        let (metadata, tensors) = gguf_parts(&w, GgmlDType::F32);
        let path = dir.path().join("tied.gguf");
        write_gguf(&path, &metadata, &tensors);
        let file = GgufFile::open(&path).unwrap();
        assert!(file.spec().unwrap().tie_word_embeddings);
        let loaded = file.weights(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(values(&loaded.lm_head), values(&loaded.embed));
    }

    fn smollm2() -> PathBuf {
        test_gguf_path().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn smollm2_spec_matches_the_published_architecture() {
        let spec = GgufFile::open(&smollm2()).unwrap().spec().unwrap();
        let preset = ModelSpec::preset("smollm2-135m").unwrap();
        assert_eq!(
            ModelSpec {
                name: preset.name.clone(),
                rms_norm_eps: preset.rms_norm_eps,
                ..spec.clone()
            },
            preset
        );
        assert!(
            (spec.rms_norm_eps - 1e-5).abs() < 1e-10,
            "{}",
            spec.rms_norm_eps
        );
        assert!(!spec.name.is_empty());
    }

    fn f16_at(bytes: &[u8], at: usize) -> f32 {
        let t = Tensor::from_raw_buffer(&bytes[at..at + 2], DType::F16, &[1], &Device::Cpu);
        values(&t.unwrap())[0]
    }

    /// Dequantized values checked against the file's bytes decoded by hand: the Q8_0 token
    /// embedding and the Q4_1 query projection, first block of each.
    #[test]
    fn smollm2_weights_dequantize_to_the_stored_values() {
        let path = smollm2();
        let file = GgufFile::open(&path).unwrap();
        let w = file.weights(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(w.rope, RopeStyle::Interleaved);
        assert_eq!(w.layers.len(), 30);
        assert_eq!(w.embed.dims(), &[49152, 576]);
        assert_eq!(w.layers[0].wk.dims(), &[192, 576]);
        assert_eq!(w.layers[29].w_down.dims(), &[576, 1536]);
        assert_eq!(values(&w.lm_head), values(&w.embed));

        let bytes = std::fs::read(&path).unwrap();
        let content = file.content();
        let start = |name: &str| {
            let info = &content.tensor_infos[name];
            (content.tensor_data_offset + info.offset) as usize
        };
        let embd = &content.tensor_infos["token_embd.weight"];
        assert_eq!(embd.ggml_dtype, GgmlDType::Q8_0);
        let at = start("token_embd.weight");
        let d = f16_at(&bytes, at);
        let expected: Vec<f32> = (0..32)
            .map(|j| d * bytes[at + 2 + j] as i8 as f32)
            .collect();
        let row0 = values(&w.embed.get(0).unwrap());
        assert_eq!(&row0[..32], &expected[..]);

        assert_eq!(
            content.tensor_infos["blk.0.attn_q.weight"].ggml_dtype,
            GgmlDType::Q4_1
        );
        let at = start("blk.0.attn_q.weight");
        let (d, m) = (f16_at(&bytes, at), f16_at(&bytes, at + 2));
        let qs = &bytes[at + 4..at + 20];
        let mut expected = vec![0f32; 32];
        for j in 0..16 {
            expected[j] = (qs[j] & 0x0f) as f32 * d + m;
            expected[j + 16] = (qs[j] >> 4) as f32 * d + m;
        }
        let row0 = values(&w.layers[0].wq.get(0).unwrap());
        for (x, y) in row0[..32].iter().zip(&expected) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
        }

        for dtype in [DType::F16, DType::BF16] {
            let v = file.weights(dtype, &Device::Cpu).unwrap();
            assert_eq!(v.dtype(), dtype);
            assert_eq!(
                values(&v.layers[7].w_gate),
                values(&w.layers[7].w_gate.to_dtype(dtype).unwrap())
            );
        }
    }

    /// Damaged copies of the real file, and things that are not GGUF at all: each a clear
    /// error naming the file, never a panic.
    #[test]
    fn corrupt_or_missing_files_are_clear_errors() {
        let original = std::fs::read(smollm2()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let err = message(Weights::from_gguf(&path, DType::F32, &Device::Cpu).unwrap_err());
            assert!(err.contains(name), "{err}");
            err
        };
        let err = open("first-mb.gguf", &original[..1 << 20]);
        assert!(err.contains("unreadable GGUF header"), "{err}");
        let err = open("minus-one.gguf", &original[..original.len() - 1]);
        assert!(
            err.contains("tensor output_norm.weight") && err.contains("truncated"),
            "{err}"
        );
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let err = open("random.gguf", &random);
        assert!(err.contains("not a GGUF file"), "{err}");
        let mut gguf_then_noise = b"GGUF".to_vec();
        gguf_then_noise.extend_from_slice(&random);
        let err = open("noise.gguf", &gguf_then_noise);
        assert!(err.contains("GGUF header"), "{err}");
        let err = open("empty.gguf", &[]);
        assert!(err.contains("not a GGUF file"), "{err}");

        let missing = dir.path().join("absent.gguf");
        match Weights::from_gguf(&missing, DType::F32, &Device::Cpu).unwrap_err() {
            RuntimeError::Io { path, source } => {
                assert!(path.ends_with("absent.gguf"));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            e => panic!("expected an I/O error, got {e}"),
        }
    }

    #[test]
    fn the_test_model_path_says_how_to_fetch_a_missing_file() {
        let missing = tempfile::tempdir().unwrap().path().join("none.gguf");
        let err = existing_test_gguf(missing).unwrap_err().to_string();
        assert!(err.contains("none.gguf"), "{err}");
        assert!(err.contains("disagg-hw fetch-model smollm2-135m"), "{err}");
    }
}
