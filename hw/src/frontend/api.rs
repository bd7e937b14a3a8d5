//! The OpenAI wire types: request bodies of `/v1/completions` and `/v1/chat/completions`, their
//! responses and streaming chunks, the models list and the error body, plus the validation that
//! needs no tokenizer. Unknown fields are ignored, as OpenAI does; a known field of the wrong
//! type is an error naming it (see [`parse_json`]).
//!
//! Every type is both `Serialize` and `Deserialize`, so a client (the load generator, the tests)
//! speaks the same shapes the server does.

use super::{BackendError, GenerateInput, ServeTrace, TokenUsage};
use axum::http::StatusCode;
use models::runtime::SamplingParams;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A string or a list of strings, as OpenAI accepts for `stop` and `prompt`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn as_slice(&self) -> &[String] {
        match self {
            StringOrList::One(s) => std::slice::from_ref(s),
            StringOrList::Many(v) => v,
        }
    }
}

/// Hand-written so that a wrong type reads "expected a string or a list of strings" rather
/// than serde's "did not match any variant of untagged enum".
impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<StringOrList, D::Error> {
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = StringOrList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrList, E> {
                Ok(StringOrList::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringOrList, A::Error> {
                let mut all = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    all.push(s);
                }
                Ok(StringOrList::Many(all))
            }
        }
        deserializer.deserialize_any(OneOrMany)
    }
}

/// `prompt` of `/v1/completions` in OpenAI's four forms: a string, a list of strings, a list of
/// token ids, or a list of lists of token ids. Only one prompt is served (see
/// [`CompletionRequest::prompt_input`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// The first element of a prompt list decides its form; later ones must share it.
enum PromptItem {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PromptItem, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a token id or a list of token ids")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                u32::try_from(v)
                    .map(PromptItem::Token)
                    .map_err(|_| E::custom(format!("token id {v} is larger than {}", u32::MAX)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("token id {v} is negative"))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptItem, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    ids.push(id);
                }
                Ok(PromptItem::Tokens(ids))
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

/// Hand-written so that a wrong type names the form expected and the offending element.
impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Prompt, D::Error> {
        struct PromptVisitor;
        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string, a list of strings, a list of token ids or a list of lists of token ids",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                Ok(match seq.next_element::<PromptItem>()? {
                    None => Prompt::Texts(Vec::new()),
                    Some(PromptItem::Text(first)) => {
                        let mut all = vec![first];
                        while let Some(s) = seq.next_element::<String>()? {
                            all.push(s);
                        }
                        Prompt::Texts(all)
                    }
                    Some(PromptItem::Token(first)) => {
                        let mut all = vec![first];
                        while let Some(id) = seq.next_element::<u32>()? {
                            all.push(id);
                        }
                        Prompt::Tokens(all)
                    }
                    Some(PromptItem::Tokens(first)) => {
                        let mut all = vec![first];
                        while let Some(ids) = seq.next_element::<Vec<u32>>()? {
                            all.push(ids);
                        }
                        Prompt::TokenLists(all)
                    }
                })
            }
        }
        deserializer.deserialize_any(PromptVisitor)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk, with no choices, that carries the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    /// One prompt; a list of prompts must hold exactly one (batched prompts are not served).
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StringOrList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// The conversation id for session affinity unless the header `x-conversation-id` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// vLLM's extension: end-of-sequence tokens do not stop the generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// vLLM's extension: the choice carries the generated token ids (`token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_token_ids: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
}

/// One chat message. `content` may arrive as a string, null, or a list of text parts (joined
/// with newlines); it is always sent back as a string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, deserialize_with = "message_content")]
    pub content: String,
}

/// A content part of a chat message; only `{"type": "text", "text": ...}` is served.
#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

