//! The runtime against candle-transformers' `quantized_llama` on the real SmolLM2-135M-Instruct
//! GGUF: logits of a prompt and greedy generation from a chat prompt.
//!
//! Everything runs in one test so that this binary has a single test thread: the reference is
//! switched to dequantized f32 matmuls (the runtime dequantizes on load) through an
//! environment variable candle reads on first use, which must be set before any thread reads
//! the environment. With both sides in f32 the only differences are summation order.

#![cfg(feature = "runtime")]

use candle_core::quantized::gguf_file;
use candle_transformers::models::quantized_llama::ModelWeights;
use models::runtime::{
    ChatMessage, Device, GgufFile, KvCache, Model, SeqInput, Tensor, TensorDType, argmax,
    test_gguf_path,
};

/// Max |ours - reference| over a row of logits, relative to the row's largest |reference|.
const LOGIT_TOLERANCE: f32 = 1e-4;
const GREEDY_TOKENS: usize = 32;

fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

struct Reference(ModelWeights);

impl Reference {
    fn load(path: &std::path::Path) -> Reference {
        let mut file = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        Reference(ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap())
    }

    /// Logits of the last of `tokens`, fed from position `pos`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = self.0.forward(&x, pos).unwrap();
        logits.squeeze(0).unwrap().to_vec1().unwrap()
    }
}

struct Ours {
    model: Model,
    cache: KvCache,
    table: Vec<u32>,
}

impl Ours {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let input = SeqInput {
            tokens,
            start_pos: pos,
            block_table: &self.table,
        };
        let logits = self.model.forward(&mut self.cache, &[input]).unwrap();
        logits.get(0).unwrap().to_vec1().unwrap()
    }
}

#[test]
fn matches_quantized_llama_on_smollm2() {
    // SAFETY: the only test of this binary sets it before any thread reads the environment.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let path = test_gguf_path().unwrap_or_else(|e| panic!("{e}"));
    let gguf = GgufFile::open(&path).unwrap();
    let tokenizer = gguf.tokenizer().unwrap();
    let weights = gguf.weights(TensorDType::F32, &Device::Cpu).unwrap();
    let model = Model::new(weights).unwrap();
    // A scattered block table: the paging must not matter.
    let table: Vec<u32> = (0..32).map(|i| (i * 7 + 3) % 32).collect();
    let cache = KvCache::new(model.spec(), 32, 16, TensorDType::F32, &Device::Cpu).unwrap();
    let mut ours = Ours {
        model,
        cache,
        table,
    };
    let mut reference = Reference::load(&path);

    let prompt = tokenizer.apply_chat_template(
        &[ChatMessage::new("user", "What is the capital of France?")],
        true,
    );
    let ids = tokenizer.encode(&prompt, false).unwrap();
    let mut ours_logits = ours.forward(&ids, 0);
    let mut ref_logits = reference.forward(&ids, 0);
    let err = relative_error(&ours_logits, &ref_logits);
    println!(
        "prefill of {} tokens: relative logit error {err:.2e}",
        ids.len()
    );
    assert!(err < LOGIT_TOLERANCE, "prefill logits differ by {err}");

    let mut ours_tokens = Vec::new();
    let mut ref_tokens = Vec::new();
    let mut worst = err;
    for step in 0..GREEDY_TOKENS {
        let (a, b) = (argmax(&ours_logits), argmax(&ref_logits));
        ours_tokens.push(a);
        ref_tokens.push(b);
        assert_eq!(
            a, b,
            "greedy token {step} differs: {ours_tokens:?} vs {ref_tokens:?}"
        );
        let pos = ids.len() + step;
        ours_logits = ours.forward(&[a], pos);
        ref_logits = reference.forward(&[b], pos);
        worst = worst.max(relative_error(&ours_logits, &ref_logits));
    }
    println!("worst relative logit error over {GREEDY_TOKENS} decode steps: {worst:.2e}");
    assert!(worst < LOGIT_TOLERANCE, "decode logits differ by {worst}");

    let text = tokenizer.decode(&ours_tokens, true).unwrap();
    println!("greedy answer: {text:?}");
    assert!(text.contains("Paris"), "{text}");
    let words: Vec<&str> = text.split_whitespace().collect();
    let english = [
        "the", "of", "is", "and", "a", "in", "france", "capital", "city",
    ];
    let common = words
        .iter()
        .filter(|w| {
            english.contains(
                &w.trim_matches(|c: char| !c.is_alphabetic())
                    .to_lowercase()
                    .as_str(),
            )
        })
        .count();
    assert!(
        words.len() >= 5 && common >= 3,
        "not readable English: {text}"
    );
    assert!(
        text.chars()
            .all(|c| c.is_ascii() && (!c.is_control() || c == '\n')),
        "{text}"
    );
}
