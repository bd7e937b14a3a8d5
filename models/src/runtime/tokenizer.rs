//! Text <-> token ids, built from a GGUF file's `tokenizer.ggml.*` metadata or from an HF
//! `tokenizer.json`, and SmolLM2-Instruct's chat template; or, for a model with random weights
//! and no vocabulary, one that writes each token as its id (see [`Tokenizer::token_ids`]).

use super::RuntimeError;
use super::token_ids;
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// The system prompt SmolLM2-Instruct's chat template inserts when a conversation has none.
pub const SMOLLM2_DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// Texts of the special tokens that end a generation (llama.cpp's end-of-generation set).
const END_OF_GENERATION: [&str; 7] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// Llama 3's pre-tokenizer regex (llama.cpp's "llama-bpe"): digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tokenizer {
    vocabulary: Vocabulary,
    /// Counted once: the library counts by copying the whole vocabulary, too slow to do for
    /// every decoded token.
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    chat_template: Option<String>,
}

/// What a token stands for.
#[derive(Clone, Debug)]
enum Vocabulary {
    /// A real vocabulary: text in, text out.
    Text(Box<tokenizers::Tokenizer>),
    /// No vocabulary: a token's text is its id, `<17>`.
    Ids,
}

impl Tokenizer {
    /// Builds the tokenizer that a GGUF file describes. Only byte-level BPE
    /// (`tokenizer.ggml.model` = "gpt2") is supported; `tokenizer.ggml.pre` picks the
    /// pre-tokenizer as llama.cpp does. Control tokens become special tokens and
    /// user-defined ones plain added tokens, both matched whole in the input text.
    pub fn from_gguf(content: &Content) -> Result<Tokenizer, RuntimeError> {
        let format = |message: String| RuntimeError::Format {
            path: "GGUF metadata".into(),
            message,
        };
        let meta = |key: &str| content.metadata.get(key);
        let string = |key: &str| -> Result<Option<&str>, RuntimeError> {
            match meta(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(v) => Err(format(format!(
                    "metadata {key}: expected a string, found {v:?}"
                ))),
            }
        };
        let strings = |key: &str| -> Result<Vec<&str>, RuntimeError> {
            let Some(Value::Array(values)) = meta(key) else {
                return Err(format(format!(
                    "missing metadata key {key} (an array of strings)"
                )));
            };
            values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(format(format!(
                        "metadata {key}: expected strings, found {v:?}"
                    ))),
                })
                .collect()
        };
        let token_id = |key: &str| -> Result<Option<u32>, RuntimeError> {
            match meta(key) {
                None => Ok(None),
                Some(Value::U32(id)) => Ok(Some(*id)),
                Some(Value::I32(id)) if *id >= 0 => Ok(Some(*id as u32)),
                Some(v) => Err(format(format!(
                    "metadata {key}: expected a token id, found {v:?}"
                ))),
            }
        };

        match string("tokenizer.ggml.model")? {
            Some("gpt2") => {}
            Some(other) => {
                return Err(format(format!(
                    "tokenizer.ggml.model is \"{other}\"; only \"gpt2\" (byte-level BPE) is supported"
                )));
            }
            None => return Err(format("missing metadata key tokenizer.ggml.model".into())),
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, merge)| match merge.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(format(format!(
                    "tokenizer.ggml.merges[{i}] = {merge:?} is not two tokens separated by a space"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.to_string(), id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| format(format!("tokenizer.ggml.merges: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let Some(pre) = string("tokenizer.ggml.pre")? else {
            return Err(format("missing metadata key tokenizer.ggml.pre".into()));
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre).map_err(format)?));
        inner.with_decoder(Some(ByteLevel::default()));

        let token_types: Vec<i32> = match meta("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(Value::Array(types)) => types
                .iter()
                .map(|t| match t {
                    Value::I32(t) => Ok(*t),
                    v => Err(format(format!(
                        "metadata tokenizer.ggml.token_type: expected i32, found {v:?}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(format(format!(
                    "metadata tokenizer.ggml.token_type: expected an array, found {v:?}"
                )));
            }
        };
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(format(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            )));
        }
        // llama.cpp's token types: 3 control, 4 user-defined.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter_map(|(token, kind)| match kind {
                3 => Some(AddedToken::from(token.to_string(), true)),
                4 => Some(AddedToken::from(token.to_string(), false)),
                _ => None,
            })
            .collect();
        inner.add_special_tokens(&added);

        let vocab_size = tokens.len() as u32;
        let checked = |key: &str| -> Result<Option<u32>, RuntimeError> {
            match token_id(key)? {
                Some(id) if id >= vocab_size => Err(format(format!(
                    "metadata {key} = {id} is outside the {vocab_size}-token vocabulary"
                ))),
                id => Ok(id),
            }
        };
        let bos = checked("tokenizer.ggml.bos_token_id")?;
        let eos = checked("tokenizer.ggml.eos_token_id")?;
        if let Some(Value::Bool(true)) = meta("tokenizer.ggml.add_bos_token") {
            let Some(bos) = bos else {
                return Err(format(
                    "tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is missing"
                        .into(),
                ));
            };
            let text = tokens[bos as usize];
            let template = TemplateProcessing::builder()
                .try_single(format!("{text} $A"))
                .and_then(|b| b.try_pair(format!("{text} $A {text} $B")))
                .map_err(|e| format(format!("BOS template: {e}")))?
                .special_tokens(vec![(text.to_string(), bos)])
                .build()
                .map_err(|e| format(format!("BOS template: {e}")))?;
            inner.with_post_processor(Some(template));
        }
        let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
        eos_token_ids.extend(end_of_generation_ids(&inner));
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));
        Ok(Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            vocabulary: Vocabulary::Text(Box::new(inner)),
            eos_token_ids,
            chat_template: string("tokenizer.chat_template")?.map(str::to_string),
        })
    }

    /// Loads an HF `tokenizer.json`. Its end-of-generation tokens are the special tokens
    /// among llama.cpp's usual end texts (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, ...).
    pub fn from_file(path: &Path) -> Result<Tokenizer, RuntimeError> {
        if let Err(source) = std::fs::metadata(path) {
            return Err(RuntimeError::Io {
                path: path.display().to_string(),
                source,
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| RuntimeError::Format {
            path: path.display().to_string(),
            message: format!("not a tokenizer.json: {e}"),
        })?;
        let eos_token_ids = end_of_generation_ids(&inner);
        Ok(Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            vocabulary: Vocabulary::Text(Box::new(inner)),
            eos_token_ids,
            chat_template: None,
        })
    }

    /// For a model without a vocabulary (seeded random weights): each of `vocab_size` tokens
    /// is written as its id in angle brackets, tokens separated by a space (`<12> <7>`), and
    /// reads back from that form only. What such a model generates is meaningless text; this
    /// serves it (and token-id prompts) so that its timing can be measured. No token ends a
    /// generation.
    pub fn token_ids(vocab_size: u32) -> Tokenizer {
        Tokenizer {
            vocabulary: Vocabulary::Ids,
            vocab_size: vocab_size as usize,
            eos_token_ids: Vec::new(),
            chat_template: None,
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
    /// recognised; `add_special` adds what the tokenizer prepends or appends (a BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, RuntimeError> {
        match &self.vocabulary {
            Vocabulary::Text(inner) => {
                let encoding = inner
                    .encode(text, add_special)
                    .map_err(|e| RuntimeError::Invalid(format!("cannot tokenize the text: {e}")))?;
                Ok(encoding.get_ids().to_vec())
            }
            Vocabulary::Ids => token_ids::parse(text, self.vocab_size as u32),
        }
    }

    /// The text of `ids`; ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, RuntimeError> {
        let vocab_size = self.vocab_size();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(RuntimeError::Invalid(format!(
                "token id {id} is outside the {vocab_size}-token vocabulary"
            )));
        }
        match &self.vocabulary {
            Vocabulary::Text(inner) => inner
                .decode(ids, skip_special)
                .map_err(|e| RuntimeError::Invalid(format!("cannot decode token ids: {e}"))),
            Vocabulary::Ids => Ok(token_ids::render(ids)),
        }
    }

    /// Tokens that end a generation: the declared EOS first, then the other end-of-turn and
    /// end-of-text special tokens of the vocabulary.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.vocabulary {
            Vocabulary::Text(inner) => inner.token_to_id(token),
            Vocabulary::Ids => match token_ids::parse(token, self.vocab_size as u32) {
                Ok(ids) if ids.len() == 1 => Some(ids[0]),
                _ => None,
            },
        }
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The Jinja chat template the GGUF file carries (`tokenizer.chat_template`), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The prompt for `messages` in SmolLM2-Instruct's ChatML format: each turn
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`, the default system message first when the
    /// conversation does not start with one, and `<|im_start|>assistant\n` last when
    /// `add_generation_prompt`. This is the GGUF's template written out, not a Jinja engine.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> String {
        let mut prompt = String::new();
        if messages.first().is_some_and(|m| m.role != "system") {
            prompt.push_str("<|im_start|>system\n");
            prompt.push_str(SMOLLM2_DEFAULT_SYSTEM);
            prompt.push_str("<|im_end|>\n");
        }
        for message in messages {
            prompt.push_str("<|im_start|>");
            prompt.push_str(&message.role);
            prompt.push('\n');
            prompt.push_str(&message.content);
            prompt.push_str("<|im_end|>\n");
        }
        if add_generation_prompt {
            prompt.push_str("<|im_start|>assistant\n");
        }
        prompt
    }
}

/// The ids of the special tokens whose text is one of [`END_OF_GENERATION`].
fn end_of_generation_ids(inner: &tokenizers::Tokenizer) -> Vec<u32> {
    let added = inner.get_added_tokens_decoder();
    END_OF_GENERATION
        .iter()
        .filter_map(|text| inner.token_to_id(text))
        .filter(|id| added.get(id).is_some_and(|t| t.special))
        .collect()
}

/// llama.cpp's pre-tokenizer for a `tokenizer.ggml.pre` name, as the HF tokenizer.json of
/// those models spells it.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, String> {
    // The GPT-2 regex split, then bytes mapped to printable characters.
    let byte_level = || ByteLevel::new(false, true, true);
    match pre {
        "gpt2" | "gpt-2" | "mpt" | "olmo" => Ok(byte_level().into()),
        // Each digit is its own token (SmolLM2's Digits(individual_digits) + ByteLevel).
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level().into()]).into())
        }
        "llama-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("Llama 3 pre-tokenizer regex: {e}"))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into())
        }
        other => Err(format!(
            "tokenizer.ggml.pre is \"{other}\"; supported: gpt2, gpt-2, mpt, olmo, smollm, \
             starcoder, refact, codeshell, llama-bpe"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{GgufFile, test_gguf_path};
    use std::collections::HashMap;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`, which `apply_chat_template` writes
    /// out by hand.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm2() -> Tokenizer {
        let path = test_gguf_path().unwrap_or_else(|e| panic!("{e}"));
        GgufFile::open(&path).unwrap().tokenizer().unwrap()
    }

    fn ids(t: &Tokenizer, tokens: &[&str]) -> Vec<u32> {
        tokens
            .iter()
            .map(|s| t.token_to_id(s).unwrap_or_else(|| panic!("no token {s:?}")))
            .collect()
    }

    #[test]
    fn special_tokens_resolve_and_are_matched_whole() {
        let t = smollm2();
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
        // The declared EOS (<|im_end|>) first, then <|endoftext|>.
        assert_eq!(t.eos_token_ids(), &[2, 0]);
        let encoded = t.encode("<|im_start|>user\nHi<|im_end|>\n", false).unwrap();
        assert_eq!(encoded, {
            let mut v = vec![1];
            v.extend(ids(&t, &["user", "Ċ", "Hi"]));
            v.extend([2]);
            v.extend(ids(&t, &["Ċ"]));
            v
        });
        // SmolLM2 adds no BOS.
        assert_eq!(
            t.encode("Hi", true).unwrap(),
            t.encode("Hi", false).unwrap()
        );
        assert_eq!(t.decode(&encoded, true).unwrap(), "user\nHi\n");
        assert_eq!(
            t.decode(&encoded, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn known_strings_tokenize_as_the_vocabulary_implies() {
        let t = smollm2();
        assert_eq!(t.encode("Hello world", false).unwrap(), vec![19556, 905]);
        assert_eq!(ids(&t, &["Hello", "Ġworld"]), vec![19556, 905]);
        // Digits are split one by one, with or without a leading space.
        assert_eq!(
            t.encode("12345", false).unwrap(),
            ids(&t, &["1", "2", "3", "4", "5"])
        );
        assert_eq!(
            t.encode("in 2024", false).unwrap(),
            ids(&t, &["in", "Ġ", "2", "0", "2", "4"])
        );
        assert_eq!(
            t.encode("The cat sat.", false).unwrap(),
            ids(&t, &["The", "Ġcat", "Ġsat", "."])
        );
    }

    #[test]
    fn decode_inverts_encode() {
        let t = smollm2();
        for text in [
            "Hello, world! How are you today?",
            "naïve café, Grüße, 東京タワー, Здравствуйте, emoji 🚀🦀",
            "3.14159 and 1,000,000 and 0x1F",
            "  leading spaces, trailing   \n\n\ttabs\t and\r\nCRLF   ",
            "fn main() { println!(\"{}\", 1 + 2); }",
            "",
        ] {
            let ids = t.encode(text, false).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
        }
        let err = t.decode(&[5, 49152], false).unwrap_err().to_string();
        assert!(err.contains("49152"), "{err}");
    }

    #[test]
    fn the_chat_template_is_smollm2s() {
        let t = smollm2();
        assert_eq!(t.chat_template(), Some(SMOLLM2_TEMPLATE));
        let user = ChatMessage::new("user", "What is 2+2?");
        assert_eq!(
            t.apply_chat_template(std::slice::from_ref(&user), true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let conversation = [
            ChatMessage::new("system", "Be brief."),
            user,
            ChatMessage::new("assistant", "4"),
        ];
        assert_eq!(
            t.apply_chat_template(&conversation, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n"
        );
        assert_eq!(t.apply_chat_template(&[], true), "<|im_start|>assistant\n");
        let prompt = t
            .encode(&t.apply_chat_template(&conversation, true), false)
            .unwrap();
        assert_eq!(prompt.iter().filter(|&&id| id == 1).count(), 4);
        assert_eq!(prompt.iter().filter(|&&id| id == 2).count(), 3);
    }

    #[test]
    fn a_saved_tokenizer_json_loads_back_the_same() {
        let t = smollm2();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let Vocabulary::Text(inner) = &t.vocabulary else {
            panic!("SmolLM2 has a vocabulary")
        };
        inner.save(&path, false).unwrap();
        let u = Tokenizer::from_file(&path).unwrap();
        let text = "<|im_start|>user\nCount: 1 2 3, déjà vu<|im_end|>";
        assert_eq!(
            u.encode(text, false).unwrap(),
            t.encode(text, false).unwrap()
        );
        assert_eq!(u.eos_token_ids(), t.eos_token_ids());
        assert_eq!(u.chat_template(), None);

        let err = Tokenizer::from_file(&dir.path().join("absent.json")).unwrap_err();
        assert!(matches!(err, RuntimeError::Io { .. }), "{err}");
        std::fs::write(&path, "{ not json").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a tokenizer.json"),
            "{err}"
        );
    }

    fn content(metadata: Vec<(&str, Value)>) -> Content {
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<HashMap<_, _>>(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A byte-level BPE vocabulary of four tokens and one merge.
    fn tiny_tokenizer_metadata() -> Vec<(&'static str, Value)> {
        vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strings(&["<s>", "a", "b", "ab"])),
            ("tokenizer.ggml.merges", strings(&["a b"])),
            (
                "tokenizer.ggml.token_type",
                Value::Array([3, 1, 1, 1].map(Value::I32).to_vec()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ]
    }

    #[test]
    fn a_bos_is_added_when_the_metadata_asks() {
        let mut metadata = tiny_tokenizer_metadata();
        let t = Tokenizer::from_gguf(&content(metadata.clone())).unwrap();
        assert_eq!(t.encode("abab", true).unwrap(), vec![3, 3]);
        metadata.push(("tokenizer.ggml.add_bos_token", Value::Bool(true)));
        let t = Tokenizer::from_gguf(&content(metadata)).unwrap();
        assert_eq!(t.encode("abab", true).unwrap(), vec![0, 3, 3]);
        assert_eq!(t.encode("abab", false).unwrap(), vec![3, 3]);
        assert_eq!(t.decode(&[0, 3, 1], true).unwrap(), "aba");
    }

    #[test]
    fn unsupported_or_missing_tokenizer_metadata_is_a_clear_error() {
        let err = |metadata: Vec<(&str, Value)>| {
            Tokenizer::from_gguf(&content(metadata))
                .unwrap_err()
                .to_string()
        };
        let with = |key: &'static str, value: Value| {
            let mut m = tiny_tokenizer_metadata();
            m.retain(|(k, _)| *k != key);
            m.push((key, value));
            m
        };
        let without = |key: &str| {
            let mut m = tiny_tokenizer_metadata();
            m.retain(|(k, _)| *k != key);
            m
        };
        let e = err(with("tokenizer.ggml.model", Value::String("llama".into())));
        assert!(e.contains("\"llama\"") && e.contains("gpt2"), "{e}");
        let e = err(with("tokenizer.ggml.pre", Value::String("qwen2".into())));
        assert!(e.contains("qwen2") && e.contains("smollm"), "{e}");
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
        ] {
            let e = err(without(key));
            assert!(e.contains(key), "{e}");
        }
        let e = err(with("tokenizer.ggml.merges", strings(&["ab"])));
        assert!(e.contains("tokenizer.ggml.merges[0]"), "{e}");
        let e = err(with("tokenizer.ggml.bos_token_id", Value::U32(9)));
        assert!(e.contains("tokenizer.ggml.bos_token_id = 9"), "{e}");
        let e = err(with(
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1)]),
        ));
        assert!(e.contains("1 entries for 4 tokens"), "{e}");
        let e = err(with("tokenizer.ggml.tokens", Value::U32(4)));
        assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
    }

    fn splits(pre: &str, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        pre_tokenizer(pre).unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_as_llama_cpp() {
        assert_eq!(
            splits("smollm", "I'm 12345 ok"),
            ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "Ġok"]
        );
        assert_eq!(splits("gpt2", "I'm 12345 ok"), ["I", "'m", "Ġ12345", "Ġok"]);
        assert_eq!(
            splits("llama-bpe", "I'm 12345 ok"),
            ["I", "'m", "Ġ", "123", "45", "Ġok"]
        );
    }
}