fn message_content<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Content;
    impl<'de> Visitor<'de> for Content {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string, null, or a list of text parts")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_unit<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut texts = Vec::new();
            while let Some(part) = seq.next_element::<ContentPart>()? {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    ("text", None) => return Err(de::Error::missing_field("text")),
                    (other, _) => {
                        return Err(de::Error::custom(format!(
                            "content part of type `{other}` is not supported, only `text`"
                        )));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
    }
    deserializer.deserialize_any(Content)
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// OpenAI's newer name for `max_tokens`; it wins when both are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StringOrList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// vLLM's extension: end-of-sequence tokens do not stop the generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// vLLM's extension: the choice carries the generated token ids (`token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_token_ids: Option<bool>,
}

/// The sampling fields both endpoints share, gathered for one validation.
pub struct SamplingFields<'a> {
    pub max_tokens: Option<u64>,
    /// Used when the client sets no `max_tokens`.
    pub default_max_tokens: usize,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<&'a StringOrList>,
    pub seed: Option<u64>,
    /// Used when the client sets no `seed`.
    pub default_seed: u64,
    pub n: Option<u64>,
    pub ignore_eos: Option<bool>,
}

impl SamplingFields<'_> {
    /// Validates the fields (OpenAI's ranges) and builds the runtime's sampling parameters.
    /// Defaults are OpenAI's: temperature 1, top_p 1.
    pub fn into_params(self) -> Result<SamplingParams, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n} is not supported; only one choice per request"),
            ));
        }
        let max_tokens = match self.max_tokens {
            None => self.default_max_tokens,
            Some(0) => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    "max_tokens must be at least 1",
                ));
            }
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature {temperature} must be in [0, 2]"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p {top_p} must be in (0, 1]"),
            ));
        }
        let stop_strings = self.stop.map(|s| s.as_slice().to_vec()).unwrap_or_default();
        if let Some(i) = stop_strings.iter().position(String::is_empty) {
            return Err(ApiError::invalid(
                &format!("stop[{i}]"),
                "a stop string must not be empty",
            ));
        }
        Ok(SamplingParams {
            temperature,
            top_p,
            seed: self.seed.unwrap_or(self.default_seed),
            max_tokens,
            stop_token_ids: Vec::new(),
            stop_strings,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

impl CompletionRequest {
    /// The one prompt of the request, as text or token ids. A token prompt must hold a token:
    /// unlike an empty text, it has no tokenizer to continue from a document boundary.
    pub fn prompt_input(&self) -> Result<GenerateInput, ApiError> {
        let several = |n: usize| {
            ApiError::invalid(
                "prompt",
                format!("prompt must be one prompt; a list of {n} prompts is not supported"),
            )
        };
        let tokens = |ids: &[u32]| {
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "prompt",
                    "a prompt of token ids must hold at least one token",
                ));
            }
            Ok(GenerateInput::Tokens(ids.to_vec()))
        };
        match &self.prompt {
            Prompt::Text(text) => Ok(GenerateInput::Text(text.clone())),
            Prompt::Texts(texts) => match texts.as_slice() {
                [one] => Ok(GenerateInput::Text(one.clone())),
                all => Err(several(all.len())),
            },
            Prompt::Tokens(ids) => tokens(ids),
            Prompt::TokenLists(lists) => match lists.as_slice() {
                [one] => tokens(one),
                all => Err(several(all.len())),
            },
        }
    }

    pub fn sampling(
        &self,
        default_max_tokens: usize,
        default_seed: u64,
    ) -> Result<SamplingParams, ApiError> {
        SamplingFields {
            max_tokens: self.max_tokens,
            default_max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.as_ref(),
            seed: self.seed,
            default_seed,
            n: self.n,
            ignore_eos: self.ignore_eos,
        }
        .into_params()
    }
}

impl ChatCompletionRequest {
    pub fn validate_messages(&self) -> Result<(), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "messages must hold at least one message",
            ));
        }
        Ok(())
    }

    pub fn sampling(
        &self,
        default_max_tokens: usize,
        default_seed: u64,
    ) -> Result<SamplingParams, ApiError> {
        let (field, max_tokens) = match self.max_completion_tokens {
            Some(m) => ("max_completion_tokens", Some(m)),
            None => ("max_tokens", self.max_tokens),
        };
        SamplingFields {
            max_tokens,
            default_max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.as_ref(),
            seed: self.seed,
            default_seed,
            n: self.n,
            ignore_eos: self.ignore_eos,
        }
        .into_params()
        .map_err(|mut e| {
            if e.param.as_deref() == Some("max_tokens") {
                e.param = Some(field.to_owned());
                e.message = e.message.replace("max_tokens", field);
            }
            e
        })
    }
}

/// `usage` of a response or of the last streamed chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Always sent by this server; optional so that a client reads servers that leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from a prefix cache.
    #[serde(default)]
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(u: TokenUsage, cached_tokens: u32) -> Usage {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: cached_tokens as usize,
            }),
        }
    }
}

/// A choice of a completion response, or of one of its streamed chunks (`object`
/// `text_completion` in both, as OpenAI does).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// Always null: log-probabilities are not served.
    pub logprobs: Option<()>,
    /// Null until the last chunk of a stream.
    pub finish_reason: Option<String>,
    /// With `return_token_ids`: every generated id (in a stream, on the finishing chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// The body of a non-streamed completion and of each streamed chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// This server's extension: how the request was served. In the non-streamed response
    /// and in the streamed chunk that carries the finish reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disagg: Option<ServeTrace>,
}

/// The assistant's message of a non-streamed chat completion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<()>,
    pub finish_reason: Option<String>,
    /// With `return_token_ids`: every generated id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `object: "chat.completion"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// See [`CompletionResponse::disagg`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disagg: Option<ServeTrace>,
}

/// What a streamed chat chunk adds: the role in the first chunk, text in the others, nothing in
/// the last one (which carries the finish reason).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<String>,
    /// With `return_token_ids`, on the finishing chunk: every generated id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `object: "chat.completion.chunk"`: one `data:` event of a streamed chat completion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// See [`CompletionResponse::disagg`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disagg: Option<ServeTrace>,
}

/// An entry of `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// The context length in tokens, as vLLM reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

/// `GET /v1/models`: `{"object": "list", "data": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

/// The inside of OpenAI's error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending request field, when there is one.
    pub param: Option<String>,
    pub code: Option<String>,
}

/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// An error the frontend answers with: its HTTP status and OpenAI's error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 naming the offending field.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_owned()),
            code: None,
        }
    }

    pub fn payload_too_large(limit_bytes: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than the limit of {limit_bytes} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
            },
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> ApiError {
        let message = e.to_string();
        let (status, kind, param, code) = match e {
            BackendError::UnknownModel(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            BackendError::PromptTooLong { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                Some("context_length_exceeded"),
            ),
            BackendError::InvalidPrompt(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("prompt"),
                None,
            ),
            BackendError::QueueFull => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                None,
                Some("queue_full"),
            ),
            BackendError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                None,
                None,
            ),
            BackendError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        };
        ApiError {
            status,
            message,
            kind,
            param: param.map(str::to_owned),
            code,
        }
    }
}

/// Parses a request body; a syntax error or a wrong type is a 400 whose `param` is the path of
/// the offending field (`temperature`, `messages[1].role`).
pub fn parse_json<T: de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // Only a type or value error sits at a known field; a syntax error's path is partial.
        if inner.classify() != serde_json::error::Category::Data {
            return ApiError::invalid("", format!("malformed JSON body: {inner}"));
        }
        match path.as_str() {
            "." => ApiError::invalid("", format!("invalid request body: {inner}")),
            field => ApiError::invalid(field, format!("invalid field `{field}`: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("", format!("malformed JSON body: {e}")))?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_is_a_string_or_a_list() {
        let one: CompletionRequest =
            parse_json(br#"{"model":"m","prompt":"hi","stop":"\n"}"#).unwrap();
        assert_eq!(one.stop, Some(StringOrList::One("\n".into())));
        let many: CompletionRequest =
            parse_json(br#"{"model":"m","prompt":"hi","stop":["a","b"]}"#).unwrap();
        assert_eq!(many.stop.unwrap().as_slice(), ["a", "b"]);
        let bad = parse_json::<CompletionRequest>(br#"{"model":"m","prompt":"hi","stop":3}"#)
            .unwrap_err();
        assert_eq!(bad.param.as_deref(), Some("stop"));
        assert!(
            bad.message.contains("a string or a list of strings"),
            "{}",
            bad.message
        );
        let bad_item =
            parse_json::<CompletionRequest>(br#"{"model":"m","prompt":"hi","stop":["a",1]}"#)
                .unwrap_err();
        assert_eq!(bad_item.param.as_deref(), Some("stop[1]"));
    }

    #[test]
    fn prompt_takes_openais_four_forms() {
        let input = |prompt: &str| {
            let body = format!(r#"{{"model":"m","prompt":{prompt}}}"#);
            parse_json::<CompletionRequest>(body.as_bytes()).and_then(|r| r.prompt_input())
        };
        assert_eq!(input(r#""hi""#), Ok(GenerateInput::Text("hi".into())));
        assert_eq!(input(r#"["hi"]"#), Ok(GenerateInput::Text("hi".into())));
        assert_eq!(input("[5,0,7]"), Ok(GenerateInput::Tokens(vec![5, 0, 7])));
        assert_eq!(input("[[5,7]]"), Ok(GenerateInput::Tokens(vec![5, 7])));
        assert_eq!(input(r#""""#), Ok(GenerateInput::Text(String::new())));
        for several in [r#"["a","b"]"#, "[[1],[2]]", "[]"] {
            let e = input(several).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{several}");
            assert!(
                e.message.contains("prompts is not supported"),
                "{}",
                e.message
            );
        }
        let empty = input("[[]]").unwrap_err();
        assert_eq!(empty.param.as_deref(), Some("prompt"));
        assert!(
            empty.message.contains("at least one token"),
            "{}",
            empty.message
        );
        let too_big = input("[4294967296]").unwrap_err();
        assert_eq!(too_big.param.as_deref(), Some("prompt[0]"));
        let negative = input("[1,-2]").unwrap_err();
        assert_eq!(negative.param.as_deref(), Some("prompt[1]"));
        let wrong = input("7").unwrap_err();
        assert_eq!(wrong.param.as_deref(), Some("prompt"));
        assert!(
            wrong.message.contains("list of token ids"),
            "{}",
            wrong.message
        );
    }

    #[test]
    fn prompt_serializes_back_to_its_form() {
        for (prompt, json) in [
            (Prompt::Text("a".into()), r#""a""#),
            (Prompt::Texts(vec!["a".into()]), r#"["a"]"#),
            (Prompt::Tokens(vec![1, 2]), "[1,2]"),
            (Prompt::TokenLists(vec![vec![1, 2]]), "[[1,2]]"),
        ] {
            assert_eq!(serde_json::to_string(&prompt).unwrap(), json);
            assert_eq!(serde_json::from_str::<Prompt>(json).unwrap(), prompt);
        }
    }

    #[test]
    fn extensions_reach_the_sampling_parameters() {
        let req: CompletionRequest =
            parse_json(br#"{"model":"m","prompt":"p","ignore_eos":true,"return_token_ids":true}"#)
                .unwrap();
        assert!(req.sampling(16, 0).unwrap().ignore_eos);
        assert_eq!(req.return_token_ids, Some(true));
        let chat: ChatCompletionRequest = parse_json(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"ignore_eos":null}"#,
        )
        .unwrap();
        assert!(!chat.sampling(16, 0).unwrap().ignore_eos);
        let bad = parse_json::<ChatCompletionRequest>(
            br#"{"model":"m","messages":[],"return_token_ids":"yes"}"#,
        )
        .unwrap_err();
        assert_eq!(bad.param.as_deref(), Some("return_token_ids"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_nulls_are_absent() {
        let req: ChatCompletionRequest = parse_json(
            br#"{"model":"m","messages":[{"role":"user","content":"hi","name":"x"}],
                "frequency_penalty":0,"logit_bias":{},"temperature":null,"stop":null}"#,
        )
        .unwrap();
        assert_eq!(req.temperature, None);
        assert_eq!(req.stop, None);
        assert_eq!(req.messages[0].content, "hi");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let cases: [(&[u8], &str); 7] = [
            (
                br#"{"model":"m","prompt":"p","temperature":"hot"}"#,
                "temperature",
            ),
            (
                br#"{"model":"m","prompt":"p","max_tokens":-1}"#,
                "max_tokens",
            ),
            (br#"{"model":"m","prompt":"p","stream":"yes"}"#, "stream"),
            (br#"{"model":7,"prompt":"p"}"#, "model"),
            (br#"{"model":"m","prompt":[true]}"#, "prompt[0]"),
            (br#"{"model":"m","prompt":["a",2]}"#, "prompt[1]"),
            (br#"{"model":"m","prompt":[[1,-2]]}"#, "prompt[0][1]"),
        ];
        for (body, field) in cases {
            let e = parse_json::<CompletionRequest>(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
            assert!(e.message.contains(field), "{}", e.message);
        }
        let missing = parse_json::<CompletionRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert!(missing.message.contains("prompt"), "{}", missing.message);
    }

    #[test]
    fn roles_and_content_forms() {
        let req: ChatCompletionRequest = parse_json(
            br#"{"model":"m","messages":[
                {"role":"system","content":"s"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null}]}"#,
        )
        .unwrap();
        let contents: Vec<&str> = req.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, ["s", "a\nb", ""]);
        let e = parse_json::<ChatCompletionRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"wizard","content":"b"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));
        assert!(e.message.contains("wizard"), "{}", e.message);
        let image = parse_json::<ChatCompletionRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(image.param.as_deref(), Some("messages[0].content"));
    }

    #[test]
    fn malformed_json_is_a_400_without_a_field() {
        for body in [
            &b"{\"model\": "[..],
            b"not json",
            br#"{"model":"m","prompt":"p"} x"#,
        ] {
            let e = parse_json::<CompletionRequest>(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
            assert_eq!(e.param, None);
        }
    }

    fn fields(
        max_tokens: Option<u64>,
        temperature: Option<f32>,
        top_p: Option<f32>,
    ) -> SamplingFields<'static> {
        SamplingFields {
            max_tokens,
            default_max_tokens: 16,
            temperature,
            top_p,
            stop: None,
            seed: None,
            default_seed: 9,
            n: None,
            ignore_eos: None,
        }
    }

    #[test]
    fn sampling_ranges_name_the_field() {
        let ok = fields(None, None, None).into_params().unwrap();
        assert_eq!(
            (ok.max_tokens, ok.temperature, ok.top_p, ok.seed),
            (16, 1.0, 1.0, 9)
        );
        let param = |f: SamplingFields| f.into_params().unwrap_err().param.unwrap();
        assert_eq!(param(fields(Some(0), None, None)), "max_tokens");
        assert_eq!(param(fields(None, Some(2.5), None)), "temperature");
        assert_eq!(param(fields(None, Some(-0.1), None)), "temperature");
        assert_eq!(param(fields(None, None, Some(0.0))), "top_p");
        assert_eq!(param(fields(None, None, Some(1.5))), "top_p");
        assert!(fields(Some(1), Some(0.0), Some(1.0)).into_params().is_ok());
        assert!(fields(None, Some(2.0), Some(0.01)).into_params().is_ok());
        let stop = StringOrList::Many(vec!["x".into(), String::new()]);
        let with_stop = SamplingFields {
            stop: Some(&stop),
            ..fields(None, None, None)
        };
        assert_eq!(param(with_stop), "stop[1]");
        let n2 = SamplingFields {
            n: Some(2),
            ..fields(None, None, None)
        };
        assert_eq!(param(n2), "n");
    }

    #[test]
    fn chat_max_completion_tokens_wins_and_is_named() {
        let mut req: ChatCompletionRequest =
            parse_json(br#"{"model":"m","messages":[],"max_tokens":5,"max_completion_tokens":7}"#)
                .unwrap();
        assert_eq!(req.sampling(100, 0).unwrap().max_tokens, 7);
        assert_eq!(
            req.validate_messages().unwrap_err().param.as_deref(),
            Some("messages")
        );
        req.max_completion_tokens = Some(0);
        let e = req.sampling(100, 0).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
    }

    #[test]
    fn backend_errors_map_to_statuses() {
        let status = |e: BackendError| ApiError::from(e).status.as_u16();
        assert_eq!(status(BackendError::UnknownModel("x".into())), 404);
        assert_eq!(
            status(BackendError::PromptTooLong {
                tokens: 9,
                limit: 8
            }),
            400
        );
        assert_eq!(status(BackendError::QueueFull), 429);
        let invalid = ApiError::from(BackendError::InvalidPrompt("token id 9 is too big".into()));
        assert_eq!(
            (invalid.status.as_u16(), invalid.param.as_deref()),
            (400, Some("prompt"))
        );
        assert_eq!(status(BackendError::Unavailable("down".into())), 503);
        assert_eq!(status(BackendError::Internal("bug".into())), 500);
        let body = serde_json::to_value(ApiError::from(BackendError::QueueFull).body()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert!(body["error"]["param"].is_null());
    }
}
